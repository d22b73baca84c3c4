//! Listing the image's tree with debugfs (`ls -l` and `ls -p` of every
//! directory, level by level), parsing the listings, and the checks that
//! make the rdump that follows safe.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{unsafe_entry, Debugfs, Ext4Error, LOST_FOUND, ROOT_INO};

/// Most entries (files, directories, ...) extracted.
pub(super) const MAX_ENTRIES: usize = 4 << 20;
/// Longest host path made (below Linux's PATH_MAX of 4096).
const MAX_PATH: usize = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    File,
    Symlink,
    Special,
}

impl Kind {
    fn of(mode: u32) -> Kind {
        match mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// One entry of the tree (the root's `lost+found` and `.`/`..` excluded).
pub(super) struct Node {
    pub(super) rel: PathBuf,
    pub(super) ino: u32,
    pub(super) kind: Kind,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Directories: how many entries extract creates in it.
    pub(super) children: usize,
}

/// The checked tree, parents before children.
pub(super) struct Tree {
    pub(super) nodes: Vec<Node>,
    /// Mode, uid and gid of the root directory.
    pub(super) root: (u32, u32, u32),
    /// How many of the first `nodes` are the root's entries.
    pub(super) root_entries: usize,
    /// How many of those are created (not special files).
    pub(super) root_children: usize,
    /// The sizes of the regular files added up per name, as rdump writes
    /// a copy per name (hard links are linked again only afterwards).
    pub(super) file_bytes: u64,
}

/// One entry of `ls -l`.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    /// `i_size` (logical: a sparse file counts in full).
    size: u64,
    name: Vec<u8>,
}

/// Lists every directory (by inode, level by level) and checks the names.
pub(super) fn walk(dbg: &Debugfs, out: &Path) -> Result<Tree, Ext4Error> {
    // Longest host prefix: `<out>/lost+found/<inode>/` while dumping.
    let prefix_len = out.as_os_str().len() + LOST_FOUND.len() + 16;
    let mut nodes: Vec<Node> = Vec::new();
    let mut root = None;
    let mut root_entries = 0;
    let mut root_children = 0;
    let mut file_bytes = 0u64;
    let mut dirs_seen = HashSet::from([ROOT_INO]);
    // (inode, index in nodes; None for the root)
    let mut level: Vec<(u32, Option<usize>)> = vec![(ROOT_INO, None)];
    while !level.is_empty() {
        let cmds: Vec<String> = level
            .iter()
            .flat_map(|(ino, _)| [format!("ls -l <{ino}>"), format!("ls -p <{ino}>")])
            .collect();
        let secs = dbg.run("ls", &cmds, out)?;
        let mut next = Vec::new();
        for (k, &(dir_ino, parent)) in level.iter().enumerate() {
            let dir_rel = parent.map(|i| nodes[i].rel.clone()).unwrap_or_default();
            let (long, raw) = (&secs[2 * k], &secs[2 * k + 1]);
            let entries = read_listing(long, raw).ok_or_else(|| {
                unsafe_entry(
                    &dir_rel,
                    "cannot be listed unambiguously (a name with a NUL, '/' or a newline at the start of the directory, or an encrypted directory)",
                )
            })?;
            let mut names = HashSet::new();
            let mut created = 0;
            for e in entries {
                if e.ino == 0 {
                    continue; // an unused slot; rdump skips it too
                }
                let kind = Kind::of(e.mode);
                let rel = dir_rel.join(OsStr::from_bytes(&e.name));
                if e.name == b"." || e.name == b".." {
                    // rdump skips directories of these names.
                    if kind != Kind::Dir {
                        return Err(unsafe_entry(&rel, "is not a directory"));
                    }
                    if parent.is_none() && e.name == b"." && e.ino == dir_ino {
                        root = Some((e.mode, e.uid, e.gid));
                    }
                    continue;
                }
                if e.name.is_empty() {
                    return Err(unsafe_entry(&dir_rel, "has an entry with an empty name"));
                }
                if e.name.contains(&b'/') || e.name.contains(&0) {
                    return Err(unsafe_entry(&rel, "has a '/' or NUL byte in its name"));
                }
                if !names.insert(e.name.clone()) {
                    return Err(unsafe_entry(&rel, "appears twice in its directory"));
                }
                if parent.is_none() && e.name == LOST_FOUND.as_bytes() {
                    continue;
                }
                if prefix_len + rel.as_os_str().len() > MAX_PATH {
                    return Err(Ext4Error::TooLarge(format!(
                        "path /{} is too long",
                        rel.to_string_lossy()
                    )));
                }
                if kind == Kind::Dir && !dirs_seen.insert(e.ino) {
                    return Err(unsafe_entry(
                        &rel,
                        "is a second link to a directory (a loop or a hard-linked directory)",
                    ));
                }
                if nodes.len() >= MAX_ENTRIES {
                    return Err(Ext4Error::TooLarge(format!(
                        "more than {MAX_ENTRIES} entries"
                    )));
                }
                if kind != Kind::Special {
                    created += 1;
                }
                if kind == Kind::File {
                    file_bytes = file_bytes.saturating_add(e.size);
                }
                if kind == Kind::Dir {
                    next.push((e.ino, Some(nodes.len())));
                }
                if parent.is_none() {
                    root_entries += 1;
                }
                nodes.push(Node {
                    rel,
                    ino: e.ino,
                    kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    children: 0,
                });
            }
            match parent {
                Some(i) => nodes[i].children = created,
                None => root_children = created,
            }
        }
        level = next;
    }
    let root = root.ok_or_else(|| unsafe_entry(Path::new(""), "has no '.' entry"))?;
    Ok(Tree {
        nodes,
        root,
        root_entries,
        root_children,
        file_bytes,
    })
}

/// The entries of one directory from its `ls -l` lines, checked against
/// its raw `ls -p` output; None when they disagree.
fn read_listing(long: &[Vec<u8>], raw: &[Vec<u8>]) -> Option<Vec<Listed>> {
    let mut entries = Vec::new();
    for line in long.iter().filter(|l| !l.is_empty()) {
        entries.push(parse_long(line)?);
    }
    let raw = raw.join(&b'\n');
    let mut rest = raw.as_slice();
    for e in &mut entries {
        let escaped = std::mem::take(&mut e.name);
        let mut found = None;
        for cand in [unescape_hex(&escaped), unescape_legacy(&escaped)] {
            if let Some(after) = match_parse_line(rest, e, &cand) {
                found = Some((after, cand));
                break;
            }
        }
        let (after, name) = found?;
        rest = after;
        e.name = name;
    }
    rest.iter().all(|b| *b == b'\n').then_some(entries)
}

/// Matches one `ls -p` line, `/ino/mode/uid/gid/name/size/` (size empty for
/// directories), for the entry `e` named `name` at the start of `raw`;
/// returns what follows it. `ls -p` prints the name up to a NUL byte.
fn match_parse_line<'a>(raw: &'a [u8], e: &Listed, name: &[u8]) -> Option<&'a [u8]> {
    let printed = name.split(|b| *b == 0).next().unwrap_or_default();
    let mut rest = raw.strip_prefix(format!("/{}/{:06o}/", e.ino, e.mode).as_bytes())?;
    // uid and gid (%d: maybe negative; only the low 16 bits in old versions)
    for _ in 0..2 {
        rest = skip_number(rest)?.strip_prefix(b"/")?;
    }
    rest = rest.strip_prefix(printed)?.strip_prefix(b"/")?;
    if Kind::of(e.mode) != Kind::Dir {
        rest = skip_number(rest)?;
    }
    rest.strip_prefix(b"/\n")
}

