//! The human and JSON forms of a descriptor shown by `forkd inspect`.
//!
//! The JSON form is a contract: fields are only ever added. Addresses are
//! numbers; `prot` is the `/proc/PID/maps` permission string.

use std::fmt::Write;

use serde_json::{json, Value};

use super::{Descriptor, PageState};
use crate::procfs::perms_string;

/// The stable, machine-readable form.
pub fn to_json(d: &Descriptor, image_dir: Option<&str>) -> Value {
    let vmas: Vec<Value> = d
        .vmas
        .iter()
        .map(|v| {
            let (mut stored, mut zero, mut file) = (0u64, 0u64, 0u64);
            for r in &v.runs {
                match r.state {
                    PageState::Stored { .. } => stored += r.count,
                    PageState::Zero => zero += r.count,
                    PageState::FromFile => file += r.count,
                }
            }
            json!({
                "start": v.start,
                "end": v.end,
                "prot": perms_string(v.prot, v.shared),
                "kind": v.kind.name(),
                "path": v.path,
                "file_offset": v.file_offset,
                "pages_stored": stored,
                "pages_zero": zero,
                "pages_from_file": file,
            })
        })
        .collect();
    let r = &d.registers;
    json!({
        "format_version": d.format_version,
        "image_dir": image_dir,
        "source": { "pid": d.source.pid, "hostname": d.source.hostname, "kernel": d.source.kernel, "created_unix_ms": d.source.created_unix_ms },
        "threads": d.threads,
        "other_threads": d.thread_set.others.iter().map(|t| json!({
            "tid": t.tid,
            "comm": t.comm,
            "rip": t.registers.rip,
            "rsp": t.registers.rsp,
            "fs_base": t.registers.fs_base,
            "interrupted_syscall": t.registers.interrupted_syscall(),
            "sigmask": t.sigmask,
            "pending": t.pending,
            "sigaltstack": { "sp": t.sigaltstack.sp, "flags": t.sigaltstack.flags, "size": t.sigaltstack.size },
            "rseq": t.rseq.map(|x| x.ptr),
            "robust_list": { "head": t.robust_list.0, "len": t.robust_list.1 },
            "clear_child_tid": t.clear_child_tid,
            "tid_word": t.tid_word,
        })).collect::<Vec<_>>(),
        "main_tid_word": d.thread_set.main_tid_word,
        "exe": d.exe,
        "comm": d.comm,
        "cwd": d.cwd,
        "registers": {
            "rip": r.rip, "rsp": r.rsp, "rbp": r.rbp, "rax": r.rax, "rbx": r.rbx, "rcx": r.rcx, "rdx": r.rdx,
            "rsi": r.rsi, "rdi": r.rdi, "r8": r.r8, "r9": r.r9, "r10": r.r10, "r11": r.r11, "r12": r.r12,
            "r13": r.r13, "r14": r.r14, "r15": r.r15, "orig_rax": r.orig_rax, "eflags": r.eflags,
            "cs": r.cs, "ss": r.ss, "ds": r.ds, "es": r.es, "fs": r.fs, "gs": r.gs,
            "fs_base": r.fs_base, "gs_base": r.gs_base,
        },
        "interrupted_syscall": r.interrupted_syscall(),
        "xstate_bytes": d.xstate.len(),
        "page_digests": d.digests.as_ref().map(|g| json!({ "algorithm": "xxh3-64", "chunk_bytes": g.chunk_bytes, "chunks": g.xxh3.len() })),
        "sigmask": d.sigmask,
        "sigactions": d.sigactions.iter().filter(|s| s.handler != 0 || s.flags != 0).map(|s| json!({
            "signo": s.signo, "handler": s.handler, "flags": s.flags, "restorer": s.restorer, "mask": s.mask,
        })).collect::<Vec<_>>(),
        "sigaltstack": { "sp": d.sigaltstack.sp, "flags": d.sigaltstack.flags, "size": d.sigaltstack.size },
        "rseq": d.rseq.map(|x| json!({ "ptr": x.ptr, "len": x.len, "signature": x.signature, "flags": x.flags })),
        "robust_list": { "head": d.robust_list.0, "len": d.robust_list.1 },
        "clear_child_tid": d.clear_child_tid,
        "mm": serde_json::to_value(d.mm).unwrap_or(Value::Null),
        "auxv_words": d.auxv.len(),
        "personality": d.personality,
        "rlimits": d.rlimits.iter().map(|(s, h)| json!([s, h])).collect::<Vec<_>>(),
        "umask": d.umask,
        "creds": { "uid": d.creds.uid, "gid": d.creds.gid, "groups": d.creds.groups },
        "fds": serde_json::to_value(&d.fds).unwrap_or(Value::Null),
        "fd_objects": d.fd_objects.objects.iter().map(object_json).collect::<Vec<_>>(),
        "container": serde_json::to_value(&d.container).unwrap_or(Value::Null),
        "files": serde_json::to_value(&d.files).unwrap_or(Value::Null),
        "vmas": vmas,
        "vdso_hash": d.vdso_hash,
        "pages_stored": d.pages_stored,
        "image_bytes": d.image_bytes,
        "stats": serde_json::to_value(d.stats).unwrap_or(Value::Null),
    })
}

