//! A function's instances: the idle pool, the invocations waiting for an
//! instance, the spawner that turns waiting invocations into children on
//! the least-loaded nodes, and the worker port instances connect back to.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tracing::{debug, info, warn};

use super::nodes::{self, Candidate, Node};
use super::{Gateway, InvokeError};
use crate::pb;

/// Tries of one invocation whose instance's node went away under it (or
/// refused to start one because it is shutting down) before it fails.
const ATTEMPTS: usize = 3;

/// Longest line an instance may send (a result), and the hello's deadline.
const MAX_LINE: u64 = 64 << 20;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit reasons remembered per function, at most.
const EXITS_KEPT: usize = 4096;

/// How a function's children serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Made by `checkpoint()`: children connect back and serve many
    /// invocations over their connection.
    Checkpoint,
    /// Captured at a ready line: each child reads one event on stdin and
    /// prints its result.
    OneShot,
}

/// A connected instance, idle or serving one invocation.
pub(crate) struct Instance {
    id: String,
    node: Arc<Node>,
    pages_from: Arc<Node>,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    idle_since: Instant,
    served: u64,
}

type Waiter = oneshot::Sender<Result<Instance, String>>;

/// A started child, as the pool knows it.
struct Started {
    /// Its node.
    node: Arc<Node>,
    /// The node its pages come from (the seed's, when it was started).
    pages_from: Arc<Node>,
    /// It said hello.
    connected: bool,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Instance>,
    waiters: VecDeque<Waiter>,
    /// Children asked for and not yet connected, failed or exited.
    starting: usize,
    /// Started children not yet ended.
    started: HashMap<String, Started>,
    exits: HashMap<String, String>,
}

/// Counters of one function.
#[derive(Default)]
struct Stats {
    invocations: AtomicU64,
    ok: AtomicU64,
    handler_errors: AtomicU64,
    crashed: AtomicU64,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    spawned: AtomicU64,
    spawn_failures: AtomicU64,
    reused: AtomicU64,
    /// Invocations tried again because their node went away.
    retried: AtomicU64,
}

/// A registered function.
pub struct Function {
    /// Its name.
    pub name: String,
    /// How its children serve.
    pub mode: Mode,
    /// Its seed, and the node holding it.
    seed: Mutex<(pb::SeedRef, Arc<Node>)>,
    /// How it was registered, to make its seed again on another node when
    /// the seed's node goes away.
    spec: super::register::FunctionSpec,
    tenant: Option<Arc<crate::daemon::auth::Tenant>>,
    /// A new seed is being made.
    remaking: std::sync::atomic::AtomicBool,
    /// Idle instances are kept this long.
    pub keep_alive: Duration,
    /// One invocation may take this long.
    pub timeout: Duration,
    /// How long making the seed took.
    pub register_ms: f64,
    pool: Mutex<Pool>,
    wake: Notify,
    stats: Stats,
    /// What preparing its seed on each node gave (see
    /// [`prepare_everywhere`]), as JSON for `GET /functions`.
    prepared: Mutex<Vec<Value>>,
    next_call: AtomicU64,
}

