//! The pager: serves lazily restored children's page faults.
//!
//! A small pool of threads, each with one epoll over many children's
//! userfaultfds (and their pidfds, to notice exits). Each child has a
//! page table keyed by its current addresses. A fault on a stored
//! page is served from the node-local [`cache::SeedCache`] (fetching from
//! the [`crate::transport::PageSource`] on a miss), with a prefetch window or the
//! seed's recorded working set; a fault on a zero page gets
//! `UFFDIO_ZEROPAGE`. `EVENT_REMOVE`, `EVENT_UNMAP`, `EVENT_REMAP` and
//! `EVENT_FORK` keep the table true to the child's address space.
//!
//! A child is never left running on wrong memory: a page that cannot be
//! fetched gets the child killed (`SIGKILL`, or `SIGBUS` via `UFFDIO_POISON`
//! for a forked grandchild whose pid the event does not give), and the
//! reason is kept in its [`ChildStats`].

pub mod cache;
mod fault_fd;
pub(crate) mod table;
/// A page of a seed (where it lies in the page store, its digest), as
/// [`cache::SeedCache::ensure`] takes them.
pub use table::PageRef;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kernel_helpers::uffd::{Epoll, FillError, Msg, Uffd};
use tracing::{debug, warn};

use crate::PAGE_SIZE;
use cache::SeedCache;
use fault_fd::FaultFd;
use table::{Fill, Origin, PageTable, Slot};

/// Pages copied per fault in window mode (the fault plus the next ones).
pub const WINDOW_PAGES: usize = 16;

/// Largest window a sequential reader's faults grow to (32 MiB): beyond
/// [`MAX_FETCH_PAGES`], only pages already in the node cache (mapping them
/// is cheap; a fault each is not).
pub const MAX_WINDOW_PAGES: usize = 8192;

/// The most pages one fault fetches from the page source (2 MiB), and the
/// most its thread waits for.
pub const MAX_FETCH_PAGES: usize = 512;

/// How faults pull in more than the faulting page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Prefetch {
    /// Only the faulting page.
    Off,
    /// The faulting page and up to [`WINDOW_PAGES`] - 1 following stored pages.
    Window,
    /// At the first fault, every page of the seed's recorded working set;
    /// then as `Window`.
    Recorded,
}

/// A prefetch mode's name is not one of `off`, `window`, `recorded`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prefetch mode {0:?} (off, window, recorded)")]
pub struct UnknownPrefetch(pub String);

impl std::str::FromStr for Prefetch {
    type Err = UnknownPrefetch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Prefetch::Off),
            "window" => Ok(Prefetch::Window),
            "recorded" => Ok(Prefetch::Recorded),
            other => Err(UnknownPrefetch(other.to_string())),
        }
    }
}

/// Why the pager could not serve a child (it is killed with this reason).
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// Its userfaultfd could not be read.
    #[error("reading its userfaultfd: {0}")]
    Events(std::io::Error),
    /// Pages could not be fetched: the source's error, then the child's
    /// page(s).
    #[error("{source} (the child's page {addr:#x})")]
    Fetch {
        /// What the source said.
        source: crate::transport::SourceError,
        /// The child's page.
        addr: u64,
    },
    /// As [`PagerError::Fetch`], for a run of pages.
    #[error("{source} (the child's {pages} pages from {addr:#x})")]
    FetchRun {
        /// What the source said.
        source: crate::transport::SourceError,
        /// The first of the child's pages.
        addr: u64,
        /// How many.
        pages: usize,
    },
    /// `UFFDIO_COPY` or `UFFDIO_CONTINUE` failed.
    #[error("filling {addr:#x}: {error}")]
    Fill {
        /// The child's page.
        addr: u64,
        /// The kernel's error.
        error: std::io::Error,
    },
    /// `UFFDIO_ZEROPAGE` failed.
    #[error("UFFDIO_ZEROPAGE at {addr:#x}: {error}")]
    ZeroPage {
        /// The child's page.
        addr: u64,
        /// The kernel's error.
        error: std::io::Error,
    },
    /// Serving it panicked (a bug in the pager).
    #[error("the pager failed serving it (a bug: {0})")]
    Panicked(String),
    /// The child's address space never settled.
    #[error("the address space kept changing; gave up after retrying for {} s", CHANGING_GIVE_UP.as_secs())]
    KeptChanging,
}

/// Metrics of one seed on this node.
#[derive(Debug, Default)]
pub struct SeedMetrics {
    /// Faults served.
    pub faults: AtomicU64,
    /// Pages installed into children.
    pub pages_installed: AtomicU64,
    /// Pages of the written set copied into children before they ran.
    pub pages_copied_ahead: AtomicU64,
    /// Pages of the working set spares read before their spawn (their
    /// page-table entries marked accessed).
    pub pages_touched_ahead: AtomicU64,
    /// Fault service time histogram: bucket `i` counts faults of < 2^i µs.
    pub fault_latency_us_log2: [AtomicU64; 24],
}

/// One seed's pages on this node, shared by all its children.
pub struct SeedPages {
    /// The node-local cache in front of the seed's page source.
    pub cache: SeedCache,
    /// Told about every grandchild forked in a child of this seed, and
    /// every spawned lazy child as it starts.
    pub fork_sink: Mutex<Option<ForkSink>>,
    working_set: Mutex<Option<Arc<Vec<u64>>>>,
    working_set_file: Option<PathBuf>,
    /// Pages of the cache-mapped memory the first child wrote (copied on
    /// write) while it ran, sampled: what every child will write too.
    written_set: Mutex<Option<Arc<Vec<u64>>>>,
    /// A child is recording the sets. One at a time: sampling a child's
    /// written pages reads its whole page map every 10-250 ms, and with every
    /// child of a seed recording (a gateway's long-lived instances, none
    /// ending to give the seed its sets) the pager threads did little else
    /// while faults waited.
    recording: AtomicBool,
    /// The seed's private writable mappings that are not served lazily
    /// (a library's data, memory restored before the child runs): a
    /// template's children share their pages with it until they write
    /// them, so a recording template child's written set covers them too.
    private_regions: std::sync::OnceLock<Vec<(u64, u64)>>,
    /// Metrics.
    pub metrics: SeedMetrics,
}

/// The shortest and longest period of a recording child's written-page
/// samples (the period is ten times a sample's cost, within these).
const SAMPLE_MIN: Duration = Duration::from_millis(10);
/// The least time between samples of a recording child that has answered.
const SAMPLE_ENDING: Duration = Duration::from_millis(1);
const SAMPLE_MAX: Duration = Duration::from_millis(250);
/// What a recording child writes after its last output (its exit) joins
/// the seed's written set only if it is at most this fraction of what it
/// wrote before (see [`ChildState::written_set`]).
const EXIT_WRITES_KEPT: f64 = 0.5;

/// Name of the written set beside the working set file.
const WRITTEN_SET_EXT: &str = "written";

/// How long a page may keep failing with `EAGAIN` (the address space
/// changing under it) before its child is killed: far beyond any real
/// burst of `munmap`s or thread exits, only a livelock lasts this long.
const CHANGING_GIVE_UP: Duration = Duration::from_secs(60);

fn read_addrs(p: &std::path::Path) -> Option<Arc<Vec<u64>>> {
    std::fs::read(p).ok().map(|b| {
        Arc::new(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect::<Vec<u64>>(),
        )
    })
}

fn save_addrs(p: &std::path::Path, pages: &[u64]) {
    let bytes: Vec<u8> = pages.iter().flat_map(|a| a.to_le_bytes()).collect();
    let tmp = p.with_extension("tmp");
    if crate::private_fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, p))
        .is_err()
    {
        warn!(file = %p.display(), "cannot save a recorded page set");
    }
}

impl std::fmt::Debug for SeedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedPages")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl SeedPages {
    /// Tell the fork sink, if there is one, that the spawned lazy child
    /// `pid`, served over `uffd`, is about to run. Whether it was told.
    pub(crate) fn announce_starting(&self, pid: i32, uffd: &OwnedFd) -> bool {
        let Some(sink) = self.fork_sink.lock().ok().and_then(|s| s.clone()) else {
            return false;
        };
        match (kernel_helpers::uffd::pidfd_open(pid), uffd.try_clone()) {
            (Ok(pidfd), Ok(uffd)) => {
                sink(ForkEvent::Starting { pid, pidfd, uffd });
                true
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!(pid, error = %e, "cannot tell the fork sink a child is starting");
                false
            }
        }
    }

    /// Tell the fork sink that `pid`, told as starting, did not start.
    pub(crate) fn announce_not_started(&self, pid: i32) {
        if let Some(sink) = self.fork_sink.lock().ok().and_then(|s| s.clone()) {
            sink(ForkEvent::NotStarted { pid });
        }
    }

    /// A seed served from `cache`, its working set kept in `working_set_file`.
    pub fn new(cache: SeedCache, working_set_file: Option<PathBuf>) -> SeedPages {
        let ws = working_set_file.as_deref().and_then(read_addrs);
        let written = working_set_file
            .as_ref()
            .and_then(|p| read_addrs(&p.with_extension(WRITTEN_SET_EXT)));
        SeedPages {
            cache,
            fork_sink: Mutex::new(None),
            working_set: Mutex::new(ws),
            working_set_file,
            written_set: Mutex::new(written),
            recording: AtomicBool::new(false),
            private_regions: Default::default(),
            metrics: SeedMetrics::default(),
        }
    }

    /// Set the seed's private writable mappings that are not served
    /// lazily, as (start, length) (see `private_regions`); once.
    pub(crate) fn set_private_regions(&self, regions: Vec<(u64, u64)>) {
        let _ = self.private_regions.set(regions);
    }

    /// See [`SeedPages::set_private_regions`].
    pub(crate) fn private_regions(&self) -> &[(u64, u64)] {
        self.private_regions.get().map_or(&[], |v| v.as_slice())
    }

    /// May a new child record the sets? Yes if they are not recorded yet
    /// and no other child is recording them; it then is, until
    /// [`SeedPages::recorded`].
    fn claim_recording(&self) -> bool {
        self.working_set().is_none() && !self.recording.swap(true, Ordering::AcqRel)
    }

    /// The recording child is done (it ended, whether or not its sets
    /// were kept): another may record.
    fn recorded(&self) {
        self.recording.store(false, Ordering::Release);
    }

    /// The pages the first child wrote, if recorded (sorted addresses).
    pub fn written_set(&self) -> Option<Arc<Vec<u64>>> {
        self.written_set.lock().ok().and_then(|g| g.clone())
    }

    fn record_written_set(&self, mut pages: Vec<u64>) {
        let Ok(mut g) = self.written_set.lock() else {
            return;
        };
        if g.is_some() || pages.is_empty() {
            return;
        }
        pages.sort_unstable();
        if let Some(p) = &self.working_set_file {
            save_addrs(&p.with_extension(WRITTEN_SET_EXT), &pages);
        }
        debug!(pages = pages.len(), "written set recorded");
        *g = Some(Arc::new(pages));
    }

    /// The recorded working set (page addresses in first-touch order), if any.
    pub fn working_set(&self) -> Option<Arc<Vec<u64>>> {
        self.working_set.lock().ok().and_then(|g| g.clone())
    }

    fn record_working_set(&self, pages: Vec<u64>) {
        let Ok(mut g) = self.working_set.lock() else {
            return;
        };
        if g.is_some() || pages.is_empty() {
            return;
        }
        if let Some(p) = &self.working_set_file {
            save_addrs(p, &pages);
        }
        debug!(pages = pages.len(), "working set recorded");
        *g = Some(Arc::new(pages));
    }
}

