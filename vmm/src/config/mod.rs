//! Configuration, one struct per API resource, in Firecracker's JSON shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use devices::virtio::rate_limiter::RateLimiterConfig;

use crate::arch::layout::{CMDLINE_MAX_SIZE, IRQ_BASE, IRQ_MAX};

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
    /// The machine configuration is invalid.
    #[error(transparent)]
    Machine(#[from] machine::MachineConfigError),
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
    /// A vhost-user drive (`socket`) was configured.
    #[error("Drive {0}: vhost-user block devices (\"socket\") are not supported by ember; give path_on_host for a virtio-blk drive instead.")]
    VhostUser(String),
    /// An MTU outside 68..=65535.
    #[error("Invalid mtu {0}: it must be between 68 and 65535.")]
    Mtu(u16),
    /// A resource in the config file has no device behind it yet.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// The balloon configuration is invalid.
    #[error(transparent)]
    Balloon(#[from] balloon::BalloonConfigError),
    /// The MMDS configuration is invalid.
    #[error(transparent)]
    Mmds(#[from] mmds::MmdsConfigError),
    /// The CPU template is invalid.
    #[error(transparent)]
    CpuConfig(#[from] cpu_config::CpuConfigError),
    /// The logger configuration is invalid.
    #[error(transparent)]
    Logger(#[from] logger::LoggerConfigError),
    /// More virtio devices than IRQ lines.
    #[error("Too many devices: at most {0} virtio devices fit the IRQ lines.")]
    TooManyDevices(usize),
}

pub use machine::{MachineConfigError, MAX_MEM_MIB};

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

pub mod balloon;
pub mod cpu_config;
pub mod entropy;
pub mod hotplug;
pub mod logger;
mod machine;
pub mod metrics;
pub mod mmds;
pub mod pmem;
pub mod snapshot;
pub use machine::{HugePages, MachineConfig, MachineConfigUpdate, StaticCpuTemplate};

/// `PUT /serial`: where COM1 output goes (stdout when absent).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// File or named pipe that receives COM1 output (appended); stdout when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// A token bucket on output bytes: what exceeds it is dropped and
    /// counted (`uart.rate_limiter_dropped_bytes`), as in Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<devices::virtio::rate_limiter::TokenBucketConfig>,
}

impl SerialConfig {
    /// Nothing to check beyond the shape (the file is opened at boot).
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Refusal texts for resources without a device behind them.
pub mod refusals {
    /// `/pmem/{id}`.
    pub const PMEM: &str = "Persistent memory devices (virtio-pmem) are not supported by ember; use a drive (PUT /drives/{id}) instead.";
    /// `/hotplug/memory`.
    pub const HOTPLUG: &str = "Memory hotplug (virtio-mem) is not supported by ember; size guest memory with mem_size_mib in /machine-config.";
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
    /// The logger (`PUT /logger`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<logger::LoggerConfig>,
    /// Metrics output (`PUT /metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<metrics::MetricsConfig>,
    /// MMDS configuration (`PUT /mmds/config`).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<mmds::MmdsConfig>,
    /// Custom CPU template (`PUT /cpu-config`).
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<cpu_config::CpuConfig>,
    /// virtio-rng (`PUT /entropy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<entropy::EntropyDeviceConfig>,
    /// virtio-balloon (`PUT /balloon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<balloon::BalloonConfig>,
    /// virtio-pmem (refused: not supported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<pmem::PmemConfig>,
    /// virtio-mem (refused: not supported).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<hotplug::MemoryHotplugConfig>,
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
        self.validate_extras()?;
        let n = self.device_count();
        if n > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
        }
        Ok(())
    }

    /// Checks the resources beyond boot source, machine and devices (also
    /// used before boot on a config file).
    pub fn validate_extras(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.serial {
            s.validate()?;
        }
        if let Some(l) = &self.logger {
            l.validate()?;
        }
        if let Some(m) = &self.mmds_config {
            m.validate(|id| self.network_interfaces.iter().any(|n| n.iface_id == id))?;
        }
        if let Some(c) = &self.cpu_config {
            c.template()?;
        }
        if let Some(b) = &self.balloon {
            b.validate(self.machine_config.mem_size_mib)?;
        }
        if !self.pmem.is_empty() {
            return Err(ConfigError::NotImplemented(refusals::PMEM));
        }
        if self.memory_hotplug.is_some() {
            return Err(ConfigError::NotImplemented(refusals::HOTPLUG));
        }
        Ok(())
    }

    /// How many virtio devices the config asks for.
    pub fn device_count(&self) -> usize {
        self.drives.len()
            + self.network_interfaces.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some())
            + usize::from(self.balloon.is_some())
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
    /// The backing file or block device on the host (required: ember has
    /// no vhost-user drives).
    #[serde(default)]
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
    /// A vhost-user-block backend socket: refused ([`ConfigError::VhostUser`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
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
        if self.socket.is_some() {
            return Err(ConfigError::VhostUser(self.drive_id.clone()));
        }
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
            if e != "Sync" && e != "Async" {
                return Err(ConfigError::Unsupported {
                    what: "io_engine",
                    value: e.clone(),
                    supported: "\"Sync\" and \"Async\"",
                });
            }
        }
        Ok(())
    }

    /// The engine the device runs (`Sync` unless `Async` was asked for).
    pub fn engine(&self) -> devices::virtio::block::IoEngine {
        match self.io_engine.as_deref() {
            Some("Async") => devices::virtio::block::IoEngine::Async,
            _ => devices::virtio::block::IoEngine::Sync,
        }
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
    /// MTU advised to the guest (VIRTIO_NET_F_MTU), 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
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
        if let Some(m) = self.mtu {
            if m < 68 {
                return Err(ConfigError::Mtu(m));
            }
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
            socket: None,
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
        assert_eq!(engine.engine(), devices::virtio::block::IoEngine::Async);
        engine.io_engine = Some("Turbo".into());
        assert!(matches!(
            c.upsert_drive(engine),
            Err(ConfigError::Unsupported {
                what: "io_engine",
                ..
            })
        ));
        let mut vhost = d("v", false);
        vhost.socket = Some("/run/vhost.sock".into());
        assert!(matches!(
            c.upsert_drive(vhost),
            Err(ConfigError::VhostUser(_))
        ));
        let j = r#"{"drive_id":"v","is_root_device":false,"socket":"/s"}"#;
        let parsed: DriveConfig = serde_json::from_str(j).unwrap();
        assert!(matches!(parsed.validate(), Err(ConfigError::VhostUser(_))));
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
            mtu: None,
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
