//! Reading a stopped process's kernel objects: fdinfo for eventfds, epoll
//! sets, timerfds and signalfds; a copy of each descriptor
//! (`pidfd_getfd`) to look into pipes (`tee`, which copies without taking),
//! socket queues (`MSG_PEEK`), socket addresses and options, and unlinked
//! files; `kcmp` to find duplicates; socket diagnostics for unix peers.
//!
//! Nothing here changes the process: copies are only read, peeked and
//! closed (a socket's `SO_PEEK_OFF`, used to walk datagrams, is put back).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use libc::pid_t;
use tracing::{debug, warn};

use super::{
    diag, link_inode, parse_epoll, parse_eventfd, parse_signalfd, parse_timerfd, sockaddr_text,
    FdObject, FdObjects, MemoryKind, Object, MAX_CONTENT_BYTES,
};
use crate::procfs::{FdEntry, FdKind};

/// What capture does with a descriptor it cannot recreate.
#[derive(Debug, Clone, Default)]
pub struct FdPolicy {
    /// Record it as dropped (closed in children, with a note at each
    /// spawn) instead of failing the capture.
    pub drop_unsupported: bool,
    /// A descriptor handled elsewhere (the cooperative checkpoint's answer
    /// socket): left out.
    pub skip: Option<i32>,
}

