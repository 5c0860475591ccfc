//! Where a seed's pages come from (`PageSource`), and the node-local seed
//! cache in front of it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use kernel_helpers::mapping::Mapping;

use crate::PAGE_SIZE;

/// Errors fetching pages.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A read failed.
    #[error("reading {len} bytes at offset {offset:#x} of {source_name} failed: {error}")]
    Read {
        /// The source.
        source_name: String,
        /// Offset in the page store.
        offset: u64,
        /// Length.
        len: usize,
        /// What went wrong.
        error: io::Error,
    },
    /// A request outside the page store.
    #[error("pages at offset {offset:#x} (+{len}) lie outside the {size}-byte page store")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Store size.
        size: u64,
    },
}

/// Reads ranges of a seed's page store into local memory. Implemented by
/// the local image here; network transports plug in the same way.
pub trait PageSource: Send + Sync {
    /// Fill `dst` with the page store's bytes at `offset`.
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError>;
    /// Size of the page store.
    fn size(&self) -> u64;
    /// A short name for messages and metrics (`local:/path`, `tcp:host`...).
    fn name(&self) -> String;
}

/// The seed image on this node, read with `pread` (a truncated or removed
/// image gives an error, never a `SIGBUS` in the pager).
#[derive(Debug)]
pub struct LocalSource {
    file: File,
    size: u64,
    name: String,
}

impl LocalSource {
    /// Open the page store at `path`.
    pub fn open(path: &Path, size: u64) -> io::Result<LocalSource> {
        Ok(LocalSource {
            file: File::open(path)?,
            size,
            name: format!("local:{}", path.display()),
        })
    }
}

impl PageSource for LocalSource {
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if offset
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(SourceError::OutOfRange {
                offset,
                len: dst.len(),
                size: self.size,
            });
        }
        self.file
            .read_exact_at(dst, offset)
            .map_err(|error| SourceError::Read {
                source_name: self.name.clone(),
                offset,
                len: dst.len(),
                error,
            })
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// The node-local seed cache: pages fetched once from the source stay here
/// and serve every later child's faults without another fetch.
pub struct SeedCache {
    source: Box<dyn PageSource>,
    mem: Mapping,
    present: Vec<AtomicU64>,
    /// Pages fetched from the source.
    pub fetched: AtomicU64,
    /// Pages served from the cache.
    pub hits: AtomicU64,
}

impl std::fmt::Debug for SeedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedCache")
            .field("source", &self.source.name())
            .finish()
    }
}

impl SeedCache {
    /// A cache over `source`; memory is reserved, not used, until pages arrive.
    pub fn new(source: Box<dyn PageSource>) -> io::Result<SeedCache> {
        let size = source.size();
        let pages = size / PAGE_SIZE;
        let mem = Mapping::anonymous(size as usize, false)?;
        let present = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Ok(SeedCache {
            source,
            mem,
            present,
            fetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    /// The source's name.
    pub fn source_name(&self) -> String {
        self.source.name()
    }

    fn is_present(&self, page: u64) -> bool {
        self.present[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Make the pages at `offsets` present, fetching the missing ones, and
    /// return how many were fetched. Consecutive misses are fetched in one read.
    pub fn ensure(&self, offsets: &[u64]) -> Result<u64, SourceError> {
        let mut fetched = 0;
        let mut i = 0;
        while i < offsets.len() {
            let page = offsets[i] / PAGE_SIZE;
            if self.is_present(page) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            }
            // A run of missing pages that are consecutive in the store.
            let mut j = i + 1;
            while j < offsets.len()
                && offsets[j] == offsets[j - 1] + PAGE_SIZE
                && !self.is_present(offsets[j] / PAGE_SIZE)
            {
                j += 1;
            }
            let start = offsets[i];
            let len = (j - i) * PAGE_SIZE as usize;
            if start + len as u64 > self.source.size() {
                return Err(SourceError::OutOfRange {
                    offset: start,
                    len,
                    size: self.source.size(),
                });
            }
            // SAFETY: the range lies inside the cache mapping (checked just
            // above). Two threads may fetch the same page at once; both
            // write the same bytes, and readers only look after the
            // present bit is set below.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    self.mem.as_slice().as_ptr().add(start as usize).cast_mut(),
                    len,
                )
            };
            self.source.read(start, dst)?;
            for off in &offsets[i..j] {
                let p = off / PAGE_SIZE;
                self.present[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
            fetched += (j - i) as u64;
            i = j;
        }
        self.fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(fetched)
    }

    /// The cached bytes of one page (it must have been ensured).
    pub fn page(&self, offset: u64) -> &[u8] {
        &self.mem.as_slice()[offset as usize..(offset + PAGE_SIZE) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(Vec<u8>, std::sync::Mutex<Vec<(u64, usize)>>);
    impl PageSource for Counting {
        fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            self.1.lock().unwrap().push((offset, dst.len()));
            dst.copy_from_slice(&self.0[offset as usize..offset as usize + dst.len()]);
            Ok(())
        }
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn name(&self) -> String {
            "test".into()
        }
    }

    #[test]
    fn cache_fetches_once_and_batches_runs() {
        let data: Vec<u8> = (0..8 * 4096).map(|i| (i / 4096) as u8).collect();
        let src = Counting(data, Default::default());
        let cache = SeedCache::new(Box::new(src)).unwrap();
        assert_eq!(cache.ensure(&[0, 4096, 8192, 5 * 4096]).unwrap(), 4);
        assert_eq!(cache.page(8192)[0], 2);
        assert_eq!(cache.page(5 * 4096)[4095], 5);
        // Again: all hits.
        assert_eq!(cache.ensure(&[4096, 5 * 4096]).unwrap(), 0);
        assert_eq!(cache.hits.load(Ordering::Relaxed), 2);
        assert_eq!(cache.fetched.load(Ordering::Relaxed), 4);
        assert!(cache.ensure(&[8 * 4096]).is_err(), "outside the store");
    }

    #[test]
    fn local_source_reports_truncation() {
        let p = std::env::temp_dir().join(format!("rf-src-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let s = LocalSource::open(&p, 8192).unwrap();
        let mut b = vec![0u8; 4096];
        s.read(0, &mut b).unwrap();
        let e = s.read(4096, &mut b).unwrap_err();
        assert!(e.to_string().contains("local:"), "{e}");
        assert!(s.read(8192, &mut b).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
