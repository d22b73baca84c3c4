//! Images from OCI registries (the distribution API): pull into a
//! content-addressed blob cache, push from a stored OCI layout.
//!
//! The wire work is `oci-client` (async, on tokio + reqwest with rustls and
//! the system's roots). Every call here is blocking: it runs a
//! current-thread tokio runtime of its own, so callers are emberd's worker
//! threads, never its HTTP loop.
//!
//! ## References
//!
//! Docker's rules: `busybox` is `docker.io/library/busybox:latest`, a first
//! component with a `.` or `:` (or `localhost`) is a registry host,
//! `name@sha256:<hex>` pins a manifest. [`is_reference`] tells a reference
//! from a host path (which starts with `/`).
//!
//! ## Transport and auth
//!
//! HTTPS with the system roots. Plain HTTP only for loopback registries
//! (`127.0.0.0/8`, `::1`, `localhost`) and the hosts given to
//! `--insecure-registry` (host or host:port), as Docker does. Auth follows
//! the registry's `WWW-Authenticate` challenge: anonymous, a bearer token
//! from the challenge's realm, or HTTP basic; credentials come from
//! hyperd's `POST /auth` store (`auth.json`, keyed by server address; the
//! scheme and path of the key are ignored, `index.docker.io` and
//! `docker.io` are one server). A fresh client is made for every pull or
//! push, so tokens never outlive it.
//!
//! ## Pulling ([`Registry::pull`])
//!
//! Manifests: OCI and Docker schema 2 manifests, OCI indexes and Docker
//! manifest lists (linux/amd64 is taken). Layers: tar, gzip or zstd.
//! Every blob is fetched into `<cache>/blobs/sha256/<hex>` through a temp
//! file in `<cache>/tmp` that is renamed into place only once its length
//! and sha256 matched the descriptor; a blob that is there already is not
//! fetched again (shared by all images). Sizes are bounded: manifests and
//! configs 16 MiB, at most [`MAX_LAYERS`] layers, a layer blob and all of
//! them together the archive limit's byte budget
//! ([`ExtractLimits::max_bytes`]), checked on the manifest before anything
//! is fetched and while each blob streams. A manifest fetched by digest
//! must hash to it. On any failure the temp file goes and no blob, layout
//! or image is left. The result ([`Pulled`]) is a private OCI layout in a
//! scratch directory (blobs hard-linked from the cache), which
//! [`crate::images::oci::open_with`] opens and verifies once more like any
//! other layout; the caller imports it and drops it.
//!
//! Known limits: `oci-client` reads a manifest body whole before ember can
//! check its size (the limit is applied after, and a read timeout bounds
//! the time); the network fetch runs in emberd's process, not in a sandbox
//! job (those have no network); the bytes it writes are only hashed there,
//! never parsed but as bounded JSON, and layers are unpacked in the
//! sandbox as always.
//!
//! ## Pushing ([`Registry::push_layout`])
//!
//! The image `ref_name` of an OCI layout (a stored hyperd image): each
//! blob the registry does not have yet is streamed from its file, then the
//! manifest is put under the target tag; the registry's digest must be the
//! manifest's.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::images::archive::ExtractLimits;
use crate::images::oci::{
    ANNOTATION_REF_NAME, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
};

/// Largest manifest or config accepted, in bytes.
pub const MAX_JSON: u64 = 16 << 20;
/// How long a registry may stay silent (connect, or between reads).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Index nesting accepted.
const MAX_DEPTH: u32 = 2;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference is not a valid image reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The registry host name does not resolve.
    #[error("unknown registry host {0}")]
    UnknownHost(String),
    /// The registry cannot be reached or went away mid-transfer.
    #[error("registry {registry} is unavailable: {reason}")]
    Unavailable { registry: String, reason: String },
    /// The registry refused the credentials (or anonymous access).
    #[error("unauthorized: registry {registry} refused access to {repository}: {reason}")]
    Unauthorized {
        registry: String,
        repository: String,
        reason: String,
    },
    /// No such manifest (tag, digest or repository).
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// A blob or manifest did not hash to its digest.
    #[error("digest mismatch: {what} should be {expected} but is {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A blob or manifest is over its limit.
    #[error("{what} is too large: {size} bytes (limit {limit})")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The registry sent something that is not a usable image.
    #[error("invalid image from the registry: {0}")]
    BadImage(String),
    /// An index without a linux/amd64 image.
    #[error("no linux/amd64 image in {reference} (platforms: {platforms:?})")]
    NoPlatform {
        reference: String,
        platforms: Vec<String>,
    },
    /// Anything else the registry answered.
    #[error("registry {registry}: {reason}")]
    Protocol { registry: String, reason: String },
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What kind of failure a [`RegistryError`] is, for status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// The caller's input (400).
    Invalid,
    /// Nothing by that name (404).
    NotFound,
    /// Access refused (401).
    Unauthorized,
    /// The registry failed or sent bad data (502).
    BadGateway,
    /// Host-side failure (500).
    Internal,
}

