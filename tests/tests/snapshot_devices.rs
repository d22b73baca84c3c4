//! Block, net and vsock across a snapshot: the test guest's `snap-io` mode
//! runs numbered rounds of I/O on all three devices (a sector written and
//! read back, an ARP + UDP echo through a TAP in a test namespace, a vsock
//! connection to the host with a line echoed). A VM is paused and
//! snapshotted mid-rounds; a new ember-vmm loads the snapshot with a new
//! TAP (and MAC), a new vsock socket path (and CID) and the disk moved, and
//! the rounds go on, succeeding on every device.
//!
//! The host side mirrors a Firecracker client: `PATCH /vm {"state":
//! "Paused"}`, `PUT /snapshot/create`, then on a fresh process
//! `PUT /snapshot/load` with `network_overrides` (firecracker-go-sdk's
//! `LoadSnapshot` with `WithNetworkOverrides`) plus ember's `guest_mac`,
//! `vsock_override` and `drive_overrides` extensions.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_tests::*;
use serde_json::json;

/// The guest's vsock port (`ember.vsock_port`, the mode's default).
const VSOCK_PORT: u32 = 52;
/// The sector `snap-io` writes its round marker to.
const SNAP_SECTOR: u64 = 1;

/// Echo servers the rounds talk to, stopped on drop.
struct Peers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Peers {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Echoes every line of every connection to the hybrid vsock socket
    /// `<uds>_<VSOCK_PORT>` until stopped.
    fn vsock_echo(&mut self, uds: &Path) {
        let path = format!("{}_{VSOCK_PORT}", uds.display());
        let l = UnixListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut w = s.try_clone().unwrap();
                        let mut line = String::new();
                        if BufReader::new(s).read_line(&mut line).is_ok() {
                            let _ = w.write_all(line.as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }

    /// Echoes UDP datagrams on `addr` inside `ns` until stopped.
    fn udp_echo(&mut self, ns: &NetNs, addr: &'static str) {
        let stop = self.stop.clone();
        self.threads.push(ns.spawn_in(move || {
            let s = std::net::UdpSocket::bind(addr).expect("bind echo");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((len, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..len], peer);
                }
            }
        }));
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One `ember-guest: round ...` line.
#[derive(Debug, Clone, PartialEq)]
struct Round {
    n: u64,
    blk: String,
    net: String,
    vsock: String,
    mac: String,
    cid: u64,
    resets: u32,
}

impl Round {
    fn all_ok(&self) -> bool {
        self.blk == "ok" && self.net == "ok" && self.vsock == "ok"
    }
}

fn rounds(out: &str) -> Vec<Round> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("ember-guest: round ")?.split(' ').collect();
            if w.len() != 13 {
                return None;
            }
            Some(Round {
                n: w[0].parse().ok()?,
                blk: w[2].into(),
                net: w[4].into(),
                vsock: w[6].into(),
                mac: w[8].into(),
                cid: w[10].parse().ok()?,
                resets: w[12].parse().ok()?,
            })
        })
        .collect()
}

/// Waits until `p`'s output has a round after `after` that `ok` accepts.
fn wait_round(p: &mut Proc, after: u64, ok: impl Fn(&Round) -> bool) -> Round {
    let found = wait_for(PATIENCE, || {
        let r = rounds(&p.out()).into_iter().find(|r| r.n > after && ok(r));
        match r {
            Some(r) => Some(Some(r)),
            // exited: stop waiting
            None => p.try_status().map(|_| None),
        }
    });
    found.flatten().unwrap_or_else(|| {
        panic!(
            "no matching round after {after}\nstdout:\n{}\nstderr:\n{}",
            p.out(),
            p.err()
        )
    })
}

/// The round number the guest last wrote to `disk`.
fn disk_round(disk: &Path) -> Option<u64> {
    let data = std::fs::read(disk).ok()?;
    let off = (SNAP_SECTOR * 512) as usize;
    let sector = data.get(off..off + 512)?;
    let text = std::str::from_utf8(sector.split(|b| *b == b'\n').next()?).ok()?;
    text.strip_prefix("ember-snap-io round ")?.parse().ok()
}

