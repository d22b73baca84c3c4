//! Reading an ext4 image (an instance's root filesystem) back into a
//! directory tree without mounting it: [`extract`].
//!
//! ## How
//!
//! `debugfs` (e2fsprogs) opens the image read-only. Its `rdump` command
//! copies a tree out, but it trusts the names it reads: it makes host paths
//! as `<dest>/<name>`, creates directories with `mkdir`, symlinks with
//! `symlink` (targets verbatim, never followed) and regular files with
//! `open(O_CREAT|O_TRUNC)`, which *does* follow a symlink already at that
//! path. An image with two entries of one name in a directory (a symlink
//! `x -> /etc/passwd`, then a file `x`), a name holding a `/` (`../x`, only
//! a hand-made image has one), an empty name (rdump then writes the next
//! level into the same directory) or a NUL byte (rdump cuts the name there)
//! makes a plain rdump write outside its destination; a directory linked
//! into itself makes it recurse until paths are too long. A guest can write
//! such an image, so [`extract`] first lists the whole tree and refuses it
//! ([`Ext4Error::Unsafe`]) unless every name is non-empty, has no `/` or
//! NUL, is unique in its directory, `.`/`..` are directories, and every
//! directory is reached once. With those rules, every path rdump makes is
//! new when it makes it, and lies below the destination.
//!
//! The listing is one debugfs run per tree level with `ls -l` and `ls -p`
//! of each directory. `ls -l` escapes bytes in names (`\xNN` in e2fsprogs
//! 1.47, `M-`/`^` notation in older versions; both are understood) except
//! in a directory's first two entries; `ls -p` prints names raw. A name
//! with a newline could fake listing lines in either, but not in both at
//! once: the raw `ls -p` text must equal, byte for byte, what the parsed
//! `ls -l` entries predict, or the directory is refused. Names with
//! newlines in them are thus read exactly; so is every other byte.
//!
//! Then each entry of the root directory is dumped with
//! `rdump <inode> <staging>` (the staging directory is `out/lost+found`,
//! the one name that cannot collide, see below) and renamed into place.
//! This does not depend on what `rdump /` does with the root: e2fsprogs
//! 1.47 dumps the root's entries straight into the destination (and gives
//! the destination the root's owner, mode and times), while older versions
//! (by their source) try `mkdir("<dest>/")` and fail.
//!
//! The image must not change while `extract` runs (stop or pause the VM
//! first): the checks hold for the image as listed.
//!
//! ## Bounded, and sandboxed
//!
//! An image can claim files far larger than itself (a 16 MiB disk can hold
//! an inode of 2 GiB, all holes, that rdump writes out in full). Before
//! anything is dumped, the sizes `ls -l` lists for regular files are added
//! up per name (rdump writes a copy per name) and the image is refused
//! ([`Ext4Error::OverBudget`]) when they exceed the byte budget: the image's
//! own size for [`extract`], the caller's for [`extract_with_budget`].
//!
//! Every debugfs run is a [`crate::sandbox`] job: the image bound read-only
//! at `/image`, `out` at `/out` (the working directory), its own uid with
//! only `CAP_DAC_OVERRIDE` (images and trees have any owner), no network,
//! and limits: `RLIMIT_FSIZE` at the budget, the output directory at the
//! budget plus a block per entry, [`DEBUGFS_TIMEOUT`]. emberd restores
//! owners, modes and times afterwards, when nothing of the job runs any
//! more.
//!
//! ## What is kept
//!
//! * Directories, regular files (content, permission bits including
//!   setuid/setgid/sticky, which rdump drops and `extract` restores),
//!   symlinks (target bytes as stored).
//! * Owner and group of everything, symlinks included, when running as root
//!   (rdump leaves symlinks to the caller); otherwise whatever the caller
//!   may set.
//! * Modification times: seconds for files and directories (rdump uses
//!   `utime`), to the nanosecond for symlinks and the root (read with
//!   `idump`), which rdump does not set.
//! * Hard links between regular files (rdump writes each name as its own
//!   copy; `extract` links them again).
//! * `out` itself gets the root directory's owner, mode and times.
//!
//! Left out: the root's `lost+found`, whatever its kind (mkfs makes it; it
//! is not part of the container's tree), devices, FIFOs and sockets (rdump
//! skips them; they are counted in [`ExtractStats::skipped`]), extended
//! attributes, ACLs and file capabilities (rdump has none of them).
//!
//! ## Source files
//!
//! This file holds [`extract`], the errors and the debugfs runner;
//! `listing.rs` lists and checks the tree, `dump.rs` dumps it and restores
//! what rdump leaves out.

