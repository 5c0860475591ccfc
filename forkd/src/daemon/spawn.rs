//! `Spawn`: a spawn's children queued on the spawner threads at once, then
//! each, as it starts, recorded (instance table, keeper), reported and
//! followed to its end.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use remotefork::pager::Prefetch;
use remotefork::SpawnOptions;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};

use super::instances::ContainerRec;
use super::spawner::{Job, SpawnError, Started};
use super::{auth, health, now_ms, Follow, InstanceRec, Service, State, Target, LOG};
use crate::pb;

/// Takes a spawn's children out of the queue count as they start, and the
/// rest if the spawn ends early.
struct Unqueue {
    state: Arc<State>,
    left: u64,
}

impl Unqueue {
    fn one(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Unqueue {
    fn drop(&mut self) {
        self.state.queued.fetch_sub(self.left, Ordering::SeqCst);
    }
}

/// The events of one spawn's children, as its client reads them.
pub(super) type SpawnEvents = ReceiverStream<Result<pb::InstanceEvent, Status>>;

/// One spawn's children: what they start from, and how.
struct Batch {
    st: Arc<State>,
    target: Target,
    count: u32,
    opts: SpawnOptions,
    prefetch: Prefetch,
    /// The input every child gets (cooperative children get a first line
    /// of their own before it).
    stdin: Arc<Vec<u8>>,
    capture_stdout: bool,
    labels: HashMap<String, String>,
    args: String,
    /// The spawning tenant ("" for the operator).
    owner: String,
    /// The uid the children run as.
    uid: u32,
    tx: mpsc::Sender<Result<pb::InstanceEvent, Status>>,
}

/// A child handed to the spawner threads, not started yet.
struct Queued {
    iid: String,
    base: pb::InstanceEvent,
    /// When it was queued: its time to running counts from here.
    t: Instant,
    /// The input it gets.
    stdin: Arc<Vec<u8>>,
}

/// The spawner's answer for a queued child, to wait for.
type Submitted = Result<oneshot::Receiver<Result<Started, SpawnError>>, SpawnError>;

impl Service {
    /// Whom a child of `target` runs as: the seed's tenant, else the
    /// spawning tenant, else the parent's user.
    fn run_as(
        &self,
        target: &Target,
        who: &auth::Principal,
    ) -> Result<Option<remotefork::RunAs>, Status> {
        if target.owner.is_empty() {
            return Ok(who.run_as());
        }
        let t = self.state.auth.tenant_named(&target.owner).ok_or_else(|| {
            Status::failed_precondition(format!(
                "seed {} belongs to tenant {:?}, which this node does not know (its children would run as whom?)",
                target.id, target.owner
            ))
        })?;
        Ok(Some(remotefork::RunAs {
            uid: t.uid,
            gid: t.gid,
        }))
    }

    /// Check a spawn, count its children into the node's queue and start
    /// them in the background (holding `work`, so a drain waits for them).
    pub(super) async fn start_spawn(
        &self,
        r: pb::SpawnRequest,
        remote: bool,
        who: &auth::Principal,
        work: health::Work,
    ) -> Result<SpawnEvents, Status> {
        let target = self
            .target_for(r.seed.as_ref(), &r.origin, remote, who)
            .await?;
        let run_as = self.run_as(&target, who)?;
        let owner = who.owner().to_string();
        let child_uid = target.restorer.image().descriptor().creds.uid[1];
        let count = if r.count == 0 { 1 } else { r.count };
        if count > 100_000 {
            return Err(Status::invalid_argument(format!(
                "count {count} is more than 100000"
            )));
        }
        // Every spawn's children wait in one queue: it has a bound.
        let before = self.state.queued.fetch_add(count as u64, Ordering::SeqCst);
        let max = self.state.max_queued;
        if before + count as u64 > max {
            self.state.queued.fetch_sub(count as u64, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "{before} children are queued on this node already and {count} more would pass its limit of {max} (--max-queued); try again when they have started, or another node"
            )));
        }
        let unqueue = Unqueue {
            state: self.state.clone(),
            left: count as u64,
        };
        // (An error drops `unqueue`, which takes the count back.)
        let (opts, prefetch) = spawn_options(&r, run_as)?;
        let (tx, rx) = mpsc::channel::<Result<pb::InstanceEvent, Status>>(1024);
        let stdin = match (r.stdin_ref.as_str(), r.stdin.is_empty()) {
            ("", _) => Arc::new(r.stdin),
            (_, false) => {
                return Err(Status::invalid_argument(
                    "give the input either inline (stdin) or staged (stdin_ref), not both",
                ))
            }
            (id, true) => self.state.input(id, who)?,
        };
        let batch = Batch {
            st: self.state.clone(),
            target,
            count,
            opts,
            prefetch,
            stdin,
            capture_stdout: r.stdout == pb::StdoutMode::Capture as i32,
            labels: r.labels,
            args: r.args,
            owner,
            uid: run_as.map_or(child_uid, |r| r.uid),
            tx,
        };
        tokio::spawn(async move {
            let _work = work;
            batch.run(unqueue).await;
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// The options children of `r` are started with, and its prefetch mode.
fn spawn_options(
    r: &pb::SpawnRequest,
    run_as: Option<remotefork::RunAs>,
) -> Result<(SpawnOptions, Prefetch), Status> {
    let prefetch = match r.prefetch.as_str() {
        "" => Prefetch::Window,
        p => p
            .parse::<Prefetch>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
    };
    let opts = SpawnOptions::default()
        .lazy(!r.eager)
        .prefetch(prefetch)
        .share(true)
        .template(!r.no_template)
        .run_as(run_as)
        .container(container_spec(r.container.as_ref())?);
    Ok((opts, prefetch))
}

impl Service {
    /// Make this node ready for children of `r` without starting one (see
    /// the PrepareSeed RPC).
    pub(super) async fn prepare_children(
        &self,
        r: pb::SpawnRequest,
        remote: bool,
        who: &auth::Principal,
    ) -> Result<pb::PrepareSeedResponse, Status> {
        let t = Instant::now();
        let target = self
            .target_for(r.seed.as_ref(), &r.origin, remote, who)
            .await?;
        let run_as = self.run_as(&target, who)?;
        let (opts, _) = spawn_options(&r, run_as)?;
        let restorer = target.restorer.clone();
        let template_built = tokio::task::spawn_blocking(move || restorer.prepare(&opts))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "seed {} cannot be prepared here: {e}",
                    target.id
                ))
            })?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        info!(target: LOG, seed = %target.id, origin = %r.origin, template_built, ms, "seed prepared");
        Ok(pb::PrepareSeedResponse {
            seed_id: target.id,
            template_built,
            ms,
        })
    }
}

