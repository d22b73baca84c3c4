//! Integration tests for `ember-jailer` (run as root).
//!
//! A small static C program (tests/fixtures/jail_probe.c) is compiled once
//! and exec'd by the jailer; it reports what it sees from inside the jail.
//! Every test uses its own temporary chroot base and removes it, its
//! cgroups and its network namespace afterwards.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

const JAILER: &str = env!("CARGO_BIN_EXE_ember-jailer");
const EXEC_NAME: &str = "jail-probe";
const UID: u32 = 123;
const GID: u32 = 456;
/// Generous limit that only fails a hung test.
const HANG_LIMIT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Compiles the probe once (gcc -static) into cargo's test scratch dir.
fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jail_probe.c");
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("probe-build"));
        fs::create_dir_all(&out_dir).unwrap();
        let built = out_dir.join(EXEC_NAME);
        let st = Command::new("gcc")
            .args(["-static", "-O2", "-w", "-o"])
            .arg(&built)
            .arg(&src)
            .status()
            .expect("gcc must be installed for the jailer tests");
        assert!(st.success(), "compiling {} failed", src.display());
        fs::set_permissions(&built, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let dst = Path::new(env!("CARGO_TARGET_TMPDIR")).join(EXEC_NAME);
        fs::rename(&built, &dst).unwrap();
        fs::remove_dir_all(&out_dir).unwrap();
        dst
    })
}

