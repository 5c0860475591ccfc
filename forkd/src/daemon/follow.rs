//! Following a child to its end: its output and exit as instance events,
//! to the spawn's client and to watchers; the input written to it as it
//! reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;
use tracing::info;

use super::{auth, handover, State, LOG, OUTPUT_KEPT};
use crate::pb;

/// How long a child's exit report waits for its pager's final figures.
const PAGER_FINISH_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Largest output carried whole in the `Exited` event.
const EXITED_STDOUT_MAX: usize = 1 << 20;

/// A child to follow to its end.
pub(super) struct Follow {
    pub(super) base: pb::InstanceEvent,
    pub(super) pid: u32,
    pub(super) pidfd: std::os::fd::OwnedFd,
    pub(super) out: Option<std::os::fd::OwnedFd>,
    pub(super) stats: Option<Arc<remotefork::pager::ChildStats>>,
    /// The spawn's client (none for a handed-over child: Watch only).
    pub(super) tx: Option<mpsc::Sender<Result<pb::InstanceEvent, Status>>>,
    pub(super) started: Instant,
    /// It ended already, while no forkd watched (a handed-over child).
    pub(super) ended: Option<kernel_helpers::proc::Ended>,
    /// A container child's cgroup (the instance table holds it too).
    pub(super) cgroup: Option<Arc<remotefork::container::ChildCgroup>>,
}

impl State {
    /// May `who` see this event? Its instance's owner decides, or (for a
    /// spawn that failed before there was an instance) its seed's.
    pub(super) fn event_visible(&self, ev: &pb::InstanceEvent, who: &auth::Principal) -> bool {
        if matches!(who, auth::Principal::Operator | auth::Principal::Node) {
            return true;
        }
        let owner = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(&ev.instance_id)
            .map(|i| i.owner.clone())
            .or_else(|| self.registry.get(&ev.seed_id).map(|s| s.meta.owner.clone()));
        owner.is_some_and(|o| who.may_see(&o))
    }

