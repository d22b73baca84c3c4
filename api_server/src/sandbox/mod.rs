//! Running host tools on untrusted bytes: a [`Job`] runs one program
//! (gcc, ld, mkfs.ext4, debugfs, ...) in a throw-away jail built from
//! ember-jailer's parts. It is the lowest layer of emberd: [`crate::build`]
//! and [`crate::images`] use it; it imports nothing from the model or the
//! faces.
//!
//! ## What a job gets
//!
//! * **Its own directory**, made with `mkdtemp` (`job-XXXXXX`, mode 0700,
//!   owned by root) under the base directory (`<state dir>/jobs` in emberd;
//!   a fresh `mkdtemp` directory in the system temp dir when emberd did not
//!   [`configure`] one). Nothing a job touches has a predictable name.
//! * **A new mount namespace** whose root (after `pivot_root`, through
//!   [`jailer::jail::pivot_into`]) is a small read-only tmpfs holding only:
//!   read-only binds of the toolchain ([`DEFAULT_TOOLCHAIN`]: `/usr`, the
//!   merged-usr links `/bin`, `/lib`, ..., `/etc/alternatives`, the
//!   dynamic loader's cache, `mke2fs.conf`), the job's read-only inputs
//!   ([`Job::ro`], `nosuid,nodev,noexec`), its output directory at `/out`
//!   (read-write, `nosuid,nodev,noexec`), `/dev/null`, `/dev/zero` and
//!   `/dev/urandom` (binds of the host nodes) and a size-capped tmpfs
//!   `/tmp`. No `/proc`, no `/sys`, no `/home`, no `/etc/shadow`.
//! * **New network, IPC and UTS namespaces** (only a `lo` that is down;
//!   hostname `ember-job`) and **a new PID namespace**: the program is
//!   pid 1 there, so when it exits or is killed the kernel kills everything
//!   it started, `setsid` daemons included.
//! * **Its own uid and gid** from a range ([`SandboxConfig::uids`], default
//!   20000-20999; keep it apart from the VMM uid and from every real user).
//!   A uid is leased to one job at a time across processes (an `flock`ed
//!   file per uid in [`UID_LOCK_DIR`]); after the job, every process still
//!   running as it is killed before the lease ends. No capabilities, no
//!   supplementary groups, `no_new_privs`. The output directory is handed
//!   to the uid before the run; trees given with [`Job::give`] are handed
//!   over and back.
//! * **Limits.** rlimits always ([`Limits`]): `RLIMIT_FSIZE` (largest file
//!   written), `RLIMIT_NOFILE`, `RLIMIT_CPU`, `RLIMIT_DATA` and `RLIMIT_AS`
//!   (memory), `RLIMIT_NPROC` (per uid, and the uid is the job's alone),
//!   `RLIMIT_CORE` 0. With a usable cgroup v2 (the `memory` and `pids`
//!   controllers offered by the cgroup2 mount), also a cgroup
//!   `<cgroup2>/ember-jobs/<job>` with `memory.max`, `memory.swap.max` 0,
//!   `memory.oom.group` 1, `pids.max` and `cpu.max`, removed afterwards.
//!   Without one, emberd logs once why and relies on the rlimits
//!   ([`cgroup_support`] says why).
//! * **A wall-clock timeout** ([`Limits::timeout`]) that kills the whole job
//!   (`cgroup.kill`, else SIGKILL to the setup process, whose death kills
//!   the pid-namespace init through its parent-death signal).
//! * **Death with emberd.** The setup process and the program both have
//!   `PR_SET_PDEATHSIG(SIGKILL)`: a `kill -9` of emberd kills the setup
//!   process, that kills the namespace's init, and that kills the rest.
//!   The signal is tied to the *thread* that started the job, so a job is
//!   run and waited for on one thread ([`Job::run`] blocks).
//! * **Bounded results.** stdout and stderr are kept up to
//!   [`Limits::max_log_bytes`] each (the rest is read and dropped); the
//!   output directory's allocated size is checked against
//!   [`Limits::max_output_bytes`] after the run; [`Finished::take_file`]
//!   copies a result out with `O_NOFOLLOW | O_NONBLOCK`, regular files only,
//!   and a size cap. Results are read only after every process of the job
//!   is gone, so nothing can swap them while they are read.
//!
//! ## How
//!
//! [`Job::run`] starts the program with `std::process::Command` and a
//! `pre_exec` hook (`child.rs`) that runs in the forked child and uses
//! only async-signal-safe system calls on data prepared beforehand: join
//! the cgroup, unshare the namespaces, build the root, `pivot_root`, fork
//! (through [`jailer::process::fork_into_new_pid_ns`]) the namespace's
//! init, which drops privileges ([`jailer::privileges`]), sets its limits
//! ([`jailer::rlimit`]) and execs the program. The setup process waits for
//! it and exits with its status (`128 + n` when killed by signal `n`).
//!
//! ## emberd's own code in a job
//!
//! Archive extraction (uploads, hub pulls, OCI and `docker save`
//! tarballs, build contexts) and OCI layer application (root filesystems
//! of Flintlock volumes and hyperd container disks, builds and commits,
//! and the kernel or initrd Flintlock takes from an image) run emberd's
//! own code on untrusted bytes, so they run in jobs too: emberd
//! re-executes its own binary ([`SandboxConfig::self_exe`], bound
//! read-only at `/ember/emberd`) with the archive, or the layer blobs one
//! after the other, as stdin ([`Job::stdin_from`]) and the destination as
//! `/out`; afterwards [`reclaim`] gives the tree back to emberd's uid, or
//! [`reclaim_with`] also gives entries the owners and special modes a job
//! cannot set (see [`crate::images::archive::extract_sandboxed`] and
//! `images/oci/sandboxed.rs`). In emberd, neither runs in emberd's process.
//!
//! ## Not done here
//!
//! Other in-process parsing of untrusted bytes is not sandboxed: reading
//! OCI/`docker save` JSON (indexes, manifests, configs: bounded to 16 MiB
//! each, serde only) and verifying blobs when an image is opened (sha256
//! of the bytes; for legacy `docker save` images, also of the gunzipped
//! layers against the config's `diff_ids`), ELF inspection and cpio
//! writing run in emberd with the checks of those modules. Jobs keep no
//! seccomp filter of their own. A uid in the range must not own files
//! elsewhere on the host; emberd does not check that.

