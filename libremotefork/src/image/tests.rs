use super::*;
use crate::kobj::{EpollWatch, FdObject, FdObjects, Object};
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
        threads: 2,
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
        fds: vec![
            FdEntry {
                fd: 0,
                kind: FdKind::Pipe,
                path: "pipe:[1]".into(),
                flags: 0,
                offset: 0,
            },
            FdEntry {
                fd: 3,
                kind: FdKind::AnonInode,
                path: "anon_inode:[eventfd]".into(),
                flags: 0o2004002,
                offset: 0,
            },
            FdEntry {
                fd: 4,
                kind: FdKind::AnonInode,
                path: "anon_inode:[eventpoll]".into(),
                flags: 0o2000002,
                offset: 0,
            },
            FdEntry {
                fd: 5,
                kind: FdKind::AnonInode,
                path: "anon_inode:[eventfd]".into(),
                flags: 0o2004002,
                offset: 0,
            },
        ],
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
        privileges: Some(Privileges {
            caps: [0, 0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 0x1ff_ffff_ffff, 0],
            securebits: 0,
            no_new_privs: true,
            seccomp_mode: 2,
            seccomp_filters: vec![SeccompFilter {
                insns: vec![0x20, 0x7fff_0000_0000_0006],
                flags: 0,
            }],
            dumpable: 1,
            open_files: vec![],
        }),
        thread_set: ThreadSet {
            main_tid_word: true,
            main_tid: 42,
            others: vec![ThreadState {
                tid: 43,
                registers: Registers {
                    rip: 0x401100,
                    rsp: 0x7ffc0000,
                    rax: (-512i64) as u64,
                    orig_rax: 202,
                    ..Default::default()
                },
                xstate: vec![4, 5, 6],
                sigmask: 1 << 9,
                pending: 0,
                sigaltstack: SigAltStack::default(),
                rseq: None,
                robust_list: (0x7100, 24),
                clear_child_tid: 0x7200,
                tid_word: true,
                comm: "worker".into(),
            }],
        },
        container: None,
        fd_objects: FdObjects {
            objects: vec![
                FdObject {
                    fd: 3,
                    object: Object::EventFd {
                        count: 5,
                        semaphore: false,
                    },
                },
                FdObject {
                    fd: 4,
                    object: Object::Epoll {
                        watches: vec![EpollWatch {
                            fd: 3,
                            events: 0x8000_0001,
                            data: 7,
                        }],
                    },
                },
                FdObject {
                    fd: 5,
                    object: Object::Dup { of: 3 },
                },
            ],
        },
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
    d.privileges = None;
    d.threads = 1;
    d.thread_set = ThreadSet::default();
    d.fd_objects = FdObjects::default();
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

#[test]
fn format_3_descriptors_decode_with_the_main_thread_only() {
    let mut d = sample();
    d.format_version = FORMAT_V3;
    d.threads = 1;
    d.thread_set = ThreadSet::default();
    d.fd_objects = FdObjects::default();
    d.fd_objects = FdObjects::default();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back, d);
    // Format 4 carries every thread through encode and decode, and its
    // thread count must match them.
    let d = sample();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back.thread_set, d.thread_set);
    let mut d = sample();
    d.threads = 3;
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("3 threads"), "{e}");
    let mut d = sample();
    d.thread_set.others[0].xstate.push(0);
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("XSAVE"), "{e}");
}

#[test]
fn a_new_thread_issues_a_restart_block_syscall_again() {
    // nanosleep interrupted: the parent restarts it through its restart
    // block; a child's new thread issues nanosleep again.
    let r = Registers {
        rip: 0x1002,
        rax: (-516i64) as u64,
        orig_rax: 35,
        ..Default::default()
    };
    assert_eq!((r.restarted().rax, r.restarted().rip), (219, 0x1000));
    let c = r.restarted_in_child();
    assert_eq!((c.rax, c.rip), (35, 0x1000));
    // restart_syscall itself interrupted: EINTR.
    let r = Registers { orig_rax: 219, ..r };
    let c = r.restarted_in_child();
    assert_eq!((c.rax as i64, c.rip), (-(libc::EINTR as i64), 0x1002));
    // Other restart codes are as in the parent.
    let r = Registers {
        rax: (-512i64) as u64,
        orig_rax: 202,
        ..r
    };
    assert_eq!(r.restarted_in_child(), r.restarted());
}

