//! Layer application in a sandbox job: [`unpack`] and [`extract_file`]
//! run the [`Applier`] not in emberd's process but in emberd's own binary,
//! re-executed as `emberd __sandboxed-unpack REQUEST` ([`CHILD_ARG`],
//! internal, parsed by `main` before the flags) inside a [`Job`], like
//! archive extraction (`images/archive/sandboxed.rs`).
//!
//! * `REQUEST` is one JSON argument: the limits, whether the tree is for
//!   root (`owners`), the layers' digests and sizes, and for
//!   [`extract_file`] the path wanted.
//! * The layer blobs are the job's stdin, one after the other, each
//!   exactly its size: a thread of emberd copies them from the files
//!   [`super::open_with`] verified, without looking at them. The job needs
//!   no path to the image. It sniffs each blob's compression, applies it,
//!   and hashes it as it reads: a blob that no longer matches its digest
//!   and size is [`OciError::DigestMismatch`] / [`OciError::SizeMismatch`]
//!   as ever. emberd never decompresses or parses a layer.
//! * The tree is written to the job's `/out` (`dest` for [`unpack`]; for
//!   [`extract_file`], `rootfs/` below a scratch directory, and the file
//!   asked for, found inside the job (`resolve_in_root`), is copied to
//!   `/out/file` and taken with [`crate::sandbox::Finished::take_file`]).
//!   Limits: [`ExtractLimits`] inside as ever; `RLIMIT_FSIZE` =
//!   `max_bytes`; an output cap of about twice `max_bytes` (three times for
//!   [`extract_file`]) plus 12 KiB per entry; the configured memory and
//!   wall-clock limits; at most 16 processes.
//! * A job's uid cannot `chown`. For a tree that is root's (emberd runs as
//!   root) the child sets exact modes and answers, with its summary, the
//!   owner and mode of every entry that is not root's or has setuid,
//!   setgid or sticky bits (at most 32 MiB of paths); emberd applies them
//!   while it gives the tree back ([`crate::sandbox::reclaim_with`]),
//!   only to entries its walk finds. An entry with such bits the answer
//!   does not name is refused. Without root the child does what emberd
//!   would: directories get `| 0o700`, owners stay.
//! * The child answers one JSON line on stdout, `{"ok": ...}` (exit 0) or
//!   `{"err": <error>}` (exit 1), which becomes the same [`UnpackSummary`]
//!   or [`OciError`] (paths below `/out` are given back as host paths), so
//!   callers, their messages and their HTTP/gRPC mappings do not change.
//!   A job that fails as a whole is [`OciError::Sandbox`]; one whose
//!   output is over the cap is a layer's `TooLarge`.
//!
//! The index, manifests and configs (bounded JSON, serde only) are read by
//! [`super::open_with`] in emberd, which also hashes the blobs (sha256 of
//! their bytes, no parsing) and, for legacy `docker save` images, the
//! decompressed layers against the config's `diff_ids`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::unpack::{copy_out, Applier, Meta};
use super::{io_err, OciError, OciImage, UnpackSummary};
use crate::images::archive::{
    dec_error, dec_io, dec_path, enc_error, enc_io, enc_path, ArchiveError, ExtractLimits,
};
use crate::sandbox::{self, Finished, Job, Owner, SandboxError, OUT};

/// The hidden first argument of emberd that makes it the unpack child.
pub const CHILD_ARG: &str = "__sandboxed-unpack";
/// Where emberd's binary is inside the job.
const INSIDE_EXE: &str = "/ember/emberd";
/// Most bytes of paths in the owner and mode records.
const MAX_RECORD_BYTES: usize = 32 << 20;
/// Most bytes of the child's answer (and of its stderr) kept.
const MAX_ANSWER: usize = MAX_RECORD_BYTES + (8 << 20);
/// Most bytes of skipped paths the child reports.
const MAX_SKIPPED_BYTES: usize = 256 << 10;
/// Processes of one unpack job (it needs one).
const JOB_PIDS: u64 = 16;
/// The file [`extract_file`]'s child leaves in `/out`.
const RESULT_FILE: &str = "file";
/// The tree [`extract_file`]'s child unpacks, below `/out`.
const ROOTFS: &str = "rootfs";

/// One entry's owner and mode, as root must set them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    path: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// What the child did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// A tree ([`unpack`]).
    Tree(UnpackSummary, Vec<Record>),
    /// A file at `/out/file` with these permission bits ([`extract_file`]).
    File(u32),
}

/// [`OciImage::unpack`] in a job: see the module docs.
pub(super) fn unpack(
    img: &OciImage,
    dest: &Path,
    limits: &ExtractLimits,
    exe: &Path,
) -> Result<UnpackSummary, OciError> {
    let (_, answer) = run(img, dest, limits, None, exe)?;
    match answer {
        Answer::Tree(s, _) => Ok(s),
        Answer::File(_) => Err(OciError::Sandbox(
            "the unpack job answered a file, not a tree".into(),
        )),
    }
}

