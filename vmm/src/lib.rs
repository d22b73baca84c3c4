//! ember's VMM as a library: boot and drive a KVM microVM from Rust.
//!
//! `ember-vmm` (this crate's binary) is a thin command-line front end over
//! the API documented here; an embedder gets the same VMM without the
//! process around it.
//!
//! # Example
//!
//! Boot a kernel with one vCPU and 64 MiB, collect its console, pause and
//! resume it, then ask it to reboot with Ctrl-Alt-Del:
//!
//! ```no_run
//! use std::sync::mpsc::channel;
//! use vmm::{ExitReason, MicroVm, Serial};
//!
//! # fn main() -> Result<(), vmm::MicroVmError> {
//! let (tx, rx) = channel::<Vec<u8>>();
//! let mut vm = MicroVm::builder()
//!     .kernel("ember-guest-pvh.elf")
//!     .cmdline("console=ttyS0 ember.test=wait-ctrlaltdel")
//!     .vcpus(1)
//!     .memory_mib(64)
//!     .serial(Serial::Callback(Box::new(move |bytes| {
//!         let _ = tx.send(bytes.to_vec());
//!     })))
//!     .build()?
//!     .start()?;
//! vm.pause()?;
//! vm.resume()?;
//! vm.send_ctrl_alt_del()?;
//! let reason: ExitReason = vm.wait()?;
//! let console: Vec<u8> = rx.try_iter().flatten().collect();
//! println!("{}\nended: {reason}", String::from_utf8_lossy(&console));
//! # Ok(())
//! # }
//! ```
//!
//! Drives, network interfaces and vsock take the same structs as
//! Firecracker's JSON ([`config::DriveConfig`],
//! [`config::NetworkInterfaceConfig`], [`config::VsockDeviceConfig`]);
//! [`MicroVmBuilder::config`] takes a whole [`config::VmConfig`] as parsed
//! from such a file.
//!
//! # Requirements
//!
//! x86_64 Linux with read-write access to `/dev/kvm`. Seccomp confinement
//! is off unless asked for with [`MicroVmBuilder::seccomp`]; then
//! [`seccomp::configure_allocator`] must be called first thing in `main`,
//! before the process has a second thread (see [`microvm`]).
//!
//! # Stability
//!
//! The stable embedding API is: [`MicroVm`], [`MicroVmBuilder`],
//! [`MicroVmHandle`], [`Serial`], [`ConsoleCallback`], [`SeccompLevel`],
//! [`StartTimes`],
//! [`ExitReason`], [`MicroVmError`], [`ExitCode`], the configuration
//! structs in [`config`], [`VcpuExitReason`],
//! [`seccomp::configure_allocator`] and [`logger`]. Everything else
//! ([`seccomp::ThreadKind`] and [`seccomp::MALLOC_SETTINGS`], and the
//! crate-private modules: KVM and vCPU state, the loader, the device
//! wiring, the HTTP API routes, the controller) is internal and may change
//! with any release.
#![cfg(target_arch = "x86_64")]
#![warn(missing_docs)]

use std::sync::{Arc, Mutex};

pub(crate) mod actions;
pub(crate) mod api;
pub(crate) mod arch;
pub(crate) mod boot_timer;
pub(crate) mod builder;
pub mod config;
pub(crate) mod console;
pub(crate) mod controller;
pub(crate) mod exit;
pub(crate) mod loader;
pub mod logger;
pub mod metrics;
pub mod microvm;
pub mod mmds;
pub mod seccomp;
pub(crate) mod snapshot;
pub(crate) mod stdin;
pub(crate) mod term;
pub(crate) mod vstate;

pub use microvm::{
    ConsoleCallback, ExitReason, MicroVm, MicroVmBuilder, MicroVmError, MicroVmHandle,
    SeccompLevel, Serial, StartTimes,
};
pub use vstate::vcpu::VcpuExitReason;

/// The snapshot state file format version this ember-vmm writes and reads,
/// as `ember-vmm --snapshot-version` prints it (`v1.0.0`).
pub fn snapshot_version() -> String {
    snapshot::format::version_string(snapshot::format::SNAPSHOT_VERSION)
}

/// The format version of the snapshot state file at `path`, printed the
/// same way (`ember-vmm --describe-snapshot`); only its header is read.
pub fn describe_snapshot(path: &str) -> Result<String, String> {
    snapshot::format::describe(path)
        .map(snapshot::format::version_string)
        .map_err(|e| e.to_string())
}

/// The VMM thread's event loop.
pub(crate) type EventManager =
    event_manager::EventManager<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>;

/// Process exit statuses of ember-vmm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// The guest reset or powered off.
    Ok = 0,
    /// Something in the VMM failed.
    GenericError = 1,
    /// Stopped by SIGTERM (128 + 15, what a shell reports for the signal).
    Terminated = 143,
    /// The guest crashed: triple fault, KVM internal error, failed entry.
    GuestError = 3,
    /// The configuration given on the command line is unusable.
    BadConfiguration = 152,
    /// The command line could not be parsed.
    ArgParsing = 153,
}
