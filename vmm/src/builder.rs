//! Turns a validated [`VmConfig`] into a running microVM.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;
use std::path::PathBuf;

use devices::bus::Bus;
use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialOut;
use devices::legacy::serial::SerialState;
use devices::legacy::{I8042Device, SerialDevice};
use devices::mmds::stack::MmdsStack;
use devices::mmds::SharedMmds;
use devices::virtio::balloon::{Balloon, BalloonError};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::mmio::MmioError;
use devices::virtio::net::{Net, NetConfig, NetError};
use devices::virtio::rng::{Rng, RngConfig, RngError};
use devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
use devices::virtio::{cmdline_param, MmioTransport, VirtioDevice, MMIO_LEN, NOTIFY_REG_OFFSET};
use devices::GuestMemoryMmap;
use event_manager::{MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, AcpiError, VirtioMmioDesc};
use crate::arch::boot::{configure_linux, configure_pvh, BootError};
use crate::arch::layout::*;
use crate::arch::mptable::{self, MptableError};
use crate::arch::regs::BootProtocol;
use crate::arch::{cpuid, cpuid::CpuidError};
use crate::config::{ConfigError, VmConfig};
use crate::loader::{self, LoaderError};
use crate::snapshot::{MicroVmState, SnapshotError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::{create_guest_memory, Vm, VmError};
use crate::EventManager;

/// Errors building the microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::bus::BusError),
    #[error("drive {id}: {err}")]
    Block { id: String, err: BlockError },
    #[error("network interface {id}: {err}")]
    Net { id: String, err: NetError },
    #[error("vsock: {0}")]
    Vsock(VsockError),
    #[error("entropy device: {0}")]
    Rng(RngError),
    #[error("balloon: {0}")]
    Balloon(BalloonError),
    #[error("virtio-mmio transport: {0}")]
    Mmio(#[from] MmioError),
    #[error("KVM_IOEVENTFD failed: {0}")]
    Ioevent(kvm_ioctls::Error),
    #[error(transparent)]
    VirtioRestore(#[from] virtio_persist::VirtioRestoreError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// How vCPUs and devices tell the VMM thread that the guest is done.
pub struct ExitSignals {
    /// vCPU threads report here...
    pub vcpu_events: Sender<VcpuEvent>,
    /// ...and then write this.
    pub vcpu_exit_evt: EventFd,
    /// The i8042 writes this on a guest reset request.
    pub reset_evt: EventFd,
}

/// A booted microVM.
pub(crate) struct RunningVm {
    /// The KVM VM; owned here for the guest's life.
    #[allow(dead_code)]
    pub vm: Vm,
    /// Guest memory; owned here for the guest's life.
    #[allow(dead_code)]
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042Device>>,
    pub paused: bool,
    /// Block devices by drive id.
    pub blocks: BTreeMap<String, Arc<Mutex<Block>>>,
    /// Network devices by interface id.
    pub nets: BTreeMap<String, Arc<Mutex<Net>>>,
    /// The vsock device, if any (also held by the event loop).
    #[allow(dead_code)]
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    /// The entropy device, if any.
    #[allow(dead_code)]
    pub rng: Option<Arc<Mutex<Rng>>>,
    /// The balloon, if any.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// Every virtio device's transport, in MMIO slot order (what a
    /// snapshot saves).
    pub virtio_slots: Vec<(VirtioSlot, Arc<Mutex<MmioTransport>>)>,
}

impl RunningVm {
    /// Stops every vCPU thread.
    pub fn stop_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}

mod virtio_persist;
pub(crate) use virtio_persist::save_virtio;

fn evt() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

/// Places virtio devices on the MMIO bus, one 4 KiB window and IRQ each.
struct VirtioAttacher<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    /// The devices for the event loop, added by the caller once the whole
    /// VM is built (a build that fails leaves nothing registered: a VMM
    /// whose snapshot load failed can load another).
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    cmdline: Vec<String>,
    /// What the DSDT describes.
    acpi: Vec<VirtioMmioDesc>,
    slot: u64,
    /// MMIO pages before the first virtio device (1 with the boot timer).
    first_page: u64,
}

impl<'a> VirtioAttacher<'a> {
    /// An attacher placing devices from the first MMIO slot on, after the
    /// boot timer's page when there is one: a restore gets the same slots,
    /// windows and IRQs as the cold boot.
    fn new(vm: &'a Vm, mem: &'a GuestMemoryMmap, mmio: &'a mut Bus, boot_timer: bool) -> Self {
        VirtioAttacher {
            vm,
            mem,
            mmio,
            subscribers: Vec::new(),
            cmdline: Vec::new(),
            acpi: Vec::new(),
            slot: 0,
            first_page: u64::from(boot_timer),
        }
    }

    fn attach<D>(&mut self, dev: Arc<Mutex<D>>) -> Result<Arc<Mutex<MmioTransport>>, BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let transport = MmioTransport::new(self.mem.clone(), dev.clone())?;
        self.place(dev, transport)
    }

    /// Puts `dev` with its `transport` (new, or restored from a snapshot)
    /// in the next slot.
    fn place<D>(
        &mut self,
        dev: Arc<Mutex<D>>,
        transport: MmioTransport,
    ) -> Result<Arc<Mutex<MmioTransport>>, BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let base = MMIO_MEM_START + (self.first_page + self.slot) * MMIO_DEVICE_SIZE;
        let irq = IRQ_BASE + self.slot as u32;
        {
            let d = dev.lock().expect("virtio device poisoned");
            for (i, e) in d.queue_events().iter().enumerate() {
                self.vm
                    .fd()
                    .register_ioevent(e, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)
                    .map_err(BuildError::Ioevent)?;
            }
            self.vm.register_irqfd(d.interrupt().eventfd(), irq)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), base, MMIO_LEN)?;
        self.cmdline.push(cmdline_param(base, irq));
        self.acpi.push(VirtioMmioDesc {
            base,
            size: MMIO_DEVICE_SIZE,
            irq,
        });
        self.subscribers.push(dev);
        self.slot += 1;
        Ok(transport)
    }
}

