//! The KVM VM: guest memory slots, in-kernel irqchip and PIT.

use devices::{GuestMemoryMmap, GuestRegionMmap};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::arch_memory_regions;
use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::config::HugePages;
use crate::snapshot::{from_blob, to_blob, Blob, SnapshotError};

/// The KVM VM's state in a snapshot: the in-kernel PIC pair and IOAPIC,
/// the PIT and the KVM clock (raw KVM structures).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// `kvm_irqchip` of the master PIC.
    pub pic_master: Blob,
    /// `kvm_irqchip` of the slave PIC.
    pub pic_slave: Blob,
    /// `kvm_irqchip` of the IOAPIC.
    pub ioapic: Blob,
    /// `kvm_pit_state2`.
    pub pit: Blob,
    /// `kvm_clock_data`.
    pub clock: Blob,
}

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
    #[error("cannot allocate {size_mib} MiB of guest memory from 2 MiB huge pages ({msg}): the host has too few free ones; reserve them with /proc/sys/vm/nr_hugepages (see HugePages_Free in /proc/meminfo)")]
    HugePages { size_mib: u64, msg: String },
    #[error("KVM lacks capability {0}, which the CPU template requires")]
    TemplateCap(u32),
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

/// Allocates anonymous guest RAM of `size_mib` MiB laid out for x86_64,
/// backed as `huge` asks: 4 KiB pages, transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`), or hugetlbfs 2 MiB pages (`MAP_HUGETLB |
/// MAP_HUGE_2MB`, reserved at mmap time so a short host fails here, not with
/// a SIGBUS later).
pub fn create_guest_memory(size_mib: u64, huge: HugePages) -> Result<GuestMemoryMmap, VmError> {
    let size = size_mib << 20;
    let ranges = arch_memory_regions(size);
    if huge == HugePages::None {
        return GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::GuestMemory {
            size_mib,
            msg: e.to_string(),
        });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for (addr, len) in ranges {
        let mut flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
        if huge == HugePages::Hugetlbfs2M {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        } else {
            flags |= libc::MAP_NORESERVE;
        }
        let map = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| match huge {
                HugePages::Hugetlbfs2M => VmError::HugePages {
                    size_mib,
                    msg: e.to_string(),
                },
                _ => VmError::GuestMemory {
                    size_mib,
                    msg: e.to_string(),
                },
            })?;
        if huge == HugePages::Transparent {
            // SAFETY: the range is exactly the mapping just made, owned by
            // `map`; madvise only changes how the kernel backs it.
            let rc = unsafe { libc::madvise(map.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
            if rc != 0 {
                return Err(VmError::GuestMemory {
                    size_mib,
                    msg: format!(
                        "madvise(MADV_HUGEPAGE): {} (transparent huge pages off on this host?)",
                        std::io::Error::last_os_error()
                    ),
                });
            }
        }
        regions.push(GuestRegionMmap::new(map, addr).ok_or(VmError::GuestMemory {
            size_mib,
            msg: "region address overflows".into(),
        })?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::GuestMemory {
        size_mib,
        msg: e.to_string(),
    })
}

/// A KVM VM with memory, irqchip and PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// MSRs a snapshot saves (KVM's list, filtered).
    msrs_to_save: Vec<u32>,
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
        // KVM's list, filtered, plus the MSRs ember sets at boot (KVM does
        // not list some, MTRR_DEF_TYPE for one), as Firecracker does.
        let mut msrs_to_save: Vec<u32> = match kvm.get_msr_index_list() {
            Ok(l) => l
                .as_slice()
                .iter()
                .copied()
                .filter(|&i| crate::arch::msr::should_save(i))
                .collect(),
            Err(e) => {
                log::warn!(
                    "KVM_GET_MSR_INDEX_LIST failed ({e}): snapshots save only the boot MSRs"
                );
                Vec::new()
            }
        };
        for e in crate::arch::msr::boot_msr_entries() {
            if !msrs_to_save.contains(&e.index) {
                msrs_to_save.push(e.index);
            }
        }
        Ok(Vm {
            kvm,
            fd,
            msrs_to_save,
        })
    }

    /// The MSRs a vCPU's snapshot state holds.
    pub fn msrs_to_save(&self) -> &[u32] {
        &self.msrs_to_save
    }

    fn get_chip(&self, id: u32) -> Result<kvm_irqchip, SnapshotError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut c)
            .map_err(|err| SnapshotError::Kvm {
                what: "KVM_GET_IRQCHIP",
                err,
            })?;
        Ok(c)
    }

    /// Saves the irqchip, PIT and clock (the vCPUs are paused).
    pub fn save_state(&self) -> Result<VmState, SnapshotError> {
        let kvm = |what| move |err| SnapshotError::Kvm { what, err };
        let pit = self.fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        Ok(VmState {
            pic_master: to_blob(&self.get_chip(KVM_IRQCHIP_PIC_MASTER)?),
            pic_slave: to_blob(&self.get_chip(KVM_IRQCHIP_PIC_SLAVE)?),
            ioapic: to_blob(&self.get_chip(KVM_IRQCHIP_IOAPIC)?),
            pit: to_blob(&pit),
            clock: to_blob(&clock),
        })
    }

    /// Restores what [`Vm::save_state`] saved, after the vCPUs' state (the
    /// IOAPIC and PICs go after the LAPICs). With `clock_realtime` the clock
    /// is advanced by the time since the save when the state and host
    /// support it (`KVM_CLOCK_REALTIME`); otherwise it continues from the
    /// saved value.
    pub fn restore_state(&self, s: &VmState, clock_realtime: bool) -> Result<(), SnapshotError> {
        let kvm = |what| move |err| SnapshotError::Kvm { what, err };
        let pit: kvm_bindings::kvm_pit_state2 = from_blob(&s.pit, "vm.pit")?;
        self.fd.set_pit2(&pit).map_err(kvm("KVM_SET_PIT2"))?;
        let mut clock: kvm_clock_data = from_blob(&s.clock, "vm.clock")?;
        let realtime = clock_realtime && clock.flags & KVM_CLOCK_REALTIME != 0;
        if clock_realtime && !realtime {
            log::info!("snapshot: clock_realtime ignored: the saved clock has no realtime stamp (host without KVM_CLOCK_REALTIME)");
        }
        clock.flags = if realtime { KVM_CLOCK_REALTIME } else { 0 };
        self.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for (blob, id, what) in [
            (&s.pic_master, KVM_IRQCHIP_PIC_MASTER, "vm.pic_master"),
            (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "vm.pic_slave"),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC, "vm.ioapic"),
        ] {
            let c: kvm_irqchip = from_blob(blob, what)?;
            if c.chip_id != id {
                return Err(SnapshotError::Invalid(format!(
                    "{what}: chip id {} (want {id})",
                    c.chip_id
                )));
            }
            self.fd.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
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

    /// Requires each capability of a CPU template (`KVM_CHECK_EXTENSION`).
    pub fn require_caps(&self, caps: &[u32]) -> Result<(), VmError> {
        for &c in caps {
            if self.kvm.check_extension_raw(u64::from(c)) <= 0 {
                return Err(VmError::TemplateCap(c));
            }
        }
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot, with KVM's
    /// dirty page log on when `track_dirty` (`track_dirty_pages`).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::GuestMemory {
                    size_mib: region.len() >> 20,
                    msg: e.to_string(),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if track_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
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
        let m = create_guest_memory(16, HugePages::None).unwrap();
        assert_eq!(m.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
        let t = create_guest_memory(16, HugePages::Transparent).unwrap();
        assert_eq!(t.iter().map(|r| r.len()).sum::<u64>(), 16 << 20);
    }

    /// Writes the VMM makes to guest memory set the regions' dirty bitmaps
    /// (what diff snapshots add to KVM's dirty log), whatever the backing.
    #[test]
    fn vmm_writes_mark_pages_dirty() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{Bytes, GuestAddress};
        for huge in [HugePages::None, HugePages::Transparent] {
            let m = create_guest_memory(16, huge).unwrap();
            m.write_obj(7u32, GuestAddress(0x5000)).unwrap();
            let r = m.iter().next().unwrap();
            assert!(r.bitmap().dirty_at(0x5000), "{huge:?}");
            assert!(!r.bitmap().dirty_at(0x6000), "{huge:?}");
        }
    }

    /// 2 MiB pages come from the host's reserved pool: with none reserved
    /// (the usual case) the error names the knob; with enough, it works.
    #[test]
    fn hugetlbfs_memory_or_a_clear_error() {
        let free: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        match create_guest_memory(4, HugePages::Hugetlbfs2M) {
            Ok(_) => assert!(free >= 2, "got huge pages with {free} free"),
            Err(e) => {
                assert!(free < 2, "{e}");
                let msg = e.to_string();
                assert!(msg.contains("/proc/sys/vm/nr_hugepages"), "{msg}");
            }
        }
    }
}