mod cgroup;
mod child;
mod dirs;
mod run;
mod uids;

use std::ffi::OsString;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

pub use cgroup::cgroup_support;
pub use dirs::{base_dir, mkdtemp, reclaim, reclaim_with, Owner, PrivateDir};
pub use run::{Finished, Status};
pub use uids::UID_LOCK_DIR;

/// Read-only binds every job gets, when they exist on the host. Symlinks
/// (`/bin -> usr/bin` on merged-usr systems) are recreated as symlinks.
pub const DEFAULT_TOOLCHAIN: [&str; 12] = [
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/mke2fs.conf",
];

/// Default job uids (and gids): apart from the VMM uid 10500.
pub const DEFAULT_UIDS: RangeInclusive<u32> = 20000..=20999;
/// Default parent cgroup below the cgroup2 root.
pub const DEFAULT_CGROUP_PARENT: &str = "ember-jobs";
/// `PATH` inside a job.
pub const JOB_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
/// Where the output directory is inside a job.
pub const OUT: &str = "/out";

/// Errors setting up, running or reading a job.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The base directory (or the uid lock directory) is unusable.
    #[error("sandbox directory {path}: {why}")]
    Dir { path: PathBuf, why: String },
    /// A host file operation failed.
    #[error("sandbox: cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every uid of the range is leased.
    #[error("no free job uid in {start}-{end}: all are in use by running jobs")]
    NoUid { start: u32, end: u32 },
    /// The job was described wrongly (a bug in the caller).
    #[error("bad sandbox job: {0}")]
    BadJob(String),
    /// The job's cgroup could not be made.
    #[error("job cgroup: {0}")]
    Cgroup(#[from] jailer::cgroup::CgroupError),
    /// A step of building the jail in the child failed.
    #[error("sandbox setup failed at {step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The program could not be started (not found inside the jail...).
    #[error("cannot run {program} in the sandbox: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The job wrote more than its output limit.
    #[error("the job wrote {got} bytes, more than its limit of {limit} bytes")]
    OutputTooLarge { got: u64, limit: u64 },
    /// A result file is missing, not a regular file, or too large.
    #[error("job result {name:?}: {why}")]
    Result { name: String, why: String },
}

