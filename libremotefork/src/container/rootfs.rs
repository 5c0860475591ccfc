//! A container's root filesystem, kept once per node under its content
//! digest: children overlay it, and it cannot change under them (the
//! parent's own directory may be changed or removed after capture).
//!
//! The digest is SHA-256 over one line per entry, in sorted path order:
//! kind, permission bits, owner, group, size, and the content's SHA-256
//! (a file), target (a symlink) or device number (a node). Times are not
//! in it. The walk does not cross into other filesystems: what the
//! container had mounted inside its root (`/proc`, `/dev`) is not its
//! rootfs, and only the empty mount point is kept.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What went wrong with a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Reading or writing a path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A received rootfs does not have the digest it was sent under.
    #[error("the rootfs received for {want} has digest {got}")]
    Mismatch {
        /// The digest asked for.
        want: String,
        /// The digest of what came.
        got: String,
    },
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A rootfs in a node's store.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `sha256:HEX`.
    pub digest: String,
    /// Where it is.
    pub dir: PathBuf,
    /// Its regular files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Was it copied now (false: the store had it)?
    pub copied: bool,
}

/// One entry of a tree walk.
struct Entry {
    rel: PathBuf,
    md: fs::Metadata,
}

/// Every entry under `root` (not crossing filesystems), parents first,
/// siblings by name.
fn walk(root: &Path) -> Result<Vec<Entry>, RootfsError> {
    let top = fs::metadata(root).map_err(err(root))?;
    let dev = top.dev();
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(err(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(err(&dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).map_err(err(&p))?;
            if md.is_dir() && md.dev() == dev {
                subdirs.push(r.clone());
            }
            out.push(Entry { rel: r, md });
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    out.sort_by(|a, b| {
        a.rel
            .as_os_str()
            .as_bytes()
            .cmp(b.rel.as_os_str().as_bytes())
    });
    Ok(out)
}

fn sha256_of(path: &Path) -> Result<String, RootfsError> {
    let mut f = File::open(path).map_err(err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::fileid::hex(&h.finalize()))
}

/// The digest of the tree at `root`, its regular files and their bytes.
pub fn digest(root: &Path) -> Result<(String, u64, u64), RootfsError> {
    let top = fs::metadata(root).map_err(err(root))?;
    let mut h = Sha256::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for e in walk(root)? {
        let p = root.join(&e.rel);
        let ft = e.md.file_type();
        let mount_point = e.md.is_dir() && e.md.dev() != top.dev();
        let (kind, what) = if e.md.is_dir() {
            ("d", String::new())
        } else if ft.is_symlink() {
            let t = fs::read_link(&p).map_err(err(&p))?;
            ("l", t.to_string_lossy().into_owned())
        } else if ft.is_file() {
            files += 1;
            bytes += e.md.len();
            ("f", sha256_of(&p)?)
        } else if ft.is_char_device() || ft.is_block_device() {
            ("n", e.md.rdev().to_string())
        } else {
            ("o", String::new())
        };
        let size = if ft.is_file() { e.md.len() } else { 0 };
        // A mount point shows what is mounted there, not the directory
        // under it: it is kept (and digested) as a plain 0755 root-owned
        // directory.
        let (mode, uid, gid) = if mount_point {
            (0o755, 0, 0)
        } else {
            (e.md.mode() & 0o7777, e.md.uid(), e.md.gid())
        };
        h.update(format!("{kind} {mode:o} {uid} {gid} {size} {what} ").as_bytes());
        h.update(e.rel.as_os_str().as_bytes());
        h.update(b"\n");
    }
    Ok((
        format!("sha256:{}", crate::fileid::hex(&h.finalize())),
        files,
        bytes,
    ))
}

/// The directory name a digest is kept under.
pub fn dir_name(digest: &str) -> String {
    digest.replace(':', "-")
}

/// Copy the tree at `from` to `to` (which must not exist): contents,
/// permission bits, owners and times; mount points inside as empty
/// directories.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), RootfsError> {
    let top = fs::metadata(from).map_err(err(from))?;
    fs::create_dir(to).map_err(err(to))?;
    let entries = walk(from)?;
    for e in &entries {
        let src = from.join(&e.rel);
        let dst = to.join(&e.rel);
        let ft = e.md.file_type();
        if e.md.is_dir() {
            fs::create_dir(&dst).map_err(err(&dst))?;
        } else if ft.is_symlink() {
            let t = fs::read_link(&src).map_err(err(&src))?;
            std::os::unix::fs::symlink(&t, &dst).map_err(err(&dst))?;
        } else if ft.is_file() {
            fs::copy(&src, &dst).map_err(err(&dst))?;
        } else {
            let c = cstring(&dst)?;
            // SAFETY: mknod with a NUL-terminated path and plain integers.
            let r = unsafe {
                libc::mknod(
                    c.as_ptr(),
                    e.md.mode() as libc::mode_t,
                    e.md.rdev() as libc::dev_t,
                )
            };
            if r != 0 {
                return Err(err(&dst)(io::Error::last_os_error()));
            }
        }
    }
    // Owners, modes and times last, deepest first: a read-only directory
    // is filled before it becomes read-only, and its time is not changed
    // by what is created in it after.
    for e in entries.iter().rev() {
        let dst = to.join(&e.rel);
        if e.md.is_dir() && e.md.dev() != top.dev() {
            // A mount point: a plain directory (see `digest`).
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).map_err(err(&dst))?;
            continue;
        }
        set_attrs(&dst, &e.md)?;
    }
    set_attrs(to, &top)
}

fn cstring(p: &Path) -> Result<std::ffi::CString, RootfsError> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        err(p)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a path holding a NUL",
        ))
    })
}

