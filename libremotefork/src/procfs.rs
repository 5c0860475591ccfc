//! Parsing what `/proc/PID/*` shows of a process: mappings, mm fields,
//! credentials, file descriptors. Pure text parsing lives in functions that
//! take strings, so it is unit-tested without a live process.

use std::fs;
use std::io;
use std::path::PathBuf;

use libc::pid_t;
use serde::{Deserialize, Serialize};

/// Errors reading or parsing procfs.
#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    /// The process does not exist.
    #[error("process {0} does not exist")]
    NoSuchProcess(pid_t),
    /// Reading the process's files was refused.
    #[error("not permitted to read {path}")]
    NotPermitted {
        /// The process.
        pid: pid_t,
        /// The file.
        path: String,
    },
    /// A file could not be read.
    #[error("reading {path} failed: {source}")]
    Read {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A file did not parse.
    #[error("cannot parse {path}: {what}")]
    Parse {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

fn read_string(pid: pid_t, name: &str) -> Result<String, ProcfsError> {
    let path = format!("/proc/{pid}/{name}");
    fs::read_to_string(&path).map_err(|source| map_read_err(pid, path, source))
}

fn map_read_err(pid: pid_t, path: String, source: io::Error) -> ProcfsError {
    if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        ProcfsError::NoSuchProcess(pid)
    } else if source.kind() == io::ErrorKind::PermissionDenied {
        ProcfsError::NotPermitted { pid, path }
    } else {
        ProcfsError::Read { path, source }
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsEntry {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `r`, `w`, `x` permission bits as PROT_* flags.
    pub prot: u32,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Device major:minor as shown.
    pub dev: String,
    /// Inode.
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`...), empty if anonymous.
    pub path: String,
}

impl MapsEntry {
    /// The permission string as `/proc/PID/maps` shows it (`r-xp`).
    pub fn perms(&self) -> String {
        perms_string(self.prot, self.shared)
    }
}

/// `rwxp`-style string from PROT_* bits and sharing.
pub fn perms_string(prot: u32, shared: bool) -> String {
    let mut s = String::with_capacity(4);
    s.push(if prot & libc::PROT_READ as u32 != 0 {
        'r'
    } else {
        '-'
    });
    s.push(if prot & libc::PROT_WRITE as u32 != 0 {
        'w'
    } else {
        '-'
    });
    s.push(if prot & libc::PROT_EXEC as u32 != 0 {
        'x'
    } else {
        '-'
    });
    s.push(if shared { 's' } else { 'p' });
    s
}

/// Parse the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, ProcfsError> {
    let bad = |line: &str, what: &str| ProcfsError::Parse {
        path: "maps".into(),
        what: format!("{what} in line {line:?}"),
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.splitn(6, ' ');
        let range = it.next().ok_or_else(|| bad(line, "no range"))?;
        let perms = it.next().ok_or_else(|| bad(line, "no permissions"))?;
        let offset = it.next().ok_or_else(|| bad(line, "no offset"))?;
        let dev = it.next().ok_or_else(|| bad(line, "no device"))?;
        let inode = it.next().ok_or_else(|| bad(line, "no inode"))?;
        let path = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range
            .split_once('-')
            .ok_or_else(|| bad(line, "bad range"))?;
        let start = u64::from_str_radix(s, 16).map_err(|_| bad(line, "bad start"))?;
        let end = u64::from_str_radix(e, 16).map_err(|_| bad(line, "bad end"))?;
        let pb = perms.as_bytes();
        if pb.len() != 4 || start >= end {
            return Err(bad(line, "bad permissions or empty range"));
        }
        let mut prot = 0u32;
        if pb[0] == b'r' {
            prot |= libc::PROT_READ as u32;
        }
        if pb[1] == b'w' {
            prot |= libc::PROT_WRITE as u32;
        }
        if pb[2] == b'x' {
            prot |= libc::PROT_EXEC as u32;
        }
        out.push(MapsEntry {
            start,
            end,
            prot,
            shared: pb[3] == b's',
            offset: u64::from_str_radix(offset, 16).map_err(|_| bad(line, "bad offset"))?,
            dev: dev.to_string(),
            inode: inode.parse().map_err(|_| bad(line, "bad inode"))?,
            path,
        });
    }
    Ok(out)
}

/// `/proc/PID/maps`, parsed.
pub fn maps(pid: pid_t) -> Result<Vec<MapsEntry>, ProcfsError> {
    parse_maps(&read_string(pid, "maps")?)
}

/// Start addresses of the mappings registered with a userfaultfd in
/// missing mode (`um` in the `VmFlags` of `/proc/PID/smaps`), from its text.
/// In such a mapping a page that is not present may simply not have been
/// served yet: it does not read as zeros.
pub fn parse_uffd_missing(smaps: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut start = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(s) = start {
                if flags.split_whitespace().any(|f| f == "um") {
                    out.push(s);
                }
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            // A mapping's first line: "start-end perms ...".
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(_)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    start = Some(a);
                }
            }
        }
    }
    out
}

/// Proportional set size of `pid` in bytes (`smaps_rollup`); 0 if it is gone.
pub fn pss(pid: pid_t) -> u64 {
    rollup(pid, "Pss:")
}

/// Private dirty memory of `pid` in bytes (`smaps_rollup`): what it wrote
/// and holds alone; 0 if it is gone.
pub fn private_dirty(pid: pid_t) -> u64 {
    rollup(pid, "Private_Dirty:")
}

/// One `smaps_rollup` field of `pid` (`field` with its colon), in bytes.
fn rollup(pid: pid_t, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The children of every thread of `pid` (`/proc/PID/task/*/children`),
/// sorted; empty if it is gone.
pub fn children(pid: pid_t) -> Vec<pid_t> {
    let mut out: Vec<pid_t> = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.extend(
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|s| s.parse::<pid_t>().ok()),
        );
    }
    out.sort_unstable();
    out
}

/// [`parse_uffd_missing`] of `/proc/PID/smaps`.
pub fn uffd_missing(pid: pid_t) -> Result<Vec<u64>, ProcfsError> {
    Ok(parse_uffd_missing(&read_string(pid, "smaps")?))
}

/// The memory-layout fields of `/proc/PID/stat` that `PR_SET_MM_MAP` needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    /// Start of the text segment.
    pub start_code: u64,
    /// End of the text segment.
    pub end_code: u64,
    /// Start of the data segment.
    pub start_data: u64,
    /// End of the data segment.
    pub end_data: u64,
    /// Start of the heap (`brk` area).
    pub start_brk: u64,
    /// Current program break (filled by capture from `brk(0)`).
    pub brk: u64,
    /// Start (bottom) of the main stack.
    pub start_stack: u64,
    /// argv area.
    pub arg_start: u64,
    /// argv area end.
    pub arg_end: u64,
    /// environment area.
    pub env_start: u64,
    /// environment area end.
    pub env_end: u64,
}

/// Process state letter and mm fields from the text of `/proc/PID/stat`.
pub fn parse_stat(text: &str) -> Result<(char, MmFields), ProcfsError> {
    let bad = |what: &str| ProcfsError::Parse {
        path: "stat".into(),
        what: what.into(),
    };
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')').ok_or_else(|| bad("no ')' after comm"))? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let get = |n: usize| -> Result<u64, ProcfsError> {
        f.get(n - 3)
            .ok_or_else(|| bad(&format!("missing field {n}")))?
            .parse()
            .map_err(|_| bad(&format!("bad field {n}")))
    };
    let state = f
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| bad("no state"))?;
    Ok((
        state,
        MmFields {
            start_code: get(26)?,
            end_code: get(27)?,
            start_stack: get(28)?,
            start_data: get(45)?,
            end_data: get(46)?,
            start_brk: get(47)?,
            brk: 0,
            arg_start: get(48)?,
            arg_end: get(49)?,
            env_start: get(50)?,
            env_end: get(51)?,
        },
    ))
}

/// `/proc/PID/stat`: state letter and mm fields.
pub fn stat(pid: pid_t) -> Result<(char, MmFields), ProcfsError> {
    parse_stat(&read_string(pid, "stat")?)
}

/// The parts of `/proc/PID/status` that capture needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Parent pid.
    pub ppid: i32,
    /// Number of threads.
    pub threads: u32,
    /// File-creation mask.
    pub umask: u32,
    /// Real, effective, saved, filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem gid.
    pub gid: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Ignored signals (bit n-1 for signal n).
    pub sig_ign: u64,
    /// Caught signals.
    pub sig_cgt: u64,
    /// Capability sets: inheritable, permitted, effective, bounding, ambient.
    pub caps: [u64; 5],
    /// `no_new_privs`.
    pub no_new_privs: bool,
    /// Seccomp mode: 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
}

/// Parse the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> Result<Status, ProcfsError> {
    let bad = |what: String| ProcfsError::Parse {
        path: "status".into(),
        what,
    };
    let mut st = Status::default();
    let quad = |v: &str| -> Result<[u32; 4], ProcfsError> {
        let n: Vec<u32> = v
            .split_whitespace()
            .map(|x| x.parse().map_err(|_| bad(format!("bad id {x:?}"))))
            .collect::<Result<_, _>>()?;
        n.try_into()
            .map_err(|_| bad(format!("expected 4 ids in {v:?}")))
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "Threads" => st.threads = v.parse().map_err(|_| bad(format!("bad Threads {v:?}")))?,
            "PPid" => st.ppid = v.parse().map_err(|_| bad(format!("bad PPid {v:?}")))?,
            "Umask" => {
                st.umask = u32::from_str_radix(v, 8).map_err(|_| bad(format!("bad Umask {v:?}")))?
            }
            "Uid" => st.uid = quad(v)?,
            "Gid" => st.gid = quad(v)?,
            "Groups" => {
                st.groups = v
                    .split_whitespace()
                    .map(|x| x.parse().map_err(|_| bad(format!("bad group {x:?}"))))
                    .collect::<Result<_, _>>()?
            }
            "SigIgn" => {
                st.sig_ign =
                    u64::from_str_radix(v, 16).map_err(|_| bad(format!("bad SigIgn {v:?}")))?
            }
            "SigCgt" => {
                st.sig_cgt =
                    u64::from_str_radix(v, 16).map_err(|_| bad(format!("bad SigCgt {v:?}")))?
            }
            "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb" => {
                let i = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
                    .iter()
                    .position(|n| *n == k)
                    .unwrap_or(0);
                st.caps[i] =
                    u64::from_str_radix(v, 16).map_err(|_| bad(format!("bad {k} {v:?}")))?
            }
            "NoNewPrivs" => st.no_new_privs = v == "1",
            "Seccomp" => st.seccomp = v.parse().map_err(|_| bad(format!("bad Seccomp {v:?}")))?,
            _ => {}
        }
    }
    if st.threads == 0 {
        return Err(bad("no Threads line".into()));
    }
    Ok(st)
}

/// `/proc/PID/status`, parsed.
pub fn status(pid: pid_t) -> Result<Status, ProcfsError> {
    parse_status(&read_string(pid, "status")?)
}

/// `/proc/PID/auxv` as (type, value) words, without the terminating `AT_NULL`.
pub fn auxv(pid: pid_t) -> Result<Vec<u64>, ProcfsError> {
    let path = format!("/proc/{pid}/auxv");
    let raw = fs::read(&path).map_err(|e| map_read_err(pid, path, e))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// `/proc/PID/personality`.
pub fn personality(pid: pid_t) -> Result<u32, ProcfsError> {
    let t = read_string(pid, "personality")?;
    u32::from_str_radix(t.trim(), 16).map_err(|_| ProcfsError::Parse {
        path: "personality".into(),
        what: t,
    })
}

/// `pid` (a process or a thread) as its own pid namespace numbers it, the
/// last `NSpid` of `/proc/PID/status`: what the process itself stores (a
/// `wait4` argument, glibc's thread descriptors, robust futex owners).
/// `pid` itself when that cannot be read.
pub fn own_namespace_pid(pid: pid_t) -> pid_t {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(pid)
}

/// `/proc/PID/comm` without the newline.
pub fn comm(pid: pid_t) -> Result<String, ProcfsError> {
    Ok(read_string(pid, "comm")?.trim_end_matches('\n').to_string())
}

/// Target of a `/proc/PID/...` symlink (`cwd`, `exe`, `fd/N`).
pub fn link(pid: pid_t, name: &str) -> Result<String, ProcfsError> {
    let path = format!("/proc/{pid}/{name}");
    fs::read_link(&path)
        .map(|p: PathBuf| p.to_string_lossy().into_owned())
        .map_err(|e| map_read_err(pid, path, e))
}

/// A node-wide value under `/proc/sys` (`kernel/hostname`), trimmed;
/// empty if it cannot be read.
pub fn sysctl(name: &str) -> String {
    fs::read_to_string(format!("/proc/sys/{name}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What kind of object a file descriptor refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FdKind {
    /// A regular file: re-opened by path on restore.
    Regular,
    /// A directory.
    Directory,
    /// A character device (`/dev/null`, a tty).
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A pipe or FIFO.
    Pipe,
    /// A socket.
    Socket,
    /// An `anon_inode:` object (eventfd, epoll, timerfd, signalfd...).
    AnonInode,
    /// A memfd or other deleted file.
    Deleted,
    /// Anything else.
    Other,
    /// The socket on which a cooperative `checkpoint_all_threads()`
    /// caller waits for forkd's answer (it was a socket in the parent): in
    /// each child, a duplicate of its stdin, so the waiting thread reads
    /// the child's first stdin line there instead.
    CoopReply,
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// The descriptor number.
    pub fd: i32,
    /// Kind of object.
    pub kind: FdKind,
    /// Link target as `/proc/PID/fd/N` shows it.
    pub path: String,
    /// `open` flags (from fdinfo, octal).
    pub flags: u32,
    /// File position.
    pub offset: u64,
}

/// Classify an fd by its link text and (for paths) its file type.
pub fn fd_kind(link: &str, file_type: Option<fs::FileType>) -> FdKind {
    use std::os::unix::fs::FileTypeExt;
    if link.starts_with("socket:") {
        return FdKind::Socket;
    }
    if link.starts_with("pipe:") {
        return FdKind::Pipe;
    }
    if link.starts_with("anon_inode:") {
        return FdKind::AnonInode;
    }
    if link.ends_with(" (deleted)") || link.starts_with("/memfd:") {
        return FdKind::Deleted;
    }
    match file_type {
        Some(t) if t.is_file() => FdKind::Regular,
        Some(t) if t.is_dir() => FdKind::Directory,
        Some(t) if t.is_char_device() => FdKind::CharDevice,
        Some(t) if t.is_block_device() => FdKind::BlockDevice,
        Some(t) if t.is_fifo() => FdKind::Pipe,
        Some(t) if t.is_socket() => FdKind::Socket,
        _ => FdKind::Other,
    }
}

/// Parse `pos:` and `flags:` from the text of `/proc/PID/fdinfo/N`.
pub fn parse_fdinfo(text: &str) -> (u64, u32) {
    let mut pos = 0;
    let mut flags = 0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).unwrap_or(0);
        }
    }
    (pos, flags)
}

/// The mappings of `pid` marked `MADV_DONTFORK` (`dc` in the `VmFlags` of
/// `/proc/PID/smaps`), as (start, end); none if it cannot be read.
pub fn dontfork_ranges(pid: pid_t) -> Vec<(u64, u64)> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    parse_dontfork(&text)
}

/// [`dontfork_ranges`] from the text of `/proc/PID/smaps`.
pub fn parse_dontfork(text: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut range = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some((a, b)) = range.take() {
                if flags.split_whitespace().any(|f| f == "dc") {
                    // Adjacent ones as one range: one madvise each way.
                    match out.last_mut() {
                        Some((_, end)) if *end == a => *end = b,
                        _ => out.push((a, b)),
                    }
                }
            }
        } else if let Some((a, rest)) = line.split_once('-') {
            let b = rest.split_whitespace().next().unwrap_or("");
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                range = Some((a, b));
            }
        }
    }
    out
}

/// All open file descriptors of `pid`, sorted by number.
pub fn fds(pid: pid_t) -> Result<Vec<FdEntry>, ProcfsError> {
    let dir = format!("/proc/{pid}/fd");
    let rd = fs::read_dir(&dir).map_err(|e| map_read_err(pid, dir.clone(), e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|source| ProcfsError::Read {
            path: dir.clone(),
            source,
        })?;
        let Some(fd) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // An fd may close between readdir and readlink; skip it then.
        let Ok(target) = link(pid, &format!("fd/{fd}")) else {
            continue;
        };
        let ftype = fs::metadata(ent.path()).ok().map(|m| m.file_type());
        let (offset, flags) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .map(|t| parse_fdinfo(&t))
            .unwrap_or((0, 0));
        out.push(FdEntry {
            fd,
            kind: fd_kind(&target, ftype),
            path: target,
            flags,
            offset,
        });
    }
    out.sort_by_key(|e| e.fd);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 12345                      /usr/bin/cat\n\
                    7ffd20757000-7ffd20778000 rw-p 00000000 00:00 0                          [stack]\n\
                    7f0000000000-7f0000001000 rw-s 00001000 00:01 99                         /memfd:x (deleted)\n\
                    7f0000002000-7f0000003000 ---p 00000000 00:00 0 \n";
        let m = parse_maps(text).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].start, 0x55d0c0a00000);
        assert_eq!(m[0].path, "/usr/bin/cat");
        assert_eq!(m[0].perms(), "r--p");
        assert_eq!(m[1].path, "[stack]");
        assert!(m[2].shared);
        assert_eq!(m[2].offset, 0x1000);
        assert_eq!(m[2].path, "/memfd:x (deleted)");
        assert_eq!(m[3].prot, 0);
        assert_eq!(m[3].path, "");
    }

    #[test]
    fn rejects_bad_maps() {
        assert!(parse_maps("zz-10 rw-p 0 0:0 0\n").is_err());
        assert!(parse_maps("20-10 rw-p 0 0:0 0\n").is_err());
        assert!(parse_maps("10-20 rw 0 0:0 0\n").is_err());
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let text = "1943 (a) b) c) S 1939 1939 1060 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 22971 3133440 413 18446744073709551615 94384260599808 94384260619689 140735823893712 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94384260635696 94384260637312 94385261346816 140735823895265 140735823895285 140735823895285 140735823896555 0\n";
        let (state, mm) = parse_stat(text).unwrap();
        assert_eq!(state, 'S');
        assert_eq!(mm.start_code, 94384260599808);
        assert_eq!(mm.end_code, 94384260619689);
        assert_eq!(mm.start_stack, 140735823893712);
        assert_eq!(mm.start_data, 94384260635696);
        assert_eq!(mm.start_brk, 94385261346816);
        assert_eq!(mm.env_end, 140735823896555);
    }

    #[test]
    fn parses_status() {
        let text = "Name:\tcat\nUmask:\t0027\nState:\tR (running)\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nThreads:\t3\nSigIgn:\t0000000000000004\nSigCgt:\t0000000000000400\n";
        let st = parse_status(text).unwrap();
        assert_eq!(st.umask, 0o027);
        assert_eq!(st.uid, [1, 2, 3, 4]);
        assert_eq!(st.gid, [5, 6, 7, 8]);
        assert_eq!(st.groups, vec![10, 20]);
        assert_eq!(st.threads, 3);
        assert_eq!(st.sig_ign, 4);
        assert_eq!(st.sig_cgt, 0x400);
        assert!(parse_status("Name: x\n").is_err());
    }

    #[test]
    fn classifies_fds() {
        assert_eq!(fd_kind("socket:[123]", None), FdKind::Socket);
        assert_eq!(fd_kind("pipe:[1]", None), FdKind::Pipe);
        assert_eq!(fd_kind("anon_inode:[eventfd]", None), FdKind::AnonInode);
        assert_eq!(fd_kind("/memfd:a (deleted)", None), FdKind::Deleted);
        assert_eq!(fd_kind("/x", None), FdKind::Other);
        assert_eq!(parse_fdinfo("pos:\t42\nflags:\t0100002\n"), (42, 0o100002));
        let smaps = "f3371b80000-f3371bc0000 rw-p 00000000 00:00 0 \nSize:  256 kB\nVmFlags: rd wr mr mw me dc nr \n7f00-8000 r--p 00000000 00:00 0\nRss: 4 kB\nVmFlags: rd mr mw me \n";
        assert_eq!(parse_dontfork(smaps), vec![(0xf3371b80000, 0xf3371bc0000)]);
        let adjacent =
            "1000-2000 rw-p 0 00:00 0\nVmFlags: rd dc\n2000-3000 ---p 0 00:00 0\nVmFlags: dc\n";
        assert_eq!(parse_dontfork(adjacent), vec![(0x1000, 0x3000)]);
    }

    #[test]
    fn reads_own_process() {
        // SAFETY: getpid never fails.
        let me = unsafe { libc::getpid() };
        let m = maps(me).unwrap();
        assert!(m.iter().any(|e| e.path == "[stack]"));
        let (state, mm) = stat(me).unwrap();
        assert!(state == 'R' || state == 'S');
        assert!(mm.start_code > 0);
        assert!(status(me).unwrap().threads >= 1);
        assert!(!auxv(me).unwrap().is_empty());
        assert!(fds(me).unwrap().iter().any(|f| f.fd == 0));
    }
}

#[cfg(test)]
mod uffd_missing_tests {
    use super::*;

    #[test]
    fn finds_mappings_registered_in_missing_mode() {
        let text = "\
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 
Size:                  4 kB
VmFlags: rd wr mr mw me ac um 
7f0000002000-7f0000003000 rw-p 00000000 00:00 0 
Size:                  4 kB
VmFlags: rd wr mr mw me ac 
7f0000004000-7f0000005000 r--p 00000000 08:01 12 /usr/lib/x.so
VmFlags: rd mr mw me ui 
";
        assert_eq!(parse_uffd_missing(text), vec![0x7f00_0000_0000]);
        assert!(parse_uffd_missing("").is_empty());
    }
}