/// Waits for `child` with a hang limit, collecting its output.
fn wait_output(mut child: Child) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let deadline = Instant::now() + HANG_LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ember-jailer did not finish within {HANG_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn parse_report(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until `pid` has exited (gone or a zombie), with the hang limit.
fn wait_pid_gone(pid: u32) {
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(s) => {
                let state = s
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next());
                if matches!(state, Some("Z") | Some("X")) {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "process {pid} did not exit");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A jail under a private temporary chroot base, removed on drop together
/// with the cgroup directories registered in `cgroups` (deepest first).
struct TestJail {
    base: PathBuf,
    id: String,
    cgroups: Vec<PathBuf>,
}

impl TestJail {
    fn new(tag: &str) -> Self {
        Self::new_in(Path::new("/tmp"), tag)
    }

    fn new_in(dir: &Path, tag: &str) -> Self {
        let id = unique(tag);
        let base = dir.join(format!("ember-jailer-it-{id}"));
        fs::create_dir_all(&base).unwrap();
        TestJail {
            base,
            id,
            cgroups: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.base.join(EXEC_NAME).join(&self.id).join("root")
    }

    /// Jailer command with the usual arguments plus `extra`, then `--` and `vmm`.
    fn command(&self, extra: &[&str], vmm: &[&str]) -> Command {
        let mut c = Command::new(JAILER);
        c.arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(probe())
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(extra)
            .arg("--")
            .args(vmm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, extra: &[&str], vmm: &[&str]) -> (Output, HashMap<String, String>) {
        let out = wait_output(self.command(extra, vmm).spawn().unwrap());
        let report = parse_report(&String::from_utf8_lossy(&out.stdout));
        (out, report)
    }

    /// The pid the jailer recorded. With --daemonize the jailer returns
    /// before its detached child writes the file, so wait for it (bounded).
    fn pid_file(&self) -> u32 {
        let p = self.root().join(format!("{EXEC_NAME}.pid"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(pid) = fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never appeared",
                p.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for TestJail {
    fn drop(&mut self) {
        for cg in &self.cgroups {
            let _ = fs::remove_dir(cg);
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "jailer failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cgroup_mounts() -> Vec<(PathBuf, String, Vec<String>)> {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| {
                (
                    PathBuf::from(f[1]),
                    f[2].to_string(),
                    f[3].split(',').map(String::from).collect(),
                )
            })
        })
        .collect()
}

fn v2_root() -> Option<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .find(|m| m.1 == "cgroup2")
        .map(|m| m.0)
}

fn v1_root(ctrl: &str) -> Option<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .find(|m| m.1 == "cgroup" && m.2.iter().any(|o| o == ctrl))
        .map(|m| m.0)
}

/// Reads the probe's stdout up to its "ready" line.
fn read_until_ready(child: &mut Child) -> (BufReader<std::process::ChildStdout>, String) {
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "probe ended before 'ready': {text}"
        );
        if line.trim() == "ready" {
            return (r, text);
        }
        text.push_str(&line);
    }
}

#[test]
fn jails_vmm_as_unprivileged_user_without_host_view() {
    let j = TestJail::new("basic");
    // An inherited descriptor without CLOEXEC must not reach the VMM.
    // SAFETY: dup of stderr.
    let leaked = unsafe { libc::dup(2) };
    assert!(leaked > 2);
    let child = j
        .command(&[], &["--foo", "bar baz", "--id"])
        .env("EMBER_SECRET", "x")
        .spawn()
        .unwrap();
    // SAFETY: closing our own duplicate.
    unsafe { libc::close(leaked) };
    let jailer_pid = child.id();
    let out = wait_output(child);
    assert_ok(&out);
    let r = parse_report(&String::from_utf8_lossy(&out.stdout));

    for k in ["uid", "euid", "suid"] {
        assert_eq!(r[k], UID.to_string(), "{k}");
    }
    for k in ["gid", "egid", "sgid"] {
        assert_eq!(r[k], GID.to_string(), "{k}");
    }
    assert_eq!(r["groups"], "0");
    // Only the jail's own files are visible.
    assert_eq!(r["root"], format!("dev,{EXEC_NAME},{EXEC_NAME}.pid,run"));
    assert_eq!(r["etc_passwd"], "no");
    assert_eq!(r["proc_1"], "no");
    assert_eq!(r["sys"], "no");
    if Path::new("/dev/kvm").exists() {
        assert_eq!(r["kvm"], "ok");
    }
    if Path::new("/dev/net/tun").exists() {
        assert_eq!(r["tun"], "ok");
    }
    assert_eq!(r["urandom"], "ok");
    // No capabilities of any kind, no_new_privs set.
    assert_eq!(r["cap_eff"], "0000000000000000");
    assert_eq!(r["cap_prm"], "0000000000000000");
    assert_eq!(r["cap_inh"], "0000000000000000");
    assert_eq!(r["cap_amb"], "0");
    assert_eq!(r["cap_bnd"], "0");
    assert_eq!(r["no_new_privs"], "1");
    // Sanitized process, default rlimit, args passed through.
    assert_eq!(r["env"], "0");
    assert_eq!(r["fds"], "");
    assert_eq!(r["nofile"], "2048");
    assert_eq!(r["argv0"], format!("/{EXEC_NAME}"));
    // Firecracker's jailer arguments first (--id and the start times),
    // then the VMM arguments as given.
    let args = &r["args"];
    assert!(args.starts_with("--id|"), "{args}");
    assert!(args.contains("|--start-time-us|"), "{args}");
    assert!(args.contains("|--start-time-cpu-us|"), "{args}");
    assert!(args.contains("|--parent-cpu-time-us|"), "{args}");
    assert!(args.ends_with("|--foo|bar baz|--id"), "{args}");
    assert_eq!(r["cwd"], "/");
    // Without --new-pid-ns the VMM is the jailer process itself.
    assert_eq!(r["pid"], jailer_pid.to_string());
    assert_eq!(j.pid_file(), jailer_pid);

    // Host view of the jail.
    let root = j.root();
    let m = fs::metadata(&root).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (UID, GID, 0o700));
    for (dev, major, minor) in [
        ("dev/kvm", 10, 232),
        ("dev/net/tun", 10, 200),
        ("dev/urandom", 1, 9),
    ] {
        let m = fs::metadata(root.join(dev)).unwrap();
        assert!(m.file_type().is_char_device(), "{dev}");
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (UID, GID, 0o600),
            "{dev}"
        );
        assert_eq!(m.rdev(), libc::makedev(major, minor), "{dev}");
    }
    // Same filesystem: hard-linked, still root-owned 0755.
    let exe = fs::metadata(root.join(EXEC_NAME)).unwrap();
    assert_eq!(exe.ino(), fs::metadata(probe()).unwrap().ino());
    assert_eq!((exe.uid(), exe.mode() & 0o7777), (0, 0o755));
}

#[test]
fn copies_exec_across_filesystems() {
    let shm = Path::new("/dev/shm");
    let src_dev = fs::metadata(probe()).unwrap().dev();
    if !shm.is_dir() || fs::metadata(shm).unwrap().dev() == src_dev {
        eprintln!("skipping: /dev/shm is missing or on the same filesystem as the probe");
        return;
    }
    let j = TestJail::new_in(shm, "copy");
    let (out, r) = j.run(&[], &[]);
    assert_ok(&out);
    assert_eq!(r["uid"], UID.to_string());
    let exe = fs::metadata(j.root().join(EXEC_NAME)).unwrap();
    assert_ne!(exe.ino(), fs::metadata(probe()).unwrap().ino());
    assert_eq!((exe.uid(), exe.mode() & 0o7777), (0, 0o755));
    assert_eq!(
        fs::read(j.root().join(EXEC_NAME)).unwrap(),
        fs::read(probe()).unwrap()
    );
}

#[test]
fn cgroup_v2_holds_vmm_while_it_runs() {
    let Some(v2) = v2_root() else {
        eprintln!("skipping: no cgroup v2 hierarchy mounted");
        return;
    };
    let mut j = TestJail::new("cgv2");
    let parent = v2.join("ember");
    let leaf = parent.join(&j.id);
    j.cgroups.push(leaf.clone());
    if !parent.exists() {
        j.cgroups.push(parent.clone());
    }
    let mut child = j
        // v2 named explicitly: with no --cgroup-version the jailer uses v1,
        // as Firecracker's does, unless v2 is the only hierarchy mounted;
        // the parent named too (its default is the exec file's name).
        .command(
            &[
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "ember",
                "--cgroup",
                "cgroup.max.descendants=3",
            ],
            &["--probe-wait"],
        )
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut rest, report) = read_until_ready(&mut child);
    let r = parse_report(&report);
    assert_eq!(r["uid"], UID.to_string());
    let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p.trim() == child.id().to_string()),
        "pid {} not in {}: {procs:?}",
        child.id(),
        leaf.display()
    );
    assert_eq!(
        fs::read_to_string(leaf.join("cgroup.max.descendants"))
            .unwrap()
            .trim(),
        "3"
    );
    drop(child.stdin.take());
    let mut tail = String::new();
    rest.read_to_string(&mut tail).unwrap();
    let out = wait_output(child);
    assert_ok(&out);
}

