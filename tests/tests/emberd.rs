//! emberd end to end over its unix socket, driven the way users drive it:
//! curl --unix-socket with forms and JSON.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use ember_tests::*;

fn start() -> Emberd {
    Emberd::start("emberd", 10501, &[])
}

#[test]
fn compilers_and_providers() {
    let d = start();
    let (c, v) = d.json(&["http://localhost/available_providers"]);
    assert_eq!((c, v), (200, serde_json::json!(["ember"])));
    let (c, v) = d.json(&["http://localhost/available_compilers"]);
    assert_eq!(c, 200);
    assert!(v.is_array(), "{v}");
    let (c, v) = d.json(&["http://localhost/describe_compiler?provider=ember&base=nope&lang=c"]);
    assert_eq!(c, 400);
    assert!(
        v["Error"].as_str().unwrap().contains("available bases"),
        "{v}"
    );
    let (c, v) = d.json(&["http://localhost/describe_compiler?provider=qemu&base=ember&lang=c"]);
    assert_eq!(c, 400);
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .contains("available providers: ember"),
        "{v}"
    );
}

#[test]
fn volumes_lifecycle_and_bad_input() {
    let d = start();
    let u = |p: &str| format!("http://localhost{p}");
    // Empty volume needs a size.
    let (c, v) = d.json(&["-X", "POST", &u("/volumes/empty1")]);
    assert_eq!(c, 400, "{v}");
    let (c, v) = d.json(&["-X", "POST", &u("/volumes/empty1?size=8")]);
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["Name"], "empty1");
    assert_eq!(v["SizeMb"], 8);
    assert_eq!(v["Infrastructure"], "EMBER");
    // From a tar.gz: an ext4 volume with the files in it.
    let tgz = make_tar(
        d.dir.path(),
        &[
            ("hello.txt", b"hello volume\n"),
            ("sub/x.bin", &[7u8; 3000]),
        ],
    );
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        &u("/volumes/data1"),
    ]);
    assert_eq!(c, 201, "{v}");
    let id = v["Id"].as_str().unwrap().to_string();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{id}.img"));
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("cat /hello.txt")
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello volume\n");
    // Raw.
    let raw = d.dir.join("raw.bin");
    std::fs::write(&raw, vec![0xabu8; 1000]).unwrap();
    let form = format!("tarfile=@{}", raw.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "raw=true",
        &u("/volumes/raw1"),
    ]);
    assert_eq!(c, 201, "{v}");
    // Duplicates, bad names, bad tar, unknown provider.
    let (c, _) = d.json(&["-X", "POST", &u("/volumes/empty1?size=8")]);
    assert_eq!(c, 409);
    let (c, _) = d.json(&["-X", "POST", &u("/volumes/bad%20name?size=8")]);
    assert_eq!(c, 400);
    let junk = d.dir.join("junk.tgz");
    std::fs::write(&junk, b"definitely not a tarball").unwrap();
    let form = format!("tarfile=@{}", junk.display());
    let (c, v) = d.json(&["-X", "POST", "-F", &form, &u("/volumes/junk")]);
    assert_eq!(c, 400, "{v}");
    let (c, _) = d.json(&["-X", "POST", &u("/volumes/p1?size=8&provider=aws")]);
    assert_eq!(c, 400);
    // List and get (exact names only).
    let (c, v) = d.json(&[&u("/volumes")]);
    assert_eq!(c, 200);
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    assert_eq!(d.json(&[&u("/volumes/data")]).0, 404);
    assert_eq!(d.json(&[&u(&format!("/volumes/{id}"))]).1["Name"], "data1");
    // Attach needs an instance.
    let (c, _) = d.json(&["-X", "POST", &u("/volumes/data1/attach/nope?mount=/data")]);
    assert_eq!(c, 404);
    let (c, _) = d.json(&["-X", "POST", &u("/volumes/data1/detach")]);
    assert_eq!(c, 409);
    // Delete.
    assert_eq!(d.curl(&["-X", "DELETE", &u("/volumes/raw1")]).0, 204);
    assert_eq!(d.curl(&["-X", "DELETE", &u("/volumes/raw1")]).0, 404);
    assert_eq!(d.json(&[&u("/volumes")]).1.as_array().unwrap().len(), 2);
}

