//! `ember-jailer`: puts one VMM process in a jail and execs it.
//!
//! Steps, in Firecracker's jailer order (see [`run`]):
//! 1. close inherited fds > 2 and clear the environment ([`sanitize`]);
//! 2. parse and validate the arguments ([`args`], [`validate`]);
//! 3. create `<base>/<exec name>/<id>/root` and put the VMM binary in it;
//! 4. join `--netns`, install resource limits, set up cgroups;
//! 5. new mount namespace, `pivot_root` into the jail, create `/dev/kvm`,
//!    `/dev/net/tun`, `/dev/urandom` and any `--macvtap` nodes
//!    (`/dev/macvtap/<name>`), and with `--userfaultfd` `/dev/userfaultfd`,
//!    owned by uid:gid ([`jail`]);
//! 6. `--daemonize`, `--new-pid-ns` ([`process`]), write `/<exec name>.pid`;
//! 7. drop to uid:gid with no capabilities ([`privileges`]) and exec
//!    `/<exec name>` with the arguments after `--`.

pub mod args;
pub mod cgroup;
pub mod jail;
pub mod privileges;
pub mod process;
pub mod rlimit;
pub mod sanitize;
pub mod validate;

use std::convert::Infallible;
use std::ffi::OsString;
use std::path::PathBuf;

use args::Args;
use cgroup::{CgroupPlan, CgroupSetting, CgroupVersion};
use rlimit::ResourceLimits;

/// Any jailer failure; one variant per module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Command-line error.
    #[error(transparent)]
    Args(#[from] args::ArgsError),
    /// Invalid id or path.
    #[error(transparent)]
    Validate(#[from] validate::ValidateError),
    /// Sanitizing the process failed.
    #[error(transparent)]
    Sanitize(#[from] sanitize::SanitizeError),
    /// Jail setup failed.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// cgroup setup failed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// Resource limits failed.
    #[error(transparent)]
    Rlimit(#[from] rlimit::RlimitError),
    /// Namespaces, daemonizing or exec failed.
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// Dropping privileges failed.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegesError),
}

impl Error {
    /// Process exit status for this error (distinct per area).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Args(_) => 2,
            Error::Validate(_) => 3,
            Error::Sanitize(_) => 4,
            Error::Jail(_) => 5,
            Error::Cgroup(_) => 6,
            Error::Rlimit(_) => 7,
            Error::Process(process::ProcessError::Exec(..)) => 10,
            Error::Process(_) => 8,
            Error::Privileges(_) => 9,
        }
    }
}

/// Fully validated jail configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Jail id.
    pub id: String,
    /// Canonical path of the VMM binary on the host.
    pub exec_file: PathBuf,
    /// Its file name: the binary is `/<exec_name>` inside the jail.
    pub exec_name: String,
    /// uid the VMM runs as.
    pub uid: u32,
    /// gid the VMM runs as.
    pub gid: u32,
    /// `<base>/<exec_name>/<id>/root` on the host.
    pub jail_root: PathBuf,
    /// Network namespace to join.
    pub netns: Option<PathBuf>,
    /// Detach from the caller.
    pub daemonize: bool,
    /// Run the VMM as pid 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// Recreate the host's `/dev/userfaultfd` in the jail (`--userfaultfd`).
    pub userfaultfd: bool,
    /// cgroup settings (empty: cgroups untouched).
    pub cgroup_settings: Vec<CgroupSetting>,
    /// cgroup version asked for (`None`: see [`cgroup::resolve_version`]).
    pub cgroup_version: Option<CgroupVersion>,
    /// When the jailer started: CLOCK_MONOTONIC and process CPU time, µs
    /// (passed to the VMM as Firecracker's jailer does).
    pub start_time_us: u64,
    /// Process CPU time at start, µs.
    pub start_time_cpu_us: u64,
    /// Parent cgroup, relative to the hierarchy root.
    pub parent_cgroup: PathBuf,
    /// Resource limits.
    pub resource_limits: ResourceLimits,
    /// `/dev/macvtap/<name>` nodes to create in the jail (`--macvtap`).
    pub macvtaps: Vec<validate::MacvtapDev>,
    /// Arguments for the VMM.
    pub vmm_args: Vec<OsString>,
}