fn snap_io_config(disk: &Path, tap: &str, mac: &str, uds: &Path, cid: u64) -> serde_json::Value {
    json!({
        "boot-source": {
            "kernel_image_path": PVH_ELF,
            "boot_args": "ember.test=snap-io ember.ip=10.0.0.2 ember.peer=10.0.0.1"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "data", "path_on_host": disk,
                    "is_root_device": false, "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac}],
        "vsock": {"guest_cid": cid, "uds_path": uds}
    })
}

/// ember-vmm inside `ns`, configured from `cfg` (or, with `None`, waiting
/// for the API), with an API socket.
fn spawn_vmm(
    dir: &TempDir,
    tag: &str,
    ns: &NetNs,
    cfg: Option<&serde_json::Value>,
) -> (Proc, PathBuf) {
    let sock = dir.join(&format!("{tag}.sock"));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]).arg(bin("ember-vmm"));
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--id", tag, "--log-level", "info"]);
    if let Some(cfg) = cfg {
        let p = dir.join(&format!("{tag}.json"));
        std::fs::write(&p, cfg.to_string()).unwrap();
        cmd.arg("--config-file").arg(&p);
    }
    let p = Proc::spawn(cmd, dir.path(), tag);
    wait_for_socket(&sock);
    (p, sock)
}

#[test]
fn snap_io_rounds_succeed_on_a_cold_boot() {
    let ns = NetNs::new("sio", "embsio0", "10.0.0.1", None);
    let dir = TempDir::new("snap-io");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let uds = dir.join("v.sock");
    let mut peers = Peers::new();
    peers.udp_echo(&ns, "10.0.0.1:7");
    peers.vsock_echo(&uds);
    let cfg = snap_io_config(&disk, "embsio0", "06:00:0a:00:00:02", &uds, 3);
    let (mut p, _sock) = spawn_vmm(&dir, "vmm", &ns, Some(&cfg));
    let r = wait_round(&mut p, 1, Round::all_ok);
    assert_eq!(r.mac, "06:00:0a:00:00:02");
    assert_eq!((r.cid, r.resets), (3, 0));
    assert!(
        disk_round(&disk).is_some_and(|n| n >= 2),
        "{:?}",
        disk_round(&disk)
    );
}

fn call(sock: &Path, method: &str, path: &str, body: serde_json::Value) -> (u16, String) {
    let r = http(sock, method, path, Some(&body.to_string()));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Boots `cfg` (snap-io) in `ns`, waits for a good round, pauses and takes
/// a Full snapshot (`<dir>/snap.state`, `<dir>/snap.mem`), resumes the
/// original (whose devices must be unharmed by the save: it goes on with
/// a good round), then kills it. Returns the last round printed before the
/// snapshot. Mirrors firecracker-go-sdk's `PauseVM`, `CreateSnapshot`,
/// `ResumeVM`.
fn boot_and_snapshot(dir: &TempDir, ns: &NetNs, cfg: &serde_json::Value) -> u64 {
    let (mut a, sock_a) = spawn_vmm(dir, "vmm-a", ns, Some(cfg));
    wait_round(&mut a, 1, Round::all_ok);
    let (st, body) = call(&sock_a, "PATCH", "/vm", json!({"state": "Paused"}));
    assert_eq!(st, 204, "pause: {body}");
    let (st, body) = call(
        &sock_a,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": dir.join("snap.state"),
               "mem_file_path": dir.join("snap.mem")}),
    );
    assert_eq!(st, 204, "create: {body}\nstderr:\n{}", a.err());
    let before = rounds(&a.out()).last().map_or(0, |r| r.n);
    let (st, body) = call(&sock_a, "PATCH", "/vm", json!({"state": "Resumed"}));
    assert_eq!(st, 204, "resume: {body}");
    let r = wait_round(&mut a, before + 1, Round::all_ok);
    assert_eq!(r.resets, 0, "the original saw a transport reset: {r:?}");
    before
    // `a` is killed here: the snapshot is all that is left
}

