//! Node templates: a seed restored once on this node into a process that
//! never runs, then forked for every child.
//!
//! Restoring from scratch costs a husk, a few hundred `mmap`s, the state
//! phase and (lazily) a userfaultfd per child. A template pays that once per
//! seed and mode; each child is then one `clone` injected into the template
//! (its memory shared copy-on-write, page tables copied as `fork()` copies
//! them) plus a short table of what `fork()` does not carry:
//!
//! - its stdio and, when lazy, its own userfaultfd, passed over a datagram
//!   socket that is the template's fd 0 (`SCM_RIGHTS`, received in the
//!   child by the executor, still mapped from the template);
//! - its own kernel objects whose state siblings must not share (pipes and
//!   socket pairs with their bytes, eventfds, timers, epoll sets); files
//!   and listening sockets it shares with the template and its siblings,
//!   one open file description each, as `fork()` children share their
//!   parent's;
//! - the robust list and parent-death signal, which `fork()` clears.
//!
//! Then the executor is unmapped and the registers, XSAVE state and signal
//! mask are set as for any child. The clone uses `CLONE_PARENT`, so a
//! child's parent is forkd, as a restored-from-scratch child's is, and
//! `CLONE_CHILD_CLEARTID` with the seed's `clear_child_tid`.
//!
//! A lazy template's userfaultfd reports each fork (`UFFD_EVENT_FORK`); the
//! pager hands the child's new userfaultfd, with a copy of the template's
//! page table, back here to be given the child's pid and served. With the
//! `recorded` prefetch the template gets the seed's working set installed
//! before its first fork, so every child starts with it present.
//!
//! One child per template is forked ahead, after a spawn has returned, and
//! held at its first stop: the next spawn then only finishes it. After a
//! spawn in a burst it is forked at once; after one that came alone, 10 ms
//! later (or at the next spawn), so the new child has the CPUs for its
//! start. A multi-threaded seed's spare has its threads made too.
//!
//! Templates are traced (hence forked) by one thread, the template service,
//! which lives as long as the process: a child's parent-death signal fires
//! when the thread that is its parent exits.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kernel_helpers::husk::Io;
use kernel_helpers::mem::{self, RemoteRange};
use kernel_helpers::proc;
use kernel_helpers::ptrace::{self, Stop, Tracee};

use crate::onecpu::OneCpu;
use kernel_helpers::{executor, uffd};
use tracing::{debug, info};

use super::plan::{self, ForkTable, FORK_STDIO};
use super::{errno_text, Core, RestoreError, SpawnOptions};
use crate::child::Started;
use crate::pager::{ChildStats, LazyChild, Prefetch};

/// Children kept forked ahead per template: a spawn then only finishes one
/// (its stdio, registers), and the fork for the next happens after the
/// caller has its child.
const SPARES: usize = 1;

/// A spawn that comes this long after the one before it comes alone: its
/// child gets the CPUs for its run, and the next spare is forked once that
/// child has ended or [`REFILL_AFTER`] later (or right after another
/// spawn, if one comes first). Spawns closer together are a burst, whose
/// next spare is forked at once, beside the child: that fork then
/// overlaps the child's run instead of delaying the next spawn.
const ALONE_GAP: Duration = Duration::from_millis(20);

/// The longest a lone spawn's child has the CPUs before the next spare is
/// forked, if it has not ended by then. A spare's fork beside a child
/// slows it: a Python heap walk's answer took 3.5 ms alone, 4.9-5.5 ms
/// beside one; its exit 1.02-1.21x the warm parent's alone, 1.15-1.65x
/// with the spare forked 10 ms after the spawn (docs/DECISIONS.md).
const REFILL_AFTER: Duration = Duration::from_millis(50);

/// How often the service thread looks whether a lone spawn's child has
/// ended, while a spare waits for it.
const REFILL_POLL: Duration = Duration::from_millis(2);

/// A template whose next spare waits for a lone spawn's child.
struct Pending {
    core: Weak<Core>,
    key: Key,
    /// That child's pidfd (readable once it has ended), if it could be had.
    child: Option<OwnedFd>,
    since: Instant,
}

impl Pending {
    /// Its child has ended, or it has waited long enough.
    fn due(&self) -> bool {
        self.since.elapsed() >= REFILL_AFTER || self.child.as_ref().is_none_or(ended)
    }
}

/// Has the process of `pidfd` ended (its pidfd readable)?
fn ended(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

std::thread_local! {
    /// Templates whose spares wait for a lone spawn's child (only the
    /// service thread has any).
    static PENDING: std::cell::RefCell<Vec<Pending>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// When the service thread's last spawn ended.
    static LAST_SPAWN: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// After a spawn from the template for `key` that began at `began` and
/// started the child of `child` (its pidfd): its next spare, forked now
/// if this spawn was part of a burst, else once the child has ended or
/// had the CPUs for [`REFILL_AFTER`]. On the service thread.
fn refill_after_spawn(core: &Arc<Core>, key: Key, began: Instant, child: Option<OwnedFd>) {
    let alone = LAST_SPAWN
        .get()
        .is_none_or(|last| began.saturating_duration_since(last) >= ALONE_GAP);
    LAST_SPAWN.set(Some(Instant::now()));
    if !alone {
        refill(core, key, false);
        return;
    }
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        match p
            .iter_mut()
            .find(|w| w.key == key && std::ptr::eq(w.core.as_ptr(), Arc::as_ptr(core)))
        {
            // Waits for the latest child now.
            Some(w) => w.child = child,
            None => p.push(Pending {
                core: Arc::downgrade(core),
                key,
                child,
                since: Instant::now(),
            }),
        }
    });
}