impl Config {
    /// Validates parsed arguments (id first, then exec file, then paths),
    /// creating the chroot base directory if missing.
    pub fn from_args(a: Args) -> Result<Config, Error> {
        validate::validate_id(&a.id)?;
        let (exec_file, exec_name) = validate::validate_exec_file(&a.exec_file)?;
        let base = validate::validate_chroot_base(&a.chroot_base_dir)?;
        if let Some(ns) = &a.netns {
            validate::refuse_parent_dir("--netns", ns)?;
        }
        let parent_cgroup = validate::validate_parent_cgroup(
            // Firecracker's default: the exec file's name.
            a.parent_cgroup.as_deref().unwrap_or(&exec_name),
        )?;
        let cgroup_settings = a
            .cgroups
            .iter()
            .map(|s| CgroupSetting::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let resource_limits = ResourceLimits::parse(&a.resource_limits)?;
        let macvtaps = a
            .macvtaps
            .iter()
            .map(|v| validate::parse_macvtap(v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            jail_root: jail::jail_root(&base, &exec_name, &a.id),
            id: a.id,
            exec_file,
            exec_name,
            uid: a.uid,
            gid: a.gid,
            netns: a.netns,
            daemonize: a.daemonize,
            new_pid_ns: a.new_pid_ns,
            userfaultfd: a.userfaultfd,
            cgroup_settings,
            cgroup_version: a.cgroup_version.map(|v| {
                if v == 1 {
                    CgroupVersion::V1
                } else {
                    CgroupVersion::V2
                }
            }),
            start_time_us: clock_us(libc::CLOCK_MONOTONIC),
            start_time_cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
            parent_cgroup,
            resource_limits,
            macvtaps,
            vmm_args: a.vmm_args,
        })
    }

    /// Resolves the cgroup placement from /proc/mounts (None without
    /// `--cgroup` settings).
    pub fn cgroup_plan(&self) -> Result<Option<CgroupPlan>, Error> {
        if self.cgroup_settings.is_empty() {
            return Ok(None);
        }
        let mounts = Self::mounts()?;
        Ok(Some(cgroup::plan(
            cgroup::resolve_version(self.cgroup_version, &mounts),
            &mounts,
            &self.parent_cgroup,
            &self.id,
            &self.cgroup_settings,
        )?))
    }
}

impl Config {
    fn mounts() -> Result<Vec<cgroup::CgroupMount>, Error> {
        let text = std::fs::read_to_string(cgroup::PROC_MOUNTS)
            .map_err(|e| cgroup::CgroupError::Mounts(cgroup::PROC_MOUNTS, e))?;
        Ok(cgroup::parse_mounts(&text))
    }

    /// Firecracker's jailer rule: with cgroup v2 and no `--cgroup`
    /// settings, an existing `<v2 root>/<parent cgroup>` is joined as is.
    pub fn v2_parent_to_join(&self) -> Result<Option<PathBuf>, Error> {
        if !self.cgroup_settings.is_empty() {
            return Ok(None);
        }
        let mounts = Self::mounts()?;
        if cgroup::resolve_version(self.cgroup_version, &mounts) != CgroupVersion::V2 {
            return Ok(None);
        }
        Ok(cgroup::v2_root(&mounts)
            .map(|r| r.join(&self.parent_cgroup))
            .filter(|p| p.is_dir()))
    }
}

/// Builds the jail and execs the VMM. Only returns on failure.
///
/// With `--new-pid-ns` the original process exits 0 once the child's pid
/// is written; with `--daemonize` the caller sees exit 0 right after the
/// first fork.
pub fn run(cfg: &Config) -> Result<Infallible, Error> {
    // Everything that needs the host's view happens before pivot_root.
    let cgroup_plan = cfg.cgroup_plan()?;
    if let Some(parent) = cfg.v2_parent_to_join()? {
        cgroup::join(&parent)?;
    }
    jail::create_root(&cfg.jail_root)?;
    jail::install_exec(&cfg.exec_file, &cfg.jail_root, &cfg.exec_name)?;
    if let Some(ns) = &cfg.netns {
        process::join_netns(ns)?;
    }
    cfg.resource_limits.install()?;
    if let Some(plan) = &cgroup_plan {
        cgroup::setup(plan)?;
    }
    let dev_null = if cfg.daemonize {
        Some(process::open_dev_null()?)
    } else {
        None
    };

    // The device's minor is dynamic: read it while the host's /dev is seen.
    let uffd_dev = if cfg.userfaultfd {
        Some(jail::host_userfaultfd()?)
    } else {
        None
    };
    jail::enter(&cfg.jail_root)?;
    for w in jail::populate(cfg.uid, cfg.gid)? {
        eprintln!("ember-jailer: warning: {w}");
    }
    jail::populate_macvtaps(&cfg.macvtaps, cfg.uid, cfg.gid)?;
    if let Some((major, minor)) = uffd_dev {
        jail::populate_device(jail::USERFAULTFD, major, minor, cfg.uid, cfg.gid)?;
    }

    if let Some(null) = &dev_null {
        process::daemonize(null)?;
    }
    drop(dev_null);
    if cfg.new_pid_ns {
        match process::fork_into_new_pid_ns(cfg.daemonize)? {
            process::PidNsFork::Parent(child) => {
                let code = match jail::write_pid_file(&cfg.exec_name, child) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("ember-jailer: {e}");
                        // SAFETY: kill of our own child.
                        unsafe { libc::kill(child as libc::pid_t, libc::SIGKILL) };
                        Error::from(e).exit_code()
                    }
                };
                process::exit_now(code);
            }
            process::PidNsFork::Child => {}
        }
    } else {
        jail::write_pid_file(&cfg.exec_name, std::process::id())?;
    }

    privileges::drop_privileges(cfg.uid, cfg.gid)?;
    let exec_path = PathBuf::from("/").join(&cfg.exec_name);
    Err(process::exec(&exec_path, &cfg.exec_args()).into())
}

