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
    /// A step of setting up its container failed (before its exec).
    #[error("cannot set up the child's container: {step}: {source}")]
    Setup {
        /// The step, as the caller gave it.
        step: String,
        /// The underlying error.
        source: io::Error,
    },
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
    /// The container steps to run first ([`Isolation`]), and how many.
    steps: *const RawStep,
    n_steps: usize,
    /// errno of the step that failed before exec, 0 if it exec'd.
    err: AtomicI32,
    /// Which container step failed (an index into `steps`), or -1.
    failed_step: AtomicI32,
}

/// A child's own namespaces, and what is set up in them before the husk
/// execs (run by the starter, so as root in forkd's user namespace).
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// `CLONE_NEW*` flags for the clone.
    pub namespaces: libc::c_int,
    /// Run in order; the first failure fails the spawn, naming the step.
    pub steps: Vec<Setup>,
}

/// One step of a child's container setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setup {
    /// `mount(source, target, fstype, flags, data)`.
    Mount {
        /// The source ("tmpfs", "overlay", a path for a bind mount).
        source: String,
        /// Where.
        target: String,
        /// The filesystem type; empty for bind and propagation changes.
        fstype: String,
        /// `MS_*` flags.
        flags: u64,
        /// Filesystem options; may be empty.
        data: String,
    },
    /// `mkdir(path, mode)`; an existing directory is fine.
    Mkdir {
        /// The directory.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// `mknod(path, mode, dev)`.
    Mknod {
        /// The node.
        path: String,
        /// Type and permission bits.
        mode: u32,
        /// `makedev(major, minor)`.
        dev: u64,
    },
    /// `symlink(target, link)`; an existing link is fine.
    Symlink {
        /// What it points at.
        target: String,
        /// The link.
        link: String,
    },
    /// `sethostname`.
    Hostname(String),
    /// The loopback interface brought up.
    LoopbackUp,
}

const STEP_MOUNT: u32 = 1;
const STEP_MKDIR: u32 = 2;
const STEP_MKNOD: u32 = 3;
const STEP_SYMLINK: u32 = 4;
const STEP_HOSTNAME: u32 = 5;
const STEP_LO_UP: u32 = 6;

/// A [`Setup`] as the starter reads it: pointers into `CString`s the
/// spawning call keeps alive.
#[repr(C)]
struct RawStep {
    kind: u32,
    mode: u32,
    a: *const libc::c_char,
    b: *const libc::c_char,
    c: *const libc::c_char,
    d: *const libc::c_char,
    flags: u64,
}

/// The raw steps and the strings they point into.
fn raw_steps(steps: &[Setup]) -> io::Result<(Vec<RawStep>, Vec<std::ffi::CString>)> {
    let mut strings = Vec::new();
    let mut c = |s: &str| -> io::Result<*const libc::c_char> {
        let cs = std::ffi::CString::new(s).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} holds a NUL"))
        })?;
        let p = cs.as_ptr();
        // The CString's buffer does not move when the CString does.
        strings.push(cs);
        Ok(p)
    };
    let null = std::ptr::null();
    let mut raw = Vec::with_capacity(steps.len());
    for s in steps {
        raw.push(match s {
            Setup::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => RawStep {
                kind: STEP_MOUNT,
                mode: 0,
                a: c(source)?,
                b: c(target)?,
                c: if fstype.is_empty() { null } else { c(fstype)? },
                d: if data.is_empty() { null } else { c(data)? },
                flags: *flags,
            },
            Setup::Mkdir { path, mode } => RawStep {
                kind: STEP_MKDIR,
                mode: *mode,
                a: c(path)?,
                b: null,
                c: null,
                d: null,
                flags: 0,
            },
            Setup::Mknod { path, mode, dev } => RawStep {
                kind: STEP_MKNOD,
                mode: *mode,
                a: c(path)?,
                b: null,
                c: null,
                d: null,
                flags: *dev,
            },
            Setup::Symlink { target, link } => RawStep {
                kind: STEP_SYMLINK,
                mode: 0,
                a: c(target)?,
                b: c(link)?,
                c: null,
                d: null,
                flags: 0,
            },
            Setup::Hostname(h) => RawStep {
                kind: STEP_HOSTNAME,
                mode: 0,
                a: c(h)?,
                b: null,
                c: null,
                d: null,
                flags: h.len() as u64,
            },
            Setup::LoopbackUp => RawStep {
                kind: STEP_LO_UP,
                mode: 0,
                a: null,
                b: null,
                c: null,
                d: null,
                flags: 0,
            },
        });
    }
    Ok((raw, strings))
}

