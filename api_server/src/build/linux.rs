//! The `linux` unikernel base: the user's program becomes `/init` of a
//! Linux initramfs, booted by a stock Linux `bzImage` ([`find_kernel`]).
//!
//! * lang `binary`: the upload carries a ready, statically linked x86_64
//!   ELF executable (see [`DESCRIPTION_BINARY`] for how it is found).
//! * lang `c`: every `*.c` file of the upload is compiled and statically
//!   linked with the host's `gcc -static -O2` (glibc's `libc.a`, package
//!   `libc6-dev` on Debian/Ubuntu).
//!
//! The initramfs is a gzip-compressed `newc` cpio archive holding
//! `dev/` (with `dev/console`, char 5:1, so the kernel can open the console
//! before init runs), `proc/`, `sys/`, `tmp/` (1777), `mnt/` and `init`
//! (0755). Names are stored without a leading `/`, as the kernel's own
//! `gen_init_cpio` does; owners are 0:0 and timestamps 0, so the same input
//! gives the same image.
//!
//! gcc (lang `c`) runs as a [`crate::sandbox`] job: the sources are bound
//! read-only at `/src`, every source reaches gcc as `./<path>`, and the
//! program is written to `/out/init`, then moved into a private work
//! directory with `O_NOFOLLOW` and checked before it is packed.
//!
//! Building is tested here; booting needs a host whose KVM runs Linux.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::build::kmod;
use crate::sandbox::{self, Job, PrivateDir, SandboxError, Status};

/// What `/describe_compiler` says about `linux-c-ember`.
pub const DESCRIPTION_C: &str = "\
Compiles a C program into a Linux initramfs whose /init is your program.

Upload a tar.gz holding your C sources. Every *.c file in the archive (the \
root and all subdirectories) is compiled and statically linked together into \
one program with the daemon host's `gcc -static -O2 ... -lm` (glibc); the \
archive root is on the include path, so headers there are found with \
#include \"x.h\". Exactly one file must define main(). Only the C library and \
libm are available.

The image boots a stock Linux kernel (bzImage) with an initramfs that holds \
/init (your program, pid 1), /dev/console and empty /dev, /proc, /sys, /tmp and \
/mnt directories. Nothing else runs: no shell, no init system, no /etc (but see below). \
stdin/stdout/stderr are the serial console, which is the instance log. \
When the host kernel builds ember's devices as modules (distribution \
kernels do), the initramfs also holds them under /lib/modules/<version>/ and \
/etc/ember-modules lists them, one path per line in load order; then /init is \
a small loader that loads them and execs your program (stored as /ember/init) \
as PID 1 with the same argv (argv[0] \"/init\") and environment.

Arguments and environment reach the program the way Linux passes them to \
init: on the kernel command line, the words after `--` become argv[1..] (the \
image's args, set at image creation), and KEY=VALUE words before it become \
the environment (the instance's Env). Words containing a dot, such as \
ember.mount=/data:0 (volume /data is the virtio disk with index 0, i.e. \
/dev/vda), are kernel parameters and are not passed to init; read them from \
/proc/cmdline after mounting /proc. To use a volume the program mounts it \
itself, e.g. mount(\"devtmpfs\", \"/dev\", \"devtmpfs\", 0, 0) then \
mount(\"/dev/vda\", \"/data\", \"ext4\", 0, 0) after mkdir(\"/data\"). \
If /init exits, the kernel panics; to finish cleanly call \
reboot(RB_AUTOBOOT) or reboot(RB_POWER_OFF) after sync().";

/// What `/describe_compiler` says about `linux-binary-ember`.
pub const DESCRIPTION_BINARY: &str = "\
Packs a ready-made static Linux program into an initramfs whose /init is your \
program.

Upload a tar.gz holding one statically linked x86_64 ELF executable (built \
with e.g. `gcc -static`, `musl-gcc`, `CGO_ENABLED=0 go build`, or Rust with \
`--target x86_64-unknown-linux-musl`; static-pie is fine). It is found in the \
archive root (or, when the root holds nothing but one directory, in that \
directory): the single ELF file there, or, when there are several, the one \
named `app` or `main`. Dynamically linked programs (with an ELF interpreter \
such as ld-linux) are refused, because the image contains no shared \
libraries; so are non-ELF files (scripts) and non-x86_64 ELFs. Other files in \
the archive are ignored; put data on a volume instead.

The image boots a stock Linux kernel (bzImage) with an initramfs that holds \
/init (your program, pid 1, mode 0755), /dev/console and empty /dev, /proc, \
/sys, /tmp and /mnt directories. Nothing else runs: no shell, no init system, \
no /etc (but see below). stdin/stdout/stderr are the serial console, which is the instance \
log. \
When the host kernel builds ember's devices as modules (distribution \
kernels do), the initramfs also holds them under /lib/modules/<version>/ and \
/etc/ember-modules lists them, one path per line in load order; then /init is \
a small loader that loads them and execs your program (stored as /ember/init) \
as PID 1 with the same argv (argv[0] \"/init\") and environment.

Arguments and environment reach the program the way Linux passes them to \
init: on the kernel command line, the words after `--` become argv[1..] (the \
image's args, set at image creation), and KEY=VALUE words before it become \
the environment (the instance's Env). Words containing a dot, such as \
ember.mount=/data:0 (volume /data is the virtio disk with index 0, i.e. \
/dev/vda), are kernel parameters and are not passed to init; read them from \
/proc/cmdline after mounting /proc. To use a volume the program mounts \
devtmpfs on /dev and then the ext4 disk itself. If /init exits, the kernel \
panics; to finish cleanly call reboot(2) (power off or restart) after sync.";

/// Where an installed kernel for the `linux` base is looked for first.
pub const KERNEL_ENV: &str = "EMBER_LINUX_KERNEL";
/// The daemon's own kernel location.
pub const KERNEL_PATH: &str = "/var/lib/ember/kernels/vmlinuz";

/// The module loader (`resources/kernel/modload.c`, built statically by
/// `build.rs`): `/init` of an image that carries kernel modules; it loads
/// the modules `/etc/ember-modules` lists, then execs
/// [`PROGRAM_BEHIND_LOADER`].
const MODLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/modload"));
/// Where the user's program goes when [`MODLOAD`] is `/init`.
const PROGRAM_BEHIND_LOADER: &str = "ember/init";

/// ELF `PT_INTERP`.
const PT_INTERP: u32 = 3;
/// ELF `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// Largest accepted ELF interpreter string (only used for the message).
const MAX_INTERP: u64 = 4096;
/// Compiler output kept for errors and logs.
const MAX_LOG: usize = 16 * 1024;

/// Source language of a `linux` image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxLang {
    /// Compile `*.c` with `gcc -static`.
    C,
    /// A ready static ELF executable.
    Binary,
}