#[test]
fn a_large_upload_is_spooled_and_arrives_intact() {
    use std::os::unix::fs::PermissionsExt;
    let d = start();
    // 3 MiB: over the 1 MiB spool threshold, so emberd's HTTP layer keeps
    // it in an unlinked file under <state>/spool, not in memory.
    let raw = d.dir.join("big.bin");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let form = format!("tarfile=@{}", raw.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "raw=true",
        "http://localhost/volumes/big1",
    ]);
    assert_eq!(c, 201, "{v}");
    let id = v["Id"].as_str().unwrap();
    let img = std::fs::read(
        d.dir
            .join("state")
            .join("volumes")
            .join(format!("{id}.img")),
    )
    .unwrap();
    assert!(
        img.len() >= data.len() && img[..data.len()] == data[..],
        "volume content differs"
    );
    let spool = d.dir.join("state").join("spool");
    assert_eq!(
        std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}

#[test]
fn unknown_routes_and_a_stalled_client() {
    let d = start();
    let mut stalled = UnixStream::connect(&d.sock).unwrap();
    stalled
        .write_all(b"POST /volumes/x HTTP/1.1\r\nContent-Length: 1000\r\n\r\npartial")
        .unwrap();
    let (c, v) = d.json(&["http://localhost/nope"]);
    assert_eq!(c, 404, "{v}");
    assert!(v["Error"].is_string());
    let (c, _) = d.json(&["-X", "PUT", "http://localhost/images"]);
    assert_eq!(c, 405);
    let (c, _) = d.json(&["http://localhost/images/none"]);
    assert_eq!(c, 404);
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        "{not json",
        "http://localhost/instances/run",
    ]);
    assert_eq!(c, 400, "{v}");
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        r#"{"InstanceName":"a","ImageName":"missing"}"#,
        "http://localhost/instances/run",
    ]);
    assert_eq!(c, 404, "{v}");
    drop(stalled);
}

#[test]
fn state_survives_kill_9() {
    let mut d = start();
    let (c, _) = d.json(&["-X", "POST", "http://localhost/volumes/keep?size=4"]);
    assert_eq!(c, 201);
    d.kill9();
    d.restart();
    let (c, v) = d.json(&["http://localhost/volumes/keep"]);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["SizeMb"], 4);
}

#[test]
fn linux_base_images_build_here() {
    let d = start();
    let (c, v) = d.json(&["http://localhost/available_compilers"]);
    assert_eq!(c, 200);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        names.contains(&"linux-c-ember") && names.contains(&"linux-binary-ember"),
        "{v}"
    );
    let (c, text) =
        d.curl(&["http://localhost/describe_compiler?provider=ember&base=linux&lang=c"]);
    assert_eq!(c, 200);
    assert!(text.contains("init"), "{text}");

    let tgz = make_tar(
        d.dir.path(),
        &[(
            "main.c",
            b"#include <stdio.h>\nint main(int c, char **v) { printf(\"hello from init %d\\n\", c); return 0; }\n",
        )],
    );
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        "-F",
        "base=linux",
        "-F",
        "lang=c",
        "-F",
        "mounts=/data",
        "http://localhost/images/linuxhello/create",
    ]);
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["Name"], "linuxhello");
    assert_eq!(v["RunSpec"]["Compiler"], "linux-c-ember");
    assert_eq!(v["RunSpec"]["DeviceMappings"][0]["MountPoint"], "/data");
    assert_eq!(v["StageSpec"]["ImageFormat"], "bzimage+initramfs");
    // The same name again needs force.
    let (c, _) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        "-F",
        "base=linux",
        "-F",
        "lang=c",
        "http://localhost/images/linuxhello/create",
    ]);
    assert_eq!(c, 409);
    // A compile error is the user's: 400 with gcc's words.
    let bad = make_tar(d.dir.path(), &[("main.c", b"int main( { syntax error\n")]);
    let form_bad = format!("tarfile=@{}", bad.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form_bad,
        "-F",
        "provider=ember",
        "-F",
        "base=linux",
        "-F",
        "lang=c",
        "http://localhost/images/broken/create",
    ]);
    assert_eq!(c, 400, "{v}");
    assert!(v["Error"].as_str().unwrap().contains("error"), "{v}");
    // Unknown lang lists what exists.
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        "-F",
        "base=linux",
        "-F",
        "lang=go",
        "http://localhost/images/golang/create",
    ]);
    assert_eq!(c, 400);
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .contains("available langs: binary, c"),
        "{v}"
    );
    // Without a Linux kernel on this host the run is refused clearly; with
    // one, it would boot where KVM can run Linux (not on this machine).
    let (c, _) = d.json(&["-X", "POST", "http://localhost/volumes/d1?size=4"]);
    assert_eq!(c, 201);
    let run = r#"{"InstanceName":"l1","ImageName":"linuxhello","Mounts":{"/data":"d1"}}"#;
    let (c, v) = d.json(&["-X", "POST", "-d", run, "http://localhost/instances/run"]);
    if api_has_kernel(&d) {
        eprintln!(
            "skipped: booting Linux needs a KVM that can run Linux; this host's PVM KVM cannot"
        );
    } else {
        assert_eq!(c, 400, "{v}");
        assert!(v["Error"].as_str().unwrap().contains("no kernel"), "{v}");
    }
    // Missing mounts are refused before anything starts.
    let run = r#"{"InstanceName":"l2","ImageName":"linuxhello"}"#;
    let (c, v) = d.json(&["-X", "POST", "-d", run, "http://localhost/instances/run"]);
    assert_eq!(c, 400, "{v}");
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .contains("required mount point missing"),
        "{v}"
    );
    assert_eq!(
        d.curl(&[
            "-X",
            "DELETE",
            "http://localhost/images/linuxhello?force=true"
        ])
        .0,
        204
    );
}

