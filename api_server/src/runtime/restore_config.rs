//! The per-instance config of a guest restored from a snapshot (warm
//! starts of the C unikernel runtime, `resources/unikernel/src/warm.c`),
//! and the one-shot unix socket server that hands it over.
//!
//! A template guest booted with `ember.warm=1` carries no argv, environment
//! or mounts of its own. After `PUT /snapshot/load` the VMM sends the vsock
//! TRANSPORT_RESET event; the runtime connects to host CID 2 port
//! [`EMBER_CONFIG_PORT`], which the VMM forwards to the unix socket
//! `<vsock uds_path>_1024`, where a [`ConfigServer`] (created before the
//! load) writes [`RestoreConfig::encode`]'s bytes and closes.
//!
//! # Wire format
//!
//! ASCII lines, at most [`MAX_CONFIG`] bytes in all:
//!
//! ```text
//! ember-config 1
//! arg <hex>                        any number, in argv order (argv[0] is "ember")
//! env <hex of KEY=VALUE>           any number
//! mount <hex of mount point>:<n>   any number; n is the decimal block device index
//! seed <64 hex digits>             exactly one: 32 bytes from the host's getrandom
//! end
//! ```
//!
//! Hex is lowercase, two digits per byte, and never encodes a NUL. The
//! runtime adds these entries after the command line's, through the same
//! code (so with the same rules) as the cold command line's `-- <args>`,
//! `KEY=VALUE` and `ember.mount=` words, and rekeys `ember_random` with the
//! seed. It exits with status 1 and `ember: bad restore config` on anything
//! malformed, and `ember: no restore config` when nothing arrives in 10 s.
//! [`RestoreConfig::encode`] refuses what the runtime would refuse (counts
//! over its limits too), so a config that encodes is one the guest takes.
//!
//! # The server
//!
//! [`ConfigServer::listen`] binds a fresh socket in a private directory it
//! makes (0700, ours) inside the target's directory, sets the socket's mode
//! to 0600 and its owner to the VMM's uid:gid there (so neither the umask
//! nor a VMM that can write the target's directory can interfere: every
//! step goes through directory descriptors), then hard-links it to its
//! final name, which fails if anything (a file, a symlink, a socket) is
//! already there: nothing is ever followed or replaced. A socket left there
//! by an earlier server of ours (a socket with the same owner) is removed
//! first. The bind goes through `/proc/self/fd`, so the target's path may
//! be longer than a unix socket address.
//!
//! It serves from its own short-lived thread, never from emberd's event
//! loop: `poll(2)` on the listener and a stop eventfd until the deadline,
//! so a VMM that never connects costs one sleeping thread for at most the
//! timeout, and writes carry a send timeout, so a peer that stops reading
//! cannot hold it longer either. A connection whose peer uid (`SO_PEERCRED`)
//! is neither the owner's nor root is closed unanswered and the server
//! keeps waiting. Exactly one accepted peer gets the config; then the
//! socket is closed and its path removed. [`ConfigServer::outcome`] tells
//! the event loop, without blocking, what happened (for the instance log);
//! dropping the server stops it at once.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// The vsock port (on host CID 2) the runtime fetches its config from.
pub const EMBER_CONFIG_PORT: u32 = 1024;
/// Largest encoded config (the runtime's buffer and vsock credit).
pub const MAX_CONFIG: usize = 64 * 1024;
/// The runtime's limits (resources/unikernel/src/start.c, rt.h): argv
/// entries besides argv[0].
pub const MAX_ARGS: usize = 127;
/// Environment entries (the template's own command line's `KEY=VALUE`
/// words, such as `console=ttyS0`, count against the same limit).
pub const MAX_ENV: usize = 128;
/// Distinct mount points.
pub const MAX_MOUNTS: usize = 8;
/// Highest block device index a mount may name.
pub const MAX_DEVICE_INDEX: u32 = 31;
/// How long a server waits for its one connection by default.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

