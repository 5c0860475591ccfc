//! The seed descriptor: everything about a captured process except its page
//! contents, which live in the page store.

use serde::{Deserialize, Serialize};

use crate::procfs::{FdEntry, MmFields};

/// The descriptor format this build writes. It reads this one,
/// [`FORMAT_V5`] (no container), [`FORMAT_V4`] (no kernel objects), [`FORMAT_V3`] (one thread),
/// [`FORMAT_V2`] (no privileges) and [`FORMAT_V1`] (no page digests).
pub const FORMAT_VERSION: u32 = 6;

/// Format 5: no container section.
pub const FORMAT_V5: u32 = 5;

/// The fourth format: every thread, but no kernel objects behind the
/// descriptors ([`crate::kobj::FdObjects`]): its children get the
/// descriptors that are not files refused.
pub const FORMAT_V4: u32 = 4;

/// The third format: privileges, and only the main thread (no
/// [`ThreadSet`]).
pub const FORMAT_V3: u32 = 3;

/// The second format: page digests, no privileges (capabilities,
/// `no_new_privs`, seccomp filters). Its children keep forkd's.
pub const FORMAT_V2: u32 = 2;

/// The first format: a descriptor without page digests.
pub const FORMAT_V1: u32 = 1;

/// Bytes of the page store covered by one digest.
pub const DIGEST_CHUNK: u32 = 64 * 1024;

/// Digests of the page store, one per chunk of `chunk_bytes` (the last
/// chunk may be shorter): what every reader of pages checks them against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageDigests {
    /// Bytes per chunk, a multiple of the page size.
    pub chunk_bytes: u32,
    /// XXH3-64 of each chunk, in store order.
    #[serde(deserialize_with = "super::limits::digests")]
    pub xxh3: Vec<u64>,
}

impl PageDigests {
    /// The digest of `bytes` as a chunk.
    pub fn digest(bytes: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(bytes)
    }

    /// Digests of a whole page store held in memory.
    pub fn of(store: &[u8]) -> PageDigests {
        PageDigests {
            chunk_bytes: DIGEST_CHUNK,
            xxh3: store
                .chunks(DIGEST_CHUNK as usize)
                .map(Self::digest)
                .collect(),
        }
    }

    /// The store byte range of chunk `i`, for a store of `image_bytes`.
    pub fn chunk_range(&self, i: usize, image_bytes: u64) -> (u64, u64) {
        let cb = self.chunk_bytes as u64;
        let start = i as u64 * cb;
        (start, (start + cb).min(image_bytes))
    }

    /// Does `bytes`, read as chunk `i`, match its digest?
    pub fn check(&self, i: usize, bytes: &[u8]) -> bool {
        self.xxh3.get(i) == Some(&Self::digest(bytes))
    }
}

/// A captured process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Always [`FORMAT_VERSION`] for descriptors this build writes.
    pub format_version: u32,
    /// Where and when the seed was taken.
    pub source: SourceInfo,
    /// Number of threads captured: the main thread, whose state is the
    /// fields below, and [`ThreadSet::others`].
    pub threads: u32,
    /// General-purpose registers, as `PTRACE_GETREGS` reported them.
    pub registers: Registers,
    /// The full XSAVE area (`PTRACE_GETREGSET NT_X86_XSTATE`).
    #[serde(deserialize_with = "super::limits::xstate")]
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Disposition of every signal 1..=64.
    #[serde(deserialize_with = "super::limits::sigactions")]
    pub sigactions: Vec<SigAction>,
    /// The alternate signal stack.
    pub sigaltstack: SigAltStack,
    /// The rseq registration, if any.
    pub rseq: Option<Rseq>,
    /// The robust futex list head and length.
    pub robust_list: (u64, u64),
    /// `clear_child_tid` (`set_tid_address`).
    pub clear_child_tid: u64,
    /// mm fields for `PR_SET_MM_MAP`.
    pub mm: MmFields,
    /// The auxiliary vector as (type, value) words.
    #[serde(deserialize_with = "super::limits::auxv")]
    pub auxv: Vec<u64>,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: String,
    /// `personality(2)` flags.
    pub personality: u32,
    /// Thread name.
    pub comm: String,
    /// Resource limits, indexed by `RLIMIT_*`: (soft, hard).
    #[serde(deserialize_with = "super::limits::rlimits")]
    pub rlimits: Vec<(u64, u64)>,
    /// File-creation mask.
    pub umask: u32,
    /// Working directory.
    pub cwd: String,
    /// Credentials.
    pub creds: Credentials,
    /// Open file descriptors.
    #[serde(deserialize_with = "super::limits::fds")]
    pub fds: Vec<FdEntry>,
    /// Files that file-backed mappings refer to, with their identity.
    #[serde(deserialize_with = "super::limits::files")]
    pub files: Vec<FileRef>,
    /// Every mapping, in address order, with the source of each page.
    #[serde(deserialize_with = "super::limits::vmas")]
    pub vmas: Vec<Vma>,
    /// SHA-256 of the parent's `[vdso]` (hex).
    pub vdso_hash: String,
    /// Pages in the page store.
    pub pages_stored: u64,
    /// Size of the page store in bytes (`pages_stored * 4096`).
    pub image_bytes: u64,
    /// Figures about the capture itself.
    pub stats: CaptureStats,
    /// Digests of the page store (format 2; none in format 1). Encoded
    /// after the descriptor in the same checksummed body, not in it.
    #[serde(skip)]
    pub digests: Option<PageDigests>,
    /// What the process was allowed (format 3; none before). Encoded after
    /// the digests, in the same checksummed body.
    #[serde(skip)]
    pub privileges: Option<Privileges>,
    /// The threads besides the main one (format 4; format 3 and before
    /// have none). Encoded after the privileges, in the same checksummed
    /// body.
    #[serde(skip)]
    pub thread_set: ThreadSet,
    /// The kernel objects behind the descriptors that are not reopened by
    /// path (format 5; none before). Encoded after the thread set, in the
    /// same checksummed body.
    #[serde(skip)]
    pub fd_objects: crate::kobj::FdObjects,
    /// The container the parent ran in, if it ran in one (format 6; none
    /// before). Encoded after the kernel objects, in the same checksummed
    /// body.
    #[serde(skip)]
    pub container: Option<crate::container::ContainerInfo>,
}

