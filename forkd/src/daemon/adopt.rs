//! Taking back what an earlier forkd handed its keeper: its running
//! children are served on, those that ended meanwhile (or had to be
//! killed) are reported.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use remotefork::pager::cache::CacheFds;
use remotefork::pager::{ChildStats, Prefetch};
use remotefork::RestoreError;
use tonic::Status;
use tracing::{info, warn};

use super::{auth, handover, Follow, InstanceRec, Service, LOG, OUTPUT_KEPT};
use crate::keeper::Handed;
use crate::pb;

/// Why a handed-over child cannot be served again.
#[derive(Debug, thiserror::Error)]
enum AdoptError {
    /// Its seed is not found, or cannot be restored here.
    #[error("{}", .0.message())]
    Seed(Status),
    /// Its pager cannot be started again over its userfaultfd.
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

/// The restorer of each seed whose children were handed over (or why
/// there is none), by seed id: looked up once per seed.
type Restorers = HashMap<String, Result<Arc<remotefork::Seed>, Status>>;

impl Service {
    /// Take back what an earlier forkd handed its keeper: serve its
    /// running children on (same node cache, page tables rebuilt from their
    /// journals), report those that ended meanwhile, and those the keeper
    /// had to kill.
    pub(super) async fn adopt(&self, handed: Vec<Handed>, orphans: Vec<serde_json::Value>) {
        for o in orphans {
            self.record_orphan(&o);
        }
        let (rest, mut caches) = self.sort_handed(handed);
        let mut restorers = Restorers::new();
        for h in rest {
            self.adopt_one(h, &mut caches, &mut restorers).await;
        }
    }

    /// A child the keeper saw end, or had to kill, while no forkd
    /// watched: recorded as ended.
    fn record_orphan(&self, o: &serde_json::Value) {
        if let Some(iid) = o["meta"]["iid"].as_str() {
            let ex = pb::Exited {
                reason: o["killed"].as_str().unwrap_or_default().to_string(),
                exit_code: o["ended"]["exit_code"].as_i64().unwrap_or(0) as i32,
                signal: o["ended"]["signal"]
                    .as_i64()
                    .unwrap_or(if o["killed"].is_string() { 9 } else { 0 })
                    as i32,
                ..Default::default()
            };
            self.record_handed(iid, &o["meta"], &ex);
        }
    }

    /// Sort out what was handed over: children whose input was still
    /// being written are killed, seeds' node caches are set aside (by
    /// seed id); the children and grandchildren to serve on are returned.
    fn sort_handed(&self, handed: Vec<Handed>) -> (Vec<Handed>, HashMap<String, CacheFds>) {
        let st = &self.state;
        let mut caches: HashMap<String, CacheFds> = HashMap::new();
        let mut rest = Vec::new();
        // Children whose input was still being written: it cannot be
        // resumed (this forkd does not have it).
        let mut cut: std::collections::HashSet<String> = Default::default();
        for h in &handed {
            if let Some(iid) = h.key.strip_prefix("s/") {
                cut.insert(iid.to_string());
                st.handover.release(&h.key);
            }
        }
        // Children recorded as instances (a child told as starting may be
        // both, if forkd went between recording it and letting go of it).
        let recorded: std::collections::HashSet<u64> = handed
            .iter()
            .filter(|h| h.key.starts_with("i/"))
            .filter_map(|h| h.meta["pid"].as_u64())
            .collect();
        for h in handed {
            if h.key.starts_with("s/") {
                continue;
            }
            if h.key.starts_with(handover::STARTING) {
                st.handover.release(&h.key);
                let pid = h.meta["pid"].as_u64().unwrap_or(0);
                if h.ended.is_none() && !recorded.contains(&pid) {
                    // Its start was never reported, so nobody waits for it:
                    // it would wait for good at its next fault.
                    if let Some(p) = h.fds.first() {
                        let _ = kernel_helpers::proc::pidfd_signal(
                            std::os::fd::AsRawFd::as_raw_fd(p),
                            libc::SIGKILL,
                        );
                    }
                    warn!(
                        target: LOG,
                        pid,
                        seed = %h.meta["seed"].as_str().unwrap_or_default(),
                        "a child was starting as the last forkd stopped, before its start was reported to anyone; killed (nobody serves its memory or reads its output)"
                    );
                }
                continue;
            }
            if let Some(iid) = h.meta["iid"].as_str().filter(|i| cut.contains(*i)) {
                let reason =
                    "forkd stopped while it was still writing the child's input; the input cannot be resumed"
                        .to_string();
                let names = h.meta["fds"].as_array().cloned().unwrap_or_default();
                let pidfd = names
                    .iter()
                    .position(|n| n == "pidfd")
                    .and_then(|i| h.fds.get(i));
                self.kill_handed(iid, &h.meta, pidfd, reason);
                continue;
            }
            if let Some(seed) = h.key.strip_prefix("c/") {
                let mut fds = h.fds.into_iter();
                if let (Some(cache), Some(present)) = (fds.next(), fds.next()) {
                    caches.insert(seed.to_string(), CacheFds { cache, present });
                }
                // Put again by this forkd as the seed comes into use.
                st.handover.release(&h.key);
            } else {
                rest.push(h);
            }
        }
        (rest, caches)
    }

