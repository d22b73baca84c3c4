//! HTTP response type, builders and serialization.

use std::io::Write;

use serde::Serialize;

use crate::headers::Headers;
use crate::request::Version;

/// Errors from building a response.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The value could not be serialized to JSON.
    #[error("cannot serialize response body: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// A complete body, sent with `Content-Length`.
    Full(Vec<u8>),
    /// A streamed body: the head is sent with `Transfer-Encoding: chunked`
    /// (HTTP/1.1) and chunks are pushed later with
    /// [`Responder::send_chunk`](crate::Responder::send_chunk) and ended with
    /// [`Responder::finish`](crate::Responder::finish).
    Stream,
}

/// An HTTP response. The layer adds `Content-Length` (or
/// `Transfer-Encoding: chunked` for [`Body::Stream`]) and `Connection` itself;
/// such headers set here are ignored, except that `Connection: close` makes
/// the server close the connection after this response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields.
    pub headers: Headers,
    /// Body.
    pub body: Body,
}

impl Response {
    /// A response with the given status, no headers and an empty body.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            headers: Headers::new(),
            body: Body::Full(Vec::new()),
        }
    }

    /// A JSON response (`Content-Type: application/json`). If `value` cannot
    /// be serialized the result is a 500 fault response instead.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match Self::try_json(status, value) {
            Ok(r) => r,
            Err(e) => Self::fault(500, &e.to_string()),
        }
    }

    /// Like [`Response::json`] but reports serialization failures.
    pub fn try_json<T: Serialize + ?Sized>(status: u16, value: &T) -> Result<Self, ResponseError> {
        let body = serde_json::to_vec(value)?;
        Ok(Self::bytes(status, "application/json", body))
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self::bytes(
            status,
            "text/plain; charset=utf-8",
            text.into().into_bytes(),
        )
    }

    /// A response with an arbitrary body and content type.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        let mut headers = Headers::new();
        headers.set("Content-Type", content_type);
        Response {
            status,
            headers,
            body: Body::Full(body),
        }
    }

    /// A streamed response; see [`Body::Stream`].
    pub fn stream(status: u16, content_type: &str) -> Self {
        let mut headers = Headers::new();
        headers.set("Content-Type", content_type);
        Response {
            status,
            headers,
            body: Body::Stream,
        }
    }

    /// The Firecracker-shaped error response: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message });
        let body = serde_json::to_vec(&body).unwrap_or_default();
        Self::bytes(status, "application/json", body)
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.set(name, value);
        self
    }

    /// Whether the body is a stream.
    pub fn is_stream(&self) -> bool {
        matches!(self.body, Body::Stream)
    }

    /// Whether the response itself asks for the connection to be closed.
    pub(crate) fn wants_close(&self) -> bool {
        self.headers.has_token("connection", "close")
    }
}

/// Standard reason phrase for `status`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        422 => "Unprocessable Entity",
        423 => "Locked",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// How a response head is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length` follows with the body (or no body for HEAD/204/304).
    Length,
    /// Chunked stream follows.
    Chunked,
    /// Raw stream delimited by closing the connection (HTTP/1.0 clients).
    UntilClose,
}

/// Per-request facts needed to serialize a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WriteOpts {
    /// The connection stays open after this response.
    pub keep_alive: bool,
    /// The request was HEAD (no body is sent).
    pub head: bool,
    /// Request version.
    pub version: Version,
}

