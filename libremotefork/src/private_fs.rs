//! Directories and files only their owner can open: a seed image holds a
//! process's memory (keys, tokens, whatever the parent had), so every
//! directory forkd keeps one in is 0700 and every file 0600, whatever the
//! umask, and a directory found wider is tightened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

/// Mode of every directory holding seed data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file of seed data.
pub const FILE_MODE: u32 = 0o600;

/// Create `path` (and missing parents) as [`DIR_MODE`], or make an
/// existing one exactly [`DIR_MODE`]. Returns the permission bits it had if
/// they let anyone else in (and says so in a warning), `None` otherwise.
pub fn dir(path: &Path) -> io::Result<Option<u32>> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    let was = fs::metadata(path)?.permissions().mode() & 0o7777;
    if was == DIR_MODE {
        return Ok(None);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
    if was & 0o077 == 0 {
        // Narrower than 0700 (a umask of 0277): set, nothing was exposed.
        return Ok(None);
    }
    warn!(
        dir = %path.display(),
        was = format!("{was:04o}"),
        now = format!("{DIR_MODE:04o}"),
        "a directory of seed data was open to other users; tightened"
    );
    Ok(Some(was))
}

/// Create (or truncate) `path` for writing, as [`FILE_MODE`] even if it
/// existed with another mode.
pub fn create(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // The mode above applies only to a new file.
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Write `bytes` to `path` as [`FILE_MODE`] (see [`create`]).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create(path)?.write_all(bytes)
}

/// Replace `path` with `bytes` (as [`FILE_MODE`]) in one step: written to
/// a temporary file beside it, then renamed over it, so a reader (another
/// process opening the same remote seed) sees the old file or the new one,
/// never a truncated one.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.unwrap_or_default(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let r = write(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_and_files_are_made_owner_only() {
        let base = std::env::temp_dir().join(format!("rf-private-fs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let nested = base.join("a").join("b");
        assert_eq!(dir(&nested).unwrap(), None);
        assert_eq!(mode(&base), DIR_MODE);
        assert_eq!(mode(&nested), DIR_MODE);
        // An existing, wider one is tightened and reported.
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(dir(&nested).unwrap(), Some(0o755));
        assert_eq!(mode(&nested), DIR_MODE);
        assert_eq!(dir(&nested).unwrap(), None);
        // A file that existed world-readable is made 0600 when rewritten.
        let f = nested.join("f");
        fs::write(&f, b"old").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        write(&f, b"new").unwrap();
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(fs::read(&f).unwrap(), b"new");
        fs::remove_dir_all(&base).unwrap();
    }
}
