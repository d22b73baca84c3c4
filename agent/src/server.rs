//! The agent's request loop: one reader thread and one writer thread per
//! connection, events (exits, and the output of `stdio` processes)
//! broadcast to every connection through bounded queues, and the signal
//! loop that reaps children.
//!
//! Bad requests (unknown command, bad JSON, failing operations) get an
//! ERROR reply and the connection keeps going. An oversized length field
//! gets an ERROR reply and the connection is closed (the stream cannot be
//! resynchronised); a truncated frame just closes it. The listener keeps
//! accepting either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::b64;
use crate::container::{ContainerError, Containers, Paths};
use crate::protocol::{
    read_frame, write_frame, AgentMessage, Event, Frame, OkReply, ProtocolError, Ready, Request,
};
use crate::transport::{Listener, Stream};

/// Agent version sent in READY and PING replies.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A server setup failure.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The container state could not be set up.
    #[error(transparent)]
    Container(#[from] ContainerError),
}

enum Out {
    Frame(Frame),
    Flush(mpsc::Sender<()>),
}

/// Frames queued per connection before pushing blocks (output events then
/// wait for the host to read: backpressure down to the process's pipes).
const CONN_QUEUE: usize = 256;

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, mpsc::SyncSender<Out>>>,
}

impl Registry {
    fn broadcast(&self, ev: Event) {
        let frame = match AgentMessage::Event(ev).encode() {
            Ok(f) => f,
            Err(e) => {
                log::error!("encoding event: {e}");
                return;
            }
        };
        // Not under the lock: a send may wait for a slow connection.
        let conns: Vec<mpsc::SyncSender<Out>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for tx in conns {
            let _ = tx.send(Out::Frame(frame.clone()));
        }
    }
}

/// What to do after DESTROYPOD has been answered.
pub type DestroyHook = Box<dyn Fn() + Send + Sync>;

/// The agent.
pub struct Server {
    containers: Containers,
    registry: Arc<Registry>,
    pid1: bool,
    on_destroy: DestroyHook,
}

impl Server {
    /// Sets up the container state. `on_destroy` runs after DESTROYPOD's
    /// reply has been sent (exit on a host, power off as PID 1).
    pub fn new(
        paths: Paths,
        pid1: bool,
        on_destroy: DestroyHook,
    ) -> Result<Arc<Server>, ServerError> {
        let registry = Arc::new(Registry::default());
        let r = Arc::clone(&registry);
        let containers = Containers::new(paths, Box::new(move |ev| r.broadcast(ev)))?;
        Ok(Arc::new(Server {
            containers,
            registry,
            pid1,
            on_destroy,
        }))
    }

    /// The containers.
    pub fn containers(&self) -> &Containers {
        &self.containers
    }

