//! Volume creation the way the UniK `POST /volumes/{name}` handler does it:
//! an uploaded tar.gz is extracted safely and becomes an ext4 image, which
//! is read back with e2fsprogs' `debugfs`.
//!
//! Needs e2fsprogs (`mkfs.ext4`, `debugfs`); the tests fail with a clear
//! message when it is missing.

use std::fs;
use std::io::Write;

use api_server::images::archive::{extract_tar_gz, ArchiveError, ExtractLimits};
use api_server::images::volumes::{self, create_ext4_from_dir, create_raw, VolumeError, MIB};

mod common;
use common::{debugfs, TempDir};

/// A tar.gz as a client would upload it.
fn upload() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("www/index.html", 0o644, b"<h1>hello</h1>\n");
    add("www/img/logo.bin", 0o644, &[b'L'; 5000]);
    add("bin/tool", 0o755, b"#!/bin/sh\necho tool\n");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "index", "www/index.html").unwrap();
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[test]
fn tar_gz_upload_becomes_ext4_volume() {
    let t = TempDir::new("volumes-it");
    let dir = t.0.join("content");
    let summary = extract_tar_gz(&upload()[..], &dir, &ExtractLimits::default()).unwrap();
    assert_eq!(summary.files, 3);
    assert_eq!(summary.symlinks, 1);

    let img = t.0.join("vol.ext4");
    let mb = create_ext4_from_dir(&img, &dir, None).unwrap();
    assert_eq!(volumes::image_size_mb(&img), mb);
    assert_eq!(fs::metadata(&img).unwrap().len(), mb * MIB);

    assert_eq!(debugfs(&img, "cat /www/index.html"), "<h1>hello</h1>\n");
    assert_eq!(debugfs(&img, "cat /bin/tool"), "#!/bin/sh\necho tool\n");
    assert_eq!(debugfs(&img, "cat /www/img/logo.bin"), "L".repeat(5000));
    let ls = debugfs(&img, "ls -l /bin");
    let tool = ls.lines().find(|l| l.ends_with(" tool")).expect(&ls);
    let fields: Vec<&str> = tool.split_whitespace().collect();
    assert_eq!(fields[1], "100755", "{tool}");
    // Owners are not taken from the upload: the daemon's user (root in CI).
    let stat = debugfs(&img, "stat /www/index.html");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    assert!(stat.contains(&format!("User: {uid:5}")), "{stat}");
    let stat = debugfs(&img, "stat /index");
    assert!(
        stat.contains("Fast link dest: \"www/index.html\""),
        "{stat}"
    );
}

#[test]
fn given_size_and_too_small() {
    let t = TempDir::new("volumes-it");
    let dir = t.0.join("content");
    extract_tar_gz(&upload()[..], &dir, &ExtractLimits::default()).unwrap();
    let img = t.0.join("vol.ext4");
    assert_eq!(create_ext4_from_dir(&img, &dir, Some(64)).unwrap(), 64);
    assert_eq!(fs::metadata(&img).unwrap().len(), 64 * MIB);
    assert_eq!(debugfs(&img, "cat /www/index.html"), "<h1>hello</h1>\n");

    fs::write(dir.join("big"), vec![1u8; 3 * MIB as usize]).unwrap();
    let img = t.0.join("small.ext4");
    let err = create_ext4_from_dir(&img, &dir, Some(2)).unwrap_err();
    assert!(
        matches!(err, VolumeError::TooSmall { given_mb: 2, .. }),
        "{err}"
    );
    assert!(!img.exists());
}

#[test]
fn evil_upload_is_refused_before_any_volume() {
    let t = TempDir::new("volumes-it");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    // tar::Builder refuses to write "..", so set the raw link name.
    h.as_gnu_mut().unwrap().linkname[..5].copy_from_slice(b"../..");
    h.set_path("escape").unwrap();
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let data = b.into_inner().unwrap();
    let err =
        extract_tar_gz(&data[..], &t.0.join("content"), &ExtractLimits::default()).unwrap_err();
    assert!(matches!(err, ArchiveError::BadLink { .. }), "{err}");
}

#[test]
fn raw_upload_becomes_raw_volume() {
    let t = TempDir::new("volumes-it");
    let img = t.0.join("raw.img");
    let data = vec![0x5a; 1000];
    assert_eq!(create_raw(&img, &data[..], None).unwrap(), 1);
    let back = fs::read(&img).unwrap();
    assert_eq!(back.len(), 1024);
    assert_eq!(&back[..1000], &data[..]);
    assert!(back[1000..].iter().all(|&b| b == 0));
    assert_eq!(create_raw(&img, &data[..], Some(4)).unwrap(), 4);
    assert_eq!(fs::metadata(&img).unwrap().len(), 4 * MIB);
}
