//! Namespaces and process shape: joining a network namespace, daemonizing,
//! forking into a new PID namespace, and the final exec.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors from namespace and process handling.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Opening the netns file failed.
    #[error("cannot open network namespace {0}: {1}")]
    OpenNetns(PathBuf, #[source] io::Error),
    /// setns failed (not a netns file?).
    #[error("cannot join network namespace {0}: {1}")]
    SetNs(PathBuf, #[source] io::Error),
    /// Opening /dev/null failed.
    #[error("cannot open /dev/null: {0}")]
    DevNull(#[source] io::Error),
    /// fork failed.
    #[error("fork failed: {0}")]
    Fork(#[source] io::Error),
    /// setsid failed.
    #[error("setsid failed: {0}")]
    SetSid(#[source] io::Error),
    /// dup2 failed.
    #[error("cannot redirect stdio to /dev/null: {0}")]
    Dup2(#[source] io::Error),
    /// unshare(CLONE_NEWPID) failed.
    #[error("cannot create a PID namespace: {0}")]
    NewPidNs(#[source] io::Error),
    /// An argument has an interior NUL byte.
    #[error("argument {0:?} contains a NUL byte")]
    Nul(OsString),
    /// execve failed.
    #[error("cannot exec {0} inside the jail: {1}")]
    Exec(PathBuf, #[source] io::Error),
    /// prctl(PR_SET_PDEATHSIG) failed.
    #[error("cannot set the parent-death signal: {0}")]
    ParentDeathSignal(#[source] io::Error),
}

fn last_err<T>() -> Result<T, io::Error> {
    Err(io::Error::last_os_error())
}

/// Joins the network namespace at `path` (e.g. `/var/run/netns/NAME`).
pub fn join_netns(path: &Path) -> Result<(), ProcessError> {
    let f = File::open(path).map_err(|e| ProcessError::OpenNetns(path.to_path_buf(), e))?;
    // SAFETY: `f` is an open descriptor for the life of the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(ProcessError::SetNs(
            path.to_path_buf(),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Opens /dev/null (before the jail hides it).
pub fn open_dev_null() -> Result<File, ProcessError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(ProcessError::DevNull)
}

/// Forks; the parent exits 0 at once and the child continues.
fn fork_and_exit_parent() -> Result<(), ProcessError> {
    // SAFETY: the jailer is single-threaded; the child only continues the
    // same straight-line code.
    match unsafe { libc::fork() } {
        -1 => last_err().map_err(ProcessError::Fork),
        0 => Ok(()),
        // SAFETY: _exit skips atexit handlers and stdio flushing, which
        // belong to the child now.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Detaches from the caller: fork (parent exits 0), setsid, fork again (so
/// the process can never reacquire a terminal), stdio to `dev_null`.
pub fn daemonize(dev_null: &File) -> Result<(), ProcessError> {
    fork_and_exit_parent()?;
    // SAFETY: setsid has no preconditions.
    if unsafe { libc::setsid() } < 0 {
        return last_err().map_err(ProcessError::SetSid);
    }
    fork_and_exit_parent()?;
    for fd in 0..=2 {
        // SAFETY: dup2 between open descriptors.
        if unsafe { libc::dup2(dev_null.as_raw_fd(), fd) } < 0 {
            return last_err().map_err(ProcessError::Dup2);
        }
    }
    Ok(())
}

/// Result of [`fork_into_new_pid_ns`] in the calling process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidNsFork {
    /// In the parent: the child's pid (as seen by the parent).
    Parent(u32),
    /// In the child, which is pid 1 of the new namespace.
    Child,
}

/// Creates a PID namespace and forks; the child is its pid 1.
///
/// When not daemonizing and the jailer leads its session, the child starts
/// its own session so it keeps a session leader after the parent exits.
pub fn fork_into_new_pid_ns(daemonized: bool) -> Result<PidNsFork, ProcessError> {
    // SAFETY: getsid/getpid have no preconditions.
    let session_leader = !daemonized && unsafe { libc::getsid(0) == libc::getpid() };
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return last_err().map_err(ProcessError::NewPidNs);
    }
    // SAFETY: single-threaded; see fork_and_exit_parent.
    match unsafe { libc::fork() } {
        -1 => last_err().map_err(ProcessError::Fork),
        0 => {
            // SAFETY: setsid has no preconditions.
            if session_leader && unsafe { libc::setsid() } < 0 {
                return last_err().map_err(ProcessError::SetSid);
            }
            Ok(PidNsFork::Child)
        }
        pid => Ok(PidNsFork::Parent(pid.unsigned_abs())),
    }
}

/// Makes the kernel send `signal` to the calling process when the thread
/// that created it exits. The setting is cleared by fork and by any change
/// of the process's uids or gids, so set it after dropping privileges.
/// Makes no allocation: safe between fork and exec.
pub fn set_parent_death_signal(signal: libc::c_int) -> Result<(), ProcessError> {
    // SAFETY: integer-only prctl.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
        return last_err().map_err(ProcessError::ParentDeathSignal);
    }
    Ok(())
}

/// Exits the process at once with `code` (no destructors, no atexit).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Execs `path` with `args` (argv[0] is `path`) and an empty environment.
///
/// Only returns on failure.
pub fn exec(path: &Path, args: &[OsString]) -> ProcessError {
    let to_c = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| ProcessError::Nul(s.to_os_string()))
    };
    let prog = match to_c(path.as_os_str()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut cargs = vec![prog.clone()];
    for a in args {
        match to_c(a) {
            Ok(c) => cargs.push(c),
            Err(e) => return e,
        }
    }
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv/envp are NULL-terminated arrays of valid C strings kept
    // alive by `cargs`; the Rust runtime ignores SIGPIPE, restore the default
    // so the VMM starts with a clean disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    ProcessError::Exec(path.to_path_buf(), io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_errors() {
        let e = join_netns(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(matches!(e, ProcessError::OpenNetns(_, _)));
        assert!(e.to_string().contains("/nonexistent/netns"));
    }

    #[test]
    fn exec_rejects_nul() {
        let e = exec(Path::new("/x"), &[OsString::from("a\0b")]);
        assert!(matches!(e, ProcessError::Nul(_)));
    }

    #[test]
    fn exec_missing_program() {
        let e = exec(Path::new("/nonexistent/vmm"), &[]);
        assert!(matches!(e, ProcessError::Exec(_, _)));
    }
}
