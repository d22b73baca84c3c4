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
//!
//! # Allocation under the filters
//!
//! Every thread allocates, so every filter must allow exactly what glibc's
//! malloc does, and malloc must do nothing else. [`configure_allocator`] runs
//! first thing in `main`, while the process has one thread, and fixes how
//! malloc behaves for the rest of the process's life:
//!
//! - `M_ARENA_MAX` = 1: every thread allocates from the main arena, which
//!   grows and shrinks with `brk` and falls back to `mmap` only if `brk`
//!   fails. No thread ever creates a second arena. A second arena is what
//!   killed ember-vmm before: it is a 64 MiB `mmap(PROT_NONE)` reservation
//!   grown with `mprotect`, and the first time such an arena shrinks
//!   (`shrink_heap`, from `free`) glibc opens `/proc/sys/vm/overcommit_memory`
//!   (once per process), which no filter but the VMM's allows. The main arena
//!   never reads that file, so nothing has to be pre-read before the filters
//!   go on. The price is one malloc lock for all threads; the per-thread
//!   tcache serves most small allocations without it, and ember has few
//!   threads (VMM, API, one per vCPU) that allocate little.
//! - `M_MMAP_THRESHOLD` = 128 KiB, fixed: chunks from 128 KiB up are mapped
//!   on their own (`mmap`), grown or shrunk in place or moved by `realloc`
//!   (`mremap` with `MREMAP_MAYMOVE`) and given back by `free` (`munmap`).
//!   Setting it turns off glibc's sliding threshold, so large buffers (vsock
//!   connection buffers grow from 128 to 256 KiB) always take that path.
//! - `M_TRIM_THRESHOLD` = 1 MiB and `M_TOP_PAD` = 128 KiB: `free` gives the
//!   top of the heap back with `brk` only when more than 1 MiB is free
//!   there, and growth asks for 128 KiB extra, so `brk` is not called on
//!   every allocation.
//!
//! The allocator's syscalls are then, on any thread: `brk` (grow, and trim
//! from `free` or `malloc_trim`), `mmap` (large chunks; heap fallback) with
//! `PROT_READ|PROT_WRITE`, `munmap`, `mremap(MREMAP_MAYMOVE)`, and
//! `madvise(MADV_DONTNEED)` (`malloc_trim` on free pages inside the heap; also
//! glibc releasing a thread's stack at thread exit). Per filter:
//!
//! | filter | allocator syscalls allowed | and why |
//! |---|---|---|
//! | `vmm` (VMM thread; inherited by vCPU threads) | `brk`, `mmap` and `mprotect` without `PROT_EXEC`, `munmap`, `mremap` (`MREMAP_MAYMOVE` only), `madvise` (`MADV_DONTNEED`; `MADV_POPULATE_WRITE` for the snapshot load's prefault) | all of malloc's; `mprotect` because this thread creates the vCPU threads (`pthread_create` maps their stacks and guard pages, and a new thread maps the guard page of its signal stack before it installs its own filter) |
//! | `api` (API thread) | `brk`, `mmap` without `PROT_EXEC`, `munmap`, `mremap` (`MREMAP_MAYMOVE` only), `madvise` (`MADV_DONTNEED` only) | malloc's; no `mprotect` (only a second arena needed it) |
//! | `vcpu` (stacked on `vmm`) | the same as `api` | malloc's; a vCPU thread frees device state (`Vsock::reset` from a status write) and may trim the heap |
//!
//! `openat` and `mprotect` on the API and vCPU threads are not allowed, nor
//! is `MADV_HUGEPAGE` except on the VMM thread, which advises guest memory
//! once for `huge_pages: "Transparent"`. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` would make malloc
//! call `madvise(MADV_HUGEPAGE)` and be killed; do not set it for ember-vmm.
//! The unit test `allocator_stress_under_every_filter` drives every one of
//! these paths under the real filters in a child process.

use std::io;

