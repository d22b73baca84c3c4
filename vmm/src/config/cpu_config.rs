//! `PUT /cpu-config`: a custom CPU template in Firecracker's shape. ember
//! applies its x86_64 parts when the vCPUs are configured:
//!
//! - `cpuid_modifiers`: for each (leaf, subleaf) the bits a bitmap names are
//!   set or cleared in the register it names, after ember's own CPUID
//!   normalization; a leaf/subleaf that KVM does not offer on this host
//!   fails `InstanceStart` with a message naming it.
//! - `msr_modifiers`: each MSR is read with `KVM_GET_MSRS`, the named bits
//!   changed and the value written with `KVM_SET_MSRS`; an MSR that this
//!   host's KVM does not let the guest have fails `InstanceStart` naming it.
//! - `kvm_capabilities`: `"N"` requires capability N (checked with
//!   `KVM_CHECK_EXTENSION` at boot, failing when absent); `"!N"` removes N
//!   from what ember requires, and is refused when N is one ember cannot run
//!   without.
//! - `reg_modifiers` and `vcpu_features` are aarch64-only: refused by name.
//!
//! `flags` in a CPUID modifier is kept and written to the KVM entry's flags.

use serde::{Deserialize, Serialize};

/// Errors in a `/cpu-config` request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuConfigError {
    /// A number is not decimal, `0x` hex or `0b` binary, or too large.
    #[error("Invalid {what} {value:?}: expected a decimal, 0x-hex or 0b-binary number that fits in {bits} bits.")]
    Number {
        /// The field.
        what: &'static str,
        /// The text given.
        value: String,
        /// Its width.
        bits: u32,
    },
    /// A bitmap is not `0b` followed by the right number of `0`, `1`, `x`.
    #[error("Invalid {what} bitmap {value:?}: expected \"0b\" and {bits} characters among '0', '1' and 'x' ('_' allowed as separator).")]
    Bitmap {
        /// The field.
        what: &'static str,
        /// The text given.
        value: String,
        /// Its width.
        bits: u32,
    },
    /// A CPUID register name other than eax, ebx, ecx, edx.
    #[error("Invalid CPUID register {0:?}: expected eax, ebx, ecx or edx.")]
    Register(String),
    /// A KVM capability is not `N` or `!N`.
    #[error("Invalid KVM capability {0:?}: expected a number, or '!' and a number to remove it.")]
    Capability(String),
    /// Removing a capability ember needs.
    #[error("KVM capability {0} cannot be removed: ember-vmm needs it to run.")]
    RequiredCapability(u32),
    /// aarch64-only modifiers on x86_64.
    #[error("{0} are aarch64-only; ember-vmm runs x86_64 guests.")]
    Aarch64Only(&'static str),
}

/// A bitmap: bits in `mask` are forced to the matching bits of `value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    /// Which bits are changed.
    pub mask: u64,
    /// Their new values (within `mask`).
    pub value: u64,
}

impl Bitmap {
    /// `old` with the masked bits replaced.
    pub fn apply(self, old: u64) -> u64 {
        (old & !self.mask) | (self.value & self.mask)
    }
}

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One checked CPUID leaf modifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidModifier {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// KVM entry flags.
    pub flags: u32,
    /// Register changes.
    pub registers: Vec<(CpuidRegister, Bitmap)>,
}

/// One checked MSR modifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrModifier {
    /// MSR index.
    pub addr: u32,
    /// Bit changes.
    pub bitmap: Bitmap,
}

/// A checked custom template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// Capabilities required.
    pub add_caps: Vec<u32>,
    /// Capabilities no longer required.
    pub remove_caps: Vec<u32>,
    /// CPUID changes.
    pub cpuid: Vec<CpuidModifier>,
    /// MSR changes.
    pub msrs: Vec<MsrModifier>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct CpuidRegisterModifierJson {
    register: String,
    bitmap: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct CpuidLeafModifierJson {
    leaf: String,
    subleaf: String,
    flags: u32,
    modifiers: Vec<CpuidRegisterModifierJson>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct MsrModifierJson {
    addr: String,
    bitmap: String,
}

/// `PUT /cpu-config` as sent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kvm_capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cpuid_modifiers: Vec<CpuidLeafModifierJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    msr_modifiers: Vec<MsrModifierJson>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reg_modifiers: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    vcpu_features: Vec<serde_json::Value>,
}

fn number(what: &'static str, s: &str, bits: u32) -> Result<u64, CpuConfigError> {
    let err = || CpuConfigError::Number {
        what,
        value: s.to_string(),
        bits,
    };
    let t = s.trim().replace('_', "");
    let v = if let Some(h) = t.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
    } else if let Some(b) = t.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else {
        t.parse::<u64>()
    }
    .map_err(|_| err())?;
    if bits < 64 && v >> bits != 0 {
        return Err(err());
    }
    Ok(v)
}

fn bitmap(what: &'static str, s: &str, bits: u32) -> Result<Bitmap, CpuConfigError> {
    let err = || CpuConfigError::Bitmap {
        what,
        value: s.to_string(),
        bits,
    };
    let body = s.strip_prefix("0b").ok_or_else(err)?;
    let chars: Vec<char> = body.chars().filter(|c| *c != '_').collect();
    if chars.len() != bits as usize {
        return Err(err());
    }
    let mut b = Bitmap::default();
    for (i, c) in chars.iter().rev().enumerate() {
        match c {
            '0' => b.mask |= 1 << i,
            '1' => {
                b.mask |= 1 << i;
                b.value |= 1 << i;
            }
            'x' | 'X' => {}
            _ => return Err(err()),
        }
    }
    Ok(b)
}

