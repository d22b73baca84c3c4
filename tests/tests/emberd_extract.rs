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
//!
//! OCI layer application (Flintlock kernels and volumes, hyperd container
//! root disks) is watched the same way: its child is `/ember/emberd
//! __sandboxed-unpack REQUEST`, and the ext4 image built from its tree
//! holds the layers with their whiteouts and the owners and special modes
//! only root can set.

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

/// Scans `/proc` until stopped, collecting extraction (or, with
/// [`Watcher::start_for`], unpack) children.
struct Watcher {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Seen>>>,
}

impl Watcher {
    fn start() -> Watcher {
        Watcher::start_for(b"/ember/emberd\0__sandboxed-extract\0")
    }

    /// Collects the processes whose command line starts with `prefix`.
    fn start_for(prefix: &'static [u8]) -> Watcher {
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
                    if !cmd.starts_with(prefix) {
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
    let s = seen
        .iter()
        .find(|s| s.args.get(3).map(String::as_str) == Some(max_bytes))
        .unwrap_or_else(|| panic!("no extraction child with limit {max_bytes} seen: {seen:?}"));
    assert_job(d, s);
}

/// Asserts that `s` ran sandboxed: not emberd, a job uid, pid 1 of its own
/// pid namespace.
fn assert_job(d: &Emberd, s: &Seen) {
    let emberd = d.proc_.as_ref().unwrap().pid();
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

// ---------------------------------------------------------------------------
// OCI layer application (Flintlock volumes and kernels, hyperd root disks)

/// The unpack child's command line.
const UNPACK: &[u8] = b"/ember/emberd\0__sandboxed-unpack\0";

/// An OCI layout at `out` (below the test's directory: emberd's
/// `--import-dir`). `layers`: each `{"entries": [[path, kind, mode, uid,
/// content]], "junk": n, "gzip": bool}` with kind `f` (content, or
/// `{"from": host_path}`), `d` or `l` (symlink to content); `junk` empty
/// files below `junk/` keep an unpack busy long enough to be seen.
fn oci_layout(out: &Path, reference: &str, layers: Value) {
    let spec = json!({"ref": reference, "layers": layers});
    py(
        r#"
import gzip, hashlib, io, json, os, sys, tarfile
out, spec = sys.argv[1], json.load(open(sys.argv[2]))
os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(out, "blobs", "sha256", d), "wb").write(data)
    return "sha256:" + d, len(data)
layers, diff_ids = [], []
for l in spec["layers"]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, kind, mode, uid, content in l.get("entries", []):
            ti = tarfile.TarInfo(path); ti.mode = mode; ti.uid = ti.gid = uid
            if kind == "d":
                ti.type = tarfile.DIRTYPE; t.addfile(ti)
            elif kind == "l":
                ti.type = tarfile.SYMTYPE; ti.linkname = content; t.addfile(ti)
            else:
                data = open(content["from"], "rb").read() if isinstance(content, dict) else content.encode()
                ti.size = len(data); t.addfile(ti, io.BytesIO(data))
        for i in range(l.get("junk", 0)):
            t.addfile(tarfile.TarInfo("junk/d%d/f%d" % (i // 1000, i)), io.BytesIO(b""))
    raw = buf.getvalue()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    gz = l.get("gzip", True)
    dg, size = blob(gzip.compress(raw, 1) if gz else raw)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else ""),
                   "digest": dg, "size": size})
cdg, csize = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
    "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
mdg, msize = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdg, "size": csize},
    "layers": layers}).encode())
open(os.path.join(out, "oci-layout"), "w").write('{"imageLayoutVersion": "1.0.0"}')
open(os.path.join(out, "index.json"), "w").write(json.dumps({"schemaVersion": 2, "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdg, "size": msize,
     "annotations": {"org.opencontainers.image.ref.name": spec["ref"]}}]}))
"#,
        out,
        &spec,
    );
}

