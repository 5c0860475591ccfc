//! The restore plan: which syscalls the executor runs inside the husk, in
//! what order, with what arguments. Pure: built from a descriptor, the husk's
//! layout and the files resolved on this node, and unit-tested without any
//! process.
//!
//! Two tables run in the husk, with forkd filling memory between them:
//!
//! - **map** (phase A): unmap the husk's own mappings, move its
//!   `[vvar]`/`[vvar_vclock]`/`[vdso]` block to the parent's address, and map
//!   every parent mapping at its address with `MAP_FIXED_NOREPLACE`
//!   (anonymous, shared anonymous, or the file when it can be used).
//! - **state** (phase B): `PR_SET_MM_MAP`, signal handlers, sigaltstack,
//!   rseq, robust list, `clear_child_tid`, personality, comm, umask, cwd,
//!   file descriptors, the userfaultfd, rlimits, and credentials last.
//!
//! Then forkd unmaps the executor with one injected `munmap` and sets the
//! registers, so no restore code stays in the child.
//!
//! [`build`] is a list of phases, one function each, in the order their
//! steps run: `mappings` (the map phase), `process` (mm, signals, process
//! attributes, rlimits), `descriptors` (fds, the userfaultfd) and
//! `privileges` (credentials and filters, last).

use kernel_helpers::executor::{self, Entry};

use crate::image::{Descriptor, PageState, VmaKind};
use crate::procfs::{FdEntry, FdKind, MapsEntry};
use crate::PAGE_SIZE;

/// Highest user-space address + 1 on x86_64 with 4-level page tables.
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;
/// Lowest address mmap may use (`vm.mmap_min_addr`).
const MMAP_MIN: u64 = 0x10000;
/// Where the search for free space for the executor starts.
const SEARCH_FROM: u64 = 0x1_0000_0000;
/// Highest file descriptor number restore recreates.
pub const MAX_FD: i32 = 4096;
/// `PR_SET_MM`, `PR_SET_MM_MAP`, `PR_SET_NAME`.
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NAME: u64 = 15;
/// Size of `struct prctl_mm_map`.
const PRCTL_MM_MAP_SIZE: usize = 104;

/// Errors building a plan. Nothing has been started when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A mapping cannot be placed in this address space.
    #[error("mapping {start:#x}-{end:#x} ({path}) lies outside the user address space (ends at {TASK_SIZE:#x}); cannot restore it")]
    OutsideUserSpace {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Path.
        path: String,
    },
    /// The husk's vDSO block does not look like the parent's.
    #[error("the vDSO block here ({here}) differs in layout from the seed's ({seed}); this node's kernel differs")]
    VdsoLayout {
        /// This node's block.
        here: String,
        /// The seed's block.
        seed: String,
    },
    /// No free address range for the executor.
    #[error("no free address range of {0} bytes for the restore executor outside the seed's and the husk's mappings")]
    NoRoom(u64),
    /// A file needed by a mapping is not available.
    #[error("{path} is needed by mapping {start:#x}-{end:#x} but is missing or differs on this node, and the seed has no copy of it")]
    FileUnavailable {
        /// The file.
        path: String,
        /// Mapping start.
        start: u64,
        /// Mapping end.
        end: u64,
    },
    /// Too many file descriptors.
    #[error("file descriptor {0} is above the highest restore recreates ({MAX_FD})")]
    FdTooHigh(i32),
    /// A descriptor of the seed cannot be opened on this node.
    #[error("fd {fd} ({path}) cannot be reopened here: the file is missing on this node")]
    FdUnavailable {
        /// The descriptor.
        fd: i32,
        /// Its path.
        path: String,
    },
    /// A seed of an older format has a descriptor whose kernel object it
    /// did not record.
    #[error("fd {fd} ({kind:?} {path}) cannot be recreated: the seed (format {format}) was captured before forkd recorded kernel objects; capture it again")]
    FdNotRecorded {
        /// The descriptor.
        fd: i32,
        /// Its kind.
        kind: FdKind,
        /// Its link.
        path: String,
        /// The seed's format.
        format: u32,
    },
}

