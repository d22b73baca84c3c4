//! Safe extraction of user-uploaded tar archives (`tar.gz` or plain `tar`).
//!
//! Uploads come from API clients and are untrusted. [`extract_tar_gz`]
//! unpacks them below one destination directory and guarantees that nothing
//! is created, modified or followed outside it:
//!
//! * The input is sniffed: a stream starting with the gzip magic `1f 8b` is
//!   decompressed, anything else is read as a plain (uncompressed) tar.
//! * Entry paths must be relative and free of `..` components; `.`
//!   components are ignored, and the entry for the archive root (`./`) only
//!   counts as an entry.
//! * No entry may be written through a symlink: every parent directory of
//!   an entry must be a real directory (checked on the disk with `lstat`, and
//!   against the symlinks the archive itself declares), and files are opened
//!   with `O_NOFOLLOW`.
//! * Symlinks are created only after all other entries (so no later entry
//!   can be written through one). A symlink's target must be relative, and
//!   resolved from the link's own directory it must stay inside `dest`
//!   without passing through another symlink of the archive (a target may
//!   *end* at one). Dangling targets are allowed.
//! * Hard links must name (archive-relative, like tar stores them) a regular
//!   file extracted earlier from the same archive; the same path rules apply.
//! * Device nodes, FIFOs and other special entries are **skipped** (listed in
//!   [`ExtractSummary::skipped`]), never created: rootfs-style archives often
//!   carry a `dev/` tree that is harmless to ignore, while creating device
//!   nodes on the host as root would be dangerous.
//! * Limits ([`ExtractLimits`]): more than `max_entries` entries or more than
//!   `max_bytes` of unpacked file data is refused (zip-bomb guard). The
//!   decompressed tar stream as a whole is capped too, which also bounds the
//!   memory the tar reader spends on GNU long-name and PAX headers.
//! * Regular files keep their permission bits (`mode & 0o777`, so executable
//!   bits survive but setuid/setgid/sticky do not); directories get
//!   `mode & 0o777 | 0o700`. Ownership and timestamps are not restored:
//!   everything belongs to the daemon's user.
//!
//! On error, `dest` may hold a partial extraction; the caller owns `dest`
//! (normally a fresh temporary directory) and removes it.
//!
//! emberd's callers use [`extract_sandboxed`]: the same function, run in a
//! sandbox job (emberd's own binary re-executed, see `archive/sandboxed.rs`),
//! so in emberd extraction never runs in emberd's process.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

mod sandboxed;
pub use sandboxed::{child_main, extract_sandboxed, ArchiveSource, CHILD_ARG};
/// The JSON of a job's answer, shared with `images::oci`'s unpack job.
pub(crate) use sandboxed::{dec_error, dec_io, dec_path, enc_error, enc_io, enc_path};

/// gzip magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Tar stream overhead allowed per entry on top of `max_bytes`
/// (header blocks, padding, long names, PAX records).
const STREAM_OVERHEAD_PER_ENTRY: u64 = 4 * 1024;
/// Fixed tar stream overhead allowed on top of everything else.
const STREAM_OVERHEAD: u64 = 1024 * 1024;

/// Limits that bound the work an upload can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Maximum number of archive entries (of any kind, skipped ones included).
    pub max_entries: u64,
    /// Maximum total size of unpacked regular-file data, in bytes.
    pub max_bytes: u64,
}

impl Default for ExtractLimits {
    /// 100 000 entries, 2 GiB of file data.
    fn default() -> Self {
        ExtractLimits {
            max_entries: 100_000,
            max_bytes: 2 << 30,
        }
    }
}

/// What an extraction produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    /// Archive entries seen (including skipped ones and the root entry).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Total bytes of regular-file data written.
    pub bytes: u64,
    /// Entries that were skipped (device nodes, FIFOs, unknown types), by
    /// archive path.
    pub skipped: Vec<PathBuf>,
}

