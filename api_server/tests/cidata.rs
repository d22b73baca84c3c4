//! NoCloud cidata images, read back with mtools (and blkid) without
//! mounting. Needs the Debian packages dosfstools and mtools.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use api_server::images::cidata::{build_cidata, from_flintlock_metadata, CidataError, CidataFiles};
use api_server::images::hub::base64_encode;

mod common;
use common::TempDir;

fn mtool(tool: &str, img: &Path, args: &[&str]) -> (bool, Vec<u8>) {
    let out = Command::new(tool)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(img)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool} (install mtools): {e}"));
    (out.status.success(), out.stdout)
}

fn mtype(img: &Path, file: &str) -> Vec<u8> {
    let (ok, out) = mtool("mtype", img, &[&format!("::{file}")]);
    assert!(ok, "mtype ::{file}");
    out
}

/// Root directory listing: long file names, lower-cased.
fn names(img: &Path) -> Vec<String> {
    let (ok, out) = mtool("mdir", img, &["-b", "::"]);
    assert!(ok, "mdir");
    let mut v: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| l.trim().trim_start_matches("::/").to_lowercase())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[test]
fn image_holds_the_files_under_the_cidata_label() {
    let dir = TempDir::new("cidata-full");
    let img = dir.0.join("cidata.img");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let files = CidataFiles {
        meta_data: b"instance-id: vm1\nlocal-hostname: vm1\n".to_vec(),
        user_data: b"#cloud-config\nruncmd:\n  - echo hi\n".to_vec(),
        vendor_data: Some(big.clone()),
        network_config: Some(b"version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".to_vec()),
    };
    build_cidata(&img, &files).expect("build_cidata");

    assert_eq!(
        names(&img),
        ["meta-data", "network-config", "user-data", "vendor-data"]
    );
    assert_eq!(mtype(&img, "meta-data"), files.meta_data);
    assert_eq!(mtype(&img, "user-data"), files.user_data);
    assert_eq!(mtype(&img, "vendor-data"), big);
    assert_eq!(
        mtype(&img, "network-config"),
        files.network_config.clone().unwrap()
    );

    // Volume label, by mtools and (when present) blkid.
    let (ok, out) = mtool("mlabel", &img, &["-s", "::"]);
    assert!(ok, "mlabel -s");
    let label = String::from_utf8_lossy(&out);
    assert!(label.contains("CIDATA"), "{label}");
    if let Ok(o) = Command::new("blkid")
        .args(["-o", "export"])
        .arg(&img)
        .output()
    {
        if o.status.success() {
            let s = String::from_utf8_lossy(&o.stdout);
            assert!(s.contains("LABEL=CIDATA"), "{s}");
            assert!(s.contains("TYPE=vfat"), "{s}");
        }
    }

    // Nothing but the image is left next to it.
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("cidata.img")]);

    // Rebuilding replaces the image.
    let small = CidataFiles {
        meta_data: b"instance-id: vm2\n".to_vec(),
        ..Default::default()
    };
    build_cidata(&img, &small).expect("rebuild");
    assert_eq!(names(&img), ["meta-data", "user-data"]);
    assert_eq!(mtype(&img, "meta-data"), b"instance-id: vm2\n");
    assert_eq!(mtype(&img, "user-data"), b"");
}

#[test]
fn image_from_flintlock_metadata() {
    let dir = TempDir::new("cidata-flintlock");
    let img = dir.0.join("seed.img");
    let mut map = BTreeMap::new();
    map.insert(
        "meta-data".to_string(),
        base64_encode(b"platform: liquid_metal\ncluster_name: c1"),
    );
    map.insert(
        "user-data".to_string(),
        base64_encode(b"#cloud-config\nhostname: vm\n"),
    );
    let files = from_flintlock_metadata(&map, "01J0000000000000000000000A", "vm-a").unwrap();
    assert!(files.vendor_data.is_none() && files.network_config.is_none());
    build_cidata(&img, &files).unwrap();
    assert_eq!(names(&img), ["meta-data", "user-data"]);
    let meta = String::from_utf8(mtype(&img, "meta-data")).unwrap();
    assert_eq!(
        meta,
        "platform: liquid_metal\ncluster_name: c1\n\
         instance_id: \"01J0000000000000000000000A\"\n\
         instance-id: \"01J0000000000000000000000A\"\n\
         local-hostname: \"vm-a\"\nlocal_hostname: \"vm-a\"\n"
    );
    assert_eq!(mtype(&img, "user-data"), b"#cloud-config\nhostname: vm\n");
}

#[test]
fn flintlock_metadata_rules() {
    let id = "01J0000000000000000000000B";
    // Empty map: generated meta-data, empty user-data.
    let f = from_flintlock_metadata(&BTreeMap::new(), id, "").unwrap();
    assert_eq!(
        String::from_utf8(f.meta_data).unwrap(),
        format!("instance_id: \"{id}\"\ninstance-id: \"{id}\"\n")
    );
    assert!(f.user_data.is_empty());

    // User-provided ids and hostnames are kept as they are.
    let mut map = BTreeMap::new();
    let meta = b"instance_id: theirs\nlocal-hostname: theirs\n";
    map.insert("meta-data".to_string(), base64_encode(meta));
    map.insert("vendor-data".to_string(), base64_encode(b"v"));
    map.insert("network-config".to_string(), base64_encode(b"n"));
    let f = from_flintlock_metadata(&map, id, "mine").unwrap();
    assert_eq!(f.meta_data, meta);
    assert_eq!(f.vendor_data.as_deref(), Some(&b"v"[..]));
    assert_eq!(f.network_config.as_deref(), Some(&b"n"[..]));

    // Unknown keys are refused, naming the allowed ones.
    let mut bad = BTreeMap::new();
    bad.insert("userdata".to_string(), base64_encode(b"x"));
    let e = from_flintlock_metadata(&bad, id, "").unwrap_err();
    assert!(matches!(&e, CidataError::UnknownKey { key } if key == "userdata"));
    let msg = e.to_string();
    for k in ["meta-data", "user-data", "vendor-data", "network-config"] {
        assert!(msg.contains(k), "{msg}");
    }

    // Bad base64 names its key.
    for value in ["not base64!", "Z", "Zg==="] {
        let mut bad = BTreeMap::new();
        bad.insert("user-data".to_string(), value.to_string());
        let e = from_flintlock_metadata(&bad, id, "").unwrap_err();
        assert!(
            matches!(&e, CidataError::Base64 { key } if key == "user-data"),
            "{value}: {e:?}"
        );
    }
    // Padding is optional and line wraps are fine.
    let mut map = BTreeMap::new();
    map.insert("user-data".to_string(), "aGVs\r\nbG8".to_string());
    assert_eq!(
        from_flintlock_metadata(&map, id, "").unwrap().user_data,
        b"hello"
    );

    // The instance id must be usable.
    assert!(matches!(
        from_flintlock_metadata(&BTreeMap::new(), " ", ""),
        Err(CidataError::InstanceId(_))
    ));
    assert!(from_flintlock_metadata(&BTreeMap::new(), "a\nb", "").is_err());
}

#[test]
fn build_errors_are_clear() {
    let dir = TempDir::new("cidata-errors");
    let img = dir.0.join("no-such-dir").join("x.img");
    let e = build_cidata(&img, &CidataFiles::default()).unwrap_err();
    assert!(matches!(e, CidataError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("no-such-dir"), "{e}");
}