/// An argument of a planned syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A plain value.
    Val(u64),
    /// The address of `len` bytes at `offset` in the plan's data area.
    Data(usize),
    /// The previous syscall's result (the executor has it; no plan step
    /// chains results today).
    #[allow(dead_code)]
    Prev,
    /// The last result saved with `save`.
    Saved,
    /// The 32-bit int at this data offset (a descriptor number `pipe2` or
    /// `socketpair` wrote there). First argument only.
    Load(usize),
}

/// One planned syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Syscall number.
    pub nr: i64,
    /// Arguments.
    pub args: [Arg; 6],
    /// Keep going if it fails.
    pub ignore_error: bool,
    /// Save its result for later `Arg::Saved`.
    pub save: bool,
    /// Store its result at this data offset.
    pub store: Option<usize>,
    /// It must return exactly this.
    pub expect: Option<u64>,
    /// What it does, for error messages.
    pub what: String,
}

impl Op {
    fn new(nr: i64, args: [Arg; 6], what: impl Into<String>) -> Op {
        Op {
            nr,
            args,
            ignore_error: false,
            save: false,
            store: None,
            expect: None,
            what: what.into(),
        }
    }
    fn expect(mut self, v: u64) -> Op {
        self.expect = Some(v);
        self
    }
    fn save(mut self) -> Op {
        self.save = true;
        self
    }
    fn soft(mut self, store: usize) -> Op {
        self.ignore_error = true;
        self.store = Some(store);
        self
    }
}

fn v(x: u64) -> Arg {
    Arg::Val(x)
}

/// How the pages of one mapping get filled after the map phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous (private or shared) memory: stored pages are written in,
    /// the rest stays zero.
    Anonymous,
    /// The file at this index of [`RestorePlan::file_paths`] is mapped;
    /// from-file pages come from it, stored pages are written over it.
    File(usize),
    /// Provided by the kernel (vDSO block).
    Kernel,
}

/// A file mapping's file as resolved on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedFile {
    /// The file at its original path has the recorded identity.
    Local(String),
    /// The original differs or is missing; this copy from the seed matches.
    SeedCopy(String),
    /// Neither is available.
    Unavailable,
}

/// A soft step whose failure is reported, not fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftStep {
    /// Data offset of its stored result.
    pub result_at: usize,
    /// What it does.
    pub what: String,
}

/// A complete plan for one child.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// Where the executor area goes.
    pub base: u64,
    /// The map phase.
    pub map_ops: Vec<Op>,
    /// The state phase.
    pub state_ops: Vec<Op>,
    /// Bytes referenced by `Arg::Data`.
    pub data: Vec<u8>,
    /// Per descriptor VMA: how its pages get filled.
    pub backing: Vec<Backing>,
    /// Paths actually mapped, indexed by `Backing::File` (read by the
    /// plan's tests; the steps carry the paths themselves).
    #[cfg_attr(not(test), allow(dead_code))]
    pub file_paths: Vec<String>,
    /// Steps whose failure is only reported (rlimits, cwd).
    pub soft_steps: Vec<SoftStep>,
    /// Things the user should know (files served from the seed, fds replaced).
    pub notes: Vec<String>,
    /// Per descriptor VMA: served lazily through userfaultfd.
    pub lazy: Vec<bool>,
    /// Data offset where the child's userfaultfd number is stored (lazy plans).
    pub uffd_slot: Option<usize>,
    /// Per descriptor VMA: mapped writable until the state phase.
    pub write_first: Vec<bool>,
    /// Per descriptor VMA: mapped from the shared seed cache (filled with
    /// `UFFDIO_CONTINUE`; pages shared between children until written).
    pub from_cache: Vec<bool>,
    /// Bytes reserved after the executor's own pages (a node template's
    /// [`ForkTable`] goes there).
    pub extra: u64,
}

/// The seed's node-local cache as children may map it.
#[derive(Debug, Clone)]
pub struct SharedCache {
    /// A path the husk can open the cache memfd by.
    pub path: String,
    /// Per descriptor VMA: its offset in the cache layout, if it has one.
    pub base: Vec<Option<u64>>,
}