/// What format 4 adds: every thread besides the main one (the thread-group
/// leader, whose state is the descriptor's own fields), and whether the
/// main thread's `clear_child_tid` word held its tid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSet {
    /// At capture, the main thread's `clear_child_tid` word held its tid
    /// (glibc's thread descriptor keeps the tid there): a child's main
    /// thread gets its own tid written there, as `fork()` does.
    pub main_tid_word: bool,
    /// The main thread's tid as the process numbers it (its own pid
    /// namespace's): what its robust futexes' owner words hold.
    pub main_tid: i32,
    /// The other threads, in the parent's tid order.
    #[serde(deserialize_with = "super::limits::threads")]
    pub others: Vec<ThreadState>,
}

/// One thread besides the main one, as it was at the frozen instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    /// Its tid in the parent, as the process numbers it (its own pid
    /// namespace's; what its robust futexes' owner words hold). A child's
    /// thread gets a new one, as after `fork()`.
    pub tid: i32,
    /// General-purpose registers, fs/gs base included.
    pub registers: Registers,
    /// The full XSAVE area.
    #[serde(deserialize_with = "super::limits::xstate")]
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Signals pending for this thread alone (`SigPnd`). Recorded, not
    /// delivered: a `fork()` child starts with none pending.
    pub pending: u64,
    /// Its alternate signal stack.
    pub sigaltstack: SigAltStack,
    /// Its rseq registration.
    pub rseq: Option<Rseq>,
    /// Its robust futex list head and length.
    pub robust_list: (u64, u64),
    /// Its `clear_child_tid`.
    pub clear_child_tid: u64,
    /// The `clear_child_tid` word held its tid (glibc's thread descriptor):
    /// the child's thread gets its own tid written there.
    pub tid_word: bool,
    /// Its name (`comm`).
    pub comm: String,
}

/// What a process may do beyond its uid: its capability sets, securebits,
/// `no_new_privs` and seccomp filters. A child gets the same, so a confined
/// parent never yields a less confined child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Privileges {
    /// Capability sets: inheritable, permitted, effective, bounding, ambient.
    pub caps: [u64; 5],
    /// `PR_GET_SECUREBITS`.
    pub securebits: u32,
    /// `PR_GET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// Seccomp mode: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// The seccomp filters, oldest first (the order to install them in).
    pub seccomp_filters: Vec<SeccompFilter>,
    /// `PR_GET_DUMPABLE` (0: not dumpable, not ptraceable by its user).
    pub dumpable: u32,
    /// The device and inode of the file behind each regular-file or
    /// directory descriptor, (fd, dev, ino): a child's reopened file is
    /// checked against them.
    pub open_files: Vec<(i32, u64, u64)>,
}

/// One seccomp filter program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    /// Classic BPF instructions, each a `struct sock_filter` as 8 bytes.
    pub insns: Vec<u64>,
    /// The flags it was installed with, as `PTRACE_GET_SECCOMP_METADATA`
    /// reports them (`SECCOMP_FILTER_FLAG_LOG`...).
    pub flags: u64,
}

/// Where and when a seed was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The parent's pid on its node.
    pub pid: i32,
    /// Node host name.
    pub hostname: String,
    /// Kernel release of the node (`uname -r`).
    pub kernel: String,
    /// Unix time of the capture, milliseconds.
    pub created_unix_ms: u64,
}

