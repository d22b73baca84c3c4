//! The `Async` I/O engine of virtio-blk (Firecracker's `io_engine:
//! "Async"`): reads, writes and flushes go to the kernel through io_uring,
//! so the VMM thread never waits on the disk; completions come back through
//! an eventfd the event loop watches.
//!
//! - Each request has a bounce buffer of its own: a write copies the guest's
//!   data in before it is submitted, a read copies the data out once it has
//!   completed. So no guest memory is handed to the kernel, and what the
//!   guest does to its buffers meanwhile does not matter.
//! - At most [`MAX_INFLIGHT_BYTES`] of buffers are in flight; beyond that the
//!   queue waits for completions. A buffer lives until its completion has
//!   arrived, whatever happens to the device: a reset or a drop first waits
//!   for every operation still in the kernel.
//! - A flush is submitted with `IOSQE_IO_DRAIN`, so it starts only after
//!   every earlier operation has completed.
//! - Reads past the end of a file whose size is not a multiple of 512 come
//!   back short and are padded with zeros, as the `Sync` engine does.

use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Ring entries (one per queue slot).
pub const RING_ENTRIES: u32 = 256;
/// Bytes of bounce buffers in flight at most.
pub const MAX_INFLIGHT_BYTES: u64 = 16 << 20;

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read of `len` bytes at `off` (the file has `size` bytes).
    Read {
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// File size when submitted.
        size: u64,
    },
    /// A write of the buffer.
    Write,
    /// fsync.
    Flush,
}

/// One finished operation.
#[derive(Debug)]
pub struct Done<T> {
    /// What the caller attached at submission.
    pub tag: T,
    /// The operation.
    pub op: Op,
    /// Its buffer (a read's data, zero-padded past the end of the file).
    pub buf: Vec<u8>,
    /// Whether it succeeded in full.
    pub ok: bool,
}

struct Pending<T> {
    tag: T,
    op: Op,
    buf: Vec<u8>,
}

/// An io_uring with its completion eventfd and the operations in flight.
pub struct AsyncIo<T> {
    ring: IoUring,
    evt: EventFd,
    pending: HashMap<u64, Pending<T>>,
    next: u64,
    inflight_bytes: u64,
}

impl<T> std::fmt::Debug for AsyncIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncIo")
            .field("inflight", &self.pending.len())
            .field("inflight_bytes", &self.inflight_bytes)
            .finish()
    }
}

impl<T> AsyncIo<T> {
    /// A ring whose completions signal an eventfd. Fails when the kernel
    /// has no io_uring (or it is disabled).
    pub fn new() -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(AsyncIo {
            ring,
            evt,
            pending: HashMap::new(),
            next: 0,
            inflight_bytes: 0,
        })
    }

    /// The eventfd to watch.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Operations in flight.
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// Whether `bytes` more may be put in flight now.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.pending.len() < RING_ENTRIES as usize
            && (self.pending.is_empty() || self.inflight_bytes + bytes <= MAX_INFLIGHT_BYTES)
    }

    /// Submits `op` on `fd` with `buf` (a write's data, or a zeroed buffer
    /// for a read). On error nothing is in flight and the buffer is lost.
    pub fn submit(&mut self, fd: RawFd, op: Op, mut buf: Vec<u8>, tag: T) -> std::io::Result<()> {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        let entry = match op {
            Op::Read { off, len, .. } => {
                opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
                    .offset(off)
                    .build()
            }
            Op::Write => {
                return Err(std::io::Error::other("use submit_write for writes"));
            }
            Op::Flush => opcode::Fsync::new(types::Fd(fd))
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(id);
        self.push(id, entry, Pending { tag, op, buf })
    }

    /// Submits a write of `buf` at `off` on `fd`.
    pub fn submit_write(
        &mut self,
        fd: RawFd,
        off: u64,
        buf: Vec<u8>,
        tag: T,
    ) -> std::io::Result<()> {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        let entry = opcode::Write::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
            .offset(off)
            .build()
            .user_data(id);
        self.push(
            id,
            entry,
            Pending {
                tag,
                op: Op::Write,
                buf,
            },
        )
    }

    fn push(&mut self, id: u64, entry: squeue::Entry, p: Pending<T>) -> std::io::Result<()> {
        let bytes = p.buf.len() as u64;
        // The buffer's heap allocation does not move when the Vec moves into
        // the map, so the pointer in the entry stays valid until the
        // completion has arrived (we never drop a pending buffer before).
        self.pending.insert(id, p);
        // SAFETY: the entry's buffer is owned by `self.pending[id]` until its
        // completion is reaped (or `Drop` waits for it).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.pending.remove(&id);
            return Err(std::io::Error::other("io_uring submission queue full"));
        }
        if let Err(e) = self.ring.submit() {
            // Not submitted: the kernel has not seen the entry... unless it
            // took some. Keep it pending; it completes or is drained later.
            log::warn!("virtio-blk: io_uring submit: {e}");
        }
        self.inflight_bytes += bytes;
        Ok(())
    }

    /// Takes every completion that has arrived.
    pub fn reap(&mut self) -> Vec<Done<T>> {
        let _ = self.evt.read();
        let mut out = Vec::new();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (id, res) in cqes {
            let Some(mut p) = self.pending.remove(&id) else {
                continue;
            };
            self.inflight_bytes = self.inflight_bytes.saturating_sub(p.buf.len() as u64);
            let ok = match p.op {
                Op::Read { off, len, size } => {
                    // A short read is fine only where the file ends.
                    res >= 0 && (res as u64 == len || off + res as u64 >= size)
                }
                Op::Write => res >= 0 && res as usize == p.buf.len(),
                Op::Flush => res == 0,
            };
            if let (Op::Read { .. }, true) = (p.op, res >= 0) {
                let n = res as usize;
                p.buf[n..].fill(0);
            }
            out.push(Done {
                tag: p.tag,
                op: p.op,
                buf: p.buf,
                ok,
            });
        }
        out
    }

    /// Waits for every operation in flight and forgets their results (a
    /// device reset): afterwards no buffer is in the kernel's hands.
    pub fn drain(&mut self) {
        while !self.pending.is_empty() {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("virtio-blk: io_uring wait: {e}");
                    // Keep the buffers (leak them) rather than free memory
                    // the kernel may still write.
                    for (_, p) in self.pending.drain() {
                        std::mem::forget(p.buf);
                    }
                    break;
                }
            }
            drop(self.reap());
        }
        self.inflight_bytes = 0;
    }
}

