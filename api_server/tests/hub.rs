//! The hub client against a real S3-protocol server: moto's standalone
//! server (PyPI `moto[server]`), started per test on 127.0.0.1 with a port
//! the kernel picks, and killed when the test ends.
//!
//! The server is ember-tests' [`MotoServer`], the one the end-to-end hub
//! tests use. The Python interpreter is `$EMBER_PYTHON` or `python3`. If
//! moto is not importable, the first test runs resources/ci/install-moto.sh
//! once (pip install 'moto[server]') and fails with a clear message if that
//! does not work.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use api_server::images::hub::{Hub, HubConfig, HubError, DEFAULT_BUCKET, INLINE_METADATA_LIMIT};
use serde_json::json;

mod common;
use common::TempDir;
use ember_tests::MotoServer;

/// The hub client of `user` on a moto server.
trait MotoHub {
    fn hub(&self, user: &str) -> Hub;
}

impl MotoHub for MotoServer {
    fn hub(&self, user: &str) -> Hub {
        Hub::new(HubConfig::new(&self.url(), user, "secret-key").unwrap()).unwrap()
    }
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn image_json(name: &str) -> String {
    json!({
        "Id": format!("id-{name}"),
        "Name": name,
        "SizeMb": 1,
        "Infrastructure": "EMBER",
        "Created": "2024-01-02T03:04:05Z",
        "StageSpec": {"ImageFormat": "raw", "XenVirtualizationType": ""},
        "RunSpec": {
            "DeviceMappings": [{"MountPoint": "/", "DeviceName": "/dev/vda"}],
            "DefaultInstanceMemory": 128,
            "MinInstanceDiskMB": 0,
            "StorageDriver": "virtio",
            "VsphereNetworkType": "",
            "Compiler": "ember-c-ember"
        }
    })
    .to_string()
}

/// A raw request to moto, presigned with any credentials (moto refuses
/// anonymous access to private objects but checks no signature), returning
/// the status line, headers and body as text: shows what the hub client
/// really stored. `key` is `<bucket>/<object key>`.
fn raw(port: u16, method: &str, key: &str) -> String {
    use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
    let (bucket, object) = key.split_once('/').unwrap();
    let endpoint = format!("http://127.0.0.1:{port}").parse().unwrap();
    let bucket = Bucket::new(endpoint, UrlStyle::Path, bucket.to_string(), "us-east-1").unwrap();
    let creds = Credentials::new("test", "test");
    let ttl = Duration::from_secs(600);
    let url = match method {
        "HEAD" => bucket.head_object(Some(&creds), object).sign(ttl),
        "GET" => bucket.get_object(Some(&creds), object).sign(ttl),
        _ => panic!("unsupported method {method}"),
    };
    let path = &url[url::Position::BeforePath..];
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn push_exists_pull_round_trip() {
    let moto = MotoServer::start();
    let dir = TempDir::new("hub-rt");
    let hub = moto.hub("alice");
    assert_eq!(hub.bucket_name(), DEFAULT_BUCKET);

    assert!(
        !hub.exists("web").unwrap(),
        "exists before any push (no bucket yet)"
    );

    let data = pattern(100_000, 1);
    let artifact = dir.path().join("web.tar.gz");
    std::fs::write(&artifact, &data).unwrap();
    let json = image_json("web");
    hub.push("web", &json, &artifact).unwrap(); // creates the bucket
    let stored = raw(moto.port, "HEAD", "/unik-hub/alice/web/latest");
    assert!(stored.starts_with("HTTP/1.1 200"), "{stored}");
    let meta = header(&stored, "x-amz-meta-unik-image").expect("no unik-image metadata");
    assert_eq!(
        api_server::images::hub::base64_decode(meta).unwrap(),
        json.as_bytes(),
        "metadata is not the base64 Image JSON"
    );
    assert_eq!(header(&stored, "content-length"), Some("100000"));
    assert!(hub.exists("web").unwrap());
    assert!(!hub.exists("other").unwrap());

    let dest = dir.path().join("pulled.tar.gz");
    let got = hub.pull("web", &dest).unwrap();
    assert_eq!(got, json);
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    // A second push replaces the first; pull replaces dest.
    let data2 = pattern(3000, 2);
    std::fs::write(&artifact, &data2).unwrap();
    let json2 = image_json("web").replace("\"SizeMb\":1", "\"SizeMb\":2");
    assert_ne!(json, json2);
    hub.push("web", &json2, &artifact).unwrap();
    assert_eq!(hub.pull("web", &dest).unwrap(), json2);
    assert_eq!(std::fs::read(&dest).unwrap(), data2);

    // The same image name of another user is another object.
    let bob = moto.hub("bob");
    assert!(!bob.exists("web").unwrap());
    assert!(matches!(bob.pull("web", &dest), Err(HubError::NotFound(_))));
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        data2,
        "a failed pull kept dest"
    );

    // An empty artifact works too.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    hub.push("nothing", "{}", &empty).unwrap();
    assert_eq!(hub.pull("nothing", &dest).unwrap(), "{}");
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 0);

