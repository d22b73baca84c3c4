//! Running guests: launching jailed VMMs and watching them ([`process`]),
//! TAP devices and guest network parameters ([`netdev`]).

pub mod netdev;
pub mod process;
