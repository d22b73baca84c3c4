//! What runs between fork and exec: the plan of the jail's root (made in
//! the parent, [`Plan::new`]) and [`Plan::enter`], which carries it out in
//! the forked child with async-signal-safe system calls only (no
//! allocation, no locks): the parent is multi-threaded.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{Bind, Limits, SandboxError, OUT};

/// Devices bound from the host.
const DEVICES: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/urandom"];
/// The jail's hostname.
const HOSTNAME: &[u8] = b"ember-job";
/// `CAP_DAC_OVERRIDE`.
const CAP_DAC_OVERRIDE: u32 = 1;

/// Steps of [`Plan::enter`], reported to the parent by number on failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Step {
    ParentDeath,
    JoinCgroup,
    Unshare,
    Hostname,
    MountNs,
    RootTmpfs,
    Mkdir,
    Touch,
    Symlink,
    Bind,
    Remount,
    Tmpfs,
    PivotRoot,
    RootReadOnly,
    Chdir,
    Pipe,
    Fork,
    DropPrivileges,
    Rlimit,
}

const STEPS: [Step; 19] = [
    Step::ParentDeath,
    Step::JoinCgroup,
    Step::Unshare,
    Step::Hostname,
    Step::MountNs,
    Step::RootTmpfs,
    Step::Mkdir,
    Step::Touch,
    Step::Symlink,
    Step::Bind,
    Step::Remount,
    Step::Tmpfs,
    Step::PivotRoot,
    Step::RootReadOnly,
    Step::Chdir,
    Step::Pipe,
    Step::Fork,
    Step::DropPrivileges,
    Step::Rlimit,
];

impl Step {
    pub(super) fn name(self) -> &'static str {
        match self {
            Step::ParentDeath => "set the parent-death signal",
            Step::JoinCgroup => "join the job cgroup",
            Step::Unshare => "unshare the network, IPC and UTS namespaces",
            Step::Hostname => "sethostname",
            Step::MountNs => "enter a private mount namespace",
            Step::RootTmpfs => "mount the root tmpfs",
            Step::Mkdir => "make a mount point",
            Step::Touch => "make a file mount point",
            Step::Symlink => "make a toolchain symlink",
            Step::Bind => "bind-mount",
            Step::Remount => "remount a bind read-only",
            Step::Tmpfs => "mount /tmp",
            Step::PivotRoot => "pivot_root into the job root",
            Step::RootReadOnly => "make the job root read-only",
            Step::Chdir => "chdir to the working directory",
            Step::Pipe => "pipe",
            Step::Fork => "fork into the new PID namespace",
            Step::DropPrivileges => "drop privileges",
            Step::Rlimit => "set resource limits",
        }
    }

    /// The step with number `n`.
    pub(super) fn from_u8(n: u8) -> Option<Step> {
        STEPS.get(usize::from(n)).copied()
    }
}

/// One thing done to the job root before `pivot_root` (paths are host
/// paths below the root mount).
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    /// Bind `src` on `dst`, then remount it with `flags` (plus `MS_BIND |
    /// MS_REMOUNT`).
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
    Tmpfs {
        dst: CString,
        opts: CString,
    },
}

/// Everything the child needs, prepared by the parent.
pub(super) struct Plan {
    pub(super) parent_pid: libc::pid_t,
    pub(super) cgroup_fd: Option<RawFd>,
    pub(super) err_fd: RawFd,
    root: CString,
    ops: Vec<Op>,
    cwd: CString,
    uid: u32,
    keep: &'static [u32],
    rlimits: [(libc::__rlimit_resource_t, &'static str, u64); 7],
}

fn cstr(p: &OsStr) -> Result<CString, SandboxError> {
    CString::new(p.as_bytes())
        .map_err(|_| SandboxError::BadJob(format!("path {p:?} holds a NUL byte")))
}

/// An absolute path with only normal components.
fn clean_inside(p: &Path) -> Result<(), SandboxError> {
    let ok = p.is_absolute()
        && p.components().count() > 1
        && p.components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadJob(format!(
            "{} is not a plain absolute path below /",
            p.display()
        )))
    }
}

/// Plan building: ops with the parent directories they need.
struct Builder {
    root: PathBuf,
    made: HashSet<PathBuf>,
    /// Inside paths that are mounts or links: nothing may go below them.
    taken: Vec<PathBuf>,
    ops: Vec<Op>,
}

