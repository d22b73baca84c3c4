//! Running a [`Job`]: lease a uid, hand the directories over, make the
//! cgroup, spawn with the [`Plan`], capture stdout/stderr with a cap, wait
//! with the timeout, kill, sweep and clean up; then [`Finished`] gives the
//! status, the logs and checked access to the results.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cgroup::{cgroup_support, JobCgroup};
use super::child::{Plan, PlanInput, Step};
use super::dirs::{self, Handover, PrivateDir};
use super::{uids, Job, Limits, SandboxError, JOB_PATH};

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The program exited with this code (below 128).
    Exited(i32),
    /// The program was killed by this signal (an exit code of `128 + n`
    /// from the program itself reads the same).
    Signaled(i32),
    /// It ran out of wall-clock time and the whole job was killed.
    TimedOut,
}

/// A finished job: status, logs, and its output directory until dropped.
#[derive(Debug)]
pub struct Finished {
    /// How it ended.
    pub status: Status,
    /// stdout, at most [`Limits::max_log_bytes`].
    pub stdout: Vec<u8>,
    /// stderr, at most [`Limits::max_log_bytes`].
    pub stderr: Vec<u8>,
    /// Whether stdout or stderr was cut.
    pub truncated: bool,
    /// The uid it ran as (free again now).
    pub uid: u32,
    /// The cgroup counted an OOM kill (always false without cgroups).
    pub oom_killed: bool,
    /// The limits it ran with.
    pub limits: Limits,
    out: PathBuf,
    _dir: PrivateDir,
}

impl Finished {
    /// Exited with 0.
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }

    /// The host path of the job's `/out`.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// stdout then stderr as text, at most [`Limits::max_log_bytes`]
    /// together, with a note when cut.
    pub fn log(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&self.stderr));
        let max = self.limits.max_log_bytes;
        let cut = s.len() > max;
        if cut {
            let mut at = max;
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.truncate(at);
        }
        if cut || self.truncated {
            s.push_str("\n[output truncated]\n");
        }
        s
    }

    /// The answer of a job that runs emberd's own code (`what`: its name
    /// in messages, e.g. "extraction"): one JSON line on stdout, read by
    /// `decode`, which exit 0 must pair with the work's result and exit 1
    /// with the work's error. Anything else is the job's own failure; its
    /// stderr then goes to emberd's log only, never into the message a
    /// client may see.
    pub fn answer<T, E>(
        &self,
        what: &str,
        decode: impl FnOnce(&[u8]) -> Result<Result<T, E>, String>,
    ) -> Result<Result<T, E>, String> {
        let answer = match self.status {
            Status::Exited(0) | Status::Exited(1) => decode(&self.stdout).map_err(|why| {
                format!(
                    "the {what} job {} with an answer that is not one ({why})",
                    self.describe()
                )
            })?,
            _ => {
                log::warn!(
                    "{what} job {}{}",
                    self.describe(),
                    stderr_tail(&self.stderr)
                );
                return Err(format!("the {what} job {}", self.describe()));
            }
        };
        match (self.status, answer) {
            (Status::Exited(0), Ok(a)) => Ok(Ok(a)),
            (Status::Exited(1), Err(e)) => Ok(Err(e)),
            _ => Err(format!(
                "the {what} job {} but answered otherwise",
                self.describe()
            )),
        }
    }

    /// How it ended, in words (`"exited with 1"`).
    pub fn describe(&self) -> String {
        match self.status {
            Status::Exited(c) => format!("exited with {c}"),
            Status::Signaled(s) if self.oom_killed => {
                format!(
                    "killed by signal {s} (out of memory: the job's limit is {} MiB)",
                    self.limits.memory_bytes >> 20
                )
            }
            Status::Signaled(s) => format!("killed by signal {s}"),
            Status::TimedOut => format!(
                "did not finish within {} s and was stopped",
                self.limits.timeout.as_secs_f32()
            ),
        }
    }

    /// Moves the regular file `name` of the output directory to `dest`
    /// (replacing it; a copy when `dest` is on another filesystem), owned
    /// by us with mode `mode`. Opened with `O_NOFOLLOW | O_NONBLOCK`:
    /// symlinks, FIFOs, devices, directories, hard-linked files and files
    /// over `max` bytes are refused.
    pub fn take_file(
        &self,
        name: &str,
        dest: &Path,
        max: u64,
        mode: u32,
    ) -> Result<u64, SandboxError> {
        let (f, len) = dirs::open_result(&self.out, name, max)?;
        let md = f.metadata().map_err(|source| SandboxError::Io {
            what: "stat",
            path: self.out.join(name),
            source,
        })?;
        if md.nlink() != 1 {
            return Err(SandboxError::Result {
                name: name.into(),
                why: "has more than one name (a hard link)".into(),
            });
        }
        let io_err = |what: &'static str| {
            move |source| SandboxError::Io {
                what,
                path: dest.to_path_buf(),
                source,
            }
        };
        match std::fs::rename(self.out.join(name), dest) {
            Ok(()) => {
                // The job is gone: the name still is the inode opened.
                std::os::unix::fs::fchown(&f, Some(0), Some(0))
                    .or_else(|e| {
                        // Not root (tests): keep whatever we may.
                        if e.raw_os_error() == Some(libc::EPERM) {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io_err("chown"))?;
                f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(io_err("chmod"))?;
                Ok(len)
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => dirs::copy_to(f, len, dest, mode),
            Err(e) => Err(io_err("move a job result to")(e)),
        }
    }

    /// Reads the regular file `name` of the output directory (at most
    /// `max` bytes; same checks as [`Finished::take_file`]).
    pub fn read_file(&self, name: &str, max: u64) -> Result<Vec<u8>, SandboxError> {
        let (f, len) = dirs::open_result(&self.out, name, max)?;
        let mut v = Vec::new();
        f.take(len)
            .read_to_end(&mut v)
            .map_err(|source| SandboxError::Io {
                what: "read",
                path: self.out.join(name),
                source,
            })?;
        Ok(v)
    }
}

/// Reads `r` to its end keeping at most `cap` bytes.
fn capture<R: Read + Send + 'static>(mut r: R, cap: usize) -> JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut r).take(cap as u64 + 1).read_to_end(&mut buf);
        let cut = buf.len() > cap;
        buf.truncate(cap);
        let _ = io::copy(&mut r, &mut io::sink());
        (buf, cut)
    })
}

