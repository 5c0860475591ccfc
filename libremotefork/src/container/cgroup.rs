//! Each container child's own cgroup: memory, pids and cpu limits, its
//! usage, and whether the kernel's OOM killer acted in it.
//!
//! Both hierarchies are supported: cgroup v1, a mount per controller under
//! `/sys/fs/cgroup/{memory,pids,cpu}` (this project's machines), and the
//! v2 unified hierarchy at `/sys/fs/cgroup` where its controllers are
//! enabled. A child's cgroup is made under forkd's own, in each hierarchy
//! used: `<forkd's cgroup>/remotefork/<name>`.

use std::path::{Path, PathBuf};

use libc::pid_t;
use serde::{Deserialize, Serialize};

/// What went wrong with a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read or written.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A limit was asked for that no mounted controller can enforce.
    #[error("no cgroup controller for {what} is mounted (cgroup v1 /sys/fs/cgroup/{v1}, or v2 with {v1} enabled)")]
    NoController {
        /// The limit.
        what: &'static str,
        /// The controller.
        v1: &'static str,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A container child's limits. Unset: the seed's (its parent's cgroup's);
/// unset there too: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads.
    pub pids: Option<u64>,
    /// CPU time per period, in millionths of a CPU (1_000_000: one CPU).
    pub cpu_micros: Option<u64>,
}

impl Limits {
    /// These limits, each unset one taken from `defaults`.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes.or(defaults.memory_bytes),
            pids: self.pids.or(defaults.pids),
            cpu_micros: self.cpu_micros.or(defaults.cpu_micros),
        }
    }
}

/// The CFS period children's cpu limits use (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Memory limits at or above this are "no limit" (v1 reports 2^63 - 4096).
const NO_MEMORY_LIMIT: u64 = 1 << 62;

/// Which hierarchy a controller is in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hier {
    V1(&'static str),
    V2,
}

/// Where `controller` is mounted (v1), or the v2 root if it is enabled
/// there.
fn mount_of(controller: &'static str) -> Option<(Hier, PathBuf)> {
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    if v1.join("tasks").exists() {
        return Some((Hier::V1(controller), v1));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let enabled = std::fs::read_to_string(v2.join("cgroup.controllers")).ok()?;
    enabled
        .split_whitespace()
        .any(|c| c == controller)
        .then(|| (Hier::V2, v2.to_path_buf()))
}

/// `pid`'s cgroup path in a hierarchy (from `/proc/PID/cgroup`).
fn path_of(pid: &str, h: &Hier) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match h {
            Hier::V1(c) => ctrls.split(',').any(|x| x == *c),
            Hier::V2 => id == "0" && ctrls.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The limits of `pid`'s cgroups (a container parent's: its children's
/// defaults).
pub fn limits_of(pid: pid_t) -> Limits {
    let pid = pid.to_string();
    let dir = |c: &'static str| -> Option<(Hier, PathBuf)> {
        let (h, m) = mount_of(c)?;
        let p = path_of(&pid, &h)?;
        Some((h.clone(), m.join(p.trim_start_matches('/'))))
    };
    let mut l = Limits::default();
    if let Some((h, d)) = dir("memory") {
        let v = match h {
            Hier::V1(_) => read_u64(&d.join("memory.limit_in_bytes")),
            Hier::V2 => read_u64(&d.join("memory.max")),
        };
        l.memory_bytes = v.filter(|v| *v < NO_MEMORY_LIMIT);
    }
    if let Some((_, d)) = dir("pids") {
        l.pids = read_u64(&d.join("pids.max"));
    }
    if let Some((h, d)) = dir("cpu") {
        l.cpu_micros = match h {
            Hier::V1(_) => {
                let q = std::fs::read_to_string(d.join("cpu.cfs_quota_us")).ok();
                let q: Option<i64> = q.and_then(|q| q.trim().parse().ok());
                let p = read_u64(&d.join("cpu.cfs_period_us"));
                match (q, p) {
                    (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as u64 * 1_000_000 / p),
                    _ => None,
                }
            }
            Hier::V2 => std::fs::read_to_string(d.join("cpu.max"))
                .ok()
                .and_then(|t| {
                    let mut f = t.split_whitespace();
                    let q: u64 = f.next()?.parse().ok()?;
                    let p: u64 = f.next()?.parse().ok()?;
                    (p > 0).then(|| q * 1_000_000 / p)
                }),
        };
    }
    l
}

/// What a child's cgroup has used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Memory now, bytes.
    pub memory_bytes: u64,
    /// Processes and threads now.
    pub pids: u64,
    /// CPU time so far, microseconds.
    pub cpu_us: u64,
}