impl Function {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        mode: Mode,
        seed: (pb::SeedRef, Arc<Node>),
        spec: super::register::FunctionSpec,
        tenant: Option<Arc<crate::daemon::auth::Tenant>>,
        keep_alive: Duration,
        timeout: Duration,
        register_ms: f64,
    ) -> Function {
        Function {
            name,
            mode,
            seed: Mutex::new(seed),
            spec,
            tenant,
            remaking: Default::default(),
            keep_alive,
            timeout,
            register_ms,
            pool: Mutex::new(Pool::default()),
            wake: Notify::new(),
            stats: Stats::default(),
            prepared: Mutex::new(Vec::new()),
            next_call: AtomicU64::new(1),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its seed and the node holding it, now.
    pub(crate) fn seed(&self) -> (pb::SeedRef, Arc<Node>) {
        self.seed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The function as JSON (for `GET /functions`).
    pub fn describe(&self) -> Value {
        let (seed, origin) = self.seed();
        let p = self.pool();
        let s = &self.stats;
        json!({
            "name": self.name,
            "mode": match self.mode { Mode::Checkpoint => "checkpoint", Mode::OneShot => "one-shot" },
            "seed": seed.id,
            "seed_node": origin.spec.addr,
            "register_ms": self.register_ms,
            "keep_alive_ms": self.keep_alive.as_millis() as u64,
            "timeout_ms": self.timeout.as_millis() as u64,
            "idle": p.idle.len(),
            "waiting": p.waiters.len(),
            "starting": p.starting,
            "invocations": s.invocations.load(Ordering::Relaxed),
            "ok": s.ok.load(Ordering::Relaxed),
            "spawned": s.spawned.load(Ordering::Relaxed),
            "reused": s.reused.load(Ordering::Relaxed),
            "retried": s.retried.load(Ordering::Relaxed),
            "prepared": *self.prepared.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// Append this function's Prometheus lines.
    pub fn metrics(&self, out: &mut String) {
        let s = &self.stats;
        let n = &self.name;
        for (outcome, v) in [
            ("ok", &s.ok),
            ("handler_error", &s.handler_errors),
            ("crashed", &s.crashed),
            ("timeout", &s.timeouts),
            ("unavailable", &s.unavailable),
        ] {
            out.push_str(&format!(
                "gateway_invocations_total{{function=\"{n}\",outcome=\"{outcome}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        let p = self.pool();
        out.push_str(&format!(
            "gateway_instances_spawned_total{{function=\"{n}\"}} {}\n\
             gateway_spawn_failures_total{{function=\"{n}\"}} {}\n\
             gateway_instances_reused_total{{function=\"{n}\"}} {}\n\
             gateway_invocations_retried_total{{function=\"{n}\"}} {}\n\
             gateway_instances_idle{{function=\"{n}\"}} {}\n\
             gateway_invocations_waiting{{function=\"{n}\"}} {}\n",
            s.spawned.load(Ordering::Relaxed),
            s.spawn_failures.load(Ordering::Relaxed),
            s.reused.load(Ordering::Relaxed),
            s.retried.load(Ordering::Relaxed),
            p.idle.len(),
            p.waiters.len(),
        ));
    }

    /// Tell every idle instance to exit.
    pub async fn retire_all(&self) {
        let idle = std::mem::take(&mut self.pool().idle);
        for i in idle {
            retire(i).await;
        }
    }

    /// Give a connected instance to the oldest waiting invocation, or
    /// keep it idle. `fresh`: it has just connected, so it no longer counts
    /// as starting; that and taking its waiter happen under one lock, or
    /// the spawner could see the waiter still unserved and start another.
    fn deliver(&self, mut inst: Instance, fresh: bool) {
        let mut fresh = fresh;
        loop {
            let tx = {
                let mut p = self.pool();
                if std::mem::take(&mut fresh) {
                    p.starting -= 1;
                }
                match p.waiters.pop_front() {
                    Some(tx) => tx,
                    // Kept idle, unless its node is draining: forkd waits
                    // for its children before it exits. Checked under the
                    // pool's lock, which `node_drained` takes after the
                    // node stops being placeable: an instance is either
                    // seen there or retired here.
                    None if inst.node.placeable() => {
                        inst.idle_since = Instant::now();
                        p.idle.push(inst);
                        return;
                    }
                    None => {
                        drop(p);
                        debug!(instance = %inst.id, node = %inst.node.spec.addr, "retiring an instance of a draining node");
                        tokio::spawn(retire(inst));
                        return;
                    }
                }
            };
            match tx.send(Ok(inst)) {
                Ok(()) => return,
                // That invocation gave up waiting: try the next.
                Err(Ok(back)) => inst = back,
                Err(Err(_)) => return,
            }
        }
    }

    /// Fail the oldest waiting invocation with `reason`.
    fn fail_one(&self, reason: &str) {
        loop {
            let Some(tx) = self.pool().waiters.pop_front() else {
                return;
            };
            if tx.send(Err(reason.to_string())).is_ok() {
                return;
            }
        }
    }

    fn exit_reason(&self, id: &str) -> Option<String> {
        self.pool().exits.get(id).cloned()
    }
}

async fn retire(mut i: Instance) {
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        i.writer.write_all(b"{\"exit\": true}\n"),
    )
    .await;
}

async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = r.take(MAX_LINE).read_line(&mut line).await?;
    Ok((n > 0 && line.ends_with('\n')).then_some(line))
}

/// Run one invocation.
pub(crate) async fn invoke(
    g: &Arc<Gateway>,
    f: &Arc<Function>,
    event: Value,
) -> Result<Value, InvokeError> {
    f.stats.invocations.fetch_add(1, Ordering::Relaxed);
    let r = match f.mode {
        Mode::Checkpoint => invoke_connected(g, f, event).await,
        Mode::OneShot => invoke_one_shot(g, f, event).await,
    };
    let counter = match &r {
        Ok(_) => &f.stats.ok,
        Err(InvokeError::Handler(_)) => &f.stats.handler_errors,
        Err(InvokeError::Crashed(_)) => &f.stats.crashed,
        Err(InvokeError::Timeout(_)) => &f.stats.timeouts,
        Err(_) => &f.stats.unavailable,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    r
}

async fn acquire(g: &Gateway, f: &Function) -> Result<Instance, InvokeError> {
    let rx = {
        let mut p = f.pool();
        if let Some(mut i) = p.idle.pop() {
            i.served += 1;
            f.stats.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(i);
        }
        if p.waiters.len() >= g.cfg.max_queue {
            return Err(InvokeError::Unavailable(format!(
                "{} invocations of {} are already waiting for an instance; try again later",
                p.waiters.len(),
                f.name
            )));
        }
        let (tx, rx) = oneshot::channel();
        p.waiters.push_back(tx);
        rx
    };
    f.wake.notify_one();
    let wait = g.cfg.queue_timeout + g.cfg.ready_timeout;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(i))) => Ok(i),
        Ok(Ok(Err(reason))) => Err(InvokeError::Unavailable(reason)),
        Ok(Err(_)) => Err(InvokeError::Unavailable("the gateway is stopping".into())),
        Err(_) => Err(InvokeError::Unavailable(format!(
            "no instance of {} became free within {} ms (nodes at capacity: {} instances each)",
            f.name,
            wait.as_millis(),
            g.cfg.max_instances_per_node
        ))),
    }
}

/// One try of an invocation: its outcome, or why it should be tried again
/// (its node went away under it).
type Try = Result<Result<Value, InvokeError>, String>;

/// Run `one` up to [`ATTEMPTS`] times while its node goes away under it.
async fn with_retries<'a, F, Fut>(f: &'a Function, mut one: F) -> Result<Value, InvokeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Try> + 'a,
{
    let mut attempt = 1;
    loop {
        match one().await {
            Ok(r) => return r,
            Err(why) if attempt < ATTEMPTS => {
                attempt += 1;
                f.stats.retried.fetch_add(1, Ordering::Relaxed);
                info!(function = %f.name, attempt, "{why}; trying the invocation on another node");
            }
            Err(why) => {
                return Err(InvokeError::Unavailable(format!(
                    "{why}, {ATTEMPTS} times in a row"
                )))
            }
        }
    }
}

async fn invoke_connected(
    g: &Arc<Gateway>,
    f: &Arc<Function>,
    event: Value,
) -> Result<Value, InvokeError> {
    with_retries(f, || try_connected(g, f, &event)).await
}

async fn try_connected(g: &Arc<Gateway>, f: &Arc<Function>, event: &Value) -> Try {
    let mut inst = match acquire(g, f).await {
        Ok(i) => i,
        Err(e) => return Ok(Err(e)),
    };
    let call = f.next_call.fetch_add(1, Ordering::Relaxed);
    let mut msg = json!({ "id": call, "event": event }).to_string();
    msg.push('\n');
    let exchange = async {
        inst.writer.write_all(msg.as_bytes()).await?;
        read_line(&mut inst.reader).await
    };
    let answer = match tokio::time::timeout(f.timeout, exchange).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) | Ok(Err(_)) => {
            // The connection broke: the instance died. forkd's exit event
            // says how, usually within a moment; or its node went away.
            let mut reason = None;
            for _ in 0..50 {
                reason = f.exit_reason(&inst.id);
                if reason.is_some() || !inst.node.placeable() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let reason = reason.unwrap_or_else(|| "its connection closed".into());
            let from = &inst.pages_from;
            if !from.placeable() && !Arc::ptr_eq(from, &inst.node) {
                return Err(format!(
                    "instance {} ended mid-invocation while the seed's node {} went away ({}): {reason}",
                    inst.id,
                    from.spec.addr,
                    from.why()
                ));
            }
            if !inst.node.placeable() {
                return Err(format!(
                    "instance {} on node {} ({}) ended mid-invocation: {reason}",
                    inst.id,
                    inst.node.spec.addr,
                    inst.node.why()
                ));
            }
            warn!(function = %f.name, instance = %inst.id, %reason, "instance crashed");
            return Ok(Err(InvokeError::Crashed(format!(
                "instance {}: {reason}",
                inst.id
            ))));
        }
        Err(_) => {
            warn!(function = %f.name, instance = %inst.id, "handler timed out; killing the instance");
            let mut c = inst.node.client.clone();
            if let Err(e) = c
                .kill_instance(pb::KillInstanceRequest {
                    instance_id: inst.id.clone(),
                })
                .await
            {
                warn!(instance = %inst.id, "kill: {}", e.message());
            }
            return Ok(Err(InvokeError::Timeout(f.timeout.as_millis())));
        }
    };
    let v: Value = match serde_json::from_str(&answer) {
        Ok(v) => v,
        Err(e) => {
            return Ok(Err(InvokeError::Crashed(format!(
                "instance {} answered something that is not JSON: {e}",
                inst.id
            ))))
        }
    };
    if v.get("id").and_then(Value::as_u64) != Some(call) {
        return Ok(Err(InvokeError::Crashed(format!(
            "instance {} answered call {:?}, not {call}",
            inst.id,
            v.get("id")
        ))));
    }
    // The instance is healthy either way: back to the pool, unless its
    // node is being drained.
    if f.keep_alive.is_zero() || !inst.node.placeable() {
        retire(inst).await;
    } else {
        f.deliver(inst, false);
    }
    Ok(handler_answer(&v))
}

/// The runtime's answer, `{"ok": true, "result": ...}` or `{"ok": false,
/// "error": "..."}`, as the invocation's outcome.
fn handler_answer(v: &Value) -> Result<Value, InvokeError> {
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(InvokeError::Handler(
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error given")
                .to_string(),
        ))
    }
}

/// The node to start one more instance of `f` on, counted as taken: a
/// placeable node with room, the least loaded per CPU, preferring the
/// nodes that hold the seed's pages ([`nodes::choose`]).
fn place(g: &Gateway, f: &Function) -> Option<Arc<Node>> {
    let (seed, origin) = f.seed();
    let cap = g.cfg.max_instances_per_node;
    let nodes: Vec<Arc<Node>> = g
        .node_list()
        .into_iter()
        .filter(|n| n.placeable())
        // Other nodes page from the seed's node: it must be reachable.
        .filter(|n| Arc::ptr_eq(n, &origin) || origin.spec.peer.is_some())
        .collect();
    let cands: Vec<Candidate> = nodes
        .iter()
        .map(|n| {
            let (cpus, memory_available, memory_total) = n.capacity();
            Candidate {
                live: n.live.load(Ordering::Relaxed),
                cap,
                cpus,
                memory_available,
                memory_total,
                local: Arc::ptr_eq(n, &origin) || n.holds(&seed.id),
            }
        })
        .collect();
    let n = nodes.into_iter().nth(nodes::choose(&cands)?)?;
    n.live.fetch_add(1, Ordering::Relaxed);
    Some(n)
}

fn spawn_request(f: &Function, node: &Node, count: u32) -> pb::SpawnRequest {
    let (seed, origin) = f.seed();
    let origin = if std::ptr::eq(node, &*origin) {
        String::new()
    } else {
        origin.spec.peer.clone().unwrap_or_default()
    };
    pb::SpawnRequest {
        seed: Some(seed),
        count,
        prefetch: String::new(),
        origin,
        labels: [("gateway-function".to_string(), f.name.clone())].into(),
        ..Default::default()
    }
}

/// How long preparing a seed on one node may take (a container seed's
/// rootfs may have to come over first).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);

/// Make every placeable node ready to start `f`'s instances at once
/// (forkd's `PrepareSeed`: another node's seed descriptor and container
/// rootfs fetched, the node's template built and its spare forked), all
/// nodes together, so that the first invocations after a registration do
/// not wait for that, nor compete with it for the CPUs. Waits for them up
/// to `--prepare-wait-ms`; those still preparing then go on in the
/// background (`"state": "preparing"` in the function's `prepared` until
/// they are done). A node that cannot is logged and noted there; its first
/// spawn does the work instead, as before.
pub(crate) async fn prepare_everywhere(g: &Gateway, f: &Arc<Function>) {
    let t = Instant::now();
    let nodes: Vec<Arc<Node>> = g
        .node_list()
        .into_iter()
        .filter(|n| n.placeable())
        .collect();
    *f.prepared.lock().unwrap_or_else(|e| e.into_inner()) = nodes
        .iter()
        .map(|n| json!({ "node": n.spec.addr, "state": "preparing" }))
        .collect();
    let calls: Vec<_> = nodes
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let mut req = spawn_request(f, &n, 0);
            req.prefetch = g.cfg.prefetch.clone();
            req.labels.clear();
            let mut c = n.client.clone();
            let f = f.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(PREPARE_TIMEOUT, c.prepare_seed(req)).await;
                let addr = n.spec.addr.clone();
                let name = &f.name;
                let v = match r {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        json!({ "node": addr, "state": "ready", "ms": r.ms, "template_built": r.template_built })
                    }
                    Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => {
                        json!({ "node": addr, "state": "failed", "error": "this forkd cannot prepare seeds (an older version); its first spawn fetches what it needs" })
                    }
                    Ok(Err(e)) => {
                        warn!(function = %name, node = %addr, error = %e.message(), "could not prepare the seed on a node; its first spawn will");
                        json!({ "node": addr, "state": "failed", "error": e.message() })
                    }
                    Err(_) => {
                        warn!(function = %name, node = %addr, "preparing the seed on a node took over {PREPARE_TIMEOUT:?}; its first spawn will go on with it");
                        json!({ "node": addr, "state": "failed", "error": format!("no answer in {PREPARE_TIMEOUT:?}") })
                    }
                };
                if let Some(slot) = f
                    .prepared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(i)
                {
                    *slot = v;
                }
            })
        })
        .collect();
    let n = calls.len();
    let all = async {
        for c in calls {
            let _ = c.await;
        }
    };
    let wait = g.cfg.prepare_wait;
    if tokio::time::timeout(wait, all).await.is_err() {
        warn!(function = %f.name, "some nodes are still preparing the seed after {wait:?}; the function is served meanwhile");
    }
    info!(function = %f.name, nodes = n, ms = t.elapsed().as_millis() as u64, "seed prepared on the nodes");
}

