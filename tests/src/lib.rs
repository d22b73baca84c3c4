//! Helpers for ember's end-to-end tests: build and locate the binaries, run
//! them with self-cleaning temp dirs, talk raw HTTP/1.1 over unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

pub use ember_guests::{BZIMAGE, LINUX64_ELF, PVH_ELF};

pub mod hyperctl;
pub mod snapvmm;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

static BUILD: Once = Once::new();

/// Path of a workspace binary (ember-vmm, ember-jailer, emberd), built on
/// first use so `cargo test` alone is enough.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --bins failed");
    });
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

static STATIC_BUILD: Once = Once::new();

/// ember-vmm linked statically (`cargo static-vmm`, the alias in
/// `.cargo/config.toml`: `--target x86_64-unknown-linux-gnu` with
/// `+crt-static`), built on first use, in the same profile as the tests:
/// `<target dir>/x86_64-unknown-linux-gnu/<profile>/ember-vmm`. emberd and
/// the jailer tests run it, so jails get no host libraries.
pub fn static_vmm() -> PathBuf {
    STATIC_BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The alias's target rustflags (+crt-static) lose to these.
        cmd.current_dir(workspace_root())
            .args(["static-vmm", "--quiet"])
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo static-vmm");
        assert!(
            st.success(),
            "cargo static-vmm failed (it links glibc's libc.a, from libc6-dev)"
        );
    });
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/x86_64-unknown-linux-gnu/<profile>/ember-vmm
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let p = profile_dir
        .parent()
        .expect("target/<profile> has a parent")
        .join("x86_64-unknown-linux-gnu")
        .join(profile_dir.file_name().expect("a profile directory name"))
        .join("ember-vmm");
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A temp directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ember-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A path inside it.
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 10 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Generous bound for anything a test waits on; hitting it fails the test
/// instead of hanging CI. Not a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The safety net for one answer of emberd's that does heavy work before
/// it answers (unpacking archives of tens of thousands of entries in
/// sandbox jobs): generous, since a loaded 2-core CI machine is slow, and
/// only ever reached when something is wrong.
pub const SLOW_PATIENCE: Duration = Duration::from_secs(300);

