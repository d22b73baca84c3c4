//! The UniK CLI (github.com/solo-io/unik, `cmd/*.go` over `pkg/client/*.go`)
//! against `emberd --listen-tcp`, replayed byte for byte.
//!
//! The CLI only speaks `http://host:port`. Each of its daemon commands is one
//! call of `pkg/client`, which goes through layer-x/layerx-commons'
//! `lxhttpclient` (vendored in unik) on Go's `http.DefaultClient`. So each
//! request here is exactly what that stack writes: request line, `Host`,
//! `User-Agent: Go-http-client/1.1`, `Content-Length` for bodies,
//! `Content-Type` only where lxhttpclient sets one (multipart uploads), and
//! `Accept-Encoding: gzip` last; query strings built by
//! `pkg/client.buildQuery` (`url.QueryEscape`, every parameter always sent,
//! booleans as `true`/`false`); `Post(..., nil)` sends the JSON `null`;
//! uploads are `mime/multipart` with the file field `tarfile` whose filename
//! is the client's temp-file path, holding `tar cf - -C DIR .` (`unikos.Compress`).
//! Each CLI invocation is a new process, so each request is a new connection.
//!
//! Every test names the client function (and the `cmd/` command) it mirrors,
//! checks the status code that function checks, and decodes the body the way
//! it does (the Go types of `pkg/types`: strict JSON types, RFC 3339 times).
//! The real CLI cannot be built from a package registry, so this replay is
//! the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_tests::*;
use serde_json::{json, Value};

const UID: u32 = 10540;

