use super::*;
use crate::image::tests::sample;
use crate::procfs::FdEntry;

fn build4(
    d: &Descriptor,
    h: &HuskLayout,
    f: &[ResolvedFile],
    lazy: bool,
) -> Result<RestorePlan, PlanError> {
    build(d, h, f, lazy, None, 0, Who::default())
}

fn husk(vdso_at: u64) -> HuskLayout {
    let m = |s: u64, e: u64, p: &str| MapsEntry {
        start: s,
        end: e,
        prot: 5,
        shared: false,
        offset: 0,
        dev: "00:00".into(),
        inode: 0,
        path: p.into(),
    };
    HuskLayout {
        maps: vec![
            m(0x5f00_0000_0000, 0x5f00_0000_2000, "/tmp/rf-husk"),
            m(vdso_at, vdso_at + 0x2000, "[vdso]"),
            m(0x7fff_f7fd_0000, 0x7fff_f7ff_0000, "[stack]"),
        ],
    }
}

fn local() -> Vec<ResolvedFile> {
    vec![ResolvedFile::Local("/bin/x".into())]
}

#[test]
fn unmaps_the_husk_then_moves_the_vdso_then_maps_everything() {
    let d = sample();
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let names: Vec<&str> = p.map_ops.iter().map(|o| o.what.as_str()).collect();
    assert!(
        names[0].starts_with("munmap husk 0x5f0000000000"),
        "{names:?}"
    );
    assert!(
        names[1].starts_with("munmap husk 0x7ffff7fd0000"),
        "{names:?}"
    );
    assert!(
        names[2].starts_with("mremap [vdso] 0x7ffff0000000 -> 0x7fff0000"),
        "{names:?}"
    );
    // The file mapping: open, mmap from the saved fd (closed at the end).
    assert!(names[3].starts_with("open /bin/x"));
    assert_eq!(p.map_ops[4].args[4], Arg::Saved);
    assert_eq!(p.map_ops[4].expect, Some(0x400000));
    assert!(names[6].starts_with("close /bin/x"), "{names:?}");
    // The anonymous mapping, fixed and never replacing anything.
    let anon = &p.map_ops[5];
    assert_eq!(anon.nr, libc::SYS_mmap);
    assert_eq!(anon.args[0], Arg::Val(0x600000));
    assert_eq!(
        anon.args[3],
        Arg::Val((libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64)
    );
    assert_eq!(anon.expect, Some(0x600000));
    assert_eq!(p.map_ops.len(), 7);
    assert_eq!(
        p.backing,
        vec![Backing::File(0), Backing::Anonymous, Backing::Kernel]
    );
}

#[test]
fn an_overlapping_vdso_block_is_parked_first() {
    let d = sample();
    // The husk's vDSO sits one page below the seed's: the ranges overlap.
    let p = build4(&d, &husk(0x7fff_0000 - 0x1000), &local(), false).unwrap();
    let moves: Vec<&Op> = p
        .map_ops
        .iter()
        .filter(|o| o.nr == libc::SYS_mremap)
        .collect();
    assert_eq!(moves.len(), 2);
    let park = match moves[0].args[4] {
        Arg::Val(x) => x,
        _ => panic!(),
    };
    assert_eq!(moves[1].args[0], Arg::Val(park));
    assert_eq!(moves[1].args[4], Arg::Val(0x7fff_0000));
    // The executor area does not overlap the parked block.
    assert!(p.base >= park + 0x2000 || p.base + p.area_len() <= park);
}

#[test]
fn refuses_a_different_vdso_shape() {
    let d = sample();
    let mut h = husk(0x7fff_f000_0000);
    h.maps[1].end += 0x1000;
    assert!(matches!(
        build4(&d, &h, &local(), false),
        Err(PlanError::VdsoLayout { .. })
    ));
}

#[test]
fn missing_files_fall_back_to_the_seed_copy_or_refuse() {
    let d = sample();
    let p = build4(
        &d,
        &husk(0x7fff_f000_0000),
        &[ResolvedFile::SeedCopy("/seed/files/abcd".into())],
        false,
    )
    .unwrap();
    assert_eq!(p.file_paths, vec!["/seed/files/abcd".to_string()]);
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("/bin/x is missing or differs")),
        "{:?}",
        p.notes
    );
    let e = build4(
        &d,
        &husk(0x7fff_f000_0000),
        &[ResolvedFile::Unavailable],
        false,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("/bin/x is needed by mapping 0x400000-0x402000"),
        "{e}"
    );
    // Without from-file pages the file is not needed: anonymous memory will do.
    let mut d2 = sample();
    d2.vmas[0].runs = vec![crate::image::PageRun {
        first: 0,
        count: 2,
        state: PageState::Zero,
    }];
    d2.pages_stored = 2;
    d2.image_bytes = 2 * 4096;
    let p = build4(
        &d2,
        &husk(0x7fff_f000_0000),
        &[ResolvedFile::Unavailable],
        false,
    )
    .unwrap();
    assert_eq!(p.backing[0], Backing::Anonymous);
}