/// x86_64 general-purpose registers in `user_regs_struct` order.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

impl From<&libc::user_regs_struct> for Registers {
    fn from(r: &libc::user_regs_struct) -> Self {
        Registers {
            r15: r.r15,
            r14: r.r14,
            r13: r.r13,
            r12: r.r12,
            rbp: r.rbp,
            rbx: r.rbx,
            r11: r.r11,
            r10: r.r10,
            r9: r.r9,
            r8: r.r8,
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            orig_rax: r.orig_rax,
            rip: r.rip,
            cs: r.cs,
            eflags: r.eflags,
            rsp: r.rsp,
            ss: r.ss,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            ds: r.ds,
            es: r.es,
            fs: r.fs,
            gs: r.gs,
        }
    }
}

impl Registers {
    /// As a `user_regs_struct` for `PTRACE_SETREGS`.
    pub fn to_user_regs(&self) -> libc::user_regs_struct {
        // SAFETY: user_regs_struct is plain old data; all-zero is valid and
        // every field is overwritten below.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.r15 = self.r15;
        r.r14 = self.r14;
        r.r13 = self.r13;
        r.r12 = self.r12;
        r.rbp = self.rbp;
        r.rbx = self.rbx;
        r.r11 = self.r11;
        r.r10 = self.r10;
        r.r9 = self.r9;
        r.r8 = self.r8;
        r.rax = self.rax;
        r.rcx = self.rcx;
        r.rdx = self.rdx;
        r.rsi = self.rsi;
        r.rdi = self.rdi;
        r.orig_rax = self.orig_rax;
        r.rip = self.rip;
        r.cs = self.cs;
        r.eflags = self.eflags;
        r.rsp = self.rsp;
        r.ss = self.ss;
        r.fs_base = self.fs_base;
        r.gs_base = self.gs_base;
        r.ds = self.ds;
        r.es = self.es;
        r.fs = self.fs;
        r.gs = self.gs;
        r
    }
}

/// Kernel syscall-restart codes that can sit in `rax` of a process stopped
/// inside a blocking syscall.
pub mod restart {
    /// `-ERESTARTSYS`.
    pub const ERESTARTSYS: i64 = -512;
    /// `-ERESTARTNOINTR`.
    pub const ERESTARTNOINTR: i64 = -513;
    /// `-ERESTARTNOHAND`.
    pub const ERESTARTNOHAND: i64 = -514;
    /// `-ERESTART_RESTARTBLOCK`.
    pub const ERESTART_RESTARTBLOCK: i64 = -516;
    /// `__NR_restart_syscall`.
    pub const NR_RESTART_SYSCALL: u64 = 219;
}

impl Registers {
    /// The registers to resume with when no signal handler runs: a syscall
    /// interrupted with a restart code is set up to run again, exactly as the
    /// kernel does on the way back to user space.
    pub fn restarted(&self) -> Registers {
        let mut r = *self;
        if (self.orig_rax as i64) >= 0 {
            match self.rax as i64 {
                restart::ERESTARTSYS | restart::ERESTARTNOINTR | restart::ERESTARTNOHAND => {
                    r.rax = self.orig_rax;
                    r.rip -= 2;
                }
                restart::ERESTART_RESTARTBLOCK => {
                    r.rax = restart::NR_RESTART_SYSCALL;
                    r.rip -= 2;
                }
                _ => {}
            }
        }
        r
    }

    /// The registers a *new* thread resumes with (a restored child's): as
    /// [`Registers::restarted`], except that a syscall interrupted with
    /// `ERESTART_RESTARTBLOCK` (a timed futex wait, `nanosleep`, `poll`)
    /// is issued again with its own arguments. Its restart block (the time
    /// left) lived in the parent's kernel thread and is not in the child's,
    /// where `restart_syscall` would run whatever restart the husk's thread
    /// last had. A relative timeout starts again in full: the child waits
    /// at most that long, never less. An interrupted `restart_syscall`
    /// itself returns `EINTR`, as after a signal handler.
    pub fn restarted_in_child(&self) -> Registers {
        let mut r = self.restarted();
        if (self.orig_rax as i64) >= 0 && self.rax as i64 == restart::ERESTART_RESTARTBLOCK {
            if self.orig_rax == restart::NR_RESTART_SYSCALL {
                r.rax = (-libc::EINTR) as i64 as u64;
                r.rip = self.rip;
            } else {
                r.rax = self.orig_rax;
            }
        }
        r
    }

    /// The syscall the process was blocked in, if `rax` holds a restart code.
    pub fn interrupted_syscall(&self) -> Option<u64> {
        let rax = self.rax as i64;
        ((self.orig_rax as i64) >= 0 && (-516..=-512).contains(&rax) && rax != -515)
            .then_some(self.orig_rax)
    }
}

