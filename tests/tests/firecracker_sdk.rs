//! Replays, byte for byte, what firecracker-go-sdk v1.0.0 and firectl
//! v0.2.0 do to the binary they start and to its API socket, with
//! ember-vmm as that binary (the Go stack itself is in no registry CI
//! reaches). Each step names the SDK function it mirrors.
//!
//! Requests are written as Go's net/http sends them for the SDK's
//! go-openapi client: `Host: localhost`, `User-Agent: Go-http-client/1.1`,
//! `Content-Length`, `Accept: application/json`, `Content-Type:
//! application/json` on bodies, `Accept-Encoding: gzip`, and bodies as Go's
//! `json.Encoder` writes the generated models: fields in the models' order,
//! `omitempty` ones left out, and a trailing newline.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use ember_tests::*;
use serde_json::json;

/// One request as the SDK's Go client sends it; returns status and body.
fn go_request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect API socket");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Go-http-client/1.1\r\n"
    );
    match body {
        Some(b) => {
            let b = format!("{b}\n");
            req.push_str(&format!(
                "Content-Length: {}\r\nAccept: application/json\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n{b}",
                b.len()
            ));
        }
        None => req.push_str("Accept: application/json\r\nAccept-Encoding: gzip\r\n\r\n"),
    }
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("read response");
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// A PUT/PATCH the SDK expects 204 for (its generated client treats any
/// other status as an error).
fn go_no_content(sock: &Path, method: &str, path: &str, body: &str) {
    let (st, b) = go_request(sock, method, path, Some(body));
    assert_eq!(st, 204, "{method} {path} {body}: {b}");
}

/// `createFifo` (machine.go): mkfifo with mode 0700.
fn mkfifo(p: &Path) {
    let c = CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o700) }, 0);
}

/// Reads what is in a FIFO without blocking.
fn drain(f: &mut std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fifo_reader(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .unwrap()
}

/// ember's own filters compiled the way Firecracker's `seccompiler-bin`
/// does (seccompiler, then bitcode of `HashMap<String, Vec<u64>>`): the file
/// an SDK user hands to `Config.Seccomp.Filter`.
fn compiled_filter_file(dir: &TempDir) -> std::path::PathBuf {
    let json = std::fs::File::open(workspace_root().join("resources/seccomp/vmm.json")).unwrap();
    let filters = seccompiler::compile_from_json(json, seccompiler::TargetArch::x86_64).unwrap();
    let map: HashMap<String, Vec<u64>> = filters
        .into_iter()
        .map(|(name, prog)| {
            let insns = prog
                .iter()
                .map(|i| {
                    u64::from(i.code)
                        | u64::from(i.jt) << 16
                        | u64::from(i.jf) << 24
                        | u64::from(i.k) << 32
                })
                .collect();
            (name, insns)
        })
        .collect();
    let p = dir.join("filter.bpf");
    std::fs::write(&p, bitcode::serialize(&map).unwrap()).unwrap();
    p
}

/// `--seccomp-filter FILE` (what `seccompArgs` passes for
/// `Seccomp{Enabled: true, Filter: FILE}`) replaces the built-in filters:
/// with ember's own programs the API thread's forbidden `socket(AF_INET)`
/// kills the process by SIGSYS; with a file whose `api` program is a single
/// "allow" instruction, the same call succeeds. A file in neither of
/// Firecracker's formats is refused before anything runs.
#[test]
fn seccomp_filter_file_is_what_the_threads_install() {
    use std::os::unix::process::ExitStatusExt;
    let dir = TempDir::new("sdkseccomp");
    let file = compiled_filter_file(&dir);
    let run = |filter: &Path, tag: &str| {
        let sock = dir.join(&format!("{tag}.sock"));
        let mut cmd = Command::new(bin("ember-vmm"));
        cmd.arg("--api-sock")
            .arg(&sock)
            .arg("--seccomp-filter")
            .arg(filter)
            .args(["--seccomp-test-trigger", "api"]);
        Proc::spawn(cmd, dir.path(), tag)
    };
    let mut p = run(&file, "strict");
    let st = p.wait();
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?} {}", p.err());

    // The same map with `api` = [BPF_RET | BPF_K SECCOMP_RET_ALLOW].
    let bytes = std::fs::read(&file).unwrap();
    let mut map: HashMap<String, Vec<u64>> = bitcode::deserialize(&bytes).unwrap();
    map.insert("api".into(), vec![0x06 | (0x7fff_0000u64 << 32)]);
    let lax = dir.join("lax.bpf");
    std::fs::write(&lax, bitcode::serialize(&map).unwrap()).unwrap();
    let mut p = run(&lax, "lax");
    let sock = dir.join("lax.sock");
    wait_for_socket(&sock);
    assert!(
        wait_for(PATIENCE, || p
            .err()
            .contains("the api thread survived (socket created)")
            .then_some(()))
        .is_some(),
        "{}",
        p.err()
    );
    // SIGTERM ends it (Firecracker's SDK StopVMM).
    // SAFETY: signalling our own child.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    assert_eq!(p.wait().code(), Some(143));

    let junk = dir.join("junk.bpf");
    std::fs::write(&junk, b"not a filter").unwrap();
    let mut p = run(&junk, "junk");
    assert_eq!(p.wait().code(), Some(152));
    assert!(p.err().contains("not a compiled filter map"), "{}", p.err());
}

