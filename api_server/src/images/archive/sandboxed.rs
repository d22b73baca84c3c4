//! Extraction in a sandbox job: [`extract_sandboxed`] runs
//! [`extract_tar_gz`] not in emberd's process but in emberd's own binary,
//! re-executed as `emberd __sandboxed-extract MAX_ENTRIES MAX_BYTES`
//! ([`CHILD_ARG`], internal, parsed by `main` before the flags) inside a
//! [`Job`]: its own uid, namespaces and limits (see [`crate::sandbox`]).
//!
//! * emberd's binary ([`crate::sandbox::SandboxConfig::self_exe`], the
//!   canonical path of the running binary at start-up; replacing that file
//!   while emberd runs gives the jobs the new binary) is bound read-only
//!   and executable at `/ember/emberd`; nothing else of emberd's is
//!   visible.
//! * The archive is the job's stdin: a file emberd opened, or a pipe that
//!   a thread of emberd feeds from memory. The job never needs a path to it.
//! * The destination is the job's output directory `/out`. The limits are
//!   applied inside by [`extract_tar_gz`] as ever; the job also gets
//!   `RLIMIT_FSIZE` = `max_bytes`, an output cap of about twice `max_bytes`
//!   plus 12 KiB per entry (a backstop: blocks of directories and small
//!   files), the configured memory and wall-clock limits, and at most 16
//!   processes.
//! * The child answers one JSON line on stdout, `{"ok": <summary>}` (exit
//!   0) or `{"err": <error>}` (exit 1), which becomes the same
//!   [`ExtractSummary`] or [`ArchiveError`] (paths below `/out` are given
//!   back as paths below the destination), so callers and their messages
//!   do not change. `skipped` lists at most 256 KiB of paths.
//! * Afterwards (nothing of the job runs any more) the tree is given back
//!   to emberd's uid with [`crate::sandbox::reclaim`], which also checks
//!   what [`extract_tar_gz`] promises, in case the child was subverted:
//!   only files, directories and symlinks, no setuid, setgid or sticky
//!   bits, symlink targets relative and inside.
//! * A job that fails as a whole (killed, out of time, no answer) is
//!   [`ArchiveError::Sandbox`]; one whose output is over the cap is
//!   [`ArchiveError::TooLarge`].
//!
//! Without a configured `self_exe` (library and integration tests that do
//! not run emberd) the extraction runs in-process.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{check_symlink_target, extract_tar_gz, ArchiveError, ExtractLimits, ExtractSummary};
use crate::sandbox::{self, Job, SandboxError, OUT};

/// The hidden first argument of emberd that makes it the extraction child.
pub const CHILD_ARG: &str = "__sandboxed-extract";
/// Where emberd's binary is inside the job.
const INSIDE_EXE: &str = "/ember/emberd";
/// Most bytes of the child's answer (and of its stderr) kept.
const MAX_ANSWER: usize = 4 << 20;
/// Most bytes of skipped paths the child reports.
const MAX_SKIPPED_BYTES: usize = 256 << 10;
/// Processes of one extraction job (it needs one).
const JOB_PIDS: u64 = 16;

/// Where the archive's bytes are.
pub enum ArchiveSource<'a> {
    /// In memory (an upload); fed to the job through a pipe.
    Bytes(&'a [u8]),
    /// An open file (read from its current offset); the job reads this
    /// descriptor.
    File(File),
}

