//! The C API over the crate's public surface (`include/remotefork.h`):
//! capture, open a seed (local or by reference), spawn children with
//! options, and wait for, signal and read them. Every function that can
//! fail returns NULL or -1 and leaves the reason for `rf_last_error()`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};

use crate::{Child, ExitReason, Prefetch, RemoteOptions, Seed, SpawnOptions, Stdio};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(msg: impl std::fmt::Display) {
    let text = msg.to_string().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(text).unwrap_or_default());
}

/// The reason the last failing `rf_` call on this thread failed ("" if
/// none); valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn rf_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A C string argument, or a recorded error naming the argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Option<&'a str> {
    if p.is_null() {
        fail(format!("{what} is NULL"));
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    match unsafe { CStr::from_ptr(p) }.to_str() {
        Ok(s) => Some(s),
        Err(_) => {
            fail(format!("{what} is not UTF-8"));
            None
        }
    }
}

/// Capture process `pid` into the seed directory `dir`. 0, or -1.
///
/// # Safety
/// `dir` is a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn rf_capture(pid: c_int, dir: *const c_char) -> c_int {
    // SAFETY: forwarded from the caller.
    let Some(dir) = (unsafe { text(dir, "dir") }) else {
        return -1;
    };
    match crate::capture(pid, std::path::Path::new(dir), &Default::default()) {
        Ok(_) => 0,
        Err(e) => {
            fail(e);
            -1
        }
    }
}

/// Open the seed in directory `dir`; NULL on failure.
///
/// # Safety
/// `dir` is a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn rf_seed_open(dir: *const c_char) -> *mut Seed {
    // SAFETY: forwarded from the caller.
    let Some(dir) = (unsafe { text(dir, "dir") }) else {
        return std::ptr::null_mut();
    };
    match Seed::open(std::path::Path::new(dir)) {
        Ok(s) => Box::into_raw(Box::new(s)),
        Err(e) => {
            fail(e);
            std::ptr::null_mut()
        }
    }
}

/// Open a seed on another node by its reference `ADDR/ID#KEY`; NULL on
/// failure.
///
/// # Safety
/// `reference` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn rf_seed_open_remote(reference: *const c_char) -> *mut Seed {
    // SAFETY: forwarded from the caller.
    let Some(r) = (unsafe { text(reference, "reference") }) else {
        return std::ptr::null_mut();
    };
    let r = match r.parse() {
        Ok(r) => r,
        Err(e) => {
            fail(e);
            return std::ptr::null_mut();
        }
    };
    match Seed::open_remote(&r, &RemoteOptions::default()) {
        Ok(s) => Box::into_raw(Box::new(s)),
        Err(e) => {
            fail(e);
            std::ptr::null_mut()
        }
    }
}

/// Close a seed (NULL is ignored). Its children keep running.
///
/// # Safety
/// `seed` came from `rf_seed_open*` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn rf_seed_close(seed: *mut Seed) {
    if !seed.is_null() {
        // SAFETY: made by Box::into_raw in rf_seed_open*, closed once.
        drop(unsafe { Box::from_raw(seed) });
    }
}

/// Spawn options (`rf_spawn_opts_t`); `rf_spawn_opts_default` fills it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RfSpawnOpts {
    /// Serve memory on demand (1) or write it all first (0).
    pub lazy: c_int,
    /// 0 off, 1 window, 2 recorded working set.
    pub prefetch: c_int,
    /// Share the node cache between children (1).
    pub share: c_int,
    /// Fork from the node's template of the seed (1).
    pub from_template: c_int,
}

/// Fill `opts` with the defaults (lazy, window, shared, template).
///
/// # Safety
/// `opts` points to an `rf_spawn_opts_t`.
#[no_mangle]
pub unsafe extern "C" fn rf_spawn_opts_default(opts: *mut RfSpawnOpts) {
    if opts.is_null() {
        return;
    }
    let d = SpawnOptions::default();
    // SAFETY: the caller passes a valid rf_spawn_opts_t.
    unsafe {
        *opts = RfSpawnOpts {
            lazy: d.lazy as c_int,
            prefetch: 1,
            share: d.share as c_int,
            from_template: d.template as c_int,
        }
    };
}

/// `RF_STDIO_NULL`: the stream is /dev/null.
pub const RF_STDIO_NULL: c_int = -1;
/// `RF_STDIO_INHERIT`: the caller's own.
pub const RF_STDIO_INHERIT: c_int = -2;
/// `RF_STDIO_PIPED`: a new pipe (`rf_child_take_fd` gives the caller's end).
pub const RF_STDIO_PIPED: c_int = -3;