#[test]
fn executor_area_avoids_every_mapping_and_auxv_is_patched() {
    let d = sample();
    let h = husk(0x7fff_f000_0000);
    let p = build4(&d, &h, &local(), false).unwrap();
    let end = p.base + p.area_len();
    for (s, e) in d
        .vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(h.maps.iter().map(|m| (m.start, m.end)))
    {
        assert!(
            end <= s || p.base >= e,
            "executor {:#x}-{end:#x} overlaps {s:#x}-{e:#x}",
            p.base
        );
    }
    let blob = p.blob();
    assert_eq!(blob.code, p.base);
    assert!(blob.bytes.len() as u64 <= p.area_len());
    // The PR_SET_MM_MAP struct points at the auxv words in the data area.
    let prctl = p
        .state_ops
        .iter()
        .find(|o| o.what == "prctl(PR_SET_MM_MAP)")
        .unwrap();
    let mm_at = match prctl.args[2] {
        Arg::Data(o) => o,
        _ => panic!(),
    };
    let auxv_ptr = u64::from_le_bytes(p.data[mm_at + 88..mm_at + 96].try_into().unwrap());
    let auxv_off = (auxv_ptr - blob.data) as usize;
    assert_eq!(&p.data[auxv_off..auxv_off + 8], &6u64.to_le_bytes());
    assert_eq!(
        u32::from_le_bytes(p.data[mm_at + 96..mm_at + 100].try_into().unwrap()),
        32
    );
}

/// A cooperative all-threads checkpoint's answer socket is the child's
/// stdin, from scratch (duplicated at its number) and from a template
/// (its fork table puts the child's stdin there), never /dev/null.
#[test]
fn the_checkpoint_answer_descriptor_is_the_childs_stdin() {
    let mut d = sample();
    d.fd_objects = Default::default();
    d.fds = vec![FdEntry {
        fd: 3,
        kind: FdKind::CoopReply,
        path: "socket:[7]".into(),
        flags: libc::O_CLOEXEC as u32,
        offset: 0,
    }];
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let op = p
        .state_ops
        .iter()
        .find(|o| o.what.contains("fd 3"))
        .unwrap();
    assert_eq!(op.nr, libc::SYS_fcntl);
    assert_eq!(op.expect, Some(3));
    assert!(matches!(
        op.args[..3],
        [Arg::Val(0), Arg::Val(c), Arg::Val(3)] if c == libc::F_DUPFD_CLOEXEC as u64
    ));
    assert!(p.notes.iter().all(|n| !n.contains("fd 3")), "{:?}", p.notes);
    let f = fork_table(&d, 0x1000, 9, &[10, 11, 12], None, None);
    assert!(
        f.what
            .iter()
            .any(|w| w == "fd 3: the checkpoint's answer, from stdin"),
        "{:?}",
        f.what
    );
}

