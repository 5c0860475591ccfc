//! Children outlive forkd: what this forkd hands its keeper
//! ([`crate::keeper`]) as children start and end, and how the next forkd
//! takes them back.
//!
//! Per running child (`i/INSTANCE`): its pidfd, its userfaultfd (lazy) and
//! its stdout pipe, with what is needed to serve it again (its seed and
//! where the seed lives, the regions its page table was built with, its
//! journal). Per seed in use (`c/SEED`): the node cache's memfds, which
//! children map. Per grandchild forked in a lazy child (`g/...`): its
//! userfaultfd (and pidfd once known). The output a child wrote is kept in
//! `RUN/out/INSTANCE` as it is read, so nothing read before a restart is
//! lost.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remotefork::pager::{ForkEvent, Prefetch};
use remotefork::Child;
use serde_json::{json, Value};
use tracing::warn;

use crate::keeper::{Handed, Keeper, KeeperError};

/// Output kept per child in its file (a restart reads it back); beyond
/// this, output is streamed to the client but not kept.
pub const OUTPUT_FILE_CAP: u64 = 64 << 20;

/// Where a seed lives, as a later forkd must find it again.
#[derive(Debug, Clone)]
pub struct SeedPlace {
    /// Its id.
    pub id: String,
    /// The gRPC address of the node holding it ("" for this node).
    pub origin: String,
    /// Its key (for a seed of another node).
    pub key: String,
}

impl SeedPlace {
    fn json(&self) -> Value {
        json!({ "seed": self.id, "origin": self.origin, "key": self.key })
    }

    /// From what `SeedPlace::json` wrote.
    pub fn from_meta(m: &Value) -> SeedPlace {
        let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        SeedPlace {
            id: s("seed"),
            origin: s("origin"),
            key: s("key"),
        }
    }
}

/// This forkd's side of the keeper.
pub struct Handover {
    keeper: Arc<Keeper>,
    out_dir: PathBuf,
    /// Seeds whose caches and fork sinks are set up, by id.
    seeds: Mutex<HashSet<String>>,
    /// Grandchildren: fork number to keeper key and what it was told.
    grandchildren: Arc<Mutex<HashMap<u64, (String, Value)>>>,
    tag: String,
}

