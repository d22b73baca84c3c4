//! cgroup placement: `--cgroup FILE=VALUE`, `--cgroup-version`, `--parent-cgroup`.
//!
//! The VMM goes into `<hierarchy root>/<parent>/<id>` (parent defaults to
//! `ember`). On cgroup v2 the controllers a setting needs are enabled in
//! `cgroup.subtree_control` of every ancestor from the root down to the
//! parent. On v1 each controller's own hierarchy gets a directory; cpuset
//! directories inherit `cpuset.cpus`/`cpuset.mems` from their parent when
//! empty, so that a process can be attached.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where mounts are read from.
pub const PROC_MOUNTS: &str = "/proc/mounts";

/// Errors from cgroup configuration and setup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Not `FILE=VALUE`.
    #[error("invalid --cgroup '{0}': expected FILE=VALUE with a non-empty value")]
    Format(String),
    /// The file is not `controller.something` or not a plain file name.
    #[error("invalid --cgroup '{0}': file must be a plain name like cpu.max or cpuset.cpus")]
    File(String),
    /// Reading /proc/mounts failed.
    #[error("cannot read {0}: {1}")]
    Mounts(&'static str, #[source] io::Error),
    /// No cgroup2 mount.
    #[error("no cgroup v2 hierarchy is mounted (try --cgroup-version 1)")]
    NoV2Hierarchy,
    /// No v1 hierarchy for a controller.
    #[error("no cgroup v1 hierarchy is mounted for controller '{0}'")]
    NoV1Hierarchy(String),
    /// A v2 controller not offered by the hierarchy root.
    #[error(
        "cgroup v2 controller '{0}' is not available in {1} (it may be bound to a v1 hierarchy)"
    )]
    ControllerUnavailable(String, PathBuf),
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup {0}: {1}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// Reading a cgroup file failed.
    #[error("cannot read cgroup file {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    /// Writing a cgroup file failed.
    #[error("cannot write '{1}' to cgroup file {0}: {2}")]
    Write(PathBuf, String, #[source] io::Error),
}

/// cgroup hierarchy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// Unified hierarchy.
    V2,
}

/// One `--cgroup FILE=VALUE` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// cgroup interface file, e.g. `cpu.max`.
    pub file: String,
    /// value written to it.
    pub value: String,
}

impl CgroupSetting {
    /// Parses `FILE=VALUE` (the value may itself contain '=' or spaces).
    pub fn parse(arg: &str) -> Result<Self, CgroupError> {
        let (file, value) = arg
            .split_once('=')
            .ok_or_else(|| CgroupError::Format(arg.to_string()))?;
        if value.is_empty() {
            return Err(CgroupError::Format(arg.to_string()));
        }
        let valid_name = !file.is_empty()
            && !file.starts_with('.')
            && file
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        match file.split_once('.') {
            Some((ctrl, rest)) if valid_name && !ctrl.is_empty() && !rest.is_empty() => {
                Ok(CgroupSetting {
                    file: file.to_string(),
                    value: value.to_string(),
                })
            }
            _ => Err(CgroupError::File(arg.to_string())),
        }
    }

    /// The controller the file belongs to (`cpu` for `cpu.max`).
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or("")
    }
}

/// A cgroup filesystem mount from /proc/mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// `cgroup` (v1) or `cgroup2`.
    pub fstype: String,
    /// Mount options (v1 lists its controllers here).
    pub options: Vec<String>,
}

fn unescape_mount_field(s: &str) -> String {
    // /proc/mounts escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Extracts the cgroup and cgroup2 mounts from /proc/mounts text.
pub fn parse_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _dev = f.next()?;
            let mount_point = f.next()?;
            let fstype = f.next()?;
            let options = f.next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape_mount_field(mount_point)),
                fstype: fstype.to_string(),
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The cgroup v2 hierarchy root, if mounted.
pub fn v2_root(mounts: &[CgroupMount]) -> Option<&Path> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.mount_point.as_path())
}

/// The cgroup v1 hierarchy root for `controller`, if mounted.
pub fn v1_root<'a>(mounts: &'a [CgroupMount], controller: &str) -> Option<&'a Path> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))
        .map(|m| m.mount_point.as_path())
}

/// The hierarchy to use: `requested` (`--cgroup-version`) if given; else
/// Firecracker's jailer default, v1, when a v1 hierarchy is mounted, or v2
/// when the unified hierarchy is the only one (a cgroup2-only host).
pub fn resolve_version(requested: Option<CgroupVersion>, mounts: &[CgroupMount]) -> CgroupVersion {
    if let Some(v) = requested {
        return v;
    }
    let has_v1 = mounts.iter().any(|m| m.fstype == "cgroup");
    if !has_v1 && v2_root(mounts).is_some() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// One cgroup directory the VMM goes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Root of the hierarchy it lives in.
    pub hierarchy: PathBuf,
    /// Full path: `<hierarchy>/<parent>/<id>`.
    pub path: PathBuf,
    /// Settings written to it, in order.
    pub settings: Vec<CgroupSetting>,
}