#[test]
fn fds_are_filled_in_order_with_placeholders_and_gaps() {
    let mut d = sample();
    d.fd_objects = Default::default();
    d.fds = vec![
        FdEntry {
            fd: 0,
            kind: FdKind::Pipe,
            path: "pipe:[1]".into(),
            flags: 0,
            offset: 0,
        },
        FdEntry {
            fd: 4,
            kind: FdKind::Regular,
            path: "/etc/hostname".into(),
            flags: libc::O_RDONLY as u32,
            offset: 3,
        },
        FdEntry {
            fd: 6,
            kind: FdKind::Socket,
            path: "socket:[9]".into(),
            flags: libc::O_CLOEXEC as u32,
            offset: 0,
        },
    ];
    // Without its object (a format 4 seed, or a format 5 one that lacks
    // it) fd 6 is refused, never made /dev/null.
    let e = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap_err();
    assert!(matches!(e, PlanError::FdNotRecorded { fd: 6, .. }), "{e}");
    d.fd_objects.objects.push(crate::kobj::FdObject {
        fd: 6,
        object: crate::kobj::Object::Closed {
            family: libc::AF_INET,
            ty: libc::SOCK_STREAM,
            protocol: 6,
            what: "TCP 1.2.3.4:5 -> 6.7.8.9:10".into(),
        },
    });
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let fd_ops: Vec<(&str, Option<u64>)> = p
        .state_ops
        .iter()
        .filter(|o| o.what.contains("fd "))
        .map(|o| (o.what.as_str(), o.expect))
        .collect();
    assert_eq!(
        fd_ops,
        vec![
            ("gap filler fd 3", Some(3)),
            ("reopen fd 4 /etc/hostname", Some(4)),
            ("lseek fd 4", None),
            ("gap filler fd 5", Some(5)),
            ("placeholder fd 6", Some(6)),
            (
                "fd 6: an unconnected socket for TCP 1.2.3.4:5 -> 6.7.8.9:10",
                None
            ),
            ("fd 6: placing the socket", Some(6)),
            ("fd 6: closing the socket's first number", None),
            ("fd 6: its file status flags", None),
            ("close gap filler fd 3", None),
            ("close gap filler fd 5", None),
        ]
    );
    assert!(
        p.notes.iter().any(|n| n.contains("fd 6: TCP 1.2.3.4:5")),
        "{:?}",
        p.notes
    );
    // A file missing on this node fails the spawn, naming it.
    let mut gone = d.clone();
    gone.fds.iter_mut().find(|f| f.fd == 4).unwrap().path = "/nonexistent/file".into();
    let e = build4(&gone, &husk(0x7fff_f000_0000), &local(), false).unwrap_err();
    assert!(e.to_string().contains("fd 4 (/nonexistent/file)"), "{e}");
    d.fds.push(FdEntry {
        fd: 100_000,
        kind: FdKind::Regular,
        path: "/x".into(),
        flags: 0,
        offset: 0,
    });
    assert!(matches!(
        build4(&d, &husk(0x7fff_f000_0000), &local(), false),
        Err(PlanError::FdTooHigh(100_000))
    ));
}

#[test]
fn state_phase_restores_handlers_rseq_and_ends_with_credentials() {
    // A format 2 seed: no privileges recorded, its child keeps forkd's.
    let mut d = sample();
    d.privileges = None;
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    assert!(names.contains(&"rt_sigaction(10)"));
    assert!(names.contains(&"rseq(0x7000)"));
    assert!(names.contains(&"set_robust_list"));
    assert!(names.contains(&"set_tid_address"));
    assert_eq!(
        &names[names.len() - 3..],
        &["setgroups", "setresgid", "setresuid"]
    );
    assert_eq!(p.soft_steps.len(), 1 + 16);
}

#[test]
fn refuses_mappings_outside_user_space() {
    let mut d = sample();
    d.vmas[1].start = TASK_SIZE;
    d.vmas[1].end = TASK_SIZE + 0x4000;
    let e = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap_err();
    assert!(
        e.to_string().contains("outside the user address space"),
        "{e}"
    );
}

