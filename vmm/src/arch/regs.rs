//! Initial vCPU register state for each boot protocol.

use devices::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{kvm_segment_from_gdt, long_mode_gdt, pvh_gdt};
use super::layout::*;

/// Errors while setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("failed to write boot GDT/IDT/page tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
}

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol (ELF vmlinux or bzImage), long mode, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootProtocol::Linux64 => "linux64",
            BootProtocol::Pvh => "pvh",
        })
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// General-purpose registers at entry.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, proto: BootProtocol) -> Result<(), RegsError> {
    let regs = match proto {
        BootProtocol::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        BootProtocol::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// x87/SSE control state as after FNINIT + the default MXCSR.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Writes the boot GDT and IDT and returns the matching segment registers
/// in `sregs`.
fn write_gdt_and_segments(
    mem: &GuestMemoryMmap,
    gdt: &[u64; 4],
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// Segment and control registers for `proto`; writes GDT/IDT (and page
/// tables for long mode) into guest memory.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    proto: BootProtocol,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    match proto {
        BootProtocol::Linux64 => {
            write_gdt_and_segments(mem, &long_mode_gdt(), &mut sregs)?;
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            write_gdt_and_segments(mem, &pvh_gdt(), &mut sregs)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        let last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn gdt_written_at_its_address() {
        let m = mem();
        let mut sregs = kvm_sregs::default();
        write_gdt_and_segments(&m, &long_mode_gdt(), &mut sregs).unwrap();
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, long_mode_gdt()[1]);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
    }
}
