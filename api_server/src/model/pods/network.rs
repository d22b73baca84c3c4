//! Pod `interfaces`: each one is a virtio-net device of the pod VM backed
//! by a persistent host TAP (named from the VM id, owned by the VMM's uid,
//! removed with the VM), optionally added to an existing host bridge
//! (`bridge`). Guest devices are `eth0`, `eth1`, ... in list order, so an
//! `ifname` must be that name. The first interface's IPv4 `ip` (CIDR) and
//! `gateway` reach the guest as the kernel's `ip=` parameter (the pod
//! kernel needs `CONFIG_IP_PNP`); an address on a later interface, an MTU
//! other than 1500 and IPv6 are refused, since nothing in the guest would
//! apply them.

use serde::Deserialize;

use super::{PodError, Result};
use crate::runtime::netdev::{self, StaticAddress};

/// Most interfaces a pod may have.
pub const MAX_INTERFACES: usize = 4;

/// An interface in hyperd's pod spec.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct InterfaceSpec {
    #[serde(default)]
    pub bridge: String,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default)]
    pub mtu: u64,
    #[serde(default)]
    pub gateway: String,
}

/// A pod interface, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    /// Host bridge the TAP joins.
    pub bridge: Option<String>,
    /// Guest MAC.
    pub mac: Option<String>,
    /// Static IPv4 address (first interface only).
    pub address: Option<StaticAddress>,
}

impl PodInterface {
    /// The host side of an unbridged interface: its IPv4 gateway with the
    /// address's prefix length.
    pub fn host_address(&self) -> Option<(std::net::Ipv4Addr, u8)> {
        let a = self.address.as_ref()?;
        let gw = match a.gateway_ip().ok()?? {
            std::net::IpAddr::V4(g) => g,
            std::net::IpAddr::V6(_) => return None,
        };
        let (_, prefix) = a.ip_prefix().ok()?;
        Some((gw, prefix))
    }

    /// The address without its prefix length (hyperd's `podIP`).
    pub fn ip(&self) -> Option<String> {
        self.address
            .as_ref()
            .map(|a| a.cidr.split('/').next().unwrap_or_default().to_string())
    }
}

fn is_unicast_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// Checks a pod's interfaces.
pub fn pod_interfaces(list: &[InterfaceSpec]) -> Result<Vec<PodInterface>> {
    if list.len() > MAX_INTERFACES {
        return Err(PodError::Invalid(format!(
            "a pod has at most {MAX_INTERFACES} interfaces, not {}",
            list.len()
        )));
    }
    let mut out = Vec::new();
    for (i, n) in list.iter().enumerate() {
        let bad = |m: String| PodError::Invalid(format!("interface {i}: {m}"));
        if !n.ifname.is_empty() && n.ifname != format!("eth{i}") {
            return Err(bad(format!(
                "ifname {:?}: guest devices are eth0, eth1, ... in list order, so this one is eth{i}",
                n.ifname
            )));
        }
        if n.mtu != 0 && n.mtu != 1500 {
            return Err(bad(format!(
                "mtu {} is not supported (the guest's devices use 1500)",
                n.mtu
            )));
        }
        let mac = match n.mac.as_str() {
            "" => None,
            m if is_unicast_mac(m) => Some(m.to_ascii_lowercase()),
            m => return Err(bad(format!("mac {m:?} is not a unicast MAC address"))),
        };
        let bridge = match n.bridge.as_str() {
            "" => None,
            b => {
                netdev::validate_ifname(b).map_err(|e| bad(e.to_string()))?;
                Some(b.to_string())
            }
        };
        let address = match (n.ip.as_str(), n.gateway.as_str()) {
            ("", "") => None,
            ("", _) => return Err(bad("a gateway needs an ip".into())),
            (_, _) if i > 0 => {
                return Err(bad(
                    "only the first interface's address is configured (the kernel's ip= parameter); configure later ones inside the container".into(),
                ))
            }
            (ip, gw) => {
                if !ip.contains('/') || ip.contains(':') {
                    return Err(bad(format!(
                        "ip {ip:?} must be IPv4 in CIDR form, e.g. 10.0.0.2/24"
                    )));
                }
                Some(
                    StaticAddress::parse(ip, Some(gw), &[]).map_err(|e| bad(e.to_string()))?,
                )
            }
        };
        out.push(PodInterface {
            bridge,
            mac,
            address,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(ip: &str, gw: &str, mac: &str) -> InterfaceSpec {
        InterfaceSpec {
            ip: ip.into(),
            gateway: gw.into(),
            mac: mac.into(),
            ..Default::default()
        }
    }

    #[test]
    fn interfaces_are_checked() {
        let ok = pod_interfaces(&[
            nic("10.77.0.2/24", "10.77.0.1", "02:00:00:00:00:01"),
            InterfaceSpec {
                bridge: "br0".into(),
                ifname: "eth1".into(),
                mtu: 1500,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(ok[0].ip().as_deref(), Some("10.77.0.2"));
        assert_eq!(ok[1].bridge.as_deref(), Some("br0"));
        for bad in [
            vec![nic("10.77.0.2", "", "")],
            vec![nic("fd00::2/64", "", "")],
            vec![nic("", "10.0.0.1", "")],
            vec![nic("", "", "03:00:00:00:00:01")],
            vec![nic("", "", "zz")],
            vec![nic("", "", ""), nic("10.0.0.3/24", "", "")],
            vec![InterfaceSpec {
                ifname: "wlan0".into(),
                ..Default::default()
            }],
            vec![InterfaceSpec {
                mtu: 9000,
                ..Default::default()
            }],
            vec![InterfaceSpec {
                bridge: "a b".into(),
                ..Default::default()
            }],
            vec![InterfaceSpec::default(); 5],
        ] {
            assert!(pod_interfaces(&bad).is_err(), "{bad:?}");
        }
    }
}