fn status_has_no_body(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

/// Decides the framing for `resp` answering a request described by `opts`.
pub(crate) fn framing_for(resp: &Response, opts: &WriteOpts) -> Framing {
    match resp.body {
        Body::Full(_) => Framing::Length,
        Body::Stream if status_has_no_body(resp.status) || opts.head => Framing::Length,
        Body::Stream if opts.version == Version::Http10 => Framing::UntilClose,
        Body::Stream => Framing::Chunked,
    }
}

/// Serializes status line, headers and (for full bodies) the body into `out`.
pub(crate) fn serialize(resp: &Response, opts: &WriteOpts, framing: Framing, out: &mut Vec<u8>) {
    let status = resp.status;
    // Writes into a Vec<u8> cannot fail.
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    for (name, value) in resp.headers.iter() {
        if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("connection")
        {
            continue;
        }
        out.extend(name.bytes().filter(|b| !b.is_ascii_control() && *b != b':'));
        out.extend_from_slice(b": ");
        out.extend(value.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length => {
            let len = match &resp.body {
                Body::Full(b) => b.len(),
                Body::Stream => 0,
            };
            if !status_has_no_body(status) {
                let _ = write!(out, "Content-Length: {len}\r\n");
            }
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    if !opts.keep_alive || framing == Framing::UntilClose {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if opts.version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Body::Full(body) = &resp.body {
        if !opts.head && !status_has_no_body(status) {
            out.extend_from_slice(body);
        }
    }
}

/// Appends one chunk in the given framing (nothing for empty data, which
/// would otherwise end a chunked stream).
pub(crate) fn encode_chunk(framing: Framing, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    match framing {
        Framing::Chunked => {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        Framing::UntilClose => out.extend_from_slice(data),
        Framing::Length => {}
    }
}

/// Appends the end of a stream in the given framing.
pub(crate) fn encode_end(framing: Framing, out: &mut Vec<u8>) {
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ser(resp: &Response, opts: WriteOpts) -> String {
        let mut out = Vec::new();
        serialize(resp, &opts, framing_for(resp, &opts), &mut out);
        String::from_utf8(out).unwrap()
    }

    const KA11: WriteOpts = WriteOpts {
        keep_alive: true,
        head: false,
        version: Version::Http11,
    };

    #[test]
    fn json_response() {
        let r = Response::json(200, &serde_json::json!({"a": 1}));
        assert_eq!(
            ser(&r, KA11),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn fault_and_close() {
        let r = Response::fault(400, "bad \"thing\"");
        let s = ser(
            &r,
            WriteOpts {
                keep_alive: false,
                ..KA11
            },
        );
        assert!(s.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"fault_message\":\"bad \\\"thing\\\"\"}"));
    }

    #[test]
    fn no_content_has_no_length_and_head_has_no_body() {
        assert_eq!(
            ser(&Response::empty(204), KA11),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
        let r = Response::text(200, "hello");
        let s = ser(&r, WriteOpts { head: true, ..KA11 });
        assert!(s.ends_with("Content-Length: 5\r\n\r\n"));
    }

    #[test]
    fn user_framing_headers_are_replaced_and_injection_stripped() {
        let r = Response::text(200, "x")
            .with_header("Content-Length", "99")
            .with_header("X-Evil", "a\r\nInjected: 1");
        let s = ser(&r, KA11);
        assert!(s.contains("Content-Length: 1\r\n"));
        assert!(!s.contains("99"));
        assert!(s.contains("X-Evil: aInjected: 1\r\n"));
        assert!(r.clone().with_header("connection", "Close").wants_close());
    }

    #[test]
    fn streams() {
        let r = Response::stream(200, "text/plain");
        assert_eq!(framing_for(&r, &KA11), Framing::Chunked);
        let s = ser(&r, KA11);
        assert!(s.ends_with("Transfer-Encoding: chunked\r\n\r\n"));
        let mut out = Vec::new();
        encode_chunk(Framing::Chunked, b"hello world, this is long", &mut out);
        encode_chunk(Framing::Chunked, b"", &mut out);
        encode_end(Framing::Chunked, &mut out);
        assert_eq!(out, b"19\r\nhello world, this is long\r\n0\r\n\r\n");
        let v10 = WriteOpts {
            version: Version::Http10,
            ..KA11
        };
        assert_eq!(framing_for(&r, &v10), Framing::UntilClose);
        assert!(ser(&r, v10).contains("Connection: close"));
        let v10ka = WriteOpts {
            version: Version::Http10,
            ..KA11
        };
        assert!(ser(&Response::empty(200), v10ka).contains("Connection: keep-alive"));
    }

    #[test]
    fn unknown_status_reason() {
        assert_eq!(reason_phrase(299), "Unknown");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
    }
}