impl Batch {
    /// Queue every child at once (the spawner threads take them in order,
    /// as fast as they can), then follow each in turn.
    async fn run(&self, mut unqueue: Unqueue) {
        let mut waiters = Vec::new();
        for (q, submitted) in self.queue() {
            let started = match submitted {
                Ok(wait) => wait.await.unwrap_or_else(|_| Err(SpawnError::JobDropped)),
                Err(e) => Err(e),
            };
            unqueue.one();
            if let Some(w) = self.started(q, started).await {
                waiters.push(w);
            }
        }
        for w in waiters {
            let _ = w.await;
        }
    }

    /// Hand every child to the spawner threads: each with the spawner's
    /// answer to come (or why it could not be queued).
    fn queue(&self) -> Vec<(Queued, Submitted)> {
        let st = &self.st;
        let mut queued = Vec::with_capacity(self.count as usize);
        for index in 0..self.count {
            let n = st.next_instance.fetch_add(1, Ordering::Relaxed);
            let iid = format!("{}-{}-{n}", self.target.id, st.instance_tag);
            let base = pb::InstanceEvent {
                instance_id: iid.clone(),
                seed_id: self.target.id.clone(),
                index,
                ..Default::default()
            };
            let (reply, wait) = oneshot::channel();
            let t = Instant::now();
            let stdin = if self.target.cooperative {
                // checkpoint() in the child reads this first line.
                let mut v =
                    serde_json::json!({ "instance_id": iid, "index": index, "args": self.args })
                        .to_string()
                        .into_bytes();
                v.push(b'\n');
                v.extend_from_slice(&self.stdin);
                Arc::new(v)
            } else {
                self.stdin.clone()
            };
            let job = Job {
                restorer: self.target.restorer.clone(),
                stdin: stdin.clone(),
                capture_stdout: self.capture_stdout,
                opts: self.opts,
                reply,
            };
            let submitted = st.spawner.submit(job).map(|()| wait);
            queued.push((
                Queued {
                    iid,
                    base,
                    t,
                    stdin,
                },
                submitted,
            ));
        }
        queued
    }