    /// The restorer of `place`'s seed, over the node cache an earlier
    /// forkd kept for it if there is one; looked up once per seed.
    async fn restorer_for(
        &self,
        place: &handover::SeedPlace,
        caches: &mut HashMap<String, CacheFds>,
        restorers: &mut Restorers,
    ) -> Result<Arc<remotefork::Seed>, Status> {
        if !restorers.contains_key(&place.id) {
            let sr = pb::SeedRef {
                id: place.id.clone(),
                key: place.key.clone(),
            };
            let r = self
                .target_adopting(
                    Some(&sr),
                    &place.origin,
                    false,
                    caches.remove(&place.id),
                    &auth::Principal::Operator,
                )
                .await
                .map(|t| t.restorer);
            restorers.insert(place.id.clone(), r);
        }
        restorers[&place.id].clone()
    }

    /// Start the pager of the child handed over as `key` (with `meta`)
    /// again over its userfaultfd, its page table rebuilt from its journal.
    fn serve_on(
        &self,
        key: &str,
        meta: &serde_json::Value,
        r: &remotefork::Seed,
        pid: Option<i32>,
        uffd: OwnedFd,
        fds: &HashMap<String, OwnedFd>,
    ) -> Result<Arc<ChildStats>, AdoptError> {
        let regions: Vec<(u64, u64, bool)> =
            serde_json::from_value(meta["regions"].clone()).unwrap_or_default();
        let journal = meta["journal"].as_str().map(PathBuf::from);
        let prefetch = meta["prefetch"]
            .as_str()
            .and_then(|p| p.parse::<Prefetch>().ok())
            .unwrap_or(Prefetch::Window);
        let fork_id = key
            .starts_with("g/")
            .then(|| self.state.handover.adopted_grandchild(key, meta));
        let pidfd = fds.get("pidfd").and_then(|p| p.try_clone().ok());
        Ok(r.adopt(remotefork::node::Adopted {
            pid,
            pidfd,
            uffd,
            regions,
            journal,
            prefetch,
            fork_id,
        })?)
    }

