//! ember-vmm snapshots through the per-VM API, as Firecracker's clients
//! drive them (firecracker-go-sdk `Machine.PauseVM` + `CreateSnapshot`,
//! then `WithSnapshot` + `LoadSnapshot` on a fresh VMM): the test guest's
//! ticker keeps counting in a new process; bad state files are refused
//! with 400 and a JSON `fault_message` while the VMM keeps serving.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;

use ember_tests::snapvmm::{print_vmm_times, ApiVmm as Vmm, VmmJail as Jail, JAIL_GID, JAIL_UID};
use ember_tests::*;

/// The tick numbers of the complete `ember-guest: tick N` lines in `out`.
fn ticks(out: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("ember-guest: tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Boots the ticker, waits for a few ticks, pauses and snapshots it into
/// `dir/{state,mem}`; returns the console output up to the snapshot.
fn ticker_snapshot(dir: &Path) -> String {
    ticker_snapshot_with(dir, 1)
}

fn ticker_snapshot_with(dir: &Path, vcpus: u8) -> String {
    let mut v = Vmm::start(dir, "src");
    // firecracker-go-sdk: PUT /boot-source, /machine-config, /actions.
    v.boot(
        LINUX64_ELF,
        "ember.test=ticker",
        json!({"vcpu_count": vcpus, "mem_size_mib": 32}),
    );
    v.p.expect_out("tick 3");
    // A running VM cannot be snapshotted.
    let msg = v.fault(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem")}),
    );
    assert!(msg.contains("not paused"), "{msg}");
    // Machine.PauseVM: PATCH /vm {"state": "Paused"}.
    v.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let msg = v.fault(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("same"), "mem_file_path": dir.join("same")}),
    );
    assert!(msg.contains("different files"), "{msg}");
    // firecracker-go-sdk's SnapshotCreateParams may carry Firecracker's old
    // target `version`: only this ember-vmm's own format is accepted.
    let msg = v.fault(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem"), "version": "0.23.0"}),
    );
    assert!(msg.contains("format version 0.23.0"), "{msg}");
    // Machine.CreateSnapshot: PUT /snapshot/create.
    let t = Instant::now();
    v.ok(
        "PUT",
        "/snapshot/create",
        json!({
            "mem_file_path": dir.join("mem"),
            "snapshot_path": dir.join("state"),
            "snapshot_type": "Full"
        }),
    );
    eprintln!(
        "snapshot create: {} us (API round trip)",
        t.elapsed().as_micros()
    );
    let out = v.p.out();
    print_vmm_times(&v.p);
    let Vmm { mut p, .. } = v;
    let _ = p.child.kill();
    p.wait();
    for f in ["state", "mem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    out
}

/// Loads `dir/{state,mem}` into a fresh ember-vmm and resumes it.
fn load(v: &Vmm, state: &Path, mem: &Path) {
    // Machine.LoadSnapshot via WithSnapshot: PUT /snapshot/load.
    let t = Instant::now();
    v.ok(
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true
        }),
    );
    eprintln!(
        "snapshot load: {} us (API round trip)",
        t.elapsed().as_micros()
    );
}

/// The restored guest's output continues the old: the ticks of both, joined,
/// count up by one with no restart.
fn assert_continues(before: &str, after: &mut Proc) {
    let last = *ticks(before).last().expect("ticks before the snapshot");
    let want = format!("ember-guest: tick {}\n", last + 3);
    let got = wait_for(PATIENCE, || after.out().contains(&want).then_some(()));
    assert!(
        got.is_some(),
        "restored guest did not reach tick {}\nbefore:\n{before}\nafter:\n{}\nstderr:\n{}",
        last + 3,
        after.out(),
        after.err()
    );
    print_vmm_times(after);
    let joined = format!("{before}{}", after.out());
    let all = ticks(&joined);
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks jump or restart: {all:?}");
    }
    assert!(
        !ticks(&after.out()).contains(&0),
        "the guest booted again instead of continuing"
    );
}