/// [`OciImage::extract_file`] in a job, in the fresh private directory
/// `scratch`: see the module docs.
pub(super) fn extract_file(
    img: &OciImage,
    scratch: &Path,
    path_in_image: &str,
    out: &Path,
    exe: &Path,
) -> Result<(), OciError> {
    let (f, answer) = run(img, scratch, &img.limits, Some(path_in_image), exe)?;
    let Answer::File(mode) = answer else {
        return Err(OciError::Sandbox(
            "the unpack job answered a tree, not a file".into(),
        ));
    };
    f.take_file(RESULT_FILE, out, img.limits.max_bytes, mode & 0o777)
        .map(|_| ())
        .map_err(|e| match e {
            SandboxError::Io {
                path,
                source,
                what: _,
            } if path == out => OciError::Io { path, source },
            e => OciError::Sandbox(format!("the file the unpack job found: {e}")),
        })
}

/// Runs the job with `out_dir` as `/out`; gives the tree back; returns the
/// job (for its result file) and its answer.
fn run(
    img: &OciImage,
    out_dir: &Path,
    limits: &ExtractLimits,
    file: Option<&str>,
    exe: &Path,
) -> Result<(Finished, Answer), OciError> {
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    // SAFETY: geteuid has no preconditions.
    let owners = file.is_none() && unsafe { libc::geteuid() } == 0;
    let request = json!({
        "max_entries": limits.max_entries,
        "max_bytes": limits.max_bytes,
        "owners": owners,
        "file": file,
        "layers": img.layers.iter()
            .map(|l| json!({"digest": l.digest, "size": l.size}))
            .collect::<Vec<_>>(),
    })
    .to_string();
    let sandbox_err = |e: SandboxError| OciError::Sandbox(e.to_string());
    let (r, w) = io::pipe().map_err(|e| OciError::Sandbox(format!("cannot make a pipe: {e}")))?;
    let job = Job::new(INSIDE_EXE)
        .map_err(sandbox_err)?
        .ro_exec(exe, INSIDE_EXE)
        .arg(CHILD_ARG)
        .arg(request)
        .output_dir(out_dir)
        .stdin_from(r);
    let mut l = job.current_limits();
    l.max_file_bytes = limits.max_bytes;
    l.max_output_bytes = output_cap(limits, file.is_some());
    l.max_log_bytes = MAX_ANSWER;
    l.pids = l.pids.min(JOB_PIDS);
    l.tmp_bytes = l.tmp_bytes.min(1 << 20);
    let job = job.limits(l);
    let (ran, fed) = std::thread::scope(|s| {
        let feeder = s.spawn(move || feed(img, w));
        // Blocks; when it returns, nothing of the job runs and emberd's
        // copies of the pipe's read end are closed, so the feeder ends.
        let ran = job.run();
        let fed = feeder
            .join()
            .unwrap_or_else(|_| Err(OciError::Sandbox("the feeder thread panicked".into())));
        (ran, fed)
    });
    let give_back = |records: &HashMap<PathBuf, Record>| {
        sandbox::reclaim_with(
            out_dir,
            |rel, md| check_entry(rel, md, records, file.is_some()),
            |rel, _| {
                records.get(rel).map(|r| Owner {
                    uid: r.uid,
                    gid: r.gid,
                    mode: Some(r.mode),
                })
            },
        )
    };
    let f = match ran {
        Ok(f) => f,
        Err(e) => {
            if let Err(r) = give_back(&HashMap::new()) {
                log::warn!("a failed unpack job left: {r}");
            }
            return Err(match e {
                SandboxError::OutputTooLarge { .. } => OciError::Layer {
                    digest: "(all layers)".into(),
                    source: ArchiveError::TooLarge(limits.max_bytes),
                },
                e => sandbox_err(e),
            });
        }
    };
    let answer = f
        .answer("unpack", decode_answer)
        .map_err(OciError::Sandbox)
        .map(|r| r.map_err(|e| on_host(e, out_dir)));
    let records: HashMap<PathBuf, Record> = match &answer {
        Ok(Ok(Answer::Tree(_, recs))) => recs.iter().map(|r| (r.path.clone(), r.clone())).collect(),
        _ => HashMap::new(),
    };
    let reclaimed = give_back(&records);
    // emberd could not read a blob: that, not what the job made of the
    // missing bytes.
    fed?;
    match (answer, reclaimed) {
        (Err(e), _) => Err(e),
        (Ok(Err(e)), r) => {
            if let Err(r) = r {
                log::warn!("unpacking a refused image left: {r}");
            }
            Err(e)
        }
        (Ok(Ok(a)), Ok(())) => Ok((f, a)),
        (Ok(Ok(_)), Err(r)) => Err(OciError::Sandbox(format!(
            "the unpack job left what unpacking does not: {r}"
        ))),
    }
}

