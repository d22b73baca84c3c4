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

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::images::volumes;

/// Inode number of the root directory.
const ROOT_INO: u32 = 2;
/// mkfs's directory in the root; left out, and reused as the staging name.
const LOST_FOUND: &str = "lost+found";
/// Most entries (files, directories, ...) extracted.
const MAX_ENTRIES: usize = 4 << 20;
/// Most stdout bytes read from one debugfs run.
const MAX_OUTPUT: u64 = 512 << 20;
/// Most stderr bytes kept from one debugfs run.
const MAX_STDERR: u64 = 64 << 10;
/// Longest debugfs error text put in an [`Ext4Error`].
const MAX_ERROR_TEXT: usize = 2048;
/// Longest host path made (below Linux's PATH_MAX of 4096).
const MAX_PATH: usize = 4000;
/// Superblock: offset in the image, and of the fields read.
const SB_OFFSET: u64 = 1024;
const SB_MAGIC: usize = 56;
const SB_REV_LEVEL: usize = 76;
const SB_INODE_SIZE: usize = 88;
const EXT_MAGIC: u16 = 0xEF53;
/// Inode fields (little endian) read from `idump`.
const I_ATIME: usize = 0x08;
const I_MTIME: usize = 0x10;
const I_EXTRA_ISIZE: usize = 0x80;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8c;
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
/// `out` is removed (and `out` too when `extract` created it).
pub fn extract(image: &Path, out: &Path) -> Result<ExtractStats, Ext4Error> {
    extract_with(volumes::find_tool("debugfs"), image, out)
}

fn extract_with(
    debugfs: Option<PathBuf>,
    image: &Path,
    out: &Path,
) -> Result<ExtractStats, Ext4Error> {
    let tool = debugfs.ok_or(Ext4Error::ToolMissing)?;
    let inode_size = read_superblock(image)?;
    // debugfs runs in `out`: it needs an absolute image path.
    let image = fs::canonicalize(image).map_err(io_err(image))?;
    let created = prepare_out(out)?;
    let dbg = Debugfs { tool, image };
    let res = walk(&dbg, out).and_then(|tree| dump(&dbg, out, &tree, inode_size));
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
}

/// The stdout lines of each command of one run.
type Sections = Vec<Vec<Vec<u8>>>;