    /// A queued child started (or failed to): record it, report it, and
    /// follow it to its end in a task of its own, returned.
    async fn started(
        &self,
        q: Queued,
        started: Result<Started, SpawnError>,
    ) -> Option<JoinHandle<()>> {
        let st = &self.st;
        let target = &self.target;
        let Queued {
            iid,
            base,
            t,
            stdin,
        } = q;
        let (mut child, out, stdin_w) = match started {
            Ok(x) => (x.child, x.stdout, x.stdin),
            Err(e) => {
                st.spawn_failures.fetch_add(1, Ordering::Relaxed);
                let ev = pb::InstanceEvent {
                    kind: Some(pb::instance_event::Kind::Failed(pb::Failed {
                        reason: e.to_string(),
                    })),
                    ..base
                };
                st.publish(&self.tx, ev).await;
                return None;
            }
        };
        if let Some(s) = &target.local {
            s.spawned.fetch_add(1, Ordering::Relaxed);
        }
        st.spawns.fetch_add(1, Ordering::Relaxed);
        let pid = child.pid() as u32;
        info!(target: LOG, seed = %target.id, instance = %iid, pid, running_us = child.restore_time().as_micros() as u64, "child started");
        let started_unix_ms = now_ms();
        let pidfd = match child.pidfd().try_clone_to_owned() {
            Ok(p) => p,
            Err(e) => {
                // Gone already (it can exit that fast): reported as lost.
                warn!(target: LOG, instance = %iid, error = %e, "no pidfd for a new child");
                st.spawn_failures.fetch_add(1, Ordering::Relaxed);
                let ev = pb::InstanceEvent {
                    pid,
                    kind: Some(pb::instance_event::Kind::Failed(pb::Failed {
                        reason: format!("lost track of the child at its start: {e}"),
                    })),
                    ..base
                };
                st.publish(&self.tx, ev).await;
                return None;
            }
        };
        if !child.notes().is_empty() {
            st.children_with_notes.fetch_add(1, Ordering::Relaxed);
            let mut logged = st.notes_logged.lock().unwrap_or_else(|e| e.into_inner());
            for n in child.notes() {
                if logged.len() < 10_000 && logged.insert((target.id.clone(), n.clone())) {
                    warn!(target: LOG, seed = %target.id, instance = %iid, note = %n, "a child differs from its parent (said on its Running event and in ListInstances)");
                }
            }
        }
        if let Some(d) = super::handover::held_before_record() {
            tokio::time::sleep(d).await;
        }
        st.handover.child_started(
            &iid,
            base.index,
            &target.place,
            &child,
            &pidfd,
            out.as_ref(),
            &self.labels,
            self.prefetch,
            started_unix_ms,
            (&self.owner, self.uid),
        );
        if let Some(w) = stdin_w {
            st.clone().write_stdin(iid.clone(), w, stdin.clone());
        }
        let cgroup = child.take_cgroup().map(Arc::new);
        st.instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .insert(
                iid.clone(),
                InstanceRec {
                    seed_id: target.id.clone(),
                    pid,
                    state: "running".into(),
                    labels: self.labels.clone(),
                    started_unix_ms,
                    end: None,
                    adopted: false,
                    notes: child.notes().to_vec(),
                    stdout: Vec::new(),
                    stdout_bytes: 0,
                    owner: self.owner.clone(),
                    uid: self.uid,
                    container: cgroup.as_ref().map(|cg| {
                        ContainerRec::new(
                            cg.clone(),
                            &self.opts.container,
                            target.restorer.image().descriptor().container.as_ref(),
                        )
                    }),
                },
            );
        let ev = pb::InstanceEvent {
            pid,
            kind: Some(pb::instance_event::Kind::Started(pb::Started {})),
            ..base.clone()
        };
        st.publish(&self.tx, ev).await;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let ev = pb::InstanceEvent {
            pid,
            kind: Some(pb::instance_event::Kind::Running(pb::Running {
                time_to_running_ms: ms,
                notes: child.notes().to_vec(),
            })),
            ..base.clone()
        };
        st.publish(&self.tx, ev).await;
        let (st2, tx2) = (st.clone(), self.tx.clone());
        let follow = Follow {
            base,
            pid,
            pidfd,
            out,
            stats: child.stats().cloned(),
            tx: Some(tx2),
            started: t,
            ended: None,
            cgroup,
        };
        Some(tokio::spawn(async move { st2.follow(follow).await }))
    }
}

/// A container child's limits and network from a spawn request.
fn container_spec(
    c: Option<&pb::ContainerLimits>,
) -> Result<remotefork::container::ChildSpec, Status> {
    let Some(c) = c else {
        return Ok(Default::default());
    };
    if !(c.cpus == 0.0 || (0.001..=4096.0).contains(&c.cpus)) {
        return Err(Status::invalid_argument(format!(
            "container cpus {}: between 0.001 and 4096",
            c.cpus
        )));
    }
    let network = match c.network.as_str() {
        "" => Default::default(),
        n => n.parse().map_err(Status::invalid_argument)?,
    };
    Ok(remotefork::container::ChildSpec {
        limits: remotefork::container::Limits {
            memory_bytes: (c.memory_bytes > 0).then_some(c.memory_bytes),
            pids: (c.pids > 0).then_some(c.pids),
            cpu_micros: (c.cpus > 0.0).then(|| (c.cpus * 1e6).round() as u64),
        },
        network,
        upper_bytes: 0,
        host: false,
    })
}
