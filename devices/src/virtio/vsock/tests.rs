use super::*;
use crate::virtio::test_utils::{mem, TestQueue};
use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

const CID: u64 = 52;
const RX_BUF: u64 = 0x40000;
const TX_BUF: u64 = 0x80000;
const SLOT: u64 = 0x2000;

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

struct Env {
    dir: TempDir,
    m: GuestMemoryMmap,
    rxq: TestQueue,
    txq: TestQueue,
    dev: Arc<Mutex<Vsock>>,
    em: Em,
    rx_seen: u16,
    tx_slot: u64,
}

impl Env {
    fn new() -> Self {
        Self::with_limits(VsockLimits::default())
    }

    fn with_limits(limits: VsockLimits) -> Self {
        let dir = TempDir::new().unwrap();
        let m = mem(0x100000);
        let rxq = TestQueue::new(&m, 0x1000, 32);
        let txq = TestQueue::new(&m, 0x4000, 32);
        let evq = TestQueue::new(&m, 0x7000, 32);
        let mut dev = Vsock::with_limits(
            VsockConfig {
                vsock_id: "vsock0".into(),
                guest_cid: CID,
                uds_path: dir.as_path().join("v.sock"),
            },
            limits,
        )
        .unwrap();
        dev.activate(m.clone(), vec![rxq.queue(), txq.queue(), evq.queue()])
            .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut e = Self {
            dir,
            m,
            rxq,
            txq,
            dev,
            em,
            rx_seen: 0,
            tx_slot: 0,
        };
        e.em.run_with_timeout(50).unwrap(); // activation
        for i in 0..8 {
            e.rxq
                .add_chain(&[(RX_BUF + i * SLOT, (HDR_LEN + 4096) as u32, true)]);
        }
        e.kick(RXQ);
        e
    }

    fn uds(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    fn kick(&self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
    }

    fn spin(&mut self) {
        self.em.run_with_timeout(20).unwrap();
    }

    /// Runs the loop until the guest got a packet on rx; returns it and
    /// recycles the buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        for _ in 0..200 {
            if self.rxq.used_idx() != self.rx_seen {
                let (id, len) = self.rxq.used_elem(self.rx_seen);
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let addr = RX_BUF + u64::from(id % 8) * SLOT;
                let mut b = vec![0u8; len as usize];
                self.m.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(b[..HDR_LEN].try_into().unwrap());
                // give the buffer back (descriptor ids advance; slot by id)
                let head = self.rxq.add_chain(&[(0, 0, true)]);
                crate::virtio::test_utils::write_desc(
                    &self.m,
                    self.rxq.desc,
                    head,
                    RX_BUF + u64::from(head % 8) * SLOT,
                    (HDR_LEN + 4096) as u32,
                    2,
                    0,
                );
                self.kick(RXQ);
                return (h, b[HDR_LEN..].to_vec());
            }
            self.spin();
        }
        panic!("no rx packet");
    }

    fn no_rx(&mut self) {
        for _ in 0..3 {
            self.spin();
        }
        assert_eq!(self.rxq.used_idx(), self.rx_seen, "unexpected rx packet");
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let a = TX_BUF + (self.tx_slot % 16) * SLOT;
        self.tx_slot += 1;
        self.m.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
        self.m
            .write_slice(payload, GuestAddress(a + HDR_LEN as u64))
            .unwrap();
        if payload.is_empty() {
            self.txq.add_chain(&[(a, HDR_LEN as u32, false)]);
        } else {
            self.txq.add_chain(&[
                (a, HDR_LEN as u32, false),
                (a + HDR_LEN as u64, payload.len() as u32, false),
            ]);
        }
        self.kick(TXQ);
        self.spin();
    }

    /// Reads from a non-blocking host stream until `n` bytes arrived.
    fn host_read(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        for _ in 0..200 {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(k) => out.extend_from_slice(&b[..k]),
                Err(_) => {}
            }
            if out.len() >= n {
                return out;
            }
            self.spin();
        }
        out
    }
}

fn gh(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 65536,
        ..Default::default()
    }
}

