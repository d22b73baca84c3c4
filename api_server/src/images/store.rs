//! hyperd's container images, kept locally (ember has no registry).
//!
//! ## On disk
//!
//! The store lives in one directory (normally `<state>/container-images`):
//!
//! * `images.json`: the index, `{"images": [ImageRecord, ...]}`, written
//!   atomically with [`crate::model::store::write_atomic`] under an exclusive
//!   `flock` of `.lock`, so concurrent callers (threads or processes) never
//!   lose an update.
//! * `<id>/`: one OCI image layout per image, holding exactly one image
//!   whose `ref.name` is `image`. `<id>` is the 64-hex sha256 of that
//!   image's manifest; [`ImageRecord::short_id`] (12 hex) is what users see.
//!   Every layout is self-contained (it holds all of its layer blobs), so
//!   removing an image never breaks another one.
//! * `tmp/`: private (0700) scratch directories for builds, commits and
//!   ext4 images, removed when done (and stale ones when the store opens).
//!
//! A record is one *name* of an image: `(id, repo, tag)`. Several records
//! may share an id ([`ImageStore::tag`]). A name given to a new image is
//! taken from the image that had it; an image left without any name stays,
//! as `<none>:<none>` (like Docker's dangling images).
//!
//! ## Names
//!
//! `repo[:tag]` (tag `latest` when missing; a `:` followed by a `/`
//! belongs to a registry port). `docker.io/library/` and `docker.io/`
//! prefixes are dropped, so `busybox`, `busybox:latest` and
//! `docker.io/library/busybox:latest` are the same name. Lookups
//! ([`ImageStore::get`]) take a name, or an id prefix of at least 4 hex
//! digits (optionally `sha256:`-prefixed); an ambiguous prefix is refused.
//!
//! ## How images get in
//!
//! * [`ImageStore::import`] opens an OCI layout or `docker save` tarball
//!   with [`oci::open_with`] (all blobs verified) and stores it with
//!   [`oci::write_layout_from`]: the layer blobs are copied unchanged (never
//!   unpacked: no ownership or special-file information is lost), and a new
//!   config and manifest are written. The stored id is therefore the digest
//!   of *that* manifest, not the source's.
//! * [`ImageStore::build`] runs a Dockerfile subset without running
//!   anything (see [`ImageStore::build`]) and stores the result as a
//!   single-layer (flattened) image.
//! * [`ImageStore::commit`] with a base image stores the base's layers plus
//!   one [`oci::diff_layer`] layer (with whiteouts) of the container's tree;
//!   without a base, the tree as a single layer.
//!   [`ImageStore::commit_ext4`] does the same for a container whose root
//!   filesystem is an ext4 image, read with [`ext4::extract`].
//!
//! ## Errors
//!
//! [`ImageStoreError`] messages start the way hyperd's plain-text errors
//! did, so the HTTP status can be derived from them as well as from the
//! variant: `NotFound` → "no such image ...", `Invalid` → "bad parameter:
//! ...", `Conflict` → "conflict: ...". `Unsupported` (400 is appropriate)
//! and `Internal` (500) carry their message as is.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::images::archive::{self, ExtractLimits};
use crate::images::ext4::{self, Ext4Error};
use crate::images::oci::{self, ImageConfig, OciError, OciImage, OpenConfig};
use crate::model::store::write_atomic;

/// `ref.name` of the one image in each stored layout.
const LAYOUT_REF: &str = "image";
/// The index file.
const INDEX_FILE: &str = "images.json";
/// Repo and tag of an image without a name.
pub const NONE: &str = "<none>";
/// Largest Dockerfile read, in bytes.
const MAX_DOCKERFILE: u64 = 1 << 20;
/// Most symlinks followed resolving one path inside a rootfs.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// No image (or file) by that name.
    #[error("no such image: {0}")]
    NotFound(String),
    /// Bad input: a malformed name, image or Dockerfile.
    #[error("bad parameter: {0}")]
    Invalid(String),
    /// The operation conflicts with the store's state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A feature ember does not have (e.g. `RUN` in a Dockerfile).
    #[error("{0}")]
    Unsupported(String),
    /// A host-side failure (I/O, the index).
    #[error("{0}")]
    Internal(String),
}

type Result<T> = std::result::Result<T, ImageStoreError>;

fn internal(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageStoreError {
    move |e| ImageStoreError::Internal(format!("{what}: {e}"))
}

/// Maps an [`OciError`] to the store's variants.
fn from_oci(e: OciError) -> ImageStoreError {
    match e {
        OciError::RefNotFound { .. } | OciError::NotFound(_) => {
            ImageStoreError::NotFound(e.to_string())
        }
        OciError::Zstd(_) => ImageStoreError::Unsupported(e.to_string()),
        OciError::Io { .. } | OciError::Volume(_) => ImageStoreError::Internal(e.to_string()),
        other => ImageStoreError::Invalid(other.to_string()),
    }
}

/// Maps an [`Ext4Error`] of a container's root filesystem `rootfs`: what
/// the image holds is the container's doing (`Invalid`), the host's tools
/// and files are the daemon's (`Internal`).
fn from_ext4(rootfs: &Path, e: Ext4Error) -> ImageStoreError {
    let msg = format!("container root filesystem {}: {e}", rootfs.display());
    match e {
        Ext4Error::NotExt4(_) | Ext4Error::Unsafe { .. } | Ext4Error::TooLarge(_) => {
            ImageStoreError::Invalid(msg)
        }
        Ext4Error::ToolMissing
        | Ext4Error::Io { .. }
        | Ext4Error::OutNotDir(_)
        | Ext4Error::OutNotEmpty(_)
        | Ext4Error::Debugfs { .. } => ImageStoreError::Internal(msg),
    }
}

/// The runtime config kept in a record (the full config is in the layout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordConfig {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    #[serde(default)]
    pub user: String,
}

impl From<&ImageConfig> for RecordConfig {
    fn from(c: &ImageConfig) -> Self {
        RecordConfig {
            env: c.env.clone(),
            cmd: c.cmd.clone(),
            entrypoint: c.entrypoint.clone(),
            workdir: c.working_dir.clone(),
            user: c.user.clone(),
        }
    }
}

/// One name of a stored image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// sha256 of the stored manifest, 64 hex digits (no `sha256:`).
    pub id: String,
    /// Repository (`<none>` for an unnamed image).
    pub repo: String,
    /// Tag (`<none>` for an unnamed image).
    pub tag: String,
    /// When the image entered the store (unix seconds).
    pub created: u64,
    /// Uncompressed size of all layers (tar streams), in bytes.
    pub virtual_size: u64,
    /// Runtime config.
    pub config: RecordConfig,
}

impl ImageRecord {
    /// The 12-hex id users see.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    /// `repo:tag`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.repo, self.tag)
    }

    /// `sha256:<id>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", self.id)
    }

    pub fn is_named(&self) -> bool {
        self.repo != NONE
    }
}

/// `/images/get` entry: `repo:tag:imageId:created:virtualSize` (short id).
pub fn hyperd_list_entry(rec: &ImageRecord) -> String {
    format!(
        "{}:{}:{}:{}:{}",
        rec.repo,
        rec.tag,
        rec.short_id(),
        rec.created,
        rec.virtual_size
    )
}

/// Config changes of a commit; `None` keeps the base image's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfigChanges {
    /// `KEY=value` entries, merged by key into the base's env.
    pub env: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// e.g. `80/tcp`; added to the base's.
    pub exposed_ports: Option<Vec<String>>,
    /// Added to the base's.
    pub labels: Option<BTreeMap<String, String>>,
}

impl ImageConfigChanges {
    /// Reads the Docker container config that `/container/commit` carries
    /// as its body (`Env`, `Cmd`, `Entrypoint`, `WorkingDir`, `User`,
    /// `ExposedPorts`, `Labels`). Nulls, empty lists and empty strings mean
    /// "keep the base's value".
    pub fn from_docker_json(v: &Value) -> ImageConfigChanges {
        let c = ImageConfig::from_json(v);
        let list = |l: Vec<String>| (!l.is_empty()).then_some(l);
        let s = |s: String| (!s.is_empty()).then_some(s);
        ImageConfigChanges {
            env: list(c.env),
            cmd: list(c.cmd),
            entrypoint: list(c.entrypoint),
            working_dir: s(c.working_dir),
            user: s(c.user),
            exposed_ports: list(c.exposed_ports),
            labels: (!c.labels.is_empty()).then_some(c.labels),
        }
    }

