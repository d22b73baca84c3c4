//! Tests of the sandbox itself: what a job sees, runs as and is limited
//! by, and that nothing of it survives. They need root (namespaces,
//! mounts, uids) and skip with a printed reason without it.

use super::*;
use crate::test_util::TempDir;
use std::time::Instant;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipping: the sandbox needs root");
            return;
        }
    };
}

fn sh(script: &str) -> Job {
    Job::new("/bin/sh").unwrap().arg("-c").arg(script)
}

fn stdout(f: &Finished) -> String {
    String::from_utf8_lossy(&f.stdout).into_owned()
}

#[test]
fn job_sees_only_its_tree_and_runs_as_its_uid() {
    need_root!();
    let t = TempDir::new();
    std::fs::write(t.0.join("input.txt"), "hello input\n").unwrap();
    let f = sh("id -u; id -g; id -G; echo ---; ls -a /; echo ---; ls /etc; echo ---; \
         cat /in/input.txt; cat /etc/shadow 2>&1; cat /etc/passwd 2>&1; ls /proc /sys /root /home 2>&1; \
         touch /in/x 2>&1; touch /x 2>&1; touch /usr/x 2>&1; echo ok > /out/w; echo ok > /tmp/w; hostname")
    .ro(&t.0, "/in")
    .run()
    .unwrap();
    assert!(f.success(), "{} {}", f.describe(), f.log());
    let out = stdout(&f);
    let mut parts = out.split("---\n");
    let ids: Vec<&str> = parts.next().unwrap().lines().collect();
    let u = f.uid.to_string();
    assert_eq!(ids, [u.as_str(), u.as_str(), u.as_str()], "{out}");
    assert!(DEFAULT_UIDS.contains(&f.uid));
    let mut root: Vec<&str> = parts.next().unwrap().lines().collect();
    root.retain(|n| ![".", ".."].contains(n));
    for n in &root {
        assert!(
            [
                "bin", "dev", "etc", "in", "lib", "lib32", "lib64", "libx32", "out", "sbin", "tmp",
                "usr"
            ]
            .contains(n),
            "unexpected /{n} in the job's root: {root:?}"
        );
    }
    let etc: Vec<&str> = parts.next().unwrap().lines().collect();
    assert!(
        !etc.contains(&"shadow") && !etc.contains(&"passwd"),
        "{etc:?}"
    );
    let rest = parts.next().unwrap();
    assert!(rest.starts_with("hello input\n"), "{rest}");
    assert!(rest.contains("/etc/shadow: No such file"), "{rest}");
    assert!(rest.contains("/etc/passwd: No such file"), "{rest}");
    for d in ["/proc", "/sys", "/root", "/home"] {
        assert!(rest.contains(&format!("{d}': No such file")), "{d}: {rest}");
    }
    assert!(rest.contains("/in/x': Read-only file system"), "{rest}");
    assert!(rest.contains("/x': Read-only file system"), "{rest}");
    assert!(rest.contains("/usr/x': Read-only file system"), "{rest}");
    assert!(rest.trim_end().ends_with("ember-job"), "{rest}");
    assert_eq!(f.read_file("w", 100).unwrap(), b"ok\n");
    // The input is handed back untouched.
    assert!(!t.0.join("x").exists());
}

#[test]
fn job_has_no_network() {
    need_root!();
    let Some(ip) = find_program("ip") else {
        eprintln!("skipping: no `ip` (iproute2) on this host");
        return;
    };
    let f = Job::new(&ip).unwrap().args(["-o", "link"]).run().unwrap();
    assert!(f.success(), "{}", f.log());
    let out = stdout(&f);
    let links: Vec<&str> = out.lines().collect();
    assert_eq!(links.len(), 1, "{out}");
    assert!(links[0].contains(": lo:"), "{out}");
    assert!(links[0].contains("state DOWN"), "{out}");
    // Nothing to reach, not even over loopback.
    let f = sh("exec 3<>/dev/tcp/127.0.0.1/22 && echo connected")
        .run()
        .unwrap();
    assert!(!stdout(&f).contains("connected"));
}

#[test]
fn setsid_children_die_with_the_job() {
    need_root!();
    // A range of its own: the uid is checked for processes afterwards.
    let f = sh("setsid sleep 1000 & setsid sh -c 'sleep 1001 &' ; echo $$")
        .uids(29900..=29909)
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    // The program was the init of its own PID namespace.
    assert_eq!(stdout(&f).trim(), "1");
    let left = uids::processes_of(f.uid);
    assert!(left.is_empty(), "processes of uid {} left: {left:?}", f.uid);
}

#[test]
fn timeout_kills_the_whole_job() {
    need_root!();
    let start = Instant::now();
    let f = sh("echo started; setsid sleep 1000 & sleep 1000")
        .uids(29910..=29919)
        .timeout(Duration::from_millis(500))
        .run()
        .unwrap();
    assert_eq!(f.status, Status::TimedOut);
    assert!(f.describe().contains("did not finish"), "{}", f.describe());
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(stdout(&f), "started\n");
    assert!(uids::processes_of(f.uid).is_empty());
}