mod dump;
mod listing;

use dump::dump;
use listing::walk;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::images::volumes;

/// Inode number of the root directory.
const ROOT_INO: u32 = 2;
/// mkfs's directory in the root; left out, and reused as the staging name.
const LOST_FOUND: &str = "lost+found";
/// Most stdout bytes read from one debugfs run.
const MAX_OUTPUT: u64 = 512 << 20;
/// Most stderr bytes kept from one debugfs run.
const MAX_STDERR: usize = 64 << 10;
/// Wall-clock limit of one debugfs run (dumping a large image takes
/// minutes).
pub const DEBUGFS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Where the image is inside the debugfs job.
const IMAGE: &str = "/image";
/// Longest debugfs error text put in an [`Ext4Error`].
const MAX_ERROR_TEXT: usize = 2048;
/// Superblock: offset in the image, and of the fields read.
const SB_OFFSET: u64 = 1024;
const SB_MAGIC: usize = 56;
const SB_REV_LEVEL: usize = 76;
const SB_INODE_SIZE: usize = 88;
const EXT_MAGIC: u16 = 0xEF53;
/// The classic inode size; larger inodes have the `_extra` fields.
const GOOD_OLD_INODE_SIZE: usize = 128;

/// Why an image could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// debugfs is not installed.
    #[error("debugfs not found in PATH, /usr/sbin or /sbin: install the package `e2fsprogs` (apt-get install -y e2fsprogs)")]
    ToolMissing,
    /// A host file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file has no ext2/3/4 superblock.
    #[error("{} is not an ext4 filesystem image", .0.display())]
    NotExt4(PathBuf),
    /// `out` exists and is not a directory (a symlink is not one).
    #[error("{} is not a directory", .0.display())]
    OutNotDir(PathBuf),
    /// `out` is a directory with something in it.
    #[error("{} is not empty (extract needs a new or empty directory)", .0.display())]
    OutNotEmpty(PathBuf),
    /// The image holds an entry that could make debugfs write outside
    /// `out`, or that cannot be listed unambiguously.
    #[error("cannot extract the image safely: {path:?} {why}")]
    Unsafe { path: String, why: &'static str },
    /// More entries, or longer paths, than extract handles.
    #[error("image too large to extract: {0}")]
    TooLarge(String),
    /// debugfs failed, reported errors, or printed something unexpected.
    #[error("debugfs {step}: {detail}")]
    Debugfs { step: &'static str, detail: String },
    /// The files of the image add up to more than the budget.
    #[error("the image's files add up to {needed} bytes, more than the {budget} bytes allowed for extracting it (sparse files count in full)")]
    OverBudget { needed: u64, budget: u64 },
    /// The debugfs job could not run.
    #[error("debugfs sandbox: {0}")]
    Sandbox(Box<crate::sandbox::SandboxError>),
}

impl From<crate::sandbox::SandboxError> for Ext4Error {
    fn from(e: crate::sandbox::SandboxError) -> Self {
        Ext4Error::Sandbox(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Ext4Error + '_ {
    move |source| Ext4Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsafe_entry(rel: &Path, why: &'static str) -> Ext4Error {
    Ext4Error::Unsafe {
        path: format!("/{}", rel.to_string_lossy()),
        why,
    }
}

fn debugfs_err(step: &'static str, detail: impl Into<String>) -> Ext4Error {
    Ext4Error::Debugfs {
        step,
        detail: bounded(&detail.into()),
    }
}

/// What [`extract`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Regular files (each name of a hard-linked file counts).
    pub files: u64,
    /// Directories below the root.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Devices, FIFOs and sockets, which are not extracted.
    pub skipped: u64,
}

/// Copies the tree of the ext4 image `image` into `out`, which must not
/// exist (it is created, mode 0700 until it gets the root's mode) or be an
/// empty directory. See the module documentation for what is kept and how
/// names from the image are checked. On error, what was written below
/// `out` is removed (and `out` too when `extract` created it). The files
/// may add up to the image's size (see the module docs).
pub fn extract(image: &Path, out: &Path) -> Result<ExtractStats, Ext4Error> {
    let budget = image_bytes(image)?;
    extract_with(volumes::find_tool("debugfs"), image, out, budget)
}

/// [`extract`] with the files allowed to add up to `budget` bytes.
pub fn extract_with_budget(
    image: &Path,
    out: &Path,
    budget: u64,
) -> Result<ExtractStats, Ext4Error> {
    extract_with(volumes::find_tool("debugfs"), image, out, budget)
}

/// The size of an image file or block device.
fn image_bytes(image: &Path) -> Result<u64, Ext4Error> {
    use std::io::Seek;
    let mut f = File::open(image).map_err(io_err(image))?;
    f.seek(io::SeekFrom::End(0)).map_err(io_err(image))
}

fn extract_with(
    debugfs: Option<PathBuf>,
    image: &Path,
    out: &Path,
    budget: u64,
) -> Result<ExtractStats, Ext4Error> {
    let tool = debugfs.ok_or(Ext4Error::ToolMissing)?;
    let inode_size = read_superblock(image)?;
    let image = fs::canonicalize(image).map_err(io_err(image))?;
    let created = prepare_out(out)?;
    let dbg = Debugfs {
        tool,
        image,
        budget,
    };
    let res = walk(&dbg, out).and_then(|tree| {
        if tree.file_bytes > budget {
            return Err(Ext4Error::OverBudget {
                needed: tree.file_bytes,
                budget,
            });
        }
        dump(&dbg, out, &tree, inode_size)
    });
    if res.is_err() {
        clear(out, created);
    }
    res
}

/// Checks the ext superblock magic; returns the inode size.
fn read_superblock(image: &Path) -> Result<usize, Ext4Error> {
    let f = File::open(image).map_err(io_err(image))?;
    let md = f.metadata().map_err(io_err(image))?;
    if !md.is_file() && !md.file_type().is_block_device() {
        return Err(Ext4Error::NotExt4(image.to_path_buf()));
    }
    let mut sb = [0u8; 1024];
    match f.read_exact_at(&mut sb, SB_OFFSET) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(Ext4Error::NotExt4(image.to_path_buf()))
        }
        Err(e) => return Err(io_err(image)(e)),
    }
    if le16(&sb, SB_MAGIC) != Some(EXT_MAGIC) {
        return Err(Ext4Error::NotExt4(image.to_path_buf()));
    }
    let size = if le32(&sb, SB_REV_LEVEL) == Some(0) {
        GOOD_OLD_INODE_SIZE
    } else {
        usize::from(le16(&sb, SB_INODE_SIZE).unwrap_or(0))
    };
    if !(GOOD_OLD_INODE_SIZE..=65536).contains(&size) || !size.is_power_of_two() {
        return Err(Ext4Error::NotExt4(image.to_path_buf()));
    }
    Ok(size)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Makes sure `out` is a new or empty directory; true when it was created.
fn prepare_out(out: &Path) -> Result<bool, Ext4Error> {
    match fs::symlink_metadata(out) {
        Ok(md) if !md.is_dir() => Err(Ext4Error::OutNotDir(out.to_path_buf())),
        Ok(_) => {
            let mut rd = fs::read_dir(out).map_err(io_err(out))?;
            if rd.next().is_some() {
                return Err(Ext4Error::OutNotEmpty(out.to_path_buf()));
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(out)
                .map_err(io_err(out))?;
            Ok(true)
        }
        Err(e) => Err(io_err(out)(e)),
    }
}

/// Removes what a failed extraction left.
fn clear(out: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(out);
        return;
    }
    if let Ok(rd) = fs::read_dir(out) {
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    let _ = fs::remove_dir_all(&p);
                }
                _ => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }
}

/// Cuts debugfs text to [`MAX_ERROR_TEXT`], control characters replaced.
fn bounded(text: &str) -> String {
    let t: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect();
    if t.len() <= MAX_ERROR_TEXT {
        return t;
    }
    let mut cut = MAX_ERROR_TEXT;
    while !t.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} more bytes)", &t[..cut], t.len() - cut)
}

