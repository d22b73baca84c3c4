//! Process hygiene done first thing: close inherited file descriptors and
//! clear the environment.

use std::io;

/// Errors from process sanitizing.
#[derive(Debug, thiserror::Error)]
pub enum SanitizeError {
    /// Closing inherited descriptors failed.
    #[error("cannot close inherited file descriptors: {0}")]
    CloseFds(#[source] io::Error),
}

/// Closes every file descriptor above 2.
///
/// Uses `close_range(2)`, falling back to walking `/proc/self/fd` on kernels
/// without it.
pub fn close_inherited_fds() -> Result<(), SanitizeError> {
    // SAFETY: close_range only closes descriptors; no memory is involved.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(SanitizeError::CloseFds(err));
    }
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(SanitizeError::CloseFds)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: closing a descriptor number; the directory stream's own fd
        // is already closed, EBADF is harmless.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Removes every environment variable.
///
/// Must be called while the process is single-threaded.
pub fn clear_env() {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        std::env::remove_var(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_fds_above_two_in_a_child() {
        // Done in a forked child: the test process itself is multi-threaded
        // and must keep its descriptors. The child only makes syscalls.
        // SAFETY: fork/dup2/fcntl/_exit/waitpid on valid arguments.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let ok = libc::dup2(1, 57) == 57
                    && close_inherited_fds().is_ok()
                    && libc::fcntl(57, libc::F_GETFD) == -1
                    && libc::fcntl(2, libc::F_GETFD) != -1;
                libc::_exit(if ok { 0 } else { 1 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
    }
}
