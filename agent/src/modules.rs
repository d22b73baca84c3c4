//! Kernel modules the pod VM's kernel needs before it sees ember's devices.
//!
//! emberd packs the pod kernel's module closure (virtio, virtio-mmio,
//! virtio-blk, virtio-net, vsock and their dependencies, minus whatever is
//! built in) into the initramfs, with [`LIST_FILE`] naming one module file
//! per line in load order. As PID 1 the agent loads them with
//! `finit_module(2)` before it touches a device ([`load_listed`]); a module
//! that is already loaded (`EEXIST`) counts as loaded. Without the list file
//! (a kernel with everything built in) there is nothing to do.
//!
//! Modules get no parameters: `modname.param=value` words of the kernel
//! command line are applied by `modprobe` in a distribution's initramfs, not
//! by the kernel, and are not applied here. So a modular `virtio_mmio` does
//! not see ember's `virtio_mmio.device=` words; it binds the same devices
//! through ACPI (ember's DSDT describes each as `LNRO0005`), which needs a
//! kernel with ACPI on (no `acpi=off`).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The list file in the pod initramfs.
pub const LIST_FILE: &str = "/etc/ember-modules";

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// The list file exists but cannot be read.
    #[error("reading the module list {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// One module failed to load.
    #[error("loading kernel module {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads one module file; [`FinitModule`] in the VM, a recorder in tests.
pub trait ModuleLoader {
    fn load(&mut self, path: &Path) -> io::Result<()>;
}

/// The real loader: `finit_module(fd, "", 0)`.
pub struct FinitModule;

impl ModuleLoader for FinitModule {
    fn load(&mut self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        use std::os::fd::AsRawFd;
        // SAFETY: finit_module with an open fd, an empty NUL-terminated
        // parameter string and no flags; nothing is written to our memory.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The module paths of a list file's text: one per line, blank lines and
/// `#` comments skipped.
pub fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Loads every module `list` names, in order, with `loader`. A missing list
/// file means nothing to load. Failures do not stop the rest (a missing
/// network driver should not cost the pod its vsock); the number loaded and
/// the failures are returned.
pub fn load_listed(list: &Path, loader: &mut dyn ModuleLoader) -> (usize, Vec<ModulesError>) {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (0, Vec::new()),
        Err(source) => {
            return (
                0,
                vec![ModulesError::List {
                    path: list.to_path_buf(),
                    source,
                }],
            )
        }
    };
    let mut loaded = 0;
    let mut errors = Vec::new();
    for path in parse_list(&text) {
        match loader.load(&path) {
            Ok(()) => loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => loaded += 1,
            Err(source) => errors.push(ModulesError::Load { path, source }),
        }
    }
    (loaded, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the paths it is asked to load; fails on `fail`, reports
    /// `EEXIST` on `exists`.
    #[derive(Default)]
    struct Recorder {
        loaded: Vec<PathBuf>,
        fail: Option<PathBuf>,
        exists: Option<PathBuf>,
    }

    impl ModuleLoader for Recorder {
        fn load(&mut self, path: &Path) -> io::Result<()> {
            self.loaded.push(path.to_path_buf());
            if self.fail.as_deref() == Some(path) {
                return Err(io::Error::from_raw_os_error(libc::ENOEXEC));
            }
            if self.exists.as_deref() == Some(path) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            Ok(())
        }
    }

    fn temp_list(tag: &str, text: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("ember-agent-modules-{tag}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    const LIST: &str = "\
/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko
/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/virtio/virtio.ko
/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/virtio/virtio_mmio.ko

# comment
/lib/modules/6.1.0-57-cloud-amd64/kernel/net/vmw_vsock/vsock.ko
/lib/modules/6.1.0-57-cloud-amd64/kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko
/lib/modules/6.1.0-57-cloud-amd64/kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko
";

    #[test]
    fn loads_in_list_order() {
        let list = temp_list("order", LIST);
        let mut rec = Recorder::default();
        let (n, errors) = load_listed(&list, &mut rec);
        std::fs::remove_file(&list).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(n, 6);
        assert_eq!(rec.loaded, parse_list(LIST));
        let names: Vec<String> = rec
            .loaded
            .iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn failures_are_reported_and_the_rest_still_loads() {
        let list = temp_list("fail", LIST);
        let all = parse_list(LIST);
        let mut rec = Recorder {
            fail: Some(all[2].clone()),
            exists: Some(all[0].clone()),
            ..Default::default()
        };
        let (n, errors) = load_listed(&list, &mut rec);
        std::fs::remove_file(&list).unwrap();
        assert_eq!(rec.loaded, all, "every module is tried, in order");
        assert_eq!(n, 5, "EEXIST counts as loaded");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("virtio_mmio.ko"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn no_list_file_nothing_to_load() {
        let mut rec = Recorder::default();
        let (n, errors) = load_listed(Path::new("/nonexistent/ember-modules"), &mut rec);
        assert_eq!((n, errors.len()), (0, 0));
        assert!(rec.loaded.is_empty());
    }
}
