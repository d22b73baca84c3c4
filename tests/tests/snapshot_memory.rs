//! Snapshot memory beyond a Full snapshot loaded from a file: Diff
//! snapshots (KVM's dirty log and the VMM's own writes), merging a diff onto
//! its base with `ember-snapshot-editor edit-memory rebase`, and the `Uffd`
//! backend served by `ember-uffd-handler`.
//!
//! The guest is the test guest's `mempattern` mode: every round it checks
//! that its memory holds what it wrote in the previous round (and a fixed
//! 4 MiB written once), then prints `mempattern <round> bad <count>`. A
//! restore whose memory does not match its vCPU state prints a bad count
//! above 0.
//!
//! The API exchange is Firecracker's, as its Go SDK sends it
//! (`firecracker-go-sdk` `Machine.PauseVM` = `PATCH /vm {"state":"Paused"}`,
//! `Machine.CreateSnapshot` = `PUT /snapshot/create`, `WithSnapshot` +
//! `Machine.Start` = `PUT /snapshot/load`), and a Firecracker page-fault
//! handler (`src/firecracker/examples/uffd/`) reads the same handshake
//! `ember-uffd-handler` does.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ember_guests::MEMPATTERN_PREFIX;
use ember_tests::snapvmm::{spawn_uffd_handler, ApiVmm, VmmJail as Jail, JAIL_GID, JAIL_UID};
use ember_tests::*;

/// A VMM with its API socket in its own directory, and the prefix of its
/// guest's round lines.
struct Vmm {
    api: ApiVmm,
    /// The guest's round lines: [`MEMPATTERN_PREFIX`] or [`RNG_PREFIX`].
    prefix: &'static str,
}

impl From<ApiVmm> for Vmm {
    fn from(api: ApiVmm) -> Self {
        Vmm {
            api,
            prefix: MEMPATTERN_PREFIX,
        }
    }
}

impl std::ops::Deref for Vmm {
    type Target = ApiVmm;
    fn deref(&self) -> &ApiVmm {
        &self.api
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut ApiVmm {
        &mut self.api
    }
}

fn start_vmm(dir: &Path, tag: &str) -> Vmm {
    ApiVmm::start(dir, tag).into()
}

impl Vmm {
    fn put(&self, path: &str, body: serde_json::Value) {
        api_put(&self.sock, path, body)
    }
    /// Boots the mempattern guest (32 MiB, one vCPU).
    fn boot_mempattern(&self, track_dirty_pages: bool) {
        self.boot(
            LINUX64_ELF,
            "console=ttyS0 ember.test=mempattern",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": track_dirty_pages}),
        );
    }
    /// `(round, bad)` of every complete mempattern line so far.
    fn rounds(&self) -> Vec<(u64, u64)> {
        rounds_of(&self.p.out(), self.prefix)
    }
    /// Waits until the guest printed a round above `after`; returns the last round.
    fn wait_round_above(&mut self, after: u64) -> u64 {
        let got = wait_for(PATIENCE, || {
            let r = self.rounds();
            match r.last() {
                Some(&(n, _)) if n > after => Some(n),
                _ if self.p.try_status().is_some() => Some(0),
                _ => None,
            }
        });
        match got {
            Some(n) if n > after => n,
            _ => panic!(
                "no mempattern round above {after}\nstdout:\n{}\nstderr:\n{}",
                self.p.out(),
                self.p.err()
            ),
        }
    }
    /// Pauses and takes a snapshot of `kind`; returns the last round printed.
    fn snapshot(&self, kind: &str, state: &Path, mem: &Path) -> u64 {
        self.set_state("Paused");
        let last = self.rounds().last().map(|r| r.0).unwrap_or(0);
        self.put(
            "/snapshot/create",
            serde_json::json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}),
        );
        last
    }
}

/// Round lines of the `mempattern-rng` mode.
const RNG_PREFIX: &str = "ember-guest: mempattern-rng ";

fn rounds_of(out: &str, prefix: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let mut w = l.split(' ');
            let n = w.next()?.parse().ok()?;
            (w.next()? == "bad").then_some(())?;
            Some((n, w.next()?.parse().ok()?))
        })
        .collect()
}

