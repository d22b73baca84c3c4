//! Virtio devices and the virtio-mmio (version 2) transport.
//!
//! The device logic ([`block`], [`net`], [`rng`], [`vsock`]) is independent of the
//! transport ([`mmio`]). A device implements [`VirtioDevice`] (what the
//! transport needs) and `event_manager::MutEventSubscriber` (what the VMM's
//! event loop needs). The VMM keeps the device in one `Arc<Mutex<_>>` and hands
//! clones of it to both:
//!
//! ```text
//! let blk = Arc::new(Mutex::new(Block::new(cfg)?));
//! let transport = MmioTransport::new(mem.clone(), blk.clone())?;
//! // before the guest runs: ioeventfd per queue + irqfd
//! for (i, evt) in blk.lock().unwrap().queue_events().iter().enumerate() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//! }
//! vm.register_irqfd(blk.lock().unwrap().interrupt().eventfd(), irq)?;
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_LEN)?;
//! event_manager.add_subscriber(blk);
//! ```
//!
//! Activation: when the driver writes DRIVER_OK the transport (on a vCPU
//! thread) validates the queues and calls [`VirtioDevice::activate`]; the
//! device stores memory and queues and signals its activate eventfd, which
//! the subscriber (event-loop thread) handles by registering its queue
//! eventfds and backend fds.
//!
//! Snapshots ([`persist`]): each device saves and restores plain state
//! ([`persist::Persist`]), the transport its registers
//! ([`MmioTransport::save`], [`MmioTransport::restore`]). A device restored
//! active activates itself with its checked queues, so the same activate
//! event registers it; that event also raises what it had pending.

pub mod balloon;
pub mod block;
pub mod desc;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod persist;
/// Limits on bandwidth and operations.
pub mod rate_limiter;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use desc::{parse_chain, DescError, ParsedChain};

pub use mmio::{cmdline_param, MmioTransport, MMIO_LEN, NOTIFY_REG_OFFSET};

/// VIRTIO_F_VERSION_1 (bit 32): the only transport feature we offer/require.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Virtio device ids.
pub const TYPE_NET: u32 = 1;
/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device id of a socket device.
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: configuration changed (also used with NEEDS_RESET).
pub const INT_CONFIG: u32 = 0x2;

/// Errors of the common virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues offered.
        got: usize,
    },
    /// Signalling the activate eventfd failed.
    #[error("activate eventfd: {0}")]
    EventFd(io::Error),
    /// Already active (the driver must reset first).
    #[error("device already activated")]
    AlreadyActive,
}

/// The interrupt line of one device: the interrupt-status register bits and
/// the eventfd the VMM registers as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
    /// Set by the device when the driver broke the protocol; the transport
    /// shows it as DEVICE_NEEDS_RESET until the driver resets the device.
    broken: std::sync::atomic::AtomicBool,
}