/// What [`build_initramfs`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsInfo {
    /// Size of `/init` in bytes.
    pub init_size: u64,
    /// Size of the compressed initramfs file in bytes.
    pub image_size: u64,
    /// Compiler warnings (lang `c`), or which file became `/init`.
    pub log: String,
}

/// Why a `linux` image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBuildError {
    /// No ELF executable where one was expected.
    #[error("no ELF executable found in the archive root{0}")]
    NoElf(String),
    /// Several candidates and none named `app` or `main`.
    #[error(
        "several ELF executables in the archive root ({0}); keep one or name it 'app' or 'main'"
    )]
    Ambiguous(String),
    /// The program needs a dynamic loader.
    #[error("{file} is dynamically linked (interpreter {interp}); link it statically (e.g. gcc -static, musl, CGO_ENABLED=0)")]
    Dynamic { file: String, interp: String },
    /// Not an ELF, or an ELF that cannot run as x86_64 init.
    #[error("{file} cannot be used as /init: {reason}")]
    BadElf { file: String, reason: String },
    /// No `*.c` files for lang `c`.
    #[error("no *.c files found in the archive")]
    NoSources,
    /// gcc failed.
    #[error("compilation failed ({status}):\n{output}")]
    CompileFailed { status: String, output: String },
    /// gcc could not be run.
    #[error("cannot run gcc (install gcc and libc6-dev): {0}")]
    Gcc(#[source] io::Error),
    /// The sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// `/init` larger than a newc cpio entry can hold.
    #[error("/init is too large for an initramfs ({0} bytes)")]
    TooLarge(u64),
    /// The kernel's modules could not be read.
    #[error("cannot pack the kernel modules: {0}")]
    Modules(#[from] kmod::KmodError),
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LinuxBuildError + '_ {
    move |source| LinuxBuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the gzip-compressed initramfs `out` (replacing it) from the
/// extracted upload in `src_dir`.
pub fn build_initramfs(
    src_dir: &Path,
    lang: LinuxLang,
    out: &Path,
) -> Result<InitramfsInfo, LinuxBuildError> {
    build_initramfs_with_modules(src_dir, lang, out, None)
}

/// [`build_initramfs`], plus the kernel modules of `modules`
/// (decompressed) under `/lib/modules/<version>/` and their list
/// `/etc/ember-modules` (one path per line, in load order). When there is
/// at least one module, `/init` is the loader ([`MODLOAD`]) and the user's
/// program is `/ember/init`, which the loader execs (still PID 1, same argv
/// and environment) after loading the modules.
pub fn build_initramfs_with_modules(
    src_dir: &Path,
    lang: LinuxLang,
    out: &Path,
    modules: Option<&kmod::Closure>,
) -> Result<InitramfsInfo, LinuxBuildError> {
    match lang {
        LinuxLang::Binary => {
            let (init, name) = find_binary(src_dir)?;
            let (init_size, image_size) = write_initramfs(&init, out, modules)?;
            Ok(InitramfsInfo {
                init_size,
                image_size,
                log: format!("/init is {name}"),
            })
        }
        LinuxLang::C => {
            let tmp = PrivateDir::new("linux-c")?;
            let bin = tmp.path().join("init");
            let log = compile_c(src_dir, &bin, sandbox::config().limits.timeout)?;
            let name = "the compiled program".to_string();
            check_static_elf(&bin, &name)?;
            let (init_size, image_size) = write_initramfs(&bin, out, modules)?;
            Ok(InitramfsInfo {
                init_size,
                image_size,
                log,
            })
        }
    }
}

/// The directory that holds the program: `src_dir`, or its only entry when
/// that is a directory (archives made with `tar czf x.tgz mydir/`).
fn program_root(src_dir: &Path) -> Result<PathBuf, LinuxBuildError> {
    let mut entries = Vec::new();
    for e in fs::read_dir(src_dir).map_err(io_err(src_dir))? {
        let e = e.map_err(io_err(src_dir))?;
        entries.push(e.path());
        if entries.len() > 1 {
            return Ok(src_dir.to_path_buf());
        }
    }
    match entries.first() {
        Some(only)
            if fs::symlink_metadata(only)
                .map(|m| m.is_dir())
                .unwrap_or(false) =>
        {
            Ok(only.clone())
        }
        _ => Ok(src_dir.to_path_buf()),
    }
}

/// Finds the ELF for lang `binary`; returns its path and display name.
fn find_binary(src_dir: &Path) -> Result<(PathBuf, String), LinuxBuildError> {
    let root = program_root(src_dir)?;
    let mut elves: Vec<(String, PathBuf)> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    for e in fs::read_dir(&root).map_err(io_err(&root))? {
        let e = e.map_err(io_err(&root))?;
        let path = e.path();
        let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if !md.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if has_elf_magic(&path)? {
            elves.push((name, path));
        } else if md.permissions().mode() & 0o111 != 0 {
            others.push(name);
        }
    }
    elves.sort();
    others.sort();
    let (name, path) = match elves.len() {
        0 => {
            let hint = if others.is_empty() {
                String::new()
            } else {
                format!(
                    " (executable files that are not ELF, e.g. scripts: {})",
                    others.join(", ")
                )
            };
            return Err(LinuxBuildError::NoElf(hint));
        }
        1 => elves.remove(0),
        _ => {
            let pos = ["app", "main"]
                .iter()
                .find_map(|want| elves.iter().position(|(n, _)| n == want));
            match pos {
                Some(i) => elves.remove(i),
                None => {
                    let names: Vec<&str> = elves.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(LinuxBuildError::Ambiguous(names.join(", ")));
                }
            }
        }
    };
    check_static_elf(&path, &name)?;
    Ok((path, name))
}

fn has_elf_magic(path: &Path) -> Result<bool, LinuxBuildError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"\x7fELF"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads exactly `buf.len()` bytes at `off`, or None past the end.
fn read_at(f: &File, off: u64, buf: &mut [u8]) -> io::Result<bool> {
    match f.read_exact_at(buf, off) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// What [`inspect_elf`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Elf {
    /// An x86_64 executable without `PT_INTERP`.
    Static,
    /// An x86_64 executable that asks for this ELF interpreter
    /// (`<unreadable>` when the string could not be read).
    Dynamic { interp: String },
    /// Not something Linux can run as an x86_64 program; why.
    Unusable(&'static str),
}

/// Classifies `path`: a 64-bit little-endian x86_64 executable (`ET_EXEC`,
/// or `ET_DYN` for PIE and static-pie), static or with its `PT_INTERP`.
/// Only reading the file can fail.
pub(crate) fn inspect_elf(path: &Path) -> io::Result<Elf> {
    let f = File::open(path)?;
    let mut eh = [0u8; 64];
    if !read_at(&f, 0, &mut eh)? || &eh[..4] != b"\x7fELF" {
        return Ok(Elf::Unusable("not an ELF executable"));
    }
    if eh[4] != 2 {
        return Ok(Elf::Unusable("not a 64-bit ELF (x86_64 is required)"));
    }
    if eh[5] != 1 {
        return Ok(Elf::Unusable("not a little-endian ELF"));
    }
    if le16(&eh, 18) != EM_X86_64 {
        return Ok(Elf::Unusable("not an x86_64 ELF"));
    }
    match le16(&eh, 16) {
        2 | 3 => {}
        1 => {
            return Ok(Elf::Unusable(
                "a relocatable object file (.o), not a linked executable",
            ))
        }
        _ => return Ok(Elf::Unusable("not an executable ELF")),
    }
    let len = f.metadata()?.len();
    let phoff = le64(&eh, 32);
    let phentsize = u64::from(le16(&eh, 54));
    let phnum = u64::from(le16(&eh, 56));
    if phnum == 0 {
        return Ok(Elf::Unusable("no program headers"));
    }
    if phnum == 0xffff || phentsize < 56 {
        return Ok(Elf::Unusable("unsupported program header table"));
    }
    let mut ph = [0u8; 56];
    for i in 0..phnum {
        let Some(off) = phentsize.checked_mul(i).and_then(|o| o.checked_add(phoff)) else {
            return Ok(Elf::Unusable("corrupt program header table"));
        };
        if off.checked_add(56).is_none_or(|end| end > len) || !read_at(&f, off, &mut ph)? {
            return Ok(Elf::Unusable("truncated program header table"));
        }
        if le32(&ph, 0) == PT_INTERP {
            let p_off = le64(&ph, 8);
            let p_size = le64(&ph, 32).min(MAX_INTERP);
            let mut interp = vec![0u8; usize::try_from(p_size).unwrap_or(0)];
            let interp = if read_at(&f, p_off, &mut interp).unwrap_or(false) {
                let s = String::from_utf8_lossy(&interp);
                s.trim_end_matches('\0').to_string()
            } else {
                "<unreadable>".to_string()
            };
            return Ok(Elf::Dynamic { interp });
        }
    }
    Ok(Elf::Static)
}

/// Checks that `path` is a 64-bit little-endian x86_64 executable
/// (`ET_EXEC`, or `ET_DYN` for static-pie) without `PT_INTERP`.
fn check_static_elf(path: &Path, name: &str) -> Result<(), LinuxBuildError> {
    match inspect_elf(path).map_err(io_err(path))? {
        Elf::Static => Ok(()),
        Elf::Dynamic { interp } => Err(LinuxBuildError::Dynamic {
            file: name.to_string(),
            interp,
        }),
        Elf::Unusable(reason) => Err(LinuxBuildError::BadElf {
            file: name.to_string(),
            reason: reason.to_string(),
        }),
    }
}

/// Collects `*.c` files below `dir` (relative paths, sorted), not following
/// symlinks.
fn c_sources(dir: &Path) -> Result<Vec<PathBuf>, LinuxBuildError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for e in fs::read_dir(&abs).map_err(io_err(&abs))? {
            let e = e.map_err(io_err(&abs))?;
            let ft = e.file_type().map_err(io_err(&abs))?;
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() && r.extension().is_some_and(|x| x == "c") {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn truncate_log(mut s: String) -> String {
    if s.len() > MAX_LOG {
        let mut cut = MAX_LOG;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("\n[... output truncated]");
    }
    s
}

/// Largest `/init` gcc may write (a newc entry holds at most 4 GiB; a
/// static C program is far smaller).
const MAX_INIT: u64 = 512 << 20;

/// Compiles every `*.c` below `src_dir` into the static executable `bin`
/// in a sandbox job stopped after `timeout`; returns gcc's diagnostics.
fn compile_c(src_dir: &Path, bin: &Path, timeout: Duration) -> Result<String, LinuxBuildError> {
    let sources = c_sources(src_dir)?;
    if sources.is_empty() {
        return Err(LinuxBuildError::NoSources);
    }
    let gcc = sandbox::find_program("gcc").ok_or_else(|| {
        LinuxBuildError::Gcc(io::Error::new(io::ErrorKind::NotFound, "gcc not found"))
    })?;
    let run = Job::new(gcc)?
        .ro(src_dir, "/src")
        .give(src_dir)
        .cwd("/src")
        .timeout(timeout)
        .max_file(MAX_INIT)
        .args(["-static", "-O2", "-o", "/out/init", "-I", "/src"])
        // "./" keeps a file named like an option (`-o.c`) or a response
        // file (`@opts.c`) from being read as one.
        .args(sources.iter().map(|s| Path::new(".").join(s)))
        .arg("-lm")
        .run()?;
    let log = truncate_log(run.log().replace("/src/", ""));
    match run.status {
        Status::Exited(0) => {}
        Status::Exited(c) => {
            return Err(LinuxBuildError::CompileFailed {
                status: format!("exit status: {c}"),
                output: log,
            })
        }
        Status::TimedOut | Status::Signaled(_) => {
            return Err(LinuxBuildError::CompileFailed {
                status: run.describe(),
                output: format!("{log}\ngcc {}", run.describe()),
            })
        }
    }
    run.take_file("init", bin, MAX_INIT, 0o755)?;
    Ok(log)
}

/// One entry of a newc initramfs, for [`write_newc`].
pub(crate) struct CpioEntry<'a> {
    /// The path without its leading `/` (`dev/console`), as the kernel's
    /// `gen_init_cpio` stores names.
    pub(crate) name: &'a str,
    /// Permission bits (`0o755`, `0o1777`); the file type comes from `body`.
    pub(crate) perm: u32,
    pub(crate) body: CpioBody<'a>,
}

/// What a [`CpioEntry`] is.
pub(crate) enum CpioBody<'a> {
    Dir,
    CharDev {
        major: u32,
        minor: u32,
    },
    /// A regular file: exactly `size` bytes are copied from `src`.
    File {
        src: &'a mut dyn Read,
        size: u32,
    },
}

impl<'a> CpioEntry<'a> {
    pub(crate) const fn dir(name: &'a str, perm: u32) -> Self {
        CpioEntry {
            name,
            perm,
            body: CpioBody::Dir,
        }
    }

    pub(crate) const fn char_dev(name: &'a str, perm: u32, major: u32, minor: u32) -> Self {
        CpioEntry {
            name,
            perm,
            body: CpioBody::CharDev { major, minor },
        }
    }
}

/// Writes `entries` in order, then the trailer, as newc cpio to `w`. Inodes
/// are numbered from 1, owners are 0:0 and timestamps 0, so the same entries
/// give the same bytes. Parent directories must come before their entries.
pub(crate) fn write_newc<'a>(
    w: &mut dyn Write,
    entries: impl IntoIterator<Item = CpioEntry<'a>>,
) -> io::Result<()> {
    for (ino, e) in (1u32..).zip(entries) {
        let (kind, nlink) = match e.body {
            CpioBody::Dir => (0o040000, 2),
            CpioBody::CharDev { .. } => (0o020000, 1),
            CpioBody::File { .. } => (0o100000, 1),
        };
        let mut b = cpio::newc::Builder::new(e.name)
            .ino(ino)
            .mode(kind | (e.perm & 0o7777))
            .uid(0)
            .gid(0)
            .nlink(nlink);
        match e.body {
            CpioBody::Dir => b.write(&mut *w, 0).finish()?,
            CpioBody::CharDev { major, minor } => {
                b = b.rdev_major(major).rdev_minor(minor);
                b.write(&mut *w, 0).finish()?
            }
            CpioBody::File { src, size } => {
                let mut fw = b.write(&mut *w, size);
                let copied = io::copy(&mut src.take(u64::from(size)), &mut fw)?;
                if copied != u64::from(size) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} changed size while it was packed", e.name),
                    ));
                }
                fw.finish()?
            }
        };
    }
    cpio::newc::trailer(w)?;
    Ok(())
}