fn set_attrs(p: &Path, md: &fs::Metadata) -> Result<(), RootfsError> {
    let c = cstring(p)?;
    // SAFETY: lchown and utimensat with a NUL-terminated path, plain
    // integers and a two-element timespec array on the stack.
    unsafe {
        if libc::lchown(c.as_ptr(), md.uid(), md.gid()) != 0 {
            return Err(err(p)(io::Error::last_os_error()));
        }
        let times = [
            libc::timespec {
                tv_sec: md.atime(),
                tv_nsec: md.atime_nsec(),
            },
            libc::timespec {
                tv_sec: md.mtime(),
                tv_nsec: md.mtime_nsec(),
            },
        ];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(err(p)(io::Error::last_os_error()));
        }
    }
    if !md.file_type().is_symlink() {
        fs::set_permissions(p, fs::Permissions::from_mode(md.mode() & 0o7777)).map_err(err(p))?;
    }
    Ok(())
}

/// Put the tree at `root` in `store` under its digest, unless the store
/// has it: copied to a temporary name, checked, then renamed, so a
/// directory under a digest's name is always whole.
pub fn store(root: &Path, store: &Path) -> Result<Stored, RootfsError> {
    let (digest, files, bytes) = self::digest(root)?;
    crate::private_fs::dir(store).map_err(err(store))?;
    let dir = store.join(dir_name(&digest));
    if dir.exists() {
        return Ok(Stored {
            digest,
            dir,
            files,
            bytes,
            copied: false,
        });
    }
    let tmp = store.join(format!(".tmp-{}-{}", dir_name(&digest), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        copy_tree(root, &tmp)?;
        // The copy is what children get: it must be what was digested.
        let (again, _, _) = self::digest(&tmp)?;
        if again != digest {
            return Err(RootfsError::Mismatch {
                want: digest.clone(),
                got: again,
            });
        }
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            // Another capture stored it meanwhile.
            Err(_) if dir.exists() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(err(&dir)(e)),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(Stored {
        digest,
        dir,
        files,
        bytes,
        copied: true,
    })
}

/// The stream a rootfs crosses the network in: one record per entry, in
/// [`walk`] order (parents first), each a kind byte (`d`, `f`, `l`, `n`),
/// the path's length (u16) and bytes, mode, uid and gid (u32 each),
/// mtime (i64 seconds, u32 nanoseconds), and a length (u64) followed by
/// that many bytes (a file's contents, a link's target) or, for a node,
/// its device number. Little-endian throughout. The receiver checks every
/// path and the tree's digest before keeping it.
const PACK_MAGIC: &[u8; 8] = b"RFROOT01";

/// Stream the tree at `root` to `emit`, in pieces of about `chunk` bytes.
/// `emit` returns false to stop (its reader went away).
pub fn pack(
    root: &Path,
    chunk: usize,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), RootfsError> {
    let top = fs::metadata(root).map_err(err(root))?;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 4096);
    buf.extend_from_slice(PACK_MAGIC);
    let mut flush = |buf: &mut Vec<u8>, force: bool| -> bool {
        if buf.len() >= chunk || (force && !buf.is_empty()) {
            emit(std::mem::take(buf))
        } else {
            true
        }
    };
    for e in walk(root)? {
        let p = root.join(&e.rel);
        let ft = e.md.file_type();
        let mount_point = e.md.is_dir() && e.md.dev() != top.dev();
        let (kind, mode, uid, gid) = if mount_point {
            (b'd', 0o755, 0, 0)
        } else {
            let k = if e.md.is_dir() {
                b'd'
            } else if ft.is_symlink() {
                b'l'
            } else if ft.is_file() {
                b'f'
            } else if ft.is_char_device() || ft.is_block_device() {
                b'n'
            } else {
                // Sockets and fifos left in a rootfs are not kept.
                continue;
            };
            (k, e.md.mode(), e.md.uid(), e.md.gid())
        };
        let path = e.rel.as_os_str().as_bytes();
        buf.push(kind);
        buf.extend_from_slice(&(path.len() as u16).to_le_bytes());
        buf.extend_from_slice(path);
        buf.extend_from_slice(&mode.to_le_bytes());
        buf.extend_from_slice(&uid.to_le_bytes());
        buf.extend_from_slice(&gid.to_le_bytes());
        buf.extend_from_slice(&e.md.mtime().to_le_bytes());
        buf.extend_from_slice(&(e.md.mtime_nsec() as u32).to_le_bytes());
        match kind {
            b'f' => {
                buf.extend_from_slice(&e.md.len().to_le_bytes());
                let mut f = File::open(&p).map_err(err(&p))?;
                let mut left = e.md.len();
                while left > 0 {
                    let at = buf.len();
                    let n = (left as usize).min(chunk.max(4096));
                    buf.resize(at + n, 0);
                    f.read_exact(&mut buf[at..]).map_err(err(&p))?;
                    left -= n as u64;
                    if !flush(&mut buf, false) {
                        return Ok(());
                    }
                }
            }
            b'l' => {
                let t = fs::read_link(&p).map_err(err(&p))?;
                let t = t.as_os_str().as_bytes();
                buf.extend_from_slice(&(t.len() as u64).to_le_bytes());
                buf.extend_from_slice(t);
            }
            b'n' => buf.extend_from_slice(&e.md.rdev().to_le_bytes()),
            _ => buf.extend_from_slice(&0u64.to_le_bytes()),
        }
        if !flush(&mut buf, false) {
            return Ok(());
        }
    }
    flush(&mut buf, true);
    Ok(())
}

/// Receive a [`pack`] stream from `r` into `store` as `digest`: written
/// under a temporary name, checked entry by entry (relative paths without
/// `..`, parents first) and against the digest, then renamed.
pub fn unpack(r: &mut impl Read, store: &Path, digest: &str) -> Result<Stored, RootfsError> {
    crate::private_fs::dir(store).map_err(err(store))?;
    let dir = store.join(dir_name(digest));
    let tmp = store.join(format!(
        ".recv-{}-{}-{:?}",
        dir_name(digest),
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<(u64, u64), RootfsError> {
        let bad = |what: String| err(&tmp)(io::Error::new(io::ErrorKind::InvalidData, what));
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(err(&tmp))?;
        if &magic != PACK_MAGIC {
            return Err(bad("not a rootfs stream".into()));
        }
        fs::create_dir(&tmp).map_err(err(&tmp))?;
        let mut entries: Vec<(PathBuf, u32, u32, u32, i64, u32, bool)> = Vec::new();
        loop {
            let mut kind = [0u8; 1];
            if r.read(&mut kind).map_err(err(&tmp))? == 0 {
                break;
            }
            let mut h = [0u8; 2];
            r.read_exact(&mut h).map_err(err(&tmp))?;
            let mut path = vec![0u8; u16::from_le_bytes(h) as usize];
            r.read_exact(&mut path).map_err(err(&tmp))?;
            let mut fixed = [0u8; 4 * 3 + 8 + 4 + 8];
            r.read_exact(&mut fixed).map_err(err(&tmp))?;
            let u32_at =
                |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().unwrap_or([0; 4]));
            let (mode, uid, gid) = (u32_at(0), u32_at(4), u32_at(8));
            let mtime = i64::from_le_bytes(fixed[12..20].try_into().unwrap_or([0; 8]));
            let nsec = u32_at(20);
            let len = u64::from_le_bytes(fixed[24..32].try_into().unwrap_or([0; 8]));
            let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&path));
            if path.is_empty()
                || path.contains(&0)
                || rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad(format!(
                    "entry path {rel:?} is not a plain relative path"
                )));
            }
            let dst = tmp.join(&rel);
            if !rel
                .parent()
                .is_none_or(|p| p.as_os_str().is_empty() || tmp.join(p).is_dir())
            {
                return Err(bad(format!("entry {rel:?} comes before its directory")));
            }
            match kind[0] {
                b'd' => fs::create_dir(&dst).map_err(err(&dst))?,
                b'f' => {
                    let mut f = File::create(&dst).map_err(err(&dst))?;
                    let n = io::copy(&mut r.by_ref().take(len), &mut f).map_err(err(&dst))?;
                    if n != len {
                        return Err(bad(format!("{rel:?} ended after {n} of {len} bytes")));
                    }
                }
                b'l' => {
                    if len > 4096 {
                        return Err(bad(format!("link {rel:?} of {len} bytes")));
                    }
                    let mut t = vec![0u8; len as usize];
                    r.read_exact(&mut t).map_err(err(&tmp))?;
                    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), &dst)
                        .map_err(err(&dst))?;
                }
                b'n' => {
                    let c = cstring(&dst)?;
                    // SAFETY: mknod with a NUL-terminated path and integers.
                    if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, len as libc::dev_t) }
                        != 0
                    {
                        return Err(err(&dst)(io::Error::last_os_error()));
                    }
                }
                k => return Err(bad(format!("entry kind {k:#x}"))),
            }
            entries.push((rel, mode, uid, gid, mtime, nsec, kind[0] == b'l'));
        }
        // Attributes deepest first, as `copy_tree`.
        for (rel, mode, uid, gid, mtime, nsec, link) in entries.iter().rev() {
            let dst = tmp.join(rel);
            let c = cstring(&dst)?;
            let times = [
                libc::timespec {
                    tv_sec: *mtime,
                    tv_nsec: *nsec as i64,
                },
                libc::timespec {
                    tv_sec: *mtime,
                    tv_nsec: *nsec as i64,
                },
            ];
            // SAFETY: lchown and utimensat with a NUL-terminated path,
            // integers and a two-element array on the stack.
            unsafe {
                if libc::lchown(c.as_ptr(), *uid, *gid) != 0
                    || libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    ) != 0
                {
                    return Err(err(&dst)(io::Error::last_os_error()));
                }
            }
            if !link {
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(err(&dst))?;
            }
        }
        let (got, files, bytes) = self::digest(&tmp)?;
        if got != digest {
            return Err(RootfsError::Mismatch {
                want: digest.to_string(),
                got,
            });
        }
        Ok((files, bytes))
    })();
    let (files, bytes) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if fs::rename(&tmp, &dir).is_err() {
        // Another receive kept it first.
        let _ = fs::remove_dir_all(&tmp);
        if !dir.is_dir() {
            return Err(err(&dir)(io::Error::other(
                "cannot keep the received rootfs",
            )));
        }
    }
    Ok(Stored {
        digest: digest.to_string(),
        dir,
        files,
        bytes,
        copied: true,
    })
}

