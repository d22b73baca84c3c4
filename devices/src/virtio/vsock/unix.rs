//! The host side of hybrid vsock: unix-socket calls that never wait, and a
//! rate-limited tally of what the device refused.
//!
//! Every host socket the device holds is non-blocking, connect included:
//! a unix `connect` on a non-blocking socket whose listener's accept queue
//! is full fails at once with `EAGAIN` (a blocking one sleeps in
//! `unix_wait_for_peer` until the listener accepts, which may be never).
//! The device treats that, like every other connect failure, as a refused
//! connection: the guest gets an RST and may try again. It never retries
//! on its own and never waits. Linux does not answer `EINPROGRESS` for unix
//! stream sockets; if it ever did, that too counts as refused.

use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors of the host-socket helpers.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    /// The path does not fit `sockaddr_un`.
    #[error("socket path of {0} bytes is too long")]
    PathTooLong(usize),
    /// socket(2) or connect(2) failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl UnixError {
    /// Whether the process or system is out of file descriptors (or of
    /// the memory behind them).
    pub fn is_fd_exhaustion(&self) -> bool {
        matches!(self, UnixError::Io(e) if is_fd_exhaustion(e))
    }
}

/// Whether `e` says the process or the system ran out of descriptors.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connects a new non-blocking, close-on-exec unix stream socket to
/// `path` without waiting (see the module docs): `EAGAIN` means the
/// listener's accept queue is full, `ECONNREFUSED`/`ENOENT` that nothing
/// listens there.
pub fn connect_nonblocking(path: &Path) -> Result<UnixStream, UnixError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(UnixError::PathTooLong(bytes.len()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes and
        // `fd` is the open socket owned by `stream`.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

/// Counts refusals of one kind and says when to log them: the first at
/// once, then at most one line per interval with the count since.
#[derive(Debug)]
pub struct Refusals {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    /// A tally that logs at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Records one refusal at `now`; returns how many to report (this one
    /// included) if a line may go out now.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn a_full_accept_queue_is_refused_at_once() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("full.sock");
        let l = UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on our own bound socket.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        // Backlog 0 queues one connection; after that, EAGAIN (a blocking
        // connect would sleep here until the test timed out).
        let mut held = Vec::new();
        let mut refused = None;
        for _ in 0..4 {
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let e = refused.expect("a full accept queue must refuse");
        assert!(
            matches!(&e, UnixError::Io(io) if io.kind() == io::ErrorKind::WouldBlock),
            "{e:?}"
        );
        assert!(!e.is_fd_exhaustion());
        assert!(!held.is_empty() && held.len() <= 2, "{}", held.len());
        // Queued connections are non-blocking too.
        let mut b = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            held[0].read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn nobody_listening_and_long_paths() {
        let dir = TempDir::new().unwrap();
        let e = connect_nonblocking(&dir.as_path().join("none")).unwrap_err();
        assert!(matches!(&e, UnixError::Io(io) if io.kind() == io::ErrorKind::NotFound));
        let long = dir.as_path().join("x".repeat(200));
        assert!(matches!(
            connect_nonblocking(&long),
            Err(UnixError::PathTooLong(_))
        ));
        // A listener that accepts: connected.
        let path = dir.as_path().join("ok.sock");
        let l = UnixListener::bind(&path).unwrap();
        let s = connect_nonblocking(&path).unwrap();
        let (_peer, _) = l.accept().unwrap();
        drop(s);
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let mut r = Refusals::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.note(t0), Some(1));
        assert_eq!(r.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.note(t0 + Duration::from_secs(2)), None);
        assert_eq!(r.note(t0 + Duration::from_secs(11)), Some(3));
        assert_eq!(r.note(t0 + Duration::from_secs(12)), None);
    }
}
