//! Flintlock MACVTAP interfaces, end to end: emberd runs inside a network
//! namespace this test creates, holding the parent link `p0`; a MicroVM
//! with a MACVTAP interface gets a macvtap link on `p0` (mode bridge, the
//! guest's MAC, up), the jailer hands its character device to the VMM as
//! `/dev/macvtap/<name>`, and the guest exchanges frames through it with
//! the far end of `p0`. DELETE removes the link. Without `--parent-iface`
//! a MACVTAP interface is refused (400, code 3, naming the flag).
//!
//! The parent is one end of a veth pair rather than a `dummy` link: this
//! CI kernel is built without the dummy driver (CONFIG_DUMMY is not set),
//! and the veth's peer (`p0peer`, 10.0.0.1/24, with a UDP echo server)
//! lets the test check real traffic, not only that the link exists.
//!
//! The HTTP requests mirror flintlock's grpc-gateway routes as CAPMVM's
//! client drives them (`MicroVM.CreateMicroVM`: POST /v1alpha1/microvm;
//! `GetMicroVM`: GET /v1alpha1/microvm/{uid}; `DeleteMicroVM`: DELETE
//! /v1alpha1/microvm/{uid}); gRPC goes through the same model.

use std::path::{Path, PathBuf};
use std::process::Command;

use ember_tests::*;
use serde_json::{json, Value};

const GUEST_MAC: &str = "06:00:0a:00:00:02";

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

/// A kernel image holding the PVH test guest and a one-file root.
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
            {"dirs": ["etc"], "files": {"etc/hostname": "mvt\n"}}
        ]}),
    );
    (kernel, root)
}

/// A CAPMVM-shaped spec whose interface has no `type`: protojson's
/// default, MACVTAP.
fn spec(kernel: &Path, root: &Path, name: &str) -> Value {
    json!({
        "id": name, "namespace": "ns1",
        "vcpu": 1, "memoryInMb": 1024,
        "kernel": {"image": kernel, "filename": "boot/vmlinux", "cmdline": {
            "ember.test": "net", "ember.ip": "10.0.0.2", "ember.peer": "10.0.0.1"
        }},
        "rootVolume": {"id": "root", "source": {"containerSource": root}},
        "interfaces": [{"deviceId": "eth0", "guestMac": GUEST_MAC}]
    })
}

fn wait_state(d: &Emberd, uid: &str, want: &str) -> Value {
    wait_for(PATIENCE, || {
        let (c, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        (c == 200 && v["microvm"]["status"]["state"] == want).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "{uid} never reached {want}: {:?}\nemberd: {}",
            d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None),
            d.err()
        )
    })
}

/// The namespace `ember-<tag><pid>`: `p0` (the macvtap parent) and its veth peer `p0peer`
/// with 10.0.0.1/24, both up.
fn netns(tag: &str) -> NetNs {
    let ns = NetNs::bare(tag);
    ns.ip(&[
        "link", "add", "p0", "type", "veth", "peer", "name", "p0peer",
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "p0peer"]);
    ns.ip(&["link", "set", "p0", "up"]);
    ns.ip(&["link", "set", "p0peer", "up"]);
    ns
}

