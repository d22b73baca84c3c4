//! The test guest's `pod-agent` mode plays ember-agent's wire protocol over
//! real virtio-vsock, so the host side of a pod VM (ember_agent's client,
//! ember-vmm's hybrid vsock socket, the virtio-blk rootfs devices) is tested
//! end to end on a machine where Linux cannot boot. The real agent is tested
//! on the host (agent/tests).

use std::fmt::Debug;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ember_agent::client::{connect_vsock_uds, ClientError};
use ember_agent::protocol::{
    cmd, read_frame, write_frame, AgentMessage, Frame, OkReply, ProtocolError, CONTROL_PORT,
};
use ember_agent::{AgentClient, Event, Exec, Rootfs, StartContainer};
use ember_guests::LINE_PREFIX;
use ember_tests::*;
use serde_json::json;

const VERSION: &str = "pod-agent-guest";
/// The guest's frame payload limit.
const GUEST_MAX_PAYLOAD: usize = 8192;

fn spawn_vm(dir: &TempDir, cfg: serde_json::Value) -> Proc {
    let p = dir.join("vm.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"]).arg(&p);
    Proc::spawn(cmd, dir.path(), "vmm")
}

fn drive(id: &str, path: &Path) -> serde_json::Value {
    json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": false})
}

/// An 8 MiB ext4 image made by mkfs.ext4.
fn make_ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 failed: {st}");
    let img = std::fs::read(path).unwrap();
    assert_eq!(
        &img[1080..1082],
        &[0x53, 0xef],
        "mkfs.ext4 wrote no ext4 magic"
    );
}

/// Waits until the guest printed `ember-guest: <line>` as a whole line.
fn expect_line(vm: &mut Proc, line: &str) {
    vm.expect_out(&format!("{LINE_PREFIX}{line}\n"));
}

/// The guest's output lines, without the prefix.
fn guest_lines(vm: &Proc) -> Vec<String> {
    vm.out()
        .lines()
        .filter_map(|l| l.strip_prefix(LINE_PREFIX))
        .map(str::to_string)
        .collect()
}

fn count_lines(vm: &Proc, line: &str) -> usize {
    guest_lines(vm).iter().filter(|l| *l == line).count()
}