#[test]
fn config_space_and_cid_validation() {
    let e = Env::new();
    let mut b = [0u8; 8];
    e.dev.lock().unwrap().read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    assert_eq!(e.dev.lock().unwrap().device_type(), 19);
    let bad = Vsock::new(VsockConfig {
        guest_cid: 2,
        uds_path: e.dir.as_path().join("x"),
        ..Default::default()
    });
    assert!(matches!(bad, Err(VsockError::BadCid(2))));
    // socket path taken
    assert!(Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: e.uds(),
        ..Default::default()
    })
    .is_err());
}

#[test]
fn host_initiated_connection() {
    let mut e = Env::new();
    let mut host = UnixStream::connect(e.uds()).unwrap();
    host.set_nonblocking(true).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = e.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, CID, 1234)
    );
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    let hp = req.src_port;
    // guest accepts
    e.send(gh(1234, hp, OP_RESPONSE), &[]);
    let ok = e.host_read(&mut host, 4);
    assert_eq!(ok, format!("OK {hp}\n").as_bytes());
    // host -> guest
    host.write_all(b"hello").unwrap();
    let (h, data) = e.recv();
    assert_eq!((h.op, h.len, h.src_port, h.dst_port), (OP_RW, 5, hp, 1234));
    assert_eq!(data, b"hello");
    // guest -> host
    let mut rw = gh(1234, hp, OP_RW);
    rw.len = 5;
    e.send(rw, b"world");
    assert_eq!(e.host_read(&mut host, 5), b"world");
    // credit request is answered with the bytes forwarded so far
    e.send(gh(1234, hp, OP_CREDIT_REQUEST), &[]);
    let (cu, _) = e.recv();
    assert_eq!((cu.op, cu.fwd_cnt), (OP_CREDIT_UPDATE, 5));
    // full shutdown from the guest -> RST, host sees EOF
    let mut sd = gh(1234, hp, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    e.send(sd, &[]);
    let (rst, _) = e.recv();
    assert_eq!(rst.op, OP_RST);
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert!(e.dev.lock().unwrap().conns.is_empty());
}

#[test]
fn host_connect_refused_by_guest_and_bad_lines() {
    let mut e = Env::new();
    let mut host = UnixStream::connect(e.uds()).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = e.recv();
    e.send(gh(99, req.src_port, OP_RST), &[]);
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    e.spin();
    let mut b = [0u8; 8];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    // garbage and over-long lines are dropped without a request
    let mut h2 = UnixStream::connect(e.uds()).unwrap();
    h2.write_all(b"HELLO 1\n").unwrap();
    let mut h3 = UnixStream::connect(e.uds()).unwrap();
    h3.write_all(&[b'C'; 100]).unwrap();
    e.no_rx();
    h2.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(h2.read(&mut b).unwrap(), 0);
    assert!(e.dev.lock().unwrap().pending.is_empty());
}

#[test]
fn guest_initiated_connection() {
    let mut e = Env::new();
    let listener = UnixListener::bind(format!("{}_5000", e.uds().display())).unwrap();
    e.send(gh(777, 5000, OP_REQUEST), &[]);
    let (resp, _) = e.recv();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 5000, 777)
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut rw = gh(777, 5000, OP_RW);
    rw.len = 4;
    e.send(rw, b"ping");
    assert_eq!(e.host_read(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (h, data) = e.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"pong"[..]));
    // host closes -> SHUTDOWN to guest; guest RST -> connection gone
    drop(host);
    let (sd, _) = e.recv();
    assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, 3));
    e.send(gh(777, 5000, OP_RST), &[]);
    e.no_rx();
    assert!(e.dev.lock().unwrap().conns.is_empty());
    // nobody listening on 5001 -> RST
    e.send(gh(778, 5001, OP_REQUEST), &[]);
    let (rst, _) = e.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 778));
}

#[test]
fn guest_credit_is_respected() {
    let mut e = Env::new();
    let listener = UnixListener::bind(format!("{}_6000", e.uds().display())).unwrap();
    let mut req = gh(1, 6000, OP_REQUEST);
    req.buf_alloc = 4;
    e.send(req, &[]);
    assert_eq!(e.recv().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"0123456789").unwrap();
    let (h, d) = e.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"0123"[..]));
    e.no_rx(); // out of credit
    let mut cu = gh(1, 6000, OP_CREDIT_UPDATE);
    cu.buf_alloc = 4;
    cu.fwd_cnt = 4;
    e.send(cu, &[]);
    let (_, d) = e.recv();
    assert_eq!(d, b"4567");
}

