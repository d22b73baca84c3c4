//! The hyperd face of emberd over its unix socket: envelopes, pods, the
//! colon-joined lists, /info, /auth; pod VMs need Linux, which this host
//! cannot boot, so starting one answers a clear error.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use ember_tests::*;
use serde_json::Value;

struct Emberd {
    p: Proc,
    sock: PathBuf,
    dir: TempDir,
}

fn start() -> Emberd {
    let dir = TempDir::new("hyperd");
    let sock = dir.join("ember.sock");
    let mut cmd = Command::new(bin("emberd"));
    cmd.arg("--socket").arg(&sock)
        .arg("--state-dir").arg(dir.join("state"))
        .arg("--chroot-base-dir").arg(dir.join("jail"))
        .args(["--uid", "10504", "--gid", "10504"]);
    let p = Proc::spawn(cmd, dir.path(), "emberd");
    wait_for_socket(&sock);
    Emberd { p, sock, dir }
}

impl Emberd {
    fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let r = http(&self.sock, method, path, body);
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn pods_lists_and_envelopes() {
    let d = start();
    let spec = r#"{"id":"web","containers":[{"name":"nginx","image":"nginx:latest"},{"image":"busybox"}],"resource":{"vcpu":1,"memory":128}}"#;
    let (c, v) = d.req("POST", &format!("/pod/create?podArgs={}", enc(spec)), None);
    assert_eq!(c, 200, "{v}");
    assert_eq!((v["Code"].clone(), v["Cause"].clone()), (0.into(), "".into()));
    let pod = v["ID"].as_str().unwrap().to_string();
    assert!(pod.starts_with("pod-") && pod.len() == 14, "{pod}");
    // The JSON body form.
    let (c, v) = d.req("POST", "/pod/create", Some(r#"{"id":"db","containers":[{"image":"redis"}]}"#));
    assert_eq!(c, 200, "{v}");
    let pod2 = v["ID"].as_str().unwrap().to_string();
    // Duplicates and bad specs.
    let (c, v) = d.req("POST", "/pod/create", Some(r#"{"id":"db","containers":[{"image":"redis"}]}"#));
    assert_eq!(c, 409, "{v}");
    assert_eq!(v["Code"], 1);
    let (c, v) = d.req("POST", "/pod/create", Some(r#"{"id":"x","containers":[]}"#));
    assert_eq!(c, 400, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("bad parameter"));
    let (c, _) = d.req("POST", "/pod/create", None);
    assert_eq!(c, 400);

    let (c, v) = d.req("GET", "/list?item=pod", None);
    assert_eq!(c, 200);
    assert_eq!(v["item"], "pod");
    let pods: Vec<&str> = v["podData"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert!(pods.contains(&format!("{pod}:web::pending").as_str()), "{pods:?}");
    let (_, v) = d.req("GET", "/list?item=container", None);
    let cs: Vec<&str> = v["cData"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert_eq!(cs.len(), 3, "{cs:?}");
    assert!(cs.iter().any(|c| c.ends_with(&format!(":nginx:{pod}:pending"))), "{cs:?}");
    let (_, v) = d.req("GET", "/list?item=vm", None);
    assert_eq!(v["vmData"].as_array().unwrap().len(), 0);
    let (c, v) = d.req("GET", "/list?item=cat", None);
    assert_eq!(c, 400);
    assert!(v["Cause"].as_str().unwrap().contains("Can not support cat list!"), "{v}");

    // Pod VMs boot Linux: refused clearly here, and the pod is marked failed.
    let (c, v) = d.req("POST", &format!("/pod/start?podId={pod}&vmId="), None);
    assert_eq!(c, 500, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("Linux"), "{v}");
    let (_, v) = d.req("GET", "/list?item=pod", None);
    assert!(v["podData"].to_string().contains(&format!("{pod}:web::failed")), "{v}");
    let (c, _) = d.req("POST", &format!("/pod/start?podId={pod2}&vmId=vm-nosuchvmxx"), None);
    assert_eq!(c, 404);
    let (c, v) = d.req("POST", "/vm/create", None);
    assert_eq!(c, 500, "{v}");
    let (c, _) = d.req("DELETE", "/vm?vm=vm-nosuchvmxx", None);
    assert_eq!(c, 404);
    // Stop needs a running pod; stopVM must be yes or no.
    let (c, v) = d.req("POST", &format!("/pod/stop?podId={pod2}&stopVM=yes"), None);
    assert_eq!(c, 409, "{v}");
    let (c, _) = d.req("POST", &format!("/pod/stop?podId={pod2}&stopVM=maybe"), None);
    assert_eq!(c, 400);
    // Delete, then it is gone.
    let (c, v) = d.req("DELETE", &format!("/pod?podId={pod}"), None);
    assert_eq!((c, v["ID"].clone()), (200, Value::String(pod.clone())));
    let (c, v) = d.req("DELETE", &format!("/pod?podId={pod}"), None);
    assert_eq!(c, 404, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("no such"), "{v}");
    let (c, _) = d.req("DELETE", "/pod", None);
    assert_eq!(c, 400);
}

#[test]
fn info_and_auth() {
    let d = start();
    let (c, v) = d.req("GET", "/info", None);
    assert_eq!(c, 200);
    for k in ["ID", "Containers", "Images", "Driver", "DriverStatus", "DockerRootDir",
              "IndexServerAddress", "ExecutionDriver", "MemTotal", "Pods", "Operating System", "Name"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert!(v["MemTotal"].as_u64().unwrap() > 0);
    let secret = "s3cr3t-Pa55-word";
    let body = format!(r#"{{"username":"hello","password":"{secret}","email":"h@example.com","serveraddress":"https://registry.example/v1/"}}"#);
    let (c, v) = d.req("POST", "/auth", Some(&body));
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["Status"], "Login Succeeded");
    let f = d.dir.join("state").join("auth.json");
    let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&f).unwrap().contains("hello"));
    let (c, _) = d.req("POST", "/auth", Some(r#"{"password":"x"}"#));
    assert_eq!(c, 400);
    assert!(!d.p.err().contains(secret) && !d.p.out().contains(secret));
    // Wrong methods are answered by hyperd, not passed on.
    let (c, _) = d.req("PUT", "/info", None);
    assert_eq!(c, 405);
}
