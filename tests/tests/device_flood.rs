//! A guest can neither freeze nor exhaust its VMM through virtio-net or
//! virtio-blk (issue 19). The test guest keeps a whole 256-entry queue busy
//! with the largest work the device takes (`evil-net-flood`,
//! `evil-blk-flood`) and then holds; with the seccomp filters on, a
//! watchdog polls the API (`GET /`) throughout and samples the VMM's RSS
//! and descriptors. Afterwards the VMM still answers, takes SendCtrlAltDel,
//! and SIGTERM ends it with status 143.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_tests::*;
use serde_json::json;

/// RSS bound: the guest's 64 MiB, the VMM's own few MiB, generous slack.
const RSS_BOUND_KIB: u64 = 160 << 10;
/// Descriptor bound: the VMM's own (API, eventfds, epoll, TAP or drive,
/// a watchdog connection) with room to spare; a leak per frame or request
/// would pass it within the first round.
const FDS_BOUND: usize = 64;

/// ember-vmm with its API on `cfg` (optionally inside a netns), seccomp on.
fn spawn_api_vm(dir: &TempDir, cfg: serde_json::Value, netns: Option<&str>) -> (Proc, PathBuf) {
    let sock = dir.join("api.sock");
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // `ip netns exec` execs the VMM: the pid stays the VMM's.
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("ember-vmm"));
            c
        }
        None => Command::new(bin("ember-vmm")),
    };
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg_path);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    (p, sock)
}