impl RegistryError {
    /// The class of the error.
    pub fn kind(&self) -> RegistryErrorKind {
        use RegistryError::*;
        match self {
            BadReference { .. } | UnknownHost(_) | NoPlatform { .. } | TooLarge { .. } => {
                RegistryErrorKind::Invalid
            }
            ManifestUnknown(_) => RegistryErrorKind::NotFound,
            Unauthorized { .. } => RegistryErrorKind::Unauthorized,
            Unavailable { .. } | DigestMismatch { .. } | BadImage(_) | Protocol { .. } => {
                RegistryErrorKind::BadGateway
            }
            Io { .. } => RegistryErrorKind::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Registry text in an error: one line, bounded.
fn short(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    s.trim().to_string()
}

/// True for an image reference, false for a host path (absolute or `./`).
pub fn is_reference(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('/') && !s.starts_with('.')
}

/// Parses `s` with Docker's defaults.
pub fn parse_reference(s: &str) -> Result<Reference> {
    let bad = |reason: String| RegistryError::BadReference {
        reference: short(s),
        reason,
    };
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("empty, too long, or holds spaces".into()));
    }
    let r = Reference::from_str(s).map_err(|e| bad(e.to_string()))?;
    if r.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("repository names are lower case".into()));
    }
    Ok(r)
}

/// The familiar name of a reference: `busybox:latest`,
/// `127.0.0.1:5000/team/app:1`, `app@sha256:...` (Docker's short form).
pub fn familiar_name(r: &Reference) -> String {
    let repo = if r.registry() == "docker.io" {
        r.repository()
            .strip_prefix("library/")
            .unwrap_or(r.repository())
            .to_string()
    } else {
        format!("{}/{}", r.registry(), r.repository())
    };
    match (r.tag(), r.digest()) {
        (Some(t), _) => format!("{repo}:{t}"),
        (None, Some(d)) => format!("{repo}@{d}"),
        (None, None) => format!("{repo}:latest"),
    }
}

/// Whether `registry` (`host[:port]`) is on loopback.
fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                registry
            }
        })
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `auth.json` keys as Docker writes them (`https://index.docker.io/v1/`,
/// `registry:5000`) reduced to `host[:port]`.
fn server_key(s: &str) -> String {
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// Credentials given with one request (hyperd's `X-Registry-Auth`); they
/// win over the stored ones. Never logged or echoed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password (or token used as one).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

impl Credentials {
    /// Decodes Docker's `X-Registry-Auth` header: base64url (padded or
    /// not) of an AuthConfig JSON, `{username, password}` or `{auth:
    /// base64("user:pass")}`. Anything unreadable or without a user is
    /// `None` (anonymous), as hyperd and Docker treated it for pulls.
    pub fn from_header(h: &str) -> Option<Credentials> {
        use base64::Engine;
        let h = h.trim();
        if h.is_empty() || h.len() > 16 * 1024 {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(h)
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h.trim_end_matches('='))
            })
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(h))
            .ok()?;
        let v: Value = serde_json::from_slice(&raw).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (mut username, mut password) = (s("username"), s("password"));
        if username.is_empty() {
            let auth = base64::engine::general_purpose::STANDARD
                .decode(s("auth"))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())?;
            let (u, p) = auth.split_once(':')?;
            username = u.to_string();
            password = p.to_string();
        }
        (!username.is_empty()).then_some(Credentials { username, password })
    }
}

/// Settings of a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The blob cache (`blobs/sha256/`, `tmp/`), created 0700.
    pub cache_dir: PathBuf,
    /// hyperd's credential file (`{server: {username, password}}`).
    pub auth_file: Option<PathBuf>,
    /// Hosts (`host` or `host:port`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Limits; a layer blob may be at most `max_bytes`.
    pub limits: ExtractLimits,
}

/// A registry client with its cache; see the module documentation.
#[derive(Debug, Clone)]
pub struct Registry {
    cfg: RegistryConfig,
}

/// One line of pull or push progress, in hyperd's (Docker's) JSON shape.
pub type Progress<'a> = &'a mut dyn FnMut(Value);

/// A pulled image: a private OCI layout, removed on drop.
#[derive(Debug)]
pub struct Pulled {
    dir: PathBuf,
    /// The familiar name (`repo:tag` or `repo@digest`).
    pub name: String,
    /// The manifest's digest in the registry.
    pub digest: String,
    /// Blobs fetched from the registry.
    pub fetched: u32,
    /// Blobs found in the cache.
    pub cached: u32,
    /// Bytes fetched.
    pub bytes: u64,
}