#[test]
fn blob_entries_carry_the_flags() {
    let d = sample();
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let blob = p.blob();
    let entry = |i: usize| {
        let off = (blob.map_table.0 - blob.code) as usize + i * executor::ENTRY_SIZE;
        let w = |k: usize| {
            u64::from_le_bytes(blob.bytes[off + 8 * k..off + 8 * k + 8].try_into().unwrap())
        };
        (w(0), w(7), w(8))
    };
    // Entry 4 is the file mmap: fd from the saved result, EXPECT its address.
    let (nr, flags, extra) = entry(4);
    assert_eq!(nr, libc::SYS_mmap as u64);
    assert_eq!(flags, executor::saved_to_arg(4) | executor::EXPECT);
    assert_eq!(extra, 0x400000);
    let (_, flags, _) = entry(3);
    assert_eq!(flags, executor::SAVE);
}

#[test]
fn lazy_plans_make_a_userfaultfd_and_a_parent_death_signal() {
    let mut d = sample();
    d.privileges = None;
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), true).unwrap();
    // Only the anonymous mapping with stored pages is served lazily.
    assert_eq!(p.lazy, vec![false, true, false]);
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let u = names.iter().position(|n| *n == "userfaultfd()").unwrap();
    assert_eq!(names[u + 1], "move the userfaultfd up");
    assert_eq!(p.state_ops[u + 1].store, p.uffd_slot);
    assert_eq!(names.last(), Some(&"prctl(PR_SET_PDEATHSIG)"));
    assert!(names.iter().position(|n| *n == "setresuid").unwrap() > u);
    let eager = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    assert_eq!(eager.uffd_slot, None);
    assert!(!eager.state_ops.iter().any(|o| o.what == "userfaultfd()"));
}

#[test]
fn shared_cache_plans_map_anonymous_memory_from_the_cache() {
    let d = sample();
    let (base, size) = cache_layout(&d);
    // Only the anonymous mapping with stored pages has a place in the cache.
    assert_eq!(base, vec![None, Some(0), None]);
    assert_eq!(size, 0x4000);
    let cache = SharedCache {
        path: "/proc/1/fd/9".into(),
        base,
    };
    let p = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        true,
        Some(&cache),
        0,
        Who::default(),
    )
    .unwrap();
    assert_eq!(p.from_cache, vec![false, true, false]);
    let names: Vec<&str> = p.map_ops.iter().map(|o| o.what.as_str()).collect();
    let open = names
        .iter()
        .position(|n| *n == "open the seed cache")
        .unwrap();
    assert!(
        names[open + 1].starts_with("map 0x600000-0x604000 anon from the seed cache"),
        "{names:?}"
    );
    assert_eq!(p.map_ops[open + 1].args[4], Arg::Saved);
    assert_eq!(
        p.map_ops[open + 1].args[3],
        Arg::Val((libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE) as u64)
    );
    assert_eq!(names[open + 2], "close the seed cache");
    // No anonymous mmap of it besides.
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("map 0x600000"))
            .count(),
        1
    );
    // Eager plans never use the cache.
    let e = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        false,
        Some(&cache),
        0,
        Who::default(),
    )
    .unwrap();
    assert_eq!(e.from_cache, vec![false, false, false]);
}

