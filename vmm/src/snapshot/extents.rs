//! The data extents of a sparse file (a snapshot's memory file): what the
//! load's prefault populates and what a rebase copies. Also compiled into
//! `ember-snapshot-editor`, beside `rebase.rs`.

use std::fs::File;

/// The extents of `file` between `start` and `end` that hold data, as
/// `lseek(SEEK_DATA/SEEK_HOLE)` reports them (a sparse memory file's
/// written pages): `(from, to)` byte offsets, in order. A failed `lseek`
/// is reported with the offset it was asked for, and ends the walk.
pub fn data_extents(file: &File, start: u64, end: u64) -> DataExtents<'_> {
    DataExtents {
        file,
        at: start,
        end,
    }
}

/// The iterator of [`data_extents`].
pub struct DataExtents<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl DataExtents<'_> {
    /// `lseek(at, whence)`; `None` past the file's last data (ENXIO).
    fn seek(&self, at: u64, whence: libc::c_int) -> Result<Option<u64>, (u64, std::io::Error)> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on an open descriptor; no memory is passed.
        let r = unsafe { libc::lseek64(self.file.as_raw_fd(), at as libc::off64_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        Err((at, err))
    }
}

impl Iterator for DataExtents<'_> {
    type Item = Result<(u64, u64), (u64, std::io::Error)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let data = match self.seek(self.at, libc::SEEK_DATA) {
            Ok(Some(d)) if d < self.end => d,
            Ok(_) => {
                self.at = self.end;
                return None;
            }
            Err(e) => {
                self.at = self.end;
                return Some(Err(e));
            }
        };
        let stop = match self.seek(data, libc::SEEK_HOLE) {
            Ok(h) => h.unwrap_or(self.end).min(self.end),
            Err(e) => {
                self.at = self.end;
                return Some(Err(e));
            }
        };
        self.at = stop;
        Some(Ok((data, stop)))
    }
}
