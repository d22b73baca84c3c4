//! Firecracker's 38 API operations against ember-vmm, one by one, with the
//! request and response shapes of Firecracker's swagger
//! (`src/firecracker/swagger/firecracker.yaml`): status codes, GET bodies,
//! `fault_message` texts, and the pre-boot / post-boot rules of its
//! `rpc_interface.rs`. Operations without a device behind them in ember
//! answer a 400 that names what is missing, never "invalid path".

use std::path::PathBuf;
use std::process::Command;

use ember_tests::*;
use serde_json::{json, Value};

struct Vmm {
    p: Proc,
    sock: PathBuf,
    dir: TempDir,
}

fn start(tag: &str) -> Vmm {
    let dir = TempDir::new(tag);
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock).args(["--id", "fc-api-1"]);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    Vmm { p, sock, dir }
}

impl Vmm {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let b = body.map(|v| v.to_string());
        let r = http(&self.sock, method, path, b.as_deref());
        let j = if r.body.is_empty() {
            Value::Null
        } else {
            r.json()
        };
        (r.status, j)
    }
    fn ok(&self, method: &str, path: &str, body: Value) {
        let (s, j) = self.call(method, path, Some(body));
        assert_eq!(s, 204, "{method} {path}: {j}");
    }
    fn get(&self, path: &str) -> Value {
        let (s, j) = self.call("GET", path, None);
        assert_eq!(s, 200, "GET {path}: {j}");
        j
    }
    /// A 400 (or `status`) with a `fault_message` containing `needle`.
    fn refused(&self, method: &str, path: &str, body: Option<Value>, needle: &str) -> String {
        self.refused_with(400, method, path, body, needle)
    }
    fn refused_with(
        &self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<Value>,
        needle: &str,
    ) -> String {
        let (s, j) = self.call(method, path, body);
        let m = j["fault_message"].as_str().unwrap_or_default().to_string();
        assert_eq!(s, status, "{method} {path}: {j}");
        assert!(
            m.contains(needle),
            "{method} {path}: {m:?} lacks {needle:?}"
        );
        assert!(
            !m.contains("Invalid request method and/or path"),
            "{method} {path} is not routed: {m}"
        );
        m
    }
}

const BEFORE: &str = "not supported before starting the microVM";
const AFTER: &str = "not supported after starting the microVM";

