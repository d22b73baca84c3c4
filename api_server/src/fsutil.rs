//! Writing files safely, whatever the umask: atomic replacement (temp
//! file 0600, fsync, rename, fsync of the directory; no temp file left on
//! failure), private directories and files, and handing a tree to root
//! without following its links. The lowest layer: it knows nothing of
//! emberd's model.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir).and_then(|d| d.sync_all())
}

/// Creates `dir` (and its parents) if needed and makes it 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Hands the tree at `dir` (written by a build's uid) to root: every entry
/// root's, directories 0700, files 0600, symlinks left as links (never
/// followed), so no unprivileged uid can change an installed image.
pub fn root_only(dir: &Path) -> io::Result<()> {
    let ft = fs::symlink_metadata(dir)?.file_type();
    if !(ft.is_dir() || ft.is_file()) {
        // Links (and anything but files and directories) are not opened.
        return std::os::unix::fs::lchown(dir, Some(0), Some(0));
    }
    // Through a descriptor opened without following links: what is
    // changed is what was checked.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir)?;
    std::os::unix::fs::fchown(&f, Some(0), Some(0))?;
    let md = f.metadata()?;
    if md.is_dir() {
        f.set_permissions(fs::Permissions::from_mode(0o700))?;
        for e in fs::read_dir(dir)? {
            root_only(&e?.path())?;
        }
        Ok(())
    } else {
        f.set_permissions(fs::Permissions::from_mode(0o600))
    }
}

/// Makes `file` 0600.
pub fn private_file(file: &Path) -> io::Result<()> {
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))
}
