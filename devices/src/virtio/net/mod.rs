//! virtio-net with a TAP backend.
//!
//! Two queues (rx 0, tx 1), no offloads, no mergeable rx buffers. Every
//! frame on both sides is a 12-byte `virtio_net_hdr_v1` followed by the
//! Ethernet frame; the TAP is set to the same vnet header size, so frames
//! pass through unchanged (rx sets `num_buffers = 1`).
//!
//! rx: the TAP fd is edge-triggered; on readiness, on rx-queue kicks and on
//! rx rate-limiter wakeups the device reads frames while the guest has
//! buffers. A frame read while no buffer is available is kept until one is.
//! Frames bigger than the guest buffer are dropped. The device itself
//! never holds more than that one frame: what the guest does not take stays
//! in the TAP's kernel queue, which the kernel bounds (and drops beyond).
//! tx: on tx-queue kicks each chain is sent as one frame.
//!
//! MMDS: an interface given an [`MmdsStack`] ([`Net::set_mmds`]) hands it
//! every frame the guest sends first; frames for the MMDS address are
//! answered inside the VMM and never reach the TAP, and the answers are
//! delivered to the guest ahead of TAP traffic (not charged to the rx rate
//! limiter, as Firecracker does).
//!
//! Neither direction may keep the VMM thread: one pass moves at most
//! [`PASS_FRAMES`] frames (a guest that keeps its tx ring full, or keeps
//! reposting rx buffers while the host floods the TAP), then signals the
//! queue's own eventfd and yields to the event loop; the rest follows on the
//! next round. Before activation (or after a reset) frames arriving on the
//! TAP are drained the same way, at most [`PASS_FRAMES`] per event.

mod tap;

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::QueueOwnedT;

pub use tap::Tap;

use crate::mmds::stack::MmdsStack;

use super::metrics::NetMetrics;
use super::persist::{NetState, Persist, PersistError};
use super::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use super::{drain_evt, DeviceBase, VirtioDevice, TYPE_NET};

/// virtio_net_hdr_v1 length.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame we move (vnet header + 64 KiB).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Frames one pass over a queue moves before it yields to the event loop:
/// at most 64 frames of [`MAX_FRAME`] bytes, about 4 MiB of copying.
pub const PASS_FRAMES: u32 = 64;
/// Feature: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: the config space advises an MTU.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;

const RX: usize = 0;
const TX: usize = 1;

use crate::virtio::{TOKEN_ACTIVATE, TOKEN_QUEUE_BASE};
const TOKEN_RX_QUEUE: u32 = TOKEN_QUEUE_BASE + RX as u32;
const TOKEN_TX_QUEUE: u32 = TOKEN_QUEUE_BASE + TX as u32;
const TOKEN_BACKEND: u32 = 3;
const TOKEN_RX_LIMITER: u32 = 4;
const TOKEN_TX_LIMITER: u32 = 5;

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name is empty, too long or has bad characters.
    #[error("invalid tap name {0:?}")]
    BadTapName(String),
    /// `/dev/net/tun` (or `/dev/macvtap/<name>`) cannot be opened.
    #[error("opening {0}: {1}")]
    TapOpen(std::path::PathBuf, std::io::Error),
    /// Attaching to the TAP (TUNSETIFF and offload settings) failed.
    #[error("configuring tap: {0}")]
    TapSetup(std::io::Error),
    /// The MAC address cannot be parsed.
    #[error("invalid MAC address {0:?}")]
    BadMac(String),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The rate limiter could not be set up.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
    /// A saved state cannot be restored.
    #[error("restoring interface state: {0}")]
    Restore(#[from] PersistError),
}

/// How the VMM describes an interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface id (for messages).
    pub iface_id: String,
    /// TAP interface name on the host.
    pub host_dev_name: String,
    /// Offered with VIRTIO_NET_F_MAC when set.
    pub guest_mac: Option<[u8; 6]>,
    /// Limits on traffic toward the guest.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on traffic from the guest.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// Advised to the guest with VIRTIO_NET_F_MTU when set (68 to 65535;
    /// frames of up to [`MAX_FRAME`] are carried whatever it is).
    pub mtu: Option<u16>,
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Formats a MAC as "aa:bb:cc:dd:ee:ff".
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A frame source/sink: each read/write is one vnet header + frame.
/// Must be non-blocking.
pub trait NetBackend: AsRawFd + Send + std::fmt::Debug {
    /// Reads one header + frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one header + frame; `WouldBlock` when the backend is full.
    fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize>;
}

