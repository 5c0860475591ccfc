//! userfaultfd: the raw ioctls the pager needs, and taking a child's
//! userfaultfd with `pidfd_getfd`.
//!
//! Written against the kernel ABI directly (`linux/userfaultfd.h`) rather
//! than a crate, so that `EAGAIN` and `EEXIST` from `UFFDIO_COPY` are seen as
//! what they are (the `userfaultfd` crate reports `EAGAIN` as a huge partial
//! copy count).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::last_os_error;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;
const UFFDIO_CONTINUE: libc::c_ulong = 0xc020_aa07;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;

/// `UFFD_FEATURE_EVENT_FORK`.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_EVENT_UNMAP`.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_MINOR_SHMEM` (Linux 5.14).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_POISON` (Linux 6.6).
pub const FEATURE_POISON: u64 = 1 << 14;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
const REGISTER_MODE_MINOR: u64 = 4;
/// `UFFDIO_COPY_MODE_DONTWAKE`.
const COPY_MODE_DONTWAKE: u64 = 1;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Size of `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// An ioctl failed.
    #[error("userfaultfd {op} failed: {source}")]
    Ioctl {
        /// Which.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// Taking the child's descriptor failed.
    #[error("cannot take fd {fd} of process {pid} (pidfd_getfd): {source}")]
    TakeFd {
        /// The process.
        pid: i32,
        /// Its fd.
        fd: i32,
        /// The underlying error.
        source: io::Error,
    },
    /// The kernel lacks a feature the pager needs.
    #[error("this kernel's userfaultfd lacks features {missing:#x} (has {have:#x})")]
    Features {
        /// Missing bits.
        missing: u64,
        /// Available bits.
        have: u64,
    },
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// A thread faulted on a missing page at `address`.
    PageFault {
        /// Faulting address (not page aligned).
        address: u64,
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
    },
    /// The process forked; `ufd` is a new userfaultfd (in our fd table) for the child.
    Fork {
        /// The new descriptor.
        ufd: RawFd,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)` dropped `[start, end)`.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `munmap` removed `[start, end)`.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// A message type this code does not know.
    Unknown(u8),
}

impl Msg {
    /// Decode one 32-byte `uffd_msg`.
    pub fn decode(b: &[u8; MSG_SIZE]) -> Msg {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        match b[0] {
            EVENT_PAGEFAULT => Msg::PageFault {
                flags: u64_at(8),
                address: u64_at(16),
            },
            EVENT_FORK => Msg::Fork {
                ufd: u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as RawFd,
            },
            EVENT_REMAP => Msg::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            EVENT_REMOVE => Msg::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            EVENT_UNMAP => Msg::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            other => Msg::Unknown(other),
        }
    }
}

/// Why a `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` did not fill the whole range.
#[derive(Debug)]
pub enum FillError {
    /// The first page is already there (another thread, or a racing fault).
    Exists,
    /// The address space is changing (events pending): `done` bytes went in; read the events and retry.
    Again {
        /// Bytes filled before stopping.
        done: u64,
    },
    /// The range is no longer registered or mapped (`ENOENT`), or the process is gone (`ESRCH`).
    Gone,
    /// Anything else.
    Other(io::Error),
}

/// A userfaultfd owned by the pager.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

#[repr(C)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct WriteProtectArg {
    range: Range,
    mode: u64,
}

#[repr(C)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

