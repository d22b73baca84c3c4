//! The state file: a fixed header, then a JSON payload.
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `EMBERSNP` |
//! | 2 | format version, little endian ([`SNAPSHOT_VERSION`]) |
//! | 2 | reserved, zero |
//! | 4 | CRC32 (IEEE) of the payload, little endian |
//! | 8 | payload length, little endian, at most [`MAX_PAYLOAD`] |
//! | n | the payload: [`MicroVmState`] as JSON |
//!
//! Reading refuses, each with its own message and never a panic: a wrong
//! magic, another version, a length over the bound, a file shorter or
//! longer than the header says, a CRC mismatch and a payload that does not
//! decode. Decode errors name the line and column, never the file's bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use super::{MicroVmState, SnapshotError};

/// The first 8 bytes of every state file.
pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// The format version this ember-vmm writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;
/// The largest payload read (the state of a 32-vCPU VM with every device
/// is well under 1 MiB).
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Header length.
pub const HEADER_LEN: usize = 24;

/// The version as `--snapshot-version` and `--describe-snapshot` print it
/// (Firecracker's shape: `v1.0.0`).
pub fn version_string(v: u16) -> String {
    format!("v{v}.0.0")
}

/// The header and payload of `state`.
pub fn encode(state: &MicroVmState) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("snapshot state serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

struct Header {
    version: u16,
    crc: u32,
    len: u64,
}

fn parse_header(path: &str, b: &[u8]) -> Result<Header, SnapshotError> {
    if b.len() < HEADER_LEN {
        if b.len() >= 8 && &b[..8] != MAGIC {
            return Err(SnapshotError::BadMagic(path.into()));
        }
        return Err(SnapshotError::Truncated {
            path: path.into(),
            have: b.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    if &b[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.into()));
    }
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let version = u16_at(8);
    let crc = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
    Ok(Header { version, crc, len })
}

/// Decodes a whole state file held in memory; `path` is for messages.
pub fn decode(path: &str, b: &[u8]) -> Result<MicroVmState, SnapshotError> {
    let h = parse_header(path, b)?;
    if h.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { found: h.version });
    }
    if h.len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge {
            path: path.into(),
            len: h.len,
            max: MAX_PAYLOAD,
        });
    }
    let want = HEADER_LEN as u64 + h.len;
    let have = b.len() as u64;
    if have < want {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            have,
            want,
        });
    }
    if have > want {
        return Err(SnapshotError::Trailing {
            path: path.into(),
            extra: have - want,
        });
    }
    let payload = &b[HEADER_LEN..];
    let crc = crc32fast::hash(payload);
    if crc != h.crc {
        return Err(SnapshotError::Checksum {
            path: path.into(),
            found: crc,
            want: h.crc,
        });
    }
    let state: MicroVmState =
        serde_json::from_slice(payload).map_err(|e| SnapshotError::Decode {
            path: path.into(),
            msg: format!(
                "{} error at line {} column {}",
                match e.classify() {
                    serde_json::error::Category::Io => "I/O",
                    serde_json::error::Category::Syntax => "syntax",
                    serde_json::error::Category::Data => "data",
                    serde_json::error::Category::Eof => "end of data",
                },
                e.line(),
                e.column()
            ),
        })?;
    state.validate()?;
    Ok(state)
}

fn io(path: &str) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |err| SnapshotError::Io {
        path: path.into(),
        err,
    }
}

/// Reads at most a header plus [`MAX_PAYLOAD`] (and one byte more, to see
/// trailing bytes) of `path`.
fn read_bounded(path: &str) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(io(path))?;
    let mut buf = Vec::new();
    f.take(HEADER_LEN as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut buf)
        .map_err(io(path))?;
    Ok(buf)
}

/// Reads, checks and decodes the state file at `path`.
pub fn read_state(path: &str) -> Result<MicroVmState, SnapshotError> {
    let b = read_bounded(path)?;
    decode(path, &b)
}

/// The format version of the state file at `path` (only the header is
/// checked: the point is to tell which ember-vmm can load it).
pub fn describe(path: &str) -> Result<u16, SnapshotError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut b = Vec::with_capacity(HEADER_LEN);
    (&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut b)
        .map_err(io(path))?;
    Ok(parse_header(path, &b)?.version)
}