/// The virtio devices of a microVM, by kind, and their transports in MMIO
/// slot order.
struct Devices {
    slots: Vec<(VirtioSlot, Arc<Mutex<MmioTransport>>)>,
    blocks: BTreeMap<String, Arc<Mutex<Block>>>,
    nets: BTreeMap<String, Arc<Mutex<Net>>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    rng: Option<Arc<Mutex<Rng>>>,
    balloon: Option<Arc<Mutex<Balloon>>>,
}

/// Which device sits in a virtio-mmio slot (what a snapshot names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VirtioSlot {
    Block(String),
    Net(String),
    Vsock,
    Rng,
    Balloon,
}

/// The device-side configuration of a drive.
fn block_config(d: &crate::config::DriveConfig) -> BlockConfig {
    BlockConfig {
        drive_id: d.drive_id.clone(),
        path: PathBuf::from(&d.path_on_host),
        read_only: d.is_read_only,
        rate_limiter: d.rate_limiter,
        io_engine: d.engine(),
    }
}

/// The device-side configuration of a network interface.
fn net_config(n: &crate::config::NetworkInterfaceConfig) -> NetConfig {
    NetConfig {
        iface_id: n.iface_id.clone(),
        host_dev_name: n.host_dev_name.clone(),
        guest_mac: n.mac(),
        rx_rate_limiter: n.rx_rate_limiter,
        tx_rate_limiter: n.tx_rate_limiter,
        mtu: n.mtu,
    }
}

/// The device-side configuration of the vsock device.
fn vsock_config(v: &crate::config::VsockDeviceConfig) -> VsockConfig {
    VsockConfig {
        vsock_id: v.vsock_id.clone().unwrap_or_else(|| "vsock".into()),
        guest_cid: v.guest_cid,
        uds_path: PathBuf::from(&v.uds_path),
    }
}

/// The MMDS stack of interface `iface_id`, if `cfg` puts MMDS on it.
fn mmds_stack(cfg: &VmConfig, mmds: &SharedMmds, iface_id: &str) -> Option<MmdsStack> {
    cfg.mmds_config
        .as_ref()
        .filter(|m| m.network_interfaces.iter().any(|i| i == iface_id))
        .map(|m| MmdsStack::new(m.address(), mmds.clone()))
}

