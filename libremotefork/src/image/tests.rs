use super::*;
use crate::procfs::{FdEntry, FdKind, MmFields};

/// The page store of [`sample`].
pub(crate) fn sample_pages() -> Vec<u8> {
    (0..3 * 4096).map(|i| (i % 13) as u8).collect()
}

/// A small, valid descriptor: one anon VMA with stored and zero pages, one
/// file VMA, the vDSO.
pub(crate) fn sample() -> Descriptor {
    Descriptor {
        format_version: FORMAT_VERSION,
        source: SourceInfo {
            pid: 42,
            hostname: "node".into(),
            kernel: "6.18".into(),
            created_unix_ms: 1,
        },
        threads: 1,
        registers: Registers {
            rip: 0x401000,
            rsp: 0x7ffd0000,
            ..Default::default()
        },
        xstate: vec![1, 2, 3],
        sigmask: 0,
        sigactions: vec![SigAction {
            signo: 10,
            handler: 0x401200,
            flags: 0x4000000,
            restorer: 0x401300,
            mask: 0,
        }],
        sigaltstack: SigAltStack::default(),
        rseq: Some(Rseq {
            ptr: 0x7000,
            len: 32,
            signature: 0x53053053,
            flags: 0,
        }),
        robust_list: (0x7100, 24),
        clear_child_tid: 0x7200,
        mm: MmFields::default(),
        auxv: vec![6, 4096, 0, 0],
        exe: "/bin/x".into(),
        personality: 0,
        comm: "x".into(),
        rlimits: vec![(1, 2); 16],
        umask: 0o22,
        cwd: "/".into(),
        creds: Credentials::default(),
        fds: vec![FdEntry {
            fd: 0,
            kind: FdKind::Pipe,
            path: "pipe:[1]".into(),
            flags: 0,
            offset: 0,
        }],
        files: vec![FileRef {
            path: "/bin/x".into(),
            size: 100,
            mtime_ns: 5,
            build_id: Some("abcd".into()),
            content_sha256: None,
        }],
        vmas: vec![
            Vma {
                start: 0x400000,
                end: 0x402000,
                prot: 5,
                shared: false,
                kind: VmaKind::FilePrivate,
                path: "/bin/x".into(),
                file: Some(0),
                file_offset: 0,
                runs: vec![
                    PageRun {
                        first: 0,
                        count: 1,
                        state: PageState::FromFile,
                    },
                    PageRun {
                        first: 1,
                        count: 1,
                        state: PageState::Stored { offset: 0 },
                    },
                ],
            },
            Vma {
                start: 0x600000,
                end: 0x604000,
                prot: 3,
                shared: false,
                kind: VmaKind::Anon,
                path: String::new(),
                file: None,
                file_offset: 0,
                runs: vec![
                    PageRun {
                        first: 0,
                        count: 2,
                        state: PageState::Stored { offset: 4096 },
                    },
                    PageRun {
                        first: 2,
                        count: 2,
                        state: PageState::Zero,
                    },
                ],
            },
            Vma {
                start: 0x7fff0000,
                end: 0x7fff2000,
                prot: 5,
                shared: false,
                kind: VmaKind::Vdso,
                path: "[vdso]".into(),
                file: None,
                file_offset: 0,
                runs: vec![],
            },
        ],
        vdso_hash: "00".repeat(32),
        pages_stored: 3,
        image_bytes: 3 * 4096,
        stats: CaptureStats::default(),
        digests: Some(PageDigests::of(&sample_pages())),
    }
}

#[test]
fn round_trips() {
    let d = sample();
    let bytes = encode(&d).unwrap();
    assert_eq!(decode(&bytes, Some(3 * 4096)).unwrap(), d);
}

#[test]
fn refuses_bad_magic() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[0] = b'X';
    let e = decode(&bytes, None).unwrap_err();
    assert!(matches!(e, ImageError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a remotefork seed descriptor"));
}

#[test]
fn refuses_unknown_version() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    let e = decode(&bytes, None).unwrap_err();
    assert!(matches!(e, ImageError::UnknownVersion { found: 99 }), "{e}");
}

