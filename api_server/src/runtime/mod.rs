//! Running guests: launching jailed VMMs and watching them ([`process`]),
//! TAP devices and guest network parameters ([`netdev`]), the sessions
//! with pod VMs' agents ([`agent`]) and the containers' streamed output
//! ([`stdio`]), the per-instance config restored unikernel guests fetch
//! ([`restore_config`]), and instant starts from snapshots ([`warm`]).

pub mod agent;
pub mod netdev;
pub mod portfwd;
pub mod process;
pub mod restore_config;
pub mod stdio;
pub mod vmm_api;
pub mod warm;
