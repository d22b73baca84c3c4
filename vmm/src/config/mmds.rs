//! `PUT /mmds/config`: the MMDS version, its IPv4 address and the network
//! interfaces allowed to reach it, checked as Firecracker checks them. The
//! data store is [`crate::mmds`].

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Errors in a `/mmds/config` request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsConfigError {
    /// No interface was named.
    #[error("The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    EmptyNetworkIfaceList,
    /// The address is not in 169.254.0.0/16 (minus its first and last /24).
    #[error("The MMDS IPv4 address is not link local.")]
    InvalidIpv4Addr,
    /// An interface id does not name a configured interface.
    #[error("The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.")]
    InvalidNetworkInterfaceId,
}

/// MMDS version: V1 (plain GETs) or V2 (session tokens).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum MmdsVersion {
    /// Requests need no token.
    #[default]
    V1,
    /// Requests need a session token from `PUT /latest/api/token`.
    V2,
}

/// The default MMDS address.
pub const DEFAULT_MMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// `PUT /mmds/config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 (default) or V2.
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces (by `iface_id`) whose guest traffic to `ipv4_address`
    /// goes to the MMDS.
    pub network_interfaces: Vec<String>,
    /// A link-local address; 169.254.169.254 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<Ipv4Addr>,
    /// Answer `text/plain` as EC2's IMDS does, whatever the `Accept` header.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The configured address or the default.
    pub fn address(&self) -> Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4)
    }

    /// Checks the list and the address; `exists` says whether an interface
    /// id is configured.
    pub fn validate(&self, exists: impl Fn(&str) -> bool) -> Result<(), MmdsConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(MmdsConfigError::EmptyNetworkIfaceList);
        }
        if !self.network_interfaces.iter().all(|i| exists(i)) {
            return Err(MmdsConfigError::InvalidNetworkInterfaceId);
        }
        let [a, b, c, _] = self.address().octets();
        // Firecracker's rule: 169.254.[1-254].[0-255].
        if a != 169 || b != 254 || c == 0 || c == 255 {
            return Err(MmdsConfigError::InvalidIpv4Addr);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_interfaces_and_address() {
        let c: MmdsConfig = serde_json::from_str(r#"{"network_interfaces":["1"]}"#).unwrap();
        assert_eq!(c.version, MmdsVersion::V1);
        assert_eq!(c.address(), DEFAULT_MMDS_IPV4);
        c.validate(|i| i == "1").unwrap();
        assert_eq!(
            c.validate(|_| false),
            Err(MmdsConfigError::InvalidNetworkInterfaceId)
        );
        let e: MmdsConfig = serde_json::from_str(r#"{"network_interfaces":[]}"#).unwrap();
        assert_eq!(
            e.validate(|_| true),
            Err(MmdsConfigError::EmptyNetworkIfaceList)
        );
        let a: MmdsConfig = serde_json::from_str(
            r#"{"version":"V2","network_interfaces":["1"],"ipv4_address":"10.0.0.1"}"#,
        )
        .unwrap();
        assert_eq!(a.validate(|_| true), Err(MmdsConfigError::InvalidIpv4Addr));
        assert!(serde_json::from_str::<MmdsConfig>(
            r#"{"network_interfaces":["1"],"ipv4_address":"x"}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<MmdsConfig>(r#"{"version":"V3","network_interfaces":[]}"#)
                .is_err()
        );
    }
}
