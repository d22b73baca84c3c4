//! The test guest drives ember's virtio devices for real: block reads and
//! writes on files, network frames through a TAP in a network namespace the
//! test creates, vsock in both directions over the hybrid unix socket, and a
//! hostile guest that must not bring the VMM down.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;

use ember_tests::*;
use serde_json::json;

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 509) & 0xff) as u8).collect()
}

/// Runs ember-vmm on `cfg` (optionally inside a netns) and returns the process.
fn spawn_vm(dir: &TempDir, cfg: serde_json::Value, netns: Option<&str>) -> Proc {
    let p = dir.join("vm.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("ember-vmm"));
            c
        }
        None => Command::new(bin("ember-vmm")),
    };
    cmd.args(["--no-api", "--config-file"]).arg(&p);
    Proc::spawn(cmd, dir.path(), "vmm")
}

fn base_cfg(args: &str) -> serde_json::Value {
    json!({
        "boot-source": {"kernel_image_path": PVH_ELF, "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}
    })
}

fn drive(id: &str, path: &Path, ro: bool) -> serde_json::Value {
    json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": ro})
}

fn run_ok(p: &mut Proc) -> String {
    let st = p.wait();
    let out = p.out();
    assert_eq!(st.code(), Some(0), "stdout:\n{out}\nstderr:\n{}", p.err());
    assert!(out.contains("ember-guest: done"), "{out}");
    out
}

#[test]
fn devices_are_announced_on_the_cmdline() {
    let dir = TempDir::new("probe");
    // Two files: a file behind a read-write drive is locked against every
    // other open, this VMM's other drives included.
    let (disk_a, disk_b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&disk_a, vec![0u8; 4096]).unwrap();
    std::fs::write(&disk_b, vec![0u8; 4096]).unwrap();
    let mut cfg = base_cfg("ember.test=virtio-probe");
    cfg["drives"] = json!([drive("a", &disk_a, false), drive("b", &disk_b, true)]);
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": dir.join("v.sock")});
    let out = run_ok(&mut spawn_vm(&dir, cfg, None));
    assert!(
        out.contains("ember-guest: virtio 0xd0000000 irq 5 id 2 version 2"),
        "{out}"
    );
    assert!(
        out.contains("ember-guest: virtio 0xd0001000 irq 6 id 2 version 2"),
        "{out}"
    );
    assert!(
        out.contains("ember-guest: virtio 0xd0002000 irq 7 id 19 version 2"),
        "{out}"
    );
    let dir = TempDir::new("probe-none");
    let out = run_ok(&mut spawn_vm(
        &dir,
        base_cfg("ember.test=virtio-probe"),
        None,
    ));
    assert!(out.contains("ember-guest: virtio none"), "{out}");
}

#[test]
fn block_read_write_flush_and_odd_sizes() {
    block_guest_io(None);
}

/// The same guest I/O with Firecracker's `io_engine: "Async"` (io_uring).
#[test]
fn block_io_through_the_async_engine() {
    block_guest_io(Some("Async"));
}

fn block_guest_io(io_engine: Option<&str>) {
    let dir = TempDir::new("blk");
    // Not a multiple of 512: the last sector is partial.
    let data = pattern(64 * 1024 + 300);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, &data).unwrap();
    let mut cfg = base_cfg("ember.test=blk ember.blk_write=1");
    let mut d = drive("data0", &disk, false);
    if let Some(e) = io_engine {
        d["io_engine"] = json!(e);
    }
    cfg["drives"] = json!([d]);
    let out = run_ok(&mut spawn_vm(&dir, cfg, None));
    let sectors = data.len().div_ceil(512);
    assert!(
        out.contains(&format!("ember-guest: blk capacity {sectors} ro 0")),
        "{out}"
    );
    assert!(out.contains("ember-guest: blk id data0"), "{out}");
    assert!(
        out.contains(&format!(
            "ember-guest: blk read fnv1a 0x{:08x}",
            fnv1a(&data[..4096])
        )),
        "{out}"
    );
    let mut last = data[(sectors - 1) * 512..].to_vec();
    last.resize(512, 0);
    assert!(
        out.contains(&format!(
            "ember-guest: blk last-sector fnv1a 0x{:08x}",
            fnv1a(&last)
        )),
        "{out}"
    );
    assert!(
        out.contains("ember-guest: blk beyond-end status 1"),
        "{out}"
    );
    assert!(out.contains("ember-guest: blk flush status 0"), "{out}");
    assert!(out.contains("ember-guest: blk write ok"), "{out}");
    // The guest's write reached the file, at sector 8, and nothing else changed.
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), data.len(), "the file must not grow");
    let written: Vec<u8> = (0..4096).map(|i| ((i * 13 + 7) & 0xff) as u8).collect();
    assert_eq!(&after[8 * 512..8 * 512 + 4096], &written[..]);
    assert_eq!(&after[..8 * 512], &data[..8 * 512]);
    assert_eq!(&after[16 * 512..], &data[16 * 512..]);
}