/// emberd with `--listen-tcp 127.0.0.1:0` (and `extra` flags), and the TCP
/// address it reports.
fn start(tag: &str, extra: &[&str]) -> (Emberd, Cli) {
    let mut args = vec!["--listen-tcp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let d = Emberd::start(tag, UID, &args);
    let addr = tcp_addr(&d);
    (d, Cli { addr })
}

/// The address from emberd's `serving on tcp ADDR` line.
fn tcp_addr(d: &Emberd) -> SocketAddr {
    let found = wait_for(PATIENCE, || {
        d.err().lines().find_map(|l| {
            l.strip_prefix("emberd: serving on tcp ")?
                .trim()
                .parse()
                .ok()
        })
    });
    found.unwrap_or_else(|| panic!("emberd reported no TCP address:\n{}", d.err()))
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `pkg/client/client.go: buildQuery`. (Go iterates the map in random order;
/// emberd must not care, and the tests use different orders.)
fn build_query(params: &[(&str, String)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

/// The UniK CLI's HTTP client (`lxhttpclient` on Go's net/http) pointed at
/// emberd's TCP address (`unik target --host 127.0.0.1 --port PORT`).
struct Cli {
    addr: SocketAddr,
}

/// A multipart upload as `lxhttpclient.PostFile` builds it.
struct Upload {
    content_type: String,
    body: Vec<u8>,
}

impl Cli {
    /// One request on a new connection, as Go's transport writes it.
    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> (TcpStream, Vec<u8>) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: Go-http-client/1.1\r\n",
            self.addr
        );
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str("Accept-Encoding: gzip\r\n\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        let mut s = TcpStream::connect(self.addr).expect("connect to emberd over TCP");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&bytes).expect("send request");
        (s, bytes)
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Option<&[u8]>,
    ) -> HttpResponse {
        let (mut s, _) = self.send(method, path, ct, body);
        read_response(&mut s).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `lxhttpclient.Get`.
    fn get(&self, path: &str) -> HttpResponse {
        self.exchange("GET", path, None, None)
    }

    /// `lxhttpclient.Delete` (no body).
    fn delete(&self, path: &str) -> HttpResponse {
        self.exchange("DELETE", path, None, None)
    }

    /// `lxhttpclient.Post` with a message: `json.Marshal(message)` as the
    /// body, no Content-Type (`postData` sets none). `None` is Go's `nil`,
    /// which marshals to `null`.
    fn post(&self, path: &str, json_body: Option<&str>) -> HttpResponse {
        let body = json_body.unwrap_or("null");
        self.exchange("POST", path, None, Some(body.as_bytes()))
    }

    /// `lxhttpclient.PostFile(url, path, "tarfile", file)`.
    fn post_file(&self, path: &str, up: &Upload) -> HttpResponse {
        self.exchange("POST", path, Some(&up.content_type), Some(&up.body))
    }
}

/// `mime/multipart.Writer` with one `CreateFormFile(key, pathToFile)` part,
/// as `lxhttpclient.PostFile` makes it: a random 60-hex-digit boundary,
/// the full client-side path as the filename.
fn multipart_file(key: &str, file: &Path) -> Upload {
    let boundary: String = (0..30)
        .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) % 251))
        .collect();
    let data = std::fs::read(file).unwrap();
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
        file.display()
    )
    .into_bytes();
    body.extend_from_slice(&data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Upload {
        content_type: format!("multipart/form-data; boundary={boundary}"),
        body,
    }
}

/// `unikos.Compress(source, destination)`: `tar cf DEST -C SOURCE .` (a plain
/// tar, despite the `.tar.gz` temp-file names), into a temp file named as
/// `ioutil.TempFile("", "sources.tar.gz.")` names it.
fn compress(dir: &Path, source: &Path, prefix: &str) -> PathBuf {
    let dest = dir.join(format!("{prefix}{}", std::process::id()));
    let st = Command::new("tar")
        .arg("cf")
        .arg(&dest)
        .arg("-C")
        .arg(source)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    dest
}

/// A directory with `files` in it.
fn tree(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(name);
    for (f, text) in files {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    root
}

/// Go's `time.Time.UnmarshalJSON`: an RFC 3339 string.
fn is_rfc3339(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b'T' | b't')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':')
}

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

/// Decodes like `json.Unmarshal(body, &types.Image{})` would, without error.
fn go_image(v: &Value) {
    assert!(v["Id"].is_string() && v["Name"].is_string(), "{v}");
    assert!(is_int(&v["SizeMb"]), "SizeMb: {v}");
    assert_eq!(v["Infrastructure"], "EMBER", "{v}");
    assert!(is_rfc3339(&v["Created"]), "Created: {v}");
    assert!(v["StageSpec"]["ImageFormat"].is_string(), "{v}");
    let rs = &v["RunSpec"];
    for m in rs["DeviceMappings"].as_array().expect("DeviceMappings") {
        assert!(
            m["MountPoint"].is_string() && m["DeviceName"].is_string(),
            "{v}"
        );
    }
    assert!(
        is_int(&rs["DefaultInstanceMemory"]) && is_int(&rs["MinInstanceDiskMB"]),
        "{v}"
    );
    for k in ["StorageDriver", "VsphereNetworkType", "Compiler"] {
        assert!(rs[k].is_string() || rs[k].is_null(), "{k}: {v}");
    }
}

/// `json.Unmarshal(body, &types.Instance{})`.
fn go_instance(v: &Value) {
    for k in ["Id", "Name", "IpAddress", "ImageId"] {
        assert!(v[k].is_string(), "{k}: {v}");
    }
    let states = [
        "running",
        "stopped",
        "pending",
        "unknown",
        "terminated",
        "error",
        "paused",
        "suspended",
    ];
    assert!(
        states.contains(&v["State"].as_str().unwrap_or("")),
        "State: {v}"
    );
    assert_eq!(v["Infrastructure"], "EMBER", "{v}");
    assert!(is_rfc3339(&v["Created"]), "Created: {v}");
}

/// `json.Unmarshal(body, &types.Volume{})`.
fn go_volume(v: &Value) {
    for k in ["Id", "Name", "Attachment"] {
        assert!(v[k].is_string(), "{k}: {v}");
    }
    assert!(is_int(&v["SizeMb"]), "SizeMb: {v}");
    assert_eq!(v["Infrastructure"], "EMBER", "{v}");
    assert!(is_rfc3339(&v["Created"]), "Created: {v}");
}

fn text(r: &HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

/// The status and the body, for assertion messages.
fn show(r: &HttpResponse) -> String {
    format!("{} {}", r.status, text(r))
}

/// Every error the CLI prints as "failed with status N: BODY": a JSON
/// `{"Error": ...}` here.
fn json_error(r: &HttpResponse, status: u16) -> String {
    assert_eq!(r.status, status, "{}", show(r));
    r.json()["Error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {}", show(r)))
        .to_string()
}

/// A program that prints its environment's GREETING and its args, then
/// stays up (halts), so the instance can be stopped, started and followed.
const STAY_UP_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    const char *g = getenv("GREETING");
    printf("unik-cli up: GREETING=%s argc=%d\n", g ? g : "(unset)", argc);
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    for (;;) __asm__ volatile("cli; hlt");
}
"#;