impl Uffd {
    /// Wrap a userfaultfd (e.g. from a fork event).
    pub fn from_owned(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// Make reads of it non-blocking (the pager's epoll needs that).
    pub fn set_nonblocking(&self) -> std::io::Result<()> {
        // SAFETY: fcntl on a descriptor we own.
        let fl = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A copy of the descriptor (the same userfaultfd).
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Take descriptor `fd` of process `pid` with `pidfd_open` + `pidfd_getfd`.
    pub fn take_from(pid: i32, fd: i32) -> Result<Uffd, UffdError> {
        let err = |source| UffdError::TakeFd { pid, fd, source };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            return Err(err(last_os_error()));
        }
        // SAFETY: pidfd is a fresh descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        // SAFETY: pidfd_getfd duplicates the target's fd into our table.
        let ufd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if ufd < 0 {
            return Err(err(last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
        // Our copy must be non-blocking for the epoll loop.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_SETFL,
                fl | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
        }
        Ok(Uffd { fd })
    }

    /// Another descriptor for the same userfaultfd (close-on-exec).
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// The raw descriptor (for epoll).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ioctl<T>(&self, op: &'static str, req: libc::c_ulong, arg: &mut T) -> Result<(), UffdError> {
        // SAFETY: `arg` is the repr(C) struct the request reads and writes.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg as *mut T) };
        if r != 0 {
            return Err(UffdError::Ioctl {
                op,
                source: last_os_error(),
            });
        }
        Ok(())
    }

    /// `UFFDIO_API`, requiring `features`.
    pub fn api(&self, features: u64) -> Result<(), UffdError> {
        let mut a = ApiArg {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        match self.ioctl("UFFDIO_API", UFFDIO_API, &mut a) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Find out what is missing for a clear message.
                let mut probe = ApiArg {
                    api: UFFD_API,
                    features: 0,
                    ioctls: 0,
                };
                if self.ioctl("UFFDIO_API", UFFDIO_API, &mut probe).is_ok()
                    && probe.features & features != features
                {
                    return Err(UffdError::Features {
                        missing: features & !probe.features,
                        have: probe.features,
                    });
                }
                Err(e)
            }
        }
    }

    /// Register `[start, start+len)` for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = RegisterArg {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut r)
    }

    /// Register `[start, start+len)` of a shmem mapping for missing and
    /// minor faults (a page present in the page cache but not mapped).
    pub fn register_minor(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = RegisterArg {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_MINOR,
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut r)
    }

    /// `UFFDIO_CONTINUE`: map the page-cache pages already behind
    /// `[dst, dst+len)` (read-only in a private mapping: writes copy).
    pub fn continue_range(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
        let mut z = ZeroArg {
            range: Range { start: dst, len },
            mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: struct uffdio_continue has the layout of uffdio_zeropage
        // (range, mode, result), and UFFDIO_CONTINUE_MODE_DONTWAKE is 1.
        let r =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE, &mut z as *mut ZeroArg) };
        fill_result(r, z.zeropage)
    }

    /// Unregister a range.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start, len };
        self.ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, &mut r)
    }

    /// Wake threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut r = Range { start, len };
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut r)
    }

    /// `UFFDIO_COPY` `src` to `dst` (page aligned, whole pages).
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<(), FillError> {
        let mut c = CopyArg {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: `src` is readable for len bytes for the duration of the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c as *mut CopyArg) };
        fill_result(r, c.copy)
    }

    /// `UFFDIO_ZEROPAGE` over `[dst, dst+len)`.
    pub fn zero(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
        let mut z = ZeroArg {
            range: Range { start: dst, len },
            mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
            zeropage: 0,
        };
        // SAFETY: the struct is what UFFDIO_ZEROPAGE reads and writes.
        let r =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z as *mut ZeroArg) };
        fill_result(r, z.zeropage)
    }

    /// Is the address space this userfaultfd serves still there? A
    /// userfaultfd handed over by `UFFD_EVENT_FORK` outlives its process
    /// (an exit, an exec): then every range ioctl fails with `ESRCH`. The
    /// probe is `UFFDIO_WRITEPROTECT` (un-protect) of one page at `addr`,
    /// which changes nothing: ranges here are never registered for
    /// write-protection, so a live address space answers `ENOENT`.
    pub fn mm_alive(&self, addr: u64) -> bool {
        let mut a = WriteProtectArg {
            range: Range {
                start: addr & !4095,
                len: 4096,
            },
            mode: 0,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one uffdio_writeprotect,
        // which `a` is, for the duration of the call.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_WRITEPROTECT,
                &mut a as *mut WriteProtectArg,
            )
        };
        !(r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
    }

    /// `UFFDIO_POISON`: accesses to `[dst, dst+len)` raise `SIGBUS`.
    pub fn poison(&self, dst: u64, len: u64) -> Result<(), FillError> {
        let mut z = ZeroArg {
            range: Range { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: struct uffdio_poison has the same layout as uffdio_zeropage.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut z as *mut ZeroArg) };
        fill_result(r, z.zeropage)
    }

    /// The features the kernel offers (a fresh `UFFDIO_API` probe is not
    /// possible on an fd already set up, so callers probe on a new one).
    pub fn available_features() -> Result<u64, UffdError> {
        // SAFETY: userfaultfd(2) returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Ioctl {
                op: "userfaultfd()",
                source: last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let u = Uffd { fd: owned };
        let mut a = ApiArg {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        u.ioctl("UFFDIO_API", UFFDIO_API, &mut a)?;
        Ok(a.features)
    }

    /// Read pending messages (non-blocking) into `out`; returns how many.
    pub fn read_msgs(&self, out: &mut Vec<Msg>) -> io::Result<usize> {
        let mut buf = [0u8; MSG_SIZE * 64];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        let mut count = 0;
        for c in buf[..n as usize].chunks_exact(MSG_SIZE) {
            let mut m = [0u8; MSG_SIZE];
            m.copy_from_slice(c);
            out.push(Msg::decode(&m));
            count += 1;
        }
        Ok(count)
    }
}