/// The `PUT /snapshot/load` body of firecracker-go-sdk's `LoadSnapshot`
/// (File backend, `resume_vm`), plus `extra` fields.
fn load_body(dir: &TempDir, state: &Path, extra: serde_json::Value) -> serde_json::Value {
    let mut b = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": dir.join("snap.mem")},
        "resume_vm": true
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// A snap-io VM with `io_engine` on its drive (and, with `extras`, an
/// entropy device and a balloon the guest never activates) is snapshotted
/// and loaded in a new ember-vmm, in another network namespace, with
/// `network_overrides` (firecracker-go-sdk's `WithNetworkOverrides`) plus
/// ember's `guest_mac`, `vsock_override` and `drive_overrides`.
fn restore_with_overrides(tag: &str, io_engine: &str, extras: bool) {
    let ns1 = NetNs::new(&format!("{tag}a"), "embsio0", "10.0.0.1", None);
    let ns2 = NetNs::new(&format!("{tag}b"), "embsio1", "10.0.0.1", None);
    let dir = TempDir::new(tag);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let uds1 = dir.join("v1.sock");
    let uds2 = dir.join("v2.sock");
    let mut peers = Peers::new();
    peers.udp_echo(&ns1, "10.0.0.1:7");
    peers.udp_echo(&ns2, "10.0.0.1:7");
    peers.vsock_echo(&uds1);
    peers.vsock_echo(&uds2);

    let mut cfg = snap_io_config(&disk, "embsio0", "06:00:0a:00:00:02", &uds1, 3);
    cfg["drives"][0]["io_engine"] = json!(io_engine);
    if extras {
        cfg["entropy"] = json!({});
        cfg["balloon"] = json!({"amount_mib": 0, "deflate_on_oom": false,
                                "stats_polling_interval_s": 1});
    }
    let before = boot_and_snapshot(&dir, &ns1, &cfg);

    // The disk moves to another directory (another jail's path).
    let moved_dir = dir.join("moved");
    std::fs::create_dir(&moved_dir).unwrap();
    let moved = moved_dir.join("disk.img");
    std::fs::copy(&disk, &moved).unwrap();
    let original_round = disk_round(&disk);

    let (mut b, sock_b) = spawn_vmm(&dir, "vmm-b", &ns2, None);
    let body = load_body(
        &dir,
        &dir.join("snap.state"),
        json!({
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "embsio1",
                                   "guest_mac": "06:00:0a:00:00:09"}],
            "vsock_override": {"uds_path": uds2, "guest_cid": 7},
            "drive_overrides": [{"drive_id": "data", "path_on_host": moved}]
        }),
    );
    let (st, body) = call(&sock_b, "PUT", "/snapshot/load", body);
    assert_eq!(st, 204, "load: {body}\nstderr:\n{}", b.err());

    // The rounds go on in the new process, on every device, with the new
    // MAC and CID; the vsock connection open at the snapshot was reset.
    let r = wait_round(&mut b, before + 1, |r| {
        r.all_ok() && r.mac == "06:00:0a:00:00:09"
    });
    assert_eq!(r.cid, 7, "{r:?}");
    assert!(r.resets >= 1, "no transport reset seen: {r:?}");
    let later = wait_round(&mut b, r.n, Round::all_ok);
    // ember-vmm's own timings, for the record.
    for l in std::fs::read_to_string(dir.join("vmm-a.stderr"))
        .unwrap_or_default()
        .lines()
        .chain(b.err().lines())
        .filter(|l| {
            l.contains("snapshot created in")
                || l.contains("snapshot loaded in")
                || l.contains("restored in")
        })
    {
        println!("{io_engine}: {l}");
    }

    // The restored configuration shows the overrides.
    let c = http(&sock_b, "GET", "/vm/config", None).json();
    assert_eq!(c["drives"][0]["path_on_host"], json!(moved), "{c}");
    assert_eq!(c["drives"][0]["io_engine"], io_engine, "{c}");
    assert_eq!(
        c["network-interfaces"][0]["host_dev_name"], "embsio1",
        "{c}"
    );
    assert_eq!(
        c["network-interfaces"][0]["guest_mac"], "06:00:0a:00:00:09",
        "{c}"
    );
    assert_eq!(c["vsock"]["guest_cid"], 7, "{c}");
    assert_eq!(c["vsock"]["uds_path"], json!(uds2), "{c}");
    if extras {
        assert!(c["entropy"].is_object() && c["balloon"].is_object(), "{c}");
    }

    // Writes after the restore went to the moved copy only.
    assert!(
        disk_round(&moved).is_some_and(|n| n >= later.n),
        "moved copy at {:?}, round {}",
        disk_round(&moved),
        later.n
    );
    assert_eq!(disk_round(&disk), original_round);
}

#[test]
fn block_net_and_vsock_keep_working_after_a_restore_with_overrides() {
    restore_with_overrides("siod", "Sync", true);
}

#[test]
fn an_async_drive_keeps_working_after_a_restore() {
    restore_with_overrides("sioq", "Async", false);
}

