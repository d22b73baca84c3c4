//! A guest can neither freeze nor exhaust its VMM through vsock (issue 19).
//! The test guest's `evil-vsock-flood` mode opens hundreds of connections
//! toward a host listener, lies about its credit and writes 64 KiB chunks
//! regardless of the VMM's; the host side is a listener that accepts and
//! never reads, or one whose accept queue is full. Throughout, with the
//! seccomp filters on, a watchdog polls the API (`GET /`) and fails if one
//! answer does not come within a generous bound, i.e. if the VMM thread's
//! loop stalls. Afterwards the VMM still answers, holds a bounded number of
//! descriptors, takes SendCtrlAltDel, and SIGTERM ends it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ember_tests::*;
use serde_json::json;

/// The VMM's per-device vsock connection limit (devices::virtio::vsock).
const MAX_CONNS: u64 = 256;

/// ember-vmm with its API and the flood guest on vsock (seccomp on).
fn spawn_flood_vm(dir: &TempDir, uds: &Path, args: &str) -> (Proc, PathBuf) {
    let sock = dir.join("api.sock");
    let cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF,
                        "boot_args": format!("ember.test=evil-vsock-flood {args}")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg_path);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    (p, sock)
}

/// The guest's summary line: (requests, responses, refused, resets).
fn summary(out: &str) -> (u64, u64, u64, u64) {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("ember-guest: evil vsock-flood requests "))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1], n[2], n[3])
}

/// After the flood: the API answers, SendCtrlAltDel is taken, and SIGTERM
/// ends the VMM through its loop (status 143, its vsock socket removed).
fn still_in_control_then_sigterm(p: &mut Proc, sock: &Path, uds: &Path) {
    in_control_then_sigterm(p, sock);
    assert!(!uds.exists(), "the vsock socket is left behind");
}

#[test]
fn a_flood_toward_a_host_that_never_reads_leaves_the_vmm_responsive() {
    let dir = TempDir::new("vsock-flood");
    let uds = dir.join("v.sock");
    // Accepts everything, reads nothing; stops when the VMM is gone.
    let listener = UnixListener::bind(format!("{}_52", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            held.len()
        })
    };
    let (mut p, sock) = spawn_flood_vm(
        &dir,
        &uds,
        "ember.vsock_port=52 ember.flood_conns=300 ember.flood_chunks=5",
    );
    let dog = Watchdog::start(sock.clone(), p.pid());
    p.expect_out("ember-guest: evil vsock-flood start conns 300 chunks 5");
    p.expect_out("ember-guest: evil vsock-flood holding");
    let (fds, rss) = (fd_count(p.pid()), rss_kib(p.pid()));
    let Watch { polls, worst, .. } = dog.finish();
    let (req, resp, refused, resets) = summary(&p.out());
    eprintln!(
        "flood: {req} requests, {resp} responses, {refused} refused, {resets} resets; \
         API answered {polls} GET / (slowest {worst:?}); VMM holds {fds} fds, RSS {rss} KiB"
    );
    assert_eq!(req, 300);
    assert!(resp <= MAX_CONNS, "{resp} connections beyond the limit");
    assert!(refused >= 300 - MAX_CONNS, "{refused}");
    // Descriptors: the limit's worth of streams plus a few dozen of its own.
    assert!(fds < MAX_CONNS as usize + 64, "{fds} descriptors");
    // Memory: the guest's 64 MiB, the device's 16 MiB budget, slack.
    assert!(rss < 160 << 10, "RSS {rss} KiB");
    assert!(polls > 0);
    still_in_control_then_sigterm(&mut p, &sock, &uds);
    done.store(true, Ordering::SeqCst);
    let accepted = acceptor.join().unwrap();
    assert!(accepted as u64 >= resp.min(1), "{accepted}");
}

#[test]
fn a_flood_toward_a_full_accept_queue_does_not_freeze_the_vmm() {
    let dir = TempDir::new("vsock-full");
    let uds = dir.join("v.sock");
    // Backlog 0 (std's listener asks for 128) and never accepted: a
    // blocking connect would sleep in unix_wait_for_peer for good.
    let listener = UnixListener::bind(format!("{}_53", uds.display())).unwrap();
    // SAFETY: listen(2) on our own bound socket.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let (mut p, sock) = spawn_flood_vm(
        &dir,
        &uds,
        "ember.vsock_port=53 ember.flood_conns=200 ember.flood_chunks=1",
    );
    let dog = Watchdog::start(sock.clone(), p.pid());
    p.expect_out("ember-guest: evil vsock-flood holding");
    let Watch { polls, worst, .. } = dog.finish();
    let (req, resp, refused, resets) = summary(&p.out());
    eprintln!(
        "full queue: {req} requests, {resp} responses, {refused} refused, {resets} resets; \
         API answered {polls} GET / (slowest {worst:?})"
    );
    assert_eq!(req, 200);
    // The queue holds one connection (backlog 0); the rest are refused.
    assert!(resp <= 2, "{resp}");
    assert!(refused >= 198, "{refused}");
    still_in_control_then_sigterm(&mut p, &sock, &uds);
    // The queued connection was a real one: the VMM closed it on exit.
    let (mut c, _) = listener.accept().unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = [0u8; 1 << 16];
    let mut total = 0;
    loop {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("reading the queued connection: {e}"),
        }
    }
    assert!(total <= 1 << 20, "{total}");
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &s[s.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    // rest starts at field 3; utime is field 14, stime 15.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

#[test]
fn out_of_descriptors_the_listeners_pause_instead_of_spinning() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("vsock-emfile");
    let uds = dir.join("v.sock");
    let sock = dir.join("api.sock");
    // One request to a port nobody listens on activates the device; then
    // the guest halts.
    let cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF,
                        "boot_args": "ember.test=evil-vsock-flood ember.vsock_port=9 ember.flood_conns=1"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg_path);
    // SAFETY: setrlimit between fork and exec only touches the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    p.expect_out("ember-guest: evil vsock-flood holding");
    // Use up the VMM's descriptors from both listeners; connects still
    // succeed (the kernel queues them) but the VMM cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.extend(UnixStream::connect(&uds).ok());
        held.extend(UnixStream::connect(&sock).ok());
    }
    let _ = wait_for(PATIENCE, || p.err().contains("accept").then_some(()));
    let t0 = cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(p.pid()) - t0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    eprintln!(
        "out of fds: {} connections held; the VMM used {used} ticks ({hz}/s) in 3 s",
        held.len()
    );
    assert!(
        used < hz * 3 / 2,
        "the VMM burned {used} ticks in 3 s out of descriptors: a busy loop\n{}",
        p.err()
    );
    let err = p.err();
    assert!(
        err.contains("out of file descriptors") || err.contains("ember-http: accept failed"),
        "{err}"
    );
    // Descriptors free again: the API answers and SIGTERM still works.
    drop(held);
    let r = wait_for(PATIENCE, || {
        let mut c = UnixStream::connect(&sock).ok()?;
        c.set_read_timeout(Some(WATCHDOG_BOUND)).ok()?;
        write_request(&mut c, "GET", "/", None).ok()?;
        read_response(&mut c).ok()
    })
    .expect("the API never answered again");
    assert_eq!(r.status, 200);
    still_in_control_then_sigterm(&mut p, &sock, &uds);
}
