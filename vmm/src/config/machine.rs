//! `PUT`/`PATCH`/`GET /machine-config`: vCPUs, memory, SMT, dirty page
//! tracking, huge pages and the (deprecated) static CPU template, in
//! Firecracker's shapes and with its rules:
//!
//! - `PUT` needs both `vcpu_count` and `mem_size_mib`; the other fields take
//!   their defaults. `PATCH` changes only what it names and an empty one is
//!   refused (`Empty PATCH request.`).
//! - With `smt`, `vcpu_count` is 1 or even; the guest then sees two threads
//!   per core (CPUID leaves 0x1, 0x4 and 0xB).
//! - `track_dirty_pages` sets `KVM_MEM_LOG_DIRTY_PAGES` on every memory slot.
//! - `huge_pages`: `"2M"` backs guest memory with hugetlbfs pages
//!   (`MAP_HUGETLB | MAP_HUGE_2MB`); booting fails with a message naming
//!   `/proc/sys/vm/nr_hugepages` when the host has too few free ones.
//!   `"Transparent"` asks for THP with `madvise(MADV_HUGEPAGE)`. Both need
//!   `mem_size_mib` to be a multiple of 2.
//! - `cpu_template`: only `"None"`. Firecracker's static templates (C3, T2,
//!   T2S, T2CL, T2A, V1N1) are tables of Intel/AMD CPUID and MSR masks that
//!   ember does not carry; they are refused by name, and the same effect is
//!   available as a custom template through `PUT /cpu-config`.

use serde::{Deserialize, Serialize};

use crate::arch::layout::MAX_VCPUS;

/// Largest guest memory accepted (1 TiB).
pub const MAX_MEM_MIB: usize = 1 << 20;

/// Errors validating `/machine-config`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineConfigError {
    /// `vcpu_count` is out of range or odd with SMT.
    #[error("The number of vCPUs must be greater than 0, less than {MAX_VCPUS} and must be 1 or an even number if SMT is enabled.")]
    InvalidVcpuCount,
    /// `mem_size_mib` is 0 or not a multiple of the page size.
    #[error("The memory size (MiB) is either 0, or not a multiple of the configured page size.")]
    InvalidMemorySize,
    /// `mem_size_mib` is above ember's limit.
    #[error("The memory size (MiB) is invalid: it must be at most {MAX_MEM_MIB}.")]
    MemoryTooLarge,
    /// A static CPU template other than `None` was asked for.
    #[error("The static CPU template {0:?} is not implemented by ember: its CPUID and MSR tables are not carried. Use \"None\", or give the modifiers as a custom template with PUT /cpu-config.")]
    StaticTemplate(StaticCpuTemplate),
}

/// Firecracker's static CPU templates (deprecated by Firecracker).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum StaticCpuTemplate {
    /// Intel Skylake/Cascade Lake as a C3 instance.
    C3,
    /// Intel as a T2 instance.
    T2,
    /// T2 with stricter masking.
    T2S,
    /// Intel Cascade Lake T2.
    T2CL,
    /// AMD T2.
    T2A,
    /// ARM Neoverse V1 as N1.
    V1N1,
    /// No template.
    #[default]
    None,
}

/// What backs guest memory.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    /// Explicit hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    fn page_mib_divisor(self) -> usize {
        match self {
            HugePages::None => 1,
            HugePages::Transparent | HugePages::Hugetlbfs2M => 2,
        }
    }
}

/// `PUT /machine-config` (both counts required) and `GET /machine-config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 32 (1 or even with `smt`).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// Two threads per core in the guest's CPU topology.
    #[serde(default)]
    pub smt: bool,
    /// Firecracker's static CPU template; only `"None"` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// KVM dirty page logging on guest memory.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// What backs guest memory.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