/// Copies every layer blob, `size` bytes each, into the job's stdin. A
/// job that stops reading (it refused a layer) ends this quietly.
fn feed(img: &OciImage, mut w: io::PipeWriter) -> Result<(), OciError> {
    let mut buf = vec![0u8; 64 << 10];
    for l in &img.layers {
        let mut f = File::open(&l.path).map_err(io_err(&l.path))?.take(l.size);
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&l.path)(e)),
            };
            if w.write_all(buf.get(..n).unwrap_or(&[])).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Cap on the bytes allocated in the output directory (a backstop; the
/// limits are enforced inside): twice `max_bytes` (three times with the
/// copy of one file) plus 12 KiB per entry plus 64 MiB.
fn output_cap(limits: &ExtractLimits, file: bool) -> u64 {
    limits
        .max_bytes
        .saturating_mul(if file { 3 } else { 2 })
        .saturating_add(limits.max_entries.saturating_mul(12 << 10))
        .saturating_add(64 << 20)
}

/// What the job never leaves in a tree: setuid, setgid or sticky bits the
/// answer does not name. (The scratch tree of [`extract_file`] is thrown
/// away; its files lose such bits when given back.)
fn check_entry(
    rel: &Path,
    md: &fs::Metadata,
    records: &HashMap<PathBuf, Record>,
    scratch: bool,
) -> Result<(), String> {
    if scratch || md.file_type().is_symlink() || md.mode() & 0o7000 == 0 {
        return Ok(());
    }
    match records.get(rel) {
        Some(r) if r.mode & 0o7000 == md.mode() & 0o7000 => Ok(()),
        _ => Err(format!(
            "has mode {:o} (setuid, setgid or sticky) the unpack job did not report",
            md.mode() & 0o7777
        )),
    }
}

/// Gives a path the child named below `/out` as the same path below
/// `out_dir`.
fn host_path(p: PathBuf, out_dir: &Path) -> PathBuf {
    match p.strip_prefix(OUT) {
        Ok(rest) if rest.as_os_str().is_empty() => out_dir.to_path_buf(),
        Ok(rest) => out_dir.join(rest),
        Err(_) => p,
    }
}

fn host_archive_error(e: ArchiveError, out_dir: &Path) -> ArchiveError {
    match e {
        ArchiveError::Write { path, source } => ArchiveError::Write {
            path: host_path(path, out_dir),
            source,
        },
        other => other,
    }
}

/// The child's error with host paths.
fn on_host(e: OciError, out_dir: &Path) -> OciError {
    match e {
        OciError::Io { path, source } => OciError::Io {
            path: host_path(path, out_dir),
            source,
        },
        OciError::Layer { digest, source } => OciError::Layer {
            digest,
            source: host_archive_error(source, out_dir),
        },
        OciError::Archive(a) => OciError::Archive(host_archive_error(a, out_dir)),
        other => other,
    }
}

// ---------------------------------------------------------------------------
// The child

/// What the child is asked to do.
struct Request {
    limits: ExtractLimits,
    owners: bool,
    file: Option<String>,
    layers: Vec<(String, u64)>,
}

fn parse_request(arg: &str) -> Result<Request, String> {
    let v: Value = serde_json::from_str(arg).map_err(|e| e.to_string())?;
    let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k}"));
    let layers = v["layers"]
        .as_array()
        .ok_or("no layers")?
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().ok_or("a layer without a digest")?;
            let size = l["size"].as_u64().ok_or("a layer without a size")?;
            Ok((digest.to_string(), size))
        })
        .collect::<Result<_, String>>()?;
    Ok(Request {
        limits: ExtractLimits {
            max_entries: n("max_entries")?,
            max_bytes: n("max_bytes")?,
        },
        owners: v["owners"].as_bool().ok_or("no owners")?,
        file: match &v["file"] {
            Value::Null => None,
            f => Some(f.as_str().ok_or("a file that is not a string")?.to_string()),
        },
        layers,
    })
}

/// The child: `emberd __sandboxed-unpack REQUEST` applies the layers on
/// stdin to `/out` and answers on stdout (see the module docs). Returns
/// the exit code: 0 done, 1 refused, 2 misused.
pub fn child_main(args: &[OsString]) -> i32 {
    let req = match args {
        [a] => a
            .to_str()
            .ok_or_else(|| "not UTF-8".to_string())
            .and_then(parse_request),
        _ => Err("one argument expected".into()),
    };
    let req = match req {
        Ok(r) => r,
        Err(why) => {
            eprintln!(
                "usage: emberd {CHILD_ARG} REQUEST (internal: emberd runs it in a sandbox job): {why}"
            );
            return 2;
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!("emberd {CHILD_ARG}: runs only as a sandbox job's uid, never as root");
        return 2;
    }
    let r = child_run(&req, &mut io::stdin().lock(), Path::new(OUT));
    let line = encode_answer(&r);
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return 2;
    }
    i32::from(r.is_err())
}

