//! hyperctl 1.1.0's container stdio against emberd, byte for byte: `run`
//! (attached), `exec` (with and without a terminal), `attach`, `logs`
//! (plain, tail, timestamps, stream selection, follow) and their exit
//! codes. Each exchange replays what the client sends (paths under
//! `/v1.1.0/`, query parameters in `url.Values.Encode` order, the hijack
//! headers of `client/api/hijack.go`) and parses the answer as the client
//! does (the `101 UPGRADED` head, then Docker's `stdcopy` frames without a
//! terminal or raw bytes with one).
//!
//! The pod VM is real (emberd, the jailer, ember-vmm, virtio-vsock, the
//! agent session), its kernel is ember's test guest in `pod-agent` mode,
//! whose `stub-echo` and `stub-exit` commands stand in for container
//! processes (resources/guests/guest/podagent.c): they write known text to
//! stdout and stderr, echo stdin, and exit with the code they were given.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use ember_tests::*;
use serde_json::{json, Value};

const UID: u32 = 10509;

/// What hyperd answers before the raw stream.
const UPGRADED: &[u8] = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";

fn start(tag: &str) -> Emberd {
    let agent = bin("ember-agent");
    Emberd::start(
        tag,
        UID,
        &[
            "--pod-kernel",
            PVH_ELF,
            "--pod-boot-args",
            "ember.test=pod-agent",
            "--pod-agent",
            agent.to_str().unwrap(),
            "--pod-rootfs-mb",
            "16",
            "--pod-stop-timeout",
            "1",
            "--pod-agent-timeout",
            "60",
        ],
    )
}

/// A request as `client/api/request.go: (*Client).httpRequest` sends it.
fn call(d: &Emberd, method: &str, path: &str, json_body: Option<&Value>) -> HttpResponse {
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!(
        "{method} /v1.1.0{path} HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nUser-Agent: Hyper-Client/1.1.0\r\n"
    );
    let body = json_body.map(|b| b.to_string()).unwrap_or_default();
    if json_body.is_some() {
        req.push_str("Content-Type: application/json\r\n");
    } else if method != "GET" {
        req.push_str("Content-Type: text/plain\r\n");
    }
    if method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).unwrap()
}

/// `client/api/hijack.go: (*Client).hijack`: the request, then the
/// connection as a raw stream once the head is read.
fn hijack(d: &Emberd, path: &str) -> UnixStream {
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        format!(
            "POST /v1.1.0{path} HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nUser-Agent: Hyper-Client/1.1.0\r\nContent-Length: 0\r\nConnection: Upgrade\r\nContent-Type: text/plain\r\nUpgrade: tcp\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF in the head: {head:?}");
        head.push(b[0]);
    }
    assert_eq!(
        String::from_utf8_lossy(&head),
        String::from_utf8_lossy(UPGRADED)
    );
    s
}

/// A hijack that must be refused before the stream starts.
fn hijack_refused(d: &Emberd, path: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        format!(
            "POST /v1.1.0{path} HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let r = read_response(&mut s).unwrap();
    (r.status, r.json())
}

/// One `stdcopy` frame (github.com/docker/docker/pkg/stdcopy.StdCopy); None
/// at EOF.
fn frame(s: &mut impl Read) -> Option<(u8, String)> {
    let mut h = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        let n = s.read(&mut h[got..]).unwrap();
        if n == 0 {
            assert_eq!(got, 0, "EOF inside a frame header");
            return None;
        }
        got += n;
    }
    assert!(matches!(h[0], 0..=2), "stream byte {}", h[0]);
    assert_eq!(&h[1..4], &[0, 0, 0]);
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).unwrap();
    Some((h[0], String::from_utf8(data).unwrap()))
}

/// Every frame until EOF.
fn frames(s: &mut impl Read) -> Vec<(u8, String)> {
    std::iter::from_fn(|| frame(s)).collect()
}

/// Raw bytes until `want` has arrived.
fn read_until(s: &mut UnixStream, want: &str) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = s.read(&mut b).unwrap();
        assert!(
            n > 0,
            "EOF before {want:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8(got).unwrap()
}

fn enc(s: &str) -> String {
    urlencode(s)
}

