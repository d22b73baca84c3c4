//! virtio-mmio transport, version 2 ("modern"), as a [`BusDevice`].
//!
//! Registers 0x000..0x100 are 32-bit only (other widths read 0 / are
//! ignored); config space from 0x100 is delegated to the device. Nothing
//! the guest writes can panic: bad queue sizes/addresses are remembered and
//! make DRIVER_OK fail with DEVICE_NEEDS_RESET; bad feature sets leave
//! FEATURES_OK clear; out-of-order status writes are ignored.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{MmioTransportState, PersistError, QueueState};
use super::{IrqTrigger, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify (where the VMM puts the ioeventfds).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

/// The kernel command-line parameter announcing a device at `base` with
/// interrupt `irq`: `virtio_mmio.device=4K@0x<base>:<irq>`.
pub fn cmdline_param(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Device status bit: the guest found the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status bit: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Device status bit: the driver is ready; the device is live.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status bit: the device hit an error and needs a reset.
pub const STATUS_NEEDS_RESET: u32 = 0x40;
/// Device status bit: the driver gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue's maximum size is not a power of two in 1..=32768.
    #[error("queue max size {0} is not a power of two in 1..=32768")]
    BadQueueMax(u16),
    /// An eventfd could not be created.
    #[error("cloning a queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// A saved transport state is not one this device can be in.
    #[error("virtio-mmio state: {0}")]
    State(#[from] PersistError),
}

/// The virtio-mmio transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    /// A bad value was written to this queue's size since the last reset.
    queue_bad: Vec<bool>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

fn lock<'a>(
    d: &'a Arc<Mutex<dyn VirtioDevice + 'static>>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// A copy of a queue's configuration (`Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> Queue {
    let mut n = match Queue::new(q.max_size()) {
        Ok(n) => n,
        Err(_) => return Queue::default(),
    };
    n.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(q.desc_table());
    n.set_desc_table_address(l, h);
    let (l, h) = split(q.avail_ring());
    n.set_avail_ring_address(l, h);
    let (l, h) = split(q.used_ring());
    n.set_used_ring_address(l, h);
    n.set_ready(q.ready());
    n
}

impl MmioTransport {
    /// Wraps `device`. `mem` is what queues are validated against and what
    /// the device gets at activation.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (queues, queue_evts, irq) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&m| Queue::new(m).map_err(|_| MmioError::BadQueueMax(m)))
                .collect::<Result<Vec<_>, _>>()?;
            let evts = d
                .queue_events()
                .iter()
                .map(|e| e.try_clone().map_err(MmioError::EventFd))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, evts, d.interrupt())
        };
        let n = queues.len();
        Ok(Self {
            device,
            mem,
            irq,
            queue_evts,
            queues,
            queue_bad: vec![false; n],
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        })
    }

    /// The registers and the driver's queue setup, for a snapshot. The
    /// device's own state is saved apart (its `Persist::save`), and before
    /// guest memory is written, as saving may complete requests.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status & !STATUS_NEEDS_RESET,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueState::of).collect(),
            queue_bad: self.queue_bad.clone(),
            interrupt_status: self.irq.status(),
        }
    }

    /// A transport for an already restored `device`, in the saved `state`.
    ///
    /// Checked: the queue count and each queue's maximum against the
    /// device, sizes and alignment ([`QueueState::to_queue`]), a status the
    /// driver can reach (0, ACKNOWLEDGE, +DRIVER, +FEATURES_OK,
    /// +DRIVER_OK, each optionally with FAILED), DRIVER_OK exactly when the
    /// device is active, driver features within the offered ones once
    /// FEATURES_OK is set, and only known interrupt bits. A pending
    /// interrupt is raised again by the event loop when it handles the
    /// device's activation.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        let field = |what: String| PersistError::Field {
            device: "virtio-mmio",
            what,
        };
        let mut t = Self::new(mem, device)?;
        let (maxes, active, avail) = {
            let d = lock(&t.device);
            (
                d.queue_max_sizes().to_vec(),
                d.is_activated(),
                d.avail_features(),
            )
        };
        if state.queues.len() != maxes.len() || state.queue_bad.len() != maxes.len() {
            return Err(PersistError::QueueCount {
                device: "virtio-mmio",
                expected: maxes.len(),
                got: state.queues.len().max(state.queue_bad.len()),
            }
            .into());
        }
        let queues = state
            .queues
            .iter()
            .zip(&maxes)
            .enumerate()
            .map(|(i, (q, &max))| q.to_queue(i, max, &t.mem, false))
            .collect::<Result<Vec<_>, _>>()?;
        let status = state.status & !STATUS_FAILED;
        let reachable = [
            0,
            STATUS_ACKNOWLEDGE,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        ];
        if !reachable.contains(&status) {
            return Err(field(format!(
                "status {:#x} is not one a driver reaches",
                state.status
            ))
            .into());
        }
        if (status & STATUS_DRIVER_OK != 0) != active {
            return Err(field(format!(
                "status {:#x} but the device is {}",
                state.status,
                if active { "active" } else { "not active" }
            ))
            .into());
        }
        if status & STATUS_FEATURES_OK != 0
            && (state.driver_features & !avail != 0
                || state.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            return Err(field(format!(
                "driver features {:#x} were accepted but the device offers {avail:#x}",
                state.driver_features
            ))
            .into());
        }
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(field(format!(
                "interrupt status {:#x} has unknown bits",
                state.interrupt_status
            ))
            .into());
        }
        t.queues = queues;
        t.queue_bad = state.queue_bad.clone();
        t.status = state.status;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        let needs_reset = t.irq.needs_reset();
        t.irq.restore(state.interrupt_status, needs_reset);
        Ok(t)
    }

    /// The wrapped device.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected(&self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.queues.len()).then_some(i)
    }

    fn reset(&mut self) {
        {
            let mut d = lock(&self.device);
            d.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_bad.iter_mut().for_each(|b| *b = false);
        self.irq.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.irq.trigger(INT_CONFIG);
    }

    fn queues_valid(&self) -> bool {
        self.queues.iter().zip(&self.queue_bad).all(|(q, bad)| {
            !bad && q.ready()
                && q.desc_table() % 16 == 0
                && q.avail_ring() % 2 == 0
                && q.used_ring() % 4 == 0
                && q.is_valid(&self.mem)
        })
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let cur = self.status & !STATUS_NEEDS_RESET;
        let v = v & !STATUS_NEEDS_RESET;
        if v & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // the driver can only add bits (clearing needs a reset)
        if v & cur != cur {
            log::warn!("virtio-mmio: ignoring status {v:#x} (current {cur:#x})");
            return;
        }
        let new = v & !cur;
        for bit in [
            STATUS_ACKNOWLEDGE,
            STATUS_DRIVER,
            STATUS_FEATURES_OK,
            STATUS_DRIVER_OK,
        ] {
            if new & bit == 0 {
                continue;
            }
            let have = self.status & !STATUS_NEEDS_RESET;
            let ok = match bit {
                STATUS_ACKNOWLEDGE => have == 0,
                STATUS_DRIVER => have == STATUS_ACKNOWLEDGE,
                STATUS_FEATURES_OK => {
                    have == STATUS_ACKNOWLEDGE | STATUS_DRIVER && self.features_ok()
                }
                _ => {
                    have == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                        && self.status & STATUS_NEEDS_RESET == 0
                        && self.activate()
                }
            };
            if !ok {
                log::warn!("virtio-mmio: refusing status bit {bit:#x} (status {have:#x})");
                return;
            }
            self.status |= bit;
        }
        if new & !(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0
        {
            log::warn!("virtio-mmio: unknown status bits in {v:#x}");
        }
    }

    fn features_ok(&mut self) -> bool {
        let mut d = lock(&self.device);
        let avail = d.avail_features();
        let f = self.driver_features;
        if f & VIRTIO_F_VERSION_1 == 0 || f & !avail != 0 {
            return false;
        }
        d.ack_features(f);
        true
    }

    /// DRIVER_OK: validate queues and activate. On failure sets
    /// DEVICE_NEEDS_RESET and returns false.
    fn activate(&mut self) -> bool {
        if !self.queues_valid() {
            log::warn!("virtio-mmio: invalid queue configuration at DRIVER_OK");
            self.needs_reset();
            return false;
        }
        let queues = self.queues.iter().map(copy_queue).collect();
        let res = lock(&self.device).activate(self.mem.clone(), queues);
        match res {
            Ok(()) => true,
            Err(e) => {
                log::error!("virtio-mmio: activation failed: {e}");
                self.needs_reset();
                false
            }
        }
    }

    /// Queue fields may only change between FEATURES_OK and DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {
                            if v != 0 {
                                // features we never offer
                                self.driver_features |= 1 << 63;
                            }
                        }
                    }
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if !self.queue_writable() {
                    log::warn!(
                        "virtio-mmio: queue write at {offset:#x} in status {:#x}",
                        self.status
                    );
                    return;
                }
                let Some(i) = self.selected() else {
                    return;
                };
                let q = &mut self.queues[i];
                match offset {
                    0x38 => {
                        let max = q.max_size();
                        match u16::try_from(v) {
                            Ok(s) if s != 0 && s <= max && s.is_power_of_two() => {
                                q.set_size(s);
                            }
                            _ => self.queue_bad[i] = true,
                        }
                    }
                    0x44 => q.set_ready(v == 1),
                    _ => {
                        // virtio-queue silently keeps the old address when
                        // the new one is misaligned: detect that
                        let merge = |old: u64| {
                            if offset & 4 == 0 {
                                (old & !0xffff_ffff) | u64::from(v)
                            } else {
                                (old & 0xffff_ffff) | (u64::from(v) << 32)
                            }
                        };
                        let (lo, hi) = if offset & 4 == 0 {
                            (Some(v), None)
                        } else {
                            (None, Some(v))
                        };
                        let (want, got) = match offset {
                            0x80 | 0x84 => {
                                let want = merge(q.desc_table());
                                q.set_desc_table_address(lo, hi);
                                (want, q.desc_table())
                            }
                            0x90 | 0x94 => {
                                let want = merge(q.avail_ring());
                                q.set_avail_ring_address(lo, hi);
                                (want, q.avail_ring())
                            }
                            _ => {
                                let want = merge(q.used_ring());
                                q.set_used_ring_address(lo, hi);
                                (want, q.used_ring())
                            }
                        };
                        if want != got {
                            self.queue_bad[i] = true;
                        }
                    }
                }
            }
            0x50 => match self.queue_evts.get(v as usize) {
                Some(e) => {
                    if let Err(e) = e.write(1) {
                        log::error!("virtio-mmio: queue notify: {e}");
                    }
                }
                None => log::warn!("virtio-mmio: notify of unknown queue {v}"),
            },
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            _ => log::warn!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self
                .selected()
                .map_or(0, |i| u32::from(self.queues[i].max_size())),
            0x44 => self
                .selected()
                .map_or(0, |i| u32::from(self.queues[i].ready())),
            0x60 => self.irq.status(),
            0x70 => {
                if self.irq.needs_reset() {
                    self.status | STATUS_NEEDS_RESET
                } else {
                    self.status
                }
            }
            // no shared memory regions: length reads as all ones
            0xb0 | 0xb4 => 0xffff_ffff,
            0xfc => lock(&self.device).config_generation(),
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            lock(&self.device).read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            lock(&self.device).write_config(offset - 0x100, data);
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::mem;
    use crate::virtio::{ActivateError, DeviceBase, INT_VRING};

    struct Dummy {
        base: DeviceBase,
        activations: usize,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn base(&self) -> &DeviceBase {
            &self.base
        }
        fn base_mut(&mut self) -> &mut DeviceBase {
            &mut self.base
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn config_bytes(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn activate(
            &mut self,
            mem: GuestMemoryMmap,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            self.activations += 1;
            self.base.activate(mem, queues)
        }
        fn on_reset(&mut self) {
            self.resets += 1;
        }
    }

    fn setup() -> (Arc<Mutex<Dummy>>, MmioTransport) {
        let d = Arc::new(Mutex::new(Dummy {
            base: DeviceBase::new("dummy", 1 << 5, &[16, 8]).unwrap(),
            activations: 0,
            resets: 0,
        }));
        let t = MmioTransport::new(mem(0x10000), d.clone()).unwrap();
        (d, t)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, 1 << 5);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(t, 0x70, 0xb);
        assert_eq!(r(t, 0x70), 0xb);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
        w(t, 0x30, sel);
        w(t, 0x38, size);
        w(t, 0x80, base as u32);
        w(t, 0x84, 0);
        w(t, 0x90, (base + 0x1000) as u32);
        w(t, 0xa0, (base + 0x2000) as u32);
        w(t, 0x44, 1);
    }

    #[test]
    fn cmdline() {
        assert_eq!(
            cmdline_param(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn identification_and_features() {
        let (_d, mut t) = setup();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), 1 << 5);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1);
        w(&mut t, 0x14, 2);
        assert_eq!(r(&mut t, 0x10), 0);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 8);
        w(&mut t, 0x30, 9);
        assert_eq!(r(&mut t, 0x34), 0);
        // narrow register access reads 0
        let mut b = [0xffu8; 2];
        t.read(0, 0, &mut b);
        assert_eq!(b, [0, 0]);
        // config space
        let mut c = [0u8; 4];
        t.read(0, 0x102, &mut c);
        assert_eq!(c, [3, 4, 5, 6]);
        t.read(0, 0x106, &mut c);
        assert_eq!(c, [7, 8, 0, 0]);
    }

    #[test]
    fn features_ok_requires_version_1_and_subset() {
        let (_d, mut t) = setup();
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x20, 1 << 5); // no VERSION_1
        w(&mut t, 0x70, 0xb);
        assert_eq!(r(&mut t, 0x70), 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1 | 2); // unknown high feature
        w(&mut t, 0x70, 0xb);
        assert_eq!(r(&mut t, 0x70), 3);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 0xb);
        assert_eq!(r(&mut t, 0x70), 0xb);
    }

    #[test]
    fn status_state_machine() {
        let (d, mut t) = setup();
        // skipping ACKNOWLEDGE is refused
        w(&mut t, 0x70, STATUS_DRIVER);
        assert_eq!(r(&mut t, 0x70), 0);
        // DRIVER_OK before FEATURES_OK is refused
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x70, 7);
        assert_eq!(r(&mut t, 0x70), 3);
        // clearing bits without reset is refused
        w(&mut t, 0x70, 1);
        assert_eq!(r(&mut t, 0x70), 3);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1000);
        setup_queue(&mut t, 1, 8, 0x4000);
        w(&mut t, 0x70, 0xf);
        assert_eq!(r(&mut t, 0x70), 0xf);
        assert!(d.lock().unwrap().is_activated());
        assert_eq!(
            d.lock().unwrap().base.acked_features,
            VIRTIO_F_VERSION_1 | 1 << 5
        );
        // queue writes after DRIVER_OK are ignored
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 2);
        assert_eq!(d.lock().unwrap().base.queues[0].size(), 16);
        // notify fallback signals the queue eventfd
        w(&mut t, 0x50, 1);
        assert_eq!(d.lock().unwrap().base.queue_evts[1].read().unwrap(), 1);
        w(&mut t, 0x50, 7); // unknown queue: ignored
                            // interrupts
        d.lock().unwrap().base.signal_used();
        assert_eq!(r(&mut t, 0x60), INT_VRING);
        w(&mut t, 0x64, INT_VRING);
        assert_eq!(r(&mut t, 0x60), 0);
        // FAILED
        w(&mut t, 0x70, 0x8f);
        assert_eq!(r(&mut t, 0x70) & STATUS_FAILED, STATUS_FAILED);
        // reset and re-activate
        w(&mut t, 0x70, 0);
        assert!(!d.lock().unwrap().is_activated());
        assert_eq!(d.lock().unwrap().resets, 2);
        assert_eq!(r(&mut t, 0x44), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1000);
        setup_queue(&mut t, 1, 8, 0x4000);
        w(&mut t, 0x70, 0xf);
        assert_eq!(r(&mut t, 0x70), 0xf);
        assert_eq!(d.lock().unwrap().activations, 2);
    }

    #[test]
    fn bad_queue_config_needs_reset() {
        type Case = fn(&mut MmioTransport);
        let cases: [Case; 6] = [
            |t| setup_queue(t, 0, 32, 0x1000), // > max
            |t| setup_queue(t, 0, 12, 0x1000), // not a power of two
            |t| setup_queue(t, 0, 0, 0x1000),  // zero
            |t| setup_queue(t, 0, 16, 0xf000), // rings beyond memory
            |t| setup_queue(t, 0, 16, 0x1008), // misaligned descriptor table
            |t| {
                setup_queue(t, 0, 16, 0x1000);
                w(t, 0x84, 0xffff_ffff); // desc table high half far away
            },
        ];
        for case in cases {
            let (d, mut t) = setup();
            negotiate(&mut t);
            setup_queue(&mut t, 1, 8, 0x4000);
            case(&mut t);
            w(&mut t, 0x70, 0xf);
            let s = r(&mut t, 0x70);
            assert_eq!(s & STATUS_DRIVER_OK, 0);
            assert_eq!(s & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
            assert_eq!(r(&mut t, 0x60) & INT_CONFIG, INT_CONFIG);
            assert!(!d.lock().unwrap().is_activated());
            // reset recovers
            w(&mut t, 0x70, 0);
            assert_eq!(r(&mut t, 0x70), 0);
        }
        // a queue left not ready also refuses activation
        let (d, mut t) = setup();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x1000);
        w(&mut t, 0x70, 0xf);
        assert_eq!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
        assert!(!d.lock().unwrap().is_activated());
    }

    #[test]
    fn random_register_writes_never_panic() {
        let (_d, mut t) = setup();
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 0x140) & !3;
            let v = (x >> 20) as u32 % 64;
            let v = if x & (1 << 60) != 0 {
                v
            } else {
                (x >> 8) as u32
            };
            if x & (1 << 61) != 0 {
                w(&mut t, off, v);
            } else {
                r(&mut t, off);
            }
        }
    }
}