/// Resource limits of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory: cgroup `memory.max`; also `RLIMIT_DATA` per process and
    /// `RLIMIT_AS` (this plus 1 GiB) per process.
    pub memory_bytes: u64,
    /// cgroup `pids.max` and `RLIMIT_NPROC` (per uid).
    pub pids: u64,
    /// cgroup `cpu.max` quota in percent of one CPU.
    pub cpu_percent: u32,
    /// Wall-clock time before the whole job is killed; `RLIMIT_CPU` is
    /// this plus a second.
    pub timeout: Duration,
    /// `RLIMIT_FSIZE`: the largest file any process of the job writes.
    pub max_file_bytes: u64,
    /// Most bytes allocated in the output directory after the run.
    pub max_output_bytes: u64,
    /// stdout and stderr are each kept up to this size.
    pub max_log_bytes: usize,
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// Size of the job's `/tmp` (tmpfs).
    pub tmp_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 1 << 30,
            pids: 256,
            cpu_percent: 100,
            timeout: Duration::from_secs(120),
            max_file_bytes: 256 << 20,
            max_output_bytes: 512 << 20,
            max_log_bytes: 64 << 10,
            open_files: 1024,
            tmp_bytes: 256 << 20,
        }
    }
}

/// Process-wide settings, set once at start-up with [`configure`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where job directories are made; None: a private `mkdtemp` directory
    /// in the system temp dir, made on first use.
    pub base_dir: Option<PathBuf>,
    /// uids (used as gids too) leased to jobs.
    pub uids: RangeInclusive<u32>,
    /// Default limits of a job.
    pub limits: Limits,
    /// Parent cgroup of the jobs' cgroups, below the cgroup2 root.
    pub cgroup_parent: String,
    /// Read-only binds of every job.
    pub toolchain: Vec<PathBuf>,
    /// emberd's own binary, for work emberd does on untrusted bytes with
    /// its own code in a job (archive extraction: see
    /// [`crate::images::archive::extract_sandboxed`]; OCI layer
    /// application: [`crate::images::oci::OciImage::unpack`]). emberd's `main`
    /// always sets it; None (library tests) runs that work in-process.
    pub self_exe: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            base_dir: None,
            uids: DEFAULT_UIDS,
            limits: Limits::default(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            toolchain: DEFAULT_TOOLCHAIN.iter().map(PathBuf::from).collect(),
            self_exe: None,
        }
    }
}

fn config_cell() -> &'static RwLock<Arc<SandboxConfig>> {
    static CONFIG: OnceLock<RwLock<Arc<SandboxConfig>>> = OnceLock::new();
    CONFIG.get_or_init(|| RwLock::new(Arc::new(SandboxConfig::default())))
}

/// Sets the process-wide settings (emberd: from its flags).
pub fn configure(cfg: SandboxConfig) {
    let mut c = config_cell().write().unwrap_or_else(|e| e.into_inner());
    *c = Arc::new(cfg);
}

