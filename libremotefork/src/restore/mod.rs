//! Restore: start a new running process from a seed image, on this node.
//!
//! A [`Seed`] checks once what every child of an image needs (the vDSO
//! matches, the files resolve, the privileges are there) and builds nothing
//! that can half-exist. [`Seed::spawn`] then, per child:
//!
//! 1. starts a husk under ptrace, stopped at its exec;
//! 2. builds the [`plan::RestorePlan`] for that husk and maps the executor
//!    area into it with one injected `mmap`;
//! 3. runs the map phase in one go, writes every stored page (eager), runs
//!    the state phase in one go;
//! 4. unmaps the executor with one injected `munmap`, sets the registers
//!    (an interrupted syscall set to restart), XSAVE state and signal mask,
//!    and detaches.
//!
//! On any error the husk is killed and reaped: no half-built child remains.

mod finish;
pub(crate) mod plan;
mod template;

pub(crate) use plan::set_children_outlive_spawner;
pub(crate) use template::set_idle_timeout as set_template_idle_timeout;

/// Where lazily served children's journals go (see
/// [`crate::pager::Journal`]): set by a daemon that hands its children to
/// its successor. None (the default): no journals.
static JOURNAL_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Write lazily served children's address-space events to journals in
/// `dir`, so that another process can take the children over.
pub fn set_journal_dir(dir: Option<PathBuf>) {
    *JOURNAL_DIR.lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// Where this node keeps container rootfs copies by digest (a daemon's
/// state directory has one); a seed's own `rootfs/` is looked in first.
static ROOTFS_STORE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Look for container seeds' rootfs copies in `dir` too.
pub fn set_rootfs_store(dir: Option<PathBuf>) {
    *ROOTFS_STORE.lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// Where a container seed in `seed_dir` may find its rootfs.
pub fn rootfs_stores(seed_dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![seed_dir.join(crate::image::ROOTFS_DIR)];
    if let Some(d) = ROOTFS_STORE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        v.push(d);
    }
    v
}

/// A new journal for the child `pid`, if journals are kept.
fn new_journal(pid: i32) -> Option<crate::pager::Journal> {
    let dir = JOURNAL_DIR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()?;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{pid}-{}-{n}.journal", std::process::id()));
    crate::pager::Journal::create(path)
        .map_err(
            |e| warn!(error = %e, "cannot create a child's journal; it will not outlive forkd"),
        )
        .ok()
}

/// What another process needs to take over a lazily served child.
#[derive(Debug)]
pub struct Handover {
    /// A copy of its userfaultfd.
    pub uffd: std::os::fd::OwnedFd,
    /// The regions its page table was built with (start, length, filled
    /// from the seed cache).
    pub regions: Vec<(u64, u64, bool)>,
    /// Its journal, if journals are kept.
    pub journal: Option<PathBuf>,
}

/// A lazily served child (or forked grandchild) to take over from a
/// process that served it before (see [`Seed::adopt`]).
#[derive(Debug)]
pub struct Adopted {
    /// Its pid, if known.
    pub pid: Option<i32>,
    /// Its pidfd, if known.
    pub pidfd: Option<std::os::fd::OwnedFd>,
    /// Its userfaultfd.
    pub uffd: std::os::fd::OwnedFd,
    /// As in [`Handover::regions`].
    pub regions: Vec<(u64, u64, bool)>,
    /// Its journal, replayed, then written on.
    pub journal: Option<PathBuf>,
    /// Its prefetch mode.
    pub prefetch: Prefetch,
    /// A forked grandchild's number for [`crate::pager::ForkEvent`]s
    /// (take a new one with [`crate::pager::next_fork_id`]).
    pub fork_id: Option<u64>,
}

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::child::{Child, Started};

use kernel_helpers::husk::{self, HuskError};
use kernel_helpers::mapping::ReadOnlyMapping;
use kernel_helpers::mem::{self, MemError, ProcMem, RemoteRange};
use kernel_helpers::ptrace::{PtraceError, Tracee};
use kernel_helpers::{executor, PAGE_SIZE};
use tracing::{debug, info_span, warn};

use crate::fileid::{self, FileIdError};
use crate::image::{Descriptor, ImageError, PageState, SeedImage, VmaKind, FILES_DIR, PAGES_FILE};
use crate::pager::cache::{CacheFds, SeedCache, Verify, NO_SLOT};
use crate::pager::table::{Fill, Origin, PageRef, PageTable, Slot};
use crate::pager::{ChildStats, LazyChild, Pager, Prefetch, SeedPages};
use crate::procfs::{self, ProcfsError};
use crate::transport::local::LocalSource;
use crate::transport::PageSource;
use kernel_helpers::uffd::{self, Uffd, UffdError};
use std::sync::Arc;

/// Room past the end of the cache layout. Mappings of the cache can grow
/// in place (`mremap`); a private file mapping reading past its file's end
/// would get `SIGBUS` where anonymous memory reads zeros. The memfd is
/// sparse, so the slack costs nothing.
const CACHE_SLACK: u64 = 1 << 40;

/// File in an image directory holding the recorded working set.
pub const WORKING_SET_FILE: &str = "workingset.bin";
use finish::ExecutorArea;
use plan::{Backing, HuskLayout, PlanError, ResolvedFile, RestorePlan, SharedCache};

/// `CAP_SETGID`, `CAP_SETUID`, `CAP_SYS_ADMIN`, `CAP_CHECKPOINT_RESTORE`.
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Errors of restore. Each names what failed and on which object.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The node's vDSO differs from the seed's.
    #[error("this node's vDSO differs from the seed's (seed {seed}, here {here}): the kernels differ; restore it on a node running the seed's kernel")]
    VdsoMismatch {
        /// The seed's hash.
        seed: String,
        /// This node's.
        here: String,
    },
    /// The child would not share memory that the parent's fork children share.
    #[error("cannot keep shared memory shared: {0}")]
    SharingLost(String),
    /// The seed's pages do not match their digests.
    #[error("the seed is damaged: {0}; drop it and capture it again")]
    Damaged(String),
    /// A remote seed could not be opened.
    #[error("seed {seed} at {addr}: {why}")]
    Remote {
        /// The seed's id.
        seed: String,
        /// Its page server.
        addr: String,
        /// What failed.
        why: String,
    },
    /// Restore lacks a privilege it needs.
    #[error("not permitted to restore: {0}")]
    NotPermitted(String),
    /// The CPU's XSAVE layout differs.
    #[error(
        "this CPU's XSAVE area is {here} bytes, the seed's is {seed}: the CPUs differ in features"
    )]
    XstateMismatch {
        /// The seed's size.
        seed: usize,
        /// This CPU's.
        here: usize,
    },
    /// A step run inside the husk failed.
    #[error("restore step failed in the child: {what}: {detail}")]
    Step {
        /// The step.
        what: String,
        /// Its error.
        detail: String,
    },
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The husk could not be started.
    #[error(transparent)]
    Husk(#[from] HuskError),
    /// A ptrace operation failed.
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    /// Writing the child's memory failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The image could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// procfs could not be read.
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    /// userfaultfd setup failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A file could not be identified.
    #[error(transparent)]
    FileId(#[from] FileIdError),
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A container child could not be made.
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
}

/// How to start a child: build it from [`SpawnOptions::default`] (lazy,
/// windowed prefetch, shared node cache, from a template) with its
/// setters.
///
/// ```
/// use remotefork::{Prefetch, SpawnOptions};
/// let eager = SpawnOptions::default().lazy(false).template(false);
/// assert!(!eager.lazy && !eager.template);
/// let recorded = SpawnOptions::default().prefetch(Prefetch::Recorded);
/// assert_eq!(recorded.prefetch, Prefetch::Recorded);
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct SpawnOptions {
    /// Serve anonymous memory on demand through userfaultfd (else write it all first).
    pub lazy: bool,
    /// Prefetch mode for lazy children.
    pub prefetch: Prefetch,
    /// Lazy children map the seed's node-local cache privately, so pages
    /// stay shared between children until written (else each gets copies).
    pub share: bool,
    /// Fork the child from this node's template of the seed (restored once,
    /// never run) instead of restoring it from scratch.
    /// The first child of a seed and mode builds the template.
    pub template: bool,
    /// Run the child as this user instead of the parent's (a tenant's
    /// uid): no capabilities, `no_new_privs`, the parent's seccomp filters.
    pub run_as: Option<RunAs>,
    /// What a child of a container seed gets: limits (each unset one is
    /// the parent container's) and network. Ignored for other seeds.
    pub container: crate::container::ChildSpec,
}

/// The user a child runs as when it is not the parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunAs {
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid, and the only supplementary group.
    pub gid: u32,
}

