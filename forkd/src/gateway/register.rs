//! Registering a function: run its command until it is warm and make a seed
//! of it on the first node.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tracing::info;

use super::nodes::Node;
use super::pool::{Function, Mode};
use super::Gateway;
use crate::pb;

/// What `POST /functions` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// The function's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The command that warms up and checkpoints (or prints `ready_line`).
    /// With `oci_bundle`: the process to run instead of the bundle's
    /// (optional).
    #[serde(default)]
    pub command: Vec<String>,
    /// Run this OCI bundle (with `runtime`) and capture its process at
    /// `ready_line`: every instance is a container of its own.
    #[serde(default)]
    pub oci_bundle: Option<String>,
    /// The OCI runtime for `oci_bundle`: runc (default) or crun.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Its working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Capture at this stdout line instead of waiting for `checkpoint()`;
    /// each child then serves one invocation (stdin in, stdout out).
    #[serde(default)]
    pub ready_line: Option<String>,
    /// One invocation's limit [default: the gateway's].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Idle instances are kept this long [default: the gateway's; 0 = one
    /// invocation per instance].
    #[serde(default)]
    pub keep_alive_ms: Option<u64>,
    /// Close, in instances, descriptors of the warm process that cannot be
    /// recreated, instead of failing the registration.
    #[serde(default)]
    pub drop_fds: bool,
}

/// Make the function's seed on a node that can.
pub(crate) async fn register(
    g: &Arc<Gateway>,
    spec: FunctionSpec,
    tenant: Option<Arc<crate::daemon::auth::Tenant>>,
) -> Result<Arc<Function>, String> {
    if spec.command.is_empty() && spec.oci_bundle.is_none() {
        return Err("the function has no command (or oci_bundle)".into());
    }
    if spec.oci_bundle.is_some() && spec.ready_line.is_none() {
        return Err(
            "a function from an OCI bundle needs ready_line (its instances serve one invocation each, stdin in, stdout out)"
                .into(),
        );
    }
    let t = Instant::now();
    let mode = match &spec.ready_line {
        Some(_) => Mode::OneShot,
        None => Mode::Checkpoint,
    };
    let seed = make_seed(g, &spec, tenant.as_deref()).await?;
    let f = Function::new(
        spec.name.clone(),
        mode,
        seed,
        spec.clone(),
        tenant,
        spec.keep_alive_ms
            .map(Duration::from_millis)
            .unwrap_or(g.cfg.keep_alive),
        spec.timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(g.cfg.invoke_timeout),
        t.elapsed().as_secs_f64() * 1e3,
    );
    info!(function = %f.name, seed = %f.seed().0.id, node = %f.seed().1.spec.addr, ms = f.register_ms, "function registered");
    let f = Arc::new(f);
    // Every node ready before the first invocation (register_ms is the
    // seed's making alone; each node's preparing is in `prepared`).
    super::pool::prepare_everywhere(g, &f).await;
    Ok(f)
}

