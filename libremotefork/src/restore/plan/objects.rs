//! The kernel objects behind the seed's descriptors, made anew in a child:
//! each created at a free number, given its state (a counter, queued
//! bytes, a timer, contents), then `dup3`ed over its own number and the
//! first number closed. Epoll watches are added last, when everything they
//! watch is in place.
//!
//! The same steps run in a child restored from scratch (over placeholders
//! the descriptor phase opened) and in a child forked from a template (over
//! what it inherited from the template), where only objects whose state
//! siblings must not share are made anew ([`Object::own_per_fork`]).

use super::{v, Arg, Data, Descriptor, FdEntry, Op};
use crate::kobj::{MemoryKind, Object};

/// `TFD_IOC_SET_TICKS`: `_IOW('T', 0, u64)`.
const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
/// `MFD_ALLOW_SEALING`.
const MFD_ALLOW_SEALING: u64 = 2;
/// `EFD_SEMAPHORE`.
const EFD_SEMAPHORE: u64 = 1;
/// Backlog of a listening socket made anew (the kernel caps it at
/// `net.core.somaxconn`).
const BACKLOG: u64 = 4096;

/// Where the steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Context {
    /// A child restored from scratch: every number up to `max_fd` is open
    /// (placeholders for the objects), so the first free number is
    /// `max_fd + 1`.
    Scratch {
        /// The highest descriptor of the seed.
        max_fd: i32,
    },
    /// A child forked from a template: it has the template's descriptors.
    Fork,
}

