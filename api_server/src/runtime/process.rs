//! Launching and tracking VMM processes. Each instance runs as
//! `ember-jailer ... -- ember-vmm ...` in its own session, detached from
//! emberd, so it survives an emberd restart; emberd finds it again by pid and
//! process start time.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The guest CID of an instance's vsock device.
pub const VSOCK_GUEST_CID: u32 = 3;
/// Its hybrid-vsock unix socket, relative to the jail root (the VMM's
/// working directory without the jailer).
pub const VSOCK_UDS: &str = "run/vsock.sock";

/// The host process backing a running instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmProcess {
    pub pid: i32,
    /// Start time (clock ticks since boot, /proc/<pid>/stat field 22): with
    /// the pid it identifies the process even if the pid is reused.
    pub start_time: u64,
}

/// Errors starting or stopping VMMs.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot prepare the jail at {path}: {err}")]
    Jail { path: PathBuf, err: std::io::Error },
    #[error("cannot place {what} in the jail: {err}")]
    Place { what: String, err: std::io::Error },
    #[error("cannot open the console log {path}: {err}")]
    Log { path: PathBuf, err: std::io::Error },
    #[error("cannot start {bin}: {err}")]
    Spawn { bin: PathBuf, err: std::io::Error },
    #[error("{bin} is not a usable x86_64 ELF executable: {why}")]
    Elf { bin: PathBuf, why: String },
    #[error("{0}")]
    Unsupported(String),
}

/// How a VMM binary is linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linkage {
    /// No `PT_INTERP` program header (static or static-pie, e.g. built by
    /// `cargo static-vmm`): the jail needs nothing but the binary.
    Static,
    /// It names a dynamic loader: its shared libraries must be placed in
    /// every jail ([`shared_libraries`]).
    Dynamic,
}

/// Reads `bin`'s ELF header and program headers (a little-endian 64-bit
/// ELF, as every x86_64 Linux executable) to tell whether it is statically
/// linked. The binary is the administrator's (`--vmm`), not a user's, but
/// the header is still checked and read within bounds.
pub fn linkage(bin: &Path) -> Result<Linkage, ProcessError> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    const PHDR_SIZE: usize = 56;
    let bad = |why: &str| ProcessError::Elf {
        bin: bin.to_path_buf(),
        why: why.to_string(),
    };
    let io = |e: std::io::Error| ProcessError::Elf {
        bin: bin.to_path_buf(),
        why: e.to_string(),
    };
    let mut f = fs::File::open(bin).map_err(io)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)
        .map_err(|_| bad("too short for an ELF header"))?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err(bad("not a little-endian 64-bit ELF file"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([eh[o], eh[o + 1]]);
    let phoff = u64::from_le_bytes(eh[0x20..0x28].try_into().expect("8 bytes"));
    let (phentsize, phnum) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    if phnum == 0 || phentsize != PHDR_SIZE {
        return Err(bad("no program headers of the ELF64 size"));
    }
    let mut ph = vec![0u8; phnum * PHDR_SIZE];
    f.seek(SeekFrom::Start(phoff)).map_err(io)?;
    f.read_exact(&mut ph)
        .map_err(|_| bad("program headers past the end of the file"))?;
    let interp = ph
        .chunks_exact(PHDR_SIZE)
        .any(|h| u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) == PT_INTERP);
    Ok(if interp {
        Linkage::Dynamic
    } else {
        Linkage::Static
    })
}

/// How VMMs are launched.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub vmm_bin: PathBuf,
    /// None: run ember-vmm directly in a per-instance directory (no jail;
    /// for development only).
    pub jailer_bin: Option<PathBuf>,
    pub chroot_base: PathBuf,
    /// First uid (and gid) of the range the VMMs run as: one identity per
    /// instance (see [`Launcher::identity`]).
    pub uid: u32,
    pub gid: u32,
    /// How many identities the range holds.
    pub ids: u32,
    /// Shared libraries the VMM needs (a dynamically linked ember-vmm finds
    /// no /lib inside the jail): placed at the same paths in every jail,
    /// root-owned and read-only. See [`shared_libraries`]. Empty for a
    /// static VMM ([`Linkage::Static`]): then nothing of the host's but the
    /// VMM itself enters the jail.
    pub libs: Vec<PathBuf>,
}