    pub(super) async fn publish(
        &self,
        tx: &mpsc::Sender<Result<pb::InstanceEvent, Status>>,
        ev: pb::InstanceEvent,
    ) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(ev.clone());
        }
        // The client may be gone; children run on regardless.
        let _ = tx.send(Ok(ev)).await;
    }

    /// Follow a child to its end: stream its output (kept in its file for
    /// a restart, and the start of it in the instance table), notice its
    /// end, report it, and let the keeper go of it.
    pub(super) async fn follow(self: Arc<Self>, f: Follow) {
        let Follow {
            base,
            pid,
            pidfd,
            out,
            stats,
            tx,
            started,
            ended,
            cgroup,
        } = f;
        let iid = base.instance_id.clone();
        let out_path = self.handover.out_path(&iid);
        // Read without a thread per child (a blocking reader each would
        // exhaust tokio's blocking pool at 512 children). Every chunk is
        // an Output event, in order; the first is the time to first answer.
        let reader = out.map(|fd| {
            let (st, tx, base) = (self.clone(), tx.clone(), base.clone());
            let pager = stats.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut file = handover::OutputFile::open(&out_path);
                // What an earlier forkd read already (a handed-over child).
                let mut kept = std::fs::read(&out_path).unwrap_or_default();
                let mut total = kept.len() as u64;
                kept.truncate(OUTPUT_KEPT);
                let Ok(mut r) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
                    return (kept, total);
                };
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(p) = &pager {
                        // A recording child's written set ends at its answer.
                        p.note_output();
                    }
                    let data = &buf[..n];
                    file.write(data);
                    let room = OUTPUT_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..n.min(room)]);
                    let ev = pb::InstanceEvent {
                        pid,
                        kind: Some(pb::instance_event::Kind::Output(pb::Output {
                            data: data.to_vec(),
                            since_spawn_ms: started.elapsed().as_secs_f64() * 1e3,
                            offset: total,
                        })),
                        ..base.clone()
                    };
                    total += n as u64;
                    st.publish_opt(tx.as_ref(), ev).await;
                }
                (kept, total)
            })
        });
        let ended = match ended {
            Some(e) => Ok(e),
            None => wait_pidfd(pidfd).await,
        };
        let t_end = Instant::now();
        let (stdout, stdout_bytes) = match reader {
            Some(h) => h.await.unwrap_or_default(),
            None => (Vec::new(), 0),
        };
        let output_us = t_end.elapsed().as_micros() as u64;
        let mut ex = pb::Exited {
            // Whole in the event only when small: larger output came in
            // Output events (gRPC messages are at most 4 MiB).
            stdout: if stdout_bytes <= EXITED_STDOUT_MAX as u64 {
                stdout.clone()
            } else {
                Vec::new()
            },
            stdout_bytes,
            ..Default::default()
        };
        match ended {
            Ok(kernel_helpers::proc::Ended::Exited(c)) => ex.exit_code = c,
            Ok(kernel_helpers::proc::Ended::Killed(s)) => ex.signal = s,
            Err(e) => ex.reason = format!("lost track of the child: {e}"),
        }
        if let Some(s) = &stats {
            // The pager notices the exit too, at the same moment: its
            // figures are final once it lets go (woken then, not polled).
            let finished = std::future::poll_fn(|cx| {
                if s.on_finished(cx.waker()) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            let _ = tokio::time::timeout(PAGER_FINISH_WAIT, finished).await;
            tracing::debug!(target: LOG, instance = %iid, output_us, pager_us = t_end.elapsed().as_micros() as u64, "after the child's end: its output read, the pager's figures in");
            ex.faults = s.faults.load(Ordering::Relaxed);
            ex.pages_installed = s.pages_installed.load(Ordering::Relaxed);
            if let Some(r) = s.killed_reason() {
                ex.reason = r;
            }
        }
        if let Some(cg) = &cgroup {
            cg.mark_reaped();
            if ex.signal == libc::SIGKILL && ex.reason.is_empty() && cg.oom_killed() {
                ex.reason = remotefork::ExitReason::OutOfMemory {
                    limit: cg.limits.memory_bytes.unwrap_or(0),
                }
                .to_string();
            }
        }
        self.instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end(&iid, &ex, stdout, stdout_bytes);

        self.handover.child_ended(&iid);
        info!(target: LOG, seed = %base.seed_id, instance = %iid, pid, exit_code = ex.exit_code, signal = ex.signal, reason = %ex.reason, "child ended");
        let ev = pb::InstanceEvent {
            pid,
            kind: Some(pb::instance_event::Kind::Exited(ex)),
            ..base
        };
        self.publish_opt(tx.as_ref(), ev).await;
        if let Some(cg) = cgroup {
            // Removing it waits for what its pid namespace held to go.
            let t = std::time::Instant::now();
            let _ = tokio::task::spawn_blocking(move || drop(cg)).await;
            tracing::debug!(target: LOG, instance = %iid, us = t.elapsed().as_micros() as u64, "container cgroup removed");
        }
    }

    /// Write a child's input (larger than a pipe takes at once) as it reads
    /// it. Until it is all written the keeper holds the pipe's write end too
    /// (`s/INSTANCE`): if forkd stops meanwhile the child does not see a
    /// premature end of file, and the next forkd kills it with the reason.
    pub(super) fn write_stdin(
        self: Arc<Self>,
        iid: String,
        w: std::os::fd::OwnedFd,
        data: Arc<Vec<u8>>,
    ) {
        let key = format!("s/{iid}");
        self.handover
            .hold(&key, &[std::os::fd::AsRawFd::as_raw_fd(&w)]);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            if let Ok(mut p) = tokio::net::unix::pipe::Sender::from_owned_fd(w) {
                // EPIPE: the child ended without reading it all; fine.
                let _ = p.write_all(&data).await;
            }
            self.handover.release(&key);
        });
    }

    /// [`State::publish`], to the spawn's client if there is one.
    async fn publish_opt(
        &self,
        tx: Option<&mpsc::Sender<Result<pb::InstanceEvent, Status>>>,
        ev: pb::InstanceEvent,
    ) {
        match tx {
            Some(tx) => self.publish(tx, ev).await,
            None => {
                if self.events.receiver_count() > 0 {
                    let _ = self.events.send(ev);
                }
            }
        }
    }
}

/// Wait for the process behind `pidfd` to end and reap it.
async fn wait_pidfd(pidfd: std::os::fd::OwnedFd) -> std::io::Result<kernel_helpers::proc::Ended> {
    use std::os::fd::AsRawFd;
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same
    // descriptor until the AsyncFd is dropped.
    let afd = unsafe { tokio::io::unix::AsyncFd::register(pidfd) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    loop {
        let mut g = afd.readable().await?;
        match kernel_helpers::proc::try_reap(afd.get_ref().as_raw_fd()) {
            Ok(Some(e)) => return Ok(e),
            Ok(None) => {}
            // Not our child (one an earlier forkd started): its parent
            // reaps it, the kernel keeps its status with the pidfd.
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                return match kernel_helpers::proc::pidfd_exit_status(afd.get_ref().as_raw_fd()) {
                    Ok(Some(e)) => Ok(e),
                    Ok(None) => Err(std::io::Error::other(
                        "it ended, and the kernel kept no exit status for it",
                    )),
                    Err(e) => Err(std::io::Error::other(format!(
                        "it ended; its exit status is unknown on this kernel (PIDFD_GET_INFO: {e})"
                    ))),
                };
            }
            Err(e) => return Err(e),
        }
        g.clear_ready();
    }
}
