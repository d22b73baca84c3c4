//! Writing OCI layouts: a directory tree as a single-layer image, a base
//! image plus extra layers, and the diff of two trees as a layer with
//! whiteouts.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::blobs::{
    blob_path, decompressed, hash_file, hash_reader, hex, read_json_file, sniff_compression,
};
use super::{
    io_err, Compression, ImageConfig, OciError, OciImage, ANNOTATION_REF_NAME, MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX, MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_TAR, MEDIA_OCI_LAYER_ZSTD,
    MEDIA_OCI_MANIFEST,
};

/// A writer that hashes and counts what goes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        )
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or(&[]));
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Walks `root` (not following symlinks), sorted, and returns
/// root-relative paths with their metadata (root itself excluded).
fn walk_tree(root: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, OciError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let mut names: Vec<OsString> = Vec::new();
        for e in fs::read_dir(&full).map_err(io_err(&full))? {
            names.push(e.map_err(io_err(&full))?.file_name());
        }
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            let crel = rel.join(&n);
            let cfull = root.join(&crel);
            let md = fs::symlink_metadata(&cfull).map_err(io_err(&cfull))?;
            if md.is_dir() {
                subdirs.push(crel.clone());
            }
            out.push((crel, md));
        }
        // Depth-first in sorted order.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    // Stable, parents-before-children order.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn tar_header(md: &fs::Metadata, kind: EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(u64::from(md.uid()));
    h.set_gid(u64::from(md.gid()));
    h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
    h.set_size(0);
    h
}

/// Appends one tree entry to a tar; `hardlinks` maps (dev, ino) to the
/// first path of multiply-linked files.
fn append_entry<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    md: &fs::Metadata,
    hardlinks: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), OciError> {
    let full = root.join(rel);
    let ioe = |e| OciError::Io {
        path: full.clone(),
        source: e,
    };
    let ft = md.file_type();
    if ft.is_dir() {
        let mut h = tar_header(md, EntryType::Directory);
        b.append_data(&mut h, rel, io::empty()).map_err(ioe)?;
    } else if ft.is_symlink() {
        let mut h = tar_header(md, EntryType::Symlink);
        let target = fs::read_link(&full).map_err(io_err(&full))?;
        b.append_link(&mut h, rel, &target).map_err(ioe)?;
    } else if ft.is_file() {
        if md.nlink() > 1 {
            if let Some(first) = hardlinks.get(&(md.dev(), md.ino())) {
                let mut h = tar_header(md, EntryType::Link);
                b.append_link(&mut h, rel, first).map_err(ioe)?;
                return Ok(());
            }
            hardlinks.insert((md.dev(), md.ino()), rel.to_path_buf());
        }
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&full)
            .map_err(io_err(&full))?;
        let mut h = tar_header(md, EntryType::Regular);
        h.set_size(md.len());
        b.append_data(&mut h, rel, f.take(md.len())).map_err(ioe)?;
    }
    // Devices, FIFOs, sockets: not stored.
    Ok(())
}

/// Writes the tar.gz built by `fill` to `out`; returns (digest of the
/// gzip, diff_id of the tar, gzip size).
fn write_tar_gz(
    out: &Path,
    fill: impl FnOnce(
        &mut tar::Builder<&mut HashWriter<flate2::write::GzEncoder<HashWriter<File>>>>,
    ) -> Result<(), OciError>,
) -> Result<(String, String, u64), OciError> {
    let file = File::create(out).map_err(io_err(out))?;
    let gz = flate2::write::GzEncoder::new(HashWriter::new(file), flate2::Compression::default());
    let mut tar_hash = HashWriter::new(gz);
    {
        let mut b = tar::Builder::new(&mut tar_hash);
        b.follow_symlinks(false);
        fill(&mut b)?;
        b.finish().map_err(io_err(out))?;
    }
    let (gz, diff_id, _) = tar_hash.finish();
    let file_hash = gz.finish().map_err(io_err(out))?;
    let (mut file, digest, size) = file_hash.finish();
    file.flush().map_err(io_err(out))?;
    file.sync_all().map_err(io_err(out))?;
    Ok((digest, diff_id, size))
}

fn blobs_dir(dir: &Path) -> Result<PathBuf, OciError> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    Ok(blobs)
}

