//! The nodes the gateway places on: given (`--node`) or discovered
//! (`--discover`), each watched over forkd's health service, and drained
//! from placement when it stops serving (SIGTERM: an eviction, a rolling
//! update), stops answering, or is no longer published.
//!
//! A node takes new instances only while it is *placeable*: listed (by
//! discovery; given nodes always are) and healthy (its health service says
//! SERVING). When it stops being placeable, its idle instances are retired
//! and invocations waiting for an instance are placed elsewhere; busy
//! instances finish their invocation and are retired then. A discovered
//! node that is no longer placeable is forgotten once nothing of the
//! gateway's runs on it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::{debug, info, warn};

use super::discovery::Discoverer;
use super::{Gateway, NodeSpec};
use crate::pb;

/// Health-service failures in a row before a node counts as unreachable.
const UNREACHABLE_AFTER: u32 = 3;
/// Between attempts to reach a node's health service again.
const RETRY: Duration = Duration::from_millis(300);
/// A node with less memory available than this share of its total takes
/// no new instance.
const MIN_MEMORY_AVAILABLE: f64 = 0.05;
/// The cost of placing on a node that does not hold the seed's pages yet
/// (they come over the network, and the node fetches the descriptor
/// first), relative to one that does: it takes an instance only when its
/// load per CPU is under 1/REMOTE_COST of the best local node's.
const REMOTE_COST: f64 = 1.5;

/// What a node reported last (`NodeInfo`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Reported {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    /// Other nodes' seeds it holds in its node cache.
    pub cached_seeds: BTreeSet<String>,
    pub hostname: String,
}

/// A node as the gateway sees it.
pub(crate) struct Node {
    pub spec: NodeSpec,
    pub client: crate::client::Client,
    service: crate::client::Service,
    /// Instances placed here and not yet exited (or being started).
    pub live: AtomicUsize,
    /// Children started here.
    pub spawned: AtomicU64,
    /// Found by discovery (forgotten when no longer listed and idle).
    pub discovered: bool,
    /// Listed by discovery in its last round (given nodes: always).
    listed: AtomicBool,
    /// Its health service says SERVING (and answers).
    healthy: AtomicBool,
    /// Forgotten: no longer in the gateway's node list.
    gone: AtomicBool,
    /// Why it is not placeable, when it is not.
    why: Mutex<String>,
    reported: Mutex<Reported>,
    /// Seeds the gateway started children of here (their pages are in
    /// its node cache from then on).
    used_seeds: Mutex<BTreeSet<String>>,
}

impl Node {
    pub(crate) fn new(
        spec: NodeSpec,
        service: crate::client::Service,
        discovered: bool,
        reported: Reported,
    ) -> Node {
        Node {
            spec,
            client: pb::forkd_client::ForkdClient::new(service.clone()),
            service,
            live: AtomicUsize::new(0),
            spawned: AtomicU64::new(0),
            discovered,
            listed: AtomicBool::new(true),
            healthy: AtomicBool::new(true),
            gone: AtomicBool::new(false),
            why: Mutex::new(String::new()),
            reported: Mutex::new(reported),
            used_seeds: Mutex::new(BTreeSet::new()),
        }
    }

    /// It takes new instances.
    pub(crate) fn placeable(&self) -> bool {
        self.listed.load(Ordering::SeqCst)
            && self.healthy.load(Ordering::SeqCst)
            && !self.gone.load(Ordering::SeqCst)
    }

