//! Per-thread seccomp filters.
//!
//! The filters are written in seccompiler's JSON format in
//! `resources/seccomp/vmm.json` and compiled to BPF at build time by
//! `build.rs`; this module only installs them. Each ember-vmm thread installs
//! its own filter before it handles guest or API input:
//!
//! - [`ThreadKind::Api`]: first thing on the API thread.
//! - [`ThreadKind::Vmm`]: on the main (VMM) thread once the API thread is
//!   running, before the config file is read and before the event loop. Its
//!   filter also covers what vCPU threads need, since they are spawned later by
//!   this thread and inherit its filters.
//! - [`ThreadKind::Vcpu`]: first thing on each vCPU thread, stacked on the
//!   inherited VMM filters.
//!
//! A syscall outside a thread's filter kills the whole process with SIGSYS
//! (`kill_process`); the kernel logs the offending syscall number (an audit
//! `type=1326` line in the kernel log).

use std::io;

#[allow(clippy::type_complexity)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp filter named {0:?} was compiled in")]
    Missing(String),
    #[error("prctl(PR_SET_NO_NEW_PRIVS) failed: {0}")]
    NoNewPrivs(io::Error),
    #[error("cannot install the seccomp filter {name:?}: {err}")]
    Install { name: &'static str, err: io::Error },
}

/// The kinds of ember-vmm threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, devices, VM creation at InstanceStart.
    Vmm,
    /// The HTTP API thread.
    Api,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];

    /// The thread kind's name, as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    /// Parses [`ThreadKind::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The filters the thread installs, in order. The VMM thread adds
    /// `vmm_clone3`, which answers clone3(2) with ENOSYS so that glibc falls
    /// back to clone(2), whose flags (unlike clone3's) a filter can check.
    pub fn filters(self) -> &'static [&'static str] {
        match self {
            ThreadKind::Vmm => &["vmm", "vmm_clone3"],
            ThreadKind::Api => &["api"],
            ThreadKind::Vcpu => &["vcpu"],
        }
    }
}

/// Names of all compiled-in filters.
pub fn filter_names() -> impl Iterator<Item = &'static str> {
    generated::FILTERS.iter().map(|(n, _)| *n)
}

/// The BPF program of the filter called `name`.
pub fn program(name: &str) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let (_, insns) = generated::FILTERS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| SeccompError::Missing(name.to_string()))?;
    Ok(insns
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect())
}

/// Installs `prog` on the calling thread. The program must come from
/// [`program`]. Only async-signal-safe calls: usable after fork.
fn apply(name: &'static str, prog: &[libc::sock_filter]) -> Result<(), SeccompError> {
    let len = u16::try_from(prog.len()).map_err(|_| SeccompError::Install {
        name,
        err: io::Error::from_raw_os_error(libc::E2BIG),
    })?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs(io::Error::last_os_error()));
    }
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies
    // the program and keeps no reference to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Install {
            name,
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Installs the filters of `kind` on the calling thread. Threads it creates
/// afterwards inherit them.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    // Build every program before installing any: allocation after the first
    // filter is allowed, but there is no reason to depend on it.
    let progs = kind
        .filters()
        .iter()
        .map(|n| program(n).map(|p| (*n, p)))
        .collect::<Result<Vec<_>, _>>()?;
    for (name, prog) in &progs {
        apply(name, prog)?;
    }
    Ok(())
}

/// Test-only: makes a syscall that no ember-vmm filter allows,
/// `socket(AF_INET, SOCK_STREAM)`, as an escaping VMM might. Under seccomp
/// the process dies with SIGSYS; without, the socket is closed again.
/// Returns whether the call succeeded.
pub fn forbidden_syscall() -> bool {
    // SAFETY: socket(2) with constant arguments; the fd, if any, is closed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_has_its_filters() {
        let names: Vec<&str> = filter_names().collect();
        for k in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(k.name()), Some(k));
            for f in k.filters() {
                assert!(names.contains(f), "{f} missing from {names:?}");
                assert!(!program(f).unwrap().is_empty());
            }
        }
        assert_eq!(ThreadKind::from_name("bogus"), None);
        assert!(matches!(program("bogus"), Err(SeccompError::Missing(_))));
    }

    /// Forks; the child installs `kind`'s filters and then runs `body`,
    /// exiting 0 if it survives. Returns the child's wait status.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> i32 {
        let progs: Vec<(&'static str, Vec<libc::sock_filter>)> = kind
            .filters()
            .iter()
            .map(|n| (*n, program(n).unwrap()))
            .collect();
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, the
        // body's) and _exit()s; no allocation or locks.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            for (n, p) in &progs {
                if apply(n, p).is_err() {
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(2) };
                }
            }
            body();
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        status
    }

    #[test]
    fn a_forbidden_syscall_kills_with_sigsys() {
        for k in ThreadKind::ALL {
            let st = in_filtered_child(k, || {
                forbidden_syscall();
            });
            assert!(libc::WIFSIGNALED(st), "{k:?}: status {st:#x}");
            assert_eq!(libc::WTERMSIG(st), libc::SIGSYS, "{k:?}");
        }
    }

    #[test]
    fn allowed_syscalls_pass() {
        for k in ThreadKind::ALL {
            let st = in_filtered_child(k, || {
                // SAFETY: writing nothing to stderr; futex-free.
                unsafe { libc::write(2, std::ptr::null(), 0) };
            });
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "{k:?}: {st:#x}"
            );
        }
        // A syscall whose arguments are checked: only AF_UNIX sockets.
        let st = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: socket(2) with constant arguments; closed at _exit.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(3) };
            }
        });
        assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st:#x}");
    }
}