/// A root filesystem in three layers: a deletion, an opaque directory, a
/// file replaced by the top layer, and what only root can set (a setuid
/// root file, a user's home, a sticky /tmp).
fn rootfs_layers(junk: usize) -> Value {
    json!([
        {"entries": [
            ["etc", "d", 0o755, 0, ""], ["etc/hostname", "f", 0o644, 0, "base\n"],
            ["etc/gone", "f", 0o644, 0, "x"], ["data/old/a", "f", 0o644, 0, "a"],
            ["data/keep", "f", 0o644, 0, "k"], ["bin/su", "f", 0o4755, 0, "su"],
            ["bin/app", "f", 0o755, 0, "#!/bin/sh\n"],
            ["home/u", "d", 0o700, 1000, ""], ["home/u/notes", "f", 0o600, 1000, "mine"],
            ["tmp", "d", 0o1777, 0, ""], ["sh", "l", 0o777, 0, "/bin/app"]],
         "junk": junk},
        {"entries": [["etc/.wh.gone", "f", 0o644, 0, ""], ["data/old/.wh..wh..opq", "f", 0o644, 0, ""],
                     ["data/old/b", "f", 0o644, 0, "b"]]},
        {"entries": [["etc/hostname", "f", 0o644, 0, "layer3\n"]], "gzip": false}
    ])
}

/// `debugfs -R cmd img`'s stdout.
fn debugfs(img: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The number after `field` in debugfs's `stat` of `path`.
fn stat_field(img: &Path, path: &str, field: &str) -> String {
    let st = debugfs(img, &format!("stat {path}"));
    st.split(field)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {field} in stat {path}: {st}"))
        .to_string()
}

/// The root filesystem of [`rootfs_layers`], as an ext4 image holds it.
fn check_rootfs(img: &Path, junk: usize) {
    assert_eq!(debugfs(img, "cat /etc/hostname"), "layer3\n");
    let etc = debugfs(img, "ls /etc");
    assert!(!etc.contains("gone") && !etc.contains(".wh."), "{etc}");
    let old = debugfs(img, "ls /data/old");
    assert!(
        old.contains(" b ") || old.contains(" b\n") || old.contains("  b"),
        "{old}"
    );
    assert!(
        !old.contains(" a ") && !old.contains(".wh."),
        "opaque dir not applied: {old}"
    );
    assert_eq!(debugfs(img, "cat /data/keep"), "k");
    assert_eq!(debugfs(img, "cat /home/u/notes"), "mine");
    // Owners and special modes the job could not set, set by emberd.
    assert_eq!(stat_field(img, "/bin/su", "Mode:"), "04755");
    assert_eq!(stat_field(img, "/bin/su", "User:"), "0");
    assert_eq!(stat_field(img, "/home/u", "User:"), "1000");
    assert_eq!(stat_field(img, "/home/u", "Group:"), "1000");
    assert_eq!(stat_field(img, "/home/u", "Mode:"), "0700");
    assert_eq!(stat_field(img, "/home/u/notes", "User:"), "1000");
    assert_eq!(stat_field(img, "/tmp", "Mode:"), "01777");
    assert_eq!(stat_field(img, "/etc/hostname", "User:"), "0");
    assert!(debugfs(img, "stat /sh").contains("Fast link dest: \"/bin/app\""));
    if junk > 0 {
        let last = format!("f{}", junk - 1);
        let dir = format!("ls /junk/d{}", (junk - 1) / 1000);
        assert!(debugfs(img, &dir).contains(&last), "the last junk file");
    }
}

/// The unpack child seen with `file` as the file it was asked for (None:
/// a whole tree).
fn unpack_child<'a>(seen: &'a [Seen], file: Option<&str>) -> &'a Seen {
    seen.iter()
        .find(|s| {
            let req: Value =
                serde_json::from_str(s.args.get(2).map_or("", String::as_str)).unwrap_or_default();
            req["file"].as_str() == file && req["layers"].is_array()
        })
        .unwrap_or_else(|| panic!("no unpack child for {file:?} seen: {seen:?}"))
}

