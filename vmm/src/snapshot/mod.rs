//! Snapshots of a paused microVM, in Firecracker's API shape:
//! `PUT /snapshot/create` writes a state file and a memory file,
//! `PUT /snapshot/load` rebuilds the microVM from them in a fresh VMM.
//!
//! - [`format`]: the state file (magic, version, CRC32, bounded payload).
//! - [`memory`]: guest memory, saved whole (`Full`, sparse: zero pages are
//!   holes) and mapped back `MAP_PRIVATE` from the file so pages load lazily.
//! - [`MicroVmState`]: what the state file holds. Each part is saved by the
//!   component that owns it ([`crate::vstate::vm::VmState`],
//!   [`crate::vstate::vcpu::VcpuState`], the devices) and validated before
//!   use: a state file is hostile input.

pub mod dirty;
pub(crate) mod extents;
pub mod format;
pub mod memory;
#[cfg(test)]
pub mod rebase;
pub mod uffd;

use devices::legacy::i8042::I8042State;
use devices::legacy::serial::SerialState;
use devices::virtio::persist::VirtioDeviceState;
use serde::{Deserialize, Serialize};

use crate::arch::boot::arch_memory_regions;
use crate::config::VmConfig;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Errors creating or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file cannot be opened, read or written.
    #[error("snapshot file {path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// Not an ember state file.
    #[error("{0} is not an ember snapshot state file (bad magic)")]
    BadMagic(String),
    /// A state file of another format version.
    #[error(
        "snapshot format version {found}, this ember-vmm reads version {}",
        format::SNAPSHOT_VERSION
    )]
    Version {
        /// The file's version.
        found: u16,
    },
    /// The file ends early.
    #[error("snapshot state file {path} is truncated: {have} bytes, the header announces {want}")]
    Truncated {
        /// The file.
        path: String,
        /// Its size.
        have: u64,
        /// The size its header announces.
        want: u64,
    },
    /// The payload length is over the bound.
    #[error("snapshot state file {path}: payload of {len} bytes is over the {max} byte limit")]
    TooLarge {
        /// The file.
        path: String,
        /// The announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Bytes after the payload.
    #[error("snapshot state file {path} is corrupt: {extra} bytes after the payload")]
    Trailing {
        /// The file.
        path: String,
        /// How many.
        extra: u64,
    },
    /// The checksum does not match.
    #[error(
        "snapshot state file {path} is corrupt: CRC32 {found:#010x}, the header says {want:#010x}"
    )]
    Checksum {
        /// The file.
        path: String,
        /// Computed.
        found: u32,
        /// Stored.
        want: u32,
    },
    /// The payload does not decode (the message names the place, never the
    /// file's bytes).
    #[error("snapshot state file {path} does not decode: {msg}")]
    Decode {
        /// The file.
        path: String,
        /// Where and what kind of error.
        msg: String,
    },
    /// The payload decodes but a field is invalid.
    #[error("snapshot state is invalid: {0}")]
    Invalid(String),
    /// The memory file does not fit the state's memory layout.
    #[error("memory file {path}: {msg}")]
    MemoryFile {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Guest memory cannot be mapped or read.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A part of the state this ember-vmm or host cannot save or restore.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Collecting dirty pages or writing a Diff memory file failed.
    #[error("{0}")]
    Dirty(#[from] dirty::DirtyError),
    /// The Uffd memory backend could not be set up.
    #[error("{0}")]
    Uffd(#[from] uffd::UffdError),
    /// A KVM ioctl failed while saving or restoring.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Why.
        err: kvm_ioctls::Error,
    },
}

/// One region of guest memory and where it lies in the memory file.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub base_address: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file (a Full file has the regions back to back).
    pub offset: u64,
}

/// Everything a state file holds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MicroVmState {
    /// The machine as configured (`GET /vm/config` after a load returns it,
    /// overrides applied).
    pub config: VmConfig,
    /// Whether the boot timer took the first MMIO page (devices sit one page
    /// further; the restored VMM must place them the same).
    pub boot_timer: bool,
    /// Guest memory layout.
    pub memory: Vec<MemoryRegionState>,
    /// KVM VM state: irqchip, PIT, clock.
    pub vm: VmState,
    /// Each vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialState,
    /// The i8042 controller.
    pub i8042: I8042State,
    /// The virtio devices in MMIO slot order.
    pub devices: Vec<VirtioDeviceState>,
}