#[test]
fn macvtap_interface_on_parent_link_carries_guest_traffic_and_is_removed() {
    let ns = netns("mvt");
    let d = Emberd::start_in_netns(
        "flintlock-mvt",
        10590,
        &[
            "--parent-iface",
            "p0",
            "--flintlock-max-retries",
            "2",
            "--flintlock-backoff-ms",
            "100",
        ],
        &ns.name,
    );
    let (kernel, root) = images(d.dir.path());
    let echo = ns.udp_echo("10.0.0.1:7", 3);
    let (c, v) = d.req(
        "POST",
        "/v1alpha1/microvm",
        Some(&spec(&kernel, &root, "mvt1").to_string()),
    );
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["microvm"]["spec"]["interfaces"][0]["type"], "MACVTAP");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();

    let v = wait_state(&d, &uid, "CREATED");
    let eth0 = &v["microvm"]["status"]["networkInterfaces"]["eth0"];
    let link = eth0["hostDeviceName"].as_str().unwrap().to_string();
    assert!(link.len() <= 15 && link.starts_with("emb"), "{link}");
    assert_eq!(eth0["macAddress"], GUEST_MAC, "{v}");

    // The link, in emberd's namespace only: a macvtap on p0, mode bridge,
    // the guest's MAC, up.
    let shown = ns.ip(&["-d", "-o", "link", "show", "dev", &link]);
    assert!(shown.contains(&format!("{link}@p0:")), "{shown}");
    assert!(shown.contains("macvtap mode bridge"), "{shown}");
    assert!(
        shown.contains(&format!("link/ether {GUEST_MAC}")),
        "{shown}"
    );
    assert!(shown.contains(",UP"), "{shown}");
    let here = Command::new("ip")
        .args(["link", "show", "dev", &link])
        .output()
        .unwrap();
    assert!(
        !here.status.success(),
        "{link} leaked into the test's netns"
    );

    // The jailer made its character device for the VMM: /dev/macvtap/<link>
    // in the jail, a char device with sysfs's numbers, 0600, the VMM's
    // uid:gid (this emberd's first VMM identity).
    let node = jail_node(&d.dir.join("jail"), &link).expect("/dev/macvtap node in the jail");
    let m = std::fs::metadata(&node).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(m.file_type().is_char_device(), "{node:?}");
    assert_eq!(m.mode() & 0o7777, 0o600, "{node:?}");
    assert_eq!((m.uid(), m.gid()), (10590, 10590), "{node:?}");
    let sys = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!(
            "cat /sys/class/net/{link}/macvtap/tap$(cat /sys/class/net/{link}/ifindex)/dev"
        ))
        .output()
        .unwrap();
    let sys = String::from_utf8_lossy(&sys.stdout).trim().to_string();
    let rdev = m.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    assert_eq!(sys, format!("{maj}:{min}"));

    // The guest sees its NIC with that MAC and exchanges frames through the
    // macvtap with p0's far end (ARP, then three UDP echoes).
    let name = format!("fl-{}", uid.to_lowercase());
    let logs = wait_for(PATIENCE, || {
        let l = String::from_utf8_lossy(
            &http(&d.sock, "GET", &format!("/instances/{name}/logs"), None).body,
        )
        .to_string();
        (l.contains("net udp-echo ok 3") || l.contains("net timeout") || l.contains("net none"))
            .then_some(l)
    })
    .expect("guest output");
    assert!(
        logs.contains(&format!("ember-guest: net mac {GUEST_MAC}")),
        "{logs}"
    );
    assert!(logs.contains("ember-guest: net arp "), "{logs}");
    for n in 1..=3 {
        assert!(
            logs.contains(&format!("ember-guest: net udp-echo ok {n}")),
            "{logs}"
        );
    }
    assert_eq!(echo.join().unwrap(), 3);

    // DELETE: the macvtap link goes with the MicroVM.
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
    let gone = wait_for(PATIENCE, || {
        let o = Command::new("ip")
            .args(["-n", &ns.name, "link", "show", "dev", &link])
            .output()
            .unwrap();
        (!o.status.success()).then_some(())
    });
    assert!(gone.is_some(), "macvtap {link} left behind");
    ns.ip(&["link", "show", "dev", "p0"]);
}

