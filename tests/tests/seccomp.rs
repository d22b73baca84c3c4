//! ember-vmm's per-thread seccomp filters: every thread runs filtered, a
//! syscall outside a thread's filter kills the process with SIGSYS, and
//! `--no-seccomp` turns the filters off. The forbidden syscall comes from the
//! hidden `--seccomp-test-trigger THREAD` flag: right after installing its
//! filter, that thread calls socket(AF_INET, ...), which no filter allows.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use ember_tests::*;

const SIGSYS: i32 = 31;

fn config_file(dir: &TempDir, args: &str) -> std::path::PathBuf {
    let p = dir.join("vm.json");
    std::fs::write(&p, vm_config(PVH_ELF, args, 1, 32)).unwrap();
    p
}

/// ember-vmm on the hello guest from a config file, with `extra` arguments.
fn run_hello(extra: &[&str]) -> (Proc, TempDir) {
    let dir = TempDir::new("seccomp");
    let cfg = config_file(&dir, "ember.test=hello");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"])
        .arg(&cfg)
        .args(extra);
    (Proc::spawn(cmd, dir.path(), "vmm"), dir)
}

/// ember-vmm serving its API on a socket in a new temp dir.
fn serve(extra: &[&str]) -> (Proc, TempDir, std::path::PathBuf) {
    let dir = TempDir::new("seccomp-api");
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock).args(extra);
    (Proc::spawn(cmd, dir.path(), "vmm"), dir, sock)
}

fn put(sock: &Path, path: &str, body: serde_json::Value) {
    let r = http(sock, "PUT", path, Some(&body.to_string()));
    assert_eq!(
        r.status,
        204,
        "PUT {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

fn boot_over_api(sock: &Path, args: &str, vcpus: u8) {
    put(
        sock,
        "/boot-source",
        serde_json::json!({"kernel_image_path": PVH_ELF, "boot_args": args}),
    );
    put(
        sock,
        "/machine-config",
        serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": 32}),
    );
    put(
        sock,
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
}

#[test]
fn a_forbidden_syscall_on_any_thread_kills_the_vmm_by_sigsys() {
    for thread in ["vmm", "vcpu"] {
        let (mut p, _dir) = run_hello(&["--seccomp-test-trigger", thread]);
        let st = p.wait();
        assert_eq!(
            st.signal(),
            Some(SIGSYS),
            "{thread}: {st:?}\nstderr:\n{}",
            p.err()
        );
        let err = p.err();
        assert!(
            err.contains(&format!("the {thread} thread calls socket(AF_INET)")),
            "{thread}: {err}"
        );
        assert!(!err.contains("survived"), "{thread}: {err}");
        assert!(
            !p.out().contains("hello from"),
            "{thread}: the guest ran: {}",
            p.out()
        );
    }
    let (mut p, _dir, _sock) = serve(&["--seccomp-test-trigger", "api"]);
    let st = p.wait();
    assert_eq!(
        st.signal(),
        Some(SIGSYS),
        "api: {st:?}\nstderr:\n{}",
        p.err()
    );
    assert!(
        p.err().contains("the api thread calls socket(AF_INET)"),
        "{}",
        p.err()
    );
    assert!(!p.err().contains("survived"), "{}", p.err());
}

#[test]
fn without_seccomp_the_trigger_is_harmless() {
    for thread in ["vmm", "vcpu"] {
        let (mut p, _dir) = run_hello(&["--no-seccomp", "--seccomp-test-trigger", thread]);
        let st = p.wait();
        assert_eq!(st.code(), Some(0), "{thread}: {st:?}\nstderr:\n{}", p.err());
        assert!(
            p.err()
                .contains(&format!("the {thread} thread survived (socket created)")),
            "{thread}: {}",
            p.err()
        );
        assert!(
            p.out().contains("ember-guest: hello from pvh boot"),
            "{}",
            p.out()
        );
    }
    let (mut p, _dir, sock) = serve(&["--no-seccomp", "--seccomp-test-trigger", "api"]);
    wait_for_socket(&sock);
    boot_over_api(&sock, "ember.test=hello", 1);
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    assert!(
        p.err().contains("the api thread survived (socket created)"),
        "{}",
        p.err()
    );
    assert!(
        p.out().contains("ember-guest: hello from pvh boot"),
        "{}",
        p.out()
    );
}

/// (thread name, Seccomp mode, Seccomp_filters) of every ember thread of
/// `pid` (KVM adds kernel worker tasks such as kvm-nx-lpage-recovery).
fn thread_seccomp(pid: u32) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        if !comm.starts_with("ember") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.insert(
            comm.trim().to_string(),
            (field("Seccomp:"), field("Seccomp_filters:")),
        );
    }
    out
}

/// Boots an idle 2-vCPU guest over the API and returns every thread's
/// seccomp state, then stops the VMM.
fn seccomp_of_running_vmm(extra: &[&str]) -> BTreeMap<String, (String, String)> {
    let (mut p, _dir, sock) = serve(extra);
    wait_for_socket(&sock);
    boot_over_api(&sock, "ember.test=idle", 2);
    p.expect_out("ember-guest: idle");
    let threads = thread_seccomp(p.pid());
    let _ = p.child.kill();
    p.wait();
    threads
}

#[test]
fn every_thread_runs_under_its_own_filter() {
    let t = seccomp_of_running_vmm(&[]);
    let names: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["ember-vmm", "ember_api", "ember_vcpu0", "ember_vcpu1"],
        "{t:?}"
    );
    // Mode 2 is SECCOMP_MODE_FILTER. The VMM thread has vmm + vmm_clone3;
    // the API thread, spawned before them, only api; the vCPU threads inherit
    // the VMM thread's two and add vcpu.
    let want = |mode: &str, n: &str| (mode.to_string(), n.to_string());
    assert_eq!(t["ember-vmm"], want("2", "2"), "{t:?}");
    assert_eq!(t["ember_api"], want("2", "1"), "{t:?}");
    assert_eq!(t["ember_vcpu0"], want("2", "3"), "{t:?}");
    assert_eq!(t["ember_vcpu1"], want("2", "3"), "{t:?}");

    let t = seccomp_of_running_vmm(&["--no-seccomp"]);
    assert_eq!(t.len(), 4, "{t:?}");
    for (name, (mode, _)) in &t {
        assert_eq!(mode, "0", "{name} is filtered despite --no-seccomp");
    }
}

#[test]
fn the_test_trigger_is_hidden_from_help() {
    let out = Command::new(bin("ember-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("--no-seccomp"), "{help}");
    assert!(!help.contains("trigger"), "{help}");
    // ...and it only takes thread names.
    let dir = TempDir::new("seccomp-cli");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--seccomp-test-trigger", "gpu"]);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    assert_eq!(p.wait().code(), Some(153));
}
