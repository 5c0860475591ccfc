//! File identity: how a node tells that its copy of a mapped file is the
//! one the parent mapped. Size and mtime, plus the ELF GNU build-id when the
//! file has one (cheap: a few small reads), else a SHA-256 of the content.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::image::FileRef;

/// Errors identifying a file.
#[derive(Debug, thiserror::Error)]
pub enum FileIdError {
    /// The file could not be read.
    #[error("cannot identify {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Largest program-header table we read looking for a build-id.
const MAX_PHDRS: usize = 256;
/// Largest note segment we read.
const MAX_NOTE: u64 = 64 * 1024;
/// `NT_GNU_BUILD_ID`.
const NT_GNU_BUILD_ID: u32 = 3;
/// `PT_NOTE`.
const PT_NOTE: u32 = 4;

/// Identify the file at `path`.
pub fn identify(path: &str) -> Result<FileRef, FileIdError> {
    identify_at(path, Path::new(path))
}

/// Identify the file a process knows as `path`, which forkd opens at `at`
/// (a container's file, under `/proc/PID/root`).
pub fn identify_at(path: &str, at: &Path) -> Result<FileRef, FileIdError> {
    let err = |source| FileIdError::Io {
        path: path.to_string(),
        source,
    };
    let f = File::open(at).map_err(err)?;
    let md = f.metadata().map_err(err)?;
    let mtime_ns = md
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec());
    let build_id = elf_build_id(&f).map_err(err)?;
    let content_sha256 = match build_id {
        Some(_) => None,
        None => Some(sha256_file(&f).map_err(err)?),
    };
    Ok(FileRef {
        path: path.to_string(),
        size: md.size(),
        mtime_ns,
        build_id,
        content_sha256,
    })
}

/// `FICLONE`: share the source's blocks (btrfs, XFS); a plain copy elsewhere.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Copy `src` to `dst` as a new file of its own, readable by its owner
/// only (0400: it may be a seed's private library or data file): a
/// reflink where the filesystem can, else an in-kernel copy. Written under
/// a temporary name and renamed, so `dst` is never seen half-written.
pub fn copy_readonly(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let tmp = dst.with_extension(format!("tmp-{}", std::process::id()));
    let from = File::open(src)?;
    let result = (|| {
        let to = crate::private_fs::create(&tmp)?;
        // SAFETY: FICLONE takes the source descriptor as its argument; both
        // descriptors are open for the duration of the call.
        let r = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
        if r != 0 {
            io::copy(&mut &from, &mut &to)?;
        }
        to.set_permissions(std::fs::Permissions::from_mode(0o400))?;
        std::fs::rename(&tmp, dst)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The name a seed keeps its copy of a file under: its build-id or content hash.
pub fn store_key(r: &FileRef) -> String {
    match (&r.build_id, &r.content_sha256) {
        (Some(b), _) => format!("b-{b}"),
        (None, Some(h)) => format!("h-{h}"),
        (None, None) => format!("s-{}-{}", r.size, r.mtime_ns),
    }
}

/// Does the file at `path` have the identity recorded in `r` (ignoring its
/// path and mtime)?
pub fn matches_at(r: &FileRef, path: &Path) -> Result<bool, FileIdError> {
    let Some(p) = path.to_str() else {
        return Ok(false);
    };
    if !path.exists() {
        return Ok(false);
    }
    let here = identify(p)?;
    Ok(here.size == r.size
        && here.build_id == r.build_id
        && (r.build_id.is_some() || here.content_sha256 == r.content_sha256))
}

/// Does the file at `r.path` on this node have the identity recorded in `r`?
pub fn matches(r: &FileRef) -> Result<bool, FileIdError> {
    matches_at(r, Path::new(&r.path))
}

fn sha256_file(f: &File) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = f;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The GNU build-id of a 64-bit little-endian ELF file, if it has one.
fn elf_build_id(f: &File) -> io::Result<Option<String>> {
    let mut eh = [0u8; 64];
    match f.read_exact_at(&mut eh, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    // ELF magic, ELFCLASS64, ELFDATA2LSB.
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54) as usize;
    let phnum = u16_at(&eh, 56) as usize;
    if phentsize < 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Ok(None);
    }
    let mut ph = vec![0u8; phentsize * phnum];
    if f.read_exact_at(&mut ph, phoff).is_err() {
        return Ok(None);
    }
    for p in ph.chunks_exact(phentsize) {
        if u32_at(p, 0) != PT_NOTE {
            continue;
        }
        let off = u64_at(p, 8);
        let size = u64_at(p, 32).min(MAX_NOTE);
        let mut notes = vec![0u8; size as usize];
        if f.read_exact_at(&mut notes, off).is_err() {
            continue;
        }
        // Walk the notes: namesz, descsz, type, name (4-aligned), desc (4-aligned).
        let mut i = 0usize;
        while i + 12 <= notes.len() {
            let namesz = u32_at(&notes, i) as usize;
            let descsz = u32_at(&notes, i + 4) as usize;
            let ntype = u32_at(&notes, i + 8);
            let name_at = i + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let next = desc_at + descsz.div_ceil(4) * 4;
            if next > notes.len() || desc_at + descsz > notes.len() {
                break;
            }
            if ntype == NT_GNU_BUILD_ID && namesz == 4 && &notes[name_at..name_at + 4] == b"GNU\0" {
                return Ok(Some(hex(&notes[desc_at..desc_at + descsz])));
            }
            i = next;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_has_a_build_id() {
        // Debian builds every shared library with a GNU build-id.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let r = identify(exe.to_str().unwrap()).unwrap();
        assert!(r.size > 0);
        assert!(r.build_id.is_some() || r.content_sha256.is_some());
        assert!(matches(&r).unwrap());
    }

    #[test]
    fn plain_files_get_a_content_hash_and_changes_are_seen() {
        let p = std::env::temp_dir().join(format!("rf-fileid-{}", std::process::id()));
        std::fs::write(&p, b"hello").unwrap();
        let r = identify(p.to_str().unwrap()).unwrap();
        assert_eq!(r.build_id, None);
        assert_eq!(
            r.content_sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        assert!(matches(&r).unwrap());
        std::fs::write(&p, b"jello").unwrap();
        assert!(!matches(&r).unwrap());
        std::fs::remove_file(&p).unwrap();
        assert!(!matches(&r).unwrap());
    }

    #[test]
    fn kept_copies_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let src = std::env::temp_dir().join(format!("rf-copy-src-{}", std::process::id()));
        let dst = std::env::temp_dir().join(format!("rf-copy-dst-{}", std::process::id()));
        std::fs::write(&src, b"library bytes").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy_readonly(&src, &dst).unwrap();
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o400, "{mode:o}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"library bytes");
        std::fs::remove_file(&src).unwrap();
        std::fs::remove_file(&dst).unwrap();
    }
}
