//! OCI layouts and `docker save` tarballs built in the tests: layered
//! unpacking with whiteouts, ext4 images read back with `debugfs`, reference
//! selection, digest checks, refusals, extract_file, write_layout round trips
//! and commits (diff_layer).
//!
//! Needs e2fsprogs (`mkfs.ext4`, `debugfs`) for the ext4 test.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use api_server::images::archive::{ArchiveError, ExtractLimits};
use api_server::images::oci::{self, ImageConfig, OciError};
use api_server::images::volumes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::EntryType;

mod common;
use common::{debugfs, TempDir};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Raw tar builder that writes arbitrary (even evil) names.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn header(name: &str, kind: EntryType, mode: u32, size: u64, owner: (u64, u64)) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_cksum();
        h
    }
    fn file(self, name: &str, mode: u32, data: &[u8]) -> Self {
        self.owned_file(name, mode, (0, 0), data)
    }
    fn owned_file(mut self, name: &str, mode: u32, owner: (u64, u64), data: &[u8]) -> Self {
        let h = Self::header(name, EntryType::Regular, mode, data.len() as u64, owner);
        self.0.append(&h, data).unwrap();
        self
    }
    fn dir(mut self, name: &str, mode: u32) -> Self {
        let h = Self::header(name, EntryType::Directory, mode, 0, (0, 0));
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn link(mut self, name: &str, kind: EntryType, target: &str) -> Self {
        let mut h = Self::header(name, kind, 0o777, 0, (0, 0));
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.linkname = [0; 100];
            gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn special(mut self, name: &str, kind: EntryType) -> Self {
        let h = Self::header(name, kind, 0o644, 0, (0, 0));
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
    fn tgz(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn ungzip(data: &[u8]) -> Vec<u8> {
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out).unwrap();
        out
    } else {
        data.to_vec()
    }
}

/// Builds OCI layouts blob by blob.
struct Layout {
    dir: PathBuf,
    manifests: Vec<Value>,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }
    fn blob(&self, data: &[u8]) -> (String, usize) {
        let d = sha(data);
        fs::write(self.blob_path(&d), data).unwrap();
        (d, data.len())
    }
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }
    /// Stores an image manifest for `layers` ((media type, bytes)); returns
    /// its descriptor (not yet in the index).
    fn manifest(&self, layers: &[(&str, Vec<u8>)], config: Value) -> Value {
        let diff_ids: Vec<String> = layers.iter().map(|(_, b)| sha(&ungzip(b))).collect();
        let mut config = config;
        config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
        config["architecture"] = json!("amd64");
        config["os"] = json!("linux");
        let (cd, cs) = self.blob(&serde_json::to_vec(&config).unwrap());
        let ls: Vec<Value> = layers
            .iter()
            .map(|(mt, b)| {
                let (d, s) = self.blob(b);
                json!({"mediaType": mt, "digest": d, "size": s})
            })
            .collect();
        let m = json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_OCI_MANIFEST,
            "config": {"mediaType": oci::MEDIA_OCI_CONFIG, "digest": cd, "size": cs},
            "layers": ls,
        });
        let (md, ms) = self.blob(&serde_json::to_vec(&m).unwrap());
        json!({"mediaType": oci::MEDIA_OCI_MANIFEST, "digest": md, "size": ms})
    }
    fn add(&mut self, desc: Value, annotations: Value) -> String {
        let mut d = desc;
        if !annotations.is_null() {
            d["annotations"] = annotations;
        }
        let digest = d["digest"].as_str().unwrap().to_string();
        self.manifests.push(d);
        self.write_index();
        digest
    }
    fn write_index(&self) {
        let idx = json!({"schemaVersion": 2, "mediaType": oci::MEDIA_OCI_INDEX, "manifests": self.manifests});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }
}

fn ref_name(n: &str) -> Value {
    json!({"org.opencontainers.image.ref.name": n})
}

/// Tars a directory (as `docker save` / `oci-archive` would ship it).
fn tar_dir(dir: &Path, gz: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    let t = b.into_inner().unwrap();
    if gz {
        gzip(&t)
    } else {
        t
    }
}

/// A snapshot of a tree: path -> (kind, mode, uid, gid, content or target).
type Snap = BTreeMap<String, (char, u32, u32, u32, Vec<u8>)>;

fn snapshot(root: &Path) -> Snap {
    let mut out = Snap::new();
    fn walk(root: &Path, rel: &Path, out: &mut Snap) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).unwrap();
            let (k, data) = if md.is_dir() {
                walk(root, &r, out);
                ('d', vec![])
            } else if md.file_type().is_symlink() {
                (
                    'l',
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                ('f', fs::read(&p).unwrap())
            };
            out.insert(
                r.to_string_lossy().into_owned(),
                (k, md.mode() & 0o7777, md.uid(), md.gid(), data),
            );
        }
    }
    walk(root, Path::new(""), &mut out);
    out
}

