//! `kvm-floor`: the smallest VMM able to boot the ember test guest.
//!
//! Boots an ELF (64-bit Linux protocol, or PVH with `pvh`) or a bzImage
//! (detected by the missing ELF magic; entered at startup_64).
//!
//! One memory region, one vCPU, no in-kernel irqchip, no devices: port I/O is
//! handled inline (COM1 data -> output, COM1 LSR reads 0x60, i8042 0xfe on
//! port 0x64 ends the run). The guest-physical layout follows
//! docs/boot-layout.md so that the same guest runs here and under ember-vmm.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Layout constants from docs/boot-layout.md.
pub mod layout {
    pub const GDT: u64 = 0x500;
    pub const IDT: u64 = 0x520;
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_MODLIST: u64 = 0x6040;
    pub const ZERO_PAGE: u64 = 0x7000;
    pub const PVH_MEMMAP: u64 = 0x7000;
    pub const BOOT_STACK: u64 = 0x8ff0;
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    pub const MPTABLE: u64 = 0x9_fc00;
    pub const EBDA_START: u64 = 0x9_fc00;
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 4096;
    pub const HIMEM_START: u64 = 0x10_0000;
    /// Guest RAM above this is not supported (MMIO hole).
    pub const MMIO_GAP_START: u64 = 0xd000_0000;
    pub const RAM_LIMIT: u64 = 0xd000_0000;
}

const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = COM1 + 5;
const LSR_THRE_TEMT: u8 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Setup header location inside a bzImage and the zero page.
const SETUP_HEADER_START: usize = 0x1f1;
const SETUP_HEADER_END: usize = 0x290;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Errors of the floor VMM.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("cannot open {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
    #[error("KVM: {0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("cannot load kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error("the kernel has no PVH entry note")]
    NoPvhEntry,
    #[error("command line too long ({0} bytes, max {max})", max = layout::CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("memory size {0} MiB is not supported (2..=3328 MiB)")]
    MemSize(u64),
    #[error("cpu count {0} is not supported (1..=254)")]
    Cpus(u8),
    #[error("initrd does not fit in guest memory ({0} bytes)")]
    InitrdTooLarge(u64),
    #[error("writing guest output: {0}")]
    Output(#[source] io::Error),
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub mem_mib: u64,
    /// Use the PVH 32-bit entry instead of the 64-bit Linux protocol.
    pub pvh: bool,
    /// Write an MP table announcing this many CPUs (only one vCPU runs).
    pub mptable_cpus: Option<u8>,
    pub initrd: Option<PathBuf>,
}

impl FloorConfig {
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        FloorConfig {
            kernel: kernel.into(),
            cmdline: cmdline.into(),
            mem_mib: 64,
            pvh: false,
            mptable_cpus: None,
            initrd: None,
        }
    }
}

/// How the guest run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FloorExit {
    /// The guest wrote 0xfe to port 0x64.
    Reset,
    /// KVM_EXIT_SHUTDOWN (e.g. a triple fault).
    Shutdown,
    /// HLT with no interrupt source to wake the vCPU.
    Halted,
    /// KVM_EXIT_INTERNAL_ERROR (e.g. an instruction the host cannot emulate):
    /// suberror and the first data words.
    InternalError { suberror: u32, data: Vec<u64> },
    /// KVM_EXIT_FAIL_ENTRY with its hardware reason.
    FailEntry(u64),
    /// Any other exit, described.
    Unexpected(String),
}

