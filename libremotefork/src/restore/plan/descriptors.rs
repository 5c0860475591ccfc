//! The seed's file descriptors in the child, and (lazy plans) the child's
//! userfaultfd.

use super::objects::{self, Context};
use super::{
    open_no_symlinks, v, Arg, Descriptor, Draft, FdEntry, FdKind, Op, PlanError, SoftStep, MAX_FD,
};
use crate::image::FORMAT_VERSION;

/// 7. File descriptors. open() returns the lowest free number, so numbers
///    are filled in ascending order, gaps with placeholders that are closed
///    afterwards; EXPECT checks every number. Kernel objects get
///    placeholders too, which their own steps replace ([`objects`]) while
///    the gaps are still filled. Returns the highest number.
pub(super) fn plan_fds(d: &mut Draft, desc: &Descriptor) -> Result<i32, PlanError> {
    let max_fd = desc.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    if max_fd > MAX_FD {
        return Err(PlanError::FdTooHigh(max_fd));
    }
    let mut gaps = Vec::new();
    d.state_ops.extend(stdio_flags(desc));
    for n in 3..=max_fd {
        let f = desc.fds.iter().find(|f| f.fd == n);
        let reopen = f.filter(|f| reopenable(f));
        let object = desc.fd_objects.get(n).is_some();
        match (f, reopen) {
            (Some(f), _) if f.kind == FdKind::CoopReply => {
                // The caller of checkpoint_all_threads() reads its answer
                // here: in a child, the child's stdin.
                let cmd = if f.flags as i32 & libc::O_CLOEXEC != 0 {
                    libc::F_DUPFD_CLOEXEC
                } else {
                    libc::F_DUPFD
                };
                d.state_ops.push(
                    Op::new(
                        libc::SYS_fcntl,
                        [v(0), v(cmd as u64), v(n as u64), v(0), v(0), v(0)],
                        format!("fd {n}: the checkpoint's answer, from stdin"),
                    )
                    .expect(n as u64),
                );
            }
            (Some(_), _) if object => {
                d.state_ops.push(placeholder(&mut d.data, n, "placeholder"));
            }
            (Some(f), Some(_)) => {
                let p = d.data.cstr(&f.path);
                d.state_ops.push(
                    open_no_symlinks(
                        &mut d.data,
                        p,
                        reopen_flags(f),
                        format!("reopen fd {n} {}", f.path),
                    )
                    .expect(n as u64),
                );
                if f.kind == FdKind::Regular && f.offset > 0 {
                    let slot = d.data.slot();
                    d.state_ops.push(
                        Op::new(
                            libc::SYS_lseek,
                            [
                                v(n as u64),
                                v(f.offset),
                                v(libc::SEEK_SET as u64),
                                v(0),
                                v(0),
                                v(0),
                            ],
                            format!("lseek fd {n}"),
                        )
                        .soft(slot),
                    );
                    d.soft_steps.push(SoftStep {
                        result_at: slot,
                        what: format!("restoring the offset of fd {n}"),
                    });
                }
            }
            (Some(f), None) if desc.format_version < FORMAT_VERSION && !is_file(f) => {
                return Err(PlanError::FdNotRecorded {
                    fd: n,
                    kind: f.kind,
                    path: f.path.clone(),
                    format: desc.format_version,
                });
            }
            (Some(f), None) if is_file(f) => {
                return Err(PlanError::FdUnavailable {
                    fd: n,
                    path: f.path.clone(),
                });
            }
            (Some(f), None) => {
                // A format 5 seed records every other descriptor's object.
                return Err(PlanError::FdNotRecorded {
                    fd: n,
                    kind: f.kind,
                    path: f.path.clone(),
                    format: desc.format_version,
                });
            }
            (None, _) => {
                d.state_ops.push(placeholder(&mut d.data, n, "gap filler"));
                gaps.push(n);
            }
        }
    }
    let (ops, notes) = objects::plan_objects(&mut d.data, desc, Context::Scratch { max_fd });
    d.state_ops.extend(ops);
    d.notes.extend(notes);
    for n in gaps {
        d.state_ops.push(Op::new(
            libc::SYS_close,
            [v(n as u64), v(0), v(0), v(0), v(0), v(0)],
            format!("close gap filler fd {n}"),
        ));
    }
    Ok(max_fd)
}