    /// Serve one handed-over child (or grandchild) on and follow it, or
    /// kill it if it cannot be served.
    async fn adopt_one(
        &self,
        h: Handed,
        caches: &mut HashMap<String, CacheFds>,
        restorers: &mut Restorers,
    ) {
        let st = &self.state;
        let Handed {
            key,
            meta,
            ended,
            fds,
        } = h;
        let place = handover::SeedPlace::from_meta(&meta);
        let names: Vec<String> = meta["fds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let mut fds: HashMap<String, OwnedFd> = names.into_iter().zip(fds).collect();
        let alive = ended.is_none();
        let restorer = if fds.contains_key("uffd") && alive {
            Some(self.restorer_for(&place, caches, restorers).await)
        } else {
            None
        };
        let pid = meta["pid"].as_i64().map(|p| p as i32);
        let stats = match (restorer, fds.remove("uffd")) {
            (Some(Ok(r)), Some(uffd)) => self.serve_on(&key, &meta, &r, pid, uffd, &fds).map(Some),
            (Some(Err(why)), _) => Err(AdoptError::Seed(why)),
            _ => Ok(None),
        };
        let Some(iid) = meta["iid"].as_str().map(String::from) else {
            // A grandchild: served on (or, if it cannot be, killed).
            if let Err(why) = stats {
                if let Some(p) = fds.get("pidfd") {
                    let _ = kernel_helpers::proc::pidfd_signal(
                        std::os::fd::AsRawFd::as_raw_fd(p),
                        libc::SIGKILL,
                    );
                }
                warn!(target: LOG, key = %key, reason = %why, "a handed-over grandchild cannot be served again; killed");
                st.handover.release(&key);
            }
            return;
        };
        let stats = match stats {
            Ok(s) => s,
            Err(why) => {
                let reason = format!("forkd restarted and cannot serve it again: {why}");
                self.kill_handed(&iid, &meta, fds.get("pidfd"), reason);
                return;
            }
        };
        let Some(pidfd) = fds.remove("pidfd") else {
            return;
        };
        self.record_handed(&iid, &meta, &pb::Exited::default());
        if let Some(r) = st
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get_mut(&iid)
        {
            r.end = None;
            r.state = "running".into();
        }
        info!(target: LOG, instance = %iid, pid = ?pid, ended = ?ended, "child handed over by an earlier forkd");
        let follow = Follow {
            base: pb::InstanceEvent {
                instance_id: iid.clone(),
                seed_id: place.id.clone(),
                index: meta["index"].as_u64().unwrap_or(0) as u32,
                pid: pid.unwrap_or(0) as u32,
                ..Default::default()
            },
            pid: pid.unwrap_or(0) as u32,
            pidfd,
            out: fds.remove("stdout"),
            stats,
            tx: None,
            started: Instant::now(),
            ended,
            cgroup: None,
        };
        let st2 = st.clone();
        tokio::spawn(async move { st2.follow(follow).await });
    }

    /// Kill a handed-over child that cannot go on (through its pidfd), and
    /// report it ended with `reason`.
    fn kill_handed(
        &self,
        iid: &str,
        meta: &serde_json::Value,
        pidfd: Option<&std::os::fd::OwnedFd>,
        reason: String,
    ) {
        if let Some(p) = pidfd {
            let _ = kernel_helpers::proc::pidfd_signal(
                std::os::fd::AsRawFd::as_raw_fd(p),
                libc::SIGKILL,
            );
        }
        warn!(target: LOG, instance = %iid, %reason, "a handed-over child is killed");
        let ex = pb::Exited {
            reason,
            signal: libc::SIGKILL,
            ..Default::default()
        };
        self.record_handed(iid, meta, &ex);
        self.state.handover.child_ended(iid);
    }

    /// Note a handed-over instance (ended with `ex` if it has a reason or
    /// status; the caller marks a running one running).
    fn record_handed(&self, iid: &str, meta: &serde_json::Value, ex: &pb::Exited) {
        let labels: HashMap<String, String> =
            serde_json::from_value(meta["labels"].clone()).unwrap_or_default();
        let notes: Vec<String> = serde_json::from_value(meta["notes"].clone()).unwrap_or_default();
        let out = std::fs::read(self.state.handover.out_path(iid)).unwrap_or_default();
        let bytes = out.len() as u64;
        let mut g = self
            .state
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.map.insert(
            iid.to_string(),
            InstanceRec {
                seed_id: meta["seed"].as_str().unwrap_or_default().to_string(),
                pid: meta["pid"].as_u64().unwrap_or(0) as u32,
                state: "running".into(),
                labels,
                started_unix_ms: meta["started_unix_ms"].as_u64().unwrap_or(0),
                end: None,
                adopted: true,
                notes,
                stdout: Vec::new(),
                stdout_bytes: 0,
                owner: meta["owner"].as_str().unwrap_or_default().to_string(),
                uid: meta["uid"].as_u64().unwrap_or(0) as u32,
                container: None,
            },
        );
        g.end(iid, ex, out.into_iter().take(OUTPUT_KEPT).collect(), bytes);
    }
}
