//! Unpacking: applying an image's layers to a directory (whiteouts,
//! no writes through symlinks, limits, ownership and modes), and what is
//! built on it: an ext4 image of the tree, one file of the image.
//!
//! With emberd's binary configured ([`crate::sandbox::SandboxConfig::self_exe`])
//! the layers are applied in a sandbox job (`sandboxed.rs`); else (library
//! tests) here, in-process. Either way every layer blob is hashed as it is
//! read and must still match its digest and size.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use sha2::{Digest, Sha256};

use super::blobs::{check_digest, check_size, decompressed, hex};
use super::{
    io_err, sandboxed, Compression, Layer, OciError, OciImage, ScratchDir, UnpackSummary,
    ZSTD_MAGIC,
};
use crate::images::archive::{self, ArchiveError, ExtractLimits};
use crate::images::volumes;

/// Most symlinks followed when resolving one path inside an image.
const MAX_SYMLINK_HOPS: u32 = 40;
const STREAM_OVERHEAD_PER_ENTRY: u64 = 4 * 1024;
const STREAM_OVERHEAD: u64 = 1024 * 1024;

impl OciImage {
    /// The layers, lowest first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Sum of the layer blob sizes, in bytes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Applies the layers in order below `dest` (created if missing; should
    /// be empty). See the module documentation for the rules. On error
    /// `dest` may hold a partial tree; the caller removes it. In emberd
    /// this runs in a sandbox job, never in emberd's process.
    pub fn unpack(&self, dest: &Path, limits: &ExtractLimits) -> Result<UnpackSummary, OciError> {
        match crate::sandbox::config().self_exe.clone() {
            Some(exe) => sandboxed::unpack(self, dest, limits, &exe),
            None => self.unpack_in_process(dest, limits),
        }
    }

    fn unpack_in_process(
        &self,
        dest: &Path,
        limits: &ExtractLimits,
    ) -> Result<UnpackSummary, OciError> {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owners = unsafe { libc::geteuid() } == 0;
        let mut ap = Applier::new(dest, limits, owners, false);
        for layer in &self.layers {
            let mut f = File::open(&layer.path).map_err(io_err(&layer.path))?;
            ap.apply_layer(&layer.digest, layer.size, &mut f)?;
        }
        Ok(ap.finish()?.0)
    }

    /// Unpacks the image into a scratch directory and builds an ext4 image
    /// of it at `out` (see [`volumes::create_ext4_from_dir`]; `None` sizes it
    /// to fit). Returns the image size in MB.
    pub fn to_ext4(&self, out: &Path, size_mb: Option<u64>) -> Result<u64, OciError> {
        let scratch = ScratchDir::new(&self.scratch_parent)?;
        let rootfs = scratch.0.join("rootfs");
        self.unpack(&rootfs, &self.limits)?;
        Ok(volumes::create_ext4_from_dir(out, &rootfs, size_mb)?)
    }

    /// Writes the content of one file of the image (as the final tree has
    /// it: last layer wins, whiteouts respected, symlinks followed inside the
    /// image root) to `out`, with its permission bits. The image is unpacked
    /// into a scratch directory for this (in emberd, both the unpacking and
    /// the finding run in a sandbox job). A missing (or whited-out) file is
    /// [`OciError::NotFound`], a directory [`OciError::NotAFile`].
    pub fn extract_file(&self, path_in_image: &str, out: &Path) -> Result<(), OciError> {
        let scratch = ScratchDir::new(&self.scratch_parent)?;
        if let Some(exe) = crate::sandbox::config().self_exe.clone() {
            return sandboxed::extract_file(self, &scratch.0, path_in_image, out, &exe);
        }
        let rootfs = scratch.0.join("rootfs");
        self.unpack_in_process(&rootfs, &self.limits)?;
        copy_out(&rootfs, path_in_image, out).map(|_| ())
    }
}

