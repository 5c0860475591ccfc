//! The fan-out harness: N instances of one function from one seed across M
//! nodes, beside the baselines, in one run.
//!
//! ```text
//! cargo build --release -p forkd
//! cargo run --release --bin fanout -- --instances 1000 --nodes 2 --out target/fanout
//! ```
//! (as root). The function is a warm Python (boto3 imported, an S3 client
//! built) that answers one JSON line and then stays alive for `--hold-s`, so
//! the node's memory is measured with every instance running.
//!
//! Methods, each a burst (every instance requested at once, times measured
//! from the burst's start):
//! - `remote_fork`: the seed on node 1, instances spread over M namespaced
//!   nodes (lazy restore, pages over TCP from node 1 for the others);
//! - `local_fork`: a zygote (the same warm Python) forking one child per
//!   request;
//! - `eager_restore`: forkd restores with all memory written first, node 1;
//! - `cold_start`: exec of the function;
//! - `criu`: when a working `criu` is installed (skipped with the reason).
//!
//! Writes `results.json`, `instances.csv` (one row per instance) and three
//! SVG plots into `--out`, and prints a table.
//!
//! On real machines: `--hosts H1:7070,H2:7070 --token-file F` uses forkd
//! daemons already running there (`forkd serve --listen H:7070
//! --page-listen H:7071 --metrics H:7072 --token-file F`; the seed is made
//! on H1, whose Python path and boto3 must match this machine's). Memory is
//! each node's own account (`NodeInfo.pss_bytes`: forkd and every process
//! it started); the baselines run on this machine, so run it on H1.

mod common;
mod plots;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::python;
use forkd::pb;
use serde_json::{json, Value};

/// The function every method runs: ready once warm, one answer, then hold.
const FUNCTION: &str = r#"
import os, sys, json, time
import boto3
client = boto3.client('s3', region_name='us-east-1')
table = {i: i * i for i in range(20000)}
def answer(req):
    return json.dumps({'req': req, 'pid': os.getpid(), 'region': client.meta.region_name,
                       'sum': sum(table.values())})
def serve(line):
    req, _, hold = line.strip().partition(' hold=')
    sys.stdout.write(answer(req) + '\n')
    sys.stdout.flush()
    if hold:
        time.sleep(float(hold))
if len(sys.argv) > 1 and sys.argv[1] == 'zygote':
    import signal
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print('ready', flush=True)
    for line in sys.stdin:
        if os.fork() == 0:
            serve(line)
            os._exit(0)
    sys.exit(0)
print('ready', flush=True)
serve(sys.stdin.readline())
"#;

const EXPECTED_SUM: u64 = {
    let mut s = 0u64;
    let mut i = 0u64;
    while i < 20000 {
        s += i * i;
        i += 1;
    }
    s
};

struct Opts {
    instances: usize,
    nodes: usize,
    out: PathBuf,
    prefetch: String,
    transport: String,
    concurrency: usize,
    batch: u32,
    eager_instances: usize,
    cold_instances: usize,
    hold_s: f64,
    methods: Vec<String>,
    timeout: Duration,
    /// Real forkd nodes (gRPC HOST:PORT) instead of namespaced ones here.
    hosts: Vec<String>,
    token_file: Option<PathBuf>,
    metrics_port: u16,
}

