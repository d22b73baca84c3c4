//! Instant starts, the runtime side: idle pooled VMMs, template snapshots
//! of an image's booted guest, and restoring an instance from one.
//!
//! - A pooled VMM is `ember-jailer ... -- ember-vmm --api-sock /run/api.sock`
//!   with no config file: jailed, its API socket up, nothing booted
//!   ([`spawn_idle`]). It runs as an identity of emberd's range that no
//!   instance holds; the instance that takes it inherits that identity.
//! - A template ([`TemplateBuild`]) is a cold boot of the image with
//!   [`WARM_ARG`] on the command line and no per-instance words, a vsock
//!   device and placeholder drives; when the console shows
//!   [`SNAPSHOT_POINT`] the VM is paused, `PUT /snapshot/create` (Full)
//!   writes the state and memory files, and the VMM is killed. The files
//!   become root's, mode 0644 (the VMMs' uids read them through a hard
//!   link in their jail; the memory file is mapped `MAP_PRIVATE`, so no
//!   guest write reaches it), in a directory only root can enter.
//! - A restore ([`Restore`]) serves the instance's env, args, mounts and a
//!   fresh random seed on the config channel (`<vsock uds>_1024`, the
//!   restore protocol of the C unikernel runtime) and then calls
//!   `PUT /snapshot/load` with drive overrides (the instance's volumes), a
//!   vsock override (a fresh CID) and `resume_vm: true`.
//!
//! Everything here blocks (process start-up, socket waits, VMM API calls):
//! worker threads only.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{self, JailFile, LaunchSpec, Launcher, ProcessError, VmmProcess};
use super::restore_config::{ConfigServer, RestoreConfig, ServeOutcome, EMBER_CONFIG_PORT};
use super::vmm_api::{self, VmmApiError};

