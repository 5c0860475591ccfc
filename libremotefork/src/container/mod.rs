//! Containers at both ends of a fork.
//!
//! **The parent.** A process whose root is not forkd's (a container started
//! by runc, crun, podman...) is captured as a *container seed*: its mapped
//! files are identified in its own root (`/proc/PID/root`), its root
//! filesystem is copied once per node into a store keyed by a content
//! digest ([`rootfs`]), and the seed records what made it a container
//! ([`ContainerInfo`]): its namespaces, mounts, hostname, cgroup limits and
//! user mapping.
//!
//! **The children.** Each child of a container seed is a lean container of
//! its own ([`child_isolation`]): new pid, mount, uts, ipc and network
//! namespaces; the seed's rootfs as the lower layer of an overlay whose
//! upper is a size-limited tmpfs of the child's own (its writes vanish with
//! it); the parent's mounts made anew (its own `/proc`, a `/dev` with the
//! same nodes, the same masked paths); and a cgroup of its own with memory,
//! pids and cpu limits ([`cgroup`]).

pub mod cgroup;
pub mod rootfs;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kernel_helpers::husk::{Isolation, Setup};
use libc::pid_t;
use serde::{Deserialize, Serialize};

pub use cgroup::{ChildCgroup, Limits};

/// What went wrong with a container, at capture or spawn.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A file of the process or the node could not be read.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The parent's mounts cannot be given to children.
    #[error("process {pid}'s container cannot be reproduced: {why}")]
    Unsupported {
        /// The parent.
        pid: pid_t,
        /// What cannot be kept.
        why: String,
    },
    /// The seed's rootfs is not on this node.
    #[error("the seed's container rootfs {digest} is not on this node (looked in {looked})")]
    RootfsMissing {
        /// Its digest.
        digest: String,
        /// Where it was looked for.
        looked: String,
    },
    /// Its rootfs failed.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// Its cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// One mount of the parent's, as its children get it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildMount {
    /// A fresh filesystem of a kind with no contents of its own to keep
    /// (`proc`, `sysfs`, `devpts`, `mqueue`).
    Fresh {
        /// Where, in the container.
        at: String,
        /// `proc`, `sysfs`, `devpts`, `mqueue`.
        fstype: String,
        /// `MS_*` flags (read-only, nosuid...).
        flags: u64,
        /// Its options.
        data: String,
    },
    /// A fresh tmpfs, holding the directories, device nodes and symlinks
    /// the parent's had (`/dev`).
    Tmpfs {
        /// Where, in the container.
        at: String,
        /// `MS_*` flags.
        flags: u64,
        /// Its options (size, mode).
        data: String,
        /// What it held.
        #[serde(deserialize_with = "crate::image::limits::tmpfs_entries")]
        entries: Vec<TmpfsEntry>,
    },
    /// A bind of a path already in the container over another (a masked
    /// path: `/dev/null` over `/proc/kcore`), or of a path over itself,
    /// made read-only if `flags` says so (`/proc/sys`).
    Bind {
        /// The path bound, in the container.
        from: String,
        /// Where, in the container.
        at: String,
        /// `MS_*` flags applied by a remount.
        flags: u64,
    },
}

/// Something in a parent's tmpfs that children get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TmpfsEntry {
    /// A directory (path relative to the mount).
    Dir {
        /// Its path.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// A character or block device.
    Node {
        /// Its path.
        path: String,
        /// Type and permission bits.
        mode: u32,
        /// Its device number.
        rdev: u64,
    },
    /// A symbolic link.
    Symlink {
        /// Its path.
        path: String,
        /// What it points at.
        target: String,
    },
}

