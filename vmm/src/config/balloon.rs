//! `/balloon`, `/balloon/statistics` and `/balloon/hinting/*`: Firecracker's
//! shapes, decoded and checked so a malformed body gets the usual JSON error.
//! ember has no virtio-balloon device yet; every balloon operation is
//! answered with [`crate::actions::ActionError::NotImplemented`] naming it.

use serde::{Deserialize, Serialize};

/// `PUT /balloon`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest is short of memory.
    pub deflate_on_oom: bool,
    /// Statistics refresh interval in seconds (0: off).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Statistics refresh interval in seconds.
    pub stats_polling_interval_s: u16,
}

/// `PATCH /balloon/hinting/start`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonHintingStart {
    /// Acknowledge automatically when the guest reports done.
    #[serde(default)]
    pub acknowledge_on_stop: bool,
}