/// The human form.
pub fn to_text(d: &Descriptor) -> String {
    let mut s = String::new();
    let r = &d.registers;
    let _ = writeln!(
        s,
        "seed format v{}  taken from pid {} on {} (kernel {})",
        d.format_version, d.source.pid, d.source.hostname, d.source.kernel
    );
    let _ = writeln!(
        s,
        "exe {}  comm {:?}  cwd {}  threads {}",
        d.exe, d.comm, d.cwd, d.threads
    );
    let _ = writeln!(
        s,
        "rip {:#x}  rsp {:#x}  fs_base {:#x}  xstate {} bytes",
        r.rip,
        r.rsp,
        r.fs_base,
        d.xstate.len()
    );
    if let Some(nr) = r.interrupted_syscall() {
        let _ = writeln!(s, "stopped inside syscall {nr} (restarts on resume)");
    }
    if let Some(c) = &d.container {
        let _ = writeln!(
            s,
            "container: rootfs {} ({} files, {} MiB{}), hostname {:?}, namespaces {}, {} mounts for children",
            c.rootfs_digest,
            c.rootfs_files,
            c.rootfs_bytes >> 20,
            if c.readonly_root { ", read-only" } else { "" },
            c.hostname,
            c.namespaces.join(","),
            c.mounts.len()
        );
        let l = c.limits;
        let _ = writeln!(
            s,
            "  limits: memory {}  pids {}  cpu {}",
            l.memory_bytes
                .map_or("none".into(), |m| format!("{} MiB", m >> 20)),
            l.pids.map_or("none".into(), |p| p.to_string()),
            l.cpu_micros
                .map_or("none".into(), |c| format!("{} CPUs", c as f64 / 1e6))
        );
        for n in &c.not_kept {
            let _ = writeln!(s, "  not in children: {n}");
        }
    }
    for t in &d.thread_set.others {
        let _ = writeln!(
            s,
            "  thread {} {:?}: rip {:#x}  fs_base {:#x}  mask {:#x}{}",
            t.tid,
            t.comm,
            t.registers.rip,
            t.registers.fs_base,
            t.sigmask,
            match t.registers.interrupted_syscall() {
                Some(nr) => format!("  in syscall {nr} (restarts)"),
                None => String::new(),
            }
        );
    }
    let handlers = d.sigactions.iter().filter(|a| a.handler > 1).count();
    let _ = writeln!(
        s,
        "signals: {handlers} handlers, mask {:#x}; rseq {}",
        d.sigmask,
        d.rseq
            .map(|x| format!("{:#x}", x.ptr))
            .unwrap_or_else(|| "none".into())
    );
    let _ = writeln!(
        s,
        "uid {:?} gid {:?} umask {:03o}  fds {}",
        d.creds.uid,
        d.creds.gid,
        d.umask,
        d.fds.len()
    );
    let _ = writeln!(
        s,
        "pages stored {} ({} bytes)  vdso {}",
        d.pages_stored,
        d.image_bytes,
        &d.vdso_hash[..d.vdso_hash.len().min(16)]
    );
    let _ = writeln!(
        s,
        "pause {} us (+{} us reaping)  capture {} ms",
        d.stats.pause_ns / 1000,
        d.stats.reap_pause_ns / 1000,
        d.stats.capture_ns / 1_000_000
    );
    let _ = writeln!(s, "{} mappings:", d.vmas.len());
    for v in &d.vmas {
        let stored: u64 = v
            .runs
            .iter()
            .filter(|r| matches!(r.state, PageState::Stored { .. }))
            .map(|r| r.count)
            .sum();
        let _ = writeln!(
            s,
            "  {:012x}-{:012x} {} {:<12} {:>7} pages {:>7} stored  {}",
            v.start,
            v.end,
            perms_string(v.prot, v.shared),
            v.kind.name(),
            v.pages(),
            stored,
            v.path
        );
    }
    for f in &d.fds {
        let _ = writeln!(
            s,
            "  fd {:>3} {:?} {} (flags {:o}, offset {}){}",
            f.fd,
            f.kind,
            f.path,
            f.flags,
            f.offset,
            d.fd_objects
                .get(f.fd)
                .map(|o| format!(": {}", o.kind_name()))
                .unwrap_or_default()
        );
    }
    s
}