#[test]
fn every_operation_before_and_after_boot() {
    let v = start("fcapi");
    let disk = v.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let log = v.dir.join("vmm.log");
    let metrics = v.dir.join("metrics.json");
    std::fs::write(&log, b"").unwrap();
    std::fs::write(&metrics, b"").unwrap();
    let serial = v.dir.join("serial.out");

    // describeInstance, getFirecrackerVersion.
    let i = v.get("/");
    assert_eq!(i["id"], "fc-api-1");
    assert_eq!(i["state"], "Not started");
    assert_eq!(i["app_name"], "ember");
    assert!(i["vmm_version"].is_string());
    assert!(v.get("/version")["firecracker_version"].is_string());

    // putLogger, putMetrics (once only), putSerialDevice.
    v.ok(
        "PUT",
        "/logger",
        json!({"log_path": log, "level": "Info", "show_level": true, "show_log_origin": true}),
    );
    v.refused(
        "PUT",
        "/logger",
        Some(json!({"level": "Loud"})),
        "unknown log level",
    );
    v.ok("PUT", "/metrics", json!({"metrics_path": metrics}));
    v.refused(
        "PUT",
        "/metrics",
        Some(json!({"metrics_path": metrics})),
        "Reinitialization of metrics not allowed",
    );
    v.ok(
        "PUT",
        "/serial",
        json!({"serial_out_path": serial, "rate_limiter": {"size": 1000000, "refill_time": 100}}),
    );

    // Machine configuration: GET shape, PUT needs both counts, PATCH not empty.
    let m = v.get("/machine-config");
    for k in [
        "vcpu_count",
        "mem_size_mib",
        "smt",
        "track_dirty_pages",
        "huge_pages",
    ] {
        assert!(m.get(k).is_some(), "{k} missing from {m}");
    }
    v.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2})),
        "missing field `mem_size_mib`",
    );
    v.refused(
        "PATCH",
        "/machine-config",
        Some(json!({})),
        "Empty PATCH request.",
    );
    v.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 3, "mem_size_mib": 64, "smt": true})),
        "1 or an even number if SMT is enabled",
    );
    v.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"})),
        "static CPU template",
    );
    v.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 63, "huge_pages": "2M"})),
        "multiple of the configured page size",
    );
    v.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64, "smt": true, "track_dirty_pages": true}),
    );
    v.ok(
        "PATCH",
        "/machine-config",
        json!({"huge_pages": "Transparent"}),
    );
    let m = v.get("/machine-config");
    assert_eq!(m["smt"], true);
    assert_eq!(m["track_dirty_pages"], true);
    assert_eq!(m["huge_pages"], "Transparent");

    // putCpuConfiguration: syntax checked at once, applied at boot. The
    // hypervisor bit is already set by ember; MSR 0x10 (TSC) is read and
    // written back unchanged (all bits 'x').
    v.refused(
        "PUT",
        "/cpu-config",
        Some(json!({"msr_modifiers": [{"addr": "0x10", "bitmap": "0b1"}]})),
        "Invalid MSR bitmap",
    );
    v.refused(
        "PUT",
        "/cpu-config",
        Some(json!({"reg_modifiers": [{"addr": "0x0", "bitmap": "0b1"}]})),
        "aarch64-only",
    );
    v.ok(
        "PUT",
        "/cpu-config",
        json!({
            "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": format!("0b1{}", "x".repeat(31))}]}],
            "msr_modifiers": [{"addr": "0x10", "bitmap": format!("0b{}", "x".repeat(64))}]
        }),
    );

    // putGuestBootSource, putGuestDriveByID (vhost-user refused by name,
    // an unknown io_engine refused, "Async" taken), patchGuestDriveByID
    // before boot.
    v.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF, "boot_args": "console=ttyS0 ember.test=wait-ctrlaltdel"}),
    );
    v.refused(
        "PUT",
        "/drives/vhost",
        Some(json!({"drive_id": "vhost", "is_root_device": false, "socket": "/run/vhost.sock"})),
        "vhost-user block devices",
    );
    v.refused(
        "PUT",
        "/drives/aio",
        Some(json!({"drive_id": "aio", "is_root_device": false, "path_on_host": disk, "io_engine": "Turbo"})),
        "Unsupported io_engine",
    );
    v.ok(
        "PUT",
        "/drives/d0",
        json!({"drive_id": "d0", "is_root_device": false, "is_read_only": false, "path_on_host": disk}),
    );
    // A second drive on the io_uring engine (booted with the others).
    let aio_disk = v.dir.join("aio.img");
    std::fs::write(&aio_disk, vec![0u8; 1 << 20]).unwrap();
    v.ok(
        "PUT",
        "/drives/aio",
        json!({"drive_id": "aio", "is_root_device": false, "is_read_only": false, "path_on_host": aio_disk, "io_engine": "Async"}),
    );
    v.refused(
        "PATCH",
        "/drives/d0",
        Some(json!({"drive_id": "d0", "path_on_host": disk})),
        BEFORE,
    );
    v.refused(
        "PUT",
        "/drives/",
        Some(json!({})),
        "The ID cannot be empty.",
    );

    // putGuestVsock.
    v.ok(
        "PUT",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": v.dir.join("v.sock")}),
    );

    // MMDS: the store works before boot; config needs existing interfaces.
    v.refused("PATCH", "/mmds", Some(json!({"a": 1})), "not initialized");
    assert_eq!(v.get("/mmds"), json!({}));
    v.ok(
        "PUT",
        "/mmds",
        json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}),
    );
    v.ok(
        "PATCH",
        "/mmds",
        json!({"latest": {"meta-data": {"hostname": "h"}}}),
    );
    assert_eq!(
        v.get("/mmds"),
        json!({"latest": {"meta-data": {"ami-id": "ami-1", "hostname": "h"}}})
    );
    v.refused(
        "PUT",
        "/mmds/config",
        Some(json!({"network_interfaces": ["eth9"]})),
        "does not correspond to any existing network interface",
    );
    v.refused(
        "PUT",
        "/mmds/config",
        Some(json!({"network_interfaces": []})),
        "is empty",
    );

    // putEntropyDevice; putBalloon and describeBalloonConfig (the devices'
    // guest side is tests/tests/rng_balloon.rs).
    v.ok("PUT", "/entropy", json!({}));
    v.refused("GET", "/balloon", None, "No balloon device found.");
    v.refused(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 1024, "deflate_on_oom": true})),
        "Amount of pages requested is too large",
    );
    v.ok(
        "PUT",
        "/balloon",
        json!({"amount_mib": 1, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    let b = v.get("/balloon");
    assert_eq!(
        (b["amount_mib"].clone(), b["deflate_on_oom"].clone()),
        (json!(1), json!(true))
    );
    v.refused("PATCH", "/balloon", Some(json!({"amount_mib": 2})), BEFORE);
    v.refused("GET", "/balloon/statistics", None, BEFORE);
    v.refused(
        "PATCH",
        "/balloon/statistics",
        Some(json!({"stats_polling_interval_s": 1})),
        BEFORE,
    );
    v.refused("PATCH", "/balloon/hinting/start", Some(json!({})), BEFORE);
    v.refused("GET", "/balloon/hinting/status", None, BEFORE);
    v.refused("PATCH", "/balloon/hinting/stop", None, BEFORE);
    v.refused(
        "PUT",
        "/pmem/p0",
        Some(json!({"id": "p0", "path_on_host": disk})),
        "virtio-pmem",
    );
    v.refused("PATCH", "/pmem/p0", Some(json!({"id": "p0"})), BEFORE);
    v.refused(
        "PUT",
        "/hotplug/memory",
        Some(json!({"total_size_mib": 1024})),
        "virtio-mem",
    );
    v.refused(
        "PATCH",
        "/hotplug/memory",
        Some(json!({"requested_size_mib": 128})),
        BEFORE,
    );
    v.refused("GET", "/hotplug/memory", None, BEFORE);

    // Snapshots: create needs a started microVM; load is refused once the
    // machine is configured (Firecracker's boot-specific resources rule).
    v.refused(
        "PUT",
        "/snapshot/create",
        Some(json!({"mem_file_path": "/m", "snapshot_path": "/s"})),
        BEFORE,
    );
    v.refused(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": "/s", "mem_file_path": "/m"})),
        "not allowed after configuring",
    );

    // Actions and state that need a running VM.
    v.refused(
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
        BEFORE,
    );
    v.refused(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
        BEFORE,
    );
    v.refused("PATCH", "/vm", Some(json!({"state": "Paused"})), BEFORE);

    // getExportVmConfig before boot.
    let c = v.get("/vm/config");
    assert_eq!(c["machine-config"]["vcpu_count"], 2);
    assert_eq!(c["drives"][0]["drive_id"], "d0");
    assert_eq!(c["logger"]["level"], "Info");
    assert_eq!(c["metrics"]["metrics_path"], json!(metrics));
    assert!(c["cpu-config"]["msr_modifiers"].is_array(), "{c}");

    // createSyncAction InstanceStart: 2 vCPUs with SMT, dirty page log,
    // THP, the CPU template applied.
    v.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    let wait_serial = || {
        wait_for(PATIENCE, || {
            std::fs::read_to_string(&serial)
                .ok()
                .filter(|s| s.contains("waiting for ctrl-alt-del"))
        })
        .expect("the guest booted")
    };
    wait_serial();
    assert_eq!(v.get("/")["state"], "Running");

    // Pre-boot operations are now refused, as Firecracker's runtime
    // controller refuses them.
    for (m, p, b) in [
        ("PUT", "/boot-source", json!({"kernel_image_path": PVH_ELF})),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64}),
        ),
        ("PATCH", "/machine-config", json!({"vcpu_count": 1})),
        ("PUT", "/cpu-config", json!({})),
        ("PUT", "/logger", json!({"level": "Debug"})),
        ("PUT", "/metrics", json!({"metrics_path": "/x"})),
        ("PUT", "/serial", json!({})),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": 4, "uds_path": "/tmp/x"}),
        ),
        ("PUT", "/mmds/config", json!({"network_interfaces": ["1"]})),
        ("PUT", "/entropy", json!({})),
        (
            "PUT",
            "/balloon",
            json!({"amount_mib": 1, "deflate_on_oom": false}),
        ),
        ("PUT", "/pmem/p0", json!({"id": "p0", "path_on_host": "/x"})),
        ("PUT", "/hotplug/memory", json!({})),
        ("PUT", "/snapshot/load", json!({"snapshot_path": "/s"})),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
        (
            "PUT",
            "/drives/d1",
            json!({"drive_id": "d1", "is_root_device": false, "path_on_host": "/x"}),
        ),
        (
            "PUT",
            "/network-interfaces/n1",
            json!({"iface_id": "n1", "host_dev_name": "tap9"}),
        ),
    ] {
        v.refused(m, p, Some(b), AFTER);
    }

    // Post-boot operations.
    v.ok(
        "PATCH",
        "/drives/d0",
        json!({"drive_id": "d0", "path_on_host": disk}),
    );
    v.ok(
        "PATCH",
        "/mmds",
        json!({"latest": {"meta-data": {"hostname": "h2"}}}),
    );
    assert_eq!(v.get("/mmds")["latest"]["meta-data"]["hostname"], "h2");
    v.ok("PUT", "/actions", json!({"action_type": "FlushMetrics"}));
    // The balloon after boot: the target can move; the statistics answer
    // Firecracker's BalloonStats shape.
    v.ok("PATCH", "/balloon", json!({"amount_mib": 2}));
    assert_eq!(v.get("/balloon")["amount_mib"], 2);
    let st = v.get("/balloon/statistics");
    for k in ["target_pages", "actual_pages", "target_mib", "actual_mib"] {
        assert!(st[k].is_u64(), "{k} missing from {st}");
    }
    v.refused("GET", "/hotplug/memory", None, "virtio-mem");
    v.refused(
        "PATCH",
        "/pmem/p0",
        Some(json!({"id": "p0"})),
        "virtio-pmem",
    );
    // Snapshot files go to the test's directory (a create that succeeds
    // writes them).
    let (snap_mem, snap_state) = (v.dir.join("snap.mem"), v.dir.join("snap.state"));
    v.refused(
        "PUT",
        "/snapshot/create",
        Some(json!({"mem_file_path": snap_mem, "snapshot_path": snap_state})),
        "not paused",
    );
    v.ok("PATCH", "/vm", json!({"state": "Paused"}));
    assert_eq!(v.get("/")["state"], "Paused");
    // Every device of this VM is saved with it (snapshot_devices.rs loads
    // such snapshots back).
    v.ok(
        "PUT",
        "/snapshot/create",
        json!({"mem_file_path": snap_mem, "snapshot_path": snap_state, "snapshot_type": "Full"}),
    );
    assert!(snap_mem.exists() && snap_state.exists());
    v.ok("PATCH", "/vm", json!({"state": "Resumed"}));

    // The metrics file has Firecracker-shaped lines: one at boot, one per
    // FlushMetrics, counters as deltas.
    let lines: Vec<Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    // Three actions before it: FlushMetrics and SendCtrlAltDel (refused
    // before boot) and InstanceStart; four drive PUTs, two refused.
    assert_eq!(lines[0]["put_api_requests"]["actions_count"], 3);
    assert_eq!(lines[0]["put_api_requests"]["actions_fails"], 2);
    assert_eq!(lines[0]["put_api_requests"]["drive_count"], 4);
    assert_eq!(lines[0]["put_api_requests"]["drive_fails"], 2);
    assert_eq!(lines[1]["patch_api_requests"]["drive_count"], 1);
    // Device counters, per drive and summed.
    assert!(
        lines[0]["block_d0"]["read_count"].is_u64(),
        "{:?}",
        lines[0]
    );
    assert!(lines[0]["block"]["write_bytes"].is_u64(), "{:?}", lines[0]);
    // The io_uring drive has its own counters too.
    assert!(
        lines[0]["block_aio"]["read_count"].is_u64(),
        "{:?}",
        lines[0]
    );
    assert!(
        lines[0]["entropy"]["entropy_bytes"].is_u64(),
        "{:?}",
        lines[0]
    );
    assert!(
        lines[0]["uart"]["rate_limiter_dropped_bytes"].is_u64(),
        "{:?}",
        lines[0]
    );
    // The log file has Firecracker's line format with level and origin.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("[fc-api-1:main:INFO:vmm/src/builder.rs:"),
        "{text}"
    );

    v.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
    let mut p = v.p;
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
}