#[test]
fn read_only_block_device_refuses_writes() {
    let dir = TempDir::new("blk-ro");
    let data = pattern(32 * 1024);
    let disk = dir.join("ro.img");
    std::fs::write(&disk, &data).unwrap();
    let mut cfg = base_cfg("ember.test=blk ember.blk_write=1");
    cfg["drives"] = json!([drive("ro0", &disk, true)]);
    let out = run_ok(&mut spawn_vm(&dir, cfg, None));
    assert!(out.contains("ember-guest: blk capacity 64 ro 1"), "{out}");
    assert!(out.contains("ember-guest: blk write status 1"), "{out}");
    assert_eq!(std::fs::read(&disk).unwrap(), data);
}

#[test]
fn a_hostile_guest_does_not_bring_the_vmm_down() {
    let dir = TempDir::new("evil");
    let data = pattern(16 * 1024);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, &data).unwrap();
    let good = format!(
        "ember-guest: evil recovered fnv1a 0x{:08x}",
        fnv1a(&data[..4096])
    );
    for mode in [
        "evil-desc-oob",
        "evil-desc-loop",
        "evil-len",
        "evil-queue-size",
        "evil-avail-idx",
    ] {
        let needs_reset = mode == "evil-avail-idx";
        let mut cfg = base_cfg(&format!("ember.test={mode}"));
        cfg["drives"] = json!([drive("d", &disk, false)]);
        let mut p = spawn_vm(&dir, cfg, None);
        let out = run_ok(&mut p);
        assert!(out.contains(" sent"), "{mode}: {out}");
        assert!(
            out.contains(&good),
            "{mode}: device did not recover:\n{out}"
        );
        // The VMM said what it refused.
        assert!(
            p.err().contains("[WARN] virtio"),
            "{mode}: nothing logged:\n{}",
            p.err()
        );
        if needs_reset {
            // A corrupt avail index makes the device ask for a reset.
            assert!(
                out.contains("ember-guest: evil device status 0x4f"),
                "{out}"
            );
        }
        // Whatever the guest asked for, the backing file is untouched.
        assert_eq!(std::fs::read(&disk).unwrap(), data, "{mode}");
    }
}

#[test]
fn network_frames_flow_through_a_tap_in_a_test_namespace() {
    let ns = NetNs::new("t", "embtap0", "10.0.0.1", None);
    // UDP echo on 10.0.0.1:7 inside the namespace, bounded in time.
    let echo = ns.udp_echo("10.0.0.1:7", 3);
    let dir = TempDir::new("net");
    let mut cfg = base_cfg("ember.test=net ember.ip=10.0.0.2 ember.peer=10.0.0.1");
    cfg["network-interfaces"] = json!([{
        "iface_id": "eth0", "host_dev_name": "embtap0", "guest_mac": "06:00:0a:00:00:02"
    }]);
    let mut p = spawn_vm(&dir, cfg, Some(&ns.name));
    let out = run_ok(&mut p);
    assert!(
        out.contains("ember-guest: net mac 06:00:0a:00:00:02"),
        "{out}"
    );
    assert!(out.contains("ember-guest: net arp "), "{out}");
    for n in 1..=3 {
        assert!(
            out.contains(&format!("ember-guest: net udp-echo ok {n}")),
            "{out}"
        );
    }
    assert_eq!(echo.join().unwrap(), 3);
}