/// Retries `f` until it succeeds: the guest refuses (RST) connections while
/// it is not listening yet or still serving the previous one.
fn retry_connect<T>(vm: &mut Proc, mut f: impl FnMut() -> Result<T, ClientError>) -> T {
    let mut last = String::new();
    let got = wait_for(PATIENCE, || {
        if vm.try_status().is_some() {
            return Some(None);
        }
        match f() {
            Ok(v) => Some(Some(v)),
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    });
    match got {
        Some(Some(v)) => v,
        _ => panic!(
            "could not connect to the pod-agent guest (last error: {last})\nstdout:\n{}\nstderr:\n{}",
            vm.out(),
            vm.err()
        ),
    }
}

/// DESTROYPOD, answered; ember-vmm then exits 0. Returns the guest lines.
fn destroy(mut c: AgentClient<UnixStream>, vm: &mut Proc) -> Vec<String> {
    c.destroy_pod().unwrap();
    let st = vm.wait();
    assert_eq!(
        st.code(),
        Some(0),
        "ember-vmm exits 0 after DESTROYPOD\nstdout:\n{}\nstderr:\n{}",
        vm.out(),
        vm.err()
    );
    guest_lines(vm)
}

fn connect(vm: &mut Proc, uds: &Path) -> AgentClient<UnixStream> {
    retry_connect(vm, || AgentClient::connect_vsock_uds(uds, Some(PATIENCE)))
}

/// A raw stream on the control port, READY already read and checked.
fn connect_raw(vm: &mut Proc, uds: &Path) -> UnixStream {
    let mut s = retry_connect(vm, || connect_vsock_uds(uds, CONTROL_PORT, Some(PATIENCE)));
    let ready = read_frame(&mut s).expect("READY frame");
    assert_eq!(ready.cmd, cmd::READY, "first frame must be READY");
    assert_eq!(
        std::str::from_utf8(&ready.payload).unwrap(),
        r#"{"version":"pod-agent-guest","pid1":true}"#
    );
    s
}

fn start_req(id: &str, dev: &str, env: &[(&str, &str)]) -> StartContainer {
    StartContainer {
        id: id.into(),
        rootfs: Rootfs::BlockDevice {
            path: dev.into(),
            fstype: "ext4".into(),
            readonly: false,
        },
        cmd: vec!["/bin/sh".into()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        workdir: Some("/".into()),
        user: None,
        mounts: Vec::new(),
        files: Vec::new(),
        stdio: false,
        tty: false,
    }
}

fn expect_agent_error<T: Debug>(r: Result<T, ClientError>, want: &str) {
    match r {
        Err(ClientError::Agent(m)) => assert_eq!(m, want, "ERROR message from the guest"),
        other => panic!("expected the agent error {want:?}, got {other:?}"),
    }
}

fn exited(id: &str, code: i32) -> Event {
    Event::Exited {
        id: id.into(),
        code,
    }
}

/// The next frame on a raw stream, decoded.
fn recv(s: &mut UnixStream) -> AgentMessage {
    let f = read_frame(s).expect("a frame from the guest");
    AgentMessage::decode(&f).expect("a frame the client understands")
}

fn expect_ping_ack(s: &mut UnixStream) {
    assert_eq!(
        recv(s),
        AgentMessage::Ok(OkReply {
            version: Some(VERSION.into()),
            ..Default::default()
        }),
        "PING must be answered with ACK {{\"version\":\"{VERSION}\"}}"
    );
}

#[test]
fn pod_agent_guest_serves_containers_over_vsock() {
    let dir = TempDir::new("pod-agent");
    let rootfs = dir.join("rootfs.ext4");
    make_ext4(&rootfs);
    let raw = dir.join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let initrd = dir.join("initrd.img");
    let initrd_data: Vec<u8> = (0..12345u32).map(|i| (i * 31 + i / 7) as u8).collect();
    std::fs::write(&initrd, &initrd_data).unwrap();
    let uds = dir.join("v.sock");
    let cfg = json!({
        "boot-source": {
            "kernel_image_path": PVH_ELF,
            "boot_args": "ember.test=pod-agent",
            "initrd_path": initrd,
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [drive("rootfs", &rootfs), drive("raw", &raw)],
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let mut vm = spawn_vm(&dir, cfg);
    expect_line(
        &mut vm,
        &format!(
            "pod-agent initrd size {} head-fnv1a 0x{:08x}",
            initrd_data.len(),
            ember_guests::fnv1a32(&initrd_data[..4096])
        ),
    );
    expect_line(&mut vm, "pod-agent disks 2");
    expect_line(&mut vm, "pod-agent listening on port 2718");

    let mut c = connect(&mut vm, &uds);
    assert_eq!(c.ready().version, VERSION, "READY version");
    assert!(c.ready().pid1, "READY says pid1");
    assert_eq!(c.ping().unwrap(), VERSION, "PING's ACK carries the version");
    expect_line(&mut vm, "pod-agent connection accepted");
    expect_line(&mut vm, "pod-agent recv cmd 12 len 2");
    expect_line(&mut vm, "pod-agent payload {}");

    // A container on the ext4 disk: the guest checks the superblock.
    let req = start_req("c1", "/dev/vda", &[("A", "1")]);
    let payload = serde_json::to_string(&req).unwrap();
    assert!(payload.len() < 400, "the whole payload is logged");
    assert_eq!(
        c.start_container(req).unwrap(),
        100,
        "first container's pid"
    );
    expect_line(
        &mut vm,
        &format!("pod-agent recv cmd 17 len {}", payload.len()),
    );
    expect_line(&mut vm, &format!("pod-agent payload {payload}"));
    expect_line(&mut vm, "pod-agent container c1 rootfs /dev/vda ext4 ok");

    // Failures are ERROR replies; the connection goes on.
    expect_agent_error(
        c.start_container(start_req("c2", "/dev/vdb", &[])),
        "/dev/vdb is not ext4",
    );
    expect_agent_error(
        c.start_container(start_req("c2", "/dev/vdz", &[])),
        "no such device /dev/vdz",
    );
    expect_agent_error(
        c.start_container(start_req("c1", "/dev/vda", &[])),
        "container c1 exists",
    );
    expect_agent_error(
        c.wait("c1", None),
        "pod-agent guest cannot wait for a running process",
    );
    expect_agent_error(
        c.exec(Exec {
            container: "c1".into(),
            id: "e1".into(),
            cmd: vec!["ls".into()],
            env: vec![],
            workdir: None,
            user: None,
            stdio: false,
            tty: false,
        }),
        "starting e1: execve failed: the pod-agent guest runs only stub-echo and stub-exit",
    );

    // A stub that exits at once: ACK, then the exit event.
    let pid = c
        .start_container(start_req("c2", "/dev/vda", &[("EMBER_STUB_EXIT", "3")]))
        .unwrap();
    assert_eq!(pid, 101, "second container's pid");
    assert_eq!(c.next_event().unwrap(), exited("c2", 3), "c2's exit event");
    assert_eq!(c.wait("c2", Some(Duration::from_secs(5))).unwrap(), 3);
    expect_line(&mut vm, "pod-agent container c2 rootfs /dev/vda ext4 ok");

    // Stopping the running one: the event comes before the ACK.
    assert_eq!(
        c.stop_container("c1", 15, Duration::from_secs(1)).unwrap(),
        143
    );
    assert_eq!(c.take_events(), vec![exited("c1", 143)], "c1's exit event");
    assert_eq!(
        c.stop_container("c1", 9, Duration::from_secs(1)).unwrap(),
        143,
        "stopping an exited container returns its recorded code"
    );
    assert!(c.take_events().is_empty(), "no second exit event");
    expect_agent_error(
        c.stop_container("nope", 15, Duration::from_secs(1)),
        "no such container nope",
    );
    expect_agent_error(c.wait("nope", None), "no such container nope");

    // Containers outlive the connection.
    drop(c);
    expect_line(&mut vm, "pod-agent connection closed");
    let mut c = connect(&mut vm, &uds);
    assert_eq!(c.ready().version, VERSION, "second READY");
    assert_eq!(c.wait("c1", None).unwrap(), 143, "c1 is remembered");
    assert_eq!(c.wait("c2", None).unwrap(), 3, "c2 is remembered");
    c.remove_container("c2").unwrap();
    expect_agent_error(c.wait("c2", None), "no such container c2");
    expect_agent_error(c.remove_container("c2"), "no such container c2");

    // At most eight records; c2's free slot is reused (pid = 100 + slot).
    for (i, id) in ["c3", "c4", "c5", "c6", "c7", "c8", "c9"]
        .iter()
        .enumerate()
    {
        let pid = c.start_container(start_req(id, "/dev/vda", &[])).unwrap();
        assert_eq!(pid, 101 + i as u32, "pid of {id}");
    }
    expect_agent_error(
        c.start_container(start_req("c10", "/dev/vda", &[])),
        "too many containers (8)",
    );
    expect_agent_error(
        c.start_container(start_req("bad id", "/dev/vda", &[])),
        "bad NEWCONTAINER payload: no valid id",
    );

    let lines = destroy(c, &mut vm);
    let destroy = lines.iter().position(|l| l == "pod-agent destroy");
    assert!(destroy.is_some(), "no destroy line:\n{}", vm.out());
    assert_eq!(
        lines.last().map(String::as_str),
        Some("done"),
        "the guest ends with `done` after `pod-agent destroy`:\n{}",
        vm.out()
    );
    assert_eq!(
        count_lines(&vm, "pod-agent listening on port 2718"),
        2,
        "listens again after the first connection:\n{}",
        vm.out()
    );
    assert_eq!(
        count_lines(&vm, "pod-agent connection accepted"),
        2,
        "two connections were served:\n{}",
        vm.out()
    );
    assert_eq!(
        count_lines(&vm, "pod-agent connection closed"),
        1,
        "DESTROYPOD ends the mode without a `connection closed`:\n{}",
        vm.out()
    );
    assert!(!uds.exists(), "ember-vmm leaves no vsock socket behind");
}

#[test]
fn pod_agent_guest_frames_split_batched_and_oversized() {
    let dir = TempDir::new("pod-agent-frames");
    let uds = dir.join("v.sock");
    let cfg = json!({
        "boot-source": {"kernel_image_path": PVH_ELF, "boot_args": "ember.test=pod-agent"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "vsock": {"guest_cid": 3, "uds_path": uds},
    });
    let mut vm = spawn_vm(&dir, cfg);
    expect_line(&mut vm, "pod-agent initrd none");
    expect_line(&mut vm, "pod-agent disks 0");
    expect_line(&mut vm, "pod-agent listening on port 2718");

    let mut s = connect_raw(&mut vm, &uds);
    let ping = Frame {
        cmd: cmd::PING,
        payload: b"{}".to_vec(),
    }
    .to_bytes();
    // Two frames in one write, then one frame in two writes (the pause
    // makes separate vsock packets likely; nothing depends on it).
    s.write_all(&[ping.clone(), ping.clone()].concat()).unwrap();
    expect_ping_ack(&mut s);
    expect_ping_ack(&mut s);
    s.write_all(&ping[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&ping[5..]).unwrap();
    expect_ping_ack(&mut s);

    // Non-printable payload bytes are logged as '?'.
    write_frame(
        &mut s,
        &Frame {
            cmd: cmd::PING,
            payload: b"{\n}".to_vec(),
        },
    )
    .unwrap();
    expect_ping_ack(&mut s);
    expect_line(&mut vm, "pod-agent payload {?}");

    // A payload of exactly the limit spans several vsock packets; only its
    // first 400 bytes are logged.
    let mut big = b"{}".to_vec();
    big.resize(GUEST_MAX_PAYLOAD, b' ');
    write_frame(
        &mut s,
        &Frame {
            cmd: cmd::PING,
            payload: big,
        },
    )
    .unwrap();
    expect_ping_ack(&mut s);
    expect_line(
        &mut vm,
        &format!("pod-agent recv cmd 12 len {GUEST_MAX_PAYLOAD}"),
    );
    expect_line(
        &mut vm,
        &format!("pod-agent payload {{}}{}", " ".repeat(398)),
    );

    // One byte more: ERROR, then the guest closes the stream (RST).
    let too_big = GUEST_MAX_PAYLOAD as u32 + 1;
    let mut hdr = cmd::PING.to_be_bytes().to_vec();
    hdr.extend_from_slice(&too_big.to_be_bytes());
    s.write_all(&hdr).unwrap();
    assert_eq!(
        recv(&mut s),
        AgentMessage::error(format!(
            "frame payload of {too_big} bytes exceeds the {GUEST_MAX_PAYLOAD}-byte limit"
        )),
        "an oversized frame gets an ERROR"
    );
    match read_frame(&mut s) {
        Err(ProtocolError::Closed) => {}
        Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the guest must close the connection after an oversized frame: {other:?}"),
    }
    expect_line(&mut vm, &format!("pod-agent recv cmd 12 len {too_big}"));
    expect_line(&mut vm, "pod-agent connection closed");

    // The next connection is served normally.
    let mut c = connect(&mut vm, &uds);
    assert_eq!(c.ping().unwrap(), VERSION, "PING on the new connection");
    expect_agent_error(c.wait("c1", None), "no such container c1");
    let lines = destroy(c, &mut vm);
    assert!(
        lines.iter().any(|l| l == "pod-agent destroy"),
        "no destroy line:\n{}",
        vm.out()
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("done"),
        "the guest ends with `done`:\n{}",
        vm.out()
    );
}
