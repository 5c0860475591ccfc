//! The cooperative API: `checkpoint()` returns twice, like `fork()`.
//!
//! [`checkpoint`] keeps fork semantics: only the calling thread is in the
//! seed, as only the calling thread is in a `fork()` child; the other
//! threads of the caller are not (a warning says how many).
//! [`checkpoint_all_threads`] keeps every thread instead: forkd captures
//! the caller itself from outside (its parent pauses for that) while the
//! calling thread waits for forkd's answer on its connection; in every
//! child that connection is the child's stdin, and the same wait returns
//! the child's first line. No atfork handler runs then: nothing is forked.
//!
//! With [`checkpoint`], the caller forks (so `pthread_atfork` handlers run
//! and the copy is single-threaded, exactly as with `fork()`); the copy waits reading its
//! stdin, and the caller asks forkd (over its cooperative Unix socket, one
//! JSON line each way) to make that copy a seed, then removes the copy and
//! returns [`Checkpoint::Parent`] with the seed id. Every child later
//! started from the seed resumes inside that read, with forkd-given stdin
//! whose first line names it, and returns [`Checkpoint::Child`].
//!
//! Every child is a new fork of the seed: functions given to
//! [`on_restore`] (C: `rf_on_restore`) run in it, in order, before
//! `checkpoint()` returns there, for per-child state (random seeds,
//! tokens, connection pools, ids). A seed captured from outside runs none:
//! nothing of ours runs when its children start.
//!
//! Protocol (also used by `python/remotefork`): request
//! `{"op":"create_seed","pid":N,"name":"..."}`, answer
//! `{"ok":true,"id":"...","key":"..."}` or `{"ok":false,"error":"..."}`;
//! a child's first stdin line is `{"instance_id":"...","index":K,"args":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_helpers::proc::{self as kproc, Forked};
use serde_json::{json, Value};

/// Where forkd's cooperative socket is unless `FORKD_COOP_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/forkd/forkd.sock.coop";

/// What `checkpoint()` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// In the caller: the seed it became.
    Parent {
        /// Seed id.
        seed_id: String,
        /// Seed key.
        key: String,
    },
    /// In a child started from the seed.
    Child {
        /// Its instance id.
        instance_id: String,
        /// Its index in its spawn.
        index: u32,
        /// The spawn's arguments.
        args: String,
    },
}

/// Errors of the cooperative API.
#[derive(Debug, thiserror::Error)]
pub enum CoopError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// forkd could not make the seed.
    #[error("forkd refused the checkpoint: {0}")]
    Refused(String),
    /// forkd answered something unexpected.
    #[error("forkd answered {0:?}")]
    Protocol(String),
    /// The forked copy never reached its wait.
    #[error("the forked copy (pid {0}) did not start waiting within 5 s")]
    NotReady(i32),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> CoopError {
    move |source| CoopError::Io { what, source }
}

/// A function run in every child, see [`on_restore`].
type RestoreHook = std::sync::Arc<dyn Fn() + Send + Sync>;

static RESTORE_HOOKS: std::sync::Mutex<Vec<RestoreHook>> = std::sync::Mutex::new(Vec::new());

/// Run `hook` in every child started from a later checkpoint of this
/// process, before `checkpoint()` returns there (hooks run in the order
/// they were given). For what must differ per child: random seeds, tokens,
/// connection pools, ids.
pub fn on_restore(hook: impl Fn() + Send + Sync + 'static) {
    RESTORE_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(std::sync::Arc::new(hook));
}

/// The socket from `FORKD_COOP_SOCKET`, or the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os("FORKD_COOP_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Checkpoint the calling thread into a seed named `name`, as `fork()`
/// would copy it: the caller's other threads are not in the seed (a
/// warning says so; [`checkpoint_all_threads`] keeps them).
pub fn checkpoint(name: &str) -> Result<Checkpoint, CoopError> {
    checkpoint_at(&socket_path(), name)
}

/// Checkpoint the whole calling process, every thread, into a seed named
/// `name`. Returns [`Checkpoint::Parent`] in the caller (whose threads ran
/// on meanwhile, paused only while forkd froze them) and
/// [`Checkpoint::Child`] in every child, where every other thread resumes
/// where it was and the [`on_restore`] hooks run on the calling thread
/// before this returns. Thread ids change, as after `fork()`.
pub fn checkpoint_all_threads(name: &str) -> Result<Checkpoint, CoopError> {
    checkpoint_all_threads_at(&socket_path(), name)
}

