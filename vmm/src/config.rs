//! Configuration, one struct per API resource, in Firecracker's JSON shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use devices::virtio::rate_limiter::RateLimiterConfig;

use crate::arch::layout::{CMDLINE_MAX_SIZE, IRQ_BASE, IRQ_MAX, MAX_VCPUS};

/// Errors validating configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The kernel image cannot be opened.
    #[error("The kernel file cannot be opened: {path}: {msg}")]
    KernelFile {
        /// The path given.
        path: String,
        /// Why it failed.
        msg: String,
    },
    /// The initrd cannot be opened.
    #[error("The initrd file cannot be opened: {path}: {msg}")]
    InitrdFile {
        /// The path given.
        path: String,
        /// Why it failed.
        msg: String,
    },
    /// The kernel command line does not fit the guest's buffer.
    #[error("The kernel command line is too long: {0} bytes (at most {max})", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// `vcpu_count` is out of range.
    #[error("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled, and between 1 and {MAX_VCPUS}.")]
    VcpuCount,
    /// `mem_size_mib` is out of range.
    #[error("The memory size (MiB) is invalid: it must be at least 1 and at most {max}.", max = MAX_MEM_MIB)]
    MemSize,
    /// `smt` was requested.
    #[error("Enabling simultaneous multithreading is not supported by ember.")]
    SmtNotSupported,
    /// `track_dirty_pages` was requested.
    #[error("Dirty page tracking is not supported by ember.")]
    DirtyPagesNotSupported,
    /// A CPU template other than `"None"` was requested.
    #[error("CPU templates are not supported by ember (got {0:?}).")]
    CpuTemplate(String),
    /// Huge pages other than `"None"` were requested.
    #[error("Huge pages are not supported by ember (got {0:?}).")]
    HugePages(String),
    /// A resource needed to boot is missing.
    #[error("Missing mandatory field: {0}")]
    Missing(&'static str),
    /// The id in the URL differs from the one in the body.
    #[error("The id from the path ({path}) does not match the id from the body ({body})!")]
    IdMismatch {
        /// The id in the URL path.
        path: String,
        /// The id in the body.
        body: String,
    },
    /// A resource id has the wrong length or characters.
    #[error("Invalid {what} id {id:?}: use 1 to 64 characters among ASCII letters, digits, '-' and '_'.")]
    BadId {
        /// The kind of resource or option.
        what: &'static str,
        /// The id given.
        id: String,
    },
    /// A drive's backing file cannot be opened as asked.
    #[error("The drive file cannot be opened: {path}: {msg}")]
    DriveFile {
        /// The path given.
        path: String,
        /// Why it failed.
        msg: String,
    },
    /// A second root drive was configured.
    #[error("A root block device already exists ({0}); there can be only one.")]
    RootDeviceExists(String),
    /// An option ember does not implement was given a value.
    #[error("Unsupported {what} {value:?}: ember supports {supported}.")]
    Unsupported {
        /// The kind of resource or option.
        what: &'static str,
        /// The value given.
        value: String,
        /// The values ember accepts.
        supported: &'static str,
    },
    /// `host_dev_name` is not a valid TAP name.
    #[error(
        "Invalid host_dev_name {0:?}: a TAP name has 1 to 15 characters and no '/' or whitespace."
    )]
    TapName(String),
    /// Two interfaces name the same TAP.
    #[error("The host device name {0} is already used by another interface.")]
    TapNameInUse(String),
    /// `guest_mac` cannot be parsed.
    #[error("Invalid guest MAC address {0:?}: expected six hex octets like 06:00:ac:10:00:02.")]
    GuestMac(String),
    /// Two interfaces have the same MAC address.
    #[error("The guest MAC address {0} is already used by another interface.")]
    GuestMacInUse(String),
    /// The vsock `guest_cid` is reserved or too large.
    #[error("Invalid vsock guest_cid {0}: it must be at least 3.")]
    VsockCid(u64),
    /// The vsock `uds_path` is unusable.
    #[error("Invalid vsock uds_path: {0}")]
    VsockPath(String),
    /// A PATCH names a device that does not exist.
    #[error("No {what} with id {id} exists.")]
    NotFound {
        /// The kind of resource or option.
        what: &'static str,
        /// The id given.
        id: String,
    },
    /// More virtio devices than IRQ lines.
    #[error("Too many devices: at most {0} virtio devices fit the IRQ lines.")]
    TooManyDevices(usize),
}