impl Pulled {
    /// The OCI layout (its one image is named [`Pulled::name`]).
    pub fn layout(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pulled {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A descriptor as far as the cache needs it.
struct Blob {
    digest: String,
    size: u64,
}

fn hex_of(digest: &str) -> Result<&str> {
    let h = digest.strip_prefix("sha256:").unwrap_or("");
    if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(h)
    } else {
        Err(RegistryError::BadImage(format!(
            "unsupported digest {:?} (sha256 only)",
            short(digest)
        )))
    }
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn short_id(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(io_err(p))?;
    // Whatever the umask made of it.
    fs::set_permissions(p, fs::Permissions::from_mode(0o700)).map_err(io_err(p))
}

/// Removes a temp file unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

impl Registry {
    /// A client with `cfg`; the cache directory is made when first used.
    pub fn new(cfg: RegistryConfig) -> Registry {
        Registry { cfg }
    }

    /// The settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .cfg
            .cache_dir
            .join("blobs")
            .join("sha256")
            .join(hex_of(digest)?))
    }

    fn credentials(&self, r: &Reference, given: Option<&Credentials>) -> RegistryAuth {
        if let Some(c) = given {
            return RegistryAuth::Basic(c.username.clone(), c.password.clone());
        }
        let Some(path) = &self.cfg.auth_file else {
            return RegistryAuth::Anonymous;
        };
        let all: BTreeMap<String, Value> = fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let want = server_key(r.registry());
        for (server, entry) in all {
            if server_key(&server) != want {
                continue;
            }
            let s = |k: &str| {
                entry
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            if !s("username").is_empty() {
                return RegistryAuth::Basic(s("username"), s("password"));
            }
        }
        RegistryAuth::Anonymous
    }

    /// Whether `r`'s registry is spoken to over plain HTTP: loopback, or
    /// named (host or host:port) with `--insecure-registry`.
    fn plain_http(&self, r: &Reference) -> bool {
        let reg = r.resolve_registry();
        is_loopback(reg)
            || self
                .cfg
                .insecure
                .iter()
                .any(|h| h == reg || h == r.registry() || reg.split(':').next() == Some(h))
    }

    fn client(&self, r: &Reference) -> Client {
        let reg = r.resolve_registry().to_string();
        let plain = self.plain_http(r);
        let cfg = ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![reg])
            } else {
                ClientProtocol::Https
            },
            read_timeout: Some(READ_TIMEOUT),
            connect_timeout: Some(Duration::from_secs(30)),
            platform_resolver: None,
            user_agent: concat!("emberd/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        Client::new(cfg)
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err(Path::new("tokio runtime")))
    }

    /// Maps `oci-client`'s errors for the image `r`.
    fn map_err(r: &Reference, what: &str, e: OciDistributionError) -> RegistryError {
        let registry = r.registry().to_string();
        let unauthorized = |reason: String| RegistryError::Unauthorized {
            registry: registry.clone(),
            repository: r.repository().to_string(),
            reason: short(&reason),
        };
        match e {
            OciDistributionError::AuthenticationFailure(m) => unauthorized(m),
            OciDistributionError::UnauthorizedError { .. } => {
                unauthorized("authentication required or credentials refused".into())
            }
            OciDistributionError::ImageManifestNotFoundError(m) => {
                RegistryError::ManifestUnknown(format!("{}: {}", familiar_name(r), short(&m)))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let msg = envelope
                    .errors
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    RegistryError::ManifestUnknown(format!("{} ({what})", familiar_name(r)))
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(msg)
                } else {
                    RegistryError::Protocol {
                        registry,
                        reason: format!("{what}: {}", short(&msg)),
                    }
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 | 403 => unauthorized(message),
                404 => RegistryError::ManifestUnknown(format!("{} ({what})", familiar_name(r))),
                _ => RegistryError::Protocol {
                    registry,
                    reason: format!("{what}: HTTP {code}: {}", short(&message)),
                },
            },
            OciDistributionError::DigestError(d) => RegistryError::DigestMismatch {
                what: what.to_string(),
                expected: "its digest".into(),
                actual: short(&d.to_string()),
            },
            OciDistributionError::RequestError(e) => Self::map_reqwest(r, what, &e),
            OciDistributionError::IoError(e) => RegistryError::Unavailable {
                registry,
                reason: format!("{what}: {}", short(&e.to_string())),
            },
            other => RegistryError::Protocol {
                registry,
                reason: format!("{what}: {}", short(&other.to_string())),
            },
        }
    }

    fn map_reqwest(r: &Reference, what: &str, e: &dyn std::error::Error) -> RegistryError {
        let mut chain = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        let lower = chain.to_ascii_lowercase();
        if lower.contains("dns error") || lower.contains("failed to lookup address") {
            RegistryError::UnknownHost(r.registry().to_string())
        } else {
            RegistryError::Unavailable {
                registry: r.registry().to_string(),
                reason: format!("{what}: {}", short(&chain)),
            }
        }
    }