/// The shared libraries (and the dynamic loader) `bin` needs, from `ldd`.
/// Empty for a static binary. Libraries ldd cannot find are left out: see
/// [`missing_libraries`].
pub fn shared_libraries(bin: &Path) -> Vec<PathBuf> {
    parse_ldd(&ldd(bin)).0
}

/// The libraries `bin` needs that ldd cannot find (`libx.so => not found`).
pub fn missing_libraries(bin: &Path) -> Vec<String> {
    parse_ldd(&ldd(bin)).1
}

fn ldd(bin: &Path) -> String {
    Command::new("ldd")
        .arg(bin)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// ldd's output as (found paths, sorted and unique; names not found).
fn parse_ldd(text: &str) -> (Vec<PathBuf>, Vec<String>) {
    let missing = text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once("=>")?;
            (rest.trim() == "not found").then(|| name.trim().to_string())
        })
        .collect();
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    (libs, missing)
}

/// A file to put into the jail root.
#[derive(Clone, Debug)]
pub struct JailFile {
    /// Host file.
    pub host: PathBuf,
    /// Name inside the jail root (no slashes).
    pub name: String,
    /// Volumes are linked (the VM writes the real file); images are copied
    /// or linked read-only.
    pub writable: bool,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub id: String,
    /// The uid and gid the VMM runs as (it owns the jail's volumes).
    pub uid: u32,
    pub gid: u32,
    pub files: Vec<JailFile>,
    /// ember-vmm config (Firecracker JSON) with jail-relative paths.
    pub vm_config: serde_json::Value,
    pub log_path: PathBuf,
    /// macvtap links (name, major, minor) whose character devices the
    /// jailer creates as `/dev/macvtap/<name>` (`--macvtap`).
    pub macvtaps: Vec<(String, u32, u32)>,
}

/// A started VMM.
#[derive(Clone, Debug)]
pub struct Launched {
    pub process: VmmProcess,
    pub api_sock: PathBuf,
}

impl Launcher {
    fn exec_name(&self) -> String {
        self.vmm_bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ember-vmm".into())
    }

    /// `<chroot base>/<exec name>/<id>`: everything the instance's jail uses.
    pub fn jail_dir(&self, id: &str) -> PathBuf {
        self.chroot_base.join(self.exec_name()).join(id)
    }

    /// The jail's root directory.
    pub fn jail_root(&self, id: &str) -> PathBuf {
        self.jail_dir(id).join("root")
    }

    /// The VMM's API socket as seen from the host.
    pub fn api_sock(&self, id: &str) -> PathBuf {
        self.jail_root(id).join("run").join("api.sock")
    }

    /// The host side of the instance's vsock device, as seen from the host.
    pub fn vsock_uds(&self, id: &str) -> PathBuf {
        self.jail_root(id).join(VSOCK_UDS)
    }

    /// Removes the instance's jail directory (after its VMM is gone).
    pub fn cleanup(&self, id: &str) {
        let d = self.jail_dir(id);
        if d.exists() {
            if let Err(e) = fs::remove_dir_all(&d) {
                log::warn!("cannot remove jail {}: {e}", d.display());
            }
        }
    }

    /// The `n`-th identity of the range, or None past its end.
    pub fn identity(&self, n: u32) -> Option<(u32, u32)> {
        (n < self.ids).then(|| (self.uid + n, self.gid + n))
    }

    /// Places `files` in the existing jail of `id` (a pooled VMM's, whose
    /// process already runs), as [`Launcher::launch`] places them.
    pub fn place_files(
        &self,
        id: &str,
        files: &[JailFile],
        owner: (u32, u32),
    ) -> Result<(), ProcessError> {
        let root = self.jail_root(id);
        for f in files {
            self.place(f, &root, owner)?;
        }
        Ok(())
    }

