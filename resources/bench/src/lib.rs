//! ember's performance floor and lifecycle benchmark.
//!
//! - [`floor`]: `kvm-floor`, the smallest VMM that can boot the ember test
//!   guest (one vCPU, port I/O only) — a lower bound for ember-vmm's boot time
//!   and a way to exercise the guest without the real VMM.
//! - [`stats`]: median / percentile helpers for the `lifecycle` benchmark.

pub mod floor;
pub mod stats;
