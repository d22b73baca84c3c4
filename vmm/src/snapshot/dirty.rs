//! Diff snapshots: which guest pages changed since the last snapshot, and
//! the sparse memory file that holds only those.
//!
//! A page is dirty when the guest wrote it (KVM's dirty log, on for every
//! memory slot when `track_dirty_pages` is set) or when the VMM wrote it
//! through vm-memory (each region's [`AtomicBitmap`]: descriptor buffers,
//! used rings, device config the VMM fills in). The dirty set of a region is
//! the union of both, one bit per 4 KiB page.
//!
//! [`take_dirty`] reads both and clears them, so taking a snapshot (Full or
//! Diff) starts a new interval: the next Diff holds exactly what changed
//! since. If writing the snapshot then fails, [`DirtyPages::give_back`] marks
//! the pages dirty again in vm-memory's bitmaps, so no change is lost.
//!
//! Pages a balloon discards (`MADV_DONTNEED`) are not writes and are not
//! marked: a Diff leaves the base's bytes there, which the guest gave up.
//!
//! [`write_diff`] writes a Diff memory file in the Full layout (the regions
//! back to back, each at its `offset`): the dirty pages at their offsets and
//! holes elsewhere, with the file's size set to the full size. Its data can
//! be laid onto the base's memory file with `ember-snapshot-editor
//! edit-memory rebase`, which finds it with `lseek(SEEK_DATA/SEEK_HOLE)`.

use std::fs::File;
use std::os::fd::AsRawFd;

use devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// The page size of the dirty bitmaps (KVM's and vm-memory's): 4 KiB.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Errors collecting dirty pages or writing a Diff memory file.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A Diff snapshot needs the dirty log, which is on only with
    /// `track_dirty_pages`.
    #[error("Diff snapshots are not enabled: set track_dirty_pages in the machine configuration (or in the snapshot load request) to take them")]
    NotTracking,
    /// `KVM_GET_DIRTY_LOG` on a memory slot failed.
    #[error("KVM_GET_DIRTY_LOG for memory slot {slot} failed: {err}")]
    KvmLog {
        /// Memory slot.
        slot: u32,
        /// The ioctl's error.
        err: kvm_ioctls::Error,
    },
    /// The dirty set does not match the guest memory it is applied to.
    #[error("dirty page set has {got} regions, guest memory {want}")]
    Layout {
        /// Regions in the dirty set.
        got: usize,
        /// Regions of guest memory.
        want: usize,
    },
    /// A region's host address could not be resolved.
    #[error("guest memory region at {base:#x}: {msg}")]
    Region {
        /// Guest physical base.
        base: u64,
        /// vm-memory's message.
        msg: String,
    },
    /// Writing or sizing the memory file failed.
    #[error("cannot write the diff memory file at offset {offset:#x}: {err}")]
    Write {
        /// File offset.
        offset: u64,
        /// The system call's error.
        err: std::io::Error,
    },
}

/// The dirty pages of each guest memory region, one bit per 4 KiB page (bit
/// `i % 64` of word `i / 64` for page `i` of the region), in region order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// One bitmap per region.
    pub regions: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// How many pages are dirty in all regions.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Marks every page of this set dirty again in `mem`'s vm-memory
    /// bitmaps: a snapshot that failed after [`take_dirty`] gives its pages
    /// back so the next Diff still holds them.
    pub fn give_back(&self, mem: &GuestMemoryMmap) {
        for (region, bits) in mem.iter().zip(&self.regions) {
            let bitmap = region.get_mmap();
            for page in set_bits(bits) {
                bitmap.bitmap().set_bit(page as usize);
            }
        }
    }
}

/// Bitwise OR of two page bitmaps of possibly different lengths (the longer
/// one's tail is kept).
pub fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    let (long, short) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    let mut out = long.to_vec();
    for (o, s) in out.iter_mut().zip(short) {
        *o |= s;
    }
    out
}

/// Page indices set in `bits`, ascending.
pub fn set_bits(bits: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        let mut rest = word;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let b = rest.trailing_zeros();
            rest &= rest - 1;
            Some(w as u64 * 64 + u64::from(b))
        })
    })
}