#[test]
fn refuses_truncation_at_every_length() {
    let bytes = encode(&sample()).unwrap();
    for n in 0..bytes.len() {
        let e = decode(&bytes[..n], None).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "at {n}: {e}");
    }
}

#[test]
fn refuses_corruption_by_checksum() {
    let mut bytes = encode(&sample()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    assert!(matches!(decode(&bytes, None), Err(ImageError::Checksum)));
}

#[test]
fn refuses_huge_declared_length() {
    let mut bytes = encode(&sample()).unwrap();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode(&bytes, None),
        Err(ImageError::TooLarge { .. })
    ));
}

#[test]
fn refuses_offsets_out_of_range() {
    let mut d = sample();
    d.vmas[1].runs[0].state = PageState::Stored { offset: 1 << 40 };
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(
        e.to_string().contains("outside the 12288-byte page store"),
        "{e}"
    );

    let mut d = sample();
    d.vmas[1].runs[0].state = PageState::Stored {
        offset: u64::MAX - 4095,
    };
    assert!(decode(&encode(&d).unwrap(), None).is_err());

    let mut d = sample();
    d.vmas[1].runs[0].state = PageState::Stored { offset: 100 };
    assert!(decode(&encode(&d).unwrap(), None).is_err());
}

#[test]
fn refuses_inconsistent_layouts() {
    let mut d = sample();
    d.vmas.swap(0, 1);
    assert!(validate(&d, None)
        .unwrap_err()
        .to_string()
        .contains("out of order"));

    let mut d = sample();
    d.vmas[1].runs.pop();
    assert!(validate(&d, None)
        .unwrap_err()
        .to_string()
        .contains("cover 2 of 4"));

    let mut d = sample();
    d.vmas[1].runs[1].state = PageState::FromFile;
    assert!(validate(&d, None).is_err());

    let mut d = sample();
    d.vmas[0].file = Some(7);
    assert!(validate(&d, None).is_err());

    let mut d = sample();
    d.pages_stored = 2;
    assert!(validate(&d, None).is_err());

    assert!(validate(&sample(), Some(4096))
        .unwrap_err()
        .to_string()
        .contains("page store is 4096 bytes"));
}

/// xorshift64*: a tiny deterministic generator for the fuzz loops.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..20_000 {
        let len = (rng.next() % 600) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half the inputs get a valid header so the body decoder is reached.
        if i % 2 == 0 && len >= HEADER_LEN {
            buf[..8].copy_from_slice(&MAGIC);
            buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            let body_len = (len - HEADER_LEN) as u64;
            buf[16..24].copy_from_slice(&body_len.to_le_bytes());
            let sum = Sha256::digest(&buf[HEADER_LEN..]);
            buf[24..56].copy_from_slice(&sum);
        }
        let _ = decode(&buf, None);
    }
}

#[test]
fn mutated_bodies_never_panic_and_never_pass_unchecked() {
    let body = postcard::to_allocvec(&sample()).unwrap();
    let mut rng = Rng(7);
    for _ in 0..20_000 {
        let mut b = body.clone();
        for _ in 0..(1 + rng.next() % 4) {
            let i = (rng.next() as usize) % b.len();
            b[i] = rng.next() as u8;
        }
        if rng.next().is_multiple_of(8) {
            b.truncate((rng.next() as usize) % b.len());
        }
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&Sha256::digest(&b));
        bytes.extend_from_slice(&b);
        // Whatever decodes must also be valid against its own page store size.
        if let Ok(d) = decode(&bytes, None) {
            validate(&d, Some(d.image_bytes)).unwrap();
        }
    }
}