fn api_has_kernel(d: &Emberd) -> bool {
    let _ = d;
    std::env::var_os("EMBER_LINUX_KERNEL").is_some()
        || Path::new("/var/lib/ember/kernels/vmlinuz").exists()
        || std::fs::read_dir("/boot")
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
            })
            .unwrap_or(false)
}

fn instance_state(d: &Emberd, name: &str) -> String {
    d.json(&[&format!("http://localhost/instances/{name}")]).1["State"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn wait_state(d: &Emberd, name: &str, want: &str) {
    let ok = wait_for(PATIENCE, || (instance_state(d, name) == want).then_some(()));
    assert!(
        ok.is_some(),
        "{name} never reached {want}: {}",
        instance_state(d, name)
    );
}

const HELLO_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    printf("hello from ember, argc=%d\n", argc);
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    return 0;
}
"#;

#[test]
fn hello_unikernel_compiles_runs_logs_and_is_cleaned_up() {
    let d = start();
    let img = d.c_image("hello", HELLO_C, &["args=one two"]);
    assert_eq!(img["RunSpec"]["Compiler"], "ember-c-ember");
    let inst = d.run_instance(
        &serde_json::json!({"InstanceName": "hello-1", "ImageName": "hello",
                           "Env": {"GREETING": "hi there"}, "MemoryMb": 32}),
    );
    assert_eq!(inst["Name"], "hello-1");
    assert_eq!(inst["ImageId"], img["Id"]);
    let id = inst["Id"].as_str().unwrap().to_string();
    // The program runs to its end; the instance then reads stopped.
    let l = d.wait_logs("hello-1", "ember: exit 0");
    assert!(l.contains("hello from ember, argc=3"), "{l}");
    assert!(l.contains("arg 1: one") && l.contains("arg 2: two"), "{l}");
    assert!(l.contains("GREETING=hi there"), "{l}");
    wait_state(&d, "hello-1", "stopped");
    // It can be started again.
    let (c, v) = d.json(&["-X", "POST", "http://localhost/instances/hello-1/start"]);
    assert_eq!(c, 200, "{v}");
    wait_state(&d, "hello-1", "stopped");
    assert_eq!(d.logs("hello-1").matches("ember: exit 0").count(), 2);
    // Delete leaves no process, jail or log behind.
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/hello-1"])
            .0,
        204
    );
    assert_eq!(d.json(&["http://localhost/instances/hello-1"]).0, 404);
    assert!(vmm_processes(&id).is_empty());
    assert!(!d.dir.join("jail").join("ember-vmm").join(&id).exists());
    assert!(!d
        .dir
        .join("state")
        .join("logs")
        .join(format!("{id}.log"))
        .exists());
    // The image can go now.
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/images/hello"]).0,
        204
    );
}