/// Whether a refused or broken `Spawn` on `n` says the node is going away
/// (shutting down, unreachable), so the children it was for belong on
/// another node; the node is drained from placement then.
fn node_lost(g: &Arc<Gateway>, n: &Arc<Node>, s: &tonic::Status) -> bool {
    use tonic::Code;
    let lost = matches!(
        s.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    ) || !n.placeable();
    if lost {
        nodes::lost(g, n, s.message());
    }
    lost
}

async fn invoke_one_shot(
    g: &Arc<Gateway>,
    f: &Arc<Function>,
    event: Value,
) -> Result<Value, InvokeError> {
    with_retries(f, || try_one_shot(g, f, &event)).await
}

async fn try_one_shot(g: &Arc<Gateway>, f: &Arc<Function>, event: &Value) -> Try {
    let deadline = Instant::now() + g.cfg.queue_timeout;
    let n = loop {
        if let Some(n) = place(g, f) {
            break n;
        }
        if Instant::now() >= deadline {
            return Ok(Err(InvokeError::Unavailable(if g.node_list().is_empty() {
                "no forkd node is known (none given, none discovered yet)".to_string()
            } else {
                format!(
                    "every node is at its limit of {} instances or is draining",
                    g.cfg.max_instances_per_node
                )
            })));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The node its pages come from: a child killed because that node went
    // away mid-run is tried again too.
    let pages_from = f.seed().1;
    let mut req = spawn_request(f, &n, 1);
    req.prefetch = g.cfg.prefetch.clone();
    req.stdin = format!("{event}\n").into_bytes();
    req.stdout = pb::StdoutMode::Capture as i32;
    let mut c = n.client.clone();
    // The started child's id (read after a timeout, to kill it).
    let mut id = String::new();
    let seed_id = req.seed.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    // Ok: the child's end; Err(Ok): the invocation's failure; Err(Err):
    // the node went away, try another.
    let run = async {
        let mut s = match c.spawn(req).await {
            Ok(s) => s.into_inner(),
            Err(e) if node_lost(g, &n, &e) => {
                return Err(Err(format!(
                    "node {} refused the instance: {}",
                    n.spec.addr,
                    e.message()
                )))
            }
            Err(e) => return Err(Ok(InvokeError::Unavailable(e.message().to_string()))),
        };
        loop {
            let ev = match s.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) if !n.placeable() => {
                    return Err(Err(format!(
                        "node {} went away mid-invocation",
                        n.spec.addr
                    )))
                }
                Ok(None) => {
                    return Err(Ok(InvokeError::Crashed(
                        "the node stopped reporting".into(),
                    )))
                }
                Err(e) if node_lost(g, &n, &e) => {
                    return Err(Err(format!(
                        "node {} went away mid-invocation: {}",
                        n.spec.addr,
                        e.message()
                    )))
                }
                Err(e) => return Err(Ok(InvokeError::Crashed(e.message().to_string()))),
            };
            match ev.kind {
                Some(pb::instance_event::Kind::Started(_)) => {
                    id = ev.instance_id;
                    n.spawned.fetch_add(1, Ordering::Relaxed);
                    n.used(&seed_id);
                    f.stats.spawned.fetch_add(1, Ordering::Relaxed);
                }
                Some(pb::instance_event::Kind::Failed(x)) => {
                    f.stats.spawn_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(Ok(InvokeError::Unavailable(format!(
                        "no instance could be started: {}",
                        x.reason
                    ))));
                }
                Some(pb::instance_event::Kind::Exited(x)) => return Ok(x),
                _ => {}
            }
        }
    };
    let r = tokio::time::timeout(f.timeout, run).await;
    n.live.fetch_sub(1, Ordering::Relaxed);
    let x = match r {
        Ok(Ok(x)) => x,
        Ok(Err(Ok(e))) => return Ok(Err(e)),
        Ok(Err(Err(why))) => return Err(why),
        Err(_) => {
            if !id.is_empty() {
                warn!(function = %f.name, instance = %id, "handler timed out; killing the instance");
                let mut c = n.client.clone();
                let _ = c
                    .kill_instance(pb::KillInstanceRequest { instance_id: id })
                    .await;
            }
            return Ok(Err(InvokeError::Timeout(f.timeout.as_millis())));
        }
    };
    let out = String::from_utf8_lossy(&x.stdout);
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let v: Option<Value> = serde_json::from_str(last).ok();
    let crashed =
        !matches!(&v, Some(v) if v.get("ok").is_some() || (x.exit_code == 0 && x.signal == 0));
    if crashed && !Arc::ptr_eq(&pages_from, &n) && !pages_from.placeable() {
        return Err(format!(
            "instance {id} ended with {} while the seed's node {} went away ({})",
            describe_exit(&x),
            pages_from.spec.addr,
            pages_from.why()
        ));
    }
    Ok(match v {
        Some(v) if v.get("ok").is_some() => handler_answer(&v),
        Some(v) if x.exit_code == 0 && x.signal == 0 => Ok(v),
        _ => Err(InvokeError::Crashed(format!(
            "instance {id} ended with {} without a JSON answer{}",
            describe_exit(&x),
            if x.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", x.reason)
            }
        ))),
    })
}