    /// Pulls `reference` into the cache and returns it as an OCI layout in
    /// a new private directory below `scratch_parent`. `progress` gets
    /// Docker-style JSON lines.
    pub fn pull(
        &self,
        reference: &str,
        scratch_parent: &Path,
        creds: Option<&Credentials>,
        progress: Progress<'_>,
    ) -> Result<Pulled> {
        let r = parse_reference(reference)?;
        let name = familiar_name(&r);
        for d in [
            self.cfg.cache_dir.join("blobs").join("sha256"),
            self.cfg.cache_dir.join("tmp"),
        ] {
            mkdir_private(&d)?;
        }
        mkdir_private(scratch_parent)?;
        let started = Instant::now();
        let auth = self.credentials(&r, creds);
        let client = self.client(&r);
        let rt = Self::runtime()?;
        progress(json!({"status": format!("Pulling from {}", r.repository()),
            "id": r.tag().or(r.digest()).unwrap_or("latest")}));
        let (manifest_bytes, manifest_digest, media_type) =
            rt.block_on(self.resolve(&client, &auth, &r, 0))?;
        let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            RegistryError::BadImage(format!(
                "manifest {manifest_digest}: {}",
                short(&e.to_string())
            ))
        })?;
        check_sizes(&manifest, &self.cfg.limits)?;
        let mut blobs = vec![&manifest.config];
        blobs.extend(manifest.layers.iter());
        let (mut fetched, mut cached, mut bytes) = (0u32, 0u32, 0u64);
        for (i, d) in blobs.iter().enumerate() {
            let is_config = i == 0;
            let limit = if is_config {
                MAX_JSON
            } else {
                self.cfg.limits.max_bytes
            };
            let what = if is_config { "config" } else { "layer" };
            let blob = Blob {
                digest: d.digest.clone(),
                size: u64::try_from(d.size).map_err(|_| {
                    RegistryError::BadImage(format!("{what} {} has a negative size", d.digest))
                })?,
            };
            if !is_config {
                check_layer_type(&d.media_type, &d.digest)?;
            }
            if blob.size > limit {
                return Err(RegistryError::TooLarge {
                    what: format!("{what} {}", d.digest),
                    size: blob.size,
                    limit,
                });
            }
            let id = short_id(&blob.digest);
            if self.have(&blob)? {
                cached += 1;
                if !is_config {
                    progress(json!({"status": "Already exists", "id": id}));
                }
                continue;
            }
            if !is_config {
                progress(json!({"status": "Pulling fs layer", "id": id}));
            }
            let n = rt.block_on(self.fetch_blob(&client, &r, d, &blob, what))?;
            fetched += 1;
            bytes += n;
            if !is_config {
                progress(json!({"status": "Downloading", "id": id,
                    "progressDetail": {"current": n, "total": blob.size},
                    "progress": format!("{n}/{} bytes", blob.size)}));
                progress(json!({"status": "Download complete", "id": id}));
            }
        }
        let dir =
            crate::sandbox::mkdtemp(scratch_parent, "pull").map_err(io_err(scratch_parent))?;
        let pulled = Pulled {
            dir,
            name: name.clone(),
            digest: manifest_digest.clone(),
            fetched,
            cached,
            bytes,
        };
        self.write_layout(&pulled, &manifest_bytes, &media_type, &blobs)?;
        progress(json!({"status": format!("Digest: {manifest_digest}")}));
        progress(json!({"status": format!(
            "Status: Downloaded {name} ({fetched} blobs fetched, {bytes} bytes; {cached} from the cache) in {} ms",
            started.elapsed().as_millis())}));
        log::info!(
            "registry: pulled {name} ({manifest_digest}): {fetched} blobs fetched ({bytes} bytes), {cached} cached, {} ms",
            started.elapsed().as_millis()
        );
        Ok(pulled)
    }

    /// The image manifest of `r` (indexes resolved to linux/amd64): bytes,
    /// digest, media type.
    async fn resolve(
        &self,
        client: &Client,
        auth: &RegistryAuth,
        r: &Reference,
        depth: u32,
    ) -> Result<(Vec<u8>, String, String)> {
        const ACCEPT: &[&str] = &[
            MEDIA_OCI_MANIFEST,
            MEDIA_DOCKER_MANIFEST,
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_LIST,
        ];
        let (body, digest) = client
            .pull_manifest_raw(r, auth, ACCEPT)
            .await
            .map_err(|e| Self::map_err(r, "manifest", e))?;
        if body.len() as u64 > MAX_JSON {
            return Err(RegistryError::TooLarge {
                what: format!("manifest of {}", familiar_name(r)),
                size: body.len() as u64,
                limit: MAX_JSON,
            });
        }
        let actual = sha256(&body);
        if let Some(want) = r.digest() {
            if want != actual {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest of {}", familiar_name(r)),
                    expected: want.to_string(),
                    actual,
                });
            }
        }
        let _ = digest;
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::BadImage(format!(
                "manifest of {}: {}",
                familiar_name(r),
                short(&e.to_string())
            ))
        })?;
        let media_type = v
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let is_index = media_type == MEDIA_OCI_INDEX
            || media_type == MEDIA_DOCKER_LIST
            || (v.get("manifests").is_some() && v.get("config").is_none());
        if !is_index {
            if v.get("schemaVersion").and_then(Value::as_i64) != Some(2) {
                return Err(RegistryError::BadImage(format!(
                    "manifest of {} is not schema 2 (Docker schema 1 is not supported)",
                    familiar_name(r)
                )));
            }
            let mt = if media_type.is_empty() {
                MEDIA_OCI_MANIFEST.to_string()
            } else {
                media_type
            };
            return Ok((body.to_vec(), actual, mt));
        }
        if depth >= MAX_DEPTH {
            return Err(RegistryError::BadImage("indexes nested too deeply".into()));
        }
        let list = v
            .get("manifests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let plat = |m: &Value, k: &str| {
            m.pointer(&format!("/platform/{k}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let pick = list
            .iter()
            .find(|m| plat(m, "os") == "linux" && plat(m, "architecture") == "amd64")
            .or_else(|| match list.as_slice() {
                [only] if only.get("platform").is_none() => Some(only),
                _ => None,
            });
        let Some(pick) = pick else {
            return Err(RegistryError::NoPlatform {
                reference: familiar_name(r),
                platforms: list
                    .iter()
                    .map(|m| format!("{}/{}", plat(m, "os"), plat(m, "architecture")))
                    .collect(),
            });
        };
        let d = pick
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        hex_of(&d)?;
        let child = r.clone_with_digest(d);
        Box::pin(self.resolve(client, auth, &child, depth + 1)).await
    }

    /// Whether the cache holds `b`: a regular file of its size and
    /// digest. A damaged entry is removed (and fetched again).
    fn have(&self, b: &Blob) -> Result<bool> {
        let p = self.blob_path(&b.digest)?;
        if !fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() == b.size) {
            return Ok(false);
        }
        let mut f = File::open(&p).map_err(io_err(&p))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&p)(e)),
            };
            h.update(buf.get(..n).unwrap_or(&[]));
        }
        let hex: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        if format!("sha256:{hex}") == b.digest {
            return Ok(true);
        }
        log::warn!("registry cache: {} is damaged; fetching it again", b.digest);
        fs::remove_file(&p).map_err(io_err(&p))?;
        Ok(false)
    }

    /// Removes temp files an earlier emberd left in the cache (call once at
    /// start, before any pull).
    pub fn clean_tmp(&self) {
        if let Ok(rd) = fs::read_dir(self.cfg.cache_dir.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Streams blob `d` into the cache; returns its length.
    async fn fetch_blob(
        &self,
        client: &Client,
        r: &Reference,
        d: &OciDescriptor,
        b: &Blob,
        what: &str,
    ) -> Result<u64> {
        let final_path = self.blob_path(&b.digest)?;
        let tmp_dir = self.cfg.cache_dir.join("tmp");
        let tmp_path = tmp_dir.join(format!(
            "{}.{}.{}",
            hex_of(&b.digest)?,
            std::process::id(),
            ulid::Ulid::new()
        ));
        let mut guard = TempFile(Some(tmp_path.clone()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp_path)
            .map_err(io_err(&tmp_path))?;
        let label = format!("{what} {}", b.digest);
        let stream = client
            .pull_blob_stream(r, d)
            .await
            .map_err(|e| Self::map_err(r, &label, e))?;
        if let Some(len) = stream.content_length {
            if len != b.size {
                return Err(RegistryError::BadImage(format!(
                    "{label}: the registry announces {len} bytes, the manifest {}",
                    b.size
                )));
            }
        }
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        let mut s = stream.stream;
        while let Some(chunk) = s.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // oci-client's own digest check ends the stream with
                    // an error too: report a mismatch by our own count.
                    let msg = e.to_string();
                    if msg.to_ascii_lowercase().contains("digest") {
                        return Err(RegistryError::DigestMismatch {
                            what: label,
                            expected: b.digest.clone(),
                            actual: "different bytes".into(),
                        });
                    }
                    return Err(Self::map_reqwest(r, &label, &e));
                }
            };
            n += chunk.len() as u64;
            if n > b.size {
                return Err(RegistryError::BadImage(format!(
                    "{label}: the registry sends more than the {} bytes of its descriptor",
                    b.size
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).map_err(io_err(&tmp_path))?;
        }
        if n != b.size {
            return Err(RegistryError::Unavailable {
                registry: r.registry().to_string(),
                reason: format!("{label}: the transfer ended after {n} of {} bytes", b.size),
            });
        }
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        let actual = format!("sha256:{hex}");
        if actual != b.digest {
            return Err(RegistryError::DigestMismatch {
                what: label,
                expected: b.digest.clone(),
                actual,
            });
        }
        f.sync_all().map_err(io_err(&tmp_path))?;
        drop(f);
        fs::rename(&tmp_path, &final_path).map_err(io_err(&final_path))?;
        guard.0 = None;
        Ok(n)
    }

    /// Writes the pulled image's layout: `oci-layout`, `index.json`, the
    /// manifest, and the cached blobs linked (or copied) in.
    fn write_layout(
        &self,
        p: &Pulled,
        manifest: &[u8],
        media_type: &str,
        blobs: &[&OciDescriptor],
    ) -> Result<()> {
        let dir = p.layout();
        let bdir = dir.join("blobs").join("sha256");
        mkdir_private(&bdir)?;
        let write = |path: &Path, data: &[u8]| -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io_err(path))?;
            f.write_all(data).map_err(io_err(path))
        };
        write(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        write(&bdir.join(hex_of(&p.digest)?), manifest)?;
        for d in blobs {
            let src = self.blob_path(&d.digest)?;
            let dst = bdir.join(hex_of(&d.digest)?);
            if dst.exists() {
                continue; // the same blob twice (e.g. an empty layer)
            }
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst).map_err(io_err(&dst))?;
            }
        }
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{
                "mediaType": media_type,
                "digest": p.digest,
                "size": manifest.len(),
                "annotations": {ANNOTATION_REF_NAME: p.name},
            }],
        });
        write(&dir.join("index.json"), index.to_string().as_bytes())
    }

    /// Pushes the image named `ref_name` in the OCI layout `layout` to
    /// `target`; returns the manifest digest. `progress` gets JSON lines.
    pub fn push_layout(
        &self,
        layout: &Path,
        ref_name: &str,
        target: &str,
        creds: Option<&Credentials>,
        progress: Progress<'_>,
    ) -> Result<String> {
        let r = parse_reference(target)?;
        if r.digest().is_some() {
            return Err(RegistryError::BadReference {
                reference: short(target),
                reason: "push to a tag, not a digest".into(),
            });
        }
        let (manifest, media_type) = read_layout_manifest(layout, ref_name)?;
        let m: OciImageManifest = serde_json::from_slice(&manifest)
            .map_err(|e| RegistryError::BadImage(format!("stored manifest: {e}")))?;
        let auth = self.credentials(&r, creds);
        let client = self.client(&r);
        let rt = Self::runtime()?;
        progress(
            json!({"status": format!("The push refers to repository [{}/{}]", r.registry(), r.repository())}),
        );
        rt.block_on(async {
            client
                .auth(&r, &auth, oci_client::RegistryOperation::Push)
                .await
                .map_err(|e| Self::map_err(&r, "auth", e))?;
            let mut blobs = vec![&m.config];
            blobs.extend(m.layers.iter());
            for d in blobs {
                let id = short_id(&d.digest);
                let path = layout.join("blobs").join("sha256").join(hex_of(&d.digest)?);
                if client
                    .blob_exists(&r, &d.digest)
                    .await
                    .map_err(|e| Self::map_err(&r, "blob check", e))?
                {
                    progress(json!({"status": "Layer already exists", "id": id}));
                    continue;
                }
                let f = File::open(&path).map_err(io_err(&path))?;
                let size = f.metadata().map_err(io_err(&path))?.len();
                let stream = futures_util::stream::unfold(f, |mut f| async move {
                    let mut buf = vec![0u8; 1 << 20];
                    match f.read(&mut buf) {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok(bytes::Bytes::from(buf)), f))
                        }
                        Err(e) => Some((Err(OciDistributionError::IoError(e)), f)),
                    }
                });
                client
                    .push_blob_stream(&r, stream, &d.digest, Some(size))
                    .await
                    .map_err(|e| Self::map_err(&r, &format!("blob {}", d.digest), e))?;
                progress(json!({"status": "Pushed", "id": id,
                    "progressDetail": {"current": size, "total": size}}));
            }
            let hv = reqwest_header(&media_type)?;
            client
                .push_manifest_raw(&r, manifest.clone(), hv)
                .await
                .map_err(|e| Self::map_err(&r, "manifest", e))?;
            Ok::<(), RegistryError>(())
        })?;
        let digest = sha256(&manifest);
        progress(json!({"status": format!("{}: digest: {digest} size: {}",
            r.tag().unwrap_or("latest"), manifest.len())}));
        Ok(digest)
    }
}