impl Debugfs {
    /// Runs `cmds` in one read-only debugfs session in the directory `cwd`
    /// and returns each command's output lines. Anything on stderr but the
    /// version banner (and failed `chown`s when not root) is an error.
    fn run(&self, step: &'static str, cmds: &[String], cwd: &Path) -> Result<Sections, Ext4Error> {
        let mut child = Command::new(&self.tool)
            .arg("-f")
            .arg("-")
            .arg(&self.image)
            .current_dir(cwd)
            .env("LC_ALL", "C")
            .env("DEBUGFS_PAGER", "__none__")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(&self.tool))?;
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(debugfs_err(step, "no pipes to debugfs"));
        };
        let script: Vec<u8> = cmds
            .iter()
            .flat_map(|c| format!("{c}\n").into_bytes())
            .collect();
        let writer = std::thread::spawn(move || {
            // debugfs may stop reading early (e.g. the image did not open).
            let _ = stdin.write_all(&script);
        });
        let errors = std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stderr).take(MAX_STDERR).read_to_end(&mut kept);
            let _ = io::copy(&mut stderr, &mut io::sink());
            kept
        });
        let mut out = Vec::new();
        let read = stdout.take(MAX_OUTPUT + 1).read_to_end(&mut out);
        let too_big = out.len() as u64 > MAX_OUTPUT;
        if too_big || read.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().map_err(io_err(&self.tool))?;
        let _ = writer.join();
        let stderr = errors.join().unwrap_or_default();
        read.map_err(io_err(&self.tool))?;
        if too_big {
            return Err(Ext4Error::TooLarge(format!(
                "debugfs {step} printed more than {MAX_OUTPUT} bytes"
            )));
        }
        let problems = error_lines(&stderr);
        if !problems.is_empty() {
            return Err(debugfs_err(step, problems));
        }
        if !status.success() {
            return Err(debugfs_err(step, format!("exited with {status}")));
        }
        sections(&out, cmds).ok_or_else(|| {
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

// ---------------------------------------------------------------------------
// Listing

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Special,
}

impl Kind {
    fn of(mode: u32) -> Kind {
        match mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// One entry of the tree (the root's `lost+found` and `.`/`..` excluded).
struct Node {
    rel: PathBuf,
    ino: u32,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Directories: how many entries extract creates in it.
    children: usize,
}

/// The checked tree, parents before children.
struct Tree {
    nodes: Vec<Node>,
    /// Mode, uid and gid of the root directory.
    root: (u32, u32, u32),
    /// How many of the first `nodes` are the root's entries.
    root_entries: usize,
    /// How many of those are created (not special files).
    root_children: usize,
}

/// One entry of `ls -l`.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    name: Vec<u8>,
}

/// Lists every directory (by inode, level by level) and checks the names.
fn walk(dbg: &Debugfs, out: &Path) -> Result<Tree, Ext4Error> {
    // Longest host prefix: `<out>/lost+found/<inode>/` while dumping.
    let prefix_len = out.as_os_str().len() + LOST_FOUND.len() + 16;
    let mut nodes: Vec<Node> = Vec::new();
    let mut root = None;
    let mut root_entries = 0;
    let mut root_children = 0;
    let mut dirs_seen = HashSet::from([ROOT_INO]);
    // (inode, index in nodes; None for the root)
    let mut level: Vec<(u32, Option<usize>)> = vec![(ROOT_INO, None)];
    while !level.is_empty() {
        let cmds: Vec<String> = level
            .iter()
            .flat_map(|(ino, _)| [format!("ls -l <{ino}>"), format!("ls -p <{ino}>")])
            .collect();
        let secs = dbg.run("ls", &cmds, out)?;
        let mut next = Vec::new();
        for (k, &(dir_ino, parent)) in level.iter().enumerate() {
            let dir_rel = parent.map(|i| nodes[i].rel.clone()).unwrap_or_default();
            let (long, raw) = (&secs[2 * k], &secs[2 * k + 1]);
            let entries = read_listing(long, raw).ok_or_else(|| {
                unsafe_entry(
                    &dir_rel,
                    "cannot be listed unambiguously (a name with a NUL, '/' or a newline at the start of the directory, or an encrypted directory)",
                )
            })?;
            let mut names = HashSet::new();
            let mut created = 0;
            for e in entries {
                if e.ino == 0 {
                    continue; // an unused slot; rdump skips it too
                }
                let kind = Kind::of(e.mode);
                let rel = dir_rel.join(OsStr::from_bytes(&e.name));
                if e.name == b"." || e.name == b".." {
                    // rdump skips directories of these names.
                    if kind != Kind::Dir {
                        return Err(unsafe_entry(&rel, "is not a directory"));
                    }
                    if parent.is_none() && e.name == b"." && e.ino == dir_ino {
                        root = Some((e.mode, e.uid, e.gid));
                    }
                    continue;
                }
                if e.name.is_empty() {
                    return Err(unsafe_entry(&dir_rel, "has an entry with an empty name"));
                }
                if e.name.contains(&b'/') || e.name.contains(&0) {
                    return Err(unsafe_entry(&rel, "has a '/' or NUL byte in its name"));
                }
                if !names.insert(e.name.clone()) {
                    return Err(unsafe_entry(&rel, "appears twice in its directory"));
                }
                if parent.is_none() && e.name == LOST_FOUND.as_bytes() {
                    continue;
                }
                if prefix_len + rel.as_os_str().len() > MAX_PATH {
                    return Err(Ext4Error::TooLarge(format!(
                        "path /{} is too long",
                        rel.to_string_lossy()
                    )));
                }
                if kind == Kind::Dir && !dirs_seen.insert(e.ino) {
                    return Err(unsafe_entry(
                        &rel,
                        "is a second link to a directory (a loop or a hard-linked directory)",
                    ));
                }
                if nodes.len() >= MAX_ENTRIES {
                    return Err(Ext4Error::TooLarge(format!(
                        "more than {MAX_ENTRIES} entries"
                    )));
                }
                if kind != Kind::Special {
                    created += 1;
                }
                if kind == Kind::Dir {
                    next.push((e.ino, Some(nodes.len())));
                }
                if parent.is_none() {
                    root_entries += 1;
                }
                nodes.push(Node {
                    rel,
                    ino: e.ino,
                    kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    children: 0,
                });
            }
            match parent {
                Some(i) => nodes[i].children = created,
                None => root_children = created,
            }
        }
        level = next;
    }
    let root = root.ok_or_else(|| unsafe_entry(Path::new(""), "has no '.' entry"))?;
    Ok(Tree {
        nodes,
        root,
        root_entries,
        root_children,
    })
}

/// The entries of one directory from its `ls -l` lines, checked against
/// its raw `ls -p` output; None when they disagree.
fn read_listing(long: &[Vec<u8>], raw: &[Vec<u8>]) -> Option<Vec<Listed>> {
    let mut entries = Vec::new();
    for line in long.iter().filter(|l| !l.is_empty()) {
        entries.push(parse_long(line)?);
    }
    let raw = raw.join(&b'\n');
    let mut rest = raw.as_slice();
    for e in &mut entries {
        let escaped = std::mem::take(&mut e.name);
        let mut found = None;
        for cand in [unescape_hex(&escaped), unescape_legacy(&escaped)] {
            if let Some(after) = match_parse_line(rest, e, &cand) {
                found = Some((after, cand));
                break;
            }
        }
        let (after, name) = found?;
        rest = after;
        e.name = name;
    }
    rest.iter().all(|b| *b == b'\n').then_some(entries)
}

/// Matches one `ls -p` line, `/ino/mode/uid/gid/name/size/` (size empty for
/// directories), for the entry `e` named `name` at the start of `raw`;
/// returns what follows it. `ls -p` prints the name up to a NUL byte.
fn match_parse_line<'a>(raw: &'a [u8], e: &Listed, name: &[u8]) -> Option<&'a [u8]> {
    let printed = name.split(|b| *b == 0).next().unwrap_or_default();
    let mut rest = raw.strip_prefix(format!("/{}/{:06o}/", e.ino, e.mode).as_bytes())?;
    // uid and gid (%d: maybe negative; only the low 16 bits in old versions)
    for _ in 0..2 {
        rest = skip_number(rest)?.strip_prefix(b"/")?;
    }
    rest = rest.strip_prefix(printed)?.strip_prefix(b"/")?;
    if Kind::of(e.mode) != Kind::Dir {
        rest = skip_number(rest)?;
    }
    rest.strip_prefix(b"/\n")
}

