//! ember-vmm's per-thread seccomp filters: every thread runs filtered, a
//! syscall outside a thread's filter kills the process with SIGSYS, and
//! `--no-seccomp` turns the filters off. The forbidden syscall comes from the
//! hidden `--seccomp-test-trigger THREAD` flag: right after installing its
//! filter, that thread calls socket(AF_INET, ...), which no filter allows.
//! Busy threads allocate under their filters: the API under many clients on
//! new connections, the VMM and vCPU threads under a large vsock stream.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

/// Clients hammering the API, each request on a new connection.
const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 500;

#[test]
fn many_clients_on_new_connections_do_not_kill_the_vmm() {
    // Eight clients on new connections once made glibc give the API thread
    // its own malloc arena, whose first trim opened
    // /proc/sys/vm/overcommit_memory under the API filter: SIGSYS.
    let (mut p, _dir, sock) = serve(&[]);
    wait_for_socket(&sock);
    boot_over_api(&sock, "ember.test=idle", 2);
    p.expect_out("ember-guest: idle");

    let sock = Arc::new(sock);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let paths = ["/", "/vm/config", "/machine-config"];
                for i in 0..REQUESTS_PER_CLIENT {
                    let path = paths[(c + i) % paths.len()];
                    let r = http(&sock, "GET", path, None);
                    assert_eq!(r.status, 200, "client {c} request {i} GET {path}");
                    // Touch the body so every answer is whole JSON.
                    let _ = r.json();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed (is the VMM dead?)");
    }

    assert!(
        p.try_status().is_none(),
        "ember-vmm died: {:?}\nstderr:\n{}",
        p.try_status(),
        p.err()
    );
    let r = http(&sock, "GET", "/", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "Running", "{:?}", r.json());
    // Still filtered: nothing was turned off to survive.
    let t = thread_seccomp(p.pid());
    assert_eq!(t["ember_api"].0, "2", "{t:?}");
    assert_eq!(t["ember_vcpu0"].0, "2", "{t:?}");
    let _ = p.child.kill();
    p.wait();
}

/// Bytes the host sends through the guest's vsock echo (the test guest on
/// nested KVM echoes some tens of KiB/s, so not more).
const VSOCK_STREAM: usize = 512 << 10;
/// The host reads only once it has sent this much, so the echo backs up
/// into the VMM (about 384 KiB fit between host, VMM and guest).
const VSOCK_READ_AFTER: usize = 256 << 10;

#[test]
fn a_large_vsock_echo_under_the_filters() {
    // The VMM thread buffers and forwards a backed-up stream, the vCPU
    // threads take the guest's queue notifications, all under their filters.
    // (The guest's credit keeps each buffer under the 128 KiB mmap threshold
    // here; realloc across it, mremap, is driven under the real filters by
    // vmm's unit test allocator_stress_under_every_filter.)
    let dir = TempDir::new("seccomp-vsock");
    let uds = dir.join("v.sock");
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": PVH_ELF, "boot_args": "ember.test=vsock ember.vsock_mode=host"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"]).arg(&cfg_path);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    p.expect_out("ember-guest: vsock listening on port 1234");

    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");

    let data: Vec<u8> = (0..VSOCK_STREAM)
        .map(|i| (i * 31 + i / 4099) as u8)
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (data, sent) = (data.clone(), sent.clone());
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in data.chunks(16 << 10) {
                w.write_all(chunk).unwrap();
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        })
    };
    // Let the echo pile up in the VMM before reading any of it; if the
    // pipeline holds less than that, reading starts after the bound anyway.
    let _ = wait_for(PATIENCE, || {
        (sent.load(Ordering::SeqCst) >= VSOCK_READ_AFTER).then_some(())
    });
    let mut back = vec![0u8; VSOCK_STREAM];
    r.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "the echo differs from what was sent");
    s.shutdown(std::net::Shutdown::Write).unwrap();

    let st = p.wait();
    let out = p.out();
    assert_eq!(
        st.code(),
        Some(0),
        "{st:?}\nstdout:\n{out}\nstderr:\n{}",
        p.err()
    );
    assert!(
        out.contains(&format!(
            "ember-guest: vsock host-connect echoed {VSOCK_STREAM}"
        )),
        "{out}"
    );
}
