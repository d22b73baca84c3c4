//! The microVM metadata service (MMDS) as the guest sees it, with
//! Firecracker's semantics: HTTP on TCP port 80 of a link-local IPv4 address
//! (169.254.169.254 by default), answered inside the VMM over the guest's
//! own virtio-net interface, so the guest needs no host networking.
//!
//! - [`MmdsService`] answers one HTTP request: `GET` a JSON path (the IMDS
//!   text format, or JSON with `Accept: application/json`), and
//!   `PUT /latest/api/token` for a V2 session token. V2 refuses a `GET`
//!   without a valid `X-metadata-token`; V1 takes it with or without.
//! - [`stack::MmdsStack`] is the per-interface network side: it answers ARP
//!   for the MMDS address and runs a small TCP server for port 80; every
//!   other frame goes on to the TAP.
//!
//! Everything the guest sends is bounded: a request is at most
//! [`MAX_REQUEST`] bytes, an interface has at most
//! [`stack::MAX_CONNECTIONS`] connections and [`stack::MAX_QUEUED`] frames
//! waiting for the guest, and tokens are kept at most [`MAX_TOKENS`].

pub mod stack;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The V2 token path.
pub const PATH_TO_TOKEN: &str = "/latest/api/token";
/// Shortest token lifetime.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest token lifetime (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
/// Live tokens kept; the oldest go first beyond it.
pub const MAX_TOKENS: usize = 1024;
/// Largest request (request line, headers and body) a guest may send.
pub const MAX_REQUEST: usize = 4096;

const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// MMDS version: V1 (no session) or V2 (session tokens required).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MmdsVersion {
    /// Plain `GET`s.
    #[default]
    V1,
    /// `GET`s need a token from `PUT /latest/api/token`.
    V2,
}