fn child_run(req: &Request, stdin: &mut dyn Read, out: &Path) -> Result<Answer, OciError> {
    let dest = match req.file {
        Some(_) => out.join(ROOTFS),
        None => out.to_path_buf(),
    };
    fs::create_dir_all(&dest).map_err(io_err(&dest))?;
    let record = req.owners && req.file.is_none();
    let mut ap = Applier::new(&dest, &req.limits, false, record);
    for (digest, size) in &req.layers {
        ap.apply_layer(digest, *size, stdin)?;
    }
    let (summary, metas) = ap.finish()?;
    if let Some(path) = &req.file {
        let mode = copy_out(&dest, path, &out.join(RESULT_FILE))?;
        return Ok(Answer::File(mode));
    }
    let mut bytes = 0usize;
    let mut records = Vec::with_capacity(metas.len());
    for (path, m) in metas {
        bytes = bytes.saturating_add(path.as_os_str().len() + 1);
        if bytes > MAX_RECORD_BYTES {
            return Err(OciError::Invalid(format!(
                "more than {MAX_RECORD_BYTES} bytes of paths of files with owners or special modes"
            )));
        }
        records.push(record_of(path, m));
    }
    Ok(Answer::Tree(summary, records))
}

fn record_of(path: PathBuf, m: Meta) -> Record {
    Record {
        path,
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
        mode: m.mode & 0o7777,
    }
}

// ---------------------------------------------------------------------------
// The answer's JSON

fn enc_summary(s: &UnpackSummary) -> Value {
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
        "layers": s.layers, "entries": s.entries, "files": s.files, "dirs": s.dirs,
        "symlinks": s.symlinks, "hardlinks": s.hardlinks, "whiteouts": s.whiteouts,
        "bytes": s.bytes, "skipped": skipped,
    })
}

fn dec_summary(v: &Value) -> Result<UnpackSummary, String> {
    let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k}"));
    Ok(UnpackSummary {
        layers: n("layers")?,
        entries: n("entries")?,
        files: n("files")?,
        dirs: n("dirs")?,
        symlinks: n("symlinks")?,
        hardlinks: n("hardlinks")?,
        whiteouts: n("whiteouts")?,
        bytes: n("bytes")?,
        skipped: v["skipped"]
            .as_array()
            .ok_or("no skipped")?
            .iter()
            .map(dec_path)
            .collect::<Result<_, _>>()?,
    })
}

fn dec_record(v: &Value) -> Result<Record, String> {
    let [p, u, g, m] = v.as_array().map(Vec::as_slice).unwrap_or_default() else {
        return Err("a record is not [path, uid, gid, mode]".into());
    };
    let id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("an id or mode out of range")
    };
    let path = dec_path(p)?;
    if path.is_absolute() || path.components().any(|c| c.as_os_str() == "..") {
        return Err("a record's path is not inside the tree".into());
    }
    Ok(Record {
        path,
        uid: id(u)?,
        gid: id(g)?,
        mode: id(m)? & 0o7777,
    })
}

fn text(v: &Value, k: &str) -> Result<String, String> {
    v[k].as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no {k}"))
}

fn enc_oci_error(e: &OciError) -> Value {
    let msg = |kind: &str, m: &str| json!({ "kind": kind, "message": m });
    match e {
        OciError::Io { path, source } => {
            json!({ "kind": "Io", "path": enc_path(path), "io": enc_io(source) })
        }
        OciError::Archive(a) => json!({ "kind": "Archive", "archive": enc_error(a) }),
        OciError::Layer { digest, source } => {
            json!({ "kind": "Layer", "digest": digest, "archive": enc_error(source) })
        }
        OciError::NotAnImage(p) => json!({ "kind": "NotAnImage", "path": enc_path(p) }),
        OciError::Json { what, source } => {
            json!({ "kind": "Json", "what": what, "message": source.to_string() })
        }
        OciError::Invalid(m) => msg("Invalid", m),
        OciError::BadDigest(m) => msg("BadDigest", m),
        OciError::DigestMismatch {
            what,
            expected,
            actual,
        } => json!({
            "kind": "DigestMismatch", "what": what, "expected": expected, "actual": actual,
        }),
        OciError::SizeMismatch {
            what,
            expected,
            actual,
        } => json!({
            "kind": "SizeMismatch", "what": what, "expected": expected, "actual": actual,
        }),
        OciError::RefNotFound {
            reference,
            available,
        } => json!({ "kind": "RefNotFound", "reference": reference, "available": available }),
        OciError::NoPlatform(p) => json!({ "kind": "NoPlatform", "platforms": p }),
        OciError::UnsupportedMediaType(m) => msg("UnsupportedMediaType", m),
        OciError::Zstd(m) => msg("Zstd", m),
        OciError::NotFound(m) => msg("NotFound", m),
        OciError::NotAFile(m) => msg("NotAFile", m),
        OciError::InvalidRefName(m) => msg("InvalidRefName", m),
        // The child never builds volumes: this cannot cross; if it did, it
        // is the host's side.
        OciError::Volume(v) => msg("Sandbox", &v.to_string()),
        OciError::Sandbox(m) => msg("Sandbox", m),
    }
}

