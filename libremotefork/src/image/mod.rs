//! The seed image: a directory holding `descriptor.bin` (a versioned,
//! checksummed, postcard-encoded [`Descriptor`]) and `pages.img` (every
//! stored page, page aligned, addressed by byte offset).
//!
//! Layout of `descriptor.bin` (all integers little-endian):
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..8   | magic `RFSEED\0\0`                      |
//! | 8..12  | format version (u32)                    |
//! | 12..16 | flags (u32, 0)                          |
//! | 16..24 | body length (u64)                       |
//! | 24..56 | SHA-256 of the body                     |
//! | 56..   | body: postcard encoding of `Descriptor` |
//!
//! In format 2 the body goes on with the postcard encoding of
//! [`PageDigests`] (one XXH3-64 per 64 KiB of `pages.img`); format 1 has
//! none and is still read.
//!
//! Decoding is bounded: the body length is checked against the file and a
//! hard limit before anything is allocated, the checksum before the body is
//! parsed, every count against what a process can have while it is parsed
//! (the limits module), and every address, offset and range after.

mod descriptor;
pub mod inspect;
pub(crate) mod limits;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use descriptor::*;

use crate::{private_fs, PAGE_SIZE};

/// Magic at the start of `descriptor.bin`.
pub const MAGIC: [u8; 8] = *b"RFSEED\0\0";
/// Size of the fixed header before the body.
pub const HEADER_LEN: usize = 56;
/// Largest descriptor body accepted (a process with a million mappings fits).
pub const MAX_BODY_LEN: u64 = 256 << 20;
/// Name of the descriptor file in an image directory.
pub const DESCRIPTOR_FILE: &str = "descriptor.bin";
/// Directory in an image holding the seed's copies of mapped files, named by
/// their identity (device, inode, size, mtime), hashed.
pub const FILES_DIR: &str = "files";
/// The subdirectory a container seed captured without a shared store
/// keeps its rootfs in, under its digest.
pub const ROOTFS_DIR: &str = "rootfs";
/// Name of the page store in an image directory.
pub const PAGES_FILE: &str = "pages.img";

