//! Per-process state readable from outside without stopping the process:
//! resource limits (`prlimit`) and the robust futex list (`get_robust_list`).

use std::io;

use libc::pid_t;

use crate::last_os_error;

/// Number of resource limits Linux defines (`RLIMIT_NLIMITS`).
pub const RLIMIT_COUNT: u32 = 16;

/// Errors of these calls.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// `prlimit` failed.
    #[error("prlimit({resource}) on process {pid} failed: {source}")]
    Prlimit {
        /// The process.
        pid: pid_t,
        /// RLIMIT_* number.
        resource: u32,
        /// The underlying error.
        source: io::Error,
    },
    /// `get_robust_list` failed.
    #[error("get_robust_list on process {pid} failed: {source}")]
    RobustList {
        /// The process.
        pid: pid_t,
        /// The underlying error.
        source: io::Error,
    },
}

/// `prlimit(pid, resource, NULL, &old)`: (soft, hard).
pub fn rlimit(pid: pid_t, resource: u32) -> Result<(u64, u64), ProcError> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: new_limit is NULL (read only); old points to a writable rlimit64.
    let r = unsafe {
        libc::prlimit64(
            pid,
            resource as libc::__rlimit_resource_t,
            std::ptr::null(),
            &mut old,
        )
    };
    if r != 0 {
        let source = last_os_error();
        // Reading another user's limits needs CAP_SYS_RESOURCE, which root
        // may lack (containers); /proc/PID/limits says the same to root.
        if source.raw_os_error() == Some(libc::EPERM) {
            if let Some(l) = limits_file(pid, resource) {
                return Ok(l);
            }
        }
        return Err(ProcError::Prlimit {
            pid,
            resource,
            source,
        });
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// One limit from `/proc/PID/limits` (a header, then one line per
/// resource in `RLIMIT_*` order: a 25-column name, soft, hard, units).
fn limits_file(pid: pid_t, resource: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_limit_line(text.lines().nth(resource as usize + 1)?)
}

fn parse_limit_line(line: &str) -> Option<(u64, u64)> {
    let mut v = line.get(25..)?.split_whitespace().map(|t| match t {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    });
    Some((v.next()??, v.next()??))
}

/// `get_robust_list(pid)`: (head address, length). The caller must be allowed
/// to ptrace `pid`.
pub fn robust_list(pid: pid_t) -> Result<(u64, u64), ProcError> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: both out-pointers point to writable locals of the sizes the
    // syscall writes (a pointer and a size_t).
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            pid,
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    };
    if r != 0 {
        return Err(ProcError::RobustList {
            pid,
            source: last_os_error(),
        });
    }
    Ok((head, len as u64))
}

/// Which side of a `fork()` this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The parent; the child's pid.
    Parent(pid_t),
    /// The child.
    Child,
}

/// `fork()` through libc (so `pthread_atfork` handlers run).
///
/// # Safety
/// In a multi-threaded process the child may only use async-signal-safe
/// functions until it execs or is replaced; the caller must keep to that.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller upholds the post-fork restrictions.
    match unsafe { libc::fork() } {
        -1 => Err(last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// `dup2(old, new)`.
pub fn dup2(old: std::os::fd::RawFd, new: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    if unsafe { libc::dup2(old, new) } < 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Read one line from `fd` a byte at a time (so nothing after the newline
/// is consumed), up to `max` bytes. `None` on end of file before any byte.
pub fn read_line_raw(fd: std::os::fd::RawFd, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let mut b = 0u8;
        // SAFETY: reads at most one byte into `b`.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        match n {
            1 if b == b'\n' => return Ok(Some(line)),
            1 => {
                line.push(b);
                if line.len() >= max {
                    return Ok(Some(line));
                }
            }
            0 if line.is_empty() => return Ok(None),
            0 => return Ok(Some(line)),
            _ => {
                let e = last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// `_exit(code)`: leave without running atexit handlers or flushing stdio.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// `kill(pid, sig)`.
pub fn signal(pid: pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// SIGKILL `pid` (our child) and reap it.
pub fn kill_and_reap(pid: pid_t) {
    // SAFETY: plain kill(2) and waitpid(2) of our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
}

/// Reap the process behind `pidfd` if it has ended (`waitid(P_PIDFD,
/// WEXITED | WNOHANG)`); `None` while it runs. It must be our child.
pub fn try_reap(pidfd: std::os::fd::RawFd) -> io::Result<Option<Ended>> {
    // SAFETY: siginfo_t is plain old data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid out-pointer; pidfd is a descriptor.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r != 0 {
        return Err(last_os_error());
    }
    // SAFETY: waitid filled `info` for an ended child, or left si_pid 0.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        Ended::Exited(status)
    } else {
        Ended::Killed(status)
    }))
}

/// `struct pidfd_info` (Linux 6.13+; the exit fields 6.15+).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
    coredump_mask: u32,
    spare: u32,
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;
/// `PIDFD_INFO_EXIT`.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// How the process behind `pidfd` ended, for a process that is not our
/// child (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux 6.15+: the kernel
/// keeps the status with the pidfd once the process has been reaped by
/// whoever its parent is). `Ok(None)`: it has not ended yet, or the kernel
/// keeps no status for it (then `Err` names why on older kernels).
pub fn pidfd_exit_status(pidfd: std::os::fd::RawFd) -> io::Result<Option<Ended>> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes one struct pidfd_info, which
    // `info` is (with the kernel's layout), for the duration of the call.
    let r = unsafe { libc::ioctl(pidfd, PIDFD_GET_INFO, &mut info as *mut PidfdInfo) };
    if r != 0 {
        let e = last_os_error();
        // ESRCH: the process is gone and its pidfd carries no status.
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    if info.mask & PIDFD_INFO_EXIT == 0 {
        return Ok(None);
    }
    let st = info.exit_code;
    Ok(Some(if libc::WIFSIGNALED(st) {
        Ended::Killed(libc::WTERMSIG(st))
    } else {
        Ended::Exited(libc::WEXITSTATUS(st))
    }))
}

/// `pidfd_send_signal(pidfd, sig)`: signal the process behind `pidfd`
/// (never another that reused its pid).
pub fn pidfd_signal(pidfd: std::os::fd::RawFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd as libc::c_long,
            sig as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_info_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<PidfdInfo>(), 72);
        assert_eq!(PIDFD_GET_INFO, 0xc048_ff0b);
    }

    #[test]
    fn own_limits_and_robust_list() {
        // SAFETY: getpid never fails.
        let me = unsafe { libc::getpid() };
        let (soft, hard) = rlimit(me, libc::RLIMIT_NOFILE).unwrap();
        assert!(soft <= hard);
        let (head, len) = robust_list(0).unwrap();
        // glibc registers a robust list for every thread.
        assert_ne!(head, 0);
        assert!(len > 0);
        let _ = me;
    }
}

/// A connected pair of Unix datagram sockets (close-on-exec), for passing
/// descriptors with [`send_fds`].
pub fn fd_socketpair() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut sv = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into `sv`, which has room.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(sv[0]),
            std::os::fd::OwnedFd::from_raw_fd(sv[1]),
        )
    })
}