const HEADER: &str = "ember-config 1";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RestoreConfigError {
    #[error("restore config: {what} {value:?} {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("restore config: more than {max} {what}")]
    TooMany { what: &'static str, max: usize },
    #[error("restore config: {len} bytes encoded, the runtime takes at most {MAX_CONFIG}")]
    TooLong { len: usize },
    #[error("restore config: line {line}: {why}")]
    Malformed { line: usize, why: String },
    #[error("restore config: {0}")]
    Cmdline(#[from] crate::build::CmdlineError),
    #[error("restore config: getrandom failed: {0}")]
    Random(io::Error),
    #[error("config socket {path}: {what}: {err}")]
    Socket {
        path: String,
        what: &'static str,
        err: io::Error,
    },
    #[error("config socket {path} exists and is not a socket of ours; refusing to replace it")]
    Exists { path: String },
}

/// What one restored guest learns about itself.
#[derive(Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// argv[1..].
    pub args: Vec<String>,
    /// The environment, in order.
    pub env: Vec<(String, String)>,
    /// Mount point and index of the virtio block device backing it.
    pub mounts: Vec<(String, u32)>,
    /// Reseeds the guest's `ember_random`.
    pub seed: [u8; 32],
}

impl std::fmt::Debug for RestoreConfig {
    // The seed stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreConfig")
            .field("args", &self.args)
            .field("env", &self.env)
            .field("mounts", &self.mounts)
            .finish_non_exhaustive()
    }
}

/// 32 bytes from the kernel's getrandom.
pub fn fresh_seed() -> Result<[u8; 32], RestoreConfigError> {
    let mut seed = [0u8; 32];
    let mut done = 0;
    while done < seed.len() {
        // SAFETY: writes at most `seed.len() - done` bytes into the rest of `seed`.
        let r = unsafe { libc::getrandom(seed[done..].as_mut_ptr().cast(), seed.len() - done, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RestoreConfigError::Random(e));
        }
        done += r as usize;
    }
    Ok(seed)
}

/// Whitespace as the runtime's command-line splitter sees it.
fn is_cmdline_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

impl RestoreConfig {
    /// A config with a fresh seed.
    pub fn new(
        args: Vec<String>,
        env: Vec<(String, String)>,
        mounts: Vec<(String, u32)>,
    ) -> Result<RestoreConfig, RestoreConfigError> {
        Ok(RestoreConfig {
            args,
            env,
            mounts,
            seed: fresh_seed()?,
        })
    }