#[test]
fn evil_packets() {
    let mut e = Env::new();
    // wrong source CID -> RST
    let mut h = gh(1, 2, OP_REQUEST);
    h.src_cid = 99;
    e.send(h, &[]);
    assert_eq!(e.recv().0.op, OP_RST);
    // wrong type -> RST
    let mut h = gh(1, 2, OP_REQUEST);
    h.type_ = 2;
    e.send(h, &[]);
    assert_eq!(e.recv().0.op, OP_RST);
    // RW for an unknown connection -> RST
    let mut h = gh(1, 2, OP_RW);
    h.len = 3;
    e.send(h, b"abc");
    assert_eq!(e.recv().0.op, OP_RST);
    // RST for an unknown connection -> nothing
    e.send(gh(1, 2, OP_RST), &[]);
    e.no_rx();
    // payload length beyond the chain / huge: dropped
    let mut h = gh(1, 2, OP_RW);
    h.len = u32::MAX;
    e.send(h, b"abc");
    e.no_rx();
    // short header and out-of-memory descriptors: dropped
    e.txq.add_chain(&[(TX_BUF, 10, false)]);
    e.txq.add_chain(&[(0xfff00, 0x1000, false)]);
    e.kick(TXQ);
    e.no_rx();
    assert_eq!(e.txq.used_idx(), 7);
    // a connection still works afterwards
    e.send(gh(1, 2, OP_CREDIT_UPDATE), &[]);
    assert_eq!(e.recv().0.op, OP_RST);
}

#[test]
fn reset_drops_connections() {
    let mut e = Env::new();
    let listener = UnixListener::bind(format!("{}_7000", e.uds().display())).unwrap();
    e.send(gh(1, 7000, OP_REQUEST), &[]);
    assert_eq!(e.recv().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    e.dev.lock().unwrap().reset();
    e.spin();
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 4];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert!(!e.dev.lock().unwrap().is_activated());
    // while inactive, host clients are turned away
    let mut c = UnixStream::connect(e.uds()).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    e.spin();
    assert_eq!(c.read(&mut b).unwrap(), 0);
}

/// The next packet that is not a credit update.
fn recv_no_credit(e: &mut Env) -> Header {
    loop {
        let (h, _) = e.recv();
        if h.op != OP_CREDIT_UPDATE {
            return h;
        }
    }
}

/// Guest payload of `len` bytes (a fixed pattern).
fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Opens guest port `gport` -> host `port` (a listener the test made) and
/// returns the accepted host end.
fn open_conn(e: &mut Env, l: &UnixListener, gport: u32, port: u32) -> UnixStream {
    e.send(gh(gport, port, OP_REQUEST), &[]);
    let (h, _) = e.recv();
    assert_eq!((h.op, h.dst_port), (OP_RESPONSE, gport));
    l.accept().unwrap().0
}

#[test]
fn a_full_accept_queue_is_refused_without_waiting() {
    let mut e = Env::new();
    let path = format!("{}_8000", e.uds().display());
    let l = UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) on our own bound socket: backlog 0, never accepted.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // A blocking connect would hang this test in unix_wait_for_peer.
    let mut answers = Vec::new();
    for p in 0..4 {
        e.send(gh(100 + p, 8000, OP_REQUEST), &[]);
        answers.push(e.recv().0.op);
    }
    // The queue holds one (backlog 0); the rest are refused at once.
    assert_eq!(answers[0], OP_RESPONSE, "{answers:?}");
    assert_eq!(answers[3], OP_RST, "{answers:?}");
    assert!(answers.iter().filter(|&&o| o == OP_RESPONSE).count() <= 2);
    assert!(e.dev.lock().unwrap().conns.len() <= 2);
}