    fn place(&self, f: &JailFile, root: &Path, owner: (u32, u32)) -> Result<(), ProcessError> {
        let dst = root.join(&f.name);
        let err = |err| ProcessError::Place {
            what: f.name.clone(),
            err,
        };
        let _ = fs::remove_file(&dst);
        if f.writable {
            // The VM must write the real volume file: a hard link, which
            // needs the state dir and the chroot base on one filesystem.
            fs::hard_link(&f.host, &dst).map_err(|e| {
                err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e} (volumes are hard-linked into the jail: keep the state directory and the chroot base on one filesystem)"
                    ),
                ))
            })?;
            std::os::unix::fs::chown(&dst, Some(owner.0), Some(owner.1)).map_err(err)?;
        } else {
            // A private copy, readable by the VMM's user and never writable
            // by it. Not a hard link: changing the link's mode would change
            // the original's.
            if fs::symlink_metadata(&f.host)
                .map_err(err)?
                .file_type()
                .is_symlink()
            {
                return Err(err(std::io::Error::other("refusing to place a symlink")));
            }
            fs::copy(&f.host, &dst).map_err(err)?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).map_err(err)?;
        }
        Ok(())
    }

    /// VMMs (or jailers about to become one) of this launcher that are
    /// running, by instance id, whether or not emberd has them on record:
    /// a process whose command line names an instance (`--id`) and a config
    /// file, and that is in this launcher's jails (its jailer's
    /// `--chroot-base-dir`, the jail's pid file, or its working directory).
    pub fn find_vmms(&self) -> std::collections::HashMap<String, VmmProcess> {
        self.scan(true)
    }

    /// Idle VMMs of this launcher (started with no config file, as the
    /// snapshot pool starts them), by their `--id`, found as
    /// [`Launcher::find_vmms`] finds configured ones.
    pub fn find_idle_vmms(&self) -> std::collections::HashMap<String, VmmProcess> {
        self.scan(false)
    }

    fn scan(&self, configured: bool) -> std::collections::HashMap<String, VmmProcess> {
        let mut out = std::collections::HashMap::new();
        let Ok(rd) = fs::read_dir("/proc") else {
            return out;
        };
        let me = std::process::id() as i32;
        let base = self.chroot_base.as_os_str().as_encoded_bytes();
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            let after = |flag: &[u8]| {
                args.windows(2)
                    .filter(|w| w[0] == flag)
                    .map(|w| w[1])
                    .next_back()
            };
            let Some(id) = after(b"--id").and_then(|i| std::str::from_utf8(i).ok()) else {
                continue;
            };
            let has_config = args.iter().any(|a| *a == b"--config-file");
            if id.is_empty() || id.contains('/') || has_config != configured {
                continue;
            }
            let root = self.jail_root(id);
            let pid_file = root.join(format!("{}.pid", self.exec_name()));
            let ours = after(b"--chroot-base-dir") == Some(base)
                || fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    == Some(pid)
                || fs::read_link(format!("/proc/{pid}/cwd")).ok().as_deref()
                    == Some(root.as_path());
            if let (true, Some(start_time)) = (ours, proc_start_time(pid)) {
                out.insert(id.to_string(), VmmProcess { pid, start_time });
            }
        }
        out
    }

    /// Prepares the jail and starts the VMM, detached. Console output goes
    /// to `spec.log_path` (appended).
    pub fn launch(&self, spec: &LaunchSpec) -> Result<Launched, ProcessError> {
        let jail_err = |path: &Path| {
            let path = path.to_path_buf();
            move |err| ProcessError::Jail { path, err }
        };
        self.cleanup(&spec.id);
        let root = self.jail_root(&spec.id);
        fs::create_dir_all(&root).map_err(jail_err(&root))?;
        for f in &spec.files {
            self.place(f, &root, (spec.uid, spec.gid))?;
        }
        if self.jailer_bin.is_some() {
            for lib in &self.libs {
                let rel = lib.strip_prefix("/").unwrap_or(lib);
                let dst = root.join(rel);
                let err = |err| ProcessError::Place {
                    what: lib.display().to_string(),
                    err,
                };
                if let Some(d) = dst.parent() {
                    fs::create_dir_all(d).map_err(err)?;
                }
                // Resolve symlinks (ld-linux is usually one) to the real file.
                let real = fs::canonicalize(lib).map_err(err)?;
                if fs::hard_link(&real, &dst).is_err() {
                    fs::copy(&real, &dst).map_err(err)?;
                }
            }
        }
        // A null config starts an idle VMM: its API socket only, waiting for
        // `PUT /snapshot/load` (a pooled VMM, see `runtime::warm`).
        let with_config = !spec.vm_config.is_null();
        if with_config {
            let cfg_path = root.join("vm.json");
            fs::write(&cfg_path, spec.vm_config.to_string()).map_err(jail_err(&cfg_path))?;
        }
        let config_args: &[&str] = if with_config {
            &["--config-file", "/vm.json"]
        } else {
            &[]
        };

        let log = open_log(&spec.log_path).map_err(|err| ProcessError::Log {
            path: spec.log_path.clone(),
            err,
        })?;
        let mut cmd;
        match &self.jailer_bin {
            Some(jailer) => {
                cmd = Command::new(jailer);
                cmd.arg("--id")
                    .arg(&spec.id)
                    .arg("--exec-file")
                    .arg(&self.vmm_bin)
                    .arg("--uid")
                    .arg(spec.uid.to_string())
                    .arg("--gid")
                    .arg(spec.gid.to_string())
                    .arg("--chroot-base-dir")
                    .arg(&self.chroot_base);
                for (name, major, minor) in &spec.macvtaps {
                    cmd.arg("--macvtap").arg(format!("{name}={major}:{minor}"));
                }
                cmd.arg("--")
                    .args(["--api-sock", "/run/api.sock"])
                    .args(config_args)
                    .args(["--id", &spec.id]);
            }
            None => {
                if let Some((name, _, _)) = spec.macvtaps.first() {
                    return Err(ProcessError::Unsupported(format!(
                        "macvtap {name}: macvtap interfaces need the jailer (emberd runs with --no-jailer)"
                    )));
                }
                let run = root.join("run");
                fs::create_dir_all(&run).map_err(jail_err(&run))?;
                cmd = Command::new(&self.vmm_bin);
                cmd.current_dir(&root)
                    .arg("--api-sock")
                    .arg(run.join("api.sock"))
                    .args(config_args.iter().map(|a| a.trim_start_matches('/')))
                    .args(["--id", &spec.id]);
            }
        }
        let log2 = log.try_clone().map_err(|err| ProcessError::Log {
            path: spec.log_path.clone(),
            err,
        })?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: setsid is async-signal-safe; it detaches the VMM from
        // emberd's session so it outlives emberd.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let bin = self
            .jailer_bin
            .clone()
            .unwrap_or_else(|| self.vmm_bin.clone());
        let child = cmd
            .spawn()
            .map_err(|err| ProcessError::Spawn { bin, err })?;
        let pid = child.id() as i32;
        // Identify the process now (a zombie still has its start time), so a
        // reused pid can never be mistaken for it. Nothing waits here: the
        // event loop's pidfd watcher reports an early exit (with the log's
        // tail) like any other.
        let start_time = proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        // Forget the Child: emberd reaps it through its pidfd watcher.
        std::mem::forget(child);
        Ok(Launched {
            process: VmmProcess { pid, start_time },
            api_sock: self.api_sock(&spec.id),
        })
    }
}