    /// Applies the changes to `c`.
    pub fn apply(&self, c: &mut ImageConfig) {
        if let Some(env) = &self.env {
            for e in env {
                set_env(&mut c.env, e);
            }
        }
        if let Some(v) = &self.cmd {
            c.cmd = v.clone();
        }
        if let Some(v) = &self.entrypoint {
            c.entrypoint = v.clone();
        }
        if let Some(v) = &self.working_dir {
            c.working_dir = v.clone();
        }
        if let Some(v) = &self.user {
            c.user = v.clone();
        }
        if let Some(v) = &self.exposed_ports {
            for p in v {
                if !c.exposed_ports.contains(p) {
                    c.exposed_ports.push(p.clone());
                }
            }
            c.exposed_ports.sort();
        }
        if let Some(v) = &self.labels {
            c.labels
                .extend(v.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
}

/// Sets `KEY=value` in an env list (replacing the same key).
fn set_env(env: &mut Vec<String>, kv: &str) {
    let key = kv.split('=').next().unwrap_or(kv);
    if let Some(slot) = env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
        *slot = kv.to_string();
    } else {
        env.push(kv.to_string());
    }
}

// ---------------------------------------------------------------------------
// Names

/// Parses `repo[:tag]` into a normalized (repo, tag).
pub fn parse_name(s: &str) -> Result<(String, String)> {
    let bad = |why: &str| ImageStoreError::Invalid(format!("invalid image name {s:?}: {why}"));
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.contains('@') {
        return Err(bad("digest references cannot name an image"));
    }
    let (repo, tag) = match s.rfind(':') {
        Some(i) if !s[i + 1..].contains('/') => (&s[..i], &s[i + 1..]),
        _ => (s, "latest"),
    };
    let repo_ok = !repo.is_empty()
        && repo.len() <= 255
        && repo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && repo
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
        && !repo.ends_with('/')
        && !repo.contains("//");
    if !repo_ok {
        return Err(bad(
            "the repository must be lowercase letters, digits and . _ - / separators",
        ));
    }
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if !tag_ok {
        return Err(bad("the tag must be 1-128 letters, digits, _ . -"));
    }
    let repo = repo
        .strip_prefix("docker.io/library/")
        .or_else(|| repo.strip_prefix("index.docker.io/library/"))
        .or_else(|| repo.strip_prefix("docker.io/"))
        .unwrap_or(repo);
    Ok((repo.to_string(), tag.to_string()))
}

/// The (repo, tag) of a commit: `repo` alone may carry the tag, else `tag`
/// names it.
fn commit_name(repo: &str, tag: &str) -> Result<(String, String)> {
    if tag.is_empty() {
        parse_name(repo)
    } else {
        parse_name(&format!("{repo}:{tag}"))
    }
}

/// `sha256:`-stripped id prefix if `s` looks like one (≥ 4 hex digits).
fn id_prefix(s: &str) -> Option<String> {
    let h = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    (h.len() >= 4 && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

/// Indexes of the records `name_or_id` names: one record for a name, all
/// records of the image for an id prefix.
fn resolve(records: &[ImageRecord], name_or_id: &str) -> Result<Vec<usize>> {
    if let Ok((repo, tag)) = parse_name(name_or_id) {
        if let Some(i) = records
            .iter()
            .position(|r| r.is_named() && r.repo == repo && r.tag == tag)
        {
            return Ok(vec![i]);
        }
    }
    if let Some(p) = id_prefix(name_or_id) {
        let hits: Vec<usize> = (0..records.len())
            .filter(|&i| records[i].id.starts_with(&p))
            .collect();
        let first = hits.first().map(|&i| records[i].id.clone());
        if hits.iter().any(|&i| Some(&records[i].id) != first.as_ref()) {
            return Err(ImageStoreError::Invalid(format!(
                "image id prefix {name_or_id:?} is ambiguous"
            )));
        }
        if !hits.is_empty() {
            return Ok(hits);
        }
    }
    Err(ImageStoreError::NotFound(name_or_id.to_string()))
}

// ---------------------------------------------------------------------------
// Scratch directories and the lock

/// A private scratch directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Holds the store's `flock` until dropped.
struct Lock(#[allow(dead_code)] File);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Serialize, Deserialize, Default)]
struct Index {
    #[serde(default)]
    images: Vec<ImageRecord>,
}

// ---------------------------------------------------------------------------
// The store

/// hyperd's image store; see the module documentation.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed, mode 0700) the store at `root`, and
    /// removes scratch directories left by earlier processes.
    pub fn open(root: &Path) -> Result<ImageStore> {
        for d in [root.to_path_buf(), root.join("tmp")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(internal(d.display()))?;
        }
        let tmp = root.join("tmp");
        let mine = format!("-{}-", std::process::id());
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if !n.contains(&mine) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The OCI layout directory of an image.
    pub fn image_dir(&self, rec: &ImageRecord) -> PathBuf {
        self.root.join(&rec.id)
    }

    fn open_config(&self) -> OpenConfig {
        OpenConfig {
            limits: ExtractLimits::default(),
            scratch_dir: self.root.join("tmp"),
        }
    }

    fn temp_dir(&self, what: &str) -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = self.root.join("tmp").join(format!(
            "{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(internal(p.display()))?;
        Ok(TempDir(p))
    }

    fn lock(&self) -> Result<Lock> {
        let p = self.root.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(internal(p.display()))?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(internal(p.display())(e));
            }
        }
    }

    fn load(&self) -> Result<Vec<ImageRecord>> {
        let p = self.root.join(INDEX_FILE);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice::<Index>(&b)
                .map(|i| i.images)
                .map_err(|e| ImageStoreError::Internal(format!("{} is corrupt: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(internal(p.display())(e)),
        }
    }

    fn save(&self, images: Vec<ImageRecord>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&Index { images })
            .map_err(|e| ImageStoreError::Internal(format!("image index: {e}")))?;
        write_atomic(&self.root.join(INDEX_FILE), &bytes)
            .map_err(|e| ImageStoreError::Internal(e.to_string()))
    }

    /// All records, newest first (then by name).
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v = self.load().unwrap_or_else(|e| {
            log::warn!("image store: {e}");
            Vec::new()
        });
        v.sort_by(|a, b| {
            b.created
                .cmp(&a.created)
                .then_with(|| a.name().cmp(&b.name()))
        });
        v
    }

    /// The record named `name_or_id` (`repo:tag`, `repo`, or an id prefix).
    pub fn get(&self, name_or_id: &str) -> Result<ImageRecord> {
        let records = self.load()?;
        let idx = resolve(&records, name_or_id)?;
        idx.first()
            .and_then(|&i| records.get(i).cloned())
            .ok_or_else(|| ImageStoreError::NotFound(name_or_id.to_string()))
    }

    /// Opens a stored image (e.g. to unpack it).
    pub fn open_image(&self, name_or_id: &str) -> Result<OciImage> {
        let rec = self.get(name_or_id)?;
        oci::open_with(&self.image_dir(&rec), Some(LAYOUT_REF), &self.open_config())
            .map_err(from_oci)
    }

    /// Moves the layout at `layout` (holding image `digest` as
    /// [`LAYOUT_REF`]) into the store as `repo:tag` (both [`NONE`] for no
    /// name), taking the name from any other image.
    fn add_image(
        &self,
        layout: &Path,
        digest: &str,
        repo: &str,
        tag: &str,
        config: &ImageConfig,
    ) -> Result<ImageRecord> {
        let id = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                ImageStoreError::Internal(format!("unexpected manifest digest {digest:?}"))
            })?
            .to_string();
        let virtual_size = layout_virtual_size(layout, digest)?;
        let rec = ImageRecord {
            id: id.clone(),
            repo: repo.to_string(),
            tag: tag.to_string(),
            created: unix_now(),
            virtual_size,
            config: RecordConfig::from(config),
        };
        let _l = self.lock()?;
        let dir = self.root.join(&id);
        if !dir.join("index.json").is_file() {
            let _ = fs::remove_dir_all(&dir);
            fs::rename(layout, &dir).map_err(internal(dir.display()))?;
        }
        let mut records = self.load()?;
        insert_record(&mut records, rec.clone());
        self.save(records)?;
        Ok(rec)
    }

    /// Imports the image `reference` (or the only/first one) of `source`, an
    /// OCI layout directory or a `docker save` / OCI archive tarball, named
    /// `repo_tag` or else by the image's own name (`RepoTags`, `ref.name`
    /// when it is a full name), or `<none>:<none>`.
    pub fn import(
        &self,
        source: &Path,
        reference: Option<&str>,
        repo_tag: Option<&str>,
    ) -> Result<ImageRecord> {
        let name = repo_tag.map(parse_name).transpose()?;
        if fs::symlink_metadata(source).is_err() {
            return Err(ImageStoreError::NotFound(source.display().to_string()));
        }
        let img = oci::open_with(source, reference, &self.open_config()).map_err(from_oci)?;
        let (repo, tag) = name
            .or_else(|| {
                img.repo_tags
                    .iter()
                    // A bare tag (`ref.name` = "latest") is no image name.
                    .filter(|t| t.contains(':') || t.contains('/'))
                    .find_map(|t| parse_name(t).ok())
            })
            .unwrap_or_else(|| (NONE.to_string(), NONE.to_string()));
        let tmp = self.temp_dir("import")?;
        let layout = tmp.path().join("layout");
        let digest = oci::write_layout_from(&layout, &img, &[], &img.config, LAYOUT_REF)
            .map_err(from_oci)?;
        self.add_image(&layout, &digest, &repo, &tag, &img.config)
    }

    /// Gives the image `name_or_id` the extra name `repo_tag`.
    pub fn tag(&self, name_or_id: &str, repo_tag: &str) -> Result<ImageRecord> {
        let (repo, tag) = parse_name(repo_tag)?;
        let _l = self.lock()?;
        let mut records = self.load()?;
        let i = *resolve(&records, name_or_id)?
            .first()
            .ok_or_else(|| ImageStoreError::NotFound(name_or_id.to_string()))?;
        let mut rec = records[i].clone();
        rec.repo = repo;
        rec.tag = tag;
        insert_record(&mut records, rec.clone());
        self.save(records)?;
        Ok(rec)
    }

    /// Removes `name_or_id`. By name: that name only (the image goes when
    /// it was its last name). By id: the image with all its names; when it
    /// has several names this needs `force` ([`ImageStoreError::Conflict`]
    /// otherwise, like `docker rmi`). Whether a container still uses the
    /// image is the caller's check. Returns the removed records.
    pub fn remove(&self, name_or_id: &str, force: bool) -> Result<Vec<ImageRecord>> {
        let _l = self.lock()?;
        let mut records = self.load()?;
        let idx = resolve(&records, name_or_id)?;
        let by_id = idx.len() > 1
            || idx.first().is_some_and(|&i| {
                let r = &records[i];
                !(r.is_named()
                    && parse_name(name_or_id).ok() == Some((r.repo.clone(), r.tag.clone())))
            });
        if by_id && idx.len() > 1 && !force {
            let names: Vec<String> = idx.iter().map(|&i| records[i].name()).collect();
            return Err(ImageStoreError::Conflict(format!(
                "image {} is referenced by several names ({}): remove them by name, or force",
                records[idx[0]].short_id(),
                names.join(", ")
            )));
        }
        let mut removed = Vec::new();
        for &i in idx.iter().rev() {
            removed.push(records.remove(i));
        }
        removed.reverse();
        let id = removed.first().map(|r| r.id.clone()).unwrap_or_default();
        let last = !records.iter().any(|r| r.id == id);
        self.save(records)?;
        if last && !id.is_empty() {
            let dir = self.root.join(&id);
            if let Err(e) = fs::remove_dir_all(&dir) {
                log::warn!("image store: cannot remove {}: {e}", dir.display());
            }
        }
        Ok(removed)
    }

    /// Writes image `name_or_id` into the OCI layout `dest_layout` (created
    /// if needed; its other images stay, one with the same `ref.name` is
    /// replaced) as `ref_name` (default: the image's `repo:tag`). Layer
    /// blobs are copied unchanged. Returns the manifest digest written.
    pub fn push(
        &self,
        name_or_id: &str,
        dest_layout: &Path,
        ref_name: Option<&str>,
    ) -> Result<String> {
        let rec = self.get(name_or_id)?;
        let ref_name = match ref_name {
            Some(r) => r.to_string(),
            None if rec.is_named() => rec.name(),
            None => {
                return Err(ImageStoreError::Invalid(format!(
                    "image {} has no name: give a reference name to push it as",
                    rec.short_id()
                )))
            }
        };
        let img = oci::open_with(&self.image_dir(&rec), Some(LAYOUT_REF), &self.open_config())
            .map_err(from_oci)?;
        oci::write_layout_from(dest_layout, &img, &[], &img.config, &ref_name).map_err(from_oci)
    }

    /// A new image `repo:tag` of the tree `upper_dir` (a container's
    /// current root filesystem). With a base image `lower`: the base's
    /// layers plus one layer with the differences ([`oci::diff_layer`],
    /// whiteouts for deleted files), and the base's config; without: the
    /// tree as a single layer. `changes` then adjust the config.
    pub fn commit(
        &self,
        lower: Option<&str>,
        upper_dir: &Path,
        repo: &str,
        tag: &str,
        changes: &ImageConfigChanges,
    ) -> Result<ImageRecord> {
        let (repo, tag) = commit_name(repo, tag)?;
        if !fs::symlink_metadata(upper_dir).is_ok_and(|m| m.is_dir()) {
            return Err(ImageStoreError::NotFound(format!(
                "container root filesystem {}",
                upper_dir.display()
            )));
        }
        let tmp = self.temp_dir("commit")?;
        let layout = tmp.path().join("layout");
        let (digest, config) = match lower {
            None => {
                let mut c = ImageConfig::default();
                changes.apply(&mut c);
                let d = oci::write_layout(&layout, upper_dir, &c, LAYOUT_REF).map_err(from_oci)?;
                (d, c)
            }
            Some(base) => {
                let img = self.open_image(base)?;
                let lower_root = tmp.path().join("lower");
                img.unpack(&lower_root, &ExtractLimits::default())
                    .map_err(from_oci)?;
                let diff = tmp.path().join("diff.tar.gz");
                oci::diff_layer(&lower_root, upper_dir, &diff).map_err(from_oci)?;
                let mut c = img.config.clone();
                changes.apply(&mut c);
                let d = oci::write_layout_from(&layout, &img, &[diff.as_path()], &c, LAYOUT_REF)
                    .map_err(from_oci)?;
                (d, c)
            }
        };
        self.add_image(&layout, &digest, &repo, &tag, &config)
    }

    /// [`ImageStore::commit`] of a container whose root filesystem is the
    /// ext4 image `rootfs` (as [`ImageStore::rootfs_ext4`] made it): the
    /// tree is read out with [`ext4::extract`] (no mounting; the root's
    /// `lost+found` is left out, devices, FIFOs and sockets are skipped)
    /// into a scratch directory of the store, then committed. The image
    /// must not change meanwhile: stop or pause the VM using it first.
    pub fn commit_ext4(
        &self,
        lower: Option<&str>,
        rootfs: &Path,
        repo: &str,
        tag: &str,
        changes: &ImageConfigChanges,
    ) -> Result<ImageRecord> {
        // Cheap checks before a possibly long extraction.
        commit_name(repo, tag)?;
        if let Some(base) = lower {
            self.get(base)?;
        }
        if !fs::metadata(rootfs).is_ok_and(|m| m.is_file()) {
            return Err(ImageStoreError::NotFound(format!(
                "container root filesystem {}",
                rootfs.display()
            )));
        }
        let tmp = self.temp_dir("commit-ext4")?;
        let tree = tmp.path().join("rootfs");
        ext4::extract(rootfs, &tree).map_err(|e| from_ext4(rootfs, e))?;
        self.commit(lower, &tree, repo, tag, changes)
    }

    /// Builds an ext4 image of `name_or_id`'s root filesystem at `out`
    /// (`None`: sized to fit). Returns its size in MB.
    pub fn rootfs_ext4(&self, name_or_id: &str, out: &Path, size_mb: Option<u64>) -> Result<u64> {
        self.open_image(name_or_id)?
            .to_ext4(out, size_mb)
            .map_err(from_oci)
    }

    /// Builds an image from a Dockerfile subset and stores it as `tag`
    /// (`repo[:tag]`; empty: no name).
    ///
    /// `context_tar` is a tar or tar.gz (bzip2/xz are not supported), the
    /// build context, extracted with [`archive::extract_tar_gz`]'s safety
    /// rules; `dockerfile` is the Dockerfile's path in it (empty:
    /// `Dockerfile`). Nothing runs: the root filesystem is assembled in a
    /// scratch directory (the base image unpacked with whiteouts, then the
    /// copies) and stored as a single-layer image.
    ///
    /// Instructions: `FROM scratch` or `FROM <stored image> [AS name]`
    /// (one stage); `COPY`/`ADD [--chown=uid[:gid]] [--chmod=octal] src...
    /// dest` from the context only (JSON form too; `*`/`?` wildcards in the
    /// last component of a source; `ADD` of a local tar or tar.gz extracts
    /// it; URLs are refused); `ENV k=v ...` / `ENV k v`; `CMD`, `ENTRYPOINT`
    /// (JSON or shell form); `WORKDIR`; `LABEL`, `EXPOSE`, `USER`, `VOLUME`,
    /// `STOPSIGNAL`, `ARG name[=default]` (build args cannot be passed:
    /// defaults only), `MAINTAINER` (ignored). `$VAR` / `${VAR}` are
    /// substituted from ENV and ARG in those that take words. Comments,
    /// blank lines and `\` continuations are understood. Anything else
    /// (`RUN`, `HEALTHCHECK`, `SHELL`, `ONBUILD`, ...) fails before any
    /// work, naming the instruction and line.
    ///
    /// `progress` gets one JSON object per call (no trailing newline),
    /// hyperd/Docker style: `{"stream": "Step 1/4 : FROM scratch\n"}`, ...,
    /// `{"stream": "Successfully built <id>\n"}`.
    pub fn build(
        &self,
        context_tar: &[u8],
        dockerfile: &str,
        tag: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<ImageRecord> {
        let (repo, tagname) = if tag.trim().is_empty() {
            (NONE.to_string(), NONE.to_string())
        } else {
            parse_name(tag)?
        };
        let tmp = self.temp_dir("build")?;
        let ctx = tmp.path().join("context");
        archive::extract_tar_gz(context_tar, &ctx, &ExtractLimits::default())
            .map_err(|e| ImageStoreError::Invalid(format!("build context: {e}")))?;
        let dockerfile = if dockerfile.trim().is_empty() {
            "Dockerfile"
        } else {
            dockerfile
        };
        let df = context_path(&ctx, dockerfile).map_err(|_| {
            ImageStoreError::Invalid(format!(
                "Dockerfile {dockerfile:?} is not in the build context"
            ))
        })?;
        let mut text = String::new();
        File::open(&df)
            .and_then(|f| f.take(MAX_DOCKERFILE + 1).read_to_string(&mut text))
            .map_err(|e| ImageStoreError::Invalid(format!("Dockerfile {dockerfile:?}: {e}")))?;
        if text.len() as u64 > MAX_DOCKERFILE {
            return Err(ImageStoreError::Invalid(
                "the Dockerfile is larger than 1 MiB".into(),
            ));
        }
        let steps = parse_dockerfile(&text)?;

        let rootfs = tmp.path().join("rootfs");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(internal(rootfs.display()))?;
        let mut b = Builder {
            store: self,
            ctx: &ctx,
            rootfs: &rootfs,
            tmp: tmp.path(),
            config: ImageConfig::default(),
            args: BTreeMap::new(),
            n_tmp: 0,
        };
        let total = steps.len();
        for (i, st) in steps.iter().enumerate() {
            progress(
                &json!({"stream": format!("Step {}/{} : {}\n", i + 1, total, st.text)}).to_string(),
            );
            b.step(st).map_err(|e| match e {
                ImageStoreError::Invalid(m) => {
                    ImageStoreError::Invalid(format!("Dockerfile line {}: {m}", st.line))
                }
                ImageStoreError::NotFound(m) => {
                    ImageStoreError::NotFound(format!("{m} (Dockerfile line {})", st.line))
                }
                ImageStoreError::Unsupported(m) if !m.starts_with("Dockerfile line") => {
                    ImageStoreError::Unsupported(format!("Dockerfile line {}: {m}", st.line))
                }
                other => other,
            })?;
        }
        let config = b.config;
        let layout = tmp.path().join("layout");
        let digest = oci::write_layout(&layout, &rootfs, &config, LAYOUT_REF).map_err(from_oci)?;
        let rec = self.add_image(&layout, &digest, &repo, &tagname, &config)?;
        progress(&json!({"stream": format!(" ---> {}\n", rec.short_id())}).to_string());
        progress(
            &json!({"stream": format!("Successfully built {}\n", rec.short_id())}).to_string(),
        );
        if rec.is_named() {
            progress(
                &json!({"stream": format!("Successfully tagged {}\n", rec.name())}).to_string(),
            );
        }
        Ok(rec)
    }
}

/// Adds `rec`, taking its name from any other image (which stays as
/// `<none>:<none>` when that was its last name).
fn insert_record(records: &mut Vec<ImageRecord>, rec: ImageRecord) {
    if rec.is_named() {
        if let Some(i) = records
            .iter()
            .position(|r| r.is_named() && r.repo == rec.repo && r.tag == rec.tag)
        {
            let old = records.remove(i);
            if old.id != rec.id && !records.iter().any(|r| r.id == old.id) {
                records.push(ImageRecord {
                    repo: NONE.into(),
                    tag: NONE.into(),
                    ..old
                });
            }
        }
        // A name replaces the image's `<none>` record.
        records.retain(|r| r.id != rec.id || r.is_named());
    } else if records.iter().any(|r| r.id == rec.id) {
        return;
    }
    records.push(rec);
}

/// Sum of the uncompressed layer sizes of image `digest` in `layout`.
fn layout_virtual_size(layout: &Path, digest: &str) -> Result<u64> {
    let blob = |d: &str| -> Result<PathBuf> {
        let h = d
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| ImageStoreError::Internal(format!("bad digest {d:?}")))?;
        Ok(layout.join("blobs").join("sha256").join(h))
    };
    let mp = blob(digest)?;
    let manifest: Value = serde_json::from_slice(&fs::read(&mp).map_err(internal(mp.display()))?)
        .map_err(|e| ImageStoreError::Internal(format!("manifest: {e}")))?;
    let mut total = 0u64;
    for l in manifest
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let d = l.get("digest").and_then(Value::as_str).unwrap_or_default();
        let p = blob(d)?;
        let mut f = File::open(&p).map_err(internal(p.display()))?;
        let mut magic = [0u8; 2];
        let n = f.read(&mut magic).map_err(internal(p.display()))?;
        let f = File::open(&p).map_err(internal(p.display()))?;
        total += if n == 2 && magic == [0x1f, 0x8b] {
            io::copy(
                &mut flate2::read::MultiGzDecoder::new(BufReader::new(f)),
                &mut io::sink(),
            )
            .map_err(internal(p.display()))?
        } else {
            f.metadata().map_err(internal(p.display()))?.len()
        };
    }
    Ok(total)
}

// ---------------------------------------------------------------------------
// Dockerfile parsing

/// One instruction (continuations joined).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    /// Line where it starts (1-based).
    line: usize,
    /// Upper-case keyword.
    keyword: String,
    /// Everything after the keyword, trimmed.
    args: String,
    /// `KEYWORD args`, for progress.
    text: String,
}