#[test]
fn consecutive_mappings_of_one_file_share_one_open() {
    let mut d = sample();
    // Split the file mapping in two (as r--p then r-xp of one library).
    let mut second = d.vmas[0].clone();
    d.vmas[0].end = 0x401000;
    d.vmas[0].runs = vec![crate::image::PageRun {
        first: 0,
        count: 1,
        state: PageState::FromFile,
    }];
    second.start = 0x401000;
    second.file_offset = 0x1000;
    second.runs = vec![crate::image::PageRun {
        first: 0,
        count: 1,
        state: PageState::Stored { offset: 0 },
    }];
    d.vmas.insert(1, second);
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let opens = p
        .map_ops
        .iter()
        .filter(|o| o.nr == libc::SYS_openat2)
        .count();
    let closes = p.map_ops.iter().filter(|o| o.nr == libc::SYS_close).count();
    assert_eq!(
        (opens, closes),
        (1, 1),
        "{:?}",
        p.map_ops
            .iter()
            .map(|o| o.what.as_str())
            .collect::<Vec<_>>()
    );
    let maps: Vec<_> = p
        .map_ops
        .iter()
        .filter(|o| o.nr == libc::SYS_mmap && o.args[4] == Arg::Saved)
        .collect();
    assert_eq!(maps.len(), 2);
    assert_eq!(maps[1].args[5], Arg::Val(0x1000));
}

#[test]
fn a_tenant_child_gets_its_uid_no_new_privs_and_the_parents_filters_last() {
    let mut d = sample();
    d.privileges = Some(crate::image::Privileges {
        caps: [0, u64::MAX >> 23, u64::MAX >> 23, u64::MAX >> 23, 0],
        securebits: 0,
        no_new_privs: false,
        seccomp_mode: 2,
        seccomp_filters: vec![
            crate::image::SeccompFilter {
                insns: vec![0x06, 0x7fff_0000_0000_0006],
                flags: 0,
            },
            crate::image::SeccompFilter {
                insns: vec![0x7fff_0000_0000_0006],
                flags: 2,
            },
        ],
        dumpable: 1,
        open_files: vec![],
    });
    let run_as = Some(crate::restore::RunAs {
        uid: 2001,
        gid: 3001,
    });
    let p = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        false,
        None,
        0,
        Who {
            run_as,
            container_root: None,
            defer_privileges: false,
        },
    )
    .unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let n = names.len();
    assert!(names[n - 2].starts_with("seccomp") && names[n - 1].starts_with("seccomp"));
    assert_eq!(names[n - 3], "prctl(PR_SET_DUMPABLE, 1)");
    assert_eq!(names[n - 4], "prctl(PR_SET_NO_NEW_PRIVS)");
    // The tenant's ids, not the parent's; no capability kept.
    let uid_op = &p.state_ops[names.iter().position(|n| *n == "setresuid").unwrap()];
    assert_eq!(uid_op.args[0], Arg::Val(2001));
    let gid_op = &p.state_ops[names.iter().position(|n| *n == "setresgid").unwrap()];
    assert_eq!(gid_op.args[2], Arg::Val(3001));
    assert!(!names.iter().any(|n| n.starts_with("capset")));
    assert!(p.notes.iter().any(|n| n.contains("no_new_privs")));
    // The filters' programs point into the data area at their instructions.
    let blob = p.blob();
    let Arg::Data(prog) = p.state_ops[n - 2].args[2] else {
        panic!("no program argument")
    };
    let len = u16::from_le_bytes(p.data[prog..prog + 2].try_into().unwrap());
    assert_eq!(
        len, 2,
        "the older filter (two instructions) is installed first"
    );
    let ptr = u64::from_le_bytes(p.data[prog + 8..prog + 16].try_into().unwrap());
    let at = (ptr - blob.data) as usize;
    assert_eq!(
        u64::from_le_bytes(p.data[at..at + 8].try_into().unwrap()),
        0x06
    );
    // Its flags: LOG kept.
    assert_eq!(p.state_ops[n - 1].args[1], Arg::Val(2));
}

