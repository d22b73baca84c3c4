//! Volume images: host files that become virtio-blk drives of an instance.
//!
//! Three kinds are built:
//!
//! * [`create_empty_ext4`]: a sparse file of the requested size, formatted
//!   as ext4.
//! * [`create_ext4_from_dir`]: an ext4 image populated from a directory
//!   (`mkfs.ext4 -d`), sized to fit the content unless a size is given.
//! * [`create_raw`]: the uploaded bytes are the image, as-is.
//!
//! ## mkfs options
//!
//! Every ext4 image is made with
//! `mkfs.ext4 -F -q -b 4096 -I 256 -m 0 -O ^has_journal -E root_owner=0:0`
//! (plus `-N <inodes>` and `-d <dir>` when populating). Defaults of the host's
//! `mke2fs.conf` are kept otherwise (extents, 64bit, flex_bg, dir_index,
//! metadata_csum, ...). The choices:
//!
//! * `-b 4096`: explicit, so a tiny image does not silently get 1 KiB blocks
//!   from mke2fs's "small"/"floppy" profiles; 4 KiB is page-sized and means
//!   fewer metadata blocks for a minimal in-guest reader to walk.
//! * `-I 256`: explicit inode size (the "small" profile of some e2fsprogs
//!   versions uses 128); a reader must still honour `s_inode_size`.
//! * `-O ^has_journal`: no journal. It would cost 4+ MiB on small images and
//!   a read-only reader has to ignore it anyway; the guest can still mount
//!   the volume read-write (ext4 without a journal is valid).
//! * `-m 0`: no blocks reserved for root; these are data volumes.
//! * `-E root_owner=0:0`: the root directory belongs to root in the guest,
//!   whatever user the daemon runs as.
//! * Extents and `metadata_csum` stay on (defaults): checksums are a
//!   read-only-compatible feature a simple reader may ignore, and extents are
//!   what every current ext4 reader expects.
//!
//! Every `create_*` function replaces `path` on success; when it fails
//! after it started writing `path`, the partial image is removed.
//!
//! The binaries come from e2fsprogs (`mkfs.ext4`; the tests also use
//! `debugfs` and `dumpe2fs`). They are looked up in `PATH` and in the usual
//! sbin directories.
//!
//! mkfs.ext4 runs as a [`crate::sandbox`] job: the content directory is
//! bound read-only at `/in` (the job keeps only `CAP_DAC_OVERRIDE`, to read
//! files of any owner and mode, whose owners mkfs records), the image is
//! made sparse in the job's `/out` and written there under `RLIMIT_FSIZE`
//! at the image size, then moved to `path` with `O_NOFOLLOW` (a regular,
//! singly linked file). The image and the content are fixed names inside
//! the job (`/out/image`, `/in`): no user-chosen name reaches mkfs's
//! arguments.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sandbox::{Job, SandboxError, Status};

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;
/// Largest volume this module creates (1 TiB), in MB.
pub const MAX_VOLUME_MB: u64 = 1024 * 1024;
/// Smallest automatically sized ext4 image, in MB.
pub const MIN_AUTO_EXT4_MB: u64 = 8;
/// ext4 block size used for every image.
pub const EXT4_BLOCK_SIZE: u64 = 4096;
/// ext4 inode size used for every image.
pub const EXT4_INODE_SIZE: u64 = 256;
/// Bytes of filesystem per inode when no inode count is forced.
const BYTES_PER_INODE: u64 = 16384;
/// Raw images are padded to a multiple of this (the virtio-blk sector).
const SECTOR: u64 = 512;
/// How many times an automatically sized image is grown and retried.
const AUTO_RETRIES: u32 = 4;
/// Wall-clock limit of one mkfs run (populating a large image takes
/// minutes).
pub const MKFS_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Directories searched for e2fsprogs binaries besides `PATH`.
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// Why a volume image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A required e2fsprogs binary is not installed.
    #[error("{0} not found (install e2fsprogs)")]
    ToolMissing(&'static str),
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// mkfs.ext4 failed for a reason other than lack of space.
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
    /// The requested size cannot hold the content.
    #[error("volume size {given_mb} MB is too small for the content (needs about {needed_mb} MB)")]
    TooSmall { given_mb: u64, needed_mb: u64 },
    /// The raw data is larger than the requested size.
    #[error("raw volume data is larger than the requested size of {0} MB")]
    RawTooLarge(u64),
    /// Raw data was empty and no size was given.
    #[error("raw volume data is empty and no size was given")]
    EmptyRaw,
    /// A size of zero or above [`MAX_VOLUME_MB`].
    #[error("invalid volume size {0} MB (must be 1..={MAX_VOLUME_MB})")]
    InvalidSize(u64),
    /// The content directory is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// The mkfs job could not run, or its image could not be taken.
    #[error("mkfs.ext4 sandbox: {0}")]
    Sandbox(Box<SandboxError>),
}

