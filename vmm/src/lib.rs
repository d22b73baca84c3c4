//! ember-vmm: one KVM microVM per process.
#![cfg(target_arch = "x86_64")]

pub mod arch;
