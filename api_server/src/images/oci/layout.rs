//! Reading images: OCI layouts (indexes, manifests, references and
//! platforms) and legacy `docker save` directories, every blob verified.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::blobs::{
    blob_path, check_digest, check_size, decompressed, hash_file, hash_reader, hex, is_hex64,
    parse, read_json_file, sniff_compression,
};
use super::{
    io_err, Compression, ImageConfig, Layer, OciError, OciImage, ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME, MEDIA_DOCKER_LAYER_GZIP, MEDIA_DOCKER_LAYER_TAR, MEDIA_DOCKER_LIST,
    MEDIA_OCI_INDEX,
};
use crate::images::archive::ExtractLimits;

/// Deepest nesting of indexes followed.
const MAX_INDEX_DEPTH: u32 = 4;

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

/// An index or a manifest.
#[derive(Debug, Deserialize)]
struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Reads and verifies a JSON blob.
fn read_json_blob(root: &Path, desc: &Descriptor, what: &str) -> Result<Value, OciError> {
    let path = blob_path(root, &desc.digest)?;
    let (bytes, v) = read_json_file(&path, what)?;
    let actual = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
    check_digest(what, &desc.digest, &actual)?;
    check_size(what, desc.size, bytes.len() as u64)?;
    Ok(v)
}

fn is_index_type(m: &str) -> bool {
    m == MEDIA_OCI_INDEX || m == MEDIA_DOCKER_LIST
}

/// Docker-style normalization of an image name: `busybox` ->
/// `docker.io/library/busybox:latest`. Digest references are returned as-is.
fn normalize_ref(r: &str) -> String {
    if r.contains('@') {
        return r.to_string();
    }
    let (name, tag) = match r.rfind(':') {
        Some(i) if !r[i + 1..].contains('/') => (&r[..i], &r[i..]),
        _ => (r, ":latest"),
    };
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        Some(_) => ("docker.io".to_string(), name.to_string()),
        None => ("docker.io".to_string(), format!("library/{name}")),
    };
    format!("{domain}/{path}{tag}")
}

/// The familiar form of a normalized name (`docker.io/library/x:t` -> `x:t`).
fn familiar(name: &str) -> String {
    name.strip_prefix("docker.io/library/")
        .or_else(|| name.strip_prefix("docker.io/"))
        .unwrap_or(name)
        .to_string()
}

fn desc_names(d: &Descriptor) -> Vec<String> {
    [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME]
        .iter()
        .filter_map(|k| d.annotations.get(*k).cloned())
        .collect()
}

fn select_descriptor<'a>(
    manifests: &'a [Descriptor],
    reference: Option<&str>,
    extra_names: &HashMap<String, Vec<String>>,
) -> Result<&'a Descriptor, OciError> {
    let available = || -> Vec<String> {
        manifests
            .iter()
            .map(|d| {
                desc_names(d)
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| d.digest.clone())
            })
            .collect()
    };
    let Some(reference) = reference else {
        return manifests
            .first()
            .ok_or_else(|| OciError::Invalid("index.json lists no manifests".into()));
    };
    let not_found = || OciError::RefNotFound {
        reference: reference.to_string(),
        available: available(),
    };
    if reference.starts_with("sha256:") {
        return manifests
            .iter()
            .find(|d| d.digest == reference)
            .ok_or_else(not_found);
    }
    let want = normalize_ref(reference);
    let names_of = |d: &Descriptor| -> Vec<String> {
        let mut n = desc_names(d);
        n.extend(extra_names.get(&d.digest).cloned().unwrap_or_default());
        n
    };
    if let Some(d) = manifests.iter().find(|d| {
        names_of(d)
            .iter()
            .any(|n| n == reference || normalize_ref(n) == want)
    }) {
        return Ok(d);
    }
    // An explicit `name:tag` against a bare `ref.name` of `tag` (layouts
    // that record only the tag), when unambiguous and no full name is known.
    let explicit_tag = match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') && !name.is_empty() => Some(tag),
        _ => None,
    };
    if let Some(tag) = explicit_tag {
        let hits: Vec<&Descriptor> = manifests
            .iter()
            .filter(|d| {
                !d.annotations.contains_key(ANNOTATION_CONTAINERD_NAME)
                    && d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(tag)
            })
            .collect();
        if let [d] = hits.as_slice() {
            return Ok(d);
        }
    }
    Err(not_found())
}

/// Follows nested indexes down to a linux/amd64 manifest.
fn resolve_manifest(
    root: &Path,
    desc: &Descriptor,
    depth: u32,
) -> Result<(Descriptor, Document), OciError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(OciError::Invalid("indexes nested too deeply".into()));
    }
    if desc.media_type.contains("zstd") {
        return Err(OciError::Zstd(desc.digest.clone()));
    }
    let v = read_json_blob(root, desc, &format!("manifest {}", desc.digest))?;
    let doc: Document = parse(v, &format!("manifest {}", desc.digest))?;
    let is_index = is_index_type(&desc.media_type)
        || is_index_type(&doc.media_type)
        || (doc.manifests.is_some() && doc.config.is_none());
    if !is_index {
        return Ok((desc.clone(), doc));
    }
    let list = doc.manifests.unwrap_or_default();
    let pick = list
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| match list.as_slice() {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        });
    match pick {
        Some(d) => resolve_manifest(root, d, depth + 1),
        None => Err(OciError::NoPlatform(
            list.iter()
                .map(|d| match &d.platform {
                    Some(p) => format!("{}/{}", p.os, p.architecture),
                    None => "unknown".to_string(),
                })
                .collect(),
        )),
    }
}

