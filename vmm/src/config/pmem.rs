//! `PUT`/`PATCH /pmem/{id}`: Firecracker's shapes. ember has no virtio-pmem
//! device; the requests are decoded and then refused by name.

use devices::virtio::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

/// `PUT /pmem/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// The device id.
    pub id: String,
    /// The backing file.
    pub path_on_host: String,
    /// Boot from this device.
    #[serde(default)]
    pub root_device: bool,
    /// Map the file read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /pmem/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PmemUpdate {
    /// The device id.
    pub id: String,
    /// New limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}