/// Is this mapping served by the pager in lazy mode (private anonymous,
/// with stored pages)? Shared memory is written before the child runs:
/// its pages then live in the segment itself, which every child forked
/// from a template shares, and `MADV_DONTNEED` on it keeps its contents
/// as the kernel's shared-memory semantics say (a lazily served page
/// would read as zeros after it).
pub fn lazy_candidate(v: &crate::image::Vma) -> bool {
    v.file.is_none()
        && !v.shared
        && matches!(v.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack)
        && v.runs
            .iter()
            .any(|r| matches!(r.state, PageState::Stored { .. }))
}

/// Lay out the cache for a descriptor: each lazily served mapping at its own
/// offset. Returns (per-VMA base, total size).
pub fn cache_layout(desc: &Descriptor) -> (Vec<Option<u64>>, u64) {
    let mut at = 0u64;
    let base = desc
        .vmas
        .iter()
        .map(|v| {
            lazy_candidate(v).then(|| {
                let b = at;
                at += v.end - v.start;
                b
            })
        })
        .collect();
    (base, at)
}

/// The layout of the executor area, once the plan is finished.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Bytes to write at `base`.
    pub bytes: Vec<u8>,
    /// Address of the code.
    pub code: u64,
    /// Address and entry count of the map phase table.
    pub map_table: (u64, u64),
    /// Address and entry count of the state phase table.
    pub state_table: (u64, u64),
    /// Address of the data area.
    pub data: u64,
}