/// The numbers after the words of a guest line starting with `prefix`.
fn numbers(out: &str, prefix: &str) -> Vec<u64> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?}:\n{out}"));
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// (packets, dropped) of a TAP's `dir` ("rx" or "tx") counters.
fn tap_stats(ns: &NetNs, tap: &str, dir: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", "dev", tap])
        .output()
        .expect("run ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let s = &v[0]["stats64"][dir];
    (
        s["packets"].as_u64().unwrap_or(0),
        s["dropped"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_full_tx_ring_and_a_host_flood_on_a_tap_leave_the_vmm_responsive() {
    const TAP: &str = "embflood0";
    const FRAMES: u64 = 4096;
    let ns = NetNs::new("nf", TAP, "10.0.0.1", None);
    // The guest's address resolves without it ever answering ARP.
    let st = Command::new("ip")
        .args(["-n", &ns.name, "neigh", "add", "10.0.0.2", "lladdr"])
        .args(["06:00:0a:00:00:02", "dev", TAP, "nud", "permanent"])
        .status()
        .unwrap();
    assert!(st.success());
    let dir = TempDir::new("net-flood");
    let mut cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF,
                        "boot_args": format!("ember.test=evil-net-flood ember.flood_frames={FRAMES}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:0a:00:00:02"
    }]);
    let (mut p, sock) = spawn_api_vm(&dir, cfg, Some(&ns.name));
    let dog = Watchdog::start(sock.clone(), p.pid());
    // The host side: as many datagrams as it can toward a guest that never
    // posts a receive buffer, while the guest floods and after.
    let stop = Arc::new(AtomicBool::new(false));
    let host = {
        let stop = stop.clone();
        ns.spawn_in(move || {
            let s = std::net::UdpSocket::bind("10.0.0.1:0").unwrap();
            let payload = [0x42u8; 1400];
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) && sent < 200_000 {
                if s.send_to(&payload, "10.0.0.2:9").is_ok() {
                    sent += 1;
                }
            }
            sent
        })
    };
    p.expect_out("ember-guest: evil net-flood start frames");
    p.expect_out("ember-guest: evil net-flood holding");
    // Keep the host flood going a while against the holding guest.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let host_sent = host.join().unwrap();
    let (fds, rss) = (fd_count(p.pid()), rss_kib(p.pid()));
    let w = dog.finish();
    let out = p.out();
    let n = numbers(&out, "ember-guest: evil net-flood frames ");
    let (tap_rx, _) = tap_stats(&ns, TAP, "rx");
    let (tap_tx, tap_tx_dropped) = tap_stats(&ns, TAP, "tx");
    eprintln!(
        "net flood: guest sent {} frames, {} completed; the TAP took {tap_rx} from the VMM; \
         the host sent {host_sent} datagrams, the TAP queued {tap_tx} and dropped \
         {tap_tx_dropped}; API answered {} GET / (slowest {:?}); VMM peak RSS {} KiB, \
         peak {} fds; after: RSS {rss} KiB, {fds} fds",
        n[0], n[1], w.polls, w.worst, w.peak_rss_kib, w.peak_fds
    );
    assert_eq!(n, [FRAMES, FRAMES], "every frame came back used");
    // A quarter of the frames are one byte too long and a quarter runts:
    // the device drops those itself (and says so, rate-limited).
    assert!(p.err().contains("virtio-net: tx frame of"), "{}", p.err());
    assert!(w.polls > 0);
    assert!(
        w.peak_rss_kib.max(rss) < RSS_BOUND_KIB,
        "RSS {} KiB",
        w.peak_rss_kib
    );
    assert!(
        w.peak_fds.max(fds) < FDS_BOUND,
        "{} descriptors",
        w.peak_fds
    );
    // The maximum-size frames, in both framings, reached the TAP (the
    // kernel may drop some); nothing longer or shorter did.
    assert!(tap_rx > 0 && tap_rx <= FRAMES / 2, "{tap_rx}");
    // The host's flood: the VMM read one frame (the one it holds for a
    // buffer that never comes); the kernel dropped what its queue could
    // not take. Nothing piled up in the VMM.
    assert!(host_sent > 0);
    assert!(
        tap_tx <= 1,
        "the VMM read {tap_tx} frames without rx buffers"
    );
    assert!(tap_tx_dropped > 0);
    in_control_then_sigterm(&mut p, &sock);
}

#[test]
fn a_queue_full_of_maximum_size_block_requests_leaves_the_vmm_responsive() {
    // The device's limits (devices::virtio::block): size_max, seg_max.
    const SIZE_MAX: u64 = 64 << 10;
    const SEG_MAX: u64 = 128;
    const ROUNDS: u64 = 2;
    let dir = TempDir::new("blk-flood");
    // Two maximum-size requests' worth, sparse; the guest's writes fill it.
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(2 * SEG_MAX * SIZE_MAX)
        .unwrap();
    let cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF,
                        "boot_args": format!("ember.test=evil-blk-flood ember.flood_rounds={ROUNDS}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "d", "path_on_host": disk, "is_root_device": false,
                    "is_read_only": false}],
    });
    let (mut p, sock) = spawn_api_vm(&dir, cfg, None);
    let dog = Watchdog::start(sock.clone(), p.pid());
    p.expect_out("ember-guest: evil blk-flood start");
    p.expect_out("ember-guest: evil blk-flood holding");
    let (fds, rss) = (fd_count(p.pid()), rss_kib(p.pid()));
    let w = dog.finish();
    let out = p.out();
    let start = numbers(&out, "ember-guest: evil blk-flood start ");
    let n = numbers(&out, "ember-guest: evil blk-flood requests ");
    eprintln!(
        "blk flood: {} requests of {} x {} bytes, {} completed, {} ok, {} ioerr \
         ({} GiB of I/O); API answered {} GET / (slowest {:?}); VMM peak RSS {} KiB, \
         peak {} fds; after: RSS {rss} KiB, {fds} fds",
        n[0],
        start[2],
        start[1],
        n[1],
        n[2],
        n[3],
        (n[2] * SEG_MAX * SIZE_MAX) >> 30,
        w.polls,
        w.worst,
        w.peak_rss_kib,
        w.peak_fds
    );
    assert_eq!(start[1..3], [SIZE_MAX, SEG_MAX], "{out}");
    // Every one of the 256 * rounds 8 MiB requests was served.
    assert_eq!(n, [256 * ROUNDS, 256 * ROUNDS, 256 * ROUNDS, 0, 0], "{out}");
    // Just over the limits: IOERR, and said so.
    assert!(
        out.contains("ember-guest: evil blk-flood oversize status 1 1"),
        "{out}"
    );
    assert!(p.err().contains("too large"), "{}", p.err());
    assert!(w.polls > 0);
    assert!(
        w.peak_rss_kib.max(rss) < RSS_BOUND_KIB,
        "RSS {} KiB",
        w.peak_rss_kib
    );
    assert!(
        w.peak_fds.max(fds) < FDS_BOUND,
        "{} descriptors",
        w.peak_fds
    );
    in_control_then_sigterm(&mut p, &sock);
    // The file never grew.
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        2 * SEG_MAX * SIZE_MAX
    );
}