/// Why an upload could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive stream is corrupt or could not be read.
    #[error("cannot read archive: {0}")]
    Read(#[source] io::Error),
    /// A file or directory could not be created inside the destination.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An entry (or link target) uses an absolute path.
    #[error("archive entry {0:?} has an absolute path")]
    AbsolutePath(PathBuf),
    /// An entry (or hard-link target) contains a `..` component.
    #[error("archive entry {0:?} contains a '..' component")]
    ParentDir(PathBuf),
    /// A symlink or hard link would point outside the destination, or
    /// through another symlink.
    #[error("link {path:?} -> {target:?} is refused: {reason}")]
    BadLink {
        path: PathBuf,
        target: PathBuf,
        reason: Box<str>,
    },
    /// An entry would be written through a symlink.
    #[error("archive entry {0:?} lies below a symlink")]
    ThroughSymlink(PathBuf),
    /// An entry conflicts with an existing path of another kind.
    #[error("archive entry {0:?} conflicts with an earlier entry of another type")]
    Conflict(PathBuf),
    /// More than `max_entries` entries.
    #[error("archive has more than {0} entries")]
    TooManyEntries(u64),
    /// More than `max_bytes` of unpacked data.
    #[error("archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    /// The extraction job failed as a whole (could not start, was killed,
    /// ran out of time, answered nonsense): the host's side, not the
    /// archive's rules. Only [`extract_sandboxed`] returns it.
    #[error("extraction sandbox: {0}")]
    Sandbox(String),
}

/// Extracts a `tar.gz` (or plain `tar`) stream below `dest`, which is created
/// if missing. See the module documentation for the safety rules.
pub fn extract_tar_gz(
    data: impl Read,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractSummary, ArchiveError> {
    let mut data = data;
    let mut magic = Vec::with_capacity(2);
    (&mut data)
        .take(2)
        .read_to_end(&mut magic)
        .map_err(read_err)?;
    let stream = io::Cursor::new(magic.clone()).chain(data);
    let cap = limits
        .max_bytes
        .saturating_add(limits.max_entries.saturating_mul(STREAM_OVERHEAD_PER_ENTRY))
        .saturating_add(STREAM_OVERHEAD);
    if magic == GZIP_MAGIC {
        let gz = flate2::read::MultiGzDecoder::new(stream);
        extract_tar(CappedReader::new(gz, cap), dest, limits)
    } else {
        extract_tar(CappedReader::new(stream, cap), dest, limits)
    }
}

/// A reader that fails once more than `cap` bytes went through it.
struct CappedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> CappedReader<R> {
    fn new(inner: R, cap: u64) -> Self {
        CappedReader { inner, left: cap }
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        if n64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decompressed archive stream exceeds the size limit",
            ));
        }
        self.left -= n64;
        Ok(n)
    }
}

/// A symlink whose creation is deferred until all other entries are done.
struct PendingSymlink {
    rel: PathBuf,
    target: PathBuf,
}

