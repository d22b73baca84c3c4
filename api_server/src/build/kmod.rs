//! The kernel modules a guest needs to see ember's devices.
//!
//! Distribution kernels (Debian's cloud kernel among them) build virtio,
//! virtio-mmio, virtio-blk, virtio-net and vsock as modules: such a kernel
//! sees no ember device unless its initramfs loads them. [`closure`] reads
//! the kernel's version from its image, looks in
//! `<modules root>/lib/modules/<version>` and returns the module files for
//! [`WANTED`] and everything they depend on, dependencies first, leaving out
//! whatever `modules.builtin` says is built in.
//!
//! A kernel without a module directory is used only when its build
//! configuration shows every needed driver built in (`=y`): the config is
//! read from beside the kernel (`<kernel>.config`, `config-<version>` in the
//! kernel's folder, as Debian's `/boot` has it), from
//! `<modules root>/boot/config-<version>`, or from the image itself when it
//! was built with `CONFIG_IKCONFIG` (an uncompressed vmlinux). A modular
//! kernel without its modules, or a kernel whose configuration cannot be
//! found, is refused with a message naming what is missing, so that an image
//! build fails at once instead of a guest that never sees its devices.
//!
//! Dependencies come from `modules.dep` when `depmod` has written it, and
//! otherwise (a package unpacked without running `depmod`) from the
//! `depends=` field of each module's `.modinfo` section. Soft dependencies
//! are not followed.
//!
//! The kernel and its modules are the host's own files, not user bytes, so
//! they are read here directly. Compressed modules (`.ko.gz`, `.ko.xz`,
//! `.ko.zst`) are decompressed when packed ([`read_module`]), so the guest
//! needs no in-kernel decompression for `finit_module`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules (by name) a guest needs: the virtio-mmio transport, block,
/// network, the vsock transport and ext4.
pub const WANTED: [&str; 5] = [
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "ext4",
];

/// The build option of each [`WANTED`] module: a kernel without modules
/// must have all of them `=y`.
pub const WANTED_OPTIONS: [(&str, &str); 5] = [
    ("virtio_mmio", "CONFIG_VIRTIO_MMIO"),
    ("virtio_blk", "CONFIG_VIRTIO_BLK"),
    ("virtio_net", "CONFIG_VIRTIO_NET"),
    ("vmw_vsock_virtio_transport", "CONFIG_VIRTIO_VSOCKETS"),
    ("ext4", "CONFIG_EXT4_FS"),
];

/// The list file in the image (archive name, no leading `/`): one absolute
/// module path per line, in load order.
pub const LIST_FILE: &str = "etc/ember-modules";

/// Environment variable naming the root under which `lib/modules/<version>`
/// is looked for (default `/`).
pub const MODULES_ROOT_ENV: &str = "EMBER_MODULES_ROOT";

/// The modules root: `$EMBER_MODULES_ROOT`, else `/`.
pub fn modules_root() -> PathBuf {
    std::env::var_os(MODULES_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Why the module closure could not be computed or read.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// No version string in the kernel image.
    #[error("cannot find the Linux version string in the kernel image {0}")]
    NoVersion(PathBuf),
    /// No module directory for this kernel version (only when the caller
    /// asked for a module closure by version: [`closure_for`]).
    #[error("kernel {version} has no module directory {dir}")]
    NoModulesDir { version: String, dir: PathBuf },
    /// A modular kernel whose module directory is missing.
    #[error(
        "kernel {version} builds {} as modules ({config}) but has no module directory {dir}: \
         install its modules package, or use a kernel with them built in (resources/kernel/)",
        modular.join(", ")
    )]
    ModulesNotInstalled {
        version: String,
        dir: PathBuf,
        config: String,
        modular: Vec<String>,
    },
    /// A kernel whose configuration leaves a needed driver out entirely.
    #[error(
        "kernel {version} is built without {} ({config}); ember's devices need them",
        absent.join(", ")
    )]
    NotBuilt {
        version: String,
        config: String,
        absent: Vec<String>,
    },
    /// Neither modules nor a configuration to show the drivers built in.
    #[error(
        "kernel {version} has no module directory {dir} and no build configuration \
         (looked for {}, and CONFIG_IKCONFIG in the image), so whether it has \
         virtio-mmio, virtio-blk, virtio-net and vsock built in cannot be told: \
         install its modules, or put its .config beside it as {}",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        looked.first().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    NoConfig {
        version: String,
        dir: PathBuf,
        looked: Vec<PathBuf>,
    },
    /// Modules needed but neither built in nor present.
    #[error(
        "kernel {version} needs modules that are neither built in nor found under {dir}: {}",
        missing.join(", ")
    )]
    Missing {
        version: String,
        dir: PathBuf,
        missing: Vec<String>,
    },
    /// A module file that cannot be used.
    #[error("{path}: {reason}")]
    BadModule { path: PathBuf, reason: String },
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KmodError + '_ {
    move |source| KmodError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name (`virtio_mmio`: file stem, `-` as `_`).
    pub name: String,
    /// The host file (maybe compressed).
    pub src: PathBuf,
    /// Where it goes in the image, without the leading `/` and without a
    /// compression suffix: `lib/modules/<version>/kernel/.../x.ko`.
    pub dest: String,
}

