//! Descriptor-chain parsing shared by the devices.
//!
//! [`parse_chain`] walks a split-virtqueue descriptor chain itself (rather
//! than trusting the iterator to stop silently) so that loops, out-of-range
//! indices, buffers outside guest memory, oversized chains, nested indirect
//! tables and readable-after-writable ordering are all reported as errors.
//! Devices then copy data with [`ParsedChain::read_at`] /
//! [`ParsedChain::write_at`], which only touch the validated segments.

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Descriptor flag: another descriptor follows.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Hard limit on descriptors in one chain (direct + indirect).
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;
/// Hard limit on the total bytes described by one chain (spec: < 2^32).
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// Why a chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescError {
    /// A descriptor index is beyond the queue size.
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    /// An indirect descriptor table lies outside guest memory.
    #[error("descriptor table at {0:#x} not in guest memory")]
    TableOutOfMemory(u64),
    /// A buffer lies outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} not in guest memory")]
    BufferOutOfMemory {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The chain has more descriptors than allowed (or loops).
    #[error("descriptor chain loops or is longer than allowed")]
    TooManyDescriptors,
    /// The chain's total length is beyond the limit.
    #[error("descriptor chain describes more than 4 GiB")]
    TooLong,
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A malformed indirect descriptor (nested, or a bad table length).
    #[error("invalid indirect descriptor table")]
    BadIndirect,
    /// An access beyond the chain's buffers.
    #[error("access {offset:#x}+{len:#x} beyond the chain's buffers")]
    OutOfRange {
        /// Offset into the buffers.
        offset: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A guest memory access failed.
    #[error("guest memory access failed")]
    Memory,
}

/// One guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the segment.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated chain: device-readable then device-writable buffers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedChain {
    /// Index of the chain's first descriptor (for the used ring).
    pub head: u16,
    /// Segments the device reads (driver to device), in order.
    pub readable: Vec<Segment>,
    /// Segments the device writes (device to driver), in order.
    pub writable: Vec<Segment>,
}

#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemoryMmap, table: GuestAddress, idx: u16) -> Result<RawDesc, DescError> {
    let addr = table
        .0
        .checked_add(u64::from(idx) * 16)
        .ok_or(DescError::TableOutOfMemory(table.0))?;
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(addr))
        .map_err(|_| DescError::TableOutOfMemory(addr))?;
    let u64_at = |o: usize| {
        u64::from_le_bytes([
            b[o],
            b[o + 1],
            b[o + 2],
            b[o + 3],
            b[o + 4],
            b[o + 5],
            b[o + 6],
            b[o + 7],
        ])
    };
    Ok(RawDesc {
        addr: u64_at(0),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

/// Walks the chain starting at `head` in the descriptor table at `table`
/// of a queue with `queue_size` entries.
pub fn parse_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<ParsedChain, DescError> {
    let mut out = ParsedChain {
        head,
        ..Default::default()
    };
    let mut total: u64 = 0;
    let mut count: usize = 0;
    // (table, size) of the table being walked; switches once to an indirect one.
    let mut cur_table = table;
    let mut cur_size = queue_size;
    let mut indirect = false;
    let mut idx = head;
    // a chain in a table of N entries has at most N descriptors
    let mut ttl = usize::from(queue_size);
    loop {
        if idx >= cur_size {
            return Err(DescError::BadIndex(idx));
        }
        if ttl == 0 {
            return Err(DescError::TooManyDescriptors);
        }
        ttl -= 1;
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(DescError::TooManyDescriptors);
        }
        let d = read_desc(mem, cur_table, idx)?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            // only as the sole descriptor of the direct chain, never nested,
            // never combined with NEXT
            if indirect || d.flags & VIRTQ_DESC_F_NEXT != 0 || count != 1 {
                return Err(DescError::BadIndirect);
            }
            if d.len == 0 || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                return Err(DescError::BadIndirect);
            }
            if !mem.check_range(GuestAddress(d.addr), d.len as usize) {
                return Err(DescError::BadIndirect);
            }
            indirect = true;
            cur_table = GuestAddress(d.addr);
            cur_size = (d.len / 16) as u16;
            ttl = usize::from(cur_size);
            idx = 0;
            count = 0;
            continue;
        }
        if d.len > 0 {
            if !mem.check_range(GuestAddress(d.addr), d.len as usize) {
                return Err(DescError::BufferOutOfMemory {
                    addr: d.addr,
                    len: d.len,
                });
            }
            total += u64::from(d.len);
            if total > MAX_CHAIN_BYTES {
                return Err(DescError::TooLong);
            }
            let seg = Segment {
                addr: GuestAddress(d.addr),
                len: d.len,
            };
            if d.flags & VIRTQ_DESC_F_WRITE != 0 {
                out.writable.push(seg);
            } else if !out.writable.is_empty() {
                return Err(DescError::ReadableAfterWritable);
            } else {
                out.readable.push(seg);
            }
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(out);
        }
        idx = d.next;
    }
}

fn seg_total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Applies `f(guest_addr, range_in_buf)` over the part of `segs` covering
/// `[offset, offset + len)`.
fn for_range(
    segs: &[Segment],
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), DescError>,
) -> Result<(), DescError> {
    let end = offset
        .checked_add(len as u64)
        .filter(|e| *e <= seg_total(segs))
        .ok_or(DescError::OutOfRange { offset, len })?;
    let mut pos: u64 = 0; // start of current segment in chain space
    let mut done: usize = 0;
    for s in segs {
        let s_end = pos + u64::from(s.len);
        if s_end > offset && pos < end {
            let from = offset.max(pos);
            let to = end.min(s_end);
            let n = (to - from) as usize;
            let addr = s.addr.0.checked_add(from - pos).ok_or(DescError::Memory)?;
            f(GuestAddress(addr), done..done + n)?;
            done += n;
        }
        pos = s_end;
        if pos >= end {
            break;
        }
    }
    Ok(())
}