/// Errors reading the kernel objects.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// A descriptor cannot be recreated in a child.
    #[error("process {pid}: fd {fd} ({kind}, {link}) cannot be recreated in a child: {why}; capture with --drop-fds (forkd snapshot, forkctl seed create) to close it in children instead")]
    Refused {
        /// The process.
        pid: pid_t,
        /// The descriptor.
        fd: i32,
        /// Its kind.
        kind: String,
        /// Its `/proc/PID/fd` link.
        link: String,
        /// Why.
        why: String,
    },
    /// A system call on the process's descriptors failed.
    #[error("process {pid}: {what} failed: {source}")]
    Io {
        /// The process.
        pid: pid_t,
        /// What was done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A refusal: why, and the kind named in the message.
struct Refusal {
    kind: String,
    why: String,
}

fn refuse(kind: impl Into<String>, why: impl Into<String>) -> Refusal {
    Refusal {
        kind: kind.into(),
        why: why.into(),
    }
}

/// `TFD_TIMER_CANCEL_ON_SET`.
const TFD_TIMER_CANCEL_ON_SET: u32 = 2;
/// `KCMP_FILE`.
const KCMP_FILE: libc::c_int = 0;

/// Read the kernel objects behind the descriptors `fds` of stopped process
/// `pid`. Returns them and the notes a user should see (connections that
/// children will find closed, descriptors dropped).
pub fn capture(
    pid: pid_t,
    fds: &[FdEntry],
    policy: &FdPolicy,
) -> Result<(FdObjects, Vec<String>), FdError> {
    let io = |what: String| {
        move |source| FdError::Io {
            pid,
            what: what.clone(),
            source,
        }
    };
    let needs_object = |f: &FdEntry| {
        f.fd >= 3
            && Some(f.fd) != policy.skip
            && !matches!(
                f.kind,
                FdKind::Regular
                    | FdKind::Directory
                    | FdKind::CharDevice
                    | FdKind::BlockDevice
                    | FdKind::CoopReply
            )
    };
    let dups = duplicates(pid, fds, policy.skip);
    let mut out = Vec::new();
    let mut notes = Vec::new();
    if !fds
        .iter()
        .any(|f| needs_object(f) || dups.contains_key(&f.fd))
    {
        return Ok((FdObjects::default(), notes));
    }
    let pidfd = kernel_helpers::uffd::pidfd_open(pid).map_err(io(format!("pidfd_open({pid})")))?;
    let mut ctx = Ctx {
        pid,
        pidfd,
        fds,
        dups: &dups,
        unix_peers: None,
        content_bytes: 0,
    };
    for f in fds {
        if let Some(&of) = dups.get(&f.fd) {
            out.push(FdObject {
                fd: f.fd,
                object: Object::Dup { of },
            });
            continue;
        }
        if !needs_object(f) {
            continue;
        }
        match ctx.object(f) {
            Ok(Some(object)) => {
                if let Object::Closed { what, .. } = &object {
                    notes.push(format!(
                        "fd {}: {what} is a connection to the outside; children find it closed",
                        f.fd
                    ));
                }
                if let Object::UnixPair { peer: None, .. } = &object {
                    notes.push(format!(
                        "fd {}: unix socket {} is connected outside the process; children find it closed by its peer",
                        f.fd, f.path
                    ));
                }
                out.push(FdObject { fd: f.fd, object });
            }
            Ok(None) => {}
            Err(Failure::Io(e)) => return Err(e),
            // A userfaultfd serves the parent's own address space, not a
            // child's: in a lazily restored child it is forkd's (the
            // pager's copy). Never recreated, always dropped, and said.
            Err(Failure::Refused(r)) if f.path == "anon_inode:[userfaultfd]" => {
                let why = format!("{} ({}): {}", r.kind, f.path, r.why);
                notes.push(format!("fd {} dropped: {why}", f.fd));
                out.push(FdObject {
                    fd: f.fd,
                    object: Object::Dropped { why },
                });
            }
            Err(Failure::Refused(r)) if policy.drop_unsupported => {
                let why = format!("{} ({}): {}", r.kind, f.path, r.why);
                warn!(pid, fd = f.fd, %why, "dropping a descriptor children cannot have");
                notes.push(format!("fd {} dropped: {why}", f.fd));
                out.push(FdObject {
                    fd: f.fd,
                    object: Object::Dropped { why },
                });
            }
            Err(Failure::Refused(r)) => {
                return Err(FdError::Refused {
                    pid,
                    fd: f.fd,
                    kind: r.kind,
                    link: f.path.clone(),
                    why: r.why,
                })
            }
        }
    }
    // An epoll watch of a dropped descriptor cannot be added: drop the
    // watch too, and say so.
    let dropped: Vec<i32> = out
        .iter()
        .filter(|o| matches!(o.object, Object::Dropped { .. }))
        .map(|o| o.fd)
        .collect();
    for o in &mut out {
        if let Object::Epoll { watches } = &mut o.object {
            watches.retain(|w| {
                let keep = !dropped.contains(&w.fd);
                if !keep {
                    notes.push(format!(
                        "fd {}: the epoll watch of dropped fd {} is left out",
                        o.fd, w.fd
                    ));
                }
                keep
            });
        }
    }
    debug!(pid, objects = out.len(), "read the kernel objects");
    Ok((FdObjects { objects: out }, notes))
}

/// Descriptors that share an open file description with a lower one:
/// number -> the lowest of its description.
fn duplicates(pid: pid_t, fds: &[FdEntry], skip: Option<i32>) -> HashMap<i32, i32> {
    let mut by_link: HashMap<&str, Vec<i32>> = HashMap::new();
    for f in fds.iter().filter(|f| Some(f.fd) != skip) {
        by_link.entry(f.path.as_str()).or_default().push(f.fd);
    }
    let mut dups = HashMap::new();
    for group in by_link.values().filter(|g| g.len() > 1) {
        for (i, &b) in group.iter().enumerate() {
            if b < 3 || dups.contains_key(&b) {
                continue;
            }
            if let Some(&a) = group[..i]
                .iter()
                .find(|&&a| !dups.contains_key(&a) && same_file(pid, a, b))
            {
                dups.insert(b, a);
            }
        }
    }
    dups
}

/// Do descriptors `a` and `b` of `pid` share one open file description?
fn same_file(pid: pid_t, a: i32, b: i32) -> bool {
    // SAFETY: kcmp compares two descriptors of a process; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    r == 0
}

enum Failure {
    Io(FdError),
    Refused(Refusal),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Failure {
        Failure::Refused(r)
    }
}

struct Ctx<'a> {
    pid: pid_t,
    pidfd: OwnedFd,
    fds: &'a [FdEntry],
    dups: &'a HashMap<i32, i32>,
    unix_peers: Option<HashMap<u64, u64>>,
    content_bytes: u64,
}

