//! The entropy device (virtio-rng) and the balloon (virtio-balloon), driven
//! by the test guest's own drivers through Firecracker's API: `PUT /entropy`,
//! and `PUT`/`PATCH`/`GET /balloon` with `/balloon/statistics`.

use std::process::Command;

use ember_tests::*;
use serde_json::json;

/// The guest fills two 64-byte requests from virtio-rng (configured in a
/// Firecracker config file, key `entropy`), sees them differ, and a request
/// with only a device-readable buffer comes back empty.
#[test]
fn the_guest_reads_random_bytes_from_the_entropy_device() {
    let dir = TempDir::new("rng");
    let cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF, "boot_args": "ember.test=rng"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "entropy": {"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}
    });
    let p = dir.join("vm.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"]).arg(&p);
    let mut vm = Proc::spawn(cmd, dir.path(), "vmm");
    let st = vm.wait();
    let out = vm.out();
    assert_eq!(st.code(), Some(0), "{out}\n{}", vm.err());
    let got: Vec<(u32, u32)> = out
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ember-guest: rng got ")?;
            let (got, nz) = rest.split_once(" nonzero ")?;
            Some((got.parse().ok()?, nz.trim().parse().ok()?))
        })
        .collect();
    assert_eq!(got.len(), 2, "{out}");
    for (n, nonzero) in got {
        assert_eq!(n, 64, "{out}");
        // 64 random bytes with fewer than 48 nonzero: about 2^-100.
        assert!(nonzero >= 48, "{out}");
    }
    assert!(out.contains("ember-guest: rng differ yes"), "{out}");
    assert!(out.contains("ember-guest: rng readonly-got 0"), "{out}");
}

/// The balloon through the API, as Firecracker's clients drive it: `PUT
/// /balloon` before boot; the guest inflates to the target and its pages
/// read back as zeros (the host took their memory); `GET
/// /balloon/statistics` shows what the guest reported; `PATCH /balloon` to
/// 0 makes it deflate.
#[test]
fn the_balloon_inflates_reports_statistics_and_deflates() {
    let dir = TempDir::new("balloon");
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--id", "balloon-vm"]);
    let mut vm = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    api_put(
        &sock,
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF, "boot_args": "ember.test=balloon"}),
    );
    api_put(
        &sock,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    // Larger than guest memory: Firecracker's refusal.
    let r = http(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 65, "deflate_on_oom": false}"#),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["fault_message"]
            .as_str()
            .unwrap()
            .contains("too large"),
        "{}",
        r.json()
    );
    // Not configured yet.
    assert_eq!(http(&sock, "GET", "/balloon", None).status, 400);
    api_put(
        &sock,
        "/balloon",
        json!({"amount_mib": 1, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
    );
    // Post-boot operations are refused before boot.
    let r = http(&sock, "GET", "/balloon/statistics", None);
    assert_eq!(r.status, 400);
    api_put(&sock, "/actions", json!({"action_type": "InstanceStart"}));

    vm.expect_out("ember-guest: balloon features stats yes deflate-on-oom yes");
    vm.expect_out("ember-guest: balloon target 256");
    vm.expect_out("ember-guest: balloon inflated 256 zeroed 256");
    vm.expect_out("ember-guest: balloon stats posted");
    // The statistics arrive asynchronously: poll until the guest's values
    // show (the wait is only a safety net).
    let stats = wait_for(PATIENCE, || {
        let r = http(&sock, "GET", "/balloon/statistics", None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (v["free_memory"] == 12345678 && v["actual_pages"] == 256).then_some(v)
    })
    .expect("the guest's statistics never showed");
    assert_eq!(stats["total_memory"], 134217728, "{stats}");
    assert_eq!(stats["major_faults"], 42, "{stats}");
    assert_eq!(stats["target_pages"], 256, "{stats}");
    assert_eq!(stats["target_mib"], 1, "{stats}");
    assert_eq!(stats["actual_mib"], 1, "{stats}");
    assert!(stats.get("swap_in").is_none(), "{stats}");
    let r = http(&sock, "GET", "/balloon", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["amount_mib"], 1);
    assert_eq!(r.json()["deflate_on_oom"], true);
    // Hinting was not enabled.
    let r = http(&sock, "PATCH", "/balloon/hinting/start", Some("{}"));
    assert_eq!(r.status, 400);
    // Statistics cannot be turned off after boot.
    let r = http(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert_eq!(r.status, 400);
    let r = http(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // The new target shows at once (the guest exits soon after deflating).
    assert_eq!(http(&sock, "GET", "/balloon", None).json()["amount_mib"], 0);
    vm.expect_out("ember-guest: balloon deflated 256");
    let st = vm.wait();
    assert_eq!(st.code(), Some(0), "{}\n{}", vm.out(), vm.err());
}