/// The line the C unikernel runtime prints, booted with [`WARM_ARG`], when
/// its guest is ready to be snapshotted.
pub const SNAPSHOT_POINT: &str = "ember: snapshot point";
/// The kernel argument that makes the C unikernel runtime stop at its
/// snapshot point instead of running `main`.
pub const WARM_ARG: &str = "ember.warm=1";
/// The template's state file, in its directory and in a restoring jail.
pub const STATE_FILE: &str = "snapshot.state";
/// The template's memory file, in its directory and in a restoring jail.
pub const MEM_FILE: &str = "snapshot.mem";
/// Written last into a template directory: the template is complete.
pub const READY_FILE: &str = "ready";
/// The prefix of pooled VMMs' ids (`--id`).
pub const POOL_PREFIX: &str = "pool-";
/// The prefix of template VMMs' ids.
pub const TEMPLATE_PREFIX: &str = "tpl-";
/// How long a template guest may take to reach its snapshot point.
pub const TEMPLATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a pooled VMM may take to answer on its API socket.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pooled VMM, a template or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("cannot start the VMM: {0}")]
    Launch(#[from] ProcessError),
    #[error(transparent)]
    Api(#[from] VmmApiError),
    #[error("the VMM's API socket did not come up within {0:?}")]
    NoApi(Duration),
    #[error("the VMM exited before {what}: {tail}")]
    Died { what: &'static str, tail: String },
    #[error("the guest did not print {SNAPSHOT_POINT:?} within {0:?} (its runtime has no snapshot point?)")]
    NoSnapshotPoint(Duration),
    #[error("snapshot files: {what}: {err}")]
    Files { what: String, err: std::io::Error },
    #[error("the restore config channel: {0}")]
    Channel(String),
}

fn files_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WarmError {
    let what = what.into();
    move |err| WarmError::Files { what, err }
}

/// An idle pooled VMM.
#[derive(Clone, Debug)]
pub struct IdleVmm {
    /// Its `--id` and jail name ([`POOL_PREFIX`]...).
    pub id: String,
    pub process: VmmProcess,
    /// The identity it runs as.
    pub uid: u32,
    pub gid: u32,
    /// Its console log (stdout and stderr), renamed to the instance's log
    /// when an instance takes it.
    pub log: PathBuf,
}

/// Starts an idle VMM in the jail `id` as `owner`, its output to `log`, and
/// waits until its API socket answers.
pub fn spawn_idle(
    launcher: &Launcher,
    id: &str,
    owner: (u32, u32),
    log: &Path,
) -> Result<IdleVmm, WarmError> {
    let spec = LaunchSpec {
        id: id.to_string(),
        uid: owner.0,
        gid: owner.1,
        files: Vec::new(),
        vm_config: serde_json::Value::Null,
        log_path: log.to_path_buf(),
        macvtaps: Vec::new(),
    };
    let l = launcher.launch(&spec)?;
    let idle = IdleVmm {
        id: id.to_string(),
        process: l.process,
        uid: owner.0,
        gid: owner.1,
        log: log.to_path_buf(),
    };
    if let Err(e) = wait_api(&l.api_sock, &idle.process, IDLE_TIMEOUT, log) {
        discard(launcher, &idle);
        return Err(e);
    }
    Ok(idle)
}

/// Kills an idle VMM and removes its jail and log.
pub fn discard(launcher: &Launcher, idle: &IdleVmm) {
    process::kill_and_wait(&idle.process, Duration::from_secs(10));
    launcher.cleanup(&idle.id);
    let _ = fs::remove_file(&idle.log);
}

/// Waits until `sock` accepts a connection, while `p` lives.
fn wait_api(sock: &Path, p: &VmmProcess, timeout: Duration, log: &Path) -> Result<(), WarmError> {
    let end = Instant::now() + timeout;
    loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return Ok(());
        }
        if !process::is_alive(p) {
            process::reap(p.pid);
            return Err(WarmError::Died {
                what: "its API socket came up",
                tail: process::tail(log, 300),
            });
        }
        if Instant::now() > end {
            return Err(WarmError::NoApi(timeout));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One template snapshot to make.
pub struct TemplateBuild {
    pub launcher: Launcher,
    /// The template VMM: id [`TEMPLATE_PREFIX`]..., its config with
    /// [`WARM_ARG`], a vsock device and placeholder drives, its log.
    pub spec: LaunchSpec,
    /// The template's final directory (must not exist; made atomically).
    pub dest: PathBuf,
}

impl TemplateBuild {
    /// Boots the template, snapshots it at its snapshot point and installs
    /// the files in `dest`. The template VMM and its jail are gone
    /// afterwards, whatever the outcome. Returns the memory file's size.
    pub fn run(self) -> Result<u64, WarmError> {
        let id = self.spec.id.clone();
        let res = self.build();
        self.launcher.cleanup(&id);
        let _ = fs::remove_file(&self.spec.log_path);
        res
    }

    fn build(&self) -> Result<u64, WarmError> {
        let root = self.launcher.jail_root(&self.spec.id);
        let l = self.launcher.launch(&self.spec)?;
        let kill = || process::kill_and_wait(&l.process, Duration::from_secs(10));
        let snapped = (|| {
            wait_for_line(&self.spec.log_path, &l.process, TEMPLATE_TIMEOUT)?;
            // The snapshot directory, writable by the VMM's user only.
            let snap = root.join("snap");
            fs::create_dir_all(&snap).map_err(files_err("snap directory"))?;
            std::os::unix::fs::chown(&snap, Some(self.spec.uid), Some(self.spec.gid))
                .map_err(files_err("snap directory"))?;
            fs::set_permissions(&snap, fs::Permissions::from_mode(0o700))
                .map_err(files_err("snap directory"))?;
            vmm_api::set_vm_state(&l.api_sock, vmm_api::VmState::Paused)?;
            vmm_api::snapshot_create(
                &l.api_sock,
                &format!("snap/{STATE_FILE}"),
                &format!("snap/{MEM_FILE}"),
            )?;
            Ok::<PathBuf, WarmError>(snap)
        })();
        kill();
        let snap = snapped?;
        install_template(&snap, &self.dest)
    }
}

/// Waits for [`SNAPSHOT_POINT`] in `log` while `p` lives.
fn wait_for_line(log: &Path, p: &VmmProcess, timeout: Duration) -> Result<(), WarmError> {
    let end = Instant::now() + timeout;
    loop {
        let mut text = Vec::new();
        if let Ok(f) = fs::File::open(log) {
            let _ = f.take(1 << 20).read_to_end(&mut text);
        }
        if String::from_utf8_lossy(&text).contains(SNAPSHOT_POINT) {
            return Ok(());
        }
        if !process::is_alive(p) {
            process::reap(p.pid);
            return Err(WarmError::Died {
                what: "its snapshot point",
                tail: process::tail(log, 300),
            });
        }
        if Instant::now() > end {
            return Err(WarmError::NoSnapshotPoint(timeout));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Moves the snapshot files from the template's jail into `dest`: regular
/// files only (never a link the VMM's user planted), root's, mode 0644;
/// [`READY_FILE`] last; the directory appears whole (rename).
fn install_template(snap: &Path, dest: &Path) -> Result<u64, WarmError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let tmp = parent.join(format!(
        ".building-{}",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    // The directory itself was the VMM's to change while it ran: it must
    // still be a directory, not a link to elsewhere.
    let d = fs::symlink_metadata(snap).map_err(files_err("snap directory"))?;
    if !d.file_type().is_dir() {
        return Err(WarmError::Files {
            what: "snap directory".into(),
            err: std::io::Error::other("not a directory"),
        });
    }
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(files_err("template directory"))?;
    let mut mem_size = 0;
    for name in [STATE_FILE, MEM_FILE] {
        let src = snap.join(name);
        let meta = fs::symlink_metadata(&src).map_err(files_err(name))?;
        if !meta.file_type().is_file() || meta.nlink() > 1 {
            return Err(WarmError::Files {
                what: name.to_string(),
                err: std::io::Error::other("not a plain file of the VMM's"),
            });
        }
        let dst = tmp.join(name);
        fs::rename(&src, &dst).map_err(files_err(name))?;
        // Owner and mode through a descriptor of what was moved, never
        // through a path a link could redirect.
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&dst)
                .map_err(files_err(name))?
        };
        if !f.metadata().map_err(files_err(name))?.file_type().is_file() {
            return Err(WarmError::Files {
                what: name.to_string(),
                err: std::io::Error::other("not a plain file"),
            });
        }
        std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(files_err(name))?;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(files_err(name))?;
        if name == MEM_FILE {
            mem_size = meta.len();
        }
    }
    crate::fsutil::write_atomic(&tmp.join(READY_FILE), b"1\n").map_err(files_err(READY_FILE))?;
    let _ = fs::remove_dir_all(dest);
    fs::rename(&tmp, dest).map_err(files_err("template directory"))?;
    Ok(mem_size)
}

use std::os::unix::fs::MetadataExt;

/// Whether `dir` holds a complete template.
pub fn template_ready(dir: &Path) -> bool {
    [STATE_FILE, MEM_FILE, READY_FILE]
        .iter()
        .all(|f| fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.file_type().is_file()))
}

/// One restore of a template into a pooled VMM that an instance took.
pub struct Restore {
    /// The VMM's API socket, from the host.
    pub api_sock: PathBuf,
    /// Its jail root, from the host.
    pub jail_root: PathBuf,
    /// The VMM's identity (the config socket is given to it).
    pub owner: (u32, u32),
    /// The template directory.
    pub template: PathBuf,
    /// (template drive id, the instance's volume file in the jail).
    pub drives: Vec<(String, String)>,
    /// The vsock device's unix socket in the jail, and the guest's CID.
    pub vsock_uds: String,
    pub guest_cid: u32,
    /// What the guest fetches after the load (env, args, mounts, seed).
    pub config: RestoreConfig,
}

impl Restore {
    /// The `PUT /snapshot/load` body.
    pub fn load_body(&self) -> serde_json::Value {
        let drives: Vec<serde_json::Value> = self
            .drives
            .iter()
            .map(|(id, file)| serde_json::json!({"drive_id": id, "path_on_host": file}))
            .collect();
        serde_json::json!({
            "snapshot_path": STATE_FILE,
            "mem_backend": {"backend_type": "File", "backend_path": MEM_FILE},
            "track_dirty_pages": false,
            "resume_vm": true,
            "drive_overrides": drives,
            "vsock_override": {"uds_path": self.vsock_uds, "guest_cid": self.guest_cid},
        })
    }

    /// Links the template into the jail, opens the config channel, loads
    /// the snapshot and waits until the guest has fetched its config.
    /// Returns how long the load call took.
    pub fn run(self) -> Result<Duration, WarmError> {
        for name in [STATE_FILE, MEM_FILE] {
            let dst = self.jail_root.join(name);
            let _ = fs::remove_file(&dst);
            fs::hard_link(self.template.join(name), &dst).map_err(files_err(name))?;
        }
        let channel = self
            .jail_root
            .join(format!("{}_{EMBER_CONFIG_PORT}", self.vsock_uds));
        let server = ConfigServer::listen(&channel, Some(self.owner), &self.config)
            .map_err(|e| WarmError::Channel(e.to_string()))?;
        let t = Instant::now();
        vmm_api::snapshot_load(&self.api_sock, &self.load_body())?;
        let took = t.elapsed();
        match server.wait() {
            ServeOutcome::Fetched { .. } => Ok(took),
            other => Err(WarmError::Channel(other.to_string())),
        }
    }
}

/// The files of an instance's volumes for its jail (as a cold start
/// places them).
pub fn volume_files(vols: &[(PathBuf, String)]) -> Vec<JailFile> {
    vols.iter()
        .map(|(host, name)| JailFile {
            host: host.clone(),
            name: name.clone(),
            writable: true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_body_has_firecracker_fields_and_overrides() {
        let r = Restore {
            api_sock: "/x".into(),
            jail_root: "/j".into(),
            owner: (1, 1),
            template: "/t".into(),
            drives: vec![("drive0".into(), "vol-1.img".into())],
            vsock_uds: "run/vsock.sock".into(),
            guest_cid: 77,
            config: RestoreConfig::new(vec![], vec![], vec![]).unwrap(),
        };
        let b = r.load_body();
        assert_eq!(b["snapshot_path"], STATE_FILE);
        assert_eq!(b["mem_backend"]["backend_type"], "File");
        assert_eq!(b["mem_backend"]["backend_path"], MEM_FILE);
        assert_eq!(b["resume_vm"], true);
        assert_eq!(b["drive_overrides"][0]["drive_id"], "drive0");
        assert_eq!(b["drive_overrides"][0]["path_on_host"], "vol-1.img");
        assert_eq!(b["vsock_override"]["guest_cid"], 77);
    }

    #[test]
    fn template_install_refuses_links_and_sets_modes() {
        let d = std::env::temp_dir().join(format!("warm-tpl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let snap = d.join("snap");
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join(STATE_FILE), b"s").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", snap.join(MEM_FILE)).unwrap();
        let dest = d.join("t1");
        let e = install_template(&snap, &dest).unwrap_err().to_string();
        assert!(e.contains(MEM_FILE), "{e}");
        assert!(!template_ready(&dest));
        fs::remove_file(snap.join(MEM_FILE)).unwrap();
        fs::write(snap.join(STATE_FILE), b"s").unwrap();
        fs::write(snap.join(MEM_FILE), vec![0u8; 4096]).unwrap();
        assert_eq!(install_template(&snap, &dest).unwrap(), 4096);
        assert!(template_ready(&dest));
        let m = fs::metadata(dest.join(MEM_FILE)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
        // A snap directory the VMM replaced by a link is refused.
        let other = d.join("elsewhere");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join(STATE_FILE), b"s").unwrap();
        fs::write(other.join(MEM_FILE), b"m").unwrap();
        let linked = d.join("snap2");
        std::os::unix::fs::symlink(&other, &linked).unwrap();
        let e = install_template(&linked, &d.join("t2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("snap directory"), "{e}");
        assert!(other.join(STATE_FILE).exists(), "nothing moved");
        let _ = fs::remove_dir_all(&d);
    }
}