/// Bytes of data (not holes) in a file, found with SEEK_DATA/SEEK_HOLE.
fn data_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len() as i64;
    let (mut off, mut total) = (0i64, 0u64);
    while off < size {
        // SAFETY: lseek on an open file.
        let d = unsafe { libc::lseek64(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek64(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        total += (h - d) as u64;
        off = h;
    }
    total
}

fn rebase(base: &Path, diff: &Path) {
    let out = Command::new(bin("ember-snapshot-editor"))
        .args(["edit-memory", "rebase", "--memory-path"])
        .arg(base)
        .arg("--diff-path")
        .arg(diff)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebase failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loads `state` + `mem` (File backend) into a fresh VMM in `dir`, resumed.
fn load_file(dir: &Path, tag: &str, state: &Path, mem: &Path, track: bool) -> (Vmm, u128) {
    let v = start_vmm(dir, tag);
    let t = Instant::now();
    v.put(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "track_dirty_pages": track,
            "resume_vm": true
        }),
    );
    (v, t.elapsed().as_micros())
}

/// The restored guest goes on from `last` with memory that matches: a round
/// after `last`, then one more, every restored round with bad 0.
fn assert_continues(v: &mut Vmm, last: u64) {
    let first = v.wait_round_above(0);
    v.wait_round_above(first);
    let r = v.rounds();
    assert!(
        r[0].0 > last && r[0].0 <= last + 2,
        "restored guest started at round {} after {last}",
        r[0].0
    );
    assert!(
        r.iter().all(|&(_, bad)| bad == 0),
        "restored memory differs: {r:?}"
    );
}

/// Full, then two Diffs; the diffs are small, rebased in order onto a copy of
/// the Full memory they restore the guest at the second diff's point (in
/// another VMM, from another directory), while the last diff's state on the
/// unmerged Full memory does not (the check is real). The restored VMM
/// takes a Diff of its own (tracking from the load request).
#[test]
fn diffs_rebased_onto_their_full_base_restore_the_guest() {
    let dir = TempDir::new("snapmem-diff");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let mut v = start_vmm(&a, "src");
    v.boot_mempattern(true);
    v.wait_round_above(1);
    v.snapshot("Full", &a.join("full.state"), &a.join("full.mem"));
    v.set_state("Resumed");
    let at = v.rounds().last().unwrap().0;
    v.wait_round_above(at + 1);
    v.snapshot("Diff", &a.join("diff1.state"), &a.join("diff1.mem"));
    v.set_state("Resumed");
    let at = v.rounds().last().unwrap().0;
    v.wait_round_above(at + 1);
    let last = v.snapshot("Diff", &a.join("diff2.state"), &a.join("diff2.mem"));
    assert!(v.rounds().iter().all(|&(_, bad)| bad == 0), "{}", v.p.out());
    drop(v);

    let full = data_bytes(&a.join("full.mem"));
    let (d1, d2) = (
        data_bytes(&a.join("diff1.mem")),
        data_bytes(&a.join("diff2.mem")),
    );
    let size = std::fs::metadata(a.join("full.mem")).unwrap().len();
    assert_eq!(std::fs::metadata(a.join("diff2.mem")).unwrap().len(), size);
    println!(
        "memory files of a 32 MiB guest: Full {full} bytes of data, Diff {d1} and {d2} bytes ({:.1}x and {:.1}x smaller), file size {size}",
        full as f64 / d1 as f64,
        full as f64 / d2 as f64
    );
    assert!(d1 > 0 && d2 > 0);
    assert!(
        d2 < full / 2,
        "a diff holds only changed pages: {d2} of {full}"
    );

    // Merge onto a copy of the base, in order.
    let merged = b.join("merged.mem");
    std::fs::copy(a.join("full.mem"), &merged).unwrap();
    rebase(&merged, &a.join("diff1.mem"));
    rebase(&merged, &a.join("diff2.mem"));
    let state = b.join("diff2.state");
    std::fs::copy(a.join("diff2.state"), &state).unwrap();

    // The unmerged base under the diff's state: the guest sees stale memory.
    // (Its stack may be stale too: a crash also counts as noticed.)
    let (mut stale, _) = load_file(&b, "stale", &state, &a.join("full.mem"), false);
    let seen = wait_for(PATIENCE, || {
        (!stale.rounds().is_empty() || stale.p.try_status().is_some()).then_some(())
    });
    assert!(
        seen.is_some(),
        "stale restore neither ran nor ended: {}",
        stale.p.err()
    );
    let r = stale.rounds();
    assert!(
        r.first().is_none_or(|&(_, bad)| bad > 0),
        "stale memory went unnoticed: {r:?}"
    );
    drop(stale);

    let (mut w, us) = load_file(&b, "restored", &state, &merged, true);
    println!("load of the merged snapshot (File backend): {us} us for the PUT");
    assert_continues(&mut w, last);
    // Tracking came from the load request: the restored VM takes Diffs.
    let at = w.rounds().last().unwrap().0;
    w.wait_round_above(at);
    w.snapshot("Diff", &b.join("diff3.state"), &b.join("diff3.mem"));
    let d3 = data_bytes(&b.join("diff3.mem"));
    assert!(d3 > 0 && d3 < full, "{d3}");
}

/// Without track_dirty_pages a Diff is refused (400, naming the setting),
/// at boot and after a load without it; a Full still works afterwards.
#[test]
fn diff_without_dirty_tracking_is_refused() {
    let dir = TempDir::new("snapmem-notrack");
    let mut v = start_vmm(dir.path(), "vm");
    v.boot_mempattern(false);
    v.wait_round_above(0);
    v.set_state("Paused");
    let (st, msg) = v.put_status(
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Diff", "snapshot_path": dir.join("d.state"), "mem_file_path": dir.join("d.mem")}),
    );
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("track_dirty_pages"), "{msg}");
    assert!(
        !dir.join("d.mem").exists(),
        "a refused Diff leaves no memory file"
    );
    let last = v.snapshot("Full", &dir.join("f.state"), &dir.join("f.mem"));
    drop(v);

    let (mut w, _) = load_file(
        dir.path(),
        "restored",
        &dir.join("f.state"),
        &dir.join("f.mem"),
        false,
    );
    assert_continues(&mut w, last);
    w.set_state("Paused");
    let (st, msg) = w.put_status(
        "/snapshot/create",
        serde_json::json!({"snapshot_type": "Diff", "snapshot_path": dir.join("d2.state"), "mem_file_path": dir.join("d2.mem")}),
    );
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("track_dirty_pages"), "{msg}");
}