/// What a kernel needs: its version and modules in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    pub version: String,
    pub modules: Vec<Module>,
}

impl Closure {
    /// The list file's contents: one absolute path per line, in load order.
    pub fn list(&self) -> String {
        self.modules
            .iter()
            .map(|m| format!("/{}\n", m.dest))
            .collect()
    }
}

/// The kernel release of a bzImage (setup header `kernel_version`) or an ELF
/// vmlinux (the `Linux version ` banner).
pub fn kernel_version(image: &Path) -> Result<String, KmodError> {
    let data = fs::read(image).map_err(io_err(image))?;
    version_of(&data).ok_or_else(|| KmodError::NoVersion(image.to_path_buf()))
}

fn first_token(b: &[u8]) -> Option<String> {
    let end = b
        .iter()
        .position(|c| *c == 0 || c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let tok = std::str::from_utf8(&b[..end]).ok()?;
    let ok = !tok.is_empty()
        && tok.len() < 128
        && tok
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-+~".contains(&c));
    ok.then(|| tok.to_string())
}

fn version_of(data: &[u8]) -> Option<String> {
    if data.len() > 0x210 && &data[0x202..0x206] == b"HdrS" {
        let off = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize;
        if off != 0 {
            if let Some(v) = data.get(0x200 + off..).and_then(first_token) {
                return Some(v);
            }
        }
    }
    const BANNER: &[u8] = b"Linux version ";
    data.windows(BANNER.len())
        .enumerate()
        .filter(|(_, w)| *w == BANNER)
        .find_map(|(i, _)| first_token(&data[i + BANNER.len()..]))
}

/// The module name of a path like `kernel/net/vmw_vsock/vsock.ko.xz`.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.gz", ".ko.xz", ".ko.zst"]
        .iter()
        .find_map(|s| file.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

/// The image path of a module file: the compression suffix dropped.
fn dest_of(version: &str, rel: &str) -> String {
    let rel = [".gz", ".xz", ".zst"]
        .iter()
        .find_map(|s| rel.strip_suffix(s))
        .unwrap_or(rel);
    format!("lib/modules/{version}/{rel}")
}

/// The module closure of the kernel `image` for [`WANTED`], with modules
/// looked for under `<modules_root>/lib/modules/<version>`. A kernel without
/// a module directory gets an empty closure when its configuration shows
/// every [`WANTED_OPTIONS`] built in, and an error otherwise (see the module
/// docs).
pub fn closure(image: &Path, modules_root: &Path) -> Result<Closure, KmodError> {
    let data = fs::read(image).map_err(io_err(image))?;
    let version = version_of(&data).ok_or_else(|| KmodError::NoVersion(image.to_path_buf()))?;
    let dir = modules_root.join("lib/modules").join(&version);
    if dir.is_dir() {
        return closure_for(&version, modules_root, &WANTED);
    }
    let looked = config_paths(image, modules_root, &version);
    let (config, text) = match looked.iter().find_map(|p| {
        fs::read_to_string(p)
            .ok()
            .map(|t| (p.display().to_string(), t))
    }) {
        Some(found) => found,
        None => match embedded_config(&data) {
            Some(t) => (
                format!("the configuration embedded in {}", image.display()),
                t,
            ),
            None => {
                return Err(KmodError::NoConfig {
                    version,
                    dir,
                    looked,
                })
            }
        },
    };
    let (mut modular, mut absent) = (Vec::new(), Vec::new());
    for (module, option) in WANTED_OPTIONS {
        match config_value(&text, option) {
            Some("y") => {}
            Some("m") => modular.push(module.to_string()),
            _ => absent.push(format!("{module} ({option})")),
        }
    }
    if !absent.is_empty() {
        return Err(KmodError::NotBuilt {
            version,
            config,
            absent,
        });
    }
    if !modular.is_empty() {
        return Err(KmodError::ModulesNotInstalled {
            version,
            dir,
            config,
            modular,
        });
    }
    Ok(Closure {
        version,
        modules: Vec::new(),
    })
}

/// Where a kernel's build configuration may be, in the order looked at:
/// `<kernel>.config`, `config-<version>` beside the kernel, then
/// `<modules_root>/boot/config-<version>`.
fn config_paths(image: &Path, modules_root: &Path, version: &str) -> Vec<PathBuf> {
    let mut beside = image.as_os_str().to_owned();
    beside.push(".config");
    let mut paths = vec![PathBuf::from(beside)];
    let file = format!("config-{version}");
    if let Some(parent) = image.parent() {
        paths.push(parent.join(&file));
    }
    let boot = modules_root.join("boot").join(&file);
    if !paths.contains(&boot) {
        paths.push(boot);
    }
    paths
}

/// The value of `option` in a kernel `.config` (`y`, `m`, a string...), or
/// `None` when it is unset or absent.
fn config_value<'a>(text: &'a str, option: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(option)?.strip_prefix('='))
        .last()
}

