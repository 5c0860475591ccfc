//! Reading another process's memory: `process_vm_readv` in large batches,
//! and `/proc/PID/mem` for pages the process itself may not read
//! (`PROT_NONE` mappings that were populated earlier).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use libc::pid_t;

use crate::last_os_error;

/// Largest number of iovecs one `process_vm_readv` call accepts.
const IOV_MAX: usize = 1024;

/// Errors reading another process's memory.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// A read or write failed part way.
    #[error("accessing {len} bytes at {addr:#x} of process {pid} failed: {source}")]
    Read {
        /// The process.
        pid: pid_t,
        /// Remote address of the range that failed.
        addr: u64,
        /// Its length.
        len: usize,
        /// The underlying error.
        source: io::Error,
    },
    /// The destination does not match the ranges.
    #[error("destination buffer is {have} bytes but the ranges need {need}")]
    BufferSize {
        /// Buffer length.
        have: usize,
        /// Sum of range lengths.
        need: usize,
    },
}

/// A range of the remote address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRange {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Read `ranges` of process `pid`, in order, into `dst` (which must be
/// exactly as long as the ranges together), with as few `process_vm_readv`
/// calls as the kernel's iovec limit allows.
pub fn read_ranges(pid: pid_t, ranges: &[RemoteRange], dst: &mut [u8]) -> Result<(), MemError> {
    let need: usize = ranges.iter().map(|r| r.len).sum();
    if need != dst.len() {
        return Err(MemError::BufferSize {
            have: dst.len(),
            need,
        });
    }
    let mut done = 0usize;
    for chunk in ranges.chunks(IOV_MAX) {
        let chunk_len: usize = chunk.iter().map(|r| r.len).sum();
        let remote: Vec<libc::iovec> = chunk
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.addr as *mut libc::c_void,
                iov_len: r.len,
            })
            .collect();
        let mut got = 0usize;
        while got < chunk_len {
            // Skip ranges already fully read after a partial transfer.
            let mut skip = got;
            let mut first = 0;
            while first < remote.len() && skip >= remote[first].iov_len {
                skip -= remote[first].iov_len;
                first += 1;
            }
            let mut rem = remote[first..].to_vec();
            rem[0].iov_base = (rem[0].iov_base as u64 + skip as u64) as *mut libc::c_void;
            rem[0].iov_len -= skip;
            let local = libc::iovec {
                iov_base: dst[done + got..].as_mut_ptr().cast(),
                iov_len: chunk_len - got,
            };
            // SAFETY: `local` covers the unread tail of this chunk's part of
            // `dst`, which is writable; the remote iovecs are only addresses
            // in the other process and are never dereferenced here.
            let n = unsafe {
                libc::process_vm_readv(pid, &local, 1, rem.as_ptr(), rem.len() as libc::c_ulong, 0)
            };
            if n <= 0 {
                let source = if n == 0 {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                } else {
                    last_os_error()
                };
                return Err(MemError::Read {
                    pid,
                    addr: rem[0].iov_base as u64,
                    len: rem[0].iov_len,
                    source,
                });
            }
            got += n as usize;
        }
        done += chunk_len;
    }
    Ok(())
}

