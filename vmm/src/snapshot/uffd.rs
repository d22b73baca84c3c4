//! The `Uffd` memory backend of `PUT /snapshot/load`: guest memory whose
//! pages a separate handler process supplies on first touch, through a
//! userfaultfd (Firecracker's protocol, `docs/snapshotting/
//! handling-page-faults-on-snapshot-resume.md` in Firecracker).
//!
//! # VMM side ([`guest_memory_from_uffd`])
//!
//! 1. Guest memory is anonymous and private (4 KiB pages), laid out as the
//!    snapshot's regions.
//! 2. A userfaultfd is made: from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`;
//!    access is by file mode), else with the `userfaultfd(2)` system call
//!    (which, with `vm.unprivileged_userfaultfd = 0`, needs CAP_SYS_PTRACE
//!    for faults raised in the kernel, and KVM's are). It asks for
//!    `UFFD_FEATURE_EVENT_REMOVE`, so a balloon's `MADV_DONTNEED` reaches the
//!    handler as a remove event.
//! 3. Each region is registered in `MISSING` mode.
//! 4. ember-vmm connects to the handler's unix socket (`backend_path`) and
//!    sends, in one message, a JSON array with one [`UffdMapping`] per
//!    region (`base_host_virt_addr`, `size`, `offset` in the memory file,
//!    `page_size` in bytes, and the deprecated `page_size_kib`, also in
//!    bytes, as Firecracker sends it), with the userfaultfd attached as
//!    `SCM_RIGHTS`.
//! 5. ember-vmm keeps its end of the socket open for its whole life and never
//!    writes to it again: the handler sees the VMM end when the socket hangs
//!    up.
//!
//! If the handler is gone, a guest page fault waits forever (as in
//! Firecracker): whoever runs the handler watches it.
//!
//! # Handler side ([`Handler`], the `ember-uffd-handler` binary)
//!
//! Receives the message and the descriptor (the mappings are hostile: a
//! bounded message, at most [`MAX_REGIONS`] regions, each inside the
//! memory file and page-aligned), maps the memory file privately and
//! read-only, and answers each page fault with `UFFDIO_COPY` of that page
//! from the file. After a remove event, faults in the removed range get zero
//! pages (`UFFDIO_ZEROPAGE`), as the userfaultfd documentation asks.
//!
//! This file is compiled into the vmm library (VMM side) and into the
//! `ember-uffd-handler` binary (handler side); each uses one half.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// At most this many regions in a handshake.
pub const MAX_REGIONS: usize = 64;
/// At most this many bytes of handshake JSON.
pub const MAX_HANDSHAKE: usize = 64 << 10;
/// The page size of uffd-backed guest memory.
pub const PAGE_SIZE: u64 = 4096;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_BIT: u64 = 1 << 3;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMOVE: u8 = 0x15;