    /// Accepts connections forever, one thread each.
    pub fn serve(self: &Arc<Self>, listener: &Listener) -> std::io::Result<()> {
        log::info!("serving on {}", listener.describe());
        loop {
            match listener.accept() {
                Ok(stream) => {
                    let me = Arc::clone(self);
                    thread::Builder::new()
                        .name("conn".into())
                        .spawn(move || me.handle(stream))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    log::warn!("accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn handle(self: Arc<Self>, mut stream: Stream) {
        let mut writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                log::warn!("connection: cloning the stream: {e}");
                return;
            }
        };
        let (tx, rx) = mpsc::sync_channel::<Out>(CONN_QUEUE);
        let writer_thread = thread::Builder::new()
            .name("conn-writer".into())
            .spawn(move || {
                for out in rx {
                    match out {
                        Out::Frame(f) => {
                            if let Err(e) = write_frame(&mut writer, &f) {
                                log::debug!("connection write: {e}");
                                break;
                            }
                        }
                        Out::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                writer.shutdown();
            });
        if writer_thread.is_err() {
            log::warn!("connection: cannot start its writer thread");
            return;
        }
        let send = |msg: AgentMessage| match msg.encode() {
            Ok(f) => {
                let _ = tx.send(Out::Frame(f));
            }
            Err(e) => {
                let _ = tx.send(Out::Frame(
                    AgentMessage::error(format!("encoding the reply: {e}"))
                        .encode()
                        .unwrap_or(Frame {
                            cmd: crate::protocol::cmd::ERROR,
                            payload: b"{\"message\":\"reply encoding failed\"}".to_vec(),
                        }),
                ));
            }
        };
        let flush = || {
            let (done_tx, done_rx) = mpsc::channel();
            if tx.send(Out::Flush(done_tx)).is_ok() {
                let _ = done_rx.recv();
            }
        };
        send(AgentMessage::Ready(Ready {
            version: VERSION.to_string(),
            pid1: self.pid1,
        }));
        let conn_id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        self.registry
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(conn_id, tx.clone());

        loop {
            let frame = match read_frame(&mut stream) {
                Ok(f) => f,
                Err(ProtocolError::Closed) => break,
                Err(e @ ProtocolError::TooLarge(_)) => {
                    log::warn!("connection: {e}; closing it");
                    send(AgentMessage::error(format!("{e}; closing the connection")));
                    break;
                }
                Err(e) => {
                    log::warn!("connection: {e}");
                    break;
                }
            };
            let (reply, destroy) = match Request::decode(&frame) {
                Ok(req) => {
                    let destroy = req == Request::DestroyPod;
                    log::debug!("request {req:?}");
                    match self.dispatch(req) {
                        Ok(ok) => (AgentMessage::Ok(ok), destroy),
                        Err(e) => (AgentMessage::error(e.to_string()), false),
                    }
                }
                Err(e) => (AgentMessage::error(e.to_string()), false),
            };
            send(reply);
            if destroy {
                flush();
                (self.on_destroy)();
            }
        }
        self.registry
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conn_id);
        flush();
        drop(tx);
        stream.shutdown();
    }

    /// Executes one request.
    pub fn dispatch(&self, req: Request) -> Result<OkReply, ContainerError> {
        let c = &self.containers;
        Ok(match req {
            Request::Ping => OkReply {
                version: Some(VERSION.to_string()),
                ..Default::default()
            },
            Request::StartContainer(r) => OkReply {
                id: Some(r.id.clone()),
                pid: Some(c.start(&r)?),
                ..Default::default()
            },
            Request::StopContainer(r) => OkReply {
                code: Some(c.stop(&r.id, r.signal, Duration::from_millis(r.timeout_ms))?),
                id: Some(r.id),
                ..Default::default()
            },
            Request::Exec(r) => OkReply {
                id: Some(r.id.clone()),
                pid: Some(c.exec(&r)?),
                ..Default::default()
            },
            Request::Wait(r) => OkReply {
                code: Some(c.wait(&r.id, r.timeout_ms.map(Duration::from_millis))?),
                id: Some(r.id),
                ..Default::default()
            },
            Request::WriteFile(r) => {
                let data = b64::decode(&r.data)
                    .map_err(|e| ContainerError::BadParameter(format!("data: {e}")))?;
                c.write_file(&r.container, &r.path, &data, r.mode)?;
                OkReply::default()
            }
            Request::ReadFile(r) => OkReply {
                data: Some(b64::encode(&c.read_file(&r.container, &r.path)?)),
                ..Default::default()
            },
            Request::ReadLog(r) => {
                let (data, next) = c.read_log(&r.id, r.offset)?;
                OkReply {
                    id: Some(r.id),
                    data: Some(b64::encode(&data)),
                    next_offset: Some(next),
                    ..Default::default()
                }
            }
            Request::Signal(r) => {
                c.signal(&r.id, r.signal)?;
                OkReply::default()
            }
            Request::RemoveContainer(r) => {
                c.remove(&r.id)?;
                OkReply::default()
            }
            Request::DestroyPod => {
                for e in c.remove_all() {
                    log::warn!("destroying the pod: {e}");
                }
                OkReply::default()
            }
            Request::Stdin(r) => {
                let data = b64::decode(&r.data)
                    .map_err(|e| ContainerError::BadParameter(format!("data: {e}")))?;
                c.stdin(&r.id, data, r.eof)?;
                OkReply::default()
            }
            Request::Resize(r) => {
                c.resize(&r.id, r.rows, r.cols)?;
                OkReply::default()
            }
            Request::Logs(r) => OkReply {
                records: Some(c.logs(&r.id)?),
                id: Some(r.id),
                ..Default::default()
            },
        })
    }
}

/// Blocks SIGCHLD, SIGTERM, SIGINT and SIGHUP in the calling thread. Call it
/// first in `main`, before any thread exists, so every thread inherits the
/// mask and [`signal_loop`] receives them.
pub fn block_signals() {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let set = handled_signals();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Reaps children on SIGCHLD (and every second regardless); calls
/// `on_term` for SIGTERM, SIGINT and SIGHUP. `on_term` must not wait for
/// processes to exit (this thread is the one that reaps them): hand such
/// work to another thread. Never returns.
pub fn signal_loop(containers: &Containers, on_term: impl Fn(i32)) -> ! {
    let set = handled_signals();
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: sigtimedwait with a valid set and timeout; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        containers.reap_all();
        if sig == libc::SIGTERM || sig == libc::SIGINT || sig == libc::SIGHUP {
            on_term(sig);
        }
    }
}