impl IrqTrigger {
    /// A new trigger with a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The device gives up on the driver until it is reset: DEVICE_NEEDS_RESET
    /// plus a configuration-change interrupt (virtio 1.2, 2.1.2).
    pub fn mark_needs_reset(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            self.trigger(INT_CONFIG);
        }
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.broken.store(false, Ordering::SeqCst);
    }

    /// Sets `bits` in the status register and pulses the irqfd.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("virtio: failed to signal irqfd: {e}");
        }
    }

    /// Restores InterruptStatus bits (added to any already set) and the
    /// needs-reset flag of a snapshot, without signalling: the VMM's
    /// interrupt controller state may not be restored yet. The event loop
    /// raises what is pending when the device's activation is handled
    /// ([`pulse_if_pending`](Self::pulse_if_pending)).
    pub fn restore(&self, bits: u32, needs_reset: bool) {
        self.broken.store(needs_reset, Ordering::SeqCst);
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// Signals the irqfd if any InterruptStatus bit is set.
    pub fn pulse_if_pending(&self) {
        if self.status() != 0 {
            if let Err(e) = self.evt.write(1) {
                log::error!("virtio: failed to signal irqfd: {e}");
            }
        }
    }

    /// The eventfd to register with KVM as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What the transport needs from a device.
///
/// A device embeds a [`DeviceBase`] and supplies only what differs: the
/// base itself ([`base`](Self::base), [`base_mut`](Self::base_mut)), its
/// [`device_type`](Self::device_type), its [`config_bytes`](Self::config_bytes)
/// and, if it keeps per-session state, an [`on_reset`](Self::on_reset) hook.
/// The feature, queue, interrupt, activate, reset and generation methods are
/// provided on top of the base.
pub trait VirtioDevice: Send {
    /// The state shared by every device, which the provided methods use.
    fn base(&self) -> &DeviceBase;
    /// Mutable access to [`base`](Self::base).
    fn base_mut(&mut self) -> &mut DeviceBase;
    /// Virtio device id (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// The device's config space as the driver reads it.
    fn config_bytes(&self) -> Vec<u8>;
    /// Device-specific part of a reset: drops per-session state. Runs before
    /// the shared state is reset.
    fn on_reset(&mut self) {}

    /// Maximum size of each queue (each a power of two); the count is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        &self.base().queue_max_sizes
    }
    /// Features offered to the driver (includes [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64 {
        self.base().avail_features
    }
    /// Features the driver accepted (a subset of `avail_features`), set by the
    /// transport when the driver sets FEATURES_OK.
    fn ack_features(&mut self, features: u64) {
        self.base_mut().acked_features = features;
    }
    /// Features the driver accepted.
    fn acked_features(&self) -> u64 {
        self.base().acked_features
    }
    /// Reads device config space at `offset`. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    /// Writes device config space. Devices here have read-only config.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio: ignored config write at {offset:#x} len {}",
            data.len()
        );
    }
    /// ConfigGeneration register: changes whenever config space changes.
    fn config_generation(&self) -> u32 {
        self.base().config_generation
    }
    /// Starts the device with validated queues (one per `queue_max_sizes`).
    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        self.base_mut().activate(mem, queues)
    }
    /// Whether the device is activated.
    fn is_activated(&self) -> bool {
        self.base().is_active()
    }
    /// Device reset (driver wrote 0 to Status): drop queues and per-session
    /// state ([`on_reset`](Self::on_reset)); the device may be activated again.
    fn reset(&mut self) {
        self.on_reset();
        self.base_mut().reset();
    }
    /// One eventfd per queue, signalled on QueueNotify (ioeventfd or the
    /// transport's fallback).
    fn queue_events(&self) -> &[EventFd] {
        &self.base().queue_evts
    }
    /// The device's interrupt.
    fn interrupt(&self) -> Arc<IrqTrigger> {
        self.base().irq.clone()
    }
}

/// State common to all devices here; devices embed it.
#[derive(Debug)]
pub struct DeviceBase {
    /// The device's name in log lines (`virtio-blk`, ...).
    pub name: &'static str,
    /// Feature bits the device offers.
    pub avail_features: u64,
    /// Feature bits the driver accepted.
    pub acked_features: u64,
    /// Largest size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// One notification eventfd per queue (ioeventfds on the notify register).
    pub queue_evts: Vec<EventFd>,
    /// The interrupt line toward the guest.
    pub irq: Arc<IrqTrigger>,
    /// Signalled by `activate` and `reset` so the event loop (un)registers fds.
    pub activate_evt: EventFd,
    /// Guest memory, set at activation.
    pub mem: Option<GuestMemoryMmap>,
    /// The queues, as the driver set them up at activation.
    pub queues: Vec<Queue>,
    /// Bumped whenever the config space changes.
    pub config_generation: u32,
    /// Whether the queue eventfds are registered with the event loop (they
    /// stay registered across resets).
    registered: bool,
}

