//! The per-VM API over a real unix socket: Firecracker's routes and shapes,
//! bad input answered with 400 + fault_message while the VMM keeps serving.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ember_tests::*;

struct Vmm {
    p: Proc,
    sock: PathBuf,
    dir: TempDir,
}

fn start_vmm() -> Vmm {
    let dir = TempDir::new("api");
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock).args(["--id", "test-vm-1"]);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    Vmm { p, sock, dir }
}

impl Vmm {
    fn req(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        http(&self.sock, method, path, body)
    }
    fn ok(&self, method: &str, path: &str, body: &str) {
        let r = self.req(method, path, Some(body));
        assert_eq!(
            r.status,
            204,
            "{method} {path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
    fn fault(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let r = self.req(method, path, body);
        assert_eq!(r.status, 400, "{method} {path} should fail");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let msg = r.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!msg.is_empty());
        // ...and the VMM still serves.
        assert_eq!(self.req("GET", "/", None).status, 200);
        msg
    }
    fn state(&self) -> String {
        self.req("GET", "/", None).json()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }
    fn boot(&self, kernel: &str, args: &str) {
        let b = serde_json::json!({"kernel_image_path": kernel, "boot_args": args}).to_string();
        self.ok("PUT", "/boot-source", &b);
        self.ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
        );
        self.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    }
}

#[test]
fn configure_boot_and_inspect() {
    let v = start_vmm();
    let info = v.req("GET", "/", None);
    assert_eq!(info.status, 200);
    let j = info.json();
    assert_eq!(j["id"], "test-vm-1");
    assert_eq!(j["state"], "Not started");
    assert_eq!(j["app_name"], "ember");

    v.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 48}"#,
    );
    v.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 40}"#);
    let mc = v.req("GET", "/machine-config", None).json();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(40))
    );

    let b = serde_json::json!({"kernel_image_path": PVH_ELF, "boot_args": "ember.test=idle"});
    v.ok("PUT", "/boot-source", &b.to_string());
    v.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let mut p = v.p;
    p.expect_out("ember-guest: idle");
    let v = Vmm { p, ..v };
    assert_eq!(v.state(), "Running");

    let cfg = v.req("GET", "/vm/config", None).json();
    assert_eq!(cfg["boot-source"]["kernel_image_path"], PVH_ELF);
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);

    // Pre-boot only, now refused.
    let m = v.fault("PUT", "/boot-source", Some(&b.to_string()));
    assert!(m.contains("not supported after starting"), "{m}");
    let m = v.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert!(m.contains("not supported after starting"), "{m}");
    drop(v.dir);
}

#[test]
fn bad_input_gets_400_and_the_vmm_keeps_serving() {
    let v = start_vmm();
    let m = v.fault("GET", "/no/such/route", None);
    assert!(m.contains("Invalid request method and/or path"), "{m}");
    v.fault("DELETE", "/machine-config", None);
    let m = v.fault("PUT", "/machine-config", Some("{not json"));
    assert!(m.contains("deserializing"), "{m}");
    let m = v.fault("PUT", "/machine-config", Some(""));
    assert!(m.contains("Empty"), "{m}");
    let m = v.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
    );
    assert!(m.contains("memory size"), "{m}");
    let m = v.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 99, "mem_size_mib": 64}"#),
    );
    assert!(m.contains("number of vCPUs"), "{m}");
    v.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "x": 1}"#),
    );
    let m = v.fault(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
    );
    assert!(m.contains("kernel file cannot be opened"), "{m}");
    let m = v.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert!(m.contains("boot-source"), "{m}");
    let m = v.fault("PUT", "/actions", Some(r#"{"action_type": "Detonate"}"#));
    assert!(m.contains("unknown variant"), "{m}");
    let m = v.fault("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert!(m.contains("before starting"), "{m}");
    let m = v.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert!(m.contains("before starting"), "{m}");
    // Nothing was lost: the earlier good config is still there.
    assert_eq!(v.state(), "Not started");
    // A good request after all that still works end to end.
    v.boot(LINUX64_ELF, "ember.test=hello");
    let mut p = v.p;
    assert_eq!(p.wait().code(), Some(0));
    assert!(p.out().contains("hello from linux64 boot"));
}

#[test]
fn ctrl_alt_del_reaches_the_guest_which_resets() {
    let v = start_vmm();
    v.boot(PVH_ELF, "ember.test=wait-ctrlaltdel");
    let Vmm { mut p, sock, dir } = v;
    p.expect_out("waiting for ctrl-alt-del");
    let v = Vmm { p, sock, dir };
    v.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let mut p = v.p;
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(p.out().contains("ember-guest: ctrl-alt-del"), "{}", p.out());
    // The VMM removed its socket on the way out.
    assert!(!v.sock.exists());
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let v = start_vmm();
    v.boot(LINUX64_ELF, "ember.test=ticker");
    let Vmm { mut p, sock, dir } = v;
    p.expect_out("tick 3");
    let v = Vmm { p, sock, dir };
    v.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(v.state(), "Paused");
    // Once the pause is acknowledged no vCPU runs: the output is frozen.
    let frozen = v.p.out();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(v.p.out(), frozen);
    v.ok("PATCH", "/vm", r#"{"state": "Paused"}"#); // idempotent
    v.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(v.state(), "Running");
    let grew = wait_for(PATIENCE, || (v.p.out().len() > frozen.len()).then_some(()));
    assert!(grew.is_some(), "guest did not resume");
}

#[test]
fn keep_alive_pipelining_and_a_stalled_client() {
    let v = start_vmm();
    // A client that sends half a request and stalls...
    let mut stalled = UnixStream::connect(&v.sock).unwrap();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .unwrap();
    // ...does not block another client, which reuses its connection.
    let mut s = UnixStream::connect(&v.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    for _ in 0..3 {
        write_request(&mut s, "GET", "/", None).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 200);
    }
    // Two requests in one write are answered in order.
    let two = "GET /machine-config HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n";
    s.write_all(two.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    assert_eq!(read_response(&mut s).unwrap().status, 400);
    drop(stalled);
    assert_eq!(v.state(), "Not started");
}

#[test]
fn curl_works_against_the_api() {
    let v = start_vmm();
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&v.sock)
        .args([
            "-X",
            "PUT",
            "http://localhost/machine-config",
            "-H",
            "Content-Type: application/json",
        ])
        .args([
            "-d",
            r#"{"vcpu_count": 1, "mem_size_mib": 77}"#,
            "-w",
            "%{http_code}",
        ])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&v.sock)
        .arg("http://localhost/machine-config")
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["mem_size_mib"], 77);
}
