//! The API thread: an `ember-http` server on its own event loop. Its handler
//! maps requests to [`VmmAction`]s and hands them to the VMM thread without
//! waiting; the VMM thread answers through a [`Responder`], so a slow action
//! (booting) never stalls other API clients.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use ember_http::{
    ConnectionId, Handler, HttpServer, Reply, Request, Responder, Response, ServerConfig,
};
use event_manager::SubscriberOps;
use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::actions::VmmAction;
use crate::controller::Waker;
use crate::EventManager;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] ember_http::ServerError),
    #[error("API thread: {0}")]
    Thread(String),
}

/// Firecracker's default limit on an API request body
/// (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// A request crossing from the API thread to the VMM thread.
pub struct ApiRequest {
    pub action: VmmAction,
    pub conn: ConnectionId,
}

struct ApiHandler {
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
}

impl Handler for ApiHandler {
    fn handle(&mut self, conn: ConnectionId, req: Request) -> Reply {
        match super::parse(req.method.as_str(), &req.path, &req.body) {
            Err(e) => Reply::Now(Response::json(400, &super::fault(e))),
            Ok(action) => {
                if self.to_vmm.send(ApiRequest { action, conn }).is_err() {
                    return Reply::Now(Response::json(
                        503,
                        &super::fault("The VMM is shutting down."),
                    ));
                }
                let _ = self.wake.write(1);
                Reply::Later
            }
        }
    }
}

/// The VMM thread's end of the API.
pub struct ApiThread {
    pub requests: Receiver<ApiRequest>,
    responder: Responder,
    sock: String,
}

impl ApiThread {
    /// Binds `sock` and serves it on a new thread; registers the wake-up
    /// eventfd with the VMM's event loop. `on_start` runs first on the API
    /// thread (seccomp goes there).
    pub fn spawn(
        sock: &str,
        em: &mut EventManager,
        on_start: Option<Box<dyn FnOnce() + Send>>,
        max_payload: usize,
    ) -> Result<Self, ServerError> {
        let (tx, rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        em.add_subscriber(Arc::new(Mutex::new(Waker::new(
            wake.try_clone()?,
            Arc::new(AtomicBool::new(false)),
        ))));
        // One local client, small bodies: no per-peer accounting (its
        // getsockopt is not in the API thread's seccomp filter) and no
        // spooling (bodies are far below the threshold, and the jail has no
        // temp directory).
        let config = ServerConfig {
            max_body_bytes: max_payload,
            max_connections_per_peer: None,
            spool_threshold: None,
            ..ServerConfig::default()
        };
        let server = HttpServer::new(sock, ApiHandler { to_vmm: tx, wake }, config)?;
        let responder = server.responder();
        let (ready_tx, ready_rx) = channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("ember_api".into())
            .spawn(move || {
                if let Some(f) = on_start {
                    f();
                }
                let mut em = match event_manager::EventManager::<
                    Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>,
                >::new()
                {
                    Ok(em) => em,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                em.add_subscriber(Arc::new(Mutex::new(server)));
                let _ = ready_tx.send(Ok(()));
                loop {
                    if let Err(e) = em.run() {
                        if !e.to_string().contains("Interrupted") {
                            eprintln!("ember-vmm: API event loop: {e}");
                            return;
                        }
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|e| ServerError::Thread(e.to_string()))?
            .map_err(ServerError::Thread)?;
        Ok(ApiThread {
            requests: rx,
            responder,
            sock: sock.into(),
        })
    }

    /// Answers a request handed over earlier.
    pub fn answer(&self, conn: ConnectionId, status: u16, body: Option<Value>) {
        let resp = match body {
            Some(v) => Response::json(status, &v),
            None => Response::empty(status),
        };
        if let Err(e) = self.responder.respond(conn, resp) {
            eprintln!("ember-vmm: cannot answer an API request: {e}");
        }
    }

    /// Removes the socket file.
    pub fn cleanup(&self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}
