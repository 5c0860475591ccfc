//! The ptrace seam of a restore's last steps: the [`Tracer`] operations
//! they use, and [`finish`], the one sequence both a child built from
//! scratch and a child forked from a template end with. The unit tests run
//! it against a recording double, without root.

use kernel_helpers::ptrace::{PtraceError, SyscallResult, Tracee};

use super::{errno_text, RestoreError};
use crate::image::Descriptor;

/// The ptrace operations the end of a restore uses on the stopped child.
/// Implemented by [`Tracee`]; the tests implement it with a recorder.
pub(crate) trait Tracer {
    /// Run one syscall in the stopped child (see [`Tracee::inject_syscall`]).
    fn inject_syscall(
        &mut self,
        syscall_insn: u64,
        base: &libc::user_regs_struct,
        nr: i64,
        args: [u64; 6],
    ) -> Result<SyscallResult, PtraceError>;
    /// `PTRACE_SETREGS`.
    fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), PtraceError>;
    /// `PTRACE_SETREGSET NT_X86_XSTATE`.
    fn set_xstate(&self, xstate: &[u8]) -> Result<(), PtraceError>;
    /// `PTRACE_SETSIGMASK`.
    fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError>;
    /// Let the child run on. A tracer dropped without this kills the child
    /// (restore tracees are made with `kill_on_drop`).
    fn detach(self) -> Result<(), PtraceError>;
}

impl Tracer for Tracee {
    fn inject_syscall(
        &mut self,
        syscall_insn: u64,
        base: &libc::user_regs_struct,
        nr: i64,
        args: [u64; 6],
    ) -> Result<SyscallResult, PtraceError> {
        Tracee::inject_syscall(self, syscall_insn, base, nr, args)
    }
    fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), PtraceError> {
        Tracee::set_regs(self, regs)
    }
    fn set_xstate(&self, xstate: &[u8]) -> Result<(), PtraceError> {
        Tracee::set_xstate(self, xstate)
    }
    fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError> {
        Tracee::set_sigmask(self, mask)
    }
    fn detach(self) -> Result<(), PtraceError> {
        Tracee::detach(self)
    }
}

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
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    /// One call a [`Recorder`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        /// An injected syscall: number and arguments.
        Syscall(i64, [u64; 6]),
        /// `set_regs`: the instruction pointer and `rax` set.
        SetRegs { rip: u64, rax: u64 },
        /// `set_xstate`.
        SetXstate(Vec<u8>),
        /// `set_sigmask`.
        SetSigmask(u64),
        /// `detach`.
        Detach,
        /// Dropped without detaching: the child is killed.
        Killed,
        /// The caller's hook between steps.
        Hook,
    }

    /// A [`Tracer`] that logs each call to a shared log and can be told to
    /// fail: call number `fail_at` (0-based) returns a ptrace error, and an
    /// injected syscall returns `syscall_ret`.
    pub(crate) struct Recorder {
        pub log: Rc<RefCell<Vec<Call>>>,
        pub fail_at: Option<usize>,
        pub syscall_ret: i64,
        calls: Cell<usize>,
        detached: bool,
    }

    impl Recorder {
        pub fn new() -> Recorder {
            Recorder {
                log: Rc::default(),
                fail_at: None,
                syscall_ret: 0,
                calls: Cell::new(0),
                detached: false,
            }
        }

        fn call(&self, c: Call, request: &'static str) -> Result<(), PtraceError> {
            let n = self.calls.replace(self.calls.get() + 1);
            if self.fail_at == Some(n) {
                return Err(PtraceError::Request {
                    request,
                    pid: 1234,
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            self.log.borrow_mut().push(c);
            Ok(())
        }
    }

    impl Drop for Recorder {
        fn drop(&mut self) {
            if !self.detached {
                self.log.borrow_mut().push(Call::Killed);
            }
        }
    }

    impl Tracer for Recorder {
        fn inject_syscall(
            &mut self,
            _insn: u64,
            _base: &libc::user_regs_struct,
            nr: i64,
            args: [u64; 6],
        ) -> Result<SyscallResult, PtraceError> {
            self.call(Call::Syscall(nr, args), "SYSCALL")?;
            Ok(SyscallResult {
                ret: self.syscall_ret,
                new_child: None,
            })
        }
        fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), PtraceError> {
            self.call(
                Call::SetRegs {
                    rip: regs.rip,
                    rax: regs.rax,
                },
                "SETREGS",
            )
        }
        fn set_xstate(&self, xstate: &[u8]) -> Result<(), PtraceError> {
            self.call(Call::SetXstate(xstate.to_vec()), "SETREGSET NT_X86_XSTATE")
        }
        fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError> {
            self.call(Call::SetSigmask(mask), "SETSIGMASK")
        }
        fn detach(mut self) -> Result<(), PtraceError> {
            self.call(Call::Detach, "DETACH")?;
            self.detached = true;
            Ok(())
        }
    }

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
                Call::Killed,
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
        assert_eq!(calls.last(), Some(&Call::Killed));
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
                Call::Killed,
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
            assert_eq!(calls.last(), Some(&Call::Killed));
        }
    }
}