// ---------------------------------------------------------------------------
// Running debugfs

struct Debugfs {
    tool: PathBuf,
    image: PathBuf,
    /// Most bytes one run may write (files and, with a block per entry,
    /// directories).
    budget: u64,
}

/// The stdout lines of each command of one run.
type Sections = Vec<Vec<Vec<u8>>>;

impl Debugfs {
    /// Runs `cmds` in one read-only debugfs session, as a sandbox job with
    /// `cwd` as its `/out` and working directory, and returns each
    /// command's output lines. Anything on stderr but the version banner
    /// (and failed `chown`s when not root) is an error.
    fn run(&self, step: &'static str, cmds: &[String], cwd: &Path) -> Result<Sections, Ext4Error> {
        use crate::sandbox::{Job, Status};
        let script: Vec<u8> = cmds
            .iter()
            .flat_map(|c| format!("{c}\n").into_bytes())
            .collect();
        let job = Job::new(&self.tool)?;
        let mut l = job.current_limits();
        l.timeout = DEBUGFS_TIMEOUT;
        l.max_log_bytes = MAX_OUTPUT as usize;
        l.max_file_bytes = self.budget.max(1);
        // Directories and staging entries on top of the files.
        l.max_output_bytes = self
            .budget
            .saturating_add(4096 * (listing::MAX_ENTRIES as u64 + 1))
            .max(1 << 20);
        let run = job
            .limits(l)
            .read_any(true)
            .ro(&self.image, IMAGE)
            .output_dir(cwd)
            .env("DEBUGFS_PAGER", "__none__")
            .args(["-f", "-", IMAGE])
            .stdin(script)
            .run()?;
        if run.stdout.len() >= MAX_OUTPUT as usize {
            return Err(Ext4Error::TooLarge(format!(
                "debugfs {step} printed more than {MAX_OUTPUT} bytes"
            )));
        }
        let stderr = &run.stderr[..run.stderr.len().min(MAX_STDERR)];
        let problems = error_lines(stderr);
        if !problems.is_empty() {
            return Err(debugfs_err(step, problems));
        }
        if run.status != Status::Exited(0) {
            return Err(debugfs_err(step, run.describe()));
        }
        sections(&run.stdout, cmds).ok_or_else(|| {
            debugfs_err(
                step,
                "unexpected output (the command echo lines do not match the commands)",
            )
        })
    }
}