/// What the pager did for one child.
#[derive(Debug, Default)]
pub struct ChildStats {
    /// Page faults served.
    pub faults: AtomicU64,
    /// Pages installed (faulted, in windows, or from the working set).
    pub pages_installed: AtomicU64,
    /// Of those, pages fetched from the source (cache misses).
    pub pages_fetched: AtomicU64,
    /// Of those, pages served from the node-local cache.
    pub pages_from_cache: AtomicU64,
    /// Zero pages installed.
    pub zero_pages: AtomicU64,
    /// Pages installed from the recorded working set at the first fault.
    pub prefetched: AtomicU64,
    /// Address-space events handled (fork, remap, remove, unmap).
    pub events: AtomicU64,
    /// Set when the child was killed because a page could not be served.
    pub killed: Mutex<Option<String>>,
    /// The child has exited and the pager let go of it.
    pub finished: AtomicBool,
    /// Output relayed from it so far ([`ChildStats::note_output`]).
    pub outputs: AtomicU64,
    /// Woken once the pager lets go of the child ([`ChildStats::on_finished`]).
    finish_waker: Mutex<Option<std::task::Waker>>,
    /// Set by the pager for a recording child: written to at each output,
    /// so the pager samples what it wrote before its answer at once.
    output_waker: std::sync::OnceLock<Arc<OwnedFd>>,
}

