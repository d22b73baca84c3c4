//! Persistence of the model: one JSON document written atomically (temp
//! file, fsync, rename, fsync of the directory), so a crash or kill -9 at any
//! moment leaves either the old or the new state, never a torn one.
//!
//! Modes do not follow the umask: the state directory and its folders are
//! 0700, and the state (which holds instances' environment), console logs
//! and volume images are 0600, all root's. Temp files of a write that did
//! not finish are removed, and so are any a crash left behind.

use std::fs;
use std::path::{Path, PathBuf};

use crate::model::State;

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {err}")]
    Dir { path: PathBuf, err: std::io::Error },
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} is corrupt: {err}")]
    Corrupt {
        path: PathBuf,
        err: serde_json::Error,
    },
}

/// Writes `data` to `path` atomically (see [`crate::fsutil::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    crate::fsutil::write_atomic(path, data).map_err(|err| StoreError::Write {
        path: path.to_path_buf(),
        err,
    })
}

pub use crate::fsutil::{private_dir, private_file, root_only};

/// A scratch directory (under the store's staging area), removed with
/// everything in it when dropped, on success and failure paths alike.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates `path` afresh (an old one is removed first).
    pub fn create(path: PathBuf) -> std::io::Result<Scratch> {
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Scratch(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The state directory and its layout.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the state directory.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["", "images", "volumes", "logs", "staging", "tmp"] {
            let p = root.join(sub);
            private_dir(&p).map_err(|err| StoreError::Dir { path: p, err })?;
        }
        // Temp files of atomic writes a crash interrupted.
        if let Ok(rd) = fs::read_dir(root) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if n.starts_with('.') && n.contains(".tmp-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    /// Where an image's files live.
    pub fn image_dir(&self, id: &str) -> PathBuf {
        self.root.join("images").join(id)
    }

    /// A volume's disk image.
    pub fn volume_path(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.img"))
    }

    /// An instance's serial console log.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// Scratch space for uploads and builds (same filesystem as the rest,
    /// so results can be renamed into place).
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Loads the saved state (empty if none yet).
    pub fn load(&self) -> Result<State, StoreError> {
        let p = self.state_path();
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|err| StoreError::Corrupt { path: p, err }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(err) => Err(StoreError::Read { path: p, err }),
        }
    }

    /// Stores registry credentials for `server` (hyperd's `/auth`) in
    /// `auth.json`, a file only root can read (0600), written atomically.
    pub fn save_credentials(&self, server: &str, entry: serde_json::Value) -> std::io::Result<()> {
        let path = self.root.join("auth.json");
        let mut all: serde_json::Map<String, serde_json::Value> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        all.insert(server.to_string(), entry);
        let data = serde_json::to_vec(&serde_json::Value::Object(all)).unwrap_or_default();
        write_atomic(&path, &data).map_err(std::io::Error::other)
    }

    /// Saves the state atomically.
    pub fn save(&self, s: &State) -> Result<(), StoreError> {
        let data = serde_json::to_vec_pretty(s).expect("state serializes");
        write_atomic(&self.state_path(), &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("emberd-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn round_trip_and_no_temp_files_left() {
        let d = tmp("rt");
        let st = Store::open(&d).unwrap();
        assert_eq!(st.load().unwrap(), State::default());
        let mut s = State::default();
        s.volumes.insert(
            "vol-1".into(),
            Volume {
                id: "vol-1".into(),
                name: "v".into(),
                size_mb: 3,
                created: now_rfc3339(),
                format: VolumeFormat::Ext4,
                attachment: None,
                mount_point: None,
            },
        );
        st.save(&s).unwrap();
        st.save(&s).unwrap();
        assert_eq!(Store::open(&d).unwrap().load().unwrap(), s);
        let leftovers: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn scratch_is_removed_on_drop() {
        let d = tmp("scratch");
        let s = Scratch::create(d.join("x")).unwrap();
        fs::write(s.join("f"), b"1").unwrap();
        let p = s.path().to_path_buf();
        drop(s);
        assert!(!p.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_state_is_reported_not_ignored() {
        let d = tmp("corrupt");
        let st = Store::open(&d).unwrap();
        fs::write(d.join("state.json"), b"{ nope").unwrap();
        assert!(matches!(st.load(), Err(StoreError::Corrupt { .. })));
        fs::remove_dir_all(&d).unwrap();
    }
}
