//! The last steps of a restore, [`finish`]: the one sequence both a child
//! built from scratch and a child forked from a template end with. Written
//! over the [`Tracer`] seam, so the unit tests run it against a recording
//! double, without root.

use super::{errno_text, RestoreError};
use crate::image::{Descriptor, ThreadState};
use crate::tracer::Tracer;

/// The flags a restored thread is cloned with: a thread of the child,
/// sharing all a thread shares (its TLS and registers are set by ptrace).
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// Where, in the scratch page, a thread's name is passed.
const COMM_AT: u64 = 64;

/// The executor area still mapped in a child, and how to run a syscall
/// there: what [`finish`] unmaps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExecutorArea {
    /// A `syscall` instruction in the child (its vDSO's).
    pub insn: u64,
    /// Registers to inject syscalls from.
    pub base_regs: libc::user_regs_struct,
    /// The area's start.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// Let a rebuilt child run as the seed: unmap the executor, run
/// `before_start` (a lazy child's pager starts here, once the executor is
/// gone and before the child runs), give the main thread its own tid where
/// the seed's kept its tid (glibc's thread descriptor), recreate every
/// other thread of the seed ([`start_threads`]), then set the main
/// thread's registers (an interrupted syscall set to restart), its XSAVE
/// area and its signal mask, run `before_run` and detach: the other
/// threads first. On an error the tracers are dropped without detaching,
/// which kills the child.
pub(crate) fn finish<T: Tracer, R>(
    mut t: T,
    exec: &ExecutorArea,
    d: &Descriptor,
    before_start: impl FnOnce() -> Result<R, RestoreError>,
    before_run: impl FnOnce(),
) -> Result<R, RestoreError> {
    unmap_executor(&mut t, exec)?;
    let out = before_start()?;
    // After before_start: a lazy child's pages are served from here on,
    // and these writes may fault.
    let threads = threads_ahead(&mut t, exec, d)?;
    let_run(t, threads, d, before_run)?;
    Ok(out)
}

/// [`finish`] for a child whose threads [`threads_ahead`] recreated
/// before (a template's spare, forked ahead of its spawn; a lazy one
/// already served): unmap the executor, set the main thread's state, run
/// `before_run`, and let them all run.
pub(crate) fn finish_with_threads<T: Tracer>(
    mut t: T,
    threads: Vec<T>,
    exec: &ExecutorArea,
    d: &Descriptor,
    before_run: impl FnOnce(),
) -> Result<(), RestoreError> {
    unmap_executor(&mut t, exec)?;
    let_run(t, threads, d, before_run)
}

/// Unmap the executor area from the child.
fn unmap_executor<T: Tracer>(t: &mut T, exec: &ExecutorArea) -> Result<(), RestoreError> {
    let r = t.inject_syscall(
        exec.insn,
        &exec.base_regs,
        libc::SYS_munmap,
        [exec.base, exec.len, 0, 0, 0, 0],
    )?;
    if r.ret != 0 {
        return Err(RestoreError::Step {
            what: "unmapping the executor".into(),
            detail: errno_text(r.ret),
        });
    }
    Ok(())
}

/// The child's threads, before it runs: the main thread's own tid where
/// the seed's kept its tid (glibc's thread descriptor) and in the robust
/// futexes it held, then every other thread of the seed recreated
/// ([`start_threads`]), each stopped. The executor may still be mapped
/// (the threads never run on it); a lazy child must be served already.
pub(crate) fn threads_ahead<T: Tracer>(
    t: &mut T,
    exec: &ExecutorArea,
    d: &Descriptor,
) -> Result<Vec<T>, RestoreError> {
    let main_tid = crate::procfs::own_namespace_pid(t.pid());
    if d.thread_set.main_tid_word {
        t.write_tid(d.clear_child_tid, main_tid)?;
    }
    if d.format_version >= 4 {
        rewrite_robust_owners(t, d.robust_list.0, d.thread_set.main_tid, main_tid)?;
    }
    start_threads(t, exec, d)
}