/// The stderr lines that report a problem.
fn error_lines(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        // The banner, "debugfs 1.47.0 (5-Feb-2023)".
        .filter(|l| {
            !l.strip_prefix("debugfs ")
                .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
        // rdump's chown when not root; ownership is checked afterwards.
        .filter(|l| !l.contains("while changing ownership of"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits debugfs stdout at the `debugfs: <command>` echo lines. They must
/// be exactly `cmds`, in order: a name that fakes one adds one too many.
fn sections(out: &[u8], cmds: &[String]) -> Option<Sections> {
    let mut secs: Sections = Vec::new();
    let body = out.strip_suffix(b"\n").unwrap_or(out);
    for line in body.split(|b| *b == b'\n') {
        if let Some(cmd) = line.strip_prefix(b"debugfs: ") {
            if cmds.get(secs.len())?.as_bytes() != cmd {
                return None;
            }
            secs.push(Vec::new());
        } else {
            secs.last_mut()?.push(line.to_vec());
        }
    }
    (secs.len() == cmds.len()).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::dump::set_times;
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::{CString, OsStr};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::process::Command;

    use crate::test_util::TempDir;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// `mkfs.ext4 -q -F [extra] -d <dir> <img> <size>`.
    fn mkfs(dir: &Path, img: &Path, size: &str, extra: &[&str]) {
        let tool = volumes::find_tool("mkfs.ext4").expect(
            "mkfs.ext4 not found: these tests need e2fsprogs (apt-get install -y e2fsprogs)",
        );
        let out = Command::new(tool)
            .args(["-q", "-F"])
            .args(extra)
            .arg("-d")
            .arg(dir)
            .arg(img)
            .arg(size)
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
    }

    /// Runs a debugfs request that changes `img`.
    fn debugfs_w(img: &Path, req: &str) {
        let tool = volumes::find_tool("debugfs").expect("debugfs (e2fsprogs) is needed");
        let out = Command::new(tool)
            .args(["-w", "-R", req])
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs {req}: {out:?}");
    }

    /// Replaces the one occurrence of `from` in the image by `to` (same
    /// length): a hand-made directory entry.
    fn patch(img: &Path, from: &[u8], to: &[u8]) {
        assert_eq!(from.len(), to.len());
        let mut data = fs::read(img).unwrap();
        let at: Vec<usize> = data
            .windows(from.len())
            .enumerate()
            .filter(|(_, w)| *w == from)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "{:?} should be in the image once", from);
        data[at[0]..at[0] + to.len()].copy_from_slice(to);
        fs::write(img, data).unwrap();
    }

    fn write(p: &Path, data: &[u8], mode: u32) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mtime(p: &Path, secs: i64) {
        let t = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: 0,
        };
        set_times(p, &[t, t]).unwrap();
    }

    fn path(b: &[u8]) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(b))
    }

    /// What the comparison looks at, per path.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        kind: &'static str,
        mode: u32,
        owner: (u32, u32),
        mtime: i64,
        data: Vec<u8>,
    }

    /// Every entry below `root` except special files.
    fn tree(root: &Path) -> BTreeMap<PathBuf, Seen> {
        let mut m = BTreeMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let r = rel.join(e.file_name());
                let p = root.join(&r);
                let md = fs::symlink_metadata(&p).unwrap();
                let ft = md.file_type();
                let (kind, data) = if ft.is_dir() {
                    todo.push(r.clone());
                    ("dir", Vec::new())
                } else if ft.is_symlink() {
                    (
                        "symlink",
                        fs::read_link(&p).unwrap().into_os_string().into_vec(),
                    )
                } else if ft.is_file() {
                    ("file", fs::read(&p).unwrap())
                } else {
                    continue;
                };
                let mode = if ft.is_symlink() {
                    0
                } else {
                    md.mode() & 0o7777
                };
                m.insert(
                    r,
                    Seen {
                        kind,
                        mode,
                        owner: (md.uid(), md.gid()),
                        mtime: md.mtime(),
                        data,
                    },
                );
            }
        }
        m
    }

    use std::os::unix::ffi::OsStringExt;

    /// Deterministic pseudo-random bytes.
    fn noise(n: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn mkfifo(p: &Path) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path alive for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn extracts_everything_rdump_can_carry() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir(&src).unwrap();
        write(&src.join("a/b/c/deep.txt"), b"deep\n", 0o644);
        write(&src.join("empty"), b"", 0o644);
        write(&src.join("exec.sh"), b"#!/bin/sh\necho hi\n", 0o755);
        write(&src.join("secret"), b"s3cr3t", 0o600);
        write(&src.join("suid"), b"x", 0o4755);
        write(&src.join("name with spaces"), b"spaces", 0o644);
        write(&src.join("nl\nname"), b"newline", 0o644);
        write(&src.join("ünïcödé"), b"utf8", 0o644);
        write(&src.join(path(b"bin\xff\x01name")), b"bytes", 0o644);
        write(&src.join(path(b"back\\x41slash")), b"backslash", 0o644);
        let big = noise(3 * 1024 * 1024 + 123);
        write(&src.join("big.bin"), &big, 0o644);
        fs::hard_link(src.join("exec.sh"), src.join("a/hard")).unwrap();
        symlink("a/b/c/deep.txt", src.join("rel-link")).unwrap();
        symlink("/etc/hostname", src.join("abs-link")).unwrap();
        symlink("../nowhere/at/all", src.join("a/dangling")).unwrap();
        let long_target = "x/".repeat(100) + "end";
        symlink(&long_target, src.join("slow-link")).unwrap();
        fs::create_dir(src.join("sticky")).unwrap();
        fs::set_permissions(src.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::create_dir(src.join("private")).unwrap();
        write(&src.join("private/inside"), b"in", 0o640);
        fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o2750)).unwrap();
        mkfifo(&src.join("fifo"));
        let mut specials = 1;
        if is_root() {
            let c = CString::new(src.join("a/null").as_os_str().as_bytes()).unwrap();
            // SAFETY: `c` is a NUL-terminated path alive for the call.
            let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
            assert_eq!(r, 0);
            specials += 1;
            for p in ["secret", "private", "private/inside"] {
                std::os::unix::fs::lchown(src.join(p), Some(1234), Some(5678)).unwrap();
            }
            std::os::unix::fs::lchown(src.join("rel-link"), Some(4321), Some(8765)).unwrap();
            // Above 2^31: ls -l prints them negative.
            std::os::unix::fs::lchown(src.join("empty"), Some(3_000_000_000), Some(70000)).unwrap();
        }
        // Times last, children before their directories.
        let all: Vec<PathBuf> = tree(&src).into_keys().collect();
        for (k, rel) in all.iter().rev().enumerate() {
            mtime(&src.join(rel), 1_000_000_000 + 1000 * k as i64);
        }

        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "32M", &[]);
        // mkfs makes the root 0755 root:root; give it something to carry.
        debugfs_w(&img, "sif <2> mode 040751");
        debugfs_w(&img, "sif <2> uid 77");
        debugfs_w(&img, "sif <2> mtime @1500000000");
        debugfs_w(&img, "sif <2> mtime_extra 4000");
        let out = t.0.join("out");
        let stats = extract(&img, &out).unwrap();
        assert_eq!(
            stats,
            ExtractStats {
                files: 13,
                dirs: 5,
                symlinks: 4,
                skipped: specials,
            }
        );
        assert!(!out.join("lost+found").exists());
        let want = tree(&src);
        let got = tree(&out);
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        for (rel, w) in &want {
            let g = &got[rel];
            assert_eq!(g.kind, w.kind, "{rel:?}");
            assert_eq!(g.mode, w.mode, "{rel:?} mode");
            assert_eq!(g.mtime, w.mtime, "{rel:?} mtime");
            assert!(g.data == w.data, "{rel:?} content");
            if is_root() {
                assert_eq!(g.owner, w.owner, "{rel:?} owner");
            }
        }
        assert_eq!(fs::read(out.join("big.bin")).unwrap(), big);
        assert_eq!(
            fs::read_link(out.join("slow-link")).unwrap(),
            PathBuf::from(&long_target)
        );
        // A hard link again, not two copies.
        let (a, b) = (
            fs::metadata(out.join("exec.sh")).unwrap(),
            fs::metadata(out.join("a/hard")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        // The root's mode, owner and times went to out.
        let root = fs::metadata(&out).unwrap();
        assert_eq!(root.mode() & 0o7777, 0o751);
        assert_eq!((root.mtime(), root.mtime_nsec()), (1_500_000_000, 1000));
        if is_root() {
            assert_eq!(root.uid(), 77);
        }
    }

    /// A 16 MiB image whose file claims 2 GiB (all holes): refused before
    /// rdump writes anything.
    #[test]
    fn files_larger_than_the_budget_are_refused() {
        let t = TempDir::new();
        let src = t.0.join("src");
        write(&src.join("small"), b"tiny", 0o644);
        write(&src.join("d/f"), b"x", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "16M", &[]);
        debugfs_w(&img, "sif /small size 2147483648");
        let out = t.0.join("out");
        let e = extract(&img, &out).unwrap_err();
        match &e {
            Ext4Error::OverBudget { needed, budget } => {
                assert_eq!((*needed, *budget), ((2u64 << 30) + 1, 16 << 20), "{e}")
            }
            other => panic!("expected OverBudget, got {other}"),
        }
        assert!(
            e.to_string().contains("more than the 16777216 bytes"),
            "{e}"
        );
        assert!(!out.exists(), "out is removed again");
        // Hard links count per name: rdump writes a copy for each.
        let src2 = t.0.join("src2");
        write(&src2.join("a"), &vec![7u8; 300_000], 0o644);
        for i in 0..4 {
            fs::hard_link(src2.join("a"), src2.join(format!("l{i}"))).unwrap();
        }
        let img2 = t.0.join("links.ext4");
        mkfs(&src2, &img2, "8M", &[]);
        let e = extract_with_budget(&img2, &t.0.join("out2"), 1_000_000).unwrap_err();
        assert!(
            matches!(
                e,
                Ext4Error::OverBudget {
                    needed: 1_500_000,
                    ..
                }
            ),
            "{e}"
        );
        let s = extract_with_budget(&img2, &t.0.join("out3"), 1_500_000).unwrap();
        assert_eq!(s.files, 5);
    }

    #[test]
    fn out_may_exist_empty() {
        let t = TempDir::new();
        let src = t.0.join("src");
        write(&src.join("f"), b"f", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &[]);
        let out = t.0.join("out");
        fs::create_dir(&out).unwrap();
        let s = extract(&img, &out).unwrap();
        assert_eq!((s.files, s.dirs, s.symlinks, s.skipped), (1, 0, 0, 0));
        assert_eq!(fs::read(out.join("f")).unwrap(), b"f");
        // An image with nothing but lost+found.
        let empty = t.0.join("empty");
        fs::create_dir(&empty).unwrap();
        mkfs(&empty, &img, "8M", &[]);
        let out2 = t.0.join("out2");
        assert_eq!(extract(&img, &out2).unwrap(), ExtractStats::default());
        assert_eq!(fs::read_dir(&out2).unwrap().count(), 0);
    }

    /// Symlinks pointing out of the tree are made, never followed.
    #[test]
    fn symlinks_out_of_the_tree_are_not_followed() {
        let t = TempDir::new();
        let outside = TempDir::new();
        let victim = outside.0.join("victim");
        let outdir = outside.0.join("dir");
        fs::create_dir(&outdir).unwrap();
        let src = t.0.join("src");
        fs::create_dir(&src).unwrap();
        symlink(&victim, src.join("escape")).unwrap();
        symlink(&outdir, src.join("dlink")).unwrap();
        symlink("../../../../../../../..", src.join("up")).unwrap();
        write(&src.join("d/f"), b"data", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &[]);
        let out = t.0.join("out");
        extract(&img, &out).unwrap();
        assert_eq!(fs::read_link(out.join("escape")).unwrap(), victim);
        assert_eq!(fs::read_link(out.join("dlink")).unwrap(), outdir);
        assert_eq!(
            fs::read_link(out.join("up")).unwrap(),
            PathBuf::from("../../../../../../../..")
        );
        assert!(fs::symlink_metadata(&victim).is_err());
        assert_eq!(fs::read_dir(&outdir).unwrap().count(), 0);
        assert_eq!(fs::read_dir(&outside.0).unwrap().count(), 1);
    }

    /// A hand-made image with a symlink `dupnameAAAA -> <outside>/victim`
    /// and a file of the same name: a plain rdump writes the file's content
    /// through the symlink.
    #[test]
    fn duplicate_names_are_refused() {
        let t = TempDir::new();
        let outside = TempDir::new();
        let victim = outside.0.join("victim");
        let src = t.0.join("src");
        fs::create_dir(&src).unwrap();
        symlink(&victim, src.join("dupnameAAAA")).unwrap();
        write(&src.join("dupnameBBBB"), b"PWNED\n", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &["-O", "^metadata_csum"]);
        patch(&img, b"dupnameBBBB", b"dupnameAAAA");
        let out = t.0.join("out");
        let e = extract(&img, &out).unwrap_err();
        assert!(
            matches!(e, Ext4Error::Unsafe { ref path, .. } if path == "/dupnameAAAA"),
            "{e}"
        );
        assert!(e.to_string().contains("appears twice"), "{e}");
        assert!(fs::symlink_metadata(&victim).is_err());
        assert!(!out.exists(), "out is removed again");
    }

    /// A hand-made name `../pwned`: a plain rdump writes into out's parent.
    #[test]
    fn names_with_a_slash_are_refused() {
        let t = TempDir::new();
        let src = t.0.join("src");
        write(&src.join("d/..Qpwned"), b"pwned\n", 0o644);
        write(&src.join("..Rpwned"), b"pwned\n", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &["-O", "^metadata_csum"]);
        patch(&img, b"..Qpwned", b"../pwned");
        let parent = t.0.join("p");
        fs::create_dir(&parent).unwrap();
        let out = parent.join("out");
        fs::create_dir(&out).unwrap();
        let e = extract(&img, &out).unwrap_err();
        assert!(matches!(e, Ext4Error::Unsafe { .. }), "{e}");
        assert!(e.to_string().contains("'/'"), "{e}");
        assert_eq!(fs::read_dir(&parent).unwrap().count(), 1);
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            0,
            "out is emptied again"
        );
        // The same at the root.
        patch(&img, b"..Rpwned", b"../pwned");
        assert!(matches!(extract(&img, &out), Err(Ext4Error::Unsafe { .. })));
        assert_eq!(fs::read_dir(&parent).unwrap().count(), 1);
    }

    #[test]
    fn directory_loops_and_links_are_refused() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::create_dir_all(src.join("e")).unwrap();
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &[]);
        let looped = t.0.join("loop.ext4");
        fs::copy(&img, &looped).unwrap();
        debugfs_w(&looped, "ln /d /d"); // /d/d is /d
        let e = extract(&looped, &t.0.join("out1")).unwrap_err();
        assert!(
            matches!(e, Ext4Error::Unsafe { ref path, .. } if path == "/d/d"),
            "{e}"
        );
        debugfs_w(&img, "ln /e /e2"); // /e2 is /e
        let e = extract(&img, &t.0.join("out2")).unwrap_err();
        assert!(
            matches!(e, Ext4Error::Unsafe { ref path, .. } if path == "/e2"),
            "{e}"
        );
    }

    #[test]
    fn not_ext4_out_not_empty_and_no_debugfs() {
        let t = TempDir::new();
        let junk = t.0.join("junk.img");
        fs::write(&junk, noise(64 * 1024)).unwrap();
        let out = t.0.join("out");
        let e = extract(&junk, &out).unwrap_err();
        assert!(matches!(e, Ext4Error::NotExt4(_)), "{e}");
        assert!(e.to_string().contains("is not an ext4 filesystem image"));
        assert!(!out.exists());
        let short = t.0.join("short.img");
        fs::write(&short, b"tiny").unwrap();
        assert!(matches!(extract(&short, &out), Err(Ext4Error::NotExt4(_))));
        assert!(matches!(extract(&t.0, &out), Err(Ext4Error::NotExt4(_))));
        assert!(matches!(
            extract(&t.0.join("missing"), &out),
            Err(Ext4Error::Io { .. })
        ));

        let src = t.0.join("src");
        write(&src.join("f"), b"f", 0o644);
        let img = t.0.join("fs.ext4");
        mkfs(&src, &img, "8M", &[]);
        fs::create_dir(&out).unwrap();
        fs::write(out.join("already"), b"x").unwrap();
        let e = extract(&img, &out).unwrap_err();
        assert!(matches!(e, Ext4Error::OutNotEmpty(_)), "{e}");
        assert_eq!(fs::read(out.join("already")).unwrap(), b"x", "left alone");
        let e = extract(&img, &out.join("already")).unwrap_err();
        assert!(matches!(e, Ext4Error::OutNotDir(_)), "{e}");
        let empty = t.0.join("empty");
        fs::create_dir(&empty).unwrap();
        symlink(&empty, t.0.join("link")).unwrap();
        let e = extract(&img, &t.0.join("link")).unwrap_err();
        assert!(matches!(e, Ext4Error::OutNotDir(_)), "{e}");

        let e = extract_with(None, &img, &t.0.join("out3"), 1 << 30).unwrap_err();
        assert!(matches!(e, Ext4Error::ToolMissing));
        assert!(e.to_string().contains("e2fsprogs"), "{e}");
        assert!(!t.0.join("out3").exists());
    }

    pub(super) fn lines(s: &str) -> Vec<Vec<u8>> {
        s.split('\n').map(|l| l.as_bytes().to_vec()).collect()
    }

    #[test]
    fn echo_lines_must_match_the_commands() {
        let cmds = vec!["ls -l <2>".to_string(), "ls -p <2>".to_string()];
        let ok = sections(
            b"debugfs: ls -l <2>\n a\n\ndebugfs: ls -p <2>\n/b\n\n",
            &cmds,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0], lines(" a\n"));
        assert!(sections(
            b"debugfs: ls -l <2>\n a\ndebugfs: ls -p <2>\n/x\ndebugfs: ls -p <2>\n",
            &cmds
        )
        .is_none());
        assert!(sections(b"early\ndebugfs: ls -l <2>\ndebugfs: ls -p <2>\n", &cmds).is_none());
        assert!(sections(b"debugfs: ls -l <2>\n", &cmds).is_none());
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "x".repeat(10_000);
        let b = bounded(&format!("bad\u{1b}[2J {long}"));
        assert!(b.len() < MAX_ERROR_TEXT + 40, "{}", b.len());
        assert!(b.starts_with("bad?[2J xxx"));
        assert!(b.ends_with("more bytes)"));
        assert_eq!(
            error_lines(b"debugfs 1.47.0 (5-Feb-2023)\nrdump: x while changing ownership of y\nrdump: real problem\n"),
            "rdump: real problem"
        );
    }
}