#[test]
fn listen_tcp_is_loopback_by_default_warns_otherwise_and_caps_each_address() {
    // Loopback: no warning.
    let (d, cli) = start("unik-tcp-lo", &["--max-connections-per-ip", "2"]);
    assert!(cli.addr.ip().is_loopback(), "{}", cli.addr);
    assert!(!d.err().contains("WARNING"), "{}", d.err());
    // Two idle connections from 127.0.0.1 are held; a third is refused
    // with 503 and a JSON error, while the unix socket still serves.
    let a = TcpStream::connect(cli.addr).unwrap();
    let b = TcpStream::connect(cli.addr).unwrap();
    let mut third = None;
    wait_for(PATIENCE, || {
        let mut c = TcpStream::connect(cli.addr).ok()?;
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let r = read_response(&mut c).ok()?;
        third = Some(r);
        Some(())
    });
    let third = third.expect("no answer on the third connection");
    let e = json_error(&third, 503);
    assert!(e.contains("too many connections"), "{e}");
    assert_eq!(d.req("GET", "/available_providers", None).0, 200);
    drop((a, b));
    // Their slots free up again.
    let ok = wait_for(PATIENCE, || {
        let r = cli.get("/available_providers");
        (r.status == 200).then_some(r)
    });
    assert!(
        ok.is_some(),
        "TCP never served again after the idle connections left"
    );
    drop(d);

    // Every interface: served, with a loud warning.
    let d = Emberd::start("unik-tcp-any", UID, &["--listen-tcp", "0.0.0.0:0"]);
    let addr = tcp_addr(&d);
    let err = d.err();
    assert!(
        err.contains("WARNING") && err.contains("not a loopback address"),
        "{err}"
    );
    assert!(err.contains("no authentication"), "{err}");
    // Reached over loopback only (never off this host).
    let cli = Cli {
        addr: SocketAddr::from(([127, 0, 0, 1], addr.port())),
    };
    assert_eq!(cli.get("/available_providers").status, 200);
    drop(d);

    // A bare port is loopback; ":PORT" and host names are refused clearly.
    for (bad, why) in [
        (":3000", "give the interface's address"),
        ("example.com:3000", "expected PORT"),
    ] {
        let dir = TempDir::new("unik-tcp-bad");
        let mut cmd = Command::new(bin("emberd"));
        cmd.args(["--socket"])
            .arg(dir.join("s.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen-tcp", bad]);
        let mut p = Proc::spawn(cmd, dir.path(), "emberd");
        assert_eq!(p.wait().code(), Some(1), "{}", p.err());
        assert!(p.err().contains(why), "{bad}: {}", p.err());
    }
}