/// One kernel object, its state without its contents (their size only).
fn object_json(o: &crate::kobj::FdObject) -> Value {
    use crate::kobj::Object;
    let state = match &o.object {
        Object::Dup { of } => json!({ "of": of }),
        Object::EventFd { count, semaphore } => json!({ "count": count, "semaphore": semaphore }),
        Object::Epoll { watches } => json!({ "watches": watches.iter().map(|w| json!({
            "fd": w.fd, "events": w.events, "data": w.data })).collect::<Vec<_>>() }),
        Object::TimerFd {
            clock,
            value,
            interval,
            ticks,
        } => json!({
            "clock": clock, "value": [value.0, value.1], "interval": [interval.0, interval.1], "ticks": ticks }),
        Object::SignalFd { mask } => json!({ "mask": mask }),
        Object::Pipe {
            read,
            peer,
            data,
            size,
        } => json!({
            "read_end": read, "peer": peer, "bytes": data.len(), "size": size }),
        Object::UnixPair { ty, peer, queue } => json!({
            "type": ty, "peer": peer, "queued": queue.iter().map(Vec::len).collect::<Vec<_>>() }),
        Object::Memory {
            kind,
            content,
            seals,
        } => json!({
            "file": match kind {
                crate::kobj::MemoryKind::Memfd { name } => format!("memfd:{name}"),
                crate::kobj::MemoryKind::Unlinked { dir } => format!("unlinked in {dir}"),
            },
            "bytes": content.len(), "seals": seals }),
        Object::Listen {
            addr,
            reuse_addr,
            reuse_port,
            ..
        } => json!({
            "addr": crate::kobj::sockaddr_text(addr), "reuse_addr": reuse_addr, "reuse_port": reuse_port }),
        Object::Udp { local, peer, .. } => json!({
            "local": local.as_deref().map(crate::kobj::sockaddr_text),
            "peer": peer.as_deref().map(crate::kobj::sockaddr_text) }),
        Object::Closed { what, .. } => json!({ "was": what }),
        Object::Dropped { why } => json!({ "why": why }),
    };
    json!({ "fd": o.fd, "kind": o.object.kind_name(), "state": state })
}