    /// The config giving a restored guest what the cold command line of
    /// [`crate::build::render_cmdline`] gives a cold one from the same
    /// inputs: the same checks (so what cold refuses, warm refuses), `args`
    /// split at whitespace as the runtime splits the command line. The
    /// image's boot args stay on the template's command line.
    pub fn from_instance(
        mounts: &[(String, usize)],
        env: &BTreeMap<String, String>,
        args: &str,
    ) -> Result<RestoreConfig, RestoreConfigError> {
        crate::build::render_cmdline("", mounts, env, args)?;
        let mut mts = Vec::with_capacity(mounts.len());
        for (m, i) in mounts {
            let idx = u32::try_from(*i)
                .ok()
                .filter(|i| *i <= MAX_DEVICE_INDEX)
                .ok_or_else(|| RestoreConfigError::Invalid {
                    what: "mount",
                    value: format!("{m}:{i}"),
                    why: "names a block device index over 31",
                })?;
            mts.push((m.clone(), idx));
        }
        let cfg = RestoreConfig::new(
            args.split(is_cmdline_space)
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect(),
            env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            mts,
        )?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Refuses what the runtime would refuse.
    fn check(&self) -> Result<(), RestoreConfigError> {
        let invalid = |what, value: &str, why| RestoreConfigError::Invalid {
            what,
            value: value.into(),
            why,
        };
        for (what, n, max) in [
            ("args", self.args.len(), MAX_ARGS),
            ("environment variables", self.env.len(), MAX_ENV),
        ] {
            if n > max {
                return Err(RestoreConfigError::TooMany { what, max });
            }
        }
        for a in &self.args {
            if a.contains('\0') {
                return Err(invalid("arg", a, "contains a NUL byte"));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() {
                return Err(invalid("environment name", k, "is empty"));
            }
            if k.contains(['=', '\0', '.']) {
                return Err(invalid(
                    "environment name",
                    k,
                    "contains '=', '.' or a NUL byte",
                ));
            }
            if v.contains('\0') {
                return Err(invalid("environment value", v, "contains a NUL byte"));
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (m, i) in &self.mounts {
            if m.is_empty() || m.contains('\0') {
                return Err(invalid("mount point", m, "is empty or contains a NUL byte"));
            }
            if *i > MAX_DEVICE_INDEX {
                return Err(invalid("mount point", m, "names a device index over 31"));
            }
            if !seen.contains(&m.as_str()) {
                seen.push(m);
            }
        }
        // The runtime counts distinct mount points (the last one wins).
        if seen.len() > MAX_MOUNTS {
            return Err(RestoreConfigError::TooMany {
                what: "mount points",
                max: MAX_MOUNTS,
            });
        }
        Ok(())
    }

    /// The wire bytes (see the module docs).
    pub fn encode(&self) -> Result<Vec<u8>, RestoreConfigError> {
        self.check()?;
        let mut out = String::with_capacity(256);
        out.push_str(HEADER);
        out.push('\n');
        for a in &self.args {
            out.push_str("arg ");
            push_hex(&mut out, a.as_bytes());
            out.push('\n');
        }
        for (k, v) in &self.env {
            out.push_str("env ");
            push_hex(&mut out, k.as_bytes());
            push_hex(&mut out, b"=");
            push_hex(&mut out, v.as_bytes());
            out.push('\n');
        }
        for (m, i) in &self.mounts {
            out.push_str("mount ");
            push_hex(&mut out, m.as_bytes());
            out.push_str(&format!(":{i}\n"));
        }
        out.push_str("seed ");
        push_hex(&mut out, &self.seed);
        out.push_str("\nend\n");
        if out.len() > MAX_CONFIG {
            return Err(RestoreConfigError::TooLong { len: out.len() });
        }
        Ok(out.into_bytes())
    }

    /// Parses wire bytes as strictly as the runtime does (plus UTF-8).
    pub fn decode(bytes: &[u8]) -> Result<RestoreConfig, RestoreConfigError> {
        let bad = |line: usize, why: &str| RestoreConfigError::Malformed {
            line,
            why: why.into(),
        };
        if bytes.len() > MAX_CONFIG {
            return Err(RestoreConfigError::TooLong { len: bytes.len() });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad(0, "not ASCII"))?;
        if !text.is_ascii() {
            return Err(bad(0, "not ASCII"));
        }
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad(0, "does not end with a newline"))?;
        let mut lines = body.split('\n').enumerate().map(|(i, l)| (i + 1, l));
        match lines.next() {
            Some((_, HEADER)) => {}
            _ => return Err(bad(1, "not `ember-config 1`")),
        }
        let mut cfg = RestoreConfig {
            args: Vec::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            seed: [0; 32],
        };
        let mut seed = false;
        let mut ended = false;
        for (n, line) in lines {
            if ended {
                return Err(bad(n, "after `end`"));
            }
            // Every line but `end` is `<word> <value>` (the value may be empty).
            let (word, rest) = line.split_once(' ').unwrap_or((line, "\0"));
            match word {
                "end" if line == "end" => {
                    if !seed {
                        return Err(bad(n, "no `seed` before `end`"));
                    }
                    ended = true;
                }
                "arg" => cfg.args.push(unhex_str(rest).map_err(|w| bad(n, w))?),
                "env" => {
                    let kv = unhex_str(rest).map_err(|w| bad(n, w))?;
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| bad(n, "env entry without '='"))?;
                    cfg.env.push((k.into(), v.into()));
                }
                "mount" => {
                    let (m, i) = rest
                        .split_once(':')
                        .ok_or_else(|| bad(n, "mount entry without ':'"))?;
                    if i.is_empty() || i.len() > 2 || !i.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad(n, "bad device index"));
                    }
                    let m = unhex_str(m).map_err(|w| bad(n, w))?;
                    cfg.mounts
                        .push((m, i.parse().map_err(|_| bad(n, "bad index"))?));
                }
                "seed" => {
                    if seed {
                        return Err(bad(n, "a second `seed`"));
                    }
                    let b = unhex(rest).map_err(|w| bad(n, w))?;
                    cfg.seed = b.try_into().map_err(|_| bad(n, "seed is not 32 bytes"))?;
                    seed = true;
                }
                _ => return Err(bad(n, "unknown line")),
            }
        }
        if !ended {
            return Err(bad(0, "no `end` line"));
        }
        cfg.check()?;
        Ok(cfg)
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const D: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(D[(b >> 4) as usize] as char);
        out.push(D[(b & 15) as usize] as char);
    }
}

