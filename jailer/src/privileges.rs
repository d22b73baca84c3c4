//! Dropping privileges: no capabilities (effective, permitted, inheritable,
//! ambient, bounding), no_new_privs, no supplementary groups, and
//! real/effective/saved uid and gid set to the VMM's.

use std::io;

/// Errors from dropping privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegesError {
    /// A prctl failed.
    #[error("prctl({0}) failed: {1}")]
    Prctl(&'static str, #[source] io::Error),
    /// setgroups failed.
    #[error("cannot clear supplementary groups: {0}")]
    SetGroups(#[source] io::Error),
    /// setresgid failed.
    #[error("cannot switch to gid {0}: {1}")]
    SetGid(u32, #[source] io::Error),
    /// setresuid failed.
    #[error("cannot switch to uid {0}: {1}")]
    SetUid(u32, #[source] io::Error),
    /// capset/capget failed.
    #[error("cannot clear capabilities: {0}")]
    Caps(#[source] io::Error),
    /// Something remained after dropping.
    #[error("privileges still present after dropping: {0}")]
    Remaining(String),
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn prctl(
    what: &'static str,
    op: libc::c_int,
    arg: libc::c_ulong,
) -> Result<libc::c_int, PrivilegesError> {
    // SAFETY: the prctl operations used take integer arguments only.
    let r = unsafe {
        libc::prctl(
            op,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(PrivilegesError::Prctl(what, io::Error::last_os_error()));
    }
    Ok(r)
}

fn capget() -> Result<[CapData; 2], PrivilegesError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: hdr and data are valid, correctly laid-out buffers.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(PrivilegesError::Caps(io::Error::last_os_error()));
    }
    Ok(data)
}

fn clear_caps() -> Result<(), PrivilegesError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: as in capget; the kernel only reads `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(PrivilegesError::Caps(io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops to `uid`:`gid` with no capabilities left and no_new_privs set.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), PrivilegesError> {
    // Bounding set: needs CAP_SETPCAP, so before the uid change. Walk caps
    // until the kernel says the number is out of range.
    let mut cap: libc::c_ulong = 0;
    // SAFETY: PR_CAPBSET_READ takes an integer and reads nothing else.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        prctl("PR_CAPBSET_DROP", libc::PR_CAPBSET_DROP, cap)?;
        cap += 1;
    }
    // Ambient set (kernels >= 4.3; EINVAL before that means there is none).
    // SAFETY: integer-only prctl.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(PrivilegesError::Prctl("PR_CAP_AMBIENT_CLEAR_ALL", e));
        }
    }
    prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)?;

    // SAFETY: setgroups with size 0 does not read the list pointer.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(PrivilegesError::SetGroups(io::Error::last_os_error()));
    }
    // SAFETY: integer-only syscalls.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(PrivilegesError::SetGid(gid, io::Error::last_os_error()));
    }
    // SAFETY: integer-only syscalls.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(PrivilegesError::SetUid(uid, io::Error::last_os_error()));
    }
    // A switch to a non-zero uid already empties the sets; do it explicitly
    // so uid 0 is covered as well.
    clear_caps()?;

    let left = capget()?;
    if left
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(PrivilegesError::Remaining("capabilities".into()));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: pointers to local integers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (uid, uid, uid) {
        return Err(PrivilegesError::Remaining(format!("uids {r}/{e}/{s}")));
    }
    // SAFETY: pointers to local integers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (gid, gid, gid) {
        return Err(PrivilegesError::Remaining(format!("gids {r}/{e}/{s}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capget_works() {
        // Reading our own capabilities must succeed with the v3 ABI.
        assert!(capget().is_ok());
    }
}