/// Write local buffers to remote ranges with `process_vm_writev`, pairing
/// `local[i]` with `remote[i]` (equal lengths), in `IOV_MAX` batches.
pub fn write_ranges(pid: pid_t, local: &[&[u8]], remote: &[RemoteRange]) -> Result<(), MemError> {
    if local.len() != remote.len() {
        return Err(MemError::BufferSize {
            have: local.len(),
            need: remote.len(),
        });
    }
    for (l, r) in local.chunks(IOV_MAX).zip(remote.chunks(IOV_MAX)) {
        let total: usize = l.iter().map(|b| b.len()).sum();
        let liov: Vec<libc::iovec> = l
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let riov: Vec<libc::iovec> = r
            .iter()
            .map(|x| libc::iovec {
                iov_base: x.addr as *mut libc::c_void,
                iov_len: x.len,
            })
            .collect();
        // SAFETY: the local iovecs describe live, readable slices (the kernel
        // only reads them); the remote ones are addresses in the other process.
        let n = unsafe {
            libc::process_vm_writev(
                pid,
                liov.as_ptr(),
                liov.len() as libc::c_ulong,
                riov.as_ptr(),
                riov.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 || n as usize != total {
            // Find the range that failed to name it.
            let source = if n < 0 {
                last_os_error()
            } else {
                io::Error::from(io::ErrorKind::WriteZero)
            };
            let mut done = n.max(0) as usize;
            let mut at = r[0];
            for x in r {
                if done < x.len {
                    at = RemoteRange {
                        addr: x.addr + done as u64,
                        len: x.len - done,
                    };
                    break;
                }
                done -= x.len;
            }
            return Err(MemError::Read {
                pid,
                addr: at.addr,
                len: at.len,
                source,
            });
        }
    }
    Ok(())
}

/// `/proc/PID/mem`, which (unlike `process_vm_readv`) can read pages of
/// mappings without `PROT_READ`.
#[derive(Debug)]
pub struct ProcMem {
    pid: pid_t,
    file: File,
}

impl ProcMem {
    /// Open `/proc/PID/mem` for reading.
    pub fn open(pid: pid_t) -> Result<ProcMem, MemError> {
        let file = File::open(format!("/proc/{pid}/mem")).map_err(|source| MemError::Read {
            pid,
            addr: 0,
            len: 0,
            source,
        })?;
        Ok(ProcMem { pid, file })
    }

    /// Open `/proc/PID/mem` for reading and writing. Writes go through
    /// `FOLL_FORCE`, so they reach private mappings without `PROT_WRITE`.
    pub fn open_rw(pid: pid_t) -> Result<ProcMem, MemError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|source| MemError::Read {
                pid,
                addr: 0,
                len: 0,
                source,
            })?;
        Ok(ProcMem { pid, file })
    }

    /// Write all of `src` at `addr`.
    pub fn write_all_at(&self, addr: u64, src: &[u8]) -> Result<(), MemError> {
        self.file
            .write_all_at(src, addr)
            .map_err(|source| MemError::Read {
                pid: self.pid,
                addr,
                len: src.len(),
                source,
            })
    }

    /// Read exactly `dst.len()` bytes at `addr`.
    pub fn read_exact_at(&self, addr: u64, dst: &mut [u8]) -> Result<(), MemError> {
        self.file
            .read_exact_at(dst, addr)
            .map_err(|source| MemError::Read {
                pid: self.pid,
                addr,
                len: dst.len(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_in_ranges() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let base = src.as_ptr() as u64;
        let ranges = [
            RemoteRange {
                addr: base + 10,
                len: 100,
            },
            RemoteRange {
                addr: base + 5000,
                len: 9000,
            },
            RemoteRange { addr: base, len: 1 },
        ];
        let mut dst = vec![0u8; 9101];
        // SAFETY: getpid never fails.
        let me = unsafe { libc::getpid() };
        read_ranges(me, &ranges, &mut dst).unwrap();
        assert_eq!(&dst[..100], &src[10..110]);
        assert_eq!(&dst[100..9100], &src[5000..14000]);
        assert_eq!(dst[9100], src[0]);
    }

    #[test]
    fn refuses_wrong_buffer_size() {
        let ranges = [RemoteRange {
            addr: 0x1000,
            len: 10,
        }];
        let mut dst = vec![0u8; 3];
        assert!(matches!(
            read_ranges(1, &ranges, &mut dst),
            Err(MemError::BufferSize { have: 3, need: 10 })
        ));
    }

    #[test]
    fn reports_unmapped_address() {
        let ranges = [RemoteRange { addr: 8, len: 8 }];
        let mut dst = vec![0u8; 8];
        // SAFETY: getpid never fails.
        let me = unsafe { libc::getpid() };
        let err = read_ranges(me, &ranges, &mut dst).unwrap_err();
        assert!(err.to_string().contains("0x8"), "{err}");
    }
}