/// Whether this host gives ember-vmm a userfaultfd (root, or access to
/// /dev/userfaultfd); None with the reason when not.
fn uffd_unavailable() -> Option<String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd");
    if dev.is_ok() {
        return None;
    }
    // SAFETY: the system call takes flags only; the descriptor is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: closes the descriptor just made.
        unsafe { libc::close(fd as i32) };
        return None;
    }
    Some(format!(
        "no userfaultfd: /dev/userfaultfd: {}; userfaultfd(2): {}",
        dev.unwrap_err(),
        std::io::Error::last_os_error()
    ))
}

/// The Uffd backend: ember-uffd-handler serves the restored guest's pages
/// from the Full memory file; the guest goes on with matching memory, and
/// the handler exits when the VMM does. Load times of both backends are
/// printed.
#[test]
fn uffd_backend_serves_the_restored_guest() {
    if let Some(why) = uffd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("snapmem-uffd");
    let mut v = start_vmm(dir.path(), "src");
    v.boot_mempattern(false);
    v.wait_round_above(1);
    let last = v.snapshot("Full", &dir.join("s.state"), &dir.join("s.mem"));
    drop(v);

    // File backend, for the comparison.
    let (mut f, file_us) = load_file(
        dir.path(),
        "file",
        &dir.join("s.state"),
        &dir.join("s.mem"),
        false,
    );
    assert_continues(&mut f, last);
    let f_log = f.p.err();
    drop(f);

    let hsock = dir.join("pf-handler.sock");
    let mut h = spawn_uffd_handler(dir.path(), &hsock, &dir.join("s.mem"));
    let mode = std::fs::metadata(&hsock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let mut w = start_vmm(dir.path(), "uffd");
    let t = Instant::now();
    w.put(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": dir.join("s.state"),
            "mem_backend": {"backend_type": "Uffd", "backend_path": hsock},
            "resume_vm": true
        }),
    );
    let uffd_us = t.elapsed().as_micros();
    println!("snapshot load (PUT /snapshot/load, 32 MiB guest): File backend {file_us} us, Uffd backend {uffd_us} us");
    // ember-vmm's own account of each load.
    for (backend, log) in [("File", f_log), ("Uffd", w.p.err())] {
        for l in log.lines().filter(|l| l.contains("snapshot loaded in")) {
            println!("{backend}: {l}");
        }
    }
    assert_continues(&mut w, last);
    drop(w);
    assert!(h.wait().success(), "handler: {}", h.err());
    let err = h.err();
    assert!(err.contains("served"), "{err}");
    println!("{}", err.trim());
    assert!(!hsock.exists(), "the handler removes its socket");
}