/// Copies the file `path_in_image` of the unpacked tree `rootfs` (found
/// with [`resolve_in_root`]) to a new file `out`; returns its permission
/// bits, which `out` gets too.
pub(super) fn copy_out(rootfs: &Path, path_in_image: &str, out: &Path) -> Result<u32, OciError> {
    let rel = resolve_in_root(rootfs, path_in_image)?;
    let full = rootfs.join(&rel);
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&full)
        .map_err(io_err(&full))?;
    let md = src.metadata().map_err(io_err(&full))?;
    if !md.is_file() {
        return Err(OciError::NotAFile(path_in_image.to_string()));
    }
    let mut dst = File::create(out).map_err(io_err(out))?;
    io::copy(&mut src, &mut dst).map_err(io_err(out))?;
    let mode = md.mode() & 0o777;
    dst.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(out))?;
    Ok(mode)
}

/// Resolves `path` inside the tree at `root` like a chroot would (absolute
/// symlinks start at `root`, `..` stops at it); returns the root-relative
/// path of the final, symlink-free file.
fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, OciError> {
    let not_found = || OciError::NotFound(path.to_string());
    let comps = |p: &Path| -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut todo: Vec<OsString> = comps(Path::new(path));
    todo.reverse(); // a stack: next component last
    let mut cur: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let full: PathBuf = cur.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let md = match fs::symlink_metadata(&full) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(io_err(&full)(e)),
        };
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(OciError::Invalid(format!(
                    "too many symlinks resolving {path:?}"
                )));
            }
            let target = fs::read_link(&full).map_err(io_err(&full))?;
            cur.pop();
            if target.is_absolute() {
                cur.clear();
            }
            let mut t = comps(&target);
            t.reverse();
            todo.extend(t);
        } else if !md.is_dir() && !todo.is_empty() {
            return Err(not_found());
        }
    }
    if cur.is_empty() {
        return Err(OciError::NotAFile(path.to_string()));
    }
    Ok(cur.iter().collect())
}

/// A reader that fails once more than `left` bytes went through it.
struct CappedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decompressed layer stream exceeds the size limit",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A reader that hashes (sha256) and counts what goes through it.
struct Hashed<R> {
    inner: R,
    hash: Sha256,
    read: u64,
}

impl<R: Read> Read for Hashed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(buf.get(..n).unwrap_or(&[]));
        self.read += n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) mode: u32,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
}

impl Meta {
    /// Whether a tree written without `chown` (by a job's uid) needs this
    /// put right afterwards: another owner than root, or setuid, setgid or
    /// sticky bits (a root `chown` clears setuid and setgid).
    fn needs_fixup(&self) -> bool {
        self.uid.unwrap_or(0) != 0 || self.gid.unwrap_or(0) != 0 || self.mode & 0o7000 != 0
    }
}

/// Applies layers, one after the other, to one tree.
pub(super) struct Applier<'a> {
    dest: &'a Path,
    limits: &'a ExtractLimits,
    /// Restore uid/gid (running as root).
    owners: bool,
    /// Not root but the tree is for root (the sandbox job): set exact
    /// modes, and remember in `records` what only root can set.
    record: bool,
    summary: UnpackSummary,
    /// Directory metadata applied at the end, by dest-relative path.
    dir_meta: BTreeMap<PathBuf, Meta>,
    /// Files and symlinks whose owner or mode needs root (`record`).
    records: BTreeMap<PathBuf, Meta>,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads up to `n` bytes (fewer only at the end of `r`).
fn read_head(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(n);
    (&mut *r).take(n as u64).read_to_end(&mut head)?;
    Ok(head)
}

impl<'a> Applier<'a> {
    pub(super) fn new(
        dest: &'a Path,
        limits: &'a ExtractLimits,
        owners: bool,
        record: bool,
    ) -> Self {
        Applier {
            dest,
            limits,
            owners,
            record,
            summary: UnpackSummary::default(),
            dir_meta: BTreeMap::new(),
            records: BTreeMap::new(),
        }
    }

