//! Which host paths API input may name. emberd runs as root, so a path in
//! a request is never taken as it is: images and sources are read only from
//! under the import directory, and images are written only under the
//! export directory (`emberd --import-dir`, `--export-dir`; by default
//! `import/` and `export/` in the state directory, mode 0700). Paths are
//! resolved (symlinks included) before they are checked, so a link inside
//! the directory cannot point out of it.

use std::path::{Path, PathBuf};

/// A path a request named that emberd will not use.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    #[error("{what} {path:?} is refused: host paths must lie under the import directory {dir} (emberd --import-dir)")]
    NotImportable {
        what: String,
        path: String,
        dir: String,
    },
    #[error("{what} {path:?} is refused: images are written only under the export directory {dir} (emberd --export-dir)")]
    NotExportable {
        what: String,
        path: String,
        dir: String,
    },
    #[error("{what} {path:?} does not exist")]
    Missing { what: String, path: String },
    #[error("{what} {path:?} must be an absolute path")]
    Relative { what: String, path: String },
}

/// The import and export directories.
#[derive(Clone, Debug)]
pub struct HostPaths {
    import: PathBuf,
    export: PathBuf,
}

impl HostPaths {
    /// Uses (and creates, mode 0700, if missing) `import` and `export`.
    pub fn new(import: &Path, export: &Path) -> std::io::Result<HostPaths> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        for d in [import, export] {
            if !d.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(d)?;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        Ok(HostPaths {
            import: import.canonicalize()?,
            export: export.canonicalize()?,
        })
    }

    /// The import directory.
    pub fn import_dir(&self) -> &Path {
        &self.import
    }

    /// The export directory.
    pub fn export_dir(&self) -> &Path {
        &self.export
    }

    /// `path` (named `what` in errors), resolved, if it exists under the
    /// import directory.
    pub fn import(&self, what: &str, path: &str) -> Result<PathBuf, HostPathError> {
        let p = absolute(what, path)?;
        if has_dotdot(path) {
            return Err(self.not_importable(what, path));
        }
        let real = p.canonicalize().map_err(|_| {
            if p.symlink_metadata().is_ok() || !p.starts_with(&self.import) {
                self.not_importable(what, path)
            } else {
                HostPathError::Missing {
                    what: what.into(),
                    path: path.into(),
                }
            }
        })?;
        if real.starts_with(&self.import) && real != self.import {
            Ok(real)
        } else {
            Err(self.not_importable(what, path))
        }
    }

    /// `path` (named `what` in errors) to write, resolved, if it lies under
    /// the export directory: its parent must exist there and it must not
    /// be a symlink itself.
    pub fn export(&self, what: &str, path: &str) -> Result<PathBuf, HostPathError> {
        let p = absolute(what, path)?;
        let refuse = || HostPathError::NotExportable {
            what: what.into(),
            path: path.into(),
            dir: self.export.display().to_string(),
        };
        if has_dotdot(path) {
            return Err(refuse());
        }
        let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
            return Err(refuse());
        };
        let parent = parent.canonicalize().map_err(|_| refuse())?;
        if !parent.starts_with(&self.export) {
            return Err(refuse());
        }
        let out = parent.join(name);
        if out
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(refuse());
        }
        Ok(out)
    }

    fn not_importable(&self, what: &str, path: &str) -> HostPathError {
        HostPathError::NotImportable {
            what: what.into(),
            path: path.into(),
            dir: self.import.display().to_string(),
        }
    }
}

fn has_dotdot(path: &str) -> bool {
    path.split('/').any(|c| c == "..")
}

fn absolute(what: &str, path: &str) -> Result<PathBuf, HostPathError> {
    let p = PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(HostPathError::Relative {
            what: what.into(),
            path: path.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    #[test]
    fn imports_only_from_under_the_import_dir() {
        let t = TempDir::new();
        let hp = HostPaths::new(&t.0.join("import"), &t.0.join("export")).unwrap();
        std::fs::write(t.0.join("import/ok.tar"), b"x").unwrap();
        std::fs::write(t.0.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(t.0.join("secret"), t.0.join("import/link")).unwrap();
        let s = |p: &Path| p.display().to_string();
        assert!(hp
            .import("imageName", &s(&t.0.join("import/ok.tar")))
            .is_ok());
        for bad in [
            s(&t.0.join("secret")),
            s(&t.0.join("import/link")),
            s(&t.0.join("import/../secret")),
            "/etc/shadow".to_string(),
            "relative/path".to_string(),
            s(&t.0.join("import")),
        ] {
            let e = hp.import("imageName", &bad).unwrap_err().to_string();
            assert!(
                e.contains("import directory") || e.contains("absolute"),
                "{bad}: {e}"
            );
        }
        let e = hp
            .import("imageName", &s(&t.0.join("import/none")))
            .unwrap_err();
        assert!(matches!(e, HostPathError::Missing { .. }), "{e}");
    }

    #[test]
    fn exports_only_to_under_the_export_dir() {
        let t = TempDir::new();
        let hp = HostPaths::new(&t.0.join("import"), &t.0.join("export")).unwrap();
        let s = |p: &Path| p.display().to_string();
        assert!(hp.export("remote", &s(&t.0.join("export/layout"))).is_ok());
        std::os::unix::fs::symlink("/etc", t.0.join("export/etc")).unwrap();
        for bad in [
            s(&t.0.join("elsewhere")),
            s(&t.0.join("export/etc")),
            s(&t.0.join("export/etc/x")),
            s(&t.0.join("export/missing/x")),
            "/etc".to_string(),
        ] {
            let e = hp.export("remote", &bad).unwrap_err().to_string();
            assert!(
                e.contains("export directory") || e.contains("absolute"),
                "{bad}: {e}"
            );
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.0.join("import"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
