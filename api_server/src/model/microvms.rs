//! Flintlock MicroVMs and their reconciler, below every Flintlock face.
//!
//! A MicroVM is an ember instance (named `fl-<uid>`) whose Flintlock spec,
//! namespace and status live in the instance's annotations. [`create`]
//! records it at once with state PENDING; a reconcile attempt then builds,
//! on a worker thread, the kernel image (from an OCI layout or `docker
//! save` tarball), the root and additional volumes (OCI layers applied with
//! whiteouts into ext4) and the NoCloud `cidata` disk from the metadata,
//! and, back on the loop thread, installs them and starts the VM (CREATED).
//! A failed attempt is retried with back-off ([`RetryPolicy`]) and ends in
//! FAILED; its files are removed whatever became of it.
//!
//! Faces hand in a [`MicroVmSpec`] (Flintlock's `types.MicroVMSpec`) and get
//! [`MicroVm`] views back; they only translate their wire format.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::host_paths::{HostPathError, HostPaths};
use super::jobs::{BgFinish, Jobs};
use super::store::Scratch;
use super::supervisor::{RunRequest, Supervisor, SupervisorError};
use super::{Disk, Image, Instance, NetInterface, VolumeFormat};
use crate::images::cidata::{self, CidataError};
use crate::images::oci::{self, OciError};
use crate::images::registry::{self, Registry};
use crate::runtime::netdev::{self, NetdevError};

/// Errors from MicroVM requests, by gRPC meaning.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// ALREADY_EXISTS.
    #[error("{0}")]
    Exists(String),
    /// INTERNAL.
    #[error("{0}")]
    Internal(String),
}

/// Why one reconcile attempt failed (shown as `status.error`).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    Staging(std::io::Error),
    #[error("no kernel")]
    NoKernel,
    #[error("{src}: {err}")]
    Source { src: String, err: Box<OciError> },
    #[error("pull {src}: {err}")]
    Registry { src: String, err: String },
    #[error("kernel {file} in {image}: {err}")]
    Kernel {
        file: String,
        image: String,
        err: Box<OciError>,
    },
    #[error("initrd {file} in {image}: {err}")]
    Initrd {
        file: String,
        image: String,
        err: Box<OciError>,
    },
    #[error("volume {id} from {src}: {err}")]
    Volume {
        id: String,
        src: String,
        err: Box<OciError>,
    },
    #[error("metadata: {0}")]
    Metadata(CidataError),
    #[error("cidata disk: {0}")]
    Cidata(CidataError),
    #[error("{0}")]
    Network(NetdevError),
    #[error("{0}")]
    Install(#[from] SupervisorError),
    #[error("record gone")]
    RecordGone,
    #[error("{0}")]
    HostPath(#[from] HostPathError),
}

/// How often a failing MicroVM is retried before FAILED, and how long to
/// wait: retry n waits n × `backoff` (the original: 10 retries, 20 s units).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 10,
            backoff: Duration::from_secs(2),
        }
    }
}

const ANN_UID: &str = "flintlock.uid";
const ANN_NS: &str = "flintlock.namespace";
const ANN_NAME: &str = "flintlock.name";
const ANN_SPEC: &str = "flintlock.spec";
const ANN_STATE: &str = "flintlock.state";
const ANN_RETRY: &str = "flintlock.retry";
const ANN_ERROR: &str = "flintlock.error";

/// Kernel arguments every MicroVM gets.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Kernel {
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub cmdline: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, alias = "add_network_config")]
    pub add_network_config: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Initrd {
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSource {
    #[serde(
        default,
        alias = "container_source",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_source: Option<String>,
    #[serde(
        default,
        alias = "virtiofs_source",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtiofs_source: Option<Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    #[serde(default)]
    pub id: String,
    #[serde(default, alias = "is_read_only")]
    pub is_read_only: bool,
    #[serde(
        default,
        alias = "mount_point",
        skip_serializing_if = "Option::is_none"
    )]
    pub mount_point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    #[serde(
        default,
        alias = "partition_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub partition_id: Option<String>,
    #[serde(
        default,
        alias = "size_in_mb",
        deserialize_with = "opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub size_in_mb: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticAddress {
    #[serde(default)]
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default)]
    pub nameservers: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    #[serde(default, alias = "device_id")]
    pub device_id: String,
    /// `IfaceType` by name; protojson's default (absent) is MACVTAP (0).
    #[serde(
        rename = "type",
        default = "macvtap_type",
        deserialize_with = "iface_type"
    )]
    pub kind: String,
    #[serde(default, alias = "guest_mac", skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<StaticAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<Value>,
}

fn macvtap_type() -> String {
    "MACVTAP".into()
}

/// `NetworkInterface.IfaceType` as protojson reads it: by name or number.
fn iface_type<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Null => Ok(macvtap_type()),
        Value::String(s) if s == "MACVTAP" || s == "TAP" => Ok(s),
        Value::Number(n) if n.as_u64() == Some(0) => Ok("MACVTAP".into()),
        Value::Number(n) if n.as_u64() == Some(1) => Ok("TAP".into()),
        other => Err(D::Error::custom(format!(
            "invalid value {other} for enum IfaceType (MACVTAP or TAP, 0 or 1)"
        ))),
    }
}