fn describe_exit(x: &pb::Exited) -> String {
    if x.signal != 0 {
        format!("signal {}", x.signal)
    } else {
        format!("exit status {}", x.exit_code)
    }
}

/// Turns waiting invocations into children, forever (one task per function).
pub(crate) async fn spawner(g: Arc<Gateway>, f: Arc<Function>) {
    if f.mode == Mode::OneShot {
        return;
    }
    loop {
        f.wake.notified().await;
        if !g
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&f.name)
        {
            return;
        }
        // Children needed: waiting invocations no starting child will serve.
        let need = {
            let mut p = f.pool();
            p.waiters.retain(|w| !w.is_closed());
            p.waiters.len().saturating_sub(p.starting)
        };
        if need == 0 {
            continue;
        }
        let mut per_node: Vec<(Arc<Node>, u32)> = Vec::new();
        let mut placed = 0;
        for _ in 0..need {
            match place(&g, &f) {
                Some(n) => {
                    match per_node.iter_mut().find(|(m, _)| Arc::ptr_eq(m, &n)) {
                        Some((_, k)) => *k += 1,
                        None => per_node.push((n, 1)),
                    }
                    placed += 1;
                }
                None => break,
            }
        }
        if placed < need {
            debug!(function = %f.name, need, placed, "nodes at capacity; the rest wait for idle instances");
        }
        f.pool().starting += placed;
        for (node, mut k) in per_node {
            while k > 0 {
                let batch = k.min(g.cfg.spawn_batch.max(1));
                k -= batch;
                tokio::spawn(spawn_batch(g.clone(), f.clone(), node.clone(), batch));
            }
        }
    }
}

