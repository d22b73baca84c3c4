//! Turns a validated [`VmConfig`] into a running microVM.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::serial::SerialOut;
use devices::legacy::{I8042Device, SerialDevice};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{configure_linux, configure_pvh, BootError};
use crate::arch::layout::*;
use crate::arch::mptable::{self, MptableError};
use crate::arch::regs::BootProtocol;
use crate::arch::{cpuid, cpuid::CpuidError};
use crate::config::{ConfigError, VmConfig};
use crate::loader::{self, LoaderError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::{create_guest_memory, Vm, VmError};

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
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a legacy device on the bus: {0}")]
    Bus(#[from] devices::bus::BusError),
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
pub struct RunningVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<VcpuHandle>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042Device>>,
    pub protocol: BootProtocol,
    pub bzimage: bool,
    pub paused: bool,
}

impl RunningVm {
    /// Stops every vCPU thread.
    pub fn stop_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}

fn evt() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

/// Builds and starts the microVM described by `cfg`. `vcpu_start_hook`
/// runs first thing on every vCPU thread (seccomp goes there).
pub fn build_and_boot(
    cfg: &VmConfig,
    serial_out: SerialOut,
    exits: &ExitSignals,
    vcpu_start_hook: Option<Arc<dyn Fn() + Send + Sync>>,
) -> Result<RunningVm, BuildError> {
    cfg.validate()?;
    let boot = cfg
        .boot_source
        .as_ref()
        .ok_or(ConfigError::Missing("boot-source"))?;
    let mc = &cfg.machine_config;
    let mem_size = (mc.mem_size_mib as u64) << 20;

    let mem = create_guest_memory(mc.mem_size_mib as u64)?;
    let vm = Vm::new()?;
    vm.register_memory(&mem)?;

    let kernel = loader::load_kernel(&mem, &boot.kernel_image_path)?;
    let initrd = match &boot.initrd_path {
        Some(p) => Some(loader::load_initrd(&mem, mem_size, p)?),
        None => None,
    };
    let cmdline_len = loader::load_cmdline(&mem, boot.cmdline(), &[])?;
    mptable::setup(&mem, MPTABLE_START, mc.vcpu_count)?;
    match kernel.protocol {
        BootProtocol::Linux64 => {
            configure_linux(&mem, mem_size, cmdline_len, initrd, kernel.setup_header)?
        }
        BootProtocol::Pvh => configure_pvh(&mem, mem_size, initrd)?,
    }

    // Legacy devices.
    let mut pio = Bus::new();
    let mmio = Bus::new();
    let serial_irq = evt()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
    pio.insert(serial.clone(), SERIAL_PORT_BASE, 8)?;
    let kbd_irq = evt()?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)?;
    let reset = exits.reset_evt.try_clone().map_err(BuildError::EventFd)?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(reset, kbd_irq)));
    pio.insert(i8042.clone(), I8042_PORT_BASE, 5)?;

    // vCPUs: create and configure all before starting any.
    crate::vstate::vcpu::register_kick_handler()?;
    let base_cpuid = cpuid::supported(vm.kvm())?;
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for id in 0..mc.vcpu_count {
        let v = Vcpu::new(&vm, id, pio.clone(), mmio.clone())?;
        v.configure(&base_cpuid, mc.vcpu_count, &mem, kernel.entry, kernel.protocol)?;
        vcpus.push(v);
    }
    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let hook = vcpu_start_hook.clone();
        let exit_evt = exits
            .vcpu_exit_evt
            .try_clone()
            .map_err(BuildError::EventFd)?;
        handles.push(v.start(
            exits.vcpu_events.clone(),
            exit_evt,
            hook.map(|h| Box::new(move || h()) as Box<dyn FnOnce() + Send>),
        )?);
    }

    Ok(RunningVm {
        vm,
        mem,
        vcpus: handles,
        serial,
        i8042,
        protocol: kernel.protocol,
        bzimage: kernel.bzimage,
        paused: false,
    })
}