/// A Uffd load whose handler socket is missing is refused with a clear
/// message, and the VMM can still load from a file afterwards.
#[test]
fn uffd_load_without_a_handler_is_refused() {
    if let Some(why) = uffd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = TempDir::new("snapmem-nohandler");
    let v = start_vmm(dir.path(), "src");
    v.boot_mempattern(false);
    let mut v = v;
    v.wait_round_above(0);
    let last = v.snapshot("Full", &dir.join("s.state"), &dir.join("s.mem"));
    drop(v);
    let mut w = start_vmm(dir.path(), "vm");
    let (st, msg) = w.put_status(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": dir.join("s.state"),
            "mem_backend": {"backend_type": "Uffd", "backend_path": dir.join("nobody.sock")},
            "resume_vm": true
        }),
    );
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("page-fault handler"), "{msg}");
    w.put(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": dir.join("s.state"),
            "mem_backend": {"backend_type": "File", "backend_path": dir.join("s.mem")},
            "resume_vm": true
        }),
    );
    assert_continues(&mut w, last);
}

/// The Uffd backend from a jail, as Firecracker documents it: the VMM
/// unprivileged under seccomp, the handler as the same user with its socket
/// and the memory file inside the jail. Without `--userfaultfd` the jailed
/// VMM has no userfaultfd and the load is refused naming what to grant.
#[test]
fn uffd_backend_in_a_jail_needs_the_jailers_userfaultfd_flag() {
    if let Some(why) = uffd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    if !Path::new("/dev/userfaultfd").exists() {
        eprintln!("skipped: no /dev/userfaultfd on this host (Linux < 6.1)");
        return;
    }
    let dir = TempDir::new("snapmem-jailuffd");
    let mut v = start_vmm(dir.path(), "src");
    v.boot_mempattern(false);
    v.wait_round_above(1);
    let last = v.snapshot("Full", &dir.join("s.state"), &dir.join("s.mem"));
    drop(v);

    let strict = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "0")
        .unwrap_or(false);
    if strict {
        let c = Jail::new("nouffd");
        c.place("/restore.state", &dir.join("s.state"));
        let w: Vmm = c.spawn(&[], dir.path()).into();
        let (st, msg) = w.put_status(
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": "/restore.state",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "/pf.sock"},
                "resume_vm": true
            }),
        );
        assert_eq!(st, 400, "{msg}");
        assert!(msg.contains("userfaultfd is not available"), "{msg}");
    }

    let b = Jail::new("uffd");
    b.place("/restore.state", &dir.join("s.state"));
    b.place("/restore.mem", &dir.join("s.mem"));
    let mut w: Vmm = b.spawn(&["--userfaultfd"], dir.path()).into();
    let dev = std::fs::metadata(b.host("/dev/userfaultfd")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&dev.permissions()) & 0o777,
        0o600
    );
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&dev), JAIL_UID);
    let mut h = Proc::spawn(
        {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new(bin("ember-uffd-handler"));
            c.arg("--socket")
                .arg(b.host("/pf.sock"))
                .arg("--mem-file")
                .arg(b.host("/restore.mem"))
                .uid(JAIL_UID)
                .gid(JAIL_GID);
            c
        },
        dir.path(),
        "handler",
    );
    h.expect_out("listening on");
    w.put(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": "/restore.state",
            "mem_backend": {"backend_type": "Uffd", "backend_path": "/pf.sock"},
            "resume_vm": true
        }),
    );
    assert_continues(&mut w, last);
    drop(w);
    assert!(h.wait().success(), "handler: {}", h.err());
}

