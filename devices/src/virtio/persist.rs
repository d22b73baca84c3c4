//! Snapshot state of the virtio layer: plain serde data, no descriptors.
//!
//! Saving is [`Persist::save`] on a device and [`MmioTransport::save`] on
//! its transport; restoring builds the device from its (possibly
//! overridden) configuration with [`Persist::restore`], then the transport
//! around it with [`MmioTransport::restore`]. Neither trusts the state: it
//! comes from a file a user handed in. Every queue is rebuilt through
//! [`QueueState::to_queue`], which checks it the way the transport checks a
//! driver's setup (size a power of two up to the device's maximum, rings
//! aligned and inside guest memory, ring indices consistent with what guest
//! memory holds); acked features must be a subset of what the device offers
//! now; a queue count must match the device's. A bad state is a
//! [`PersistError`] naming the field, never a panic.
//!
//! What is not saved, and what the restored device does instead:
//! - Block: nothing is in flight (`Sync` completes each request at once;
//!   `Async` requests are completed by [`Persist::save`]'s caller first, see
//!   `Block::quiesce`). Rate-limiter budgets start full.
//! - Net: a frame read from the TAP but not yet delivered is dropped (a
//!   NIC losing a frame); the TAP is opened by name from the configuration.
//! - Vsock: connections are not saved. The restored device sends
//!   `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on its event queue (virtio 1.2,
//!   5.10.6.6), after which the driver drops its connections and rereads
//!   `guest_cid`.
//! - Balloon: the target, the statistics interval, the held statistics
//!   buffer and the hinting run are saved; the last statistics values are
//!   kept too.
//!
//! [`MmioTransport::save`]: super::MmioTransport::save
//! [`MmioTransport::restore`]: super::MmioTransport::restore

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemoryMmap;

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistError {
    /// A queue's saved state is not one the device or guest memory allows.
    #[error("queue {index}: {what}")]
    Queue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// The number of queues differs from the device's.
    #[error("{device}: {got} queues saved, the device has {expected}")]
    QueueCount {
        /// The device.
        device: &'static str,
        /// Queues the device has.
        expected: usize,
        /// Queues in the state.
        got: usize,
    },
    /// The driver had accepted features the device no longer offers.
    #[error("{device}: acked features {acked:#x} are not a subset of the offered {avail:#x}")]
    Features {
        /// The device.
        device: &'static str,
        /// Saved acked features.
        acked: u64,
        /// Features offered now.
        avail: u64,
    },
    /// Any other field out of range.
    #[error("{device}: {what}")]
    Field {
        /// The device (or transport).
        device: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The saved device is of another type than the one being restored.
    #[error("device type mismatch: saved {saved}, device {device}")]
    DeviceType {
        /// Saved virtio device id.
        saved: u32,
        /// The device's id.
        device: u32,
    },
    /// Activating the restored device failed.
    #[error("{device}: activating: {err}")]
    Activate {
        /// The device.
        device: &'static str,
        /// The error, as text.
        err: String,
    },
}

/// A split virtqueue's state, as `virtio_queue::QueueState` holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver finished setting the queue up.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx_enabled: bool,
}