impl ChildStats {
    /// Wait up to `timeout` for the pager to let go of the child (after it
    /// exits), so the figures are final; false if it has not.
    pub fn wait_finished(&self, timeout: std::time::Duration) -> bool {
        let t = Instant::now();
        while !self.finished.load(Ordering::Acquire) {
            if t.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Has the pager let go of the child? If not, `waker` is woken when it
    /// does: an async caller waits for the final figures without polling.
    pub fn on_finished(&self, waker: &std::task::Waker) -> bool {
        let mut w = self.finish_waker.lock().unwrap_or_else(|e| e.into_inner());
        if self.finished.load(Ordering::Acquire) {
            return true;
        }
        *w = Some(waker.clone());
        false
    }

    /// The pager let go of the child: its figures are final.
    fn set_finished(&self) {
        let w = {
            let mut w = self.finish_waker.lock().unwrap_or_else(|e| e.into_inner());
            self.finished.store(true, Ordering::Release);
            w.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// The reason the child was killed, if it was.
    pub fn killed_reason(&self) -> Option<String> {
        self.killed.lock().ok().and_then(|g| g.clone())
    }

    /// The child wrote output (its relay read a chunk). A recording child's
    /// written set is what it wrote up to its last output: not what its
    /// exit writes after its answer (an interpreter's teardown writes
    /// every object), which no later child should get copied ahead.
    pub fn note_output(&self) {
        self.outputs.fetch_add(1, Ordering::Release);
        if let Some(w) = self.output_waker.get() {
            // SAFETY: a one-byte write from a live buffer to a descriptor
            // we hold; non-blocking, so a full pipe (the pager has wakes
            // queued already) only drops this byte.
            unsafe { libc::write(w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }
}

/// A child handed to the pager. `F` is its userfaultfd's type: a
/// [`Uffd`] but in the pager's unit tests.
pub struct LazyChild<F = Uffd> {
    /// Its pid (None for a forked grandchild until the pager finds it).
    pub pid: Option<i32>,
    /// A forked grandchild's: the pid of the process that forked it.
    pub parent_pid: Option<i32>,
    /// Its userfaultfd, set up and registered.
    pub uffd: F,
    /// Its pidfd, to notice its exit.
    pub pidfd: Option<OwnedFd>,
    /// Its pages.
    pub table: PageTable,
    /// Its seed.
    pub seed: Arc<SeedPages>,
    /// Prefetch mode.
    pub prefetch: Prefetch,
    /// Shared statistics.
    pub stats: Arc<ChildStats>,
    /// A node template's: the children it forks are sent here (to be given
    /// their pid and handed back with [`Pager::add`]) instead of being
    /// served at once as anonymous grandchildren.
    pub on_fork: Option<Sender<LazyChild>>,
    /// Where its address-space events are written down (see [`Journal`]).
    pub journal: Option<Journal>,
    /// A forked grandchild's number in [`ForkEvent`]s.
    pub fork_id: Option<u64>,
    /// The regions its table was built with, before any event: (start,
    /// length, filled from the cache). With the journal, what rebuilds it.
    pub initial: Arc<Vec<(u64, u64, bool)>>,
}

/// A child's address-space events (remove, unmap, remap), appended as the
/// pager handles them, so that a later forkd, handed the child's
/// userfaultfd after a restart, rebuilds its page table exactly: the table
/// built from the seed, then these events in order. A forked grandchild's
/// journal starts as a copy of its parent's.
#[derive(Debug)]
pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
}

/// Bytes of one journal record: a tag and three words.
const JOURNAL_RECORD: usize = 25;

impl Journal {
    /// A new, empty journal at `path`.
    pub fn create(path: PathBuf) -> std::io::Result<Journal> {
        let file = crate::private_fs::create(&path)?;
        Ok(Journal { file, path })
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn record(&mut self, tag: u8, a: u64, b: u64, c: u64) {
        let mut r = [0u8; JOURNAL_RECORD];
        r[0] = tag;
        r[1..9].copy_from_slice(&a.to_le_bytes());
        r[9..17].copy_from_slice(&b.to_le_bytes());
        r[17..25].copy_from_slice(&c.to_le_bytes());
        // One write: a record is all there or not at all.
        if let Err(e) = self.file.write_all(&r) {
            warn!(journal = %self.path.display(), error = %e, "cannot write down a child's address-space event; a restart of forkd will not hand it over");
        }
    }

    /// The journal at `path`, to write on (after a [`Journal::replay`]).
    pub fn reopen(path: PathBuf) -> std::io::Result<Journal> {
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Journal { file, path })
    }

    /// A copy of this journal at `path`, for a child forked now.
    fn fork(&self, path: PathBuf) -> std::io::Result<Journal> {
        std::fs::copy(&self.path, &path)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Journal { file, path })
    }

    /// Apply the journal at `path` to `table`, in order.
    pub fn replay(path: &std::path::Path, table: &mut PageTable) -> std::io::Result<u64> {
        let bytes = std::fs::read(path)?;
        let w = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        let mut n = 0;
        for r in bytes.chunks_exact(JOURNAL_RECORD) {
            let (a, b, c) = (w(&r[1..9]), w(&r[9..17]), w(&r[17..25]));
            match r[0] {
                b'R' => table.remove(a, b),
                b'U' => table.unmap(a, b),
                b'M' => table.remap(a, b, c),
                t => {
                    return Err(std::io::Error::other(format!(
                        "journal {}: unknown record {t}",
                        path.display()
                    )))
                }
            }
            n += 1;
        }
        Ok(n)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the pager tells about children forked inside lazily served
/// children (their userfaultfds must outlive forkd with them).
#[derive(Debug)]
pub enum ForkEvent {
    /// A child forked a grandchild, served from now on.
    Forked {
        /// The grandchild's number.
        id: u64,
        /// The pid of the process that forked it, if known.
        parent_pid: Option<i32>,
        /// A copy of its userfaultfd.
        uffd: OwnedFd,
        /// Its journal.
        journal: Option<PathBuf>,
        /// Its page-table regions: (start, length, filled from the cache).
        regions: Vec<(u64, u64, bool)>,
    },
    /// Its pid was found.
    Found {
        /// The grandchild's number.
        id: u64,
        /// Its pid.
        pid: i32,
        /// A copy of its userfaultfd.
        uffd: OwnedFd,
    },
    /// The pager let go of it (its address space is gone, or it was killed).
    Ended {
        /// The grandchild's number.
        id: u64,
    },
    /// A spawned lazy child is about to run (told before it does). Until
    /// its spawner holds the child as its own, this is what the child
    /// depends on: a spawner that can go away in between hands these on
    /// (forkd puts them in its keeper's hands).
    Starting {
        /// Its pid.
        pid: i32,
        /// Its pidfd.
        pidfd: OwnedFd,
        /// A copy of its userfaultfd.
        uffd: OwnedFd,
    },
    /// A child told as [`ForkEvent::Starting`] did not start after all
    /// (its last step failed, and it was killed).
    NotStarted {
        /// Its pid.
        pid: i32,
    },
}

/// Who hears [`ForkEvent`]s (a daemon, to hand grandchildren over).
pub type ForkSink = Arc<dyn Fn(ForkEvent) + Send + Sync>;

static NEXT_FORK_ID: AtomicU64 = AtomicU64::new(1);

/// A new number for a grandchild in [`ForkEvent`]s (unique in this process).
pub fn next_fork_id() -> u64 {
    NEXT_FORK_ID.fetch_add(1, Ordering::Relaxed)
}

impl LazyChild {
    /// Install the seed's recorded working set now, before the child runs
    /// (a node template's, so every child it forks has it). Returns the
    /// pages installed.
    pub fn install_working_set(self) -> (LazyChild, Result<u64, PagerError>) {
        let mut st = ChildState::new(self);
        queue_working_set(&mut st);
        let r = install_queued(&mut st, usize::MAX);
        // The working set's zero pages, as the zero page (no fault for them
        // in any child), in runs.
        if let Some(ws) = st.c.seed.working_set() {
            let mut zeros: Vec<u64> = ws
                .iter()
                .copied()
                .filter(|a| st.c.table.get(*a) == Some(Slot::Zero))
                .collect();
            zeros.sort_unstable();
            zeros.dedup();
            let mut i = 0;
            while i < zeros.len() {
                let mut j = i + 1;
                while j < zeros.len() && zeros[j] == zeros[j - 1] + PAGE_SIZE {
                    j += 1;
                }
                let len = (j - i) as u64 * PAGE_SIZE;
                if st.c.uffd.zero(zeros[i], len, false).is_ok() {
                    for a in &zeros[i..j] {
                        st.c.table.set(*a, Slot::Done(Origin::Zero));
                    }
                }
                i = j;
            }
        }
        let n = st.c.stats.prefetched.load(Ordering::Relaxed);
        (st.c, r.map(|()| n))
    }
}

struct ChildState<F = Uffd> {
    c: LazyChild<F>,
    first_fault_done: bool,
    /// Working-set runs still to install, in recorded order.
    ws_queue: std::collections::VecDeque<Vec<(u64, PageRef)>>,
    touched: Vec<u64>,
    touched_set: HashSet<u64>,
    record: bool,
    /// Pages of cache-mapped memory it has written (a recording child's)
    /// by its last output.
    written: HashSet<u64>,
    /// Pages it has written since (moved to `written` at its next output;
    /// kept only if it never had output that was sampled at).
    pending: HashSet<u64>,
    /// Its outputs seen by the pager.
    outputs_seen: u64,
    sampled_at_free: bool,
    /// Where a sequential reader's next fault would be (its last window
    /// was `[seq_from, seq_next)`), and its window.
    seq_from: u64,
    seq_next: u64,
    window: usize,
}

enum Served {
    Done,
    Again,
    Failed(PagerError),
}

/// The pool of pager threads.
pub struct Pager {
    workers: Vec<(Sender<LazyChild>, Mutex<std::io::PipeWriter>)>,
    next: AtomicUsize,
    /// The threads; each ends once the Pager is dropped and its children are gone.
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("threads", &self.threads.len())
            .finish()
    }
}

const WAKE_TOKEN: u64 = u64::MAX;
/// A recording child had output (child tokens are `id << 1` and
/// `id << 1 | 1`, far below).
const OUTPUT_TOKEN: u64 = u64::MAX - 1;

impl Pager {
    /// Start `threads` pager threads.
    pub fn new(threads: usize) -> std::io::Result<Pager> {
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, rx) = channel::<LazyChild>();
            let (wake_r, wake_w) = std::io::pipe()?;
            let epoll = Epoll::new()?;
            epoll.add(wake_r.as_raw_fd(), WAKE_TOKEN)?;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("pager-{i}"))
                    .spawn(move || worker(epoll, rx, wake_r))?,
            );
            workers.push((tx, Mutex::new(wake_w)));
        }
        Ok(Pager {
            workers,
            next: AtomicUsize::new(0),
            threads: handles,
        })
    }

    /// Serve `child` from now on.
    pub fn add(&self, child: LazyChild) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let (tx, wake) = &self.workers[i];
        if tx.send(child).is_ok() {
            if let Ok(mut w) = wake.lock() {
                let _ = w.write_all(&[1]);
            }
        }
    }
}

fn worker(epoll: Epoll, rx: Receiver<LazyChild>, mut wake: std::io::PipeReader) {
    let mut children: HashMap<u64, ChildState> = HashMap::new();
    // Written to when a recording child has output.
    let (mut output_r, output_w) = match output_pipe(&epoll) {
        Ok((r, w)) => (Some(r), Some(w)),
        Err(e) => {
            warn!(error = %e, "no output wakes: a recording child's written set is sampled on a timer only");
            (None, None)
        }
    };
    // Children with working-set runs still queued: only these are visited
    // between faults (not every child on every wakeup).
    let mut queued: Vec<u64> = Vec::new();
    let mut next_id: u64 = 0;
    let mut ready = Vec::new();
    // The Pager was dropped (its seed was): serve the children there are,
    // then end.
    let mut orphaned = false;
    // Forked grandchildren whose pid is still to be found, since when.
    let mut unresolved: Vec<(u64, Instant)> = Vec::new();
    let mut probed = Instant::now();
    let mut sampled = Instant::now();
    // Is a child recording its working set (its written pages sampled
    // every `sample_every`)? Kept here, not found by a scan of every child
    // at every fault.
    let mut recording = false;
    let mut sample_every = SAMPLE_MIN;
    loop {
        if orphaned && children.is_empty() {
            return;
        }
        ready.clear();
        let busy = !queued.is_empty();
        let timeout = if busy {
            0
        } else if !unresolved.is_empty() {
            2
        } else if recording {
            sample_every.as_millis() as i32
        } else {
            1000
        };
        if let Err(e) = epoll.wait(timeout, &mut ready) {
            warn!(error = %e, "pager epoll failed");
            return;
        }
        for &(token, _hup) in &ready {
            if token == WAKE_TOKEN {
                let mut b = [0u8; 64];
                if let Ok(0) = wake.read(&mut b) {
                    // The write end is gone: the pipe would stay readable
                    // (at end of file) and spin this loop.
                    epoll.remove(wake.as_raw_fd());
                    orphaned = true;
                }
                while let Ok(c) = rx.try_recv() {
                    if let Some(id) = add_child(&epoll, &mut children, &mut next_id, c) {
                        if let Some(st) = children.get(&id).filter(|st| st.record) {
                            recording = true;
                            if let Some(w) = &output_w {
                                let _ = st.c.stats.output_waker.set(w.clone());
                            }
                        }
                    }
                }
                continue;
            }
            if token == OUTPUT_TOKEN {
                if let Some(r) = &mut output_r {
                    let mut b = [0u8; 64];
                    while matches!(r.read(&mut b), Ok(n) if n > 0) {}
                }
                for st in children.values_mut().filter(|st| st.record) {
                    st.sample_at_output();
                }
                // Then often, while it may be ending (below).
                sample_every = SAMPLE_ENDING;
                sampled = Instant::now();
                continue;
            }
            let id = token >> 1;
            if token & 1 == 1 {
                // The child exited; a grandchild's pid was found by a
                // guess, so its address space must be gone too.
                let gone = children
                    .get(&id)
                    .is_none_or(|st| st.c.parent_pid.is_none() || !st.alive());
                if gone {
                    if let Some(st) = children.remove(&id) {
                        finish(&epoll, st);
                    }
                } else if let Some(st) = children.get_mut(&id) {
                    if let Some(p) = st.c.pidfd.take() {
                        epoll.remove(p.as_raw_fd());
                    }
                    st.c.pid = None;
                }
                continue;
            }
            let mut forks = Vec::new();
            let outcome = match children.get_mut(&id) {
                Some(st) => {
                    // A bug in serving one child must not leave every child
                    // of this thread waiting on faults nobody reads.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        service(st, &mut forks)
                    }))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        let reason = PagerError::Panicked(what);
                        fail(&st.c, None, &reason.to_string());
                        Err(reason)
                    });
                    if !st.ws_queue.is_empty() && !queued.contains(&id) {
                        queued.push(id);
                    }
                    r
                }
                None => Ok(()),
            };
            for f in forks {
                let grandchild = f.pid.is_none() && f.parent_pid.is_some();
                if let Some(gid) = add_child(&epoll, &mut children, &mut next_id, f) {
                    if grandchild {
                        unresolved.push((gid, Instant::now()));
                    }
                }
            }
            if let Err(reason) = outcome {
                if let Some(st) = children.remove(&id) {
                    finish(&epoll, st);
                    debug!(%reason, "stopped serving a child");
                }
            }
        }
        if !unresolved.is_empty() {
            resolve_grandchildren(&epoll, &mut children, &mut unresolved);
        }
        // A recording child's written pages, sampled while it runs: often
        // (a short-lived child ends with no unmap to sample at), but at
        // most a tenth of this thread's time.
        if recording && sampled.elapsed() >= sample_every {
            let t = Instant::now();
            recording = false;
            let mut ending = false;
            for st in children.values_mut().filter(|st| st.record) {
                st.sample_written();
                recording = true;
                ending |= st.outputs_seen > 0;
            }
            // Once it has answered, it may be ending: what an exit writes
            // in its last milliseconds is never sampled (a dead process's
            // page map cannot be read), so sample it as often as it costs
            // a third of this thread's time, for this one child a seed.
            sample_every = if ending {
                (t.elapsed() * 3).clamp(SAMPLE_ENDING, SAMPLE_MAX)
            } else {
                (t.elapsed() * 10).clamp(SAMPLE_MIN, SAMPLE_MAX)
            };
            sampled = Instant::now();
        }
        // A forked grandchild's userfaultfd outlives its address space (an
        // exit, an exec): let go of those, so forkd's descriptors and
        // tables do not grow with every fork.
        if probed.elapsed() >= std::time::Duration::from_secs(1) {
            probed = Instant::now();
            let dead: Vec<u64> = children
                .iter()
                .filter(|(_, st)| st.c.on_fork.is_none() && !st.alive())
                .map(|(id, _)| *id)
                .collect();
            for id in dead {
                if let Some(st) = children.remove(&id) {
                    finish(&epoll, st);
                }
            }
        }
        // Between faults: the next piece of each child's working set.
        let mut failed = Vec::new();
        queued.retain(|id| {
            let Some(st) = children.get_mut(id) else {
                return false;
            };
            if let Err(reason) = install_queued(st, 64) {
                fail(&st.c, None, &format!("fetching the working set: {reason}"));
                failed.push(*id);
                return false;
            }
            !st.ws_queue.is_empty()
        });
        for id in failed {
            if let Some(st) = children.remove(&id) {
                finish(&epoll, st);
            }
        }
    }
}