    /// Applies the layer blob `digest` of `size` bytes, the next `size`
    /// bytes of `blob`. Its compression is sniffed from its first bytes;
    /// what is read is hashed, and the whole blob (read to its end even
    /// when the layer is refused) must match `digest` and `size`: a
    /// mismatch wins over any other error of the layer.
    pub(super) fn apply_layer(
        &mut self,
        digest: &str,
        size: u64,
        blob: &mut dyn Read,
    ) -> Result<(), OciError> {
        let mut hashed = Hashed {
            inner: blob.take(size),
            hash: Sha256::new(),
            read: 0,
        };
        let applied = self.apply_tar(digest, &mut hashed);
        let drained = io::copy(&mut hashed, &mut io::sink());
        let what = format!("layer {digest}");
        if drained.is_ok() {
            check_size(&what, Some(size), hashed.read)?;
            let actual = format!("sha256:{}", hex(&hashed.hash.finalize()));
            check_digest(&what, digest, &actual)?;
        }
        applied?;
        drained.map_err(|e| OciError::Layer {
            digest: digest.to_string(),
            source: ArchiveError::Read(e),
        })?;
        self.summary.layers += 1;
        Ok(())
    }

    fn apply_tar(&mut self, digest: &str, blob: &mut dyn Read) -> Result<(), OciError> {
        let lerr = |source| OciError::Layer {
            digest: digest.to_string(),
            source,
        };
        let head = read_head(blob, ZSTD_MAGIC.len()).map_err(|e| lerr(ArchiveError::Read(e)))?;
        let compression = if head == ZSTD_MAGIC {
            Compression::Zstd
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else {
            Compression::None
        };
        let stream = BufReader::new(io::Cursor::new(head).chain(blob));
        let cap = self
            .limits
            .max_bytes
            .saturating_add(
                self.limits
                    .max_entries
                    .saturating_mul(STREAM_OVERHEAD_PER_ENTRY),
            )
            .saturating_add(STREAM_OVERHEAD);
        let reader: Box<dyn Read + '_> = decompressed(compression, stream);
        let mut tar = tar::Archive::new(CappedReader {
            inner: reader,
            left: cap,
        });
        // Paths this layer created or touched (and their ancestors): what an
        // opaque marker or a whiteout of the same layer must not remove.
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let entries = tar.entries().map_err(|e| lerr(archive::read_err(e)))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| lerr(archive::too_large_or_read(e, &self.limits)))?;
            self.summary.entries += 1;
            if self.summary.entries > self.limits.max_entries {
                return Err(lerr(ArchiveError::TooManyEntries(self.limits.max_entries)));
            }
            self.apply_entry(&mut entry, &mut this_layer)
                .map_err(lerr)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), ArchiveError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let rel = archive::normalize(&raw)?;
        let header = entry.header();
        let meta = Meta {
            mode: header.mode().map_err(ArchiveError::Read)? & 0o7777,
            uid: header.uid().ok().and_then(|u| u32::try_from(u).ok()),
            gid: header.gid().ok().and_then(|g| u32::try_from(g).ok()),
        };
        if rel.as_os_str().is_empty() {
            if kind == EntryType::Directory {
                self.dir_meta.insert(PathBuf::new(), meta);
            }
            return Ok(());
        }
        let name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        if let Some(wh) = name.strip_prefix(b".wh.") {
            self.summary.whiteouts += 1;
            return self.whiteout(&rel, &raw, wh, this_layer);
        }
        self.walk_parents(&rel, &raw, true)?;
        for a in rel.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if !this_layer.insert(a.to_path_buf()) {
                break;
            }
        }
        let full = self.dest.join(&rel);
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        self.remove(&rel)?;
                        self.mkdir(&full)?;
                    }
                    Err(_) => self.mkdir(&full)?,
                }
                self.dir_meta.insert(rel, meta);
                self.summary.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove(&rel)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&full)
                    .map_err(write_err(&full))?;
                let budget = self.limits.max_bytes.saturating_sub(self.summary.bytes);
                let written = archive::copy_limited(entry, &mut file, budget, &full, &self.limits)?;
                self.summary.bytes += written;
                if self.owners {
                    std::os::unix::fs::fchown(&file, meta.uid, meta.gid)
                        .map_err(write_err(&full))?;
                }
                file.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(write_err(&full))?;
                if self.record && meta.needs_fixup() {
                    self.records.insert(rel, meta);
                }
                self.summary.files += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.as_os_str().is_empty() {
                    return Err(ArchiveError::BadLink {
                        path: raw,
                        target,
                        reason: "empty symlink target".into(),
                    });
                }
                self.remove(&rel)?;
                std::os::unix::fs::symlink(&target, &full).map_err(write_err(&full))?;
                if self.owners {
                    std::os::unix::fs::lchown(&full, meta.uid, meta.gid)
                        .map_err(write_err(&full))?;
                }
                let owner = Meta { mode: 0, ..meta };
                if self.record && owner.needs_fixup() {
                    self.records.insert(rel, owner);
                }
                self.summary.symlinks += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let bad = |reason: &'static str| ArchiveError::BadLink {
                    path: raw.clone(),
                    target: target.clone(),
                    reason: reason.into(),
                };
                let target_rel = archive::hard_link_target(&raw, &target)?;
                if target_rel == rel {
                    return Ok(());
                }
                if !self.walk_parents(&target_rel, &raw, false)? {
                    return Err(bad("hard-link target is not a regular file of the image"));
                }
                let target_full = self.dest.join(&target_rel);
                match fs::symlink_metadata(&target_full) {
                    Ok(md) if md.is_file() => {}
                    _ => return Err(bad("hard-link target is not a regular file of the image")),
                }
                self.remove(&rel)?;
                fs::hard_link(&target_full, &full).map_err(write_err(&full))?;
                // The same inode: what the target needs, this name needs
                // too (the target may be whited out by a later layer).
                if let Some(m) = self.records.get(&target_rel).copied() {
                    self.records.insert(rel, m);
                }
                self.summary.hardlinks += 1;
            }
            _ => self.summary.skipped.push(raw),
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        rel: &Path,
        raw: &Path,
        wh: &[u8],
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), ArchiveError> {
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if wh == b".wh..opq" {
            // The directory exists in this layer, and only this layer's
            // content of it remains.
            self.walk_parents(rel, raw, true)?;
            for a in parent.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                this_layer.insert(a.to_path_buf());
            }
            return self.clear_lower(&parent, this_layer);
        }
        if wh.starts_with(b".wh.") || wh.is_empty() || wh == b"." {
            return Ok(()); // aufs metadata (.wh..wh.plnk, ...) or no name
        }
        if wh == b".." {
            return Err(ArchiveError::ParentDir(raw.to_path_buf()));
        }
        let target = parent.join(OsStr::from_bytes(wh));
        if this_layer.contains(&target) {
            return Ok(()); // whiteouts hide lower layers only
        }
        if !self.walk_parents(&target, raw, false)? {
            return Ok(()); // nothing there to hide
        }
        self.remove(&target)
    }

    /// Removes everything below `dir` that this layer did not put there.
    fn clear_lower(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), ArchiveError> {
        let full = self.dest.join(dir);
        let mut children = Vec::new();
        for e in fs::read_dir(&full).map_err(write_err(&full))? {
            children.push(e.map_err(write_err(&full))?.file_name());
        }
        for name in children {
            let crel = dir.join(&name);
            if !keep.contains(&crel) {
                self.remove(&crel)?;
                continue;
            }
            let cfull = self.dest.join(&crel);
            let is_dir = fs::symlink_metadata(&cfull)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if is_dir {
                self.clear_lower(&crel, keep)?;
            }
        }
        Ok(())
    }

    fn mkdir(&self, full: &Path) -> Result<(), ArchiveError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(full)
            .map_err(write_err(full))
    }

    /// Removes `rel` (any kind, recursively, never following symlinks);
    /// its parents were checked by the caller. Missing is fine.
    fn remove(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let full = self.dest.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&full).map_err(write_err(&full))?,
            Ok(_) => fs::remove_file(&full).map_err(write_err(&full))?,
            Err(_) => return Ok(()),
        }
        // Forget the metadata of removed directories.
        let stale: Vec<PathBuf> = self
            .dir_meta
            .range(rel.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(rel))
            .cloned()
            .collect();
        for k in stale {
            self.dir_meta.remove(&k);
        }
        let stale: Vec<PathBuf> = self
            .records
            .range(rel.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(rel))
            .cloned()
            .collect();
        for k in stale {
            self.records.remove(&k);
        }
        Ok(())
    }

    /// Checks that every parent of `rel` is a real directory (never a
    /// symlink). Missing parents are created (mode 0755) when `create` is
    /// set; otherwise Ok(false) tells that a parent is missing.
    fn walk_parents(&self, rel: &Path, shown: &Path, create: bool) -> Result<bool, ArchiveError> {
        let mut cur = self.dest.to_path_buf();
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(ArchiveError::ThroughSymlink(shown.to_path_buf()))
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) if create => return Err(ArchiveError::Conflict(shown.to_path_buf())),
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    self.mkdir(&cur)?;
                }
                Err(source) => {
                    return Err(ArchiveError::Write {
                        path: cur.clone(),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Applies directory metadata (see [`Applier::dir_metadata`]) and
    /// returns what was done, with the owners and modes only root can set
    /// (`record`; dest-relative paths, `""` for `dest`; empty otherwise).
    pub(super) fn finish(mut self) -> Result<(UnpackSummary, Vec<(PathBuf, Meta)>), OciError> {
        self.dir_metadata().map_err(|source| OciError::Layer {
            digest: "(directory metadata)".into(),
            source,
        })?;
        Ok((self.summary, self.records.into_iter().collect()))
    }

    /// Applies directory metadata, children before parents, through
    /// descriptors opened without following symlinks.
    fn dir_metadata(&mut self) -> Result<(), ArchiveError> {
        let metas = std::mem::take(&mut self.dir_meta);
        for (rel, meta) in metas.iter().rev() {
            if !rel.as_os_str().is_empty() && !self.walk_parents(rel, rel, false)? {
                continue;
            }
            let full = self.dest.join(rel);
            let dir = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&full)
            {
                Ok(d) => d,
                Err(_) => continue, // replaced by a non-directory since
            };
            let mut mode = meta.mode;
            if self.owners {
                std::os::unix::fs::fchown(&dir, meta.uid, meta.gid).map_err(write_err(&full))?;
            } else if self.record {
                if meta.needs_fixup() {
                    self.records.insert(rel.clone(), *meta);
                }
            } else {
                mode |= 0o700;
            }
            dir.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_err(&full))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::TempDir;

    #[test]
    fn resolve_in_root_follows_links_inside() {
        let t = TempDir::new();
        let r = &t.0;
        fs::create_dir_all(r.join("boot/real")).unwrap();
        fs::write(r.join("boot/real/vmlinux-1"), b"k").unwrap();
        std::os::unix::fs::symlink("/boot/real/vmlinux-1", r.join("boot/vmlinux")).unwrap();
        std::os::unix::fs::symlink("../../../../boot", r.join("b")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("host")).unwrap();
        assert_eq!(
            resolve_in_root(r, "boot/vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert_eq!(
            resolve_in_root(r, "/b/vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert_eq!(
            resolve_in_root(r, "../../boot/real/../vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert!(matches!(
            resolve_in_root(r, "host"),
            Err(OciError::NotFound(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "loop"),
            Err(OciError::Invalid(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "boot/real/vmlinux-1/x"),
            Err(OciError::NotFound(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "/"),
            Err(OciError::NotAFile(_))
        ));
    }
}
