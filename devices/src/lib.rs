//! Device models for ember-vmm.
//!
//! - [`bus`]: address-range dispatch used by vCPU exits.
//! - [`legacy`]: port-I/O devices (8250 serial via vm-superio, i8042).
//! - [`virtio`]: virtio devices and the virtio-mmio transport (kept apart).
//! - [`mmds`]: the in-VMM metadata service a guest reaches over its
//!   virtio-net interface (ARP, IPv4, TCP and HTTP, answered inside the VMM).

#![warn(missing_docs)]

/// Guest memory as every device and the VMM see it: mmap-backed regions
/// with a dirty bitmap that vm-memory sets on each write the VMM makes (a
/// device filling a buffer, a used ring), so a diff snapshot can include
/// the pages the VMM wrote next to those KVM's dirty log reports.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

pub mod bus;
pub mod legacy;
pub mod mmds;
pub mod virtio;
