//! Where the agent listens: AF_VSOCK in the guest (raw libc socket calls,
//! since std has no vsock), or a unix socket for host tests.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Creating, binding or listening on the vsock socket failed.
    #[error("vsock port {port}: {what}: {source}")]
    Vsock {
        /// The port.
        port: u32,
        /// The failing call.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Binding the unix socket failed.
    #[error("unix socket {path}: {source}")]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// A listening socket.
pub enum Listener {
    /// AF_VSOCK, any CID.
    Vsock {
        /// The socket.
        fd: OwnedFd,
        /// Its port.
        port: u32,
    },
    /// A unix socket (removed on drop).
    Unix {
        /// The listener.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
    },
}

/// One accepted connection.
pub enum Stream {
    /// A vsock connection.
    Vsock(OwnedFd),
    /// A unix socket connection.
    Unix(UnixStream),
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Listener {
    /// Listens on vsock `port` for any CID.
    pub fn vsock(port: u32) -> Result<Listener, TransportError> {
        let err = |what, source| TransportError::Vsock { port, what, source };
        // SAFETY: plain socket(2); the result is checked.
        let fd =
            cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })
                .map_err(|e| err("socket", e))?;
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: addr is a valid sockaddr_vm of the given size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })
        .map_err(|e| err("bind", e))?;
        // SAFETY: listen(2) on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) }).map_err(|e| err("listen", e))?;
        Ok(Listener::Vsock { fd, port })
    }

    /// Listens on the unix socket `path` (a stale socket file is replaced).
    pub fn unix(path: &Path) -> Result<Listener, TransportError> {
        let err = |source| TransportError::Unix {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        Ok(Listener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Vsock { fd, .. } => loop {
                // SAFETY: accept4 with null address pointers is allowed.
                let r = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                match cvt(r) {
                    // SAFETY: a fresh descriptor we own.
                    Ok(c) => return Ok(Stream::Vsock(unsafe { OwnedFd::from_raw_fd(c) })),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Vsock { port, .. } => format!("vsock port {port}"),
            Listener::Unix { path, .. } => format!("unix socket {}", path.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Stream {
    /// A second handle to the same connection (for a writer thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Vsock(fd) => fd.try_clone().map(Stream::Vsock),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Shuts both directions down (wakes a blocked reader).
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; errors are irrelevant.
        unsafe { libc::shutdown(self.raw_fd(), libc::SHUT_RDWR) };
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Vsock(fd) => fd.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Vsock(fd) => {
                // SAFETY: buf is valid for buf.len() bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Vsock(fd) => {
                // SAFETY: buf is valid for buf.len() bytes. MSG_NOSIGNAL: a
                // closed peer is an EPIPE error, not a SIGPIPE.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_listener_accepts_and_removes_its_socket() {
        let dir =
            std::env::temp_dir().join(format!("ember-agent-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        // A stale file is replaced.
        std::fs::write(&path, b"stale").unwrap();
        let l = Listener::unix(&path).unwrap();
        assert!(l.describe().contains("unix socket"));
        let mut c = UnixStream::connect(&path).unwrap();
        let mut s = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        c.write_all(b"pong").unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
        s.shutdown();
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vsock_listener_binds_or_reports_why() {
        // Hosts without the vsock transport modules refuse the socket or the
        // bind; either way the error names the port and the failing call.
        match Listener::vsock(52718) {
            Ok(l) => assert_eq!(l.describe(), "vsock port 52718"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("vsock port 52718: "), "{msg}");
                eprintln!("vsock unavailable here: {msg}");
            }
        }
    }
}
