//! emberd's UniK hub endpoints (push, pull, remote-delete) end to end over
//! its unix socket, driven with curl, against a real S3-protocol server:
//! moto, started per test on 127.0.0.1 (see [`MotoServer`]).
//!
//! Every test records every response (status line, headers and body) it
//! gets from emberd, and checks at its end that no hub password it used
//! shows up in them or in emberd's stdout/stderr.

use std::process::Command;

use ember_tests::*;
use serde_json::{json, Value};

/// The hub user (the S3 access key id) of these tests.
const USER: &str = "AKIDEXAMPLE";
/// The password of test 1, as the brief spells it.
const PASS: &str = "secret";
/// A password no message would contain by chance.
const ODD_PASS: &str = "pw-Zq8xVt3Kf-never-printed";

/// A running emberd with its own state dir and jail base, killed on drop.
/// Remembers every response it gave.
fn start() -> Emberd {
    Emberd::start("emberd-hub", 10501, &[])
}

/// The hub tests' shorthand calls on the shared harness.
trait HubCalls {
    fn post(&self, path: &str, body: &str) -> (u16, Value);
    fn get(&self, path: &str) -> (u16, Value);
    fn delete(&self, path: &str) -> u16;
    fn assert_never_shown(&self, secret: &str);
}

impl HubCalls for Emberd {
    /// POSTs `body` (as JSON) to `path`.
    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.json(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            &format!("http://localhost{path}"),
        ])
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.json(&[&format!("http://localhost{path}")])
    }

    fn delete(&self, path: &str) -> u16 {
        self.curl(&["-X", "DELETE", &format!("http://localhost{path}")])
            .0
    }

    /// Asserts that `secret` appears in no response and not in emberd's
    /// output.
    fn assert_never_shown(&self, secret: &str) {
        for (i, r) in self.responses().iter().enumerate() {
            assert!(!r.contains(secret), "response {i} shows the password: {r}");
        }
        assert!(
            !self.err().contains(secret),
            "emberd's stderr shows the password:\n{}",
            self.err()
        );
        assert!(
            !self.out().contains(secret),
            "emberd's stdout shows the password:\n{}",
            self.out()
        );
    }
}

/// The hub body of the UniK API for a moto hub with bucket `unikhub`.
fn hub_body(moto: &MotoServer, pass: &str) -> String {
    json!({"url": format!("{}/unikhub", moto.url()), "user": USER, "pass": pass}).to_string()
}

/// The same in the original daemon's spelling.
fn hub_body_pascal(moto: &MotoServer, pass: &str) -> String {
    json!({"URL": format!("{}/unikhub", moto.url()), "Username": USER, "Password": pass})
        .to_string()
}

/// The `Error` text of a JSON error answer (panics if there is none).
fn error_text(v: &Value) -> &str {
    v["Error"]
        .as_str()
        .unwrap_or_else(|| panic!("not a JSON error: {v}"))
}

/// The fields a hub round trip must keep (the Id is new on pull).
fn portable(v: &Value) -> Value {
    json!({
        "Name": v["Name"],
        "SizeMb": v["SizeMb"],
        "Infrastructure": v["Infrastructure"],
        "Created": v["Created"],
        "StageSpec": v["StageSpec"],
        "RunSpec": v["RunSpec"],
    })
}

/// No push/pull scratch files are left in emberd's staging area.
fn assert_staging_empty(d: &Emberd) {
    let staging = d.dir.join("state").join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .unwrap_or_else(|e| panic!("{}: {e}", staging.display()))
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "staging leftovers: {left:?}");
}

/// A 127.0.0.1 port that nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

const HELLO_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    printf("hello from the hub, argc=%d\n", argc);
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    return 0;
}
"#;

/// A program that compiles quickly and is never run.
const TINY_C: &str = "int main(void) { return 0; }\n";

