//! virtio-vsock (device id 19) with Firecracker's hybrid unix-socket model.
//!
//! - Host-initiated: a host process connects to the unix socket `uds_path`
//!   and writes `CONNECT <port>\n`. The device picks a host-side port P,
//!   sends OP_REQUEST to guest port `<port>` and, once the guest answers
//!   OP_RESPONSE, writes `OK <P>\n` to the host process; then bytes flow.
//! - Guest-initiated: a guest connection to host (CID 2) port P is connected
//!   to the unix socket `<uds_path>_<P>`; OP_RST if that fails.
//! - Flow control: we advertise `CONN_BUF_SIZE` per connection and send
//!   OP_CREDIT_UPDATE once half of it has been forwarded; we never send the
//!   guest more than its `buf_alloc - (rx_cnt - fwd_cnt)`.
//! - Closing: host EOF -> OP_SHUTDOWN (both directions) to the guest, which
//!   answers OP_RST. Guest SHUTDOWN(send) -> half-close of the unix stream
//!   after pending data is written; full SHUTDOWN -> flush, then OP_RST.
//!   OP_RST from the guest drops the connection.
//!
//! Queues: rx 0, tx 1, event 2. The event queue carries one event, the
//! transport reset a restored device sends (see below).
//!
//! A hostile guest can neither freeze nor exhaust the VMM through this
//! device:
//! - Nothing waits. Every host socket is non-blocking, connect included
//!   ([`unix::connect_nonblocking`]): a listener whose accept queue is full
//!   answers `EAGAIN`, which is a refused connection (RST to the guest,
//!   which may try again; the device never retries or waits on its own).
//! - Connections are limited ([`VsockLimits::max_conns`], counting host
//!   clients still sending their CONNECT line): a guest request beyond it
//!   gets an RST, a host client beyond it is accepted and closed at once.
//! - Buffering toward the host is bounded by the credit we advertise
//!   (`CONN_BUF_SIZE` per connection; a guest that sends more is reset) and
//!   by [`VsockLimits::max_buffered`] for the whole device (a packet that
//!   would pass it resets its connection; new requests get RST meanwhile).
//!   A host peer that stops reading stalls only its own connection (its
//!   `fwd_cnt`, hence the guest's credit, stops) and the connection is reset
//!   once it made no progress for [`VsockLimits::stall_timeout`].
//! - Host clients that never finish their CONNECT line, and host-initiated
//!   connections the guest never answers, are dropped after
//!   [`VsockLimits::handshake_timeout`].
//! - Out of file descriptors (`EMFILE`/`ENFILE`): a guest request gets an
//!   RST; the host listener stops being polled until the next timer tick
//!   (it is level-triggered: polling it while accept fails would spin).
//!   Refusals are logged at most once per 10 s with a count.
//!
//! The limits also reserve descriptors: this device holds at most
//! `max_conns` streams plus its listener and a timer, far below the
//! jailer's default of 2048 descriptors, whatever the guest does.
//!
//! Snapshots ([`Persist`]): connections are not saved. A device restored
//! active binds its (possibly new) `uds_path`, takes its (possibly new)
//! `guest_cid` (bumping the config generation when it changed) and puts
//! one `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` in the first buffer of the
//! event queue, with an interrupt, when the event loop first runs it; if
//! the driver had no event buffer posted, the event waits for the next one
//! it posts. The driver then
//! drops its connections and rereads `guest_cid` (virtio 1.2, 5.10.6.6).

pub mod packet;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueOwnedT;
use vmm_sys_util::timerfd::TimerFd;