const SUPPORTED: &[&str] = &[
    "FROM",
    "COPY",
    "ADD",
    "ENV",
    "CMD",
    "ENTRYPOINT",
    "WORKDIR",
    "LABEL",
    "EXPOSE",
    "USER",
    "VOLUME",
    "STOPSIGNAL",
    "ARG",
    "MAINTAINER",
];

/// Splits a Dockerfile into steps and checks every instruction is one the
/// builder supports (so nothing is done for a file that would fail).
fn parse_dockerfile(text: &str) -> Result<Vec<Step>> {
    let mut raw: Vec<(usize, String)> = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_none()) {
            continue;
        }
        if t.is_empty() {
            continue; // a blank line inside a continuation
        }
        let line = line.trim_end();
        let (piece, cont) = match line.strip_suffix('\\') {
            Some(p) => (p, true),
            None => (line, false),
        };
        match &mut cur {
            None => cur = Some((n + 1, piece.trim_start().to_string())),
            Some((_, s)) => s.push_str(piece),
        }
        if !cont {
            raw.extend(cur.take());
        }
    }
    raw.extend(cur.take());

    let mut steps = Vec::new();
    let mut froms = 0;
    for (line, s) in raw {
        let (kw, args) = match s.find(char::is_whitespace) {
            Some(i) => (&s[..i], s[i..].trim()),
            None => (s.as_str(), ""),
        };
        let keyword = kw.to_ascii_uppercase();
        let at = |m: String| ImageStoreError::Unsupported(format!("Dockerfile line {line}: {m}"));
        match keyword.as_str() {
            "RUN" => {
                return Err(at(
                    "RUN is not supported: ember builds without running containers".into(),
                ))
            }
            "HEALTHCHECK" | "SHELL" | "ONBUILD" => {
                return Err(at(format!(
                "{keyword} is not supported by ember's builder (no containers run during builds)"
            )))
            }
            k if SUPPORTED.contains(&k) => {}
            _ => {
                return Err(ImageStoreError::Invalid(format!(
                    "Dockerfile line {line}: unknown instruction {kw:?}"
                )))
            }
        }
        if keyword == "FROM" {
            froms += 1;
            if froms > 1 {
                return Err(at(
                    "multi-stage builds (a second FROM) are not supported".into()
                ));
            }
        } else if froms == 0 && keyword != "ARG" {
            return Err(ImageStoreError::Invalid(format!(
                "Dockerfile line {line}: {keyword} before FROM (a Dockerfile starts with FROM)"
            )));
        }
        steps.push(Step {
            line,
            text: if args.is_empty() {
                keyword.clone()
            } else {
                format!("{keyword} {args}")
            },
            keyword,
            args: args.to_string(),
        });
    }
    if froms == 0 {
        return Err(ImageStoreError::Invalid(
            "the Dockerfile has no FROM".into(),
        ));
    }
    Ok(steps)
}

