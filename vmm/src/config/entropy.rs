//! `PUT /entropy`: Firecracker's shape. The device is
//! `devices::virtio::rng`.

use devices::virtio::rate_limiter::RateLimiterConfig;
use serde::{Deserialize, Serialize};

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EntropyDeviceConfig {
    /// Limits on the bytes handed to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}