fn names_in(ls: &str) -> Vec<String> {
    // `ls -l` lines end with the name.
    let mut v: Vec<String> = ls
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect();
    v.sort();
    v
}

/// Three layers exercising whiteouts, opaque dirs, overwrites and type
/// replacement.
fn three_layers() -> Vec<(&'static str, Vec<u8>)> {
    let l1 = Tar::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0\n")
        .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n")
        .link("etc/hosts2", EntryType::Link, "etc/hosts")
        .dir("opt/", 0o755)
        .file("opt/a", 0o644, b"a")
        .file("opt/sub/b", 0o644, b"b")
        .file("bin/app", 0o755, b"#!/bin/sh\necho app\n")
        .link("bin/sh", EntryType::Symlink, "/bin/app")
        .dir("tmp/", 0o1777)
        .owned_file("srv/data", 0o640, (1000, 2000), b"data")
        .file("home/u/notes", 0o600, b"notes")
        .special("dev/null", EntryType::Char)
        .tgz();
    let l2 = Tar::new()
        .file("etc/.wh.hosts", 0o644, b"")
        .file("opt/new", 0o644, b"new") // before the opaque marker on purpose
        .file("opt/.wh..wh..opq", 0o644, b"")
        .file("etc/passwd", 0o644, b"root:x:0:0\nu:x:1000:1000\n")
        .file(".wh.not-there", 0o644, b"")
        .tgz();
    let l3 = Tar::new()
        .file("home/u", 0o644, b"now a file") // replaces a directory
        .file("var/log/x.log", 0o644, b"log")
        .file("var/.wh.x.log", 0o644, b"") // same-layer whiteout: no effect
        .tar(); // uncompressed layer
    vec![
        (oci::MEDIA_OCI_LAYER_GZIP, l1),
        (oci::MEDIA_DOCKER_LAYER_GZIP, l2),
        (oci::MEDIA_OCI_LAYER_TAR, l3),
    ]
}

fn check_three_layers(root: &Path) {
    let s = snapshot(root);
    assert!(!s.contains_key("etc/hosts"), "whited out");
    assert_eq!(
        s["etc/hosts2"].4, b"127.0.0.1 localhost\n",
        "hard link keeps the inode"
    );
    assert_eq!(s["etc/passwd"].4, b"root:x:0:0\nu:x:1000:1000\n");
    assert!(
        !s.contains_key("opt/a") && !s.contains_key("opt/sub"),
        "opaque"
    );
    assert_eq!(s["opt/new"].4, b"new");
    assert_eq!(s["bin/app"].1, 0o755);
    assert_eq!(
        s["bin/sh"],
        (
            'l',
            0o777,
            s["bin/sh"].2,
            s["bin/sh"].3,
            b"/bin/app".to_vec()
        )
    );
    assert_eq!(s["home/u"].0, 'f');
    assert_eq!(s["home/u"].4, b"now a file");
    assert_eq!(s["var/log/x.log"].4, b"log");
    assert!(!s.contains_key("dev/null"), "devices skipped");
    assert!(
        s.keys().all(|k| !k.contains(".wh.")),
        "no whiteout files: {s:?}"
    );
    if is_root() {
        assert_eq!(s["tmp"].1, 0o1777);
        assert_eq!(s["srv/data"].1, 0o640);
        assert_eq!((s["srv/data"].2, s["srv/data"].3), (1000, 2000));
        assert_eq!((s["etc/passwd"].2, s["etc/passwd"].3), (0, 0));
    }
}

#[test]
fn layered_unpack_whiteouts_and_ext4() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let cfg = json!({"config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/app"], "WorkingDir": "/srv",
        "ExposedPorts": {"8080/tcp": {}}, "Labels": {"a": "b"}, "User": "0"}});
    let desc = lay.manifest(&three_layers(), cfg);
    let mdigest = lay.add(desc, ref_name("app:v1"));

    let img = oci::open(&lay.dir, None).unwrap();
    assert_eq!(img.digest, mdigest);
    assert_eq!(img.layers().len(), 3);
    assert_eq!(img.layers()[2].compression, oci::Compression::None);
    assert_eq!(img.config.cmd, ["/bin/app"]);
    assert_eq!(img.config.env, ["PATH=/bin"]);
    assert_eq!(img.config.working_dir, "/srv");
    assert_eq!(img.config.exposed_ports, ["8080/tcp"]);
    assert_eq!(img.config.labels["a"], "b");
    assert_eq!(img.repo_tags, ["app:v1"]);
    assert_eq!(
        (img.os.as_str(), img.architecture.as_str()),
        ("linux", "amd64")
    );

    let root = t.join("rootfs");
    let s = img.unpack(&root, &ExtractLimits::default()).unwrap();
    check_three_layers(&root);
    assert_eq!(s.layers, 3);
    assert_eq!(s.whiteouts, 4);
    assert_eq!(s.skipped, [PathBuf::from("dev/null")]);
    assert_eq!(s.hardlinks, 1);
    assert_eq!(s.symlinks, 1);

    let ext4 = t.join("root.ext4");
    let mb = img.to_ext4(&ext4, None).unwrap();
    assert!(mb >= volumes::MIN_AUTO_EXT4_MB);
    assert_eq!(names_in(&debugfs(&ext4, "ls -l /opt")), ["new"]);
    assert_eq!(
        names_in(&debugfs(&ext4, "ls -l /etc")),
        ["hosts2", "passwd"]
    );
    assert_eq!(
        debugfs(&ext4, "cat /etc/passwd"),
        "root:x:0:0\nu:x:1000:1000\n"
    );
    assert_eq!(debugfs(&ext4, "cat /home/u"), "now a file");
    assert!(debugfs(&ext4, "stat /bin/sh").contains("Fast link dest: \"/bin/app\""));
    if is_root() {
        let st = debugfs(&ext4, "stat /srv/data");
        assert!(
            st.contains("User:  1000") && st.contains("Group:  2000"),
            "{st}"
        );
        assert!(st.contains("Mode:  0640"), "{st}");
        assert!(debugfs(&ext4, "stat /tmp").contains("Mode:  01777"));
    }
}

