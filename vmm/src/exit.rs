//! Why a microVM ended ([`ExitReason`], re-exported by [`crate::microvm`]).

use std::fmt;

use crate::vstate::vcpu::VcpuExitReason;
use crate::ExitCode;

/// Why a microVM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (command 0xfe, or a
    /// Ctrl-Alt-Del it acted on).
    I8042Reset,
    /// A vCPU stopped: a reset or power off (clean), or a crash (triple
    /// fault, KVM internal error, failed entry).
    Vcpu {
        /// The vCPU index.
        id: u8,
        /// What stopped it.
        reason: VcpuExitReason,
    },
    /// SIGTERM arrived (only with [`crate::microvm::MicroVmBuilder::handle_sigterm`]).
    Terminated,
    /// [`crate::microvm::MicroVmHandle::stop`] (or dropping the handle) stopped it.
    Stopped,
}

impl ExitReason {
    /// True when the guest ended on purpose (reset, power off) or the host
    /// stopped it; false for a guest crash.
    pub fn is_clean(&self) -> bool {
        match self {
            ExitReason::Vcpu { reason, .. } => reason.is_clean(),
            _ => true,
        }
    }

    /// The `ember-vmm` exit status for this reason.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ExitReason::Terminated => ExitCode::Terminated,
            r if r.is_clean() => ExitCode::Ok,
            _ => ExitCode::GuestError,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::I8042Reset => write!(f, "guest requested a reset (i8042)"),
            ExitReason::Vcpu { id, reason } => write!(f, "vCPU {id}: {reason}"),
            ExitReason::Terminated => write!(f, "SIGTERM"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
        }
    }
}