impl Builder {
    fn host(&self, inside: &Path) -> PathBuf {
        self.root.join(inside.strip_prefix("/").unwrap_or(inside))
    }

    fn mkdirs(&mut self, inside: &Path) -> Result<(), SandboxError> {
        let mut cur = PathBuf::from("/");
        for c in inside.components().skip(1) {
            cur.push(c);
            if self.made.insert(cur.clone()) {
                let h = self.host(&cur);
                self.ops.push(Op::Mkdir(cstr(h.as_os_str())?));
            }
        }
        Ok(())
    }

    fn check_free(&self, inside: &Path) -> Result<(), SandboxError> {
        if let Some(t) = self.taken.iter().find(|t| inside.starts_with(t)) {
            return Err(SandboxError::BadJob(format!(
                "{} would be below {}, which is already mounted",
                inside.display(),
                t.display()
            )));
        }
        Ok(())
    }

    /// Binds host `src` at `inside`, remounted with `flags`.
    fn bind(
        &mut self,
        src: &Path,
        inside: &Path,
        flags: libc::c_ulong,
    ) -> Result<(), SandboxError> {
        clean_inside(inside)?;
        self.check_free(inside)?;
        let md = std::fs::metadata(src).map_err(|source| SandboxError::Io {
            what: "stat bind source",
            path: src.to_path_buf(),
            source,
        })?;
        if let Some(parent) = inside.parent() {
            self.mkdirs(parent)?;
        }
        let dst = cstr(self.host(inside).as_os_str())?;
        if md.is_dir() {
            self.made.insert(inside.to_path_buf());
            self.ops.push(Op::Mkdir(dst.clone()));
        } else {
            self.ops.push(Op::Touch(dst.clone()));
        }
        self.ops.push(Op::Bind {
            src: cstr(src.as_os_str())?,
            dst,
            flags: flags | keep_noexec(src),
        });
        self.taken.push(inside.to_path_buf());
        Ok(())
    }
}

/// `MS_NOEXEC` when the source's own mount has it (a remount would clear it).
fn keep_noexec(src: &Path) -> libc::c_ulong {
    let Ok(c) = CString::new(src.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: `c` is NUL-terminated and `st` a valid out-buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 && st.f_flag & libc::ST_NOEXEC != 0 {
        return libc::MS_NOEXEC;
    }
    0
}

/// What [`Plan::new`] needs to know.
pub(super) struct PlanInput<'a> {
    pub(super) root: &'a Path,
    pub(super) toolchain: &'a [PathBuf],
    pub(super) binds: &'a [Bind],
    pub(super) out: &'a Path,
    pub(super) cwd: &'a Path,
    pub(super) uid: u32,
    pub(super) read_any: bool,
    pub(super) limits: &'a Limits,
}

