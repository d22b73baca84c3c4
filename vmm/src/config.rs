//! Configuration, one struct per API resource, in Firecracker's JSON shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arch::layout::{CMDLINE_MAX_SIZE, MAX_VCPUS};

/// Errors validating configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("The kernel file cannot be opened: {path}: {msg}")]
    KernelFile { path: String, msg: String },
    #[error("The initrd file cannot be opened: {path}: {msg}")]
    InitrdFile { path: String, msg: String },
    #[error("The kernel command line is too long: {0} bytes (at most {max})", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled, and between 1 and {MAX_VCPUS}.")]
    VcpuCount,
    #[error("The memory size (MiB) is invalid: it must be at least 1 and at most {max}.", max = MAX_MEM_MIB)]
    MemSize,
    #[error("Enabling simultaneous multithreading is not supported by ember.")]
    SmtNotSupported,
    #[error("Dirty page tracking is not supported by ember.")]
    DirtyPagesNotSupported,
    #[error("CPU templates are not supported by ember (got {0:?}).")]
    CpuTemplate(String),
    #[error("Huge pages are not supported by ember (got {0:?}).")]
    HugePages(String),
    #[error("Missing mandatory field: {0}")]
    Missing(&'static str),
    #[error("{what} is not supported yet")]
    NotSupportedYet { what: &'static str },
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
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
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
    std::fs::File::open(path).map(|_| ()).map_err(|e| e.to_string())
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
    #[serde(default = "default_vcpus")]
    pub vcpu_count: u8,
    #[serde(default = "default_mem")]
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
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
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub cpu_template: Option<String>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
}

/// The whole VM: `--config-file` input and `GET /vm/config` output.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default)]
    pub drives: Vec<serde_json::Value>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<serde_json::Value>,
}

impl VmConfig {
    /// Everything needed to start: a kernel, sane machine config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.boot_source
            .as_ref()
            .ok_or(ConfigError::Missing("boot-source"))?
            .validate()?;
        self.machine_config.validate()?;
        if !self.drives.is_empty() {
            return Err(ConfigError::NotSupportedYet { what: "drives" });
        }
        if !self.network_interfaces.is_empty() {
            return Err(ConfigError::NotSupportedYet {
                what: "network-interfaces",
            });
        }
        if self.vsock.is_some() {
            return Err(ConfigError::NotSupportedYet { what: "vsock" });
        }
        Ok(())
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
