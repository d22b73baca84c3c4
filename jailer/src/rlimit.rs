//! Resource limits (`--resource-limit no-file=N|fsize=N`).

use std::io;

/// Default `RLIMIT_NOFILE` for the VMM (as Firecracker).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Errors from resource-limit parsing and installation.
#[derive(Debug, thiserror::Error)]
pub enum RlimitError {
    /// Not `NAME=VALUE`.
    #[error("invalid --resource-limit '{0}': expected NAME=VALUE")]
    Format(String),
    /// Unknown limit name.
    #[error("invalid --resource-limit '{0}': unknown limit '{1}' (expected no-file or fsize)")]
    Name(String, String),
    /// Value not a number.
    #[error("invalid --resource-limit '{0}': '{1}' is not a non-negative integer")]
    Value(String, String),
    /// setrlimit failed.
    #[error("cannot set resource limit {0} to {1}: {2}")]
    Set(&'static str, u64, #[source] io::Error),
}

/// The limits the jailer installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_NOFILE` (soft = hard).
    pub no_file: u64,
    /// `RLIMIT_FSIZE` (soft = hard), left alone if `None`.
    pub fsize: Option<u64>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            no_file: DEFAULT_NO_FILE,
            fsize: None,
        }
    }
}

impl ResourceLimits {
    /// Parses `--resource-limit` values on top of the defaults; later
    /// values win.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self, RlimitError> {
        let mut limits = ResourceLimits::default();
        for arg in args {
            let arg = arg.as_ref();
            let (name, value) = arg
                .split_once('=')
                .ok_or_else(|| RlimitError::Format(arg.to_string()))?;
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RlimitError::Value(arg.to_string(), value.to_string()));
            }
            let v = value
                .parse::<u64>()
                .map_err(|_| RlimitError::Value(arg.to_string(), value.to_string()))?;
            match name {
                "no-file" => limits.no_file = v,
                "fsize" => limits.fsize = Some(v),
                _ => return Err(RlimitError::Name(arg.to_string(), name.to_string())),
            }
        }
        Ok(limits)
    }

    /// Installs the limits on the current process (inherited by the VMM).
    pub fn install(&self) -> Result<(), RlimitError> {
        if let Some(fsize) = self.fsize {
            set(libc::RLIMIT_FSIZE, "fsize", fsize)?;
        }
        set(libc::RLIMIT_NOFILE, "no-file", self.no_file)
    }
}

/// Sets one limit (soft = hard = `v`) on the calling process. Makes no
/// allocation: safe between fork and exec.
pub fn set(
    resource: libc::__rlimit_resource_t,
    name: &'static str,
    v: u64,
) -> Result<(), RlimitError> {
    let lim = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: `lim` is a valid rlimit structure that outlives the call.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(RlimitError::Set(name, v, io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let l = ResourceLimits::parse::<&str>(&[]).unwrap();
        assert_eq!(
            l,
            ResourceLimits {
                no_file: 2048,
                fsize: None
            }
        );
    }

    #[test]
    fn parses() {
        let l = ResourceLimits::parse(&["no-file=10", "fsize=4096", "no-file=20"]).unwrap();
        assert_eq!(
            l,
            ResourceLimits {
                no_file: 20,
                fsize: Some(4096)
            }
        );
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            ResourceLimits::parse(&["no-file"]),
            Err(RlimitError::Format(_))
        ));
        assert!(matches!(
            ResourceLimits::parse(&["nofile=1"]),
            Err(RlimitError::Name(_, _))
        ));
        assert!(matches!(
            ResourceLimits::parse(&["fsize="]),
            Err(RlimitError::Value(_, _))
        ));
        assert!(matches!(
            ResourceLimits::parse(&["fsize=-1"]),
            Err(RlimitError::Value(_, _))
        ));
        assert!(matches!(
            ResourceLimits::parse(&["fsize=1k"]),
            Err(RlimitError::Value(_, _))
        ));
        assert!(matches!(
            ResourceLimits::parse(&["fsize=99999999999999999999999"]),
            Err(RlimitError::Value(_, _))
        ));
    }
}
