//! Container images without a registry: OCI image layouts and `docker save`
//! tarballs, unpacked into root filesystems (and ext4 images) for microVMs.
//!
//! The Flintlock face (`containerSource`, `kernel.image` + `filename`,
//! `initrd`) and the hyperd face (image create/import, push, container
//! commit) both use this module. There is no network: an image is a local
//! **OCI image layout** (a directory with `oci-layout`, `index.json` and
//! `blobs/sha256/...`), a tarball of one (what `docker save` writes since
//! Docker 25, or `skopeo copy ... oci-archive:`), or a legacy **`docker save`
//! tarball** (`manifest.json`, `<config>.json`, `<id>/layer.tar`).
//!
//! ## Opening ([`open`], [`open_with`])
//!
//! * A directory with `index.json` is an OCI layout; a directory with only a
//!   `manifest.json` is an extracted `docker save`.
//! * A regular file is a tarball (plain or gzip; zstd is refused). It is
//!   extracted with [`archive::extract_tar_gz`] (same safety rules and
//!   limits as uploads) into a private scratch directory (mode 0700, below
//!   [`OpenConfig::scratch_dir`]) that lives as long as the [`OciImage`]
//!   (and its clones) and is removed when the last one is dropped. Inside, an
//!   `index.json` wins over a `manifest.json`; the latter then only adds its
//!   `RepoTags` to [`OciImage::repo_tags`].
//! * `reference` picks the image: a manifest digest (`sha256:...`), the
//!   `org.opencontainers.image.ref.name` or `io.containerd.image.name`
//!   annotation, or a `RepoTags` entry. Names compare after docker-style
//!   normalization (`busybox` = `busybox:latest` =
//!   `docker.io/library/busybox:latest`). As a last resort a `name:tag`
//!   reference matches the one manifest whose `ref.name` is just `tag`
//!   (and that has no `io.containerd.image.name`), as `skopeo` layouts
//!   record only the tag.
//!   Without a reference the first image is used. Nested indexes (multi
//!   platform images) resolve to linux/amd64.
//! * Every blob is verified when the image is opened: manifests, configs
//!   and layers must match their sha256 digest (and descriptor size). For
//!   legacy `docker save` images the layer tars are checked against the
//!   config's `rootfs.diff_ids` (and `<hex>.json` config names against their
//!   content). Only sha256 is supported. Blob paths are built from validated
//!   hex digests, so a digest cannot name a path outside `blobs/`.
//! * Layers: OCI and Docker v2 media types, uncompressed tar or gzip. The
//!   compression is sniffed from the blob's magic bytes (Docker's media
//!   types do not always tell the truth); zstd (by media type or magic) is
//!   refused with [`OciError::Zstd`].
//!
//! ## Unpacking ([`OciImage::unpack`])
//!
//! Layers are applied in order, below `dest`, with the rules of
//! [`archive`] plus layer semantics:
//!
//! * Whiteouts: `.wh.<name>` removes `<name>` of the lower layers;
//!   `.wh..wh..opq` makes its directory opaque (everything the lower layers
//!   put there is removed; what the same layer puts there stays, whatever
//!   the order of the tar entries). Whiteout files never appear in the
//!   result; other `.wh..wh.*` (aufs metadata) are ignored.
//! * A later entry replaces an earlier path of any kind (a file over a
//!   directory removes the directory); a directory over a directory only
//!   updates its metadata.
//! * Paths must be relative without `..` ([`ArchiveError::AbsolutePath`],
//!   [`ArchiveError::ParentDir`]). Nothing is ever written, removed or
//!   chmod-ed through a symlink: every parent of every path is checked with
//!   `lstat` to be a real directory ([`ArchiveError::ThroughSymlink`] —
//!   this includes an upper layer writing below a *lower* layer's symlink,
//!   which real layer diffs never do), files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW`, directory metadata is applied at the end
//!   through `O_DIRECTORY|O_NOFOLLOW` descriptors after re-checking the
//!   parents. Hard-link targets must be regular files of the tree reached
//!   without symlinks.
//! * Symlink targets are *not* restricted (unlike uploads): image root
//!   filesystems are full of absolute links (`/bin/sh -> /bin/busybox`)
//!   that are meant for the guest. They are safe because the host never
//!   follows them (see above, and [`OciImage::extract_file`] resolves them
//!   inside the image's root).
//! * Device nodes, FIFOs and sockets are skipped (listed in
//!   [`UnpackSummary::skipped`]); xattrs and timestamps are not restored.
//! * Limits ([`ExtractLimits`]) count over all layers together: entries of
//!   all kinds, and bytes of regular-file data; each layer's decompressed
//!   stream is capped too.
//! * **Ownership and modes**: a root filesystem needs them, so unlike
//!   uploads all of `mode & 0o7777` is kept (setuid `su`, sticky `/tmp`) and,
//!   when running as root, the uid/gid of every entry (chown before chmod,
//!   so setuid bits survive). Without root, ownership stays the daemon's and
//!   directories get `| 0o700` so the tree can be removed. Because setuid
//!   root files may appear, `dest` must be in a directory other users cannot
//!   reach; [`OciImage::to_ext4`] and [`OciImage::extract_file`] unpack into
//!   a 0700 scratch directory.
//!
//! ## Writing ([`write_layout`], [`diff_layer`])
//!
//! [`write_layout`] stores a directory tree as a single-layer image (gzip
//! layer, config, manifest) in an OCI layout, creating the layout if needed
//! and replacing only the index entry with the same `ref.name`.
//! [`diff_layer`] computes the change set between two trees as a layer with
//! whiteouts, and [`write_layout_from`] stores a base image plus extra layers
//! (e.g. a commit).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::images::archive::{self, ArchiveError, ExtractLimits};
use crate::images::volumes::{self, VolumeError};

/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer.
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI uncompressed layer.
pub const MEDIA_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker v2 schema 2 manifest.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker gzip layer.
pub const MEDIA_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker uncompressed layer (what legacy `docker save` holds).
pub const MEDIA_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Annotation naming an image in an OCI layout index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's / Docker's full image name annotation.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Largest JSON document (index, manifest, config) read, in bytes.
const MAX_JSON: u64 = 16 << 20;
/// Deepest nesting of indexes followed.
const MAX_INDEX_DEPTH: u32 = 4;
/// Most symlinks followed when resolving one path inside an image.
const MAX_SYMLINK_HOPS: u32 = 40;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const STREAM_OVERHEAD_PER_ENTRY: u64 = 4 * 1024;
const STREAM_OVERHEAD: u64 = 1024 * 1024;

