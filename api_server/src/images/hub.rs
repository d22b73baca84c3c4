//! The UniK "hub": a client for an S3-compatible object store that holds
//! pushed images.
//!
//! # Layout on the hub
//!
//! * The hub URL names the S3 endpoint and, optionally, the bucket, in path
//!   style: `http://host:port/<bucket>`. A URL without a path uses the
//!   bucket [`DEFAULT_BUCKET`]. A longer path keeps all but its last segment
//!   as a prefix of the endpoint (`http://host/s3/<bucket>`), for stores
//!   behind a reverse proxy. Requests always use path-style URLs. Push
//!   creates the bucket (CreateBucket) when it does not exist yet.
//! * An image is one object, the artifact (the daemon uploads a tar.gz of
//!   the image directory), under the key `<user>/<image>/latest`, where
//!   `<user>` is the hub user (the S3 access key id).
//! * The Image JSON travels as object metadata, base64 encoded (HTTP header
//!   values must be ASCII), in `x-amz-meta-unik-image`. S3 limits the user
//!   metadata of an object to 2 KiB, so when the encoded JSON is longer than
//!   [`INLINE_METADATA_LIMIT`] bytes it is stored instead, as plain JSON, in
//!   a second object `<user>/<image>/latest.json`, and the artifact carries
//!   the pointer `x-amz-meta-unik-image-object: latest.json` (a name
//!   relative to `<user>/<image>/`). The sidecar is written before the
//!   artifact, so a pointer never dangles.
//! * Remote delete removes both objects. Unlike the original UniK daemon
//!   (whose remote-delete handler pushed by mistake) it really deletes, and
//!   it answers [`HubError::NotFound`] when the image is not on the hub.
//!
//! # Transfers
//!
//! Artifacts are streamed from and to files, never held in memory. Files of
//! up to [`DEFAULT_MULTIPART_THRESHOLD`] bytes are sent with one PUT; larger
//! ones with a multipart upload of [`DEFAULT_PART_SIZE`] parts (S3 refuses
//! single PUTs over 5 GiB). Pull writes to a temporary file beside `dest`
//! and renames it into place once the whole object and its Image JSON have
//! arrived, so a failed pull leaves no partial file.
//!
//! Requests are presigned with AWS Signature V4 (`rusty-s3`) in the query
//! string and sent with `ureq`. Every request has a connect timeout and
//! per-read / per-write inactivity timeouts; a stalled transfer fails, a
//! slow but progressing one does not. Redirects are not followed (a
//! presigned request cannot be redirected anyway); S3's "wrong region" 301
//! surfaces as [`HubError::Http`].
//!
//! Secrets never appear in logs, errors or `Debug` output: the secret key is
//! redacted and presigned query strings are stripped from error texts.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, UploadPart,
};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde_json::Value;
use ureq::http::Response;
use ureq::Body;
use url::Url;

/// The region used when the hub config names none.
pub const DEFAULT_REGION: &str = "us-east-1";
/// The bucket used when the hub URL has no path.
pub const DEFAULT_BUCKET: &str = "unik-hub";
/// Metadata name (after `x-amz-meta-`) of the base64 Image JSON.
pub const META_IMAGE: &str = "unik-image";
/// Metadata name (after `x-amz-meta-`) of the pointer to the sidecar object.
pub const META_IMAGE_OBJECT: &str = "unik-image-object";
/// Name of the sidecar object that holds a large Image JSON, relative to
/// `<user>/<image>/`.
pub const SIDECAR_NAME: &str = "latest.json";
/// Longest base64 Image JSON kept inline in the object metadata. S3 allows
/// 2 KiB of user metadata (names and values); this leaves room for the name.
pub const INLINE_METADATA_LIMIT: usize = 1900;
/// Artifacts of more bytes than this go up as multipart uploads.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 1 << 30;
/// Part size of multipart uploads (S3 wants at least 5 MiB, at most 10,000
/// parts: 64 MiB parts allow artifacts of up to 625 GiB).
pub const DEFAULT_PART_SIZE: u64 = 64 << 20;