/// An integer as protojson reads one: a JSON number or a decimal string.
fn int_value<E: serde::de::Error>(v: &Value) -> Result<Option<i64>, E> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| E::custom(format!("{n} is not an integer"))),
        Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|_| E::custom(format!("{s:?} is not an integer"))),
        other => Err(E::custom(format!("{other} is not an integer"))),
    }
}

fn int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Ok(int_value::<D::Error>(&Value::deserialize(d)?)?.unwrap_or(0))
}

fn opt_int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match int_value::<D::Error>(&Value::deserialize(d)?)? {
        None => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{v} is negative"))),
    }
}

/// `types.MicroVMSpec`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicroVmSpec {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "int")]
    pub vcpu: i64,
    #[serde(default, alias = "memory_in_mb", deserialize_with = "int")]
    pub memory_in_mb: i64,
    #[serde(default)]
    pub kernel: Option<Kernel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Initrd>,
    #[serde(default, alias = "root_volume")]
    pub root_volume: Option<VolumeSpec>,
    #[serde(default, alias = "additional_volumes")]
    pub additional_volumes: Vec<VolumeSpec>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, alias = "created_at", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, alias = "updated_at", skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, alias = "deleted_at", skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// A vsock for Flintlock's guest agent: refused (not supported).
    #[serde(default, alias = "allow_guest_agent")]
    pub allow_guest_agent: bool,
}

fn invalid(m: impl Into<String>) -> MicroVmError {
    MicroVmError::Invalid(m.into())
}

/// Applies defaults and checks a spec (original defaults: namespace
/// "default", 2 vCPUs, 1024 MB; ember's VMM has at most 32 vCPUs).
pub fn validate(spec: &mut MicroVmSpec) -> Result<(), MicroVmError> {
    if spec.id.is_empty() {
        // As Flintlock: "If this empty at creation time a ID will be
        // automatically generated" (a ULID, like its generated names).
        spec.id = ulid::Ulid::new().to_string();
    }
    super::validate_name("microvm", &spec.id).map_err(|e| invalid(e.to_string()))?;
    if spec.namespace.is_empty() {
        spec.namespace = "default".into();
    }
    super::validate_name("namespace", &spec.namespace).map_err(|e| invalid(e.to_string()))?;
    if spec.vcpu == 0 {
        spec.vcpu = 2;
    }
    if !(1..=32).contains(&spec.vcpu) {
        return Err(invalid(format!(
            "vcpu {} is invalid: it must be between 1 and 32 (ember-vmm's limit; Flintlock allowed 64)",
            spec.vcpu
        )));
    }
    if spec.memory_in_mb == 0 {
        spec.memory_in_mb = 1024;
    }
    if !(1024..=32768).contains(&spec.memory_in_mb) {
        return Err(invalid(format!(
            "memoryInMb {} is invalid: it must be between 1024 and 32768",
            spec.memory_in_mb
        )));
    }
    let k = spec
        .kernel
        .as_ref()
        .ok_or_else(|| invalid("kernel is required"))?;
    if k.image.is_empty() {
        return Err(invalid("kernel.image is required"));
    }
    if k.filename.as_deref().unwrap_or("").is_empty() {
        return Err(invalid("kernel.filename is required"));
    }
    for (key, v) in &k.cmdline {
        if key.is_empty() || key.contains([' ', '"', '=']) || v.contains('"') {
            return Err(invalid(format!("kernel.cmdline entry {key:?} is invalid")));
        }
    }
    let root = spec
        .root_volume
        .as_ref()
        .ok_or_else(|| invalid("rootVolume is required"))?;
    let mut ids = std::collections::BTreeSet::new();
    for v in std::iter::once(root).chain(spec.additional_volumes.iter()) {
        let src = v.source.as_ref();
        if src.and_then(|s| s.virtiofs_source.as_ref()).is_some() {
            return Err(invalid("virtiofsSource volumes are not supported by ember"));
        }
        if src
            .and_then(|s| s.container_source.as_deref())
            .unwrap_or("")
            .is_empty()
        {
            return Err(invalid(format!(
                "volume {:?} needs source.containerSource",
                v.id
            )));
        }
        if v.id.is_empty() || !ids.insert(v.id.clone()) {
            return Err(invalid(format!(
                "volume ids must be unique and non-empty ({:?})",
                v.id
            )));
        }
        super::validate_name("volume", &v.id).map_err(|e| invalid(e.to_string()))?;
    }
    if spec.allow_guest_agent {
        return Err(invalid(
            "allowGuestAgent is not supported by ember (no guest-agent vsock)",
        ));
    }
    for v in &spec.additional_volumes {
        if let Some(m) = &v.mount_point {
            super::validate_mount_point(m)
                .map_err(|e| invalid(format!("volume {:?} mountPoint: {e}", v.id)))?;
        }
    }
    if spec.additional_volumes.len() > 24 {
        return Err(invalid("at most 24 additionalVolumes (vdb..vdy)"));
    }
    for (i, n) in spec.interfaces.iter().enumerate() {
        if n.kind != "TAP" && n.kind != "MACVTAP" {
            return Err(invalid(format!(
                "interface {i}: type {} is not supported by ember (TAP or MACVTAP)",
                n.kind
            )));
        }
        if let Some(m) = &n.guest_mac {
            if !is_mac(m) {
                return Err(invalid(format!("interface {i}: guestMac {m:?} is invalid")));
            }
            // A macvtap link carries the guest's MAC: it must be unicast.
            if n.kind == "MACVTAP" {
                netdev::validate_mac(m)
                    .map_err(|e| invalid(format!("interface {i}: guestMac: {e}")))?;
            }
        }
        if let Some(a) = &n.address {
            netdev::StaticAddress::parse(&a.address, a.gateway.as_deref(), &a.nameservers)
                .map_err(|e| invalid(format!("interface {i}: {e}")))?;
        }
    }
    let mut files = cidata::from_flintlock_metadata(&spec.metadata, "validate", &spec.id)
        .map_err(|e| invalid(format!("metadata: {e}")))?;
    cidata::add_mounts(&mut files, &volume_mounts(spec))
        .map_err(|e| invalid(format!("metadata: {e}")))?;
    Ok(())
}