/// Largest guest memory accepted (1 TiB).
pub const MAX_MEM_MIB: usize = 1 << 20;

/// Command line used when `boot_args` is not given.
pub const DEFAULT_KERNEL_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// The kernel image (ELF vmlinux or bzImage) on the host.
    pub kernel_image_path: String,
    /// An initrd on the host, loaded after the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line; [`DEFAULT_KERNEL_CMDLINE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

fn check_readable(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    let md = std::fs::metadata(Path::new(path)).map_err(|e| e.to_string())?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl BootSourceConfig {
    /// Checks the files can be opened and the command line fits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_readable(&self.kernel_image_path).map_err(|msg| ConfigError::KernelFile {
            path: self.kernel_image_path.clone(),
            msg,
        })?;
        if let Some(p) = &self.initrd_path {
            check_readable(p).map_err(|msg| ConfigError::InitrdFile {
                path: p.clone(),
                msg,
            })?;
        }
        let len = self.cmdline().len();
        if len >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(len));
        }
        Ok(())
    }

    /// The command line the guest gets.
    pub fn cmdline(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_KERNEL_CMDLINE)
    }
}

fn default_vcpus() -> u8 {
    1
}
fn default_mem() -> usize {
    128
}

/// `PUT /machine-config` and `GET /machine-config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 32.
    #[serde(default = "default_vcpus")]
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_size_mib: usize,
    /// Simultaneous multithreading (refused when true).
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (refused when true).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker CPU template; only `"None"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Huge pages backing guest memory; only `"None"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: default_vcpus(),
            mem_size_mib: default_mem(),
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

impl MachineConfig {
    /// Range and support checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount);
        }
        if self.mem_size_mib == 0 || self.mem_size_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemSize);
        }
        if self.smt {
            return Err(ConfigError::SmtNotSupported);
        }
        if self.track_dirty_pages {
            return Err(ConfigError::DirtyPagesNotSupported);
        }
        if let Some(t) = &self.cpu_template {
            if t != "None" {
                return Err(ConfigError::CpuTemplate(t.clone()));
            }
        }
        if let Some(h) = &self.huge_pages {
            if h != "None" {
                return Err(ConfigError::HugePages(h.clone()));
            }
        }
        Ok(())
    }
}

/// `PATCH /machine-config`: every field optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs, 1 to 32.
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<usize>,
    /// Simultaneous multithreading (refused when true).
    pub smt: Option<bool>,
    /// Dirty page tracking (refused when true).
    pub track_dirty_pages: Option<bool>,
    /// Firecracker CPU template; only `"None"` is accepted.
    pub cpu_template: Option<String>,
    /// Huge pages backing guest memory; only `"None"` is accepted.
    pub huge_pages: Option<String>,
}

impl MachineConfigUpdate {
    /// `base` with this update applied, validated.
    pub fn apply(&self, base: &MachineConfig) -> Result<MachineConfig, ConfigError> {
        let mut m = base.clone();
        if let Some(v) = self.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = self.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = self.smt {
            m.smt = v;
        }
        if let Some(v) = self.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = &self.cpu_template {
            m.cpu_template = Some(v.clone());
        }
        if let Some(v) = &self.huge_pages {
            m.huge_pages = Some(v.clone());
        }
        m.validate()?;
        Ok(m)
    }
}

/// Where COM1 output goes (ember extension; stdout when absent).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// File that receives COM1 output (appended); stdout when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
}

/// The whole VM: `--config-file` input and `GET /vm/config` output.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initrd and command line (`boot-source`).
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSourceConfig>,
    /// vCPUs and memory (`machine-config`).
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Where COM1 output goes (ember extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// virtio-blk drives; the root drive is attached first (`/dev/vda`).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// virtio-net interfaces (`network-interfaces`).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// The virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockDeviceConfig>,
}

