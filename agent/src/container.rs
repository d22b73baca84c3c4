//! Containers as processes: mount the rootfs, fork, chroot, exec; reap and
//! record exit codes.
//!
//! Every process (a container's main process, whose id is the container id,
//! or an exec'd one) is started in its own session (`setsid`), with stdin on
//! `/dev/null` and stdout+stderr appended to `<state dir>/logs/<id>.log`.
//! The child clears its signal mask and dispositions, chroots into the
//! container root, changes to the working directory, drops to the numeric
//! uid/gid if asked, and execs with exactly the given environment. A failure
//! before exec is reported back through a close-on-exec pipe, so a bad
//! command is an error reply rather than an exit code.
//!
//! Exit statuses are collected by [`Containers::reap_all`], which the
//! agent calls on SIGCHLD: it waits for *any* child, so as PID 1 it also
//! reaps orphans re-parented to init (unknown pids are ignored). Forks
//! happen with the state lock held and the reaper records statuses under it,
//! so an exit is never seen before its process is registered.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::b64;
use crate::protocol::{ContainerFile, Event, Exec, Rootfs, StartContainer, VolumeMount, MAX_FILE};
use crate::stdio::{self, ChildSide, Notify, Streams};

/// How long Remove/DestroyPod wait for SIGKILLed processes to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// `PATH` used to find `cmd[0]` when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A container operation failure. Messages start like hyperd's ("no such",
/// "bad parameter", "conflict") so a daemon can map them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Malformed id, command, path, user...
    #[error("bad parameter: {0}")]
    BadParameter(String),
    /// Unknown container.
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    /// Unknown process.
    #[error("no such process: {0}")]
    NoSuchProcess(String),
    /// The id is taken.
    #[error("conflict: id {0} is already in use")]
    Conflict(String),
    /// A bounded queue is full; try again.
    #[error("busy: {0}")]
    Busy(String),
    /// A wait ran out of time.
    #[error("timeout waiting for {0}")]
    Timeout(String),
    /// A host operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The child failed before exec.
    #[error("starting {id}: {stage} failed: {source}")]
    Spawn {
        /// Process id.
        id: String,
        /// The failing step.
        stage: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, ContainerError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// Where the agent keeps its files.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Logs go to `<state_dir>/logs/<id>.log`.
    pub state_dir: PathBuf,
    /// Block-device rootfs are mounted at `<run_dir>/<id>/root`
    /// (`/run/containers` in the guest).
    pub run_dir: PathBuf,
}

struct Container {
    root: PathBuf,
    /// The mount point, when the agent mounted the rootfs.
    mounted: Option<PathBuf>,
    /// Volumes mounted inside the root, in mount order.
    volumes: Vec<PathBuf>,
}

struct Proc {
    pid: libc::pid_t,
    container: String,
    exit: Option<i32>,
    log: PathBuf,
    /// Streamed stdio (`stdio` processes).
    streams: Option<Arc<Streams>>,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    procs: HashMap<String, Proc>,
    by_pid: HashMap<libc::pid_t, String>,
}

/// Callback for process exits (called without any lock held).
pub type ExitNotifier = Box<dyn Fn(Event) + Send + Sync>;

/// All containers and processes of one agent.
pub struct Containers {
    paths: Paths,
    state: Mutex<State>,
    cond: Condvar,
    notify: Notify,
}

/// Checks a container or process id: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadParameter(format!("invalid id {id:?}")))
    }
}

/// Parses a numeric `uid[:gid]`; gid defaults to uid.
pub fn parse_user(user: &str) -> Result<(libc::uid_t, libc::gid_t)> {
    let bad = || ContainerError::BadParameter(format!("user {user:?} is not numeric uid[:gid]"));
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid: libc::uid_t = u.parse().map_err(|_| bad())?;
    let gid: libc::gid_t = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
}

/// Exit code of a wait status: the exit status, or 128 + the signal.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        status
    }
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| ContainerError::BadParameter(format!("{what} contains a NUL byte")))
}

