//! Leasing job uids: one `flock`ed file per uid in [`UID_LOCK_DIR`], so
//! that two jobs (in this process or another emberd or test process) never
//! share a uid, and sweeping what is left running as a uid afterwards.

use std::fs::{File, OpenOptions};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::dirs::checked_dir;
use super::SandboxError;

/// Where the uid lock files live (root-only, so no other user can hold or
/// fake a lease).
pub const UID_LOCK_DIR: &str = "/run/ember/job-uids";

/// A uid leased to one job until dropped.
pub(super) struct Lease {
    pub(super) uid: u32,
    _lock: File,
}

/// Leases a free uid of `range`, starting the search at a random point.
pub(super) fn lease(range: &RangeInclusive<u32>) -> Result<Lease, SandboxError> {
    let dir = Path::new(UID_LOCK_DIR);
    checked_dir(dir)?;
    let (start, end) = (*range.start(), *range.end());
    if start == 0 || end < start {
        return Err(SandboxError::BadJob(format!(
            "job uid range {start}-{end} is empty or holds root"
        )));
    }
    let n = u64::from(end - start) + 1;
    let offset = random_u64() % n;
    for i in 0..n {
        let uid = start + ((offset + i) % n) as u32;
        let p = dir.join(uid.to_string());
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(|source| SandboxError::Io {
                what: "open uid lock",
                path: p.clone(),
                source,
            })?;
        // SAFETY: `f` is an open descriptor for the call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Lease { uid, _lock: f });
        }
    }
    Err(SandboxError::NoUid { start, end })
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `b`.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if r != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}

/// Pids of the processes whose real or effective uid is `uid`.
pub(crate) fn processes_of(uid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let owned = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take(2)
                    .any(|u| u.parse() == Ok(uid))
            })
            .unwrap_or(false);
        if owned && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Kills every process left running as the leased `uid` (normally none:
/// the pid namespace is gone with its init) and waits up to `wait` for
/// them to go. Returns how many were found.
pub(super) fn sweep(uid: u32, wait: Duration) -> usize {
    let found = processes_of(uid);
    if found.is_empty() {
        return 0;
    }
    let deadline = Instant::now() + wait;
    loop {
        let left = processes_of(uid);
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in left {
            // SAFETY: signals a process running as a uid leased to us alone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    found.len()
}