/// The resolved cgroup placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// Hierarchy version.
    pub version: CgroupVersion,
    /// One directory (v2) or one per involved v1 hierarchy.
    pub dirs: Vec<CgroupDir>,
}

/// Resolves where the VMM's cgroup(s) live, without touching the system.
pub fn plan(
    version: CgroupVersion,
    mounts: &[CgroupMount],
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<CgroupPlan, CgroupError> {
    let mut dirs: Vec<CgroupDir> = Vec::new();
    match version {
        CgroupVersion::V2 => {
            let root = v2_root(mounts).ok_or(CgroupError::NoV2Hierarchy)?;
            dirs.push(CgroupDir {
                hierarchy: root.to_path_buf(),
                path: root.join(parent).join(id),
                settings: settings.to_vec(),
            });
        }
        CgroupVersion::V1 => {
            for s in settings {
                let ctrl = s.controller();
                let root = v1_root(mounts, ctrl)
                    .ok_or_else(|| CgroupError::NoV1Hierarchy(ctrl.to_string()))?;
                match dirs.iter_mut().find(|d| d.hierarchy == root) {
                    Some(d) => d.settings.push(s.clone()),
                    None => dirs.push(CgroupDir {
                        hierarchy: root.to_path_buf(),
                        path: root.join(parent).join(id),
                        settings: vec![s.clone()],
                    }),
                }
            }
        }
    }
    Ok(CgroupPlan { version, dirs })
}

/// Ancestors of `path` from `hierarchy` (inclusive) down to path's parent.
fn ancestors_below(hierarchy: &Path, path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = path
        .ancestors()
        .skip(1)
        .take_while(|a| a.starts_with(hierarchy))
        .map(Path::to_path_buf)
        .collect();
    out.reverse();
    out
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| CgroupError::Read(path.to_path_buf(), e))
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CgroupError::Write(path.to_path_buf(), value.to_string(), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| CgroupError::Write(path.to_path_buf(), value.to_string(), e))
}

fn create_dirs(dir: &CgroupDir) -> Result<(), CgroupError> {
    std::fs::create_dir_all(&dir.path).map_err(|e| CgroupError::CreateDir(dir.path.clone(), e))
}

fn setup_v2(dir: &CgroupDir) -> Result<(), CgroupError> {
    let mut controllers: Vec<&str> = Vec::new();
    for s in &dir.settings {
        let c = s.controller();
        // `cgroup.*` are core interface files: no controller to enable.
        if c != "cgroup" && !controllers.contains(&c) {
            controllers.push(c);
        }
    }
    if !controllers.is_empty() {
        let available = read_trimmed(&dir.hierarchy.join("cgroup.controllers"))?;
        for c in &controllers {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(CgroupError::ControllerUnavailable(
                    c.to_string(),
                    dir.hierarchy.clone(),
                ));
            }
        }
    }
    create_dirs(dir)?;
    for level in ancestors_below(&dir.hierarchy, &dir.path) {
        let ctl = level.join("cgroup.subtree_control");
        let enabled = read_trimmed(&ctl)?;
        for c in &controllers {
            if !enabled.split_whitespace().any(|e| e == *c) {
                write_file(&ctl, &format!("+{c}"))?;
            }
        }
    }
    for s in &dir.settings {
        write_file(&dir.path.join(&s.file), &s.value)?;
    }
    Ok(())
}

fn setup_v1(dir: &CgroupDir) -> Result<(), CgroupError> {
    create_dirs(dir)?;
    if dir.settings.iter().any(|s| s.controller() == "cpuset") {
        // A v1 cpuset with empty cpus/mems cannot take tasks: fill each new
        // level from its parent first.
        let mut levels = ancestors_below(&dir.hierarchy, &dir.path);
        levels.push(dir.path.clone());
        for pair in levels.windows(2) {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let here = pair[1].join(file);
                if read_trimmed(&here)?.is_empty() {
                    let v = read_trimmed(&pair[0].join(file))?;
                    write_file(&here, &v)?;
                }
            }
        }
    }
    for s in &dir.settings {
        write_file(&dir.path.join(&s.file), &s.value)?;
    }
    Ok(())
}

/// Creates the cgroup directories (enabling the controllers the settings
/// need in every ancestor) and writes the settings; moves no process.
pub fn create(plan: &CgroupPlan) -> Result<(), CgroupError> {
    for dir in &plan.dirs {
        match plan.version {
            CgroupVersion::V2 => setup_v2(dir)?,
            CgroupVersion::V1 => setup_v1(dir)?,
        }
    }
    Ok(())
}

