//! What a descriptor may hold, enforced while it is decoded.
//!
//! A descriptor can come from another node (`FetchDescriptor`), so none of
//! its counts is trusted. postcard already never allocates from a length
//! prefix alone: a string's bytes must all be there before it is made, and
//! a sequence's length reaches serde as a size hint only when that many
//! bytes remain, which serde caps at 1 MiB of preallocation. A claimed
//! 2^60 entries therefore ends at the end of the body, cheaply. What is left
//! is amplification: a page run of 3 encoded bytes decodes to 32, a file
//! descriptor of 5 to 48, so a 256 MiB body could still cost gigabytes.
//! Every sequence of a descriptor is therefore decoded through [`seq`],
//! which refuses more entries than the field can hold before making them;
//! page runs of all mappings share one budget.
//!
//! A refusal is reported as [`ImageError::TooMany`] naming the field, and a
//! body that fails to decode inside a sequence names that sequence. serde's
//! errors reach us through postcard's, which keep no message, so the field
//! is kept on the side for the thread that decodes ([`Scope`]).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{ImageError, PageRun};

/// End of x86_64 user space with 4-level page tables (47 bits): no mapping
/// of a process can reach it. (5-level paging lets a process ask for
/// addresses above; capture does not support such processes.)
pub const USER_END: u64 = 0x0000_8000_0000_0000;
/// Mappings: 2^16, just above the kernel's `vm.max_map_count` default of
/// 65530 (`DEFAULT_MAX_MAP_COUNT`). A node whose administrator raised it
/// may run processes with more; their seeds are refused.
pub const MAX_VMAS: usize = 1 << 16;
/// Mapped files: each backs at least one mapping.
pub const MAX_FILES: usize = MAX_VMAS;
/// Page runs of all mappings together. A run is at least one page, and runs
/// alternate between kinds of source, so this is reached only by millions
/// of scattered dirty pages; it bounds a decoded descriptor's runs to
/// 256 MiB.
pub const MAX_RUNS: usize = 1 << 23;
/// Open descriptors: `fs.nr_open` default (1,048,576), the highest
/// `RLIMIT_NOFILE` can be without raising it.
pub const MAX_FDS: usize = 1 << 20;
/// Supplementary groups: the kernel's `NGROUPS_MAX`.
pub const MAX_GROUPS: usize = 65_536;
/// Signal dispositions: `_NSIG`.
pub const MAX_SIGACTIONS: usize = 64;
/// Resource limits: `RLIM_NLIMITS`.
pub const MAX_RLIMITS: usize = 16;
/// Auxiliary vector words. The kernel keeps at most `AT_VECTOR_SIZE` (52
/// words on x86_64 Linux 6.x); this leaves room for it to grow.
pub const MAX_AUXV_WORDS: usize = 4096;
/// XSAVE area: 11 KiB with AMX today; the kernel's own ceiling is what
/// CPUID reports, well below this.
pub const MAX_XSTATE_BYTES: usize = 64 << 10;
/// Threads besides the main one: 2^15, the kernel's default `pid_max`
/// (32,768) is the most a default system can hold in one process.
pub const MAX_THREADS: usize = 1 << 15;

/// A sequence that held more entries than its field may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exceeded {
    field: &'static str,
    count: u64,
    limit: u64,
}

