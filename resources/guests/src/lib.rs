//! ember's freestanding test guest, built from `guest/` by `build.rs` with gcc.
//!
//! Three images of the same program are produced (see docs/boot-layout.md):
//! [`LINUX64_ELF`] (64-bit Linux boot protocol), [`PVH_ELF`] (PVH 32-bit
//! entry) and [`BZIMAGE`] (bzImage with a real setup header). They are also
//! copied to `<target dir>/guests/`.
//!
//! The guest prints lines starting with `ember-guest: ` on COM1 and selects a
//! test mode with `ember.test=<mode>` on the command line (default `hello`).

/// ELF64 image without a PVH note; entered in long mode with RSI = zero page.
pub const LINUX64_ELF: &str = concat!(env!("OUT_DIR"), "/ember-guest-linux64.elf");
/// ELF64 image with a `XEN_ELFNOTE_PHYS32_ENTRY` note (PVH boot).
pub const PVH_ELF: &str = concat!(env!("OUT_DIR"), "/ember-guest-pvh.elf");
/// bzImage: setup sectors + flat protected-mode image (startup_64 at +0x200).
pub const BZIMAGE: &str = concat!(env!("OUT_DIR"), "/ember-guest.bzImage");

/// Prefix of every line the guest prints.
pub const LINE_PREFIX: &str = "ember-guest: ";
/// Line printed when a finishing test mode is done (followed by a reset).
pub const DONE_LINE: &str = "ember-guest: done";

/// Test modes understood by the guest (`ember.test=<mode>`).
pub const MODES: &[&str] = &[
    "hello",
    "cmdline",
    "memmap",
    "cpus",
    "initrd",
    "idle",
    "ticker",
    "wait-ctrlaltdel",
    "triple-fault",
];

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
    use std::fs::File;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const HIMEM: GuestAddress = GuestAddress(0x10_0000);

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn linux64_elf_loads_without_pvh_note() {
        let mut f = File::open(LINUX64_ELF).unwrap();
        let r = Elf::load(&mem(), None, &mut f, Some(HIMEM)).unwrap();
        // No PT_NOTE at all: linux-loader leaves its default (not "present").
        assert!(!matches!(r.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)));
        assert!(r.kernel_load.0 > 0x10_0200, "ELF entry is elf_start64 in .text");
        assert!(r.kernel_end > 0x10_0000 && r.kernel_end < 0x20_0000);
    }

    #[test]
    fn pvh_elf_has_phys32_entry() {
        let mut f = File::open(PVH_ELF).unwrap();
        let r = Elf::load(&mem(), None, &mut f, Some(HIMEM)).unwrap();
        match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => {
                assert!(a.0 > 0x10_0200 && a.0 < r.kernel_end, "entry {a:?}")
            }
            other => panic!("no PVH entry: {other:?}"),
        }
    }

    #[test]
    fn bzimage_loads_with_linux_loader() {
        let gm = mem();
        let mut f = File::open(BZIMAGE).unwrap();
        let r = BzImage::load(&gm, None, &mut f, Some(HIMEM)).unwrap();
        assert_eq!(r.kernel_load, HIMEM);
        let hdr = r.setup_header.unwrap();
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert!({ hdr.version } >= 0x020c);
        assert_eq!({ hdr.loadflags } & 1, 1);
        assert_eq!({ hdr.xloadflags } & 1, 1);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.cmdline_size }, 4095);
        let len = std::fs::metadata(BZIMAGE).unwrap().len();
        let setup = (u64::from(hdr.setup_sects) + 1) * 512;
        assert_eq!(u64::from(hdr.syssize) * 16, len - setup);
        assert!(u64::from(hdr.init_size) >= len - setup);
        assert_eq!(r.kernel_end, 0x10_0000 + len - setup);
    }

    #[test]
    fn bzimage_startup_64_matches_elf_layout() {
        // The protected-mode part is the flat image of the linux64 ELF, so
        // offset 0x200 must hold the startup_64 code (mov $2, %edi; jmp).
        let bz = std::fs::read(BZIMAGE).unwrap();
        let setup = (usize::from(bz[0x1f1]) + 1) * 512;
        assert_eq!(&bz[setup + 0x200..setup + 0x205], &[0xbf, 2, 0, 0, 0]);
    }
}
