//! `/balloon`, `/balloon/statistics` and `/balloon/hinting/*`: Firecracker's
//! shapes. The device is `devices::virtio::balloon`.

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

/// Why a balloon configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonConfigError {
    /// The target is larger than guest memory.
    #[error("Amount of pages requested is too large: amount_mib {amount_mib} is more than the guest memory ({mem_size_mib} MiB).")]
    TooManyPagesRequested {
        /// Asked for.
        amount_mib: u32,
        /// Guest memory.
        mem_size_mib: usize,
    },
}

impl BalloonConfig {
    /// Checks the target against the guest's memory size.
    pub fn validate(&self, mem_size_mib: usize) -> Result<(), BalloonConfigError> {
        if self.amount_mib as usize > mem_size_mib {
            return Err(BalloonConfigError::TooManyPagesRequested {
                amount_mib: self.amount_mib,
                mem_size_mib,
            });
        }
        Ok(())
    }

    /// The device's configuration.
    pub fn device_config(&self) -> devices::virtio::balloon::BalloonConfig {
        devices::virtio::balloon::BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_polling_interval_s: self.stats_polling_interval_s,
            free_page_hinting: self.free_page_hinting,
            free_page_reporting: self.free_page_reporting,
        }
    }
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
