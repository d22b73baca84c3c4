//! The hyperd face of emberd over its unix socket: envelopes, pods, the
//! colon-joined lists, /info, /auth, container images. This emberd has no
//! pod kernel, so starting a pod or creating a VM answers a clear error;
//! pods in real pod VMs are tests/tests/hyperd_pods.rs.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use ember_tests::*;
use serde_json::Value;

fn start() -> Emberd {
    Emberd::start("hyperd", 10504, &[])
}

fn enc(s: &str) -> String {
    urlencode(s)
}

/// Imports a one-layer image named `name` from an OCI layout on disk.
fn import(d: &Emberd, name: &str) -> String {
    d.hyperd_import(
        name,
        serde_json::json!({"layers": [{"dirs": ["bin"], "files": {"bin/hello": "hi\n"}}],
            "config": {"Cmd": ["/bin/hello"]}}),
    )
}

#[test]
fn pods_lists_and_envelopes() {
    let d = start();
    for img in ["nginx:latest", "busybox:latest", "redis:latest"] {
        import(&d, img);
    }
    let spec = r#"{"id":"web","containers":[{"name":"nginx","image":"nginx:latest"},{"image":"busybox"}],"resource":{"vcpu":1,"memory":128}}"#;
    let (c, v) = d.req("POST", &format!("/pod/create?podArgs={}", enc(spec)), None);
    assert_eq!(c, 201, "hyperd answers pod/create with 201: {v}");
    assert_eq!(
        (v["Code"].clone(), v["Cause"].clone()),
        (0.into(), "".into())
    );
    let pod = v["ID"].as_str().unwrap().to_string();
    assert!(pod.starts_with("pod-") && pod.len() == 14, "{pod}");
    // The JSON body form.
    let (c, v) = d.req(
        "POST",
        "/pod/create",
        Some(r#"{"id":"db","containers":[{"image":"redis"}]}"#),
    );
    assert_eq!(c, 201, "{v}");
    let pod2 = v["ID"].as_str().unwrap().to_string();
    // Duplicates and bad specs.
    let (c, v) = d.req(
        "POST",
        "/pod/create",
        Some(r#"{"id":"db","containers":[{"image":"redis"}]}"#),
    );
    assert_eq!(c, 409, "{v}");
    assert_eq!(v["Code"], 1);
    let (c, v) = d.req("POST", "/pod/create", Some(r#"{"id":"x","containers":[]}"#));
    assert_eq!(c, 400, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("bad parameter"));
    let (c, _) = d.req("POST", "/pod/create", None);
    assert_eq!(c, 400);
    let (c, v) = d.req(
        "POST",
        "/pod/create",
        Some(r#"{"id":"x","containers":[{"image":"nosuch:1"}]}"#),
    );
    assert_eq!(c, 404, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("no such"), "{v}");

    let (c, v) = d.req("GET", "/list?item=pod", None);
    assert_eq!(c, 201, "hyperd answers /list with 201");
    assert_eq!(v["item"], "pod");
    let pods: Vec<&str> = v["podData"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        pods.contains(&format!("{pod}:web::pending").as_str()),
        "{pods:?}"
    );
    let (_, v) = d.req("GET", "/list?item=container", None);
    let cs: Vec<&str> = v["cData"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(cs.len(), 3, "{cs:?}");
    assert!(
        cs.iter()
            .any(|c| c.ends_with(&format!(":nginx:{pod}:pending"))),
        "{cs:?}"
    );
    let (_, v) = d.req("GET", "/list?item=vm", None);
    assert_eq!(v["vmData"].as_array().unwrap().len(), 0);
    let (c, v) = d.req("GET", "/list?item=cat", None);
    assert_eq!(c, 400);
    assert!(
        v["Cause"]
            .as_str()
            .unwrap()
            .contains("Can not support cat list!"),
        "{v}"
    );

    // Pod VMs boot Linux: refused clearly here, and the pod is marked failed.
    let (c, v) = d.req("POST", &format!("/pod/start?podId={pod}&vmId="), None);
    assert_eq!(c, 500, "{v}");
    assert!(v["Cause"].as_str().unwrap().contains("Linux"), "{v}");
    let (_, v) = d.req("GET", "/list?item=pod", None);
    assert!(
        v["podData"]
            .to_string()
            .contains(&format!("{pod}:web::failed")),
        "{v}"
    );
    let (c, _) = d.req(
        "POST",
        &format!("/pod/start?podId={pod2}&vmId=vm-nosuchvmxx"),
        None,
    );
    assert_eq!(c, 404);
    let (c, v) = d.req("POST", "/vm/create", None);
    assert_eq!(c, 500, "{v}");
    let (c, _) = d.req("DELETE", "/vm?vm=vm-nosuchvmxx", None);
    assert_eq!(c, 404);
    // Stop needs a running pod; stopVM must be yes or no.
    let (c, v) = d.req("POST", &format!("/pod/stop?podId={pod2}&stopVM=yes"), None);
    assert_eq!(c, 409, "{v}");
    let (c, _) = d.req(
        "POST",
        &format!("/pod/stop?podId={pod2}&stopVM=maybe"),
        None,
    );
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
    for k in [
        "ID",
        "Containers",
        "Images",
        "Driver",
        "DriverStatus",
        "DockerRootDir",
        "IndexServerAddress",
        "ExecutionDriver",
        "MemTotal",
        "Pods",
        "Operating System",
        "Name",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert!(v["MemTotal"].as_u64().unwrap() > 0);
    let secret = "s3cr3t-Pa55-word";
    let body = format!(
        r#"{{"username":"hello","password":"{secret}","email":"h@example.com","serveraddress":"https://registry.example/v1/"}}"#
    );
    let (c, v) = d.req("POST", "/auth", Some(&body));
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["Status"], "Login Succeeded");
    let f = d.dir.join("state").join("auth.json");
    let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&f).unwrap().contains("hello"));
    let (c, _) = d.req("POST", "/auth", Some(r#"{"password":"x"}"#));
    assert_eq!(c, 400);
    assert!(!d.err().contains(secret) && !d.out().contains(secret));
    // Wrong methods are answered by hyperd, not passed on.
    let (c, _) = d.req("PUT", "/info", None);
    assert_eq!(c, 405);
}

fn tar_context(dir: &std::path::Path, files: &[(&str, &str)]) -> Vec<u8> {
    let ctx = dir.join("ctx");
    for (n, c) in files {
        let p = ctx.join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, c).unwrap();
    }
    let out = Command::new("tar")
        .arg("cf")
        .arg("-")
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

fn post_bytes(d: &Emberd, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/tar\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let r = read_response(&mut s).unwrap();
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

#[test]
fn images_import_build_push_remove() {
    let d = start();
    let out = import(&d, "base:1");
    assert!(out.contains("Imported"), "{out}");
    let (c, v) = d.req("GET", "/images/get", None);
    assert_eq!(c, 200);
    let list = v["imagesList"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    let entry = list[0].as_str().unwrap();
    let parts: Vec<&str> = entry.split(':').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1]),
        (5, "base", "1"),
        "{entry}"
    );
    // The UniK face never sees /images/get.
    assert!(v.get("Error").is_none());

    // Build from the imported image with the Dockerfile subset.
    let ctx = tar_context(d.dir.path(), &[
        ("Dockerfile", "FROM base:1\nCOPY app.txt /app/app.txt\nENV GREETING=hello\nWORKDIR /app\nCMD [\"/bin/hello\"]\n"),
        ("app.txt", "built by ember\n"),
    ]);
    let (c, body) = post_bytes(&d, "/image/build?t=app:2", &ctx);
    assert_eq!(c, 200, "{body}");
    assert!(
        body.contains("Step 1/5 : FROM base:1") && body.contains("Successfully built"),
        "{body}"
    );
    for line in body.lines() {
        serde_json::from_str::<Value>(line).expect("every progress line is JSON");
    }
    // RUN is refused with its line.
    let bad = tar_context(
        &d.dir.join("bad"),
        &[("Dockerfile", "FROM scratch\nRUN make\n")],
    );
    let (c, body) = post_bytes(&d, "/image/build?t=bad:1", &bad);
    assert_eq!(c, 400, "{body}");
    assert!(body.contains("RUN") && body.contains("error"), "{body}");
    let (c, _) = d.req("POST", "/image/build", None);
    assert_eq!(c, 400);

    // Push to a local OCI layout, then import it back under another name.
    let dest = d.dir.join("pushed");
    let (c, v) = d.req(
        "POST",
        &format!(
            "/image/push?remote={}&tag=app:2",
            enc(dest.to_str().unwrap())
        ),
        None,
    );
    assert_eq!(c, 200, "{v}");
    assert!(dest.join("index.json").exists());
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/create?imageName={}", enc(dest.to_str().unwrap())),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A relative path is no layout (and `relative/dir` would be a Docker
    // Hub reference).
    let (c, _) = d.req("POST", "/image/push?remote=./relative/dir&tag=app:2", None);
    assert_eq!(c, 400);

    // A pull from a registry that is not there (a loopback port nothing
    // listens on; tests/tests/registry.rs pulls from a real one): a clear
    // 502 in hyperd's JSON lines.
    let r = http(
        &d.sock,
        "POST",
        "/image/create?imageName=127.0.0.1:1/ubuntu:22.04",
        None,
    );
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("unavailable"));

    // Remove, in use by a pod first.
    let (c, v) = d.req(
        "POST",
        "/pod/create",
        Some(r#"{"id":"p","containers":[{"image":"base:1"}]}"#),
    );
    assert_eq!(c, 201, "{v}");
    let (c, v) = d.req("DELETE", "/image?imageId=base:1", None);
    assert_eq!(c, 409, "{v}");
    let (c, _) = d.req("DELETE", "/pod?podId=p", None);
    assert_eq!(c, 200);
    let (c, v) = d.req("DELETE", "/image?imageId=base:1", None);
    assert_eq!(c, 200, "{v}");
    let (c, _) = d.req("DELETE", "/image?imageId=base:1", None);
    assert_eq!(c, 404);
    // Commit needs a running container.
    let (c, _) = d.req(
        "POST",
        "/container/commit?container=nope&repo=x",
        Some("{}"),
    );
    assert_eq!(c, 404);
    let (_, v) = d.req("GET", "/info", None);
    assert!(v["Images"].as_u64().unwrap() >= 1);
}