/// Creates the configured virtio devices: the root drive first (so it is
/// /dev/vda), then the other drives, network interfaces, vsock, the
/// entropy device and the balloon.
fn attach_virtio(
    cfg: &VmConfig,
    mmds: &SharedMmds,
    a: &mut VirtioAttacher,
) -> Result<Devices, BuildError> {
    let mut slots = Vec::new();
    let mut blocks = BTreeMap::new();
    let mut drives: Vec<_> = cfg.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    for d in drives {
        let blk = Block::new(block_config(d)).map_err(|err| BuildError::Block {
            id: d.drive_id.clone(),
            err,
        })?;
        let blk = Arc::new(Mutex::new(blk));
        slots.push((
            VirtioSlot::Block(d.drive_id.clone()),
            a.attach(blk.clone())?,
        ));
        if d.is_root_device {
            let root = match &d.partuuid {
                Some(u) => format!("root=PARTUUID={u}"),
                None => "root=/dev/vda".to_string(),
            };
            a.cmdline.push(root);
            a.cmdline
                .push(if d.is_read_only { "ro" } else { "rw" }.to_string());
        }
        blocks.insert(d.drive_id.clone(), blk);
    }
    let mut nets = BTreeMap::new();
    for n in &cfg.network_interfaces {
        let mut net = Net::new(net_config(n)).map_err(|err| BuildError::Net {
            id: n.iface_id.clone(),
            err,
        })?;
        if let Some(stack) = mmds_stack(cfg, mmds, &n.iface_id) {
            net.set_mmds(stack);
        }
        let net = Arc::new(Mutex::new(net));
        slots.push((VirtioSlot::Net(n.iface_id.clone()), a.attach(net.clone())?));
        nets.insert(n.iface_id.clone(), net);
    }
    let vsock = match &cfg.vsock {
        Some(v) => {
            let dev = Vsock::new(vsock_config(v)).map_err(BuildError::Vsock)?;
            let dev = Arc::new(Mutex::new(dev));
            slots.push((VirtioSlot::Vsock, a.attach(dev.clone())?));
            Some(dev)
        }
        None => None,
    };
    let rng = match &cfg.entropy {
        Some(e) => {
            let dev = Rng::new(RngConfig {
                rate_limiter: e.rate_limiter,
            })
            .map_err(BuildError::Rng)?;
            let dev = Arc::new(Mutex::new(dev));
            slots.push((VirtioSlot::Rng, a.attach(dev.clone())?));
            Some(dev)
        }
        None => None,
    };
    let balloon = match &cfg.balloon {
        Some(b) => {
            let dev = Balloon::new(b.device_config()).map_err(BuildError::Balloon)?;
            let dev = Arc::new(Mutex::new(dev));
            slots.push((VirtioSlot::Balloon, a.attach(dev.clone())?));
            Some(dev)
        }
        None => None,
    };
    Ok(Devices {
        slots,
        blocks,
        nets,
        vsock,
        rng,
        balloon,
    })
}

/// The port-I/O devices and the MMIO bus before the virtio devices.
struct Legacy {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042Device>>,
}

/// COM1 and the i8042 on the port-I/O bus (in a snapshot's saved state
/// when given), and with `boot_timer` Firecracker's boot-time probe on the
/// first MMIO page.
fn attach_legacy(
    vm: &Vm,
    serial_out: SerialOut,
    exits: &ExitSignals,
    boot_timer: bool,
    saved: Option<(&SerialState, &I8042State)>,
) -> Result<Legacy, BuildError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_irq = evt()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = match saved {
        Some((s, _)) => SerialDevice::restore(serial_irq, serial_out, s)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
        None => SerialDevice::new(serial_irq, serial_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), SERIAL_PORT_BASE, 8)?;
    let kbd_irq = evt()?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)?;
    let reset = exits.reset_evt.try_clone().map_err(BuildError::EventFd)?;
    let i8042 = match saved {
        Some((_, k)) => I8042Device::restore(reset, kbd_irq, k)
            .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
        None => I8042Device::new(reset, kbd_irq),
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    pio.insert(i8042.clone(), I8042_PORT_BASE, 5)?;
    if boot_timer {
        mmio.insert(
            Arc::new(Mutex::new(crate::boot_timer::BootTimer::new())),
            MMIO_MEM_START,
            MMIO_DEVICE_SIZE,
        )?;
    }
    Ok(Legacy {
        pio,
        mmio,
        serial,
        i8042,
    })
}