#[test]
fn docker_save_legacy_tarball() {
    let t = TempDir::new("oci-it");
    let l1 = Tar::new()
        .file("etc/os-release", 0o644, b"ID=test\n")
        .file("usr/bin/tool", 0o755, b"tool")
        .tar();
    let l2 = Tar::new()
        .file("usr/bin/.wh.tool", 0o644, b"")
        .file("etc/motd", 0o644, b"hi\n")
        .tar();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["X=1"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]},
    });
    let cbytes = serde_json::to_vec(&config).unwrap();
    let chex = sha(&cbytes).trim_start_matches("sha256:").to_string();
    let build = |l2: &[u8], tagged: bool| -> Vec<u8> {
        let manifest = json!([{
            "Config": format!("{chex}.json"),
            "RepoTags": if tagged { json!(["myapp:v1", "registry.local/myapp:v1"]) } else { json!(null) },
            "Layers": ["aaa/layer.tar", "bbb/layer.tar"],
        }]);
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("aaa/VERSION", b"1.0");
        add("aaa/layer.tar", &l1);
        add("bbb/layer.tar", l2);
        add(&format!("{chex}.json"), &cbytes);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        add("repositories", br#"{"myapp":{"v1":"x"}}"#);
        b.into_inner().unwrap()
    };
    let tarball = t.join("save.tar");
    fs::write(&tarball, build(&l2, true)).unwrap();

    for r in [
        None,
        Some("myapp:v1"),
        Some("docker.io/library/myapp:v1"),
        Some(&chex[..12]),
    ] {
        let img = oci::open(&tarball, r).unwrap();
        assert_eq!(img.digest, format!("sha256:{chex}"), "{r:?}");
        assert_eq!(img.repo_tags, ["myapp:v1", "registry.local/myapp:v1"]);
        assert_eq!(img.config.cmd, ["/bin/sh"]);
        let root = t.join("root");
        img.unpack(&root, &ExtractLimits::default()).unwrap();
        let s = snapshot(&root);
        assert_eq!(s["etc/os-release"].4, b"ID=test\n");
        assert_eq!(s["etc/motd"].4, b"hi\n");
        assert!(!s.contains_key("usr/bin/tool"));
        assert!(s.contains_key("usr/bin"));
        fs::remove_dir_all(&root).unwrap();
    }
    let err = oci::open(&tarball, Some("other:v1")).unwrap_err();
    assert!(matches!(err, OciError::RefNotFound { .. }), "{err}");

    // Gzipped `docker save | gzip` works too.
    fs::write(&tarball, gzip(&build(&l2, true))).unwrap();
    oci::open(&tarball, Some("myapp:v1")).unwrap();

    // A layer that does not match its diff_id is refused.
    let mut bad = l2.clone();
    let pos = bad.windows(2).position(|w| w == b"hi").unwrap();
    bad[pos] = b'H';
    fs::write(&tarball, build(&bad, false)).unwrap();
    let err = oci::open(&tarball, None).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
}

