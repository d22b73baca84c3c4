//! `/hotplug/memory`: Firecracker's virtio-mem shapes. ember has no
//! virtio-mem device; the requests are decoded and then refused by name.

use serde::{Deserialize, Serialize};

/// `PUT /hotplug/memory`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Total hotpluggable size in MiB.
    #[serde(default)]
    pub total_size_mib: Option<u32>,
    /// Slot size in MiB (at least 128).
    #[serde(default)]
    pub slot_size_mib: Option<u32>,
    /// Block size in MiB (at least 2).
    #[serde(default)]
    pub block_size_mib: Option<u32>,
}

/// `PATCH /hotplug/memory`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    /// New target size in MiB.
    #[serde(default)]
    pub requested_size_mib: Option<u32>,
}
