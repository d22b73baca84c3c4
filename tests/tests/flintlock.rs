//! The Flintlock face of emberd over its unix socket: create returns
//! PENDING at once, the reconcile loop builds the kernel image and volumes
//! from OCI layouts (whiteouts applied), the cidata disk and a TAP, and the
//! VM boots (CREATED); get/list/delete; validation; reconcile reaching FAILED.

use std::path::{Path, PathBuf};
use std::process::Command;

use ember_tests::*;
use serde_json::{json, Value};

fn start() -> Emberd {
    Emberd::start(
        "flintlock",
        10503,
        &[
            "--flintlock-max-retries",
            "3",
            "--flintlock-backoff-ms",
            "100",
        ],
    )
}

fn make_oci(out: &Path, spec: Value) {
    let script = workspace_root().join("tests/fixtures/make_oci.py");
    let st = Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(spec.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "make_oci.py failed");
}

/// A kernel image holding the PVH test guest at boot/vmlinux, and a root
/// filesystem in three layers with a deletion and an opaque directory.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = dir.join("kernel-oci");
    make_oci(
        &kernel,
        json!({"ref": "kernel:latest", "layers": [
            {"dirs": ["boot"], "files": {"boot/vmlinux": {"from": PVH_ELF, "mode": 0o755}}}
        ]}),
    );
    let root = dir.join("root-oci");
    make_oci(
        &root,
        json!({"ref": "rootfs:latest", "layers": [
            {"dirs": ["etc", "data", "data/old"], "files": {"etc/hostname": "base\n", "etc/gone": "x", "data/old/a": "a", "data/keep": "k"}},
            {"whiteouts": ["etc/gone"], "opaque": ["data/old"], "files": {"data/old/b": "b"}},
            {"files": {"etc/hostname": "layer3\n"}, "gzip": false}
        ]}),
    );
    (kernel, root)
}

fn spec(kernel: &Path, root: &Path, name: &str, test_mode: &str) -> Value {
    json!({
        "id": name, "namespace": "ns1", "labels": {"team": "ember"},
        "vcpu": 1, "memoryInMb": 1024,
        "kernel": {"image": kernel, "filename": "boot/vmlinux", "cmdline": {"ember.test": test_mode}},
        "rootVolume": {"id": "root", "source": {"containerSource": root}},
        "interfaces": [{"deviceId": "eth0", "type": "TAP", "guestMac": "06:00:0a:00:00:09"}],
        "metadata": {"user-data": "I2Nsb3VkLWNvbmZpZwo="}
    })
}

fn wait_state(d: &Emberd, uid: &str, want: &str) -> Value {
    let r = wait_for(PATIENCE, || {
        let (c, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        (c == 200 && v["microvm"]["status"]["state"] == want).then_some(v)
    });
    r.unwrap_or_else(|| {
        panic!(
            "{uid} never reached {want}: {:?}",
            d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None)
        )
    })
}

