//! NoCloud `cidata` seed disks for Flintlock microVMs.
//!
//! cloud-init's NoCloud datasource finds a FAT (or ISO 9660) filesystem
//! labelled `cidata`/`CIDATA` and reads `meta-data`, `user-data` and the
//! optional `vendor-data` and `network-config` from its root directory.
//!
//! [`from_flintlock_metadata`] turns a Flintlock `metadata` map (base64
//! values) into [`CidataFiles`], and [`build_cidata`] writes those into a
//! small vfat image without mounting anything: `mkfs.vfat` (Debian package
//! `dosfstools`) formats a file and `mcopy` (package `mtools`) copies the
//! files in. Both run in one [`crate::sandbox`] job (a `/bin/sh` script
//! with the fixed NoCloud file names as arguments): the files are bound
//! read-only at `/in`, the image is made in the job's `/out` and moved to
//! its place with `O_NOFOLLOW`.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::sandbox::{self, Job, PrivateDir, SandboxError};

/// Errors from building cidata images and decoding Flintlock metadata.
#[derive(Debug, thiserror::Error)]
pub enum CidataError {
    /// A required external tool is not installed.
    #[error("{tool} not found in PATH, /usr/sbin or /sbin: install the Debian package `{package}` (apt-get install -y {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    /// An external tool ran and failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    /// Filesystem I/O on the output or staging files.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A metadata key that is not a NoCloud file name.
    #[error("unknown metadata key {key:?}: allowed keys are meta-data, user-data, vendor-data, network-config")]
    UnknownKey { key: String },
    /// A metadata value that is not valid base64.
    #[error("metadata {key:?} is not valid base64")]
    Base64 { key: String },
    /// meta-data that cannot be extended with the instance id.
    #[error("meta-data: {0}")]
    MetaData(String),
    /// vendor-data that cannot be extended with volume mounts.
    #[error("vendor-data: {0}")]
    VendorData(String),
    /// The instance id is empty or has control characters.
    #[error("invalid instance id {0:?}")]
    InstanceId(String),
    /// The sandbox job failed to run or to give its image.
    #[error("cidata sandbox: {0}")]
    Sandbox(Box<SandboxError>),
}

impl From<SandboxError> for CidataError {
    fn from(e: SandboxError) -> Self {
        CidataError::Sandbox(Box::new(e))
    }
}

/// The four NoCloud files. `user_data` is always written (cloud-init wants
/// the file even when empty); the optional ones only when present.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidataFiles {
    pub meta_data: Vec<u8>,
    pub user_data: Vec<u8>,
    pub vendor_data: Option<Vec<u8>>,
    pub network_config: Option<Vec<u8>>,
}

/// Metadata keys Flintlock accepts, which are also the file names.
pub const ALLOWED_KEYS: [&str; 4] = ["meta-data", "user-data", "vendor-data", "network-config"];

/// Volume label of the image.
pub const VOLUME_LABEL: &str = "CIDATA";

impl CidataFiles {
    /// `(file name, contents)` in the order they are written.
    pub fn entries(&self) -> Vec<(&'static str, &[u8])> {
        let mut v: Vec<(&'static str, &[u8])> = vec![
            ("meta-data", &self.meta_data),
            ("user-data", &self.user_data),
        ];
        if let Some(d) = &self.vendor_data {
            v.push(("vendor-data", d));
        }
        if let Some(d) = &self.network_config {
            v.push(("network-config", d));
        }
        v
    }
}

