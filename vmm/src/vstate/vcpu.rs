//! vCPUs: configuration and the per-thread run loop.
//!
//! Each vCPU runs on its own thread. The VMM thread talks to it through a
//! command channel; to get a vCPU out of KVM_RUN it sends a real-time signal
//! whose handler sets `immediate_exit` in that thread's `kvm_run`, so a kick
//! that lands just before KVM_RUN is not lost.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::Bus;
use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{Cap, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vm::Vm;
use crate::arch::regs::BootProtocol;
use crate::arch::{cpuid, interrupts, msr, regs};
use crate::config::cpu_config::CpuTemplate;
use crate::snapshot::{from_blob, to_blob, Blob, SnapshotError};

/// Errors creating, configuring or driving vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {id} failed: {err}")]
    Create { id: u8, err: kvm_ioctls::Error },
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Lapic(#[from] interrupts::InterruptsError),
    #[error("cannot register the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot spawn the vCPU {id} thread: {err}")]
    Spawn { id: u8, err: std::io::Error },
    #[error("vCPU {id} did not answer within {ms} ms")]
    NoResponse { id: u8, ms: u128 },
    #[error("vCPU {0} has exited")]
    Gone(u8),
}

/// What the VMM thread asks a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    Pause,
    Resume,
    Exit,
    /// Answered with [`VcpuResponse::State`]; only while paused.
    SaveState,
}

/// What a vCPU answers.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    /// The vCPU's snapshot state (or why it could not be read).
    State(Box<Result<VcpuState, SnapshotError>>),
    /// `SaveState` while running.
    NotPaused,
}

impl VcpuResponse {
    fn same_kind(&self, other: &VcpuResponse) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// A vCPU's state in a snapshot: raw KVM structures, and which optional
/// parts this host could save (nested hosts may lack XSAVE, XCRs or debug
/// registers; a state that needs a part the loading host lacks is refused).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU id (its index).
    pub id: u8,
    /// CPUID entries (`kvm_cpuid_entry2` each) as set on the vCPU.
    pub cpuid: Vec<Blob>,
    /// MSRs (index, value), in the order saved.
    pub msrs: Vec<(u32, u64)>,
    /// `kvm_regs`.
    pub regs: Blob,
    /// `kvm_sregs`.
    pub sregs: Blob,
    /// `kvm_xsave`, when the host has KVM_CAP_XSAVE.
    pub xsave: Option<Blob>,
    /// `kvm_fpu`, when there is no XSAVE.
    pub fpu: Option<Blob>,
    /// `kvm_xcrs`, when the host has KVM_CAP_XCRS.
    pub xcrs: Option<Blob>,
    /// `kvm_debugregs`, when the host has KVM_CAP_DEBUGREGS.
    pub debugregs: Option<Blob>,
    /// `kvm_lapic_state`.
    pub lapic: Blob,
    /// `kvm_mp_state`.
    pub mp_state: Blob,
    /// `kvm_vcpu_events`.
    pub vcpu_events: Blob,
    /// The guest's TSC frequency, when the host tells it.
    pub tsc_khz: Option<u32>,
}

/// More MSRs than a state holds (KVM lists a few hundred at most).
const MAX_SAVED_MSRS: usize = 2048;

/// The optional vCPU state parts this host's KVM has.
#[derive(Clone, Copy, Debug, Default)]
struct VcpuCaps {
    xsave: bool,
    xcrs: bool,
    debugregs: bool,
    tsc_khz: bool,
    tsc_control: bool,
}

/// TSC frequencies within 250 ppm are the same clock (calibration noise).
fn tsc_differs(a: u32, b: u32) -> bool {
    (i64::from(a) - i64::from(b)).abs() > i64::from(b) * 250 / 1_000_000
}

/// Why a vCPU stopped running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// The guest asked to power off (KVM system event).
    Shutdown,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR (e.g. an instruction KVM cannot emulate).
    InternalError {
        /// KVM's suberror code (1: emulation failed).
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// The hardware entry failure reason.
        reason: u64,
    },
    /// KVM_EXIT_HLT with nothing to wake the vCPU.
    Halted,
    /// An exit ember does not handle, or KVM_RUN failing.
    Other(String),
    /// The VMM asked the vCPU to exit.
    Requested,
}

impl VcpuExitReason {
    /// True when the guest ended on purpose (reset, power off).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            VcpuExitReason::Reset | VcpuExitReason::Shutdown | VcpuExitReason::Requested
        )
    }
}

