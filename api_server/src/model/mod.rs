//! ember's domain model: images, instances, volumes and pods. The three
//! REST faces (UniK, hyperd, Flintlock) translate to and from these types
//! and call the layer in this folder; no HTTP lives here.
//!
//! - the record types (this file) and their validation;
//! - [`supervisor`]: owns the records, and prepares, installs, starts and
//!   stops what they describe;
//! - [`store`]: persistence of the records and the on-disk layout;
//! - [`artifacts`]: the worker side of image and volume builds and of the
//!   UniK hub's transfers;
//! - [`host_paths`]: which host paths requests may name;
//! - [`jobs`]: the loop's work queue (worker threads whose results are
//!   applied on the loop thread);
//! - [`microvms`]: Flintlock MicroVMs and their reconciler;
//! - [`pods`]: hyperd pods, their planning and their pod VMs.

pub mod artifacts;
pub mod host_paths;
pub mod jobs;
pub mod microvms;
pub mod pods;
pub mod store;
pub mod supervisor;

/// The one provider ember's compilers serve (UniK's `provider`).
pub use crate::build::PROVIDER;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Errors validating model input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("invalid {what} name {name:?}: use 1 to 64 characters among letters, digits, '-', '_' and '.', not starting with '.' or '-'")]
    BadName { what: &'static str, name: String },
    #[error(
        "invalid mount point {0:?}: it must be an absolute path without '..', spaces or commas"
    )]
    BadMountPoint(String),
    #[error("invalid environment variable name {0:?}")]
    BadEnvName(String),
    #[error("the image names {0:?} as a file, which is not a regular file inside the image")]
    BadImageFile(String),
}

/// Checks a user-chosen resource name (it becomes part of paths and cmdlines).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadName {
            what,
            name: name.to_string(),
        })
    }
}

/// Checks a guest mount point.
pub fn validate_mount_point(m: &str) -> Result<(), ModelError> {
    let ok = m.starts_with('/')
        && m.len() <= 128
        && !m.split('/').any(|c| c == "..")
        && !m
            .chars()
            .any(|c| c.is_whitespace() || c == ',' || c == '"' || c == '@');
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadMountPoint(m.to_string()))
    }
}

/// Checks an environment variable name.
pub fn validate_env_name(k: &str) -> Result<(), ModelError> {
    let ok = !k.is_empty()
        && k.len() <= 64
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadEnvName(k.to_string()))
    }
}

/// A bootable image: a kernel (and maybe an initrd) plus how to run it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: String,
    /// Compiler triple parts.
    pub provider: String,
    pub base: String,
    pub lang: String,
    /// RFC 3339.
    pub created: String,
    pub size_mb: u64,
    /// File names inside the image directory.
    pub kernel: String,
    pub initrd: Option<String>,
    /// Kernel command line the image always gets.
    pub boot_args: String,
    /// Default application arguments (after `--`).
    pub args: String,
    /// Mount points that need a volume at run time.
    pub mounts: Vec<String>,
    pub default_memory_mb: u32,
    /// e.g. "elf" or "bzimage+initramfs".
    pub format: String,
    /// Instant starts for this image (restored from a snapshot of its
    /// booted guest, see `runtime::warm`): None follows emberd's
    /// `--snapshot-starts`; Some(false) keeps it booting cold. Only images
    /// whose runtime has a restore channel use it ([`Image::restorable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_starts: Option<bool>,
}

/// Checks that `name` is a plain file name (no directories) of a regular
/// file (not a link) inside `dir`.
pub fn check_image_file(dir: &std::path::Path, name: &str) -> Result<(), ModelError> {
    let bad = || ModelError::BadImageFile(name.to_string());
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(bad());
    }
    match std::fs::symlink_metadata(dir.join(name)) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        _ => Err(bad()),
    }
}

impl Image {
    /// Its kernel and initrd are regular files inside `dir` (an image from a
    /// hub is untrusted: it must not name host files).
    pub fn check_files(&self, dir: &std::path::Path) -> Result<(), ModelError> {
        check_image_file(dir, &self.kernel)?;
        if let Some(i) = &self.initrd {
            check_image_file(dir, i)?;
        }
        Ok(())
    }

    /// Whether its guest runtime can be restored from a snapshot: it stops
    /// at a snapshot point and reads its per-instance config after
    /// restore. Only the C unikernel runtime (`ember` base) does; Linux
    /// guests (Flintlock kernels, hyperd pod VMs) have no such channel.
    pub fn restorable(&self) -> bool {
        self.base == "ember" && self.lang == "c" && self.initrd.is_none()
    }

