//! The jail directory: creation, installing the VMM binary, entering it
//! (mount namespace + pivot_root) and populating /dev.

use std::ffi::{CStr, CString};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the VMM binary inside the jail.
pub const EXEC_MODE: u32 = 0o755;
/// Mode of the jail's own directories (`/`, `/dev`, `/dev/net`, `/run`).
pub const DIR_MODE: u32 = 0o700;
/// Mode of the device nodes (owner only, owned by the VMM's uid:gid).
pub const DEV_MODE: u32 = 0o600;
/// Directories created in the jail and owned by the VMM's uid:gid.
pub const JAIL_DIRS: [&str; 4] = ["/", "/dev", "/dev/net", "/run"];
/// Device nodes created in the jail: path, major, minor, required.
pub const DEVICES: [(&str, u32, u32, bool); 3] = [
    ("/dev/kvm", 10, 232, true),
    ("/dev/net/tun", 10, 200, true),
    ("/dev/urandom", 1, 9, false),
];
const OLD_ROOT: &str = "old_root";

/// Errors from building and entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A directory could not be created.
    #[error("cannot create directory {0}: {1}")]
    CreateDir(PathBuf, #[source] io::Error),
    /// The VMM binary is already in the jail (jail in use or not cleaned).
    #[error("{0} already exists: jail in use or not cleaned up")]
    ExecExists(PathBuf),
    /// Installing the VMM binary failed.
    #[error("cannot install {0} into the jail as {1}: {2}")]
    InstallExec(PathBuf, PathBuf, #[source] io::Error),
    /// A path has an interior NUL byte.
    #[error("path {0} contains a NUL byte")]
    Nul(PathBuf),
    /// unshare(CLONE_NEWNS) failed.
    #[error("cannot create a mount namespace: {0}")]
    Unshare(#[source] io::Error),
    /// Making / private failed.
    #[error("cannot make / recursively private: {0}")]
    MakePrivate(#[source] io::Error),
    /// Bind-mounting the jail root onto itself failed.
    #[error("cannot bind-mount {0} onto itself: {1}")]
    BindMount(PathBuf, #[source] io::Error),
    /// chdir failed.
    #[error("cannot chdir to {0}: {1}")]
    Chdir(PathBuf, #[source] io::Error),
    /// Creating the old-root directory failed.
    #[error("cannot create {0} in the jail: {1}")]
    MkdirOldRoot(&'static str, #[source] io::Error),
    /// pivot_root failed.
    #[error("pivot_root into {0} failed: {1}")]
    PivotRoot(PathBuf, #[source] io::Error),
    /// Unmounting the old root failed.
    #[error("cannot unmount the old root: {0}")]
    UmountOldRoot(#[source] io::Error),
    /// Removing the old-root directory failed.
    #[error("cannot remove the old root directory: {0}")]
    RmdirOldRoot(#[source] io::Error),
    /// chmod/chown of a jail path failed.
    #[error("cannot set owner/mode of {0} in the jail: {1}")]
    Own(String, #[source] io::Error),
    /// mknod failed.
    #[error("cannot create device node {0} in the jail: {1}")]
    Mknod(String, #[source] io::Error),
    /// Writing the pid file failed.
    #[error("cannot write pid file {0} in the jail: {1}")]
    PidFile(PathBuf, #[source] io::Error),
    /// `--userfaultfd` on a host without a usable `/dev/userfaultfd`.
    #[error("--userfaultfd: the host's /dev/userfaultfd: {0} (it needs Linux 6.1 or later)")]
    NoUserfaultfd(String),
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul(path.to_path_buf()))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Jail root: `<base>/<exec_name>/<id>/root`.
pub fn jail_root(base: &Path, exec_name: &str, id: &str) -> PathBuf {
    base.join(exec_name).join(id).join("root")
}

/// Creates the jail root directory (and its parents).
pub fn create_root(root: &Path) -> Result<(), JailError> {
    fs::create_dir_all(root).map_err(|e| JailError::CreateDir(root.to_path_buf(), e))
}

/// How the VMM binary got into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Hard link to the (root-owned, 0755) original.
    HardLink,
    /// Fresh copy, root-owned, mode 0755.
    Copy,
}

/// Puts the VMM binary at `<root>/<exec_name>`.
///
/// Hard-links when the source is on the same filesystem and is already a
/// root-owned 0755 file (so the jailed user cannot modify it); otherwise
/// copies it to a root-owned 0755 file.
pub fn install_exec(src: &Path, root: &Path, exec_name: &str) -> Result<Installed, JailError> {
    let dst = root.join(exec_name);
    if fs::symlink_metadata(&dst).is_ok() {
        return Err(JailError::ExecExists(dst));
    }
    let err = |e| JailError::InstallExec(src.to_path_buf(), dst.clone(), e);
    let meta = fs::metadata(src).map_err(err)?;
    let root_meta = fs::metadata(root).map_err(err)?;
    let linkable =
        meta.dev() == root_meta.dev() && meta.uid() == 0 && meta.mode() & 0o7777 == EXEC_MODE;
    if linkable && fs::hard_link(src, &dst).is_ok() {
        return Ok(Installed::HardLink);
    }
    let mut input = fs::File::open(src).map_err(err)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(EXEC_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&dst)
        .map_err(err)?;
    io::copy(&mut input, &mut out).map_err(err)?;
    // The umask may have narrowed the mode given to open().
    out.set_permissions(fs::Permissions::from_mode(EXEC_MODE))
        .map_err(err)?;
    Ok(Installed::Copy)
}

/// One step of [`enter`], as reported by the allocation-free entry
/// functions ([`new_private_mount_ns`], [`pivot_into`]), which run in a
/// forked child before exec, where only async-signal-safe calls are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnterStep {
    /// unshare(CLONE_NEWNS).
    Unshare,
    /// mount(MS_REC | MS_PRIVATE) of `/`.
    MakePrivate,
    /// Bind-mounting the new root onto itself.
    BindMount,
    /// chdir into the new root.
    Chdir,
    /// mkdir of `old_root`.
    MkdirOldRoot,
    /// pivot_root.
    PivotRoot,
    /// chdir to `/` after pivot_root.
    ChdirSlash,
    /// umount2 of the old root.
    UmountOldRoot,
    /// rmdir of the old root.
    RmdirOldRoot,
}

impl EnterStep {
    /// A short name for messages (`"pivot_root"`).
    pub fn name(self) -> &'static str {
        match self {
            EnterStep::Unshare => "unshare(CLONE_NEWNS)",
            EnterStep::MakePrivate => "make / private",
            EnterStep::BindMount => "bind the new root onto itself",
            EnterStep::Chdir => "chdir into the new root",
            EnterStep::MkdirOldRoot => "mkdir old_root",
            EnterStep::PivotRoot => "pivot_root",
            EnterStep::ChdirSlash => "chdir /",
            EnterStep::UmountOldRoot => "umount old_root",
            EnterStep::RmdirOldRoot => "rmdir old_root",
        }
    }

    /// The [`JailError`] [`enter`] reports for this step.
    fn into_error(self, root: &Path, e: io::Error) -> JailError {
        match self {
            EnterStep::Unshare => JailError::Unshare(e),
            EnterStep::MakePrivate => JailError::MakePrivate(e),
            EnterStep::BindMount => JailError::BindMount(root.to_path_buf(), e),
            EnterStep::Chdir => JailError::Chdir(root.to_path_buf(), e),
            EnterStep::MkdirOldRoot => JailError::MkdirOldRoot(OLD_ROOT, e),
            EnterStep::PivotRoot => JailError::PivotRoot(root.to_path_buf(), e),
            EnterStep::ChdirSlash => JailError::Chdir(PathBuf::from("/"), e),
            EnterStep::UmountOldRoot => JailError::UmountOldRoot(e),
            EnterStep::RmdirOldRoot => JailError::RmdirOldRoot(e),
        }
    }
}

fn step(ret: libc::c_int, s: EnterStep) -> Result<(), (EnterStep, io::Error)> {
    check(ret).map_err(|e| (s, e))
}

/// Enters a new mount namespace and makes `/` recursively private, so
/// that no mount made afterwards propagates back to the host. Makes no
/// allocation: safe between fork and exec.
pub fn new_private_mount_ns() -> Result<(), (EnterStep, io::Error)> {
    // SAFETY: plain syscalls with valid NUL-terminated strings or NULLs.
    unsafe {
        step(libc::unshare(libc::CLONE_NEWNS), EnterStep::Unshare)?;
        step(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            EnterStep::MakePrivate,
        )
    }
}

/// Inside a private mount namespace: bind-mounts `root` onto itself,
/// `pivot_root`s into it, detaches and removes the old root and sets the
/// working directory to `/`. Makes no allocation: safe between fork and
/// exec.
pub fn pivot_into(root: &CStr) -> Result<(), (EnterStep, io::Error)> {
    // SAFETY: plain syscalls with valid NUL-terminated strings or NULLs.
    unsafe {
        step(
            libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            EnterStep::BindMount,
        )?;
        // Enter the new mount (the old cwd still points below it).
        step(libc::chdir(root.as_ptr()), EnterStep::Chdir)?;
        step(
            libc::mkdir(c"old_root".as_ptr(), 0o700),
            EnterStep::MkdirOldRoot,
        )?;
        step(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c"old_root".as_ptr()) as libc::c_int,
            EnterStep::PivotRoot,
        )?;
        step(libc::chdir(c"/".as_ptr()), EnterStep::ChdirSlash)?;
        step(
            libc::umount2(c"/old_root".as_ptr(), libc::MNT_DETACH),
            EnterStep::UmountOldRoot,
        )?;
        step(libc::rmdir(c"/old_root".as_ptr()), EnterStep::RmdirOldRoot)
    }
}

/// Enters the jail: new mount namespace, `/` made recursively private,
/// the jail root bind-mounted onto itself, `pivot_root` into it, the old
/// root detached and removed, and the working directory set to `/`.
pub fn enter(root: &Path) -> Result<(), JailError> {
    let root_c = cstr(root)?;
    new_private_mount_ns()
        .and_then(|()| pivot_into(&root_c))
        .map_err(|(s, e)| s.into_error(root, e))
}

fn chown(path: &str, c: &CString, uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: `c` is a valid NUL-terminated path.
    check(unsafe { libc::chown(c.as_ptr(), uid, gid) })
        .map_err(|e| JailError::Own(path.to_string(), e))
}

/// Inside the jail (after [`enter`]): creates `/`, `/dev`, `/dev/net`,
/// `/run` (mode 0700, owned by uid:gid) and the device nodes `/dev/kvm`,
/// `/dev/net/tun`, `/dev/urandom` (mode 0600, owned by uid:gid).
///
/// Returns warnings for optional devices that could not be created.
pub fn populate(uid: u32, gid: u32) -> Result<Vec<String>, JailError> {
    for dir in JAIL_DIRS {
        fs::create_dir_all(dir).map_err(|e| JailError::CreateDir(PathBuf::from(dir), e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| JailError::Own(dir.to_string(), e))?;
        chown(dir, &cstr(Path::new(dir))?, uid, gid)?;
    }
    let mut warnings = Vec::new();
    for (path, major, minor, required) in DEVICES {
        let c = cstr(Path::new(path))?;
        // SAFETY: `c` is a valid path; mknod creates a node, nothing else.
        let made = check(unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | DEV_MODE,
                libc::makedev(major, minor),
            )
        })
        .map_err(|e| JailError::Mknod(path.to_string(), e))
        .and_then(|_| {
            // mknod honours the umask: set the mode explicitly.
            fs::set_permissions(path, fs::Permissions::from_mode(DEV_MODE))
                .map_err(|e| JailError::Own(path.to_string(), e))
        })
        .and_then(|_| chown(path, &c, uid, gid));
        match made {
            Ok(()) => {}
            Err(e) if !required => warnings.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    Ok(warnings)
}

/// The userfaultfd device (`--userfaultfd`; the Uffd snapshot memory backend).
pub const USERFAULTFD: &str = "/dev/userfaultfd";

/// Before [`enter`]: the host's `/dev/userfaultfd` as (major, minor). Its
/// minor is dynamic, so it is read from the host rather than assumed.
pub fn host_userfaultfd() -> Result<(u32, u32), JailError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = fs::metadata(USERFAULTFD).map_err(|e| JailError::NoUserfaultfd(e.to_string()))?;
    if !md.file_type().is_char_device() {
        return Err(JailError::NoUserfaultfd("is not a character device".into()));
    }
    let rdev = md.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// Inside the jail (after [`enter`]): creates the character device `path`
/// (mode 0600, owned by uid:gid).
pub fn populate_device(
    path: &str,
    major: u32,
    minor: u32,
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    let c = cstr(Path::new(path))?;
    // SAFETY: `c` is a valid path; mknod creates a node, nothing else.
    check(unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | DEV_MODE,
            libc::makedev(major, minor),
        )
    })
    .map_err(|e| JailError::Mknod(path.to_string(), e))?;
    // mknod honours the umask: set the mode explicitly.
    fs::set_permissions(path, fs::Permissions::from_mode(DEV_MODE))
        .map_err(|e| JailError::Own(path.to_string(), e))?;
    chown(path, &c, uid, gid)
}

/// Directory of the macvtap nodes in the jail (`--macvtap`).
pub const MACVTAP_DIR: &str = "/dev/macvtap";

/// Inside the jail (after [`populate`]): creates `/dev/macvtap` (mode
/// 0700) and one character device `/dev/macvtap/<name>` per entry (mode
/// 0600), all owned by uid:gid. Nothing is created when `devs` is empty.
pub fn populate_macvtaps(
    devs: &[crate::validate::MacvtapDev],
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    if devs.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(MACVTAP_DIR)
        .map_err(|e| JailError::CreateDir(PathBuf::from(MACVTAP_DIR), e))?;
    fs::set_permissions(MACVTAP_DIR, fs::Permissions::from_mode(DIR_MODE))
        .map_err(|e| JailError::Own(MACVTAP_DIR.to_string(), e))?;
    chown(MACVTAP_DIR, &cstr(Path::new(MACVTAP_DIR))?, uid, gid)?;
    for d in devs {
        // parse_macvtap keeps the name to one plain path component.
        let path = format!("{MACVTAP_DIR}/{}", d.name);
        let c = cstr(Path::new(&path))?;
        // SAFETY: `c` is a valid path; mknod creates a node, nothing else.
        check(unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | DEV_MODE,
                libc::makedev(d.major, d.minor),
            )
        })
        .map_err(|e| JailError::Mknod(path.clone(), e))?;
        // mknod honours the umask: set the mode explicitly.
        fs::set_permissions(&path, fs::Permissions::from_mode(DEV_MODE))
            .map_err(|e| JailError::Own(path.clone(), e))?;
        chown(&path, &c, uid, gid)?;
    }
    Ok(())
}

/// Writes `pid` to `/<exec_name>.pid` (inside the jail, after [`enter`]).
pub fn write_pid_file(exec_name: &str, pid: u32) -> Result<(), JailError> {
    let path = pid_file_path(exec_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| JailError::PidFile(path.clone(), e))?;
    io::Write::write_all(&mut f, pid.to_string().as_bytes())
        .map_err(|e| JailError::PidFile(path, e))
}

/// `/<exec_name>.pid`.
pub fn pid_file_path(exec_name: &str) -> PathBuf {
    PathBuf::from(format!("/{exec_name}.pid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's device is found when it exists (Linux 6.1+), with a
    /// clear error naming it otherwise.
    #[test]
    fn host_userfaultfd_is_read_or_named() {
        match host_userfaultfd() {
            Ok((major, _)) => assert_eq!(major, 10, "a misc device"),
            Err(e) => assert!(e.to_string().contains("/dev/userfaultfd"), "{e}"),
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            jail_root(Path::new("/srv/jailer"), "ember-vmm", "vm1"),
            PathBuf::from("/srv/jailer/ember-vmm/vm1/root")
        );
        assert_eq!(pid_file_path("ember-vmm"), PathBuf::from("/ember-vmm.pid"));
    }

    #[test]
    fn install_copy_and_link() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/jailer-ut-").unwrap();
        let src = dir.as_path().join("vmm");
        fs::write(&src, b"#!/bin/true\n").unwrap();
        let root = dir.as_path().join("root");
        create_root(&root).unwrap();

        // 0700 source: must be copied, result 0755.
        fs::set_permissions(&src, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(install_exec(&src, &root, "vmm").unwrap(), Installed::Copy);
        let m = fs::metadata(root.join("vmm")).unwrap();
        assert_eq!(m.mode() & 0o7777, EXEC_MODE);
        assert_ne!(m.ino(), fs::metadata(&src).unwrap().ino());
        assert_eq!(fs::read(root.join("vmm")).unwrap(), b"#!/bin/true\n");
        // Second install refuses.
        assert!(matches!(
            install_exec(&src, &root, "vmm"),
            Err(JailError::ExecExists(_))
        ));

        // Root-owned 0755 source on the same fs: hard link (when running as root).
        fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
        let got = install_exec(&src, &root, "vmm2").unwrap();
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            assert_eq!(got, Installed::HardLink);
            assert_eq!(
                fs::metadata(root.join("vmm2")).unwrap().ino(),
                fs::metadata(&src).unwrap().ino()
            );
        } else {
            assert_eq!(got, Installed::Copy);
        }
    }
}
