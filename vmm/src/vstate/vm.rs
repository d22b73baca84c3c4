//! The KVM VM: guest memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::arch_memory_regions;
use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (want 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(kvm_ioctls::Cap),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot allocate {size_mib} MiB of guest memory: {msg}")]
    GuestMemory { size_mib: u64, msg: String },
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetMemoryRegion(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {gsi} failed: {err}")]
    Irqfd { gsi: u32, err: kvm_ioctls::Error },
}

/// Allocates anonymous guest RAM of `size_mib` MiB laid out for x86_64.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let size = size_mib << 20;
    GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).map_err(|e| VmError::GuestMemory {
        size_mib,
        msg: e.to_string(),
    })
}

/// A KVM VM with memory, irqchip and PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm, checks capabilities and creates the VM. Memory is
    /// registered next ([`Vm::register_memory`]), then [`Vm::setup_irqchip`]:
    /// memory slots added after the in-kernel LAPIC exists are much more
    /// expensive on some hosts (nested KVM), so the order matters.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::KvmApiVersion(v));
        }
        use kvm_ioctls::Cap;
        for cap in [
            Cap::Irqchip,
            Cap::Ioeventfd,
            Cap::Irqfd,
            Cap::UserMemory,
            Cap::SetTssAddr,
            Cap::Pit2,
            Cap::PitState2,
            Cap::ImmediateExit,
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        Ok(Vm { kvm, fd })
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::Pit)
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::GuestMemory {
                    size_mib: region.len() >> 20,
                    msg: e.to_string(),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // caller keeps alive for as long as the VM runs.
            unsafe { self.fd.set_user_memory_region(r) }.map_err(VmError::SetMemoryRegion)?;
        }
        Ok(())
    }

    /// Wires `evt` to raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|err| VmError::Irqfd { gsi, err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_has_requested_size() {
        let m = create_guest_memory(16).unwrap();
        assert_eq!(m.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }
}
