//! File-backed virtio-blk.
//!
//! - One request queue (max 256). Requests: IN, OUT, FLUSH, GET_ID; other
//!   types get VIRTIO_BLK_S_UNSUPP.
//! - Capacity is the file size in 512-byte sectors **rounded up**: the
//!   partial last sector reads as the file's bytes padded with zeros, and
//!   writes touching bytes past the end of the file fail with IOERR (the
//!   file is never grown).
//! - Read-only drives offer VIRTIO_BLK_F_RO and fail OUT with IOERR.
//! - Requests are bounded: VIRTIO_BLK_F_SIZE_MAX and VIRTIO_BLK_F_SEG_MAX
//!   offer `size_max` = [`SIZE_MAX`] and `seg_max` = [`SEG_MAX`], and a
//!   request with more than `seg_max` + 2 descriptors (header and status
//!   included, whatever the framing) or more than [`MAX_REQUEST`] data bytes
//!   (`seg_max` * `size_max`) fails with IOERR before any I/O, negotiated
//!   or not. What is enforced is what bounds the VMM thread's work: the
//!   count and the total, not each segment's length.
//! - One pass over the queue serves at most [`PASS_REQUESTS`] requests and
//!   [`PASS_BUDGET`] bytes (plus the request that crosses it), then yields
//!   to the event loop with its queue eventfd signalled again.
//! - Malformed chains (no writable status byte, bad descriptors) are
//!   returned to the guest with used length 0 and no status.
//! - [`Block::update_path`] swaps the backing file (API PATCH after boot)
//!   and raises a config-change interrupt.
//! - Two VMMs never share a volume for writing: the backing file is locked
//!   with an open file description lock (`fcntl(F_OFD_SETLK)`) on the whole
//!   file, a write lock for a read-write drive and a read lock for a
//!   read-only one, so read-only drives can share a file and nothing else
//!   can. A held lock refuses the drive ([`BlockError::Locked`]). The lock
//!   belongs to the device's open file and goes when the device (or the VMM)
//!   goes; it is on the inode, so hard links into different jails conflict
//!   too. The lock is advisory: it keeps out other ember-vmm processes and
//!   programs that take OFD or POSIX locks, not plain readers and writers.
//! - Two I/O engines, as Firecracker's `io_engine`: `Sync` (the default)
//!   does each request on the VMM thread; `Async` hands reads, writes and
//!   flushes to the kernel through io_uring ([`io_uring`]) and completes
//!   them when the ring says so, possibly out of order, as virtio allows.

pub mod io_uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueOwnedT;

use super::desc::ParsedChain;
use super::metrics::BlockMetrics;
use super::persist::{BlockState, Persist, PersistError};
use super::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use super::{drain_evt, DeviceBase, VirtioDevice, TYPE_BLOCK};

/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;

/// Feature: `size_max` (largest segment) is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature: `seg_max` (most segments per request) is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device takes flush requests.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: get the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error (also for malformed requests).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `size_max`: the largest data segment a driver may use. The unikernel
/// runtime's requests are one 64 KiB segment.
pub const SIZE_MAX: u32 = 64 * 1024;
/// `seg_max`: the most data segments in one request (a chain of at most
/// `SEG_MAX + 2` descriptors fits the 256-entry queue without indirection).
pub const SEG_MAX: u32 = 128;
/// The most data bytes one request may move: `SEG_MAX * SIZE_MAX`, 8 MiB.
pub const MAX_REQUEST: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Copy chunk between file and guest.
const CHUNK: usize = 64 * 1024;
/// Bytes of I/O one pass over the queue may do before it yields to the
/// other devices and the API (the queue's eventfd is signalled again, so
/// the rest follows on the next round of the event loop). I/O is
/// synchronous `pread`/`pwrite` on the VMM thread: a pass stops after the
/// request that crosses this, so one round is bounded by this plus one
/// request, and a request by [`MAX_REQUEST`].
pub const PASS_BUDGET: u64 = 8 << 20;
/// Requests one pass may serve whatever their size (a queue the guest keeps
/// refilling with small requests, or flushes, ends a pass too).
pub const PASS_REQUESTS: u32 = 64;

use crate::virtio::{TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};
const TOKEN_QUEUE: u32 = TOKEN_QUEUE_BASE;
const TOKEN_LIMITER: u32 = 2;
const TOKEN_AIO: u32 = 3;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("opening {path}: {err}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Another process holds a lock on the backing file.
    #[error("{} is in use by another VMM (locked)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Locking the backing file failed.
    #[error("cannot lock {}: {err}", path.display())]
    Lock {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The `Async` engine needs io_uring, which this host does not give.
    #[error(
        "io_engine \"Async\" needs io_uring, which this host's kernel refused ({0}); use \"Sync\""
    )]
    AsyncUnavailable(std::io::Error),
    /// The rate limiter could not be set up.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
    /// A saved state cannot be restored.
    #[error("restoring drive state: {0}")]
    Restore(#[from] PersistError),
}

/// How the VMM describes a drive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Drive id; its first 20 bytes answer GET_ID.
    pub drive_id: String,
    /// Backing file.
    pub path: PathBuf,
    /// Offer the drive read-only (`VIRTIO_BLK_F_RO`); writes fail with IOERR.
    pub read_only: bool,
    /// Limits on bandwidth and operations.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// How requests reach the file.
    pub io_engine: IoEngine,
}

/// Firecracker's `io_engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// Each request on the VMM thread.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// What an `Async` request carries until it completes: its head, its
/// chain, and the data length the guest gets back.
type AioTag = (u16, ParsedChain, u32);

/// A request as the `Async` engine runs it.
enum AioRequest {
    Read { off: u64, len: u64 },
    Write { off: u64, buf: Vec<u8> },
    Flush,
}

#[derive(Debug)]
struct Disk {
    /// Holds the drive's OFD lock for as long as it is open.
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    /// (device, inode) of the file, to recognise it under another path.
    inode: (u64, u64),
}

