//! HTTP/1.x request type and an incremental, bounded request parser.
//!
//! The parser ([`RequestParser`]) is fed whatever bytes have arrived so far and
//! consumes them progressively: the header block is parsed with `httparse`
//! once it is complete, then the body is collected either by `Content-Length`
//! or by decoding `Transfer-Encoding: chunked`.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::body::{BodySink, RequestBody, SpoolConfig, SpoolError};
use crate::headers::Headers;

/// Default limit for the request line plus header block.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default limit for a request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most header fields accepted in one request.
const MAX_HEADER_FIELDS: usize = 96;
/// Longest accepted chunk-size line (size plus extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// Errors from parsing a request or decoding its body.
///
/// Every variant maps to the HTTP status the server answers with, see
/// [`RequestError::status`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The request line or a header is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// Request line plus headers exceed the configured limit.
    #[error("request header block exceeds {0} bytes")]
    HeadersTooLarge(usize),
    /// The body exceeds the configured limit.
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    /// A chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// A transfer coding other than `chunked` was used.
    #[error("unsupported transfer encoding: {0}")]
    UnsupportedTransferEncoding(String),
    /// The body could not be deserialized as JSON.
    #[error("invalid JSON body: {0}")]
    Json(String),
    /// The body could not be spooled to disk.
    #[error("{0}")]
    Spool(String),
}

impl From<SpoolError> for RequestError {
    fn from(e: SpoolError) -> Self {
        RequestError::Spool(e.to_string())
    }
}

impl RequestError {
    /// The HTTP status code this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_) | RequestError::BadChunk(_) | RequestError::Json(_) => 400,
            RequestError::HeadersTooLarge(_) => 431,
            RequestError::BodyTooLarge(_) => 413,
            RequestError::UnsupportedTransferEncoding(_) => 501,
            RequestError::Spool(_) => 500,
        }
    }
}

/// Request method. Standard methods get their own variant; anything else
/// (case-sensitive, as HTTP methods are) is kept in `Other`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET
    Get,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// POST
    Post,
    /// DELETE
    Delete,
    /// HEAD
    Head,
    /// OPTIONS
    Options,
    /// Any other method token.
    Other(String),
}

impl Method {
    /// The method token as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Other(s) => s,
        }
    }
}

impl From<&str> for Method {
    fn from(s: &str) -> Self {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP protocol version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    Http11,
}

/// A complete, parsed HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request method.
    pub method: Method,
    /// Percent-decoded path, without the query string (always starts with `/`,
    /// or is `*` for `OPTIONS *`).
    pub path: String,
    /// Decoded query parameters in order (`+` decodes to a space).
    pub query: Vec<(String, String)>,
    /// Header fields.
    pub headers: Headers,
    /// Body (already de-chunked); large bodies are spooled to disk, see
    /// [`RequestBody`].
    pub body: RequestBody,
    /// Protocol version.
    pub version: Version,
}

impl Request {
    /// First value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Deserializes the body as JSON. An empty body or invalid JSON gives
    /// [`RequestError::Json`] (status 400) with a readable message.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, RequestError> {
        if self.body.is_empty() {
            return Err(RequestError::Json("empty request body".to_string()));
        }
        serde_json::from_slice(&self.body).map_err(|e| RequestError::Json(e.to_string()))
    }

    /// Whether the client asked to keep the connection open after this request.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }
}

/// Size limits applied while parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum bytes of request line plus header block (431 beyond).
    pub max_header_bytes: usize,
    /// Maximum body bytes (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Outcome of feeding bytes to the parser.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A full request was parsed.
    Complete(Box<Request>),
}

#[derive(Debug)]
enum ParseState {
    Head,
    Body {
        req: Box<Request>,
        sink: BodySink,
        remaining: usize,
        expect_continue: bool,
    },
    Chunked {
        req: Box<Request>,
        sink: BodySink,
        decoder: ChunkedDecoder,
        expect_continue: bool,
    },
}