fn dec_oci_error(v: &Value) -> Result<OciError, String> {
    let m = || text(v, "message");
    let strings = |k: &str| -> Result<Vec<String>, String> {
        v[k].as_array()
            .ok_or_else(|| format!("no {k}"))?
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or(format!("{k}: not text"))
            })
            .collect()
    };
    Ok(match v["kind"].as_str().unwrap_or("") {
        "Io" => OciError::Io {
            path: dec_path(&v["path"])?,
            source: dec_io(&v["io"])?,
        },
        "Archive" => OciError::Archive(dec_error(&v["archive"])?),
        "Layer" => OciError::Layer {
            digest: text(v, "digest")?,
            source: dec_error(&v["archive"])?,
        },
        "NotAnImage" => OciError::NotAnImage(dec_path(&v["path"])?),
        "Json" => OciError::Json {
            what: text(v, "what")?,
            source: <serde_json::Error as serde::de::Error>::custom(m()?),
        },
        "Invalid" => OciError::Invalid(m()?),
        "BadDigest" => OciError::BadDigest(m()?),
        "DigestMismatch" => OciError::DigestMismatch {
            what: text(v, "what")?,
            expected: text(v, "expected")?,
            actual: text(v, "actual")?,
        },
        "SizeMismatch" => OciError::SizeMismatch {
            what: text(v, "what")?,
            expected: v["expected"].as_u64().ok_or("no expected")?,
            actual: v["actual"].as_u64().ok_or("no actual")?,
        },
        "RefNotFound" => OciError::RefNotFound {
            reference: text(v, "reference")?,
            available: strings("available")?,
        },
        "NoPlatform" => OciError::NoPlatform(strings("platforms")?),
        "UnsupportedMediaType" => OciError::UnsupportedMediaType(m()?),
        "Zstd" => OciError::Zstd(m()?),
        "NotFound" => OciError::NotFound(m()?),
        "NotAFile" => OciError::NotAFile(m()?),
        "InvalidRefName" => OciError::InvalidRefName(m()?),
        "Sandbox" => OciError::Sandbox(m()?),
        other => return Err(format!("unknown error kind {other:?}")),
    })
}

/// The child's answer line.
fn encode_answer(r: &Result<Answer, OciError>) -> String {
    match r {
        Ok(Answer::Tree(s, records)) => json!({ "ok": {
            "summary": enc_summary(s),
            "records": records.iter()
                .map(|r| json!([enc_path(&r.path), r.uid, r.gid, r.mode]))
                .collect::<Vec<_>>(),
        }}),
        Ok(Answer::File(mode)) => json!({ "ok": { "file_mode": mode } }),
        Err(e) => json!({ "err": enc_oci_error(e) }),
    }
    .to_string()
}

