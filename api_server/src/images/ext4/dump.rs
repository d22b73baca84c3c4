//! Dumping the listed tree with debugfs `rdump`, one root entry at a time,
//! then restoring what rdump leaves out: setuid/setgid/sticky bits, owners
//! of symlinks, hard links, and times read with `idump`.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::listing::{Kind, Tree};
use super::{
    debugfs_err, io_err, le16, le32, Debugfs, Ext4Error, ExtractStats, GOOD_OLD_INODE_SIZE,
    LOST_FOUND, ROOT_INO,
};

/// Inode fields (little endian) read from `idump`.
const I_ATIME: usize = 0x08;
const I_MTIME: usize = 0x10;
const I_EXTRA_ISIZE: usize = 0x80;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8c;

/// An (atime, mtime) pair.
pub(super) type Times = [libc::timespec; 2];

fn times_of(md: &fs::Metadata) -> Times {
    [
        libc::timespec {
            tv_sec: md.atime() as libc::time_t,
            tv_nsec: md.atime_nsec() as _,
        },
        libc::timespec {
            tv_sec: md.mtime() as libc::time_t,
            tv_nsec: md.mtime_nsec() as _,
        },
    ]
}

/// Sets the times of `p` itself (not of a symlink's target).
pub(super) fn set_times(p: &Path, t: &Times) -> Result<(), Ext4Error> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io_err(p)(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c` is a NUL-terminated path and `t` two timespecs, both
    // alive for the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io_err(p)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Dumps the checked tree into `out` and fixes what rdump does not keep.
pub(super) fn dump(
    dbg: &Debugfs,
    out: &Path,
    tree: &Tree,
    inode_size: usize,
) -> Result<ExtractStats, Ext4Error> {
    let nodes = &tree.nodes;
    let root_nodes = &nodes[..tree.root_entries];
    // 1. rdump every root entry (each inode once) into out/lost+found.
    let staging = out.join(LOST_FOUND);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(&staging))?;
    let mut cmds = Vec::new();
    let mut dumped = HashSet::new();
    for n in root_nodes {
        if n.kind != Kind::Special && dumped.insert(n.ino) {
            cmds.push(format!("rdump <{}> {LOST_FOUND}", n.ino));
        }
    }
    let rdumps = cmds.len();
    // The times rdump does not set: symlinks and the root.
    let mut timed = vec![ROOT_INO];
    let mut seen = HashSet::new();
    for n in nodes {
        if n.kind == Kind::Symlink && seen.insert(n.ino) {
            timed.push(n.ino);
        }
    }
    cmds.extend(timed.iter().map(|ino| format!("idump <{ino}>")));
    let secs = dbg.run("rdump", &cmds, out)?;
    let mut times = HashMap::new();
    for (ino, lines) in timed.iter().zip(&secs[rdumps..]) {
        let t = parse_idump(lines, inode_size)
            .and_then(|b| inode_times(&b))
            .ok_or_else(|| debugfs_err("idump", format!("unexpected output for inode {ino}")))?;
        times.insert(*ino, t);
    }
    if let Some(lines) = secs[..rdumps]
        .iter()
        .find(|s| s.iter().any(|l| !l.is_empty()))
    {
        return Err(debugfs_err(
            "rdump",
            String::from_utf8_lossy(&lines.join(&b'\n')).into_owned(),
        ));
    }

    // 2. Move them into place, keeping their times.
    let mut moved = HashSet::new();
    for n in root_nodes {
        if n.kind == Kind::Special || !moved.insert(n.ino) {
            continue;
        }
        let src = staging.join(format!("<{}>", n.ino));
        let md = fs::symlink_metadata(&src)
            .map_err(|_| debugfs_err("rdump", format!("did not write /{}", n.rel.display())))?;
        let dst = out.join(&n.rel);
        fs::rename(&src, &dst).map_err(io_err(&dst))?;
        set_times(&dst, &times_of(&md))?;
    }
    fs::remove_dir(&staging).map_err(|e| {
        debugfs_err(
            "rdump",
            format!("wrote unexpected files into {}: {e}", staging.display()),
        )
    })?;

    // 3. Directory times, before links change them.
    let mut dir_times = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.kind == Kind::Dir {
            let p = out.join(&n.rel);
            let md = fs::symlink_metadata(&p).map_err(io_err(&p))?;
            dir_times.insert(i, times_of(&md));
        }
    }

    // 4. Hard links: rdump wrote a copy per name (and at the root, only the
    // first name of an inode).
    let mut first: HashMap<u32, &Path> = HashMap::new();
    for n in nodes {
        if !matches!(n.kind, Kind::File | Kind::Symlink) {
            continue;
        }
        let Some(f) = first.get(&n.ino) else {
            first.insert(n.ino, &n.rel);
            continue;
        };
        let (src, p) = (out.join(f), out.join(&n.rel));
        let exists = fs::symlink_metadata(&p).is_ok();
        if n.kind == Kind::File {
            if exists {
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            fs::hard_link(&src, &p).map_err(io_err(&p))?;
        } else if !exists {
            // Symlinks stay separate, as rdump wrote them below the root.
            let target = fs::read_link(&src).map_err(io_err(&src))?;
            std::os::unix::fs::symlink(target, &p).map_err(io_err(&p))?;
        }
    }

    // 5. Owners, modes (rdump drops setuid/setgid/sticky) and times,
    // children before their directory.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owners = unsafe { libc::geteuid() } == 0;
    let mut stats = ExtractStats::default();
    for (i, n) in nodes.iter().enumerate().rev() {
        let p = out.join(&n.rel);
        if n.kind == Kind::Special {
            stats.skipped += 1;
            continue;
        }
        let md = fs::symlink_metadata(&p)
            .map_err(|_| debugfs_err("rdump", format!("did not write /{}", n.rel.display())))?;
        let ft = md.file_type();
        let (ok, t) = match n.kind {
            Kind::Dir => (ft.is_dir(), dir_times.get(&i)),
            Kind::File => (ft.is_file(), None),
            _ => (ft.is_symlink(), times.get(&n.ino)),
        };
        if !ok {
            return Err(debugfs_err(
                "rdump",
                format!("wrote /{} as another kind of file", n.rel.display()),
            ));
        }
        match n.kind {
            Kind::Dir => stats.dirs += 1,
            Kind::File => stats.files += 1,
            _ => stats.symlinks += 1,
        }
        if n.kind == Kind::Dir {
            check_entries(&p, n.children)?;
        }
        fix_meta(
            &p,
            &md,
            (n.mode, n.uid, n.gid),
            owners,
            n.kind != Kind::Symlink,
        )?;
        if let Some(t) = t {
            set_times(&p, t)?;
        }
    }
    check_entries(out, tree.root_children)?;
    let md = fs::symlink_metadata(out).map_err(io_err(out))?;
    fix_meta(out, &md, tree.root, owners, true)?;
    if let Some(t) = times.get(&ROOT_INO) {
        set_times(out, t)?;
    }
    Ok(stats)
}

/// Fails unless the directory `p` holds exactly `want` entries.
fn check_entries(p: &Path, want: usize) -> Result<(), Ext4Error> {
    let have = fs::read_dir(p).map_err(io_err(p))?.count();
    if have != want {
        return Err(debugfs_err(
            "rdump",
            format!(
                "wrote {have} entries into {} instead of {want}",
                p.display()
            ),
        ));
    }
    Ok(())
}

/// Owner (when root; first, as chown clears setuid) and mode (not for
/// symlinks) of `p` as in the image.
fn fix_meta(
    p: &Path,
    md: &fs::Metadata,
    (mode, uid, gid): (u32, u32, u32),
    owners: bool,
    chmod: bool,
) -> Result<(), Ext4Error> {
    if owners && (md.uid() != uid || md.gid() != gid) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_err(p))?;
    }
    if chmod {
        fs::set_permissions(p, fs::Permissions::from_mode(mode & 0o7777)).map_err(io_err(p))?;
    }
    Ok(())
}

/// The inode bytes from `idump` lines (`<octal offset>  <8 groups of 4 hex
/// digits>  <ascii>`, `*` for lines repeating the previous one).
fn parse_idump(lines: &[Vec<u8>], inode_size: usize) -> Option<Vec<u8>> {
    let mut bytes: Vec<u8> = Vec::with_capacity(inode_size);
    let mut last: Option<[u8; 16]> = None;
    let mut repeat = false;
    let fill = |bytes: &mut Vec<u8>, upto: usize, row: &[u8; 16]| {
        while bytes.len() < upto {
            bytes.extend_from_slice(row);
        }
    };
    for line in lines.iter().filter(|l| !l.is_empty()) {
        if line.as_slice() == b"*" {
            repeat = true;
            continue;
        }
        let text = std::str::from_utf8(line.get(..46)?).ok()?;
        let mut words = text.split_ascii_whitespace();
        let off = usize::from_str_radix(words.next()?, 8).ok()?;
        if repeat {
            fill(&mut bytes, off, &last?);
            repeat = false;
        }
        if off != bytes.len() {
            return None;
        }
        let mut row = [0u8; 16];
        for pair in row.chunks_mut(2) {
            let w = words.next().filter(|w| w.len() == 4)?;
            let v = u16::from_str_radix(w, 16).ok()?;
            pair.copy_from_slice(&v.to_be_bytes());
        }
        bytes.extend_from_slice(&row);
        last = Some(row);
    }
    if repeat {
        fill(&mut bytes, inode_size, &last?);
    }
    (bytes.len() == inode_size).then_some(bytes)
}

/// (atime, mtime) of a raw inode: 32-bit signed seconds, plus, in large
/// inodes, two epoch bits and the nanoseconds from the `_extra` fields.
fn inode_times(b: &[u8]) -> Option<Times> {
    let extra = if b.len() > GOOD_OLD_INODE_SIZE {
        usize::from(le16(b, I_EXTRA_ISIZE)?)
    } else {
        0
    };
    let one = |base: usize, at: usize| -> Option<libc::timespec> {
        let secs = i64::from(le32(b, base)? as i32);
        let ext = if GOOD_OLD_INODE_SIZE + extra >= at + 4 {
            le32(b, at).unwrap_or(0)
        } else {
            0
        };
        let nsec = i64::from(ext >> 2);
        Some(libc::timespec {
            tv_sec: (secs + (i64::from(ext & 3) << 32)) as libc::time_t,
            tv_nsec: (if nsec < 1_000_000_000 { nsec } else { 0 }) as _,
        })
    };
    Some([one(I_ATIME, I_ATIME_EXTRA)?, one(I_MTIME, I_MTIME_EXTRA)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ext4::tests::lines;

    #[test]
    fn idump_and_times() {
        let text = "0000  ffa1 7011 0600 0000 d202 9649 8116 0f6b  ..p........I...k\n0020  d202 9649 0000 0000 7111 0100 0000 0000  ...I....q.......\n0040  0000 0000 0000 0000 7461 7267 6574 0000  ........target..\n0060  0000 0000 0000 0000 0000 0000 0000 0000  ................\n*\n0160  0000 0000 0000 0000 0100 0100 c4c0 0000  ................\n0200  2000 144c 0000 0000 0500 0000 0000 0000   ..L............\n0220  8116 0f6b 0000 0000 0000 0000 0000 0000  ...k............\n0240  0000 0000 0000 0000 0000 0000 0000 0000  ................\n*\n";
        let b = parse_idump(&lines(text), 256).unwrap();
        assert_eq!(b.len(), 256);
        assert_eq!(&b[0x28..0x2e], b"target");
        let [at, mt] = inode_times(&b).unwrap();
        assert_eq!((at.tv_sec, at.tv_nsec), (1_234_567_890, 0));
        // mtime_extra 5: epoch bit 1, 1 ns.
        assert_eq!((mt.tv_sec, mt.tv_nsec), (1_234_567_890 + (1 << 32), 1));
        let (head, _) = text.split_at(text.rfind("*\n").unwrap());
        assert!(parse_idump(&lines(head), 256).is_none(), "too short");
        assert!(parse_idump(&lines("0020  0000\n"), 256).is_none());
    }
}
