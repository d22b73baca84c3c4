//! emberd end to end over its unix socket, driven the way users drive it:
//! curl --unix-socket with forms and JSON.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_tests::*;
use serde_json::Value;

/// A running emberd with its own state dir and jail base, killed on drop.
pub struct Emberd {
    pub proc_: Option<Proc>,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl Emberd {
    pub fn start() -> Self {
        let dir = TempDir::new("emberd");
        let mut d = Emberd {
            proc_: None,
            sock: dir.join("ember.sock"),
            dir,
        };
        d.restart();
        d
    }

    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("emberd"));
        cmd.arg("--socket")
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--chroot-base-dir")
            .arg(self.dir.join("jail"))
            .args(["--uid", "10501", "--gid", "10501"]);
        self.proc_ = Some(Proc::spawn(cmd, self.dir.path(), "emberd"));
        wait_for_socket(&self.sock);
    }

    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc_.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// curl with `args`; returns (status, body).
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-S", "--max-time", "120", "--unix-socket"])
            .arg(&self.sock)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn json(&self, args: &[&str]) -> (u16, Value) {
        let (c, b) = self.curl(args);
        (c, serde_json::from_str(&b).unwrap_or(Value::String(b)))
    }
}

impl Drop for Emberd {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn make_tar(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let src = dir.join("tar-src");
    for (name, data) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    let out = dir.join("data.tar.gz");
    let st = Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn compilers_and_providers() {
    let d = Emberd::start();
    let (c, v) = d.json(&["http://localhost/available_providers"]);
    assert_eq!((c, v), (200, serde_json::json!(["ember"])));
    let (c, v) = d.json(&["http://localhost/available_compilers"]);
    assert_eq!(c, 200);
    assert!(v.is_array(), "{v}");
    let (c, v) = d.json(&["http://localhost/describe_compiler?provider=ember&base=nope&lang=c"]);
    assert_eq!(c, 400);
    assert!(v["Error"].as_str().unwrap().contains("available bases"), "{v}");
    let (c, v) = d.json(&["http://localhost/describe_compiler?provider=qemu&base=ember&lang=c"]);
    assert_eq!(c, 400);
    assert!(v["Error"].as_str().unwrap().contains("available providers: ember"), "{v}");
}

#[test]
fn volumes_lifecycle_and_bad_input() {
    let d = Emberd::start();
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
    let tgz = make_tar(d.dir.path(), &[("hello.txt", b"hello volume\n"), ("sub/x.bin", &[7u8; 3000])]);
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&["-X", "POST", "-F", &form, "-F", "provider=ember", &u("/volumes/data1")]);
    assert_eq!(c, 201, "{v}");
    let id = v["Id"].as_str().unwrap().to_string();
    let img = d.dir.join("state").join("volumes").join(format!("{id}.img"));
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
    let (c, v) = d.json(&["-X", "POST", "-F", &form, "-F", "raw=true", &u("/volumes/raw1")]);
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
fn unknown_routes_and_a_stalled_client() {
    let d = Emberd::start();
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
    let (c, v) = d.json(&["-X", "POST", "-d", "{not json", "http://localhost/instances/run"]);
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
    let mut d = Emberd::start();
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
    let d = Emberd::start();
    let (c, v) = d.json(&["http://localhost/available_compilers"]);
    assert_eq!(c, 200);
    let names: Vec<&str> = v.as_array().unwrap().iter().filter_map(|x| x.as_str()).collect();
    assert!(names.contains(&"linux-c-ember") && names.contains(&"linux-binary-ember"), "{v}");
    let (c, text) = d.curl(&["http://localhost/describe_compiler?provider=ember&base=linux&lang=c"]);
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
        "-X", "POST", "-F", &form, "-F", "provider=ember", "-F", "base=linux", "-F", "lang=c",
        "-F", "mounts=/data", "http://localhost/images/linuxhello/create",
    ]);
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["Name"], "linuxhello");
    assert_eq!(v["RunSpec"]["Compiler"], "linux-c-ember");
    assert_eq!(v["RunSpec"]["DeviceMappings"][0]["MountPoint"], "/data");
    assert_eq!(v["StageSpec"]["ImageFormat"], "bzimage+initramfs");
    // The same name again needs force.
    let (c, _) = d.json(&[
        "-X", "POST", "-F", &form, "-F", "provider=ember", "-F", "base=linux", "-F", "lang=c",
        "http://localhost/images/linuxhello/create",
    ]);
    assert_eq!(c, 409);
    // A compile error is the user's: 400 with gcc's words.
    let bad = make_tar(d.dir.path(), &[("main.c", b"int main( { syntax error\n")]);
    let form_bad = format!("tarfile=@{}", bad.display());
    let (c, v) = d.json(&[
        "-X", "POST", "-F", &form_bad, "-F", "provider=ember", "-F", "base=linux", "-F", "lang=c",
        "http://localhost/images/broken/create",
    ]);
    assert_eq!(c, 400, "{v}");
    assert!(v["Error"].as_str().unwrap().contains("error"), "{v}");
    // Unknown lang lists what exists.
    let (c, v) = d.json(&[
        "-X", "POST", "-F", &form, "-F", "provider=ember", "-F", "base=linux", "-F", "lang=go",
        "http://localhost/images/golang/create",
    ]);
    assert_eq!(c, 400);
    assert!(v["Error"].as_str().unwrap().contains("available langs: binary, c"), "{v}");
    // Without a Linux kernel on this host the run is refused clearly; with
    // one, it would boot where KVM can run Linux (not on this machine).
    let (c, _) = d.json(&["-X", "POST", "http://localhost/volumes/d1?size=4"]);
    assert_eq!(c, 201);
    let run = r#"{"InstanceName":"l1","ImageName":"linuxhello","Mounts":{"/data":"d1"}}"#;
    let (c, v) = d.json(&["-X", "POST", "-d", run, "http://localhost/instances/run"]);
    if api_has_kernel(&d) {
        eprintln!("skipped: booting Linux needs a KVM that can run Linux; this host's PVM KVM cannot");
    } else {
        assert_eq!(c, 400, "{v}");
        assert!(v["Error"].as_str().unwrap().contains("no kernel"), "{v}");
    }
    // Missing mounts are refused before anything starts.
    let run = r#"{"InstanceName":"l2","ImageName":"linuxhello"}"#;
    let (c, v) = d.json(&["-X", "POST", "-d", run, "http://localhost/instances/run"]);
    assert_eq!(c, 400, "{v}");
    assert!(v["Error"].as_str().unwrap().contains("required mount point missing"), "{v}");
    assert_eq!(d.curl(&["-X", "DELETE", "http://localhost/images/linuxhello?force=true"]).0, 204);
}

fn api_has_kernel(d: &Emberd) -> bool {
    let _ = d;
    std::env::var_os("EMBER_LINUX_KERNEL").is_some()
        || Path::new("/var/lib/ember/kernels/vmlinuz").exists()
        || std::fs::read_dir("/boot")
            .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
            .unwrap_or(false)
}