impl FloorExit {
    /// Process exit status for this outcome: 0 only for a guest reset.
    pub fn exit_code(&self) -> i32 {
        match self {
            FloorExit::Reset => 0,
            _ => 1,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> FloorError {
    move |e| FloorError::Kvm(what, e)
}

fn mem_err<E: std::fmt::Display>(e: E) -> FloorError {
    FloorError::Memory(e.to_string())
}

/// Boots `cfg.kernel` and runs it until it resets, faults or stops; guest
/// serial output is written to `out`.
pub fn run(cfg: &FloorConfig, out: &mut dyn Write) -> Result<FloorExit, FloorError> {
    if !(2..=layout::RAM_LIMIT >> 20).contains(&cfg.mem_mib) {
        return Err(FloorError::MemSize(cfg.mem_mib));
    }
    if cfg.cmdline.len() >= layout::CMDLINE_MAX {
        return Err(FloorError::CmdlineTooLong(cfg.cmdline.len()));
    }
    let mem_size = cfg.mem_mib << 20;

    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(mem_err)?;
    register_memory(&vm, &mem, mem_size)?;

    let mut kernel =
        File::open(&cfg.kernel).map_err(|e| FloorError::Open(cfg.kernel.clone(), e))?;
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (loaded, setup_header) = if is_elf {
        (Elf::load(&mem, None, &mut kernel, himem)?, None)
    } else {
        let loaded = BzImage::load(&mem, None, &mut kernel, himem)?;
        // The zero page starts from the image's setup header (0x1f1..0x290).
        let mut hdr = vec![0u8; SETUP_HEADER_END - SETUP_HEADER_START];
        kernel
            .seek(SeekFrom::Start(SETUP_HEADER_START as u64))
            .and_then(|_| kernel.read_exact(&mut hdr))
            .map_err(|e| FloorError::Open(cfg.kernel.clone(), e))?;
        (loaded, Some(hdr))
    };
    if cfg.pvh && !is_elf {
        return Err(FloorError::NoPvhEntry);
    }
    let entry = if !is_elf {
        // startup_64 of the protected-mode image.
        GuestAddress(loaded.kernel_load.0 + 0x200)
    } else if cfg.pvh {
        match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => a,
            _ => return Err(FloorError::NoPvhEntry),
        }
    } else {
        loaded.kernel_load
    };

    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE))
        .map_err(mem_err)?;

    let initrd = match &cfg.initrd {
        Some(path) => Some(load_initrd(&mem, path, mem_size)?),
        None => None,
    };
    let e820 = [
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::HIMEM_START,
            mem_size - layout::HIMEM_START,
            E820_RAM,
        ),
    ];
    if cfg.pvh {
        write_start_info(&mem, &e820, cfg.cmdline.len(), initrd)?;
    } else {
        write_zero_page(
            &mem,
            setup_header.as_deref(),
            &e820,
            cfg.cmdline.len(),
            initrd,
        )?;
    }
    if let Some(cpus) = cfg.mptable_cpus {
        write_mptable(&mem, cpus)?;
    }
    write_gdt_and_page_tables(&mem)?;

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    setup_registers(&vcpu, entry.0, cfg.pvh)?;

    run_vcpu(&mut vcpu, out)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap<()>, size: u64) -> Result<(), FloorError> {
    let host = mem.get_host_address(GuestAddress(0)).map_err(mem_err)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps `size` bytes owned by `mem`, which outlives the VM
    // (both live until `run` returns, and the VM fd is dropped first).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("set memory region"))
}

