//! emberd's event loop plumbing, shared by the API faces: the HTTP server
//! and its router, replies from worker jobs ([`Ctx::spawn`] over
//! [`crate::model::jobs`]), the VMM exit watcher (pidfds in epoll) and
//! streaming log followers.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_http::{ConnectionId, Handler, Reply, Request, Responder, Response};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::model::jobs::{BgFinish, Jobs, Shared};
use crate::model::supervisor::{ErrorKind, Supervisor, SupervisorError, WatchSender};
use crate::model::VmmProcess;
use crate::runtime::process;

/// Work finished on a worker thread, applied on the loop thread; its
/// response answers the client that asked.
pub type Finish = Box<dyn FnOnce(&mut Supervisor) -> Response + Send>;

/// Watches VMM processes through pidfds and tells the supervisor when one
/// ends.
struct ExitWatcher {
    rx: Receiver<(String, VmmProcess)>,
    wake: EventFd,
    watched: HashMap<RawFd, (String, i32, OwnedFd)>,
    sup: Shared,
}

impl ExitWatcher {
    fn gone(&self, id: &str, pid: i32) {
        let code = process::reap(pid);
        let mut sup = self.sup.lock().unwrap_or_else(|p| p.into_inner());
        sup.vmm_exited(id, pid, code);
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            while let Ok((id, p)) = self.rx.try_recv() {
                match process::pidfd_open(p.pid) {
                    Ok(pfd) if process::is_alive(&p) => {
                        let raw = pfd.as_raw_fd();
                        if ops.add(Events::new_raw(raw, EventSet::IN)).is_ok() {
                            self.watched.insert(raw, (id, p.pid, pfd));
                        }
                    }
                    _ => self.gone(&id, p.pid),
                }
            }
            return;
        }
        if let Some((id, pid, pfd)) = self.watched.remove(&fd) {
            let _ = ops.remove(Events::new_raw(pfd.as_raw_fd(), EventSet::IN));
            self.gone(&id, pid);
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.wake, EventSet::IN));
    }
}

/// A streaming log reader bound to one connection.
struct Follower {
    stop: Arc<AtomicBool>,
    /// Instance to delete when the client goes away.
    delete_on_close: Option<String>,
}

/// Decides what a request means; one per API face.
pub trait Face: Send {
    /// Handles `req` if it belongs to this face (None: not mine).
    fn handle(&mut self, ctx: &mut Ctx, req: &Request) -> Option<Reply>;
    /// Called once at start-up, e.g. to resume unfinished reconciliation.
    fn resume(&mut self, _sup: &mut Supervisor, _jobs: &Jobs) {}
}

/// What a face gets to work with.
pub struct Ctx<'a> {
    pub sup: &'a mut Supervisor,
    pub jobs: &'a Jobs,
    pub conn: ConnectionId,
    responder: Option<&'a Responder>,
    follow: &'a mut Option<(PathBuf, Option<String>)>,
    stream_stop: &'a mut Option<Arc<AtomicBool>>,
}

/// A streamed response being fed from another thread: push chunks through
/// `responder` for `conn`; `stop` turns true when the client has gone.
pub struct StreamFeed {
    pub responder: Responder,
    pub conn: ConnectionId,
    pub stop: Arc<AtomicBool>,
}

impl Ctx<'_> {
    /// Runs `work` on a worker thread; the response its result gives (on
    /// the loop thread) answers this request.
    pub fn spawn<F>(&self, what: &str, work: F) -> Reply
    where
        F: FnOnce() -> Finish + Send + 'static,
    {
        let Some(responder) = self.responder.cloned() else {
            return Reply::Now(Response::json(
                500,
                &serde_json::json!({"Error": "emberd is not serving replies yet"}),
            ));
        };
        let conn = self.conn;
        let spawned = self.jobs.spawn(what, Duration::ZERO, move || {
            let fin = work();
            Box::new(move |sup: &mut Supervisor, _: &Jobs| {
                let resp = fin(sup);
                let _ = responder.respond(conn, resp);
            }) as BgFinish
        });
        match spawned {
            Ok(()) => Reply::Later,
            Err(e) => Reply::Now(Response::json(
                500,
                &serde_json::json!({"Error": format!("cannot start a worker thread: {e}")}),
            )),
        }
    }

    /// Answers with a streamed (chunked) response whose chunks another
    /// thread sends through the returned feed; None if replies cannot be
    /// sent yet.
    pub fn stream(&mut self) -> Option<StreamFeed> {
        let responder = self.responder.cloned()?;
        let stop = Arc::new(AtomicBool::new(false));
        *self.stream_stop = Some(stop.clone());
        Some(StreamFeed {
            responder,
            conn: self.conn,
            stop,
        })
    }

    /// Streams `log` to this connection as it grows (chunked). With
    /// `delete_on_close`, that instance is deleted when the client leaves.
    pub fn follow_log(&mut self, log: PathBuf, delete_on_close: Option<String>) -> Reply {
        *self.follow = Some((log, delete_on_close));
        Reply::Now(Response::stream(200, "text/plain; charset=utf-8"))
    }
}