/// Set the main thread's registers (an interrupted syscall set to
/// restart), its XSAVE area and its signal mask, run `before_run` (the
/// child's CPU affinity put back: see `onecpu`), and detach: the other
/// threads first.
fn let_run<T: Tracer>(
    t: T,
    threads: Vec<T>,
    d: &Descriptor,
    before_run: impl FnOnce(),
) -> Result<(), RestoreError> {
    t.set_regs(&d.registers.restarted_in_child().to_user_regs())?;
    t.set_xstate(&d.xstate)?;
    t.set_sigmask(d.sigmask)?;
    before_run();
    for th in threads {
        th.detach()?;
    }
    t.detach()?;
    Ok(())
}

/// Most robust-list entries walked, as the kernel's `ROBUST_LIST_LIMIT`.
const ROBUST_LIST_LIMIT: usize = 2048;

/// The tid bits of a futex word (`FUTEX_TID_MASK`).
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// A thread's robust futexes (the mutexes it holds, linked from its robust
/// list head `head`, and the one pending) name their owner by tid: where
/// one names `old`, the thread's tid in the seed, write `new`, its tid in
/// the child. So the thread still owns what it held (it can unlock it, and
/// the kernel marks it `OWNER_DIED` should the thread exit holding it).
/// The list is the kernel's ABI: `{list, futex_offset, list_op_pending}`,
/// a circular list of `next` pointers back to the head.
pub(crate) fn rewrite_robust_owners<T: Tracer>(
    t: &T,
    head: u64,
    old: libc::pid_t,
    new: libc::pid_t,
) -> Result<(), RestoreError> {
    if head == 0 || old == new {
        return Ok(());
    }
    let offset = t.read_word(head + 8)? as i64;
    let fix = |entry: u64| -> Result<(), RestoreError> {
        let at = entry.wrapping_add(offset as u64);
        let w = t.read_word(at)?;
        let word = w as u32;
        if word & FUTEX_TID_MASK == old as u32 {
            t.write_tid(at, ((word & !FUTEX_TID_MASK) | new as u32) as libc::pid_t)?;
        }
        Ok(())
    };
    let mut entry = t.read_word(head)?;
    let mut n = 0;
    while entry != 0 && entry != head && n < ROBUST_LIST_LIMIT {
        fix(entry)?;
        entry = t.read_word(entry)?;
        n += 1;
    }
    let pending = t.read_word(head + 16)?;
    if pending != 0 {
        fix(pending)?;
    }
    Ok(())
}

