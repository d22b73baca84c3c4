//! Shared harness for the ember-agent integration tests: a temp directory,
//! the agent binary on a unix socket in it, a static probe program in a
//! temp rootfs, and cleanup of processes, mounts and loop devices.

#![allow(dead_code)]

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ember_agent::protocol::{read_frame, write_frame, AgentMessage, Frame};
use ember_agent::AgentClient;

/// Hang guard for any single read from the agent.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The probe: prints argv/env/cwd/uid/gid and the entries of `/`, writes a
/// file, exits with a chosen code; or sleeps until signalled; or cats a file.
pub const PROBE_C: &str = r#"
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
extern char **environ;
int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "info";
    if (!strcmp(mode, "info")) {
        for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
        for (char **e = environ; *e; e++) printf("env=%s\n", *e);
        char cwd[4096];
        if (getcwd(cwd, sizeof cwd)) printf("cwd=%s\n", cwd);
        DIR *d = opendir("/");
        struct dirent *de;
        while (d && (de = readdir(d)))
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                printf("root=%s\n", de->d_name);
        printf("uid=%d gid=%d\n", (int)getuid(), (int)getgid());
        fflush(stdout);
        fprintf(stderr, "to-stderr\n");
        if (argc > 3) {
            FILE *f = fopen(argv[3], "w");
            if (!f) { perror("fopen"); return 98; }
            fputs("written by probe\n", f);
            fclose(f);
        }
        return argc > 2 ? atoi(argv[2]) : 0;
    }
    if (!strcmp(mode, "sleep")) {
        printf("sleeping\n");
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(mode, "stubborn")) {
        signal(SIGTERM, SIG_IGN);
        printf("ignoring TERM\n");
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(mode, "orphan")) {
        pid_t pid = fork();
        if (pid == 0) {
            for (;;) pause();
        }
        printf("forked %d\n", (int)pid);
        return 0;
    }
    if (!strcmp(mode, "cat") && argc > 2) {
        FILE *f = fopen(argv[2], "r");
        if (!f) { perror("fopen"); return 97; }
        int c;
        while ((c = fgetc(f)) != EOF) putchar(c);
        return 0;
    }
    if (!strcmp(mode, "echo")) {
        char buf[4096];
        ssize_t n;
        fprintf(stderr, "echo ready\n");
        while ((n = read(0, buf, sizeof buf)) > 0) write(1, buf, n);
        fprintf(stderr, "echo done\n");
        return argc > 2 ? atoi(argv[2]) : 0;
    }
    if (!strcmp(mode, "tty")) {
        struct winsize ws = {0};
        char line[256];
        printf("isatty=%d\n", isatty(0));
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 96;
        ioctl(0, TIOCGWINSZ, &ws);
        printf("size=%dx%d got=%s", ws.ws_row, ws.ws_col, line);
        fflush(stdout);
        return 5;
    }
    return 99;
}
"#;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh temp directory, removed (after unmounting anything below it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ember-agent-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        for m in mounts_under(&self.0) {
            umount(&m);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v
}

pub fn umount(p: &Path) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: umount2 with a valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Compiles the probe statically into `<root>/bin/probe` and creates
/// `/work`, `/tmp` and `/data`. Returns None (with the reason printed) if
/// gcc cannot build static programs here.
pub fn make_rootfs(dir: &Path) -> Option<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "work", "tmp", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let src = dir.join("probe.c");
    std::fs::write(&src, PROBE_C).unwrap();
    let out = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(root.join("bin/probe"))
        .arg(&src)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(root),
        Ok(o) => {
            eprintln!(
                "SKIP: gcc -static failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("SKIP: no gcc: {e}");
            None
        }
    }
}

/// The agent binary serving on `<dir>/agent.sock`.
pub struct Agent {
    pub child: Option<Child>,
    /// Started as PID 1 of a new pid namespace: never sent DESTROYPOD (that
    /// would reboot), killed instead.
    pub pid1_ns: bool,
    pub sock: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with(dir, &[])
    }

    /// As PID 1 of new pid, mount and uts namespaces (`unshare`), so the
    /// PID 1 duties run without touching the host.
    pub fn start_as_pid1(dir: &Path) -> Agent {
        Agent::start_with(
            dir,
            &[
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--kill-child",
            ],
        )
    }

    fn start_with(dir: &Path, wrapper: &[&str]) -> Agent {
        let sock = dir.join("agent.sock");
        let state_dir = dir.join("state");
        let run_dir = dir.join("run");
        let agent_bin = env!("CARGO_BIN_EXE_ember-agent");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(agent_bin);
                c
            }
            None => Command::new(agent_bin),
        };
        let child = cmd
            .arg("--unix")
            .arg(&sock)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning ember-agent");
        let mut agent = Agent {
            child: Some(child),
            pid1_ns: !wrapper.is_empty(),
            sock,
            state_dir,
            run_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&agent.sock).is_err() {
            if let Some(c) = agent.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("ember-agent exited early: {st}");
                }
            }
            assert!(Instant::now() < deadline, "ember-agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).expect("connecting to the agent");
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        s
    }

    pub fn client(&self) -> AgentClient<UnixStream> {
        AgentClient::new(self.connect()).expect("READY")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits (bounded) for the agent to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already reaped");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ember-agent did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if self.pid1_ns {
            // SIGKILL to unshare; --kill-child takes the namespace's init,
            // and with it every process of the namespace, down too.
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return;
        }
        // Let the agent kill and unmount its containers, then make sure it is gone.
        if let Ok(s) = UnixStream::connect(&self.sock) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            if let Ok(mut c) = AgentClient::new(s) {
                let _ = c.destroy_pod();
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// A loop device attached to an image, detached on drop.
pub struct LoopDev(pub String);

impl LoopDev {
    /// Attaches `image`, or returns why it cannot be done here.
    pub fn attach(image: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("losetup not runnable: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(LoopDev(dev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Reads the whole log of `id` via READLOG.
pub fn log_of(c: &mut AgentClient<UnixStream>, id: &str) -> String {
    String::from_utf8(c.read_whole_log(id).expect("READLOG")).expect("utf-8 log")
}

/// Polls READLOG until the log contains `needle` (hang guard: 60 s).
pub fn wait_for_log(c: &mut AgentClient<UnixStream>, id: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if log_of(c, id).contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never logged {needle:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of `log` starting with `prefix`, prefix stripped, sorted.
pub fn lines_with(log: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Raw frame helpers for malformed-input tests.
pub fn send_raw(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
}

pub fn send_frame(s: &mut UnixStream, cmd: u32, payload: &[u8]) {
    write_frame(
        s,
        &Frame {
            cmd,
            payload: payload.to_vec(),
        },
    )
    .unwrap();
}

/// The next non-event message.
pub fn recv_reply(s: &mut UnixStream) -> AgentMessage {
    loop {
        let f = read_frame(s).expect("reading a reply");
        match AgentMessage::decode(&f).expect("decoding a reply") {
            AgentMessage::Event(_) => continue,
            m => return m,
        }
    }
}

/// `(pid, ppid, name)` of every process, from /proc/*/status.
pub fn processes() -> Vec<(u32, u32, String)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let ppid = field("PPid:").parse().unwrap_or(0);
        v.push((pid, ppid, field("Name:")));
    }
    v
}

/// Whether the process `pid` still exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // State is the field after the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

pub fn read_to_end(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}
