//! Fixtures shared by the store's and the builder's unit tests: scratch
//! directories, build contexts, OCI layouts, and reading ext4 images back
//! with debugfs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ImageStore;
use crate::images::oci::{self, ImageConfig};

pub(super) struct Tmp(pub(super) PathBuf);
impl Tmp {
    pub(super) fn new(tag: &str) -> Tmp {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ember-imgstore-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn write(p: &Path, data: &str, mode: u32) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tar (optionally gzip) of (path, content) regular files.
pub(super) fn tar_of(files: &[(&str, &str)], gzip: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, c) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(c.len() as u64);
        b.append_data(&mut h, p, c.as_bytes()).unwrap();
    }
    let t = b.into_inner().unwrap();
    if gzip {
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        g.write_all(&t).unwrap();
        g.finish().unwrap()
    } else {
        t
    }
}

/// A build context tar with text files and binary files.
pub(super) fn context(files: &[(&str, &str)], bins: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, c) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(c.len() as u64);
        b.append_data(&mut h, p, c.as_bytes()).unwrap();
    }
    for (p, c) in bins {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(c.len() as u64);
        b.append_data(&mut h, p, c.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

pub(super) fn debugfs(img: &Path, req: &str) -> String {
    let tool = ["/usr/sbin/debugfs", "/sbin/debugfs", "debugfs"]
        .into_iter()
        .find(|t| Path::new(t).is_file())
        .unwrap_or("debugfs");
    let out = Command::new(tool)
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs) is needed by these tests");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(super) fn cat(img: &Path, p: &str) -> String {
    let out = debugfs(img, &format!("cat {p}"));
    // debugfs prints its version banner on stderr first.
    out.lines()
        .filter(|l| !l.starts_with("debugfs "))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn exists(img: &Path, p: &str) -> bool {
    !debugfs(img, &format!("stat {p}")).contains("File not found")
}

/// A one-image OCI layout named `name` with `files`.
pub(super) fn layout(t: &Tmp, name: &str, files: &[(&str, &str)], cfg: &ImageConfig) -> PathBuf {
    let root =
        t.0.join(format!("src-rootfs-{}", name.replace([':', '/'], "_")));
    for (p, c) in files {
        write(&root.join(p), c, 0o644);
    }
    let dir = t.0.join("layout");
    oci::write_layout(&dir, &root, cfg, name).unwrap();
    dir
}

pub(super) fn store(t: &Tmp) -> ImageStore {
    ImageStore::open(&t.0.join("container-images")).unwrap()
}
