//! api-floor: the least any VMM API must do before it can answer, as the
//! baseline of the API-ready benchmark: bind a unix socket, accept one
//! connection, read one HTTP request head and answer `200 {}`.
//!
//! Usage: api-floor <socket path>

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: api-floor <socket path>");
        return ExitCode::from(2);
    };
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("api-floor: bind {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for conn in listener.incoming() {
        let Ok(mut c) = conn else { continue };
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = c.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        );
    }
    ExitCode::SUCCESS
}
