//! Images from a real OCI registry: Debian's `docker-registry` (the
//! distribution registry) on a loopback port the test picks, `skopeo` as
//! the independent client that puts fixtures in and reads back what ember
//! pushed, and emberd driven over its socket like hyperctl and Flintlock's
//! clients drive it.
//!
//! Wire exchanges mirrored: hyperctl's `pull` (hyperd client
//! `client.PullImage`: `POST /image/create?imageName=<ref>`, JSON progress
//! lines), `push` (`client.PushImage`: `POST /image/push?remote=&tag=`),
//! `login` (`client.Login`: `POST /auth` with {username, password,
//! serveraddress}); Flintlock's `CreateMicroVM` over the gateway (`POST
//! /v1alpha1/microvm` with the MicroVMSpec).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use ember_tests::*;
use serde_json::{json, Value};

/// A `docker-registry serve` on a free loopback port; killed on drop.
struct RegistryServer {
    child: Arc<Mutex<Option<Child>>>,
    port: u16,
    root: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have_tools() -> bool {
    for t in ["docker-registry", "skopeo"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            // .ci/run installs them; a developer without them gets a reason.
            eprintln!("skipping: {t} is not installed (apt-get install docker-registry skopeo)");
            return false;
        }
    }
    true
}

impl RegistryServer {
    /// Starts a registry storing under `dir`; `user`: htpasswd auth with
    /// that (user, password).
    fn start(dir: &Path, user: Option<(&str, &str)>) -> RegistryServer {
        let root = dir.join("registry-data");
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        let mut auth = String::new();
        if let Some((u, p)) = user {
            // A bcrypt line, as docker-registry's htpasswd backend needs.
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let file = dir.join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: ember-test\n    path: {}\n",
                file.display()
            );
        }
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry");
        let up = wait_for(PATIENCE, || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        assert!(up.is_some(), "docker-registry did not listen on {port}");
        RegistryServer {
            child: Arc::new(Mutex::new(Some(child))),
            port,
            root,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps blob `digest` (distribution's filesystem
    /// driver layout).
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.root
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

fn stop(child: &Mutex<Option<Child>>) {
    if let Some(mut c) = child.lock().unwrap().take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        stop(&self.child);
    }
}

/// `skopeo copy` (TLS off for the loopback registry); `all`: every image
/// of an index.
fn skopeo_copy(src: &str, dst: &str, creds: Option<&str>, all: bool) {
    skopeo_copy_as(src, dst, creds, all, None)
}

/// [`skopeo_copy`] converting to `format` (`v2s2`: Docker schema 2).
fn skopeo_copy_as(src: &str, dst: &str, creds: Option<&str>, all: bool, format: Option<&str>) {
    let mut c = Command::new("skopeo");
    c.args([
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]);
    if all {
        c.arg("--all");
    }
    if let Some(cr) = creds {
        c.arg(format!("--dest-creds={cr}"));
    }
    if let Some(f) = format {
        c.arg(format!("--format={f}"));
    }
    let out = c.arg(src).arg(dst).output().expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `skopeo inspect --raw` (`config`: the config blob instead).
fn skopeo_raw(reference: &str, config: bool) -> Value {
    let mut c = Command::new("skopeo");
    c.args([
        "--insecure-policy",
        "inspect",
        "--tls-verify=false",
        "--raw",
    ]);
    if config {
        c.arg("--config");
    }
    let out = c
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha256_of(b: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b)?;
            c.wait_with_output()
        })
        .unwrap();
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    )
}

/// hyperd pull: (status, progress lines).
fn pull(d: &Emberd, reference: &str) -> (u16, Vec<Value>) {
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/create?imageName={}", urlencode(reference)),
        None,
    );
    (r.status, lines(&r.body))
}

fn lines(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.to_string())))
        .collect()
}

