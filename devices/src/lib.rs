//! Device models for ember-vmm.
//!
//! - [`bus`]: address-range dispatch used by vCPU exits.
//! - [`legacy`]: port-I/O devices (8250 serial via vm-superio, i8042).
//! - [`virtio`]: virtio devices and the virtio-mmio transport (kept apart).

#![warn(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod virtio;