/// The non-blocking pipe a recording child's output wakes its pager thread
/// through, its read end watched.
fn output_pipe(epoll: &Epoll) -> std::io::Result<(std::io::PipeReader, Arc<OwnedFd>)> {
    let (r, w) = std::io::pipe()?;
    let w = OwnedFd::from(w);
    set_nonblocking(&w);
    let r = OwnedFd::from(r);
    set_nonblocking(&r);
    epoll.add(r.as_raw_fd(), OUTPUT_TOKEN)?;
    Ok((std::io::PipeReader::from(r), Arc::new(w)))
}

fn add_child(
    epoll: &Epoll,
    children: &mut HashMap<u64, ChildState>,
    next_id: &mut u64,
    c: LazyChild,
) -> Option<u64> {
    let id = *next_id;
    *next_id += 1;
    if let Err(e) = epoll.add(c.uffd.raw(), id << 1) {
        fail(&c, None, &format!("cannot watch its userfaultfd: {e}"));
        return None;
    }
    if let Some(p) = &c.pidfd {
        if let Err(e) = epoll.add(p.as_raw_fd(), (id << 1) | 1) {
            warn!(error = %e, "cannot watch a child's exit");
        }
    }
    children.insert(id, ChildState::new(c));
    Some(id)
}

/// How long a forked grandchild's pid is looked for.
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Find the pids of forked grandchildren (`UFFD_EVENT_FORK` gives only the
/// new userfaultfd): a child of the forking process, not known here, whose
/// address space is not the forker's (a `vfork` child shares it) and has
/// userfaultfd-registered memory (an exec'd child has none). The pid is
/// then used to kill the grandchild with a reason and to notice its exit;
/// whether its userfaultfd is still needed is always asked of the
/// userfaultfd itself ([`ChildState::alive`]), so a wrong guess never
/// drops a live one.
fn resolve_grandchildren(
    epoll: &Epoll,
    children: &mut HashMap<u64, ChildState>,
    unresolved: &mut Vec<(u64, Instant)>,
) {
    let mut known: HashSet<i32> = children.values().filter_map(|st| st.c.pid).collect();
    unresolved.retain(|&(id, since)| {
        let Some(st) = children.get_mut(&id) else {
            return false;
        };
        let Some(parent) = st.c.parent_pid else {
            return false;
        };
        let found = crate::procfs::children(parent)
            .into_iter()
            .filter(|g| !known.contains(g))
            .find(|&g| forked_from(parent, g));
        match found {
            Some(g) => {
                known.insert(g);
                st.c.pid = Some(g);
                if let Ok(p) = kernel_helpers::uffd::pidfd_open(g) {
                    if epoll.add(p.as_raw_fd(), (id << 1) | 1).is_ok() {
                        st.c.pidfd = Some(p);
                    }
                }
                debug!(parent, pid = g, "found a forked grandchild");
                if let (Some(fid), Some(sink), Ok(uffd)) =
                    (st.c.fork_id, sink_of(&st.c), st.c.uffd.dup())
                {
                    sink(ForkEvent::Found {
                        id: fid,
                        pid: g,
                        uffd,
                    });
                }
                false
            }
            None => since.elapsed() < RESOLVE_FOR,
        }
    });
}

/// Is `g` a fork (not a `vfork`, not exec'd since) of `parent`?
fn forked_from(parent: i32, g: i32) -> bool {
    // SAFETY: kcmp compares two processes' address spaces; no memory is passed.
    let same_vm = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            parent as libc::c_long,
            g as libc::c_long,
            1 as libc::c_long, // KCMP_VM
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    same_vm != 0 && crate::procfs::uffd_missing(g).is_ok_and(|r| !r.is_empty())
}

impl<F: FaultFd> ChildState<F> {
    /// Add the cache-mapped pages it has copied on write by now (present,
    /// and no longer the cache's page) to its written set; for a child
    /// forked from a template, also the pages of the seed's other private
    /// writable mappings that are its own by now (no longer the
    /// template's).
    fn sample_written(&mut self) {
        use kernel_helpers::pagemap::{PM_EXCLUSIVE, PM_FILE_OR_SHARED, PM_PRESENT};
        let Some(pid) = self.c.pid else {
            return;
        };
        let Ok(pm) = kernel_helpers::pagemap::Pagemap::open(pid) else {
            return;
        };
        let regions = self.c.table.regions();
        for &(start, len, from_cache) in &regions {
            if !from_cache {
                continue;
            }
            let Ok(entries) = pm.entries(start, start + len) else {
                continue;
            };
            for (i, e) in entries.iter().enumerate() {
                let a = start + i as u64 * PAGE_SIZE;
                if e & PM_PRESENT != 0 && e & PM_FILE_OR_SHARED == 0 && !self.written.contains(&a) {
                    self.pending.insert(a);
                }
            }
        }
        // A child restored from scratch has every page of these from its
        // restore: only a template's children tell written from not.
        let forked_from_template = self.c.parent_pid.is_some() && self.c.fork_id.is_none();
        if !forked_from_template {
            return;
        }
        for &(start, len) in self.c.seed.private_regions() {
            let Ok(entries) = pm.entries(start, start + len) else {
                continue;
            };
            for (i, e) in entries.iter().enumerate() {
                let a = start + i as u64 * PAGE_SIZE;
                let own = PM_PRESENT | PM_EXCLUSIVE;
                if e & (own | PM_FILE_OR_SHARED) == own
                    && !self.written.contains(&a)
                    && !in_regions(&regions, a)
                {
                    self.pending.insert(a);
                }
            }
        }
    }

    /// A recording child's `[start, end)` is gone (unmapped, or its pages
    /// dropped) before this event could be read, and before a sample saw
    /// what it wrote there if no page of it is in the written set: take
    /// the pages it touched there as written. A Python teardown unmaps
    /// the arenas its last request wrote (reference counts on every object
    /// read), one after another while the pages are sampled; without this,
    /// later children copied on write 520 of the 4,000 pages of a heap
    /// walk.
    fn note_gone(&mut self, start: u64, end: u64) {
        if !self.record {
            return;
        }
        let mut pages = (start..end).step_by(PAGE_SIZE as usize);
        if pages.any(|a| self.written.contains(&a) || self.pending.contains(&a)) {
            return;
        }
        let touched = (start..end)
            .step_by(PAGE_SIZE as usize)
            .filter(|a| self.touched_set.contains(a));
        self.pending.extend(touched);
    }

    /// A recording child had output: what it wrote by now is its request's
    /// (sampled while it still has it), not its exit's.
    fn sample_at_output(&mut self) {
        let n = self.c.stats.outputs.load(Ordering::Acquire);
        if n == self.outputs_seen {
            return;
        }
        self.outputs_seen = n;
        self.sample_written();
        self.written.extend(self.pending.drain());
    }

    /// Its written set (and working set): what it wrote up to its last
    /// output, and what it wrote after only where that is at most
    /// [`EXIT_WRITES_KEPT`] of it. Then every later child holding them
    /// from its start costs little memory, and its exit takes no
    /// copy-on-write faults for them (a heap walk's teardown: 1,158 pages
    /// beside 3,397); where its exit writes most of the heap after a light
    /// request (a Python interpreter's teardown: 8,278 pages beside 256),
    /// children share those pages until they write them, as fork children
    /// do. All it wrote, if it had no output sampled at (it answers
    /// elsewhere, or ended before its last output was seen here): never
    /// less than it wrote before its answer.
    fn written_set(mut self) -> (Vec<u64>, Vec<u64>) {
        let unseen = self.c.stats.outputs.load(Ordering::Acquire) != self.outputs_seen;
        let after = self.pending.len();
        let few = after as f64 <= self.written.len() as f64 * EXIT_WRITES_KEPT;
        if self.outputs_seen == 0 || unseen || few {
            self.written.extend(self.pending.drain());
        } else {
            debug!(
                pages = after,
                before = self.written.len(),
                "pages written after the last output left out of the written set"
            );
        }
        (self.written.into_iter().collect(), self.touched)
    }

    /// A recording child frees memory (often: it is ending): sample what
    /// it wrote before its mappings go, once. (Sampling at every unmap of
    /// a Python teardown, for what it writes as it goes, kept 8 of 339
    /// copy-on-write faults out of a later child's exit: not worth it.)
    fn sample_before_teardown(&mut self) {
        if self.record && !self.sampled_at_free {
            self.sampled_at_free = true;
            self.sample_written();
        }
    }

    /// Note an address-space event (and write it down, if journaled).
    fn journal(&mut self, tag: u8, a: u64, b: u64, c: u64) {
        self.c.stats.events.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = &mut self.c.journal {
            j.record(tag, a, b, c);
        }
    }

    /// Is the address space this child's userfaultfd serves still there?
    fn alive(&self) -> bool {
        self.c
            .table
            .first_addr()
            .is_none_or(|a| self.c.uffd.mm_alive(a))
    }

    fn new(c: LazyChild<F>) -> ChildState<F> {
        // A template never runs: its children record, one at a time.
        let record = c.pid.is_some() && c.on_fork.is_none() && c.seed.claim_recording();
        ChildState {
            c,
            first_fault_done: false,
            ws_queue: Default::default(),
            touched: Vec::new(),
            touched_set: HashSet::new(),
            record,
            written: HashSet::new(),
            pending: HashSet::new(),
            outputs_seen: 0,
            sampled_at_free: false,
            seq_from: 0,
            seq_next: 0,
            window: WINDOW_PAGES,
        }
    }
}

/// Tell the seed's fork sink about a grandchild just forked.
fn tell_forked(c: &LazyChild) {
    let (Some(id), Some(sink)) = (c.fork_id, sink_of(c)) else {
        return;
    };
    let Ok(uffd) = c.uffd.dup() else {
        return;
    };
    sink(ForkEvent::Forked {
        id,
        parent_pid: c.parent_pid,
        uffd,
        journal: c.journal.as_ref().map(|j| j.path.clone()),
        regions: c.initial.to_vec(),
    });
}

/// Is `a` in one of `regions` (start, length, ...)?
pub(crate) fn in_regions(regions: &[(u64, u64, bool)], a: u64) -> bool {
    regions.iter().any(|&(s, l, _)| (s..s + l).contains(&a))
}

fn sink_of<F>(c: &LazyChild<F>) -> Option<ForkSink> {
    c.seed.fork_sink.lock().ok()?.clone()
}

fn finish(epoll: &Epoll, st: ChildState) {
    if let (Some(id), Some(sink)) = (st.c.fork_id, sink_of(&st.c)) {
        sink(ForkEvent::Ended { id });
    }
    epoll.remove(st.c.uffd.raw());
    if let Some(p) = &st.c.pidfd {
        epoll.remove(p.as_raw_fd());
    }
    let stats = st.c.stats.clone();
    keep_sets(st);
    stats.set_finished();
}

/// A child let go of: if it recorded the seed's sets, keep them (unless it
/// was killed) and let another child record.
fn keep_sets<F: FaultFd>(st: ChildState<F>) {
    if st.record {
        let seed = st.c.seed.clone();
        if st.c.stats.killed_reason().is_none() {
            let (written, touched) = st.written_set();
            seed.record_written_set(written);
            seed.record_working_set(touched);
        }
        seed.recorded();
    }
}

/// Kill a child whose memory cannot be served, and say why.
fn fail<F: FaultFd>(c: &LazyChild<F>, page: Option<u64>, reason: &str) {
    warn!(pid = ?c.pid, reason, "killing a child that cannot be served");
    if let Ok(mut k) = c.stats.killed.lock() {
        if k.is_none() {
            *k = Some(reason.to_string());
        }
    }
    match (c.pid, page) {
        (Some(pid), page) => {
            let _ = kernel_helpers::proc::signal(pid, libc::SIGKILL);
            // Then whoever else waits for the page is woken with an error,
            // not left waiting: forkd reaching into a child it is still
            // setting up (its tid words, its robust lists). The child dies
            // of the SIGKILL already pending, not of this.
            if let Some(p) = page {
                let _ = c.uffd.poison(p, PAGE_SIZE);
            }
        }
        // A grandchild: no pid, but a poisoned page raises SIGBUS in it.
        (None, Some(p)) => {
            let _ = c.uffd.poison(p, PAGE_SIZE);
        }
        (None, None) => {}
    }
}

/// Read and handle everything pending on one child's userfaultfd.
fn service<F: FaultFd>(
    st: &mut ChildState<F>,
    forks: &mut Vec<LazyChild>,
) -> Result<(), PagerError> {
    let mut msgs = Vec::new();
    let mut retry: Vec<u64> = Vec::new();
    let mut spins = 0u32;
    let mut retrying_since: Option<Instant> = None;
    loop {
        msgs.clear();
        let n = st.c.uffd.read_msgs(&mut msgs).map_err(PagerError::Events)?;
        if n == 0 && retry.is_empty() {
            return Ok(());
        }
        let mut faults = std::mem::take(&mut retry);
        for m in &msgs {
            match *m {
                Msg::PageFault { address, .. } => faults.push(address),
                Msg::Remove { start, end } => {
                    st.note_gone(start, end);
                    st.sample_before_teardown();
                    st.c.table.remove(start, end);
                    st.journal(b'R', start, end, 0);
                }
                Msg::Unmap { start, end } => {
                    st.note_gone(start, end);
                    st.sample_before_teardown();
                    st.c.table.unmap(start, end);
                    st.journal(b'U', start, end, 0);
                }
                Msg::Remap { from, to, len } => {
                    st.c.table.remap(from, to, len);
                    st.journal(b'M', from, to, len);
                }
                Msg::Fork { ufd } => {
                    let tf = Instant::now();
                    st.c.stats.events.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: the kernel installed `ufd` in our fd table for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
                    set_nonblocking(&fd);
                    let fork_id = next_fork_id();
                    // A template's fork is the daemon's to write down.
                    let journal = match (&st.c.journal, &st.c.on_fork) {
                        (Some(j), None) => {
                            let path = j.path.with_extension(format!("g{fork_id}"));
                            j.fork(path)
                                .map_err(|e| warn!(error = %e, "cannot copy a journal for a forked child"))
                                .ok()
                        }
                        _ => None,
                    };
                    let child = LazyChild {
                        pid: None,
                        parent_pid: st.c.pid,
                        uffd: Uffd::from_owned(fd),
                        pidfd: None,
                        table: st.c.table.clone(),
                        seed: st.c.seed.clone(),
                        prefetch: st.c.prefetch,
                        stats: Arc::new(ChildStats::default()),
                        on_fork: None,
                        journal,
                        fork_id: st.c.on_fork.is_none().then_some(fork_id),
                        initial: st.c.initial.clone(),
                    };
                    debug!(
                        us = tf.elapsed().as_micros() as u64,
                        "fork event: the table copied"
                    );
                    if st.c.on_fork.is_none() {
                        tell_forked(&child);
                    }
                    // A template's child goes to the restorer forking it;
                    // if that is gone, serve it as a grandchild.
                    match &st.c.on_fork {
                        Some(tx) => {
                            if let Err(e) = tx.send(child) {
                                forks.push(e.0);
                            }
                        }
                        None => forks.push(child),
                    }
                }
                Msg::Unknown(t) => warn!(event = t, "unknown userfaultfd event"),
            }
        }
        for addr in faults {
            let t = Instant::now();
            match serve(st, addr) {
                Served::Done => {
                    let us = t.elapsed().as_micros() as u64;
                    let b = (64 - us.leading_zeros()).min(23) as usize;
                    st.c.seed.metrics.fault_latency_us_log2[b].fetch_add(1, Ordering::Relaxed);
                    st.c.seed.metrics.faults.fetch_add(1, Ordering::Relaxed);
                    st.c.stats.faults.fetch_add(1, Ordering::Relaxed);
                }
                Served::Again => retry.push(addr),
                Served::Failed(reason) => {
                    fail(&st.c, Some(addr & !(PAGE_SIZE - 1)), &reason.to_string());
                    return Err(reason);
                }
            }
        }
        if !retry.is_empty() {
            // EAGAIN: an event (a munmap, a madvise, a fork of a thread
            // that churns threads) is in flight until the thread that
            // made it runs again. Yield, then sleep a little to let it;
            // give up only after a long time of nothing but that.
            spins += 1;
            let since = *retrying_since.get_or_insert_with(Instant::now);
            if spins > 64 {
                std::thread::sleep(Duration::from_micros(u64::from(spins.min(1000))));
            }
            if since.elapsed() > CHANGING_GIVE_UP {
                let reason = PagerError::KeptChanging;
                fail(
                    &st.c,
                    Some(retry[0] & !(PAGE_SIZE - 1)),
                    &reason.to_string(),
                );
                return Err(reason);
            }
            if msgs.is_empty() {
                std::thread::yield_now();
            }
        } else {
            spins = 0;
            retrying_since = None;
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Install pages `run` = (address, page), consecutive in address within
/// one region, from the node-local cache (fetching what it lacks).
fn install<F: FaultFd>(
    st: &mut ChildState<F>,
    run: &[(u64, PageRef)],
    wake: bool,
) -> Result<Served, PagerError> {
    let refs: Vec<PageRef> = run.iter().map(|r| r.1).collect();
    // The source's error first (what failed, where), then the child's page.
    let fetched =
        st.c.seed
            .cache
            .ensure(&refs)
            .map_err(|source| match run.len() {
                1 => PagerError::Fetch {
                    source,
                    addr: run[0].0,
                },
                pages => PagerError::FetchRun {
                    source,
                    addr: run[0].0,
                    pages,
                },
            })?;
    st.c.stats
        .pages_fetched
        .fetch_add(fetched, Ordering::Relaxed);
    st.c.stats
        .pages_from_cache
        .fetch_add(run.len() as u64 - fetched, Ordering::Relaxed);
    let fill = st.c.table.fill(run[0].0).unwrap_or(Fill::Copy);
    let contiguous = refs
        .windows(2)
        .all(|w| w[1].cache == w[0].cache + PAGE_SIZE);
    let len = run.len() as u64 * PAGE_SIZE;
    let whole = if !contiguous {
        Err(FillError::Exists) // go page by page below
    } else {
        match fill {
            Fill::Continue => st.c.uffd.continue_range(run[0].0, len, wake),
            Fill::Copy => {
                // Consecutive cache offsets, all ensured present above.
                let src = st.c.seed.cache.pages(refs[0].cache, len);
                st.c.uffd.copy(run[0].0, src, wake)
            }
        }
    };
    // Page by page, then wake the first, when some page is already there,
    // or the run is not contiguous in the cache, or it is not all in one
    // mapping of the child now (a fill must be: the child may have cut the
    // mapping since with an mprotect, which sends no event). A fault is
    // always answered with a wake: its thread faults again if it still
    // can, and never waits on a fault nobody answers.
    let by_page = match &whole {
        Err(FillError::Exists) => true,
        Err(FillError::Gone) => run.len() > 1 || wake,
        _ => false,
    };
    if by_page {
        if matches!(whole, Err(FillError::Gone)) {
            debug!(
                addr = run[0].0,
                pages = run.len(),
                "a run is not in one mapping of the child; page by page"
            );
        }
        for (addr, r) in run {
            let one = match fill {
                Fill::Continue => st.c.uffd.continue_range(*addr, PAGE_SIZE, wake),
                Fill::Copy => st.c.uffd.copy(*addr, st.c.seed.cache.page(r.cache), wake),
            };
            match one {
                Ok(()) | Err(FillError::Exists) | Err(FillError::Gone) => {}
                Err(FillError::Again { .. }) => return Ok(Served::Again),
                Err(FillError::Other(error)) => {
                    return Err(PagerError::Fill { addr: *addr, error })
                }
            }
        }
        if wake {
            let _ = st.c.uffd.wake(run[0].0, PAGE_SIZE);
        }
    } else {
        match whole {
            Ok(()) | Err(FillError::Exists) => {}
            Err(FillError::Again { done }) => {
                // Part went in: mark those, retry the rest after the events.
                let n = (done / PAGE_SIZE) as usize;
                for (addr, r) in &run[..n.min(run.len())] {
                    st.c.table.set(*addr, Slot::Done(Origin::Stored(*r)));
                }
                return Ok(Served::Again);
            }
            // One page, not for a fault: its mapping is gone.
            Err(FillError::Gone) => return Ok(Served::Done),
            Err(FillError::Other(error)) => {
                return Err(PagerError::Fill {
                    addr: run[0].0,
                    error,
                })
            }
        }
    }
    for (addr, r) in run {
        st.c.table.set(*addr, Slot::Done(Origin::Stored(*r)));
        if st.record && st.touched_set.insert(*addr) {
            st.touched.push(*addr);
        }
    }
    st.c.stats
        .pages_installed
        .fetch_add(run.len() as u64, Ordering::Relaxed);
    st.c.seed
        .metrics
        .pages_installed
        .fetch_add(run.len() as u64, Ordering::Relaxed);
    Ok(Served::Done)
}

/// Queue the seed's recorded working set for installation, as runs of
/// address-contiguous pages in recorded (first-touch) order. The pager
/// installs them between faults, so the first fault is not held up by the
/// whole set and the earliest-needed pages go in first.
fn queue_working_set<F: FaultFd>(st: &mut ChildState<F>) {
    let Some(ws) = st.c.seed.working_set() else {
        return;
    };
    // A repeated address needs no check: it cannot extend a run (addresses
    // must increase), and install_queued skips pages already installed.
    let mut run: Vec<(u64, PageRef)> = Vec::new();
    for a in ws.iter() {
        let Some(Slot::Stored(o)) = st.c.table.get(*a) else {
            continue;
        };
        let extends = run.last().is_some_and(|l| {
            l.0 + PAGE_SIZE == *a
                && l.1.cache + PAGE_SIZE == o.cache
                && st.c.table.fill(l.0) == st.c.table.fill(*a)
        }) && run.len() < 256;
        if !extends && !run.is_empty() {
            st.ws_queue.push_back(std::mem::take(&mut run));
        }
        run.push((*a, o));
    }
    if !run.is_empty() {
        st.ws_queue.push_back(run);
    }
}

/// Install up to `budget` pages of the queued working set.
fn install_queued<F: FaultFd>(st: &mut ChildState<F>, mut budget: usize) -> Result<(), PagerError> {
    while budget > 0 {
        let Some(run) = st.ws_queue.pop_front() else {
            return Ok(());
        };
        // Pages faulted in meanwhile are skipped.
        let still: Vec<(u64, PageRef)> = run
            .into_iter()
            // Still the same stored page: a remap since may have put
            // another page's slot at this address.
            .filter(|(a, o)| matches!(st.c.table.get(*a), Some(Slot::Stored(r)) if r == *o))
            .collect();
        if still.is_empty() {
            continue;
        }
        // Split at holes left by pages installed meanwhile.
        let mut start = 0;
        for i in 1..=still.len() {
            if i == still.len() || still[i].0 != still[i - 1].0 + PAGE_SIZE {
                match install(st, &still[start..i], false)? {
                    Served::Done => {
                        st.c.stats
                            .prefetched
                            .fetch_add((i - start) as u64, Ordering::Relaxed);
                    }
                    // Events pending: drop the rest of this run; faults bring it.
                    _ => return Ok(()),
                }
                start = i;
            }
        }
        budget = budget.saturating_sub(still.len());
    }
    Ok(())
}

/// Install a zero page at `page` (`tracked`: record it in the table).
fn zero_page<F: FaultFd>(
    st: &mut ChildState<F>,
    page: u64,
    tracked: bool,
) -> Result<Served, PagerError> {
    zero_page_waking(st, page, tracked, true)
}

/// [`zero_page`], waking the threads waiting on it only if `wake` (a page
/// installed ahead of a sequential reader has none).
fn zero_page_waking<F: FaultFd>(
    st: &mut ChildState<F>,
    page: u64,
    tracked: bool,
    wake: bool,
) -> Result<Served, PagerError> {
    match st.c.uffd.zero(page, PAGE_SIZE, wake) {
        // Its mapping went after the fault (an unmap whose event is still
        // to be read): wake the thread, which faults again if it still
        // can, and never waits on a fault nobody answers.
        Err(FillError::Gone) => {
            let _ = st.c.uffd.wake(page, PAGE_SIZE);
            Ok(Served::Done)
        }
        Ok(()) => {
            if tracked {
                st.c.table.set(page, Slot::Done(Origin::Zero));
                // Part of the working set too: a template maps it as the
                // zero page, so children read it without a fault.
                if st.record && st.touched_set.insert(page) {
                    st.touched.push(page);
                }
            }
            st.c.stats.zero_pages.fetch_add(1, Ordering::Relaxed);
            Ok(Served::Done)
        }
        Err(FillError::Exists) => {
            let _ = st.c.uffd.wake(page, PAGE_SIZE);
            Ok(Served::Done)
        }
        Err(FillError::Again { .. }) => Ok(Served::Again),
        Err(FillError::Other(error)) => Err(PagerError::ZeroPage { addr: page, error }),
    }
}

fn serve<F: FaultFd>(st: &mut ChildState<F>, addr: u64) -> Served {
    let page = addr & !(PAGE_SIZE - 1);
    if st.c.prefetch == Prefetch::Recorded && !st.first_fault_done {
        st.first_fault_done = true;
        queue_working_set(st);
    }
    // A fault right where the last window ended (or inside it: the reader
    // caught up with the pages installed ahead of it) is a sequential
    // reader's: its window doubles (up to MAX_WINDOW_PAGES); any other
    // fault starts again at WINDOW_PAGES.
    let in_window = (st.seq_from..=st.seq_next).contains(&page) && st.seq_next != 0;
    let window = if st.c.prefetch == Prefetch::Off {
        1
    } else if in_window {
        match st.c.table.get(page) {
            Some(Slot::Stored(_)) => (st.window * 2).clamp(WINDOW_PAGES, MAX_WINDOW_PAGES),
            _ => st.window,
        }
    } else {
        WINDOW_PAGES
    };
    if window > 1 {
        st.window = window;
    }
    // A zero page keeps a sequential reader's window.
    let prev_next = st.seq_next;
    st.seq_from = page;
    st.seq_next = page + PAGE_SIZE;
    let r = match st.c.table.get(page) {
        // A page the parent never had in a registered range: the range grew
        // in place (mremap growing a mapping keeps its registration, and
        // sends no event). New anonymous memory reads as zeros.
        None => zero_page(st, page, false),
        Some(Slot::Stored(_)) => {
            let run = st.c.table.stored_run(page, window.min(MAX_FETCH_PAGES));
            st.seq_next = page + run.len() as u64 * PAGE_SIZE;
            let r = install(st, &run, true);
            // The window goes on past the zero pages that cut the run (a
            // heap has them here and there) and past what a fault waits
            // for, while the woken thread reads: up to one more fault's
            // fetch ahead of it (its next fault finds those pages mapped,
            // or waits only for the rest of that fetch).
            if matches!(r, Ok(Served::Done)) && run.len() < window {
                fill_ahead(st, window - run.len(), MAX_FETCH_PAGES);
            }
            r
        }
        Some(Slot::Done(Origin::Stored(off))) => {
            // A reader that caught up with pages installed ahead of it (its
            // fault came before they went in): its window stays as it was,
            // and goes on ahead of it once it is woken.
            let caught_up = in_window && page < prev_next;
            if caught_up {
                st.seq_next = prev_next;
            }
            // Installed before but missing again without a remove event:
            // put the same page back rather than let the thread spin.
            let r = install(st, &[(page, off)], true);
            if caught_up && matches!(r, Ok(Served::Done)) {
                let ahead = ((st.seq_next - page) / PAGE_SIZE) as usize;
                if ahead < window {
                    fill_ahead(st, window - ahead, MAX_FETCH_PAGES);
                }
            }
            r
        }
        Some(Slot::Zero) | Some(Slot::Done(Origin::Zero)) => zero_page(st, page, true),
    };
    match r {
        Ok(s) => s,
        Err(reason) => Served::Failed(reason),
    }
}

/// Install up to `budget` more pages of a sequential reader's window from
/// `st.seq_next` on, stored runs and zero pages alike, without waking
/// anyone (the faulting thread was woken with the first run), fetching at
/// most `fetch` pages that are not in the node cache yet; stops at a page
/// installed already, at the end of the region, or at any error (a fault
/// for a page left out brings it). Moves `st.seq_next` past them.
fn fill_ahead<F: FaultFd>(st: &mut ChildState<F>, mut budget: usize, mut fetch: usize) {
    while budget > 0 {
        let at = st.seq_next;
        let n = match st.c.table.get(at) {
            Some(Slot::Stored(_)) => {
                let mut run = st.c.table.stored_run(at, budget);
                if !st.c.seed.cache.all_present(run.iter().map(|r| &r.1)) {
                    if fetch == 0 {
                        return;
                    }
                    run.truncate(fetch);
                    fetch -= run.len();
                }
                match install(st, &run, false) {
                    Ok(Served::Done) => run.len(),
                    _ => return,
                }
            }
            Some(Slot::Zero) => match zero_page_waking(st, at, true, false) {
                Ok(Served::Done) => 1,
                _ => return,
            },
            _ => return,
        };
        st.seq_next = at + n as u64 * PAGE_SIZE;
        budget = budget.saturating_sub(n);
    }
}

#[cfg(test)]
mod pager_tests {
    use super::*;
    use crate::transport::{PageSource, SourceError};
    use fault_fd::recorder::{Op, Recorder};

    /// Where the test child's region starts.
    const BASE: u64 = 0x10_0000;
    /// Its stored pages (page `i` is filled with `i + 1`), then its zero pages.
    const STORED: u64 = 20;
    const ZERO: u64 = 4;

    fn page(i: u64) -> u64 {
        BASE + i * PAGE_SIZE
    }

    /// The page store: page `i` is `i + 1` repeated; reads fail if `broken`.
    struct Store {
        broken: bool,
    }

    impl PageSource for Store {
        fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            if self.broken {
                return Err(SourceError::Read {
                    source_name: self.name(),
                    offset,
                    len: dst.len(),
                    error: std::io::Error::from_raw_os_error(libc::ECONNRESET),
                });
            }
            for (k, b) in dst.iter_mut().enumerate() {
                *b = ((offset + k as u64) / PAGE_SIZE + 1) as u8;
            }
            Ok(())
        }
        fn size(&self) -> u64 {
            STORED * PAGE_SIZE
        }
        fn name(&self) -> String {
            "test:store".into()
        }
    }

    /// A child (no pid: nothing real is signalled) whose one region is
    /// `STORED` stored pages then `ZERO` zero pages, served over `uffd`.
    fn child(uffd: Recorder, prefetch: Prefetch, broken: bool) -> ChildState<Recorder> {
        let cache = SeedCache::new(Box::new(Store { broken }), STORED * PAGE_SIZE, 0).unwrap();
        ChildState::new(lazy_child(
            uffd,
            prefetch,
            Arc::new(SeedPages::new(cache, None)),
        ))
    }

    /// [`child`]'s, of `seed`.
    fn lazy_child(uffd: Recorder, prefetch: Prefetch, seed: Arc<SeedPages>) -> LazyChild<Recorder> {
        let mut slots: Vec<Slot> = (0..STORED)
            .map(|i| {
                Slot::Stored(PageRef {
                    image: i * PAGE_SIZE,
                    cache: i * PAGE_SIZE,
                })
            })
            .collect();
        slots.extend((0..ZERO).map(|_| Slot::Zero));
        let mut table = PageTable::default();
        table.insert(BASE, slots, Fill::Copy);
        LazyChild {
            pid: None,
            parent_pid: None,
            uffd,
            pidfd: None,
            table,
            seed,
            prefetch,
            stats: Arc::default(),
            on_fork: None,
            journal: None,
            fork_id: None,
            initial: Arc::default(),
        }
    }

    /// The bytes of stored pages `from..to`.
    fn bytes(from: u64, to: u64) -> Vec<u8> {
        (from..to)
            .flat_map(|i| std::iter::repeat_n((i + 1) as u8, PAGE_SIZE as usize))
            .collect()
    }

    fn ops(st: &ChildState<Recorder>) -> Vec<Op> {
        st.c.uffd.ops.borrow().clone()
    }

    /// The waking copy of stored pages `from..to` to where they belong.
    fn copied(from: u64, to: u64) -> Op {
        Op::Copy {
            dst: page(from),
            bytes: bytes(from, to),
            wake: true,
        }
    }

    /// A read fault at `addr` for the child's next service round.
    fn queue_fault(st: &ChildState<Recorder>, addr: u64) {
        st.c.uffd
            .events
            .borrow_mut()
            .push_back(vec![Msg::PageFault {
                address: addr,
                flags: 0,
            }]);
    }

    /// The copy of stored pages `from..to`, waking no one (ahead of a reader).
    fn copied_unwoken(from: u64, to: u64) -> Op {
        Op::Copy {
            dst: page(from),
            bytes: bytes(from, to),
            wake: false,
        }
    }

    /// The wake of the page at `addr`.
    fn woken(addr: u64) -> Op {
        Op::Wake {
            start: addr,
            len: PAGE_SIZE,
        }
    }

    #[test]
    fn a_fault_on_a_stored_page_copies_that_page_from_the_cache() {
        let mut st = child(Recorder::faulting(&[page(3) + 17]), Prefetch::Off, false);
        service(&mut st, &mut Vec::new()).unwrap();
        assert_eq!(ops(&st), vec![copied(3, 4)]);
        assert_eq!(
            st.c.table.get(page(3)),
            Some(Slot::Done(Origin::Stored(PageRef {
                image: 3 * PAGE_SIZE,
                cache: 3 * PAGE_SIZE
            })))
        );
        assert_eq!(st.c.stats.faults.load(Ordering::Relaxed), 1);
        assert_eq!(st.c.stats.pages_fetched.load(Ordering::Relaxed), 1);
        // Its neighbour was not touched.
        assert!(matches!(st.c.table.get(page(4)), Some(Slot::Stored(_))));
    }

    #[test]
    fn a_fault_on_a_never_written_page_installs_the_zero_page() {
        let outside = page(STORED + ZERO) + 5;
        let mut st = child(
            Recorder::faulting(&[page(STORED + 1) + 8, outside]),
            Prefetch::Window,
            false,
        );
        service(&mut st, &mut Vec::new()).unwrap();
        assert_eq!(
            ops(&st),
            vec![
                Op::Zero {
                    dst: page(STORED + 1),
                    len: PAGE_SIZE,
                    wake: true
                },
                // Past the table (a mapping grown in place): zeros too.
                Op::Zero {
                    dst: page(STORED + ZERO),
                    len: PAGE_SIZE,
                    wake: true
                },
            ]
        );
        assert_eq!(
            st.c.table.get(page(STORED + 1)),
            Some(Slot::Done(Origin::Zero))
        );
        assert_eq!(st.c.stats.zero_pages.load(Ordering::Relaxed), 2);
        assert_eq!(st.c.stats.pages_fetched.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_window_fault_copies_the_following_stored_pages_in_one_copy() {
        let mut st = child(Recorder::faulting(&[page(2)]), Prefetch::Window, false);
        service(&mut st, &mut Vec::new()).unwrap();
        let end = 2 + WINDOW_PAGES as u64;
        assert_eq!(ops(&st), vec![copied(2, end)]);
        for i in 2..end {
            assert!(
                matches!(st.c.table.get(page(i)), Some(Slot::Done(_))),
                "{i}"
            );
        }
        assert!(matches!(st.c.table.get(page(end)), Some(Slot::Stored(_))));

        // The next fault, where the window ended, is a sequential reader's:
        // its window doubles, so after the last stored pages (the woken
        // run) it goes on over the zero pages, waking no one, up to the
        // region's end.
        queue_fault(&st, page(end));
        service(&mut st, &mut Vec::new()).unwrap();
        let zero = |i| Op::Zero {
            dst: page(i),
            len: PAGE_SIZE,
            wake: false,
        };
        let want: Vec<Op> = std::iter::once(copied(end, STORED))
            .chain((STORED..STORED + ZERO).map(zero))
            .collect();
        assert_eq!(ops(&st)[1..], want[..]);
        assert_eq!(st.c.table.get(page(STORED)), Some(Slot::Done(Origin::Zero)));
        assert_eq!(st.c.stats.faults.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_window_goes_on_past_a_zero_page_without_waking() {
        // Stored pages 0..8, a zero page at 8, stored pages 9..20.
        let mut st = child(Recorder::faulting(&[page(0)]), Prefetch::Window, false);
        st.c.table.set(page(8), Slot::Zero);
        service(&mut st, &mut Vec::new()).unwrap();
        // The faulting thread's run is copied and woken; the rest of its
        // window (16 pages) goes in after it, unwoken.
        let want = vec![
            copied(0, 8),
            Op::Zero {
                dst: page(8),
                len: PAGE_SIZE,
                wake: false,
            },
            Op::Copy {
                dst: page(9),
                bytes: bytes(9, 16),
                wake: false,
            },
        ];
        assert_eq!(ops(&st), want);
        assert!(matches!(st.c.table.get(page(15)), Some(Slot::Done(_))));
        assert!(matches!(st.c.table.get(page(16)), Some(Slot::Stored(_))));
        // A fault inside that window (the reader caught up) or at its end
        // is a sequential reader's: the window doubles to 32 pages, up to
        // the zero pages past the stored ones.
        queue_fault(&st, page(16));
        service(&mut st, &mut Vec::new()).unwrap();
        assert_eq!(ops(&st)[3], copied(16, STORED));
        assert_eq!(st.window, 2 * WINDOW_PAGES);
    }

    #[test]
    fn a_reader_that_caught_up_with_its_window_gets_more_ahead_once_woken() {
        // Stored pages 0..20: a fault at 0 puts 0..16 in (its window).
        let mut st = child(Recorder::faulting(&[page(0)]), Prefetch::Window, false);
        service(&mut st, &mut Vec::new()).unwrap();
        assert_eq!(ops(&st), vec![copied(0, 16)]);
        // The reader faults inside that window before those pages were in
        // (its fault was queued meanwhile): it is woken, and the pager
        // goes on ahead of it, unwoken, to the end of its window (page 3
        // plus 16): pages 16..19.
        queue_fault(&st, page(3));
        service(&mut st, &mut Vec::new()).unwrap();
        let after: Vec<Op> = ops(&st)[1..].to_vec();
        assert_eq!(after.last(), Some(&copied_unwoken(16, 19)), "{after:?}");
        assert!(
            after
                .iter()
                .any(|o| *o == woken(page(3)) || *o == copied(3, 4)),
            "the faulting thread is woken first: {after:?}"
        );
        assert!(matches!(st.c.table.get(page(18)), Some(Slot::Done(_))));
        assert!(matches!(st.c.table.get(page(19)), Some(Slot::Stored(_))));
    }

    #[test]
    fn a_copy_answering_eexist_counts_as_served() {
        let uffd = Recorder::faulting(&[page(5)]);
        uffd.present.borrow_mut().insert(page(5));
        let mut st = child(uffd, Prefetch::Off, false);
        service(&mut st, &mut Vec::new()).unwrap();
        // The run, then page by page, then the faulting thread is woken.
        assert_eq!(ops(&st), vec![copied(5, 6), copied(5, 6), woken(page(5))]);
        assert!(matches!(st.c.table.get(page(5)), Some(Slot::Done(_))));
        assert_eq!(st.c.stats.faults.load(Ordering::Relaxed), 1);
        assert!(st.c.stats.killed_reason().is_none());
    }

    #[test]
    fn a_run_across_two_mappings_goes_in_page_by_page_and_wakes_the_fault() {
        // The child cut the region (an mprotect: no event) at page 5; the
        // window run 2..18 crosses the cut, so the whole-run fill is
        // refused with ENOENT.
        let uffd = Recorder::faulting(&[page(2)]);
        uffd.cut.set(Some(page(5)));
        let mut st = child(uffd, Prefetch::Window, false);
        service(&mut st, &mut Vec::new()).unwrap();
        let end = 2 + WINDOW_PAGES as u64;
        let mut want = vec![copied(2, end)];
        want.extend((2..end).map(|i| copied(i, i + 1)));
        want.push(woken(page(2)));
        assert_eq!(ops(&st), want);
        for i in 2..end {
            assert!(
                matches!(st.c.table.get(page(i)), Some(Slot::Done(_))),
                "page {i}"
            );
        }
        assert!(st.c.stats.killed_reason().is_none());
    }

    #[test]
    fn a_fault_whose_mapping_went_is_still_woken() {
        // A stored page and a zero page, unmapped after their faults (the
        // unmap's event not yet read): nothing goes in, both threads wake.
        let uffd = Recorder::faulting(&[page(3), page(STORED + 1)]);
        uffd.gone.borrow_mut().extend([page(3), page(STORED + 1)]);
        let mut st = child(uffd, Prefetch::Off, false);
        service(&mut st, &mut Vec::new()).unwrap();
        assert_eq!(
            ops(&st),
            vec![
                copied(3, 4),
                copied(3, 4),
                woken(page(3)),
                Op::Zero {
                    dst: page(STORED + 1),
                    len: PAGE_SIZE,
                    wake: true
                },
                woken(page(STORED + 1)),
            ]
        );
        assert!(st.c.stats.killed_reason().is_none());
    }

    #[test]
    fn one_child_of_a_seed_records_its_sets_at_a_time() {
        let cache =
            SeedCache::new(Box::new(Store { broken: false }), STORED * PAGE_SIZE, 0).unwrap();
        let seed = Arc::new(SeedPages::new(cache, None));
        // Children with pids (so they run: a template's have one too).
        let started = |pid| {
            let mut c = lazy_child(Recorder::default(), Prefetch::Off, seed.clone());
            c.pid = Some(pid);
            ChildState::new(c)
        };
        let first = started(1);
        let second = started(2);
        assert!(first.record);
        assert!(!second.record, "a second child recorded beside the first");
        // The recorder ends without its sets kept (it touched nothing):
        // the next child records.
        keep_sets(first);
        assert!(started(3).record);
        // Once the seed has its sets, nobody records.
        keep_sets(second);
        seed.recorded();
        seed.record_working_set(vec![page(1)]);
        assert!(!started(4).record);
    }

    #[test]
    fn a_recording_child_counts_what_it_touched_in_memory_gone_unsampled_as_written() {
        let cache =
            SeedCache::new(Box::new(Store { broken: false }), STORED * PAGE_SIZE, 0).unwrap();
        let seed = Arc::new(SeedPages::new(cache, None));
        let mut c = lazy_child(
            Recorder::faulting(&[page(2), page(3), page(4), page(8), page(9)]),
            Prefetch::Off,
            seed.clone(),
        );
        // Not a real process: its page map cannot be read, so no sample
        // adds anything here.
        c.pid = Some(i32::MAX);
        let mut st = ChildState::new(c);
        assert!(st.record);
        service(&mut st, &mut Vec::new()).unwrap();
        // A sample had seen page 9 written before pages 8-10 went.
        st.written.insert(page(9));
        // Pages 1-5 went before any sample saw them: what it touched there
        // (2, 3, 4) counts as written; page 1 was never touched.
        st.note_gone(page(1), page(6));
        // Pages 8-10 had been sampled: only what the sample saw counts.
        st.note_gone(page(8), page(11));
        let mut w: Vec<u64> = st.written.union(&st.pending).copied().collect();
        w.sort_unstable();
        assert_eq!(w, vec![page(2), page(3), page(4), page(9)]);
        // Kept as the seed's written set when it ends (it had no output).
        keep_sets(st);
        assert_eq!(
            seed.written_set().as_deref().cloned(),
            Some(vec![page(2), page(3), page(4), page(9)])
        );
        // A child that does not record keeps nothing of the kind.
        let mut other = ChildState::new(lazy_child(Recorder::default(), Prefetch::Off, seed));
        other.note_gone(page(1), page(6));
        assert!(other.written.is_empty());
    }

    /// A recording child (not a real process: no sample adds anything)
    /// that wrote `before` by its last output and `after` since.
    fn wrote(seed: &Arc<SeedPages>, before: &[u64], after: &[u64]) -> ChildState<Recorder> {
        let mut c = lazy_child(Recorder::default(), Prefetch::Off, seed.clone());
        c.pid = Some(i32::MAX);
        let mut st = ChildState::new(c);
        assert!(st.record);
        st.pending.extend(before.iter().map(|&p| page(p)));
        st.c.stats.note_output();
        st.sample_at_output();
        st.pending.extend(after.iter().map(|&p| page(p)));
        st
    }

    fn seed_for_sets() -> Arc<SeedPages> {
        let cache =
            SeedCache::new(Box::new(Store { broken: false }), STORED * PAGE_SIZE, 0).unwrap();
        Arc::new(SeedPages::new(cache, None))
    }

    fn pages(ps: &[u64]) -> Option<Vec<u64>> {
        Some(ps.iter().map(|&p| page(p)).collect())
    }

    #[test]
    fn what_a_recording_child_writes_after_its_answer_is_left_out_where_it_is_most() {
        // An interpreter's teardown: a light request, then every object.
        let seed = seed_for_sets();
        keep_sets(wrote(&seed, &[1, 2], &[3, 4, 5, 6, 7, 8]));
        assert_eq!(seed.written_set().as_deref().cloned(), pages(&[1, 2]));
        // A heap walk's: a few more pages beside the many its request
        // wrote are kept (its exit then takes no faults for them).
        let seed = seed_for_sets();
        keep_sets(wrote(&seed, &[1, 2, 3, 4], &[5, 6]));
        assert_eq!(
            seed.written_set().as_deref().cloned(),
            pages(&[1, 2, 3, 4, 5, 6])
        );
    }

    #[test]
    fn a_recording_child_whose_last_output_was_not_sampled_keeps_all_it_wrote() {
        // Output after the last sample at an output (the child ended
        // before the pager saw it): what came after may be its request's.
        let seed = seed_for_sets();
        let st = wrote(&seed, &[1], &[2, 3, 4]);
        st.c.stats.note_output();
        keep_sets(st);
        assert_eq!(seed.written_set().as_deref().cloned(), pages(&[1, 2, 3, 4]));
        // No output at all (it answers elsewhere): all it wrote.
        let seed = seed_for_sets();
        let mut c = lazy_child(Recorder::default(), Prefetch::Off, seed.clone());
        c.pid = Some(i32::MAX);
        let mut st = ChildState::new(c);
        st.pending.extend([page(5), page(6)]);
        keep_sets(st);
        assert_eq!(seed.written_set().as_deref().cloned(), pages(&[5, 6]));
    }

    #[test]
    fn a_wait_for_the_pagers_figures_is_woken_when_it_lets_go() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(flag.clone());
        let stats = ChildStats::default();
        assert!(!stats.on_finished(&waker));
        assert!(!flag.0.load(Ordering::SeqCst));
        stats.set_finished();
        assert!(flag.0.load(Ordering::SeqCst), "the waiter was not woken");
        assert!(stats.on_finished(&waker));
    }

    #[test]
    fn a_recording_childs_output_wakes_its_pager_thread() {
        let epoll = Epoll::new().unwrap();
        let (mut r, w) = output_pipe(&epoll).unwrap();
        let stats = ChildStats::default();
        // Not recording: no waker, nothing written.
        stats.note_output();
        let mut ready = Vec::new();
        epoll.wait(0, &mut ready).unwrap();
        assert!(ready.is_empty());
        stats.output_waker.set(w).unwrap();
        for _ in 0..100_000 {
            // Never blocks, however many outputs wait unread.
            stats.note_output();
        }
        epoll.wait(0, &mut ready).unwrap();
        assert_eq!(
            ready.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![OUTPUT_TOKEN]
        );
        assert_eq!(stats.outputs.load(Ordering::Relaxed), 100_001);
        let mut b = [0u8; 16];
        assert!(r.read(&mut b).unwrap() > 0);
    }

    #[test]
    fn a_source_failure_kills_the_child_naming_the_page() {
        let mut st = child(Recorder::faulting(&[page(7) + 1]), Prefetch::Off, true);
        let err = service(&mut st, &mut Vec::new()).unwrap_err();
        let reason = st.c.stats.killed_reason().expect("killed");
        assert_eq!(reason, err.to_string());
        assert!(matches!(err, PagerError::Fetch { .. }), "{err:?}");
        assert!(reason.contains(&format!("{:#x}", page(7))), "{reason}");
        assert!(reason.contains("test:store"), "{reason}");
        // Nothing was installed; with no pid, the page is poisoned (SIGBUS).
        assert_eq!(
            ops(&st),
            vec![Op::Poison {
                dst: page(7),
                len: PAGE_SIZE
            }]
        );
        assert!(matches!(st.c.table.get(page(7)), Some(Slot::Stored(_))));
    }

    #[test]
    fn pager_threads_end_when_the_pager_is_dropped() {
        let mut p = Pager::new(2).unwrap();
        let threads = std::mem::take(&mut p.threads);
        assert!(threads.iter().all(|t| !t.is_finished()));
        drop(p);
        // They used to spin on the wake pipe's end of file for ever.
        let t0 = Instant::now();
        while !threads.iter().all(|t| t.is_finished()) {
            assert!(t0.elapsed().as_secs() < 120, "pager threads still running");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