#[test]
fn file_size_and_output_caps() {
    need_root!();
    let f = sh("head -c 3000000 /dev/zero > /out/big")
        .max_file(1 << 20)
        .run()
        .unwrap();
    assert_eq!(
        f.status,
        Status::Signaled(libc::SIGXFSZ),
        "{}",
        f.describe()
    );
    let len = std::fs::metadata(f.out_dir().join("big")).unwrap().len();
    assert!(len <= 1 << 20, "{len}");
    // Many files under the per-file cap, together over the output cap.
    let e = sh("for i in 1 2 3 4; do head -c 1000000 /dev/urandom > /out/f$i; done")
        .max_file(1 << 20)
        .max_output(2 << 20)
        .run()
        .unwrap_err();
    assert!(matches!(e, SandboxError::OutputTooLarge { .. }), "{e}");
}

#[test]
fn logs_are_capped_and_stdin_is_passed() {
    need_root!();
    let l = Limits {
        max_log_bytes: 1000,
        ..Default::default()
    };
    let f = sh("cat; yes | head -c 100000; yes | head -c 5 >&2").stdin(b"from stdin\n".to_vec());
    let f = f.limits(l).timeout(Duration::from_secs(20)).run().unwrap();
    assert!(f.success(), "{}", f.describe());
    assert_eq!(f.stderr, b"y\ny\ny");
    assert!(f.stdout.starts_with(b"from stdin\n"));
    assert_eq!(f.stdout.len(), 1000);
    assert!(f.truncated);
    assert!(f.log().ends_with("[output truncated]\n"));
}