/// `(guest device, mount point)` of the additional volumes that have a
/// mount point: vdb, vdc, ... in list order (the root disk is vda), as
/// Flintlock numbers them.
fn volume_mounts(spec: &MicroVmSpec) -> Vec<(String, String)> {
    spec.additional_volumes
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let dev = format!("vd{}", (b'b' + i as u8) as char);
            v.mount_point.clone().map(|m| (dev, m))
        })
        .collect()
}

/// Six hex octets separated by ':'.
fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `s` has the shape of a MicroVM uid (a ULID).
/// Also true for lowercase and for the UniK instance name `fl-<uid>`.
pub fn is_uid(s: &str) -> bool {
    let s = s.strip_prefix("fl-").unwrap_or(s);
    s.len() == 26 && ulid::Ulid::from_string(&s.to_ascii_uppercase()).is_ok()
}

/// The ember instance of MicroVM `uid`: `fl-<uid in lowercase>` (the name
/// the UniK face shows).
fn instance_name(uid: &str) -> String {
    format!("fl-{}", uid.to_lowercase())
}

/// The ember volume of spec volume `id`; [`view`] maps it back.
fn volume_name(uid: &str, id: &str) -> String {
    format!("fl-{}-{id}", uid.to_lowercase())
}

/// The ember volume of the cidata disk: a volume id cannot start with '-'
/// (`validate_name`), so this never meets a [`volume_name`].
fn cidata_name(uid: &str) -> String {
    format!("fl-{}--cidata", uid.to_lowercase())
}

fn records(sup: &Supervisor) -> impl Iterator<Item = &Instance> {
    sup.state()
        .instances
        .values()
        .filter(|i| i.annotations.contains_key(ANN_UID))
}

/// The record of `uid`. ULIDs are case-insensitive (Crockford base32), so
/// the lowercase uid in the UniK face's instance name finds it too, and so
/// does that whole instance name (`fl-<uid>`).
fn record<'a>(sup: &'a Supervisor, uid: &str) -> Option<&'a Instance> {
    let uid = uid.strip_prefix("fl-").unwrap_or(uid);
    records(sup).find(|i| {
        i.annotations
            .get(ANN_UID)
            .is_some_and(|u| u.eq_ignore_ascii_case(uid))
    })
}

/// A network interface of a MicroVM as its status reports it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInterfaceStatus {
    pub host_device_name: String,
    pub index: usize,
    pub mac_address: String,
}

/// Where a MicroVM volume is (`{"type": "DEV", "source": file}`).
#[derive(Clone, Debug, Serialize)]
pub struct VolumeMount {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub source: String,
}

/// A volume of a MicroVM as its status reports it.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    pub mount: VolumeMount,
}

/// `types.MicroVMStatus`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MicroVmStatus {
    pub state: String,
    pub retry: u64,
    pub network_interfaces: BTreeMap<String, NetworkInterfaceStatus>,
    pub volumes: BTreeMap<String, VolumeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `types.MicroVM`: a MicroVM's spec as stored, and its status.
#[derive(Clone, Debug, Serialize)]
pub struct MicroVm {
    pub version: u64,
    /// The stored spec (`null` if it cannot be read back).
    pub spec: Value,
    pub status: MicroVmStatus,
}

/// The view of a record.
fn view(sup: &Supervisor, inst: &Instance) -> MicroVm {
    let spec: Value = inst
        .annotations
        .get(ANN_SPEC)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let state = inst
        .annotations
        .get(ANN_STATE)
        .cloned()
        .unwrap_or_else(|| "PENDING".into());
    let retry: u64 = inst
        .annotations
        .get(ANN_RETRY)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let mut nets = BTreeMap::new();
    for (i, n) in inst.interfaces.iter().enumerate() {
        let device = spec["interfaces"][i]["deviceId"]
            .as_str()
            .unwrap_or("")
            .to_string();
        nets.insert(
            if device.is_empty() {
                format!("eth{i}")
            } else {
                device
            },
            NetworkInterfaceStatus {
                host_device_name: n.host_dev_name.clone(),
                index: i,
                mac_address: n.guest_mac.clone().unwrap_or_default(),
            },
        );
    }
    // Keyed by the spec's volume id, as Flintlock's status is; the cidata
    // disk is ember's own and not listed.
    let uid = inst.annotations.get(ANN_UID).cloned().unwrap_or_default();
    let prefix = volume_name(&uid, "");
    let mut vols = BTreeMap::new();
    for d in inst.root_volume.iter().chain(inst.disks.iter()) {
        let Some(id) = d
            .volume
            .strip_prefix(&prefix)
            .filter(|id| !id.starts_with('-'))
        else {
            continue;
        };
        if let Ok(v) = sup.volume(&d.volume) {
            vols.insert(
                id.to_string(),
                VolumeStatus {
                    mount: VolumeMount {
                        kind: "DEV",
                        source: sup.store().volume_path(&v.id).display().to_string(),
                    },
                },
            );
        }
    }
    MicroVm {
        version: 1 + retry,
        spec,
        status: MicroVmStatus {
            state,
            retry,
            network_interfaces: nets,
            volumes: vols,
            error: inst.annotations.get(ANN_ERROR).cloned(),
        },
    }
}

