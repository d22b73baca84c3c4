//! Command-line parsing for `ember-jailer`.
//!
//! The argument set is small, so it is parsed by hand: `--name VALUE` or
//! `--name=VALUE`, flags, repeatable options, and everything after `--` is
//! handed to the VMM untouched.

use std::ffi::OsString;
use std::path::PathBuf;

/// Default directory under which jails are created.
pub const DEFAULT_CHROOT_BASE_DIR: &str = "/srv/jailer";

/// Errors from command-line parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An option that is not known.
    #[error("unknown argument '{0}' (see --help)")]
    Unknown(String),
    /// An option that needs a value got none.
    #[error("option --{0} needs a value")]
    MissingValue(String),
    /// A flag was given a value (`--daemonize=yes`).
    #[error("flag --{0} takes no value")]
    UnexpectedValue(String),
    /// A single-valued option was given twice.
    #[error("option --{0} given more than once")]
    Duplicate(String),
    /// A required option is absent.
    #[error("missing required option --{0}")]
    Required(&'static str),
    /// A value is not valid UTF-8 where text is required.
    #[error("value of --{0} is not valid UTF-8")]
    NotUtf8(String),
    /// `--uid`/`--gid` not a number.
    #[error("invalid --{0} '{1}': expected a decimal number")]
    BadNumber(&'static str, String),
    /// `--cgroup-version` not 1 or 2.
    #[error("invalid --cgroup-version '{0}': expected 1 or 2")]
    BadCgroupVersion(String),
}

/// Parsed (but not yet validated) jailer arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--id`.
    pub id: String,
    /// `--exec-file`.
    pub exec_file: PathBuf,
    /// `--uid`.
    pub uid: u32,
    /// `--gid`.
    pub gid: u32,
    /// `--chroot-base-dir`.
    pub chroot_base_dir: PathBuf,
    /// `--netns`.
    pub netns: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// `--new-pid-ns`.
    pub new_pid_ns: bool,
    /// `--userfaultfd`.
    pub userfaultfd: bool,
    /// `--cgroup-version` (1 or 2); `None`: Firecracker's default, v1, or the
    /// only hierarchy mounted.
    pub cgroup_version: Option<u8>,
    /// `--cgroup FILE=VALUE`, in order.
    pub cgroups: Vec<String>,
    /// `--parent-cgroup`.
    pub parent_cgroup: Option<String>,
    /// `--resource-limit NAME=VALUE`, in order.
    pub resource_limits: Vec<String>,
    /// `--macvtap NAME=MAJOR:MINOR`, in order (unvalidated).
    pub macvtaps: Vec<String>,
    /// Everything after `--`.
    pub vmm_args: Vec<OsString>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Jail and exec the VMM.
    Run(Box<Args>),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// Help text printed for `--help`.
pub const USAGE: &str = "\
Usage: ember-jailer --id ID --exec-file PATH --uid UID --gid GID [OPTIONS] [-- VMM_ARGS...]

Puts one VMM process in a chroot jail (pivot_root in a new mount namespace),
optionally in a network namespace, a new PID namespace and cgroups, drops to
UID:GID with no capabilities and execs it as /<exec-file name> with
Firecracker's jailer arguments first: --id ID --start-time-us T
--start-time-cpu-us C --parent-cpu-time-us P, then VMM_ARGS.

Options:
  --id ID                      jail id: 1-64 ASCII letters, digits or '-'
  --exec-file PATH             the VMM binary (copied or hard-linked into the jail)
  --uid UID                    user id the VMM runs as
  --gid GID                    group id the VMM runs as
  --chroot-base-dir DIR        base of jails [default: /srv/jailer];
                               the jail is DIR/<exec name>/<id>/root
  --netns PATH                 join the network namespace at PATH (e.g. /var/run/netns/NAME)
  --daemonize                  detach (setsid, stdio to /dev/null)
  --new-pid-ns                 run the VMM as pid 1 of a new PID namespace
  --userfaultfd                recreate the host's /dev/userfaultfd in the jail (mode 0600,
                               owned by UID:GID) for the Uffd snapshot memory backend;
                               an error when the host has none
  --cgroup FILE=VALUE          write VALUE to FILE of the VMM's cgroup (repeatable),
                               e.g. cpu.max=50000 100000, memory.max=1G, cpuset.cpus=0
  --cgroup-version 1|2         cgroup hierarchy to use [default: 1, as Firecracker's
                               jailer; 2 when the unified hierarchy is the only one]
  --parent-cgroup PATH         cgroup parent, relative to the hierarchy root [default: the
                               exec file's name, as Firecracker's jailer]; with cgroup v2 and
                               no --cgroup, an existing parent is joined as is
  --resource-limit NAME=VALUE  no-file=N or fsize=N (repeatable) [default: no-file=2048]
  --macvtap NAME=MAJOR:MINOR   create the character device /dev/macvtap/NAME (mode 0600,
                               owned by UID:GID) in the jail for the macvtap link NAME
                               (repeatable); ember-vmm opens it for host_dev_name NAME
  -h, --help                   print this help
  -V, --version                print the version