/// Incremental parser for a stream of pipelined requests.
#[derive(Debug)]
pub(crate) struct RequestParser {
    limits: Limits,
    spool: Option<Arc<SpoolConfig>>,
    state: ParseState,
}

impl RequestParser {
    #[cfg(test)]
    pub(crate) fn new(limits: Limits) -> Self {
        Self::with_spool(limits, None)
    }

    /// A parser whose large bodies go to disk as `spool` says (None: all
    /// bodies in memory).
    pub(crate) fn with_spool(limits: Limits, spool: Option<Arc<SpoolConfig>>) -> Self {
        RequestParser {
            limits,
            spool,
            state: ParseState::Head,
        }
    }

    /// Body bytes received so far if the current request's head is
    /// complete and its body is still arriving; None while reading a head.
    pub(crate) fn body_progress(&self) -> Option<usize> {
        match &self.state {
            ParseState::Head => None,
            ParseState::Body { sink, .. } | ParseState::Chunked { sink, .. } => Some(sink.len()),
        }
    }

    /// Whether the header block of the current request has been parsed, it
    /// carries `Expect: 100-continue` and its body is still being received.
    pub(crate) fn awaiting_body_with_continue(&self) -> bool {
        match &self.state {
            ParseState::Head => false,
            ParseState::Body {
                expect_continue, ..
            }
            | ParseState::Chunked {
                expect_continue, ..
            } => *expect_continue,
        }
    }

    /// Feeds `buf` (all unconsumed bytes received so far). Returns how many
    /// bytes were consumed and whether a request is complete. At most one
    /// request is returned per call; call again with the remaining bytes.
    /// After an error the parser state is unspecified (the connection is to
    /// be closed).
    pub(crate) fn parse(&mut self, buf: &[u8]) -> Result<(usize, Parsed), RequestError> {
        let mut consumed = 0;
        loop {
            let rest = &buf[consumed..];
            match &mut self.state {
                ParseState::Head => {
                    let Some((n, head)) = parse_head(rest, &self.limits)? else {
                        return Ok((consumed, Parsed::Incomplete));
                    };
                    consumed += n;
                    match head.framing {
                        Framing::None => return Ok((consumed, Parsed::Complete(head.req))),
                        Framing::Length(len) => {
                            self.state = ParseState::Body {
                                req: head.req,
                                sink: BodySink::new(self.spool.clone()),
                                remaining: len,
                                expect_continue: head.expect_continue,
                            };
                        }
                        Framing::Chunked => {
                            self.state = ParseState::Chunked {
                                req: head.req,
                                sink: BodySink::new(self.spool.clone()),
                                decoder: ChunkedDecoder::new(self.limits.max_body_bytes),
                                expect_continue: head.expect_continue,
                            };
                        }
                    }
                }
                ParseState::Body {
                    sink, remaining, ..
                } => {
                    let take = (*remaining).min(rest.len());
                    sink.push(&rest[..take])?;
                    *remaining -= take;
                    consumed += take;
                    if *remaining > 0 {
                        return Ok((consumed, Parsed::Incomplete));
                    }
                    return Ok((consumed, self.finish()?));
                }
                ParseState::Chunked { sink, decoder, .. } => {
                    let (n, done) = decoder.feed(rest, sink)?;
                    consumed += n;
                    if !done {
                        return Ok((consumed, Parsed::Incomplete));
                    }
                    return Ok((consumed, self.finish()?));
                }
            }
        }
    }