/// Starts the vCPU threads (all configured first), running or paused.
fn start_vcpus(
    vcpus: Vec<Vcpu>,
    exits: &ExitSignals,
    hook: &Option<Arc<dyn Fn() + Send + Sync>>,
    paused: bool,
) -> Result<Vec<VcpuHandle>, BuildError> {
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let hook = hook.clone();
        let exit_evt = exits
            .vcpu_exit_evt
            .try_clone()
            .map_err(BuildError::EventFd)?;
        handles.push(v.start(
            exits.vcpu_events.clone(),
            exit_evt,
            hook.map(|h| Box::new(move || h()) as Box<dyn FnOnce() + Send>),
            paused,
        )?);
    }
    Ok(handles)
}

/// How a snapshot is restored (from `PUT /snapshot/load`).
pub struct RestoreOptions {
    /// KVM's dirty page log on the restored memory (`track_dirty_pages`).
    pub track_dirty_pages: bool,
    /// Advance the KVM clock by the time spent saved (`clock_realtime`).
    pub clock_realtime: bool,
    /// Start the vCPUs running (`resume_vm`); otherwise paused.
    pub resume: bool,
}

/// Rebuilds a microVM from a snapshot `state` over `mem` (the snapshot's
/// memory, already mapped), beside [`build_and_boot`]: the VM and its
/// memory slots, the irqchip, the legacy devices, the virtio devices, then
/// the vCPUs with their saved state and the VM state (irqchip, PIT, clock)
/// over them. The vCPU threads start paused unless `opts.resume`.
#[allow(clippy::too_many_arguments)]
pub fn build_from_snapshot(
    state: &MicroVmState,
    mem: GuestMemoryMmap,
    opts: &RestoreOptions,
    serial_out: SerialOut,
    exits: &ExitSignals,
    vcpu_start_hook: Option<Arc<dyn Fn() + Send + Sync>>,
    mmds: &SharedMmds,
    em: &mut EventManager,
) -> Result<RunningVm, BuildError> {
    let mc = &state.config.machine_config;
    let vm = Vm::new()?;
    if let Some(c) = &state.config.cpu_config {
        vm.require_caps(&c.template().map_err(ConfigError::from)?.add_caps)?;
    }
    vm.register_memory(&mem, opts.track_dirty_pages)?;
    vm.setup_irqchip()?;
    let Legacy {
        pio,
        mut mmio,
        serial,
        i8042,
    } = attach_legacy(
        &vm,
        serial_out,
        exits,
        state.boot_timer,
        Some((&state.serial, &state.i8042)),
    )?;
    let mut attacher = VirtioAttacher::new(&vm, &mem, &mut mmio, state.boot_timer);
    let devices =
        virtio_persist::restore_virtio(&state.config, &state.devices, mmds, &mut attacher)?;
    let subscribers = std::mem::take(&mut attacher.subscribers);

    crate::vstate::vcpu::register_kick_handler()?;
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for s in &state.vcpus {
        let v = Vcpu::new(&vm, s.id, pio.clone(), mmio.clone())?;
        v.restore_state(s)?;
        vcpus.push(v);
    }
    vm.restore_state(&state.vm, opts.clock_realtime)?;
    // Pulses the legacy devices sent when restored came before the
    // irqchip state above: send what is pending again.
    serial.lock().expect("serial poisoned").raise_pending();
    i8042.lock().expect("i8042 poisoned").raise_pending();
    let handles = start_vcpus(vcpus, exits, &vcpu_start_hook, !opts.resume)?;
    // Only now, with everything restored, do the devices join the event
    // loop (which raises their pending interrupts and the vsock reset).
    for s in subscribers {
        em.add_subscriber(s);
    }
    Ok(RunningVm {
        vm,
        mem,
        vcpus: handles,
        serial,
        i8042,
        paused: !opts.resume,
        blocks: devices.blocks,
        nets: devices.nets,
        vsock: devices.vsock,
        rng: devices.rng,
        balloon: devices.balloon,
        virtio_slots: devices.slots,
    })
}

