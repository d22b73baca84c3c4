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
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use devices::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vm::Vm;
use crate::arch::regs::BootProtocol;
use crate::arch::{cpuid, interrupts, msr, regs};
use crate::config::cpu_config::CpuTemplate;

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
}

/// What a vCPU answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
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
}

impl Vcpu {
    /// Creates vCPU `id` on `vm`, dispatching exits to the two buses.
    pub fn new(vm: &Vm, id: u8, pio: Bus, mmio: Bus) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|err| VcpuError::Create { id, err })?;
        Ok(Vcpu { id, fd, pio, mmio })
    }

    /// Sets CPUID, MSRs, registers and the LAPIC for booting at `entry`.
    #[allow(clippy::too_many_arguments)]
    pub fn configure(
        &self,
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
        }
        regs::setup_regs(&self.fd, entry, proto)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_sregs(mem, &self.fd, proto)?;
        interrupts::set_lint(&self.fd)?;
        Ok(())
    }

    /// Starts the vCPU thread. Its last act is sending a [`VcpuEvent`] on
    /// `events` and writing `exit_evt`.
    pub fn start(
        self,
        events: Sender<VcpuEvent>,
        exit_evt: EventFd,
        on_start: Option<Box<dyn FnOnce() + Send>>,
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
                let reason = me.run_loop(&cmd_rx, &resp_tx);
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

    /// Waits for the vCPU's answer.
    pub fn expect(&self, want: VcpuResponse, timeout: Duration) -> Result<(), VcpuError> {
        loop {
            match self.resp_rx.recv_timeout(timeout) {
                Ok(r) if r == want => return Ok(()),
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