fn unhex(s: &str) -> Result<Vec<u8>, &'static str> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits");
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err("not a lowercase hex digit"),
    };
    s.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn unhex_str(s: &str) -> Result<String, &'static str> {
    let b = unhex(s)?;
    if b.contains(&0) {
        return Err("encodes a NUL byte");
    }
    String::from_utf8(b).map_err(|_| "not UTF-8")
}

/// What became of a [`ConfigServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeOutcome {
    /// The guest's connection got all `bytes`.
    Fetched { bytes: usize },
    /// Nobody (with the right uid) connected in time.
    TimedOut,
    /// The server was dropped before a fetch.
    Stopped,
    /// Accepting or writing failed.
    Failed(String),
}

impl std::fmt::Display for ServeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeOutcome::Fetched { bytes } => {
                write!(f, "the guest fetched its restore config ({bytes} bytes)")
            }
            ServeOutcome::TimedOut => write!(f, "the guest never fetched its restore config"),
            ServeOutcome::Stopped => write!(f, "restore config server stopped before a fetch"),
            ServeOutcome::Failed(e) => write!(f, "serving the restore config failed: {e}"),
        }
    }
}

/// A one-shot unix socket server of one encoded [`RestoreConfig`] (see the
/// module docs). Dropping it stops the thread and removes the socket.
pub struct ConfigServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    outcome: Arc<Mutex<Option<ServeOutcome>>>,
    thread: Option<JoinHandle<()>>,
}

fn sock_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> RestoreConfigError {
    let path = path.display().to_string();
    move |err| RestoreConfigError::Socket { path, what, err }
}

impl ConfigServer {
    /// Serves `cfg` at `path` for [`SERVE_TIMEOUT`]; `owner` is the VMM's
    /// uid:gid (None: this process's).
    pub fn listen(
        path: &Path,
        owner: Option<(u32, u32)>,
        cfg: &RestoreConfig,
    ) -> Result<ConfigServer, RestoreConfigError> {
        ConfigServer::listen_for(path, owner, cfg, SERVE_TIMEOUT)
    }

