//! Pod volumes and files: hyperd's pod `volumes` and `files` and the
//! containers' references to them, as emberd runs them.
//!
//! - A volume with no `source` (what `hyperctl run -v /data` sends) is an
//!   empty ext4 disk made for the pod, the ember volume
//!   `<pod id>-vol-<name>`; it keeps its data across restarts of the pod and
//!   goes with the pod.
//! - A volume with `"format": "ember"` (or `"driver": "ember"`) is the ember
//!   volume (UniK's `/volumes`) named by `source`; it must be free, and is
//!   attached to the pod VM while the pod runs.
//! - Anything else (host directories, `vfs`, `raw`/`qcow2` files, `rbd`)
//!   is refused with the reason: a pod VM shares no host filesystem.
//!
//! Every volume is one more virtio-blk disk of the pod VM, after the
//! containers' root disks, in pod order (pod-level volumes, then those
//! given inline as a container reference's `detail`, as `hyperctl -v`
//! does); the agent mounts it at each referencing container's `path`.
//!
//! Files come from the pod's `files` (`content`, `encoding` `raw` or
//! `base64`; a `uri` is refused), referenced by a container's `files`
//! entry (`filename`, `path`, `perm` in octal, numeric `user`/`group`), and
//! are written into the container root before it starts.

use ember_agent::protocol::{ContainerFile, VolumeMount};
use serde::Deserialize;

use super::{PodError, Result};

/// Largest file a pod spec may carry, and all files of one container.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// All files of one container (they travel in one agent frame).
pub const MAX_CONTAINER_FILE_BYTES: usize = 256 * 1024;

/// A pod volume in hyperd's spec.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub format: String,
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub fstype: String,
}

/// A container's volume reference.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRef {
    #[serde(default)]
    pub volume: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    /// The volume itself, inline (hyperctl's `-v`).
    #[serde(default)]
    pub detail: Option<VolumeSpec>,
}

/// A pod file in hyperd's spec.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FileSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub encoding: String,
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub content: String,
}

/// A container's file reference.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FileRef {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub perm: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub group: String,
    /// The file itself, inline.
    #[serde(default)]
    pub detail: Option<FileSpec>,
}

/// Where a pod volume's disk comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// An empty ext4 disk made for the pod.
    Empty,
    /// The ember volume of this name.
    Ember(String),
}

/// A pod volume, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodVolume {
    pub name: String,
    pub kind: VolumeKind,
    /// Filesystem the agent mounts (`ext4` unless the spec says otherwise).
    pub fstype: String,
}

/// The ember volume that holds pod `pod_id`'s empty volume `name`.
pub fn pod_volume_name(pod_id: &str, name: &str) -> String {
    format!("{pod_id}-vol-{name}")
}

/// Whether `v` names an ember volume (`format` or `driver` `ember`).
fn is_ember(v: &VolumeSpec) -> bool {
    v.format == "ember" || v.driver == "ember"
}

fn volume(v: &VolumeSpec) -> Result<PodVolume> {
    crate::model::validate_name("volume", &v.name).map_err(|e| PodError::Invalid(e.to_string()))?;
    if v.name.len() > 40 {
        // It becomes part of the ember volume `<pod id>-vol-<name>`.
        return Err(PodError::Invalid(format!(
            "volume name {} is longer than 40 characters",
            v.name
        )));
    }
    let fstype = match v.fstype.as_str() {
        "" | "ext4" => "ext4".to_string(),
        "ext2" | "ext3" | "xfs" | "btrfs" | "vfat" => v.fstype.clone(),
        other => {
            return Err(PodError::Invalid(format!(
                "volume {}: fstype {other:?} is not one emberd mounts (ext4, ext2, ext3, xfs, btrfs, vfat)",
                v.name
            )))
        }
    };
    let kind = if is_ember(v) {
        if v.source.is_empty() {
            return Err(PodError::Invalid(format!(
                "volume {}: an ember volume needs its name as source",
                v.name
            )));
        }
        VolumeKind::Ember(v.source.clone())
    } else if v.source.is_empty() {
        VolumeKind::Empty
    } else {
        return Err(PodError::Invalid(format!(
            "volume {}: source {:?} ({}) cannot be used: a pod VM shares no host directory or file; use an ember volume ({{\"source\": \"<volume name>\", \"format\": \"ember\"}}) or no source for an empty pod volume",
            v.name,
            v.source,
            if v.format.is_empty() { v.driver.as_str() } else { v.format.as_str() }
        )));
    };
    Ok(PodVolume {
        name: v.name.clone(),
        kind,
        fstype,
    })
}

