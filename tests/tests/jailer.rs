//! ember-vmm booted through ember-jailer (run as root): the tiny guest boots
//! as uid 123 / gid 456 with seccomp on, the VMM sees only its jail, a
//! forbidden syscall kills it by SIGSYS, bad ids and `..` paths are refused,
//! and the jail directory and cgroup can be removed afterwards.
//!
//! The jails run the static ember-vmm ([`static_vmm`], `cargo static-vmm`):
//! nothing of the host's but the VMM enters them. One test runs the
//! dynamically linked build (plain `cargo build`) the way it still works:
//! with the shared libraries `ldd` names copied to the same paths inside the
//! jail root.

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
    /// The VMM binary the jailer gets as `--exec-file`.
    vmm: PathBuf,
}

impl Jail {
    /// A jail for the static ember-vmm: only the VMM goes in.
    fn new(tag: &str) -> Self {
        Self::with_vmm(tag, static_vmm())
    }

    /// A jail for the dynamically linked ember-vmm, with its libraries.
    fn new_dynamic(tag: &str) -> Self {
        let j = Self::with_vmm(tag, bin("ember-vmm"));
        j.copy_libraries();
        j
    }

    fn with_vmm(tag: &str, vmm: PathBuf) -> Self {
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
            vmm,
        };
        std::fs::create_dir_all(j.root()).unwrap();
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
            .arg(&self.vmm)
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
        self.place_guest_with(boot_args, serde_json::json!({}));
    }

    /// [`Jail::place_guest`] with more config sections (`devices`, an
    /// object such as `{"drives": [...]}`) in /vm.json.
    fn place_guest_with(&self, boot_args: &str, devices: serde_json::Value) {
        self.place("/kernel.elf", &std::fs::read(PVH_ELF).unwrap());
        let mut cfg: serde_json::Value =
            serde_json::from_str(&vm_config("/kernel.elf", boot_args, 1, 32)).unwrap();
        for (section, v) in devices.as_object().into_iter().flatten() {
            cfg[section] = v.clone();
        }
        self.place("/vm.json", cfg.to_string().as_bytes());
    }

    /// The jailer running ember-vmm with `jailer_args`, then `vmm_args`.
    fn command(&self, jailer_args: &[&str], vmm_args: &[&str]) -> Command {
        let mut c = Command::new(bin("ember-jailer"));
        c.arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(&self.vmm)
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

    /// [`Jail::spawn`] of `ember-vmm --no-api --config-file /vm.json`, then
    /// `more_vmm_args`.
    fn spawn_no_api(&self, jailer_args: &[&str], more_vmm_args: &[&str], logs: &TempDir) -> Proc {
        let mut vmm_args = vec!["--no-api", "--config-file", "/vm.json"];
        vmm_args.extend(more_vmm_args);
        self.spawn(jailer_args, &vmm_args, logs)
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
            "--cgroup-version".into(),
            "2".into(),
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
    let mut p = j.spawn_no_api(&args, &[], &logs);
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
    // The static VMM needed nothing else from the host: the jail root holds
    // the VMM, its pid file, the guest and config, /dev and /run.
    let mut entries: Vec<String> = std::fs::read_dir(j.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "dev",
            "ember-vmm",
            "ember-vmm.pid",
            "kernel.elf",
            "run",
            "vm.json"
        ],
        "the jail holds more than the VMM and its guest"
    );
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

/// The v1 hierarchy of `controller`, if mounted.
fn cgroup1_root(controller: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
        .map(|f| PathBuf::from(f[1]))
}

/// firecracker-go-sdk's default jailer command (`jailer.go`,
/// `JailerCommandBuilder.Args`) passes no `--cgroup-version`; Firecracker's
/// jailer then uses v1, and so does ember-jailer where v1 controllers are
/// mounted. (On a cgroup2-only host it falls back to v2: see
/// `cgroup::resolve_version`'s unit test.)
#[test]
fn without_cgroup_version_the_jailer_uses_v1_like_firecrackers() {
    let Some(pids) = cgroup1_root("pids") else {
        eprintln!("no cgroup v1 pids hierarchy mounted: nothing to check here");
        return;
    };
    let mut j = Jail::new("cg1");
    j.place_guest("ember.test=hello");
    let parent = format!("ember-tests-{}", j.id);
    j.cgroups = vec![pids.join(&parent).join(&j.id), pids.join(&parent)];
    let logs = TempDir::new("jail-logs");
    let args = [
        "--parent-cgroup",
        parent.as_str(),
        "--cgroup",
        "pids.max=64",
    ];
    let mut p = j.spawn_no_api(&args, &[], &logs);
    let st = p.wait();
    assert_eq!(st.code(), Some(0), "{st:?}\n{}", p.err());
    assert!(
        p.out().contains("ember-guest: hello from pvh boot"),
        "{}",
        p.out()
    );
    assert_eq!(
        std::fs::read_to_string(pids.join(&parent).join(&j.id).join("pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    j.remove();
}

#[test]
fn serial_output_goes_to_a_file_inside_the_jail() {
    let j = Jail::new("serial");
    j.place_guest("ember.test=hello");
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn_no_api(&[], &["--serial-out", "/run/serial.log"], &logs);
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
fn a_dynamically_linked_vmm_still_runs_with_its_libraries_copied_in() {
    let j = Jail::new_dynamic("dynamic");
    assert!(
        j.root().join("lib64").exists() || j.root().join("lib").exists(),
        "ldd named no loader for the dynamic build"
    );
    j.place_guest("ember.test=hello");
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn_no_api(&[], &[], &logs);
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(
        p.out().contains("ember-guest: hello from pvh boot"),
        "{}",
        p.out()
    );
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
    let put = |path: &str, body: serde_json::Value| api_put(&sock, path, body);
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
    let mut p = j.spawn_no_api(&[], &["--seccomp-test-trigger", "vcpu"], &logs);
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

#[test]
fn block_and_vsock_devices_work_inside_the_jail() {
    // A drive at a jail path: the guest reads and writes it.
    let j = Jail::new("blk");
    let data: Vec<u8> = (0..32 * 1024u32).map(|i| (i * 7 + i / 509) as u8).collect();
    j.place("/disk.img", &data);
    j.place_guest_with(
        "ember.test=blk ember.blk_write=1",
        serde_json::json!({"drives": [{"drive_id": "d0", "path_on_host": "/disk.img",
            "is_root_device": false, "is_read_only": false}]}),
    );
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn_no_api(&[], &[], &logs);
    assert_eq!(p.wait().code(), Some(0), "{}\n{}", p.out(), p.err());
    assert!(p.out().contains("ember-guest: blk write ok"), "{}", p.out());
    assert!(
        p.out().contains("ember-guest: blk flush status 0"),
        "{}",
        p.out()
    );
    assert_ne!(
        std::fs::read(j.host("/disk.img")).unwrap(),
        data,
        "the write did not land"
    );
    j.remove();

    // vsock: the guest connects to port 52, which the VMM forwards to
    // "/run/v.sock_52" inside the jail; the host listens there.
    let j = Jail::new("vsock");
    j.place_guest_with(
        "ember.test=vsock ember.vsock_mode=guest ember.vsock_port=52",
        serde_json::json!({"vsock": {"guest_cid": 3, "uds_path": "/run/v.sock"}}),
    );
    // The jailer creates /run; make it now so the listener can live there.
    std::fs::create_dir_all(j.host("/run")).unwrap();
    let listen_at = j.host("/run/v.sock_52");
    let listener = std::os::unix::net::UnixListener::bind(&listen_at).unwrap();
    std::os::unix::fs::chown(&listen_at, Some(UID), Some(GID)).unwrap();
    let echo = echo_guest_hello(listener);
    let mut p = j.spawn_no_api(&[], &[], &logs);
    assert_eq!(echo.join().unwrap(), "hello from guest\n");
    assert_eq!(p.wait().code(), Some(0), "{}\n{}", p.out(), p.err());
    assert!(
        p.out().contains("ember-guest: vsock guest-connect echo ok"),
        "{}",
        p.out()
    );
    j.remove();
}

#[test]
fn an_unprivileged_jailed_vmm_uses_a_tap_prepared_for_it() {
    let ns = NetNs::new("j", "embjtap0", "10.0.1.1", Some((UID, GID)));
    // UDP echo on 10.0.1.1:7 inside the namespace, bounded in time.
    let echo = ns.udp_echo("10.0.1.1:7", 3);
    let j = Jail::new("net");
    j.place_guest_with(
        "ember.test=net ember.ip=10.0.1.2 ember.peer=10.0.1.1",
        serde_json::json!({"network-interfaces": [{
            "iface_id": "eth0", "host_dev_name": "embjtap0", "guest_mac": "06:00:0a:00:01:02"
        }]}),
    );
    let logs = TempDir::new("jail-logs");
    let mut p = j.spawn_no_api(&["--netns", &ns.path()], &[], &logs);
    assert_eq!(p.wait().code(), Some(0), "{}\n{}", p.out(), p.err());
    for n in 1..=3 {
        assert!(
            p.out()
                .contains(&format!("ember-guest: net udp-echo ok {n}")),
            "{}",
            p.out()
        );
    }
    assert_eq!(echo.join().unwrap(), 3);
    j.remove();
}

/// firecracker-go-sdk v1.0.0 with a `JailerCfg` (firectl `--jailer`, whose
/// `--node` defaults to 0): `jail()` builds the command with
/// `JailerCommandBuilder.Args()` (`--id`, `--uid`, `--gid`, `--exec-file`,
/// then `--cgroup cpuset.mems=0 --cgroup cpuset.cpus=<node0 cpulist>` from
/// `getNumaCpuset`, no `--cgroup-version`, `--chroot-base-dir`, then `--` and
/// `seccompArgs` (`--no-seccomp`, Seccomp.Enabled being false by default)
/// and `--api-sock /run/firecracker.socket`); `LinkFilesHandler` links the
/// kernel into the jail root under its base name. The cpuset lands in the v1
/// hierarchy under the exec file's name, as with Firecracker's jailer.
#[test]
fn sdk_jailer_command_boots_in_a_v1_cpuset() {
    let cpus = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist")
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
        .filter(|s| !s.is_empty());
    let mut j = Jail::new("sdkjail");
    j.place("/ember-guest-pvh.elf", &std::fs::read(PVH_ELF).unwrap());
    let mut c = Command::new(bin("ember-jailer"));
    c.args(["--id", &j.id])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--exec-file")
        .arg(&j.vmm);
    let exec_name = j.vmm.file_name().unwrap().to_string_lossy().into_owned();
    let cpuset = cgroup1_root("cpuset");
    if let Some(cpus) = &cpus {
        c.args(["--cgroup", "cpuset.mems=0", "--cgroup"])
            .arg(format!("cpuset.cpus={cpus}"));
        if let Some(root) = &cpuset {
            j.cgroups = vec![root.join(&exec_name).join(&j.id), root.join(&exec_name)];
        }
    }
    c.arg("--chroot-base-dir").arg(j.base.path()).args([
        "--",
        "--no-seccomp",
        "--api-sock",
        "/run/firecracker.socket",
    ]);
    let logs = TempDir::new("jail-logs");
    let mut p = Proc::spawn(c, logs.path(), "sdkjailed");
    let sock = j.host("/run/firecracker.socket");
    wait_for_socket(&sock);

    // Machine.Start's handlers, jail paths.
    api_put(
        &sock,
        "/machine-config",
        serde_json::json!({"mem_size_mib": 32, "smt": false, "vcpu_count": 1}),
    );
    api_put(
        &sock,
        "/boot-source",
        serde_json::json!({"boot_args": "console=ttyS0 ember.test=wait-ctrlaltdel",
                           "kernel_image_path": "/ember-guest-pvh.elf"}),
    );
    api_put(
        &sock,
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    p.expect_out("waiting for ctrl-alt-del");
    // The jailer passed Firecracker's arguments first; the id is the jail's.
    assert_eq!(http(&sock, "GET", "/", None).json()["id"], j.id.as_str());
    if let (Some(cpus), Some(root)) = (&cpus, &cpuset) {
        let leaf = root.join(&exec_name).join(&j.id);
        assert_eq!(
            std::fs::read_to_string(leaf.join("cpuset.cpus"))
                .unwrap()
                .trim(),
            cpus.as_str()
        );
        let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == p.pid().to_string()), "{procs:?}");
    } else {
        eprintln!("no NUMA node 0 cpulist or no v1 cpuset: the SDK passes no --cgroup");
    }
    // Shutdown (SendCtrlAltDel), Wait.
    api_put(
        &sock,
        "/actions",
        serde_json::json!({"action_type": "SendCtrlAltDel"}),
    );
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    j.remove();
}
