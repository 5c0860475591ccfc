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

/// Build the plan. `files[i]` is how `desc.files[i]` resolved on this node.
pub fn build(
    desc: &Descriptor,
    husk: &HuskLayout,
    files: &[ResolvedFile],
    lazy: bool,
    shared_cache: Option<&SharedCache>,
    extra: u64,
    run_as: Option<super::RunAs>,
) -> Result<RestorePlan, PlanError> {
    let mut notes = Vec::new();
    for v in &desc.vmas {
        if v.end > TASK_SIZE || v.start < MMAP_MIN {
            return Err(PlanError::OutsideUserSpace {
                start: v.start,
                end: v.end,
                path: v.path.clone(),
            });
        }
    }

    // Decide every mapping's backing first: it decides what the map phase does.
    let mut backing = Vec::with_capacity(desc.vmas.len());
    let mut file_paths: Vec<String> = Vec::new();
    for v in &desc.vmas {
        let b = if v.kind.is_kernel_provided() {
            Backing::Kernel
        } else if let Some(fi) = v.file {
            let needs_file = v.runs.iter().any(|r| r.state == PageState::FromFile);
            match files.get(fi as usize) {
                Some(ResolvedFile::Local(p)) => Backing::File(intern(&mut file_paths, p)),
                Some(ResolvedFile::SeedCopy(p)) => {
                    let orig = &desc.files[fi as usize].path;
                    let note = format!("{orig} is missing or differs on this node; serving its pages from the seed's copy");
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                    Backing::File(intern(&mut file_paths, p))
                }
                _ if !needs_file && v.kind == VmaKind::FilePrivate => Backing::Anonymous,
                _ => {
                    return Err(PlanError::FileUnavailable {
                        path: desc.files[fi as usize].path.clone(),
                        start: v.start,
                        end: v.end,
                    })
                }
            }
        } else {
            Backing::Anonymous
        };
        backing.push(b);
    }

    // Lazy plans serve anonymous memory with stored pages through the
    // pager; private anonymous mappings (not the stack) are mapped from the
    // seed's shared cache memfd when there is one, so children share pages.
    let lazy_vmas: Vec<bool> = desc
        .vmas
        .iter()
        .zip(&backing)
        .map(|(v, b)| lazy && *b == Backing::Anonymous && lazy_candidate(v))
        .collect();
    let continue_vmas: Vec<bool> = desc
        .vmas
        .iter()
        .enumerate()
        .map(|(i, v)| {
            lazy_vmas[i]
                && !v.shared
                && matches!(v.kind, VmaKind::Anon | VmaKind::Heap)
                && shared_cache.is_some_and(|c| c.base.get(i).copied().flatten().is_some())
        })
        .collect();
    let mut data = Data::default();
    let mut map_ops = Vec::new();
    let (vdso_here, vdso_seed) = vdso_blocks(husk, desc)?;

    // Room for the executor: free in both layouts, and a second range to
    // park the vDSO block in if its old and new places overlap.
    let occupied: Vec<(u64, u64)> = desc
        .vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(husk.maps.iter().map(|m| (m.start, m.end)))
        .collect();

    // 1. Unmap the husk (all but its vDSO block; the executor area is not
    //    mapped yet when the husk layout was read).
    for m in &husk.maps {
        if is_vdso_block(&m.path) || m.path == "[vsyscall]" {
            continue;
        }
        map_ops.push(Op::new(
            libc::SYS_munmap,
            [v(m.start), v(m.end - m.start), v(0), v(0), v(0), v(0)],
            format!("munmap husk {:#x}-{:#x} {}", m.start, m.end, m.path),
        ));
    }

    // 2. Move the vDSO block to the parent's address, keeping its shape.
    let mut moves: Vec<(u64, u64, u64, String)> = Vec::new(); // (from, len, to, name)
    if let (Some(h), Some(s)) = (&vdso_here, &vdso_seed) {
        let delta_needed = h[0].0 != s[0].0;
        if delta_needed {
            let (h_lo, h_hi) = (h[0].0, h.last().map(|x| x.1).unwrap_or(0));
            let (s_lo, s_hi) = (s[0].0, s.last().map(|x| x.1).unwrap_or(0));
            let overlap = h_lo < s_hi && s_lo < h_hi;
            if overlap {
                let park = find_free(&occupied, h_hi - h_lo, &[])?;
                for (a, b, name) in h {
                    moves.push((*a, b - a, park + (a - h_lo), name.clone()));
                }
                for (a, b, name) in h {
                    moves.push((park + (a - h_lo), b - a, s_lo + (a - h_lo), name.clone()));
                }
            } else {
                for (a, b, name) in h {
                    moves.push((*a, b - a, s_lo + (a - h_lo), name.clone()));
                }
            }
        }
    }
    for (from, len, to, name) in moves {
        map_ops.push(
            Op::new(
                libc::SYS_mremap,
                [
                    v(from),
                    v(len),
                    v(len),
                    v((libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64),
                    v(to),
                    v(0),
                ],
                format!("mremap {name} {from:#x} -> {to:#x}"),
            )
            .expect(to),
        );
    }

    // Stored pages go into mappings the process itself may not write (RELRO
    // pages, read-only data it wrote before an mprotect): map those
    // writable first, so forkd can fill them with one process_vm_writev,
    // and give them their own protection at the start of the state phase.
    let write_first: Vec<bool> = desc
        .vmas
        .iter()
        .map(|v| {
            v.prot & libc::PROT_WRITE as u32 == 0
                && !v.kind.is_kernel_provided()
                && v.runs
                    .iter()
                    .any(|r| matches!(r.state, PageState::Stored { .. }))
        })
        .collect();
    // 3. Map every parent mapping at its address.
    let mut open_file: Option<(usize, i32)> = None;
    for (i, ((vma, b), wf)) in desc.vmas.iter().zip(&backing).zip(&write_first).enumerate() {
        let len = vma.end - vma.start;
        let map_prot = if *wf {
            vma.prot | libc::PROT_WRITE as u32
        } else {
            vma.prot
        };
        let what = format!(
            "map {:#x}-{:#x} {} {}",
            vma.start,
            vma.end,
            vma.kind.name(),
            vma.path
        );
        match b {
            Backing::Kernel => {}
            // Mapped from the shared cache below.
            Backing::Anonymous if continue_vmas[i] => {}
            Backing::Anonymous => {
                let mut flags = libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
                flags |= if vma.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                if vma.kind == VmaKind::Stack {
                    flags |= libc::MAP_GROWSDOWN;
                }
                map_ops.push(
                    Op::new(
                        libc::SYS_mmap,
                        [
                            v(vma.start),
                            v(len),
                            v(map_prot as u64),
                            v(flags as u64),
                            v(u64::MAX),
                            v(0),
                        ],
                        what,
                    )
                    .expect(vma.start),
                );
            }
            Backing::File(i) => {
                let writable_shared = vma.shared && vma.prot & libc::PROT_WRITE as u32 != 0;
                let oflags = if writable_shared {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                } | libc::O_CLOEXEC;
                // Consecutive mappings of one file share one open.
                if open_file != Some((*i, oflags)) {
                    if let Some((prev, _)) = open_file.take() {
                        map_ops.push(Op::new(
                            libc::SYS_close,
                            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
                            format!("close {}", file_paths[prev]),
                        ));
                    }
                    let path = data.cstr(&file_paths[*i]);
                    map_ops.push(
                        open_no_symlinks(
                            &mut data,
                            path,
                            oflags as u64,
                            format!("open {}", file_paths[*i]),
                        )
                        .save(),
                    );
                    open_file = Some((*i, oflags));
                }
                let mut flags = libc::MAP_FIXED_NOREPLACE;
                flags |= if vma.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                map_ops.push(
                    Op::new(
                        libc::SYS_mmap,
                        [
                            v(vma.start),
                            v(len),
                            v(map_prot as u64),
                            v(flags as u64),
                            Arg::Saved,
                            v(vma.file_offset),
                        ],
                        what,
                    )
                    .expect(vma.start),
                );
            }
        }
    }
    if let Some((prev, _)) = open_file.take() {
        map_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            format!("close {}", file_paths[prev]),
        ));
    }

    // Private anonymous mappings served from the shared cache: its memfd,
    // opened through forkd's /proc entry, mapped privately at each
    // mapping's place in the cache layout.
    if let Some(cache) = shared_cache.filter(|_| continue_vmas.iter().any(|c| *c)) {
        let path = data.cstr(&cache.path);
        map_ops.push(
            Op::new(
                libc::SYS_open,
                [
                    Arg::Data(path),
                    v((libc::O_RDWR | libc::O_CLOEXEC) as u64),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                ],
                "open the seed cache",
            )
            .save(),
        );
        for (i, vma) in desc.vmas.iter().enumerate() {
            let Some(base) = cache
                .base
                .get(i)
                .copied()
                .flatten()
                .filter(|_| continue_vmas[i])
            else {
                continue;
            };
            let prot = if write_first[i] {
                vma.prot | libc::PROT_WRITE as u32
            } else {
                vma.prot
            };
            map_ops.push(
                Op::new(
                    libc::SYS_mmap,
                    [
                        v(vma.start),
                        v(vma.end - vma.start),
                        v(prot as u64),
                        v((libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE) as u64),
                        Arg::Saved,
                        v(base),
                    ],
                    format!(
                        "map {:#x}-{:#x} {} from the seed cache",
                        vma.start,
                        vma.end,
                        vma.kind.name()
                    ),
                )
                .expect(vma.start),
            );
        }
        map_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            "close the seed cache",
        ));
    }

    let mut state_ops = Vec::new();
    let mut soft_steps = Vec::new();

    // 4. Only stdio is inherited from the spawner: close anything else the
    //    husk was given, so the parent's descriptors get their own numbers.
    state_ops.push(Op::new(
        libc::SYS_close_range,
        [v(3), v(u32::MAX as u64), v(0), v(0), v(0), v(0)],
        "close_range(3, ~0)",
    ));
    for (vma, wf) in desc.vmas.iter().zip(&write_first) {
        if *wf {
            state_ops.push(Op::new(
                libc::SYS_mprotect,
                [
                    v(vma.start),
                    v(vma.end - vma.start),
                    v(vma.prot as u64),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("mprotect {:#x}-{:#x} {}", vma.start, vma.end, vma.path),
            ));
        }
    }

    // mm fields, auxv and exe (PR_SET_MM_MAP).
    let auxv_at = data.words(&desc.auxv);
    let mm = &desc.mm;
    let mut mm_map = Vec::with_capacity(PRCTL_MM_MAP_SIZE + 8);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
    ] {
        mm_map.extend_from_slice(&w.to_le_bytes());
    }
    mm_map.extend_from_slice(&0u64.to_le_bytes()); // auxv pointer, patched below
    mm_map.extend_from_slice(&((desc.auxv.len() * 8) as u32).to_le_bytes());
    mm_map.extend_from_slice(&u32::MAX.to_le_bytes()); // exe_fd: -1 = keep
    mm_map.extend_from_slice(&[0u8; 8]); // room for the 8-byte STORE of exe_fd
    let mm_at = data.bytes(&mm_map);
    let exe_usable = files_find(desc, files, &desc.exe);
    if let Some(exe) = &exe_usable {
        let exe_at = data.cstr(exe);
        let open_exe = open_no_symlinks(
            &mut data,
            exe_at,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            format!("open exe {exe}"),
        );
        state_ops.push(
            Op {
                store: Some(mm_at + 100),
                ..open_exe
            }
            .save(),
        );
    } else {
        notes.push(format!(
            "the executable {} is not available here; /proc/PID/exe of the child shows the husk",
            desc.exe
        ));
    }
    state_ops.push(Op::new(
        libc::SYS_prctl,
        [
            v(PR_SET_MM),
            v(PR_SET_MM_MAP),
            Arg::Data(mm_at),
            v(PRCTL_MM_MAP_SIZE as u64),
            v(0),
            v(0),
        ],
        "prctl(PR_SET_MM_MAP)",
    ));
    if exe_usable.is_some() {
        state_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            "close exe",
        ));
    }

    // 5. Signal handlers, alternate stack, rseq, robust list, tid address.
    for sa in &desc.sigactions {
        if sa.signo == libc::SIGKILL as u32 || sa.signo == libc::SIGSTOP as u32 {
            continue;
        }
        if sa.handler == 0 && sa.flags == 0 && sa.mask == 0 {
            continue; // the husk's default already
        }
        let act = data.words(&[sa.handler, sa.flags, sa.restorer, sa.mask]);
        state_ops.push(Op::new(
            libc::SYS_rt_sigaction,
            [v(sa.signo as u64), Arg::Data(act), v(0), v(8), v(0), v(0)],
            format!("rt_sigaction({})", sa.signo),
        ));
    }
    let ss = &desc.sigaltstack;
    if ss.flags & libc::SS_DISABLE as u32 == 0 && ss.size > 0 {
        let flags = (ss.flags & !(libc::SS_ONSTACK as u32)) as u64;
        let at = data.words(&[ss.sp, flags, ss.size]);
        state_ops.push(Op::new(
            libc::SYS_sigaltstack,
            [Arg::Data(at), v(0), v(0), v(0), v(0), v(0)],
            "sigaltstack",
        ));
    }
    if let Some(r) = desc.rseq {
        state_ops.push(
            Op::new(
                libc::SYS_rseq,
                [
                    v(r.ptr),
                    v(r.len as u64),
                    v(0),
                    v(r.signature as u64),
                    v(0),
                    v(0),
                ],
                format!("rseq({:#x})", r.ptr),
            )
            .expect(0),
        );
    }
    state_ops.extend(robust_list_op(desc));
    state_ops.push(Op::new(
        libc::SYS_set_tid_address,
        [v(desc.clear_child_tid), v(0), v(0), v(0), v(0), v(0)],
        "set_tid_address",
    ));

    // 6. personality, comm, umask, cwd (rlimits come after the descriptors).
    state_ops.push(Op::new(
        libc::SYS_personality,
        [v(desc.personality as u64), v(0), v(0), v(0), v(0), v(0)],
        "personality",
    ));
    let comm = data.cstr(&desc.comm);
    state_ops.push(Op::new(
        libc::SYS_prctl,
        [v(PR_SET_NAME), Arg::Data(comm), v(0), v(0), v(0), v(0)],
        "prctl(PR_SET_NAME)",
    ));
    state_ops.push(Op::new(
        libc::SYS_umask,
        [v(desc.umask as u64), v(0), v(0), v(0), v(0), v(0)],
        "umask",
    ));
    let cwd = data.cstr(&desc.cwd);
    let slot = data.slot();
    state_ops.push(
        Op::new(
            libc::SYS_chdir,
            [Arg::Data(cwd), v(0), v(0), v(0), v(0), v(0)],
            "chdir",
        )
        .soft(slot),
    );
    soft_steps.push(SoftStep {
        result_at: slot,
        what: format!("chdir({})", desc.cwd),
    });
    // 7. File descriptors. open() returns the lowest free number, so
    //    numbers are filled in ascending order, gaps with placeholders that
    //    are closed afterwards; EXPECT checks every number.
    let max_fd = desc.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    if max_fd > MAX_FD {
        return Err(PlanError::FdTooHigh(max_fd));
    }
    let devnull = data.cstr("/dev/null");
    let mut gaps = Vec::new();
    for n in 3..=max_fd {
        let f = desc.fds.iter().find(|f| f.fd == n);
        let reopen = f.filter(|f| reopenable(f));
        match (f, reopen) {
            (Some(f), Some(_)) => {
                let p = data.cstr(&f.path);
                state_ops.push(
                    open_no_symlinks(
                        &mut data,
                        p,
                        reopen_flags(f),
                        format!("reopen fd {n} {}", f.path),
                    )
                    .expect(n as u64),
                );
                if f.kind == FdKind::Regular && f.offset > 0 {
                    let slot = data.slot();
                    state_ops.push(
                        Op::new(
                            libc::SYS_lseek,
                            [
                                v(n as u64),
                                v(f.offset),
                                v(libc::SEEK_SET as u64),
                                v(0),
                                v(0),
                                v(0),
                            ],
                            format!("lseek fd {n}"),
                        )
                        .soft(slot),
                    );
                    soft_steps.push(SoftStep {
                        result_at: slot,
                        what: format!("restoring the offset of fd {n}"),
                    });
                }
            }
            (Some(f), None) => {
                let cloexec = if f.flags as i32 & libc::O_CLOEXEC != 0 {
                    libc::O_CLOEXEC
                } else {
                    0
                };
                state_ops.push(
                    Op::new(
                        libc::SYS_open,
                        [
                            Arg::Data(devnull),
                            v((libc::O_RDWR | cloexec) as u64),
                            v(0),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("placeholder for fd {n}"),
                    )
                    .expect(n as u64),
                );
                notes.push(format!(
                    "fd {n} ({:?} {}) cannot be recreated; it is /dev/null in the child",
                    f.kind, f.path
                ));
            }
            (None, _) => {
                state_ops.push(
                    Op::new(
                        libc::SYS_open,
                        [
                            Arg::Data(devnull),
                            v(libc::O_RDONLY as u64),
                            v(0),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("gap filler fd {n}"),
                    )
                    .expect(n as u64),
                );
                gaps.push(n);
            }
        }
    }
    for n in gaps {
        state_ops.push(Op::new(
            libc::SYS_close,
            [v(n as u64), v(0), v(0), v(0), v(0), v(0)],
            format!("close gap filler fd {n}"),
        ));
    }

    // Lazy plans: the child's userfaultfd, made in the child and moved to a
    //    high number (close-on-exec) that forkd takes with pidfd_getfd. The
    //    child keeps its copy: if forkd dies, faults then wait (and the
    //    parent-death signal below ends the child) instead of reading zeros.
    let mut uffd_slot = None;
    if lazy {
        let nofile_soft = desc
            .rlimits
            .get(libc::RLIMIT_NOFILE as usize)
            .map(|l| l.0)
            .unwrap_or(1024);
        // High, out of the way, and below the soft RLIMIT_NOFILE (a fork
        // of a template can place it only there): above the seed's
        // descriptors if there is room, else in a gap between them.
        let limit = nofile_soft.min(1024);
        let target = if ((max_fd + 1) as u64) < limit {
            ((max_fd + 1) as u64).max(limit.saturating_sub(24))
        } else {
            (3..limit)
                .rev()
                .find(|n| !desc.fds.iter().any(|f| f.fd as u64 == *n))
                .unwrap_or((max_fd + 1) as u64)
        };
        let slot = data.slot();
        state_ops.push(
            Op::new(
                libc::SYS_userfaultfd,
                [
                    v((libc::O_CLOEXEC | libc::O_NONBLOCK) as u64),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                ],
                "userfaultfd()",
            )
            .save(),
        );
        state_ops.push(Op {
            store: Some(slot),
            ..Op::new(
                libc::SYS_fcntl,
                [
                    Arg::Saved,
                    v(libc::F_DUPFD_CLOEXEC as u64),
                    v(target),
                    v(0),
                    v(0),
                    v(0),
                ],
                "move the userfaultfd up",
            )
        });
        state_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            "close the first userfaultfd number",
        ));
        uffd_slot = Some(slot);
    }

    // Resource limits after every descriptor is in place (a fork child
    // keeps descriptors above a lowered RLIMIT_NOFILE, but no new one can
    // be made there), before the credentials (which may forbid them).
    for (res, (soft, hard)) in desc.rlimits.iter().enumerate() {
        let slot = data.slot();
        state_ops.push(
            prlimit_op(
                &mut data,
                res as u32,
                (*soft, *hard),
                format!("prlimit({res})"),
            )
            .soft(slot),
        );
        soft_steps.push(SoftStep {
            result_at: slot,
            what: format!("setting resource limit {res} to ({soft}, {hard})"),
        });
    }

    // 8. Privileges and credentials, last: after them the child may no
    //    longer be allowed the steps above. The parent's capability
    //    bounding set and securebits while still root; then its ids (or
    //    the tenant's: `run_as`); then its capability sets, ambient ones,
    //    no_new_privs; its seccomp filters very last (they may forbid any
    //    of the steps before them).
    let c = &desc.creds;
    let (uid, gid, groups) = match run_as {
        Some(r) => ([r.uid; 3], [r.gid; 3], vec![r.gid]),
        None => (
            [c.uid[0], c.uid[1], c.uid[2]],
            [c.gid[0], c.gid[1], c.gid[2]],
            c.groups.clone(),
        ),
    };
    let privs = desc.privileges.as_ref();
    let mut pointers: Vec<(usize, usize)> = Vec::new();
    let keep_caps = match (privs, run_as) {
        (Some(p), None) => {
            let last = cap_last_cap();
            for cap in 0..=last {
                if p.caps[3] & (1u64 << cap) == 0 {
                    state_ops.push(Op::new(
                        libc::SYS_prctl,
                        [
                            v(libc::PR_CAPBSET_DROP as u64),
                            v(cap as u64),
                            v(0),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("prctl(PR_CAPBSET_DROP, {cap})"),
                    ));
                }
            }
            if p.securebits != 0 {
                state_ops.push(Op::new(
                    libc::SYS_prctl,
                    [
                        v(libc::PR_SET_SECUREBITS as u64),
                        v(p.securebits as u64),
                        v(0),
                        v(0),
                        v(0),
                        v(0),
                    ],
                    "prctl(PR_SET_SECUREBITS)",
                ));
            }
            // A parent that is not root but holds capabilities: they are
            // kept across the uid change, then set exactly.
            const SECBIT_KEEP_CAPS: u32 = 1 << 4;
            const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
            let need = uid.iter().all(|u| *u != 0)
                && p.caps[1] != 0
                && p.securebits & SECBIT_KEEP_CAPS == 0;
            if need && p.securebits & SECBIT_KEEP_CAPS_LOCKED != 0 {
                notes.push(
                    "the parent's capabilities are not kept: its securebits lock keep-caps off"
                        .into(),
                );
            }
            let need = need && p.securebits & SECBIT_KEEP_CAPS_LOCKED == 0;
            if need {
                state_ops.push(Op::new(
                    libc::SYS_prctl,
                    [
                        v(libc::PR_SET_KEEPCAPS as u64),
                        v(1),
                        v(0),
                        v(0),
                        v(0),
                        v(0),
                    ],
                    "prctl(PR_SET_KEEPCAPS, 1)",
                ));
            }
            need
        }
        _ => false,
    };
    let g_bytes: Vec<u8> = groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let g_at = data.bytes(&g_bytes);
    state_ops.push(Op::new(
        libc::SYS_setgroups,
        [
            v(groups.len() as u64),
            Arg::Data(g_at),
            v(0),
            v(0),
            v(0),
            v(0),
        ],
        "setgroups",
    ));
    state_ops.push(Op::new(
        libc::SYS_setresgid,
        [
            v(gid[0] as u64),
            v(gid[1] as u64),
            v(gid[2] as u64),
            v(0),
            v(0),
            v(0),
        ],
        "setresgid",
    ));
    state_ops.push(Op::new(
        libc::SYS_setresuid,
        [
            v(uid[0] as u64),
            v(uid[1] as u64),
            v(uid[2] as u64),
            v(0),
            v(0),
            v(0),
        ],
        "setresuid",
    ));
    if let (Some(p), None) = (privs, run_as) {
        // capset: header {version 3, pid 0}, then two data structs
        // {effective, permitted, inheritable} (low, then high 32 bits).
        let half = |x: u64, hi: bool| (if hi { x >> 32 } else { x & 0xffff_ffff }) as u32;
        let mut d = Vec::with_capacity(24);
        for hi in [false, true] {
            for set in [p.caps[2], p.caps[1], p.caps[0]] {
                d.extend_from_slice(&half(set, hi).to_le_bytes());
            }
        }
        let mut h = 0x2008_0522u32.to_le_bytes().to_vec(); // _LINUX_CAPABILITY_VERSION_3
        h.extend_from_slice(&0u32.to_le_bytes()); // pid 0: this process
        let hdr = data.bytes(&h);
        let caps_at = data.bytes(&d);
        state_ops.push(Op::new(
            libc::SYS_capset,
            [Arg::Data(hdr), Arg::Data(caps_at), v(0), v(0), v(0), v(0)],
            "capset (the parent's capabilities)",
        ));
        for cap in 0..64u64 {
            if p.caps[4] & (1u64 << cap) != 0 {
                state_ops.push(Op::new(
                    libc::SYS_prctl,
                    [
                        v(libc::PR_CAP_AMBIENT as u64),
                        v(libc::PR_CAP_AMBIENT_RAISE as u64),
                        v(cap),
                        v(0),
                        v(0),
                        v(0),
                    ],
                    format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"),
                ));
            }
        }
        if keep_caps {
            state_ops.push(Op::new(
                libc::SYS_prctl,
                [
                    v(libc::PR_SET_KEEPCAPS as u64),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                ],
                "prctl(PR_SET_KEEPCAPS, 0)",
            ));
        }
    }
    let filters: &[crate::image::SeccompFilter] =
        privs.map(|p| p.seccomp_filters.as_slice()).unwrap_or(&[]);
    let parent_nnp = privs.is_some_and(|p| p.no_new_privs);
    if run_as.is_some() && !parent_nnp {
        notes.push("no_new_privs is set (the parent had it off): a tenant's child never gains privileges through exec".into());
    }
    if parent_nnp || run_as.is_some() {
        state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_NO_NEW_PRIVS as u64),
                v(1),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "prctl(PR_SET_NO_NEW_PRIVS)",
        ));
    }
    if let Some(p) = privs {
        // A credential change resets it; the parent's, as a fork child has.
        state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_DUMPABLE as u64),
                v(p.dumpable as u64),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            format!("prctl(PR_SET_DUMPABLE, {})", p.dumpable),
        ));
    }
    if lazy && dies_with_spawner() {
        // A child whose pager is gone must die, not run on: set after the
        // credential change, which clears it.
        state_ops.push(pdeathsig_op());
    }
    for (i, f) in filters.iter().enumerate() {
        let insns: Vec<u8> = f.insns.iter().flat_map(|w| w.to_le_bytes()).collect();
        let insns_at = data.bytes(&insns);
        // struct sock_fprog { u16 len; (pad); struct sock_filter *filter; }
        let mut prog = (f.insns.len() as u64).to_le_bytes().to_vec();
        prog.extend_from_slice(&0u64.to_le_bytes());
        let prog_at = data.bytes(&prog);
        pointers.push((prog_at + 8, insns_at));
        state_ops.push(Op::new(
            libc::SYS_seccomp,
            [
                v(1), // SECCOMP_SET_MODE_FILTER
                // LOG and SPEC_ALLOW; TSYNC means nothing for one thread,
                // and a listener's fd is not the child's.
                v(f.flags & (2 | 4)),
                Arg::Data(prog_at),
                v(0),
                v(0),
                v(0),
            ],
            format!(
                "seccomp(SECCOMP_SET_MODE_FILTER) (the parent's filter {} of {})",
                i + 1,
                filters.len()
            ),
        ));
    }

    // Patch the auxv pointer into the prctl_mm_map once the data area is final.
    let mut plan = RestorePlan {
        base: 0,
        map_ops,
        state_ops,
        data: data.0,
        backing,
        file_paths,
        soft_steps,
        notes,
        lazy: lazy_vmas,
        uffd_slot,
        write_first,
        from_cache: continue_vmas,
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
    plan.base = find_free(&occupied, len, &park)?;
    let data_at = plan.blob().data;
    let auxv_addr = data_at + auxv_at as u64;
    plan.data[mm_at + 88..mm_at + 96].copy_from_slice(&auxv_addr.to_le_bytes());
    for (at, target) in pointers {
        let addr = data_at + target as u64;
        plan.data[at..at + 8].copy_from_slice(&addr.to_le_bytes());
    }
    Ok(plan)
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

/// The highest capability this kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
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

/// Is this descriptor of the seed opened again by path in a child?
fn reopenable(f: &FdEntry) -> bool {
    matches!(
        f.kind,
        FdKind::Regular | FdKind::Directory | FdKind::CharDevice
    ) && std::path::Path::new(&f.path).exists()
}

/// The `open` flags a reopened descriptor gets: the seed's, less those that
/// only mattered when it was first opened (`O_CREAT`, `O_TRUNC`...).
fn reopen_flags(f: &FdEntry) -> u64 {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_CLOEXEC
        | libc::O_DIRECTORY
        | libc::O_NOATIME
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_LARGEFILE;
    (f.flags as i32 & keep) as u64
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
) -> ForkTable {
    let mut data = Data::default();
    // recvmsg's buffers. Absolute addresses: the data area starts at `at`.
    let buf = data.words(&[0]);
    let iov = data.words(&[0, 1]);
    let control = data.words(&[0; 8]);
    let msghdr = data.words(&[0; 7]);
    let patch = |d: &mut Data, off: usize, word: u64| {
        d.0[off..off + 8].copy_from_slice(&word.to_le_bytes());
    };
    patch(&mut data, iov, at + buf as u64);
    patch(&mut data, msghdr + 16, at + iov as u64); // msg_iov
    patch(&mut data, msghdr + 24, 1); // msg_iovlen
    patch(&mut data, msghdr + 32, at + control as u64); // msg_control
    patch(&mut data, msghdr + 40, 64); // msg_controllen
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
            ops.push(prlimit_op(&mut data, nofile, (hard, hard), what));
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
            ops.push(prlimit_op(&mut data, nofile, (soft, hard), what));
        }
    }
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
    if uffd_target.is_some() && dies_with_spawner() {
        ops.push(pdeathsig_op());
    }
    let table_at = at + align8(data.0.len()) as u64;
    let mut bytes = data.0;
    bytes.resize(align8(bytes.len()), 0);
    for op in &ops {
        encode_op(op, at).encode(&mut bytes);
    }
    ForkTable {
        bytes,
        table: (table_at, ops.len() as u64),
        what: ops.into_iter().map(|o| o.what).collect(),
    }
}

