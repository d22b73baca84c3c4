//! The virtio devices of a snapshot: saved from a paused [`RunningVm`] in
//! MMIO slot order, and restored onto a new VM through the same
//! [`VirtioAttacher`] a cold boot uses (same slots, windows, IRQs,
//! ioeventfds and irqfds), each device from its configuration in the
//! restored [`VmConfig`] (where a load's overrides are already applied: a
//! new TAP or MAC, a new vsock socket or CID, a moved drive file) and its
//! checked saved state (`devices::virtio::persist`).
//!
//! The snapshot and the configuration must describe the same devices: a
//! device in one and not the other, or twice in the snapshot, is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use devices::mmds::SharedMmds;
use devices::virtio::balloon::Balloon;
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::persist::{Persist, VirtioDeviceState};
use devices::virtio::rng::{Rng, RngConfig};
use devices::virtio::vsock::Vsock;
use devices::virtio::MmioTransport;

use super::{
    block_config, mmds_stack, net_config, vsock_config, BuildError, Devices, RunningVm,
    VirtioAttacher, VirtioSlot,
};
use crate::config::VmConfig;

/// Why a snapshot's devices do not fit the configuration.
#[derive(Debug, thiserror::Error)]
pub enum VirtioRestoreError {
    /// The snapshot has a device the configuration lacks.
    #[error("the snapshot has {0} but the restored configuration has no such device")]
    NotConfigured(String),
    /// The configuration has a device the snapshot lacks.
    #[error("{0} is configured but not in the snapshot")]
    NotInSnapshot(String),
    /// The same device twice in the snapshot.
    #[error("the snapshot has {0} twice")]
    Duplicate(String),
    /// A device's transport state is refused.
    #[error("{0}: {1}")]
    Transport(String, devices::virtio::mmio::MmioError),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state of every virtio device of `vm` (paused), in slot order. A
/// block device with the `Async` engine first completes what is in flight.
/// Call it before guest memory is written out: completing requests writes
/// guest memory.
pub(crate) fn save_virtio(vm: &RunningVm) -> Vec<VirtioDeviceState> {
    let mut out = Vec::with_capacity(vm.virtio_slots.len());
    for (slot, transport) in &vm.virtio_slots {
        // The device first: quiescing may raise an interrupt the
        // transport's state then includes.
        let state = match slot {
            VirtioSlot::Block(id) => {
                let Some(dev) = vm.blocks.get(id) else {
                    continue;
                };
                let mut d = lock(dev);
                d.quiesce();
                let device = d.save();
                drop(d);
                VirtioDeviceState::Block {
                    drive_id: id.clone(),
                    transport: lock(transport).save(),
                    device,
                }
            }
            VirtioSlot::Net(id) => {
                let Some(dev) = vm.nets.get(id) else { continue };
                let device = lock(dev).save();
                VirtioDeviceState::Net {
                    iface_id: id.clone(),
                    transport: lock(transport).save(),
                    device,
                }
            }
            VirtioSlot::Vsock => {
                let Some(dev) = &vm.vsock else { continue };
                let d = lock(dev);
                let (vsock_id, device) = (d.config().vsock_id.clone(), d.save());
                drop(d);
                VirtioDeviceState::Vsock {
                    vsock_id,
                    transport: lock(transport).save(),
                    device,
                }
            }
            VirtioSlot::Rng => {
                let Some(dev) = &vm.rng else { continue };
                let device = lock(dev).save();
                VirtioDeviceState::Rng {
                    transport: lock(transport).save(),
                    device,
                }
            }
            VirtioSlot::Balloon => {
                let Some(dev) = &vm.balloon else { continue };
                let device = lock(dev).save();
                VirtioDeviceState::Balloon {
                    transport: lock(transport).save(),
                    device,
                }
            }
        };
        out.push(state);
    }
    out
}

/// A device rebuilt from its state with its transport, not yet placed.
enum Restored {
    Block(String, Arc<Mutex<Block>>, MmioTransport),
    Net(String, Arc<Mutex<Net>>, MmioTransport),
    Vsock(Arc<Mutex<Vsock>>, MmioTransport),
    Rng(Arc<Mutex<Rng>>, MmioTransport),
    Balloon(Arc<Mutex<Balloon>>, MmioTransport),
}

/// Restores `states` (slot order) onto the VM `a` builds, each device from
/// its configuration in `cfg`; `mmds` serves the interfaces `cfg` puts
/// MMDS on. Every device and transport is rebuilt and checked before any
/// is placed on the bus; a refused state leaves nothing behind but closed
/// files (the VMM can load another snapshot). Devices restored active join
/// the event loop when the caller adds `a.subscribers`; the loop then
/// raises their pending interrupts (and the vsock transport reset).
pub(super) fn restore_virtio(
    cfg: &VmConfig,
    states: &[VirtioDeviceState],
    mmds: &SharedMmds,
    a: &mut VirtioAttacher,
) -> Result<Devices, BuildError> {
    let t0 = std::time::Instant::now();
    let mem = a.mem.clone();
    let mut seen = BTreeSet::new();
    let mut restored = Vec::with_capacity(states.len());
    for st in states {
        let what = st.describe();
        if !seen.insert(what.clone()) {
            return Err(VirtioRestoreError::Duplicate(what).into());
        }
        let missing = || BuildError::from(VirtioRestoreError::NotConfigured(what.clone()));
        let transport = |dev: Arc<Mutex<dyn devices::virtio::VirtioDevice>>| {
            MmioTransport::restore(mem.clone(), dev, st.transport())
                .map_err(|e| VirtioRestoreError::Transport(what.clone(), e))
        };
        restored.push(match st {
            VirtioDeviceState::Block {
                drive_id, device, ..
            } => {
                let d = cfg
                    .drives
                    .iter()
                    .find(|d| &d.drive_id == drive_id)
                    .ok_or_else(missing)?;
                let blk = Block::restore(block_config(d), device, &mem).map_err(|err| {
                    BuildError::Block {
                        id: drive_id.clone(),
                        err,
                    }
                })?;
                let blk = Arc::new(Mutex::new(blk));
                let t = transport(blk.clone())?;
                Restored::Block(drive_id.clone(), blk, t)
            }
            VirtioDeviceState::Net {
                iface_id, device, ..
            } => {
                let n = cfg
                    .network_interfaces
                    .iter()
                    .find(|n| &n.iface_id == iface_id)
                    .ok_or_else(missing)?;
                let mut net =
                    Net::restore(net_config(n), device, &mem).map_err(|err| BuildError::Net {
                        id: iface_id.clone(),
                        err,
                    })?;
                if let Some(stack) = mmds_stack(cfg, mmds, iface_id) {
                    net.set_mmds(stack);
                }
                let net = Arc::new(Mutex::new(net));
                let t = transport(net.clone())?;
                Restored::Net(iface_id.clone(), net, t)
            }
            VirtioDeviceState::Vsock { device, .. } => {
                let v = cfg.vsock.as_ref().ok_or_else(missing)?;
                let dev =
                    Vsock::restore(vsock_config(v), device, &mem).map_err(BuildError::Vsock)?;
                let dev = Arc::new(Mutex::new(dev));
                let t = transport(dev.clone())?;
                Restored::Vsock(dev, t)
            }
            VirtioDeviceState::Rng { device, .. } => {
                let e = cfg.entropy.as_ref().ok_or_else(missing)?;
                let config = RngConfig {
                    rate_limiter: e.rate_limiter,
                };
                let dev = Rng::restore(config, device, &mem).map_err(BuildError::Rng)?;
                let dev = Arc::new(Mutex::new(dev));
                let t = transport(dev.clone())?;
                Restored::Rng(dev, t)
            }
            VirtioDeviceState::Balloon { device, .. } => {
                let b = cfg.balloon.as_ref().ok_or_else(missing)?;
                let dev = Balloon::restore(b.device_config(), device, &mem)
                    .map_err(BuildError::Balloon)?;
                let dev = Arc::new(Mutex::new(dev));
                let t = transport(dev.clone())?;
                Restored::Balloon(dev, t)
            }
        });
    }
    let absent = |what: String| Err(VirtioRestoreError::NotInSnapshot(what).into());
    for d in &cfg.drives {
        if !seen.contains(&format!("block {:?}", d.drive_id)) {
            return absent(format!("block {:?}", d.drive_id));
        }
    }
    for n in &cfg.network_interfaces {
        if !seen.contains(&format!("net {:?}", n.iface_id)) {
            return absent(format!("net {:?}", n.iface_id));
        }
    }
    let has = |kind: &str| seen.iter().any(|w| w.starts_with(kind));
    if cfg.vsock.is_some() && !has("vsock") {
        return absent("the vsock device".into());
    }
    if cfg.entropy.is_some() && !has("entropy") {
        return absent("the entropy device".into());
    }
    if cfg.balloon.is_some() && !has("balloon") {
        return absent("the balloon".into());
    }

    let mut slots = Vec::with_capacity(restored.len());
    let mut blocks = BTreeMap::new();
    let mut nets = BTreeMap::new();
    let (mut vsock, mut rng, mut balloon) = (None, None, None);
    for r in restored {
        match r {
            Restored::Block(id, dev, t) => {
                slots.push((VirtioSlot::Block(id.clone()), a.place(dev.clone(), t)?));
                blocks.insert(id, dev);
            }
            Restored::Net(id, dev, t) => {
                slots.push((VirtioSlot::Net(id.clone()), a.place(dev.clone(), t)?));
                nets.insert(id, dev);
            }
            Restored::Vsock(dev, t) => {
                slots.push((VirtioSlot::Vsock, a.place(dev.clone(), t)?));
                vsock = Some(dev);
            }
            Restored::Rng(dev, t) => {
                slots.push((VirtioSlot::Rng, a.place(dev.clone(), t)?));
                rng = Some(dev);
            }
            Restored::Balloon(dev, t) => {
                slots.push((VirtioSlot::Balloon, a.place(dev.clone(), t)?));
                balloon = Some(dev);
            }
        }
    }
    log::info!(
        "{} virtio device(s) restored in {} us",
        slots.len(),
        t0.elapsed().as_micros()
    );
    Ok(Devices {
        slots,
        blocks,
        nets,
        vsock,
        rng,
        balloon,
    })
}