#[test]
fn hyperctl_run_exec_attach_and_logs() {
    let mut d = start("hstdio");
    d.hyperd_import(
        "app:1",
        json!({"layers": [{"dirs": ["bin"], "files": {"bin/app": "#!/bin/sh\n"}}],
               "config": {"Cmd": ["/bin/app"]}}),
    );

    // client/run.go: (*HyperClient).HyperCmdRun (hyperctl run -a -p pod.json):
    // CreatePod, GetPodInfo, Attach to the first container by name, StartPod.
    let spec = json!({"id": "runner", "resource": {"vcpu": 1, "memory": 64},
        "containers": [{"name": "echo", "image": "app:1", "command": ["stub-echo", "7"]},
                       {"name": "side", "image": "app:1", "command": ["stub-echo"],
                        "envs": [{"env": "B", "value": "2"}], "workdir": "/w"},
                       {"name": "term", "image": "app:1", "command": ["stub-echo", "2"], "tty": true}]});
    // client/api/create.go: (*Client).CreatePod
    let r = call(&d, "POST", "/pod/create", Some(&spec));
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let pod = r.json()["ID"].as_str().unwrap().to_string();
    // client/api/info.go: (*Client).GetPodInfo
    let r = call(&d, "GET", &format!("/pod/info?podName={pod}"), None);
    assert_eq!(r.status, 200);
    let info = r.json();
    assert_eq!(info["podID"], json!(pod));
    let echo_id = info["spec"]["containers"][0]["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    let side_id = info["spec"]["containers"][1]["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(info["spec"]["containers"][0]["name"], "echo");
    assert_eq!(info["spec"]["containers"][0]["tty"], json!(false));
    // client/api/attach.go: (*Client).Attach, before the pod starts.
    let mut run = hijack(&d, "/attach?container=echo");
    // client/api/start.go: (*Client).StartPod
    let r = call(&d, "POST", &format!("/pod/start?podId={pod}"), None);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["Code"], json!(0));
    assert_eq!(
        frame(&mut run),
        Some((1, format!("stub-echo {echo_id} ready\n")))
    );
    assert_eq!(
        frame(&mut run),
        Some((2, format!("stub-echo {echo_id} stderr\n")))
    );
    run.write_all(b"hello\n").unwrap();
    assert_eq!(frame(&mut run), Some((1, "hello\n".into())));
    // The client's stdin ends: CloseWrite; the stub exits 7; the stream ends.
    run.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(frames(&mut run), vec![]);
    // client/api/misc.go: (*Client).GetExitCode (wait: no tty), by name.
    let r = call(&d, "GET", "/exitcode?container=echo&exec=", None);
    assert_eq!((r.status, r.json()), (200, json!(7)));

    // client/exec.go: (*HyperClient).HyperCmdExec: hyperctl exec SIDE stub-exit 3
    // client/api/exec.go: (*Client).CreateExec
    let cmd = enc(r#"["stub-exit","3"]"#);
    let r = call(
        &d,
        "POST",
        &format!("/exec/create?command={cmd}&container={side_id}&tty=false"),
        None,
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let exec: String = serde_json::from_slice(&r.body).unwrap();
    assert!(exec.starts_with("exec-") && exec.len() == 15, "{exec}");
    // client/api/exec.go: (*Client).StartExec
    let mut s = hijack(&d, &format!("/exec/start?container={side_id}&exec={exec}"));
    assert_eq!(
        frames(&mut s),
        vec![(1, format!("stub-exit {exec}\n")), (2, "bye\n".into())]
    );
    // client/api/misc.go: (*Client).GetExitCode
    let r = call(
        &d,
        "GET",
        &format!("/exitcode?container={side_id}&exec={exec}"),
        None,
    );
    assert_eq!((r.status, r.json()), (200, json!(3)));
    // Starting it again is a conflict, before any hijack.
    let (c, v) = hijack_refused(&d, &format!("/exec/start?container={side_id}&exec={exec}"));
    assert_eq!(c, 409, "{v}");
    assert!(v["Cause"]
        .as_str()
        .unwrap()
        .contains("already been started"));

    // hyperctl exec -t SIDE stub-echo 5: a terminal, so raw bytes; a
    // SIGWINCH sends client/api/misc.go: (*Client).WinResize.
    let cmd = enc(r#"["stub-echo","5"]"#);
    let r = call(
        &d,
        "POST",
        &format!("/exec/create?command={cmd}&container={side_id}&tty=true"),
        None,
    );
    assert_eq!(r.status, 201);
    let texec: String = serde_json::from_slice(&r.body).unwrap();
    let mut t = hijack(&d, &format!("/exec/start?container={side_id}&exec={texec}"));
    let got = read_until(&mut t, "stderr\n");
    assert_eq!(
        got,
        format!("stub-echo {texec} ready\nstub-echo {texec} stderr\n")
    );
    let r = call(
        &d,
        "POST",
        &format!("/tty/resize?container={side_id}&exec={texec}&h=40&w=120"),
        None,
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    t.write_all(b"typed").unwrap();
    assert_eq!(read_until(&mut t, "typed"), "typed");
    t.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // With a terminal hyperctl does not wait: GetExitCode(wait=false)
    // reads client/api/info.go: (*Client).GetContainerInfo.
    let r = call(
        &d,
        "GET",
        &format!("/container/info?container={side_id}"),
        None,
    );
    assert_eq!(r.status, 200);
    let ci = r.json();
    assert_eq!(ci["podID"], json!(pod));
    assert_eq!(ci["container"]["containerID"], json!(side_id));
    assert_eq!(ci["status"]["phase"], "running");
    // The exec's own code is there too.
    let r = call(
        &d,
        "GET",
        &format!("/exitcode?container={side_id}&exec={texec}"),
        None,
    );
    assert_eq!((r.status, r.json()), (200, json!(5)));
    let vm = info_vm(&d, &pod);
    let log = d.wait_logs(&vm, &format!("pod-agent resize {texec} 40x120"));
    assert!(
        log.contains(&format!("pod-agent exec {texec} in {side_id}: stub-echo")),
        "{log}"
    );
    // Execs run with the container's environment and working directory.
    assert!(
        log.contains(r#""cmd":["stub-echo","5"],"env":[["B","2"],["PATH","/usr/local/sbin:"#),
        "{log}"
    );
    assert!(
        log.contains(r#"/sbin:/bin"]],"workdir":"/w","stdio":true,"tty":true}"#),
        "{log}"
    );

    // emberd dies and comes back: it reconnects to the pod VM's agent and
    // gets the containers' recent output back (LOGS, cmd 68) before it
    // serves their streams again (then WAITPROCESS, cmd 64).
    d.kill9();
    d.restart();
    d.wait_logs(&vm, "pod-agent recv cmd 64");
    let log = d.logs(&vm);
    assert_eq!(
        log.matches("pod-agent recv cmd 68").count(),
        3,
        "one LOGS per container:\n{log}"
    );

    // client/logs.go: (*HyperClient).HyperCmdLogs: GetContainerInfo, then
    // client/api/logs.go: (*Client).ContainerLogs (stdout and stderr).
    let r = call(&d, "GET", "/container/info?container=echo", None);
    assert_eq!(r.json()["container"]["tty"], json!(false));
    assert_eq!(r.json()["status"]["terminated"]["exitCode"], json!(7));
    let r = call(
        &d,
        "GET",
        "/container/logs?container=echo&follow=false&since=&stderr=true&stdout=true&tail=&timestamps=false",
        None,
    );
    assert_eq!(r.status, 200);
    assert!(!r.header("content-type").unwrap().contains("json"));
    assert_eq!(
        frames(&mut r.body.as_slice()),
        vec![
            (1, format!("stub-echo {echo_id} ready\n")),
            (2, format!("stub-echo {echo_id} stderr\n")),
            (1, "hello\n".into()),
        ]
    );
    // hyperctl logs -t --tail 1
    let r = call(
        &d,
        "GET",
        "/container/logs?container=echo&follow=false&since=&stderr=true&stdout=true&tail=1&timestamps=true",
        None,
    );
    let f = frames(&mut r.body.as_slice());
    assert_eq!(f.len(), 1, "{f:?}");
    let (ts, line) = f[0].1.split_once(' ').unwrap();
    assert_eq!(line, "hello\n");
    assert!(
        ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
    // Only stderr (the API allows it; hyperctl always asks for both).
    let r = call(
        &d,
        "GET",
        "/container/logs?container=echo&stderr=true&stdout=false",
        None,
    );
    assert_eq!(
        frames(&mut r.body.as_slice()),
        vec![(2, format!("stub-echo {echo_id} stderr\n"))]
    );

    // Stalled clients hold only their own connections: one sends half a
    // request head and stops, one attaches to SIDE and reads nothing yet.
    let mut stalled = UnixStream::connect(&d.sock).unwrap();
    stalled
        .write_all(b"GET /v1.1.0/info HTTP/1.1\r\nHost: /var/run/hyper.sock\r\n")
        .unwrap();
    let mut idle_attach = hijack(&d, &format!("/attach?container={side_id}"));

    // hyperctl logs -f SIDE while hyperctl attach SIDE types into it.
    let mut follow = UnixStream::connect(&d.sock).unwrap();
    follow.set_read_timeout(Some(PATIENCE)).unwrap();
    follow
        .write_all(
            format!(
                "GET /v1.1.0/container/logs?container={side_id}&follow=true&since=&stderr=true&stdout=true&tail=&timestamps=false HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nUser-Agent: Hyper-Client/1.1.0\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    // client/attach.go: (*HyperClient).HyperCmdAttach: GetContainerInfo, Attach.
    let r = call(
        &d,
        "GET",
        &format!("/container/info?container={side_id}"),
        None,
    );
    assert_eq!(r.json()["container"]["tty"], json!(false));
    let mut a = hijack(&d, &format!("/attach?container={side_id}"));
    a.write_all(b"more\n").unwrap();
    assert_eq!(frame(&mut a), Some((1, "more\n".into())));
    a.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(frames(&mut a), vec![]);
    let r = call(
        &d,
        "GET",
        &format!("/exitcode?container={side_id}&exec="),
        None,
    );
    assert_eq!((r.status, r.json()), (200, json!(0)));
    // The idle attach got the same output, then the end.
    assert_eq!(frames(&mut idle_attach), vec![(1, "more\n".into())]);
    drop(stalled);
    // The follower saw the history, then the new line, then the end.
    let r = read_response(&mut follow).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        frames(&mut r.body.as_slice()),
        vec![
            (1, format!("stub-echo {side_id} ready\n")),
            (2, format!("stub-echo {side_id} stderr\n")),
            (1, "more\n".into()),
        ]
    );

    // A container with a terminal: hyperctl attach TERM (raw bytes), then
    // GetExitCode(wait=false) reads the container info; logs are raw too.
    let term_id = info["spec"]["containers"][2]["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    let r = call(&d, "GET", "/container/info?container=term", None);
    assert_eq!(r.json()["container"]["tty"], json!(true));
    let mut a = hijack(&d, "/attach?container=term");
    a.write_all(b"raw\n").unwrap();
    assert_eq!(read_until(&mut a, "raw\n"), "raw\n");
    a.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let r = call(&d, "GET", "/container/info?container=term", None);
    let ci = r.json();
    assert_eq!(ci["status"]["phase"], "failed", "{ci}");
    assert_eq!(ci["status"]["terminated"]["exitCode"], json!(2), "{ci}");
    let r = call(
        &d,
        "GET",
        &format!("/container/logs?container={term_id}&follow=false&since=&stderr=true&stdout=true&tail=&timestamps=false"),
        None,
    );
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        format!("stub-echo {term_id} ready\nstub-echo {term_id} stderr\nraw\n")
    );
    // The pod has ended: every container exited, one with a failure.
    let r = call(&d, "GET", &format!("/pod/info?podName={pod}"), None);
    assert_eq!(r.json()["status"]["phase"], "Failed");

    // Bad input: clear errors, hyperd's statuses, the JSON envelope.
    let r = call(
        &d,
        "POST",
        &format!("/exec/create?command=ls&container={side_id}&tty=false"),
        None,
    );
    assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["Cause"].as_str().unwrap().contains("JSON array"));
    let (c, v) = hijack_refused(
        &d,
        &format!("/exec/start?container={side_id}&exec=exec-nothere"),
    );
    assert_eq!(c, 404, "{v}");
    let (c, v) = hijack_refused(&d, "/attach?container=nothere");
    assert_eq!(c, 404, "{v}");
    let r = call(
        &d,
        "GET",
        "/container/logs?container=echo&stdout=false&stderr=0",
        None,
    );
    assert_eq!(r.status, 400);
    let r = call(
        &d,
        "GET",
        "/container/logs?container=echo&stdout=1&since=yesterday",
        None,
    );
    assert_eq!(r.status, 400);
    let r = call(
        &d,
        "POST",
        &format!("/tty/resize?container={side_id}&h=abc&w=1"),
        None,
    );
    assert_eq!(r.status, 400);
    let r = call(&d, "GET", "/exitcode?container=nothere&exec=", None);
    assert_eq!(r.status, 404);
    // client/api/exec.go: (*Client).ExecVM (hyperctl exec -m) is refused
    // before any hijack.
    let (c, v) = hijack_refused(
        &d,
        &format!("/execvm?command={}&pod={pod}", enc(r#"["ls"]"#)),
    );
    assert_eq!(c, 500, "{v}");
    assert!(
        v["Cause"].as_str().unwrap().contains("not supported"),
        "{v}"
    );
    // The pod has ended (both containers exited): no more execs.
    let r = call(
        &d,
        "POST",
        &format!(
            "/exec/create?command={}&container={side_id}&tty=false",
            enc(r#"["stub-exit"]"#)
        ),
        None,
    );
    assert_eq!(r.status, 409, "{:?}", String::from_utf8_lossy(&r.body));

    // client/api/rm.go: (*Client).RmPod
    let r = call(&d, "DELETE", &format!("/pod?podId={pod}"), None);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
}

/// The hyperd `vm-` id of a pod's VM (its instance's name).
fn info_vm(d: &Emberd, pod: &str) -> String {
    let r = call(d, "GET", &format!("/pod/info?podName={pod}"), None);
    r.json()["vm"].as_str().unwrap().to_string()
}