/// What follows an optionally negative decimal number at the start of `s`.
fn skip_number(s: &[u8]) -> Option<&[u8]> {
    let s = s.strip_prefix(b"-").unwrap_or(s);
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    s.get(n..).filter(|_| n > 0)
}

/// Parses one `ls -l` line:
/// ` <ino> <mode> (<type>) <uid> <gid> <size> <dd-Mon-yyyy hh:mm> <name>`
/// (17 blanks for the date of an unused entry). The name is still escaped.
fn parse_long(line: &[u8]) -> Option<Listed> {
    let mut s = line.strip_prefix(b" ")?;
    let ino = u32::try_from(take_int(&mut s, 10)?).ok()?;
    let mode = u32::try_from(take_int(&mut s, 8)?).ok()?;
    skip_blanks(&mut s);
    s = s.strip_prefix(b"(")?;
    take_int(&mut s, 10)?;
    s = s.strip_prefix(b")")?;
    // printed with %d: ids above 2^31 come out negative
    let uid = i32::try_from(take_int(&mut s, 10)?).ok()? as u32;
    let gid = i32::try_from(take_int(&mut s, 10)?).ok()? as u32;
    take_int(&mut s, 10)?;
    let name = s.strip_prefix(b" ")?.get(17..)?.strip_prefix(b" ")?;
    Some(Listed {
        ino,
        mode,
        uid,
        gid,
        name: name.to_vec(),
    })
}

fn skip_blanks(s: &mut &[u8]) {
    while let [b' ', rest @ ..] = *s {
        *s = rest;
    }
}