/// Why an image could not be read, unpacked or written.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image tarball could not be extracted.
    #[error("image tarball: {0}")]
    Archive(#[source] ArchiveError),
    /// A layer broke a safety rule or could not be applied.
    #[error("layer {digest}: {source}")]
    Layer {
        digest: String,
        #[source]
        source: ArchiveError,
    },
    /// Neither an OCI layout nor a `docker save` image.
    #[error(
        "{0} is not an OCI image layout or docker save archive (no index.json or manifest.json)"
    )]
    NotAnImage(PathBuf),
    /// A JSON document is not valid.
    #[error("invalid {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The image metadata is malformed.
    #[error("invalid image: {0}")]
    Invalid(String),
    /// A digest uses another algorithm than sha256, or is malformed.
    #[error("unsupported or malformed digest {0:?} (only sha256 is supported)")]
    BadDigest(String),
    /// A blob's content does not match its digest.
    #[error("{what}: digest mismatch (expected {expected}, got {actual})")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A blob's size does not match its descriptor.
    #[error("{what}: size mismatch (expected {expected}, got {actual})")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// No image matches the reference.
    #[error("no such image {reference:?} (available: {available:?})")]
    RefNotFound {
        reference: String,
        available: Vec<String>,
    },
    /// A multi-platform index has no linux/amd64 image.
    #[error("no linux/amd64 image in the index (platforms: {0:?})")]
    NoPlatform(Vec<String>),
    /// A media type this module does not handle.
    #[error("unsupported media type {0:?}")]
    UnsupportedMediaType(String),
    /// zstd-compressed data.
    #[error("{0} is zstd-compressed, which is not supported (only tar and tar+gzip)")]
    Zstd(String),
    /// A file asked for is not in the image.
    #[error("no such file {0:?} in the image")]
    NotFound(String),
    /// A path asked for is not a regular file.
    #[error("{0:?} in the image is not a regular file")]
    NotAFile(String),
    /// An invalid image reference name for a layout.
    #[error("invalid image reference name {0:?}")]
    InvalidRefName(String),
    /// The ext4 image could not be built.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The runtime part of an image config (Docker's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Env`: `KEY=value` strings.
    pub env: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `WorkingDir` (empty when unset).
    pub working_dir: String,
    /// `User` (empty when unset).
    pub user: String,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `ExposedPorts` keys, e.g. `80/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// `Volumes` keys (paths), sorted.
    pub volumes: Vec<String>,
    /// `StopSignal` (empty when unset).
    pub stop_signal: String,
}

impl ImageConfig {
    /// Reads the `config` object of an image config (tolerates nulls and
    /// missing keys).
    pub fn from_json(v: &Value) -> ImageConfig {
        let strings = |key: &str| -> Vec<String> {
            v.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |key: &str| -> String {
            v.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let keys = |key: &str| -> Vec<String> {
            v.get(key)
                .and_then(Value::as_object)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let labels = v
            .get("Labels")
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, val)| val.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let mut exposed_ports = keys("ExposedPorts");
        exposed_ports.sort();
        let mut vols = keys("Volumes");
        vols.sort();
        ImageConfig {
            env: strings("Env"),
            cmd: strings("Cmd"),
            entrypoint: strings("Entrypoint"),
            working_dir: string("WorkingDir"),
            user: string("User"),
            labels,
            exposed_ports,
            volumes: vols,
            stop_signal: string("StopSignal"),
        }
    }

    /// The `config` object as Docker/OCI write it (empty fields omitted).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let put_list = |m: &mut serde_json::Map<String, Value>, k: &str, l: &[String]| {
            if !l.is_empty() {
                m.insert(k.to_string(), json!(l));
            }
        };
        put_list(&mut m, "Env", &self.env);
        put_list(&mut m, "Cmd", &self.cmd);
        put_list(&mut m, "Entrypoint", &self.entrypoint);
        for (k, s) in [
            ("WorkingDir", &self.working_dir),
            ("User", &self.user),
            ("StopSignal", &self.stop_signal),
        ] {
            if !s.is_empty() {
                m.insert(k.to_string(), json!(s));
            }
        }
        if !self.labels.is_empty() {
            m.insert("Labels".into(), json!(self.labels));
        }
        let set = |l: &[String]| -> Value {
            Value::Object(l.iter().map(|k| (k.clone(), json!({}))).collect())
        };
        if !self.exposed_ports.is_empty() {
            m.insert("ExposedPorts".into(), set(&self.exposed_ports));
        }
        if !self.volumes.is_empty() {
            m.insert("Volumes".into(), set(&self.volumes));
        }
        Value::Object(m)
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Media type as declared (legacy docker save: the Docker tar/gzip type).
    pub media_type: String,
    /// Digest of the blob as stored (`sha256:<hex>`).
    pub digest: String,
    /// Size of the blob as stored, in bytes.
    pub size: u64,
    /// Compression, sniffed from the blob.
    pub compression: Compression,
    /// Where the blob is.
    path: PathBuf,
}

/// Options of [`open_with`].
#[derive(Debug, Clone)]
pub struct OpenConfig {
    /// Limits for extracting an image tarball and for unpacking layers in
    /// [`OciImage::to_ext4`] / [`OciImage::extract_file`].
    pub limits: ExtractLimits,
    /// Where scratch directories are made (default: the system temp dir).
    pub scratch_dir: PathBuf,
}

impl Default for OpenConfig {
    fn default() -> Self {
        OpenConfig {
            limits: ExtractLimits::default(),
            scratch_dir: std::env::temp_dir(),
        }
    }
}

/// A private (0700) temporary directory, removed on drop.
#[derive(Debug)]
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(parent: &Path) -> Result<ScratchDir, OciError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = parent.join(format!(
            "ember-oci-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(io_err(&p))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An image ready to be unpacked.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The runtime config.
    pub config: ImageConfig,
    /// Layers, lowest first.
    layers: Vec<Layer>,
    /// Manifest digest (`sha256:<hex>`). Legacy `docker save` images have
    /// no manifest blob: this is then the config digest (the image id).
    pub digest: String,
    /// Digest of the config blob (the Docker image id).
    pub config_digest: String,
    /// Names of the image: `RepoTags`, `io.containerd.image.name`, or the
    /// `ref.name` annotation.
    pub repo_tags: Vec<String>,
    /// `architecture` of the config (e.g. `amd64`).
    pub architecture: String,
    /// `os` of the config (e.g. `linux`).
    pub os: String,
    /// `created` of the config (RFC 3339), if any.
    pub created: Option<String>,
    limits: ExtractLimits,
    scratch_parent: PathBuf,
    /// Keeps an extracted tarball alive while the image is in use.
    _scratch: Option<Arc<ScratchDir>>,
}

/// What [`OciImage::unpack`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    /// Layers applied.
    pub layers: u64,
    /// Tar entries seen over all layers (whiteouts and skipped included).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directory entries applied.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Whiteout entries (`.wh.*`) processed.
    pub whiteouts: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
    /// Skipped entries (devices, FIFOs, ...), by path.
    pub skipped: Vec<PathBuf>,
}

/// Opens an image with default options; see [`open_with`].
pub fn open(source: &Path, reference: Option<&str>) -> Result<OciImage, OciError> {
    open_with(source, reference, &OpenConfig::default())
}

/// Opens the image `reference` (or the first one) of `source`: an OCI
/// layout directory, an extracted `docker save` directory, or a tarball of
/// either (plain or gzip). All blobs are verified.
pub fn open_with(
    source: &Path,
    reference: Option<&str>,
    cfg: &OpenConfig,
) -> Result<OciImage, OciError> {
    let md = fs::metadata(source).map_err(io_err(source))?;
    let (root, scratch) = if md.is_dir() {
        (source.to_path_buf(), None)
    } else {
        let mut f = File::open(source).map_err(io_err(source))?;
        let mut magic = Vec::with_capacity(4);
        (&mut f)
            .take(4)
            .read_to_end(&mut magic)
            .map_err(io_err(source))?;
        if magic == ZSTD_MAGIC {
            return Err(OciError::Zstd(format!(
                "image archive {}",
                source.display()
            )));
        }
        let f = File::open(source).map_err(io_err(source))?;
        let scratch = ScratchDir::new(&cfg.scratch_dir)?;
        let root = scratch.0.join("image");
        archive::extract_tar_gz(BufReader::new(f), &root, &cfg.limits)
            .map_err(OciError::Archive)?;
        (root, Some(Arc::new(scratch)))
    };
    let mut img = if root.join("index.json").is_file() {
        open_oci(&root, reference)?
    } else if root.join("manifest.json").is_file() {
        open_docker(&root, reference)?
    } else {
        return Err(OciError::NotAnImage(source.to_path_buf()));
    };
    img.limits = cfg.limits;
    img.scratch_parent = cfg.scratch_dir.clone();
    img._scratch = scratch;
    Ok(img)
}

// ---------------------------------------------------------------------------
// Digests and blobs

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Validates `sha256:<64 lowercase hex>` and returns the hex part.
fn digest_hex(digest: &str) -> Result<&str, OciError> {
    let bad = || OciError::BadDigest(digest.to_string());
    let h = digest.strip_prefix("sha256:").ok_or_else(bad)?;
    if h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(h)
    } else {
        Err(bad())
    }
}

fn is_hex64(s: &str) -> bool {
    digest_hex(&format!("sha256:{s}")).is_ok()
}

fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, OciError> {
    Ok(root.join("blobs").join("sha256").join(digest_hex(digest)?))
}

/// sha256 and length of everything `r` yields.
fn hash_reader(mut r: impl Read, path: &Path) -> Result<(String, u64), OciError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n_total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        h.update(buf.get(..n).unwrap_or(&[]));
        n_total += n as u64;
    }
    Ok((format!("sha256:{}", hex(&h.finalize())), n_total))
}

fn hash_file(path: &Path) -> Result<(String, u64), OciError> {
    hash_reader(File::open(path).map_err(io_err(path))?, path)
}

fn check_digest(what: &str, expected: &str, actual: &str) -> Result<(), OciError> {
    if expected != actual {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

fn check_size(what: &str, expected: Option<u64>, actual: u64) -> Result<(), OciError> {
    match expected {
        Some(e) if e != actual => Err(OciError::SizeMismatch {
            what: what.to_string(),
            expected: e,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Reads a (bounded) JSON file.
fn read_json_file(path: &Path, what: &str) -> Result<(Vec<u8>, Value), OciError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(OciError::Invalid(format!(
            "{what} is larger than {MAX_JSON} bytes"
        )));
    }
    let v = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })?;
    Ok((bytes, v))
}

/// Reads and verifies a JSON blob.
fn read_json_blob(root: &Path, desc: &Descriptor, what: &str) -> Result<Value, OciError> {
    let path = blob_path(root, &desc.digest)?;
    let (bytes, v) = read_json_file(&path, what)?;
    let actual = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
    check_digest(what, &desc.digest, &actual)?;
    check_size(what, desc.size, bytes.len() as u64)?;
    Ok(v)
}

fn parse<T: for<'de> Deserialize<'de>>(v: Value, what: &str) -> Result<T, OciError> {
    serde_json::from_value(v).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })
}

/// First bytes of a file.
fn magic_of(path: &Path) -> Result<Vec<u8>, OciError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut magic = Vec::with_capacity(4);
    f.take(4).read_to_end(&mut magic).map_err(io_err(path))?;
    Ok(magic)
}

fn sniff_compression(path: &Path, what: &str) -> Result<Compression, OciError> {
    let magic = magic_of(path)?;
    if magic == ZSTD_MAGIC {
        Err(OciError::Zstd(what.to_string()))
    } else if magic.starts_with(&GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else {
        Ok(Compression::None)
    }
}

// ---------------------------------------------------------------------------
// OCI layouts

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An index or a manifest.
#[derive(Debug, Deserialize)]
struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn is_index_type(m: &str) -> bool {
    m == MEDIA_OCI_INDEX || m == MEDIA_DOCKER_LIST
}

/// Docker-style normalization of an image name: `busybox` ->
/// `docker.io/library/busybox:latest`. Digest references are returned as-is.
fn normalize_ref(r: &str) -> String {
    if r.contains('@') {
        return r.to_string();
    }
    let (name, tag) = match r.rfind(':') {
        Some(i) if !r[i + 1..].contains('/') => (&r[..i], &r[i..]),
        _ => (r, ":latest"),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        Some(_) => ("docker.io".to_string(), name.to_string()),
        None => ("docker.io".to_string(), format!("library/{name}")),
    };
    format!("{domain}/{path}{tag}")
}

/// The familiar form of a normalized name (`docker.io/library/x:t` -> `x:t`).
fn familiar(name: &str) -> String {
    name.strip_prefix("docker.io/library/")
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name)
        .to_string()
}

fn desc_names(d: &Descriptor) -> Vec<String> {
    [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME]
        .iter()
        .filter_map(|k| d.annotations.get(*k).cloned())
        .collect()
}

fn select_descriptor<'a>(
    manifests: &'a [Descriptor],
    reference: Option<&str>,
    extra_names: &HashMap<String, Vec<String>>,
) -> Result<&'a Descriptor, OciError> {
    let available = || -> Vec<String> {
        manifests
            .iter()
            .map(|d| {
                desc_names(d)
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| d.digest.clone())
            })
            .collect()
    };
    let Some(reference) = reference else {
        return manifests
            .first()
            .ok_or_else(|| OciError::Invalid("index.json lists no manifests".into()));
    };
    let not_found = || OciError::RefNotFound {
        reference: reference.to_string(),
        available: available(),
    };
    if reference.starts_with("sha256:") {
        return manifests
            .iter()
            .find(|d| d.digest == reference)
            .ok_or_else(not_found);
    }
    let want = normalize_ref(reference);
    let names_of = |d: &Descriptor| -> Vec<String> {
        let mut n = desc_names(d);
        n.extend(extra_names.get(&d.digest).cloned().unwrap_or_default());
        n
    };
    if let Some(d) = manifests.iter().find(|d| {
        names_of(d)
            .iter()
            .any(|n| n == reference || normalize_ref(n) == want)
    }) {
        return Ok(d);
    }
    // An explicit `name:tag` against a bare `ref.name` of `tag` (layouts
    // that record only the tag), when unambiguous and no full name is known.
    let explicit_tag = match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') && !name.is_empty() => Some(tag),
        _ => None,
    };
    if let Some(tag) = explicit_tag {
        let hits: Vec<&Descriptor> = manifests
            .iter()
            .filter(|d| {
                !d.annotations.contains_key(ANNOTATION_CONTAINERD_NAME)
                    && d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag)
            })
            .collect();
        if let [d] = hits.as_slice() {
            return Ok(d);
        }
    }
    Err(not_found())
}

/// Follows nested indexes down to a linux/amd64 manifest.
fn resolve_manifest(
    root: &Path,
    desc: &Descriptor,
    depth: u32,
) -> Result<(Descriptor, Document), OciError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(OciError::Invalid("indexes nested too deeply".into()));
    }
    if desc.media_type.contains("zstd") {
        return Err(OciError::Zstd(desc.digest.clone()));
    }
    let v = read_json_blob(root, desc, &format!("manifest {}", desc.digest))?;
    let doc: Document = parse(v, &format!("manifest {}", desc.digest))?;
    let is_index = is_index_type(&desc.media_type)
        || is_index_type(&doc.media_type)
        || (doc.manifests.is_some() && doc.config.is_none());
    if !is_index {
        return Ok((desc.clone(), doc));
    }
    let list = doc.manifests.unwrap_or_default();
    let pick = list
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| match list.as_slice() {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        });
    match pick {
        Some(d) => resolve_manifest(root, d, depth + 1),
        None => Err(OciError::NoPlatform(
            list.iter()
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "unknown".to_string(),
                })
                .collect(),
        )),
    }
}

fn check_layer_media_type(m: &str, digest: &str) -> Result<(), OciError> {
    if m.contains("zstd") {
        return Err(OciError::Zstd(format!("layer {digest}")));
    }
    let ok = m.is_empty()
        || m.starts_with("application/vnd.oci.image.layer.")
        || m.starts_with("application/vnd.docker.image.rootfs.");
    if ok
        && (m.is_empty()
            || m.ends_with(".tar")
            || m.ends_with("tar+gzip")
            || m.ends_with("tar.gzip"))
    {
        Ok(())
    } else {
        Err(OciError::UnsupportedMediaType(m.to_string()))
    }
}

struct ConfigInfo {
    config: ImageConfig,
    architecture: String,
    os: String,
    created: Option<String>,
    diff_ids: Vec<String>,
}

fn config_info(v: &Value) -> ConfigInfo {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    ConfigInfo {
        config: v
            .get("config")
            .or_else(|| v.get("container_config"))
            .map(ImageConfig::from_json)
            .unwrap_or_default(),
        architecture: s("architecture"),
        os: s("os"),
        created: v.get("created").and_then(Value::as_str).map(str::to_string),
        diff_ids: v
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn read_docker_manifest(root: &Path) -> Result<Vec<DockerEntry>, OciError> {
    let (_, v) = read_json_file(&root.join("manifest.json"), "manifest.json")?;
    parse(v, "manifest.json")
}

/// A relative path from a docker manifest, refused if it could escape.
fn safe_rel(p: &str) -> Result<PathBuf, OciError> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(OciError::Invalid(format!(
                    "unsafe path {p:?} in manifest.json"
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(OciError::Invalid(format!(
            "empty path {p:?} in manifest.json"
        )));
    }
    Ok(out)
}

fn open_oci(root: &Path, reference: Option<&str>) -> Result<OciImage, OciError> {
    let (_, index) = read_json_file(&root.join("index.json"), "index.json")?;
    let index: Document = parse(index, "index.json")?;
    let manifests = index.manifests.unwrap_or_default();
    // Newer `docker save` archives carry a manifest.json too: its RepoTags
    // name the image by config digest.
    let mut tags_by_config: HashMap<String, Vec<String>> = HashMap::new();
    if root.join("manifest.json").is_file() {
        if let Ok(entries) = read_docker_manifest(root) {
            for e in entries {
                if let Some(h) = e.config.strip_prefix("blobs/sha256/") {
                    tags_by_config
                        .entry(format!("sha256:{h}"))
                        .or_default()
                        .extend(e.repo_tags.unwrap_or_default());
                }
            }
        }
    }
    // RepoTags by manifest digest need the manifests' configs: read the
    // candidates' manifests only when a reference did not match otherwise.
    let top = match select_descriptor(&manifests, reference, &HashMap::new()) {
        Ok(d) => d,
        Err(e @ OciError::RefNotFound { .. }) if !tags_by_config.is_empty() => {
            let mut by_manifest = HashMap::new();
            for d in &manifests {
                if let Ok((_, doc)) = resolve_manifest(root, d, 0) {
                    if let Some(c) = doc.config {
                        if let Some(t) = tags_by_config.get(&c.digest) {
                            by_manifest.insert(d.digest.clone(), t.clone());
                        }
                    }
                }
            }
            select_descriptor(&manifests, reference, &by_manifest).map_err(|_| e)?
        }
        Err(e) => return Err(e),
    };
    let (mdesc, doc) = resolve_manifest(root, top, 0)?;
    let cdesc = doc
        .config
        .ok_or_else(|| OciError::Invalid(format!("manifest {} has no config", mdesc.digest)))?;
    let cv = read_json_blob(root, &cdesc, &format!("config {}", cdesc.digest))?;
    let info = config_info(&cv);
    let mut layers = Vec::new();
    for d in &doc.layers {
        check_layer_media_type(&d.media_type, &d.digest)?;
        let path = blob_path(root, &d.digest)?;
        let what = format!("layer {}", d.digest);
        let (actual, size) = hash_file(&path)?;
        check_digest(&what, &d.digest, &actual)?;
        check_size(&what, d.size, size)?;
        let compression = sniff_compression(&path, &what)?;
        layers.push(Layer {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size,
            compression,
            path,
        });
    }
    let mut repo_tags: Vec<String> = tags_by_config
        .get(&cdesc.digest)
        .cloned()
        .unwrap_or_default();
    // The full containerd name when there is one (`ref.name` is then often
    // just the tag), else `ref.name`.
    if let Some(n) = desc_names(top).into_iter().next() {
        let f = if n.contains('/') || n.contains(':') {
            familiar(&n)
        } else {
            n
        };
        if !repo_tags
            .iter()
            .any(|t| normalize_ref(t) == normalize_ref(&f))
        {
            repo_tags.push(f);
        }
    }
    Ok(OciImage {
        config: info.config,
        layers,
        digest: mdesc.digest,
        config_digest: cdesc.digest,
        repo_tags,
        architecture: info.architecture,
        os: info.os,
        created: info.created,
        limits: ExtractLimits::default(),
        scratch_parent: std::env::temp_dir(),
        _scratch: None,
    })
}

fn open_docker(root: &Path, reference: Option<&str>) -> Result<OciImage, OciError> {
    let entries = read_docker_manifest(root)?;
    let config_digest_of = |e: &DockerEntry| -> Option<String> {
        let p = Path::new(&e.config);
        let stem = p.file_name()?.to_str()?;
        let stem = stem.strip_suffix(".json").unwrap_or(stem);
        is_hex64(stem).then(|| format!("sha256:{stem}"))
    };
    let entry = match reference {
        None => entries
            .first()
            .ok_or_else(|| OciError::Invalid("manifest.json lists no images".into()))?,
        Some(r) => {
            let want = normalize_ref(r);
            entries
                .iter()
                .find(|e| {
                    e.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| t == r || normalize_ref(t) == want)
                        || config_digest_of(e).is_some_and(|d| {
                            d == r
                                || (r.len() >= 12 && d.trim_start_matches("sha256:").starts_with(r))
                        })
                })
                .ok_or_else(|| OciError::RefNotFound {
                    reference: r.to_string(),
                    available: entries
                        .iter()
                        .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                        .collect(),
                })?
        }
    };
    let cpath = root.join(safe_rel(&entry.config)?);
    let (cbytes, cv) = read_json_file(&cpath, "image config")?;
    let cdigest = format!("sha256:{}", hex(&Sha256::digest(&cbytes)));
    if let Some(expected) = config_digest_of(entry) {
        check_digest("image config", &expected, &cdigest)?;
    }
    let info = config_info(&cv);
    let verify_diff_ids = info.diff_ids.len() == entry.layers.len();
    let mut layers = Vec::new();
    for (i, l) in entry.layers.iter().enumerate() {
        let rel = safe_rel(l)?;
        let path = root.join(&rel);
        let what = format!("layer {l}");
        let compression = sniff_compression(&path, &what)?;
        let (digest, size) = hash_file(&path)?;
        if let Some(h) = l.strip_prefix("blobs/sha256/") {
            check_digest(&what, &format!("sha256:{h}"), &digest)?;
        }
        if verify_diff_ids {
            let uncompressed = match compression {
                Compression::None => digest.clone(),
                Compression::Gzip => {
                    let f = File::open(&path).map_err(io_err(&path))?;
                    hash_reader(flate2::read::MultiGzDecoder::new(BufReader::new(f)), &path)?.0
                }
            };
            let expected = info.diff_ids.get(i).cloned().unwrap_or_default();
            check_digest(&what, &expected, &uncompressed)?;
        }
        layers.push(Layer {
            media_type: match compression {
                Compression::None => MEDIA_DOCKER_LAYER_TAR,
                Compression::Gzip => MEDIA_DOCKER_LAYER_GZIP,
            }
            .to_string(),
            digest,
            size,
            compression,
            path,
        });
    }
    Ok(OciImage {
        config: info.config,
        layers,
        digest: cdigest.clone(),
        config_digest: cdigest,
        repo_tags: entry.repo_tags.clone().unwrap_or_default(),
        architecture: info.architecture,
        os: info.os,
        created: info.created,
        limits: ExtractLimits::default(),
        scratch_parent: std::env::temp_dir(),
        _scratch: None,
    })
}

// ---------------------------------------------------------------------------
// Unpacking

impl OciImage {
    /// The layers, lowest first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Sum of the layer blob sizes, in bytes.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Applies the layers in order below `dest` (created if missing; should
    /// be empty). See the module documentation for the rules. On error
    /// `dest` may hold a partial tree; the caller removes it.
    pub fn unpack(&self, dest: &Path, limits: &ExtractLimits) -> Result<UnpackSummary, OciError> {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        let mut ap = Applier {
            dest,
            limits,
            // SAFETY: geteuid has no preconditions and cannot fail.
            owners: unsafe { libc::geteuid() } == 0,
            summary: UnpackSummary::default(),
            dir_meta: BTreeMap::new(),
        };
        for layer in &self.layers {
            ap.apply_layer(layer)?;
        }
        ap.finish().map_err(|source| OciError::Layer {
            digest: "(directory metadata)".into(),
            source,
        })?;
        Ok(ap.summary)
    }

    /// Unpacks the image into a scratch directory and builds an ext4 image
    /// of it at `out` (see [`volumes::create_ext4_from_dir`]; `None` sizes it
    /// to fit). Returns the image size in MB.
    pub fn to_ext4(&self, out: &Path, size_mb: Option<u64>) -> Result<u64, OciError> {
        let scratch = ScratchDir::new(&self.scratch_parent)?;
        let rootfs = scratch.0.join("rootfs");
        self.unpack(&rootfs, &self.limits)?;
        Ok(volumes::create_ext4_from_dir(out, &rootfs, size_mb)?)
    }

    /// Writes the content of one file of the image (as the final tree has
    /// it: last layer wins, whiteouts respected, symlinks followed inside the
    /// image root) to `out`, with its permission bits. The image is unpacked
    /// into a scratch directory for this. A missing (or whited-out) file is
    /// [`OciError::NotFound`], a directory [`OciError::NotAFile`].
    pub fn extract_file(&self, path_in_image: &str, out: &Path) -> Result<(), OciError> {
        let scratch = ScratchDir::new(&self.scratch_parent)?;
        let rootfs = scratch.0.join("rootfs");
        self.unpack(&rootfs, &self.limits)?;
        let rel = resolve_in_root(&rootfs, path_in_image)?;
        let full = rootfs.join(&rel);
        let mut src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(io_err(&full))?;
        let md = src.metadata().map_err(io_err(&full))?;
        if !md.is_file() {
            return Err(OciError::NotAFile(path_in_image.to_string()));
        }
        let mut dst = File::create(out).map_err(io_err(out))?;
        io::copy(&mut src, &mut dst).map_err(io_err(out))?;
        dst.set_permissions(fs::Permissions::from_mode(md.mode() & 0o777))
            .map_err(io_err(out))?;
        Ok(())
    }
}

/// Resolves `path` inside the tree at `root` like a chroot would (absolute
/// symlinks start at `root`, `..` stops at it); returns the root-relative
/// path of the final, symlink-free file.
fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, OciError> {
    let not_found = || OciError::NotFound(path.to_string());
    let comps = |p: &Path| -> Vec<OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect()
    };
    let mut todo: Vec<OsString> = comps(Path::new(path));
    todo.reverse(); // a stack: next component last
    let mut cur: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let full: PathBuf = cur.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let md = match fs::symlink_metadata(&full) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(io_err(&full)(e)),
        };
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(OciError::Invalid(format!(
                    "too many symlinks resolving {path:?}"
                )));
            }
            let target = fs::read_link(&full).map_err(io_err(&full))?;
            cur.pop();
            if target.is_absolute() {
                cur.clear();
            }
            let mut t = comps(&target);
            t.reverse();
            todo.extend(t);
        } else if !md.is_dir() && !todo.is_empty() {
            return Err(not_found());
        }
    }
    if cur.is_empty() {
        return Err(OciError::NotAFile(path.to_string()));
    }
    Ok(cur.iter().collect())
}

/// A reader that fails once more than `left` bytes went through it.
struct CappedReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decompressed layer stream exceeds the size limit",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

struct Applier<'a> {
    dest: &'a Path,
    limits: &'a ExtractLimits,
    /// Restore uid/gid (running as root).
    owners: bool,
    summary: UnpackSummary,
    /// Directory metadata applied at the end, by dest-relative path.
    dir_meta: BTreeMap<PathBuf, Meta>,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Write {
        path: path.to_path_buf(),
        source,
    }
}

impl Applier<'_> {
    fn apply_layer(&mut self, layer: &Layer) -> Result<(), OciError> {
        let f = File::open(&layer.path).map_err(io_err(&layer.path))?;
        let cap = self
            .limits
            .max_bytes
            .saturating_add(
                self.limits
                    .max_entries
                    .saturating_mul(STREAM_OVERHEAD_PER_ENTRY),
            )
            .saturating_add(STREAM_OVERHEAD);
        let reader: Box<dyn Read> = match layer.compression {
            Compression::None => Box::new(BufReader::new(f)),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f))),
        };
        let mut tar = tar::Archive::new(CappedReader {
            inner: reader,
            left: cap,
        });
        let lerr = |source| OciError::Layer {
            digest: layer.digest.clone(),
            source,
        };
        // Paths this layer created or touched (and their ancestors): what an
        // opaque marker or a whiteout of the same layer must not remove.
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let entries = tar.entries().map_err(|e| lerr(ArchiveError::Read(e)))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| lerr(self.read_err(e)))?;
            self.summary.entries += 1;
            if self.summary.entries > self.limits.max_entries {
                return Err(lerr(ArchiveError::TooManyEntries(self.limits.max_entries)));
            }
            self.apply_entry(&mut entry, &mut this_layer)
                .map_err(lerr)?;
        }
        self.summary.layers += 1;
        Ok(())
    }

    fn read_err(&self, e: io::Error) -> ArchiveError {
        if e.kind() == io::ErrorKind::InvalidData && e.to_string().contains("size limit") {
            ArchiveError::TooLarge(self.limits.max_bytes)
        } else {
            ArchiveError::Read(e)
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), ArchiveError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path().map_err(ArchiveError::Read)?.into_owned();
        let rel = archive::normalize(&raw)?;
        let header = entry.header();
        let meta = Meta {
            mode: header.mode().map_err(ArchiveError::Read)? & 0o7777,
            uid: header.uid().ok().and_then(|u| u32::try_from(u).ok()),
            gid: header.gid().ok().and_then(|g| u32::try_from(g).ok()),
        };
        if rel.as_os_str().is_empty() {
            if kind == EntryType::Directory {
                self.dir_meta.insert(PathBuf::new(), meta);
            }
            return Ok(());
        }
        let name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        if let Some(wh) = name.strip_prefix(b".wh.") {
            self.summary.whiteouts += 1;
            return self.whiteout(&rel, &raw, wh, this_layer);
        }
        self.walk_parents(&rel, &raw, true)?;
        for a in rel.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if !this_layer.insert(a.to_path_buf()) {
                break;
            }
        }
        let full = self.dest.join(&rel);
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&full) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        self.remove(&rel)?;
                        self.mkdir(&full)?;
                    }
                    Err(_) => self.mkdir(&full)?,
                }
                self.dir_meta.insert(rel, meta);
                self.summary.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove(&rel)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&full)
                    .map_err(write_err(&full))?;
                let budget = self.limits.max_bytes.saturating_sub(self.summary.bytes);
                let written = self.copy_limited(entry, &mut file, budget, &full)?;
                self.summary.bytes += written;
                if self.owners {
                    std::os::unix::fs::fchown(&file, meta.uid, meta.gid)
                        .map_err(write_err(&full))?;
                }
                file.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(write_err(&full))?;
                self.summary.files += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.as_os_str().is_empty() {
                    return Err(ArchiveError::BadLink {
                        path: raw,
                        target,
                        reason: "empty symlink target",
                    });
                }
                self.remove(&rel)?;
                std::os::unix::fs::symlink(&target, &full).map_err(write_err(&full))?;
                if self.owners {
                    std::os::unix::fs::lchown(&full, meta.uid, meta.gid)
                        .map_err(write_err(&full))?;
                }
                self.summary.symlinks += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let bad = |reason| ArchiveError::BadLink {
                    path: raw.clone(),
                    target: target.clone(),
                    reason,
                };
                let target_rel = archive::hard_link_target(&raw, &target)?;
                if target_rel == rel {
                    return Ok(());
                }
                if !self.walk_parents(&target_rel, &raw, false)? {
                    return Err(bad("hard-link target is not a regular file of the image"));
                }
                let target_full = self.dest.join(&target_rel);
                match fs::symlink_metadata(&target_full) {
                    Ok(md) if md.is_file() => {}
                    _ => return Err(bad("hard-link target is not a regular file of the image")),
                }
                self.remove(&rel)?;
                fs::hard_link(&target_full, &full).map_err(write_err(&full))?;
                self.summary.hardlinks += 1;
            }
            _ => self.summary.skipped.push(raw),
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        rel: &Path,
        raw: &Path,
        wh: &[u8],
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), ArchiveError> {
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if wh == b".wh..opq" {
            // The directory exists in this layer, and only this layer's
            // content of it remains.
            self.walk_parents(rel, raw, true)?;
            for a in parent.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                this_layer.insert(a.to_path_buf());
            }
            return self.clear_lower(&parent, this_layer);
        }
        if wh.starts_with(b".wh.") || wh.is_empty() || wh == b"." {
            return Ok(()); // aufs metadata (.wh..wh.plnk, ...) or no name
        }
        if wh == b".." {
            return Err(ArchiveError::ParentDir(raw.to_path_buf()));
        }
        let target = parent.join(OsStr::from_bytes(wh));
        if this_layer.contains(&target) {
            return Ok(()); // whiteouts hide lower layers only
        }
        if !self.walk_parents(&target, raw, false)? {
            return Ok(()); // nothing there to hide
        }
        self.remove(&target)
    }

    /// Removes everything below `dir` that this layer did not put there.
    fn clear_lower(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), ArchiveError> {
        let full = self.dest.join(dir);
        let mut children = Vec::new();
        for e in fs::read_dir(&full).map_err(write_err(&full))? {
            children.push(e.map_err(write_err(&full))?.file_name());
        }
        for name in children {
            let crel = dir.join(&name);
            if !keep.contains(&crel) {
                self.remove(&crel)?;
                continue;
            }
            let cfull = self.dest.join(&crel);
            let is_dir = fs::symlink_metadata(&cfull)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if is_dir {
                self.clear_lower(&crel, keep)?;
            }
        }
        Ok(())
    }

    fn mkdir(&self, full: &Path) -> Result<(), ArchiveError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(full)
            .map_err(write_err(full))
    }

    /// Removes `rel` (any kind, recursively, never following symlinks);
    /// its parents were checked by the caller. Missing is fine.
    fn remove(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        let full = self.dest.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(md) if md.is_dir() => fs::remove_dir_all(&full).map_err(write_err(&full))?,
            Ok(_) => fs::remove_file(&full).map_err(write_err(&full))?,
            Err(_) => return Ok(()),
        }
        // Forget the metadata of removed directories.
        let stale: Vec<PathBuf> = self
            .dir_meta
            .range(rel.to_path_buf()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(rel))
            .cloned()
            .collect();
        for k in stale {
            self.dir_meta.remove(&k);
        }
        Ok(())
    }

    /// Checks that every parent of `rel` is a real directory (never a
    /// symlink). Missing parents are created (mode 0755) when `create` is
    /// set; otherwise Ok(false) tells that a parent is missing.
    fn walk_parents(&self, rel: &Path, shown: &Path, create: bool) -> Result<bool, ArchiveError> {
        let mut cur = self.dest.to_path_buf();
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(ArchiveError::ThroughSymlink(shown.to_path_buf()))
                }
                Ok(md) if md.is_dir() => {}
                Ok(_) if create => return Err(ArchiveError::Conflict(shown.to_path_buf())),
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    self.mkdir(&cur)?;
                }
                Err(source) => {
                    return Err(ArchiveError::Write {
                        path: cur.clone(),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    fn copy_limited(
        &self,
        src: &mut impl Read,
        dst: &mut impl Write,
        budget: u64,
        path: &Path,
    ) -> Result<u64, ArchiveError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            total += n as u64;
            if total > budget {
                return Err(ArchiveError::TooLarge(self.limits.max_bytes));
            }
            dst.write_all(buf.get(..n).unwrap_or(&[]))
                .map_err(write_err(path))?;
        }
    }

    /// Applies directory metadata, children before parents, through
    /// descriptors opened without following symlinks.
    fn finish(&mut self) -> Result<(), ArchiveError> {
        let metas = std::mem::take(&mut self.dir_meta);
        for (rel, meta) in metas.iter().rev() {
            if !rel.as_os_str().is_empty() && !self.walk_parents(rel, rel, false)? {
                continue;
            }
            let full = self.dest.join(rel);
            let dir = match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&full)
            {
                Ok(d) => d,
                Err(_) => continue, // replaced by a non-directory since
            };
            let mut mode = meta.mode;
            if self.owners {
                std::os::unix::fs::fchown(&dir, meta.uid, meta.gid).map_err(write_err(&full))?;
            } else {
                mode |= 0o700;
            }
            dir.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_err(&full))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Writing layouts

/// A writer that hashes and counts what goes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        )
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or(&[]));
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Walks `root` (not following symlinks), sorted, and returns
/// root-relative paths with their metadata (root itself excluded).
fn walk_tree(root: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, OciError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let mut names: Vec<OsString> = Vec::new();
        for e in fs::read_dir(&full).map_err(io_err(&full))? {
            names.push(e.map_err(io_err(&full))?.file_name());
        }
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            let crel = rel.join(&n);
            let cfull = root.join(&crel);
            let md = fs::symlink_metadata(&cfull).map_err(io_err(&cfull))?;
            if md.is_dir() {
                subdirs.push(crel.clone());
            }
            out.push((crel, md));
        }
        // Depth-first in sorted order.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    // Stable, parents-before-children order.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn tar_header(md: &fs::Metadata, kind: EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(u64::from(md.uid()));
    h.set_gid(u64::from(md.gid()));
    h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
    h.set_size(0);
    h
}

/// Appends one tree entry to a tar; `hardlinks` maps (dev, ino) to the
/// first path of multiply-linked files.
fn append_entry<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    md: &fs::Metadata,
    hardlinks: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), OciError> {
    let full = root.join(rel);
    let ioe = |e| OciError::Io {
        path: full.clone(),
        source: e,
    };
    let ft = md.file_type();
    if ft.is_dir() {
        let mut h = tar_header(md, EntryType::Directory);
        b.append_data(&mut h, rel, io::empty()).map_err(ioe)?;
    } else if ft.is_symlink() {
        let mut h = tar_header(md, EntryType::Symlink);
        let target = fs::read_link(&full).map_err(io_err(&full))?;
        b.append_link(&mut h, rel, &target).map_err(ioe)?;
    } else if ft.is_file() {
        if md.nlink() > 1 {
            if let Some(first) = hardlinks.get(&(md.dev(), md.ino())) {
                let mut h = tar_header(md, EntryType::Link);
                b.append_link(&mut h, rel, first).map_err(ioe)?;
                return Ok(());
            }
            hardlinks.insert((md.dev(), md.ino()), rel.to_path_buf());
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(io_err(&full))?;
        let mut h = tar_header(md, EntryType::Regular);
        h.set_size(md.len());
        b.append_data(&mut h, rel, f.take(md.len())).map_err(ioe)?;
    }
    // Devices, FIFOs, sockets: not stored.
    Ok(())
}

/// Writes the tar.gz built by `fill` to `out`; returns (digest of the
/// gzip, diff_id of the tar, gzip size).
fn write_tar_gz(
    out: &Path,
    fill: impl FnOnce(
        &mut tar::Builder<&mut HashWriter<flate2::write::GzEncoder<HashWriter<File>>>>,
    ) -> Result<(), OciError>,
) -> Result<(String, String, u64), OciError> {
    let file = File::create(out).map_err(io_err(out))?;
    let gz = flate2::write::GzEncoder::new(HashWriter::new(file), flate2::Compression::default());
    let mut tar_hash = HashWriter::new(gz);
    {
        let mut b = tar::Builder::new(&mut tar_hash);
        b.follow_symlinks(false);
        fill(&mut b)?;
        b.finish().map_err(io_err(out))?;
    }
    let (gz, diff_id, _) = tar_hash.finish();
    let file_hash = gz.finish().map_err(io_err(out))?;
    let (mut file, digest, size) = file_hash.finish();
    file.flush().map_err(io_err(out))?;
    file.sync_all().map_err(io_err(out))?;
    Ok((digest, diff_id, size))
}

fn blobs_dir(dir: &Path) -> Result<PathBuf, OciError> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    Ok(blobs)
}

fn tmp_name(dir: &Path, what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        ".tmp-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Stores bytes as a blob; returns (digest, size).
fn write_blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64), OciError> {
    let digest = format!("sha256:{}", hex(&Sha256::digest(bytes)));
    let path = blob_path(dir, &digest)?;
    if !path.is_file() {
        let tmp = tmp_name(&blobs_dir(dir)?, "blob");
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok((digest, bytes.len() as u64))
}

/// A layer blob ready to be referenced by a manifest.
struct NewLayer {
    media_type: String,
    digest: String,
    diff_id: String,
    size: u64,
}

/// Stores the tar.gz at `src` (moved, or copied when on another
/// filesystem) as a layer blob of `dir`.
fn store_layer_file(dir: &Path, src: &Path) -> Result<NewLayer, OciError> {
    let blobs = blobs_dir(dir)?;
    let (digest, size) = hash_file(src)?;
    let f = File::open(src).map_err(io_err(src))?;
    let (diff_id, _) = match sniff_compression(src, "layer")? {
        Compression::Gzip => {
            hash_reader(flate2::read::MultiGzDecoder::new(BufReader::new(f)), src)?
        }
        Compression::None => (digest.clone(), size),
    };
    let media_type = if diff_id == digest {
        MEDIA_OCI_LAYER_TAR
    } else {
        MEDIA_OCI_LAYER_GZIP
    };
    let path = blob_path(dir, &digest)?;
    if !path.is_file() {
        let tmp = tmp_name(&blobs, "layer");
        fs::copy(src, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok(NewLayer {
        media_type: media_type.to_string(),
        digest,
        diff_id,
        size,
    })
}

fn check_ref_name(r: &str) -> Result<(), OciError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:@/+".contains(&b))
        && r.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(OciError::InvalidRefName(r.to_string()))
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Writes config, manifest and index entry for `layers` (already stored).
fn write_image(
    dir: &Path,
    layers: &[NewLayer],
    config: &ImageConfig,
    ref_name: &str,
    history: Vec<Value>,
) -> Result<String, OciError> {
    let config_json = json!({
        "created": now_rfc3339(),
        "architecture": "amd64",
        "os": "linux",
        "config": config.to_json(),
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    let cbytes = serde_json::to_vec(&config_json).map_err(|source| OciError::Json {
        what: "config".into(),
        source,
    })?;
    let (cdigest, csize) = write_blob(dir, &cbytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let mbytes = serde_json::to_vec(&manifest).map_err(|source| OciError::Json {
        what: "manifest".into(),
        source,
    })?;
    let (mdigest, msize) = write_blob(dir, &mbytes)?;

    let index_path = dir.join("index.json");
    let mut index = if index_path.is_file() {
        read_json_file(&index_path, "index.json")?.1
    } else {
        json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []})
    };
    let obj = index
        .as_object_mut()
        .ok_or_else(|| OciError::Invalid("index.json is not an object".into()))?;
    let mut manifests: Vec<Value> = obj
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    manifests.retain(|m| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            != Some(ref_name)
    });
    manifests.push(json!({
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": mdigest,
        "size": msize,
        "annotations": {ANNOTATION_REF_NAME: ref_name},
        "platform": {"architecture": "amd64", "os": "linux"},
    }));
    obj.insert("manifests".into(), Value::Array(manifests));
    obj.entry("schemaVersion").or_insert(json!(2));
    let ibytes = serde_json::to_vec_pretty(&index).map_err(|source| OciError::Json {
        what: "index.json".into(),
        source,
    })?;
    let tmp = tmp_name(dir, "index");
    fs::write(&tmp, ibytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &index_path).map_err(io_err(&index_path))?;
    Ok(mdigest)
}

fn init_layout(dir: &Path) -> Result<(), OciError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    blobs_dir(dir)?;
    let marker = dir.join("oci-layout");
    if !marker.is_file() {
        fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
    }
    Ok(())
}

/// Stores `rootfs` as a single-layer image (gzip layer with modes, owners,
/// symlinks and hard links; devices/FIFOs/sockets left out) named
/// `ref_name` in the OCI layout `dir` (created if needed). Other images of
/// the layout stay; an image with the same `ref.name` is replaced in the
/// index (its blobs stay). Returns the manifest digest.
pub fn write_layout(
    dir: &Path,
    rootfs: &Path,
    config: &ImageConfig,
    ref_name: &str,
) -> Result<String, OciError> {
    check_ref_name(ref_name)?;
    init_layout(dir)?;
    let blobs = blobs_dir(dir)?;
    let tmp = tmp_name(&blobs, "layer");
    let res = (|| {
        let tree = walk_tree(rootfs)?;
        let mut hardlinks = HashMap::new();
        let (digest, diff_id, size) = write_tar_gz(&tmp, |b| {
            for (rel, md) in &tree {
                append_entry(b, rootfs, rel, md, &mut hardlinks)?;
            }
            Ok(())
        })?;
        let path = blob_path(dir, &digest)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let layer = NewLayer {
            media_type: MEDIA_OCI_LAYER_GZIP.into(),
            digest,
            diff_id,
            size,
        };
        let history = vec![json!({"created": now_rfc3339(), "created_by": "ember write_layout"})];
        write_image(dir, &[layer], config, ref_name, history)
    })();
    let _ = fs::remove_file(&tmp);
    res
}

/// Stores `base`'s layers plus the tar(.gz) files `extra_layers` (e.g. from
/// [`diff_layer`]) as image `ref_name` in the layout `dir`, with `config`.
/// Returns the manifest digest. This is what `/container/commit` needs.
pub fn write_layout_from(
    dir: &Path,
    base: &OciImage,
    extra_layers: &[&Path],
    config: &ImageConfig,
    ref_name: &str,
) -> Result<String, OciError> {
    check_ref_name(ref_name)?;
    init_layout(dir)?;
    let mut layers = Vec::new();
    for l in base.layers.iter() {
        layers.push(store_layer_file(dir, &l.path)?);
    }
    for p in extra_layers {
        layers.push(store_layer_file(dir, p)?);
    }
    let history = layers
        .iter()
        .map(|_| json!({"created_by": "ember write_layout_from"}))
        .collect();
    write_image(dir, &layers, config, ref_name, history)
}

/// Writes to `out_tar_gz` the layer that turns the tree `lower` into the
/// tree `upper`: new and changed entries (type, mode, owner, size, content,
/// symlink target), and `.wh.<name>` whiteouts for deleted ones (one per
/// deleted subtree). A directory replaced by another kind needs no
/// whiteout: the new entry replaces it. Devices/FIFOs/sockets are left out.
pub fn diff_layer(lower: &Path, upper: &Path, out_tar_gz: &Path) -> Result<(), OciError> {
    let lower_tree: HashMap<PathBuf, fs::Metadata> = walk_tree(lower)?.into_iter().collect();
    let upper_tree = walk_tree(upper)?;
    let upper_set: HashSet<&PathBuf> = upper_tree.iter().map(|(p, _)| p).collect();
    // Deleted paths whose parent is still a directory in upper.
    let mut deleted: Vec<&PathBuf> = lower_tree
        .keys()
        .filter(|p| !upper_set.contains(p))
        .filter(|p| {
            p.parent().is_none_or(|par| {
                par.as_os_str().is_empty()
                    || upper_tree
                        .binary_search_by(|(q, _)| q.as_path().cmp(par))
                        .ok()
                        .and_then(|i| upper_tree.get(i))
                        .is_some_and(|(_, md)| md.is_dir())
                        && lower_tree.get(par).is_some_and(|m| m.is_dir())
            })
        })
        .collect();
    deleted.sort();
    let mut hardlinks = HashMap::new();
    let mut write = || -> Result<(), OciError> {
        write_tar_gz(out_tar_gz, |b| {
            for p in &deleted {
                let name = p.file_name().unwrap_or_default();
                let mut wh = OsString::from(".wh.");
                wh.push(name);
                let whp = p.parent().unwrap_or(Path::new("")).join(wh);
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, &whp, io::empty())
                    .map_err(io_err(out_tar_gz))?;
            }
            for (rel, md) in &upper_tree {
                let changed = match lower_tree.get(rel) {
                    None => true,
                    Some(lmd) => entry_changed(&lower.join(rel), lmd, &upper.join(rel), md)?,
                };
                if changed {
                    append_entry(b, upper, rel, md, &mut hardlinks)?;
                }
            }
            Ok(())
        })
        .map(|_| ())
    };
    let res = write();
    if res.is_err() {
        let _ = fs::remove_file(out_tar_gz);
    }
    res
}

fn entry_changed(
    lp: &Path,
    l: &fs::Metadata,
    up: &Path,
    u: &fs::Metadata,
) -> Result<bool, OciError> {
    if l.file_type() != u.file_type()
        || l.mode() != u.mode()
        || l.uid() != u.uid()
        || l.gid() != u.gid()
    {
        return Ok(true);
    }
    if u.is_dir() {
        return Ok(false);
    }
    if u.file_type().is_symlink() {
        return Ok(fs::read_link(lp).map_err(io_err(lp))? != fs::read_link(up).map_err(io_err(up))?);
    }
    if l.len() != u.len() {
        return Ok(true);
    }
    if !u.is_file() {
        return Ok(false);
    }
    let mut a = BufReader::new(File::open(lp).map_err(io_err(lp))?);
    let mut b = BufReader::new(File::open(up).map_err(io_err(up))?);
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = a.read(&mut ba).map_err(io_err(lp))?;
        if n == 0 {
            return Ok(false);
        }
        let (Some(ca), Some(cb)) = (ba.get(..n), bb.get_mut(..n)) else {
            return Ok(true);
        };
        if b.read_exact(cb).is_err() || ca != cb {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::TempDir;

    #[test]
    fn normalize_refs() {
        assert_eq!(normalize_ref("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize_ref("busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalize_ref("me/app:v1"), "docker.io/me/app:v1");
        assert_eq!(normalize_ref("ghcr.io/x/y"), "ghcr.io/x/y:latest");
        assert_eq!(normalize_ref("localhost:5000/y:2"), "localhost:5000/y:2");
        assert_eq!(
            normalize_ref("docker.io/library/busybox:latest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            familiar("docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(familiar("ghcr.io/x/y:1"), "ghcr.io/x/y:1");
    }

    #[test]
    fn digests_validated() {
        let h = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{h}")).unwrap(), h);
        for bad in [
            "sha512:abcd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "a".repeat(63)),
            h.clone(),
        ] {
            assert!(
                matches!(digest_hex(&bad), Err(OciError::BadDigest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn image_config_json_round_trip() {
        let v = json!({
            "Env": ["A=1", "PATH=/bin"], "Cmd": null, "Entrypoint": ["/init"],
            "WorkingDir": "/srv", "User": "1000:1000",
            "Labels": {"k": "v"}, "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
            "Volumes": {"/data": {}}, "StopSignal": "SIGTERM",
        });
        let c = ImageConfig::from_json(&v);
        assert_eq!(c.env, ["A=1", "PATH=/bin"]);
        assert!(c.cmd.is_empty());
        assert_eq!(c.exposed_ports, ["53/udp", "80/tcp"]);
        assert_eq!(c.volumes, ["/data"]);
        assert_eq!(ImageConfig::from_json(&c.to_json()), c);
        assert_eq!(ImageConfig::from_json(&json!(null)), ImageConfig::default());
    }

    #[test]
    fn resolve_in_root_follows_links_inside() {
        let t = TempDir::new();
        let r = &t.0;
        fs::create_dir_all(r.join("boot/real")).unwrap();
        fs::write(r.join("boot/real/vmlinux-1"), b"k").unwrap();
        std::os::unix::fs::symlink("/boot/real/vmlinux-1", r.join("boot/vmlinux")).unwrap();
        std::os::unix::fs::symlink("../../../../boot", r.join("b")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("host")).unwrap();
        assert_eq!(
            resolve_in_root(r, "boot/vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert_eq!(
            resolve_in_root(r, "/b/vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert_eq!(
            resolve_in_root(r, "../../boot/real/../vmlinux").unwrap(),
            Path::new("boot/real/vmlinux-1")
        );
        assert!(matches!(
            resolve_in_root(r, "host"),
            Err(OciError::NotFound(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "loop"),
            Err(OciError::Invalid(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "boot/real/vmlinux-1/x"),
            Err(OciError::NotFound(_))
        ));
        assert!(matches!(
            resolve_in_root(r, "/"),
            Err(OciError::NotAFile(_))
        ));
    }

    #[test]
    fn ref_names_validated() {
        for ok in ["latest", "busybox:1.36", "ghcr.io/x/y:v1+b"] {
            check_ref_name(ok).unwrap();
        }
        for bad in ["", ":x", "a b", "a\nb", &"x".repeat(256)] {
            assert!(check_ref_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layer_media_types() {
        for ok in [
            MEDIA_OCI_LAYER_GZIP,
            MEDIA_OCI_LAYER_TAR,
            MEDIA_DOCKER_LAYER_GZIP,
            MEDIA_DOCKER_LAYER_TAR,
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "",
        ] {
            check_layer_media_type(ok, "d").unwrap();
        }
        assert!(matches!(
            check_layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "d"),
            Err(OciError::Zstd(_))
        ));
        assert!(matches!(
            check_layer_media_type("application/octet-stream", "d"),
            Err(OciError::UnsupportedMediaType(_))
        ));
    }
}
