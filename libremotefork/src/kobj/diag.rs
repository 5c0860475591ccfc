//! The peers of `AF_UNIX` sockets, from the kernel's socket diagnostics
//! (`NETLINK_SOCK_DIAG`, as `ss -x` reads them): which inode each socket
//! is connected to. Covers the sockets of forkd's network namespace.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `UDIAG_SHOW_PEER`.
const UDIAG_SHOW_PEER: u32 = 0x4;
/// `UNIX_DIAG_PEER`.
const UNIX_DIAG_PEER: u16 = 2;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR: usize = 16;
/// `sizeof(struct unix_diag_msg)`.
const UNIX_DIAG_MSG: usize = 16;

/// Every `AF_UNIX` socket's peer inode, by inode (sockets without a peer
/// are left out).
pub fn unix_peers() -> io::Result<HashMap<u64, u64>> {
    // SAFETY: socket() has no memory arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a descriptor we just opened and own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    // nlmsghdr + unix_diag_req {family, protocol, pad, states, ino, show, cookie[2]}.
    let mut req = Vec::with_capacity(NLMSG_HDR + 24);
    req.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: req is a valid buffer of req.len() bytes for the call.
    let n = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut peers = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_dump(&buf[..n as usize], &mut peers)? {
            return Ok(peers);
        }
    }
}

/// Parse one datagram of the dump into `peers`; true at its end.
fn parse_dump(mut b: &[u8], peers: &mut HashMap<u64, u64>) -> io::Result<bool> {
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        let ty = u16_at(b, 4);
        if len < NLMSG_HDR || len > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a truncated socket diagnostics message",
            ));
        }
        match ty as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = if len >= NLMSG_HDR + 4 {
                    -(u32_at(b, NLMSG_HDR) as i32)
                } else {
                    libc::EIO
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            _ if len >= NLMSG_HDR + UNIX_DIAG_MSG => {
                let msg = &b[NLMSG_HDR..len];
                let ino = u32_at(msg, 4) as u64;
                let mut attrs = &msg[UNIX_DIAG_MSG..];
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0) as usize;
                    let aty = u16_at(attrs, 2);
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    if aty == UNIX_DIAG_PEER && alen >= 8 {
                        let peer = u32_at(attrs, 4) as u64;
                        if peer != 0 {
                            peers.insert(ino, peer);
                        }
                    }
                    attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
                }
            }
            _ => {}
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    fn ino(s: &UnixStream) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .unwrap()
            .ino()
    }

    #[test]
    fn a_socket_pairs_peers_are_each_other() {
        let (a, b) = UnixStream::pair().unwrap();
        let peers = match unix_peers() {
            Ok(p) => p,
            Err(e) => {
                println!("SKIPPED: socket diagnostics unavailable here: {e}");
                return;
            }
        };
        assert_eq!(peers.get(&ino(&a)), Some(&ino(&b)));
        assert_eq!(peers.get(&ino(&b)), Some(&ino(&a)));
    }
}
