//! Two VMMs on one volume: ember-vmm takes an OFD lock on each drive's
//! backing file (write lock for read-write, read lock for read-only), so a
//! second read-write user is refused with a message naming the drive and the
//! file, read-only users share, and the lock goes away with the VMM.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_tests::*;
use serde_json::json;

/// Exit status for an unusable config file.
const BAD_CONFIG: i32 = 152;

fn volume(dir: &TempDir) -> PathBuf {
    let p = dir.join("rootfs.img");
    std::fs::write(&p, vec![0u8; 64 * 1024]).unwrap();
    p
}

fn config(vol: &Path, read_only: bool) -> serde_json::Value {
    json!({
        "boot-source": {"kernel_image_path": PVH_ELF, "boot_args": "ember.test=idle"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "drives": [{"drive_id": "rootfs", "path_on_host": vol,
                    "is_root_device": true, "is_read_only": read_only}]
    })
}

/// ember-vmm booting `cfg` from a config file, without an API.
fn spawn_vmm(dir: &TempDir, tag: &str, cfg: &serde_json::Value) -> Proc {
    let p = dir.join(&format!("{tag}.json"));
    std::fs::write(&p, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"]).arg(&p);
    Proc::spawn(cmd, dir.path(), tag)
}

/// A VMM whose guest came up (and so holds its drive's lock).
fn running_vmm(dir: &TempDir, tag: &str, cfg: &serde_json::Value) -> Proc {
    let mut p = spawn_vmm(dir, tag, cfg);
    p.expect_out("ember-guest: idle");
    p
}

fn stop(mut p: Proc) {
    let _ = p.child.kill();
    p.wait();
}

/// Asserts that `p` refused its config because the volume is locked.
fn assert_refused(p: &mut Proc, vol: &Path) {
    let st = p.wait();
    let want = format!(
        "drive rootfs: {} is in use by another VMM (locked)",
        vol.display()
    );
    assert_eq!(st.code(), Some(BAD_CONFIG), "{st:?}\nstderr:\n{}", p.err());
    assert!(
        p.err().contains(&want),
        "stderr lacks {want:?}:\n{}",
        p.err()
    );
    assert!(
        !p.out().contains("ember-guest"),
        "the guest ran: {}",
        p.out()
    );
}

#[test]
fn a_second_vmm_cannot_open_a_volume_read_write() {
    let dir = TempDir::new("vol-lock");
    let vol = volume(&dir);
    let first = running_vmm(&dir, "first", &config(&vol, false));
    // Neither read-write nor read-only next to a writer.
    for (tag, ro) in [("second-rw", false), ("second-ro", true)] {
        assert_refused(&mut spawn_vmm(&dir, tag, &config(&vol, ro)), &vol);
    }
    // Through the API, InstanceStart answers a Firecracker-style 400 and the
    // VMM keeps serving.
    let sock = dir.join("api.sock");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock);
    let mut api_vmm = Proc::spawn(cmd, dir.path(), "api");
    wait_for_socket(&sock);
    let put = |path: &str, body: serde_json::Value| api_put(&sock, path, body);
    put(
        "/boot-source",
        json!({"kernel_image_path": PVH_ELF, "boot_args": "ember.test=idle"}),
    );
    put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": vol, "is_root_device": true, "is_read_only": false}),
    );
    let r = http(
        &sock,
        "PUT",
        "/actions",
        Some(&json!({"action_type": "InstanceStart"}).to_string()),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains(&format!(
            "drive rootfs: {} is in use by another VMM (locked)",
            vol.display()
        )),
        "{msg}"
    );
    assert_eq!(http(&sock, "GET", "/", None).status, 200);
    assert!(api_vmm.try_status().is_none(), "{}", api_vmm.err());
    stop(api_vmm);

    // The lock goes with the VMM that held it.
    stop(first);
    stop(running_vmm(&dir, "after", &config(&vol, false)));
}

#[test]
fn read_only_users_share_a_volume() {
    let dir = TempDir::new("vol-ro");
    let vol = volume(&dir);
    let a = running_vmm(&dir, "ro-a", &config(&vol, true));
    let b = running_vmm(&dir, "ro-b", &config(&vol, true));
    assert_refused(&mut spawn_vmm(&dir, "rw", &config(&vol, false)), &vol);
    stop(a);
    stop(b);
}

/// Takes an OFD write lock on `f` from this (test) process, as another VMM
/// or a tool would.
fn ofd_write_lock(f: &File) {
    // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: `f` is open; `fl` is valid for the call.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, 0, "F_OFD_SETLK: {}", std::io::Error::last_os_error());
}

#[test]
fn a_lock_held_by_another_process_refuses_the_drive_also_through_a_hard_link() {
    let dir = TempDir::new("vol-held");
    let vol = volume(&dir);
    let link = dir.join("jail-view.img");
    std::fs::hard_link(&vol, &link).unwrap();
    let holder = File::options().read(true).write(true).open(&vol).unwrap();
    ofd_write_lock(&holder);
    assert_refused(&mut spawn_vmm(&dir, "rw", &config(&vol, false)), &vol);
    assert_refused(&mut spawn_vmm(&dir, "link-ro", &config(&link, true)), &link);
    drop(holder);
    stop(running_vmm(&dir, "free", &config(&link, false)));
}