fn pipe() -> Result<(File, OwnedFd), SandboxError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(SandboxError::Io {
            what: "make a pipe for",
            path: PathBuf::from("sandbox setup"),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just made and are owned by nobody else.
    unsafe { Ok((File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Waits for `child` until `deadline`; None on timeout.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    // SAFETY: pidfd_open on our own unreaped child; the fd is owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: a fresh descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(pidfd as i32) }
    });
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let left = (deadline - now).min(Duration::from_secs(1));
        match &pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as libc::c_int) };
            }
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

pub(super) fn run(job: Job) -> Result<Finished, SandboxError> {
    let lease = uids::lease(&job.uids)?;
    let uid = lease.uid;
    let out = job.out_dir();
    let mut handover = Handover::default();
    let mut cgroup = None;
    let res = start_and_wait(&job, uid, &out, &mut handover, &mut cgroup);
    // Whatever happened: nothing of the job may outlive this call.
    let swept = uids::sweep(uid, Duration::from_secs(5));
    if swept > 0 {
        log::warn!("sandbox: killed {swept} processes left running as job uid {uid}");
    }
    let oom = cgroup.as_ref().is_some_and(JobCgroup::oom_killed);
    drop(cgroup);
    let restored = handover.restore();
    drop(lease);
    let (status, stdout, stderr, truncated) = res?;
    restored?;
    let got = dirs::allocated_bytes(&out, job.limits.max_output_bytes)?;
    if got > job.limits.max_output_bytes {
        return Err(SandboxError::OutputTooLarge {
            got,
            limit: job.limits.max_output_bytes,
        });
    }
    Ok(Finished {
        status,
        stdout,
        stderr,
        truncated,
        uid,
        oom_killed: oom,
        limits: job.limits,
        out,
        _dir: job.dir,
    })
}

type Ran = (Status, Vec<u8>, Vec<u8>, bool);

