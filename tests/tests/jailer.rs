//! ember-vmm booted through ember-jailer (run as root): the tiny guest boots
//! as uid 123 / gid 456 with seccomp on, the VMM sees only its jail, a
//! forbidden syscall kills it by SIGSYS, bad ids and `..` paths are refused,
//! and the jail directory and cgroup can be removed afterwards.
//!
//! ember-vmm is a dynamically linked binary, so each test puts the shared
//! libraries `ldd` names at the same paths inside the jail root, next to the
//! kernel and config, before it starts the jailer.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ember_tests::*;

const UID: u32 = 123;
const GID: u32 = 456;

/// A jail under its own temporary chroot base. Drop removes the cgroups it
/// registered and the base.
struct Jail {
    base: TempDir,
    id: String,
    cgroups: Vec<PathBuf>,
}

impl Jail {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let j = Jail {
            base: TempDir::new("jail"),
            id,
            cgroups: Vec::new(),
        };
        std::fs::create_dir_all(j.root()).unwrap();
        j.copy_libraries();
        j
    }

    /// The jail's directory, `<base>/ember-vmm/<id>`.
    fn dir(&self) -> PathBuf {
        self.base.path().join("ember-vmm").join(&self.id)
    }

    /// The jail root, "/" for the VMM.
    fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// A host path for a path inside the jail.
    fn host(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    fn copy_libraries(&self) {
        let out = Command::new("ldd")
            .arg(bin("ember-vmm"))
            .output()
            .expect("run ldd");
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let dst = self.host(lib);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
        }
    }

    /// Puts a file into the jail, owned by the VMM's user.
    fn place(&self, inside: &str, data: &[u8]) {
        let p = self.host(inside);
        std::fs::write(&p, data).unwrap();
        std::os::unix::fs::chown(&p, Some(UID), Some(GID)).unwrap();
    }

    /// Puts the PVH test guest at /kernel.elf and a config for it at /vm.json.
    fn place_guest(&self, boot_args: &str) {
        self.place("/kernel.elf", &std::fs::read(PVH_ELF).unwrap());
        self.place(
            "/vm.json",
            vm_config("/kernel.elf", boot_args, 1, 32).as_bytes(),
        );
    }

    /// The jailer running ember-vmm with `jailer_args`, then `vmm_args`.
    fn command(&self, jailer_args: &[&str], vmm_args: &[&str]) -> Command {
        let mut c = Command::new(bin("ember-jailer"));
        c.arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(bin("ember-vmm"))
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .args(jailer_args)
            .arg("--")
            .args(vmm_args);
        c
    }

    fn spawn(&self, jailer_args: &[&str], vmm_args: &[&str], logs: &TempDir) -> Proc {
        Proc::spawn(self.command(jailer_args, vmm_args), logs.path(), "jailed")
    }

    /// Removes the cgroups and the jail directory, failing the test if
    /// either cannot be removed.
    fn remove(mut self) {
        for cg in std::mem::take(&mut self.cgroups) {
            std::fs::remove_dir(&cg).unwrap_or_else(|e| panic!("rmdir {}: {e}", cg.display()));
        }
        let dir = self.dir();
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("rm -r {}: {e}", dir.display()));
        assert!(!dir.exists());
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for cg in &self.cgroups {
            let _ = std::fs::remove_dir(cg);
        }
    }
}

/// The cgroup v2 mount, if any.
fn cgroup2_root() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
}

/// "Uid:"/"Gid:" of a process: real, effective, saved, fs.
fn ids(pid: u32) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let f = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (f("Uid:"), f("Gid:"))
}

#[test]
fn the_guest_boots_in_the_jail_as_an_unprivileged_user() {
    let mut j = Jail::new("boot");
    j.place_guest("ember.test=hello");
    let mut jailer_args: Vec<String> = Vec::new();
    if let Some(v2) = cgroup2_root() {
        // A private parent so the test can remove both levels afterwards.
        let parent = format!("ember-tests-{}", j.id);
        j.cgroups = vec![v2.join(&parent).join(&j.id), v2.join(&parent)];
        jailer_args.extend([
            "--parent-cgroup".into(),
            parent,
            "--cgroup".into(),
            "cgroup.max.descendants=2".into(),
        ]);
    } else {
        eprintln!("no cgroup v2 hierarchy mounted: booting without cgroups");
    }
    let args: Vec<&str> = jailer_args.iter().map(String::as_str).collect();
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn(&args, &["--no-api", "--config-file", "/vm.json"], &logs);
    let st = p.wait();
    assert_eq!(
        st.code(),
        Some(0),
        "{st:?}\nstdout:\n{}\nstderr:\n{}",
        p.out(),
        p.err()
    );
    assert!(
        p.out().contains("ember-guest: hello from pvh boot"),
        "{}",
        p.out()
    );
    assert!(p.err().contains("guest requested a reset"), "{}", p.err());
    if let Some(leaf) = j.cgroups.first() {
        assert_eq!(
            std::fs::read_to_string(leaf.join("cgroup.max.descendants"))
                .unwrap()
                .trim(),
            "2"
        );
        assert_eq!(
            std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            ""
        );
    }
    j.remove();
}