fn reqwest_header(media_type: &str) -> Result<http_types::HeaderValue> {
    http_types::HeaderValue::from_str(media_type)
        .map_err(|_| RegistryError::BadImage(format!("media type {:?}", short(media_type))))
}

/// Most layers an image may have (Docker's overlay limit is 127).
pub const MAX_LAYERS: usize = 256;

/// Checks a manifest's declared sizes before anything is fetched: the
/// config at most [`MAX_JSON`], at most [`MAX_LAYERS`] layers, each layer
/// and all of them together at most the byte budget of `limits`.
fn check_sizes(m: &OciImageManifest, limits: &ExtractLimits) -> Result<()> {
    let size = |d: &OciDescriptor| u64::try_from(d.size).unwrap_or(u64::MAX);
    if size(&m.config) > MAX_JSON {
        return Err(RegistryError::TooLarge {
            what: format!("config {}", m.config.digest),
            size: size(&m.config),
            limit: MAX_JSON,
        });
    }
    if m.layers.len() > MAX_LAYERS {
        return Err(RegistryError::BadImage(format!(
            "{} layers (at most {MAX_LAYERS})",
            m.layers.len()
        )));
    }
    let mut total = 0u64;
    for d in &m.layers {
        total = total.saturating_add(size(d));
        if size(d) > limits.max_bytes {
            return Err(RegistryError::TooLarge {
                what: format!("layer {}", d.digest),
                size: size(d),
                limit: limits.max_bytes,
            });
        }
    }
    if total > limits.max_bytes {
        return Err(RegistryError::TooLarge {
            what: "the image's layers".into(),
            size: total,
            limit: limits.max_bytes,
        });
    }
    Ok(())
}

