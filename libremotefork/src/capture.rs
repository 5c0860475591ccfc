//! Capture: turn a running process, with all its threads, into a seed image.
//!
//! The parent is stopped only long enough to make a copy-on-write clone of
//! itself: forkd seizes every thread (threads created or exiting meanwhile
//! included), reads each one's CPU and per-thread state (registers, XSAVE,
//! signal mask, alternate stack, rseq, robust list, `clear_child_tid`,
//! name), injects one `clone()` into the main thread (with
//! exit signal 0, so the parent is never sent a `SIGCHLD` for it), puts its
//! registers back and lets it run. Everything else — page classification,
//! reading memory, signal handlers, fds — is read from the frozen clone
//! while the parent runs on. The clone is then killed, and its zombie reaped
//! by injecting one `wait4()` into the parent (a second, equally short stop).
//!
//! Syscalls are injected by pointing `rip` at a `syscall` instruction inside
//! the process's own `[vdso]`: no code is ever written into the target.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::onecpu::OneCpu;
use kernel_helpers::mapping::Mapping;
use kernel_helpers::mem::{self, MemError, ProcMem, RemoteRange};
use kernel_helpers::pagemap::{Pagemap, PagemapError};
use kernel_helpers::proc::{self as kproc, ProcError, RLIMIT_COUNT};
use kernel_helpers::ptrace::{self, PtraceError, Stop, Tracee};

use crate::tracer::Tracer;
use libc::pid_t;
use tracing::{debug, info, info_span, warn};

use crate::classify::{build_runs, classify_page, is_zero_page, PageClass};
use crate::fileid;
use crate::image::{
    self, CaptureStats, Credentials, Descriptor, FileRef, ImageError, ImageWriter, Privileges,
    Registers, Rseq, SeccompFilter, SigAction, SigAltStack, SourceInfo, ThreadSet, ThreadState,
    Vma, VmaKind, FORMAT_VERSION,
};
use crate::procfs::{self, MapsEntry, ProcfsError};
use crate::PAGE_SIZE;

/// Pages read per `process_vm_readv` batch and written per `write`.
const CHUNK_PAGES: usize = 512;

/// `PR_GET_TID_ADDRESS`.
const PR_GET_TID_ADDRESS: u64 = 40;

/// Errors of capture. Each says which process and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Its container could not be captured.
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    /// No such process.
    #[error("process {0} does not exist")]
    NoSuchProcess(pid_t),
    /// The process is a zombie: it has exited and has no memory left.
    #[error("process {0} is a zombie (it has exited and is waiting to be reaped); there is nothing to capture")]
    Zombie(pid_t),
    /// The main thread has exited and others run on: its pid is held by a
    /// zombie, and a child's main thread would have nothing to be.
    #[error("process {pid}: its main thread has exited while {threads} other threads run on; a process without its main thread cannot be captured")]
    MainThreadExited {
        /// The process.
        pid: pid_t,
        /// Its thread count.
        threads: u32,
    },
    /// One thread cannot be captured.
    #[error("process {pid}: thread {tid} ({comm}) cannot be captured: {why}")]
    Thread {
        /// The process.
        pid: pid_t,
        /// The thread.
        tid: pid_t,
        /// Its name.
        comm: String,
        /// Why.
        why: String,
    },
    /// The descriptor named for a cooperative all-threads checkpoint's
    /// answer is not the caller's socket to forkd.
    #[error("process {pid}: descriptor {fd}, named as the one its checkpoint waits on, cannot be: {why}")]
    CoopReply {
        /// The process.
        pid: pid_t,
        /// The descriptor.
        fd: i32,
        /// What it is instead.
        why: String,
    },
    /// ptrace was refused.
    #[error("not permitted to capture process {pid}: {detail} (run forkd as root or with CAP_SYS_PTRACE)")]
    NotPermitted {
        /// The process.
        pid: pid_t,
        /// What the kernel said.
        detail: String,
    },
    /// The process exited while it was being captured.
    #[error("process {pid} exited during capture ({detail}); nothing was written")]
    Exited {
        /// The process.
        pid: pid_t,
        /// How.
        detail: String,
    },
    /// The process has no `[vdso]` to borrow a `syscall` instruction from.
    #[error("process {0} has no [vdso] mapping (booted with vdso=0?); capture needs it to run syscalls inside the process")]
    NoVdso(pid_t),
    /// A mapping that cannot be captured.
    #[error(
        "process {pid}: cannot capture the mapping {start:#x}-{end:#x} of {path} (device memory)"
    )]
    Unsupported {
        /// The process.
        pid: pid_t,
        /// Mapping start.
        start: u64,
        /// Mapping end.
        end: u64,
        /// Its path.
        path: String,
    },
    /// A syscall run inside the process failed.
    #[error("process {pid}: injected {what} failed: {source}")]
    Injected {
        /// The process.
        pid: pid_t,
        /// Which syscall.
        what: &'static str,
        /// errno.
        source: std::io::Error,
    },
    /// Reading procfs failed.
    #[error(transparent)]
    Procfs(ProcfsError),
    /// A descriptor cannot be kept, or reading its kernel object failed.
    #[error(transparent)]
    Fd(#[from] crate::kobj::FdError),
    /// A ptrace operation failed.
    #[error(transparent)]
    Ptrace(PtraceError),
    /// Reading memory failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Reading the pagemap failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// prlimit or get_robust_list failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// Writing the image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl From<ProcfsError> for CaptureError {
    fn from(e: ProcfsError) -> Self {
        match e {
            ProcfsError::NoSuchProcess(p) => CaptureError::NoSuchProcess(p),
            ProcfsError::NotPermitted { pid, path } => CaptureError::NotPermitted {
                pid,
                detail: format!("reading {path} was refused"),
            },
            other => CaptureError::Procfs(other),
        }
    }
}

impl CaptureError {
    fn from_ptrace(pid: pid_t, e: PtraceError) -> CaptureError {
        match e {
            PtraceError::NoSuchProcess { pid } => CaptureError::NoSuchProcess(pid),
            PtraceError::NotPermitted { pid, source } => CaptureError::NotPermitted {
                pid,
                detail: source.to_string(),
            },
            PtraceError::Gone { how, .. } => CaptureError::Exited { pid, detail: how },
            other => CaptureError::Ptrace(other),
        }
    }
}

/// Points in a capture where a test can interfere (e.g. kill the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePoint {
    /// The parent is stopped; nothing has been injected yet.
    ParentStopped,
    /// The clone exists and is stopped; the parent runs again.
    CloneStopped,
}

