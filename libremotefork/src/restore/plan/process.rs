//! The first steps of the state phase, and the resource limits: what the
//! process is (mm fields, exe, signal handlers, rseq, robust list,
//! personality, comm, umask, cwd, rlimits) besides its descriptors and
//! credentials.

use super::{
    open_no_symlinks, prlimit_op, robust_list_op, v, Arg, Descriptor, Draft, Op, ResolvedFile,
    SoftStep, PRCTL_MM_MAP_SIZE, PR_SET_MM, PR_SET_MM_MAP, PR_SET_NAME,
};

/// 4. Only stdio is inherited from the spawner: close anything else the
///    husk was given, so the parent's descriptors get their own numbers.
pub(super) fn plan_close_inherited(d: &mut Draft) {
    d.state_ops.push(Op::new(
        libc::SYS_close_range,
        [v(3), v(u32::MAX as u64), v(0), v(0), v(0), v(0)],
        "close_range(3, ~0)",
    ));
}

/// Give the mappings mapped writable first their own protection.
pub(super) fn plan_protections(d: &mut Draft, desc: &Descriptor, write_first: &[bool]) {
    for (vma, wf) in desc.vmas.iter().zip(write_first) {
        if *wf {
            d.state_ops.push(Op::new(
                libc::SYS_mprotect,
                [
                    v(vma.start),
                    v(vma.end - vma.start),
                    v(vma.prot as u64),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("mprotect {:#x}-{:#x} {}", vma.start, vma.end, vma.path),
            ));
        }
    }
}

/// mm fields, auxv and exe (`PR_SET_MM_MAP`). The auxv pointer in the
/// `prctl_mm_map` is patched once the data area's address is known.
pub(super) fn plan_mm(d: &mut Draft, desc: &Descriptor, files: &[ResolvedFile]) {
    let auxv_at = d.data.words(&desc.auxv);
    let mm = &desc.mm;
    let mut mm_map = Vec::with_capacity(PRCTL_MM_MAP_SIZE + 8);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
    ] {
        mm_map.extend_from_slice(&w.to_le_bytes());
    }
    mm_map.extend_from_slice(&0u64.to_le_bytes()); // auxv pointer, patched later
    mm_map.extend_from_slice(&((desc.auxv.len() * 8) as u32).to_le_bytes());
    mm_map.extend_from_slice(&u32::MAX.to_le_bytes()); // exe_fd: -1 = keep
    mm_map.extend_from_slice(&[0u8; 8]); // room for the 8-byte STORE of exe_fd
    let mm_at = d.data.bytes(&mm_map);
    d.pointers.push((mm_at + 88, auxv_at));
    let exe_usable = files_find(desc, files, &desc.exe);
    if let Some(exe) = &exe_usable {
        let exe_at = d.data.cstr(exe);
        let open_exe = open_no_symlinks(
            &mut d.data,
            exe_at,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            format!("open exe {exe}"),
        );
        d.state_ops.push(
            Op {
                store: Some(mm_at + 100),
                ..open_exe
            }
            .save(),
        );
    } else {
        d.notes.push(format!(
            "the executable {} is not available here; /proc/PID/exe of the child shows the husk",
            desc.exe
        ));
    }
    d.state_ops.push(Op::new(
        libc::SYS_prctl,
        [
            v(PR_SET_MM),
            v(PR_SET_MM_MAP),
            Arg::Data(mm_at),
            v(PRCTL_MM_MAP_SIZE as u64),
            v(0),
            v(0),
        ],
        "prctl(PR_SET_MM_MAP)",
    ));
    if exe_usable.is_some() {
        d.state_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            "close exe",
        ));
    }
}

/// 5. Signal handlers, alternate stack, rseq, robust list, tid address.
pub(super) fn plan_signals(d: &mut Draft, desc: &Descriptor) {
    for sa in &desc.sigactions {
        if sa.signo == libc::SIGKILL as u32 || sa.signo == libc::SIGSTOP as u32 {
            continue;
        }
        if sa.handler == 0 && sa.flags == 0 && sa.mask == 0 {
            continue; // the husk's default already
        }
        let act = d.data.words(&[sa.handler, sa.flags, sa.restorer, sa.mask]);
        d.state_ops.push(Op::new(
            libc::SYS_rt_sigaction,
            [v(sa.signo as u64), Arg::Data(act), v(0), v(8), v(0), v(0)],
            format!("rt_sigaction({})", sa.signo),
        ));
    }
    let ss = &desc.sigaltstack;
    if ss.flags & libc::SS_DISABLE as u32 == 0 && ss.size > 0 {
        let flags = (ss.flags & !(libc::SS_ONSTACK as u32)) as u64;
        let at = d.data.words(&[ss.sp, flags, ss.size]);
        d.state_ops.push(Op::new(
            libc::SYS_sigaltstack,
            [Arg::Data(at), v(0), v(0), v(0), v(0), v(0)],
            "sigaltstack",
        ));
    }
    if let Some(r) = desc.rseq {
        d.state_ops.push(
            Op::new(
                libc::SYS_rseq,
                [
                    v(r.ptr),
                    v(r.len as u64),
                    v(0),
                    v(r.signature as u64),
                    v(0),
                    v(0),
                ],
                format!("rseq({:#x})", r.ptr),
            )
            .expect(0),
        );
    }
    d.state_ops.extend(robust_list_op(desc));
    d.state_ops.push(Op::new(
        libc::SYS_set_tid_address,
        [v(desc.clear_child_tid), v(0), v(0), v(0), v(0), v(0)],
        "set_tid_address",
    ));
}