impl SpawnOptions {
    /// Serve memory on demand (`true`) or write it all before the child runs.
    pub fn lazy(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// What a lazy child's pager fetches beyond the faulting page.
    pub fn prefetch(mut self, prefetch: Prefetch) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Map the node's cache of the seed, sharing pages between children
    /// until written (`true`), or give each child copies.
    pub fn share(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// Fork from this node's template of the seed (`true`) or restore from
    /// scratch.
    pub fn template(mut self, template: bool) -> Self {
        self.template = template;
        self
    }

    /// Run the child as another user (no capabilities, `no_new_privs`).
    pub fn run_as(mut self, run_as: Option<RunAs>) -> Self {
        self.run_as = run_as;
        self
    }

    /// Limits and network of a container seed's child.
    pub fn container(mut self, spec: crate::container::ChildSpec) -> Self {
        self.container = spec;
        self
    }
}

impl Default for SpawnOptions {
    fn default() -> Self {
        SpawnOptions {
            lazy: true,
            prefetch: Prefetch::Window,
            share: true,
            template: true,
            run_as: None,
            container: Default::default(),
        }
    }
}

/// Everything needed to start children from one image.
#[derive(Debug)]
pub struct Seed {
    core: Arc<Core>,
}

/// A [`Seed`]'s state, shared with the template service thread.
#[derive(Debug)]
struct Core {
    image: SeedImage,
    resolved: Vec<ResolvedFile>,
    /// A container seed's rootfs on this node.
    rootfs: Option<PathBuf>,
    /// A container seed's files as a child outside any container maps
    /// them ([`crate::container::ChildSpec::host`]): from `rootfs`.
    resolved_host: Vec<ResolvedFile>,
    /// The page store mapped, for a local seed.
    pages: Option<ReadOnlyMapping>,
    /// Offset of a `syscall` instruction inside the vDSO.
    vdso_syscall_offset: u64,
    notes: Vec<String>,
    seed: Arc<SeedPages>,
    pager: Pager,
    uffd_features: u64,
    cache_base: Vec<Option<u64>>,
    /// A remote seed's pages written before its children run, fetched
    /// once for the plan's lazy/eager shape: every child needs the same.
    fetched: std::sync::Mutex<Option<Fetched>>,
    /// Chunks of a local seed's page store checked against their digests
    /// (each once, when a child first has pages written from it).
    store_checked: Vec<std::sync::atomic::AtomicU64>,
    /// This node's templates of the seed, by (lazy, prefetch). Only the
    /// template service thread, their tracer, touches them.
    templates: std::sync::Mutex<template::Templates>,
    /// The background drain was started ([`Seed::drain_in_background`]).
    drain_started: std::sync::atomic::AtomicBool,
    /// Every lazily served page is in the node cache.
    drained: std::sync::atomic::AtomicBool,
}

impl Drop for Core {
    fn drop(&mut self) {
        // Its templates go with it: the template service may be done.
        template::nudge();
    }
}

/// What [`Core::build_child`] leaves: a husk holding the seed's process,
/// still traced, its executor area still mapped.
struct Built {
    husk: Tracee,
    plan: RestorePlan,
    blob: plan::Blob,
    base_regs: libc::user_regs_struct,
    /// A `syscall` instruction in the child's vDSO (at the seed's address).
    child_insn: u64,
    /// The child's userfaultfd number (lazy plans).
    uffd_fd: Option<i64>,
    notes: Vec<String>,
    pages_written: u64,
    t0: Instant,
    /// A container child's cgroup.
    cgroup: Option<crate::container::ChildCgroup>,
    /// Its move into that cgroup, to wait for before it runs.
    attaching: Option<crate::container::cgroup::Attaching>,
}

/// Stored pages fetched for a plan: which mappings were lazy, and the
/// buffer laid out like the page store.
type Fetched = (Vec<bool>, Arc<Vec<u8>>);

impl Seed {
    /// Open the seed in directory `dir` (written by [`crate::capture()`])
    /// and check that its children can be started here.
    pub fn open(dir: &Path) -> Result<Seed, RestoreError> {
        Self::new(SeedImage::open(dir)?)
    }

    /// Check that children of `image` can be started here.
    pub fn new(image: SeedImage) -> Result<Seed, RestoreError> {
        Self::new_adopting(image, None)
    }

    /// [`Seed::new`] over the node cache an earlier process kept for
    /// this seed (its children map it; see [`Seed::cache_fds`]).
    pub fn new_adopting(image: SeedImage, cache: Option<CacheFds>) -> Result<Seed, RestoreError> {
        let d = image.descriptor();
        let ppath = image.dir().join(PAGES_FILE);
        let f = std::fs::File::open(&ppath).map_err(|source| RestoreError::Io {
            what: format!("opening {}", ppath.display()),
            source,
        })?;
        let pages = kernel_helpers::mapping::Mapping::file_readonly(&f, d.image_bytes as usize)
            .map_err(|source| RestoreError::Io {
                what: format!("mapping {}", ppath.display()),
                source,
            })?;
        let source =
            LocalSource::open(&ppath, d.image_bytes).map_err(|source| RestoreError::Io {
                what: format!("opening {}", ppath.display()),
                source,
            })?;
        Self::build(image, Some(pages), Box::new(source), cache)
    }

    /// Copies of the node cache's memfds, to hand to a process that will
    /// serve this seed's children after this one.
    pub fn cache_fds(&self) -> std::io::Result<CacheFds> {
        self.core.seed.cache.fds()
    }

    /// For a seed whose pages come from another node: fetch every page its
    /// children may fault on into this node's cache, in the background, at
    /// a low priority and a bounded rate (1 MiB, then a pause). Once done
    /// ([`Seed::drained`]), children here no longer depend on the seed's
    /// node: its loss kills none of them (their faults are served from the
    /// cache). Started once; a fetch that fails ends it (faults then fetch
    /// what they need, as before).
    pub fn drain_in_background(&self) {
        use std::sync::atomic::Ordering;
        if self.core.pages.is_some() || self.core.drain_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let core = self.core.clone();
        let started = std::thread::Builder::new()
            .name("rf-drain".into())
            .spawn(move || {
                // SAFETY: setpriority on this thread (tid); no memory passed.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 19);
                }
                let refs = core.lazy_page_refs();
                let t = Instant::now();
                for batch in refs.chunks(256) {
                    if let Err(e) = core.seed.cache.ensure(batch) {
                        warn!(error = %e, "draining the seed into the node cache stopped; faults fetch what they need");
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                core.drained.store(true, Ordering::Release);
                tracing::info!(
                    pages = refs.len(),
                    ms = t.elapsed().as_millis() as u64,
                    source = %core.seed.cache.source_name(),
                    "seed drained into the node cache: its children here no longer need its node"
                );
            });
        if let Err(e) = started {
            warn!(error = %e, "cannot start the drain thread");
        }
    }

    /// Is every lazily served page of the seed in this node's cache?
    pub fn drained(&self) -> bool {
        self.core.pages.is_some() || self.core.drained.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Tell `sink` about every grandchild forked inside this seed's lazily
    /// served children (to hand their userfaultfds over too), and about
    /// each lazily served child just before it first runs.
    pub fn set_fork_sink(&self, sink: crate::pager::ForkSink) {
        *self
            .core
            .seed
            .fork_sink
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// Serve a lazily served child that another process served before (a
    /// restarted forkd): its table is rebuilt from the seed and its
    /// journal, and every thread waiting on a fault the other process read
    /// but never served is woken to fault again.
    pub fn adopt(&self, a: Adopted) -> Result<Arc<ChildStats>, RestoreError> {
        let mut table = self.core.table_for(&a.regions)?;
        let journal = match &a.journal {
            Some(p) => {
                crate::pager::Journal::replay(p, &mut table).map_err(|source| {
                    RestoreError::Io {
                        what: format!("replaying {}", p.display()),
                        source,
                    }
                })?;
                Some(crate::pager::Journal::reopen(p.clone()).map_err(|source| {
                    RestoreError::Io {
                        what: format!("reopening {}", p.display()),
                        source,
                    }
                })?)
            }
            None => None,
        };
        let uffd = Uffd::from_owned(a.uffd);
        uffd.set_nonblocking().map_err(|source| RestoreError::Io {
            what: "making the userfaultfd non-blocking".into(),
            source,
        })?;
        for (start, len, _) in table.regions() {
            let _ = uffd.wake(start, len);
        }
        let stats = Arc::new(ChildStats::default());
        self.core.pager.add(LazyChild {
            pid: a.pid,
            parent_pid: None,
            uffd,
            pidfd: a.pidfd,
            table,
            seed: self.core.seed.clone(),
            prefetch: a.prefetch,
            stats: stats.clone(),
            on_fork: None,
            journal,
            fork_id: a.fork_id,
            initial: Arc::new(a.regions),
        });
        Ok(stats)
    }

    /// Children of a seed held by another node: `image` is its descriptor
    /// (no page store here), `source` reaches its pages. A seed with a
    /// writable shared mapping of a file is refused: writes through it
    /// would land in this node's file, not the one the parent shares.
    pub fn remote(image: SeedImage, source: Box<dyn PageSource>) -> Result<Seed, RestoreError> {
        Self::remote_adopting(image, source, None)
    }

    /// [`Seed::remote`] over the node cache an earlier process kept.
    pub fn remote_adopting(
        image: SeedImage,
        source: Box<dyn PageSource>,
        cache: Option<CacheFds>,
    ) -> Result<Seed, RestoreError> {
        let d = image.descriptor();
        if let Some(v) = d
            .vmas
            .iter()
            .find(|v| v.kind == VmaKind::FileShared && v.prot & libc::PROT_WRITE as u32 != 0)
        {
            return Err(RestoreError::SharingLost(format!(
                "the seed maps {} shared and writable ({:#x}-{:#x}); a child on another node \
                 would write to that node's file, not share the parent's: start it on the seed's node",
                v.path, v.start, v.end
            )));
        }
        Self::build(image, None, source, cache)
    }

    fn build(
        image: SeedImage,
        pages: Option<ReadOnlyMapping>,
        source: Box<dyn PageSource>,
        adopt: Option<CacheFds>,
    ) -> Result<Seed, RestoreError> {
        let d = image.descriptor();
        let (here_hash, vdso_syscall_offset) = own_vdso()?;
        if here_hash != d.vdso_hash {
            return Err(RestoreError::VdsoMismatch {
                seed: d.vdso_hash.clone(),
                here: here_hash,
            });
        }
        check_privileges(d)?;
        let mut notes = shared_memory_notes(d, pages.is_none());
        let (resolved, rootfs) =
            match &d.container {
                Some(c) => {
                    let stores = rootfs_stores(image.dir());
                    let dir = crate::container::rootfs::find(&c.rootfs_digest, &stores)
                        .ok_or_else(|| crate::container::ContainerError::RootfsMissing {
                            digest: c.rootfs_digest.clone(),
                            looked: stores
                                .iter()
                                .map(|s| s.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                        })?;
                    notes.extend(c.not_kept.iter().map(|n| format!("not in children: {n}")));
                    (resolve_container_files(&dir, d, &mut notes)?, Some(dir))
                }
                None => (resolve_files(image.dir(), d, &mut notes)?, None),
            };
        // The same files, as a child outside any container maps them:
        // from the rootfs copy itself (already checked above).
        let resolved_host = match &rootfs {
            Some(dir) => {
                let root = crate::container::assembly_dir().join("root");
                resolved
                    .iter()
                    .map(|f| match f {
                        ResolvedFile::Local(p) => ResolvedFile::Local(
                            dir.join(Path::new(p).strip_prefix(&root).unwrap_or(Path::new(p)))
                                .to_string_lossy()
                                .into_owned(),
                        ),
                        other => other.clone(),
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let (cache_base, cache_size) = plan::cache_layout(d);
        let verify = d.digests.clone().map(|digests| Verify {
            digests,
            image_bytes: d.image_bytes,
            slots: cache_slots(d, &cache_base),
        });
        if verify.is_none() {
            notes.push(
                "this seed predates page digests (format 1): its pages are not checked".into(),
            );
        }
        let size = cache_size.max(PAGE_SIZE);
        let cache = match adopt {
            Some(fds) => SeedCache::adopt(source, size, CACHE_SLACK, verify, fds),
            None => SeedCache::with_verify(source, size, CACHE_SLACK, verify),
        }
        .map_err(|source| RestoreError::Io {
            what: "reserving the seed cache".into(),
            source,
        })?;
        let seed = Arc::new(SeedPages::new(
            cache,
            Some(image.dir().join(WORKING_SET_FILE)),
        ));
        seed.set_private_regions(
            d.vmas
                .iter()
                .zip(&cache_base)
                .filter(|(v, base)| {
                    base.is_none()
                        && !v.shared
                        && v.prot & libc::PROT_WRITE as u32 != 0
                        && matches!(
                            v.kind,
                            VmaKind::Anon | VmaKind::Heap | VmaKind::Stack | VmaKind::FilePrivate
                        )
                })
                .map(|(v, _)| (v.start, v.end - v.start))
                .collect(),
        );
        let pager = Pager::new(2).map_err(|source| RestoreError::Io {
            what: "starting the pager".into(),
            source,
        })?;
        let have = Uffd::available_features()?;
        let need = uffd::FEATURE_EVENT_FORK
            | uffd::FEATURE_EVENT_REMAP
            | uffd::FEATURE_EVENT_REMOVE
            | uffd::FEATURE_EVENT_UNMAP;
        if have & need != need {
            return Err(RestoreError::Uffd(UffdError::Features {
                missing: need & !have,
                have,
            }));
        }
        // Sharing the cache needs minor faults on shmem; without them
        // children get copies (SpawnOptions::share is then ignored).
        let uffd_features = need
            | (have
                & (uffd::FEATURE_MISSING_SHMEM | uffd::FEATURE_MINOR_SHMEM | uffd::FEATURE_POISON));
        let chunks = d.digests.as_ref().map_or(0, |g| g.xxh3.len());
        Ok(Seed {
            core: Arc::new(Core {
                image,
                resolved,
                rootfs,
                resolved_host,
                pages,
                vdso_syscall_offset,
                notes,
                seed,
                pager,
                uffd_features,
                cache_base,
                fetched: std::sync::Mutex::new(None),
                drain_started: Default::default(),
                drained: Default::default(),
                store_checked: (0..chunks.div_ceil(64))
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .collect(),
                templates: Default::default(),
            }),
        })
    }

    /// The image.
    pub fn image(&self) -> &SeedImage {
        &self.core.image
    }

    /// Why the seed is damaged, if a page read from it did not match its
    /// digest (children are refused from then on).
    pub fn damaged(&self) -> Option<String> {
        self.core.seed.cache.damaged()
    }

    /// This seed's pages on this node (cache, working set, metrics).
    pub fn seed_pages(&self) -> &Arc<SeedPages> {
        &self.core.seed
    }

    /// Pids of this seed's templates on this node (processes that never
    /// run; their memory is shared with the children forked from them).
    pub fn template_pids(&self) -> Vec<i32> {
        template::pids(&self.core)
    }

    /// Start one child. It runs when this returns.
    ///
    /// The calling thread becomes the child's ptrace parent for the
    /// restore and its parent thread after: a lazy child is set to die
    /// with the thread that spawned it (`PR_SET_PDEATHSIG` belongs to the
    /// parent *thread*), so spawn from threads that live as long as the
    /// children should. The calling process reaps the child (see
    /// [`Child`]).
    pub fn spawn(
        &self,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
        opts: &SpawnOptions,
    ) -> Result<Child, RestoreError> {
        let mut pipes = crate::child::Pipes::default();
        let stdin = stdin.into_io(true, &mut pipes.stdin)?;
        let stdout = stdout.into_io(false, &mut pipes.stdout)?;
        let stderr = stderr.into_io(false, &mut pipes.stderr)?;
        let started = self.spawn_io(stdin, stdout, stderr, opts)?;
        let pid = started.pid;
        let lazy = started.handover.is_some();
        Child::new(started, pipes).map_err(|e| {
            // Without its pidfd it cannot be handed out safely.
            kernel_helpers::proc::kill_and_reap(pid);
            if lazy {
                self.core.seed.announce_not_started(pid);
            }
            RestoreError::Io {
                what: format!("taking child {pid}'s pidfd"),
                source: std::io::Error::other(e.to_string()),
            }
        })
    }

    /// Make this node ready to start children of `opts` at once, without
    /// starting one: for a seed of another node, fetch what its children
    /// need first; with `opts.template`, build this node's template for
    /// `opts` and fork its spare (see the module doc). The first spawn
    /// after it then pays for neither. Whether a template was built now
    /// (false: it was there already, or `opts.template` is off).
    pub fn prepare(&self, opts: &SpawnOptions) -> Result<bool, RestoreError> {
        if let Some(why) = self.core.seed.cache.damaged() {
            return Err(RestoreError::Damaged(why));
        }
        if opts.template {
            template::prepare(&self.core, opts)
        } else {
            self.core.prewarm(opts.lazy, false)?;
            Ok(false)
        }
    }

    fn spawn_io(
        &self,
        stdin: husk::Io,
        stdout: husk::Io,
        stderr: husk::Io,
        opts: &SpawnOptions,
    ) -> Result<Started, RestoreError> {
        if let Some(why) = self.core.seed.cache.damaged() {
            return Err(RestoreError::Damaged(why));
        }
        if opts.template {
            template::spawn(&self.core, stdin, stdout, stderr, opts)
        } else {
            self.core.spawn_direct(stdin, stdout, stderr, opts)
        }
    }
}

/// One of a child's standard streams, for [`Seed::spawn`].
#[derive(Debug)]
pub enum Stdio {
    /// The caller's own.
    Inherit,
    /// `/dev/null`.
    Null,
    /// A new pipe; the caller's end is in the [`Child`]
    /// ([`Child::take_stdin`], [`Child::take_stdout`], [`Child::take_stderr`]).
    Piped,
    /// This descriptor (a file, a socket, one end of the caller's pipe);
    /// closed in the caller once the child has it.
    Fd(std::os::fd::OwnedFd),
}

impl Stdio {
    /// The stream as the husk takes it; a pipe's other end goes to `mine`.
    fn into_io(
        self,
        input: bool,
        mine: &mut Option<std::fs::File>,
    ) -> Result<husk::Io, RestoreError> {
        Ok(match self {
            Stdio::Inherit => husk::Io::Inherit,
            Stdio::Null => husk::Io::Null,
            Stdio::Fd(fd) => husk::Io::Fd(fd),
            Stdio::Piped => {
                let (r, w) = std::io::pipe().map_err(|source| RestoreError::Io {
                    what: "creating a pipe for the child".into(),
                    source,
                })?;
                let (child_end, my_end): (std::os::fd::OwnedFd, std::os::fd::OwnedFd) = if input {
                    (r.into(), w.into())
                } else {
                    (w.into(), r.into())
                };
                *mine = Some(my_end.into());
                husk::Io::Fd(child_end)
            }
        })
    }
}

impl Core {
    /// Restore one child from scratch in a new husk.
    fn spawn_direct(
        &self,
        stdin: husk::Io,
        stdout: husk::Io,
        stderr: husk::Io,
        opts: &SpawnOptions,
    ) -> Result<Started, RestoreError> {
        let d = self.image.descriptor();
        let Built {
            husk,
            plan,
            base_regs,
            child_insn,
            uffd_fd,
            notes,
            pages_written,
            t0,
            cgroup,
            attaching,
            ..
        } = self.build_child(stdin, stdout, stderr, opts, 0, false)?;
        if let Some(a) = attaching {
            a.wait().map_err(crate::container::ContainerError::from)?;
            debug!(us = t0.elapsed().as_micros() as u64, "in its cgroup");
        }
        let pid = husk.pid();
        let exec = ExecutorArea {
            insn: child_insn,
            base_regs,
            base: plan.base,
            len: plan.area_len(),
        };
        let mut paging: Option<Arc<ChildStats>> = None;
        // A lazy child's userfaultfd, for the fork sink just before it runs.
        let starting: std::cell::Cell<Option<std::os::fd::OwnedFd>> = Default::default();
        let announced = std::cell::Cell::new(false);
        // A seed with threads: this thread and the child (with the threads
        // made in it, a few stops each) on one CPU until just before it
        // runs (see `onecpu`).
        let mut one = if d.thread_set.others.is_empty() {
            None
        } else {
            crate::onecpu::OneCpu::here(pid)
        };
        if let Some(o) = one.as_mut() {
            o.whole_process(pid, pid);
        }
        let (stats, handover) = finish::finish(
            husk,
            &exec,
            d,
            || match uffd_fd {
                Some(fd) => {
                    let (s, h) = self.start_paging(pid, &plan, fd, opts, None)?;
                    paging = Some(s.clone());
                    starting.set(h.as_ref().and_then(|h| h.uffd.try_clone().ok()));
                    Ok((Some(s), h))
                }
                None => Ok((None, None)),
            },
            || {
                drop(one);
                if let Some(u) = starting.take() {
                    announced.set(self.seed.announce_starting(pid, &u));
                }
            },
        )
        .map_err(|e| {
            if announced.get() {
                self.seed.announce_not_started(pid);
            }
            served_or(e, paging.as_deref())
        })?;
        let restore_ns = t0.elapsed().as_nanos() as u64;
        debug!(pid, us = restore_ns / 1000, "child running");
        Ok(Started {
            pid,
            notes,
            restore_ns,
            pages_written,
            stats,
            handover,
            cgroup,
        })
    }

    /// Start a husk and rebuild the seed's process in it: mappings, memory
    /// (eager pages), process state. `extra` bytes are reserved after the
    /// executor, which stays mapped.
    fn build_child(
        &self,
        stdin: husk::Io,
        stdout: husk::Io,
        stderr: husk::Io,
        opts: &SpawnOptions,
        extra: u64,
        template: bool,
    ) -> Result<Built, RestoreError> {
        let d = self.image.descriptor();
        let span = info_span!("restore", seed_pid = d.source.pid);
        let _g = span.enter();
        let t0 = Instant::now();
        let host = opts.container.host;
        let isolation = match (&d.container, &self.rootfs) {
            (Some(c), Some(lower)) if !host => {
                let mut iso = crate::container::child_isolation(c, lower, &opts.container);
                if template {
                    // Its children are forked with CLONE_PARENT, which the
                    // init of a pid namespace may not use; each child gets
                    // its pid namespace at the fork.
                    iso.namespaces &= !libc::CLONE_NEWPID;
                }
                Some(iso)
            }
            _ => None,
        };
        if isolation.is_some() {
            std::fs::create_dir_all(crate::container::assembly_dir()).map_err(|source| {
                RestoreError::Io {
                    what: "making the directory container roots are assembled in".into(),
                    source,
                }
            })?;
        }
        let mut husk = husk::spawn_in(stdin, stdout, stderr, isolation.as_ref())?;
        let pid = husk.pid();
        if isolation.is_some() {
            debug!(
                us = t0.elapsed().as_micros() as u64,
                "container husk started"
            );
        }
        // Its cgroup before it runs a single instruction of the child.
        let cgroup = match &d.container {
            Some(c) if !host && !template => {
                let limits = opts.container.limits.or(c.limits);
                let cg = crate::container::ChildCgroup::create(
                    &format!("{}-{pid}", std::process::id()),
                    limits,
                )
                .map_err(crate::container::ContainerError::from)?;
                // Moved in while the restore goes on; waited for before the
                // child runs.
                let attaching = cg.attach_in_background(pid);
                debug!(us = t0.elapsed().as_micros() as u64, "cgroup made");
                Some((cg, attaching))
            }
            _ => None,
        };
        let (cgroup, attaching) = match cgroup {
            Some((cg, a)) => (Some(cg), Some(a)),
            None => (None, None),
        };
        let container_root = isolation.as_ref().map(|_| {
            crate::container::assembly_dir()
                .join("root")
                .to_string_lossy()
                .into_owned()
        });
        let layout = HuskLayout {
            maps: procfs::maps(pid)?
                .into_iter()
                .filter(|m| m.path != "[vsyscall]")
                .collect(),
        };
        debug!(us = t0.elapsed().as_micros() as u64, "husk stopped at exec");
        let shared = SharedCache {
            path: self.seed.cache.memfd_path(),
            base: self.cache_base.clone(),
        };
        let can_share = opts.share
            && self.uffd_features & uffd::FEATURE_MINOR_SHMEM != 0
            && self.uffd_features & uffd::FEATURE_MISSING_SHMEM != 0;
        let plan = plan::build(
            d,
            &layout,
            if host && self.rootfs.is_some() {
                &self.resolved_host
            } else {
                &self.resolved
            },
            opts.lazy,
            can_share.then_some(&shared),
            extra,
            plan::Who {
                run_as: opts.run_as,
                container_root: container_root.as_deref(),
                defer_privileges: template && isolation.is_some(),
            },
        )?;
        let base_regs = husk.regs()?;
        let here_xstate = husk.xstate()?.len();
        if here_xstate != d.xstate.len() {
            return Err(RestoreError::XstateMismatch {
                seed: d.xstate.len(),
                here: here_xstate,
            });
        }
        let husk_vdso = layout
            .maps
            .iter()
            .find(|m| m.path == "[vdso]")
            .ok_or_else(|| RestoreError::Step {
                what: "finding the husk's vDSO".into(),
                detail: "none mapped".into(),
            })?;
        let insn = husk_vdso.start + self.vdso_syscall_offset;

        // The executor area.
        let blob = plan.blob();
        let len = plan.area_len();
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let r = husk.inject_syscall(
            insn,
            &base_regs,
            libc::SYS_mmap,
            [plan.base, len, prot, flags, u64::MAX, 0],
        )?;
        if r.ret as u64 != plan.base {
            return Err(RestoreError::Step {
                what: format!("mapping the executor at {:#x}", plan.base),
                detail: errno_text(r.ret),
            });
        }
        mem::write_ranges(
            pid,
            &[&blob.bytes],
            &[RemoteRange {
                addr: plan.base,
                len: blob.bytes.len(),
            }],
        )?;

        run_phase(
            &mut husk,
            &plan,
            &base_regs,
            blob.code,
            blob.map_table,
            false,
        )?;
        debug!(us = t0.elapsed().as_micros() as u64, "mappings in place");
        let pages_written = self.write_pages(pid, &plan)?;
        debug!(
            us = t0.elapsed().as_micros() as u64,
            pages_written, "memory in place"
        );
        run_phase(
            &mut husk,
            &plan,
            &base_regs,
            blob.code,
            blob.state_table,
            true,
        )?;

        debug!(
            us = t0.elapsed().as_micros() as u64,
            "process state in place"
        );
        let mut notes = self.notes.clone();
        notes.extend(plan.notes.iter().cloned());
        let uffd_fd = match plan.uffd_slot {
            Some(slot) => {
                let mut w = [0u8; 8];
                mem::read_ranges(
                    pid,
                    &[RemoteRange {
                        addr: blob.data + slot as u64,
                        len: 8,
                    }],
                    &mut w,
                )?;
                Some(i64::from_le_bytes(w))
            }
            None => None,
        };
        for s in &plan.soft_steps {
            let mut w = [0u8; 8];
            mem::read_ranges(
                pid,
                &[RemoteRange {
                    addr: blob.data + s.result_at as u64,
                    len: 8,
                }],
                &mut w,
            )?;
            let ret = i64::from_le_bytes(w);
            if (-4095..0).contains(&ret) {
                notes.push(format!(
                    "{} failed in the child: {}",
                    s.what,
                    errno_text(ret)
                ));
            }
        }

        notes.extend(replaced_files(d, pid));

        let child_vdso = d
            .vmas
            .iter()
            .find(|v| v.kind == VmaKind::Vdso)
            .map(|v| v.start)
            .ok_or_else(|| RestoreError::Step {
                what: "finding the seed's vDSO".into(),
                detail: "none recorded".into(),
            })?;
        Ok(Built {
            husk,
            plan,
            blob,
            base_regs,
            child_insn: child_vdso + self.vdso_syscall_offset,
            uffd_fd,
            notes,
            pages_written,
            t0,
            cgroup,
            attaching,
        })
    }

    /// Take the child's userfaultfd, register its lazy mappings and hand it
    /// to the pager. Called before the child runs.
    fn start_paging(
        &self,
        pid: i32,
        plan: &RestorePlan,
        fd: i64,
        opts: &SpawnOptions,
        on_fork: Option<std::sync::mpsc::Sender<LazyChild>>,
    ) -> Result<(Arc<ChildStats>, Option<Handover>), RestoreError> {
        let d = self.image.descriptor();
        if !(0..=i32::MAX as i64).contains(&fd) {
            return Err(RestoreError::Step {
                what: "creating the child's userfaultfd".into(),
                detail: errno_text(fd),
            });
        }
        let uffd = Uffd::take_from(pid, fd as i32)?;
        uffd.api(self.uffd_features)?;
        let mut regions = Vec::new();
        for (i, vma) in d.vmas.iter().enumerate() {
            if !plan.lazy[i] {
                continue;
            }
            if plan.from_cache[i] {
                uffd.register_minor(vma.start, vma.end - vma.start)?;
            } else {
                uffd.register(vma.start, vma.end - vma.start)?;
            }
            regions.push((vma.start, vma.end - vma.start, plan.from_cache[i]));
        }
        let table = self.table_for(&regions)?;
        let pidfd = uffd::pidfd_open(pid).map_err(|source| RestoreError::Io {
            what: format!("pidfd_open({pid})"),
            source,
        })?;
        let stats = Arc::new(ChildStats::default());
        // A template's children get their journals when they are forked.
        let journal = on_fork.is_none().then(|| new_journal(pid)).flatten();
        let handover = match on_fork {
            Some(_) => None,
            None => Some(Handover {
                uffd: uffd.dup().map_err(|source| RestoreError::Io {
                    what: "duplicating the child's userfaultfd".into(),
                    source,
                })?,
                regions: regions.clone(),
                journal: journal.as_ref().map(|j| j.path().to_path_buf()),
            }),
        };
        let mut child = LazyChild {
            pid: Some(pid),
            parent_pid: None,
            journal,
            fork_id: None,
            initial: Arc::new(regions),
            uffd,
            pidfd: Some(pidfd),
            table,
            seed: self.seed.clone(),
            prefetch: opts.prefetch,
            stats: stats.clone(),
            on_fork,
        };
        if child.on_fork.is_some() && opts.prefetch == Prefetch::Recorded {
            // A template: every child it forks gets the working set as
            // present pages.
            let (c, r) = child.install_working_set();
            child = c;
            match r {
                Ok(n) => debug!(pages = n, "working set installed in the template"),
                Err(reason) => {
                    return Err(RestoreError::Step {
                        what: "installing the working set in the template".into(),
                        detail: reason.to_string(),
                    })
                }
            }
        }
        self.pager.add(child);
        Ok((stats, handover))
    }

    /// Every stored page of the lazily served mappings, in cache order.
    fn lazy_page_refs(&self) -> Vec<PageRef> {
        let d = self.image.descriptor();
        let mut refs = Vec::new();
        for (v, base) in d.vmas.iter().zip(&self.cache_base) {
            let Some(base) = base else {
                continue;
            };
            for r in &v.runs {
                if let PageState::Stored { offset } = r.state {
                    refs.extend((0..r.count).map(|k| PageRef {
                        image: offset + k * PAGE_SIZE,
                        cache: base + (r.first + k) * PAGE_SIZE,
                    }));
                }
            }
        }
        refs
    }

    /// The page table of a child whose lazily served regions are `regions`
    /// (start, length, from the cache), as the seed has them.
    fn table_for(&self, regions: &[(u64, u64, bool)]) -> Result<PageTable, RestoreError> {
        let d = self.image.descriptor();
        let early = self.early_pages();
        let mut table = PageTable::default();
        for &(start, len, from_cache) in regions {
            let found = d
                .vmas
                .iter()
                .enumerate()
                .find(|(_, v)| v.start == start && v.end - v.start == len);
            let (Some((i, vma)), true) = (found, len > 0) else {
                return Err(RestoreError::Step {
                    what: format!("serving {start:#x}+{len:#x}"),
                    detail: "the seed has no such mapping".into(),
                });
            };
            let Some(base) = self.cache_base.get(i).copied().flatten() else {
                return Err(RestoreError::Step {
                    what: format!("serving {:#x}-{:#x}", vma.start, vma.end),
                    detail: "no place in the seed cache".into(),
                });
            };
            let mut slots = Vec::with_capacity(vma.pages() as usize);
            for r in &vma.runs {
                for k in 0..r.count {
                    let page = r.first + k;
                    slots.push(match r.state {
                        PageState::Stored { offset } => {
                            let pr = PageRef {
                                image: offset + k * PAGE_SIZE,
                                cache: base + page * PAGE_SIZE,
                            };
                            // Written before the child ran (see early_pages).
                            if clip(vma.start, page, 1, early).is_some() {
                                Slot::Done(Origin::Stored(pr))
                            } else {
                                Slot::Stored(pr)
                            }
                        }
                        _ => Slot::Zero,
                    });
                }
            }
            let fill = if from_cache {
                Fill::Continue
            } else {
                Fill::Copy
            };
            table.insert(vma.start, slots, fill);
        }
        Ok(table)
    }

    /// [`Self::fetch_stored`], once per plan shape (concurrent first
    /// spawns wait for the one fetch).
    fn fetched_stored(&self, plan: &RestorePlan) -> Result<Arc<Vec<u8>>, RestoreError> {
        self.fetched_shape(&plan.lazy, &plan.backing)
    }

    /// [`Self::fetched_stored`] for a plan whose per-mapping lazy flags
    /// and backings are these.
    fn fetched_shape(
        &self,
        lazy: &[bool],
        backing: &[Backing],
    ) -> Result<Arc<Vec<u8>>, RestoreError> {
        let mut g = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, buf)) = g.as_ref() {
            if l == lazy {
                return Ok(buf.clone());
            }
        }
        let buf = Arc::new(self.fetch_stored(lazy, backing)?);
        *g = Some((lazy.to_vec(), buf.clone()));
        Ok(buf)
    }

    /// For a remote seed, fetch what a template of it needs before the
    /// template service builds it (there, a slow fetch would hold up every
    /// seed's spawns): the pages written before its children run, and
    /// (`working_set`) the recorded working set, into the seed cache.
    fn prewarm(&self, lazy: bool, working_set: bool) -> Result<(), RestoreError> {
        if self.pages.is_some() {
            return Ok(()); // a local seed: nothing to fetch
        }
        let d = self.image.descriptor();
        // The plan's shape, from the descriptor (see plan::build).
        let lazy_v: Vec<bool> = d
            .vmas
            .iter()
            .map(|v| lazy && plan::lazy_candidate(v))
            .collect();
        let backing: Vec<Backing> = d
            .vmas
            .iter()
            .map(|v| {
                if v.kind.is_kernel_provided() {
                    Backing::Kernel
                } else {
                    Backing::Anonymous
                }
            })
            .collect();
        self.fetched_shape(&lazy_v, &backing)?;
        let Some(ws) = self.seed.working_set().filter(|_| working_set) else {
            return Ok(());
        };
        let mut refs = Vec::new();
        for (i, v) in d.vmas.iter().enumerate() {
            let Some(base) = self
                .cache_base
                .get(i)
                .copied()
                .flatten()
                .filter(|_| lazy_v[i])
            else {
                continue;
            };
            for &a in ws.iter().filter(|a| (v.start..v.end).contains(*a)) {
                let page = (a - v.start) / PAGE_SIZE;
                let stored = v.runs.iter().find_map(|r| match r.state {
                    PageState::Stored { offset }
                        if (r.first..r.first + r.count).contains(&page) =>
                    {
                        Some(offset + (page - r.first) * PAGE_SIZE)
                    }
                    _ => None,
                });
                if let Some(image) = stored {
                    refs.push(PageRef {
                        image,
                        cache: base + page * PAGE_SIZE,
                    });
                }
            }
        }
        refs.sort_unstable_by_key(|r| r.cache);
        refs.dedup();
        for chunk in refs.chunks(1024) {
            self.seed
                .cache
                .ensure(chunk)
                .map_err(|e| RestoreError::Step {
                    what: "fetching the working set".into(),
                    detail: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// The stored pages the plan writes before the child runs, read from
    /// the page source into a buffer laid out like the page store (pages not
    /// needed stay zero).
    fn fetch_stored(&self, lazy: &[bool], backing: &[Backing]) -> Result<Vec<u8>, RestoreError> {
        let d = self.image.descriptor();
        let mut buf = vec![0u8; d.image_bytes as usize];
        let mut want: Vec<(u64, usize)> = Vec::new();
        for ((vma, b), lazy) in d.vmas.iter().zip(backing).zip(lazy) {
            if *b == Backing::Kernel {
                continue;
            }
            for run in &vma.runs {
                if let PageState::Stored { offset } = run.state {
                    let clipped = if *lazy {
                        clip(vma.start, run.first, run.count, self.early_pages())
                    } else {
                        Some((run.first, run.count))
                    };
                    if let Some((first, count)) = clipped {
                        want.push((
                            offset + (first - run.first) * PAGE_SIZE,
                            (count * PAGE_SIZE) as usize,
                        ));
                    }
                }
            }
        }
        want.sort_unstable();
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::new();
        let mut rest: &mut [u8] = &mut buf;
        let mut at = 0u64;
        for (off, len) in want {
            if off < at {
                continue;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((off - at) as usize);
            let (mine, tail) = tail.split_at_mut(len);
            reqs.push((off, mine));
            rest = tail;
            at = off + len as u64;
        }
        for chunk in reqs.chunks_mut(512) {
            self.seed
                .cache
                .read_through(chunk)
                .map_err(|e| RestoreError::Step {
                    what: "fetching stored pages".into(),
                    detail: e.to_string(),
                })?;
        }
        Ok(buf)
    }

    /// Pages of lazily served memory that the kernel itself writes during
    /// the state phase, before the pager is there: registering rseq writes
    /// its cpu fields. Were they left lazy, the kernel would fault in a zero
    /// page and the parent's data around them would be lost, so they are
    /// written with the eager pages.
    fn early_pages(&self) -> Option<(u64, u64)> {
        self.image.descriptor().rseq.map(|r| {
            let start = r.ptr & !(PAGE_SIZE - 1);
            let end = (r.ptr + r.len as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            (start, end)
        })
    }

    /// Check the chunks of a local seed's page store under `ranges`
    /// (store offset, length) against their digests, each chunk once; a
    /// mismatch marks the seed damaged.
    fn check_store(&self, store: &[u8], ranges: &[(u64, usize)]) -> Result<(), RestoreError> {
        use std::sync::atomic::Ordering;
        let Some(g) = &self.image.descriptor().digests else {
            return Ok(());
        };
        let cb = g.chunk_bytes as u64;
        for &(off, len) in ranges.iter().filter(|r| r.1 > 0) {
            for c in (off / cb) as usize..=((off + len as u64 - 1) / cb) as usize {
                let (word, bit) = (&self.store_checked[c / 64], 1u64 << (c % 64));
                if word.load(Ordering::Acquire) & bit != 0 {
                    continue;
                }
                let (a, b) = g.chunk_range(c, store.len() as u64);
                if !g.check(c, &store[a as usize..b as usize]) {
                    let why = format!(
                        "chunk {c} of {} (bytes {a:#x}..{b:#x}) does not match its digest",
                        self.image.dir().join(PAGES_FILE).display()
                    );
                    self.seed.cache.mark_damaged(&why);
                    return Err(RestoreError::Damaged(why));
                }
                word.fetch_or(bit, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Eager mode: write every stored page into the child.
    fn write_pages(&self, pid: i32, plan: &RestorePlan) -> Result<u64, RestoreError> {
        let d = self.image.descriptor();
        // A remote seed's stored pages come through the page source, read
        // into one buffer first.
        let fetched: Arc<Vec<u8>>;
        let store: &[u8] = match &self.pages {
            Some(m) => m.as_slice(),
            None => {
                fetched = self.fetched_stored(plan)?;
                &fetched
            }
        };
        let mut local: Vec<&[u8]> = Vec::new();
        let mut remote: Vec<RemoteRange> = Vec::new();
        let mut proc_mem: Option<ProcMem> = None;
        let mut written = 0u64;
        for (((vma, b), lazy), wf) in d
            .vmas
            .iter()
            .zip(&plan.backing)
            .zip(&plan.lazy)
            .zip(&plan.write_first)
        {
            if *b == Backing::Kernel {
                continue;
            }
            let writable = vma.prot & libc::PROT_WRITE as u32 != 0 || *wf;
            for run in &vma.runs {
                let PageState::Stored { offset } = run.state else {
                    continue;
                };
                // Lazy mappings: only the pages the kernel writes before the
                // pager takes over (see `early_pages`).
                let Some((first, count)) = (if *lazy {
                    clip(vma.start, run.first, run.count, self.early_pages())
                } else {
                    Some((run.first, run.count))
                }) else {
                    continue;
                };
                let offset = offset + (first - run.first) * PAGE_SIZE;
                let len = (count * PAGE_SIZE) as usize;
                if self.pages.is_some() {
                    self.check_store(store, &[(offset, len)])?;
                }
                let src = &store[offset as usize..offset as usize + len];
                let addr = vma.start + first * PAGE_SIZE;
                written += count;
                if writable {
                    local.push(src);
                    remote.push(RemoteRange { addr, len });
                } else {
                    // Not writable by the process: /proc/PID/mem writes
                    // through FOLL_FORCE, as a debugger's would.
                    if proc_mem.is_none() {
                        proc_mem = Some(ProcMem::open_rw(pid)?);
                    }
                    if let Some(pm) = &proc_mem {
                        pm.write_all_at(addr, src)?;
                    }
                }
            }
        }
        // Two writers: most of the cost is the child's page faults, which
        // the kernel serves in parallel for different ranges.
        let total: usize = remote.iter().map(|r| r.len).sum();
        if total < 4 << 20 {
            // Not worth a second thread.
            mem::write_ranges(pid, &local, &remote)?;
            return Ok(written);
        }
        let mut split = 0;
        let mut acc = 0;
        while split < remote.len() && acc < total / 2 {
            acc += remote[split].len;
            split += 1;
        }
        let (l1, l2) = local.split_at(split);
        let (r1, r2) = remote.split_at(split);
        std::thread::scope(|s| {
            let h = s.spawn(|| mem::write_ranges(pid, l2, r2));
            let a = mem::write_ranges(pid, l1, r1);
            let b = h.join().unwrap_or_else(|_| {
                Err(MemError::Read {
                    pid,
                    addr: 0,
                    len: 0,
                    source: std::io::Error::other("page writer thread panicked"),
                })
            });
            a.and(b)
        })?;
        Ok(written)
    }
}

/// What children of `d` share of the parent's shared memory, said once per
/// segment: one copy per node template, shared by the children forked from
/// it (a child restored from scratch has its own); named segments are
/// copies, not the parent's own; and (`remote`) not shared across nodes.
/// A restore step failed after the pager started: if the pager killed the
/// child because a page could not be served (the step touched that page),
/// that is the reason to give, not the step's own error.
pub(super) fn served_or(e: RestoreError, stats: Option<&ChildStats>) -> RestoreError {
    match stats.and_then(|s| s.killed_reason()) {
        Some(why) => RestoreError::Step {
            what: "starting the child".into(),
            detail: format!("its memory could not be served, so it was killed: {why}"),
        },
        None => e,
    }
}

fn shared_memory_notes(d: &Descriptor, remote: bool) -> Vec<String> {
    d.vmas
        .iter()
        .filter(|v| v.kind == VmaKind::Shmem)
        .map(|v| {
            // MAP_SHARED|MAP_ANONYMOUS shows as "/dev/zero (deleted)".
            let named = !v.path.is_empty() && !v.path.starts_with("/dev/zero");
            let what = if named {
                v.path.clone()
            } else {
                "shared anonymous memory".to_string()
            };
            let mut n = format!(
                "{what} ({:#x}-{:#x}, shared): children forked from one node template share one copy of it, taken at the capture; a child restored without a template has its own",
                v.start, v.end
            );
            if named {
                n.push_str("; the parent's own segment is not shared with them");
            }
            if remote {
                n.push_str("; children on other nodes have their own copy");
            }
            n
        })
        .collect()
}

/// Per page of the page store, its offset in the seed cache laid out by
/// `cache_base` ([`NO_SLOT`] for stored pages the cache does not hold).
fn cache_slots(d: &Descriptor, cache_base: &[Option<u64>]) -> Vec<u64> {
    let mut slots = vec![NO_SLOT; (d.image_bytes / PAGE_SIZE) as usize];
    for (v, base) in d.vmas.iter().zip(cache_base) {
        let Some(base) = base else {
            continue;
        };
        for r in &v.runs {
            if let PageState::Stored { offset } = r.state {
                for k in 0..r.count {
                    if let Some(s) = slots.get_mut((offset / PAGE_SIZE + k) as usize) {
                        *s = base + (r.first + k) * PAGE_SIZE;
                    }
                }
            }
        }
    }
    slots
}

/// The part of a run of pages (`first`, `count`, page indexes of the mapping
/// at `vma_start`) inside `range`, if any.
fn clip(vma_start: u64, first: u64, count: u64, range: Option<(u64, u64)>) -> Option<(u64, u64)> {
    let (lo, hi) = range?;
    let a = (vma_start + first * PAGE_SIZE).max(lo);
    let b = (vma_start + (first + count) * PAGE_SIZE).min(hi);
    (a < b).then(|| ((a - vma_start) / PAGE_SIZE, (b - a) / PAGE_SIZE))
}

fn run_phase(
    husk: &mut Tracee,
    plan: &RestorePlan,
    base: &libc::user_regs_struct,
    code: u64,
    (table, count): (u64, u64),
    state_phase: bool,
) -> Result<(), RestoreError> {
    if count == 0 {
        return Ok(());
    }
    let regs = executor::start_regs(base, code, table, count);
    let at_trap = husk.run_until_trap(&regs)?;
    match executor::outcome(&at_trap) {
        executor::Outcome::Done => Ok(()),
        executor::Outcome::Failed { index, result } => {
            let what = plan.describe(state_phase, index).to_string();
            let ops = if state_phase {
                &plan.state_ops
            } else {
                &plan.map_ops
            };
            let detail = match ops.get(index as usize).and_then(|o| o.expect) {
                Some(want) if !(-4095..0).contains(&result) => {
                    format!("returned {result:#x}, expected {want:#x}")
                }
                _ => errno_text(result),
            };
            Err(RestoreError::Step { what, detail })
        }
    }
}

fn errno_text(ret: i64) -> String {
    if (-4095..0).contains(&ret) {
        format!("{}", std::io::Error::from_raw_os_error(-ret as i32))
    } else {
        format!("returned {ret:#x}")
    }
}

/// This node's vDSO hash (what a seed's `vdso_hash` must equal to start here).
pub fn node_vdso_hash() -> Result<String, RestoreError> {
    own_vdso().map(|(h, _)| h)
}

/// Hash of this process's `[vdso]` and the offset of a `syscall` in it.
fn own_vdso() -> Result<(String, u64), RestoreError> {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let v = crate::vdso::probe(me, &procfs::maps(me)?)?.ok_or_else(|| RestoreError::Step {
        what: "finding this node's vDSO".into(),
        detail: "forkd has no [vdso]".into(),
    })?;
    let off = v.syscall_offset.ok_or_else(|| RestoreError::Step {
        what: "finding a syscall in the vDSO".into(),
        detail: "none".into(),
    })?;
    Ok((v.hash, off))
}

/// Notes for the child's reopened files that are not the ones its parent
/// had open (same path, another device or inode: replaced since the
/// capture).
fn replaced_files(d: &Descriptor, pid: i32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Some(p) = &d.privileges else {
        return Vec::new();
    };
    // Stdio is the child's own; a duplicate is not reopened.
    p.open_files
        .iter()
        .filter(|&&(fd, _, _)| fd >= 3 && d.fd_objects.get(fd).is_none())
        .filter_map(|&(fd, dev, ino)| {
            let m = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let path = d.fds.iter().find(|f| f.fd == fd).map_or("", |f| f.path.as_str());
            ((m.dev(), m.ino()) != (dev, ino)).then(|| {
                format!(
                    "fd {fd} ({path}) is not the file the parent had open: it was replaced since the capture (device {dev}, inode {ino} then; {}, {} now)",
                    m.dev(),
                    m.ino()
                )
            })
        })
        .collect()
}

fn has_cap(capeff: u64, cap: u32) -> bool {
    capeff & (1 << cap) != 0
}

/// Refuse up front, with a clear reason, what the state phase would fail at.
fn check_privileges(d: &Descriptor) -> Result<(), RestoreError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| RestoreError::Io {
            what: "reading /proc/self/status".into(),
            source,
        })?;
    let capeff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if !has_cap(capeff, CAP_CHECKPOINT_RESTORE) && !has_cap(capeff, CAP_SYS_ADMIN) {
        return Err(RestoreError::NotPermitted(
            "setting the child's memory layout and executable (PR_SET_MM_MAP) needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN; run forkd as root".into(),
        ));
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if d.creds.uid.iter().any(|u| *u != uid) && !has_cap(capeff, CAP_SETUID) {
        return Err(RestoreError::NotPermitted(format!(
            "the seed runs as uid {:?} and switching to it needs CAP_SETUID",
            d.creds.uid
        )));
    }
    if d.creds.gid.iter().any(|g| *g != gid) && !has_cap(capeff, CAP_SETGID) {
        return Err(RestoreError::NotPermitted(format!(
            "the seed runs as gid {:?} and switching to it needs CAP_SETGID",
            d.creds.gid
        )));
    }
    Ok(())
}

/// How every file of a container seed resolves: in its rootfs (`rootfs`
/// on this node), opened by the child's executor under the root its
/// starter assembled, before it becomes `/`.
fn resolve_container_files(
    rootfs: &Path,
    d: &Descriptor,
    notes: &mut Vec<String>,
) -> Result<Vec<ResolvedFile>, RestoreError> {
    let root = crate::container::assembly_dir().join("root");
    let mut out = Vec::with_capacity(d.files.len());
    for f in &d.files {
        let rel = f.path.trim_start_matches('/');
        if fileid::matches_at(f, &rootfs.join(rel))? {
            out.push(ResolvedFile::Local(
                root.join(rel).to_string_lossy().into_owned(),
            ));
        } else {
            notes.push(format!(
                "{} is not in the container's rootfs (a file of another mount of the parent's)",
                f.path
            ));
            out.push(ResolvedFile::Unavailable);
        }
    }
    Ok(out)
}

/// How every file of the seed resolves here: the node's own copy if it is the
/// same file, else the seed's kept copy if that is intact, else unavailable.
fn resolve_files(
    dir: &Path,
    d: &Descriptor,
    notes: &mut Vec<String>,
) -> Result<Vec<ResolvedFile>, RestoreError> {
    let mut out = Vec::with_capacity(d.files.len());
    for f in &d.files {
        if fileid::matches(f)? {
            out.push(ResolvedFile::Local(f.path.clone()));
            continue;
        }
        let copy: PathBuf = dir.join(FILES_DIR).join(fileid::store_key(f));
        if fileid::matches_at(f, &copy)? {
            warn!(file = %f.path, "missing or changed on this node; using the seed's copy");
            out.push(ResolvedFile::SeedCopy(copy.to_string_lossy().into_owned()));
        } else {
            notes.push(format!(
                "{} is missing or changed here and the seed has no intact copy",
                f.path
            ));
            out.push(ResolvedFile::Unavailable);
        }
    }
    Ok(out)
}
