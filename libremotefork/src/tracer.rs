//! The ptrace seam: the [`Tracer`] operations that orchestration (the end
//! of a restore, the freeze of a capture) uses on a stopped process.
//! Implemented by [`Tracee`]; the unit tests implement it with a recording
//! double (`recorder::Recorder`), so the order of those operations is
//! tested without root.

use kernel_helpers::ptrace::{PtraceError, SyscallResult, Tracee};

/// The ptrace operations used on a stopped process by the orchestration
/// above. Implemented by [`Tracee`].
pub(crate) trait Tracer {
    /// Run one syscall in the stopped process (see [`Tracee::inject_syscall`]).
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
    /// Let the process run on. A tracer dropped without this kills it if it
    /// was made with `kill_on_drop` (a restore's child), else detaches it
    /// (a captured parent).
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

#[cfg(test)]
pub(crate) mod recorder {
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
        /// Dropped without detaching (a restore's child is killed then).
        Dropped,
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
                self.log.borrow_mut().push(Call::Dropped);
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
}
