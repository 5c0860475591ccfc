//! ptrace: seizing a process, reading and writing its CPU state, and running
//! single syscalls inside it (syscall injection).
//!
//! A [`Tracee`] is one seized thread. Syscall injection points the thread's
//! `rip` at an existing `syscall` instruction (remotefork uses one found in the
//! `[vdso]`, so no code is ever written into the target), steps it through the
//! syscall-enter and syscall-exit stops, and reads the result from `rax`.

use std::io;

use libc::{c_long, c_void, pid_t, user_regs_struct};

use crate::last_os_error;

/// `PTRACE_GETSIGMASK` (not exported by every libc version).
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
/// `PTRACE_SETSIGMASK`.
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// `NT_X86_XSTATE`: the XSAVE area regset.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Largest XSAVE area we accept (AMX tiles make it about 11 KiB).
const XSTATE_MAX: usize = 16 * 1024;

/// The `rax` value of a syscall stop (`SIGTRAP | 0x80` with `PTRACE_O_TRACESYSGOOD`).
const SYSCALL_STOP_SIG: i32 = libc::SIGTRAP | 0x80;

/// Errors of ptrace operations.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    /// The process does not exist (any more).
    #[error("process {pid} does not exist")]
    NoSuchProcess {
        /// The pid.
        pid: pid_t,
    },
    /// ptrace was refused.
    #[error("not permitted to trace process {pid} (need root or CAP_SYS_PTRACE, and the process must not be traced already): {source}")]
    NotPermitted {
        /// The pid.
        pid: pid_t,
        /// The underlying error.
        source: io::Error,
    },
    /// The process exited or was killed while it was being traced.
    #[error("process {pid} went away while being traced ({how})")]
    Gone {
        /// The pid.
        pid: pid_t,
        /// Exit code or signal, in words.
        how: String,
    },
    /// A ptrace request failed.
    #[error("ptrace {request} on process {pid} failed: {source}")]
    Request {
        /// The request's name.
        request: &'static str,
        /// The pid.
        pid: pid_t,
        /// The underlying error.
        source: io::Error,
    },
    /// The tracee stopped in a way the protocol did not expect.
    #[error("process {pid}: unexpected ptrace stop while {during} (wait status {status:#x})")]
    UnexpectedStop {
        /// The pid.
        pid: pid_t,
        /// What we were doing.
        during: &'static str,
        /// The raw wait status.
        status: i32,
    },
}

/// The result of one `waitpid` on a tracee, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Syscall-enter or syscall-exit stop.
    Syscall,
    /// A `PTRACE_EVENT_*` stop; `event` is the event number.
    Event {
        /// `PTRACE_EVENT_*`.
        event: i32,
        /// The stop signal.
        sig: i32,
    },
    /// A signal-delivery stop: the signal is about to be delivered.
    Signal(i32),
    /// The process exited with this code.
    Exited(i32),
    /// The process was killed by this signal.
    Killed(i32),
}

impl Stop {
    fn decode(status: i32) -> Stop {
        if libc::WIFEXITED(status) {
            Stop::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Stop::Killed(libc::WTERMSIG(status))
        } else {
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            if sig == SYSCALL_STOP_SIG {
                Stop::Syscall
            } else if event != 0 {
                Stop::Event { event, sig }
            } else {
                Stop::Signal(sig)
            }
        }
    }
}

/// The rseq registration of a thread, as `PTRACE_GET_RSEQ_CONFIGURATION` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the registered `struct rseq` (0: none).
    pub rseq_abi_pointer: u64,
    /// Its registered size.
    pub rseq_abi_size: u32,
    /// The abort signature.
    pub signature: u32,
    /// Registration flags.
    pub flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct RawRseqConfig {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// Raw ptrace call. Returns the kernel's return value or the OS error.
///
/// # Safety
/// `addr` and `data` must be valid for what `request` does with them
/// (a pointer to a correctly sized, writable buffer where the request writes).
unsafe fn ptrace_raw(
    request: libc::c_uint,
    pid: pid_t,
    addr: *mut c_void,
    data: *mut c_void,
) -> io::Result<c_long> {
    // SAFETY: the caller guarantees addr/data are valid for `request`.
    let r = unsafe { libc::ptrace(request, pid, addr, data) };
    if r == -1 {
        let e = last_os_error();
        // PEEK requests legitimately return -1; callers of those clear errno first.
        if e.raw_os_error() != Some(0) {
            return Err(e);
        }
    }
    Ok(r)
}

/// `waitpid(pid, __WALL)`, retried on `EINTR`.
pub fn wait(pid: pid_t) -> io::Result<Stop> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid, writable int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(Stop::decode(status));
    }
}

