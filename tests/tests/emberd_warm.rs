//! emberd's instant starts (`--snapshot-starts`): instances restored from a
//! template snapshot of their image's booted guest, a pool of idle jailed
//! VMMs, and the fall-back to a cold boot. Driven as the UniK client drives
//! emberd: `POST /images/NAME/create` (multipart, as unik's
//! `client.Images().Build`), `POST /volumes/NAME` (`client.Volumes().Create`),
//! `POST /instances/run` (`client.Instances().Run`), `GET
//! /instances/NAME/logs` (`client.Instances().GetLogs`) and `DELETE
//! /instances/NAME` (`client.Instances().Delete`).

use std::path::PathBuf;

use ember_tests::*;
use serde_json::{json, Value};

/// Prints its arguments, an env var and a file of its volume.
const WARM_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <ember.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    char buf[128];
    long n = ember_read_file("/data/who.txt", buf, sizeof buf - 1);
    if (n < 0) { printf("read failed: %s\n", ember_strerror(n)); return 1; }
    buf[n] = 0;
    printf("volume says: %s\n", buf);
    return 0;
}
"#;

fn flags(pool: &str) -> Vec<&str> {
    vec![
        "--snapshot-starts",
        "--snapshot-pool",
        pool,
        "--vmm-ids",
        "16",
    ]
}

/// The idle pooled VMMs of `d`: processes jailed under its chroot base
/// whose `--id` is a pool id.
fn pool_vmms(d: &Emberd) -> Vec<u32> {
    jailed_processes(&d.dir.join("jail"))
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .split('\0')
                        .any(|a| a.starts_with("pool-"))
                })
                .unwrap_or(false)
        })
        .collect()
}

fn wait_pool(d: &Emberd, n: usize) -> Vec<u32> {
    wait_for(PATIENCE, || {
        let p = pool_vmms(d);
        (p.len() == n).then_some(p)
    })
    .unwrap_or_else(|| {
        panic!(
            "the pool never held {n} idle VMMs: {:?}\n{}",
            pool_vmms(d),
            d.err()
        )
    })
}

fn volume(d: &Emberd, name: &str, text: &str) {
    let tgz = make_tar(d.dir.path(), &[("who.txt", text.as_bytes())]);
    let form = format!("tarfile=@{}", tgz.display());
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &form,
        &format!("http://localhost/volumes/{name}"),
    ]);
    assert_eq!(c, 201, "{v}");
}

fn instance(d: &Emberd, name: &str) -> Value {
    d.json(&[&format!("http://localhost/instances/{name}")]).1
}

/// Waits until `name` reads `stopped` (its VMM is gone).
fn wait_stopped(d: &Emberd, name: &str) {
    wait_for(PATIENCE, || {
        (instance(d, name)["State"] == "stopped").then_some(())
    })
    .unwrap_or_else(|| panic!("{name} never stopped: {}", instance(d, name)));
}

