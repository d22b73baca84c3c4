//! Cleanup for the emberd benchmark: a temporary directory holding emberd's
//! socket, state dir and jail base, the emberd process, and every VMM it
//! started. Dropping the guard first removes, through emberd's API, every
//! hyperd pod and VM the benchmark created and has not removed yet (when
//! emberd still runs), then kills emberd, then each VMM it finds (the
//! pids in emberd's `state.json`, checked by start time, and any process
//! whose command line names an instance id the benchmark saw), and removes
//! the directory. The release profile aborts on panic, so the benchmark
//! returns errors instead of panicking and this runs on every exit path it
//! controls (SIGINT/SIGTERM set a flag its wait loops check).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long to wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Bound on each API request that removes a leftover pod or VM.
const API_CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors setting up the guard.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot create {0}: {1}")]
    Create(PathBuf, #[source] io::Error),
}

/// Owns the benchmark's temporary directory and processes.
pub struct Guard {
    root: PathBuf,
    emberd: Option<Child>,
    /// Instance (and jail) ids the benchmark has seen.
    ids: Vec<String>,
    /// hyperd pods the benchmark created and has not deleted yet.
    pods: Vec<String>,
    /// hyperd VMs (`vm-` ids) that may still be up.
    vms: Vec<String>,
    /// Pods and VMs the cleanup had to remove through the API.
    removed: Vec<String>,
}