#[test]
fn layout_inside_tar_and_ref_selection() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let one = lay.manifest(
        &[(
            oci::MEDIA_OCI_LAYER_GZIP,
            Tar::new().file("which", 0o644, b"one").tgz(),
        )],
        json!({"config": {"Cmd": ["one"]}}),
    );
    let two = lay.manifest(
        &[(
            oci::MEDIA_OCI_LAYER_GZIP,
            Tar::new().file("which", 0o644, b"two").tgz(),
        )],
        json!({"config": {"Cmd": ["two"]}}),
    );
    let d1 = lay.add(one, ref_name("one"));
    let d2 = lay.add(
        two,
        json!({"org.opencontainers.image.ref.name": "latest",
               "io.containerd.image.name": "docker.io/library/busybox:latest"}),
    );
    for gz in [false, true] {
        let tarball = t.join(if gz { "img.tar.gz" } else { "img.tar" });
        fs::write(&tarball, tar_dir(&lay.dir, gz)).unwrap();
        let cases: [(Option<&str>, &str); 7] = [
            (None, "one"),
            (Some("one"), "one"),
            (Some(&d1), "one"),
            (Some(&d2), "two"),
            (Some("busybox"), "two"),
            (Some("docker.io/library/busybox:latest"), "two"),
            (Some("latest"), "two"),
        ];
        for (r, want) in cases {
            let img = oci::open(&tarball, r).unwrap();
            assert_eq!(img.config.cmd, [want], "{r:?}");
            let out = t.join("which");
            img.extract_file("which", &out).unwrap();
            assert_eq!(fs::read(&out).unwrap(), want.as_bytes());
        }
        let img = oci::open(&tarball, Some("busybox")).unwrap();
        assert_eq!(img.repo_tags, ["busybox:latest"]);
        for r in ["nope", "busybox:1.0", &format!("sha256:{}", "0".repeat(64))] {
            let err = oci::open(&tarball, Some(r)).unwrap_err();
            match err {
                OciError::RefNotFound { available, .. } => {
                    assert_eq!(available, ["one", "docker.io/library/busybox:latest"])
                }
                e => panic!("{r}: {e}"),
            }
        }
    }
    // The extracted tarball lives as long as the image.
    let tarball = t.join("img.tar");
    let img = oci::open_with(
        &tarball,
        None,
        &oci::OpenConfig {
            scratch_dir: t.join("scratch"),
            ..Default::default()
        },
    )
    .err();
    assert!(img.is_some(), "scratch dir must exist");
    fs::create_dir(t.join("scratch")).unwrap();
    let cfg = oci::OpenConfig {
        scratch_dir: t.join("scratch"),
        ..Default::default()
    };
    let img = oci::open_with(&tarball, None, &cfg).unwrap();
    let copy = img.clone();
    assert_eq!(fs::read_dir(t.join("scratch")).unwrap().count(), 1);
    drop(img);
    assert_eq!(fs::read_dir(t.join("scratch")).unwrap().count(), 1);
    copy.to_ext4(&t.join("x.ext4"), None).unwrap();
    assert_eq!(
        fs::read_dir(t.join("scratch")).unwrap().count(),
        1,
        "to_ext4 cleaned up"
    );
    drop(copy);
    assert_eq!(fs::read_dir(t.join("scratch")).unwrap().count(), 0);
}

#[test]
fn bare_tag_ref_names() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    for (tag, cmd) in [("v1", "one"), ("v2", "two"), ("dup", "x"), ("dup", "y")] {
        let d = lay.manifest(
            &[(
                oci::MEDIA_OCI_LAYER_TAR,
                Tar::new().file(cmd, 0o644, b"").tar(),
            )],
            json!({"config": {"Cmd": [cmd]}}),
        );
        lay.add(d, ref_name(tag));
    }
    let cmd = |r: &str| oci::open(&lay.dir, Some(r)).map(|i| i.config.cmd[0].clone());
    assert_eq!(cmd("v2").unwrap(), "two");
    assert_eq!(cmd("myimage:v2").unwrap(), "two");
    assert_eq!(cmd("registry.local:5000/a/b:v1").unwrap(), "one");
    assert!(matches!(cmd("myimage"), Err(OciError::RefNotFound { .. })));
    assert!(
        matches!(cmd("myimage:dup"), Err(OciError::RefNotFound { .. })),
        "ambiguous"
    );
    assert_eq!(cmd("dup").unwrap(), "x", "exact match: first");
}

/// What `docker save` writes since Docker 25: an OCI layout plus a legacy
/// manifest.json whose RepoTags name the images.
#[test]
fn docker_save_oci_hybrid() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let d = lay.manifest(
        &[(
            oci::MEDIA_OCI_LAYER_TAR,
            Tar::new().file("srv/index.html", 0o644, b"web").tar(),
        )],
        json!({"config": {"Cmd": ["httpd"]}}),
    );
    let mdigest = lay.add(
        d.clone(),
        json!({"io.containerd.image.name": "docker.io/library/web:1.0",
               "org.opencontainers.image.ref.name": "1.0"}),
    );
    let m: Value = serde_json::from_slice(&fs::read(lay.blob_path(&mdigest)).unwrap()).unwrap();
    let cfg = m["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let layer = m["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let legacy = json!([{
        "Config": format!("blobs/sha256/{cfg}"),
        "RepoTags": ["web:1.0", "web:stable"],
        "Layers": [format!("blobs/sha256/{layer}")],
    }]);
    fs::write(
        lay.dir.join("manifest.json"),
        serde_json::to_vec(&legacy).unwrap(),
    )
    .unwrap();
    let tarball = t.join("save.tar");
    fs::write(&tarball, tar_dir(&lay.dir, false)).unwrap();
    for r in ["web:1.0", "web:stable", "docker.io/library/web:stable"] {
        let img = oci::open(&tarball, Some(r)).unwrap();
        assert_eq!(img.digest, mdigest, "{r}");
        assert_eq!(img.repo_tags, ["web:1.0", "web:stable"]);
        assert_eq!(img.config.cmd, ["httpd"]);
    }
    let out = t.join("index.html");
    oci::open(&tarball, None)
        .unwrap()
        .extract_file("srv/index.html", &out)
        .unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"web");
}