/// How long a presigned URL stays valid. S3 checks it when the request
/// starts, so this bounds the time between signing and sending only.
const PRESIGN_TTL: Duration = Duration::from_secs(15 * 60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Inactivity limit of one read or write on the connection. It also covers
/// the wait for the answer after an upload, which S3 may spend on checks.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Limit on whole small requests (HEAD, DELETE, CreateBucket, ...).
const SMALL_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest error body or small XML/JSON answer read into memory.
const SMALL_BODY_LIMIT: u64 = 1 << 20;
/// Largest sidecar Image JSON accepted on pull.
const SIDECAR_LIMIT: u64 = 16 << 20;
/// Bytes of an error body kept in [`HubError::Http`].
const BODY_EXCERPT: usize = 512;
const S3_MIN_PART: u64 = 5 << 20;
const S3_MAX_PARTS: u64 = 10_000;

/// Errors of the hub client.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub config (JSON body or URL) is unusable.
    #[error("invalid hub config: {0}")]
    Config(String),
    /// A caller-supplied argument (image name, Image JSON, artifact) is unusable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The image (or its bucket) is not on the hub: S3 answered 404.
    #[error("not found on the hub: {0}")]
    NotFound(String),
    /// The hub refused the credentials or the access (S3 answered 401/403).
    #[error("hub refused access ({status} {code}): {message}")]
    Auth {
        status: u16,
        code: String,
        message: String,
    },
    /// Any other non-success answer; `body` is an excerpt of the answer.
    #[error("hub answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// The request did not complete (connection refused, timeout, ...).
    #[error("hub request failed: {0}")]
    Transport(String),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// What the hub holds or answered does not make sense.
    #[error("malformed hub data: {0}")]
    Malformed(String),
}

impl HubError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        HubError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Where and as whom to reach the hub. `user`/`pass` are the S3 access key
/// id and secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The S3 endpoint. [`HubConfig::new`] and [`HubConfig::from_json`]
    /// store it without the bucket segment; if `bucket` is empty,
    /// [`Hub::new`] takes the bucket from this URL's path.
    pub url: String,
    pub user: String,
    pub pass: String,
    /// Signing region; [`DEFAULT_REGION`] unless the config says otherwise.
    pub region: String,
    /// Bucket name; empty means "from the URL, else [`DEFAULT_BUCKET`]".
    pub bucket: String,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("pass", &"<redacted>")
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl HubConfig {
    /// A config from a hub URL (`http(s)://host[:port][/prefix][/bucket]`)
    /// and credentials, with the bucket split off the URL.
    pub fn new(url: &str, user: &str, pass: &str) -> Result<Self, HubError> {
        let (endpoint, bucket) = split_url(url)?;
        let cfg = HubConfig {
            url: endpoint.to_string(),
            user: user.to_string(),
            pass: pass.to_string(),
            region: DEFAULT_REGION.to_string(),
            bucket: bucket.unwrap_or_else(|| DEFAULT_BUCKET.to_string()),
        };
        validate_user(&cfg.user)?;
        Ok(cfg)
    }

    /// Parses the hub JSON of the UniK API: `{url, user, pass}` or
    /// `{URL, Username, Password}`, key names case-insensitive. Optional
    /// `region` and `bucket` keys override the defaults (an explicit
    /// `bucket` wins over the URL's path, which then stays a prefix).
    pub fn from_json(v: &Value) -> Result<Self, HubError> {
        let obj = v
            .as_object()
            .ok_or_else(|| HubError::Config("the hub config must be a JSON object".into()))?;
        let mut url = None;
        let mut user = None;
        let mut pass = None;
        let mut region = None;
        let mut bucket = None;
        for (k, val) in obj {
            let slot = match k.to_ascii_lowercase().as_str() {
                "url" => &mut url,
                "user" | "username" => &mut user,
                "pass" | "password" => &mut pass,
                "region" => &mut region,
                "bucket" => &mut bucket,
                _ => continue,
            };
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                _ => {
                    return Err(HubError::Config(format!(
                        "hub config key {k:?} must be a string"
                    )))
                }
            };
            if slot.is_some() {
                return Err(HubError::Config(format!(
                    "hub config names {k:?} more than once"
                )));
            }
            *slot = Some(s);
        }
        let url = url.ok_or_else(|| HubError::Config("hub config lacks \"url\"".into()))?;
        let user = user.ok_or_else(|| HubError::Config("hub config lacks \"user\"".into()))?;
        let pass = pass.ok_or_else(|| HubError::Config("hub config lacks \"pass\"".into()))?;
        let mut cfg = match bucket {
            Some(b) if !b.is_empty() => {
                let endpoint = parse_endpoint(&url)?;
                validate_user(&user)?;
                HubConfig {
                    url: endpoint.to_string(),
                    user,
                    pass,
                    region: DEFAULT_REGION.to_string(),
                    bucket: b,
                }
            }
            _ => HubConfig::new(&url, &user, &pass)?,
        };
        if let Some(r) = region.filter(|r| !r.is_empty()) {
            cfg.region = r;
        }
        Ok(cfg)
    }
}

