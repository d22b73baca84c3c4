//! Guest physical memory layout. See docs/boot-layout.md: that file and these
//! constants are the contract with guests.

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (one null entry).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH memory map table (shares the zero page's spot: only one protocol is used).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Initial stack pointer for the Linux 64-bit protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (first 1 GiB, 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP floating pointer is written.
pub const MPTABLE_START: u64 = EBDA_START;
/// ACPI tables: the RSDP here (16-byte aligned, where a legacy BIOS-area scan
/// finds it), then DSDT, FADT, MADT and XSDT, all below `HIMEM_START` in the
/// e820-reserved 0x9fc00..1 MiB hole.
pub const ACPI_START: u64 = 0xe_0000;
/// Kernels load at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-mmio device; RAM stops below it (the 32-bit MMIO gap).
pub const MMIO_MEM_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO gap (up to 4 GiB).
pub const MMIO_MEM_SIZE: u64 = (1 << 32) - MMIO_MEM_START;
/// Each virtio-mmio device's window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// First IRQ given to virtio-mmio devices.
pub const IRQ_BASE: u32 = 5;
/// Last usable IRQ line of the in-kernel IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// Local APIC default address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC default address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// KVM's TSS (three pages) sits just below the MMIO gap's top, like other VMMs do.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, right after the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// COM1 IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command port is 0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// i8042 keyboard IRQ.
pub const I8042_KBD_IRQ: u32 = 1;
/// Largest supported vCPU count (MP table and APIC ID space stay simple).
pub const MAX_VCPUS: u8 = 32;