/// The HTTP handler: tries each face in order; answers 404 otherwise.
pub struct Router {
    faces: Vec<Box<dyn Face>>,
    sup: Shared,
    jobs: Jobs,
    responder: Option<Responder>,
    followers: HashMap<ConnectionId, Follower>,
}

impl Router {
    fn start_follower(&mut self, conn: ConnectionId, log: PathBuf, delete: Option<String>) {
        let Some(responder) = self.responder.clone() else {
            return;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let _ = std::thread::Builder::new()
            .name("emberd-logs".into())
            .spawn(move || follow(log, responder, conn, stop2));
        self.followers.insert(
            conn,
            Follower {
                stop,
                delete_on_close: delete,
            },
        );
    }
}

/// Sends what the log has, then what is appended, until stopped or the log
/// is removed (instance deleted).
fn follow(log: PathBuf, responder: Responder, conn: ConnectionId, stop: Arc<AtomicBool>) {
    use std::io::{Read, Seek, SeekFrom};
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let Ok(mut f) = std::fs::File::open(&log) else {
            let _ = responder.finish(conn);
            return;
        };
        if f.seek(SeekFrom::Start(pos)).is_ok() {
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        pos += n as u64;
                        if responder.send_chunk(conn, buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Handler for Router {
    fn handle(&mut self, conn: ConnectionId, req: Request) -> Reply {
        let mut follow = None;
        let mut stream_stop = None;
        let reply = {
            let mut sup = self.sup.lock().unwrap_or_else(|p| p.into_inner());
            let mut ctx = Ctx {
                sup: &mut sup,
                jobs: &self.jobs,
                conn,
                responder: self.responder.as_ref(),
                follow: &mut follow,
                stream_stop: &mut stream_stop,
            };
            self.faces.iter_mut().find_map(|f| f.handle(&mut ctx, &req))
        };
        if let Some((log, delete)) = follow {
            self.start_follower(conn, log, delete);
        }
        if let Some(stop) = stream_stop {
            self.followers.insert(
                conn,
                Follower {
                    stop,
                    delete_on_close: None,
                },
            );
        }
        reply.unwrap_or_else(|| {
            Reply::Now(Response::json(
                404,
                &serde_json::json!({"Error": format!("no route for {} {}", req.method, req.path)}),
            ))
        })
    }

    fn closed(&mut self, conn: ConnectionId) {
        if let Some(f) = self.followers.remove(&conn) {
            f.stop.store(true, Ordering::SeqCst);
            if let Some(id) = f.delete_on_close {
                let mut sup = self.sup.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = sup.delete_instance(&id, true) {
                    log::warn!("deleting {id} after its log client left: {e}");
                }
            }
        }
    }
}

/// HTTP status for a supervisor error.
pub fn status_of(e: &SupervisorError) -> u16 {
    match e.kind() {
        ErrorKind::Invalid => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::Internal => 500,
    }
}

/// Binds the API socket with a mode no umask can widen: created under
/// umask 0177 (so 0600 from the start; emberd is single-threaded here),
/// then given its group and 0660 if asked. A stale socket is replaced; any
/// other file at `path` is an error.
fn bind_private(
    path: &std::path::Path,
    group: Option<u32>,
) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(DaemonError::Io(std::io::Error::other(format!(
                "{} exists and is not a socket",
                path.display()
            ))))
        }
        Err(_) => {}
    }
    // SAFETY: umask(2) only changes this process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, Some(0), Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(listener)
}

/// The running daemon's event loop.
pub struct Daemon {
    em: event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    jobs: Jobs,
    sup: Shared,
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] ember_http::ServerError),
    #[error("event loop: {0}")]
    Events(String),
    /// A `--listen-tcp` address that cannot be used.
    #[error("--listen-tcp {addr:?}: {why}")]
    ListenTcp { addr: String, why: String },
}

/// A TCP listener serving the same faces as the unix socket
/// (`emberd --listen-tcp`).
#[derive(Debug)]
pub struct TcpListen {
    /// Bound and listening.
    pub listener: std::net::TcpListener,
    /// Most connections one IP address may hold (None: no limit).
    pub max_connections_per_ip: Option<usize>,
}

/// Parses a `--listen-tcp` address: `PORT` (loopback, 127.0.0.1),
/// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` (127.0.0.1). Host names
/// other than `localhost` are refused: the address must say exactly which
/// interface is exposed.
pub fn parse_listen_tcp(s: &str) -> Result<std::net::SocketAddr, DaemonError> {
    use std::net::{Ipv4Addr, SocketAddr};
    let bad = |why: &str| DaemonError::ListenTcp {
        addr: s.to_string(),
        why: why.to_string(),
    };
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => port
            .parse::<u16>()
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
            .map_err(|_| bad("the port must be a number from 0 to 65535")),
        Some(("", _)) => Err(bad(
            "give the interface's address too (e.g. 127.0.0.1:3000, or 0.0.0.0:3000 for every interface)",
        )),
        _ => Err(bad(
            "expected PORT, IP:PORT, [IPv6]:PORT or localhost:PORT",
        )),
    }
}