/// Takes an OFD lock on all of `file`: a read lock if `read_only`, else a
/// write lock. Fails with `EAGAIN` or `EACCES` if a conflicting lock is held
/// by another open file description (another process, or another open of
/// the same file in this one).
fn lock_whole_file(file: &File, read_only: bool) -> std::io::Result<()> {
    let l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // From the start to the end of the file, however it grows.
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: `file` is an open fd; `fl` is a valid flock for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Disk {
    fn open(path: &Path, read_only: bool, id: [u8; ID_LEN]) -> Result<Self, BlockError> {
        let err = |err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        if let Err(e) = lock_whole_file(&file, read_only) {
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EACCES) => BlockError::Locked {
                    path: path.to_path_buf(),
                },
                _ => BlockError::Lock {
                    path: path.to_path_buf(),
                    err: e,
                },
            });
        }
        let meta = file.metadata().map_err(err)?;
        let size = meta.len();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last sector is zero-padded and read-only past EOF",
                path.display()
            );
        }
        Ok(Self {
            file,
            size,
            read_only,
            id,
            inode: (meta.dev(), meta.ino()),
        })
    }

    fn sectors(&self) -> u64 {
        self.size.div_ceil(SECTOR_SIZE)
    }

    /// Executes a request; returns (status, bytes written to the data part).
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        c: &ParsedChain,
        data_out: u64,
        m: &BlockMetrics,
    ) -> (u8, u32) {
        let r = self.execute_inner(mem, c, data_out, m);
        if r.0 == VIRTIO_BLK_S_IOERR {
            m.execute_fails.inc();
        }
        r
    }

    fn execute_inner(
        &mut self,
        mem: &GuestMemoryMmap,
        c: &ParsedChain,
        data_out: u64,
        m: &BlockMetrics,
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        if c.read_at(mem, 0, &mut hdr).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        // writable bytes except the status byte
        let data_in = c.writable_len() - 1;
        match rtype {
            VIRTIO_BLK_T_IN => match self.range(sector, data_in) {
                Some(off) => match self.read_to_guest(mem, c, off, data_in) {
                    Ok(()) => {
                        m.read_count.inc();
                        m.read_bytes.add(data_in);
                        (VIRTIO_BLK_S_OK, data_in as u32)
                    }
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                },
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.range(sector, data_out) {
                    // never write past the end of the file
                    Some(off) if off + data_out <= self.size => {
                        match self.write_from_guest(mem, c, off, data_out) {
                            Ok(()) => {
                                m.write_count.inc();
                                m.write_bytes.add(data_out);
                                (VIRTIO_BLK_S_OK, 0)
                            }
                            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                        }
                    }
                    _ => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                m.flush_count.inc();
                match self.file.sync_all() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (ID_LEN as u64).min(data_in) as usize;
                match c.write_at(mem, 0, &self.id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The `Async` form of a request, or the answer when there is nothing
    /// to hand to the kernel (GET_ID, unsupported types, bad ranges).
    fn plan_async(
        &mut self,
        mem: &GuestMemoryMmap,
        c: &ParsedChain,
        data_out: u64,
        m: &BlockMetrics,
    ) -> Result<AioRequest, (u8, u32)> {
        let mut hdr = [0u8; 16];
        if c.read_at(mem, 0, &mut hdr).is_err() {
            return Err((VIRTIO_BLK_S_IOERR, 0));
        }
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let data_in = c.writable_len() - 1;
        match rtype {
            VIRTIO_BLK_T_IN => match self.range(sector, data_in) {
                Some(off) => Ok(AioRequest::Read { off, len: data_in }),
                None => Err((VIRTIO_BLK_S_IOERR, 0)),
            },
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err((VIRTIO_BLK_S_IOERR, 0));
                }
                match self.range(sector, data_out) {
                    Some(off) if off + data_out <= self.size => {
                        let mut buf = vec![0u8; data_out as usize];
                        match c.read_at(mem, 16, &mut buf) {
                            Ok(()) => Ok(AioRequest::Write { off, buf }),
                            Err(_) => Err((VIRTIO_BLK_S_IOERR, 0)),
                        }
                    }
                    _ => Err((VIRTIO_BLK_S_IOERR, 0)),
                }
            }
            VIRTIO_BLK_T_FLUSH => Ok(AioRequest::Flush),
            // Counted as failures by the caller, like every Err here.
            _ => Err(self.execute_inner(mem, c, data_out, m)),
        }
    }

    /// Byte offset of a `len`-byte transfer at `sector` if it is
    /// sector-sized and within capacity.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end_sector = sector.checked_add(len / SECTOR_SIZE)?;
        (end_sector <= self.sectors()).then_some(sector * SECTOR_SIZE)
    }

    fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        c: &ParsedChain,
        off: u64,
        len: u64,
    ) -> std::io::Result<()> {
        for_each_chunk(len, |done, chunk| {
            chunk.fill(0);
            let pos = off + done;
            if pos < self.size {
                let avail = ((self.size - pos).min(chunk.len() as u64)) as usize;
                self.file.read_exact_at(&mut chunk[..avail], pos)?;
            }
            c.write_at(mem, done, chunk)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    }

    fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        c: &ParsedChain,
        off: u64,
        len: u64,
    ) -> std::io::Result<()> {
        for_each_chunk(len, |done, chunk| {
            c.read_at(mem, 16 + done, chunk)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.file.write_all_at(chunk, off + done)
        })
    }
}

/// Calls `f(done, chunk)` for consecutive pieces of a `len`-byte transfer,
/// each at most `CHUNK` bytes, in one reused buffer; `done` is the number
/// of bytes before `chunk`. Stops at the first error.
fn for_each_chunk(
    len: u64,
    mut f: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        f(done, &mut buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    base: DeviceBase,
    config: BlockConfig,
    disk: Disk,
    limiter: RateLimiter,
    /// The `Async` engine's ring, if that is the engine.
    aio: Option<io_uring::AsyncIo<AioTag>>,
    metrics: Arc<BlockMetrics>,
}

fn id_bytes(drive_id: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let b = drive_id.as_bytes();
    let n = b.len().min(ID_LEN);
    id[..n].copy_from_slice(&b[..n]);
    id
}

impl Block {
    /// Opens the backing file.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let disk = Disk::open(&config.path, config.read_only, id_bytes(&config.drive_id))?;
        let mut features = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        let limiter = RateLimiter::new(&config.rate_limiter.unwrap_or_default())?;
        let aio = match config.io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => {
                Some(io_uring::AsyncIo::new().map_err(BlockError::AsyncUnavailable)?)
            }
        };
        Ok(Self {
            base: DeviceBase::new("virtio-blk", features, &[QUEUE_SIZE])
                .map_err(BlockError::EventFd)?,
            config,
            disk,
            limiter,
            aio,
            metrics: Arc::default(),
        })
    }

    /// The device's counters (shared with the metrics writer).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The drive's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors (file size rounded up).
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// Replaces the backing file (same read-only mode) and notifies the guest
    /// of the new capacity. The new file is locked like the first; the old
    /// one's lock goes with it. The same file again (by inode, e.g. after it
    /// was resized) keeps the open file and its lock and rereads the size:
    /// a second open would conflict with the lock this device holds.
    pub fn update_path(&mut self, path: &Path) -> Result<(), BlockError> {
        let err = |err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        if (meta.dev(), meta.ino()) == self.disk.inode {
            self.disk.size = self.disk.file.metadata().map_err(err)?.len();
        } else {
            self.disk = Disk::open(path, self.config.read_only, self.disk.id)?;
        }
        self.config.path = path.to_path_buf();
        self.base.config_changed();
        Ok(())
    }

    /// Replaces the rate limiter configuration.
    pub fn update_rate_limiter(&mut self, cfg: &RateLimiterConfig) {
        self.limiter.update(cfg);
        self.config.rate_limiter = Some(*cfg);
    }

    /// Processes the request queue. Returns whether the guest was notified.
    pub fn process_queue(&mut self) -> bool {
        let Some(mem) = self.base.mem.clone() else {
            return false;
        };
        let mut used = false;
        let mut done = 0u64;
        let mut served = 0u32;
        while !self.limiter.is_blocked() {
            let Some((head, parsed)) = self.base.pop_parsed(0) else {
                break;
            };
            if done >= PASS_BUDGET || served >= PASS_REQUESTS {
                // Yield with work left; come back on the next round.
                self.base.queues[0].go_to_previous_position();
                let _ = self.base.queue_evts[0].write(1);
                break;
            }
            served += 1;
            let c = match parsed {
                Ok(c) if c.writable_len() > 0 => c,
                Ok(_) | Err(_) => {
                    log::warn!("virtio-blk: dropping malformed request {head}: {parsed:?}");
                    self.metrics.invalid_reqs_count.inc();
                    self.base.add_used(0, head, 0);
                    used = true;
                    continue;
                }
            };
            let data_out = c.readable_len().saturating_sub(16);
            let bytes = data_out.max(c.writable_len() - 1);
            let descriptors = c.readable.len() + c.writable.len();
            let (status, len) = if descriptors > SEG_MAX as usize + 2 || bytes > MAX_REQUEST {
                log::warn!(
                    "virtio-blk: request {head} too large ({descriptors} descriptors, {bytes} bytes; at most {} and {MAX_REQUEST}): IOERR",
                    SEG_MAX + 2
                );
                self.metrics.invalid_reqs_count.inc();
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                if self.aio.as_ref().is_some_and(|a| !a.has_room(bytes)) {
                    // Resumed when completions free room.
                    self.base.queues[0].go_to_previous_position();
                    break;
                }
                if !self.limiter.consume(bytes) {
                    self.metrics.rate_limiter_throttled_events.inc();
                    self.base.queues[0].go_to_previous_position();
                    break;
                }
                done += bytes;
                if self.aio.is_some() {
                    match self.submit_async(&mem, head, &c, data_out) {
                        Ok(()) => continue,
                        Err(answer) => {
                            if answer.0 == VIRTIO_BLK_S_IOERR {
                                self.metrics.execute_fails.inc();
                            }
                            answer
                        }
                    }
                } else {
                    self.disk.execute(&mem, &c, data_out, &self.metrics)
                }
            };
            let status_off = c.writable_len() - 1;
            let len = match c.write_at(&mem, status_off, &[status]) {
                Ok(()) => len + 1,
                Err(_) => 0,
            };
            self.base.add_used(0, head, len);
            used = true;
        }
        used && self.base.notify_used(0)
    }

    /// Hands a request to the `Async` engine; `Err` is an answer to give
    /// at once.
    fn submit_async(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        c: &ParsedChain,
        data_out: u64,
    ) -> Result<(), (u8, u32)> {
        let fd = self.disk.file.as_raw_fd();
        let size = self.disk.size;
        let plan = self.disk.plan_async(mem, c, data_out, &self.metrics)?;
        let Some(aio) = self.aio.as_mut() else {
            return Err((VIRTIO_BLK_S_IOERR, 0));
        };
        let submitted = match plan {
            AioRequest::Read { off, len } => aio.submit(
                fd,
                io_uring::Op::Read { off, len, size },
                vec![0u8; len as usize],
                (head, c.clone(), len as u32),
            ),
            AioRequest::Write { off, buf } => aio.submit_write(fd, off, buf, (head, c.clone(), 0)),
            AioRequest::Flush => {
                aio.submit(fd, io_uring::Op::Flush, Vec::new(), (head, c.clone(), 0))
            }
        };
        submitted.map_err(|e| {
            log::warn!("virtio-blk: io_uring: {e}");
            (VIRTIO_BLK_S_IOERR, 0)
        })
    }

    /// Completes what the `Async` engine finished, then serves the queue
    /// again (completions free room).
    pub fn process_completions(&mut self) {
        self.complete_finished();
        self.process_queue();
    }

    /// Before a snapshot of a paused VM: waits for every `Async` request
    /// in flight and completes it to the guest (status and used ring), so
    /// nothing is in the kernel's hands and the saved queue has no request
    /// the restored device would not know. Nothing new is started. A no-op
    /// for the `Sync` engine, which completes each request at once.
    pub fn quiesce(&mut self) {
        while self.aio.as_ref().is_some_and(|a| a.inflight() > 0) {
            let Some(fd) = self.aio.as_ref().map(|a| a.eventfd().as_raw_fd()) else {
                break;
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the timeout only guards a lost
            // wakeup (the ring is reaped either way).
            unsafe { libc::poll(&mut pfd, 1, 100) };
            self.complete_finished();
        }
    }

    /// Puts every finished `Async` request in the used ring.
    fn complete_finished(&mut self) {
        let (Some(mem), Some(aio)) = (self.base.mem.clone(), self.aio.as_mut()) else {
            return;
        };
        let done = aio.reap();
        let mut used = false;
        for d in done {
            let (head, c, data_len) = d.tag;
            let mut len = 0;
            let m = &self.metrics;
            let status = if d.ok {
                match d.op {
                    io_uring::Op::Read { .. } => match c.write_at(&mem, 0, &d.buf) {
                        Ok(()) => {
                            len = data_len;
                            m.read_count.inc();
                            m.read_bytes.add(u64::from(data_len));
                            VIRTIO_BLK_S_OK
                        }
                        Err(_) => VIRTIO_BLK_S_IOERR,
                    },
                    io_uring::Op::Write => {
                        m.write_count.inc();
                        m.write_bytes.add(d.buf.len() as u64);
                        VIRTIO_BLK_S_OK
                    }
                    io_uring::Op::Flush => {
                        m.flush_count.inc();
                        VIRTIO_BLK_S_OK
                    }
                }
            } else {
                VIRTIO_BLK_S_IOERR
            };
            if status == VIRTIO_BLK_S_IOERR {
                m.execute_fails.inc();
            }
            let status_off = c.writable_len() - 1;
            let used_len = match c.write_at(&mem, status_off, &[status]) {
                Ok(()) => len + 1,
                Err(_) => 0,
            };
            self.base.add_used(0, head, used_len);
            used = true;
        }
        if used {
            self.base.notify_used(0);
        }
    }

    fn register(&mut self, ops: &mut EventOps) {
        if !self.base.register_queue_events(ops) {
            return;
        }
        self.base
            .watch_fd(ops, self.limiter.as_raw_fd(), TOKEN_LIMITER);
        if let Some(aio) = &self.aio {
            self.base
                .watch_fd(ops, aio.eventfd().as_raw_fd(), TOKEN_AIO);
        }
    }
}

impl VirtioDevice for Block {
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn on_reset(&mut self) {
        // No buffer may be freed while the kernel can still write it.
        if let Some(aio) = &mut self.aio {
            aio.drain();
        }
    }
    fn config_bytes(&self) -> Vec<u8> {
        // struct virtio_blk_config { le64 capacity; le32 size_max;
        // le32 seg_max; ... (nothing else offered) }
        let mut c = self.capacity().to_le_bytes().to_vec();
        c.extend_from_slice(&SIZE_MAX.to_le_bytes());
        c.extend_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

impl Persist for Block {
    type Config = BlockConfig;
    type State = BlockState;
    type Error = BlockError;

    /// With the `Async` engine, call [`Block::quiesce`] first: requests in
    /// flight are not part of the state.
    fn save(&self) -> BlockState {
        if self.aio.as_ref().is_some_and(|a| a.inflight() > 0) {
            log::warn!("virtio-blk: saved with requests in flight (not quiesced)");
        }
        BlockState {
            base: self.base.save(),
            capacity: self.capacity(),
        }
    }

    /// Opens `config.path` (which a load may have moved) and locks it like
    /// [`Block::new`]; the capacity is the file's now, and when it differs
    /// from the saved one the guest gets a configuration change.
    fn restore(
        config: BlockConfig,
        state: &BlockState,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, BlockError> {
        let mut blk = Block::new(config)?;
        blk.base.restore(&state.base, mem)?;
        if blk.capacity() != state.capacity {
            // Raised when the event loop handles the activation.
            blk.base.config_generation = blk.base.config_generation.wrapping_add(1);
            if blk.base.is_active() {
                let nr = blk.base.irq.needs_reset();
                blk.base.irq.restore(crate::virtio::INT_CONFIG, nr);
            }
        }
        Ok(blk)
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if self.base.watch_activation(ops) {
            self.register(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if self.base.on_activation() {
                    self.register(ops);
                    self.process_queue();
                }
            }
            TOKEN_QUEUE => {
                drain_evt(&self.base.queue_evts[0]);
                self.metrics.queue_event_count.inc();
                self.process_queue();
            }
            TOKEN_LIMITER => {
                if let Err(e) = self.limiter.event_handler() {
                    log::error!("virtio-blk: rate limiter: {e}");
                }
                self.process_queue();
            }
            TOKEN_AIO => self.process_completions(),
            t => log::warn!("virtio-blk: unexpected event {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{mem, write_desc, TestQueue};
    use crate::virtio::{INT_CONFIG, INT_VRING};
    use event_manager::SubscriberOps;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    struct Env {
        _file: TempFile,
        m: GuestMemoryMmap,
        q: TestQueue,
        blk: Block,
    }

    fn env(content: &[u8], read_only: bool) -> Env {
        env_with(content, read_only, IoEngine::Sync)
    }

    fn env_with(content: &[u8], read_only: bool, io_engine: IoEngine) -> Env {
        let file = TempFile::new().unwrap();
        file.as_file().write_all_at(content, 0).unwrap();
        let m = mem(0x40000);
        let q = TestQueue::new(&m, 0x1000, 16);
        let mut blk = Block::new(BlockConfig {
            drive_id: "rootfs".into(),
            path: file.as_path().to_path_buf(),
            read_only,
            rate_limiter: None,
            io_engine,
        })
        .unwrap();
        blk.activate(m.clone(), vec![q.queue()]).unwrap();
        Env {
            _file: file,
            m,
            q,
            blk,
        }
    }

    /// Serves the queue and, with the `Async` engine, waits for and
    /// completes everything in flight (the wait is only a safety net).
    fn serve(e: &mut Env) -> bool {
        let notified = e.blk.process_queue();
        while e.blk.aio.as_ref().is_some_and(|a| a.inflight() > 0) {
            let mut pfd = libc::pollfd {
                fd: e.blk.aio.as_ref().unwrap().eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
            e.blk.process_completions();
        }
        notified || e.blk.interrupt().status() & INT_VRING != 0
    }

    fn hdr(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
        m.read_obj(GuestAddress(at)).unwrap()
    }

    const H: u64 = 0x10000; // header
    const D: u64 = 0x11000; // data
    const S: u64 = 0x18000; // status

    #[test]
    fn a_queue_of_large_requests_is_served_in_bounded_passes() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4 << 20).unwrap();
        let m = mem(8 << 20);
        let mut q = TestQueue::new(&m, 0x1000, 16);
        let mut blk = Block::new(BlockConfig {
            drive_id: "big".into(),
            path: file.as_path().to_path_buf(),
            read_only: true,
            rate_limiter: None,
            io_engine: IoEngine::Sync,
        })
        .unwrap();
        blk.activate(m.clone(), vec![q.queue()]).unwrap();
        for _ in 0..4 {
            hdr(&m, H, VIRTIO_BLK_T_IN, 0);
            q.add_chain(&[(H, 16, false), (1 << 20, 4 << 20, true), (S, 1, true)]);
        }
        // 16 MiB queued: one pass stops once 8 MiB are done and asks for
        // another round through its own queue eventfd.
        blk.process_queue();
        assert_eq!(q.used_idx(), 2);
        assert!(
            blk.queue_events()[0].read().is_ok(),
            "no new round asked for"
        );
        blk.process_queue();
        assert_eq!(q.used_idx(), 4);
        assert!(blk.queue_events()[0].read().is_err(), "nothing left");
    }

    /// A device on a sparse `file_len`-byte file with `mem_len` bytes of
    /// guest memory and a 256-entry queue.
    fn big_env(file_len: u64, mem_len: usize) -> Env {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(file_len).unwrap();
        let m = mem(mem_len);
        let q = TestQueue::new(&m, 0x1000, QUEUE_SIZE);
        let mut blk = block_on(file.as_path(), false).unwrap();
        blk.activate(m.clone(), vec![q.queue()]).unwrap();
        Env {
            _file: file,
            m,
            q,
            blk,
        }
    }

    #[test]
    fn size_max_and_seg_max_are_offered_and_enforced() {
        let mut e = big_env(MAX_REQUEST * 2, 16 << 20);
        let f = e.blk.avail_features();
        assert_eq!(f & VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SIZE_MAX);
        assert_eq!(f & VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SEG_MAX);
        let mut c = [0u8; 8];
        e.blk.read_config(8, &mut c);
        assert_eq!(u32::from_le_bytes(c[..4].try_into().unwrap()), SIZE_MAX);
        assert_eq!(u32::from_le_bytes(c[4..].try_into().unwrap()), SEG_MAX);
        // The largest request: SEG_MAX segments of SIZE_MAX (all over the
        // same guest buffer), 8 MiB in one go.
        const BIG: u64 = 0x100000;
        let segs = |n: u32, len: u32, w: bool| {
            let mut v = vec![(H, 16, false)];
            v.extend((0..n).map(|_| (BIG, len, w)));
            v.push((S, 1, true));
            v
        };
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 0);
        e.q.add_chain(&segs(SEG_MAX, SIZE_MAX, true));
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
        assert_eq!(e.q.used_elem(0).1 as u64, MAX_REQUEST + 1);
        // One segment more, however small: IOERR, nothing written to guest
        // memory but the status.
        e.m.write_slice(&[0x77; 512], GuestAddress(BIG)).unwrap();
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 0);
        e.q.add_chain(&segs(SEG_MAX + 1, 512, true));
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        assert_eq!(e.q.used_elem(1).1, 1);
        assert_eq!(e.m.read_obj::<u8>(GuestAddress(BIG)).unwrap(), 0x77);
        // More than MAX_REQUEST bytes in few segments, read or write: IOERR
        // and the file is untouched.
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 0);
        e.q.add_chain(&[
            (H, 16, false),
            (BIG, MAX_REQUEST as u32 + 512, true),
            (S, 1, true),
        ]);
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 0);
        e.q.add_chain(&[
            (H, 16, false),
            (BIG, MAX_REQUEST as u32, false),
            (BIG, 512, false),
            (S, 1, true),
        ]);
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 0);
        e.q.add_chain(&segs(SEG_MAX + 1, 512, false));
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        assert_eq!(e.q.used_idx(), 5);
        let mut f = vec![0u8; 4096];
        e._file.as_file().read_exact_at(&mut f, 0).unwrap();
        assert!(
            f.iter().all(|b| *b == 0),
            "an oversize write reached the file"
        );
    }

    #[test]
    fn a_pass_serves_at_most_pass_requests() {
        let mut e = big_env(4096, 1 << 20);
        // Small requests cost almost no bytes; their number ends a pass.
        for _ in 0..100 {
            hdr(&e.m, H, VIRTIO_BLK_T_GET_ID, 0);
            e.q.add_chain(&[(H, 16, false), (D, 20, true), (S, 1, true)]);
        }
        e.blk.process_queue();
        assert_eq!(u32::from(e.q.used_idx()), PASS_REQUESTS);
        assert!(
            e.blk.queue_events()[0].read().is_ok(),
            "no new round asked for"
        );
        e.blk.process_queue();
        assert_eq!(e.q.used_idx(), 100);
        assert!(e.blk.queue_events()[0].read().is_err(), "nothing left");
    }

    #[test]
    fn read_write_flush_getid() {
        read_write_flush_getid_with(IoEngine::Sync);
    }

    #[test]
    fn quiesce_completes_async_requests_before_a_save() {
        if io_uring::AsyncIo::<()>::new().is_err() {
            println!("SKIP: io_uring is not available here");
            return;
        }
        let mut e = env_with(&[7u8; 4096], false, IoEngine::Async);
        for i in 0..3u64 {
            hdr(&e.m, H + i * 16, VIRTIO_BLK_T_IN, i);
            e.q.add_chain(&[
                (H + i * 16, 16, false),
                (D + i * 512, 512, true),
                (S + i, 1, true),
            ]);
        }
        e.blk.process_queue();
        assert_eq!(e.blk.aio.as_ref().unwrap().inflight(), 3);
        e.blk.quiesce();
        assert_eq!(e.blk.aio.as_ref().unwrap().inflight(), 0);
        assert_eq!(e.q.used_idx(), 3);
        for i in 0..3 {
            assert_eq!(status(&e.m, S + i), VIRTIO_BLK_S_OK);
        }
        let st = e.blk.save();
        assert_eq!(st.base.queues[0].next_used, 3);
        assert_eq!(st.base.queues[0].next_avail, 3);
    }

    #[test]
    fn read_write_flush_getid_async() {
        if io_uring::AsyncIo::<()>::new().is_err() {
            println!("SKIP: io_uring is not available here");
            return;
        }
        read_write_flush_getid_with(IoEngine::Async);
    }

    fn read_write_flush_getid_with(engine: IoEngine) {
        let mut content = vec![0u8; 4096];
        content[512..1024].fill(0xab);
        let mut e = env_with(&content, false, engine);
        assert_eq!(e.blk.capacity(), 8);
        let mut cap = [0u8; 8];
        e.blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(e.blk.avail_features() & VIRTIO_BLK_F_RO, 0);

        // IN sector 1
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 1);
        e.q.add_chain(&[(H, 16, false), (D, 512, true), (S, 1, true)]);
        assert!(serve(&mut e));
        assert_eq!(e.q.used_idx(), 1);
        assert_eq!(e.q.used_elem(0), (0, 513));
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
        let mut b = vec![0u8; 512];
        e.m.read_slice(&mut b, GuestAddress(D)).unwrap();
        assert!(b.iter().all(|x| *x == 0xab));
        assert_eq!(e.blk.interrupt().status() & INT_VRING, INT_VRING);

        // OUT sector 7 with data split over two descriptors
        e.m.write_slice(&[0x5a; 512], GuestAddress(D)).unwrap();
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 7);
        e.q.add_chain(&[
            (H, 16, false),
            (D, 256, false),
            (D + 256, 256, false),
            (S, 1, true),
        ]);
        serve(&mut e);
        assert_eq!(e.q.used_elem(1).1, 1);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
        let mut f = vec![0u8; 512];
        e._file.as_file().read_exact_at(&mut f, 7 * 512).unwrap();
        assert!(f.iter().all(|x| *x == 0x5a));

        // FLUSH
        hdr(&e.m, H, VIRTIO_BLK_T_FLUSH, 0);
        e.q.add_chain(&[(H, 16, false), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);

        // GET_ID
        hdr(&e.m, H, VIRTIO_BLK_T_GET_ID, 0);
        e.q.add_chain(&[(H, 16, false), (D, 20, true), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
        let mut id = [0u8; 20];
        e.m.read_slice(&mut id, GuestAddress(D)).unwrap();
        assert_eq!(&id[..7], b"rootfs\0");
        assert_eq!(e.q.used_elem(3).1, 21);

        // unsupported
        hdr(&e.m, H, 11, 0);
        e.q.add_chain(&[(H, 16, false), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_UNSUPP);

        // out of range and unaligned lengths
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 7);
        e.q.add_chain(&[(H, 16, false), (D, 1024, true), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        hdr(&e.m, H, VIRTIO_BLK_T_IN, u64::MAX);
        e.q.add_chain(&[(H, 16, false), (D, 512, true), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 0);
        e.q.add_chain(&[(H, 16, false), (D, 100, true), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        assert_eq!(e.q.used_idx(), 8);

        // What the metrics writer sees.
        let m: std::collections::HashMap<_, _> = e.blk.metrics().take().into_iter().collect();
        assert_eq!((m["read_count"], m["read_bytes"]), (1, 512));
        assert_eq!((m["write_count"], m["write_bytes"]), (1, 512));
        assert_eq!(m["flush_count"], 1);
        assert_eq!(m["execute_fails"], 3);
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut e = env(&[1u8; 1024], true);
        assert_eq!(e.blk.avail_features() & VIRTIO_BLK_F_RO, VIRTIO_BLK_F_RO);
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 0);
        e.q.add_chain(&[(H, 16, false), (D, 512, false), (S, 1, true)]);
        e.blk.process_queue();
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        let mut f = [0u8; 4];
        e._file.as_file().read_exact_at(&mut f, 0).unwrap();
        assert_eq!(f, [1; 4]);
    }

    #[test]
    fn partial_last_sector() {
        partial_last_sector_with(IoEngine::Sync);
    }

    #[test]
    fn partial_last_sector_async() {
        if io_uring::AsyncIo::<()>::new().is_err() {
            println!("SKIP: io_uring is not available here");
            return;
        }
        partial_last_sector_with(IoEngine::Async);
    }

    fn partial_last_sector_with(engine: IoEngine) {
        let mut e = env_with(&[7u8; 1000], false, engine);
        assert_eq!(e.blk.capacity(), 2); // rounded up
        e.m.write_slice(&[0xff; 512], GuestAddress(D)).unwrap();
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 1);
        e.q.add_chain(&[(H, 16, false), (D, 512, true), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
        let mut b = vec![0u8; 512];
        e.m.read_slice(&mut b, GuestAddress(D)).unwrap();
        assert!(b[..488].iter().all(|x| *x == 7));
        assert!(b[488..].iter().all(|x| *x == 0));
        // a write covering bytes past EOF is refused, the file is not grown
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 1);
        e.q.add_chain(&[(H, 16, false), (D, 512, false), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        assert_eq!(e._file.as_file().metadata().unwrap().len(), 1000);
        // sector 0 is writable
        hdr(&e.m, H, VIRTIO_BLK_T_OUT, 0);
        e.q.add_chain(&[(H, 16, false), (D, 512, false), (S, 1, true)]);
        serve(&mut e);
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn evil_requests_are_dropped() {
        let mut e = env(&[0u8; 4096], false);
        // no writable status byte
        hdr(&e.m, H, VIRTIO_BLK_T_IN, 0);
        e.q.add_chain(&[(H, 16, false)]);
        // data outside guest memory
        e.q.add_chain(&[(H, 16, false), (0x3ff00, 0x1000, true), (S, 1, true)]);
        // huge length
        e.q.add_chain(&[(H, 16, false), (D, u32::MAX, true), (S, 1, true)]);
        // short header: status IOERR
        e.q.add_chain(&[(H, 4, false), (S, 1, true)]);
        e.m.write_obj(9u8, GuestAddress(S)).unwrap();
        e.blk.process_queue();
        assert_eq!(e.q.used_idx(), 4);
        for i in 0..3 {
            assert_eq!(e.q.used_elem(i).1, 0);
        }
        assert_eq!(status(&e.m, S), VIRTIO_BLK_S_IOERR);
        // descriptor loop
        let head = 10;
        write_desc(&e.m, e.q.desc, head, H, 16, 1, head + 1);
        write_desc(&e.m, e.q.desc, head + 1, S, 1, 3, head);
        e.q.publish(head);
        // head index beyond the queue
        e.q.publish(200);
        e.blk.process_queue();
        assert_eq!(e.q.used_idx(), 5);
        assert_eq!(e.q.used_elem(4), (u32::from(head), 0));
        // bogus avail idx (far ahead): nothing processed, no panic
        let before = e.q.used_idx();
        e.q.set_avail_idx(e.q.used_idx().wrapping_add(1000));
        e.blk.process_queue();
        assert_eq!(e.q.used_idx(), before);
    }

    #[test]
    fn update_path_changes_capacity() {
        let mut e = env(&[0u8; 1024], false);
        let other = TempFile::new().unwrap();
        other.as_file().set_len(8192).unwrap();
        e.blk.update_path(other.as_path()).unwrap();
        assert_eq!(e.blk.capacity(), 16);
        assert_eq!(e.blk.config_generation(), 1);
        assert_eq!(e.blk.interrupt().status() & INT_CONFIG, INT_CONFIG);
        assert!(e.blk.update_path(Path::new("/nonexistent/disk")).is_err());
        assert_eq!(e.blk.capacity(), 16);
    }

    fn block_on(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        Block::new(BlockConfig {
            drive_id: "rootfs".into(),
            path: path.to_path_buf(),
            read_only,
            rate_limiter: None,
            io_engine: IoEngine::Sync,
        })
    }

    // OFD locks conflict between open file descriptions even within one
    // process, so two devices here behave like two VMMs.
    #[test]
    fn a_volume_is_locked_against_a_second_writer() {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let p = f.as_path();

        let rw = block_on(p, false).unwrap();
        for ro in [false, true] {
            let e = block_on(p, ro).unwrap_err();
            assert!(
                matches!(&e, BlockError::Locked { path } if path == p),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("{} is in use by another VMM (locked)", p.display())
            );
        }
        // The lock lives as long as the device.
        drop(rw);
        let ro1 = block_on(p, true).unwrap();
        let ro2 = block_on(p, true).unwrap();
        assert!(matches!(block_on(p, false), Err(BlockError::Locked { .. })));
        drop((ro1, ro2));
        block_on(p, false).unwrap();
    }

    #[test]
    fn the_lock_is_on_the_inode_not_the_path() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let a = dir.as_path().join("a.img");
        let b = dir.as_path().join("b.img");
        std::fs::write(&a, [0u8; 512]).unwrap();
        std::fs::hard_link(&a, &b).unwrap();
        let _rw = block_on(&a, false).unwrap();
        assert!(matches!(block_on(&b, true), Err(BlockError::Locked { .. })));
    }

    #[test]
    fn update_path_moves_the_lock() {
        let mut e = env(&[0u8; 1024], false);
        let first = e.blk.config().path.clone();
        let other = TempFile::new().unwrap();
        other.as_file().set_len(2048).unwrap();
        // A file another VMM holds is refused and the old one stays.
        let holder = block_on(other.as_path(), true).unwrap();
        assert!(matches!(
            e.blk.update_path(other.as_path()),
            Err(BlockError::Locked { .. })
        ));
        assert_eq!(e.blk.config().path, first);
        assert!(matches!(
            block_on(&first, true),
            Err(BlockError::Locked { .. })
        ));
        drop(holder);
        // Moving on releases the old file and locks the new one.
        e.blk.update_path(other.as_path()).unwrap();
        drop(block_on(&first, false).unwrap());
        assert!(matches!(
            block_on(other.as_path(), true),
            Err(BlockError::Locked { .. })
        ));
        // The same file again (a resize) keeps its lock and rereads the size.
        other.as_file().set_len(8192).unwrap();
        e.blk.update_path(other.as_path()).unwrap();
        assert_eq!(e.blk.capacity(), 16);
        assert!(matches!(
            block_on(other.as_path(), true),
            Err(BlockError::Locked { .. })
        ));
    }

    #[test]
    fn rate_limited_requests_resume() {
        let mut e = env(&[0u8; 4096], false);
        e.blk.update_rate_limiter(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::virtio::rate_limiter::TokenBucketConfig {
                size: 1,
                one_time_burst: 0,
                // long enough that no token refills within one
                // process_queue() call
                refill_time: 500,
            }),
        });
        for _ in 0..3 {
            hdr(&e.m, H, VIRTIO_BLK_T_FLUSH, 0);
            e.q.add_chain(&[(H, 16, false), (S, 1, true)]);
        }
        e.blk.process_queue();
        assert_eq!(e.q.used_idx(), 1);
        // drive the event loop until the limiter lets the rest through
        let mut em = event_manager::EventManager::<
            Arc<std::sync::Mutex<dyn MutEventSubscriber + Send>>,
        >::new()
        .unwrap();
        let blk: Arc<std::sync::Mutex<Block>> = Arc::new(std::sync::Mutex::new(e.blk));
        em.add_subscriber(blk.clone());
        blk.lock().unwrap().base.activate_evt.write(1).unwrap();
        for _ in 0..500 {
            if e.q.used_idx() == 3 {
                break;
            }
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(e.q.used_idx(), 3);
    }

    /// The whole path the VMM uses: transport on a bus, driver programming
    /// the registers, QueueNotify through the bus (no ioeventfd), the device
    /// as an event-manager subscriber, interrupt status + ACK.
    #[test]
    fn end_to_end_through_mmio_bus() {
        use crate::bus::Bus;
        use crate::virtio::mmio::MmioTransport;
        use std::sync::Mutex;
        const BASE: u64 = 0xd000_0000;
        let file = TempFile::new().unwrap();
        file.as_file().write_all_at(&[0x33u8; 1024], 0).unwrap();
        let m = mem(0x40000);
        let blk = Arc::new(Mutex::new(
            Block::new(BlockConfig {
                drive_id: "d".into(),
                path: file.as_path().to_path_buf(),
                ..Default::default()
            })
            .unwrap(),
        ));
        let transport = MmioTransport::new(m.clone(), blk.clone()).unwrap();
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(transport)), BASE, 0x1000)
            .unwrap();
        let mut em = event_manager::EventManager::<
            Arc<std::sync::Mutex<dyn MutEventSubscriber + Send>>,
        >::new()
        .unwrap();
        em.add_subscriber(blk.clone());
        let w = |off: u64, v: u32| assert!(bus.write(BASE + off, &v.to_le_bytes()));
        let r = |off: u64| {
            let mut b = [0u8; 4];
            assert!(bus.read(BASE + off, &mut b));
            u32::from_le_bytes(b)
        };
        assert_eq!(r(0x8), TYPE_BLOCK);
        w(0x70, 1);
        w(0x70, 3);
        w(0x24, 1);
        w(0x20, 1); // VERSION_1
        w(0x70, 0xb);
        assert_eq!(r(0x70), 0xb);
        let mut q = TestQueue::new(&m, 0x1000, 16);
        w(0x30, 0);
        assert_eq!(r(0x34), u32::from(QUEUE_SIZE));
        w(0x38, 16);
        w(0x80, q.desc.0 as u32);
        w(0x90, q.avail.0 as u32);
        w(0xa0, q.used.0 as u32);
        w(0x44, 1);
        w(0x70, 0xf);
        assert_eq!(r(0x70), 0xf);
        // capacity through config space
        let mut cap = [0u8; 8];
        assert!(bus.read(BASE + 0x100, &mut cap));
        assert_eq!(u64::from_le_bytes(cap), 2);
        hdr(&q.mem, H, VIRTIO_BLK_T_IN, 1);
        q.add_chain(&[(H, 16, false), (D, 512, true), (S, 1, true)]);
        w(0x50, 0);
        for _ in 0..100 {
            if q.used_idx() == 1 {
                break;
            }
            em.run_with_timeout(50).unwrap();
        }
        assert_eq!(q.used_idx(), 1);
        assert_eq!(status(&m, S), VIRTIO_BLK_S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(D + 7)).unwrap(), 0x33);
        assert_eq!(r(0x60), INT_VRING);
        assert_eq!(blk.lock().unwrap().interrupt().eventfd().read().unwrap(), 1);
        w(0x64, INT_VRING);
        assert_eq!(r(0x60), 0);
        // reset, then activate again and keep working
        w(0x70, 0);
        assert!(!blk.lock().unwrap().is_activated());
        em.run_with_timeout(10).unwrap();
        let mut q = TestQueue::new(&m, 0x1000, 16);
        q.mem.write_slice(&[0u8; 0x3000], q.desc).unwrap();
        w(0x70, 1);
        w(0x70, 3);
        w(0x24, 1);
        w(0x20, 1);
        w(0x70, 0xb);
        w(0x38, 16);
        w(0x80, q.desc.0 as u32);
        w(0x90, q.avail.0 as u32);
        w(0xa0, q.used.0 as u32);
        w(0x44, 1);
        w(0x70, 0xf);
        hdr(&q.mem, H, VIRTIO_BLK_T_FLUSH, 0);
        q.add_chain(&[(H, 16, false), (S, 1, true)]);
        w(0x50, 0);
        for _ in 0..100 {
            if q.used_idx() == 1 {
                break;
            }
            em.run_with_timeout(50).unwrap();
        }
        assert_eq!(q.used_idx(), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Random descriptor tables and avail rings never panic the device.
        #[test]
        fn random_queues_never_panic(
            descs in proptest::collection::vec((0u64..0x40000, 0u32..0x3000, 0u16..8, 0u16..20), 16),
            heads in proptest::collection::vec(0u16..20, 0..16),
            hdrs in proptest::collection::vec((0u32..10, 0u64..12), 4),
        ) {
            let mut e = env(&[0u8; 4096], false);
            for (i, (t, sec)) in hdrs.iter().enumerate() {
                hdr(&e.m, 0x10000 + i as u64 * 16, *t, *sec);
            }
            for (i, (a, l, f, n)) in descs.iter().enumerate() {
                write_desc(&e.m, e.q.desc, i as u16, *a, *l, *f, *n);
            }
            for h in &heads {
                e.q.publish(*h);
            }
            e.blk.process_queue();
            proptest::prop_assert!(e.q.used_idx() as usize <= heads.len());
        }
    }
}