    // No temporary files left beside dest.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "pulled.tar.gz", "web.tar.gz"]);
}

#[test]
fn missing_and_deleted_images_are_not_found() {
    let moto = MotoServer::start();
    let dir = TempDir::new("hub-nf");
    let dest = dir.path().join("out");
    // In a bucket that does not exist.
    let hub =
        Hub::new(HubConfig::new(&format!("{}/nobucket", moto.url()), "u", "p").unwrap()).unwrap();
    assert!(matches!(hub.pull("x", &dest), Err(HubError::NotFound(_))));
    assert!(matches!(hub.remote_delete("x"), Err(HubError::NotFound(_))));
    assert!(!hub.exists("x").unwrap());

    // In an existing bucket (named in the URL, created by push).
    let hub = Hub::new(HubConfig::new(&format!("{}/ember-images", moto.url()), "u", "p").unwrap())
        .unwrap();
    assert_eq!(hub.bucket_name(), "ember-images");
    let artifact = dir.path().join("a");
    std::fs::write(&artifact, b"artifact").unwrap();
    hub.push("keep", &image_json("keep"), &artifact).unwrap();
    hub.push("gone", &image_json("gone"), &artifact).unwrap();
    assert!(matches!(
        hub.pull("never-pushed", &dest),
        Err(HubError::NotFound(_))
    ));

    hub.remote_delete("gone").unwrap();
    assert!(!hub.exists("gone").unwrap());
    assert!(matches!(
        hub.pull("gone", &dest),
        Err(HubError::NotFound(_))
    ));
    assert!(matches!(
        hub.remote_delete("gone"),
        Err(HubError::NotFound(_))
    ));
    assert!(!dest.exists(), "a failed pull created dest");
    // The other image is untouched.
    assert_eq!(hub.pull("keep", &dest).unwrap(), image_json("keep"));
    assert_eq!(std::fs::read(&dest).unwrap(), b"artifact");
}