#[test]
fn multi_platform_index_picks_linux_amd64() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let arm = lay.manifest(
        &[(
            oci::MEDIA_OCI_LAYER_GZIP,
            Tar::new().file("arch", 0o644, b"arm64").tgz(),
        )],
        json!({}),
    );
    let amd = lay.manifest(
        &[(
            oci::MEDIA_OCI_LAYER_GZIP,
            Tar::new().file("arch", 0o644, b"amd64").tgz(),
        )],
        json!({}),
    );
    let with_platform = |mut d: Value, arch: &str| {
        d["platform"] = json!({"os": "linux", "architecture": arch});
        d
    };
    let list = json!({
        "schemaVersion": 2, "mediaType": oci::MEDIA_OCI_INDEX,
        "manifests": [with_platform(arm.clone(), "arm64"), with_platform(amd.clone(), "amd64")],
    });
    let (ld, ls) = lay.blob(&serde_json::to_vec(&list).unwrap());
    let amd_digest = amd["digest"].as_str().unwrap().to_string();
    lay.add(
        json!({"mediaType": oci::MEDIA_OCI_INDEX, "digest": ld, "size": ls}),
        ref_name("multi"),
    );
    let img = oci::open(&lay.dir, Some("multi")).unwrap();
    assert_eq!(img.digest, amd_digest);
    let out = t.join("arch");
    img.extract_file("/arch", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"amd64");

    // Without an amd64 entry the image is refused.
    let list = json!({"schemaVersion": 2, "manifests": [with_platform(arm, "arm64")]});
    let (ld, ls) = lay.blob(&serde_json::to_vec(&list).unwrap());
    lay.manifests.clear();
    lay.add(
        json!({"mediaType": oci::MEDIA_OCI_INDEX, "digest": ld, "size": ls}),
        Value::Null,
    );
    let err = oci::open(&lay.dir, None).unwrap_err();
    assert!(
        matches!(err, OciError::NoPlatform(ref p) if p == &["linux/arm64"]),
        "{err}"
    );
}

#[test]
fn digest_and_size_mismatches_refused() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let layer = Tar::new().file("f", 0o644, b"content").tgz();
    let desc = lay.manifest(&[(oci::MEDIA_OCI_LAYER_GZIP, layer.clone())], json!({}));
    lay.add(desc.clone(), Value::Null);
    oci::open(&lay.dir, None).unwrap();

    // Same size, one byte changed.
    let lp = lay.blob_path(&sha(&layer));
    let mut bad = layer.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    fs::write(&lp, &bad).unwrap();
    let err = oci::open(&lay.dir, None).unwrap_err();
    assert!(
        matches!(err, OciError::DigestMismatch { ref what, .. } if what.starts_with("layer")),
        "{err}"
    );
    fs::write(&lp, &layer).unwrap();

    // A manifest blob that was tampered with.
    let mp = lay.blob_path(desc["digest"].as_str().unwrap());
    let orig = fs::read(&mp).unwrap();
    let mut m = orig.clone();
    m.push(b' ');
    fs::write(&mp, &m).unwrap();
    let err = oci::open(&lay.dir, None).unwrap_err();
    assert!(
        matches!(err, OciError::DigestMismatch { ref what, .. } if what.starts_with("manifest")),
        "{err}"
    );
    fs::write(&mp, &orig).unwrap();

    // A descriptor size that lies.
    let mut d = desc.clone();
    d["size"] = json!(desc["size"].as_u64().unwrap() + 1);
    lay.manifests = vec![d];
    lay.write_index();
    let err = oci::open(&lay.dir, None).unwrap_err();
    assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");

    // Digests must be sha256 hex: no path games.
    let mut d = desc.clone();
    d["digest"] = json!("sha256:../../../../etc/passwd");
    lay.manifests = vec![d];
    lay.write_index();
    let err = oci::open(&lay.dir, None).unwrap_err();
    assert!(matches!(err, OciError::BadDigest(_)), "{err}");
}