impl QueueState {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// Rebuilds queue `index` of a device whose maximum for it is `max`.
    ///
    /// Always checked: `max_size == max`, the size a power of two in
    /// 1..=max (a queue the driver never sized keeps `max`), the rings'
    /// alignment. When `live` (the device was running the queue), also:
    /// ready, the rings inside `mem`, the used ring's index in memory equal
    /// to `next_used`, and at most `size` entries between the avail ring's
    /// index and `next_avail` and between `next_avail` and `next_used`.
    pub fn to_queue(
        &self,
        index: usize,
        max: u16,
        mem: &GuestMemoryMmap,
        live: bool,
    ) -> Result<Queue, PersistError> {
        let bad = |what: String| PersistError::Queue { index, what };
        if self.max_size != max {
            return Err(bad(format!(
                "max_size {} differs from the device's {max}",
                self.max_size
            )));
        }
        if self.size == 0 || self.size > max || !self.size.is_power_of_two() {
            return Err(bad(format!(
                "size {} is not a power of two in 1..={max}",
                self.size
            )));
        }
        let st = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let q = Queue::try_from(st).map_err(|e| bad(format!("{e}")))?;
        // virtio-mmio's own rule for the used ring (virtio-queue asks 4 too).
        if !self.used_ring.is_multiple_of(4) {
            return Err(bad(format!(
                "used ring {:#x} is misaligned",
                self.used_ring
            )));
        }
        if !live {
            return Ok(q);
        }
        if !self.ready {
            return Err(bad(
                "the device was running a queue that is not ready".into()
            ));
        }
        if !q.is_valid(mem) {
            return Err(bad(format!(
                "rings at {:#x}/{:#x}/{:#x} (size {}) are not inside guest memory",
                self.desc_table, self.avail_ring, self.used_ring, self.size
            )));
        }
        let read_idx = |ring: u64| -> Result<u16, PersistError> {
            mem.read_obj::<u16>(GuestAddress(ring + 2))
                .map_err(|e| bad(format!("reading ring index at {:#x}: {e}", ring + 2)))
        };
        let used_idx = read_idx(self.used_ring)?;
        if used_idx != self.next_used {
            return Err(bad(format!(
                "next_used {} but the used ring's index in memory is {used_idx}",
                self.next_used
            )));
        }
        let avail_idx = read_idx(self.avail_ring)?;
        if avail_idx.wrapping_sub(self.next_avail) > self.size {
            return Err(bad(format!(
                "next_avail {} is {} entries behind the avail index {avail_idx} of a {}-entry queue",
                self.next_avail,
                avail_idx.wrapping_sub(self.next_avail),
                self.size
            )));
        }
        if self.next_avail.wrapping_sub(self.next_used) > self.size {
            return Err(bad(format!(
                "{} requests between next_used {} and next_avail {} on a {}-entry queue",
                self.next_avail.wrapping_sub(self.next_used),
                self.next_used,
                self.next_avail,
                self.size
            )));
        }
        Ok(q)
    }
}

/// What every device shares ([`super::DeviceBase`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBaseState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The ConfigGeneration register.
    pub config_generation: u32,
    /// Whether the driver had activated the device (DRIVER_OK).
    pub activated: bool,
    /// The queues with the device's progress (empty when not activated).
    pub queues: Vec<QueueState>,
    /// The device had asked for a reset (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
}

/// The virtio-mmio transport's registers and the driver's queue setup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The Status register (without DEVICE_NEEDS_RESET, which is the
    /// device's).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The driver's queue setup (no progress: that is the device's).
    pub queues: Vec<QueueState>,
    /// A bad value was written to this queue since the last reset.
    pub queue_bad: Vec<bool>,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
}

/// virtio-blk's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Shared device state.
    pub base: DeviceBaseState,
    /// The capacity (sectors) the guest saw; a restored file of another
    /// size bumps the config generation and raises a configuration
    /// interrupt, as a resize does.
    pub capacity: u64,
}

/// virtio-net's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Shared device state.
    pub base: DeviceBaseState,
    /// The MAC the guest saw; a restore with another MAC bumps the config
    /// generation and raises a configuration interrupt.
    pub mac: Option<[u8; 6]>,
}

/// virtio-vsock's state (connections are never saved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Shared device state.
    pub base: DeviceBaseState,
    /// The guest CID the guest saw.
    pub cid: u64,
}

/// virtio-rng's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Shared device state.
    pub base: DeviceBaseState,
}

/// virtio-balloon's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Shared device state.
    pub base: DeviceBaseState,
    /// Target, in 4 KiB pages.
    pub num_pages: u32,
    /// Pages the guest said it holds.
    pub actual_pages: u32,
    /// Statistics interval (seconds).
    pub stats_polling_interval_s: u16,
    /// The statistics buffer the device holds, if any.
    pub stats_head: Option<u16>,
    /// The last statistics values, as (virtio tag, value) pairs.
    pub stats: Vec<(u16, u64)>,
    /// Free page hinting: the host's command id.
    pub hint_cmd: u32,
    /// Free page hinting: the last run's id.
    pub last_run: u32,
    /// Free page hinting: the guest's last command.
    pub guest_cmd: Option<u32>,
    /// Free page hinting: answer STOP with DONE.
    pub ack_on_stop: bool,
}