fn extract_tar<R: Read>(
    reader: R,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractSummary, ArchiveError> {
    fs::create_dir_all(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(reader);
    let mut summary = ExtractSummary::default();
    // Symlinks the archive declares (archive-relative, normalized).
    let mut symlinks: Vec<PendingSymlink> = Vec::new();
    let mut symlink_set: HashSet<PathBuf> = HashSet::new();
    // Directories whose final mode is applied at the end.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();

    let entries = archive.entries().map_err(read_err)?;
    for entry in entries {
        let mut entry = entry.map_err(|e| too_large_or_read(e, limits))?;
        summary.entries += 1;
        if summary.entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let raw_path = entry.path().map_err(read_err)?.into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        let rel = normalize(&raw_path)?;
        if rel.as_os_str().is_empty() {
            // The archive root ("./"): nothing to create.
            continue;
        }
        if symlink_prefix(&rel, &symlink_set).is_some() {
            return Err(ArchiveError::ThroughSymlink(raw_path));
        }
        let mode = entry.header().mode().map_err(read_err)?;
        match kind {
            EntryType::Directory => {
                let full = dest.join(&rel);
                walk_parents(dest, &rel, &raw_path, true)?;
                match fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => return Err(ArchiveError::Conflict(raw_path)),
                    Err(_) => {
                        fs::create_dir(&full).map_err(|source| ArchiveError::Write {
                            path: full.clone(),
                            source,
                        })?;
                        summary.dirs += 1;
                    }
                }
                dir_modes.push((full, (mode & 0o777) | 0o700));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let full = dest.join(&rel);
                walk_parents(dest, &rel, &raw_path, true)?;
                remove_existing_file(&full, &raw_path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&full)
                    .map_err(|source| ArchiveError::Write {
                        path: full.clone(),
                        source,
                    })?;
                let budget = limits.max_bytes.saturating_sub(summary.bytes);
                let written = copy_limited(&mut entry, &mut file, budget, &full, limits)?;
                summary.bytes += written;
                file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                    .map_err(|source| ArchiveError::Write {
                        path: full.clone(),
                        source,
                    })?;
                summary.files += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                check_symlink_target(&rel, &target)?;
                if !symlink_set.insert(rel.clone()) {
                    return Err(ArchiveError::Conflict(raw_path));
                }
                symlinks.push(PendingSymlink { rel, target });
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let bad = |reason: &'static str| ArchiveError::BadLink {
                    path: raw_path.clone(),
                    target: target.clone(),
                    reason: reason.into(),
                };
                let target_rel = hard_link_target(&raw_path, &target)?;
                if symlink_prefix(&target_rel, &symlink_set).is_some()
                    || symlink_set.contains(&target_rel)
                {
                    return Err(bad("hard-link target is or lies below a symlink"));
                }
                walk_parents(dest, &target_rel, &raw_path, false)?;
                let target_full = dest.join(&target_rel);
                match fs::symlink_metadata(&target_full) {
                    Ok(md) if md.is_file() => {}
                    _ => return Err(bad("hard-link target is not an extracted regular file")),
                }
                let full = dest.join(&rel);
                walk_parents(dest, &rel, &raw_path, true)?;
                remove_existing_file(&full, &raw_path)?;
                fs::hard_link(&target_full, &full).map_err(|source| ArchiveError::Write {
                    path: full.clone(),
                    source,
                })?;
                summary.hardlinks += 1;
            }
            _ => {
                // Char/block devices, FIFOs, and anything unknown.
                summary.skipped.push(raw_path);
            }
        }
    }

    // Symlinks last: no entry can have been written through them, and the
    // full set is known so a target cannot traverse one regardless of order.
    for link in &symlinks {
        check_symlink_traversal(link, &symlink_set)?;
        walk_parents(dest, &link.rel, &link.rel, true)?;
        let full = dest.join(&link.rel);
        if fs::symlink_metadata(&full).is_ok() {
            return Err(ArchiveError::Conflict(link.rel.clone()));
        }
        std::os::unix::fs::symlink(&link.target, &full).map_err(|source| ArchiveError::Write {
            path: full.clone(),
            source,
        })?;
        summary.symlinks += 1;
    }
    // Directory modes last (deepest first), so a read-only directory does not
    // block its own entries.
    for (dir, mode) in dir_modes.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode)).map_err(|source| {
            ArchiveError::Write {
                path: dir.clone(),
                source,
            }
        })?;
    }
    Ok(summary)
}

/// Maps a read error caused by the stream cap to [`ArchiveError::TooLarge`].
pub(crate) fn too_large_or_read(e: io::Error, limits: &ExtractLimits) -> ArchiveError {
    if e.kind() == io::ErrorKind::InvalidData && e.to_string().contains("size limit") {
        ArchiveError::TooLarge(limits.max_bytes)
    } else {
        read_err(e)
    }
}

