//! The keeper: a small process that holds, for the node's forkd, every
//! descriptor a running child depends on, so that children outlive a forkd
//! restart or upgrade (SIGTERM or `kill -9` alike).
//!
//! forkd starts it once per state directory (`forkd keeper`, in a session
//! of its own) and hands it, per child, copies of the child's pidfd,
//! userfaultfd and stdout pipe, and per seed the node cache's memfds. While
//! the keeper holds a userfaultfd its registrations stay: if forkd dies, a
//! lazily served child's next fault waits instead of reading zeros, and
//! its stdout pipe never breaks. The next forkd takes everything back
//! (`take`) and serves the children on, from the same cache.
//!
//! If no forkd comes back within the grace period, the keeper kills every
//! process it holds (through its pidfd, never a reused pid), writes why to
//! `orphans.jsonl` next to its socket (the next forkd reports them), and
//! exits. It also exits when it holds nothing and no forkd is connected.
//!
//! Protocol: a `SOCK_SEQPACKET` Unix socket (`keeper.sock`, mode 0600);
//! each message is one JSON object, its descriptors passed with it
//! (`SCM_RIGHTS`):
//!
//! - `{"op":"put","key":K,"meta":{...},"pidfd":I}` + fds: hold these under
//!   `K` (replacing what `K` held); `pidfd` is the index of the process's
//!   pidfd among the fds, if there is one.
//! - `{"op":"del","key":K}`: let go of `K`.
//! - `{"op":"take"}`: the keeper answers one
//!   `{"op":"entry","key":K,"meta":{...},"ended":E}` + fds per entry (`E`:
//!   how the process ended while no forkd watched, or null), then
//!   `{"op":"end"}`. Entries stay held until deleted.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernel_helpers::proc::{self as kproc, Ended};
use serde_json::{json, Value};
use tracing::{info, warn};

/// The keeper's socket in a run directory.
pub const SOCKET: &str = "keeper.sock";
/// Where a keeper that gave up writes what it killed.
pub const ORPHANS: &str = "orphans.jsonl";
/// Largest message (a JSON object).
const MAX_MSG: usize = 64 * 1024;

/// Errors talking to or starting the keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The keeper answered something unexpected.
    #[error("the keeper answered {0:?}")]
    Protocol(String),
    /// The keeper did not come up.
    #[error("the keeper did not come up within {0:?} (see {1})")]
    NotUp(Duration, String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KeeperError {
    let what = what.into();
    move |source| KeeperError::Io { what, source }
}

/// A `SOCK_SEQPACKET` Unix socket.
fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok((
        a,
        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
    ))
}

fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let (a, len) = sockaddr(path)?;
    // SAFETY: `a` is a valid sockaddr_un of `len` bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn send(fd: RawFd, msg: &Value, fds: &[RawFd]) -> io::Result<()> {
    kproc::send_msg(fd, msg.to_string().as_bytes(), fds)
}