/// One `Spawn` call of `count` children on `node`, followed to its end.
async fn spawn_batch(g: Arc<Gateway>, f: Arc<Function>, node: Arc<Node>, count: u32) {
    let n = &node;
    let pages_from = f.seed().1;
    let mut req = spawn_request(&f, n, count);
    req.prefetch = g.cfg.prefetch.clone();
    req.stdout = pb::StdoutMode::Null as i32;
    let seed_id = req.seed.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    req.args = json!({ "gateway": g.worker_addr, "function": f.name }).to_string();
    let mut c = n.client.clone();
    // Children this call has not accounted for yet (started nor failed).
    let mut unresolved = count as usize;
    let mut running: Vec<String> = Vec::new();
    // Why the rest is lost, and whether the node went away (then the
    // invocations waiting for those children get children elsewhere).
    let (lost, gone) = match c.spawn(req).await {
        Err(e) => (
            format!("node {} refused to spawn: {}", n.spec.addr, e.message()),
            node_lost(&g, n, &e),
        ),
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                let ev = match s.message().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => {
                        break (
                            format!("node {} ended the spawn stream", n.spec.addr),
                            !n.placeable(),
                        )
                    }
                    Err(e) => {
                        break (
                            format!("lost node {}: {}", n.spec.addr, e.message()),
                            node_lost(&g, n, &e),
                        )
                    }
                };
                match ev.kind {
                    Some(pb::instance_event::Kind::Started(_)) => {
                        unresolved -= 1;
                        n.spawned.fetch_add(1, Ordering::Relaxed);
                        n.used(&seed_id);
                        f.stats.spawned.fetch_add(1, Ordering::Relaxed);
                        f.pool().started.insert(
                            ev.instance_id.clone(),
                            Started {
                                node: node.clone(),
                                pages_from: pages_from.clone(),
                                connected: false,
                            },
                        );
                        running.push(ev.instance_id.clone());
                        tokio::spawn(hello_deadline(
                            g.clone(),
                            f.clone(),
                            node.clone(),
                            ev.instance_id,
                        ));
                    }
                    Some(pb::instance_event::Kind::Failed(x)) => {
                        unresolved -= 1;
                        f.stats.spawn_failures.fetch_add(1, Ordering::Relaxed);
                        n.live.fetch_sub(1, Ordering::Relaxed);
                        f.pool().starting -= 1;
                        warn!(function = %f.name, node = %n.spec.addr, reason = %x.reason, "spawn failed");
                        f.fail_one(&format!("no instance could be started: {}", x.reason));
                    }
                    Some(pb::instance_event::Kind::Exited(x)) => {
                        running.retain(|i| *i != ev.instance_id);
                        let reason = if x.reason.is_empty() {
                            describe_exit(&x)
                        } else {
                            format!("{} ({})", describe_exit(&x), x.reason)
                        };
                        exited(&f, n, &ev.instance_id, reason);
                    }
                    _ => {}
                }
                if unresolved == 0 && running.is_empty() {
                    return;
                }
            }
        }
    };
    // The node is gone or refused: whatever was not accounted for is
    // lost; the invocations waiting for it get children elsewhere when the
    // node went away, else they fail with the reason.
    if unresolved > 0 {
        warn!(function = %f.name, retry_elsewhere = gone, "{lost}");
        n.live.fetch_sub(unresolved, Ordering::Relaxed);
        f.pool().starting -= unresolved;
        if !gone {
            for _ in 0..unresolved {
                f.fail_one(&lost);
            }
        }
    }
    for id in running {
        exited(&f, n, &id, lost.clone());
    }
    f.wake.notify_one();
}

