//! `multipart/form-data` and `application/x-www-form-urlencoded` bodies, as
//! UniK's clients send them (files in the `tarfile` field, parameters as
//! form fields or in the query string).

/// Errors parsing a form body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    #[error("multipart body without a boundary in Content-Type")]
    NoBoundary,
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    #[error("too many form parts (at most {0})")]
    TooManyParts(usize),
}

use std::ops::{Deref, Range};

use ember_http::RequestBody;

/// A part's bytes: a range of the request body, shared and never copied
/// (a large upload is a read-only map of its spool file, so its bytes stay
/// in the page cache, not in emberd's memory). Cheap to clone and to hand
/// to a worker thread.
#[derive(Clone)]
pub struct PartData {
    body: RequestBody,
    range: Range<usize>,
}

impl PartData {
    fn owned(v: Vec<u8>) -> PartData {
        let range = 0..v.len();
        PartData {
            body: v.into(),
            range,
        }
    }
}

impl Deref for PartData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.body[self.range.clone()]
    }
}

impl AsRef<[u8]> for PartData {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for PartData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartData({} bytes)", self.range.len())
    }
}

impl PartialEq for PartData {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PartData {}

impl PartialEq<Vec<u8>> for PartData {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

/// One form field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: PartData,
}

/// A parsed form: its parts in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Form {
    pub parts: Vec<Part>,
}

impl Form {
    /// The first part named `name`.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// A text field's value.
    pub fn text(&self, name: &str) -> Option<String> {
        self.part(name)
            .map(|p| String::from_utf8_lossy(&p.data).trim().to_string())
    }
}

const MAX_PARTS: usize = 64;

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

fn header_param(value: &str, key: &str) -> Option<String> {
    for piece in value.split(';').skip(1) {
        let (k, v) = piece.split_once('=')?;
        if k.trim().eq_ignore_ascii_case(key) {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .unwrap_or(v);
            return Some(v.to_string());
        }
    }
    None
}

/// The boundary parameter of a multipart Content-Type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let main = content_type.split(';').next()?.trim();
    if !main.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    header_param(content_type, "boundary").filter(|b| !b.is_empty() && b.len() <= 200)
}

/// Parses a multipart body; the parts are ranges of it.
pub fn parse_multipart(req_body: &RequestBody, boundary: &str) -> Result<Form, FormError> {
    let body: &[u8] = req_body;
    let delim = format!("--{boundary}").into_bytes();
    let mut pos = find(body, &delim, 0).ok_or(FormError::Malformed("no opening boundary"))?;
    let mut form = Form::default();
    loop {
        pos += delim.len();
        if body[pos..].starts_with(b"--") {
            return Ok(form);
        }
        // Skip the line break after the boundary.
        if body[pos..].starts_with(b"\r\n") {
            pos += 2;
        } else if body[pos..].starts_with(b"\n") {
            pos += 1;
        } else {
            return Err(FormError::Malformed("junk after a boundary"));
        }
        let head_end =
            find(body, b"\r\n\r\n", pos).ok_or(FormError::Malformed("part without headers end"))?;
        let head = String::from_utf8_lossy(&body[pos..head_end]).to_string();
        let data_start = head_end + 4;
        let mut next_delim = b"\r\n".to_vec();
        next_delim.extend_from_slice(&delim);
        let data_end =
            find(body, &next_delim, data_start).ok_or(FormError::Malformed("unterminated part"))?;
        let mut name = None;
        let mut filename = None;
        let mut content_type = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                name = header_param(v, "name");
                filename = header_param(v, "filename");
            } else if k.trim().eq_ignore_ascii_case("content-type") {
                content_type = Some(v.trim().to_string());
            }
        }
        let name = name.ok_or(FormError::Malformed("part without a name"))?;
        if form.parts.len() >= MAX_PARTS {
            return Err(FormError::TooManyParts(MAX_PARTS));
        }
        form.parts.push(Part {
            name,
            filename,
            content_type,
            data: PartData {
                body: req_body.clone(),
                range: data_start..data_end,
            },
        });
        pos = data_end + 2;
    }
}

/// Parses an urlencoded body.
pub fn parse_urlencoded(body: &[u8]) -> Form {
    Form {
        parts: url::form_urlencoded::parse(body)
            .take(MAX_PARTS)
            .map(|(k, v)| Part {
                name: k.into_owned(),
                filename: None,
                content_type: None,
                data: PartData::owned(v.into_owned().into_bytes()),
            })
            .collect(),
    }
}

/// Parses a form body of either kind (an empty or other body is an empty form).
pub fn parse_form(content_type: Option<&str>, body: &RequestBody) -> Result<Form, FormError> {
    match content_type {
        Some(ct) if ct.to_ascii_lowercase().starts_with("multipart/form-data") => {
            let b = boundary(ct).ok_or(FormError::NoBoundary)?;
            parse_multipart(body, &b)
        }
        Some(ct)
            if ct
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded") =>
        {
            Ok(parse_urlencoded(body))
        }
        _ => Ok(Form::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rb(b: &[u8]) -> RequestBody {
        b.into()
    }

    fn body(b: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"preamble\r\n");
        for (name, file, data) in parts {
            v.extend_from_slice(format!("--{b}\r\n").as_bytes());
            match file {
                Some(f) => v.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                ),
                None => v.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        v
    }

    #[test]
    fn parses_fields_and_binary_files() {
        let bin: Vec<u8> = (0..=255u8)
            .chain(b"\r\n--not-it\r\n".iter().copied())
            .collect();
        let b = body(
            "XyZ",
            &[
                ("provider", None, b"ember"),
                ("tarfile", Some("app.tar.gz"), &bin),
            ],
        );
        let ct = "multipart/form-data; boundary=XyZ";
        let f = parse_form(Some(ct), &rb(&b)).unwrap();
        assert_eq!(f.text("provider").as_deref(), Some("ember"));
        let t = f.part("tarfile").unwrap();
        assert_eq!(t.filename.as_deref(), Some("app.tar.gz"));
        assert_eq!(t.data, bin);
    }

    #[test]
    fn quoted_boundary_and_curl_shape() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert!(boundary("text/plain; boundary=x").is_none());
        let b = body("------------------------abc123", &[("size", None, b"10")]);
        let f = parse_multipart(&rb(&b), "------------------------abc123").unwrap();
        assert_eq!(f.text("size").as_deref(), Some("10"));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(parse_multipart(&rb(b"nothing here"), "x").is_err());
        assert!(parse_multipart(
            &rb(b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated"),
            "x"
        )
        .is_err());
        assert_eq!(
            parse_form(Some("multipart/form-data"), &rb(b"")),
            Err(FormError::NoBoundary)
        );
        let many: Vec<(&str, Option<&str>, &[u8])> =
            (0..70).map(|_| ("a", None, &b"1"[..])).collect();
        assert_eq!(
            parse_multipart(&rb(&body("q", &many)), "q"),
            Err(FormError::TooManyParts(MAX_PARTS))
        );
    }

    #[test]
    fn urlencoded() {
        let f = parse_form(
            Some("application/x-www-form-urlencoded"),
            &rb(b"a=1&b=x+y%21"),
        )
        .unwrap();
        assert_eq!(f.text("b").as_deref(), Some("x y!"));
        assert_eq!(parse_form(None, &rb(b"zzz")).unwrap(), Form::default());
    }
}
