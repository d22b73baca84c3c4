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
    #[error("KVM_SET_MSRS refused MSR {0:#x} of the snapshot (a host without it?)")]
    Refused(u32),
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

/// `IA32_TSC_DEADLINE`: restored after `IA32_TSC`, or KVM may judge the
/// deadline already passed (or far away) and lose the timer interrupt.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSR ranges a snapshot saves (index, count): the architectural state a
/// guest programs (Firecracker's serializable list, condensed). KVM's own
/// index list is filtered through this.
const SAVED_MSR_RANGES: &[(u32, u32)] = &[
    (0x10, 1),            // IA32_TSC
    (0x1b, 1),            // IA32_APICBASE
    (0x3a, 2),            // IA32_FEAT_CTL, IA32_TSC_ADJUST
    (0x48, 1),            // IA32_SPEC_CTRL
    (0x140, 1),           // MISC_FEATURES_ENABLES
    (0x174, 3),           // SYSENTER_CS/ESP/EIP
    (0x17a, 1),           // IA32_MCG_STATUS
    (0x1a0, 1),           // IA32_MISC_ENABLE
    (0x1d9, 1),           // IA32_DEBUGCTL
    (0x200, 0x100),       // MTRRs, PAT, MTRR_DEF_TYPE
    (0x400, 0x80),        // MCi banks
    (0x6e0, 1),           // IA32_TSC_DEADLINE
    (0x800, 0x100),       // x2APIC
    (0xda0, 1),           // IA32_XSS
    (0xc000_0080, 5),     // EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xc000_0100, 4),     // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
    (0x4b56_4d00, 0x100), // KVM's paravirtual MSRs (kvmclock, async PF, steal time, ...)
    (0x11, 2),            // KVM's old kvmclock MSRs (WALL_CLOCK, SYSTEM_TIME)
];

/// Whether a snapshot saves MSR `index`.
pub fn should_save(index: u32) -> bool {
    SAVED_MSR_RANGES
        .iter()
        .any(|&(base, n)| index >= base && index - base < n)
}

/// KVM_GET_MSRS/KVM_SET_MSRS take at most this many entries per call.
const MSR_CHUNK: usize = 255;

/// Reads `indices`; an MSR this host's KVM cannot read is left out (and
/// logged at debug), so the result is what the host has.
pub fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, MsrError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let n = rest.len().min(MSR_CHUNK);
        let entries: Vec<kvm_msr_entry> = rest[..n]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
        let got = vcpu.get_msrs(&mut msrs).map_err(MsrError::Get)?;
        out.extend(msrs.as_slice()[..got].iter().map(|e| (e.index, e.data)));
        if got < n {
            log::debug!(
                "snapshot: MSR {:#x} is not readable on this host",
                rest[got]
            );
            rest = &rest[got + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Writes `msrs` in order, `IA32_TSC_DEADLINE` last; refuses (naming the
/// MSR) if KVM does not take one.
pub fn set_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), MsrError> {
    let (late, early): (Vec<_>, Vec<_>) =
        msrs.iter().partition(|(i, _)| *i == MSR_IA32_TSC_DEADLINE);
    for part in [early, late] {
        for chunk in part.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let m = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
            let set = vcpu.set_msrs(&m).map_err(MsrError::Set)?;
            if set < entries.len() {
                return Err(MsrError::Refused(entries[set].index));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_msrs_cover_the_architectural_state() {
        for i in [
            0x10,
            0x1b,
            0x277,
            0x6e0,
            0x808,
            0xc000_0080,
            0xc000_0102,
            0x4b56_4d01,
        ] {
            assert!(should_save(i), "{i:#x}");
        }
        for i in [0x0, 0x17, 0x38f, 0xc001_0000] {
            assert!(!should_save(i), "{i:#x}");
        }
    }

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let e = boot_msr_entries();
        let mtrr = e.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        assert!(Msrs::from_entries(&e).is_ok());
    }
}