/// What made the parent a container: recorded in the seed (descriptor
/// format 6), used at each spawn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// The content digest of its root filesystem (`sha256:HEX`).
    pub rootfs_digest: String,
    /// Its regular files and their bytes.
    pub rootfs_files: u64,
    /// Its bytes.
    pub rootfs_bytes: u64,
    /// Was its root mounted read-only?
    pub readonly_root: bool,
    /// Its hostname.
    pub hostname: String,
    /// The namespaces it had of its own (`pid`, `mnt`, `uts`, `ipc`,
    /// `net`, `user`, `cgroup`).
    #[serde(deserialize_with = "crate::image::limits::container_strings")]
    pub namespaces: Vec<String>,
    /// Its mounts besides the root, as children get them, in order.
    #[serde(deserialize_with = "crate::image::limits::container_mounts")]
    pub mounts: Vec<ChildMount>,
    /// Its mounts children do not get, each with why (shown at spawn).
    #[serde(deserialize_with = "crate::image::limits::container_strings")]
    pub not_kept: Vec<String>,
    /// Its network interfaces (children get a loopback of their own).
    #[serde(deserialize_with = "crate::image::limits::container_strings")]
    pub interfaces: Vec<String>,
    /// Its uid map (`/proc/PID/uid_map`).
    pub uid_map: String,
    /// Its cgroup's limits: children's defaults.
    pub limits: Limits,
}

/// Device nodes a child's tmpfs may hold: the ones runc and crun give
/// every container (null, zero, full, random, urandom, tty, ptmx, fuse).
const ALLOWED_NODES: &[(u32, u32)] = &[
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 2),
    (10, 229),
];

/// A path a seed may name inside its container: absolute, no `..`.
fn check_path(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.split('/').any(|c| c == "..") || p.contains('\0') {
        return Err(format!(
            "container {what} {p:?} is not an absolute path without \"..\""
        ));
    }
    Ok(())
}

/// Check a container section read from a seed (which may come from
/// another node): every path stays inside the child's root, and device
/// nodes are only the standard ones.
pub fn validate(c: &ContainerInfo) -> Result<(), String> {
    let hex = c.rootfs_digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "container rootfs digest {:?} is not sha256:HEX",
            c.rootfs_digest
        ));
    }
    if c.hostname.len() > 64 {
        return Err("container hostname longer than 64 bytes".into());
    }
    for m in &c.mounts {
        match m {
            ChildMount::Fresh { at, fstype, .. } => {
                check_path("mount point", at)?;
                if !matches!(fstype.as_str(), "proc" | "sysfs" | "devpts" | "mqueue") {
                    return Err(format!("container mount of type {fstype:?}"));
                }
            }
            ChildMount::Tmpfs { at, entries, .. } => {
                check_path("mount point", at)?;
                for e in entries {
                    let (TmpfsEntry::Dir { path, .. }
                    | TmpfsEntry::Node { path, .. }
                    | TmpfsEntry::Symlink { path, .. }) = e;
                    check_path("tmpfs entry", &format!("/{path}"))?;
                    if let TmpfsEntry::Node { rdev, mode, .. } = e {
                        let (maj, min) = (libc::major(*rdev), libc::minor(*rdev));
                        if mode & libc::S_IFMT != libc::S_IFCHR
                            || !ALLOWED_NODES.contains(&(maj, min))
                        {
                            return Err(format!(
                                "container device node {path} ({maj}:{min}) is not one children may get"
                            ));
                        }
                    }
                }
            }
            ChildMount::Bind { from, at, .. } => {
                check_path("bind source", from)?;
                check_path("mount point", at)?;
            }
        }
    }
    Ok(())
}

/// Is `pid`'s root another than forkd's?
pub fn is_container(pid: pid_t) -> Result<bool, ContainerError> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/root"))
        .map_err(io_err(format!("reading process {pid}'s root")))?;
    let ours = std::fs::metadata("/").map_err(io_err("reading /"))?;
    Ok((theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()))
}