const fn ioc(dir: libc::c_ulong, nr: libc::c_ulong, size: usize) -> libc::c_ulong {
    (dir << 30) | ((size as libc::c_ulong) << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: libc::c_ulong = ioc(3, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(3, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: libc::c_ulong = ioc(2, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(3, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(3, 0x04, size_of::<UffdioZeropage>());
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// `struct uffd_msg`: 32 bytes, event first, then a 24-byte union.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    arg: [u64; 3],
}

/// Errors of the uffd backend and handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the system call gave a userfaultfd.
    #[error("userfaultfd is not available: /dev/userfaultfd: {dev}; userfaultfd(2): {sys} (grant access to /dev/userfaultfd, or set vm.unprivileged_userfaultfd=1, or run with CAP_SYS_PTRACE; else load with the File backend)")]
    Unavailable {
        /// Opening the device.
        dev: std::io::Error,
        /// The system call.
        sys: std::io::Error,
    },
    /// `UFFDIO_API` refused the API or the remove-event feature.
    #[error("UFFDIO_API failed: {0}")]
    Api(std::io::Error),
    /// Guest memory could not be made.
    #[error("cannot allocate the uffd-backed guest memory: {0}")]
    Memory(String),
    /// `UFFDIO_REGISTER` on a region failed, or cannot copy into it.
    #[error("UFFDIO_REGISTER of guest memory at {base:#x} ({len:#x} bytes) failed: {err}")]
    Register {
        /// Guest physical base.
        base: u64,
        /// Length.
        len: u64,
        /// Why.
        err: std::io::Error,
    },
    /// Connecting to the handler's socket failed.
    #[error("cannot connect to the page-fault handler's socket {path}: {err}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// Sending the handshake failed.
    #[error("cannot send the memory mappings and the userfaultfd to the page-fault handler: {0}")]
    Send(std::io::Error),
    /// Receiving the handshake failed (handler side).
    #[error("cannot receive the handshake: {0}")]
    Receive(String),
    /// The handshake is malformed or does not fit the memory file.
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    /// The memory file cannot be used.
    #[error("memory file: {0}")]
    MemoryFile(std::io::Error),
    /// Reading events or resolving a fault failed.
    #[error("{op} failed: {err}")]
    Serve {
        /// The operation.
        op: &'static str,
        /// Why.
        err: std::io::Error,
    },
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn last() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Uffd {
    /// Makes a non-blocking, close-on-exec userfaultfd that also reports
    /// faults raised in the kernel (KVM's), with the remove event on.
    pub fn new() -> Result<Self, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match Self::from_dev(flags) {
            Ok(fd) => fd,
            Err(dev) => {
                // SAFETY: the system call takes flags only and returns a new
                // descriptor or -1.
                let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
                if r < 0 {
                    return Err(UffdError::Unavailable { dev, sys: last() });
                }
                // SAFETY: `r` is a new descriptor owned by nobody else.
                unsafe { OwnedFd::from_raw_fd(r as RawFd) }
            }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_EVENT_REMOVE,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly a `struct uffdio_api`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(UffdError::Api(last()));
        }
        Ok(Uffd(fd))
    }

    fn from_dev(flags: libc::c_int) -> Result<OwnedFd, std::io::Error> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and
        // returns a new descriptor or -1.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if r < 0 {
            return Err(last());
        }
        // SAFETY: `r` is a new descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(r) })
    }

    /// Adopts a received descriptor (handler side).
    pub fn from_file(f: File) -> Self {
        Uffd(f.into())
    }

    /// Registers `[start, start + len)` of this process in MISSING mode.
    pub fn register(&self, start: u64, len: u64) -> Result<(), std::io::Error> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a `struct
        // uffdio_register`; the kernel checks the range.
        if unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(last());
        }
        if reg.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(std::io::Error::other(
                "the range does not support UFFDIO_COPY",
            ));
        }
        Ok(())
    }

    /// `UFFDIO_COPY` of `len` bytes from `src` (this process) to `dst` (the
    /// registered process). `Ok(false)` when the page was already there
    /// (EEXIST: another fault served it).
    pub fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<bool, std::io::Error> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, which the caller
        // guarantees readable, and writes only into the registered process.
        if unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_COPY, &mut c) } < 0 {
            let e = last();
            return match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    Ok(false)
                }
                _ => Err(e),
            };
        }
        Ok(true)
    }

    /// `UFFDIO_ZEROPAGE` of `[dst, dst + len)`; `Ok(false)` on EEXIST.
    pub fn zero(&self, dst: u64, len: u64) -> Result<bool, std::io::Error> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes exactly a `struct
        // uffdio_zeropage`.
        if unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } < 0 {
            let e = last();
            return match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    Ok(false)
                }
                _ => Err(e),
            };
        }
        Ok(true)
    }

    fn wake(&self, start: u64, len: u64) -> Result<(), std::io::Error> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads exactly a `struct uffdio_range`.
        if unsafe { libc::ioctl(self.as_raw_fd(), UFFDIO_WAKE, &mut r) } < 0 {
            return Err(last());
        }
        Ok(())
    }

    /// Reads the pending events (non-blocking: empty when none).
    fn events(&self) -> Result<Vec<UffdMsg>, std::io::Error> {
        let mut msgs = [UffdMsg::default(); 16];
        // SAFETY: reads at most the array's bytes into it; uffd_msg is
        // plain data.
        let n = unsafe {
            libc::read(
                self.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = last();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(msgs[..n as usize / size_of::<UffdMsg>()].to_vec())
    }
}

/// One region of the handshake: Firecracker's `GuestRegionUffdMapping`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UffdMapping {
    /// Where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Region size in bytes.
    pub size: u64,
    /// Where the region's pages are in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Deprecated by Firecracker (in bytes despite its name); sent for
    /// handlers written against older Firecracker releases.
    #[serde(default)]
    pub page_size_kib: u64,
}