fn recv(fd: RawFd) -> io::Result<Option<(Value, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let (n, fds) = kproc::recv_msg(fd, &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    let v = serde_json::from_slice(&buf[..n])
        .map_err(|e| io::Error::other(format!("a message that is not JSON: {e}")))?;
    Ok(Some((v, fds)))
}

/// How a process ended, as JSON.
fn ended_json(e: Ended) -> Value {
    match e {
        Ended::Exited(c) => json!({ "exit_code": c }),
        Ended::Killed(s) => json!({ "signal": s }),
    }
}

/// What a forkd took back from the keeper.
#[derive(Debug)]
pub struct Handed {
    /// Its key.
    pub key: String,
    /// What forkd said of it.
    pub meta: Value,
    /// How its process ended while no forkd watched, if it did.
    pub ended: Option<Ended>,
    /// Its descriptors, in the order they were put.
    pub fds: Vec<OwnedFd>,
}

/// forkd's end of the keeper.
#[derive(Debug)]
pub struct Keeper {
    sock: std::sync::Mutex<OwnedFd>,
    dir: PathBuf,
}

impl Keeper {
    /// Connect to the keeper of run directory `dir`, starting one (this
    /// executable, `keeper`, in its own session) if there is none.
    pub fn connect_or_start(dir: &Path, grace: Duration) -> Result<Keeper, KeeperError> {
        // Owner only: it holds the keeper's socket and children's journals.
        remotefork::private_fs::dir(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let path = dir.join(SOCKET);
        if let Ok(fd) = connect(&path) {
            return Ok(Keeper::from(fd, dir));
        }
        let exe = std::env::current_exe().map_err(io_err("finding forkd's executable"))?;
        let log_path = dir.join("keeper.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("keeper")
            .arg("--dir")
            .arg(dir)
            .arg("--grace-s")
            .arg(grace.as_secs().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(io_err("opening the keeper's log"))?,
            )
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; the child only calls it
        // between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err("starting the keeper"))?;
        // Not ours to wait for: it outlives this forkd. A thread reaps it
        // if it ends while we live.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let t = Instant::now();
        let limit = Duration::from_secs(30);
        loop {
            match connect(&path) {
                Ok(fd) => return Ok(Keeper::from(fd, dir)),
                Err(_) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return Err(KeeperError::NotUp(limit, log_path.display().to_string())),
            }
        }
    }

    fn from(fd: OwnedFd, dir: &Path) -> Keeper {
        Keeper {
            sock: std::sync::Mutex::new(fd),
            dir: dir.to_path_buf(),
        }
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Take back everything the keeper holds.
    pub fn take(&self) -> Result<Vec<Handed>, KeeperError> {
        let g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        send(g.as_raw_fd(), &json!({ "op": "take" }), &[]).map_err(io_err("asking the keeper"))?;
        let mut out = Vec::new();
        loop {
            let (v, fds) = recv(g.as_raw_fd())
                .map_err(io_err("reading the keeper's answer"))?
                .ok_or_else(|| KeeperError::Protocol("end of stream".into()))?;
            match v["op"].as_str() {
                Some("entry") => out.push(Handed {
                    key: v["key"].as_str().unwrap_or_default().to_string(),
                    meta: v["meta"].clone(),
                    ended: match (
                        v["ended"]["exit_code"].as_i64(),
                        v["ended"]["signal"].as_i64(),
                    ) {
                        (Some(c), _) => Some(Ended::Exited(c as i32)),
                        (_, Some(s)) => Some(Ended::Killed(s as i32)),
                        _ => None,
                    },
                    fds,
                }),
                Some("end") => return Ok(out),
                _ => return Err(KeeperError::Protocol(v.to_string())),
            }
        }
    }

    /// Hold `fds` under `key` (`pidfd`: the index of the process's pidfd
    /// among them). A failure is logged: the child then does not outlive
    /// this forkd.
    pub fn put(&self, key: &str, meta: &Value, fds: &[RawFd], pidfd: Option<usize>) {
        let g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let m = json!({ "op": "put", "key": key, "meta": meta, "pidfd": pidfd });
        tracing::debug!(key, fds = fds.len(), "handing to the keeper");
        if let Err(e) = send(g.as_raw_fd(), &m, fds) {
            warn!(key, error = %e, "cannot hand a child's descriptors to the keeper; it will not outlive this forkd");
        }
    }

    /// Let go of `key`.
    pub fn del(&self, key: &str) {
        let g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = send(g.as_raw_fd(), &json!({ "op": "del", "key": key }), &[]) {
            warn!(key, error = %e, "cannot tell the keeper to let go");
        }
    }

    /// What a keeper that gave up reported (and forget it).
    pub fn orphans(&self) -> Vec<Value> {
        let p = self.dir.join(ORPHANS);
        let out = std::fs::read_to_string(&p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let _ = std::fs::remove_file(&p);
        out
    }
}

/// One thing the keeper holds.
struct Entry {
    meta: Value,
    fds: Vec<OwnedFd>,
    pidfd: Option<usize>,
    ended: Option<Ended>,
}

/// Run the keeper of run directory `dir` (`forkd keeper`): see the module
/// documentation.
pub fn run(dir: &Path, grace: Duration) -> Result<(), KeeperError> {
    // One keeper per directory: a second one finds the lock taken and goes.
    let lock_path = dir.join("keeper.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        info!(dir = %dir.display(), "another keeper holds this directory");
        return Ok(());
    }
    let path = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket().map_err(io_err("creating the keeper's socket"))?;
    let (a, len) = sockaddr(&path).map_err(io_err("naming the keeper's socket"))?;
    // SAFETY: `a` is a valid sockaddr_un of `len` bytes.
    if unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&a as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(io_err(format!("binding {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 16) } != 0 {
        return Err(io_err("listening")(io::Error::last_os_error()));
    }
    info!(dir = %dir.display(), grace_s = grace.as_secs(), "keeper up");

    let mut entries: HashMap<String, Entry> = HashMap::new();
    // Each forkd's connection, with its pid.
    let mut conns: Vec<(OwnedFd, Option<i32>)> = Vec::new();
    let mut alone_since: Option<Instant> = Some(Instant::now());
    // Until the forkd that started it connects, it is not done.
    let up = Instant::now();
    let mut greeted = false;
    loop {
        // Nothing to hold and nobody to hold it for: done.
        if conns.is_empty() && entries.is_empty() && (greeted || up.elapsed() >= grace) {
            info!("nothing held and no forkd: keeper exits");
            return Ok(());
        }
        if let Some(t) = alone_since {
            // Only node caches (or processes that ended) left: nothing to
            // keep alive for a next forkd.
            let idle = greeted
                && entries
                    .iter()
                    .all(|(k, e)| k.starts_with("c/") || e.ended.is_some());
            if t.elapsed() >= grace || idle {
                give_up(dir, grace, &mut entries);
                return Ok(());
            }
        }
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let pfd = |fd: RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        pfds.push(pfd(listener.as_raw_fd()));
        pfds.extend(conns.iter().map(|(c, _)| pfd(c.as_raw_fd())));
        let watched: Vec<String> = entries
            .iter()
            .filter(|(_, e)| e.ended.is_none() && e.pidfd.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for k in &watched {
            let e = &entries[k];
            if let Some(f) = e.pidfd.and_then(|i| e.fds.get(i)) {
                pfds.push(pfd(f.as_raw_fd()));
            }
        }
        // SAFETY: `pfds` is a valid array of pollfd for the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 500) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("poll")(e));
        }
        // Processes that ended: note how (forkd may be away).
        for (i, k) in watched.iter().enumerate() {
            if pfds[1 + conns.len() + i].revents == 0 {
                continue;
            }
            if let Some(e) = entries.get_mut(k) {
                let st = e
                    .pidfd
                    .and_then(|i| e.fds.get(i))
                    .and_then(|f| kproc::pidfd_exit_status(f.as_raw_fd()).ok().flatten());
                e.ended = Some(st.unwrap_or(Ended::Killed(0)));
            }
        }
        // Messages from forkd (read before the listener: a new forkd's
        // connection is added at the end, after these indexes).
        let mut closed = Vec::new();
        for (i, (c, pid)) in conns.iter().enumerate() {
            if pfds[1 + i].revents == 0 {
                // A forkd whose main thread has exited is going, even if
                // its connection stays open: a thread of it stuck in the
                // kernel (closing a pipe whose lock a child holds while it
                // waits on a fault nobody serves now) keeps its
                // descriptors. Counting it gone starts the grace, whose
                // end kills the children, which lets that thread go too.
                if pid.is_some_and(exiting) {
                    warn!(
                        pid,
                        "forkd's main thread has exited but its connection is still open: counted as gone"
                    );
                    closed.push(i);
                }
                continue;
            }
            match recv(c.as_raw_fd()) {
                Ok(Some((v, fds))) => handle(c.as_raw_fd(), v, fds, &mut entries),
                Ok(None) | Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            conns.remove(i);
        }
        if pfds[0].revents != 0 {
            // SAFETY: accept4 on our listening socket; no address wanted.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c >= 0 {
                // SAFETY: accept4 returned a new descriptor owned by nobody else.
                let c = unsafe { OwnedFd::from_raw_fd(c) };
                let pid = peer_pid(&c);
                conns.push((c, pid));
                greeted = true;
            }
        }
        match (conns.is_empty(), alone_since) {
            (true, None) => {
                info!(
                    held = entries.len(),
                    "forkd is gone; waiting for the next one"
                );
                alone_since = Some(Instant::now());
            }
            (false, Some(_)) => alone_since = None,
            _ => {}
        }
        if alone_since.is_some() {
            reap_clones(&mut entries);
        }
    }
}

/// The pid of the process at the other end of `c`, if the kernel says.
fn peer_pid(c: &OwnedFd) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes, which `cred` is.
    let r = unsafe {
        libc::getsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Has the thread-group leader `pid` exited (a zombie, dead)? Only a
/// state read says so: a process gone for good closes its connection, and
/// a wrong "gone" would kill a live forkd's children at the grace's end.
fn exiting(pid: i32) -> bool {
    matches!(remotefork::procfs::stat(pid), Ok((state, _)) if state == 'Z' || state == 'X')
}

/// A forkd that died mid-capture left its clone (`z/` entries) to die
/// with it, as a zombie of the captured process, which never waits for
/// it: reap it there.
fn reap_clones(entries: &mut HashMap<String, Entry>) {
    entries.retain(|k, e| {
        if !k.starts_with("z/") {
            return true;
        }
        let (Some(parent), Some(clone)) = (e.meta["parent"].as_i64(), e.meta["clone"].as_i64())
        else {
            return false;
        };
        let (parent, clone) = (parent as i32, clone as i32);
        match remotefork::procfs::stat(clone) {
            // Still dying: again at the next turn.
            Ok((s, _)) if s != 'Z' && s != 'X' => true,
            Ok(_) => {
                if let Err(err) = remotefork::capture::reap_leftover_clone(parent, clone) {
                    warn!(parent, clone, error = %err, "cannot reap a capture's leftover clone");
                } else {
                    info!(
                        parent,
                        clone, "reaped the clone a dead forkd left in a captured process"
                    );
                }
                false
            }
            Err(_) => false,
        }
    });
}

/// One message from a forkd.
fn handle(conn: RawFd, v: Value, fds: Vec<OwnedFd>, entries: &mut HashMap<String, Entry>) {
    let key = v["key"].as_str().unwrap_or_default().to_string();
    match v["op"].as_str() {
        Some("put") => {
            let pidfd = v["pidfd"]
                .as_u64()
                .map(|i| i as usize)
                .filter(|i| *i < fds.len());
            tracing::debug!(%key, fds = fds.len(), "held");
            entries.insert(
                key,
                Entry {
                    meta: v["meta"].clone(),
                    fds,
                    pidfd,
                    ended: None,
                },
            );
        }
        Some("del") => {
            tracing::debug!(%key, "let go");
            entries.remove(&key);
        }
        Some("take") => {
            for (k, e) in entries.iter() {
                let raw: Vec<RawFd> = e.fds.iter().map(|f| f.as_raw_fd()).collect();
                let m = json!({
                    "op": "entry", "key": k, "meta": e.meta,
                    "ended": e.ended.map(ended_json),
                });
                if let Err(err) = send(conn, &m, &raw) {
                    warn!(key = %k, error = %err, "cannot hand an entry back");
                }
            }
            let _ = send(conn, &json!({ "op": "end" }), &[]);
        }
        other => warn!(op = ?other, "unknown keeper request"),
    }
}

/// No forkd came back: kill what is held, say why, let go.
fn give_up(dir: &Path, grace: Duration, entries: &mut HashMap<String, Entry>) {
    let mut held: Vec<Option<OwnedFd>> = Vec::new();
    let reason = format!(
        "forkd was gone for {} s and no forkd took its children back; killed by its keeper",
        grace.as_secs()
    );
    let mut report = String::new();
    // The reasons are written before anything is killed, so whoever sees a
    // process gone also finds why.
    let mut to_kill: Vec<OwnedFd> = Vec::new();
    for (k, e) in entries.drain() {
        let mut line = json!({ "key": k, "meta": e.meta });
        match (e.ended, e.pidfd.and_then(|i| e.fds.get(i))) {
            (Some(end), _) => line["ended"] = ended_json(end),
            (None, Some(p)) => {
                if let Ok(p) = p.try_clone() {
                    to_kill.push(p);
                }
                line["killed"] = json!(reason);
            }
            (None, None) => {
                // A userfaultfd whose process is not known: letting go of
                // it would let the process read zeros where its memory
                // is. Held until that address space is gone.
                if let Some(u) = e.fds.first().filter(|_| !k.starts_with("c/")) {
                    line["held"] = json!("its process is unknown: its userfaultfd stays held (the process waits at its next fault, never reads zeros) until it ends");
                    held.push(u.try_clone().ok());
                } else {
                    line["released"] = json!(reason);
                }
            }
        }
        warn!(key = %k, "{}", line);
        report.push_str(&line.to_string());
        report.push('\n');
    }
    let p = dir.join(ORPHANS);
    use std::io::Write;
    if let Err(e) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .and_then(|mut f| f.write_all(report.as_bytes()))
    {
        warn!(file = %p.display(), error = %e, "cannot write what the keeper killed");
    }
    for p in to_kill {
        let _ = kproc::pidfd_signal(p.as_raw_fd(), libc::SIGKILL);
    }
    // Hold the userfaultfds of unknown processes until their address
    // spaces are gone (then every ioctl on them fails with ESRCH).
    let mut held: Vec<kernel_helpers::uffd::Uffd> = held
        .into_iter()
        .flatten()
        .map(kernel_helpers::uffd::Uffd::from_owned)
        .collect();
    while !held.is_empty() {
        held.retain(|u| u.mm_alive(0x10000));
        std::thread::sleep(Duration::from_secs(1));
    }
}
