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
//! Queues: rx 0, tx 1, event 2 (the event queue is never used).
//! Not done: timeouts for connections the guest never answers, and the
//! TRANSPORT_RESET event (only needed for snapshots).

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueOwnedT;

use self::packet::*;
use super::{drain_evt, DeviceBase, VirtioDevice, TYPE_VSOCK};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Receive buffer we advertise per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
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

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

use crate::virtio::{TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};
const TOKEN_RXQ: u32 = TOKEN_QUEUE_BASE + RXQ as u32;
const TOKEN_TXQ: u32 = TOKEN_QUEUE_BASE + TXQ as u32;
const TOKEN_EVQ: u32 = TOKEN_QUEUE_BASE + EVQ as u32;
const TOKEN_LISTENER: u32 = 4;
/// Stream fds use `TOKEN_FD_BASE + fd`.
const TOKEN_FD_BASE: u32 = 16;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("binding {path}: {err}")]
    Bind { path: PathBuf, err: std::io::Error },
    #[error("invalid guest CID {0} (must be >= 3)")]
    BadCid(u64),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// How the VMM describes the vsock device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VsockConfig {
    pub vsock_id: String,
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
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
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
    pending: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    ctrl: VecDeque<Header>,
    next_port: u32,
    /// Streams to register with the event loop.
    new_fds: Vec<RawFd>,
    /// Streams to unregister, then close.
    graveyard: Vec<UnixStream>,
}

impl Vsock {
    /// Binds the host socket `config.uds_path`.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(config.guest_cid));
        }
        let bind_err = |err| VsockError::Bind {
            path: config.uds_path.clone(),
            err,
        };
        let listener = UnixListener::bind(&config.uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
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
        })
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

    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        let path = format!("{}_{}", self.config.uds_path.display(), h.dst_port);
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s));
        match stream {
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
                log::debug!("virtio-vsock: connecting {path}: {e}");
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
                if c.peer_shut_send || c.to_host.len() + payload.len() > CONN_BUF_SIZE as usize {
                    log::warn!("virtio-vsock: guest overran its credit on {key:?}");
                    self.kill(key, true);
                    return;
                }
                c.to_host.extend(payload);
                self.flush(key);
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
            self.base.add_used(TXQ, head, 0);
            used = true;
            let c = match parsed {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("virtio-vsock: bad tx chain: {e}");
                    continue;
                }
            };
            let mut hb = [0u8; HDR_LEN];
            if c.read_at(&mem, 0, &mut hb).is_err() {
                log::warn!("virtio-vsock: tx chain shorter than a header");
                continue;
            }
            let h = Header::from_bytes(&hb);
            let mut payload = Vec::new();
            if h.op == OP_RW {
                let len = h.len as usize;
                if len > MAX_PAYLOAD || (len as u64) > c.readable_len() - HDR_LEN as u64 {
                    log::warn!("virtio-vsock: bad payload length {len}");
                    continue;
                }
                payload.resize(len, 0);
                if c.read_at(&mem, HDR_LEN as u64, &mut payload).is_err() {
                    continue;
                }
            }
            self.handle_pkt(h, &payload);
        }
        if used {
            self.base.notify_used(TXQ);
        }
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

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if !self.base.is_active() || s.set_nonblocking(true).is_err() {
                        continue; // dropped: nobody to connect to
                    }
                    let fd = s.as_raw_fd();
                    self.pending.insert(fd, (s, Vec::new()));
                    self.new_fds.push(fd);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a pending host client's `CONNECT <port>\n` byte by byte (so no
    /// data after it is consumed).
    fn read_connect(&mut self, fd: RawFd) {
        let Some((s, line)) = self.pending.get_mut(&fd) else {
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
        let Some((s, line)) = self.pending.remove(&fd) else {
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

    /// Applies deferred event-loop registrations.
    fn sync_fds(&mut self, ops: &mut EventOps) {
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
        for (_, (s, _)) in self.pending.drain() {
            self.graveyard.push(s);
        }
        self.fd_keys.clear();
        self.ctrl.clear();
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
                }
            }
            TOKEN_RXQ => drain_evt(&self.base.queue_evts[RXQ]),
            TOKEN_TXQ => {
                drain_evt(&self.base.queue_evts[TXQ]);
                self.process_tx();
            }
            TOKEN_EVQ => drain_evt(&self.base.queue_evts[EVQ]),
            TOKEN_LISTENER => self.accept_all(),
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
