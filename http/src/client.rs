//! A tiny blocking HTTP/1.1 client over a unix socket, for tests and for
//! emberd -> ember-vmm control. One request per connection
//! (`Connection: close`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::headers::Headers;
use crate::request::ChunkedDecoder;

/// Largest response body the client accepts.
const MAX_RESPONSE_BODY: usize = 1 << 30;
/// Largest response header block the client accepts.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Errors from [`request`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    /// Socket I/O failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The whole exchange did not finish within the timeout.
    #[error("request timed out")]
    Timeout,
    /// The server sent something that is not a valid HTTP response.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The connection closed before the response was complete.
    #[error("connection closed before the response was complete")]
    Truncated,
    /// The response body is not the expected JSON.
    #[error("invalid JSON in response: {0}")]
    Json(String),
}

/// A complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResponse {
    /// Status code.
    pub status: u16,
    /// Header fields.
    pub headers: Headers,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Deserializes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Json(e.to_string()))
    }
}

/// Sends one request and waits for the response.
///
/// `path` is the request target as sent (already percent-encoded, may carry
/// a query). A body is sent with `Content-Length` and
/// `Content-Type: application/json`. `timeout` bounds the whole exchange.
pub fn request(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    request_with_headers(socket_path, method, path, &[], body, timeout)
}

/// Like [`request`] with extra request headers (a `Content-Type` given here
/// replaces the JSON default).
pub fn request_with_headers(
    socket_path: impl AsRef<Path>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    let deadline = Instant::now() + timeout;
    let socket_path = socket_path.as_ref();
    let mut stream = UnixStream::connect(socket_path)
        .map_err(|e| ClientError::Connect(socket_path.display().to_string(), e))?;

    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
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
        None if matches!(method, "PUT" | "POST" | "PATCH") => {
            head.push_str("Content-Length: 0\r\n")
        }
        None => {}
    }
    head.push_str("\r\n");

    let mut msg = head.into_bytes();
    if let Some(b) = body {
        msg.extend_from_slice(b);
    }
    // If the server answers early (e.g. 413) and closes, the write fails;
    // the response may still be readable, so remember the error for later.
    let write_err = write_all_deadline(&mut stream, &msg, deadline).err();
    match read_response(&mut stream, method == "HEAD", deadline) {
        Ok(r) => Ok(r),
        Err(e) => Err(match (write_err, e) {
            (_, ClientError::Timeout) => ClientError::Timeout,
            (Some(we), _) => we,
            (None, e) => e,
        }),
    }
}