/// One thread seized with `PTRACE_SEIZE`.
///
/// Dropping a `Tracee` detaches it (or kills it, if [`Tracee::kill_on_drop`]
/// was called); errors during drop are logged, not raised.
#[derive(Debug)]
pub struct Tracee {
    pid: pid_t,
    attached: bool,
    kill_on_drop: bool,
    /// Signals that arrived while the tracee was under our control; they are
    /// re-sent when it is detached so the process does not lose them.
    stashed_signals: Vec<i32>,
}

impl Tracee {
    /// Seize `pid` with `PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK`.
    /// The tracee keeps running until [`Tracee::interrupt`].
    pub fn seize(pid: pid_t) -> Result<Tracee, PtraceError> {
        let opts =
            libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEFORK;
        // SAFETY: PTRACE_SEIZE takes options in `data` and ignores `addr`.
        let r = unsafe {
            ptrace_raw(
                libc::PTRACE_SEIZE,
                pid,
                std::ptr::null_mut(),
                opts as usize as *mut c_void,
            )
        };
        match r {
            Ok(_) => Ok(Tracee {
                pid,
                attached: true,
                kill_on_drop: false,
                stashed_signals: Vec::new(),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                Err(PtraceError::NoSuchProcess { pid })
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                Err(PtraceError::NotPermitted { pid, source: e })
            }
            Err(e) => Err(PtraceError::Request {
                request: "SEIZE",
                pid,
                source: e,
            }),
        }
    }

    /// Wrap a thread that was auto-attached (e.g. the child of a traced `fork`).
    /// It must already be in a ptrace stop or about to report one.
    pub fn adopt(pid: pid_t) -> Tracee {
        Tracee {
            pid,
            attached: true,
            kill_on_drop: false,
            stashed_signals: Vec::new(),
        }
    }

    /// The traced thread's id.
    pub fn pid(&self) -> pid_t {
        self.pid
    }

    /// Kill the tracee instead of detaching it when dropped.
    pub fn kill_on_drop(&mut self) {
        self.kill_on_drop = true;
    }

    /// Set `PTRACE_O_EXITKILL` in addition to the seize options, so the
    /// tracee dies if this process does.
    pub fn set_exit_kill(&self) -> Result<(), PtraceError> {
        let opts = libc::PTRACE_O_TRACESYSGOOD
            | libc::PTRACE_O_TRACECLONE
            | libc::PTRACE_O_TRACEFORK
            | libc::PTRACE_O_EXITKILL;
        // SAFETY: PTRACE_SETOPTIONS takes options in `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETOPTIONS,
                self.pid,
                std::ptr::null_mut(),
                opts as usize as *mut c_void,
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("SETOPTIONS", e))
    }

    fn req_err(&self, request: &'static str, source: io::Error) -> PtraceError {
        if source.raw_os_error() == Some(libc::ESRCH) {
            PtraceError::Gone {
                pid: self.pid,
                how: format!("{request} returned ESRCH"),
            }
        } else {
            PtraceError::Request {
                request,
                pid: self.pid,
                source,
            }
        }
    }

    fn gone(&self, stop: Stop) -> PtraceError {
        let how = match stop {
            Stop::Exited(c) => format!("exited with status {c}"),
            Stop::Killed(s) => format!("killed by signal {s}"),
            other => format!("{other:?}"),
        };
        PtraceError::Gone { pid: self.pid, how }
    }

