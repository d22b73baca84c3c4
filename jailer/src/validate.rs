//! Validation of the jail id and of the paths given on the command line.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Longest accepted jail id.
pub const MAX_ID_LEN: usize = 64;

/// Errors from argument validation.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The id is empty or too long.
    #[error("invalid --id '{0}': must be 1 to 64 characters long")]
    IdLength(String),
    /// The id has a character other than ASCII alphanumerics and '-'.
    #[error("invalid --id '{0}': only ASCII letters, digits and '-' are allowed")]
    IdChars(String),
    /// A path contains a `..` component.
    #[error("refusing {0} '{1}': paths with '..' components are not allowed")]
    ParentDir(&'static str, PathBuf),
    /// A path is empty.
    #[error("{0} must not be empty")]
    EmptyPath(&'static str),
    /// The exec file does not exist or cannot be resolved.
    #[error("--exec-file '{0}' cannot be used: {1}")]
    ExecFile(PathBuf, #[source] io::Error),
    /// The exec file is not a regular file.
    #[error("--exec-file '{0}' is not a regular file")]
    ExecNotAFile(PathBuf),
    /// The exec file name cannot be used as a path component.
    #[error("--exec-file '{0}' has no usable UTF-8 file name")]
    ExecName(PathBuf),
    /// The chroot base directory cannot be created or resolved.
    #[error("--chroot-base-dir '{0}' cannot be used: {1}")]
    ChrootBase(PathBuf, #[source] io::Error),
    /// The chroot base is not a directory.
    #[error("--chroot-base-dir '{0}' is not a directory")]
    ChrootBaseNotDir(PathBuf),
    /// The parent cgroup is not a plain relative path.
    #[error(
        "invalid --parent-cgroup '{0}': must be a relative path without '.' or '..' components"
    )]
    ParentCgroup(String),
    /// A `--macvtap` value is not `NAME=MAJOR:MINOR` with a plain
    /// interface name and decimal device numbers.
    #[error("invalid --macvtap '{0}': {1}")]
    Macvtap(String, &'static str),
}

/// A macvtap character device to create in the jail (`--macvtap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvtapDev {
    /// Interface name: the node is `/dev/macvtap/<name>`.
    pub name: String,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
}

/// Parses `NAME=MAJOR:MINOR`: NAME is 1..=15 bytes of ASCII letters,
/// digits, '-', '_' or '.' (not `.`/`..`), so it is one path component;
/// MAJOR and MINOR are decimal numbers (MAJOR below 4096, MINOR below
/// 2^20, the kernel's limits).
pub fn parse_macvtap(v: &str) -> Result<MacvtapDev, ValidateError> {
    let bad = |why| ValidateError::Macvtap(v.to_string(), why);
    let (name, nums) = v
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=MAJOR:MINOR"))?;
    if name.is_empty() || name.len() > 15 {
        return Err(bad("NAME must be 1 to 15 bytes"));
    }
    if name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(bad(
            "NAME may hold only ASCII letters, digits, '-', '_', '.'",
        ));
    }
    let (major, minor) = nums
        .split_once(':')
        .ok_or_else(|| bad("expected NAME=MAJOR:MINOR"))?;
    let num = |s: &str, max: u32| -> Option<u32> {
        if s.is_empty() || s.len() > 7 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u32>().ok().filter(|n| *n < max)
    };
    let major = num(major, 1 << 12).ok_or_else(|| bad("MAJOR must be a decimal below 4096"))?;
    let minor = num(minor, 1 << 20).ok_or_else(|| bad("MINOR must be a decimal below 1048576"))?;
    Ok(MacvtapDev {
        name: name.to_string(),
        major,
        minor,
    })
}

/// Checks a jail id: 1..=64 ASCII alphanumerics or '-'.
pub fn validate_id(id: &str) -> Result<(), ValidateError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ValidateError::IdLength(id.to_string()));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ValidateError::IdChars(id.to_string()));
    }
    Ok(())
}

/// Refuses a path that has a `..` component (or is empty).
pub fn refuse_parent_dir(what: &'static str, path: &Path) -> Result<(), ValidateError> {
    if path.as_os_str().is_empty() {
        return Err(ValidateError::EmptyPath(what));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ValidateError::ParentDir(what, path.to_path_buf()));
    }
    Ok(())
}

/// Validates the exec file: no `..`, exists, is a regular file.
///
/// Returns its canonical path and its file name (the "exec name").
pub fn validate_exec_file(path: &Path) -> Result<(PathBuf, String), ValidateError> {
    refuse_parent_dir("--exec-file", path)?;
    let canonical =
        std::fs::canonicalize(path).map_err(|e| ValidateError::ExecFile(path.to_path_buf(), e))?;
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| ValidateError::ExecFile(path.to_path_buf(), e))?;
    if !meta.is_file() {
        return Err(ValidateError::ExecNotAFile(path.to_path_buf()));
    }
    let name = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ValidateError::ExecName(path.to_path_buf()))?
        .to_string();
    Ok((canonical, name))
}

