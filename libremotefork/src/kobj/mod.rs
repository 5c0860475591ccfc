//! Kernel objects behind a process's descriptors: what capture records of
//! each one that is not a file reopened by path (epoll sets, eventfds,
//! pipes, socket pairs, timerfds, signalfds, memfds and unlinked files,
//! sockets), so that restore can make each child its own, as `fork()`
//! gives a child the parent's.
//!
//! Capture ([`capture`]) reads them while the parent is stopped: their
//! state is shared with the parent, which changes it as soon as it runs.
//! Every descriptor is then either described here (recreated in children),
//! or capture fails naming it and its kind, or (only when asked, with
//! [`FdPolicy::drop_unsupported`]) it is recorded as [`Object::Dropped`]:
//! closed in children, with a note each spawn reports.

mod diag;
mod live;

use serde::{Deserialize, Serialize};

pub use live::{capture, FdError, FdPolicy};

/// Bytes of unlinked-file and memfd contents one seed may keep.
pub const MAX_CONTENT_BYTES: u64 = 64 << 20;

/// What format 5 adds to a descriptor: the kernel objects behind its
/// descriptors, one entry per descriptor that is not reopened by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdObjects {
    /// By ascending descriptor number.
    pub objects: Vec<FdObject>,
}

impl FdObjects {
    /// The object at descriptor `fd`.
    pub fn get(&self, fd: i32) -> Option<&Object> {
        self.objects.iter().find(|o| o.fd == fd).map(|o| &o.object)
    }

    /// Total content bytes kept (pipe and socket queues, file contents).
    pub fn content_bytes(&self) -> u64 {
        self.objects
            .iter()
            .map(|o| match &o.object {
                Object::Pipe { data, .. } => data.len() as u64,
                Object::UnixPair { queue, .. } => queue.iter().map(|m| m.len() as u64).sum(),
                Object::Memory { content, .. } => content.len() as u64,
                _ => 0,
            })
            .sum()
    }
}

/// One descriptor's object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdObject {
    /// The descriptor number.
    pub fd: i32,
    /// What is behind it.
    pub object: Object,
}

/// One epoll watch: `epoll_ctl(EPOLL_CTL_ADD, fd, {events, data})`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollWatch {
    /// The watched descriptor's number.
    pub fd: i32,
    /// The event mask, with `EPOLLET`, `EPOLLONESHOT`... (a fired one-shot
    /// watch has no event bits left: it is added disarmed).
    pub events: u32,
    /// The user data.
    pub data: u64,
}

/// Which kind of unlinked file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryKind {
    /// A `memfd_create` file with this name.
    Memfd {
        /// Its name (without the `memfd:` prefix).
        name: String,
    },
    /// A regular file unlinked from this directory: recreated there with
    /// `O_TMPFILE`.
    Unlinked {
        /// The directory it was in.
        dir: String,
    },
}