#[allow(clippy::type_complexity)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// No filter of that name is in `resources/seccomp/vmm.json`.
    #[error("no seccomp filter named {0:?} was compiled in")]
    Missing(String),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("prctl(PR_SET_NO_NEW_PRIVS) failed: {0}")]
    NoNewPrivs(io::Error),
    /// The `seccomp(2)` call failed.
    #[error("cannot install the seccomp filter {name:?}: {err}")]
    Install {
        /// The filter.
        name: &'static str,
        /// The kernel's answer.
        err: io::Error,
    },
    /// glibc refused a malloc setting.
    #[error("mallopt({param}, {value}) failed")]
    Mallopt {
        /// The `M_*` parameter's name.
        param: &'static str,
        /// The value refused.
        value: i32,
    },
    /// [`configure_allocator`] was called after a second thread started.
    #[error("the allocator must be configured while the process has one thread, it has {0}")]
    Threads(usize),
    /// The `--seccomp-filter` file cannot be read.
    #[error("cannot read the seccomp filter file {path}: {err}")]
    FileRead {
        /// The file.
        path: String,
        /// Why.
        err: io::Error,
    },
    /// The file is larger than Firecracker's limit.
    #[error("the seccomp filter file is larger than {FILTER_FILE_LIMIT} bytes")]
    FileTooLarge,
    /// The file is neither of Firecracker's compiled formats.
    #[error("the seccomp filter file is not a compiled filter map in Firecracker's format (bitcode, or the older bincode): {0}")]
    FileFormat(String),
    /// A thread category is missing from the file.
    #[error("the seccomp filter file has no filter for the {0:?} thread category")]
    FileMissing(&'static str),
    /// A program is longer than the kernel accepts.
    #[error("the seccomp filter {name:?} has {len} instructions; the kernel takes at most {BPF_MAX_LEN}")]
    FileProgramTooLong {
        /// The thread category.
        name: String,
        /// Its length.
        len: usize,
    },
}

/// Firecracker's size limit for a compiled filter file.
pub const FILTER_FILE_LIMIT: usize = 100_000;
/// The kernel's limit on a BPF program.
pub const BPF_MAX_LEN: usize = 4096;

/// Filters read from a `--seccomp-filter` file: one BPF program per thread
/// category (`vmm`, `api`, `vcpu`, lower-cased), as Firecracker's
/// `seccompiler-bin` writes them. An empty program installs no filter for
/// that thread, as in Firecracker. ember-specific: an optional `vmm_clone3`
/// program is stacked on the VMM thread after `vmm` (see
/// [`ThreadKind::filters`]). The programs must allow what ember-vmm's
/// threads do; Firecracker's own filter files allow Firecracker's syscalls,
/// not ember's. Compiling `resources/seccomp/vmm.json` with
/// `seccompiler-bin` gives a file that works.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterMap(pub std::collections::HashMap<String, Vec<u64>>);

/// One BPF instruction (`struct sock_filter`) as the 8 little-endian bytes
/// Firecracker stores as a `u64`.
fn insn_to_u64(i: &libc::sock_filter) -> u64 {
    u64::from(i.code) | u64::from(i.jt) << 16 | u64::from(i.jf) << 24 | u64::from(i.k) << 32
}

fn insn_from_u64(v: u64) -> libc::sock_filter {
    libc::sock_filter {
        code: v as u16,
        jt: (v >> 16) as u8,
        jf: (v >> 24) as u8,
        k: (v >> 32) as u32,
    }
}