/// The last `max` bytes of a file, lossily as text.
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = Vec::new();
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).trim().to_string()
}

/// State letter and start time (field 22, clock ticks since boot) from
/// /proc/<pid>/stat; zombies included.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: parse after the ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is index 19.
    let state = fields.first()?.chars().next()?;
    Some((state, fields.get(19)?.parse().ok()?))
}

/// Start time of a live (not zombie) process.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    match proc_stat(pid) {
        Some((state, t)) if state != 'Z' => Some(t),
        _ => None,
    }
}

/// Whether `p` is still the live process emberd started. A record without
/// a start time (0) is never trusted: the pid may have been reused.
pub fn is_alive(p: &VmmProcess) -> bool {
    p.start_time != 0 && proc_start_time(p.pid) == Some(p.start_time)
}

/// Kills the VMM (SIGKILL) and waits up to `timeout` for it to be gone.
/// Reaps it when it is emberd's child.
pub fn kill_and_wait(p: &VmmProcess, timeout: Duration) -> bool {
    if !is_alive(p) {
        reap(p.pid);
        return true;
    }
    // SAFETY: plain kill(2) on a pid we verified by start time.
    unsafe { libc::kill(p.pid, libc::SIGKILL) };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        reap(p.pid);
        if !is_alive(p) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// waitpid(WNOHANG) if `pid` is our child; returns its exit code if reaped.
pub fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid; ECHILD is fine.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r == pid {
        if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Some(128 + libc::WTERMSIG(status))
        } else {
            None
        }
    } else {
        None
    }
}