#[test]
fn writes_and_opens_an_image_dir() {
    let dir = std::env::temp_dir().join(format!("rf-image-test-{}", std::process::id()));
    let pages = sample_pages();
    write(&dir, &mut sample(), &pages, true).unwrap();
    let img = SeedImage::open(&dir).unwrap();
    assert_eq!(img.descriptor(), &sample());
    let mut buf = vec![0u8; 4096];
    img.read_at(4096, &mut buf).unwrap();
    assert_eq!(&buf[..], &pages[4096..8192]);
    // A page store of the wrong size is refused.
    fs::write(dir.join(PAGES_FILE), &pages[..4096]).unwrap();
    assert!(SeedImage::open(&dir).is_err());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_image_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let dir = std::env::temp_dir().join(format!("rf-image-mode-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // Left by an earlier writer with modes open to everyone.
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join(PAGES_FILE), b"old").unwrap();
    fs::set_permissions(dir.join(PAGES_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    write(&dir, &mut sample(), &sample_pages(), false).unwrap();
    assert_eq!(mode(&dir), 0o700);
    let mut names = Vec::new();
    for e in fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        names.push(e.file_name().into_string().unwrap());
    }
    names.sort();
    assert_eq!(names, [DESCRIPTOR_FILE, PAGES_FILE]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restart_registers_like_the_kernel() {
    let r = Registers {
        rax: (-512i64) as u64,
        orig_rax: 0,
        rip: 0x1002,
        ..Default::default()
    };
    let s = r.restarted();
    assert_eq!((s.rax, s.rip), (0, 0x1000));
    assert_eq!(r.interrupted_syscall(), Some(0));
    let r = Registers {
        rax: (-516i64) as u64,
        orig_rax: 35,
        rip: 0x1002,
        ..Default::default()
    };
    assert_eq!(r.restarted().rax, 219);
    let r = Registers {
        rax: 5,
        orig_rax: u64::MAX,
        rip: 0x1002,
        ..Default::default()
    };
    assert_eq!(r.restarted(), r);
    assert_eq!(r.interrupted_syscall(), None);
}

#[test]
fn format_1_descriptors_without_digests_still_decode() {
    let mut d = sample();
    d.format_version = FORMAT_V1;
    d.digests = None;
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back, d);
    // Format 2 needs them, and the right number of them.
    let mut d = sample();
    d.digests = None;
    assert!(encode(&d).is_err());
    let mut d = sample();
    d.digests.as_mut().unwrap().xxh3.push(7);
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("page digests"), "{e}");
}

#[test]
fn the_writer_digests_chunks_across_unaligned_appends() {
    let dir = std::env::temp_dir().join(format!("rf-digest-test-{}", std::process::id()));
    // 37 pages: two whole 64 KiB chunks and a short last one, appended in
    // pieces that do not line up with chunks.
    let pages: Vec<u8> = (0..37 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = ImageWriter::create(&dir).unwrap();
    for piece in pages.chunks(3 * 4096) {
        w.append(piece).unwrap();
    }
    let mut d = sample();
    d.pages_stored = 37;
    d.image_bytes = 37 * 4096;
    // Pages 3..37 are stored too: one more anonymous mapping holds them.
    d.vmas.insert(
        2,
        Vma {
            start: 0x700000,
            end: 0x700000 + 34 * 4096,
            prot: 3,
            shared: false,
            kind: VmaKind::Anon,
            path: String::new(),
            file: None,
            file_offset: 0,
            runs: vec![PageRun {
                first: 0,
                count: 34,
                state: PageState::Stored { offset: 3 * 4096 },
            }],
        },
    );
    w.finish(&mut d, false).unwrap();
    assert_eq!(d.digests, Some(PageDigests::of(&pages)));
    let back = SeedImage::open(&dir).unwrap();
    let g = back.descriptor().digests.clone().unwrap();
    assert_eq!(g.xxh3.len(), 3);
    assert_eq!(g.chunk_range(2, d.image_bytes), (2 << 16, 37 * 4096));
    assert!(g.check(2, &pages[2 << 16..]));
    let mut flipped = pages[..1 << 16].to_vec();
    flipped[100] ^= 1;
    assert!(!g.check(0, &flipped));
    fs::remove_dir_all(&dir).unwrap();
}