fn tmp_name(dir: &Path, what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        ".tmp-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

/// Stores bytes as a blob; returns (digest, size).
fn write_blob(dir: &Path, bytes: &[u8]) -> Result<(String, u64), OciError> {
    let digest = format!("sha256:{}", hex(&Sha256::digest(bytes)));
    let path = blob_path(dir, &digest)?;
    if !path.is_file() {
        let tmp = tmp_name(&blobs_dir(dir)?, "blob");
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok((digest, bytes.len() as u64))
}

/// A layer blob ready to be referenced by a manifest.
struct NewLayer {
    media_type: String,
    digest: String,
    diff_id: String,
    size: u64,
}

/// Stores the tar.gz at `src` (moved, or copied when on another
/// filesystem) as a layer blob of `dir`.
fn store_layer_file(dir: &Path, src: &Path) -> Result<NewLayer, OciError> {
    let blobs = blobs_dir(dir)?;
    let (digest, size) = hash_file(src)?;
    let f = File::open(src).map_err(io_err(src))?;
    let compression = sniff_compression(src, "layer")?;
    let (diff_id, _) = match compression {
        Compression::None => (digest.clone(), size),
        c => hash_reader(decompressed(c, BufReader::new(f)), src)?,
    };
    let media_type = match compression {
        Compression::None => MEDIA_OCI_LAYER_TAR,
        Compression::Gzip => MEDIA_OCI_LAYER_GZIP,
        Compression::Zstd => MEDIA_OCI_LAYER_ZSTD,
    };
    let path = blob_path(dir, &digest)?;
    if !path.is_file() {
        let tmp = tmp_name(&blobs, "layer");
        fs::copy(src, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    Ok(NewLayer {
        media_type: media_type.to_string(),
        digest,
        diff_id,
        size,
    })
}

fn check_ref_name(r: &str) -> Result<(), OciError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:@/+".contains(&b))
        && r.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(OciError::InvalidRefName(r.to_string()))
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Writes config, manifest and index entry for `layers` (already stored).
fn write_image(
    dir: &Path,
    layers: &[NewLayer],
    config: &ImageConfig,
    ref_name: &str,
    history: Vec<Value>,
) -> Result<String, OciError> {
    let config_json = json!({
        "created": now_rfc3339(),
        "architecture": "amd64",
        "os": "linux",
        "config": config.to_json(),
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": history,
    });
    let cbytes = serde_json::to_vec(&config_json).map_err(|source| OciError::Json {
        what: "config".into(),
        source,
    })?;
    let (cdigest, csize) = write_blob(dir, &cbytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let mbytes = serde_json::to_vec(&manifest).map_err(|source| OciError::Json {
        what: "manifest".into(),
        source,
    })?;
    let (mdigest, msize) = write_blob(dir, &mbytes)?;

    let index_path = dir.join("index.json");
    let mut index = if index_path.is_file() {
        read_json_file(&index_path, "index.json")?.1
    } else {
        json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []})
    };
    let obj = index
        .as_object_mut()
        .ok_or_else(|| OciError::Invalid("index.json is not an object".into()))?;
    let mut manifests: Vec<Value> = obj
        .get("manifests")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    manifests.retain(|m| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            != Some(ref_name)
    });
    manifests.push(json!({
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": mdigest,
        "size": msize,
        "annotations": {ANNOTATION_REF_NAME: ref_name},
        "platform": {"architecture": "amd64", "os": "linux"},
    }));
    obj.insert("manifests".into(), Value::Array(manifests));
    obj.entry("schemaVersion").or_insert(json!(2));
    let ibytes = serde_json::to_vec_pretty(&index).map_err(|source| OciError::Json {
        what: "index.json".into(),
        source,
    })?;
    let tmp = tmp_name(dir, "index");
    fs::write(&tmp, ibytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &index_path).map_err(io_err(&index_path))?;
    Ok(mdigest)
}

fn init_layout(dir: &Path) -> Result<(), OciError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    blobs_dir(dir)?;
    let marker = dir.join("oci-layout");
    if !marker.is_file() {
        fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&marker))?;
    }
    Ok(())
}

/// Stores `rootfs` as a single-layer image (gzip layer with modes, owners,
/// symlinks and hard links; devices/FIFOs/sockets left out) named
/// `ref_name` in the OCI layout `dir` (created if needed). Other images of
/// the layout stay; an image with the same `ref.name` is replaced in the
/// index (its blobs stay). Returns the manifest digest.
pub fn write_layout(
    dir: &Path,
    rootfs: &Path,
    config: &ImageConfig,
    ref_name: &str,
) -> Result<String, OciError> {
    check_ref_name(ref_name)?;
    init_layout(dir)?;
    let blobs = blobs_dir(dir)?;
    let tmp = tmp_name(&blobs, "layer");
    let res = (|| {
        let tree = walk_tree(rootfs)?;
        let mut hardlinks = HashMap::new();
        let (digest, diff_id, size) = write_tar_gz(&tmp, |b| {
            for (rel, md) in &tree {
                append_entry(b, rootfs, rel, md, &mut hardlinks)?;
            }
            Ok(())
        })?;
        let path = blob_path(dir, &digest)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let layer = NewLayer {
            media_type: MEDIA_OCI_LAYER_GZIP.into(),
            digest,
            diff_id,
            size,
        };
        let history = vec![json!({"created": now_rfc3339(), "created_by": "ember write_layout"})];
        write_image(dir, &[layer], config, ref_name, history)
    })();
    let _ = fs::remove_file(&tmp);
    res
}

