//! The worker side of building and moving artifacts: compiling an image
//! from a source archive ([`ImageJob::build`]), making a volume file
//! ([`VolumeJob::build`]), and pushing, pulling and deleting images on the
//! UniK hub ([`HubPush`], [`HubPull`], [`HubDelete`]). The supervisor's
//! `prepare_*` calls make the jobs on the loop thread and its `finish_*`
//! calls install what they produce.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::supervisor::{ErrorKind, ImageJob, Supervisor, SupervisorError, VolumeJob};
use super::{new_id, Image};
use crate::build::{CompileError, CompileInput, CompileOutput};
use crate::images::archive::{extract_sandboxed, ArchiveError, ArchiveSource, ExtractLimits};
use crate::images::hub::{Hub, HubConfig, HubError};
use crate::images::volumes::{self, VolumeError};

/// An uploaded tar(.gz) that could not be extracted: the upload's fault
/// (400), unless the extraction job itself failed (500).
fn tarfile_error(e: ArchiveError) -> SupervisorError {
    match e {
        ArchiveError::Sandbox(_) => SupervisorError::Internal(format!("tarfile: {e}")),
        other => SupervisorError::Invalid(format!("tarfile: {other}")),
    }
}

impl ImageJob {
    /// Worker side of an image build: extract the tar(.gz) `tar` (in a
    /// sandbox job), compile.
    pub fn build(&self, tar: &[u8]) -> Result<CompileOutput, SupervisorError> {
        extract_sandboxed(
            ArchiveSource::Bytes(tar),
            &self.src_dir(),
            &Default::default(),
        )
        .map_err(tarfile_error)?;
        std::fs::create_dir_all(self.out_dir())
            .map_err(|e| SupervisorError::Internal(e.to_string()))?;
        self.compiler
            .compile(&CompileInput {
                src_dir: &self.src_dir(),
                out_dir: &self.out_dir(),
            })
            .map_err(|e| match e {
                CompileError::Tool { .. } | CompileError::Io(_) => {
                    SupervisorError::Internal(e.to_string())
                }
                other => SupervisorError::Invalid(other.to_string()),
            })
    }
}

impl VolumeJob {
    /// Worker side of a volume build: empty (ext4 or raw zeros), a raw
    /// image from `data`, or ext4 filled from the tar(.gz) `data`. Returns
    /// the size in MiB.
    pub fn build(&self, data: Option<&[u8]>, raw: bool) -> Result<u64, SupervisorError> {
        let vol_err = |e: VolumeError| match e {
            VolumeError::TooSmall { .. }
            | VolumeError::RawTooLarge(_)
            | VolumeError::EmptyRaw
            | VolumeError::InvalidSize(_) => SupervisorError::Invalid(e.to_string()),
            other => SupervisorError::Internal(other.to_string()),
        };
        match (data, raw) {
            (None, _) => {
                let size = self.size_mb.unwrap_or(1);
                if raw {
                    volumes::create_raw(&self.staging_file, std::io::empty(), Some(size))
                        .map_err(vol_err)
                } else {
                    volumes::create_empty_ext4(&self.staging_file, size).map_err(vol_err)?;
                    Ok(size)
                }
            }
            (Some(bytes), true) => {
                volumes::create_raw(&self.staging_file, bytes, self.size_mb).map_err(vol_err)
            }
            (Some(bytes), false) => {
                let dir = self.staging.join("content");
                // A volume of a given size can hold no more than that.
                let mut limits = ExtractLimits::default();
                if let Some(mb) = self.size_mb {
                    limits.max_bytes = limits.max_bytes.min(mb.saturating_mul(1 << 20));
                }
                extract_sandboxed(ArchiveSource::Bytes(bytes), &dir, &limits)
                    .map_err(tarfile_error)?;
                volumes::create_ext4_from_dir(&self.staging_file, &dir, self.size_mb)
                    .map_err(vol_err)
            }
        }
    }
}

