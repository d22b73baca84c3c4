//! Agent sessions: the one connection emberd keeps to a pod VM's
//! `ember-agent` (vsock port 2718 through the VMM's hybrid-vsock socket).
//!
//! A session is a thread that owns the connection. Callers hand it
//! requests over a channel and wait, bounded, for the answer; what the
//! agent pushes on its own (container exit events) goes to a callback, and
//! so does the end of the connection. The thread never touches the model:
//! its owner decides what events and the end mean.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use ember_agent::protocol::{OkReply, Request};
use ember_agent::{AgentClient, ClientError, Event};

/// Why a request through a session got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the pod VM's agent connection is closed")]
    Closed,
    #[error("the pod VM's agent connection closed")]
    ClosedWhileWaiting,
    #[error("the agent did not answer {what} in {secs} s")]
    Timeout { what: String, secs: u64 },
    /// The agent's own error, or a broken connection.
    #[error("{0}")]
    Agent(String),
}

/// A request to the session thread and where its answer goes.
struct Call {
    req: Request,
    reply: Sender<Result<OkReply, String>>,
}

/// The handle of one agent session (cheap to clone).
#[derive(Clone)]
pub struct Session {
    tx: Sender<Call>,
    /// Set before an intended shutdown, so the connection's end is not
    /// reported as a failure.
    closing: Arc<AtomicBool>,
    /// Set when the session thread has ended.
    ended: Arc<AtomicBool>,
}

/// The thread side of a [`Session`], not yet started.
pub struct SessionRunner {
    rx: Receiver<Call>,
    session: Session,
}

impl Session {
    /// A session handle and its runner; start the runner with
    /// [`SessionRunner::start`] once the handle is registered.
    pub fn new() -> (Session, SessionRunner) {
        let (tx, rx) = channel();
        let session = Session {
            tx,
            closing: Arc::new(AtomicBool::new(false)),
            ended: Arc::new(AtomicBool::new(false)),
        };
        let runner = SessionRunner {
            rx,
            session: session.clone(),
        };
        (session, runner)
    }

    /// Sends `req` and waits up to `timeout` for the agent's answer.
    pub fn request(&self, req: Request, timeout: Duration) -> Result<OkReply, SessionError> {
        let (tx, rx) = channel();
        let what = format!("{req:?}");
        self.tx
            .send(Call { req, reply: tx })
            .map_err(|_| SessionError::Closed)?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r.map_err(SessionError::Agent),
            Err(RecvTimeoutError::Timeout) => Err(SessionError::Timeout {
                what: what
                    .split(['(', ' '])
                    .next()
                    .unwrap_or("the request")
                    .to_string(),
                secs: timeout.as_secs(),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(SessionError::ClosedWhileWaiting),
        }
    }

    /// Marks the session as being closed on purpose: its end is expected.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Whether [`Session::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Whether the session has ended (the connection is gone).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Whether `other` is a handle of this same session.
    pub fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.closing, &other.closing)
    }
}

impl SessionRunner {
    /// Starts the session thread over `client`. `on_events` gets what the
    /// agent pushes; `on_end` gets the session and why it ended, once.
    pub fn start<E, F>(
        self,
        client: AgentClient<UnixStream>,
        mut on_events: E,
        on_end: F,
    ) -> std::io::Result<()>
    where
        E: FnMut(Vec<Event>) + Send + 'static,
        F: FnOnce(Session, String) + Send + 'static,
    {
        std::thread::Builder::new()
            .name("emberd-agent".into())
            .spawn(move || {
                let why = run(client, &self.rx, &mut on_events);
                self.session.ended.store(true, Ordering::SeqCst);
                on_end(self.session, why);
            })
            .map(|_| ())
    }
}

/// The session thread: requests from the channel, events to `on_events`.
/// Returns why it ended.
fn run(
    mut client: AgentClient<UnixStream>,
    rx: &Receiver<Call>,
    on_events: &mut dyn FnMut(Vec<Event>),
) -> String {
    let fd = client.stream().as_raw_fd();
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(call) => {
                let r = client.request(&call.req);
                let broken = matches!(&r, Err(e) if !matches!(e, ClientError::Agent(_)));
                let why = r.as_ref().err().map(|e| e.to_string());
                let _ = call.reply.send(r.map_err(|e| e.to_string()));
                on_events(client.take_events());
                if broken {
                    return why.unwrap_or_default();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return "closed by emberd".into(),
        }
        // Frames the agent pushed on its own: exit events, or the end.
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n <= 0 {
                break;
            }
            match client.next_event() {
                Ok(ev) => on_events(vec![ev]),
                Err(e) => return e.to_string(),
            }
        }
    }
}
