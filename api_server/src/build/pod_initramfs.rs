//! The initramfs of a hyperd pod VM: `ember-agent` as `/init` (PID 1),
//! plus whatever it needs to start before anything is mounted.
//!
//! The image is a gzip-compressed `newc` cpio archive (written with
//! [`crate::build::linux`]'s writer) holding
//!
//! * the directories `/dev`, `/proc`, `/sys`, `/run`, `/etc`, `/mnt` (0755)
//!   and `/tmp` (1777), the mount points the agent uses;
//! * `/dev/console`, character device 5:1 (0600), stored as an archive entry
//!   so that the kernel can open the console for init before devtmpfs is
//!   mounted (nothing is created on the host);
//! * `/init`, the agent (0755);
//! * for a dynamically linked agent, its ELF interpreter (`PT_INTERP`) and
//!   every shared library `ldd` names, each as a regular file (0755) at
//!   exactly the path the agent and `ldd` use, with real directories above
//!   it. A path that is a symlink on the host (`/lib64/ld-linux-x86-64.so.2`,
//!   or `/lib` on merged-/usr systems) is stored as the file it resolves to,
//!   so no link in the image can point outside it. A static agent
//!   (`-C target-feature=+crt-static`) gets no libraries.
//!
//! * with [`build_with_modules`], the kernel modules of a
//!   [`kmod::Closure`] (decompressed) at `/lib/modules/<version>/...` (0644)
//!   and the list `/etc/ember-modules` (0644): one module path per line, in
//!   load order, which the agent loads before touching a device.
//!
//! Owners are 0:0, timestamps 0 and inodes numbered in archive order, so the
//! same agent (and libraries) give the same bytes.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::build::kmod;
use crate::build::linux::{inspect_elf, write_newc, CpioBody, CpioEntry, Elf};

/// Environment variable naming the agent binary; see [`find_agent`].
pub const AGENT_ENV: &str = "EMBER_AGENT_BIN";
/// Where an installed agent is looked for, after `$EMBER_AGENT_BIN` and the
/// directory of the running executable.
pub const AGENT_PATHS: [&str; 2] = [
    "/usr/local/lib/ember/ember-agent",
    "/usr/lib/ember/ember-agent",
];
/// The agent's file name next to `emberd`.
const AGENT_NAME: &str = "ember-agent";

/// What [`build`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInitramfs {
    /// Size of the compressed initramfs file in bytes.
    pub size: u64,
    /// Every path put in, in archive order (`/dev`, `/dev/console`, ...,
    /// `/init`, then library directories and libraries).
    pub files: Vec<String>,
}

/// Why a pod initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PodInitramfsError {
    /// The agent is not an x86_64 Linux executable.
    #[error("{path} cannot be the pod agent (/init): {reason}")]
    BadAgent { path: PathBuf, reason: String },
    /// A dynamically linked agent whose libraries `ldd` did not list.
    #[error(
        "{0} is dynamically linked but ldd lists none of its shared libraries \
         (is ldd installed?); build the agent with -C target-feature=+crt-static \
         or fix its libraries"
    )]
    NoLibraries(PathBuf),
    /// A library path that cannot be stored in the image.
    #[error("{path} cannot be put into the pod initramfs: {reason}")]
    BadLibrary { path: PathBuf, reason: String },
    /// A file larger than a newc entry can hold.
    #[error("{path} is too large for an initramfs ({size} bytes)")]
    TooLarge { path: PathBuf, size: u64 },
    /// The kernel's modules could not be read.
    #[error("cannot pack the kernel modules: {0}")]
    Modules(#[from] kmod::KmodError),
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PodInitramfsError + '_ {
    move |source| PodInitramfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_file(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
}

/// Finds the agent binary: `$EMBER_AGENT_BIN`, then `ember-agent` next to
/// the running executable (as in a cargo `target/` directory or an install
/// prefix), then `/usr/local/lib/ember/ember-agent`, then
/// `/usr/lib/ember/ember-agent`. Only existing regular files count.
pub fn find_agent() -> Option<PathBuf> {
    let env = std::env::var_os(AGENT_ENV).map(PathBuf::from);
    let exe = std::env::current_exe().ok();
    let fixed = AGENT_PATHS.map(Path::new);
    find_agent_in(env, exe.as_deref(), &fixed)
}

fn find_agent_in(env: Option<PathBuf>, exe: Option<&Path>, fixed: &[&Path]) -> Option<PathBuf> {
    let beside = exe.and_then(Path::parent).map(|d| d.join(AGENT_NAME));
    env.into_iter()
        .chain(beside)
        .chain(fixed.iter().map(|p| p.to_path_buf()))
        .find(|p| is_file(p))
}

/// The fixed part of the image, before `/init`.
fn skeleton<'a>() -> [CpioEntry<'a>; 8] {
    [
        CpioEntry::dir("dev", 0o755),
        CpioEntry::char_dev("dev/console", 0o600, 5, 1),
        CpioEntry::dir("proc", 0o755),
        CpioEntry::dir("sys", 0o755),
        CpioEntry::dir("run", 0o755),
        CpioEntry::dir("tmp", 0o1777),
        CpioEntry::dir("etc", 0o755),
        CpioEntry::dir("mnt", 0o755),
    ]
}

