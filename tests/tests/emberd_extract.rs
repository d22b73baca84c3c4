//! Archive extraction runs in a sandbox job (the hardening issue: one
//! sandbox for every piece of work on untrusted bytes, "tar, OCI and
//! docker-save extraction" included).
//!
//! What is observed: while emberd extracts an archive with many entries, a
//! watcher scans `/proc` for the extraction child (`/ember/emberd
//! __sandboxed-extract ...`, emberd's binary as bound into the job) and
//! records its uid and its pids in each pid namespace. The extraction is
//! proven to run in a job when that process is not emberd, runs as a uid of
//! the job range, and is pid 1 of a pid namespace of its own. Afterwards no
//! file anywhere under emberd's state is left to a job uid (the tree was
//! handed back before use), and what was extracted is what the archive held.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ember_tests::*;
use serde_json::{json, Value};

/// emberd's default job uid range.
const JOB_UIDS: std::ops::RangeInclusive<u32> = 20000..=20999;
/// Entries that keep an extraction busy long enough to be seen.
const MANY: usize = 20_000;

/// An extraction child seen in `/proc`.
#[derive(Debug, Clone)]
struct Seen {
    pid: u32,
    uid: u32,
    /// `NSpid`: its pid in each pid namespace, outermost first.
    nspid: Vec<u32>,
    args: Vec<String>,
}

/// Scans `/proc` until stopped, collecting extraction children.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Seen>>>,
}