/// Builds and starts the microVM described by `cfg`. `vcpu_start_hook`
/// runs first thing on every vCPU thread (seccomp goes there). `mmds` is
/// the metadata service the interfaces named in `cfg.mmds_config` answer
/// for, inside the VMM.
pub fn build_and_boot(
    cfg: &VmConfig,
    serial_out: SerialOut,
    exits: &ExitSignals,
    vcpu_start_hook: Option<Arc<dyn Fn() + Send + Sync>>,
    mmds: &SharedMmds,
    boot_timer: bool,
    em: &mut EventManager,
) -> Result<RunningVm, BuildError> {
    cfg.validate()?;
    let boot = cfg
        .boot_source
        .as_ref()
        .ok_or(ConfigError::Missing("boot-source"))?;
    let mc = &cfg.machine_config;
    let mem_size = (mc.mem_size_mib as u64) << 20;

    let template = match &cfg.cpu_config {
        Some(c) => Some(c.template().map_err(ConfigError::from)?),
        None => None,
    };
    let mem = create_guest_memory(mc.mem_size_mib as u64, mc.huge_pages)?;
    let vm = Vm::new()?;
    if let Some(t) = &template {
        vm.require_caps(&t.add_caps)?;
    }
    vm.register_memory(&mem, mc.track_dirty_pages)?;
    vm.setup_irqchip()?;

    let kernel = loader::load_kernel(&mem, &boot.kernel_image_path)?;
    log::info!(
        "kernel {}: {}{:?} entry {:#x}",
        boot.kernel_image_path,
        if kernel.bzimage { "bzImage, " } else { "" },
        kernel.protocol,
        kernel.entry
    );
    let initrd = match &boot.initrd_path {
        Some(p) => Some(loader::load_initrd(&mem, mem_size, p)?),
        None => None,
    };

    let Legacy {
        pio,
        mut mmio,
        serial,
        i8042,
    } = attach_legacy(&vm, serial_out, exits, boot_timer, None)?;

    // virtio devices, announced on the command line.
    let mut attacher = VirtioAttacher::new(&vm, &mem, &mut mmio, boot_timer);
    let devices = attach_virtio(cfg, mmds, &mut attacher)?;
    let subscribers = std::mem::take(&mut attacher.subscribers);
    let extra = std::mem::take(&mut attacher.cmdline);
    let virtio_acpi = std::mem::take(&mut attacher.acpi);

    let cmdline_len = loader::load_cmdline(&mem, boot.cmdline(), &extra)?;
    // Both the MP table and ACPI: kernels built without ACPI use the former.
    mptable::setup(&mem, MPTABLE_START, mc.vcpu_count)?;
    let rsdp = acpi::setup(&mem, mc.vcpu_count, &virtio_acpi)?;
    log::info!(
        "boot: {:?} protocol{}, ACPI RSDP at {rsdp:#x}, {} virtio-mmio device(s) in the DSDT",
        kernel.protocol,
        if kernel.bzimage { " (bzImage)" } else { "" },
        virtio_acpi.len()
    );
    match kernel.protocol {
        BootProtocol::Linux64 => configure_linux(
            &mem,
            mem_size,
            cmdline_len,
            initrd,
            kernel.setup_header,
            Some(rsdp),
        )?,
        BootProtocol::Pvh => configure_pvh(&mem, mem_size, initrd, Some(rsdp))?,
    }

    // vCPUs: create and configure all before starting any.
    crate::vstate::vcpu::register_kick_handler()?;
    let base_cpuid = cpuid::supported(vm.kvm())?;
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for id in 0..mc.vcpu_count {
        let mut v = Vcpu::new(&vm, id, pio.clone(), mmio.clone())?;
        v.configure(
            &base_cpuid,
            mc.vcpu_count,
            mc.smt,
            template.as_ref(),
            &mem,
            kernel.entry,
            kernel.protocol,
        )?;
        vcpus.push(v);
    }
    for s in subscribers {
        em.add_subscriber(s);
    }
    let handles = start_vcpus(vcpus, exits, &vcpu_start_hook, false)?;

    Ok(RunningVm {
        vm,
        mem,
        vcpus: handles,
        serial,
        i8042,
        paused: false,
        blocks: devices.blocks,
        nets: devices.nets,
        vsock: devices.vsock,
        rng: devices.rng,
        balloon: devices.balloon,
        virtio_slots: devices.slots,
    })
}