impl VmConfig {
    /// Everything needed to start: a kernel, sane machine config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.boot_source
            .as_ref()
            .ok_or(ConfigError::Missing("boot-source"))?
            .validate()?;
        self.machine_config.validate()?;
        let mut probe = VmConfig::default();
        for d in &self.drives {
            probe.upsert_drive(d.clone())?;
        }
        for n in &self.network_interfaces {
            probe.upsert_net(n.clone())?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        let n = self.device_count();
        if n > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
        }
        Ok(())
    }

    /// How many virtio devices the config asks for.
    pub fn device_count(&self) -> usize {
        self.drives.len() + self.network_interfaces.len() + usize::from(self.vsock.is_some())
    }

    /// Adds or replaces a drive (`PUT /drives/{id}`).
    pub fn upsert_drive(&mut self, d: DriveConfig) -> Result<(), ConfigError> {
        d.validate()?;
        if d.is_root_device {
            if let Some(r) = self
                .drives
                .iter()
                .find(|x| x.is_root_device && x.drive_id != d.drive_id)
            {
                return Err(ConfigError::RootDeviceExists(r.drive_id.clone()));
            }
        }
        match self.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => {
                if self.device_count() >= MAX_VIRTIO_DEVICES {
                    return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
                }
                self.drives.push(d)
            }
        }
        Ok(())
    }

    /// Adds or replaces a network interface (`PUT /network-interfaces/{id}`).
    pub fn upsert_net(&mut self, n: NetworkInterfaceConfig) -> Result<(), ConfigError> {
        let mac = n.validate()?;
        for other in self
            .network_interfaces
            .iter()
            .filter(|x| x.iface_id != n.iface_id)
        {
            if other.host_dev_name == n.host_dev_name {
                return Err(ConfigError::TapNameInUse(n.host_dev_name.clone()));
            }
            if let (Some(a), Some(b)) = (mac, other.mac()) {
                if a == b {
                    return Err(ConfigError::GuestMacInUse(
                        n.guest_mac.clone().unwrap_or_default(),
                    ));
                }
            }
        }
        match self
            .network_interfaces
            .iter_mut()
            .find(|x| x.iface_id == n.iface_id)
        {
            Some(slot) => *slot = n,
            None => {
                if self.device_count() >= MAX_VIRTIO_DEVICES {
                    return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
                }
                self.network_interfaces.push(n)
            }
        }
        Ok(())
    }

    /// Sets the vsock device (`PUT /vsock`).
    pub fn set_vsock(&mut self, v: VsockDeviceConfig) -> Result<(), ConfigError> {
        v.validate()?;
        if self.vsock.is_none() && self.device_count() >= MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
        }
        self.vsock = Some(v);
        Ok(())
    }
}

/// virtio-mmio devices get one IRQ line each, from IRQ_BASE to IRQ_MAX.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - IRQ_BASE + 1) as usize;

/// Checks an API resource id.
pub fn validate_id(what: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadId {
            what,
            id: id.to_string(),
        })
    }
}

