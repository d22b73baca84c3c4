//! Guest CPUID: KVM's supported set, with topology and identity made per-vCPU.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::config::cpu_config::{CpuidModifier, CpuidRegister};

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("The CPU template modifies CPUID leaf {leaf:#x} subleaf {subleaf:#x}, which this host's KVM does not offer.")]
    TemplateLeaf { leaf: u32, subleaf: u32 },
}

/// Applies a custom template's CPUID modifiers (after [`normalize`]).
pub fn apply_template(cpuid: &mut CpuId, mods: &[CpuidModifier]) -> Result<(), CpuidError> {
    for m in mods {
        let entry = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == m.leaf && e.index == m.subleaf)
            .ok_or(CpuidError::TemplateLeaf {
                leaf: m.leaf,
                subleaf: m.subleaf,
            })?;
        entry.flags = m.flags;
        for (reg, bits) in &m.registers {
            let r = match reg {
                CpuidRegister::Eax => &mut entry.eax,
                CpuidRegister::Ebx => &mut entry.ebx,
                CpuidRegister::Ecx => &mut entry.ecx,
                CpuidRegister::Edx => &mut entry.edx,
            };
            *r = bits.apply(u64::from(*r)) as u32;
        }
    }
    Ok(())
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;

/// Fetches what KVM supports on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// Adjusts `cpuid` for vCPU `id` of `count`: APIC IDs, logical processor
/// counts, the hypervisor bit, and the topology: one thread per core, or
/// two with `smt` (and more than one vCPU), as Firecracker presents it.
pub fn normalize(cpuid: &mut CpuId, id: u8, count: u8, smt: bool) {
    let threads: u32 = if smt && count > 1 { 2 } else { 1 };
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH size (8*8 = 64 bytes).
                entry.ebx = (u32::from(id) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR_BIT;
                if count > 1 {
                    entry.edx |= EDX_HTT_BIT;
                } else {
                    entry.edx &= !EDX_HTT_BIT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                entry.eax &= 0x3fff;
                let cores = u32::from(count) / threads;
                entry.eax |= cores.saturating_sub(1) << 26;
                if cache_level >= 3 {
                    entry.eax |= u32::from(count.saturating_sub(1)) << 14;
                } else {
                    // L1 and L2 are shared by the threads of one core.
                    entry.eax |= (threads - 1) << 14;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = u32::from(id);
                match entry.index {
                    // SMT level: `threads` threads per core.
                    0 => {
                        entry.eax = threads - 1;
                        entry.ebx = threads;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    // Core level: `count` cores.
                    1 => {
                        entry.eax = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_and_counts() {
        let mut c =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).unwrap();
        normalize(&mut c, 3, 4, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & EDX_HTT_BIT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[1].ebx, 1);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].eax >> 26, 3);
    }

    #[test]
    fn smt_gives_two_threads_per_core() {
        let mut c = CpuId::from_entries(&[entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).unwrap();
        c.as_mut_slice()[2].eax = 1 << 5; // L1
        normalize(&mut c, 1, 4, true);
        let e = c.as_slice();
        assert_eq!((e[0].eax, e[0].ebx), (1, 2));
        assert_eq!(e[1].ebx, 4);
        assert_eq!(e[2].eax >> 26, 1); // two cores
        assert_eq!((e[2].eax >> 14) & 0xfff, 1); // L1 shared by two threads
    }

    #[test]
    fn template_modifiers_apply_or_name_the_missing_leaf() {
        use crate::config::cpu_config::Bitmap;
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        c.as_mut_slice()[0].ecx = 0xff;
        let m = CpuidModifier {
            leaf: 1,
            subleaf: 0,
            flags: 0,
            registers: vec![(
                CpuidRegister::Ecx,
                Bitmap {
                    mask: 0b11,
                    value: 0b01,
                },
            )],
        };
        apply_template(&mut c, std::slice::from_ref(&m)).unwrap();
        assert_eq!(c.as_slice()[0].ecx, 0xfd);
        let missing = CpuidModifier {
            leaf: 0x4000_0000,
            ..m
        };
        assert!(matches!(
            apply_template(&mut c, &[missing]),
            Err(CpuidError::TemplateLeaf { .. })
        ));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        c.as_mut_slice()[0].edx = EDX_HTT_BIT;
        normalize(&mut c, 0, 1, false);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT_BIT, 0);
    }
}