/// A read error, without the bytes of the input in its text: the tar
/// crate names a corrupt header's fields and path ("... when getting cksum
/// for <the first 100 bytes>"), which for a file that is not a tar archive
/// would echo its contents.
pub(crate) fn read_err(e: io::Error) -> ArchiveError {
    if e.to_string().contains(" when getting ") {
        ArchiveError::Read(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt tar header (is it a tar archive?)",
        ))
    } else {
        ArchiveError::Read(e)
    }
}

/// Copies at most `budget` bytes; more is [`ArchiveError::TooLarge`].
pub(crate) fn copy_limited(
    src: &mut impl Read,
    dst: &mut impl Write,
    budget: u64,
    path: &Path,
    limits: &ExtractLimits,
) -> Result<u64, ArchiveError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(too_large_or_read(e, limits)),
        };
        total += n as u64;
        if total > budget {
            return Err(ArchiveError::TooLarge(limits.max_bytes));
        }
        let chunk = buf.get(..n).unwrap_or(&[]);
        dst.write_all(chunk).map_err(|source| ArchiveError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    }
}

/// The normalized target of the hard link at `raw`: a relative path inside
/// the destination, not its root.
pub(crate) fn hard_link_target(raw: &Path, target: &Path) -> Result<PathBuf, ArchiveError> {
    let bad = |reason: &'static str| ArchiveError::BadLink {
        path: raw.to_path_buf(),
        target: target.to_path_buf(),
        reason: reason.into(),
    };
    match normalize(target) {
        Ok(t) if !t.as_os_str().is_empty() => Ok(t),
        Ok(_) => Err(bad("hard link to the root")),
        Err(ArchiveError::AbsolutePath(_)) => Err(bad("absolute hard-link target")),
        Err(_) => Err(bad("hard-link target leaves the destination")),
    }
}

/// Normalizes an archive path: refuses absolute paths and `..`, drops `.`.
/// The archive root normalizes to the empty path.
pub(crate) fn normalize(path: &Path) -> Result<PathBuf, ArchiveError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ArchiveError::ParentDir(path.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::AbsolutePath(path.to_path_buf()))
            }
        }
    }
    Ok(out)
}

/// Returns the first proper prefix of `rel` that is a declared symlink.
fn symlink_prefix<'a>(rel: &'a Path, symlinks: &HashSet<PathBuf>) -> Option<&'a Path> {
    if symlinks.is_empty() {
        return None;
    }
    rel.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| symlinks.contains(*a))
}