/// [`checkpoint_all_threads`] with an explicit socket.
pub fn checkpoint_all_threads_at(socket: &Path, name: &str) -> Result<Checkpoint, CoopError> {
    let hooks: Vec<RestoreHook> = RESTORE_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut s =
        UnixStream::connect(socket).map_err(io("connecting to forkd's cooperative socket"))?;
    let req = json!({
        "op": "create_seed",
        "pid": std::process::id(),
        "name": name,
        "all_threads": true,
        "reply_fd": s.as_raw_fd(),
    });
    writeln!(s, "{req}").map_err(io("sending the checkpoint request"))?;
    // Captured in this read. In the caller it returns forkd's answer; in
    // every child this descriptor is the child's stdin, and it returns the
    // child's first line.
    let line = kproc::read_line_raw(s.as_raw_fd(), 64 * 1024)
        .map_err(io("reading forkd's answer"))?
        .ok_or_else(|| CoopError::Protocol("forkd closed the connection".into()))?;
    if let Some(c) = parse_child(&line) {
        drop(s);
        for h in &hooks {
            h();
        }
        return Ok(c);
    }
    parse_answer(&String::from_utf8_lossy(&line))
}

/// How many threads besides the caller this process has.
fn other_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

/// [`checkpoint`] with an explicit socket.
pub fn checkpoint_at(socket: &Path, name: &str) -> Result<Checkpoint, CoopError> {
    // The copy reads from this pipe until it is captured; its write end
    // stays with the caller, so the copy never sees end-of-file.
    let (r, w) = std::io::pipe().map_err(io("creating a pipe"))?;
    // Taken before the fork: another thread could hold the lock at that
    // moment, and the copy has no thread to release it.
    let hooks: Vec<RestoreHook> = RESTORE_HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // SAFETY: the child side only calls dup2, close (drop of fds), read and
    // _exit until it is captured; the restored children it becomes are
    // whole processes.
    match unsafe { kproc::fork() }.map_err(io("fork"))? {
        Forked::Child => {
            if kproc::dup2(r.as_raw_fd(), 0).is_err() {
                kproc::exit_now(111);
            }
            drop(r);
            drop(w);
            // Captured here. In restored children this read returns their
            // first stdin line.
            match kproc::read_line_raw(0, 64 * 1024) {
                Ok(Some(line)) => match parse_child(&line) {
                    Some(c) => {
                        for h in &hooks {
                            h();
                        }
                        Ok(c)
                    }
                    None => kproc::exit_now(112),
                },
                _ => kproc::exit_now(113),
            }
        }
        Forked::Parent(pid) => {
            drop(r);
            let others = other_threads();
            if others > 0 {
                tracing::warn!(
                    others,
                    "checkpoint() keeps only the calling thread, as fork() does: {others} other thread(s) of this process are not in the seed (checkpoint_all_threads() keeps them)"
                );
            }
            let result = wait_reading(pid).and_then(|()| ask_forkd(socket, pid, name));
            kproc::kill_and_reap(pid);
            drop(w);
            result
        }
    }
}

fn parse_child(line: &[u8]) -> Option<Checkpoint> {
    let v: Value = serde_json::from_slice(line).ok()?;
    Some(Checkpoint::Child {
        instance_id: v["instance_id"].as_str()?.to_string(),
        index: v["index"].as_u64()? as u32,
        args: v["args"].as_str().unwrap_or("").to_string(),
    })
}

/// Wait until the copy is blocked in read(0, ...).
fn wait_reading(pid: i32) -> Result<(), CoopError> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let mut f = sc.split_whitespace();
        if f.next() == Some("0") && f.next() == Some("0x0") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Err(CoopError::NotReady(pid))
}

fn ask_forkd(socket: &Path, pid: i32, name: &str) -> Result<Checkpoint, CoopError> {
    let mut s =
        UnixStream::connect(socket).map_err(io("connecting to forkd's cooperative socket"))?;
    let req = json!({ "op": "create_seed", "pid": pid, "name": name });
    writeln!(s, "{req}").map_err(io("sending the checkpoint request"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(io("reading forkd's answer"))?;
    parse_answer(&line)
}

/// forkd's answer to a checkpoint request.
fn parse_answer(line: &str) -> Result<Checkpoint, CoopError> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|_| CoopError::Protocol(line.to_string()))?;
    if v["ok"] == true {
        Ok(Checkpoint::Parent {
            seed_id: v["id"]
                .as_str()
                .ok_or_else(|| CoopError::Protocol(line.to_string()))?
                .to_string(),
            key: v["key"].as_str().unwrap_or("").to_string(),
        })
    } else {
        Err(CoopError::Refused(
            v["error"].as_str().unwrap_or("no reason given").to_string(),
        ))
    }
}

/// The C ABI (`include/remotefork.h`).
pub mod ffi {
    use std::ffi::{c_char, c_int, c_void, CStr};

    /// What `rf_checkpoint` fills in.
    #[repr(C)]
    pub struct RfCheckpoint {
        /// 1 in a child, 0 in the parent.
        pub is_child: c_int,
        /// Parent: the seed id (NUL-terminated).
        pub seed_id: [c_char; 64],
        /// Parent: the seed key.
        pub key: [c_char; 64],
        /// Child: its instance id.
        pub instance_id: [c_char; 128],
        /// Child: its index.
        pub index: u32,
        /// Child: the spawn's arguments.
        pub args: [c_char; 4096],
        /// On failure: why.
        pub error: [c_char; 512],
    }