#[test]
fn running_instance_survives_emberd_kill_9_and_stops_cleanly() {
    let mut d = start();
    d.c_image("idle", IDLE_C, &[]);
    let inst = d.run_instance(&serde_json::json!({"InstanceName": "idle-1", "ImageName": "idle"}));
    let id = inst["Id"].as_str().unwrap().to_string();
    d.wait_logs("idle-1", "idle instance up");
    assert_eq!(instance_state(&d, "idle-1"), "running");
    let pids = vmm_processes(&id);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // emberd dies hard; the VMM does not.
    d.kill9();
    assert_eq!(vmm_processes(&id), pids);
    d.restart();
    assert_eq!(instance_state(&d, "idle-1"), "running");
    // Deleting a running instance needs force; stop works on the adopted VMM.
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/idle-1"])
            .0,
        409
    );
    let (c, v) = d.json(&["-X", "POST", "http://localhost/instances/idle-1/stop"]);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["State"], "stopped");
    assert!(vmm_processes(&id).is_empty());
    assert!(!d.dir.join("jail").join("ember-vmm").join(&id).exists());
    // Start again, then a forced delete of the running instance.
    let (c, _) = d.json(&["-X", "POST", "http://localhost/instances/idle-1/start"]);
    assert_eq!(c, 200);
    wait_state(&d, "idle-1", "running");
    assert_eq!(vmm_processes(&id).len(), 1);
    assert_eq!(
        d.curl(&[
            "-X",
            "DELETE",
            "http://localhost/instances/idle-1?force=true"
        ])
        .0,
        204
    );
    assert!(vmm_processes(&id).is_empty());
    assert!(!d.dir.join("jail").join("ember-vmm").join(&id).exists());
}

#[test]
fn logs_follow_streams_and_delete_on_disconnect() {
    let d = start();
    d.c_image("idle", IDLE_C, &[]);
    let inst = d.run_instance(&serde_json::json!({"InstanceName": "f1", "ImageName": "idle"}));
    let id = inst["Id"].as_str().unwrap().to_string();
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"GET /instances/f1/logs?fallow=true&delete=true HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // Read the chunked stream until the guest's line shows up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let found = loop {
        use std::io::Read;
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break false;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if text.contains("idle instance up") {
            assert!(
                text.contains("Transfer-Encoding: chunked")
                    || text.contains("transfer-encoding: chunked"),
                "{text}"
            );
            break true;
        }
    };
    assert!(found, "{}", String::from_utf8_lossy(&got));
    // The client leaves: the instance goes with it.
    drop(s);
    let gone = wait_for(PATIENCE, || {
        (d.json(&["http://localhost/instances/f1"]).0 == 404).then_some(())
    });
    assert!(
        gone.is_some(),
        "instance not deleted after the log client left"
    );
    assert!(vmm_processes(&id).is_empty());
}

