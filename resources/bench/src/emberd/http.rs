//! A minimal HTTP/1.1 client over a unix socket for the emberd benchmark:
//! one request at a time on a connection that can be kept alive (unlike
//! `ember_http::client`, which closes after every request), so keep-alive
//! and connection-per-request rates are measured with the same code.
//! Responses must carry `Content-Length` (or end at EOF); emberd's JSON and
//! log answers do.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest response the client accepts (head + body).
const MAX_RESPONSE: usize = 64 << 20;

/// Errors of the benchmark's HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] io::Error),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("{method} {path}: no complete answer within {timeout:?}")]
    Timeout {
        method: String,
        path: String,
        timeout: Duration,
    },
    #[error("connection closed before the response was complete")]
    Truncated,
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server said `Connection: close` (or the body ran to EOF).
    pub closes: bool,
}

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One client connection.
pub struct Conn {
    stream: UnixStream,
    /// Bytes read past the previous response.
    buf: Vec<u8>,
    closed: bool,
}

impl Conn {
    /// Connects to the unix socket at `sock`.
    pub fn connect(sock: &Path) -> Result<Conn, HttpError> {
        let stream = UnixStream::connect(sock)
            .map_err(|e| HttpError::Connect(sock.display().to_string(), e))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    /// Whether the server ended the connection (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends one request and reads its response; `timeout` bounds the whole
    /// exchange. With `keep_alive` false the request says
    /// `Connection: close`. `headers` may set `Content-Type` (the default
    /// for a body is JSON).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        keep_alive: bool,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || HttpError::Timeout {
            method: method.into(),
            path: path.into(),
            timeout,
        };
        let msg = encode_request(method, path, headers, body, keep_alive);
        let mut out = &msg[..];
        while !out.is_empty() {
            self.stream
                .set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
            match self.stream.write(out) {
                Ok(0) => return Err(HttpError::Truncated),
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(e.into()),
            }
        }
        loop {
            if let Some((resp, used)) = parse_response(&self.buf, method == "HEAD", self.closed)? {
                self.buf.drain(..used);
                if resp.closes || !keep_alive {
                    self.closed = true;
                }
                return Ok(resp);
            }
            if self.closed {
                return Err(HttpError::Truncated);
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err(HttpError::Malformed("response too large".into()));
            }
            self.stream
                .set_read_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
            let mut tmp = [0u8; 16 * 1024];
            match self.stream.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.closed = true,
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn once(
    sock: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    Conn::connect(sock)?.request(method, path, headers, body, false, timeout)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The bytes of one request.
pub fn encode_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let has_ct = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    match body {
        Some(b) => {
            if !has_ct {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            head.push_str("Content-Length: 0\r\n");
        }
        None => {}
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    if let Some(b) = body {
        msg.extend_from_slice(b);
    }
    msg
}

/// Parses one response from the front of `buf`: `Ok(None)` if more bytes
/// are needed, else the response and how many bytes it used. `eof`: the peer
/// closed (a body without `Content-Length` ends there).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    eof: bool,
) -> Result<Option<(Response, usize)>, HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or_default();
    let mut length = None;
    let mut closes = resp.version == Some(0);
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(format!(
                "Transfer-Encoding {value} is not supported by the bench client"
            )));
        } else if h.name.eq_ignore_ascii_case("connection") {
            closes |= value.trim().eq_ignore_ascii_case("close");
        }
    }
    if (100..200).contains(&status) {
        // Interim answer: skip it and parse what follows.
        return Ok(parse_response(&buf[head_len..], head_request, eof)?
            .map(|(r, used)| (r, used + head_len)));
    }
    let body_len = if head_request || status == 204 || status == 304 {
        0
    } else {
        match length {
            Some(n) => n,
            None if eof => buf.len() - head_len,
            None => return Ok(None),
        }
    };
    if length.is_none() && !head_request && status != 204 && status != 304 {
        closes = true;
    }
    let end = head_len + body_len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Response {
            status,
            body: buf[head_len..end].to_vec(),
            closes,
        },
        end,
    )))
}