/// 5b. A container child: its root, assembled by the husk's starter at
///     `root` in the child's own mount namespace, becomes `/` once the
///     seed's files are mapped and the exe is set (their paths are under
///     `root`); everything after (cwd, descriptors by path) is the
///     container's. `pivot_root(".", ".")` stacks the old root under the
///     new one, and the lazy unmount takes it away: nothing of the node's
///     filesystem is left reachable.
pub(super) fn plan_enter_root(d: &mut Draft, root: &str) {
    let at = d.data.cstr(root);
    let dot = d.data.cstr(".");
    let slash = d.data.cstr("/");
    d.state_ops.push(Op::new(
        libc::SYS_chdir,
        [Arg::Data(at), v(0), v(0), v(0), v(0), v(0)],
        format!("chdir({root})"),
    ));
    d.state_ops.push(Op::new(
        libc::SYS_pivot_root,
        [Arg::Data(dot), Arg::Data(dot), v(0), v(0), v(0), v(0)],
        "pivot_root into the container's root",
    ));
    d.state_ops.push(Op::new(
        libc::SYS_umount2,
        [
            Arg::Data(dot),
            v(libc::MNT_DETACH as u64),
            v(0),
            v(0),
            v(0),
            v(0),
        ],
        "unmounting the node's root",
    ));
    d.state_ops.push(Op::new(
        libc::SYS_chdir,
        [Arg::Data(slash), v(0), v(0), v(0), v(0), v(0)],
        "chdir(/)",
    ));
}

/// 6. personality, comm, umask, cwd (rlimits come after the descriptors).
pub(super) fn plan_process_attrs(d: &mut Draft, desc: &Descriptor) {
    d.state_ops.push(Op::new(
        libc::SYS_personality,
        [v(desc.personality as u64), v(0), v(0), v(0), v(0), v(0)],
        "personality",
    ));
    let comm = d.data.cstr(&desc.comm);
    d.state_ops.push(Op::new(
        libc::SYS_prctl,
        [v(PR_SET_NAME), Arg::Data(comm), v(0), v(0), v(0), v(0)],
        "prctl(PR_SET_NAME)",
    ));
    d.state_ops.push(Op::new(
        libc::SYS_umask,
        [v(desc.umask as u64), v(0), v(0), v(0), v(0), v(0)],
        "umask",
    ));
    let cwd = d.data.cstr(&desc.cwd);
    let slot = d.data.slot();
    d.state_ops.push(
        Op::new(
            libc::SYS_chdir,
            [Arg::Data(cwd), v(0), v(0), v(0), v(0), v(0)],
            "chdir",
        )
        .soft(slot),
    );
    d.soft_steps.push(SoftStep {
        result_at: slot,
        what: format!("chdir({})", desc.cwd),
    });
}

/// Resource limits after every descriptor is in place (a fork child keeps
/// descriptors above a lowered RLIMIT_NOFILE, but no new one can be made
/// there), before the credentials (which may forbid them).
pub(super) fn plan_rlimits(d: &mut Draft, desc: &Descriptor) {
    for (res, (soft, hard)) in desc.rlimits.iter().enumerate() {
        let slot = d.data.slot();
        d.state_ops.push(
            prlimit_op(
                &mut d.data,
                res as u32,
                (*soft, *hard),
                format!("prlimit({res})"),
            )
            .soft(slot),
        );
        d.soft_steps.push(SoftStep {
            result_at: slot,
            what: format!("setting resource limit {res} to ({soft}, {hard})"),
        });
    }
}

/// The executable's usable path: the original if it resolved locally, the
/// seed's copy otherwise, or nothing.
fn files_find(desc: &Descriptor, files: &[ResolvedFile], exe: &str) -> Option<String> {
    let i = desc.files.iter().position(|f| f.path == exe)?;
    match files.get(i)? {
        ResolvedFile::Local(p) | ResolvedFile::SeedCopy(p) => Some(p.clone()),
        ResolvedFile::Unavailable => None,
    }
}