    /// [`ConfigServer::listen`] with its own timeout.
    pub fn listen_for(
        path: &Path,
        owner: Option<(u32, u32)>,
        cfg: &RestoreConfig,
        timeout: Duration,
    ) -> Result<ConfigServer, RestoreConfigError> {
        let bytes = cfg.encode()?;
        // SAFETY: geteuid/getegid have no preconditions.
        let me = unsafe { (libc::geteuid(), libc::getegid()) };
        let (uid, gid) = owner.unwrap_or(me);
        let listener = bind_private(path, uid, gid)?;
        listener
            .set_nonblocking(true)
            .map_err(sock_err(path, "set non-blocking"))?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(sock_err(path, "eventfd"))?);
        let outcome = Arc::new(Mutex::new(None));
        let deadline = Instant::now() + timeout;
        let thread = {
            let (stop, outcome, path) = (stop.clone(), outcome.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("restore-config".into())
                .spawn(move || {
                    let r = serve(&listener, &stop, uid, &bytes, deadline);
                    drop(listener);
                    let _ = fs::remove_file(&path);
                    *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                })
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(sock_err(path, "start its thread")(e));
            }
        };
        Ok(ConfigServer {
            path: path.to_path_buf(),
            stop,
            outcome,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What happened, once the server is done (never blocks).
    pub fn outcome(&self) -> Option<ServeOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the server to finish (at most its timeout): worker
    /// threads and tests only.
    pub fn wait(mut self) -> ServeOutcome {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.outcome().unwrap_or(ServeOutcome::Stopped)
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

/// Binds a 0600 socket owned by uid:gid at `path` without following or
/// replacing anything there (see the module docs).
fn bind_private(path: &Path, uid: u32, gid: u32) -> Result<UnixListener, RestoreConfigError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.file_name().is_none() {
        return Err(RestoreConfigError::Exists {
            path: path.display().to_string(),
        });
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.uid() == uid && m.gid() == gid => {
            // Left by an earlier server of ours (its process died).
            fs::remove_file(path).map_err(sock_err(path, "remove the stale socket"))?;
        }
        Ok(_) => {
            return Err(RestoreConfigError::Exists {
                path: path.display().to_string(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(path, "look at")(e)),
    }
    // The socket is made in a private directory of ours (0700, so nobody
    // can swap what we chmod and chown there), reached through descriptors
    // only, then linked to its name: the target's directory may be
    // writable by the VMM's uid.
    let name = path.file_name().expect("checked above");
    let parent = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(sock_err(dir, "open its directory"))?;
    let mut tag = [0u8; 6];
    tag.copy_from_slice(&fresh_seed()?[..6]);
    let mut tmp_name = String::from(".rc");
    push_hex(&mut tmp_name, &tag);
    let tmp = dir.join(&tmp_name);
    let c_tmp = cstr(tmp_name.as_bytes());
    // SAFETY: `parent` is an open directory and `c_tmp` a NUL-terminated name.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), c_tmp.as_ptr(), 0o700) } != 0 {
        return Err(sock_err(&tmp, "mkdir")(io::Error::last_os_error()));
    }
    let r = bind_in_private_dir(&parent, &c_tmp, &tmp, name, path, uid, gid);
    // SAFETY: as above; removes the (by now empty) private directory.
    unsafe { libc::unlinkat(parent.as_raw_fd(), c_tmp.as_ptr(), libc::AT_REMOVEDIR) };
    r
}

fn cstr(b: &[u8]) -> std::ffi::CString {
    // Names built here or taken from a Path: never an inner NUL.
    std::ffi::CString::new(b).unwrap_or_default()
}

/// Binds `<private dir>/s` through /proc/self/fd, sets its mode and owner
/// there, and links it to `name` in `parent`; the private entry is removed
/// whatever happens.
fn bind_in_private_dir(
    parent: &fs::File,
    c_tmp: &std::ffi::CStr,
    tmp: &Path,
    name: &std::ffi::OsStr,
    path: &Path,
    uid: u32,
    gid: u32,
) -> Result<UnixListener, RestoreConfigError> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: `parent` is an open directory, `c_tmp` a NUL-terminated name;
    // O_NOFOLLOW: a symlink put there in the meantime is refused.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            c_tmp.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(sock_err(tmp, "open")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let private = unsafe { <fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    let m = private.metadata().map_err(sock_err(tmp, "stat"))?;
    // SAFETY: geteuid has no preconditions.
    if m.uid() != unsafe { libc::geteuid() } || m.mode() & 0o7777 != 0o700 {
        return Err(RestoreConfigError::Exists {
            path: tmp.display().to_string(),
        });
    }
    let dfd = private.as_raw_fd();
    let sock = c"s";
    let listener =
        UnixListener::bind(format!("/proc/self/fd/{dfd}/s")).map_err(sock_err(tmp, "bind"))?;
    let finish = || -> Result<(), RestoreConfigError> {
        // SAFETY: `dfd` is our private directory, `sock` a NUL-terminated name.
        if unsafe { libc::fchmodat(dfd, sock.as_ptr(), 0o600, 0) } != 0 {
            return Err(sock_err(tmp, "chmod 0600")(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::fchownat(dfd, sock.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return Err(sock_err(tmp, "chown")(io::Error::last_os_error()));
        }
        let c_name = cstr(name.as_bytes());
        // SAFETY: both directories are open, both names NUL-terminated;
        // linkat never follows the source (flags 0) and never replaces.
        if unsafe { libc::linkat(dfd, sock.as_ptr(), parent.as_raw_fd(), c_name.as_ptr(), 0) } != 0
        {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::AlreadyExists => RestoreConfigError::Exists {
                    path: path.display().to_string(),
                },
                _ => sock_err(path, "link")(e),
            });
        }
        Ok(())
    };
    let r = finish();
    // SAFETY: as above.
    unsafe { libc::unlinkat(dfd, sock.as_ptr(), 0) };
    r.map(|()| listener)
}

/// The server thread: one good connection gets the bytes.
fn serve(
    listener: &UnixListener,
    stop: &EventFd,
    owner_uid: u32,
    bytes: &[u8],
    deadline: Instant,
) -> ServeOutcome {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ServeOutcome::TimedOut;
        }
        let mut pfd = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid array of two pollfds for the call's duration.
        let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return ServeOutcome::Failed(format!("poll: {e}"));
        }
        if pfd[1].revents != 0 {
            return ServeOutcome::Stopped;
        }
        if pfd[0].revents == 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return ServeOutcome::Failed(format!("accept: {e}")),
        };
        match peer_uid(&stream) {
            Ok(u) if u == owner_uid || u == 0 => {}
            _ => continue, // not the VMM: closed unanswered
        }
        return match send_all(stream, bytes, deadline) {
            Ok(()) => ServeOutcome::Fetched { bytes: bytes.len() },
            Err(e) => ServeOutcome::Failed(format!("write: {e}")),
        };
    }
}

fn send_all(mut stream: UnixStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream.set_write_timeout(Some(left.max(Duration::from_millis(100))))?;
    stream.write_all(bytes)?;
    stream.shutdown(std::net::Shutdown::Write)
}

fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a ucred for the call's duration.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> RestoreConfig {
        RestoreConfig {
            args: vec!["hello".into(), "two words".into(), "".into()],
            env: vec![
                ("GREETING".into(), "hi there".into()),
                ("EMPTY".into(), "".into()),
                ("EQ".into(), "a=b".into()),
            ],
            mounts: vec![("/data".into(), 0), ("/a:b".into(), 31)],
            seed: [7; 32],
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let c = sample();
        let b = c.encode().unwrap();
        let text = std::str::from_utf8(&b).unwrap();
        assert!(
            text.starts_with("ember-config 1\narg 68656c6c6f\n"),
            "{text}"
        );
        assert!(text.contains("\nmount 2f613a62:31\n"), "{text}");
        assert!(
            text.ends_with(&format!("seed {}\nend\n", "07".repeat(32))),
            "{text}"
        );
        assert_eq!(RestoreConfig::decode(&b).unwrap(), c);
    }

