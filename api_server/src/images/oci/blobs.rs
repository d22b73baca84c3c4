//! Digests and blobs: sha256 hex digests, blob paths below `blobs/`,
//! hashing and verifying files, reading JSON documents, and sniffing a
//! layer's compression.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
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

pub(super) fn sniff_compression(path: &Path, _what: &str) -> Result<Compression, OciError> {
    let magic = magic_of(path)?;
    if magic == ZSTD_MAGIC {
        Ok(Compression::Zstd)
    } else if magic.starts_with(&GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else {
        Ok(Compression::None)
    }
}

/// Decodes a zstd stream of one or more frames (skippable frames, as
/// zstd:chunked layers carry, are skipped), with ruzstd: a pure-Rust
/// decoder for hostile bytes. The window is zstd's default limit.
pub(super) struct ZstdReader<R: BufRead> {
    state: ZstdState<R>,
}

enum ZstdState<R: BufRead> {
    /// Between frames.
    Idle(R),
    Frame(Box<StreamingDecoder<R, FrameDecoder>>),
    Done,
}

impl<R: BufRead> ZstdReader<R> {
    pub(super) fn new(r: R) -> Self {
        ZstdReader {
            state: ZstdState::Idle(r),
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match std::mem::replace(&mut self.state, ZstdState::Done) {
                ZstdState::Done => return Ok(0),
                ZstdState::Frame(mut d) => {
                    let n = d.read(buf)?;
                    if n > 0 || buf.is_empty() {
                        self.state = ZstdState::Frame(d);
                        return Ok(n);
                    }
                    self.state = ZstdState::Idle(d.into_inner());
                }
                ZstdState::Idle(mut r) => {
                    if r.fill_buf()?.is_empty() {
                        return Ok(0);
                    }
                    let mut header = [0u8; 8];
                    let peek = r.fill_buf()?;
                    let skippable = peek.len() >= 4
                        && (0x184D2A50..=0x184D2A5F)
                            .contains(&u32::from_le_bytes([peek[0], peek[1], peek[2], peek[3]]));
                    if skippable {
                        r.read_exact(&mut header)?;
                        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                        let skipped =
                            io::copy(&mut (&mut r).take(u64::from(len)), &mut io::sink())?;
                        if skipped != u64::from(len) {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "zstd: truncated skippable frame",
                            ));
                        }
                        self.state = ZstdState::Idle(r);
                        continue;
                    }
                    let d = StreamingDecoder::new(r).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
                    })?;
                    self.state = ZstdState::Frame(Box::new(d));
                }
            }
        }
    }
}

/// `r` decompressed as `c` says.
pub(super) fn decompressed<'a>(c: Compression, r: impl BufRead + 'a) -> Box<dyn Read + 'a> {
    match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(ZstdReader::new(r)),
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

    #[test]
    fn zstd_frames_and_skippable_frames_decode() {
        // `printf 'hello ' | zstd -c` and `printf 'world' | zstd -c`.
        let f1 = [
            0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x31, 0x00, 0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f,
            0x20, 0xd2, 0x3b, 0xe1, 0xa9,
        ];
        let f2 = [
            0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58, 0x29, 0x00, 0x00, 0x77, 0x6f, 0x72, 0x6c, 0x64,
            0xef, 0x51, 0xee, 0x66,
        ];
        let skip = [0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        let all: Vec<u8> = [&f1[..], &skip[..], &f2[..]].concat();
        let mut out = String::new();
        decompressed(Compression::Zstd, &all[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
        let mut out = Vec::new();
        let bad = [0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff];
        assert!(decompressed(Compression::Zstd, &bad[..])
            .read_to_end(&mut out)
            .is_err());
    }
}
