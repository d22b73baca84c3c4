//! The C unikernel runtime's warm start (`ember.warm=1`,
//! `resources/unikernel/src/warm.c`) against emberd's restore config server
//! (`api_server::runtime::restore_config`), under ember-vmm directly.
//!
//! A program compiled by emberd's own `ember-c-ember` compiler prints its
//! argv, one environment variable, a random number and a file of its
//! mounted ext4 volume. Cold, all of that comes from the command line; a
//! warm template stops at `ember: snapshot point` without running main;
//! each guest restored from that template's snapshot fetches its own argv,
//! environment, mount and seed from a [`ConfigServer`] at
//! `<vsock uds_path>_1024` (the VMM forwards the guest's connection to host
//! port 1024 there after the TRANSPORT_RESET event of the load).

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api_server::build::ember::EmberC;
use api_server::build::{CompileInput, Compiler};
use api_server::runtime::restore_config::{ConfigServer, RestoreConfig, ServeOutcome};
use ember_tests::*;
use serde_json::json;

const PROGRAM: &str = r#"#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	for (int i = 0; i < argc; i++)
		printf("argv[%d]=%s\n", i, argv[i]);
	const char *who = getenv("WHO");
	printf("WHO=%s\n", who ? who : "(unset)");
	unsigned long r[2];
	ember_random(r, sizeof(r));
	printf("random=%016lx%016lx\n", r[0], r[1]);
	char buf[128];
	long n = ember_read_file("/data/hello.txt", buf, sizeof(buf) - 1);
	if (n < 0) {
		printf("file error: %s\n", ember_strerror(n));
	} else {
		buf[n] = '\0';
		printf("file=%s\n", buf);
	}
	return 0;
}
"#;

/// The program as emberd's `ember-c-ember` compiler builds it.
fn compile(dir: &TempDir) -> PathBuf {
    let src = dir.join("src");
    let out = dir.join("out");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("main.c"), PROGRAM).unwrap();
    let r = EmberC::new()
        .compile(&CompileInput {
            src_dir: &src,
            out_dir: &out,
        })
        .unwrap_or_else(|e| panic!("compile: {e}"));
    out.join(r.kernel)
}

/// A 4 MiB ext4 image holding hello.txt = `text` (mkfs.ext4 -d).
fn volume(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let root = dir.join(&format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), text).unwrap();
    let img = dir.join(&format!("{name}.ext4"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 failed: {st}");
    img
}

fn vm_cfg(kernel: &Path, boot_args: &str, disk: &Path, uds: Option<&Path>) -> serde_json::Value {
    let mut cfg = json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "data", "path_on_host": disk,
                    "is_root_device": false, "is_read_only": true}],
    });
    if let Some(uds) = uds {
        cfg["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
    }
    cfg
}

fn spawn_vmm(dir: &Path, tag: &str, cfg: Option<&serde_json::Value>, api: Option<&Path>) -> Proc {
    let mut cmd = Command::new(bin("ember-vmm"));
    match api {
        Some(sock) => cmd.arg("--api-sock").arg(sock),
        None => cmd.arg("--no-api"),
    };
    if let Some(cfg) = cfg {
        let p = dir.join(format!("{tag}.json"));
        std::fs::write(&p, cfg.to_string()).unwrap();
        cmd.arg("--config-file").arg(p);
    }
    Proc::spawn(cmd, dir, tag)
}

fn line_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key))
}