fn stdio(fd: c_int) -> Result<Stdio, String> {
    Ok(match fd {
        RF_STDIO_NULL => Stdio::Null,
        RF_STDIO_INHERIT => Stdio::Inherit,
        RF_STDIO_PIPED => Stdio::Piped,
        fd if fd >= 0 => {
            // The child gets a copy; the caller keeps its descriptor.
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor number.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if d < 0 {
                return Err(format!(
                    "descriptor {fd}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: a fresh descriptor we own.
            Stdio::Fd(unsafe { OwnedFd::from_raw_fd(d) })
        }
        other => {
            return Err(format!(
                "{other} is not a descriptor nor an RF_STDIO_ value"
            ))
        }
    })
}

/// Start a child of `seed`. Each stream is a descriptor (the child gets a
/// copy) or `RF_STDIO_NULL`/`RF_STDIO_INHERIT`/`RF_STDIO_PIPED`. `opts`
/// NULL: the defaults. NULL on failure. The calling thread must outlive a
/// lazy child (it dies with it); the caller reaps it (`rf_child_wait`).
///
/// # Safety
/// `seed` came from `rf_seed_open*`; `opts` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn rf_spawn(
    seed: *const Seed,
    opts: *const RfSpawnOpts,
    stdin_fd: c_int,
    stdout_fd: c_int,
    stderr_fd: c_int,
) -> *mut Child {
    if seed.is_null() {
        fail("seed is NULL");
        return std::ptr::null_mut();
    }
    // SAFETY: a live seed from rf_seed_open*.
    let seed = unsafe { &*seed };
    let o = if opts.is_null() {
        SpawnOptions::default()
    } else {
        // SAFETY: the caller passes a valid rf_spawn_opts_t.
        let c = unsafe { *opts };
        let prefetch = match c.prefetch {
            0 => Prefetch::Off,
            1 => Prefetch::Window,
            2 => Prefetch::Recorded,
            p => {
                fail(format!(
                    "prefetch {p} is not 0 (off), 1 (window) or 2 (recorded)"
                ));
                return std::ptr::null_mut();
            }
        };
        SpawnOptions::default()
            .lazy(c.lazy != 0)
            .prefetch(prefetch)
            .share(c.share != 0)
            .template(c.from_template != 0)
    };
    let streams: Result<Vec<Stdio>, String> = [stdin_fd, stdout_fd, stderr_fd]
        .into_iter()
        .zip(["stdin", "stdout", "stderr"])
        .map(|(fd, name)| stdio(fd).map_err(|m| format!("{name}: {m}")))
        .collect();
    let mut streams = match streams {
        Ok(s) => s.into_iter(),
        Err(m) => {
            fail(m);
            return std::ptr::null_mut();
        }
    };
    let (Some(i), Some(o_), Some(e)) = (streams.next(), streams.next(), streams.next()) else {
        fail("three streams expected");
        return std::ptr::null_mut();
    };
    match seed.spawn(i, o_, e, &o) {
        Ok(c) => Box::into_raw(Box::new(c)),
        Err(e) => {
            fail(e);
            std::ptr::null_mut()
        }
    }
}

/// The child's pid.
///
/// # Safety
/// `child` came from `rf_spawn`.
#[no_mangle]
pub unsafe extern "C" fn rf_child_pid(child: *const Child) -> c_int {
    if child.is_null() {
        fail("child is NULL");
        return -1;
    }
    // SAFETY: a live child from rf_spawn.
    unsafe { &*child }.pid()
}

/// Take the caller's end of a piped stream (0 stdin, 1 stdout, 2 stderr):
/// a descriptor the caller now owns, or -1.
///
/// # Safety
/// `child` came from `rf_spawn`.
#[no_mangle]
pub unsafe extern "C" fn rf_child_take_fd(child: *mut Child, stream: c_int) -> c_int {
    if child.is_null() {
        fail("child is NULL");
        return -1;
    }
    // SAFETY: a live child from rf_spawn, used by one thread at a time.
    let c = unsafe { &mut *child };
    let f = match stream {
        0 => c.take_stdin(),
        1 => c.take_stdout(),
        2 => c.take_stderr(),
        s => {
            fail(format!("stream {s} is not 0, 1 or 2"));
            return -1;
        }
    };
    match f {
        Some(f) => f.into_raw_fd(),
        None => {
            fail(format!(
                "stream {stream} of child {} is not piped, or was taken",
                c.pid()
            ));
            -1
        }
    }
}

/// Send signal `sig` to the child (through its pidfd). 0, or -1.
///
/// # Safety
/// `child` came from `rf_spawn`.
#[no_mangle]
pub unsafe extern "C" fn rf_child_signal(child: *const Child, sig: c_int) -> c_int {
    if child.is_null() {
        fail("child is NULL");
        return -1;
    }
    // SAFETY: a live child from rf_spawn.
    match unsafe { &*child }.signal(sig) {
        Ok(()) => 0,
        Err(e) => {
            fail(e);
            -1
        }
    }
}

/// Wait for the child to end and reap it. Returns its exit status (0 to
/// 255), or 128 + the signal that killed it; -1 on failure. When the
/// library killed it (a page could not be served), the reason is also
/// left for `rf_last_error()` and 128 + SIGKILL returned.
///
/// # Safety
/// `child` came from `rf_spawn`.
#[no_mangle]
pub unsafe extern "C" fn rf_child_wait(child: *mut Child) -> c_int {
    if child.is_null() {
        fail("child is NULL");
        return -1;
    }
    // SAFETY: a live child from rf_spawn, used by one thread at a time.
    match unsafe { &mut *child }.wait() {
        Ok(ExitReason::Exited(c)) => c,
        Ok(ExitReason::Signaled(s)) => 128 + s,
        Ok(ExitReason::KilledByPager(why)) => {
            fail(format!("killed by the pager: {why}"));
            128 + libc::SIGKILL
        }
        Ok(r @ ExitReason::OutOfMemory { .. }) => {
            fail(r.to_string());
            128 + libc::SIGKILL
        }
        Err(e) => {
            fail(e);
            -1
        }
    }
}

/// Free the handle (NULL is ignored). A child not yet waited for keeps
/// running.
///
/// # Safety
/// `child` came from `rf_spawn` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn rf_child_free(child: *mut Child) {
    if !child.is_null() {
        // SAFETY: made by Box::into_raw in rf_spawn, freed once.
        drop(unsafe { Box::from_raw(child) });
    }
}