/// Blanks, then an optionally negative number.
fn take_int(s: &mut &[u8], radix: u32) -> Option<i64> {
    skip_blanks(s);
    let (neg, digits) = match s.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, *s),
    };
    let n = digits
        .iter()
        .take_while(|b| char::from(**b).is_digit(radix))
        .count();
    if n == 0 || n > 20 {
        return None;
    }
    let v = i64::from_str_radix(std::str::from_utf8(&digits[..n]).ok()?, radix).ok()?;
    *s = &digits[n..];
    Some(if neg { -v } else { v })
}

/// `ls -l` names of e2fsprogs 1.47+: `\xNN` for control, non-ASCII and `\`.
fn unescape_hex(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if let Some(b) = s
            .get(i..i + 4)
            .filter(|e| e.starts_with(b"\\x"))
            .and_then(|e| std::str::from_utf8(&e[2..]).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// `ls -l` names of older e2fsprogs: `M-` for bytes above 128, `^` for
/// control characters.
fn unescape_legacy(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let mut high = 0u8;
        if s[i..].starts_with(b"M-") && i + 2 < s.len() {
            high = 128;
            i += 2;
        }
        if s[i] == b'^' && i + 1 < s.len() {
            out.push((s[i + 1] ^ 0x40).wrapping_add(high));
            i += 2;
        } else {
            out.push(s[i].wrapping_add(high));
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Dumping

/// An (atime, mtime) pair.
type Times = [libc::timespec; 2];

fn times_of(md: &fs::Metadata) -> Times {
    [
        libc::timespec {
            tv_sec: md.atime() as libc::time_t,
            tv_nsec: md.atime_nsec() as _,
        },
        libc::timespec {
            tv_sec: md.mtime() as libc::time_t,
            tv_nsec: md.mtime_nsec() as _,
        },
    ]
}

/// Sets the times of `p` itself (not of a symlink's target).
fn set_times(p: &Path, t: &Times) -> Result<(), Ext4Error> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io_err(p)(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c` is a NUL-terminated path and `t` two timespecs, both
    // alive for the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io_err(p)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Dumps the checked tree into `out` and fixes what rdump does not keep.
fn dump(
    dbg: &Debugfs,
    out: &Path,
    tree: &Tree,
    inode_size: usize,
) -> Result<ExtractStats, Ext4Error> {
    let nodes = &tree.nodes;
    let root_nodes = &nodes[..tree.root_entries];
    // 1. rdump every root entry (each inode once) into out/lost+found.
    let staging = out.join(LOST_FOUND);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(&staging))?;
    let mut cmds = Vec::new();
    let mut dumped = HashSet::new();
    for n in root_nodes {
        if n.kind != Kind::Special && dumped.insert(n.ino) {
            cmds.push(format!("rdump <{}> {LOST_FOUND}", n.ino));
        }
    }
    let rdumps = cmds.len();
    // The times rdump does not set: symlinks and the root.
    let mut timed = vec![ROOT_INO];
    let mut seen = HashSet::new();
    for n in nodes {
        if n.kind == Kind::Symlink && seen.insert(n.ino) {
            timed.push(n.ino);
        }
    }
    cmds.extend(timed.iter().map(|ino| format!("idump <{ino}>")));
    let secs = dbg.run("rdump", &cmds, out)?;
    let mut times = HashMap::new();
    for (ino, lines) in timed.iter().zip(&secs[rdumps..]) {
        let t = parse_idump(lines, inode_size)
            .and_then(|b| inode_times(&b))
            .ok_or_else(|| debugfs_err("idump", format!("unexpected output for inode {ino}")))?;
        times.insert(*ino, t);
    }
    if let Some(lines) = secs[..rdumps]
        .iter()
        .find(|s| s.iter().any(|l| !l.is_empty()))
    {
        return Err(debugfs_err(
            "rdump",
            String::from_utf8_lossy(&lines.join(&b'\n')).into_owned(),
        ));
    }

    // 2. Move them into place, keeping their times.
    let mut moved = HashSet::new();
    for n in root_nodes {
        if n.kind == Kind::Special || !moved.insert(n.ino) {
            continue;
        }
        let src = staging.join(format!("<{}>", n.ino));
        let md = fs::symlink_metadata(&src)
            .map_err(|_| debugfs_err("rdump", format!("did not write /{}", n.rel.display())))?;
        let dst = out.join(&n.rel);
        fs::rename(&src, &dst).map_err(io_err(&dst))?;
        set_times(&dst, &times_of(&md))?;
    }
    fs::remove_dir(&staging).map_err(|e| {
        debugfs_err(
            "rdump",
            format!("wrote unexpected files into {}: {e}", staging.display()),
        )
    })?;

    // 3. Directory times, before links change them.
    let mut dir_times = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.kind == Kind::Dir {
            let p = out.join(&n.rel);
            let md = fs::symlink_metadata(&p).map_err(io_err(&p))?;
            dir_times.insert(i, times_of(&md));
        }
    }

    // 4. Hard links: rdump wrote a copy per name (and at the root, only the
    // first name of an inode).
    let mut first: HashMap<u32, &Path> = HashMap::new();
    for n in nodes {
        if !matches!(n.kind, Kind::File | Kind::Symlink) {
            continue;
        }
        let Some(f) = first.get(&n.ino) else {
            first.insert(n.ino, &n.rel);
            continue;
        };
        let (src, p) = (out.join(f), out.join(&n.rel));
        let exists = fs::symlink_metadata(&p).is_ok();
        if n.kind == Kind::File {
            if exists {
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            fs::hard_link(&src, &p).map_err(io_err(&p))?;
        } else if !exists {
            // Symlinks stay separate, as rdump wrote them below the root.
            let target = fs::read_link(&src).map_err(io_err(&src))?;
            std::os::unix::fs::symlink(target, &p).map_err(io_err(&p))?;
        }
    }

    // 5. Owners, modes (rdump drops setuid/setgid/sticky) and times,
    // children before their directory.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owners = unsafe { libc::geteuid() } == 0;
    let mut stats = ExtractStats::default();
    for (i, n) in nodes.iter().enumerate().rev() {
        let p = out.join(&n.rel);
        if n.kind == Kind::Special {
            stats.skipped += 1;
            continue;
        }
        let md = fs::symlink_metadata(&p)
            .map_err(|_| debugfs_err("rdump", format!("did not write /{}", n.rel.display())))?;
        let ft = md.file_type();
        let (ok, t) = match n.kind {
            Kind::Dir => (ft.is_dir(), dir_times.get(&i)),
            Kind::File => (ft.is_file(), None),
            _ => (ft.is_symlink(), times.get(&n.ino)),
        };
        if !ok {
            return Err(debugfs_err(
                "rdump",
                format!("wrote /{} as another kind of file", n.rel.display()),
            ));
        }
        match n.kind {
            Kind::Dir => stats.dirs += 1,
            Kind::File => stats.files += 1,
            _ => stats.symlinks += 1,
        }
        if n.kind == Kind::Dir {
            check_entries(&p, n.children)?;
        }
        fix_meta(
            &p,
            &md,
            (n.mode, n.uid, n.gid),
            owners,
            n.kind != Kind::Symlink,
        )?;
        if let Some(t) = t {
            set_times(&p, t)?;
        }
    }
    check_entries(out, tree.root_children)?;
    let md = fs::symlink_metadata(out).map_err(io_err(out))?;
    fix_meta(out, &md, tree.root, owners, true)?;
    if let Some(t) = times.get(&ROOT_INO) {
        set_times(out, t)?;
    }
    Ok(stats)
}

/// Fails unless the directory `p` holds exactly `want` entries.
fn check_entries(p: &Path, want: usize) -> Result<(), Ext4Error> {
    let have = fs::read_dir(p).map_err(io_err(p))?.count();
    if have != want {
        return Err(debugfs_err(
            "rdump",
            format!(
                "wrote {have} entries into {} instead of {want}",
                p.display()
            ),
        ));
    }
    Ok(())
}

/// Owner (when root; first, as chown clears setuid) and mode (not for
/// symlinks) of `p` as in the image.
fn fix_meta(
    p: &Path,
    md: &fs::Metadata,
    (mode, uid, gid): (u32, u32, u32),
    owners: bool,
    chmod: bool,
) -> Result<(), Ext4Error> {
    if owners && (md.uid() != uid || md.gid() != gid) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_err(p))?;
    }
    if chmod {
        fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777)).map_err(io_err(p))?;
    }
    Ok(())
}

/// The inode bytes from `idump` lines (`<octal offset>  <8 groups of 4 hex
/// digits>  <ascii>`, `*` for lines repeating the previous one).
fn parse_idump(lines: &[Vec<u8>], inode_size: usize) -> Option<Vec<u8>> {
    let mut bytes: Vec<u8> = Vec::with_capacity(inode_size);
    let mut last: Option<[u8; 16]> = None;
    let mut repeat = false;
    let fill = |bytes: &mut Vec<u8>, upto: usize, row: &[u8; 16]| {
        while bytes.len() < upto {
            bytes.extend_from_slice(row);
        }
    };
    for line in lines.iter().filter(|l| !l.is_empty()) {
        if line.as_slice() == b"*" {
            repeat = true;
            continue;
        }
        let text = std::str::from_utf8(line.get(..46)?).ok()?;
        let mut words = text.split_ascii_whitespace();
        let off = usize::from_str_radix(words.next()?, 8).ok()?;
        if repeat {
            fill(&mut bytes, off, &last?);
            repeat = false;
        }
        if off != bytes.len() {
            return None;
        }
        let mut row = [0u8; 16];
        for pair in row.chunks_mut(2) {
            let w = words.next().filter(|w| w.len() == 4)?;
            let v = u16::from_str_radix(w, 16).ok()?;
            pair.copy_from_slice(&v.to_be_bytes());
        }
        bytes.extend_from_slice(&row);
        last = Some(row);
    }
    if repeat {
        fill(&mut bytes, inode_size, &last?);
    }
    (bytes.len() == inode_size).then_some(bytes)
}

/// (atime, mtime) of a raw inode: 32-bit signed seconds, plus, in large
/// inodes, two epoch bits and the nanoseconds from the `_extra` fields.
fn inode_times(b: &[u8]) -> Option<Times> {
    let extra = if b.len() > GOOD_OLD_INODE_SIZE {
        usize::from(le16(b, I_EXTRA_ISIZE)?)
    } else {
        0
    };
    let one = |base: usize, at: usize| -> Option<libc::timespec> {
        let secs = i64::from(le32(b, base)? as i32);
        let ext = if GOOD_OLD_INODE_SIZE + extra >= at + 4 {
            le32(b, at).unwrap_or(0)
        } else {
            0
        };
        let nsec = i64::from(ext >> 2);
        Some(libc::timespec {
            tv_sec: (secs + (i64::from(ext & 3) << 32)) as libc::time_t,
            tv_nsec: (if nsec < 1_000_000_000 { nsec } else { 0 }) as _,
        })
    };
    Some([one(I_ATIME, I_ATIME_EXTRA)?, one(I_MTIME, I_MTIME_EXTRA)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

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

        let e = extract_with(None, &img, &t.0.join("out3")).unwrap_err();
        assert!(matches!(e, Ext4Error::ToolMissing));
        assert!(e.to_string().contains("e2fsprogs"), "{e}");
        assert!(!t.0.join("out3").exists());
    }

    fn lines(s: &str) -> Vec<Vec<u8>> {
        s.split('\n').map(|l| l.as_bytes().to_vec()).collect()
    }

    #[test]
    fn ls_long_lines() {
        let l = parse_long(b"     12  100644 (1)   1234   5678       3  1-Dec-2026 18:52 a b\\x5c")
            .unwrap();
        assert_eq!((l.ino, l.mode, l.uid, l.gid), (12, 0o100644, 1234, 5678));
        assert_eq!(l.name, b"a b\\x5c");
        assert_eq!(unescape_hex(&l.name), b"a b\\");
        let l = parse_long(b"     13   40755 (2)     -2 -1294967296    1024 13-Feb-2009 23:31 d")
            .unwrap();
        assert_eq!((l.uid, l.gid), (u32::MAX - 1, 3_000_000_000));
        // An unused slot has no date.
        let l = parse_long(b"      0       0 (1)      0      0       0                   gone")
            .unwrap();
        assert_eq!((l.ino, l.name.as_slice()), (0, &b"gone"[..]));
        assert!(parse_long(b"/12/100644/0/0/x/1/").is_none());
        assert!(parse_long(b"     12  100644 (1)      0      0       3 1-Dec").is_none());
        assert_eq!(
            unescape_hex(b"\\xc3\\xbc\\x0a\\x5cx41\\"),
            "ü\n\\x41\\".as_bytes()
        );
        assert_eq!(unescape_legacy(b"M-CM-<^J^?M-^Ax"), b"\xc3\xbc\n\x7f\x81x");
    }

    #[test]
    fn listings_must_agree() {
        let long = lines(
            "      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 .\n      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 ..\n     16  100644 (1)      0      0       1  1-Dec-2026 18:44 nl\\x0aname\n     17  120777 (7)      0      0       3  1-Dec-2026 18:44 lnk\n",
        );
        let raw = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/16/100644/0/0/nl\nname/1/\n/17/120777/0/0/lnk/3/\n");
        let e = read_listing(&long, &raw).unwrap();
        let names: Vec<&[u8]> = e.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, [&b"."[..], b"..", b"nl\nname", b"lnk"]);
        // A raw name that fakes a second line: `ls -p` shows more entries.
        let raw2 = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/16/100644/0/0/nl\nname/1/\n/17/120777/0/0/lnk/3/\n/18/100644/0/0/fake/1/\n");
        assert!(read_listing(&long, &raw2).is_none());
        // `..` whose raw name is longer (`..//\n...`): `ls -l` prints it raw.
        let long3 = lines(
            "      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 .\n      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 ..//\n     99   40755 (2)      0      0    1024  1-Dec-2026 18:44 x\n",
        );
        let raw3 = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/99/040755/0/0/x//\n");
        assert!(read_listing(&long3, &raw3).is_none());
        // A NUL in a name: ls -p stops there, so the names disagree.
        let long4 = lines("     16  100644 (1)      0      0       1  1-Dec-2026 18:44 a\\x00b\n");
        let raw4 = lines("/16/100644/0/0/a/1/\n");
        assert_eq!(read_listing(&long4, &raw4).unwrap()[0].name, b"a\0b");
        // ... unless the name is `a\x00b` as old versions print it.
        let raw5 = lines("/16/100644/0/0/a\\x00b/1/\n");
        assert_eq!(read_listing(&long4, &raw5).unwrap()[0].name, b"a\\x00b");
        let raw6 = lines("/16/100644/0/0/a\\x00c/1/\n");
        assert!(read_listing(&long4, &raw6).is_none());
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
    fn idump_and_times() {
        let text = "0000  ffa1 7011 0600 0000 d202 9649 8116 0f6b  ..p........I...k\n0020  d202 9649 0000 0000 7111 0100 0000 0000  ...I....q.......\n0040  0000 0000 0000 0000 7461 7267 6574 0000  ........target..\n0060  0000 0000 0000 0000 0000 0000 0000 0000  ................\n*\n0160  0000 0000 0000 0000 0100 0100 c4c0 0000  ................\n0200  2000 144c 0000 0000 0500 0000 0000 0000   ..L............\n0220  8116 0f6b 0000 0000 0000 0000 0000 0000  ...k............\n0240  0000 0000 0000 0000 0000 0000 0000 0000  ................\n*\n";
        let b = parse_idump(&lines(text), 256).unwrap();
        assert_eq!(b.len(), 256);
        assert_eq!(&b[0x28..0x2e], b"target");
        let [at, mt] = inode_times(&b).unwrap();
        assert_eq!((at.tv_sec, at.tv_nsec), (1_234_567_890, 0));
        // mtime_extra 5: epoch bit 1, 1 ns.
        assert_eq!((mt.tv_sec, mt.tv_nsec), (1_234_567_890 + (1 << 32), 1));
        let (head, _) = text.split_at(text.rfind("*\n").unwrap());
        assert!(parse_idump(&lines(head), 256).is_none(), "too short");
        assert!(parse_idump(&lines("0020  0000\n"), 256).is_none());
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
