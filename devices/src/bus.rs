//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. vCPU threads look
//! up the device covering an exit address and call it with the offset inside
//! the device's range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that sits on a [`Bus`].
///
/// `base` is the start of the range the device was inserted at, `offset` the
/// distance of the access from it. Accesses never straddle the range end.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one that is already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address of the range.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address of the range.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A shared handle to a bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Range {
    len: u64,
    dev: SharedDevice,
}

/// Address space of devices, cheap to clone (devices are shared).
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `dev` at `[base, base + len)`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, dev });
        Ok(())
    }

    /// The device covering `[addr, addr + size)`, with its base address.
    fn lookup(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, r) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= base + r.len).then_some((*base, &r.dev))
    }

    /// Dispatches a read. Returns false (and leaves `data` alone) when no
    /// device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .expect("bus device poisoned")
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .expect("bus device poisoned")
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo {
        last: Vec<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Echo::default()));
        bus.insert(d.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(d.lock().unwrap().last, vec![(0x3f8, 0, vec![7])]);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        // straddles the end
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Echo::default()));
        bus.insert(d.clone(), 0x1000, 0x1000).unwrap();
        assert!(bus.insert(d.clone(), 0x1fff, 1).is_err());
        assert!(bus.insert(d.clone(), 0x800, 0x801).is_err());
        assert!(bus.insert(d.clone(), 0x0, 0).is_err());
        assert!(bus.insert(d.clone(), u64::MAX, 2).is_err());
        bus.insert(d, 0x2000, 0x10).unwrap();
    }
}