#[test]
fn a_volume_from_a_tar_is_read_by_the_guest() {
    let d = start();
    let reader = r#"#include <stdio.h>
#include <ember.h>
int main(void) {
    char buf[256];
    long n = ember_read_file("/data/greeting.txt", buf, sizeof buf - 1);
    if (n < 0) { printf("read failed: %s\n", ember_strerror(n)); return 1; }
    buf[n] = 0;
    printf("volume says: %s", buf);
    return 0;
}
"#;
    d.c_image("reader", reader, &["mounts=/data"]);
    let tgz = make_tar(
        d.dir.path(),
        &[("greeting.txt", b"hello from a tar volume\n")],
    );
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&["-X", "POST", "-F", &form, "http://localhost/volumes/greet"]);
    assert_eq!(c, 201, "{v}");
    // Without the volume the run is refused.
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        r#"{"InstanceName":"r0","ImageName":"reader"}"#,
        "http://localhost/instances/run",
    ]);
    assert_eq!(c, 400, "{v}");
    d.run_instance(&serde_json::json!({"InstanceName": "r1", "ImageName": "reader", "Mounts": {"/data": "greet"}}),
    );
    let l = d.wait_logs("r1", "ember: exit");
    assert!(l.contains("volume says: hello from a tar volume"), "{l}");
    assert!(l.contains("ember: exit 0"), "{l}");
    wait_state(&d, "r1", "stopped");
    // The volume is attached; detach and attach again (instance stopped).
    let (_, v) = d.json(&["http://localhost/volumes/greet"]);
    assert!(
        v["Attachment"].as_str().unwrap().starts_with("inst-"),
        "{v}"
    );
    assert_eq!(
        d.json(&["-X", "DELETE", "http://localhost/volumes/greet"])
            .0,
        409
    );
    let (c, body) = d.curl(&["-X", "POST", "http://localhost/volumes/greet/detach"]);
    assert_eq!((c, body.as_str()), (202, "greet"));
    let (c, body) = d.curl(&[
        "-X",
        "POST",
        "http://localhost/volumes/greet/attach/r1?mount=/data",
    ]);
    assert_eq!((c, body.as_str()), (202, "greet"));
    let (c, _) = d.json(&["-X", "POST", "http://localhost/instances/r1/start"]);
    assert_eq!(c, 200);
    wait_state(&d, "r1", "stopped");
    assert_eq!(
        d.logs("r1")
            .matches("volume says: hello from a tar volume")
            .count(),
        2
    );
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/r1"]).0,
        204
    );
    assert_eq!(
        d.json(&["http://localhost/volumes/greet"]).1["Attachment"],
        ""
    );
}

#[test]
fn builds_run_unprivileged_and_cannot_read_host_secrets() {
    let d = start();
    // gcc runs in a sandbox job whose root holds only the toolchain, the
    // sources and /out: /etc/shadow is not there to read.
    let tgz = make_tar(
        d.dir.path(),
        &[(
            "main.c",
            b"#include \"/etc/shadow\"\nint main(void){return 0;}\n",
        )],
    );
    let form = format!("tarfile=@{}", tgz.display());
    // A response-file source would run a shell as the build user if gcc
    // were given its bare name.
    let marker = std::env::temp_dir().join(format!("PWNED-{}-emberd", std::process::id()));
    let opts = format!("-wrapper /bin/sh,-c,touch {}\n", marker.display());
    let rsp = make_tar(
        &d.dir.path().join("rsp"),
        &[
            ("@opts.c", opts.as_bytes()),
            ("-o.c", b"int helper(void){return 1;}\n"),
            (
                "main.c",
                b"int helper(void);\nint main(void){return helper();}\n",
            ),
        ],
    );
    let rsp_form = format!("tarfile=@{}", rsp.display());
    for base in ["ember", "linux"] {
        let (c, v) = d.json(&[
            "-X",
            "POST",
            "-F",
            &form,
            "-F",
            "provider=ember",
            "-F",
            &format!("base={base}"),
            "-F",
            "lang=c",
            &format!("http://localhost/images/leak-{base}/create"),
        ]);
        assert_eq!(c, 400, "{base}: {v}");
        let msg = v["Error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("/etc/shadow: No such file or directory"),
            "{base}: {msg}"
        );
        assert!(!msg.contains("root:"), "{base}: host secret leaked: {msg}");
        let (c, v) = d.json(&[
            "-X",
            "POST",
            "-F",
            &rsp_form,
            "-F",
            "provider=ember",
            "-F",
            &format!("base={base}"),
            "-F",
            "lang=c",
            &format!("http://localhost/images/rsp-{base}/create"),
        ]);
        assert_eq!(c, 400, "{base}: {v}");
        let msg = v["Error"].as_str().unwrap_or_default();
        assert!(msg.contains("@opts.c"), "{base}: {msg}");
        assert!(
            !marker.exists(),
            "{base}: gcc ran the response file's wrapper"
        );
    }
}

/// A header that includes itself twice: gcc recurses to its include depth
/// limit over and over and runs for hours with little memory.
const INCLUDE_BOMB: &[(&str, &[u8])] = &[
    ("main.c", b"#include \"x.h\"\nint main(void){return 0;}\n"),
    ("x.h", b"#include \"x.h\"\n#include \"x.h\"\n"),
];

