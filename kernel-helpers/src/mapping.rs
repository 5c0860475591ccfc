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

    /// A shared read-write mapping of the first `len` bytes of `file`: a
    /// [`SharedMapping`].
    pub fn file_shared(file: &File, len: usize, populate: bool) -> io::Result<SharedMapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | pop(populate),
            file.as_raw_fd(),
        )
        .map(SharedMapping)
    }

    /// A shared read-write mapping of the first `len` bytes of `fd`: a
    /// [`SharedMapping`].
    pub fn fd_shared(fd: &impl AsRawFd, len: usize) -> io::Result<SharedMapping> {
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
        )
        .map(SharedMapping)
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

/// Memory shared with others (`MAP_SHARED`): other threads, other
/// processes mapping the same file, the kernel (`UFFDIO_COPY` reads it), a
/// device (RDMA writes it). Safe code only copies bytes in and out through
/// raw pointers and reads atomics; a Rust slice over it is `unsafe`, for a
/// caller that can show nothing else writes those bytes meanwhile (the
/// model of rust-vmm's `vm-memory`).
#[derive(Debug)]
pub struct SharedMapping(Mapping);

impl SharedMapping {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its first byte, for system calls and devices that take an address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.ptr
    }

    /// `[offset, offset + len)` if it lies inside the mapping.
    pub fn range(&self, offset: usize, len: usize) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        // SAFETY: offset <= end <= len of the mapping: inside it, or one past.
        (end <= self.0.len).then(|| unsafe { self.0.ptr.add(offset) })
    }

    /// Allocate and map the pages of `[offset, offset + len)` for writing
    /// in one call (`MADV_POPULATE_WRITE`), instead of a fault per page as
    /// a copy into them would take. Their contents do not change.
    pub fn populate_write(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let p = self
            .range(offset, len)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: madvise on a range inside this mapping; POPULATE_WRITE
        // only faults the pages in (writable), it writes no bytes.
        let r = unsafe { libc::madvise(p.cast(), len, libc::MADV_POPULATE_WRITE) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Copy `dst.len()` bytes at `offset` out; false if outside.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(p) = self.range(offset, dst.len()) else {
            return false;
        };
        // SAFETY: `p` is readable for dst.len() bytes (inside the mapping),
        // `dst` is a distinct private buffer; no reference to the shared
        // bytes is made.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copy `src` in at `offset`; false if outside.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> bool {
        let Some(p) = self.range(offset, src.len()) else {
            return false;
        };
        // SAFETY: `p` is writable for src.len() bytes (inside the read-write
        // mapping), `src` is a distinct buffer; no reference is made.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        true
    }

    /// The bytes `[offset, offset + len)` as a slice.
    ///
    /// # Safety
    /// Nothing may write them while the slice lives (no thread, no other
    /// process mapping the file, no device). Panics if outside.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        let p = self.range(offset, len).expect("slice outside the mapping");
        // SAFETY: inside the mapping; the caller vouches nothing writes it.
        unsafe { std::slice::from_raw_parts(p, len) }
    }

    /// The bytes `[offset, offset + len)` as a writable slice.
    ///
    /// # Safety
    /// Nothing else may read or write them while the slice lives. Panics if
    /// outside.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        let p = self.range(offset, len).expect("slice outside the mapping");
        // SAFETY: inside the mapping; the caller vouches for exclusivity.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }

    /// The mapping as 64-bit atomics (its length rounded down): atomics are
    /// the one safe way to share words with other threads and processes.
    pub fn atomic_u64s(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: mmap returns page-aligned memory (aligned for u64), valid
        // for len bytes while self lives; AtomicU64 has u64's layout and any
        // bit pattern is valid; shared access through atomics is sound.
        unsafe {
            std::slice::from_raw_parts(
                self.0.ptr.cast::<std::sync::atomic::AtomicU64>(),
                self.0.len / 8,
            )
        }
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

    #[test]
    fn populating_a_shared_range_keeps_its_bytes_and_refuses_one_outside() {
        let f = tempfile_of(4 * 4096);
        let m = Mapping::file_shared(&f, 4 * 4096, false).unwrap();
        assert!(m.write_at(4096, &[7; 16]));
        m.populate_write(0, 4 * 4096).unwrap();
        let mut b = [0u8; 16];
        assert!(m.read_at(4096, &mut b));
        assert_eq!(b, [7; 16]);
        assert!(m.read_at(3 * 4096, &mut b));
        assert_eq!(b, [0; 16]);
        assert!(m.populate_write(3 * 4096, 2 * 4096).is_err());
    }

    /// An unlinked file of `len` zero bytes.
    fn tempfile_of(len: u64) -> File {
        let p = std::env::temp_dir().join(format!("rf-mapping-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f.set_len(len).unwrap();
        f
    }
}