fn start_and_wait(
    job: &Job,
    uid: u32,
    out: &Path,
    handover: &mut Handover,
    cgroup: &mut Option<JobCgroup>,
) -> Result<Ran, SandboxError> {
    let root = job.dir.path().join("root");
    dirs::make_dir(&root, 0o755)?;
    dirs::hand_over(handover, out, uid, uid)?;
    for g in &job.give {
        dirs::hand_over(handover, g, uid, uid)?;
    }
    let mut plan = Plan::new(PlanInput {
        root: &root,
        toolchain: &job.cfg.toolchain,
        binds: &job.binds,
        out,
        cwd: &job.cwd,
        uid,
        read_any: job.read_any,
        limits: &job.limits,
    })?;
    if let Ok(cg_root) = cgroup_support() {
        let name = job
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("job-{uid}"));
        *cgroup = Some(JobCgroup::create(
            &cg_root,
            &job.cfg.cgroup_parent,
            &name,
            &job.limits,
        )?);
    }
    let (mut err_r, err_w) = pipe()?;
    plan.err_fd = err_w.as_raw_fd();
    // SAFETY: getpid has no preconditions.
    plan.parent_pid = unsafe { libc::getpid() };
    plan.cgroup_fd = cgroup.as_ref().map(|c| c.procs.as_raw_fd());
    let plan = Arc::new(plan);

    let mut cmd = Command::new(&job.program);
    cmd.args(&job.args)
        .env_clear()
        .env("PATH", JOB_PATH)
        .env("HOME", "/tmp")
        .env("TMPDIR", "/tmp")
        .env("LC_ALL", "C");
    for (k, v) in &job.env {
        cmd.env(k, v);
    }
    let stdin = match (&job.stdin_fd, &job.stdin) {
        (Some(fd), _) => Stdio::from(fd.try_clone().map_err(|source| SandboxError::Io {
            what: "duplicate the stdin descriptor for",
            path: job.program.clone(),
            source,
        })?),
        (None, Some(_)) => Stdio::piped(),
        (None, None) => Stdio::null(),
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let p = plan.clone();
    // SAFETY: Plan::enter makes only async-signal-safe system calls on
    // data prepared here, as required between fork and exec in a
    // multi-threaded process.
    unsafe {
        cmd.pre_exec(move || p.enter());
    }
    let deadline = Instant::now() + job.limits.timeout;
    let spawned = cmd.spawn();
    drop(err_w);
    let mut rec = [0u8; 5];
    let failed_step = match err_r.read(&mut rec) {
        Ok(5) => Step::from_u8(rec[0]).map(|s| {
            let errno = i32::from_le_bytes([rec[1], rec[2], rec[3], rec[4]]);
            (s, io::Error::from_raw_os_error(errno))
        }),
        _ => None,
    };
    let mut child = match (spawned, failed_step) {
        (Ok(c), _) => c,
        (Err(_), Some((step, source))) => {
            return Err(SandboxError::Setup {
                step: step.name(),
                source,
            })
        }
        (Err(source), None) => {
            return Err(SandboxError::Spawn {
                program: job.program.display().to_string(),
                source,
            })
        }
    };
    let cap = job.limits.max_log_bytes;
    let readers = (
        child.stdout.take().map(|r| capture(r, cap)),
        child.stderr.take().map(|r| capture(r, cap)),
    );
    let writer = match (child.stdin.take(), &job.stdin) {
        (Some(mut w), Some(data)) => {
            let data = data.clone();
            Some(std::thread::spawn(move || {
                // The job may stop reading early.
                let _ = w.write_all(&data);
            }))
        }
        _ => None,
    };
    let waited = wait_until(&mut child, deadline);
    let status = match waited {
        Ok(Some(st)) => decode(st),
        Ok(None) | Err(_) => {
            let cg_killed = cgroup.as_ref().is_some_and(JobCgroup::kill);
            if !cg_killed {
                // The setup process's death kills the namespace's init
                // (parent-death signal), and that kills everything in it.
                let _ = child.kill();
            }
            let _ = child.wait();
            Status::TimedOut
        }
    };
    // The namespace is gone with its init; sweep anything else first so
    // the readers see EOF.
    uids::sweep(uid, Duration::from_secs(5));
    if let Some(w) = writer {
        let _ = w.join();
    }
    let take =
        |h: Option<JoinHandle<(Vec<u8>, bool)>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    let (stdout, c1) = take(readers.0);
    let (stderr, c2) = take(readers.1);
    Ok((status, stdout, stderr, c1 || c2))
}

fn decode(st: ExitStatus) -> Status {
    match (st.code(), st.signal()) {
        (Some(c), _) if (129..=192).contains(&c) => Status::Signaled(c - 128),
        (Some(c), _) => Status::Exited(c),
        (None, Some(s)) => Status::Signaled(s),
        (None, None) => Status::Exited(-1),
    }
}

/// The last line of a job's stderr, if any, after ": ".
pub(crate) fn stderr_tail(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    match s.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!(": {}", l.chars().take(500).collect::<String>()),
        None => String::new(),
    }
}