/// Capabilities ember-vmm cannot run without (see `Vm::new`).
pub const REQUIRED_CAPS: &[u32] = &[
    kvm_bindings::KVM_CAP_IRQCHIP,
    kvm_bindings::KVM_CAP_IOEVENTFD,
    kvm_bindings::KVM_CAP_IRQFD,
    kvm_bindings::KVM_CAP_USER_MEMORY,
];

impl CpuConfig {
    /// Checks every field and returns the template to apply.
    pub fn template(&self) -> Result<CpuTemplate, CpuConfigError> {
        if !self.reg_modifiers.is_empty() {
            return Err(CpuConfigError::Aarch64Only("reg_modifiers"));
        }
        if !self.vcpu_features.is_empty() {
            return Err(CpuConfigError::Aarch64Only("vcpu_features"));
        }
        let mut t = CpuTemplate::default();
        for c in &self.kvm_capabilities {
            let (remove, n) = match c.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, c.as_str()),
            };
            let n: u32 = n
                .parse()
                .map_err(|_| CpuConfigError::Capability(c.clone()))?;
            if remove {
                if REQUIRED_CAPS.contains(&n) {
                    return Err(CpuConfigError::RequiredCapability(n));
                }
                t.remove_caps.push(n);
            } else {
                t.add_caps.push(n);
            }
        }
        for l in &self.cpuid_modifiers {
            let mut m = CpuidModifier {
                leaf: number("CPUID leaf", &l.leaf, 32)? as u32,
                subleaf: number("CPUID subleaf", &l.subleaf, 32)? as u32,
                flags: l.flags,
                registers: Vec::new(),
            };
            for r in &l.modifiers {
                let reg = match r.register.to_ascii_lowercase().as_str() {
                    "eax" => CpuidRegister::Eax,
                    "ebx" => CpuidRegister::Ebx,
                    "ecx" => CpuidRegister::Ecx,
                    "edx" => CpuidRegister::Edx,
                    _ => return Err(CpuConfigError::Register(r.register.clone())),
                };
                m.registers
                    .push((reg, bitmap("CPUID register", &r.bitmap, 32)?));
            }
            t.cpuid.push(m);
        }
        for m in &self.msr_modifiers {
            t.msrs.push(MsrModifier {
                addr: number("MSR address", &m.addr, 32)? as u32,
                bitmap: bitmap("MSR", &m.bitmap, 64)?,
            });
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_template() {
        let j = r#"{
          "kvm_capabilities": ["171", "!172"],
          "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx01"}]}],
          "msr_modifiers": [{"addr": "0x10a",
            "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000001"}]
        }"#;
        let c: CpuConfig = serde_json::from_str(j).unwrap();
        let t = c.template().unwrap();
        assert_eq!(t.add_caps, vec![171]);
        assert_eq!(t.remove_caps, vec![172]);
        assert_eq!(t.cpuid[0].leaf, 1);
        let (r, b) = t.cpuid[0].registers[0];
        assert_eq!(r, CpuidRegister::Ecx);
        assert_eq!((b.mask, b.value), (0b11, 0b01));
        assert_eq!(b.apply(0xff), 0xfd);
        assert_eq!(t.msrs[0].addr, 0x10a);
        assert_eq!(t.msrs[0].bitmap.mask, u64::MAX);
        assert_eq!(t.msrs[0].bitmap.apply(0xff), 1);
    }

    #[test]
    fn refuses_bad_modifiers() {
        let bad = |j: &str| {
            serde_json::from_str::<CpuConfig>(j)
                .unwrap()
                .template()
                .unwrap_err()
        };
        assert!(matches!(
            bad(r#"{"cpuid_modifiers":[{"leaf":"0xz","subleaf":"0","flags":0,"modifiers":[]}]}"#),
            CpuConfigError::Number { .. }
        ));
        assert!(matches!(
            bad(r#"{"msr_modifiers":[{"addr":"0x10a","bitmap":"0b01"}]}"#),
            CpuConfigError::Bitmap { .. }
        ));
        assert!(matches!(
            bad(r#"{"msr_modifiers":[{"addr":"0x1ffffffff","bitmap":"0b01"}]}"#),
            CpuConfigError::Number { .. }
        ));
        assert!(matches!(
            bad(r#"{"reg_modifiers":[{"addr":"0x0","bitmap":"0b1"}]}"#),
            CpuConfigError::Aarch64Only(_)
        ));
        assert!(matches!(
            bad(r#"{"kvm_capabilities":["!0x1"]}"#),
            CpuConfigError::Capability(_)
        ));
        let irqchip = format!(
            r#"{{"kvm_capabilities":["!{}"]}}"#,
            kvm_bindings::KVM_CAP_IRQCHIP
        );
        assert!(matches!(
            bad(&irqchip),
            CpuConfigError::RequiredCapability(_)
        ));
        assert!(serde_json::from_str::<CpuConfig>(r#"{"cpuid":[]}"#).is_err());
    }
}