/// Firecracker before its switch to bitcode serialized the map with bincode
/// 1: u64 entry count, then per entry a u64-length-prefixed UTF-8 name and
/// a u64-counted array of `sock_filter` (u16 code, u8 jt, u8 jf, u32 k),
/// all little-endian. Strict: every byte must be used.
fn parse_bincode_v1(b: &[u8]) -> Option<std::collections::HashMap<String, Vec<u64>>> {
    fn u64_at(b: &[u8], at: &mut usize) -> Option<u64> {
        let v = u64::from_le_bytes(b.get(*at..*at + 8)?.try_into().ok()?);
        *at += 8;
        Some(v)
    }
    let mut at = 0;
    let n = u64_at(b, &mut at)?;
    if n > 16 {
        return None;
    }
    let mut map = std::collections::HashMap::new();
    for _ in 0..n {
        let len = usize::try_from(u64_at(b, &mut at)?).ok()?;
        if len > 64 {
            return None;
        }
        let name = std::str::from_utf8(b.get(at..at + len)?).ok()?.to_string();
        at += len;
        let count = usize::try_from(u64_at(b, &mut at)?).ok()?;
        if count > BPF_MAX_LEN {
            return None;
        }
        let raw = b.get(at..at + count * 8)?;
        at += count * 8;
        let prog = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        map.insert(name, prog);
    }
    (at == b.len()).then_some(map)
}

impl FilterMap {
    /// Decodes a compiled filter file: Firecracker's current format
    /// (bitcode 0.6 of `HashMap<String, Vec<u64>>`) or its earlier one
    /// (bincode 1 of `HashMap<String, Vec<sock_filter>>`, the same bytes per
    /// instruction). Checks the three thread categories are there and each
    /// program fits the kernel's limit.
    pub fn parse(bytes: &[u8]) -> Result<Self, SeccompError> {
        if bytes.len() > FILTER_FILE_LIMIT {
            return Err(SeccompError::FileTooLarge);
        }
        let raw = match parse_bincode_v1(bytes) {
            Some(m) => m,
            None => bitcode::deserialize::<std::collections::HashMap<String, Vec<u64>>>(bytes)
                .map_err(|e| SeccompError::FileFormat(e.to_string()))?,
        };
        let map: std::collections::HashMap<String, Vec<u64>> = raw
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        for k in ["vmm", "api", "vcpu"] {
            if !map.contains_key(k) {
                return Err(SeccompError::FileMissing(k));
            }
        }
        for (name, p) in &map {
            if p.len() > BPF_MAX_LEN {
                return Err(SeccompError::FileProgramTooLong {
                    name: name.clone(),
                    len: p.len(),
                });
            }
        }
        Ok(FilterMap(map))
    }

    /// Reads and decodes `path` (at most [`FILTER_FILE_LIMIT`] bytes).
    pub fn read(path: &std::path::Path) -> Result<Self, SeccompError> {
        use std::io::Read;
        let err = |err| SeccompError::FileRead {
            path: path.display().to_string(),
            err,
        };
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .map_err(err)?
            .take(FILTER_FILE_LIMIT as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(err)?;
        Self::parse(&buf)
    }

    /// Serializes in Firecracker's current format (bitcode), as
    /// `seccompiler-bin` does.
    pub fn to_bitcode(&self) -> Vec<u8> {
        bitcode::serialize(&self.0).expect("a map of strings and integers serializes")
    }

    /// ember's built-in filters as a map (what `resources/seccomp/vmm.json`
    /// compiles to), e.g. to write a file for `--seccomp-filter`.
    pub fn builtin() -> Self {
        FilterMap(
            generated::FILTERS
                .iter()
                .map(|(n, insns)| {
                    let p = insns
                        .iter()
                        .map(|&(code, jt, jf, k)| {
                            insn_to_u64(&libc::sock_filter { code, jt, jf, k })
                        })
                        .collect();
                    (n.to_string(), p)
                })
                .collect(),
        )
    }

    /// The programs thread `kind` installs, in order (empty ones skipped).
    fn programs(&self, kind: ThreadKind) -> Vec<(&'static str, Vec<libc::sock_filter>)> {
        let names: &[&'static str] = match kind {
            ThreadKind::Vmm => &["vmm", "vmm_clone3"],
            ThreadKind::Api => &["api"],
            ThreadKind::Vcpu => &["vcpu"],
        };
        names
            .iter()
            .filter_map(|n| self.0.get(*n).map(|p| (*n, p)))
            .filter(|(_, p)| !p.is_empty())
            .map(|(n, p)| (n, p.iter().map(|&v| insn_from_u64(v)).collect()))
            .collect()
    }
}

/// Installs the filters of `kind` from a `--seccomp-filter` file.
pub(crate) fn install_from(map: &FilterMap, kind: ThreadKind) -> Result<(), SeccompError> {
    for (name, prog) in map.programs(kind) {
        apply(name, &prog)?;
    }
    Ok(())
}

/// glibc malloc settings made by [`configure_allocator`]: (name, parameter,
/// value). See the module documentation for why each.
pub const MALLOC_SETTINGS: [(&str, i32, i32); 4] = [
    ("M_ARENA_MAX", libc::M_ARENA_MAX, 1),
    ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, 128 * 1024),
    ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, 1024 * 1024),
    ("M_TOP_PAD", libc::M_TOP_PAD, 128 * 1024),
];