/// The current process-wide settings.
pub fn config() -> Arc<SandboxConfig> {
    config_cell()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// A read-only bind: `host` appears at `inside`.
#[derive(Debug, Clone)]
struct Bind {
    host: PathBuf,
    inside: PathBuf,
    /// Programs may be run from it (else `noexec`).
    exec: bool,
}

/// One program to run in a fresh jail; see the module docs. Made with
/// [`Job::new`], which already makes the job's directory so that inputs
/// can be placed in [`Job::out_dir`] before [`Job::run`].
pub struct Job {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    binds: Vec<Bind>,
    give: Vec<PathBuf>,
    output: Option<PathBuf>,
    cwd: PathBuf,
    stdin: Option<Vec<u8>>,
    stdin_fd: Option<OwnedFd>,
    limits: Limits,
    uids: RangeInclusive<u32>,
    read_any: bool,
    dir: PrivateDir,
    cfg: Arc<SandboxConfig>,
}

impl Job {
    /// A job running `program`: an absolute path inside the jail (the
    /// toolchain is bound at the host's paths, so a host path under `/usr`
    /// is the same inside). Makes the job's directory.
    pub fn new(program: impl Into<PathBuf>) -> Result<Job, SandboxError> {
        let cfg = config();
        let program = program.into();
        if !program.is_absolute() {
            return Err(SandboxError::BadJob(format!(
                "program {} is not an absolute path",
                program.display()
            )));
        }
        let dir = PrivateDir::new_in(&base_dir(&cfg)?, "job")?;
        dirs::make_dir(&dir.path().join("out"), 0o700)?;
        Ok(Job {
            program,
            args: Vec::new(),
            env: Vec::new(),
            binds: Vec::new(),
            give: Vec::new(),
            output: None,
            cwd: PathBuf::from(OUT),
            stdin: None,
            stdin_fd: None,
            limits: cfg.limits,
            uids: cfg.uids.clone(),
            read_any: false,
            dir,
            cfg,
        })
    }

    /// Adds one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (the environment is otherwise only
    /// `PATH`, `HOME=/tmp`, `TMPDIR=/tmp` and `LC_ALL=C`).
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Binds the host file or directory `host` read-only at the absolute
    /// path `inside`. The job's uid must be able to read it (see
    /// [`Job::give`] and [`Job::read_any`]).
    pub fn ro(mut self, host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            inside: inside.into(),
            exec: false,
        });
        self
    }

    /// Like [`Job::ro`], for a program outside the toolchain binds (a
    /// tool given by path): it may be executed.
    pub fn ro_exec(mut self, host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            inside: inside.into(),
            exec: true,
        });
        self
    }

    /// Hands the host tree `host` (recursively, links not followed) to the
    /// job's uid for the run and back to its owners afterwards, so that a
    /// job without [`Job::read_any`] can read files of any mode it has.
    pub fn give(mut self, host: impl Into<PathBuf>) -> Self {
        self.give.push(host.into());
        self
    }

    /// Uses the caller's (empty or fresh) directory as `/out` instead of
    /// the job's own. It is handed to the job's uid for the run; what the
    /// job writes there stays, owned by that uid: the caller fixes owners.
    pub fn output_dir(mut self, host: impl Into<PathBuf>) -> Self {
        self.output = Some(host.into());
        self
    }

    /// The host path of the job's `/out` (its own directory unless
    /// [`Job::output_dir`] gave another).
    pub fn out_dir(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| self.dir.path().join("out"))
    }

    /// Working directory inside the jail (default `/out`).
    pub fn cwd(mut self, inside: impl Into<PathBuf>) -> Self {
        self.cwd = inside.into();
        self
    }

    /// Bytes for the program's stdin (default: `/dev/null`).
    pub fn stdin(mut self, data: Vec<u8>) -> Self {
        self.stdin = Some(data);
        self
    }

    /// The program's stdin is this open file or pipe (read end) instead:
    /// the job reads what emberd opened, without needing access to its
    /// path. Wins over [`Job::stdin`]. The descriptor is closed when the
    /// job has run.
    pub fn stdin_from(mut self, fd: impl Into<OwnedFd>) -> Self {
        self.stdin_fd = Some(fd.into());
        self
    }

    /// Replaces all limits.
    pub fn limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }

    /// Changes the wall-clock timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.limits.timeout = t;
        self
    }

    /// Changes the largest file the job may write and the output cap.
    pub fn max_file(mut self, bytes: u64) -> Self {
        self.limits.max_file_bytes = bytes;
        self.limits.max_output_bytes = self.limits.max_output_bytes.max(bytes);
        self
    }

    /// Changes the output directory cap.
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.limits.max_output_bytes = bytes;
        self
    }

    /// Uses uids from `range` instead of the configured ones.
    pub fn uids(mut self, range: RangeInclusive<u32>) -> Self {
        self.uids = range;
        self
    }

    /// Keeps `CAP_DAC_OVERRIDE`, so the job can read (and write) every file
    /// in its view whatever its owner and mode: for mkfs and debugfs, whose
    /// inputs are trees and images of any ownership. Never
    /// `CAP_DAC_READ_SEARCH`, which would allow `open_by_handle_at` on the
    /// host filesystems behind the binds. Not for compilers.
    pub fn read_any(mut self, yes: bool) -> Self {
        self.read_any = yes;
        self
    }

    /// The limits the job will run with.
    pub fn current_limits(&self) -> Limits {
        self.limits
    }

    /// Runs the job to its end (or its timeout) and returns what it left.
    /// Blocks the calling thread (see the module docs on why).
    pub fn run(self) -> Result<Finished, SandboxError> {
        run::run(self)
    }
}

/// Finds `name` on the host in `PATH` and the sbin directories (an
/// absolute `name` is taken as it is when it exists).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let p = Path::new(name);
    if p.is_absolute() {
        return ok(p).then(|| p.to_path_buf());
    }
    if name.contains('/') {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| ok(p))
}

#[cfg(test)]
mod tests;

/// Helpers for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::uids::processes_of;
}