/// The VMM's side of a live uffd backend: held for the VM's life.
#[derive(Debug)]
pub struct UffdBackend {
    /// The userfaultfd (the handler holds its own copy).
    pub uffd: Uffd,
    /// The handler's socket; closing it tells the handler the VMM ended.
    pub socket: UnixStream,
    /// What was sent.
    pub mappings: Vec<UffdMapping>,
}

/// Makes guest memory for `regions` (`(guest base, size, offset in the
/// memory file)`) served by the page-fault handler listening at `socket`.
pub fn guest_memory_from_uffd(
    regions: &[(u64, u64, u64)],
    socket: &Path,
) -> Result<(devices::GuestMemoryMmap, UffdBackend), UffdError> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(base, size, _)| (GuestAddress(base), size as usize))
        .collect();
    let mem = devices::GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| UffdError::Memory(e.to_string()))?;
    let uffd = Uffd::new()?;
    let mut mappings = Vec::with_capacity(regions.len());
    for (region, &(_, _, offset)) in mem.iter().zip(regions) {
        let base = region.start_addr().0;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| UffdError::Memory(e.to_string()))? as u64;
        uffd.register(host, region.len())
            .map_err(|err| UffdError::Register {
                base,
                len: region.len(),
                err,
            })?;
        mappings.push(UffdMapping {
            base_host_virt_addr: host,
            size: region.len(),
            offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        });
    }
    let socket = send_handshake(socket, &mappings, &uffd)?;
    Ok((
        mem,
        UffdBackend {
            uffd,
            socket,
            mappings,
        },
    ))
}

fn send_handshake(
    path: &Path,
    mappings: &[UffdMapping],
    uffd: &Uffd,
) -> Result<UnixStream, UffdError> {
    let json = serde_json::to_vec(mappings).map_err(|e| UffdError::Send(e.into()))?;
    let sock = UnixStream::connect(path).map_err(|err| UffdError::Connect {
        path: path.display().to_string(),
        err,
    })?;
    let n = sock
        .send_with_fd(&json[..], uffd.as_raw_fd())
        .map_err(|e| UffdError::Send(std::io::Error::from_raw_os_error(e.errno())))?;
    if n != json.len() {
        return Err(UffdError::Send(std::io::Error::other(format!(
            "short send: {n} of {} bytes",
            json.len()
        ))));
    }
    Ok(sock)
}