#[test]
fn flintlock_kernel_and_volume_unpack_in_a_sandbox_job() {
    let d = Emberd::start(
        "unpack-flintlock",
        10721,
        &["--job-timeout-secs", "300", "--flintlock-max-retries", "1"],
    );
    let kernel = d.dir.join("kernel-oci");
    oci_layout(
        &kernel,
        "kernel:latest",
        json!([{"entries": [["boot/real", "f", 0o755, 0, {"from": PVH_ELF}],
                            ["boot/vmlinux", "l", 0o777, 0, "/boot/real"]], "junk": MANY}]),
    );
    let root = d.dir.join("root-oci");
    oci_layout(&root, "rootfs:latest", rootfs_layers(MANY));
    let spec = json!({
        "id": "vm1", "namespace": "ns1", "vcpu": 1, "memoryInMb": 1024,
        "kernel": {"image": kernel, "filename": "boot/vmlinux", "cmdline": {"ember.test": "idle"}},
        "rootVolume": {"id": "root", "source": {"containerSource": root}},
    });
    let w = Watcher::start_for(UNPACK);
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&spec.to_string()));
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let state = wait_for(SLOW_PATIENCE, || {
        let (_, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        let s = v["microvm"]["status"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (s == "CREATED" || s == "FAILED").then_some(v)
    })
    .expect("reconciled");
    let seen = w.finish();
    assert_eq!(state["microvm"]["status"]["state"], "CREATED", "{state}");
    // The kernel was found, and the root volume built, by unpack children
    // that were jobs.
    assert_job(&d, unpack_child(&seen, Some("boot/vmlinux")));
    assert_job(&d, unpack_child(&seen, None));
    let vols = http(&d.sock, "GET", "/volumes", None).json();
    let rootvol = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"].as_str().unwrap().ends_with("-root"))
        .expect("root volume")["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{rootvol}.img"));
    check_rootfs(&img, MANY);
    assert_nothing_left_to_jobs(&d);
    let (c, _) = d.req("DELETE", &format!("/v1alpha1/microvm/{uid}"), None);
    assert_eq!(c, 200);
}

#[test]
fn hyperd_container_root_disk_unpacks_in_a_sandbox_job() {
    let agent = bin("ember-agent");
    let d = Emberd::start(
        "unpack-pod",
        10722,
        &[
            "--job-timeout-secs",
            "300",
            "--pod-kernel",
            PVH_ELF,
            "--pod-boot-args",
            "ember.test=pod-agent",
            "--pod-agent",
            agent.to_str().unwrap(),
            "--pod-rootfs-mb",
            "128",
            "--pod-stop-timeout",
            "1",
        ],
    );
    let layout = d.dir.join("app-oci");
    oci_layout(&layout, "app:1", rootfs_layers(MANY));
    let r = http(
        &d.sock,
        "POST",
        &format!(
            "/image/create?imageName={}",
            urlencode(layout.to_str().unwrap())
        ),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let spec = json!({"id": "p", "resource": {"vcpu": 1, "memory": 64},
                      "containers": [{"name": "app", "image": "app:1"}]});
    let (c, v) = d.req(
        "POST",
        &format!("/pod/create?podArgs={}", urlencode(&spec.to_string())),
        None,
    );
    assert_eq!(c, 201, "{v}");
    let pod = v["ID"].as_str().unwrap().to_string();
    let w = Watcher::start_for(UNPACK);
    let (c, v) = d.req("POST", &format!("/pod/start?podId={pod}"), None);
    let seen = w.finish();
    assert_eq!(c, 200, "{v}");
    assert_job(&d, unpack_child(&seen, None));
    let (c, v) = d.req("POST", &format!("/pod/stop?podId={pod}&stopVM=yes"), None);
    assert_eq!(c, 200, "{v}");
    let vols = http(&d.sock, "GET", "/volumes", None).json();
    let disk = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Name"].as_str().unwrap().ends_with("-rootfs"))
        .unwrap_or_else(|| panic!("no root disk: {vols}"))["Id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = d
        .dir
        .join("state")
        .join("volumes")
        .join(format!("{disk}.img"));
    check_rootfs(&img, MANY);
    assert_nothing_left_to_jobs(&d);
}
