//! emberd against hostile input and hard crashes (the hardening issue):
//! host paths named in requests, files that are not what they claim to be,
//! a umask that would open everything up, and a kill -9 between spawning a
//! VMM and saving that it exists.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use ember_tests::*;
use serde_json::{json, Value};

/// What a root-only file holds; no answer may ever contain it.
const SECRET: &str = "root:$y$CANARY-SECRET-CONTENT-7f3a:19000:0:99999:7:::";

/// A root-only (0600) file with [`SECRET`] in it, at `path`.
fn canary(path: &Path) {
    let text = format!("{SECRET}\n").repeat(16);
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn instance_state(d: &Emberd, name: &str) -> String {
    d.json(&[&format!("http://localhost/instances/{name}")]).1["State"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn host_paths_are_confined_and_no_error_echoes_a_file() {
    // Outside the import directory (emberd's is the test's temp dir).
    let outside = TempDir::new("hardening-outside");
    let secret = outside.join("shadow");
    canary(&secret);
    let d = Emberd::start(
        "hardening-paths",
        10511,
        &[
            "--flintlock-max-retries",
            "1",
            "--flintlock-backoff-ms",
            "10",
        ],
    );
    let enc = |p: &Path| urlencode(&p.display().to_string());

    // hyperd: a host path outside the import directory is refused by rule.
    for p in [secret.clone(), "/etc/shadow".into(), d.dir.join("../x")] {
        let r = http(
            &d.sock,
            "POST",
            &format!("/image/create?imageName={}", enc(&p)),
            None,
        );
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{}: {body}", p.display());
        assert!(body.contains("import directory"), "{body}");
        assert!(!body.contains("CANARY"), "{body}");
    }
    // A symlink inside the import directory that points out is refused too.
    std::os::unix::fs::symlink(&secret, d.dir.join("link")).unwrap();
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/create?imageName={}", enc(&d.dir.join("link"))),
        None,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    // Inside it, a file that is not an image: an error, without its bytes.
    let inside = d.dir.join("not-an-image");
    canary(&inside);
    let r = http(
        &d.sock,
        "POST",
        &format!("/image/create?imageName={}", enc(&inside)),
        None,
    );
    let body = String::from_utf8_lossy(&r.body);
    assert!(r.status >= 400, "{body}");
    assert!(
        !body.contains("CANARY") && !body.contains("root:"),
        "{body}"
    );

    // hyperd push: only under the export directory, never through a link.
    let (c, v) = d.req(
        "POST",
        &format!(
            "/image/push?remote={}&tag=x:1",
            enc(&outside.join("layout"))
        ),
        None,
    );
    assert_eq!(c, 400, "{v}");
    assert!(
        v["Cause"].as_str().unwrap().contains("export directory"),
        "{v}"
    );
    std::os::unix::fs::symlink(outside.path(), d.dir.join("out-link")).unwrap();
    let (c, v) = d.req(
        "POST",
        &format!(
            "/image/push?remote={}&tag=x:1",
            enc(&d.dir.join("out-link/layout"))
        ),
        None,
    );
    assert_eq!(c, 400, "{v}");

    // Flintlock: kernel and volume sources outside are INVALID_ARGUMENT.
    let spec = |kernel: &Path, root: &Path| {
        json!({"id": "vm1", "kernel": {"image": kernel, "filename": "boot/vmlinux"},
               "rootVolume": {"id": "root", "source": {"containerSource": root}}})
        .to_string()
    };
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&spec(&secret, &inside)));
    assert_eq!((c, v["code"].as_i64()), (400, Some(3)), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("import directory"),
        "{v}"
    );
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&spec(&inside, &secret)));
    assert_eq!(c, 400, "{v}");
    // Sources inside that are not images: the attempt fails, and its error
    // (status.error) names the problem without the file's bytes.
    let (c, v) = d.req("POST", "/v1alpha1/microvm", Some(&spec(&inside, &inside)));
    assert_eq!(c, 200, "{v}");
    let uid = v["microvm"]["spec"]["uid"].as_str().unwrap().to_string();
    let failed = wait_for(PATIENCE, || {
        let (_, v) = d.req("GET", &format!("/v1alpha1/microvm/{uid}"), None);
        (v["microvm"]["status"]["state"] == "FAILED").then_some(v)
    })
    .expect("the MicroVM never failed");
    let err = failed["microvm"]["status"]["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!err.is_empty(), "{failed}");
    assert!(!err.contains("CANARY") && !err.contains("root:"), "{err}");
    for r in d.responses() {
        assert!(!r.contains("CANARY"), "{r}");
    }
}