/// The paths execve should try for `cmd0`, like execvp: as is when it has a
/// `/`, else each `PATH` entry (from `env`, or [`DEFAULT_PATH`]).
pub fn exec_candidates(cmd0: &str, env: &[(String, String)]) -> Vec<String> {
    if cmd0.contains('/') {
        return vec![cmd0.to_string()];
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{cmd0}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// Everything the child needs, prepared before fork (the child of a
/// multi-threaded process must not allocate).
struct SpawnPlan {
    id: String,
    root: CString,
    workdir: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    candidates: Vec<CString>,
    ids: Option<(libc::uid_t, libc::gid_t)>,
    log: File,
    null: Option<File>,
    /// Streamed stdio instead of /dev/null and the log.
    stdio: Option<ChildSide>,
}

const STAGES: [&str; 9] = [
    "fork",
    "setsid",
    "dup2",
    "chroot",
    "chdir",
    "setgroups",
    "setgid",
    "setuid",
    "execve",
];

impl SpawnPlan {
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: &str,
        root: &Path,
        cmd: &[String],
        env: &[(String, String)],
        workdir: Option<&str>,
        user: Option<&str>,
        log_path: &Path,
        stdio: Option<ChildSide>,
    ) -> Result<SpawnPlan> {
        if cmd.is_empty() {
            return Err(ContainerError::BadParameter("empty cmd".into()));
        }
        let workdir = workdir.unwrap_or("/");
        if !workdir.starts_with('/') {
            return Err(ContainerError::BadParameter(format!(
                "workdir {workdir:?} is not absolute"
            )));
        }
        let mut envp = Vec::with_capacity(env.len());
        for (k, v) in env {
            if k.is_empty() || k.contains('=') {
                return Err(ContainerError::BadParameter(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
            envp.push(cstring("env", format!("{k}={v}"))?);
        }
        let argv = cmd
            .iter()
            .map(|a| cstring("cmd", a.as_str()))
            .collect::<Result<Vec<_>>>()?;
        let candidates = exec_candidates(&cmd[0], env)
            .into_iter()
            .map(|c| cstring("cmd", c))
            .collect::<Result<Vec<_>>>()?;
        let ids = user.map(parse_user).transpose()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(log_path)
            .map_err(io_err(format!("opening log {}", log_path.display())))?;
        let null = File::options().read(true).open("/dev/null").ok();
        Ok(SpawnPlan {
            id: id.to_string(),
            root: cstring("root", root.as_os_str().as_bytes())?,
            workdir: cstring("workdir", workdir)?,
            argv,
            envp,
            candidates,
            ids,
            log,
            null,
            stdio,
        })
    }

    /// Forks and execs; returns the pid once exec succeeded. Must be called
    /// with the state lock held.
    fn spawn(&self) -> Result<libc::pid_t> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io_err("pipe2")(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and ours.
        let (mut err_r, err_w) =
            unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());

        // SAFETY: fork(2); the child only calls async-signal-safe functions
        // on data prepared above and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(ContainerError::Spawn {
                id: self.id.clone(),
                stage: STAGES[0],
                source: io::Error::last_os_error(),
            });
        }
        if pid == 0 {
            // SAFETY: in the child; see `child`.
            unsafe { self.child(err_w.as_raw_fd(), &argv, &envp) }
        }
        drop(err_w);
        let mut report = [0u8; 8];
        let mut got = 0;
        while got < report.len() {
            match err_r.read(&mut report[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if got == report.len() {
            let stage = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
            let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
            // The child _exits right after; the reaper collects it and,
            // finding no registered process, ignores it.
            return Err(ContainerError::Spawn {
                id: self.id.clone(),
                stage: STAGES.get(stage as usize).copied().unwrap_or("exec"),
                source: io::Error::from_raw_os_error(errno),
            });
        }
        Ok(pid)
    }

    /// The forked child. Only async-signal-safe calls, no allocation.
    unsafe fn child(
        &self,
        err_w: RawFd,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> ! {
        unsafe fn fail(err_w: RawFd, stage: u32) -> ! {
            let errno = *libc::__errno_location();
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&stage.to_ne_bytes());
            b[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_w, b.as_ptr().cast(), b.len());
            libc::_exit(127)
        }
        // Default dispositions and an empty mask: the agent blocks SIGCHLD
        // and friends, and ignored signals would survive exec.
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        if libc::setsid() < 0 {
            fail(err_w, 1);
        }
        if let Some(io) = &self.stdio {
            for (target, fd) in io.fds.iter().enumerate() {
                if libc::dup2(fd.as_raw_fd(), target as RawFd) < 0 {
                    fail(err_w, 2);
                }
            }
            if io.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                fail(err_w, 2);
            }
        }
        let log = self.log.as_raw_fd();
        match &self.null {
            _ if self.stdio.is_some() => {}
            Some(null) => {
                if libc::dup2(null.as_raw_fd(), 0) < 0 {
                    fail(err_w, 2);
                }
            }
            None => {
                libc::close(0);
            }
        }
        if self.stdio.is_none() && (libc::dup2(log, 1) < 0 || libc::dup2(log, 2) < 0) {
            fail(err_w, 2);
        }
        if libc::chroot(self.root.as_ptr()) < 0 {
            fail(err_w, 3);
        }
        if libc::chdir(c"/".as_ptr()) < 0 || libc::chdir(self.workdir.as_ptr()) < 0 {
            fail(err_w, 4);
        }
        if let Some((uid, gid)) = self.ids {
            if libc::setgroups(0, std::ptr::null()) < 0 {
                fail(err_w, 5);
            }
            if libc::setgid(gid) < 0 {
                fail(err_w, 6);
            }
            if libc::setuid(uid) < 0 {
                fail(err_w, 7);
            }
        }
        // Like execvp: ENOENT/ENOTDIR move on to the next PATH entry; the
        // first other error (e.g. EACCES) is the one reported.
        let mut saved = 0;
        for c in &self.candidates {
            libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let e = *libc::__errno_location();
            if e != libc::ENOENT && e != libc::ENOTDIR && saved == 0 {
                saved = e;
            }
        }
        if saved != 0 {
            *libc::__errno_location() = saved;
        }
        fail(err_w, 8)
    }
}

/// Sends `sig` to the process group `pid` leads, or to `pid` alone if the
/// group is gone.
fn kill_group(pid: libc::pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory effects.
    if unsafe { libc::kill(-pid, sig) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_in_root(root: &Path, path: &str, flags: i32, mode: u32) -> io::Result<File> {
    let root_c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let path_c = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open(2) with a valid C string.
    let dir = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    // SAFETY: open_how is plain data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = u64::from(mode);
    // Resolve `path`, its `..` and its symlinks as if `root` were `/`.
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd as RawFd) })
}

/// Creates the directory `path` and its missing parents inside `root`
/// (every step resolved inside it, symlinks included, `..` refused);
/// returns an `O_PATH` descriptor of it.
fn mkdir_in_root(root: &Path, path: &str) -> io::Result<File> {
    let mut cur = String::from("/");
    for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if comp == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "'..' in a path inside the container",
            ));
        }
        let parent = open_in_root(root, &cur, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let name = CString::new(comp).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: mkdirat(2) on our descriptor with a one-component name.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        cur.push_str(comp);
        cur.push('/');
    }
    open_in_root(root, &cur, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Mounts volume `m` inside `root`; returns the mount point as the agent
/// sees it. The mount point is created inside the root and mounted through
/// its descriptor, so a symlink in the image cannot redirect the mount.
fn mount_volume(root: &Path, m: &VolumeMount) -> Result<PathBuf> {
    let what = || format!("volume {} at {}", m.device, m.path);
    if !m.path.starts_with('/') {
        return Err(ContainerError::BadParameter(format!(
            "volume mount point {:?} is not absolute",
            m.path
        )));
    }
    let dir = mkdir_in_root(root, &m.path).map_err(io_err(what()))?;
    let via = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let real = fs::read_link(&via).map_err(io_err(what()))?;
    mount_block(&m.device, &m.fstype, m.readonly, &via).map_err(io_err(what()))?;
    Ok(real)
}

/// Writes file `f` inside `root` (parents created), with its mode and owner.
fn write_container_file(root: &Path, f: &ContainerFile) -> Result<()> {
    let what = || format!("writing {}", f.path);
    let data = b64::decode(&f.data)
        .map_err(|e| ContainerError::BadParameter(format!("file {}: {e}", f.path)))?;
    if data.len() > MAX_FILE {
        return Err(ContainerError::BadParameter(format!(
            "file {} of {} bytes is larger than {MAX_FILE}",
            f.path,
            data.len()
        )));
    }
    let (parent, _) = f
        .path
        .trim_end_matches('/')
        .rsplit_once('/')
        .ok_or_else(|| {
            ContainerError::BadParameter(format!("file path {:?} is not absolute", f.path))
        })?;
    if !f.path.starts_with('/') || f.path.ends_with('/') {
        return Err(ContainerError::BadParameter(format!(
            "file path {:?} is not an absolute file path",
            f.path
        )));
    }
    mkdir_in_root(root, parent).map_err(io_err(what()))?;
    let mode = f.mode & 0o7777;
    let mut file = open_in_root(
        root,
        &f.path,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOCTTY | libc::O_NOFOLLOW,
        mode,
    )
    .map_err(io_err(what()))?;
    file.write_all(&data).map_err(io_err(what()))?;
    // SAFETY: fchmod/fchown on our descriptor (open's mode is filtered by
    // the umask; -1 keeps an id unchanged).
    unsafe {
        if libc::fchmod(file.as_raw_fd(), mode) < 0 {
            return Err(io_err(what())(io::Error::last_os_error()));
        }
        if (f.uid.is_some() || f.gid.is_some())
            && libc::fchown(
                file.as_raw_fd(),
                f.uid.unwrap_or(u32::MAX),
                f.gid.unwrap_or(u32::MAX),
            ) < 0
        {
            return Err(io_err(what())(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn mount_block(dev: &str, fstype: &str, readonly: bool, target: &Path) -> io::Result<()> {
    let dev_c = CString::new(dev).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fs_c = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = if readonly { libc::MS_RDONLY } else { 0 };
    // SAFETY: mount(2) with valid C strings and no data.
    let r = unsafe {
        libc::mount(
            dev_c.as_ptr(),
            target_c.as_ptr(),
            fs_c.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unmount(target: &Path) -> io::Result<()> {
    let c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: umount2(2) with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Containers {
    /// Creates the state directories. `notify` receives every exit.
    pub fn new(paths: Paths, notify: ExitNotifier) -> Result<Containers> {
        let logs = paths.state_dir.join("logs");
        fs::create_dir_all(&logs).map_err(io_err(format!("creating {}", logs.display())))?;
        fs::create_dir_all(&paths.run_dir)
            .map_err(io_err(format!("creating {}", paths.run_dir.display())))?;
        Ok(Containers {
            paths,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            notify: Arc::from(notify),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking handler thread must not take the agent down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.paths.state_dir.join("logs").join(format!("{id}.log"))
    }

    fn fresh_log(&self, id: &str) -> Result<PathBuf> {
        let log = self.log_path(id);
        match fs::remove_file(&log) {
            Ok(()) => Ok(log),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(log),
            Err(e) => Err(io_err(format!("removing old log {}", log.display()))(e)),
        }
    }

    /// NEWCONTAINER: sets up the rootfs and starts the main process.
    pub fn start(&self, req: &StartContainer) -> Result<u32> {
        validate_id(&req.id)?;
        let mut st = self.lock();
        if st.containers.contains_key(&req.id) || st.procs.contains_key(&req.id) {
            return Err(ContainerError::Conflict(req.id.clone()));
        }
        let (root, mounted) = match &req.rootfs {
            Rootfs::Dir { path } => {
                let root =
                    fs::canonicalize(path).map_err(io_err(format!("rootfs directory {path}")))?;
                if !root.is_dir() {
                    return Err(ContainerError::BadParameter(format!(
                        "rootfs {path} is not a directory"
                    )));
                }
                (root, None)
            }
            Rootfs::BlockDevice {
                path,
                fstype,
                readonly,
            } => {
                let target = self.paths.run_dir.join(&req.id).join("root");
                fs::create_dir_all(&target)
                    .map_err(io_err(format!("creating {}", target.display())))?;
                if let Err(e) = mount_block(path, fstype, *readonly, &target) {
                    let _ = fs::remove_dir(&target);
                    let _ = fs::remove_dir(self.paths.run_dir.join(&req.id));
                    return Err(io_err(format!(
                        "mounting {path} ({fstype}) at {}",
                        target.display()
                    ))(e));
                }
                (target.clone(), Some(target))
            }
        };
        // Volumes, then files, before the process exists.
        let mut volumes = Vec::new();
        let prepared = req
            .mounts
            .iter()
            .try_for_each(|m| mount_volume(&root, m).map(|p| volumes.push(p)))
            .and_then(|()| {
                req.files
                    .iter()
                    .try_for_each(|f| write_container_file(&root, f))
            });
        if let Err(e) = prepared {
            self.release(&req.id, mounted.as_deref(), &volumes);
            return Err(e);
        }
        let started = self.fresh_log(&req.id).and_then(|log| {
            let (pid, streams) = self.spawn_with_stdio(
                &req.id,
                &root,
                &req.cmd,
                &req.env,
                req.workdir.as_deref(),
                req.user.as_deref(),
                &log,
                req.stdio.then_some(req.tty),
            )?;
            Ok((pid, log, streams))
        });
        let (pid, log, streams) = match started {
            Ok(v) => v,
            Err(e) => {
                self.release(&req.id, mounted.as_deref(), &volumes);
                return Err(e);
            }
        };
        log::info!(
            "container {} started as pid {pid} in {}",
            req.id,
            root.display()
        );
        st.containers.insert(
            req.id.clone(),
            Container {
                root,
                mounted,
                volumes,
            },
        );
        st.procs.insert(
            req.id.clone(),
            Proc {
                pid,
                container: req.id.clone(),
                exit: None,
                log,
                streams,
            },
        );
        st.by_pid.insert(pid, req.id.clone());
        Ok(pid as u32)
    }

    /// Unmounts a container's volumes (last first), then its root.
    fn release(&self, id: &str, root_mount: Option<&Path>, volumes: &[PathBuf]) {
        for v in volumes.iter().rev() {
            if let Err(e) = unmount(v) {
                log::warn!("unmounting volume {}: {e}", v.display());
            }
        }
        if let Some(m) = root_mount {
            self.release_mount(id, m);
        }
    }

    fn release_mount(&self, id: &str, mountpoint: &Path) {
        if let Err(e) = unmount(mountpoint) {
            log::warn!("unmounting {}: {e}", mountpoint.display());
        }
        let _ = fs::remove_dir(mountpoint);
        let _ = fs::remove_dir(self.paths.run_dir.join(id));
    }

    /// EXECCMD: starts another process chrooted into a container's root.
    pub fn exec(&self, req: &Exec) -> Result<u32> {
        validate_id(&req.id)?;
        let mut st = self.lock();
        let root = st
            .containers
            .get(&req.container)
            .ok_or_else(|| ContainerError::NoSuchContainer(req.container.clone()))?
            .root
            .clone();
        if st.procs.contains_key(&req.id) || st.containers.contains_key(&req.id) {
            return Err(ContainerError::Conflict(req.id.clone()));
        }
        let log = self.fresh_log(&req.id)?;
        let (pid, streams) = self.spawn_with_stdio(
            &req.id,
            &root,
            &req.cmd,
            &req.env,
            req.workdir.as_deref(),
            req.user.as_deref(),
            &log,
            req.stdio.then_some(req.tty),
        )?;
        log::info!(
            "process {} started as pid {pid} in container {}",
            req.id,
            req.container
        );
        st.procs.insert(
            req.id.clone(),
            Proc {
                pid,
                container: req.container.clone(),
                exit: None,
                log,
                streams,
            },
        );
        st.by_pid.insert(pid, req.id.clone());
        Ok(pid as u32)
    }

    /// Forks and execs one process; with `stdio` (`Some(tty)`) its stdio
    /// is streamed. Must be called with the state lock held.
    #[allow(clippy::too_many_arguments)]
    fn spawn_with_stdio(
        &self,
        id: &str,
        root: &Path,
        cmd: &[String],
        env: &[(String, String)],
        workdir: Option<&str>,
        user: Option<&str>,
        log: &Path,
        stdio: Option<bool>,
    ) -> Result<(libc::pid_t, Option<Arc<Streams>>)> {
        let (child, host) = match stdio {
            Some(tty) => {
                let (c, h) = stdio::open(tty).map_err(io_err(format!("stdio of {id}")))?;
                (Some(c), Some(h))
            }
            None => (None, None),
        };
        let plan = SpawnPlan::new(id, root, cmd, env, workdir, user, log, child)?;
        let pid = plan.spawn()?;
        let log_file = plan.log.try_clone();
        // The child's ends close here, so output ends when the process's do.
        drop(plan);
        let streams = match host {
            Some(host) => {
                let started =
                    log_file.and_then(|log| Streams::start(id, host, &log, self.notify.clone()));
                match started {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) => {
                        let _ = kill_group(pid, libc::SIGKILL);
                        return Err(io_err(format!("stdio threads of {id}"))(e));
                    }
                }
            }
            None => None,
        };
        Ok((pid, streams))
    }

    /// STDIN: queues bytes for a `stdio` process's stdin.
    pub fn stdin(&self, id: &str, data: Vec<u8>, eof: bool) -> Result<()> {
        let streams = self.streams_of(id)?;
        match streams.feed(data, eof) {
            Ok(()) => Ok(()),
            Err(true) => Err(ContainerError::Busy(format!("stdin of {id} is full"))),
            Err(false) => Err(ContainerError::BadParameter(format!(
                "the stdin of {id} is closed"
            ))),
        }
    }

    /// LOGS: a `stdio` process's kept output.
    pub fn logs(&self, id: &str) -> Result<Vec<crate::protocol::LogRecord>> {
        Ok(self.streams_of(id)?.logs())
    }

    /// RESIZE: sets a `tty` process's terminal size.
    pub fn resize(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        let streams = self.streams_of(id)?;
        match streams.resize(rows, cols) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ContainerError::BadParameter(format!(
                "{id} has no terminal"
            ))),
            Err(e) => Err(io_err(format!("resizing the terminal of {id}"))(e)),
        }
    }

    fn streams_of(&self, id: &str) -> Result<Arc<Streams>> {
        let st = self.lock();
        let p = st
            .procs
            .get(id)
            .ok_or_else(|| ContainerError::NoSuchProcess(id.to_string()))?;
        p.streams
            .clone()
            .ok_or_else(|| ContainerError::BadParameter(format!("{id} was not started with stdio")))
    }

    /// Collects every exited child (call on SIGCHLD, and now and then).
    /// Unknown pids (orphans re-parented to PID 1, failed spawns) are dropped.
    pub fn reap_all(&self) {
        let mut exited = Vec::new();
        loop {
            let mut status = 0;
            // SAFETY: waitpid(2) writes only `status`.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            exited.push((pid, exit_code(status)));
        }
        if exited.is_empty() {
            return;
        }
        let mut events = Vec::new();
        let mut gated = Vec::new();
        {
            let mut st = self.lock();
            for (pid, code) in exited {
                let Some(id) = st.by_pid.remove(&pid) else {
                    log::debug!("reaped unknown pid {pid} (exit {code})");
                    continue;
                };
                if let Some(p) = st.procs.get_mut(&id) {
                    p.exit = Some(code);
                    log::info!("process {id} (pid {pid}) exited with {code}");
                    match &p.streams {
                        // After its last output.
                        Some(s) => gated.push((s.clone(), code)),
                        None => events.push(Event::Exited { id, code }),
                    }
                }
            }
        }
        self.cond.notify_all();
        for ev in events {
            (self.notify)(ev);
        }
        for (s, code) in gated {
            s.exited(code);
        }
    }

    /// Waits, with the lock, until `done` holds or `deadline` passes.
    fn wait_until<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        mut done: impl FnMut(&State) -> Result<bool>,
    ) -> Result<(MutexGuard<'a, State>, bool)> {
        loop {
            if done(&st)? {
                return Ok((st, true));
            }
            match deadline {
                None => st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok((st, false));
                    }
                    st = self
                        .cond
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    fn exit_of(st: &State, id: &str) -> Result<Option<i32>> {
        st.procs
            .get(id)
            .map(|p| p.exit)
            .ok_or_else(|| ContainerError::NoSuchProcess(id.to_string()))
    }

    /// WAITPROCESS: the exit code of process `id`, once it has exited.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<i32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let st = self.lock();
        let (st, done) =
            self.wait_until(st, deadline, |st| Ok(Self::exit_of(st, id)?.is_some()))?;
        match Self::exit_of(&st, id)? {
            Some(code) if done => Ok(code),
            _ => Err(ContainerError::Timeout(id.to_string())),
        }
    }

    /// SIGNALPROCESS: `sig` to process `id`'s process group.
    pub fn signal(&self, id: &str, sig: i32) -> Result<()> {
        let st = self.lock();
        let p = st
            .procs
            .get(id)
            .ok_or_else(|| ContainerError::NoSuchProcess(id.to_string()))?;
        if p.exit.is_some() {
            return Err(ContainerError::NoSuchProcess(format!("{id} has exited")));
        }
        kill_group(p.pid, sig).map_err(io_err(format!("signal {sig} to {id}")))
    }

    fn running_in(st: &State, container: &str) -> Vec<libc::pid_t> {
        st.procs
            .values()
            .filter(|p| p.container == container && p.exit.is_none())
            .map(|p| p.pid)
            .collect()
    }

    /// KILLCONTAINER: `sig` to every process of the container, SIGKILL after
    /// `timeout` if the main process still runs, and SIGKILL to what remains
    /// once it has exited. Returns the main process's exit code.
    pub fn stop(&self, id: &str, sig: i32, timeout: Duration) -> Result<i32> {
        let st = self.lock();
        if !st.containers.contains_key(id) {
            return Err(ContainerError::NoSuchContainer(id.to_string()));
        }
        if sig <= 0 || sig >= 65 {
            return Err(ContainerError::BadParameter(format!(
                "invalid signal {sig}"
            )));
        }
        for pid in Self::running_in(&st, id) {
            let _ = kill_group(pid, sig);
        }
        let exited = |st: &State| Ok(Self::exit_of(st, id)?.is_some());
        let (st, done) = self.wait_until(st, Some(Instant::now() + timeout), exited)?;
        let st = if done {
            st
        } else {
            log::info!("container {id} ignored signal {sig}; sending SIGKILL");
            if let Some(p) = st.procs.get(id) {
                let _ = kill_group(p.pid, libc::SIGKILL);
            }
            let (st, done) = self.wait_until(st, Some(Instant::now() + KILL_WAIT), exited)?;
            if !done {
                return Err(ContainerError::Timeout(format!("{id} after SIGKILL")));
            }
            st
        };
        for pid in Self::running_in(&st, id) {
            let _ = kill_group(pid, libc::SIGKILL);
        }
        Self::exit_of(&st, id)?.ok_or_else(|| ContainerError::Timeout(id.to_string()))
    }

    /// REMOVECONTAINER: SIGKILL everything in the container, wait for it,
    /// unmount, and forget the container, its processes and logs.
    pub fn remove(&self, id: &str) -> Result<()> {
        let st = self.lock();
        if !st.containers.contains_key(id) {
            return Err(ContainerError::NoSuchContainer(id.to_string()));
        }
        for pid in Self::running_in(&st, id) {
            let _ = kill_group(pid, libc::SIGKILL);
        }
        let (mut st, done) = self.wait_until(st, Some(Instant::now() + KILL_WAIT), |st| {
            Ok(Self::running_in(st, id).is_empty())
        })?;
        if !done {
            return Err(ContainerError::Timeout(format!(
                "{id}'s processes after SIGKILL"
            )));
        }
        let Some(c) = st.containers.remove(id) else {
            return Err(ContainerError::NoSuchContainer(id.to_string()));
        };
        let gone: Vec<String> = st
            .procs
            .iter()
            .filter(|(_, p)| p.container == id)
            .map(|(k, _)| k.clone())
            .collect();
        for pid_id in gone {
            if let Some(p) = st.procs.remove(&pid_id) {
                let _ = fs::remove_file(&p.log);
            }
        }
        drop(st);
        self.release(id, c.mounted.as_deref(), &c.volumes);
        log::info!("container {id} removed");
        Ok(())
    }

    /// Removes every container (DESTROYPOD); returns the failures.
    pub fn remove_all(&self) -> Vec<ContainerError> {
        let ids: Vec<String> = self.lock().containers.keys().cloned().collect();
        ids.iter().filter_map(|id| self.remove(id).err()).collect()
    }

    fn root_of(&self, container: &str) -> Result<PathBuf> {
        self.lock()
            .containers
            .get(container)
            .map(|c| c.root.clone())
            .ok_or_else(|| ContainerError::NoSuchContainer(container.to_string()))
    }

    /// WRITEFILE: creates or truncates `path` (resolved inside the
    /// container's root, symlinks included) and writes `data` with `mode`.
    pub fn write_file(&self, container: &str, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let root = self.root_of(container)?;
        if data.len() > MAX_FILE {
            return Err(ContainerError::BadParameter(format!(
                "file of {} bytes is larger than {MAX_FILE}",
                data.len()
            )));
        }
        let what = || format!("writing {path} in {container}");
        let mut f = open_in_root(
            &root,
            path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOCTTY,
            mode & 0o7777,
        )
        .map_err(io_err(what()))?;
        f.write_all(data).map_err(io_err(what()))?;
        // SAFETY: fchmod on our descriptor (open's mode is filtered by umask).
        if unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) } < 0 {
            return Err(io_err(what())(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// READFILE: reads a regular file of at most [`MAX_FILE`] bytes.
    pub fn read_file(&self, container: &str, path: &str) -> Result<Vec<u8>> {
        let root = self.root_of(container)?;
        let what = || format!("reading {path} in {container}");
        let f = open_in_root(&root, path, libc::O_RDONLY | libc::O_NOCTTY, 0)
            .map_err(io_err(what()))?;
        let meta = f.metadata().map_err(io_err(what()))?;
        if !meta.is_file() {
            return Err(ContainerError::BadParameter(format!(
                "{path} is not a regular file"
            )));
        }
        let mut data = Vec::new();
        f.take(MAX_FILE as u64 + 1)
            .read_to_end(&mut data)
            .map_err(io_err(what()))?;
        if data.len() > MAX_FILE {
            return Err(ContainerError::BadParameter(format!(
                "{path} is larger than {MAX_FILE} bytes"
            )));
        }
        Ok(data)
    }

    /// READLOG: up to [`MAX_FILE`] bytes of process `id`'s output from
    /// `offset`, and the offset after them.
    pub fn read_log(&self, id: &str, offset: u64) -> Result<(Vec<u8>, u64)> {
        let log = self
            .lock()
            .procs
            .get(id)
            .map(|p| p.log.clone())
            .ok_or_else(|| ContainerError::NoSuchProcess(id.to_string()))?;
        let what = || format!("reading log of {id}");
        let mut f = File::open(&log).map_err(io_err(what()))?;
        f.seek(SeekFrom::Start(offset)).map_err(io_err(what()))?;
        let mut data = Vec::new();
        f.take(MAX_FILE as u64)
            .read_to_end(&mut data)
            .map_err(io_err(what()))?;
        let next = offset + data.len() as u64;
        Ok((data, next))
    }

    /// Ids of known containers (sorted).
    pub fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().containers.keys().cloned().collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["c1", "a.b-c_d", "X", &"a".repeat(64)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn users() {
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("0:5").unwrap(), (0, 5));
        for bad in ["", "root", "1:", ":1", "-1", "1:2:3"] {
            assert!(parse_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exit_codes() {
        // Status encodings as waitpid returns them.
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(libc::SIGTERM), 143);
        assert_eq!(exit_code(libc::SIGKILL | 0x80), 137); // with core-dump bit
    }

    #[test]
    fn path_search() {
        assert_eq!(exec_candidates("/bin/x", &[]), vec!["/bin/x"]);
        assert_eq!(exec_candidates("./x", &[]), vec!["./x"]);
        let env = vec![("PATH".to_string(), "/a/:/b::".to_string())];
        assert_eq!(
            exec_candidates("x", &env),
            vec!["/a/x", "/b/x", "./x", "./x"]
        );
        assert_eq!(
            exec_candidates("x", &[]).len(),
            DEFAULT_PATH.split(':').count()
        );
    }

    #[test]
    fn plan_validation() {
        let dir = std::env::temp_dir().join(format!("ember-agent-plan-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let cmd = vec!["x".to_string()];
        let plan =
            |cmd: &[String], env: &[(String, String)], wd: Option<&str>, user: Option<&str>| {
                SpawnPlan::new("p", Path::new("/"), cmd, env, wd, user, &log, None)
            };
        assert!(plan(&[], &[], None, None).is_err());
        assert!(plan(&cmd, &[], Some("rel"), None).is_err());
        assert!(plan(&cmd, &[("A=B".into(), "1".into())], None, None).is_err());
        assert!(plan(&cmd, &[("".into(), "1".into())], None, None).is_err());
        assert!(plan(&["a\0b".to_string()], &[], None, None).is_err());
        assert!(plan(&cmd, &[], None, Some("nobody")).is_err());
        let p = plan(
            &cmd,
            &[("K".into(), "v=w".into())],
            Some("/tmp"),
            Some("7:8"),
        )
        .unwrap();
        assert_eq!(p.envp[0].as_bytes(), b"K=v=w");
        assert_eq!(p.ids, Some((7, 8)));
        assert_eq!(p.workdir.as_bytes(), b"/tmp");
        drop(p);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_resolve_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("ember-agent-files-{}", std::process::id()));
        let root = dir.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(dir.join("outside"), b"secret").unwrap();
        // A symlink pointing out of the root resolves inside it instead.
        std::os::unix::fs::symlink("/../../outside", root.join("etc/link")).unwrap();
        let c = Containers::new(
            Paths {
                state_dir: dir.join("state"),
                run_dir: dir.join("run"),
            },
            Box::new(|_| {}),
        )
        .unwrap();
        c.lock().containers.insert(
            "c".into(),
            Container {
                root: root.clone(),
                mounted: None,
                volumes: Vec::new(),
            },
        );
        c.write_file("c", "/etc/hello", b"hi\n", 0o600).unwrap();
        assert_eq!(fs::read(root.join("etc/hello")).unwrap(), b"hi\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(root.join("etc/hello"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(c.read_file("c", "etc/../etc/hello").unwrap(), b"hi\n");
        assert!(c.read_file("c", "/../outside").is_err());
        assert!(c.read_file("c", "/etc/link").is_err());
        c.write_file("c", "/etc/link", b"x", 0o644).unwrap();
        assert_eq!(fs::read(dir.join("outside")).unwrap(), b"secret");
        assert!(root.join("outside").exists());
        assert!(c.read_file("c", "/etc").is_err());
        assert!(c.read_file("nope", "/etc/hello").is_err());
        assert!(c.write_file("c", "/missing/dir/f", b"", 0o644).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