impl Ctx<'_> {
    fn io(&self, what: String, source: std::io::Error) -> Failure {
        Failure::Io(FdError::Io {
            pid: self.pid,
            what,
            source,
        })
    }

    /// A copy of descriptor `fd` of the process.
    fn copy(&self, fd: i32) -> Result<OwnedFd, Failure> {
        // SAFETY: pidfd_getfd duplicates the target's fd into our table.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(self.io(
                format!("pidfd_getfd of fd {fd}"),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }

    fn fdinfo(&self, fd: i32) -> Result<String, Failure> {
        let path = format!("/proc/{}/fdinfo/{fd}", self.pid);
        std::fs::read_to_string(&path).map_err(|e| self.io(format!("reading {path}"), e))
    }

    /// The descriptors of the process (not duplicates) whose link is `link`.
    fn holders(&self, link: &str) -> Vec<&FdEntry> {
        self.fds
            .iter()
            .filter(|f| f.path == link && !self.dups.contains_key(&f.fd))
            .collect()
    }

    fn object(&mut self, f: &FdEntry) -> Result<Option<Object>, Failure> {
        match f.kind {
            FdKind::AnonInode => self.anon(f).map(Some),
            FdKind::Pipe if f.path.starts_with("pipe:") => self.pipe(f),
            FdKind::Pipe => Err(refuse(
                "named FIFO",
                "a FIFO opened by path is not reopened",
            ))?,
            FdKind::Socket => self.socket(f).map(Some),
            FdKind::Deleted => self.memory(f).map(Some),
            _ => Err(refuse(
                format!("{:?}", f.kind),
                "forkd does not know how to recreate this kind of file",
            ))?,
        }
    }

    fn anon(&self, f: &FdEntry) -> Result<Object, Failure> {
        let name = f.path.trim_start_matches("anon_inode:");
        let info = self.fdinfo(f.fd)?;
        let bad = |what: &str| refuse(name, format!("its fdinfo has no readable {what}"));
        match name {
            "[eventfd]" => {
                let (count, semaphore) = parse_eventfd(&info).ok_or_else(|| bad("counter"))?;
                if !info.contains("eventfd-semaphore:") {
                    warn!(
                        pid = self.pid,
                        fd = f.fd,
                        "this kernel does not show EFD_SEMAPHORE (before Linux 6.4): the eventfd is recreated in counter mode"
                    );
                }
                Ok(Object::EventFd { count, semaphore })
            }
            "[eventpoll]" => {
                let mut watches = Vec::new();
                for (w, ino) in parse_epoll(&info) {
                    let target = std::fs::metadata(format!("/proc/{}/fd/{}", self.pid, w.fd));
                    match target {
                        Ok(m) if m.ino() == ino => watches.push(w),
                        _ => Err(refuse(
                            "epoll",
                            format!(
                                "it watches a file that is no longer open at fd {} (closed while a duplicate stays watched); a child could not watch it",
                                w.fd
                            ),
                        ))?,
                    }
                }
                Ok(Object::Epoll { watches })
            }
            "[timerfd]" => {
                let (clock, value, interval, ticks, flags) =
                    parse_timerfd(&info).ok_or_else(|| bad("timer"))?;
                if flags & TFD_TIMER_CANCEL_ON_SET != 0 {
                    Err(refuse(
                        "timerfd",
                        "it is armed with TFD_TIMER_CANCEL_ON_SET, which a re-armed timer would lose",
                    ))?;
                }
                Ok(Object::TimerFd {
                    clock,
                    value,
                    interval,
                    ticks,
                })
            }
            "[signalfd]" => Ok(Object::SignalFd {
                mask: parse_signalfd(&info).ok_or_else(|| bad("mask"))?,
            }),
            "[userfaultfd]" => Err(refuse(
                "userfaultfd",
                "it serves the parent's memory (forkd's pager, when the parent is itself a restored child); a child gets its own",
            ))?,
            "inotify" => Err(refuse(
                "inotify",
                "its watches are not recreated (add them again after restore)",
            ))?,
            other => Err(refuse(other, "this kind of kernel object is not recreated"))?,
        }
    }

    fn pipe(&self, f: &FdEntry) -> Result<Option<Object>, Failure> {
        let acc = f.flags as i32 & libc::O_ACCMODE;
        if acc == libc::O_RDWR {
            Err(refuse("pipe", "it is open for both reading and writing"))?;
        }
        let read = acc == libc::O_RDONLY;
        let holders = self.holders(&f.path);
        let (reads, writes): (Vec<&FdEntry>, Vec<&FdEntry>) = holders
            .iter()
            .partition(|h| h.flags as i32 & libc::O_ACCMODE == libc::O_RDONLY);
        if reads.len() > 1 || writes.len() > 1 {
            Err(refuse(
                "pipe",
                "the process opened this pipe more than once (through /proc), which a child cannot have",
            ))?;
        }
        let peer = if read { writes.first() } else { reads.first() }.map(|p| p.fd);
        if peer.is_none() {
            if let Some((holder, comm)) = outside_holder(self.pid, &f.path) {
                Err(refuse(
                    if read { "pipe read end" } else { "pipe write end" },
                    format!(
                        "its other end is held by process {holder} ({comm}), outside the process; a child cannot share it"
                    ),
                ))?;
            }
        }
        let copy = self.copy(f.fd)?;
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < 0 {
            return Err(self.io(
                format!("F_GETPIPE_SZ of fd {}", f.fd),
                std::io::Error::last_os_error(),
            ));
        }
        let data = if read {
            self.tee_all(&copy, size as usize, f.fd)?
        } else {
            Vec::new()
        };
        Ok(Some(Object::Pipe {
            read,
            peer,
            data,
            size: size as u32,
        }))
    }

    /// The bytes in the pipe whose read end is `src`, left in it: `tee`
    /// copies them into a pipe of our own.
    fn tee_all(&self, src: &OwnedFd, size: usize, fd: i32) -> Result<Vec<u8>, Failure> {
        let mut p = [0; 2];
        // SAFETY: p is a valid array of two ints.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(self.io("pipe2".into(), std::io::Error::last_os_error()));
        }
        // SAFETY: fresh descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        // SAFETY: tee between two pipe descriptors we hold.
        let n = unsafe {
            libc::tee(
                src.as_raw_fd(),
                w.as_raw_fd(),
                size,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(Vec::new());
            }
            return Err(self.io(format!("tee of pipe fd {fd}"), e));
        }
        let mut data = vec![0u8; n as usize];
        let mut got = 0;
        while got < data.len() {
            // SAFETY: reading into the unfilled part of data.
            let k = unsafe {
                libc::read(
                    r.as_raw_fd(),
                    data[got..].as_mut_ptr().cast(),
                    data.len() - got,
                )
            };
            if k <= 0 {
                return Err(self.io(
                    format!("reading the copy of pipe fd {fd}"),
                    std::io::Error::last_os_error(),
                ));
            }
            got += k as usize;
        }
        Ok(data)
    }

    fn socket(&mut self, f: &FdEntry) -> Result<Object, Failure> {
        let s = self.copy(f.fd)?;
        let int = |opt| sockopt_int(&s, libc::SOL_SOCKET, opt).unwrap_or(0);
        let (family, ty, protocol) = (
            int(libc::SO_DOMAIN),
            int(libc::SO_TYPE),
            int(libc::SO_PROTOCOL),
        );
        let listening = int(libc::SO_ACCEPTCONN) != 0;
        let local = sockname(&s, false);
        let peer = sockname(&s, true);
        match (family, ty) {
            (libc::AF_UNIX, _) => self.unix(f, &s, ty, listening, local),
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) if listening => {
                Ok(Object::Listen {
                    family,
                    addr: local.unwrap_or_default(),
                    reuse_addr: int(libc::SO_REUSEADDR) != 0,
                    reuse_port: int(libc::SO_REUSEPORT) != 0,
                    v6only: family == libc::AF_INET6
                        && sockopt_int(&s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).unwrap_or(0) != 0,
                })
            }
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) => Ok(Object::Closed {
                family,
                ty,
                protocol,
                what: format!(
                    "TCP {} -> {}",
                    local.as_deref().map(sockaddr_text).unwrap_or_default(),
                    peer.as_deref()
                        .map(sockaddr_text)
                        .unwrap_or_else(|| "not connected".into())
                ),
            }),
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM) if protocol == libc::IPPROTO_UDP => {
                Ok(Object::Udp {
                    family,
                    local: local.filter(|a| sockaddr_port(a) != 0),
                    peer,
                    reuse_addr: int(libc::SO_REUSEADDR) != 0,
                    reuse_port: int(libc::SO_REUSEPORT) != 0,
                })
            }
            _ => Err(refuse(
                format!("socket (family {family}, type {ty}, protocol {protocol})"),
                "only unix, TCP and UDP sockets are recreated",
            ))?,
        }
    }

    fn unix(
        &mut self,
        f: &FdEntry,
        s: &OwnedFd,
        ty: i32,
        listening: bool,
        local: Option<Vec<u8>>,
    ) -> Result<Object, Failure> {
        let name = local.as_deref().filter(|a| a.len() > 2).map(sockaddr_text);
        if listening {
            Err(refuse(
                "listening unix socket",
                format!(
                    "it listens at {}, an address a child cannot take while the parent holds it",
                    name.as_deref().unwrap_or("an unnamed address")
                ),
            ))?;
        }
        if self.unix_peers.is_none() {
            self.unix_peers =
                Some(diag::unix_peers().map_err(|e| {
                    self.io("reading unix socket peers (NETLINK_SOCK_DIAG)".into(), e)
                })?);
        }
        let ino = link_inode(&f.path).unwrap_or(0);
        let peer_ino = self.unix_peers.as_ref().and_then(|p| p.get(&ino)).copied();
        let Some(peer_ino) = peer_ino else {
            if let Some(n) = name {
                Err(refuse(
                    "bound unix socket",
                    format!("it is bound to {n}, which the parent holds"),
                ))?;
            }
            // Neither bound nor connected: a new socket is the same.
            return Ok(Object::Closed {
                family: libc::AF_UNIX,
                ty,
                protocol: 0,
                what: format!("unconnected unix socket {}", f.path),
            });
        };
        let peer_link = format!("socket:[{peer_ino}]");
        let peer = self.holders(&peer_link).first().map(|p| p.fd);
        let queue = self.peek_queue(s, ty, f.fd)?;
        Ok(Object::UnixPair { ty, peer, queue })
    }

    /// What is queued for socket `s` to read, left queued.
    fn peek_queue(&self, s: &OwnedFd, ty: i32, fd: i32) -> Result<Vec<Vec<u8>>, Failure> {
        let mut inq: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut inq) };
        if ty == libc::SOCK_STREAM {
            if inq <= 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; inq as usize];
            // SAFETY: peeking into buf.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(self.io(
                    format!("peeking at unix socket fd {fd}"),
                    std::io::Error::last_os_error(),
                ));
            }
            buf.truncate(n as usize);
            return Ok(vec![buf]);
        }
        // Datagrams: walk them with SO_PEEK_OFF, then put it back.
        let old = sockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap_or(-1);
        if set_sockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).is_err() {
            return Ok(Vec::new());
        }
        let rcvbuf = sockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(212_992);
        let mut buf = vec![0u8; rcvbuf.max(65_536) as usize];
        let mut queue = Vec::new();
        let result = loop {
            // SAFETY: peeking into buf.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    break Ok(());
                }
                break Err(e);
            }
            queue.push(buf[..n as usize].to_vec());
            if queue.len() > 1 << 16 {
                break Ok(());
            }
        };
        let _ = set_sockopt_int(s, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old);
        result.map_err(|e| self.io(format!("peeking at unix socket fd {fd}"), e))?;
        Ok(queue)
    }

    fn memory(&mut self, f: &FdEntry) -> Result<Object, Failure> {
        let path = f.path.trim_end_matches(" (deleted)");
        let kind = match path.strip_prefix("/memfd:") {
            Some(name) => MemoryKind::Memfd {
                name: name.to_string(),
            },
            None => MemoryKind::Unlinked {
                dir: std::path::Path::new(path)
                    .parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| "/".into()),
            },
        };
        let c = self.copy(f.fd)?;
        let file = std::fs::File::from(c);
        let meta = file
            .metadata()
            .map_err(|e| self.io(format!("fstat of fd {}", f.fd), e))?;
        if !meta.is_file() {
            Err(refuse("unlinked file", "it is not a regular file"))?;
        }
        self.content_bytes += meta.len();
        if self.content_bytes > MAX_CONTENT_BYTES {
            Err(refuse(
                "unlinked file",
                format!(
                    "it holds {} bytes, more than the {} MiB of unlinked files and memfds a seed keeps",
                    meta.len(),
                    MAX_CONTENT_BYTES >> 20
                ),
            ))?;
        }
        let mut content = vec![0u8; meta.len() as usize];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut content, 0)
            .map_err(|e| self.io(format!("reading the contents of fd {}", f.fd), e))?;
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        Ok(Object::Memory {
            kind,
            content,
            seals: seals.max(0) as u32,
        })
    }
}