/// Parses and checks a hub URL: http or https, a host, no credentials.
fn parse_endpoint(raw: &str) -> Result<Url, HubError> {
    let url = Url::parse(raw.trim())
        // The text is not echoed: it may carry a password typed into it.
        .map_err(|e| HubError::Config(format!("hub url is not a URL: {e}")))?;
    match url.scheme() {
        "http" | "https" => {}
        s => {
            return Err(HubError::Config(format!(
                "hub url scheme must be http or https, not {s:?}"
            )))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(HubError::Config("hub url has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(HubError::Config(
            "hub url must not carry credentials; give them as user/pass".into(),
        ));
    }
    Ok(url)
}

/// Splits `scheme://host[:port][/prefix...][/bucket]` into the endpoint
/// (with the prefix) and the bucket (the last path segment, if any).
fn split_url(raw: &str) -> Result<(Url, Option<String>), HubError> {
    let mut url = parse_endpoint(raw)?;
    url.set_query(None);
    url.set_fragment(None);
    let segments: Vec<String> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let Some((bucket, prefix)) = segments.split_last() else {
        url.set_path("/");
        return Ok((url, None));
    };
    let bucket = percent_decode(bucket)?;
    let mut path = String::from("/");
    for seg in prefix {
        path.push_str(seg);
        path.push('/');
    }
    url.set_path(&path);
    Ok((url, Some(bucket)))
}

fn percent_decode(s: &str) -> Result<String, HubError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| HubError::Config("hub url bucket is not UTF-8".into()))
}