/// One `ember-guest: round N blk B net N vsock V ...` line of the test
/// guest's `snap-io` mode (see tests/tests/snapshot_devices.rs).
fn io_rounds(out: &str) -> Vec<(u64, bool, u32)> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("ember-guest: round ")?.split(' ').collect();
            if w.len() != 13 {
                return None;
            }
            let ok = w[2] == "ok" && w[4] == "ok" && w[6] == "ok";
            Some((w[0].parse().ok()?, ok, w[12].parse().ok()?))
        })
        .collect()
}

/// Waits for a `snap-io` round after `after` with every device ok.
fn wait_io_round(p: &mut Proc, after: u64) -> (u64, bool, u32) {
    let found = wait_for(PATIENCE, || {
        match io_rounds(&p.out()).into_iter().find(|r| r.0 > after && r.1) {
            Some(r) => Some(Some(r)),
            None => p.try_status().map(|_| None),
        }
    });
    found.flatten().unwrap_or_else(|| {
        panic!(
            "no good io round after {after}\nstdout:\n{}\nstderr:\n{}",
            p.out(),
            p.err()
        )
    })
}

/// A Diff taken while block, net and vsock were busy (the guest's `snap-io`
/// rounds), rebased onto its Full base, restores a VM whose devices go on,
/// with the vsock transport reset. The host side is
/// tests/tests/snapshot_devices.rs's (a UDP echo in a namespace behind the
/// TAP, a vsock line echo). (This guest also writes the pages the VMM
/// writes for it, so the union with vm-memory's bitmap is proven by
/// `take_dirty_reads_kvm_and_bitmap_then_starts_over` in dirty.rs, not here.)
#[test]
fn a_diff_taken_during_device_io_restores_with_working_devices() {
    use std::io::{BufRead, BufReader, Write};
    let ns = NetNs::new("smd", "embsmd0", "10.0.0.1", None);
    let dir = TempDir::new("snapmem-io");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let (uds1, uds2) = (dir.join("v1.sock"), dir.join("v2.sock"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for uds in [&uds1, &uds2] {
        let l = std::os::unix::net::UnixListener::bind(format!("{}_52", uds.display())).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                            .unwrap();
                        let mut w = s.try_clone().unwrap();
                        let mut line = String::new();
                        if BufReader::new(s).read_line(&mut line).is_ok() {
                            let _ = w.write_all(line.as_bytes());
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }));
    }
    {
        let stop = stop.clone();
        threads.push(ns.spawn_in(move || {
            let s = std::net::UdpSocket::bind("10.0.0.1:7").expect("bind echo");
            s.set_read_timeout(Some(std::time::Duration::from_millis(50)))
                .unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((len, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..len], peer);
                }
            }
        }));
    }
    let spawn = |tag: &str, cfg: Option<&serde_json::Value>| {
        let sock = dir.join(&format!("{tag}.sock"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(bin("ember-vmm"))
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", tag]);
        if let Some(cfg) = cfg {
            let p = dir.join(&format!("{tag}.json"));
            std::fs::write(&p, cfg.to_string()).unwrap();
            cmd.arg("--config-file").arg(&p);
        }
        let p = Proc::spawn(cmd, dir.path(), tag);
        wait_for_socket(&sock);
        Vmm::from(ApiVmm { p, sock })
    };
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": PVH_ELF,
            "boot_args": "ember.test=snap-io ember.ip=10.0.0.2 ember.peer=10.0.0.1"
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true},
        "drives": [{"drive_id": "data", "path_on_host": disk,
                    "is_root_device": false, "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "embsmd0",
                                "guest_mac": "06:00:0a:00:00:02"}],
        "vsock": {"guest_cid": 3, "uds_path": uds1}
    });
    let mut a = spawn("io-src", Some(&cfg));
    let r = wait_io_round(&mut a.p, 1);
    a.snapshot("Full", &dir.join("full.state"), &dir.join("full.mem"));
    a.set_state("Resumed");
    wait_io_round(&mut a.p, r.0 + 1);
    a.snapshot("Diff", &dir.join("diff.state"), &dir.join("diff.mem"));
    let last = io_rounds(&a.p.out()).last().unwrap().0;
    drop(a);
    let (full, diff) = (
        data_bytes(&dir.join("full.mem")),
        data_bytes(&dir.join("diff.mem")),
    );
    println!("snap-io guest (64 MiB, block, net, vsock): Full {full} bytes of data, Diff {diff}");
    assert!(diff > 0 && diff < full, "{diff} of {full}");

    let merged = dir.join("merged.mem");
    std::fs::copy(dir.join("full.mem"), &merged).unwrap();
    rebase(&merged, &dir.join("diff.mem"));
    let mut b = spawn("io-dst", None);
    b.put(
        "/snapshot/load",
        serde_json::json!({
            "snapshot_path": dir.join("diff.state"),
            "mem_backend": {"backend_type": "File", "backend_path": merged},
            "vsock_override": {"uds_path": uds2},
            "resume_vm": true
        }),
    );
    let r = wait_io_round(&mut b.p, last);
    assert!(r.2 >= 1, "no vsock transport reset seen: {r:?}");
    wait_io_round(&mut b.p, r.0);
    drop(b);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
}