/// Copies the initrd page-aligned as high as it fits; returns (addr, size).
fn load_initrd(
    mem: &GuestMemoryMmap<()>,
    path: &Path,
    mem_size: u64,
) -> Result<(u64, u64), FloorError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| FloorError::Open(path.to_path_buf(), e))?;
    let size = data.len() as u64;
    let top = mem_size.min(layout::RAM_LIMIT);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= layout::HIMEM_START + (16 << 20).min(top / 2))
        .ok_or(FloorError::InitrdTooLarge(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(mem_err)?;
    Ok((addr, size))
}

fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    buf[off] = v;
}
fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Linux `struct boot_params` with the setup header fields a 64-bit kernel
/// reads, the e820 map and the initrd location.
fn zero_page(
    setup_header: Option<&[u8]>,
    e820: &[(u64, u64, u32)],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Vec<u8> {
    let mut zp = vec![0u8; 4096];
    if let Some(hdr) = setup_header {
        let n = hdr.len().min(SETUP_HEADER_END - SETUP_HEADER_START);
        zp[SETUP_HEADER_START..SETUP_HEADER_START + n].copy_from_slice(&hdr[..n]);
    }
    put_u8(&mut zp, 0x1e8, e820.len() as u8); // e820_entries
    put_u16(&mut zp, 0x1fe, 0xaa55); // hdr.boot_flag
    put_u32(&mut zp, 0x202, 0x5372_6448); // hdr.header "HdrS"
    put_u16(&mut zp, 0x206, 0x020c); // hdr.version
    put_u8(&mut zp, 0x210, 0xff); // hdr.type_of_loader: undefined
    put_u8(&mut zp, 0x211, 0x01); // hdr.loadflags: LOADED_HIGH
    put_u32(&mut zp, 0x228, layout::CMDLINE as u32); // hdr.cmd_line_ptr
    put_u32(&mut zp, 0x230, 0x0100_0000); // hdr.kernel_alignment
    put_u32(&mut zp, 0x238, cmdline_len as u32); // hdr.cmdline_size
    if let Some((addr, size)) = initrd {
        put_u32(&mut zp, 0x218, addr as u32); // hdr.ramdisk_image
        put_u32(&mut zp, 0x21c, size as u32); // hdr.ramdisk_size
        put_u32(&mut zp, 0x0c0, (addr >> 32) as u32); // ext_ramdisk_image
        put_u32(&mut zp, 0x0c4, (size >> 32) as u32); // ext_ramdisk_size
    }
    for (i, &(addr, size, ty)) in e820.iter().enumerate() {
        let off = 0x2d0 + i * 20;
        put_u64(&mut zp, off, addr);
        put_u64(&mut zp, off + 8, size);
        put_u32(&mut zp, off + 16, ty);
    }
    zp
}

fn write_zero_page(
    mem: &GuestMemoryMmap<()>,
    setup_header: Option<&[u8]>,
    e820: &[(u64, u64, u32)],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), FloorError> {
    let zp = zero_page(setup_header, e820, cmdline_len, initrd);
    mem.write_slice(&zp, GuestAddress(layout::ZERO_PAGE))
        .map_err(mem_err)
}

/// PVH `hvm_start_info` (version 1) with its memmap table and module list.
fn write_start_info(
    mem: &GuestMemoryMmap<()>,
    e820: &[(u64, u64, u32)],
    _cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), FloorError> {
    let mut si = vec![0u8; 56];
    put_u32(&mut si, 0, XEN_HVM_START_MAGIC);
    put_u32(&mut si, 4, 1); // version
    put_u64(&mut si, 24, layout::CMDLINE); // cmdline_paddr
    put_u64(&mut si, 40, layout::PVH_MEMMAP); // memmap_paddr
    put_u32(&mut si, 48, e820.len() as u32); // memmap_entries
    if let Some((addr, size)) = initrd {
        put_u32(&mut si, 12, 1); // nr_modules
        put_u64(&mut si, 16, layout::PVH_MODLIST); // modlist_paddr
        let mut m = vec![0u8; 32];
        put_u64(&mut m, 0, addr);
        put_u64(&mut m, 8, size);
        mem.write_slice(&m, GuestAddress(layout::PVH_MODLIST))
            .map_err(mem_err)?;
    }
    mem.write_slice(&si, GuestAddress(layout::PVH_START_INFO))
        .map_err(mem_err)?;
    let mut mm = vec![0u8; 24 * e820.len()];
    for (i, &(addr, size, ty)) in e820.iter().enumerate() {
        put_u64(&mut mm, i * 24, addr);
        put_u64(&mut mm, i * 24 + 8, size);
        put_u32(&mut mm, i * 24 + 16, ty);
    }
    mem.write_slice(&mm, GuestAddress(layout::PVH_MEMMAP))
        .map_err(mem_err)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// MP floating pointer + config table with `cpus` processor entries.
fn mptable(cpus: u8) -> Vec<u8> {
    const MPF_LEN: usize = 16;
    const HDR_LEN: usize = 44;
    const CPU_LEN: usize = 20;
    let table_len = HDR_LEN + CPU_LEN * usize::from(cpus);
    let mut t = vec![0u8; MPF_LEN + table_len];

    let (mpf, mpc) = t.split_at_mut(MPF_LEN);
    mpf[0..4].copy_from_slice(b"_MP_");
    put_u32(mpf, 4, (layout::MPTABLE + MPF_LEN as u64) as u32); // physptr
    put_u8(mpf, 8, 1); // length in 16-byte units
    put_u8(mpf, 9, 4); // spec rev 1.4
    mpf[10] = checksum(mpf);

    mpc[0..4].copy_from_slice(b"PCMP");
    put_u16(mpc, 4, table_len as u16);
    put_u8(mpc, 6, 4);
    mpc[8..16].copy_from_slice(b"EMBER   ");
    mpc[16..28].copy_from_slice(b"KVM-FLOOR   ");
    put_u16(mpc, 34, u16::from(cpus)); // entry count
    put_u32(mpc, 36, 0xfee0_0000); // local APIC
    for i in 0..usize::from(cpus) {
        let e = &mut mpc[HDR_LEN + i * CPU_LEN..HDR_LEN + (i + 1) * CPU_LEN];
        e[0] = 0; // processor
        e[1] = i as u8; // APIC id
        e[2] = 0x14; // APIC version
        e[3] = if i == 0 { 0x03 } else { 0x01 }; // enabled (| BSP)
        put_u32(e, 4, 0x600); // signature
        put_u32(e, 8, 0x201); // features: FPU, APIC
    }
    mpc[7] = checksum(mpc);
    t
}

fn write_mptable(mem: &GuestMemoryMmap<()>, cpus: u8) -> Result<(), FloorError> {
    if cpus == 0 || cpus > 254 {
        return Err(FloorError::Cpus(cpus));
    }
    mem.write_slice(&mptable(cpus), GuestAddress(layout::MPTABLE))
        .map_err(mem_err)
}

const GDT_ENTRIES: [u64; 4] = [
    0,
    0x00af_9a00_0000_ffff, // 0x08 code64
    0x00cf_9200_0000_ffff, // 0x10 data
    0x008f_8900_0000_ffff, // 0x18 TSS
];

fn write_gdt_and_page_tables(mem: &GuestMemoryMmap<()>) -> Result<(), FloorError> {
    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT + 8 * i as u64))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT))
        .map_err(mem_err)?;
    mem.write_obj(layout::PDPT | 0x3, GuestAddress(layout::PML4))
        .map_err(mem_err)?;
    mem.write_obj(layout::PD | 0x3, GuestAddress(layout::PDPT))
        .map_err(mem_err)?;
    let mut pd = vec![0u8; 4096];
    for i in 0..512u64 {
        put_u64(&mut pd, (i * 8) as usize, (i << 21) | 0x83);
    }
    mem.write_slice(&pd, GuestAddress(layout::PD))
        .map_err(mem_err)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn setup_registers(vcpu: &VcpuFd, entry: u64, pvh: bool) -> Result<(), FloorError> {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
    let data = segment(0x10, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        limit: 0xfffff,
        ..data
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 0;

    let mut regs = vcpu.get_regs().map_err(kvm_err("get regs"))?;
    regs.rflags = 0x2;
    regs.rip = entry;
    if pvh {
        sregs.cs = segment(0x08, 0xb, false);
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        regs.rbx = layout::PVH_START_INFO;
    } else {
        sregs.cs = segment(0x08, 0xb, true);
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.cr3 = layout::PML4;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        regs.rsi = layout::ZERO_PAGE;
        regs.rsp = layout::BOOT_STACK;
        regs.rbp = layout::BOOT_STACK;
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("set regs"))
}

fn run_vcpu(vcpu: &mut VcpuFd, out: &mut dyn Write) -> Result<FloorExit, FloorError> {
    let exit = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                COM1 => out.write_all(data).map_err(FloorError::Output)?,
                I8042_COMMAND if data.first() == Some(&I8042_RESET) => break FloorExit::Reset,
                _ => {}
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0xff);
                if port == COM1_LSR {
                    if let Some(b) = data.first_mut() {
                        *b = LSR_THRE_TEMT;
                    }
                }
            }
            Ok(VcpuExit::Hlt) => break FloorExit::Halted,
            Ok(VcpuExit::Shutdown) => break FloorExit::Shutdown,
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member
                // of the kvm_run union is the valid one.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                break FloorExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                };
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => break FloorExit::FailEntry(reason),
            Ok(other) => break FloorExit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(FloorError::Kvm("KVM_RUN", e)),
        }
    };
    out.flush().map_err(FloorError::Output)?;
    Ok(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_fields() {
        let e820 = [(0, 0x9fc00, 1), (0x100000, 0x3f00000, 1)];
        let zp = zero_page(None, &e820, 17, Some((0x3ff0000, 0x1234)));
        assert_eq!(zp[0x1e8], 2);
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(
            u32::from_le_bytes(zp[0x228..0x22c].try_into().unwrap()),
            0x20000
        );
        assert_eq!(
            u32::from_le_bytes(zp[0x218..0x21c].try_into().unwrap()),
            0x3ff0000
        );
        assert_eq!(
            u32::from_le_bytes(zp[0x21c..0x220].try_into().unwrap()),
            0x1234
        );
        let second = 0x2d0 + 20;
        assert_eq!(
            u64::from_le_bytes(zp[second..second + 8].try_into().unwrap()),
            0x100000
        );
        assert_eq!(
            u32::from_le_bytes(zp[second + 16..second + 20].try_into().unwrap()),
            1
        );
    }

    #[test]
    fn mptable_checksums() {
        let t = mptable(3);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        assert_eq!(usize::from(u16::from_le_bytes([mpc[4], mpc[5]])), mpc.len());
        assert_eq!(mpc.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([mpc[34], mpc[35]]), 3);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(FloorExit::Reset.exit_code(), 0);
        assert_eq!(FloorExit::Shutdown.exit_code(), 1);
        assert_eq!(FloorExit::Halted.exit_code(), 1);
    }
}