    fn finish(&mut self) -> Result<Parsed, RequestError> {
        match std::mem::replace(&mut self.state, ParseState::Head) {
            ParseState::Head => Ok(Parsed::Incomplete),
            ParseState::Body { mut req, sink, .. } | ParseState::Chunked { mut req, sink, .. } => {
                req.body = sink.finish()?;
                Ok(Parsed::Complete(req))
            }
        }
    }
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

struct Head {
    req: Box<Request>,
    framing: Framing,
    expect_continue: bool,
}

/// Parses the request line and headers. `Ok(None)` means more bytes needed.
fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(usize, Head)>, RequestError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADER_FIELDS];
    let mut parsed = httparse::Request::new(&mut fields);
    let n = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_header_bytes {
                return Err(RequestError::HeadersTooLarge(limits.max_header_bytes));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::HeadersTooLarge(limits.max_header_bytes))
        }
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    if n > limits.max_header_bytes {
        return Err(RequestError::HeadersTooLarge(limits.max_header_bytes));
    }
    let method = Method::from(parsed.method.unwrap_or_default());
    let version = match parsed.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let target = parsed.path.unwrap_or_default();
    let (path, query) = parse_target(target, &method)?;
    let headers: Headers = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();

    let framing = body_framing(&headers, limits)?;
    let expect_continue = version == Version::Http11
        && headers
            .get("expect")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
    let req = Box::new(Request {
        method,
        path,
        query,
        headers,
        body: RequestBody::default(),
        version,
    });
    Ok(Some((
        n,
        Head {
            req,
            framing,
            expect_continue,
        },
    )))
}

fn body_framing(headers: &Headers, limits: &Limits) -> Result<Framing, RequestError> {
    let te: Vec<&str> = headers
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if !te.is_empty() {
        if headers.contains("content-length") {
            return Err(RequestError::Malformed(
                "both Transfer-Encoding and Content-Length".to_string(),
            ));
        }
        if te.len() == 1 && te[0].eq_ignore_ascii_case("chunked") {
            return Ok(Framing::Chunked);
        }
        return Err(RequestError::UnsupportedTransferEncoding(te.join(", ")));
    }
    let mut length: Option<usize> = None;
    for v in headers
        .get_all("content-length")
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RequestError::Malformed(format!("bad Content-Length {v:?}")));
        }
        let n: usize = v
            .parse()
            .map_err(|_| RequestError::BodyTooLarge(limits.max_body_bytes))?;
        if length.is_some_and(|l| l != n) {
            return Err(RequestError::Malformed(
                "conflicting Content-Length values".to_string(),
            ));
        }
        length = Some(n);
    }
    match length {
        None | Some(0) => Ok(Framing::None),
        Some(n) if n > limits.max_body_bytes => {
            Err(RequestError::BodyTooLarge(limits.max_body_bytes))
        }
        Some(n) => Ok(Framing::Length(n)),
    }
}

/// Splits a request target into a decoded path and decoded query pairs.
fn parse_target(
    target: &str,
    method: &Method,
) -> Result<(String, Vec<(String, String)>), RequestError> {
    if target == "*" && *method == Method::Options {
        return Ok(("*".to_string(), Vec::new()));
    }
    // Accept absolute-form (`http://host/path`) by dropping scheme and authority.
    let origin = if let Some(pos) = target.find("://") {
        let after = &target[pos + 3..];
        match after.find(['/', '?']) {
            Some(i) if after.as_bytes()[i] == b'/' => &after[i..],
            Some(i) => return Ok(("/".to_string(), parse_query(&after[i + 1..])?)),
            None => "/",
        }
    } else {
        target
    };
    if !origin.starts_with('/') {
        return Err(RequestError::Malformed(format!(
            "request target must start with '/': {target:?}"
        )));
    }
    let origin = origin.split('#').next().unwrap_or_default();
    let (raw_path, raw_query) = match origin.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (origin, None),
    };
    let path = percent_decode(raw_path, false)?;
    let query = match raw_query {
        Some(q) => parse_query(q)?,
        None => Vec::new(),
    };
    Ok((path, query))
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, RequestError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space when `plus_as_space`); the result
/// must be UTF-8.
pub(crate) fn percent_decode(s: &str, plus_as_space: bool) -> Result<String, RequestError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        RequestError::Malformed(format!("bad percent-encoding in {s:?}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| RequestError::Malformed(format!("percent-decoded {s:?} is not UTF-8")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size (and any extension) up to the line end.
    Size {
        value: usize,
        digits: usize,
        in_ext: bool,
        line_len: usize,
    },
    /// Saw CR after the size line; expecting LF.
    SizeLf { value: usize },
    /// Copying chunk data.
    Data { remaining: usize },
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// Reading a trailer line (`line_len` bytes seen so far).
    Trailer { line_len: usize },
    /// Saw CR in the trailer section; expecting LF.
    TrailerLf { line_len: usize },
    /// Final CRLF seen.
    Done,
}

impl ChunkState {
    fn size_start() -> Self {
        ChunkState::Size {
            value: 0,
            digits: 0,
            in_ext: false,
            line_len: 0,
        }
    }
}

/// Where [`ChunkedDecoder`] puts decoded data.
pub(crate) trait BodyOut {
    /// Bytes appended so far.
    fn received(&self) -> usize;
    /// Appends decoded bytes.
    fn append(&mut self, data: &[u8]) -> Result<(), RequestError>;
}

impl BodyOut for Vec<u8> {
    fn received(&self) -> usize {
        self.len()
    }
    fn append(&mut self, data: &[u8]) -> Result<(), RequestError> {
        self.extend_from_slice(data);
        Ok(())
    }
}

impl BodyOut for BodySink {
    fn received(&self) -> usize {
        self.len()
    }
    fn append(&mut self, data: &[u8]) -> Result<(), RequestError> {
        Ok(self.push(data)?)
    }
}

/// Incremental decoder for `Transfer-Encoding: chunked` bodies (used for
/// requests by the server and for responses by the client).
#[derive(Debug, Clone)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    max_body: usize,
    trailer_bytes: usize,
}

