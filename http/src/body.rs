//! Request bodies: small ones in memory, large ones spooled to an unlinked
//! temporary file while they arrive and handed to the handler as a read-only
//! memory map of that file.
//!
//! A spooled body's pages are page cache (file-backed, reclaimable), not
//! anonymous memory of the server process: concurrent large uploads cost disk
//! (bounded by `max_body_bytes` each), not RSS.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::ops::Deref;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Errors from spooling a request body to disk.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The temporary file could not be created in the spool directory.
    #[error("cannot create a spool file in {0}: {1}")]
    Create(PathBuf, io::Error),
    /// Writing the body to the spool file failed (e.g. disk full).
    #[error("cannot write the request body to its spool file: {0}")]
    Write(io::Error),
    /// Mapping the finished spool file failed.
    #[error("cannot map the spooled request body: {0}")]
    Map(io::Error),
}

/// Where and from what size request bodies are spooled to disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpoolConfig {
    /// Directory for the (unlinked) spool files.
    pub(crate) dir: PathBuf,
    /// Bodies larger than this many bytes go to a spool file.
    pub(crate) threshold: usize,
}

/// The body of a [`Request`](crate::Request), already de-chunked.
///
/// Dereferences to `&[u8]` whatever its storage:
/// - small bodies (up to [`ServerConfig::spool_threshold`](crate::ServerConfig::spool_threshold))
///   are a plain `Vec<u8>`;
/// - larger ones were written to an unlinked temporary file (mode 0600) in
///   [`ServerConfig::spool_dir`](crate::ServerConfig::spool_dir) as they
///   arrived and are seen through a read-only shared memory map of it, so
///   they occupy page cache, not anonymous memory. [`RequestBody::file`]
///   gives the file itself (e.g. to copy it with `std::io::copy` or
///   `copy_file_range`, reading from offset 0).
///
/// Cloning is cheap for spooled bodies (the file and map are shared); the
/// file is closed and its space freed when the last clone is dropped.
#[derive(Clone, Default)]
pub struct RequestBody {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Mem(Vec<u8>),
    Spooled(Arc<Spooled>),
}

impl Default for Inner {
    fn default() -> Self {
        Inner::Mem(Vec::new())
    }
}