/// The path under which forkd sees `path` of process `pid`'s root.
pub fn in_root(pid: pid_t, path: &str) -> String {
    format!("/proc/{pid}/root{path}")
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    /// `major:minor`.
    pub dev: String,
    /// The path inside its filesystem that is mounted.
    pub root: String,
    /// Where.
    pub at: String,
    /// Per-mount options.
    pub opts: String,
    /// The filesystem type.
    pub fstype: String,
    /// The source.
    pub source: String,
    /// Per-superblock options.
    pub super_opts: String,
}

/// Parse `/proc/PID/mountinfo` (paths unescaped).
pub fn parse_mountinfo(text: &str) -> Vec<MountLine> {
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 3 {
                return None;
            }
            Some(MountLine {
                dev: f[2].to_string(),
                root: unescape(f[3]),
                at: unescape(f[4]),
                opts: f[5].to_string(),
                fstype: r[0].to_string(),
                source: unescape(r[1]),
                super_opts: r[2].to_string(),
            })
        })
        .collect()
}

/// `MS_*` flags of per-mount options.
fn mount_flags(opts: &str) -> u64 {
    let mut f = 0u64;
    for o in opts.split(',') {
        f |= match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "relatime" => libc::MS_RELATIME,
            "noatime" => libc::MS_NOATIME,
            _ => 0,
        };
    }
    f
}

/// Superblock options worth giving a fresh mount of the same kind.
fn fresh_options(fstype: &str, super_opts: &str) -> String {
    let keep: &[&str] = match fstype {
        "tmpfs" => &["size=", "mode=", "nr_inodes=", "uid=", "gid="],
        "devpts" => &["gid=", "mode=", "ptmxmode="],
        _ => &[],
    };
    let mut o: Vec<&str> = super_opts
        .split(',')
        .filter(|x| keep.iter().any(|k| x.starts_with(k)))
        .collect();
    if fstype == "devpts" {
        o.insert(0, "newinstance");
    }
    o.join(",")
}

/// How children get the parent's mounts (all but its root, given in
/// order), and the ones they cannot get, with why.
pub fn child_mounts(pid: pid_t, lines: &[MountLine]) -> (Vec<ChildMount>, Vec<String>) {
    let mut out = Vec::new();
    let mut not_kept = Vec::new();
    // Which device each fresh or tmpfs mount point holds: a later bind of
    // that device's path is a bind of a path in the container.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut cgroups: Vec<&str> = Vec::new();
    for m in lines.iter().filter(|m| m.at != "/") {
        let flags = mount_flags(&m.opts);
        let bound_from = seen
            .iter()
            .rev()
            .find(|(dev, _)| *dev == m.dev)
            .map(|(_, at)| at.clone());
        match (m.fstype.as_str(), m.root.as_str(), bound_from) {
            ("proc" | "sysfs" | "devpts" | "mqueue", "/", _) => {
                out.push(ChildMount::Fresh {
                    at: m.at.clone(),
                    fstype: m.fstype.clone(),
                    flags,
                    data: fresh_options(&m.fstype, &m.super_opts),
                });
                seen.push((m.dev.clone(), m.at.clone()));
            }
            ("tmpfs", "/", _) => {
                let (entries, files) = tmpfs_entries(&in_root(pid, &m.at));
                if files > 0 {
                    not_kept.push(format!(
                        "{} regular file(s) in the parent's tmpfs at {} (children get it empty of files)",
                        files, m.at
                    ));
                }
                out.push(ChildMount::Tmpfs {
                    at: m.at.clone(),
                    flags,
                    data: fresh_options("tmpfs", &m.super_opts),
                    entries,
                });
                seen.push((m.dev.clone(), m.at.clone()));
            }
            (_, root, Some(base)) => {
                let from = if base == "/" {
                    root.to_string()
                } else {
                    format!("{base}{root}")
                };
                out.push(ChildMount::Bind {
                    from,
                    at: m.at.clone(),
                    flags,
                });
            }
            ("cgroup" | "cgroup2", _, _) => cgroups.push(&m.at),
            _ => not_kept.push(format!(
                "the parent's {} mount of {}:{} at {} (only its root filesystem is kept)",
                m.fstype, m.source, m.root, m.at
            )),
        }
    }
    if !cgroups.is_empty() {
        not_kept.push(format!(
            "the parent's cgroup mounts ({}) (children are in cgroups of their own)",
            cgroups.join(", ")
        ));
    }
    (out, not_kept)
}

