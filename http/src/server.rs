//! The epoll-driven server: listener, connections, handler dispatch and the
//! thread-safe [`Responder`].

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::body::SpoolConfig;
use crate::connection::{Connection, ConnectionId, Deadlines, READ_CHUNK};
use crate::request::{Limits, Request, Version, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES};
use crate::response::{self, Framing, Response, WriteOpts};
use crate::stream::{Listener, Peer, Stream};

/// Default maximum number of simultaneous connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default bound on unsent output of a streamed response.
pub const DEFAULT_MAX_STREAM_BUFFER: usize = 16 * 1024 * 1024;
/// Connections accepted per listener readiness event.
const ACCEPT_BATCH: usize = 64;

/// Default [`ServerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Default [`ServerConfig::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default [`ServerConfig::min_body_rate`], bytes per second.
pub const DEFAULT_MIN_BODY_RATE: u64 = 64 * 1024;
/// Default [`ServerConfig::body_rate_grace`].
pub const DEFAULT_BODY_RATE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Default [`ServerConfig::spool_threshold`].
pub const DEFAULT_SPOOL_THRESHOLD: usize = 1024 * 1024;
/// At most one log line per this interval about refused over-limit peers.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// The sweep tick when no timeout needs one: it also resumes a listener
/// paused because accept ran out of descriptors.
const LISTENER_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The per-peer connection limit [`ServerConfig::default`] uses for
/// `max_connections`: a quarter of it, at least 8.
pub fn default_max_connections_per_peer(max_connections: usize) -> usize {
    (max_connections / 4).max(8)
}

/// What identifies a peer for [`ServerConfig::max_connections_per_peer`],
/// from the `SO_PEERCRED` credentials of the unix socket peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerKey {
    /// The connecting process (its pid as seen in the server's pid
    /// namespace; peers whose pid is not visible there share pid 0).
    #[default]
    Pid,
    /// The connecting user.
    Uid,
}

/// Errors from creating a server or from a [`Responder`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path exists and is not a unix socket; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Removing a stale socket file failed.
    #[error("cannot remove stale socket {0}: {1}")]
    RemoveStale(PathBuf, io::Error),
    /// Binding the listening socket failed.
    #[error("cannot bind {0}: {1}")]
    Bind(PathBuf, io::Error),
    /// Configuring the listening socket failed.
    #[error("cannot configure listener: {0}")]
    Listener(io::Error),
    /// Creating or signalling the wake-up eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    /// The spool directory cannot be used.
    #[error("spool directory {0}: {1}")]
    SpoolDir(PathBuf, io::Error),
    /// Creating or arming the idle-sweep timer failed.
    #[error("cannot set up the idle timer: {0}")]
    Timer(io::Error),
    /// The server this responder belongs to has been dropped.
    #[error("the HTTP server is gone")]
    ServerGone,
}

/// What a [`Handler`] returns for a request.
#[derive(Debug)]
pub enum Reply {
    /// Answer now.
    Now(Response),
    /// Answer later through [`Responder::respond`] (or
    /// [`HttpServer::respond`]). Until then the connection keeps buffering
    /// pipelined requests (bounded) but does not dispatch them.
    Later,
    /// Take the connection over (connection hijacking, as Docker's and
    /// hyperd's `attach` and `exec` do): see [`Upgrade`].
    Upgrade(Upgrade),
}

/// A [`Reply::Upgrade`]: `head` is sent verbatim as the answer (e.g.
/// `HTTP/1.1 101 UPGRADED\r\n...\r\n\r\n`), then the connection leaves the
/// server: it is removed from the event loop (and from the connection and
/// per-peer counts; [`Handler::closed`] is not called for it) and
/// `take_over` is called, on the loop thread, with an [`Upgraded`]. The
/// callback must not block: it hands the socket to a thread of its own
/// (whose blocking reads and writes then give backpressure in both
/// directions and bound its buffers) and returns. If the client is gone
/// before the hand-over, `take_over` is dropped uncalled.
pub struct Upgrade {
    /// The raw response head.
    pub head: Vec<u8>,
    /// Receives the connection.
    pub take_over: Box<dyn FnOnce(Upgraded) + Send>,
}

impl Upgrade {
    /// An upgrade answering with `head`.
    pub fn new(
        head: impl Into<Vec<u8>>,
        take_over: impl FnOnce(Upgraded) + Send + 'static,
    ) -> Self {
        Upgrade {
            head: head.into(),
            take_over: Box::new(take_over),
        }
    }
}

impl fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upgrade")
            .field("head", &String::from_utf8_lossy(&self.head))
            .finish_non_exhaustive()
    }
}