/// The node to make a seed on: a placeable one that can (a checkpointing
/// command needs the node's cooperative socket, so a node given with one);
/// the first given node if it can, else the least loaded.
fn seed_node(g: &Gateway, checkpoint: bool) -> Result<Arc<Node>, String> {
    let nodes = g.node_list();
    if nodes.is_empty() {
        return Err("no forkd node is known (none given, none discovered yet)".into());
    }
    let ok: Vec<Arc<Node>> = nodes
        .iter()
        .filter(|n| n.placeable())
        .filter(|n| !checkpoint || n.spec.coop_socket().is_some())
        .cloned()
        .collect();
    if let Some(first) = ok.iter().find(|n| !n.discovered) {
        return Ok(first.clone());
    }
    ok.into_iter()
        .min_by_key(|n| n.live.load(std::sync::atomic::Ordering::Relaxed))
        .ok_or_else(|| {
            if checkpoint {
                "no serving node has a cooperative socket this gateway can reach (a function that calls checkpoint() runs beside a node given with --node unix:PATH or coop=PATH; discovered nodes take functions with a ready_line)".to_string()
            } else {
                format!(
                    "no node is serving ({})",
                    nodes
                        .iter()
                        .map(|n| format!("{}: {}", n.spec.addr, n.why()))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        })
}

/// Make the seed of `spec` on a node that can; the seed and its node.
pub(crate) async fn make_seed(
    g: &Gateway,
    spec: &FunctionSpec,
    tenant: Option<&crate::daemon::auth::Tenant>,
) -> Result<(pb::SeedRef, Arc<Node>), String> {
    let node = seed_node(g, spec.ready_line.is_none())?;
    let seed = match &spec.ready_line {
        Some(line) => ready_line_seed(g, &node, spec, line, tenant).await?,
        None => checkpoint_seed(g, &node, spec, tenant).await?,
    };
    Ok((seed, node))
}

async fn ready_line_seed(
    g: &Gateway,
    node: &Node,
    spec: &FunctionSpec,
    line: &str,
    tenant: Option<&crate::daemon::auth::Tenant>,
) -> Result<pb::SeedRef, String> {
    let mut c = node.client.clone();
    let s = c
        .create_seed(pb::CreateSeedRequest {
            source: Some(match &spec.oci_bundle {
                Some(b) => pb::create_seed_request::Source::OciBundle(pb::OciBundle {
                    bundle: b.clone(),
                    argv: spec.command.clone(),
                    ready_line: line.to_string(),
                    ready_timeout_ms: g.cfg.register_timeout.as_millis() as u32,
                    runtime: spec.runtime.clone().unwrap_or_default(),
                }),
                None => pb::create_seed_request::Source::Command(pb::StartCommand {
                    argv: spec.command.clone(),
                    ready_line: line.to_string(),
                    ready_timeout_ms: g.cfg.register_timeout.as_millis() as u32,
                    cwd: spec.cwd.clone().unwrap_or_default(),
                    env: spec.env.clone().into_iter().collect(),
                }),
            }),
            name: spec.name.clone(),
            // The node runs a tenant's command as the tenant, and its
            // children too.
            owner: tenant.map(|t| t.name.clone()).unwrap_or_default(),
            drop_unsupported_fds: spec.drop_fds,
        })
        .await
        .map_err(|e| format!("{} could not make a seed: {}", node.spec.addr, e.message()))?
        .into_inner();
    Ok(pb::SeedRef {
        id: s.id,
        key: s.key,
    })
}

async fn checkpoint_seed(
    g: &Gateway,
    node: &Node,
    spec: &FunctionSpec,
    tenant: Option<&crate::daemon::auth::Tenant>,
) -> Result<pb::SeedRef, String> {
    let coop = node.spec.coop_socket().ok_or_else(|| {
        format!(
            "node {} has no known cooperative socket: give it coop=PATH",
            node.spec.addr
        )
    })?;
    let mut cmd = tokio::process::Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..])
        .env("FORKD_COOP_SOCKET", &coop)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(d) = &spec.cwd {
        cmd.current_dir(d);
    }
    // A tenant's runtime runs as the tenant: the node makes its seed the
    // tenant's (by the caller's uid on the cooperative socket).
    if let Some(t) = tenant {
        cmd.uid(t.uid).gid(t.gid);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", spec.command[0]))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    // Keep the last few KiB of its stderr for the error message, draining
    // it so a chatty command never blocks on a full pipe.
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let tail_buf = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let drain = {
        let tail_buf = tail_buf.clone();
        tokio::spawn(async move {
            let mut b = [0u8; 4096];
            while let Ok(n) = err.read(&mut b).await {
                if n == 0 {
                    break;
                }
                let mut t = tail_buf.lock().unwrap_or_else(|e| e.into_inner());
                t.extend_from_slice(&b[..n]);
                if t.len() > 8192 {
                    let cut = t.len() - 8192;
                    t.drain(..cut);
                }
            }
        })
    };
    let find = async {
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                return Err("it exited without printing `remotefork-seed {...}`".to_string());
            }
            if let Some(j) = line.trim().strip_prefix("remotefork-seed ") {
                let v: Value =
                    serde_json::from_str(j).map_err(|e| format!("bad seed line: {e}"))?;
                let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
                let key = v.get("key").and_then(Value::as_str).unwrap_or_default();
                if id.is_empty() {
                    return Err(format!("seed line without an id: {j}"));
                }
                return Ok(pb::SeedRef {
                    id: id.into(),
                    key: key.into(),
                });
            }
        }
    };
    let r = match tokio::time::timeout(g.cfg.register_timeout, find).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no checkpoint within {} ms",
            g.cfg.register_timeout.as_millis()
        )),
    };
    match r {
        Ok(seed) => {
            // The runtime's parent exits after the checkpoint; don't keep it.
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            Ok(seed)
        }
        Err(e) => {
            let _ = child.kill().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            let tail = tail_buf.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let tail = String::from_utf8_lossy(&tail);
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the function's command did not become a seed: {e}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr ends with: {}", tail.join(" | "))
                }
            ))
        }
    }
}