/// The configuration a kernel built with `CONFIG_IKCONFIG` carries: gzip
/// data between the `IKCFG_ST` and `IKCFG_ED` markers. Only an uncompressed
/// image (an ELF vmlinux) shows it; a bzImage's payload is compressed.
fn embedded_config(data: &[u8]) -> Option<String> {
    const START: &[u8] = b"IKCFG_ST";
    const END: &[u8] = b"IKCFG_ED";
    let start = data.windows(START.len()).position(|w| w == START)? + START.len();
    let len = data[start..].windows(END.len()).position(|w| w == END)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&data[start..start + len])
        .take(64 << 20)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// [`closure`] for a known version and module list.
pub fn closure_for(
    version: &str,
    modules_root: &Path,
    wanted: &[&str],
) -> Result<Closure, KmodError> {
    let dir = modules_root.join("lib/modules").join(version);
    if !dir.is_dir() {
        return Err(KmodError::NoModulesDir {
            version: version.to_string(),
            dir,
        });
    }
    let builtin_path = dir.join("modules.builtin");
    let builtin: BTreeSet<String> = match fs::read_to_string(&builtin_path) {
        Ok(s) => s.lines().filter_map(module_name).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(io_err(&builtin_path)(e)),
    };
    let mut index = Index::new(&dir)?;

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut missing = BTreeSet::new();
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &builtin,
            &mut index,
            &mut done,
            &mut BTreeSet::new(),
            &mut missing,
            &mut order,
        )?;
    }
    if !missing.is_empty() {
        return Err(KmodError::Missing {
            version: version.to_string(),
            dir,
            missing: missing.into_iter().collect(),
        });
    }
    let modules = order
        .into_iter()
        .map(|(name, rel)| Module {
            src: dir.join(&rel),
            dest: dest_of(version, &rel),
            name,
        })
        .collect();
    Ok(Closure {
        version: version.to_string(),
        modules,
    })
}

