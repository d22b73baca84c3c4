//! The network side of MMDS on one interface: ARP for the MMDS address and
//! a small TCP server on its port 80, fed with the guest's transmitted
//! frames and producing frames for the guest's receive queue.
//!
//! - A frame is taken ([`MmdsStack::handle_tx`] returns true) when it is an
//!   ARP request for the MMDS address or an IPv4 packet to it; an IPv4
//!   packet to it that is not TCP to port 80 is dropped there, as
//!   Firecracker does. Every other frame goes on to the TAP.
//! - TCP: SYN gets SYN-ACK; data in order is gathered until it is one whole
//!   HTTP request ([`super::request_complete`]), answered by the shared
//!   [`super::MmdsService`], sent in segments of at most the guest's MSS
//!   within its window, and followed by FIN. Data out of order is not kept:
//!   the guest gets a duplicate ACK and retransmits. The path to the guest
//!   is a queue the VMM delivers from, so nothing is lost on this side and
//!   no retransmission timer is needed.
//! - Bounds: [`MAX_CONNECTIONS`] connections per interface (a new one
//!   pushes out the oldest), [`MAX_QUEUED`] frames waiting for the guest
//!   (beyond it new frames are dropped and the guest's TCP recovers or the
//!   connection is abandoned), [`super::MAX_REQUEST`] bytes per request.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;

use super::{request_complete, Parse, SharedMmds};

/// The MAC address answering for the MMDS address (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// TCP connections per interface.
pub const MAX_CONNECTIONS: usize = 30;
/// Frames waiting for the guest's receive queue.
pub const MAX_QUEUED: usize = 256;
/// Our MSS (IPv4 over a 1500-byte MTU).
pub const MSS: u16 = 1460;
/// The window we advertise.
pub const WINDOW: u16 = 65535;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The Internet checksum of `data` added to `sum`.
fn csum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `a` is before `b` in sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// One TCP segment from the guest.
struct Segment<'a> {
    mac: [u8; 6],
    ip: Ipv4Addr,
    port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: &'a [u8],
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    SynReceived,
    Established,
}

#[derive(Debug)]
struct Conn {
    mac: [u8; 6],
    state: State,
    born: u64,
    rcv_nxt: u32,
    snd_una: u32,
    snd_nxt: u32,
    window: u32,
    mss: u16,
    request: Vec<u8>,
    /// The answer not yet sent; `Some` once the request was answered.
    unsent: Option<VecDeque<u8>>,
    fin_sent: bool,
    fin_received: bool,
}

/// MMDS on one interface.
#[derive(Debug)]
pub struct MmdsStack {
    ip: Ipv4Addr,
    service: SharedMmds,
    conns: HashMap<(Ipv4Addr, u16), Conn>,
    out: VecDeque<Vec<u8>>,
    born: u64,
    isn: u32,
    /// Frames dropped because the queue to the guest was full (metrics).
    pub dropped: u64,
}

