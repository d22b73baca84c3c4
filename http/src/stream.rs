//! The sockets a server accepts connections from: its unix socket and,
//! optionally, TCP listeners ([`HttpServer::with_tcp_listener`](crate::HttpServer::with_tcp_listener)).
//! A connection reads and writes its [`Stream`] the same way whichever it is;
//! only who the peer is ([`Peer`]) differs.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// A listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    /// The server's unix socket.
    Unix(UnixListener),
    /// A TCP listener, with its per-IP connection limit (None: no limit).
    Tcp(TcpListener, Option<usize>),
}

impl Listener {
    /// Accepts one connection (non-blocking listeners give `WouldBlock`).
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l, _) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l, _) => l.as_raw_fd(),
        }
    }
}

/// One accepted connection's socket.
#[derive(Debug)]
pub(crate) enum Stream {
    /// From the unix socket.
    Unix(UnixStream),
    /// From a TCP listener.
    Tcp(TcpStream),
}

impl Stream {
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => {
                // Responses are written whole; do not hold small ones back.
                let _ = s.set_nodelay(true);
                s.set_nonblocking(on)
            }
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// The TCP peer's address (None for unix sockets or when unknown).
    pub(crate) fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Stream::Unix(_) => None,
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| canonical_ip(a.ip())),
        }
    }

    /// The unix socket peer, if this is one.
    pub(crate) fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }
}

/// An IPv4 peer on a dual-stack listener counts as its IPv4 address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Who holds a connection, for the per-peer connection limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// A unix socket peer, by its [`PeerKey`](crate::PeerKey) (pid or uid).
    Local(u32),
    /// A TCP peer, by its IP address (ports do not count).
    Ip(IpAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Local(k) => write!(f, "{k}"),
            Peer::Ip(ip) => write!(f, "address {ip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