/// One virtio-mmio device in a snapshot, in MMIO slot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A drive.
    Block {
        /// Its `drive_id`.
        drive_id: String,
        /// Its transport.
        transport: MmioTransportState,
        /// The device.
        device: BlockState,
    },
    /// A network interface.
    Net {
        /// Its `iface_id`.
        iface_id: String,
        /// Its transport.
        transport: MmioTransportState,
        /// The device.
        device: NetState,
    },
    /// The vsock device.
    Vsock {
        /// Its `vsock_id`.
        vsock_id: String,
        /// Its transport.
        transport: MmioTransportState,
        /// The device.
        device: VsockState,
    },
    /// The entropy device.
    Rng {
        /// Its transport.
        transport: MmioTransportState,
        /// The device.
        device: RngState,
    },
    /// The balloon.
    Balloon {
        /// Its transport.
        transport: MmioTransportState,
        /// The device.
        device: BalloonState,
    },
}

impl VirtioDeviceState {
    /// The transport part.
    pub fn transport(&self) -> &MmioTransportState {
        match self {
            Self::Block { transport, .. }
            | Self::Net { transport, .. }
            | Self::Vsock { transport, .. }
            | Self::Rng { transport, .. }
            | Self::Balloon { transport, .. } => transport,
        }
    }

    /// A short name for messages (`block "rootfs"`, `rng`, ...).
    pub fn describe(&self) -> String {
        match self {
            Self::Block { drive_id, .. } => format!("block {drive_id:?}"),
            Self::Net { iface_id, .. } => format!("net {iface_id:?}"),
            Self::Vsock { vsock_id, .. } => format!("vsock {vsock_id:?}"),
            Self::Rng { .. } => "entropy".into(),
            Self::Balloon { .. } => "balloon".into(),
        }
    }
}

