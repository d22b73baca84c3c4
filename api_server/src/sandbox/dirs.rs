//! Directories: the checked base directory, `mkdtemp` job and work
//! directories, handing trees to a job's uid and back, measuring and
//! reading what a job left.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{SandboxConfig, SandboxError};

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `p` with `mode` (not affected by the umask).
pub(super) fn make_dir(p: &Path, mode: u32) -> Result<(), SandboxError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(io_err("create directory", p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", p))
}

/// Makes `p` (and missing parents) if needed, then checks that it is a
/// real directory (not a symlink) owned by us with no access for others,
/// tightening the mode when it is ours but too open.
pub(super) fn checked_dir(p: &Path) -> Result<(), SandboxError> {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create directory", p)(e)),
    }
    let md = fs::symlink_metadata(p).map_err(io_err("stat", p))?;
    let bad = |why: String| SandboxError::Dir {
        path: p.to_path_buf(),
        why,
    };
    if !md.is_dir() {
        return Err(bad("is not a directory (a symlink is not one)".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(bad(format!(
            "belongs to uid {}, not to uid {me}: someone else made it",
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(p, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod", p))?;
    }
    Ok(())
}

/// This process's own base directory, when no base was configured.
static OWN_BASE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Removes [`OWN_BASE`] at exit; every job directory in it is gone by then
/// (removed when its job ends), so only an empty directory is removed.
extern "C" fn remove_own_base() {
    if let Some(Ok(p)) = OWN_BASE.get() {
        let _ = fs::remove_dir(p);
    }
}

/// The base directory of job directories: the configured one (checked
/// with [`checked_dir`]) or this process's own `mkdtemp` directory in the
/// system temp dir, removed at exit.
pub fn base_dir(cfg: &SandboxConfig) -> Result<PathBuf, SandboxError> {
    if let Some(b) = &cfg.base_dir {
        checked_dir(b)?;
        return Ok(b.clone());
    }
    OWN_BASE
        .get_or_init(|| {
            let made = mkdtemp(&std::env::temp_dir(), "ember-jobs")
                .map_err(|e| format!("cannot make a base directory in the temp dir: {e}"));
            if made.is_ok() {
                // SAFETY: registers a plain function that only reads a
                // static and removes a directory.
                unsafe { libc::atexit(remove_own_base) };
            }
            made
        })
        .clone()
        .map_err(|why| SandboxError::Dir {
            path: std::env::temp_dir(),
            why,
        })
}

/// `mkdtemp("<parent>/<prefix>-XXXXXX")`: a new directory, mode 0700, with
/// an unpredictable name.
pub fn mkdtemp(parent: &Path, prefix: &str) -> io::Result<PathBuf> {
    let mut t = parent.join(format!("{prefix}-XXXXXX")).into_os_string();
    t.push("\0");
    let mut buf = t.into_vec();
    // SAFETY: `buf` is a NUL-terminated template that mkdtemp rewrites in
    // place, within its length.
    let r = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if r.is_null() {
        return Err(io::Error::last_os_error());
    }
    buf.pop();
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

use std::os::unix::ffi::OsStringExt;

/// A private `mkdtemp` directory (mode 0700, root's) under the sandbox
/// base, removed with everything in it on drop: work directories of
/// `build/` and `images/` come from here, never from `/tmp/<fixed name>`.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// A new directory `<base>/<prefix>-XXXXXX` under the configured base.
    pub fn new(prefix: &str) -> Result<PrivateDir, SandboxError> {
        let cfg = super::config();
        Self::new_in(&base_dir(&cfg)?, prefix)
    }

    pub(super) fn new_in(base: &Path, prefix: &str) -> Result<PrivateDir, SandboxError> {
        mkdtemp(base, prefix)
            .map(PrivateDir)
            .map_err(io_err("make a directory in", base))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Owners changed by [`hand_over`], put back by [`Handover::restore`].
#[derive(Default)]
pub(super) struct Handover(Vec<(PathBuf, u32, u32)>);

/// Gives `root` and everything below it (links not followed) to uid:gid,
/// remembering the old owners in `h`.
pub(super) fn hand_over(
    h: &mut Handover,
    root: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), SandboxError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(io_err("chown", &p))?;
        h.0.push((p.clone(), md.uid(), md.gid()));
        if md.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err("read directory", &p))? {
                stack.push(e.map_err(io_err("read directory", &p))?.path());
            }
        }
    }
    Ok(())
}

impl Handover {
    /// Puts every owner back (best effort; the first error is returned).
    pub(super) fn restore(&mut self) -> Result<(), SandboxError> {
        let mut first = Ok(());
        for (p, uid, gid) in self.0.drain(..).rev() {
            if let Err(e) = std::os::unix::fs::lchown(&p, Some(uid), Some(gid)) {
                if e.kind() != io::ErrorKind::NotFound && first.is_ok() {
                    first = Err(io_err("chown back", &p)(e));
                }
            }
        }
        first
    }
}

/// Gives the tree a finished job left at `root` (its output directory) to
/// this process's uid and gid: `lchown` of every entry, links not
/// followed. `check` sees every entry below `root` first (its path
/// relative to `root` and its `lstat`) and may refuse it with a reason;
/// FIFOs, sockets and device nodes are always refused (a job that should
/// only write files and directories wrote them; reading one could block
/// emberd). Call it only once nothing of the job runs any more ([`Job::run`]
/// has returned, whatever its result): then no name can change during the
/// walk. The walk goes on after a refusal or an error (every entry it can
/// reach is given back) and returns the first; the caller then removes the
/// tree.
///
/// [`Job::run`]: super::Job::run
pub fn reclaim(
    root: &Path,
    check: impl FnMut(&Path, &fs::Metadata) -> Result<(), String>,
) -> Result<(), SandboxError> {
    reclaim_with(root, check, |_, _| None)
}

/// Who an entry of a reclaimed tree should belong to, and its mode (see
/// [`reclaim_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits (`& 0o7777`) set after the `lchown` (which clears
    /// setuid and setgid bits of files); never applied to symlinks.
    pub mode: Option<u32>,
}

/// [`reclaim`], where `owner` may give an entry (by its path relative to
/// `root`, `""` for `root` itself, and its `lstat`) another owner than
/// this process, and a mode: the job could not `chown` (an image's root
/// filesystem, whose files belong to many users). `owner` only sees
/// entries the walk found (real directories' entries, links not
/// followed), so it cannot name a path outside the tree.
pub fn reclaim_with(
    root: &Path,
    mut check: impl FnMut(&Path, &fs::Metadata) -> Result<(), String>,
    mut owner: impl FnMut(&Path, &fs::Metadata) -> Option<Owner>,
) -> Result<(), SandboxError> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut first = Ok(());
    let mut keep = |r: Result<(), SandboxError>| {
        if first.is_ok() {
            first = r;
        }
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) => {
                keep(Err(io_err("stat", &p)(e)));
                continue;
            }
        };
        let rel = p.strip_prefix(root).unwrap_or(&p);
        let ft = md.file_type();
        let refused = if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
            Some("is a FIFO, socket or device node".to_string())
        } else if p != root {
            check(rel, &md).err()
        } else {
            None
        };
        if let Some(why) = refused {
            keep(Err(SandboxError::Result {
                name: rel.display().to_string(),
                why,
            }));
        }
        let want = if ft.is_file() || ft.is_dir() || ft.is_symlink() {
            owner(rel, &md)
        } else {
            None
        };
        let (wuid, wgid) = want.map_or((uid, gid), |o| (o.uid, o.gid));
        if md.uid() != wuid || md.gid() != wgid {
            keep(
                std::os::unix::fs::lchown(&p, Some(wuid), Some(wgid)).map_err(io_err("chown", &p)),
            );
        }
        if let Some(mode) = want.and_then(|o| o.mode).filter(|_| !ft.is_symlink()) {
            // Not a symlink, and nothing of the job runs: `p` is what
            // the walk found.
            keep(
                fs::set_permissions(&p, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io_err("chmod", &p)),
            );
        }
        if ft.is_dir() {
            match fs::read_dir(&p) {
                Ok(rd) => {
                    for e in rd {
                        match e {
                            Ok(e) => stack.push(e.path()),
                            Err(e) => keep(Err(io_err("read directory", &p)(e))),
                        }
                    }
                }
                Err(e) => keep(Err(io_err("read directory", &p)(e))),
            }
        }
    }
    first
}