    fn put(dst: &mut [c_char], s: &str) {
        let n = s.len().min(dst.len() - 1);
        for (d, b) in dst.iter_mut().zip(s.as_bytes()[..n].iter()) {
            *d = *b as c_char;
        }
        dst[n] = 0;
    }

    /// A C function and its argument, run in every child.
    struct CHook {
        f: unsafe extern "C" fn(*mut c_void),
        arg: *mut c_void,
    }
    // SAFETY: the hook is only called in a restored child, on the thread
    // that called rf_checkpoint; rf_on_restore's caller vouches for `arg`
    // being usable there (it is the same address space, forked).
    unsafe impl Send for CHook {}
    // SAFETY: as for Send: it is called, never shared between threads.
    unsafe impl Sync for CHook {}

    impl CHook {
        fn call(&self) {
            // SAFETY: rf_on_restore's caller vouched for f and arg.
            unsafe { (self.f)(self.arg) }
        }
    }

    /// Run `f(arg)` in every child started from a later `rf_checkpoint` of
    /// this process, before `rf_checkpoint` returns 1 there. Returns 0, or
    /// -1 if `f` is NULL.
    ///
    /// # Safety
    /// `f` must be a valid function and `arg` valid for it in the child.
    #[no_mangle]
    pub unsafe extern "C" fn rf_on_restore(
        f: Option<unsafe extern "C" fn(*mut c_void)>,
        arg: *mut c_void,
    ) -> c_int {
        let Some(f) = f else {
            return -1;
        };
        let h = CHook { f, arg };
        super::on_restore(move || h.call());
        0
    }

    /// Checkpoint the calling thread; returns 0 in the parent, 1 in a child,
    /// -1 on error (`out->error` says why). `name` may be NULL.
    ///
    /// # Safety
    /// `out` must point to a writable `RfCheckpoint`; `name` must be NULL or
    /// a NUL-terminated string.
    #[no_mangle]
    pub unsafe extern "C" fn rf_checkpoint(name: *const c_char, out: *mut RfCheckpoint) -> c_int {
        // SAFETY: as this function's contract.
        unsafe { run(name, out, super::checkpoint) }
    }

    /// As `rf_checkpoint`, keeping every thread of the process
    /// ([`super::checkpoint_all_threads`]): 0 in the parent, 1 in a child
    /// (where all its threads run on), -1 on error.
    ///
    /// # Safety
    /// As `rf_checkpoint`.
    #[no_mangle]
    pub unsafe extern "C" fn rf_checkpoint_all_threads(
        name: *const c_char,
        out: *mut RfCheckpoint,
    ) -> c_int {
        // SAFETY: as this function's contract.
        unsafe { run(name, out, super::checkpoint_all_threads) }
    }

    /// Call `checkpoint` with the C caller's `name` and fill in `out`.
    ///
    /// # Safety
    /// As `rf_checkpoint`.
    unsafe fn run(
        name: *const c_char,
        out: *mut RfCheckpoint,
        checkpoint: fn(&str) -> Result<super::Checkpoint, super::CoopError>,
    ) -> c_int {
        if out.is_null() {
            return -1;
        }
        // SAFETY: the caller passes a writable RfCheckpoint.
        let out = unsafe { &mut *out };
        let name = if name.is_null() {
            String::new()
        } else {
            // SAFETY: the caller passes a NUL-terminated string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        fill(out, checkpoint(&name))
    }

    fn fill(out: &mut RfCheckpoint, r: Result<super::Checkpoint, super::CoopError>) -> c_int {
        match r {
            Ok(super::Checkpoint::Parent { seed_id, key }) => {
                out.is_child = 0;
                put(&mut out.seed_id, &seed_id);
                put(&mut out.key, &key);
                0
            }
            Ok(super::Checkpoint::Child {
                instance_id,
                index,
                args,
            }) => {
                out.is_child = 1;
                put(&mut out.instance_id, &instance_id);
                out.index = index;
                put(&mut out.args, &args);
                1
            }
            Err(e) => {
                put(&mut out.error, &e.to_string());
                -1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_child_line() {
        let c = parse_child(br#"{"instance_id":"ab-3","index":3,"args":"x y"}"#).unwrap();
        assert_eq!(
            c,
            Checkpoint::Child {
                instance_id: "ab-3".into(),
                index: 3,
                args: "x y".into()
            }
        );
        assert!(parse_child(b"garbage").is_none());
        assert!(parse_child(br#"{"index":3}"#).is_none());
    }

    #[test]
    fn a_missing_forkd_is_a_clear_error_and_the_copy_is_gone() {
        let e = checkpoint_at(Path::new("/nonexistent/forkd.coop"), "t").unwrap_err();
        assert!(
            e.to_string()
                .contains("connecting to forkd's cooperative socket"),
            "{e}"
        );
    }
}