/// The JSON (exec) form, if `args` is one: a JSON array of strings.
fn json_form(args: &str) -> Option<Vec<String>> {
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args).ok()
}

/// Splits `s` into words like Docker's shell lexer: whitespace separates,
/// `'...'` is literal, `"..."` and bare words expand `$VAR` / `${VAR}`
/// (unset: empty) and take `\` escapes.
fn words(s: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    let expand = |chars: &mut std::iter::Peekable<std::str::Chars>,
                  cur: &mut String|
     -> Result<()> {
        let name: String = if chars.peek() == Some(&'{') {
            chars.next();
            let mut n = String::new();
            loop {
                match chars.next() {
                    Some('}') => break,
                    Some(c) => n.push(c),
                    None => return Err(ImageStoreError::Invalid(format!("missing '}}' in {s:?}"))),
                }
            }
            n
        } else {
            let mut n = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    n.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if n.is_empty() {
                cur.push('$');
                return Ok(());
            }
            n
        };
        // ${VAR:-default} and ${VAR:+alt}
        let value = if let Some((n, d)) = name.split_once(":-") {
            vars.get(n)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| d.to_string())
        } else if let Some((n, a)) = name.split_once(":+") {
            if vars.get(n).is_some_and(|v| !v.is_empty()) {
                a.to_string()
            } else {
                String::new()
            }
        } else {
            vars.get(&name).cloned().unwrap_or_default()
        };
        cur.push_str(&value);
        Ok(())
    };
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => {
                            return Err(ImageStoreError::Invalid(format!(
                                "unterminated quote in {s:?}"
                            )))
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        Some('$') => expand(&mut chars, &mut cur)?,
                        Some(c) => cur.push(c),
                        None => {
                            return Err(ImageStoreError::Invalid(format!(
                                "unterminated quote in {s:?}"
                            )))
                        }
                    }
                }
            }
            '$' => {
                in_word = true;
                expand(&mut chars, &mut cur)?;
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Exec form as is, shell form as `/bin/sh -c <args>`.
fn command_form(args: &str) -> Vec<String> {
    match json_form(args) {
        Some(v) => v,
        None if args.is_empty() => Vec::new(),
        None => vec!["/bin/sh".into(), "-c".into(), args.to_string()],
    }
}

// ---------------------------------------------------------------------------
// Paths

/// The real path of `rel` (relative to the build context root, or absolute
/// meaning the same) inside `ctx`: `..` may not climb out of the context,
/// and symlinks must stay inside it.
fn context_path(ctx: &Path, rel: &str) -> Result<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(s) => parts.push(s),
            Component::ParentDir if parts.pop().is_none() => {
                return Err(ImageStoreError::Invalid(format!(
                    "{rel:?} is outside the build context"
                )));
            }
            Component::ParentDir => {}
            _ => {}
        }
    }
    let full = parts.iter().fold(ctx.to_path_buf(), |p, c| p.join(c));
    let real = fs::canonicalize(&full)
        .map_err(|_| ImageStoreError::NotFound(format!("{rel:?} in the build context")))?;
    let root = fs::canonicalize(ctx).map_err(internal(ctx.display()))?;
    if !real.starts_with(&root) {
        return Err(ImageStoreError::Invalid(format!(
            "{rel:?} is outside the build context"
        )));
    }
    Ok(real)
}