#[test]
fn vsock_connections_in_both_directions() {
    let dir = TempDir::new("vsock");
    let uds = dir.join("v.sock");
    // Guest-initiated connections to port 52 land on "<uds>_52".
    let listener = UnixListener::bind(format!("{}_52", uds.display())).unwrap();
    let guest_side = echo_guest_hello(listener);
    let mut cfg = base_cfg("ember.test=vsock");
    cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
    let mut p = spawn_vm(&dir, cfg, None);
    assert_eq!(guest_side.join().unwrap(), "hello from guest\n");
    p.expect_out("ember-guest: vsock guest-connect echo ok");
    p.expect_out("ember-guest: vsock listening on port 1234");

    // Host-initiated: CONNECT <port>, OK <port>, then an echoed stream.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let msg: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    s.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    r.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let out = run_ok(&mut p);
    assert!(out.contains("ember-guest: vsock cid 3"), "{out}");
    assert!(
        out.contains("ember-guest: vsock host-connect accepted"),
        "{out}"
    );
    assert!(
        out.contains("ember-guest: vsock host-connect echoed 3000"),
        "{out}"
    );
    assert!(!uds.exists(), "ember-vmm leaves no vsock socket behind");
}

#[test]
fn vsock_connect_to_a_closed_port_is_refused_cleanly() {
    let dir = TempDir::new("vsock-refused");
    let uds = dir.join("v.sock");
    let mut cfg = base_cfg("ember.test=vsock ember.vsock_mode=guest ember.vsock_port=99");
    cfg["vsock"] = json!({"guest_cid": 5, "uds_path": uds});
    let out = run_ok(&mut spawn_vm(&dir, cfg, None));
    assert!(
        out.contains("ember-guest: vsock guest-connect refused"),
        "{out}"
    );
}

#[test]
fn device_api_over_the_socket() {
    let dir = TempDir::new("devapi");
    let sock = dir.join("api.sock");
    let disk = dir.join("a.img");
    std::fs::write(&disk, pattern(8192)).unwrap();
    let disk2 = dir.join("b.img");
    std::fs::write(&disk2, pattern(4096)).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    let put =
        |path: &str, body: serde_json::Value| http(&sock, "PUT", path, Some(&body.to_string()));
    let patch =
        |path: &str, body: serde_json::Value| http(&sock, "PATCH", path, Some(&body.to_string()));

    // Bad input, each a 400 with a reason.
    let r = put("/drives/a", drive("b", &disk, false));
    assert_eq!(r.status, 400);
    assert!(r.json()["fault_message"]
        .as_str()
        .unwrap()
        .contains("does not match"));
    let r = put(
        "/drives/a",
        drive("a", Path::new("/nonexistent/a.img"), false),
    );
    assert_eq!(r.status, 400);
    let r = put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap-name-far-too-long"}),
    );
    assert_eq!(r.status, 400);
    let r = put(
        "/vsock",
        json!({"guest_cid": 1, "uds_path": dir.join("v.sock")}),
    );
    assert_eq!(r.status, 400);
    let r = patch("/drives/a", json!({"drive_id": "a", "path_on_host": disk2}));
    assert_eq!(r.status, 400, "PATCH before boot");

    // Good config, then boot an idle guest.
    assert_eq!(put("/drives/a", drive("a", &disk, false)).status, 204);
    let b = json!({"kernel_image_path": LINUX64_ELF, "boot_args": "ember.test=idle"});
    assert_eq!(put("/boot-source", b).status, 204);
    assert_eq!(
        put("/actions", json!({"action_type": "InstanceStart"})).status,
        204
    );
    p.expect_out("ember-guest: idle");
    assert_eq!(
        put("/drives/c", drive("c", &disk, false)).status,
        400,
        "PUT after boot"
    );

    // Swap the backing file after boot.
    let r = patch("/drives/a", json!({"drive_id": "a", "path_on_host": disk2}));
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    let cfg = http(&sock, "GET", "/vm/config", None).json();
    assert_eq!(cfg["drives"][0]["path_on_host"], disk2.to_str().unwrap());
    let r = patch(
        "/drives/zzz",
        json!({"drive_id": "zzz", "path_on_host": disk2}),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["fault_message"]
        .as_str()
        .unwrap()
        .contains("No drive"));
    assert_eq!(http(&sock, "GET", "/", None).json()["state"], "Running");
    drop(p);
}