/// Bytes allocated below `root` (st_blocks, links not followed, each inode
/// once), stopping early once past `stop`.
pub(super) fn allocated_bytes(root: &Path, stop: u64) -> Result<u64, SandboxError> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        if seen.insert((md.dev(), md.ino())) {
            total = total.saturating_add(md.blocks().saturating_mul(512));
        }
        if total > stop {
            return Ok(total);
        }
        if md.is_dir() {
            for e in fs::read_dir(&p).map_err(io_err("read directory", &p))? {
                stack.push(e.map_err(io_err("read directory", &p))?.path());
            }
        }
    }
    Ok(total)
}

/// Opens the regular file `name` (a plain name, no `/`) in `dir` without
/// following a symlink and without blocking on a FIFO; checks its size.
pub(super) fn open_result(dir: &Path, name: &str, max: u64) -> Result<(File, u64), SandboxError> {
    let bad = |why: String| SandboxError::Result {
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(bad("is not a plain file name".into()));
    }
    let dir_f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(io_err("open", dir))?;
    let c = CString::new(OsStr::new(name).as_bytes()).map_err(|_| bad("has a NUL".into()))?;
    // SAFETY: `dir_f` is an open directory and `c` a NUL-terminated name,
    // both alive for the call; the returned fd is owned below.
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&dir_f),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(bad(match e.raw_os_error() {
            Some(libc::ENOENT) => "was not written".into(),
            Some(libc::ELOOP) => "is a symlink".into(),
            _ => e.to_string(),
        }));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let md = f.metadata().map_err(io_err("stat", dir))?;
    if !md.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    if md.len() > max {
        return Err(bad(format!(
            "is {} bytes, more than the limit of {max}",
            md.len()
        )));
    }
    Ok((f, md.len()))
}

/// Copies at most `len` bytes of `src` to a new file `dest` (replacing it)
/// owned by us, mode `mode`.
pub(super) fn copy_to(src: File, len: u64, dest: &Path, mode: u32) -> Result<u64, SandboxError> {
    let _ = fs::remove_file(dest);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)
        .map_err(io_err("create", dest))?;
    let n = io::copy(&mut src.take(len), &mut out).map_err(io_err("write", dest))?;
    out.flush().map_err(io_err("write", dest))?;
    out.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", dest))?;
    Ok(n)
}