/// Shell-style match of `*` and `?`.
fn wildcard(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&pat[1..], s) || (!s.is_empty() && wildcard(pat, &s[1..])),
        (Some(b'?'), Some(_)) => wildcard(&pat[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => wildcard(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// The context paths a COPY source names (wildcards in the last
/// component), sorted.
fn context_sources(ctx: &Path, src: &str) -> Result<Vec<PathBuf>> {
    let p = Path::new(src);
    let last = p.file_name().map(|n| n.to_string_lossy().to_string());
    match last {
        Some(l) if l.contains(['*', '?']) => {
            let parent = p
                .parent()
                .map(|q| q.to_string_lossy().to_string())
                .unwrap_or_default();
            let dir = context_path(ctx, if parent.is_empty() { "." } else { &parent })?;
            let mut hits = Vec::new();
            for e in fs::read_dir(&dir).map_err(internal(dir.display()))? {
                let e = e.map_err(internal(dir.display()))?;
                let n = e.file_name();
                if wildcard(l.as_bytes(), n.as_encoded_bytes()) {
                    let rel = Path::new(&parent).join(&n);
                    hits.push(context_path(ctx, &rel.to_string_lossy())?);
                }
            }
            hits.sort();
            if hits.is_empty() {
                return Err(ImageStoreError::NotFound(format!(
                    "no file matches {src:?} in the build context"
                )));
            }
            Ok(hits)
        }
        _ => Ok(vec![context_path(ctx, src)?]),
    }
}

/// Resolves the absolute image path `path` below `root` like a chroot
/// would: symlinks (the last component's too) are followed inside the
/// root, `..` stops at it. Missing components are kept as named. The
/// result is free of symlinks (it may not exist yet).
fn resolve_in_rootfs(root: &Path, path: &str) -> Result<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    todo.reverse();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        cur.push(c);
        let full: PathBuf = cur.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        match fs::symlink_metadata(&full) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(ImageStoreError::Invalid(format!(
                        "too many symlinks in {path:?}"
                    )));
                }
                let target = fs::read_link(&full).map_err(internal(full.display()))?;
                cur.pop();
                if target.is_absolute() {
                    cur.clear();
                }
                let mut t: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(s) => Some(s.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                t.reverse();
                todo.extend(t);
            }
            Ok(md) if !md.is_dir() && !todo.is_empty() => {
                return Err(ImageStoreError::Invalid(format!(
                    "{path:?}: a parent in the image is not a directory"
                )))
            }
            _ => {}
        }
    }
    Ok(cur.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Makes `dir` (symlink-free parents) a real directory, creating missing
/// parents with mode 0755 and replacing a non-directory.
fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(dir).map_err(internal(dir.display()))?,
        Err(_) => {}
    }
    if let Some(p) = dir.parent() {
        if fs::symlink_metadata(p).is_err() {
            ensure_dir(p, 0o755)?;
        }
    }
    fs::DirBuilder::new()
        .mode(mode & 0o7777)
        .create(dir)
        .map_err(internal(dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(internal(dir.display()))
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p).map_err(internal(p.display())),
        Ok(_) => fs::remove_file(p).map_err(internal(p.display())),
        Err(_) => Ok(()),
    }
}

/// Options of one COPY/ADD.
#[derive(Clone, Copy, Default)]
struct CopyOpts {
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
}

fn lchown(p: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(internal(p.display()))
}

/// Copies the context entry `src` to `dst` (parents symlink-free); a
/// directory's *contents* are merged into `dst`.
fn copy_entry(src: &Path, dst: &Path, o: CopyOpts) -> Result<()> {
    let md = fs::symlink_metadata(src).map_err(internal(src.display()))?;
    let ft = md.file_type();
    if ft.is_dir() {
        ensure_dir(dst, o.chmod.unwrap_or(md.mode()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(internal(src.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            copy_entry(&src.join(&n), &dst.join(&n), o)?;
        }
    } else if ft.is_symlink() {
        remove_any(dst)?;
        let t = fs::read_link(src).map_err(internal(src.display()))?;
        std::os::unix::fs::symlink(&t, dst).map_err(internal(dst.display()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
    } else if ft.is_file() {
        remove_any(dst)?;
        let mode = o.chmod.unwrap_or(md.mode()) & 0o7777;
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
            .map_err(internal(src.display()))?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(dst)
            .map_err(internal(dst.display()))?;
        io::copy(&mut from, &mut to).map_err(internal(dst.display()))?;
        if let Some(own) = o.owner {
            lchown(dst, own)?;
        }
        to.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(internal(dst.display()))?;
    }
    // Sockets/FIFOs/devices cannot come from an extracted context.
    Ok(())
}

/// What kind of archive a file is, by its first bytes.
enum ArchiveKind {
    Tar,
    Other(&'static str),
    None,
}

fn sniff_archive(p: &Path) -> ArchiveKind {
    let mut head = Vec::with_capacity(512);
    if File::open(p)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .is_err()
    {
        return ArchiveKind::None;
    }
    if head.starts_with(&[0x1f, 0x8b]) || head.get(257..262) == Some(b"ustar") {
        ArchiveKind::Tar
    } else if head.starts_with(b"BZh") {
        ArchiveKind::Other("bzip2")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        ArchiveKind::Other("xz")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ArchiveKind::Other("zstd")
    } else {
        ArchiveKind::None
    }
}

// ---------------------------------------------------------------------------
// The builder

struct Builder<'a> {
    store: &'a ImageStore,
    ctx: &'a Path,
    rootfs: &'a Path,
    tmp: &'a Path,
    config: ImageConfig,
    args: BTreeMap<String, String>,
    n_tmp: u32,
}

impl Builder<'_> {
    fn vars(&self) -> BTreeMap<String, String> {
        let mut v = self.args.clone();
        for e in &self.config.env {
            if let Some((k, val)) = e.split_once('=') {
                v.insert(k.to_string(), val.to_string());
            }
        }
        v
    }

    fn words(&self, s: &str) -> Result<Vec<String>> {
        words(s, &self.vars())
    }

    /// `KEY=value` pairs (or the legacy `KEY value...` form when
    /// `legacy`).
    fn pairs(&self, args: &str, what: &str, legacy: bool) -> Result<Vec<(String, String)>> {
        let w = self.words(args)?;
        let Some(first) = w.first() else {
            return Err(ImageStoreError::Invalid(format!("{what} needs arguments")));
        };
        if !first.contains('=') {
            if !legacy || w.len() < 2 {
                return Err(ImageStoreError::Invalid(format!("{what} needs KEY=value")));
            }
            return Ok(vec![(first.clone(), w[1..].join(" "))]);
        }
        w.iter()
            .map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| {
                        ImageStoreError::Invalid(format!("{what}: {kv:?} is not KEY=value"))
                    })
            })
            .collect()
    }

    /// An absolute image path for `p` (relative to WORKDIR).
    fn image_path(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else {
            let wd = if self.config.working_dir.is_empty() {
                "/"
            } else {
                &self.config.working_dir
            };
            format!("{}/{}", wd.trim_end_matches('/'), p)
        }
    }

    fn step(&mut self, st: &Step) -> Result<()> {
        let args = st.args.as_str();
        match st.keyword.as_str() {
            "FROM" => self.from(args),
            "COPY" => self.copy(args, false),
            "ADD" => self.copy(args, true),
            "ENV" => {
                for (k, v) in self.pairs(args, "ENV", true)? {
                    set_env(&mut self.config.env, &format!("{k}={v}"));
                }
                Ok(())
            }
            "ARG" => {
                for w in self.words(args)? {
                    let (k, v) = w.split_once('=').unwrap_or((&w, ""));
                    self.args.insert(k.to_string(), v.to_string());
                }
                Ok(())
            }
            "LABEL" => {
                for (k, v) in self.pairs(args, "LABEL", true)? {
                    self.config.labels.insert(k, v);
                }
                Ok(())
            }
            "CMD" => {
                self.config.cmd = command_form(args);
                Ok(())
            }
            "ENTRYPOINT" => {
                self.config.entrypoint = command_form(args);
                // Docker: a new ENTRYPOINT drops the CMD inherited so far.
                self.config.cmd.clear();
                Ok(())
            }
            "WORKDIR" => {
                let w = self.words(args)?;
                let [p] = w.as_slice() else {
                    return Err(ImageStoreError::Invalid("WORKDIR takes one path".into()));
                };
                let abs = self.image_path(p);
                let dir = resolve_in_rootfs(self.rootfs, &abs)?;
                ensure_dir(&dir, 0o755)?;
                self.config.working_dir = normalize_abs(&abs);
                Ok(())
            }
            "EXPOSE" => {
                for p in self.words(args)? {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    if !self.config.exposed_ports.contains(&p) {
                        self.config.exposed_ports.push(p);
                    }
                }
                self.config.exposed_ports.sort();
                Ok(())
            }
            "USER" => {
                self.config.user = self.words(args)?.join(" ");
                Ok(())
            }
            "VOLUME" => {
                let v = match json_form(args) {
                    Some(v) => v,
                    None => self.words(args)?,
                };
                for p in v {
                    if !self.config.volumes.contains(&p) {
                        self.config.volumes.push(p);
                    }
                }
                self.config.volumes.sort();
                Ok(())
            }
            "STOPSIGNAL" => {
                self.config.stop_signal = self.words(args)?.join(" ");
                Ok(())
            }
            "MAINTAINER" => Ok(()),
            other => Err(ImageStoreError::Unsupported(format!(
                "{other} is not supported"
            ))),
        }
    }

    fn from(&mut self, args: &str) -> Result<()> {
        let w = self.words(args)?;
        let w: Vec<&String> = w.iter().filter(|a| !a.starts_with("--platform=")).collect();
        let image = match w.as_slice() {
            [i] => i.as_str(),
            [i, as_, _] if as_.eq_ignore_ascii_case("as") => i.as_str(),
            _ => {
                return Err(ImageStoreError::Invalid(
                    "FROM takes an image [AS name]".into(),
                ))
            }
        };
        if image == "scratch" {
            return Ok(());
        }
        let img = match self.store.open_image(image) {
            Err(ImageStoreError::NotFound(_)) => {
                return Err(ImageStoreError::NotFound(format!(
                    "{image} (ember has no registry: import the base image first)"
                )))
            }
            r => r?,
        };
        img.unpack(self.rootfs, &ExtractLimits::default())
            .map_err(from_oci)?;
        self.config = img.config.clone();
        Ok(())
    }

    fn copy(&mut self, args: &str, add: bool) -> Result<()> {
        let what = if add { "ADD" } else { "COPY" };
        let mut rest = args;
        let mut o = CopyOpts::default();
        while let Some(r) = rest.strip_prefix("--") {
            let (flag, tail) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
            rest = tail.trim_start();
            let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
            match k {
                "chown" => {
                    let (u, g) = v.split_once(':').unwrap_or((v, v));
                    match (u.parse::<u32>(), g.parse::<u32>()) {
                        (Ok(u), Ok(g)) => o.owner = Some((u, g)),
                        _ => {
                            return Err(ImageStoreError::Unsupported(format!(
                                "{what} --chown={v}: only numeric uid[:gid] is supported"
                            )))
                        }
                    }
                }
                "chmod" => {
                    o.chmod = Some(
                        u32::from_str_radix(v, 8).map_err(|_| {
                            ImageStoreError::Invalid(format!(
                                "{what} --chmod={v}: not an octal mode"
                            ))
                        })? & 0o7777,
                    )
                }
                "link" => {}
                "from" => {
                    return Err(ImageStoreError::Unsupported(format!(
                        "{what} --from is not supported (single-stage builds only)"
                    )))
                }
                _ => {
                    return Err(ImageStoreError::Invalid(format!(
                        "{what}: unknown flag --{k}"
                    )))
                }
            }
        }
        let mut list = match json_form(rest) {
            Some(v) => {
                // JSON form: no word splitting; variables are expanded.
                let vars = self.vars();
                v.iter().map(|s| expand_only(s, &vars)).collect::<Vec<_>>()
            }
            None => self.words(rest)?,
        };
        if list.len() < 2 {
            return Err(ImageStoreError::Invalid(format!(
                "{what} needs a source and a destination"
            )));
        }
        let dest = list.pop().unwrap_or_default();
        for s in &list {
            let lower = s.to_ascii_lowercase();
            if lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("git@")
                || lower.contains("://")
            {
                return Err(ImageStoreError::Unsupported(format!(
                    "{what} {s}: sources from URLs are not supported (ember builds offline, from the context only)"
                )));
            }
        }
        let mut sources = Vec::new();
        for s in &list {
            sources.extend(context_sources(self.ctx, s)?);
        }
        let abs = self.image_path(&dest);
        let dest_is_dir = dest.ends_with('/') || dest.ends_with("/.") || dest == ".";
        if sources.len() > 1 && !dest_is_dir {
            return Err(ImageStoreError::Invalid(format!(
                "{what} with several sources needs a destination ending in '/'"
            )));
        }
        // Symlinks of the base (e.g. /bin -> usr/bin) are followed inside
        // the root, like Docker does.
        let target = resolve_in_rootfs(self.rootfs, &abs)?;
        let target_is_dir = dest_is_dir || fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
        for src in sources {
            let md = fs::symlink_metadata(&src).map_err(internal(src.display()))?;
            if md.is_dir() {
                copy_entry(&src, &target, o)?;
                continue;
            }
            if add && md.is_file() {
                match sniff_archive(&src) {
                    ArchiveKind::Tar => {
                        self.n_tmp += 1;
                        let x = self.tmp.join(format!("add-{}", self.n_tmp));
                        let f = File::open(&src).map_err(internal(src.display()))?;
                        archive::extract_tar_gz(BufReader::new(f), &x, &ExtractLimits::default())
                            .map_err(|e| {
                            ImageStoreError::Invalid(format!(
                                "ADD {}: {e}",
                                display_rel(self.ctx, &src)
                            ))
                        })?;
                        let r = copy_entry(&x, &target, o);
                        let _ = fs::remove_dir_all(&x);
                        r?;
                        continue;
                    }
                    ArchiveKind::Other(kind) => {
                        return Err(ImageStoreError::Unsupported(format!(
                            "ADD {}: {kind} archives are not supported (tar and tar.gz only)",
                            display_rel(self.ctx, &src)
                        )))
                    }
                    ArchiveKind::None => {}
                }
            }
            let dst = if target_is_dir {
                let name = src.file_name().ok_or_else(|| {
                    ImageStoreError::Invalid(format!("{what}: a source has no file name"))
                })?;
                target.join(name)
            } else {
                target.clone()
            };
            if let Some(p) = dst.parent() {
                ensure_dir(p, 0o755)?;
            }
            copy_entry(&src, &dst, o)?;
        }
        Ok(())
    }
}

/// `$VAR` / `${VAR}` expansion without word splitting (JSON forms).
fn expand_only(s: &str, vars: &BTreeMap<String, String>) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
    words(&format!("\"{escaped}\""), vars)
        .ok()
        .and_then(|w| w.into_iter().next())
        .unwrap_or_else(|| s.to_string())
}

