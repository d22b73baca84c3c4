//! A small blocking client for a running VMM's own API socket (ember-vmm's
//! Firecracker-shaped API), for the few calls emberd makes on a live VM:
//! pausing and resuming it (`PATCH /vm {"state": "Paused"|"Resumed"}`),
//! and taking and loading snapshots (`PUT /snapshot/create|load`).
//!
//! Worker threads only: every call connects, sends one request and waits
//! (at most [`TIMEOUT`]) for the status line. The VMM's answer body is
//! bounded and only quoted in errors when it is the VMM's JSON error.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a call may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: u64 = 16 * 1024;

/// Why a VMM API call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmApiError {
    #[error("cannot reach the VMM's API socket {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("the VMM's API call {what} failed: {err}")]
    Io {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("the VMM refused {what} with status {status}: {message}")]
    Refused {
        what: &'static str,
        status: u16,
        message: String,
    },
}

/// The VM state ember-vmm's `PATCH /vm` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Paused,
    Resumed,
}

/// Pauses or resumes the VM behind the API socket `sock`.
pub fn set_vm_state(sock: &Path, state: VmState) -> Result<(), VmmApiError> {
    let (what, body) = match state {
        VmState::Paused => ("pause", r#"{"state":"Paused"}"#),
        VmState::Resumed => ("resume", r#"{"state":"Resumed"}"#),
    };
    let status_and_body = call(sock, what, "PATCH", "/vm", body)?;
    match status_and_body {
        (s, _) if (200..300).contains(&s) => Ok(()),
        (status, body) => Err(VmmApiError::Refused {
            what,
            status,
            message: fault_message(&body),
        }),
    }
}

/// `PUT /snapshot/create` (Firecracker's body: `snapshot_type`,
/// `snapshot_path`, `mem_file_path`; paths as the VMM sees them) on a
/// paused VM.
pub fn snapshot_create(
    sock: &Path,
    snapshot_path: &str,
    mem_file_path: &str,
) -> Result<(), VmmApiError> {
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": snapshot_path,
        "mem_file_path": mem_file_path,
    });
    put(sock, "snapshot create", "/snapshot/create", &body)
}

/// `PUT /snapshot/load` with `body` (Firecracker's fields plus ember's
/// overrides, built by the caller) on a VMM that has not booted.
pub fn snapshot_load(sock: &Path, body: &serde_json::Value) -> Result<(), VmmApiError> {
    put(sock, "snapshot load", "/snapshot/load", body)
}

/// `PUT path` with a JSON body; any 2xx is success.
fn put(
    sock: &Path,
    what: &'static str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), VmmApiError> {
    match call(sock, what, "PUT", path, &body.to_string())? {
        (s, _) if (200..300).contains(&s) => Ok(()),
        (status, body) => Err(VmmApiError::Refused {
            what,
            status,
            message: fault_message(&body),
        }),
    }
}

/// The `fault_message` of a Firecracker-style error body, or a placeholder.
fn fault_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "(no error message)".into())
}

fn call(
    sock: &Path,
    what: &'static str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Vec<u8>), VmmApiError> {
    let io = |err| VmmApiError::Io { what, err };
    let mut s = UnixStream::connect(sock).map_err(|err| VmmApiError::Connect {
        path: sock.display().to_string(),
        err,
    })?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    // The VMM closes after answering (Connection: close); a short read of
    // the head is enough when it does not.
    let mut buf = [0u8; 4096];
    loop {
        match (&mut s).take(MAX_ANSWER).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if complete(&answer) || answer.len() as u64 >= MAX_ANSWER {
                    break;
                }
            }
            Err(e) => return Err(io(e)),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no HTTP status line in the VMM's answer",
            ))
        })?;
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| answer[i + 4..].to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

/// Whether `answer` holds a whole response (head plus `Content-Length`).
fn complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn pause_sends_patch_vm_and_reads_the_status() {
        let dir = std::env::temp_dir().join(format!("vmm-api-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [
                "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 29\r\n\r\n{\"fault_message\":\"not now!\"}\n\n",
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = c.read(&mut buf).unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
                c.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        set_vm_state(&sock, VmState::Paused).unwrap();
        let e = set_vm_state(&sock, VmState::Resumed).unwrap_err();
        assert!(e.to_string().contains("status 400: not now!"), "{e}");
        let seen = t.join().unwrap();
        assert!(seen[0].starts_with("PATCH /vm HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(seen[0].ends_with(r#"{"state":"Paused"}"#));
        assert!(seen[1].ends_with(r#"{"state":"Resumed"}"#));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