fn text(ls: &[Value]) -> String {
    ls.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn images(d: &Emberd) -> Vec<String> {
    let (_, v) = d.req("GET", "/images/get", None);
    v["imagesList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn cache_blobs(d: &Emberd) -> Vec<String> {
    std::fs::read_dir(d.dir.join("state/registry-cache/blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Nothing half-written: no temp blob, no scratch layout, no staging.
fn assert_no_leftovers(d: &Emberd) {
    for sub in [
        "state/registry-cache/tmp",
        "state/container-images/tmp",
        "state/staging",
    ] {
        let left: Vec<_> = std::fs::read_dir(d.dir.join(sub))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub} keeps {left:?}");
    }
}

/// The manifest, config and layer digests of the one image of a layout
/// made by make_oci.py.
fn layout_digests(layout: &Path) -> (String, Vec<String>) {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(m.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (m, layers)
}

#[test]
fn push_then_anonymous_pull_round_trip_and_pull_by_digest() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start("registry-rt", 10580, &[]);
    let reg = RegistryServer::start(d.dir.path(), None);
    let host = reg.host();
    d.hyperd_import(
        "app:1",
        json!({"layers": [
            {"dirs": ["etc"], "files": {"etc/motd": "hello from ember\n"}},
            {"files": {"bin/tool": "#!/bin/sh\n"}, "gzip": false},
            {"files": {"etc/zstd": "a zstd layer\n"}, "zstd": true}
        ], "config": {"Env": ["A=1"], "Cmd": ["/bin/tool"]}}),
    );

    // hyperctl push: the project's own push.
    let target = format!("{host}/team/app:1");
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/push?remote={}&tag=app:1", urlencode(&target)),
        None,
    );
    let pushed = lines(&r.body);
    assert_eq!(r.status, 200, "{}", text(&pushed));
    let last = pushed.last().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string();
    let digest = last.strip_prefix("Pushed ").unwrap().to_string();
    // skopeo reads back what ember pushed: the same manifest, config intact.
    let raw = skopeo_raw(&target, false);
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "inspect",
            "--tls-verify=false",
            "--raw",
        ])
        .arg(format!("docker://{target}"))
        .output()
        .unwrap();
    assert_eq!(sha256_of(&out.stdout), digest, "manifest digest");
    assert_eq!(raw["layers"].as_array().unwrap().len(), 3, "{raw}");
    assert!(raw.to_string().contains("tar+zstd"), "{raw}");
    let cfg = skopeo_raw(&target, true);
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/tool"]), "{cfg}");
    // Pushing again finds every blob there.
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/push?remote={}&tag=app:1", urlencode(&target)),
        None,
    );
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("Layer already exists"));

    // Anonymous pull of it (loopback: plain HTTP), cache empty: 4 blobs.
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 200, "{}", text(&ls));
    let t = text(&ls);
    assert!(
        t.contains("Pulling fs layer") && t.contains("Download complete"),
        "{t}"
    );
    assert!(t.contains("4 blobs fetched"), "{t}");
    assert!(t.contains(&format!("Digest: {digest}")), "{t}");
    assert!(
        images(&d)
            .iter()
            .any(|i| i.starts_with(&format!("{target}:"))
                || i.starts_with(&format!("{host}/team/app:1:"))),
        "{:?}",
        images(&d)
    );
    assert_eq!(cache_blobs(&d).len(), 4);
    // The second pull fetches nothing: every blob comes from the cache.
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 200, "{}", text(&ls));
    let t = text(&ls);
    assert!(
        t.contains("0 blobs fetched") && t.contains("4 from the cache"),
        "{t}"
    );
    assert!(t.contains("Already exists"), "{t}");
    // ... and the stored image is the same one.
    assert!(t.contains("Image is up to date"), "{t}");
    let ids = |d: &Emberd| {
        let mut v: Vec<String> = images(d)
            .iter()
            .map(|i| i.rsplit(':').nth(2).unwrap().to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let before = ids(&d);

    // By digest.
    let by_digest = format!("{host}/team/app@{digest}");
    let (c, ls) = pull(&d, &by_digest);
    assert_eq!(c, 200, "{}", text(&ls));
    assert!(text(&ls).contains(&format!("Digest: {digest}")));
    assert_eq!(
        ids(&d),
        before,
        "a pull by digest of a stored image adds none"
    );
    // A digest the registry does not have, and an unknown tag: 404.
    let (c, ls) = pull(&d, &format!("{host}/team/app@sha256:{}", "0".repeat(64)));
    assert_eq!(c, 404, "{}", text(&ls));
    assert!(text(&ls).contains("manifest unknown"), "{}", text(&ls));
    let (c, ls) = pull(&d, &format!("{host}/team/app:nope"));
    assert_eq!(c, 404, "{}", text(&ls));
    // A malformed reference: 400, before any work.
    let (c, ls) = pull(&d, "Bad Name:x");
    assert_eq!(c, 400, "{}", text(&ls));

    // FROM <reference> in a build pulls the base.
    let ctx = d.dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {host}/team/app:1\nCOPY extra /extra\n"),
    )
    .unwrap();
    std::fs::write(ctx.join("extra"), "x").unwrap();
    let tar = d.dir.join("ctx.tar");
    assert!(Command::new("tar")
        .arg("cf")
        .arg(&tar)
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .status()
        .unwrap()
        .success());
    // The base is pulled again (from the cache) when the build needs it.
    let (c, v) = d.req(
        "DELETE",
        &format!("/image?imageId={}", urlencode(&target)),
        None,
    );
    assert_eq!(c, 200, "{v}");
    let (c, body) = d.curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", tar.display()),
        "http://localhost/image/build?t=built:1",
    ]);
    assert_eq!(c, 200, "{body}");
    assert!(body.contains("Successfully built"), "{body}");
    // hyperctl push NAME:TAG (client.Push: remote = the repository, tag =
    // the tag) pushes the stored image NAME:TAG.
    let (c, body) = d.curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", tar.display()),
        &format!(
            "http://localhost/image/build?t={}",
            urlencode(&format!("{host}/team/built:2"))
        ),
    ]);
    assert_eq!(c, 200, "{body}");
    let r = http(
        &d.sock,
        "POST",
        &format!(
            "/image/push?remote={}&tag=2",
            urlencode(&format!("{host}/team/built"))
        ),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let built = skopeo_raw(&format!("{host}/team/built:2"), false);
    assert_eq!(built["layers"].as_array().unwrap().len(), 1, "{built}");
    assert_no_leftovers(&d);
}