#[test]
fn serial_output_goes_to_a_file_inside_the_jail() {
    let j = Jail::new("serial");
    j.place_guest("ember.test=hello");
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn(
        &[],
        &[
            "--no-api",
            "--config-file",
            "/vm.json",
            "--serial-out",
            "/run/serial.log",
        ],
        &logs,
    );
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    let log = std::fs::read_to_string(j.host("/run/serial.log")).unwrap();
    assert!(log.contains("ember-guest: hello from pvh boot"), "{log}");
    assert!(!p.out().contains("hello"), "{}", p.out());
    // The VMM created the file as its own user.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(j.host("/run/serial.log")).unwrap();
    assert_eq!((m.uid(), m.gid()), (UID, GID));
    j.remove();
}

#[test]
fn api_in_the_jail_sees_only_the_jail() {
    let j = Jail::new("api");
    j.place_guest("ember.test=wait-ctrlaltdel");
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn(
        &[],
        &["--api-sock", "/run/api.sock", "--id", "jailed-vm"],
        &logs,
    );
    let sock = j.host("/run/api.sock");
    wait_for_socket(&sock);

    // Without --new-pid-ns the jailer becomes the VMM by exec.
    let (uid, gid) = ids(p.pid());
    assert_eq!(uid, "123 123 123 123");
    assert_eq!(gid, "456 456 456 456");
    let info = http(&sock, "GET", "/", None).json();
    assert_eq!(info["id"], "jailed-vm");

    // Host paths do not exist for the VMM: not the kernel's host path, not
    // /etc/passwd. The jail-relative path works.
    for path in [PVH_ELF, "/etc/passwd"] {
        let body = serde_json::json!({"kernel_image_path": path}).to_string();
        let r = http(&sock, "PUT", "/boot-source", Some(&body));
        assert_eq!(r.status, 400, "{path} was accepted");
        let msg = r.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            msg.contains("kernel file cannot be opened"),
            "{path}: {msg}"
        );
    }
    let put = |path: &str, body: serde_json::Value| {
        let r = http(&sock, "PUT", path, Some(&body.to_string()));
        assert_eq!(
            r.status,
            204,
            "PUT {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": "/kernel.elf", "boot_args": "ember.test=wait-ctrlaltdel"}),
    );
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    p.expect_out("waiting for ctrl-alt-del");

    // Every ember thread runs under a seccomp filter (mode 2).
    for t in std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        if !comm.starts_with("ember") {
            continue; // KVM's kernel worker tasks
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
            "{} is not filtered",
            comm.trim()
        );
    }

    put(
        "/actions",
        serde_json::json!({"action_type": "SendCtrlAltDel"}),
    );
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(p.out().contains("ember-guest: ctrl-alt-del"), "{}", p.out());
    assert!(!sock.exists(), "the VMM removes its socket on the way out");
    j.remove();
}

#[test]
fn a_forbidden_syscall_kills_the_jailed_vmm_by_sigsys() {
    let j = Jail::new("sigsys");
    j.place_guest("ember.test=hello");
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn(
        &[],
        &[
            "--no-api",
            "--config-file",
            "/vm.json",
            "--seccomp-test-trigger",
            "vcpu",
        ],
        &logs,
    );
    let st = p.wait();
    assert_eq!(st.signal(), Some(31), "{st:?}\nstderr:\n{}", p.err());
    assert!(
        p.err().contains("the vcpu thread calls socket(AF_INET)"),
        "{}",
        p.err()
    );
    assert!(!p.out().contains("hello from"), "{}", p.out());
    j.remove();
}

#[test]
fn bad_ids_and_dotted_paths_are_refused_for_ember_vmm() {
    let logs = TempDir::new("jail-logs");
    let vmm = bin("ember-vmm");
    let vmm_dir = vmm.parent().unwrap();
    let profile = vmm_dir.file_name().unwrap().to_str().unwrap();
    let dotted_vmm = format!("{}/../{profile}/ember-vmm", vmm_dir.display());
    let base = TempDir::new("jail-bad");
    let base_s = base.path().to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--id".into(), "bad_id".into()],
            "invalid --id 'bad_id'",
        ),
        (vec!["--id".into(), "../../etc".into()], "invalid --id"),
        (vec!["--id".into(), "x".repeat(65)], "1 to 64 characters"),
        (
            vec!["--exec-file".into(), dotted_vmm],
            "'..' components are not allowed",
        ),
        (
            vec!["--chroot-base-dir".into(), format!("{base_s}/a/../b")],
            "'..' components are not allowed",
        ),
    ];
    for (i, (over, want)) in cases.iter().enumerate() {
        // The usual arguments, with one replaced by a bad value.
        let mut args: Vec<String> = vec![
            "--id".into(),
            format!("good-{i}"),
            "--exec-file".into(),
            vmm.to_str().unwrap().into(),
            "--uid".into(),
            UID.to_string(),
            "--gid".into(),
            GID.to_string(),
            "--chroot-base-dir".into(),
            base_s.clone(),
        ];
        let at = args.iter().position(|a| *a == over[0]).unwrap();
        args[at + 1] = over[1].clone();
        let mut cmd = Command::new(bin("ember-jailer"));
        cmd.args(&args)
            .args(["--", "--no-api", "--config-file", "/vm.json"]);
        let mut p = Proc::spawn(cmd, logs.path(), &format!("bad{i}"));
        let st = p.wait();
        assert_eq!(st.code(), Some(3), "{over:?}: {st:?} {}", p.err());
        assert!(p.err().contains("ember-jailer: "), "{over:?}: {}", p.err());
        assert!(
            p.err().contains(want),
            "{over:?}: want {want:?} in {}",
            p.err()
        );
    }
    // Nothing was created for the refused jails.
    let left: Vec<_> = std::fs::read_dir(base.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