#[test]
fn a_root_parent_with_fewer_capabilities_gives_its_child_the_same() {
    let mut d = sample();
    let bounding = !(1u64 << 21); // no CAP_SYS_ADMIN
    d.privileges = Some(crate::image::Privileges {
        caps: [0, 0x3, 0x1, bounding & 0x1ff_ffff_ffff, 1],
        securebits: 0,
        no_new_privs: true,
        seccomp_mode: 0,
        seccomp_filters: vec![],
        dumpable: 1,
        open_files: vec![],
    });
    let p = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        false,
        None,
        0,
        Who::default(),
    )
    .unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let drop = names
        .iter()
        .position(|n| *n == "prctl(PR_CAPBSET_DROP, 21)")
        .unwrap();
    let uid = names.iter().position(|n| *n == "setresuid").unwrap();
    let capset = names.iter().position(|n| n.starts_with("capset")).unwrap();
    assert!(drop < uid && uid < capset, "{names:?}");
    assert!(names.contains(&"prctl(PR_CAP_AMBIENT_RAISE, 0)"));
    assert_eq!(names.last(), Some(&"prctl(PR_SET_DUMPABLE, 1)"));
    assert_eq!(names[names.len() - 2], "prctl(PR_SET_NO_NEW_PRIVS)");
    let Arg::Data(c) = p.state_ops[capset].args[1] else {
        panic!("no capset data")
    };
    // effective, permitted, inheritable (low halves).
    let w = |i: usize| u32::from_le_bytes(p.data[c + 4 * i..c + 4 * i + 4].try_into().unwrap());
    assert_eq!((w(0), w(1), w(2)), (0x1, 0x3, 0));
}

#[test]
fn the_userfaultfd_goes_below_a_lowered_descriptor_limit() {
    // A parent that lowered RLIMIT_NOFILE to 100 below a descriptor it
    // holds (251): the child's userfaultfd must go in a gap below 100 (a
    // fork of a template can place it only there), and the limit is set
    // after every descriptor is in place.
    let mut d = sample();
    d.rlimits[libc::RLIMIT_NOFILE as usize] = (100, 200);
    d.fds.push(crate::procfs::FdEntry {
        fd: 251,
        kind: crate::procfs::FdKind::Pipe,
        path: "pipe:[9]".into(),
        flags: 0,
        offset: 0,
    });
    d.fd_objects.objects.push(crate::kobj::FdObject {
        fd: 251,
        object: crate::kobj::Object::Pipe {
            read: true,
            peer: None,
            data: b"hi".to_vec(),
            size: 65536,
        },
    });
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), true).unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let up = names
        .iter()
        .position(|n| *n == "move the userfaultfd up")
        .unwrap();
    let Arg::Val(target) = p.state_ops[up].args[2] else {
        panic!("no target")
    };
    assert!((3..100).contains(&target), "target {target}");
    let nofile = names
        .iter()
        .position(|n| *n == format!("prlimit({})", libc::RLIMIT_NOFILE))
        .unwrap();
    let last_fd = names.iter().rposition(|n| n.contains("fd 251")).unwrap();
    assert!(nofile > last_fd && nofile > up, "{names:?}");
}

/// The sample's kernel objects (an eventfd at 3, an epoll at 4 watching it,
/// fd 5 a dup of 3) plus a pipe with both ends (7 writes, 8 reads, 2 bytes
/// queued) and a memfd at 9.
fn with_objects() -> Descriptor {
    use crate::kobj::{FdObject, MemoryKind, Object};
    let mut d = sample();
    let entry = |fd: i32, path: &str, flags: i32| FdEntry {
        fd,
        kind: crate::procfs::fd_kind(path, None),
        path: path.into(),
        flags: flags as u32,
        offset: 0,
    };
    d.fds.push(entry(7, "pipe:[77]", libc::O_WRONLY));
    d.fds
        .push(entry(8, "pipe:[77]", libc::O_RDONLY | libc::O_NONBLOCK));
    d.fds.push(entry(9, "/memfd:m (deleted)", libc::O_RDONLY));
    d.fd_objects.objects.extend([
        FdObject {
            fd: 7,
            object: Object::Pipe {
                read: false,
                peer: Some(8),
                data: vec![],
                size: 4096,
            },
        },
        FdObject {
            fd: 8,
            object: Object::Pipe {
                read: true,
                peer: Some(7),
                data: b"hi".to_vec(),
                size: 4096,
            },
        },
        FdObject {
            fd: 9,
            object: Object::Memory {
                kind: MemoryKind::Memfd { name: "m".into() },
                content: b"abc".to_vec(),
                seals: 0,
            },
        },
    ]);
    d
}