/// Layer media types this module pulls: tar, gzip and zstd of OCI and
/// Docker; foreign layers and others are refused before any fetch.
fn check_layer_type(m: &str, digest: &str) -> Result<()> {
    let ok = m.starts_with("application/vnd.oci.image.layer.v1.tar")
        || m.starts_with("application/vnd.docker.image.rootfs.diff.tar");
    if ok && !m.contains("nondistributable") && !m.contains("foreign") {
        Ok(())
    } else {
        Err(RegistryError::BadImage(format!(
            "layer {digest} has media type {:?}, which is not an image layer ember can apply",
            short(m)
        )))
    }
}

/// The manifest (bytes, media type) named `ref_name` in `layout`.
fn read_layout_manifest(layout: &Path, ref_name: &str) -> Result<(Vec<u8>, String)> {
    let read = |p: &Path| -> Result<Vec<u8>> {
        let f = File::open(p).map_err(io_err(p))?;
        let mut b = Vec::new();
        f.take(MAX_JSON + 1)
            .read_to_end(&mut b)
            .map_err(io_err(p))?;
        if b.len() as u64 > MAX_JSON {
            return Err(RegistryError::TooLarge {
                what: p.display().to_string(),
                size: b.len() as u64,
                limit: MAX_JSON,
            });
        }
        Ok(b)
    };
    let index: Value = serde_json::from_slice(&read(&layout.join("index.json"))?)
        .map_err(|e| RegistryError::BadImage(format!("stored index.json: {e}")))?;
    let d = index
        .get("manifests")
        .and_then(Value::as_array)
        .and_then(|l| {
            l.iter().find(|d| {
                d.pointer(&format!(
                    "/annotations/{}",
                    ANNOTATION_REF_NAME.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                    == Some(ref_name)
            })
        })
        .ok_or_else(|| RegistryError::BadImage(format!("no image {ref_name:?} in the layout")))?;
    let digest = d.get("digest").and_then(Value::as_str).unwrap_or("");
    let media_type = d
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or(MEDIA_OCI_MANIFEST)
        .to_string();
    let bytes = read(&layout.join("blobs").join("sha256").join(hex_of(digest)?))?;
    if sha256(&bytes) != digest {
        return Err(RegistryError::DigestMismatch {
            what: "stored manifest".into(),
            expected: digest.to_string(),
            actual: sha256(&bytes),
        });
    }
    Ok((bytes, media_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_paths() {
        assert!(is_reference("busybox"));
        assert!(is_reference("127.0.0.1:5000/a/b:1"));
        assert!(!is_reference("/srv/import/img"));
        assert!(!is_reference("./img"));
        assert!(!is_reference(""));
        let r = parse_reference("busybox").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/busybox");
        assert_eq!(familiar_name(&r), "busybox:latest");
        let r = parse_reference("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(familiar_name(&r), "127.0.0.1:5000/team/app:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("registry.internal:5000/team/app@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(
            familiar_name(&r),
            format!("registry.internal:5000/team/app@{d}")
        );
        for bad in ["a b", "UPPER/case", "x:", "a@sha256:zz"] {
            assert!(
                matches!(
                    parse_reference(bad),
                    Err(RegistryError::BadReference { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn loopback_and_server_keys() {
        for l in [
            "127.0.0.1:5000",
            "localhost:5000",
            "[::1]:5000",
            "127.1.2.3",
            "localhost",
        ] {
            assert!(is_loopback(l), "{l}");
        }
        for n in [
            "10.0.0.1:5000",
            "registry.internal:5000",
            "ghcr.io",
            "docker.io",
        ] {
            assert!(!is_loopback(n), "{n}");
        }
        assert_eq!(server_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(server_key("docker.io"), "docker.io");
        assert_eq!(server_key("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(
            server_key("Registry.Internal:5000/v2/"),
            "registry.internal:5000"
        );
    }

    #[test]
    fn declared_sizes_are_bounded_before_any_fetch() {
        let desc = |size: i64| OciDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size,
            ..Default::default()
        };
        let limits = ExtractLimits {
            max_entries: 10,
            max_bytes: 1000,
        };
        let m = |config: i64, layers: Vec<i64>| OciImageManifest {
            config: desc(config),
            layers: layers.into_iter().map(desc).collect(),
            ..Default::default()
        };
        assert!(check_sizes(&m(10, vec![500, 500]), &limits).is_ok());
        for (bad, what) in [
            (m(10, vec![1001]), "layer"),
            (m(10, vec![600, 600]), "the image's layers"),
            (m(MAX_JSON as i64 + 1, vec![]), "config"),
            (m(10, vec![-1]), "layer"),
        ] {
            let e = check_sizes(&bad, &limits).unwrap_err();
            assert!(matches!(e, RegistryError::TooLarge { .. }), "{e}");
            assert!(e.to_string().contains(what), "{e}");
            assert_eq!(e.kind(), RegistryErrorKind::Invalid);
        }
        let many = m(10, vec![1; MAX_LAYERS + 1]);
        assert!(check_sizes(&many, &limits).is_err());
    }

    #[test]
    fn layer_types() {
        let d = "sha256:x";
        for ok in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ] {
            assert!(check_layer_type(ok, d).is_ok(), "{ok}");
        }
        for bad in [
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/octet-stream",
        ] {
            assert!(check_layer_type(bad, d).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_only_for_loopback_and_insecure_registries() {
        let reg = Registry::new(RegistryConfig {
            cache_dir: PathBuf::from("/nonexistent"),
            auth_file: None,
            insecure: vec!["registry.internal:5000".into(), "lab.example".into()],
            limits: ExtractLimits::default(),
        });
        let plain = |s: &str| reg.plain_http(&parse_reference(s).unwrap());
        assert!(plain("127.0.0.1:5000/a:1"));
        assert!(plain("localhost:5000/a:1"));
        assert!(plain("registry.internal:5000/team/app:1"));
        assert!(plain("lab.example:8443/x:1"));
        assert!(!plain("registry.internal:5001/team/app:1"));
        assert!(!plain("busybox"));
        assert!(!plain("ghcr.io/liquidmetal-dev/flintlock-kernel:5.10.77"));
    }

    #[test]
    fn transport_errors_name_what_failed() {
        let r = parse_reference("registry.internal:5000/a:1").unwrap();
        let dns = io::Error::other(
            "error sending request: dns error: failed to lookup address information",
        );
        assert!(matches!(
            Registry::map_reqwest(&r, "manifest", &dns),
            RegistryError::UnknownHost(h) if h == "registry.internal:5000"
        ));
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = Registry::map_reqwest(&r, "manifest", &refused);
        assert!(matches!(e, RegistryError::Unavailable { .. }), "{e}");
        assert_eq!(e.kind(), RegistryErrorKind::BadGateway);
        let e = Registry::map_err(
            &r,
            "manifest",
            OciDistributionError::ServerError {
                code: 404,
                url: "u".into(),
                message: "x".into(),
            },
        );
        assert_eq!(e.kind(), RegistryErrorKind::NotFound, "{e}");
        let e = Registry::map_err(
            &r,
            "manifest",
            OciDistributionError::AuthenticationFailure("denied\nsecret-ish".into()),
        );
        assert_eq!(e.kind(), RegistryErrorKind::Unauthorized);
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_damaged_cache_entry_is_dropped() {
        let dir = crate::sandbox::mkdtemp(&std::env::temp_dir(), "reg-cache").unwrap();
        let reg = Registry::new(RegistryConfig {
            cache_dir: dir.clone(),
            auth_file: None,
            insecure: vec![],
            limits: ExtractLimits::default(),
        });
        let good = b"layer bytes";
        let b = Blob {
            digest: sha256(good),
            size: good.len() as u64,
        };
        let p = reg.blob_path(&b.digest).unwrap();
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        assert!(!reg.have(&b).unwrap());
        fs::write(&p, good).unwrap();
        assert!(reg.have(&b).unwrap());
        fs::write(&p, b"LAYER BYTES").unwrap();
        assert!(!reg.have(&b).unwrap());
        assert!(!p.exists(), "the damaged entry is removed");
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("tmp").join("x.partial"), b"half").unwrap();
        reg.clean_tmp();
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn registry_auth_header() {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE.encode(v);
        let c = Credentials::from_header(&enc(
            r#"{"username":"u","password":"p?>","serveraddress":"127.0.0.1:5000"}"#,
        ))
        .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p?>"));
        let c = Credentials::from_header(&enc(r#"{"auth":"dTpwOnE="}"#)).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:q"));
        // hyperctl without a login sends an empty AuthConfig.
        assert!(Credentials::from_header(&enc(r#"{"username":"","password":""}"#)).is_none());
        assert!(Credentials::from_header("!!not base64").is_none());
        assert!(Credentials::from_header(&enc("not json")).is_none());
    }

    #[test]
    fn credentials_by_server() {
        let dir = crate::sandbox::mkdtemp(&std::env::temp_dir(), "reg-auth").unwrap();
        let auth = dir.join("auth.json");
        fs::write(
            &auth,
            r#"{"http://127.0.0.1:5000": {"username": "u", "password": "p"},
                "https://index.docker.io/v1/": {"username": "d", "password": "q"}}"#,
        )
        .unwrap();
        let reg = Registry::new(RegistryConfig {
            cache_dir: dir.join("cache"),
            auth_file: Some(auth),
            insecure: vec![],
            limits: ExtractLimits::default(),
        });
        let c = |s: &str| format!("{:?}", reg.credentials(&parse_reference(s).unwrap(), None));
        assert!(c("127.0.0.1:5000/a:1").contains("Basic"));
        assert!(c("busybox").contains("Basic"));
        assert_eq!(c("127.0.0.1:5001/a:1"), "Anonymous");
        let given = Credentials {
            username: "x".into(),
            password: "y".into(),
        };
        let r = parse_reference("127.0.0.1:5001/a:1").unwrap();
        assert!(format!("{:?}", reg.credentials(&r, Some(&given))).contains("Basic"));
        assert!(
            !format!("{given:?}").contains('y'),
            "Debug hides the password"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
