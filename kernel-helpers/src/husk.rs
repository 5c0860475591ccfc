//! The husk: a static, libc-free binary linked at a fixed address, started
//! under `PTRACE_TRACEME` and stopped at its exec. Restore rebuilds a seed's
//! process inside it.

use std::ffi::CStr;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use crate::ptrace::{self, Stop, Tracee};

/// The husk's bytes.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rf-husk"));

/// Address the husk's text is linked at.
pub const BASE: &str = env!("RF_HUSK_BASE");

/// Name of the memfd holding the husk: `/proc/PID/exe` of a husk reads
/// `/memfd:rf-husk (deleted)`.
pub const MEMFD_NAME: &CStr = c"rf-husk";

/// The seals the husk's memfd carries: its content can never change again,
/// and no more seals can be added or removed.
pub const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// Errors starting a husk.
#[derive(Debug, thiserror::Error)]
pub enum HuskError {
    /// Putting the husk binary into its sealed memfd failed.
    #[error("cannot put the husk binary in a sealed memfd ({step}): {source}")]
    Install {
        /// Which step failed.
        step: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// Starting it failed.
    #[error("cannot start the husk: {0}")]
    Spawn(io::Error),
    /// It did not stop at its exec as expected.
    #[error("the husk (pid {pid}) did not stop at exec: {what}")]
    NoExecStop {
        /// Its pid.
        pid: i32,
        /// What happened instead.
        what: String,
    },
    /// A ptrace call failed.
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
}

/// The husk binary in a sealed memfd, made once per process and kept open
/// for its life (close-on-exec: no child inherits it). Husks are exec'd from
/// this descriptor, never from a path: nothing on the file system (a planted
/// directory or symlink in `/tmp`) can substitute another binary, and the
/// seals stop anyone, this process included, from changing it. A path to it,
/// if one is ever needed, is `/proc/self/fd/N` with N its raw descriptor.
///
/// Safe to call from many threads at once: two racing first calls may both
/// build a memfd, and all but the one kept are closed.
pub fn install() -> Result<BorrowedFd<'static>, HuskError> {
    static SEALED: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = SEALED.get() {
        return Ok(fd.as_fd());
    }
    let fd = sealed_memfd()?;
    let _ = SEALED.set(fd);
    let fd = SEALED.get().ok_or_else(|| HuskError::Install {
        step: "keeping it",
        source: io::Error::other("the process-wide husk descriptor is not set"),
    })?;
    Ok(fd.as_fd())
}