    /// Wait for the next stop. Exit and death become [`PtraceError::Gone`].
    fn wait_alive(&self) -> Result<Stop, PtraceError> {
        let stop = wait(self.pid).map_err(|e| self.req_err("waitpid", e))?;
        match stop {
            Stop::Exited(_) | Stop::Killed(_) => Err(self.gone(stop)),
            s => Ok(s),
        }
    }

    fn resume(&self, request: libc::c_uint, name: &'static str) -> Result<(), PtraceError> {
        // SAFETY: resume requests take a signal number (0 here) in `data`.
        unsafe {
            ptrace_raw(
                request,
                self.pid,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err(name, e))
    }

    /// Stop the tracee with `PTRACE_INTERRUPT` and wait until it is in the
    /// resulting `PTRACE_EVENT_STOP`. Signals that arrive first are stashed.
    pub fn interrupt(&mut self) -> Result<(), PtraceError> {
        self.request_interrupt()?;
        self.wait_event_stop("waiting for the interrupt stop")
    }

    /// Send `PTRACE_INTERRUPT` without waiting: stopping several threads
    /// at once, the caller waits for each with [`Tracee::wait_event_stop`].
    pub fn request_interrupt(&self) -> Result<(), PtraceError> {
        // SAFETY: PTRACE_INTERRUPT takes no pointers.
        unsafe {
            ptrace_raw(
                libc::PTRACE_INTERRUPT,
                self.pid,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("INTERRUPT", e))
    }

    /// `PTRACE_INTERRUPT` again while waiting for an interrupt's stop.
    /// Harmless if one is pending; fails (ignored) for a tracee not
    /// seized.
    fn reinterrupt(&self) {
        let _ = self.request_interrupt();
    }

    /// Wait for the first stop of a thread auto-attached by a traced
    /// `clone`: `PTRACE_EVENT_STOP` if its creator was seized, `SIGSTOP`
    /// if it was attached with `PTRACE_TRACEME` (a husk).
    pub fn wait_new_thread(&mut self) -> Result<(), PtraceError> {
        loop {
            match self.wait_alive()? {
                Stop::Event { event, .. } if event == libc::PTRACE_EVENT_STOP => return Ok(()),
                Stop::Signal(libc::SIGSTOP) => return Ok(()),
                Stop::Signal(sig) => {
                    self.stashed_signals.push(sig);
                    self.resume(libc::PTRACE_CONT, "CONT")?;
                }
                s => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid,
                        during: "waiting for a new thread's first stop",
                        status: s.raw(),
                    })
                }
            }
        }
    }

    /// Forget a thread that has exited (its death was already collected):
    /// nothing is detached or killed on drop.
    pub fn forget(mut self) {
        self.attached = false;
    }

    /// Wait for a `PTRACE_EVENT_STOP` (initial stop of an auto-attached child,
    /// or an interrupt), stashing any signal that is delivered first.
    pub fn wait_event_stop(&mut self, during: &'static str) -> Result<(), PtraceError> {
        loop {
            match self.wait_alive()? {
                Stop::Event { event, .. } if event == libc::PTRACE_EVENT_STOP => return Ok(()),
                Stop::Signal(sig) => {
                    // Keep the signal for later and let the interrupt take effect.
                    self.stashed_signals.push(sig);
                    self.reinterrupt();
                    self.resume(libc::PTRACE_CONT, "CONT")?;
                }
                Stop::Syscall | Stop::Event { .. } => {
                    // An event stop (a clone the thread was making) may
                    // use up the pending interrupt: ask again, so the
                    // thread stops once that syscall is done.
                    tracing::debug!(pid = self.pid, during, "ignoring a stale stop");
                    self.reinterrupt();
                    self.resume(libc::PTRACE_CONT, "CONT")?;
                }
                s => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid,
                        during,
                        status: s.raw(),
                    })
                }
            }
        }
    }

    /// `PTRACE_GETREGS`.
    pub fn regs(&self) -> Result<user_regs_struct, PtraceError> {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut regs: user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETREGS writes exactly one user_regs_struct to `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_GETREGS,
                self.pid,
                std::ptr::null_mut(),
                (&mut regs as *mut user_regs_struct).cast(),
            )
        }
        .map_err(|e| self.req_err("GETREGS", e))?;
        Ok(regs)
    }

    /// `PTRACE_SETREGS`.
    pub fn set_regs(&self, regs: &user_regs_struct) -> Result<(), PtraceError> {
        let mut copy = *regs;
        // SAFETY: PTRACE_SETREGS reads exactly one user_regs_struct from `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETREGS,
                self.pid,
                std::ptr::null_mut(),
                (&mut copy as *mut user_regs_struct).cast(),
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("SETREGS", e))
    }

    /// The full XSAVE area (`PTRACE_GETREGSET NT_X86_XSTATE`).
    pub fn xstate(&self) -> Result<Vec<u8>, PtraceError> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, which is writable for iov_len bytes;
        // the kernel shrinks iov_len to what it wrote.
        unsafe {
            ptrace_raw(
                libc::PTRACE_GETREGSET,
                self.pid,
                NT_X86_XSTATE as usize as *mut c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map_err(|e| self.req_err("GETREGSET NT_X86_XSTATE", e))?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    /// Write the XSAVE area back (`PTRACE_SETREGSET NT_X86_XSTATE`).
    pub fn set_xstate(&self, xstate: &[u8]) -> Result<(), PtraceError> {
        let mut buf = xstate.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, readable for iov_len bytes.
        unsafe {
            ptrace_raw(
                libc::PTRACE_SETREGSET,
                self.pid,
                NT_X86_XSTATE as usize as *mut c_void,
                (&mut iov as *mut libc::iovec).cast(),
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("SETREGSET NT_X86_XSTATE", e))
    }

    /// The blocked-signal mask (`PTRACE_GETSIGMASK`).
    pub fn sigmask(&self) -> Result<u64, PtraceError> {
        let mut mask: u64 = 0;
        // SAFETY: GETSIGMASK writes `addr` (= 8) bytes to `data`.
        unsafe {
            ptrace_raw(
                PTRACE_GETSIGMASK,
                self.pid,
                8 as *mut c_void,
                (&mut mask as *mut u64).cast(),
            )
        }
        .map_err(|e| self.req_err("GETSIGMASK", e))?;
        Ok(mask)
    }

    /// Set the blocked-signal mask (`PTRACE_SETSIGMASK`).
    pub fn set_sigmask(&self, mask: u64) -> Result<(), PtraceError> {
        let mut m = mask;
        // SAFETY: SETSIGMASK reads `addr` (= 8) bytes from `data`.
        unsafe {
            ptrace_raw(
                PTRACE_SETSIGMASK,
                self.pid,
                8 as *mut c_void,
                (&mut m as *mut u64).cast(),
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("SETSIGMASK", e))
    }

    /// The rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`, Linux >= 5.13).
    pub fn rseq_config(&self) -> Result<RseqConfig, PtraceError> {
        let mut raw = RawRseqConfig::default();
        // SAFETY: the request writes at most `addr` bytes (the struct's size) to `data`.
        unsafe {
            ptrace_raw(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.pid,
                std::mem::size_of::<RawRseqConfig>() as *mut c_void,
                (&mut raw as *mut RawRseqConfig).cast(),
            )
        }
        .map_err(|e| self.req_err("GET_RSEQ_CONFIGURATION", e))?;
        Ok(RseqConfig {
            rseq_abi_pointer: raw.rseq_abi_pointer,
            rseq_abi_size: raw.rseq_abi_size,
            signature: raw.signature,
            flags: raw.flags,
        })
    }

    /// The message of the last event stop (`PTRACE_GETEVENTMSG`).
    pub fn event_msg(&self) -> Result<u64, PtraceError> {
        let mut msg: libc::c_ulong = 0;
        // SAFETY: GETEVENTMSG writes one unsigned long to `data`.
        unsafe {
            ptrace_raw(
                libc::PTRACE_GETEVENTMSG,
                self.pid,
                std::ptr::null_mut(),
                (&mut msg as *mut libc::c_ulong).cast(),
            )
        }
        .map_err(|e| self.req_err("GETEVENTMSG", e))?;
        Ok(msg)
    }

    /// Run one syscall inside the stopped tracee.
    ///
    /// `syscall_insn` is the address of a `syscall` instruction (`0f 05`)
    /// mapped executable in the tracee; `base` are the registers to start from
    /// (normally the tracee's own). The tracee's registers are left as the
    /// stop after the syscall has them: the caller restores what it needs.
    /// `orig_rax` is set to -1 before the first resume so the kernel does not
    /// apply syscall-restart logic to our modified registers.
    pub fn inject_syscall(
        &mut self,
        syscall_insn: u64,
        base: &user_regs_struct,
        nr: i64,
        args: [u64; 6],
    ) -> Result<SyscallResult, PtraceError> {
        let mut regs = *base;
        regs.rip = syscall_insn;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        self.set_regs(&regs)?;

        let mut new_child = None;
        // One stop, not two: single-stepping the `syscall` instruction
        // stops with SIGTRAP once it has returned (a syscall-exit stop of
        // PTRACE_SYSCALL would cost a syscall-entry stop first). A SIGTRAP
        // that was already pending stops it before the instruction ran: it
        // is held like any other signal, and the step goes on.
        loop {
            self.resume(libc::PTRACE_SINGLESTEP, "SINGLESTEP")?;
            match self.wait_alive()? {
                Stop::Signal(libc::SIGTRAP) => {
                    let after = self.regs()?;
                    if after.rip == syscall_insn + 2 {
                        return Ok(SyscallResult {
                            ret: after.rax as i64,
                            new_child,
                        });
                    }
                    self.stashed_signals.push(libc::SIGTRAP);
                }
                Stop::Event { event, .. }
                    if event == libc::PTRACE_EVENT_CLONE
                        || event == libc::PTRACE_EVENT_FORK
                        || event == libc::PTRACE_EVENT_VFORK =>
                {
                    let child = self.event_msg()?;
                    new_child = pid_t::try_from(child).ok();
                }
                Stop::Event { .. } | Stop::Syscall => {}
                Stop::Signal(sig) => {
                    // A signal arrived for the target; hold it until detach
                    // and resume without delivering it now.
                    self.stashed_signals.push(sig);
                }
                s => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid,
                        during: "injecting a syscall",
                        status: s.raw(),
                    })
                }
            }
        }
    }

    /// Set `regs`, continue, and wait until the tracee stops with `SIGTRAP`
    /// (an `int3`); other signals are held for re-sending at detach.
    /// Returns the registers at the trap.
    pub fn run_until_trap(
        &mut self,
        regs: &user_regs_struct,
    ) -> Result<user_regs_struct, PtraceError> {
        self.start_until_trap(regs)?;
        self.wait_trap()
    }

    /// Start what [`Tracee::run_until_trap`] runs and return at once: the
    /// tracee runs on its own until [`Tracee::wait_trap`] collects its stop.
    pub fn start_until_trap(&mut self, regs: &user_regs_struct) -> Result<(), PtraceError> {
        self.set_regs(regs)?;
        self.resume(libc::PTRACE_CONT, "CONT")
    }

    /// Wait for the `int3` of code started with
    /// [`Tracee::start_until_trap`]; its registers then. Signals that
    /// arrive first are stashed, as in [`Tracee::run_until_trap`].
    pub fn wait_trap(&mut self) -> Result<user_regs_struct, PtraceError> {
        loop {
            match self.wait_alive()? {
                Stop::Signal(libc::SIGTRAP) => return self.regs(),
                // The injected code faulted: resumed, it would fault again.
                s @ Stop::Signal(libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE) => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid,
                        during: "running injected code (it faulted)",
                        status: s.raw(),
                    })
                }
                Stop::Signal(sig) => self.stashed_signals.push(sig),
                Stop::Syscall | Stop::Event { .. } => {}
                s => {
                    return Err(PtraceError::UnexpectedStop {
                        pid: self.pid,
                        during: "running injected code",
                        status: s.raw(),
                    })
                }
            }
            self.resume(libc::PTRACE_CONT, "CONT")?;
        }
    }

    /// Read one word of the tracee's memory (`PTRACE_PEEKDATA`).
    pub fn peek(&self, addr: u64) -> Result<u64, PtraceError> {
        // SAFETY: errno is thread-local; clearing it lets us tell a -1 word from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: PEEKDATA reads the tracee's memory and takes no local pointers.
        let r = unsafe {
            ptrace_raw(
                libc::PTRACE_PEEKDATA,
                self.pid,
                addr as *mut c_void,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| self.req_err("PEEKDATA", e))?;
        Ok(r as u64)
    }

    /// The tracee's seccomp filters, oldest first (the order to install
    /// them in), each as its classic BPF instructions (8 bytes each, as
    /// `struct sock_filter`) and its flags (`PTRACE_SECCOMP_GET_FILTER`,
    /// `PTRACE_GET_SECCOMP_METADATA`; needs `CAP_SYS_ADMIN`). Empty when it
    /// has none.
    pub fn seccomp_filters(&self) -> Result<Vec<(Vec<u64>, u64)>, PtraceError> {
        const GET_FILTER: libc::c_uint = 0x420c;
        const GET_METADATA: libc::c_uint = 0x420d;
        let mut out = Vec::new();
        for index in 0u64.. {
            // SAFETY: a null data pointer asks only for the filter's length.
            let n = match unsafe {
                ptrace_raw(
                    GET_FILTER,
                    self.pid,
                    index as *mut c_void,
                    std::ptr::null_mut(),
                )
            } {
                Ok(n) => n as usize,
                // Past the last filter, or no filter mode at all.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {
                    break
                }
                Err(e) => return Err(self.req_err("SECCOMP_GET_FILTER", e)),
            };
            let mut insns = vec![0u64; n];
            // SAFETY: `insns` holds `n` 8-byte `sock_filter`s, as the kernel
            // just said this filter has.
            unsafe {
                ptrace_raw(
                    GET_FILTER,
                    self.pid,
                    index as *mut c_void,
                    insns.as_mut_ptr().cast(),
                )
            }
            .map_err(|e| self.req_err("SECCOMP_GET_FILTER", e))?;
            let mut meta = [index, 0u64];
            // SAFETY: `meta` is the kernel's `struct seccomp_metadata` (two
            // u64s), its size passed in `addr`.
            let flags = match unsafe {
                ptrace_raw(
                    GET_METADATA,
                    self.pid,
                    std::mem::size_of_val(&meta) as *mut c_void,
                    meta.as_mut_ptr().cast(),
                )
            } {
                Ok(_) => meta[1],
                Err(_) => 0,
            };
            out.push((insns, flags));
        }
        out.reverse();
        Ok(out)
    }

    /// Write one word of the tracee's memory (`PTRACE_POKEDATA`).
    pub fn poke(&self, addr: u64, word: u64) -> Result<(), PtraceError> {
        // SAFETY: POKEDATA writes `data` (a value, not a pointer) into the tracee.
        unsafe {
            ptrace_raw(
                libc::PTRACE_POKEDATA,
                self.pid,
                addr as *mut c_void,
                word as *mut c_void,
            )
        }
        .map(|_| ())
        .map_err(|e| self.req_err("POKEDATA", e))
    }

    /// Detach, letting the tracee run on, and re-send any signal that arrived
    /// while it was held.
    pub fn detach(mut self) -> Result<(), PtraceError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), PtraceError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        // SAFETY: PTRACE_DETACH takes a signal number (0) in `data`.
        let r = unsafe {
            ptrace_raw(
                libc::PTRACE_DETACH,
                self.pid,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if let Err(e) = r {
            if e.raw_os_error() == Some(libc::ESRCH) {
                // Only a stopped tracee can be detached, and ours always is:
                // ESRCH means it died. Collect its death so the real parent
                // can reap it (a dead tracee stays ours until we wait).
                self.reap_dead();
            }
            return Err(self.req_err("DETACH", e));
        }
        for sig in std::mem::take(&mut self.stashed_signals) {
            // SAFETY: plain kill(2) of a pid we traced.
            if unsafe { libc::kill(self.pid, sig) } != 0 {
                tracing::warn!(
                    pid = self.pid,
                    sig,
                    "could not re-send a signal held during capture"
                );
            }
        }
        Ok(())
    }

    fn reap_dead(&self) {
        loop {
            match wait(self.pid) {
                Ok(Stop::Exited(_) | Stop::Killed(_)) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    /// SIGKILL the tracee and reap the ptrace notification of its death.
    pub fn kill(mut self) -> Result<(), PtraceError> {
        self.kill_inner()
    }

    fn kill_inner(&mut self) -> Result<(), PtraceError> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        // SAFETY: plain kill(2).
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            let e = last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(self.req_err("kill", e));
        }
        loop {
            match wait(self.pid) {
                Ok(Stop::Exited(_) | Stop::Killed(_)) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(()),
                Err(e) => return Err(self.req_err("waitpid", e)),
            }
        }
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        let r = if self.kill_on_drop {
            self.kill_inner()
        } else {
            self.detach_inner()
        };
        if let Err(e) = r {
            tracing::warn!(pid = self.pid, error = %e, "cleaning up a tracee failed");
        }
    }
}

/// The outcome of an injected syscall.
#[derive(Debug, Clone, Copy)]
pub struct SyscallResult {
    /// The raw return value (negative errno on failure).
    pub ret: i64,
    /// The pid of a child created by an injected `fork`/`clone`.
    pub new_child: Option<pid_t>,
}

impl SyscallResult {
    /// The return value, or the errno as an [`io::Error`].
    pub fn result(&self) -> io::Result<u64> {
        if (-4095..0).contains(&self.ret) {
            Err(io::Error::from_raw_os_error(-self.ret as i32))
        } else {
            Ok(self.ret as u64)
        }
    }
}

impl Stop {
    /// The raw wait status this stop decodes from.
    pub fn raw(self) -> i32 {
        match self {
            Stop::Syscall => (SYSCALL_STOP_SIG << 8) | 0x7f,
            Stop::Event { event, sig } => (event << 16) | (sig << 8) | 0x7f,
            Stop::Signal(sig) => (sig << 8) | 0x7f,
            Stop::Exited(c) => c << 8,
            Stop::Killed(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(Stop::decode(3 << 8), Stop::Exited(3));
        assert_eq!(Stop::decode(9), Stop::Killed(9));
        assert_eq!(Stop::decode((SYSCALL_STOP_SIG << 8) | 0x7f), Stop::Syscall);
        assert_eq!(
            Stop::decode((libc::PTRACE_EVENT_STOP << 16) | (libc::SIGTRAP << 8) | 0x7f),
            Stop::Event {
                event: libc::PTRACE_EVENT_STOP,
                sig: libc::SIGTRAP
            }
        );
        assert_eq!(
            Stop::decode((libc::SIGCHLD << 8) | 0x7f),
            Stop::Signal(libc::SIGCHLD)
        );
        for s in [
            Stop::Syscall,
            Stop::Signal(10),
            Stop::Exited(1),
            Stop::Killed(9),
        ] {
            assert_eq!(Stop::decode(s.raw()), s);
        }
    }

    #[test]
    fn syscall_result_maps_errno() {
        let r = SyscallResult {
            ret: -(libc::EINVAL as i64),
            new_child: None,
        };
        assert_eq!(r.result().unwrap_err().raw_os_error(), Some(libc::EINVAL));
        let ok = SyscallResult {
            ret: 42,
            new_child: None,
        };
        assert_eq!(ok.result().unwrap(), 42);
    }
}