/// Directories, device nodes and symlinks under `dir` (relative paths,
/// parents first), and how many regular files there are besides.
fn tmpfs_entries(dir: &str) -> (Vec<TmpfsEntry>, u64) {
    let mut out = Vec::new();
    let mut files = 0;
    let Ok(top) = std::fs::metadata(dir) else {
        return (out, 0);
    };
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(format!("{dir}/{rel}")) else {
            continue;
        };
        let mut names: Vec<_> = rd.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                // A mount point of its own (`/dev/pts`) is made as a
                // directory; what is mounted there is its own mount.
                if md.dev() != top.dev() {
                    // Another mount's root: only the mount point is this
                    // tmpfs's (what is mounted there is a mount of its own).
                    out.push(TmpfsEntry::Dir { path, mode: 0o755 });
                    continue;
                }
                out.push(TmpfsEntry::Dir {
                    path: path.clone(),
                    mode: md.mode() & 0o7777,
                });
                stack.push(path);
            } else if ft.is_char_device() || ft.is_block_device() {
                out.push(TmpfsEntry::Node {
                    path,
                    mode: md.mode(),
                    rdev: md.rdev(),
                });
            } else if ft.is_symlink() {
                if let Ok(t) = std::fs::read_link(e.path()) {
                    out.push(TmpfsEntry::Symlink {
                        path,
                        target: t.to_string_lossy().into_owned(),
                    });
                }
            } else {
                files += 1;
            }
        }
    }
    (out, files)
}

/// The namespaces `pid` has that forkd does not share.
fn own_namespaces(pid: pid_t) -> Vec<String> {
    ["pid", "mnt", "uts", "ipc", "net", "user", "cgroup"]
        .iter()
        .filter(|ns| {
            let a = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
            let b = std::fs::read_link(format!("/proc/self/ns/{ns}"));
            matches!((a, b), (Ok(a), Ok(b)) if a != b)
        })
        .map(|s| s.to_string())
        .collect()
}

/// `pid`'s hostname, read in its uts namespace (from a thread of its own,
/// which `setns` moves alone).
fn hostname_of(pid: pid_t) -> Result<String, ContainerError> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/uts"))
        .map_err(io_err(format!("opening process {pid}'s uts namespace")))?;
    std::thread::spawn(move || -> std::io::Result<String> {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a descriptor this thread owns; it moves only
        // this thread, which exits right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUTS) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    })
    .join()
    .map_err(|_| ContainerError::Io {
        what: "reading the hostname".into(),
        source: std::io::Error::other("the reading thread panicked"),
    })?
    .map_err(io_err(format!("reading process {pid}'s hostname")))
}

/// Everything about `pid`'s container but its rootfs's digest.
pub fn describe(pid: pid_t) -> Result<ContainerInfo, ContainerError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map_err(io_err(format!("reading process {pid}'s mounts")))?;
    let lines = parse_mountinfo(&text);
    let root =
        lines
            .iter()
            .rev()
            .find(|m| m.at == "/")
            .ok_or_else(|| ContainerError::Unsupported {
                pid,
                why: "no root in its mountinfo".into(),
            })?;
    let readonly_root = mount_flags(&root.opts) & libc::MS_RDONLY != 0;
    let (mounts, not_kept) = child_mounts(pid, &lines);
    let interfaces = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .map(|t| {
            t.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(ContainerInfo {
        rootfs_digest: String::new(),
        rootfs_files: 0,
        rootfs_bytes: 0,
        readonly_root,
        hostname: hostname_of(pid)?,
        namespaces: own_namespaces(pid),
        mounts,
        not_kept,
        interfaces,
        uid_map: std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap_or_default(),
        limits: cgroup::limits_of(pid),
    })
}

/// Describe `pid`'s container and put its rootfs in `store` (once per
/// digest): the info a seed records.
pub fn capture(pid: pid_t, store: &Path) -> Result<ContainerInfo, ContainerError> {
    let mut info = describe(pid)?;
    let t = std::time::Instant::now();
    let stored = rootfs::store(Path::new(&in_root(pid, "")), store)?;
    tracing::info!(
        digest = %stored.digest,
        files = stored.files,
        bytes = stored.bytes,
        copied = stored.copied,
        ms = t.elapsed().as_millis() as u64,
        "container rootfs stored"
    );
    info.rootfs_digest = stored.digest;
    info.rootfs_files = stored.files;
    info.rootfs_bytes = stored.bytes;
    Ok(info)
}

/// The network a container child gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Network {
    /// A network namespace of its own with only its loopback, up.
    #[default]
    Loopback,
    /// A network namespace of its own with nothing up.
    None,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "loopback" => Ok(Network::Loopback),
            "none" => Ok(Network::None),
            other => Err(format!("unknown network {other:?} (loopback or none)")),
        }
    }
}