fn exited(f: &Function, n: &Node, id: &str, reason: String) {
    n.live.fetch_sub(1, Ordering::Relaxed);
    let mut p = f.pool();
    let connected = p.started.remove(id).map(|s| s.connected);
    if p.exits.len() >= EXITS_KEPT {
        p.exits.clear();
    }
    p.exits.insert(id.to_string(), reason.clone());
    // Gone before it said hello: the invocation it was for fails with
    // the reason (no respawn loop for a function that cannot start),
    // unless its node went away: then it gets a child elsewhere.
    if connected == Some(false) {
        p.starting -= 1;
        drop(p);
        if n.placeable() {
            warn!(function = %f.name, instance = %id, %reason, "instance died before it was ready");
            f.fail_one(&format!("instance {id} died before it was ready: {reason}"));
        } else {
            info!(function = %f.name, instance = %id, node = %n.spec.addr, "instance lost with its node before it was ready; starting another elsewhere");
        }
    } else {
        p.idle.retain(|i| i.id != id);
    }
    // Room on a node: waiting invocations may get a child now.
    f.wake.notify_one();
}

async fn hello_deadline(g: Arc<Gateway>, f: Arc<Function>, node: Arc<Node>, id: String) {
    tokio::time::sleep(g.cfg.ready_timeout).await;
    if f.pool().started.get(&id).is_some_and(|s| !s.connected) {
        warn!(function = %f.name, instance = %id, "instance never connected back; killing it");
        let mut c = node.client.clone();
        let _ = c
            .kill_instance(pb::KillInstanceRequest { instance_id: id })
            .await;
    }
}