impl Watcher {
    fn start() -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen: Vec<Seen> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                for pid in std::fs::read_dir("/proc")
                    .unwrap()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                {
                    if seen.iter().any(|x| x.pid == pid) {
                        continue;
                    }
                    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                        continue;
                    };
                    if !cmd.starts_with(b"/ember/emberd\0__sandboxed-extract\0") {
                        continue;
                    }
                    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                        continue;
                    };
                    let field = |name: &str| -> Vec<u32> {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix(name))
                            .map(|r| {
                                r.split_whitespace()
                                    .filter_map(|n| n.parse().ok())
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                    seen.push(Seen {
                        pid,
                        uid: field("Uid:").first().copied().unwrap_or(0),
                        nspid: field("NSpid:"),
                        args: String::from_utf8_lossy(&cmd)
                            .split('\0')
                            .map(String::from)
                            .collect(),
                    });
                }
            }
            seen
        });
        Watcher {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Asserts that `seen` holds an extraction child that ran sandboxed: not
/// emberd, a job uid, pid 1 of its own pid namespace; with `max_bytes` as
/// its byte limit.
fn assert_sandboxed(d: &Emberd, seen: &[Seen], max_bytes: &str) {
    let emberd = d.proc_.as_ref().unwrap().pid();
    let s = seen
        .iter()
        .find(|s| s.args.get(3).map(String::as_str) == Some(max_bytes))
        .unwrap_or_else(|| panic!("no extraction child with limit {max_bytes} seen: {seen:?}"));
    assert_ne!(s.pid, emberd, "{s:?}");
    assert!(
        JOB_UIDS.contains(&s.uid),
        "the extraction ran as uid {}: {s:?}",
        s.uid
    );
    assert_eq!(s.nspid.len(), 2, "not in a pid namespace of its own: {s:?}");
    assert_eq!(s.nspid[1], 1, "not the init of its pid namespace: {s:?}");
}

/// No file under emberd's directory belongs to a job uid.
fn assert_nothing_left_to_jobs(d: &Emberd) {
    let mut stack = vec![d.dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        assert!(
            !JOB_UIDS.contains(&md.uid()),
            "{} belongs to job uid {}",
            p.display(),
            md.uid()
        );
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
}

/// Runs `python3 -c script OUT SPEC_FILE` with `spec` written to
/// `OUT.json`; asserts success.
fn py(script: &str, out: &Path, spec: &Value) {
    let spec_file = out.with_extension("json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(out)
        .arg(&spec_file)
        .status()
        .expect("python3");
    assert!(st.success(), "python3 failed");
}

/// A tar.gz at `out` with `files` (path, content) and `junk` empty files
/// below `junk/`.
fn tar_with_junk(out: &Path, files: &[(&str, &str)], junk: usize) {
    let spec = json!({"files": files, "junk": junk});
    py(
        r#"
import io, json, sys, tarfile
out, spec = sys.argv[1], json.load(open(sys.argv[2]))
with tarfile.open(out, "w:gz", compresslevel=1) as t:
    for path, content in spec["files"]:
        data = content.encode()
        ti = tarfile.TarInfo(path); ti.size = len(data); ti.mode = 0o644
        t.addfile(ti, io.BytesIO(data))
    for i in range(spec["junk"]):
        t.addfile(tarfile.TarInfo("junk/d%d/f%d" % (i // 1000, i)), io.BytesIO(b""))
"#,
        out,
        &spec,
    );
}

fn start(tag: &str) -> Emberd {
    Emberd::start(tag, 10720, &["--job-timeout-secs", "300"])
}

#[test]
fn unik_volume_and_image_build_extract_in_a_sandbox_job() {
    let d = start("extract-unik");
    // A volume from a tar: 20 000 entries keep the extraction busy.
    let tgz = d.dir.join("vol.tgz");
    tar_with_junk(&tgz, &[("hello.txt", "hello sandboxed volume\n")], MANY);
    let w = Watcher::start();
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "http://localhost/volumes/many?size=64",
    ]);
    let seen = w.finish();
    assert_eq!(c, 201, "{v}");
    // A volume of 64 MiB may hold 64 MiB: the limit the child was given.
    assert_sandboxed(&d, &seen, &(64u64 << 20).to_string());
    let id = v["Id"].as_str().unwrap();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{id}.img"));
    let cat = |what: &str| {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(what)
            .arg(&img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(cat("cat /hello.txt"), "hello sandboxed volume\n");
    assert!(
        cat("ls -l /junk/d19").contains("f19999"),
        "the last junk file is in the volume"
    );

    // An image build: its source tar is extracted the same way, then built.
    let src = d.dir.join("src.tgz");
    let main_c = "int main(void) { return 0; }\n";
    tar_with_junk(&src, &[("main.c", main_c)], MANY);
    let w = Watcher::start();
    let form = format!("tarfile=@{}", src.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        "-F",
        "provider=ember",
        "-F",
        "base=ember",
        "-F",
        "lang=c",
        "http://localhost/images/many/create",
    ]);
    let seen = w.finish();
    assert_eq!(c, 201, "{v}");
    // Uploads get the default limit of 2 GiB.
    assert_sandboxed(&d, &seen, &(2u64 << 30).to_string());
    assert_nothing_left_to_jobs(&d);
}

#[test]
fn bad_archives_keep_their_statuses_and_messages() {
    let d = start("extract-bad");
    let upload = |path: &str, tgz: &Path| {
        let form = format!("tarfile=@{}", tgz.display());
        let mut args = vec!["-X", "POST", "-F", &form];
        let url = format!("http://localhost{path}");
        if path.starts_with("/images/") {
            args.extend(["-F", "provider=ember", "-F", "base=ember", "-F", "lang=c"]);
        }
        args.push(&url);
        let (c, v) = d.json(&args);
        (c, v["Error"].as_str().unwrap_or_default().to_string())
    };
    // A `..` entry: refused by the rules, inside the job, as before.
    let evil = d.dir.join("evil.tgz");
    tar_with_junk(
        &evil,
        &[("main.c", "int main(void){return 0;}\n"), ("../evil", "x")],
        0,
    );
    let (c, e) = upload("/images/evil/create", &evil);
    assert_eq!(c, 400, "{e}");
    assert_eq!(
        e,
        "tarfile: archive entry \"../evil\" contains a '..' component"
    );
    let mut stack = vec![d.dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        assert_ne!(
            p.file_name().unwrap(),
            "evil",
            "{} was written",
            p.display()
        );
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    // More than the volume's size: TooLarge is still a 400.
    let big = d.dir.join("big.tgz");
    tar_with_junk(&big, &[("big.txt", &"x".repeat(2 << 20))], 0);
    let (c, e) = upload("/volumes/big?size=1", &big);
    assert_eq!(c, 400, "{e}");
    assert_eq!(e, "tarfile: archive unpacks to more than 1048576 bytes");
    // Not a tar at all: the same message, no bytes of the file.
    let junk = d.dir.join("junk.tgz");
    std::fs::write(&junk, "SECRET-ISH ".repeat(100)).unwrap();
    let (c, e) = upload("/volumes/junk", &junk);
    assert_eq!(c, 400, "{e}");
    assert_eq!(
        e,
        "tarfile: cannot read archive: corrupt tar header (is it a tar archive?)"
    );
    // An absolute symlink in a docker-save tarball: the store's 400.
    let abs = d.dir.join("abs.tar");
    py(
        r#"
import sys, tarfile
with tarfile.open(sys.argv[1], "w") as t:
    ti = tarfile.TarInfo("manifest.json"); ti.type = tarfile.SYMTYPE; ti.linkname = "/etc/shadow"
    t.addfile(ti)
"#,
        &abs,
        &json!({}),
    );
    let r = http(
        &d.sock,
        "POST",
        &format!(
            "/image/create?imageName={}",
            urlencode(abs.to_str().unwrap())
        ),
        None,
    );
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 400, "{body}");
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(
        last["error"],
        "bad parameter: image tarball: link \"manifest.json\" -> \"/etc/shadow\" is refused: absolute symlink target"
    );
    assert_nothing_left_to_jobs(&d);
}

/// A `docker save` tarball (legacy layout: manifest.json, <config>.json,
/// <id>/layer.tar) with one layer holding `files`, plus `junk` empty files
/// the loader ignores.
fn docker_save(out: &Path, tag: &str, files: &[(&str, &str)], junk: usize) {
    let spec = json!({"tag": tag, "files": files, "junk": junk});
    py(
        r#"
import hashlib, io, json, sys, tarfile
out, spec = sys.argv[1], json.load(open(sys.argv[2]))
lbuf = io.BytesIO()
with tarfile.open(fileobj=lbuf, mode="w") as t:
    for path, content in spec["files"]:
        data = content.encode()
        ti = tarfile.TarInfo(path); ti.size = len(data); ti.mode = 0o755
        t.addfile(ti, io.BytesIO(data))
layer = lbuf.getvalue()
diff = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({"architecture": "amd64", "os": "linux",
    "config": {"Cmd": ["/hello"]}, "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
cid = hashlib.sha256(config).hexdigest()
lid = hashlib.sha256(layer).hexdigest()
manifest = json.dumps([{"Config": cid + ".json", "RepoTags": [spec["tag"]],
    "Layers": [lid + "/layer.tar"]}]).encode()
def add(t, name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mode = 0o644
    t.addfile(ti, io.BytesIO(data))
with tarfile.open(out, "w") as t:
    add(t, "manifest.json", manifest)
    add(t, cid + ".json", config)
    add(t, lid + "/layer.tar", layer)
    for i in range(spec["junk"]):
        t.addfile(tarfile.TarInfo("junk/d%d/f%d" % (i // 1000, i)), io.BytesIO(b""))
"#,
        out,
        &spec,
    );
}

#[test]
fn hyperd_docker_save_import_extracts_in_a_sandbox_job() {
    let d = start("extract-docker");
    let tarball = d.dir.join("saved.tar");
    docker_save(
        &tarball,
        "saved:1",
        &[
            ("hello", "#!/bin/sh\necho hi\n"),
            ("etc/motd", "sandboxed\n"),
        ],
        MANY,
    );
    let w = Watcher::start();
    let path = format!(
        "/image/create?imageName={}",
        urlencode(tarball.to_str().unwrap())
    );
    let r = http(&d.sock, "POST", &path, None);
    let seen = w.finish();
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, 200, "{body}");
    // The store's limits: the defaults.
    assert_sandboxed(&d, &seen, &(2u64 << 30).to_string());
    // The image is stored with its layer: push it to a layout and look.
    let pushed = d.dir.join("pushed");
    let (c, v) = d.req(
        "POST",
        &format!(
            "/image/push?remote={}&tag=saved:1",
            urlencode(pushed.to_str().unwrap())
        ),
        None,
    );
    assert_eq!(c, 200, "{v}");
    let index: Value =
        serde_json::from_slice(&std::fs::read(pushed.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(1),
        "{index}"
    );
    // The scratch directory of the tarball is gone, and nothing is a job's.
    assert_nothing_left_to_jobs(&d);
    let (c, v) = d.req("DELETE", "/image?imageId=saved:1", None);
    assert_eq!(c, 200, "{v}");
}

#[test]
fn hub_pull_extracts_in_a_sandbox_job() {
    let moto = MotoServer::start();
    let d = start("extract-hub");
    let img = d.c_image("hubbed", "int main(void) { return 0; }\n", &[]);
    let hub =
        json!({"url": format!("{}/unikhub", moto.url()), "user": "AKIDEXAMPLE", "pass": "secret"})
            .to_string();
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        &hub,
        "http://localhost/images/push/hubbed",
    ]);
    assert_eq!(c, 202, "push: {v}");
    // The pushed archive, with many more (harmless) entries, under the
    // same metadata: its extraction is then long enough to be seen.
    let st = Command::new(python())
        .arg("-c")
        .arg(
            r#"
import gzip, io, sys, tarfile, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret")
key = "AKIDEXAMPLE/hubbed/latest"
obj = s3.get_object(Bucket="unikhub", Key=key)
old = tarfile.open(fileobj=io.BytesIO(obj["Body"].read()), mode="r:*")
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:
    for m in old.getmembers():
        t.addfile(m, old.extractfile(m) if m.isfile() else None)
    for i in range(int(sys.argv[2])):
        t.addfile(tarfile.TarInfo("junk/d%d/f%d" % (i // 1000, i)), io.BytesIO(b""))
s3.put_object(Bucket="unikhub", Key=key, Body=buf.getvalue(), Metadata=obj["Metadata"])
"#,
        )
        .arg(moto.url())
        .arg(MANY.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "rewriting the hub object failed");
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/images/hubbed"])
            .0,
        204
    );
    let w = Watcher::start();
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        &hub,
        "http://localhost/images/pull/hubbed?provider=ember",
    ]);
    let seen = w.finish();
    assert_eq!(c, 202, "pull: {v}");
    assert_sandboxed(&d, &seen, &(2u64 << 30).to_string());
    let (c, got) = d.json(&["http://localhost/images/hubbed"]);
    assert_eq!(c, 200, "{got}");
    assert_eq!(got["RunSpec"], img["RunSpec"]);
    assert_nothing_left_to_jobs(&d);
}
