//! The map phase: what backs each of the seed's mappings, then the ops that
//! unmap the husk, move its vDSO block to the parent's address and map
//! every parent mapping at its own.

use super::{
    find_free, lazy_candidate, open_no_symlinks, v, Arg, Backing, Descriptor, Draft, HuskLayout,
    Op, PageState, PlanError, ResolvedFile, SharedCache, VmaKind, MMAP_MIN, TASK_SIZE,
};

/// How each of the seed's mappings is restored, decided before any op is
/// planned (per descriptor VMA, in its order).
pub(super) struct Mappings {
    /// How its pages get filled.
    pub backing: Vec<Backing>,
    /// Paths actually mapped, indexed by `Backing::File`.
    pub file_paths: Vec<String>,
    /// Served lazily through userfaultfd.
    pub lazy: Vec<bool>,
    /// Mapped from the shared seed cache.
    pub from_cache: Vec<bool>,
    /// Mapped writable until the state phase.
    pub write_first: Vec<bool>,
}

/// Refuse a mapping that cannot be placed in this address space.
pub(super) fn check_user_space(desc: &Descriptor) -> Result<(), PlanError> {
    for v in &desc.vmas {
        if v.end > TASK_SIZE || v.start < MMAP_MIN {
            return Err(PlanError::OutsideUserSpace {
                start: v.start,
                end: v.end,
                path: v.path.clone(),
            });
        }
    }
    Ok(())
}

/// Decide every mapping's backing first: it decides what the map phase
/// does. A file served from the seed's copy is noted in `notes`.
pub(super) fn decide(
    desc: &Descriptor,
    files: &[ResolvedFile],
    lazy: bool,
    shared_cache: Option<&SharedCache>,
    notes: &mut Vec<String>,
) -> Result<Mappings, PlanError> {
    let mut backing = Vec::with_capacity(desc.vmas.len());
    let mut file_paths: Vec<String> = Vec::new();
    for v in &desc.vmas {
        let b = if v.kind.is_kernel_provided() {
            Backing::Kernel
        } else if let Some(fi) = v.file {
            let needs_file = v.runs.iter().any(|r| r.state == PageState::FromFile);
            match files.get(fi as usize) {
                Some(ResolvedFile::Local(p)) => Backing::File(intern(&mut file_paths, p)),
                Some(ResolvedFile::SeedCopy(p)) => {
                    let orig = &desc.files[fi as usize].path;
                    let note = format!("{orig} is missing or differs on this node; serving its pages from the seed's copy");
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                    Backing::File(intern(&mut file_paths, p))
                }
                _ if !needs_file && v.kind == VmaKind::FilePrivate => Backing::Anonymous,
                _ => {
                    return Err(PlanError::FileUnavailable {
                        path: desc.files[fi as usize].path.clone(),
                        start: v.start,
                        end: v.end,
                    })
                }
            }
        } else {
            Backing::Anonymous
        };
        backing.push(b);
    }

    // Lazy plans serve anonymous memory with stored pages through the
    // pager; private anonymous mappings (not the stack) are mapped from the
    // seed's shared cache memfd when there is one, so children share pages.
    let lazy_vmas: Vec<bool> = desc
        .vmas
        .iter()
        .zip(&backing)
        .map(|(v, b)| lazy && *b == Backing::Anonymous && lazy_candidate(v))
        .collect();
    let continue_vmas: Vec<bool> = desc
        .vmas
        .iter()
        .enumerate()
        .map(|(i, v)| {
            lazy_vmas[i]
                && !v.shared
                && matches!(v.kind, VmaKind::Anon | VmaKind::Heap)
                && shared_cache.is_some_and(|c| c.base.get(i).copied().flatten().is_some())
        })
        .collect();

    // Stored pages go into mappings the process itself may not write (RELRO
    // pages, read-only data it wrote before an mprotect): map those
    // writable first, so forkd can fill them with one process_vm_writev,
    // and give them their own protection at the start of the state phase.
    let write_first: Vec<bool> = desc
        .vmas
        .iter()
        .map(|v| {
            v.prot & libc::PROT_WRITE as u32 == 0
                && !v.kind.is_kernel_provided()
                && v.runs
                    .iter()
                    .any(|r| matches!(r.state, PageState::Stored { .. }))
        })
        .collect();
    Ok(Mappings {
        backing,
        file_paths,
        lazy: lazy_vmas,
        from_cache: continue_vmas,
        write_first,
    })
}

/// Every range the executor must avoid: the seed's mappings and the husk's.
pub(super) fn occupied(desc: &Descriptor, husk: &HuskLayout) -> Vec<(u64, u64)> {
    desc.vmas
        .iter()
        .map(|v| (v.start, v.end))
        .chain(husk.maps.iter().map(|m| (m.start, m.end)))
        .collect()
}