fn usage() -> &'static str {
    "fanout --instances N --nodes M --out DIR [--prefetch off|window|recorded] \
     [--transport tcp|auto] [--concurrency C] [--batch B] [--eager-instances K] \
     [--cold-instances K] [--hold-s S] [--methods a,b,...] [--timeout-s S] \
     [--hosts H1:7070,H2:7070,... --token-file F [--metrics-port 7072]]"
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        instances: 1000,
        nodes: 2,
        out: PathBuf::from("target/fanout"),
        prefetch: "recorded".into(),
        transport: "tcp".into(),
        concurrency: 4,
        batch: 0,
        eager_instances: 100,
        cold_instances: 20,
        hold_s: 0.0,
        methods: [
            "remote_fork",
            "local_fork",
            "eager_restore",
            "cold_start",
            "criu",
        ]
        .map(String::from)
        .to_vec(),
        timeout: Duration::from_secs(120),
        hosts: Vec::new(),
        token_file: None,
        metrics_port: 7072,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .with_context(|| format!("{a} needs a value; {}", usage()))
        };
        match a.as_str() {
            "--instances" => o.instances = val()?.parse()?,
            "--nodes" => o.nodes = val()?.parse()?,
            "--out" => o.out = val()?.into(),
            "--prefetch" => o.prefetch = val()?,
            "--transport" => o.transport = val()?,
            "--concurrency" => o.concurrency = val()?.parse()?,
            "--batch" => o.batch = val()?.parse()?,
            "--eager-instances" => o.eager_instances = val()?.parse()?,
            "--cold-instances" => o.cold_instances = val()?.parse()?,
            "--hold-s" => o.hold_s = val()?.parse()?,
            "--methods" => o.methods = val()?.split(',').map(String::from).collect(),
            "--timeout-s" => o.timeout = Duration::from_secs(val()?.parse()?),
            "--hosts" => o.hosts = val()?.split(',').map(String::from).collect(),
            "--token-file" => o.token_file = Some(val()?.into()),
            "--metrics-port" => o.metrics_port = val()?.parse()?,
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            o => bail!("unknown argument {o:?}; {}", usage()),
        }
    }
    if !o.hosts.is_empty() {
        o.nodes = o.hosts.len();
    }
    if o.instances == 0 || o.nodes == 0 || o.concurrency == 0 {
        bail!("--instances, --nodes and --concurrency must be at least 1");
    }
    if o.hold_s == 0.0 {
        // Long enough that every instance is alive when memory is measured.
        o.hold_s = 600.0;
    }
    Ok(o)
}

/// One instance's figures.
#[derive(Clone, Debug, Default)]
struct Sample {
    node: usize,
    /// From the burst's start until the process was running (restored).
    running_ms: Option<f64>,
    /// From the burst's start until its answer arrived.
    response_ms: Option<f64>,
    ok: bool,
    pid: u32,
    faults: u64,
    pages: u64,
}

/// One method's outcome.
#[derive(Default)]
struct MethodResult {
    name: String,
    skipped: Option<String>,
    samples: Vec<Sample>,
    total_s: f64,
    memory_bytes: Option<u64>,
    /// (answered, node memory used above the pre-burst level) over the burst.
    memory_curve: Vec<(usize, u64)>,
    /// Unloaded time to first response of single instances, ms.
    single_ms: Vec<f64>,
    extra: serde_json::Map<String, Value>,
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    Some(s[i.min(s.len() - 1)])
}

fn check_answer(line: &str) -> bool {
    serde_json::from_str::<Value>(line.trim()).is_ok_and(|v| {
        v.get("region").and_then(Value::as_str) == Some("us-east-1")
            && v.get("sum").and_then(Value::as_u64) == Some(EXPECTED_SUM)
    })
}

/// PSS of a process, bytes (0 when it is gone).
fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Memory in use on the machine (MemTotal - MemAvailable), bytes.
fn mem_used() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    get("MemTotal:").saturating_sub(get("MemAvailable:"))
}

/// Samples machine memory against the answered count until stopped.
struct MemSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(usize, u64)>>,
}