impl MachineConfig {
    /// Range and support checks.
    pub fn validate(&self) -> Result<(), MachineConfigError> {
        let v = self.vcpu_count;
        if v == 0 || v > MAX_VCPUS || (self.smt && v > 1 && v % 2 == 1) {
            return Err(MachineConfigError::InvalidVcpuCount);
        }
        if self.mem_size_mib == 0
            || !self
                .mem_size_mib
                .is_multiple_of(self.huge_pages.page_mib_divisor())
        {
            return Err(MachineConfigError::InvalidMemorySize);
        }
        if self.mem_size_mib > MAX_MEM_MIB {
            return Err(MachineConfigError::MemoryTooLarge);
        }
        match self.cpu_template {
            None | Some(StaticCpuTemplate::None) => Ok(()),
            Some(t) => Err(MachineConfigError::StaticTemplate(t)),
        }
    }
}

/// `PATCH /machine-config`: every field optional, at least one given.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<usize>,
    /// Two threads per core.
    pub smt: Option<bool>,
    /// Static CPU template; only `"None"` is accepted.
    pub cpu_template: Option<StaticCpuTemplate>,
    /// KVM dirty page logging.
    pub track_dirty_pages: Option<bool>,
    /// What backs guest memory.
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// Whether the update names no field (Firecracker refuses it).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `base` with this update applied, validated.
    pub fn apply(&self, base: &MachineConfig) -> Result<MachineConfig, MachineConfigError> {
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
        if let Some(v) = self.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = self.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = self.huge_pages {
            m.huge_pages = v;
        }
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_needs_both_counts() {
        let e = serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":1}"#).unwrap_err();
        assert!(e.to_string().contains("mem_size_mib"), "{e}");
        assert!(serde_json::from_str::<MachineConfig>(r#"{"mem_size_mib":64}"#).is_err());
        let m: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":64,"smt":true}"#).unwrap();
        m.validate().unwrap();
        assert_eq!(m.huge_pages, HugePages::None);
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count":1,"mem_size_mib":1,"bogus":1}"#
        )
        .is_err());
    }

    #[test]
    fn limits_and_smt() {
        let m = |v: u8, mem: usize, smt: bool| MachineConfig {
            vcpu_count: v,
            mem_size_mib: mem,
            smt,
            ..Default::default()
        };
        assert_eq!(
            m(0, 64, false).validate(),
            Err(MachineConfigError::InvalidVcpuCount)
        );
        assert_eq!(
            m(33, 64, false).validate(),
            Err(MachineConfigError::InvalidVcpuCount)
        );
        assert_eq!(
            m(3, 64, true).validate(),
            Err(MachineConfigError::InvalidVcpuCount)
        );
        m(3, 64, false).validate().unwrap();
        m(1, 64, true).validate().unwrap();
        assert_eq!(
            m(1, 0, false).validate(),
            Err(MachineConfigError::InvalidMemorySize)
        );
        let mut h = m(1, 65, false);
        h.huge_pages = HugePages::Hugetlbfs2M;
        assert_eq!(h.validate(), Err(MachineConfigError::InvalidMemorySize));
        h.mem_size_mib = 64;
        h.validate().unwrap();
        let t: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count":1,"mem_size_mib":64,"cpu_template":"T2"}"#)
                .unwrap();
        assert_eq!(
            t.validate(),
            Err(MachineConfigError::StaticTemplate(StaticCpuTemplate::T2))
        );
        let h: MachineConfig =
            serde_json::from_str(r#"{"vcpu_count":1,"mem_size_mib":64,"huge_pages":"2M"}"#)
                .unwrap();
        assert_eq!(h.huge_pages, HugePages::Hugetlbfs2M);
    }

    #[test]
    fn patch_applies_and_validates() {
        let base = MachineConfig::default();
        let up: MachineConfigUpdate = serde_json::from_str(r#"{"vcpu_count":2}"#).unwrap();
        let m = up.apply(&base).unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 128));
        let bad: MachineConfigUpdate = serde_json::from_str(r#"{"mem_size_mib":0}"#).unwrap();
        assert_eq!(bad.apply(&base), Err(MachineConfigError::InvalidMemorySize));
        assert!(serde_json::from_str::<MachineConfigUpdate>("{}")
            .unwrap()
            .is_empty());
    }
}
