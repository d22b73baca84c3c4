//! A network namespace owned by the benchmark (created with `ip netns add`,
//! deleted on drop), a TAP device inside it, TAP fds opened from inside it,
//! and a UDP receiver that stamps datagrams with their kernel arrival time.

use std::fs::File;
use std::io::{self, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors of namespace / TAP / receiver handling.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`ip {0}` could not run: {1}")]
    IpSpawn(String, #[source] io::Error),
    #[error("`ip {0}` failed: {1}")]
    IpFailed(String, String),
    #[error("cannot enter network namespace {0}: {1}")]
    Setns(String, #[source] io::Error),
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
    #[error("the namespace thread panicked")]
    ThreadPanicked,
    #[error("interface name {0:?} is too long")]
    IfName(String),
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::IpSpawn(joined.clone(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::IpFailed(
            joined,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A named network namespace, deleted (with its TAPs) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    taps: Vec<String>,
}

impl NetNs {
    /// Creates namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> Result<Self, NetError> {
        ip(&["netns", "add", name])?;
        let ns = NetNs {
            name: name.into(),
            taps: Vec::new(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a persistent TAP `dev` with MAC `mac` and address `cidr`, up.
    pub fn add_tap(&mut self, dev: &str, mac: &str, cidr: &str) -> Result<(), NetError> {
        let n = self.name.clone();
        ip(&["-n", &n, "tuntap", "add", "dev", dev, "mode", "tap"])?;
        self.taps.push(dev.into());
        ip(&["-n", &n, "link", "set", dev, "address", mac])?;
        ip(&["-n", &n, "addr", "add", cidr, "dev", dev])?;
        ip(&["-n", &n, "link", "set", dev, "up"])?;
        Ok(())
    }

    /// `ip netns exec <ns>` followed by `program args...`.
    pub fn exec_command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a new thread that has joined this namespace (sockets and
    /// TAP fds made there stay in the namespace when used elsewhere).
    pub fn run_in<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, NetError> + Send,
    ) -> Result<T, NetError> {
        let path = format!("/run/netns/{}", self.name);
        let nsfile = File::open(&path).map_err(|e| NetError::Setns(self.name.clone(), e))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd; it changes only this
                // thread's network namespace.
                if unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetError::Setns(
                        self.name.clone(),
                        io::Error::last_os_error(),
                    ));
                }
                f()
            })
            .join()
            .map_err(|_| NetError::ThreadPanicked)?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for t in &self.taps {
            let _ = ip(&["-n", &self.name, "link", "del", t]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` attached to TAP `dev` (IFF_TAP | IFF_NO_PI, no vnet
/// header) in the calling thread's namespace; frames written to it are
/// received by that namespace's stack.
pub fn open_tap(dev: &str) -> Result<File, NetError> {
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    if dev.len() >= libc::IFNAMSIZ {
        return Err(NetError::IfName(dev.into()));
    }
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetError::Io("open /dev/net/tun", e))?;
    // SAFETY: TUNSETIFF reads an ifreq; `req` is one (40 bytes) and lives
    // across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
        return Err(NetError::Io("TUNSETIFF", io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Writes each frame to the TAP fd with one write(2).
pub fn write_frames(tap: &mut File, frames: &[Vec<u8>]) -> Result<(), NetError> {
    for f in frames {
        let n = tap.write(f).map_err(|e| NetError::Io("write to tap", e))?;
        if n != f.len() {
            return Err(NetError::Io(
                "write to tap",
                io::Error::new(io::ErrorKind::WriteZero, "short write"),
            ));
        }
    }
    Ok(())
}

/// Binds a UDP socket at `addr` (in the calling thread's namespace) with
/// kernel receive timestamps (SO_TIMESTAMPNS) and a large receive buffer.
pub fn bind_receiver(addr: &str) -> Result<UdpSocket, NetError> {
    let sock = UdpSocket::bind(addr).map_err(|e| NetError::Io("bind the UDP receiver", e))?;
    let fd = sock.as_raw_fd();
    let set = |opt: libc::c_int, val: libc::c_int, what: &'static str| {
        // SAFETY: setsockopt with a c_int value of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            Err(NetError::Io(what, io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    set(libc::SO_TIMESTAMPNS, 1, "SO_TIMESTAMPNS")?;
    // Root may exceed rmem_max; fall back to SO_RCVBUF otherwise.
    if set(libc::SO_RCVBUFFORCE, 8 << 20, "SO_RCVBUFFORCE").is_err() {
        set(libc::SO_RCVBUF, 8 << 20, "SO_RCVBUF")?;
    }
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| NetError::Io("SO_RCVTIMEO", e))?;
    Ok(sock)
}

/// What a receiver saw during one measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvStats {
    pub datagrams: u64,
    pub bytes: u64,
    /// Kernel arrival time (CLOCK_REALTIME ns) of the first and last datagram.
    pub first_ns: Option<i128>,
    pub last_ns: Option<i128>,
}

impl RecvStats {
    /// Time between the first and the last arrival.
    pub fn span(&self) -> Option<Duration> {
        match (self.first_ns, self.last_ns) {
            (Some(a), Some(b)) if b >= a => u64::try_from(b - a).ok().map(Duration::from_nanos),
            _ => None,
        }
    }

    fn record(&mut self, len: usize, ts_ns: i128) {
        self.datagrams += 1;
        self.bytes += len as u64;
        self.first_ns.get_or_insert(ts_ns);
        self.last_ns = Some(ts_ns);
    }
}

/// One datagram: payload length and kernel arrival time (ns), or `None` on
/// timeout.
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<Option<(usize, i128)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: msg points at iov/cbuf, both live and correctly sized.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    let mut ts = None;
    // SAFETY: walking the control messages the kernel just wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                ts = Some(i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let ts = match ts {
        Some(t) => t,
        None => {
            // No kernel stamp (should not happen): fall back to now.
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            d.as_nanos() as i128
        }
    };
    Ok(Some((n as usize, ts)))
}

/// Discards whatever is queued on `sock`.
pub fn drain(sock: &UdpSocket) -> Result<(), NetError> {
    let mut buf = [0u8; 2048];
    for _ in 0..100_000 {
        match recv_stamped(sock, &mut buf).map_err(|e| NetError::Io("recvmsg", e))? {
            Some(_) => continue,
            None => return Ok(()),
        }
    }
    Ok(())
}

/// A thread counting datagrams on a socket until told to stop.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<RecvStats, NetError>>>,
}

/// After [`Receiver::finish`], the receiver keeps reading for this long
/// (frames still in flight) unless `expect` datagrams arrived.
pub const IDLE_AFTER_STOP: Duration = Duration::from_millis(200);
/// Hard limit on one receiver's life.
pub const RECEIVER_LIMIT: Duration = Duration::from_secs(120);

impl Receiver {
    /// Starts counting on a clone of `sock`; stops early once `expect`
    /// datagrams arrived.
    pub fn start(sock: &UdpSocket, expect: u64) -> Result<Self, NetError> {
        let sock = sock
            .try_clone()
            .map_err(|e| NetError::Io("dup the UDP socket", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut stats = RecvStats::default();
            let mut buf = vec![0u8; 65536];
            let mut stop_seen: Option<Instant> = None;
            while stats.datagrams < expect && started.elapsed() < RECEIVER_LIMIT {
                match recv_stamped(&sock, &mut buf).map_err(|e| NetError::Io("recvmsg", e))? {
                    Some((n, ts)) => stats.record(n, ts),
                    // Idle (20 ms read timeout) after the stop request:
                    // give in-flight frames IDLE_AFTER_STOP, then end.
                    None if flag.load(Ordering::SeqCst)
                        && stop_seen.get_or_insert_with(Instant::now).elapsed()
                            >= IDLE_AFTER_STOP =>
                    {
                        break;
                    }
                    None => {}
                }
            }
            Ok(stats)
        });
        Ok(Receiver {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops once the socket goes idle and returns what arrived.
    pub fn finish(mut self) -> Result<RecvStats, NetError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| NetError::ThreadPanicked)?,
            None => Ok(RecvStats::default()),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_span_and_record() {
        let mut s = RecvStats::default();
        assert_eq!(s.span(), None);
        s.record(1024, 1_000);
        assert_eq!(s.span(), Some(Duration::ZERO));
        s.record(1024, 3_500);
        assert_eq!(s.datagrams, 2);
        assert_eq!(s.bytes, 2048);
        assert_eq!(s.span(), Some(Duration::from_nanos(2_500)));
    }

    #[test]
    fn receiver_on_loopback_counts_and_stamps() {
        let rx = bind_receiver("127.0.0.1:0").unwrap();
        let addr = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"stale", addr).unwrap();
        drain(&rx).unwrap();
        let r = Receiver::start(&rx, 5).unwrap();
        for _ in 0..5 {
            tx.send_to(&[7u8; 100], addr).unwrap();
        }
        let st = r.finish().unwrap();
        assert_eq!(st.datagrams, 5);
        assert_eq!(st.bytes, 500);
        assert!(st.span().is_some());
    }

    #[test]
    fn receiver_stops_when_idle() {
        let rx = bind_receiver("127.0.0.1:0").unwrap();
        let r = Receiver::start(&rx, 10).unwrap();
        let st = r.finish().unwrap();
        assert_eq!(st, RecvStats::default());
    }

    #[test]
    fn open_tap_rejects_long_names() {
        assert!(matches!(
            open_tap("a-very-long-interface-name"),
            Err(NetError::IfName(_))
        ));
    }
}