/// The steps, and the notes a user of such a child should read.
pub(super) fn plan_objects(
    data: &mut Data,
    desc: &Descriptor,
    cx: Context,
) -> (Vec<Op>, Vec<String>) {
    let fork = cx == Context::Fork;
    let mut ops = Vec::new();
    let mut notes = Vec::new();
    let objs = &desc.fd_objects;
    let entry = |fd: i32| desc.fds.iter().find(|f| f.fd == fd);
    // Is the object at `fd` (following duplicates) made anew here?
    let made_here = |fd: i32| -> bool {
        let mut at = fd;
        for _ in 0..8 {
            match objs.get(at) {
                Some(Object::Dup { of }) => at = *of,
                Some(o) => return !fork || o.own_per_fork(),
                // Stdio is the child's own; a file reopened by path is
                // shared with the template as fork() shares it.
                None => return at < 3 || !fork,
            }
        }
        false
    };
    for o in &objs.objects {
        let n = o.fd;
        let Some(f) = entry(n) else { continue };
        if fork && !made_here(n) {
            continue;
        }
        match &o.object {
            Object::Dup { of } => {
                ops.push(dup3(
                    v(*of as u64),
                    n,
                    f,
                    format!("fd {n}: a duplicate of fd {of}"),
                ));
            }
            Object::EventFd { count, semaphore } => {
                let flags = if *semaphore { EFD_SEMAPHORE } else { 0 };
                ops.push(
                    Op::new(
                        libc::SYS_eventfd2,
                        [v(0), v(flags), v(0), v(0), v(0), v(0)],
                        format!("fd {n}: eventfd2"),
                    )
                    .save(),
                );
                if *count > 0 {
                    let buf = data.words(&[*count]);
                    ops.push(
                        Op::new(
                            libc::SYS_write,
                            [Arg::Saved, Arg::Data(buf), v(8), v(0), v(0), v(0)],
                            format!("fd {n}: setting the eventfd's counter to {count}"),
                        )
                        .expect(8),
                    );
                }
                place(&mut ops, n, f, "eventfd");
            }
            Object::Epoll { .. } => {
                ops.push(
                    Op::new(
                        libc::SYS_epoll_create1,
                        [v(0); 6],
                        format!("fd {n}: epoll_create1"),
                    )
                    .save(),
                );
                place(&mut ops, n, f, "epoll");
            }
            Object::TimerFd {
                clock,
                value,
                interval,
                ticks,
            } => {
                ops.push(
                    Op::new(
                        libc::SYS_timerfd_create,
                        [v(*clock as u64), v(0), v(0), v(0), v(0), v(0)],
                        format!("fd {n}: timerfd_create (clock {clock})"),
                    )
                    .save(),
                );
                // A periodic timer that expired and was not read since shows
                // no time left (it moves on only when read): armed to expire
                // at once, its reads count the periods since, as the
                // parent's would.
                let value = if *value == (0, 0) && *interval != (0, 0) {
                    (0, 1)
                } else {
                    *value
                };
                if value != (0, 0) {
                    let its = data.words(&[interval.0, interval.1, value.0, value.1]);
                    ops.push(Op::new(
                        libc::SYS_timerfd_settime,
                        [Arg::Saved, v(0), Arg::Data(its), v(0), v(0), v(0)],
                        format!("fd {n}: arming the timer"),
                    ));
                }
                if *ticks > 0 {
                    let t = data.words(&[*ticks]);
                    ops.push(Op::new(
                        libc::SYS_ioctl,
                        [
                            Arg::Saved,
                            v(TFD_IOC_SET_TICKS),
                            Arg::Data(t),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: setting the timer's {ticks} unread expirations"),
                    ));
                }
                place(&mut ops, n, f, "timerfd");
            }
            Object::SignalFd { mask } => {
                let m = data.words(&[*mask]);
                ops.push(
                    Op::new(
                        libc::SYS_signalfd4,
                        [v(-1i64 as u64), Arg::Data(m), v(8), v(0), v(0), v(0)],
                        format!("fd {n}: signalfd4"),
                    )
                    .save(),
                );
                place(&mut ops, n, f, "signalfd");
            }
            Object::Pipe {
                read,
                peer,
                data: bytes,
                size,
            } => {
                if peer.is_some_and(|p| p < n) {
                    continue; // made with its other end
                }
                let arr = data.slot();
                ops.push(
                    Op::new(
                        libc::SYS_pipe2,
                        [
                            Arg::Data(arr),
                            v(libc::O_NONBLOCK as u64),
                            v(0),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: pipe2"),
                    )
                    .expect(0),
                );
                ops.push(Op::new(
                    libc::SYS_fcntl,
                    [
                        Arg::Load(arr),
                        v(libc::F_SETPIPE_SZ as u64),
                        v(*size as u64),
                        v(0),
                        v(0),
                        v(0),
                    ],
                    format!("fd {n}: sizing the pipe to {size} bytes"),
                ));
                let (r, w) = if *read {
                    (Some(n), *peer)
                } else {
                    (*peer, Some(n))
                };
                // The queued bytes are kept with the read end.
                let queued: &[u8] = match (read, r.and_then(|r| objs.get(r))) {
                    (true, _) => bytes,
                    (false, Some(Object::Pipe { data, .. })) => data,
                    _ => &[],
                };
                if !queued.is_empty() {
                    ops.push(write_loaded(
                        data,
                        arr + 4,
                        queued,
                        format!(
                            "fd {n}: putting back the {} bytes in the pipe",
                            queued.len()
                        ),
                    ));
                }
                place_pair(
                    &mut ops,
                    arr,
                    [r.and_then(&entry), w.and_then(&entry)],
                    n,
                    "pipe",
                );
            }
            Object::UnixPair { ty, peer, queue } => {
                if peer.is_some_and(|p| p < n) {
                    continue; // made with its other end
                }
                if peer.is_none() {
                    notes.push(format!(
                        "fd {n}: its unix socket was connected outside the parent; here its peer has closed it"
                    ));
                }
                let arr = data.slot();
                ops.push(
                    Op::new(
                        libc::SYS_socketpair,
                        [
                            v(libc::AF_UNIX as u64),
                            v((*ty | libc::SOCK_NONBLOCK) as u64),
                            v(0),
                            Arg::Data(arr),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: socketpair"),
                    )
                    .expect(0),
                );
                let peer_queue: &[Vec<u8>] = match peer.and_then(|p| objs.get(p)) {
                    Some(Object::UnixPair { queue, .. }) => queue,
                    _ => &[],
                };
                // What each end reads is written at the other.
                for (msgs, via, whose) in [
                    (queue, arr + 4, n),
                    (&peer_queue.to_vec(), arr, peer.unwrap_or(-1)),
                ] {
                    for m in msgs.iter().filter(|m| !m.is_empty()) {
                        ops.push(write_loaded(
                            data,
                            via,
                            m,
                            format!(
                                "fd {whose}: putting back {} bytes queued on the socket",
                                m.len()
                            ),
                        ));
                    }
                }
                place_pair(
                    &mut ops,
                    arr,
                    [Some(f), peer.and_then(&entry)],
                    n,
                    "socket pair",
                );
            }
            Object::Memory {
                kind,
                content,
                seals,
            } => {
                let Context::Scratch { max_fd } = cx else {
                    continue;
                };
                memory(data, &mut ops, f, kind, content, *seals, max_fd + 1);
            }
            Object::Listen {
                family,
                addr,
                reuse_addr,
                reuse_port,
                v6only,
            } => {
                let text = crate::kobj::sockaddr_text(addr);
                ops.push(
                    Op::new(
                        libc::SYS_socket,
                        [
                            v(*family as u64),
                            v(libc::SOCK_STREAM as u64),
                            v(0),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: socket for the listening socket on {text}"),
                    )
                    .save(),
                );
                sockopts(data, &mut ops, n, *reuse_addr, *reuse_port);
                if *family == libc::AF_INET6 {
                    ops.push(sockopt(
                        data,
                        n,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_V6ONLY,
                        *v6only as u64,
                        "IPV6_V6ONLY",
                    ));
                }
                let hint = if *reuse_port {
                    ""
                } else {
                    " (the parent did not set SO_REUSEPORT: a child on its node cannot listen on its port while it does)"
                };
                ops.push(with_addr(
                    data,
                    libc::SYS_bind,
                    addr,
                    format!("fd {n}: binding the listening socket to {text}{hint}"),
                ));
                ops.push(Op::new(
                    libc::SYS_listen,
                    [Arg::Saved, v(BACKLOG), v(0), v(0), v(0), v(0)],
                    format!("fd {n}: listen on {text}"),
                ));
                place(&mut ops, n, f, "listening socket");
            }
            Object::Udp {
                family,
                local,
                peer,
                reuse_addr,
                reuse_port,
            } => {
                ops.push(
                    Op::new(
                        libc::SYS_socket,
                        [
                            v(*family as u64),
                            v(libc::SOCK_DGRAM as u64),
                            v(libc::IPPROTO_UDP as u64),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: UDP socket"),
                    )
                    .save(),
                );
                sockopts(data, &mut ops, n, *reuse_addr, *reuse_port);
                // A connected socket gets a new local port of its own.
                let (nr, addr, what) = match (peer, local) {
                    (Some(p), _) => (libc::SYS_connect, p, "connecting"),
                    (None, Some(l)) => (libc::SYS_bind, l, "binding"),
                    (None, None) => (0, &Vec::new(), ""),
                };
                if nr != 0 {
                    let text = crate::kobj::sockaddr_text(addr);
                    ops.push(with_addr(
                        data,
                        nr,
                        addr,
                        format!("fd {n}: {what} the UDP socket to {text}"),
                    ));
                }
                place(&mut ops, n, f, "UDP socket");
            }
            Object::Closed {
                family,
                ty,
                protocol,
                what,
            } => {
                if *family != libc::AF_UNIX {
                    notes.push(format!(
                        "fd {n}: {what} was the parent's connection; here it is closed"
                    ));
                }
                ops.push(
                    Op::new(
                        libc::SYS_socket,
                        [
                            v(*family as u64),
                            v(*ty as u64),
                            v(*protocol as u64),
                            v(0),
                            v(0),
                            v(0),
                        ],
                        format!("fd {n}: an unconnected socket for {what}"),
                    )
                    .save(),
                );
                place(&mut ops, n, f, "socket");
            }
            Object::Dropped { why } => {
                if !fork {
                    notes.push(format!("fd {n} was dropped at capture: {why}"));
                    ops.push(close(v(n as u64), format!("fd {n}: dropped at capture")));
                }
            }
        }
    }
    // Watches last: everything they watch is in place now.
    for o in &objs.objects {
        let Object::Epoll { watches } = &o.object else {
            continue;
        };
        if fork && !made_here(o.fd) {
            continue;
        }
        for w in watches {
            let mut ev = w.events.to_le_bytes().to_vec();
            ev.extend_from_slice(&w.data.to_le_bytes());
            let e = data.bytes(&ev);
            ops.push(Op::new(
                libc::SYS_epoll_ctl,
                [
                    v(o.fd as u64),
                    v(libc::EPOLL_CTL_ADD as u64),
                    v(w.fd as u64),
                    Arg::Data(e),
                    v(0),
                    v(0),
                ],
                format!("fd {}: watching fd {} (events {:#x})", o.fd, w.fd, w.events),
            ));
        }
    }
    (ops, notes)
}

/// Move the two new descriptors `pipe2`/`socketpair` wrote at `arr` to
/// the numbers of `ends` (those the process has), set their flags, and
/// close the first numbers.
fn place_pair(ops: &mut Vec<Op>, arr: usize, ends: [Option<&FdEntry>; 2], n: i32, what: &str) {
    for (end, at) in ends.into_iter().zip([arr, arr + 4]) {
        if let Some(e) = end {
            ops.push(dup3(
                Arg::Load(at),
                e.fd,
                e,
                format!("fd {}: the {what}'s end", e.fd),
            ));
            ops.push(setfl(e));
        }
    }
    for at in [arr, arr + 4] {
        ops.push(close(
            Arg::Load(at),
            format!("fd {n}: closing the new {what}'s first numbers"),
        ));
    }
}

/// `write` of `bytes` (all of them) to the descriptor whose number is the
/// int at data offset `fd_at`.
fn write_loaded(data: &mut Data, fd_at: usize, bytes: &[u8], what: String) -> Op {
    let b = data.bytes(bytes);
    Op::new(
        libc::SYS_write,
        [
            Arg::Load(fd_at),
            Arg::Data(b),
            v(bytes.len() as u64),
            v(0),
            v(0),
            v(0),
        ],
        what,
    )
    .expect(bytes.len() as u64)
}

/// `bind` or `connect` (`nr`) of the saved socket to `addr` (sockaddr
/// bytes).
fn with_addr(data: &mut Data, nr: i64, addr: &[u8], what: String) -> Op {
    let a = data.bytes(addr);
    Op::new(
        nr,
        [
            Arg::Saved,
            Arg::Data(a),
            v(addr.len() as u64),
            v(0),
            v(0),
            v(0),
        ],
        what,
    )
}

/// Move the saved new descriptor to its number and set its flags.
fn place(ops: &mut Vec<Op>, n: i32, f: &FdEntry, what: &str) {
    ops.push(dup3(
        Arg::Saved,
        n,
        f,
        format!("fd {n}: placing the {what}"),
    ));
    ops.push(close(
        Arg::Saved,
        format!("fd {n}: closing the {what}'s first number"),
    ));
    ops.push(setfl(f));
}

fn dup3(from: Arg, n: i32, f: &FdEntry, what: String) -> Op {
    let cloexec = (f.flags as i32 & libc::O_CLOEXEC) as u64;
    Op::new(
        libc::SYS_dup3,
        [from, v(n as u64), v(cloexec), v(0), v(0), v(0)],
        what,
    )
    .expect(n as u64)
}

fn close(fd: Arg, what: String) -> Op {
    Op::new(libc::SYS_close, [fd, v(0), v(0), v(0), v(0), v(0)], what)
}

/// The file status flags the parent's descriptor had (`O_NONBLOCK`,
/// `O_APPEND`).
fn setfl(f: &FdEntry) -> Op {
    let fl = f.flags as i32 & (libc::O_NONBLOCK | libc::O_APPEND);
    fcntl(
        f.fd,
        libc::F_SETFL,
        fl as u64,
        format!("fd {}: its file status flags", f.fd),
    )
}

/// `fcntl(fd, cmd, arg)`.
pub(super) fn fcntl(fd: i32, cmd: i32, arg: u64, what: String) -> Op {
    Op::new(
        libc::SYS_fcntl,
        [v(fd as u64), v(cmd as u64), v(arg), v(0), v(0), v(0)],
        what,
    )
}

fn sockopt(data: &mut Data, n: i32, level: i32, opt: i32, val: u64, name: &str) -> Op {
    let one = data.words(&[val]);
    Op::new(
        libc::SYS_setsockopt,
        [
            Arg::Saved,
            v(level as u64),
            v(opt as u64),
            Arg::Data(one),
            v(4),
            v(0),
        ],
        format!("fd {n}: {name}"),
    )
}

fn sockopts(data: &mut Data, ops: &mut Vec<Op>, n: i32, reuse_addr: bool, reuse_port: bool) {
    if reuse_addr {
        ops.push(sockopt(
            data,
            n,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            1,
            "SO_REUSEADDR",
        ));
    }
    if reuse_port {
        ops.push(sockopt(
            data,
            n,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            1,
            "SO_REUSEPORT",
        ));
    }
}

/// A memfd or unlinked file with the seed's contents, offset and seals,
/// open with the parent's access mode. `temp` is the first free number
/// (only a child restored from scratch makes these: template children share
/// the template's, as fork children share their parent's).
fn memory(
    data: &mut Data,
    ops: &mut Vec<Op>,
    f: &FdEntry,
    kind: &MemoryKind,
    content: &[u8],
    seals: u32,
    temp: i32,
) {
    let n = f.fd;
    let create = match kind {
        MemoryKind::Memfd { name } => {
            let p = data.cstr(name);
            Op::new(
                libc::SYS_memfd_create,
                [Arg::Data(p), v(MFD_ALLOW_SEALING), v(0), v(0), v(0), v(0)],
                format!("fd {n}: memfd_create({name})"),
            )
        }
        MemoryKind::Unlinked { dir } => {
            let p = data.cstr(dir);
            Op::new(
                libc::SYS_open,
                [
                    Arg::Data(p),
                    v((libc::O_TMPFILE | libc::O_RDWR) as u64),
                    v(0o600),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("fd {n}: an unlinked file in {dir} (O_TMPFILE)"),
            )
        }
    };
    ops.push(create.expect(temp as u64));
    if !content.is_empty() {
        let b = data.bytes(content);
        ops.push(
            Op::new(
                libc::SYS_write,
                [
                    v(temp as u64),
                    Arg::Data(b),
                    v(content.len() as u64),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("fd {n}: writing its {} bytes", content.len()),
            )
            .expect(content.len() as u64),
        );
    }
    // Only a memfd made with MFD_ALLOW_SEALING takes seals; a tmpfs file
    // (an unlinked one in /dev/shm) reports F_SEAL_SEAL, as a new one has.
    if seals != 0 && matches!(kind, MemoryKind::Memfd { .. }) {
        ops.push(fcntl(
            temp,
            libc::F_ADD_SEALS,
            seals as u64,
            format!("fd {n}: its seals {seals:#x}"),
        ));
    }
    // Opened again with the parent's access mode when it was not O_RDWR.
    let acc = f.flags as i32 & libc::O_ACCMODE;
    let at = if acc != libc::O_RDWR {
        let p = data.cstr(&format!("/proc/self/fd/{temp}"));
        ops.push(
            Op::new(
                libc::SYS_open,
                [Arg::Data(p), v(acc as u64), v(0), v(0), v(0), v(0)],
                format!("fd {n}: reopening it with its access mode"),
            )
            .expect(temp as u64 + 1),
        );
        temp + 1
    } else {
        temp
    };
    ops.push(Op::new(
        libc::SYS_lseek,
        [
            v(at as u64),
            v(f.offset),
            v(libc::SEEK_SET as u64),
            v(0),
            v(0),
            v(0),
        ],
        format!("fd {n}: its offset {}", f.offset),
    ));
    ops.push(dup3(
        v(at as u64),
        n,
        f,
        format!("fd {n}: placing the file"),
    ));
    if at != temp {
        ops.push(close(
            v(at as u64),
            format!("fd {n}: closing the reopened number"),
        ));
    }
    ops.push(close(
        v(temp as u64),
        format!("fd {n}: closing the file's first number"),
    ));
    ops.push(setfl(f));
}
