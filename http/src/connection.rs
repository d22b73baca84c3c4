//! Per-connection state: input/output buffers, the request parser and the
//! state machine that keeps responses in request order.
//!
//! A connection is in one of three states:
//! - `Idle`: the next complete request may be dispatched;
//! - `Waiting`: the handler answered [`Reply::Later`](crate::Reply::Later),
//!   further pipelined requests are buffered (bounded) but not dispatched;
//! - `Streaming`: a [`Body::Stream`](crate::Body::Stream) response is being
//!   sent; same buffering rule until the stream is finished.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use crate::body::SpoolConfig;
use crate::request::{Limits, Parsed, Request, RequestError, RequestParser};
use crate::response::{self, Framing, Response, WriteOpts};
use crate::stream::{Peer, Stream};

/// Bytes read from a socket per readiness event before yielding to others.
const READ_BUDGET: usize = 256 * 1024;
/// Size of one read call (and of the server's shared read buffer).
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// While this much output is unsent, no further request is dispatched.
const OUT_HIGH_WATER: usize = 1024 * 1024;
/// Extra input buffered beyond one header block while not dispatching.
const IN_SLACK: usize = 64 * 1024;

/// Errors on a connection's socket.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Reading from the socket failed.
    #[error("read failed: {0}")]
    Read(io::Error),
    /// Writing to the socket failed (e.g. the peer went away).
    #[error("write failed: {0}")]
    Write(io::Error),
}

/// Identifies one client connection for the lifetime of a server. Ids are
/// never reused, so a late [`Responder::respond`](crate::Responder::respond)
/// for a closed connection cannot reach a newer one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Waiting(WriteOpts),
    Streaming(WriteOpts, Framing),
    /// The handler took the connection over ([`Reply::Upgrade`](crate::Reply::Upgrade)):
    /// nothing more is read or dispatched; the server hands the socket over
    /// on its next step.
    Upgrading,
}

/// One accepted client connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) stream: Stream,
    parser: RequestParser,
    in_cap: usize,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    close_after_flush: bool,
    peer_eof: bool,
    continue_sent: bool,
    pub(crate) dispatched_any: bool,
    /// Event set currently registered with epoll.
    pub(crate) interest: EventSet,
    /// Last time bytes moved in either direction (or the peer closed).
    last_activity: Instant,
    /// Since when the server has part of a request head and waits for the
    /// rest (it is the client's turn).
    head_since: Option<Instant>,
    /// When the current request's head was complete and its body began.
    body_since: Option<Instant>,
    /// Key of the peer in the server's per-peer connection count.
    pub(crate) peer: Option<Peer>,
}

/// Deadlines a request must meet while it is the client's turn.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadlines {
    /// Whole head within this long of its first byte.
    pub(crate) header_timeout: Option<Duration>,
    /// Body bytes per second, averaged from the end of the head...
    pub(crate) min_body_rate: Option<u64>,
    /// ...counted only after this grace period.
    pub(crate) body_rate_grace: Duration,
}

impl Connection {
    pub(crate) fn new(stream: Stream, limits: Limits, spool: Option<Arc<SpoolConfig>>) -> Self {
        Connection {
            stream,
            parser: RequestParser::with_spool(limits, spool),
            in_cap: limits.max_header_bytes + IN_SLACK,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            state: State::Idle,
            close_after_flush: false,
            peer_eof: false,
            continue_sent: false,
            dispatched_any: false,
            interest: EventSet::IN,
            last_activity: Instant::now(),
            head_since: None,
            body_since: None,
            peer: None,
        }
    }

    /// Which deadline the current request has missed, if any (only while
    /// it is the client's turn to send).
    pub(crate) fn missed_deadline(&self, now: Instant, d: &Deadlines) -> Option<String> {
        if !self.can_dispatch() {
            return None;
        }
        if let (Some(limit), Some(since)) = (d.header_timeout, self.head_since) {
            if now.saturating_duration_since(since) > limit {
                return Some(format!(
                    "request header not received within {} s",
                    limit.as_secs_f64()
                ));
            }
        }
        if let (Some(rate), Some(since), Some(got)) = (
            d.min_body_rate,
            self.body_since,
            self.parser.body_progress(),
        ) {
            let elapsed = now.saturating_duration_since(since);
            if let Some(counted) = elapsed.checked_sub(d.body_rate_grace) {
                if (got as f64) < rate as f64 * counted.as_secs_f64() {
                    return Some(format!("request body arrives slower than {rate} bytes/s"));
                }
            }
        }
        None
    }