#[test]
fn ticker_continues_in_a_new_process() {
    let dir = TempDir::new("snap-ticker");
    let before = ticker_snapshot(dir.path());
    assert!(Command::new(bin("ember-vmm"))
        .args(["--describe-snapshot"])
        .arg(dir.join("state"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "v1.0.0")
        .unwrap());

    // firecracker-go-sdk with WithSnapshot: BootstrapLoggingHandler
    // (PutLogger, PutMetrics) still runs, the machine handlers do not, then
    // LoadSnapshotHandler (the exact body the SDK marshals).
    let v = Vmm::start(dir.path(), "dst");
    std::fs::write(dir.join("dst.log"), b"").unwrap();
    v.ok(
        "PUT",
        "/logger",
        json!({"level": "Debug", "log_path": dir.join("dst.log"), "show_level": true, "show_log_origin": false}),
    );
    std::fs::write(dir.join("dst.metrics"), b"").unwrap();
    v.ok(
        "PUT",
        "/metrics",
        json!({"metrics_path": dir.join("dst.metrics")}),
    );
    let t = Instant::now();
    let r = http(
        &v.sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"mem_backend":{{"backend_path":{},"backend_type":"File"}},"resume_vm":true,"snapshot_path":{}}}"#,
            json!(dir.join("mem")),
            json!(dir.join("state"))
        )),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    eprintln!(
        "snapshot load: {} us (API round trip)",
        t.elapsed().as_micros()
    );
    assert_eq!(v.get("/")["state"], "Running");
    // The VMM's own logger stays, and it got the load's timing line.
    let log = std::fs::read_to_string(dir.join("dst.log")).unwrap();
    assert!(log.contains("snapshot loaded in"), "{log}");
    assert!(!std::fs::read_to_string(dir.join("dst.metrics"))
        .unwrap()
        .is_empty());
    // GET /vm/config shows the restored machine.
    let cfg = v.get("/vm/config");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 1, "{cfg}");
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 32, "{cfg}");
    assert_eq!(
        cfg["boot-source"]["kernel_image_path"], LINUX64_ELF,
        "{cfg}"
    );
    // Loading is once only, and only before boot.
    let msg = v.fault(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem")}),
    );
    assert!(msg.contains("not supported after starting"), "{msg}");
    let Vmm { mut p, .. } = v;
    assert_continues(&before, &mut p);
}

#[test]
fn load_paused_then_resume_with_two_vcpus() {
    let dir = TempDir::new("snap-paused");
    let before = ticker_snapshot_with(dir.path(), 2);
    let v = Vmm::start(dir.path(), "dst");
    v.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem")}),
    );
    assert_eq!(v.get("/")["state"], "Paused");
    assert_eq!(v.get("/vm/config")["machine-config"]["vcpu_count"], 2);
    // A paused restored VM can be snapshotted again at once.
    v.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("state2"), "mem_file_path": dir.join("mem2")}),
    );
    v.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let Vmm { mut p, .. } = v;
    assert_continues(&before, &mut p);
    drop(p);
    // ...and that second snapshot continues too.
    let v = Vmm::start(dir.path(), "dst2");
    load(&v, &dir.join("state2"), &dir.join("mem2"));
    let Vmm { mut p, .. } = v;
    assert_continues(&before, &mut p);
}