#[test]
fn htpasswd_registry_with_hyperd_auth_credentials() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start("registry-auth", 10581, &[]);
    let reg = RegistryServer::start(d.dir.path(), Some(("ember", "s3cret-pass")));
    let host = reg.host();
    let layout = d.dir.join("fixture");
    make_oci(
        &layout,
        &json!({"ref": "x", "layers": [{"files": {"f": "private\n"}}]}),
    );
    let target = format!("{host}/private/img:1");
    // As Docker schema 2 (skopeo converts), the other tests push OCI.
    skopeo_copy_as(
        &format!("oci:{}:x", layout.display()),
        &format!("docker://{target}"),
        Some("ember:s3cret-pass"),
        false,
        Some("v2s2"),
    );
    // hyperctl's pull carries the credentials itself (client.Pull:
    // X-Registry-Auth, base64url of the AuthConfig JSON).
    let header = |user: &str, pass: &str| {
        let json = json!({"username": user, "password": pass, "serveraddress": host}).to_string();
        let out = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(json.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let b64: String = String::from_utf8_lossy(&out.stdout)
            .trim()
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        format!("X-Registry-Auth: {b64}")
    };
    let url = format!(
        "http://localhost/image/create?imageName={}",
        urlencode(&target)
    );
    let (c, body) = d.curl(&["-X", "POST", "-H", &header("ember", "not-it"), &url]);
    assert_eq!(c, 401, "{body}");
    let (c, body) = d.curl(&["-X", "POST", "-H", &header("ember", "s3cret-pass"), &url]);
    assert_eq!(c, 200, "{body}");
    let (c, v) = d.req(
        "DELETE",
        &format!("/image?imageId={}", urlencode(&target)),
        None,
    );
    assert_eq!(c, 200, "{v}");
    assert!(images(&d).is_empty());

    // Anonymous: refused, 401, nothing kept.
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 401, "{}", text(&ls));
    assert!(text(&ls).contains("unauthorized"), "{}", text(&ls));
    // hyperctl login with a wrong password: still refused.
    let login = |pass: &str| {
        let (c, v) = d.req(
            "POST",
            "/auth",
            Some(
                &json!({"username": "ember", "password": pass, "serveraddress": format!("http://{host}")})
                    .to_string(),
            ),
        );
        assert_eq!(c, 200, "{v}");
    };
    login("wrong");
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 401, "{}", text(&ls));
    assert!(!text(&ls).contains("wrong"), "a password in an error");
    assert!(images(&d).is_empty());
    // The right one.
    login("s3cret-pass");
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 200, "{}", text(&ls));
    // Push with the same credentials.
    let r = http(
        &d.sock,
        "POST",
        &format!(
            "/image/push?remote={}&tag={}",
            urlencode(&format!("{host}/private/copy:2")),
            urlencode(&target)
        ),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    for resp in d.responses() {
        assert!(!resp.contains("s3cret-pass"));
    }
    assert!(
        !d.err().contains("s3cret-pass"),
        "a password in emberd's log"
    );
    assert_no_leftovers(&d);
}

