//! The local page source: the seed's page store on this node.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{PageSource, SourceError};

/// The seed image on this node, read with `pread` (a truncated or removed
/// image gives an error, never a `SIGBUS` in the pager).
#[derive(Debug)]
pub struct LocalSource {
    file: File,
    size: u64,
    name: String,
}

impl LocalSource {
    /// Open the page store at `path`.
    pub fn open(path: &Path, size: u64) -> io::Result<LocalSource> {
        Ok(LocalSource {
            file: File::open(path)?,
            size,
            name: format!("local:{}", path.display()),
        })
    }
}

impl PageSource for LocalSource {
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        if offset
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(SourceError::OutOfRange {
                offset,
                len: dst.len(),
                size: self.size,
            });
        }
        self.file
            .read_exact_at(dst, offset)
            .map_err(|error| SourceError::Read {
                source_name: self.name.clone(),
                offset,
                len: dst.len(),
                error,
            })
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_source_reports_truncation() {
        let p = std::env::temp_dir().join(format!("rf-src-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        let s = LocalSource::open(&p, 8192).unwrap();
        let mut b = vec![0u8; 4096];
        s.read(0, &mut b).unwrap();
        let e = s.read(4096, &mut b).unwrap_err();
        assert!(e.to_string().contains("local:"), "{e}");
        assert!(s.read(8192, &mut b).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