fn remaining(deadline: Instant) -> Result<Duration, ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ClientError::Timeout);
    }
    Ok(left)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn write_all_deadline(
    stream: &mut UnixStream,
    mut buf: &[u8],
    deadline: Instant,
) -> Result<(), ClientError> {
    while !buf.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(buf) {
            Ok(0) => return Err(ClientError::Truncated),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(ClientError::Timeout),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads more bytes into `buf`; returns false on EOF.
fn fill(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<bool, ClientError> {
    let mut tmp = [0u8; 16 * 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut tmp) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(ClientError::Timeout),
            // A peer that closed with our unread data pending shows up as
            // ECONNRESET instead of EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

enum BodyKind {
    None,
    Length(usize),
    Chunked,
    UntilEof,
}

fn read_response(
    stream: &mut UnixStream,
    head_request: bool,
    deadline: Instant,
) -> Result<ClientResponse, ClientError> {
    let mut buf = Vec::new();
    // Parse the head, skipping interim 1xx responses.
    let (status, headers, kind) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or_default();
                let headers: Headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                buf.drain(..n);
                if (100..200).contains(&status) {
                    continue;
                }
                let kind = if head_request || status == 204 || status == 304 {
                    BodyKind::None
                } else if headers.has_token("transfer-encoding", "chunked") {
                    BodyKind::Chunked
                } else if let Some(cl) = headers.get("content-length") {
                    let n: usize = cl.trim().parse().map_err(|_| {
                        ClientError::Malformed(format!("bad Content-Length {cl:?}"))
                    })?;
                    if n > MAX_RESPONSE_BODY {
                        return Err(ClientError::Malformed("response body too large".into()));
                    }
                    BodyKind::Length(n)
                } else {
                    BodyKind::UntilEof
                };
                break (status, headers, kind);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_RESPONSE_HEAD {
                    return Err(ClientError::Malformed("response head too large".into()));
                }
                if !fill(stream, &mut buf, deadline)? {
                    return Err(ClientError::Truncated);
                }
            }
            Err(e) => return Err(ClientError::Malformed(e.to_string())),
        }
    };

    let body = match kind {
        BodyKind::None => Vec::new(),
        BodyKind::Length(n) => {
            while buf.len() < n {
                if !fill(stream, &mut buf, deadline)? {
                    return Err(ClientError::Truncated);
                }
            }
            buf.truncate(n);
            buf
        }
        BodyKind::Chunked => {
            let mut decoder = ChunkedDecoder::new(MAX_RESPONSE_BODY);
            let mut body = Vec::new();
            loop {
                let (n, done) = decoder
                    .feed(&buf, &mut body)
                    .map_err(|e| ClientError::Malformed(e.to_string()))?;
                buf.drain(..n);
                if done {
                    break body;
                }
                if !fill(stream, &mut buf, deadline)? {
                    return Err(ClientError::Truncated);
                }
            }
        }
        BodyKind::UntilEof => {
            while fill(stream, &mut buf, deadline)? {
                if buf.len() > MAX_RESPONSE_BODY {
                    return Err(ClientError::Malformed("response body too large".into()));
                }
            }
            buf
        }
    };
    Ok(ClientResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// Serves one canned reply on a temp socket and returns the request seen.
    fn canned(
        name: &str,
        reply: &'static [u8],
        req: Option<&[u8]>,
        method: &str,
    ) -> (Result<ClientResponse, ClientError>, String) {
        let path = std::env::temp_dir().join(format!(
            "ember-http-client-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut tmp = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut tmp).unwrap();
                seen.extend_from_slice(&tmp[..n]);
            }
            s.write_all(reply).unwrap();
            String::from_utf8(seen).unwrap()
        });
        let r = request(&path, method, "/p?q=1", req, Duration::from_secs(10));
        let seen = t.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        (r, seen)
    }

    #[test]
    fn content_length_response() {
        let (r, seen) = canned(
            "cl",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            Some(b"{}"),
            "PUT",
        );
        let r = r.unwrap();
        assert_eq!(
            (r.status, r.text().as_str(), r.header("x-a")),
            (200, "hello", Some("b"))
        );
        assert!(seen.starts_with("PUT /p?q=1 HTTP/1.1\r\n"));
        assert!(seen.contains("Content-Length: 2\r\n"));
    }

    #[test]
    fn chunked_response_after_100_continue() {
        let (r, _) = canned(
            "chunked",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n",
            None,
            "GET",
        );
        let v: serde_json::Value = r.unwrap().json().unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn until_eof_and_head_and_truncated() {
        let (r, _) = canned("eof", b"HTTP/1.1 200 OK\r\n\r\nall of it", None, "GET");
        assert_eq!(r.unwrap().body, b"all of it");
        let (r, _) = canned(
            "head",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            None,
            "HEAD",
        );
        assert!(r.unwrap().body.is_empty());
        let (r, _) = canned(
            "trunc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            None,
            "GET",
        );
        assert!(matches!(r, Err(ClientError::Truncated)));
        let (r, _) = canned("bad", b"NOT HTTP\r\n\r\n", None, "GET");
        assert!(matches!(r, Err(ClientError::Malformed(_))));
    }

    #[test]
    fn connect_error() {
        let r = request(
            "/nonexistent/ember.sock",
            "GET",
            "/",
            None,
            Duration::from_secs(1),
        );
        assert!(matches!(r, Err(ClientError::Connect(..))));
    }
}