thread_local! {
    /// The innermost sequence being decoded ("" outside any).
    static FIELD: Cell<&'static str> = const { Cell::new("") };
    /// Why decoding was refused, if a limit was.
    static EXCEEDED: Cell<Option<Exceeded>> = const { Cell::new(None) };
    /// Page runs still allowed, inside a [`Scope`].
    static RUNS_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Page digests allowed, inside a [`Scope`] once the descriptor is read.
    static DIGESTS_MAX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// One decode of a descriptor on this thread: sets the shared budgets up,
/// turns postcard's errors into ones naming the field, and clears
/// everything when dropped.
pub(super) struct Scope {
    /// Thread-bound: the state it manages is this thread's.
    _not_send: PhantomData<*const ()>,
}

impl Scope {
    pub(super) fn enter() -> Scope {
        FIELD.set("");
        EXCEEDED.set(None);
        RUNS_LEFT.set(Some(MAX_RUNS));
        DIGESTS_MAX.set(None);
        Scope {
            _not_send: PhantomData,
        }
    }

    /// Allow at most `n` page digests from now on.
    pub(super) fn limit_digests(&self, n: u64) {
        DIGESTS_MAX.set(Some(usize::try_from(n).unwrap_or(usize::MAX)));
    }

    /// The error to report for `e`, a failure of this decode.
    pub(super) fn error(&self, e: postcard::Error) -> ImageError {
        if let Some(x) = EXCEEDED.take() {
            return ImageError::TooMany {
                field: x.field,
                count: x.count,
                limit: x.limit,
            };
        }
        match FIELD.replace("") {
            "" => ImageError::Decode(e),
            field => ImageError::DecodeIn { field, source: e },
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        FIELD.set("");
        EXCEEDED.set(None);
        RUNS_LEFT.set(None);
        DIGESTS_MAX.set(None);
    }
}

/// Refuse a field's count in validation (see [`ImageError::TooMany`]).
pub(super) fn check_count(
    field: &'static str,
    count: usize,
    limit: usize,
) -> Result<(), ImageError> {
    if count > limit {
        return Err(ImageError::TooMany {
            field,
            count: count as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

/// Decode a sequence of at most `limit` entries, of which `already` were
/// used by earlier sequences sharing the limit.
fn seq<'de, D, T>(
    d: D,
    field: &'static str,
    limit: usize,
    already: usize,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let outer = FIELD.replace(field);
    let r = d.deserialize_seq(Bounded {
        field,
        limit,
        already,
        entries: PhantomData,
    });
    // On error the field stays set, for the report.
    if r.is_ok() {
        FIELD.set(outer);
    }
    r
}

struct Bounded<T> {
    field: &'static str,
    limit: usize,
    already: usize,
    entries: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "at most {} entries of {}", self.limit, self.field)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<T>, A::Error> {
        let room = self.limit.saturating_sub(self.already);
        let exceeded = |n: usize| {
            let x = Exceeded {
                field: self.field,
                count: self.already.saturating_add(n) as u64,
                limit: self.limit as u64,
            };
            EXCEEDED.set(Some(x));
            de::Error::custom(format_args!(
                "{}: {} entries exceed the limit of {}",
                x.field, x.count, x.limit
            ))
        };
        // postcard gives the declared length when that many bytes remain.
        let hint = a.size_hint().unwrap_or(0);
        if hint > room {
            return Err(exceeded(hint));
        }
        // serde's own cap on preallocation: 1 MiB.
        let cap = hint.min((1 << 20) / std::mem::size_of::<T>().max(1));
        let mut v = Vec::with_capacity(cap);
        while let Some(x) = a.next_element()? {
            if v.len() == room {
                return Err(exceeded(room + 1));
            }
            v.push(x);
        }
        Ok(v)
    }
}

macro_rules! bounded {
    ($(#[$doc:meta])* $name:ident, $t:ty, $field:literal, $limit:expr) => {
        $(#[$doc])*
        pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<$t>, D::Error> {
            seq(d, $field, $limit, 0)
        }
    };
}

bounded!(
    /// `Descriptor::xstate`.
    xstate, u8, "xstate", MAX_XSTATE_BYTES
);
bounded!(
    /// `Descriptor::sigactions`.
    sigactions, super::SigAction, "sigactions", MAX_SIGACTIONS
);
bounded!(
    /// `Descriptor::auxv`.
    auxv, u64, "auxv", MAX_AUXV_WORDS
);
bounded!(
    /// `Descriptor::rlimits`.
    rlimits, (u64, u64), "rlimits", MAX_RLIMITS
);
bounded!(
    /// `Credentials::groups`.
    groups, u32, "creds.groups", MAX_GROUPS
);
bounded!(
    /// `Descriptor::fds`.
    fds, crate::procfs::FdEntry, "fds", MAX_FDS
);
bounded!(
    /// `Descriptor::files`.
    files, super::FileRef, "files", MAX_FILES
);
bounded!(
    /// `ThreadSet::others`.
    threads, super::ThreadState, "thread_set.others", MAX_THREADS
);
bounded!(
    /// `Descriptor::vmas`.
    vmas, super::Vma, "vmas", MAX_VMAS
);

/// `Vma::runs`: all mappings' runs share [`MAX_RUNS`] within a [`Scope`].
pub(super) fn runs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PageRun>, D::Error> {
    let left = RUNS_LEFT.get();
    let already = left.map_or(0, |l| MAX_RUNS - l);
    let v = seq(d, "vmas[].runs", MAX_RUNS, already)?;
    if let Some(l) = left {
        RUNS_LEFT.set(Some(l - v.len()));
    }
    Ok(v)
}

/// `PageDigests::xxh3`: within a [`Scope`], at most one per stored page.
pub(super) fn digests<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    seq(
        d,
        "digests.xxh3",
        DIGESTS_MAX.get().unwrap_or(usize::MAX),
        0,
    )
}

/// A container seed's mounts, `not_kept` notes, namespaces and interfaces.
pub const MAX_CONTAINER_LIST: usize = 1024;
/// Entries of one of a container's tmpfs mounts kept for children (`/dev`).
pub const MAX_TMPFS_ENTRIES: usize = 1 << 16;

/// `ContainerInfo::mounts`.
pub(crate) fn container_mounts<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<crate::container::ChildMount>, D::Error> {
    seq(d, "container.mounts", MAX_CONTAINER_LIST, 0)
}

/// `ChildMount::Tmpfs::entries`.
pub(crate) fn tmpfs_entries<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<crate::container::TmpfsEntry>, D::Error> {
    seq(d, "container.mounts[].entries", MAX_TMPFS_ENTRIES, 0)
}

/// The container's lists of strings.
pub(crate) fn container_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    seq(d, "container lists", MAX_CONTAINER_LIST, 0)
}
