//! ember's performance floor, lifecycle, throughput and emberd benchmarks.
//!
//! - [`emberd`]: instance starts per second through emberd's API next to
//!   the jailer-only and VMM-only spawn rates, and API requests per second.
//! - [`floor`]: `kvm-floor`, the smallest VMM that can boot the ember test
//!   guest (one vCPU, port I/O only) — a lower bound for ember-vmm's boot time
//!   and a way to exercise the guest without the real VMM.
//! - [`lifecycle`]: the ember-vmm vs kvm-floor boot-to-exit benchmark.
//! - [`overhead`]: API-ready time and memory outside guest memory, ember-vmm
//!   beside api-floor, kvm-floor and (when given) Firecracker.
//! - [`setup`]: the bench binaries' start-up (binary directory, arguments).
//! - [`stats`]: median / percentile helpers for the benchmarks.
//! - [`throughput`]: virtio-blk / virtio-net throughput of the test guest
//!   under ember-vmm next to the host's raw file / TAP throughput.

pub mod emberd;
pub mod floor;
pub mod lifecycle;
pub mod overhead;
pub mod setup;
pub mod stats;
pub mod throughput;
