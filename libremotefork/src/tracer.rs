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
    /// The traced thread's id.
    fn pid(&self) -> libc::pid_t;
    /// Write the 32-bit `tid` at `addr` with `process_vm_writev`, which
    /// (unlike `PTRACE_POKEDATA`) waits for a lazy child's pager to
    /// serve a missing page.
    fn write_tid(&self, addr: u64, tid: libc::pid_t) -> Result<(), PtraceError>;
    /// Read the word at `addr` with `process_vm_readv` (waits for a lazy
    /// child's pager, as [`Tracer::write_tid`]).
    fn read_word(&self, addr: u64) -> Result<u64, PtraceError>;
    /// `PTRACE_POKEDATA`.
    fn poke(&self, addr: u64, word: u64) -> Result<(), PtraceError>;
    /// Take over thread `tid`, just made by a `clone` injected here (and
    /// attached to us by `PTRACE_O_TRACECLONE`), once it is at its first
    /// stop. Dropped without [`Tracer::detach`], it kills the process.
    fn adopt_thread(&mut self, tid: libc::pid_t) -> Result<Self, PtraceError>
    where
        Self: Sized;
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
    fn pid(&self) -> libc::pid_t {
        Tracee::pid(self)
    }
    fn write_tid(&self, addr: u64, tid: libc::pid_t) -> Result<(), PtraceError> {
        let bytes = tid.to_le_bytes();
        kernel_helpers::mem::write_ranges(
            self.pid(),
            &[&bytes],
            &[kernel_helpers::mem::RemoteRange { addr, len: 4 }],
        )
        .map_err(|e| PtraceError::Request {
            request: "process_vm_writev",
            pid: self.pid(),
            source: std::io::Error::other(e.to_string()),
        })
    }
    fn read_word(&self, addr: u64) -> Result<u64, PtraceError> {
        let mut w = [0u8; 8];
        kernel_helpers::mem::read_ranges(
            self.pid(),
            &[kernel_helpers::mem::RemoteRange { addr, len: 8 }],
            &mut w,
        )
        .map_err(|e| PtraceError::Request {
            request: "process_vm_readv",
            pid: self.pid(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(u64::from_le_bytes(w))
    }
    fn poke(&self, addr: u64, word: u64) -> Result<(), PtraceError> {
        Tracee::poke(self, addr, word)
    }
    fn adopt_thread(&mut self, tid: libc::pid_t) -> Result<Self, PtraceError> {
        let mut t = Tracee::adopt(tid);
        t.kill_on_drop();
        t.wait_new_thread()?;
        Ok(t)
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
        /// `poke`: address and word.
        Poke(u64, u64),
        /// `adopt_thread`: a new thread's recorder starts logging.
        Adopt(libc::pid_t),
        /// `detach`.
        Detach,
        /// Dropped without detaching (a restore's child is killed then).
        Dropped,
        /// The caller's hook between steps.
        Hook,
        /// The caller's hook just before the child runs.
        BeforeRun,
    }

    /// A [`Tracer`] that logs each call to a shared log and can be told to
    /// fail: call number `fail_at` (0-based) returns a ptrace error, and an
    /// injected syscall returns `syscall_ret`.
    pub(crate) struct Recorder {
        pub log: Rc<RefCell<Vec<Call>>>,
        pub fail_at: Option<usize>,
        pub syscall_ret: i64,
        /// The thread this recorder stands for (new threads count up).
        pub tid: libc::pid_t,
        /// Words `read_word` finds (0 elsewhere), shared with new threads.
        pub memory: Rc<RefCell<std::collections::HashMap<u64, u64>>>,
        calls: Rc<Cell<usize>>,
        detached: bool,
    }

    impl Recorder {
        pub fn new() -> Recorder {
            Recorder {
                log: Rc::default(),
                fail_at: None,
                syscall_ret: 0,
                tid: 1234,
                memory: Rc::default(),
                calls: Rc::default(),
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
            let clone = nr == libc::SYS_clone && self.syscall_ret >= 0;
            let n = self.calls.get() as libc::pid_t;
            Ok(SyscallResult {
                ret: if clone {
                    2000 + n as i64
                } else {
                    self.syscall_ret
                },
                new_child: clone.then_some(2000 + n),
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
        fn pid(&self) -> libc::pid_t {
            self.tid
        }
        fn write_tid(&self, addr: u64, tid: libc::pid_t) -> Result<(), PtraceError> {
            self.call(Call::Poke(addr, tid as u64), "process_vm_writev")
        }
        fn read_word(&self, addr: u64) -> Result<u64, PtraceError> {
            Ok(self.memory.borrow().get(&addr).copied().unwrap_or(0))
        }
        fn poke(&self, addr: u64, word: u64) -> Result<(), PtraceError> {
            self.call(Call::Poke(addr, word), "POKEDATA")
        }
        fn adopt_thread(&mut self, tid: libc::pid_t) -> Result<Self, PtraceError> {
            self.call(Call::Adopt(tid), "waitpid")?;
            Ok(Recorder {
                log: self.log.clone(),
                fail_at: self.fail_at,
                syscall_ret: self.syscall_ret,
                tid,
                memory: self.memory.clone(),
                calls: self.calls.clone(),
                detached: false,
            })
        }
        fn detach(mut self) -> Result<(), PtraceError> {
            self.call(Call::Detach, "DETACH")?;
            self.detached = true;
            Ok(())
        }
    }
}
