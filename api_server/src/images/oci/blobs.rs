//! Digests and blobs: sha256 hex digests, blob paths below `blobs/`,
//! hashing and verifying files, reading JSON documents, and sniffing a
//! layer's compression.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{io_err, Compression, OciError, ZSTD_MAGIC};

/// Largest JSON document (index, manifest, config) read, in bytes.
const MAX_JSON: u64 = 16 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Validates `sha256:<64 lowercase hex>` and returns the hex part.
pub(super) fn digest_hex(digest: &str) -> Result<&str, OciError> {
    let bad = || OciError::BadDigest(digest.to_string());
    let h = digest.strip_prefix("sha256:").ok_or_else(bad)?;
    if h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(h)
    } else {
        Err(bad())
    }
}

pub(super) fn is_hex64(s: &str) -> bool {
    digest_hex(&format!("sha256:{s}")).is_ok()
}

pub(super) fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, OciError> {
    Ok(root.join("blobs").join("sha256").join(digest_hex(digest)?))
}

/// sha256 and length of everything `r` yields.
pub(super) fn hash_reader(mut r: impl Read, path: &Path) -> Result<(String, u64), OciError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n_total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        h.update(buf.get(..n).unwrap_or(&[]));
        n_total += n as u64;
    }
    Ok((format!("sha256:{}", hex(&h.finalize())), n_total))
}

pub(super) fn hash_file(path: &Path) -> Result<(String, u64), OciError> {
    hash_reader(File::open(path).map_err(io_err(path))?, path)
}

pub(super) fn check_digest(what: &str, expected: &str, actual: &str) -> Result<(), OciError> {
    if expected != actual {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

pub(super) fn check_size(what: &str, expected: Option<u64>, actual: u64) -> Result<(), OciError> {
    match expected {
        Some(e) if e != actual => Err(OciError::SizeMismatch {
            what: what.to_string(),
            expected: e,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Reads a (bounded) JSON file.
pub(super) fn read_json_file(path: &Path, what: &str) -> Result<(Vec<u8>, Value), OciError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(OciError::Invalid(format!(
            "{what} is larger than {MAX_JSON} bytes"
        )));
    }
    let v = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })?;
    Ok((bytes, v))
}

pub(super) fn parse<T: for<'de> Deserialize<'de>>(v: Value, what: &str) -> Result<T, OciError> {
    serde_json::from_value(v).map_err(|source| OciError::Json {
        what: what.to_string(),
        source,
    })
}

/// First bytes of a file.
fn magic_of(path: &Path) -> Result<Vec<u8>, OciError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut magic = Vec::with_capacity(4);
    f.take(4).read_to_end(&mut magic).map_err(io_err(path))?;
    Ok(magic)
}

pub(super) fn sniff_compression(path: &Path, what: &str) -> Result<Compression, OciError> {
    let magic = magic_of(path)?;
    if magic == ZSTD_MAGIC {
        Err(OciError::Zstd(what.to_string()))
    } else if magic.starts_with(&GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else {
        Ok(Compression::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_validated() {
        let h = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{h}")).unwrap(), h);
        for bad in [
            "sha512:abcd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "a".repeat(63)),
            h.clone(),
        ] {
            assert!(
                matches!(digest_hex(&bad), Err(OciError::BadDigest(_))),
                "{bad}"
            );
        }
    }
}
