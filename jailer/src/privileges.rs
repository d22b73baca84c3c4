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

/// Sets the effective, permitted and inheritable sets to `m`.
fn set_caps(m: [u32; 2]) -> Result<(), PrivilegesError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = m.map(|w| CapData {
        effective: w,
        permitted: w,
        inheritable: w,
    });
    // SAFETY: as in capget; the kernel only reads `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(PrivilegesError::Caps(io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops to `uid`:`gid` with no capabilities left and no_new_privs set.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), PrivilegesError> {
    drop_privileges_keeping(uid, gid, &[])
}

/// The capability mask of `caps` (capability numbers such as
/// `CAP_DAC_OVERRIDE` = 1), split into the two 32-bit words of the v3 ABI.
fn mask(caps: &[u32]) -> [u32; 2] {
    let mut m = [0u32; 2];
    for &c in caps {
        if c < 64 {
            m[(c / 32) as usize] |= 1 << (c % 32);
        }
    }
    m
}

/// Drops to `uid`:`gid` with no_new_privs set and no capabilities but
/// `keep`, which stay effective, permitted, inheritable and ambient (so
/// they survive the exec of an ordinary program) and in the bounding set.
/// With `keep` empty this is [`drop_privileges`]. Makes no allocation on
/// success: safe between fork and exec.
pub fn drop_privileges_keeping(uid: u32, gid: u32, keep: &[u32]) -> Result<(), PrivilegesError> {
    let want = mask(keep);
    // Bounding set: needs CAP_SETPCAP, so before the uid change. Walk caps
    // until the kernel says the number is out of range.
    let mut cap: libc::c_ulong = 0;
    // SAFETY: PR_CAPBSET_READ takes an integer and reads nothing else.
    while unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } >= 0 {
        if !keep.iter().any(|&k| libc::c_ulong::from(k) == cap) {
            prctl("PR_CAPBSET_DROP", libc::PR_CAPBSET_DROP, cap)?;
        }
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
    if !keep.is_empty() {
        // Keep the permitted set across the uid change.
        prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, 1)?;
    }

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
    // A switch to a non-zero uid already empties the effective set (and,
    // without KEEPCAPS, the permitted one); set them explicitly so uid 0
    // is covered as well.
    set_caps(want)?;
    if !keep.is_empty() {
        prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, 0)?;
        for &k in keep {
            // SAFETY: integer-only prctl.
            if unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    libc::c_ulong::from(k),
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            } < 0
            {
                return Err(PrivilegesError::Prctl(
                    "PR_CAP_AMBIENT_RAISE",
                    io::Error::last_os_error(),
                ));
            }
        }
    }

    let left = capget()?;
    if left
        .iter()
        .zip(want)
        .any(|(d, w)| d.effective != w || d.permitted != w || d.inheritable != w)
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

    #[test]
    fn capability_masks() {
        assert_eq!(mask(&[]), [0, 0]);
        assert_eq!(mask(&[1]), [2, 0]);
        assert_eq!(mask(&[0, 33, 99]), [1, 2]);
    }
}