impl Handover {
    /// Connect to (or start) the keeper of `run_dir` and take back what it
    /// holds; also returns what a keeper that gave up killed.
    pub fn start(
        run_dir: &Path,
        grace: Duration,
        tag: &str,
    ) -> Result<(Handover, Vec<Handed>, Vec<Value>), KeeperError> {
        let out_dir = run_dir.join("out");
        let journals = run_dir.join("journal");
        for d in [&out_dir, &journals] {
            remotefork::private_fs::dir(d).map_err(|source| KeeperError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
        }
        let keeper = Keeper::connect_or_start(run_dir, grace)?;
        let handed = keeper.take()?;
        let orphans = keeper.orphans();
        remotefork::node::set_children_outlive_spawner(true);
        remotefork::node::set_journal_dir(Some(journals));
        Ok((
            Handover {
                keeper: Arc::new(keeper),
                out_dir,
                seeds: Mutex::new(HashSet::new()),
                grandchildren: Arc::new(Mutex::new(HashMap::new())),
                tag: tag.to_string(),
            },
            handed,
            orphans,
        ))
    }

    /// The file a child's output is kept in.
    pub fn out_path(&self, iid: &str) -> PathBuf {
        self.out_dir.join(iid)
    }

    /// Before the first child of `seed` on this forkd: hand over its
    /// cache, and have its grandchildren handed over as they are forked.
    pub fn seed_in_use(&self, seed: &SeedPlace, r: &Arc<remotefork::Seed>) {
        if !self
            .seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seed.id.clone())
        {
            return;
        }
        match r.cache_fds() {
            Ok(c) => self.keeper.put(
                &format!("c/{}", seed.id),
                &seed.json(),
                &[c.cache.as_raw_fd(), c.present.as_raw_fd()],
                None,
            ),
            Err(e) => {
                warn!(seed = %seed.id, error = %e, "cannot hand the seed cache to the keeper")
            }
        }
        let keeper = self.keeper.clone();
        let keys = self.grandchildren.clone();
        let place = seed.clone();
        let tag = self.tag.clone();
        r.set_fork_sink(Arc::new(move |ev| match ev {
            ForkEvent::Forked {
                id,
                uffd,
                journal,
                regions,
                ..
            } => {
                let key = format!("g/{tag}/{id}");
                let mut m = place.json();
                m["regions"] = json!(regions);
                m["journal"] = json!(journal);
                keys.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (key.clone(), m.clone()));
                m["fds"] = json!(["uffd"]);
                keeper.put(&key, &m, &[uffd.as_raw_fd()], None);
            }
            ForkEvent::Found { id, pid, uffd } => {
                let Some((key, mut m)) = keys
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned()
                else {
                    return;
                };
                let Ok(pidfd) = kernel_helpers::uffd::pidfd_open(pid) else {
                    return;
                };
                // The same entry again, now with the pidfd (a put replaces).
                m["pid"] = json!(pid);
                m["fds"] = json!(["uffd", "pidfd"]);
                keeper.put(&key, &m, &[uffd.as_raw_fd(), pidfd.as_raw_fd()], Some(1));
            }
            ForkEvent::Ended { id } => {
                let key = keys.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                if let Some((key, _)) = key {
                    keeper.del(&key);
                }
            }
            // A child about to run, not yet recorded (`child_started`): a
            // forkd gone in between must not leave it waiting on a fault
            // nobody serves. The next forkd kills it with a reason
            // (`STARTING` entries); a keeper that gives up kills it too.
            ForkEvent::Starting { pid, pidfd, uffd } => {
                let mut m = place.json();
                m["pid"] = json!(pid);
                m["fds"] = json!(["pidfd", "uffd"]);
                keeper.put(
                    &starting_key(&tag, pid),
                    &m,
                    &[pidfd.as_raw_fd(), uffd.as_raw_fd()],
                    Some(0),
                );
            }
            ForkEvent::NotStarted { pid } => keeper.del(&starting_key(&tag, pid)),
        }));
    }

    /// A child started: hand over what it depends on.
    #[allow(clippy::too_many_arguments)]
    pub fn child_started(
        &self,
        iid: &str,
        index: u32,
        seed: &SeedPlace,
        child: &Child,
        pidfd: &OwnedFd,
        out: Option<&OwnedFd>,
        labels: &HashMap<String, String>,
        prefetch: Prefetch,
        started_unix_ms: u64,
        (owner, uid): (&str, u32),
    ) {
        let mut m = seed.json();
        m["owner"] = json!(owner);
        m["uid"] = json!(uid);
        m["iid"] = json!(iid);
        m["index"] = json!(index);
        m["pid"] = json!(child.pid());
        m["labels"] = json!(labels);
        m["started_unix_ms"] = json!(started_unix_ms);
        m["prefetch"] = json!(prefetch_name(prefetch));
        m["notes"] = json!(child.notes());
        let mut fds: Vec<RawFd> = vec![pidfd.as_raw_fd()];
        let mut names = vec!["pidfd"];
        if let Some(h) = child.handover() {
            fds.push(h.uffd.as_raw_fd());
            names.push("uffd");
            m["regions"] = json!(h.regions);
            m["journal"] = json!(h.journal);
        }
        if let Some(o) = out {
            fds.push(o.as_raw_fd());
            names.push("stdout");
        }
        m["fds"] = json!(names);
        self.keeper.put(&format!("i/{iid}"), &m, &fds, Some(0));
        // Held under its instance now (the keeper takes requests in order).
        self.keeper.del(&starting_key(&self.tag, child.pid()));
    }

    /// A child ended and its end was reported: let go of it.
    pub fn child_ended(&self, iid: &str) {
        self.keeper.del(&format!("i/{iid}"));
        let _ = std::fs::remove_file(self.out_path(iid));
    }

    /// Note a grandchild adopted from an earlier forkd under `key`; returns
    /// the fork number its end will be reported with.
    pub fn adopted_grandchild(&self, key: &str, meta: &Value) -> u64 {
        let id = remotefork::pager::next_fork_id();
        self.grandchildren
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (key.to_string(), meta.clone()));
        id
    }

    /// Tell the keeper `meta` under `key` (nothing to hold).
    pub fn note(&self, key: &str, meta: &Value) {
        self.keeper.put(key, meta, &[], None);
    }

    /// Hold `fds` under `key` (no process of its own).
    pub fn hold(&self, key: &str, fds: &[RawFd]) {
        self.keeper.put(key, &json!({}), fds, None);
    }

    /// Let go of `key` (an entry that cannot be served again).
    pub fn release(&self, key: &str) {
        self.keeper.del(key);
    }
}

static HOLD_BEFORE_RECORD: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// For tests: wait `d` between letting each child run and recording it
/// (the window a forkd can stop in with a child told only as starting).
pub fn hold_before_record(d: Duration) {
    let _ = HOLD_BEFORE_RECORD.set(d);
}

/// See [`hold_before_record`].
pub fn held_before_record() -> Option<Duration> {
    HOLD_BEFORE_RECORD.get().copied()
}

/// Keys of children told as starting and not yet recorded as instances:
/// `STARTING` + forkd's tag + `/` + pid.
pub const STARTING: &str = "p/";

fn starting_key(tag: &str, pid: i32) -> String {
    format!("{STARTING}{tag}/{pid}")
}

/// The name a prefetch mode has in the API.
pub fn prefetch_name(p: Prefetch) -> &'static str {
    match p {
        Prefetch::Off => "off",
        Prefetch::Window => "window",
        Prefetch::Recorded => "recorded",
    }
}

/// A child's output as it is read: kept in its file (for a restart) up to
/// [`OUTPUT_FILE_CAP`].
pub struct OutputFile {
    file: Option<std::fs::File>,
    written: u64,
}

impl OutputFile {
    /// Append to `path` (created if missing).
    pub fn open(path: &Path) -> OutputFile {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(remotefork::private_fs::FILE_MODE)
            .open(path)
            .map_err(|e| warn!(file = %path.display(), error = %e, "cannot keep a child's output"))
            .ok();
        let written = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        OutputFile { file, written }
    }

    /// Keep `data`.
    pub fn write(&mut self, data: &[u8]) {
        let room = OUTPUT_FILE_CAP.saturating_sub(self.written) as usize;
        if let Some(f) = &mut self.file {
            let n = data.len().min(room);
            if n > 0 && f.write_all(&data[..n]).is_ok() {
                self.written += n as u64;
            }
        }
    }
}