#[test]
fn cgroup_v2_enables_controller_in_parents() {
    let Some(v2) = v2_root() else {
        eprintln!("skipping: no cgroup v2 hierarchy mounted");
        return;
    };
    let available = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    let (ctrl, setting) = if has("pids") {
        ("pids", "pids.max=64".to_string())
    } else if has("memory") {
        ("memory", "memory.max=max".to_string())
    } else if has("hugetlb") && Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists() {
        ("hugetlb", "hugetlb.2MB.max=max".to_string())
    } else {
        eprintln!(
            "skipping: no usable cgroup v2 controller in {:?}",
            available.trim()
        );
        return;
    };
    let root_ctl = v2.join("cgroup.subtree_control");
    let was_enabled = fs::read_to_string(&root_ctl)
        .unwrap()
        .split_whitespace()
        .any(|c| c == ctrl);
    let mut j = TestJail::new("cgv2c");
    let parent = v2.join(format!("ember-it-{}", j.id));
    let leaf = parent.join(&j.id);
    j.cgroups.extend([leaf.clone(), parent.clone()]);
    let (out, _) = j.run(
        &[
            "--cgroup-version",
            "2",
            "--cgroup",
            &setting,
            "--parent-cgroup",
            parent.file_name().unwrap().to_str().unwrap(),
        ],
        &[],
    );
    let file = setting.split_once('=').unwrap().0;
    let enabled_parent = fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap();
    let leaf_has_file = leaf.join(file).exists();
    drop(j);
    if !was_enabled {
        let _ = fs::write(&root_ctl, format!("-{ctrl}"));
    }
    assert_ok(&out);
    assert!(
        enabled_parent.split_whitespace().any(|c| c == ctrl),
        "{enabled_parent:?}"
    );
    assert!(leaf_has_file);
}

#[test]
fn cgroup_v1_holds_vmm_while_it_runs() {
    let (Some(pids), Some(cpuset)) = (v1_root("pids"), v1_root("cpuset")) else {
        eprintln!("skipping: cgroup v1 pids and cpuset hierarchies are not mounted");
        return;
    };
    let mut j = TestJail::new("cgv1");
    let top = format!("ember-it-{}", j.id);
    for h in [&pids, &cpuset] {
        j.cgroups.extend([
            h.join(&top).join("nested").join(&j.id),
            h.join(&top).join("nested"),
            h.join(&top),
        ]);
    }
    let parent_arg = format!("{top}/nested");
    let mut child = j
        .command(
            &[
                "--cgroup-version",
                "1",
                "--cgroup",
                "pids.max=64",
                "--cgroup",
                "cpuset.cpus=0",
                "--parent-cgroup",
                &parent_arg,
            ],
            &["--probe-wait"],
        )
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut rest, _) = read_until_ready(&mut child);
    let pid = child.id().to_string();
    for h in [&pids, &cpuset] {
        let leaf = h.join(&top).join("nested").join(&j.id);
        let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p.trim() == pid),
            "{pid} not in {}",
            leaf.display()
        );
    }
    let leaf = |h: &PathBuf, f: &str| {
        fs::read_to_string(h.join(&top).join("nested").join(&j.id).join(f)).unwrap()
    };
    assert_eq!(leaf(&pids, "pids.max").trim(), "64");
    assert_eq!(leaf(&cpuset, "cpuset.cpus").trim(), "0");
    assert!(
        !leaf(&cpuset, "cpuset.mems").trim().is_empty(),
        "cpuset.mems inherited"
    );
    drop(child.stdin.take());
    let mut tail = String::new();
    rest.read_to_string(&mut tail).unwrap();
    assert_ok(&wait_output(child));
}