#[test]
fn multi_arch_index_pulls_linux_amd64() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start("registry-multi", 10582, &[]);
    let reg = RegistryServer::start(d.dir.path(), None);
    let (arm, amd) = (d.dir.join("arm64"), d.dir.join("amd64"));
    make_oci(
        &arm,
        &json!({"ref": "a", "layers": [{"files": {"arch": "arm64\n"}}]}),
    );
    make_oci(
        &amd,
        &json!({"ref": "b", "layers": [{"files": {"arch": "amd64\n"}}]}),
    );
    let (arm_m, arm_layers) = layout_digests(&arm);
    let (amd_m, amd_layers) = layout_digests(&amd);
    // One layout with an index: arm64 listed first.
    let multi = d.dir.join("multi");
    std::fs::create_dir_all(multi.join("blobs/sha256")).unwrap();
    for src in [&arm, &amd] {
        for e in std::fs::read_dir(src.join("blobs/sha256"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(e.path(), multi.join("blobs/sha256").join(e.file_name())).unwrap();
        }
    }
    let size = |l: &Path, m: &str| {
        std::fs::metadata(
            l.join("blobs/sha256")
                .join(m.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
        .len()
    };
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm_m, "size": size(&arm, &arm_m),
             "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd_m, "size": size(&amd, &amd_m),
             "platform": {"os": "linux", "architecture": "amd64"}}]});
    let ib = index.to_string().into_bytes();
    let idig = sha256_of(&ib);
    std::fs::write(
        multi
            .join("blobs/sha256")
            .join(idig.strip_prefix("sha256:").unwrap()),
        &ib,
    )
    .unwrap();
    std::fs::write(
        multi.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": idig, "size": ib.len(), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        multi.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let target = format!("{}/multi/arch:1", reg.host());
    skopeo_copy(
        &format!("oci:{}:multi", multi.display()),
        &format!("docker://{target}"),
        None,
        true,
    );
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 200, "{}", text(&ls));
    assert!(
        text(&ls).contains(&format!("Digest: {amd_m}")),
        "{}",
        text(&ls)
    );
    let cache = cache_blobs(&d);
    let hex = |s: &String| s.strip_prefix("sha256:").unwrap().to_string();
    assert!(cache.contains(&hex(&amd_layers[0])), "{cache:?}");
    assert!(!cache.contains(&hex(&arm_layers[0])), "arm64 layer fetched");
    // The stored image, written out, holds the amd64 layer.
    let out = d.dir.join("export-multi");
    let r = http(
        &d.sock,
        "POST",
        &format!(
            "/image/push?remote={}&tag={}",
            urlencode(&out.display().to_string()),
            urlencode(&target)
        ),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(out.join("blobs/sha256").join(hex(&amd_layers[0])).is_file());
}