/// Receives the handshake on an accepted connection: the mappings and the
/// userfaultfd. Waits at most `timeout` for it.
pub fn recv_handshake(
    sock: &UnixStream,
    timeout: Duration,
) -> Result<(Vec<UffdMapping>, Uffd), UffdError> {
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| UffdError::Receive(e.to_string()))?;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    let (mut len, fd) = sock.recv_with_fd(&mut buf).map_err(|e| {
        UffdError::Receive(std::io::Error::from_raw_os_error(e.errno()).to_string())
    })?;
    if len == 0 {
        return Err(UffdError::BadHandshake(
            "the peer closed the connection before sending its handshake".into(),
        ));
    }
    let fd = fd.ok_or_else(|| {
        UffdError::BadHandshake("no userfaultfd attached to the first message".into())
    })?;
    // The JSON may come in pieces on a stream: read until it parses.
    loop {
        match serde_json::from_slice::<Vec<UffdMapping>>(&buf[..len]) {
            Ok(m) => {
                sock.set_read_timeout(None)
                    .map_err(|e| UffdError::Receive(e.to_string()))?;
                return Ok((m, Uffd::from_file(fd)));
            }
            Err(e) if e.is_eof() && len < buf.len() => {
                let n = (&*sock)
                    .read(&mut buf[len..])
                    .map_err(|e| UffdError::Receive(e.to_string()))?;
                if n == 0 {
                    return Err(UffdError::BadHandshake(
                        "connection closed mid-message".into(),
                    ));
                }
                len += n;
            }
            Err(e) => return Err(UffdError::BadHandshake(format!("mappings: {e}"))),
        }
    }
}

/// Checks hostile mappings against a memory file of `file_len` bytes.
pub fn check_mappings(m: &[UffdMapping], file_len: u64) -> Result<(), UffdError> {
    let bad = |s: String| Err(UffdError::BadHandshake(s));
    if m.is_empty() || m.len() > MAX_REGIONS {
        return bad(format!("{} regions (1 to {MAX_REGIONS})", m.len()));
    }
    for (i, r) in m.iter().enumerate() {
        if r.page_size != PAGE_SIZE && r.page_size != 2 << 20 {
            return bad(format!("region {i}: page size {}", r.page_size));
        }
        let aligned = |v: u64| v % r.page_size == 0;
        if r.size == 0 || !aligned(r.size) || !aligned(r.base_host_virt_addr) || !aligned(r.offset)
        {
            return bad(format!(
                "region {i}: not aligned to its {} byte pages",
                r.page_size
            ));
        }
        match r.offset.checked_add(r.size) {
            Some(end) if end <= file_len => {}
            _ => {
                return bad(format!(
                    "region {i}: {:#x} bytes at offset {:#x} pass the memory file's end ({file_len:#x})",
                    r.size, r.offset
                ))
            }
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return bad(format!("region {i}: address overflows"));
        }
    }
    Ok(())
}

/// Serves page faults from a memory file (handler side).
pub struct Handler {
    uffd: Uffd,
    mappings: Vec<UffdMapping>,
    /// The memory file, mapped private and read-only.
    file: *const u8,
    file_len: usize,
    /// Pages removed (balloon): one bitmap per region.
    removed: Vec<Vec<u64>>,
    zeros: Vec<u8>,
    /// Pages copied from the file.
    pub copied: u64,
    /// Pages zeroed.
    pub zeroed: u64,
}

