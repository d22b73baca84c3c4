//! ember-agent on the host: the binary serves on a unix socket and runs
//! containers as chrooted processes in temp roots (run as root).
//!
//! The full pod boot (a Linux guest with ember-agent as /init under
//! ember-vmm, talking over vsock) is not tested here: this machine's nested
//! "PVM" KVM cannot boot Linux.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use ember_agent::client::ClientError;
use ember_agent::protocol::{cmd, AgentMessage, MAX_PAYLOAD};
use ember_agent::protocol::{ContainerFile, VolumeMount};
use ember_agent::{Event, Exec, Rootfs, StartContainer};

fn dir_start(id: &str, root: &std::path::Path, cmd: &[&str]) -> StartContainer {
    StartContainer {
        id: id.into(),
        rootfs: Rootfs::Dir {
            path: root.to_string_lossy().into_owned(),
        },
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        workdir: None,
        user: None,
        mounts: Vec::new(),
        files: Vec::new(),
        stdio: false,
        tty: false,
    }
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, ClientError>, want: &str) {
    match r {
        Err(ClientError::Agent(m)) => assert!(m.contains(want), "{m:?} lacks {want:?}"),
        other => panic!("expected an error containing {want:?}, got {other:?}"),
    }
}

fn set(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn dir_rootfs_runs_chrooted_with_env_workdir_and_exit_code() {
    let tmp = TempDir::new("dir");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    assert!(!c.ready().pid1);
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    // A second connection sees the exit events too.
    let mut watcher = agent.client();

    let mut req = dir_start("c1", &root, &["probe", "info", "7", "/tmp/out"]);
    req.env = vec![
        ("PATH".into(), "/bin".into()),
        ("GREETING".into(), "hello world".into()),
    ];
    req.workdir = Some("/work".into());
    let pid = c.start_container(req).unwrap();
    assert!(pid > 1);
    assert_eq!(c.wait("c1", None).unwrap(), 7);
    // Waiting again answers at once with the recorded code.
    assert_eq!(c.wait("c1", Some(Duration::from_secs(1))).unwrap(), 7);

    let log = log_of(&mut c, "c1");
    eprintln!("--- c1 log ---\n{log}");
    assert_eq!(
        lines_with(&log, "argv["),
        set(&["0]=probe", "1]=info", "2]=7", "3]=/tmp/out"])
    );
    // The environment is exactly what was asked for.
    assert_eq!(
        lines_with(&log, "env="),
        set(&["GREETING=hello world", "PATH=/bin"])
    );
    assert!(log.contains("cwd=/work\n"));
    // chroot: `/` is the temp root.
    assert_eq!(
        lines_with(&log, "root="),
        set(&["bin", "data", "tmp", "work"])
    );
    assert!(log.contains("uid=0 gid=0\n"));
    assert!(log.contains("to-stderr\n"), "stderr goes to the log too");
    // The file landed in the temp root, and READFILE finds it.
    assert_eq!(
        std::fs::read_to_string(root.join("tmp/out")).unwrap(),
        "written by probe\n"
    );
    assert_eq!(
        c.read_file("c1", "/tmp/out").unwrap(),
        b"written by probe\n"
    );

    // READLOG pages by offset.
    let (tail, next) = c.read_log("c1", 5).unwrap();
    assert_eq!(tail, log.as_bytes()[5..]);
    assert_eq!(next, log.len() as u64);
    let (empty, same) = c.read_log("c1", next).unwrap();
    assert!(empty.is_empty());
    assert_eq!(same, next);

    let exited = Event::Exited {
        id: "c1".into(),
        code: 7,
    };
    assert_eq!(c.next_event().unwrap(), exited);
    assert_eq!(watcher.next_event().unwrap(), exited);

    c.remove_container("c1").unwrap();
    assert!(!agent.state_dir.join("logs/c1.log").exists());
    // The id can be used again after removal.
    c.start_container(dir_start("c1", &root, &["/bin/probe", "info", "0"]))
        .unwrap();
    assert_eq!(c.wait("c1", None).unwrap(), 0);
}

#[test]
fn numeric_user_is_applied() {
    let tmp = TempDir::new("user");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let mut req = dir_start("u1", &root, &["/bin/probe", "info", "0"]);
    req.user = Some("1234:5678".into());
    c.start_container(req).unwrap();
    assert_eq!(c.wait("u1", None).unwrap(), 0);
    assert!(log_of(&mut c, "u1").contains("uid=1234 gid=5678\n"));
    let mut req = dir_start("u2", &root, &["/bin/probe", "info", "0"]);
    req.user = Some("4321".into());
    c.start_container(req).unwrap();
    assert_eq!(c.wait("u2", None).unwrap(), 0);
    assert!(log_of(&mut c, "u2").contains("uid=4321 gid=4321\n"));
}

#[test]
fn stop_signal_and_sigkill_after_timeout() {
    let tmp = TempDir::new("stop");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();

    // A sleeper dies of SIGTERM: 128 + 15.
    let pid = c
        .start_container(dir_start("sleeper", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    assert!(alive(pid));
    assert_eq!(
        c.stop_container("sleeper", libc::SIGTERM, Duration::from_secs(60))
            .unwrap(),
        143
    );
    assert!(!alive(pid));
    // Stopping again reports the same code.
    assert_eq!(
        c.stop_container("sleeper", libc::SIGTERM, Duration::from_secs(1))
            .unwrap(),
        143
    );
    assert_eq!(
        c.next_event().unwrap(),
        Event::Exited {
            id: "sleeper".into(),
            code: 143
        }
    );

    // One that ignores SIGTERM is SIGKILLed after the timeout: 128 + 9.
    c.start_container(dir_start("stubborn", &root, &["/bin/probe", "stubborn"]))
        .unwrap();
    wait_for_log(&mut c, "stubborn", "ignoring TERM");
    assert_eq!(
        c.stop_container("stubborn", libc::SIGTERM, Duration::from_millis(200))
            .unwrap(),
        137
    );

    // SIGNALPROCESS delivers any signal.
    c.start_container(dir_start("usr1", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    c.signal("usr1", libc::SIGUSR1).unwrap();
    assert_eq!(c.wait("usr1", None).unwrap(), 128 + libc::SIGUSR1);
    // A process that has exited cannot be signalled.
    assert!(matches!(c.signal("usr1", 9), Err(ClientError::Agent(_))));

    // WAITPROCESS with a timeout on a running process is an error, not a hang.
    c.start_container(dir_start("long", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    match c.wait("long", Some(Duration::from_millis(50))) {
        Err(ClientError::Agent(m)) => assert!(m.contains("timeout"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn exec_joins_the_container_root() {
    let tmp = TempDir::new("exec");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let main_pid = c
        .start_container(dir_start("box", &root, &["/bin/probe", "sleep"]))
        .unwrap();

    let epid = c
        .exec(Exec {
            container: "box".into(),
            id: "e1".into(),
            cmd: vec!["probe".into(), "info".into(), "3".into()],
            env: vec![("PATH".into(), "/bin".into()), ("X".into(), "1".into())],
            workdir: Some("/data".into()),
            user: None,
            stdio: false,
            tty: false,
        })
        .unwrap();
    assert_ne!(epid, main_pid);
    assert_eq!(c.wait("e1", None).unwrap(), 3);
    let log = log_of(&mut c, "e1");
    assert_eq!(
        lines_with(&log, "root="),
        set(&["bin", "data", "tmp", "work"])
    );
    assert_eq!(lines_with(&log, "env="), set(&["PATH=/bin", "X=1"]));
    assert!(log.contains("cwd=/data\n"));

    // WRITEFILE puts a file in the root; an exec'd process reads it.
    c.write_file("box", "/data/msg", b"hello from the host\n", 0o600)
        .unwrap();
    c.exec(Exec {
        container: "box".into(),
        id: "e2".into(),
        cmd: vec!["/bin/probe".into(), "cat".into(), "/data/msg".into()],
        env: vec![],
        workdir: None,
        user: None,
        stdio: false,
        tty: false,
    })
    .unwrap();
    assert_eq!(c.wait("e2", None).unwrap(), 0);
    assert_eq!(log_of(&mut c, "e2"), "hello from the host\n");

    // The main process is untouched by the execs.
    assert!(alive(main_pid));
    // An exec'd sleeper goes down with the container.
    let e3 = c
        .exec(Exec {
            container: "box".into(),
            id: "e3".into(),
            cmd: vec!["/bin/probe".into(), "sleep".into()],
            env: vec![],
            workdir: None,
            user: None,
            stdio: false,
            tty: false,
        })
        .unwrap();
    c.remove_container("box").unwrap();
    assert!(!alive(main_pid));
    assert!(!alive(e3));
    match c.wait("box", None) {
        Err(ClientError::Agent(m)) => assert!(m.starts_with("no such process"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn block_device_rootfs_is_mounted_and_unmounted() {
    let tmp = TempDir::new("blk");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let image = tmp.path().join("rootfs.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("16M")
        .output();
    match mkfs {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIP: mkfs.ext4 -d failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIP: no mkfs.ext4: {e}");
            return;
        }
    }
    let lo = match LoopDev::attach(&image) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP: loop devices are not available here: {why}");
            return;
        }
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let start = StartContainer {
        id: "blk".into(),
        rootfs: Rootfs::BlockDevice {
            path: lo.0.clone(),
            fstype: "ext4".into(),
            readonly: false,
        },
        cmd: vec![
            "/bin/probe".into(),
            "info".into(),
            "5".into(),
            "/tmp/out".into(),
        ],
        env: vec![],
        workdir: Some("/work".into()),
        user: None,
        mounts: Vec::new(),
        files: Vec::new(),
        stdio: false,
        tty: false,
    };
    c.start_container(start).unwrap();
    assert_eq!(c.wait("blk", None).unwrap(), 5);
    let mountpoint = agent.run_dir.join("blk/root");
    assert_eq!(mounts_under(&agent.run_dir), vec![mountpoint.clone()]);
    let log = log_of(&mut c, "blk");
    // The image's root, lost+found included, not the source directory.
    assert_eq!(
        lines_with(&log, "root="),
        set(&["bin", "data", "lost+found", "tmp", "work"])
    );
    assert_eq!(
        c.read_file("blk", "/tmp/out").unwrap(),
        b"written by probe\n"
    );
    assert!(!root.join("tmp/out").exists());

    c.remove_container("blk").unwrap();
    assert!(mounts_under(&agent.run_dir).is_empty());
    assert!(!agent.run_dir.join("blk").exists());

    // A device that does not exist is an error and leaves nothing behind.
    let bad = StartContainer {
        id: "nodev".into(),
        rootfs: Rootfs::BlockDevice {
            path: "/dev/ember-agent-no-such-device".into(),
            fstype: "ext4".into(),
            readonly: false,
        },
        cmd: vec!["/bin/probe".into()],
        env: vec![],
        workdir: None,
        user: None,
        mounts: Vec::new(),
        files: Vec::new(),
        stdio: false,
        tty: false,
    };
    match c.start_container(bad) {
        Err(ClientError::Agent(m)) => assert!(m.contains("mounting"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!agent.run_dir.join("nodev").exists());
    // The same device mounted read-only works too.
    let ro = StartContainer {
        id: "ro".into(),
        rootfs: Rootfs::BlockDevice {
            path: lo.0.clone(),
            fstype: "ext4".into(),
            readonly: true,
        },
        cmd: vec![
            "/bin/probe".into(),
            "info".into(),
            "0".into(),
            "/tmp/ro".into(),
        ],
        env: vec![],
        workdir: None,
        user: None,
        mounts: Vec::new(),
        files: Vec::new(),
        stdio: false,
        tty: false,
    };
    c.start_container(ro).unwrap();
    // fopen on a read-only filesystem fails: exit 98.
    assert_eq!(c.wait("ro", None).unwrap(), 98);
    assert!(log_of(&mut c, "ro").contains("Read-only file system"));
    drop(c);
    drop(agent);
    assert!(mounts_under(tmp.path()).is_empty(), "DESTROYPOD unmounts");
}

#[test]
fn volumes_and_files_are_set_up_inside_the_root_before_start() {
    use std::os::unix::fs::MetadataExt;
    let tmp = TempDir::new("vols");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    // The image may hold symlinks that point out of its root.
    std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("tmp/passwd")).unwrap();
    let src = tmp.path().join("volsrc");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "from the volume\n").unwrap();
    let image = tmp.path().join("vol.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&image)
        .arg("8M")
        .output();
    if !mkfs.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: mkfs.ext4 -d is not available: {mkfs:?}");
        return;
    }
    let lo = match LoopDev::attach(&image) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("SKIP: loop devices are not available here: {why}");
            return;
        }
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let file = |path: &str, data: &[u8], mode: u32| ContainerFile {
        path: path.into(),
        data: ember_agent::b64::encode(data),
        mode,
        uid: Some(1000),
        gid: Some(1001),
    };
    let mut req = dir_start("v", &root, &["/bin/probe", "info", "0", "/tmp/out"]);
    req.mounts = vec![VolumeMount {
        device: lo.0.clone(),
        path: "/escape/mnt/vol".into(),
        fstype: "ext4".into(),
        readonly: true,
    }];
    req.files = vec![file("/etc/app/config", b"k=v\n", 0o600)];
    c.start_container(req).unwrap();
    assert_eq!(c.wait("v", None).unwrap(), 0);
    // The mount point and the file were made inside the root, through
    // the image's symlink, never outside it.
    assert_eq!(mounts_under(tmp.path()), vec![root.join("mnt/vol")]);
    assert_eq!(
        c.read_file("v", "/mnt/vol/hello.txt").unwrap(),
        b"from the volume\n"
    );
    assert_eq!(c.read_file("v", "/etc/app/config").unwrap(), b"k=v\n");
    let meta = std::fs::metadata(root.join("etc/app/config")).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o600, 1000, 1001)
    );
    c.remove_container("v").unwrap();
    assert!(mounts_under(tmp.path()).is_empty(), "volumes unmounted");

    // Bad paths are refused before anything runs, and nothing stays mounted.
    let mut bad = dir_start("b1", &root, &["/bin/probe"]);
    bad.mounts = vec![VolumeMount {
        device: lo.0.clone(),
        path: "/data/../../x".into(),
        fstype: "ext4".into(),
        readonly: true,
    }];
    expect_err(c.start_container(bad), "'..'");
    let mut bad = dir_start("b2", &root, &["/bin/probe"]);
    bad.mounts = vec![VolumeMount {
        device: lo.0.clone(),
        path: "/data/ok".into(),
        fstype: "ext4".into(),
        readonly: true,
    }];
    // The final component is a symlink: not followed.
    bad.files = vec![file("/tmp/passwd", b"root::0:0::/:/bin/sh\n", 0o644)];
    expect_err(c.start_container(bad), "writing /tmp/passwd");
    assert!(
        mounts_under(tmp.path()).is_empty(),
        "the volume was released"
    );
    let mut bad = dir_start("b3", &root, &["/bin/probe"]);
    bad.files = vec![file("relative", b"", 0o644)];
    expect_err(c.start_container(bad), "bad parameter");
}

#[test]
fn bad_requests_get_error_replies_and_the_agent_keeps_serving() {
    let tmp = TempDir::new("bad");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();

    let r = c.start_container(dir_start(
        "x",
        std::path::Path::new("/nonexistent-ember"),
        &["/bin/probe"],
    ));
    expect_err(r, "rootfs directory");
    let r = c.start_container(dir_start("x", &root, &[]));
    expect_err(r, "bad parameter: empty cmd");
    let r = c.start_container(dir_start("../x", &root, &["/bin/probe"]));
    expect_err(r, "bad parameter: invalid id");
    let r = c.start_container(dir_start("x", &root, &["/bin/nope"]));
    expect_err(r, "execve failed");
    let r = c.start_container(dir_start("x", &root, &["nope"]));
    expect_err(r, "No such file or directory");
    let mut wd = dir_start("x", &root, &["/bin/probe"]);
    wd.workdir = Some("/no/such/dir".into());
    let r = c.start_container(wd);
    expect_err(r, "chdir failed");
    let mut user = dir_start("x", &root, &["/bin/probe"]);
    user.user = Some("root".into());
    let r = c.start_container(user);
    expect_err(r, "not numeric");
    let r = c.exec(Exec {
        container: "ghost".into(),
        id: "e".into(),
        cmd: vec!["/bin/probe".into()],
        env: vec![],
        workdir: None,
        user: None,
        stdio: false,
        tty: false,
    });
    expect_err(r, "no such container: ghost");
    let r = c.wait("ghost", None);
    expect_err(r, "no such process: ghost");
    let r = c.stop_container("ghost", 15, Duration::from_secs(1));
    expect_err(r, "no such container");
    let r = c.remove_container("ghost");
    expect_err(r, "no such container");

    // Failed starts left nothing registered: "x" is free.
    c.start_container(dir_start("x", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    let r = c.start_container(dir_start("x", &root, &["/bin/probe"]));
    expect_err(r, "conflict");
    let r = c.exec(Exec {
        container: "x".into(),
        id: "x".into(),
        cmd: vec!["/bin/probe".into()],
        env: vec![],
        workdir: None,
        user: None,
        stdio: false,
        tty: false,
    });
    expect_err(r, "conflict");
    let r = c.stop_container("x", 0, Duration::from_secs(1));
    expect_err(r, "invalid signal");
    let r = c.read_file("x", "/../../etc/hostname");
    expect_err(r, "reading");
    let r = c.read_file("x", "/bin");
    expect_err(r, "not a regular file");
    let r = c.read_log("ghost", 0);
    expect_err(r, "no such process");
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));

    // Malformed frames on a raw connection.
    let mut s = agent.connect();
    assert!(matches!(recv_reply(&mut s), AgentMessage::Ready(_)));
    let error = |m: AgentMessage| match m {
        AgentMessage::Error(e) => e.message,
        other => panic!("expected ERROR, got {other:?}"),
    };
    send_frame(&mut s, cmd::NEWCONTAINER, b"{this is not json");
    assert!(error(recv_reply(&mut s)).contains("bad payload for command 17"));
    send_frame(
        &mut s,
        cmd::NEWCONTAINER,
        br#"{"id":"y","rootfs":{"type":"nfs"},"cmd":[]}"#,
    );
    assert!(error(recv_reply(&mut s)).contains("bad payload"));
    send_frame(&mut s, 999, b"{}");
    assert!(error(recv_reply(&mut s)).contains("unknown command 999"));
    send_frame(&mut s, cmd::ACK, b"{}");
    assert!(error(recv_reply(&mut s)).contains("unknown command 9"));
    let wf = br#"{"container":"x","path":"/tmp/f","data":"not base64!"}"#;
    send_frame(&mut s, cmd::WRITEFILE, wf);
    assert!(error(recv_reply(&mut s)).contains("bad parameter: data"));
    // Still in sync: a good request on the same connection works.
    send_frame(&mut s, cmd::PING, b"");
    assert!(matches!(recv_reply(&mut s), AgentMessage::Ok(_)));
    // An oversized length: ERROR, then the connection is closed.
    let mut hdr = cmd::PING.to_be_bytes().to_vec();
    hdr.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
    send_raw(&mut s, &hdr);
    assert!(error(recv_reply(&mut s)).contains("exceeds"));
    assert!(read_to_end(&mut s).is_empty());

    // A frame cut short, then the peer goes away.
    let mut s = agent.connect();
    assert!(matches!(recv_reply(&mut s), AgentMessage::Ready(_)));
    let mut partial = cmd::PING.to_be_bytes().to_vec();
    partial.extend_from_slice(&100u32.to_be_bytes());
    partial.extend_from_slice(b"{\"x\"");
    send_raw(&mut s, &partial);
    drop(s);

    // The agent keeps serving, old connection and new.
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    let mut c2 = agent.client();
    assert_eq!(c2.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        c2.stop_container("x", libc::SIGKILL, Duration::from_secs(60))
            .unwrap(),
        137
    );
}

#[test]
fn destroy_pod_and_sigterm_kill_containers_and_exit() {
    let tmp = TempDir::new("destroy");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    // DESTROYPOD: answered, containers killed, the agent exits 0.
    let mut agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let p1 = c
        .start_container(dir_start("a", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    let p2 = c
        .start_container(dir_start("b", &root, &["/bin/probe", "stubborn"]))
        .unwrap();
    c.destroy_pod().unwrap();
    let st = agent.wait_exit();
    assert!(st.success(), "{st}");
    assert!(!alive(p1) && !alive(p2));
    assert!(!agent.sock.exists());
    drop(agent);

    // SIGTERM to the agent on a host: the same cleanup.
    let mut agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let p3 = c
        .start_container(dir_start("c", &root, &["/bin/probe", "sleep"]))
        .unwrap();
    // SAFETY: kill(2) to our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) }, 0);
    let st = agent.wait_exit();
    assert!(st.success(), "{st}");
    assert!(!alive(p3));
    assert!(!agent.sock.exists());
}

/// emberd's path to a guest agent: the VMM's hybrid-vsock unix socket.
/// A fake VMM here answers `CONNECT 2718` and splices the stream to the
/// agent's unix socket.
#[test]
fn client_connects_through_a_hybrid_vsock_socket() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    let tmp = TempDir::new("hybrid");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let uds = tmp.path().join("vsock.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    let agent_sock = agent.sock.clone();
    let fake_vmm = std::thread::spawn(move || {
        for round in 0..2 {
            let (host, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(host.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut host = host;
            if round == 0 {
                // A port nobody listens on: the VMM hangs up.
                assert_eq!(line, "CONNECT 9\n");
                continue;
            }
            assert_eq!(line, "CONNECT 2718\n");
            host.write_all(b"OK 1073741824\n").unwrap();
            let guest = UnixStream::connect(&agent_sock).unwrap();
            let (mut g_r, mut g_w) = (guest.try_clone().unwrap(), guest);
            let mut h_w = host;
            let up = std::thread::spawn(move || {
                let _ = std::io::copy(&mut reader, &mut g_w);
                let _ = g_w.shutdown(std::net::Shutdown::Write);
            });
            let _ = std::io::copy(&mut g_r, &mut h_w);
            let _ = h_w.shutdown(std::net::Shutdown::Both);
            up.join().unwrap();
        }
    });

    match ember_agent::client::connect_vsock_uds(&uds, 9, Some(READ_TIMEOUT)) {
        Err(ClientError::Handshake { reason, .. }) => {
            assert!(reason.contains("closed"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut c = ember_agent::AgentClient::connect_vsock_uds(&uds, Some(READ_TIMEOUT))
        .expect("READY via vsock");
    c.start_container(dir_start("v", &root, &["/bin/probe", "info", "4"]))
        .unwrap();
    assert_eq!(c.wait("v", None).unwrap(), 4);
    assert!(log_of(&mut c, "v").contains("argv[1]=info"));
    drop(c);
    fake_vmm.join().unwrap();
}

/// The PID 1 path, in fresh pid/mount/uts namespaces (the host's mounts and
/// hostname are untouched): READY says pid1, /proc is mounted, containers
/// run, and an orphan re-parented to the agent is reaped when it dies.
#[test]
fn as_pid1_it_serves_and_reaps_orphans() {
    let tmp = TempDir::new("pid1");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    if !Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        eprintln!("SKIP: unshare --pid --fork --mount does not work here");
        return;
    }
    let agent = Agent::start_as_pid1(tmp.path());
    let mut c = agent.client();
    assert!(c.ready().pid1, "the agent should be PID 1 in its namespace");

    // The unshare process's only child is the agent.
    let unshare_pid = agent.pid();
    let agent_pid = processes()
        .into_iter()
        .find(|(_, ppid, _)| *ppid == unshare_pid)
        .map(|(pid, _, _)| pid)
        .expect("the agent process");

    c.start_container(dir_start("o", &root, &["/bin/probe", "orphan"]))
        .unwrap();
    assert_eq!(c.wait("o", None).unwrap(), 0);
    assert!(log_of(&mut c, "o").contains("forked "));
    // The container's main process is gone; its child now belongs to the agent.
    let orphan = processes()
        .into_iter()
        .find(|(_, ppid, name)| *ppid == agent_pid && name == "probe")
        .map(|(pid, _, _)| pid)
        .expect("the orphan, re-parented to the agent");
    // SAFETY: kill(2) of a process this test created.
    assert_eq!(unsafe { libc::kill(orphan as i32, libc::SIGKILL) }, 0);
    // Reaped: /proc/<pid> disappears (a zombie would stay).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "orphan {orphan} never reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still serving.
    assert_eq!(c.ping().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// Output events of `id` until its exit: (stdout, stderr, code).
fn collect_stdio(
    c: &mut ember_agent::AgentClient<std::os::unix::net::UnixStream>,
    id: &str,
) -> (String, String, i32) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match c.next_event().unwrap() {
            Event::Output {
                id: i,
                stream,
                data,
                ..
            } if i == id => {
                let d = ember_agent::b64::decode(&data).unwrap();
                if stream == 1 {
                    out.extend(d)
                } else {
                    err.extend(d)
                }
            }
            Event::Exited { id: i, code } if i == id => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                    code,
                )
            }
            _ => {}
        }
    }
}

#[test]
fn stdio_streams_over_pipes_and_a_tty() {
    use ember_agent::protocol::{Request, Resize, Stdin};
    let tmp = TempDir::new("stdio");
    let Some(root) = make_rootfs(tmp.path()) else {
        return;
    };
    let agent = Agent::start(tmp.path());
    let mut c = agent.client();
    let mut start = dir_start("s1", &root, &["/bin/probe", "sleep"]);
    start.stdio = true;
    c.start_container(start).unwrap();

    // Pipes: stdin in, stdout and stderr apart, exit after the output.
    let exec = |id: &str, args: &[&str], tty: bool| Exec {
        container: "s1".into(),
        id: id.into(),
        cmd: args.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        workdir: None,
        user: None,
        stdio: true,
        tty,
    };
    c.exec(exec("e1", &["/bin/probe", "echo", "4"], false))
        .unwrap();
    for (data, eof) in [("hello ", false), ("world\n", true)] {
        c.request(&Request::Stdin(Stdin {
            id: "e1".into(),
            data: ember_agent::b64::encode(data.as_bytes()),
            eof,
        }))
        .unwrap();
    }
    let (out, err, code) = collect_stdio(&mut c, "e1");
    assert_eq!(out, "hello world\n");
    assert_eq!(err, "echo ready\necho done\n");
    assert_eq!(code, 4);
    // LOGS gives the same bytes back, numbered, with the stream.
    use ember_agent::protocol::Logs;
    let recs = c
        .request(&Request::Logs(Logs { id: "e1".into() }))
        .unwrap()
        .records
        .unwrap();
    let text = |stream: u8| -> String {
        recs.iter()
            .filter(|r| r.stream == stream)
            .map(|r| String::from_utf8(ember_agent::b64::decode(&r.data).unwrap()).unwrap())
            .collect()
    };
    assert_eq!(text(1), "hello world\n");
    assert_eq!(text(2), "echo ready\necho done\n");
    assert!(recs.iter().all(|r| r.seq >= 1 && r.time_ns > 0), "{recs:?}");
    expect_err(
        c.request(&Request::Logs(Logs { id: "nope".into() })),
        "no such process",
    );
    // And the log has it all (stdout and stderr are two pipes, read apart:
    // their order in the log is not fixed, only each stream's own).
    let log = log_of(&mut c, "e1");
    assert!(
        log.contains("hello ") && log.contains("world\n") && log.contains("echo done"),
        "{log}"
    );
    // Stdin of an exited process, resize without a terminal: clear errors.
    expect_err(
        c.request(&Request::Stdin(Stdin {
            id: "e1".into(),
            data: "eA==".into(),
            eof: false,
        })),
        "closed",
    );
    expect_err(
        c.request(&Request::Resize(Resize {
            id: "e1".into(),
            rows: 1,
            cols: 1,
        })),
        "no terminal",
    );

    // A terminal: isatty, the size set by RESIZE, output on stream 1 only.
    c.exec(exec("e2", &["/bin/probe", "tty"], true)).unwrap();
    c.request(&Request::Resize(Resize {
        id: "e2".into(),
        rows: 33,
        cols: 101,
    }))
    .unwrap();
    c.request(&Request::Stdin(Stdin {
        id: "e2".into(),
        data: ember_agent::b64::encode(b"typed\n"),
        eof: false,
    }))
    .unwrap();
    let (out, err, code) = collect_stdio(&mut c, "e2");
    assert_eq!(code, 5);
    assert!(err.is_empty(), "{err:?}");
    assert!(out.contains("isatty=1\r\n"), "{out:?}");
    assert!(out.contains("size=33x101 got=typed\r\n"), "{out:?}");

    // A process without stdio refuses STDIN.
    c.exec(Exec {
        stdio: false,
        ..exec("e3", &["/bin/probe", "info"], false)
    })
    .unwrap();
    expect_err(
        c.request(&Request::Stdin(Stdin {
            id: "e3".into(),
            data: String::new(),
            eof: true,
        })),
        "not started with stdio",
    );
    c.remove_container("s1").unwrap();
}