impl DeviceBase {
    /// New inactive state with non-blocking eventfds.
    pub fn new(
        name: &'static str,
        avail_features: u64,
        queue_max_sizes: &[u16],
    ) -> io::Result<Self> {
        let queue_evts = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            name,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            acked_features: 0,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_evts,
            irq: Arc::new(IrqTrigger::new()?),
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            mem: None,
            queues: Vec::new(),
            config_generation: 0,
            registered: false,
        })
    }

    /// Stores memory and queues and wakes the event loop.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.mem.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        self.mem = Some(mem);
        self.queues = queues;
        Ok(())
    }

    /// Back to the inactive state.
    pub fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        self.acked_features = 0;
        self.irq.clear();
        let _ = self.activate_evt.write(1);
    }

    /// The state to save (see [`persist`]).
    pub fn save(&self) -> persist::DeviceBaseState {
        persist::DeviceBaseState {
            acked_features: self.acked_features,
            config_generation: self.config_generation,
            activated: self.is_active(),
            queues: self.queues.iter().map(persist::QueueState::of).collect(),
            needs_reset: self.irq.needs_reset(),
        }
    }

    /// Puts a fresh base back in the saved `state`: features (a subset of
    /// what the device offers now), generation, the needs-reset flag and,
    /// if it was active, its checked queues over `mem` (activating it, so
    /// the event loop registers its descriptors when the device is added).
    pub fn restore(
        &mut self,
        state: &persist::DeviceBaseState,
        mem: &GuestMemoryMmap,
    ) -> Result<(), persist::PersistError> {
        use persist::PersistError;
        if state.acked_features & !self.avail_features != 0 {
            return Err(PersistError::Features {
                device: self.name,
                acked: state.acked_features,
                avail: self.avail_features,
            });
        }
        if state.activated && state.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(PersistError::Field {
                device: self.name,
                what: "active without VIRTIO_F_VERSION_1".into(),
            });
        }
        let expected = if state.activated {
            self.queue_max_sizes.len()
        } else {
            0
        };
        if state.queues.len() != expected {
            return Err(PersistError::QueueCount {
                device: self.name,
                expected,
                got: state.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .zip(&self.queue_max_sizes)
            .enumerate()
            .map(|(i, (q, &max))| q.to_queue(i, max, mem, true))
            .collect::<Result<Vec<_>, _>>()?;
        self.acked_features = state.acked_features;
        self.config_generation = state.config_generation;
        if state.activated {
            self.activate(mem.clone(), queues)
                .map_err(|e| PersistError::Activate {
                    device: self.name,
                    err: e.to_string(),
                })?;
        }
        self.irq.restore(0, state.needs_reset);
        Ok(())
    }

    /// Whether activated.
    pub fn is_active(&self) -> bool {
        self.mem.is_some()
    }

    /// Subscriber start-up shared by every device: watch the activate
    /// eventfd (token [`TOKEN_ACTIVATE`]). Returns whether the device is
    /// already active, in which case the caller registers its queue and
    /// backend fds now.
    pub(crate) fn watch_activation(&self, ops: &mut EventOps) -> bool {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            TOKEN_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("{}: registering activate event: {e:?}", self.name);
        }
        self.is_active()
    }

    /// Registers the queue eventfds with the event loop, queue `i` under
    /// token `TOKEN_QUEUE_BASE + i`. Only the first call registers;
    /// it returns whether it did, so the caller registers its backend fds
    /// once too.
    pub(crate) fn register_queue_events(&mut self, ops: &mut EventOps) -> bool {
        if self.registered {
            return false;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let token = TOKEN_QUEUE_BASE + i as u32;
            if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                log::error!("{}: registering events: {e:?}", self.name);
            }
        }
        self.registered = true;
        true
    }

    /// Pops the next available chain of queue `q` (see [`pop_chain`]) and
    /// parses it: its head index and the chain, or why it is malformed.
    /// `None` when inactive, when the queue is empty and while the device
    /// needs a reset.
    /// Watches one more descriptor of the device's (a backend, a rate
    /// limiter's timer, a completion eventfd) for input under `token`.
    pub(crate) fn watch_fd(&self, ops: &mut EventOps, fd: std::os::unix::io::RawFd, token: u32) {
        if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
            log::error!("{}: registering events: {e:?}", self.name);
        }
    }

    pub(crate) fn pop_parsed(&mut self, q: usize) -> Option<(u16, Result<ParsedChain, DescError>)> {
        let mem = self.mem.as_ref()?;
        let queue = self.queues.get_mut(q)?;
        let head = pop_chain(self.name, queue, mem, &self.irq)?.head_index();
        let parsed = parse_chain(mem, GuestAddress(queue.desc_table()), queue.size(), head);
        Some((head, parsed))
    }

    /// Returns chain `head` to the driver on queue `q`'s used ring with
    /// `len` bytes written; a failure is logged.
    pub(crate) fn add_used(&mut self, q: usize, head: u16, len: u32) {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(q)) else {
            return;
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            log::error!("{}: add_used({head}) failed: {e}", self.name);
        }
    }

    /// After a device added used buffers to queue `q`: raises the used-buffer
    /// interrupt unless the driver suppressed notifications. Returns whether
    /// the guest was notified.
    pub(crate) fn notify_used(&mut self, q: usize) -> bool {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(q)) else {
            return false;
        };
        if queue.needs_notification(mem).unwrap_or(true) {
            self.signal_used();
            return true;
        }
        false
    }

    /// Handles the activate event: consumes it and tells whether the device
    /// is now active (the caller then registers its fds).
    pub(crate) fn on_activation(&self) -> bool {
        drain_evt(&self.activate_evt);
        if self.is_active() {
            // A restored device's pending interrupt (a fresh activation
            // has none).
            self.irq.pulse_if_pending();
        }
        self.is_active()
    }

    /// Raises a used-buffer interrupt.
    pub fn signal_used(&self) {
        self.irq.trigger(INT_VRING);
    }

    /// Config changed: bump the generation and raise a config interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.is_active() {
            self.irq.trigger(INT_CONFIG);
        }
    }
}