#[test]
fn results_are_regular_files_only() {
    need_root!();
    let t = TempDir::new();
    let f = sh(
        "ln -s /etc/hostname /out/link; mkfifo /out/fifo; mkdir /out/dir; \
         echo data > /out/ok; ln /out/ok /out/ok2; echo one > /out/single",
    )
    .run()
    .unwrap();
    assert!(f.success(), "{}", f.log());
    for (name, why) in [
        ("link", "symlink"),
        ("fifo", "not a regular file"),
        ("dir", "not a regular file"),
        ("missing", "was not written"),
        ("../x", "plain file name"),
    ] {
        let e = f
            .take_file(name, &t.0.join("dest"), 100, 0o644)
            .unwrap_err();
        assert!(e.to_string().contains(why), "{name}: {e}");
    }
    let e = f
        .take_file("ok", &t.0.join("dest"), 100, 0o644)
        .unwrap_err();
    assert!(e.to_string().contains("hard link"), "{e}");
    let e = f
        .take_file("single", &t.0.join("dest"), 2, 0o644)
        .unwrap_err();
    assert!(e.to_string().contains("more than the limit"), "{e}");
    assert!(!t.0.join("dest").exists());
    let n = f
        .take_file("single", &t.0.join("dest"), 100, 0o640)
        .unwrap();
    assert_eq!(n, 4);
    let md = std::fs::metadata(t.0.join("dest")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((md.uid(), md.permissions().mode() & 0o777), (0, 0o640));
    assert_eq!(std::fs::read(t.0.join("dest")).unwrap(), b"one\n");
}

#[test]
fn given_trees_are_readable_and_handed_back() {
    need_root!();
    let t = TempDir::new();
    let src = t.0.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("secret.c"), "int x;\n").unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(src.join("secret.c"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(src.join("secret.c"), Some(1234), Some(5678)).unwrap();
    let f = sh("cat /src/secret.c").ro(&src, "/src").run().unwrap();
    assert!(
        !f.success(),
        "a 0600 file of another uid is unreadable without give"
    );
    let f = sh("cat /src/secret.c")
        .ro(&src, "/src")
        .give(&src)
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    assert_eq!(stdout(&f), "int x;\n");
    let md = std::fs::metadata(src.join("secret.c")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    // read_any: CAP_DAC_OVERRIDE only.
    let f = sh("cat /src/secret.c; grep Cap /proc/self/status 2>&1 | head -1")
        .ro(&src, "/src")
        .read_any(true)
        .run()
        .unwrap();
    assert!(stdout(&f).starts_with("int x;\n"), "{}", f.log());
}

#[test]
fn bad_jobs_are_refused() {
    need_root!();
    assert!(matches!(Job::new("sh"), Err(SandboxError::BadJob(_))));
    let e = sh("true").ro("/etc", "/usr/etc").run().unwrap_err();
    assert!(e.to_string().contains("already mounted"), "{e}");
    let e = sh("true").ro("/etc", "/a/../b").run().unwrap_err();
    assert!(e.to_string().contains("plain absolute path"), "{e}");
    let e = Job::new("/nonexistent/tool").unwrap().run().unwrap_err();
    assert!(matches!(e, SandboxError::Spawn { .. }), "{e}");
}

#[test]
fn cgroup_limits_or_a_stated_skip() {
    need_root!();
    let root = match cgroup_support() {
        Ok(r) => r,
        Err(why) => {
            eprintln!("skipping the cgroup assertion: {why}; jobs run with rlimits only");
            return;
        }
    };
    let parent = root.join(DEFAULT_CGROUP_PARENT);
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let max = std::fs::read_to_string(e.path().join("memory.max"));
                let pids = std::fs::read_to_string(e.path().join("pids.max"));
                if let (Ok(m), Ok(p)) = (max, pids) {
                    return Some((e.path(), m.trim().to_string(), p.trim().to_string()));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    });
    let l = Limits {
        memory_bytes: 300 << 20,
        pids: 77,
        ..Default::default()
    };
    let f = sh("sleep 1").limits(l).run().unwrap();
    assert!(f.success());
    let (path, m, p) = watcher.join().unwrap().expect("no job cgroup seen");
    assert_eq!(m, (300u64 << 20).to_string());
    assert_eq!(p, "77");
    assert!(!path.exists(), "job cgroup {} not removed", path.display());
}

#[test]
fn stdin_from_a_file_the_job_could_not_open() {
    need_root!();
    let t = TempDir::new();
    let p = t.0.join("secret-input");
    std::fs::write(&p, "only root may open this\n").unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let f = sh("cat; id -u")
        .stdin_from(std::fs::File::open(&p).unwrap())
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    assert_eq!(stdout(&f), format!("only root may open this\n{}\n", f.uid));
}

#[test]
fn reclaim_gives_the_output_back_and_refuses_fifos() {
    use std::os::unix::fs::MetadataExt;
    need_root!();
    let t = TempDir::new();
    let out = t.0.join("out");
    std::fs::create_dir(&out).unwrap();
    let f = sh("mkdir -p /out/d/e && echo x > /out/d/e/f && ln -s e/f /out/d/l")
        .output_dir(&out)
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    let owner = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
    assert_eq!(owner(&out.join("d/e/f")), f.uid, "the job's before reclaim");
    let mut checked = Vec::new();
    reclaim(&out, |rel, _| {
        checked.push(rel.to_path_buf());
        Ok(())
    })
    .unwrap();
    checked.sort();
    assert_eq!(checked, ["d", "d/e", "d/e/f", "d/l"].map(PathBuf::from));
    for p in ["", "d", "d/e", "d/e/f", "d/l"] {
        assert_eq!(owner(&out.join(p)), 0, "{p}");
    }
    // A FIFO is refused, a check's refusal too; everything else is still
    // given back.
    let out2 = t.0.join("out2");
    std::fs::create_dir(&out2).unwrap();
    let f = sh("mkfifo /out/fifo; echo x > /out/x")
        .output_dir(&out2)
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    let e = reclaim(&out2, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
    assert_eq!(owner(&out2.join("x")), 0);
    assert_eq!(owner(&out2.join("fifo")), 0);
    let e = reclaim(&out, |rel, _| {
        if rel == Path::new("d/l") {
            Err("no links".into())
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(e.to_string().contains("no links"), "{e}");
}

#[test]
fn reclaim_with_gives_entries_their_owners_and_modes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    need_root!();
    let t = TempDir::new();
    let out = t.0.join("out");
    std::fs::create_dir(&out).unwrap();
    // A job may set setuid on its own file; a root chown clears it.
    let f = sh("mkdir /out/home && echo x > /out/su && chmod 4755 /out/su && echo y > /out/home/f && ln -s /etc/shadow /out/l")
        .output_dir(&out)
        .run()
        .unwrap();
    assert!(f.success(), "{}", f.log());
    let owner = |rel: &Path, _: &std::fs::Metadata| match rel.to_str() {
        Some("su") => Some(Owner {
            uid: 0,
            gid: 0,
            mode: Some(0o4755),
        }),
        Some("home") => Some(Owner {
            uid: 1000,
            gid: 1001,
            mode: Some(0o700),
        }),
        Some("l") => Some(Owner {
            uid: 1000,
            gid: 1000,
            mode: Some(0o4755),
        }),
        _ => None,
    };
    reclaim_with(&out, |_, _| Ok(()), owner).unwrap();
    let md = |p: &str| std::fs::symlink_metadata(out.join(p)).unwrap();
    assert_eq!(
        (md("su").uid(), md("su").permissions().mode() & 0o7777),
        (0, 0o4755)
    );
    assert_eq!((md("home").uid(), md("home").gid()), (1000, 1001));
    assert_eq!(md("home").permissions().mode() & 0o7777, 0o700);
    assert_eq!(md("home/f").uid(), 0);
    // A symlink gets its owner, never a mode (nor its target's).
    assert_eq!(md("l").uid(), 1000);
    assert_ne!(
        std::fs::metadata("/etc/shadow")
            .unwrap()
            .permissions()
            .mode()
            & 0o7000,
        0o4000
    );
}
