//! Taking back what an earlier forkd handed its keeper: its running
//! children are served on, those that ended meanwhile (or had to be
//! killed) are reported.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use remotefork::pager::Prefetch;
use tracing::{info, warn};

use super::{auth, handover, Follow, InstanceRec, Service, OUTPUT_KEPT};
use crate::pb;

impl Service {
    /// Take back what an earlier forkd handed its keeper: serve its
    /// running children on (same node cache, page tables rebuilt from their
    /// journals), report those that ended meanwhile, and those the keeper
    /// had to kill.
    pub(super) async fn adopt(
        &self,
        handed: Vec<crate::keeper::Handed>,
        orphans: Vec<serde_json::Value>,
    ) {
        let st = &self.state;
        for o in orphans {
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
        let mut caches: HashMap<String, remotefork::pager::source::CacheFds> = HashMap::new();
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
        for h in handed {
            if h.key.starts_with("s/") {
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
                    caches.insert(
                        seed.to_string(),
                        remotefork::pager::source::CacheFds { cache, present },
                    );
                }
                // Put again by this forkd as the seed comes into use.
                st.handover.release(&h.key);
            } else {
                rest.push(h);
            }
        }
        let mut targets: HashMap<String, Result<Arc<remotefork::restore::Restorer>, String>> =
            HashMap::new();
        for h in rest {
            let place = handover::SeedPlace::from_meta(&h.meta);
            let names: Vec<String> = h.meta["fds"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let mut fds: HashMap<String, std::os::fd::OwnedFd> =
                names.into_iter().zip(h.fds).collect();
            let alive = h.ended.is_none();
            let restorer = if fds.contains_key("uffd") && alive {
                if !targets.contains_key(&place.id) {
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
                        .map(|t| t.restorer)
                        .map_err(|e| e.message().to_string());
                    targets.insert(place.id.clone(), r);
                }
                Some(targets[&place.id].clone())
            } else {
                None
            };
            let regions: Vec<(u64, u64, bool)> =
                serde_json::from_value(h.meta["regions"].clone()).unwrap_or_default();
            let journal = h.meta["journal"].as_str().map(PathBuf::from);
            let prefetch = h.meta["prefetch"]
                .as_str()
                .and_then(|p| p.parse::<Prefetch>().ok())
                .unwrap_or(Prefetch::Window);
            let pid = h.meta["pid"].as_i64().map(|p| p as i32);
            let stats = match (restorer, fds.remove("uffd")) {
                (Some(Ok(r)), Some(uffd)) => {
                    let fork_id = h
                        .key
                        .starts_with("g/")
                        .then(|| st.handover.adopted_grandchild(&h.key, &h.meta));
                    let pidfd = fds.get("pidfd").and_then(|p| p.try_clone().ok());
                    match r.adopt(remotefork::restore::Adopted {
                        pid,
                        pidfd,
                        uffd,
                        regions,
                        journal,
                        prefetch,
                        fork_id,
                    }) {
                        Ok(s) => Ok(Some(s)),
                        Err(e) => Err(e.to_string()),
                    }
                }
                (Some(Err(why)), _) => Err(why),
                _ => Ok(None),
            };
            let Some(iid) = h.meta["iid"].as_str().map(String::from) else {
                // A grandchild: served on (or, if it cannot be, killed).
                if let Err(why) = stats {
                    if let Some(p) = fds.get("pidfd") {
                        let _ = kernel_helpers::proc::pidfd_signal(
                            std::os::fd::AsRawFd::as_raw_fd(p),
                            libc::SIGKILL,
                        );
                    }
                    warn!(key = %h.key, reason = %why, "a handed-over grandchild cannot be served again; killed");
                    st.handover.release(&h.key);
                }
                continue;
            };
            let stats = match stats {
                Ok(s) => s,
                Err(why) => {
                    let reason = format!("forkd restarted and cannot serve it again: {why}");
                    self.kill_handed(&iid, &h.meta, fds.get("pidfd"), reason);
                    continue;
                }
            };
            let Some(pidfd) = fds.remove("pidfd") else {
                continue;
            };
            self.record_handed(&iid, &h.meta, &pb::Exited::default());
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
            info!(instance = %iid, pid = ?pid, ended = ?h.ended, "child handed over by an earlier forkd");
            let follow = Follow {
                base: pb::InstanceEvent {
                    instance_id: iid.clone(),
                    seed_id: place.id.clone(),
                    index: h.meta["index"].as_u64().unwrap_or(0) as u32,
                    pid: pid.unwrap_or(0) as u32,
                    ..Default::default()
                },
                pid: pid.unwrap_or(0) as u32,
                pidfd,
                out: fds.remove("stdout"),
                stats,
                tx: None,
                started: Instant::now(),
                ended: h.ended,
            };
            let st2 = st.clone();
            tokio::spawn(async move { st2.follow(follow).await });
        }
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
        warn!(instance = %iid, %reason, "a handed-over child is killed");
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
            },
        );
        g.end(iid, ex, out.into_iter().take(OUTPUT_KEPT).collect(), bytes);
    }
}