/// Recreate the seed's other threads in the stopped child: each one cloned
/// from the main thread with the thread flags (its `clear_child_tid` set,
/// and its tid written there where the seed's thread kept its tid), held at
/// its first stop, given its robust list, rseq area, alternate signal
/// stack and name from inside itself, then its registers (an interrupted
/// syscall set to restart), XSAVE area and signal mask. Returned stopped:
/// the caller detaches them. A scratch page passes the structures and is
/// unmapped before any thread runs.
pub(crate) fn start_threads<T: Tracer>(
    t: &mut T,
    exec: &ExecutorArea,
    d: &Descriptor,
) -> Result<Vec<T>, RestoreError> {
    let others = &d.thread_set.others;
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let page = crate::PAGE_SIZE;
    let r = t.inject_syscall(
        exec.insn,
        &exec.base_regs,
        libc::SYS_mmap,
        [
            0,
            page,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    if (-4095..0).contains(&r.ret) {
        return Err(RestoreError::Step {
            what: "mapping a scratch page to start the threads".into(),
            detail: errno_text(r.ret),
        });
    }
    let scratch = r.ret as u64;
    let mut started = Vec::with_capacity(others.len());
    for th in others {
        let step = |what: &str, ret: i64| RestoreError::Step {
            what: format!("{what} of thread {} ({})", th.tid, th.comm),
            detail: errno_text(ret),
        };
        let mut flags = THREAD_FLAGS;
        if th.clear_child_tid != 0 {
            flags |= libc::CLONE_CHILD_CLEARTID as u64;
            if th.tid_word {
                flags |= libc::CLONE_CHILD_SETTID as u64;
            }
        }
        let r = t.inject_syscall(
            exec.insn,
            &exec.base_regs,
            libc::SYS_clone,
            [flags, th.registers.rsp, 0, th.clear_child_tid, 0, 0],
        )?;
        if r.ret < 0 {
            return Err(step("the clone()", r.ret));
        }
        let tid = r.new_child.ok_or_else(|| RestoreError::Step {
            what: format!("the clone() of thread {} ({})", th.tid, th.comm),
            detail: "no clone event for the new thread".into(),
        })?;
        let mut n = t.adopt_thread(tid)?;
        thread_state(&mut n, exec, scratch, th)?;
        rewrite_robust_owners(
            &n,
            th.robust_list.0,
            th.tid,
            crate::procfs::own_namespace_pid(tid),
        )?;
        started.push(n);
    }
    let r = t.inject_syscall(
        exec.insn,
        &exec.base_regs,
        libc::SYS_munmap,
        [scratch, page, 0, 0, 0, 0],
    )?;
    if r.ret != 0 {
        return Err(RestoreError::Step {
            what: "unmapping the threads' scratch page".into(),
            detail: errno_text(r.ret),
        });
    }
    Ok(started)
}

/// Give the new, stopped thread `n` the per-thread state of `th`.
fn thread_state<T: Tracer>(
    n: &mut T,
    exec: &ExecutorArea,
    scratch: u64,
    th: &ThreadState,
) -> Result<(), RestoreError> {
    let run = |n: &mut T, nr: i64, args: [u64; 6], what: &str| -> Result<(), RestoreError> {
        let r = n.inject_syscall(exec.insn, &exec.base_regs, nr, args)?;
        if (-4095..0).contains(&r.ret) {
            return Err(RestoreError::Step {
                what: format!("{what} in thread {} ({})", th.tid, th.comm),
                detail: errno_text(r.ret),
            });
        }
        Ok(())
    };
    let (head, len) = th.robust_list;
    if head != 0 {
        run(
            n,
            libc::SYS_set_robust_list,
            [head, len, 0, 0, 0, 0],
            "set_robust_list",
        )?;
    }
    if let Some(rs) = th.rseq {
        run(
            n,
            libc::SYS_rseq,
            [rs.ptr, rs.len as u64, 0, rs.signature as u64, 0, 0],
            "rseq",
        )?;
    }
    let ss = &th.sigaltstack;
    if ss.flags & libc::SS_DISABLE as u32 == 0 && ss.size > 0 {
        let flags = (ss.flags & !(libc::SS_ONSTACK as u32)) as u64;
        for (i, w) in [ss.sp, flags, ss.size].into_iter().enumerate() {
            n.poke(scratch + 8 * i as u64, w)?;
        }
        run(
            n,
            libc::SYS_sigaltstack,
            [scratch, 0, 0, 0, 0, 0],
            "sigaltstack",
        )?;
    }
    let mut name = [0u8; 16];
    let b = th.comm.as_bytes();
    let k = b.len().min(15);
    name[..k].copy_from_slice(&b[..k]);
    for (i, c) in name.chunks(8).enumerate() {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        n.poke(scratch + COMM_AT + 8 * i as u64, w)?;
    }
    run(
        n,
        libc::SYS_prctl,
        [libc::PR_SET_NAME as u64, scratch + COMM_AT, 0, 0, 0, 0],
        "prctl(PR_SET_NAME)",
    )?;
    n.set_regs(&th.registers.restarted_in_child().to_user_regs())?;
    n.set_xstate(&th.xstate)?;
    n.set_sigmask(th.sigmask)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::recorder::{Call, Recorder};
    use kernel_helpers::ptrace::PtraceError;

    const EXEC: ExecutorArea = ExecutorArea {
        insn: 0x7fff_f000,
        // SAFETY: user_regs_struct is plain integers; all zeros is valid.
        base_regs: unsafe { std::mem::zeroed() },
        base: 0x10_0000,
        len: 0x4000,
    };

    /// A seed stopped in `read` (syscall 0): the kernel reported
    /// -ERESTARTSYS with the `syscall` instruction just behind `rip`.
    fn interrupted() -> Descriptor {
        let mut d = crate::image::tests::sample();
        d.registers.orig_rax = 0;
        d.registers.rax = (-512i64) as u64; // ERESTARTSYS
        d.registers.rip = 0x401002;
        d.sigmask = 1 << 9;
        d.threads = 1;
        d.thread_set = Default::default();
        d
    }

    /// Run [`finish`] on `t`, logging the hook.
    fn run(t: Recorder, d: &Descriptor) -> (Result<(), RestoreError>, Vec<Call>) {
        let log = t.log.clone();
        let hook_log = log.clone();
        let run_log = log.clone();
        let r = finish(
            t,
            &EXEC,
            d,
            || {
                hook_log.borrow_mut().push(Call::Hook);
                Ok(())
            },
            || run_log.borrow_mut().push(Call::BeforeRun),
        );
        let calls = log.borrow().clone();
        (r, calls)
    }

    #[test]
    fn finish_unmaps_the_executor_then_restores_state_then_detaches() {
        let d = interrupted();
        let (r, calls) = run(Recorder::new(), &d);
        r.unwrap();
        assert_eq!(
            calls,
            vec![
                Call::Syscall(libc::SYS_munmap, [0x10_0000, 0x4000, 0, 0, 0, 0]),
                Call::Hook,
                // The interrupted read runs again: rax is its number, rip
                // is back on the `syscall` instruction.
                Call::SetRegs {
                    rip: 0x401000,
                    rax: 0
                },
                Call::SetXstate(vec![1, 2, 3]),
                Call::SetSigmask(1 << 9),
                Call::BeforeRun,
                Call::Detach,
            ]
        );
    }

    #[test]
    fn finish_kills_a_child_whose_executor_will_not_unmap() {
        let mut t = Recorder::new();
        t.syscall_ret = -(libc::EINVAL as i64);
        let (r, calls) = run(t, &interrupted());
        match r {
            Err(RestoreError::Step { what, detail }) => {
                assert_eq!(what, "unmapping the executor");
                assert!(detail.contains("Invalid argument"), "{detail}");
            }
            other => panic!("expected the unmap step to fail, got {other:?}"),
        }
        assert_eq!(
            calls,
            vec![
                Call::Syscall(libc::SYS_munmap, [0x10_0000, 0x4000, 0, 0, 0, 0]),
                Call::Dropped,
            ]
        );
    }

    #[test]
    fn finish_kills_a_child_whose_registers_cannot_be_set() {
        let mut t = Recorder::new();
        t.fail_at = Some(1); // the call after the unmap: set_regs
        let (r, calls) = run(t, &interrupted());
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                RestoreError::Ptrace(PtraceError::Request {
                    request: "SETREGS",
                    ..
                })
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("SETREGS"), "{e}");
        assert!(!calls.contains(&Call::Detach));
        assert_eq!(calls.last(), Some(&Call::Dropped));
    }

    #[test]
    fn finish_kills_the_child_when_the_hook_fails_and_sets_nothing() {
        let t = Recorder::new();
        let log = t.log.clone();
        let r: Result<(), _> = finish(
            t,
            &EXEC,
            &interrupted(),
            || {
                Err(RestoreError::Step {
                    what: "starting the pager".into(),
                    detail: "no".into(),
                })
            },
            || panic!("never runs"),
        );
        assert!(r.is_err());
        assert_eq!(
            *log.borrow(),
            vec![
                Call::Syscall(libc::SYS_munmap, [0x10_0000, 0x4000, 0, 0, 0, 0]),
                Call::Dropped,
            ]
        );
    }

    #[test]
    fn finish_at_each_later_step_leaves_the_child_killed() {
        // Tracer calls: 0 unmap, 1 regs, 2 xstate, 3 sigmask, 4 detach.
        for (fail_at, request) in [
            (1, "SETREGS"),
            (2, "SETREGSET NT_X86_XSTATE"),
            (3, "SETSIGMASK"),
            (4, "DETACH"),
        ] {
            let mut t = Recorder::new();
            t.fail_at = Some(fail_at);
            let (r, calls) = run(t, &interrupted());
            let e = r.unwrap_err();
            assert!(e.to_string().contains(request), "{fail_at}: {e}");
            // The unmap, the hook, the calls before the failing one (with
            // the hook before the child runs, if that was the detach), the
            // kill.
            let before_run = usize::from(request == "DETACH");
            assert_eq!(calls.len(), fail_at + 2 + before_run, "{calls:?}");
            assert!(!calls.contains(&Call::Detach));
            assert_eq!(calls.last(), Some(&Call::Dropped));
        }
    }

    /// A seed with one more thread, blocked in a futex wait
    /// (-ERESTARTSYS), whose tid word is glibc's.
    fn two_threads() -> Descriptor {
        let mut d = interrupted();
        let full = crate::image::tests::sample();
        d.threads = 2;
        d.thread_set = full.thread_set;
        d
    }

    #[test]
    fn finish_recreates_each_thread_with_its_state_before_any_thread_runs() {
        let d = two_threads();
        let th = &d.thread_set.others[0];
        let (r, calls) = run(Recorder::new(), &d);
        r.unwrap();
        let flags =
            THREAD_FLAGS | libc::CLONE_CHILD_CLEARTID as u64 | libc::CLONE_CHILD_SETTID as u64;
        let scratch = 0; // the recorder's mmap returns 0
        let name = u64::from_le_bytes(*b"worker\0\0");
        // Tracer calls are counted from 0 (the hook is none): the clone is
        // call 3 and the recorder makes its tid 2000 + 4.
        assert_eq!(
            calls,
            vec![
                Call::Syscall(libc::SYS_munmap, [0x10_0000, 0x4000, 0, 0, 0, 0]),
                Call::Hook,
                // The main thread's tid word gets the child's own tid.
                Call::Poke(d.clear_child_tid, 1234),
                Call::Syscall(libc::SYS_mmap, [0, 4096, 3, 0x22, u64::MAX, 0]),
                Call::Syscall(
                    libc::SYS_clone,
                    [flags, th.registers.rsp, 0, th.clear_child_tid, 0, 0]
                ),
                Call::Adopt(2004),
                Call::Syscall(libc::SYS_set_robust_list, [0x7100, 24, 0, 0, 0, 0]),
                Call::Poke(scratch + COMM_AT, name),
                Call::Poke(scratch + COMM_AT + 8, 0),
                Call::Syscall(
                    libc::SYS_prctl,
                    [libc::PR_SET_NAME as u64, scratch + COMM_AT, 0, 0, 0, 0]
                ),
                // Its futex wait restarts.
                Call::SetRegs {
                    rip: 0x401100 - 2,
                    rax: 202
                },
                Call::SetXstate(vec![4, 5, 6]),
                Call::SetSigmask(1 << 9),
                Call::Syscall(libc::SYS_munmap, [scratch, 4096, 0, 0, 0, 0]),
            ]
            .into_iter()
            .chain(let_go_with_one_thread())
            .collect::<Vec<_>>()
        );
    }

    /// The last calls of a two-thread child's finish: the main thread's
    /// state (its read restarted), then the other thread let go first,
    /// then the main one.
    fn let_go_with_one_thread() -> Vec<Call> {
        vec![
            Call::SetRegs {
                rip: 0x401000,
                rax: 0,
            },
            Call::SetXstate(vec![1, 2, 3]),
            Call::SetSigmask(1 << 9),
            Call::BeforeRun,
            Call::Detach,
            Call::Detach,
        ]
    }

    /// A two-thread child whose other thread was made ahead: (its
    /// descriptor, the main thread, the others, how many calls that took).
    fn made_ahead() -> (Descriptor, Recorder, Vec<Recorder>, usize) {
        let d = two_threads();
        let mut t = Recorder::new();
        let threads = threads_ahead(&mut t, &EXEC, &d).unwrap();
        let ahead = t.log.borrow().len();
        (d, t, threads, ahead)
    }

    #[test]
    fn threads_made_ahead_run_only_after_the_executor_is_gone_and_the_main_thread_is_set() {
        // A spare's threads are made before its spawn (the executor still
        // mapped); its spawn then unmaps the executor, sets the main
        // thread, and lets the others go before it.
        let (d, t, threads, ahead) = made_ahead();
        assert_eq!(threads.len(), 1);
        let log = t.log.clone();
        {
            let calls = log.borrow();
            assert_eq!(calls[0], Call::Poke(d.clear_child_tid, 1234));
            assert!(matches!(calls[1], Call::Syscall(libc::SYS_mmap, _)));
            assert!(!calls.contains(&Call::Detach));
            assert!(!calls.contains(&Call::Syscall(
                libc::SYS_munmap,
                [0x10_0000, 0x4000, 0, 0, 0, 0]
            )));
        }
        finish_with_threads(t, threads, &EXEC, &d, || ()).unwrap();
        assert_eq!(
            log.borrow()[ahead..].to_vec(),
            [Call::Syscall(
                libc::SYS_munmap,
                [0x10_0000, 0x4000, 0, 0, 0, 0]
            )]
            .into_iter()
            .chain(let_go_with_one_thread())
            .filter(|c| *c != Call::BeforeRun)
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_spare_whose_executor_will_not_unmap_is_killed_with_its_threads() {
        let (d, mut t, threads, ahead) = made_ahead();
        let log = t.log.clone();
        t.syscall_ret = -(libc::EINVAL as i64);
        let e = finish_with_threads(t, threads, &EXEC, &d, || ()).unwrap_err();
        assert!(e.to_string().contains("unmapping the executor"), "{e}");
        // Nothing let go: the thread and the main one dropped (killed),
        // the thread first.
        assert_eq!(
            log.borrow()[ahead..].to_vec(),
            vec![
                Call::Syscall(libc::SYS_munmap, [0x10_0000, 0x4000, 0, 0, 0, 0]),
                Call::Dropped,
                Call::Dropped,
            ]
        );
    }

    #[test]
    fn a_thread_that_cannot_be_set_up_leaves_the_child_killed() {
        // Fail each call from the tid write on: the main thread is dropped
        // last, which kills the child with any new thread; before the
        // detaches begin, nothing is let go.
        let d = two_threads();
        let (_, all) = run(Recorder::new(), &d);
        let total = all
            .iter()
            .filter(|c| !matches!(c, Call::Hook | Call::BeforeRun))
            .count();
        for fail_at in 2..total {
            let mut t = Recorder::new();
            t.fail_at = Some(fail_at);
            let (r, calls) = run(t, &d);
            assert!(r.is_err(), "{fail_at}: {calls:?}");
            if fail_at < total - 2 {
                assert!(!calls.contains(&Call::Detach), "{fail_at}: {calls:?}");
            }
            assert_eq!(calls.last(), Some(&Call::Dropped), "{fail_at}: {calls:?}");
        }
    }

    #[test]
    fn robust_futexes_a_thread_held_name_its_new_tid() {
        // head 0x1000 -> 0x2000 -> 0x3000 -> head; futex words 16 bytes
        // past each entry; one pending entry at 0x4000.
        let t = Recorder::new();
        let log = t.log.clone();
        {
            let mut m = t.memory.borrow_mut();
            m.extend([
                (0x1000, 0x2000),
                (0x1008, 16),
                (0x1010, 0x4000),
                (0x2000, 0x3000),
                (0x2010, 0x8000_0000 | 42), // held by 42, waiters queued
                (0x3000, 0x1000),
                (0x3010, 99), // another thread's
                (0x4010, 42),
            ]);
        }
        rewrite_robust_owners(&t, 0x1000, 42, 7).unwrap();
        assert_eq!(
            *log.borrow(),
            vec![
                Call::Poke(0x2010, (0x8000_0007u32 as libc::pid_t) as u64),
                Call::Poke(0x4010, 7),
            ]
        );
        // No list, or the same tid: nothing is read or written.
        rewrite_robust_owners(&t, 0, 42, 7).unwrap();
        rewrite_robust_owners(&t, 0x1000, 42, 42).unwrap();
        assert_eq!(log.borrow().len(), 2);
        drop(t);
    }
}