/// Extracts `src` below `dest` with [`extract_tar_gz`]'s rules and
/// `limits`, in a sandbox job when emberd configured its binary (always,
/// in emberd: extraction never runs in emberd's process), else in-process.
/// See the module docs.
pub fn extract_sandboxed(
    src: ArchiveSource<'_>,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractSummary, ArchiveError> {
    let cfg = sandbox::config();
    let Some(exe) = cfg.self_exe.clone() else {
        return match src {
            ArchiveSource::Bytes(b) => extract_tar_gz(b, dest, limits),
            ArchiveSource::File(f) => extract_tar_gz(io::BufReader::new(f), dest, limits),
        };
    };
    fs::create_dir_all(dest).map_err(|source| ArchiveError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let sandbox_err = |e: SandboxError| ArchiveError::Sandbox(e.to_string());
    let (stdin, feed): (OwnedFd, _) = match src {
        ArchiveSource::File(f) => (f.into(), None),
        ArchiveSource::Bytes(b) => {
            let (r, w) = io::pipe()
                .map_err(|e| ArchiveError::Sandbox(format!("cannot make a pipe: {e}")))?;
            (r.into(), Some((w, b)))
        }
    };
    let job = Job::new(INSIDE_EXE)
        .map_err(sandbox_err)?
        .ro_exec(&exe, INSIDE_EXE)
        .arg(CHILD_ARG)
        .arg(limits.max_entries.to_string())
        .arg(limits.max_bytes.to_string())
        .output_dir(dest)
        .stdin_from(stdin);
    let mut l = job.current_limits();
    l.max_file_bytes = limits.max_bytes;
    l.max_output_bytes = output_cap(limits);
    l.max_log_bytes = MAX_ANSWER;
    l.pids = l.pids.min(JOB_PIDS);
    l.tmp_bytes = l.tmp_bytes.min(1 << 20);
    let job = job.limits(l);
    let ran = std::thread::scope(|s| {
        let feeder = feed.map(|(mut w, b)| {
            s.spawn(move || {
                // The job may stop reading early (an error, a limit):
                // then this ends with EPIPE once the job has run.
                let _ = w.write_all(b);
            })
        });
        // Blocks; when it returns, nothing of the job runs and emberd's
        // copies of the pipe's read end are closed.
        let ran = job.run();
        if let Some(f) = feeder {
            let _ = f.join();
        }
        ran
    });
    // Whatever happened, the tree goes back to us before anyone uses it.
    let reclaimed = sandbox::reclaim(dest, |rel, md| check_entry(dest, rel, md));
    let f = match ran {
        Ok(f) => f,
        Err(SandboxError::OutputTooLarge { .. }) => {
            return Err(ArchiveError::TooLarge(limits.max_bytes))
        }
        Err(e) => return Err(sandbox_err(e)),
    };
    let answer = f
        .answer("extraction", decode_answer)
        .map_err(ArchiveError::Sandbox)
        .map(|r| r.map_err(|e| in_dest(e, dest)));
    match (answer, reclaimed) {
        (Err(e), _) => Err(e),
        (Ok(Err(e)), Err(r)) => {
            log::warn!("extraction of a refused archive left: {r}");
            Err(e)
        }
        (Ok(r), Ok(())) => r,
        (Ok(Ok(_)), Err(r)) => Err(ArchiveError::Sandbox(format!(
            "the extraction job left what an extraction does not: {r}"
        ))),
    }
}

/// Cap on the bytes allocated in the output directory (a backstop; the
/// limits are enforced inside): twice `max_bytes` (filesystems may
/// preallocate) plus 12 KiB per entry (a block of a small file, a
/// directory's blocks, its entry in its parent) plus 64 MiB.
fn output_cap(limits: &ExtractLimits) -> u64 {
    limits
        .max_bytes
        .saturating_mul(2)
        .saturating_add(limits.max_entries.saturating_mul(12 << 10))
        .saturating_add(64 << 20)
}

/// What [`extract_tar_gz`] never leaves: special mode bits, symlinks with
/// absolute targets or targets leaving the destination.
fn check_entry(dest: &Path, rel: &Path, md: &fs::Metadata) -> Result<(), String> {
    if md.file_type().is_symlink() {
        let target = fs::read_link(dest.join(rel)).map_err(|e| e.to_string())?;
        return check_symlink_target(rel, &target)
            .map_err(|e| format!("a symlink extraction refuses: {e}"));
    }
    if md.mode() & 0o7000 != 0 {
        return Err(format!(
            "has mode {:o} (setuid, setgid or sticky)",
            md.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Gives a path the child named below `/out` as the same path below `dest`.
fn in_dest(e: ArchiveError, dest: &Path) -> ArchiveError {
    match e {
        ArchiveError::Write { path, source } => {
            let path = match path.strip_prefix(OUT) {
                Ok(rest) if rest.as_os_str().is_empty() => dest.to_path_buf(),
                Ok(rest) => dest.join(rest),
                Err(_) => path,
            };
            ArchiveError::Write { path, source }
        }
        other => other,
    }
}

/// The child: `emberd __sandboxed-extract MAX_ENTRIES MAX_BYTES` extracts
/// stdin into `/out` and answers on stdout (see the module docs). Returns
/// the exit code: 0 extracted, 1 refused, 2 misused.
pub fn child_main(args: &[OsString]) -> i32 {
    let num = |i: usize| {
        args.get(i)
            .and_then(|a| a.to_str())
            .and_then(|s| s.parse::<u64>().ok())
    };
    let (Some(max_entries), Some(max_bytes), 2) = (num(0), num(1), args.len()) else {
        eprintln!(
            "usage: emberd {CHILD_ARG} MAX_ENTRIES MAX_BYTES (internal: emberd runs it in a sandbox job)"
        );
        return 2;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("emberd {CHILD_ARG}: runs only as a sandbox job's uid, never as root");
        return 2;
    }
    let limits = ExtractLimits {
        max_entries,
        max_bytes,
    };
    let r = extract_tar_gz(io::stdin().lock(), Path::new(OUT), &limits);
    let line = encode_answer(&r);
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return 2;
    }
    i32::from(r.is_err())
}

// ---------------------------------------------------------------------------
// The answer's JSON

pub(crate) fn enc_path(p: &Path) -> Value {
    match p.to_str() {
        Some(s) => Value::String(s.to_string()),
        None => json!({ "bytes": p.as_os_str().as_bytes() }),
    }
}

pub(crate) fn dec_path(v: &Value) -> Result<PathBuf, String> {
    if let Some(s) = v.as_str() {
        return Ok(PathBuf::from(s));
    }
    let bytes = v["bytes"]
        .as_array()
        .ok_or("a path is neither a string nor bytes")?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or("a path's bytes are not bytes")?;
    Ok(PathBuf::from(OsString::from_vec(bytes)))
}

pub(crate) fn enc_io(e: &io::Error) -> Value {
    match e.raw_os_error() {
        Some(n) => json!({ "os": n }),
        None => json!({ "kind": format!("{:?}", e.kind()), "msg": e.to_string() }),
    }
}

pub(crate) fn dec_io(v: &Value) -> Result<io::Error, String> {
    if let Some(n) = v["os"].as_i64() {
        let n = i32::try_from(n).map_err(|_| "an errno out of range")?;
        return Ok(io::Error::from_raw_os_error(n));
    }
    use io::ErrorKind as K;
    let kind = match v["kind"].as_str().unwrap_or("") {
        "NotFound" => K::NotFound,
        "PermissionDenied" => K::PermissionDenied,
        "AlreadyExists" => K::AlreadyExists,
        "InvalidInput" => K::InvalidInput,
        "InvalidData" => K::InvalidData,
        "UnexpectedEof" => K::UnexpectedEof,
        "WriteZero" => K::WriteZero,
        "Interrupted" => K::Interrupted,
        "Unsupported" => K::Unsupported,
        "OutOfMemory" => K::OutOfMemory,
        _ => K::Other,
    };
    let msg = v["msg"].as_str().ok_or("an I/O error without a message")?;
    Ok(io::Error::new(kind, msg.to_string()))
}

fn enc_summary(s: &ExtractSummary) -> Value {
    let mut budget = MAX_SKIPPED_BYTES;
    let skipped: Vec<Value> = s
        .skipped
        .iter()
        .take_while(|p| {
            let n = p.as_os_str().len();
            let fits = n <= budget;
            budget = budget.saturating_sub(n);
            fits
        })
        .map(|p| enc_path(p))
        .collect();
    json!({
        "entries": s.entries, "files": s.files, "dirs": s.dirs,
        "symlinks": s.symlinks, "hardlinks": s.hardlinks, "bytes": s.bytes,
        "skipped": skipped,
    })
}

fn dec_summary(v: &Value) -> Result<ExtractSummary, String> {
    let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k}"));
    Ok(ExtractSummary {
        entries: n("entries")?,
        files: n("files")?,
        dirs: n("dirs")?,
        symlinks: n("symlinks")?,
        hardlinks: n("hardlinks")?,
        bytes: n("bytes")?,
        skipped: v["skipped"]
            .as_array()
            .ok_or("no skipped")?
            .iter()
            .map(dec_path)
            .collect::<Result<_, _>>()?,
    })
}

pub(crate) fn enc_error(e: &ArchiveError) -> Value {
    match e {
        ArchiveError::Read(io) => json!({ "kind": "Read", "io": enc_io(io) }),
        ArchiveError::Write { path, source } => {
            json!({ "kind": "Write", "path": enc_path(path), "io": enc_io(source) })
        }
        ArchiveError::AbsolutePath(p) => json!({ "kind": "AbsolutePath", "path": enc_path(p) }),
        ArchiveError::ParentDir(p) => json!({ "kind": "ParentDir", "path": enc_path(p) }),
        ArchiveError::BadLink {
            path,
            target,
            reason,
        } => json!({
            "kind": "BadLink", "path": enc_path(path), "target": enc_path(target),
            "reason": reason,
        }),
        ArchiveError::ThroughSymlink(p) => {
            json!({ "kind": "ThroughSymlink", "path": enc_path(p) })
        }
        ArchiveError::Conflict(p) => json!({ "kind": "Conflict", "path": enc_path(p) }),
        ArchiveError::TooManyEntries(n) => json!({ "kind": "TooManyEntries", "limit": n }),
        ArchiveError::TooLarge(n) => json!({ "kind": "TooLarge", "limit": n }),
        ArchiveError::Sandbox(m) => json!({ "kind": "Sandbox", "message": m }),
    }
}

pub(crate) fn dec_error(v: &Value) -> Result<ArchiveError, String> {
    let path = |k: &str| dec_path(&v[k]);
    let limit = || v["limit"].as_u64().ok_or("no limit");
    Ok(match v["kind"].as_str().unwrap_or("") {
        "Read" => ArchiveError::Read(dec_io(&v["io"])?),
        "Write" => ArchiveError::Write {
            path: path("path")?,
            source: dec_io(&v["io"])?,
        },
        "AbsolutePath" => ArchiveError::AbsolutePath(path("path")?),
        "ParentDir" => ArchiveError::ParentDir(path("path")?),
        "BadLink" => ArchiveError::BadLink {
            path: path("path")?,
            target: path("target")?,
            reason: v["reason"]
                .as_str()
                .ok_or("a link refused for no reason")?
                .to_string()
                .into(),
        },
        "ThroughSymlink" => ArchiveError::ThroughSymlink(path("path")?),
        "Conflict" => ArchiveError::Conflict(path("path")?),
        "TooManyEntries" => ArchiveError::TooManyEntries(limit()?),
        "TooLarge" => ArchiveError::TooLarge(limit()?),
        "Sandbox" => ArchiveError::Sandbox(
            v["message"]
                .as_str()
                .ok_or("a sandbox error without a message")?
                .to_string(),
        ),
        other => return Err(format!("unknown error kind {other:?}")),
    })
}

/// The child's answer line.
fn encode_answer(r: &Result<ExtractSummary, ArchiveError>) -> String {
    match r {
        Ok(s) => json!({ "ok": enc_summary(s) }),
        Err(e) => json!({ "err": enc_error(e) }),
    }
    .to_string()
}

/// Reads the child's answer (its whole stdout: one JSON line).
fn decode_answer(stdout: &[u8]) -> Result<Result<ExtractSummary, ArchiveError>, String> {
    let v: Value = serde_json::from_slice(stdout).map_err(|e| e.to_string())?;
    if v.get("ok").is_some() {
        Ok(Ok(dec_summary(&v["ok"])?))
    } else if v.get("err").is_some() {
        Ok(Err(dec_error(&v["err"])?))
    } else {
        Err("neither ok nor err".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: ArchiveError) -> ArchiveError {
        let line = encode_answer(&Err(e));
        assert!(!line.contains('\n'), "{line}");
        decode_answer(line.as_bytes()).unwrap().unwrap_err()
    }

    /// Every kind comes back as the same variant with the same message
    /// (callers match on the variant and show the message: UniK's
    /// "tarfile: ...", TooLarge as a 400).
    #[test]
    fn every_error_kind_round_trips() {
        let odd = PathBuf::from(OsString::from_vec(b"bad\xffname/x".to_vec()));
        type SameKind = fn(&ArchiveError) -> bool;
        let cases: Vec<(ArchiveError, SameKind)> = vec![
            (
                ArchiveError::Read(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "corrupt tar header (is it a tar archive?)",
                )),
                |e| matches!(e, ArchiveError::Read(io) if io.kind() == io::ErrorKind::InvalidData),
            ),
            (
                ArchiveError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                )),
                |e| matches!(e, ArchiveError::Read(io) if io.kind() == io::ErrorKind::UnexpectedEof),
            ),
            (
                ArchiveError::Read(io::Error::other("numeric field was not a number")),
                |e| matches!(e, ArchiveError::Read(_)),
            ),
            (
                ArchiveError::Write {
                    path: "/srv/x/y".into(),
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                },
                |e| matches!(e, ArchiveError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            ),
            (ArchiveError::AbsolutePath("/etc/passwd".into()), |e| {
                matches!(e, ArchiveError::AbsolutePath(_))
            }),
            (
                ArchiveError::ParentDir(odd.clone()),
                |e| matches!(e, ArchiveError::ParentDir(p) if p.as_os_str().as_bytes() == b"bad\xffname/x"),
            ),
            (
                ArchiveError::BadLink {
                    path: "a/link".into(),
                    target: "../../etc".into(),
                    reason: "symlink target leaves the destination".into(),
                },
                |e| matches!(e, ArchiveError::BadLink { .. }),
            ),
            (ArchiveError::ThroughSymlink("s/file".into()), |e| {
                matches!(e, ArchiveError::ThroughSymlink(_))
            }),
            (ArchiveError::Conflict("d".into()), |e| {
                matches!(e, ArchiveError::Conflict(_))
            }),
            (ArchiveError::TooManyEntries(10), |e| {
                matches!(e, ArchiveError::TooManyEntries(10))
            }),
            (
                ArchiveError::TooLarge(1 << 20),
                |e| matches!(e, ArchiveError::TooLarge(n) if *n == 1 << 20),
            ),
            (ArchiveError::Sandbox("killed by signal 9".into()), |e| {
                matches!(e, ArchiveError::Sandbox(_))
            }),
        ];
        for (e, same_kind) in cases {
            let shown = e.to_string();
            let back = round_trip(e);
            assert!(same_kind(&back), "{shown} came back as {back:?}");
            assert_eq!(back.to_string(), shown);
            // What UniK shows.
            assert_eq!(format!("tarfile: {back}"), format!("tarfile: {shown}"));
        }
    }

    #[test]
    fn summaries_round_trip_with_skipped_paths_capped() {
        let s = ExtractSummary {
            entries: 9,
            files: 3,
            dirs: 2,
            symlinks: 1,
            hardlinks: 1,
            bytes: 12345,
            skipped: vec![
                "dev/null".into(),
                PathBuf::from(OsString::from_vec(b"f\xfe".to_vec())),
            ],
        };
        let line = encode_answer(&Ok(s.clone()));
        assert_eq!(decode_answer(line.as_bytes()).unwrap().unwrap(), s);
        let many = ExtractSummary {
            skipped: (0..100_000)
                .map(|i| PathBuf::from(format!("dev/{i:0>40}")))
                .collect(),
            ..s
        };
        let line = encode_answer(&Ok(many));
        assert!(line.len() < MAX_ANSWER, "{}", line.len());
        let back = decode_answer(line.as_bytes()).unwrap().unwrap();
        assert!(!back.skipped.is_empty() && back.skipped.len() < 100_000);
    }

    #[test]
    fn nonsense_answers_are_refused() {
        for bad in [
            &b""[..],
            b"{}",
            b"not json",
            br#"{"err": {"kind": "Mystery"}}"#,
            br#"{"ok": {"entries": 1}}"#,
            br#"{"err": {"kind": "ParentDir", "path": {"bytes": [300]}}}"#,
        ] {
            assert!(
                decode_answer(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn write_errors_name_the_destination_not_out() {
        let e = ArchiveError::Write {
            path: "/out/a/b".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let e = in_dest(e, Path::new("/var/lib/ember/staging/x"));
        assert!(
            e.to_string()
                .starts_with("cannot write /var/lib/ember/staging/x/a/b: "),
            "{e}"
        );
    }

    #[test]
    fn the_child_refuses_bad_arguments() {
        assert_eq!(child_main(&[]), 2);
        assert_eq!(child_main(&["10".into()]), 2);
        assert_eq!(child_main(&["10".into(), "x".into()]), 2);
        assert_eq!(child_main(&["1".into(), "2".into(), "3".into()]), 2);
    }

    /// Without emberd's binary configured (these tests), it is
    /// extract_tar_gz in-process, from memory and from a file.
    #[test]
    fn without_self_exe_it_extracts_in_process() {
        assert!(sandbox::config().self_exe.is_none());
        let t = crate::test_util::TempDir::new();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        b.append_data(&mut h, "d/f", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let s = extract_sandboxed(
            ArchiveSource::Bytes(&data),
            &t.0.join("a"),
            &ExtractLimits::default(),
        )
        .unwrap();
        assert_eq!((s.files, s.bytes), (1, 2));
        fs::write(t.0.join("x.tar"), &data).unwrap();
        let f = File::open(t.0.join("x.tar")).unwrap();
        extract_sandboxed(
            ArchiveSource::File(f),
            &t.0.join("b"),
            &ExtractLimits::default(),
        )
        .unwrap();
        assert_eq!(fs::read(t.0.join("b/d/f")).unwrap(), b"hi");
        let err = extract_sandboxed(
            ArchiveSource::Bytes(&data),
            &t.0.join("c"),
            &ExtractLimits {
                max_entries: 10,
                max_bytes: 1,
            },
        )
        .unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge(1)), "{err}");
    }
}