/// A datagram socket as backend (tests, or a userspace switch). Set it
/// non-blocking before use.
impl NetBackend for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.recv(buf)
    }
    fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send(buf)
    }
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    base: DeviceBase,
    config: NetConfig,
    backend: Box<dyn NetBackend>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` waiting for a guest buffer.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    mmds: Option<MmdsStack>,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// Opens the TAP `config.host_dev_name`.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.host_dev_name)?;
        Self::with_backend(config, Box::new(tap))
    }

    /// Uses `backend` instead of a TAP.
    pub fn with_backend(config: NetConfig, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        let mut features = 0;
        if config.guest_mac.is_some() {
            features |= VIRTIO_NET_F_MAC;
        }
        if config.mtu.is_some() {
            features |= VIRTIO_NET_F_MTU;
        }
        Ok(Self {
            base: DeviceBase::new("virtio-net", features, &[QUEUE_SIZE, QUEUE_SIZE])
                .map_err(NetError::EventFd)?,
            rx_limiter: RateLimiter::new(&config.rx_rate_limiter.unwrap_or_default())?,
            tx_limiter: RateLimiter::new(&config.tx_rate_limiter.unwrap_or_default())?,
            config,
            backend,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME],
            mmds: None,
            metrics: Arc::default(),
        })
    }

    /// Answers MMDS on this interface with `stack`.
    pub fn set_mmds(&mut self, stack: MmdsStack) {
        self.mmds = Some(stack);
    }

    /// The interface's MMDS stack, if any.
    pub fn mmds(&self) -> Option<&MmdsStack> {
        self.mmds.as_ref()
    }

    /// Puts the next MMDS frame for the guest into `rx_buf` behind a zero
    /// vnet header; its length, or `None`.
    fn take_mmds_frame(&mut self) -> Option<usize> {
        let f = self.mmds.as_mut()?.pop_rx()?;
        let n = VNET_HDR_LEN + f.len();
        if n > self.rx_buf.len() {
            return None;
        }
        self.rx_buf[..VNET_HDR_LEN].fill(0);
        self.rx_buf[VNET_HDR_LEN..n].copy_from_slice(&f);
        Some(n)
    }

    /// The device's counters (shared with the metrics writer).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The interface's configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Replaces the rate limiters (API PATCH); `None` leaves one unchanged.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update(rx);
            self.config.rx_rate_limiter = Some(*rx);
        }
        if let Some(tx) = tx {
            self.tx_limiter.update(tx);
            self.config.tx_rate_limiter = Some(*tx);
        }
    }

    /// Moves frames from the backend to the guest. Returns whether the
    /// guest was notified.
    pub fn process_rx(&mut self) -> bool {
        let Some(mem) = self.base.mem.clone() else {
            return false;
        };
        let mut used = false;
        let mut moved = 0u32;
        loop {
            if moved >= PASS_FRAMES {
                // The TAP is edge-triggered: ask for another round ourselves.
                let _ = self.base.queue_evts[RX].write(1);
                break;
            }
            let len = match self.rx_pending {
                Some(l) => l,
                None if self.mmds.as_ref().is_some_and(|m| m.has_rx()) => {
                    match self.take_mmds_frame() {
                        Some(n) => {
                            self.rx_pending = Some(n);
                            n
                        }
                        None => continue,
                    }
                }
                None => {
                    if self.rx_limiter.is_blocked() {
                        break;
                    }
                    match self.backend.read_frame(&mut self.rx_buf) {
                        Ok(n) if n >= VNET_HDR_LEN => {
                            // charge the frame now; it is kept until delivered
                            if !self.rx_limiter.consume((n - VNET_HDR_LEN) as u64) {
                                self.metrics.rx_rate_limiter_throttled.inc();
                                self.rx_pending = Some(n);
                                break;
                            }
                            self.rx_pending = Some(n);
                            n
                        }
                        Ok(_) => {
                            moved += 1; // runt: drop
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio-net: backend read: {e}");
                            break;
                        }
                    }
                }
            };
            if self.rx_limiter.is_blocked() {
                break;
            }
            let Some((head, parsed)) = self.base.pop_parsed(RX) else {
                break;
            };
            used = true;
            moved += 1;
            let c = match parsed {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("virtio-net: bad rx chain {head}: {e}");
                    self.metrics.rx_fails.inc();
                    self.base.add_used(RX, head, 0);
                    continue;
                }
            };
            if c.writable_len() < len as u64 {
                log::warn!("virtio-net: {len}-byte frame does not fit rx buffer, dropped");
                self.metrics.rx_fails.inc();
                self.base.add_used(RX, head, 0);
                self.rx_pending = None;
                continue;
            }
            // num_buffers = 1 (no mergeable rx buffers)
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match c.write_at(&mem, 0, &self.rx_buf[..len]) {
                Ok(()) => {
                    self.metrics.rx_packets_count.inc();
                    self.metrics.rx_bytes_count.add((len - VNET_HDR_LEN) as u64);
                    len as u32
                }
                Err(_) => {
                    self.metrics.rx_fails.inc();
                    0
                }
            };
            self.base.add_used(RX, head, written);
            self.rx_pending = None;
        }
        used && self.base.notify_used(RX)
    }

    /// Sends the guest's tx chains. Returns whether the guest was notified.
    pub fn process_tx(&mut self) -> bool {
        let Some(mem) = self.base.mem.clone() else {
            return false;
        };
        let mut used = false;
        let mut moved = 0u32;
        while !self.tx_limiter.is_blocked() {
            let Some((head, parsed)) = self.base.pop_parsed(TX) else {
                break;
            };
            if moved >= PASS_FRAMES {
                // Yield with frames left; come back on the next round.
                self.base.queues[TX].go_to_previous_position();
                let _ = self.base.queue_evts[TX].write(1);
                break;
            }
            moved += 1;
            let c = match parsed {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("virtio-net: bad tx chain {head}: {e}");
                    self.metrics.tx_malformed_frames.inc();
                    self.metrics.tx_fails.inc();
                    self.base.add_used(TX, head, 0);
                    used = true;
                    continue;
                }
            };
            let len = c.readable_len();
            if len < VNET_HDR_LEN as u64 || len > MAX_FRAME as u64 {
                log::warn!("virtio-net: tx frame of {len} bytes dropped");
                self.metrics.tx_malformed_frames.inc();
                self.metrics.tx_fails.inc();
                self.base.add_used(TX, head, 0);
                used = true;
                continue;
            }
            if !self.tx_limiter.consume(len - VNET_HDR_LEN as u64) {
                self.metrics.tx_rate_limiter_throttled.inc();
                self.base.queues[TX].go_to_previous_position();
                break;
            }
            let buf = &mut self.tx_buf[..len as usize];
            if c.read_at(&mem, 0, buf).is_ok() {
                if let Some(m) = &mut self.mmds {
                    if m.handle_tx(&buf[VNET_HDR_LEN..]) {
                        self.base.add_used(TX, head, 0);
                        used = true;
                        continue;
                    }
                }
                match self.backend.write_frame(buf) {
                    Ok(_) => {
                        self.metrics.tx_packets_count.inc();
                        self.metrics.tx_bytes_count.add(len - VNET_HDR_LEN as u64);
                    }
                    Err(e) => {
                        // a full tap queue drops the frame, like a NIC would
                        log::debug!("virtio-net: backend write: {e}");
                        self.metrics.tx_fails.inc();
                    }
                }
            }
            self.base.add_used(TX, head, 0);
            used = true;
        }
        let notified = used && self.base.notify_used(TX);
        if self.mmds.as_ref().is_some_and(|m| m.has_rx()) {
            self.process_rx();
        }
        notified
    }

    fn register(&mut self, ops: &mut EventOps) {
        if !self.base.register_queue_events(ops) {
            return;
        }
        let fd: RawFd = self.backend.as_raw_fd();
        // The backend is edge-triggered (see the module docs).
        if let Err(e) = ops.add(Events::with_data_raw(
            fd,
            TOKEN_BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            log::error!("virtio-net: registering events: {e:?}");
        }
        self.base
            .watch_fd(ops, self.rx_limiter.as_raw_fd(), TOKEN_RX_LIMITER);
        self.base
            .watch_fd(ops, self.tx_limiter.as_raw_fd(), TOKEN_TX_LIMITER);
    }
}

impl VirtioDevice for Net {
    fn base(&self) -> &DeviceBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut DeviceBase {
        &mut self.base
    }
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn config_bytes(&self) -> Vec<u8> {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16
        // max_virtqueue_pairs; le16 mtu; }: the fields sit at fixed offsets;
        // status is only meaningful with F_STATUS (not offered), so it is 0.
        let mut c = self.config.guest_mac.unwrap_or_default().to_vec();
        if let Some(mtu) = self.config.mtu {
            c.extend_from_slice(&0u16.to_le_bytes());
            c.extend_from_slice(&1u16.to_le_bytes());
            c.extend_from_slice(&mtu.to_le_bytes());
        }
        c
    }
    fn on_reset(&mut self) {
        self.rx_pending = None;
    }
}

impl Net {
    /// [`Persist::restore`] over another backend than a TAP (tests, or a
    /// userspace switch).
    pub fn restore_with_backend(
        config: NetConfig,
        state: &NetState,
        mem: &crate::GuestMemoryMmap,
        backend: Box<dyn NetBackend>,
    ) -> Result<Self, NetError> {
        let mut net = Net::with_backend(config, backend)?;
        net.base.restore(&state.base, mem)?;
        if net.config.guest_mac != state.mac {
            // ember's `guest_mac` load override: the driver rereads the
            // MAC on the configuration interrupt.
            if net.config.guest_mac.is_none() {
                return Err(PersistError::Field {
                    device: "virtio-net",
                    what: "a MAC was offered before the snapshot; the restored interface must have one".into(),
                }
                .into());
            }
            // Raised when the event loop handles the activation.
            net.base.config_generation = net.base.config_generation.wrapping_add(1);
            if net.base.is_active() {
                net.base
                    .irq
                    .restore(crate::virtio::INT_CONFIG, net.base.irq.needs_reset());
            }
        }
        Ok(net)
    }
}

impl Persist for Net {
    type Config = NetConfig;
    type State = NetState;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            base: self.base.save(),
            mac: self.config.guest_mac,
        }
    }

    /// Opens the TAP `config.host_dev_name` (a load may have overridden
    /// it). A MAC other than the saved one bumps the configuration
    /// generation and raises a configuration interrupt.
    fn restore(
        config: NetConfig,
        state: &NetState,
        mem: &crate::GuestMemoryMmap,
    ) -> Result<Self, NetError> {
        let tap = Tap::open(&config.host_dev_name)?;
        Self::restore_with_backend(config, state, mem, Box::new(tap))
    }
}

impl MutEventSubscriber for Net {
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
                    self.process_tx();
                    self.process_rx();
                }
            }
            TOKEN_RX_QUEUE => {
                drain_evt(&self.base.queue_evts[RX]);
                self.metrics.rx_queue_event_count.inc();
                self.process_rx();
            }
            TOKEN_TX_QUEUE => {
                drain_evt(&self.base.queue_evts[TX]);
                self.metrics.tx_queue_event_count.inc();
                self.process_tx();
            }
            TOKEN_BACKEND => {
                if self.base.is_active() {
                    self.process_rx();
                } else {
                    // Nobody to deliver to: drain so edge-triggering re-arms,
                    // a bounded number (a host flooding the TAP must not
                    // keep the loop here); the rest waits in the TAP's
                    // kernel queue, which drops beyond its length.
                    for _ in 0..PASS_FRAMES {
                        if self.backend.read_frame(&mut self.rx_buf).is_err() {
                            break;
                        }
                    }
                }
            }
            TOKEN_RX_LIMITER => {
                if let Err(e) = self.rx_limiter.event_handler() {
                    log::error!("virtio-net: rx rate limiter: {e}");
                }
                self.process_rx();
            }
            TOKEN_TX_LIMITER => {
                if let Err(e) = self.tx_limiter.event_handler() {
                    log::error!("virtio-net: tx rate limiter: {e}");
                }
                self.process_tx();
            }
            t => log::warn!("virtio-net: unexpected event {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{mem, TestQueue};
    use crate::virtio::INT_VRING;
    use crate::GuestMemoryMmap;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

    struct Env {
        m: GuestMemoryMmap,
        rxq: TestQueue,
        txq: TestQueue,
        peer: UnixDatagram,
        net: Net,
    }

    fn env() -> Env {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let m = mem(0x80000);
        let rxq = TestQueue::new(&m, 0x1000, 16);
        let txq = TestQueue::new(&m, 0x4000, 16);
        let mut net = Net::with_backend(
            NetConfig {
                iface_id: "eth0".into(),
                host_dev_name: "unused".into(),
                guest_mac: Some(MAC),
                ..Default::default()
            },
            Box::new(a),
        )
        .unwrap();
        net.activate(m.clone(), vec![rxq.queue(), txq.queue()])
            .unwrap();
        Env {
            m,
            rxq,
            txq,
            peer: b,
            net,
        }
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, n));
        f
    }

    #[test]
    fn mtu_is_advised_in_config_space() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let net = Net::with_backend(
            NetConfig {
                mtu: Some(9000),
                ..Default::default()
            },
            Box::new(a),
        )
        .unwrap();
        assert_eq!(net.avail_features() & VIRTIO_NET_F_MTU, VIRTIO_NET_F_MTU);
        assert_eq!(net.avail_features() & VIRTIO_NET_F_MAC, 0);
        let c = net.config_bytes();
        assert_eq!(c.len(), 12);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    }

    #[test]
    fn mac_and_features() {
        let e = env();
        assert_eq!(e.net.avail_features() & VIRTIO_NET_F_MAC, VIRTIO_NET_F_MAC);
        let mut b = [0u8; 6];
        e.net.read_config(0, &mut b);
        assert_eq!(b, MAC);
        assert_eq!(parse_mac("06:00:AC:10:00:02").unwrap(), MAC);
        assert_eq!(format_mac(&MAC), "06:00:ac:10:00:02");
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "0g:00:ac:10:00:02",
            "6:00:ac:10:00:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tx_sends_frames() {
        let mut e = env();
        let f = frame(100, 0x42);
        e.m.write_slice(&f[..VNET_HDR_LEN], GuestAddress(0x10000))
            .unwrap();
        e.m.write_slice(&f[VNET_HDR_LEN..], GuestAddress(0x11000))
            .unwrap();
        e.txq
            .add_chain(&[(0x10000, VNET_HDR_LEN as u32, false), (0x11000, 100, false)]);
        // evil: too short, and outside memory
        e.txq.add_chain(&[(0x10000, 4, false)]);
        e.txq.add_chain(&[(0x7ff00, 0x1000, false)]);
        assert!(e.net.process_tx());
        assert_eq!(e.txq.used_idx(), 3);
        let mut got = vec![0u8; 2000];
        let n = e.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert!(e.peer.recv(&mut got).is_err()); // nothing else sent
        let m: std::collections::HashMap<_, _> = e.net.metrics().take().into_iter().collect();
        assert_eq!((m["tx_packets_count"], m["tx_bytes_count"]), (1, 100));
        assert_eq!(m["tx_malformed_frames"], 2);
    }

    #[test]
    fn mmds_frames_are_answered_inside_and_never_reach_the_tap() {
        use crate::mmds::stack::{MmdsStack, MMDS_MAC};
        use crate::mmds::MmdsService;
        let mut e = env();
        e.net.set_mmds(MmdsStack::new(
            std::net::Ipv4Addr::new(169, 254, 169, 254),
            Arc::new(Mutex::new(MmdsService::new())),
        ));
        // An ARP request for 169.254.169.254 from the guest.
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 169, 254, 169, 254]);
        e.m.write_slice(&f, GuestAddress(0x10000)).unwrap();
        e.rxq.add_chain(&[(0x20000, 2048, true)]);
        e.txq.add_chain(&[(0x10000, f.len() as u32, false)]);
        e.net.process_tx();
        // Answered on the rx queue, nothing on the TAP.
        assert_eq!(e.rxq.used_idx(), 1);
        let (_, len) = e.rxq.used_elem(0);
        let mut got = vec![0u8; len as usize];
        e.m.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &MMDS_MAC);
        let mut buf = [0u8; 256];
        assert!(e.peer.recv(&mut buf).is_err());
        // Other traffic still goes to the TAP.
        let other = frame(60, 1);
        e.m.write_slice(&other, GuestAddress(0x12000)).unwrap();
        e.txq.add_chain(&[(0x12000, other.len() as u32, false)]);
        e.net.process_tx();
        assert_eq!(e.peer.recv(&mut buf).unwrap(), other.len());
    }

    /// A host that always has another frame (until `left` runs out).
    #[derive(Debug)]
    struct Flood {
        fd: vmm_sys_util::eventfd::EventFd,
        left: usize,
        /// Frames handed to the device so far.
        read: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsRawFd for Flood {
        fn as_raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl NetBackend for Flood {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            self.left -= 1;
            self.read.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            buf[..100].fill(0x5a);
            Ok(100)
        }
        fn write_frame(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
    }

    type FloodEnv = (
        GuestMemoryMmap,
        TestQueue,
        TestQueue,
        Net,
        Arc<std::sync::atomic::AtomicUsize>,
    );

    /// A device on a [`Flood`] of `frames` with 256-entry queues.
    fn flood_env(frames: usize) -> FloodEnv {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let m = mem(0x100000);
        let rxq = TestQueue::new(&m, 0x1000, QUEUE_SIZE);
        let txq = TestQueue::new(&m, 0x4000, QUEUE_SIZE);
        let flood = Flood {
            fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            left: frames,
            read: read.clone(),
        };
        let mut net = Net::with_backend(NetConfig::default(), Box::new(flood)).unwrap();
        net.activate(m.clone(), vec![rxq.queue(), txq.queue()])
            .unwrap();
        (m, rxq, txq, net, read)
    }

    #[test]
    fn a_full_tx_ring_is_sent_in_bounded_passes() {
        let (m, _rxq, mut txq, mut net, _) = flood_env(0);
        m.write_slice(&frame(1000, 3), GuestAddress(0x10000))
            .unwrap();
        for _ in 0..100 {
            txq.add_chain(&[(0x10000, 1012, false)]);
        }
        assert!(net.process_tx());
        assert_eq!(u32::from(txq.used_idx()), PASS_FRAMES);
        assert!(
            net.queue_events()[TX].read().is_ok(),
            "no new round asked for"
        );
        net.process_tx();
        assert_eq!(txq.used_idx(), 100);
        assert!(net.queue_events()[TX].read().is_err(), "nothing left");
    }

    #[test]
    fn a_host_flood_is_taken_in_bounded_passes_and_never_buffered() {
        let (_m, mut rxq, _txq, mut net, read) = flood_env(1000);
        let frames_read = || read.load(std::sync::atomic::Ordering::SeqCst);
        // The guest posts no buffers: one frame is read and held, the rest
        // stays with the host, however often the device looks.
        for _ in 0..10 {
            assert!(!net.process_rx());
        }
        assert_eq!(frames_read(), 1);
        assert_eq!(net.rx_pending, Some(100));
        // 100 buffers: one pass fills PASS_FRAMES of them and asks for
        // another round; the next fills the rest and holds one frame.
        for i in 0..100u64 {
            rxq.add_chain(&[(0x20000 + i * 0x800, 0x800, true)]);
        }
        assert!(net.process_rx());
        assert_eq!(u32::from(rxq.used_idx()), PASS_FRAMES);
        assert!(
            net.queue_events()[RX].read().is_ok(),
            "no new round asked for"
        );
        net.process_rx();
        assert_eq!(rxq.used_idx(), 100);
        assert_eq!(frames_read(), 101);
        assert!(net.rx_pending.is_some());
    }

    #[test]
    fn rx_waits_for_buffers() {
        let mut e = env();
        let f = frame(60, 0x17);
        e.peer.send(&f).unwrap();
        // no rx buffer: the frame is kept
        assert!(!e.net.process_rx());
        assert_eq!(e.net.rx_pending, Some(72));
        e.rxq.add_chain(&[(0x20000, 1526, true)]);
        assert!(e.net.process_rx());
        assert_eq!(e.rxq.used_elem(0), (0, 72));
        let mut got = vec![0u8; 72];
        e.m.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(e.net.interrupt().status() & INT_VRING, INT_VRING);
        // frame too big for the buffer: dropped, next one delivered
        e.peer.send(&frame(1000, 1)).unwrap();
        e.peer.send(&frame(10, 2)).unwrap();
        e.rxq.add_chain(&[(0x20000, 100, true)]);
        e.rxq.add_chain(&[(0x21000, 100, true)]);
        e.net.process_rx();
        assert_eq!(e.rxq.used_idx(), 3);
        assert_eq!(e.rxq.used_elem(1).1, 0);
        assert_eq!(e.rxq.used_elem(2).1, 22);
        // evil rx chain (readable-only / out of memory) is returned unused
        e.peer.send(&frame(10, 3)).unwrap();
        e.rxq.add_chain(&[(0x7fff0, 0x100, true)]);
        e.rxq.add_chain(&[(0x22000, 100, true)]);
        e.net.process_rx();
        assert_eq!(e.rxq.used_elem(3).1, 0);
        assert_eq!(e.rxq.used_elem(4).1, 22);
    }

    #[test]
    fn event_loop_drives_rx_and_tx() {
        let e = env();
        let Env {
            m,
            mut rxq,
            mut txq,
            peer,
            net,
        } = e;
        let net = Arc::new(Mutex::new(net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        let run_until = |em: &mut EventManager<_>, cond: &dyn Fn() -> bool| {
            for _ in 0..100 {
                if cond() {
                    return;
                }
                em.run_with_timeout(50).unwrap();
            }
            panic!("condition not reached");
        };
        // activation event (written by activate()) registers the fds
        em.run_with_timeout(50).unwrap();
        rxq.add_chain(&[(0x20000, 1526, true)]);
        peer.send(&frame(30, 9)).unwrap();
        run_until(&mut em, &|| rxq.used_idx() == 1);
        m.write_slice(&frame(20, 8), GuestAddress(0x10000)).unwrap();
        txq.add_chain(&[(0x10000, 32, false)]);
        net.lock().unwrap().queue_events()[TX].write(1).unwrap();
        run_until(&mut em, &|| txq.used_idx() == 1);
        let mut got = [0u8; 64];
        assert_eq!(peer.recv(&mut got).unwrap(), 32);
    }

    /// Opens a real TAP inside a network namespace private to a test
    /// thread (gone when the thread ends) and pushes a frame through it.
    #[test]
    fn tap_in_private_netns() {
        let h = std::thread::spawn(|| {
            // SAFETY: unshare of the calling thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipping: unshare(CLONE_NEWNET) failed");
                return;
            }
            let tap = match Tap::open("embertap0") {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("skipping: {e}");
                    return;
                }
            };
            assert_eq!(tap.name(), "embertap0");
            assert!(Tap::open("this-name-is-too-long").is_err());
            let m = mem(0x80000);
            let rxq = TestQueue::new(&m, 0x1000, 16);
            let mut txq = TestQueue::new(&m, 0x4000, 16);
            let mut net = Net::with_backend(NetConfig::default(), Box::new(tap)).unwrap();
            net.activate(m.clone(), vec![rxq.queue(), txq.queue()])
                .unwrap();
            // nothing to read yet: non-blocking
            assert!(!net.process_rx());
            // tx on a down interface is dropped by the kernel, not a crash
            m.write_slice(&frame(50, 1), GuestAddress(0x10000)).unwrap();
            txq.add_chain(&[(0x10000, 62, false)]);
            assert!(net.process_tx());
            assert_eq!(txq.used_idx(), 1);
        });
        h.join().unwrap();
    }
}