impl<T> Drop for AsyncIo<T> {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    fn ring() -> Option<AsyncIo<u32>> {
        match AsyncIo::new() {
            Ok(r) => Some(r),
            Err(e) => {
                println!("SKIP: io_uring is not available here: {e}");
                None
            }
        }
    }

    fn wait_all(r: &mut AsyncIo<u32>, n: usize) -> Vec<Done<u32>> {
        let mut got = Vec::new();
        while got.len() < n {
            r.ring.submit_and_wait(1).unwrap();
            got.extend(r.reap());
        }
        got
    }

    #[test]
    fn reads_writes_and_flushes_complete_through_the_ring() {
        let Some(mut r) = ring() else { return };
        let f = TempFile::new().unwrap();
        let mut file = f.as_file().try_clone().unwrap();
        file.write_all(&[7u8; 1000]).unwrap();
        let fd = file.as_raw_fd();
        r.submit_write(fd, 0, vec![1u8; 512], 1).unwrap();
        r.submit(fd, Op::Flush, Vec::new(), 2).unwrap();
        let done = wait_all(&mut r, 2);
        assert!(done.iter().all(|d| d.ok), "{done:?}");
        // A read that crosses the end of the file: zero-padded.
        r.submit(
            fd,
            Op::Read {
                off: 512,
                len: 1024,
                size: 1000,
            },
            vec![0xffu8; 1024],
            3,
        )
        .unwrap();
        let d = wait_all(&mut r, 1).pop().unwrap();
        assert!(d.ok);
        assert!(d.buf[..488].iter().all(|&b| b == 7));
        assert!(d.buf[488..].iter().all(|&b| b == 0));
        assert_eq!(r.inflight(), 0);
        // A write to a read-only descriptor fails, cleanly.
        let ro = std::fs::File::open(f.as_path()).unwrap();
        r.submit_write(ro.as_raw_fd(), 0, vec![0u8; 512], 4)
            .unwrap();
        let d = wait_all(&mut r, 1).pop().unwrap();
        assert!(!d.ok);
    }

    #[test]
    fn in_flight_bytes_are_bounded_and_a_drop_waits_for_the_kernel() {
        let Some(mut r) = ring() else { return };
        assert!(r.has_room(MAX_INFLIGHT_BYTES));
        let f = TempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let fd = f.as_file().as_raw_fd();
        r.submit(
            fd,
            Op::Read {
                off: 0,
                len: 1 << 20,
                size: 1 << 20,
            },
            vec![0u8; 1 << 20],
            1,
        )
        .unwrap();
        assert!(!r.has_room(MAX_INFLIGHT_BYTES));
        // Dropped with an operation possibly in flight: drain waits.
        drop(r);
    }
}