/// Reads the child's answer (its whole stdout: one JSON line).
fn decode_answer(stdout: &[u8]) -> Result<Result<Answer, OciError>, String> {
    let v: Value = serde_json::from_slice(stdout).map_err(|e| e.to_string())?;
    if let Some(ok) = v.get("ok") {
        if let Some(mode) = ok.get("file_mode") {
            let mode = mode
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .ok_or("a file mode out of range")?;
            return Ok(Ok(Answer::File(mode & 0o7777)));
        }
        let records = ok["records"]
            .as_array()
            .ok_or("no records")?
            .iter()
            .map(dec_record)
            .collect::<Result<_, _>>()?;
        Ok(Ok(Answer::Tree(dec_summary(&ok["summary"])?, records)))
    } else if let Some(e) = v.get("err") {
        Ok(Err(dec_oci_error(e)?))
    } else {
        Err("neither ok nor err".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::PermissionsExt;

    use sha2::{Digest, Sha256};

    use crate::test_util::TempDir;

    fn round_trip(e: OciError) -> OciError {
        let line = encode_answer(&Err(e));
        assert!(!line.contains('\n'), "{line}");
        decode_answer(line.as_bytes()).unwrap().unwrap_err()
    }

    /// Every kind the child can answer comes back as the same variant with
    /// the same message: callers match on the variant (the store's
    /// NotFound / Unsupported / Internal / Invalid, hence the HTTP and
    /// gRPC statuses) and show the message (Flintlock's "volume ... from
    /// ...: ...").
    #[test]
    fn every_error_kind_round_trips() {
        let odd = PathBuf::from(OsString::from_vec(b"/srv/bad\xffname".to_vec()));
        type SameKind = fn(&OciError) -> bool;
        let json_err = serde_json::from_str::<Value>("{").unwrap_err();
        let cases: Vec<(OciError, SameKind)> = vec![
            (
                OciError::Io {
                    path: odd.clone(),
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                },
                |e| matches!(e, OciError::Io { source, path } if source.raw_os_error() == Some(libc::ENOSPC) && path.as_os_str().as_bytes() == b"/srv/bad\xffname"),
            ),
            (
                OciError::Archive(ArchiveError::Sandbox("killed".into())),
                |e| matches!(e, OciError::Archive(ArchiveError::Sandbox(_))),
            ),
            (
                OciError::Layer {
                    digest: format!("sha256:{}", "a".repeat(64)),
                    source: ArchiveError::ThroughSymlink("etc/x".into()),
                },
                |e| {
                    matches!(
                        e,
                        OciError::Layer {
                            source: ArchiveError::ThroughSymlink(_),
                            ..
                        }
                    )
                },
            ),
            (
                OciError::Layer {
                    digest: "(all layers)".into(),
                    source: ArchiveError::TooLarge(1 << 20),
                },
                |e| matches!(e, OciError::Layer { source: ArchiveError::TooLarge(n), .. } if *n == 1 << 20),
            ),
            (
                OciError::Layer {
                    digest: "d".into(),
                    source: ArchiveError::Read(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "corrupt deflate stream",
                    )),
                },
                |e| {
                    matches!(
                        e,
                        OciError::Layer {
                            source: ArchiveError::Read(_),
                            ..
                        }
                    )
                },
            ),
            (OciError::NotAnImage("/x".into()), |e| {
                matches!(e, OciError::NotAnImage(_))
            }),
            (
                OciError::Json {
                    what: "index.json".into(),
                    source: json_err,
                },
                |e| matches!(e, OciError::Json { .. }),
            ),
            (
                OciError::Invalid("too many symlinks resolving \"k\"".into()),
                |e| matches!(e, OciError::Invalid(_)),
            ),
            (OciError::BadDigest("md5:x".into()), |e| {
                matches!(e, OciError::BadDigest(_))
            }),
            (
                OciError::DigestMismatch {
                    what: "layer sha256:1".into(),
                    expected: "sha256:1".into(),
                    actual: "sha256:2".into(),
                },
                |e| matches!(e, OciError::DigestMismatch { .. }),
            ),
            (
                OciError::SizeMismatch {
                    what: "layer sha256:1".into(),
                    expected: 10,
                    actual: 7,
                },
                |e| {
                    matches!(
                        e,
                        OciError::SizeMismatch {
                            expected: 10,
                            actual: 7,
                            ..
                        }
                    )
                },
            ),
            (
                OciError::RefNotFound {
                    reference: "x:1".into(),
                    available: vec!["a".into(), "b".into()],
                },
                |e| matches!(e, OciError::RefNotFound { available, .. } if available.len() == 2),
            ),
            (OciError::NoPlatform(vec!["linux/arm64".into()]), |e| {
                matches!(e, OciError::NoPlatform(_))
            }),
            (OciError::UnsupportedMediaType("a/b".into()), |e| {
                matches!(e, OciError::UnsupportedMediaType(_))
            }),
            (OciError::Zstd("layer sha256:1".into()), |e| {
                matches!(e, OciError::Zstd(_))
            }),
            (OciError::NotFound("boot/vmlinux".into()), |e| {
                matches!(e, OciError::NotFound(_))
            }),
            (OciError::NotAFile("boot".into()), |e| {
                matches!(e, OciError::NotAFile(_))
            }),
            (OciError::InvalidRefName("A B".into()), |e| {
                matches!(e, OciError::InvalidRefName(_))
            }),
            (OciError::Sandbox("the unpack job was killed".into()), |e| {
                matches!(e, OciError::Sandbox(_))
            }),
        ];
        for (e, same_kind) in cases {
            let shown = e.to_string();
            let back = round_trip(e);
            assert!(same_kind(&back), "{shown} came back as {back:?}");
            assert_eq!(back.to_string(), shown);
        }
    }

    #[test]
    fn answers_round_trip() {
        let tree = Answer::Tree(
            UnpackSummary {
                layers: 2,
                entries: 9,
                files: 3,
                dirs: 2,
                symlinks: 1,
                hardlinks: 1,
                whiteouts: 2,
                bytes: 12,
                skipped: vec!["dev/null".into()],
            },
            vec![
                Record {
                    path: "usr/bin/su".into(),
                    uid: 0,
                    gid: 0,
                    mode: 0o4755,
                },
                Record {
                    path: PathBuf::from(OsString::from_vec(b"home/\xfe".to_vec())),
                    uid: 1000,
                    gid: 1000,
                    mode: 0o700,
                },
                Record {
                    path: "".into(),
                    uid: 0,
                    gid: 0,
                    mode: 0o1777,
                },
            ],
        );
        let line = encode_answer(&Ok(tree.clone()));
        assert_eq!(decode_answer(line.as_bytes()).unwrap().unwrap(), tree);
        let line = encode_answer(&Ok(Answer::File(0o755)));
        assert_eq!(
            decode_answer(line.as_bytes()).unwrap().unwrap(),
            Answer::File(0o755)
        );
    }

    #[test]
    fn nonsense_answers_are_refused() {
        let summary = enc_summary(&UnpackSummary::default()).to_string();
        let with =
            |records: &str| format!(r#"{{"ok": {{"summary": {summary}, "records": {records}}}}}"#);
        for bad in [
            String::new(),
            "{}".into(),
            "not json".into(),
            r#"{"err": {"kind": "Mystery"}}"#.into(),
            r#"{"ok": {"summary": {"layers": 1}, "records": []}}"#.into(),
            r#"{"ok": {"file_mode": -1}}"#.into(),
            with(r#"[["/etc/passwd", 0, 0, 2541]]"#),
            with(r#"[["a/../../x", 0, 0, 2541]]"#),
            with(r#"[["a", 0, 0]]"#),
            with(r#"[["a", 4294967296, 0, 0]]"#),
        ] {
            assert!(decode_answer(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode_answer(with("[]").as_bytes()).is_ok());
    }

    #[test]
    fn errors_name_host_paths_not_out() {
        let host = Path::new("/var/lib/ember/jobs/x");
        let e = on_host(
            OciError::Layer {
                digest: "d".into(),
                source: ArchiveError::Write {
                    path: "/out/etc/x".into(),
                    source: io::Error::from_raw_os_error(libc::EACCES),
                },
            },
            host,
        );
        assert!(
            e.to_string()
                .starts_with("layer d: cannot write /var/lib/ember/jobs/x/etc/x: "),
            "{e}"
        );
        let e = on_host(
            OciError::Io {
                path: "/out".into(),
                source: io::Error::from_raw_os_error(libc::EACCES),
            },
            host,
        );
        assert!(e.to_string().starts_with("/var/lib/ember/jobs/x: "), "{e}");
    }

    #[test]
    fn the_child_refuses_bad_arguments() {
        assert_eq!(child_main(&[]), 2);
        assert_eq!(child_main(&["{}".into()]), 2);
        assert_eq!(child_main(&["x".into(), "y".into()]), 2);
        let ok =
            r#"{"max_entries": 1, "max_bytes": 1, "owners": false, "file": null, "layers": []}"#;
        assert!(parse_request(ok).is_ok());
        assert!(parse_request(&ok.replace("null", "7")).is_err());
    }

    /// A tar layer: (path, kind, mode, uid, data or link target).
    fn layer(entries: &[(&str, tar::EntryType, u32, u64, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, mode, uid, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            if *kind == tar::EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, name, data).unwrap();
            } else {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_bytes()).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", super::super::blobs::hex(&Sha256::digest(b)))
    }

    fn request(layers: &[&[u8]], owners: bool, file: Option<&str>) -> Request {
        Request {
            limits: ExtractLimits::default(),
            owners,
            file: file.map(String::from),
            layers: layers.iter().map(|l| (digest(l), l.len() as u64)).collect(),
        }
    }

    fn two_layers() -> (Vec<u8>, Vec<u8>) {
        use tar::EntryType::{Directory as D, Regular as F, Symlink as S};
        let lower = gzip(&layer(&[
            ("etc/", D, 0o755, 0, ""),
            ("etc/gone", F, 0o644, 0, "lower"),
            ("etc/kept", F, 0o644, 0, "kept"),
            ("opq/", D, 0o755, 0, ""),
            ("opq/lower", F, 0o644, 0, "x"),
            ("bin/su", F, 0o4755, 0, "su"),
            ("home/u/", D, 0o700, 1000, ""),
            ("home/u/f", F, 0o600, 1000, "mine"),
            ("tmp/", D, 0o1777, 0, ""),
        ]));
        let upper = layer(&[
            ("etc/.wh.gone", F, 0o644, 0, ""),
            ("opq/.wh..wh..opq", F, 0o644, 0, ""),
            ("opq/upper", F, 0o644, 0, "y"),
            ("boot/vmlinux", S, 0o777, 0, "/boot/real"),
            ("boot/real", F, 0o755, 0, "kernel"),
        ]);
        (lower, upper)
    }

    /// The child's work, on a stdin of two layers (one gzip, one plain):
    /// whiteouts and opaque directories apply, and what only root can set
    /// comes back as records (run here as any user).
    #[test]
    fn the_child_applies_layers_and_records_what_needs_root() {
        let (lower, upper) = two_layers();
        let t = TempDir::new();
        let out = t.0.join("out");
        let stdin: Vec<u8> = [lower.clone(), upper.clone()].concat();
        let req = request(&[&lower, &upper], true, None);
        let a = child_run(&req, &mut &stdin[..], &out).unwrap();
        let Answer::Tree(s, records) = a else {
            panic!("{a:?}")
        };
        assert_eq!((s.layers, s.whiteouts), (2, 2));
        assert!(!out.join("etc/gone").exists());
        assert_eq!(fs::read(out.join("etc/kept")).unwrap(), b"kept");
        assert!(!out.join("opq/lower").exists());
        assert_eq!(fs::read(out.join("opq/upper")).unwrap(), b"y");
        assert_eq!(
            fs::read_link(out.join("boot/vmlinux")).unwrap(),
            Path::new("/boot/real")
        );
        let mode = |p: &str| {
            fs::symlink_metadata(out.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("bin/su"), 0o4755);
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("home/u"), 0o700);
        let rec = |p: &str, uid: u32, mode: u32| Record {
            path: p.into(),
            uid,
            gid: uid,
            mode,
        };
        let mut records = records;
        records.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(
            records,
            vec![
                rec("bin/su", 0, 0o4755),
                rec("home/u", 1000, 0o700),
                rec("home/u/f", 1000, 0o600),
                rec("tmp", 0, 0o1777),
            ]
        );
        // Without owners (emberd not root): no records, directories
        // writable by their owner, as in-process.
        let out2 = t.0.join("out2");
        let req = request(&[&lower, &upper], false, None);
        let Answer::Tree(_, records) = child_run(&req, &mut &stdin[..], &out2).unwrap() else {
            panic!()
        };
        assert!(records.is_empty());
        let md = fs::metadata(out2.join("home/u")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o700);
    }

    /// The blobs are checked as they are read: other bytes than the
    /// digest's, or fewer, are refused with the errors opening gives.
    #[test]
    fn the_child_checks_digests_and_sizes_as_it_reads() {
        let (lower, upper) = two_layers();
        let t = TempDir::new();
        let mut evil = upper.clone();
        let pos = evil.windows(6).position(|w| w == b"kernel").unwrap();
        evil[pos] = b'K';
        let stdin: Vec<u8> = [lower.clone(), evil].concat();
        let req = request(&[&lower, &upper], true, None);
        let err = child_run(&req, &mut &stdin[..], &t.0.join("a")).unwrap_err();
        assert!(
            matches!(err, OciError::DigestMismatch { ref what, .. } if what == &format!("layer {}", digest(&upper))),
            "{err}"
        );
        // A blob cut short: its size.
        let stdin: Vec<u8> = [&lower[..], &upper[..100]].concat();
        let err = child_run(&req, &mut &stdin[..], &t.0.join("b")).unwrap_err();
        assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");
        // Garbage that is not its digest: the mismatch wins over the
        // corrupt stream.
        let junk = vec![0x1f, 0x8b, 0, 1, 2, 3, 4, 5];
        let stdin: Vec<u8> = [&lower[..], &junk[..]].concat();
        let mut req = request(&[&lower, &upper], true, None);
        req.layers[1].1 = junk.len() as u64;
        let err = child_run(&req, &mut &stdin[..], &t.0.join("c")).unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
        // A corrupt zstd blob (with its right digest): a layer error.
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0];
        let req = request(&[&zstd], true, None);
        let err = child_run(&req, &mut &zstd[..], &t.0.join("d")).unwrap_err();
        assert!(matches!(err, OciError::Layer { .. }), "{err}");
    }

    /// extract_file's child: finds the file inside (symlinks resolved in
    /// the image root) and leaves it at /out/file.
    #[test]
    fn the_child_finds_one_file() {
        let (lower, upper) = two_layers();
        let t = TempDir::new();
        let stdin: Vec<u8> = [lower.clone(), upper.clone()].concat();
        let req = request(&[&lower, &upper], false, Some("/boot/vmlinux"));
        let a = child_run(&req, &mut &stdin[..], &t.0).unwrap();
        assert_eq!(a, Answer::File(0o755));
        assert_eq!(fs::read(t.0.join(RESULT_FILE)).unwrap(), b"kernel");
        for (path, bad) in [("etc/gone", "no such file"), ("etc", "not a regular file")] {
            let t = TempDir::new();
            let req = request(&[&lower, &upper], false, Some(path));
            let err = child_run(&req, &mut &stdin[..], &t.0).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
