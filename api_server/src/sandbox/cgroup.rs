//! The job's cgroup v2: `<cgroup2 root>/<parent>/<job>` with memory, pids
//! and cpu limits, made through ember-jailer's cgroup code
//! ([`jailer::cgroup::create`]), killed with `cgroup.kill` and removed
//! after the job. Without a usable cgroup2 (no cgroup2 mount, or one
//! without the `memory` and `pids` controllers, as on hybrid v1 hosts)
//! jobs run with rlimits only; the reason is logged once.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jailer::cgroup::{self as jc, CgroupPlan, CgroupSetting, CgroupVersion};

use super::{Limits, SandboxError};

/// Controllers a job cgroup needs.
const NEEDED: [&str; 2] = ["memory", "pids"];

/// The cgroup2 root when it offers the needed controllers, else why not.
/// Checked once per process.
pub fn cgroup_support() -> Result<PathBuf, String> {
    static SUPPORT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            let r = probe(Path::new(jc::PROC_MOUNTS));
            if let Err(why) = &r {
                log::warn!("sandbox: no cgroup limits for jobs, rlimits only: {why}");
            }
            r
        })
        .clone()
}

fn probe(mounts: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(mounts)
        .map_err(|e| format!("cannot read {}: {e}", mounts.display()))?;
    let m = jc::parse_mounts(&text);
    let root = jc::v2_root(&m)
        .ok_or("no cgroup2 filesystem is mounted")?
        .to_path_buf();
    let ctl = root.join("cgroup.controllers");
    let have =
        std::fs::read_to_string(&ctl).map_err(|e| format!("cannot read {}: {e}", ctl.display()))?;
    let missing: Vec<&str> = NEEDED
        .iter()
        .copied()
        .filter(|c| !have.split_whitespace().any(|h| h == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the cgroup2 hierarchy at {} offers [{}], not {} (they are bound to cgroup v1)",
            root.display(),
            have.trim(),
            missing.join(", ")
        ));
    }
    Ok(root)
}

/// The settings written to a job cgroup, for the controllers `have`.
pub(super) fn settings(l: &Limits, have: &str, swap_file: bool) -> Vec<CgroupSetting> {
    let has = |c: &str| have.split_whitespace().any(|h| h == c);
    let mut s = vec![
        CgroupSetting {
            file: "memory.max".into(),
            value: l.memory_bytes.to_string(),
        },
        CgroupSetting {
            file: "memory.oom.group".into(),
            value: "1".into(),
        },
        CgroupSetting {
            file: "pids.max".into(),
            value: l.pids.to_string(),
        },
    ];
    if swap_file {
        s.push(CgroupSetting {
            file: "memory.swap.max".into(),
            value: "0".into(),
        });
    }
    if has("cpu") {
        let period = 100_000u64;
        s.push(CgroupSetting {
            file: "cpu.max".into(),
            value: format!(
                "{} {period}",
                u64::from(l.cpu_percent.max(1)) * period / 100
            ),
        });
    }
    s
}

/// A job's cgroup; removed on drop (after killing what is in it).
pub(super) struct JobCgroup {
    path: PathBuf,
    /// `cgroup.procs`, opened for the child to write "0" (join itself).
    pub(super) procs: File,
}

impl JobCgroup {
    /// Makes `<root>/<parent>/<name>` with the job's limits.
    pub(super) fn create(
        root: &Path,
        parent: &str,
        name: &str,
        l: &Limits,
    ) -> Result<JobCgroup, SandboxError> {
        let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        // memory.swap.max exists only with swap accounting; probe the parent.
        let parent_dir = root.join(parent);
        let plan = CgroupPlan {
            version: CgroupVersion::V2,
            dirs: vec![jc::CgroupDir {
                hierarchy: root.to_path_buf(),
                path: parent_dir.join(name),
                settings: settings(l, &have, false),
            }],
        };
        jc::create(&plan)?;
        let path = parent_dir.join(name);
        let cg = JobCgroup {
            procs: OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path.join("cgroup.procs"))
                .map_err(|source| SandboxError::Io {
                    what: "open",
                    path: path.join("cgroup.procs"),
                    source,
                })?,
            path,
        };
        if cg.path.join("memory.swap.max").exists() {
            write(&cg.path.join("memory.swap.max"), "0")?;
        }
        Ok(cg)
    }

    /// Kills every process in the cgroup; false when `cgroup.kill` is
    /// missing (kernels before 5.14) and nothing was done.
    pub(super) fn kill(&self) -> bool {
        write(&self.path.join("cgroup.kill"), "1").is_ok()
    }

    /// Whether `memory.events` counted an OOM kill.
    pub(super) fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events"))
            .map(|t| {
                t.lines()
                    .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
            })
            .unwrap_or(false)
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        // Empty it (normally it already is), then remove it; rmdir fails
        // with EBUSY while dying processes are still listed.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) if Instant::now() < deadline => {
                    self.kill();
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    log::warn!("sandbox: cannot remove cgroup {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }
}

fn write(p: &Path, v: &str) -> Result<(), SandboxError> {
    OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(v.as_bytes()))
        .map_err(|source| SandboxError::Io {
            what: "write",
            path: p.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn settings_follow_limits_and_controllers() {
        let l = Limits::default();
        let s = settings(&l, "cpuset cpu io memory pids", true);
        let get = |f: &str| s.iter().find(|x| x.file == f).map(|x| x.value.clone());
        assert_eq!(get("memory.max"), Some((1u64 << 30).to_string()));
        assert_eq!(get("pids.max"), Some("256".into()));
        assert_eq!(get("memory.swap.max"), Some("0".into()));
        assert_eq!(get("memory.oom.group"), Some("1".into()));
        assert_eq!(get("cpu.max"), Some("100000 100000".into()));
        let s = settings(&l, "memory pids", false);
        assert!(s
            .iter()
            .all(|x| x.file != "cpu.max" && x.file != "memory.swap.max"));
    }

    #[test]
    fn probe_says_why_not() {
        let t = TempDir::new();
        let mounts = t.0.join("mounts");
        std::fs::write(&mounts, "proc /proc proc rw 0 0\n").unwrap();
        assert!(probe(&mounts).unwrap_err().contains("no cgroup2"));
        let root = t.0.join("unified");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "hugetlb\n").unwrap();
        std::fs::write(
            &mounts,
            format!("cgroup2 {} cgroup2 rw 0 0\n", root.display()),
        )
        .unwrap();
        let e = probe(&mounts).unwrap_err();
        assert!(e.contains("not memory, pids"), "{e}");
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(probe(&mounts).unwrap(), root);
    }
}
