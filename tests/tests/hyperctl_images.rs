//! hyperctl 1.1.0's image and system commands, replayed byte for byte
//! against emberd (see `ember_tests::hyperctl` for what its Go client puts
//! on the wire): `version`, `info`, `login`, `logout`, `images`, `load`,
//! `save`, `build`, `rmi`, `pull` and `push`. Each test names the hyperctl
//! function it mirrors and asserts on the fields hyperctl reads.
//!
//! The real hyperctl cannot be built here (it needs its Go module tree from
//! GitHub, not a package registry), so the wire replay is the test.

use std::process::Command;

use ember_tests::hyperctl::{Body, Hyperctl};
use ember_tests::*;
use serde_json::Value;

fn start(tag: &str) -> Emberd {
    Emberd::start(tag, 10508, &[])
}

/// Imports a one-layer image named `name` (an OCI layout on disk).
fn import(d: &Emberd, name: &str) {
    d.hyperd_import(
        name,
        serde_json::json!({"layers": [{"dirs": ["bin"], "files": {"bin/hello": "hi\n"}}],
            "config": {"Cmd": ["/bin/hello"]}}),
    );
}

/// `tar cf - -C dir .` of `files`.
fn tar_of(dir: &std::path::Path, files: &[(&str, &str)]) -> Vec<u8> {
    for (n, c) in files {
        let p = dir.join(n);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, c).unwrap();
    }
    tar_dir(dir)
}

fn tar_dir(dir: &std::path::Path) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("cf")
        .arg("-")
        .arg("-C")
        .arg(dir)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// The JSON lines of a progress stream; hyperctl's `readStreamOutput`
/// decodes them (jsonmessage) when the Content-Type is application/json
/// and fails on an `error` field.
fn json_lines(r: &HttpResponse) -> Vec<Value> {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "hyperctl decodes JSON progress only with this Content-Type"
    );
    String::from_utf8_lossy(&r.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `imagesList` entries hyperctl's `images` prints.
fn images(h: &Hyperctl) -> Vec<Vec<String>> {
    // client/api/images.go: (*Client).GetImages(all=false, quiet=false)
    let r = h.call("GET", "/images/get?all=no&quiet=no");
    assert_eq!(r.status, 200);
    r.json()["imagesList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().split(':').map(str::to_string).collect())
        .collect()
}

#[test]
fn version_info_login_logout() {
    let d = start("hctl-sys");
    let h = Hyperctl::new(&d.sock);

    // client/version.go: HyperCmdVersion prints utils.VERSION and sends
    // nothing. The server's own route (server/router/system: getVersion)
    // answers {"ID", "Version"}.
    let r = h.call("GET", "/version");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(v["ID"].is_string() && v["Version"].is_string(), "{v}");
    // server/router/system: pingHandler.
    let r = h.call("GET", "/_ping");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"OK"[..]));

    // client/api/info.go: (*Client).Info; client/info.go reads these.
    let r = h.call("GET", "/info");
    assert_eq!(r.status, 200);
    let v = r.json();
    for k in ["Images", "Containers", "Pods", "MemTotal"] {
        assert!(v[k].is_u64(), "{k} is a number hyperctl GetInt()s: {v}");
    }
    for k in [
        "Driver",
        "DockerRootDir",
        "IndexServerAddress",
        "ExecutionDriver",
        "Operating System",
    ] {
        assert!(v[k].is_string(), "{k}: {v}");
    }
    let status: Vec<Vec<String>> = serde_json::from_value(v["DriverStatus"].clone()).unwrap();
    assert!(status.iter().all(|p| p.len() == 2), "[][]string pairs: {v}");

    // client/api/login.go: (*Client).Login posts the AuthConfig as JSON;
    // hyperctl decodes types.AuthResponse and prints Status.
    let secret = "hctl-Pa55-w0rd";
    let auth = format!(
        r#"{{"username":"alice","password":"{secret}","email":"a@example.com","serveraddress":"https://index.docker.io/v1/"}}"#
    );
    let r = h.call_json("POST", "/auth", &auth);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["Status"], "Login Succeeded");
    assert!(!String::from_utf8_lossy(&r.body).contains(secret));
    // A 401 would make hyperctl drop the credentials; bad input is a 400.
    let r = h.call_json("POST", "/auth", r#"{"password":"x"}"#);
    assert_eq!(r.status, 400);
    assert!(!d.err().contains(secret) && !d.out().contains(secret));

    // client/logout.go: HyperCmdLogout only edits the client's config file
    // and sends nothing; the daemon keeps what login stored (mode 0600).
    let f = d.dir.join("state").join("auth.json");
    assert!(std::fs::read_to_string(f).unwrap().contains("alice"));
}