fn jail_entries(d: &Emberd) -> Vec<String> {
    std::fs::read_dir(d.dir.join("jail").join("ember-vmm"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM to emberd, and waits for it to end.
fn stop(d: &mut Emberd) {
    let mut p = d.proc_.take().expect("emberd runs");
    // SAFETY: kill(2) on the emberd this test started.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    p.wait();
}

#[test]
fn a_broken_template_falls_back_to_a_cold_boot() {
    let mut d = Emberd::start("warm-broken", 10610, &flags("2"));
    let img = d.c_image("warm", WARM_C, &["mounts=/data", "args=a1 a2"]);
    // Not set on the image: emberd's --snapshot-starts decides.
    assert_eq!(img["SnapshotStarts"], Value::Null, "{img}");
    volume(&d, "v1", "volume one");
    let pool = wait_pool(&d, 2);
    // A corrupt template where emberd keeps the one for this machine size
    // (image, 32 MiB, 1 vCPU, 1 volume): the VMM must refuse it.
    let id = img["Id"].as_str().unwrap();
    let tpl = d
        .dir
        .join("state")
        .join("snapshots")
        .join(format!("{id}-32m-1c-1d"));
    std::fs::create_dir_all(&tpl).unwrap();
    std::fs::write(tpl.join("snapshot.state"), b"EMBERSNP but not really").unwrap();
    std::fs::write(tpl.join("snapshot.mem"), vec![0u8; 4096]).unwrap();
    std::fs::write(tpl.join("ready"), b"1\n").unwrap();
    let inst = d.run_instance(
        &json!({"InstanceName": "i1", "ImageName": "warm", "MemoryMb": 32,
               "Env": {"GREETING": "hello one"}, "Mounts": {"/data": "v1"}}),
    );
    let iid = inst["Id"].as_str().unwrap().to_string();
    let l = d.wait_logs("i1", "ember: exit");
    assert!(l.contains("snapshot start failed"), "{l}");
    assert!(l.contains("booting cold"), "{l}");
    assert!(l.contains("arg 1: a1") && l.contains("arg 2: a2"), "{l}");
    assert!(l.contains("GREETING=hello one"), "{l}");
    assert!(l.contains("volume says: volume one"), "{l}");
    assert!(l.contains("ember: exit 0"), "{l}");
    assert_eq!(instance(&d, "i1")["StartedFrom"], "cold");
    wait_stopped(&d, "i1");
    // The instance took one pooled VMM, which is gone; the pool refills.
    let refilled = wait_pool(&d, 2);
    assert!(
        pool.iter().any(|p| !refilled.contains(p)),
        "{pool:?} {refilled:?}"
    );
    // Delete leaves no VMM or jail of the instance.
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/i1"]).0,
        204
    );
    assert!(vmm_processes(&iid).is_empty());
    assert!(!jail_entries(&d).contains(&iid), "{:?}", jail_entries(&d));
    // SIGTERM: the idle VMMs and their jails go with emberd.
    stop(&mut d);
    assert!(pool_vmms(&d).is_empty(), "{:?}", pool_vmms(&d));
    assert!(
        !jail_entries(&d).iter().any(|e| e.starts_with("pool-")),
        "{:?}",
        jail_entries(&d)
    );
}

#[test]
fn idle_vmms_of_a_killed_emberd_are_reaped_on_restart() {
    let mut d = Emberd::start("warm-restart", 10630, &flags("2"));
    let before = wait_pool(&d, 2);
    d.kill9();
    // Still there: nothing stopped them.
    assert_eq!(pool_vmms(&d).len(), 2);
    d.restart();
    let after = wait_pool(&d, 2);
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} {after:?}"
    );
    for p in &before {
        // Gone, or a zombie its new parent has not reaped yet.
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("");
        assert!(stat.is_empty() || state == "Z", "pid {p} lives: {stat}");
    }
}

#[test]
fn without_the_flag_nothing_is_pooled() {
    let d = Emberd::start("warm-off", 10640, &["--vmm-ids", "16"]);
    let img = d.c_image("plain", IDLE_C, &[]);
    assert_eq!(img["SnapshotStarts"], Value::Null);
    d.run_instance(&json!({"InstanceName": "p1", "ImageName": "plain", "MemoryMb": 32}));
    d.wait_logs("p1", "idle instance up");
    assert_eq!(instance(&d, "p1")["StartedFrom"], "cold");
    assert!(pool_vmms(&d).is_empty());
    assert!(!d.dir.join("state").join("snapshots").exists());
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/p1?force=true"])
            .0,
        204
    );
    // A bad switch value is refused.
    let tgz = make_tar(d.dir.path(), &[("main.c", IDLE_C.as_bytes())]);
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-F",
        &format!("tarfile=@{}", tgz.display()),
        "-F",
        "provider=ember",
        "-F",
        "base=ember",
        "-F",
        "lang=c",
        "-F",
        "snapshot_starts=maybe",
        "http://localhost/images/bad/create",
    ]);
    assert_eq!(c, 400, "{v}");
    assert!(
        v["Error"]
            .as_str()
            .unwrap_or("")
            .contains("snapshot_starts"),
        "{v}"
    );
}

/// Prints its arguments, an env var, its volume's file and a random number.
const RESTORED_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <ember.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) printf("arg %d: %s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    char buf[128];
    long n = ember_read_file("/data/who.txt", buf, sizeof buf - 1);
    if (n < 0) { printf("read failed: %s\n", ember_strerror(n)); return 1; }
    buf[n] = 0;
    printf("volume says: %s\n", buf);
    unsigned long r;
    ember_random(&r, sizeof r);
    printf("random: %lx\n", r);
    return 0;
}
"#;

fn line_after<'a>(log: &'a str, prefix: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {log}"))
}

