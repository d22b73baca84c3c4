//! Device models for ember-vmm.
//!
//! - [`bus`]: address-range dispatch used by vCPU exits.
//! - [`legacy`]: port-I/O devices (8250 serial via vm-superio, i8042).
//! - [`virtio`]: virtio devices and the virtio-mmio transport (kept apart).
//! - [`mmds`]: the in-VMM metadata service a guest reaches over its
//!   virtio-net interface (ARP, IPv4, TCP and HTTP, answered inside the VMM).

#![warn(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod mmds;
pub mod virtio;