#[test]
fn compilers_providers_and_describe_compiler() {
    let (_d, cli) = start("unik-cli-discover", &[]);
    // pkg/client/client.go: (*client).AvailableCompilers (cmd/compilers.go)
    let r = cli.get("/available_compilers");
    assert_eq!(r.status, 200, "{}", show(&r));
    let compilers: Vec<String> = serde_json::from_value(r.json()).expect("[]string");
    assert!(
        compilers.contains(&"ember-c-ember".to_string()),
        "{compilers:?}"
    );
    let mut sorted = compilers.clone();
    sorted.sort();
    assert_eq!(compilers, sorted);
    // pkg/client/client.go: (*client).AvailableProviders (cmd/providers.go)
    let r = cli.get("/available_providers");
    assert_eq!(r.status, 200, "{}", show(&r));
    assert_eq!(r.json(), json!(["ember"]));
    // pkg/client/client.go: (*client).DescribeCompiler (cmd/describe-compiler.go):
    // plain text; the CLI prints it as is.
    let q = build_query(&[
        ("lang", "c".into()),
        ("provider", "ember".into()),
        ("base", "ember".into()),
    ]);
    let r = cli.get(&format!("/describe_compiler{q}"));
    assert_eq!(r.status, 200, "{}", show(&r));
    assert!(
        !text(&r).is_empty() && !text(&r).starts_with('{'),
        "{}",
        text(&r)
    );
    let q = build_query(&[
        ("base", "rump".into()),
        ("lang", "go".into()),
        ("provider", "ember".into()),
    ]);
    let e = json_error(&cli.get(&format!("/describe_compiler{q}")), 400);
    assert!(e.contains("available bases"), "{e}");
}