#[test]
fn rejects_bad_input_with_clear_errors() {
    let j = TestJail::new("bad");
    let base = j.base.to_str().unwrap().to_string();
    let probe = probe().to_str().unwrap().to_string();
    let dotted_exec = format!("{base}/../{}", probe.trim_start_matches('/'));
    let cases: Vec<(Vec<String>, &str, i32)> = vec![
        (
            vec!["--id".into(), "bad_id".into()],
            "invalid --id 'bad_id'",
            3,
        ),
        (vec!["--id".into(), "x".repeat(65)], "1 to 64 characters", 3),
        (vec!["--id".into(), "".into()], "1 to 64 characters", 3),
        (
            vec!["--exec-file".into(), dotted_exec],
            "'..' components are not allowed",
            3,
        ),
        (
            vec!["--chroot-base-dir".into(), format!("{base}/a/../b")],
            "'..' components are not allowed",
            3,
        ),
        (
            vec!["--netns".into(), "/run/netns/../x".into()],
            "'..' components are not allowed",
            3,
        ),
        (
            vec!["--exec-file".into(), format!("{base}/missing-vmm")],
            "missing-vmm' cannot be used",
            3,
        ),
        (
            vec!["--exec-file".into(), base.clone()],
            "is not a regular file",
            3,
        ),
        (
            vec!["--parent-cgroup".into(), "/abs".into()],
            "invalid --parent-cgroup",
            3,
        ),
        (
            vec!["--uid".into(), "root".into()],
            "invalid --uid 'root'",
            2,
        ),
        (vec!["--bogus".into()], "unknown argument '--bogus'", 2),
        (
            vec!["--cgroup".into(), "nofile".into()],
            "invalid --cgroup 'nofile'",
            6,
        ),
        (
            vec!["--resource-limit".into(), "cores=1".into()],
            "unknown limit 'cores'",
            7,
        ),
    ];
    for (over, msg, code) in cases {
        let mut args: Vec<String> = vec![
            "--id".into(),
            j.id.clone(),
            "--exec-file".into(),
            probe.clone(),
            "--uid".into(),
            "123".into(),
            "--gid".into(),
            "456".into(),
            "--chroot-base-dir".into(),
            base.clone(),
        ];
        // Override a default option or append a new one.
        if let Some(i) = args.iter().position(|a| *a == over[0]) {
            args[i + 1] = over[1].clone();
        } else {
            args.extend(over.iter().cloned());
        }
        let out = wait_output(
            Command::new(JAILER)
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{over:?}: {err}");
        assert!(err.starts_with("ember-jailer: "), "{over:?}: {err}");
        assert!(err.contains(msg), "{over:?}: expected {msg:?} in {err:?}");
        // Validation failures create no jail.
        assert!(!j.base.join(EXEC_NAME).exists(), "{over:?} created a jail");
    }
    // Missing required option.
    let out = wait_output(
        Command::new(JAILER)
            .args(["--uid", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing required option --id"));
}

#[test]
fn unusable_netns_fails() {
    let j = TestJail::new("nons");
    let (out, _) = j.run(&["--netns", "/nonexistent/netns"], &[]);
    assert_eq!(out.status.code(), Some(8));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open network namespace /nonexistent/netns"),
        "{err}"
    );
    // A regular file is not a namespace.
    let f = j.base.join("not-a-ns");
    fs::write(&f, b"").unwrap();
    let j2 = TestJail::new("nons2");
    let (out, _) = j2.run(&["--netns", f.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(8));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot join network namespace"));
}

#[test]
fn same_jail_twice_is_refused() {
    let j = TestJail::new("twice");
    let (out, _) = j.run(&[], &[]);
    assert_ok(&out);
    let (out, _) = j.run(&[], &[]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn joins_network_namespace() {
    let name = unique("ember-jt");
    let st = Command::new("ip").args(["netns", "add", &name]).status();
    if !matches!(st, Ok(s) if s.success()) {
        eprintln!("skipping: `ip netns add` is not available");
        return;
    }
    let ns = NetNs(name);
    let st = Command::new("ip")
        .args(["-n", &ns.0, "tuntap", "add", "embt0", "mode", "tap"])
        .status()
        .unwrap();
    assert!(st.success());
    let j = TestJail::new("netns");
    let path = format!("/run/netns/{}", ns.0);
    let (out, r) = j.run(&["--netns", &path], &[]);
    assert_ok(&out);
    let ifaces: Vec<&str> = r["ifaces"].split(',').collect();
    assert_eq!(ifaces, vec!["lo", "embt0"]);
}

#[test]
fn new_pid_ns_makes_vmm_pid_1() {
    let j = TestJail::new("pidns");
    let child = j.command(&["--new-pid-ns"], &[]).spawn().unwrap();
    let jailer_pid = child.id();
    let out = wait_output(child);
    assert_ok(&out);
    let r = parse_report(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(r["pid"], "1");
    assert_eq!(r["ppid"], "0");
    assert_eq!(r["uid"], UID.to_string());
    assert_eq!(r["cap_eff"], "0000000000000000");
    let vmm_pid = j.pid_file();
    assert_ne!(vmm_pid, jailer_pid);
    wait_pid_gone(vmm_pid);
}

fn daemon_report(j: &TestJail) -> HashMap<String, String> {
    fs::write(j.root().join("go"), b"").unwrap();
    let report = j.root().join("report");
    let deadline = Instant::now() + HANG_LIMIT;
    while !report.exists() {
        assert!(
            Instant::now() < deadline,
            "daemonized probe wrote no report"
        );
        thread::sleep(Duration::from_millis(10));
    }
    parse_report(&fs::read_to_string(report).unwrap())
}

#[test]
fn daemonize_returns_at_once() {
    let j = TestJail::new("daemon");
    // The probe waits for /go, which is only created after the jailer
    // returned: a jailer that waited for its VMM would hang here.
    let (out, _) = j.run(&["--daemonize"], &["--probe-daemon"]);
    assert_ok(&out);
    assert!(out.stdout.is_empty());
    let vmm_pid = j.pid_file();
    let r = daemon_report(&j);
    assert_eq!(r["pid"], vmm_pid.to_string());
    assert_ne!(r["sid"], r["pid"], "double fork: not a session leader");
    for k in ["stdin", "stdout", "stderr"] {
        assert_eq!(r[k], "chr:1:3", "{k} is /dev/null");
    }
    assert_eq!(r["uid"], UID.to_string());
    wait_pid_gone(vmm_pid);
}

#[test]
fn daemonize_with_new_pid_ns() {
    let j = TestJail::new("daemonpid");
    let (out, _) = j.run(&["--daemonize", "--new-pid-ns"], &["--probe-daemon"]);
    assert_ok(&out);
    let vmm_pid = j.pid_file();
    let r = daemon_report(&j);
    assert_eq!(r["pid"], "1");
    assert_eq!(r["stdout"], "chr:1:3");
    wait_pid_gone(vmm_pid);
}

#[test]
fn resource_limits_are_applied() {
    let j = TestJail::new("rlimit");
    let (out, r) = j.run(
        &[
            "--resource-limit",
            "no-file=123",
            "--resource-limit",
            "fsize=4096",
        ],
        &[],
    );
    assert_ok(&out);
    assert_eq!(r["nofile"], "123");
    assert_eq!(r["fsize"], "4096");
}

#[test]
fn help_and_version() {
    let out = Command::new(JAILER).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: ember-jailer"));
    let out = Command::new(JAILER).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ember-jailer "));
}

#[test]
fn files_placed_in_the_jail_beforehand_are_visible() {
    let j = TestJail::new("prepop");
    // How a caller hands the VMM its kernel/rootfs: put them in the jail root
    // (readable by the VMM's uid) before starting the jailer.
    fs::create_dir_all(j.root()).unwrap();
    fs::write(j.root().join("kernel.bin"), b"k").unwrap();
    let (out, r) = j.run(&[], &[]);
    assert_ok(&out);
    assert_eq!(
        r["root"],
        format!("dev,{EXEC_NAME},{EXEC_NAME}.pid,kernel.bin,run")
    );
}