/// 1. Unmap the husk (all but its vDSO block; the executor area is not
///    mapped yet when the husk layout was read).
pub(super) fn plan_unmap_husk(d: &mut Draft, husk: &HuskLayout) {
    for m in &husk.maps {
        if is_vdso_block(&m.path) || m.path == "[vsyscall]" {
            continue;
        }
        d.map_ops.push(Op::new(
            libc::SYS_munmap,
            [v(m.start), v(m.end - m.start), v(0), v(0), v(0), v(0)],
            format!("munmap husk {:#x}-{:#x} {}", m.start, m.end, m.path),
        ));
    }
}

/// 2. Move the vDSO block to the parent's address, keeping its shape:
///    through a free range (outside `occupied`) first if its old and new
///    places overlap.
pub(super) fn plan_vdso_move(
    d: &mut Draft,
    (vdso_here, vdso_seed): (Option<Block>, Option<Block>),
    occupied: &[(u64, u64)],
) -> Result<(), PlanError> {
    let mut moves: Vec<(u64, u64, u64, String)> = Vec::new(); // (from, len, to, name)
    if let (Some(h), Some(s)) = (&vdso_here, &vdso_seed) {
        let delta_needed = h[0].0 != s[0].0;
        if delta_needed {
            let (h_lo, h_hi) = (h[0].0, h.last().map(|x| x.1).unwrap_or(0));
            let (s_lo, s_hi) = (s[0].0, s.last().map(|x| x.1).unwrap_or(0));
            let overlap = h_lo < s_hi && s_lo < h_hi;
            if overlap {
                let park = find_free(occupied, h_hi - h_lo, &[])?;
                for (a, b, name) in h {
                    moves.push((*a, b - a, park + (a - h_lo), name.clone()));
                }
                for (a, b, name) in h {
                    moves.push((park + (a - h_lo), b - a, s_lo + (a - h_lo), name.clone()));
                }
            } else {
                for (a, b, name) in h {
                    moves.push((*a, b - a, s_lo + (a - h_lo), name.clone()));
                }
            }
        }
    }
    for (from, len, to, name) in moves {
        d.map_ops.push(
            Op::new(
                libc::SYS_mremap,
                [
                    v(from),
                    v(len),
                    v(len),
                    v((libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64),
                    v(to),
                    v(0),
                ],
                format!("mremap {name} {from:#x} -> {to:#x}"),
            )
            .expect(to),
        );
    }
    Ok(())
}

/// 3. Map every parent mapping at its address (anonymous, or its file;
///    those served from the shared cache are left to
///    [`plan_cache_mappings`]).
pub(super) fn plan_mappings(d: &mut Draft, desc: &Descriptor, m: &Mappings) {
    let mut open_file: Option<(usize, i32)> = None;
    for (i, ((vma, b), wf)) in desc
        .vmas
        .iter()
        .zip(&m.backing)
        .zip(&m.write_first)
        .enumerate()
    {
        let len = vma.end - vma.start;
        let map_prot = if *wf {
            vma.prot | libc::PROT_WRITE as u32
        } else {
            vma.prot
        };
        let what = format!(
            "map {:#x}-{:#x} {} {}",
            vma.start,
            vma.end,
            vma.kind.name(),
            vma.path
        );
        match b {
            Backing::Kernel => {}
            // Mapped from the shared cache below.
            Backing::Anonymous if m.from_cache[i] => {}
            Backing::Anonymous => {
                let mut flags = libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
                flags |= if vma.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                if vma.kind == VmaKind::Stack {
                    flags |= libc::MAP_GROWSDOWN;
                }
                d.map_ops.push(
                    Op::new(
                        libc::SYS_mmap,
                        [
                            v(vma.start),
                            v(len),
                            v(map_prot as u64),
                            v(flags as u64),
                            v(u64::MAX),
                            v(0),
                        ],
                        what,
                    )
                    .expect(vma.start),
                );
            }
            Backing::File(i) => {
                let writable_shared = vma.shared && vma.prot & libc::PROT_WRITE as u32 != 0;
                let oflags = if writable_shared {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                } | libc::O_CLOEXEC;
                // Consecutive mappings of one file share one open.
                if open_file != Some((*i, oflags)) {
                    if let Some((prev, _)) = open_file.take() {
                        d.map_ops.push(Op::new(
                            libc::SYS_close,
                            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
                            format!("close {}", m.file_paths[prev]),
                        ));
                    }
                    let path = d.data.cstr(&m.file_paths[*i]);
                    d.map_ops.push(
                        open_no_symlinks(
                            &mut d.data,
                            path,
                            oflags as u64,
                            format!("open {}", m.file_paths[*i]),
                        )
                        .save(),
                    );
                    open_file = Some((*i, oflags));
                }
                let mut flags = libc::MAP_FIXED_NOREPLACE;
                flags |= if vma.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                d.map_ops.push(
                    Op::new(
                        libc::SYS_mmap,
                        [
                            v(vma.start),
                            v(len),
                            v(map_prot as u64),
                            v(flags as u64),
                            Arg::Saved,
                            v(vma.file_offset),
                        ],
                        what,
                    )
                    .expect(vma.start),
                );
            }
        }
    }
    if let Some((prev, _)) = open_file.take() {
        d.map_ops.push(Op::new(
            libc::SYS_close,
            [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
            format!("close {}", m.file_paths[prev]),
        ));
    }
}

/// Private anonymous mappings served from the shared cache: its memfd,
/// opened through forkd's /proc entry, mapped privately at each mapping's
/// place in the cache layout.
pub(super) fn plan_cache_mappings(
    d: &mut Draft,
    desc: &Descriptor,
    m: &Mappings,
    shared_cache: Option<&SharedCache>,
) {
    let Some(cache) = shared_cache.filter(|_| m.from_cache.iter().any(|c| *c)) else {
        return;
    };
    let path = d.data.cstr(&cache.path);
    d.map_ops.push(
        Op::new(
            libc::SYS_open,
            [
                Arg::Data(path),
                v((libc::O_RDWR | libc::O_CLOEXEC) as u64),
                v(0),
                v(0),
                v(0),
                v(0),
            ],
            "open the seed cache",
        )
        .save(),
    );
    for (i, vma) in desc.vmas.iter().enumerate() {
        let Some(base) = cache
            .base
            .get(i)
            .copied()
            .flatten()
            .filter(|_| m.from_cache[i])
        else {
            continue;
        };
        let prot = if m.write_first[i] {
            vma.prot | libc::PROT_WRITE as u32
        } else {
            vma.prot
        };
        d.map_ops.push(
            Op::new(
                libc::SYS_mmap,
                [
                    v(vma.start),
                    v(vma.end - vma.start),
                    v(prot as u64),
                    v((libc::MAP_PRIVATE | libc::MAP_FIXED_NOREPLACE) as u64),
                    Arg::Saved,
                    v(base),
                ],
                format!(
                    "map {:#x}-{:#x} {} from the seed cache",
                    vma.start,
                    vma.end,
                    vma.kind.name()
                ),
            )
            .expect(vma.start),
        );
    }
    d.map_ops.push(Op::new(
        libc::SYS_close,
        [Arg::Saved, v(0), v(0), v(0), v(0), v(0)],
        "close the seed cache",
    ));
}

/// The index of `s` in `v`, added at the end if it is not there yet.
fn intern(v: &mut Vec<String>, s: &str) -> usize {
    match v.iter().position(|x| x == s) {
        Some(i) => i,
        None => {
            v.push(s.to_string());
            v.len() - 1
        }
    }
}

/// Is this mapping part of the kernel's vDSO block?
fn is_vdso_block(path: &str) -> bool {
    matches!(path, "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

/// A vDSO block: (start, end, name) of each of its mappings.
pub(super) type Block = Vec<(u64, u64, String)>;

/// The husk's and the seed's vDSO blocks, which must have the same shape.
pub(super) fn vdso_blocks(
    husk: &HuskLayout,
    desc: &Descriptor,
) -> Result<(Option<Block>, Option<Block>), PlanError> {
    let here: Block = husk
        .maps
        .iter()
        .filter(|m| is_vdso_block(&m.path))
        .map(|m| (m.start, m.end, m.path.clone()))
        .collect();
    let seed: Block = desc
        .vmas
        .iter()
        .filter(|v| v.kind.is_kernel_provided())
        .map(|v| (v.start, v.end, v.path.clone()))
        .collect();
    let shape = |b: &Block| -> Vec<(u64, u64, String)> {
        let base = b.first().map(|x| x.0).unwrap_or(0);
        b.iter()
            .map(|(s, e, n)| (s - base, e - s, n.clone()))
            .collect()
    };
    let fmt = |b: &Block| {
        b.iter()
            .map(|(s, e, n)| format!("{n} {}K", (e - s) / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if shape(&here) != shape(&seed) {
        return Err(PlanError::VdsoLayout {
            here: fmt(&here),
            seed: fmt(&seed),
        });
    }
    if here.is_empty() {
        return Ok((None, None));
    }
    Ok((Some(here), Some(seed)))
}