/// Save and restore of one device: `save` gives plain data, `restore`
/// builds the device from its configuration (the one in the snapshot, with
/// the load's overrides applied) and that data, checking the data first.
/// A device that was active comes back active with its queues (its event
/// loop registration happens when it is added to the event manager).
pub trait Persist: Sized {
    /// What the VMM configures the device with.
    type Config;
    /// The saved state.
    type State;
    /// The device's error.
    type Error;
    /// The device's state now.
    fn save(&self) -> Self::State;
    /// The device rebuilt from `config` and `state` over `mem`.
    fn restore(
        config: Self::Config,
        state: &Self::State,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::block::{Block, BlockConfig, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
    use crate::virtio::mmio::{MmioTransport, STATUS_DRIVER_OK};
    use crate::virtio::net::{Net, NetConfig};
    use crate::virtio::test_utils::{mem, TestQueue};
    use crate::virtio::vsock::{Vsock, VsockConfig, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
    use crate::virtio::{VirtioDevice, INT_CONFIG, INT_VRING};
    use event_manager::SubscriberOps;
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn queue_state_round_trips_and_is_checked() {
        let m = mem(0x10000);
        let mut tq = TestQueue::new(&m, 0x1000, 16);
        let q = tq.queue();
        let s = QueueState::of(&q);
        assert_eq!(QueueState::of(&s.to_queue(0, 16, &m, true).unwrap()), s);

        let cases: Vec<(QueueState, &str)> = vec![
            (QueueState { max_size: 32, ..s }, "max_size"),
            (QueueState { size: 12, ..s }, "power of two"),
            (QueueState { size: 0, ..s }, "power of two"),
            (QueueState { size: 32, ..s }, "power of two"),
            (
                QueueState {
                    desc_table: 0x1008,
                    ..s
                },
                "align",
            ),
            (
                QueueState {
                    avail_ring: 0x2001,
                    ..s
                },
                "align",
            ),
            (
                QueueState {
                    used_ring: 0x3002,
                    ..s
                },
                "align",
            ),
            (
                QueueState {
                    used_ring: 0xf000_0000,
                    ..s
                },
                "inside guest memory",
            ),
            (QueueState { ready: false, ..s }, "not ready"),
            (QueueState { next_used: 3, ..s }, "next_used"),
        ];
        for (bad, what) in cases {
            let e = bad.to_queue(0, 16, &m, true).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(what), "{e} (want {what})");
        }
        // the avail index runs more than a queue ahead of next_avail
        tq.set_avail_idx(100);
        let e = s.to_queue(0, 16, &m, true).unwrap_err().to_string();
        assert!(e.contains("behind the avail index"), "{e}");
        // more requests in flight than the queue holds
        tq.set_avail_idx(40);
        let e = QueueState {
            next_avail: 40,
            ..s
        };
        let e = e.to_queue(0, 16, &m, true).unwrap_err().to_string();
        assert!(e.contains("between next_used"), "{e}");
        tq.set_avail_idx(0);
        // a never-used queue keeps its defaults and is fine when not live
        let fresh = QueueState::of(&Queue::new(16).unwrap());
        assert!(fresh.to_queue(0, 16, &m, false).is_ok());
        assert!(fresh.to_queue(0, 16, &m, true).is_err());
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drives `t` the way a driver does: features (VERSION_1 and the
    /// device's low word), then each queue at `bases[i]` (descriptors,
    /// avail +0x1000, used +0x2000), then DRIVER_OK.
    fn bring_up(t: &mut MmioTransport, bases: &[u64], size: u32) {
        w(t, 0x70, 1);
        w(t, 0x70, 3);
        w(t, 0x14, 0);
        let low = r(t, 0x10);
        w(t, 0x24, 0);
        w(t, 0x20, low);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(t, 0x70, 0xb);
        for (i, b) in bases.iter().enumerate() {
            w(t, 0x30, i as u32);
            w(t, 0x38, size);
            w(t, 0x80, *b as u32);
            w(t, 0x84, 0);
            w(t, 0x90, (*b + 0x1000) as u32);
            w(t, 0xa0, (*b + 0x2000) as u32);
            w(t, 0x44, 1);
        }
        w(t, 0x70, 0xf);
        assert_eq!(r(t, 0x70), 0xf);
    }

    fn block_cfg(path: &std::path::Path) -> BlockConfig {
        BlockConfig {
            drive_id: "rootfs".into(),
            path: path.to_path_buf(),
            ..Default::default()
        }
    }

    /// Writes one sector of `fill` at `sector` through queue `q`.
    fn write_req(m: &GuestMemoryMmap, q: &mut TestQueue, sector: u64, fill: u8) {
        m.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(0x10000))
            .unwrap();
        m.write_obj(0u32, GuestAddress(0x10004)).unwrap();
        m.write_obj(sector, GuestAddress(0x10008)).unwrap();
        m.write_slice(&[fill; 512], GuestAddress(0x11000)).unwrap();
        m.write_obj(0xffu8, GuestAddress(0x12000)).unwrap();
        q.add_chain(&[
            (0x10000, 16, false),
            (0x11000, 512, false),
            (0x12000, 1, true),
        ]);
    }

    #[test]
    fn a_restored_block_device_and_transport_keep_serving_the_queue() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(8 * 512).unwrap();
        let m = mem(0x40000);
        let mut q = TestQueue::new(&m, 0x1000, 16);
        let blk = Arc::new(Mutex::new(Block::new(block_cfg(file.as_path())).unwrap()));
        let mut t = MmioTransport::new(m.clone(), blk.clone()).unwrap();
        bring_up(&mut t, &[0x1000], 16);
        write_req(&m, &mut q, 1, 0xaa);
        assert!(blk.lock().unwrap().process_queue());
        assert_eq!(q.used_idx(), 1);
        // a request the guest published while the VM was paused
        write_req(&m, &mut q, 2, 0xbb);

        let dev_state = blk.lock().unwrap().save();
        let tr_state = t.save();
        assert!(dev_state.base.activated);
        assert_eq!(dev_state.base.queues[0].next_used, 1);
        drop(t);
        drop(blk); // the drive's lock goes with it

        let restored = Block::restore(block_cfg(file.as_path()), &dev_state, &m).unwrap();
        assert_eq!(restored.save(), dev_state);
        let restored = Arc::new(Mutex::new(restored));
        let mut t2 = MmioTransport::restore(m.clone(), restored.clone(), &tr_state).unwrap();
        assert_eq!(t2.save(), tr_state);
        assert_eq!(r(&mut t2, 0x70), 0xf);
        // the pending request and a new one are served
        assert!(restored.lock().unwrap().process_queue());
        assert_eq!(q.used_idx(), 2);
        write_req(&m, &mut q, 3, 0xcc);
        restored.lock().unwrap().process_queue();
        assert_eq!(q.used_idx(), 3);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let mut data = vec![0u8; 4 * 512];
        std::os::unix::fs::FileExt::read_exact_at(file.as_file(), &mut data, 0).unwrap();
        assert_eq!(&data[512..1024], &[0xaa; 512][..]);
        assert_eq!(&data[1024..1536], &[0xbb; 512][..]);
        assert_eq!(&data[1536..2048], &[0xcc; 512][..]);
    }

    #[test]
    fn bad_device_and_transport_states_are_refused() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(8 * 512).unwrap();
        let m = mem(0x40000);
        let blk = Arc::new(Mutex::new(Block::new(block_cfg(file.as_path())).unwrap()));
        let mut t = MmioTransport::new(m.clone(), blk.clone()).unwrap();
        bring_up(&mut t, &[0x1000], 16);
        let good_dev = blk.lock().unwrap().save();
        let good_tr = t.save();
        drop(t);
        drop(blk);

        let mut bad_devs = Vec::new();
        let mut d = good_dev.clone();
        d.base.queues[0].size = 3;
        bad_devs.push((d, "power of two"));
        let mut d = good_dev.clone();
        d.base.queues[0].desc_table = 0x7fff_0000;
        bad_devs.push((d, "inside guest memory"));
        let mut d = good_dev.clone();
        d.base.queues.push(d.base.queues[0]);
        bad_devs.push((d, "2 queues saved"));
        let mut d = good_dev.clone();
        d.base.acked_features |= 1 << 40;
        bad_devs.push((d, "not a subset"));
        for (d, what) in bad_devs {
            let e = Block::restore(block_cfg(file.as_path()), &d, &m).unwrap_err();
            assert!(e.to_string().contains(what), "{e} (want {what})");
        }

        let ok = Arc::new(Mutex::new(
            Block::restore(block_cfg(file.as_path()), &good_dev, &m).unwrap(),
        ));
        let mut bad_trs = Vec::new();
        let mut s = good_tr.clone();
        s.status = 0x5;
        bad_trs.push((s, "not one a driver reaches"));
        let mut s = good_tr.clone();
        s.status = 0xb;
        bad_trs.push((s, "the device is active"));
        let mut s = good_tr.clone();
        s.queue_bad.clear();
        bad_trs.push((s, "queues"));
        let mut s = good_tr.clone();
        s.driver_features |= 1 << 50;
        bad_trs.push((s, "driver features"));
        let mut s = good_tr.clone();
        s.interrupt_status = 0x80;
        bad_trs.push((s, "unknown bits"));
        let mut s = good_tr.clone();
        s.queues[0].max_size = 1024;
        bad_trs.push((s, "max_size"));
        for (s, what) in bad_trs {
            let e = MmioTransport::restore(m.clone(), ok.clone(), &s)
                .err()
                .unwrap();
            assert!(e.to_string().contains(what), "{e} (want {what})");
        }
        // and the good one still goes
        assert!(MmioTransport::restore(m.clone(), ok, &good_tr).is_ok());
        let _ = STATUS_DRIVER_OK;
    }

    #[test]
    fn a_drive_restored_on_a_file_of_another_size_tells_the_guest() {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(8 * 512).unwrap();
        let m = mem(0x40000);
        let blk = Arc::new(Mutex::new(Block::new(block_cfg(file.as_path())).unwrap()));
        let mut t = MmioTransport::new(m.clone(), blk.clone()).unwrap();
        bring_up(&mut t, &[0x1000], 16);
        let st = blk.lock().unwrap().save();
        assert_eq!(st.capacity, 8);
        drop(t);
        drop(blk);
        let same = Block::restore(block_cfg(file.as_path()), &st, &m).unwrap();
        assert_eq!(same.interrupt().status(), 0);
        drop(same);
        file.as_file().set_len(16 * 512).unwrap();
        let grown = Block::restore(block_cfg(file.as_path()), &st, &m).unwrap();
        assert_eq!(grown.capacity(), 16);
        assert_eq!(grown.config_generation(), st.base.config_generation + 1);
        assert_eq!(grown.interrupt().status() & INT_CONFIG, INT_CONFIG);
    }

    const EVQ_BUF: u64 = 0x30000;

    fn vsock_cfg(dir: &TempDir, name: &str, cid: u64) -> VsockConfig {
        VsockConfig {
            vsock_id: "vsock0".into(),
            guest_cid: cid,
            uds_path: dir.as_path().join(name),
        }
    }

    /// A vsock device on `dir/a.sock` with CID `cid`, activated by a driver
    /// on three queues in `m`.
    fn active_vsock(dir: &TempDir, m: &GuestMemoryMmap, cid: u64) -> Vsock {
        let qs: Vec<TestQueue> = (0..3)
            .map(|i| TestQueue::new(m, 0x1000 + i * 0x4000, 16))
            .collect();
        let mut v = Vsock::new(vsock_cfg(dir, "a.sock", cid)).unwrap();
        v.ack_features(v.avail_features());
        v.activate(m.clone(), qs.iter().map(|q| q.queue_of_max(256)).collect())
            .unwrap();
        v
    }

    #[test]
    fn a_restored_vsock_sends_exactly_one_transport_reset() {
        let dir = TempDir::new().unwrap();
        let m = mem(0x40000);
        let v = active_vsock(&dir, &m, 3);
        let mut evq = TestQueue::new(&m, 0x9000, 16);
        // the driver posted two event buffers
        evq.add_chain(&[(EVQ_BUF, 4, true)]);
        evq.add_chain(&[(EVQ_BUF + 0x100, 4, true)]);
        m.write_obj(0xffff_ffffu32, GuestAddress(EVQ_BUF)).unwrap();
        let st = v.save();
        assert_eq!(st.cid, 3);
        let gen = v.config_generation();
        drop(v);

        // new socket path and CID, as a load's vsock_override gives
        let r = Vsock::restore(vsock_cfg(&dir, "b.sock", 7), &st, &m).unwrap();
        assert!(dir.as_path().join("b.sock").exists());
        assert_eq!(r.config_bytes(), 7u64.to_le_bytes().to_vec());
        assert_eq!(r.config_generation(), gen.wrapping_add(1));
        // the event goes out when the event loop takes the device in
        assert_eq!(evq.used_idx(), 0);
        assert_eq!(r.interrupt().status(), 0);
        let irq = r.interrupt();
        let mut em = event_manager::EventManager::<
            Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>,
        >::new()
        .unwrap();
        let r = Arc::new(Mutex::new(r));
        em.add_subscriber(r.clone());
        em.run_with_timeout(50).unwrap();
        assert_eq!(evq.used_idx(), 1, "exactly one event");
        assert_eq!(evq.used_elem(0), (0, 4));
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(EVQ_BUF)).unwrap(),
            VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        );
        assert_eq!(irq.status() & INT_VRING, INT_VRING);
        assert!(irq.eventfd().read().unwrap() >= 1, "interrupt raised");
        // nothing more comes on later event-queue kicks
        r.lock().unwrap().queue_events()[2].write(1).unwrap();
        em.run_with_timeout(50).unwrap();
        em.run_with_timeout(0).unwrap();
        assert_eq!(evq.used_idx(), 1);
    }

    #[test]
    fn a_vsock_reset_waits_for_an_event_buffer() {
        let dir = TempDir::new().unwrap();
        let m = mem(0x40000);
        let v = active_vsock(&dir, &m, 9);
        let st = v.save();
        drop(v);
        let r = Vsock::restore(vsock_cfg(&dir, "a.sock", 9), &st, &m).unwrap();
        let mut evq = TestQueue::new(&m, 0x9000, 16);
        assert_eq!(evq.used_idx(), 0);
        assert_eq!(r.config_bytes(), 9u64.to_le_bytes().to_vec());
        let r = Arc::new(Mutex::new(r));
        let mut em = event_manager::EventManager::<
            Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>,
        >::new()
        .unwrap();
        em.add_subscriber(r.clone());
        em.run_with_timeout(50).unwrap();
        evq.add_chain(&[(EVQ_BUF, 4, true)]);
        evq.add_chain(&[(EVQ_BUF + 0x100, 4, true)]);
        r.lock().unwrap().queue_events()[2].write(1).unwrap();
        em.run_with_timeout(50).unwrap();
        assert_eq!(evq.used_idx(), 1);
        assert_eq!(evq.used_elem(0), (0, 4));
    }

    #[test]
    fn a_restored_net_device_with_a_new_mac_tells_the_guest() {
        let m = mem(0x40000);
        let rxq = TestQueue::new(&m, 0x1000, 16);
        let mut txq = TestQueue::new(&m, 0x5000, 16);
        let cfg = |mac| NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: "unused".into(),
            guest_mac: Some(mac),
            ..Default::default()
        };
        let (a, _b) = UnixDatagram::pair().unwrap();
        let mut n = Net::with_backend(cfg([6, 0, 0, 0, 0, 1]), Box::new(a)).unwrap();
        let f = n.avail_features();
        n.ack_features(f);
        n.activate(
            m.clone(),
            vec![rxq.queue_of_max(256), txq.queue_of_max(256)],
        )
        .unwrap();
        let st = n.save();
        assert_eq!(st.mac, Some([6, 0, 0, 0, 0, 1]));
        drop(n);

        // same MAC: nothing to tell
        let (a, _b2) = UnixDatagram::pair().unwrap();
        let same =
            Net::restore_with_backend(cfg([6, 0, 0, 0, 0, 1]), &st, &m, Box::new(a)).unwrap();
        assert_eq!(same.save(), st);
        assert_eq!(same.interrupt().status(), 0);
        drop(same);

        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut r =
            Net::restore_with_backend(cfg([6, 0, 0, 0, 0, 2]), &st, &m, Box::new(a)).unwrap();
        assert_eq!(&r.config_bytes()[..6], &[6, 0, 0, 0, 0, 2]);
        assert_eq!(r.config_generation(), st.base.config_generation + 1);
        assert_eq!(r.interrupt().status() & INT_CONFIG, INT_CONFIG);
        // signalled once the event loop takes the device in
        assert!(r.interrupt().eventfd().read().is_err());
        // and it keeps sending what the guest queues
        m.write_slice(&[0u8; 12 + 60], GuestAddress(0x20000))
            .unwrap();
        txq.add_chain(&[(0x20000, 72, false)]);
        r.process_tx();
        let mut buf = [0u8; 128];
        assert_eq!(b.recv(&mut buf).unwrap(), 72);
        assert_eq!(txq.used_idx(), 1);

        // an interface that loses its MAC is refused
        let (a, _b3) = UnixDatagram::pair().unwrap();
        let none = NetConfig {
            guest_mac: None,
            ..cfg([0; 6])
        };
        assert!(Net::restore_with_backend(none, &st, &m, Box::new(a)).is_err());
    }

    #[test]
    fn rng_and_balloon_states_round_trip() {
        use crate::virtio::balloon::{Balloon, BalloonConfig};
        use crate::virtio::rng::{Rng, RngConfig};
        let m = mem(0x100000);
        let q = TestQueue::new(&m, 0x1000, 16);
        let mut rng = Rng::new(RngConfig::default()).unwrap();
        rng.ack_features(rng.avail_features());
        rng.activate(m.clone(), vec![q.queue_of_max(256)]).unwrap();
        let st = rng.save();
        let back = Rng::restore(RngConfig::default(), &st, &m).unwrap();
        assert_eq!(back.save(), st);
        assert!(back.is_activated());

        let cfg = BalloonConfig {
            amount_mib: 0,
            stats_polling_interval_s: 5,
            free_page_hinting: true,
            ..Default::default()
        };
        let mut b = Balloon::new(cfg).unwrap();
        b.ack_features(b.avail_features());
        let qs: Vec<TestQueue> = (0..4)
            .map(|i| TestQueue::new(&m, 0x10000 + i * 0x4000, 16))
            .collect();
        b.activate(m.clone(), qs.iter().map(|q| q.queue_of_max(256)).collect())
            .unwrap();
        b.update_target(1, 1).unwrap();
        b.update_stats_interval(3).unwrap();
        let st = b.save();
        assert_eq!(st.num_pages, 256);
        let back = Balloon::restore(cfg, &st, &m).unwrap();
        assert_eq!(back.save(), st);
        assert_eq!(back.config().amount_mib, 1);
        // a state whose statistics queue does not match the configuration
        let no_stats = BalloonConfig {
            stats_polling_interval_s: 0,
            ..cfg
        };
        assert!(Balloon::restore(no_stats, &st, &m).is_err());
        let held = BalloonState {
            stats_head: Some(99),
            ..st.clone()
        };
        assert!(Balloon::restore(cfg, &held, &m).is_err());
    }
}