#[test]
fn images_load_save_build_rmi() {
    let d = start("hctl-img");
    let h = Hyperctl::new(&d.sock);
    import(&d, "base:1");
    let list = images(&h);
    assert_eq!(list.len(), 1, "{list:?}");
    // client/images.go splits repo:tag:imageId:created:size.
    assert_eq!(
        (list[0].len(), list[0][0].as_str(), list[0][1].as_str()),
        (5, "base", "1")
    );
    assert!(list[0][3].parse::<i64>().is_ok() && list[0][4].parse::<i64>().is_ok());

    // client/api/save.go: (*Client).Save(["base:1"], "", {}) — names, format
    // and refs in the query; the body is the archive hyperctl copies out.
    let r = h.call(
        "GET",
        &format!(
            "/images/save?format=&names=base%3A1&refs={}",
            urlencode("{}")
        ),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/x-tar"));
    let saved = d.dir.join("saved.tar");
    std::fs::write(&saved, &r.body).unwrap();
    let names = Command::new("tar").arg("tf").arg(&saved).output().unwrap();
    let names = String::from_utf8_lossy(&names.stdout).to_string();
    assert!(
        names.contains("oci-layout")
            && names.contains("index.json")
            && names.contains("blobs/sha256/"),
        "an OCI image layout: {names}"
    );
    // UniK's /images/{name} never sees it.
    assert!(!String::from_utf8_lossy(&r.body).contains("\"Error\""));
    let r = h.call("GET", "/images/save?format=docker&names=base%3A1");
    assert_eq!(r.status, 400, "only OCI archives are written");
    let r = h.call("GET", "/images/save?names=nosuch%3A9");
    assert_eq!(r.status, 404);

    // client/api/load.go: (*Client).Load(file, "copy:2", {}) — the file is
    // streamed chunked as application/x-tar.
    let tar = std::fs::read(&saved).unwrap();
    let r = h.send(
        "POST",
        &format!("/image/load?name=copy%3A2&refs={}", urlencode("{}")),
        Body::Chunked(&tar, "application/x-tar"),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lines = json_lines(&r);
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    assert!(images(&h).iter().any(|e| e[0] == "copy" && e[1] == "2"));
    // A corrupt archive is an error line and a failure status.
    let r = h.send(
        "POST",
        "/image/load?name=bad%3A1&refs=%7B%7D",
        Body::Chunked(b"not a tarball at all", "application/x-tar"),
        &[],
    );
    assert!(r.status >= 400, "{}", r.status);
    assert!(json_lines(&r).last().unwrap().get("error").is_some());

    // client/api/build.go: (*Client).Build("app:3", true, ctx) — the tag is
    // `name`, the context a chunked application/tar body.
    let ctx = tar_of(
        &d.dir.join("ctx"),
        &[
            (
                "Dockerfile",
                "FROM base:1\nCOPY a.txt /a.txt\nCMD [\"/bin/hello\"]\n",
            ),
            ("a.txt", "built\n"),
        ],
    );
    let r = h.send(
        "POST",
        "/image/build?name=app%3A3",
        Body::Chunked(&ctx, "application/tar"),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lines = json_lines(&r);
    assert!(lines.iter().all(|l| l.get("error").is_none()), "{lines:?}");
    assert!(
        images(&h).iter().any(|e| e[0] == "app" && e[1] == "3"),
        "build's name= is the tag"
    );

    // client/api/rmi.go: (*Client).RemoveImage(id, noprune=false,
    // force=false); client/rmi.go reads Code (0 is success).
    let r = h.call(
        "DELETE",
        "/image?force=false&imageId=copy%3A2&noprune=false",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["Code"], 0);
    let r = h.call(
        "DELETE",
        "/image?force=false&imageId=copy%3A2&noprune=false",
    );
    assert_eq!(r.status, 404);
    // force=true (strconv.FormatBool) removes an image a pod uses.
    // client/api/create.go: (*Client).CreatePod.
    let r = h.call_json(
        "POST",
        "/pod/create",
        r#"{"id":"user","containers":[{"name":"user","image":"app:3","restartPolicy":"never"}],"resource":{"vcpu":1,"memory":128},"log":{}}"#,
    );
    assert_eq!(r.status, 201);
    let r = h.call("DELETE", "/image?force=false&imageId=app%3A3&noprune=false");
    assert_eq!(r.status, 409, "in use");
    let r = h.call("DELETE", "/image?force=true&imageId=app%3A3&noprune=false");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn pull_and_push_to_a_registry_that_is_not_there() {
    let d = start("hctl-reg");
    let h = Hyperctl::new(&d.sock);
    import(&d, "alice/app:1");
    // client/pull.go: PullImage resolves the name and calls
    // client/api/pull.go: (*Client).Pull with the AuthConfig of the index
    // in X-Registry-Auth ({} when not logged in). The registry is a
    // loopback port nothing listens on (tests never reach outside the
    // host; tests/tests/registry.rs pulls from and pushes to a real one):
    // a clear 502 in hyperd's JSON lines.
    let r = h.auth_request(
        "POST",
        "/image/create?imageName=127.0.0.1%3A1%2Flibrary%2Fbusybox%3Alatest",
        "{}",
    );
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    let lines = json_lines(&r);
    let err = lines.last().unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.contains("unavailable"), "{err}");

    // client/push.go -> client/api/push.go: (*Client).Push(tag, repo, auth):
    // tag and remote (the repository) in the query, the credentials in
    // X-Registry-Auth, which never show in the answer.
    let r = h.auth_request(
        "POST",
        "/image/push?remote=127.0.0.1%3A1%2Falice%2Fapp&tag=alice%2Fapp%3A1",
        r#"{"username":"alice","password":"sekrit-pw","serveraddress":"127.0.0.1:1"}"#,
    );
    assert!(r.status >= 400, "{}", r.status);
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert!(!body.contains("sekrit-pw"), "{body}");
}