/// Options of a capture.
#[derive(Default)]
pub struct CaptureOptions {
    /// fsync the image before the descriptor is renamed into place.
    pub durable: bool,
    /// Called at each [`CapturePoint`] (for fault-injection tests).
    pub hook: Option<Box<dyn Fn(CapturePoint) + Send + Sync>>,
    /// Called with the clone's pid as soon as it exists, so that someone who
    /// outlives this capture can reap it in the parent should the capture
    /// die midway ([`reap_leftover_clone`]).
    pub on_clone: Option<Box<dyn Fn(pid_t) + Send + Sync>>,
    /// A directory of kept file copies shared by many seeds (a daemon's
    /// state directory has one): each file is copied there once, and a
    /// seed's `files/` hard-links to that copy. Without it, every seed gets
    /// copies of its own.
    pub file_store: Option<std::path::PathBuf>,
    /// The descriptor (a socket) on which a thread of the process waits for
    /// the answer of a cooperative all-threads checkpoint: recorded as
    /// [`procfs::FdKind::CoopReply`], so each child's thread reads its
    /// stdin's first line there.
    pub coop_reply_fd: Option<i32>,
    /// A descriptor that cannot be recreated in children (an inotify
    /// instance, a netlink socket, a pipe shared with another process...)
    /// is recorded as dropped, closed in children with a note at each
    /// spawn, instead of failing the capture.
    pub drop_unsupported_fds: bool,
    /// Where a container parent's root filesystem is kept, once per
    /// content digest (a daemon's state directory has one). Without it,
    /// the seed keeps its own under `rootfs/`.
    pub rootfs_store: Option<std::path::PathBuf>,
    /// Freeze without keeping the process and the tracing thread on one
    /// CPU (slower: every stop and injected syscall is a cross-CPU wake;
    /// for comparing the two).
    pub freeze_unpinned: bool,
}

impl std::fmt::Debug for CaptureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureOptions")
            .field("durable", &self.durable)
            .field("hook", &self.hook.is_some())
            .field("on_clone", &self.on_clone.is_some())
            .field("file_store", &self.file_store)
            .field("coop_reply_fd", &self.coop_reply_fd)
            .field("drop_unsupported_fds", &self.drop_unsupported_fds)
            .field("rootfs_store", &self.rootfs_store)
            .field("freeze_unpinned", &self.freeze_unpinned)
            .finish()
    }
}

/// Capture process `pid` into an image directory `out`. Returns the descriptor written.
pub fn capture(pid: pid_t, out: &Path, opts: &CaptureOptions) -> Result<Descriptor, CaptureError> {
    let span = info_span!("capture", pid);
    let _g = span.enter();
    let t0 = Instant::now();
    precheck(pid)?;
    // A process in a container: its files are looked up in its own root.
    // A root the caller may not read is one it may not ptrace either: the
    // freeze then says so, naming what is missing.
    let in_container = match crate::container::is_container(pid) {
        Ok(c) => c,
        Err(crate::container::ContainerError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            false
        }
        Err(e) => return Err(gone_or(pid, e.into())),
    };

    // Find a `syscall` instruction in the parent's vDSO, and hash the vDSO,
    // before stopping anything.
    let pmaps = procfs::maps(pid)?;
    let vdso = crate::vdso::probe(pid, &pmaps)
        .map_err(|e| gone_or(pid, e.into()))?
        .ok_or(CaptureError::NoVdso(pid))?;
    let insn = vdso.start + vdso.syscall_offset.ok_or(CaptureError::NoVdso(pid))?;
    let vdso_hash = vdso.hash;

    let frozen = freeze(pid, insn, opts, &pmaps)?;
    let clone_pid = frozen.clone.pid();
    if let Some(f) = &opts.on_clone {
        f(clone_pid);
    }
    if let Some(h) = &opts.hook {
        h(CapturePoint::CloneStopped);
    }

    let root = in_container.then_some(pid);
    let result = read_clone(pid, frozen, insn, vdso_hash, out, root);
    // Whatever happened, the clone is dead now (its Tracee was dropped):
    // reap its zombie in the parent.
    let reap_pause_ns = reap_clone(pid, clone_pid, insn);
    let (mut desc, writer) = result?;
    if let Some(fd) = opts.coop_reply_fd {
        match desc.fds.iter_mut().find(|f| f.fd == fd) {
            Some(f) if f.kind == procfs::FdKind::Socket => f.kind = procfs::FdKind::CoopReply,
            Some(f) => {
                return Err(CaptureError::CoopReply {
                    pid,
                    fd,
                    why: format!("it is {:?} {}, not a socket", f.kind, f.path),
                })
            }
            None => {
                return Err(CaptureError::CoopReply {
                    pid,
                    fd,
                    why: "it is not open".into(),
                })
            }
        }
    }
    desc.stats.reap_pause_ns = reap_pause_ns;
    desc.stats.capture_ns = t0.elapsed().as_nanos() as u64;
    debug!(
        us = t0.elapsed().as_micros() as u64,
        "captured; writing image"
    );
    if in_container {
        // Its rootfs is kept whole (its mapped files are in it).
        let store = opts
            .rootfs_store
            .clone()
            .unwrap_or_else(|| out.join(image::ROOTFS_DIR));
        desc.container =
            Some(crate::container::capture(pid, &store).map_err(|e| gone_or(pid, e.into()))?);
    } else {
        keep_file_copies(out, &desc.files, opts.file_store.as_deref());
    }
    writer.finish(&mut desc, opts.durable)?;
    desc.stats.capture_ns = t0.elapsed().as_nanos() as u64;
    info!(
        vmas = desc.vmas.len(),
        pages_stored = desc.pages_stored,
        pause_us = desc.stats.pause_ns / 1000,
        capture_ms = desc.stats.capture_ns / 1_000_000,
        "captured"
    );
    Ok(desc)
}

/// Refuse what cannot be captured before touching the process.
fn precheck(pid: pid_t) -> Result<(), CaptureError> {
    let (state, _) = procfs::stat(pid)?;
    let st = procfs::status(pid)?;
    if (state == 'Z' || state == 'X') && st.threads <= 1 {
        return Err(CaptureError::Zombie(pid));
    }
    if state == 'Z' || state == 'X' {
        return Err(CaptureError::MainThreadExited {
            pid,
            threads: st.threads,
        });
    }
    Ok(())
}

/// A read of the parent failed: if the parent is gone, say so.
fn gone_or(pid: pid_t, e: CaptureError) -> CaptureError {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        CaptureError::Exited {
            pid,
            detail: "it no longer exists".into(),
        }
    } else {
        e
    }
}

/// What the pause produced.
struct Frozen {
    clone: Tracee,
    /// The threads besides the main one.
    others: Vec<ThreadState>,
    /// The main thread's `clear_child_tid` word held its tid.
    main_tid_word: bool,
    regs: libc::user_regs_struct,
    xstate: Vec<u8>,
    sigmask: u64,
    rseq: Option<Rseq>,
    robust_list: (u64, u64),
    clear_child_tid: u64,
    /// The parent's descriptors, offsets as they were while it was stopped.
    fds: Vec<procfs::FdEntry>,
    /// The kernel objects behind them, as they were while it was stopped.
    fd_objects: crate::kobj::FdObjects,
    /// The parent's stored shared memory as it was while stopped.
    shared: HashMap<u64, Vec<u8>>,
    pause_ns: u64,
}