/// The kernel object behind a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    /// The same open file description as the lower descriptor `of` (a
    /// `dup`): the child's is a `dup` of its `of`.
    Dup {
        /// The lowest descriptor of the description.
        of: i32,
    },
    /// An eventfd.
    EventFd {
        /// Its counter.
        count: u64,
        /// `EFD_SEMAPHORE`.
        semaphore: bool,
    },
    /// An epoll instance and its interest list.
    Epoll {
        /// The watches, in the order the kernel lists them.
        watches: Vec<EpollWatch>,
    },
    /// A timerfd.
    TimerFd {
        /// Its clock.
        clock: i32,
        /// Time to the next expiration (seconds, nanoseconds); zero when
        /// disarmed.
        value: (u64, u64),
        /// The period (seconds, nanoseconds).
        interval: (u64, u64),
        /// Expirations not read yet.
        ticks: u64,
    },
    /// A signalfd.
    SignalFd {
        /// Its signal mask.
        mask: u64,
    },
    /// One end of a pipe.
    Pipe {
        /// This is the read end.
        read: bool,
        /// The descriptor of the other end, when the process has it; none
        /// when nobody has it (the child's other end is closed too).
        peer: Option<i32>,
        /// The bytes in the pipe (kept on the read end's entry).
        data: Vec<u8>,
        /// The pipe's capacity (`F_GETPIPE_SZ`).
        size: u32,
    },
    /// One end of a connected `AF_UNIX` socket.
    UnixPair {
        /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
        ty: i32,
        /// The descriptor of the other end, when the process has it; none
        /// when the peer is outside the process (or gone): the child's
        /// other end is closed, so the child reads what was queued for it
        /// and then end-of-file, as after the peer closed.
        peer: Option<i32>,
        /// What was queued for this end to read: the stream's bytes, or
        /// one entry per datagram.
        queue: Vec<Vec<u8>>,
    },
    /// A memfd or unlinked regular file.
    Memory {
        /// Which kind.
        kind: MemoryKind,
        /// Its contents.
        content: Vec<u8>,
        /// Its seals (`F_GET_SEALS`).
        seals: u32,
    },
    /// A listening TCP socket: bound again to its address in each child.
    Listen {
        /// `AF_INET` or `AF_INET6`.
        family: i32,
        /// Its `sockaddr` bytes.
        addr: Vec<u8>,
        /// `SO_REUSEADDR`.
        reuse_addr: bool,
        /// `SO_REUSEPORT`: the parent and children can then all listen on
        /// the same port of one node.
        reuse_port: bool,
        /// `IPV6_V6ONLY` (`AF_INET6`).
        v6only: bool,
    },
    /// A UDP socket: bound to its address (port 0 when it is connected,
    /// which picks a new local port) and connected to its peer.
    Udp {
        /// `AF_INET` or `AF_INET6`.
        family: i32,
        /// Its local `sockaddr`, when bound.
        local: Option<Vec<u8>>,
        /// Its peer's `sockaddr`, when connected.
        peer: Option<Vec<u8>>,
        /// `SO_REUSEADDR`.
        reuse_addr: bool,
        /// `SO_REUSEPORT`.
        reuse_port: bool,
    },
    /// A socket whose connection is to the outside (a TCP connection): in
    /// the child a socket of the same family, type and protocol that is
    /// not connected, as after the connection was lost: `poll` reports
    /// `POLLHUP`, reads fail with `ENOTCONN`, writes with `EPIPE`.
    Closed {
        /// Domain.
        family: i32,
        /// Type.
        ty: i32,
        /// Protocol.
        protocol: i32,
        /// What it was, for notes ("TCP 10.0.0.1:5000 -> 10.0.0.2:443").
        what: String,
    },
    /// Dropped at capture (asked for): closed in children.
    Dropped {
        /// What it was and why it could not be kept.
        why: String,
    },
}

impl Object {
    /// A short name of its kind, for messages and `inspect`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Object::Dup { .. } => "dup",
            Object::EventFd { .. } => "eventfd",
            Object::Epoll { .. } => "epoll",
            Object::TimerFd { .. } => "timerfd",
            Object::SignalFd { .. } => "signalfd",
            Object::Pipe { .. } => "pipe",
            Object::UnixPair { .. } => "unix socket",
            Object::Memory {
                kind: MemoryKind::Memfd { .. },
                ..
            } => "memfd",
            Object::Memory { .. } => "unlinked file",
            Object::Listen { .. } => "listening TCP socket",
            Object::Udp { .. } => "UDP socket",
            Object::Closed { .. } => "outside connection",
            Object::Dropped { .. } => "dropped",
        }
    }

    /// Is it made anew in each child forked from a template (rather than
    /// inherited from the template, shared with siblings as `fork()`
    /// children share their parent's)? Listening sockets and unlinked
    /// files are shared, as they are after `fork()`; everything whose state
    /// one child would take from another (queues, counters, timers, an
    /// epoll set) is the child's own.
    pub fn own_per_fork(&self) -> bool {
        match self {
            Object::Listen { .. } | Object::Memory { .. } | Object::Dropped { .. } => false,
            Object::Udp { peer, .. } => peer.is_some(),
            Object::Dup { .. } => false, // decided by what it duplicates
            _ => true,
        }
    }
}

/// Parse a `key: value` field of an fdinfo text.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// An eventfd's state from its fdinfo: (counter, semaphore).
pub fn parse_eventfd(text: &str) -> Option<(u64, bool)> {
    let count = u64::from_str_radix(field(text, "eventfd-count")?, 16).ok()?;
    let semaphore = field(text, "eventfd-semaphore").is_some_and(|v| v == "1");
    Some((count, semaphore))
}

/// The watches of an epoll fdinfo, with each target's inode.
pub fn parse_epoll(text: &str) -> Vec<(EpollWatch, u64)> {
    let mut out = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("tfd:") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let get = |k: &str| -> Option<&str> {
            words
                .iter()
                .position(|w| *w == k)
                .and_then(|i| words.get(i + 1).copied())
        };
        let ino = words
            .iter()
            .find_map(|w| w.strip_prefix("ino:"))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0);
        let (Some(fd), Some(events), Some(data)) = (
            words.first().and_then(|w| w.parse().ok()),
            get("events:").and_then(|v| u32::from_str_radix(v, 16).ok()),
            get("data:").and_then(|v| u64::from_str_radix(v, 16).ok()),
        ) else {
            continue;
        };
        out.push((EpollWatch { fd, events, data }, ino));
    }
    out
}

