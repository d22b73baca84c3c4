//! `ember-agent`: the in-guest agent of an ember pod VM.
//!
//! It runs as PID 1 of the pod VM, listens on vsock port 2718 (hyperstart's
//! control port) and speaks a small length-prefixed JSON protocol
//! ([`protocol`]): start containers from a block device or a directory
//! ([`container`]), stop them, exec more processes in them, stream their
//! stdin, stdout and stderr with or without a terminal ([`stdio`]), wait for
//! exit codes, read their logs, write and read small files, and shut the pod
//! down.
//! [`AgentClient`] is the host side, for emberd.
//!
//! On a host (not PID 1) the same binary serves on a unix socket
//! (`--unix PATH`), which is how `agent/tests` exercise it: containers are
//! processes chrooted into temporary roots or loop-mounted ext4 images.
//!
//! The full pod boot test (kernel + `ember-agent` as `/init` under
//! `ember-vmm`) is skipped on this development machine: its nested "PVM" KVM
//! cannot run Linux (SSE/xsave in the guest kernel end the run with
//! `KVM_EXIT_INTERNAL_ERROR`).
//!
//! Building the guest binary (static; the musl target is not installed here):
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!     cargo build --release -p ember-agent --target x86_64-unknown-linux-gnu
//! # -> target/x86_64-unknown-linux-gnu/release/ember-agent
//! ```
//!
//! The explicit `--target` keeps the flag away from build scripts and
//! proc-macros; the workspace's default build flags are unchanged.

pub mod b64;
pub mod client;
pub mod container;
pub mod modules;
pub mod protocol;
pub mod server;
pub mod stdio;
pub mod transport;

pub use client::{AgentClient, ClientError};
pub use protocol::{Event, Exec, Request, Rootfs, StartContainer};