/// Stop the parent, take its CPU state, inject the clone, let it go.
fn freeze(
    pid: pid_t,
    insn: u64,
    opts: &CaptureOptions,
    pmaps: &[MapsEntry],
) -> Result<Frozen, CaptureError> {
    let pt = |e| CaptureError::from_ptrace(pid, e);
    // Read before the pause (smaps walks the page tables).
    let dontfork = procfs::dontfork_ranges(pid);
    // Every stop and injected syscall below is a round trip between this
    // thread and the process's: on one CPU, not across two.
    let mut one = if opts.freeze_unpinned {
        None
    } else {
        OneCpu::for_process(pid)
    };
    let t = Instant::now();
    let mut parent = Tracee::seize(pid).map_err(pt)?;
    parent.interrupt().map_err(pt)?;
    // Pinned now if it was running (not before: see OneCpu).
    if let Some(o) = one.as_mut() {
        o.pin(pid);
    }
    if let Some(h) = &opts.hook {
        h(CapturePoint::ParentStopped);
    }
    let regs = parent.regs().map_err(pt)?;
    let mut others = Vec::new();
    let stopped = stop_other_threads(pid, &mut others, &mut |tid| {
        if let Some(o) = one.as_mut() {
            o.pin(tid)
        }
    });
    let frozen = while_stopped(parent, &mut others, pid, &regs, |p, others| {
        let r = stopped
            .and_then(|()| freeze_stopped(p, others, pid, insn, &regs, (pmaps, &dontfork), opts));
        // Each thread's own affinity is back before it runs again.
        if let Some(o) = one.as_mut() {
            o.release_threads();
        }
        r
    });
    drop(one);
    let pause_ns = t.elapsed().as_nanos() as u64;
    let mut frozen = frozen?;
    frozen.pause_ns = pause_ns;
    debug!(
        pause_us = pause_ns / 1000,
        clone = frozen.clone.pid(),
        threads = 1 + frozen.others.len(),
        "parent resumed"
    );
    Ok(frozen)
}

/// The thread ids of process `pid`.
fn task_ids(pid: pid_t) -> Result<Vec<pid_t>, CaptureError> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|source| {
        gone_or(
            pid,
            CaptureError::Procfs(ProcfsError::Read {
                path: dir.clone(),
                source,
            }),
        )
    })?;
    let mut tids: Vec<pid_t> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// One line of `/proc/TID/status` (`SigPnd`, `TracerPid`...), trimmed.
fn thread_status_field(tid: pid_t, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Has thread `tid` exited (gone, or a zombie about to be)?
fn thread_gone(tid: pid_t) -> bool {
    match procfs::stat(tid) {
        Ok((state, _)) => state == 'Z' || state == 'X',
        Err(_) => true,
    }
}

/// Stop every thread of `pid` but the main one (stopped already), into
/// `out` with its registers. Threads created meanwhile are found by
/// looking again until a look finds none new (a stopped thread creates
/// none, and a thread created by one being stopped is attached to us by
/// `PTRACE_O_TRACECLONE`); threads that exit meanwhile are left out.
/// Whatever happens, what is in `out` is stopped and the caller resumes it.
fn stop_other_threads(
    pid: pid_t,
    out: &mut Vec<(Tracee, libc::user_regs_struct)>,
    pin: &mut dyn FnMut(pid_t),
) -> Result<(), CaptureError> {
    // TracerPid names the tracing thread: this one.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let mut known = std::collections::HashSet::from([pid]);
    for _ in 0..10_000 {
        let new: Vec<pid_t> = task_ids(pid)?
            .into_iter()
            .filter(|t| !known.contains(t))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(new.len());
        for tid in new {
            known.insert(tid);
            match Tracee::seize(tid) {
                Ok(t) => batch.push((t, true)),
                Err(PtraceError::NoSuchProcess { .. }) => {}
                Err(_) if thread_gone(tid) => {}
                Err(PtraceError::NotPermitted { .. })
                    if thread_status_field(tid, "TracerPid").as_deref()
                        == Some(me.to_string().as_str()) =>
                {
                    // Created by a thread we stopped: attached to us already.
                    batch.push((Tracee::adopt(tid), false));
                }
                Err(e) => {
                    let tracer: pid_t = thread_status_field(tid, "TracerPid")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let why = if tracer > 0 {
                        let process = thread_status_field(tracer, "Tgid")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(tracer);
                        format!(
                            "it is traced by process {process} ({}), a debugger or another tracer; only one tracer may hold a thread",
                            procfs::comm(process).unwrap_or_default()
                        )
                    } else {
                        e.to_string()
                    };
                    return Err(CaptureError::Thread {
                        pid,
                        tid,
                        comm: procfs::comm(tid).unwrap_or_default(),
                        why,
                    });
                }
            }
        }
        let mut waiting = Vec::with_capacity(batch.len());
        for (t, seized) in batch {
            if seized {
                if let Err(e) = t.request_interrupt() {
                    if !thread_gone(t.pid()) {
                        return Err(CaptureError::from_ptrace(t.pid(), e));
                    }
                }
            }
            waiting.push(t);
        }
        // Seized or attached by a traced clone, each reports a
        // PTRACE_EVENT_STOP (or its exit).
        for mut t in waiting {
            let tid = t.pid();
            let stopped = t.wait_event_stop("stopping a thread");
            match stopped {
                Ok(()) => {
                    pin(tid);
                    let regs = t.regs().map_err(|e| CaptureError::from_ptrace(tid, e))?;
                    out.push((t, regs));
                }
                Err(PtraceError::Gone { .. }) => t.forget(),
                Err(e) => {
                    return Err(CaptureError::Thread {
                        pid,
                        tid,
                        comm: procfs::comm(tid).unwrap_or_default(),
                        why: e.to_string(),
                    })
                }
            }
        }
    }
    Err(CaptureError::Thread {
        pid,
        tid: pid,
        comm: procfs::comm(pid).unwrap_or_default(),
        why: "its threads kept creating new threads faster than they could be stopped".into(),
    })
}

/// Run `stopped` on the stopped `parent` (whose registers were `regs`)
/// and its stopped `others` threads, then let them all run on, whatever
/// `stopped` returned: each thread's registers put back (an interrupted
/// syscall set to restart) and detached, the others first. From here on
/// their registers are ours to change, so this happens on every path; and
/// it happens here, before the caller reads anything from the clone: the
/// pause is only `stopped`. The error of `stopped` comes first, then that
/// of resuming (dropping what `stopped` made: the clone is killed).
fn while_stopped<T: Tracer, R>(
    mut parent: T,
    others: &mut Vec<(T, libc::user_regs_struct)>,
    pid: pid_t,
    regs: &libc::user_regs_struct,
    stopped: impl FnOnce(&mut T, &mut [(T, libc::user_regs_struct)]) -> Result<R, CaptureError>,
) -> Result<R, CaptureError> {
    let inner = stopped(&mut parent, others);
    let mut others_resumed = Ok(());
    for (t, r) in others.drain(..) {
        let res = t.set_regs(&resume_regs(&r)).and_then(|()| t.detach());
        if others_resumed.is_ok() {
            others_resumed = res;
        }
    }
    let resume = resume_regs(regs);
    let restored = parent.set_regs(&resume).and_then(|()| parent.detach());
    let out = inner?;
    restored.map_err(|e| CaptureError::from_ptrace(pid, e))?;
    others_resumed.map_err(|e| CaptureError::from_ptrace(pid, e))?;
    Ok(out)
}

/// A stopped thread's rseq registration (none if it has none, or if the
/// kernel cannot say: a warning then).
fn rseq_of(t: &Tracee) -> Option<Rseq> {
    match t.rseq_config() {
        Ok(c) if c.rseq_abi_pointer != 0 => Some(Rseq {
            ptr: c.rseq_abi_pointer,
            len: c.rseq_abi_size,
            signature: c.signature,
            flags: c.flags,
        }),
        Ok(_) => None,
        Err(e) => {
            warn!(tid = t.pid(), error = %e, "rseq configuration unavailable; recording none");
            None
        }
    }
}

/// Does the word at `ctid` (a thread's `clear_child_tid`) hold `tid`, as
/// glibc's thread descriptor does?
fn holds_tid(t: &Tracee, ctid: u64, tid: pid_t) -> bool {
    ctid != 0
        && t.peek(ctid)
            .map(|w| w as u32 == procfs::own_namespace_pid(tid) as u32)
            .unwrap_or(false)
}

/// Everything of one stopped thread besides the main one (`regs` are its
/// registers): what is per thread and not inherited by a fork child. Its
/// alternate signal stack and `clear_child_tid` are asked inside the
/// thread, borrowing three words at its stack pointer (put back).
fn thread_state(
    pid: pid_t,
    t: &mut Tracee,
    regs: &libc::user_regs_struct,
    insn: u64,
) -> Result<ThreadState, CaptureError> {
    let tid = t.pid();
    let comm = procfs::comm(tid).unwrap_or_default();
    let refuse = |what: &str, e: &dyn std::fmt::Display| CaptureError::Thread {
        pid,
        tid,
        comm: comm.clone(),
        why: format!("{what}: {e}"),
    };
    let xstate = t
        .xstate()
        .map_err(|e| refuse("reading its XSAVE area", &e))?;
    let sigmask = t
        .sigmask()
        .map_err(|e| refuse("reading its signal mask", &e))?;
    let rseq = rseq_of(t);
    let robust_list =
        kproc::robust_list(tid).map_err(|e| refuse("reading its robust futex list", &e))?;
    let pending = thread_status_field(tid, "SigPnd")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0);
    let scratch = regs.rsp & !7;
    let mut saved = [0u64; 3];
    for (i, w) in saved.iter_mut().enumerate() {
        *w = t
            .peek(scratch + 8 * i as u64)
            .map_err(|e| refuse("reading its stack", &e))?;
    }
    let asked = (|| -> Result<(SigAltStack, u64), String> {
        let r = t
            .inject_syscall(insn, regs, libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])
            .map_err(|e| e.to_string())?;
        r.result()
            .map_err(|e| format!("sigaltstack() in the thread: {e}"))?;
        let w: Vec<u64> = (0..3)
            .map(|i| t.peek(scratch + 8 * i))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let ss = SigAltStack {
            sp: w[0],
            flags: w[1] as u32,
            size: w[2],
        };
        let r = t
            .inject_syscall(
                insn,
                regs,
                libc::SYS_prctl,
                [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0],
            )
            .map_err(|e| e.to_string())?;
        let ctid = match r.result() {
            Ok(_) => t.peek(scratch).map_err(|e| e.to_string())?,
            Err(_) => 0,
        };
        Ok((ss, ctid))
    })();
    for (i, w) in saved.iter().enumerate() {
        t.poke(scratch + 8 * i as u64, *w)
            .map_err(|e| refuse("putting its stack back", &e))?;
    }
    let (sigaltstack, clear_child_tid) = asked.map_err(|e| refuse("asking its state", &e))?;
    Ok(ThreadState {
        tid: procfs::own_namespace_pid(tid),
        registers: Registers::from(regs),
        xstate,
        sigmask,
        pending,
        sigaltstack,
        rseq,
        robust_list,
        clear_child_tid,
        tid_word: holds_tid(t, clear_child_tid, tid),
        comm,
    })
}