/// Run one step in the starter. Only raw syscalls.
///
/// # Safety
///
/// `s`'s pointers are NULL or NUL-terminated strings alive for the call.
unsafe fn run_step(s: &RawStep) -> libc::c_int {
    // SAFETY: the caller's contract; every call takes those strings or
    // plain integers, and `ifr` is a local the ioctls read and write.
    unsafe {
        match s.kind {
            STEP_MOUNT => libc::mount(s.a, s.b, s.c, s.flags as libc::c_ulong, s.d.cast()),
            STEP_MKDIR => {
                let r = libc::mkdir(s.a, s.mode as libc::mode_t);
                if r < 0 && *libc::__errno_location() == libc::EEXIST {
                    0
                } else {
                    r
                }
            }
            STEP_MKNOD => libc::mknod(s.a, s.mode as libc::mode_t, s.flags as libc::dev_t),
            STEP_SYMLINK => {
                let r = libc::symlink(s.a, s.b);
                if r < 0 && *libc::__errno_location() == libc::EEXIST {
                    0
                } else {
                    r
                }
            }
            STEP_HOSTNAME => libc::sethostname(s.a, s.flags as usize),
            STEP_LO_UP => {
                let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if sock < 0 {
                    return -1;
                }
                let mut ifr: libc::ifreq = std::mem::zeroed();
                for (i, b) in b"lo".iter().enumerate() {
                    ifr.ifr_name[i] = *b as libc::c_char;
                }
                let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr);
                if r == 0 {
                    ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                    r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
                }
                let e = *libc::__errno_location();
                libc::close(sock);
                *libc::__errno_location() = e;
                r
            }
            _ => {
                *libc::__errno_location() = libc::EINVAL;
                -1
            }
        }
    }
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
    // empty path and the arrays in `s`, alive and unchanged; `s.steps`
    // points at `s.n_steps` steps whose strings the spawning call keeps
    // alive until this execs or exits (run_step's contract).
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
        // The container, in the namespaces the clone made.
        for i in 0..s.n_steps {
            if run_step(&*s.steps.add(i)) < 0 {
                s.failed_step.store(i as i32, Ordering::Relaxed);
                return fail(s);
            }
        }
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
    spawn_in(stdin, stdout, stderr, None)
}

/// [`spawn`], in new namespaces set up by `isolation` (a container child)
/// when given.
pub fn spawn_in(
    stdin: Io,
    stdout: Io,
    stderr: Io,
    isolation: Option<&Isolation>,
) -> Result<Tracee, HuskError> {
    let exe = install()?;
    let stdio = [stdin, stdout, stderr];
    let (null, fds) = raw_stdio(&stdio).map_err(HuskError::Spawn)?;
    let no_steps: &[Setup] = &[];
    let steps = isolation.map_or(no_steps, |i| &i.steps);
    let (raw, _strings) = raw_steps(steps).map_err(|source| HuskError::Setup {
        step: "its arguments".into(),
        source,
    })?;
    let namespaces = isolation.map_or(0, |i| i.namespaces);
    let mut start = Start {
        exe: exe.as_raw_fd(),
        empty: c"".as_ptr(),
        argv: [MEMFD_NAME.as_ptr(), std::ptr::null()],
        envp: [std::ptr::null()],
        fds,
        steps: raw.as_ptr(),
        n_steps: raw.len(),
        err: AtomicI32::new(0),
        failed_step: AtomicI32::new(-1),
    };
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the stack top is inside `stack`, 16-byte aligned; `start`,
    // the steps it points at (`raw`, `_strings`) and `stack` outlive the clone (CLONE_VFORK: this thread waits until
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
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | namespaces,
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
        let source = io::Error::from_raw_os_error(err);
        if let Ok(i) = usize::try_from(start.failed_step.load(Ordering::Relaxed)) {
            return Err(HuskError::Setup {
                step: format!("{:?}", steps[i]),
                source,
            });
        }
        return Err(HuskError::Spawn(source));
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
