//! hyperctl 1.1.0's requests, byte for byte as its Go client sends them
//! over the unix socket (hyperhq/hyperd v1.1.0, `client/api/request.go`):
//!
//! - every path is `/v1.1.0` + the route (`httpRequest`: `"/v%s%s",
//!   utils.VERSION, path`);
//! - `Host` is the socket path (`req.URL.Host = cli.addr`, the client dials
//!   `unix:///var/run/hyper.sock`), `User-Agent: Hyper-Client/1.1.0`;
//! - `call` with data: the JSON body with `Content-Type: application/json`;
//!   POST, PUT and DELETE without data: an empty body and
//!   `Content-Type: text/plain`;
//! - `stream` with a file or pipe as the body (`load`, `build`): Go's
//!   transport does not know its length and sends it chunked;
//! - `authRequest` (`pull`, `push`): `X-Registry-Auth`, the AuthConfig JSON in
//!   URL-safe base64.
//!
//! Responses are read with [`crate::read_response`]; hyperctl treats any
//! status outside 200-399 as an error and shows the body.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::{read_response, HttpResponse, PATIENCE};

/// hyperctl's version, in every path and its User-Agent.
pub const VERSION: &str = "1.1.0";
/// The socket hyperctl dials (and so its `Host` header).
pub const HOST: &str = "/var/run/hyper.sock";

/// A request body as hyperctl's client produces it.
pub enum Body<'a> {
    /// No body (GET).
    None,
    /// `call` with data: JSON, `Content-Type: application/json`.
    Json(&'a str),
    /// `stream` with an unknown-length reader: chunked, with the
    /// `Content-Type` given.
    Chunked(&'a [u8], &'a str),
}

/// The client, on emberd's socket instead of `/var/run/hyper.sock`.
pub struct Hyperctl<'a> {
    sock: &'a Path,
}

/// URL-safe base64 with padding (Go's `base64.URLEncoding`).
pub fn base64_url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl<'a> Hyperctl<'a> {
    /// A client on `sock`.
    pub fn new(sock: &'a Path) -> Self {
        Hyperctl { sock }
    }

    /// The raw request bytes hyperctl writes for `method` `path` (the route
    /// and its query, without the version prefix).
    pub fn request_bytes(
        method: &str,
        path: &str,
        body: &Body,
        headers: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut h = format!(
            "{method} /v{VERSION}{path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: Hyper-Client/{VERSION}\r\n"
        );
        let payload = matches!(method, "POST" | "PUT" | "DELETE");
        let mut out = Vec::new();
        match body {
            Body::None if payload => {
                h.push_str("Content-Length: 0\r\nContent-Type: text/plain\r\n");
            }
            Body::None => {}
            Body::Json(j) => {
                h.push_str(&format!(
                    "Content-Length: {}\r\nContent-Type: application/json\r\n",
                    j.len()
                ));
            }
            Body::Chunked(_, ct) => {
                h.push_str(&format!(
                    "Transfer-Encoding: chunked\r\nContent-Type: {ct}\r\n"
                ));
            }
        }
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        out.extend_from_slice(h.as_bytes());
        match body {
            Body::Json(j) => out.extend_from_slice(j.as_bytes()),
            Body::Chunked(data, _) => {
                // Go's chunked writer: one chunk per Write of the reader's
                // buffer (32 KiB from io.Copy), then the last chunk.
                for c in data.chunks(32 * 1024) {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Body::None => {}
        }
        out
    }

    /// Sends one request on a new connection (hyperctl's transport keeps
    /// none open between commands) and reads the answer.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Body,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        let mut s = UnixStream::connect(self.sock)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.sock.display()));
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.write_all(&Self::request_bytes(method, path, &body, headers))
            .expect("write request");
        read_response(&mut s).expect("read response")
    }

    /// `cli.call(method, path, nil, nil)`.
    pub fn call(&self, method: &str, path: &str) -> HttpResponse {
        self.send(method, path, Body::None, &[])
    }

    /// `cli.call(method, path, data, nil)` with `data` marshalled to `json`.
    pub fn call_json(&self, method: &str, path: &str, json: &str) -> HttpResponse {
        self.send(method, path, Body::Json(json), &[])
    }

    /// `cli.authRequest(method, path, nil, nil, auth)`: `auth` is the
    /// AuthConfig JSON.
    pub fn auth_request(&self, method: &str, path: &str, auth: &str) -> HttpResponse {
        let header = base64_url(auth.as_bytes());
        self.send(method, path, Body::None, &[("X-Registry-Auth", &header)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_url_base64() {
        assert_eq!(base64_url(b"{}"), "e30=");
        assert_eq!(base64_url(b"\xfb\xff"), "-_8=");
        assert_eq!(base64_url(b"abc"), "YWJj");
    }

    #[test]
    fn request_shapes() {
        let r = Hyperctl::request_bytes("POST", "/pod/start?podId=p", &Body::None, &[]);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "POST /v1.1.0/pod/start?podId=p HTTP/1.1\r\nHost: /var/run/hyper.sock\r\nUser-Agent: Hyper-Client/1.1.0\r\nContent-Length: 0\r\nContent-Type: text/plain\r\n\r\n"
        );
        let r = Hyperctl::request_bytes(
            "POST",
            "/image/load",
            &Body::Chunked(b"abc", "application/x-tar"),
            &[],
        );
        assert!(String::from_utf8(r)
            .unwrap()
            .ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"));
    }
}