/// Depth-first, dependencies first.
fn visit(
    name: &str,
    builtin: &BTreeSet<String>,
    index: &mut Index,
    done: &mut BTreeSet<String>,
    path: &mut BTreeSet<String>,
    missing: &mut BTreeSet<String>,
    order: &mut Vec<(String, String)>,
) -> Result<(), KmodError> {
    if done.contains(name) || builtin.contains(name) || path.contains(name) {
        return Ok(());
    }
    let Some(rel) = index.files.get(name).cloned() else {
        missing.insert(name.to_string());
        return Ok(());
    };
    path.insert(name.to_string());
    for dep in index.deps(name, &rel)? {
        visit(&dep, builtin, index, done, path, missing, order)?;
    }
    path.remove(name);
    done.insert(name.to_string());
    order.push((name.to_string(), rel));
    Ok(())
}

/// Module name -> file (relative to the module directory), and its direct
/// dependencies when known from `modules.dep`.
struct Index {
    dir: PathBuf,
    files: BTreeMap<String, String>,
    dep: Option<BTreeMap<String, Vec<String>>>,
}

impl Index {
    fn new(dir: &Path) -> Result<Self, KmodError> {
        let dep_path = dir.join("modules.dep");
        match fs::read_to_string(&dep_path) {
            Ok(text) => {
                let mut files = BTreeMap::new();
                let mut dep = BTreeMap::new();
                for line in text.lines() {
                    let Some((m, deps)) = line.split_once(':') else {
                        continue;
                    };
                    let Some(name) = module_name(m.trim()) else {
                        continue;
                    };
                    let deps = deps.split_whitespace().filter_map(module_name).collect();
                    files.insert(name.clone(), m.trim().to_string());
                    dep.insert(name, deps);
                }
                Ok(Index {
                    dir: dir.to_path_buf(),
                    files,
                    dep: Some(dep),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut files = BTreeMap::new();
                walk(dir, dir, &mut files)?;
                Ok(Index {
                    dir: dir.to_path_buf(),
                    files,
                    dep: None,
                })
            }
            Err(e) => Err(io_err(&dep_path)(e)),
        }
    }

    fn deps(&self, name: &str, rel: &str) -> Result<Vec<String>, KmodError> {
        if let Some(dep) = &self.dep {
            return Ok(dep.get(name).cloned().unwrap_or_default());
        }
        let path = self.dir.join(rel);
        let data = read_module_file(&path)?;
        let info = modinfo(&data).map_err(|reason| KmodError::BadModule {
            path: path.clone(),
            reason: reason.to_string(),
        })?;
        Ok(info
            .iter()
            .filter_map(|f| f.strip_prefix("depends="))
            .flat_map(|d| d.split(','))
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect())
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<(), KmodError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e.file_type().map_err(io_err(&p))?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if let (Some(rel), Some(name)) = (
            p.strip_prefix(root).ok().and_then(|r| r.to_str()),
            p.to_str().and_then(module_name),
        ) {
            out.entry(name).or_insert_with(|| rel.to_string());
        }
    }
    Ok(())
}

/// The NUL-separated `key=value` strings of an ELF64 module's `.modinfo`.
fn modinfo(data: &[u8]) -> Result<Vec<String>, &'static str> {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if data.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF module");
    }
    let bad = "truncated ELF section headers";
    let shoff = u64_at(0x28).ok_or(bad)?;
    let shentsize = u16_at(0x3a).ok_or(bad)? as usize;
    let shnum = u16_at(0x3c).ok_or(bad)? as usize;
    let shstrndx = u16_at(0x3e).ok_or(bad)? as usize;
    let sect = |i: usize| -> Option<(u32, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 0x18)?, u64_at(h + 0x20)?))
    };
    let (_, stroff, strsize) = sect(shstrndx).ok_or(bad)?;
    let strtab = data
        .get(stroff..stroff.saturating_add(strsize))
        .ok_or(bad)?;
    for i in 0..shnum {
        let (name, off, size) = sect(i).ok_or(bad)?;
        let n = strtab.get(name as usize..).unwrap_or_default();
        let n = &n[..n.iter().position(|c| *c == 0).unwrap_or(n.len())];
        if n == b".modinfo" {
            let body = data.get(off..off.saturating_add(size)).ok_or(bad)?;
            return Ok(body
                .split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    Err("no .modinfo section")
}

/// A module's bytes, decompressed.
pub fn read_module(m: &Module) -> Result<Vec<u8>, KmodError> {
    read_module_file(&m.src)
}

fn read_module_file(path: &Path) -> Result<Vec<u8>, KmodError> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return fs::read(path).map_err(io_err(path));
    }
    if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(path).map_err(io_err(path))?)
            .read_to_end(&mut out)
            .map_err(io_err(path))?;
        return Ok(out);
    }
    // The host's own xz/zstd: these are the host's files, not user bytes.
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return Err(KmodError::BadModule {
            path: path.to_path_buf(),
            reason: "not a .ko, .ko.gz, .ko.xz or .ko.zst file".to_string(),
        });
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| KmodError::BadModule {
            path: path.to_path_buf(),
            reason: format!("cannot run {tool} to decompress it: {e}"),
        })?;
    if !out.status.success() {
        return Err(KmodError::BadModule {
            path: path.to_path_buf(),
            reason: format!(
                "{tool} -dc failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn version_from_bzimage_header_and_banner() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        bz[0x300..0x315].copy_from_slice(b"6.1.0-57-cloud-amd64 ");
        assert_eq!(version_of(&bz).unwrap(), "6.1.0-57-cloud-amd64");
        let elf = b"\x7fELF....Linux version 6.6.1-ember (x@y) #1\0".to_vec();
        assert_eq!(version_of(&elf).unwrap(), "6.6.1-ember");
        assert_eq!(version_of(b"nothing here"), None);
    }

    #[test]
    fn closure_from_modules_dep_skips_builtin_and_names_missing() {
        let t = TempDir::new();
        let dir = t.0.join("lib/modules/1.2.3");
        fs::create_dir_all(dir.join("kernel/a")).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/a/virtio_mmio.ko: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n\
             kernel/a/virtio_ring.ko: kernel/a/virtio.ko\n\
             kernel/a/virtio.ko:\n\
             kernel/a/virtio_blk.ko.xz: kernel/a/virtio_ring.ko kernel/a/virtio.ko\n",
        )
        .unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let c = closure_for("1.2.3", &t.0, &["virtio_mmio", "virtio_blk", "ext4"]).unwrap();
        let names: Vec<&str> = c.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio", "virtio_ring", "virtio_mmio", "virtio_blk"]
        );
        assert_eq!(
            c.modules[3].dest,
            "lib/modules/1.2.3/kernel/a/virtio_blk.ko"
        );
        assert_eq!(c.modules[3].src, dir.join("kernel/a/virtio_blk.ko.xz"));
        assert!(c
            .list()
            .starts_with("/lib/modules/1.2.3/kernel/a/virtio.ko\n"));
        let err = closure_for("1.2.3", &t.0, &["virtio_net", "vsock"]).unwrap_err();
        assert!(err.to_string().contains("virtio_net, vsock"), "{err}");
        let err = closure_for("9.9", &t.0, &["x"]).unwrap_err();
        assert!(matches!(err, KmodError::NoModulesDir { .. }), "{err}");
    }

    /// A kernel image file with a `Linux version` banner and, optionally,
    /// an embedded gzip'd configuration.
    fn fake_kernel(path: &Path, embedded: Option<&str>) {
        use std::io::Write;
        let mut data = b"\x7fELF....Linux version 6.6.1-ember (x@y) #1\0".to_vec();
        if let Some(cfg) = embedded {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(cfg.as_bytes()).unwrap();
            data.extend_from_slice(b"IKCFG_ST");
            data.extend_from_slice(&gz.finish().unwrap());
            data.extend_from_slice(b"IKCFG_ED");
        }
        fs::write(path, data).unwrap();
    }

    const ALL_BUILT_IN: &str = "CONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\n\
        CONFIG_VIRTIO_NET=y\nCONFIG_VIRTIO_VSOCKETS=y\nCONFIG_EXT4_FS=y\n";

    #[test]
    fn a_kernel_without_modules_is_used_only_when_its_config_shows_them_built_in() {
        let t = TempDir::new();
        let root = t.0.join("root");
        fs::create_dir_all(root.join("boot")).unwrap();
        let k = t.0.join("vmlinux");

        // No modules, no configuration: refused, naming where it looked.
        fake_kernel(&k, None);
        let err = closure(&k, &root).unwrap_err();
        assert!(matches!(err, KmodError::NoConfig { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}.config", k.display())), "{msg}");
        assert!(msg.contains("boot/config-6.6.1-ember"), "{msg}");

        // Everything built in, in the config beside the kernel: no modules.
        fs::write(t.0.join("vmlinux.config"), ALL_BUILT_IN).unwrap();
        let c = closure(&k, &root).unwrap();
        assert_eq!(c.version, "6.6.1-ember");
        assert!(c.modules.is_empty());
        fs::remove_file(t.0.join("vmlinux.config")).unwrap();

        // A modular distro config in <root>/boot and no module directory.
        fs::write(
            root.join("boot/config-6.6.1-ember"),
            ALL_BUILT_IN
                .replace("VIRTIO_MMIO=y", "VIRTIO_MMIO=m")
                .replace("VSOCKETS=y", "VSOCKETS=m"),
        )
        .unwrap();
        let err = closure(&k, &root).unwrap_err();
        assert!(
            matches!(&err, KmodError::ModulesNotInstalled { modular, .. }
                if modular == &["virtio_mmio", "vmw_vsock_virtio_transport"]),
            "{err}"
        );
        assert!(err.to_string().contains("lib/modules/6.6.1-ember"), "{err}");

        // A driver left out entirely.
        fs::write(
            root.join("boot/config-6.6.1-ember"),
            ALL_BUILT_IN.replace("CONFIG_VIRTIO_NET=y\n", "# CONFIG_VIRTIO_NET is not set\n"),
        )
        .unwrap();
        let err = closure(&k, &root).unwrap_err();
        assert!(
            err.to_string()
                .contains("without virtio_net (CONFIG_VIRTIO_NET)"),
            "{err}"
        );
        fs::remove_file(root.join("boot/config-6.6.1-ember")).unwrap();

        // CONFIG_IKCONFIG: the configuration inside the image.
        fake_kernel(&k, Some(ALL_BUILT_IN));
        assert!(closure(&k, &root).unwrap().modules.is_empty());
        fake_kernel(&k, Some(&ALL_BUILT_IN.replace("BLK=y", "BLK=m")));
        let err = closure(&k, &root).unwrap_err();
        assert!(err.to_string().contains("embedded in"), "{err}");

        // With a module directory, modules.dep decides as before.
        fs::create_dir_all(root.join("lib/modules/6.6.1-ember")).unwrap();
        let err = closure(&k, &root).unwrap_err();
        assert!(matches!(err, KmodError::Missing { .. }), "{err}");
    }

    #[test]
    fn config_values_are_read_exactly() {
        let text = "CONFIG_VIRTIO=y\nCONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\n";
        assert_eq!(config_value(text, "CONFIG_VIRTIO"), Some("y"));
        assert_eq!(config_value(text, "CONFIG_VIRTIO_MMIO"), Some("m"));
        assert_eq!(
            config_value(text, "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
            None
        );
        assert_eq!(config_value(text, "CONFIG_VIRTIO_BLK"), None);
    }

    #[test]
    fn xz_and_zst_modules_are_decompressed_with_the_host_tools() {
        let t = TempDir::new();
        for (tool, ext) in [("xz", "xz"), ("zstd", "zst")] {
            let plain = t.0.join(format!("m-{tool}.ko"));
            fs::write(&plain, b"module bytes").unwrap();
            let st = Command::new(tool).arg("-q").arg(&plain).status();
            if !st.is_ok_and(|s| s.success()) {
                println!("skipping .ko.{ext}: {tool} is not installed");
                continue;
            }
            let packed = t.0.join(format!("m-{tool}.ko.{ext}"));
            assert!(packed.is_file());
            assert_eq!(read_module_file(&packed).unwrap(), b"module bytes");
        }
        let bad = t.0.join("m.ko.xz");
        fs::write(&bad, b"not xz").unwrap();
        let err = read_module_file(&bad).unwrap_err();
        assert!(matches!(err, KmodError::BadModule { .. }), "{err}");
    }

    #[test]
    fn gz_modules_are_decompressed() {
        use std::io::Write;
        let t = TempDir::new();
        let p = t.0.join("m.ko.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"module bytes").unwrap();
        fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read_module_file(&p).unwrap(), b"module bytes");
    }
}