#[test]
fn connections_beyond_the_limit_get_rst() {
    let limits = VsockLimits {
        max_conns: 3,
        ..Default::default()
    };
    let mut e = Env::with_limits(limits);
    let l = UnixListener::bind(format!("{}_9000", e.uds().display())).unwrap();
    let _held: Vec<UnixStream> = (0..3)
        .map(|i| open_conn(&mut e, &l, 10 + i, 9000))
        .collect();
    e.send(gh(20, 9000, OP_REQUEST), &[]);
    let (h, _) = e.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 20));
    // Host clients beyond the limit are closed at once.
    let mut c = UnixStream::connect(e.uds()).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    e.spin();
    let mut b = [0u8; 4];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    assert_eq!(e.dev.lock().unwrap().conn_count(), 3);
    // Closing one makes room again.
    e.send(gh(10, 9000, OP_RST), &[]);
    e.send(gh(21, 9000, OP_REQUEST), &[]);
    assert_eq!(e.recv().0.op, OP_RESPONSE);
}

#[test]
fn a_guest_beyond_its_credit_is_reset_and_nothing_more_is_held() {
    let mut e = Env::new();
    let l = UnixListener::bind(format!("{}_9100", e.uds().display())).unwrap();
    // The host peer never reads.
    let _host = open_conn(&mut e, &l, 30, 9100);
    let chunk = blob(MAX_PAYLOAD);
    let mut reset = false;
    for _ in 0..16 {
        let mut rw = gh(30, 9100, OP_RW);
        rw.len = chunk.len() as u32;
        rw.buf_alloc = u32::MAX; // and lies about its own buffer
        e.send(rw, &chunk);
        let held = e
            .dev
            .lock()
            .unwrap()
            .conns
            .get(&(9100, 30))
            .map(|c| c.guest_bytes_held());
        match held {
            Some(n) => assert!(n <= CONN_BUF_SIZE as usize, "{n}"),
            None => {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "a guest ignoring its credit must be reset");
    let h = recv_no_credit(&mut e);
    assert_eq!((h.op, h.dst_port), (OP_RST, 30));
    assert_eq!(e.dev.lock().unwrap().buffered(), 0);
}

#[test]
fn the_device_budget_resets_the_connection_that_passes_it() {
    let limits = VsockLimits {
        max_buffered: 16 << 10,
        ..Default::default()
    };
    let mut e = Env::with_limits(limits);
    let l = UnixListener::bind(format!("{}_9200", e.uds().display())).unwrap();
    let _host = open_conn(&mut e, &l, 40, 9200);
    // Fill the host socket, then some (all within the guest's credit).
    let chunk = blob(MAX_PAYLOAD);
    let mut reset = false;
    for _ in 0..4 {
        let mut rw = gh(40, 9200, OP_RW);
        rw.len = chunk.len() as u32;
        e.send(rw, &chunk);
        assert!(e.dev.lock().unwrap().buffered() <= 16 << 10);
        if e.dev.lock().unwrap().conns.is_empty() {
            reset = true;
            break;
        }
    }
    assert!(reset, "the device budget must reset the connection");
    assert_eq!(recv_no_credit(&mut e).op, OP_RST);
}

#[test]
fn a_host_peer_that_stops_reading_is_reset_after_the_stall_timeout() {
    let limits = VsockLimits {
        stall_timeout: Duration::from_millis(100),
        handshake_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let mut e = Env::with_limits(limits);
    let l = UnixListener::bind(format!("{}_9300", e.uds().display())).unwrap();
    let _host = open_conn(&mut e, &l, 50, 9300);
    let _idle = open_conn(&mut e, &l, 51, 9300);
    let chunk = blob(MAX_PAYLOAD);
    for _ in 0..4 {
        let mut rw = gh(50, 9300, OP_RW);
        rw.len = chunk.len() as u32;
        e.send(rw, &chunk);
    }
    assert!(
        e.dev.lock().unwrap().buffered() > 0,
        "the host socket took it all"
    );
    // Bounded wait: the tick finds the stalled connection.
    let h = recv_no_credit(&mut e);
    assert_eq!((h.op, h.dst_port), (OP_RST, 50));
    assert_eq!(e.dev.lock().unwrap().buffered(), 0);
    // The idle connection (nothing held) stays.
    assert!(e.dev.lock().unwrap().conns.contains_key(&(9300, 51)));
    // A host client that never sends its CONNECT line is dropped too.
    let mut c = UnixStream::connect(e.uds()).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 4];
    for _ in 0..50 {
        e.spin();
        if e.dev.lock().unwrap().pending.is_empty() {
            break;
        }
    }
    assert_eq!(c.read(&mut b).unwrap(), 0);
}
