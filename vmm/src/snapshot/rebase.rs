//! Merging a Diff snapshot's memory file onto its base (`ember-snapshot-editor
//! edit-memory rebase`, the shape of Firecracker's `snapshot-editor`).
//!
//! A Diff memory file has the Full layout with holes where pages did not
//! change (`snapshot/dirty.rs`). Its data extents are found with
//! `lseek(SEEK_DATA)`/`lseek(SEEK_HOLE)` and copied to the same offsets of
//! the base file, which is changed in place: afterwards the base is the Full
//! memory of the moment the Diff was taken, and loads with the Diff's state
//! file.
//!
//! Both files are hostile input: they are opened with `O_NOFOLLOW` (a
//! symlink is refused, so the write can never land elsewhere), must be
//! regular files, and must have the same size (a Diff is always sized to the
//! whole memory); the base is never created or grown. Nothing of either
//! file's contents appears in an error.
//!
//! This file is compiled into the `ember-snapshot-editor` binary and, for its
//! tests, into the vmm library.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Bytes copied per `pread`/`pwrite`.
const CHUNK: usize = 1 << 20;

/// Errors merging a diff onto its base.
#[derive(Debug, thiserror::Error)]
pub enum RebaseError {
    /// A file could not be opened (a symlink is refused with ELOOP).
    #[error("cannot open the {what} file {path}: {err}")]
    Open {
        /// `base memory` or `diff memory`.
        what: &'static str,
        /// The path given.
        path: String,
        /// The system call's error.
        err: std::io::Error,
    },
    /// A path names something other than a regular file.
    #[error("the {what} file {path} is not a regular file")]
    NotRegular {
        /// `base memory` or `diff memory`.
        what: &'static str,
        /// The path given.
        path: String,
    },
    /// Base and diff are the same file.
    #[error("the diff memory file is the base memory file")]
    SameFile,
    /// The sizes differ: the diff was not taken from a VM of the base's memory size.
    #[error("the diff memory file is {diff} bytes, the base {base}: a diff has its base's size (same machine memory)")]
    SizeMismatch {
        /// Base size.
        base: u64,
        /// Diff size.
        diff: u64,
    },
    /// `lseek(SEEK_DATA/SEEK_HOLE)` on the diff failed.
    #[error("cannot find the data of the diff memory file (lseek at {offset:#x}): {err}")]
    Seek {
        /// Where.
        offset: u64,
        /// The system call's error.
        err: std::io::Error,
    },
    /// Reading the diff or writing the base failed.
    #[error("cannot copy the diff's data at offset {offset:#x}: {err}")]
    Copy {
        /// Where.
        offset: u64,
        /// The system call's error.
        err: std::io::Error,
    },
}

/// What a rebase did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Bytes of the diff's data copied onto the base.
    pub bytes: u64,
    /// Data extents found in the diff.
    pub extents: u64,
}