impl MmdsStack {
    /// A stack answering at `ip` with `service`.
    pub fn new(ip: Ipv4Addr, service: SharedMmds) -> Self {
        let mut seed = [0u8; 4];
        // The initial sequence numbers need not be secret here (the only
        // peer is this guest), only different; time is a fallback.
        if super::random_bytes(&mut seed).is_err() {
            seed = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(1))
            .to_be_bytes();
        }
        MmdsStack {
            ip,
            service,
            conns: HashMap::new(),
            out: VecDeque::new(),
            born: 0,
            isn: u32::from_be_bytes(seed),
            dropped: 0,
        }
    }

    /// The MMDS address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Looks at one frame the guest sends (Ethernet, without the vnet
    /// header). True when it was for MMDS (answered or dropped here).
    pub fn handle_tx(&mut self, f: &[u8]) -> bool {
        if f.len() < ETH_HLEN {
            return false;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[6..12]);
        match get16(f, 12) {
            ETH_P_ARP => self.arp(&mac, &f[ETH_HLEN..]),
            ETH_P_IP => self.ipv4(mac, &f[ETH_HLEN..]),
            _ => false,
        }
    }

    /// The next frame for the guest (Ethernet, without the vnet header).
    pub fn pop_rx(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Whether frames wait for the guest.
    pub fn has_rx(&self) -> bool {
        !self.out.is_empty()
    }

    fn queue(&mut self, frame: Vec<u8>) {
        if self.out.len() >= MAX_QUEUED {
            self.dropped += 1;
            return;
        }
        self.out.push_back(frame);
    }

    fn arp(&mut self, mac: &[u8; 6], a: &[u8]) -> bool {
        // htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request).
        if a.len() < 28 || get16(a, 0) != 1 || get16(a, 2) != ETH_P_IP || a[4] != 6 || a[5] != 4 {
            return false;
        }
        if Ipv4Addr::new(a[24], a[25], a[26], a[27]) != self.ip {
            return false;
        }
        if get16(a, 6) != 1 {
            // A reply or anything else about our address: nothing to send.
            return true;
        }
        let mut f = Vec::with_capacity(ETH_HLEN + 28);
        f.extend_from_slice(mac);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&self.ip.octets());
        f.extend_from_slice(&a[8..14]); // sender hardware address
        f.extend_from_slice(&a[14..18]); // sender protocol address
        self.queue(f);
        true
    }

    fn ipv4(&mut self, mac: [u8; 6], p: &[u8]) -> bool {
        if p.len() < 20 || p[0] >> 4 != 4 {
            return false;
        }
        if Ipv4Addr::new(p[16], p[17], p[18], p[19]) != self.ip {
            return false;
        }
        // Ours from here on: taken whatever happens to it.
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(get16(p, 2));
        if ihl < 20 || total < ihl || total > p.len() || p[9] != IPPROTO_TCP {
            return true;
        }
        // Fragments are not reassembled.
        if get16(p, 6) & 0x3fff != 0 {
            return true;
        }
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let t = &p[ihl..total];
        if t.len() < 20 || get16(t, 2) != 80 {
            return true;
        }
        let off = usize::from(t[12] >> 4) * 4;
        if off < 20 || off > t.len() {
            return true;
        }
        let seg = Segment {
            mac,
            ip: src,
            port: get16(t, 0),
            seq: get32(t, 4),
            ack: get32(t, 8),
            flags: t[13],
            window: get16(t, 14),
            mss: mss_option(&t[20..off]),
            payload: &t[off..],
        };
        self.tcp(seg);
        true
    }

    fn tcp(&mut self, s: Segment) {
        let key = (s.ip, s.port);
        if s.flags & RST != 0 {
            self.conns.remove(&key);
            return;
        }
        if s.flags & SYN != 0 && s.flags & ACK == 0 {
            self.open(key, &s);
            return;
        }
        let Some(mut c) = self.conns.remove(&key) else {
            // Not a connection of ours: reset, unless it is a reset.
            let (seq, ack, flags) = if s.flags & ACK != 0 {
                (s.ack, 0, RST)
            } else {
                (0, s.seq.wrapping_add(s.payload.len() as u32), RST | ACK)
            };
            let f = self.segment(s.mac, s.ip, s.port, seq, ack, flags, &[], None);
            self.queue(f);
            return;
        };
        c.window = u32::from(s.window);
        if s.flags & ACK != 0 && !seq_lt(s.ack, c.snd_una) && !seq_lt(c.snd_nxt, s.ack) {
            c.snd_una = s.ack;
            if c.state == State::SynReceived {
                c.state = State::Established;
            }
        }
        let mut must_ack = false;
        if !s.payload.is_empty() {
            must_ack = true;
            if s.seq == c.rcv_nxt && c.unsent.is_none() && !c.fin_received {
                c.request.extend_from_slice(s.payload);
                c.rcv_nxt = c.rcv_nxt.wrapping_add(s.payload.len() as u32);
                self.answer_if_complete(&mut c);
            }
        }
        if s.flags & FIN != 0 && s.seq.wrapping_add(s.payload.len() as u32) == c.rcv_nxt {
            if !c.fin_received {
                c.fin_received = true;
                c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
                if c.unsent.is_none() {
                    // Closed before a whole request: nothing to answer.
                    c.unsent = Some(VecDeque::new());
                }
            }
            must_ack = true;
        }
        let sent = self.send_more(key, &mut c);
        if must_ack && !sent {
            let f = self.segment(c.mac, key.0, key.1, c.snd_nxt, c.rcv_nxt, ACK, &[], None);
            self.queue(f);
        }
        let done = c.fin_sent && c.snd_una == c.snd_nxt && c.fin_received;
        if !done {
            self.conns.insert(key, c);
        }
    }

    fn open(&mut self, key: (Ipv4Addr, u16), s: &Segment) {
        if let Some(c) = self.conns.get(&key) {
            if c.state == State::SynReceived && c.rcv_nxt == s.seq.wrapping_add(1) {
                // A retransmitted SYN: answer it again.
                let isn = c.snd_una.wrapping_sub(1);
                let f = self.segment(
                    c.mac,
                    key.0,
                    key.1,
                    isn,
                    c.rcv_nxt,
                    SYN | ACK,
                    &[],
                    Some(MSS),
                );
                self.queue(f);
                return;
            }
            self.conns.remove(&key);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.born)
                .map(|(k, _)| *k)
            {
                self.conns.remove(&oldest);
            }
        }
        self.isn = self.isn.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let isn = self.isn;
        self.born += 1;
        let c = Conn {
            mac: s.mac,
            state: State::SynReceived,
            born: self.born,
            rcv_nxt: s.seq.wrapping_add(1),
            snd_una: isn.wrapping_add(1),
            snd_nxt: isn.wrapping_add(1),
            window: u32::from(s.window),
            mss: s.mss.unwrap_or(536).clamp(64, MSS),
            request: Vec::new(),
            unsent: None,
            fin_sent: false,
            fin_received: false,
        };
        let f = self.segment(
            s.mac,
            key.0,
            key.1,
            isn,
            c.rcv_nxt,
            SYN | ACK,
            &[],
            Some(MSS),
        );
        self.queue(f);
        self.conns.insert(key, c);
    }

    fn answer_if_complete(&mut self, c: &mut Conn) {
        let answer = match request_complete(&c.request) {
            Parse::Partial => return,
            Parse::Complete(n) => self
                .service
                .lock()
                .expect("mmds service poisoned")
                .respond(&c.request[..n]),
            Parse::Invalid => super::Answer::text(400, "Invalid request."),
        };
        c.request = Vec::new();
        c.unsent = Some(answer.to_bytes().into());
    }

    /// Sends what the window allows of the answer, then FIN. Returns
    /// whether a segment (which carries the ACK) went out.
    fn send_more(&mut self, key: (Ipv4Addr, u16), c: &mut Conn) -> bool {
        let Some(unsent) = c.unsent.as_mut() else {
            return false;
        };
        if c.state != State::Established {
            return false;
        }
        let mut sent = false;
        let mut chunk = Vec::new();
        loop {
            let in_flight = c.snd_nxt.wrapping_sub(c.snd_una);
            let room = c.window.saturating_sub(in_flight) as usize;
            let n = unsent.len().min(usize::from(c.mss)).min(room);
            if n == 0 || self.out.len() >= MAX_QUEUED {
                break;
            }
            chunk.clear();
            chunk.extend(unsent.drain(..n));
            let f = self.segment(
                c.mac,
                key.0,
                key.1,
                c.snd_nxt,
                c.rcv_nxt,
                ACK | PSH,
                &chunk,
                None,
            );
            self.queue(f);
            c.snd_nxt = c.snd_nxt.wrapping_add(n as u32);
            sent = true;
        }
        if unsent.is_empty() && !c.fin_sent {
            let f = self.segment(
                c.mac,
                key.0,
                key.1,
                c.snd_nxt,
                c.rcv_nxt,
                FIN | ACK,
                &[],
                None,
            );
            self.queue(f);
            c.snd_nxt = c.snd_nxt.wrapping_add(1);
            c.fin_sent = true;
            sent = true;
        }
        sent
    }

    /// An Ethernet + IPv4 + TCP frame from MMDS to the guest.
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &self,
        mac: [u8; 6],
        dst: Ipv4Addr,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
        mss: Option<u16>,
    ) -> Vec<u8> {
        let opt_len = if mss.is_some() { 4 } else { 0 };
        let tcp_len = 20 + opt_len + payload.len();
        let total = 20 + tcp_len;
        let mut f = Vec::with_capacity(ETH_HLEN + total);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let ip_at = f.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f.extend_from_slice(&self.ip.octets());
        f.extend_from_slice(&dst.octets());
        let ip_sum = csum(&f[ip_at..ip_at + 20], 0);
        f[ip_at + 10..ip_at + 12].copy_from_slice(&ip_sum.to_be_bytes());
        let tcp_at = f.len();
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.push(((20 + opt_len) as u8 / 4) << 4);
        f.push(flags);
        f.extend_from_slice(&WINDOW.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        if let Some(m) = mss {
            f.extend_from_slice(&[2, 4]);
            f.extend_from_slice(&m.to_be_bytes());
        }
        f.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&self.ip.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        let partial = u32::from(!csum(&pseudo, 0));
        let sum = csum(&f[tcp_at..], partial);
        f[tcp_at + 16..tcp_at + 18].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

/// The MSS option of a SYN, if any.
fn mss_option(mut opts: &[u8]) -> Option<u16> {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return None,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 || len > opts.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(get16(opts, 2));
                }
                opts = &opts[len..];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::{MmdsService, MmdsVersion};
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    const GUEST_MAC: [u8; 6] = [6, 0, 0, 0, 0, 2];
    const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    fn stack() -> MmdsStack {
        let mut s = MmdsService::new();
        s.configure(MmdsVersion::V1, false);
        s.set_data(json!({"latest": {"meta-data": {"instance-id": "i-42"}}}));
        MmdsStack::new(MMDS_IP, Arc::new(Mutex::new(s)))
    }

    /// A guest TCP segment to MMDS port 80.
    fn tcp(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8], window: u16) -> Vec<u8> {
        let tcp_len = 20 + payload.len();
        let mut f = Vec::new();
        f.extend_from_slice(&MMDS_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f.extend_from_slice(&GUEST_IP.octets());
        f.extend_from_slice(&MMDS_IP.octets());
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[0x50, flags]);
        f.extend_from_slice(&window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    struct Seg {
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    }

    /// Parses one frame to the guest, checking both checksums.
    fn parse(f: &[u8]) -> Seg {
        assert_eq!(&f[0..6], &GUEST_MAC);
        assert_eq!(&f[6..12], &MMDS_MAC);
        let ip = &f[ETH_HLEN..];
        assert_eq!(csum(&ip[..20], 0), 0, "IPv4 header checksum");
        let total = usize::from(get16(ip, 2));
        let t = &ip[20..total];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
        pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
        assert_eq!(csum(t, u32::from(!csum(&pseudo, 0))), 0, "TCP checksum");
        let off = usize::from(t[12] >> 4) * 4;
        Seg {
            seq: get32(t, 4),
            ack: get32(t, 8),
            flags: t[13],
            payload: t[off..].to_vec(),
        }
    }

    #[test]
    fn arp_for_the_mmds_address_is_answered_and_other_arp_passes() {
        let mut s = stack();
        let mut a = Vec::new();
        a.extend_from_slice(&[0xff; 6]);
        a.extend_from_slice(&GUEST_MAC);
        a.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        a.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        a.extend_from_slice(&GUEST_MAC);
        a.extend_from_slice(&GUEST_IP.octets());
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&MMDS_IP.octets());
        assert!(s.handle_tx(&a));
        let r = s.pop_rx().unwrap();
        assert_eq!(&r[0..6], &GUEST_MAC);
        assert_eq!(get16(&r, ETH_HLEN + 6), 2);
        assert_eq!(&r[ETH_HLEN + 8..ETH_HLEN + 14], &MMDS_MAC);
        assert_eq!(&r[ETH_HLEN + 14..ETH_HLEN + 18], &MMDS_IP.octets());
        assert_eq!(&r[ETH_HLEN + 24..ETH_HLEN + 28], &GUEST_IP.octets());
        // ARP for another address goes to the TAP.
        let n = a.len();
        a[n - 4..].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!s.handle_tx(&a));
        assert!(!s.has_rx());
    }

    #[test]
    fn a_get_over_tcp_is_answered_and_the_connection_closes() {
        let mut s = stack();
        assert!(s.handle_tx(&tcp(5000, 100, 0, SYN, &[], 65535)));
        let synack = parse(&s.pop_rx().unwrap());
        assert_eq!(synack.flags, SYN | ACK);
        assert_eq!(synack.ack, 101);
        let mut ours = synack.seq.wrapping_add(1);
        assert!(s.handle_tx(&tcp(5000, 101, ours, ACK, &[], 65535)));
        // The request in two segments.
        let req = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n";
        s.handle_tx(&tcp(5000, 101, ours, ACK, &req[..10], 65535));
        let ack = parse(&s.pop_rx().unwrap());
        assert_eq!((ack.flags, ack.ack), (ACK, 111));
        s.handle_tx(&tcp(5000, 111, ours, ACK | PSH, &req[10..], 65535));
        let mut answer = Vec::new();
        let mut fin = false;
        while let Some(f) = s.pop_rx() {
            let seg = parse(&f);
            assert_eq!(seg.seq, ours);
            assert_eq!(seg.ack, 101 + req.len() as u32);
            ours = ours.wrapping_add(seg.payload.len() as u32);
            answer.extend_from_slice(&seg.payload);
            if seg.flags & FIN != 0 {
                fin = true;
                ours = ours.wrapping_add(1);
            }
        }
        assert!(fin);
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\ni-42"), "{text}");
        // The guest acknowledges and closes: the connection is gone.
        let theirs = 101 + req.len() as u32;
        s.handle_tx(&tcp(5000, theirs, ours, ACK | FIN, &[], 65535));
        let last = parse(&s.pop_rx().unwrap());
        assert_eq!((last.flags, last.ack), (ACK, theirs + 1));
        assert_eq!(s.connections(), 0);
    }

    #[test]
    fn the_answer_respects_the_guests_window_and_mss() {
        let mut s = stack();
        s.service
            .lock()
            .unwrap()
            .set_data(json!({"big": "x".repeat(5000)}));
        s.handle_tx(&tcp(6000, 1, 0, SYN, &[], 1000));
        let ours = parse(&s.pop_rx().unwrap()).seq.wrapping_add(1);
        s.handle_tx(&tcp(6000, 2, ours, ACK, &[], 1000));
        s.handle_tx(&tcp(6000, 2, ours, ACK, b"GET /big HTTP/1.1\r\n\r\n", 1000));
        // No MSS option: 536-byte segments, at most 1000 bytes in flight.
        let a = parse(&s.pop_rx().unwrap());
        let b = parse(&s.pop_rx().unwrap());
        assert_eq!((a.payload.len(), b.payload.len()), (536, 464));
        assert!(s.pop_rx().is_none());
        // An ACK opens the window again.
        s.handle_tx(&tcp(6000, 23, ours.wrapping_add(1000), ACK, &[], 1000));
        assert_eq!(parse(&s.pop_rx().unwrap()).seq, ours.wrapping_add(1000));
    }

    #[test]
    fn hostile_segments_are_taken_without_harm() {
        let mut s = stack();
        // Not port 80: dropped here, not passed on.
        let mut f = tcp(1, 1, 0, SYN, &[], 10);
        f[ETH_HLEN + 22..ETH_HLEN + 24].copy_from_slice(&22u16.to_be_bytes());
        assert!(s.handle_tx(&f));
        assert!(!s.has_rx());
        // Truncated and lying lengths.
        for cut in [ETH_HLEN, ETH_HLEN + 10, ETH_HLEN + 25] {
            let f = tcp(1, 1, 0, SYN, &[], 10);
            s.handle_tx(&f[..cut]);
        }
        let mut f = tcp(1, 1, 0, SYN, &[], 10);
        f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(s.handle_tx(&f));
        // Data for no connection gets a reset.
        s.handle_tx(&tcp(7, 5, 9, ACK, b"x", 10));
        let r = parse(&s.pop_rx().unwrap());
        assert_eq!((r.flags, r.seq), (RST, 9));
        // Many connections: bounded, the oldest go.
        for port in 0..(MAX_CONNECTIONS as u16 * 3) {
            s.handle_tx(&tcp(10_000 + port, 1, 0, SYN, &[], 10));
        }
        assert_eq!(s.connections(), MAX_CONNECTIONS);
        // A request that never ends: refused at the bound.
        s.handle_tx(&tcp(9, 1, 0, SYN, &[], 65535));
        let mut ours = 0;
        while let Some(f) = s.pop_rx() {
            ours = parse(&f).seq.wrapping_add(1);
        }
        s.handle_tx(&tcp(9, 2, ours, ACK, &[], 65535));
        let junk = vec![b'a'; 1400];
        let mut seq = 2u32;
        for _ in 0..4 {
            s.handle_tx(&tcp(9, seq, ours, ACK, &junk, 65535));
            seq += junk.len() as u32;
        }
        let text: Vec<u8> = std::iter::from_fn(|| s.pop_rx())
            .flat_map(|f| parse(&f).payload)
            .collect();
        assert!(
            String::from_utf8_lossy(&text).starts_with("HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        // The queue to the guest is bounded.
        for i in 0..(MAX_QUEUED as u32 + 50) {
            s.handle_tx(&tcp(8, i, 0, ACK, b"y", 10));
        }
        assert!(s.out.len() <= MAX_QUEUED);
    }

    #[test]
    fn mss_options_are_read_safely() {
        assert_eq!(mss_option(&[2, 4, 5, 0xb4]), Some(1460));
        assert_eq!(mss_option(&[1, 1, 2, 4, 2, 0]), Some(512));
        assert_eq!(mss_option(&[3, 0]), None);
        assert_eq!(mss_option(&[3, 9, 1]), None);
        assert_eq!(mss_option(&[0, 2, 4, 1, 1]), None);
        assert_eq!(mss_option(&[]), None);
    }
}