fn display_rel(ctx: &Path, p: &Path) -> String {
    let root = fs::canonicalize(ctx).unwrap_or_else(|_| ctx.to_path_buf());
    p.strip_prefix(&root).unwrap_or(p).display().to_string()
}

/// `/a/./b/../c/` → `/a/c`.
fn normalize_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Tmp {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "ember-imgstore-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn write(p: &Path, data: &str, mode: u32) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A tar (optionally gzip) of (path, content) regular files.
    fn tar_of(files: &[(&str, &str)], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, c) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(c.len() as u64);
            b.append_data(&mut h, p, c.as_bytes()).unwrap();
        }
        let t = b.into_inner().unwrap();
        if gzip {
            let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            g.write_all(&t).unwrap();
            g.finish().unwrap()
        } else {
            t
        }
    }

    /// A build context tar with text files and binary files.
    fn context(files: &[(&str, &str)], bins: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, c) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(c.len() as u64);
            b.append_data(&mut h, p, c.as_bytes()).unwrap();
        }
        for (p, c) in bins {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(c.len() as u64);
            b.append_data(&mut h, p, c.as_slice()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let tool = ["/usr/sbin/debugfs", "/sbin/debugfs", "debugfs"]
            .into_iter()
            .find(|t| Path::new(t).is_file())
            .unwrap_or("debugfs");
        let out = Command::new(tool)
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .expect("debugfs (e2fsprogs) is needed by these tests");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn cat(img: &Path, p: &str) -> String {
        let out = debugfs(img, &format!("cat {p}"));
        // debugfs prints its version banner on stderr first.
        out.lines()
            .filter(|l| !l.starts_with("debugfs "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn exists(img: &Path, p: &str) -> bool {
        !debugfs(img, &format!("stat {p}")).contains("File not found")
    }

    /// A one-image OCI layout named `name` with `files`.
    fn layout(t: &Tmp, name: &str, files: &[(&str, &str)], cfg: &ImageConfig) -> PathBuf {
        let root =
            t.0.join(format!("src-rootfs-{}", name.replace([':', '/'], "_")));
        for (p, c) in files {
            write(&root.join(p), c, 0o644);
        }
        let dir = t.0.join("layout");
        oci::write_layout(&dir, &root, cfg, name).unwrap();
        dir
    }

    fn store(t: &Tmp) -> ImageStore {
        ImageStore::open(&t.0.join("container-images")).unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(
            parse_name("busybox").unwrap(),
            ("busybox".into(), "latest".into())
        );
        assert_eq!(
            parse_name("docker.io/library/busybox:1.36").unwrap(),
            ("busybox".into(), "1.36".into())
        );
        assert_eq!(
            parse_name("localhost:5000/a/b").unwrap(),
            ("localhost:5000/a/b".into(), "latest".into())
        );
        for bad in ["", "Upper", "a@sha256:00", "a:", "a:-x", "/a", "a//b"] {
            assert!(
                matches!(parse_name(bad), Err(ImageStoreError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(id_prefix("sha256:ABCD"), Some("abcd".into()));
        assert_eq!(id_prefix("abc"), None);
    }

    #[test]
    fn dockerfile_parsing() {
        let df = "# c\n\nFROM scratch\nENV A=1 \\\n  # inner comment\n  B=2\nCMD echo hi\n";
        let s = parse_dockerfile(df).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[1].line, s[1].keyword.as_str()), (4, "ENV"));
        assert_eq!(s[1].args, "A=1   B=2");
        assert_eq!(s[2].line, 7);
        let e = parse_dockerfile("FROM scratch\n\nrun make\n").unwrap_err();
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert_eq!(
            e.to_string(),
            "Dockerfile line 3: RUN is not supported: ember builds without running containers"
        );
        assert!(parse_dockerfile("COPY a b\n").is_err());
        assert!(parse_dockerfile("FROM scratch\nFROM scratch\n").is_err());
        assert!(matches!(
            parse_dockerfile("FROM scratch\nFOO x\n"),
            Err(ImageStoreError::Invalid(_))
        ));
        let mut v = BTreeMap::new();
        v.insert("A".to_string(), "1".to_string());
        assert_eq!(
            words(r#"x=$A "y ${A}" 'z $A' \$A ${B:-d}"#, &v).unwrap(),
            vec!["x=1", "y 1", "z $A", "$A", "d"]
        );
        assert_eq!(command_form(r#"["a", "b"]"#), vec!["a", "b"]);
        assert_eq!(command_form("echo hi"), vec!["/bin/sh", "-c", "echo hi"]);
        assert!(wildcard(b"*.txt", b"a.txt") && !wildcard(b"*.txt", b"a.txz"));
    }

    #[test]
    fn import_list_get_tag_remove() {
        let t = Tmp::new("import");
        let s = store(&t);
        let cfg = ImageConfig {
            env: vec!["PATH=/bin".into()],
            cmd: vec!["/hello".into()],
            ..Default::default()
        };
        let src = layout(&t, "busybox:1.0", &[("hello", "hi\n")], &cfg);
        let rec = s.import(&src, None, None).unwrap();
        assert_eq!((rec.repo.as_str(), rec.tag.as_str()), ("busybox", "1.0"));
        assert_eq!(rec.id.len(), 64);
        assert_eq!(rec.config.cmd, vec!["/hello"]);
        assert!(rec.virtual_size > 0);
        assert!(s.image_dir(&rec).join("index.json").is_file());
        assert_eq!(s.list(), vec![rec.clone()]);
        assert_eq!(
            hyperd_list_entry(&rec),
            format!(
                "busybox:1.0:{}:{}:{}",
                &rec.id[..12],
                rec.created,
                rec.virtual_size
            )
        );
        assert_eq!(s.get("busybox:1.0").unwrap(), rec);
        assert_eq!(s.get("docker.io/library/busybox:1.0").unwrap(), rec);
        assert_eq!(s.get(&rec.id[..4]).unwrap(), rec);
        assert_eq!(s.get(&format!("sha256:{}", &rec.id[..12])).unwrap(), rec);
        assert!(matches!(
            s.get("busybox"),
            Err(ImageStoreError::NotFound(_))
        ));
        assert!(matches!(
            s.get(&rec.id[..3]),
            Err(ImageStoreError::NotFound(_))
        ));

        // A tarball of the layout, named by the argument.
        let tarball = t.0.join("image.tar");
        {
            let mut b = tar::Builder::new(File::create(&tarball).unwrap());
            b.append_dir_all(".", &src).unwrap();
            b.finish().unwrap();
        }
        let rec2 = s
            .import(&tarball, Some("busybox:1.0"), Some("other"))
            .unwrap();
        assert_eq!(rec2.name(), "other:latest");
        assert_ne!(rec2.id, rec.id);
        assert_eq!(s.list().len(), 2);
        assert!(matches!(
            s.import(&src, Some("nope:1"), None),
            Err(ImageStoreError::NotFound(_))
        ));
        assert!(matches!(
            s.import(&t.0.join("missing"), None, None),
            Err(ImageStoreError::NotFound(_))
        ));

        // Re-using a name leaves the old image dangling.
        let rec3 = s.import(&src, None, Some("other:latest")).unwrap();
        let old = s.get(&rec2.id).unwrap();
        assert_eq!(old.name(), "<none>:<none>");
        assert_eq!(s.get("other").unwrap().id, rec3.id);

        // Two names: removing by id needs force; by name removes the name.
        s.tag("busybox:1.0", "alias:v1").unwrap();
        let e = s.remove(&rec.id[..8], false).unwrap_err();
        assert!(matches!(e, ImageStoreError::Conflict(_)), "{e}");
        let removed = s.remove("alias:v1", false).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(s.image_dir(&rec).is_dir());
        s.tag(&rec.id, "alias:v1").unwrap();
        let removed = s.remove(&rec.id[..8], true).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!s.image_dir(&rec).exists());
        assert!(matches!(
            s.get("busybox:1.0"),
            Err(ImageStoreError::NotFound(_))
        ));
        s.remove(&old.id, false).unwrap();
        s.remove("other", false).unwrap();
        assert!(s.list().is_empty());
        // Only the lock, the index and the scratch directory remain.
        let mut left: Vec<String> = fs::read_dir(s.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, vec![".lock", "images.json", "tmp"]);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn build_from_scratch_then_from_it() {
        let t = Tmp::new("build");
        let s = store(&t);
        let df = "# a test image\n\
                  FROM scratch\n\
                  ENV A=1 \\\n    B=\"two words\"\n\
                  WORKDIR /app\n\
                  COPY hello.txt .\n\
                  COPY dir /opt/dir/\n\
                  COPY [\"hello.txt\", \"/etc/greeting\"]\n\
                  COPY *.md /docs/\n\
                  ENV C $A-x\n\
                  EXPOSE 80\n\
                  CMD [\"/app/run\", \"--flag\"]\n";
        let ctx = context(
            &[
                ("Dockerfile", df),
                ("hello.txt", "hello\n"),
                ("dir/a", "A\n"),
                ("dir/sub/b", "B\n"),
                ("x.md", "X\n"),
                ("y.md", "Y\n"),
            ],
            &[],
        );
        let mut lines = Vec::new();
        let rec = s
            .build(&ctx, "", "first:v1", &mut |l| lines.push(l.to_string()))
            .unwrap();
        assert_eq!(rec.name(), "first:v1");
        assert_eq!(rec.config.env, vec!["A=1", "B=two words", "C=1-x"]);
        assert_eq!(rec.config.cmd, vec!["/app/run", "--flag"]);
        assert_eq!(rec.config.workdir, "/app");
        let streams: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["stream"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(streams[0], "Step 1/10 : FROM scratch\n");
        assert_eq!(streams[1], "Step 2/10 : ENV A=1     B=\"two words\"\n");
        assert!(streams.contains(&format!("Successfully built {}\n", rec.short_id())));
        assert_eq!(streams.last().unwrap(), "Successfully tagged first:v1\n");
        let img = s.open_image("first:v1").unwrap();
        assert_eq!(img.layers().len(), 1);
        assert_eq!(img.config.exposed_ports, vec!["80/tcp"]);

        let ext4 = t.0.join("first.ext4");
        assert!(s.rootfs_ext4("first:v1", &ext4, None).unwrap() > 0);
        assert_eq!(cat(&ext4, "/app/hello.txt"), "hello");
        assert_eq!(cat(&ext4, "/opt/dir/a"), "A");
        assert_eq!(cat(&ext4, "/opt/dir/sub/b"), "B");
        assert_eq!(cat(&ext4, "/etc/greeting"), "hello");
        assert_eq!(cat(&ext4, "/docs/x.md"), "X");
        assert_eq!(cat(&ext4, "/docs/y.md"), "Y");
        assert!(!exists(&ext4, "/Dockerfile"));

        // FROM the first image, with a Dockerfile elsewhere in the context.
        let df2 =
            "FROM first:v1\nCOPY new.txt ./\nCOPY hello.txt /app/hello.txt\nENTRYPOINT echo $A\n";
        let ctx2 = context(
            &[
                ("build/Custom", df2),
                ("new.txt", "new\n"),
                ("hello.txt", "changed\n"),
            ],
            &[],
        );
        let rec2 = s
            .build(&ctx2, "build/Custom", "second", &mut |_| {})
            .unwrap();
        assert_eq!(rec2.name(), "second:latest");
        assert_eq!(rec2.config.env, rec.config.env);
        assert_eq!(rec2.config.workdir, "/app");
        assert_eq!(rec2.config.entrypoint, vec!["/bin/sh", "-c", "echo $A"]);
        assert!(
            rec2.config.cmd.is_empty(),
            "ENTRYPOINT drops the inherited CMD"
        );
        let ext4b = t.0.join("second.ext4");
        s.rootfs_ext4("second", &ext4b, Some(8)).unwrap();
        assert_eq!(cat(&ext4b, "/app/new.txt"), "new");
        assert_eq!(cat(&ext4b, "/app/hello.txt"), "changed");
        assert_eq!(cat(&ext4b, "/opt/dir/sub/b"), "B");
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn build_refusals() {
        let t = Tmp::new("refuse");
        let s = store(&t);
        let build = |df: &str| {
            let ctx = context(&[("Dockerfile", df), ("f", "f\n")], &[]);
            s.build(&ctx, "Dockerfile", "x", &mut |_| {}).unwrap_err()
        };
        let e = build("FROM scratch\nCOPY f /f\nRUN make\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert!(
            e.to_string().contains("line 3") && e.to_string().contains("RUN is not supported"),
            "{e}"
        );
        let e = build("FROM scratch\nADD https://example.com/x.tar /x\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert!(
            e.to_string().contains("URL") && e.to_string().contains("line 2"),
            "{e}"
        );
        let e = build("FROM scratch\nCOPY ../x /x\n");
        assert!(matches!(e, ImageStoreError::Invalid(_)), "{e}");
        assert!(
            e.to_string().contains("outside the build context") && e.to_string().contains("line 2"),
            "{e}"
        );
        let e = build("FROM scratch\nCOPY missing /x\n");
        assert!(matches!(e, ImageStoreError::NotFound(_)), "{e}");
        let e = build("FROM nothere:1\n");
        assert!(matches!(e, ImageStoreError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("no registry"), "{e}");
        let e = build("FROM scratch\nCOPY --from=builder /a /b\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)), "{e}");
        let ctx = context(&[("f", "f\n")], &[]);
        assert!(matches!(
            s.build(&ctx, "", "x", &mut |_| {}),
            Err(ImageStoreError::Invalid(_))
        ));
        assert!(matches!(
            s.build(&ctx, "../Dockerfile", "x", &mut |_| {}),
            Err(ImageStoreError::Invalid(_))
        ));
        assert!(s.list().is_empty());
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn build_follows_base_symlinks_inside_the_root() {
        let t = Tmp::new("links");
        let s = store(&t);
        let root = t.0.join("base-rootfs");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        // A link that tries to climb out of the root stays inside it.
        std::os::unix::fs::symlink("../../../../../../tmp/escape", root.join("esc")).unwrap();
        let dir = t.0.join("layout");
        oci::write_layout(&dir, &root, &ImageConfig::default(), "links:1").unwrap();
        s.import(&dir, None, None).unwrap();
        let df = "FROM links:1\nCOPY f /bin/\nCOPY f /lib/g\nCOPY f /esc/h\nWORKDIR /lib/w\n";
        let ctx = context(&[("Dockerfile", df), ("f", "F\n")], &[]);
        let rec = s.build(&ctx, "", "linked", &mut |_| {}).unwrap();
        assert_eq!(rec.config.workdir, "/lib/w");
        let ext4 = t.0.join("l.ext4");
        s.rootfs_ext4("linked", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/usr/bin/f"), "F");
        assert_eq!(cat(&ext4, "/usr/lib/g"), "F");
        assert_eq!(cat(&ext4, "/tmp/escape/h"), "F");
        assert!(exists(&ext4, "/usr/lib/w"));
        assert!(debugfs(&ext4, "stat /bin").contains("Type: symlink"));
        assert!(debugfs(&ext4, "stat /lib").contains("Type: symlink"));
        assert!(!Path::new("/tmp/escape/h").exists());
    }

    #[test]
    fn build_add_extracts_tars() {
        let t = Tmp::new("add");
        let s = store(&t);
        let df = "FROM scratch\nADD files.tar.gz /srv/\nADD plain.tar /plain\nADD --chmod=755 note.txt /bin/note\n";
        let ctx = context(
            &[("Dockerfile", df), ("note.txt", "just a file\n")],
            &[
                (
                    "files.tar.gz",
                    tar_of(&[("inner/x", "X\n"), ("y", "Y\n")], true),
                ),
                ("plain.tar", tar_of(&[("p", "P\n")], false)),
            ],
        );
        s.build(&ctx, "", "added", &mut |_| {}).unwrap();
        let ext4 = t.0.join("add.ext4");
        s.rootfs_ext4("added", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/srv/inner/x"), "X");
        assert_eq!(cat(&ext4, "/srv/y"), "Y");
        assert_eq!(cat(&ext4, "/plain/p"), "P");
        assert!(!exists(&ext4, "/srv/files.tar.gz"));
        assert_eq!(cat(&ext4, "/bin/note"), "just a file");
        assert!(debugfs(&ext4, "stat /bin/note").contains("Mode:  0755"));
    }

    #[test]
    fn push_and_reimport() {
        let t = Tmp::new("push");
        let s = store(&t);
        let src = layout(
            &t,
            "app:1",
            &[("etc/app.conf", "conf\n")],
            &ImageConfig::default(),
        );
        let rec = s.import(&src, None, None).unwrap();
        let other = s
            .build(
                &context(
                    &[("Dockerfile", "FROM scratch\nCOPY f /f\n"), ("f", "f\n")],
                    &[],
                ),
                "",
                "b:2",
                &mut |_| {},
            )
            .unwrap();
        let dest = t.0.join("pushed");
        s.push(&rec.id[..6], &dest, Some("pushed:v2")).unwrap();
        s.push("b:2", &dest, None).unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(dest.join("index.json")).unwrap()).unwrap();
        let names: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["annotations"][oci::ANNOTATION_REF_NAME].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["pushed:v2", "b:2"]);

        let back = s.import(&dest, Some("pushed:v2"), None).unwrap();
        assert_eq!(back.name(), "pushed:v2");
        let ext4 = t.0.join("back.ext4");
        s.rootfs_ext4("pushed:v2", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/etc/app.conf"), "conf");
        let back_b = s.import(&dest, Some("b:2"), Some("b:3")).unwrap();
        assert_eq!(back_b.virtual_size, other.virtual_size);
    }

    /// Imports `base:1` (files a, b, d/e; Env A=1, Cmd /old), the base of
    /// the commit tests.
    fn import_commit_base(t: &Tmp, s: &ImageStore) {
        let cfg = ImageConfig {
            env: vec!["A=1".into()],
            cmd: vec!["/old".into()],
            ..Default::default()
        };
        let src = layout(
            t,
            "base:1",
            &[("a", "a\n"), ("b", "b\n"), ("d/e", "e\n")],
            &cfg,
        );
        s.import(&src, None, None).unwrap();
    }

    #[test]
    fn commit_base_and_flat() {
        let t = Tmp::new("commit");
        let s = store(&t);
        import_commit_base(&t, &s);
        // The container's tree: the base unpacked, then changed.
        let upper = t.0.join("container-rootfs");
        s.open_image("base:1")
            .unwrap()
            .unpack(&upper, &ExtractLimits::default())
            .unwrap();
        write(&upper.join("a"), "changed\n", 0o644);
        fs::remove_file(upper.join("b")).unwrap();
        write(&upper.join("c"), "new\n", 0o755);
        let changes = ImageConfigChanges::from_docker_json(&json!({
            "Env": ["B=2", "A=3"], "Cmd": ["date"], "WorkingDir": "", "Entrypoint": null
        }));
        assert_eq!(changes.working_dir, None);
        let rec = s
            .commit(Some("base:1"), &upper, "committed", "v1", &changes)
            .unwrap();
        assert_eq!(rec.name(), "committed:v1");
        assert_eq!(rec.config.env, vec!["A=3", "B=2"]);
        assert_eq!(rec.config.cmd, vec!["date"]);
        assert_eq!(s.open_image("committed:v1").unwrap().layers().len(), 2);
        let ext4 = t.0.join("c.ext4");
        s.rootfs_ext4("committed:v1", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/a"), "changed");
        assert_eq!(cat(&ext4, "/c"), "new");
        assert_eq!(cat(&ext4, "/d/e"), "e");
        assert!(!exists(&ext4, "/b"));

        let flat = s
            .commit(None, &upper, "flat", "", &ImageConfigChanges::default())
            .unwrap();
        assert_eq!(flat.name(), "flat:latest");
        assert!(flat.config.cmd.is_empty());
        assert_eq!(s.open_image("flat").unwrap().layers().len(), 1);
        let ext4f = t.0.join("f.ext4");
        s.rootfs_ext4("flat", &ext4f, None).unwrap();
        assert_eq!(cat(&ext4f, "/a"), "changed");
        assert!(!exists(&ext4f, "/b"));
        assert!(matches!(
            s.commit(
                Some("nope"),
                &upper,
                "x",
                "",
                &ImageConfigChanges::default()
            ),
            Err(ImageStoreError::NotFound(_))
        ));
    }

    #[test]
    fn commit_ext4_diffs_a_changed_rootfs_image() {
        let t = Tmp::new("commit-ext4");
        let s = store(&t);
        import_commit_base(&t, &s);
        // The container's root filesystem as emberd makes it, read back...
        let rootfs = t.0.join("rootfs.ext4");
        s.rootfs_ext4("base:1", &rootfs, None).unwrap();
        let tree = t.0.join("tree");
        ext4::extract(&rootfs, &tree).unwrap();
        assert!(!tree.join("lost+found").exists());
        assert_eq!(fs::read(tree.join("d/e")).unwrap(), b"e\n");
        // ... changed as a container would, and made an ext4 image again.
        write(&tree.join("a"), "changed\n", 0o644);
        fs::remove_file(tree.join("b")).unwrap();
        write(&tree.join("c"), "new\n", 0o755);
        write(&tree.join("n/f"), "nested\n", 0o600);
        std::os::unix::fs::symlink("/a", tree.join("l")).unwrap();
        let changed = t.0.join("changed.ext4");
        crate::images::volumes::create_ext4_from_dir(&changed, &tree, None).unwrap();

        let changes = ImageConfigChanges::from_docker_json(&json!({
            "Env": ["B=2"], "Cmd": ["date"]
        }));
        let rec = s
            .commit_ext4(Some("base:1"), &changed, "committed", "v2", &changes)
            .unwrap();
        assert_eq!(rec.name(), "committed:v2");
        assert_eq!(rec.config.env, vec!["A=1", "B=2"]);
        assert_eq!(rec.config.cmd, vec!["date"]);
        let img = s.open_image("committed:v2").unwrap();
        assert_eq!(img.layers().len(), 2);
        assert_eq!(img.config.cmd, vec!["date"]);

        // The diff layer: what changed, a whiteout for b, nothing else (no
        // lost+found, not the unchanged d/e).
        let top = img.layers().last().unwrap();
        let blob = s
            .image_dir(&rec)
            .join("blobs/sha256")
            .join(top.digest.trim_start_matches("sha256:"));
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(blob).unwrap()));
        let mut got = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().to_string();
            let path = path
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap() & 0o7777;
            let mut data = String::new();
            if kind.is_symlink() {
                data = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
            } else {
                e.read_to_string(&mut data).unwrap();
            }
            got.insert(path, (kind, mode, data));
        }
        let keys: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(keys, [".wh.b", "a", "c", "l", "n", "n/f"]);
        assert_eq!(got["a"].2, "changed\n");
        assert_eq!((got["c"].1, got["c"].2.as_str()), (0o755, "new\n"));
        assert_eq!((got["n/f"].1, got["n/f"].2.as_str()), (0o600, "nested\n"));
        assert!(got["n"].0.is_dir());
        assert!(got["l"].0.is_symlink());
        assert_eq!(got["l"].2, "/a");
        assert_eq!(got[".wh.b"].2, "");

        // The new image as a root filesystem again.
        let back = t.0.join("back.ext4");
        s.rootfs_ext4("committed:v2", &back, None).unwrap();
        assert_eq!(cat(&back, "/a"), "changed");
        assert_eq!(cat(&back, "/n/f"), "nested");
        assert_eq!(cat(&back, "/d/e"), "e");
        assert!(!exists(&back, "/b"));

        // Refusals, the cheap ones before any extraction.
        let none = ImageConfigChanges::default();
        assert!(matches!(
            s.commit_ext4(Some("nope"), &changed, "x", "", &none),
            Err(ImageStoreError::NotFound(_))
        ));
        assert!(matches!(
            s.commit_ext4(None, &t.0.join("missing.ext4"), "x", "", &none),
            Err(ImageStoreError::NotFound(_))
        ));
        assert!(matches!(
            s.commit_ext4(None, &changed, "Bad Name", "", &none),
            Err(ImageStoreError::Invalid(_))
        ));
        let junk = t.0.join("junk.ext4");
        fs::write(&junk, vec![7u8; 8192]).unwrap();
        let e = s.commit_ext4(None, &junk, "x", "", &none).unwrap_err();
        assert!(matches!(e, ImageStoreError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("not an ext4"), "{e}");
        // Nothing left in the store's scratch directory.
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }
}