impl From<SandboxError> for VolumeError {
    fn from(e: SandboxError) -> Self {
        VolumeError::Sandbox(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_size(size_mb: u64) -> Result<u64, VolumeError> {
    if size_mb == 0 || size_mb > MAX_VOLUME_MB {
        return Err(VolumeError::InvalidSize(size_mb));
    }
    Ok(size_mb * MIB)
}

/// Finds an e2fsprogs binary in `PATH` or the usual sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Creates (or replaces) `path` as a sparse file of `size_bytes`.
fn create_sparse(path: &Path, size_bytes: u64) -> Result<(), VolumeError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    file.set_len(size_bytes).map_err(io_err(path))
}

/// Result of one mkfs run.
enum MkfsOutcome {
    Ok,
    NoSpace,
}

/// Runs mkfs.ext4 with the module's fixed options in a sandbox job on a
/// new sparse image of `bytes`, populated from `dir`; on success the image
/// replaces `path`.
fn run_mkfs(
    path: &Path,
    bytes: u64,
    dir: Option<&Path>,
    inodes: Option<u64>,
) -> Result<MkfsOutcome, VolumeError> {
    let mkfs = find_tool("mkfs.ext4").ok_or(VolumeError::ToolMissing("mkfs.ext4"))?;
    let mut job = Job::new(mkfs)?;
    let image = job.out_dir().join("image");
    create_sparse(&image, bytes)?;
    job = job
        .timeout(MKFS_TIMEOUT)
        .max_file(bytes)
        .max_output(bytes)
        .args([
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
        ]);
    if let Some(n) = inodes {
        job = job.arg("-N").arg(n.to_string());
    }
    if let Some(d) = dir {
        job = job.ro(d, "/in").read_any(true).arg("-d").arg("/in");
    }
    let run = job.arg("/out/image").run()?;
    if run.success() {
        run.take_file("image", path, bytes, 0o644)?;
        return Ok(MkfsOutcome::Ok);
    }
    let mut stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    stderr.push_str(&String::from_utf8_lossy(&run.stdout));
    if stderr.contains("Could not allocate") || stderr.contains("No space left") {
        return Ok(MkfsOutcome::NoSpace);
    }
    let mut stderr = stderr.trim().to_string();
    if stderr.len() > 4096 {
        let mut cut = 4096;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(VolumeError::Mkfs {
        status: match run.status {
            Status::Exited(c) => format!("exit status: {c}"),
            _ => run.describe(),
        },
        stderr,
    })
}

/// Creates `path` (replacing it) as an empty ext4 filesystem of `size_mb`
/// MB; the file is sparse.
pub fn create_empty_ext4(path: &Path, size_mb: u64) -> Result<(), VolumeError> {
    let bytes = check_size(size_mb)?;
    let res = match run_mkfs(path, bytes, None, None) {
        Ok(MkfsOutcome::Ok) => Ok(()),
        Ok(MkfsOutcome::NoSpace) => Err(VolumeError::TooSmall {
            given_mb: size_mb,
            needed_mb: size_mb + 1,
        }),
        Err(e) => Err(e),
    };
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

/// What a directory tree needs on ext4 (4 KiB blocks).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TreeNeeds {
    /// Inodes used by the content (root excluded).
    inodes: u64,
    /// Data, directory and extent-index blocks.
    blocks: u64,
}

fn blocks_for(bytes: u64) -> u64 {
    bytes.div_ceil(EXT4_BLOCK_SIZE)
}

/// Walks `dir` without following symlinks and estimates its ext4 needs.
fn measure_tree(dir: &Path) -> Result<TreeNeeds, VolumeError> {
    let mut needs = TreeNeeds::default();
    let mut seen_hardlinks: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut dir_bytes: u64 = 24; // "." and ".."
        for entry in fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let name_len = entry.file_name().len() as u64;
            dir_bytes += 8 + name_len.div_ceil(4) * 4;
            if md.nlink() > 1 && !md.is_dir() && !seen_hardlinks.insert((md.dev(), md.ino())) {
                continue; // another name of an inode already counted
            }
            needs.inodes += 1;
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let b = blocks_for(md.len());
                // One extent covers at most 32768 blocks; beyond four extents
                // an index block is needed per ~340 extents. Be generous.
                needs.blocks += b + b / 8192;
            } else if ft.is_symlink() && md.len() >= 60 {
                needs.blocks += 1; // not a "fast" (in-inode) symlink
            }
        }
        // Directory blocks, plus room for the htree index of large ones.
        let b = blocks_for(dir_bytes).max(1);
        needs.blocks += b + b / 16;
    }
    Ok(needs)
}