/// A name used as one segment of an object key.
fn validate_segment(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > 255 {
        return Err(format!("{what} is longer than 255 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} {name:?} is not allowed"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(format!(
            "{what} {name:?} contains a slash, backslash or control character"
        ));
    }
    Ok(())
}

fn validate_user(user: &str) -> Result<(), HubError> {
    validate_segment("hub user", user).map_err(HubError::Config)
}

fn validate_image_name(name: &str) -> Result<(), HubError> {
    validate_segment("image name", name).map_err(HubError::Invalid)
}

/// A client for one hub (endpoint, bucket, credentials). Blocking: call it
/// from worker threads.
pub struct Hub {
    bucket: Bucket,
    credentials: Credentials,
    user: String,
    agent: ureq::Agent,
    multipart_threshold: u64,
    part_size: u64,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("bucket_url", &self.bucket.base_url().as_str())
            .field("user", &self.user)
            .field("region", &self.bucket.region())
            .finish_non_exhaustive()
    }
}

/// Which form the Image JSON took on the hub.
enum ImageMeta {
    Inline(String),
    Sidecar,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Result<Self, HubError> {
        validate_user(&cfg.user)?;
        let (endpoint, bucket) = if cfg.bucket.is_empty() {
            let (e, b) = split_url(&cfg.url)?;
            (e, b.unwrap_or_else(|| DEFAULT_BUCKET.to_string()))
        } else {
            (parse_endpoint(&cfg.url)?, cfg.bucket.clone())
        };
        if bucket.is_empty() || bucket.contains('/') {
            return Err(HubError::Config(format!("bad bucket name {bucket:?}")));
        }
        let region = if cfg.region.is_empty() {
            DEFAULT_REGION.to_string()
        } else {
            cfg.region.clone()
        };
        let loopback = match endpoint.host() {
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a).is_loopback(),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a).is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        let bucket = Bucket::new(endpoint, UrlStyle::Path, bucket, region)
            .map_err(|e| HubError::Config(format!("bad hub endpoint or bucket: {e:?}")))?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_resolve(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(IO_TIMEOUT))
            .timeout_per_write(Some(IO_TIMEOUT))
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .user_agent(concat!("emberd/", env!("CARGO_PKG_VERSION")));
        if loopback {
            // A proxy from the environment cannot reach our loopback.
            config = config.proxy(None);
        }
        Ok(Hub {
            bucket,
            credentials: Credentials::new(cfg.user.clone(), cfg.pass.clone()),
            user: cfg.user,
            agent: config.build().new_agent(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
        })
    }

    /// Changes when and how multipart uploads happen: files of more than
    /// `threshold` bytes go up in parts of `part_size` bytes (at least 5 MiB,
    /// S3's minimum).
    pub fn with_multipart(mut self, threshold: u64, part_size: u64) -> Result<Self, HubError> {
        if part_size < S3_MIN_PART {
            return Err(HubError::Config(format!(
                "multipart part size {part_size} is below S3's minimum of {S3_MIN_PART}"
            )));
        }
        self.multipart_threshold = threshold;
        self.part_size = part_size;
        Ok(self)
    }

    /// The bucket's name.
    pub fn bucket_name(&self) -> &str {
        self.bucket.name()
    }

    /// The object key of an image's artifact: `<user>/<image>/latest`.
    pub fn object_key(&self, image_name: &str) -> Result<String, HubError> {
        validate_image_name(image_name)?;
        Ok(format!("{}/{}/latest", self.user, image_name))
    }

    fn sidecar_key(&self, image_name: &str) -> String {
        format!("{}/{}/{}", self.user, image_name, SIDECAR_NAME)
    }

    /// Uploads the artifact file under `<user>/<image>/latest`, with the
    /// Image JSON in its metadata (or in the sidecar object if too large).
    /// Creates the bucket if it is missing. Replaces an earlier push.
    pub fn push(
        &self,
        image_name: &str,
        image_json: &str,
        artifact: &Path,
    ) -> Result<(), HubError> {
        let key = self.object_key(image_name)?;
        serde_json::from_str::<Value>(image_json)
            .map_err(|e| HubError::Invalid(format!("the Image JSON does not parse: {e}")))?;
        let file = File::open(artifact)
            .map_err(|e| HubError::io(format!("opening artifact {}", artifact.display()), e))?;
        let meta = file
            .metadata()
            .map_err(|e| HubError::io(format!("reading artifact {}", artifact.display()), e))?;
        if !meta.is_file() {
            return Err(HubError::Invalid(format!(
                "artifact {} is not a regular file",
                artifact.display()
            )));
        }
        let len = meta.len();

        self.ensure_bucket()?;

        let encoded = base64_encode(image_json.as_bytes());
        let metadata: (String, String) = if encoded.len() <= INLINE_METADATA_LIMIT {
            (format!("x-amz-meta-{META_IMAGE}"), encoded)
        } else {
            let sidecar = self.sidecar_key(image_name);
            let mut action = self.bucket.put_object(Some(&self.credentials), &sidecar);
            let url = action_url(&mut action, &[]);
            let resp = self
                .agent
                .put(url.as_str())
                .header("content-type", "application/json")
                .send(image_json.as_bytes())
                .map_err(|e| transport("PUT", &url, e))?;
            self.check(resp, &format!("image JSON object {sidecar}"))?;
            (
                format!("x-amz-meta-{META_IMAGE_OBJECT}"),
                SIDECAR_NAME.to_string(),
            )
        };
        let headers = [(metadata.0.as_str(), metadata.1.as_str())];

        if len > self.multipart_threshold {
            self.put_multipart(&key, file, len, &headers)
        } else {
            let mut action = self.bucket.put_object(Some(&self.credentials), &key);
            let url = action_url(&mut action, &headers);
            let mut req = self
                .agent
                .put(url.as_str())
                .header("content-type", "application/octet-stream");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = req.send(file).map_err(|e| transport("PUT", &url, e))?;
            self.check(resp, &format!("image {image_name}"))?;
            log::info!(
                "hub: pushed {image_name} ({len} bytes) to {}/{key}",
                self.bucket.name()
            );
            Ok(())
        }
    }

    /// Downloads the artifact to `dest` (replacing it) and returns the
    /// Image JSON.
    pub fn pull(&self, image_name: &str, dest: &Path) -> Result<String, HubError> {
        let key = self.object_key(image_name)?;
        let mut action = self.bucket.get_object(Some(&self.credentials), &key);
        let url = action_url(&mut action, &[]);
        let resp = self
            .agent
            .get(url.as_str())
            .call()
            .map_err(|e| transport("GET", &url, e))?;
        let resp = self.check(resp, &format!("image {image_name}"))?;
        let image_meta = image_meta_from(&resp)?;
        let expected_len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());

        let tmp = temp_path(dest)?;
        let result = (|| {
            let mut out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| HubError::io(format!("creating {}", tmp.display()), e))?;
            let mut reader = resp.into_body().into_reader();
            let copied = copy_stream(&mut reader, &mut out)
                .map_err(|e| HubError::Transport(format!("downloading {key}: {e}")))?;
            if let Some(n) = expected_len {
                if n != copied {
                    return Err(HubError::Transport(format!(
                        "downloading {key}: got {copied} of {n} bytes"
                    )));
                }
            }
            out.sync_all()
                .map_err(|e| HubError::io(format!("syncing {}", tmp.display()), e))?;
            let json = match image_meta {
                ImageMeta::Inline(j) => j,
                ImageMeta::Sidecar => self.get_sidecar(image_name)?,
            };
            serde_json::from_str::<Value>(&json).map_err(|e| {
                HubError::Malformed(format!(
                    "the Image JSON of {image_name} does not parse: {e}"
                ))
            })?;
            fs::rename(&tmp, dest).map_err(|e| {
                HubError::io(format!("moving the artifact to {}", dest.display()), e)
            })?;
            log::info!(
                "hub: pulled {image_name} ({copied} bytes) from {}/{key}",
                self.bucket.name()
            );
            Ok(json)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Deletes the image (artifact and sidecar) from the hub; NotFound if it
    /// is not there.
    pub fn remote_delete(&self, image_name: &str) -> Result<(), HubError> {
        let key = self.object_key(image_name)?;
        if !self.exists(image_name)? {
            return Err(HubError::NotFound(format!(
                "image {image_name} ({}/{key})",
                self.bucket.name()
            )));
        }
        self.delete_key(&key)?;
        match self.delete_key(&self.sidecar_key(image_name)) {
            Ok(()) | Err(HubError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        log::info!(
            "hub: deleted {image_name} from {}/{key}",
            self.bucket.name()
        );
        Ok(())
    }

    /// Whether the image is on the hub (a missing bucket counts as "no").
    pub fn exists(&self, image_name: &str) -> Result<bool, HubError> {
        let key = self.object_key(image_name)?;
        let mut action = self.bucket.head_object(Some(&self.credentials), &key);
        let url = action_url(&mut action, &[]);
        let resp = self
            .small_call(self.agent.head(url.as_str()))
            .map_err(|e| transport("HEAD", &url, e))?;
        match self.check(resp, &format!("image {image_name}")) {
            Ok(_) => Ok(true),
            Err(HubError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn small_call(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> Result<Response<Body>, ureq::Error> {
        req.config()
            .timeout_global(Some(SMALL_CALL_TIMEOUT))
            .build()
            .call()
    }

    fn delete_key(&self, key: &str) -> Result<(), HubError> {
        let mut action = self.bucket.delete_object(Some(&self.credentials), key);
        let url = action_url(&mut action, &[]);
        let resp = self
            .small_call(self.agent.delete(url.as_str()))
            .map_err(|e| transport("DELETE", &url, e))?;
        self.check(resp, key).map(|_| ())
    }

    fn get_sidecar(&self, image_name: &str) -> Result<String, HubError> {
        let key = self.sidecar_key(image_name);
        let mut action = self.bucket.get_object(Some(&self.credentials), &key);
        let url = action_url(&mut action, &[]);
        let resp = self
            .small_call(self.agent.get(url.as_str()))
            .map_err(|e| transport("GET", &url, e))?;
        let resp = self.check(resp, &format!("image JSON object {key}"))?;
        resp.into_body()
            .into_with_config()
            .limit(SIDECAR_LIMIT)
            .read_to_string()
            .map_err(|e| HubError::Transport(format!("reading {key}: {e}")))
    }

    /// Creates the bucket unless it exists.
    fn ensure_bucket(&self) -> Result<(), HubError> {
        let action = self.bucket.head_bucket(Some(&self.credentials));
        let url = action.sign(PRESIGN_TTL);
        let resp = self
            .small_call(self.agent.head(url.as_str()))
            .map_err(|e| transport("HEAD", &url, e))?;
        let what = format!("bucket {}", self.bucket.name());
        match self.check(resp, &what) {
            Ok(_) => return Ok(()),
            Err(HubError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let action = self.bucket.create_bucket(&self.credentials);
        let url = action.sign(PRESIGN_TTL);
        let body = action.body();
        let resp = self
            .agent
            .put(url.as_str())
            .config()
            .timeout_global(Some(SMALL_CALL_TIMEOUT))
            .build()
            .send(body.as_bytes())
            .map_err(|e| transport("PUT", &url, e))?;
        match self.check(resp, &what) {
            Ok(_) => {
                log::info!("hub: created bucket {}", self.bucket.name());
                Ok(())
            }
            // Someone (maybe us, concurrently) created it meanwhile.
            Err(HubError::Http { status: 409, body })
                if body.contains("BucketAlreadyOwnedByYou") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn put_multipart(
        &self,
        key: &str,
        mut file: File,
        len: u64,
        headers: &[(&str, &str)],
    ) -> Result<(), HubError> {
        let mut part_size = self.part_size;
        if len.div_ceil(part_size) > S3_MAX_PARTS {
            part_size = len.div_ceil(S3_MAX_PARTS);
        }
        let mut action = CreateMultipartUpload::new(&self.bucket, Some(&self.credentials), key);
        let url = action_url(&mut action, headers);
        let mut req = self
            .agent
            .post(url.as_str())
            .header("content-type", "application/octet-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send_empty().map_err(|e| transport("POST", &url, e))?;
        let resp = self.check(resp, key)?;
        let body = read_small(resp)?;
        let created = CreateMultipartUpload::parse_response(&body)
            .map_err(|e| HubError::Malformed(format!("CreateMultipartUpload answer: {e}")))?;
        let upload_id = created.upload_id().to_string();

        let result = (|| {
            let mut etags = Vec::new();
            let mut offset = 0u64;
            let mut part_number: u16 = 1;
            while offset < len {
                let n = part_size.min(len - offset);
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| HubError::io("seeking in the artifact", e))?;
                let mut action = UploadPart::new(
                    &self.bucket,
                    Some(&self.credentials),
                    key,
                    part_number,
                    &upload_id,
                );
                let url = action_url(&mut action, &[]);
                let mut part = (&file).take(n);
                let resp = self
                    .agent
                    .put(url.as_str())
                    .header("content-length", n)
                    .send(ureq::SendBody::from_reader(&mut part))
                    .map_err(|e| transport("PUT", &url, e))?;
                let resp = self.check(resp, &format!("{key} part {part_number}"))?;
                let etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        HubError::Malformed(format!("no ETag for {key} part {part_number}"))
                    })?
                    .to_string();
                etags.push(etag);
                offset += n;
                part_number = part_number
                    .checked_add(1)
                    .ok_or_else(|| HubError::Invalid(format!("{key}: too many parts")))?;
            }
            let action = CompleteMultipartUpload::new(
                &self.bucket,
                Some(&self.credentials),
                key,
                &upload_id,
                etags.iter().map(String::as_str),
            );
            let url = action.sign(PRESIGN_TTL);
            let body = action.body();
            let resp = self
                .agent
                .post(url.as_str())
                .send(body.as_bytes())
                .map_err(|e| transport("POST", &url, e))?;
            let resp = self.check(resp, key)?;
            // S3 may answer 200 with an error document in the body.
            let text = read_small(resp)?;
            if text.contains("<Error>") {
                return Err(HubError::Http {
                    status: 200,
                    body: excerpt(&text),
                });
            }
            log::info!(
                "hub: pushed {key} ({len} bytes, {} parts) to {}",
                etags.len(),
                self.bucket.name()
            );
            Ok(())
        })();
        if result.is_err() {
            let action =
                AbortMultipartUpload::new(&self.bucket, Some(&self.credentials), key, &upload_id);
            let url = action.sign(PRESIGN_TTL);
            if let Err(e) = self.small_call(self.agent.delete(url.as_str())) {
                log::warn!(
                    "hub: aborting the multipart upload of {key}: {}",
                    scrub(&e.to_string(), &url)
                );
            }
        }
        result
    }

    /// Passes 2xx answers through and turns the others into errors.
    fn check(&self, mut resp: Response<Body>, what: &str) -> Result<Response<Body>, HubError> {
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(SMALL_BODY_LIMIT)
            .read_to_string()
            .unwrap_or_default();
        let code = xml_tag(&body, "Code").unwrap_or_default();
        let message = xml_tag(&body, "Message").unwrap_or_default();
        Err(match status {
            404 => {
                let detail = if code.is_empty() {
                    what.to_string()
                } else {
                    format!("{what} ({code})")
                };
                HubError::NotFound(detail)
            }
            401 | 403 => HubError::Auth {
                status,
                code: if code.is_empty() {
                    "AccessDenied".into()
                } else {
                    code
                },
                message: if message.is_empty() {
                    format!("access to {what} denied")
                } else {
                    message
                },
            },
            _ => HubError::Http {
                status,
                body: excerpt(&body),
            },
        })
    }
}

/// Signs `action` with `headers` among the signed headers.
fn action_url<'a, A: S3Action<'a>>(action: &mut A, headers: &[(&'a str, &'a str)]) -> Url {
    for (k, v) in headers {
        action.headers_mut().insert(*k, *v);
    }
    action.sign(PRESIGN_TTL)
}

/// A transport error, with the presigned query string kept out.
fn transport(method: &str, url: &Url, e: ureq::Error) -> HubError {
    let mut shown = url.clone();
    shown.set_query(None);
    HubError::Transport(format!("{method} {shown}: {}", scrub(&e.to_string(), url)))
}

/// Removes a presigned URL's query string from a message.
fn scrub(msg: &str, url: &Url) -> String {
    match url.query() {
        Some(q) if !q.is_empty() => msg.replace(q, "<signature>"),
        _ => msg.to_string(),
    }
}

fn excerpt(body: &str) -> String {
    let body = body.trim();
    if body.len() <= BODY_EXCERPT {
        return body.to_string();
    }
    let mut end = BODY_EXCERPT;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &body[..end])
}

fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    Some(body[start..start + len].trim().to_string())
}

fn read_small(resp: Response<Body>) -> Result<String, HubError> {
    resp.into_body()
        .into_with_config()
        .limit(SMALL_BODY_LIMIT)
        .read_to_string()
        .map_err(|e| HubError::Transport(format!("reading the hub's answer: {e}")))
}

fn image_meta_from(resp: &Response<Body>) -> Result<ImageMeta, HubError> {
    let headers = resp.headers();
    if let Some(v) = headers.get(format!("x-amz-meta-{META_IMAGE}").as_str()) {
        let text = v
            .to_str()
            .map_err(|_| HubError::Malformed("unik-image metadata is not ASCII".into()))?;
        let raw = base64_decode(text.trim())
            .ok_or_else(|| HubError::Malformed("unik-image metadata is not base64".into()))?;
        let json = String::from_utf8(raw)
            .map_err(|_| HubError::Malformed("unik-image metadata is not UTF-8".into()))?;
        return Ok(ImageMeta::Inline(json));
    }
    if let Some(v) = headers.get(format!("x-amz-meta-{META_IMAGE_OBJECT}").as_str()) {
        if v.to_str().ok().map(str::trim) == Some(SIDECAR_NAME) {
            return Ok(ImageMeta::Sidecar);
        }
        return Err(HubError::Malformed(
            "unik-image-object metadata names an unknown object".into(),
        ));
    }
    Err(HubError::Malformed(
        "the hub object carries no Image JSON (no unik-image metadata)".into(),
    ))
}

/// A fresh temporary path beside `dest`.
fn temp_path(dest: &Path) -> Result<PathBuf, HubError> {
    let name = dest.file_name().ok_or_else(|| {
        HubError::Invalid(format!(
            "pull destination {} has no file name",
            dest.display()
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    // Unique per process and call, so concurrent pulls never share it.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    tmp_name.push(format!(".part-{}-{seq}", std::process::id()));
    Ok(dest.with_file_name(tmp_name))
}

/// `io::copy` with a 1 MiB buffer (fewer syscalls on large artifacts).
fn copy_stream(r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Standard alphabet, no padding: [`base64_decode`] strips the (optional)
/// padding itself. Unused low bits of the last symbol are ignored.
const B64_UNPADDED: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, data)
}

/// Decodes standard base64 (padding optional); None if malformed.
///
/// Up to two trailing `=` are accepted and ignored whatever the length (so
/// `Zg=` and `Zm9v==` decode too), as the hand-written decoder this replaces
/// did; the `base64` crate's padding modes are stricter.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let t = text.trim_end_matches('=');
    if text.len() - t.len() > 2 {
        return None;
    }
    base64::Engine::decode(&B64_UNPADDED, t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_round_trip() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
        assert!(base64_decode("Zg===").is_none());
    }

    #[test]
    fn config_lowercase_keys() {
        let c = HubConfig::from_json(
            &json!({"url": "http://127.0.0.1:9000", "user": "alice", "pass": "s3cret"}),
        )
        .unwrap();
        assert_eq!(c.url, "http://127.0.0.1:9000/");
        assert_eq!(c.user, "alice");
        assert_eq!(c.pass, "s3cret");
        assert_eq!(c.region, DEFAULT_REGION);
        assert_eq!(c.bucket, DEFAULT_BUCKET);
    }

    #[test]
    fn config_original_keys_any_case() {
        let c = HubConfig::from_json(
            &json!({"URL": "https://hub.example/images", "Username": "bob", "Password": "pw", "REGION": "eu-west-1"}),
        )
        .unwrap();
        assert_eq!(c.url, "https://hub.example/");
        assert_eq!(c.bucket, "images");
        assert_eq!(c.user, "bob");
        assert_eq!(c.pass, "pw");
        assert_eq!(c.region, "eu-west-1");
        let c =
            HubConfig::from_json(&json!({"uRl": "http://h:1/", "USER": "u", "PaSs": "p"})).unwrap();
        assert_eq!((c.user.as_str(), c.pass.as_str()), ("u", "p"));
    }

    #[test]
    fn config_prefix_and_explicit_bucket() {
        let c = HubConfig::new("http://h:1/s3/proxy/bkt/", "u", "p").unwrap();
        assert_eq!(c.url, "http://h:1/s3/proxy/");
        assert_eq!(c.bucket, "bkt");
        let c = HubConfig::from_json(
            &json!({"url": "http://h:1/s3", "user": "u", "pass": "p", "bucket": "b"}),
        )
        .unwrap();
        assert_eq!(c.url, "http://h:1/s3");
        assert_eq!(c.bucket, "b");
        let hub = Hub::new(c).unwrap();
        assert_eq!(hub.bucket.base_url().as_str(), "http://h:1/s3/b/");
    }

    #[test]
    fn config_errors() {
        let bad = [
            json!([]),
            json!({"user": "u", "pass": "p"}),
            json!({"url": "http://h", "pass": "p"}),
            json!({"url": "http://h", "user": "u"}),
            json!({"url": "ftp://h", "user": "u", "pass": "p"}),
            json!({"url": "h:9000", "user": "u", "pass": "p"}),
            json!({"url": "http://x:y@h", "user": "u", "pass": "p"}),
            json!({"url": "http://h", "user": "a/b", "pass": "p"}),
            json!({"url": "http://h", "user": "", "pass": "p"}),
            json!({"url": 5, "user": "u", "pass": "p"}),
            json!({"url": "http://h", "user": "u", "Username": "v", "pass": "p"}),
        ];
        for b in bad {
            assert!(
                matches!(HubConfig::from_json(&b), Err(HubError::Config(_))),
                "accepted {b}"
            );
        }
    }

    #[test]
    fn debug_redacts_secret() {
        let c = HubConfig::new("http://h", "u", "topsecret").unwrap();
        assert!(!format!("{c:?}").contains("topsecret"));
        let hub = Hub::new(c).unwrap();
        assert!(!format!("{hub:?}").contains("topsecret"));
    }

    #[test]
    fn keys_and_names() {
        let hub = Hub::new(HubConfig::new("http://127.0.0.1:1", "alice", "p").unwrap()).unwrap();
        assert_eq!(hub.bucket_name(), DEFAULT_BUCKET);
        assert_eq!(hub.object_key("img").unwrap(), "alice/img/latest");
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb"] {
            assert!(
                matches!(hub.object_key(bad), Err(HubError::Invalid(_))),
                "{bad:?}"
            );
        }
        // A config built by hand with the bucket still in the URL.
        let hub = Hub::new(HubConfig {
            url: "http://127.0.0.1:1/mybucket".into(),
            user: "u".into(),
            pass: "p".into(),
            region: String::new(),
            bucket: String::new(),
        })
        .unwrap();
        assert_eq!(hub.bucket_name(), "mybucket");
        assert_eq!(hub.bucket.region(), DEFAULT_REGION);
    }

    #[test]
    fn error_parsing_helpers() {
        let body =
            "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        assert_eq!(xml_tag(body, "Code").unwrap(), "NoSuchKey");
        assert_eq!(xml_tag(body, "Message").unwrap(), "gone");
        assert!(xml_tag(body, "Nope").is_none());
        let long = "é".repeat(BODY_EXCERPT);
        assert!(excerpt(&long).len() <= BODY_EXCERPT + 3);
        let url = Url::parse("http://h/b/k?X-Amz-Signature=abc&X-Amz-Credential=u").unwrap();
        let s = scrub(
            "failed http://h/b/k?X-Amz-Signature=abc&X-Amz-Credential=u",
            &url,
        );
        assert!(!s.contains("abc"));
    }

    #[test]
    fn temp_path_is_beside_dest() {
        let t = temp_path(Path::new("/var/lib/x/img.tar.gz")).unwrap();
        assert_eq!(t.parent(), Some(Path::new("/var/lib/x")));
        assert!(t
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".img.tar.gz.part-"));
        assert_ne!(t, temp_path(Path::new("/var/lib/x/img.tar.gz")).unwrap());
        assert!(temp_path(Path::new("/")).is_err());
    }

    #[test]
    fn multipart_part_size_floor() {
        let hub = Hub::new(HubConfig::new("http://127.0.0.1:1", "u", "p").unwrap()).unwrap();
        assert!(hub.with_multipart(1, 1024).is_err());
    }
}