impl ParsedChain {
    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        seg_total(&self.readable)
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        seg_total(&self.writable)
    }

    /// Reads `buf.len()` bytes at `offset` of the readable part.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DescError> {
        for_range(&self.readable, offset, buf.len(), |a, r| {
            mem.read_slice(&mut buf[r], a)
                .map_err(|_| DescError::Memory)
        })
    }

    /// Writes `buf` at `offset` of the writable part.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), DescError> {
        for_range(&self.writable, offset, buf.len(), |a, r| {
            mem.write_slice(&buf[r], a).map_err(|_| DescError::Memory)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{mem, write_desc};
    use proptest::prelude::*;

    #[test]
    fn simple_chain() {
        let m = mem(0x10000);
        let t = GuestAddress(0x1000);
        write_desc(&m, t, 0, 0x2000, 10, VIRTQ_DESC_F_NEXT, 1);
        write_desc(&m, t, 1, 0x3000, 6, VIRTQ_DESC_F_NEXT, 2);
        write_desc(&m, t, 2, 0x4000, 8, VIRTQ_DESC_F_WRITE, 0);
        let c = parse_chain(&m, t, 4, 0).unwrap();
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 8);
        m.write_slice(&[1u8; 10], GuestAddress(0x2000)).unwrap();
        m.write_slice(&[2u8; 6], GuestAddress(0x3000)).unwrap();
        let mut b = [0u8; 4];
        c.read_at(&m, 8, &mut b).unwrap();
        assert_eq!(b, [1, 1, 2, 2]);
        c.write_at(&m, 7, &[9]).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x4007)).unwrap(), 9);
        assert!(c.write_at(&m, 8, &[9]).is_err());
        assert!(c.read_at(&m, u64::MAX, &mut b).is_err());
    }

    #[test]
    fn evil_chains() {
        let m = mem(0x10000);
        let t = GuestAddress(0x1000);
        // loop
        write_desc(&m, t, 0, 0x2000, 1, VIRTQ_DESC_F_NEXT, 1);
        write_desc(&m, t, 1, 0x2000, 1, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(parse_chain(&m, t, 4, 0), Err(DescError::TooManyDescriptors));
        // outside memory
        write_desc(&m, t, 0, 0xfff0, 0x20, 0, 0);
        assert!(matches!(
            parse_chain(&m, t, 4, 0),
            Err(DescError::BufferOutOfMemory { .. })
        ));
        // huge length
        write_desc(&m, t, 0, 0x0, u32::MAX, 0, 0);
        assert!(parse_chain(&m, t, 4, 0).is_err());
        // next index out of range
        write_desc(&m, t, 0, 0x2000, 1, VIRTQ_DESC_F_NEXT, 7);
        assert_eq!(parse_chain(&m, t, 4, 0), Err(DescError::BadIndex(7)));
        // readable after writable
        write_desc(
            &m,
            t,
            0,
            0x2000,
            1,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        write_desc(&m, t, 1, 0x2000, 1, 0, 0);
        assert_eq!(
            parse_chain(&m, t, 4, 0),
            Err(DescError::ReadableAfterWritable)
        );
        // table outside memory
        assert!(parse_chain(&m, GuestAddress(0xfff8), 4, 0).is_err());
        // nested indirect
        write_desc(&m, t, 0, 0x3000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        write_desc(
            &m,
            GuestAddress(0x3000),
            0,
            0x3000,
            32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        assert_eq!(parse_chain(&m, t, 4, 0), Err(DescError::BadIndirect));
        // valid indirect
        write_desc(&m, GuestAddress(0x3000), 0, 0x4000, 4, VIRTQ_DESC_F_NEXT, 1);
        write_desc(
            &m,
            GuestAddress(0x3000),
            1,
            0x5000,
            4,
            VIRTQ_DESC_F_WRITE,
            0,
        );
        let c = parse_chain(&m, t, 4, 0).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (4, 4));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_tables_never_escape_memory(
            descs in proptest::collection::vec((0u64..0x5000, any::<u32>(), 0u16..8, 0u16..20), 1..16),
            small_lens in any::<bool>(),
            head in 0u16..20,
            qsize in 1u16..20,
            off in 0u64..0x100,
            len in 0usize..0x100,
        ) {
            let m = mem(0x4000);
            let t = GuestAddress(0x100);
            for (i, (addr, l, flags, next)) in descs.iter().enumerate() {
                let l = if small_lens { l % 0x200 } else { *l };
                write_desc(&m, t, i as u16, *addr, l, *flags, *next);
            }
            if let Ok(c) = parse_chain(&m, t, qsize, head) {
                prop_assert!(c.readable.len() + c.writable.len() <= MAX_CHAIN_DESCRIPTORS);
                for s in c.readable.iter().chain(c.writable.iter()) {
                    prop_assert!(s.addr.0 + u64::from(s.len) <= 0x4000);
                }
                let mut buf = vec![0u8; len];
                let r = c.read_at(&m, off, &mut buf);
                prop_assert_eq!(r.is_ok(), off + len as u64 <= c.readable_len());
                let w = c.write_at(&m, off, &buf);
                prop_assert_eq!(w.is_ok(), off + len as u64 <= c.writable_len());
            }
        }
    }
}