/// Checks that every parent directory of `rel` below `dest` is a real
/// directory (never a symlink or a non-directory); missing ones are created
/// when `create` is set, and are an error otherwise.
fn walk_parents(dest: &Path, rel: &Path, shown: &Path, create: bool) -> Result<(), ArchiveError> {
    let mut cur = dest.to_path_buf();
    let parent = match rel.parent() {
        Some(p) => p,
        None => return Ok(()),
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(ArchiveError::ThroughSymlink(shown.to_path_buf()))
            }
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(ArchiveError::Conflict(shown.to_path_buf())),
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|source| ArchiveError::Write {
                    path: cur.clone(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(ArchiveError::Write {
                    path: cur.clone(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Removes an earlier regular file at `full` (a later tar entry replaces an
/// earlier one); anything else in the way is a conflict.
fn remove_existing_file(full: &Path, shown: &Path) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(full) {
        Ok(md) if md.is_file() => fs::remove_file(full).map_err(|source| ArchiveError::Write {
            path: full.to_path_buf(),
            source,
        }),
        Ok(_) => Err(ArchiveError::Conflict(shown.to_path_buf())),
        Err(_) => Ok(()),
    }
}

/// Checks that a symlink target is relative and, resolved lexically from
/// the link's directory, stays inside the destination.
fn check_symlink_target(rel: &Path, target: &Path) -> Result<(), ArchiveError> {
    resolve_target(rel, target).map(|_| ())
}

/// Resolves `target` from the directory of `rel`; returns the visited
/// intermediate paths (each a destination-relative path) and the result.
fn resolve_target(rel: &Path, target: &Path) -> Result<(Vec<PathBuf>, PathBuf), ArchiveError> {
    let bad = |reason: &'static str| ArchiveError::BadLink {
        path: rel.to_path_buf(),
        target: target.to_path_buf(),
        reason: reason.into(),
    };
    if target.as_os_str().is_empty() {
        return Err(bad("empty symlink target"));
    }
    let mut cur: Vec<&std::ffi::OsStr> = match rel.parent() {
        Some(p) => p
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let mut visited = Vec::new();
    let comps: Vec<Component> = target.components().collect();
    let last = comps.len().saturating_sub(1);
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::Normal(s) => {
                cur.push(s);
                if i != last {
                    visited.push(cur.iter().collect::<PathBuf>());
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if cur.pop().is_none() {
                    return Err(bad("symlink target leaves the destination"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("absolute symlink target"));
            }
        }
    }
    Ok((visited, cur.iter().collect()))
}

/// Refuses a symlink whose target passes through another declared symlink
/// (only the final component of a target may be a symlink).
fn check_symlink_traversal(
    link: &PendingSymlink,
    symlinks: &HashSet<PathBuf>,
) -> Result<(), ArchiveError> {
    let (visited, _) = resolve_target(&link.rel, &link.target)?;
    // The link's own directory chain was already checked by walk_parents /
    // symlink_prefix; check the target's intermediate components.
    if visited.iter().any(|v| symlinks.contains(v)) {
        return Err(ArchiveError::BadLink {
            path: link.rel.clone(),
            target: link.target.clone(),
            reason: "symlink target passes through another symlink".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;

    use crate::test_util::TempDir;

    /// Raw tar builder: writes headers with arbitrary (evil) names, which
    /// `tar::Builder`'s path helpers would refuse.
    struct Tar(tar::Builder<Vec<u8>>);
    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn header(name: &str, kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name = [0; 100];
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(1234);
            h.set_gid(1234);
            h.set_cksum();
            h
        }
        fn file(mut self, name: &str, mode: u32, data: &[u8]) -> Self {
            let h = Self::header(name, EntryType::Regular, mode, data.len() as u64);
            self.0.append(&h, data).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Self {
            let h = Self::header(name, EntryType::Directory, 0o755, 0);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn link(mut self, name: &str, kind: EntryType, target: &str) -> Self {
            let mut h = Self::header(name, kind, 0o777, 0);
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.linkname = [0; 100];
                gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
            }
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn special(mut self, name: &str, kind: EntryType) -> Self {
            let h = Self::header(name, kind, 0o644, 0);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn tar(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
        fn tgz(self) -> Vec<u8> {
            let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(&self.tar()).unwrap();
            enc.finish().unwrap()
        }
    }

    fn extract(data: &[u8], dest: &Path) -> Result<ExtractSummary, ArchiveError> {
        extract_tar_gz(data, dest, &ExtractLimits::default())
    }

    fn good() -> Tar {
        Tar::new()
            .dir("./")
            .dir("./bin/")
            .file("./bin/app", 0o755, b"\x7fELF-pretend")
            .file("etc/config.txt", 0o644, b"key=value\n")
            .file("deep/a/b/c.txt", 0o600, b"deep")
            .link("etc/link", EntryType::Symlink, "config.txt")
            .link("up", EntryType::Symlink, "deep/a/../a/b")
            .link("hard", EntryType::Link, "etc/config.txt")
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn check_good(dest: &Path, s: &ExtractSummary) {
        assert_eq!(fs::read(dest.join("bin/app")).unwrap(), b"\x7fELF-pretend");
        assert_eq!(mode_of(&dest.join("bin/app")), 0o755);
        assert_eq!(mode_of(&dest.join("etc/config.txt")), 0o644);
        assert_eq!(mode_of(&dest.join("deep/a/b/c.txt")), 0o600);
        assert_eq!(
            fs::read_link(dest.join("etc/link")).unwrap(),
            Path::new("config.txt")
        );
        assert_eq!(fs::read(dest.join("etc/link")).unwrap(), b"key=value\n");
        assert_eq!(fs::read(dest.join("up/c.txt")).unwrap(), b"deep");
        assert_eq!(fs::read(dest.join("hard")).unwrap(), b"key=value\n");
        assert_eq!(s.files, 3);
        assert_eq!(s.symlinks, 2);
        assert_eq!(s.hardlinks, 1);
        assert_eq!(s.bytes, 12 + 10 + 4);
        assert_eq!(s.entries, 8);
        assert!(s.skipped.is_empty());
    }

    #[test]
    fn good_archive_gzip() {
        let t = TempDir::new();
        let dest = t.0.join("out");
        let s = extract(&good().tgz(), &dest).unwrap();
        check_good(&dest, &s);
    }

    #[test]
    fn good_archive_plain_tar() {
        let t = TempDir::new();
        let s = extract(&good().tar(), &t.0).unwrap();
        check_good(&t.0, &s);
    }

    #[test]
    fn empty_input_is_an_empty_archive() {
        let t = TempDir::new();
        let s = extract(b"", &t.0).unwrap();
        assert_eq!(s, ExtractSummary::default());
    }

    #[test]
    fn garbage_is_a_read_error() {
        let t = TempDir::new();
        let err = extract(&[0x1f, 0x8b, 1, 2, 3, 4], &t.0).unwrap_err();
        assert!(matches!(err, ArchiveError::Read(_)), "{err}");
        let err = extract(&[b'x'; 700], &t.0).unwrap_err();
        assert!(matches!(err, ArchiveError::Read(_)), "{err}");
    }

    #[test]
    fn errors_never_echo_the_input() {
        // A file that is not a tar archive, like /etc/shadow: its first
        // bytes are where a tar header has its path.
        let mut text = b"root:$y$j9T$SECRETHASHSECRETHASH:19000:0:99999:7:::\n".repeat(20);
        text.truncate(700);
        let t = TempDir::new();
        let err = extract(&text, &t.0).unwrap_err().to_string();
        assert!(!err.contains("SECRET") && !err.contains("root:"), "{err}");
    }

    /// Asserts that nothing but `dest` itself exists in the temp dir.
    fn assert_nothing_outside(t: &TempDir) {
        let names: Vec<_> = fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dest")]);
    }

    #[test]
    fn absolute_path_refused() {
        let t = TempDir::new();
        let dest = t.0.join("dest");
        let evil = t.0.join("evil");
        let tar = Tar::new().file(evil.to_str().unwrap(), 0o644, b"x").tgz();
        let err = extract(&tar, &dest).unwrap_err();
        assert!(matches!(err, ArchiveError::AbsolutePath(_)), "{err}");
        assert_nothing_outside(&t);
    }

    #[test]
    fn parent_dir_refused() {
        let t = TempDir::new();
        let dest = t.0.join("dest");
        for name in ["../evil", "a/../../evil", "a/.."] {
            let tar = Tar::new().file(name, 0o644, b"x").tgz();
            let err = extract(&tar, &dest).unwrap_err();
            assert!(matches!(err, ArchiveError::ParentDir(_)), "{name}: {err}");
        }
        assert_nothing_outside(&t);
    }

    #[test]
    fn symlink_escapes_refused() {
        let t = TempDir::new();
        let dest = t.0.join("dest");
        let cases = [
            ("link", "/etc"),
            ("link", ".."),
            ("a/link", "../../evil"),
            ("link", "a/../../evil"),
            ("link", ""),
        ];
        for (name, target) in cases {
            let tar = Tar::new().link(name, EntryType::Symlink, target).tgz();
            let err = extract(&tar, &dest).unwrap_err();
            assert!(matches!(err, ArchiveError::BadLink { .. }), "{name}: {err}");
        }
        assert_nothing_outside(&t);
    }

    #[test]
    fn write_through_symlink_refused() {
        let t = TempDir::new();
        let dest = t.0.join("dest");
        fs::create_dir(t.0.join("evil")).unwrap();
        // An inside-pointing symlink followed by a file below it.
        let tar = Tar::new()
            .dir("sub")
            .link("s", EntryType::Symlink, "sub")
            .file("s/file", 0o644, b"x")
            .tgz();
        let err = extract(&tar, &dest).unwrap_err();
        assert!(matches!(err, ArchiveError::ThroughSymlink(_)), "{err}");
        // A pre-existing symlink in dest (defense in depth).
        fs::remove_dir_all(&dest).unwrap();
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(t.0.join("evil"), dest.join("s")).unwrap();
        let tar = Tar::new().file("s/file", 0o644, b"x").tgz();
        let err = extract(&tar, &dest).unwrap_err();
        assert!(matches!(err, ArchiveError::ThroughSymlink(_)), "{err}");
        let tar = Tar::new().file("s", 0o644, b"x").tgz();
        let err = extract(&tar, &dest).unwrap_err();
        assert!(matches!(err, ArchiveError::Conflict(_)), "{err}");
        assert_eq!(fs::read_dir(t.0.join("evil")).unwrap().count(), 0);
    }

    #[test]
    fn symlink_chain_escape_refused() {
        // `a -> .` is inside, `b -> a/..` is lexically inside but physically
        // the parent of dest; the traversal rule refuses it in either order.
        let t = TempDir::new();
        let dest = t.0.join("dest");
        for tar in [
            Tar::new()
                .link("a", EntryType::Symlink, ".")
                .link("b", EntryType::Symlink, "a/.."),
            Tar::new()
                .link("b", EntryType::Symlink, "a/..")
                .link("a", EntryType::Symlink, "."),
        ] {
            let err = extract(&tar.tgz(), &dest).unwrap_err();
            assert!(matches!(err, ArchiveError::BadLink { .. }), "{err}");
            assert!(fs::symlink_metadata(dest.join("b")).is_err());
            let _ = fs::remove_dir_all(&dest);
        }
        // A symlink chain ending at another symlink is fine.
        let tar = Tar::new()
            .file("f", 0o644, b"ok")
            .link("a", EntryType::Symlink, "f")
            .link("b", EntryType::Symlink, "a");
        extract(&tar.tgz(), &dest).unwrap();
        assert_eq!(fs::read(dest.join("b")).unwrap(), b"ok");
    }

    #[test]
    fn hardlink_escapes_refused() {
        let t = TempDir::new();
        let dest = t.0.join("dest");
        let outside = t.0.join("secret");
        fs::write(&outside, b"secret").unwrap();
        let cases: Vec<Tar> = vec![
            Tar::new().link("h", EntryType::Link, outside.to_str().unwrap()),
            Tar::new().link("h", EntryType::Link, "../secret"),
            Tar::new().link("h", EntryType::Link, "missing"),
            Tar::new()
                .dir("d")
                .link("s", EntryType::Symlink, "d")
                .file("d/f", 0o644, b"x")
                .link("h", EntryType::Link, "s/f"),
            Tar::new().dir("d").link("h", EntryType::Link, "d"),
        ];
        for tar in cases {
            let err = extract(&tar.tgz(), &dest).unwrap_err();
            assert!(matches!(err, ArchiveError::BadLink { .. }), "{err}");
            assert!(fs::symlink_metadata(dest.join("h")).is_err());
            let _ = fs::remove_dir_all(&dest);
        }
        assert_eq!(fs::read(&outside).unwrap(), b"secret");
    }

    #[test]
    fn devices_and_fifos_skipped() {
        let t = TempDir::new();
        let tar = Tar::new()
            .special("dev/null", EntryType::Char)
            .special("dev/sda", EntryType::Block)
            .special("fifo", EntryType::Fifo)
            .file("ok", 0o644, b"ok")
            .tgz();
        let s = extract(&tar, &t.0).unwrap();
        assert_eq!(
            s.skipped,
            vec![
                PathBuf::from("dev/null"),
                PathBuf::from("dev/sda"),
                PathBuf::from("fifo")
            ]
        );
        assert_eq!(s.files, 1);
        assert!(fs::symlink_metadata(t.0.join("dev/null")).is_err());
        assert!(fs::symlink_metadata(t.0.join("fifo")).is_err());
    }

    #[test]
    fn setuid_bits_and_ownership_dropped() {
        let t = TempDir::new();
        let tar = Tar::new()
            .file("suid", 0o4755, b"x")
            .file("ro", 0o400, b"y");
        extract(&tar.tgz(), &t.0).unwrap();
        assert_eq!(mode_of(&t.0.join("suid")), 0o755);
        assert_eq!(mode_of(&t.0.join("ro")), 0o400);
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(t.0.join("suid")).unwrap();
        assert_ne!(md.uid(), 1234);
    }

    #[test]
    fn later_entry_replaces_file_but_not_dir() {
        let t = TempDir::new();
        let tar = Tar::new().file("f", 0o644, b"one").file("f", 0o644, b"two");
        extract(&tar.tgz(), &t.0).unwrap();
        assert_eq!(fs::read(t.0.join("f")).unwrap(), b"two");
        let tar = Tar::new().dir("d").file("d", 0o644, b"x");
        let err = extract(&tar.tgz(), &t.0.join("x")).unwrap_err();
        assert!(matches!(err, ArchiveError::Conflict(_)), "{err}");
    }

    #[test]
    fn entry_limit() {
        let t = TempDir::new();
        let mut tar = Tar::new();
        for i in 0..11 {
            tar = tar.file(&format!("f{i}"), 0o644, b"x");
        }
        let data = tar.tgz();
        let limits = ExtractLimits {
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        let err = extract_tar_gz(&data[..], &t.0.join("a"), &limits).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyEntries(10)), "{err}");
        let limits = ExtractLimits {
            max_entries: 11,
            ..limits
        };
        extract_tar_gz(&data[..], &t.0.join("b"), &limits).unwrap();
    }

    #[test]
    fn byte_limit_zip_bomb() {
        let t = TempDir::new();
        // 64 MiB of zeros compresses to ~64 KiB.
        let big = vec![0u8; 64 << 20];
        let data = Tar::new().file("bomb", 0o644, &big).tgz();
        assert!(data.len() < 1 << 20);
        let limits = ExtractLimits {
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        let err = extract_tar_gz(&data[..], &t.0.join("a"), &limits).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge(_)), "{err}");
        let len = fs::metadata(t.0.join("a/bomb"))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len <= 1 << 20);
        // Spread over several files the total still counts.
        let chunk = vec![1u8; 400 << 10];
        let data = Tar::new()
            .file("a", 0o644, &chunk)
            .file("b", 0o644, &chunk)
            .file("c", 0o644, &chunk)
            .tar();
        let err = extract_tar_gz(&data[..], &t.0.join("b"), &limits).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge(_)), "{err}");
        let limits = ExtractLimits {
            max_bytes: 1200 << 10,
            ..limits
        };
        let s = extract_tar_gz(&data[..], &t.0.join("c"), &limits).unwrap();
        assert_eq!(s.bytes, 1200 << 10);
    }

    #[test]
    fn long_names_via_gnu_extension() {
        let t = TempDir::new();
        let long = format!("{}/file", "d".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        extract(&data, &t.0).unwrap();
        assert_eq!(fs::read(t.0.join(&long)).unwrap(), b"hi");
    }
}