/// Runs of consecutive set pages as `(first page, page count)`, ascending,
/// limited to `pages` pages (bits past a region's end are ignored).
pub fn runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in set_bits(bits).take_while(|&p| p < pages) {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Reads and clears the dirty pages of every region of `mem`: KVM's dirty
/// log of slot `i` (the slots are the regions in order, as
/// `Vm::register_memory` made them) united with the region's vm-memory
/// bitmap. `tracking` is whether the slots were registered with
/// `KVM_MEM_LOG_DIRTY_PAGES`; without it there is no log to read and a Diff
/// cannot be taken.
pub fn take_dirty(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    tracking: bool,
) -> Result<DirtyPages, DirtyError> {
    if !tracking {
        return Err(DirtyError::NotTracking);
    }
    let mut regions = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let kvm = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|err| DirtyError::KvmLog { slot, err })?;
        let vmm = region.get_mmap().bitmap().get_and_reset();
        regions.push(union(&kvm, &vmm));
    }
    Ok(DirtyPages { regions })
}

/// Clears the dirty state of every region after a Full snapshot (the next
/// Diff is relative to it). Does nothing without tracking.
pub fn reset_dirty(vm: &VmFd, mem: &GuestMemoryMmap, tracking: bool) -> Result<(), DirtyError> {
    if tracking {
        take_dirty(vm, mem, true)?;
    } else {
        for region in mem.iter() {
            region.get_mmap().bitmap().reset();
        }
    }
    Ok(())
}

/// What [`write_diff`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Bytes of page data written.
    pub data_bytes: u64,
    /// The file's (full, mostly sparse) size.
    pub file_size: u64,
}

/// Writes the dirty pages of `mem` to `file`, an empty file opened for
/// writing: region `i` starts at file offset `offsets[i]` (the Full layout:
/// pass `None` for regions back to back), each dirty page lands at its
/// offset, and the file is sized to hold every region, so the pages not
/// written read as holes.
pub fn write_diff(
    file: &File,
    mem: &GuestMemoryMmap,
    dirty: &DirtyPages,
    offsets: Option<&[u64]>,
) -> Result<DiffStats, DirtyError> {
    if dirty.regions.len() != mem.num_regions()
        || offsets.is_some_and(|o| o.len() != mem.num_regions())
    {
        return Err(DirtyError::Layout {
            got: dirty.regions.len(),
            want: mem.num_regions(),
        });
    }
    let mut stats = DiffStats::default();
    let mut next = 0u64;
    for (i, (region, bits)) in mem.iter().zip(&dirty.regions).enumerate() {
        let base = offsets.map_or(next, |o| o[i]);
        let len = region.len();
        next = base + len;
        stats.file_size = stats.file_size.max(next);
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| DirtyError::Region {
                base: region.start_addr().raw_value(),
                msg: e.to_string(),
            })?;
        let pages = len.div_ceil(DIRTY_PAGE_SIZE);
        for (first, n) in runs(bits, pages) {
            let start = first * DIRTY_PAGE_SIZE;
            let bytes = (n * DIRTY_PAGE_SIZE).min(len - start);
            // SAFETY: `start + bytes <= len`, so the range lies inside the
            // region's live mapping, which `mem` keeps alive.
            let src = unsafe { host.add(start as usize) };
            pwrite_all(file, src, bytes as usize, base + start)?;
            stats.data_bytes += bytes;
        }
    }
    file.set_len(stats.file_size)
        .map_err(|err| DirtyError::Write {
            offset: stats.file_size,
            err,
        })?;
    Ok(stats)
}

/// A Diff snapshot's memory: takes the dirty pages of `mem` (whose slots
/// were registered with the dirty log on) and writes them to `path`, created
/// (or truncated) with mode 0600, in the Full layout. Returns the layout,
/// the bytes of page data written and the pages taken: if the snapshot fails
/// after this, [`DirtyPages::give_back`] them. If this fails, they are
/// given back here.
pub fn save_diff(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    path: &str,
) -> Result<(Vec<super::MemoryRegionState>, u64, DirtyPages), super::SnapshotError> {
    let dirty = take_dirty(vm, mem, true)?;
    log::debug!("diff snapshot: {} dirty pages", dirty.count());
    let layout = super::memory::describe(mem);
    let offsets: Vec<u64> = layout.iter().map(|r| r.offset).collect();
    let written = super::format::create_private(path).and_then(|f| {
        write_diff(&f, mem, &dirty, Some(&offsets)).map_err(super::SnapshotError::from)
    });
    match written {
        Ok(st) => Ok((layout, st.data_bytes, dirty)),
        Err(e) => {
            dirty.give_back(mem);
            Err(e)
        }
    }
}