fn freeze_stopped(
    parent: &mut Tracee,
    others: &mut [(Tracee, libc::user_regs_struct)],
    pid: pid_t,
    insn: u64,
    regs: &libc::user_regs_struct,
    (pmaps, dontfork): (&[MapsEntry], &[(u64, u64)]),
    opts: &CaptureOptions,
) -> Result<Frozen, CaptureError> {
    let pt = |e| CaptureError::from_ptrace(pid, e);
    // Each other thread's own state, before the clone is made: its stack
    // words borrowed here are back in place when the clone copies them.
    let mut threads = Vec::with_capacity(others.len());
    for (t, r) in others.iter_mut() {
        threads.push(thread_state(pid, t, r, insn)?);
    }
    let xstate = parent.xstate().map_err(pt)?;
    let sigmask = parent.sigmask().map_err(pt)?;
    let rseq = rseq_of(parent);
    let robust_list = kproc::robust_list(pid)?;

    // The clone: flags 0 means a plain fork whose exit signal is 0.
    // Mappings the process marked MADV_DONTFORK (V8's heap and code) are
    // part of it all the same: the mark is lifted for the clone and put
    // back at once.
    let lifted = set_dontfork(parent, insn, regs, dontfork, libc::MADV_DOFORK);
    let r = parent.inject_syscall(insn, regs, libc::SYS_clone, [0; 6]);
    let back = set_dontfork(parent, insn, regs, &lifted, libc::MADV_DONTFORK);
    if back.len() != lifted.len() {
        warn!(
            pid,
            lifted = lifted.len(),
            put_back = back.len(),
            "MADV_DONTFORK could not be put back on every mapping"
        );
    }
    let r = r.map_err(pt)?;
    let child = match (r.result(), r.new_child) {
        (Ok(_), Some(c)) => c,
        (Ok(c), None) => c as pid_t,
        (Err(source), _) => {
            return Err(CaptureError::Injected {
                pid,
                what: "clone()",
                source,
            })
        }
    };
    let mut clone = Tracee::adopt(child);
    clone.kill_on_drop();
    wait_initial_stop(child).map_err(|e| CaptureError::from_ptrace(child, e))?;
    clone
        .set_exit_kill()
        .map_err(|e| CaptureError::from_ptrace(child, e))?;

    // clear_child_tid is not inherited by a fork child: ask the parent,
    // borrowing the word at its stack pointer (saved and put back).
    let scratch = regs.rsp & !7;
    let saved = parent.peek(scratch).map_err(pt)?;
    let r = parent
        .inject_syscall(
            insn,
            regs,
            libc::SYS_prctl,
            [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0],
        )
        .map_err(pt)?;
    let clear_child_tid = match r.result() {
        Ok(_) => parent.peek(scratch).map_err(pt)?,
        Err(e) => {
            warn!(error = %e, "PR_GET_TID_ADDRESS failed; recording clear_child_tid 0");
            0
        }
    };
    parent.poke(scratch, saved).map_err(pt)?;
    let main_tid_word = holds_tid(parent, clear_child_tid, pid);

    // What the parent changes once it runs again and the clone would then
    // show: file offsets (the clone shares the parent's open files) and
    // the contents of shared memory. Taken now, at the frozen instant.
    let fds = procfs::fds(pid)?;
    let (fd_objects, fd_notes) = crate::kobj::capture(
        pid,
        &fds,
        &crate::kobj::FdPolicy {
            drop_unsupported: opts.drop_unsupported_fds,
            skip: opts.coop_reply_fd,
        },
    )?;
    for n in &fd_notes {
        warn!(pid, note = %n, "a descriptor children will not have as the parent does");
    }
    let shared = snapshot_shared(pid, pmaps)?;

    Ok(Frozen {
        clone,
        others: threads,
        main_tid_word,
        regs: *regs,
        xstate,
        sigmask,
        rseq,
        robust_list,
        clear_child_tid,
        fds,
        fd_objects,
        shared,
        pause_ns: 0,
    })
}