/// What follows an optionally negative decimal number at the start of `s`.
fn skip_number(s: &[u8]) -> Option<&[u8]> {
    let s = s.strip_prefix(b"-").unwrap_or(s);
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    s.get(n..).filter(|_| n > 0)
}

/// Parses one `ls -l` line:
/// ` <ino> <mode> (<type>) <uid> <gid> <size> <dd-Mon-yyyy hh:mm> <name>`
/// (17 blanks for the date of an unused entry). The name is still escaped.
fn parse_long(line: &[u8]) -> Option<Listed> {
    let mut s = line.strip_prefix(b" ")?;
    let ino = u32::try_from(take_int(&mut s, 10)?).ok()?;
    let mode = u32::try_from(take_int(&mut s, 8)?).ok()?;
    skip_blanks(&mut s);
    s = s.strip_prefix(b"(")?;
    take_int(&mut s, 10)?;
    s = s.strip_prefix(b")")?;
    // printed with %d: ids above 2^31 come out negative
    let uid = i32::try_from(take_int(&mut s, 10)?).ok()? as u32;
    let gid = i32::try_from(take_int(&mut s, 10)?).ok()? as u32;
    let size = u64::try_from(take_int(&mut s, 10)?).unwrap_or(0);
    let name = s.strip_prefix(b" ")?.get(17..)?.strip_prefix(b" ")?;
    Some(Listed {
        ino,
        mode,
        uid,
        gid,
        size,
        name: name.to_vec(),
    })
}

fn skip_blanks(s: &mut &[u8]) {
    while let [b' ', rest @ ..] = *s {
        *s = rest;
    }
}

