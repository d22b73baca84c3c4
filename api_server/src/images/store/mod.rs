//! hyperd's container images, kept locally (ember has no registry).
//!
//! ## On disk
//!
//! The store lives in one directory (normally `<state>/container-images`):
//!
//! * `images.json`: the index, `{"images": [ImageRecord, ...]}`, written
//!   atomically with [`crate::fsutil::write_atomic`] under an exclusive
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
//!
//! ## Source files
//!
//! This file holds the errors and the store itself; the records are in
//! `records.rs`, names in `names.rs`, [`ImageStore::build`] and its
//! builder in `build.rs`, the Dockerfile parser in `dockerfile.rs` and the
//! builder's path and copy helpers in `paths.rs`; `test_util.rs` holds
//! the fixtures the unit tests share.

mod build;
mod dockerfile;
mod names;
mod paths;
mod records;
#[cfg(test)]
mod test_util;

pub use names::parse_name;
use names::{commit_name, resolve};
pub use records::{hyperd_list_entry, ImageConfigChanges, ImageRecord, RecordConfig};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::write_atomic;
use crate::images::archive::ExtractLimits;
use crate::images::ext4::{self, Ext4Error};
use crate::images::oci::{self, ImageConfig, OciError, OciImage, OpenConfig};
use crate::images::registry::{Credentials, Progress, Registry, RegistryError, RegistryErrorKind};

/// `ref.name` of the one image in each stored layout.
const LAYOUT_REF: &str = "image";
/// The index file.
const INDEX_FILE: &str = "images.json";
/// Repo and tag of an image without a name.
pub const NONE: &str = "<none>";

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
    /// A registry refused access, failed, or sent bad bytes.
    #[error("{0}")]
    Registry(RegistryError),
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
        OciError::Io { .. }
        | OciError::Volume(_)
        | OciError::Sandbox(_)
        | OciError::Archive(crate::images::archive::ArchiveError::Sandbox(_)) => {
            ImageStoreError::Internal(e.to_string())
        }
        other => ImageStoreError::Invalid(other.to_string()),
    }
}

/// Maps a [`RegistryError`] to the store's variants; the message keeps
/// the registry error's words ("manifest unknown", "unauthorized", ...).
fn from_registry(e: RegistryError) -> ImageStoreError {
    match e.kind() {
        RegistryErrorKind::NotFound => ImageStoreError::NotFound(e.to_string()),
        RegistryErrorKind::Invalid => ImageStoreError::Invalid(e.to_string()),
        RegistryErrorKind::Unauthorized
        | RegistryErrorKind::BadGateway
        | RegistryErrorKind::Internal => ImageStoreError::Registry(e),
    }
}

/// Maps an [`Ext4Error`] of a container's root filesystem `rootfs`: what
/// the image holds is the container's doing (`Invalid`), the host's tools
/// and files are the daemon's (`Internal`).
fn from_ext4(rootfs: &Path, e: Ext4Error) -> ImageStoreError {
    let msg = format!("container root filesystem {}: {e}", rootfs.display());
    match e {
        Ext4Error::NotExt4(_)
        | Ext4Error::Unsafe { .. }
        | Ext4Error::TooLarge(_)
        | Ext4Error::OverBudget { .. } => ImageStoreError::Invalid(msg),
        Ext4Error::ToolMissing
        | Ext4Error::Io { .. }
        | Ext4Error::OutNotDir(_)
        | Ext4Error::OutNotEmpty(_)
        | Ext4Error::Debugfs { .. }
        | Ext4Error::Sandbox(_) => ImageStoreError::Internal(msg),
    }
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
    registry: Option<Registry>,
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
            registry: None,
        })
    }

    /// Lets the store pull from and push to registries
    /// ([`ImageStore::pull`], [`ImageStore::push_to_registry`], `FROM
    /// <reference>` in builds).
    pub fn set_registry(&mut self, r: Registry) {
        self.registry = Some(r);
    }

    fn registry(&self) -> Result<&Registry> {
        self.registry.as_ref().ok_or_else(|| {
            ImageStoreError::Unsupported("this image store has no registry access".into())
        })
    }

    /// Pulls `reference` from its registry (see [`crate::images::registry`])
    /// and stores it under its familiar name (`repo:tag`; a pull by digest
    /// gets no name but keeps the digest in `repo@digest` form as the
    /// record's repo). `progress` gets Docker-style JSON lines. A failed
    /// pull leaves no image and no partial blob.
    pub fn pull(
        &self,
        reference: &str,
        creds: Option<&Credentials>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord> {
        let reg = self.registry()?;
        let tmp = self.temp_dir("pull")?;
        let pulled = reg
            .pull(reference, tmp.path(), creds, progress)
            .map_err(from_registry)?;
        let (repo, tag) = match pulled.name.split_once('@') {
            Some((repo, _)) => (repo.to_string(), NONE.to_string()),
            None => parse_name(&pulled.name)?,
        };
        // The same manifest pulled before: that image, (re)named.
        let known = self.load()?.into_iter().find(|r| {
            r.source_digest == pulled.digest && self.image_dir(r).join("index.json").is_file()
        });
        if let Some(rec) = known {
            progress(
                serde_json::json!({"status": format!("Status: Image is up to date for {}", pulled.name)}),
            );
            return if tag == NONE {
                Ok(rec)
            } else {
                self.tag(&rec.id, &format!("{repo}:{tag}"))
            };
        }
        let img = oci::open_with(pulled.layout(), None, &self.open_config()).map_err(from_oci)?;
        let layout = tmp.path().join("layout");
        let digest = oci::write_layout_from(&layout, &img, &[], &img.config, LAYOUT_REF)
            .map_err(from_oci)?;
        let mut rec = self.add_image(&layout, &digest, &repo, &tag, &img.config)?;
        let _l = self.lock()?;
        let mut records = self.load()?;
        for r in records.iter_mut().filter(|r| r.id == rec.id) {
            r.source_digest = pulled.digest.clone();
        }
        self.save(records)?;
        rec.source_digest = pulled.digest.clone();
        Ok(rec)
    }

    /// Pushes image `name_or_id` to the registry reference `target`
    /// (`host[:port]/repo:tag`); returns the manifest digest.
    pub fn push_to_registry(
        &self,
        name_or_id: &str,
        target: &str,
        creds: Option<&Credentials>,
        progress: Progress<'_>,
    ) -> Result<String> {
        let reg = self.registry()?;
        let rec = self.get(name_or_id)?;
        reg.push_layout(&self.image_dir(&rec), LAYOUT_REF, target, creds, progress)
            .map_err(from_registry)
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
            source_digest: String::new(),
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
        total += oci::uncompressed_len(&p).map_err(from_oci)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::test_util::{cat, context, exists, layout, store, write, Tmp};
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::io::Read;

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
