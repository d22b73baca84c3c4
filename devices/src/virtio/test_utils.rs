//! Helpers for tests: small guest memory and hand-built split virtqueues.

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of `size` bytes at address 0.
pub fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Writes descriptor `idx` of the table at `table` (ignores failures, so
/// tests can aim descriptors anywhere).
pub fn write_desc(
    m: &GuestMemoryMmap,
    table: GuestAddress,
    idx: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = m.write_slice(&b, GuestAddress(table.0 + u64::from(idx) * 16));
}

/// A split virtqueue laid out at `base`: descriptors at base, avail ring at
/// base + 0x1000, used ring at base + 0x2000 (sizes up to 256).
pub struct TestQueue {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            mem: mem.clone(),
            size,
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// A ready `Queue` configured for this layout.
    pub fn queue(&self) -> Queue {
        self.queue_of_max(self.size)
    }

    /// [`queue`](Self::queue) as a transport builds it for a device whose
    /// queue holds at most `max` entries.
    pub fn queue_of_max(&self, max: u16) -> Queue {
        let mut q = Queue::new(max).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc.0 as u32), Some((self.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes a chain of `(addr, len, writable)` buffers and makes it
    /// available. Returns the head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if *w { 2 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            write_desc(
                &self.mem,
                self.desc,
                idx,
                *addr,
                *len,
                flags,
                (idx + 1) % self.size,
            );
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts a raw head index in the avail ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail.0 + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// Forces the avail idx (to test bogus values).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap()
    }

    /// (id, len) of used element `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let a = self.used.0 + 4 + u64::from(i % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }
}