impl RestorePlan {
    /// Bytes the executor area needs (page aligned), `extra` included.
    pub fn area_len(&self) -> u64 {
        self.extra_at() - self.base + self.extra.div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// Where the `extra` bytes start (after the executor's own pages).
    pub fn extra_at(&self) -> u64 {
        let n = self.map_ops.len() + self.state_ops.len();
        let len = align8(executor::CODE.len()) + n * executor::ENTRY_SIZE + self.data.len();
        self.base + (len as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    /// Lay the executor area out at `self.base`.
    pub fn blob(&self) -> Blob {
        let code_len = align8(executor::CODE.len());
        let map_at = self.base + code_len as u64;
        let state_at = map_at + (self.map_ops.len() * executor::ENTRY_SIZE) as u64;
        let data_at = state_at + (self.state_ops.len() * executor::ENTRY_SIZE) as u64;
        let mut bytes = executor::CODE.to_vec();
        bytes.resize(code_len, 0xcc);
        for op in self.map_ops.iter().chain(&self.state_ops) {
            encode_op(op, data_at).encode(&mut bytes);
        }
        bytes.extend_from_slice(&self.data);
        Blob {
            bytes,
            code: self.base,
            map_table: (map_at, self.map_ops.len() as u64),
            state_table: (state_at, self.state_ops.len() as u64),
            data: data_at,
        }
    }

    /// Describe entry `index` of a phase for an error message.
    pub fn describe(&self, state_phase: bool, index: u64) -> &str {
        let ops = if state_phase {
            &self.state_ops
        } else {
            &self.map_ops
        };
        ops.get(index as usize)
            .map(|o| o.what.as_str())
            .unwrap_or("(unknown step)")
    }
}

fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn encode_op(op: &Op, data_at: u64) -> Entry {
    let mut e = Entry {
        nr: op.nr as u64,
        ..Default::default()
    };
    for (i, a) in op.args.iter().enumerate() {
        match *a {
            Arg::Val(x) => e.args[i] = x,
            Arg::Data(off) => e.args[i] = data_at + off as u64,
            Arg::Prev => e.flags |= executor::prev_to_arg(i as u32),
            Arg::Saved => e.flags |= executor::saved_to_arg(i as u32),
            Arg::Load(off) => {
                debug_assert_eq!(i, 0, "only the first argument is loaded");
                e.args[i] = data_at + off as u64;
                e.flags |= executor::LOAD_ARG0;
            }
        }
    }
    if op.ignore_error {
        e.flags |= executor::IGNORE_ERROR;
    }
    if op.save {
        e.flags |= executor::SAVE;
    }
    if let Some(off) = op.store {
        e.flags |= executor::STORE;
        e.extra = data_at + off as u64;
    }
    if let Some(x) = op.expect {
        e.flags |= executor::EXPECT;
        e.extra = x;
    }
    e
}

/// Data area under construction.
#[derive(Default)]
struct Data(Vec<u8>);

impl Data {
    fn bytes(&mut self, b: &[u8]) -> usize {
        let at = align8(self.0.len());
        self.0.resize(at, 0);
        self.0.extend_from_slice(b);
        at
    }
    fn cstr(&mut self, s: &str) -> usize {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.bytes(&b)
    }
    fn words(&mut self, w: &[u64]) -> usize {
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.bytes(&b)
    }
    fn slot(&mut self) -> usize {
        self.words(&[0])
    }
}

/// The parts of the husk's layout the plan needs.
#[derive(Debug, Clone)]
pub struct HuskLayout {
    /// Its mappings (from `/proc/PID/maps`).
    pub maps: Vec<MapsEntry>,
}

/// Who and where the child is, besides what its seed records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// Another user than the parent's (a tenant's).
    pub run_as: Option<super::RunAs>,
    /// A container child: where its starter assembled its root, which
    /// becomes `/` once the seed's files are mapped.
    pub container_root: Option<&'a str>,
    /// A container seed's template: it keeps root's privileges (its
    /// children need them to make their namespaces and mounts, and take
    /// the seed's credentials after, in the fork table).
    pub defer_privileges: bool,
}

/// Build the plan. `files[i]` is how `desc.files[i]` resolved on this node.
///
/// The phases run in the order their ops run in the husk, each appending
/// to one [`Draft`]; an error returned by any of them leaves nothing started.
pub fn build(
    desc: &Descriptor,
    husk: &HuskLayout,
    files: &[ResolvedFile],
    lazy: bool,
    shared_cache: Option<&SharedCache>,
    extra: u64,
    who: Who<'_>,
) -> Result<RestorePlan, PlanError> {
    let Who {
        run_as,
        container_root,
        defer_privileges,
    } = who;
    let mut d = Draft::default();
    mappings::check_user_space(desc)?;
    let m = mappings::decide(desc, files, lazy, shared_cache, &mut d.notes)?;
    let vdso = mappings::vdso_blocks(husk, desc)?;
    // Room for the executor: free in both layouts, and a second range to
    // park the vDSO block in if its old and new places overlap.
    let occupied = mappings::occupied(desc, husk);

    // The map phase.
    mappings::plan_unmap_husk(&mut d, husk);
    mappings::plan_vdso_move(&mut d, vdso, &occupied)?;
    mappings::plan_mappings(&mut d, desc, &m);
    mappings::plan_cache_mappings(&mut d, desc, &m, shared_cache);

    // The state phase.
    process::plan_close_inherited(&mut d);
    process::plan_protections(&mut d, desc, &m.write_first);
    process::plan_mm(&mut d, desc, files);
    if let Some(root) = container_root {
        process::plan_enter_root(&mut d, root);
    }
    process::plan_signals(&mut d, desc);
    process::plan_process_attrs(&mut d, desc);
    let max_fd = descriptors::plan_fds(&mut d, desc)?;
    let uffd_slot = lazy.then(|| descriptors::plan_uffd(&mut d, desc, max_fd));
    process::plan_rlimits(&mut d, desc);
    if !defer_privileges {
        privileges::plan_privileges(&mut d, desc, run_as, lazy);
    }

    d.finish(m, uffd_slot, extra, &occupied)
}

/// A plan under construction: the two tables, their data area and what
/// the user is told, appended to phase by phase.
#[derive(Default)]
struct Draft {
    /// The data area.
    data: Data,
    /// The map phase.
    map_ops: Vec<Op>,
    /// The state phase.
    state_ops: Vec<Op>,
    /// Steps whose failure is only reported.
    soft_steps: Vec<SoftStep>,
    /// Things the user should know.
    notes: Vec<String>,
    /// Pointers inside the data area, patched once its address is known:
    /// (offset of the pointer, offset it points at).
    pointers: Vec<(usize, usize)>,
}

impl Draft {
    /// Place the executor area clear of `occupied` and of the vDSO park
    /// range, and patch the data area's pointers for that address.
    fn finish(
        self,
        m: mappings::Mappings,
        uffd_slot: Option<usize>,
        extra: u64,
        occupied: &[(u64, u64)],
    ) -> Result<RestorePlan, PlanError> {
        let mut plan = RestorePlan {
            base: 0,
            map_ops: self.map_ops,
            state_ops: self.state_ops,
            data: self.data.0,
            backing: m.backing,
            file_paths: m.file_paths,
            soft_steps: self.soft_steps,
            notes: self.notes,
            lazy: m.lazy,
            uffd_slot,
            write_first: m.write_first,
            from_cache: m.from_cache,
            extra,
        };
        let len = plan.area_len() + PAGE_SIZE;
        // Avoid the vDSO park range too: it is occupied while the map phase runs.
        let park: Vec<(u64, u64)> = plan
            .map_ops
            .iter()
            .filter(|o| o.nr == libc::SYS_mremap)
            .filter_map(|o| match (o.args[4], o.args[1]) {
                (Arg::Val(to), Arg::Val(l)) => Some((to, to + l)),
                _ => None,
            })
            .collect();
        plan.base = find_free(occupied, len, &park)?;
        let data_at = plan.blob().data;
        for (at, target) in self.pointers {
            let addr = data_at + target as u64;
            plan.data[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        }
        Ok(plan)
    }
}

/// `set_robust_list` with the seed's list, if it had one.
fn robust_list_op(desc: &Descriptor) -> Option<Op> {
    (desc.robust_list.0 != 0).then(|| {
        Op::new(
            libc::SYS_set_robust_list,
            [
                v(desc.robust_list.0),
                v(desc.robust_list.1),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "set_robust_list",
        )
    })
}

/// Lazy children outlive the thread that started them: set by a daemon
/// whose children are handed to its successor (forkd's keeper keeps their
/// userfaultfds, so a child without a pager waits, and the keeper kills it
/// with a reason if no successor comes). Off: a lazy child dies with its
/// spawner (`PR_SET_PDEATHSIG`), as under `forkd restore`.
static OUTLIVE_SPAWNER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`OUTLIVE_SPAWNER`].
pub fn set_children_outlive_spawner(on: bool) {
    OUTLIVE_SPAWNER.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn dies_with_spawner() -> bool {
    !OUTLIVE_SPAWNER.load(std::sync::atomic::Ordering::Relaxed)
}

/// `prlimit64(0, resource, {soft, hard}, NULL)`: this process's limit.
fn prlimit_op(data: &mut Data, resource: u32, (soft, hard): (u64, u64), what: String) -> Op {
    let lim = data.words(&[soft, hard]);
    Op::new(
        libc::SYS_prlimit64,
        [v(0), v(resource as u64), Arg::Data(lim), v(0), v(0), v(0)],
        what,
    )
}

/// `PR_SET_PDEATHSIG(SIGKILL)`: a lazy child whose pager is gone must die.
fn pdeathsig_op() -> Op {
    Op::new(
        libc::SYS_prctl,
        [
            v(libc::PR_SET_PDEATHSIG as u64),
            v(libc::SIGKILL as u64),
            v(0),
            v(0),
            v(0),
            v(0),
        ],
        "prctl(PR_SET_PDEATHSIG)",
    )
}

/// `openat2(AT_FDCWD, path, {flags, 0, RESOLVE_NO_SYMLINKS})`. The paths a
/// seed records are the kernel's canonical ones (`/proc/PID/fd`,
/// `/proc/PID/maps`), with no symlink in them; one found there now was
/// swapped in since the capture, and the open fails (ELOOP) rather than
/// open whatever it points to, as root, for the child.
fn open_no_symlinks(data: &mut Data, path_at: usize, flags: u64, what: String) -> Op {
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = data.words(&[flags, 0, RESOLVE_NO_SYMLINKS]);
    Op::new(
        libc::SYS_openat2,
        [
            v(libc::AT_FDCWD as i64 as u64),
            Arg::Data(path_at),
            Arg::Data(how),
            v(24),
            v(0),
            v(0),
        ],
        what,
    )
}

/// The table a child forked from a node template runs before it is let
/// go: what `fork()` does not give it of its own.
#[derive(Debug, Clone)]
pub struct ForkTable {
    /// Bytes to write at the address the table was built for: its data,
    /// then its entries.
    pub bytes: Vec<u8>,
    /// Address and entry count of the entries.
    pub table: (u64, u64),
    /// What each entry does, for error messages.
    pub what: Vec<String>,
    /// A container child's own root and network, made by a second table
    /// run as soon as the child is forked (a spare's, long before its
    /// spawn): address and entry count, and what each entry does.
    pub prepare: Option<((u64, u64), Vec<String>)>,
}

/// Descriptors passed to a forked child, in this order: its stdin, stdout,
/// stderr, and (lazy) its own userfaultfd.
pub const FORK_STDIO: usize = 3;

/// Build the [`ForkTable`] for children of a template of `desc`, to be
/// written at `at`. In the child, descriptor `sock` is a datagram socket
/// carrying the passed descriptors, which arrive at the numbers `recv` (the
/// lowest the template leaves free); `uffd_target` is where the template
/// keeps its userfaultfd (lazy), replaced by the child's own.
///
/// The child gets: its stdio and userfaultfd, its robust list (fork clears
/// it) and, when lazy, its parent-death signal (fork clears that too). The
/// seed's other descriptors it inherits from the template as a fork child
/// does: its open file descriptions, offsets included, are shared with its
/// siblings, as fork children of the parent share the parent's.
pub fn fork_table(
    desc: &Descriptor,
    at: u64,
    sock: i32,
    recv: &[i32],
    uffd_target: Option<i32>,
    container: Option<&ForkContainer<'_>>,
) -> ForkTable {
    let mut d = Draft::default();
    let data = &mut d.data;
    // recvmsg's buffers. Absolute addresses: the data area starts at `at`.
    let buf = data.words(&[0]);
    let iov = data.words(&[0, 1]);
    let control = data.words(&[0; 8]);
    let msghdr = data.words(&[0; 7]);
    let patch = |d: &mut Data, off: usize, word: u64| {
        d.0[off..off + 8].copy_from_slice(&word.to_le_bytes());
    };
    patch(data, iov, at + buf as u64);
    patch(data, msghdr + 16, at + iov as u64); // msg_iov
    patch(data, msghdr + 24, 1); // msg_iovlen
    patch(data, msghdr + 32, at + control as u64); // msg_control
    patch(data, msghdr + 40, 64); // msg_controllen
    let mut ops = vec![Op::new(
        libc::SYS_recvmsg,
        [
            v(sock as u64),
            Arg::Data(msghdr),
            v(libc::MSG_CMSG_CLOEXEC as u64),
            v(0),
            v(0),
            v(0),
        ],
        "receiving the child's descriptors",
    )
    .expect(1)];
    let passed = FORK_STDIO + usize::from(uffd_target.is_some());
    for (i, &r) in recv.iter().take(passed).enumerate() {
        let (target, flags, what) = if i < FORK_STDIO {
            (i as i32, 0, format!("setting up fd {i}"))
        } else {
            (
                uffd_target.unwrap_or(-1),
                libc::O_CLOEXEC,
                "installing the child's userfaultfd".to_string(),
            )
        };
        // The userfaultfd's number may be at or above the template's
        // RLIMIT_NOFILE (a parent that lowered it below descriptors it
        // has): the soft limit is lifted to the hard one for the dup, then
        // put back, as the parent had it.
        let (soft, hard) = desc
            .rlimits
            .get(libc::RLIMIT_NOFILE as usize)
            .copied()
            .unwrap_or((u64::MAX, u64::MAX));
        // (Decided by the limits alone, not the number, so the table's
        // size is known before the template's numbers are.)
        let lift = i >= FORK_STDIO && soft < hard;
        let nofile = libc::RLIMIT_NOFILE;
        if lift {
            let what = "lifting RLIMIT_NOFILE for the child's userfaultfd".to_string();
            ops.push(prlimit_op(&mut d.data, nofile, (hard, hard), what));
        }
        ops.push(Op::new(
            libc::SYS_dup3,
            [
                v(r as u64),
                v(target as u64),
                v(flags as u64),
                v(0),
                v(0),
                v(0),
            ],
            what,
        ));
        if lift {
            let what = "putting RLIMIT_NOFILE back".to_string();
            ops.push(prlimit_op(&mut d.data, nofile, (soft, hard), what));
        }
    }
    // A cooperative all-threads checkpoint's answer descriptor is the
    // child's stdin (in the template it is the template's).
    for f in desc.fds.iter().filter(|f| f.kind == FdKind::CoopReply) {
        let cloexec = f.flags as i32 & libc::O_CLOEXEC;
        ops.push(Op::new(
            libc::SYS_dup3,
            [v(0), v(f.fd as u64), v(cloexec as u64), v(0), v(0), v(0)],
            format!("fd {}: the checkpoint's answer, from stdin", f.fd),
        ));
    }
    ops.extend(descriptors::stdio_flags(desc));
    // Its own kernel objects where siblings must not share them (queues,
    // counters, timers, epoll sets), made over what it inherited.
    let (objects, _) = objects::plan_objects(&mut d.data, desc, objects::Context::Fork);
    ops.extend(objects);
    for &r in recv.iter().take(passed) {
        ops.push(Op::new(
            libc::SYS_close,
            [v(r as u64), v(0), v(0), v(0), v(0), v(0)],
            format!("closing passed fd {r}"),
        ));
    }
    // Its own session and process group, away from the template and its
    // siblings: a child that signals its group (`kill(0, ...)`) reaches
    // itself only.
    ops.push(Op::new(
        libc::SYS_setsid,
        [v(0), v(0), v(0), v(0), v(0), v(0)],
        "setsid",
    ));
    ops.extend(robust_list_op(desc));
    let mut prep_ops = Vec::new();
    match container {
        Some(c) => {
            // Its own container (in the prepare table), then the parent's
            // credentials (the template kept root's, to make the
            // namespaces and mounts).
            plan_fork_container(&mut d, desc, c);
            prep_ops = std::mem::take(&mut d.state_ops);
            d.state_ops = ops;
            privileges::plan_privileges(&mut d, desc, c.run_as, uffd_target.is_some());
            ops = std::mem::take(&mut d.state_ops);
        }
        None => {
            if uffd_target.is_some() && dies_with_spawner() {
                ops.push(pdeathsig_op());
            }
        }
    }
    let table_at = at + align8(d.data.0.len()) as u64;
    let mut bytes = std::mem::take(&mut d.data.0);
    for (ptr_at, target) in &d.pointers {
        let addr = at + *target as u64;
        bytes[*ptr_at..*ptr_at + 8].copy_from_slice(&addr.to_le_bytes());
    }
    bytes.resize(align8(bytes.len()), 0);
    for op in &ops {
        encode_op(op, at).encode(&mut bytes);
    }
    let prepare = (!prep_ops.is_empty()).then(|| {
        let prep_at = at + bytes.len() as u64;
        for op in &prep_ops {
            encode_op(op, at).encode(&mut bytes);
        }
        (
            (prep_at, prep_ops.len() as u64),
            prep_ops.into_iter().map(|o| o.what).collect(),
        )
    });
    ForkTable {
        bytes,
        table: (table_at, ops.len() as u64),
        what: ops.into_iter().map(|o| o.what).collect(),
        prepare,
    }
}

/// What a child forked from a container seed's template does besides what
/// any forked child does (see [`fork_table`]).
#[derive(Debug, Clone)]
pub struct ForkContainer<'a> {
    /// Its root assembled ([`crate::container::fork_steps`]).
    pub steps: &'a [kernel_helpers::husk::Setup],
    /// Bring loopback up.
    pub loopback: bool,
    /// Whom it runs as (the seed's user when none).
    pub run_as: Option<super::RunAs>,
}

/// A forked container child: its root made ([`ForkContainer::steps`]),
/// entered (pivot, the node's... the template's root unmounted), the cwd
/// set again, loopback up.
fn plan_fork_container(d: &mut Draft, desc: &Descriptor, c: &ForkContainer<'_>) {
    use kernel_helpers::husk::Setup;
    for s in c.steps {
        let op = match s {
            Setup::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => {
                let a = d.data.cstr(source);
                let b = d.data.cstr(target);
                let t = if fstype.is_empty() {
                    v(0)
                } else {
                    Arg::Data(d.data.cstr(fstype))
                };
                let o = if data.is_empty() {
                    v(0)
                } else {
                    Arg::Data(d.data.cstr(data))
                };
                Op::new(
                    libc::SYS_mount,
                    [Arg::Data(a), Arg::Data(b), t, v(*flags), o, v(0)],
                    format!("mount {source} ({fstype}) on {target}"),
                )
            }
            Setup::Mkdir { path, mode } => {
                let p = d.data.cstr(path);
                let mut op = Op::new(
                    libc::SYS_mkdir,
                    [Arg::Data(p), v(*mode as u64), v(0), v(0), v(0), v(0)],
                    format!("mkdir {path}"),
                );
                // It may be in the lower layer already.
                op.ignore_error = true;
                op
            }
            Setup::Mknod { path, mode, dev } => {
                let p = d.data.cstr(path);
                Op::new(
                    libc::SYS_mknod,
                    [Arg::Data(p), v(*mode as u64), v(*dev), v(0), v(0), v(0)],
                    format!("mknod {path}"),
                )
            }
            Setup::Symlink { target, link } => {
                let t = d.data.cstr(target);
                let l = d.data.cstr(link);
                let mut op = Op::new(
                    libc::SYS_symlink,
                    [Arg::Data(t), Arg::Data(l), v(0), v(0), v(0), v(0)],
                    format!("symlink {link}"),
                );
                op.ignore_error = true;
                op
            }
            // Its uts namespace is a copy of the template's: the hostname
            // is set; loopback is below.
            Setup::Hostname(_) | Setup::LoopbackUp => continue,
        };
        d.state_ops.push(op);
    }
    process::plan_enter_root(d, crate::container::FORK_ROOT);
    let cwd = d.data.cstr(&desc.cwd);
    let mut op = Op::new(
        libc::SYS_chdir,
        [Arg::Data(cwd), v(0), v(0), v(0), v(0), v(0)],
        format!("chdir({})", desc.cwd),
    );
    op.ignore_error = true;
    d.state_ops.push(op);
    if c.loopback {
        // struct ifreq: the name, then the flags (a short at offset 16).
        let mut ifr = [0u8; 40];
        ifr[..2].copy_from_slice(b"lo");
        let flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as u16;
        ifr[16..18].copy_from_slice(&flags.to_le_bytes());
        let ifr_at = d.data.bytes(&ifr);
        d.state_ops.push(
            Op::new(
                libc::SYS_socket,
                [
                    v(libc::AF_INET as u64),
                    v((libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                ],
                "a socket to bring loopback up",
            )
            .save(),
        );
        d.state_ops.push(Op::new(
            libc::SYS_ioctl,
            [
                Arg::Saved,
                v(libc::SIOCSIFFLAGS),
                Arg::Data(ifr_at),
                v(0),
                v(0),
                v(0),
            ],
            "bringing loopback up",
        ));
        d.state_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            "closing that socket",
        ));
    }
}

/// Lowest page-aligned address from `SEARCH_FROM` with `len` bytes free of
/// every range in `occupied` and `also`.
fn find_free(occupied: &[(u64, u64)], len: u64, also: &[(u64, u64)]) -> Result<u64, PlanError> {
    let mut ranges: Vec<(u64, u64)> = occupied.iter().chain(also).copied().collect();
    ranges.sort_unstable();
    let mut at = SEARCH_FROM;
    for (s, e) in ranges {
        if e <= at {
            continue;
        }
        if s >= at + len {
            break;
        }
        at = e.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    }
    if at + len > TASK_SIZE {
        return Err(PlanError::NoRoom(len));
    }
    Ok(at)
}

mod descriptors;
mod mappings;
mod objects;
mod privileges;
mod process;

#[cfg(test)]
mod tests;