/// `<jail base>/<exec name>/<id>/root/dev/macvtap/<link>`, whatever the
/// exec name and jail id.
fn jail_node(base: &Path, link: &str) -> Option<PathBuf> {
    for exec in std::fs::read_dir(base).ok()?.flatten() {
        for id in std::fs::read_dir(exec.path()).ok()?.flatten() {
            let p = id.path().join("root/dev/macvtap").join(link);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

/// A generated MAC when the spec gives none: the link and the guest share it.
#[test]
fn macvtap_without_guest_mac_gets_one_generated() {
    let ns = netns("mvtgen");
    let d = Emberd::start_in_netns(
        "flintlock-mvt-gen",
        10591,
        &["--parent-iface", "p0"],
        &ns.name,
    );
    let (kernel, root) = images(d.dir.path());
    let mut s = spec(&kernel, &root, "mvt2");
    s["interfaces"] = json!([{"deviceId": "eth0", "type": "MACVTAP"}]);
    s["kernel"]["cmdline"] = json!({"ember.test": "virtio-probe"});
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&s.to_string()));
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let v = wait_state(&d, &uid, "CREATED");
    let eth0 = &v["microvm"]["status"]["networkInterfaces"]["eth0"];
    let link = eth0["hostDeviceName"].as_str().unwrap();
    let mac = eth0["macAddress"].as_str().unwrap();
    assert!(mac.starts_with("02:") && mac.len() == 17, "{v}");
    let shown = ns.ip(&["-d", "-o", "link", "show", "dev", link]);
    assert!(shown.contains(&format!("link/ether {mac}")), "{shown}");
    // The guest finds a virtio-net device (id 1).
    let name = format!("fl-{}", uid.to_lowercase());
    let logs = wait_for(PATIENCE, || {
        let l = String::from_utf8_lossy(
            &http(&d.sock, "GET", &format!("/instances/{name}/logs"), None).body,
        )
        .to_string();
        l.contains("id 1 version 2").then_some(l)
    });
    assert!(logs.is_some(), "no virtio-net device seen by the guest");
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
    assert!(
        wait_for(PATIENCE, || {
            let o = Command::new("ip")
                .args(["-n", &ns.name, "link", "show", "dev", link])
                .output()
                .unwrap();
            (!o.status.success()).then_some(())
        })
        .is_some(),
        "macvtap {link} left behind"
    );
}

/// Without `--parent-iface`: INVALID_ARGUMENT naming the flag, and TAP
/// interfaces are still accepted.
#[test]
fn macvtap_without_parent_iface_is_refused() {
    let d = Emberd::start("flintlock-mvt-noparent", 10592, &[]);
    let (kernel, root) = images(d.dir.path());
    let body = spec(&kernel, &root, "mvt3").to_string();
    let (c, e) = d.req("POST", "/v1alpha1/microvm", Some(&body));
    assert_eq!(c, 400, "{e}");
    assert_eq!(e["code"], 3, "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("MACVTAP") && msg.contains("--parent-iface"),
        "{e}"
    );
    let (_, l) = d.req("GET", "/v1alpha1/microvm/ns1", None);
    assert_eq!(l["microvm"].as_array().unwrap().len(), 0, "{l}");
}

/// A parent link that does not exist fails the reconcile (FAILED, the
/// error names the link) and leaves no macvtap behind.
#[test]
fn macvtap_on_a_missing_parent_reconciles_to_failed() {
    let ns = NetNs::bare("mvtfail");
    let d = Emberd::start_in_netns(
        "flintlock-mvt-fail",
        10593,
        &[
            "--parent-iface",
            "nosuch0",
            "--flintlock-max-retries",
            "2",
            "--flintlock-backoff-ms",
            "50",
        ],
        &ns.name,
    );
    let (kernel, root) = images(d.dir.path());
    let (c, v) = d.req(
        "POST",
        "/v1alpha1/microvm",
        Some(&spec(&kernel, &root, "mvt4").to_string()),
    );
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let v = wait_state(&d, &uid, "FAILED");
    let err = v["microvm"]["status"]["error"].as_str().unwrap_or("");
    assert!(err.contains("nosuch0"), "{v}");
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains("emb"), "{links}");
    // emberd said so at start.
    assert!(
        d.err().contains("--parent-iface nosuch0: no such link"),
        "{}",
        d.err()
    );
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
}
