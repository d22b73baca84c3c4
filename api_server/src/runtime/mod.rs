//! Running guests: launching jailed VMMs and watching them ([`process`]),
//! TAP devices and guest network parameters ([`netdev`]), and the sessions
//! with pod VMs' agents ([`agent`]).

pub mod agent;
pub mod netdev;
pub mod portfwd;
pub mod process;
pub mod vmm_api;