fn check_layer_media_type(m: &str, _digest: &str) -> Result<(), OciError> {
    let ok = m.is_empty()
        || m.starts_with("application/vnd.oci.image.layer.")
        || m.starts_with("application/vnd.docker.image.rootfs.");
    if ok
        && (m.is_empty()
            || m.ends_with(".tar")
            || m.ends_with("tar+gzip")
            || m.ends_with("tar.gzip")
            || m.ends_with("tar+zstd"))
    {
        Ok(())
    } else {
        Err(OciError::UnsupportedMediaType(m.to_string()))
    }
}

struct ConfigInfo {
    config: ImageConfig,
    architecture: String,
    os: String,
    created: Option<String>,
    diff_ids: Vec<String>,
}

fn config_info(v: &Value) -> ConfigInfo {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    ConfigInfo {
        config: v
            .get("config")
            .or_else(|| v.get("container_config"))
            .map(ImageConfig::from_json)
            .unwrap_or_default(),
        architecture: s("architecture"),
        os: s("os"),
        created: v.get("created").and_then(Value::as_str).map(str::to_string),
        diff_ids: v
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn read_docker_manifest(root: &Path) -> Result<Vec<DockerEntry>, OciError> {
    let (_, v) = read_json_file(&root.join("manifest.json"), "manifest.json")?;
    parse(v, "manifest.json")
}

/// A relative path from a docker manifest, refused if it could escape.
fn safe_rel(p: &str) -> Result<PathBuf, OciError> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(OciError::Invalid(format!(
                    "unsafe path {p:?} in manifest.json"
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(OciError::Invalid(format!(
            "empty path {p:?} in manifest.json"
        )));
    }
    Ok(out)
}

pub(super) fn open_oci(root: &Path, reference: Option<&str>) -> Result<OciImage, OciError> {
    let (_, index) = read_json_file(&root.join("index.json"), "index.json")?;
    let index: Document = parse(index, "index.json")?;
    let manifests = index.manifests.unwrap_or_default();
    // Newer `docker save` archives carry a manifest.json too: its RepoTags
    // name the image by config digest.
    let mut tags_by_config: HashMap<String, Vec<String>> = HashMap::new();
    if root.join("manifest.json").is_file() {
        if let Ok(entries) = read_docker_manifest(root) {
            for e in entries {
                if let Some(h) = e.config.strip_prefix("blobs/sha256/") {
                    tags_by_config
                        .entry(format!("sha256:{h}"))
                        .or_default()
                        .extend(e.repo_tags.unwrap_or_default());
                }
            }
        }
    }
    // RepoTags by manifest digest need the manifests' configs: read the
    // candidates' manifests only when a reference did not match otherwise.
    let top = match select_descriptor(&manifests, reference, &HashMap::new()) {
        Ok(d) => d,
        Err(e @ OciError::RefNotFound { .. }) if !tags_by_config.is_empty() => {
            let mut by_manifest = HashMap::new();
            for d in &manifests {
                if let Ok((_, doc)) = resolve_manifest(root, d, 0) {
                    if let Some(c) = doc.config {
                        if let Some(t) = tags_by_config.get(&c.digest) {
                            by_manifest.insert(d.digest.clone(), t.clone());
                        }
                    }
                }
            }
            select_descriptor(&manifests, reference, &by_manifest).map_err(|_| e)?
        }
        Err(e) => return Err(e),
    };
    let (mdesc, doc) = resolve_manifest(root, top, 0)?;
    let cdesc = doc
        .config
        .ok_or_else(|| OciError::Invalid(format!("manifest {} has no config", mdesc.digest)))?;
    let cv = read_json_blob(root, &cdesc, &format!("config {}", cdesc.digest))?;
    let info = config_info(&cv);
    let mut layers = Vec::new();
    for d in &doc.layers {
        check_layer_media_type(&d.media_type, &d.digest)?;
        let path = blob_path(root, &d.digest)?;
        let what = format!("layer {}", d.digest);
        let (actual, size) = hash_file(&path)?;
        check_digest(&what, &d.digest, &actual)?;
        check_size(&what, d.size, size)?;
        let compression = sniff_compression(&path, &what)?;
        layers.push(Layer {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size,
            compression,
            path,
        });
    }
    let mut repo_tags: Vec<String> = tags_by_config
        .get(&cdesc.digest)
        .cloned()
        .unwrap_or_default();
    // The full containerd name when there is one (`ref.name` is then often
    // just the tag), else `ref.name`.
    if let Some(n) = desc_names(top).into_iter().next() {
        let f = if n.contains('/') || n.contains(':') {
            familiar(&n)
        } else {
            n
        };
        if !repo_tags
            .iter()
            .any(|t| normalize_ref(t) == normalize_ref(&f))
        {
            repo_tags.push(f);
        }
    }
    Ok(OciImage {
        config: info.config,
        layers,
        digest: mdesc.digest,
        config_digest: cdesc.digest,
        repo_tags,
        architecture: info.architecture,
        os: info.os,
        created: info.created,
        limits: ExtractLimits::default(),
        scratch_parent: std::env::temp_dir(),
        _scratch: None,
    })
}

pub(super) fn open_docker(root: &Path, reference: Option<&str>) -> Result<OciImage, OciError> {
    let entries = read_docker_manifest(root)?;
    let config_digest_of = |e: &DockerEntry| -> Option<String> {
        let p = Path::new(&e.config);
        let stem = p.file_name()?.to_str()?;
        let stem = stem.strip_suffix(".json").unwrap_or(stem);
        is_hex64(stem).then(|| format!("sha256:{stem}"))
    };
    let entry = match reference {
        None => entries
            .first()
            .ok_or_else(|| OciError::Invalid("manifest.json lists no images".into()))?,
        Some(r) => {
            let want = normalize_ref(r);
            entries
                .iter()
                .find(|e| {
                    e.repo_tags
                        .iter()
                        .flatten()
                        .any(|t| t == r || normalize_ref(t) == want)
                        || config_digest_of(e).is_some_and(|d| {
                            d == r
                                || (r.len() >= 12 && d.trim_start_matches("sha256:").starts_with(r))
                        })
                })
                .ok_or_else(|| OciError::RefNotFound {
                    reference: r.to_string(),
                    available: entries
                        .iter()
                        .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                        .collect(),
                })?
        }
    };
    let cpath = root.join(safe_rel(&entry.config)?);
    let (cbytes, cv) = read_json_file(&cpath, "image config")?;
    let cdigest = format!("sha256:{}", hex(&Sha256::digest(&cbytes)));
    if let Some(expected) = config_digest_of(entry) {
        check_digest("image config", &expected, &cdigest)?;
    }
    let info = config_info(&cv);
    let verify_diff_ids = info.diff_ids.len() == entry.layers.len();
    let mut layers = Vec::new();
    for (i, l) in entry.layers.iter().enumerate() {
        let rel = safe_rel(l)?;
        let path = root.join(&rel);
        let what = format!("layer {l}");
        let compression = sniff_compression(&path, &what)?;
        let (digest, size) = hash_file(&path)?;
        if let Some(h) = l.strip_prefix("blobs/sha256/") {
            check_digest(&what, &format!("sha256:{h}"), &digest)?;
        }
        if verify_diff_ids {
            let uncompressed = match compression {
                Compression::None => digest.clone(),
                c => {
                    let f = File::open(&path).map_err(io_err(&path))?;
                    hash_reader(decompressed(c, BufReader::new(f)), &path)?.0
                }
            };
            let expected = info.diff_ids.get(i).cloned().unwrap_or_default();
            check_digest(&what, &expected, &uncompressed)?;
        }
        layers.push(Layer {
            media_type: match compression {
                Compression::None => MEDIA_DOCKER_LAYER_TAR,
                Compression::Gzip => MEDIA_DOCKER_LAYER_GZIP,
                Compression::Zstd => super::MEDIA_OCI_LAYER_ZSTD,
            }
            .to_string(),
            digest,
            size,
            compression,
            path,
        });
    }
    Ok(OciImage {
        config: info.config,
        layers,
        digest: cdigest.clone(),
        config_digest: cdigest,
        repo_tags: entry.repo_tags.clone().unwrap_or_default(),
        architecture: info.architecture,
        os: info.os,
        created: info.created,
        limits: ExtractLimits::default(),
        scratch_parent: std::env::temp_dir(),
        _scratch: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::oci::{MEDIA_OCI_LAYER_GZIP, MEDIA_OCI_LAYER_TAR};

    #[test]
    fn normalize_refs() {
        assert_eq!(normalize_ref("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            normalize_ref("busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalize_ref("me/app:v1"), "docker.io/me/app:v1");
        assert_eq!(normalize_ref("ghcr.io/x/y"), "ghcr.io/x/y:latest");
        assert_eq!(normalize_ref("localhost:5000/y:2"), "localhost:5000/y:2");
        assert_eq!(
            normalize_ref("docker.io/library/busybox:latest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            familiar("docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(familiar("ghcr.io/x/y:1"), "ghcr.io/x/y:1");
    }

    #[test]
    fn layer_media_types() {
        for ok in [
            MEDIA_OCI_LAYER_GZIP,
            MEDIA_OCI_LAYER_TAR,
            MEDIA_DOCKER_LAYER_GZIP,
            MEDIA_DOCKER_LAYER_TAR,
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "",
        ] {
            check_layer_media_type(ok, "d").unwrap();
        }
        check_layer_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "d").unwrap();
        assert!(matches!(
            check_layer_media_type("application/octet-stream", "d"),
            Err(OciError::UnsupportedMediaType(_))
        ));
    }
}