    #[test]
    fn encode_refuses_what_the_runtime_refuses() {
        let bad = |f: fn(&mut RestoreConfig)| {
            let mut c = sample();
            f(&mut c);
            c.encode().unwrap_err().to_string()
        };
        assert!(bad(|c| c.env[0].0 = "A=B".into()).contains("environment name"));
        assert!(bad(|c| c.env[0].0 = "a.b".into()).contains("environment name"));
        assert!(bad(|c| c.env[0].0 = "".into()).contains("is empty"));
        assert!(bad(|c| c.env[0].0 = "A\0".into()).contains("NUL"));
        assert!(bad(|c| c.env[0].1 = "x\0y".into()).contains("NUL"));
        assert!(bad(|c| c.args[0] = "x\0".into()).contains("NUL"));
        assert!(bad(|c| c.mounts[0].0 = "".into()).contains("mount point"));
        assert!(bad(|c| c.mounts[0].1 = 32).contains("over 31"));
        assert!(bad(|c| c.args = vec!["a".into(); MAX_ARGS + 1]).contains("more than 127 args"));
        assert!(bad(|c| c.env = vec![("K".into(), "v".into()); MAX_ENV + 1]).contains("more than"));
        assert!(
            bad(|c| c.mounts = (0..9).map(|i| (format!("/m{i}"), 0)).collect())
                .contains("more than 8 mount points")
        );
        // The same mount point twice is one mount (the last index wins).
        let mut c = sample();
        c.mounts = (0..12).map(|i| ("/m".to_string(), i)).collect();
        c.encode().unwrap();
    }