/// Most descriptors [`send_fds`] passes in one message.
pub const MAX_PASSED_FDS: usize = 8;

/// Send one byte and `fds` (`SCM_RIGHTS`) on the datagram socket `sock`.
pub fn send_fds(sock: std::os::fd::RawFd, fds: &[std::os::fd::RawFd]) -> io::Result<()> {
    if fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no descriptor to pass",
        ));
    }
    send_msg(sock, b"f", fds)
}

/// Send `data` and `fds` (`SCM_RIGHTS`, at most [`MAX_PASSED_FDS`]) as one
/// message on the datagram or sequenced-packet socket `sock`.
pub fn send_msg(
    sock: std::os::fd::RawFd,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
) -> io::Result<()> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "can pass at most {MAX_PASSED_FDS} descriptors, not {}",
                fds.len()
            ),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // Room for MAX_PASSED_FDS descriptors, aligned for cmsghdr.
    let mut control = [0u64; 8];
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(data_len as u32) as usize,
            libc::CMSG_LEN(data_len as u32) as usize,
        )
    };
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `control`, which holds `space` bytes, so
        // CMSG_FIRSTHDR is non-null and its data has room for `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = len;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
        }
    }
    // SAFETY: sendmsg reads `msg`, `iov`, `data` and `control`, all alive
    // here; sendmsg does not write through the iovec.
    let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if r != data.len() as isize {
        return Err(if r < 0 {
            last_os_error()
        } else {
            io::Error::other("short send")
        });
    }
    Ok(())
}

/// Receive one message into `buf` on the datagram or sequenced-packet
/// socket `sock`, with the descriptors it carries (close-on-exec). Returns
/// the bytes received (0: the peer closed a sequenced-packet socket).
pub fn recv_msg(
    sock: std::os::fd::RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::FromRawFd;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg writes at most `buf.len()` bytes into `buf` and at
    // most `msg_controllen` into `control`, both alive here.
    let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; the CMSG_* macros walk
    // it within msg_controllen. Each passed descriptor is new in our table
    // and owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..n {
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other(
            "a message or its descriptors were cut short",
        ));
    }
    Ok((r as usize, fds))
}

/// Descriptor numbers open in `pid`, ascending.
pub fn open_fds(pid: pid_t) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

#[cfg(test)]
mod fd_passing_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn limits_file_lines_read_as_prlimit_does() {
        // Every resource of our own process, both ways.
        for r in 0..16 {
            assert_eq!(
                limits_file(std::process::id() as i32, r),
                Some(rlimit(0, r).unwrap()),
                "resource {r}"
            );
        }
        assert_eq!(
            parse_limit_line(
                "Max open files            1024                 524288               files     "
            ),
            Some((1024, 524288))
        );
        assert_eq!(
            parse_limit_line(
                "Max cpu time              unlimited            unlimited            seconds   "
            ),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(parse_limit_line("Limit"), None);
    }

    #[test]
    fn passes_descriptors_that_stay_usable() {
        let (a, b) = fd_socketpair().unwrap();
        let (r, w) = std::io::pipe().unwrap();
        send_fds(a.as_raw_fd(), &[w.as_raw_fd()]).unwrap();
        // Receive with recvmsg as the child would.
        let mut byte = [0u8];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = [0u64; 8];
        // SAFETY: as in send_fds; recvmsg writes into `byte` and `control`.
        let fd = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            assert_eq!(libc::recvmsg(b.as_raw_fd(), &mut msg, 0), 1);
            let c = libc::CMSG_FIRSTHDR(&msg);
            assert!(!c.is_null());
            assert_eq!((*c).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>())
        };
        assert_ne!(fd, w.as_raw_fd());
        use std::io::{Read, Write};
        // SAFETY: `fd` was just received and is owned by nobody else.
        let mut w2 = unsafe { std::fs::File::from_raw_fd(fd) };
        use std::os::fd::FromRawFd;
        w2.write_all(b"x").unwrap();
        drop((w, w2));
        let mut s = String::new();
        let mut r = r;
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "x");
        assert!(send_fds(a.as_raw_fd(), &[]).is_err());
        assert!(open_fds(std::process::id() as i32)
            .unwrap()
            .contains(&a.as_raw_fd()));
    }
}