#[test]
fn build_run_logs_stop_start_volumes_and_deletes_as_the_cli_does() {
    let (d, cli) = start("unik-cli-flow", &[]);
    let tmp = d.dir.path();

    // pkg/client/images.go: (*images).Build (cmd/build.go: unik build --name
    // app --path SRC --base ember --language c --provider ember --args "one two"
    // --mountpoint /data)
    let src = tree(tmp, "src", &[("main.c", STAY_UP_C)]);
    let sources = compress(tmp, &src, "sources.tar.gz.");
    let build_q = |force: bool| {
        build_query(&[
            ("base", "ember".into()),
            ("lang", "c".into()),
            ("provider", "ember".into()),
            ("args", "one two".into()),
            ("mounts", ["/data"].join(",")),
            ("force", force.to_string()),
            ("no_cleanup", "false".into()),
        ])
    };
    let up = multipart_file("tarfile", &sources);
    let r = cli.post_file(&format!("/images/app/create{}", build_q(false)), &up);
    assert_eq!(r.status, 201, "build: {}", show(&r));
    let img = r.json();
    go_image(&img);
    assert_eq!(img["Name"], "app");
    assert_eq!(img["RunSpec"]["Compiler"], "ember-c-ember");
    let mounts: Vec<&str> = img["RunSpec"]["DeviceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["MountPoint"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["/data"], "{img}");
    // The same name again without --force: the CLI reports the daemon's 409.
    let r = cli.post_file(&format!("/images/app/create{}", build_q(false)), &up);
    assert!(json_error(&r, 409).contains("app"), "{}", show(&r));
    // An unknown language: 400 naming what exists.
    let q = build_query(&[
        ("lang", "rust".into()),
        ("provider", "ember".into()),
        ("base", "ember".into()),
        ("args", String::new()),
        ("mounts", String::new()),
        ("force", "false".into()),
        ("no_cleanup", "false".into()),
    ]);
    let r = cli.post_file(&format!("/images/other/create{q}"), &up);
    json_error(&r, 400);

    // pkg/client/images.go: (*images).All (cmd/images.go)
    let r = cli.get("/images");
    assert_eq!(r.status, 200, "{}", show(&r));
    let list = r.json();
    let list = list.as_array().expect("[]*types.Image");
    assert_eq!(list.len(), 1, "{list:?}");
    list.iter().for_each(go_image);
    // pkg/client/images.go: (*images).Get (cmd/describe-image.go), by name and by id.
    let r = cli.get("/images/app");
    assert_eq!(r.status, 200, "{}", show(&r));
    go_image(&r.json());
    let r = cli.get(&format!("/images/{}", img["Id"].as_str().unwrap()));
    assert_eq!(r.json()["Name"], "app", "{}", show(&r));
    // The CLI says "unik accepts a prefix"; ember matches exactly: 404.
    json_error(&cli.get("/images/ap"), 404);

    // pkg/client/volumes.go: (*volumes).Create without data (cmd/create-volume.go:
    // unik create-volume --name scratch --size 8 --provider ember): Post(nil).
    let q = build_query(&[
        ("size", "8".into()),
        ("provider", "ember".into()),
        ("type", "ext2".into()),
        ("no_cleanup", "false".into()),
        ("raw", "false".into()),
    ]);
    let r = cli.post(&format!("/volumes/scratch{q}"), None);
    assert_eq!(r.status, 201, "create-volume --size: {}", show(&r));
    let scratch = r.json();
    go_volume(&scratch);
    assert_eq!(
        (scratch["Name"].clone(), scratch["SizeMb"].clone()),
        (json!("scratch"), json!(8))
    );
    // ...with --data DIR: PostFile of the folder's tar.
    let data = tree(tmp, "data", &[("motd.txt", "welcome\n")]);
    let data_tar = compress(tmp, &data, "data.tar.gz.");
    let q = build_query(&[
        ("no_cleanup", "false".into()),
        ("raw", "false".into()),
        ("size", "0".into()),
        ("provider", "ember".into()),
        ("type", "ext2".into()),
    ]);
    let r = cli.post_file(
        &format!("/volumes/data1{q}"),
        &multipart_file("tarfile", &data_tar),
    );
    assert_eq!(r.status, 201, "create-volume --data: {}", show(&r));
    let data1 = r.json();
    go_volume(&data1);
    // ...with --raw --data DIR: the uploaded bytes are the volume, as is.
    let q = build_query(&[
        ("size", "0".into()),
        ("provider", "ember".into()),
        ("type", "ext2".into()),
        ("no_cleanup", "false".into()),
        ("raw", "true".into()),
    ]);
    let r = cli.post_file(
        &format!("/volumes/raw1{q}"),
        &multipart_file("tarfile", &data_tar),
    );
    assert_eq!(r.status, 201, "create-volume --raw: {}", show(&r));
    go_volume(&r.json());
    let q = build_query(&[("force", "false".into())]);
    assert_eq!(cli.delete(&format!("/volumes/raw1{q}")).status, 204);
    // A filesystem type ember cannot make: a clear 400.
    let q = build_query(&[
        ("size", "8".into()),
        ("provider", "ember".into()),
        ("type", "fat".into()),
        ("no_cleanup", "false".into()),
        ("raw", "false".into()),
    ]);
    let e = json_error(&cli.post(&format!("/volumes/fat1{q}"), None), 400);
    assert!(e.contains("ext4"), "{e}");
    // pkg/client/volumes.go: (*volumes).All and Get (cmd/volumes.go)
    let r = cli.get("/volumes");
    assert_eq!(r.status, 200, "{}", show(&r));
    let vols = r.json();
    assert_eq!(vols.as_array().map(Vec::len), Some(2), "{vols}");
    vols.as_array().unwrap().iter().for_each(go_volume);
    let r = cli.get("/volumes/data1");
    assert_eq!(r.status, 200, "{}", show(&r));
    go_volume(&r.json());

    // pkg/client/instances.go: (*instances).Run (cmd/run.go: unik run
    // --instanceName app-1 --imageName app --vol data1:/data --env GREETING=hi)
    let run = r#"{"InstanceName":"app-1","ImageName":"app","Mounts":{"/data":"data1"},"Env":{"GREETING":"hi"},"MemoryMb":0,"NoCleanup":false,"DebugMode":false}"#;
    let r = cli.post("/instances/run", Some(run));
    assert_eq!(r.status, 201, "run: {}", show(&r));
    let inst = r.json();
    go_instance(&inst);
    assert_eq!(
        (inst["Name"].clone(), inst["ImageId"].clone()),
        (json!("app-1"), img["Id"].clone())
    );
    // Without the image's required mount (no --vol): refused.
    let run2 = r#"{"InstanceName":"app-2","ImageName":"app","Mounts":{},"Env":{},"MemoryMb":0,"NoCleanup":false,"DebugMode":false}"#;
    let e = json_error(&cli.post("/instances/run", Some(run2)), 400);
    assert!(e.contains("/data"), "{e}");

    // pkg/client/instances.go: (*instances).GetLogs (cmd/logs.go without --follow)
    let logs = wait_for(PATIENCE, || {
        let r = cli.get("/instances/app-1/logs");
        assert_eq!(r.status, 200, "{}", show(&r));
        let t = text(&r);
        t.contains("arg 2: two").then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "logs never showed the program's output: {}",
            text(&cli.get("/instances/app-1/logs"))
        )
    });
    assert!(logs.contains("unik-cli up: GREETING=hi argc=3"), "{logs}");
    assert!(logs.contains("arg 1: one"), "{logs}");

    // pkg/client/instances.go: (*instances).All and Get (cmd/instances.go,
    // cmd/describe-instance.go)
    let r = cli.get("/instances");
    assert_eq!(r.status, 200, "{}", show(&r));
    let all = r.json();
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    all.as_array().unwrap().iter().for_each(go_instance);
    let r = cli.get("/instances/app-1");
    assert_eq!(r.status, 200, "{}", show(&r));
    go_instance(&r.json());
    assert_eq!(r.json()["State"], "running");

    // pkg/client/volumes.go: (*volumes).Delete of an attached volume
    // (cmd/delete-volume.go without --force): refused.
    let q = build_query(&[("force", "false".into())]);
    json_error(&cli.delete(&format!("/volumes/data1{q}")), 409);

    // pkg/client/instances.go: (*instances).Stop (cmd/stop-instance.go):
    // Post(nil), 200.
    let r = cli.post("/instances/app-1/stop", None);
    assert_eq!(r.status, 200, "stop: {}", show(&r));
    assert_eq!(cli.get("/instances/app-1").json()["State"], "stopped");

    // pkg/client/volumes.go: (*volumes).Detach (cmd/detach-volume.go) and
    // Attach (cmd/attach-volume.go --mountPoint /data): Post(nil), 202.
    let r = cli.post("/volumes/data1/detach", None);
    assert_eq!(r.status, 202, "detach: {}", show(&r));
    assert_eq!(cli.get("/volumes/data1").json()["Attachment"], "");
    let q = build_query(&[("mount", "/data".into())]);
    let r = cli.post(&format!("/volumes/data1/attach/app-1{q}"), None);
    assert_eq!(r.status, 202, "attach: {}", show(&r));
    assert_eq!(cli.get("/volumes/data1").json()["Attachment"], inst["Id"]);

    // pkg/client/instances.go: (*instances).Start (cmd/start-instance.go): 200.
    let r = cli.post("/instances/app-1/start", None);
    assert_eq!(r.status, 200, "start: {}", show(&r));
    wait_for(PATIENCE, || {
        (cli.get("/instances/app-1").json()["State"] == "running").then_some(())
    })
    .expect("never running again");

    // pkg/client/instances.go: (*instances).AttachLogs (cmd/logs.go --follow,
    // then --follow --delete): GetAsync; the CLI reads the body line by line
    // while the connection lasts. Without --delete (delete=false) the
    // instance stays when the CLI goes; with it, emberd deletes it.
    let follow = |delete: bool| {
        let q = build_query(&[("follow", "true".into()), ("delete", delete.to_string())]);
        let (mut s, _) = cli.send("GET", &format!("/instances/app-1/logs{q}"), None, None);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let seen = loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break false;
            }
            got.extend_from_slice(&buf[..n]);
            // Started twice: the second run's output arrives too.
            if String::from_utf8_lossy(&got).matches("unik-cli up").count() >= 2 {
                break true;
            }
        };
        let head = String::from_utf8_lossy(&got).to_string();
        assert!(seen, "{head}");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        s
    };
    drop(follow(false));
    // (The loop sees that close before the next connection's request.)
    assert_eq!(cli.get("/instances/app-1").json()["State"], "running");
    let s = follow(true);
    drop(s);
    let gone = wait_for(PATIENCE, || {
        (cli.get("/instances/app-1").status == 404).then_some(())
    });
    assert!(
        gone.is_some(),
        "the instance outlived its --delete log client"
    );
    assert!(vmm_processes(inst["Id"].as_str().unwrap()).is_empty());

    // pkg/client/instances.go: (*instances).Delete (cmd/delete-instance.go):
    // 204; an unknown one 404.
    let q = build_query(&[("force", "true".into())]);
    json_error(&cli.delete(&format!("/instances/app-1{q}")), 404);
    let r = cli.post("/instances/run", Some(&run.replace("app-1", "app-3")));
    assert_eq!(r.status, 201, "{}", show(&r));
    assert_eq!(cli.delete(&format!("/instances/app-3{q}")).status, 204);

    // pkg/client/volumes.go: (*volumes).Delete (cmd/delete-volume.go): 204.
    let q = build_query(&[("force", "false".into())]);
    for v in ["data1", "scratch"] {
        let r = cli.delete(&format!("/volumes/{v}{q}"));
        assert_eq!(r.status, 204, "delete-volume {v}: {}", show(&r));
    }
    // pkg/client/images.go: (*images).Delete (cmd/delete-image.go): 204.
    let r = cli.delete(&format!("/images/app{q}"));
    assert_eq!(r.status, 204, "delete-image: {}", show(&r));
    json_error(&cli.delete(&format!("/images/app{q}")), 404);
    assert_eq!(cli.get("/images").json(), json!([]));
    assert_eq!(cli.get("/volumes").json(), json!([]));
    assert_eq!(cli.get("/instances").json(), json!([]));
}