#[test]
fn kernel_objects_replace_placeholders_and_watches_come_last() {
    let d = with_objects();
    crate::image::validate(&d, None).unwrap();
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let at = |s: &str| {
        names
            .iter()
            .position(|n| *n == s)
            .unwrap_or_else(|| panic!("no {s:?} in {names:#?}"))
    };
    // Every number is held before any object is made.
    assert!(at("placeholder fd 9") < at("fd 3: eventfd2"));
    // The counter is written, the pipe made once (at its lower end) with
    // its bytes, the memfd at the first free number (10) with its contents.
    assert!(at("fd 3: setting the eventfd's counter to 5") > at("fd 3: eventfd2"));
    assert_eq!(names.iter().filter(|n| n.contains("pipe2")).count(), 1);
    let write = &p.state_ops[at("fd 7: putting back the 2 bytes in the pipe")];
    assert!(matches!(write.args[0], Arg::Load(_)), "{write:?}");
    assert_eq!(p.state_ops[at("fd 9: memfd_create(m)")].expect, Some(10));
    // Opened read-only as the parent had it: reopened through /proc.
    assert_eq!(
        p.state_ops[at("fd 9: reopening it with its access mode")].expect,
        Some(11)
    );
    assert!(at("fd 5: a duplicate of fd 3") > at("fd 3: placing the eventfd"));
    // The watch after everything, and before the gap fillers close.
    let watch = at("fd 4: watching fd 3 (events 0x80000001)");
    assert!(watch > at("fd 9: placing the file"));
    assert!(
        names[watch..]
            .iter()
            .any(|n| n.starts_with("close gap filler"))
            || !names.iter().any(|n| n.starts_with("close gap filler"))
    );
    // The pipe's read end keeps O_NONBLOCK, its write end not.
    let fl = |fd: &str| {
        let o = &p.state_ops[at(&format!("fd {fd}: its file status flags"))];
        o.args[2]
    };
    assert_eq!(fl("8"), Arg::Val(libc::O_NONBLOCK as u64));
    assert_eq!(fl("7"), Arg::Val(0));
}

#[test]
fn a_template_child_makes_its_own_queues_and_shares_files() {
    let d = with_objects();
    let t = fork_table(&d, 0x1000, 0, &[0, 1, 2], None, None);
    let names: Vec<&str> = t.what.iter().map(|s| s.as_str()).collect();
    // Its own eventfd, epoll (with the watch), pipe and the dup of its
    // own eventfd; the memfd it shares with the template, as a fork child
    // shares its parent's.
    for want in [
        "fd 3: eventfd2",
        "fd 4: epoll_create1",
        "fd 7: pipe2",
        "fd 5: a duplicate of fd 3",
        "fd 4: watching fd 3 (events 0x80000001)",
    ] {
        assert!(names.contains(&want), "no {want:?} in {names:#?}");
    }
    assert!(!names.iter().any(|n| n.contains("memfd")), "{names:#?}");
}

#[test]
fn only_a_memfd_gets_its_seals_back() {
    use crate::kobj::{MemoryKind, Object};
    // An unlinked tmpfs file reports F_SEAL_SEAL (every tmpfs file does): a
    // new one has it already, and adding it again would fail.
    let mut d = with_objects();
    d.fds.push(FdEntry {
        fd: 10,
        kind: crate::procfs::FdKind::Deleted,
        path: "/dev/shm/#12 (deleted)".into(),
        flags: libc::O_RDWR as u32,
        offset: 0,
    });
    d.fd_objects.objects.push(crate::kobj::FdObject {
        fd: 10,
        object: Object::Memory {
            kind: MemoryKind::Unlinked {
                dir: "/dev/shm".into(),
            },
            content: b"x".to_vec(),
            seals: libc::F_SEAL_SEAL as u32,
        },
    });
    if let Some(Object::Memory { seals, .. }) = d
        .fd_objects
        .objects
        .iter_mut()
        .find(|o| o.fd == 9)
        .map(|o| &mut o.object)
    {
        *seals = libc::F_SEAL_GROW as u32;
    }
    let p = build4(&d, &husk(0x7fff_f000_0000), &local(), false).unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    assert!(names.contains(&"fd 9: its seals 0x4"), "{names:#?}");
    assert!(
        !names.iter().any(|n| n.starts_with("fd 10: its seals")),
        "{names:#?}"
    );
}