impl MemSampler {
    fn start(answered: Arc<std::sync::atomic::AtomicUsize>) -> MemSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let base = mem_used();
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let n = answered.load(std::sync::atomic::Ordering::Relaxed);
                v.push((n, mem_used().saturating_sub(base)));
                std::thread::sleep(Duration::from_millis(100));
            }
            let n = answered.load(std::sync::atomic::Ordering::Relaxed);
            v.push((n, mem_used().saturating_sub(base)));
            v
        });
        MemSampler { stop, handle }
    }
    fn finish(self) -> Vec<(usize, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn kill_all(pids: &[u32]) {
    for &p in pids {
        if p > 1 {
            // SAFETY: kill has no memory preconditions; the pids are the
            // instances this harness started.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

/// The namespaced nodes made by forkd/scripts/nodes.sh.
struct Nodes {
    dir: PathBuf,
    script: PathBuf,
    env: HashMap<String, String>,
}

impl Nodes {
    fn up(dir: &Path, count: usize, forkd: &Path, transport: &str) -> anyhow::Result<Nodes> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd/scripts/nodes.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg("up")
            .arg(dir)
            .arg(count.to_string())
            .arg(forkd)
            .env("FORKD_TRANSPORT", transport)
            .status()?;
        if !st.success() {
            bail!("nodes.sh up failed");
        }
        let env = std::fs::read_to_string(dir.join("nodes.env"))?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Nodes {
            dir: dir.to_path_buf(),
            script,
            env,
        })
    }
    fn get(&self, i: usize, what: &str) -> String {
        self.env
            .get(&format!("NODE{}_{what}", i + 1))
            .cloned()
            .unwrap_or_default()
    }
    fn sock(&self, i: usize) -> String {
        format!("unix:{}", self.get(i, "SOCK"))
    }
    fn metric(&self, i: usize, name: &str) -> u64 {
        forkd::client::scrape_metric(&self.get(i, "METRICS"), name)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("down")
            .arg(&self.dir)
            .status();
        // The nodes' state (seeds) is the harness's own scratch.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The forkd nodes a run uses: namespaced ones started here, or real hosts.
enum Cluster {
    Local(Nodes),
    Hosts {
        /// gRPC addresses, node 1 first (it holds the seed).
        addrs: Vec<String>,
        token: Option<String>,
        /// `/metrics` addresses, same order.
        metrics: Vec<String>,
    },
}

impl Cluster {
    fn hosts(opts: &Opts) -> anyhow::Result<Cluster> {
        let token = match &opts.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let metrics = opts
            .hosts
            .iter()
            .map(|a| {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                format!("{host}:{}", opts.metrics_port)
            })
            .collect();
        Ok(Cluster::Hosts {
            addrs: opts.hosts.clone(),
            token,
            metrics,
        })
    }

    async fn connect(&self, i: usize) -> anyhow::Result<forkd::client::Client> {
        match self {
            Cluster::Local(n) => forkd::client::connect(&n.sock(i), None).await,
            Cluster::Hosts { addrs, token, .. } => {
                forkd::client::connect(&addrs[i], token.as_deref()).await
            }
        }
    }

    /// Node 1's gRPC address as the other nodes reach it.
    fn origin(&self) -> String {
        match self {
            Cluster::Local(n) => n.get(0, "ADDR"),
            Cluster::Hosts { addrs, .. } => addrs[0].clone(),
        }
    }

    fn metric(&self, i: usize, name: &str) -> u64 {
        match self {
            Cluster::Local(n) => n.metric(i, name),
            Cluster::Hosts { metrics, .. } => forkd::client::scrape_metric(&metrics[i], name),
        }
    }

    fn is_local(&self) -> bool {
        matches!(self, Cluster::Local(_))
    }
}

/// What one burst measured.
struct Burst {
    samples: Vec<Sample>,
    total_s: f64,
    memory_bytes: Option<u64>,
    curve: Vec<(usize, u64)>,
}

impl Burst {
    /// The burst ends when its last instance answered.
    fn new(samples: Vec<Sample>, memory_bytes: Option<u64>, curve: Vec<(usize, u64)>) -> Burst {
        let total_s = samples
            .iter()
            .filter_map(|s| s.response_ms)
            .fold(0.0, f64::max)
            / 1e3;
        Burst {
            samples,
            total_s,
            memory_bytes,
            curve,
        }
    }
}

impl MethodResult {
    fn from_burst(name: &str, b: Burst, single_ms: Vec<f64>) -> MethodResult {
        MethodResult {
            name: name.into(),
            samples: b.samples,
            total_s: b.total_s,
            memory_bytes: b.memory_bytes,
            memory_curve: b.curve,
            single_ms,
            ..Default::default()
        }
    }
}

/// Sum of PSS over `pids`, or None when none could be read.
fn pss_sum(pids: &[u32]) -> Option<u64> {
    let v: Vec<u64> = pids.iter().map(|&p| pss(p)).collect();
    v.iter().any(|&x| x > 0).then(|| v.iter().sum())
}

/// Start instances on each of `targets` (node, client, origin, count) at
/// once, wait until every one has answered, measure memory with all of
/// them alive, then end them and collect their fault counts.
async fn burst(
    targets: Vec<(usize, forkd::client::Client, pb::SeedRef, String, u32)>,
    opts: &Opts,
    eager: bool,
    nodes: &[forkd::client::Client],
    local: bool,
) -> anyhow::Result<Burst> {
    let expected: usize = targets.iter().map(|t| t.4 as usize).sum();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // This machine's memory over the burst: meaningful when it runs the nodes.
    let sampler = local.then(|| MemSampler::start(answered.clone()));
    let t0 = Instant::now();
    let samples: Arc<Mutex<HashMap<(usize, String), Sample>>> = Arc::default();
    let mut tasks = Vec::new();
    for (node, client, seed, origin, count) in targets {
        let per_call = if opts.batch > 0 {
            opts.batch
        } else {
            count.div_ceil(opts.concurrency as u32).max(1)
        };
        let mut left = count;
        let mut call = 0;
        while left > 0 {
            let k = left.min(per_call);
            left -= k;
            call += 1;
            let req = pb::SpawnRequest {
                seed: Some(seed.clone()),
                count: k,
                stdin: format!("n{node}-c{call} hold={}\n", opts.hold_s).into_bytes(),
                prefetch: opts.prefetch.clone(),
                eager,
                origin: origin.clone(),
                ..Default::default()
            };
            let mut c = client.clone();
            let samples = samples.clone();
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = c.spawn(req).await?.into_inner();
                while let Some(ev) = s.message().await? {
                    let at = t0.elapsed().as_secs_f64() * 1e3;
                    let mut m = samples.lock().unwrap_or_else(|e| e.into_inner());
                    let e = m
                        .entry((node, ev.instance_id.clone()))
                        .or_insert_with(|| Sample {
                            node,
                            ..Default::default()
                        });
                    match ev.kind {
                        Some(pb::instance_event::Kind::Running(_)) => {
                            e.running_ms = Some(at);
                            e.pid = ev.pid;
                        }
                        Some(pb::instance_event::Kind::Output(o)) if e.response_ms.is_none() => {
                            e.response_ms = Some(at);
                            e.ok = check_answer(&String::from_utf8_lossy(&o.data));
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(pb::instance_event::Kind::Exited(x)) => {
                            e.faults = x.faults;
                            e.pages = x.pages_installed;
                            if e.response_ms.is_none() {
                                eprintln!(
                                    "fanout: instance {} ended without answering: {x:?}",
                                    ev.instance_id
                                );
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Some(pb::instance_event::Kind::Failed(f)) => {
                            eprintln!("fanout: spawn failed: {}", f.reason);
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                anyhow::Ok(())
            }));
        }
    }
    while answered.load(std::sync::atomic::Ordering::Relaxed) < expected
        && t0.elapsed() < opts.timeout
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let curve = sampler.map(MemSampler::finish).unwrap_or_default();
    // Each node's own account, with every instance alive: PSS of forkd and
    // of every process it started (the instances, the seed's templates).
    let mut memory = 0u64;
    for c in nodes {
        let info = c
            .clone()
            .node_info(pb::NodeInfoRequest::default())
            .await
            .map_err(|e| anyhow::anyhow!("node info: {}", e.message()))?
            .into_inner();
        memory += info.pss_bytes;
    }
    let memory_bytes = (memory > 0).then_some(memory);
    let ids: Vec<(usize, String)> = samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    for (node, id) in ids {
        // Ended ones answer "not running": nothing to do.
        let _ = nodes[node]
            .clone()
            .kill_instance(pb::KillInstanceRequest { instance_id: id })
            .await;
    }
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("fanout: a spawn call failed: {e}"),
            _ => eprintln!("fanout: a spawn call did not end"),
        }
    }
    let mut samples: Vec<Sample> = samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, s)| s)
        .collect();
    // Instances never reported at all count as failed.
    samples.resize(samples.len().max(expected), Sample::default());
    Ok(Burst::new(samples, memory_bytes, curve))
}

/// One instance started and timed alone (no load): ms to its answer.
async fn single(
    c: &mut forkd::client::Client,
    seed: &pb::SeedRef,
    origin: &str,
    prefetch: &str,
    eager: bool,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut s = c
        .spawn(pb::SpawnRequest {
            seed: Some(seed.clone()),
            count: 1,
            stdin: b"single\n".to_vec(),
            prefetch: prefetch.into(),
            eager,
            origin: origin.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut first = None;
    while let Some(ev) = s.message().await? {
        match ev.kind {
            Some(pb::instance_event::Kind::Output(o)) if first.is_none() => {
                if !check_answer(&String::from_utf8_lossy(&o.data)) {
                    bail!("wrong answer {:?}", String::from_utf8_lossy(&o.data));
                }
                first = Some(t.elapsed().as_secs_f64() * 1e3);
            }
            Some(pb::instance_event::Kind::Failed(f)) => bail!("spawn failed: {}", f.reason),
            _ => {}
        }
    }
    first.context("no answer")
}

/// Cold starts: `n` execs of the function at once.
fn cold_start(py: &str, n: usize, hold_s: f64) -> anyhow::Result<(Burst, Vec<f64>)> {
    // Unloaded first: one at a time.
    let mut single = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut c = Command::new(py)
            .args(["-c", FUNCTION])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        writeln!(c.stdin.as_mut().context("stdin")?, "single")?;
        let mut r = BufReader::new(c.stdout.take().context("stdout")?);
        let mut l = String::new();
        r.read_line(&mut l)?; // ready
        l.clear();
        r.read_line(&mut l)?;
        single.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = c.wait();
        if !check_answer(&l) {
            bail!("cold start answered {l:?}");
        }
    }
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = MemSampler::start(answered.clone());
    let t0 = Instant::now();
    let mut readers = Vec::new();
    let mut pids = Vec::new();
    for i in 0..n {
        let mut c = Command::new(py)
            .args(["-c", FUNCTION])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        writeln!(c.stdin.as_mut().context("stdin")?, "cold-{i} hold={hold_s}")?;
        pids.push(c.id());
        let answered = answered.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(c.stdout.take().expect("piped"));
            let mut l = String::new();
            let _ = r.read_line(&mut l);
            l.clear();
            let _ = r.read_line(&mut l);
            let s = Sample {
                response_ms: Some(t0.elapsed().as_secs_f64() * 1e3),
                ok: check_answer(&l),
                pid: c.id(),
                ..Default::default()
            };
            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (s, c)
        }));
    }
    let mut samples = Vec::new();
    let mut children = Vec::new();
    for r in readers {
        let (s, c) = r.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
        samples.push(s);
        children.push(c);
    }
    let curve = sampler.finish();
    let memory_bytes = pss_sum(&pids);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok((Burst::new(samples, memory_bytes, curve), single))
}

/// A zygote: the warm function forks one child per request line.
fn local_fork(py: &str, n: usize, hold_s: f64) -> anyhow::Result<(Burst, Vec<f64>)> {
    let mut z = Command::new(py)
        .args(["-c", FUNCTION, "zygote"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let zpid = z.id();
    let mut win = z.stdin.take().context("stdin")?;
    let mut rd = BufReader::new(z.stdout.take().context("stdout")?);
    let mut l = String::new();
    rd.read_line(&mut l)?;
    if l.trim() != "ready" {
        bail!("zygote said {l:?}");
    }
    let mut single = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        writeln!(win, "single")?;
        l.clear();
        rd.read_line(&mut l)?;
        single.push(t.elapsed().as_secs_f64() * 1e3);
        if !check_answer(&l) {
            bail!("zygote child answered {l:?}");
        }
    }
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = MemSampler::start(answered.clone());
    let t0 = Instant::now();
    // Every request at once; the zygote forks them in turn.
    let reqs: String = (0..n)
        .map(|i| format!("fork-{i} hold={hold_s}\n"))
        .collect();
    let writer = std::thread::spawn(move || {
        let _ = win.write_all(reqs.as_bytes());
        win
    });
    let mut samples = Vec::new();
    while samples.len() < n && t0.elapsed() < Duration::from_secs(300) {
        l.clear();
        if rd.read_line(&mut l)? == 0 {
            break;
        }
        let pid = serde_json::from_str::<Value>(l.trim())
            .ok()
            .and_then(|v| v.get("pid")?.as_u64())
            .unwrap_or(0) as u32;
        pids.push(pid);
        samples.push(Sample {
            response_ms: Some(t0.elapsed().as_secs_f64() * 1e3),
            ok: check_answer(&l),
            pid,
            ..Default::default()
        });
        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let curve = sampler.finish();
    pids.push(zpid);
    let memory_bytes = pss_sum(&pids);
    pids.pop();
    kill_all(&pids);
    let win = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    drop(win);
    let _ = z.kill();
    let _ = z.wait();
    samples.resize(samples.len().max(n), Sample::default());
    Ok((Burst::new(samples, memory_bytes, curve), single))
}

fn criu_reason() -> String {
    match Command::new("criu").arg("check").output() {
        Err(_) => "criu is not installed (Debian's criu 3.17 also fails on this 6.18 kernel: \
                   `vdso: Unexpected rt vDSO area bounds`)"
            .into(),
        Ok(o) if !o.status.success() => format!(
            "`criu check` fails here: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("no message")
        ),
        Ok(_) => "criu works here, but this harness has no CRIU method yet (restoring N copies \
                  of one dump needs a pid namespace each)"
            .into(),
    }
}

fn result_json(m: &MethodResult, parent_rss: u64) -> Value {
    let resp: Vec<f64> = m.samples.iter().filter_map(|s| s.response_ms).collect();
    let running: Vec<f64> = m.samples.iter().filter_map(|s| s.running_ms).collect();
    let ok = m.samples.iter().filter(|s| s.ok).count();
    let mut v = json!({
        "method": m.name,
        "instances": m.samples.len(),
        "ok": ok,
        "p50_ms": percentile(&resp, 50.0),
        "p99_ms": percentile(&resp, 99.0),
        "total_s": m.total_s,
        "memory_bytes": m.memory_bytes,
        "throughput_per_s": if m.total_s > 0.0 { ok as f64 / m.total_s } else { 0.0 },
        "running_p50_ms": percentile(&running, 50.0),
        // Where an instance's time goes: waiting for a spawner thread and
        // being restored (request -> running), then resuming, paging in
        // and answering (running -> answer).
        "running_to_answer_p50_ms": percentile(
            &m.samples
                .iter()
                .filter_map(|s| Some(s.response_ms? - s.running_ms?))
                .collect::<Vec<_>>(),
            50.0
        ),
        "single_p50_ms": percentile(&m.single_ms, 50.0),
        "memory_vs_parent_rss": m.memory_bytes.map(|b| b as f64 / (parent_rss as f64 * m.samples.len().max(1) as f64)),
        "faults_per_instance": if m.samples.is_empty() { 0.0 } else {
            m.samples.iter().map(|s| s.faults).sum::<u64>() as f64 / m.samples.len() as f64 },
    });
    if let Some(r) = &m.skipped {
        v = json!({ "method": m.name, "skipped": r, "instances": 0, "ok": 0,
                    "p50_ms": null, "p99_ms": null, "total_s": null, "memory_bytes": null });
    }
    if let Value::Object(o) = &mut v {
        for (k, x) in &m.extra {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let opts = parse()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("fanout needs root (network namespaces, ptrace)");
    }
    let forkd_bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("forkd");
    if opts.hosts.is_empty() && !forkd_bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p forkd` first",
            forkd_bin.display()
        );
    }
    std::fs::create_dir_all(&opts.out)?;
    let py = python()?;
    let cmdline = format!(
        "cargo run --release --bin fanout -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    println!("# {cmdline}");
    let mut results: Vec<MethodResult> = Vec::new();
    let want = |m: &str| opts.methods.iter().any(|x| x == m);

    // The parent's RSS, the yardstick for memory: one warm process.
    let parent_rss = {
        let mut c = Command::new(&py)
            .args(["-c", FUNCTION])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut r = BufReader::new(c.stdout.take().context("stdout")?);
        let mut l = String::new();
        r.read_line(&mut l)?;
        let s = std::fs::read_to_string(format!("/proc/{}/status", c.id()))?;
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let _ = c.kill();
        let _ = c.wait();
        kb * 1024
    };

    if want("cold_start") {
        let n = opts.cold_instances.min(opts.instances);
        eprintln!("fanout: cold_start, {n} instances");
        let (b, single) = cold_start(&py, n, opts.hold_s)?;
        results.push(MethodResult::from_burst("cold_start", b, single));
    }
    if want("local_fork") {
        eprintln!("fanout: local_fork, {} instances", opts.instances);
        let (b, single) = local_fork(&py, opts.instances, opts.hold_s)?;
        results.push(MethodResult::from_burst("local_fork", b, single));
    }
    if want("remote_fork") || want("eager_restore") {
        let nodes = if opts.hosts.is_empty() {
            let dir = std::env::temp_dir().join(format!("rf-fanout-{}", std::process::id()));
            Cluster::Local(Nodes::up(&dir, opts.nodes, &forkd_bin, &opts.transport)?)
        } else {
            Cluster::hosts(&opts)?
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut clients = Vec::new();
            for i in 0..opts.nodes {
                clients.push(nodes.connect(i).await?);
            }
            let t = Instant::now();
            let seed = clients[0]
                .create_seed(pb::CreateSeedRequest {
                    source: Some(pb::create_seed_request::Source::Command(pb::StartCommand {
                        argv: vec![py.clone(), "-c".into(), FUNCTION.into()],
                        ready_line: "ready".into(),
                        ready_timeout_ms: 120_000,
                        cwd: String::new(),
                        env: Default::default(),
                    })),
                    name: "fanout".into(),
                    owner: String::new(),
                    drop_unsupported_fds: false,
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating the seed: {}", e.message()))?
                .into_inner();
            let seed_ms = t.elapsed().as_secs_f64() * 1e3;
            let sr = pb::SeedRef {
                id: seed.id.clone(),
                key: seed.key.clone(),
            };
            let origin = nodes.origin();
            let origin_of = |i: usize| {
                if i == 0 {
                    String::new()
                } else {
                    origin.clone()
                }
            };
            // One child per node first: records the working set on node 1
            // and opens each node's page channel (a deployment's steady state).
            let mut warm = Vec::new();
            for (i, c) in clients.iter_mut().enumerate() {
                warm.push(single(c, &sr, &origin_of(i), &opts.prefetch, false).await?);
            }
            if want("remote_fork") {
                let mut single_ms = Vec::new();
                for _ in 0..3 {
                    let i = opts.nodes - 1;
                    single_ms.push(
                        single(&mut clients[i], &sr, &origin_of(i), &opts.prefetch, false).await?,
                    );
                }
                let bytes0: Vec<u64> = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_seed_bytes_fetched_total"))
                    .collect();
                let trips0: Vec<u64> = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_seed_fetch_round_trips_total"))
                    .collect();
                let spawns0: u64 = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_spawns_total"))
                    .sum();
                let per = opts.instances / opts.nodes;
                let targets = (0..opts.nodes)
                    .map(|i| {
                        let k = per + usize::from(i < opts.instances % opts.nodes);
                        (i, clients[i].clone(), sr.clone(), origin_of(i), k as u32)
                    })
                    .collect();
                eprintln!(
                    "fanout: remote_fork, {} instances over {} nodes",
                    opts.instances, opts.nodes
                );
                let b = burst(targets, &opts, false, &clients, nodes.is_local()).await?;
                let bytes: u64 = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_seed_bytes_fetched_total") - bytes0[i])
                    .sum();
                let trips: u64 = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_seed_fetch_round_trips_total") - trips0[i])
                    .sum();
                let spawns: u64 = (0..opts.nodes)
                    .map(|i| nodes.metric(i, "forkd_spawns_total"))
                    .sum::<u64>()
                    - spawns0;
                let mut extra = serde_json::Map::new();
                extra.insert("nodes".into(), json!(opts.nodes));
                extra.insert("prefetch".into(), json!(opts.prefetch));
                extra.insert("transport".into(), json!(opts.transport));
                extra.insert("seed_create_ms".into(), json!(seed_ms));
                extra.insert("seed_image_bytes".into(), json!(seed.image_bytes));
                extra.insert("warmup_child_ms_per_node".into(), json!(warm));
                extra.insert("bytes_fetched".into(), json!(bytes));
                extra.insert(
                    "bytes_fetched_per_instance".into(),
                    json!(bytes as f64 / opts.instances as f64),
                );
                extra.insert("round_trips".into(), json!(trips));
                extra.insert("forkd_spawns".into(), json!(spawns));
                let per_node: Vec<usize> = (0..opts.nodes)
                    .map(|i| b.samples.iter().filter(|s| s.node == i && s.ok).count())
                    .collect();
                extra.insert("ok_per_node".into(), json!(per_node));
                results.push(MethodResult {
                    extra,
                    ..MethodResult::from_burst("remote_fork", b, single_ms)
                });
            }
            if want("eager_restore") {
                let n = opts.eager_instances.min(opts.instances);
                let mut single_ms = Vec::new();
                for _ in 0..3 {
                    single_ms.push(single(&mut clients[0], &sr, "", &opts.prefetch, true).await?);
                }
                eprintln!("fanout: eager_restore, {n} instances on node 1");
                let b = burst(
                    vec![(0, clients[0].clone(), sr.clone(), String::new(), n as u32)],
                    &opts,
                    true,
                    &clients,
                    nodes.is_local(),
                )
                .await?;
                results.push(MethodResult::from_burst("eager_restore", b, single_ms));
            }
            anyhow::Ok(())
        })?;
        drop(nodes);
    }
    if want("criu") {
        results.push(MethodResult {
            name: "criu".into(),
            skipped: Some(criu_reason()),
            ..Default::default()
        });
    }

    // Outputs.
    let rows: Vec<Value> = results.iter().map(|m| result_json(m, parent_rss)).collect();
    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "memory_bytes": std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| s.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok()).map(|k| k * 1024),
        "parent_rss_bytes": parent_rss,
    });
    let doc = json!({
        "command": cmdline,
        "machine": machine,
        "options": {"instances": opts.instances, "nodes": opts.nodes, "prefetch": opts.prefetch,
                    "transport": opts.transport, "concurrency": opts.concurrency, "batch": opts.batch,
                    "eager_instances": opts.eager_instances, "cold_instances": opts.cold_instances},
        "methods": rows,
    });
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    let mut csv =
        String::from("method,instance,node,running_ms,response_ms,ok,pid,faults,pages_installed\n");
    for m in &results {
        for (i, s) in m.samples.iter().enumerate() {
            csv.push_str(&format!(
                "{},{i},{},{},{},{},{},{},{}\n",
                m.name,
                s.node + 1,
                s.running_ms.map(|x| format!("{x:.3}")).unwrap_or_default(),
                s.response_ms.map(|x| format!("{x:.3}")).unwrap_or_default(),
                s.ok,
                s.pid,
                s.faults,
                s.pages
            ));
        }
    }
    std::fs::write(opts.out.join("instances.csv"), csv)?;
    let series: Vec<plots::Series> = results
        .iter()
        .filter(|m| m.skipped.is_none())
        .map(|m| plots::Series {
            name: m.name.clone(),
            responses_ms: m.samples.iter().filter_map(|s| s.response_ms).collect(),
            memory: m.memory_curve.clone(),
        })
        .collect();
    plots::draw(&opts.out, &series)?;

    // The table.
    println!(
        "# machine: {} cpus, kernel {}; parent RSS {:.1} MiB",
        doc["machine"]["cpus"],
        doc["machine"]["kernel"].as_str().unwrap_or(""),
        parent_rss as f64 / 1048576.0
    );
    println!(
        "{:<14} {:>9} {:>6} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10}",
        "method",
        "instances",
        "ok",
        "p50 ms",
        "p99 ms",
        "total s",
        "memory MiB",
        "mem/N*RSS",
        "single ms"
    );
    for r in &rows {
        if let Some(s) = r.get("skipped") {
            println!(
                "{:<14} skipped: {}",
                r["method"].as_str().unwrap_or(""),
                s.as_str().unwrap_or("")
            );
            continue;
        }
        let f = |k: &str| {
            r[k].as_f64()
                .map(|x| format!("{x:.2}"))
                .unwrap_or("-".into())
        };
        println!(
            "{:<14} {:>9} {:>6} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10}",
            r["method"].as_str().unwrap_or(""),
            r["instances"].as_u64().unwrap_or(0),
            r["ok"].as_u64().unwrap_or(0),
            f("p50_ms"),
            f("p99_ms"),
            f("total_s"),
            r["memory_bytes"]
                .as_f64()
                .map(|b| format!("{:.1}", b / 1048576.0))
                .unwrap_or("-".into()),
            r["memory_vs_parent_rss"]
                .as_f64()
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or("-".into()),
            f("single_p50_ms"),
        );
    }
    let get = |m: &str, k: &str| {
        rows.iter()
            .find(|r| r["method"] == m)
            .and_then(|r| r[k].as_f64())
    };
    if let (Some(rf), Some(cold)) = (
        get("remote_fork", "p50_ms"),
        get("cold_start", "single_p50_ms"),
    ) {
        println!(
            "remote_fork: p50 {rf:.1} ms in the burst vs cold start {cold:.1} ms unloaded = {:.1}x (goal >= 50x); \
             all answered in {:.2} s (goal <= 5 s); memory {:.1}% of N x parent RSS (goal < 10%)",
            cold / rf,
            get("remote_fork", "total_s").unwrap_or(f64::NAN),
            get("remote_fork", "memory_vs_parent_rss").unwrap_or(f64::NAN) * 100.0
        );
    }
    println!("# wrote {}/results.json, instances.csv, latency_cdf.svg, instances_vs_time.svg, memory_vs_n.svg", opts.out.display());
    Ok(())
}