/// `Machine.Start` with logging and metrics FIFOs, machine config with
/// `smt`, boot source, two drives, a TAP interface allowed to reach MMDS,
/// vsock and seccomp from a filter file; then firectl's `SetMetadata`, an
/// entropy device, `PauseVM`, `ResumeVM`, `Shutdown` and `Wait`.
#[test]
fn sdk_machine_start_then_pause_resume_shutdown_wait() {
    let ns = NetNs::new("sdk", "sdktap0", "10.0.7.1", None);
    let dir = TempDir::new("sdk");
    let sock = dir.join("fc.sock");
    let log_fifo = dir.join("log.fifo");
    let metrics_fifo = dir.join("metrics.fifo");
    let rootfs = dir.join("rootfs.img");
    let data = dir.join("data.img");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&data, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.join("v.sock");
    let filter = compiled_filter_file(&dir);

    // startVMM: the command configureBuilder builds (VMCommandBuilder.Build:
    // the socket first, then AddArgs("--id", VMID) and seccompArgs with
    // Seccomp{Enabled: true, Filter: FILE}), started inside the namespace
    // (ns.WithNetNSPath, as for Config.NetNS without a jailer).
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(bin("ember-vmm"))
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "sdk-vm-1"])
        .arg("--seccomp-filter")
        .arg(&filter);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");

    // waitForSocket: stat the socket, then GET /machine-config until it answers.
    wait_for_socket(&sock);
    let (st, b) = go_request(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200, "{b}");

    // CreateLogFilesHandler: createFifoOrFile for MetricsFifo, then LogFifo.
    mkfifo(&metrics_fifo);
    mkfifo(&log_fifo);
    let mut log_r = fifo_reader(&log_fifo);
    let mut metrics_r = fifo_reader(&metrics_fifo);

    // BootstrapLoggingHandler: setupLogging (PutLogger), setupMetrics (PutMetrics).
    go_no_content(
        &sock,
        "PUT",
        "/logger",
        &format!(
            r#"{{"level":"Debug","log_path":{},"show_level":true,"show_log_origin":false}}"#,
            json!(log_fifo)
        ),
    );
    go_no_content(
        &sock,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path":{}}}"#, json!(metrics_fifo)),
    );

    // CreateMachineHandler: createMachine (PutMachineConfiguration, then
    // refreshMachineConfiguration: GetMachineConfiguration).
    go_no_content(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib":64,"smt":true,"vcpu_count":2}"#,
    );
    let (st, b) = go_request(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    let mc: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (
            mc["vcpu_count"].clone(),
            mc["mem_size_mib"].clone(),
            mc["smt"].clone()
        ),
        (json!(2), json!(64), json!(true))
    );

    // CreateBootSourceHandler: createBootSource (PutGuestBootSource).
    go_no_content(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"boot_args":"console=ttyS0 ember.test=wait-ctrlaltdel","kernel_image_path":{}}}"#,
            json!(PVH_ELF)
        ),
    );

    // AttachDrivesHandler: attachDrive for DrivesBuilder.Build()'s order:
    // added drives ("0", ...) first, then "root_drive".
    go_no_content(
        &sock,
        "PUT",
        "/drives/0",
        &format!(
            r#"{{"drive_id":"0","is_read_only":true,"is_root_device":false,"path_on_host":{}}}"#,
            json!(data)
        ),
    );
    go_no_content(
        &sock,
        "PUT",
        "/drives/root_drive",
        &format!(
            r#"{{"drive_id":"root_drive","is_read_only":false,"is_root_device":true,"path_on_host":{}}}"#,
            json!(rootfs)
        ),
    );

    // CreateNetworkInterfacesHandler: createNetworkInterface, ids from 1.
    go_no_content(
        &sock,
        "PUT",
        "/network-interfaces/1",
        r#"{"guest_mac":"06:00:0a:00:07:02","host_dev_name":"sdktap0","iface_id":"1"}"#,
    );

    // AddVsocksHandler: addVsock (PutGuestVsock).
    go_no_content(
        &sock,
        "PUT",
        "/vsock",
        &format!(
            r#"{{"guest_cid":3,"uds_path":{},"vsock_id":"vsock0"}}"#,
            json!(uds)
        ),
    );

    // ConfigMmdsHandler: setMmdsConfig with AllowMMDS on interface 1, V1.
    go_no_content(
        &sock,
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces":["1"],"version":"V1"}"#,
    );

    // An entropy device (PUT /entropy with a rate limiter; not in SDK
    // v1.0.0, sent by later clients such as the SDK's main branch).
    go_no_content(
        &sock,
        "PUT",
        "/entropy",
        r#"{"rate_limiter":{"bandwidth":{"one_time_burst":0,"refill_time":100,"size":10000}}}"#,
    );

    // Machine.Start -> startInstance (CreateSyncAction InstanceStart).
    go_no_content(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    p.expect_out("waiting for ctrl-alt-del");

    // firectl after Start: SetMetadata (PutMmds), and GetMetadata reads it back.
    go_no_content(
        &sock,
        "PUT",
        "/mmds",
        r#"{"latest":{"meta-data":{"instance-id":"i-sdk"}}}"#,
    );
    let (st, b) = go_request(&sock, "GET", "/mmds", None);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["latest"]["meta-data"]
            ["instance-id"],
        "i-sdk"
    );

    // PauseVM, DescribeInstanceInfo, ResumeVM.
    go_no_content(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    let (_, b) = go_request(&sock, "GET", "/", None);
    assert!(b.contains(r#""state":"Paused""#), "{b}");
    go_no_content(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    let (_, b) = go_request(&sock, "GET", "/", None);
    assert!(b.contains(r#""state":"Running""#), "{b}");
    assert!(b.contains(r#""id":"sdk-vm-1""#), "{b}");

    // The logger and metrics FIFOs got Firecracker-shaped output.
    let log = drain(&mut log_r);
    assert!(log.contains("[sdk-vm-1:"), "{log}");
    assert!(log.contains(":INFO] boot:"), "{log}");
    let metrics = drain(&mut metrics_r);
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("a metrics line")).unwrap();
    assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(first["put_api_requests"]["drive_count"], 2, "{metrics}");
    assert_eq!(first["put_api_requests"]["actions_count"], 1, "{metrics}");
    assert!(first["net_1"]["tx_packets_count"].is_u64(), "{metrics}");
    assert!(
        first["block_root_drive"]["read_count"].is_u64(),
        "{metrics}"
    );

    // Shutdown (sendCtrlAltDel), then Wait: the process exits 0.
    go_no_content(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"SendCtrlAltDel"}"#,
    );
    let st = p.wait();
    assert_eq!(st.code(), Some(0), "{}", p.err());
    assert!(p.out().contains("ember-guest: ctrl-alt-del"), "{}", p.out());
    // startVMM's cleanup removes the socket; ember-vmm already did.
    assert!(!sock.exists());
}

/// A plain `firectl --kernel K --root-drive R --kernel-opts ...` run:
/// VMCommandBuilder with only the socket (firectl's WithProcessRunner), no
/// FIFOs, `smt` from `!--disable-smt` (true), 1 vCPU and firectl's default
/// 512 MiB; then `Shutdown` on SIGINT and `Wait`.
#[test]
fn firectl_default_run_with_smt_true() {
    let dir = TempDir::new("firectl");
    let sock = dir.join("firectl.sock");
    let rootfs = dir.join("rootfs.img");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--api-sock").arg(&sock);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    wait_for_socket(&sock);
    let (st, _) = go_request(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    go_no_content(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib":512,"smt":true,"vcpu_count":1}"#,
    );
    let (st, _) = go_request(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    go_no_content(
        &sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"boot_args":"console=ttyS0 ember.test=wait-ctrlaltdel","kernel_image_path":{}}}"#,
            json!(PVH_ELF)
        ),
    );
    go_no_content(
        &sock,
        "PUT",
        "/drives/root_drive",
        &format!(
            r#"{{"drive_id":"root_drive","is_read_only":false,"is_root_device":true,"path_on_host":{}}}"#,
            json!(rootfs)
        ),
    );
    go_no_content(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    );
    p.expect_out("waiting for ctrl-alt-del");
    go_no_content(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type":"SendCtrlAltDel"}"#,
    );
    assert_eq!(p.wait().code(), Some(0), "{}", p.err());
}