/// A connection handed over by [`Reply::Upgrade`].
#[derive(Debug)]
pub struct Upgraded {
    /// The socket, in blocking mode.
    pub stream: UnixStream,
    /// Output the server had not sent yet (answers to earlier pipelined
    /// requests, then the upgrade head): write it first.
    pub unsent: Vec<u8>,
    /// Bytes the client sent after the upgraded request (already read from
    /// the socket): they come before anything read from `stream`.
    pub early_input: Vec<u8>,
}

impl Upgraded {
    /// Writes [`Upgraded::unsent`] (blocking) and returns the socket and
    /// the early input.
    pub fn start(mut self) -> io::Result<(UnixStream, Vec<u8>)> {
        use std::io::Write;
        let unsent = std::mem::take(&mut self.unsent);
        self.stream.write_all(&unsent)?;
        Ok((self.stream, self.early_input))
    }
}

impl From<Response> for Reply {
    fn from(r: Response) -> Self {
        Reply::Now(r)
    }
}

/// Application logic plugged into an [`HttpServer`]. Called on the event
/// loop thread; must not block.
pub trait Handler {
    /// Handles one complete request.
    fn handle(&mut self, conn: ConnectionId, req: Request) -> Reply;

    /// Called once when a connection that has had at least one request
    /// dispatched is closed, for whatever reason (client disconnect, end of
    /// keep-alive, error, slow stream consumer). Outstanding `Later` answers
    /// and streams for `conn` are dropped from then on.
    fn closed(&mut self, _conn: ConnectionId) {}
}

impl<F: FnMut(ConnectionId, Request) -> Reply> Handler for F {
    fn handle(&mut self, conn: ConnectionId, req: Request) -> Reply {
        self(conn, req)
    }
}

/// Builds the error responses the layer generates itself (400, 413, 431,
/// 501, 503) from a status and a message.
pub type ErrorResponseFn = Arc<dyn Fn(u16, &str) -> Response + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// Maximum request line + header block (431 beyond). Default 16 KiB.
    pub max_header_bytes: usize,
    /// Maximum request body (413 beyond). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Maximum simultaneous connections; more are answered 503 and closed.
    /// Default 256.
    pub max_connections: usize,
    /// A streaming connection whose unsent output exceeds this is closed
    /// (slow consumer). Default 16 MiB.
    pub max_stream_buffer: usize,
    /// Error-body builder; default [`Response::fault`] (`{"fault_message": ...}`).
    pub error_response: ErrorResponseFn,
    /// A connection that makes no progress for this long while it is the
    /// client's turn (sending a request, or reading a response) is closed, so
    /// stalled clients cannot hold every connection slot. Connections
    /// waiting for a deferred reply or reading a stream are exempt. None:
    /// never. Default 60 s.
    pub idle_timeout: Option<std::time::Duration>,
    /// A request head (request line and headers) must be complete this long
    /// after its first byte arrived, however steadily it trickles in; else
    /// the client gets 408 and the connection is closed. None: no limit.
    /// Default 10 s.
    pub header_timeout: Option<std::time::Duration>,
    /// Once a request's head is in, its body must arrive at this many bytes
    /// per second on average, not counting the first
    /// [`body_rate_grace`](Self::body_rate_grace) (i.e. after `t` seconds at
    /// least `rate × (t − grace)` bytes); else 408 and close. None: no
    /// limit. Default 64 KiB/s.
    pub min_body_rate: Option<u64>,
    /// See [`min_body_rate`](Self::min_body_rate). Default 10 s.
    pub body_rate_grace: std::time::Duration,
    /// Most simultaneous connections one peer (see
    /// [`peer_key`](Self::peer_key)) may hold; further ones from that peer
    /// get 503 and are closed (logged at most every 10 s), so one slow or
    /// greedy client cannot take every slot. None: no per-peer limit (and no
    /// `SO_PEERCRED` lookup). Applies to the unix socket only; TCP
    /// listeners have their own per-IP cap
    /// ([`HttpServer::with_tcp_listener`]). Default
    /// [`default_max_connections_per_peer`]`(max_connections)` for the
    /// default `max_connections`, i.e. 64.
    pub max_connections_per_peer: Option<usize>,
    /// How peers are told apart. Default [`PeerKey::Pid`].
    pub peer_key: PeerKey,
    /// Request bodies larger than this are written to an unlinked temporary
    /// file in [`spool_dir`](Self::spool_dir) as they arrive instead of
    /// memory, and handed over memory-mapped (see
    /// [`RequestBody`](crate::RequestBody)). None: always in memory.
    /// Default 1 MiB.
    pub spool_threshold: Option<usize>,
    /// Directory for spooled bodies. Default [`std::env::temp_dir`].
    pub spool_dir: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_stream_buffer: DEFAULT_MAX_STREAM_BUFFER,
            error_response: Arc::new(Response::fault),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            header_timeout: Some(DEFAULT_HEADER_TIMEOUT),
            min_body_rate: Some(DEFAULT_MIN_BODY_RATE),
            body_rate_grace: DEFAULT_BODY_RATE_GRACE,
            max_connections_per_peer: Some(default_max_connections_per_peer(
                DEFAULT_MAX_CONNECTIONS,
            )),
            peer_key: PeerKey::Pid,
            spool_threshold: Some(DEFAULT_SPOOL_THRESHOLD),
            spool_dir: std::env::temp_dir(),
        }
    }
}