/// Stores `base`'s layers plus the tar(.gz) files `extra_layers` (e.g. from
/// [`diff_layer`]) as image `ref_name` in the layout `dir`, with `config`.
/// Returns the manifest digest. This is what `/container/commit` needs.
pub fn write_layout_from(
    dir: &Path,
    base: &OciImage,
    extra_layers: &[&Path],
    config: &ImageConfig,
    ref_name: &str,
) -> Result<String, OciError> {
    check_ref_name(ref_name)?;
    init_layout(dir)?;
    let mut layers = Vec::new();
    for l in base.layers.iter() {
        layers.push(store_layer_file(dir, &l.path)?);
    }
    for p in extra_layers {
        layers.push(store_layer_file(dir, p)?);
    }
    let history = layers
        .iter()
        .map(|_| json!({"created_by": "ember write_layout_from"}))
        .collect();
    write_image(dir, &layers, config, ref_name, history)
}

/// Writes to `out_tar_gz` the layer that turns the tree `lower` into the
/// tree `upper`: new and changed entries (type, mode, owner, size, content,
/// symlink target), and `.wh.<name>` whiteouts for deleted ones (one per
/// deleted subtree). A directory replaced by another kind needs no
/// whiteout: the new entry replaces it. Devices/FIFOs/sockets are left out.
pub fn diff_layer(lower: &Path, upper: &Path, out_tar_gz: &Path) -> Result<(), OciError> {
    let lower_tree: HashMap<PathBuf, fs::Metadata> = walk_tree(lower)?.into_iter().collect();
    let upper_tree = walk_tree(upper)?;
    let upper_set: HashSet<&PathBuf> = upper_tree.iter().map(|(p, _)| p).collect();
    // Deleted paths whose parent is still a directory in upper.
    let mut deleted: Vec<&PathBuf> = lower_tree
        .keys()
        .filter(|p| !upper_set.contains(p))
        .filter(|p| {
            p.parent().is_none_or(|par| {
                par.as_os_str().is_empty()
                    || upper_tree
                        .binary_search_by(|(q, _)| q.as_path().cmp(par))
                        .ok()
                        .and_then(|i| upper_tree.get(i))
                        .is_some_and(|(_, md)| md.is_dir())
                        && lower_tree.get(par).is_some_and(|m| m.is_dir())
            })
        })
        .collect();
    deleted.sort();
    let mut hardlinks = HashMap::new();
    let mut write = || -> Result<(), OciError> {
        write_tar_gz(out_tar_gz, |b| {
            for p in &deleted {
                let name = p.file_name().unwrap_or_default();
                let mut wh = OsString::from(".wh.");
                wh.push(name);
                let whp = p.parent().unwrap_or(Path::new("")).join(wh);
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, &whp, io::empty())
                    .map_err(io_err(out_tar_gz))?;
            }
            for (rel, md) in &upper_tree {
                let changed = match lower_tree.get(rel) {
                    None => true,
                    Some(lmd) => entry_changed(&lower.join(rel), lmd, &upper.join(rel), md)?,
                };
                if changed {
                    append_entry(b, upper, rel, md, &mut hardlinks)?;
                }
            }
            Ok(())
        })
        .map(|_| ())
    };
    let res = write();
    if res.is_err() {
        let _ = fs::remove_file(out_tar_gz);
    }
    res
}

fn entry_changed(
    lp: &Path,
    l: &fs::Metadata,
    up: &Path,
    u: &fs::Metadata,
) -> Result<bool, OciError> {
    if l.file_type() != u.file_type()
        || l.mode() != u.mode()
        || l.uid() != u.uid()
        || l.gid() != u.gid()
    {
        return Ok(true);
    }
    if u.is_dir() {
        return Ok(false);
    }
    if u.file_type().is_symlink() {
        return Ok(fs::read_link(lp).map_err(io_err(lp))? != fs::read_link(up).map_err(io_err(up))?);
    }
    if l.len() != u.len() {
        return Ok(true);
    }
    if !u.is_file() {
        return Ok(false);
    }
    let mut a = BufReader::new(File::open(lp).map_err(io_err(lp))?);
    let mut b = BufReader::new(File::open(up).map_err(io_err(up))?);
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = a.read(&mut ba).map_err(io_err(lp))?;
        if n == 0 {
            return Ok(false);
        }
        let (Some(ca), Some(cb)) = (ba.get(..n), bb.get_mut(..n)) else {
            return Ok(true);
        };
        if b.read_exact(cb).is_err() || ca != cb {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_validated() {
        for ok in ["latest", "busybox:1.36", "ghcr.io/x/y:v1+b"] {
            check_ref_name(ok).unwrap();
        }
        for bad in ["", ":x", "a b", "a\nb", &"x".repeat(256)] {
            assert!(check_ref_name(bad).is_err(), "{bad:?}");
        }
    }
}