/// Writes a vfat image labelled `CIDATA` holding `files` to `out`
/// (replacing it). The image is sized to fit (at least 1 MiB). It is built
/// under a temporary name next to `out` and renamed into place, so `out`
/// never holds a half-written image; staging files are removed on every
/// path.
pub fn build_cidata(out: &Path, files: &CidataFiles) -> Result<(), CidataError> {
    let mkfs = find_tool("mkfs.vfat", "dosfstools")?;
    let mcopy = find_tool("mcopy", "mtools")?;
    let sh = sandbox::find_program("sh").ok_or(CidataError::ToolMissing {
        tool: "sh",
        package: "dash",
    })?;

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::metadata(&dir).map_err(|source| CidataError::Io {
        what: "output directory",
        path: dir.clone(),
        source,
    })?;
    let stage = PrivateDir::new("cidata")?;
    let input = stage.path().join("in");
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CidataError::Io { what, path, source }
    };
    std::fs::create_dir(&input).map_err(io("create staging directory", &input))?;
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod", &input))?;
    let mut names = Vec::new();
    for (name, contents) in files.entries() {
        let src = input.join(name);
        std::fs::write(&src, contents).map_err(io("write", &src))?;
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &src))?;
        names.push(name);
    }

    // Size: each file rounded up to 4 KiB clusters plus FAT/root overhead.
    let data: u64 = files
        .entries()
        .iter()
        .map(|(_, d)| (d.len() as u64).div_ceil(4096) * 4096 + 4096)
        .sum();
    let kib = (data + data / 8).div_ceil(1024) + 512;
    let kib = kib.max(1024);

    const SCRIPT: &str = "set -e; mkfs=$1; mcopy=$2; kib=$3; label=$4; shift 4; \
        \"$mkfs\" -n \"$label\" -C /out/image \"$kib\" >/dev/null; \
        for f in \"$@\"; do MTOOLS_SKIP_CHECK=1 \"$mcopy\" -i /out/image \"/in/$f\" \"::$f\"; done";
    let run = Job::new(sh)?
        .ro(&input, "/in")
        .max_file(kib * 1024)
        .arg("-c")
        .arg(SCRIPT)
        .arg("sh")
        .arg(&mkfs)
        .arg(&mcopy)
        .arg(kib.to_string())
        .arg(VOLUME_LABEL)
        .args(names)
        .run()?;
    if !run.success() {
        let mut stderr = String::from_utf8_lossy(&run.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&run.stdout).trim().to_string();
        }
        let mut cut = stderr.len().min(2000);
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        return Err(CidataError::ToolFailed {
            tool: "mkfs.vfat/mcopy",
            status: run.describe(),
            stderr,
        });
    }
    run.take_file("image", out, kib * 1024, 0o644)?;
    Ok(())
}

/// Finds `tool` in PATH or the sbin directories (mkfs.vfat lives in
/// /usr/sbin, which non-login PATHs often lack).
fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, CidataError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
        .ok_or(CidataError::ToolMissing { tool, package })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Decodes a Flintlock `metadata` map into the NoCloud files.
///
/// * Keys must be among [`ALLOWED_KEYS`]; anything else is an error naming
///   the allowed keys.
/// * Values are standard base64 (padding optional, ASCII whitespace such
///   as line wraps ignored).
/// * meta-data (YAML, empty when absent) keeps the user's content; if it
///   has no top-level `instance_id`/`instance-id` key, both
///   `instance_id: <id>` (Flintlock's spelling) and `instance-id: <id>`
///   (the key cloud-init's NoCloud reads) are appended, and likewise
///   `local-hostname`/`local_hostname` when `hostname` is not empty. A JSON
///   object (valid YAML) gets the keys inserted instead.
/// * user-data is empty when absent.
pub fn from_flintlock_metadata(
    map: &BTreeMap<String, String>,
    instance_id: &str,
    hostname: &str,
) -> Result<CidataFiles, CidataError> {
    if instance_id.trim().is_empty() || instance_id.chars().any(char::is_control) {
        return Err(CidataError::InstanceId(instance_id.to_string()));
    }
    let mut files = CidataFiles::default();
    let mut meta = None;
    for (key, value) in map {
        let decoded = decode_b64(value).ok_or_else(|| CidataError::Base64 { key: key.clone() })?;
        match key.as_str() {
            "meta-data" => meta = Some(decoded),
            "user-data" => files.user_data = decoded,
            "vendor-data" => files.vendor_data = Some(decoded),
            "network-config" => files.network_config = Some(decoded),
            _ => return Err(CidataError::UnknownKey { key: key.clone() }),
        }
    }
    files.meta_data = complete_meta_data(&meta.unwrap_or_default(), instance_id, hostname)?;
    Ok(files)
}

fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    crate::images::hub::base64_decode(&compact)
}

/// Adds the instance id (and hostname) to meta-data when missing.
fn complete_meta_data(
    meta: &[u8],
    instance_id: &str,
    hostname: &str,
) -> Result<Vec<u8>, CidataError> {
    let text =
        std::str::from_utf8(meta).map_err(|_| CidataError::MetaData("not UTF-8 text".into()))?;
    let mut add: Vec<(&str, &str)> = Vec::new();
    let has = |keys: &[&str]| keys.iter().any(|k| has_top_level_key(text, k));
    if !has(&["instance_id", "instance-id"]) {
        add.push(("instance_id", instance_id));
        add.push(("instance-id", instance_id));
    }
    if !hostname.is_empty() && !has(&["local-hostname", "local_hostname"]) {
        add.push(("local-hostname", hostname));
        add.push(("local_hostname", hostname));
    }
    if add.is_empty() {
        return Ok(meta.to_vec());
    }

    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        // A flow mapping: only JSON can be extended safely.
        let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(trimmed)
            .map_err(|_| {
                CidataError::MetaData(
                    "a flow-style mapping that is not JSON; use block YAML or JSON".into(),
                )
            })?;
        for (k, v) in add {
            obj.entry(k.to_string())
                .or_insert_with(|| serde_json::Value::String(v.to_string()));
        }
        let mut out = serde_json::to_vec(&obj).map_err(|e| CidataError::MetaData(e.to_string()))?;
        out.push(b'\n');
        return Ok(out);
    }

    let mut out = text.to_string();
    // A trailing document-end marker would hide appended keys.
    let body_end = out.trim_end().len();
    if out[..body_end].ends_with("\n...") || &out[..body_end] == "..." {
        out.truncate(body_end - 3);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for (k, v) in add {
        // JSON strings are valid YAML double-quoted scalars.
        let quoted = serde_json::to_string(v).map_err(|e| CidataError::MetaData(e.to_string()))?;
        out.push_str(&format!("{k}: {quoted}\n"));
    }
    Ok(out.into_bytes())
}