/// Copies `config[offset..]` into `data`; bytes outside `config` read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

/// Pops the next available chain of `queue`. A driver that publishes more
/// entries than the queue holds (a corrupt avail index) is broken: the
/// device logs it, asks for a reset and leaves the queue alone until then.
pub(crate) fn pop_chain<'a>(
    name: &str,
    queue: &mut virtio_queue::Queue,
    mem: &'a GuestMemoryMmap,
    irq: &IrqTrigger,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>> {
    use virtio_queue::QueueT;
    if irq.needs_reset() {
        return None;
    }
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => {
            let pending = idx.0.wrapping_sub(queue.next_avail());
            if pending > queue.size() {
                log::warn!(
                    "{name}: driver published {pending} entries on a queue of {}; device needs reset",
                    queue.size()
                );
                irq.mark_needs_reset();
                return None;
            }
        }
        Err(e) => {
            log::warn!("{name}: cannot read the avail ring ({e}); device needs reset");
            irq.mark_needs_reset();
            return None;
        }
    }
    queue.pop_descriptor_chain(mem)
}

/// Event-loop token of every device's activate eventfd.
pub(crate) const TOKEN_ACTIVATE: u32 = 0;
/// Event-loop token of a device's queue 0 eventfd; queue `i` uses
/// `TOKEN_QUEUE_BASE + i` (see [`DeviceBase::register_queue_events`]).
pub(crate) const TOKEN_QUEUE_BASE: u32 = 1;

/// Drains an eventfd, ignoring "would block".
pub(crate) fn drain_evt(evt: &EventFd) {
    let _ = evt.read();
}

#[cfg(test)]
mod pop_chain_tests {
    use super::test_utils::{mem, TestQueue};
    use super::*;

    #[test]
    fn corrupt_avail_index_asks_for_reset_until_cleared() {
        let m = mem(0x10_0000);
        let mut tq = TestQueue::new(&m, 0x1_0000, 16);
        let mut q = tq.queue();
        let irq = IrqTrigger::new().unwrap();
        tq.add_chain(&[(0x8_0000, 512, true)]);
        assert!(pop_chain("t", &mut q, &m, &irq).is_some());
        assert!(pop_chain("t", &mut q, &m, &irq).is_none());
        assert!(!irq.needs_reset());

        tq.set_avail_idx(1000);
        assert!(pop_chain("t", &mut q, &m, &irq).is_none());
        assert!(irq.needs_reset());
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
        // Stays broken even if the index looks sane again, until reset.
        tq.set_avail_idx(2);
        assert!(pop_chain("t", &mut q, &m, &irq).is_none());
        irq.clear();
        assert!(!irq.needs_reset());
        assert!(pop_chain("t", &mut q, &m, &irq).is_some());
    }

    #[test]
    fn device_base_pops_returns_and_notifies() {
        let m = mem(0x10_0000);
        let mut tq = TestQueue::new(&m, 0x1_0000, 16);
        let mut base = DeviceBase::new("t", 0, &[16]).unwrap();
        assert!(base.pop_parsed(0).is_none(), "inactive");
        base.activate(m.clone(), vec![tq.queue()]).unwrap();
        assert!(base.pop_parsed(0).is_none(), "empty");
        assert!(base.pop_parsed(1).is_none(), "no such queue");

        let head = tq.add_chain(&[(0x8_0000, 16, false), (0x9_0000, 512, true)]);
        let (h, parsed) = base.pop_parsed(0).unwrap();
        assert_eq!(h, head);
        let c = parsed.unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (16, 512));
        base.add_used(0, h, 7);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used_elem(0), (u32::from(head), 7));
        assert_eq!(base.irq.status() & INT_VRING, 0);
        assert!(base.notify_used(0));
        assert_eq!(base.irq.status() & INT_VRING, INT_VRING);

        // a malformed chain still yields its head, to be returned
        let bad = tq.add_chain(&[(0xff_0000_0000, 512, true)]);
        let (h, parsed) = base.pop_parsed(0).unwrap();
        assert_eq!(h, bad);
        assert!(parsed.is_err());
    }
}