";

const VALUE_OPTIONS: &[&str] = &[
    "id",
    "exec-file",
    "uid",
    "gid",
    "chroot-base-dir",
    "netns",
    "cgroup",
    "cgroup-version",
    "parent-cgroup",
    "resource-limit",
    "macvtap",
];
const FLAG_OPTIONS: &[&str] = &["daemonize", "new-pid-ns", "userfaultfd"];
const REPEATABLE: &[&str] = &["cgroup", "resource-limit", "macvtap"];

fn to_string(name: &str, v: OsString) -> Result<String, ArgsError> {
    v.into_string()
        .map_err(|_| ArgsError::NotUtf8(name.to_string()))
}

fn parse_u32(name: &'static str, v: &str) -> Result<u32, ArgsError> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArgsError::BadNumber(name, v.to_string()));
    }
    v.parse::<u32>()
        .map_err(|_| ArgsError::BadNumber(name, v.to_string()))
}

/// Parses the arguments (without the program name).
pub fn parse<I>(args: I) -> Result<Command, ArgsError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut it = args.into_iter();
    // name -> values, in order of appearance.
    let mut values: Vec<(String, OsString)> = Vec::new();
    let mut flags: Vec<String> = Vec::new();
    let mut vmm_args = Vec::new();

    while let Some(arg) = it.next() {
        let text = match arg.to_str() {
            Some(t) => t.to_string(),
            None => return Err(ArgsError::Unknown(arg.to_string_lossy().into_owned())),
        };
        if text == "--" {
            vmm_args.extend(it.by_ref());
            break;
        }
        if text == "-h" || text == "--help" {
            return Ok(Command::Help);
        }
        if text == "-V" || text == "--version" {
            return Ok(Command::Version);
        }
        let Some(body) = text.strip_prefix("--") else {
            return Err(ArgsError::Unknown(text));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(OsString::from(v))),
            None => (body.to_string(), None),
        };
        if FLAG_OPTIONS.contains(&name.as_str()) {
            if inline.is_some() {
                return Err(ArgsError::UnexpectedValue(name));
            }
            if flags.contains(&name) {
                return Err(ArgsError::Duplicate(name));
            }
            flags.push(name);
        } else if VALUE_OPTIONS.contains(&name.as_str()) {
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| ArgsError::MissingValue(name.clone()))?,
            };
            if !REPEATABLE.contains(&name.as_str()) && values.iter().any(|(n, _)| *n == name) {
                return Err(ArgsError::Duplicate(name));
            }
            values.push((name, value));
        } else {
            return Err(ArgsError::Unknown(text));
        }
    }

    let single = |name: &str| -> Option<OsString> {
        values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let multi = |name: &str| -> Vec<OsString> {
        values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };

    let id = to_string("id", single("id").ok_or(ArgsError::Required("id"))?)?;
    let exec_file = PathBuf::from(single("exec-file").ok_or(ArgsError::Required("exec-file"))?);
    let uid = parse_u32(
        "uid",
        &to_string("uid", single("uid").ok_or(ArgsError::Required("uid"))?)?,
    )?;
    let gid = parse_u32(
        "gid",
        &to_string("gid", single("gid").ok_or(ArgsError::Required("gid"))?)?,
    )?;
    let chroot_base_dir = single("chroot-base-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE_DIR));
    let netns = single("netns").map(PathBuf::from);
    let cgroup_version = match single("cgroup-version") {
        None => None,
        Some(v) => {
            let v = to_string("cgroup-version", v)?;
            match v.as_str() {
                "1" => Some(1),
                "2" => Some(2),
                _ => return Err(ArgsError::BadCgroupVersion(v)),
            }
        }
    };
    let cgroups = multi("cgroup")
        .into_iter()
        .map(|v| to_string("cgroup", v))
        .collect::<Result<Vec<_>, _>>()?;
    let parent_cgroup = single("parent-cgroup")
        .map(|v| to_string("parent-cgroup", v))
        .transpose()?;
    let resource_limits = multi("resource-limit")
        .into_iter()
        .map(|v| to_string("resource-limit", v))
        .collect::<Result<Vec<_>, _>>()?;
    let macvtaps = multi("macvtap")
        .into_iter()
        .map(|v| to_string("macvtap", v))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Command::Run(Box::new(Args {
        id,
        exec_file,
        uid,
        gid,
        chroot_base_dir,
        netns,
        daemonize: flags.iter().any(|f| f == "daemonize"),
        new_pid_ns: flags.iter().any(|f| f == "new-pid-ns"),
        userfaultfd: flags.iter().any(|f| f == "userfaultfd"),
        cgroup_version,
        cgroups,
        parent_cgroup,
        resource_limits,
        macvtaps,
        vmm_args,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, ArgsError> {
        parse(args.iter().map(OsString::from))
    }

    fn run(args: &[&str]) -> Args {
        match p(args) {
            Ok(Command::Run(a)) => *a,
            other => panic!("unexpected {other:?}"),
        }
    }

    const BASE: &[&str] = &[
        "--id",
        "vm-1",
        "--exec-file",
        "/bin/true",
        "--uid",
        "123",
        "--gid",
        "456",
    ];

    #[test]
    fn minimal_with_defaults() {
        let a = run(BASE);
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.exec_file, PathBuf::from("/bin/true"));
        assert_eq!((a.uid, a.gid), (123, 456));
        assert_eq!(a.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(a.cgroup_version, None);
        assert!(!a.daemonize && !a.new_pid_ns && !a.userfaultfd);
        assert!(a.netns.is_none() && a.parent_cgroup.is_none());
        assert!(a.cgroups.is_empty() && a.resource_limits.is_empty() && a.vmm_args.is_empty());
        assert!(a.macvtaps.is_empty());
    }

    #[test]
    fn all_options_and_vmm_args() {
        let mut v = BASE.to_vec();
        v.extend([
            "--chroot-base-dir=/tmp/j",
            "--netns",
            "/var/run/netns/x",
            "--daemonize",
            "--new-pid-ns",
            "--userfaultfd",
            "--cgroup",
            "cpu.max=50000 100000",
            "--cgroup=memory.max=1G",
            "--cgroup-version",
            "1",
            "--parent-cgroup",
            "a/b",
            "--resource-limit",
            "no-file=10",
            "--resource-limit=fsize=4096",
            "--macvtap",
            "emb0abc12340=246:1",
            "--",
            "--api-sock",
            "/run/api.sock",
            "--id",
        ]);
        let a = run(&v);
        assert_eq!(a.chroot_base_dir, PathBuf::from("/tmp/j"));
        assert_eq!(a.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert!(a.daemonize && a.new_pid_ns && a.userfaultfd);
        assert_eq!(a.cgroups, vec!["cpu.max=50000 100000", "memory.max=1G"]);
        assert_eq!(a.cgroup_version, Some(1));
        assert_eq!(a.parent_cgroup.as_deref(), Some("a/b"));
        assert_eq!(a.resource_limits, vec!["no-file=10", "fsize=4096"]);
        assert_eq!(a.macvtaps, vec!["emb0abc12340=246:1"]);
        assert_eq!(
            a.vmm_args,
            vec![
                OsString::from("--api-sock"),
                "/run/api.sock".into(),
                "--id".into()
            ]
        );
    }

    #[test]
    fn help_and_version() {
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["--id", "x", "-h"]), Ok(Command::Help));
        assert_eq!(p(&["-V"]), Ok(Command::Version));
    }

    #[test]
    fn errors() {
        assert_eq!(
            p(&["--uid", "1", "--gid", "1", "--exec-file", "/x"]),
            Err(ArgsError::Required("id"))
        );
        assert_eq!(p(&["--id"]), Err(ArgsError::MissingValue("id".into())));
        assert_eq!(p(&["--bogus"]), Err(ArgsError::Unknown("--bogus".into())));
        assert_eq!(p(&["stray"]), Err(ArgsError::Unknown("stray".into())));
        assert_eq!(
            p(&["--daemonize=1"]),
            Err(ArgsError::UnexpectedValue("daemonize".into()))
        );
        assert_eq!(
            p(&["--id", "a", "--id", "b"]),
            Err(ArgsError::Duplicate("id".into()))
        );
        let mut v = BASE.to_vec();
        v[5] = "-5";
        assert_eq!(p(&v), Err(ArgsError::BadNumber("uid", "-5".into())));
        v[5] = "99999999999";
        assert_eq!(
            p(&v),
            Err(ArgsError::BadNumber("uid", "99999999999".into()))
        );
        let mut v = BASE.to_vec();
        v.extend(["--cgroup-version", "3"]);
        assert_eq!(p(&v), Err(ArgsError::BadCgroupVersion("3".into())));
    }
}