#[test]
fn zstd_layers_are_read_by_their_bytes() {
    // zstd layers are supported (the registry work): a layer's compression
    // is what its bytes say, as for gzip, whatever its media type claims.
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("a"));
    let desc = lay.manifest(
        &[(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Tar::new().file("f", 0o644, b"x").tar(),
        )],
        json!({}),
    );
    lay.add(desc, Value::Null);
    let img = oci::open(&lay.dir, None).unwrap();
    assert_eq!(img.layers()[0].compression, oci::Compression::None);

    // A blob with the zstd magic under a plain tar media type is read as
    // zstd (a bad frame fails when it is unpacked, in the sandbox).
    let mut lay = Layout::new(&t.join("b"));
    let mut fake = vec![0x28, 0xb5, 0x2f, 0xfd];
    fake.extend_from_slice(&[0; 60]);
    let desc = lay.manifest(&[(oci::MEDIA_OCI_LAYER_TAR, fake.clone())], json!({}));
    lay.add(desc, Value::Null);
    let img = oci::open(&lay.dir, None).unwrap();
    assert_eq!(img.layers()[0].compression, oci::Compression::Zstd);

    // A zstd-compressed image tarball (not a layout, not a docker save
    // archive) is still no image.
    let p = t.join("img.tar.zst");
    fs::write(&p, &fake).unwrap();
    assert!(oci::open(&p, None).is_err());

    // Something that is no image at all.
    let err = oci::open(&t.0, None).unwrap_err();
    assert!(matches!(err, OciError::NotAnImage(_)), "{err}");
}

#[test]
fn extract_file_final_layer_wins() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let l1 = Tar::new()
        .file("boot/vmlinux-1", 0o644, b"old kernel")
        .link("boot/vmlinux", EntryType::Symlink, "vmlinux-1")
        .file("boot/initrd", 0o644, b"initrd")
        .file("boot/config", 0o644, b"cfg")
        .tgz();
    let l2 = Tar::new()
        .file("boot/vmlinux-2", 0o755, b"new kernel")
        .link("boot/vmlinux", EntryType::Symlink, "/boot/vmlinux-2")
        .file("boot/.wh.initrd", 0o644, b"")
        .tgz();
    let desc = lay.manifest(
        &[
            (oci::MEDIA_OCI_LAYER_GZIP, l1),
            (oci::MEDIA_OCI_LAYER_GZIP, l2),
        ],
        json!({}),
    );
    lay.add(desc, ref_name("kernel"));
    let img = oci::open(&lay.dir, Some("kernel")).unwrap();
    let out = t.join("out");
    img.extract_file("boot/vmlinux", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"new kernel");
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o755
    );
    img.extract_file("/boot/config", &out).unwrap();
    assert_eq!(fs::read(&out).unwrap(), b"cfg");
    let err = img.extract_file("boot/initrd", &t.join("x")).unwrap_err();
    assert!(
        matches!(err, OciError::NotFound(ref f) if f == "boot/initrd"),
        "{err}"
    );
    assert!(err.to_string().contains("boot/initrd"));
    let err = img.extract_file("boot/missing", &t.join("x")).unwrap_err();
    assert!(matches!(err, OciError::NotFound(_)), "{err}");
    let err = img.extract_file("boot", &t.join("x")).unwrap_err();
    assert!(matches!(err, OciError::NotAFile(_)), "{err}");
}

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/app")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("etc/app/conf"), b"k=v\n").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("secret"), b"s").unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(root.join("etc/app/conf"), root.join("conf.hard")).unwrap();
    std::os::unix::fs::symlink("/etc/app/conf", root.join("conf.abs")).unwrap();
    std::os::unix::fs::symlink("etc/app", root.join("appdir")).unwrap();
    let deep = format!("{}/file", "d".repeat(120));
    fs::create_dir_all(root.join("d".repeat(120))).unwrap();
    fs::write(root.join(&deep), b"long name").unwrap();
    if is_root() {
        std::os::unix::fs::lchown(root.join("secret"), Some(1234), Some(4321)).unwrap();
        fs::create_dir(root.join("sticky")).unwrap();
        fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    }
}