/// Fork the spares put off by [`refill_after_spawn`]: all of them
/// (`all`), or those that are due. On the service thread.
fn refill_pending(all: bool) {
    let due: Vec<Pending> = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let (due, wait) = std::mem::take(&mut *p)
            .into_iter()
            .partition(|w| all || w.due());
        *p = wait;
        due
    });
    for w in due {
        if let Some(core) = w.core.upgrade() {
            refill(&core, w.key, true);
        }
    }
}

fn refill_is_pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty())
}

/// A template unused this long is dropped (its memory freed), in ms.
static IDLE_MS: AtomicU64 = AtomicU64::new(600_000);

/// Drop node templates unused for `idle` (default 10 minutes): each holds
/// a copy of its seed's memory. The next spawn builds it again.
pub fn set_idle_timeout(idle: Duration) {
    IDLE_MS.store(idle.as_millis().max(1) as u64, Ordering::Relaxed);
}

fn idle_timeout() -> Duration {
    Duration::from_millis(IDLE_MS.load(Ordering::Relaxed))
}

/// Seeds that have templates, for the idle sweep.
static CORES: Mutex<Vec<Weak<Core>>> = Mutex::new(Vec::new());

/// Drop every template unused for longer than the idle timeout. Runs on
/// the service thread (the templates' tracer).
fn sweep() {
    let idle = idle_timeout();
    let mut cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
    cores.retain(|w| {
        let Some(core) = w.upgrade() else {
            return false;
        };
        let mut g = core.templates.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|key, t| {
            let keep = t.last_used.elapsed() < idle;
            if !keep {
                info!(pid = t.tracee.pid(), lazy = key.0, prefetch = ?key.1, "dropping an idle template");
            }
            keep
        });
        !g.is_empty()
    });
}

/// How long a fork waits for the pager to hand over the child's userfaultfd.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// A seed's templates on this node, by (lazy, prefetch).
pub(super) type Templates = HashMap<Key, Template>;

/// One template: a restored process, stopped and traced, never run.
pub(super) struct Template {
    tracee: Tracee,
    base_regs: libc::user_regs_struct,
    /// A `syscall` instruction in its vDSO.
    insn: u64,
    /// The executor area (address, length): the code and the fork table.
    area: (u64, u64),
    code: u64,
    fork: ForkTable,
    /// Our end of the socket that is the template's fd 0.
    sock: OwnedFd,
    /// Forked children's userfaultfds, from the pager (lazy templates).
    forks: Option<Receiver<LazyChild>>,
    /// It was built with the recorded working set installed.
    with_ws: bool,
    /// Where its executor area keeps the touch of the working set its
    /// spares read before their spawn (templates with the working set).
    touch: Option<Touch>,
    /// Children forked ahead, for the next spawns.
    spares: Vec<Forked>,
    /// Its last spawn (the idle sweep drops it after the idle timeout).
    last_used: Instant,
    notes: Vec<String>,
    pages_written: u64,
    /// A container seed's template: children are forked into namespaces
    /// of their own and each gets a cgroup.
    container: bool,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("pid", &self.tracee.pid())
            .field("lazy", &self.forks.is_some())
            .field("with_ws", &self.with_ws)
            .finish()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The template service thread's queue, while the thread runs.
static SERVICE: Mutex<Option<Sender<Job>>> = Mutex::new(None);

/// Wake the template service thread (a seed was dropped: the thread may
/// have nothing left to do, and ends then).
pub(super) fn nudge() {
    if let Some(s) = SERVICE.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = s.send(Box::new(|| {}));
    }
}

/// Has the service thread nothing left to do: no seed with templates, and
/// no process it is the parent thread of (children forked from templates
/// die with it, `PR_SET_PDEATHSIG`; the caller reaps them)?
fn nothing_left() -> bool {
    {
        let mut cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
        cores.retain(|w| w.strong_count() > 0);
        if !cores.is_empty() {
            return false;
        }
    }
    // Unreadable: assume children, keep serving.
    std::fs::read_to_string("/proc/thread-self/children").is_ok_and(|c| c.trim().is_empty())
}