/// Blanks, then an optionally negative number.
fn take_int(s: &mut &[u8], radix: u32) -> Option<i64> {
    skip_blanks(s);
    let (neg, digits) = match s.strip_prefix(b"-") {
        Some(r) => (true, r),
        None => (false, *s),
    };
    let n = digits
        .iter()
        .take_while(|b| char::from(**b).is_digit(radix))
        .count();
    if n == 0 || n > 20 {
        return None;
    }
    let v = i64::from_str_radix(std::str::from_utf8(&digits[..n]).ok()?, radix).ok()?;
    *s = &digits[n..];
    Some(if neg { -v } else { v })
}

/// `ls -l` names of e2fsprogs 1.47+: `\xNN` for control, non-ASCII and `\`.
fn unescape_hex(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if let Some(b) = s
            .get(i..i + 4)
            .filter(|e| e.starts_with(b"\\x"))
            .and_then(|e| std::str::from_utf8(&e[2..]).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// `ls -l` names of older e2fsprogs: `M-` for bytes above 128, `^` for
/// control characters.
fn unescape_legacy(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let mut high = 0u8;
        if s[i..].starts_with(b"M-") && i + 2 < s.len() {
            high = 128;
            i += 2;
        }
        if s[i] == b'^' && i + 1 < s.len() {
            out.push((s[i + 1] ^ 0x40).wrapping_add(high));
            i += 2;
        } else {
            out.push(s[i].wrapping_add(high));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ext4::tests::lines;

    #[test]
    fn ls_long_lines() {
        let l = parse_long(b"     12  100644 (1)   1234   5678       3  1-Dec-2026 18:52 a b\\x5c")
            .unwrap();
        assert_eq!((l.ino, l.mode, l.uid, l.gid), (12, 0o100644, 1234, 5678));
        assert_eq!(l.name, b"a b\\x5c");
        assert_eq!(unescape_hex(&l.name), b"a b\\");
        let l = parse_long(b"     13   40755 (2)     -2 -1294967296    1024 13-Feb-2009 23:31 d")
            .unwrap();
        assert_eq!((l.uid, l.gid), (u32::MAX - 1, 3_000_000_000));
        // An unused slot has no date.
        let l = parse_long(b"      0       0 (1)      0      0       0                   gone")
            .unwrap();
        assert_eq!((l.ino, l.name.as_slice()), (0, &b"gone"[..]));
        assert!(parse_long(b"/12/100644/0/0/x/1/").is_none());
        assert!(parse_long(b"     12  100644 (1)      0      0       3 1-Dec").is_none());
        assert_eq!(
            unescape_hex(b"\\xc3\\xbc\\x0a\\x5cx41\\"),
            "ü\n\\x41\\".as_bytes()
        );
        assert_eq!(unescape_legacy(b"M-CM-<^J^?M-^Ax"), b"\xc3\xbc\n\x7f\x81x");
    }

    #[test]
    fn listings_must_agree() {
        let long = lines(
            "      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 .\n      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 ..\n     16  100644 (1)      0      0       1  1-Dec-2026 18:44 nl\\x0aname\n     17  120777 (7)      0      0       3  1-Dec-2026 18:44 lnk\n",
        );
        let raw = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/16/100644/0/0/nl\nname/1/\n/17/120777/0/0/lnk/3/\n");
        let e = read_listing(&long, &raw).unwrap();
        let names: Vec<&[u8]> = e.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, [&b"."[..], b"..", b"nl\nname", b"lnk"]);
        // A raw name that fakes a second line: `ls -p` shows more entries.
        let raw2 = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/16/100644/0/0/nl\nname/1/\n/17/120777/0/0/lnk/3/\n/18/100644/0/0/fake/1/\n");
        assert!(read_listing(&long, &raw2).is_none());
        // `..` whose raw name is longer (`..//\n...`): `ls -l` prints it raw.
        let long3 = lines(
            "      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 .\n      2   40755 (2)      0      0    1024  1-Dec-2026 18:44 ..//\n     99   40755 (2)      0      0    1024  1-Dec-2026 18:44 x\n",
        );
        let raw3 = lines("/2/040755/0/0/.//\n/2/040755/0/0/..//\n/99/040755/0/0/x//\n");
        assert!(read_listing(&long3, &raw3).is_none());
        // A NUL in a name: ls -p stops there, so the names disagree.
        let long4 = lines("     16  100644 (1)      0      0       1  1-Dec-2026 18:44 a\\x00b\n");
        let raw4 = lines("/16/100644/0/0/a/1/\n");
        assert_eq!(read_listing(&long4, &raw4).unwrap()[0].name, b"a\0b");
        // ... unless the name is `a\x00b` as old versions print it.
        let raw5 = lines("/16/100644/0/0/a\\x00b/1/\n");
        assert_eq!(read_listing(&long4, &raw5).unwrap()[0].name, b"a\\x00b");
        let raw6 = lines("/16/100644/0/0/a\\x00c/1/\n");
        assert!(read_listing(&long4, &raw6).is_none());
    }
}
