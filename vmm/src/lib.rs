//! ember-vmm: one KVM microVM per process.
//!
//! - [`arch`]: x86_64 layout, boot information, registers, CPUID, MSRs.
//! - [`vstate`]: the KVM VM and its vCPU threads.
//! - [`config`]: one struct per API resource (Firecracker JSON shapes).
//! - [`loader`]: kernel/initrd/cmdline loading with linux-loader.
//! - [`builder`]: configuration -> running microVM.
//! - [`controller`]: the VMM thread's state machine.
//! - [`api`]: the per-VM HTTP API (routes -> [`actions::VmmAction`]).
#![cfg(target_arch = "x86_64")]

use std::sync::{Arc, Mutex};

pub mod actions;
pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod loader;
pub mod logger;
pub mod seccomp;
pub mod stdin;
pub mod term;
pub mod vstate;

/// The VMM thread's event loop.
pub type EventManager = event_manager::EventManager<
    Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>,
>;

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
