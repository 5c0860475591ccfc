//! The husk: a static, libc-free binary linked at a fixed address, started
//! under `PTRACE_TRACEME` and stopped at its exec. Restore rebuilds a seed's
//! process inside it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::ptrace::{self, Stop, Tracee};

/// The husk's bytes.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rf-husk"));

/// Address the husk's text is linked at.
pub const BASE: &str = env!("RF_HUSK_BASE");

/// Errors starting a husk.
#[derive(Debug, thiserror::Error)]
pub enum HuskError {
    /// Writing the husk binary out failed.
    #[error("cannot install the husk binary at {path}: {source}")]
    Install {
        /// Where.
        path: PathBuf,
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

/// Write the husk to a temporary directory once (named by a hash of its
/// bytes) and return its path. Safe to call from many threads at once: the
/// first call installs (under a lock), later ones only check the file is
/// still there.
pub fn install() -> Result<PathBuf, HuskError> {
    static INSTALLED: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = installed.as_ref() {
        if p.exists() {
            return Ok(p.clone());
        }
    }
    let h = BINARY.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    let dir = std::env::temp_dir().join(format!("remotefork-husk-{h:016x}"));
    let path = dir.join("rf-husk");
    if fs::read(&path).map(|b| b == BINARY).unwrap_or(false) {
        *installed = Some(path.clone());
        return Ok(path);
    }
    let err = |source| HuskError::Install {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(err)?;
    // Unique per process (other processes may install at the same time);
    // within this one the lock serialises.
    let tmp = dir.join(format!("rf-husk.{}", std::process::id()));
    fs::write(&tmp, BINARY).map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    *installed = Some(path.clone());
    Ok(path)
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
struct Start {
    path: CString,
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
    // the handler table is the starter's own copy); personality,
    // ptrace(TRACEME) and execve take no pointers but the NUL-terminated
    // path and arrays in `s`, alive and unchanged.
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
        // A fixed layout: every husk's stack and vDSO land in the same place.
        if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
            return fail(s);
        }
        if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
            return fail(s);
        }
        libc::execve(s.path.as_ptr(), s.argv.as_ptr(), s.envp.as_ptr());
    }
    fail(s)
}

/// Start a husk with the given stdio, traced by the calling thread and
/// stopped at its exec. It dies if the tracer does (`PTRACE_O_EXITKILL`).
///
/// It is started the way `posix_spawn` starts a program, with
/// `clone(CLONE_VM | CLONE_VFORK)`: no copy of forkd's page tables or
/// descriptor table, which `fork()` would make and which grow with every
/// child forkd serves. Signals are blocked around the clone, and the
/// starter resets every handler to the default before it unblocks them, so
/// no handler of ours ever runs on its stack.
pub fn spawn(stdin: Io, stdout: Io, stderr: Io) -> Result<Tracee, HuskError> {
    let path = install()?;
    let stdio = [stdin, stdout, stderr];
    let (null, fds) = raw_stdio(&stdio).map_err(HuskError::Spawn)?;
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| HuskError::Spawn(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let mut start = Start {
        argv: [cpath.as_ptr(), std::ptr::null()],
        envp: [std::ptr::null()],
        path: cpath.clone(),
        fds,
        err: AtomicI32::new(0),
    };
    start.argv[0] = start.path.as_ptr();
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
}