/// The state file with its JSON payload changed by `f` and the header's
/// length and CRC32 made to match (snapshot/format.rs's layout): only the
/// device state is wrong.
fn edited_state(state: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&state[24..]).unwrap();
    f(&mut v);
    let payload = serde_json::to_vec(&v).unwrap();
    let mut out = state[..12].to_vec();
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

#[test]
fn bad_device_states_are_refused_and_the_vmm_still_loads_a_good_one() {
    let ns = NetNs::new("siox", "embsio0", "10.0.0.1", None);
    let dir = TempDir::new("snap-baddev");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let uds = dir.join("v.sock");
    let mut peers = Peers::new();
    peers.udp_echo(&ns, "10.0.0.1:7");
    peers.vsock_echo(&uds);
    let cfg = snap_io_config(&disk, "embsio0", "06:00:0a:00:00:02", &uds, 3);
    let before = boot_and_snapshot(&dir, &ns, &cfg);
    // ember-vmm was killed: its socket file stays, as a user would find it.
    std::fs::remove_file(&uds).unwrap();
    let good = std::fs::read(dir.join("snap.state")).unwrap();

    let (mut b, sock) = spawn_vmm(&dir, "vmm-b", &ns, None);
    let try_load = |name: &str, bytes: Vec<u8>| -> String {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let (st, body) = call(
            &sock,
            "PUT",
            "/snapshot/load",
            load_body(&dir, &p, json!({})),
        );
        assert_eq!(st, 400, "{name}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The devices are in slot order: the drive, the interface, vsock.
    let msg = try_load(
        "queue-size",
        edited_state(&good, |v| {
            v["devices"][0]["Block"]["device"]["base"]["queues"][0]["size"] = json!(3)
        }),
    );
    assert!(
        msg.contains("queue 0") && msg.contains("power of two"),
        "{msg}"
    );
    let msg = try_load(
        "ring-outside",
        edited_state(&good, |v| {
            v["devices"][1]["Net"]["device"]["base"]["queues"][1]["used_ring"] =
                json!(0x7fff_0000_0000u64)
        }),
    );
    assert!(msg.contains("not inside guest memory"), "{msg}");
    let msg = try_load(
        "status",
        edited_state(&good, |v| {
            v["devices"][2]["Vsock"]["transport"]["status"] = json!(5)
        }),
    );
    assert!(msg.contains("status 0x5"), "{msg}");
    let msg = try_load(
        "unknown-drive",
        edited_state(&good, |v| {
            v["devices"][0]["Block"]["drive_id"] = json!("other")
        }),
    );
    assert!(msg.contains("block \"other\""), "{msg}");
    let msg = try_load(
        "twice",
        edited_state(&good, |v| {
            let d = v["devices"][1].clone();
            v["devices"].as_array_mut().unwrap().push(d);
        }),
    );
    assert!(msg.contains("twice"), "{msg}");
    assert_eq!(http(&sock, "GET", "/", None).json()["state"], "Not started");

    // Nothing was left holding the TAP, the drive's lock or the vsock
    // socket: the good state loads and the rounds go on.
    let (st, body) = call(
        &sock,
        "PUT",
        "/snapshot/load",
        load_body(&dir, &dir.join("snap.state"), json!({})),
    );
    assert_eq!(st, 204, "load: {body}\nstderr:\n{}", b.err());
    let r = wait_round(&mut b, before + 1, Round::all_ok);
    assert_eq!((r.cid, r.resets), (3, 1), "{r:?}");
}

/// Devices across a Diff: a snap-io VM with dirty page tracking takes a
/// Full snapshot, runs on, takes a Diff (the pages the guest and the
/// devices wrote since: used rings, rx buffers, the block data), and the
/// Diff rebased onto the Full with `ember-snapshot-editor edit-memory
/// rebase` (Firecracker's `snapshot-editor`) restores a guest whose rounds
/// go on on every device.
#[test]
fn devices_keep_working_after_a_diff_rebased_onto_its_full_base() {
    let ns = NetNs::new("siof", "embsio0", "10.0.0.1", None);
    let dir = TempDir::new("snap-diffdev");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let uds1 = dir.join("v1.sock");
    let uds2 = dir.join("v2.sock");
    let mut peers = Peers::new();
    peers.udp_echo(&ns, "10.0.0.1:7");
    peers.vsock_echo(&uds1);
    peers.vsock_echo(&uds2);
    let mut cfg = snap_io_config(&disk, "embsio0", "06:00:0a:00:00:02", &uds1, 3);
    cfg["machine-config"]["track_dirty_pages"] = json!(true);
    let (mut a, sock) = spawn_vmm(&dir, "vmm-a", &ns, Some(&cfg));
    let snapshot = |kind: &str, mem: &str, state: &str| {
        let (st, body) = call(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
        assert_eq!(st, 204, "pause: {body}");
        let (st, body) = call(
            &sock,
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": kind, "snapshot_path": dir.join(state),
                   "mem_file_path": dir.join(mem)}),
        );
        assert_eq!(st, 204, "{kind}: {body}");
    };
    let r = wait_round(&mut a, 1, Round::all_ok);
    snapshot("Full", "full.mem", "full.state");
    let (st, body) = call(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    assert_eq!(st, 204, "resume: {body}");
    wait_round(&mut a, r.n + 1, Round::all_ok);
    snapshot("Diff", "diff.mem", "diff.state");
    let before = rounds(&a.out()).last().map_or(0, |r| r.n);
    drop(a);

    let out = Command::new(bin("ember-snapshot-editor"))
        .args(["edit-memory", "rebase", "--memory-path"])
        .arg(dir.join("full.mem"))
        .arg("--diff-path")
        .arg(dir.join("diff.mem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "rebase: {out:?}");

    let (mut b, sock_b) = spawn_vmm(&dir, "vmm-b", &ns, None);
    let body = json!({
        "snapshot_path": dir.join("diff.state"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.join("full.mem")},
        "resume_vm": true,
        "vsock_override": {"uds_path": uds2}
    });
    let (st, body) = call(&sock_b, "PUT", "/snapshot/load", body);
    assert_eq!(st, 204, "load: {body}\nstderr:\n{}", b.err());
    let r = wait_round(&mut b, before + 1, Round::all_ok);
    assert_eq!((r.cid, r.resets), (3, 1), "{r:?}");
    assert!(disk_round(&disk).is_some_and(|n| n >= r.n));
}

/// Devices over the Uffd backend: restoring them reads the rings in guest
/// memory (checked against the saved indices) and the devices then write
/// used rings and buffers, all through pages `ember-uffd-handler` serves
/// from the Full memory file. The rounds go on on every device.
#[test]
fn devices_keep_working_over_the_uffd_backend() {
    let uffd_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok()
        // SAFETY: the system call takes flags only; a descriptor it returns
        // is closed at once.
        || unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC);
            if fd >= 0 {
                libc::close(fd as i32);
            }
            fd >= 0
        };
    if !uffd_ok {
        println!("SKIP: no userfaultfd on this host");
        return;
    }
    let ns = NetNs::new("siou", "embsio0", "10.0.0.1", None);
    let dir = TempDir::new("snap-uffddev");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let uds1 = dir.join("v1.sock");
    let uds2 = dir.join("v2.sock");
    let mut peers = Peers::new();
    peers.udp_echo(&ns, "10.0.0.1:7");
    peers.vsock_echo(&uds1);
    peers.vsock_echo(&uds2);
    let cfg = snap_io_config(&disk, "embsio0", "06:00:0a:00:00:02", &uds1, 3);
    let before = boot_and_snapshot(&dir, &ns, &cfg);

    let hsock = dir.join("pf-handler.sock");
    let mut h = Proc::spawn(
        {
            let mut c = Command::new(bin("ember-uffd-handler"));
            c.arg("--socket")
                .arg(&hsock)
                .arg("--mem-file")
                .arg(dir.join("snap.mem"));
            c
        },
        dir.path(),
        "handler",
    );
    h.expect_out("listening on");
    let (mut b, sock_b) = spawn_vmm(&dir, "vmm-b", &ns, None);
    let body = json!({
        "snapshot_path": dir.join("snap.state"),
        "mem_backend": {"backend_type": "Uffd", "backend_path": hsock},
        "resume_vm": true,
        "vsock_override": {"uds_path": uds2}
    });
    let (st, body) = call(&sock_b, "PUT", "/snapshot/load", body);
    assert_eq!(st, 204, "load: {body}\nstderr:\n{}", b.err());
    let r = wait_round(&mut b, before + 1, Round::all_ok);
    assert_eq!((r.cid, r.resets), (3, 1), "{r:?}");
    drop(b);
    assert!(h.wait().success(), "handler: {}", h.err());
}
