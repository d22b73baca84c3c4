//! File helpers of a build: resolving paths inside the build context and
//! inside the image's root filesystem (symlinks kept inside it), copying
//! context entries in, and telling archives by their first bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{internal, ImageStoreError, Result};

/// Most symlinks followed resolving one path inside a rootfs.
const MAX_SYMLINK_HOPS: u32 = 40;

/// The real path of `rel` (relative to the build context root, or absolute
/// meaning the same) inside `ctx`: `..` may not climb out of the context,
/// and symlinks must stay inside it.
pub(super) fn context_path(ctx: &Path, rel: &str) -> Result<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(s) => parts.push(s),
            Component::ParentDir if parts.pop().is_none() => {
                return Err(ImageStoreError::Invalid(format!(
                    "{rel:?} is outside the build context"
                )));
            }
            Component::ParentDir => {}
            _ => {}
        }
    }
    let full = parts.iter().fold(ctx.to_path_buf(), |p, c| p.join(c));
    let real = fs::canonicalize(&full)
        .map_err(|_| ImageStoreError::NotFound(format!("{rel:?} in the build context")))?;
    let root = fs::canonicalize(ctx).map_err(internal(ctx.display()))?;
    if !real.starts_with(&root) {
        return Err(ImageStoreError::Invalid(format!(
            "{rel:?} is outside the build context"
        )));
    }
    Ok(real)
}

/// Shell-style match of `*` and `?`.
pub(super) fn wildcard(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&pat[1..], s) || (!s.is_empty() && wildcard(pat, &s[1..])),
        (Some(b'?'), Some(_)) => wildcard(&pat[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => wildcard(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// The context paths a COPY source names (wildcards in the last
/// component), sorted.
pub(super) fn context_sources(ctx: &Path, src: &str) -> Result<Vec<PathBuf>> {
    let p = Path::new(src);
    let last = p.file_name().map(|n| n.to_string_lossy().to_string());
    match last {
        Some(l) if l.contains(['*', '?']) => {
            let parent = p
                .parent()
                .map(|q| q.to_string_lossy().to_string())
                .unwrap_or_default();
            let dir = context_path(ctx, if parent.is_empty() { "." } else { &parent })?;
            let mut hits = Vec::new();
            for e in fs::read_dir(&dir).map_err(internal(dir.display()))? {
                let e = e.map_err(internal(dir.display()))?;
                let n = e.file_name();
                if wildcard(l.as_bytes(), n.as_encoded_bytes()) {
                    let rel = Path::new(&parent).join(&n);
                    hits.push(context_path(ctx, &rel.to_string_lossy())?);
                }
            }
            hits.sort();
            if hits.is_empty() {
                return Err(ImageStoreError::NotFound(format!(
                    "no file matches {src:?} in the build context"
                )));
            }
            Ok(hits)
        }
        _ => Ok(vec![context_path(ctx, src)?]),
    }
}

/// Resolves the absolute image path `path` below `root` like a chroot
/// would: symlinks (the last component's too) are followed inside the
/// root, `..` stops at it. Missing components are kept as named. The
/// result is free of symlinks (it may not exist yet).
pub(super) fn resolve_in_rootfs(root: &Path, path: &str) -> Result<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    todo.reverse();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let full: PathBuf = cur.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        match fs::symlink_metadata(&full) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(ImageStoreError::Invalid(format!(
                        "too many symlinks in {path:?}"
                    )));
                }
                let target = fs::read_link(&full).map_err(internal(full.display()))?;
                cur.pop();
                if target.is_absolute() {
                    cur.clear();
                }
                let mut t: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                t.reverse();
                todo.extend(t);
            }
            Ok(md) if !md.is_dir() && !todo.is_empty() => {
                return Err(ImageStoreError::Invalid(format!(
                    "{path:?}: a parent in the image is not a directory"
                )))
            }
            _ => {}
        }
    }
    Ok(cur.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Makes `dir` (symlink-free parents) a real directory, creating missing
/// parents with mode 0755 and replacing a non-directory.
pub(super) fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(dir).map_err(internal(dir.display()))?,
        Err(_) => {}
    }
    if let Some(p) = dir.parent() {
        if fs::symlink_metadata(p).is_err() {
            ensure_dir(p, 0o755)?;
        }
    }
    fs::DirBuilder::new()
        .mode(mode & 0o7777)
        .create(dir)
        .map_err(internal(dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(internal(dir.display()))
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).map_err(internal(p.display())),
        Ok(_) => fs::remove_file(p).map_err(internal(p.display())),
        Err(_) => Ok(()),
    }
}

/// Options of one COPY/ADD.
#[derive(Clone, Copy, Default)]
pub(super) struct CopyOpts {
    pub(super) owner: Option<(u32, u32)>,
    pub(super) chmod: Option<u32>,
}

fn lchown(p: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(internal(p.display()))
}

/// Copies the context entry `src` to `dst` (parents symlink-free); a
/// directory's *contents* are merged into `dst`.
pub(super) fn copy_entry(src: &Path, dst: &Path, o: CopyOpts) -> Result<()> {
    let md = fs::symlink_metadata(src).map_err(internal(src.display()))?;
    let ft = md.file_type();
    if ft.is_dir() {
        ensure_dir(dst, o.chmod.unwrap_or(md.mode()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(internal(src.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            copy_entry(&src.join(&n), &dst.join(&n), o)?;
        }
    } else if ft.is_symlink() {
        remove_any(dst)?;
        let t = fs::read_link(src).map_err(internal(src.display()))?;
        std::os::unix::fs::symlink(&t, dst).map_err(internal(dst.display()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
    } else if ft.is_file() {
        remove_any(dst)?;
        let mode = o.chmod.unwrap_or(md.mode()) & 0o7777;
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(internal(src.display()))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(dst)
            .map_err(internal(dst.display()))?;
        io::copy(&mut from, &mut to).map_err(internal(dst.display()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
        to.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(internal(dst.display()))?;
    }
    // Sockets/FIFOs/devices cannot come from an extracted context.
    Ok(())
}

/// What kind of archive a file is, by its first bytes.
pub(super) enum ArchiveKind {
    Tar,
    Other(&'static str),
    None,
}

pub(super) fn sniff_archive(p: &Path) -> ArchiveKind {
    let mut head = Vec::with_capacity(512);
    if File::open(p)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .is_err()
    {
        return ArchiveKind::None;
    }
    if head.starts_with(&[0x1f, 0x8b]) || head.get(257..262) == Some(b"ustar") {
        ArchiveKind::Tar
    } else if head.starts_with(b"BZh") {
        ArchiveKind::Other("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        ArchiveKind::Other("xz")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ArchiveKind::Other("zstd")
    } else {
        ArchiveKind::None
    }
}