/// Makes glibc's malloc use only the syscalls every filter allows: one
/// arena (the main one, grown with `brk`) for all threads, and a fixed mmap
/// threshold (see the module documentation). Must run before the process
/// creates its first thread: a thread that has allocated already keeps the
/// arena it got. Refuses if `/proc/self/task` shows more than one thread
/// (the check is skipped where `/proc` is not mounted).
pub fn configure_allocator() -> Result<(), SeccompError> {
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let n = tasks.count();
        if n > 1 {
            return Err(SeccompError::Threads(n));
        }
    }
    for (param, key, value) in MALLOC_SETTINGS {
        // SAFETY: mallopt only reads its integer arguments; called while the
        // process has one thread.
        if unsafe { libc::mallopt(key, value) } != 1 {
            return Err(SeccompError::Mallopt { param, value });
        }
    }
    Ok(())
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
#[cfg(test)]
pub(crate) fn filter_names() -> impl Iterator<Item = &'static str> {
    generated::FILTERS.iter().map(|(n, _)| *n)
}

/// The BPF program of the filter called `name`.
pub(crate) fn program(name: &str) -> Result<Vec<libc::sock_filter>, SeccompError> {
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
pub(crate) fn install(kind: ThreadKind) -> Result<(), SeccompError> {
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
pub(crate) fn forbidden_syscall() -> bool {
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
    fn filter_files_in_both_firecracker_formats() {
        let builtin = FilterMap::builtin();
        // bitcode, as seccompiler-bin writes it today.
        let parsed = FilterMap::parse(&builtin.to_bitcode()).unwrap();
        assert_eq!(parsed, builtin);
        let vmm: Vec<libc::sock_filter> = parsed.programs(ThreadKind::Vmm).remove(0).1;
        let want = program("vmm").unwrap();
        assert_eq!(vmm.len(), want.len());
        assert!(vmm
            .iter()
            .zip(&want)
            .all(|(a, b)| (a.code, a.jt, a.jf, a.k) == (b.code, b.jt, b.jf, b.k)));
        // bincode 1, as Firecracker 1.0 wrote it.
        let mut old = Vec::new();
        old.extend_from_slice(&3u64.to_le_bytes());
        for name in ["Vmm", "api", "vcpu"] {
            old.extend_from_slice(&(name.len() as u64).to_le_bytes());
            old.extend_from_slice(name.as_bytes());
            let prog: &[(u16, u8, u8, u32)] = &[(0x06, 0, 0, 0x7fff_0000)];
            old.extend_from_slice(&(prog.len() as u64).to_le_bytes());
            for (c, t, f, k) in prog {
                old.extend_from_slice(&c.to_le_bytes());
                old.extend_from_slice(&[*t, *f]);
                old.extend_from_slice(&k.to_le_bytes());
            }
        }
        let m = FilterMap::parse(&old).unwrap();
        let api = m.programs(ThreadKind::Api).remove(0).1;
        assert_eq!((api[0].code, api[0].k), (0x06, 0x7fff_0000));
        assert_eq!(m.programs(ThreadKind::Vmm).len(), 1, "lower-cased key");
        // Refusals.
        assert!(matches!(
            FilterMap::parse(b"junk"),
            Err(SeccompError::FileFormat(_))
        ));
        let mut two = builtin.clone();
        two.0.remove("vcpu");
        assert!(matches!(
            FilterMap::parse(&two.to_bitcode()),
            Err(SeccompError::FileMissing("vcpu"))
        ));
        let mut long = builtin.clone();
        long.0.insert("api".into(), vec![6; BPF_MAX_LEN + 1]);
        assert!(matches!(
            FilterMap::parse(&long.to_bitcode()),
            Err(SeccompError::FileProgramTooLong { .. })
        ));
        assert!(matches!(
            FilterMap::parse(&vec![0; FILTER_FILE_LIMIT + 1]),
            Err(SeccompError::FileTooLarge)
        ));
    }

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

    // --- Allocation under the filters -------------------------------------
    //
    // The stress runs in a child process, this test binary re-run on the one
    // ignored test `allocator_stress_child`, because the allocator can only be
    // configured before a process's first thread and this process has many.
    // The child is configured by a constructor that runs before `main` (as
    // ember-vmm's `main` does before anything else) when `STRESS_ENV` says so.

    /// Environment variable that makes this binary a stress child: `ok` (the
    /// allocator configured, every thread kind) or `unconfigured-api` /
    /// `unconfigured-vcpu` (glibc's defaults, one thread kind).
    const STRESS_ENV: &str = "EMBER_SECCOMP_ALLOC_STRESS";
    /// Printed by a child that finished the stress.
    const STRESS_DONE: &str = "allocator stress done";

    #[used]
    #[link_section = ".init_array"]
    static CONFIGURE_STRESS_CHILD: extern "C" fn() = configure_stress_child;

    /// Runs before `main`, while the process has one thread.
    extern "C" fn configure_stress_child() {
        if std::env::var_os(STRESS_ENV).is_some_and(|v| v == "ok") {
            if let Err(e) = configure_allocator() {
                eprintln!("configure_allocator: {e}");
                std::process::abort();
            }
        }
    }

    /// The allocation patterns of a busy ember-vmm thread, each crossing a
    /// different malloc path: heap growth and trimming (`brk`), free pages
    /// inside the heap given back (`malloc_trim`: `madvise(MADV_DONTNEED)`),
    /// large buffers (`mmap`/`munmap`), `realloc` from the heap across the
    /// mmap threshold and onwards (`mremap`), and many small allocations
    /// (tcache and bins, under the shared arena lock).
    fn allocator_stress() {
        const KIB: usize = 1024;
        for round in 0..8u8 {
            // 64 heap blocks of 96 KiB (under the 128 KiB mmap threshold).
            let mut blocks: Vec<Vec<u8>> = (0..64).map(|_| vec![round; 96 * KIB]).collect();
            for b in blocks.iter_mut().step_by(2) {
                *b = Vec::new();
            }
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
            assert!(blocks
                .iter()
                .skip(1)
                .step_by(2)
                .all(|b| b[96 * KIB - 1] == round));
            drop(blocks);

            let big = vec![round; 8 * KIB * KIB];
            assert_eq!(big[8 * KIB * KIB - 1], round);
            drop(big);

            let mut v: Vec<u8> = Vec::with_capacity(32 * KIB);
            while v.capacity() < 16 * KIB * KIB {
                v.resize(v.capacity(), round);
                v.reserve_exact(v.len());
            }
            v.truncate(200 * KIB);
            v.shrink_to_fit();
            v.truncate(KIB);
            v.shrink_to_fit();
            assert!(v.iter().all(|&b| b == round));
            drop(v);

            // A vsock connection buffer growing from 128 to 256 KiB.
            let mut buf = vec![round; 128 * KIB];
            buf.resize(256 * KIB, round);
            drop(buf);

            let small: Vec<Box<[u8; 40]>> = (0..10_000).map(|_| Box::new([round; 40])).collect();
            drop(small);
            let mut s = String::new();
            for i in 0..2_000 {
                s.push_str(&i.to_string());
            }
            drop(s);
            // SAFETY: as above.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Installs `kind`'s filters on the calling thread and runs the stress.
    fn confined_stress(kind: ThreadKind) {
        install(kind).unwrap();
        allocator_stress();
    }

    /// How many arenas glibc's malloc has (`<heap nr=` in `malloc_info`).
    fn arena_count() -> usize {
        let mut ptr: *mut libc::c_char = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: open_memstream stores a malloc'ed buffer in `ptr` and its
        // length in `len` on fclose; we read it and free it once.
        let xml = unsafe {
            let f = libc::open_memstream(&mut ptr, &mut len);
            assert!(!f.is_null());
            assert_eq!(libc::malloc_info(0, f), 0);
            libc::fclose(f);
            let text = std::slice::from_raw_parts(ptr.cast::<u8>(), len).to_vec();
            libc::free(ptr.cast());
            String::from_utf8(text).unwrap()
        };
        xml.matches("<heap nr=").count()
    }

    /// The child's body; only runs in a child made by
    /// `allocator_stress_under_every_filter`.
    #[test]
    #[ignore = "run in a child process by allocator_stress_under_every_filter"]
    fn allocator_stress_child() {
        let Ok(mode) = std::env::var(STRESS_ENV) else {
            return;
        };
        match mode.as_str() {
            "ok" => {
                // Production's shape: the VMM thread confines itself and
                // spawns the vCPU threads, which inherit its filters and add
                // their own; the API thread has its own filter only. All
                // allocate at once.
                let vmm = std::thread::spawn(|| {
                    install(ThreadKind::Vmm).unwrap();
                    let vcpus: Vec<_> = (0..2)
                        .map(|_| std::thread::spawn(|| confined_stress(ThreadKind::Vcpu)))
                        .collect();
                    allocator_stress();
                    for v in vcpus {
                        v.join().unwrap();
                    }
                });
                let api = std::thread::spawn(|| confined_stress(ThreadKind::Api));
                vmm.join().unwrap();
                api.join().unwrap();
                println!("{STRESS_DONE}: {} arena(s)", arena_count());
            }
            "unconfigured-api" => {
                std::thread::spawn(|| confined_stress(ThreadKind::Api))
                    .join()
                    .unwrap();
                println!("{STRESS_DONE}");
            }
            "unconfigured-vcpu" => {
                std::thread::spawn(|| {
                    install(ThreadKind::Vmm).unwrap();
                    std::thread::spawn(|| confined_stress(ThreadKind::Vcpu))
                        .join()
                        .unwrap();
                })
                .join()
                .unwrap();
                println!("{STRESS_DONE}");
            }
            m => panic!("unknown {STRESS_ENV} {m:?}"),
        }
    }

    /// Runs this test binary as a stress child in `mode`.
    fn stress_child(mode: &str) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::allocator_stress_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(STRESS_ENV, mode)
            // A backtrace would read the binary's debug info under the filter.
            .env_remove("RUST_BACKTRACE")
            .env_remove("GLIBC_TUNABLES")
            .env_remove("MALLOC_ARENA_MAX")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    #[test]
    fn allocator_stress_under_every_filter() {
        use std::os::unix::process::ExitStatusExt;

        // Configured as ember-vmm does: every thread kind survives brk,
        // mmap, mremap, munmap, madvise and malloc_trim under its real
        // filter, and all threads shared the one arena.
        let out = stress_child("ok");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{:?}\n{text}", out.status);
        assert!(
            text.contains(&format!("{STRESS_DONE}: 1 arena(s)")),
            "{text}"
        );

        // The control: with glibc's defaults the same stress kills the
        // process (a new thread gets its own arena, which grows with
        // mprotect and reads /proc/sys/vm/overcommit_memory when it
        // shrinks), so the stress does reach the paths that need the
        // configuration.
        for mode in ["unconfigured-api", "unconfigured-vcpu"] {
            let out = stress_child(mode);
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "{mode}: {:?}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