/// The fixed skeleton: directories and the console device.
fn skeleton<'a>() -> [CpioEntry<'a>; 6] {
    [
        CpioEntry::dir("dev", 0o755),
        CpioEntry::char_dev("dev/console", 0o600, 5, 1),
        CpioEntry::dir("proc", 0o755),
        CpioEntry::dir("sys", 0o755),
        CpioEntry::dir("tmp", 0o1777),
        CpioEntry::dir("mnt", 0o755),
    ]
}

/// Writes the gzip-compressed newc initramfs with `init` as `/init`;
/// returns (init size, image size).
fn write_initramfs(
    init: &Path,
    out: &Path,
    modules: Option<&kmod::Closure>,
) -> Result<(u64, u64), LinuxBuildError> {
    let mut src = File::open(init).map_err(io_err(init))?;
    let init_size = src.metadata().map_err(io_err(init))?.len();
    let init_size32 = u32::try_from(init_size).map_err(|_| LinuxBuildError::TooLarge(init_size))?;
    // With modules to load, /init is the loader and the program moves to
    // /ember/init.
    let modules = modules.filter(|c| !c.modules.is_empty());
    let mut loader = io::Cursor::new(MODLOAD);
    let mut mods = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for m in modules.map(|c| c.modules.as_slice()).unwrap_or_default() {
        let data = kmod::read_module(m)?;
        let size =
            u32::try_from(data.len()).map_err(|_| LinuxBuildError::TooLarge(data.len() as u64))?;
        let mut parent = Path::new(&m.dest).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
        mods.push((m.dest.clone(), io::Cursor::new(data), size));
    }
    let list = modules.map(|c| c.list().into_bytes());
    if list.is_some() {
        dirs.insert("etc".to_string());
        dirs.insert("ember".to_string());
    }
    let mut list_src = io::Cursor::new(list.clone().unwrap_or_default());
    let res = (|| -> io::Result<u64> {
        let file = File::create(out)?;
        let mut gz = GzEncoder::new(BufWriter::new(file), Compression::default());
        let program = CpioEntry {
            name: if list.is_some() {
                PROGRAM_BEHIND_LOADER
            } else {
                "init"
            },
            perm: 0o755,
            body: CpioBody::File {
                src: &mut src,
                size: init_size32,
            },
        };
        let (init, program) = if list.is_some() {
            let loader = CpioEntry {
                name: "init",
                perm: 0o755,
                body: CpioBody::File {
                    src: &mut loader,
                    size: MODLOAD.len() as u32,
                },
            };
            (loader, Some(program))
        } else {
            (program, None)
        };
        let extra = dirs
            .iter()
            .map(|d| CpioEntry::dir(d, 0o755))
            .chain(program)
            .chain(mods.iter_mut().map(|m| CpioEntry {
                name: &m.0,
                perm: 0o644,
                body: CpioBody::File {
                    src: &mut m.1,
                    size: m.2,
                },
            }))
            .chain(list.as_ref().map(|l| CpioEntry {
                name: kmod::LIST_FILE,
                perm: 0o644,
                body: CpioBody::File {
                    src: &mut list_src,
                    size: l.len() as u32,
                },
            }));
        write_newc(&mut gz, skeleton().into_iter().chain([init]).chain(extra))?;
        let mut inner = gz.finish()?;
        inner.flush()?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    })();
    match res {
        Ok(image_size) => Ok((init_size, image_size)),
        Err(e) => {
            let _ = fs::remove_file(out);
            Err(io_err(out)(e))
        }
    }
}