#[test]
fn a_container_child_enters_its_root_after_its_files_are_mapped_and_before_its_cwd() {
    let d = sample();
    let p = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        false,
        None,
        0,
        Who {
            run_as: None,
            container_root: Some("/tmp/remotefork-containers/root"),
            defer_privileges: false,
        },
    )
    .unwrap();
    let names: Vec<&str> = p.state_ops.iter().map(|o| o.what.as_str()).collect();
    let pivot = names
        .iter()
        .position(|n| *n == "pivot_root into the container's root")
        .unwrap();
    assert_eq!(names[pivot - 1], "chdir(/tmp/remotefork-containers/root)");
    assert_eq!(names[pivot + 1], "unmounting the node's root");
    assert_eq!(names[pivot + 2], "chdir(/)");
    let cwd = names.iter().position(|n| *n == "chdir").unwrap();
    assert!(cwd > pivot, "{names:?}");
    // Nothing is mapped by path after the root changes.
    assert!(p.map_ops.iter().all(|o| o.nr != libc::SYS_pivot_root));
    // Without a container, no root change.
    let plain = build(
        &d,
        &husk(0x7fff_f000_0000),
        &local(),
        false,
        None,
        0,
        Who::default(),
    )
    .unwrap();
    assert!(plain.state_ops.iter().all(|o| o.nr != libc::SYS_pivot_root));
}

#[test]
fn a_child_forked_from_a_container_template_makes_its_root_then_drops_root() {
    use crate::container::{fork_steps, ChildSpec, ContainerInfo};
    let mut d = sample();
    d.container = Some(ContainerInfo {
        rootfs_digest: format!("sha256:{}", "ab".repeat(32)),
        hostname: "h".into(),
        ..Default::default()
    });
    let steps = fork_steps(d.container.as_ref().unwrap(), &ChildSpec::default());
    let fc = ForkContainer {
        steps: &steps,
        loopback: true,
        run_as: None,
    };
    let t = fork_table(&d, 0x1000, 0, &[0, 1, 2], None, Some(&fc));
    // The root and network in the prepare table (run at the fork), the
    // credentials in the table run at the spawn.
    let ((prep_at, n), prep) = t.prepare.clone().unwrap();
    assert_eq!(n as usize, prep.len());
    assert!(prep_at > t.table.0);
    let setresuid = t.what.iter().position(|x| x.contains("setresuid")).unwrap();
    assert!(setresuid > 0);
    let w: Vec<&str> = prep.iter().map(String::as_str).collect();
    let overlay = w
        .iter()
        .position(|x| x.starts_with("mount overlay"))
        .unwrap();
    let pivot = w
        .iter()
        .position(|x| *x == "pivot_root into the container's root")
        .unwrap();
    let lo = w.iter().position(|x| *x == "bringing loopback up").unwrap();
    // Root made on the staging tmpfs, entered, loopback up.
    assert!(
        w[..overlay]
            .iter()
            .any(|x| x.starts_with("mount tmpfs (tmpfs) on /proc")),
        "{w:?}"
    );
    assert!(overlay < pivot && pivot < lo, "{w:?}");
    assert_eq!(w[pivot - 1], "chdir(/proc/root)");
    // The same table without a container has none of it.
    let plain = fork_table(&d, 0x1000, 0, &[0, 1, 2], None, None);
    assert!(!plain
        .what
        .iter()
        .any(|x| x.contains("pivot_root") || x.contains("setresuid")));
}