/// Errors reading, writing or validating a seed image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error on an image file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The descriptor is shorter than its header or its declared body.
    #[error("descriptor is truncated: {have} bytes, need {need}")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Not a seed descriptor.
    #[error("not a remotefork seed descriptor (magic {found:02x?}, expected {MAGIC:02x?})")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// A format version this build does not know.
    #[error("unknown seed format version {found} (this build reads versions {FORMAT_V1} to {FORMAT_VERSION})")]
    UnknownVersion {
        /// The version in the file.
        found: u32,
    },
    /// The declared body is larger than the limit.
    #[error("descriptor body of {len} bytes exceeds the limit of {MAX_BODY_LEN} bytes")]
    TooLarge {
        /// Declared length.
        len: u64,
    },
    /// The descriptor has trailing bytes after its body.
    #[error("descriptor has {extra} unexpected bytes after its body")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The body does not match its checksum.
    #[error("descriptor checksum mismatch: the file is corrupt")]
    Checksum,
    /// The body does not decode.
    #[error("descriptor body does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// The body does not decode, within one of its sequences.
    #[error("descriptor body does not decode in {field}: {source}")]
    DecodeIn {
        /// The sequence (`vmas`, `vmas[].runs`, `fds`...).
        field: &'static str,
        /// postcard's error.
        source: postcard::Error,
    },
    /// A field holds more entries than any process can have (see
    /// the limits module); refused before they are allocated.
    #[error("descriptor field {field}: {count} entries exceed the limit of {limit}")]
    TooMany {
        /// The field (`vmas`, `vmas[].runs` for all runs together, ...).
        field: &'static str,
        /// Entries it holds (when refused while decoding, the first count
        /// found over the limit).
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// The descriptor decodes but is inconsistent.
    #[error("descriptor is inconsistent: {0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encode a descriptor with its header.
pub fn encode(desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let mut body = postcard::to_allocvec(desc)?;
    if desc.format_version >= FORMAT_V2 {
        let digests = desc.digests.as_ref().ok_or_else(|| {
            ImageError::Invalid("a format 2 descriptor needs its page digests".into())
        })?;
        body.extend_from_slice(&postcard::to_allocvec(digests)?);
    }
    if desc.format_version >= 3 {
        let p = desc.privileges.as_ref().ok_or_else(|| {
            ImageError::Invalid("a format 3 descriptor needs its privileges".into())
        })?;
        body.extend_from_slice(&postcard::to_allocvec(p)?);
    }
    if desc.format_version >= FORMAT_V4 {
        body.extend_from_slice(&postcard::to_allocvec(&desc.thread_set)?);
    }
    if desc.format_version >= 5 {
        body.extend_from_slice(&postcard::to_allocvec(&desc.fd_objects)?);
    }
    if desc.format_version >= 6 {
        body.extend_from_slice(&postcard::to_allocvec(&desc.container)?);
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&desc.format_version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode and validate a descriptor. `image_len`, when known, is the size of
/// the page store, and every stored page must lie inside it.
pub fn decode(bytes: &[u8], image_len: Option<u64>) -> Result<Descriptor, ImageError> {
    let have = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        // Say what is wrong with the part that is there before saying it is short.
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(ImageError::BadMagic {
                found: first8(bytes),
            });
        }
        return Err(ImageError::Truncated {
            have,
            need: HEADER_LEN as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(ImageError::BadMagic {
            found: first8(bytes),
        });
    }
    let version = u32::from_le_bytes(le4(&bytes[8..12]));
    if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
        return Err(ImageError::UnknownVersion { found: version });
    }
    let body_len = u64::from_le_bytes(le8(&bytes[16..24]));
    if body_len > MAX_BODY_LEN {
        return Err(ImageError::TooLarge { len: body_len });
    }
    let need = HEADER_LEN as u64 + body_len;
    if have < need {
        return Err(ImageError::Truncated { have, need });
    }
    if have > need {
        return Err(ImageError::TrailingBytes { extra: have - need });
    }
    let body = &bytes[HEADER_LEN..];
    if Sha256::digest(body).as_slice() != &bytes[24..56] {
        return Err(ImageError::Checksum);
    }
    let scope = limits::Scope::enter();
    let desc: Descriptor = if version == FORMAT_V1 {
        postcard::from_bytes(body).map_err(|e| scope.error(e))?
    } else {
        let (mut d, rest): (Descriptor, _) =
            postcard::take_from_bytes(body).map_err(|e| scope.error(e))?;
        // The page store is checked before its digests are read, and no
        // more of them are read than it has pages.
        store_matches(&d, image_len)?;
        scope.limit_digests(d.pages_stored);
        if version == FORMAT_V2 {
            d.digests = Some(postcard::from_bytes(rest).map_err(|e| scope.error(e))?);
        } else if version == FORMAT_V3 {
            let (g, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.digests = Some(g);
            d.privileges = Some(postcard::from_bytes(rest).map_err(|e| scope.error(e))?);
        } else if version == FORMAT_V4 {
            let (g, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.digests = Some(g);
            let (p, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.privileges = Some(p);
            d.thread_set = postcard::from_bytes(rest).map_err(|e| scope.error(e))?;
        } else if version == FORMAT_V5 {
            let (g, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.digests = Some(g);
            let (p, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.privileges = Some(p);
            let (t, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.thread_set = t;
            d.fd_objects = postcard::from_bytes(rest).map_err(|e| scope.error(e))?;
        } else {
            let (g, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.digests = Some(g);
            let (p, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.privileges = Some(p);
            let (t, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.thread_set = t;
            let (o, rest) = postcard::take_from_bytes(rest).map_err(|e| scope.error(e))?;
            d.fd_objects = o;
            d.container = postcard::from_bytes(rest).map_err(|e| scope.error(e))?;
        }
        d
    };
    drop(scope);
    if desc.format_version != version {
        return Err(ImageError::Invalid(format!(
            "the header says format {version}, the body {}",
            desc.format_version
        )));
    }
    validate(&desc, image_len)?;
    Ok(desc)
}

fn first8(b: &[u8]) -> [u8; 8] {
    let mut m = [0u8; 8];
    let n = b.len().min(8);
    m[..n].copy_from_slice(&b[..n]);
    m
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    a
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    a
}

/// The page store's size, when known, and the descriptor's agree.
fn store_matches(d: &Descriptor, image_len: Option<u64>) -> Result<(), ImageError> {
    match image_len {
        Some(len) if len != d.image_bytes => Err(ImageError::Invalid(format!(
            "page store is {len} bytes, descriptor says {}",
            d.image_bytes
        ))),
        _ => Ok(()),
    }
}

/// Check a descriptor's internal consistency (and, when given, against the
/// page store's size). Everything restore relies on is checked here.
pub fn validate(d: &Descriptor, image_len: Option<u64>) -> Result<(), ImageError> {
    let bad = |s: String| Err(ImageError::Invalid(s));
    if let Some(c) = &d.container {
        crate::container::validate(c).map_err(ImageError::Invalid)?;
    }
    // Also refused while decoding; checked again for descriptors built here.
    limits::check_count("xstate", d.xstate.len(), limits::MAX_XSTATE_BYTES)?;
    limits::check_count("sigactions", d.sigactions.len(), limits::MAX_SIGACTIONS)?;
    limits::check_count("auxv", d.auxv.len(), limits::MAX_AUXV_WORDS)?;
    limits::check_count("rlimits", d.rlimits.len(), limits::MAX_RLIMITS)?;
    limits::check_count("creds.groups", d.creds.groups.len(), limits::MAX_GROUPS)?;
    limits::check_count("fds", d.fds.len(), limits::MAX_FDS)?;
    limits::check_count("files", d.files.len(), limits::MAX_FILES)?;
    limits::check_count("vmas", d.vmas.len(), limits::MAX_VMAS)?;
    let runs: usize = d.vmas.iter().map(|v| v.runs.len()).sum();
    limits::check_count("vmas[].runs", runs, limits::MAX_RUNS)?;
    if !(FORMAT_V1..=FORMAT_VERSION).contains(&d.format_version) {
        return Err(ImageError::UnknownVersion {
            found: d.format_version,
        });
    }
    limits::check_count(
        "thread_set.others",
        d.thread_set.others.len(),
        limits::MAX_THREADS,
    )?;
    if d.threads as usize != 1 + d.thread_set.others.len() {
        return bad(format!(
            "{} threads, but the main thread and {} others recorded",
            d.threads,
            d.thread_set.others.len()
        ));
    }
    validate_objects(d)?;
    for t in &d.thread_set.others {
        if t.xstate.len() != d.xstate.len() {
            return bad(format!(
                "thread {}: an XSAVE area of {} bytes, the main thread's is {}",
                t.tid,
                t.xstate.len(),
                d.xstate.len()
            ));
        }
    }
    if d.image_bytes != d.pages_stored.saturating_mul(PAGE_SIZE) {
        return bad(format!(
            "image_bytes {} is not pages_stored {} x 4096",
            d.image_bytes, d.pages_stored
        ));
    }
    // No process has more memory than its address space.
    if d.image_bytes > limits::USER_END {
        return bad(format!(
            "image_bytes {} is more than a {:#x}-byte address space",
            d.image_bytes,
            limits::USER_END
        ));
    }
    store_matches(d, image_len)?;
    match (&d.privileges, d.format_version) {
        (Some(p), FORMAT_V3 | FORMAT_V4 | FORMAT_V5 | FORMAT_VERSION) => {
            // The kernel's own limits: BPF_MAXINSNS per filter,
            // MAX_INSNS_PER_PATH (32768) over a process's filters.
            let total: usize = p.seccomp_filters.iter().map(|f| f.insns.len() + 4).sum();
            if total > 32768 {
                return bad(format!(
                    "seccomp filters of {total} instructions in all (the kernel allows 32768)"
                ));
            }
            if p.seccomp_filters
                .iter()
                .any(|f| f.insns.is_empty() || f.insns.len() > 4096)
            {
                return bad(
                    "a seccomp filter of no or more than 4096 instructions (BPF_MAXINSNS)".into(),
                );
            }
        }
        (None, FORMAT_V1 | FORMAT_V2) => {}
        (Some(_), _) => return bad("privileges in a format 1 or 2 descriptor".into()),
        (None, _) => return bad("no privileges in a format 3 or later descriptor".into()),
    }
    match (&d.digests, d.format_version) {
        (None, FORMAT_V1) => {}
        (Some(g), FORMAT_V2 | FORMAT_V3 | FORMAT_V4 | FORMAT_V5 | FORMAT_VERSION) => {
            let cb = g.chunk_bytes as u64;
            if cb == 0 || !cb.is_multiple_of(PAGE_SIZE) || cb > 16 << 20 {
                return bad(format!("digest chunks of {cb} bytes"));
            }
            if g.xxh3.len() as u64 != d.image_bytes.div_ceil(cb) {
                return bad(format!(
                    "{} page digests for a {}-byte page store in {cb}-byte chunks",
                    g.xxh3.len(),
                    d.image_bytes
                ));
            }
        }
        (Some(_), _) => return bad("page digests in a format 1 descriptor".into()),
        (None, _) => return bad("no page digests".into()),
    }
    let mut prev_end = 0u64;
    let mut stored = 0u64;
    for (i, v) in d.vmas.iter().enumerate() {
        let name = || format!("vma #{i} {:#x}-{:#x}", v.start, v.end);
        if v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 || v.start >= v.end {
            return bad(format!("{}: not a page-aligned, non-empty range", name()));
        }
        if v.end > limits::USER_END {
            return bad(format!(
                "{}: beyond user space (which ends at {:#x})",
                name(),
                limits::USER_END
            ));
        }
        if v.start < prev_end {
            return bad(format!("{}: overlaps or is out of order", name()));
        }
        prev_end = v.end;
        match (v.kind.is_file_backed(), v.file) {
            (true, Some(f)) if (f as usize) < d.files.len() => {
                // mmap's offset: page aligned, and the mapping's end within off_t.
                let end = v.file_offset.checked_add(v.end - v.start);
                if v.file_offset % PAGE_SIZE != 0 || end.is_none_or(|e| e > i64::MAX as u64) {
                    return bad(format!(
                        "{}: file offset {:#x} is unaligned or runs past the largest file",
                        name(),
                        v.file_offset
                    ));
                }
            }
            (true, _) => {
                return bad(format!(
                    "{}: file-backed without a valid file index",
                    name()
                ))
            }
            (false, Some(_)) => {
                return bad(format!(
                    "{}: has a file index but is not file-backed",
                    name()
                ))
            }
            (false, None) => {}
        }
        if v.kind.is_kernel_provided() {
            if !v.runs.is_empty() {
                return bad(format!(
                    "{}: kernel-provided mapping with page runs",
                    name()
                ));
            }
            continue;
        }
        let mut next = 0u64;
        for r in &v.runs {
            if r.first != next || r.count == 0 {
                return bad(format!("{}: page runs do not cover it in order", name()));
            }
            next = r
                .first
                .checked_add(r.count)
                .ok_or_else(|| ImageError::Invalid(format!("{}: run overflows", name())))?;
            match r.state {
                PageState::Stored { offset } => {
                    let len = r.count.checked_mul(PAGE_SIZE);
                    let end = len.and_then(|l| offset.checked_add(l));
                    match end {
                        Some(end) if offset % PAGE_SIZE == 0 && end <= d.image_bytes => {}
                        _ => {
                            return bad(format!(
                                "{}: stored pages at offset {offset:#x} (+{} pages) outside the {}-byte page store",
                                name(),
                                r.count,
                                d.image_bytes
                            ))
                        }
                    }
                    stored += r.count;
                }
                PageState::FromFile if !v.kind.is_file_backed() => {
                    return bad(format!(
                        "{}: from-file pages in a mapping without a file",
                        name()
                    ))
                }
                _ => {}
            }
        }
        if next != v.pages() {
            return bad(format!(
                "{}: page runs cover {next} of {} pages",
                name(),
                v.pages()
            ));
        }
    }
    if stored != d.pages_stored {
        return bad(format!(
            "runs store {stored} pages, descriptor says {}",
            d.pages_stored
        ));
    }
    Ok(())
}

/// A seed image on disk, opened and validated.
#[derive(Debug)]
pub struct SeedImage {
    dir: PathBuf,
    descriptor: Descriptor,
    /// The page store; `None` for a descriptor of a seed held elsewhere.
    pages: Option<File>,
}

impl SeedImage {
    /// Open the image in `dir`, validating the descriptor against the page store.
    pub fn open(dir: &Path) -> Result<SeedImage, ImageError> {
        let dpath = dir.join(DESCRIPTOR_FILE);
        let ppath = dir.join(PAGES_FILE);
        let bytes = read_bounded(&dpath)?;
        let pages = File::open(&ppath).map_err(io_err(&ppath))?;
        let len = pages.metadata().map_err(io_err(&ppath))?.len();
        let descriptor = decode(&bytes, Some(len))?;
        Ok(SeedImage {
            dir: dir.to_path_buf(),
            descriptor,
            pages: Some(pages),
        })
    }

    /// Open just the descriptor in `dir` (a seed whose pages are on
    /// another node): validated on its own terms.
    pub fn open_descriptor(dir: &Path) -> Result<SeedImage, ImageError> {
        let dpath = dir.join(DESCRIPTOR_FILE);
        let bytes = read_bounded(&dpath)?;
        let descriptor = decode(&bytes, None)?;
        Ok(SeedImage {
            dir: dir.to_path_buf(),
            descriptor,
            pages: None,
        })
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The descriptor.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// Read `dst.len()` bytes of the page store at `offset`.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), ImageError> {
        let path = self.dir.join(PAGES_FILE);
        match &self.pages {
            Some(f) => f.read_exact_at(dst, offset).map_err(io_err(&path)),
            None => Err(ImageError::Io {
                path,
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "this node holds only the seed's descriptor",
                ),
            }),
        }
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > HEADER_LEN as u64 + MAX_BODY_LEN {
        return Err(ImageError::TooLarge { len });
    }
    fs::read(path).map_err(io_err(path))
}

/// Writes an image directory incrementally: pages are appended as capture
/// reads them, and the descriptor is written last, through a temporary file
/// and a rename, so a reader never sees a descriptor whose pages are not all
/// there.
#[derive(Debug)]
pub struct ImageWriter {
    dir: PathBuf,
    pages: File,
    written: u64,
    /// Digests of the whole chunks written so far.
    digests: Vec<u64>,
    /// The bytes of the chunk being written.
    partial: Vec<u8>,
}

impl ImageWriter {
    /// Start an image in `dir` (created if missing, 0700 in any case). Any
    /// image already there stops being valid at once: its descriptor is
    /// removed first. Every file written is 0600 ([`crate::private_fs`]).
    pub fn create(dir: &Path) -> Result<ImageWriter, ImageError> {
        private_fs::dir(dir).map_err(io_err(dir))?;
        let dpath = dir.join(DESCRIPTOR_FILE);
        match fs::remove_file(&dpath) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dpath)(e)),
        }
        let ppath = dir.join(PAGES_FILE);
        let pages = private_fs::create(&ppath).map_err(io_err(&ppath))?;
        Ok(ImageWriter {
            dir: dir.to_path_buf(),
            pages,
            written: 0,
            digests: Vec::new(),
            partial: Vec::new(),
        })
    }

    /// Append whole pages to the page store.
    pub fn append(&mut self, pages: &[u8]) -> Result<(), ImageError> {
        debug_assert_eq!(pages.len() as u64 % PAGE_SIZE, 0);
        let ppath = self.dir.join(PAGES_FILE);
        self.pages.write_all(pages).map_err(io_err(&ppath))?;
        self.written += pages.len() as u64;
        let cb = DIGEST_CHUNK as usize;
        let mut rest = pages;
        if !self.partial.is_empty() {
            let take = (cb - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() == cb {
                self.digests.push(PageDigests::digest(&self.partial));
                self.partial.clear();
            }
        }
        let mut whole = rest.chunks_exact(cb);
        self.digests.extend(whole.by_ref().map(PageDigests::digest));
        self.partial.extend_from_slice(whole.remainder());
        Ok(())
    }

    /// Bytes appended so far (the next page's offset).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Put the digests of the pages written into `desc` (as format 2),
    /// validate it against them and write it. With `durable`, everything
    /// is fsynced before the rename makes it visible.
    pub fn finish(mut self, desc: &mut Descriptor, durable: bool) -> Result<(), ImageError> {
        if !self.partial.is_empty() {
            self.digests.push(PageDigests::digest(&self.partial));
        }
        // Format 3 when the privileges were captured, else 2.
        desc.format_version = if desc.privileges.is_some() {
            FORMAT_VERSION
        } else {
            FORMAT_V2
        };
        desc.digests = Some(PageDigests {
            chunk_bytes: DIGEST_CHUNK,
            xxh3: std::mem::take(&mut self.digests),
        });
        validate(desc, Some(self.written))?;
        let ppath = self.dir.join(PAGES_FILE);
        let dpath = self.dir.join(DESCRIPTOR_FILE);
        let tmp = self.dir.join(format!("{DESCRIPTOR_FILE}.tmp"));
        if durable {
            self.pages.sync_all().map_err(io_err(&ppath))?;
        }
        let bytes = encode(desc)?;
        let mut df = private_fs::create(&tmp).map_err(io_err(&tmp))?;
        df.write_all(&bytes).map_err(io_err(&tmp))?;
        if durable {
            df.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &dpath).map_err(io_err(&dpath))?;
        if durable {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
        }
        Ok(())
    }
}

/// Write a whole image directory at once (see [`ImageWriter`]).
pub fn write(
    dir: &Path,
    desc: &mut Descriptor,
    pages: &[u8],
    durable: bool,
) -> Result<(), ImageError> {
    let mut w = ImageWriter::create(dir)?;
    w.append(pages)?;
    w.finish(desc, durable)
}

#[cfg(test)]
pub(crate) mod tests;

/// The kernel objects name descriptors the descriptor has, each once, in
/// order; duplicates and peers point at other recorded descriptors.
fn validate_objects(d: &Descriptor) -> Result<(), ImageError> {
    use crate::kobj::Object;
    let bad = |s: String| Err(ImageError::Invalid(s));
    let objs = &d.fd_objects.objects;
    limits::check_count("fd_objects", objs.len(), limits::MAX_FDS)?;
    if d.format_version < FORMAT_VERSION && !objs.is_empty() {
        return bad("kernel objects in a descriptor of format 4 or before".into());
    }
    let has = |fd: i32| d.fds.iter().any(|f| f.fd == fd);
    let mut last = 2;
    for o in objs {
        if o.fd <= last || !has(o.fd) {
            return bad(format!(
                "kernel object for fd {}: not a recorded descriptor above 2, in ascending order",
                o.fd
            ));
        }
        last = o.fd;
        let peer_ok = |p: &Option<i32>| p.is_none_or(|p| p != o.fd && p > 2 && has(p));
        match &o.object {
            Object::Dup { of } if *of >= o.fd || *of < 0 || !has(*of) => {
                return bad(format!(
                    "fd {} duplicates fd {of}, not a lower recorded descriptor",
                    o.fd
                ))
            }
            Object::Pipe { peer, .. } | Object::UnixPair { peer, .. } if !peer_ok(peer) => {
                return bad(format!(
                    "fd {}: its other end {peer:?} is not a recorded descriptor",
                    o.fd
                ))
            }
            Object::Epoll { watches } if watches.iter().any(|w| !has(w.fd) || w.fd == o.fd) => {
                return bad(format!(
                    "epoll fd {} watches a descriptor not recorded",
                    o.fd
                ))
            }
            Object::Epoll { watches } if watches.len() > limits::MAX_FDS => {
                return bad(format!("epoll fd {} has {} watches", o.fd, watches.len()))
            }
            _ => {}
        }
    }
    let bytes = d.fd_objects.content_bytes();
    if bytes > 2 * crate::kobj::MAX_CONTENT_BYTES {
        return bad(format!("kernel objects hold {bytes} bytes of contents"));
    }
    Ok(())
}