/// `madvise(advice)` on each range, injected into the stopped parent: the
/// ranges it succeeded on (a range unmapped since it was listed fails).
fn set_dontfork(
    parent: &mut Tracee,
    insn: u64,
    regs: &libc::user_regs_struct,
    ranges: &[(u64, u64)],
    advice: i32,
) -> Vec<(u64, u64)> {
    let mut done = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges {
        match parent.inject_syscall(
            insn,
            regs,
            libc::SYS_madvise,
            [start, end - start, advice as u64, 0, 0, 0],
        ) {
            Ok(r) if r.result().is_ok() => done.push((start, end)),
            Ok(r) => debug!(start, end, advice, result = ?r.result(), "madvise failed"),
            Err(e) => warn!(start, end, advice, error = %e, "madvise could not be injected"),
        }
    }
    done
}

/// Is `m` shared memory whose contents capture stores (anonymous shared
/// memory, `/dev/shm`, SysV, memfd, deleted files), not a file mapping
/// whose pages come from the file?
fn stores_shared(m: &MapsEntry) -> bool {
    m.shared && (m.path.is_empty() || m.path.starts_with("/dev/zero") || memory_only(m))
}

/// Does `m` map contents that exist only in memory (a deleted file, a
/// memfd, a SysV segment, `/dev/shm`), so capture must store them?
fn memory_only(m: &MapsEntry) -> bool {
    let p = m.path.as_str();
    p.ends_with(" (deleted)")
        || p.starts_with("/memfd:")
        || p.starts_with("/SYSV")
        || p.starts_with("/dev/shm/")
        || m.inode == 0
}

/// The present pages of the parent's stored shared memory (`pmaps`, taken
/// just before the freeze), by address: read while the parent is stopped,
/// since the clone shares these pages with the parent as it runs on.
fn snapshot_shared(pid: pid_t, pmaps: &[MapsEntry]) -> Result<HashMap<u64, Vec<u8>>, CaptureError> {
    let mut snap = HashMap::new();
    let shared: Vec<&MapsEntry> = pmaps.iter().filter(|m| stores_shared(m)).collect();
    if shared.is_empty() {
        return Ok(snap);
    }
    let pagemap = Pagemap::open(pid)?;
    let proc_mem = ProcMem::open(pid)?;
    for m in shared {
        let entries = pagemap.entries(m.start, m.end)?;
        for (i, e) in entries.iter().enumerate() {
            if e & (kernel_helpers::pagemap::PM_PRESENT | kernel_helpers::pagemap::PM_SWAPPED) == 0
            {
                continue;
            }
            let addr = m.start + i as u64 * PAGE_SIZE;
            let mut page = vec![0u8; PAGE_SIZE as usize];
            proc_mem.read_exact_at(addr, &mut page)?;
            snap.insert(addr, page);
        }
    }
    Ok(snap)
}

/// The clone starts in a `PTRACE_EVENT_STOP`; anything else is an error (it
/// must never run).
fn wait_initial_stop(child: pid_t) -> Result<(), PtraceError> {
    match ptrace::wait(child).map_err(|source| PtraceError::Request {
        request: "waitpid",
        pid: child,
        source,
    })? {
        Stop::Event { event, .. } if event == libc::PTRACE_EVENT_STOP => Ok(()),
        Stop::Signal(libc::SIGSTOP) => Ok(()),
        s @ (Stop::Exited(_) | Stop::Killed(_)) => Err(PtraceError::Gone {
            pid: child,
            how: format!("{s:?}"),
        }),
        s => Err(PtraceError::UnexpectedStop {
            pid: child,
            during: "waiting for the clone",
            status: s.raw(),
        }),
    }
}

/// The registers the parent resumes with: its own, with an interrupted
/// syscall set up to restart as the kernel would have done.
fn resume_regs(regs: &libc::user_regs_struct) -> libc::user_regs_struct {
    let r = Registers::from(regs).restarted();
    let mut out = *regs;
    out.rax = r.rax;
    out.rip = r.rip;
    out
}

/// Reap the dead clone's zombie inside the parent with an injected `wait4`.
/// Reap, in `parent`, the zombie of a clone a capture made and could not
/// reap (the capturing process died midway: the clone, killed with its
/// tracer, stays a zombie of the parent, which never waits for it).
/// Nothing happens if `clone` is not a zombie child of `parent`.
pub fn reap_leftover_clone(parent: pid_t, clone: pid_t) -> Result<(), CaptureError> {
    let (state, _) = match procfs::stat(clone) {
        Ok(s) => s,
        Err(_) => return Ok(()), // gone already
    };
    let ppid = procfs::status(clone).map(|s| s.ppid).unwrap_or(0);
    if state != 'Z' || ppid != parent {
        return Ok(());
    }
    let pmaps = procfs::maps(parent)?;
    let vdso = crate::vdso::probe(parent, &pmaps)
        .map_err(|e| gone_or(parent, e.into()))?
        .ok_or(CaptureError::NoVdso(parent))?;
    let insn = vdso.start + vdso.syscall_offset.ok_or(CaptureError::NoVdso(parent))?;
    reap_clone(parent, clone, insn);
    Ok(())
}

fn reap_clone(pid: pid_t, clone_pid: pid_t, insn: u64) -> u64 {
    let t = Instant::now();
    let clone_pid = procfs::own_namespace_pid(clone_pid);
    let run = || -> Result<(), PtraceError> {
        let mut one = OneCpu::for_process(pid);
        let mut p = Tracee::seize(pid)?;
        p.interrupt()?;
        if let Some(o) = one.as_mut() {
            o.pin(pid);
        }
        let regs = p.regs()?;
        let r = p.inject_syscall(
            insn,
            &regs,
            libc::SYS_wait4,
            [
                clone_pid as u64,
                0,
                (libc::WNOHANG | libc::__WALL) as u64,
                0,
                0,
                0,
            ],
        );
        if let Some(o) = one.as_mut() {
            o.release_threads();
        }
        p.set_regs(&resume_regs(&regs))?;
        p.detach()?;
        match r?.result() {
            Ok(got) if got == clone_pid as u64 => {}
            other => warn!(
                clone_pid,
                ?other,
                "the clone's zombie was not reaped in the parent"
            ),
        }
        Ok(())
    };
    match run() {
        Ok(()) => {}
        Err(PtraceError::NoSuchProcess { .. } | PtraceError::Gone { .. }) => {
            debug!("parent gone; its children were reparented and the clone's zombie with them")
        }
        Err(e) => warn!(error = %e, "could not reap the clone in the parent"),
    }
    t.elapsed().as_nanos() as u64
}

/// One mapping being captured.
struct Planned {
    entry: MapsEntry,
    kind: VmaKind,
    file: Option<u32>,
    classes: Vec<PageClass>,
    /// Read its pages through /proc/PID/mem (no PROT_READ).
    via_proc_mem: bool,
}