/// Run `job` on the template service thread (started if it is not
/// running; it ends once nothing is left for it, see [`nothing_left`]).
fn submit(job: Job) -> Result<(), RestoreError> {
    let mut g = SERVICE.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        let (jtx, jrx) = channel::<Job>();
        std::thread::Builder::new()
            .name("rf-templates".into())
            .spawn(move || {
                let mut swept = Instant::now();
                loop {
                    let period = if CORES.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                        // Only children left: look often whether they are gone.
                        Duration::from_millis(100)
                    } else {
                        (idle_timeout() / 2)
                            .clamp(Duration::from_millis(100), Duration::from_secs(30))
                    };
                    // A lone spawn's spare: once its child has ended or
                    // REFILL_AFTER passed without another job, or right
                    // after the next one.
                    let wait = if refill_is_pending() {
                        REFILL_POLL
                    } else {
                        period
                    };
                    match jrx.recv_timeout(wait) {
                        Ok(job) => {
                            let was_pending = refill_is_pending();
                            // A panicking job must not take the service (and
                            // every template's children's parent) with it.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            if was_pending {
                                let _ = std::panic::catch_unwind(|| refill_pending(true));
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let _ = std::panic::catch_unwind(|| refill_pending(false));
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    if swept.elapsed() >= period {
                        let _ = std::panic::catch_unwind(sweep);
                        swept = Instant::now();
                    }
                    if nothing_left() {
                        let mut g = SERVICE.lock().unwrap_or_else(|e| e.into_inner());
                        // A job sent before the lock was taken is still run
                        // here; later ones start a new thread.
                        match jrx.try_recv() {
                            Ok(job) => {
                                drop(g);
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => {
                                *g = None;
                                debug!("template service thread ends: no templates, no children");
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(|source| RestoreError::Io {
                what: "starting the template service thread".into(),
                source,
            })?;
        *g = Some(jtx);
    }
    match g.as_ref() {
        Some(s) => s.send(job).map_err(|_| RestoreError::Step {
            what: "handing the spawn to the template service".into(),
            detail: "the service thread is gone".into(),
        }),
        None => Ok(()),
    }
}

/// Before a job for `opts` goes to the service thread: what a template
/// still to build needs from a remote seed is fetched here, not on the
/// service thread every seed's spawns share; and the service knows `core`.
fn before_submit(core: &Arc<Core>, opts: &SpawnOptions) -> Result<(), RestoreError> {
    let want_ws = wants_working_set(core, opts);
    let ready = core
        .templates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key_of(opts))
        .is_some_and(|t| t.with_ws || !want_ws);
    if !ready {
        core.prewarm(opts.lazy, want_ws)?;
    }
    let mut cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
    if !cores
        .iter()
        .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(core)))
    {
        cores.push(Arc::downgrade(core));
    }
    Ok(())
}

/// Make this node ready for children of `opts` without starting one: the
/// template for `opts` built (if there is none, or it lacks a working set
/// recorded since) and its spare forked. Whether a template was built.
pub(super) fn prepare(core: &Arc<Core>, opts: &SpawnOptions) -> Result<bool, RestoreError> {
    before_submit(core, opts)?;
    let core = core.clone();
    let opts = *opts;
    let (tx, rx) = sync_channel(1);
    submit(Box::new(move || {
        let built = {
            let mut g = core.templates.lock().unwrap_or_else(|e| e.into_inner());
            template_for(&core, &mut g, &opts).map(|(_, built)| built)
        };
        if built.is_ok() {
            refill(&core, key_of(&opts), true);
        }
        let _ = tx.send(built);
    }))?;
    rx.recv().map_err(|_| RestoreError::Step {
        what: "preparing the template".into(),
        detail: "the template service failed (a panic; see the log)".into(),
    })?
}

/// Start one child forked from the seed's template for `opts` (built first
/// if there is none, or if it lacks a working set recorded since).
pub(super) fn spawn(
    core: &Arc<Core>,
    stdin: Io,
    stdout: Io,
    stderr: Io,
    opts: &SpawnOptions,
) -> Result<Started, RestoreError> {
    before_submit(core, opts)?;
    let core = core.clone();
    let opts = *opts;
    let (tx, rx) = sync_channel(1);
    submit(Box::new(move || {
        let began = Instant::now();
        let key = key_of(&opts);
        let started = fork_one(&core, [stdin, stdout, stderr], &opts);
        // Taken before the caller has it (and may reap it).
        let child = started
            .as_ref()
            .ok()
            .and_then(|s| uffd::pidfd_open(s.pid).ok());
        let _ = tx.send(started);
        // Once the caller has its child: the next child's fork, ahead.
        refill_after_spawn(&core, key, began, child);
    }))?;
    rx.recv().map_err(|_| RestoreError::Step {
        what: "forking from the template".into(),
        detail: "the template service failed (a panic; see the log)".into(),
    })?
}

/// Should the template for `opts` have the recorded working set (it is
/// `recorded` and there is one)?
fn wants_working_set(core: &Core, opts: &SpawnOptions) -> bool {
    opts.lazy && opts.prefetch == Prefetch::Recorded && core.seed.working_set().is_some()
}

/// Which template serves `opts`.
fn key_of(opts: &SpawnOptions) -> Key {
    let prefetch = if opts.lazy {
        opts.prefetch
    } else {
        Prefetch::Off
    };
    (
        opts.lazy,
        prefetch,
        opts.run_as,
        opts.container.network,
        opts.container.host,
    )
}

/// A template per mode and user: lazy, prefetch, whom its children run as
/// (and, for a container seed, their network: the fork table differs).
pub(super) type Key = (
    bool,
    Prefetch,
    Option<super::RunAs>,
    crate::container::Network,
    bool,
);

/// Fork spare children of the template for `key` up to [`SPARES`]. When
/// the node has the time (`idle`: not in a burst), each then reads its
/// working set in the background ([`start_touch`]).
fn refill(core: &Core, key: Key, idle: bool) {
    let mut g = core.templates.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = g.get_mut(&key) else {
        return;
    };
    while t.spares.len() < SPARES {
        match fork_raw(core, t) {
            Ok(mut f) => {
                if idle {
                    start_touch(core, t, &mut f);
                }
                t.spares.push(f)
            }
            Err(e) => {
                debug!(error = %e, "could not fork a spare child; forking on demand");
                return;
            }
        }
    }
}

/// Pids of the seed's templates.
pub(super) fn pids(core: &Core) -> Vec<i32> {
    let g = core.templates.lock().unwrap_or_else(|e| e.into_inner());
    g.values().map(|t| t.tracee.pid()).collect()
}

/// The live template for `opts` in `g`, built now if there is none (or it
/// lacks a working set recorded since, or died); and whether it was built.
fn template_for<'a>(
    core: &Core,
    g: &'a mut Templates,
    opts: &SpawnOptions,
) -> Result<(&'a mut Template, bool), RestoreError> {
    let key = key_of(opts);
    let prefetch = key.1;
    let want_ws = wants_working_set(core, opts);
    if let Some(t) = g.get(&key) {
        if (want_ws && !t.with_ws) || !alive(t.tracee.pid()) {
            // Dropping it kills it; its children live on.
            debug!(pid = t.tracee.pid(), "replacing a template");
            g.remove(&key);
        }
    }
    let (t, built) = match g.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => (e.into_mut(), false),
        std::collections::hash_map::Entry::Vacant(e) => {
            let tb = Instant::now();
            let t = build(core, opts, prefetch, want_ws)?;
            info!(
                pid = t.tracee.pid(),
                lazy = opts.lazy,
                ?prefetch,
                working_set = want_ws,
                us = tb.elapsed().as_micros() as u64,
                "template built"
            );
            (e.insert(t), true)
        }
    };
    t.last_used = Instant::now();
    Ok((t, built))
}

fn fork_one(core: &Core, stdio: [Io; 3], opts: &SpawnOptions) -> Result<Started, RestoreError> {
    let t0 = Instant::now();
    let mut g = core.templates.lock().unwrap_or_else(|e| e.into_inner());
    // The first child's time (from t0) includes building the template.
    let (t, _) = template_for(core, &mut g, opts)?;
    // A spare forked ahead, if it is still there; else fork now.
    let forked = loop {
        match t.spares.pop() {
            Some(mut f) => {
                if end_touch(core, t, &mut f) && alive(f.tracee.pid()) {
                    break f;
                }
            }
            None => break fork_raw(core, t)?,
        }
    };
    finish(core, t, forked, stdio, opts, t0)
}

/// Has the template not died? (It is ours: a death is collected here.)
fn alive(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on our own traced child; status is writable.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    if r == pid {
        // A stop (a signal sent to it) leaves it usable; an exit does not.
        return libc::WIFSTOPPED(status);
    }
    r == 0
}

/// Restore the seed into a template: a child built like any other, whose
/// fd 0 is our socket and whose executor area keeps the fork table.
fn build(
    core: &Core,
    child_opts: &SpawnOptions,
    prefetch: Prefetch,
    want_ws: bool,
) -> Result<Template, RestoreError> {
    let (lazy, run_as) = (child_opts.lazy, child_opts.run_as);
    let d = core.image.descriptor();
    // A container seed's children make their own root at the fork.
    let steps = match (&d.container, &core.rootfs) {
        (Some(c), Some(_)) if !child_opts.container.host => {
            Some(crate::container::fork_steps(c, &child_opts.container))
        }
        _ => None,
    };
    let fc = steps.as_ref().map(|steps| plan::ForkContainer {
        steps,
        loopback: child_opts.container.network == crate::container::Network::Loopback,
        run_as,
    });
    let io_err = |what: &str| {
        let what = what.to_string();
        move |source| RestoreError::Io { what, source }
    };
    let (ours, theirs) = proc::fd_socketpair().map_err(io_err("creating the template's socket"))?;
    // The table's size depends only on the descriptor.
    let passed = FORK_STDIO + usize::from(lazy);
    let sizing = plan::fork_table(
        d,
        0,
        0,
        &[0; FORK_STDIO + 1],
        lazy.then_some(0),
        fc.as_ref(),
    );
    let opts = SpawnOptions {
        lazy,
        prefetch,
        // The template maps the node's seed cache privately, as children
        // restored from scratch do: every page a child only reads stays the
        // cache's one copy. Pages the template has (its working set, put in
        // with UFFDIO_CONTINUE, which gives each mapping an anon_vma) are
        // in its children's page tables from the fork on: fork copies the
        // page-table entries of a private file mapping that has an anon_vma.
        share: true,
        template: false,
        container: child_opts.container,
        run_as,
    };
    // The touch of the working set, after the fork table.
    let runs = if want_ws {
        touch_runs(core, MAX_TOUCH_RUNS)
    } else {
        Vec::new()
    };
    let touch_at = sizing.bytes.len().next_multiple_of(8);
    let touch_len = if runs.is_empty() {
        0
    } else {
        8 + executor::ENTRY_SIZE + runs.len() * executor::RUN_SIZE
    };
    let b = core.build_child(
        Io::fd(theirs),
        Io::Null,
        Io::Null,
        &opts,
        (touch_at + touch_len) as u64,
        true,
    )?;
    let pid = b.husk.pid();
    let open = proc::open_fds(pid).map_err(io_err("listing the template's descriptors"))?;
    // recvmsg puts passed descriptors at the lowest free numbers.
    let recv: Vec<i32> = (0..).filter(|n| !open.contains(n)).take(passed).collect();
    let uffd_target = match b.uffd_fd {
        Some(fd) => Some(i32::try_from(fd).map_err(|_| RestoreError::Step {
            what: "creating the template's userfaultfd".into(),
            detail: errno_text(fd),
        })?),
        None => None,
    };
    let at = b.plan.extra_at();
    let fork = plan::fork_table(d, at, 0, &recv, uffd_target, fc.as_ref());
    mem::write_ranges(
        pid,
        &[&fork.bytes],
        &[RemoteRange {
            addr: at,
            len: fork.bytes.len(),
        }],
    )?;
    let touch = if runs.is_empty() {
        None
    } else {
        let t = Touch::at(at + touch_at as u64, &runs);
        let bytes = t.encode(&runs);
        mem::write_ranges(
            pid,
            &[&bytes],
            &[RemoteRange {
                addr: t.stop_word,
                len: bytes.len(),
            }],
        )?;
        Some(t)
    };
    let forks = match b.uffd_fd {
        Some(fd) => {
            let (tx, rx) = channel();
            core.start_paging(pid, &b.plan, fd, &opts, Some(tx))?;
            Some(rx)
        }
        None => None,
    };
    Ok(Template {
        tracee: b.husk,
        base_regs: b.base_regs,
        insn: b.child_insn,
        area: (b.plan.base, b.plan.area_len()),
        code: b.blob.code,
        fork,
        sock: ours,
        forks,
        with_ws: want_ws,
        touch,
        spares: Vec::new(),
        last_used: Instant::now(),
        notes: b.notes,
        pages_written: b.pages_written,
        container: fc.is_some(),
    })
}

/// A child forked from a template, stopped before it ever ran.
pub(super) struct Forked {
    /// Its other threads, recreated before its spawn ([`threads_ahead`]).
    /// First: fields drop in order, and a killed child's other threads
    /// must be reaped (by their tracer) before its main thread can be.
    ahead: Option<Ahead>,
    tracee: Tracee,
    /// Its userfaultfd and page table (lazy), not yet served: it has not run.
    lazy: Option<LazyChild>,
    /// Served already (a spare touching its working set, without threads
    /// made ahead, whose `ahead` would hold it).
    served: Option<Served>,
    /// Running the touch of its working set ([`start_touch`]), not yet
    /// collected.
    touching: bool,
    /// A container child's cgroup, and its move into it under way.
    cgroup: Option<(
        crate::container::ChildCgroup,
        crate::container::cgroup::Attaching,
    )>,
}

/// A forked child's threads recreated ahead of its spawn, and (lazy) the
/// pager serving it since, as their setup may fault.
struct Ahead {
    threads: Vec<Tracee>,
    served: Option<Served>,
}

/// A lazy child handed to the pager.
struct Served {
    stats: Arc<ChildStats>,
    handover: super::Handover,
    /// Its userfaultfd, to pass to it (its fork table installs it).
    own_uffd: OwnedFd,
}

/// Have the pager serve the forked child `pid` from now on.
fn serve(core: &Core, pid: i32, mut c: LazyChild) -> Result<Served, RestoreError> {
    let own_uffd = c.uffd.try_clone().map_err(|source| RestoreError::Io {
        what: "duplicating the child's userfaultfd".into(),
        source,
    })?;
    let pidfd = uffd::pidfd_open(pid).map_err(|source| RestoreError::Io {
        what: format!("pidfd_open({pid})"),
        source,
    })?;
    let stats = Arc::new(ChildStats::default());
    c.pid = Some(pid);
    c.pidfd = Some(pidfd);
    c.stats = stats.clone();
    c.journal = super::new_journal(pid);
    let handover = super::Handover {
        uffd: c.uffd.dup().map_err(|source| RestoreError::Io {
            what: "duplicating the child's userfaultfd".into(),
            source,
        })?,
        regions: c.initial.to_vec(),
        journal: c.journal.as_ref().map(|j| j.path().to_path_buf()),
    };
    core.pager.add(c);
    Ok(Served {
        stats,
        handover,
        own_uffd,
    })
}

/// The executor area of `t`'s children, as the finish steps take it.
fn exec_area(t: &Template) -> super::finish::ExecutorArea {
    super::finish::ExecutorArea {
        insn: t.insn,
        base_regs: t.base_regs,
        base: t.area.0,
        len: t.area.1,
    }
}

/// Recreate the seed's other threads in a child forked from a template
/// that is not a container's (whose credentials its children already
/// have: a container child's are set by its fork table, after which its
/// threads must be made), so that a spare's spawn does not wait for them:
/// one injected `clone` and a few syscalls per thread, most of a JVM
/// child's start. A lazy child is served from here on.
fn threads_ahead(
    core: &Core,
    t: &Template,
    tracee: &mut Tracee,
    lazy: &mut Option<LazyChild>,
) -> Result<Option<Ahead>, RestoreError> {
    let d = core.image.descriptor();
    if t.container || d.thread_set.others.is_empty() {
        return Ok(None);
    }
    let served = match lazy.take() {
        Some(c) => Some(serve(core, tracee.pid(), c)?),
        None => None,
    };
    let threads = super::finish::threads_ahead(tracee, &exec_area(t), d)
        .map_err(|e| super::served_or(e, served.as_ref().map(|s| &*s.stats)))?;
    Ok(Some(Ahead { threads, served }))
}

/// Fork a child from `t` and hold it at its first stop.
fn fork_raw(core: &Core, t: &mut Template) -> Result<Forked, RestoreError> {
    let d = core.image.descriptor();
    let t0 = Instant::now();
    // Left over from a fork that failed half-way: never hand it to another.
    if let Some(rx) = &t.forks {
        while rx.try_recv().is_ok() {}
    }
    let mut flags = (libc::CLONE_PARENT | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
    if t.container {
        flags |= crate::container::FORK_NAMESPACES as u64;
    }
    // The template, this thread and the child (with the threads made in
    // it) on one CPU while the child is made; each has its own affinity
    // back (the child the template's) when this returns.
    let mut one = OneCpu::here(t.tracee.pid());
    let r = t.tracee.inject_syscall(
        t.insn,
        &t.base_regs,
        libc::SYS_clone,
        [flags, 0, 0, d.clear_child_tid, 0, 0],
    )?;
    if r.ret < 0 {
        return Err(RestoreError::Step {
            what: "forking the template".into(),
            detail: errno_text(r.ret),
        });
    }
    let pid = r.new_child.ok_or_else(|| RestoreError::Step {
        what: "forking the template".into(),
        detail: "no fork event for the new child".into(),
    })?;
    if let Some(o) = one.as_mut() {
        o.whole_process(pid, t.tracee.pid());
    }
    let mut tracee = Tracee::adopt(pid);
    tracee.kill_on_drop();
    // A lazy child: its userfaultfd, from the fork event.
    let lazy = match &t.forks {
        Some(rx) => Some(
            rx.recv_timeout(HANDOVER_TIMEOUT)
                .map_err(|_| RestoreError::Step {
                    what: "taking the forked child's userfaultfd".into(),
                    detail: format!(
                        "the pager did not hand it over within {} s",
                        HANDOVER_TIMEOUT.as_secs()
                    ),
                })?,
        ),
        None => None,
    };
    // A container child's cgroup, moved into while it waits (a spare's
    // move is done long before its spawn).
    let cgroup = match (&d.container, t.container) {
        (Some(c), true) => {
            // Every hierarchy: its spawn may ask for any limit.
            let cg = crate::container::ChildCgroup::create_all(
                &format!("{}-{pid}", std::process::id()),
                c.limits,
            )
            .map_err(crate::container::ContainerError::from)?;
            let attaching = cg.attach_in_background(pid);
            Some((cg, attaching))
        }
        _ => None,
    };
    match ptrace::wait(pid) {
        Ok(Stop::Signal(libc::SIGSTOP)) => {
            let mut lazy = lazy;
            let mut served = None;
            let written = lazy
                .as_ref()
                .map(|c| written_pages_present(core, t, c))
                .unwrap_or_default();
            let private = lazy
                .as_ref()
                .map(|c| written_private_pages(core, t, c))
                .unwrap_or_default();
            // Not lazily served: no fault here waits on a pager.
            make_own(core, pid, &private);
            if let Some(c) = lazy.take_if(|_| !written.is_empty()) {
                // Served first: a page the template has may be missing
                // from the child's page table all the same (reclaim
                // unmaps a file page from every process mapping it; this
                // VM's DAMON pages cold memory out), and the copy then
                // faults on the child's userfaultfd, which nobody else
                // reads (forkd's thread blocked there for good).
                served = Some(serve(core, pid, c)?);
                precopy_written(core, pid, &written);
            }
            let forked_us = t0.elapsed().as_micros() as u64;
            if let Some(((at, n), what)) = &t.fork.prepare {
                // Its own root and network, now: a spare has them before
                // its spawn comes.
                let regs = executor::start_regs(&t.base_regs, t.code, *at, *n);
                let at_trap = tracee.run_until_trap(&regs)?;
                if let executor::Outcome::Failed { index, result } = executor::outcome(&at_trap) {
                    return Err(RestoreError::Step {
                        what: what
                            .get(index as usize)
                            .cloned()
                            .unwrap_or_else(|| "(unknown step)".into()),
                        detail: errno_text(result),
                    });
                }
                debug!(
                    pid,
                    forked_us,
                    prepared_us = t0.elapsed().as_micros() as u64,
                    "container child forked and prepared"
                );
            }
            let ahead = threads_ahead(core, t, &mut tracee, &mut lazy)?;
            if let Some(a) = &ahead {
                debug!(
                    pid,
                    forked_us,
                    threads = a.threads.len(),
                    us = t0.elapsed().as_micros() as u64,
                    "child forked, its threads made"
                );
            }
            Ok(Forked {
                tracee,
                lazy,
                served,
                touching: false,
                cgroup,
                ahead,
            })
        }
        Ok(other) => Err(RestoreError::Step {
            what: "starting the forked child".into(),
            detail: format!("it reported {other:?} instead of its first stop"),
        }),
        Err(source) => Err(RestoreError::Io {
            what: format!("waiting for the forked child {pid}"),
            source,
        }),
    }
}

/// The most runs a template's touch lists (16 bytes each in its executor
/// area): a working set more scattered than this is touched in part.
const MAX_TOUCH_RUNS: usize = 65_536;

/// A template's touch of its working set, in its executor area (so in
/// every child's until its spawn unmaps it): the word that stops it, then
/// the executor entry, then the runs.
#[derive(Debug, Clone, Copy)]
struct Touch {
    stop_word: u64,
    entry: u64,
    pages: u64,
}

impl Touch {
    fn at(addr: u64, runs: &[(u64, u64)]) -> Touch {
        Touch {
            stop_word: addr,
            entry: addr + 8,
            pages: runs.iter().map(|r| r.1).sum(),
        }
    }

    /// The bytes at `stop_word`: the word (0), the entry, the runs.
    fn encode(&self, runs: &[(u64, u64)]) -> Vec<u8> {
        let list = self.entry + executor::ENTRY_SIZE as u64;
        let mut b = 0u64.to_le_bytes().to_vec();
        executor::Entry {
            nr: executor::TOUCH,
            args: [list, runs.len() as u64, self.stop_word, 0, 0, 0],
            flags: 0,
            extra: 0,
        }
        .encode(&mut b);
        for &(start, pages) in runs {
            b.extend_from_slice(&start.to_le_bytes());
            b.extend_from_slice(&pages.to_le_bytes());
        }
        b
    }
}

/// The runs of pages a template's spares read before their spawn: the
/// seed's working set in the order its first child touched it, within
/// private readable mappings, at most `max` runs. The pages copied ahead
/// too: left out, the heap walk's first answer took 2.4-5.0 ms against
/// 2.0-2.7 ms with them (the copy's page-table entries are not marked
/// accessed either, it seems).
fn touch_runs(core: &Core, max: usize) -> Vec<(u64, u64)> {
    let Some(ws) = core.seed.working_set() else {
        return Vec::new();
    };
    let readable: Vec<(u64, u64)> = core
        .image
        .descriptor()
        .vmas
        .iter()
        .filter(|v| !v.shared && v.prot & libc::PROT_READ as u32 != 0)
        .map(|v| (v.start, v.end))
        .collect();
    runs_of(&ws, &readable, max)
}

/// `pages` (in order) as runs of consecutive pages, less those outside
/// `within` (sorted `[start, end)` ranges), at most `max` runs.
fn runs_of(pages: &[u64], within: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    let page = crate::PAGE_SIZE;
    let inside = |a: u64| {
        let i = within.partition_point(|r| r.1 <= a);
        within.get(i).is_some_and(|r| r.0 <= a)
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &a in pages {
        if !inside(a) {
            continue;
        }
        if let Some(r) = runs.last_mut().filter(|r| r.0 + r.1 * page == a) {
            r.1 += 1;
        } else if runs.len() < max {
            runs.push((a, 1));
        } else {
            break;
        }
    }
    runs
}

/// Have the spare `f` read one byte of each page of its template's working
/// set, in the background: `fork()` copies page-table entries marked not
/// accessed, and the first access to each then costs the child (about
/// 0.4 µs a page in this VM: 2 ms of a 4 ms heap walk). A lazy spare is
/// served from here on, as a page may not be present. Collected (or
/// stopped where it got to) by [`end_touch`] when the spare is taken.
fn start_touch(core: &Core, t: &Template, f: &mut Forked) {
    let Some(touch) = t.touch else {
        return;
    };
    let pid = f.tracee.pid();
    if f.ahead.is_none() && f.served.is_none() {
        if let Some(c) = f.lazy.take() {
            match serve(core, pid, c) {
                Ok(s) => f.served = Some(s),
                Err(e) => {
                    debug!(pid, error = %e, "could not serve a spare to touch its working set");
                    return;
                }
            }
        }
    }
    let regs = executor::start_regs(&t.base_regs, t.code, touch.entry, 1);
    match f.tracee.start_until_trap(&regs) {
        Ok(()) => f.touching = true,
        Err(e) => debug!(pid, error = %e, "could not start a spare's touch of its working set"),
    }
}

/// Take the spare `f` from its touch: stop it where it got to and collect
/// its stop. False if the spare cannot be used (it died or faulted).
fn end_touch(core: &Core, t: &Template, f: &mut Forked) -> bool {
    if !f.touching {
        return true;
    }
    f.touching = false;
    let pid = f.tracee.pid();
    let Some(touch) = t.touch else {
        return false;
    };
    // Stopped early if it is still running: the child reads the rest.
    let one = 1u64.to_le_bytes();
    let _ = mem::write_ranges(
        pid,
        &[&one],
        &[RemoteRange {
            addr: touch.stop_word,
            len: 8,
        }],
    );
    match f.tracee.wait_trap() {
        Ok(regs) => match executor::outcome(&regs) {
            executor::Outcome::Done => {
                debug!(
                    pid,
                    pages = regs.r14,
                    of = touch.pages,
                    "spare touched its working set"
                );
                core.seed
                    .metrics
                    .pages_touched_ahead
                    .fetch_add(regs.r14, Ordering::Relaxed);
                true
            }
            executor::Outcome::Failed { result, .. } => {
                debug!(pid, result, "a spare's touch failed");
                false
            }
        },
        Err(e) => {
            debug!(pid, error = %e, "a spare's touch of its working set ended it");
            false
        }
    }
}

/// Copy into the child `pid`, forked and not yet run, the pages every
/// child writes (the seed's written set, where the template has them): its
/// first request then takes no copy-on-write faults for them, as a warm
/// process would not. For a spare, this happens ahead of its request.
fn precopy_written(core: &Core, pid: i32, pages: &[(u64, u64)]) {
    let locals: Vec<&[u8]> = pages
        .iter()
        .map(|&(_, cache)| core.seed.cache.page(cache))
        .collect();
    let remotes: Vec<RemoteRange> = pages
        .iter()
        .map(|&(addr, _)| RemoteRange {
            addr,
            len: crate::PAGE_SIZE as usize,
        })
        .collect();
    match mem::write_ranges(pid, &locals, &remotes) {
        Ok(()) => {
            debug!(pages = pages.len(), "written set copied ahead");
            core.seed
                .metrics
                .pages_copied_ahead
                .fetch_add(pages.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            debug!(error = %e, "could not copy the written set ahead; the child copies on write")
        }
    }
}

/// Give the child `pid`, forked and not yet run, its own copy of each of
/// `pages` (of the seed's private mappings that are not lazily served,
/// shared with the template since the fork): each is read from the child
/// and written back, which copies it as the child's own write would
/// have. Its first request and its exit then take no copy-on-write
/// faults for them (a Python heap walk's exit: 257 in the interpreter's
/// own data). The content is the child's own, unchanged.
fn make_own(core: &Core, pid: i32, pages: &[u64]) {
    if pages.is_empty() {
        return;
    }
    let ranges: Vec<RemoteRange> = pages
        .iter()
        .map(|&addr| RemoteRange {
            addr,
            len: crate::PAGE_SIZE as usize,
        })
        .collect();
    let mut buf = vec![0u8; pages.len() * crate::PAGE_SIZE as usize];
    let r = mem::read_ranges(pid, &ranges, &mut buf).and_then(|()| {
        let locals: Vec<&[u8]> = buf.chunks(crate::PAGE_SIZE as usize).collect();
        mem::write_ranges(pid, &locals, &ranges)
    });
    match r {
        Ok(()) => {
            debug!(
                pages = pages.len(),
                "private written pages made the child's own ahead"
            );
            core.seed
                .metrics
                .pages_copied_ahead
                .fetch_add(pages.len() as u64, Ordering::Relaxed);
        }
        Err(e) => {
            debug!(error = %e, "could not copy private written pages ahead; the child copies on write")
        }
    }
}

/// Of the seed's written set, the pages outside the child's lazily served
/// regions that are in the seed's other private writable mappings (see
/// [`make_own`]). Only for templates with the recorded working set.
fn written_private_pages(core: &Core, t: &Template, c: &LazyChild) -> Vec<u64> {
    if !t.with_ws {
        return Vec::new();
    }
    let Some(ws) = core.seed.written_set() else {
        return Vec::new();
    };
    let private = core.seed.private_regions();
    let lazy = c.table.regions();
    ws.iter()
        .copied()
        .filter(|&a| {
            private.iter().any(|&(s, l)| (s..s + l).contains(&a))
                && !crate::pager::in_regions(&lazy, a)
        })
        .collect()
}

/// Of the seed's written set (the pages its first child wrote), those the
/// template has (so the fork mapped them shared): (address, cache offset).
/// Only for templates with the recorded working set, where they are.
fn written_pages_present(core: &Core, t: &Template, c: &LazyChild) -> Vec<(u64, u64)> {
    use crate::pager::table::{Origin, Slot};
    if !t.with_ws {
        return Vec::new();
    }
    let Some(ws) = core.seed.written_set() else {
        return Vec::new();
    };
    ws.iter()
        .filter_map(|&a| match c.table.get(a) {
            Some(Slot::Done(Origin::Stored(r))) => Some((a, r.cache)),
            _ => None,
        })
        .collect()
}

/// Give a forked child what fork did not, and let it run as the seed.
fn finish(
    core: &Core,
    t: &Template,
    forked: Forked,
    stdio: [Io; 3],
    opts: &SpawnOptions,
    t0: Instant,
) -> Result<Started, RestoreError> {
    let d = core.image.descriptor();
    let Forked {
        tracee: mut child,
        lazy,
        served,
        touching: _,
        cgroup,
        ahead,
    } = forked;
    // In its cgroup, with this spawn's limits, before it runs.
    let cgroup = match cgroup {
        Some((mut cg, attaching)) => {
            attaching
                .wait()
                .map_err(crate::container::ContainerError::from)?;
            let seed = d.container.as_ref().map(|c| c.limits).unwrap_or_default();
            cg.set_limits(opts.container.limits.or(seed))
                .map_err(crate::container::ContainerError::from)?;
            Some(cg)
        }
        None => None,
    };
    let pid = child.pid();
    // A lazy child is served from now on (if its threads were not made
    // ahead: then it is already).
    let (served, threads) = match (ahead, served) {
        (Some(a), s) => (a.served.or(s), Some(a.threads)),
        (None, Some(s)) => (Some(s), None),
        (None, None) => (lazy.map(|c| serve(core, pid, c)).transpose()?, None),
    };
    let (stats, handover, own_uffd) = match served {
        Some(s) => (Some(s.stats), Some(s.handover), Some(s.own_uffd)),
        None => (None, None, None),
    };
    let handed_us = t0.elapsed().as_micros() as u64;

    // Its descriptors, through the template's socket (ours where it inherits).
    let (null, raw) =
        kernel_helpers::husk::raw_stdio(&stdio).map_err(|source| RestoreError::Io {
            what: "opening /dev/null".into(),
            source,
        })?;
    let mut fds: Vec<RawFd> = raw
        .iter()
        .enumerate()
        .map(|(i, &fd)| if fd < 0 { i as RawFd } else { fd })
        .collect();
    fds.extend(own_uffd.as_ref().map(|f| f.as_raw_fd()));
    proc::send_fds(t.sock.as_raw_fd(), &fds).map_err(|source| RestoreError::Io {
        what: "passing the child's descriptors".into(),
        source,
    })?;
    drop((stdio, null, own_uffd));

    let sent_us = t0.elapsed().as_micros() as u64;
    let regs = executor::start_regs(&t.base_regs, t.code, t.fork.table.0, t.fork.table.1);
    let at_trap = child.run_until_trap(&regs)?;
    if let executor::Outcome::Failed { index, result } = executor::outcome(&at_trap) {
        return Err(RestoreError::Step {
            what: t
                .fork
                .what
                .get(index as usize)
                .cloned()
                .unwrap_or_else(|| "(unknown step)".into()),
            detail: errno_text(result),
        });
    }
    let table_us = t0.elapsed().as_micros() as u64;
    let exec = exec_area(t);
    // A lazy child is told to the fork sink just before it runs.
    let announced = std::cell::Cell::new(false);
    let announce = || {
        if let Some(h) = &handover {
            announced.set(core.seed.announce_starting(pid, &h.uffd));
        }
    };
    match threads {
        // Not on one CPU: a few stops only, and the CPU this thread would
        // be pinned to may be busy right then (it was slower, measured).
        Some(threads) => super::finish::finish_with_threads(child, threads, &exec, d, announce),
        None => super::finish::finish(child, &exec, d, || Ok(()), announce),
    }
    .map_err(|e| {
        if announced.get() {
            core.seed.announce_not_started(pid);
        }
        super::served_or(e, stats.as_deref())
    })?;
    let restore_ns = t0.elapsed().as_nanos() as u64;
    debug!(
        pid,
        handed_us,
        sent_us,
        table_us,
        us = restore_ns / 1000,
        "child forked from the template"
    );
    Ok(Started {
        pid,
        notes: t.notes.clone(),
        restore_ns,
        pages_written: t.pages_written,
        stats,
        handover,
        cgroup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_working_set_becomes_runs_in_its_order_within_readable_mappings() {
        let within = [(0x1000, 0x9000), (0x20000, 0x30000)];
        let pages = [
            0x2000, 0x3000, 0x4000, // a run
            0x8000, // the last page of the first mapping
            0x9000, // outside every mapping: left out
            0x21000, 0x22000, // a run in the second
            0x1000,  // before the others in memory, after them in order
        ];
        assert_eq!(
            runs_of(&pages, &within, 100),
            vec![(0x2000, 3), (0x8000, 1), (0x21000, 2), (0x1000, 1)]
        );
        // At most `max` runs: the rest is left to the child.
        assert_eq!(runs_of(&pages, &within, 2), vec![(0x2000, 3), (0x8000, 1)]);
        assert!(runs_of(&pages, &[], 100).is_empty());
    }

    #[test]
    fn a_touch_is_its_stop_word_then_one_executor_entry_then_its_runs() {
        let runs = [(0x7000_0000, 3), (0x7100_0000, 1)];
        let t = Touch::at(0x5000, &runs);
        assert_eq!(t.pages, 4);
        let b = t.encode(&runs);
        assert_eq!(
            b.len(),
            8 + executor::ENTRY_SIZE + runs.len() * executor::RUN_SIZE
        );
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        assert_eq!(word(0), 0, "the stop word starts clear");
        assert_eq!(t.entry, 0x5000 + 8);
        assert_eq!(word(8), executor::TOUCH);
        let list = t.entry + executor::ENTRY_SIZE as u64;
        assert_eq!((word(16), word(24), word(32)), (list, 2, t.stop_word));
        let at = (list - t.stop_word) as usize;
        assert_eq!(
            (word(at), word(at + 8), word(at + 16), word(at + 24)),
            (0x7000_0000, 3, 0x7100_0000, 1)
        );
    }
}