#[test]
fn bad_state_files_are_refused_and_a_good_one_still_loads() {
    let dir = TempDir::new("snap-bad");
    let before = ticker_snapshot(dir.path());
    let good = std::fs::read(dir.join("state")).unwrap();
    let v = Vmm::start(dir.path(), "dst");
    let try_load = |name: &str, bytes: &[u8]| -> String {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        v.fault(
            "PUT",
            "/snapshot/load",
            json!({
                "snapshot_path": p,
                "mem_backend": {"backend_type": "File", "backend_path": dir.join("mem")},
                "resume_vm": true
            }),
        )
    };
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x01;
    let msg = try_load("corrupt", &corrupt);
    assert!(msg.contains("corrupt") && msg.contains("CRC32"), "{msg}");
    let msg = try_load("truncated", &good[..good.len() - 100]);
    assert!(msg.contains("truncated"), "{msg}");
    let msg = try_load("short", &good[..10]);
    assert!(msg.contains("truncated"), "{msg}");
    let mut other = good.clone();
    other[8] = 2;
    let msg = try_load("version", &other);
    assert!(
        msg.contains("snapshot format version 2, this ember-vmm reads version 1"),
        "{msg}"
    );
    let msg = try_load("magic", b"not a snapshot at all, just some text");
    assert!(msg.contains("bad magic"), "{msg}");
    // A memory file shorter than the layout.
    std::fs::write(dir.join("shortmem"), [0u8; 4096]).unwrap();
    let msg = v.fault(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("shortmem")}),
    );
    assert!(msg.contains("memory file"), "{msg}");
    // Unknown override targets, the Uffd backend (not yet), no memory.
    let msg = v.fault(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem"),
               "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap9"}]}),
    );
    assert!(msg.contains("eth9"), "{msg}");
    let msg = v.fault(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state")}),
    );
    assert!(msg.contains("mem_backend"), "{msg}");
    assert_eq!(v.get("/")["state"], "Not started");
    // The VMM is intact: the good file loads.
    load(&v, &dir.join("state"), &dir.join("mem"));
    let Vmm { mut p, .. } = v;
    assert_continues(&before, &mut p);
}

#[test]
fn load_is_refused_once_the_machine_is_configured() {
    let dir = TempDir::new("snap-cfg");
    let v = Vmm::start(dir.path(), "vmm");
    v.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    let msg = v.fault(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem")}),
    );
    assert!(msg.contains("after configuring"), "{msg}");
}

#[test]
fn snapshot_version_flag() {
    let o = Command::new(bin("ember-vmm"))
        .arg("--snapshot-version")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "v1.0.0");
    let o = Command::new(bin("ember-vmm"))
        .args(["--describe-snapshot", "/nonexistent/state"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn ticker_continues_in_another_jail() {
    let logs = TempDir::new("snap-jail-logs");
    let a = Jail::new("a");
    a.place("/kernel.elf", Path::new(LINUX64_ELF));
    std::fs::create_dir_all(a.host("/snap")).unwrap();
    std::os::unix::fs::chown(a.host("/snap"), Some(JAIL_UID), Some(JAIL_GID)).unwrap();
    let mut v = a.spawn(&[], logs.path());
    v.boot(
        "/kernel.elf",
        "ember.test=ticker",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    v.p.expect_out("tick 3");
    v.ok("PATCH", "/vm", json!({"state": "Paused"}));
    v.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": "/snap/vm.state", "mem_file_path": "/snap/vm.mem", "snapshot_type": "Full"}),
    );
    let before = v.p.out();
    let Vmm { mut p, .. } = v;
    let _ = p.child.kill();
    p.wait();

    let b = Jail::new("b");
    b.place("/restore.state", &a.host("/snap/vm.state"));
    b.place("/restore.mem", &a.host("/snap/vm.mem"));
    let v = b.spawn(&[], logs.path());
    load(&v, Path::new("/restore.state"), Path::new("/restore.mem"));
    let Vmm { mut p, .. } = v;
    assert_continues(&before, &mut p);
}

/// The legacy devices come back: a guest restored while polling the i8042
/// gets the Ctrl-Alt-Del the new VMM injects (Machine.Shutdown's
/// `PUT /actions SendCtrlAltDel`), and the VMM exits cleanly.
#[test]
fn ctrl_alt_del_reaches_a_restored_guest() {
    let dir = TempDir::new("snap-cad");
    let mut v = Vmm::start(dir.path(), "src");
    v.boot(
        LINUX64_ELF,
        "ember.test=wait-ctrlaltdel",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    v.p.expect_out("waiting for ctrl-alt-del");
    v.ok("PATCH", "/vm", json!({"state": "Paused"}));
    v.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("state"), "mem_file_path": dir.join("mem")}),
    );
    let Vmm { mut p, .. } = v;
    let _ = p.child.kill();
    p.wait();

    let v = Vmm::start(dir.path(), "dst");
    load(&v, &dir.join("state"), &dir.join("mem"));
    v.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
    let Vmm { mut p, .. } = v;
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(p.out().contains("ember-guest: ctrl-alt-del"), "{}", p.out());
}