    /// How long the connection has made no progress while it is the
    /// client's turn (no Later reply or stream outstanding); None otherwise.
    pub(crate) fn stalled_for(&self, now: Instant) -> Option<Duration> {
        (self.state == State::Idle).then(|| now.saturating_duration_since(self.last_activity))
    }

    /// Whether more input should be read now.
    pub(crate) fn wants_read(&self) -> bool {
        self.state != State::Upgrading
            && !self.peer_eof
            && !self.close_after_flush
            && self.inbuf.len() < self.in_cap
    }

    /// The epoll interest this connection needs.
    pub(crate) fn desired_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.wants_read() {
            set |= EventSet::IN;
        }
        if self.pending_out() > 0 {
            set |= EventSet::OUT;
        }
        set
    }

    /// Unsent output bytes.
    pub(crate) fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Reads what is available (bounded) through `scratch`, a buffer shared
    /// by all connections (so no per-read allocation or zero-filling); only
    /// the bytes actually read are kept. Sets the EOF flag when the peer
    /// has shut down its sending side.
    pub(crate) fn read(&mut self, scratch: &mut [u8]) -> Result<(), ConnectionError> {
        let mut total = 0;
        while self.wants_read() && total < READ_BUDGET {
            let want = scratch
                .len()
                .min(self.in_cap.saturating_sub(self.inbuf.len()))
                .max(1);
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => {
                    self.peer_eof = true;
                    self.last_activity = Instant::now();
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    total += n;
                    self.last_activity = Instant::now();
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(ConnectionError::Read(e)),
                },
            }
        }
        Ok(())
    }

    fn can_dispatch(&self) -> bool {
        self.state == State::Idle && !self.close_after_flush && self.pending_out() < OUT_HIGH_WATER
    }

    /// Parses the next complete request from buffered input if the
    /// connection is ready for one. Sends `100 Continue` when the current
    /// request waits for it. Returns the request and how to answer it.
    pub(crate) fn next_request(&mut self) -> Result<Option<(Request, WriteOpts)>, RequestError> {
        if !self.can_dispatch() {
            return Ok(None);
        }
        let (n, parsed) = self.parser.parse(&self.inbuf)?;
        self.inbuf.drain(..n);
        match parsed {
            Parsed::Complete(req) => {
                self.head_since = None;
                self.body_since = None;
                self.continue_sent = false;
                self.dispatched_any = true;
                let opts = WriteOpts {
                    keep_alive: req.keep_alive(),
                    head: req.method == crate::Method::Head,
                    version: req.version,
                };
                Ok(Some((*req, opts)))
            }
            Parsed::Incomplete => {
                // The clocks run from when the server first waits for more
                // of a head (i.e. it has part of one and could dispatch it)
                // or for a body.
                if self.parser.body_progress().is_some() {
                    self.head_since = None;
                    self.body_since.get_or_insert_with(Instant::now);
                } else if !self.inbuf.is_empty() {
                    self.head_since.get_or_insert_with(Instant::now);
                }
                if self.parser.awaiting_body_with_continue()
                    && !self.continue_sent
                    && !self.peer_eof
                {
                    self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    self.continue_sent = true;
                }
                Ok(None)
            }
        }
    }

    /// Queues the response to the request described by `opts`.
    pub(crate) fn start_response(&mut self, resp: &Response, mut opts: WriteOpts) {
        opts.keep_alive &= !resp.wants_close();
        let framing = response::framing_for(resp, &opts);
        response::serialize(resp, &opts, framing, &mut self.out);
        if resp.is_stream() {
            self.state = State::Streaming(opts, framing);
        } else {
            self.state = State::Idle;
            if !opts.keep_alive {
                self.close_after_flush = true;
            }
        }
    }

    /// Queues the raw upgrade response head and stops reading and
    /// dispatching: the connection is about to be handed over.
    pub(crate) fn start_upgrade(&mut self, head: &[u8]) {
        self.out.extend_from_slice(head);
        self.state = State::Upgrading;
    }

    /// Whether [`Connection::start_upgrade`] was called.
    pub(crate) fn is_upgrading(&self) -> bool {
        self.state == State::Upgrading
    }

    /// The socket, its unsent output (earlier pipelined answers and the
    /// upgrade head) and the input read past the upgraded request.
    pub(crate) fn into_parts(mut self) -> (crate::stream::Stream, Vec<u8>, Vec<u8>) {
        let out = self.out.split_off(self.out_pos);
        (self.stream, out, self.inbuf)
    }

    /// Marks the current request as answered later.
    pub(crate) fn wait(&mut self, opts: WriteOpts) {
        self.state = State::Waiting(opts);
    }

    /// Delivers a deferred response; false if none was awaited.
    pub(crate) fn respond_later(&mut self, resp: &Response) -> bool {
        match self.state {
            State::Waiting(opts) => {
                self.start_response(resp, opts);
                true
            }
            _ => false,
        }
    }

    /// Whether a streamed response is in progress.
    pub(crate) fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming(..))
    }

    /// Whether a Later or streamed response is outstanding.
    #[cfg(test)]
    pub(crate) fn is_busy(&self) -> bool {
        self.state != State::Idle
    }

    /// Appends a chunk of the streamed response; false if not streaming.
    pub(crate) fn push_chunk(&mut self, data: &[u8]) -> bool {
        match self.state {
            State::Streaming(_, framing) => {
                response::encode_chunk(framing, data, &mut self.out);
                true
            }
            _ => false,
        }
    }

    /// Ends the streamed response; false if not streaming.
    pub(crate) fn finish_stream(&mut self) -> bool {
        match self.state {
            State::Streaming(opts, framing) => {
                response::encode_end(framing, &mut self.out);
                self.state = State::Idle;
                if !opts.keep_alive || framing == Framing::UntilClose {
                    self.close_after_flush = true;
                }
                true
            }
            _ => false,
        }
    }

    /// Queues an error response generated by the layer and closes the
    /// connection once it is sent. Buffered input is discarded.
    pub(crate) fn fail(&mut self, resp: &Response, version: crate::Version) {
        let opts = WriteOpts {
            keep_alive: false,
            head: false,
            version,
        };
        response::serialize(resp, &opts, Framing::Length, &mut self.out);
        self.state = State::Idle;
        self.close_after_flush = true;
        self.inbuf = Vec::new();
        self.head_since = None;
        self.body_since = None;
    }

    /// Writes buffered output until done or the socket is full.
    pub(crate) fn flush(&mut self) -> Result<(), ConnectionError> {
        while self.out_pos < self.out.len() {
            let rest = &self.out[self.out_pos..];
            // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes
            // and the fd is owned by `self.stream`. MSG_NOSIGNAL avoids
            // SIGPIPE when the peer is gone.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(ConnectionError::Write(e)),
                }
            }
            self.out_pos += n as usize;
            if n > 0 {
                self.last_activity = Instant::now();
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > READ_CHUNK && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Whether the connection is done and should be closed now. A client
    /// that shut down its sending side (EOF) while a streamed response was
    /// going has left: over TCP that is all a closed peer shows until the
    /// server writes again, and a stream (a followed log) may stay silent
    /// for ever, so the stream ends here (the handler's `closed` runs).
    /// A deferred answer is still sent to a half-closed client.
    pub(crate) fn finished(&self) -> bool {
        if self.pending_out() > 0 {
            return false;
        }
        self.close_after_flush
            || (self.peer_eof && matches!(self.state, State::Idle | State::Streaming(..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Version;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(Stream::Unix(a), Limits::default(), None), b)
    }

    fn read(c: &mut Connection) {
        c.read(&mut [0u8; READ_CHUNK]).unwrap();
    }

    fn read_all_available(s: &mut UnixStream) -> String {
        s.set_nonblocking(true).unwrap();
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn later_blocks_pipelined_requests_until_answered() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .unwrap();
        read(&mut c);
        let (req, opts) = c.next_request().unwrap().unwrap();
        assert_eq!(req.path, "/a");
        c.wait(opts);
        assert!(c.is_busy());
        assert!(c.next_request().unwrap().is_none());
        assert!(c.respond_later(&Response::empty(204)));
        assert!(!c.is_busy());
        let (req, _) = c.next_request().unwrap().unwrap();
        assert_eq!(req.path, "/b");
        c.flush().unwrap();
        assert_eq!(
            read_all_available(&mut peer),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
    }

    #[test]
    fn stream_chunks_and_finish() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /logs HTTP/1.1\r\n\r\n").unwrap();
        read(&mut c);
        let (_, opts) = c.next_request().unwrap().unwrap();
        c.start_response(&Response::stream(200, "text/plain"), opts);
        assert!(c.is_streaming());
        assert!(c.push_chunk(b"abc"));
        assert!(c.finish_stream());
        assert!(!c.push_chunk(b"late"));
        c.flush().unwrap();
        let s = read_all_available(&mut peer);
        assert!(
            s.ends_with("Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            "{s}"
        );
        assert!(!c.finished());
    }

    #[test]
    fn a_client_that_closes_during_a_stream_has_left_but_a_deferred_answer_waits() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /logs?follow=true HTTP/1.1\r\n\r\n")
            .unwrap();
        read(&mut c);
        let (_, opts) = c.next_request().unwrap().unwrap();
        c.start_response(&Response::stream(200, "text/plain"), opts);
        c.flush().unwrap();
        assert!(!c.finished());
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        read(&mut c);
        assert!(c.finished(), "a silent stream to a gone client must end");

        let (mut c, mut peer) = pair();
        peer.write_all(b"POST /slow HTTP/1.1\r\n\r\n").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        read(&mut c);
        let (_, opts) = c.next_request().unwrap().unwrap();
        c.wait(opts);
        assert!(!c.finished());
        assert!(c.respond_later(&Response::empty(204)));
        c.flush().unwrap();
        assert!(read_all_available(&mut peer).starts_with("HTTP/1.1 204 "));
        assert!(c.finished());
    }

    #[test]
    fn expect_continue_and_eof_closes() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .unwrap();
        read(&mut c);
        assert!(c.next_request().unwrap().is_none());
        c.flush().unwrap();
        assert_eq!(
            read_all_available(&mut peer),
            "HTTP/1.1 100 Continue\r\n\r\n"
        );
        peer.write_all(b"ok").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        read(&mut c);
        let (req, opts) = c.next_request().unwrap().unwrap();
        assert_eq!(req.body, b"ok");
        c.start_response(&Response::empty(204), opts);
        assert!(!c.finished());
        c.flush().unwrap();
        assert!(c.finished());
        assert_eq!(c.desired_interest(), EventSet::empty());
    }

    const D: Deadlines = Deadlines {
        header_timeout: Some(Duration::from_secs(10)),
        min_body_rate: Some(1000),
        body_rate_grace: Duration::from_secs(5),
    };

    #[test]
    fn header_deadline_runs_from_the_first_head_byte() {
        let (mut c, mut peer) = pair();
        let t0 = Instant::now();
        assert!(c
            .missed_deadline(t0 + Duration::from_secs(100), &D)
            .is_none());
        peer.write_all(b"GET / HT").unwrap();
        read(&mut c);
        assert!(c.next_request().unwrap().is_none());
        assert!(c.missed_deadline(t0 + Duration::from_secs(5), &D).is_none());
        let why = c.missed_deadline(Instant::now() + Duration::from_secs(11), &D);
        assert!(why.unwrap().contains("header"));
        // Completing the head stops the clock.
        peer.write_all(b"TP/1.1\r\n\r\n").unwrap();
        read(&mut c);
        let (_, opts) = c.next_request().unwrap().unwrap();
        c.start_response(&Response::empty(204), opts);
        assert!(c
            .missed_deadline(Instant::now() + Duration::from_secs(100), &D)
            .is_none());
    }

    #[test]
    fn no_header_clock_while_the_server_owes_an_answer() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HT").unwrap();
        read(&mut c);
        let (_, opts) = c.next_request().unwrap().unwrap();
        c.wait(opts);
        assert!(c.next_request().unwrap().is_none());
        assert!(c
            .missed_deadline(Instant::now() + Duration::from_secs(100), &D)
            .is_none());
        // Answered: now the pipelined head's clock starts.
        assert!(c.respond_later(&Response::empty(204)));
        assert!(c.next_request().unwrap().is_none());
        let t = Instant::now();
        assert!(c.missed_deadline(t + Duration::from_secs(5), &D).is_none());
        assert!(c.missed_deadline(t + Duration::from_secs(11), &D).is_some());
    }

    #[test]
    fn minimum_body_rate_after_grace() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        peer.write_all(&[b'a'; 3000]).unwrap();
        read(&mut c);
        assert!(c.next_request().unwrap().is_none());
        let t = Instant::now();
        // 3000 bytes: enough for 3 s past the 5 s grace at 1000 bytes/s.
        assert!(c.missed_deadline(t + Duration::from_secs(4), &D).is_none());
        assert!(c
            .missed_deadline(t + Duration::from_millis(7900), &D)
            .is_none());
        let why = c.missed_deadline(t + Duration::from_secs(9), &D).unwrap();
        assert!(why.contains("1000 bytes/s"), "{why}");
        // The header clock does not apply to a body.
        let no_rate = Deadlines {
            min_body_rate: None,
            ..D
        };
        assert!(c
            .missed_deadline(t + Duration::from_secs(100), &no_rate)
            .is_none());
    }

    #[test]
    fn fail_closes_after_flush() {
        let (mut c, mut peer) = pair();
        c.fail(&Response::fault(400, "nope"), Version::Http11);
        assert!(!c.wants_read());
        c.flush().unwrap();
        assert!(c.finished());
        let s = read_all_available(&mut peer);
        assert!(s.contains("Connection: close"));
    }
}