impl ServerConfig {
    fn deadlines(&self) -> Deadlines {
        Deadlines {
            header_timeout: self.header_timeout,
            min_body_rate: self.min_body_rate,
            body_rate_grace: self.body_rate_grace,
        }
    }

    /// How often the sweep for idle and late connections runs, if at all.
    fn sweep_tick(&self) -> Option<std::time::Duration> {
        let rate_check = self
            .min_body_rate
            .map(|_| self.body_rate_grace.max(std::time::Duration::from_secs(1)));
        [self.idle_timeout, self.header_timeout, rate_check]
            .into_iter()
            .flatten()
            .min()
            .map(|t| {
                (t / 4).clamp(
                    std::time::Duration::from_millis(50),
                    std::time::Duration::from_secs(5),
                )
            })
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_stream_buffer", &self.max_stream_buffer)
            .field("idle_timeout", &self.idle_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("min_body_rate", &self.min_body_rate)
            .field("body_rate_grace", &self.body_rate_grace)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field("peer_key", &self.peer_key)
            .field("spool_threshold", &self.spool_threshold)
            .field("spool_dir", &self.spool_dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Msg {
    Respond(ConnectionId, Response),
    Chunk(ConnectionId, Vec<u8>),
    Finish(ConnectionId),
    Close(ConnectionId),
}

/// Thread-safe handle for answering `Reply::Later` requests and feeding
/// streamed responses from any thread. Cheap to clone. Messages for
/// connections that are already closed are silently dropped.
#[derive(Clone, Debug)]
pub struct Responder {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
}

impl Responder {
    fn send(&self, msg: Msg) -> Result<(), ServerError> {
        self.tx.send(msg).map_err(|_| ServerError::ServerGone)?;
        self.wake.write(1).map_err(ServerError::EventFd)
    }

    /// Delivers the answer to a request that got `Reply::Later`. The
    /// response may itself be a [`Body::Stream`](crate::Body::Stream).
    pub fn respond(&self, conn: ConnectionId, resp: Response) -> Result<(), ServerError> {
        self.send(Msg::Respond(conn, resp))
    }

    /// Pushes one chunk of a streamed response (empty chunks are skipped).
    pub fn send_chunk(
        &self,
        conn: ConnectionId,
        data: impl Into<Vec<u8>>,
    ) -> Result<(), ServerError> {
        self.send(Msg::Chunk(conn, data.into()))
    }

    /// Ends a streamed response; the connection then serves its next
    /// pipelined request (or closes if not keep-alive).
    pub fn finish(&self, conn: ConnectionId) -> Result<(), ServerError> {
        self.send(Msg::Finish(conn))
    }

    /// Closes a connection right away (unsent output is dropped).
    pub fn close(&self, conn: ConnectionId) -> Result<(), ServerError> {
        self.send(Msg::Close(conn))
    }
}

/// A single-threaded HTTP/1.1 server on a unix socket (and optionally TCP
/// listeners, see [`HttpServer::with_tcp_listener`]), driven by an
/// `event_manager::EventManager` (it is a [`MutEventSubscriber`]).
pub struct HttpServer<H: Handler> {
    /// The unix socket first, then any TCP listeners.
    listeners: Vec<Listener>,
    socket_path: Option<PathBuf>,
    wake: Arc<EventFd>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    conns: HashMap<ConnectionId, Connection>,
    by_fd: HashMap<RawFd, ConnectionId>,
    next_id: u64,
    handler: H,
    config: ServerConfig,
    /// Ticks the idle sweep.
    sweep: vmm_sys_util::timerfd::TimerFd,
    /// Connections whose handler answered [`Reply::Upgrade`], with the
    /// callback that takes them over, until [`HttpServer::hand_over`].
    upgrades: HashMap<ConnectionId, Box<dyn FnOnce(Upgraded) + Send>>,
    /// Shared by all connections' reads.
    scratch: Box<[u8]>,
    spool: Option<Arc<SpoolConfig>>,
    /// Open connections per peer (only for peers under a limit).
    per_peer: HashMap<Peer, usize>,
    /// Refusals of over-limit peers: when last logged, how many since.
    refusals_logged: Option<std::time::Instant>,
    refusals_unlogged: u64,
    /// accept failed (out of descriptors): the level-triggered listener is
    /// not polled until the next sweep tick or closed connection, so the
    /// loop does not spin on it. Failures: when last logged, how many since.
    listener_paused: bool,
    accept_failures_logged: Option<std::time::Instant>,
    accept_failures_unlogged: u64,
}

impl<H: Handler> fmt::Debug for HttpServer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpServer")
            .field("listeners", &self.listeners)
            .field("socket_path", &self.socket_path)
            .field("connections", &self.conns.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H: Handler> HttpServer<H> {
    /// Binds `path` (removing a stale socket file there first; any other
    /// kind of file is an error) and creates the server. The socket file is
    /// removed again when the server is dropped.
    pub fn new(
        path: impl AsRef<Path>,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        let path = path.as_ref();
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
                .map_err(|e| ServerError::RemoveStale(path.to_path_buf(), e))?,
            Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_path_buf(), e))?;
        let mut server = Self::from_listener(listener, handler, config)?;
        server.socket_path = Some(path.to_path_buf());
        Ok(server)
    }

    /// Creates the server on an already bound and listening socket (e.g.
    /// inherited from a jailer). The socket file is not removed on drop.
    pub fn from_listener(
        listener: UnixListener,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?);
        let mut sweep = vmm_sys_util::timerfd::TimerFd::new()
            .map_err(|e| ServerError::Timer(io::Error::from_raw_os_error(e.errno())))?;
        let tick = config.sweep_tick().unwrap_or(LISTENER_RETRY);
        sweep
            .reset(tick, Some(tick))
            .map_err(|e| ServerError::Timer(io::Error::from_raw_os_error(e.errno())))?;
        let spool = config.spool_threshold.map(|threshold| {
            Arc::new(SpoolConfig {
                dir: config.spool_dir.clone(),
                threshold,
            })
        });
        if let Some(sp) = &spool {
            // Fail early on an unusable directory rather than on the first
            // large upload.
            crate::body::create_spool_file(&sp.dir).map_err(|e| {
                let io = match e {
                    crate::body::SpoolError::Create(_, io)
                    | crate::body::SpoolError::Write(io)
                    | crate::body::SpoolError::Map(io) => io,
                };
                ServerError::SpoolDir(sp.dir.clone(), io)
            })?;
        }
        let (tx, rx) = channel();
        Ok(HttpServer {
            listeners: vec![Listener::Unix(listener)],
            socket_path: None,
            wake,
            rx,
            tx,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            next_id: 1,
            handler,
            config,
            sweep,
            upgrades: HashMap::new(),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            spool,
            per_peer: HashMap::new(),
            refusals_logged: None,
            refusals_unlogged: 0,
            listener_paused: false,
            accept_failures_logged: None,
            accept_failures_unlogged: 0,
        })
    }

    /// Like [`HttpServer::from_listener`] for an owned listening fd.
    pub fn from_owned_fd(
        fd: OwnedFd,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        Self::from_listener(UnixListener::from(fd), handler, config)
    }

    /// Also serves connections from `listener` (bound by the caller, e.g. to
    /// a loopback address): same handler, same limits and the same loop as
    /// the unix socket. `SO_PEERCRED` does not exist for TCP, so
    /// [`ServerConfig::max_connections_per_peer`] does not apply to these
    /// connections; instead one IP address (ports do not count; an
    /// IPv4-mapped IPv6 peer counts as its IPv4 address) may hold at most
    /// `max_per_ip` of them (None: no per-address limit), and further ones
    /// get 503. [`ServerConfig::max_connections`] counts every connection.
    /// Consumes the server, so it can only be called before the server is
    /// added to an event manager.
    pub fn with_tcp_listener(
        mut self,
        listener: TcpListener,
        max_per_ip: Option<usize>,
    ) -> Result<Self, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        self.listeners.push(Listener::Tcp(listener, max_per_ip));
        Ok(self)
    }

    /// The local addresses of the TCP listeners, in the order they were
    /// added.
    pub fn tcp_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(t, _) => t.local_addr().ok(),
                Listener::Unix(_) => None,
            })
            .collect()
    }

    /// A thread-safe handle for `Later` answers and streams.
    pub fn responder(&self) -> Responder {
        Responder {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Delivers the answer to a `Reply::Later` request (queued; written on
    /// the next event loop iteration).
    pub fn respond(&self, conn: ConnectionId, resp: Response) -> Result<(), ServerError> {
        self.responder().respond(conn, resp)
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Number of open client connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    fn limits(&self) -> Limits {
        Limits {
            max_header_bytes: self.config.max_header_bytes,
            max_body_bytes: self.config.max_body_bytes,
        }
    }

    fn accept(&mut self, index: usize, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listeners[index].accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE/ENFILE and the like: the client stays queued
                    // and the listener readable; pause it, don't spin.
                    self.pause_listener(&e, ops);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let limited = match (&self.listeners[index], stream.as_unix()) {
                (Listener::Unix(_), Some(unix)) => self
                    .config
                    .max_connections_per_peer
                    .map(|limit| (Peer::Local(peer_key(unix, self.config.peer_key)), limit)),
                (Listener::Tcp(_, Some(limit)), _) => {
                    let ip = stream
                        .peer_ip()
                        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                    Some((Peer::Ip(ip), *limit))
                }
                _ => None,
            };
            let peer = match limited {
                Some((key, limit)) => {
                    if self.per_peer.get(&key).copied().unwrap_or(0) >= limit {
                        self.refuse(stream, "too many connections from this client");
                        self.log_refusal(key, limit);
                        continue;
                    }
                    Some(key)
                }
                None => None,
            };
            if self.conns.len() >= self.config.max_connections {
                self.refuse(stream, "too many connections");
                continue;
            }
            let id = ConnectionId(self.next_id);
            self.next_id += 1;
            if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
                continue;
            }
            self.by_fd.insert(stream.as_raw_fd(), id);
            let mut conn = Connection::new(stream, self.limits(), self.spool.clone());
            if let Some(key) = peer {
                *self.per_peer.entry(key).or_insert(0) += 1;
                conn.peer = Some(key);
            }
            self.conns.insert(id, conn);
        }
    }

    /// Stops polling the listener after a failed accept, until the next
    /// sweep tick or closed connection; logs at most once per interval.
    fn pause_listener(&mut self, e: &io::Error, ops: &mut EventOps) {
        if !self.listener_paused {
            self.listener_paused = true;
            for l in &self.listeners {
                let _ = ops.modify(Events::new(l, EventSet::empty()));
            }
        }
        self.accept_failures_unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .accept_failures_logged
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        eprintln!(
            "ember-http: accept failed ({e}); {} time(s); the listener pauses until a connection closes or {:?} pass",
            self.accept_failures_unlogged,
            self.config.sweep_tick().unwrap_or(LISTENER_RETRY)
        );
        self.accept_failures_logged = Some(now);
        self.accept_failures_unlogged = 0;
    }

    fn resume_listener(&mut self, ops: &mut EventOps) {
        if std::mem::take(&mut self.listener_paused) {
            for l in &self.listeners {
                let _ = ops.modify(Events::new(l, EventSet::IN));
            }
        }
    }

    /// Logs refusals of over-limit peers, at most once per interval.
    fn log_refusal(&mut self, key: Peer, limit: usize) {
        self.refusals_unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .refusals_logged
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        let what = match (key, self.config.peer_key) {
            (Peer::Ip(_), _) => "",
            (Peer::Local(_), PeerKey::Pid) => "pid ",
            (Peer::Local(_), PeerKey::Uid) => "uid ",
        };
        eprintln!(
            "ember-http: refused {} connection(s) over the per-client limit of {limit} (latest from {what}{key})",
            self.refusals_unlogged
        );
        self.refusals_logged = Some(now);
        self.refusals_unlogged = 0;
    }

    /// Best-effort 503 on a fresh socket, then close it.
    fn refuse(&self, stream: Stream, why: &str) {
        let resp = (self.config.error_response)(503, why);
        let opts = WriteOpts {
            keep_alive: false,
            head: false,
            version: Version::Http11,
        };
        let mut out = Vec::new();
        response::serialize(&resp, &opts, Framing::Length, &mut out);
        // SAFETY: valid buffer and owned fd; non-blocking, no SIGPIPE.
        unsafe {
            libc::send(
                stream.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            );
        }
        // Let the client read the response before it sees the close.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Closing a TCP socket with unread input sends a reset, which can
        // overtake the 503 on its way: read (non-blocking, bounded) what
        // the client has already sent, its request, before dropping it.
        let mut stream = stream;
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match std::io::Read::read(&mut stream, &mut sink) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
    }

    fn on_connection_event(&mut self, id: ConnectionId, set: EventSet, ops: &mut EventOps) {
        let hup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if (set.intersects(EventSet::IN) || hup) && conn.read(&mut self.scratch).is_err() {
            let _ = self.pump(id);
            self.close(id, ops);
            return;
        }
        if hup {
            // The peer is fully gone: serve what it sent (side effects only),
            // nothing can be written back.
            let _ = self.pump(id);
            self.close(id, ops);
            return;
        }
        self.progress(id, ops);
    }

    /// Dispatches buffered requests as long as the connection allows it;
    /// returns how many were dispatched.
    fn pump(&mut self, id: ConnectionId) -> usize {
        let mut dispatched = 0;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return dispatched;
            };
            match conn.next_request() {
                Ok(Some((req, opts))) => {
                    dispatched += 1;
                    match self.handler.handle(id, req) {
                        Reply::Now(resp) => conn.start_response(&resp, opts),
                        Reply::Later => conn.wait(opts),
                        Reply::Upgrade(_) if conn.stream.as_unix().is_none() => {
                            // Hijacked streams are handed over as unix
                            // sockets; over TCP the request is refused.
                            let resp = (self.config.error_response)(
                                501,
                                "this request takes over the connection (a hijacked stream), which is served on the unix socket only",
                            );
                            conn.start_response(&resp, opts);
                        }
                        Reply::Upgrade(up) => {
                            conn.start_upgrade(&up.head);
                            self.upgrades.insert(id, up.take_over);
                            return dispatched;
                        }
                    }
                }
                Ok(None) => return dispatched,
                Err(e) => {
                    let resp = (self.config.error_response)(e.status(), &e.to_string());
                    conn.fail(&resp, Version::Http11);
                    return dispatched;
                }
            }
        }
    }

    /// Takes an upgraded connection out of the server and gives it to its
    /// handler's callback.
    fn hand_over(&mut self, id: ConnectionId, ops: &mut EventOps) {
        let Some(take_over) = self.upgrades.remove(&id) else {
            return;
        };
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.by_fd.remove(&conn.stream.as_raw_fd());
        self.forget_peer(conn.peer);
        let _ = ops.remove(Events::empty(&conn.stream));
        self.resume_listener(ops);
        let (stream, unsent, early_input) = conn.into_parts();
        // Only unix connections reach here (pump refuses TCP upgrades).
        let crate::stream::Stream::Unix(stream) = stream else {
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        take_over(Upgraded {
            stream,
            unsent,
            early_input,
        });
    }

    fn forget_peer(&mut self, peer: Option<Peer>) {
        if let Some(key) = peer {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.per_peer.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Dispatch, write, and update epoll interest or close.
    fn progress(&mut self, id: ConnectionId, ops: &mut EventOps) {
        loop {
            let dispatched = self.pump(id);
            if self.conns.get(&id).is_some_and(|c| c.is_upgrading()) {
                self.hand_over(id, ops);
                return;
            }
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            let before = conn.pending_out();
            if conn.flush().is_err() {
                self.close(id, ops);
                return;
            }
            // Unsent output: EPOLLOUT resumes. Otherwise, if output was
            // pending, dispatching may have stopped at the high-water mark:
            // now that it drained, no event will come for the requests
            // already buffered (the input buffer may even be full, so no
            // EPOLLIN either), so go on here.
            if conn.pending_out() > 0 || (dispatched == 0 && before == 0) {
                break;
            }
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.finished()
            || (conn.is_streaming() && conn.pending_out() > self.config.max_stream_buffer)
        {
            self.close(id, ops);
            return;
        }
        let want = conn.desired_interest();
        if want != conn.interest {
            if ops.modify(Events::new(&conn.stream, want)).is_err() {
                self.close(id, ops);
                return;
            }
            conn.interest = want;
        }
    }

    fn close(&mut self, id: ConnectionId, ops: &mut EventOps) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        self.by_fd.remove(&conn.stream.as_raw_fd());
        self.upgrades.remove(&id);
        self.forget_peer(conn.peer);
        // Must leave epoll (and the event manager's fd table) before the fd
        // is closed and possibly reused.
        let _ = ops.remove(Events::empty(&conn.stream));
        let notify = conn.dispatched_any;
        drop(conn);
        // A descriptor is free again.
        self.resume_listener(ops);
        if notify {
            self.handler.closed(id);
        }
    }

    /// Closes connections that stalled on the client's side, and answers
    /// 408 (then closes) to requests that missed their header deadline or
    /// minimum body rate.
    fn sweep_idle(&mut self, ops: &mut EventOps) {
        let _ = self.sweep.wait();
        self.resume_listener(ops);
        let now = std::time::Instant::now();
        if let Some(limit) = self.config.idle_timeout {
            let stale: Vec<ConnectionId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.stalled_for(now).is_some_and(|d| d > limit))
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                self.close(id, ops);
            }
        }
        let deadlines = self.config.deadlines();
        let late: Vec<(ConnectionId, String)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| c.missed_deadline(now, &deadlines).map(|why| (*id, why)))
            .collect();
        for (id, why) in late {
            let resp = (self.config.error_response)(408, &why);
            if let Some(c) = self.conns.get_mut(&id) {
                c.fail(&resp, Version::Http11);
            }
            self.progress(id, ops);
        }
    }

    fn drain_messages(&mut self, ops: &mut EventOps) {
        let _ = self.wake.read();
        let mut touched = BTreeSet::new();
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Respond(id, resp) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        if c.respond_later(&resp) {
                            touched.insert(id);
                        }
                    }
                }
                Msg::Chunk(id, data) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        if c.push_chunk(&data) {
                            touched.insert(id);
                        }
                    }
                }
                Msg::Finish(id) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        if c.finish_stream() {
                            touched.insert(id);
                        }
                    }
                }
                Msg::Close(id) => {
                    touched.remove(&id);
                    self.close(id, ops);
                }
            }
        }
        for id in touched {
            self.progress(id, ops);
        }
    }
}