/// The MicroVM with uid `uid`.
pub fn get(sup: &Supervisor, uid: &str) -> Option<MicroVm> {
    record(sup, uid).map(|i| view(sup, i))
}

/// The MicroVMs of namespace `ns` (every namespace when empty), named
/// `name` if given.
pub fn list(sup: &Supervisor, ns: &str, name: Option<&str>) -> Vec<MicroVm> {
    records(sup)
        .filter(|i| ns.is_empty() || i.annotations.get(ANN_NS).map(String::as_str) == Some(ns))
        .filter(|i| name.is_none_or(|n| i.annotations.get(ANN_NAME).map(String::as_str) == Some(n)))
        .map(|i| view(sup, i))
        .collect()
}

/// Every source the spec names (kernel, initrd, volume sources) is an
/// image reference (pulled from its registry) or a host path, which must
/// lie under the import directory.
fn check_sources(paths: &HostPaths, spec: &MicroVmSpec) -> Result<(), HostPathError> {
    let check = |what: &str, src: &str| {
        if registry::is_reference(src) {
            Ok(())
        } else {
            paths.import(what, src).map(|_| ())
        }
    };
    if let Some(k) = &spec.kernel {
        check("kernel.image", &k.image)?;
    }
    if let Some(i) = spec.initrd.as_ref().filter(|i| !i.image.is_empty()) {
        check("initrd.image", &i.image)?;
    }
    for v in spec
        .root_volume
        .iter()
        .chain(spec.additional_volumes.iter())
    {
        let src = v
            .source
            .as_ref()
            .and_then(|s| s.container_source.as_deref())
            .unwrap_or("");
        check(&format!("volume {} containerSource", v.id), src)?;
    }
    Ok(())
}