impl std::fmt::Display for VcpuExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuExitReason::Reset => write!(f, "guest requested a reset"),
            VcpuExitReason::Shutdown => write!(f, "guest powered off"),
            VcpuExitReason::TripleFault => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)")
            }
            VcpuExitReason::InternalError { suberror } => write!(
                f,
                "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}: {})",
                match suberror {
                    1 => "instruction emulation failed",
                    2 => "simultaneous exceptions",
                    3 => "delivery event via",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                }
            ),
            VcpuExitReason::FailEntry { reason } => {
                write!(f, "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x})")
            }
            VcpuExitReason::Halted => write!(f, "guest halted (KVM_EXIT_HLT)"),
            VcpuExitReason::Other(s) => write!(f, "{s}"),
            VcpuExitReason::Requested => write!(f, "stopped by the VMM"),
        }
    }
}

/// A vCPU's final report to the VMM thread.
#[derive(Clone, Debug)]
pub struct VcpuEvent {
    pub id: u8,
    pub reason: VcpuExitReason,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Offset from SIGRTMIN of the signal that kicks vCPUs out of KVM_RUN.
pub const VCPU_KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> i32 {
    SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set
        // before the thread first enters KVM_RUN and valid while it runs.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler (once per process; repeated calls are harmless).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    msrs_to_save: Vec<u32>,
    caps: VcpuCaps,
}

impl Vcpu {
    /// Creates vCPU `id` on `vm`, dispatching exits to the two buses.
    pub fn new(vm: &Vm, id: u8, pio: Bus, mmio: Bus) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|err| VcpuError::Create { id, err })?;
        let k = vm.kvm();
        let caps = VcpuCaps {
            xsave: k.check_extension(Cap::Xsave),
            xcrs: k.check_extension(Cap::Xcrs),
            debugregs: k.check_extension(Cap::Debugregs),
            tsc_khz: k.check_extension(Cap::GetTscKhz),
            tsc_control: k.check_extension(Cap::TscControl),
        };
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            msrs_to_save: vm.msrs_to_save().to_vec(),
            caps,
        })
    }

    /// Saves this vCPU's state. Runs on the vCPU's thread while paused. A
    /// last KVM_RUN with `immediate_exit` set first completes an I/O exit
    /// the guest is waiting on (the value of an `in` lands in RAX only on
    /// the next entry), without running guest code.
    fn save_state(&mut self) -> Result<VcpuState, SnapshotError> {
        let kvm = |what| move |err| SnapshotError::Kvm { what, err };
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let id = self.id;
        // KVM_GET_MP_STATE first: it may change LAPIC state; events last.
        let mp_state = self.fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let optional = |on: bool, what: &str, r: Result<Blob, kvm_ioctls::Error>| -> Option<Blob> {
            if !on {
                return None;
            }
            r.map_err(|e| log::warn!("snapshot: vCPU {id}: {what} failed ({e}); not saved"))
                .ok()
        };
        let xsave = optional(
            self.caps.xsave,
            "KVM_GET_XSAVE",
            self.fd.get_xsave().map(|x| to_blob(&x)),
        );
        let fpu = if xsave.is_none() {
            Some(to_blob(&self.fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?))
        } else {
            None
        };
        let xcrs = optional(
            self.caps.xcrs,
            "KVM_GET_XCRS",
            self.fd.get_xcrs().map(|x| to_blob(&x)),
        );
        let debugregs = optional(
            self.caps.debugregs,
            "KVM_GET_DEBUGREGS",
            self.fd.get_debug_regs().map(|x| to_blob(&x)),
        );
        let lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let tsc_khz = if self.caps.tsc_khz {
            self.fd.get_tsc_khz().ok()
        } else {
            None
        };
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        let msrs = msr::get_msrs(&self.fd, &self.msrs_to_save)
            .map_err(|e| SnapshotError::Unsupported(format!("vCPU {id} MSRs: {e}")))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().iter().map(to_blob).collect(),
            msrs,
            regs: to_blob(&regs),
            sregs: to_blob(&sregs),
            xsave,
            fpu,
            xcrs,
            debugregs,
            lapic: to_blob(&lapic),
            mp_state: to_blob(&mp_state),
            vcpu_events: to_blob(&events),
            tsc_khz,
        })
    }

    /// Loads `s` into this (new, not yet running) vCPU, in the order KVM
    /// needs: CPUID, MP state, registers, special registers (they restore
    /// the APIC base), FPU/XSAVE, XCRs, debug registers, LAPIC (before the
    /// MSRs: the TSC deadline needs it), MSRs, then events (SET_REGS clears
    /// pending exceptions, which the events restore).
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), SnapshotError> {
        let kvm = |what| move |err| SnapshotError::Kvm { what, err };
        let id = self.id;
        let need = |present: bool, on: bool, part: &str, cap: &str| {
            if present && !on {
                Err(SnapshotError::Unsupported(format!(
                    "vcpus[{id}].{part}: this host's KVM has no {cap}"
                )))
            } else {
                Ok(())
            }
        };
        need(s.xsave.is_some(), self.caps.xsave, "xsave", "KVM_CAP_XSAVE")?;
        need(s.xcrs.is_some(), self.caps.xcrs, "xcrs", "KVM_CAP_XCRS")?;
        need(
            s.debugregs.is_some(),
            self.caps.debugregs,
            "debugregs",
            "KVM_CAP_DEBUGREGS",
        )?;
        if s.xsave.is_none() && s.fpu.is_none() {
            return Err(SnapshotError::Invalid(format!(
                "vcpus[{id}]: neither xsave nor fpu"
            )));
        }
        if s.msrs.len() > MAX_SAVED_MSRS {
            return Err(SnapshotError::Invalid(format!(
                "vcpus[{id}].msrs: {} entries, at most {MAX_SAVED_MSRS}",
                s.msrs.len()
            )));
        }
        if s.cpuid.is_empty() || s.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(SnapshotError::Invalid(format!(
                "vcpus[{id}].cpuid: {} entries",
                s.cpuid.len()
            )));
        }
        if let Some(want) = s.tsc_khz {
            let have = if self.caps.tsc_khz {
                self.fd.get_tsc_khz().ok()
            } else {
                None
            };
            match have {
                Some(h) if !tsc_differs(h, want) => {}
                _ if self.caps.tsc_control => {
                    self.fd.set_tsc_khz(want).map_err(kvm("KVM_SET_TSC_KHZ"))?
                }
                Some(h) => {
                    return Err(SnapshotError::Unsupported(format!(
                        "vcpus[{id}]: TSC of {want} kHz saved, this host runs {h} kHz and cannot scale it (no KVM_CAP_TSC_CONTROL)"
                    )))
                }
                None => log::warn!(
                    "snapshot: vCPU {id}: the host does not tell its TSC frequency; assuming {want} kHz"
                ),
            }
        }
        let mut entries = Vec::with_capacity(s.cpuid.len());
        for (i, b) in s.cpuid.iter().enumerate() {
            entries.push(from_blob::<kvm_bindings::kvm_cpuid_entry2>(
                b,
                &format!("vcpus[{id}].cpuid[{i}]"),
            )?);
        }
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| SnapshotError::Invalid(format!("vcpus[{id}].cpuid: {e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        let field = |f: &str| format!("vcpus[{id}].{f}");
        self.fd
            .set_mp_state(from_blob(&s.mp_state, &field("mp_state"))?)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&from_blob(&s.regs, &field("regs"))?)
            .map_err(kvm("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&from_blob(&s.sregs, &field("sregs"))?)
            .map_err(kvm("KVM_SET_SREGS"))?;
        match (&s.xsave, &s.fpu) {
            (Some(x), _) => {
                let x: kvm_bindings::kvm_xsave = from_blob(x, &field("xsave"))?;
                // SAFETY: `x` is a whole kvm_xsave (4 KiB); KVM reads no
                // more than that for a guest without extended (AMX) state.
                unsafe { self.fd.set_xsave(&x) }.map_err(kvm("KVM_SET_XSAVE"))?;
            }
            (None, Some(f)) => self
                .fd
                .set_fpu(&from_blob(f, &field("fpu"))?)
                .map_err(kvm("KVM_SET_FPU"))?,
            (None, None) => unreachable!("checked above"),
        }
        if let Some(x) = &s.xcrs {
            self.fd
                .set_xcrs(&from_blob(x, &field("xcrs"))?)
                .map_err(kvm("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &s.debugregs {
            self.fd
                .set_debug_regs(&from_blob(d, &field("debugregs"))?)
                .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        }
        self.fd
            .set_lapic(&from_blob(&s.lapic, &field("lapic"))?)
            .map_err(kvm("KVM_SET_LAPIC"))?;
        msr::set_msrs(&self.fd, &s.msrs)
            .map_err(|e| SnapshotError::Unsupported(format!("vcpus[{id}].msrs: {e}")))?;
        self.fd
            .set_vcpu_events(&from_blob(&s.vcpu_events, &field("vcpu_events"))?)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        // Tells a kvmclock guest it was stopped (no soft-lockup warnings);
        // EINVAL when the guest does not use kvmclock, which is fine.
        let _ = self.fd.kvmclock_ctrl();
        Ok(())
    }

    /// Sets CPUID, MSRs, registers and the LAPIC for booting at `entry`.
    #[allow(clippy::too_many_arguments)]
    pub fn configure(
        &mut self,
        base_cpuid: &CpuId,
        count: u8,
        smt: bool,
        template: Option<&CpuTemplate>,
        mem: &GuestMemoryMmap,
        entry: u64,
        proto: BootProtocol,
    ) -> Result<(), VcpuError> {
        let mut c = base_cpuid.clone();
        cpuid::normalize(&mut c, self.id, count, smt);
        if let Some(t) = template {
            cpuid::apply_template(&mut c, &t.cpuid)?;
        }
        self.fd.set_cpuid2(&c).map_err(VcpuError::SetCpuid)?;
        msr::setup_msrs(&self.fd)?;
        if let Some(t) = template {
            msr::apply_template(&self.fd, &t.msrs)?;
            // A template's MSRs are part of the vCPU a snapshot keeps.
            for m in &t.msrs {
                if !self.msrs_to_save.contains(&m.addr) {
                    self.msrs_to_save.push(m.addr);
                }
            }
        }
        regs::setup_regs(&self.fd, entry, proto)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_sregs(mem, &self.fd, proto)?;
        interrupts::set_lint(&self.fd)?;
        Ok(())
    }

    /// Starts the vCPU thread. Its last act is sending a [`VcpuEvent`] on
    /// `events` and writing `exit_evt`.
    /// With `paused` the thread pauses before it first enters the guest
    /// (its `Paused` answer is queued for the VMM).
    pub fn start(
        self,
        events: Sender<VcpuEvent>,
        exit_evt: EventFd,
        on_start: Option<Box<dyn FnOnce() + Send>>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (cmd_tx, cmd_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("ember_vcpu{id}"))
            .spawn(move || {
                if let Some(f) = on_start {
                    f();
                }
                let mut me = self;
                let reason = match paused {
                    true => me.handle_command(VcpuCommand::Pause, &cmd_rx, &resp_tx),
                    false => None,
                };
                let reason = match reason {
                    Some(r) => r,
                    None => me.run_loop(&cmd_rx, &resp_tx),
                };
                KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
                let _ = events.send(VcpuEvent { id, reason });
                let _ = exit_evt.write(1);
            })
            .map_err(|err| VcpuError::Spawn { id, err })?;
        Ok(VcpuHandle {
            id,
            cmd_tx,
            resp_rx,
            thread: Some(thread),
        })
    }

    /// Handles one command; returns Some(reason) if the vCPU must stop.
    fn handle_command(
        &mut self,
        cmd: VcpuCommand,
        cmds: &Receiver<VcpuCommand>,
        resp: &Sender<VcpuResponse>,
    ) -> Option<VcpuExitReason> {
        match cmd {
            VcpuCommand::Exit => Some(VcpuExitReason::Requested),
            VcpuCommand::Resume => {
                let _ = resp.send(VcpuResponse::Resumed);
                None
            }
            VcpuCommand::SaveState => {
                let _ = resp.send(VcpuResponse::NotPaused);
                None
            }
            VcpuCommand::Pause => {
                let _ = resp.send(VcpuResponse::Paused);
                loop {
                    match cmds.recv() {
                        Ok(VcpuCommand::Resume) => {
                            let _ = resp.send(VcpuResponse::Resumed);
                            return None;
                        }
                        Ok(VcpuCommand::Pause) => {
                            let _ = resp.send(VcpuResponse::Paused);
                        }
                        Ok(VcpuCommand::SaveState) => {
                            let st = self.save_state();
                            let _ = resp.send(VcpuResponse::State(Box::new(st)));
                        }
                        Ok(VcpuCommand::Exit) | Err(_) => return Some(VcpuExitReason::Requested),
                    }
                }
            }
        }
    }

    fn run_loop(
        &mut self,
        cmds: &Receiver<VcpuCommand>,
        resp: &Sender<VcpuResponse>,
    ) -> VcpuExitReason {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        let mut unhandled_mmio = 0u32;
        loop {
            while let Ok(cmd) = cmds.try_recv() {
                if let Some(reason) = self.handle_command(cmd, cmds, resp) {
                    return reason;
                }
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            data.fill(0xff);
                        }
                    }
                    VcpuExit::IoOut(port, data) => {
                        self.pio.write(u64::from(port), data);
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            data.fill(0);
                            unhandled_mmio = log_unhandled_mmio(unhandled_mmio, "read", addr);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !self.mmio.write(addr, data) {
                            unhandled_mmio = log_unhandled_mmio(unhandled_mmio, "write", addr);
                        }
                    }
                    VcpuExit::Intr => {
                        self.fd.set_kvm_immediate_exit(0);
                    }
                    VcpuExit::Hlt => return VcpuExitReason::Halted,
                    VcpuExit::Shutdown => return VcpuExitReason::TripleFault,
                    VcpuExit::SystemEvent(kind, _) => {
                        return match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::Shutdown,
                            other => VcpuExitReason::Other(format!(
                                "KVM_EXIT_SYSTEM_EVENT of type {other}"
                            )),
                        }
                    }
                    VcpuExit::InternalError => {
                        // SAFETY: reading the union member KVM filled for this exit reason.
                        let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
                        return VcpuExitReason::InternalError { suberror };
                    }
                    VcpuExit::FailEntry(reason, _) => return VcpuExitReason::FailEntry { reason },
                    other => {
                        return VcpuExitReason::Other(format!("unexpected KVM exit: {other:?}"))
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuExitReason::Other(format!("KVM_RUN failed: {e}")),
            }
        }
    }
}

fn log_unhandled_mmio(count: u32, what: &str, addr: u64) -> u32 {
    const LIMIT: u32 = 10;
    if count < LIMIT {
        eprintln!("ember-vmm: unhandled MMIO {what} at {addr:#x}");
        if count + 1 == LIMIT {
            eprintln!("ember-vmm: further unhandled MMIO accesses are not logged");
        }
    }
    count.saturating_add(1)
}

/// The VMM thread's handle on a running vCPU.
pub struct VcpuHandle {
    id: u8,
    cmd_tx: Sender<VcpuCommand>,
    resp_rx: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `cmd` and kicks the vCPU out of KVM_RUN.
    pub fn send(&self, cmd: VcpuCommand) -> Result<(), VcpuError> {
        self.cmd_tx
            .send(cmd)
            .map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(t) = &self.thread {
            // SAFETY: the thread handle is alive (not joined); signalling a
            // finished thread is harmless (ESRCH is ignored).
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        Ok(())
    }

    /// Asks the paused vCPU for its snapshot state.
    pub fn save_state(&self, timeout: Duration) -> Result<VcpuState, SnapshotError> {
        let gone = |e: VcpuError| SnapshotError::Unsupported(format!("vCPU {}: {e}", self.id));
        self.send(VcpuCommand::SaveState).map_err(gone)?;
        loop {
            match self.resp_rx.recv_timeout(timeout) {
                Ok(VcpuResponse::State(s)) => return *s,
                Ok(VcpuResponse::NotPaused) => {
                    return Err(SnapshotError::Unsupported(format!(
                        "vCPU {} is not paused",
                        self.id
                    )))
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(gone(VcpuError::NoResponse {
                        id: self.id,
                        ms: timeout.as_millis(),
                    }))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone(VcpuError::Gone(self.id))),
            }
        }
    }

    /// Waits for the vCPU's answer.
    pub fn expect(&self, want: VcpuResponse, timeout: Duration) -> Result<(), VcpuError> {
        loop {
            match self.resp_rx.recv_timeout(timeout) {
                Ok(r) if r.same_kind(&want) => return Ok(()),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::NoResponse {
                        id: self.id,
                        ms: timeout.as_millis(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
            }
        }
    }

    /// Asks the thread to exit and waits for it.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuCommand::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_read_well() {
        assert!(VcpuExitReason::Reset.is_clean());
        assert!(!VcpuExitReason::TripleFault.is_clean());
        let s = VcpuExitReason::InternalError { suberror: 1 }.to_string();
        assert!(s.contains("emulation failed"), "{s}");
        assert!(VcpuExitReason::TripleFault
            .to_string()
            .contains("triple fault"));
    }

    #[test]
    fn unhandled_mmio_logging_is_bounded() {
        let mut c = 0;
        for _ in 0..100 {
            c = log_unhandled_mmio(c, "read", 0x1000);
        }
        assert_eq!(c, 100);
    }
}