/// Lazy plans: the child's userfaultfd, made in the child and moved to a
/// high number (close-on-exec) that forkd takes with pidfd_getfd. The
/// child keeps its copy: if forkd dies, faults then wait (and the
/// parent-death signal set with the privileges ends the child) instead of
/// reading zeros. Returns the data offset its number is stored at.
pub(super) fn plan_uffd(d: &mut Draft, desc: &Descriptor, max_fd: i32) -> usize {
    let nofile_soft = desc
        .rlimits
        .get(libc::RLIMIT_NOFILE as usize)
        .map(|l| l.0)
        .unwrap_or(1024);
    // High, out of the way, and below the soft RLIMIT_NOFILE (a fork
    // of a template can place it only there): above the seed's
    // descriptors if there is room, else in a gap between them.
    let limit = nofile_soft.min(1024);
    let target = if ((max_fd + 1) as u64) < limit {
        ((max_fd + 1) as u64).max(limit.saturating_sub(24))
    } else {
        (3..limit)
            .rev()
            .find(|n| !desc.fds.iter().any(|f| f.fd as u64 == *n))
            .unwrap_or((max_fd + 1) as u64)
    };
    let slot = d.data.slot();
    d.state_ops.push(
        Op::new(
            libc::SYS_userfaultfd,
            [
                v((libc::O_CLOEXEC | libc::O_NONBLOCK) as u64),
                v(0),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "userfaultfd()",
        )
        .save(),
    );
    d.state_ops.push(Op {
        store: Some(slot),
        ..Op::new(
            libc::SYS_fcntl,
            [
                Arg::Saved,
                v(libc::F_DUPFD_CLOEXEC as u64),
                v(target),
                v(0),
                v(0),
                v(0),
            ],
            "move the userfaultfd up",
        )
    });
    d.state_ops.push(Op::new(
        libc::SYS_close,
        [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
        "close the first userfaultfd number",
    ));
    slot
}

/// Is this descriptor of the seed opened again by path in a child?
fn reopenable(f: &FdEntry) -> bool {
    is_file(f) && std::path::Path::new(&f.path).exists()
}

/// Is it a file (or device) opened by path, rather than a kernel object?
fn is_file(f: &FdEntry) -> bool {
    matches!(
        f.kind,
        FdKind::Regular | FdKind::Directory | FdKind::CharDevice | FdKind::BlockDevice
    )
}

/// `/dev/null` opened read-only at number `n` (the lowest free one),
/// holding the number until something takes its place or it is closed.
fn placeholder(data: &mut super::Data, n: i32, what: &str) -> Op {
    let devnull = data.cstr("/dev/null");
    Op::new(
        libc::SYS_open,
        [
            Arg::Data(devnull),
            v(libc::O_RDONLY as u64),
            v(0),
            v(0),
            v(0),
            v(0),
        ],
        format!("{what} fd {n}"),
    )
    .expect(n as u64)
}

/// The `open` flags a reopened descriptor gets: the seed's, less those that
/// only mattered when it was first opened (`O_CREAT`, `O_TRUNC`...).
fn reopen_flags(f: &FdEntry) -> u64 {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_CLOEXEC
        | libc::O_DIRECTORY
        | libc::O_NOATIME
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_LARGEFILE;
    (f.flags as i32 & keep) as u64
}

/// The child's stdio get the parent's `O_NONBLOCK` and close-on-exec
/// flags: a runtime that made its stdin non-blocking (libuv does) would
/// block its event loop reading a blocking one.
pub(super) fn stdio_flags(desc: &Descriptor) -> Vec<Op> {
    let mut ops = Vec::new();
    for f in desc.fds.iter().filter(|f| (0..3).contains(&f.fd)) {
        let nonblock = f.flags as i32 & libc::O_NONBLOCK;
        if nonblock != 0 {
            let what = format!("fd {}: O_NONBLOCK, as the parent's", f.fd);
            ops.push(objects::fcntl(f.fd, libc::F_SETFL, nonblock as u64, what));
        }
        if f.flags as i32 & libc::O_CLOEXEC != 0 {
            let what = format!("fd {}: close-on-exec, as the parent's", f.fd);
            ops.push(objects::fcntl(
                f.fd,
                libc::F_SETFD,
                libc::FD_CLOEXEC as u64,
                what,
            ));
        }
    }
    ops
}