/// What kind of failure a hub operation had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubFault {
    /// The request (hub config, names) is unusable.
    Invalid,
    /// Not on the hub, or no such local image.
    NotFound,
    /// The hub refused the credentials.
    Denied,
    /// The local image exists already.
    Conflict,
    /// A local failure.
    Internal,
    /// The hub failed, or what it holds is not ember's.
    Upstream,
}

/// Errors of hub operations.
#[derive(Debug, thiserror::Error)]
pub enum HubJobError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Local(String),
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Hub(#[from] HubError),
    #[error("{0}")]
    Model(#[from] SupervisorError),
}

impl HubJobError {
    /// What kind of failure this is.
    pub fn fault(&self) -> HubFault {
        match self {
            HubJobError::Invalid(_) => HubFault::Invalid,
            HubJobError::Conflict(_) => HubFault::Conflict,
            HubJobError::Local(_) => HubFault::Internal,
            HubJobError::Upstream(_) => HubFault::Upstream,
            HubJobError::Hub(e) => match e {
                HubError::NotFound(_) => HubFault::NotFound,
                HubError::Config(_) | HubError::Invalid(_) => HubFault::Invalid,
                HubError::Auth { .. } => HubFault::Denied,
                HubError::Io { .. } => HubFault::Internal,
                _ => HubFault::Upstream,
            },
            HubJobError::Model(e) => match e.kind() {
                ErrorKind::Invalid => HubFault::Invalid,
                ErrorKind::NotFound => HubFault::NotFound,
                ErrorKind::Conflict => HubFault::Conflict,
                ErrorKind::Internal => HubFault::Internal,
            },
        }
    }
}

type HubResult<T> = Result<T, HubJobError>;

/// The hub a request's JSON body (`{url, user, pass}`) names.
fn hub_from(config: &[u8]) -> HubResult<Hub> {
    let v: Value = serde_json::from_slice(config).map_err(|e| {
        HubJobError::Invalid(format!("hub config must be JSON {{url, user, pass}}: {e}"))
    })?;
    let cfg = HubConfig::from_json(&v).map_err(|e| HubJobError::Invalid(e.to_string()))?;
    Hub::new(cfg).map_err(|e| HubJobError::Invalid(e.to_string()))
}

/// Packs an image directory as tar.gz for the hub. Symlinks are packed as
/// symlinks, never followed: the directory was written by a build.
fn pack_image(dir: &Path, out: &Path) -> std::io::Result<()> {
    let f = std::fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    t.follow_symlinks(false);
    t.append_dir_all(".", dir)?;
    t.into_inner()?.finish()?.sync_all()
}

/// An image to push to the hub; [`HubPush::run`] pushes it.
pub struct HubPush {
    hub: Hub,
    image: Image,
    dir: PathBuf,
    scratch: PathBuf,
}

impl HubPush {
    /// Loop side: image `name` to the hub that `config` names.
    pub fn prepare(sup: &Supervisor, name: &str, config: &[u8]) -> HubResult<HubPush> {
        let hub = hub_from(config)?;
        let image = sup.image(name)?.clone();
        Ok(HubPush {
            hub,
            dir: sup.store().image_dir(&image.id),
            scratch: sup
                .store()
                .staging_dir()
                .join(format!("push-{}", new_id("job"))),
            image,
        })
    }

    /// Worker side: packs and uploads the image.
    pub fn run(self) -> HubResult<()> {
        let res = (|| {
            std::fs::create_dir_all(&self.scratch)
                .map_err(|e| HubJobError::Local(e.to_string()))?;
            let art = self.scratch.join("image.tar.gz");
            pack_image(&self.dir, &art)
                .map_err(|e| HubJobError::Local(format!("cannot pack the image: {e}")))?;
            let meta = serde_json::to_string(&self.image).unwrap_or_default();
            Ok(self.hub.push(&self.image.name, &meta, &art)?)
        })();
        let _ = std::fs::remove_dir_all(&self.scratch);
        res
    }
}

/// An image to pull from the hub; [`HubPull::run`] downloads it and
/// [`HubPull::install`] installs it.
pub struct HubPull {
    hub: Hub,
    name: String,
    force: bool,
    scratch: PathBuf,
}

/// A downloaded, unpacked image, ready to install.
pub struct Pulled {
    image: Image,
    dir: PathBuf,
}

impl HubPull {
    /// Loop side: image `name` from the hub that `config` names (`force`:
    /// replacing a local image of that name).
    pub fn prepare(sup: &Supervisor, name: &str, force: bool, config: &[u8]) -> HubResult<HubPull> {
        if !force && sup.state().image(name).is_some() {
            return Err(HubJobError::Conflict(format!(
                "image {name} already exists; use force=true to overwrite it"
            )));
        }
        Ok(HubPull {
            hub: hub_from(config)?,
            name: name.to_string(),
            force,
            scratch: sup
                .store()
                .staging_dir()
                .join(format!("pull-{}", new_id("job"))),
        })
    }

    /// Worker side: downloads and unpacks the image.
    pub fn run(&self) -> HubResult<Pulled> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| HubJobError::Local(e.to_string()))?;
        let art = self.scratch.join("image.tar.gz");
        let meta = self.hub.pull(&self.name, &art)?;
        let mut image: Image = serde_json::from_str(&meta).map_err(|e| {
            HubJobError::Upstream(format!("the hub's image metadata is not ember's: {e}"))
        })?;
        image.name = self.name.clone();
        let dir = self.scratch.join("image");
        let f = std::fs::File::open(&art).map_err(|e| HubJobError::Local(e.to_string()))?;
        extract_sandboxed(ArchiveSource::File(f), &dir, &Default::default()).map_err(
            |e| match e {
                ArchiveError::Sandbox(_) => {
                    HubJobError::Local(format!("the hub's image archive: {e}"))
                }
                other => HubJobError::Upstream(format!("the hub's image archive: {other}")),
            },
        )?;
        Ok(Pulled { image, dir })
    }

    /// Loop side: installs what [`HubPull::run`] gave; the download is
    /// removed either way.
    pub fn install(self, sup: &mut Supervisor, pulled: HubResult<Pulled>) -> HubResult<Image> {
        let r = match pulled {
            Ok(p) => sup
                .install_image(p.image, &p.dir, self.force)
                .map_err(HubJobError::from),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&self.scratch);
        r
    }
}