#[test]
fn tampered_blob_is_refused_and_nothing_is_kept() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start("registry-tamper", 10583, &[]);
    let reg = RegistryServer::start(d.dir.path(), None);
    let layout = d.dir.join("fixture");
    make_oci(
        &layout,
        &json!({"ref": "x", "layers": [
            {"files": {"ok": "fine\n"}},
            {"files": {"bad": "this layer will be changed in the registry\n"}}
        ]}),
    );
    let (_, layers) = layout_digests(&layout);
    let target = format!("{}/t/img:1", reg.host());
    skopeo_copy(
        &format!("oci:{}:x", layout.display()),
        &format!("docker://{target}"),
        None,
        false,
    );
    // Same length, other bytes: only the digest can tell.
    let data = reg.blob_data(&layers[1]);
    let mut b = std::fs::read(&data).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&data, &b).unwrap();
    let (c, ls) = pull(&d, &target);
    assert_eq!(c, 502, "{}", text(&ls));
    assert!(text(&ls).contains("digest mismatch"), "{}", text(&ls));
    assert!(images(&d).is_empty(), "{:?}", images(&d));
    let cache = cache_blobs(&d);
    assert!(
        !cache.contains(&layers[1].strip_prefix("sha256:").unwrap().to_string()),
        "tampered blob kept"
    );
    assert_no_leftovers(&d);
}