/// Moves this process into the existing cgroup `dir` (v2).
pub fn join(dir: &Path) -> Result<(), CgroupError> {
    write_file(&dir.join("cgroup.procs"), &std::process::id().to_string())
}

/// Creates the cgroup directories, writes the settings and moves the
/// calling process (and so the VMM it becomes) into them.
pub fn setup(plan: &CgroupPlan) -> Result<(), CgroupError> {
    create(plan)?;
    let pid = std::process::id().to_string();
    for dir in &plan.dirs {
        write_file(&dir.path.join("cgroup.procs"), &pid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
proc /proc proc rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/with\\040space cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    fn s(a: &str) -> CgroupSetting {
        CgroupSetting::parse(a).unwrap()
    }

    #[test]
    fn settings() {
        let c = s("cpu.max=50000 100000");
        assert_eq!(c.file, "cpu.max");
        assert_eq!(c.value, "50000 100000");
        assert_eq!(c.controller(), "cpu");
        assert_eq!(s("cpuset.cpus=0-1").controller(), "cpuset");
        assert_eq!(s("memory.max=a=b").value, "a=b");
        for bad in ["cpu.max", "cpu.max="] {
            assert!(
                matches!(CgroupSetting::parse(bad), Err(CgroupError::Format(_))),
                "{bad}"
            );
        }
        for bad in [
            "=1",
            "cpu=1",
            ".cpu=1",
            "cpu.=1",
            "../cpu.max=1",
            "cpu/x.max=1",
            "a.b/c=1",
        ] {
            assert!(
                matches!(CgroupSetting::parse(bad), Err(CgroupError::File(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn mounts() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 5);
        assert_eq!(v2_root(&m), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            v1_root(&m, "cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            v1_root(&m, "pids"),
            Some(Path::new("/sys/fs/cgroup/with space"))
        );
        assert_eq!(v1_root(&m, "devices"), None);
        assert_eq!(v2_root(&parse_mounts("proc /proc proc rw 0 0\n")), None);
    }

    #[test]
    fn version_defaults_to_v1_unless_only_v2_is_mounted() {
        let hybrid = parse_mounts(MOUNTS);
        assert_eq!(resolve_version(None, &hybrid), CgroupVersion::V1);
        assert_eq!(
            resolve_version(Some(CgroupVersion::V2), &hybrid),
            CgroupVersion::V2
        );
        let unified = parse_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n");
        assert_eq!(resolve_version(None, &unified), CgroupVersion::V2);
        assert_eq!(
            resolve_version(Some(CgroupVersion::V1), &unified),
            CgroupVersion::V1
        );
        let v1_only = parse_mounts("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu,cpuacct 0 0\n");
        assert_eq!(resolve_version(None, &v1_only), CgroupVersion::V1);
        assert_eq!(resolve_version(None, &[]), CgroupVersion::V1);
    }

    #[test]
    fn plan_v2() {
        let m = parse_mounts(MOUNTS);
        let p = plan(
            CgroupVersion::V2,
            &m,
            Path::new("ember"),
            "vm1",
            &[s("cpu.max=1 2"), s("memory.max=1G")],
        )
        .unwrap();
        assert_eq!(p.dirs.len(), 1);
        assert_eq!(
            p.dirs[0].path,
            PathBuf::from("/sys/fs/cgroup/unified/ember/vm1")
        );
        assert_eq!(p.dirs[0].settings.len(), 2);
        assert_eq!(
            ancestors_below(&p.dirs[0].hierarchy, &p.dirs[0].path),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/unified/ember")
            ]
        );
        assert!(matches!(
            plan(CgroupVersion::V2, &[], Path::new("ember"), "x", &[]),
            Err(CgroupError::NoV2Hierarchy)
        ));
    }

    #[test]
    fn plan_v1_groups_by_hierarchy() {
        let m = parse_mounts(MOUNTS);
        let p = plan(
            CgroupVersion::V1,
            &m,
            Path::new("a/b"),
            "vm1",
            &[
                s("cpu.shares=10"),
                s("cpuset.cpus=0"),
                s("cpuacct.x=1"),
                s("cpuset.mems=0"),
            ],
        )
        .unwrap();
        let paths: Vec<_> = p.dirs.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/a/b/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpuset/a/b/vm1")
            ]
        );
        assert_eq!(p.dirs[0].settings.len(), 2);
        assert_eq!(p.dirs[1].settings.len(), 2);
        assert_eq!(
            ancestors_below(&p.dirs[1].hierarchy, &p.dirs[1].path).len(),
            3 // root, a, a/b
        );
        assert!(matches!(
            plan(CgroupVersion::V1, &m, Path::new("e"), "x", &[s("devices.allow=a")]),
            Err(CgroupError::NoV1Hierarchy(c)) if c == "devices"
        ));
    }
}