fn fill_result(r: libc::c_int, done: i64) -> Result<(), FillError> {
    if r == 0 {
        return Ok(());
    }
    let e = last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Err(FillError::Exists),
        Some(libc::EAGAIN) => Err(FillError::Again {
            done: done.max(0) as u64,
        }),
        Some(libc::ENOENT) | Some(libc::ESRCH) => Err(FillError::Gone),
        _ => Err(FillError::Other(e)),
    }
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// Create one.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd: owned })
    }

    /// Watch `fd` for input, tagged with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(last_os_error());
        }
        Ok(())
    }

    /// Stop watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a NULL event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Wait up to `timeout_ms` for events; returns the tokens (with `EPOLLHUP`/`EPOLLERR` as the high bit).
    pub fn wait(&self, timeout_ms: i32, out: &mut Vec<(u64, bool)>) -> io::Result<()> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: evs is writable for 64 events.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), evs.as_mut_ptr(), 64, timeout_ms) };
        if n < 0 {
            let e = last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        for ev in &evs[..n as usize] {
            let hup = ev.events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            out.push((ev.u64, hup));
        }
        Ok(())
    }
}

/// `pidfd_open(pid)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_messages() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_PAGEFAULT;
        b[16..24].copy_from_slice(&0x7f00_1234u64.to_le_bytes());
        assert_eq!(
            Msg::decode(&b),
            Msg::PageFault {
                address: 0x7f00_1234,
                flags: 0
            }
        );
        b[0] = EVENT_REMAP;
        b[8..16].copy_from_slice(&1u64.to_le_bytes());
        b[16..24].copy_from_slice(&2u64.to_le_bytes());
        b[24..32].copy_from_slice(&3u64.to_le_bytes());
        assert_eq!(
            Msg::decode(&b),
            Msg::Remap {
                from: 1,
                to: 2,
                len: 3
            }
        );
        b[0] = EVENT_FORK;
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(Msg::decode(&b), Msg::Fork { ufd: 7 });
        b[0] = 0x99;
        assert_eq!(Msg::decode(&b), Msg::Unknown(0x99));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // _IOWR(0xAA, nr, size) = 3<<30 | size<<16 | 0xAA<<8 | nr.
        let iowr = |nr: u64, size: u64| (3u64 << 30) | (size << 16) | (0xAA << 8) | nr;
        let ior = |nr: u64, size: u64| (2u64 << 30) | (size << 16) | (0xAA << 8) | nr;
        assert_eq!(UFFDIO_API, iowr(0x3F, std::mem::size_of::<ApiArg>() as u64));
        assert_eq!(
            UFFDIO_REGISTER,
            iowr(0x00, std::mem::size_of::<RegisterArg>() as u64)
        );
        assert_eq!(UFFDIO_UNREGISTER, ior(0x01, 16));
        assert_eq!(UFFDIO_WAKE, ior(0x02, 16));
        assert_eq!(
            UFFDIO_COPY,
            iowr(0x03, std::mem::size_of::<CopyArg>() as u64)
        );
        assert_eq!(
            UFFDIO_ZEROPAGE,
            iowr(0x04, std::mem::size_of::<ZeroArg>() as u64)
        );
        assert_eq!(
            UFFDIO_WRITEPROTECT,
            iowr(0x06, std::mem::size_of::<WriteProtectArg>() as u64)
        );
    }
}