    #[test]
    fn encode_is_bounded() {
        let mut c = sample();
        c.args = vec!["x".repeat(300); 100]; // 60 KB of hex
        assert!(c.encode().is_ok());
        c.args = vec!["x".repeat(400); 100]; // 80 KB of hex
        let e = c.encode().unwrap_err();
        assert!(matches!(e, RestoreConfigError::TooLong { .. }), "{e}");
    }

    #[test]
    fn decode_is_strict() {
        let good = String::from_utf8(sample().encode().unwrap()).unwrap();
        let seed = format!("seed {}\n", "07".repeat(32));
        let cases: Vec<(String, &str)> = vec![
            (
                good.replace("ember-config 1", "ember-config 2"),
                "ember-config 1",
            ),
            (good.trim_end().to_string(), "newline"),
            (good.replace("end\n", ""), "no `end`"),
            (format!("{good}arg 61\n"), "after `end`"),
            (good.replace(&seed, ""), "no `seed`"),
            (
                good.replace(&seed, &format!("{seed}{seed}")),
                "second `seed`",
            ),
            (good.replace(&seed, "seed 0707\n"), "32 bytes"),
            (
                good.replace("arg 68656c6c6f", "arg 68656C6C6F"),
                "lowercase",
            ),
            (good.replace("arg 68656c6c6f", "arg 68656c6c6"), "odd"),
            (good.replace("arg 68656c6c6f", "arg 680065"), "NUL"),
            (good.replace("arg 68656c6c6f", "argh 68"), "unknown line"),
            (good.replace("arg 68656c6c6f\n", "arg 61\r\n"), "hex"),
            (good.replace(":31\n", ":x\n"), "device index"),
            (good.replace(":31\n", ":32\n"), "over 31"),
            (good.replace(":31\n", ":123\n"), "device index"),
            (good.replace("env 4752", "env 2e2e"), "'='"),
            (good.replace("\nend\n", "\nend \n"), "unknown line"),
            (good.replace("arg 68656c6c6f\n", "arg\n"), "hex digit"),
        ];
        for (text, want) in cases {
            let e = RestoreConfig::decode(text.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want:?} not in {e:?} for {text:?}");
        }
        assert!(RestoreConfig::decode(&vec![b'a'; MAX_CONFIG + 1]).is_err());
        assert!(RestoreConfig::decode(b"").is_err());
        assert!(RestoreConfig::decode("ember-config 1\n\u{e9}\nend\n".as_bytes()).is_err());
    }

    #[test]
    fn from_instance_matches_the_cold_command_line() {
        let mut env = BTreeMap::new();
        env.insert("N".to_string(), "3".to_string());
        env.insert("GREETING".to_string(), "hello world".to_string());
        let c = RestoreConfig::from_instance(&[("/data".into(), 1)], &env, "  a b  c ").unwrap();
        assert_eq!(c.args, ["a", "b", "c"]);
        assert_eq!(
            c.env,
            [
                ("GREETING".to_string(), "hello world".to_string()),
                ("N".to_string(), "3".to_string())
            ]
        );
        assert_eq!(c.mounts, [("/data".to_string(), 1)]);
        let d = RestoreConfig::from_instance(&[], &BTreeMap::new(), "").unwrap();
        assert_ne!(c.seed, d.seed, "each config gets its own seed");
        // What the cold command line refuses, so does this.
        assert!(RestoreConfig::from_instance(&[], &BTreeMap::new(), "a\"b").is_err());
        env.insert("Q".into(), "x\"y".into());
        assert!(RestoreConfig::from_instance(&[], &env, "").is_err());
        assert!(RestoreConfig::from_instance(&[("/d".into(), 40)], &BTreeMap::new(), "").is_err());
    }

