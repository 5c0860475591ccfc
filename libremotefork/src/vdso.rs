//! A process's `[vdso]`: its hash (nodes whose vDSO differs cannot host each
//! other's seeds) and a `syscall` instruction in it (capture and restore run
//! single syscalls inside a process by pointing `rip` there).

use kernel_helpers::mem::{self, MemError, RemoteRange};
use libc::pid_t;
use sha2::{Digest, Sha256};

use crate::fileid::hex;
use crate::procfs::MapsEntry;

/// What capture and restore need to know of a vDSO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vdso {
    /// Where it is mapped.
    pub start: u64,
    /// SHA-256 of its bytes, hex.
    pub hash: String,
    /// Offset of a `syscall` instruction (`0f 05`) in it, if there is one.
    pub syscall_offset: Option<u64>,
}

/// Read the `[vdso]` of process `pid`, whose mappings are `maps`; `None` if
/// it has none.
pub fn probe(pid: pid_t, maps: &[MapsEntry]) -> Result<Option<Vdso>, MemError> {
    let Some(v) = maps.iter().find(|m| m.path == "[vdso]") else {
        return Ok(None);
    };
    let mut bytes = vec![0u8; (v.end - v.start) as usize];
    mem::read_ranges(
        pid,
        &[RemoteRange {
            addr: v.start,
            len: bytes.len(),
        }],
        &mut bytes,
    )?;
    Ok(Some(Vdso {
        start: v.start,
        hash: hex(&Sha256::digest(&bytes)),
        syscall_offset: bytes
            .windows(2)
            .position(|w| w == [0x0f, 0x05])
            .map(|o| o as u64),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_vdso_has_a_syscall() {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let v = probe(me, &crate::procfs::maps(me).unwrap())
            .unwrap()
            .expect("this kernel maps a vDSO");
        assert_eq!(v.hash.len(), 64);
        assert!(v.syscall_offset.is_some());
        assert!(probe(me, &[]).unwrap().is_none());
    }
}
