//! The index's records (one name of a stored image each), the hyperd
//! `/images/get` entry of one, and the config changes of a commit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::NONE;
use crate::images::oci::ImageConfig;

/// The runtime config kept in a record (the full config is in the layout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub user: String,
}

impl From<&ImageConfig> for RecordConfig {
    fn from(c: &ImageConfig) -> Self {
        RecordConfig {
            env: c.env.clone(),
            cmd: c.cmd.clone(),
            entrypoint: c.entrypoint.clone(),
            workdir: c.working_dir.clone(),
            user: c.user.clone(),
        }
    }
}

/// One name of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// sha256 of the stored manifest, 64 hex digits (no `sha256:`).
    pub id: String,
    /// Repository (`<none>` for an unnamed image).
    pub repo: String,
    /// Tag (`<none>` for an unnamed image).
    pub tag: String,
    /// When the image entered the store (unix seconds).
    pub created: u64,
    /// Uncompressed size of all layers (tar streams), in bytes.
    pub virtual_size: u64,
    /// Runtime config.
    pub config: RecordConfig,
    /// The registry manifest digest the image was pulled as (empty when it
    /// was not pulled): a later pull of the same manifest reuses it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_digest: String,
}

impl ImageRecord {
    /// The 12-hex id users see.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    /// `repo:tag`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.repo, self.tag)
    }

    /// `sha256:<id>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", self.id)
    }

    pub fn is_named(&self) -> bool {
        self.repo != NONE
    }
}

/// `/images/get` entry: `repo:tag:imageId:created:virtualSize` (short id).
pub fn hyperd_list_entry(rec: &ImageRecord) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        rec.repo,
        rec.tag,
        rec.short_id(),
        rec.created,
        rec.virtual_size
    )
}

/// Config changes of a commit; `None` keeps the base image's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfigChanges {
    /// `KEY=value` entries, merged by key into the base's env.
    pub env: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// e.g. `80/tcp`; added to the base's.
    pub exposed_ports: Option<Vec<String>>,
    /// Added to the base's.
    pub labels: Option<BTreeMap<String, String>>,
}

impl ImageConfigChanges {
    /// Reads the Docker container config that `/container/commit` carries
    /// as its body (`Env`, `Cmd`, `Entrypoint`, `WorkingDir`, `User`,
    /// `ExposedPorts`, `Labels`). Nulls, empty lists and empty strings mean
    /// "keep the base's value".
    pub fn from_docker_json(v: &Value) -> ImageConfigChanges {
        let c = ImageConfig::from_json(v);
        let list = |l: Vec<String>| (!l.is_empty()).then_some(l);
        let s = |s: String| (!s.is_empty()).then_some(s);
        ImageConfigChanges {
            env: list(c.env),
            cmd: list(c.cmd),
            entrypoint: list(c.entrypoint),
            working_dir: s(c.working_dir),
            user: s(c.user),
            exposed_ports: list(c.exposed_ports),
            labels: (!c.labels.is_empty()).then_some(c.labels),
        }
    }

    /// Applies the changes to `c`.
    pub fn apply(&self, c: &mut ImageConfig) {
        if let Some(env) = &self.env {
            for e in env {
                set_env(&mut c.env, e);
            }
        }
        if let Some(v) = &self.cmd {
            c.cmd = v.clone();
        }
        if let Some(v) = &self.entrypoint {
            c.entrypoint = v.clone();
        }
        if let Some(v) = &self.working_dir {
            c.working_dir = v.clone();
        }
        if let Some(v) = &self.user {
            c.user = v.clone();
        }
        if let Some(v) = &self.exposed_ports {
            for p in v {
                if !c.exposed_ports.contains(p) {
                    c.exposed_ports.push(p.clone());
                }
            }
            c.exposed_ports.sort();
        }
        if let Some(v) = &self.labels {
            c.labels
                .extend(v.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
}

/// Sets `KEY=value` in an env list (replacing the same key).
pub(super) fn set_env(env: &mut Vec<String>, kv: &str) {
    let key = kv.split('=').next().unwrap_or(kv);
    if let Some(slot) = env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
        *slot = kv.to_string();
    } else {
        env.push(kv.to_string());
    }
}