fn intern(v: &mut Vec<String>, s: &str) -> usize {
    match v.iter().position(|x| x == s) {
        Some(i) => i,
        None => {
            v.push(s.to_string());
            v.len() - 1
        }
    }
}

/// The executable's usable path: the original if it resolved locally, the
/// seed's copy otherwise, or nothing.
fn files_find(desc: &Descriptor, files: &[ResolvedFile], exe: &str) -> Option<String> {
    let i = desc.files.iter().position(|f| f.path == exe)?;
    match files.get(i)? {
        ResolvedFile::Local(p) | ResolvedFile::SeedCopy(p) => Some(p.clone()),
        ResolvedFile::Unavailable => None,
    }
}

fn is_vdso_block(path: &str) -> bool {
    matches!(path, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

type Block = Vec<(u64, u64, String)>;

/// The husk's and the seed's vDSO blocks, which must have the same shape.
fn vdso_blocks(
    husk: &HuskLayout,
    desc: &Descriptor,
) -> Result<(Option<Block>, Option<Block>), PlanError> {
    let here: Block = husk
        .maps
        .iter()
        .filter(|m| is_vdso_block(&m.path))
        .map(|m| (m.start, m.end, m.path.clone()))
        .collect();
    let seed: Block = desc
        .vmas
        .iter()
        .filter(|v| v.kind.is_kernel_provided())
        .map(|v| (v.start, v.end, v.path.clone()))
        .collect();
    let shape = |b: &Block| -> Vec<(u64, u64, String)> {
        let base = b.first().map(|x| x.0).unwrap_or(0);
        b.iter()
            .map(|(s, e, n)| (s - base, e - s, n.clone()))
            .collect()
    };
    let fmt = |b: &Block| {
        b.iter()
            .map(|(s, e, n)| format!("{n} {}K", (e - s) / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if shape(&here) != shape(&seed) {
        return Err(PlanError::VdsoLayout {
            here: fmt(&here),
            seed: fmt(&seed),
        });
    }
    if here.is_empty() {
        return Ok((None, None));
    }
    Ok((Some(here), Some(seed)))
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

#[cfg(test)]
mod tests;