#[test]
fn write_layout_round_trip() {
    let t = TempDir::new("oci-it");
    let src = t.join("src");
    sample_tree(&src);
    let dir = t.join("layout");
    let cfg = ImageConfig {
        env: vec!["A=1".into()],
        cmd: vec!["/run.sh".into()],
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        working_dir: "/etc".into(),
        user: "1000".into(),
        labels: [("k".to_string(), "v".to_string())].into(),
        exposed_ports: vec!["22/tcp".into()],
        volumes: vec!["/data".into()],
        stop_signal: String::new(),
    };
    let d1 = oci::write_layout(&dir, &src, &cfg, "app:v1").unwrap();
    // A second image in the same layout keeps the first.
    let other = t.join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("o"), b"o").unwrap();
    let d2 = oci::write_layout(&dir, &other, &ImageConfig::default(), "other").unwrap();
    assert_ne!(d1, d2);

    let img = oci::open(&dir, Some("app:v1")).unwrap();
    assert_eq!(img.digest, d1);
    assert_eq!(img.config, cfg);
    assert_eq!(img.repo_tags, ["app:v1"]);
    let out = t.join("out");
    img.unpack(&out, &ExtractLimits::default()).unwrap();
    let (a, b) = (snapshot(&src), snapshot(&out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        let w = &b[k];
        assert_eq!((v.0, &v.4), (w.0, &w.4), "{k}");
        if v.0 != 'l' {
            assert_eq!(v.1, w.1, "mode of {k}");
        }
        if is_root() {
            assert_eq!((v.2, v.3), (w.2, w.3), "owner of {k}");
        }
    }
    assert_eq!(
        fs::metadata(out.join("conf.hard")).unwrap().ino(),
        fs::metadata(out.join("etc/app/conf")).unwrap().ino()
    );
    let img2 = oci::open(&dir, Some("other")).unwrap();
    assert_eq!(img2.digest, d2);

    // Rewriting a ref replaces its index entry only.
    let d3 = oci::write_layout(&dir, &other, &cfg, "app:v1").unwrap();
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(oci::open(&dir, Some("app:v1")).unwrap().digest, d3);
    assert_eq!(oci::open(&dir, Some("other")).unwrap().digest, d2);
    assert!(dir.join("oci-layout").is_file());
    assert!(fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp")));

    let err = oci::write_layout(&dir, &other, &cfg, "bad name").unwrap_err();
    assert!(matches!(err, OciError::InvalidRefName(_)), "{err}");
}

#[test]
fn diff_layer_commit() {
    let t = TempDir::new("oci-it");
    let base_src = t.join("base");
    sample_tree(&base_src);
    fs::create_dir_all(base_src.join("gone/sub")).unwrap();
    fs::write(base_src.join("gone/sub/f"), b"f").unwrap();
    let dir = t.join("layout");
    oci::write_layout(&dir, &base_src, &ImageConfig::default(), "base").unwrap();
    let base = oci::open(&dir, Some("base")).unwrap();

    // The container's tree: the base plus changes.
    let upper = t.join("upper");
    base.unpack(&upper, &ExtractLimits::default()).unwrap();
    fs::write(upper.join("etc/app/conf"), b"k=changed\n").unwrap(); // also changes conf.hard
    fs::write(upper.join("added"), b"new").unwrap();
    fs::remove_file(upper.join("secret")).unwrap();
    fs::remove_dir_all(upper.join("gone")).unwrap();
    fs::remove_dir(upper.join("empty")).unwrap();
    fs::write(upper.join("empty"), b"dir became a file").unwrap();
    fs::set_permissions(upper.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    let lower = t.join("lower");
    base.unpack(&lower, &ExtractLimits::default()).unwrap();

    let diff = t.join("diff.tar.gz");
    oci::diff_layer(&lower, &upper, &diff).unwrap();
    // The diff holds the changes only.
    let mut names = Vec::new();
    let data = ungzip(&fs::read(&diff).unwrap());
    for e in tar::Archive::new(&data[..]).entries().unwrap() {
        names.push(e.unwrap().path().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert!(names.contains(&".wh.secret".to_string()), "{names:?}");
    assert!(names.contains(&".wh.gone".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("gone/")), "{names:?}");
    assert!(names.contains(&"added".to_string()));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("d".repeat(120).as_str())),
        "unchanged left out: {names:?}"
    );

    let cfg = ImageConfig {
        cmd: vec!["date".into()],
        ..Default::default()
    };
    let d = oci::write_layout_from(&dir, &base, &[&diff], &cfg, "committed").unwrap();
    let img = oci::open(&dir, Some("committed")).unwrap();
    assert_eq!(img.digest, d);
    assert_eq!(img.layers().len(), 2);
    assert_eq!(img.config.cmd, ["date"]);
    let out = t.join("out");
    img.unpack(&out, &ExtractLimits::default()).unwrap();
    let (a, b) = (snapshot(&upper), snapshot(&out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert_eq!((v.0, &v.4), (b[k].0, &b[k].4), "{k}");
        if v.0 != 'l' {
            assert_eq!(v.1, b[k].1, "mode of {k}");
        }
    }
    // The base image is still there.
    assert_eq!(oci::open(&dir, Some("base")).unwrap().layers().len(), 1);
}

/// Wraps one layer tar in a layout and unpacks it.
fn unpack_layers(
    t: &TempDir,
    layers: Vec<Vec<u8>>,
    dest: &Path,
) -> Result<oci::UnpackSummary, OciError> {
    let _ = fs::remove_dir_all(t.join("layout"));
    let mut lay = Layout::new(&t.join("layout"));
    let ls: Vec<(&str, Vec<u8>)> = layers
        .into_iter()
        .map(|l| (oci::MEDIA_OCI_LAYER_GZIP, l))
        .collect();
    let desc = lay.manifest(&ls, json!({}));
    lay.add(desc, Value::Null);
    oci::open(&lay.dir, None)?.unpack(dest, &ExtractLimits::default())
}

#[test]
fn malicious_layers_refused() {
    let t = TempDir::new("oci-it");
    let outside = t.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), b"keep").unwrap();
    let dest = t.join("dest");
    let layer_err = |r: Result<oci::UnpackSummary, OciError>| -> ArchiveError {
        match r {
            Err(OciError::Layer { source, .. }) => source,
            other => panic!("expected a layer error, got {other:?}"),
        }
    };
    let evil_abs = outside.join("abs");
    let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
        (vec![Tar::new().file("../x", 0o644, b"x").tgz()], "parent"),
        (
            vec![Tar::new().file("a/../../x", 0o644, b"x").tgz()],
            "parent",
        ),
        (
            vec![Tar::new()
                .file(evil_abs.to_str().unwrap(), 0o644, b"x")
                .tgz()],
            "absolute",
        ),
        // A symlink, then a file below it, in one layer...
        (
            vec![Tar::new()
                .link("esc", EntryType::Symlink, outside.to_str().unwrap())
                .file("esc/pwned", 0o644, b"x")
                .tgz()],
            "through",
        ),
        // ... or across layers.
        (
            vec![
                Tar::new()
                    .link("esc", EntryType::Symlink, "../outside")
                    .tgz(),
                Tar::new().file("esc/pwned", 0o644, b"x").tgz(),
            ],
            "through",
        ),
        // A whiteout below a symlink must not delete outside.
        (
            vec![
                Tar::new()
                    .link("esc", EntryType::Symlink, outside.to_str().unwrap())
                    .tgz(),
                Tar::new().file("esc/.wh.keep", 0o644, b"").tgz(),
            ],
            "through",
        ),
        (
            vec![
                Tar::new()
                    .link("esc", EntryType::Symlink, outside.to_str().unwrap())
                    .tgz(),
                Tar::new().file("esc/.wh..wh..opq", 0o644, b"").tgz(),
            ],
            "through",
        ),
        (vec![Tar::new().file(".wh...", 0o644, b"").tgz()], "parent"),
        // Hard links to the outside or through symlinks.
        (
            vec![Tar::new()
                .link("h", EntryType::Link, outside.join("keep").to_str().unwrap())
                .tgz()],
            "badlink",
        ),
        (
            vec![Tar::new()
                .link("h", EntryType::Link, "../outside/keep")
                .tgz()],
            "badlink",
        ),
        (
            vec![
                Tar::new()
                    .link("esc", EntryType::Symlink, "../outside")
                    .tgz(),
                Tar::new().link("h", EntryType::Link, "esc/keep").tgz(),
            ],
            "through",
        ),
    ];
    for (layers, want) in cases {
        let err = layer_err(unpack_layers(&t, layers, &dest));
        let ok = match want {
            "parent" => matches!(err, ArchiveError::ParentDir(_)),
            "absolute" => matches!(err, ArchiveError::AbsolutePath(_)),
            "through" => matches!(err, ArchiveError::ThroughSymlink(_)),
            "badlink" => matches!(err, ArchiveError::BadLink { .. }),
            _ => false,
        };
        assert!(ok, "{want}: {err}");
        let _ = fs::remove_dir_all(&dest);
    }
    let left: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keep"]);
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
    assert!(!evil_abs.exists());
    assert!(!t.join("x").exists());

    // A directory replaced by a symlink later in a layer: its deferred mode
    // must not be applied through the link.
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let layers = vec![Tar::new()
        .dir("d/", 0o700)
        .link("d", EntryType::Symlink, outside.to_str().unwrap())
        .tgz()];
    unpack_layers(&t, layers, &dest).unwrap();
    assert_eq!(
        fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert!(fs::symlink_metadata(dest.join("d"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn limits_count_over_all_layers() {
    let t = TempDir::new("oci-it");
    let mut lay = Layout::new(&t.join("layout"));
    let l1 = Tar::new()
        .file("a", 0o644, &[1u8; 3000])
        .file("b", 0o644, b"b")
        .tgz();
    let l2 = Tar::new()
        .file("c", 0o644, &[2u8; 3000])
        .file("d", 0o644, b"d")
        .tgz();
    let desc = lay.manifest(
        &[
            (oci::MEDIA_OCI_LAYER_GZIP, l1),
            (oci::MEDIA_OCI_LAYER_GZIP, l2),
        ],
        json!({}),
    );
    lay.add(desc, Value::Null);
    let img = oci::open(&lay.dir, None).unwrap();
    let lim = |e, b| ExtractLimits {
        max_entries: e,
        max_bytes: b,
    };
    let s = img.unpack(&t.join("ok"), &lim(4, 6002)).unwrap();
    assert_eq!((s.entries, s.bytes, s.files), (4, 6002, 4));
    let err = img.unpack(&t.join("e"), &lim(3, 1 << 20)).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::Layer {
                source: ArchiveError::TooManyEntries(3),
                ..
            }
        ),
        "{err}"
    );
    let err = img.unpack(&t.join("b"), &lim(10, 5000)).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::Layer {
                source: ArchiveError::TooLarge(5000),
                ..
            }
        ),
        "{err}"
    );
}