/// A finished spool file and its read-only mapping.
struct Spooled {
    file: File,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and never changes after creation (the file
// is unlinked and reopened read-only; nobody else holds a writable fd), so
// sharing the pointer between threads is like sharing a `&[u8]`.
unsafe impl Send for Spooled {}
// SAFETY: see `Send`; no interior mutability.
unsafe impl Sync for Spooled {}

impl Drop for Spooled {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in
        // `Spooled::map`, unmapped only here.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

impl Spooled {
    /// Maps `len` (> 0) bytes of `file` read-only.
    fn map(file: File, len: usize) -> Result<Self, SpoolError> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file
        // we own; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SpoolError::Map(io::Error::last_os_error()));
        }
        Ok(Spooled {
            file,
            ptr: ptr as *const u8,
            len,
        })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self`
        // lives; the file is not written to any more (see `Send`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl RequestBody {
    /// Whether the body was spooled to a file.
    pub fn is_spooled(&self) -> bool {
        matches!(self.inner, Inner::Spooled(_))
    }

    /// The spool file holding the body (read-only fd, at an unspecified
    /// offset: use positioned reads or seek to 0), or None for an in-memory
    /// body. The file is already unlinked; it goes away with the body.
    pub fn file(&self) -> Option<&File> {
        match &self.inner {
            Inner::Spooled(s) => Some(&s.file),
            Inner::Mem(_) => None,
        }
    }

    /// The body as an owned vector (copies a spooled body into memory).
    pub fn into_vec(self) -> Vec<u8> {
        match self.inner {
            Inner::Mem(v) => v,
            Inner::Spooled(s) => s.as_slice().to_vec(),
        }
    }
}

impl Deref for RequestBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.inner {
            Inner::Mem(v) => v,
            Inner::Spooled(s) => s.as_slice(),
        }
    }
}

impl AsRef<[u8]> for RequestBody {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for RequestBody {
    fn from(v: Vec<u8>) -> Self {
        RequestBody {
            inner: Inner::Mem(v),
        }
    }
}

impl From<&[u8]> for RequestBody {
    fn from(v: &[u8]) -> Self {
        v.to_vec().into()
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Mem(v) if v.len() <= 64 => write!(f, "{:?}", String::from_utf8_lossy(v)),
            Inner::Mem(v) => write!(f, "<{} bytes>", v.len()),
            Inner::Spooled(s) => write!(f, "<{} bytes, spooled>", s.len),
        }
    }
}

impl PartialEq for RequestBody {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for RequestBody {}

impl PartialEq<[u8]> for RequestBody {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<&[u8]> for RequestBody {
    fn eq(&self, other: &&[u8]) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for RequestBody {
    fn eq(&self, other: &[u8; N]) -> bool {
        **self == other[..]
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for RequestBody {
    fn eq(&self, other: &&[u8; N]) -> bool {
        **self == other[..]
    }
}

impl PartialEq<Vec<u8>> for RequestBody {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

/// Where a body goes while it arrives: memory until it passes the spool
/// threshold, then an unlinked temporary file.
#[derive(Debug)]
pub(crate) enum BodySink {
    Mem(Vec<u8>, Option<Arc<SpoolConfig>>),
    File(File, usize),
}

impl BodySink {
    pub(crate) fn new(spool: Option<Arc<SpoolConfig>>) -> Self {
        BodySink::Mem(Vec::new(), spool)
    }

    /// Bytes received so far.
    pub(crate) fn len(&self) -> usize {
        match self {
            BodySink::Mem(v, _) => v.len(),
            BodySink::File(_, n) => *n,
        }
    }

    /// Appends body bytes, moving to a spool file when the threshold is
    /// passed.
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            BodySink::Mem(v, spool) => {
                match spool {
                    Some(cfg) if v.len() + data.len() > cfg.threshold => {
                        let mut f = create_spool_file(&cfg.dir)?;
                        f.write_all(v).map_err(SpoolError::Write)?;
                        f.write_all(data).map_err(SpoolError::Write)?;
                        let n = v.len() + data.len();
                        *self = BodySink::File(f, n);
                    }
                    _ => v.extend_from_slice(data),
                }
                Ok(())
            }
            BodySink::File(f, n) => {
                f.write_all(data).map_err(SpoolError::Write)?;
                *n += data.len();
                Ok(())
            }
        }
    }

    /// The finished body.
    pub(crate) fn finish(self) -> Result<RequestBody, SpoolError> {
        match self {
            BodySink::Mem(v, _) => Ok(v.into()),
            BodySink::File(f, 0) => {
                drop(f);
                Ok(RequestBody::default())
            }
            BodySink::File(f, n) => {
                // Keep only a read-only fd so neither the handler (through
                // `RequestBody::file`) nor anyone else can change the bytes
                // under the map. Falls back to the writable fd where /proc
                // is not mounted.
                let f = reopen_read_only(&f).unwrap_or(f);
                Ok(RequestBody {
                    inner: Inner::Spooled(Arc::new(Spooled::map(f, n)?)),
                })
            }
        }
    }
}

fn reopen_read_only(f: &File) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()
}

/// Creates an anonymous file in `dir`: `O_TMPFILE` where the filesystem
/// supports it, else a uniquely named file (`O_EXCL`, mode 0600) that is
/// unlinked right away.
pub(crate) fn create_spool_file(dir: &Path) -> Result<File, SpoolError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(f) => return Ok(f),
        // EISDIR/EOPNOTSUPP/EINVAL: no O_TMPFILE here; anything else (no
        // such directory, permissions) is the same for the fallback.
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::EISDIR | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            return Err(SpoolError::Create(dir.to_path_buf(), e));
        }
        Err(_) => {}
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        let path = dir.join(format!(
            ".ember-http-spool-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)
                    .map_err(|e| SpoolError::Create(dir.to_path_buf(), e))?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(SpoolError::Create(dir.to_path_buf(), e)),
        }
    }
    Err(SpoolError::Create(
        dir.to_path_buf(),
        io::Error::from(io::ErrorKind::AlreadyExists),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn spool_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-http-body-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn small_bodies_stay_in_memory() {
        let cfg = Arc::new(SpoolConfig {
            dir: PathBuf::from("/nonexistent"),
            threshold: 8,
        });
        let mut s = BodySink::new(Some(cfg));
        s.push(b"abcd").unwrap();
        s.push(b"efgh").unwrap();
        let b = s.finish().unwrap();
        assert!(!b.is_spooled() && b.file().is_none());
        assert_eq!(b, b"abcdefgh");
        assert_eq!(b.into_vec(), b"abcdefgh");
    }

    #[test]
    fn large_bodies_are_spooled_unlinked_and_mapped() {
        let dir = spool_dir("large");
        let cfg = Arc::new(SpoolConfig {
            dir: dir.clone(),
            threshold: 4,
        });
        let mut s = BodySink::new(Some(cfg));
        s.push(b"abc").unwrap();
        s.push(b"defg").unwrap();
        s.push(b"hij").unwrap();
        assert_eq!(s.len(), 10);
        let b = s.finish().unwrap();
        assert!(b.is_spooled());
        assert_eq!(b, b"abcdefghij");
        assert_eq!(format!("{b:?}"), "<10 bytes, spooled>");
        // Nothing visible in the directory; the file is private.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let f = b.file().unwrap();
        let md = f.metadata().unwrap();
        assert_eq!((md.len(), md.mode() & 0o777, md.nlink()), (10, 0o600, 0));
        let mut head = [0u8; 3];
        f.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"abc");
        // Read-only: writing through it fails (when /proc was available).
        if std::path::Path::new("/proc/self/fd").exists() {
            assert!((&*f).write(b"x").is_err());
        }
        // Clones share the file; the last one frees it.
        let c = b.clone();
        drop(b);
        let mut all = Vec::new();
        let mut f = c.file().unwrap().try_clone().unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcdefghij");
        drop(c);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn missing_spool_dir_is_an_error() {
        let dir = spool_dir("missing");
        std::fs::remove_dir(&dir).unwrap();
        assert!(matches!(
            create_spool_file(&dir),
            Err(SpoolError::Create(..))
        ));
        let mut s = BodySink::new(Some(Arc::new(SpoolConfig { dir, threshold: 0 })));
        assert!(s.push(b"x").is_err());
    }
}