/// The VMM's own writes are in a Diff: the `mempattern-rng` guest only
/// reads the page virtio-rng fills for it (KVM's dirty log never sees it),
/// and checks each round that it still hashes as after the last fill. A
/// Diff taken after more fills, rebased onto the Full, restores it with the
/// page as the device last wrote it.
#[test]
fn a_diff_holds_the_pages_only_the_vmm_wrote() {
    let dir = TempDir::new("snapmem-rng");
    let mut v = start_vmm(dir.path(), "src");
    v.prefix = RNG_PREFIX;
    v.put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": PVH_ELF, "boot_args": "console=ttyS0 ember.test=mempattern-rng"}),
    );
    v.put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": true}),
    );
    v.put("/entropy", serde_json::json!({}));
    v.put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    v.wait_round_above(1);
    v.snapshot("Full", &dir.join("full.state"), &dir.join("full.mem"));
    v.set_state("Resumed");
    let at = v.rounds().last().unwrap().0;
    v.wait_round_above(at + 1);
    let last = v.snapshot("Diff", &dir.join("diff.state"), &dir.join("diff.mem"));
    assert!(v.rounds().iter().all(|&(_, bad)| bad == 0), "{}", v.p.out());
    drop(v);

    let merged = dir.join("merged.mem");
    std::fs::copy(dir.join("full.mem"), &merged).unwrap();
    rebase(&merged, &dir.join("diff.mem"));
    let (mut w, _) = load_file(
        dir.path(),
        "restored",
        &dir.join("diff.state"),
        &merged,
        false,
    );
    w.prefix = RNG_PREFIX;
    assert_continues(&mut w, last);
}

/// As Firecracker documents, the first Diff of a booted VM resumes as it is
/// (no base): it holds every page written since boot (KVM's log since the
/// slots were registered, and the VMM's writes since memory was made: the
/// kernel image, boot parameters, page tables), and the holes read as the
/// zeros they were.
#[test]
fn the_first_diff_of_a_booted_vm_loads_without_a_base() {
    let dir = TempDir::new("snapmem-firstdiff");
    let mut v = start_vmm(dir.path(), "src");
    v.boot_mempattern(true);
    v.wait_round_above(1);
    let last = v.snapshot("Diff", &dir.join("d.state"), &dir.join("d.mem"));
    drop(v);
    let (mut w, _) = load_file(
        dir.path(),
        "restored",
        &dir.join("d.state"),
        &dir.join("d.mem"),
        false,
    );
    assert_continues(&mut w, last);
}