/// Validates the chroot base directory: no `..`, created if missing,
/// must be a directory. Returns its canonical path.
pub fn validate_chroot_base(path: &Path) -> Result<PathBuf, ValidateError> {
    refuse_parent_dir("--chroot-base-dir", path)?;
    std::fs::create_dir_all(path).map_err(|e| ValidateError::ChrootBase(path.to_path_buf(), e))?;
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| ValidateError::ChrootBase(path.to_path_buf(), e))?;
    if !canonical.is_dir() {
        return Err(ValidateError::ChrootBaseNotDir(path.to_path_buf()));
    }
    Ok(canonical)
}

/// Validates the parent cgroup: a non-empty relative path of normal components.
pub fn validate_parent_cgroup(parent: &str) -> Result<PathBuf, ValidateError> {
    let path = PathBuf::from(parent);
    if parent.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(ValidateError::ParentCgroup(parent.to_string()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("a").is_ok());
        assert!(validate_id("vm-01-ABC").is_ok());
        assert!(validate_id(&"x".repeat(64)).is_ok());
        assert!(matches!(validate_id(""), Err(ValidateError::IdLength(_))));
        assert!(matches!(
            validate_id(&"x".repeat(65)),
            Err(ValidateError::IdLength(_))
        ));
        for bad in ["a_b", "a/b", "..", "a b", "é", "a.b", "a\0b"] {
            assert!(
                matches!(validate_id(bad), Err(ValidateError::IdChars(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parent_dir_refused() {
        for bad in ["..", "/a/../b", "a/..", "../x"] {
            let e = refuse_parent_dir("--netns", Path::new(bad)).unwrap_err();
            assert!(e.to_string().contains("'..'"), "{e}");
            assert!(e.to_string().contains("--netns"), "{e}");
        }
        for ok in ["/a/b", "a", "./a", "/a/.b..c", "/a/..b"] {
            assert!(refuse_parent_dir("x", Path::new(ok)).is_ok(), "{ok}");
        }
        assert!(matches!(
            refuse_parent_dir("x", Path::new("")),
            Err(ValidateError::EmptyPath(_))
        ));
    }

    #[test]
    fn exec_file() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/jailer-ut-").unwrap();
        let f = dir.as_path().join("my-vmm");
        std::fs::write(&f, b"x").unwrap();
        let (canon, name) = validate_exec_file(&f).unwrap();
        assert_eq!(name, "my-vmm");
        assert!(canon.is_absolute());
        // Relative paths work too (cargo runs unit tests in the package dir).
        assert_eq!(
            validate_exec_file(Path::new("Cargo.toml")).unwrap().1,
            "Cargo.toml"
        );
        assert!(matches!(
            validate_exec_file(dir.as_path()),
            Err(ValidateError::ExecNotAFile(_))
        ));
        assert!(matches!(
            validate_exec_file(&dir.as_path().join("missing")),
            Err(ValidateError::ExecFile(_, _))
        ));
        let dotted = dir.as_path().join("..").join("x");
        assert!(matches!(
            validate_exec_file(&dotted),
            Err(ValidateError::ParentDir(_, _))
        ));
    }

    #[test]
    fn chroot_base() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/jailer-ut-").unwrap();
        let sub = dir.as_path().join("a/b");
        assert_eq!(
            validate_chroot_base(&sub).unwrap(),
            std::fs::canonicalize(&sub).unwrap()
        );
        let file = dir.as_path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(validate_chroot_base(&file).is_err());
        assert!(matches!(
            validate_chroot_base(&dir.as_path().join("a/../b")),
            Err(ValidateError::ParentDir(_, _))
        ));
    }

    #[test]
    fn macvtap_values() {
        assert_eq!(
            parse_macvtap("emb0abc12340=246:1").unwrap(),
            MacvtapDev {
                name: "emb0abc12340".into(),
                major: 246,
                minor: 1
            }
        );
        for bad in [
            "",
            "x",
            "x=1",
            "=1:2",
            "a/b=1:2",
            "..=1:2",
            "0123456789abcdef=1:2",
            "x=1:",
            "x=:1",
            "x=-1:2",
            "x=4096:0",
            "x=1:1048576",
            "x=1:2:3",
            "x y=1:2",
        ] {
            assert!(parse_macvtap(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parent_cgroup() {
        assert_eq!(
            validate_parent_cgroup("ember").unwrap(),
            PathBuf::from("ember")
        );
        assert_eq!(validate_parent_cgroup("a/b").unwrap(), PathBuf::from("a/b"));
        for bad in ["", "/abs", "a/../b", "./a", ".."] {
            assert!(validate_parent_cgroup(bad).is_err(), "{bad}");
        }
    }
}