/// The per-peer key of a unix socket's peer from `SO_PEERCRED`; 0 if it
/// cannot be read.
fn peer_key(stream: &UnixStream, key: PeerKey) -> u32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and describe a buffer of
    // the size SO_PEERCRED fills; the fd is owned by `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return 0;
    }
    match key {
        PeerKey::Pid => u32::try_from(cred.pid).unwrap_or(0),
        PeerKey::Uid => cred.uid,
    }
}

impl<H: Handler> MutEventSubscriber for HttpServer<H> {
    fn init(&mut self, ops: &mut EventOps) {
        // Registration can only fail if these fds are already registered;
        // there is nothing useful to do about that here.
        for l in &self.listeners {
            let _ = ops.add(Events::new(l, EventSet::IN));
        }
        let _ = ops.add(Events::new(self.wake.as_ref(), EventSet::IN));
        let _ = ops.add(Events::new(&self.sweep, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(index) = self.listeners.iter().position(|l| l.as_raw_fd() == fd) {
            self.accept(index, ops);
        } else if fd == self.wake.as_raw_fd() {
            self.drain_messages(ops);
        } else if fd == self.sweep.as_raw_fd() {
            self.sweep_idle(ops);
        } else if let Some(&id) = self.by_fd.get(&fd) {
            self.on_connection_event(id, events.event_set(), ops);
        } else {
            let _ = ops.remove(events);
        }
    }
}

impl<H: Handler> Drop for HttpServer<H> {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::{Read, Write};

    fn temp_sock(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "ember-http-unit-{}-{name}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn stale_socket_is_replaced_and_removed_on_drop() {
        let path = temp_sock("stale");
        let old = UnixListener::bind(&path).unwrap();
        drop(old);
        let server = HttpServer::new(
            &path,
            |_: ConnectionId, _: Request| Reply::Now(Response::empty(204)),
            ServerConfig::default(),
        )
        .unwrap();
        assert!(path.exists());
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_to_remove_regular_file() {
        let path = temp_sock("regular");
        std::fs::write(&path, b"x").unwrap();
        let err = HttpServer::new(
            &path,
            |_: ConnectionId, _: Request| Reply::Later,
            ServerConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ServerError::NotASocket(_)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn serves_on_same_thread_event_loop() {
        let path = temp_sock("loop");
        let server = HttpServer::new(
            &path,
            |_: ConnectionId, req: Request| Reply::Now(Response::text(200, req.path)),
            ServerConfig::default(),
        )
        .unwrap();
        let mut em = EventManager::<HttpServer<_>>::new().unwrap();
        let sid = em.add_subscriber(server);
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .write_all(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        client.set_nonblocking(true).unwrap();
        for _ in 0..100 {
            em.run_with_timeout(100).unwrap();
            let mut buf = [0u8; 512];
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.ends_with("\r\n\r\n/hello"), "{s}");
        assert_eq!(em.subscriber_mut(sid).unwrap().connection_count(), 0);
        drop(em.remove_subscriber(sid).unwrap());
        assert!(!path.exists());
    }

    /// Runs the loop until `client` has sent back something that
    /// `complete` accepts, or its peer closed (at most 200 rounds of 20 ms).
    fn reply_over<S: MutEventSubscriber>(
        em: &mut EventManager<S>,
        client: &mut std::net::TcpStream,
        complete: impl Fn(&str) -> bool,
    ) -> String {
        client.set_nonblocking(true).unwrap();
        let mut got = String::new();
        for _ in 0..200 {
            em.run_with_timeout(20).unwrap();
            let mut buf = [0u8; 512];
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {}
            }
            if complete(&got) {
                break;
            }
        }
        got
    }

    #[test]
    fn tcp_listener_serves_the_same_handler_with_a_per_ip_cap() {
        let path = temp_sock("tcp");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = HttpServer::new(
            &path,
            |_: ConnectionId, req: Request| Reply::Now(Response::text(200, req.path)),
            ServerConfig::default(),
        )
        .unwrap()
        .with_tcp_listener(tcp, Some(2))
        .unwrap();
        let addr = server.tcp_addrs()[0];
        assert!(addr.ip().is_loopback());
        let mut em = EventManager::<HttpServer<_>>::new().unwrap();
        let sid = em.add_subscriber(server);
        // Two connections from 127.0.0.1 are allowed and served...
        let mut a = std::net::TcpStream::connect(addr).unwrap();
        let mut b = std::net::TcpStream::connect(addr).unwrap();
        a.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let got = reply_over(&mut em, &mut a, |s| s.ends_with("/a"));
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        // ...a third from the same address gets 503 and is closed, while
        // the first two keep working. Its request is already sent (as any
        // HTTP client does): the refusal must still arrive, not a reset.
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let got = reply_over(&mut em, &mut c, |_| false);
        assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
        assert!(
            got.contains("too many connections from this client"),
            "{got}"
        );
        assert_eq!(em.subscriber_mut(sid).unwrap().connection_count(), 2);
        b.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let got = reply_over(&mut em, &mut b, |_| false);
        assert!(got.ends_with("/b"), "{got}");
        // b's slot is free again: a new connection is accepted.
        let mut d = std::net::TcpStream::connect(addr).unwrap();
        d.write_all(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let got = reply_over(&mut em, &mut d, |s| s.ends_with("/d"));
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        drop(em.remove_subscriber(sid).unwrap());
        assert!(!path.exists());
    }

    /// An upgraded connection becomes a raw two-way stream served by its
    /// own thread, while the loop keeps serving other clients; input the
    /// client sent right after the request reaches the new owner first.
    #[test]
    fn upgrade_hands_the_socket_over_and_the_loop_goes_on() {
        let path = temp_sock("upgrade");
        let server = HttpServer::new(
            &path,
            |_: ConnectionId, req: Request| {
                if !req.path.ends_with("/attach") {
                    return Reply::Now(Response::text(200, req.path));
                }
                Reply::Upgrade(Upgrade::new(
                    &b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"[..],
                    |up: Upgraded| {
                        std::thread::spawn(move || {
                            // Echo, upper-cased, until the client half-closes.
                            let (mut s, early) = up.start().unwrap();
                            s.write_all(&early.to_ascii_uppercase()).unwrap();
                            let mut buf = [0u8; 64];
                            loop {
                                let n = s.read(&mut buf).unwrap();
                                if n == 0 {
                                    break;
                                }
                                s.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
                            }
                            s.write_all(b"<eof>").unwrap();
                        });
                    },
                ))
            },
            ServerConfig::default(),
        )
        .unwrap();
        let mut em = EventManager::<HttpServer<_>>::new().unwrap();
        let sid = em.add_subscriber(server);
        let p = path.clone();
        let hijacker = std::thread::spawn(move || {
            let mut c = UnixStream::connect(&p).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            // client/api/hijack.go: (*Client).hijack sends these headers,
            // and stdin may follow the request at once.
            c.write_all(b"POST /v1.1.0/attach?container=c HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nUser-Agent: Hyper-Client/1.1.0\r\nContent-Length: 0\r\nContent-Type: text/plain\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\nearly ")
                .unwrap();
            let head = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";
            let mut got = vec![0u8; head.len()];
            c.read_exact(&mut got).unwrap();
            assert_eq!(got, head);
            c.write_all(b"bytes").unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            String::from_utf8(rest).unwrap()
        });
        // Meanwhile an ordinary client is served by the same loop.
        let mut other = UnixStream::connect(&path).unwrap();
        other
            .write_all(b"GET /other HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        other.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        for _ in 0..200 {
            em.run_with_timeout(50).unwrap();
            let mut buf = [0u8; 512];
            match other.read(&mut buf) {
                Ok(0) if hijacker.is_finished() => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        assert!(String::from_utf8_lossy(&out).ends_with("/other"));
        let echoed = hijacker.join().unwrap();
        assert_eq!(echoed, "EARLY BYTES<eof>");
        // The upgraded connection left the server.
        assert_eq!(em.subscriber_mut(sid).unwrap().connection_count(), 0);
        drop(em.remove_subscriber(sid).unwrap());
    }

    /// A pipelined request before the upgraded one is answered first, and
    /// its answer reaches the client before the upgrade head even when the
    /// new owner writes it.
    #[test]
    fn upgrade_after_a_pipelined_request_keeps_the_order() {
        let path = temp_sock("upgrade-order");
        let server = HttpServer::new(
            &path,
            |_: ConnectionId, req: Request| {
                if req.path != "/attach" {
                    return Reply::Now(Response::text(200, req.path));
                }
                Reply::Upgrade(Upgrade::new(
                    &b"HTTP/1.1 101 UPGRADED\r\n\r\n"[..],
                    |up: Upgraded| {
                        std::thread::spawn(move || {
                            let (mut s, _) = up.start().unwrap();
                            s.write_all(b"raw").unwrap();
                        });
                    },
                ))
            },
            ServerConfig::default(),
        )
        .unwrap();
        let mut em = EventManager::<HttpServer<_>>::new().unwrap();
        let sid = em.add_subscriber(server);
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(
            b"GET /first HTTP/1.1\r\n\r\nPOST /attach HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        c.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        for _ in 0..200 {
            em.run_with_timeout(20).unwrap();
            let mut buf = [0u8; 512];
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(
            s.ends_with("\r\n\r\n/firstHTTP/1.1 101 UPGRADED\r\n\r\nraw"),
            "{s}"
        );
        assert_eq!(em.subscriber_mut(sid).unwrap().connection_count(), 0);
        drop(em.remove_subscriber(sid).unwrap());
    }
}