/// Fills `buf` from the kernel's CSPRNG.
pub(crate) fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len - done` bytes into the
        // unfilled tail of `buf`.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr().cast::<libc::c_void>(),
                buf.len() - done,
                0,
            )
        };
        if n > 0 {
            done += n as usize;
        } else {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// One HTTP answer, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `application/json` or `text/plain`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Answer {
            status,
            content_type: "text/plain",
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// The full HTTP/1.1 response; the connection closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            _ => "Error",
        };
        let mut s = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: close\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.push_str(&self.body);
        s.into_bytes()
    }
}

/// Session tokens of MMDS V2: random, kept with their expiry.
#[derive(Debug, Default)]
struct Tokens {
    live: HashMap<String, Instant>,
}

impl Tokens {
    /// A new token, or `None` when no randomness can be had (never a
    /// predictable one).
    fn issue(&mut self, ttl: u32, now: Instant) -> Option<String> {
        self.live.retain(|_, exp| *exp > now);
        if self.live.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .live
                .iter()
                .min_by_key(|(_, exp)| **exp)
                .map(|(k, _)| k.clone())
            {
                self.live.remove(&oldest);
            }
        }
        let mut raw = [0u8; 32];
        if let Err(e) = random_bytes(&mut raw) {
            log::error!("mmds: cannot make a token: {e}");
            return None;
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.live
            .insert(token.clone(), now + Duration::from_secs(u64::from(ttl)));
        Some(token)
    }

    fn valid(&self, token: &str, now: Instant) -> bool {
        self.live.get(token).is_some_and(|exp| *exp > now)
    }
}

/// A parsed guest request.
#[derive(Debug)]
struct Request<'a> {
    method: &'a str,
    path: String,
    headers: Vec<(String, &'a str)>,
}

impl Request<'_> {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), *v))
    }
}

/// Why bytes are not (yet) a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// The request is complete: its length.
    Complete(usize),
    /// Not HTTP, or too large.
    Invalid,
}

/// Whether `buf` holds a complete request (headers, and a body of its
/// Content-Length).
pub fn request_complete(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let body = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            match n.checked_add(body) {
                Some(total) if total <= MAX_REQUEST => {
                    if buf.len() >= total {
                        Parse::Complete(total)
                    } else {
                        Parse::Partial
                    }
                }
                _ => Parse::Invalid,
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => Parse::Partial,
        _ => Parse::Invalid,
    }
}

/// Collapses repeated slashes, as Firecracker does before using a path as a
/// JSON pointer.
fn sanitize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// The IMDS text format: an object lists its keys (objects with a trailing
/// `/`), a string is itself; anything else is refused.
fn format_imds(v: &Value) -> Option<String> {
    match v {
        Value::Object(map) => Some(
            map.iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The metadata service: data, version and tokens, shared by the
/// interfaces that may reach it and by the API that fills it.
#[derive(Debug, Default)]
pub struct MmdsService {
    data: Value,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: Tokens,
    /// Requests answered (metrics).
    pub requests: u64,
}

/// The service, shared.
pub type SharedMmds = Arc<Mutex<MmdsService>>;

impl MmdsService {
    /// An empty V1 service.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the data (`PUT`/`PATCH /mmds` on the API).
    pub fn set_data(&mut self, data: Value) {
        self.data = data;
    }

    /// Sets the version and whether `Accept` is ignored (EC2 IMDS style).
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    /// Answers one complete request (see [`request_complete`]).
    pub fn respond(&mut self, raw: &[u8]) -> Answer {
        self.respond_at(raw, Instant::now())
    }

    fn respond_at(&mut self, raw: &[u8], now: Instant) -> Answer {
        self.requests += 1;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(raw), Ok(httparse::Status::Complete(_))) {
            return Answer::text(400, "Invalid request.");
        }
        let (Some(method), Some(target)) = (req.method, req.path) else {
            return Answer::text(400, "Invalid request.");
        };
        // An absolute URI (`GET http://169.254.169.254/x`) or a path.
        let path = match target.strip_prefix("http://") {
            Some(rest) => rest.find('/').map(|i| &rest[i..]).unwrap_or(""),
            None => target,
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        if path.is_empty() {
            return Answer::text(400, "Invalid URI.");
        }
        let request = Request {
            method,
            path: path.to_string(),
            headers: req
                .headers
                .iter()
                .filter_map(|h| {
                    Some((
                        h.name.to_ascii_lowercase(),
                        std::str::from_utf8(h.value).ok()?.trim(),
                    ))
                })
                .collect(),
        };
        match request.method {
            "GET" => self.get(&request, now),
            "PUT" => self.put(&request, now),
            _ => {
                let mut a = Answer::text(405, "Not allowed HTTP method.");
                a.headers.push(("Allow".into(), "GET, PUT".into()));
                a
            }
        }
    }

    fn get(&self, r: &Request, now: Instant) -> Answer {
        if self.version == MmdsVersion::V2 {
            match r.header(&TOKEN_HEADERS) {
                None => {
                    return Answer::text(
                        401,
                        "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header to specify the session token.",
                    )
                }
                Some((_, t)) if !self.tokens.valid(t, now) => {
                    return Answer::text(401, "MMDS token not valid.")
                }
                Some(_) => {}
            }
        }
        let pointer = sanitize(&r.path);
        let pointer = pointer.strip_suffix('/').unwrap_or(&pointer);
        let Some(value) = self.data.pointer(pointer).filter(|v| !v.is_null()) else {
            return Answer::text(404, format!("Resource not found: {}.", r.path));
        };
        let json = !self.imds_compat
            && r.header(&["accept"])
                .is_some_and(|(_, v)| v.contains("application/json"));
        if json {
            return Answer {
                status: 200,
                content_type: "application/json",
                body: value.to_string(),
                headers: Vec::new(),
            };
        }
        match format_imds(value) {
            Some(body) => Answer::text(200, body),
            None => Answer::text(
                501,
                "Cannot retrieve value. The value has an unsupported type.",
            ),
        }
    }

    fn put(&mut self, r: &Request, now: Instant) -> Answer {
        if r.header(&["x-forwarded-for"]).is_some() {
            return Answer::text(
                400,
                "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For",
            );
        }
        if sanitize(&r.path) != PATH_TO_TOKEN {
            return Answer::text(404, format!("Resource not found: {}.", r.path));
        }
        let Some((name, value)) = r.header(&TTL_HEADERS) else {
            return Answer::text(
                400,
                "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
            );
        };
        let Ok(ttl) = value.parse::<u32>() else {
            return Answer::text(
                400,
                format!("Invalid header. Reason: Invalid value. Key:{name}; Value:{value}"),
            );
        };
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
            return Answer::text(
                400,
                format!("Invalid time to live value provided for token: {ttl}. Please provide a value between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."),
            );
        }
        let Some(token) = self.tokens.issue(ttl, now) else {
            return Answer::text(500, "Cannot generate an MMDS token.");
        };
        let mut a = Answer::text(200, token);
        a.headers
            .push(("X-metadata-token-ttl-seconds".into(), ttl.to_string()));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(version: MmdsVersion) -> MmdsService {
        let mut s = MmdsService::new();
        s.configure(version, false);
        s.set_data(json!({
            "latest": {"meta-data": {"instance-id": "i-123", "ami-id": "ami-1", "n": 4,
                                     "net": {"mac": "06:00:00:00:00:01"}}}
        }));
        s
    }

    fn get(s: &mut MmdsService, path: &str, extra: &str) -> Answer {
        s.respond(format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}\r\n").as_bytes())
    }

    #[test]
    fn v1_get_in_imds_and_json_formats() {
        let mut s = service(MmdsVersion::V1);
        let a = get(&mut s, "/latest/meta-data/", "");
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "ami-id\ninstance-id\nn\nnet/");
        let a = get(
            &mut s,
            "http://169.254.169.254//latest//meta-data/instance-id",
            "",
        );
        assert_eq!((a.status, a.body.as_str()), (200, "i-123"));
        let a = get(
            &mut s,
            "/latest/meta-data/net",
            "Accept: application/json\r\n",
        );
        assert_eq!(a.content_type, "application/json");
        assert_eq!(a.body, r#"{"mac":"06:00:00:00:00:01"}"#);
        let a = get(&mut s, "/latest/meta-data/n", "");
        assert_eq!(a.status, 501);
        let a = get(&mut s, "/nope", "");
        assert_eq!(
            (a.status, a.body.as_str()),
            (404, "Resource not found: /nope.")
        );
        let a = s.respond(b"DELETE / HTTP/1.1\r\n\r\n");
        assert_eq!(a.status, 405);
        assert!(String::from_utf8(a.to_bytes())
            .unwrap()
            .contains("Allow: GET, PUT\r\n"));
    }

    #[test]
    fn v2_needs_a_live_token() {
        let mut s = service(MmdsVersion::V2);
        let now = Instant::now();
        assert_eq!(get(&mut s, "/latest", "").status, 401);
        let a = s.respond_at(
            b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
            now,
        );
        assert_eq!(a.status, 200);
        let token = a.body.clone();
        assert_eq!(token.len(), 64);
        let req = format!(
            "GET /latest/meta-data/instance-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n"
        );
        let a = s.respond_at(req.as_bytes(), now);
        assert_eq!((a.status, a.body.as_str()), (200, "i-123"));
        // Expired.
        let a = s.respond_at(req.as_bytes(), now + Duration::from_secs(61));
        assert_eq!((a.status, a.body.as_str()), (401, "MMDS token not valid."));
        // Bad TTLs, a missing TTL, X-Forwarded-For, another path.
        for (req, status) in [
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\n\r\n", 400),
            ("PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n", 400),
            ("PUT /latest HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n", 404),
        ] {
            assert_eq!(s.respond_at(req.as_bytes(), now).status, status, "{req}");
        }
    }

    #[test]
    fn tokens_are_bounded() {
        let mut t = Tokens::default();
        let now = Instant::now();
        for _ in 0..MAX_TOKENS + 10 {
            t.issue(60, now).unwrap();
        }
        assert_eq!(t.live.len(), MAX_TOKENS);
    }

    #[test]
    fn requests_are_complete_partial_or_invalid() {
        assert_eq!(request_complete(b"GET / HTTP/1.1\r\n"), Parse::Partial);
        assert_eq!(
            request_complete(b"GET / HTTP/1.1\r\n\r\n"),
            Parse::Complete(18)
        );
        assert_eq!(
            request_complete(b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"),
            Parse::Partial
        );
        assert_eq!(
            request_complete(b"PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"),
            Parse::Invalid
        );
        assert_eq!(request_complete(b"\x00\x01garbage\r\n\r\n"), Parse::Invalid);
        assert_eq!(
            request_complete(&vec![b'a'; MAX_REQUEST + 1]),
            Parse::Invalid
        );
    }
}
