//! The node-local seed cache in front of a seed's page source
//! ([`crate::transport::PageSource`]).

use std::io;

use std::sync::atomic::{AtomicU64, Ordering};

use kernel_helpers::mapping::{Mapping, SharedMapping};

use crate::transport::{PageSource, SourceError};
use crate::PAGE_SIZE;

/// Errors setting up a [`SeedCache`], returned inside an [`io::Error`].
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The memfds an earlier forkd handed over are smaller than this
    /// seed's cache and present bits need.
    #[error("the handed-over seed cache is smaller than this seed's")]
    HandedOverTooSmall,
}

/// Most bytes a pager thread fetches through its buffer at a time
/// ([`SeedCache::fetch_buffered`]): one fault's most
/// ([`crate::pager::MAX_FETCH_PAGES`], 2 MiB), so a fault's fetch is still
/// one request to a remote source, and the buffer stays small (one per
/// pager thread, kept). Bigger fetches (a recorded working set) go in
/// pieces of this size.
const BUFFERED_BYTES: u64 = crate::pager::MAX_FETCH_PAGES as u64 * PAGE_SIZE;

std::thread_local! {
    /// A pager thread's fetch buffer (at most [`BUFFERED_BYTES`]), kept so
    /// that its pages are not faulted in again for each fetch.
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The node-local seed cache: pages fetched once from the source stay here
/// and serve every later child's faults without another fetch.
///
/// It is a memfd laid out like the seed's lazily served address space (each
/// such mapping at its own offset, sparse where nothing was fetched), so a
/// child's anonymous mappings can map it privately: pages then stay shared
/// between all children of the seed until one writes them.
pub struct SeedCache {
    // Declared (so dropped) before `mem`: a source told to write into the
    // mapping (`attach_destination`) is gone before it is unmapped.
    source: Box<dyn PageSource>,
    memfd: std::os::fd::OwnedFd,
    /// Shared with the source (an RDMA device may write it) and mapped by
    /// children: only ever reached through raw copies or checked slices.
    mem: SharedMapping,
    /// Which cache pages hold checked bytes: a bit per page, in a memfd of
    /// its own so that it outlives this process with the cache (a forkd
    /// restart hands both to the next forkd, whose children map the cache).
    present_fd: std::os::fd::OwnedFd,
    present_map: SharedMapping,
    present_words: usize,
    /// Held by a fetch without digests (pages without chunk locks).
    unverified: std::sync::Mutex<()>,
    /// What fetched bytes are checked against, when the seed has digests.
    verify: Option<Verify>,
    /// Set at the first digest mismatch: every later read is refused.
    damaged: std::sync::Mutex<Option<String>>,
    /// Pages fetched from the source.
    pub fetched: AtomicU64,
    /// Pages served from the cache.
    pub hits: AtomicU64,
    /// Bytes hashed to verify what was fetched.
    pub verified_bytes: AtomicU64,
}

/// How a [`SeedCache`] checks what it fetches: the seed's digests, and
/// where each page of the page store lives in the cache.
#[derive(Debug)]
pub struct Verify {
    /// The seed's digests.
    pub digests: crate::image::PageDigests,
    /// Size of the page store.
    pub image_bytes: u64,
    /// Per page of the page store: its cache offset, or [`NO_SLOT`] for a
    /// page the cache does not hold (a file mapping's stored page).
    pub slots: Vec<u64>,
}

/// A seed cache's memfds: its pages, and which of them are present.
#[derive(Debug)]
pub struct CacheFds {
    /// The pages, laid out like the seed's lazily served address space.
    pub cache: std::os::fd::OwnedFd,
    /// A bit per page: present (fetched and checked).
    pub present: std::os::fd::OwnedFd,
}

/// A page of the page store with no place in the cache.
pub const NO_SLOT: u64 = u64::MAX;

/// Stripes of the per-chunk fetch locks: one fetch of a chunk at a time,
/// so no half-checked bytes ever land in a page another fetch has marked
/// present.
const FETCH_STRIPES: usize = 64;

static FETCH_LOCKS: [std::sync::Mutex<()>; FETCH_STRIPES] =
    [const { std::sync::Mutex::new(()) }; FETCH_STRIPES];

impl std::fmt::Debug for SeedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedCache")
            .field("source", &self.source.name())
            .finish()
    }
}