use self::packet::*;
use self::unix::{connect_nonblocking, is_fd_exhaustion, Refusals};
use super::desc::{DescError, ParsedChain};
use super::persist::{Persist, PersistError, VsockState};
use super::{drain_evt, DeviceBase, VirtioDevice, TYPE_VSOCK};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Receive buffer we advertise per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// `virtio_vsock_event.id` of a transport reset.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Largest payload we accept or send in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Queue size of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Host-side ports for host-initiated connections start here.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Bound on queued control packets (a guest spamming bad packets).
const MAX_CTRL: usize = 4096;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Default [`VsockLimits::max_conns`].
pub const MAX_CONNS: usize = 256;
/// Default [`VsockLimits::max_buffered`].
pub const MAX_BUFFERED: usize = 16 << 20;
/// Default [`VsockLimits::stall_timeout`].
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`VsockLimits::handshake_timeout`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Host clients accepted per listener event (the rest on the next round,
/// so other devices and the API get their turn).
const ACCEPT_BATCH: usize = 64;
/// At most one log line per this interval for each kind of refusal.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

use crate::virtio::{TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};
const TOKEN_RXQ: u32 = TOKEN_QUEUE_BASE + RXQ as u32;
const TOKEN_TXQ: u32 = TOKEN_QUEUE_BASE + TXQ as u32;
const TOKEN_EVQ: u32 = TOKEN_QUEUE_BASE + EVQ as u32;
const TOKEN_LISTENER: u32 = 4;
const TOKEN_TIMER: u32 = 5;
/// Stream fds use `TOKEN_FD_BASE + fd`.
const TOKEN_FD_BASE: u32 = 16;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host unix socket cannot be bound.
    #[error("binding {path}: {err}")]
    Bind {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// The guest CID is reserved (below 3) or too large.
    #[error("invalid guest CID {0} (must be >= 3)")]
    BadCid(u64),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// A timerfd could not be created or armed.
    #[error("timerfd: {0}")]
    Timer(std::io::Error),
    /// A saved state cannot be restored.
    #[error("restoring vsock state: {0}")]
    Restore(#[from] PersistError),
}

/// What one vsock device may hold, whatever the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockLimits {
    /// Connections: established, handshaking, and host clients that have
    /// not sent their CONNECT line yet (one host descriptor each).
    pub max_conns: usize,
    /// Bytes buffered toward host sockets, all connections together.
    pub max_buffered: usize,
    /// A connection holding bytes its host peer takes none of for this
    /// long is reset.
    pub stall_timeout: Duration,
    /// Host clients without a CONNECT line, and host-initiated connections
    /// the guest does not answer, are dropped after this.
    pub handshake_timeout: Duration,
}

impl Default for VsockLimits {
    fn default() -> Self {
        Self {
            max_conns: MAX_CONNS,
            max_buffered: MAX_BUFFERED,
            stall_timeout: STALL_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

impl VsockLimits {
    /// How often the device looks for stalled and half-open connections
    /// (and resumes a listener paused for lack of descriptors).
    fn tick(&self) -> Duration {
        (self.stall_timeout.min(self.handshake_timeout) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// How the VMM describes the vsock device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VsockConfig {
    /// The device id (for messages).
    pub vsock_id: String,
    /// The guest's context id.
    pub guest_cid: u64,
    /// Host-side unix socket path (must not exist).
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's OP_RESPONSE.
    LocalInit,
    Established,
}

/// (host-side port, guest port)
type Key = (u32, u32);

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes written to the unix stream (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Data for the host not written yet.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (`OK <port>\n`), not the
    /// guest's, so they do not count in `fwd_cnt`.
    local_bytes: usize,
    /// The stream may have data to read (edge-triggered).
    readable: bool,
    /// The host closed its end; SHUTDOWN sent to the guest.
    host_eof: bool,
    /// The guest will send no more: half-close after flushing.
    peer_shut_send: bool,
    write_shut: bool,
    /// Full shutdown from the guest: RST once flushed.
    closing: bool,
    /// When the connection was made (for the handshake timeout).
    since: Instant,
    /// Last time `to_host` was empty or the host took bytes from it.
    last_progress: Instant,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        let now = Instant::now();
        Self {
            since: now,
            last_progress: now,
            stream,
            state,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            to_host: VecDeque::new(),
            local_bytes: 0,
            readable: false,
            host_eof: false,
            peer_shut_send: false,
            write_shut: false,
            closing: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes held for the host (our `OK <port>` line excluded).
    fn guest_bytes_held(&self) -> usize {
        self.to_host.len() - self.local_bytes
    }
}

/// A host client that has not sent its `CONNECT <port>\n` line yet.
#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// What the device refused, for rate-limited log lines.
#[derive(Debug)]
struct RefusalLog {
    conn_limit: Refusals,
    memory: Refusals,
    fds: Refusals,
    stalled: Refusals,
}

impl RefusalLog {
    fn new() -> Self {
        Self {
            conn_limit: Refusals::new(REFUSAL_LOG_INTERVAL),
            memory: Refusals::new(REFUSAL_LOG_INTERVAL),
            fds: Refusals::new(REFUSAL_LOG_INTERVAL),
            stalled: Refusals::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    base: DeviceBase,
    config: VsockConfig,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    fd_keys: HashMap<RawFd, Key>,
    /// Host clients that have not sent their CONNECT line yet.
    pending: HashMap<RawFd, PendingClient>,
    ctrl: VecDeque<Header>,
    next_port: u32,
    /// Streams to register with the event loop.
    new_fds: Vec<RawFd>,
    /// Streams to unregister, then close.
    graveyard: Vec<UnixStream>,
    limits: VsockLimits,
    /// Periodic tick: stalled connections, handshakes, the paused listener.
    timer: TimerFd,
    /// The listener is not polled (accept ran out of descriptors) until
    /// the next tick.
    listener_paused: bool,
    /// The listener's registration must change to match `listener_paused`.
    listener_update: bool,
    refusals: RefusalLog,
    /// A transport reset event waits for an event-queue buffer.
    pending_reset: bool,
}

impl Vsock {
    /// Binds the host socket `config.uds_path`, with the default limits.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        Self::with_limits(config, VsockLimits::default())
    }

    /// Binds the host socket `config.uds_path`.
    pub fn with_limits(config: VsockConfig, limits: VsockLimits) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(config.guest_cid));
        }
        let bind_err = |err| VsockError::Bind {
            path: config.uds_path.clone(),
            err,
        };
        let listener = UnixListener::bind(&config.uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let sys = |e: vmm_sys_util::errno::Error| {
            VsockError::Timer(std::io::Error::from_raw_os_error(e.errno()))
        };
        let mut timer = TimerFd::new().map_err(sys)?;
        // A blocking timerfd could stall the event loop on a spurious wakeup.
        crate::virtio::rate_limiter::set_nonblocking(timer.as_raw_fd())
            .map_err(VsockError::Timer)?;
        timer
            .reset(limits.tick(), Some(limits.tick()))
            .map_err(sys)?;
        Ok(Self {
            base: DeviceBase::new("virtio-vsock", 0, &[QUEUE_SIZE; 3])
                .map_err(VsockError::EventFd)?,
            config,
            listener,
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_port: LOCAL_PORT_BASE,
            new_fds: Vec::new(),
            graveyard: Vec::new(),
            limits,
            timer,
            listener_paused: false,
            listener_update: false,
            refusals: RefusalLog::new(),
            pending_reset: false,
        })
    }

    /// Puts the pending transport reset event in the next event-queue
    /// buffer and interrupts the guest; if there is no buffer, it stays
    /// pending until the driver posts one. Returns whether it was sent.
    fn send_transport_reset(&mut self) -> bool {
        if !self.pending_reset {
            return false;
        }
        let Some(mem) = self.base.mem.clone() else {
            return false;
        };
        let Some((head, parsed)) = self.base.pop_parsed(EVQ) else {
            return false;
        };
        let id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let len = match parsed {
            Ok(c) if c.writable_len() >= id.len() as u64 => match c.write_at(&mem, 0, &id) {
                Ok(()) => {
                    self.pending_reset = false;
                    id.len() as u32
                }
                Err(e) => {
                    log::warn!("virtio-vsock: writing the reset event: {e}");
                    0
                }
            },
            _ => {
                log::warn!("virtio-vsock: bad event buffer {head}");
                0
            }
        };
        self.base.add_used(EVQ, head, len);
        self.base.notify_used(EVQ);
        !self.pending_reset
    }

    /// Host descriptors in use for connections (limited by `max_conns`).
    fn conn_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Bytes held for host sockets, all connections together.
    fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len()).sum()
    }

    /// Whether a new connection may be made now; logs (rate-limited) why
    /// not.
    fn admit_new(&mut self) -> bool {
        let now = Instant::now();
        if self.conn_count() >= self.limits.max_conns {
            if let Some(n) = self.refusals.conn_limit.note(now) {
                log::warn!(
                    "virtio-vsock: {n} connection(s) refused: {} connections is the limit",
                    self.limits.max_conns
                );
            }
            return false;
        }
        if self.buffered() >= self.limits.max_buffered {
            if let Some(n) = self.refusals.memory.note(now) {
                log::warn!(
                    "virtio-vsock: {n} connection(s) refused: {} bytes buffered for host sockets",
                    self.limits.max_buffered
                );
            }
            return false;
        }
        true
    }

    fn note_fd_exhaustion(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if let Some(n) = self.refusals.fds.note(Instant::now()) {
            log::warn!("virtio-vsock: out of file descriptors ({what}: {e}); {n} refused");
        }
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    fn cid(&self) -> u64 {
        self.config.guest_cid
    }

    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() < MAX_CTRL {
            self.ctrl.push_back(h);
        } else {
            log::warn!("virtio-vsock: control queue full, dropping op {}", h.op);
        }
    }

    /// A header from host port `key.0` to guest port `key.1`.
    fn hdr(&self, key: Key, op: u16) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid(),
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt,
        }
    }

    fn kill(&mut self, key: Key, send_rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.fd_keys.remove(&c.stream.as_raw_fd());
            self.graveyard.push(c.stream);
        }
        if send_rst {
            let h = self.hdr(key, OP_RST);
            self.push_ctrl(h);
        }
    }

    /// Writes pending data to the host; handles half-close/close and credit.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.last_progress = Instant::now();
                    let ours = n.min(c.local_bytes);
                    c.local_bytes -= ours;
                    c.fwd_cnt += Wrapping((n - ours) as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill(key, true);
                    return;
                }
            }
        }
        if c.to_host.is_empty() {
            if c.closing {
                self.kill(key, true);
                return;
            }
            if c.peer_shut_send && !c.write_shut {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                c.write_shut = true;
            }
        }
        if c.state == State::Established && (c.fwd_cnt - c.last_fwd_cnt_sent).0 >= CONN_BUF_SIZE / 2
        {
            c.last_fwd_cnt_sent = c.fwd_cnt;
            let h = self.hdr(key, OP_CREDIT_UPDATE);
            self.push_ctrl(h);
        }
    }

    /// A guest request for host port `h.dst_port`: a non-blocking connect
    /// to `<uds_path>_<port>`; RESPONSE if it connected, RST if not (nobody
    /// listening, a full accept queue, no descriptors, over the limits).
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if !self.admit_new() {
            let r = self.hdr(key, OP_RST);
            self.push_ctrl(r);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.config.uds_path.display(), h.dst_port));
        match connect_nonblocking(&path) {
            Ok(s) => {
                let fd = s.as_raw_fd();
                let mut c = Conn::new(s, State::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
                c.readable = true;
                self.conns.insert(key, c);
                self.fd_keys.insert(fd, key);
                self.new_fds.push(fd);
                let r = self.hdr(key, OP_RESPONSE);
                self.push_ctrl(r);
            }
            Err(e) => {
                if e.is_fd_exhaustion() {
                    self.note_fd_exhaustion("connect", &e);
                } else {
                    log::debug!("virtio-vsock: connecting {}: {e}", path.display());
                }
                let r = self.hdr(key, OP_RST);
                self.push_ctrl(r);
            }
        }
    }

    fn handle_pkt(&mut self, h: Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM || h.src_cid != self.cid() || h.dst_cid != HOST_CID {
            log::warn!("virtio-vsock: bad packet {h:?}");
            if h.op != OP_RST {
                let mut r = self.hdr(key, OP_RST);
                r.dst_cid = h.src_cid;
                self.push_ctrl(r);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => {
                    let r = self.hdr(key, OP_RST);
                    self.push_ctrl(r);
                }
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match (h.op, c.state) {
            (OP_RESPONSE, State::LocalInit) => {
                c.state = State::Established;
                let line = format!("OK {}\n", key.0);
                c.local_bytes = line.len();
                c.to_host.extend(line.as_bytes());
                c.readable = true;
                self.flush(key);
            }
            (OP_RW, State::Established) => {
                // Never hold more than the credit we advertised.
                if c.peer_shut_send || c.guest_bytes_held() + payload.len() > CONN_BUF_SIZE as usize
                {
                    log::warn!("virtio-vsock: guest overran its credit on {key:?}");
                    self.kill(key, true);
                    return;
                }
                if c.to_host.is_empty() {
                    c.last_progress = Instant::now();
                }
                c.to_host.extend(payload);
                self.flush(key);
                let over = self.buffered() > self.limits.max_buffered;
                if over && self.conns.get(&key).is_some_and(|c| !c.to_host.is_empty()) {
                    if let Some(n) = self.refusals.memory.note(Instant::now()) {
                        log::warn!(
                            "virtio-vsock: {n} connection(s) reset: over {} bytes buffered for host sockets",
                            self.limits.max_buffered
                        );
                    }
                    self.kill(key, true);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => {
                c.last_fwd_cnt_sent = c.fwd_cnt;
                let r = self.hdr(key, OP_CREDIT_UPDATE);
                self.push_ctrl(r);
            }
            (OP_SHUTDOWN, _) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.peer_shut_send = true;
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    c.closing = true;
                }
                self.flush(key);
            }
            (OP_RST, _) => self.kill(key, false),
            _ => {
                log::warn!("virtio-vsock: unexpected op {} on {key:?}", h.op);
                self.kill(key, true);
            }
        }
    }

    /// Handles the guest's tx queue.
    fn process_tx(&mut self) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        let mut used = false;
        while let Some((head, parsed)) = self.base.pop_parsed(TXQ) {
            // The chain is read whole before it is given back: once it is
            // in the used ring the guest may reuse its buffers at once.
            let packet = Self::read_tx(&mem, parsed);
            self.base.add_used(TXQ, head, 0);
            used = true;
            if let Some((h, payload)) = packet {
                self.handle_pkt(h, &payload);
            }
        }
        if used {
            self.base.notify_used(TXQ);
        }
    }

    /// A tx chain's header and (for OP_RW) payload; None for a bad chain.
    fn read_tx(
        mem: &GuestMemoryMmap,
        parsed: Result<ParsedChain, DescError>,
    ) -> Option<(Header, Vec<u8>)> {
        let c = match parsed {
            Ok(c) => c,
            Err(e) => {
                log::warn!("virtio-vsock: bad tx chain: {e}");
                return None;
            }
        };
        let mut hb = [0u8; HDR_LEN];
        if c.read_at(mem, 0, &mut hb).is_err() {
            log::warn!("virtio-vsock: tx chain shorter than a header");
            return None;
        }
        let h = Header::from_bytes(&hb);
        let mut payload = Vec::new();
        if h.op == OP_RW {
            let len = h.len as usize;
            if len > MAX_PAYLOAD || (len as u64) > c.readable_len() - HDR_LEN as u64 {
                log::warn!("virtio-vsock: bad payload length {len}");
                return None;
            }
            payload.resize(len, 0);
            c.read_at(mem, HDR_LEN as u64, &mut payload).ok()?;
        }
        Some((h, payload))
    }

    /// A connection with data for the guest and credit to send it.
    fn pick_readable(&self) -> Option<Key> {
        self.conns
            .iter()
            .find(|(_, c)| {
                c.state == State::Established && c.readable && !c.host_eof && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
    }

    /// Fills the guest's rx queue with control packets and stream data.
    fn process_rx(&mut self) {
        let Some(mem) = self.base.mem.clone() else {
            return;
        };
        let mut used = false;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            let data_key = if self.ctrl.is_empty() {
                match self.pick_readable() {
                    Some(k) => Some(k),
                    None => break,
                }
            } else {
                None
            };
            let Some((head, parsed)) = self.base.pop_parsed(RXQ) else {
                break;
            };
            let chain = match parsed {
                Ok(c) if c.writable_len() >= HDR_LEN as u64 => c,
                _ => {
                    log::warn!("virtio-vsock: bad rx chain {head}");
                    self.base.add_used(RXQ, head, 0);
                    used = true;
                    continue;
                }
            };
            let (hdr, n) = match data_key {
                None => match self.ctrl.pop_front() {
                    Some(h) => (h, 0),
                    None => break,
                },
                Some(key) => {
                    let Some(c) = self.conns.get_mut(&key) else {
                        self.base.queues[RXQ].go_to_previous_position();
                        continue;
                    };
                    let room =
                        (chain.writable_len() - HDR_LEN as u64).min(MAX_PAYLOAD as u64) as usize;
                    let max = room.min(c.peer_credit() as usize);
                    match c.stream.read(&mut buf[..max]) {
                        Ok(0) if max > 0 => {
                            c.host_eof = true;
                            c.readable = false;
                            let mut h = self.hdr(key, OP_SHUTDOWN);
                            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                            (h, 0)
                        }
                        Ok(n) => {
                            c.rx_cnt += Wrapping(n as u32);
                            c.last_fwd_cnt_sent = c.fwd_cnt;
                            let mut h = self.hdr(key, OP_RW);
                            h.len = n as u32;
                            (h, n)
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            c.readable = false;
                            self.base.queues[RXQ].go_to_previous_position();
                            continue;
                        }
                        Err(_) => {
                            self.base.queues[RXQ].go_to_previous_position();
                            self.kill(key, true);
                            continue;
                        }
                    }
                }
            };
            let ok = chain.write_at(&mem, 0, &hdr.to_bytes()).is_ok()
                && chain.write_at(&mem, HDR_LEN as u64, &buf[..n]).is_ok();
            let len = if ok { (HDR_LEN + n) as u32 } else { 0 };
            self.base.add_used(RXQ, head, len);
            used = true;
        }
        if used {
            self.base.notify_used(RXQ);
        }
    }

    /// Accepts host clients (a batch per event; the listener is
    /// level-triggered). Beyond the limits a client is closed at once;
    /// without descriptors the listener is paused until the next tick.
    fn accept_all(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if !self.base.is_active() || s.set_nonblocking(true).is_err() {
                        continue; // dropped: nobody to connect to
                    }
                    if !self.admit_new() {
                        continue; // dropped: over the limits
                    }
                    let fd = s.as_raw_fd();
                    self.pending.insert(
                        fd,
                        PendingClient {
                            stream: s,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                    self.new_fds.push(fd);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: the pending client stays queued
                    // and the level-triggered listener stays readable, so
                    // stop polling it for a tick instead of spinning.
                    if is_fd_exhaustion(&e) {
                        self.note_fd_exhaustion("accept", &e);
                    } else {
                        log::warn!("virtio-vsock: accept: {e}");
                    }
                    self.listener_paused = true;
                    self.listener_update = true;
                    return;
                }
            }
        }
    }

    /// Reads a pending host client's `CONNECT <port>\n` byte by byte (so no
    /// data after it is consumed).
    fn read_connect(&mut self, fd: RawFd) {
        let Some(PendingClient {
            stream: s, line, ..
        }) = self.pending.get_mut(&fd)
        else {
            return;
        };
        let mut b = [0u8; 1];
        let done = loop {
            match s.read(&mut b) {
                Ok(1) if b[0] == b'\n' => break Some(true),
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(b[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => break Some(false),
            }
        };
        let Some(ok) = done else {
            return;
        };
        let Some(PendingClient {
            stream: s, line, ..
        }) = self.pending.remove(&fd)
        else {
            return;
        };
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        match (ok && self.base.is_active(), port) {
            (true, Some(port)) => {
                let key = loop {
                    let p = self.next_port;
                    self.next_port = self.next_port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
                    if !self.conns.contains_key(&(p, port)) {
                        break (p, port);
                    }
                };
                self.conns.insert(key, Conn::new(s, State::LocalInit));
                self.fd_keys.insert(fd, key);
                let h = self.hdr(key, OP_REQUEST);
                self.push_ctrl(h);
            }
            _ => {
                log::warn!("virtio-vsock: bad CONNECT line from host client");
                self.graveyard.push(s);
            }
        }
    }

    fn stream_event(&mut self, fd: RawFd, ev: EventSet) {
        if self.pending.contains_key(&fd) {
            self.read_connect(fd);
            return;
        }
        let Some(&key) = self.fd_keys.get(&fd) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&key) {
            if ev.intersects(
                EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
            ) {
                c.readable = true;
            }
        }
        if ev.contains(EventSet::OUT) {
            self.flush(key);
        }
    }

    /// The periodic tick: resets connections whose host peer stopped
    /// reading, drops handshakes that did not finish, resumes the listener.
    fn on_tick(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from our own
        // non-blocking timerfd.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        if self.listener_paused {
            self.listener_paused = false;
            self.listener_update = true;
        }
        let now = Instant::now();
        let late = |since: Instant, limit: Duration| now.saturating_duration_since(since) > limit;
        let stalled: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.to_host.is_empty() && late(c.last_progress, self.limits.stall_timeout)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stalled {
            if let Some(n) = self.refusals.stalled.note(now) {
                log::warn!(
                    "virtio-vsock: {n} connection(s) reset: the host peer read nothing for {:?}",
                    self.limits.stall_timeout
                );
            }
            self.kill(key, true);
        }
        let unanswered: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::LocalInit && late(c.since, self.limits.handshake_timeout)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in unanswered {
            log::debug!("virtio-vsock: the guest did not answer the request on {key:?}");
            self.kill(key, true);
        }
        let silent: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| late(p.since, self.limits.handshake_timeout))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in silent {
            if let Some(p) = self.pending.remove(&fd) {
                self.graveyard.push(p.stream);
            }
        }
    }

    /// Applies deferred event-loop registrations.
    fn sync_fds(&mut self, ops: &mut EventOps) {
        if std::mem::take(&mut self.listener_update) {
            let ev = if self.listener_paused {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            if let Err(e) = ops.modify(Events::with_data(&self.listener, TOKEN_LISTENER, ev)) {
                log::error!("virtio-vsock: (un)pausing the listener: {e:?}");
            }
        }
        for fd in std::mem::take(&mut self.new_fds) {
            if self.fd_keys.contains_key(&fd) || self.pending.contains_key(&fd) {
                let token = TOKEN_FD_BASE + fd as u32;
                let ev = EventSet::IN
                    | EventSet::OUT
                    | EventSet::READ_HANG_UP
                    | EventSet::EDGE_TRIGGERED;
                if let Err(e) = ops.add(Events::with_data_raw(fd, token, ev)) {
                    log::error!("virtio-vsock: registering stream: {e:?}");
                }
            }
        }
        for s in std::mem::take(&mut self.graveyard) {
            let _ = ops.remove(Events::empty(&s));
        }
    }

    fn register(&mut self, ops: &mut EventOps) {
        if !self.base.register_queue_events(ops) {
            return;
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTENER,
            EventSet::IN,
        )) {
            log::error!("virtio-vsock: registering events: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            log::error!("virtio-vsock: registering the timer: {e:?}");
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn config_bytes(&self) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        self.cid().to_le_bytes().to_vec()
    }
    fn on_reset(&mut self) {
        // streams are closed by the event loop once unregistered
        for (_, c) in self.conns.drain() {
            self.graveyard.push(c.stream);
        }
        for (_, p) in self.pending.drain() {
            self.graveyard.push(p.stream);
        }
        self.fd_keys.clear();
        self.ctrl.clear();
        self.pending_reset = false;
    }
}

impl Persist for Vsock {
    type Config = VsockConfig;
    type State = VsockState;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            base: self.base.save(),
            cid: self.cid(),
        }
    }

    /// Binds `config.uds_path` and uses `config.guest_cid` (a load may have
    /// overridden both); sends the transport reset if the device was
    /// active.
    fn restore(
        config: VsockConfig,
        state: &VsockState,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, VsockError> {
        Self::restore_with_limits(config, state, mem, VsockLimits::default())
    }
}

