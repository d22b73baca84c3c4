//! Boot information handed to the guest: memory map, zero page (Linux boot
//! protocol) and `hvm_start_info` (PVH).

use devices::GuestMemoryMmap;
use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::layout::*;

/// Errors writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("too many memory map entries ({0})")]
    TooManyE820Entries(usize),
    #[error("failed to write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error("failed to write the PVH start info: {0}")]
    StartInfo(linux_loader::configurator::Error),
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;

/// Guest RAM regions for `size` bytes of memory: below the 32-bit MMIO gap
/// and, for the rest, above 4 GiB.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_MEM_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_MEM_START as usize),
            (
                GuestAddress(MMIO_MEM_START + MMIO_MEM_SIZE),
                (size - MMIO_MEM_START) as usize,
            ),
        ]
    }
}

/// One memory map entry: (address, size, type).
pub type MapEntry = (u64, u64, u32);

/// The guest memory map for `size` bytes of RAM.
pub fn memory_map(size: u64) -> Vec<MapEntry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    let low_end = size.min(MMIO_MEM_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if size > MMIO_MEM_START {
        map.push((MMIO_MEM_START, MMIO_MEM_SIZE, E820_RESERVED));
        map.push((1 << 32, size - MMIO_MEM_START, E820_RAM));
    }
    map
}

/// Where the initrd goes: page aligned, as high as it fits in low memory.
pub fn initrd_load_addr(mem_size: u64, initrd_size: u64) -> Option<u64> {
    let low_end = mem_size.min(MMIO_MEM_START);
    let addr = low_end.checked_sub(initrd_size)? & !0xfff;
    (addr >= HIMEM_START).then_some(addr)
}

/// Initrd location handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

/// Writes the Linux zero page. `header` is the bzImage setup header, if any.
pub fn configure_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<InitrdInfo>,
    header: Option<setup_header>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(r) = rsdp {
        params.acpi_rsdp_addr = r;
    }
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if header.is_some() {
        params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
        params.hdr.heap_end_ptr = 0xfe00;
    }
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    let map = memory_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(map.len()));
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

/// Writes `hvm_start_info`, the memory map and the module list for PVH.
pub fn configure_pvh(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<InitrdInfo>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: i.addr,
                size: i.size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    #[test]
    fn regions_split_around_the_mmio_gap() {
        assert_eq!(arch_memory_regions(64 << 20).len(), 1);
        let r = arch_memory_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_MEM_START as usize));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[1].1 as u64, (4u64 << 30) - MMIO_MEM_START);
    }

    #[test]
    fn memory_map_covers_ram() {
        let m = memory_map(128 << 20);
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, EBDA_START + (128 << 20) - HIMEM_START);
    }

    #[test]
    fn acpi_tables_sit_in_a_reserved_range() {
        let m = memory_map(128 << 20);
        let t = super::super::acpi::build(2, &[]).unwrap();
        for (addr, b, _) in &t.tables {
            let end = addr + b.len() as u64;
            assert!(
                m.iter()
                    .any(|e| e.2 == E820_RESERVED && e.0 <= *addr && end <= e.0 + e.1),
                "table at {addr:#x} not in a reserved e820 range"
            );
        }
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let a = initrd_load_addr(64 << 20, 5000).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 5000 <= 64 << 20);
        assert!(initrd_load_addr(2 << 20, 4 << 20).is_none());
    }

    #[test]
    fn zero_page_holds_cmdline_and_e820() {
        let m = mem(64 << 20);
        let initrd = InitrdInfo {
            addr: 0x300_0000,
            size: 0x1234,
        };
        configure_linux(&m, 64 << 20, 10, Some(initrd), None, Some(ACPI_START)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
    }

    #[test]
    fn pvh_start_info_and_modules() {
        let m = mem(64 << 20);
        let initrd = InitrdInfo {
            addr: 0x200_0000,
            size: 77,
        };
        configure_pvh(&m, 64 << 20, Some(initrd), Some(ACPI_START)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x200_0000, 77));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 48)).unwrap();
        assert_eq!(e.addr, HIMEM_START);
    }
}