fn open(path: &Path, what: &'static str, write: bool) -> Result<File, RebaseError> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| RebaseError::Open {
            what,
            path: path.display().to_string(),
            err,
        })?;
    let md = f.metadata().map_err(|err| RebaseError::Open {
        what,
        path: path.display().to_string(),
        err,
    })?;
    if !md.file_type().is_file() {
        return Err(RebaseError::NotRegular {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(f)
}

/// Copies the data of the diff at `diff` onto the base at `base`, in place.
pub fn rebase(base: &Path, diff: &Path) -> Result<RebaseStats, RebaseError> {
    // The diff first: a FIFO or device given as the base is then never
    // opened for writing before the checks of the diff ran.
    let d = open(diff, "diff memory", false)?;
    let b = open(base, "base memory", true)?;
    rebase_files(&b, &d)
}

/// [`rebase`] on open files.
pub fn rebase_files(base: &File, diff: &File) -> Result<RebaseStats, RebaseError> {
    use std::os::unix::fs::MetadataExt;
    let (bm, dm) = (
        base.metadata()
            .map_err(|err| RebaseError::Copy { offset: 0, err })?,
        diff.metadata()
            .map_err(|err| RebaseError::Copy { offset: 0, err })?,
    );
    if bm.dev() == dm.dev() && bm.ino() == dm.ino() {
        return Err(RebaseError::SameFile);
    }
    if bm.len() != dm.len() {
        return Err(RebaseError::SizeMismatch {
            base: bm.len(),
            diff: dm.len(),
        });
    }
    let size = dm.len();
    let mut stats = RebaseStats::default();
    let mut buf = vec![0u8; CHUNK];
    for extent in super::extents::data_extents(diff, 0, size) {
        let (start, end) = extent.map_err(|(offset, err)| RebaseError::Seek { offset, err })?;
        stats.extents += 1;
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            diff.read_exact_at(&mut buf[..n], at)
                .map_err(|err| RebaseError::Copy { offset: at, err })?;
            base.write_all_at(&buf[..n], at)
                .map_err(|err| RebaseError::Copy { offset: at, err })?;
            at += n as u64;
        }
        stats.bytes += end - start;
    }
    base.sync_data()
        .map_err(|err| RebaseError::Copy { offset: size, err })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "ember-rebase-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        Tmp(p)
    }

    fn sparse(path: &Path, size: u64, pages: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        for &(p, v) in pages {
            f.write_all_at(&[v; 4096], p * 4096).unwrap();
        }
        f.set_len(size).unwrap();
    }

    #[test]
    fn data_extents_land_on_the_base_and_holes_keep_it() {
        let t = tmp("basic");
        let (base, diff) = (t.0.join("base"), t.0.join("diff"));
        std::fs::write(&base, vec![0xaa; 64 * 4096]).unwrap();
        sparse(&diff, 64 * 4096, &[(0, 1), (1, 2), (10, 3), (63, 4)]);
        let st = rebase(&base, &diff).unwrap();
        assert_eq!(st.bytes, 4 * 4096);
        assert_eq!(st.extents, 3);
        let got = std::fs::read(&base).unwrap();
        for p in 0..64usize {
            let want = match p {
                0 => 1,
                1 => 2,
                10 => 3,
                63 => 4,
                _ => 0xaa,
            };
            assert!(
                got[p * 4096..(p + 1) * 4096].iter().all(|&b| b == want),
                "page {p}"
            );
        }
    }

    /// A diff page of zeros written by the VMM is data, not a hole: it
    /// overwrites the base.
    #[test]
    fn written_zero_pages_overwrite_the_base() {
        let t = tmp("zero");
        let (base, diff) = (t.0.join("base"), t.0.join("diff"));
        std::fs::write(&base, vec![0x55; 8 * 4096]).unwrap();
        sparse(&diff, 8 * 4096, &[(2, 0)]);
        rebase(&base, &diff).unwrap();
        let got = std::fs::read(&base).unwrap();
        assert!(got[2 * 4096..3 * 4096].iter().all(|&b| b == 0));
        assert!(got[3 * 4096..].iter().all(|&b| b == 0x55));
    }

    #[test]
    fn hostile_paths_and_sizes_are_refused() {
        let t = tmp("hostile");
        let (base, diff, link, other) = (
            t.0.join("base"),
            t.0.join("diff"),
            t.0.join("link"),
            t.0.join("other"),
        );
        std::fs::write(&base, vec![1; 8192]).unwrap();
        std::fs::write(&other, vec![9; 8192]).unwrap();
        sparse(&diff, 4096, &[(0, 7)]);
        std::os::unix::fs::symlink(&other, &link).unwrap();

        let e = rebase(&base, &diff).unwrap_err();
        assert!(
            matches!(
                e,
                RebaseError::SizeMismatch {
                    base: 8192,
                    diff: 4096
                }
            ),
            "{e}"
        );
        sparse(&diff, 8192, &[(0, 7)]);
        // A symlinked base is refused, and its target untouched.
        let e = rebase(&link, &diff).unwrap_err();
        assert!(e.to_string().contains("base memory"), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), vec![9; 8192]);
        let e = rebase(&base, &link).unwrap_err();
        assert!(e.to_string().contains("diff memory"), "{e}");
        assert!(matches!(
            rebase(&t.0, &diff).unwrap_err(),
            RebaseError::Open { .. } | RebaseError::NotRegular { .. }
        ));
        assert!(matches!(
            rebase(&base, &base).unwrap_err(),
            RebaseError::SameFile
        ));
        let e = rebase(&t.0.join("missing"), &diff).unwrap_err();
        assert!(
            e.to_string().contains("cannot open the base memory file"),
            "{e}"
        );
        // Nothing was written by the refusals.
        assert_eq!(std::fs::read(&base).unwrap(), vec![1; 8192]);
    }
}