/// Checks that the id in a URL path matches the one in the body.
pub fn check_path_id(path: &str, body: &str) -> Result<(), ConfigError> {
    if path == body {
        Ok(())
    } else {
        Err(ConfigError::IdMismatch {
            path: path.into(),
            body: body.into(),
        })
    }
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The drive's id (1 to 64 of `[A-Za-z0-9_-]`).
    pub drive_id: String,
    /// The backing file or block device on the host.
    pub path_on_host: String,
    /// Whether this is the root drive (`root=` is added to the command line).
    pub is_root_device: bool,
    /// Read-only for the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// With `is_root_device`: `root=PARTUUID=<this>` instead of `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `"Unsafe"` (default) or `"Writeback"` (flush requests reach the host file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Only `"Sync"` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Bandwidth and operation limits for the drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

fn check_drive_file(path: &str, read_only: bool) -> Result<(), ConfigError> {
    let err = |msg: String| ConfigError::DriveFile {
        path: path.into(),
        msg,
    };
    if path.is_empty() {
        return Err(err("empty path".into()));
    }
    let md = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if md.is_dir() {
        return Err(err("is a directory".into()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map(|_| ())
        .map_err(|e| err(e.to_string()))
}

impl DriveConfig {
    /// Id, file and option checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id("drive", &self.drive_id)?;
        check_drive_file(&self.path_on_host, self.is_read_only)?;
        if let Some(c) = &self.cache_type {
            if c != "Unsafe" && c != "Writeback" {
                return Err(ConfigError::Unsupported {
                    what: "cache_type",
                    value: c.clone(),
                    supported: "\"Unsafe\" and \"Writeback\"",
                });
            }
        }
        if let Some(e) = &self.io_engine {
            if e != "Sync" {
                return Err(ConfigError::Unsupported {
                    what: "io_engine",
                    value: e.clone(),
                    supported: "\"Sync\"",
                });
            }
        }
        Ok(())
    }
}

/// `PATCH /drives/{id}` (after boot): a new backing file and/or rate limiter.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive's id (1 to 64 of `[A-Za-z0-9_-]`).
    pub drive_id: String,
    /// The backing file or block device on the host.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Bandwidth and operation limits for the drive.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// The interface's id (1 to 64 of `[A-Za-z0-9_-]`).
    pub iface_id: String,
    /// The existing TAP device on the host.
    pub host_dev_name: String,
    /// The guest MAC address (`06:00:ac:10:00:02` form); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on traffic toward the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on traffic from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceConfig {
    /// The parsed guest MAC, if one is set and valid.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.guest_mac
            .as_deref()
            .and_then(|m| devices::virtio::net::parse_mac(m).ok())
    }

    /// Id, TAP name and MAC checks; returns the parsed MAC.
    pub fn validate(&self) -> Result<Option<[u8; 6]>, ConfigError> {
        validate_id("network interface", &self.iface_id)?;
        let n = &self.host_dev_name;
        if n.is_empty() || n.len() > 15 || n.contains('/') || n.chars().any(char::is_whitespace) {
            return Err(ConfigError::TapName(n.clone()));
        }
        match &self.guest_mac {
            None => Ok(None),
            Some(m) => devices::virtio::net::parse_mac(m)
                .map(Some)
                .map_err(|_| ConfigError::GuestMac(m.clone())),
        }
    }
}

/// `PATCH /network-interfaces/{id}` (after boot): new rate limiters.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceUpdate {
    /// The interface's id (1 to 64 of `[A-Za-z0-9_-]`).
    pub iface_id: String,
    /// Limits on traffic toward the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on traffic from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockDeviceConfig {
    /// The device id (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    /// The guest's context id, 3 or more.
    pub guest_cid: u64,
    /// Host unix socket: host clients connect here; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: String,
}

