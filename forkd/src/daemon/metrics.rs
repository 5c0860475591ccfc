//! The node's figures: the Prometheus text exposition (`--metrics`, served
//! over HTTP here) and the memory this forkd and its children take.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::State;

/// PSS of this process and of every process it started (any thread's
/// children: instances, templates), in bytes.
pub(super) fn node_pss_bytes() -> u64 {
    let pss = |pid: &str| pid.parse().map_or(0, remotefork::procfs::pss);
    let mut total = remotefork::procfs::pss(std::process::id() as i32);
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        total += kids.split_whitespace().map(pss).sum::<u64>();
    }
    total
}

impl State {
    /// Prometheus text exposition of this node's figures.
    pub(super) fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let running = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running();
        let _ = writeln!(
            o,
            "# HELP forkd_seeds Seeds held by this node.\n# TYPE forkd_seeds gauge\nforkd_seeds {}",
            self.registry.len()
        );
        let _ = writeln!(o, "# HELP forkd_instances_running Children running.\n# TYPE forkd_instances_running gauge\nforkd_instances_running {running}");
        let _ = writeln!(o, "# HELP forkd_spawns_total Children started.\n# TYPE forkd_spawns_total counter\nforkd_spawns_total {}", self.spawns.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP forkd_spawn_failures_total Children that could not be started.\n# TYPE forkd_spawn_failures_total counter\nforkd_spawn_failures_total {}", self.spawn_failures.load(Ordering::Relaxed));
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner()).len();
        let _ = writeln!(o, "# HELP forkd_remote_seeds Other nodes' seeds this node holds (fetched, or being fetched).\n# TYPE forkd_remote_seeds gauge\nforkd_remote_seeds {remote}");
        let _ = writeln!(o, "# HELP forkd_children_queued Children asked for and not started yet (at most --max-queued).\n# TYPE forkd_children_queued gauge\nforkd_children_queued {}", self.queued.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP forkd_children_with_notes_total Children that started with notes: what they could not keep from their parent exactly.\n# TYPE forkd_children_with_notes_total counter\nforkd_children_with_notes_total {}", self.children_with_notes.load(Ordering::Relaxed));
        self.transports.metrics(&mut o);
        let seeds = self.registry.list();
        let mut started: Vec<_> = seeds
            .iter()
            .filter_map(|s| s.restorer_if_started().map(|r| (s.meta.id.clone(), r)))
            .collect();
        // Seeds of other nodes that children here page from.
        started.extend(
            self.remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                // Keyed by origin and id; labelled by id.
                .filter_map(|(k, c)| {
                    let id = k.rsplit_once('\n').map_or(k.as_str(), |x| x.1);
                    Some((id.to_string(), c.get()?.restorer.clone()))
                }),
        );
        type Get = fn(&remotefork::pager::SeedPages) -> u64;
        let per_seed: [(&str, &str, Get); 7] = [
            (
                "forkd_seed_faults_total",
                "Page faults served, per seed.",
                |p| p.metrics.faults.load(Ordering::Relaxed),
            ),
            (
                "forkd_seed_pages_installed_total",
                "Pages put into children, per seed.",
                |p| p.metrics.pages_installed.load(Ordering::Relaxed),
            ),
            (
                "forkd_seed_pages_copied_ahead_total",
                "Pages the seed's first child wrote, copied into later children before they ran.",
                |p| p.metrics.pages_copied_ahead.load(Ordering::Relaxed),
            ),
            (
                "forkd_seed_pages_touched_ahead_total",
                "Pages of the seed's working set that spare children read before their spawn.",
                |p| p.metrics.pages_touched_ahead.load(Ordering::Relaxed),
            ),
            (
                "forkd_seed_bytes_fetched_total",
                "Bytes fetched from the seed's page source into the node cache.",
                |p| p.cache.fetched.load(Ordering::Relaxed) * 4096,
            ),
            (
                "forkd_seed_fetch_round_trips_total",
                "Requests sent to the seed's node for pages.",
                |p| p.cache.round_trips(),
            ),
            (
                "forkd_seed_cache_hits_total",
                "Pages served from the node cache.",
                |p| p.cache.hits.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in per_seed {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (id, r) in &started {
                let _ = writeln!(o, "{name}{{seed=\"{id}\"}} {}", get(r.seed_pages()));
            }
        }
        let _ = writeln!(o, "# HELP forkd_seed_drained Every page children may fault on is in this node's cache (1), so they no longer need the seed's node.\n# TYPE forkd_seed_drained gauge");
        for (id, r) in &started {
            let _ = writeln!(
                o,
                "forkd_seed_drained{{seed=\"{id}\"}} {}",
                u8::from(r.drained())
            );
        }
        let _ = writeln!(o, "# HELP forkd_fault_latency_us Time to serve a page fault.\n# TYPE forkd_fault_latency_us histogram");
        for (id, r) in &started {
            let h = &r.seed_pages().metrics.fault_latency_us_log2;
            let mut cum = 0u64;
            for (i, b) in h.iter().enumerate() {
                cum += b.load(Ordering::Relaxed);
                let _ = writeln!(
                    o,
                    "forkd_fault_latency_us_bucket{{seed=\"{id}\",le=\"{}\"}} {cum}",
                    1u64 << i
                );
            }
            let _ = writeln!(o, "forkd_fault_latency_us_bucket{{seed=\"{id}\",le=\"+Inf\"}} {cum}\nforkd_fault_latency_us_count{{seed=\"{id}\"}} {cum}");
        }
        o
    }
}

/// Metrics over HTTP: `GET /metrics` answers the Prometheus text format.
pub(super) async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<State>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded), then answer.
            while n < buf.len() {
                match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf[n..]))
                    .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics") {
                ("200 OK", state.metrics_text())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let resp = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}