#[test]
fn large_image_json_goes_to_a_sidecar_object() {
    let moto = MotoServer::start();
    let dir = TempDir::new("hub-side");
    let hub = moto.hub("carol");
    let mappings: Vec<_> = (0..100)
        .map(|i| json!({"MountPoint": format!("/data/volume-{i}"), "DeviceName": format!("/dev/vd{i}")}))
        .collect();
    let big = json!({"Name": "big", "Note": "ünïcødé", "RunSpec": {"DeviceMappings": mappings}})
        .to_string();
    assert!(big.len() * 4 / 3 > INLINE_METADATA_LIMIT);
    let artifact = dir.path().join("a");
    std::fs::write(&artifact, pattern(4096, 3)).unwrap();
    hub.push("big", &big, &artifact).unwrap();
    let stored = raw(moto.port, "HEAD", "/unik-hub/carol/big/latest");
    assert_eq!(
        header(&stored, "x-amz-meta-unik-image-object"),
        Some("latest.json"),
        "{stored}"
    );
    assert_eq!(header(&stored, "x-amz-meta-unik-image"), None);
    let sidecar = raw(moto.port, "GET", "/unik-hub/carol/big/latest.json");
    assert!(sidecar.ends_with(&big), "{sidecar}");
    let dest = dir.path().join("out");
    assert_eq!(hub.pull("big", &dest).unwrap(), big);
    assert_eq!(std::fs::read(&dest).unwrap(), pattern(4096, 3));

    // Non-ASCII JSON that fits inline travels base64 in the metadata.
    let small = json!({"Name": "small", "Note": "ünïcødé ✓"}).to_string();
    hub.push("small", &small, &artifact).unwrap();
    assert_eq!(hub.pull("small", &dest).unwrap(), small);

    // A big image pushed again small: the metadata now wins.
    hub.push("big", &small, &artifact).unwrap();
    assert_eq!(hub.pull("big", &dest).unwrap(), small);

    // Delete removes the sidecar too: a new big push/pull still works and
    // a delete leaves nothing behind that pull could find.
    hub.push("big", &big, &artifact).unwrap();
    hub.remote_delete("big").unwrap();
    assert!(matches!(hub.pull("big", &dest), Err(HubError::NotFound(_))));
    let sidecar = raw(moto.port, "HEAD", "/unik-hub/carol/big/latest.json");
    assert!(sidecar.starts_with("HTTP/1.1 404"), "{sidecar}");
}

#[test]
fn five_megabyte_artifacts_stream_single_and_multipart() {
    let moto = MotoServer::start();
    let dir = TempDir::new("hub-big");
    let data = pattern(5 * 1024 * 1024 + 12345, 4);
    let artifact = dir.path().join("big.tar.gz");
    std::fs::write(&artifact, &data).unwrap();
    let dest = dir.path().join("out");

    // One streamed PUT.
    let hub = moto.hub("dave");
    hub.push("single", &image_json("single"), &artifact)
        .unwrap();
    assert_eq!(hub.pull("single", &dest).unwrap(), image_json("single"));
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "single PUT bytes differ"
    );

    // A multipart upload: 11 MiB in 5 MiB parts (3 parts, the last short).
    let data = pattern(11 * 1024 * 1024 + 7, 5);
    std::fs::write(&artifact, &data).unwrap();
    let hub = moto
        .hub("dave")
        .with_multipart(6 * 1024 * 1024, 5 * 1024 * 1024)
        .unwrap();
    hub.push("multi", &image_json("multi"), &artifact).unwrap();
    let stored = raw(moto.port, "HEAD", "/unik-hub/dave/multi/latest");
    let etag = header(&stored, "etag").unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-3"),
        "not a 3-part upload: {stored}"
    );
    assert!(
        header(&stored, "x-amz-meta-unik-image").is_some(),
        "{stored}"
    );
    assert_eq!(hub.pull("multi", &dest).unwrap(), image_json("multi"));
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "multipart bytes differ"
    );
}

#[test]
fn bad_arguments_are_refused_before_any_request() {
    // Nothing listens on this port: these must fail without a request.
    let hub = Hub::new(HubConfig::new("http://127.0.0.1:9/", "u", "p").unwrap()).unwrap();
    let dir = TempDir::new("hub-args");
    let artifact = dir.path().join("a");
    std::fs::write(&artifact, b"x").unwrap();
    assert!(matches!(
        hub.push("a/b", "{}", &artifact),
        Err(HubError::Invalid(_))
    ));
    assert!(matches!(
        hub.push("ok", "not json", &artifact),
        Err(HubError::Invalid(_))
    ));
    assert!(matches!(
        hub.push("ok", "{}", &dir.path().join("missing")),
        Err(HubError::Io { .. })
    ));
    assert!(matches!(
        hub.push("ok", "{}", dir.path()),
        Err(HubError::Invalid(_))
    ));
    assert!(matches!(
        hub.pull("..", &artifact),
        Err(HubError::Invalid(_))
    ));
    // And an unreachable hub is a transport error, not a panic or a hang.
    assert!(matches!(hub.exists("ok"), Err(HubError::Transport(_))));
}