/// `pwrite`s `len` bytes from `src` at `offset`, retrying short writes and
/// EINTR. Guest memory is read through a raw pointer (the guest is paused,
/// but the bytes are never borrowed as a Rust slice).
fn pwrite_all(file: &File, src: *const u8, len: usize, offset: u64) -> Result<(), DirtyError> {
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        // SAFETY: `src + done .. src + len` is readable memory (see the
        // caller); pwrite only reads it.
        let n = unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                src.add(done).cast(),
                len - done,
                at as libc::off64_t,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DirtyError::Write { offset: at, err });
        }
        if n == 0 {
            return Err(DirtyError::Write {
                offset: at,
                err: std::io::ErrorKind::WriteZero.into(),
            });
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 << 12),
            (GuestAddress(1 << 20), 16 << 12),
        ])
        .unwrap()
    }

    fn tmpfile(tag: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("ember-dirty-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn union_keeps_both_sets_and_the_longer_tail() {
        assert_eq!(union(&[0b0101], &[0b0011, 8]), vec![0b0111, 8]);
        assert_eq!(union(&[1, 2], &[]), vec![1, 2]);
        let kvm = [1u64 << 3, 0];
        let vmm = [1u64 << 40, 1];
        let u = union(&kvm, &vmm);
        assert_eq!(set_bits(&u).collect::<Vec<_>>(), vec![3, 40, 64]);
    }

    #[test]
    fn runs_merge_neighbours_and_stop_at_the_region_end() {
        let bits = [0b1110_0111u64, 1 << 63, 1];
        assert_eq!(runs(&bits, 200), vec![(0, 3), (5, 3), (127, 2)]);
        assert_eq!(runs(&bits, 128), vec![(0, 3), (5, 3), (127, 1)]);
        assert!(runs(&[0, 0], 128).is_empty());
    }

    /// The VMM's own writes (vm-memory's bitmap) are part of the set,
    /// `give_back` re-marks them, and the set of an untracked VM is refused.
    #[test]
    fn bitmap_pages_count_and_come_back_after_a_failure() {
        let m = mem();
        m.write_obj(1u8, GuestAddress(5 << 12)).unwrap();
        m.write_obj(1u8, GuestAddress((1 << 20) + (2 << 12)))
            .unwrap();
        let taken = DirtyPages {
            regions: m
                .iter()
                .map(|r| r.get_mmap().bitmap().get_and_reset())
                .collect(),
        };
        assert_eq!(taken.count(), 2);
        assert_eq!(set_bits(&taken.regions[0]).collect::<Vec<_>>(), vec![5]);
        assert_eq!(set_bits(&taken.regions[1]).collect::<Vec<_>>(), vec![2]);
        assert!(m.iter().all(|r| r
            .get_mmap()
            .bitmap()
            .get_and_reset()
            .iter()
            .all(|&w| w == 0)));
        taken.give_back(&m);
        let again: Vec<_> = m
            .iter()
            .map(|r| r.get_mmap().bitmap().get_and_reset())
            .collect();
        assert_eq!(again, taken.regions);
    }

    /// Without track_dirty_pages there is no KVM log: a Diff is refused
    /// with a message naming the setting.
    #[test]
    fn diff_without_tracking_is_refused() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipped: no /dev/kvm ({e})");
                return;
            }
        };
        let vm = kvm.create_vm().unwrap();
        let e = take_dirty(&vm, &mem(), false).unwrap_err();
        assert!(e.to_string().contains("track_dirty_pages"), "{e}");
    }

    /// On a real VM with the log on: the set is KVM's log united with the
    /// bitmap, reading it clears both, and `reset_dirty` clears them too.
    #[test]
    fn take_dirty_reads_kvm_and_bitmap_then_starts_over() {
        let vm = match crate::vstate::vm::Vm::new() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("skipped: no usable /dev/kvm ({e})");
                return;
            }
        };
        let m = mem();
        vm.register_memory(&m, true).unwrap();
        m.write_obj(7u32, GuestAddress(9 << 12)).unwrap();
        let d = take_dirty(vm.fd(), &m, true).unwrap();
        assert_eq!(d.regions.len(), 2);
        assert_eq!(set_bits(&d.regions[0]).collect::<Vec<_>>(), vec![9]);
        assert_eq!(d.count(), 1);
        assert_eq!(take_dirty(vm.fd(), &m, true).unwrap().count(), 0);
        m.write_obj(7u32, GuestAddress(1 << 20)).unwrap();
        reset_dirty(vm.fd(), &m, true).unwrap();
        assert_eq!(take_dirty(vm.fd(), &m, true).unwrap().count(), 0);
    }

    /// The sparse writer writes exactly the dirty pages, at their Full
    /// offsets, and sizes the file to the whole memory.
    #[test]
    fn sparse_writer_writes_only_dirty_pages() {
        let m = mem();
        for (i, r) in m.iter().enumerate() {
            let base = r.start_addr();
            for p in 0..(r.len() / DIRTY_PAGE_SIZE) {
                let v = [(i as u8 + 1) ^ p as u8; DIRTY_PAGE_SIZE as usize];
                m.write_slice(&v, base.unchecked_add(p * DIRTY_PAGE_SIZE))
                    .unwrap();
            }
        }
        let dirty = DirtyPages {
            regions: vec![vec![(1 << 3) | (1 << 4) | (1 << 63)], vec![1 << 15]],
        };
        let (path, mut f) = tmpfile("sparse");
        let st = write_diff(&f, &m, &dirty, None).unwrap();
        assert_eq!(st.data_bytes, 4 * DIRTY_PAGE_SIZE);
        assert_eq!(st.file_size, 80 * DIRTY_PAGE_SIZE);
        assert_eq!(f.metadata().unwrap().len(), 80 * DIRTY_PAGE_SIZE);
        let mut all = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        let page =
            |n: u64| &all[(n * DIRTY_PAGE_SIZE) as usize..((n + 1) * DIRTY_PAGE_SIZE) as usize];
        for n in 0..80u64 {
            let want = match n {
                3 | 4 | 63 => Some(1u8 ^ n as u8),
                79 => Some(2u8 ^ 15),
                _ => None,
            };
            match want {
                Some(v) => assert!(page(n).iter().all(|&b| b == v), "page {n}"),
                None => assert!(page(n).iter().all(|&b| b == 0), "page {n} should be a hole"),
            }
        }
        // Only the written pages hold data (SEEK_DATA finds nothing past page 79's start
        // but page 79, nothing before page 3).
        // SAFETY: lseek on an open file; no memory is passed.
        let data_at = |off: i64| unsafe { libc::lseek64(f.as_raw_fd(), off, libc::SEEK_DATA) };
        assert_eq!(data_at(0), 3 * DIRTY_PAGE_SIZE as i64);
        assert_eq!(
            data_at(64 * DIRTY_PAGE_SIZE as i64),
            79 * DIRTY_PAGE_SIZE as i64
        );
        std::fs::remove_file(path).unwrap();
    }

    /// Full at t0, changes, Diff at t1; the diff laid onto a copy of the
    /// t0 file gives the same bytes as a Full at t1.
    #[test]
    fn diff_merged_onto_its_base_equals_a_full_snapshot() {
        use super::super::rebase::rebase;
        let m = mem();
        let all = |m: &GuestMemoryMmap| DirtyPages {
            regions: m
                .iter()
                .map(|r| vec![u64::MAX; (r.len() / DIRTY_PAGE_SIZE).div_ceil(64) as usize])
                .collect(),
        };
        let take = |m: &GuestMemoryMmap| DirtyPages {
            regions: m
                .iter()
                .map(|r| r.get_mmap().bitmap().get_and_reset())
                .collect(),
        };
        for p in 0..80u64 {
            let a = if p < 64 {
                p << 12
            } else {
                (1 << 20) + ((p - 64) << 12)
            };
            m.write_obj(p * 3 + 1, GuestAddress(a)).unwrap();
        }
        let (full0, f0) = tmpfile("full0");
        write_diff(&f0, &m, &all(&m), None).unwrap();
        take(&m);
        m.write_obj(0xdead_beefu64, GuestAddress(7 << 12)).unwrap();
        m.write_slice(&[0u8; 8192], GuestAddress((1 << 20) + (14 << 12)))
            .unwrap();
        m.write_obj(5u8, GuestAddress(63 << 12)).unwrap();
        let (diff, fd) = tmpfile("diff");
        let st = write_diff(&fd, &m, &take(&m), None).unwrap();
        assert_eq!(st.data_bytes, 4 * DIRTY_PAGE_SIZE);
        let (full1, f1) = tmpfile("full1");
        write_diff(&f1, &m, &all(&m), None).unwrap();
        assert_ne!(
            std::fs::read(&full0).unwrap(),
            std::fs::read(&full1).unwrap()
        );
        let merged = full0.with_extension("merged");
        std::fs::copy(&full0, &merged).unwrap();
        let rs = rebase(&merged, &diff).unwrap();
        assert_eq!(rs.bytes, 4 * DIRTY_PAGE_SIZE);
        assert!(std::fs::read(&merged).unwrap() == std::fs::read(&full1).unwrap());
        for p in [full0, diff, full1, merged] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn mismatched_layouts_are_refused() {
        let (path, f) = tmpfile("layout");
        let e = write_diff(
            &f,
            &mem(),
            &DirtyPages {
                regions: vec![vec![1]],
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(e, DirtyError::Layout { got: 1, want: 2 }), "{e}");
        std::fs::remove_file(path).unwrap();
    }
}