/// HTTP limits of the daemon's socket.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest request body (uploads), bytes.
    pub max_body: usize,
    /// Most connections one client process may hold (None: no limit).
    pub max_connections_per_peer: Option<usize>,
    /// Where request bodies over 1 MiB are spooled (unlinked files).
    pub spool_dir: std::path::PathBuf,
}

impl Daemon {
    /// Serves `faces` over `sock` for `sup`. The socket is root's, mode
    /// 0600, or 0660 with group `socket_group`, whatever the umask: it is
    /// created that way, never widened later. With `tcp`, the same router,
    /// limits and loop also serve that listener (one IP address holds at
    /// most its `max_connections_per_ip` connections).
    pub fn new(
        sock: &std::path::Path,
        socket_group: Option<u32>,
        sup: Supervisor,
        faces: Vec<Box<dyn Face>>,
        limits: HttpLimits,
        tcp: Option<TcpListen>,
    ) -> Result<Self, DaemonError> {
        use event_manager::SubscriberOps;
        let mut em: event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            event_manager::EventManager::new().map_err(|e| DaemonError::Events(e.to_string()))?;
        let sup: Shared = Arc::new(Mutex::new(sup));
        let (jobs, queue) = Jobs::new(sup.clone())?;
        let router = Router {
            faces,
            sup: sup.clone(),
            jobs: jobs.clone(),
            responder: None,
            followers: HashMap::new(),
        };
        let config = ember_http::ServerConfig {
            max_body_bytes: limits.max_body,
            max_connections_per_peer: limits.max_connections_per_peer,
            spool_dir: limits.spool_dir,
            error_response: Arc::new(|status, msg| {
                Response::json(status, &serde_json::json!({"Error": msg}))
            }),
            ..Default::default()
        };
        let listener = bind_private(sock, socket_group)?;
        let mut server = ember_http::HttpServer::from_listener(listener, router, config)?;
        if let Some(t) = tcp {
            server = server.with_tcp_listener(t.listener, t.max_connections_per_ip)?;
        }
        server.handler_mut().responder = Some(server.responder());
        // Faces that need to resume work after a restart (reconcile loops).
        {
            let mut router_sup = sup.lock().unwrap_or_else(|p| p.into_inner());
            for f in server.handler_mut().faces.iter_mut() {
                f.resume(&mut router_sup, &jobs);
            }
        }
        em.add_subscriber(Arc::new(Mutex::new(server)));
        em.add_subscriber(Arc::new(Mutex::new(queue)));
        let (wtx, wrx) = channel();
        let wwake = EventFd::new(EFD_NONBLOCK)?;
        {
            let mut s = sup.lock().unwrap_or_else(|p| p.into_inner());
            s.set_watcher(WatchSender::new(wtx, wwake.try_clone()?));
            // Instant starts' pool and templates are made by workers.
            s.start_background(jobs.clone());
        }
        em.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
            rx: wrx,
            wake: wwake,
            watched: HashMap::new(),
            sup: sup.clone(),
        })));
        Ok(Daemon { em, jobs, sup })
    }

    /// Stops what emberd itself keeps running (the idle pooled VMMs);
    /// instances keep running.
    pub fn shutdown(&mut self) {
        self.sup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }

    /// The loop's work queue, for servers on other threads (the gRPC face)
    /// to run model calls on the loop thread ([`Jobs::call`]).
    pub fn jobs(&self) -> Jobs {
        self.jobs.clone()
    }

    /// Runs until `stop` is set (checked after every round of events).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), DaemonError> {
        while !stop.load(Ordering::SeqCst) {
            if let Err(e) = self.em.run_with_timeout(500) {
                let s = e.to_string();
                if !s.contains("Interrupted") {
                    return Err(DaemonError::Events(s));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_tcp_addresses() {
        let p = |s: &str| parse_listen_tcp(s).map(|a| a.to_string());
        assert_eq!(p("3000").unwrap(), "127.0.0.1:3000");
        assert_eq!(p("localhost:3000").unwrap(), "127.0.0.1:3000");
        assert_eq!(p("127.0.0.1:0").unwrap(), "127.0.0.1:0");
        assert_eq!(p("0.0.0.0:3000").unwrap(), "0.0.0.0:3000");
        assert_eq!(p("[::1]:3000").unwrap(), "[::1]:3000");
        let e = p(":3000").unwrap_err().to_string();
        assert!(e.contains("give the interface's address"), "{e}");
        assert!(p("example.com:3000").is_err());
        assert!(p("localhost:99999").is_err());
        assert!(p("70000").is_err());
        assert!(p("").is_err());
    }
}
