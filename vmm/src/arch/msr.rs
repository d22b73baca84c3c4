//! Boot-time model-specific registers.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::config::cpu_config::MsrModifier;

/// Errors setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("could not build the MSR list: {0}")]
    Fam(vmm_sys_util::fam::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set only {set} of {wanted} MSRs")]
    Partial { set: usize, wanted: usize },
    #[error("The CPU template modifies MSR {0:#x}, which this host's KVM does not let the guest read or write.")]
    TemplateMsr(u32),
    #[error("KVM_GET_MSRS failed: {0}")]
    Get(kvm_ioctls::Error),
}

/// Applies a custom template's MSR modifiers: read, change the named bits,
/// write back, one MSR at a time so a refusal names its MSR.
pub fn apply_template(fd: &VcpuFd, mods: &[MsrModifier]) -> Result<(), MsrError> {
    for m in mods {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: m.addr,
            ..Default::default()
        }])
        .map_err(MsrError::Fam)?;
        let n = fd.get_msrs(&mut msrs).map_err(MsrError::Get)?;
        if n != 1 {
            return Err(MsrError::TemplateMsr(m.addr));
        }
        let cur = msrs.as_slice()[0].data;
        let new = Msrs::from_entries(&[kvm_msr_entry {
            index: m.addr,
            data: m.bitmap.apply(cur),
            ..Default::default()
        }])
        .map_err(MsrError::Fam)?;
        if fd.set_msrs(&new).map_err(MsrError::Set)? != 1 {
            return Err(MsrError::TemplateMsr(m.addr));
        }
    }
    Ok(())
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The MSRs set before the first KVM_RUN and their values.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Programs the boot MSRs into `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let e = boot_msr_entries();
        let mtrr = e.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        assert!(Msrs::from_entries(&e).is_ok());
    }
}