/// A process other than `pid` that has a descriptor linked to `link`.
fn outside_holder(pid: pid_t, link: &str) -> Option<(pid_t, String)> {
    let me = std::process::id() as pid_t;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<pid_t>().ok()) else {
            continue;
        };
        if p == pid || p == me {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in rd.flatten() {
            if std::fs::read_link(fd.path())
                .map(|t| t.as_os_str() == link)
                .unwrap_or(false)
            {
                return Some((p, crate::procfs::comm(p).unwrap_or_default()));
            }
        }
    }
    None
}

fn sockopt_int(s: &OwnedFd, level: i32, opt: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most len bytes into v.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

fn set_sockopt_int(s: &OwnedFd, level: i32, opt: i32, v: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads one int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket's own (`peer` false) or peer's address bytes.
fn sockname(s: &OwnedFd, peer: bool) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_storage is plain data; zeroes are a valid value.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut st as *mut libc::sockaddr_storage).cast();
    // SAFETY: the kernel writes at most len bytes into st.
    let r = unsafe {
        if peer {
            libc::getpeername(s.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(s.as_raw_fd(), p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    // SAFETY: st is len (<= its size) initialised bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&st as *const libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        )
    };
    Some(bytes.to_vec())
}

fn sockaddr_port(a: &[u8]) -> u16 {
    a.get(2..4)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .unwrap_or(0)
}