#[test]
fn push_delete_pull_run_round_trip() {
    let moto = MotoServer::start();
    let d = start();
    let img = d.c_image("hello", HELLO_C, &["args=one two", "mounts=/data"]);
    assert_eq!(img["RunSpec"]["Compiler"], "ember-c-ember");

    let (c, v) = d.post("/images/push/hello", &hub_body(&moto, PASS));
    assert_eq!(c, 202, "push: {v}");
    // The artifact is on the hub under <user>/<image>/latest.
    let head = moto
        .head_object("unikhub", &format!("{USER}/hello/latest"))
        .expect("no hello/latest on the hub");
    assert!(head["ContentLength"].as_u64().unwrap_or(0) > 0, "{head}");
    assert!(
        head["Metadata"]["unik-image"].is_string(),
        "no Image JSON metadata: {head}"
    );

    // Gone locally, back from the hub.
    assert_eq!(d.delete("/images/hello"), 204);
    assert_eq!(d.get("/images/hello").0, 404);
    let (c, v) = d.post("/images/pull/hello?provider=ember", &hub_body(&moto, PASS));
    assert_eq!(c, 202, "pull: {v}");
    let (c, got) = d.get("/images/hello");
    assert_eq!(c, 200, "{got}");
    assert_eq!(portable(&got), portable(&img));
    assert_eq!(got["RunSpec"]["Compiler"], "ember-c-ember");
    assert_ne!(got["Id"], img["Id"], "a pulled image gets a new id");
    if v.is_object() {
        assert_eq!(
            v["Id"], got["Id"],
            "the pull's answer is the installed image"
        );
    }

    // Again with the original daemon's spelling of the hub config.
    assert_eq!(d.delete("/images/hello"), 204);
    let (c, v) = d.post(
        "/images/pull/hello?provider=ember",
        &hub_body_pascal(&moto, PASS),
    );
    assert_eq!(c, 202, "pull (URL/Username/Password): {v}");
    let (c, got) = d.get("/images/hello");
    assert_eq!(c, 200, "{got}");
    assert_eq!(portable(&got), portable(&img));
    let (c, list) = d.get("/images");
    assert_eq!(c, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // The pulled kernel boots and runs the program with the image's args.
    let (c, v) = d.json(&["-X", "POST", "http://localhost/volumes/data1?size=4"]);
    assert_eq!(c, 201, "{v}");
    let run = json!({"InstanceName": "pulled-1", "ImageName": "hello",
                     "Env": {"GREETING": "round trip"}, "Mounts": {"/data": "data1"}});
    let (c, inst) = d.post("/instances/run", &run.to_string());
    assert_eq!(c, 201, "run: {inst}");
    assert_eq!(inst["ImageId"], got["Id"]);
    let l = d.wait_logs("pulled-1", "ember: exit");
    assert!(l.contains("hello from the hub, argc=3"), "{l}");
    assert!(l.contains("arg 1: one") && l.contains("arg 2: two"), "{l}");
    assert!(l.contains("GREETING=round trip"), "{l}");
    assert!(l.contains("ember: exit 0"), "{l}");

    // An image in use is not overwritten by a forced pull.
    let (c, v) = d.post(
        "/images/pull/hello?provider=ember&force=true",
        &hub_body(&moto, PASS),
    );
    assert_eq!(c, 409, "{v}");
    error_text(&v);
    assert_eq!(d.get("/images/hello").1["Id"], got["Id"]);

    assert_eq!(d.delete("/instances/pulled-1?force=true"), 204);
    assert_eq!(d.delete("/images/hello"), 204);
    d.assert_never_shown(PASS);
}

#[test]
fn pull_over_a_local_image_needs_force() {
    let moto = MotoServer::start();
    let d = start();
    let img = d.c_image("tiny", TINY_C, &[]);
    let (c, v) = d.post("/images/push/tiny", &hub_body(&moto, ODD_PASS));
    assert_eq!(c, 202, "push: {v}");

    let (c, v) = d.post(
        "/images/pull/tiny?provider=ember",
        &hub_body(&moto, ODD_PASS),
    );
    assert_eq!(c, 409, "{v}");
    assert!(error_text(&v).contains("force"), "{v}");
    // Also without the provider parameter and with force=false.
    let (c, _) = d.post("/images/pull/tiny?force=false", &hub_body(&moto, ODD_PASS));
    assert_eq!(c, 409);
    assert_eq!(
        d.get("/images/tiny").1["Id"],
        img["Id"],
        "the local image is untouched"
    );

    let (c, v) = d.post(
        "/images/pull/tiny?provider=ember&force=true",
        &hub_body(&moto, ODD_PASS),
    );
    assert_eq!(c, 202, "forced pull: {v}");
    let (c, got) = d.get("/images/tiny");
    assert_eq!(c, 200);
    assert_ne!(got["Id"], img["Id"], "the forced pull replaced the image");
    assert_eq!(portable(&got), portable(&img));
    // The replaced image's files are gone: one image dir is left.
    let dirs = std::fs::read_dir(d.dir.join("state").join("images"))
        .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    assert_eq!(dirs, 1, "image dirs after a forced pull");
    assert_eq!(d.get("/images").1.as_array().map(Vec::len), Some(1));
    d.assert_never_shown(ODD_PASS);
}

#[test]
fn remote_delete_then_pull_and_delete_are_not_found() {
    let moto = MotoServer::start();
    let d = start();
    d.c_image("tiny", TINY_C, &[]);
    d.c_image("keep", TINY_C, &[]);
    let hub = hub_body(&moto, ODD_PASS);
    assert_eq!(d.post("/images/push/tiny", &hub).0, 202);
    assert_eq!(d.post("/images/push/keep", &hub).0, 202);

    let (c, v) = d.post("/images/remote-delete/tiny", &hub);
    assert_eq!(c, 202, "remote-delete: {v}");
    assert_eq!(
        moto.head_object("unikhub", &format!("{USER}/tiny/latest")),
        None
    );
    // The local image is not touched by a remote delete.
    assert_eq!(d.get("/images/tiny").0, 200);

    assert_eq!(d.delete("/images/tiny"), 204);
    let (c, v) = d.post("/images/pull/tiny?provider=ember", &hub);
    assert_eq!(c, 404, "pull of a remotely deleted image: {v}");
    assert!(!error_text(&v).is_empty());
    assert_eq!(
        d.get("/images/tiny").0,
        404,
        "a failed pull installed nothing"
    );
    let (c, v) = d.post("/images/remote-delete/tiny", &hub);
    assert_eq!(c, 404, "second remote-delete: {v}");
    error_text(&v);
    // Never pushed, and a bucket that does not exist: 404 too.
    assert_eq!(d.post("/images/pull/never?provider=ember", &hub).0, 404);
    let other = json!({"url": format!("{}/nobucket", moto.url()), "user": USER, "pass": ODD_PASS});
    let (c, v) = d.post("/images/remote-delete/keep", &other.to_string());
    assert_eq!(c, 404, "{v}");
    // The other image is still on the hub and pulls fine.
    assert!(moto
        .head_object("unikhub", &format!("{USER}/keep/latest"))
        .is_some());
    let (c, v) = d.post("/images/pull/keep?force=true", &hub);
    assert_eq!(c, 202, "{v}");
    assert_staging_empty(&d);
    d.assert_never_shown(ODD_PASS);
}

#[test]
fn bad_hub_requests_are_refused() {
    let moto = MotoServer::start();
    let d = start();
    d.c_image("tiny", TINY_C, &[]);
    let good = hub_body(&moto, ODD_PASS);

    // Bodies that are not a hub config: 400 with a JSON error, for all three.
    let no_url = json!({"user": USER, "pass": ODD_PASS}).to_string();
    let no_user = json!({"url": moto.url(), "pass": ODD_PASS}).to_string();
    let bad_scheme =
        json!({"url": "ftp://127.0.0.1/x", "user": USER, "pass": ODD_PASS}).to_string();
    let not_string = json!({"url": moto.url(), "user": USER, "pass": 12345}).to_string();
    let bad_user = json!({"url": moto.url(), "user": "a/b", "pass": ODD_PASS}).to_string();
    for path in [
        "/images/push/tiny",
        "/images/pull/other?provider=ember",
        "/images/remote-delete/tiny",
    ] {
        for body in [
            "not json",
            "",
            "[1,2]",
            &no_url,
            &no_user,
            &bad_scheme,
            &not_string,
            &bad_user,
        ] {
            let (c, v) = d.post(path, body);
            assert_eq!(c, 400, "{path} with {body:?}: {v}");
            assert!(!error_text(&v).is_empty());
        }
    }
    let (c, v) = d.post("/images/push/tiny", "not json");
    assert!(error_text(&v).contains("JSON"), "{c} {v}");
    let (_, v) = d.post("/images/push/tiny", &no_url);
    assert!(error_text(&v).contains("url"), "{v}");

    // Unknown provider on pull.
    let (c, v) = d.post("/images/pull/tiny2?provider=aws", &good);
    assert_eq!(c, 400, "{v}");
    assert!(error_text(&v).contains("ember"), "{v}");
    // Push of an image that is not here.
    let (c, v) = d.post("/images/push/missing", &good);
    assert_eq!(c, 404, "{v}");
    error_text(&v);
    // Wrong methods on hub paths.
    let (c, _) = d.json(&["http://localhost/images/push/tiny"]);
    assert_eq!(c, 405);
    // Credentials belong in user/pass, not in the URL.
    let in_url = json!({"url": format!("http://{USER}:{ODD_PASS}@127.0.0.1:{}/unikhub", moto.port),
                        "user": USER, "pass": ODD_PASS});
    let (c, v) = d.post("/images/push/tiny", &in_url.to_string());
    assert_eq!(c, 400, "{v}");

    // An unreachable hub: a 502 with a message, not a hang.
    let dead = json!({"url": format!("http://127.0.0.1:{}/unikhub", closed_port()),
                      "user": USER, "pass": ODD_PASS})
    .to_string();
    for path in [
        "/images/push/tiny",
        "/images/pull/other?provider=ember",
        "/images/remote-delete/tiny",
    ] {
        let (c, v) = d.json(&[
            "--max-time",
            "60",
            "-X",
            "POST",
            "--data-binary",
            &dead,
            &format!("http://localhost{path}"),
        ]);
        assert_eq!(c, 502, "{path} to a closed port: {v}");
        assert!(!error_text(&v).is_empty(), "{v}");
    }
    assert_eq!(d.get("/images/other").0, 404);
    // emberd still serves after all that.
    assert_eq!(d.get("/images/tiny").0, 200);
    assert_eq!(d.post("/images/push/tiny", &good).0, 202);
    assert_staging_empty(&d);
    d.assert_never_shown(ODD_PASS);
}

#[test]
fn the_hub_password_is_never_shown() {
    let moto = MotoServer::start();
    let d = start();
    d.c_image("tiny", TINY_C, &[]);
    let dead_url = format!("http://127.0.0.1:{}/unikhub", closed_port());
    let bodies = [
        hub_body(&moto, ODD_PASS),
        hub_body_pascal(&moto, ODD_PASS),
        json!({"url": dead_url, "user": USER, "pass": ODD_PASS}).to_string(),
        json!({"url": format!("{}/nobucket", moto.url()), "user": USER, "pass": ODD_PASS})
            .to_string(),
        // Bad configs that still carry the password.
        json!({"user": USER, "pass": ODD_PASS}).to_string(),
        json!({"url": moto.url(), "user": "", "pass": ODD_PASS}).to_string(),
        json!({"url": moto.url(), "user": USER, "pass": ODD_PASS, "Password": ODD_PASS})
            .to_string(),
        json!({"url": moto.url(), "user": USER, "pass": [ODD_PASS]}).to_string(),
        format!("{{\"url\": \"{}\", \"pass\": \"{ODD_PASS}\",", moto.url()),
    ];
    for body in &bodies {
        for path in [
            "/images/push/tiny",
            "/images/push/missing",
            "/images/pull/tiny?provider=ember&force=true",
            "/images/pull/tiny?provider=ember",
            "/images/pull/never?provider=ember",
            "/images/remote-delete/never",
        ] {
            let (c, _) = d.post(path, body);
            assert!(c >= 200, "{path}: no answer");
        }
    }
    // And the whole happy path once more, verbose.
    assert_eq!(d.post("/images/push/tiny", &bodies[0]).0, 202);
    assert_eq!(d.post("/images/pull/tiny?force=true", &bodies[1]).0, 202);
    assert_eq!(d.post("/images/remote-delete/tiny", &bodies[0]).0, 202);
    assert!(d.responses().len() > 50);
    assert_staging_empty(&d);
    d.assert_never_shown(ODD_PASS);
}

/// Rewrites the `kernel` (and optionally `initrd`) of the Image JSON that
/// travels as metadata of `<USER>/<image>/latest`, as a hostile or broken
/// hub could.
fn tamper_kernel(moto: &MotoServer, image: &str, kernel: &str) {
    let script = r#"
import base64, json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
key = sys.argv[2]
h = s3.head_object(Bucket="unikhub", Key=key)
img = json.loads(base64.b64decode(h["Metadata"]["unik-image"]))
img["kernel"] = sys.argv[3]
meta = {"unik-image": base64.b64encode(json.dumps(img).encode()).decode()}
s3.copy_object(Bucket="unikhub", Key=key, CopySource={"Bucket": "unikhub", "Key": key},
               Metadata=meta, MetadataDirective="REPLACE")
"#;
    let st = Command::new(python())
        .args([
            "-c",
            script,
            &moto.url(),
            &format!("{USER}/{image}/latest"),
            kernel,
        ])
        .status()
        .expect("run python");
    assert!(st.success(), "tampering with the hub's metadata failed");
}

/// A pulled image's file names come from the hub. Ones that leave the
/// image directory (absolute paths, `..`) must be refused at pull time:
/// otherwise running the image hard-links that host file into the jail and
/// makes it world-readable (chmod 0644 on the shared inode).
#[test]
fn a_hub_image_cannot_point_outside_its_directory() {
    use std::os::unix::fs::PermissionsExt;
    let moto = MotoServer::start();
    let d = start();
    d.c_image("tiny", TINY_C, &[]);
    let secret = d.dir.join("host-secret");
    std::fs::write(&secret, b"not for the guest\n").unwrap();
    let abs = secret.to_str().unwrap().to_string();
    // state/images/<id>/ is three levels below the test dir.
    for kernel in [abs.as_str(), "../../../host-secret"] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            d.post("/images/push/tiny", &hub_body(&moto, ODD_PASS)).0,
            202
        );
        tamper_kernel(&moto, "tiny", kernel);
        let (c, v) = d.post(
            "/images/pull/tiny?provider=ember&force=true",
            &hub_body(&moto, ODD_PASS),
        );
        if c == 202 {
            let (c, inst) = d.post(
                "/instances/run",
                &json!({"InstanceName": "t1", "ImageName": "tiny"}).to_string(),
            );
            let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
            let _ = d.delete("/instances/t1?force=true");
            panic!(
                "a pulled image with kernel {kernel:?} was accepted ({v}); run answered \
                 {c} {inst}; the host file's mode is now {mode:o} (was 600)"
            );
        }
        assert!(c == 502 || c == 400, "kernel {kernel:?}: {c} {v}");
        error_text(&v);
    }
    d.assert_never_shown(ODD_PASS);
}