/// One signal's disposition (the kernel's `struct sigaction` for x86_64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    /// Signal number.
    pub signo: u32,
    /// Handler address, or 0 (`SIG_DFL`) / 1 (`SIG_IGN`).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// `stack_t` of `sigaltstack(2)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAltStack {
    /// Stack base.
    pub sp: u64,
    /// `SS_*` flags.
    pub flags: u32,
    /// Stack size.
    pub size: u64,
}

/// rseq registration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    /// Address of `struct rseq`.
    pub ptr: u64,
    /// Its size.
    pub len: u32,
    /// Abort signature.
    pub signature: u32,
    /// Flags.
    pub flags: u32,
}

/// Credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Real, effective, saved, filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem gid.
    pub gid: [u32; 4],
    /// Supplementary groups.
    #[serde(deserialize_with = "super::limits::groups")]
    pub groups: Vec<u32>,
}

/// A file that mappings are backed by, and how to tell it is the same file on
/// another node: size, modification time, and an ELF build-id or a SHA-256 of
/// its content (see `docs/DECISIONS.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Absolute path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// GNU build-id of an ELF file, hex.
    pub build_id: Option<String>,
    /// SHA-256 of the content, hex (files without a build-id).
    pub content_sha256: Option<String>,
}

/// What a mapping is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmaKind {
    /// Private anonymous memory.
    Anon,
    /// The `brk` heap.
    Heap,
    /// The main thread's stack.
    Stack,
    /// A private mapping of a file that can be identified on another node.
    FilePrivate,
    /// A shared mapping of a file that can be identified on another node.
    FileShared,
    /// Shared memory whose content lives only in the parent (shared
    /// anonymous, memfd, SysV shm, deleted files): every page is stored.
    Shmem,
    /// `[vdso]`.
    Vdso,
    /// `[vvar]`.
    Vvar,
    /// `[vvar_vclock]` (Linux 6.15+).
    VvarVclock,
}

impl VmaKind {
    /// The kernel provides this mapping's content; no pages are stored.
    pub fn is_kernel_provided(self) -> bool {
        matches!(self, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock)
    }

    /// The mapping's pages may come from a file.
    pub fn is_file_backed(self) -> bool {
        matches!(self, VmaKind::FilePrivate | VmaKind::FileShared)
    }

    /// Name used in human and JSON output.
    pub fn name(self) -> &'static str {
        match self {
            VmaKind::Anon => "anon",
            VmaKind::Heap => "heap",
            VmaKind::Stack => "stack",
            VmaKind::FilePrivate => "file_private",
            VmaKind::FileShared => "file_shared",
            VmaKind::Shmem => "shmem",
            VmaKind::Vdso => "vdso",
            VmaKind::Vvar => "vvar",
            VmaKind::VvarVclock => "vvar_vclock",
        }
    }
}

/// One mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    /// Start address (page aligned).
    pub start: u64,
    /// End address, exclusive (page aligned).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_SHARED` rather than `MAP_PRIVATE`.
    pub shared: bool,
    /// What it is.
    pub kind: VmaKind,
    /// Path or pseudo-name as `/proc/PID/maps` showed it (empty: anonymous).
    pub path: String,
    /// Index into [`Descriptor::files`] for file-backed kinds.
    pub file: Option<u32>,
    /// File offset of `start`.
    pub file_offset: u64,
    /// Where every page comes from, as runs covering `[start, end)` in order.
    /// Empty for kernel-provided mappings.
    #[serde(deserialize_with = "super::limits::runs")]
    pub runs: Vec<PageRun>,
}

impl Vma {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / crate::PAGE_SIZE
    }
}

/// A run of consecutive pages of one VMA with the same kind of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Index of the first page within the VMA.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
    /// Their source.
    pub state: PageState,
}

/// Where a page's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageState {
    /// Stored in the page store; page `i` of the run is at `offset + i * 4096`.
    Stored {
        /// Byte offset of the run's first page in the page store.
        offset: u64,
    },
    /// Reads as zeros.
    Zero,
    /// Read from the VMA's file at `file_offset + page index * 4096`.
    FromFile,
}

/// Figures about a capture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureStats {
    /// How long the parent was stopped for the copy-on-write clone, ns.
    pub pause_ns: u64,
    /// How long the parent was stopped again to reap the clone, ns.
    pub reap_pause_ns: u64,
    /// Whole capture, from the first look at the process to the image on disk, ns.
    pub capture_ns: u64,
    /// Pages present in RAM at capture.
    pub pages_present: u64,
    /// Pages swapped out at capture (stored, after being read back).
    pub pages_swapped: u64,
    /// Present pages found to be all zeros (recorded as zero, not stored).
    pub pages_zero: u64,
    /// Pages left to come from their file.
    pub pages_from_file: u64,
}