/// A new memfd holding [`BINARY`], sealed with [`SEALS`].
fn sealed_memfd() -> Result<OwnedFd, HuskError> {
    let err = |step| move |source| HuskError::Install { step, source };
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a NUL-terminated static string; memfd_create
    // returns a new descriptor or -1.
    let mut raw = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), flags | libc::MFD_EXEC) };
    if raw < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Before Linux 6.3 there is no MFD_EXEC: every memfd is executable.
        // SAFETY: as above.
        raw = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), flags) };
    }
    if raw < 0 {
        // EACCES here: vm.memfd_noexec = 2 forbids executable memfds.
        return Err(err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor memfd_create just returned, owned by
    // nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut f = fs::File::from(fd);
    f.write_all(BINARY).map_err(err("writing"))?;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
        return Err(err("sealing")(io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(f))
}

/// One of a husk's standard streams.
#[derive(Debug)]
pub enum Io {
    /// The caller's own.
    Inherit,
    /// `/dev/null`.
    Null,
    /// This descriptor (closed in the caller once the husk has it).
    Fd(OwnedFd),
}

impl Io {
    /// A descriptor (a pipe end, a file...).
    pub fn fd(f: impl Into<OwnedFd>) -> Io {
        Io::Fd(f.into())
    }
}

/// The raw descriptors of three streams (-1 for [`Io::Inherit`]), and the
/// `/dev/null` opened for them if any is [`Io::Null`] (keep it until the
/// descriptors have been used).
pub fn raw_stdio(stdio: &[Io; 3]) -> io::Result<(Option<fs::File>, [libc::c_int; 3])> {
    let null = if stdio.iter().any(|i| matches!(i, Io::Null)) {
        Some(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?,
        )
    } else {
        None
    };
    let fds = stdio.each_ref().map(|i| match i {
        Io::Inherit => -1,
        Io::Null => null.as_ref().map_or(-1, |f| f.as_raw_fd()),
        Io::Fd(f) => f.as_raw_fd(),
    });
    Ok((null, fds))
}

/// What the husk's starter needs, shared with it (it runs in our memory).
/// Everything is prepared before the clone: the starter allocates nothing.
struct Start {
    /// The sealed memfd holding the husk, exec'd with `AT_EMPTY_PATH`.
    exe: libc::c_int,
    /// The empty path `execveat` takes with `AT_EMPTY_PATH`.
    empty: *const libc::c_char,
    argv: [*const libc::c_char; 2],
    envp: [*const libc::c_char; 1],
    fds: [libc::c_int; 3],
    /// errno of the step that failed before exec, 0 if it exec'd.
    err: AtomicI32,
}

/// The starter: runs on its own stack in our address space (`CLONE_VM`),
/// while the calling thread is suspended (`CLONE_VFORK`) until it execs.
/// Only raw syscalls, no allocation, no locks.
extern "C" fn start_husk(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Start` that `spawn` keeps alive until this
    // returns or execs (the caller is suspended until then).
    let s = unsafe { &*arg.cast::<Start>() };
    let fail = |s: &Start| -> libc::c_int {
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        s.err.store(e, Ordering::Relaxed);
        // SAFETY: _exit never returns and touches no shared state.
        unsafe { libc::_exit(127) }
    };
    for (target, &fd) in s.fds.iter().enumerate() {
        let target = target as libc::c_int;
        if fd < 0 {
            continue;
        }
        // SAFETY: plain descriptor syscalls on descriptors `spawn` owns.
        let r = unsafe {
            if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            }
        };
        if r < 0 {
            return fail(s);
        }
    }
    // SAFETY: sigaction/sigprocmask on this task only (no CLONE_SIGHAND:
    // the handler table is the starter's own copy); setsid, personality,
    // ptrace(TRACEME) and execveat take no pointers but the NUL-terminated
    // empty path and the arrays in `s`, alive and unchanged.
    unsafe {
        // No handler of forkd's may run here: every disposition back to
        // the default, then signals unblocked (the exec stop is a SIGTRAP,
        // which must be deliverable).
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // A session and process group of its own, as is every restored
        // child and template built in it: a child's kill(0, sig) or a
        // signal to forkd's group from its terminal never crosses over.
        if libc::setsid() < 0 {
            return fail(s);
        }
        // A fixed layout: every husk's stack and vDSO land in the same place.
        if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
            return fail(s);
        }
        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            return fail(s);
        }
        // From the sealed memfd, by descriptor: no path to substitute.
        libc::syscall(
            libc::SYS_execveat,
            s.exe,
            s.empty,
            s.argv.as_ptr(),
            s.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    fail(s)
}

/// Start a husk with the given stdio, traced by the calling thread and
/// stopped at its exec. It dies if the tracer does (`PTRACE_O_EXITKILL`).
/// It is exec'd from the sealed memfd of [`install`], and leads a session
/// and process group of its own.
///
/// It is started the way `posix_spawn` starts a program, with
/// `clone(CLONE_VM | CLONE_VFORK)`: no copy of forkd's page tables or
/// descriptor table, which `fork()` would make and which grow with every
/// child forkd serves. Signals are blocked around the clone, and the
/// starter resets every handler to the default before it unblocks them, so
/// no handler of ours ever runs on its stack.
pub fn spawn(stdin: Io, stdout: Io, stderr: Io) -> Result<Tracee, HuskError> {
    let exe = install()?;
    let stdio = [stdin, stdout, stderr];
    let (null, fds) = raw_stdio(&stdio).map_err(HuskError::Spawn)?;
    let mut start = Start {
        exe: exe.as_raw_fd(),
        empty: c"".as_ptr(),
        argv: [MEMFD_NAME.as_ptr(), std::ptr::null()],
        envp: [std::ptr::null()],
        fds,
        err: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack top is inside `stack`, 16-byte aligned; `start`
    // and `stack` outlive the clone (CLONE_VFORK: this thread waits until
    // the starter has exec'd or exited); signals are blocked around it so
    // no handler runs on the starter's stack, and the mask is restored.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len());
        let top = (top as usize & !15) as *mut libc::c_void;
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            start_husk,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut start as *mut Start).cast::<libc::c_void>(),
        );
        let e = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(HuskError::Spawn(e));
        }
        pid
    };
    drop((stdio, null));
    let err = start.err.load(Ordering::Relaxed);
    if err != 0 {
        // It exited before exec: reap it.
        let _ = ptrace::wait(pid);
        return Err(HuskError::Spawn(io::Error::from_raw_os_error(err)));
    }
    let mut t = Tracee::adopt(pid);
    t.kill_on_drop();
    match ptrace::wait(pid).map_err(HuskError::Spawn)? {
        Stop::Signal(libc::SIGTRAP) => {}
        other => {
            return Err(HuskError::NoExecStop {
                pid,
                what: format!("{other:?}"),
            })
        }
    }
    t.set_exit_kill()?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn husk_is_a_small_static_elf() {
        assert_eq!(&BINARY[..4], b"\x7fELF");
        assert!(BINARY.len() < 16 * 1024);
        assert!(BASE.starts_with("0x"));
    }

    #[test]
    fn the_husk_is_one_sealed_memfd_holding_the_binary() {
        let fd = install().unwrap();
        assert_eq!(install().unwrap().as_raw_fd(), fd.as_raw_fd());
        // SAFETY: fcntl on a descriptor the static keeps open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(seals >= 0, "{}", io::Error::last_os_error());
        assert_eq!(seals & SEALS, SEALS, "seals {seals:#x}");
        // SAFETY: as above.
        let fdflags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0);
        let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy().starts_with("/memfd:rf-husk"),
            "{link:?}"
        );
        // Its content is the binary, and writing to it is refused.
        // (pread/pwrite: the descriptor's offset is shared with the static.)
        use std::os::unix::fs::FileExt;
        let f = fs::File::from(fd.try_clone_to_owned().unwrap());
        assert_eq!(f.metadata().unwrap().len(), BINARY.len() as u64);
        let mut back = vec![0u8; BINARY.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, BINARY);
        let e = f.write_at(b"x", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    }

    #[test]
    fn a_husk_leads_its_own_session_and_process_group() {
        let t = spawn(Io::Null, Io::Null, Io::Null).unwrap();
        let pid = t.pid();
        // SAFETY: getsid/getpgid take a pid and return a pid or -1.
        let (sid, pgid, ours) =
            unsafe { (libc::getsid(pid), libc::getpgid(pid), libc::getpgid(0)) };
        assert_eq!(sid, pid);
        assert_eq!(pgid, pid);
        assert_ne!(ours, pid);
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            exe.to_string_lossy().starts_with("/memfd:rf-husk"),
            "{exe:?}"
        );
    }
}
