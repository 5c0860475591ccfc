//! Privileges and credentials (step 8), last: after them the child may no
//! longer be allowed the steps before. The parent's capability bounding
//! set and securebits while still root; then its ids (or the tenant's:
//! `run_as`); then its capability sets, ambient ones, no_new_privs,
//! dumpable, the parent-death signal; its seccomp filters very last (they
//! may forbid any of the steps before them).

use super::{dies_with_spawner, pdeathsig_op, v, Arg, Descriptor, Draft, Op};
use crate::image::{Privileges, SeccompFilter};
use crate::restore::RunAs;

/// The ids the child gets: real, effective, saved uid and gid, and the
/// supplementary groups.
struct Ids {
    uid: [u32; 3],
    gid: [u32; 3],
    groups: Vec<u32>,
}

/// Every step of section 8, in order.
pub(super) fn plan_privileges(d: &mut Draft, desc: &Descriptor, run_as: Option<RunAs>, lazy: bool) {
    let c = &desc.creds;
    let ids = match run_as {
        Some(r) => Ids {
            uid: [r.uid; 3],
            gid: [r.gid; 3],
            groups: vec![r.gid],
        },
        None => Ids {
            uid: [c.uid[0], c.uid[1], c.uid[2]],
            gid: [c.gid[0], c.gid[1], c.gid[2]],
            groups: c.groups.clone(),
        },
    };
    // The parent's capabilities, when the child keeps the parent's ids.
    let parent = desc.privileges.as_ref().filter(|_| run_as.is_none());
    let keep_caps = match parent {
        Some(p) => plan_bounding_set_and_securebits(d, p, &ids.uid),
        None => false,
    };
    plan_ids(d, &ids);
    if let Some(p) = parent {
        plan_capabilities(d, p, keep_caps);
    }
    plan_no_new_privs(d, desc, run_as);
    plan_dumpable(d, desc);
    if lazy && dies_with_spawner() {
        // A child whose pager is gone must die, not run on: set after the
        // credential change, which clears it.
        d.state_ops.push(pdeathsig_op());
    }
    plan_seccomp(d, desc);
}

/// The parent's capability bounding set and securebits, while still root;
/// and `PR_SET_KEEPCAPS` when its capabilities must survive the uid change
/// to `uid`. Returns whether it was set (to be cleared after `capset`).
fn plan_bounding_set_and_securebits(d: &mut Draft, p: &Privileges, uid: &[u32; 3]) -> bool {
    let last = cap_last_cap();
    for cap in 0..=last {
        if p.caps[3] & (1u64 << cap) == 0 {
            d.state_ops.push(Op::new(
                libc::SYS_prctl,
                [
                    v(libc::PR_CAPBSET_DROP as u64),
                    v(cap as u64),
                    v(0),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("prctl(PR_CAPBSET_DROP, {cap})"),
            ));
        }
    }
    if p.securebits != 0 {
        d.state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_SECUREBITS as u64),
                v(p.securebits as u64),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "prctl(PR_SET_SECUREBITS)",
        ));
    }
    // A parent that is not root but holds capabilities: they are
    // kept across the uid change, then set exactly.
    const SECBIT_KEEP_CAPS: u32 = 1 << 4;
    const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
    let need =
        uid.iter().all(|u| *u != 0) && p.caps[1] != 0 && p.securebits & SECBIT_KEEP_CAPS == 0;
    if need && p.securebits & SECBIT_KEEP_CAPS_LOCKED != 0 {
        d.notes.push(
            "the parent's capabilities are not kept: its securebits lock keep-caps off".into(),
        );
    }
    let need = need && p.securebits & SECBIT_KEEP_CAPS_LOCKED == 0;
    if need {
        d.state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_KEEPCAPS as u64),
                v(1),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "prctl(PR_SET_KEEPCAPS, 1)",
        ));
    }
    need
}

/// The child's groups, gids and uids.
fn plan_ids(d: &mut Draft, ids: &Ids) {
    let Ids { uid, gid, groups } = ids;
    let g_bytes: Vec<u8> = groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let g_at = d.data.bytes(&g_bytes);
    d.state_ops.push(Op::new(
        libc::SYS_setgroups,
        [
            v(groups.len() as u64),
            Arg::Data(g_at),
            v(0),
            v(0),
            v(0),
            v(0),
        ],
        "setgroups",
    ));
    d.state_ops.push(Op::new(
        libc::SYS_setresgid,
        [
            v(gid[0] as u64),
            v(gid[1] as u64),
            v(gid[2] as u64),
            v(0),
            v(0),
            v(0),
        ],
        "setresgid",
    ));
    d.state_ops.push(Op::new(
        libc::SYS_setresuid,
        [
            v(uid[0] as u64),
            v(uid[1] as u64),
            v(uid[2] as u64),
            v(0),
            v(0),
            v(0),
        ],
        "setresuid",
    ));
}