fn debugfs(img: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn create_reconciles_to_created_and_delete_removes_everything() {
    let d = start();
    let (kernel, root) = images(d.dir.path());
    let (c, v) = d.req(
        "POST",
        "/v1alpha1/microvm",
        Some(&spec(&kernel, &root, "vm1", "idle").to_string()),
    );
    assert_eq!(c, 200, "{v}");
    let m = &v["microvm"];
    assert_eq!(m["status"]["state"], "PENDING");
    let uid = m["spec"]["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 26, "uid is a ULID: {uid}");
    assert_eq!(m["spec"]["namespace"], "ns1");
    assert_eq!(m["spec"]["labels"]["team"], "ember");

    let v = wait_state(&d, &uid, "CREATED");
    let tap = v["microvm"]["status"]["networkInterfaces"]["eth0"]["hostDeviceName"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(tap.len() <= 15, "{tap}");
    assert!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "TAP {tap} missing"
    );
    // The same instance, seen through the UniK face: running, its console
    // shows the guest found the root disk, the cidata disk and the NIC.
    let name = format!("fl-{}", uid.to_lowercase());
    let inst = http(&d.sock, "GET", &format!("/instances/{name}"), None).json();
    assert_eq!(inst["State"], "running", "{inst}");
    let logs = wait_for(PATIENCE, || {
        let l = String::from_utf8_lossy(
            &http(&d.sock, "GET", &format!("/instances/{name}/logs"), None).body,
        )
        .to_string();
        l.contains("ember-guest: idle").then_some(l)
    })
    .expect("guest booted");
    assert!(logs.contains("ember-guest"), "{logs}");
    // Root volume: the layers were applied with their whiteouts.
    let vols = http(&d.sock, "GET", "/volumes", None).json();
    let rootvol = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"].as_str().unwrap().ends_with("-root"))
        .expect("root volume")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{rootvol}.img"));
    assert_eq!(debugfs(&img, "cat /etc/hostname"), "layer3\n");
    let etc = debugfs(&img, "ls /etc");
    assert!(!etc.contains("gone"), "whiteout not applied: {etc}");
    assert!(!etc.contains(".wh."), "{etc}");
    let old = debugfs(&img, "ls /data/old");
    assert!(
        old.contains(" b") && !old.contains(" a "),
        "opaque dir not applied: {old}"
    );
    assert_eq!(debugfs(&img, "cat /data/keep"), "k");

    // Get, list with and without the name filter.
    let (c, l) = d.req("GET", "/v1alpha1/microvm/ns1", None);
    assert_eq!(c, 200);
    assert_eq!(l["microvm"].as_array().unwrap().len(), 1);
    let (_, l) = d.req("GET", "/v1alpha1/microvm/ns1?name=other", None);
    assert_eq!(l["microvm"].as_array().unwrap().len(), 0);
    let (_, l) = d.req("GET", "/v1alpha1/microvm/default", None);
    assert_eq!(l["microvm"].as_array().unwrap().len(), 0);
    // A duplicate name in the namespace.
    let (c, e) = d.req(
        "POST",
        "/v1alpha1/microvm",
        Some(&spec(&kernel, &root, "vm1", "idle").to_string()),
    );
    assert_eq!(c, 409, "{e}");
    assert_eq!(e["code"], 6);

    // Delete: the VM, TAP, volumes and image go.
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
    // A deleted uid is NOT_FOUND (an error object, not an empty list).
    let (c, e) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!((c, e["code"].clone()), (404, json!(5)), "{e}");
    let gone = wait_for(PATIENCE, || {
        (!Path::new(&format!("/sys/class/net/{tap}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "TAP {tap} left behind");
    assert_eq!(
        http(&d.sock, "GET", &format!("/instances/{name}"), None).status,
        404
    );
    assert_eq!(
        http(&d.sock, "GET", "/volumes", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        http(&d.sock, "GET", "/images", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let (c, e) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!((c, e["code"].clone()), (404, json!(5)));
}

#[test]
fn a_missing_kernel_reconciles_to_failed() {
    let d = start();
    let (_, root) = images(d.dir.path());
    let missing = d.dir.join("no-such-kernel-oci");
    let (c, v) = d.req(
        "POST",
        "/v1alpha1/microvm",
        Some(&spec(&missing, &root, "bad", "hello").to_string()),
    );
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let v = wait_state(&d, &uid, "FAILED");
    assert_eq!(v["microvm"]["status"]["retry"], 3);
    assert!(
        v["microvm"]["status"]["error"]
            .as_str()
            .unwrap()
            .contains("no-such-kernel-oci"),
        "{v}"
    );
    // Failed attempts leave no scratch files behind.
    let staging = d
        .dir
        .join("state")
        .join("staging")
        .join(format!("flintlock-{}", uid.to_lowercase()));
    assert!(!staging.exists(), "{} left behind", staging.display());
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
}

#[test]
fn bad_specs_are_invalid_argument() {
    let d = start();
    let (kernel, root) = images(d.dir.path());
    let cases: Vec<(Value, &str)> = vec![
        (json!({"vcpu": 0, "id": "x"}), "kernel"),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s["vcpu"] = json!(99);
                s
            },
            "vcpu",
        ),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s["memoryInMb"] = json!(64);
                s
            },
            "memoryInMb",
        ),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s["kernel"]["filename"] = json!("");
                s
            },
            "filename",
        ),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s.as_object_mut().unwrap().remove("rootVolume");
                s
            },
            "rootVolume",
        ),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s["interfaces"][0]["type"] = json!("MACVTAP");
                s
            },
            // This emberd has no --parent-iface (flintlock_macvtap.rs
            // covers MACVTAP with one).
            "--parent-iface",
        ),
        (
            {
                let mut s = spec(&kernel, &root, "x", "hello");
                s["metadata"] = json!({"nope": "eA=="});
                s
            },
            "metadata",
        ),
    ];
    for (body, needle) in cases {
        let (c, e) = d.req("POST", "/v1alpha1/microvm", Some(&body.to_string()));
        assert_eq!(c, 400, "{needle}: {e}");
        assert_eq!(e["code"], 3, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{needle}: {e}"
        );
        assert!(e["details"].is_array());
    }
    let r = http(&d.sock, "POST", "/v1alpha1/microvm", Some("{not json"));
    assert_eq!(r.status, 400);
    let (c, _) = d.req("PUT", "/v1alpha1/microvm/x", None);
    assert_eq!(c, 405);
}