/// Pids of the processes running as a uid in `range` (zombies excluded).
fn processes_of(range: std::ops::RangeInclusive<u32>) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            st.lines()
                .find(|l| l.starts_with(k))
                .unwrap_or("")
                .to_string()
        };
        let uid: u32 = field("Uid:")
            .split_whitespace()
            .nth(1)
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        if range.contains(&uid) && !field("State:").contains('Z') {
            out.push((
                pid,
                field("Name:")
                    .trim_start_matches("Name:")
                    .trim()
                    .to_string(),
            ));
        }
    }
    out
}

#[test]
fn a_hung_build_is_stopped_by_the_job_timeout() {
    let d = Emberd::start("emberd-jobtimeout", 10501, &["--job-timeout-secs", "3"]);
    let tgz = make_tar(d.dir.path(), INCLUDE_BOMB);
    let form = format!("tarfile=@{}", tgz.display());
    for base in ["linux", "ember"] {
        let started = std::time::Instant::now();
        let (c, v) = d.json(&[
            "-X",
            "POST",
            "-F",
            &form,
            "-F",
            "provider=ember",
            "-F",
            &format!("base={base}"),
            "-F",
            "lang=c",
            &format!("http://localhost/images/bomb-{base}/create"),
        ]);
        assert_eq!(c, 400, "{base}: {v}");
        let msg = v["Error"].as_str().unwrap_or_default();
        assert!(msg.contains("did not finish within 3"), "{base}: {msg}");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
    }
}

