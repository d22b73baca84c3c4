//! Container images on disk: OCI image layouts and `docker save` tarballs
//! (registries are [`crate::images::registry`], which hands its pulls
//! over as OCI layouts), unpacked into root filesystems (and ext4 images)
//! for microVMs.
//!
//! The Flintlock face (`containerSource`, `kernel.image` + `filename`,
//! `initrd`) and the hyperd face (image create/import, push, container
//! commit) both use this module. There is no network here: an image is a local
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
//!   extracted with [`archive::extract_sandboxed`] (in a sandbox job in
//!   emberd; same safety rules and limits as uploads) into a private
//!   scratch directory (mode 0700, below
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
//! * Layers: OCI and Docker v2 media types, uncompressed tar, gzip or
//!   zstd. The compression is sniffed from the blob's magic bytes (Docker's
//!   media types do not always tell the truth); zstd is decoded with
//!   `ruzstd`, a pure-Rust decoder (one or more frames, skippable frames
//!   skipped). A zstd-compressed image *tarball* is still refused with
//!   [`OciError::Zstd`].
//!
//! ## Unpacking ([`OciImage::unpack`])
//!
//! In emberd layers are applied in a sandbox job (emberd's binary
//! re-executed as `emberd __sandboxed-unpack`, see `sandboxed.rs`), never
//! in emberd's process; so is the finding of [`OciImage::extract_file`].
//! Every blob is hashed again as it is applied and must still match its
//! digest and size. Layers are applied in order, below `dest`, with the
//! rules of [`archive`] plus layer semantics:
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
//!   so setuid bits survive; in a job, whose uid cannot chown, emberd sets
//!   them while taking the tree back). Without root, ownership stays the daemon's and
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
//!
//! ## Source files
//!
//! This file holds the types, errors and [`open_with`]; `layout.rs` reads
//! OCI layouts and `docker save` directories, `blobs.rs` holds digests and
//! blob reading, `unpack.rs` applies layers, `sandboxed.rs` runs that in a
//! sandbox job, `write.rs` writes layouts.

mod blobs;
mod layout;
mod sandboxed;
mod unpack;
mod write;

use layout::{open_docker, open_oci};
pub use sandboxed::{child_main, CHILD_ARG};
pub use write::{diff_layer, write_layout, write_layout_from};

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::images::archive::{self, ArchiveError, ExtractLimits};
use crate::images::volumes::VolumeError;

/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer.
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer.
pub const MEDIA_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
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

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

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
    /// The unpack job failed as a whole (could not start, was killed, ran
    /// out of time, answered nonsense, left what unpacking does not): the
    /// host's side, not the image's. Only unpacking in emberd returns it.
    #[error("unpack sandbox: {0}")]
    Sandbox(String),
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
    /// zstd (one or more frames).
    Zstd,
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
        // An unpredictable name: the default parent is the shared temp dir.
        crate::sandbox::mkdtemp(parent, "ember-oci")
            .map(ScratchDir)
            .map_err(io_err(parent))
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

/// The length of a layer blob once decompressed (tar, gzip or zstd, by
/// its magic bytes).
pub fn uncompressed_len(path: &Path) -> Result<u64, OciError> {
    let c = blobs::sniff_compression(path, "layer")?;
    let f = File::open(path).map_err(io_err(path))?;
    io::copy(
        &mut blobs::decompressed(c, io::BufReader::new(f)),
        &mut io::sink(),
    )
    .map_err(io_err(path))
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
        archive::extract_sandboxed(archive::ArchiveSource::File(f), &root, &cfg.limits)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