/// The pod's volumes: pod-level ones, then inline ones (a reference's
/// `detail`) not named before. Every reference must name one.
pub fn pod_volumes(pod: &[VolumeSpec], refs: &[&[VolumeRef]]) -> Result<Vec<PodVolume>> {
    let mut out: Vec<PodVolume> = Vec::new();
    for v in pod {
        let pv = volume(v)?;
        if out.iter().any(|o| o.name == pv.name) {
            return Err(PodError::Invalid(format!(
                "two volumes are named {}",
                pv.name
            )));
        }
        out.push(pv);
    }
    for r in refs.iter().flat_map(|r| r.iter()) {
        if let Some(d) = &r.detail {
            let mut d = d.clone();
            if d.name.is_empty() {
                d.name = r.volume.clone();
            }
            if !out.iter().any(|o| o.name == d.name) {
                out.push(volume(&d)?);
            }
        }
    }
    let mut ember: Vec<&str> = Vec::new();
    for v in &out {
        if let VolumeKind::Ember(s) = &v.kind {
            if ember.contains(&s.as_str()) {
                return Err(PodError::Invalid(format!(
                    "ember volume {s} is used by two pod volumes"
                )));
            }
            ember.push(s);
        }
    }
    Ok(out)
}

/// A path inside a container: absolute, no `..`, no NUL or control
/// characters.
fn check_path(what: &str, p: &str) -> Result<()> {
    if !p.starts_with('/')
        || p.split('/').any(|c| c == "..")
        || p.chars().any(char::is_control)
        || p.len() > 4096
    {
        return Err(PodError::Invalid(format!(
            "{what} {p:?} is not an absolute path without '..'"
        )));
    }
    Ok(())
}

/// The agent's mounts for a container's references; the pod's volume `i`
/// is disk `first_disk + i`.
pub fn container_mounts(
    container: &str,
    refs: &[VolumeRef],
    vols: &[PodVolume],
    first_disk: usize,
) -> Result<Vec<VolumeMount>> {
    let mut out = Vec::new();
    for r in refs {
        let name = r
            .detail
            .as_ref()
            .map(|d| {
                if d.name.is_empty() {
                    r.volume.as_str()
                } else {
                    d.name.as_str()
                }
            })
            .unwrap_or(&r.volume);
        let i = vols.iter().position(|v| v.name == name).ok_or_else(|| {
            PodError::Invalid(format!(
                "container {container}: volume {name:?} is not a volume of the pod"
            ))
        })?;
        check_path(
            &format!("container {container}: volume {name} path"),
            &r.path,
        )?;
        if r.path == "/" {
            return Err(PodError::Invalid(format!(
                "container {container}: volume {name} cannot be mounted at /"
            )));
        }
        out.push(VolumeMount {
            device: super::plan::disk_device(first_disk + i)?,
            path: r.path.clone(),
            fstype: vols[i].fstype.clone(),
            readonly: r.read_only,
        });
    }
    Ok(out)
}

/// A numeric user or group of a file (`""` keeps root's).
fn numeric(container: &str, what: &str, v: &str) -> Result<Option<u32>> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse::<u32>().map(Some).map_err(|_| {
        PodError::Invalid(format!(
            "container {container}: file {what} {v:?} is not numeric (user names need the container's /etc/passwd, which emberd does not read)"
        ))
    })
}

/// The content of pod file `f`.
fn file_bytes(f: &FileSpec) -> Result<Vec<u8>> {
    if !f.uri.is_empty() {
        return Err(PodError::Invalid(format!(
            "file {}: files from a uri are not supported; give the content",
            f.name
        )));
    }
    let data = match f.encoding.as_str() {
        "" | "raw" => f.content.as_bytes().to_vec(),
        "base64" => ember_agent::b64::decode(f.content.trim()).map_err(|e| {
            PodError::Invalid(format!("file {}: content is not base64: {e}", f.name))
        })?,
        other => {
            return Err(PodError::Invalid(format!(
                "file {}: encoding {other:?} is neither raw nor base64",
                f.name
            )))
        }
    };
    if data.len() > MAX_FILE_BYTES {
        return Err(PodError::Invalid(format!(
            "file {} has {} bytes; pod files hold at most {MAX_FILE_BYTES}",
            f.name,
            data.len()
        )));
    }
    Ok(data)
}

