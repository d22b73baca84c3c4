//! `PUT /snapshot/create` and `/snapshot/load`: Firecracker's shapes, plus
//! ember's load overrides (a MAC, a vsock CID, a moved drive file).

use serde::{Deserialize, Serialize};

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Guest memory file.
    pub mem_file_path: String,
    /// VM state file.
    pub snapshot_path: String,
    /// `Full` (default) or `Diff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
    /// Firecracker's old target format version (firecracker-go-sdk still
    /// sends it when set); only this ember-vmm's own version is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Snapshot kinds.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only pages dirtied since the last snapshot.
    Diff,
}

/// Memory backend of a snapshot load.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: String,
    /// The file or the UFFD socket.
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// VM state file.
    pub snapshot_path: String,
    /// Deprecated memory file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Memory backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Dirty page tracking after the load.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Resume after loading.
    #[serde(default)]
    pub resume_vm: bool,
    /// TAP (and, ember's, MAC) overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Vsock socket (and, ember's, CID) override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Drive files that moved (ember's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    /// KVM_CLOCK_REALTIME on restore.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages of the restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// `network_overrides[]`: a restored interface's TAP, and its MAC.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface (must exist in the snapshot).
    pub iface_id: String,
    /// The TAP device to use instead.
    pub host_dev_name: String,
    /// A new guest MAC (ember extension): the device's config changes and
    /// the guest is told with a config interrupt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `vsock_override`: a restored vsock's host socket, and its CID.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The host-side unix socket to use instead.
    pub uds_path: String,
    /// A new guest CID (ember extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u64>,
}

/// `drive_overrides[]` (ember extension): a drive whose file moved.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive (must exist in the snapshot).
    pub drive_id: String,
    /// Its file now.
    pub path_on_host: String,
}

/// Errors in snapshot parameters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotConfigError {
    /// Both `mem_backend` and the deprecated `mem_file_path`, or neither.
    #[error("Exactly one of mem_backend and mem_file_path must be given.")]
    MemorySource,
    /// An unknown backend type.
    #[error("Unknown mem_backend backend_type {0:?}: File or Uffd.")]
    BackendType(String),
    /// A path that is empty.
    #[error("{0} cannot be empty.")]
    EmptyPath(&'static str),
    /// An override naming a device the snapshot does not have.
    #[error("The snapshot has no {what} {id:?} to override.")]
    UnknownDevice {
        /// `network interface`, `drive`, `vsock device`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// An override's value is invalid.
    #[error("Invalid override: {0}")]
    BadOverride(String),
    /// The state and memory files are one file.
    #[error("snapshot_path and mem_file_path must be different files.")]
    SamePath,
    /// `version` of another snapshot format.
    #[error("Cannot create a snapshot of format version {0}: this ember-vmm writes {1}.")]
    Version(String, String),
}

/// Where a load's guest memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// Map the file `MAP_PRIVATE`.
    File(String),
    /// A userfaultfd page-fault handler listening on this unix socket.
    Uffd(String),
}

impl SnapshotLoadParams {
    /// The memory source: `mem_backend`, or the deprecated `mem_file_path`
    /// (a File backend), exactly one of them.
    pub fn memory_source(&self) -> Result<MemorySource, SnapshotConfigError> {
        if self.snapshot_path.is_empty() {
            return Err(SnapshotConfigError::EmptyPath("snapshot_path"));
        }
        let src = match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) => match b.backend_type.as_str() {
                "File" => MemorySource::File(b.backend_path.clone()),
                "Uffd" => MemorySource::Uffd(b.backend_path.clone()),
                other => return Err(SnapshotConfigError::BackendType(other.into())),
            },
            (None, Some(p)) => MemorySource::File(p.clone()),
            _ => return Err(SnapshotConfigError::MemorySource),
        };
        match &src {
            MemorySource::File(p) | MemorySource::Uffd(p) if p.is_empty() => {
                Err(SnapshotConfigError::EmptyPath("backend_path"))
            }
            _ => Ok(src),
        }
    }

    /// Applies the overrides to `cfg` (the snapshot's configuration);
    /// an override naming a device the snapshot lacks is refused.
    pub fn apply_overrides(&self, cfg: &mut super::VmConfig) -> Result<(), SnapshotConfigError> {
        for o in &self.network_overrides {
            let n = cfg
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| SnapshotConfigError::UnknownDevice {
                    what: "network interface",
                    id: o.iface_id.clone(),
                })?;
            n.host_dev_name = o.host_dev_name.clone();
            if let Some(m) = &o.guest_mac {
                n.guest_mac = Some(m.clone());
            }
            n.validate()
                .map_err(|e| SnapshotConfigError::BadOverride(e.to_string()))?;
        }
        if let Some(o) = &self.vsock_override {
            let v = cfg
                .vsock
                .as_mut()
                .ok_or_else(|| SnapshotConfigError::UnknownDevice {
                    what: "vsock device",
                    id: "vsock".into(),
                })?;
            v.uds_path = o.uds_path.clone();
            if let Some(c) = o.guest_cid {
                v.guest_cid = c;
            }
            v.validate()
                .map_err(|e| SnapshotConfigError::BadOverride(e.to_string()))?;
        }
        for o in &self.drive_overrides {
            let d = cfg
                .drives
                .iter_mut()
                .find(|d| d.drive_id == o.drive_id)
                .ok_or_else(|| SnapshotConfigError::UnknownDevice {
                    what: "drive",
                    id: o.drive_id.clone(),
                })?;
            d.path_on_host = o.path_on_host.clone();
            d.validate()
                .map_err(|e| SnapshotConfigError::BadOverride(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(j: &str) -> SnapshotLoadParams {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn memory_source_is_exactly_one() {
        let p = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
        );
        assert_eq!(p.memory_source(), Ok(MemorySource::File("m".into())));
        let p = load(r#"{"snapshot_path":"s","mem_file_path":"m"}"#);
        assert_eq!(p.memory_source(), Ok(MemorySource::File("m".into())));
        let p = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"u"}}"#,
        );
        assert_eq!(p.memory_source(), Ok(MemorySource::Uffd("u".into())));
        let p = load(r#"{"snapshot_path":"s"}"#);
        assert_eq!(p.memory_source(), Err(SnapshotConfigError::MemorySource));
        let p = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Disk","backend_path":"u"}}"#,
        );
        assert!(matches!(
            p.memory_source(),
            Err(SnapshotConfigError::BackendType(_))
        ));
    }

    #[test]
    fn overrides_need_existing_devices() {
        let mut cfg = super::super::VmConfig::default();
        let p = load(
            r#"{"snapshot_path":"s","mem_file_path":"m","network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}]}"#,
        );
        let e = p.apply_overrides(&mut cfg).unwrap_err();
        assert!(e.to_string().contains("eth0"), "{e}");
        let p = load(
            r#"{"snapshot_path":"s","mem_file_path":"m","drive_overrides":[{"drive_id":"root","path_on_host":"/x"}]}"#,
        );
        assert!(p.apply_overrides(&mut cfg).is_err());
        let p =
            load(r#"{"snapshot_path":"s","mem_file_path":"m","vsock_override":{"uds_path":"/v"}}"#);
        assert!(p.apply_overrides(&mut cfg).is_err());
    }
}
