//! Ethernet + IPv4 + UDP frames for the host-side net baseline: the same
//! bytes the guest's `bench-net` mode puts on the wire (DF set, no UDP
//! checksum), written straight into a TAP fd.

/// Length of an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IP_HLEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;

/// Addresses and ports of one UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .fold(0u32, |a, w| {
            let s = a + w;
            (s & 0xffff) + (s >> 16)
        });
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One Ethernet frame carrying `payload` in a UDP datagram of `flow`, with
/// IPv4 identification `ip_id`. `None` if the payload does not fit an IPv4
/// datagram.
pub fn udp_frame(flow: &Flow, ip_id: u16, payload: &[u8]) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(UDP_HLEN + payload.len()).ok()?;
    let ip_len = u16::try_from(IP_HLEN + usize::from(udp_len)).ok()?;
    let mut f = Vec::with_capacity(ETH_HLEN + usize::from(ip_len));
    f.extend_from_slice(&flow.dst_mac);
    f.extend_from_slice(&flow.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&ip_id.to_be_bytes());
    f.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
    f.extend_from_slice(&[64, 17, 0, 0]); // TTL, UDP, checksum placeholder
    f.extend_from_slice(&flow.src_ip);
    f.extend_from_slice(&flow.dst_ip);
    let csum = inet_checksum(&f[ip_start..ip_start + IP_HLEN]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&flow.src_port.to_be_bytes());
    f.extend_from_slice(&flow.dst_port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(payload);
    Some(f)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            src_mac: [6, 0, 10, 0, 0, 2],
            dst_mac: [6, 0, 10, 0, 0, 1],
            src_ip: [10, 0, 0, 2],
            dst_ip: [10, 0, 0, 1],
            src_port: 4000,
            dst_port: 9,
        }
    }

    #[test]
    fn checksum_known_values() {
        // RFC 1071 example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
        assert_eq!(
            inet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        assert_eq!(inet_checksum(&[]), 0xffff);
        // Odd length pads with a zero byte.
        assert_eq!(inet_checksum(&[0x12]), !0x1200);
    }

    #[test]
    fn frame_layout() {
        let payload = vec![b'x'; 1024];
        let f = udp_frame(&flow(), 7, &payload).unwrap();
        assert_eq!(f.len(), ETH_HLEN + IP_HLEN + UDP_HLEN + 1024);
        assert_eq!(&f[0..6], &[6, 0, 10, 0, 0, 1]);
        assert_eq!(&f[6..12], &[6, 0, 10, 0, 0, 2]);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[ETH_HLEN..ETH_HLEN + IP_HLEN];
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 1024);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 7);
        assert_eq!(ip[9], 17);
        assert_eq!(&ip[12..16], &[10, 0, 0, 2]);
        assert_eq!(&ip[16..20], &[10, 0, 0, 1]);
        // A correct header checksums to zero.
        assert_eq!(inet_checksum(ip), 0);
        let udp = &f[ETH_HLEN + IP_HLEN..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 4000);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 9);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8 + 1024);
        assert!(udp[UDP_HLEN..].iter().all(|&b| b == b'x'));
    }

    #[test]
    fn frame_too_big() {
        assert!(udp_frame(&flow(), 0, &vec![0; 70_000]).is_none());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("06:00:0a:00:00:02"), Some([6, 0, 10, 0, 0, 2]));
        assert_eq!(parse_mac("06:00:0a:00:00"), None);
        assert_eq!(parse_mac("06:00:0a:00:00:02:03"), None);
        assert_eq!(parse_mac("06:00:0a:00:00:zz"), None);
        assert_eq!(parse_mac("6:00:0a:00:00:02"), None);
    }
}