/// A size in bytes: a number, or one with K, M or G (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("{s:?}: the unit must be K, M or G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M or G)"))?;
    n.checked_mul(mul)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?} is not a size greater than 0"))
}

/// A number of CPUs (`0.5`, `2`) in millionths of a CPU.
pub fn parse_cpus(s: &str) -> Result<u64, String> {
    let f: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of CPUs (for example 0.5)"))?;
    if !(0.001..=4096.0).contains(&f) {
        return Err(format!("{s:?}: CPUs must be between 0.001 and 4096"));
    }
    Ok((f * 1e6).round() as u64)
}

/// What one container child gets, besides what its seed records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildSpec {
    /// Limits; each one unset takes the seed's.
    pub limits: Limits,
    /// Its network.
    pub network: Network,
    /// The size of its writable layer (bytes); 0: 64 MiB.
    pub upper_bytes: u64,
    /// No container at all: the child runs in the spawner's namespaces
    /// and cgroup, mapping the seed's files from the node's copy of its
    /// rootfs (its paths, cwd and the files it opens are then the node's).
    /// For measuring what the container costs; not a fork child.
    pub host: bool,
}

/// Where every container child's root is assembled, inside its own mount
/// namespace (one directory serves them all: each child's mounts there
/// are its own).
pub fn assembly_dir() -> PathBuf {
    std::env::temp_dir().join("remotefork-containers")
}

/// The namespaces and setup steps of one child of a container seed whose
/// rootfs is at `lower`: run by the husk's starter before it execs. The
/// child's root is then `assembly_dir()/root`, entered by the restore plan
/// once the seed's files are mapped (the plan's root change).
pub fn child_isolation(info: &ContainerInfo, lower: &Path, spec: &ChildSpec) -> Isolation {
    let base = assembly_dir().to_string_lossy().into_owned();
    let mut steps = vec![
        // Nothing mounted here is seen outside, nor anything outside here.
        Setup::Mount {
            source: "none".into(),
            target: "/".into(),
            fstype: String::new(),
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: String::new(),
        },
    ];
    steps.extend(assemble_root(
        info,
        &base,
        &lower.to_string_lossy(),
        spec.upper_bytes,
    ));
    if !info.hostname.is_empty() {
        steps.push(Setup::Hostname(info.hostname.clone()));
    }
    if spec.network == Network::Loopback {
        steps.push(Setup::LoopbackUp);
    }
    Isolation {
        namespaces: libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET,
        steps,
    }
}