/// Estimated image size for `needs` with `inodes` inodes, in bytes.
fn estimate_bytes(needs: TreeNeeds, inodes: u64) -> u64 {
    let data = needs.blocks * EXT4_BLOCK_SIZE;
    let inode_tables = inodes * EXT4_INODE_SIZE;
    let lost_found = 4 * EXT4_BLOCK_SIZE;
    let base = data + inode_tables + lost_found;
    // Bitmaps, group descriptors, superblock backups and reserved GDT blocks
    // are a few percent; add 1/8 and 4 MiB of slack.
    base + base / 8 + 4 * MIB
}

/// Inode count for an image of `size_bytes` holding `needs`.
fn inode_count(needs: TreeNeeds, size_bytes: u64) -> u64 {
    let wanted = needs.inodes + 16; // reserved inodes 1..=11, lost+found, slack
    (wanted + wanted / 4 + 64).max(size_bytes / BYTES_PER_INODE)
}

/// Creates `path` (replacing it) as an ext4 image holding the content of
/// `dir` (files, directories, symlinks, hard links, modes; owners as on the
/// host). With `size_mb` None the size is computed to fit the content (at
/// least [`MIN_AUTO_EXT4_MB`]); a given size that cannot hold the content is
/// [`VolumeError::TooSmall`]. Returns the image size in MB.
pub fn create_ext4_from_dir(
    path: &Path,
    dir: &Path,
    size_mb: Option<u64>,
) -> Result<u64, VolumeError> {
    let md = fs::metadata(dir).map_err(io_err(dir))?;
    if !md.is_dir() {
        return Err(VolumeError::NotADirectory(dir.to_path_buf()));
    }
    let needs = measure_tree(dir)?;
    // The estimate with a minimal inode count: the least the content needs.
    let min_inodes = inode_count(needs, 0);
    let needed_mb = estimate_bytes(needs, min_inodes).div_ceil(MIB);
    let res = match size_mb {
        Some(given) => {
            let bytes = check_size(given)?;
            // The lower bound without slack: surely too small below it.
            let floor = needs.blocks * EXT4_BLOCK_SIZE + min_inodes * EXT4_INODE_SIZE;
            if floor > bytes {
                return Err(VolumeError::TooSmall {
                    given_mb: given,
                    needed_mb,
                });
            }
            build_from_dir(path, dir, bytes, inode_count(needs, bytes)).and_then(|ok| {
                if ok {
                    Ok(given)
                } else {
                    Err(VolumeError::TooSmall {
                        given_mb: given,
                        needed_mb: needed_mb.max(given + 1),
                    })
                }
            })
        }
        None => {
            let mut mb = needed_mb.max(MIN_AUTO_EXT4_MB);
            let mut attempt = 0;
            loop {
                let bytes = check_size(mb)?;
                match build_from_dir(path, dir, bytes, inode_count(needs, bytes)) {
                    Ok(true) => break Ok(mb),
                    Ok(false) if attempt < AUTO_RETRIES => {
                        attempt += 1;
                        mb += mb / 2;
                    }
                    Ok(false) => {
                        break Err(VolumeError::TooSmall {
                            given_mb: mb,
                            needed_mb: mb + mb / 2,
                        })
                    }
                    Err(e) => break Err(e),
                }
            }
        }
    };
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

/// One mkfs -d attempt; Ok(false) when the content did not fit.
fn build_from_dir(path: &Path, dir: &Path, bytes: u64, inodes: u64) -> Result<bool, VolumeError> {
    match run_mkfs(path, bytes, Some(dir), Some(inodes))? {
        MkfsOutcome::Ok => Ok(true),
        MkfsOutcome::NoSpace => Ok(false),
    }
}

/// Creates `path` (replacing it) from raw bytes: the data is the image,
/// padded with zeros to a multiple of 512 bytes and, when `size_mb` is given
/// and larger, extended (sparsely) to that size. Data larger than `size_mb`
/// is [`VolumeError::RawTooLarge`]; empty data without a size is
/// [`VolumeError::EmptyRaw`]. Returns the image size in MB (rounded up).
pub fn create_raw(path: &Path, data: impl Read, size_mb: Option<u64>) -> Result<u64, VolumeError> {
    let limit = match size_mb {
        Some(mb) => check_size(mb)?,
        None => MAX_VOLUME_MB * MIB,
    };
    let res = write_raw(path, data, limit, size_mb);
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

fn write_raw(
    path: &Path,
    data: impl Read,
    limit: u64,
    size_mb: Option<u64>,
) -> Result<u64, VolumeError> {
    let mut file = File::create(path).map_err(io_err(path))?;
    let mut data = data.take(limit + 1);
    let written = io::copy(&mut data, &mut file).map_err(io_err(path))?;
    if written > limit {
        return Err(VolumeError::RawTooLarge(limit / MIB));
    }
    if written == 0 && size_mb.is_none() {
        return Err(VolumeError::EmptyRaw);
    }
    file.flush().map_err(io_err(path))?;
    let mut len = written.div_ceil(SECTOR) * SECTOR;
    if size_mb.is_some() {
        len = len.max(limit);
    }
    file.set_len(len).map_err(io_err(path))?;
    Ok(len.div_ceil(MIB))
}

/// Size of an image file in MB, rounded up; 0 if it cannot be read.
pub fn image_size_mb(path: &Path) -> u64 {
    fs::metadata(path)
        .map(|m| m.len().div_ceil(MIB))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use crate::test_util::TempDir;

    /// Runs `debugfs -R <req> <img>` and returns stdout.
    fn debugfs(img: &Path, req: &str) -> String {
        let tool = find_tool("debugfs")
            .expect("debugfs not found: these tests need e2fsprogs (apt-get install -y e2fsprogs)");
        let out = Command::new(tool)
            .arg("-R")
            .arg(req)
            .arg(img)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs {req}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn require_mkfs() {
        assert!(
            find_tool("mkfs.ext4").is_some(),
            "mkfs.ext4 not found: these tests need e2fsprogs (apt-get install -y e2fsprogs)"
        );
    }

    /// `ls -l` line for `name` in `dir` of the image: (mode octal, size).
    fn ls_entry(img: &Path, dir: &str, name: &str) -> (String, u64) {
        let out = debugfs(img, &format!("ls -l {dir}"));
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // inode mode (filetype) uid gid size date time name
            if f.len() >= 9 && f[f.len() - 1] == name {
                return (f[1].to_string(), f[5].parse().unwrap());
            }
        }
        panic!("{name} not in {dir}: {out}");
    }

    fn content_dir(t: &TempDir) -> PathBuf {
        let src = t.0.join("src");
        fs::create_dir_all(src.join("etc/nested/deeper")).unwrap();
        fs::write(src.join("etc/config"), b"port=80\n").unwrap();
        fs::write(src.join("etc/nested/deeper/data.bin"), vec![7u8; 100_000]).unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("etc/config", src.join("cfg")).unwrap();
        src
    }

    #[test]
    fn ext4_from_dir_reads_back() {
        require_mkfs();
        let t = TempDir::new();
        let src = content_dir(&t);
        let img = t.0.join("vol.ext4");
        let mb = create_ext4_from_dir(&img, &src, None).unwrap();
        assert_eq!(mb, MIN_AUTO_EXT4_MB);
        assert_eq!(image_size_mb(&img), mb);
        assert_eq!(fs::metadata(&img).unwrap().len(), mb * MIB);
        assert_eq!(debugfs(&img, "cat /etc/config"), "port=80\n");
        assert_eq!(debugfs(&img, "cat /run.sh"), "#!/bin/sh\necho hi\n");
        let data = debugfs(&img, "cat /etc/nested/deeper/data.bin");
        assert_eq!(data.as_bytes(), vec![7u8; 100_000].as_slice());
        assert_eq!(ls_entry(&img, "/", "run.sh").0, "100755");
        assert_eq!(ls_entry(&img, "/etc", "config"), ("100644".to_string(), 8));
        assert_eq!(ls_entry(&img, "/", "cfg").0, "120777");
        assert_eq!(ls_entry(&img, "/", "etc").0, "40755");
        let stat = debugfs(&img, "stat /cfg");
        assert!(stat.contains("Fast link dest: \"etc/config\""), "{stat}");
        let stats = debugfs(&img, "stats");
        assert!(!stats.contains("has_journal"), "{stats}");
        assert!(stats.contains("extent"), "{stats}");
        assert!(stats.contains("Block size:               4096"), "{stats}");
    }

    #[test]
    fn ext4_from_dir_auto_size_fits_big_content() {
        require_mkfs();
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(src.join("many")).unwrap();
        // 20 MiB of incompressible-ish data plus 3000 small files.
        let big: Vec<u8> = (0..20 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(src.join("big"), &big).unwrap();
        for i in 0..3000 {
            fs::write(
                src.join("many").join(format!("file-{i:05}")),
                format!("{i}"),
            )
            .unwrap();
        }
        let img = t.0.join("vol.ext4");
        let mb = create_ext4_from_dir(&img, &src, None).unwrap();
        // 20 MiB + 3000 one-block files = 32 MiB of blocks, plus inodes/slack.
        assert!((32..64).contains(&mb), "auto size {mb} MB");
        assert_eq!(debugfs(&img, "cat /many/file-02999"), "2999");
        let (_, size) = ls_entry(&img, "/", "big");
        assert_eq!(size, 20 * MIB);
    }

    #[test]
    fn ext4_from_dir_given_size() {
        require_mkfs();
        let t = TempDir::new();
        let src = content_dir(&t);
        let img = t.0.join("vol.ext4");
        assert_eq!(create_ext4_from_dir(&img, &src, Some(16)).unwrap(), 16);
        assert_eq!(fs::metadata(&img).unwrap().len(), 16 * MIB);
        assert_eq!(debugfs(&img, "cat /etc/config"), "port=80\n");
    }

    #[test]
    fn ext4_from_dir_too_small() {
        require_mkfs();
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        // 2 x 1520 blocks: passes the quick lower bound for 12 MB, but
        // not the real metadata overhead.
        let data: Vec<u8> = (0..1520 * EXT4_BLOCK_SIZE)
            .map(|i| (i % 253) as u8)
            .collect();
        fs::write(src.join("a"), &data).unwrap();
        fs::write(src.join("b"), &data).unwrap();
        let img = t.0.join("vol.ext4");
        // Far too small: refused before mkfs runs.
        let err = create_ext4_from_dir(&img, &src, Some(4)).unwrap_err();
        assert!(
            matches!(err, VolumeError::TooSmall { given_mb: 4, .. }),
            "{err}"
        );
        let needs = measure_tree(&src).unwrap();
        let floor = needs.blocks * EXT4_BLOCK_SIZE + inode_count(needs, 0) * EXT4_INODE_SIZE;
        assert!(floor <= 12 * MIB);
        // Just too small: mkfs runs out of space.
        let err = create_ext4_from_dir(&img, &src, Some(12)).unwrap_err();
        assert!(
            matches!(err, VolumeError::TooSmall { given_mb: 12, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("too small"));
        assert!(!img.exists());
        let err = create_ext4_from_dir(&img, &src.join("a"), None).unwrap_err();
        assert!(matches!(err, VolumeError::NotADirectory(_)), "{err}");
    }

    #[test]
    fn empty_ext4() {
        require_mkfs();
        let t = TempDir::new();
        let img = t.0.join("empty.ext4");
        create_empty_ext4(&img, 32).unwrap();
        let md = fs::metadata(&img).unwrap();
        assert_eq!(md.len(), 32 * MIB);
        assert!(md.blocks() * 512 < 32 * MIB, "image is not sparse");
        assert_eq!(image_size_mb(&img), 32);
        let stats = debugfs(&img, "stats");
        assert!(
            stats.contains("Filesystem magic number:  0xEF53"),
            "{stats}"
        );
        assert!(stats.contains("Block count:              8192"), "{stats}");
        assert!(!stats.contains("has_journal"), "{stats}");
        let root = debugfs(&img, "ls -l /");
        assert!(root.contains("lost+found"), "{root}");
        assert!(matches!(
            create_empty_ext4(&img, 0),
            Err(VolumeError::InvalidSize(0))
        ));
    }

    #[test]
    fn raw_padding_and_size() {
        let t = TempDir::new();
        let img = t.0.join("raw.img");
        assert_eq!(create_raw(&img, &b"hello"[..], None).unwrap(), 1);
        let bytes = fs::read(&img).unwrap();
        assert_eq!(bytes.len(), 512);
        assert_eq!(&bytes[..5], b"hello");
        assert!(bytes[5..].iter().all(|&b| b == 0));

        let exact = vec![3u8; 1024];
        create_raw(&img, &exact[..], None).unwrap();
        assert_eq!(fs::read(&img).unwrap(), exact);

        assert_eq!(create_raw(&img, &b"abc"[..], Some(2)).unwrap(), 2);
        let bytes = fs::read(&img).unwrap();
        assert_eq!(bytes.len() as u64, 2 * MIB);
        assert_eq!(&bytes[..3], b"abc");

        let big = vec![1u8; (MIB + 1) as usize];
        let err = create_raw(&img, &big[..], Some(1)).unwrap_err();
        assert!(matches!(err, VolumeError::RawTooLarge(1)), "{err}");
        assert!(!img.exists());
        let exact_mb = vec![1u8; MIB as usize];
        assert_eq!(create_raw(&img, &exact_mb[..], Some(1)).unwrap(), 1);

        let err = create_raw(&img, &b""[..], None).unwrap_err();
        assert!(matches!(err, VolumeError::EmptyRaw), "{err}");
        assert_eq!(create_raw(&img, &b""[..], Some(1)).unwrap(), 1);
        assert_eq!(image_size_mb(&t.0.join("missing")), 0);
    }

    #[test]
    fn measure_counts_hardlinks_once() {
        let t = TempDir::new();
        let src = t.0.join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("a"), vec![0u8; 10_000]).unwrap();
        fs::hard_link(src.join("a"), src.join("b")).unwrap();
        let n = measure_tree(&src).unwrap();
        assert_eq!(n.inodes, 1);
        assert_eq!(n.blocks, 3 + 1);
    }
}
