//! `ember-http`: a small, single-threaded HTTP/1.1 server layer for unix
//! sockets, built on `httparse` and driven by `event-manager` (epoll), plus a
//! tiny blocking client.
//!
//! # Server
//!
//! [`HttpServer`] owns a non-blocking [`UnixListener`](std::os::unix::net::UnixListener)
//! and implements [`event_manager::MutEventSubscriber`], so it sits in an
//! `EventManager` next to other subscribers. TCP listeners can be added
//! ([`HttpServer::with_tcp_listener`]): same handler, limits and loop, with a
//! per-IP connection cap in place of the `SO_PEERCRED` one. It never blocks: every socket is
//! non-blocking, output is buffered and written on `EPOLLOUT`, and a slow or
//! stalled client only holds its own connection.
//!
//! Protocol behaviour:
//! - keep-alive by default for HTTP/1.1, `Connection: close` honoured,
//!   HTTP/1.0 closes unless `Connection: keep-alive`;
//! - pipelined requests are answered strictly in order;
//! - `Expect: 100-continue` gets `100 Continue` (or the 413 right away);
//! - request bodies by `Content-Length` or `Transfer-Encoding: chunked`;
//!   without either the body is empty;
//! - limits ([`ServerConfig`]): header block (default 16 KiB) → 431, body
//!   (default 1 MiB) → 413, connections (default 256) → 503 + close,
//!   malformed → 400, unknown transfer coding → 501. These error responses
//!   come from [`ServerConfig::error_response`], by default
//!   [`Response::fault`]: `{"fault_message": "..."}` with
//!   `Content-Type: application/json`. Unsupported methods/paths (405/404)
//!   are the handler's business.
//! - slow clients cannot starve others: a connection that makes no progress
//!   while it is the client's turn is closed after
//!   [`ServerConfig::idle_timeout`] (60 s); a request head must be complete
//!   within [`ServerConfig::header_timeout`] (10 s) of its first byte, and a
//!   body must arrive at [`ServerConfig::min_body_rate`] (64 KiB/s averaged,
//!   after a 10 s grace), else 408 and close; one peer (by `SO_PEERCRED`
//!   pid, or uid: [`ServerConfig::peer_key`]) may hold at most
//!   [`ServerConfig::max_connections_per_peer`] connections (default 64),
//!   further ones from it get 503 (logged at most every 10 s) while other
//!   peers are still served;
//! - request bodies over [`ServerConfig::spool_threshold`] (1 MiB) are
//!   written to an unlinked temporary file (mode 0600, `O_TMPFILE` where
//!   possible) in [`ServerConfig::spool_dir`] as they arrive, and the handler
//!   sees them through a read-only memory map: [`Request::body`] is a
//!   [`RequestBody`] that derefs to `&[u8]` either way, and
//!   [`RequestBody::file`] gives the file. Uploads cost disk and page cache,
//!   not anonymous memory; a spool failure is answered 500;
//! - reads go through one buffer per server, so a read allocates nothing
//!   beyond the bytes it keeps.
//!
//! Your code implements [`Handler`]: `handle` gets each complete
//! [`Request`] and returns [`Reply::Now`] or [`Reply::Later`]. For `Later`,
//! answer from anywhere with a [`Responder`] (cloned from
//! [`HttpServer::responder`]; it sends through a channel and wakes the loop
//! with an eventfd). A [`Response`] with [`Body::Stream`] is sent with chunked
//! encoding; push chunks with [`Responder::send_chunk`] and end with
//! [`Responder::finish`]. A client that closes its sending side while a
//! stream is going has left (over TCP that EOF is all a closed peer shows
//! until the next write): the connection is closed. [`Reply::Upgrade`]
//! hijacks the connection: the server sends the handler's raw response
//! head (e.g. Docker's and hyperd's `HTTP/1.1 101 UPGRADED`), takes the
//! socket out of the event loop and hands it, blocking, to the handler's
//! callback, which gives it to a thread of its own; the loop never waits on
//! it. [`Handler::closed`] tells you when a connection
//! that carried requests goes away (e.g. a streaming client disconnected).
//!
//! # Example: wiring a handler into an `EventManager`
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use ember_http::{client, ConnectionId, Handler, HttpServer, Method, Reply, Request, Response, ServerConfig};
//!
//! struct Api;
//! impl Handler for Api {
//!     fn handle(&mut self, _conn: ConnectionId, req: Request) -> Reply {
//!         match (&req.method, req.path.as_str()) {
//!             (Method::Get, "/") => Reply::Now(Response::json(200, &serde_json::json!({"state": "Running"}))),
//!             (_, "/") => Reply::Now(Response::fault(405, "method not allowed")),
//!             _ => Reply::Now(Response::fault(404, "not found")),
//!         }
//!     }
//! }
//!
//! let path = std::env::temp_dir().join(format!("ember-http-doc-{}.sock", std::process::id()));
//! let server = HttpServer::new(&path, Api, ServerConfig::default()).unwrap();
//! let responder = server.responder(); // keep for Reply::Later / streams
//! let server: Arc<Mutex<dyn MutEventSubscriber + Send>> = Arc::new(Mutex::new(server));
//! let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
//! let id = em.add_subscriber(server);
//!
//! let p = path.clone();
//! let t = std::thread::spawn(move || client::request(&p, "GET", "/", None, Duration::from_secs(5)));
//! while !t.is_finished() {
//!     em.run_with_timeout(50).unwrap();
//! }
//! let resp = t.join().unwrap().unwrap();
//! assert_eq!(resp.status, 200);
//! assert_eq!(resp.text(), r#"{"state":"Running"}"#);
//! # drop(responder);
//! drop(em.remove_subscriber(id)); // dropping the server removes the socket file
//! ```
//!
//! # Client
//!
//! [`client::request`] sends one request over a unix socket and returns a
//! [`client::ClientResponse`] (Content-Length, chunked and until-EOF bodies).

#![deny(missing_docs)]

mod body;
pub mod client;
mod connection;
mod headers;
mod request;
mod response;
mod server;
mod stream;

pub use body::{RequestBody, SpoolError};
pub use connection::{ConnectionError, ConnectionId};
pub use headers::Headers;
pub use request::{
    Limits, Method, Request, RequestError, Version, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
};
pub use response::{reason_phrase, Body, Response, ResponseError};
pub use server::{
    default_max_connections_per_peer, ErrorResponseFn, Handler, HttpServer, PeerKey, Reply,
    Responder, ServerConfig, ServerError, Upgrade, Upgraded, DEFAULT_BODY_RATE_GRACE,
    DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_STREAM_BUFFER, DEFAULT_MIN_BODY_RATE, DEFAULT_SPOOL_THRESHOLD,
};