/// The files written into a container: its references to the pod's
/// `files` (or inline `detail`s).
pub fn container_files(
    container: &str,
    refs: &[FileRef],
    files: &[FileSpec],
) -> Result<Vec<ContainerFile>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for r in refs {
        let f = match &r.detail {
            Some(d) => d.clone(),
            None => files
                .iter()
                .find(|f| f.name == r.filename)
                .cloned()
                .ok_or_else(|| {
                    PodError::Invalid(format!(
                        "container {container}: file {:?} is not a file of the pod",
                        r.filename
                    ))
                })?,
        };
        check_path(&format!("container {container}: file path"), &r.path)?;
        if r.path.ends_with('/') {
            return Err(PodError::Invalid(format!(
                "container {container}: file path {:?} names a directory",
                r.path
            )));
        }
        let mode = match r.perm.as_str() {
            "" => 0o644,
            p => u32::from_str_radix(p.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    PodError::Invalid(format!(
                        "container {container}: file perm {p:?} is not an octal mode"
                    ))
                })?,
        };
        let data = file_bytes(&f)?;
        total += data.len();
        if total > MAX_CONTAINER_FILE_BYTES {
            return Err(PodError::Invalid(format!(
                "container {container}: its files hold more than {MAX_CONTAINER_FILE_BYTES} bytes"
            )));
        }
        out.push(ContainerFile {
            path: r.path.clone(),
            data: ember_agent::b64::encode(&data),
            mode,
            uid: numeric(container, "user", &r.user)?,
            gid: numeric(container, "group", &r.group)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, source: &str, format: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            source: source.into(),
            format: format.into(),
            ..Default::default()
        }
    }

    #[test]
    fn volumes_resolve_or_are_refused_with_the_reason() {
        // hyperctl run -v /data: an inline volume without source.
        let refs = vec![VolumeRef {
            volume: "data12345".into(),
            path: "/data".into(),
            detail: Some(vol("data12345", "", "")),
            ..Default::default()
        }];
        let pod = vec![vol("shared", "motd", "ember")];
        let vols = pod_volumes(&pod, &[&refs]).unwrap();
        assert_eq!(
            vols.iter()
                .map(|v| (&v.name[..], &v.kind))
                .collect::<Vec<_>>(),
            [
                ("shared", &VolumeKind::Ember("motd".into())),
                ("data12345", &VolumeKind::Empty)
            ]
        );
        let m = container_mounts("c", &refs, &vols, 2).unwrap();
        assert_eq!(m[0].device, "/dev/vdd");
        assert_eq!((m[0].path.as_str(), m[0].readonly), ("/data", false));
        // hyperctl -v /host/dir:/data: a host directory.
        let e = pod_volumes(&[vol("d", "/home/u/dir", "vfs")], &[]).unwrap_err();
        assert!(e.to_string().contains("shares no host directory"), "{e}");
        assert!(pod_volumes(&[vol("d", "", "ember")], &[]).is_err());
        assert!(pod_volumes(&[vol("a", "", ""), vol("a", "", "")], &[]).is_err());
        assert!(pod_volumes(&[vol("a", "v", "ember"), vol("b", "v", "ember")], &[]).is_err());
        assert!(pod_volumes(&[vol("../x", "", "")], &[]).is_err());
        let bad = |path: &str, volume: &str| {
            container_mounts(
                "c",
                &[VolumeRef {
                    volume: volume.into(),
                    path: path.into(),
                    ..Default::default()
                }],
                &vols,
                0,
            )
        };
        assert!(bad("/x", "nope").is_err());
        assert!(bad("rel", "shared").is_err());
        assert!(bad("/a/../b", "shared").is_err());
        assert!(bad("/", "shared").is_err());
        assert!(bad("/srv", "shared").is_ok());
    }

    #[test]
    fn files_resolve_with_modes_owners_and_limits() {
        let files = vec![
            FileSpec {
                name: "motd".into(),
                content: "hello\n".into(),
                ..Default::default()
            },
            FileSpec {
                name: "bin".into(),
                encoding: "base64".into(),
                content: "AAEC".into(),
                ..Default::default()
            },
        ];
        let r = |f: &str, p: &str, perm: &str, user: &str| FileRef {
            filename: f.into(),
            path: p.into(),
            perm: perm.into(),
            user: user.into(),
            ..Default::default()
        };
        let out = container_files(
            "c",
            &[
                r("motd", "/etc/motd", "0600", "1000"),
                r("bin", "/b", "", ""),
            ],
            &files,
        )
        .unwrap();
        assert_eq!(out[0].mode, 0o600);
        assert_eq!(out[0].uid, Some(1000));
        assert_eq!(ember_agent::b64::decode(&out[0].data).unwrap(), b"hello\n");
        assert_eq!(out[1].mode, 0o644);
        assert_eq!(ember_agent::b64::decode(&out[1].data).unwrap(), [0, 1, 2]);
        for bad in [
            r("nope", "/x", "", ""),
            r("motd", "x", "", ""),
            r("motd", "/x/", "", ""),
            r("motd", "/x", "999", ""),
            r("motd", "/x", "", "www-data"),
        ] {
            assert!(container_files("c", &[bad], &files).is_err());
        }
        let uri = FileSpec {
            name: "u".into(),
            uri: "http://example.com/x".into(),
            ..Default::default()
        };
        let e = container_files("c", &[r("u", "/x", "", "")], &[uri]).unwrap_err();
        assert!(e.to_string().contains("uri"), "{e}");
        let big = FileSpec {
            name: "big".into(),
            content: "x".repeat(MAX_FILE_BYTES + 1),
            ..Default::default()
        };
        assert!(container_files("c", &[r("big", "/x", "", "")], &[big]).is_err());
    }
}