    /// `base-lang-provider`, the UniK compiler name.
    pub fn compiler(&self) -> String {
        format!("{}-{}-{}", self.base, self.lang, self.provider)
    }
}

/// Lifecycle of an instance.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being prepared or booting.
    Pending,
    /// Its VMM process is alive.
    Running,
    /// Not running (never started, stopped, or the guest exited).
    #[default]
    Stopped,
    /// Starting it failed, or its VMM crashed.
    Error,
}

impl InstanceState {
    /// Lower-case name as the APIs show it.
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Error => "error",
        }
    }
}

pub use crate::runtime::process::VmmProcess;

/// A volume attached to an instance without a mount point (a root disk, a
/// cloud-init seed disk...).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Disk {
    /// Volume name.
    pub volume: String,
    pub read_only: bool,
}

/// A network interface: a host TAP device (or macvtap link) and the
/// guest's MAC. The guest sees them as eth0, eth1, ... in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetInterface {
    pub host_dev_name: String,
    pub guest_mac: Option<String>,
    /// A macvtap link on this parent link instead of a TAP (Flintlock's
    /// MACVTAP interfaces); `guest_mac` is then the link's MAC too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macvtap_parent: Option<String>,
}

/// A running or stopped microVM made from an image.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub image_name: String,
    pub state: InstanceState,
    pub created: String,
    pub memory_mb: u32,
    pub env: BTreeMap<String, String>,
    /// mount point -> volume name.
    pub mounts: BTreeMap<String, String>,
    pub no_cleanup: bool,
    pub debug_mode: bool,
    pub process: Option<VmmProcess>,
    /// Why the last start failed or the VMM died, for the APIs to show.
    pub last_error: Option<String>,
    /// Exit status of the last VMM process, when known.
    pub last_exit: Option<i32>,
    /// vCPUs (0, as in state written before this field existed, means 1).
    #[serde(default)]
    pub vcpus: u8,
    /// Free-form labels (Flintlock labels, hyperd pod labels).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Data a REST face keeps with the instance; opaque to the supervisor.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Volume (name) booted as the root block device (/dev/vda).
    #[serde(default)]
    pub root_volume: Option<Disk>,
    /// Further volumes attached without a mount point, after the mounted ones.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Network interfaces (eth0, eth1, ...).
    #[serde(default)]
    pub interfaces: Vec<NetInterface>,
    /// Kernel arguments of this instance, after the image's.
    #[serde(default)]
    pub boot_args: String,
    /// How its VMM last started: restored from its image's snapshot
    /// (`Some(Snapshot)`) or booted cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<StartMode>,
    /// A virtio-vsock device (guest CID 3) whose host side is the hybrid
    /// unix socket `run/vsock.sock` in the instance's jail.
    #[serde(default)]
    pub vsock: bool,
    /// The uid (and gid) its VMM runs as: its own, from emberd's range, so
    /// no two VMMs share an identity (None: not started yet, or a record
    /// from before per-VM identities).
    #[serde(default)]
    pub vmm_uid: Option<(u32, u32)>,
}

impl Instance {
    /// Volumes in block-device order: root, mounted (by mount point), disks.
    pub fn volumes_in_order(&self) -> Vec<(Option<&str>, &str, bool)> {
        let mut v: Vec<(Option<&str>, &str, bool)> = Vec::new();
        if let Some(r) = &self.root_volume {
            v.push((None, r.volume.as_str(), r.read_only));
        }
        for (m, vol) in &self.mounts {
            v.push((Some(m.as_str()), vol.as_str(), false));
        }
        for d in &self.disks {
            v.push((None, d.volume.as_str(), d.read_only));
        }
        v
    }
}

/// How an instance's VMM was started.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// Booted from the kernel.
    Cold,
    /// Restored from its image's template snapshot.
    Snapshot,
}

impl StartMode {
    /// Lower-case name as the APIs show it.
    pub fn as_str(&self) -> &'static str {
        match self {
            StartMode::Cold => "cold",
            StartMode::Snapshot => "snapshot",
        }
    }
}

/// Volume content format.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    Ext4,
    Raw,
}

/// A disk image that instances can mount.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size_mb: u64,
    pub created: String,
    pub format: VolumeFormat,
    /// Instance id it is attached to.
    pub attachment: Option<String>,
    /// Where the instance sees it.
    pub mount_point: Option<String>,
}

/// Lifecycle of a pod (hyperd's words).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodState {
    #[default]
    Pending,
    Running,
    Failed,
    Succeeded,
}

impl PodState {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            PodState::Pending => "pending",
            PodState::Running => "running",
            PodState::Failed => "failed",
            PodState::Succeeded => "succeeded",
        }
    }
}