/// Adds cloud-init `mounts` for `(device, mount point)` pairs to
/// vendor-data, as Flintlock mounts additional volumes: a `#cloud-config`
/// vendor-data is created when there is none; an existing one (block YAML)
/// gets `mounts:` (and `mount_default_fields:`) appended unless it already
/// has that key, in which case the user's mounts stand. Mount points must
/// already be checked (`validate_mount_point`); they are written quoted.
pub fn add_mounts(files: &mut CidataFiles, mounts: &[(String, String)]) -> Result<(), CidataError> {
    if mounts.is_empty() {
        return Ok(());
    }
    let mut text = match &files.vendor_data {
        None => "#cloud-config\n".to_string(),
        Some(v) => {
            let t = std::str::from_utf8(v)
                .map_err(|_| CidataError::VendorData("not UTF-8 text".into()))?;
            let first = t.lines().next().unwrap_or("").trim_end();
            if first != "#cloud-config" && first != "## template: jinja" {
                return Err(CidataError::VendorData(
                    "volumes with a mountPoint need #cloud-config vendor-data (or none)".into(),
                ));
            }
            if has_top_level_key(t, "mounts") {
                return Ok(());
            }
            t.to_string()
        }
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("mounts:\n");
    for (dev, point) in mounts {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        text.push_str(&format!("- [{}, {}]\n", q(dev), q(point)));
    }
    if !has_top_level_key(&text, "mount_default_fields") {
        text.push_str(
            "mount_default_fields: [None, None, \"auto\", \"defaults,nofail\", \"0\", \"2\"]\n",
        );
    }
    files.vendor_data = Some(text.into_bytes());
    Ok(())
}

/// Whether block YAML `text` has `key` as a top-level mapping key (plain,
/// single- or double-quoted).
fn has_top_level_key(text: &str, key: &str) -> bool {
    text.lines().any(|line| {
        if line.starts_with([' ', '\t', '#', '-']) {
            return false;
        }
        let line = line.trim_end();
        [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                line.strip_prefix(k.as_str())
                    .map(|rest| {
                        let rest = rest.trim_start();
                        rest == ":" || rest.starts_with(": ") || rest.starts_with(":\t")
                    })
                    .unwrap_or(false)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_go_into_vendor_data() {
        let m = vec![("vdb".to_string(), "/mnt/data".to_string())];
        let mut f = CidataFiles::default();
        add_mounts(&mut f, &m).unwrap();
        let v = String::from_utf8(f.vendor_data.clone().unwrap()).unwrap();
        assert!(v.starts_with("#cloud-config\n"), "{v}");
        assert!(v.contains("- [\"vdb\", \"/mnt/data\"]"), "{v}");
        let mut f = CidataFiles {
            vendor_data: Some(b"#cloud-config\nruncmd: [ls]".to_vec()),
            ..Default::default()
        };
        add_mounts(&mut f, &m).unwrap();
        let v = String::from_utf8(f.vendor_data.clone().unwrap()).unwrap();
        assert!(v.contains("runcmd: [ls]\nmounts:\n"), "{v}");
        let mut f = CidataFiles {
            vendor_data: Some(b"#!/bin/sh\necho".to_vec()),
            ..Default::default()
        };
        assert!(add_mounts(&mut f, &m).is_err());
        let mut f = CidataFiles {
            vendor_data: Some(b"#cloud-config\nmounts: []\n".to_vec()),
            ..Default::default()
        };
        add_mounts(&mut f, &m).unwrap();
        assert_eq!(f.vendor_data.unwrap(), b"#cloud-config\nmounts: []\n");
    }

    #[test]
    fn top_level_keys() {
        let y = "instance-id: a\n  local-hostname: nested\n\"x\": 1\n#instance_id: c\nfoo:bar\n";
        assert!(has_top_level_key(y, "instance-id"));
        assert!(!has_top_level_key(y, "local-hostname"));
        assert!(has_top_level_key(y, "x"));
        assert!(!has_top_level_key(y, "instance_id"));
        assert!(
            !has_top_level_key(y, "foo"),
            "foo:bar is a scalar, not a key"
        );
        assert!(has_top_level_key("k:\n  a: 1\n", "k"));
    }

    #[test]
    fn meta_data_completion() {
        let out = complete_meta_data(b"platform: x", "id1", "h").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "platform: x\ninstance_id: \"id1\"\ninstance-id: \"id1\"\n\
             local-hostname: \"h\"\nlocal_hostname: \"h\"\n"
        );
        let keep = b"instance-id: mine\nlocal_hostname: me\n";
        assert_eq!(complete_meta_data(keep, "id1", "h").unwrap(), keep.to_vec());
        let out = complete_meta_data(b"a: 1\n...\n", "i", "").unwrap();
        assert_eq!(out, b"a: 1\ninstance_id: \"i\"\ninstance-id: \"i\"\n");
        let out = complete_meta_data(b"{\"a\": 1}", "i", "").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["instance_id"], "i");
        assert_eq!(v["a"], 1);
        assert!(complete_meta_data(b"{a: 1}", "i", "").is_err());
        assert!(complete_meta_data(&[0xff], "i", "").is_err());
    }

    #[test]
    fn base64_with_line_wraps() {
        assert_eq!(decode_b64("aGVs\nbG8=\n").unwrap(), b"hello");
        assert!(decode_b64("aGVs*bG8=").is_none());
    }

    #[test]
    fn missing_tool_names_package() {
        let e = find_tool("definitely-not-a-tool-xyz", "some-pkg").unwrap_err();
        assert!(e.to_string().contains("apt-get install -y some-pkg"), "{e}");
    }
}