/// A TCP proxy in front of the registry that, once `cut_after` bytes came
/// back from it, kills the registry and cuts every connection.
fn cutting_proxy(upstream: u16, cut_after: usize, reg: Arc<Mutex<Option<Child>>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(0usize));
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
                let _ = u2.shutdown(Shutdown::Write);
            });
            let (seen, reg) = (seen.clone(), reg.clone());
            std::thread::spawn(move || {
                let (mut up, mut client) = (up, client);
                let mut buf = [0u8; 16384];
                loop {
                    let n = match up.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let total = {
                        let mut s = seen.lock().unwrap();
                        *s += n;
                        *s
                    };
                    if total > cut_after {
                        stop(&reg);
                        break;
                    }
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn registry_stopped_mid_pull_leaves_nothing() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start("registry-down", 10584, &[]);
    let reg = RegistryServer::start(d.dir.path(), None);
    // 4 MiB that gzip cannot shrink.
    let big = d.dir.join("big.bin");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let data: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&big, &data).unwrap();
    let layout = d.dir.join("fixture");
    make_oci(
        &layout,
        &json!({"ref": "x", "layers": [{"files": {"big": {"from": big.display().to_string()}}}]}),
    );
    let (_, layers) = layout_digests(&layout);
    skopeo_copy(
        &format!("oci:{}:x", layout.display()),
        &format!("docker://{}/big/img:1", reg.host()),
        None,
        false,
    );
    let proxy = cutting_proxy(reg.port, 1 << 20, reg.child.clone());
    let (c, ls) = pull(&d, &format!("127.0.0.1:{proxy}/big/img:1"));
    assert_eq!(c, 502, "{}", text(&ls));
    assert!(text(&ls).contains("unavailable"), "{}", text(&ls));
    assert!(
        reg.child.lock().unwrap().is_none(),
        "the proxy stopped the registry"
    );
    assert!(images(&d).is_empty());
    let hex = layers[0].strip_prefix("sha256:").unwrap().to_string();
    assert!(!cache_blobs(&d).contains(&hex), "half a layer kept");
    assert_no_leftovers(&d);
    // And with the registry gone altogether: a clear 502 too.
    let (c, ls) = pull(&d, &format!("{}/big/img:1", reg.host()));
    assert_eq!(c, 502, "{}", text(&ls));
    assert!(text(&ls).contains("unavailable"), "{}", text(&ls));
}

#[test]
fn flintlock_microvm_kernel_and_root_volume_from_the_registry() {
    if !have_tools() {
        return;
    }
    let d = Emberd::start(
        "registry-fl",
        10585,
        &[
            "--flintlock-max-retries",
            "2",
            "--flintlock-backoff-ms",
            "100",
        ],
    );
    let reg = RegistryServer::start(d.dir.path(), None);
    let host = reg.host();
    let kernel = d.dir.join("kernel-oci");
    make_oci(
        &kernel,
        &json!({"ref": "k", "layers": [
            {"dirs": ["boot"], "files": {"boot/vmlinux": {"from": PVH_ELF, "mode": 0o755}}}
        ]}),
    );
    let root = d.dir.join("root-oci");
    make_oci(
        &root,
        &json!({"ref": "r", "layers": [
            {"dirs": ["etc"], "files": {"etc/hostname": "base\n", "etc/gone": "x"}},
            {"whiteouts": ["etc/gone"], "files": {"etc/hostname": "from-registry\n"}, "zstd": true}
        ]}),
    );
    skopeo_copy(
        &format!("oci:{}:k", kernel.display()),
        &format!("docker://{host}/flintlock/kernel:5.10.77"),
        None,
        false,
    );
    skopeo_copy(
        &format!("oci:{}:r", root.display()),
        &format!("docker://{host}/flintlock/rootfs:1"),
        None,
        false,
    );
    let spec = json!({
        "id": "vm1", "namespace": "ns1", "vcpu": 1, "memoryInMb": 1024,
        "kernel": {"image": format!("{host}/flintlock/kernel:5.10.77"), "filename": "boot/vmlinux",
                   "cmdline": {"ember.test": "idle"}},
        "rootVolume": {"id": "root", "source": {"containerSource": format!("{host}/flintlock/rootfs:1")}},
    });
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&spec.to_string()));
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let got = wait_for(PATIENCE, || {
        let (_, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        let s = v["microvm"]["status"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (s == "CREATED" || s == "FAILED").then_some(v)
    })
    .expect("reconciled");
    assert_eq!(got["microvm"]["status"]["state"], "CREATED", "{got}");
    let name = format!("fl-{}", uid.to_lowercase());
    let logs = wait_for(PATIENCE, || {
        let l = String::from_utf8_lossy(
            &http(&d.sock, "GET", &format!("/instances/{name}/logs"), None).body,
        )
        .to_string();
        l.contains("ember-guest: idle").then_some(l)
    });
    assert!(
        logs.is_some(),
        "the guest from the registry's kernel booted"
    );
    let vols = http(&d.sock, "GET", "/volumes", None).json();
    let id = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"].as_str().unwrap().ends_with("-root"))
        .expect("root volume")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = d.dir.join("state/volumes").join(format!("{id}.img"));
    let out = Command::new("debugfs")
        .args(["-R", "cat /etc/hostname"])
        .arg(&img)
        .output()
        .unwrap();
    // (The upper layer is zstd-compressed.)
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-registry\n");
    // A malformed reference is refused at create.
    let mut bad = spec.clone();
    bad["id"] = json!("vm2");
    bad["rootVolume"]["source"]["containerSource"] = json!("Bad Ref");
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&bad.to_string()));
    assert_eq!(c, 400, "{v}");
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
    assert_no_leftovers(&d);
}