/// Every image reference of the spec parses.
fn check_references(spec: &MicroVmSpec) -> Result<(), MicroVmError> {
    let mut srcs: Vec<&str> = Vec::new();
    srcs.extend(spec.kernel.iter().map(|k| k.image.as_str()));
    srcs.extend(spec.initrd.iter().map(|i| i.image.as_str()));
    for v in spec
        .root_volume
        .iter()
        .chain(spec.additional_volumes.iter())
    {
        srcs.extend(
            v.source
                .as_ref()
                .and_then(|s| s.container_source.as_deref()),
        );
    }
    for s in srcs.into_iter().filter(|s| registry::is_reference(s)) {
        registry::parse_reference(s).map_err(|e| MicroVmError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// MACVTAP interfaces need a parent link (`--parent-iface`) and the jailer.
fn check_macvtap_host(sup: &Supervisor, spec: &MicroVmSpec) -> Result<(), MicroVmError> {
    let Some(i) = spec.interfaces.iter().position(|n| n.kind == "MACVTAP") else {
        return Ok(());
    };
    if sup.parent_iface().is_none() {
        return Err(invalid(format!(
            "interface {i}: type MACVTAP (the protobuf default when type is unset) needs emberd's \
             --parent-iface (the host link macvtaps are created on); use type TAP otherwise"
        )));
    }
    if !sup.jailed() {
        return Err(invalid(format!(
            "interface {i}: type MACVTAP needs the jailer (emberd runs with --no-jailer)"
        )));
    }
    Ok(())
}

/// Checks `spec`, records the MicroVM (PENDING) and schedules its first
/// reconcile attempt.
pub fn create(
    sup: &mut Supervisor,
    jobs: &Jobs,
    mut spec: MicroVmSpec,
    policy: RetryPolicy,
) -> Result<MicroVm, MicroVmError> {
    validate(&mut spec)?;
    check_macvtap_host(sup, &spec)?;
    check_references(&spec)?;
    // Outside the import directory is refused now; a source that does not
    // exist yet fails its reconcile attempts (and may appear meanwhile).
    match check_sources(sup.host_paths(), &spec) {
        Ok(()) | Err(HostPathError::Missing { .. }) => {}
        Err(e) => return Err(MicroVmError::Invalid(e.to_string())),
    }
    if records(sup).any(|i| {
        i.annotations.get(ANN_NS) == Some(&spec.namespace)
            && i.annotations.get(ANN_NAME) == Some(&spec.id)
    }) {
        return Err(MicroVmError::Exists(format!(
            "microvm {}/{} already exists",
            spec.namespace, spec.id
        )));
    }
    let uid = ulid::Ulid::new().to_string();
    spec.uid = uid.clone();
    spec.created_at = Some(super::now_rfc3339());
    let mut ann = BTreeMap::new();
    ann.insert(ANN_UID.into(), uid.clone());
    ann.insert(ANN_NS.into(), spec.namespace.clone());
    ann.insert(ANN_NAME.into(), spec.id.clone());
    ann.insert(
        ANN_SPEC.into(),
        serde_json::to_string(&spec).unwrap_or_default(),
    );
    ann.insert(ANN_STATE.into(), "PENDING".into());
    ann.insert(ANN_RETRY.into(), "0".into());
    let inst = sup
        .reserve_instance(&instance_name(&uid), spec.labels.clone(), ann)
        .map_err(|e| MicroVmError::Internal(e.to_string()))?;
    schedule(sup, jobs, &uid, Duration::ZERO, policy);
    Ok(view(sup, &inst))
}

/// Deletes a MicroVM: its VM (stopped if running), then what its attempts
/// installed.
pub fn delete(sup: &mut Supervisor, uid: &str) -> Result<(), MicroVmError> {
    let Some(inst) = record(sup, uid).cloned() else {
        return Err(MicroVmError::NotFound(format!("microvm {uid} not found")));
    };
    let _ = sup.set_annotations(&inst.id, |a| {
        a.insert(ANN_STATE.into(), "DELETING".into());
    });
    sup.delete_instance(&inst.id, true)
        .map_err(|e| MicroVmError::Internal(e.to_string()))?;
    remove_artifacts(sup, uid);
    Ok(())
}

/// After a restart: schedules an attempt for every PENDING MicroVM.
pub fn resume(sup: &mut Supervisor, jobs: &Jobs, policy: RetryPolicy) {
    let pending: Vec<String> = records(sup)
        .filter(|i| i.annotations.get(ANN_STATE).map(String::as_str) == Some("PENDING"))
        .filter_map(|i| i.annotations.get(ANN_UID).cloned())
        .collect();
    for uid in pending {
        schedule(sup, jobs, &uid, Duration::ZERO, policy);
    }
}

/// Files produced by a reconcile attempt's worker. Dropping it removes
/// the staging directory, whatever became of the attempt.
struct Artifacts {
    _staging: Scratch,
    kernel_dir: PathBuf,
    kernel: String,
    initrd: Option<String>,
    /// (volume spec id, file, read-only)
    volumes: Vec<(String, PathBuf, bool)>,
    cidata: Option<PathBuf>,
}

/// Worker side: builds everything a MicroVM needs from its spec. Image
/// references are pulled with `reg` (its blob cache makes a second pull
/// of the same image fetch nothing).
fn build(
    spec: &MicroVmSpec,
    uid: &str,
    staging: PathBuf,
    reg: Option<&Registry>,
) -> Result<Artifacts, ReconcileError> {
    // Removed on every path out of here that does not hand it over.
    let staging = Scratch::create(staging).map_err(ReconcileError::Staging)?;
    let kernel_dir = staging.join("image");
    std::fs::create_dir_all(&kernel_dir).map_err(ReconcileError::Staging)?;
    let pulls = staging.join("pulls");
    let k = spec.kernel.as_ref().ok_or(ReconcileError::NoKernel)?;
    // Pulled layouts live until the end of the attempt (staging goes too).
    let mut pulled = Vec::new();
    let mut open = |src: &str| {
        let source_err = |err| ReconcileError::Source {
            src: src.to_string(),
            err: Box::new(err),
        };
        if !registry::is_reference(src) {
            return oci::open(std::path::Path::new(src), None).map_err(source_err);
        }
        let reg = reg.ok_or_else(|| ReconcileError::Registry {
            src: src.to_string(),
            err: "emberd has no registry access".into(),
        })?;
        let p = reg
            .pull(src, &pulls, None, &mut |_| {})
            .map_err(|e| ReconcileError::Registry {
                src: src.to_string(),
                err: e.to_string(),
            })?;
        let cfg = oci::OpenConfig {
            scratch_dir: pulls.clone(),
            ..Default::default()
        };
        let img = oci::open_with(p.layout(), None, &cfg).map_err(source_err)?;
        pulled.push(p);
        Ok(img)
    };
    let kimg = open(&k.image)?;
    let kfile = k.filename.clone().unwrap_or_default();
    kimg.extract_file(&kfile, &kernel_dir.join("kernel"))
        .map_err(|err| ReconcileError::Kernel {
            file: kfile.clone(),
            image: k.image.clone(),
            err: Box::new(err),
        })?;
    let mut initrd = None;
    if let Some(i) = spec.initrd.as_ref().filter(|i| !i.image.is_empty()) {
        let f = i.filename.clone().unwrap_or_else(|| "initrd".into());
        open(&i.image)?
            .extract_file(&f, &kernel_dir.join("initrd"))
            .map_err(|err| ReconcileError::Initrd {
                file: f.clone(),
                image: i.image.clone(),
                err: Box::new(err),
            })?;
        initrd = Some("initrd".to_string());
    }
    let mut volumes = Vec::new();
    for v in spec
        .root_volume
        .iter()
        .chain(spec.additional_volumes.iter())
    {
        let src = v
            .source
            .as_ref()
            .and_then(|s| s.container_source.clone())
            .unwrap_or_default();
        let out = staging.join(format!("vol-{}.img", v.id));
        open(&src)?
            .to_ext4(&out, v.size_in_mb)
            .map_err(|err| ReconcileError::Volume {
                id: v.id.clone(),
                src: src.clone(),
                err: Box::new(err),
            })?;
        volumes.push((v.id.clone(), out, v.is_read_only));
    }
    let mut files = cidata::from_flintlock_metadata(&spec.metadata, uid, &spec.id)
        .map_err(ReconcileError::Metadata)?;
    // Additional volumes with a mount point are mounted by cloud-init.
    cidata::add_mounts(&mut files, &volume_mounts(spec)).map_err(ReconcileError::Metadata)?;
    let cid = staging.join("cidata.img");
    cidata::build_cidata(&cid, &files).map_err(ReconcileError::Cidata)?;
    Ok(Artifacts {
        _staging: staging,
        kernel_dir,
        kernel: "kernel".into(),
        initrd,
        volumes,
        cidata: Some(cid),
    })
}

/// Removes what a MicroVM's earlier attempt installed (image, volumes).
fn remove_artifacts(sup: &mut Supervisor, uid: &str) {
    let prefix = format!("fl-{}-", uid.to_lowercase());
    let vols: Vec<String> = sup
        .state()
        .volumes
        .values()
        .filter(|v| v.name.starts_with(&prefix) && v.attachment.is_none())
        .map(|v| v.id.clone())
        .collect();
    for v in vols {
        let _ = sup.delete_volume(&v, false);
    }
    let img = format!("fl-{}-kernel", uid.to_lowercase());
    if sup.state().image(&img).is_some() {
        let _ = sup.delete_image(&img, false);
    }
}

/// Loop side: installs the artifacts and starts the VM.
fn install_and_start(
    sup: &mut Supervisor,
    spec: &MicroVmSpec,
    uid: &str,
    a: Artifacts,
) -> Result<(), ReconcileError> {
    let low = uid.to_lowercase();
    let name = instance_name(uid);
    remove_artifacts(sup, uid);
    let mut cmdline = BASE_CMDLINE.to_string();
    if let Some(k) = &spec.kernel {
        for (key, v) in &k.cmdline {
            if v.is_empty() {
                cmdline.push_str(&format!(" {key}"));
            } else {
                cmdline.push_str(&format!(" {key}={v}"));
            }
        }
    }
    let img = Image {
        id: String::new(),
        name: format!("fl-{low}-kernel"),
        provider: "ember".into(),
        base: "flintlock".into(),
        lang: "oci".into(),
        created: super::now_rfc3339(),
        size_mb: 1,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        boot_args: cmdline,
        args: String::new(),
        mounts: vec![],
        default_memory_mb: spec.memory_in_mb as u32,
        format: "oci-kernel".into(),
        snapshot_starts: None,
    };
    let img = sup.install_image(img, &a.kernel_dir, true)?;
    let mut root = None;
    let mut disks = Vec::new();
    for (i, (id, file, ro)) in a.volumes.iter().enumerate() {
        let v = sup.install_volume_file(&volume_name(uid, id), file, VolumeFormat::Ext4)?;
        let d = Disk {
            volume: v.name,
            read_only: *ro,
        };
        if i == 0 {
            root = Some(d);
        } else {
            disks.push(d);
        }
    }
    if let Some(c) = &a.cidata {
        let v = sup.install_volume_file(&cidata_name(uid), c, VolumeFormat::Raw)?;
        disks.push(Disk {
            volume: v.name,
            read_only: true,
        });
    }
    let inst_id = record(sup, uid)
        .map(|i| i.id.clone())
        .ok_or(ReconcileError::RecordGone)?;
    let mut interfaces = Vec::new();
    let mut ip_args = String::new();
    for (i, n) in spec.interfaces.iter().enumerate() {
        let host_dev_name = netdev::tap_name(&inst_id, i);
        interfaces.push(if n.kind == "MACVTAP" {
            let parent = sup.parent_iface().ok_or_else(|| {
                SupervisorError::Invalid(format!(
                    "interface {i}: type MACVTAP needs emberd's --parent-iface"
                ))
            })?;
            // The link and the guest share one MAC, generated if none given.
            let mac = match &n.guest_mac {
                Some(m) => netdev::validate_mac(m).map_err(ReconcileError::Network)?,
                None => netdev::generated_mac(&host_dev_name),
            };
            NetInterface {
                host_dev_name,
                guest_mac: Some(mac),
                macvtap_parent: Some(parent.to_string()),
            }
        } else {
            NetInterface {
                host_dev_name,
                guest_mac: n.guest_mac.clone(),
                macvtap_parent: None,
            }
        });
        if i == 0 && spec.kernel.as_ref().is_some_and(|k| k.add_network_config) {
            if let Some(addr) = &n.address {
                let sa = netdev::StaticAddress::parse(
                    &addr.address,
                    addr.gateway.as_deref(),
                    &addr.nameservers,
                )
                .map_err(ReconcileError::Network)?;
                ip_args = netdev::kernel_ip_param(&sa, "eth0", &spec.id)
                    .map_err(ReconcileError::Network)?;
            }
        }
    }
    let configured = sup.configure_instance(
        &name,
        RunRequest {
            name: name.clone(),
            image: img.name,
            memory_mb: spec.memory_in_mb as u32,
            vcpus: spec.vcpu as u8,
            labels: spec.labels.clone(),
            root_volume: root,
            disks,
            interfaces,
            boot_args: ip_args,
            ..Default::default()
        },
    );
    if let Err(e) = configured {
        // Configured but not started (a TAP or macvtap that could not be
        // made, a VMM that would not start): back to reserved, so the next
        // attempt starts afresh and a FAILED MicroVM holds no links.
        if let Err(u) = sup.unconfigure_instance(&name) {
            log::warn!("microvm {uid}: cannot reset after a failed start: {u}");
        }
        return Err(e.into());
    }
    Ok(())
}

/// Schedules one reconcile attempt for `uid` after `delay`.
fn schedule(sup: &Supervisor, jobs: &Jobs, uid: &str, delay: Duration, policy: RetryPolicy) {
    let Some(inst) = record(sup, uid) else {
        return;
    };
    let Some(spec) = inst
        .annotations
        .get(ANN_SPEC)
        .and_then(|s| serde_json::from_str::<MicroVmSpec>(s).ok())
    else {
        return;
    };
    let staging = sup
        .store()
        .staging_dir()
        .join(format!("flintlock-{}", uid.to_lowercase()));
    // Checked again at every attempt: the import directory may have
    // changed since the MicroVM was created (emberd restarted).
    let allowed = check_sources(sup.host_paths(), &spec);
    let reg = sup.registry().cloned();
    let uid = uid.to_string();
    jobs.spawn_background("reconcile", delay, move || {
        let built = allowed
            .map_err(ReconcileError::from)
            .and_then(|()| build(&spec, &uid, staging, reg.as_ref()));
        Box::new(move |sup: &mut Supervisor, jobs: &Jobs| {
            let Some(state) = record(sup, &uid).and_then(|i| i.annotations.get(ANN_STATE).cloned())
            else {
                return; // deleted meanwhile (dropping `built` removes its files)
            };
            if state != "PENDING" {
                return;
            }
            let result = built.and_then(|a| install_and_start(sup, &spec, &uid, a));
            let name = instance_name(&uid);
            match result {
                Ok(()) => {
                    let _ = sup.set_annotations(&name, |a| {
                        a.insert(ANN_STATE.into(), "CREATED".into());
                        a.remove(ANN_ERROR);
                    });
                }
                Err(e) => {
                    let e = e.to_string();
                    log::warn!("microvm {uid}: {e}");
                    let mut retry = 0;
                    let _ = sup.set_annotations(&name, |a| {
                        retry = a
                            .get(ANN_RETRY)
                            .and_then(|r| r.parse().ok())
                            .unwrap_or(0u32)
                            + 1;
                        a.insert(ANN_RETRY.into(), retry.to_string());
                        a.insert(ANN_ERROR.into(), e.clone());
                        if retry >= policy.max_retries {
                            a.insert(ANN_STATE.into(), "FAILED".into());
                        }
                    });
                    if retry >= policy.max_retries {
                        // FAILED: its VM is not running; no macvtap stays.
                        sup.release_macvtaps(&name);
                    }
                    if retry < policy.max_retries {
                        schedule(sup, jobs, &uid, policy.backoff * retry, policy);
                    }
                }
            }
        }) as BgFinish
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> MicroVmSpec {
        serde_json::from_value(json!({
            "id": "vm1",
            "kernel": {"image": "/tmp/k", "filename": "boot/vmlinux", "cmdline": {"ember.test": "idle"}},
            "rootVolume": {"id": "root", "source": {"containerSource": "/tmp/r"}},
            "interfaces": [{"deviceId": "eth0", "type": "TAP", "guestMac": "06:00:00:00:00:01"}],
            "metadata": {"meta-data": "aW5zdGFuY2VfaWQ6IHgK"}
        }))
        .unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let mut s = good();
        validate(&mut s).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.vcpu, s.memory_in_mb),
            ("default", 2, 1024)
        );
        let bad = |f: &dyn Fn(&mut MicroVmSpec)| {
            let mut s = good();
            f(&mut s);
            validate(&mut s).unwrap_err().to_string()
        };
        assert!(bad(&|s| s.vcpu = 65).contains("vcpu"));
        assert!(bad(&|s| s.memory_in_mb = 512).contains("memoryInMb"));
        assert!(bad(&|s| s.kernel = None).contains("kernel is required"));
        assert!(bad(&|s| s.kernel.as_mut().unwrap().filename = None).contains("filename"));
        assert!(bad(&|s| s.root_volume = None).contains("rootVolume"));
        assert!(bad(&|s| s.interfaces[0].kind = "VETH".into()).contains("TAP or MACVTAP"));
        assert!(bad(&|s| {
            s.interfaces[0].kind = "MACVTAP".into();
            s.interfaces[0].guest_mac = Some("01:00:5e:00:00:01".into());
        })
        .contains("guestMac"));
        let mut mac = good();
        mac.interfaces[0].kind = "MACVTAP".into();
        validate(&mut mac).unwrap();
        assert!(bad(&|s| s.interfaces[0].guest_mac = Some("zz".into())).contains("guestMac"));
        assert!(bad(&|s| {
            s.metadata.insert("bogus".into(), "eA==".into());
        })
        .contains("metadata"));
        assert!(bad(&|s| s.allow_guest_agent = true).contains("allowGuestAgent"));
        assert!(bad(&|s| {
            s.additional_volumes.push(VolumeSpec {
                id: "d".into(),
                mount_point: Some("/mnt/../etc".into()),
                source: s.root_volume.clone().unwrap().source,
                ..Default::default()
            })
        })
        .contains("mountPoint"));
        // No id: a generated one, as the swagger documents.
        let mut s = good();
        s.id = String::new();
        validate(&mut s).unwrap();
        assert!(is_uid(&s.id), "{}", s.id);
    }

    /// MACVTAP needs `--parent-iface` (refused, naming the flag, without
    /// it) and the jailer; TAP needs neither.
    #[test]
    fn macvtap_needs_parent_iface_and_jailer() {
        use crate::model::store::Store;
        use crate::runtime::process::Launcher;
        let root = std::env::temp_dir().join(format!("emberd-mvt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let launcher = |jailer: Option<PathBuf>| Launcher {
            vmm_bin: "/nonexistent/ember-vmm".into(),
            jailer_bin: jailer,
            chroot_base: root.join("jail"),
            uid: 1,
            gid: 1,
            ids: 8,
            libs: vec![],
        };
        let store = Store::open(&root.join("state")).unwrap();
        let mut sup = Supervisor::new(
            store,
            launcher(Some("/nonexistent/ember-jailer".into())),
            crate::build::Registry::new(),
        )
        .unwrap();
        let mut spec = good();
        spec.interfaces[0].kind = "MACVTAP".into();
        let e = check_macvtap_host(&sup, &spec).unwrap_err();
        assert!(matches!(e, MicroVmError::Invalid(_)));
        assert!(e.to_string().contains("--parent-iface"), "{e}");
        check_macvtap_host(&sup, &good()).unwrap();
        assert!(sup.set_parent_iface("-p0").is_err());
        assert!(sup.set_parent_iface("a/b").is_err());
        sup.set_parent_iface("p0").unwrap();
        check_macvtap_host(&sup, &spec).unwrap();
        let store = Store::open(&root.join("state2")).unwrap();
        let mut unjailed =
            Supervisor::new(store, launcher(None), crate::build::Registry::new()).unwrap();
        unjailed.set_parent_iface("p0").unwrap();
        let e = check_macvtap_host(&unjailed, &spec).unwrap_err();
        assert!(e.to_string().contains("jailer"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn protojson_spellings_and_enums() {
        let snake: MicroVmSpec = serde_json::from_value(json!({
            "id": "vm1", "memory_in_mb": "2048", "vcpu": 3,
            "kernel": {"image": "/k", "filename": "f", "add_network_config": true},
            "root_volume": {"id": "root", "is_read_only": true, "source": {"container_source": "/r"}},
            "additional_volumes": [{"id": "d", "mount_point": "/mnt", "size_in_mb": "5",
                                    "source": {"container_source": "/d"}}],
            "interfaces": [{"device_id": "eth0", "type": 1, "guest_mac": "06:00:00:00:00:01"},
                           {"device_id": "eth1"}, {"device_id": "eth2", "type": 0}],
            "allow_guest_agent": false
        }))
        .unwrap();
        assert_eq!(snake.memory_in_mb, 2048);
        assert!(snake.kernel.as_ref().unwrap().add_network_config);
        let root = snake.root_volume.as_ref().unwrap();
        assert!(root.is_read_only);
        assert_eq!(
            root.source.as_ref().unwrap().container_source.as_deref(),
            Some("/r")
        );
        assert_eq!(snake.additional_volumes[0].size_in_mb, Some(5));
        assert_eq!(
            snake.additional_volumes[0].mount_point.as_deref(),
            Some("/mnt")
        );
        let kinds: Vec<&str> = snake.interfaces.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(kinds, ["TAP", "MACVTAP", "MACVTAP"]);
        assert_eq!(snake.interfaces[0].device_id, "eth0");
        for bad in [
            json!({"type": 2}),
            json!({"type": "tap"}),
            json!({"type": true}),
        ] {
            assert!(serde_json::from_value::<Interface>(bad).is_err());
        }
        assert!(serde_json::from_value::<MicroVmSpec>(json!({"vcpu": "x"})).is_err());
        assert!(serde_json::from_value::<MicroVmSpec>(json!({"vcpu": 1.5})).is_err());
    }

    #[test]
    fn uids_match_in_any_case_and_as_instance_names() {
        let u = ulid::Ulid::new().to_string();
        assert!(is_uid(&u.to_lowercase()));
        assert!(is_uid(&format!("fl-{}", u.to_lowercase())));
        assert!(!is_uid("fl-default"));
    }

    #[test]
    fn macs() {
        assert!(is_mac("06:00:0a:00:00:09"));
        assert!(!is_mac("06:00:0a:00:00"));
        assert!(!is_mac("06:00:0a:00:00:0g"));
    }

    #[test]
    fn ulid_shapes() {
        let u = ulid::Ulid::new().to_string();
        assert!(is_uid(&u));
        assert!(!is_uid("default"));
        assert!(!is_uid("01ARZ3NDEKTSV4RRFFQ69G5FA"));
    }
}