/// A child process killed (and reaped) on drop, with stdout/stderr in files.
pub struct Proc {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with output captured into `dir`.
    pub fn spawn(mut cmd: Command, dir: &Path, tag: &str) -> Self {
        let stdout = dir.join(format!("{tag}.stdout"));
        let stderr = dir.join(format!("{tag}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().expect("spawn");
        Proc {
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    /// Everything written to stdout so far.
    pub fn out(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything written to stderr so far.
    pub fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stdout contains `needle`; panics with the output if not.
    pub fn expect_out(&mut self, needle: &str) {
        let found = wait_for(PATIENCE, || {
            if self.out().contains(needle) {
                return Some(());
            }
            if self.try_status().is_some() && !self.out().contains(needle) {
                // Exited without printing it.
                return Some(());
            }
            None
        });
        assert!(
            found.is_some() && self.out().contains(needle),
            "stdout never contained {needle:?}\nstdout:\n{}\nstderr:\n{}",
            self.out(),
            self.err()
        );
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the exit status (panics after [`PATIENCE`]).
    pub fn wait(&mut self) -> ExitStatus {
        match wait_for(PATIENCE, || self.try_status()) {
            Some(s) => s,
            None => panic!(
                "process did not exit\nstdout:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            ),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// A header value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from `s` (Content-Length or chunked bodies), a unix
/// or TCP stream.
pub fn read_response<S: Read>(s: &mut S) -> std::io::Result<HttpResponse> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        // A signal (another test's child exiting) must not end the read.
        let n = match s.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF in headers after {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut byte)?;
                line.push(byte[0]);
            }
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&line[..line.len() - 2])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(std::io::Error::other)?;
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        s.read_exact(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Writes one request on an open connection.
pub fn write_request(
    s: &mut UnixStream,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<()> {
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes())
}

/// One request on a new connection.
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(SLOW_PATIENCE)).unwrap();
    write_request(&mut s, method, path, body).expect("write request");
    read_response(&mut s).expect("read response")
}

/// Waits until something accepts connections on `sock`.
pub fn wait_for_socket(sock: &Path) {
    let ok = wait_for(PATIENCE, || UnixStream::connect(sock).ok().map(|_| ()));
    assert!(ok.is_some(), "nothing listens on {}", sock.display());
}

/// A Firecracker-shaped config for a test guest.
pub fn vm_config(kernel: &str, boot_args: &str, vcpus: u8, mem_mib: u32) -> String {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib}
    })
    .to_string()
}

/// A network namespace `ember-<tag><pid>-<tap>` holding TAP `tap` with
/// `host_ip`/24, both up; removed on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A namespace `ember-<tag><pid>` with only `lo` (up); build on it
    /// with [`NetNs::ip`].
    pub fn bare(tag: &str) -> Self {
        let ns = NetNs {
            name: format!("ember-{tag}{}", std::process::id()),
        };
        let st = Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {} failed", ns.name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n <name> args...`, which must succeed; its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates it; `owner` (uid, gid), if any, owns the TAP so an
    /// unprivileged VMM can open it.
    pub fn new(tag: &str, tap: &str, host_ip: &str, owner: Option<(u32, u32)>) -> Self {
        let name = format!("ember-{tag}{}-{tap}", std::process::id());
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        let mut tuntap = vec!["-n", &ns.name, "tuntap", "add", "dev", tap, "mode", "tap"];
        let ids = owner.map(|(uid, gid)| (uid.to_string(), gid.to_string()));
        if let Some((uid, gid)) = &ids {
            tuntap.extend(["user", uid, "group", gid]);
        }
        ip(&tuntap);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            tap,
        ]);
        ip(&["-n", &ns.name, "link", "set", tap, "up"]);
        ns
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a valid netns fd.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// A UDP echo server on `addr` inside the namespace: echoes up to
    /// `count` datagrams (giving up after [`PATIENCE`] of silence) and
    /// returns how many it echoed.
    pub fn udp_echo(&self, addr: &'static str, count: usize) -> std::thread::JoinHandle<usize> {
        self.spawn_in(move || {
            let s = std::net::UdpSocket::bind(addr).expect("bind echo");
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut n = 0;
            let mut buf = [0u8; 2048];
            while n < count {
                match s.recv_from(&mut buf) {
                    Ok((len, peer)) => {
                        s.send_to(&buf[..len], peer).unwrap();
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            n
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---- a watchdog on a VMM under abuse ----

/// Longest the watchdog waits for one `GET /` answer: far beyond any
/// normal answer (milliseconds), far below "frozen".
pub const WATCHDOG_BOUND: Duration = Duration::from_secs(10);

/// What a [`Watchdog`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watch {
    /// `GET /` answered.
    pub polls: u32,
    /// The slowest answer.
    pub worst: Duration,
    /// The VMM's highest RSS (KiB) and descriptor count between answers.
    pub peak_rss_kib: u64,
    pub peak_fds: usize,
}

/// `GET /` in a loop on new connections until stopped; every answer must
/// come within [`WATCHDOG_BOUND`]. Between answers it samples the VMM's
/// RSS and descriptors.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Watch, String>>,
}

impl Watchdog {
    /// Watches the API at `sock` of the VMM `pid`.
    pub fn start(sock: PathBuf, pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut w = Watch::default();
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = (|| -> std::io::Result<HttpResponse> {
                    let mut c = UnixStream::connect(&sock)?;
                    c.set_read_timeout(Some(WATCHDOG_BOUND))?;
                    c.set_write_timeout(Some(WATCHDOG_BOUND))?;
                    write_request(&mut c, "GET", "/", None)?;
                    read_response(&mut c)
                })();
                match r {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => return Err(format!("GET / answered {}", r.status)),
                    Err(e) => return Err(format!("GET / failed after {:?}: {e}", t.elapsed())),
                }
                w.polls += 1;
                w.worst = w.worst.max(t.elapsed());
                w.peak_rss_kib = w.peak_rss_kib.max(rss_kib(pid));
                w.peak_fds = w.peak_fds.max(fd_count(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(w)
        });
        Watchdog { stop, thread }
    }

    /// Stops it and tells what it saw; panics if the API failed.
    pub fn finish(self) -> Watch {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join().expect("watchdog thread") {
            Ok(v) => v,
            Err(e) => panic!("the VMM's API stalled: {e}"),
        }
    }
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// VmRSS of `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// After abuse: the VMM is alive, `GET /` says `Running`, SendCtrlAltDel
/// is taken, and SIGTERM ends it through its loop with status 143.
pub fn in_control_then_sigterm(p: &mut Proc, sock: &Path) {
    use std::os::unix::process::ExitStatusExt;
    assert!(p.try_status().is_none(), "ember-vmm died:\n{}", p.err());
    let r = http(sock, "GET", "/", None);
    assert_eq!(r.json()["state"], "Running");
    let r = http(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // SAFETY: kill(2) on a child this test spawned.
    unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
    let st = p.wait();
    assert_eq!(
        st.code(),
        Some(143),
        "{st:?} {:?}\nstderr:\n{}",
        st.signal(),
        p.err()
    );
    assert!(p.err().contains("SIGTERM"), "{}", p.err());
}

/// What the test guest sends first on a vsock connection it opens
/// (`ember.vsock_mode=guest`, or the first half of `ember.test=vsock`).
pub const GUEST_HELLO: &str = "hello from guest\n";

/// Accepts the test guest's vsock connection on `listener` (a hybrid vsock
/// `<uds>_<port>` socket), echoes [`GUEST_HELLO`] back and returns what it
/// read.
pub fn echo_guest_hello(
    listener: std::os::unix::net::UnixListener,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("guest connection");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut line = vec![0u8; GUEST_HELLO.len()];
        s.read_exact(&mut line).unwrap();
        s.write_all(&line).unwrap();
        String::from_utf8(line).unwrap()
    })
}

/// The Python interpreter for helper servers: `$EMBER_PYTHON` or `python3`.
pub fn python() -> String {
    std::env::var("EMBER_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn moto_importable() -> bool {
    Command::new(python())
        .args(["-c", "import moto.server, flask, flask_cors"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure moto's standalone server (PyPI `moto[server]`) can run,
/// installing it once with pip if it is missing (as
/// resources/ci/install-moto.sh does ahead of time). Panics with a clear
/// message if that does not work.
pub fn ensure_moto() {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = READY.get_or_init(|| {
        if moto_importable() {
            return Ok(());
        }
        eprintln!("moto is not installed; running resources/ci/install-moto.sh");
        let out = Command::new("bash")
            .arg(workspace_root().join("resources/ci/install-moto.sh"))
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() && moto_importable() => Ok(()),
            Ok(o) => Err(format!(
                "install-moto.sh failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("cannot run bash: {e}")),
        }
    });
    if let Err(e) = r {
        panic!(
            "these tests need moto's S3 server (PyPI 'moto[server]'; run \
             resources/ci/install-moto.sh): {e}"
        );
    }
}

/// Makes sure the Python gRPC tools (PyPI grpcio, grpcio-tools,
/// grpcio-health-checking, grpcio-reflection) are importable, installing
/// them once with resources/ci/install-grpcio.sh if not. Panics with a
/// clear message if that does not work.
pub fn ensure_grpcio() {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = READY.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace_root().join("resources/ci/install-grpcio.sh"))
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "install-grpcio.sh failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => Err(format!("cannot run bash: {e}")),
        }
    });
    if let Err(e) = r {
        panic!("these tests need the Python gRPC tools (resources/ci/install-grpcio.sh): {e}");
    }
}

/// moto's S3-protocol server on 127.0.0.1 with a port the kernel picks;
/// killed (and reaped) on drop. Its output is drained in the background.
pub struct MotoServer {
    child: Child,
    /// The TCP port it listens on.
    pub port: u16,
}

impl MotoServer {
    /// Starts moto and waits until its port accepts connections.
    pub fn start() -> Self {
        use std::io::BufRead;
        ensure_moto();
        let mut child = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto: {e}"));
        // Werkzeug prints "Running on http://127.0.0.1:PORT".
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipes: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut seen = Vec::new();
        let port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                        let digits: String =
                            rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                        if let Ok(p) = digits.parse::<u16>() {
                            break p;
                        }
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("moto did not report its port; its output: {seen:?}");
                }
            }
        };
        std::thread::spawn(move || for _ in rx {});
        let moto = MotoServer { child, port };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto's port {port} never accepted connections"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// HEAD of an object through boto3 (installed with moto), signed with
    /// dummy credentials (moto checks none): `None` if the object does not
    /// exist, else `{"ContentLength": n, "Metadata": {...}}`.
    pub fn head_object(&self, bucket: &str, key: &str) -> Option<serde_json::Value> {
        let script = r#"
import json, sys, boto3, botocore
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
try:
    h = s3.head_object(Bucket=sys.argv[2], Key=sys.argv[3])
    print(json.dumps({"ContentLength": h["ContentLength"], "Metadata": h.get("Metadata", {})}))
except botocore.exceptions.ClientError as e:
    if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NoSuchBucket"):
        print("null")
    else:
        raise
"#;
        let out = Command::new(python())
            .args(["-c", script])
            .arg(self.url())
            .args([bucket, key])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
        assert!(
            out.status.success(),
            "boto3 head_object {bucket}/{key} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("boto3 printed no JSON ({e}): {:?}", out.stdout));
        (!v.is_null()).then_some(v)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running emberd with its own state dir, jail base and socket, driven
/// like users drive it (curl over the unix socket); killed on drop. Every
/// curl response (headers and body) is kept for checks such as "a secret
/// never shows".
pub struct Emberd {
    pub proc_: Option<Proc>,
    pub sock: PathBuf,
    pub dir: TempDir,
    /// Environment for the next (re)start.
    pub env: Vec<(String, String)>,
    /// umask for the next (re)start (None: inherited).
    pub umask: Option<u32>,
    /// Network namespace emberd runs in (`ip netns exec NAME emberd ...`,
    /// which also mounts that namespace's /sys); None: the test's own.
    pub netns: Option<String>,
    args: Vec<String>,
    seen: std::cell::RefCell<Vec<String>>,
}

impl Emberd {
    /// Starts emberd in a fresh temp dir; VMMs and builds run as `uid:uid`;
    /// `extra` are more emberd flags. Its VMM is the static build
    /// ([`static_vmm`]) unless `extra` names one with `--vmm`.
    pub fn start(tag: &str, uid: u32, extra: &[&str]) -> Self {
        Self::start_in(tag, uid, extra, None)
    }

    /// [`Emberd::start`] inside the network namespace `netns` (a name under
    /// /var/run/netns, e.g. [`NetNs::name`]).
    pub fn start_in_netns(tag: &str, uid: u32, extra: &[&str], netns: &str) -> Self {
        Self::start_in(tag, uid, extra, Some(netns.to_string()))
    }

    fn start_in(tag: &str, uid: u32, extra: &[&str], netns: Option<String>) -> Self {
        let dir = TempDir::new(tag);
        let sock = dir.join("ember.sock");
        let mut args: Vec<String> = vec![
            "--socket".into(),
            sock.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--chroot-base-dir".into(),
            dir.join("jail").display().to_string(),
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            uid.to_string(),
            // Tests name layouts and tarballs they make in their temp dir.
            "--import-dir".into(),
            dir.path().display().to_string(),
            "--export-dir".into(),
            dir.path().display().to_string(),
        ];
        if !extra.contains(&"--vmm") {
            args.push("--vmm".into());
            args.push(static_vmm().display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Emberd {
            proc_: None,
            sock,
            dir,
            env: Vec::new(),
            umask: None,
            netns,
            args,
            seen: std::cell::RefCell::new(Vec::new()),
        };
        d.restart();
        d
    }

    /// Starts emberd again on the same state (after [`Emberd::kill9`]).
    pub fn restart(&mut self) {
        let mut cmd = match &self.netns {
            None => Command::new(bin("emberd")),
            Some(ns) => {
                // `ip netns exec` execs emberd: the child's pid is emberd's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("emberd"));
                c
            }
        };
        cmd.args(&self.args).env("RUST_LOG", "trace");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask(2) is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        self.proc_ = Some(Proc::spawn(cmd, self.dir.path(), "emberd"));
        wait_for_socket(&self.sock);
    }

    /// Kills emberd hard (its VMMs live on).
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc_.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// emberd's stderr so far.
    pub fn err(&self) -> String {
        self.proc_.as_ref().map(|p| p.err()).unwrap_or_default()
    }

    /// emberd's stdout so far.
    pub fn out(&self) -> String {
        self.proc_.as_ref().map(|p| p.out()).unwrap_or_default()
    }

    /// curl with `args`; (status, body). Status 0: curl itself failed.
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        let n = self.seen.borrow().len();
        let headers = self.dir.join(&format!("headers-{n}"));
        let out = Command::new("curl")
            .args(["-s", "-S", "--max-time", "300", "--unix-socket"])
            .arg(&self.sock)
            .arg("-D")
            .arg(&headers)
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        let head = std::fs::read_to_string(&headers).unwrap_or_default();
        let _ = std::fs::remove_file(&headers);
        self.seen.borrow_mut().push(format!("{head}{body}"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// [`Emberd::curl`] with the body parsed as JSON (a string if it is not).
    pub fn json(&self, args: &[&str]) -> (u16, serde_json::Value) {
        let (c, b) = self.curl(args);
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::String(b)),
        )
    }

    /// UniK's `POST /instances/run` with `body` (as the unik CLI sends it
    /// through curl here); asserts 201 and returns the instance's JSON.
    pub fn run_instance(&self, body: &serde_json::Value) -> serde_json::Value {
        let (c, v) = self.json(&[
            "-X",
            "POST",
            "-d",
            &body.to_string(),
            "http://localhost/instances/run",
        ]);
        assert_eq!(c, 201, "run: {v}");
        v
    }

    /// One raw HTTP request (our own client, not curl).
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let r = http(&self.sock, method, path, body);
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Every curl response so far (headers and body).
    pub fn responses(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }
}

impl Drop for Emberd {
    /// Kills emberd and, so that even a failed test leaves nothing behind,
    /// every VMM and TAP its state names.
    fn drop(&mut self) {
        self.kill9();
        let state: serde_json::Value = std::fs::read(self.dir.join("state").join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(insts) = state["instances"].as_object() {
            for inst in insts.values() {
                if let Some(pid) = inst["process"]["pid"].as_i64() {
                    let start = inst["process"]["start_time"].as_u64().unwrap_or(0);
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let same = stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(19)?.parse::<u64>().ok())
                        == Some(start);
                    if start != 0 && same {
                        // SAFETY: kill(2) on the VMM this emberd started (pid and start time match).
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
                for n in inst["interfaces"].as_array().into_iter().flatten() {
                    if let Some(tap) = n["host_dev_name"].as_str() {
                        let _ = Command::new("ip")
                            .args(["link", "del", tap])
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        // VMMs on no record: the idle pooled VMMs of `--snapshot-starts`
        // and template VMMs, found by the pid files of this emberd's jails.
        for pid in jailed_processes(&self.dir.join("jail")) {
            // SAFETY: kill(2) on a VMM jailed in this test's jail base.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Live jailed processes of an emberd whose chroot base is `base`: the
/// pids in the jails' pid files (`<base>/ember-vmm/<id>/root/ember-vmm.pid`,
/// written by ember-jailer; the VMM's own mount namespace hides its root
/// from /proc) whose command line names the jail (`--id <id>`). A jail an
/// instance took from the pool is not found here (its VMM is on record).
pub fn jailed_processes(base: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(base.join("ember-vmm")) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = std::fs::read_to_string(e.path().join("root").join("ember-vmm.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let name = e.file_name().to_string_lossy().into_owned();
        let is_vmm = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == name))
            .unwrap_or(false);
        if is_vmm {
            out.push(pid);
        }
    }
    out
}

/// Percent-encodes `s` for a query string.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes an OCI image layout at `out` with `tests/fixtures/make_oci.py`
/// (standard-library Python, independent of ember's OCI code).
pub fn make_oci(out: &Path, spec: &serde_json::Value) {
    let script = workspace_root().join("tests/fixtures/make_oci.py");
    let st = Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(spec.to_string())
        .status()
        .expect("run python3");
    assert!(st.success(), "make_oci.py failed for {spec}");
}

/// A tar.gz of `files` (path, content) written under `dir`.
pub fn make_tar(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let src = dir.join("tar-src");
    for (name, data) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().expect("a file path has a parent")).unwrap();
        std::fs::write(&p, data).unwrap();
    }
    let out = dir.join("data.tar.gz");
    let st = Command::new("tar")
        .arg("czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    out
}

impl Emberd {
    /// Builds an `ember-c-ember` image `name` from one C file, with more
    /// form fields in `extra` (e.g. "mounts=/data"); asserts 201.
    pub fn c_image(&self, name: &str, main_c: &str, extra: &[&str]) -> serde_json::Value {
        let tgz = make_tar(self.dir.path(), &[("main.c", main_c.as_bytes())]);
        let form = format!("tarfile=@{}", tgz.display());
        let mut args: Vec<String> = [
            "-X",
            "POST",
            "-F",
            &form,
            "-F",
            "provider=ember",
            "-F",
            "base=ember",
            "-F",
            "lang=c",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for e in extra {
            args.push("-F".into());
            args.push(e.to_string());
        }
        args.push(format!("http://localhost/images/{name}/create"));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (c, v) = self.json(&a);
        assert_eq!(c, 201, "image {name}: {v}");
        v
    }

    /// Imports the OCI layout `spec` (see [`make_oci`]) as container image
    /// `name` through hyperd's `/image/create`; asserts 200 and returns the
    /// progress lines.
    pub fn hyperd_import(&self, name: &str, spec: serde_json::Value) -> String {
        let layout = self
            .dir
            .join(&format!("layout-{}", name.replace([':', '/'], "-")));
        let mut spec = spec;
        spec["ref"] = name.into();
        make_oci(&layout, &spec);
        let path = format!(
            "/image/create?imageName={}",
            urlencode(&layout.display().to_string())
        );
        let r = http(&self.sock, "POST", &path, None);
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 200, "import {name}: {body}");
        body
    }

    /// An instance's console log so far.
    pub fn logs(&self, name: &str) -> String {
        self.curl(&[&format!("http://localhost/instances/{name}/logs")])
            .1
    }

    /// Waits until the log of `name` contains `needle`; returns the log.
    pub fn wait_logs(&self, name: &str, needle: &str) -> String {
        let r = wait_for(PATIENCE, || {
            let l = self.logs(name);
            l.contains(needle).then_some(l)
        });
        r.unwrap_or_else(|| {
            panic!(
                "logs of {name} never showed {needle:?}:\n{}",
                self.logs(name)
            )
        })
    }
}

/// An `ember-c-ember` program that prints one line and then idles (halts)
/// forever: an instance whose VMM stays up.
pub const IDLE_C: &str = r#"#include <stdio.h>
int main(void) {
    printf("idle instance up\n");
    for (;;) __asm__ volatile("cli; hlt");
}
"#;

/// Live processes with `id` as one of their command-line arguments (an
/// instance's jailer and VMM).
pub fn vmm_processes(id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == id))
                .unwrap_or(false)
        })
        .collect()
}

/// `PUT path` with a JSON body to a VMM's API socket; asserts 204.
pub fn api_put(sock: &Path, path: &str, body: serde_json::Value) {
    let r = http(sock, "PUT", path, Some(&body.to_string()));
    assert_eq!(
        r.status,
        204,
        "PUT {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
}

/// Debian's kernel package as `.ci/run` unpacks it (resources/ci/fetch-kernel.sh):
/// `(bzImage, unpacked package root)`; None (with a message) outside CI when
/// it is missing.
pub fn debian_kernel_package() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let root = std::path::PathBuf::from(
        std::env::var_os("EMBER_KERNEL_CACHE").unwrap_or("/var/cache/ember/kernel".into()),
    )
    .join("root");
    let image = std::fs::read_dir(root.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        });
    assert!(
        image.is_some() || std::env::var_os("CI").is_none(),
        "CI is set but there is no kernel package under {}: .ci/run runs resources/ci/fetch-kernel.sh",
        root.display()
    );
    if image.is_none() {
        println!(
            "SKIP: no Debian kernel package under {} (run resources/ci/fetch-kernel.sh)",
            root.display()
        );
    }
    image.map(|i| (i, root))
}