impl Vsock {
    /// [`Persist::restore`] with other limits.
    pub fn restore_with_limits(
        config: VsockConfig,
        state: &VsockState,
        mem: &GuestMemoryMmap,
        limits: VsockLimits,
    ) -> Result<Self, VsockError> {
        if state.cid < 3 || state.cid > u64::from(u32::MAX) {
            return Err(PersistError::Field {
                device: "virtio-vsock",
                what: format!("saved guest CID {} is out of range", state.cid),
            }
            .into());
        }
        let mut v = Self::with_limits(config, limits)?;
        v.base.restore(&state.base, mem)?;
        if v.cid() != state.cid {
            // Reread by the driver after the reset; no interrupt of its own.
            v.base.config_generation = v.base.config_generation.wrapping_add(1);
        }
        // Sent from the event loop when it handles the activation, once
        // the whole VM (its interrupt controller included) is restored.
        v.pending_reset = v.base.is_active();
        Ok(v)
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if self.base.watch_activation(ops) {
            self.register(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                if self.base.on_activation() {
                    self.register(ops);
                    self.send_transport_reset();
                    // A restored device may find packets the guest queued
                    // before the snapshot.
                    self.process_tx();
                }
            }
            TOKEN_RXQ => drain_evt(&self.base.queue_evts[RXQ]),
            TOKEN_TXQ => {
                drain_evt(&self.base.queue_evts[TXQ]);
                self.process_tx();
            }
            TOKEN_EVQ => {
                drain_evt(&self.base.queue_evts[EVQ]);
                self.send_transport_reset();
            }
            TOKEN_LISTENER => self.accept_all(),
            TOKEN_TIMER => self.on_tick(),
            t if t >= TOKEN_FD_BASE => {
                self.stream_event((t - TOKEN_FD_BASE) as RawFd, events.event_set())
            }
            t => log::warn!("virtio-vsock: unexpected event {t}"),
        }
        self.process_rx();
        self.sync_fds(ops);
    }
}

#[cfg(test)]
mod tests;
