//! Kernel, initrd and command line loading (linux-loader).

use std::fs::File;

use devices::GuestMemoryMmap;
use linux_loader::bootparam::setup_header;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, GuestAddress};

use crate::arch::boot::{initrd_load_addr, InitrdInfo};
use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::regs::BootProtocol;

/// Errors loading guest images.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {what} {path}: {err}")]
    Open {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    #[error("{path} is neither an ELF kernel nor a bzImage: {err}")]
    UnknownFormat { path: String, err: loader::Error },
    #[error("cannot load kernel {path}: {err}")]
    Kernel { path: String, err: loader::Error },
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooBig { size: u64 },
    #[error("cannot read the initrd into guest memory: {0}")]
    InitrdRead(vm_memory::GuestMemoryError),
    #[error("bad kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    CmdlineWrite(loader::Error),
}

/// Where and how to enter the loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    pub entry: u64,
    pub protocol: BootProtocol,
    /// Set for bzImages: the image's own setup header.
    pub setup_header: Option<setup_header>,
    /// Whether the image was a bzImage (for logs and tests).
    pub bzimage: bool,
}

/// Offset of startup_64 from the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Loads an ELF vmlinux (PVH if it has the note) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &str) -> Result<KernelEntry, LoaderError> {
    let mut f = File::open(path).map_err(|err| LoaderError::Open {
        what: "kernel",
        path: path.into(),
        err,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => {
            let (entry, protocol) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (a.raw_value(), BootProtocol::Pvh),
                _ => (r.kernel_load.raw_value(), BootProtocol::Linux64),
            };
            Ok(KernelEntry {
                entry,
                protocol,
                setup_header: None,
                bzimage: false,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut f, himem).map_err(|err| {
                LoaderError::UnknownFormat {
                    path: path.into(),
                    err,
                }
            })?;
            Ok(KernelEntry {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                protocol: BootProtocol::Linux64,
                setup_header: r.setup_header,
                bzimage: true,
            })
        }
        Err(err) => Err(LoaderError::Kernel {
            path: path.into(),
            err,
        }),
    }
}

/// Loads the initrd as high as it fits in low memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &str,
) -> Result<InitrdInfo, LoaderError> {
    let mut f = File::open(path).map_err(|err| LoaderError::Open {
        what: "initrd",
        path: path.into(),
        err,
    })?;
    let size = f
        .metadata()
        .map_err(|err| LoaderError::Open {
            what: "initrd",
            path: path.into(),
            err,
        })?
        .len();
    let addr = initrd_load_addr(mem_size, size).ok_or(LoaderError::InitrdTooBig { size })?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(LoaderError::InitrdRead)?;
    Ok(InitrdInfo { addr, size })
}

/// Splits a command line at its first lone `--` word: (kernel part, init part).
fn split_init_args(cmdline: &str) -> (&str, Option<&str>) {
    let t = cmdline.trim();
    if t == "--" {
        return ("", Some(""));
    }
    if let Some(rest) = t.strip_prefix("-- ") {
        return ("", Some(rest.trim()));
    }
    if let Some(stripped) = t.strip_suffix(" --") {
        return (stripped.trim(), Some(""));
    }
    match t.find(" -- ") {
        Some(i) => (t[..i].trim(), Some(t[i + 4..].trim())),
        None => (t, None),
    }
}

/// Builds the command line and writes it at CMDLINE_START; returns its length.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    base: &str,
    extra: &[String],
) -> Result<usize, LoaderError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    // Words after a lone "--" belong to init: device parameters go before it.
    let (kernel_part, init_part) = split_init_args(base);
    if !kernel_part.is_empty() {
        c.insert_str(kernel_part).map_err(LoaderError::Cmdline)?;
    }
    for e in extra {
        c.insert_str(e).map_err(LoaderError::Cmdline)?;
    }
    if let Some(init) = init_part {
        c.insert_str("--").map_err(LoaderError::Cmdline)?;
        if !init.is_empty() {
            c.insert_str(init).map_err(LoaderError::Cmdline)?;
        }
    }
    let cstr = c.as_cstring().map_err(LoaderError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &c)
        .map_err(LoaderError::CmdlineWrite)?;
    Ok(cstr.as_bytes().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = create_guest_memory(4, crate::config::HugePages::None).unwrap();
        let n = load_cmdline(&m, "console=ttyS0 ", &["a=b".into()]).unwrap();
        let mut buf = vec![0u8; n + 1];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf[..n], b"console=ttyS0 a=b");
        assert_eq!(buf[n], 0);
    }

    #[test]
    fn device_words_go_before_init_args() {
        let m = create_guest_memory(4, crate::config::HugePages::None).unwrap();
        let extra = ["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let n = load_cmdline(&m, "console=ttyS0 A=b -- one two", &extra).unwrap();
        let mut buf = vec![0u8; n];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "console=ttyS0 A=b virtio_mmio.device=4K@0xd0000000:5 -- one two"
        );
        assert_eq!(split_init_args("-- x"), ("", Some("x")));
        assert_eq!(split_init_args("a --"), ("a", Some("")));
        assert_eq!(split_init_args("a --b"), ("a --b", None));
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let m = create_guest_memory(4, crate::config::HugePages::None).unwrap();
        let dir = std::env::temp_dir().join(format!("ember-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("garbage");
        std::fs::write(&p, vec![0x41u8; 4096]).unwrap();
        let e = load_kernel(&m, p.to_str().unwrap()).unwrap_err();
        assert!(matches!(e, LoaderError::UnknownFormat { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            load_kernel(&m, "/nonexistent"),
            Err(LoaderError::Open { .. })
        ));
    }

    #[test]
    fn initrd_lands_high() {
        let m = create_guest_memory(8, crate::config::HugePages::None).unwrap();
        let dir = std::env::temp_dir().join(format!("ember-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, b"hello initrd").unwrap();
        let i = load_initrd(&m, 8 << 20, p.to_str().unwrap()).unwrap();
        let mut buf = [0u8; 12];
        m.read_slice(&mut buf, GuestAddress(i.addr)).unwrap();
        assert_eq!(&buf, b"hello initrd");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