/// Finds a Linux bzImage to boot `linux` images: `$EMBER_LINUX_KERNEL`,
/// then `/var/lib/ember/kernels/vmlinuz`, then the newest
/// `/boot/vmlinuz-*` (by version). Only existing regular files count.
pub fn find_kernel() -> Option<PathBuf> {
    let env = std::env::var_os(KERNEL_ENV).map(PathBuf::from);
    find_kernel_in(env, Path::new(KERNEL_PATH), Path::new("/boot"))
}

fn is_file(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
}

fn find_kernel_in(env: Option<PathBuf>, own: &Path, boot: &Path) -> Option<PathBuf> {
    if let Some(p) = env.filter(|p| is_file(p)) {
        return Some(p);
    }
    if is_file(own) {
        return Some(own.to_path_buf());
    }
    let mut best: Option<(String, PathBuf)> = None;
    for e in fs::read_dir(boot).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let path = e.path();
        if !is_file(&path) {
            continue;
        }
        let newer = best
            .as_ref()
            .is_none_or(|(v, _)| version_cmp(version, v) == Ordering::Greater);
        if newer {
            best = Some((version.to_string(), path));
        }
    }
    best.map(|(_, p)| p)
}

/// Compares version strings with digit runs as numbers
/// (`6.10.0-1` > `6.9.12-3`).
fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, ra) = a.split_at(da);
                let (nb, rb) = b.split_at(db);
                let na = trim_zeros(na);
                let nb = trim_zeros(nb);
                let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = ra;
                b = rb;
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::process::Command;

    use crate::test_util::TempDir;

    const HELLO: &str = r#"
