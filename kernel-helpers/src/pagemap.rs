//! `/proc/PID/pagemap`: one 64-bit entry per virtual page, read in bulk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use libc::pid_t;

use crate::PAGE_SIZE;

/// Bit 63: the page is present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;
/// Bit 61: the page is a file page or shared anonymous (page cache / shmem).
pub const PM_FILE_OR_SHARED: u64 = 1 << 61;
/// Bit 56: the page is mapped exclusively.
pub const PM_EXCLUSIVE: u64 = 1 << 56;

/// Errors reading the pagemap.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// Opening or reading failed.
    #[error("reading /proc/{pid}/pagemap for {start:#x}-{end:#x} failed: {source}")]
    Read {
        /// The process.
        pid: pid_t,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The underlying error.
        source: io::Error,
    },
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    pid: pid_t,
    file: File,
}

impl Pagemap {
    /// Open the pagemap of `pid`.
    pub fn open(pid: pid_t) -> Result<Pagemap, PagemapError> {
        let file =
            File::open(format!("/proc/{pid}/pagemap")).map_err(|source| PagemapError::Read {
                pid,
                start: 0,
                end: 0,
                source,
            })?;
        Ok(Pagemap { pid, file })
    }

    /// The entries for `[start, end)` (page aligned), with one `pread`.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<u64>, PagemapError> {
        let pages = ((end - start) / PAGE_SIZE) as usize;
        let mut raw = vec![0u8; pages * 8];
        self.file
            .read_exact_at(&mut raw, start / PAGE_SIZE * 8)
            .map_err(|source| PagemapError::Read {
                pid: self.pid,
                start,
                end,
                source,
            })?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_touched_page_is_present_and_anonymous() {
        let mut buf = vec![0u8; 3 * PAGE_SIZE as usize];
        let page = (buf.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let idx = (page - buf.as_ptr() as u64) as usize;
        buf[idx] = 7;
        // SAFETY: getpid never fails.
        let pm = Pagemap::open(unsafe { libc::getpid() }).unwrap();
        let e = pm.entries(page, page + PAGE_SIZE).unwrap();
        assert_eq!(e.len(), 1);
        assert_ne!(e[0] & PM_PRESENT, 0);
        assert_eq!(e[0] & PM_FILE_OR_SHARED, 0);
        std::hint::black_box(&buf);
    }
}