impl MicroVmState {
    /// Checks what the builder relies on before any of it is used: the
    /// vCPU count and ids, and a memory layout that is exactly the one
    /// ember builds for the configured size.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let mc = &self.config.machine_config;
        mc.validate()
            .map_err(|e| SnapshotError::Invalid(format!("machine-config: {e}")))?;
        if self.vcpus.len() != mc.vcpu_count as usize {
            return Err(SnapshotError::Invalid(format!(
                "vcpus: {} saved, machine-config has {}",
                self.vcpus.len(),
                mc.vcpu_count
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(SnapshotError::Invalid(format!(
                    "vcpus[{i}]: id {} out of order",
                    v.id
                )));
            }
        }
        let want = arch_memory_regions((mc.mem_size_mib as u64) << 20);
        if want.len() != self.memory.len()
            || want
                .iter()
                .zip(&self.memory)
                .any(|((a, l), r)| a.0 != r.base_address || *l as u64 != r.size)
        {
            return Err(SnapshotError::Invalid(format!(
                "memory: the regions do not match {} MiB of guest memory",
                mc.mem_size_mib
            )));
        }
        for (i, r) in self.memory.iter().enumerate() {
            if r.offset % 4096 != 0 || r.offset.checked_add(r.size).is_none() {
                return Err(SnapshotError::Invalid(format!(
                    "memory[{i}]: offset {:#x} is not page aligned or overflows",
                    r.offset
                )));
            }
        }
        Ok(())
    }
}

/// Raw bytes of a KVM structure, kept as a hex string in the state file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let b = s.as_bytes();
        if b.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex string"));
        }
        let nib = |c: u8| -> Result<u8, D::Error> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(serde::de::Error::custom("a non-hex digit")),
            }
        };
        let mut out = Vec::with_capacity(b.len() / 2);
        for p in b.chunks_exact(2) {
            out.push(nib(p[0])? << 4 | nib(p[1])?);
        }
        Ok(Blob(out))
    }
}

/// KVM structures that are plain old data.
///
/// # Safety
///
/// Implementors are `repr(C)` structs of integers (and arrays and unions of
/// them) for which every bit pattern is a valid value, as KVM's uapi
/// structures are.
pub(crate) unsafe trait Pod: Default {}

// SAFETY: kvm uapi structures: integers, arrays and unions of integers.
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_cpuid_entry2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_clock_data {}

/// The bytes of `v`.
pub(crate) fn to_blob<T: Pod>(v: &T) -> Blob {
    // SAFETY: `T: Pod` is plain data of exactly size_of::<T>() bytes;
    // the values come from zero-initialised structs KVM filled in, so
    // padding bytes are initialised too.
    let bytes = unsafe {
        std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    Blob(bytes.to_vec())
}

/// A `T` from `b`, which must be exactly its size; `what` names the field
/// in the error.
pub(crate) fn from_blob<T: Pod>(b: &Blob, what: &str) -> Result<T, SnapshotError> {
    let n = std::mem::size_of::<T>();
    if b.0.len() != n {
        return Err(SnapshotError::Invalid(format!(
            "{what}: {} bytes, want {n}",
            b.0.len()
        )));
    }
    let mut v = T::default();
    // SAFETY: `T: Pod` accepts any bit pattern; exactly n bytes are copied
    // into a value of n bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(b.0.as_ptr(), (&mut v as *mut T).cast::<u8>(), n);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trips_as_hex() {
        let b = Blob(vec![0, 1, 0xab, 0xff]);
        let j = serde_json::to_string(&b).unwrap();
        assert_eq!(j, "\"0001abff\"");
        assert_eq!(serde_json::from_str::<Blob>(&j).unwrap(), b);
        assert!(serde_json::from_str::<Blob>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
    }

    #[test]
    fn pod_blobs_check_their_size() {
        let r = kvm_bindings::kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let b = to_blob(&r);
        let back: kvm_bindings::kvm_regs = from_blob(&b, "regs").unwrap();
        assert_eq!(back.rip, 0x1234);
        let short = Blob(b.0[1..].to_vec());
        let e = from_blob::<kvm_bindings::kvm_regs>(&short, "vcpus[0].regs").unwrap_err();
        assert!(e.to_string().contains("vcpus[0].regs"), "{e}");
    }
}