/// An image to delete from the hub; [`HubDelete::run`] deletes it.
pub struct HubDelete {
    hub: Hub,
    name: String,
}

impl HubDelete {
    /// Image `name` on the hub that `config` names.
    pub fn prepare(name: &str, config: &[u8]) -> HubResult<HubDelete> {
        Ok(HubDelete {
            hub: hub_from(config)?,
            name: name.to_string(),
        })
    }

    /// Worker side: deletes it.
    pub fn run(self) -> HubResult<()> {
        Ok(self.hub.remote_delete(&self.name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn packing_an_image_never_follows_its_symlinks() {
        let t = TempDir::new();
        let secret = t.0.join("secret");
        std::fs::write(&secret, "ROOT-ONLY-CANARY").unwrap();
        let dir = t.0.join("image");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("kernel"), b"\x7fELF").unwrap();
        // What a build's uid could plant in the image directory.
        std::os::unix::fs::symlink(&secret, dir.join("initrd")).unwrap();
        let out = t.0.join("image.tar.gz");
        pack_image(&dir, &out).unwrap();
        let mut bytes = Vec::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(std::fs::File::open(&out).unwrap())
            .read_to_end(&mut bytes)
            .unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("ROOT-ONLY-CANARY"));
        let mut ar = tar::Archive::new(&bytes[..]);
        let link = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().ends_with("initrd"))
            .unwrap();
        assert_eq!(link.header().entry_type(), tar::EntryType::Symlink);
    }
}