impl SeedCache {
    /// A cache of `size` bytes over `source`; nothing is used until pages arrive.
    /// The memfd is `slack` bytes longer than the cache (sparse, never
    /// filled): mappings of it that grow in place read zeros there, not `SIGBUS`.
    pub fn new(source: Box<dyn PageSource>, size: u64, slack: u64) -> io::Result<SeedCache> {
        Self::with_verify(source, size, slack, None)
    }

    /// [`SeedCache::new`], checking every fetched chunk against `verify`:
    /// fetches then cover whole digest chunks, and a mismatch fails the
    /// fetch and marks the seed damaged.
    pub fn with_verify(
        source: Box<dyn PageSource>,
        size: u64,
        slack: u64,
        verify: Option<Verify>,
    ) -> io::Result<SeedCache> {
        Self::build(source, size, slack, verify, None)
    }

    /// A cache over the memfds of an earlier one ([`Self::fds`]), as a
    /// forkd restart hands them over: children already map it, and the
    /// pages it marks present are kept.
    pub fn adopt(
        source: Box<dyn PageSource>,
        size: u64,
        slack: u64,
        verify: Option<Verify>,
        fds: CacheFds,
    ) -> io::Result<SeedCache> {
        Self::build(source, size, slack, verify, Some(fds))
    }

    fn build(
        source: Box<dyn PageSource>,
        size: u64,
        slack: u64,
        verify: Option<Verify>,
        adopt: Option<CacheFds>,
    ) -> io::Result<SeedCache> {
        let pages = size / PAGE_SIZE;
        let present_words = pages.div_ceil(64).max(1) as usize;
        let present_bytes = (present_words * 8).div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
        let (memfd, present_fd) = match adopt {
            Some(f) => {
                let have = |fd: &std::os::fd::OwnedFd| {
                    std::fs::File::from(fd.try_clone()?)
                        .metadata()
                        .map(|m| m.len())
                };
                if have(&f.cache)? < size || have(&f.present)? < present_bytes as u64 {
                    return Err(io::Error::other(CacheError::HandedOverTooSmall));
                }
                (f.cache, f.present)
            }
            None => (
                kernel_helpers::mapping::memfd("remotefork-seed-cache", size + slack)?,
                kernel_helpers::mapping::memfd("remotefork-seed-present", present_bytes as u64)?,
            ),
        };
        let mem = Mapping::fd_shared(&memfd, size as usize)?;
        let present_map = Mapping::fd_shared(&present_fd, present_bytes)?;
        // SAFETY: `mem` lives in the same SeedCache as `source` and is
        // dropped after it (field order), so it stays mapped and writable
        // for as long as the source lives.
        unsafe { source.attach_destination(mem.as_ptr(), mem.len()) };
        Ok(SeedCache {
            source,
            memfd,
            mem,
            present_fd,
            present_map,
            present_words,
            unverified: std::sync::Mutex::new(()),
            verify,
            damaged: std::sync::Mutex::new(None),
            fetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            verified_bytes: AtomicU64::new(0),
        })
    }

    /// Why the seed is damaged, if a fetched chunk did not match its digest.
    pub fn damaged(&self) -> Option<String> {
        self.damaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Mark the seed damaged (the first reason is kept).
    pub fn mark_damaged(&self, why: &str) {
        let mut g = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            tracing::error!(reason = why, "seed marked damaged");
            *g = Some(why.to_string());
        }
    }

    fn refuse_if_damaged(&self) -> Result<(), SourceError> {
        match self.damaged() {
            Some(why) => Err(SourceError::Damaged(why)),
            None => Ok(()),
        }
    }

    /// Does chunk `i`, read into `bytes`, match? A mismatch marks the seed
    /// damaged and is an error naming the chunk.
    fn check_chunk(&self, v: &Verify, i: usize, bytes: &[u8]) -> Result<(), SourceError> {
        self.verified_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if v.digests.check(i, bytes) {
            return Ok(());
        }
        let (start, end) = v.digests.chunk_range(i, v.image_bytes);
        let e = SourceError::Corrupt {
            source_name: self.source.name(),
            chunk: i,
            start,
            end,
        };
        self.mark_damaged(&e.to_string());
        Err(e)
    }