/// A stub S3 on 127.0.0.1 for one request: sends the request's head
/// (request line and headers) on the returned channel, then writes `answer`
/// and closes. Returns its port, that channel and its thread.
fn stub_s3(answer: String) -> (u16, mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel::<String>();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            head.push(b[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        let _ = s.write_all(answer.as_bytes());
    });
    (port, rx, server)
}

/// Wrong credentials. moto accepts any credentials unless its IAM emulation
/// is configured, so the Auth mapping is checked against a stub S3 that
/// answers like AWS does; against moto only the absence of a crash is
/// checked. The stub also records the request to show that it is signed
/// with SigV4 and that the secret never travels.
#[test]
fn auth_failures_and_sigv4_signing() {
    let body =
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SignatureDoesNotMatch</Code>\
                <Message>The request signature we calculated does not match</Message></Error>";
    let (port, rx, server) = stub_s3(format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let cfg = HubConfig::from_json(&json!({
        "URL": format!("http://127.0.0.1:{port}/bkt"),
        "Username": "AKIDEXAMPLE",
        "Password": "wrong-secret-value",
        "region": "eu-central-1",
    }))
    .unwrap();
    let hub = Hub::new(cfg).unwrap();
    let err = hub.exists("img").unwrap_err();
    let head = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    server.join().unwrap();
    match &err {
        HubError::Auth { status, code, .. } => {
            assert_eq!(*status, 403);
            // HEAD answers carry no body, so the code is generic.
            assert!(!code.is_empty());
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    let request_line = head.lines().next().unwrap();
    assert!(
        request_line.starts_with("HEAD /bkt/AKIDEXAMPLE/img/latest?"),
        "{request_line}"
    );
    assert!(
        request_line.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256"),
        "{request_line}"
    );
    assert!(
        request_line.contains("X-Amz-Credential=AKIDEXAMPLE%2F")
            && request_line.contains("%2Feu-central-1%2Fs3%2Faws4_request"),
        "{request_line}"
    );
    assert!(request_line.contains("X-Amz-Signature="), "{request_line}");
    assert!(!head.contains("wrong-secret-value"));
    assert!(!err.to_string().contains("wrong-secret-value"));
    assert!(!err.to_string().contains("X-Amz-Signature"));

    // A GET error carries S3's code and message.
    let body = "<Error><Code>InvalidAccessKeyId</Code><Message>no such key id</Message></Error>";
    let (port, _heads, server) = stub_s3(format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let hub =
        Hub::new(HubConfig::new(&format!("http://127.0.0.1:{port}/b"), "k", "s").unwrap()).unwrap();
    let dir = TempDir::new("hub-auth");
    match hub.pull("img", &dir.path().join("out")) {
        Err(HubError::Auth { code, message, .. }) => {
            assert_eq!(code, "InvalidAccessKeyId");
            assert_eq!(message, "no such key id");
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    server.join().unwrap();

    // moto itself: any credentials pass (no IAM emulation configured).
    let moto = MotoServer::start();
    let hub = Hub::new(HubConfig::new(&moto.url(), "nobody", "wrong").unwrap()).unwrap();
    match hub.exists("img") {
        Ok(false) | Err(HubError::Auth { .. }) => {}
        other => panic!("unexpected answer to wrong credentials: {other:?}"),
    }
}

#[test]
fn config_spellings_reach_the_same_hub() {
    let moto = MotoServer::start();
    let dir = TempDir::new("hub-cfg");
    let a = HubConfig::from_json(&json!({"url": moto.url(), "user": "erin", "pass": "x"})).unwrap();
    let b = HubConfig::from_json(&json!({"URL": moto.url(), "Username": "erin", "Password": "y"}))
        .unwrap();
    assert_eq!(a.url, b.url);
    assert_eq!(a.bucket, b.bucket);
    let artifact = dir.path().join("a");
    std::fs::write(&artifact, b"hello").unwrap();
    Hub::new(a)
        .unwrap()
        .push("img", "{\"Name\":\"img\"}", &artifact)
        .unwrap();
    let dest = dir.path().join("out");
    assert_eq!(
        Hub::new(b).unwrap().pull("img", &dest).unwrap(),
        "{\"Name\":\"img\"}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
}