#[test]
fn emberd_under_umask_000_keeps_its_files_private() {
    let mut d = Emberd::start("hardening-umask", 10512, &[]);
    d.kill9();
    let _ = std::fs::remove_dir_all(d.dir.join("state"));
    d.umask = Some(0);
    d.restart();
    let (c, v) = d.json(&["-X", "POST", "http://localhost/volumes/v1?size=8"]);
    assert_eq!(c, 201, "{v}");
    d.c_image("idle", IDLE_C, &[]);
    let (c, v) = d.json(&[
        "-X",
        "POST",
        "-d",
        &json!({"InstanceName": "i1", "ImageName": "idle", "Env": {"TOKEN": "s3cret"}}).to_string(),
        "http://localhost/instances/run",
    ]);
    assert_eq!(c, 201, "{v}");
    d.wait_logs("i1", "idle instance up");

    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    let state = d.dir.join("state");
    assert_eq!(mode(&d.sock), 0o600, "socket");
    assert_eq!(std::fs::metadata(&d.sock).unwrap().uid(), 0);
    assert_eq!(mode(&state), 0o700, "state dir");
    for sub in [
        "images", "volumes", "logs", "staging", "tmp", "import", "export",
    ] {
        assert_eq!(mode(&state.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(
        mode(&state.join("state.json")),
        0o600,
        "state.json holds instance env"
    );
    for dir in ["logs", "volumes"] {
        for e in std::fs::read_dir(state.join(dir)).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
    }
    // Installed images are root's, and no VMM or build uid can change them.
    for e in std::fs::read_dir(state.join("images")).unwrap().flatten() {
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(
            (md.uid(), md.mode() & 0o777),
            (0, 0o700),
            "{}",
            e.path().display()
        );
        for f in std::fs::read_dir(e.path()).unwrap().flatten() {
            let md = std::fs::symlink_metadata(f.path()).unwrap();
            assert_eq!(md.uid(), 0, "{}", f.path().display());
            assert_eq!(md.mode() & 0o022, 0, "{}", f.path().display());
        }
    }
    // No temp files are left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/i1?force=true"])
            .0,
        204
    );
}

#[test]
fn kill_9_between_spawn_and_save_never_gives_an_instance_two_vmms() {
    let mut d = Emberd::start("hardening-crash", 10513, &[]);
    d.c_image("idle", IDLE_C, &[]);
    // emberd dies (SIGKILL) right after spawning the VMM, before it has
    // saved that the VMM exists.
    d.kill9();
    d.env = vec![("EMBER_FAULT".into(), "kill-after-vmm-spawn".into())];
    d.restart();
    let run = json!({"InstanceName": "c1", "ImageName": "idle"}).to_string();
    let (c, _) = d.curl(&["-X", "POST", "-d", &run, "http://localhost/instances/run"]);
    assert_ne!(c, 201, "emberd should have died mid-request");
    let died = wait_for(PATIENCE, || d.proc_.as_mut().unwrap().try_status());
    assert!(died.is_some(), "emberd did not die at the fault point");
    let state: Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("state").join("state.json")).unwrap())
            .unwrap();
    let inst = state["instances"]
        .as_object()
        .unwrap()
        .values()
        .find(|i| i["name"] == "c1")
        .expect("the instance was recorded before its VMM was spawned")
        .clone();
    let id = inst["id"].as_str().unwrap().to_string();
    assert!(
        inst["process"].is_null(),
        "the spawn was never saved: {inst}"
    );
    let pids = wait_for(PATIENCE, || {
        let p = vmm_processes(&id);
        (p.len() == 1).then_some(p)
    })
    .expect("the VMM runs on without emberd");

    // emberd comes back: it finds that VMM and adopts it.
    d.env.clear();
    d.restart();
    assert_eq!(instance_state(&d, "c1"), "running");
    assert_eq!(vmm_processes(&id), pids);
    // Starting it again does not start a second VMM.
    let (c, v) = d.json(&["-X", "POST", "http://localhost/instances/c1/start"]);
    assert_eq!(c, 200, "{v}");
    assert_eq!(vmm_processes(&id), pids);
    // A forced delete kills the adopted VMM.
    assert_eq!(
        d.curl(&["-X", "DELETE", "http://localhost/instances/c1?force=true"])
            .0,
        204
    );
    let gone = wait_for(PATIENCE, || vmm_processes(&id).is_empty().then_some(()));
    assert!(gone.is_some(), "{:?}", vmm_processes(&id));
}