    /// `serving`, `draining` (not placeable, instances still on it) or
    /// `gone`.
    pub(crate) fn state(&self) -> &'static str {
        if self.gone.load(Ordering::SeqCst) {
            "gone"
        } else if self.placeable() {
            "serving"
        } else {
            "draining"
        }
    }

    /// Why it is not placeable ("" when it is).
    pub(crate) fn why(&self) -> String {
        if self.placeable() {
            String::new()
        } else {
            self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    pub(crate) fn reported(&self) -> Reported {
        self.reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What placement weighs, without copying the rest: (CPUs, memory
    /// available, memory total).
    pub(crate) fn capacity(&self) -> (u32, u64, u64) {
        let r = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        (r.cpus, r.memory_available_bytes, r.memory_bytes)
    }

    /// The seed's pages are here: it is the seed's node, or it holds the
    /// seed in its node cache.
    pub(crate) fn holds(&self, seed_id: &str) -> bool {
        self.used_seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(seed_id)
            || self
                .reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .cached_seeds
                .contains(seed_id)
    }

    /// Children of `seed_id` were started here.
    pub(crate) fn used(&self, seed_id: &str) {
        self.used_seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seed_id.to_string());
    }

    fn set_why(&self, why: &str) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why.to_string();
    }
}

/// A node the placement may choose, as [`choose`] weighs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    /// Instances on it now.
    pub live: usize,
    /// At most this many.
    pub cap: usize,
    /// Its CPUs (0: not known yet, counted as 1).
    pub cpus: u32,
    /// Memory available and total (0: not known).
    pub memory_available: u64,
    pub memory_total: u64,
    /// It holds the seed's pages.
    pub local: bool,
}

/// The candidate to place one instance on: room left, memory not short,
/// and the least load per CPU, a node without the seed's pages counted
/// [`REMOTE_COST`] times as loaded. Ties go to the first.
pub(crate) fn choose(cands: &[Candidate]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in cands.iter().enumerate() {
        if c.live >= c.cap {
            continue;
        }
        if c.memory_total > 0
            && (c.memory_available as f64) < MIN_MEMORY_AVAILABLE * c.memory_total as f64
        {
            continue;
        }
        let mut cost = (c.live + 1) as f64 / c.cpus.max(1) as f64;
        if !c.local {
            cost *= REMOTE_COST;
        }
        if best.is_none_or(|(_, b)| cost < b) {
            best = Some((i, cost));
        }
    }
    best.map(|(i, _)| i)
}