/// A `multipart/form-data` body: text fields and file parts.
#[derive(Debug, Default)]
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Multipart {
    /// An empty form with a boundary that must not occur in any part.
    pub fn new(boundary: &str) -> Self {
        Multipart {
            boundary: boundary.into(),
            body: Vec::new(),
        }
    }

    /// Adds a text field.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.body.extend_from_slice(
            format!(
                "--{}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n",
                self.boundary
            )
            .as_bytes(),
        );
        self
    }

    /// Adds a file part.
    pub fn file(mut self, name: &str, filename: &str, content_type: &str, data: &[u8]) -> Self {
        self.body.extend_from_slice(
            format!(
                "--{}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                 Content-Type: {content_type}\r\n\r\n",
                self.boundary
            )
            .as_bytes(),
        );
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    /// The `Content-Type` header value and the finished body.
    pub fn finish(mut self) -> (String, Vec<u8>) {
        self.body
            .extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        (
            format!("multipart/form-data; boundary={}", self.boundary),
            self.body,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn request_encoding() {
        let m = encode_request("GET", "/instances", &[], None, true);
        assert_eq!(m, b"GET /instances HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let m = encode_request("POST", "/x", &[], Some(b"{}"), false);
        let s = String::from_utf8(m).unwrap();
        assert!(s.contains("Connection: close\r\n"), "{s}");
        assert!(s.contains("Content-Type: application/json\r\n"), "{s}");
        assert!(s.ends_with("Content-Length: 2\r\n\r\n{}"), "{s}");
        let m = encode_request("DELETE", "/x", &[], None, true);
        assert!(!String::from_utf8(m).unwrap().contains("Content-Length"));
        let m = encode_request(
            "POST",
            "/x",
            &[("content-type", "text/plain")],
            Some(b"a"),
            true,
        );
        assert!(!String::from_utf8(m).unwrap().contains("application/json"));
    }

    #[test]
    fn parses_pipelined_responses_and_partials() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]HTTP/1.1 204 No Content\r\n\r\n";
        let (r, used) = parse_response(two, false, false).unwrap().unwrap();
        assert_eq!((r.status, r.text().as_str(), r.closes), (200, "[]", false));
        let (r, used2) = parse_response(&two[used..], false, false).unwrap().unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert_eq!(used + used2, two.len());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            false,
            false
        )
        .unwrap()
        .is_none());
        assert!(parse_response(b"HTTP/1.1 200 O", false, false)
            .unwrap()
            .is_none());
        let (r, _) = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
            false,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.text().as_str(), r.closes), (201, "x", true));
        // No length: the body runs to EOF.
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nabc", false, false)
            .unwrap()
            .is_none());
        let (r, _) = parse_response(b"HTTP/1.1 200 OK\r\n\r\nabc", false, true)
            .unwrap()
            .unwrap();
        assert_eq!((r.text().as_str(), r.closes), ("abc", true));
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                false
            ),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(b"NOPE\r\n\r\n", false, false),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn multipart_shape() {
        let (ct, body) = Multipart::new("XyZ")
            .text("lang", "c")
            .file("tarfile", "src.tar.gz", "application/gzip", b"\x1f\x8b")
            .finish();
        assert_eq!(ct, "multipart/form-data; boundary=XyZ");
        let mut want = b"--XyZ\r\nContent-Disposition: form-data; name=\"lang\"\r\n\r\nc\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"tarfile\"; filename=\"src.tar.gz\"\r\n\
Content-Type: application/gzip\r\n\r\n"
            .to_vec();
        want.extend_from_slice(b"\x1f\x8b\r\n--XyZ--\r\n");
        assert_eq!(body, want);
    }

    #[test]
    fn keep_alive_round_trips_then_close() {
        let path =
            std::env::temp_dir().join(format!("ember-bench-http-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut tmp = [0u8; 4096];
            // Two requests on one connection, answered one by one.
            for reply in [
                &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"[..],
                &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\ntwo"[..],
            ] {
                let start = seen.len();
                while !seen[start..].windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut tmp).unwrap();
                    assert!(n > 0);
                    seen.extend_from_slice(&tmp[..n]);
                }
                s.write_all(reply).unwrap();
            }
            String::from_utf8(seen).unwrap()
        });
        let mut c = Conn::connect(&path).unwrap();
        let t = Duration::from_secs(10);
        let r = c.request("GET", "/a", &[], None, true, t).unwrap();
        assert_eq!(r.text(), "one");
        assert!(!c.is_closed());
        let r = c.request("GET", "/b", &[], None, true, t).unwrap();
        assert_eq!(r.text(), "two");
        assert!(c.is_closed());
        let seen = server.join().unwrap();
        assert!(seen.starts_with("GET /a HTTP/1.1\r\n") && seen.contains("GET /b HTTP/1.1\r\n"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            once(&path, "GET", "/", &[], None, t),
            Err(HttpError::Connect(..))
        ));
    }
}