/// The namespaces of a child forked from a container seed's template (the
/// template itself is not a pid namespace's init: `CLONE_PARENT` is
/// refused to one).
pub const FORK_NAMESPACES: libc::c_int = libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// What a child forked from a container seed's template does first, in
/// its new namespaces, still privileged: its own root, assembled on a
/// staging tmpfs over the template's `/proc` (whose pid namespace is not
/// the child's) with the template's root, which it sees as `/`, as the
/// overlay's lower layer (`lowerdir=/`, two overlays deep), and the
/// parent's mounts made anew in it. The caller then pivots into
/// [`FORK_ROOT`], sets the cwd, and brings up loopback.
pub fn fork_steps(info: &ContainerInfo, spec: &ChildSpec) -> Vec<Setup> {
    assemble_root(info, FORK_STAGING, "/", spec.upper_bytes)
}

/// Where a template's child assembles its root (see [`fork_steps`]).
pub const FORK_STAGING: &str = "/proc";
/// Its root, under [`FORK_STAGING`].
pub const FORK_ROOT: &str = "/proc/root";

/// Steps that build a child's root at `base/root`: a tmpfs of
/// `upper_bytes` (0: 64 MiB) over `base`, an overlay of `lower` with its
/// upper on that tmpfs, and the parent's mounts.
fn assemble_root(info: &ContainerInfo, base: &str, lower: &str, upper_bytes: u64) -> Vec<Setup> {
    let b = |rel: &str| format!("{base}/{rel}");
    let root = b("root");
    let at = |p: &str| format!("{root}{p}");
    let upper = if upper_bytes == 0 {
        64 << 20
    } else {
        upper_bytes
    };
    let mut steps = vec![
        Setup::Mount {
            source: "tmpfs".into(),
            target: base.to_string(),
            fstype: "tmpfs".into(),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: format!("size={upper},mode=0700"),
        },
        Setup::Mkdir {
            path: b("upper"),
            mode: 0o755,
        },
        Setup::Mkdir {
            path: b("work"),
            mode: 0o700,
        },
        Setup::Mkdir {
            path: root.clone(),
            mode: 0o755,
        },
        Setup::Mount {
            source: "overlay".into(),
            target: root.clone(),
            fstype: "overlay".into(),
            flags: if info.readonly_root {
                libc::MS_RDONLY
            } else {
                0
            },
            data: format!(
                "lowerdir={lower},upperdir={},workdir={}",
                b("upper"),
                b("work")
            ),
        },
    ];
    for m in &info.mounts {
        match m {
            ChildMount::Fresh {
                at: p,
                fstype,
                flags,
                data,
            } => {
                steps.push(Setup::Mount {
                    source: fstype.clone(),
                    target: at(p),
                    fstype: fstype.clone(),
                    flags: *flags,
                    data: data.clone(),
                });
            }
            ChildMount::Tmpfs {
                at: p,
                flags,
                data,
                entries,
            } => {
                steps.push(Setup::Mount {
                    source: "tmpfs".into(),
                    target: at(p),
                    fstype: "tmpfs".into(),
                    flags: *flags & !libc::MS_RDONLY,
                    data: data.clone(),
                });
                for e in entries {
                    steps.push(match e {
                        TmpfsEntry::Dir { path, mode } => Setup::Mkdir {
                            path: format!("{}/{path}", at(p)),
                            mode: *mode,
                        },
                        TmpfsEntry::Node { path, mode, rdev } => Setup::Mknod {
                            path: format!("{}/{path}", at(p)),
                            mode: *mode,
                            dev: *rdev,
                        },
                        TmpfsEntry::Symlink { path, target } => Setup::Symlink {
                            target: target.clone(),
                            link: format!("{}/{path}", at(p)),
                        },
                    });
                }
                if *flags & libc::MS_RDONLY != 0 {
                    steps.push(remount(&at(p), *flags));
                }
            }
            ChildMount::Bind { from, at: p, flags } => {
                steps.push(Setup::Mount {
                    source: at(from),
                    target: at(p),
                    fstype: String::new(),
                    flags: libc::MS_BIND,
                    data: String::new(),
                });
                if *flags & libc::MS_RDONLY != 0 {
                    steps.push(remount(&at(p), *flags));
                }
            }
        }
    }
    steps
}