/// `clock`'s time in microseconds.
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

impl Config {
    /// The VMM's arguments, as Firecracker's jailer builds them: `--id`,
    /// `--start-time-us` (the jailer's start), `--start-time-cpu-us` (this
    /// process's CPU time now) and `--parent-cpu-time-us` (CPU time the
    /// jailer used), then the arguments after `--`.
    pub fn exec_args(&self) -> Vec<OsString> {
        let cpu_now = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
        let mut a: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--start-time-us".into(),
            self.start_time_us.to_string().into(),
            "--start-time-cpu-us".into(),
            cpu_now.to_string().into(),
            "--parent-cpu-time-us".into(),
            cpu_now
                .saturating_sub(self.start_time_cpu_us)
                .to_string()
                .into(),
        ];
        a.extend(self.vmm_args.iter().cloned());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: &str, exec: &str) -> Args {
        let dir = std::env::temp_dir();
        Args {
            id: id.into(),
            exec_file: exec.into(),
            uid: 1,
            gid: 2,
            chroot_base_dir: dir,
            netns: None,
            daemonize: false,
            new_pid_ns: false,
            userfaultfd: false,
            cgroup_version: None,
            cgroups: vec![],
            parent_cgroup: None,
            resource_limits: vec![],
            macvtaps: vec![],
            vmm_args: vec![],
        }
    }

    #[test]
    fn config_from_args() {
        let c = Config::from_args(args("vm-1", "Cargo.toml")).unwrap();
        assert_eq!(c.exec_name, "Cargo.toml");
        assert!(c.jail_root.ends_with("Cargo.toml/vm-1/root"));
        assert_eq!(c.parent_cgroup, PathBuf::from("Cargo.toml"));
        assert_eq!(c.resource_limits.no_file, 2048);
        assert!(c.cgroup_plan().unwrap().is_none());
        let mut a = args("vm-1", "Cargo.toml");
        a.vmm_args = vec!["--api-sock".into(), "/run/s".into()];
        let e = Config::from_args(a).unwrap().exec_args();
        let e: Vec<String> = e.iter().map(|s| s.to_string_lossy().into()).collect();
        assert_eq!(&e[..2], ["--id", "vm-1"]);
        assert_eq!(e[2], "--start-time-us");
        assert_eq!(e[4], "--start-time-cpu-us");
        assert_eq!(e[6], "--parent-cpu-time-us");
        assert_eq!(&e[8..], ["--api-sock", "/run/s"]);
    }

    #[test]
    fn config_errors_and_codes() {
        let e = Config::from_args(args("bad id", "Cargo.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let e = Config::from_args(args("ok", "/nonexistent/vmm")).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let mut a = args("ok", "Cargo.toml");
        a.netns = Some("/var/run/netns/../x".into());
        assert!(Config::from_args(a)
            .unwrap_err()
            .to_string()
            .contains("'..'"));
        let mut a = args("ok", "Cargo.toml");
        a.cgroups = vec!["nonsense".into()];
        assert_eq!(Config::from_args(a).unwrap_err().exit_code(), 6);
        let mut a = args("ok", "Cargo.toml");
        a.resource_limits = vec!["cores=1".into()];
        assert_eq!(Config::from_args(a).unwrap_err().exit_code(), 7);
        let mut a = args("ok", "Cargo.toml");
        a.parent_cgroup = Some("../x".into());
        assert_eq!(Config::from_args(a).unwrap_err().exit_code(), 3);
    }
}