impl Guard {
    /// Creates `root` afresh (a stale one from a killed run is removed).
    pub fn new(root: PathBuf) -> Result<Guard, GuardError> {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(|e| GuardError::Create(root.clone(), e))?;
        Ok(Guard {
            root,
            emberd: None,
            ids: Vec::new(),
            pods: Vec::new(),
            vms: Vec::new(),
            removed: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn sock(&self) -> PathBuf {
        self.root.join("ember.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// emberd's `--chroot-base-dir`.
    pub fn jail_base(&self) -> PathBuf {
        self.root.join("jail")
    }

    /// emberd's stdout and stderr.
    pub fn emberd_log(&self) -> PathBuf {
        self.root.join("emberd.log")
    }

    pub fn set_emberd(&mut self, child: Child) {
        self.emberd = Some(child);
    }

    pub fn emberd_mut(&mut self) -> Option<&mut Child> {
        self.emberd.as_mut()
    }

    /// Remembers an instance id, so a VMM of it is killed even if emberd
    /// lost track of it.
    pub fn track(&mut self, id: &str) {
        push_new(&mut self.ids, id);
    }

    /// Remembers a hyperd pod until [`Guard::forget_pod`].
    pub fn track_pod(&mut self, id: &str) {
        push_new(&mut self.pods, id);
    }

    /// The pod was deleted.
    pub fn forget_pod(&mut self, id: &str) {
        self.pods.retain(|p| p != id);
    }

    /// Remembers a hyperd VM until [`Guard::forget_vm`].
    pub fn track_vm(&mut self, id: &str) {
        push_new(&mut self.vms, id);
    }

    /// The VM is gone.
    pub fn forget_vm(&mut self, id: &str) {
        self.vms.retain(|v| v != id);
    }

    /// Pods and VMs that [`Guard::kill_all`] removed through the API (none
    /// after a clean run).
    pub fn removed(&self) -> &[String] {
        &self.removed
    }

    /// While emberd runs: `DELETE /pod?podId=` of every remembered pod (its
    /// VM goes with it), then `DELETE /vm?vm=` of every remembered VM still
    /// listed. Errors are ignored: the VMMs are killed afterwards anyway.
    fn remove_through_api(&mut self) {
        let running = self
            .emberd
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        let pods = std::mem::take(&mut self.pods);
        let vms = std::mem::take(&mut self.vms);
        if !running {
            return;
        }
        let sock = self.sock();
        let delete = |path: String| {
            super::http::once(&sock, "DELETE", &path, &[], None, API_CLEANUP_TIMEOUT)
                .is_ok_and(|r| r.status == 200)
        };
        for p in pods {
            if delete(format!("/pod?podId={p}")) {
                self.removed.push(p);
            }
        }
        for v in vms {
            if delete(format!("/vm?vm={v}")) {
                self.removed.push(v);
            }
        }
    }

    /// Removes leftover pods and VMs through emberd, kills emberd and every
    /// VMM left behind; returns the pids of the VMMs that were still alive
    /// (none after a clean run).
    pub fn kill_all(&mut self) -> Vec<i32> {
        self.remove_through_api();
        if let Some(mut c) = self.emberd.take() {
            // SIGTERM first: emberd then kills the idle VMMs it pools for
            // snapshot starts (on no record); SIGKILL if it does not end.
            // SAFETY: kill(2) on the emberd child this guard started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + KILL_WAIT;
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut pids: Vec<i32> = fs::read_to_string(self.state_dir().join("state.json"))
            .map(|s| state_pids(&s))
            .unwrap_or_default()
            .into_iter()
            .filter(|&(pid, start)| proc_start_time(pid).is_some_and(|t| start == 0 || t == start))
            .map(|(pid, _)| pid)
            .collect();
        pids.extend(processes_naming(&self.ids));
        pids.extend(jailed_vmms(&self.jail_base()));
        pids.sort_unstable();
        pids.dedup();
        for &pid in &pids {
            // SAFETY: kill(2) on a pid that was alive and ours a moment ago.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + KILL_WAIT;
        while pids.iter().any(|&p| proc_start_time(p).is_some()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        pids
    }
}

/// VMMs still running in the jails under `base` (ember-jailer's pid file
/// `<base>/ember-vmm/<id>/root/ember-vmm.pid`, the pid's command line
/// naming `<id>`): pooled or template VMMs emberd had on no record.
fn jailed_vmms(base: &Path) -> Vec<i32> {
    let Ok(rd) = fs::read_dir(base.join("ember-vmm")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = fs::read_to_string(e.path().join("root").join("ember-vmm.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|a| a == name)
                .then_some(pid)
        })
        .collect()
}

impl Drop for Guard {
    fn drop(&mut self) {
        let left = self.kill_all();
        if !self.removed.is_empty() {
            eprintln!(
                "emberd-bench: removed leftover pods / VMs {:?}",
                self.removed
            );
        }
        if !left.is_empty() {
            eprintln!("emberd-bench: killed leftover VMM processes {left:?}");
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn push_new(list: &mut Vec<String>, id: &str) {
    if !id.is_empty() && !list.iter().any(|i| i == id) {
        list.push(id.to_string());
    }
}

/// `(pid, start time)` of every instance process in emberd's state file.
pub fn state_pids(state_json: &str) -> Vec<(i32, u64)> {
    let v: serde_json::Value = serde_json::from_str(state_json).unwrap_or_default();
    let Some(insts) = v.get("instances").and_then(|i| i.as_object()) else {
        return Vec::new();
    };
    insts
        .values()
        .filter_map(|i| {
            let p = i.get("process")?;
            let pid = i32::try_from(p.get("pid")?.as_i64()?).ok()?;
            let start = p.get("start_time").and_then(|s| s.as_u64()).unwrap_or(0);
            (pid > 1).then_some((pid, start))
        })
        .collect()
}

/// Whether a NUL-separated command line has an argument equal to one of
/// `ids`.
pub fn cmdline_names(cmdline: &[u8], ids: &[String]) -> bool {
    cmdline
        .split(|&b| b == 0)
        .any(|arg| ids.iter().any(|id| id.as_bytes() == arg))
}

/// Live processes (not zombies) whose command line names one of `ids`.
fn processes_naming(ids: &[String]) -> Vec<i32> {
    if ids.is_empty() {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && proc_start_time(pid).is_some())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| cmdline_names(&c, ids))
        })
        .collect()
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks); None if the
/// process is gone or a zombie.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&s)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces or ')': parse after the
    // last ')'. What follows starts at field 3 (state).
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn pids_from_state() {
        let s = r#"{"images":{},"instances":{
            "inst-a":{"process":{"pid":1234,"start_time":99}},
            "inst-b":{"process":null},
            "inst-c":{"process":{"pid":1,"start_time":5}},
            "inst-d":{"name":"no process field"}}}"#;
        assert_eq!(state_pids(s), vec![(1234, 99)]);
        assert!(state_pids("not json").is_empty());
        assert!(state_pids("{}").is_empty());
    }

    #[test]
    fn cmdline_matching_is_per_argument() {
        let ids = vec!["inst-01".to_string()];
        assert!(cmdline_names(b"/ember-vmm\0--id\0inst-01\0", &ids));
        assert!(!cmdline_names(b"/ember-vmm\0--id\0inst-012\0", &ids));
        assert!(!cmdline_names(b"", &ids));
    }

    #[test]
    fn stat_parsing() {
        let mut fields = vec!["S"; 20];
        fields[19] = "4242";
        let line = format!("77 (a (weird) name) {}", fields.join(" "));
        assert_eq!(parse_start_time(&line), Some(4242));
        let zombie = line.replace(") S ", ") Z ");
        assert_eq!(parse_start_time(&zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
        let me = std::process::id() as i32;
        assert!(proc_start_time(me).is_some());
    }

    #[test]
    fn guard_kills_named_processes_and_removes_its_dir() {
        let root = std::env::temp_dir().join(format!("ember-bench-guard-{}", std::process::id()));
        let mut g = Guard::new(root.clone()).unwrap();
        fs::create_dir_all(g.state_dir()).unwrap();
        let id = format!("bench-guard-test-{}", std::process::id());
        let c = std::process::Command::new("sleep")
            .arg0(&id)
            .arg("60")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        g.track(&id);
        // The child's reaper is this test: kill_all waits for a zombie.
        let reaper = std::thread::spawn(move || {
            let mut c = c;
            c.wait().unwrap()
        });
        // spawn() can return while the child is still inside execve, with
        // an empty /proc/<pid>/cmdline: wait for the new image's arguments.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(g.kill_all(), vec![pid]);
        assert!(!reaper.join().unwrap().success());
        drop(g);
        assert!(!root.exists());
    }
}