#[test]
fn hub_push_pull_and_remote_delete_as_the_cli_does() {
    let moto = MotoServer::start();
    let (d, cli) = start("unik-cli-hub", &[]);
    let tmp = d.dir.path();
    let src = tree(tmp, "src", &[("main.c", "int main(void) { return 0; }\n")]);
    let sources = compress(tmp, &src, "sources.tar.gz.");
    let q = build_query(&[
        ("provider", "ember".into()),
        ("base", "ember".into()),
        ("lang", "c".into()),
        ("args", String::new()),
        ("mounts", String::new()),
        ("force", "false".into()),
        ("no_cleanup", "false".into()),
    ]);
    let r = cli.post_file(
        &format!("/images/tiny/create{q}"),
        &multipart_file("tarfile", &sources),
    );
    assert_eq!(r.status, 201, "build: {}", show(&r));
    let img = r.json();
    // The CLI reads ~/.unik/hub-config.yaml into config.HubConfig, whose
    // malformed struct tags leave encoding/json the Go field names.
    let hub = format!(
        r#"{{"URL":"{}/unikhub","Username":"AKIDEXAMPLE","Password":"pw-never-shown"}}"#,
        moto.url()
    );
    // pkg/client/images.go: (*images).Push (cmd/push.go): 202.
    let r = cli.post("/images/push/tiny", Some(&hub));
    assert_eq!(r.status, 202, "push: {}", show(&r));
    assert!(moto
        .head_object("unikhub", "AKIDEXAMPLE/tiny/latest")
        .is_some());
    // pkg/client/images.go: (*images).Pull (cmd/pull.go) over an existing
    // image: 409 without --force, 202 with it.
    let pull = |force: bool| {
        let q = build_query(&[("provider", "ember".into()), ("force", force.to_string())]);
        cli.post(&format!("/images/pull/tiny{q}"), Some(&hub))
    };
    json_error(&pull(false), 409);
    let r = pull(true);
    assert_eq!(r.status, 202, "pull --force: {}", show(&r));
    let r = cli.get("/images/tiny");
    assert_eq!(r.status, 200, "{}", show(&r));
    go_image(&r.json());
    assert_eq!(r.json()["RunSpec"], img["RunSpec"]);
    // pkg/client/images.go: (*images).RemoteDelete (cmd/remote-delete.go): 202,
    // and the hub object is gone (the original daemon pushed instead).
    let r = cli.post("/images/remote-delete/tiny", Some(&hub));
    assert_eq!(r.status, 202, "remote-delete: {}", show(&r));
    assert!(moto
        .head_object("unikhub", "AKIDEXAMPLE/tiny/latest")
        .is_none());
    json_error(&pull(true), 404);
    for r in [d.err(), d.out()] {
        assert!(!r.contains("pw-never-shown"), "{r}");
    }
}

