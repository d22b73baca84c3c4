//! Guest memory of a snapshot: written whole (`Full`), mapped back from the
//! file with `MAP_PRIVATE` (the `File` backend) so pages load lazily on
//! first touch and the guest's writes never reach the file.

use std::fs::File;
use std::os::unix::fs::FileExt;

use devices::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::create_private;
use super::{MemoryRegionState, SnapshotError};

const PAGE: usize = 4096;

/// The regions of `mem` laid back to back, as a Full memory file holds them.
pub fn describe(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let s = MemoryRegionState {
                base_address: r.start_addr().raw_value(),
                size: r.len(),
                offset,
            };
            offset += r.len();
            s
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets.
    let (head, mid, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes all of `mem` to `path` (mode 0600): the file is sized to the
/// whole layout and only pages that are not all zero are written, so the
/// rest are holes. The caller has paused the vCPUs and is the thread that
/// runs the devices, so nothing writes guest memory meanwhile. Returns the
/// layout and the bytes written.
pub fn save_full(
    mem: &GuestMemoryMmap,
    path: &str,
) -> Result<(Vec<MemoryRegionState>, u64), SnapshotError> {
    let layout = describe(mem);
    let f = create_private(path)?;
    let io = |err| SnapshotError::Io {
        path: path.into(),
        err,
    };
    let total: u64 = layout.iter().map(|r| r.size).sum();
    f.set_len(total).map_err(io)?;
    let mut written = 0u64;
    for (region, st) in mem.iter().zip(&layout) {
        let len = region.len() as usize;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        // SAFETY: `host` is the start of this region's live mapping of
        // `len` bytes, owned by `mem`, which outlives the slice; the guest
        // is paused (see above), so reading it as bytes races with nothing.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run_start: Option<usize> = None;
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let off = i * PAGE;
            match (is_zero(page), run_start) {
                (false, None) => run_start = Some(off),
                (true, Some(s)) => {
                    f.write_all_at(&bytes[s..off], st.offset + s as u64)
                        .map_err(io)?;
                    written += (off - s) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            f.write_all_at(&bytes[s..], st.offset + s as u64)
                .map_err(io)?;
            written += (len - s) as u64;
        }
    }
    Ok((layout, written))
}

/// Maps `file` as guest memory with the snapshot's layout, `MAP_PRIVATE`:
/// pages come from the file on first touch, and writes stay in this process.
/// The file must cover every region.
pub fn load_file(
    file: &File,
    path: &str,
    layout: &[MemoryRegionState],
) -> Result<GuestMemoryMmap, SnapshotError> {
    let have = file
        .metadata()
        .map_err(|err| SnapshotError::Io {
            path: path.into(),
            err,
        })?
        .len();
    let want = layout
        .iter()
        .map(|r| r.offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if have < want {
        return Err(SnapshotError::MemoryFile {
            path: path.into(),
            msg: format!(
                "{have} bytes, the snapshot's memory layout needs {want} (a truncated or wrong memory file)"
            ),
        });
    }
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let len = r.size as usize;
        let fo = FileOffset::new(
            file.try_clone().map_err(|err| SnapshotError::Io {
                path: path.into(),
                err,
            })?,
            r.offset,
        );
        let map = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Memory(format!("mmap of {path}: {e}")))?;
        prefault(file, r.offset, map.as_ptr(), len);
        regions.push(
            GuestRegionMmap::new(map, GuestAddress(r.base_address))
                .ok_or_else(|| SnapshotError::Memory("region address overflows".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(e.to_string()))
}

/// `MADV_POPULATE_WRITE` (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults in, private and writable, the pages of the mapping at `host`
/// (`len` bytes of `file` from `offset`) that hold data in the file, so the
/// restored guest's first touches of its memory do not each fault in this
/// process. Holes (never-touched guest memory) stay lazy; the cost is that
/// the file's data pages are private copies from the start. Best effort: an
/// older kernel or a failure leaves the pages to load on first touch.
fn prefault(file: &File, offset: u64, host: *mut u8, len: usize) {
    for extent in super::extents::data_extents(file, offset, offset + len as u64) {
        let Ok((data, stop)) = extent else {
            return;
        };
        let start = (data & !(PAGE as u64 - 1)).max(offset);
        // SAFETY: [start, stop) lies inside this region's mapping of `len`
        // bytes at `host` (offsets relative to `offset`); populating only
        // faults pages in, it changes no contents.
        let r = unsafe {
            libc::madvise(
                host.add((start - offset) as usize).cast(),
                (stop - start) as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HugePages;
    use crate::vstate::vm::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn full_memory_round_trips_and_is_sparse() {
        let dir = std::env::temp_dir().join(format!("ember-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("mem");
        let p = p.to_str().unwrap();
        let m = create_guest_memory(16, HugePages::None).unwrap();
        m.write_obj(0xdead_beef_u32, GuestAddress(0x5000)).unwrap();
        m.write_obj(0x1234_u16, GuestAddress((16 << 20) - 2))
            .unwrap();
        let (layout, written) = save_full(&m, p).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(std::fs::metadata(p).unwrap().len(), 16 << 20);
        let f = File::open(p).unwrap();
        let back = load_file(&f, p, &layout).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            back.read_obj::<u16>(GuestAddress((16 << 20) - 2)).unwrap(),
            0x1234
        );
        // MAP_PRIVATE: writes stay in the process.
        back.write_obj(1u32, GuestAddress(0x5000)).unwrap();
        let again = load_file(&f, p, &layout).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0xdead_beef
        );
        // A short file is refused.
        let short = dir.join("short");
        std::fs::write(&short, [0u8; 4096]).unwrap();
        let s = File::open(&short).unwrap();
        let e = load_file(&s, "short", &layout).unwrap_err().to_string();
        assert!(e.contains("needs"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
