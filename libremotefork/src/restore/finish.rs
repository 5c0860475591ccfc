//! The last steps of a restore, [`finish`]: the one sequence both a child
//! built from scratch and a child forked from a template end with. Written
//! over the [`Tracer`] seam, so the unit tests run it against a recording
//! double, without root.

use super::{errno_text, RestoreError};
use crate::image::Descriptor;
use crate::tracer::Tracer;

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
/// gone and before the child runs), then set the seed's registers (an
/// interrupted syscall set to restart), its XSAVE area and its signal
/// mask, and detach. On an error the tracer is dropped without detaching,
/// which kills the child.
pub(crate) fn finish<T: Tracer, R>(
    mut t: T,
    exec: &ExecutorArea,
    d: &Descriptor,
    before_start: impl FnOnce() -> Result<R, RestoreError>,
) -> Result<R, RestoreError> {
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
    let out = before_start()?;
    t.set_regs(&d.registers.restarted().to_user_regs())?;
    t.set_xstate(&d.xstate)?;
    t.set_sigmask(d.sigmask)?;
    t.detach()?;
    Ok(out)
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
        d
    }

    /// Run [`finish`] on `t`, logging the hook.
    fn run(t: Recorder, d: &Descriptor) -> (Result<(), RestoreError>, Vec<Call>) {
        let log = t.log.clone();
        let hook_log = log.clone();
        let r = finish(t, &EXEC, d, || {
            hook_log.borrow_mut().push(Call::Hook);
            Ok(())
        });
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
        let r: Result<(), _> = finish(t, &EXEC, &interrupted(), || {
            Err(RestoreError::Step {
                what: "starting the pager".into(),
                detail: "no".into(),
            })
        });
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
            // The unmap, the hook, the calls before the failing one, the kill.
            assert_eq!(calls.len(), fail_at + 2, "{calls:?}");
            assert!(!calls.contains(&Call::Detach));
            assert_eq!(calls.last(), Some(&Call::Dropped));
        }
    }
}