/// A `kill -9` of emberd takes a running build down with it: the job's
/// setup process dies of its parent-death signal, then its PID namespace.
#[test]
fn a_build_dies_with_emberd_kill_9() {
    let range = 29950..=29959;
    let mut d = Emberd::start("emberd-k9build", 10501, &["--job-uid-range", "29950-29959"]);
    let tgz = make_tar(d.dir.path(), INCLUDE_BOMB);
    let form = format!("tarfile=@{}", tgz.display());
    let mut curl = Command::new("curl")
        .args(["-s", "--max-time", "300", "--unix-socket"])
        .arg(&d.sock)
        .args([
            "-X",
            "POST",
            "-F",
            &form,
            "-F",
            "provider=ember",
            "-F",
            "base=linux",
        ])
        .args(["-F", "lang=c", "http://localhost/images/k9/create"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !processes_of(range.clone()).iter().any(|(_, n)| n == "cc1") {
        assert!(
            std::time::Instant::now() < deadline,
            "cc1 never started: {:?}",
            processes_of(range.clone())
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.kill9();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = processes_of(range.clone());
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build outlived emberd: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = curl.kill();
    let _ = curl.wait();
}

/// Booting a `linux` image needs a KVM that runs Linux. This host's KVM is
/// nested "PVM", which emulates guest ring 0 and stops Linux with
/// KVM_EXIT_INTERNAL_ERROR (xsave/SSE), so the test is ignored here with
/// that reason; run it with `--include-ignored` on real hardware with a
/// kernel at $EMBER_LINUX_KERNEL.
#[test]
#[ignore = "needs a KVM that can boot Linux (this host's nested PVM KVM cannot) and a kernel in EMBER_LINUX_KERNEL"]
fn linux_image_boots_where_kvm_runs_linux() {
    assert!(
        std::env::var_os("EMBER_LINUX_KERNEL").is_some(),
        "set EMBER_LINUX_KERNEL to a bzImage/vmlinux"
    );
    let d = start();
    let tgz = make_tar(
        d.dir.path(),
        &[(
            "main.c",
            b"#include <stdio.h>\n#include <unistd.h>\n#include <sys/reboot.h>\nint main(int c, char **v) { printf(\"linux init says hello, argc=%d\\n\", c); fflush(stdout); reboot(RB_AUTOBOOT); return 0; }\n",
        )],
    );
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        "-F",
        "base=linux",
        "-F",
        "lang=c",
        "-F",
        "args=a b",
        "http://localhost/images/lx/create",
    ]);
    assert_eq!(c, 201, "{v}");
    d.run_instance(
        &serde_json::json!({"InstanceName": "lx-1", "ImageName": "lx", "MemoryMb": 256}),
    );
    let l = d.wait_logs("lx-1", "linux init says hello");
    assert!(l.contains("argc=3"), "{l}");
}

fn files_named(dir: &Path, name: &str, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_named(&p, name, out);
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
}

/// A `linux-c` image for Debian's modular cloud kernel: refused at build time
/// while the kernel's modules are not installed (its config-<version> shows
/// virtio as modules), and built with the module closure and its load list
/// once they are.
#[test]
fn a_linux_image_for_a_modular_kernel_carries_its_modules_or_is_refused() {
    let Some((kernel, root)) = debian_kernel_package() else {
        return;
    };
    let mut d = Emberd::start("emberd-kmod", 10501, &[]);
    let empty = d.dir.join("no-modules");
    std::fs::create_dir_all(&empty).unwrap();
    d.env = vec![
        ("EMBER_LINUX_KERNEL".into(), kernel.display().to_string()),
        ("EMBER_MODULES_ROOT".into(), empty.display().to_string()),
    ];
    d.kill9();
    d.restart();
    let tgz = make_tar(
        d.dir.path(),
        &[("main.c", b"int main(void) { return 0; }\n" as &[u8])],
    );
    let form = format!("tarfile=@{}", tgz.display());
    let create = |d: &Emberd, name: &str| {
        d.json(&[
            "-X",
            "POST",
            "-F",
            &form,
            "-F",
            "provider=ember",
            "-F",
            "base=linux",
            "-F",
            "lang=c",
            &format!("http://localhost/images/{name}/create"),
        ])
    };
    let (c, v) = create(&d, "nomods");
    assert_eq!(c, 500, "{v}");
    let msg = v["Error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("as modules")
            && msg.contains("virtio_mmio")
            && msg.contains("no module directory"),
        "{v}"
    );
    let (c, _) = d.json(&["http://localhost/images/nomods"]);
    assert_eq!(c, 404, "a refused build leaves no image");

    d.env[1].1 = root.display().to_string();
    d.kill9();
    d.restart();
    let (c, v) = create(&d, "withmods");
    assert_eq!(c, 201, "{v}");
    let mut found = Vec::new();
    files_named(&d.dir.join("state"), "initrd.img", &mut found);
    assert_eq!(found.len(), 1, "{found:?}");
    let out = Command::new("gzip")
        .arg("-dc")
        .arg("--")
        .arg(&found[0])
        .output()
        .unwrap();
    assert!(out.status.success(), "the initramfs is gzip");
    let cpio = out.stdout;
    let has = |s: &str| cpio.windows(s.len()).any(|w| w == s.as_bytes());
    for name in [
        "etc/ember-modules",
        "ember/init",
        "/virtio_mmio.ko",
        "/virtio_blk.ko",
        "/virtio_net.ko",
        "/vmw_vsock_virtio_transport.ko",
    ] {
        assert!(has(name), "the initramfs has no {name}");
    }
}

/// The entries of an instance's jail root while it runs.
fn jail_root_entries(d: &Emberd, id: &str) -> Vec<String> {
    let root = d.dir.join("jail").join("ember-vmm").join(id).join("root");
    let mut v: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_static_vmm_enters_its_jail_alone_and_a_dynamic_one_brings_its_libraries() {
    for (extra, linkage) in [
        (None, "statically linked"),
        (Some(bin("ember-vmm")), "dynamically linked"),
    ] {
        let vmm_arg = extra.as_ref().map(|p| p.display().to_string());
        let args: Vec<&str> = match &vmm_arg {
            Some(p) => vec!["--vmm", p],
            None => vec![],
        };
        let d = Emberd::start("emberd-linkage", 10501, &args);
        assert!(d.err().contains(linkage), "{}", d.err());
        d.c_image("idle", IDLE_C, &[]);
        let inst = d.run_instance(&serde_json::json!({"InstanceName": "l1", "ImageName": "idle"}));
        d.wait_logs("l1", "idle instance up");
        let id = inst["Id"].as_str().unwrap();
        let entries = jail_root_entries(&d, id);
        let has_libs = entries.iter().any(|e| e.starts_with("lib") || e == "usr");
        match extra {
            None => assert!(
                !has_libs,
                "host libraries in a static VMM's jail: {entries:?}"
            ),
            Some(_) => assert!(
                has_libs,
                "no libraries in a dynamic VMM's jail: {entries:?}"
            ),
        }
        assert_eq!(
            d.curl(&["-X", "DELETE", "http://localhost/instances/l1?force=true"])
                .0,
            204
        );
    }
}
