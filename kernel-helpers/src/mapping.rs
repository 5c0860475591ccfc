//! Owned memory mappings (`mmap`/`munmap`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::last_os_error;

/// A memfd of `size` bytes (sparse until written), close-on-exec.
pub fn memfd(name: &str, size: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
        return Err(last_os_error());
    }
    Ok(owned)
}

/// An owned mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is exclusively owned memory; moving it to another
// thread moves the only handle to it.
unsafe impl Send for Mapping {}
// SAFETY: shared references only allow reads through `as_slice`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous read-write memory, optionally prefaulted
    /// (`MAP_POPULATE`) so that filling it takes no page faults.
    pub fn anonymous(len: usize, populate: bool) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | pop(populate),
            -1,
        )
    }

    /// A shared read-write mapping of the first `len` bytes of `file`.
    pub fn file_shared(file: &File, len: usize, populate: bool) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | pop(populate),
            file.as_raw_fd(),
        )
    }

    /// A shared read-write mapping of the first `len` bytes of `fd`.
    pub fn fd_shared(fd: &impl AsRawFd, len: usize) -> io::Result<Mapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
        )
    }

    /// A read-only shared mapping of the first `len` bytes of `file`: a
    /// [`ReadOnlyMapping`], which safe code can only read.
    pub fn file_readonly(file: &File, len: usize) -> io::Result<ReadOnlyMapping> {
        Self::map(len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd()).map(ReadOnlyMapping)
    }

    fn map(len: usize, prot: i32, flags: i32, fd: i32) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a fresh mapping at a kernel-chosen address (no MAP_FIXED),
        // so no existing memory is affected.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The mapped bytes, writable (read-only mappings are
    /// [`ReadOnlyMapping`]s, which have no such method).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is mapped for the lifetime of self and `&mut
        // self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A read-only mapping (`PROT_READ`): its bytes can be read, and nothing
/// in safe code can write them (a write would fault).
#[derive(Debug)]
pub struct ReadOnlyMapping(Mapping);

impl ReadOnlyMapping {
    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: ptr/len describe a mapping this value owns; no references
        // into it outlive `self`.
        let r = unsafe { libc::munmap(self.ptr.cast(), self.len) };
        debug_assert_eq!(r, 0, "munmap failed: {}", last_os_error());
    }
}

fn pop(populate: bool) -> i32 {
    if populate {
        libc::MAP_POPULATE
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_is_zeroed_and_writable() {
        let mut m = Mapping::anonymous(8192, true).unwrap();
        assert!(m.as_slice().iter().all(|b| *b == 0));
        m.as_mut_slice()[8191] = 9;
        assert_eq!(m.as_slice()[8191], 9);
        assert!(Mapping::anonymous(0, false).unwrap().is_empty());
    }
}