/// Opens a pidfd for `pid` (readable when the process exits).
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Appends a line to an instance's console log (emberd's own notes).
pub fn log_note(path: &Path, msg: &str) {
    if let Ok(mut f) = open_log(path) {
        let _ = writeln!(f, "emberd: {msg}");
    }
}

/// Opens a console log for appending: root's, mode 0600 whatever the umask
/// (it holds what the guest printed), never through a symlink.
fn open_log(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

#[cfg(test)]
mod tests {

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n";
        let (found, missing) = parse_ldd(text);
        assert_eq!(
            found,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(missing, ["libfoo.so.1"]);
        assert_eq!(parse_ldd("\tnot a dynamic executable\n"), (vec![], vec![]));
    }

    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id() as i32;
        let t = proc_start_time(me).unwrap();
        assert!(is_alive(&VmmProcess {
            pid: me,
            start_time: t
        }));
        assert!(!is_alive(&VmmProcess {
            pid: me,
            start_time: t + 1
        }));
        assert!(proc_start_time(i32::MAX).is_none());
    }

    #[test]
    fn killing_a_child_reaps_it() {
        let c = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = c.id() as i32;
        std::mem::forget(c);
        let p = VmmProcess {
            pid,
            start_time: proc_start_time(pid).unwrap(),
        };
        assert!(kill_and_wait(&p, Duration::from_secs(5)));
        assert!(!is_alive(&p));
    }

    /// A minimal ELF64 file whose program headers have these types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut h = vec![0u8; 56];
            h[..4].copy_from_slice(&t.to_le_bytes());
            f.extend_from_slice(&h);
        }
        f
    }

    #[test]
    fn tells_static_from_dynamic_binaries() {
        assert_eq!(linkage(Path::new("/bin/sh")).unwrap(), Linkage::Dynamic);
        let dir = std::env::temp_dir().join(format!("ember-linkage-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            fs::write(&p, bytes).unwrap();
            p
        };
        // PT_LOAD, PT_DYNAMIC, PT_GNU_STACK: static-pie.
        let st = write("static", &elf(&[1, 2, 0x6474_e551]));
        assert_eq!(linkage(&st).unwrap(), Linkage::Static);
        // PT_PHDR, PT_INTERP, PT_LOAD.
        let dy = write("dynamic", &elf(&[6, 3, 1]));
        assert_eq!(linkage(&dy).unwrap(), Linkage::Dynamic);
        // Truncated program headers, a script, an empty file: clear errors.
        let mut cut = elf(&[1, 3]);
        cut.truncate(100);
        for (name, bytes, why) in [
            ("cut", cut, "past the end"),
            ("script", b"#!/bin/sh\necho hi\n".to_vec(), "too short"),
            ("empty", Vec::new(), "too short"),
        ] {
            let e = linkage(&write(name, &bytes)).unwrap_err().to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
        let e = linkage(&write("elf32", &{
            let mut b = elf(&[1]);
            b[4] = 1;
            b
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("64-bit"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_shared_libraries_of_a_dynamic_binary() {
        let libs = shared_libraries(Path::new("/bin/sh"));
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(libs.iter().all(|l| l.is_absolute()));
        assert!(shared_libraries(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn tail_of_missing_file_is_empty() {
        assert_eq!(tail(Path::new("/nonexistent/x"), 10), "");
    }
}