#[test]
fn the_pod_vm_image_is_invisible_to_the_cli() {
    let agent = bin("ember-agent");
    let (d, cli) = start(
        "unik-cli-podimg",
        &[
            "--pod-kernel",
            PVH_ELF,
            "--pod-boot-args",
            "ember.test=pod-agent",
            "--pod-agent",
            agent.to_str().unwrap(),
            "--pod-rootfs-mb",
            "16",
        ],
    );
    // hyperd builds its pod VM image on the first VM (over the unix socket,
    // as hyperctl does).
    let (c, v) = d.req("POST", "/vm/create", None);
    assert_eq!(c, 200, "vm/create: {v}");
    let vm = v["ID"].as_str().unwrap().to_string();
    let state: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("state").join("state.json")).unwrap())
            .unwrap();
    let pod_image = state["images"]
        .as_object()
        .and_then(|m| m.values().find(|i| i["name"] == "hyperd-podvm"))
        .unwrap_or_else(|| panic!("no hyperd-podvm image in the state: {state}"))
        .clone();
    let pod_id = pod_image["id"].as_str().unwrap().to_string();

    // pkg/client/images.go: (*images).All (cmd/images.go): not listed.
    let r = cli.get("/images");
    assert_eq!((r.status, r.json()), (200, json!([])), "{}", show(&r));
    // (*images).Get (cmd/describe-image.go), by name or id: 404.
    json_error(&cli.get("/images/hyperd-podvm"), 404);
    json_error(&cli.get(&format!("/images/{pod_id}")), 404);
    // (*images).Delete (cmd/delete-image.go --force): 404, and it stays.
    let q = build_query(&[("force", "true".into())]);
    json_error(&cli.delete(&format!("/images/hyperd-podvm{q}")), 404);
    json_error(&cli.delete(&format!("/images/{pod_id}{q}")), 404);
    // (*instances).Run (cmd/run.go) on it: 404.
    let run = r#"{"InstanceName":"sneaky","ImageName":"hyperd-podvm","Mounts":{},"Env":{},"MemoryMb":0,"NoCleanup":false,"DebugMode":false}"#;
    json_error(&cli.post("/instances/run", Some(run)), 404);
    // (*images).Push (cmd/push.go): 404 before any hub is contacted.
    let hub = r#"{"URL":"http://127.0.0.1:9/unikhub","Username":"u","Password":"p"}"#;
    json_error(&cli.post("/images/push/hyperd-podvm", Some(hub)), 404);
    // (*images).Build and (*images).Pull (cmd/build.go --force, cmd/pull.go
    // --force) under its name: 409, reserved.
    let src = tree(
        d.dir.path(),
        "src",
        &[("main.c", "int main(void) { return 0; }\n")],
    );
    let sources = compress(d.dir.path(), &src, "sources.tar.gz.");
    let q = build_query(&[
        ("base", "ember".into()),
        ("lang", "c".into()),
        ("provider", "ember".into()),
        ("args", String::new()),
        ("mounts", String::new()),
        ("force", "true".into()),
        ("no_cleanup", "false".into()),
    ]);
    let r = cli.post_file(
        &format!("/images/hyperd-podvm/create{q}"),
        &multipart_file("tarfile", &sources),
    );
    assert!(json_error(&r, 409).contains("reserved"), "{}", show(&r));
    let q = build_query(&[("provider", "ember".into()), ("force", "true".into())]);
    let r = cli.post(&format!("/images/pull/hyperd-podvm{q}"), Some(hub));
    assert!(json_error(&r, 409).contains("reserved"), "{}", show(&r));

    // The image is untouched and hyperd still uses it.
    let state: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("state").join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["images"][&pod_id], pod_image);
    let (c, v) = d.req("DELETE", &format!("/vm?vm={vm}"), None);
    assert_eq!(c, 200, "{v}");
    let (c, v) = d.req("POST", "/vm/create", None);
    assert_eq!(c, 200, "a second VM from the same pod image: {v}");
    let vm2 = v["ID"].as_str().unwrap().to_string();
    let (c, v) = d.req("DELETE", &format!("/vm?vm={vm2}"), None);
    assert_eq!(c, 200, "{v}");
}