#[test]
fn restored_instances_read_their_own_env_args_and_volume() {
    let d = Emberd::start("warm-restore", 10650, &flags("2"));
    let img = d.c_image("warm", RESTORED_C, &["mounts=/data", "args=a1 a2"]);
    let id = img["Id"].as_str().unwrap().to_string();
    for v in ["v0", "v1", "v2"] {
        volume(&d, v, &format!("volume {v}"));
    }
    // The first run boots cold and makes the template in the background.
    d.run_instance(
        &json!({"InstanceName": "first", "ImageName": "warm", "MemoryMb": 32,
               "Mounts": {"/data": "v0"}}),
    );
    d.wait_logs("first", "ember: exit 0");
    assert_eq!(instance(&d, "first")["StartedFrom"], "cold");
    let tpl: PathBuf = d
        .dir
        .join("state")
        .join("snapshots")
        .join(format!("{id}-32m-1c-1d"));
    let error = tpl.with_extension("error");
    wait_for(PATIENCE, || {
        (tpl.join("ready").exists() || error.exists()).then_some(())
    })
    .unwrap_or_else(|| panic!("no template: {}", d.err()));
    if let Ok(why) = std::fs::read_to_string(&error) {
        panic!("the template failed: {why}");
    }
    wait_pool(&d, 2);
    let mut randoms = Vec::new();
    for (name, vol, greeting) in [("r1", "v1", "one"), ("r2", "v2", "two")] {
        let inst = d.run_instance(
            &json!({"InstanceName": name, "ImageName": "warm", "MemoryMb": 32,
                   "Env": {"GREETING": greeting}, "Mounts": {"/data": vol}}),
        );
        assert_eq!(inst["StartedFrom"], "snapshot", "{inst}");
        d.wait_logs(name, "ember: exit");
        wait_stopped(&d, name);
        let l = d.wait_logs(name, "restored from snapshot");
        assert!(!l.contains("booting cold"), "{l}");
        assert!(l.contains("arg 1: a1") && l.contains("arg 2: a2"), "{l}");
        assert!(l.contains(&format!("GREETING={greeting}")), "{l}");
        assert!(l.contains(&format!("volume says: volume {vol}")), "{l}");
        assert!(l.contains("ember: exit 0"), "{l}");
        randoms.push(line_after(&l, "random: ").to_string());
        let iid = inst["Id"].as_str().unwrap().to_string();
        assert_eq!(
            d.curl(&[
                "-X",
                "DELETE",
                &format!("http://localhost/instances/{name}")
            ])
            .0,
            204
        );
        assert!(vmm_processes(&iid).is_empty());
        assert!(!jail_entries(&d).contains(&iid));
    }
    assert_ne!(
        randoms[0], randoms[1],
        "restored copies drew the same random number"
    );

    // Identity: two restored copies of a guest that stays up each have a
    // vsock CID of their own (ember-vmm's GET /vm/config shows the
    // restored machine, overrides applied).
    let idle = d.c_image("idler", IDLE_C, &[]);
    let idle_id = idle["Id"].as_str().unwrap().to_string();
    d.run_instance(&json!({"InstanceName": "idle0", "ImageName": "idler", "MemoryMb": 32}));
    d.wait_logs("idle0", "idle instance up");
    let tpl = d
        .dir
        .join("state")
        .join("snapshots")
        .join(format!("{idle_id}-32m-1c-0d"));
    wait_for(PATIENCE, || tpl.join("ready").exists().then_some(()))
        .unwrap_or_else(|| panic!("no template for the idle image"));
    wait_pool(&d, 2);
    let mut cids = Vec::new();
    for name in ["idle1", "idle2"] {
        let inst =
            d.run_instance(&json!({"InstanceName": name, "ImageName": "idler", "MemoryMb": 32}));
        assert_eq!(inst["StartedFrom"], "snapshot", "{inst}");
        d.wait_logs(name, "restored from snapshot");
        let id = inst["Id"].as_str().unwrap();
        let sock = d
            .dir
            .join("jail")
            .join("ember-vmm")
            .join(id)
            .join("root/run/api.sock");
        let r = http(&sock, "GET", "/vm/config", None);
        assert_eq!(r.status, 200);
        cids.push(r.json()["vsock"]["guest_cid"].clone());
    }
    assert_ne!(cids[0], cids[1], "{cids:?}");
    assert!(
        cids.iter().all(|c| c.as_u64().is_some_and(|c| c != 3)),
        "{cids:?}"
    );
    for name in ["idle0", "idle1", "idle2"] {
        let u = format!("http://localhost/instances/{name}?force=true");
        assert_eq!(d.curl(&["-X", "DELETE", &u]).0, 204);
    }
}