impl Plan {
    pub(super) fn new(i: PlanInput) -> Result<Plan, SandboxError> {
        let mut b = Builder {
            root: i.root.to_path_buf(),
            made: HashSet::from([PathBuf::from("/")]),
            taken: Vec::new(),
            ops: Vec::new(),
        };
        let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        for t in i.toolchain {
            let Ok(md) = std::fs::symlink_metadata(t) else {
                continue;
            };
            clean_inside(t)?;
            if md.file_type().is_symlink() {
                let target = std::fs::read_link(t).map_err(|source| SandboxError::Io {
                    what: "read link",
                    path: t.clone(),
                    source,
                })?;
                if let Some(parent) = t.parent() {
                    b.mkdirs(parent)?;
                }
                b.ops.push(Op::Symlink {
                    target: cstr(target.as_os_str())?,
                    at: cstr(b.host(t).as_os_str())?,
                });
                b.taken.push(t.clone());
            } else {
                b.bind(t, t, ro)?;
            }
        }
        b.mkdirs(Path::new("/dev"))?;
        for d in DEVICES {
            b.bind(
                Path::new(d),
                Path::new(d),
                libc::MS_NOSUID | libc::MS_NOEXEC,
            )?;
        }
        b.mkdirs(Path::new("/tmp"))?;
        let tmp = b.host(Path::new("/tmp"));
        let opts = format!(
            "mode=1777,size={},nr_inodes=65536",
            i.limits.tmp_bytes.max(4096)
        );
        b.ops.push(Op::Tmpfs {
            dst: cstr(tmp.as_os_str())?,
            opts: cstr(OsStr::new(&opts))?,
        });
        b.bind(
            i.out,
            Path::new(OUT),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )?;
        for bind in i.binds {
            if bind.inside == Path::new("/tmp") {
                return Err(SandboxError::BadJob("cannot bind over /tmp".into()));
            }
            b.bind(
                &bind.host,
                &bind.inside,
                ro | if bind.exec { 0 } else { libc::MS_NOEXEC },
            )?;
        }
        clean_inside(i.cwd).or_else(|e| {
            if i.cwd == Path::new("/") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let l = i.limits;
        let secs = l.timeout.as_secs().saturating_add(1);
        Ok(Plan {
            parent_pid: 0,
            cgroup_fd: None,
            err_fd: -1,
            root: cstr(i.root.as_os_str())?,
            ops: b.ops,
            cwd: cstr(i.cwd.as_os_str())?,
            uid: i.uid,
            keep: if i.read_any { &[CAP_DAC_OVERRIDE] } else { &[] },
            rlimits: [
                (libc::RLIMIT_FSIZE, "fsize", l.max_file_bytes),
                (libc::RLIMIT_NOFILE, "nofile", l.open_files),
                (libc::RLIMIT_CPU, "cpu", secs),
                (libc::RLIMIT_DATA, "data", l.memory_bytes),
                (
                    libc::RLIMIT_AS,
                    "as",
                    l.memory_bytes.saturating_add(1 << 30),
                ),
                (libc::RLIMIT_NPROC, "nproc", l.pids),
                (libc::RLIMIT_CORE, "core", 0),
            ],
        })
    }

    /// Reports `step` and `errno` to the parent and makes the error that
    /// std's spawn passes on.
    fn fail(&self, step: Step, errno: i32) -> io::Error {
        let mut rec = [0u8; 5];
        rec[0] = step as u8;
        rec[1..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: writes 5 bytes from a stack buffer to our own pipe.
        unsafe { libc::write(self.err_fd, rec.as_ptr().cast(), rec.len()) };
        io::Error::from_raw_os_error(errno)
    }

    fn check(&self, r: libc::c_int, step: Step) -> io::Result<()> {
        if r < 0 {
            return Err(self.fail(step, errno()));
        }
        Ok(())
    }

    /// In the forked child (the setup process): builds the jail, forks the
    /// namespace's init and, in the setup process, waits for it and exits
    /// with its status. Returns only in the init, ready for exec.
    pub(super) fn enter(&self) -> io::Result<()> {
        jailer::process::set_parent_death_signal(libc::SIGKILL)
            .map_err(|e| self.fail(Step::ParentDeath, os(&e)))?;
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != self.parent_pid {
            return Err(self.fail(Step::ParentDeath, libc::ESRCH));
        }
        if let Some(fd) = self.cgroup_fd {
            // "0": move the writing process. Children follow.
            // SAFETY: writes one byte to an open descriptor.
            let r = unsafe { libc::write(fd, c"0".as_ptr().cast(), 1) };
            self.check(r as libc::c_int, Step::JoinCgroup)?;
        }
        // SAFETY: unshare only changes this process's namespaces.
        let r =
            unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
        self.check(r, Step::Unshare)?;
        // SAFETY: a valid buffer and its length.
        let r = unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) };
        self.check(r, Step::Hostname)?;
        jailer::jail::new_private_mount_ns().map_err(|(_, e)| self.fail(Step::MountNs, os(&e)))?;
        self.mount(
            c"tmpfs",
            &self.root,
            c"tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(c"mode=0755,size=1m,nr_inodes=4096"),
            Step::RootTmpfs,
        )?;
        for op in &self.ops {
            self.apply(op)?;
        }
        jailer::jail::pivot_into(&self.root)
            .map_err(|(_, e)| self.fail(Step::PivotRoot, os(&e)))?;
        // SAFETY: remount of our own root mount; NULLs and a valid path.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                std::ptr::null(),
            )
        };
        self.check(r, Step::RootReadOnly)?;
        // SAFETY: a valid NUL-terminated path.
        self.check(unsafe { libc::chdir(self.cwd.as_ptr()) }, Step::Chdir)?;
        // A pipe only the setup process holds open: the init sees EOF on it
        // once the setup process is gone.
        let mut alive = [0 as RawFd; 2];
        // SAFETY: `alive` has room for two descriptors.
        let r = unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) };
        self.check(r, Step::Pipe)?;
        match jailer::process::fork_into_new_pid_ns(true) {
            Err(e) => Err(self.fail(Step::Fork, os(&e))),
            Ok(jailer::process::PidNsFork::Parent(pid)) => self.wait_and_exit(pid, alive),
            Ok(jailer::process::PidNsFork::Child) => self.init(alive),
        }
    }

    /// The setup process after the fork: keeps only the `alive` pipe, waits
    /// for the init and exits with its status.
    fn wait_and_exit(&self, pid: u32, alive: [RawFd; 2]) -> ! {
        let keep = alive[1] as libc::c_uint;
        // SAFETY: closes descriptors of this process only (std's status
        // pipe among them, so the parent's spawn returns once the init
        // execs); close_range ignores ranges with nothing open.
        unsafe {
            libc::close(alive[0]);
            if keep > 3 {
                libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0u32);
            }
            libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
        }
        let mut st: libc::c_int = 0;
        loop {
            // SAFETY: waits for our own child; `st` is a valid out-pointer.
            let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut st, 0) };
            if r == pid as libc::pid_t {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                jailer::process::exit_now(125);
            }
        }
        let code = if libc::WIFEXITED(st) {
            libc::WEXITSTATUS(st)
        } else if libc::WIFSIGNALED(st) {
            128 + libc::WTERMSIG(st)
        } else {
            125
        };
        jailer::process::exit_now(code)
    }

    /// The namespace's init (pid 1) before exec.
    fn init(&self, alive: [RawFd; 2]) -> io::Result<()> {
        // SAFETY: our copy of the write end; the setup process keeps its own.
        unsafe { libc::close(alive[1]) };
        jailer::privileges::drop_privileges_keeping(self.uid, self.uid, self.keep)
            .map_err(|e| self.fail(Step::DropPrivileges, os(&e)))?;
        // After the uid change, which clears it.
        jailer::process::set_parent_death_signal(libc::SIGKILL)
            .map_err(|e| self.fail(Step::ParentDeath, os(&e)))?;
        // SAFETY: fcntl and read on our own pipe end with a stack buffer.
        let gone = unsafe {
            libc::fcntl(alive[0], libc::F_SETFL, libc::O_NONBLOCK);
            let mut b = 0u8;
            libc::read(alive[0], (&mut b as *mut u8).cast(), 1) == 0
        };
        if gone {
            // The setup process died before the signal was armed.
            jailer::process::exit_now(137);
        }
        for (res, name, v) in self.rlimits {
            jailer::rlimit::set(res, name, v).map_err(|e| self.fail(Step::Rlimit, os(&e)))?;
        }
        Ok(())
    }

    fn mount(
        &self,
        src: &CStr,
        dst: &CStr,
        fstype: &CStr,
        flags: libc::c_ulong,
        data: Option<&CStr>,
        step: Step,
    ) -> io::Result<()> {
        // SAFETY: valid NUL-terminated strings (or NULL data).
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                flags,
                data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        self.check(r, step)
    }

    fn apply(&self, op: &Op) -> io::Result<()> {
        match op {
            // SAFETY: a valid NUL-terminated path.
            Op::Mkdir(p) => self.check(unsafe { libc::mkdir(p.as_ptr(), 0o755) }, Step::Mkdir),
            Op::Touch(p) => {
                // SAFETY: a valid path; the descriptor is closed at once.
                let fd = unsafe {
                    libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                        0o644,
                    )
                };
                self.check(fd, Step::Touch)?;
                // SAFETY: closes the descriptor just opened.
                unsafe { libc::close(fd) };
                Ok(())
            }
            Op::Symlink { target, at } => self.check(
                // SAFETY: valid NUL-terminated strings.
                unsafe { libc::symlink(target.as_ptr(), at.as_ptr()) },
                Step::Symlink,
            ),
            Op::Bind { src, dst, flags } => {
                // SAFETY: valid NUL-terminated paths, NULL type and data.
                let r = unsafe {
                    libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                self.check(r, Step::Bind)?;
                // SAFETY: as above.
                let r = unsafe {
                    libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | flags,
                        std::ptr::null(),
                    )
                };
                self.check(r, Step::Remount)
            }
            Op::Tmpfs { dst, opts } => self.mount(
                c"tmpfs",
                dst,
                c"tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(opts),
                Step::Tmpfs,
            ),
        }
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// The errno inside a jailer error (EPERM when it has none).
fn os(e: &(dyn std::error::Error + 'static)) -> i32 {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error().unwrap_or(libc::EPERM);
        }
        cur = err.source();
    }
    libc::EPERM
}