/// The first of `stores` that holds `digest`.
pub fn find(digest: &str, stores: &[PathBuf]) -> Option<PathBuf> {
    stores
        .iter()
        .map(|s| s.join(dir_name(digest)))
        .find(|d| d.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rf-rootfs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("etc/sub")).unwrap();
        fs::write(d.join("etc/os-release"), "NAME=x\n").unwrap();
        fs::write(d.join("etc/sub/a"), "aaa").unwrap();
        std::os::unix::fs::symlink("etc/os-release", d.join("link")).unwrap();
        d
    }

    #[test]
    fn a_stored_copy_has_the_digest_and_a_change_changes_it() {
        let src = tree("src");
        let store_dir =
            std::env::temp_dir().join(format!("rf-rootfs-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&store_dir);
        let s = store(&src, &store_dir).unwrap();
        assert!(s.copied);
        assert_eq!((s.files, s.bytes), (2, 10));
        assert_eq!(digest(&s.dir).unwrap().0, s.digest);
        assert_eq!(
            fs::read_to_string(s.dir.join("etc/os-release")).unwrap(),
            "NAME=x\n"
        );
        assert_eq!(
            fs::read_link(s.dir.join("link")).unwrap(),
            Path::new("etc/os-release")
        );
        // Stored once.
        assert!(!store(&src, &store_dir).unwrap().copied);
        // Across the network: packed, unpacked elsewhere, the same tree.
        let mut stream = Vec::new();
        pack(&s.dir, 7, |c| {
            stream.extend_from_slice(&c);
            true
        })
        .unwrap();
        let other = store_dir.join("other");
        let got = unpack(&mut stream.as_slice(), &other, &s.digest).unwrap();
        assert_eq!(digest(&got.dir).unwrap().0, s.digest);
        // A stream that is not the tree it is sent as is refused, and
        // nothing is kept.
        let bad = unpack(&mut stream.as_slice(), &other, "sha256:00").unwrap_err();
        assert!(matches!(bad, RootfsError::Mismatch { .. }), "{bad}");
        assert_eq!(find("sha256:00", std::slice::from_ref(&other)), None);
        let mut evil = PACK_MAGIC.to_vec();
        evil.push(b'd');
        evil.extend_from_slice(&5u16.to_le_bytes());
        evil.extend_from_slice(b"../x1");
        evil.extend_from_slice(&[0u8; 32]);
        let e = unpack(&mut evil.as_slice(), &other, &s.digest).unwrap_err();
        assert!(e.to_string().contains("not a plain relative path"), "{e}");
        assert_eq!(
            find(&s.digest, std::slice::from_ref(&store_dir)),
            Some(s.dir.clone())
        );
        // One byte, one mode bit: another digest.
        fs::write(src.join("etc/sub/a"), "aab").unwrap();
        let d2 = digest(&src).unwrap().0;
        assert_ne!(d2, s.digest);
        fs::set_permissions(src.join("etc/sub/a"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(digest(&src).unwrap().0, d2);
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(&store_dir);
    }
}