/// One child's cgroup, in every hierarchy its limits need. Removed when
/// dropped (once every process in it is gone).
#[derive(Debug)]
pub struct ChildCgroup {
    /// (hierarchy, directory) per controller used.
    dirs: Vec<(Hier, &'static str, PathBuf)>,
    /// The limits set.
    pub limits: Limits,
    /// Its child was reaped: what is left in it is on its way out.
    reaped: std::sync::atomic::AtomicBool,
}

impl ChildCgroup {
    /// Make `name`'s cgroup under forkd's own, with `limits`. Memory and
    /// pids are always accounted (a child's usage is shown even without a
    /// limit); cpu only when limited.
    pub fn create(name: &str, limits: Limits) -> Result<ChildCgroup, CgroupError> {
        Self::make(name, limits, false)
    }

    /// [`ChildCgroup::create`] in the cpu hierarchy too, limited or not,
    /// so that [`ChildCgroup::set_limits`] can give it any limit later.
    pub fn create_all(name: &str, limits: Limits) -> Result<ChildCgroup, CgroupError> {
        Self::make(name, limits, true)
    }

    fn make(name: &str, limits: Limits, all: bool) -> Result<ChildCgroup, CgroupError> {
        let me = std::process::id().to_string();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            sweep_stale();
        });
        let mut dirs: Vec<(Hier, &'static str, PathBuf)> = Vec::new();
        let wanted: [(&'static str, bool, &'static str); 3] = [
            ("memory", limits.memory_bytes.is_some(), "a memory limit"),
            ("pids", limits.pids.is_some(), "a pids limit"),
            ("cpu", limits.cpu_micros.is_some(), "a cpu limit"),
        ];
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for (c, needed, what) in wanted {
                let Some((h, m)) = mount_of(c) else {
                    if needed {
                        return Err(CgroupError::NoController { what, v1: c });
                    }
                    continue;
                };
                if c == "cpu" && !needed && !all {
                    continue;
                }
                let ours = path_of(&me, &h).unwrap_or_else(|| "/".into());
                let d = m
                    .join(ours.trim_start_matches('/'))
                    .join("remotefork")
                    .join(name);
                if dirs.iter().any(|(_, _, x)| *x == d) {
                    // v2: one directory for every controller.
                    continue;
                }
                if h == Hier::V2 {
                    enable_v2(&m, &d, &["memory", "pids", "cpu"]);
                }
                std::fs::create_dir_all(&d).map_err(io(&d))?;
                made.push(d.clone());
                dirs.push((h, c, d));
            }
            Ok(())
        })();
        let cg = ChildCgroup {
            dirs,
            limits,
            reaped: Default::default(),
        };
        if let Err(e) = result {
            drop(cg);
            return Err(e);
        }
        cg.apply()?;
        Ok(cg)
    }

    fn file(&self, c: &str) -> Option<(&Hier, &Path)> {
        self.dirs
            .iter()
            .find(|(h, ctl, _)| *ctl == c || *h == Hier::V2)
            .map(|(h, _, d)| (h, d.as_path()))
    }

    fn write(&self, dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = dir.join(file);
        std::fs::write(&p, value).map_err(io(&p))
    }

    /// Change its limits (a spare child's cgroup, made with the seed's,
    /// given this spawn's).
    pub fn set_limits(&mut self, limits: Limits) -> Result<(), CgroupError> {
        if limits == self.limits {
            return Ok(());
        }
        self.limits = limits;
        self.apply()
    }

    fn apply(&self) -> Result<(), CgroupError> {
        let l = self.limits;
        if let (Some(m), Some((h, d))) = (l.memory_bytes, self.file("memory")) {
            match h {
                Hier::V1(_) => {
                    self.write(d, "memory.limit_in_bytes", &m.to_string())?;
                    // No swap beyond the limit, where swap accounting is on.
                    let sw = d.join("memory.memsw.limit_in_bytes");
                    if sw.exists() {
                        self.write(d, "memory.memsw.limit_in_bytes", &m.to_string())?;
                    }
                }
                Hier::V2 => {
                    self.write(d, "memory.max", &m.to_string())?;
                    let _ = self.write(d, "memory.swap.max", "0");
                }
            }
        }
        if let (Some(p), Some((_, d))) = (l.pids, self.file("pids")) {
            self.write(d, "pids.max", &p.to_string())?;
        }
        if l.cpu_micros.is_some() && self.file("cpu").is_none() {
            return Err(CgroupError::NoController {
                what: "a cpu limit",
                v1: "cpu",
            });
        }
        if let (Some(c), Some((h, d))) = (l.cpu_micros, self.file("cpu")) {
            let quota = (c * CPU_PERIOD_US / 1_000_000).max(1000);
            match h {
                Hier::V1(_) => {
                    self.write(d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    self.write(d, "cpu.cfs_quota_us", &quota.to_string())?;
                }
                Hier::V2 => self.write(d, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?,
            }
        }
        Ok(())
    }

    /// Move process `pid` (a husk, before it runs the child) in.
    pub fn attach(&self, pid: pid_t) -> Result<(), CgroupError> {
        self.attach_in_background(pid).wait()
    }

    /// [`ChildCgroup::attach`], one thread per hierarchy, while the caller
    /// goes on: a move waits for an RCU grace period (the kernel's
    /// `cgroup_threadgroup_rwsem`), milliseconds each, which the restore's
    /// own work can cover. [`Attaching::wait`] before the child runs.
    pub fn attach_in_background(&self, pid: pid_t) -> Attaching {
        let threads = self
            .dirs
            .iter()
            .map(|(_, _, d)| {
                let p = d.join("cgroup.procs");
                std::thread::spawn(move || {
                    // Spawned while a template's child is made on one CPU.
                    crate::onecpu::unpin_this_thread();
                    std::fs::write(&p, pid.to_string()).map_err(io(&p))
                })
            })
            .collect();
        Attaching { threads }
    }

    /// Has the OOM killer killed a process in it?
    pub fn oom_killed(&self) -> bool {
        let Some((h, d)) = self.file("memory") else {
            return false;
        };
        let (file, key) = match h {
            Hier::V1(_) => ("memory.oom_control", "oom_kill"),
            Hier::V2 => ("memory.events", "oom_kill"),
        };
        std::fs::read_to_string(d.join(file))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == key).then(|| v.trim().parse::<u64>().ok())?
                })
            })
            .is_some_and(|n| n > 0)
    }

    /// What it uses now.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        if let Some((h, d)) = self.file("memory") {
            u.memory_bytes = match h {
                Hier::V1(_) => read_u64(&d.join("memory.usage_in_bytes")),
                Hier::V2 => read_u64(&d.join("memory.current")),
            }
            .unwrap_or(0);
        }
        if let Some((_, d)) = self.file("pids") {
            u.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
        }
        if let Some((h, d)) = self.file("cpu") {
            u.cpu_us = match h {
                Hier::V1(_) => read_u64(&d.join("cpuacct.usage")).map(|ns| ns / 1000),
                Hier::V2 => std::fs::read_to_string(d.join("cpu.stat"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
                    }),
            }
            .unwrap_or(0);
        }
        u
    }

    /// Its child has been reaped: when dropped, wait a moment for the
    /// rest of its processes (killed with its pid namespace) to go.
    pub fn mark_reaped(&self) {
        self.reaped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Its directories (for `ps` and the instance list).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, _, d)| d.clone()).collect()
    }
}

