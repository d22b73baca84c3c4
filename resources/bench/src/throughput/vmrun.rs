//! Runs one VMM process and stamps every line of its stdout (the guest's
//! COM1, which ember-vmm writes unbuffered) with the `Instant` it arrived.

use std::io::{self, BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM (see [`install_interrupt_handler`]); every wait
/// loop of the benchmark checks it so the cleanup guards run.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the benchmark, so
/// that it can remove its namespace, taps, temp files and children.
pub fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether SIGINT/SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Errors of one VMM run.
#[derive(Debug, thiserror::Error)]
pub enum VmRunError {
    #[error("cannot spawn {0}: {1}")]
    Spawn(String, #[source] io::Error),
    #[error("waiting for {0}: {1}")]
    Wait(String, #[source] io::Error),
    #[error("{0} timed out after {1:?}\n--- stdout ---\n{2}")]
    Timeout(String, Duration, String),
    #[error("interrupted")]
    Interrupted,
}

/// What one VMM run produced.
#[derive(Debug)]
pub struct VmRun {
    pub status: ExitStatus,
    /// When the process was spawned.
    pub spawned: Instant,
    /// Each stdout line (without the newline) and when it arrived.
    pub lines: Vec<(Instant, String)>,
    pub stderr: String,
}

impl VmRun {
    /// Time from spawn to the first line starting with `prefix`.
    pub fn time_to(&self, prefix: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| t.saturating_duration_since(self.spawned))
    }

    /// The first line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(_, l)| l.as_str())
    }

    /// stdout and stderr for an error message.
    pub fn transcript(&self) -> String {
        let out: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status.code(),
            out.join("\n"),
            self.stderr
        )
    }
}

/// Kills and reaps the child unless it was already reaped.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` (stdin null, stdout/stderr piped) until it exits or `timeout`
/// passes (then it is killed). `name` labels errors.
pub fn run(name: &str, mut cmd: Command, timeout: Duration) -> Result<VmRun, VmRunError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned = Instant::now();
    let mut guard = ChildGuard(Some(
        cmd.spawn().map_err(|e| VmRunError::Spawn(name.into(), e))?,
    ));
    let child = guard.0.as_mut().ok_or(VmRunError::Interrupted)?;
    let stdout = child.stdout.take().map(|o| {
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(o);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let now = Instant::now();
                        let s = String::from_utf8_lossy(&buf);
                        lines.push((now, s.trim_end_matches(['\n', '\r']).to_string()));
                    }
                }
            }
            lines
        })
    });
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if interrupted() => return Err(VmRunError::Interrupted),
            Ok(None) if spawned.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                guard.0 = None;
                let lines = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
                let out: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
                return Err(VmRunError::Timeout(name.into(), timeout, out.join("\n")));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(VmRunError::Wait(name.into(), e)),
        }
    };
    guard.0 = None;
    // The pipes close when the process exits (the VMM forks nothing).
    let lines = stdout.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    Ok(VmRun {
        status,
        spawned,
        lines,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_lines_in_order() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo first; sleep 0.05; echo second; echo err >&2"]);
        let r = run("sh", cmd, Duration::from_secs(20)).unwrap();
        assert!(r.status.success());
        assert_eq!(r.line("sec"), Some("second"));
        assert_eq!(r.stderr, "err\n");
        let a = r.time_to("first").unwrap();
        let b = r.time_to("second").unwrap();
        assert!(b >= a);
        assert!(r.time_to("third").is_none());
        assert!(r.transcript().contains("first\nsecond"));
    }

    #[test]
    fn timeout_kills() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        match run("sleeper", cmd, Duration::from_millis(300)) {
            Err(VmRunError::Timeout(n, _, out)) => {
                assert_eq!(n, "sleeper");
                assert_eq!(out, "started");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn spawn_failure() {
        let cmd = Command::new("/nonexistent/ember-vmm");
        assert!(matches!(
            run("x", cmd, Duration::from_secs(1)),
            Err(VmRunError::Spawn(..))
        ));
    }
}