#[test]
fn network_interfaces_mtu_and_mmds_config() {
    let v = start("fcnet");
    v.refused(
        "PUT",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 60})),
        "Invalid mtu 60",
    );
    v.refused(
        "PUT",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth1", "host_dev_name": "tap0"})),
        "does not match",
    );
    v.ok(
        "PUT",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01",
               "mtu": 9000, "rx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}),
    );
    v.refused(
        "PUT",
        "/mmds/config",
        Some(json!({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"})),
        "not link local",
    );
    v.ok(
        "PUT",
        "/mmds/config",
        json!({"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}),
    );
    let c = v.get("/vm/config");
    assert_eq!(c["network-interfaces"][0]["mtu"], 9000);
    assert_eq!(c["mmds-config"]["version"], "V2");
    assert_eq!(c["mmds-config"]["ipv4_address"], "169.254.170.2");
    v.refused(
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0"})),
        BEFORE,
    );
    drop(v.dir);
}

/// `huge_pages: "2M"` maps guest memory from the host's hugetlbfs pool:
/// with too few free 2 MiB pages, InstanceStart fails naming the knob; with
/// enough, the guest boots. Unknown CPUID leaves in a template are named.
#[test]
fn hugetlbfs_memory_and_template_errors_at_boot() {
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let v = start("fchuge");
    v.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF, "boot_args": "console=ttyS0 ember.test=hello"}),
    );
    v.ok(
        "PUT",
        "/cpu-config",
        json!({"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "eax", "bitmap": format!("0b{}", "0".repeat(32))}]}]}),
    );
    v.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    v.refused(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
        "CPUID leaf 0x4fffffff",
    );
    v.ok("PUT", "/cpu-config", json!({}));
    v.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32, "huge_pages": "2M"}),
    );
    if free >= 16 {
        v.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
        let mut p = v.p;
        assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    } else {
        v.refused(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
            "/proc/sys/vm/nr_hugepages",
        );
        assert_eq!(v.get("/")["state"], "Not started");
    }
}

/// `--boot-timer` (Firecracker's): the probe sits at the first MMIO page;
/// the test guest writes 123 there and the VMM logs `Guest-boot-time`.
/// Virtio devices moved one page up still work (the guest reads them from
/// the command line).
#[test]
fn boot_timer_logs_the_guest_boot_time() {
    let dir = TempDir::new("fcboottimer");
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--boot-timer", "--level", "Info"]);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    let v = Vmm { p, sock, dir };
    let disk = v.dir.join("disk.img");
    std::fs::write(&disk, vec![0x5au8; 64 * 1024]).unwrap();
    v.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF, "boot_args": "console=ttyS0 ember.test=boot-timer"}),
    );
    v.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    v.ok(
        "PUT",
        "/drives/d0",
        json!({"drive_id": "d0", "is_root_device": false, "is_read_only": true, "path_on_host": disk}),
    );
    v.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    let mut p = v.p;
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(
        p.out().contains("ember-guest: boot-timer signalled"),
        "{}",
        p.out()
    );
    assert!(p.err().contains("Guest-boot-time = "), "{}", p.err());
}