/// The archive name (no leading `/`) of the absolute host path `p`.
fn archive_name(p: &Path) -> Result<String, PodInitramfsError> {
    let bad = |reason: &str| PodInitramfsError::BadLibrary {
        path: p.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut parts = Vec::new();
    for (i, c) in p.components().enumerate() {
        match c {
            Component::RootDir if i == 0 => {}
            Component::Normal(s) => {
                parts.push(s.to_str().ok_or_else(|| bad("the path is not UTF-8"))?)
            }
            _ => return Err(bad("not a plain absolute path")),
        }
    }
    if !p.is_absolute() || parts.is_empty() {
        return Err(bad("not a plain absolute path"));
    }
    Ok(parts.join("/"))
}

/// The host files the agent needs besides itself: its interpreter and the
/// libraries `ldd` names; empty for a static agent.
fn agent_libraries(agent: &Path) -> Result<Vec<PathBuf>, PodInitramfsError> {
    let bad = |reason: String| PodInitramfsError::BadAgent {
        path: agent.to_path_buf(),
        reason,
    };
    let md = fs::metadata(agent).map_err(io_err(agent))?;
    if !md.is_file() {
        return Err(bad("not a regular file".to_string()));
    }
    let interp = match inspect_elf(agent).map_err(io_err(agent))? {
        Elf::Static => return Ok(Vec::new()),
        Elf::Unusable(reason) => return Err(bad(reason.to_string())),
        Elf::Dynamic { interp } => PathBuf::from(interp),
    };
    if !interp.is_absolute() {
        return Err(bad(format!(
            "its ELF interpreter {} is not an absolute path",
            interp.display()
        )));
    }
    let missing = crate::runtime::process::missing_libraries(agent);
    if !missing.is_empty() {
        return Err(bad(format!(
            "ldd cannot find its shared libraries {} (the VM would fail to run it)",
            missing.join(", ")
        )));
    }
    let libs = crate::runtime::process::shared_libraries(agent);
    if libs.is_empty() {
        return Err(PodInitramfsError::NoLibraries(agent.to_path_buf()));
    }
    let mut all: Vec<PathBuf> = libs.into_iter().chain([interp]).collect();
    all.sort();
    all.dedup();
    Ok(all)
}

/// One library to pack: its archive name and the opened host file.
struct Packed {
    name: String,
    file: File,
    size: u32,
}

fn open_sized(path: &Path) -> Result<(File, u32), PodInitramfsError> {
    let file = File::open(path).map_err(io_err(path))?;
    let md = file.metadata().map_err(io_err(path))?;
    if !md.is_file() {
        return Err(PodInitramfsError::BadLibrary {
            path: path.to_path_buf(),
            reason: "not a regular file".to_string(),
        });
    }
    let size = u32::try_from(md.len()).map_err(|_| PodInitramfsError::TooLarge {
        path: path.to_path_buf(),
        size: md.len(),
    })?;
    Ok((file, size))
}

/// Builds the pod initramfs `out` (replacing it atomically) with `agent` as
/// `/init`; see the module documentation for what goes in.
pub fn build(agent: &Path, out: &Path) -> Result<PodInitramfs, PodInitramfsError> {
    build_with_modules(agent, out, None)
}

/// [`build`], plus the kernel modules of `modules` and their list file
/// ([`kmod::LIST_FILE`]).
pub fn build_with_modules(
    agent: &Path,
    out: &Path,
    modules: Option<&kmod::Closure>,
) -> Result<PodInitramfs, PodInitramfsError> {
    let libs = agent_libraries(agent)?;
    let (mut init, init_size) = open_sized(agent)?;

    let fixed: Vec<&str> = skeleton().iter().map(|e| e.name).chain(["init"]).collect();
    let mut packed = Vec::with_capacity(libs.len());
    let mut dirs = BTreeSet::new();
    for lib in &libs {
        let name = archive_name(lib)?;
        let (file, size) = open_sized(lib)?;
        let mut parent = Path::new(&name).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            // archive_name gave UTF-8, so its ancestors are too.
            dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
        packed.push(Packed { name, file, size });
    }
    let mut mods = Vec::new();
    for m in modules.map(|c| c.modules.as_slice()).unwrap_or_default() {
        let data = kmod::read_module(m)?;
        let size = u32::try_from(data.len()).map_err(|_| PodInitramfsError::TooLarge {
            path: m.src.clone(),
            size: data.len() as u64,
        })?;
        let mut parent = Path::new(&m.dest).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
        mods.push((m.dest.clone(), io::Cursor::new(data), size));
    }
    let list = modules.map(|c| c.list().into_bytes());
    // Skeleton directories are already there; anything else must not clash.
    dirs.retain(|d| {
        !skeleton()
            .iter()
            .any(|e| e.name == d && matches!(e.body, CpioBody::Dir))
    });
    let mut taken = BTreeSet::new();
    let extra_names = packed
        .iter()
        .map(|p| &p.name)
        .chain(mods.iter().map(|m| &m.0));
    for name in extra_names {
        if fixed.contains(&name.as_str()) || dirs.contains(name) || !taken.insert(name) {
            return Err(PodInitramfsError::BadLibrary {
                path: PathBuf::from(format!("/{name}")),
                reason: "the path is already taken in the image".to_string(),
            });
        }
    }
    if let Some(d) = dirs.iter().find(|d| fixed.contains(&d.as_str())) {
        return Err(PodInitramfsError::BadLibrary {
            path: PathBuf::from(format!("/{d}")),
            reason: "needed as a directory, but the image has a file there".to_string(),
        });
    }

    let mut files: Vec<String> = fixed.iter().map(|n| format!("/{n}")).collect();
    files.extend(dirs.iter().map(|d| format!("/{d}")));
    files.extend(packed.iter().map(|p| format!("/{}", p.name)));
    files.extend(mods.iter().map(|m| format!("/{}", m.0)));
    let mut list_src = io::Cursor::new(list.clone().unwrap_or_default());
    if list.is_some() {
        files.push(format!("/{}", kmod::LIST_FILE));
    }

    let entries = skeleton()
        .into_iter()
        .chain([CpioEntry {
            name: "init",
            perm: 0o755,
            body: CpioBody::File {
                src: &mut init,
                size: init_size,
            },
        }])
        .chain(dirs.iter().map(|d| CpioEntry::dir(d, 0o755)))
        .chain(packed.iter_mut().map(|p| CpioEntry {
            name: &p.name,
            perm: 0o755,
            body: CpioBody::File {
                src: &mut p.file,
                size: p.size,
            },
        }))
        .chain(mods.iter_mut().map(|m| CpioEntry {
            name: &m.0,
            perm: 0o644,
            body: CpioBody::File {
                src: &mut m.1,
                size: m.2,
            },
        }))
        .chain(list.as_ref().map(|l| CpioEntry {
            name: kmod::LIST_FILE,
            perm: 0o644,
            body: CpioBody::File {
                src: &mut list_src,
                size: l.len() as u32,
            },
        }));
    let size = write_atomically(out, |w| write_newc(w, entries))?;
    Ok(PodInitramfs { size, files })
}

/// Writes `out` through gzip from `fill`, via a temporary file in the same
/// directory renamed over `out`; returns the compressed size.
fn write_atomically(
    out: &Path,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<u64, PodInitramfsError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let file_name = out.file_name().ok_or_else(|| PodInitramfsError::Io {
        path: out.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = out.with_file_name(tmp_name);
    let res = (|| -> io::Result<u64> {
        let file = File::create(&tmp)?;
        let mut gz = GzEncoder::new(BufWriter::new(file), Compression::default());
        fill(&mut gz)?;
        let mut inner = gz.finish()?;
        inner.flush()?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let size = file.metadata()?.len();
        fs::rename(&tmp, out)?;
        Ok(size)
    })();
    match res {
        Ok(size) => {
            // Make the rename durable; failing that is not worth an error.
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(size)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(io_err(out)(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    use crate::test_util::TempDir;

    /// One parsed entry.
    #[derive(Debug)]
    struct Ent {
        mode: u32,
        rdev: (u32, u32),
        uid: u32,
        gid: u32,
        mtime: u32,
        data: Vec<u8>,
    }

    /// Entries in archive order.
    fn read_initramfs(path: &Path) -> Vec<(String, Ent)> {
        let gz = flate2::read::GzDecoder::new(File::open(path).unwrap());
        let mut r: Box<dyn Read> = Box::new(gz);
        let mut out = Vec::new();
        loop {
            let mut rd = cpio::newc::Reader::new(r).unwrap();
            let e = rd.entry();
            if e.is_trailer() {
                break;
            }
            let name = e.name().to_string();
            let mut ent = Ent {
                mode: e.mode(),
                rdev: (e.rdev_major(), e.rdev_minor()),
                uid: e.uid(),
                gid: e.gid(),
                mtime: e.mtime(),
                data: Vec::new(),
            };
            rd.read_to_end(&mut ent.data).unwrap();
            out.push((name, ent));
            r = rd.finish().unwrap();
        }
        out
    }

    fn as_map(ents: Vec<(String, Ent)>) -> BTreeMap<String, Ent> {
        ents.into_iter().collect()
    }

    /// A minimal static x86_64 ELF: the header and one PT_LOAD.
    fn fake_static_elf() -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // 64-bit
        b[5] = 1; // little-endian
        b[6] = 1; // version
        b[16] = 2; // ET_EXEC
        b[18] = 62; // EM_X86_64
        b[20] = 1;
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[52] = 64; // e_ehsize
        b[54] = 56; // e_phentsize
        b[56] = 1; // e_phnum
        b[64] = 1; // PT_LOAD
        b
    }

    const SKELETON_DIRS: [&str; 7] = ["dev", "proc", "sys", "run", "tmp", "etc", "mnt"];

    fn check_skeleton(ents: &BTreeMap<String, Ent>) {
        let console = &ents["dev/console"];
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        assert!(console.data.is_empty());
        for d in SKELETON_DIRS {
            let want = if d == "tmp" { 0o041777 } else { 0o040755 };
            assert_eq!(ents[d].mode, want, "{d}");
        }
        assert_eq!(ents["init"].mode, 0o100755);
        for (name, e) in ents {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{name}");
        }
    }

    #[test]
    fn agent_lookup_order() {
        let t = TempDir::new();
        let env = t.0.join("env-agent");
        let exe_dir = t.0.join("bin");
        let exe = exe_dir.join("emberd");
        let local = t.0.join("local/ember-agent");
        let lib = t.0.join("lib/ember-agent");
        let fixed = [local.as_path(), lib.as_path()];
        let find = || find_agent_in(Some(env.clone()), Some(&exe), &fixed);
        assert_eq!(find(), None);
        for p in [&lib, &local, &exe_dir.join(AGENT_NAME), &env] {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
        }
        fs::write(&lib, "a").unwrap();
        assert_eq!(find(), Some(lib.clone()));
        fs::write(&local, "a").unwrap();
        assert_eq!(find(), Some(local.clone()));
        // A directory of that name does not count.
        fs::create_dir(exe_dir.join(AGENT_NAME)).unwrap();
        assert_eq!(find(), Some(local.clone()));
        fs::remove_dir(exe_dir.join(AGENT_NAME)).unwrap();
        fs::write(exe_dir.join(AGENT_NAME), "a").unwrap();
        assert_eq!(find(), Some(exe_dir.join(AGENT_NAME)));
        fs::write(&env, "a").unwrap();
        assert_eq!(find(), Some(env.clone()));
        // Without the variable or the executable's directory.
        assert_eq!(find_agent_in(None, None, &fixed), Some(local.clone()));
        assert_eq!(
            find_agent_in(None, Some(&exe), &[]),
            Some(exe_dir.join(AGENT_NAME))
        );
    }

    #[test]
    fn static_agent_gets_no_libraries() {
        let t = TempDir::new();
        let agent = t.0.join("agent");
        let elf = fake_static_elf();
        fs::write(&agent, &elf).unwrap();
        let out = t.0.join("initrd.gz");
        fs::write(&out, "old contents").unwrap();
        let info = build(&agent, &out).unwrap();
        assert_eq!(info.size, fs::metadata(&out).unwrap().len());
        assert_eq!(
            info.files,
            [
                "/dev",
                "/dev/console",
                "/proc",
                "/sys",
                "/run",
                "/tmp",
                "/etc",
                "/mnt",
                "/init"
            ]
        );
        let ents = read_initramfs(&out);
        let names: Vec<String> = ents.iter().map(|(n, _)| format!("/{n}")).collect();
        assert_eq!(names, info.files);
        let ents = as_map(ents);
        check_skeleton(&ents);
        assert_eq!(ents["init"].data, elf);
        // Same input, same bytes; no temporary files left behind.
        let again = t.0.join("again.gz");
        build(&agent, &again).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap());
        let mut left: Vec<String> = fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["again.gz", "agent", "initrd.gz"]);
    }

    #[test]
    fn non_elf_and_foreign_agents_refused() {
        let t = TempDir::new();
        let out = t.0.join("initrd.gz");
        fs::write(&out, "old").unwrap();
        let agent = t.0.join("agent");
        fs::write(&agent, "#!/bin/sh\nexec true\n").unwrap();
        let err = build(&agent, &out).unwrap_err();
        assert!(matches!(err, PodInitramfsError::BadAgent { .. }), "{err}");
        assert!(err.to_string().contains("not an ELF"), "{err}");
        let mut elf = fake_static_elf();
        elf[18] = 183; // aarch64
        fs::write(&agent, &elf).unwrap();
        let err = build(&agent, &out).unwrap_err();
        assert!(err.to_string().contains("not an x86_64 ELF"), "{err}");
        let err = build(&t.0, &out).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = build(&t.0.join("missing"), &out).unwrap_err();
        assert!(matches!(err, PodInitramfsError::Io { .. }), "{err}");
        // The old image is untouched.
        assert_eq!(fs::read(&out).unwrap(), b"old");
    }

    #[test]
    fn dynamic_agent_gets_its_interpreter_and_libraries() {
        let agent = Path::new("/bin/true");
        let Elf::Dynamic { interp } = inspect_elf(agent).unwrap() else {
            panic!("/bin/true is expected to be dynamically linked");
        };
        let t = TempDir::new();
        let out = t.0.join("initrd.gz");
        let info = build(agent, &out).unwrap();
        let ents = read_initramfs(&out);
        let names: Vec<String> = ents.iter().map(|(n, _)| format!("/{n}")).collect();
        assert_eq!(names, info.files);
        // Every entry's parent directory comes before it, as a directory.
        for (i, (name, _)) in ents.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(
                    ents[..i]
                        .iter()
                        .any(|(n, e)| n == parent && e.mode & 0o170000 == 0o040000),
                    "{name} before its directory"
                );
            }
        }
        let ents = as_map(ents);
        check_skeleton(&ents);
        assert_eq!(ents["init"].data, fs::read(agent).unwrap());
        // The interpreter (a symlink on most hosts) and each library are the
        // real files at the paths the binary asks for.
        let mut wanted = crate::runtime::process::shared_libraries(agent);
        wanted.push(PathBuf::from(&interp));
        assert!(wanted
            .iter()
            .any(|l| l.to_string_lossy().contains("libc.so")));
        for lib in &wanted {
            let name = lib.to_str().unwrap().trim_start_matches('/');
            let e = ents.get(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(e.mode, 0o100755, "{name}");
            assert_eq!(e.data, fs::read(lib).unwrap(), "{name}");
        }
        // Nothing else: no symlinks, no other files.
        assert!(ents.values().all(|e| e.mode & 0o170000 != 0o120000));
        let files: BTreeSet<String> = ents
            .iter()
            .filter(|(n, e)| e.mode & 0o170000 == 0o100000 && *n != "init")
            .map(|(n, _)| format!("/{n}"))
            .collect();
        let wanted: BTreeSet<String> = wanted
            .iter()
            .map(|l| l.to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, wanted);
    }

    #[test]
    fn library_paths_are_checked() {
        assert_eq!(
            archive_name(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap(),
            "lib/x86_64-linux-gnu/libc.so.6"
        );
        for bad in ["lib/libc.so.6", "/lib/../etc/passwd", "/", "/lib/./x"] {
            let err = archive_name(Path::new(bad));
            // `Path` drops `.` components itself, which is harmless.
            if bad == "/lib/./x" {
                assert_eq!(err.unwrap(), "lib/x");
            } else {
                assert!(err.is_err(), "{bad}");
            }
        }
    }
}