#[test]
fn format_2_descriptors_decode_without_privileges_and_format_3_needs_them() {
    let mut d = sample();
    d.format_version = FORMAT_V2;
    d.privileges = None;
    d.threads = 1;
    d.thread_set = ThreadSet::default();
    d.fd_objects = FdObjects::default();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back, d);
    // Format 3 carries the seccomp filters through encode and decode.
    let d = sample();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back.privileges, d.privileges);
    let mut d = sample();
    d.privileges = None;
    assert!(encode(&d).is_err());
    let mut d = sample();
    d.privileges.as_mut().unwrap().seccomp_filters[0].insns = vec![0; 5000];
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("seccomp filter"), "{e}");
}

/// Counts the bytes each thread asks the allocator for, to show what a
/// decode costs.
struct CountingAlloc;

thread_local! {
    static ASKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn note(bytes: usize) {
    // A const-initialised thread-local of a plain integer: no allocation,
    // no destructor, safe to touch from inside the allocator.
    let _ = ASKED.try_with(|a| a.set(a.get().saturating_add(bytes)));
}

// SAFETY: every call is passed unchanged to the system allocator; counting
// only adds to a thread-local integer.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: the caller's obligations are the system allocator's.
        unsafe { std::alloc::System.alloc(l) }
    }

    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: `p` came from the system allocator with layout `l`.
        unsafe { std::alloc::System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: as for dealloc; `new` is the caller's valid size.
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `f`'s result and the bytes this thread asked the allocator for during it.
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ASKED.with(|a| a.get());
    let r = f();
    (r, ASKED.with(|a| a.get()) - before)
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A descriptor file around `body`, with a correct checksum.
fn sealed(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// The body of `desc` with the empty sequence that comes just before the
/// encoded fields `tail` replaced by the bytes `seq` (its length and
/// entries, as forged as wanted).
fn forged_body(desc: &Descriptor, tail: &[u8], seq: &[u8]) -> Vec<u8> {
    let body = postcard::to_allocvec(desc).unwrap();
    let at = body.len() - tail.len() - 1;
    assert_eq!(&body[at + 1..], tail);
    assert_eq!(body[at], 0, "the sequence to replace is empty");
    [&body[..at], seq, &body[at + 1..]].concat()
}

/// A format 1 sample (no digests: the body is the descriptor alone).
fn sample_v1() -> Descriptor {
    let mut d = sample();
    d.format_version = FORMAT_V1;
    d.digests = None;
    d.privileges = None;
    d.threads = 1;
    d.thread_set = ThreadSet::default();
    d.fd_objects = FdObjects::default();
    d
}

fn tail_after_vmas(d: &Descriptor) -> Vec<u8> {
    postcard::to_allocvec(&(&d.vdso_hash, d.pages_stored, d.image_bytes, &d.stats)).unwrap()
}

#[test]
fn a_forged_huge_length_fails_fast_without_allocating() {
    let mut d = sample_v1();
    d.vmas.clear();
    let tail = tail_after_vmas(&d);
    // 2^60 mappings claimed, 64 bytes of them present.
    let seq = [varint(1 << 60), vec![0u8; 64]].concat();
    let bytes = sealed(FORMAT_V1, &forged_body(&d, &tail, &seq));
    let t0 = std::time::Instant::now();
    let (r, allocated) = allocated_by(|| decode(&bytes, None));
    match r {
        Err(ImageError::DecodeIn { field, .. }) => assert!(field.starts_with("vmas"), "{field}"),
        other => panic!("{other:?}"),
    }
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));

    // The same for the page digests of a format 2 descriptor.
    let d = sample();
    let mut body = postcard::to_allocvec(&d).unwrap();
    body.extend(varint(DIGEST_CHUNK as u64));
    body.extend(varint(1 << 60));
    body.extend([0u8; 64]);
    let bytes = sealed(FORMAT_VERSION, &body);
    let (r, allocated) = allocated_by(|| decode(&bytes, None));
    assert!(
        matches!(
            r,
            Err(ImageError::TooMany {
                field: "digests.xxh3",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");
}

#[test]
fn more_entries_than_a_process_can_have_are_refused_before_they_are_made() {
    // A million and one descriptors, 5 bytes each, really there: a
    // 5 MiB body that would decode to 48 MiB.
    let mut d = sample_v1();
    d.fds.clear();
    let tail = postcard::to_allocvec(&(
        &d.files,
        &d.vmas,
        &d.vdso_hash,
        d.pages_stored,
        d.image_bytes,
        &d.stats,
    ))
    .unwrap();
    let entry = postcard::to_allocvec(&FdEntry {
        fd: 0,
        kind: FdKind::Pipe,
        path: String::new(),
        flags: 0,
        offset: 0,
    })
    .unwrap();
    let n = limits::MAX_FDS + 1;
    let seq = [varint(n as u64), entry.repeat(n)].concat();
    let bytes = sealed(FORMAT_V1, &forged_body(&d, &tail, &seq));
    let (r, allocated) = allocated_by(|| decode(&bytes, None));
    match r {
        Err(ImageError::TooMany {
            field: "fds",
            count,
            limit,
        }) => assert_eq!((count, limit), (n as u64, limits::MAX_FDS as u64)),
        other => panic!("{other:?}"),
    }
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");

    // Page runs: 3 bytes each, 32 decoded.
    let mut d = sample_v1();
    d.vmas.truncate(1);
    d.vmas[0].runs.clear();
    let tail = tail_after_vmas(&d);
    let run = postcard::to_allocvec(&PageRun {
        first: 0,
        count: 1,
        state: PageState::Zero,
    })
    .unwrap();
    let n = limits::MAX_RUNS + 1;
    let seq = [varint(n as u64), run.repeat(n)].concat();
    let bytes = sealed(FORMAT_V1, &forged_body(&d, &tail, &seq));
    let (r, allocated) = allocated_by(|| decode(&bytes, None));
    assert!(
        matches!(r, Err(ImageError::TooMany { field: "vmas[].runs", count, .. }) if count == n as u64),
        "{r:?}"
    );
    assert!(allocated < 1 << 20, "{allocated} bytes allocated");

    // Counts under the limits of the kernel, over those of a process.
    let mut d = sample();
    d.sigactions = vec![SigAction::default(); 65];
    let e = decode(&encode(&d).unwrap(), None).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::TooMany {
                field: "sigactions",
                count: 65,
                limit: 64
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("sigactions"), "{e}");
    assert!(matches!(
        validate(&d, None),
        Err(ImageError::TooMany {
            field: "sigactions",
            ..
        })
    ));
}

#[test]
fn a_digest_table_longer_than_the_page_store_is_refused() {
    // Three pages stored: no more than three digests are even read.
    let d = sample();
    let mut body = postcard::to_allocvec(&d).unwrap();
    body.extend(
        postcard::to_allocvec(&PageDigests {
            chunk_bytes: 4096,
            xxh3: vec![1, 2, 3, 4],
        })
        .unwrap(),
    );
    let bytes = sealed(FORMAT_VERSION, &body);
    let e = decode(&bytes, None).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::TooMany {
                field: "digests.xxh3",
                count: 4,
                limit: 3
            }
        ),
        "{e}"
    );
    // Against a page store of another size, refused before the digests.
    let e = decode(&bytes, Some(4096)).unwrap_err();
    assert!(e.to_string().contains("page store is 4096 bytes"), "{e}");
}

#[test]
fn mappings_outside_user_space_are_refused() {
    let err = |d: &Descriptor| decode(&encode(d).unwrap(), None).unwrap_err().to_string();
    // The vDSO moved to the first address past 47 bits.
    let mut d = sample();
    d.vmas[2].start = limits::USER_END;
    d.vmas[2].end = limits::USER_END + 0x2000;
    assert!(err(&d).contains("beyond user space"), "{}", err(&d));
    // A 2^62-byte mapping.
    let mut d = sample();
    d.vmas[2].end = d.vmas[2].start + (1 << 62);
    assert!(err(&d).contains("vma #2"), "{}", err(&d));
    assert!(err(&d).contains("beyond user space"), "{}", err(&d));
    // Empty, reversed, unaligned.
    let mut d = sample();
    d.vmas[1].end = d.vmas[1].start;
    assert!(err(&d).contains("non-empty"), "{}", err(&d));
    let mut d = sample();
    d.vmas[1].start += 1;
    assert!(err(&d).contains("page-aligned"), "{}", err(&d));
    // A file offset mmap would refuse.
    let mut d = sample();
    d.vmas[0].file_offset = 100;
    assert!(err(&d).contains("file offset 0x64"), "{}", err(&d));
    let mut d = sample();
    d.vmas[0].file_offset = !0xfff;
    assert!(err(&d).contains("past the largest file"), "{}", err(&d));
    // More memory stored than an address space holds.
    let mut d = sample();
    d.pages_stored = 1 << 40;
    d.image_bytes = 1 << 52;
    assert!(validate(&d, None)
        .unwrap_err()
        .to_string()
        .contains("address space"));
}

#[test]
fn format_5_carries_kernel_objects_and_checks_them() {
    let d = sample();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back.fd_objects, d.fd_objects);
    // Format 4 has none, and decodes without.
    let mut d4 = sample();
    d4.format_version = FORMAT_V4;
    d4.fd_objects = FdObjects::default();
    let back = decode(&encode(&d4).unwrap(), Some(d4.image_bytes)).unwrap();
    assert_eq!(back, d4);
    // Objects in a format 4 descriptor, a duplicate of a higher fd, an
    // object for an fd not recorded, a watch of an fd not recorded: refused.
    // (Format 4 does not encode them: only a descriptor built here can.)
    let mut bad = sample();
    bad.format_version = FORMAT_V4;
    let e = validate(&bad, None).unwrap_err();
    assert!(e.to_string().contains("format 4"), "{e}");
    let mut bad = sample();
    bad.fd_objects.objects[2].object = Object::Dup { of: 9 };
    let e = decode(&encode(&bad).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("duplicates fd 9"), "{e}");
    let mut bad = sample();
    bad.fd_objects.objects[0].fd = 7;
    let e = decode(&encode(&bad).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("fd 7"), "{e}");
    let mut bad = sample();
    bad.fd_objects.objects[1].object = Object::Epoll {
        watches: vec![EpollWatch {
            fd: 11,
            events: 1,
            data: 0,
        }],
    };
    let e = decode(&encode(&bad).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("watches"), "{e}");
}

fn container_seed() -> Descriptor {
    use crate::container::{ChildMount, ContainerInfo, TmpfsEntry};
    let mut d = sample();
    d.container = Some(ContainerInfo {
        rootfs_digest: format!("sha256:{}", "ab".repeat(32)),
        rootfs_files: 3,
        rootfs_bytes: 100,
        readonly_root: true,
        hostname: "rf-container".into(),
        namespaces: vec!["pid".into(), "mnt".into()],
        mounts: vec![
            ChildMount::Tmpfs {
                at: "/dev".into(),
                flags: 0,
                data: "mode=755".into(),
                entries: vec![TmpfsEntry::Node {
                    path: "null".into(),
                    mode: libc::S_IFCHR | 0o666,
                    rdev: libc::makedev(1, 3),
                }],
            },
            ChildMount::Bind {
                from: "/dev/null".into(),
                at: "/proc/kcore".into(),
                flags: 0,
            },
        ],
        not_kept: vec!["x".into()],
        interfaces: vec!["lo".into()],
        uid_map: "0 0 4294967295".into(),
        limits: Default::default(),
    });
    d
}

#[test]
fn a_container_section_round_trips_in_format_6() {
    let d = container_seed();
    let back = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap();
    assert_eq!(back.container, d.container);
}

#[test]
fn a_container_section_that_escapes_the_root_or_makes_a_disk_node_is_refused() {
    use crate::container::{ChildMount, TmpfsEntry};
    let mut d = container_seed();
    if let Some(c) = d.container.as_mut() {
        c.mounts[1] = ChildMount::Bind {
            from: "/../../etc/shadow".into(),
            at: "/x".into(),
            flags: 0,
        };
    }
    let e = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap_err();
    assert!(e.to_string().contains("without \"..\""), "{e}");
    let mut d = container_seed();
    if let Some(c) = d.container.as_mut() {
        c.mounts[0] = ChildMount::Tmpfs {
            at: "/dev".into(),
            flags: 0,
            data: String::new(),
            entries: vec![TmpfsEntry::Node {
                path: "sda".into(),
                mode: libc::S_IFBLK | 0o666,
                rdev: libc::makedev(8, 0),
            }],
        };
    }
    let e = decode(&encode(&d).unwrap(), Some(d.image_bytes)).unwrap_err();
    assert!(e.to_string().contains("device node sda (8:0)"), "{e}");
}