    /// The source's name.
    pub fn source_name(&self) -> String {
        self.source.name()
    }

    /// A path another process (a husk) can open the cache memfd by.
    pub fn memfd_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), self.memfd.as_raw_fd())
    }

    /// Size of the cache in bytes.
    pub fn size(&self) -> u64 {
        self.mem.len() as u64
    }

    /// The present bits, one per cache page (only ever accessed as
    /// atomics, by this process and by a later forkd after this one).
    fn present(&self) -> &[AtomicU64] {
        &self.present_map.atomic_u64s()[..self.present_words]
    }

    fn is_present(&self, page: u64) -> bool {
        self.present()[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn set_present(&self, page: u64) {
        self.present()[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Are all of `pages` in the cache already (installing them fetches
    /// nothing)?
    pub fn all_present<'a>(
        &self,
        pages: impl IntoIterator<Item = &'a crate::pager::table::PageRef>,
    ) -> bool {
        pages
            .into_iter()
            .all(|p| p.cache + PAGE_SIZE <= self.size() && self.is_present(p.cache / PAGE_SIZE))
    }

    /// Copies of the cache's memfds, to hand to a later forkd.
    pub fn fds(&self) -> io::Result<CacheFds> {
        Ok(CacheFds {
            cache: self.memfd.try_clone()?,
            present: self.present_fd.try_clone()?,
        })
    }

    /// Make `pages` present in the cache, fetching the missing ones, and
    /// return how many were fetched. Runs consecutive in both the store and
    /// the cache are fetched with one read.
    pub fn ensure(&self, pages: &[crate::pager::table::PageRef]) -> Result<u64, SourceError> {
        if let Some(v) = &self.verify {
            return self.ensure_verified(v, pages);
        }
        // Collect the missing runs, then fetch them all in one batch.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut hits = 0;
        let mut i = 0;
        while i < pages.len() {
            if pages[i].cache + PAGE_SIZE > self.size() {
                return Err(SourceError::OutOfRange {
                    offset: pages[i].cache,
                    len: PAGE_SIZE as usize,
                    size: self.size(),
                });
            }
            if self.is_present(pages[i].cache / PAGE_SIZE) {
                hits += 1;
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].image == pages[j - 1].image + PAGE_SIZE
                && pages[j].cache == pages[j - 1].cache + PAGE_SIZE
                && pages[j].cache + PAGE_SIZE <= self.size()
                && !self.is_present(pages[j].cache / PAGE_SIZE)
            {
                j += 1;
            }
            runs.push((i, j));
            i = j;
        }
        // One shared-counter update per call, not per page.
        self.hits.fetch_add(hits, Ordering::Relaxed);
        if runs.is_empty() {
            return Ok(0);
        }
        // One unverified fetch at a time: two threads never write the same
        // cache page, and pages another fetch made present meanwhile are
        // not fetched again.
        let _one = self.unverified.lock().unwrap_or_else(|e| e.into_inner());
        let runs: Vec<(usize, usize)> = runs
            .into_iter()
            .filter(|&(i, j)| {
                pages[i..j]
                    .iter()
                    .any(|p| !self.is_present(p.cache / PAGE_SIZE))
            })
            .collect();
        if self.source.reads_in_place() {
            let mut reqs: Vec<(u64, &mut [u8])> = runs
                .iter()
                .map(|&(i, j)| {
                    let len = (j - i) * PAGE_SIZE as usize;
                    let _ = self.mem.populate_write(pages[i].cache as usize, len);
                    // SAFETY: [cache, cache+len) lies inside the cache mapping
                    // (checked above), runs do not overlap, this thread holds
                    // the unverified-fetch lock (the only writer of pages not
                    // yet present), and no child maps a page, nor does the
                    // pager read it, before its present bit is set below.
                    let dst = unsafe { self.mem.slice_mut(pages[i].cache as usize, len) };
                    (pages[i].image, dst)
                })
                .collect();
            self.source.read_many(&mut reqs)?;
        } else {
            let spans: Vec<(u64, u64, u64)> = runs
                .iter()
                .map(|&(i, j)| (pages[i].image, pages[i].cache, (j - i) as u64 * PAGE_SIZE))
                .collect();
            self.fetch_spans_buffered(&spans)?;
        }
        let mut fetched = 0;
        for &(i, j) in &runs {
            for p in &pages[i..j] {
                self.set_present(p.cache / PAGE_SIZE);
            }
            fetched += (j - i) as u64;
        }
        self.fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(fetched)
    }

    /// [`Self::ensure`] for a seed with digests: the whole chunks holding
    /// the missing pages are fetched (in one batch), checked, and put in
    /// the cache; a chunk whose pages are consecutive in the cache and all
    /// missing is read straight into it, others through a buffer.
    fn ensure_verified(
        &self,
        v: &Verify,
        pages: &[crate::pager::table::PageRef],
    ) -> Result<u64, SourceError> {
        let cb = v.digests.chunk_bytes as u64;
        let mut chunks: Vec<usize> = Vec::new();
        let mut hits = 0;
        for p in pages {
            if p.cache + PAGE_SIZE > self.size() || p.image + PAGE_SIZE > v.image_bytes {
                return Err(SourceError::OutOfRange {
                    offset: p.cache.max(p.image),
                    len: PAGE_SIZE as usize,
                    size: self.size(),
                });
            }
            if self.is_present(p.cache / PAGE_SIZE) {
                hits += 1;
            } else {
                chunks.push((p.image / cb) as usize);
            }
        }
        self.hits.fetch_add(hits, Ordering::Relaxed);
        // What the caller asked for and the cache lacked (the chunks bring
        // more; the metric counts those too).
        let misses = chunks.len() as u64;
        if chunks.is_empty() {
            return Ok(0);
        }
        self.refuse_if_damaged()?;
        chunks.sort_unstable();
        chunks.dedup();
        let mut stripes: Vec<usize> = chunks.iter().map(|c| c % FETCH_STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        // In stripe order: two batches never wait for each other in a cycle.
        let _held: Vec<_> = stripes
            .iter()
            .map(|&s| FETCH_LOCKS[s].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        // Fetched by another batch while this one waited?
        chunks.retain(|&c| {
            self.chunk_pages(v, c)
                .any(|(_, slot)| slot != NO_SLOT && !self.is_present(slot / PAGE_SIZE))
        });
        if chunks.is_empty() {
            return Ok(misses);
        }
        let fetched = if self.source.reads_in_place() {
            self.fetch_in_place(v, &chunks)?
        } else {
            self.fetch_buffered(v, &chunks)?
        };
        self.fetched.fetch_add(fetched, Ordering::Relaxed);
        Ok(misses)
    }

    /// Fetch `chunks` (missing, under their fetch locks) for a source that
    /// reads in place ([`PageSource::reads_in_place`]): a chunk whose pages
    /// are consecutive in the cache and all missing is read straight into
    /// it, others through a buffer. The pages put in the cache.
    fn fetch_in_place(&self, v: &Verify, chunks: &[usize]) -> Result<u64, SourceError> {
        let direct: Vec<bool> = chunks
            .iter()
            .map(|&c| {
                let mut expect = None;
                self.chunk_pages(v, c).all(|(_, slot)| {
                    let ok = slot != NO_SLOT
                        && !self.is_present(slot / PAGE_SIZE)
                        && expect.is_none_or(|e| e == slot);
                    expect = Some(slot.wrapping_add(PAGE_SIZE));
                    ok
                })
            })
            .collect();
        let scratch_len: u64 = chunks
            .iter()
            .zip(&direct)
            .filter(|(_, d)| !**d)
            .map(|(&c, _)| {
                let (a, b) = v.digests.chunk_range(c, v.image_bytes);
                b - a
            })
            .sum();
        let mut scratch = vec![0u8; scratch_len as usize];
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(chunks.len());
        let mut rest: &mut [u8] = &mut scratch;
        for (&c, &d) in chunks.iter().zip(&direct) {
            let (a, b) = v.digests.chunk_range(c, v.image_bytes);
            let len = (b - a) as usize;
            if d {
                let first = self.chunk_pages(v, c).next().map(|(_, s)| s).unwrap_or(0);
                // Its pages allocated in one call, not a fault each (if that
                // fails, the read below faults them in as before).
                let _ = self.mem.populate_write(first as usize, len);
                // SAFETY: the chunk's pages are consecutive cache pages inside
                // the mapping (checked by ensure's range checks and `direct`),
                // none is present (so no child maps them), and this batch
                // holds the chunk's fetch lock: nothing else writes them.
                let dst = unsafe { self.mem.slice_mut(first as usize, len) };
                reqs.push((a, dst));
            } else {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
                reqs.push((a, mine));
                rest = tail;
            }
        }
        self.source.read_many(&mut reqs)?;
        let mut fetched = 0;
        for ((&c, &d), (_, bytes)) in chunks.iter().zip(&direct).zip(reqs.iter()) {
            self.check_chunk(v, c, bytes)?;
            for (k, (_, slot)) in self.chunk_pages(v, c).enumerate() {
                if slot == NO_SLOT || self.is_present(slot / PAGE_SIZE) {
                    continue;
                }
                if !d {
                    let from = &bytes[k * PAGE_SIZE as usize..(k + 1) * PAGE_SIZE as usize];
                    // `slot` is a cache page inside the mapping (the slots
                    // were laid out with the cache), not present (no child
                    // maps it) and under this batch's fetch lock.
                    let copied = self.mem.write_at(slot as usize, from);
                    debug_assert!(copied, "cache slot {slot:#x} outside the cache");
                }
                self.set_present(slot / PAGE_SIZE);
                fetched += 1;
            }
        }
        Ok(fetched)
    }

    /// Fetch `chunks` (missing, under their fetch locks) through this
    /// thread's buffer, [`BUFFERED_BYTES`] at a time: each chunk is read,
    /// checked while its bytes are fresh in the CPU cache, and written into
    /// the cache memfd with `pwrite`, a run of consecutive cache pages a
    /// call. The kernel allocates each page for the write and copies into
    /// it; no page is zero-filled first or mapped in this process, as a
    /// read into the mapping needs (docs/DECISIONS.md, "A cold fetch writes
    /// the cache's memfd"). The pages put in the cache.
    fn fetch_buffered(&self, v: &Verify, chunks: &[usize]) -> Result<u64, SourceError> {
        let pieces: Vec<(u64, u64)> = chunks
            .iter()
            .map(|&c| {
                let (a, b) = v.digests.chunk_range(c, v.image_bytes);
                (a, b - a)
            })
            .collect();
        let mut fetched = 0;
        self.read_buffered(&pieces, |i, bytes| {
            self.check_chunk(v, chunks[i], bytes)?;
            fetched += self.install_chunk(v, chunks[i], bytes)?;
            Ok(())
        })?;
        Ok(fetched)
    }

    /// Read `pieces` (store offset, length; each at most
    /// [`BUFFERED_BYTES`]) through this thread's buffer, as many as fit in
    /// one batch from the source, and hand each piece's bytes to `each`
    /// with its index.
    fn read_buffered(
        &self,
        pieces: &[(u64, u64)],
        mut each: impl FnMut(usize, &[u8]) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        let mut i = 0;
        while i < pieces.len() {
            // As many pieces as fit the buffer (at least one).
            let mut j = i;
            let mut need = 0u64;
            while j < pieces.len() && (j == i || need + pieces[j].1 <= BUFFERED_BYTES) {
                need += pieces[j].1;
                j += 1;
            }
            BUFFER.with(|buf| -> Result<(), SourceError> {
                let mut buf = buf.borrow_mut();
                if buf.len() < need as usize {
                    buf.resize(need as usize, 0);
                }
                let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(j - i);
                let mut rest: &mut [u8] = &mut buf[..need as usize];
                for &(offset, len) in &pieces[i..j] {
                    let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
                    reqs.push((offset, mine));
                    rest = tail;
                }
                self.source.read_many(&mut reqs)?;
                for (k, (_, bytes)) in reqs.iter().enumerate() {
                    each(i + k, bytes)?;
                }
                Ok(())
            })?;
            i = j;
        }
        Ok(())
    }

    /// Write chunk `c`'s checked `bytes` into the cache memfd where its
    /// pages are missing (a `pwrite` a run of consecutive cache pages) and
    /// mark them present. The caller holds the chunk's fetch lock.
    fn install_chunk(&self, v: &Verify, c: usize, bytes: &[u8]) -> Result<u64, SourceError> {
        let page = PAGE_SIZE as usize;
        let mut run: Option<(usize, u64, usize)> = None; // (first k, first slot, pages)
        let mut fetched = 0;
        let flush = |run: &mut Option<(usize, u64, usize)>| -> Result<(), SourceError> {
            if let Some((k, slot, n)) = run.take() {
                self.write_memfd(slot, &bytes[k * page..(k + n) * page])?;
                for p in 0..n as u64 {
                    self.set_present(slot / PAGE_SIZE + p);
                }
            }
            Ok(())
        };
        for (k, (_, slot)) in self.chunk_pages(v, c).enumerate() {
            if slot == NO_SLOT || self.is_present(slot / PAGE_SIZE) {
                flush(&mut run)?;
                continue;
            }
            fetched += 1;
            match &mut run {
                Some((k0, s0, n)) if *s0 + (*n as u64) * PAGE_SIZE == slot && *k0 + *n == k => {
                    *n += 1
                }
                _ => {
                    flush(&mut run)?;
                    run = Some((k, slot, 1));
                }
            }
        }
        flush(&mut run)?;
        Ok(fetched)
    }

    /// Fetch `spans` (store offset, cache offset, length; the caller holds
    /// the unverified-fetch lock) through this thread's buffer, as
    /// [`Self::fetch_buffered`] does for checked chunks: read a buffer's
    /// worth in one batch, then `pwrite` each piece into the cache memfd.
    fn fetch_spans_buffered(&self, spans: &[(u64, u64, u64)]) -> Result<(), SourceError> {
        // Cut into pieces of at most BUFFERED_BYTES: (store, length), and
        // where each goes in the cache.
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut to: Vec<u64> = Vec::new();
        for &(image, cache, len) in spans {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(BUFFERED_BYTES);
                pieces.push((image + done, n));
                to.push(cache + done);
                done += n;
            }
        }
        self.read_buffered(&pieces, |i, bytes| self.write_memfd(to[i], bytes))
    }

    /// `pwrite` all of `bytes` into the cache memfd at `offset`.
    fn write_memfd(&self, offset: u64, mut bytes: &[u8]) -> Result<(), SourceError> {
        use std::os::fd::AsRawFd;
        let mut at = offset;
        while !bytes.is_empty() {
            // SAFETY: a write of `bytes` (a live slice, its length) into
            // the cache memfd this cache owns; the kernel reads only them.
            let n = unsafe {
                libc::pwrite(
                    self.memfd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    at as libc::off_t,
                )
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SourceError::Read {
                    source_name: format!("the node cache (writing {:#x})", at),
                    offset: at,
                    len: bytes.len(),
                    error,
                });
            }
            if n == 0 {
                return Err(SourceError::Read {
                    source_name: format!("the node cache (writing {:#x})", at),
                    offset: at,
                    len: bytes.len(),
                    error: io::Error::from(io::ErrorKind::WriteZero),
                });
            }
            bytes = &bytes[n as usize..];
            at += n as u64;
        }
        Ok(())
    }

    /// The pages of chunk `c`: (store offset, cache slot).
    fn chunk_pages<'a>(&'a self, v: &'a Verify, c: usize) -> impl Iterator<Item = (u64, u64)> + 'a {
        let (a, b) = v.digests.chunk_range(c, v.image_bytes);
        (a / PAGE_SIZE..b.div_ceil(PAGE_SIZE)).map(move |p| {
            let slot = v.slots.get(p as usize).copied().unwrap_or(NO_SLOT);
            let slot = if slot != NO_SLOT && slot + PAGE_SIZE <= self.size() {
                slot
            } else {
                NO_SLOT
            };
            (p * PAGE_SIZE, slot)
        })
    }

    /// Requests the source has sent to the seed's node.
    pub fn round_trips(&self) -> u64 {
        self.source.round_trips()
    }

    /// Read ranges of the page store straight from the source (not
    /// cached), checked against the seed's digests when it has them (whole
    /// chunks are read and checked, then the ranges copied out).
    pub fn read_through(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        let Some(v) = &self.verify else {
            return self.source.read_many(reqs);
        };
        self.refuse_if_damaged()?;
        let cb = v.digests.chunk_bytes as u64;
        let mut chunks: Vec<usize> = Vec::new();
        for (off, buf) in reqs.iter() {
            let end = off + buf.len() as u64;
            if end > v.image_bytes {
                return Err(SourceError::OutOfRange {
                    offset: *off,
                    len: buf.len(),
                    size: v.image_bytes,
                });
            }
            if !buf.is_empty() {
                chunks.extend((off / cb) as usize..=((end - 1) / cb) as usize);
            }
        }
        chunks.sort_unstable();
        chunks.dedup();
        let ranges: Vec<(u64, u64)> = chunks
            .iter()
            .map(|&c| v.digests.chunk_range(c, v.image_bytes))
            .collect();
        let total: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        let mut scratch = vec![0u8; total as usize];
        {
            let mut creqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(chunks.len());
            let mut rest: &mut [u8] = &mut scratch;
            for &(a, b) in &ranges {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut((b - a) as usize);
                creqs.push((a, mine));
                rest = tail;
            }
            self.source.read_many(&mut creqs)?;
        }
        let mut at = 0usize;
        let mut placed: Vec<(u64, usize)> = Vec::with_capacity(chunks.len());
        for (&c, &(a, b)) in chunks.iter().zip(&ranges) {
            self.check_chunk(v, c, &scratch[at..at + (b - a) as usize])?;
            placed.push((a, at));
            at += (b - a) as usize;
        }
        for (off, buf) in reqs.iter_mut() {
            let c = (*off / cb) as usize;
            let i = chunks.binary_search(&c).unwrap_or(0);
            let (a, s) = placed[i];
            // Chunks of one request are consecutive in `scratch`, as in the store.
            let from = s + (*off - a) as usize;
            buf.copy_from_slice(&scratch[from..from + buf.len()]);
        }
        Ok(())
    }

    /// The cached bytes of the page at `cache` offset, which must be
    /// present (ensured); panics if it is not.
    pub fn page(&self, cache: u64) -> &[u8] {
        self.pages(cache, PAGE_SIZE)
    }

    /// The cached bytes of the `len / PAGE_SIZE` consecutive pages from
    /// `cache` offset, which must all be present; panics if one is not.
    pub fn pages(&self, cache: u64, len: u64) -> &[u8] {
        for p in (cache..cache + len).step_by(PAGE_SIZE as usize) {
            assert!(
                self.is_present(p / PAGE_SIZE),
                "page at cache offset {p:#x} read before it was fetched"
            );
        }
        // SAFETY: a present page is written once, before its present bit is
        // set (Release; read here with Acquire), and never again: fetches
        // write only pages not yet present. Children map the memfd
        // privately, so their writes never reach it.
        unsafe { self.mem.slice(cache as usize, len as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reads a test source was asked for: (offset, length).
    type ReadLog = std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>;

    /// A page store in memory that logs each read.
    struct Counting(Vec<u8>, ReadLog);
    impl PageSource for Counting {
        fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            if offset as usize + dst.len() > self.0.len() {
                return Err(SourceError::OutOfRange {
                    offset,
                    len: dst.len(),
                    size: self.0.len() as u64,
                });
            }
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

    fn r(image: u64, cache: u64) -> crate::pager::table::PageRef {
        crate::pager::table::PageRef {
            image: image * 4096,
            cache: cache * 4096,
        }
    }

    #[test]
    fn cache_fetches_once_and_batches_runs() {
        let data: Vec<u8> = (0..8 * 4096).map(|i| (i / 4096) as u8).collect();
        let src = Counting(data, Default::default());
        let cache = SeedCache::new(Box::new(src), 16 * 4096, 0).unwrap();
        // Pages 0-2 of the store land at cache pages 10-12, page 5 at 3.
        assert_eq!(
            cache
                .ensure(&[r(0, 10), r(1, 11), r(2, 12), r(5, 3)])
                .unwrap(),
            4
        );
        assert_eq!(cache.page(12 * 4096)[0], 2);
        assert_eq!(cache.page(3 * 4096)[4095], 5);
        // Again: all hits.
        assert_eq!(cache.ensure(&[r(1, 11), r(5, 3)]).unwrap(), 0);
        assert_eq!(cache.hits.load(Ordering::Relaxed), 2);
        assert_eq!(cache.fetched.load(Ordering::Relaxed), 4);
        assert!(cache.ensure(&[r(0, 16)]).is_err(), "outside the cache");
        assert!(cache.ensure(&[r(8, 0)]).is_err(), "outside the store");
        assert!(cache.memfd_path().starts_with("/proc/"));
    }

    /// A cache checking a store of 48 pages in 3 digest chunks of 16 pages
    /// (page `i` filled with `i`) read from a source that serves byte
    /// `flip` flipped, and logs each read.
    fn verified(flip: Option<usize>, slots: Vec<u64>) -> (SeedCache, ReadLog) {
        let pages = 48u64;
        let data: Vec<u8> = (0..pages * 4096).map(|i| (i / 4096) as u8).collect();
        let digests = crate::image::PageDigests {
            chunk_bytes: 16 * 4096,
            xxh3: data
                .chunks(16 * 4096)
                .map(crate::image::PageDigests::digest)
                .collect(),
        };
        let mut served = data;
        if let Some(b) = flip {
            served[b] ^= 0x40;
        }
        let log = ReadLog::default();
        let verify = Verify {
            digests,
            image_bytes: pages * 4096,
            slots,
        };
        let cache = SeedCache::with_verify(
            Box::new(Counting(served, log.clone())),
            64 * 4096,
            0,
            Some(verify),
        )
        .unwrap();
        (cache, log)
    }

    #[test]
    fn a_checked_fetch_writes_whole_chunks_through_the_buffer_where_their_pages_go() {
        // Store pages 0..48 at cache pages 63-i (reversed: no two neighbours
        // consecutive), but store page 20 has no slot (a file page).
        let slots: Vec<u64> = (0..48u64)
            .map(|i| if i == 20 { NO_SLOT } else { (63 - i) * 4096 })
            .collect();
        let (cache, log) = verified(None, slots);
        // Pages 3 and 18 (chunks 0 and 1): both whole chunks come, in one
        // batch, and every slotted page of them is in place.
        assert_eq!(cache.ensure(&[r(3, 60), r(18, 45)]).unwrap(), 2);
        assert_eq!(
            *log.lock().unwrap(),
            vec![(0, 16 * 4096), (16 * 4096, 16 * 4096)]
        );
        for i in (0..32u64).filter(|&i| i != 20) {
            let p = cache.page((63 - i) * 4096);
            assert!(p.iter().all(|&b| b == i as u8), "store page {i}");
        }
        assert_eq!(cache.fetched.load(Ordering::Relaxed), 31);
        // Chunk 1 again: all present, nothing read.
        assert_eq!(cache.ensure(&[r(17, 46)]).unwrap(), 0);
        assert_eq!(log.lock().unwrap().len(), 2);
        assert!(cache.damaged().is_none());
    }

    #[test]
    fn a_flipped_byte_in_a_checked_fetch_puts_nothing_in_the_cache_and_damages_it() {
        let slots: Vec<u64> = (0..48u64).map(|i| i * 4096).collect();
        // A byte of store page 37 (chunk 2) flipped by the source.
        let (cache, _) = verified(Some(37 * 4096 + 5), slots);
        assert_eq!(cache.ensure(&[r(1, 1)]).unwrap(), 1);
        let e = cache.ensure(&[r(36, 36)]).unwrap_err();
        assert!(cache.damaged().is_some(), "{e}");
        // Chunk 2 is not present: nothing of it reached a child.
        assert!(!cache.is_present(36));
        assert!(!cache.is_present(37));
        assert!(cache.is_present(1));
        // And every later fetch is refused.
        assert!(cache.ensure(&[r(20, 20)]).is_err());
    }
}