    #[test]
    fn debug_hides_the_seed() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("seed") && s.contains("GREETING"), "{s}");
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-rc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn fetch(path: &Path) -> Vec<u8> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    }

    #[test]
    fn serves_one_client_over_a_real_socket() {
        let d = tmpdir("serve");
        let path = d.join("v.sock_1024");
        let cfg = sample();
        let srv = ConfigServer::listen(&path, None, &cfg).unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o600, "mode whatever the umask");
        assert_eq!(srv.outcome(), None);
        let got = fetch(&path);
        assert_eq!(RestoreConfig::decode(&got).unwrap(), cfg);
        let out = srv.wait();
        assert_eq!(out, ServeOutcome::Fetched { bytes: got.len() });
        assert!(!path.exists(), "the socket is removed after its one fetch");
        assert!(
            fs::read_dir(&d).unwrap().next().is_none(),
            "no temporary left"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_path_longer_than_a_socket_address_works() {
        let d = tmpdir("long");
        let deep = d.join("d".repeat(120));
        fs::create_dir_all(&deep).unwrap();
        let path = deep.join("v.sock_1024");
        assert!(path.as_os_str().len() > 108);
        let srv = ConfigServer::listen(&path, None, &sample()).unwrap();
        // A client (like a jailed VMM) reaches it by a shorter way.
        let dir = fs::File::open(&deep).unwrap();
        let short = PathBuf::from(format!("/proc/self/fd/{}/v.sock_1024", dir.as_raw_fd()));
        assert_eq!(RestoreConfig::decode(&fetch(&short)).unwrap(), sample());
        assert!(matches!(srv.wait(), ServeOutcome::Fetched { .. }));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_to_replace_or_follow() {
        let d = tmpdir("exists");
        let file = d.join("file");
        fs::write(&file, "x").unwrap();
        let e = ConfigServer::listen(&file, None, &sample()).err().unwrap();
        assert!(matches!(e, RestoreConfigError::Exists { .. }), "{e}");
        assert_eq!(fs::read(&file).unwrap(), b"x");
        let link = d.join("link");
        std::os::unix::fs::symlink(d.join("nowhere"), &link).unwrap();
        let e = ConfigServer::listen(&link, None, &sample()).err().unwrap();
        assert!(matches!(e, RestoreConfigError::Exists { .. }), "{e}");
        assert!(!d.join("nowhere").exists());
        // A stale socket of ours is replaced.
        let stale = d.join("stale");
        drop(UnixListener::bind(&stale).unwrap());
        let srv = ConfigServer::listen(&stale, None, &sample()).unwrap();
        assert_eq!(RestoreConfig::decode(&fetch(&stale)).unwrap(), sample());
        drop(srv);
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_socket_belongs_to_the_vmm_uid() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown to another uid needs root");
            return;
        }
        let d = tmpdir("owner");
        let path = d.join("v.sock_1024");
        let srv = ConfigServer::listen(&path, Some((4242, 4243)), &sample()).unwrap();
        let m = fs::symlink_metadata(&path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4242, 4243, 0o600));
        // root may connect too (peer uid 0).
        assert_eq!(RestoreConfig::decode(&fetch(&path)).unwrap(), sample());
        assert!(matches!(srv.wait(), ServeOutcome::Fetched { .. }));
        // A socket of another owner is not ours to replace.
        drop(UnixListener::bind(&path).unwrap());
        let e = ConfigServer::listen(&path, Some((4242, 4243)), &sample())
            .err()
            .unwrap();
        assert!(matches!(e, RestoreConfigError::Exists { .. }), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn times_out_and_stops_without_a_client() {
        let d = tmpdir("timeout");
        let path = d.join("s");
        let srv =
            ConfigServer::listen_for(&path, None, &sample(), Duration::from_millis(50)).unwrap();
        assert_eq!(srv.wait(), ServeOutcome::TimedOut);
        assert!(!path.exists());
        // Dropping a waiting server ends it at once and removes the socket.
        let srv = ConfigServer::listen(&path, None, &sample()).unwrap();
        drop(srv);
        assert!(!path.exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