impl Handler {
    /// Maps `mem_file` and checks `mappings` against it.
    pub fn new(uffd: Uffd, mappings: Vec<UffdMapping>, mem_file: &File) -> Result<Self, UffdError> {
        let len = mem_file.metadata().map_err(UffdError::MemoryFile)?.len();
        check_mappings(&mappings, len)?;
        let file_len =
            usize::try_from(len).map_err(|_| UffdError::BadHandshake("file too large".into()))?;
        // SAFETY: a new private read-only mapping of the whole file; the
        // kernel picks the address. Checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                file_len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                mem_file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UffdError::MemoryFile(last()));
        }
        let removed = mappings
            .iter()
            .map(|r| vec![0u64; (r.size / r.page_size).div_ceil(64) as usize])
            .collect();
        let max_page = mappings
            .iter()
            .map(|r| r.page_size)
            .max()
            .unwrap_or(PAGE_SIZE);
        Ok(Handler {
            uffd,
            mappings,
            file: p as *const u8,
            file_len,
            removed,
            zeros: vec![0; max_page as usize],
            copied: 0,
            zeroed: 0,
        })
    }

    /// Serves faults until the VMM's end of `peer` hangs up (the VMM
    /// exited) or the userfaultfd does.
    pub fn run(&mut self, peer: &UnixStream) -> Result<(), UffdError> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: peer.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: polls two live descriptors in a local array.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = last();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(UffdError::Serve { op: "poll", err: e });
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.serve_pending()?;
            }
            if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
                || fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
            {
                return Ok(());
            }
        }
    }

    /// Handles every event pending now.
    pub fn serve_pending(&mut self) -> Result<(), UffdError> {
        loop {
            let evs = self.uffd.events().map_err(|err| UffdError::Serve {
                op: "reading userfaultfd events",
                err,
            })?;
            if evs.is_empty() {
                return Ok(());
            }
            for ev in evs {
                match ev.event {
                    UFFD_EVENT_PAGEFAULT => self.fault(ev.arg[1])?,
                    UFFD_EVENT_REMOVE => self.remove(ev.arg[0], ev.arg[1]),
                    _ => {}
                }
            }
        }
    }

    fn region_of(&self, addr: u64) -> Option<usize> {
        self.mappings
            .iter()
            .position(|r| addr >= r.base_host_virt_addr && addr - r.base_host_virt_addr < r.size)
    }

    fn remove(&mut self, start: u64, end: u64) {
        for (i, r) in self.mappings.iter().enumerate() {
            let lo = start.max(r.base_host_virt_addr);
            let hi = end.min(r.base_host_virt_addr + r.size);
            let mut a = lo - (lo - r.base_host_virt_addr) % r.page_size;
            while a < hi {
                let p = ((a - r.base_host_virt_addr) / r.page_size) as usize;
                self.removed[i][p / 64] |= 1 << (p % 64);
                a += r.page_size;
            }
        }
    }

    fn fault(&mut self, addr: u64) -> Result<(), UffdError> {
        // A fault outside every region cannot be served; the registered
        // ranges are exactly the regions, so this is a lying VMM: ignore.
        let Some(i) = self.region_of(addr) else {
            return Ok(());
        };
        let r = &self.mappings[i];
        let in_region = (addr - r.base_host_virt_addr) / r.page_size * r.page_size;
        let dst = r.base_host_virt_addr + in_region;
        let p = (in_region / r.page_size) as usize;
        let zero = self.removed[i][p / 64] & (1 << (p % 64)) != 0;
        let res = if zero && r.page_size == PAGE_SIZE {
            self.uffd.zero(dst, r.page_size).map(|_| self.zeroed += 1)
        } else {
            let src = if zero {
                self.zeros.as_ptr()
            } else {
                // In bounds: offset + size <= file_len (check_mappings).
                debug_assert!((r.offset + in_region + r.page_size) as usize <= self.file_len);
                // SAFETY: inside the file mapping, as checked above.
                unsafe { self.file.add((r.offset + in_region) as usize) }
            };
            let n = if zero {
                &mut self.zeroed
            } else {
                &mut self.copied
            };
            self.uffd.copy(dst, src, r.page_size).map(|_| *n += 1)
        };
        match res {
            Ok(()) => Ok(()),
            // The VMM's memory went away under us (it is exiting).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
            // The mapping changed (a remove in flight): the fault comes again.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
            Err(err) => Err(UffdError::Serve {
                op: "UFFDIO_COPY",
                err,
            }),
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.file as *mut libc::c_void, self.file_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixListener;

    fn uffd_or_skip() -> bool {
        match Uffd::new() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipped: {e}");
                false
            }
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020aa04);
        assert_eq!(size_of::<UffdMsg>(), 32);
    }

    /// The handshake is Firecracker's JSON: these field names, page sizes in bytes.
    #[test]
    fn handshake_json_has_firecrackers_fields() {
        let m = UffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 0x10000,
            offset: 0x2000,
            page_size: 4096,
            page_size_kib: 4096,
        };
        let v = serde_json::to_value(vec![m]).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"base_host_virt_addr": 0x7f00_0000_0000u64, "size": 0x10000, "offset": 0x2000, "page_size": 4096, "page_size_kib": 4096}])
        );
    }

    #[test]
    fn hostile_mappings_are_refused() {
        let ok = UffdMapping {
            base_host_virt_addr: 0x10000,
            size: 0x4000,
            offset: 0x1000,
            page_size: 4096,
            page_size_kib: 0,
        };
        assert!(check_mappings(std::slice::from_ref(&ok), 0x5000).is_ok());
        let past = check_mappings(std::slice::from_ref(&ok), 0x4fff).unwrap_err();
        assert!(
            past.to_string().contains("pass the memory file's end"),
            "{past}"
        );
        for bad in [
            UffdMapping {
                offset: u64::MAX - 0xfff,
                ..ok.clone()
            },
            UffdMapping {
                size: 0,
                ..ok.clone()
            },
            UffdMapping {
                size: 0x100,
                ..ok.clone()
            },
            UffdMapping {
                page_size: 12,
                ..ok.clone()
            },
            UffdMapping {
                base_host_virt_addr: u64::MAX - 0xfff,
                ..ok.clone()
            },
        ] {
            assert!(
                check_mappings(std::slice::from_ref(&bad), u64::MAX).is_err(),
                "{bad:?}"
            );
        }
        assert!(check_mappings(&[], 1 << 30).is_err());
        assert!(check_mappings(&vec![ok; MAX_REGIONS + 1], 1 << 30).is_err());
    }

    /// The whole protocol in one process: memory from uffd, handshake over
    /// a socket, a handler thread serving faults from a file; reading the
    /// memory gives the file's bytes, removed pages come back zero.
    #[test]
    fn faults_are_served_from_the_memory_file() {
        if !uffd_or_skip() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ember-uffd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("uffd.sock");
        let memf = dir.join("mem");
        let f = File::create(&memf).unwrap();
        // Two regions: 16 pages at file offset 0, 8 pages at 16 pages.
        for p in 0..24u64 {
            f.write_all_at(&[p as u8 + 1; 4096], p * 4096).unwrap();
        }
        drop(f);
        let listener = UnixListener::bind(&sock).unwrap();
        let memf2 = memf.clone();
        let h = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let (m, u) = recv_handshake(&conn, Duration::from_secs(30)).unwrap();
            let mut h = Handler::new(u, m, &File::open(&memf2).unwrap()).unwrap();
            h.run(&conn).unwrap();
            (h.copied, h.zeroed)
        });
        let (mem, backend) =
            guest_memory_from_uffd(&[(0, 16 * 4096, 0), (1 << 20, 8 * 4096, 16 * 4096)], &sock)
                .unwrap();
        use vm_memory::Bytes;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096 + 5)).unwrap(), 4);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((1 << 20) + 7 * 4096))
                .unwrap(),
            24
        );
        // Balloon: the page is dropped, then reads as zero.
        let host = mem.get_host_address(GuestAddress(3 * 4096)).unwrap();
        // SAFETY: one page of guest memory owned by `mem`.
        assert_eq!(
            unsafe { libc::madvise(host.cast(), 4096, libc::MADV_DONTNEED) },
            0
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096 + 5)).unwrap(), 0);
        assert_eq!(backend.mappings.len(), 2);
        assert_eq!(backend.mappings[1].offset, 16 * 4096);
        drop(backend);
        let (copied, zeroed) = h.join().unwrap();
        assert_eq!((copied, zeroed), (2, 1));
        drop(mem);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_handler_is_a_clear_connect_error() {
        if !uffd_or_skip() {
            return;
        }
        let e = guest_memory_from_uffd(&[(0, 4096, 0)], Path::new("/nonexistent/ember-uffd.sock"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot connect to the page-fault handler's socket"),
            "{e}"
        );
    }
}
