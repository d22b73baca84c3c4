//! MMDS reached by the guest over its own virtio-net interface, answered
//! inside ember-vmm: the test guest ARPs for 169.254.169.254, opens TCP to
//! port 80 and speaks HTTP, as a Linux guest's curl would. The data is put
//! through Firecracker's API (`PUT /mmds/config`, `PUT /mmds`), exactly as
//! firecracker-go-sdk's `SetMetadata` and the MMDS config of
//! `Machine.Start` send it.

use std::process::Command;

use ember_tests::*;
use serde_json::json;

/// Boots the `mmds` test mode with MMDS `version` on eth0 and returns the
/// guest's output and the host TAP's received-packet count.
fn run_mmds(tag: &str, tap: &str, version: &str, args: &str) -> (String, u64) {
    let ns = NetNs::new(tag, tap, "10.0.0.1", None);
    let dir = TempDir::new(tag);
    let sock = dir.join("api.sock");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(bin("ember-vmm"))
        .arg("--api-sock")
        .arg(&sock);
    let mut vm = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    api_put(
        &sock,
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF,
               "boot_args": format!("ember.test=mmds ember.ip=10.0.0.2 {args}")}),
    );
    api_put(
        &sock,
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    api_put(
        &sock,
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": "06:00:0a:00:00:02"}),
    );
    api_put(
        &sock,
        "/mmds/config",
        json!({"version": version, "network_interfaces": ["eth0"]}),
    );
    api_put(
        &sock,
        "/mmds",
        json!({"latest": {"meta-data": {"instance-id": "i-ember", "local-hostname": "vm1",
                                        "placement": {"zone": "z1"}}}}),
    );
    api_put(&sock, "/actions", json!({"action_type": "InstanceStart"}));
    let st = vm.wait();
    let out = vm.out();
    assert_eq!(st.code(), Some(0), "{out}\n{}", vm.err());
    // Frames the VMM wrote to the TAP: the MMDS exchange never reaches it.
    let stats = Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", tap])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    let rx = v[0]["stats64"]["rx"]["packets"].as_u64().unwrap();
    (out, rx)
}

#[test]
fn the_guest_reads_mmds_v1_over_its_own_interface() {
    let (out, tap_rx) = run_mmds("mmds1", "embmm1", "V1", "");
    assert!(
        out.contains("ember-guest: net arp 06:01:23:45:67:01"),
        "{out}"
    );
    assert!(out.contains("ember-guest: mmds status 200"), "{out}");
    // The IMDS listing: keys, objects with a trailing slash.
    for line in ["instance-id", "local-hostname", "placement/"] {
        assert!(
            out.contains(&format!("ember-guest: mmds body {line}\n")),
            "{line}: {out}"
        );
    }
    assert_eq!(tap_rx, 0, "MMDS frames leaked to the TAP");
}

#[test]
fn mmds_v2_needs_a_session_token() {
    let (out, tap_rx) = run_mmds(
        "mmds2",
        "embmm2",
        "V2",
        "ember.mmds-v2=1 ember.mmds-path=/latest/meta-data/instance-id",
    );
    assert!(
        out.contains("ember-guest: mmds without-token status 401"),
        "{out}"
    );
    assert!(
        out.contains("ember-guest: mmds token status 200 len 64"),
        "{out}"
    );
    assert!(out.contains("ember-guest: mmds status 200"), "{out}");
    assert!(out.contains("ember-guest: mmds body i-ember\n"), "{out}");
    assert_eq!(tap_rx, 0, "MMDS frames leaked to the TAP");
}