/// The real uid of a process.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn every_vmm_runs_as_its_own_uid_and_owns_its_volumes_only_while_it_runs() {
    let d = Emberd::start("hardening-ids", 10520, &["--vmm-ids", "4"]);
    d.c_image("idle", IDLE_C, &["mounts=/data"]);
    let mut seen = Vec::new();
    for (inst, vol) in [("i1", "v1"), ("i2", "v2")] {
        let (c, v) = d.json(&[
            "-X",
            "POST",
            &format!("http://localhost/volumes/{vol}?size=4"),
        ]);
        assert_eq!(c, 201, "{v}");
        let vol_id = v["Id"].as_str().unwrap().to_string();
        let run = json!({"InstanceName": inst, "ImageName": "idle", "Mounts": {"/data": vol}});
        let (c, v) = d.json(&[
            "-X",
            "POST",
            "-d",
            &run.to_string(),
            "http://localhost/instances/run",
        ]);
        assert_eq!(c, 201, "{v}");
        let id = v["Id"].as_str().unwrap().to_string();
        d.wait_logs(inst, "idle instance up");
        let pids = vmm_processes(&id);
        assert_eq!(pids.len(), 1, "{pids:?}");
        let uid = uid_of(pids[0]);
        assert!((10520..10524).contains(&uid), "{inst} runs as {uid}");
        let file = d
            .dir
            .join("state")
            .join("volumes")
            .join(format!("{vol_id}.img"));
        let md = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (md.uid(), md.mode() & 0o777),
            (uid, 0o600),
            "{vol} while {inst} runs"
        );
        seen.push((inst, uid, file));
    }
    assert_ne!(seen[0].1, seen[1].1, "two VMMs share a uid");
    // Stopped, the VMM's identity no longer owns the volume.
    let (c, v) = d.json(&["-X", "POST", "http://localhost/instances/i1/stop"]);
    assert_eq!(c, 200, "{v}");
    assert_eq!(std::fs::metadata(&seen[0].2).unwrap().uid(), 0);
    for (inst, _, _) in &seen {
        assert_eq!(
            d.curl(&[
                "-X",
                "DELETE",
                &format!("http://localhost/instances/{inst}?force=true")
            ])
            .0,
            204
        );
    }
}

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn concurrent_large_uploads_do_not_grow_emberds_memory() {
    const UPLOADS: usize = 5;
    const MIB: usize = 64;
    let d = Emberd::start("hardening-uploads", 10530, &[]);
    let pid = d.proc_.as_ref().unwrap().pid();
    let file = d.dir.join("big.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..MIB {
            f.write_all(&chunk).unwrap();
        }
    }
    let before = status_kib(pid, "RssAnon:");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut anon, mut file) = (0, 0);
            // Bounded: stops when the uploads are done, or after 10 minutes.
            for _ in 0..30_000 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                anon = anon.max(status_kib(pid, "RssAnon:"));
                file = file.max(status_kib(pid, "RssFile:"));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (anon, file)
        })
    };
    std::thread::scope(|s| {
        for i in 0..UPLOADS {
            let (sock, file) = (&d.sock, &file);
            s.spawn(move || {
                let out = std::process::Command::new("curl")
                    .args(["-s", "-S", "--max-time", "300", "--unix-socket"])
                    .arg(sock)
                    .args(["-X", "POST", "-F"])
                    .arg(format!("tarfile=@{}", file.display()))
                    .args(["-F", "raw=true", "-w", "\n%{http_code}"])
                    .arg(format!("http://localhost/volumes/up{i}"))
                    .output()
                    .unwrap();
                let out = String::from_utf8_lossy(&out.stdout).to_string();
                let (body, code) = out.rsplit_once('\n').unwrap_or(("", ""));
                assert_eq!(code, "201", "upload {i}: {body}");
                let v: Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["SizeMb"], MIB as u64, "{v}");
            });
        }
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (peak_anon, peak_file) = sampler.join().unwrap();
    let grew = peak_anon.saturating_sub(before);
    eprintln!(
        "emberd during {UPLOADS} concurrent {MIB} MiB uploads: RssAnon {before} KiB before, peak {peak_anon} KiB (+{grew} KiB); peak RssFile {peak_file} KiB (page cache of the spooled bodies, reclaimable)"
    );
    // Held in memory, the uploads would have added 320 MiB or more.
    assert!(grew < 64 * 1024, "RssAnon grew by {grew} KiB");
    // Every volume holds what was sent.
    let want = std::fs::read(&file).unwrap();
    for i in 0..UPLOADS {
        let v = d.json(&[&format!("http://localhost/volumes/up{i}")]).1;
        let img = d
            .dir
            .join("state")
            .join("volumes")
            .join(format!("{}.img", v["Id"].as_str().unwrap()));
        assert!(std::fs::read(&img).unwrap() == want, "volume up{i} differs");
    }
}