/// The parent's capability sets and ambient capabilities, after the ids;
/// `PR_SET_KEEPCAPS` cleared again if `keep_caps` set it.
fn plan_capabilities(d: &mut Draft, p: &Privileges, keep_caps: bool) {
    // capset: header {version 3, pid 0}, then two data structs
    // {effective, permitted, inheritable} (low, then high 32 bits).
    let half = |x: u64, hi: bool| (if hi { x >> 32 } else { x & 0xffff_ffff }) as u32;
    let mut caps = Vec::with_capacity(24);
    for hi in [false, true] {
        for set in [p.caps[2], p.caps[1], p.caps[0]] {
            caps.extend_from_slice(&half(set, hi).to_le_bytes());
        }
    }
    let mut h = 0x2008_0522u32.to_le_bytes().to_vec(); // _LINUX_CAPABILITY_VERSION_3
    h.extend_from_slice(&0u32.to_le_bytes()); // pid 0: this process
    let hdr = d.data.bytes(&h);
    let caps_at = d.data.bytes(&caps);
    d.state_ops.push(Op::new(
        libc::SYS_capset,
        [Arg::Data(hdr), Arg::Data(caps_at), v(0), v(0), v(0), v(0)],
        "capset (the parent's capabilities)",
    ));
    for cap in 0..64u64 {
        if p.caps[4] & (1u64 << cap) != 0 {
            d.state_ops.push(Op::new(
                libc::SYS_prctl,
                [
                    v(libc::PR_CAP_AMBIENT as u64),
                    v(libc::PR_CAP_AMBIENT_RAISE as u64),
                    v(cap),
                    v(0),
                    v(0),
                    v(0),
                ],
                format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"),
            ));
        }
    }
    if keep_caps {
        d.state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_KEEPCAPS as u64),
                v(0),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "prctl(PR_SET_KEEPCAPS, 0)",
        ));
    }
}

/// no_new_privs: the parent's, and always for a tenant's child.
fn plan_no_new_privs(d: &mut Draft, desc: &Descriptor, run_as: Option<RunAs>) {
    let parent_nnp = desc.privileges.as_ref().is_some_and(|p| p.no_new_privs);
    if run_as.is_some() && !parent_nnp {
        d.notes.push("no_new_privs is set (the parent had it off): a tenant's child never gains privileges through exec".into());
    }
    if parent_nnp || run_as.is_some() {
        d.state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_NO_NEW_PRIVS as u64),
                v(1),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "prctl(PR_SET_NO_NEW_PRIVS)",
        ));
    }
}

/// The parent's dumpable flag: a credential change resets it; the
/// parent's, as a fork child has.
fn plan_dumpable(d: &mut Draft, desc: &Descriptor) {
    if let Some(p) = &desc.privileges {
        d.state_ops.push(Op::new(
            libc::SYS_prctl,
            [
                v(libc::PR_SET_DUMPABLE as u64),
                v(p.dumpable as u64),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            format!("prctl(PR_SET_DUMPABLE, {})", p.dumpable),
        ));
    }
}

/// The parent's seccomp filters, oldest first, very last. Each program's
/// pointer to its instructions is patched once the data area's address is
/// known.
fn plan_seccomp(d: &mut Draft, desc: &Descriptor) {
    let filters: &[SeccompFilter] = desc
        .privileges
        .as_ref()
        .map(|p| p.seccomp_filters.as_slice())
        .unwrap_or(&[]);
    for (i, f) in filters.iter().enumerate() {
        let insns: Vec<u8> = f.insns.iter().flat_map(|w| w.to_le_bytes()).collect();
        let insns_at = d.data.bytes(&insns);
        // struct sock_fprog { u16 len; (pad); struct sock_filter *filter; }
        let mut prog = (f.insns.len() as u64).to_le_bytes().to_vec();
        prog.extend_from_slice(&0u64.to_le_bytes());
        let prog_at = d.data.bytes(&prog);
        d.pointers.push((prog_at + 8, insns_at));
        d.state_ops.push(Op::new(
            libc::SYS_seccomp,
            [
                v(1), // SECCOMP_SET_MODE_FILTER
                // LOG and SPEC_ALLOW; TSYNC means nothing for one thread,
                // and a listener's fd is not the child's.
                v(f.flags & (2 | 4)),
                Arg::Data(prog_at),
                v(0),
                v(0),
                v(0),
            ],
            format!(
                "seccomp(SECCOMP_SET_MODE_FILTER) (the parent's filter {} of {})",
                i + 1,
                filters.len()
            ),
        ));
    }
}

/// The highest capability this kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}