impl Gateway {
    /// The nodes now (placeable or draining).
    pub(crate) fn node_list(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn find_node(&self, addr: &str) -> Option<Arc<Node>> {
        self.node_list().into_iter().find(|n| n.spec.addr == addr)
    }
}

/// Connect to a node and ask what it is.
pub(crate) async fn connect(
    spec: &NodeSpec,
    token: Option<&str>,
    discovered: bool,
) -> Result<Node, String> {
    let service = tokio::time::timeout(
        Duration::from_secs(5),
        crate::client::connect_service(&spec.addr, token),
    )
    .await
    .map_err(|_| "no connection within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    let mut c = pb::forkd_client::ForkdClient::new(service.clone());
    let info = tokio::time::timeout(
        Duration::from_secs(5),
        c.node_info(pb::NodeInfoRequest { skip_pss: true }),
    )
    .await
    .map_err(|_| "no NodeInfo answer within 5 s".to_string())?
    .map_err(|e| e.message().to_string())?
    .into_inner();
    if info.draining {
        return Err("it is shutting down".into());
    }
    Ok(Node::new(
        spec.clone(),
        service,
        discovered,
        reported(&info),
    ))
}

fn reported(i: &pb::NodeInfoResponse) -> Reported {
    Reported {
        cpus: i.cpus,
        memory_bytes: i.memory_bytes,
        memory_available_bytes: i.memory_available_bytes,
        cached_seeds: i.cached_seeds.iter().cloned().collect(),
        hostname: i.hostname.clone(),
    }
}

/// Add a connected node and start watching it.
pub(crate) fn add(g: &Arc<Gateway>, n: Node) -> Arc<Node> {
    let n = Arc::new(n);
    g.nodes
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push(n.clone());
    info!(node = %n.spec.addr, host = %n.reported().hostname, discovered = n.discovered, "node added");
    tokio::spawn(watch(g.clone(), n.clone()));
    // Waiting invocations may have a node now.
    for f in g.function_list() {
        super::pool::wake(&f);
    }
    n
}

/// Take the node out of placement, saying why; the pool retires its idle
/// instances and places waiting invocations elsewhere.
fn unplace(g: &Arc<Gateway>, n: &Arc<Node>, flag: &AtomicBool, why: &str) {
    let was = n.placeable();
    flag.store(false, Ordering::SeqCst);
    if was {
        n.set_why(why);
        warn!(node = %n.spec.addr, live = n.live.load(Ordering::Relaxed), "{why}: draining it from placement");
        super::pool::node_drained(g, n);
    }
}

fn replace(g: &Arc<Gateway>, n: &Arc<Node>, flag: &AtomicBool) {
    let was = n.placeable();
    flag.store(true, Ordering::SeqCst);
    if !was && n.placeable() {
        info!(node = %n.spec.addr, "node placeable again");
        for f in g.function_list() {
            super::pool::wake(&f);
        }
    }
}

/// A `Spawn` on `n` was refused or broke in a way that says the node is
/// going away: out of placement until its health service says SERVING
/// again.
pub(crate) fn lost(g: &Arc<Gateway>, n: &Arc<Node>, why: &str) {
    unplace(
        g,
        n,
        &n.healthy,
        &format!("node refused or broke a spawn ({why})"),
    );
}

/// Forget a discovered node that is not placeable and runs nothing of
/// ours. True when it was forgotten.
fn forget_if_idle(g: &Gateway, n: &Arc<Node>) -> bool {
    if !n.discovered || n.placeable() || n.live.load(Ordering::SeqCst) > 0 {
        return false;
    }
    if n.gone.swap(true, Ordering::SeqCst) {
        return true;
    }
    g.nodes
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|m| !Arc::ptr_eq(m, n));
    info!(node = %n.spec.addr, why = %n.why(), "node drained and forgotten");
    true
}

/// Watch a node until it is forgotten: its health (Watch on
/// `forkd.v1.Forkd`, so a SIGTERM is seen at once) and, every `poll`, what
/// it reports for placement.
async fn watch(g: Arc<Gateway>, n: Arc<Node>) {
    let poll = g.cfg.node_poll;
    let mut failures = 0u32;
    loop {
        if n.gone.load(Ordering::SeqCst) || forget_if_idle(&g, &n) {
            return;
        }
        let mut h = HealthClient::new(n.service.clone());
        let stream = h
            .watch(HealthCheckRequest {
                service: crate::daemon::health::SERVICE.into(),
            })
            .await;
        let mut s = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                failures += 1;
                debug!(node = %n.spec.addr, failures, "health watch: {}", e.message());
                if failures >= UNREACHABLE_AFTER {
                    let why = format!("node unreachable ({})", e.message());
                    unplace(&g, &n, &n.healthy, &why);
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        failures = 0;
        // What the health service said last on this stream.
        let mut serving = false;
        let mut tick = tokio::time::interval(poll);
        loop {
            tokio::select! {
                m = s.message() => match m {
                    Ok(Some(r)) => {
                        serving = r.status == ServingStatus::Serving as i32;
                        if serving {
                            replace(&g, &n, &n.healthy);
                        } else {
                            unplace(&g, &n, &n.healthy, "forkd reports NOT_SERVING (shutting down)");
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                _ = tick.tick() => {
                    if forget_if_idle(&g, &n) {
                        return;
                    }
                    let mut c = n.client.clone();
                    if let Ok(Ok(i)) = tokio::time::timeout(poll.max(Duration::from_secs(1)), c.node_info(pb::NodeInfoRequest { skip_pss: true })).await {
                        let i = i.into_inner();
                        *n.reported.lock().unwrap_or_else(|e| e.into_inner()) = reported(&i);
                        if i.draining {
                            unplace(&g, &n, &n.healthy, "forkd reports it is shutting down");
                        } else if serving {
                            // Taken out after a failed spawn, yet serving:
                            // back in.
                            replace(&g, &n, &n.healthy);
                        }
                    }
                }
            }
        }
        // The stream ended: forkd stopped, or the connection broke.
        failures += 1;
        tokio::time::sleep(RETRY).await;
    }
}

/// Ask `d` for the nodes every `interval`, forever: add the new ones,
/// drain the ones no longer listed, take back the ones listed again. A
/// round that fails changes nothing (a DNS outage drains no node).
pub(crate) async fn discover(g: Arc<Gateway>, d: Discoverer) {
    let mut last_error: Option<(String, Instant)> = None;
    let mut connecting: BTreeSet<String> = BTreeSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        while let Ok(a) = done_rx.try_recv() {
            connecting.remove(&a);
        }
        match d.nodes().await {
            Ok(addrs) => {
                last_error = None;
                for n in g.node_list().iter().filter(|n| n.discovered) {
                    if addrs.contains(&n.spec.addr) {
                        replace(&g, n, &n.listed);
                    } else {
                        unplace(
                            &g,
                            n,
                            &n.listed,
                            &format!("no longer listed by {}", d.source()),
                        );
                        forget_if_idle(&g, n);
                    }
                }
                for a in addrs {
                    if g.find_node(&a).is_some() || connecting.contains(&a) {
                        continue;
                    }
                    connecting.insert(a.clone());
                    let (g, done) = (g.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let spec: NodeSpec = match a.parse() {
                            Ok(s) => s,
                            Err(e) => {
                                warn!("discovered node {a}: {e}");
                                let _ = done.send(a);
                                return;
                            }
                        };
                        match connect(&spec, g.cfg.token.as_deref(), true).await {
                            // Delisted while connecting (a slow connect can
                            // outlive a round): the next round drains it.
                            Ok(n) => {
                                add(&g, n);
                            }
                            Err(e) => debug!(node = %a, "discovered node not ready yet: {e}"),
                        }
                        let _ = done.send(a);
                    });
                }
            }
            Err(e) => {
                let msg = e.to_string();
                // Said once a minute while it lasts, not every round.
                if last_error
                    .as_ref()
                    .is_none_or(|(m, t)| *m != msg || t.elapsed() > Duration::from_secs(60))
                {
                    warn!(source = %d.source(), "discovery failed; keeping the nodes known: {msg}");
                    last_error = Some((msg, Instant::now()));
                }
            }
        }
        tokio::time::sleep(g.cfg.discover_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(live: usize, cpus: u32, local: bool) -> Candidate {
        Candidate {
            live,
            cap: 100,
            cpus,
            memory_available: 0,
            memory_total: 0,
            local,
        }
    }

    #[test]
    fn least_load_per_cpu_wins() {
        assert_eq!(choose(&[c(3, 1, true), c(1, 1, true)]), Some(1));
        // Four CPUs carry four times the load.
        assert_eq!(choose(&[c(2, 1, true), c(6, 4, true)]), Some(1));
        // Ties: the first.
        assert_eq!(choose(&[c(1, 1, true), c(1, 1, true)]), Some(0));
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn the_seed_s_node_is_preferred_until_it_is_loaded() {
        // Equal load: the node holding the pages.
        assert_eq!(choose(&[c(0, 1, false), c(0, 1, true)]), Some(1));
        // Remote wins once the local node carries 1.5x the load.
        assert_eq!(choose(&[c(2, 1, false), c(3, 1, true)]), Some(1));
        assert_eq!(choose(&[c(1, 1, false), c(3, 1, true)]), Some(0));
    }

    #[test]
    fn full_or_short_of_memory_nodes_take_nothing() {
        let mut full = c(0, 1, true);
        full.cap = 0;
        let mut short = c(0, 1, true);
        short.memory_total = 1000;
        short.memory_available = 10;
        assert_eq!(choose(&[full, short, c(50, 1, false)]), Some(2));
        assert_eq!(choose(&[full, short]), None);
    }
}
