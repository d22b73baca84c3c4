//! `PUT /metrics`: where Firecracker-shaped metrics lines are written. The
//! counters and the writer are [`crate::metrics`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `PUT /metrics`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A file or named pipe; one JSON object per line is appended.
    pub metrics_path: String,
    /// Add the instance id as a top-level `"id"` on each line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emit_id: bool,
    /// Operator key-value pairs, written under `"properties"` on each line.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}
