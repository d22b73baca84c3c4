//! `PUT /snapshot/create` and `/snapshot/load`: Firecracker's shapes. The
//! snapshot support itself is the next issue; until it lands both are
//! decoded, checked for the right VM phase, and answered "not yet".

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
    /// TAP overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<serde_json::Value>,
    /// Vsock socket override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<serde_json::Value>,
    /// KVM_CLOCK_REALTIME on restore.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages of the restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}