/// Creates (or truncates) `path` with mode 0600, whatever the umask.
pub(crate) fn create_private(path: &str) -> Result<File, SnapshotError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(path))?;
    Ok(f)
}

/// Writes `state` to `path` (mode 0600); returns the bytes written.
pub fn write_state(path: &str, state: &MicroVmState) -> Result<usize, SnapshotError> {
    let b = encode(state);
    let mut f = create_private(path)?;
    f.write_all(&b).map_err(io(path))?;
    Ok(b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;
    use crate::vstate::vm::VmState;

    fn sample() -> MicroVmState {
        let mut config = VmConfig::default();
        config.machine_config.vcpu_count = 0;
        config.machine_config.mem_size_mib = 16;
        let memory = crate::arch::boot::arch_memory_regions(16 << 20)
            .into_iter()
            .scan(0u64, |off, (a, l)| {
                let r = super::super::MemoryRegionState {
                    base_address: a.0,
                    size: l as u64,
                    offset: *off,
                };
                *off += l as u64;
                Some(r)
            })
            .collect();
        MicroVmState {
            config,
            boot_timer: false,
            memory,
            vm: VmState::default(),
            vcpus: Vec::new(),
            serial: Default::default(),
            i8042: Default::default(),
            devices: Vec::new(),
        }
    }

    /// A sample with vcpu_count 0 does not validate; decode checks the
    /// format first, so the tests look for the validation error last.
    fn decode_ok(b: &[u8]) -> Result<MicroVmState, SnapshotError> {
        match decode("s", b) {
            Err(SnapshotError::Invalid(m)) if m.contains("machine-config") => {
                let payload = &b[HEADER_LEN..];
                Ok(serde_json::from_slice(payload).unwrap())
            }
            other => other,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let b = encode(&s);
        assert_eq!(&b[..8], MAGIC);
        let back = decode_ok(&b).unwrap();
        assert_eq!(back.config, s.config);
        assert_eq!(back.memory, s.memory);
    }

    #[test]
    fn wrong_magic() {
        let mut b = encode(&sample());
        b[0] = b'X';
        let e = decode("s", &b).unwrap_err();
        assert!(matches!(e, SnapshotError::BadMagic(_)), "{e}");
        assert!(e.to_string().contains("not an ember snapshot"), "{e}");
    }

    #[test]
    fn other_version() {
        let mut b = encode(&sample());
        b[8..10].copy_from_slice(&7u16.to_le_bytes());
        let e = decode("s", &b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot format version 7, this ember-vmm reads version 1"
        );
    }

    #[test]
    fn every_cut_is_truncated() {
        let b = encode(&sample());
        for cut in 0..b.len() {
            let e = decode("s", &b[..cut]).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
            assert!(e.to_string().contains("truncated"), "{e}");
        }
    }

    #[test]
    fn flipped_byte_fails_the_checksum() {
        let b = encode(&sample());
        for i in (HEADER_LEN..b.len()).step_by(7) {
            let mut c = b.clone();
            c[i] ^= 0x20;
            let e = decode("s", &c).unwrap_err();
            assert!(matches!(e, SnapshotError::Checksum { .. }), "byte {i}: {e}");
            assert!(e.to_string().contains("corrupt"), "{e}");
        }
    }

    #[test]
    fn oversized_length_and_trailing_bytes() {
        let mut b = encode(&sample());
        b[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let e = decode("s", &b).unwrap_err();
        assert!(matches!(e, SnapshotError::TooLarge { .. }), "{e}");
        let mut b = encode(&sample());
        b.push(0);
        let e = decode("s", &b).unwrap_err();
        assert!(matches!(e, SnapshotError::Trailing { extra: 1, .. }), "{e}");
    }

    #[test]
    fn undecodable_payload_does_not_echo_it() {
        let payload = br#"{"config": "SECRET-CONTENT"}"#;
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(payload);
        let e = decode("s", &b).unwrap_err().to_string();
        assert!(e.contains("does not decode"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn files_are_private_and_describe_reads_the_version() {
        let dir = std::env::temp_dir().join(format!("ember-snapfmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        let p = p.to_str().unwrap();
        write_state(p, &sample()).unwrap();
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(describe(p).unwrap(), SNAPSHOT_VERSION);
        std::fs::write(p, b"garbage-garbage-garbage-garbage").unwrap();
        assert!(matches!(describe(p), Err(SnapshotError::BadMagic(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