/// Moves into a child's cgroup under way ([`ChildCgroup::attach_in_background`]).
#[derive(Debug)]
pub struct Attaching {
    threads: Vec<std::thread::JoinHandle<Result<(), CgroupError>>>,
}

impl Attaching {
    /// Wait for every move; the first error.
    pub fn wait(self) -> Result<(), CgroupError> {
        let mut first = Ok(());
        for t in self.threads {
            let r = t.join().unwrap_or_else(|_| {
                Err(CgroupError::Io {
                    path: PathBuf::from("cgroup.procs"),
                    source: std::io::Error::other("the attaching thread panicked"),
                })
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// In v2, a controller must be enabled in every ancestor's subtree.
fn enable_v2(root: &Path, leaf: &Path, ctrls: &[&str]) {
    let Ok(rel) = leaf.strip_prefix(root) else {
        return;
    };
    let mut at = root.to_path_buf();
    for part in rel.parent().into_iter().flat_map(|p| p.components()) {
        let _ = std::fs::create_dir_all(&at);
        for c in ctrls {
            let _ = std::fs::write(at.join("cgroup.subtree_control"), format!("+{c}"));
        }
        at = at.join(part);
    }
    let _ = std::fs::create_dir_all(&at);
    for c in ctrls {
        let _ = std::fs::write(at.join("cgroup.subtree_control"), format!("+{c}"));
    }
}

/// Remove the empty child cgroups that forkds no longer running left
/// under `remotefork/` (named `FORKDPID-CHILDPID`; a forkd killed with
/// SIGKILL cannot remove its own). A cgroup with a process in it (a child
/// a later forkd adopted) cannot be removed and stays; those of a forkd
/// still running are not touched. Done once by the first child cgroup a
/// process makes; how many were removed.
pub fn sweep_stale() -> usize {
    let me = std::process::id().to_string();
    let me = me.as_str();
    let mut removed = 0usize;
    for c in ["memory", "pids", "cpu"] {
        let Some((h, m)) = mount_of(c) else { continue };
        let ours = path_of(me, &h).unwrap_or_else(|| "/".into());
        let root = m.join(ours.trim_start_matches('/')).join("remotefork");
        let Ok(rd) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(p, _)| p.parse::<u32>().ok())
            else {
                continue;
            };
            if owner.to_string() == me || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            if std::fs::remove_dir(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed empty child cgroups that stopped forkds left"
        );
    }
    removed
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        for (_, _, d) in &self.dirs {
            // The last processes (a fork bomb's) may take a moment to go;
            // a child still running keeps its cgroup.
            let tries = if self.reaped.load(std::sync::atomic::Ordering::Relaxed) {
                50
            } else {
                1
            };
            for i in 0..tries {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                    Err(_) if i + 1 < tries => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(e) => tracing::debug!(
                        cgroup = %d.display(),
                        error = %e,
                        "a child's cgroup is left (a process is still in it)"
                    ),
                }
            }
        }
    }
}