/// A bind mount made read-only (and the other per-mount flags) in place.
fn remount(at: &str, flags: u64) -> Setup {
    Setup::Mount {
        source: "none".into(),
        target: at.into(),
        fstype: String::new(),
        flags: libc::MS_REMOUNT
            | libc::MS_BIND
            | (flags & (libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC)),
        data: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNC: &str = "67 44 254:0 /b/rootfs / ro,relatime - ext4 /dev/vda rw
68 67 0:40 / /proc rw,relatime - proc proc rw
69 67 0:41 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
70 69 0:42 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666
73 67 0:44 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
75 74 0:29 /rf /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu
48 68 0:40 /sys /proc/sys ro,relatime - proc proc rw
50 68 0:41 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
90 67 254:0 /srv/data /data rw - ext4 /dev/vda rw
";

    #[test]
    fn runc_mounts_become_fresh_mounts_binds_and_named_refusals() {
        let lines = parse_mountinfo(RUNC);
        assert_eq!(lines.len(), 9);
        let (m, not_kept) = child_mounts(1 << 30, &lines);
        assert_eq!(
            m[0],
            ChildMount::Fresh {
                at: "/proc".into(),
                fstype: "proc".into(),
                flags: libc::MS_RELATIME,
                data: String::new()
            }
        );
        assert!(
            matches!(&m[1], ChildMount::Tmpfs { at, data, .. } if at == "/dev" && data == "size=65536k,mode=755")
        );
        assert!(
            matches!(&m[2], ChildMount::Fresh { fstype, data, .. } if fstype == "devpts" && data == "newinstance,gid=5,mode=620,ptmxmode=666")
        );
        assert!(
            matches!(&m[3], ChildMount::Fresh { fstype, flags, .. } if fstype == "sysfs" && flags & libc::MS_RDONLY != 0)
        );
        // /proc/sys: the container's own /proc/sys, read-only.
        assert_eq!(
            m[4],
            ChildMount::Bind {
                from: "/proc/sys".into(),
                at: "/proc/sys".into(),
                flags: libc::MS_RDONLY | libc::MS_RELATIME
            }
        );
        // /proc/keys masked with the container's /dev/null.
        assert!(
            matches!(&m[5], ChildMount::Bind { from, at, .. } if from == "/dev/null" && at == "/proc/keys")
        );
        assert_eq!(m.len(), 6);
        assert_eq!(not_kept.len(), 2, "{not_kept:?}");
        assert!(not_kept[0].contains("/srv/data at /data"));
        assert!(not_kept[1].contains("cgroup mounts (/sys/fs/cgroup/cpu)"));
    }

    #[test]
    fn a_child_gets_new_namespaces_an_overlay_and_its_hostname() {
        let info = ContainerInfo {
            hostname: "h1".into(),
            mounts: child_mounts(1 << 30, &parse_mountinfo(RUNC)).0,
            ..Default::default()
        };
        let iso = child_isolation(&info, Path::new("/store/abc"), &ChildSpec::default());
        assert_ne!(iso.namespaces & libc::CLONE_NEWPID, 0);
        assert_ne!(iso.namespaces & libc::CLONE_NEWNET, 0);
        let overlay = iso
            .steps
            .iter()
            .find_map(|s| match s {
                Setup::Mount { fstype, data, .. } if fstype == "overlay" => Some(data.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            overlay.starts_with("lowerdir=/store/abc,upperdir="),
            "{overlay}"
        );
        assert!(iso.steps.contains(&Setup::Hostname("h1".into())));
        assert_eq!(iso.steps.last(), Some(&Setup::LoopbackUp));
    }

    #[test]
    fn sizes_and_cpus_parse_or_say_what_is_wrong() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12X").unwrap_err().contains("K, M or G"));
        assert!(parse_size("0").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(500_000));
        assert!(parse_cpus("-1").is_err());
    }
}