impl ChunkedDecoder {
    pub(crate) fn new(max_body: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::size_start(),
            max_body,
            trailer_bytes: 0,
        }
    }

    /// Decodes from `input`, appending data to `body`. Returns bytes consumed
    /// and whether the terminating chunk and trailers were fully read. Bytes
    /// after the end are not consumed.
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        body: &mut impl BodyOut,
    ) -> Result<(usize, bool), RequestError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == ChunkState::Done {
                break;
            }
            if let ChunkState::Data { remaining } = self.state {
                let take = remaining.min(input.len() - i);
                body.append(&input[i..i + take])?;
                i += take;
                let left = remaining - take;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data { remaining: left }
                };
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = self.step(b, body.received())?;
        }
        Ok((i, self.state == ChunkState::Done))
    }

    fn step(&mut self, b: u8, body_len: usize) -> Result<ChunkState, RequestError> {
        Ok(match self.state {
            ChunkState::Size {
                value,
                digits,
                in_ext,
                line_len,
            } => {
                if line_len >= MAX_CHUNK_LINE {
                    return Err(RequestError::BadChunk("chunk size line too long"));
                }
                let line_len = line_len + 1;
                match b {
                    b'\r' | b'\n' => {
                        if digits == 0 {
                            return Err(RequestError::BadChunk("missing chunk size"));
                        }
                        if b == b'\r' {
                            ChunkState::SizeLf { value }
                        } else {
                            self.after_size(value, body_len)?
                        }
                    }
                    _ if in_ext => ChunkState::Size {
                        value,
                        digits,
                        in_ext,
                        line_len,
                    },
                    b';' | b' ' | b'\t' if digits > 0 => ChunkState::Size {
                        value,
                        digits,
                        in_ext: true,
                        line_len,
                    },
                    _ => {
                        let d = (b as char)
                            .to_digit(16)
                            .ok_or(RequestError::BadChunk("invalid chunk size"))?;
                        let value = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(d as usize))
                            .ok_or(RequestError::BodyTooLarge(self.max_body))?;
                        ChunkState::Size {
                            value,
                            digits: digits + 1,
                            in_ext,
                            line_len,
                        }
                    }
                }
            }
            ChunkState::SizeLf { value } => {
                if b != b'\n' {
                    return Err(RequestError::BadChunk("expected LF after chunk size"));
                }
                self.after_size(value, body_len)?
            }
            ChunkState::DataCr => match b {
                b'\r' => ChunkState::DataLf,
                b'\n' => ChunkState::size_start(),
                _ => return Err(RequestError::BadChunk("missing CRLF after chunk data")),
            },
            ChunkState::DataLf => {
                if b != b'\n' {
                    return Err(RequestError::BadChunk("missing LF after chunk data"));
                }
                ChunkState::size_start()
            }
            ChunkState::Trailer { line_len } => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > DEFAULT_MAX_HEADER_BYTES {
                    return Err(RequestError::BadChunk("trailer section too long"));
                }
                match b {
                    b'\r' => ChunkState::TrailerLf { line_len },
                    b'\n' if line_len == 0 => ChunkState::Done,
                    b'\n' => ChunkState::Trailer { line_len: 0 },
                    _ => ChunkState::Trailer {
                        line_len: line_len + 1,
                    },
                }
            }
            ChunkState::TrailerLf { line_len } => {
                if b != b'\n' {
                    return Err(RequestError::BadChunk("expected LF in trailer"));
                }
                if line_len == 0 {
                    ChunkState::Done
                } else {
                    ChunkState::Trailer { line_len: 0 }
                }
            }
            // Data is handled in bulk by `feed`, Done stops it.
            ChunkState::Data { .. } | ChunkState::Done => self.state,
        })
    }

    fn after_size(&self, value: usize, body_len: usize) -> Result<ChunkState, RequestError> {
        if value == 0 {
            return Ok(ChunkState::Trailer { line_len: 0 });
        }
        if body_len.saturating_add(value) > self.max_body {
            return Err(RequestError::BodyTooLarge(self.max_body));
        }
        Ok(ChunkState::Data { remaining: value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8], limits: Limits) -> Result<Vec<Request>, RequestError> {
        let mut p = RequestParser::new(limits);
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            let (n, parsed) = p.parse(&input[off..])?;
            off += n;
            match parsed {
                Parsed::Complete(r) => out.push(*r),
                Parsed::Incomplete => break,
            }
        }
        assert_eq!(off, input.len(), "all input consumed");
        Ok(out)
    }

    /// Feeds `input` as two pieces split at every possible byte boundary,
    /// mimicking a connection buffer (unconsumed bytes stay in the buffer).
    fn parse_split(
        input: &[u8],
        split: usize,
        limits: Limits,
    ) -> Result<Vec<Request>, RequestError> {
        let mut p = RequestParser::new(limits);
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in [&input[..split], &input[split..]] {
            buf.extend_from_slice(piece);
            loop {
                let (n, parsed) = p.parse(&buf)?;
                buf.drain(..n);
                match parsed {
                    Parsed::Complete(r) => out.push(*r),
                    Parsed::Incomplete => break,
                }
            }
        }
        assert!(buf.is_empty());
        Ok(out)
    }

    const PIPELINE: &[u8] = b"GET /vms/a%20b?x=1&y=hello+world&z=%2F&flag HTTP/1.1\r\nHost: localhost\r\n\r\n\
PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"vcpus\": 2}\n\
POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n\
DELETE /x HTTP/1.0\r\n\r\n";

    fn check_pipeline(reqs: &[Request]) {
        assert_eq!(reqs.len(), 4);
        assert_eq!(reqs[0].method, Method::Get);
        assert_eq!(reqs[0].path, "/vms/a b");
        assert_eq!(reqs[0].query_param("x"), Some("1"));
        assert_eq!(reqs[0].query_param("y"), Some("hello world"));
        assert_eq!(reqs[0].query_param("z"), Some("/"));
        assert_eq!(reqs[0].query_param("flag"), Some(""));
        assert_eq!(reqs[0].header("HOST"), Some("localhost"));
        assert!(reqs[0].keep_alive());
        assert_eq!(reqs[1].method, Method::Put);
        assert_eq!(reqs[1].body, b"{\"vcpus\": 2}\n");
        #[derive(serde::Deserialize)]
        struct Mc {
            vcpus: u32,
        }
        assert_eq!(reqs[1].json::<Mc>().map(|m| m.vcpus), Ok(2));
        assert_eq!(reqs[2].method, Method::Post);
        assert_eq!(reqs[2].body, b"hello, world");
        assert_eq!(reqs[3].method, Method::Delete);
        assert_eq!(reqs[3].version, Version::Http10);
        assert!(!reqs[3].keep_alive());
    }

    #[test]
    fn pipelined_requests_in_one_buffer() {
        check_pipeline(&parse_all(PIPELINE, Limits::default()).unwrap());
    }

    #[test]
    fn split_at_every_byte_boundary() {
        for split in 0..=PIPELINE.len() {
            let reqs = parse_split(PIPELINE, split, Limits::default())
                .unwrap_or_else(|e| panic!("split {split}: {e}"));
            check_pipeline(&reqs);
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut p = RequestParser::new(Limits::default());
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for &b in PIPELINE {
            buf.push(b);
            let (n, parsed) = p.parse(&buf).unwrap();
            buf.drain(..n);
            if let Parsed::Complete(r) = parsed {
                out.push(*r);
            }
        }
        check_pipeline(&out);
    }

    #[test]
    fn methods_and_versions() {
        let r = parse_all(b"PATCH / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\nOPTIONS * HTTP/1.1\r\n\r\nBREW /pot HTTP/1.1\r\n\r\n", Limits::default()).unwrap();
        assert_eq!(r[0].method, Method::Patch);
        assert_eq!(r[1].method, Method::Head);
        assert_eq!(r[2].method, Method::Options);
        assert_eq!(r[2].path, "*");
        assert_eq!(r[3].method, Method::Other("BREW".into()));
        assert_eq!(r[3].method.to_string(), "BREW");
        let r = parse_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n", Limits::default()).unwrap();
        assert!(r[0].keep_alive());
        assert!(!r[1].keep_alive());
    }

    #[test]
    fn absolute_form_target() {
        let r = parse_all(
            b"GET http://localhost/a/b?c=d HTTP/1.1\r\n\r\n",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(r[0].path, "/a/b");
        assert_eq!(r[0].query_param("c"), Some("d"));
    }

    #[test]
    fn header_limit_gives_431() {
        let limits = Limits {
            max_header_bytes: 64,
            max_body_bytes: 10,
        };
        let mut req = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 100));
        // Incomplete but already too long.
        let err = RequestParser::new(limits).parse(&req).unwrap_err();
        assert_eq!(err.status(), 431);
        // Complete but too long.
        req.extend_from_slice(b"\r\n\r\n");
        let err = RequestParser::new(limits).parse(&req).unwrap_err();
        assert_eq!(err.status(), 431);
        // Too many header fields.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let err = RequestParser::new(Limits::default())
            .parse(&many)
            .unwrap_err();
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn body_limit_gives_413() {
        let limits = Limits {
            max_header_bytes: 1024,
            max_body_bytes: 10,
        };
        let err = RequestParser::new(limits)
            .parse(b"PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
            .unwrap_err();
        assert_eq!(err.status(), 413);
        let err = RequestParser::new(limits)
            .parse(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n")
            .unwrap_err();
        assert_eq!(err.status(), 413);
        // Chunked total over the limit.
        let err = RequestParser::new(limits)
            .parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\n")
            .unwrap_err();
        assert_eq!(err.status(), 413);
        let err = RequestParser::new(limits)
            .parse(
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffff\r\n",
            )
            .unwrap_err();
        assert_eq!(err.status(), 413);
        // Exactly at the limit is fine.
        let r = parse_all(
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789",
            limits,
        )
        .unwrap();
        assert_eq!(r[0].body.len(), 10);
    }

    #[test]
    fn bad_input_gives_400() {
        let cases: &[&[u8]] = &[
            b"GET\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET /%zz HTTP/1.1\r\n\r\n",
            b"GET /%ff HTTP/1.1\r\n\r\n",
            b"GET /?a=%4 HTTP/1.1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\rX",
        ];
        for c in cases {
            let err = RequestParser::new(Limits::default())
                .parse(c)
                .expect_err(&String::from_utf8_lossy(c));
            assert_eq!(err.status(), 400, "{:?}: {err}", String::from_utf8_lossy(c));
        }
        let err = RequestParser::new(Limits::default())
            .parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap_err();
        assert_eq!(err.status(), 501);
    }

    #[test]
    fn same_content_length_twice_is_fine() {
        let r = parse_all(
            b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(r[0].body, b"ab");
    }

    #[test]
    fn expect_continue_is_reported_until_body_done() {
        let mut p = RequestParser::new(Limits::default());
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        let (n, parsed) = p.parse(head).unwrap();
        assert_eq!(n, head.len());
        assert_eq!(parsed, Parsed::Incomplete);
        assert!(p.awaiting_body_with_continue());
        let (_, parsed) = p.parse(b"abc").unwrap();
        assert!(matches!(parsed, Parsed::Complete(_)));
        assert!(!p.awaiting_body_with_continue());
    }

    #[test]
    fn json_errors_are_clean() {
        let r = parse_all(
            b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}",
            Limits::default(),
        )
        .unwrap();
        let err = r[0].json::<serde_json::Value>().unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().starts_with("invalid JSON body"));
        let r = parse_all(b"PUT / HTTP/1.1\r\n\r\n", Limits::default()).unwrap();
        assert!(r[0].json::<serde_json::Value>().is_err());
    }

    #[test]
    fn chunked_decoder_lenient_bare_lf_and_extensions() {
        let mut d = ChunkedDecoder::new(100);
        let mut body = Vec::new();
        let input = b"3 ; name=\"v\"\nabc\n0\n\nEXTRA";
        let (n, done) = d.feed(input, &mut body).unwrap();
        assert!(done);
        assert_eq!(&input[n..], b"EXTRA");
        assert_eq!(body, b"abc");
    }

    #[test]
    fn large_bodies_are_spooled_by_length_and_chunked() {
        let dir = std::env::temp_dir().join(format!("ember-http-req-spool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = Some(Arc::new(SpoolConfig {
            dir: dir.clone(),
            threshold: 8,
        }));
        let input = b"PUT /a HTTP/1.1\r\nContent-Length: 8\r\n\r\n12345678\
PUT /b HTTP/1.1\r\nContent-Length: 12\r\n\r\n123456789abc\
PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        for split in 0..=input.len() {
            let mut p = RequestParser::with_spool(Limits::default(), spool.clone());
            let mut buf = Vec::new();
            let mut out = Vec::new();
            for piece in [&input[..split], &input[split..]] {
                buf.extend_from_slice(piece);
                loop {
                    let (n, parsed) = p.parse(&buf).unwrap();
                    buf.drain(..n);
                    match parsed {
                        Parsed::Complete(r) => out.push(*r),
                        Parsed::Incomplete => break,
                    }
                }
            }
            let got: Vec<(&str, bool, &[u8])> = out
                .iter()
                .map(|r| (r.path.as_str(), r.body.is_spooled(), &*r.body))
                .collect();
            assert_eq!(
                got,
                [
                    ("/a", false, &b"12345678"[..]),
                    ("/b", true, &b"123456789abc"[..]),
                    ("/c", true, &b"hello, world"[..]),
                ],
                "split {split}"
            );
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
        // An unusable spool directory is a 500 for that request.
        let mut p = RequestParser::with_spool(
            Limits::default(),
            Some(Arc::new(SpoolConfig {
                dir: "/nonexistent/spool".into(),
                threshold: 2,
            })),
        );
        let err = p
            .parse(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap_err();
        assert_eq!(err.status(), 500);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c", false).unwrap(), "a/b+c");
        assert_eq!(percent_decode("a%2fb+c", true).unwrap(), "a/b c");
        assert_eq!(percent_decode("%C3%A9", false).unwrap(), "é");
        assert!(percent_decode("%", false).is_err());
        assert!(percent_decode("%e", false).is_err());
    }
}