/// Cold runs are unchanged, and a warm template stops at the snapshot point
/// (main not run) until a restore: it needs a vsock device.
#[test]
fn cold_runs_unchanged_and_a_warm_template_stops_at_the_snapshot_point() {
    let dir = TempDir::new("warm-rt-cold");
    let kernel = compile(&dir);
    let disk = volume(&dir, "cold", "from the cold volume");

    let cfg = vm_cfg(
        &kernel,
        "console=ttyS0 ember.mount=/data:0 WHO=cold -- one two",
        &disk,
        None,
    );
    bin("ember-vmm"); // built before the clock starts
    let t0 = Instant::now();
    let mut p = spawn_vmm(dir.path(), "cold", Some(&cfg), None);
    // Measured, not asserted (compare the restores' load-to-main times).
    let first = wait_for(PATIENCE, || {
        std::thread::sleep(Duration::from_micros(200));
        let out = p.out();
        (out.contains("argv[0]") || out.contains("ember: exit")).then(|| t0.elapsed())
    });
    eprintln!("cold: spawn of ember-vmm to the first line of main {first:?}");
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    let out = p.out();
    for want in [
        "argv[0]=ember\n",
        "argv[1]=one\n",
        "argv[2]=two\n",
        "WHO=cold\n",
        "file=from the cold volume\n",
        "ember: exit 0\n",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(!out.contains("snapshot point"), "{out}");
    let r = line_value(&out, "random=").expect("a random line");
    assert_eq!(r.len(), 32, "{out}");

    // Warm without a vsock device: a clear refusal, status 1.
    let cfg = vm_cfg(&kernel, "console=ttyS0 ember.warm=1", &disk, None);
    let mut p = spawn_vmm(dir.path(), "novsock", Some(&cfg), None);
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
    let out = p.out();
    assert!(
        out.contains("ember: warm start needs a vsock device\nember: exit 1\n"),
        "{out}"
    );

    // The template: the snapshot point, then nothing until a restore.
    let uds = dir.join("t.sock");
    let cfg = vm_cfg(&kernel, "console=ttyS0 ember.warm=1", &disk, Some(&uds));
    let mut p = spawn_vmm(dir.path(), "template", Some(&cfg), None);
    p.expect_out("ember: snapshot point\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(p.try_status().is_none(), "the template waits:\n{}", p.out());
    assert!(
        !p.out().contains("argv["),
        "main ran before a restore:\n{}",
        p.out()
    );
}

fn api(sock: &Path, method: &str, path: &str, body: serde_json::Value) {
    let r = http(sock, method, path, Some(&body.to_string()));
    assert!(
        (200..300).contains(&r.status),
        "{method} {path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
}

/// What answers at `<uds_path>_1024` for a restored guest.
enum Channel<'a> {
    /// emberd's server with this config.
    Server(&'a RestoreConfig),
    /// A plain listener writing these bytes.
    Raw(&'static [u8]),
    /// Nothing listens.
    Nobody,
}

/// A fresh VMM that loads the snapshot with its own vsock socket, CID and
/// volume, and `channel` for its config.
fn restore(
    dir: &TempDir,
    tag: &str,
    snap: &(PathBuf, PathBuf),
    cid: u32,
    disk: &Path,
    channel: Channel,
) -> (Proc, Option<ConfigServer>) {
    let rdir = dir.join(tag);
    std::fs::create_dir_all(&rdir).unwrap();
    let uds = rdir.join("v.sock");
    let cfg_sock = rdir.join("v.sock_1024");
    let server = match channel {
        Channel::Nobody => None,
        Channel::Server(cfg) => Some(ConfigServer::listen(&cfg_sock, None, cfg).unwrap()),
        Channel::Raw(raw) => {
            let l = UnixListener::bind(&cfg_sock).unwrap();
            std::thread::spawn(move || {
                use std::io::Write;
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(raw);
                }
            });
            None
        }
    };
    let api_sock = rdir.join("api.sock");
    let mut p = spawn_vmm(&rdir, tag, None, Some(&api_sock));
    wait_for_socket(&api_sock);
    let t0 = Instant::now();
    api(
        &api_sock,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": snap.0,
            "mem_backend": {"backend_type": "File", "backend_path": snap.1},
            "resume_vm": true,
            "vsock_override": {"uds_path": uds, "guest_cid": cid},
            "drive_overrides": [{"drive_id": "data", "path_on_host": disk}],
        }),
    );
    let loaded = t0.elapsed();
    // Measured, not asserted: the load call, and the load until main's
    // first line (config fetched over vsock and applied), polled every 200 us.
    let first = wait_for(PATIENCE, || {
        std::thread::sleep(Duration::from_micros(200));
        let out = p.out();
        (out.contains("argv[0]") || out.contains("ember: exit")).then(|| t0.elapsed())
    });
    eprintln!("{tag}: PUT /snapshot/load {loaded:?}, load to the first line of main {first:?}");
    p.expect_out("ember: exit ");
    (p, server)
}

/// Two guests restored from one template's snapshot each read their own
/// argv, environment and volume, and draw different random numbers; a bad
/// config ends the guest with `ember: bad restore config`, none with
/// `ember: no restore config`.
#[test]
fn restored_guests_read_their_own_args_env_volume_and_seed() {
    let dir = TempDir::new("warm-rt-restore");
    let kernel = compile(&dir);
    let template_disk = volume(&dir, "template", "template volume, never read");

    // Template: boot cold with ember.warm=1, wait for the point, pause, snapshot.
    let tdir = dir.join("template");
    std::fs::create_dir_all(&tdir).unwrap();
    let api_sock = tdir.join("api.sock");
    let cfg = vm_cfg(
        &kernel,
        "console=ttyS0 ember.warm=1",
        &template_disk,
        Some(&tdir.join("v.sock")),
    );
    let mut t = spawn_vmm(&tdir, "template", Some(&cfg), Some(&api_sock));
    t.expect_out("ember: snapshot point\n");
    api(&api_sock, "PATCH", "/vm", json!({"state": "Paused"}));
    let snap = (dir.join("vm.snap"), dir.join("vm.mem"));
    api(
        &api_sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": snap.0, "mem_file_path": snap.1}),
    );
    drop(t);

    let mut outs = Vec::new();
    for (tag, who, args, cid) in [
        ("r1", "first", "alpha", 7),
        ("r2", "second", "beta gamma", 8),
    ] {
        let disk = volume(&dir, tag, &format!("volume of {who}"));
        let mut env = BTreeMap::new();
        env.insert("WHO".to_string(), who.to_string());
        let cfg = RestoreConfig::from_instance(&[("/data".into(), 0)], &env, args).unwrap();
        let (mut p, server) = restore(&dir, tag, &snap, cid, &disk, Channel::Server(&cfg));
        assert_eq!(p.wait().code(), Some(0), "{}", p.err());
        let out = p.out();
        assert!(
            !out.contains("snapshot point"),
            "a restored VMM's console starts after the point:\n{out}"
        );
        let mut want = vec!["argv[0]=ember".to_string()];
        want.extend(
            args.split(' ')
                .enumerate()
                .map(|(i, a)| format!("argv[{}]={a}", i + 1)),
        );
        want.push(format!("WHO={who}"));
        want.push(format!("file=volume of {who}"));
        want.push("ember: exit 0".into());
        for w in want {
            assert!(out.contains(&format!("{w}\n")), "{w:?} missing:\n{out}");
        }
        eprintln!("{tag} console:\n{out}");
        let outcome = server.unwrap().wait();
        assert!(
            matches!(outcome, ServeOutcome::Fetched { .. }),
            "{outcome:?}"
        );
        outs.push(out);
    }
    let r1 = line_value(&outs[0], "random=").unwrap();
    let r2 = line_value(&outs[1], "random=").unwrap();
    assert_ne!(r1, r2, "two restores of one snapshot share a random stream");

    // A malformed config: the guest refuses it and exits 1.
    let disk = volume(&dir, "bad", "unused");
    let (mut p, _) = restore(
        &dir,
        "bad",
        &snap,
        9,
        &disk,
        Channel::Raw(b"ember-config 2\nend\n"),
    );
    p.wait();
    let out = p.out();
    assert!(
        out.contains("ember: bad restore config\nember: exit 1\n"),
        "{out}"
    );
    assert!(!out.contains("argv["), "{out}");

    // Nobody serves a config: the guest gives up after its 10 s and exits 1.
    let (mut p, _) = restore(&dir, "none", &snap, 10, &disk, Channel::Nobody);
    p.wait();
    let out = p.out();
    assert!(
        out.contains("ember: no restore config\nember: exit 1\n"),
        "{out}"
    );
    assert!(!out.contains("argv["), "{out}");
}