/// One container of a pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodContainer {
    pub id: String,
    pub name: String,
    pub image: String,
    /// pending, running, succeeded (exit 0) or failed.
    pub state: String,
    /// Exit code of its main process (status, or 128 + signal), once known.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Volume (name) holding its root filesystem, once built; kept after
    /// the pod stops, for `/container/commit`.
    #[serde(default)]
    pub rootfs: Option<String>,
}

/// A group of containers run together in one VM (hyperd's pod).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pod {
    pub id: String,
    pub name: String,
    /// The pod spec as given (JSON).
    pub spec: String,
    /// Instance id of the VM that runs it, if any.
    pub vm: Option<String>,
    pub state: PodState,
    pub created: String,
    pub containers: Vec<PodContainer>,
    /// Why the last start failed.
    pub last_error: Option<String>,
    /// Its VM's vCPUs are paused (hyperd's `/pod/pause`).
    #[serde(default)]
    pub paused: bool,
}

/// Everything emberd persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub images: BTreeMap<String, Image>,
    pub instances: BTreeMap<String, Instance>,
    pub volumes: BTreeMap<String, Volume>,
    #[serde(default)]
    pub pods: BTreeMap<String, Pod>,
}

/// Finds by exact id or exact name (never by substring).
pub fn find<'a, T>(
    map: &'a BTreeMap<String, T>,
    key: &str,
    name: impl Fn(&T) -> &str,
) -> Option<&'a T> {
    map.get(key)
        .or_else(|| map.values().find(|v| name(v) == key))
}

impl State {
    /// Image by id or name.
    pub fn image(&self, key: &str) -> Option<&Image> {
        find(&self.images, key, |i| &i.name)
    }
    /// Instance by id or name.
    pub fn instance(&self, key: &str) -> Option<&Instance> {
        find(&self.instances, key, |i| &i.name)
    }
    /// Volume by id or name.
    pub fn volume(&self, key: &str) -> Option<&Volume> {
        find(&self.volumes, key, |v| &v.name)
    }
}

/// hyperd-style id: `prefix-` and 10 random letters.
pub fn hyper_id(prefix: &str) -> String {
    let u = ulid::Ulid::new();
    let mut n = u.random() ^ u128::from(u.timestamp_ms());
    let mut s = String::with_capacity(prefix.len() + 11);
    s.push_str(prefix);
    s.push('-');
    for _ in 0..10 {
        let c = (n % 52) as u8;
        n /= 52;
        s.push(if c < 26 {
            (b'a' + c) as char
        } else {
            (b'A' + c - 26) as char
        });
    }
    s
}

/// A new unique id with a readable prefix, e.g. `inst-01J...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Now, RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_mount_points() {
        assert!(validate_name("image", "hello-1.0_x").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "x;y", &"a".repeat(65)] {
            assert!(validate_name("image", bad).is_err(), "{bad}");
        }
        assert!(validate_mount_point("/data").is_ok());
        for bad in ["data", "/a/../b", "/a b", "/a,b", "/a@b"] {
            assert!(validate_mount_point(bad).is_err(), "{bad}");
        }
        assert!(validate_env_name("PATH_2").is_ok());
        assert!(validate_env_name("2X").is_err());
        assert!(validate_env_name("A=B").is_err());
    }

    #[test]
    fn image_files_must_stay_inside_the_image() {
        let d = std::env::temp_dir().join(format!("ember-imgfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kernel.elf"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        assert!(check_image_file(&d, "kernel.elf").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "/etc/shadow",
            "../x",
            "a/b",
            "link",
            "missing",
        ] {
            assert!(check_image_file(&d, bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exact_lookup_by_id_or_name() {
        let mut s = State::default();
        s.volumes.insert(
            "vol-1".into(),
            Volume {
                id: "vol-1".into(),
                name: "data".into(),
                size_mb: 1,
                created: now_rfc3339(),
                format: VolumeFormat::Raw,
                attachment: None,
                mount_point: None,
            },
        );
        assert!(s.volume("vol-1").is_some());
        assert!(s.volume("data").is_some());
        assert!(s.volume("dat").is_none());
        assert!(s.volume("vol").is_none());
    }

    #[test]
    fn hyper_ids() {
        let a = hyper_id("pod");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("pod-") && a[4..].chars().all(|c| c.is_ascii_alphabetic()));
        assert_ne!(a, hyper_id("pod"));
    }

    #[test]
    fn ids_are_unique_and_prefixed() {
        let a = new_id("inst");
        let b = new_id("inst");
        assert!(a.starts_with("inst-"));
        assert_ne!(a, b);
        assert!(now_rfc3339().ends_with('Z'));
    }
}