/// Read everything but the CPU state from the frozen clone.
fn read_clone(
    parent_pid: pid_t,
    frozen: Frozen,
    insn: u64,
    vdso_hash: String,
    out: &Path,
    root: Option<pid_t>,
) -> Result<(Descriptor, ImageWriter), CaptureError> {
    let t = Instant::now();
    let frozen_fds = frozen.fds;
    let shared_snapshot = frozen.shared;
    let mut clone = frozen.clone;
    let cpid = clone.pid();
    let maps = procfs::maps(cpid)?;
    let pagemap = Pagemap::open(cpid)?;
    // Shared memory pages are not in a fork child's page tables until it
    // touches them: ask the parent's pagemap which of them exist.
    let parent_pagemap = Pagemap::open(parent_pid).ok();
    // A lazily served process (a restored child) may not have every page
    // yet: in its registered mappings an absent page is not a zero page, so
    // every page is read (through its pager) and stored.
    let lazy_maps = procfs::uffd_missing(cpid)?;

    let mut files: Vec<FileRef> = Vec::new();
    let mut file_index: HashMap<String, Option<u32>> = HashMap::new();
    let mut planned = Vec::with_capacity(maps.len());
    let mut stats = CaptureStats::default();
    for m in maps {
        if m.path == "[vsyscall]" {
            continue; // fixed by the kernel in every process
        }
        let (kind, file, store_all) = kind_of(parent_pid, &m, &mut files, &mut file_index, root)?;
        let store_all = store_all || lazy_maps.contains(&m.start);
        let pages = ((m.end - m.start) / PAGE_SIZE) as usize;
        let classes = if kind.is_kernel_provided() {
            Vec::new()
        } else if kind == VmaKind::FileShared {
            vec![PageClass::FromFile; pages]
        } else {
            let entries = match (kind, &parent_pagemap) {
                (VmaKind::Shmem, Some(pp)) => pp
                    .entries(m.start, m.end)
                    .or_else(|_| pagemap.entries(m.start, m.end))?,
                _ => pagemap.entries(m.start, m.end)?,
            };
            entries
                .iter()
                .map(|&e| {
                    if e & kernel_helpers::pagemap::PM_PRESENT != 0 {
                        stats.pages_present += 1;
                    }
                    if e & kernel_helpers::pagemap::PM_SWAPPED != 0 {
                        stats.pages_swapped += 1;
                    }
                    classify_page(kind, e, store_all)
                })
                .collect()
        };
        let via_proc_mem = m.prot & libc::PROT_READ as u32 == 0;
        planned.push(Planned {
            entry: m,
            kind,
            file,
            classes,
            via_proc_mem,
        });
    }

    debug!(us = t.elapsed().as_micros() as u64, "classified pages");
    // Stream every page to store, in mapping order, through a small reused
    // buffer into the page store; all-zero pages are left out (they read as
    // zeros anyway) and only noted.
    let mut stream = PageStream::new(cpid, ImageWriter::create(out)?)?;
    for p in &planned {
        let frozen_shared = stores_shared(&p.entry);
        for (i, c) in p.classes.iter().enumerate() {
            if *c != PageClass::Store {
                continue;
            }
            let addr = p.entry.start + i as u64 * PAGE_SIZE;
            match shared_snapshot.get(&addr) {
                Some(page) => stream.push_bytes(page)?,
                None if frozen_shared && !shared_snapshot.is_empty() => {
                    // Mapped between the look before the freeze and the
                    // freeze itself: not in the snapshot.
                    warn!(addr, path = %p.entry.path, "a shared page not seen before the freeze is read after the parent resumed");
                    stream.push(addr, p.via_proc_mem)?;
                }
                None => stream.push(addr, p.via_proc_mem)?,
            }
        }
    }
    let (writer, zero) = stream.finish()?;
    stats.pages_zero = zero.iter().filter(|z| **z).count() as u64;
    debug!(us = t.elapsed().as_micros() as u64, "read and wrote pages");

    let mut next_offset = 0u64;
    let mut zero_base = 0usize;
    let mut vmas = Vec::with_capacity(planned.len());
    for p in planned {
        let n_store = p.classes.iter().filter(|c| **c == PageClass::Store).count();
        let runs = build_runs(&p.classes, |i| zero[zero_base + i], &mut next_offset);
        zero_base += n_store;
        stats.pages_from_file += p
            .classes
            .iter()
            .filter(|c| **c == PageClass::FromFile)
            .count() as u64;
        vmas.push(Vma {
            start: p.entry.start,
            end: p.entry.end,
            prot: p.entry.prot,
            shared: p.entry.shared,
            kind: p.kind,
            path: p.entry.path,
            file: p.file,
            file_offset: p.entry.offset,
            runs,
        });
    }
    let pages_stored = next_offset / PAGE_SIZE;

    debug!(us = t.elapsed().as_micros() as u64, "built runs");
    // Process state the clone inherited from the parent.
    let base = clone
        .regs()
        .map_err(|e| CaptureError::from_ptrace(cpid, e))?;
    let ptc = |e| CaptureError::from_ptrace(cpid, e);
    let scratch = inject_ok(
        &mut clone,
        insn,
        &base,
        libc::SYS_mmap,
        [
            0,
            PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
        "mmap(scratch)",
    )?;
    let mut sigactions = Vec::with_capacity(64);
    for sig in 1..=64u64 {
        match clone
            .inject_syscall(
                insn,
                &base,
                libc::SYS_rt_sigaction,
                [sig, 0, scratch, 8, 0, 0],
            )
            .map_err(ptc)?
            .result()
        {
            Ok(_) => {
                let w: Vec<u64> = (0..4)
                    .map(|i| clone.peek(scratch + i * 8))
                    .collect::<Result<_, _>>()
                    .map_err(ptc)?;
                sigactions.push(SigAction {
                    signo: sig as u32,
                    handler: w[0],
                    flags: w[1],
                    restorer: w[2],
                    mask: w[3],
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(CaptureError::Injected {
                    pid: parent_pid,
                    what: "rt_sigaction()",
                    source,
                })
            }
        }
    }
    inject_ok(
        &mut clone,
        insn,
        &base,
        libc::SYS_sigaltstack,
        [0, scratch, 0, 0, 0, 0],
        "sigaltstack()",
    )?;
    let ss = [
        clone.peek(scratch).map_err(ptc)?,
        clone.peek(scratch + 8).map_err(ptc)?,
        clone.peek(scratch + 16).map_err(ptc)?,
    ];
    let sigaltstack = SigAltStack {
        sp: ss[0],
        flags: ss[1] as u32,
        size: ss[2],
    };
    let brk = inject_ok(&mut clone, insn, &base, libc::SYS_brk, [0; 6], "brk(0)")?;
    let securebits = inject_ok(
        &mut clone,
        insn,
        &base,
        libc::SYS_prctl,
        [libc::PR_GET_SECUREBITS as u64, 0, 0, 0, 0, 0],
        "prctl(PR_GET_SECUREBITS)",
    )? as u32;
    let dumpable = inject_ok(
        &mut clone,
        insn,
        &base,
        libc::SYS_prctl,
        [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
        "prctl(PR_GET_DUMPABLE)",
    )? as u32;
    // The files behind its descriptors (the clone shares them).
    let open_files: Vec<(i32, u64, u64)> = frozen_fds
        .iter()
        .filter(|f| matches!(f.kind, procfs::FdKind::Regular | procfs::FdKind::Directory))
        .filter_map(|f| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/{cpid}/fd/{}", f.fd))
                .ok()
                .map(|m| (f.fd, m.dev(), m.ino()))
        })
        .collect();
    // The clone inherited the parent's filters (fork keeps them).
    let seccomp_filters = clone
        .seccomp_filters()
        .map_err(ptc)?
        .into_iter()
        .map(|(insns, flags)| SeccompFilter { insns, flags })
        .collect();

    debug!(
        us = t.elapsed().as_micros() as u64,
        "injected state queries"
    );
    let (_, mut mm) = procfs::stat(cpid)?;
    mm.brk = brk;
    let status = procfs::status(cpid)?;
    let rlimits = (0..RLIMIT_COUNT)
        .map(|r| kproc::rlimit(cpid, r))
        .collect::<Result<Vec<_>, _>>()?;
    let desc = Descriptor {
        format_version: FORMAT_VERSION,
        source: SourceInfo {
            pid: parent_pid,
            hostname: procfs::sysctl("kernel/hostname"),
            kernel: procfs::sysctl("kernel/osrelease"),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        },
        threads: 1 + frozen.others.len() as u32,
        registers: Registers::from(&frozen.regs),
        xstate: frozen.xstate,
        sigmask: frozen.sigmask,
        sigactions,
        sigaltstack,
        rseq: frozen.rseq,
        robust_list: frozen.robust_list,
        clear_child_tid: frozen.clear_child_tid,
        mm,
        auxv: procfs::auxv(cpid)?,
        exe: procfs::link(cpid, "exe")?,
        personality: procfs::personality(cpid)?,
        comm: procfs::comm(cpid)?,
        rlimits,
        umask: status.umask,
        cwd: procfs::link(cpid, "cwd")?,
        creds: Credentials {
            uid: status.uid,
            gid: status.gid,
            groups: status.groups,
        },
        fds: frozen_fds,
        files,
        vmas,
        vdso_hash,
        pages_stored,
        image_bytes: pages_stored * PAGE_SIZE,
        stats: CaptureStats {
            pause_ns: frozen.pause_ns,
            ..stats
        },
        // Filled in by ImageWriter::finish from the pages written.
        digests: None,
        privileges: Some(Privileges {
            caps: status.caps,
            securebits,
            no_new_privs: status.no_new_privs,
            seccomp_mode: status.seccomp,
            seccomp_filters,
            dumpable,
            open_files,
        }),
        thread_set: ThreadSet {
            main_tid_word: frozen.main_tid_word,
            main_tid: procfs::own_namespace_pid(parent_pid),
            others: frozen.others,
        },
        fd_objects: frozen.fd_objects,
        container: None,
    };
    // Kill the clone now (Drop of `clone`), before the caller reaps it.
    clone.kill().map_err(ptc)?;
    Ok((desc, writer))
}

/// Keep a copy of every mapped file in the image, so children can still be
/// started when a node's copy is missing or changed (a package upgrade, a
/// rebuilt library). Real copies (a reflink where the filesystem has them),
/// read-only: never a hard link to the live file, which a `chmod` of the
/// state directory would change and an in-place rewrite would corrupt.
/// With a `store` (shared by a daemon's seeds) each file is copied there
/// once and the seed's `files/` links to the store's copy. Copies are named
/// by identity, so each is kept once.
fn keep_file_copies(out: &Path, files: &[FileRef], store: Option<&Path>) {
    let dir = out.join(image::FILES_DIR);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        warn!(error = %e, "cannot keep copies of mapped files; children will need the node's own files");
        return;
    }
    for f in files {
        let key = fileid::store_key(f);
        let dest = dir.join(&key);
        if dest.exists() {
            continue;
        }
        let kept = match store {
            Some(store) => {
                let shared = store.join(&key);
                std::fs::create_dir_all(store)
                    .and_then(|()| match shared.exists() {
                        true => Ok(()),
                        false => fileid::copy_readonly(Path::new(&f.path), &shared),
                    })
                    .and_then(|()| std::fs::hard_link(&shared, &dest))
            }
            None => fileid::copy_readonly(Path::new(&f.path), &dest),
        };
        if let Err(e) = kept {
            warn!(file = %f.path, error = %e, "cannot keep a copy of a mapped file");
        }
    }
}

/// Remove kept copies in a daemon's `store` that no seed links to any more
/// (link count 1: only the store's own name). Returns how many were removed.
pub fn prune_file_store(store: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut removed = 0;
    for e in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let unused = e.metadata().is_ok_and(|m| m.is_file() && m.nlink() == 1);
        if unused && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Streams the pages to store from the clone into the page store, through
/// one reused buffer of [`CHUNK_PAGES`] pages; all-zero pages are noted and
/// left out.
struct PageStream {
    cpid: pid_t,
    proc_mem: ProcMem,
    chunk: Mapping,
    pending: Vec<(u64, bool)>,
    zero: Vec<bool>,
    writer: ImageWriter,
}

impl PageStream {
    fn new(cpid: pid_t, writer: ImageWriter) -> Result<PageStream, CaptureError> {
        // Prefaulted and reused, so filling it takes no page faults.
        let chunk =
            Mapping::anonymous(CHUNK_PAGES * PAGE_SIZE as usize, true).map_err(|source| {
                CaptureError::Mem(MemError::Read {
                    pid: cpid,
                    addr: 0,
                    len: 0,
                    source,
                })
            })?;
        Ok(PageStream {
            cpid,
            proc_mem: ProcMem::open(cpid)?,
            chunk,
            pending: Vec::with_capacity(CHUNK_PAGES),
            zero: Vec::new(),
            writer,
        })
    }

    /// Queue the page at `addr` (read through /proc/PID/mem if `via_proc_mem`).
    fn push(&mut self, addr: u64, via_proc_mem: bool) -> Result<(), CaptureError> {
        self.pending.push((addr, via_proc_mem));
        if self.pending.len() == CHUNK_PAGES {
            self.flush()?;
        }
        Ok(())
    }

    /// Queue a page whose bytes are already here (taken while the parent
    /// was stopped), after the pages queued before it.
    fn push_bytes(&mut self, page: &[u8]) -> Result<(), CaptureError> {
        self.flush()?;
        let z = is_zero_page(page);
        self.zero.push(z);
        if !z {
            self.writer.append(page)?;
        }
        Ok(())
    }

    /// Write what is left; return the writer and which pages were zero.
    fn finish(mut self) -> Result<(ImageWriter, Vec<bool>), CaptureError> {
        self.flush()?;
        Ok((self.writer, self.zero))
    }

    /// Read the pending pages, append the non-zero ones to the image.
    fn flush(&mut self) -> Result<(), CaptureError> {
        flush_chunk(
            self.cpid,
            &self.proc_mem,
            &mut self.pending,
            self.chunk.as_mut_slice(),
            &mut self.zero,
            &mut self.writer,
        )
    }
}

/// Read the `pending` pages of the clone into `buf`, append the non-zero
/// ones to the image, note which were zero, and empty `pending`.
fn flush_chunk(
    cpid: pid_t,
    proc_mem: &ProcMem,
    pending: &mut Vec<(u64, bool)>,
    buf: &mut [u8],
    zero: &mut Vec<bool>,
    writer: &mut ImageWriter,
) -> Result<(), CaptureError> {
    let ps = PAGE_SIZE as usize;
    let mut ranges: Vec<RemoteRange> = Vec::new();
    let mut at = 0usize;
    for &(addr, via_proc_mem) in pending.iter() {
        if via_proc_mem {
            proc_mem.read_exact_at(addr, &mut buf[at..at + ps])?;
        } else {
            match ranges.last_mut() {
                Some(r) if r.addr + r.len as u64 == addr => r.len += ps,
                _ => ranges.push(RemoteRange { addr, len: ps }),
            }
        }
        at += ps;
    }
    // Pages read through /proc/PID/mem were put in place already; gather the
    // process_vm_readv ones into a dense buffer and scatter them back.
    if !ranges.is_empty() {
        let n: usize = ranges.iter().map(|r| r.len).sum();
        if n == at {
            mem::read_ranges(cpid, &ranges, &mut buf[..n])?;
        } else {
            let mut tmp = vec![0u8; n];
            mem::read_ranges(cpid, &ranges, &mut tmp)?;
            let mut src = 0usize;
            for (i, &(_, via_proc_mem)) in pending.iter().enumerate() {
                if !via_proc_mem {
                    buf[i * ps..(i + 1) * ps].copy_from_slice(&tmp[src..src + ps]);
                    src += ps;
                }
            }
        }
    }
    // Compact: non-zero pages move to the front, then one write.
    let mut w = 0usize;
    for i in 0..pending.len() {
        let z = is_zero_page(&buf[i * ps..(i + 1) * ps]);
        zero.push(z);
        if !z {
            if w != i {
                buf.copy_within(i * ps..(i + 1) * ps, w * ps);
            }
            w += 1;
        }
    }
    writer.append(&buf[..w * ps])?;
    pending.clear();
    Ok(())
}

fn inject_ok(
    t: &mut Tracee,
    insn: u64,
    base: &libc::user_regs_struct,
    nr: i64,
    args: [u64; 6],
    what: &'static str,
) -> Result<u64, CaptureError> {
    let pid = t.pid();
    t.inject_syscall(insn, base, nr, args)
        .map_err(|e| CaptureError::from_ptrace(pid, e))?
        .result()
        .map_err(|source| CaptureError::Injected { pid, what, source })
}

/// Decide what a mapping is, identifying its file if it has one.
/// Returns (kind, file index, store every page).
fn kind_of(
    pid: pid_t,
    m: &MapsEntry,
    files: &mut Vec<FileRef>,
    index: &mut HashMap<String, Option<u32>>,
    root: Option<pid_t>,
) -> Result<(VmaKind, Option<u32>, bool), CaptureError> {
    let anon_kind = if m.shared {
        VmaKind::Shmem
    } else {
        VmaKind::Anon
    };
    let p = m.path.as_str();
    let simple = match p {
        "[vdso]" => Some(VmaKind::Vdso),
        "[vvar]" => Some(VmaKind::Vvar),
        "[vvar_vclock]" => Some(VmaKind::VvarVclock),
        "[heap]" => Some(VmaKind::Heap),
        "[stack]" => Some(VmaKind::Stack),
        "" => Some(anon_kind),
        _ if p.starts_with('[') => Some(anon_kind),
        _ => None,
    };
    if let Some(k) = simple {
        return Ok((k, None, false));
    }
    if p.starts_with("/dev/zero") {
        return Ok((anon_kind, None, false));
    }
    // Contents that exist only in this process's memory: store them.
    if memory_only(m) {
        return Ok((anon_kind, None, !m.shared));
    }
    if p.starts_with("/dev/") {
        return Err(CaptureError::Unsupported {
            pid,
            start: m.start,
            end: m.end,
            path: m.path.clone(),
        });
    }
    let idx = match index.get(p) {
        Some(i) => *i,
        None => {
            let at = match root {
                Some(pid) => std::path::PathBuf::from(crate::container::in_root(pid, p)),
                None => std::path::PathBuf::from(p),
            };
            let i = match fileid::identify_at(p, &at) {
                Ok(r) => {
                    files.push(r);
                    Some((files.len() - 1) as u32)
                }
                Err(e) => {
                    warn!(error = %e, "cannot identify a mapped file; its pages will be stored");
                    None
                }
            };
            index.insert(p.to_string(), i);
            i
        }
    };
    match idx {
        Some(i) => Ok((
            if m.shared {
                VmaKind::FileShared
            } else {
                VmaKind::FilePrivate
            },
            Some(i),
            false,
        )),
        None => Ok((anon_kind, None, !m.shared)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::recorder::{Call, Recorder};

    /// A parent stopped in `read`, which the kernel reported as -ERESTARTSYS.
    fn stopped_in_read() -> libc::user_regs_struct {
        // SAFETY: user_regs_struct is plain integers; all zeros is valid.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        r.orig_rax = 0;
        r.rax = (-512i64) as u64; // ERESTARTSYS
        r.rip = 0x401002;
        r
    }

    /// What the freeze does while the parent is stopped, as far as the
    /// tracer sees it: inject the clone.
    fn make_clone<T: Tracer>(p: &mut T) -> Result<&'static str, CaptureError> {
        p.inject_syscall(0x7fff_f000, &stopped_in_read(), libc::SYS_clone, [0; 6])
            .map_err(|e| CaptureError::from_ptrace(42, e))?;
        Ok("clone")
    }

    #[test]
    fn the_parent_runs_again_right_after_the_clone_is_made() {
        let t = Recorder::new();
        let log = t.log.clone();
        let r = while_stopped(t, &mut Vec::new(), 42, &stopped_in_read(), |p, _| {
            make_clone(p)
        });
        assert_eq!(r.unwrap(), "clone");
        // Its interrupted read restarts: rax is the syscall number again,
        // rip is back on the `syscall` instruction.
        assert_eq!(
            *log.borrow(),
            vec![
                Call::Syscall(libc::SYS_clone, [0; 6]),
                Call::SetRegs {
                    rip: 0x401000,
                    rax: 0
                },
                Call::Detach,
            ]
        );
    }

    #[test]
    fn a_failed_freeze_still_resumes_the_parent() {
        let t = Recorder::new();
        let log = t.log.clone();
        let r: Result<(), _> = while_stopped(t, &mut Vec::new(), 42, &stopped_in_read(), |_, _| {
            Err(CaptureError::Thread {
                pid: 42,
                tid: 43,
                comm: "w".into(),
                why: "no".into(),
            })
        });
        assert!(matches!(r, Err(CaptureError::Thread { tid: 43, .. })));
        assert_eq!(
            *log.borrow(),
            vec![
                Call::SetRegs {
                    rip: 0x401000,
                    rax: 0
                },
                Call::Detach,
            ]
        );
    }

    #[test]
    fn a_parent_whose_registers_cannot_be_put_back_fails_the_capture() {
        let mut t = Recorder::new();
        t.fail_at = Some(1); // the call after the clone: set_regs
        let log = t.log.clone();
        let e = while_stopped(t, &mut Vec::new(), 42, &stopped_in_read(), |p, _| {
            make_clone(p)
        })
        .unwrap_err();
        assert!(e.to_string().contains("SETREGS"), "{e}");
        // Not detached by a call: dropped (a seized parent is detached then).
        assert_eq!(
            *log.borrow(),
            vec![Call::Syscall(libc::SYS_clone, [0; 6]), Call::Dropped]
        );
    }
}