/// A timerfd's state from its fdinfo: (clock, value, interval, ticks,
/// settime flags).
#[allow(clippy::type_complexity)]
pub fn parse_timerfd(text: &str) -> Option<(i32, (u64, u64), (u64, u64), u64, u32)> {
    let pair = |k: &str| -> Option<(u64, u64)> {
        let v = field(text, k)?
            .trim_start_matches('(')
            .trim_end_matches(')');
        let (a, b) = v.split_once(',')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    };
    Some((
        field(text, "clockid")?.parse().ok()?,
        pair("it_value")?,
        pair("it_interval")?,
        field(text, "ticks")?.parse().ok()?,
        u32::from_str_radix(field(text, "settime flags")?, 8).ok()?,
    ))
}

/// A signalfd's mask from its fdinfo.
pub fn parse_signalfd(text: &str) -> Option<u64> {
    u64::from_str_radix(field(text, "sigmask")?, 16).ok()
}

/// The inode in a `pipe:[N]` or `socket:[N]` link.
pub fn link_inode(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// A `sockaddr` (IPv4 or IPv6) as text, for messages.
pub fn sockaddr_text(b: &[u8]) -> String {
    let family = b.get(..2).map(|f| u16::from_ne_bytes([f[0], f[1]]) as i32);
    let port = b
        .get(2..4)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .unwrap_or(0);
    match family {
        Some(libc::AF_INET) if b.len() >= 8 => {
            format!("{}.{}.{}.{}:{port}", b[4], b[5], b[6], b[7])
        }
        Some(libc::AF_INET6) if b.len() >= 24 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
        }
        Some(libc::AF_UNIX) => {
            let p = &b[2..];
            match p.first() {
                None => "unnamed".into(),
                Some(0) => format!(
                    "@{}",
                    String::from_utf8_lossy(&p[1..]).trim_end_matches('\0')
                ),
                Some(_) => String::from_utf8_lossy(p)
                    .trim_end_matches('\0')
                    .to_string(),
            }
        }
        _ => format!("family {family:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_fdinfo_is_read() {
        let t = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\neventfd-count:                5\neventfd-id: 4\neventfd-semaphore: 1\n";
        assert_eq!(parse_eventfd(t), Some((5, true)));
        let t = "eventfd-count:               1f\n";
        assert_eq!(parse_eventfd(t), Some((31, false)));
        assert_eq!(parse_eventfd("pos: 0\n"), None);
    }

    #[test]
    fn epoll_fdinfo_watches_are_read() {
        let t = "pos:\t0\nflags:\t02000002\ntfd:        3 events: 80000019 data:                3  pos:0 ino:40e sdev:10\ntfd:       12 events: 40000000 data: ffffffffffffffff  pos:0 ino:36a4e6 sdev:f\n";
        let w = parse_epoll(t);
        assert_eq!(w.len(), 2);
        assert_eq!(
            w[0],
            (
                EpollWatch {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 3
                },
                0x40e
            )
        );
        assert_eq!(w[1].0.fd, 12);
        assert_eq!(w[1].0.data, u64::MAX);
        assert_eq!(w[1].1, 0x36a4e6);
    }

    #[test]
    fn timerfd_fdinfo_is_read() {
        let t = "clockid: 1\nticks: 3\nsettime flags: 01\nit_value: (1, 999141443)\nit_interval: (0, 100000000)\n";
        assert_eq!(
            parse_timerfd(t),
            Some((1, (1, 999_141_443), (0, 100_000_000), 3, 1))
        );
        assert_eq!(parse_timerfd("clockid: 1\n"), None);
    }

    #[test]
    fn signalfd_and_links_are_read() {
        assert_eq!(parse_signalfd("sigmask:\t0000000000000200\n"), Some(0x200));
        assert_eq!(link_inode("pipe:[3581158]"), Some(3581158));
        assert_eq!(link_inode("socket:[12]"), Some(12));
        assert_eq!(link_inode("/tmp/x"), None);
    }

    #[test]
    fn sockaddrs_read_as_text() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(sockaddr_text(&v4), "127.0.0.1:8080");
        let mut un = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        un.extend_from_slice(b"/run/x.sock\0");
        assert_eq!(sockaddr_text(&un), "/run/x.sock");
    }
}