/// Accept instances connecting back: each says hello first.
pub(crate) async fn accept_workers(g: Arc<Gateway>, l: TcpListener) {
    loop {
        let (s, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("worker accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let g = g.clone();
        tokio::spawn(async move {
            if let Err(e) = hello(&g, s).await {
                warn!(%peer, "worker connection refused: {e}");
            }
        });
    }
}

async fn hello(g: &Gateway, s: TcpStream) -> Result<(), String> {
    let _ = s.set_nodelay(true);
    let (r, w) = s.into_split();
    let mut reader = BufReader::new(r);
    let line = tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut reader))
        .await
        .map_err(|_| "no hello within 5 s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("closed before its hello")?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad hello: {e}"))?;
    let id = v
        .get("hello")
        .and_then(Value::as_str)
        .ok_or("hello without an instance id")?
        .to_string();
    let name = v.get("function").and_then(Value::as_str).unwrap_or("");
    let f = g
        .functions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
        .ok_or_else(|| format!("hello for unknown function {name:?}"))?;
    // The hello can beat the Started event of the Spawn stream: wait a
    // moment for it.
    let mut node = None;
    for _ in 0..250 {
        let seen = {
            let mut p = f.pool();
            match p.started.get_mut(&id) {
                Some(s) if !s.connected => {
                    s.connected = true;
                    Some(Ok((s.node.clone(), s.pages_from.clone())))
                }
                Some(_) => Some(Err(format!("instance {id:?} said hello twice"))),
                None => None,
            }
        };
        match seen {
            Some(r) => {
                node = Some(r?);
                break;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (node, pages_from) =
        node.ok_or_else(|| format!("instance {id:?} is not one this gateway started"))?;
    debug!(function = %f.name, instance = %id, "instance ready");
    f.deliver(
        Instance {
            id,
            node,
            pages_from,
            reader,
            writer: w,
            idle_since: Instant::now(),
            served: 0,
        },
        true,
    );
    Ok(())
}

/// Tells idle instances past their keep-alive to exit.
pub(crate) async fn reaper(g: Arc<Gateway>) {
    let tick = (g.cfg.keep_alive / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let fs = g.function_list();
        for f in fs {
            let expired: Vec<Instance> = {
                let mut p = f.pool();
                let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut p.idle)
                    .into_iter()
                    .partition(|i| i.idle_since.elapsed() >= f.keep_alive);
                p.idle = keep;
                old
            };
            if !expired.is_empty() {
                info!(function = %f.name, instances = expired.len(), "keep-alive over; retiring idle instances");
            }
            for i in expired {
                debug!(instance = %i.id, served = i.served, "retiring");
                retire(i).await;
            }
        }
    }
}

/// Wake `f`'s spawner: nodes came or went, waiting invocations may be
/// placed now.
pub(crate) fn wake(f: &Function) {
    f.wake.notify_one();
}

/// `n` is no longer placeable: retire its idle instances (busy ones are
/// retired after their invocation), place waiting invocations elsewhere,
/// and make the seeds it holds again on another node.
pub(crate) fn node_drained(g: &Arc<Gateway>, n: &Arc<Node>) {
    for f in g.function_list() {
        let idle: Vec<Instance> = {
            let mut p = f.pool();
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut p.idle)
                .into_iter()
                .partition(|i| Arc::ptr_eq(&i.node, n));
            p.idle = keep;
            gone
        };
        if !idle.is_empty() {
            info!(function = %f.name, node = %n.spec.addr, instances = idle.len(), "retiring the idle instances of a draining node");
        }
        tokio::spawn(async move {
            for i in idle {
                retire(i).await;
            }
        });
        if Arc::ptr_eq(&f.seed().1, n) {
            tokio::spawn(remake_seed(g.clone(), f.clone()));
        }
        f.wake.notify_one();
    }
}

/// Make `f`'s seed again on a placeable node, its node being drained; the
/// children running keep paging from their node caches (forkd drains
/// other nodes' seeds into them), new ones start from the new seed.
async fn remake_seed(g: Arc<Gateway>, f: Arc<Function>) {
    if f.remaking.swap(true, Ordering::SeqCst) {
        return;
    }
    let old = f.seed();
    let mut wait = Duration::from_millis(200);
    loop {
        if !g.function_list().iter().any(|x| Arc::ptr_eq(x, &f)) || old.1.placeable() {
            break;
        }
        match super::register::make_seed(&g, &f.spec, f.tenant.as_deref()).await {
            Ok((seed, node)) => {
                info!(function = %f.name, old = %old.0.id, new = %seed.id, node = %node.spec.addr,
                      "the seed's node is draining: made the seed again on another node");
                *f.seed.lock().unwrap_or_else(|e| e.into_inner()) = (seed, node);
                prepare_everywhere(&g, &f).await;
                f.wake.notify_one();
                break;
            }
            Err(e) => {
                warn!(function = %f.name, "making the seed again: {e}; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    f.remaking.store(false, Ordering::SeqCst);
}