#include <stdio.h>
#include "greet.h"
extern char **environ;
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) printf("arg:%s\n", argv[i]);
    for (char **e = environ; *e; e++) printf("env:%s\n", *e);
    printf("%s\n", GREETING);
    return 0;
}
"#;

    /// One parsed initramfs entry.
    #[derive(Debug)]
    struct Ent {
        mode: u32,
        rdev: (u32, u32),
        uid: u32,
        data: Vec<u8>,
    }

    fn read_initramfs(path: &Path) -> BTreeMap<String, Ent> {
        let gz = flate2::read::GzDecoder::new(File::open(path).unwrap());
        let mut r: Box<dyn Read> = Box::new(gz);
        let mut out = BTreeMap::new();
        loop {
            let mut rd = cpio::newc::Reader::new(r).unwrap();
            if rd.entry().is_trailer() {
                break;
            }
            let name = rd.entry().name().to_string();
            let mode = rd.entry().mode();
            let rdev = (rd.entry().rdev_major(), rd.entry().rdev_minor());
            let uid = rd.entry().uid();
            let mut data = Vec::new();
            rd.read_to_end(&mut data).unwrap();
            out.insert(
                name,
                Ent {
                    mode,
                    rdev,
                    uid,
                    data,
                },
            );
            r = rd.finish().unwrap();
        }
        out
    }

    fn gcc(args: &[&str]) {
        let st = Command::new("gcc")
            .args(args)
            .status()
            .expect("gcc not found: these tests need gcc and libc6-dev (static libc.a)");
        assert!(
            st.success(),
            "gcc {args:?} failed (is libc6-dev installed?)"
        );
    }

    fn check_skeleton(ents: &BTreeMap<String, Ent>) {
        let console = &ents["dev/console"];
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        for d in ["dev", "proc", "sys", "tmp", "mnt"] {
            assert_eq!(ents[d].mode & 0o170000, 0o040000, "{d}");
        }
        assert_eq!(ents["tmp"].mode, 0o041777);
        let init = &ents["init"];
        assert_eq!(init.mode, 0o100755);
        assert_eq!(init.uid, 0);
        assert_eq!(ents.len(), 7);
    }

    #[test]
    fn c_program_builds_and_runs() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(src.join("include")).unwrap();
        fs::write(src.join("main.c"), HELLO).unwrap();
        fs::write(
            src.join("greet.h"),
            "const char *greeting(void);\n#define GREETING greeting()\n",
        )
        .unwrap();
        fs::create_dir_all(src.join("lib")).unwrap();
        fs::write(
            src.join("lib/greet.c"),
            "const char *greeting(void) { return \"hello from init\"; }\n",
        )
        .unwrap();
        let out = t.0.join("initrd.gz");
        let info = build_initramfs(&src, LinuxLang::C, &out).unwrap();
        assert_eq!(info.image_size, fs::metadata(&out).unwrap().len());
        let ents = read_initramfs(&out);
        check_skeleton(&ents);
        let init = &ents["init"].data;
        assert_eq!(init.len() as u64, info.init_size);
        // The packed /init is a static ELF that prints argv and env.
        let bin = t.0.join("init");
        fs::write(&bin, init).unwrap();
        check_static_elf(&bin, "init").unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let run = Command::new(&bin)
            .env_clear()
            .env("GREETING_ENV", "x=y")
            .args(["one", "two"])
            .output()
            .unwrap();
        assert!(run.status.success());
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            "arg:one\narg:two\nenv:GREETING_ENV=x=y\nhello from init\n"
        );
    }

    #[test]
    fn c_errors() {
        let t = TempDir::new();
        let out = t.0.join("initrd.gz");
        fs::write(t.0.join("README"), "no code").unwrap();
        let err = build_initramfs(&t.0, LinuxLang::C, &out).unwrap_err();
        assert!(matches!(err, LinuxBuildError::NoSources), "{err}");
        fs::write(t.0.join("bad.c"), "int main( { syntax error").unwrap();
        let err = build_initramfs(&t.0, LinuxLang::C, &out).unwrap_err();
        match &err {
            LinuxBuildError::CompileFailed { output, .. } => {
                assert!(output.contains("bad.c"), "{output}")
            }
            other => panic!("{other}"),
        }
        assert!(!out.exists());
    }

    /// Option-like and response-file-like source names are plain files;
    /// the response file's wrapper never runs.
    #[test]
    fn odd_source_names_are_plain_files() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("-o.c"), "int helper(void) { return 1; }\n").unwrap();
        fs::write(src.join("--help.c"), "int other(void) { return 2; }\n").unwrap();
        fs::write(
            src.join("main.c"),
            "int helper(void); int other(void);\nint main(void) { return helper() + other(); }\n",
        )
        .unwrap();
        let out = t.0.join("initrd.gz");
        build_initramfs(&src, LinuxLang::C, &out).unwrap();
        let marker = std::env::temp_dir().join(format!("PWNED-{}-linux-c", std::process::id()));
        let _ = fs::remove_file(&marker);
        fs::write(
            src.join("@opts.c"),
            format!("-wrapper /bin/sh,-c,touch {}\n", marker.display()),
        )
        .unwrap();
        let err = build_initramfs(&src, LinuxLang::C, &out).unwrap_err();
        match &err {
            LinuxBuildError::CompileFailed { output, .. } => {
                assert!(output.contains("@opts.c"), "{output}")
            }
            other => panic!("{other}"),
        }
        assert!(!marker.exists(), "gcc ran the wrapper");
    }

    #[test]
    fn include_of_dev_zero_and_of_a_fifo_are_stopped() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(
            src.join("main.c"),
            "#include \"/dev/zero\"\nint main(void){return 0;}\n",
        )
        .unwrap();
        let bin = t.0.join("init");
        let err = compile_c(&src, &bin, Duration::from_secs(100)).unwrap_err();
        assert!(
            matches!(err, LinuxBuildError::CompileFailed { .. }),
            "{err}"
        );
        fs::write(
            src.join("main.c"),
            "#include \"pipe.h\"\nint main(void){return 0;}\n",
        )
        .unwrap();
        let c = std::ffi::CString::new(src.join("pipe.h").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path alive for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let started = std::time::Instant::now();
        let err = compile_c(&src, &bin, Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("did not finish within 2"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(!bin.exists());
    }

    #[test]
    fn static_binary_is_packed_verbatim() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        let c = t.0.join("hello.c");
        fs::write(
            &c,
            "#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n",
        )
        .unwrap();
        let bin = src.join("hello");
        gcc(&[
            "-static",
            "-O2",
            "-o",
            bin.to_str().unwrap(),
            c.to_str().unwrap(),
        ]);
        // Non-executable data and a script are ignored.
        fs::write(src.join("data.txt"), "data").unwrap();
        fs::write(src.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        let out = t.0.join("initrd.gz");
        let info = build_initramfs(&src, LinuxLang::Binary, &out).unwrap();
        let ents = read_initramfs(&out);
        check_skeleton(&ents);
        let want = fs::read(&bin).unwrap();
        assert_eq!(ents["init"].data, want);
        assert_eq!(info.init_size, want.len() as u64);
        assert!(info.log.contains("hello"), "{}", info.log);
    }

    /// The loader execs /ember/init with its argv and environment. Only with
    /// an empty list: finit_module must not run on the host. Needs root for
    /// chroot (skipped otherwise).
    #[test]
    fn modload_execs_the_program_behind_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipping the modload run: not root (chroot)");
            return;
        }
        let chroot = ["/usr/sbin/chroot", "/sbin/chroot", "/usr/bin/chroot"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("chroot (coreutils) not found");
        let t = TempDir::new();
        let root = t.0.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("ember")).unwrap();
        fs::write(root.join("init"), MODLOAD).unwrap();
        fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("etc/ember-modules"), "# nothing to load\n\n").unwrap();
        let c = t.0.join("p.c");
        fs::write(
            &c,
            "#include <stdio.h>\n#include <stdlib.h>\n\
             int main(int c,char**v){for(int i=0;i<c;i++)printf(\"%s|\",v[i]);\
             printf(\"%s\\n\",getenv(\"K\"));return 3;}\n",
        )
        .unwrap();
        let prog = root.join("ember/init");
        gcc(&["-static", "-o", prog.to_str().unwrap(), c.to_str().unwrap()]);
        let out = Command::new(chroot)
            .arg(&root)
            .args(["/init", "a", "b c"])
            .env_clear()
            .env("K", "v")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/init|a|b c|v\n");
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Without the program: a clear message, exit 127.
        fs::remove_file(&prog).unwrap();
        let out = Command::new("chroot")
            .arg(&root)
            .arg("/init")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(127));
        assert!(String::from_utf8_lossy(&out.stderr).contains("exec /ember/init"));
    }

    #[test]
    fn binary_image_carries_the_kernel_modules_and_their_list() {
        use std::io::Write;
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        let c = t.0.join("hello.c");
        fs::write(&c, "int main(void){return 0;}\n").unwrap();
        let bin = src.join("app");
        gcc(&["-static", "-o", bin.to_str().unwrap(), c.to_str().unwrap()]);
        let dir = t.0.join("lib/modules/1.0");
        fs::create_dir_all(dir.join("kernel/v")).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/v/virtio_mmio.ko.gz: kernel/v/virtio.ko\nkernel/v/virtio.ko:\n",
        )
        .unwrap();
        fs::write(dir.join("kernel/v/virtio.ko"), "virtio").unwrap();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(b"mmio").unwrap();
        fs::write(dir.join("kernel/v/virtio_mmio.ko.gz"), gz.finish().unwrap()).unwrap();
        let closure = kmod::closure_for("1.0", &t.0, &["virtio_mmio"]).unwrap();
        let out = t.0.join("initrd.gz");
        build_initramfs_with_modules(&src, LinuxLang::Binary, &out, Some(&closure)).unwrap();
        let ents = read_initramfs(&out);
        // The skeleton and /init (7), seven directories, the program, two
        // modules, the list.
        assert_eq!(ents.len(), 18, "{:?}", ents.keys().collect::<Vec<_>>());
        assert_eq!(ents["dev/console"].rdev, (5, 1));
        // /init is the loader; the program is behind it.
        assert_eq!(ents["init"].data, MODLOAD);
        assert_eq!(ents["init"].mode, 0o100755);
        assert_eq!(ents["ember/init"].data, fs::read(&bin).unwrap());
        assert_eq!(ents["ember/init"].mode, 0o100755);
        assert_eq!(ents["lib/modules/1.0/kernel/v/virtio.ko"].data, b"virtio");
        assert_eq!(
            ents["lib/modules/1.0/kernel/v/virtio_mmio.ko"].data,
            b"mmio"
        );
        assert_eq!(ents["lib/modules/1.0/kernel/v/virtio.ko"].mode, 0o100644);
        for d in [
            "etc",
            "ember",
            "lib",
            "lib/modules",
            "lib/modules/1.0/kernel/v",
        ] {
            assert_eq!(ents[d].mode, 0o040755, "{d}");
        }
        assert_eq!(
            String::from_utf8_lossy(&ents["etc/ember-modules"].data),
            "/lib/modules/1.0/kernel/v/virtio.ko\n/lib/modules/1.0/kernel/v/virtio_mmio.ko\n"
        );
    }

    #[test]
    fn binary_in_single_subdir_and_app_preferred() {
        let t = TempDir::new();
        let src = t.0.join("src");
        let sub = src.join("myapp");
        fs::create_dir_all(&sub).unwrap();
        let c = t.0.join("x.c");
        fs::write(&c, "int main(void){return 0;}\n").unwrap();
        gcc(&[
            "-static",
            "-o",
            sub.join("app").to_str().unwrap(),
            c.to_str().unwrap(),
        ]);
        fs::copy(sub.join("app"), sub.join("tool")).unwrap();
        let out = t.0.join("initrd.gz");
        let info = build_initramfs(&src, LinuxLang::Binary, &out).unwrap();
        assert_eq!(info.log, "/init is app");
        fs::rename(sub.join("app"), sub.join("other")).unwrap();
        let err = build_initramfs(&src, LinuxLang::Binary, &out).unwrap_err();
        assert!(matches!(err, LinuxBuildError::Ambiguous(_)), "{err}");
        assert!(err.to_string().contains("other, tool"), "{err}");
    }

    #[test]
    fn dynamic_elf_refused() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        let c = t.0.join("x.c");
        fs::write(&c, "int main(void){return 0;}\n").unwrap();
        gcc(&["-o", src.join("app").to_str().unwrap(), c.to_str().unwrap()]);
        let out = t.0.join("initrd.gz");
        let err = build_initramfs(&src, LinuxLang::Binary, &out).unwrap_err();
        match &err {
            LinuxBuildError::Dynamic { interp, .. } => {
                assert!(interp.contains("ld-linux"), "{interp}")
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("statically"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn no_elf_refused() {
        let t = TempDir::new();
        let out = t.0.join("initrd.gz");
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        let err = build_initramfs(&src, LinuxLang::Binary, &out).unwrap_err();
        assert!(matches!(err, LinuxBuildError::NoElf(_)), "{err}");
        fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(src.join("tiny"), "\x7fEL").unwrap();
        let err = build_initramfs(&src, LinuxLang::Binary, &out).unwrap_err();
        assert!(matches!(err, LinuxBuildError::NoElf(_)), "{err}");
        assert!(err.to_string().contains("run.sh"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn bad_elves_refused() {
        let t = TempDir::new();
        let f = t.0.join("elf");
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 1; // 32-bit
        fs::write(&f, &hdr).unwrap();
        let err = check_static_elf(&f, "elf").unwrap_err();
        assert!(err.to_string().contains("64-bit"), "{err}");
        hdr[4] = 2;
        hdr[5] = 1;
        hdr[16] = 2;
        hdr[18] = 183; // aarch64
        fs::write(&f, &hdr).unwrap();
        let err = check_static_elf(&f, "elf").unwrap_err();
        assert!(err.to_string().contains("x86_64"), "{err}");
        hdr[18] = 62;
        // Program headers far beyond the end of the file.
        hdr[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        hdr[54] = 56;
        hdr[56] = 2;
        fs::write(&f, &hdr).unwrap();
        assert!(matches!(
            check_static_elf(&f, "elf"),
            Err(LinuxBuildError::BadElf { .. })
        ));
        // Truncated header.
        fs::write(&f, &hdr[..20]).unwrap();
        assert!(matches!(
            check_static_elf(&f, "elf"),
            Err(LinuxBuildError::BadElf { .. })
        ));
    }

    #[test]
    fn kernel_lookup_order() {
        let t = TempDir::new();
        let boot = t.0.join("boot");
        fs::create_dir_all(&boot).unwrap();
        let own = t.0.join("own/vmlinuz");
        assert_eq!(find_kernel_in(None, &own, &boot), None);
        for v in ["6.9.12-3-amd64", "6.10.0-1-amd64", "6.1.0-9-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{v}")), "k").unwrap();
        }
        fs::write(boot.join("config-7.0.0"), "c").unwrap();
        assert_eq!(
            find_kernel_in(None, &own, &boot),
            Some(boot.join("vmlinuz-6.10.0-1-amd64"))
        );
        fs::create_dir_all(own.parent().unwrap()).unwrap();
        fs::write(&own, "k").unwrap();
        assert_eq!(find_kernel_in(None, &own, &boot), Some(own.clone()));
        let env = t.0.join("env-kernel");
        assert_eq!(
            find_kernel_in(Some(env.clone()), &own, &boot),
            Some(own.clone())
        );
        fs::write(&env, "k").unwrap();
        assert_eq!(find_kernel_in(Some(env.clone()), &own, &boot), Some(env));
    }

    #[test]
    fn version_ordering() {
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-10", "6.1.0-9"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0", "6.1.0"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
        assert_eq!(version_cmp("06.1", "6.1"), Ordering::Equal);
    }
}