impl VsockDeviceConfig {
    /// CID and socket path checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        if self.uds_path.is_empty() {
            return Err(ConfigError::VsockPath("empty path".into()));
        }
        let p = Path::new(&self.uds_path);
        match p.parent() {
            Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => Err(ConfigError::VsockPath(
                format!("directory {} does not exist", d.display()),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_config_defaults_and_limits() {
        let m: MachineConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(m, MachineConfig::default());
        m.validate().unwrap();
        let zero: MachineConfig = serde_json::from_str(r#"{"mem_size_mib":0}"#).unwrap();
        assert_eq!(zero.validate(), Err(ConfigError::MemSize));
        let v: MachineConfig = serde_json::from_str(r#"{"vcpu_count":0}"#).unwrap();
        assert_eq!(v.validate(), Err(ConfigError::VcpuCount));
        let v: MachineConfig = serde_json::from_str(r#"{"vcpu_count":33}"#).unwrap();
        assert_eq!(v.validate(), Err(ConfigError::VcpuCount));
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":-1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(r#"{"bogus":1}"#).is_err());
        let t: MachineConfig = serde_json::from_str(r#"{"cpu_template":"T2"}"#).unwrap();
        assert!(matches!(t.validate(), Err(ConfigError::CpuTemplate(_))));
    }

    #[test]
    fn patch_applies_and_validates() {
        let base = MachineConfig::default();
        let up: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count":2}"#).unwrap();
        let m = up.apply(&base).unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 128));
        let bad: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib":0}"#).unwrap();
        assert_eq!(bad.apply(&base), Err(ConfigError::MemSize));
    }

    #[test]
    fn boot_source_checks_files() {
        let b = BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        assert!(matches!(b.validate(), Err(ConfigError::KernelFile { .. })));
        let d = BootSourceConfig {
            kernel_image_path: "/".into(),
            ..Default::default()
        };
        assert!(matches!(d.validate(), Err(ConfigError::KernelFile { .. })));
        let exe = std::env::current_exe().unwrap();
        let ok = BootSourceConfig {
            kernel_image_path: exe.to_string_lossy().into(),
            boot_args: Some("x".repeat(CMDLINE_MAX_SIZE)),
            ..Default::default()
        };
        assert!(matches!(ok.validate(), Err(ConfigError::CmdlineTooLong(_))));
    }

    fn temp_file(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ember-cfg-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0u8; 1024]).unwrap();
        p
    }

    #[test]
    fn drives_upsert_and_single_root() {
        let f = temp_file("drive");
        let path = f.to_string_lossy().to_string();
        let d = |id: &str, root: bool| DriveConfig {
            drive_id: id.into(),
            path_on_host: path.clone(),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        };
        let mut c = VmConfig::default();
        c.upsert_drive(d("rootfs", true)).unwrap();
        c.upsert_drive(d("rootfs", true)).unwrap();
        c.upsert_drive(d("data", false)).unwrap();
        assert_eq!(c.drives.len(), 2);
        assert!(matches!(
            c.upsert_drive(d("other", true)),
            Err(ConfigError::RootDeviceExists(_))
        ));
        assert!(matches!(
            c.upsert_drive(d("bad id!", false)),
            Err(ConfigError::BadId { .. })
        ));
        let mut missing = d("m", false);
        missing.path_on_host = "/nonexistent/disk".into();
        assert!(matches!(
            c.upsert_drive(missing),
            Err(ConfigError::DriveFile { .. })
        ));
        let mut engine = d("e", false);
        engine.io_engine = Some("Async".into());
        assert!(matches!(
            c.upsert_drive(engine),
            Err(ConfigError::Unsupported { .. })
        ));
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn network_interfaces_are_checked() {
        let n = |id: &str, tap: &str, mac: Option<&str>| NetworkInterfaceConfig {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let mut c = VmConfig::default();
        c.upsert_net(n("eth0", "tap0", Some("06:00:00:00:00:01")))
            .unwrap();
        assert!(matches!(
            c.upsert_net(n("eth1", "tap0", None)),
            Err(ConfigError::TapNameInUse(_))
        ));
        assert!(matches!(
            c.upsert_net(n("eth1", "tap1", Some("06:00:00:00:00:01"))),
            Err(ConfigError::GuestMacInUse(_))
        ));
        assert!(matches!(
            c.upsert_net(n("eth1", "a-very-long-tap-name", None)),
            Err(ConfigError::TapName(_))
        ));
        assert!(matches!(
            c.upsert_net(n("eth1", "tap1", Some("zz:00"))),
            Err(ConfigError::GuestMac(_))
        ));
        c.upsert_net(n("eth1", "tap1", None)).unwrap();
        assert_eq!(c.device_count(), 2);
    }

    #[test]
    fn vsock_is_checked() {
        let v = |cid: u64, p: &str| VsockDeviceConfig {
            vsock_id: None,
            guest_cid: cid,
            uds_path: p.into(),
        };
        assert!(matches!(
            v(2, "/tmp/v.sock").validate(),
            Err(ConfigError::VsockCid(2))
        ));
        assert!(v(3, "/tmp/v.sock").validate().is_ok());
        assert!(matches!(
            v(3, "/nonexistent-dir/v.sock").validate(),
            Err(ConfigError::VsockPath(_))
        ));
    }

    #[test]
    fn firecracker_config_file_shape() {
        let j = r#"{"boot-source":{"kernel_image_path":"/k","boot_args":"console=ttyS0"},
                    "machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":false},
                    "drives":[]}"#;
        let c: VmConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.boot_source.unwrap().cmdline(), "console=ttyS0");
        assert!(serde_json::from_str::<VmConfig>(r#"{"nope":{}}"#).is_err());
    }
}
