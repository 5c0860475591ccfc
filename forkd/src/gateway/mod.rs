//! The gateway: functions registered over HTTP become seeds, and every
//! invocation without an idle instance starts a child from its seed on the
//! least-loaded node.
//!
//! ```text
//! POST   /functions            {"name", "command": [...], "cwd", "env", "ready_line",
//!                               "timeout_ms", "keep_alive_ms"}  -> the seed
//! GET    /functions            the functions, their seeds and pools
//! DELETE /functions/{name}     retire its instances and drop its seed
//! POST   /invoke/{name}        JSON event in, the handler's JSON result out
//! GET    /metrics              Prometheus text
//! GET    /openapi.json         the OpenAPI 3.1 description of all this
//! ```
//!
//! Every error answer is JSON, `{"error": "..."}`, axum's own included
//! (unknown path, wrong method, body too large).
//!
//! A function's command warms up and calls `remotefork.checkpoint()` (the
//! Python runtime in `python/remotefork/runtime.py` does this for a plain
//! `def handler(event)`): the gateway runs it with `FORKD_COOP_SOCKET` set to
//! the first node's cooperative socket, and the command prints the seed it
//! became. Children connect back to the gateway's worker port and serve
//! invocations, one JSON line each way, and stay idle for the keep-alive
//! before they are told to exit. A command that prints a ready line instead
//! (`ready_line`) is captured by forkd's `CreateSeed`; each of its children
//! reads one event on stdin and prints its result: one invocation each.
//!
//! Nothing is provisioned: a burst of N concurrent invocations becomes N
//! children, started in batches (one `Spawn` per node and batch). When every
//! node is at its instance limit, invocations queue for an idle instance up
//! to the queue timeout and then fail with 503; so does a queue that is full.

pub mod discovery;
pub mod kube;
mod nodes;
mod pool;
mod register;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{info, warn};

pub use pool::{Function, Mode};

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A configuration value is wrong.
    #[error("{0}")]
    Config(String),
    /// A node could not be reached.
    #[error("node {addr}: {error}")]
    Node {
        /// The node's address.
        addr: String,
        /// What went wrong.
        error: String,
    },
    /// Binding or serving a socket failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        error: std::io::Error,
    },
}

/// A forkd node the gateway places instances on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// How the gateway reaches its forkd (`unix:PATH` or `HOST:PORT`).
    pub addr: String,
    /// How other nodes reach its forkd's gRPC (`HOST:PORT`) [default: addr
    /// when it is TCP]; needed on the first node when there are several.
    pub peer: Option<String>,
    /// Its cooperative socket [default: the Unix socket path + `.coop`].
    pub coop: Option<PathBuf>,
}

impl std::str::FromStr for NodeSpec {
    type Err = String;
    /// `ADDR[,peer=HOST:PORT][,coop=PATH]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let addr = parts.next().unwrap_or_default().trim().to_string();
        if addr.is_empty() {
            return Err(format!("node {s:?}: no address"));
        }
        let mut n = NodeSpec {
            addr,
            peer: None,
            coop: None,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("peer", v)) if !v.is_empty() => n.peer = Some(v.into()),
                Some(("coop", v)) if !v.is_empty() => n.coop = Some(v.into()),
                _ => {
                    return Err(format!(
                        "node {s:?}: unknown option {p:?} (want peer=HOST:PORT or coop=PATH)"
                    ))
                }
            }
        }
        if n.peer.is_none() && !n.addr.starts_with("unix:") {
            n.peer = Some(n.addr.clone());
        }
        Ok(n)
    }
}

impl NodeSpec {
    /// The node's cooperative socket, if it can be known.
    pub fn coop_socket(&self) -> Option<PathBuf> {
        self.coop.clone().or_else(|| {
            self.addr
                .strip_prefix("unix:")
                .map(|p| PathBuf::from(format!("{p}.coop")))
        })
    }
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP `HOST:PORT`.
    pub listen: String,
    /// The nodes given; the first one makes the seeds.
    pub nodes: Vec<NodeSpec>,
    /// Where more nodes are published (DNS, SRV, the Kubernetes API).
    pub discover: Option<discovery::Source>,
    /// The DNS server discovery asks [default: the system's resolvers].
    pub dns_server: Option<std::net::SocketAddr>,
    /// The Kubernetes API for `k8s:` discovery [default: in-cluster].
    pub kube: Option<kube::KubeApi>,
    /// How often discovery asks again.
    pub discover_interval: Duration,
    /// How often each node is asked what it has (for placement).
    pub node_poll: Duration,
    /// Bearer token for the nodes' TCP gRPC.
    pub token: Option<String>,
    /// Where instances connect back (`HOST:PORT`, port 0 = any).
    pub worker_listen: String,
    /// The address instances are told [default: the bound worker address].
    pub worker_advertise: Option<String>,
    /// How long an idle instance is kept.
    pub keep_alive: Duration,
    /// How long one invocation may run before its instance is killed.
    pub invoke_timeout: Duration,
    /// How long a started instance has to connect back.
    pub ready_timeout: Duration,
    /// How long an invocation waits for an instance when the nodes are full.
    pub queue_timeout: Duration,
    /// Instances per node, busy or idle.
    pub max_instances_per_node: usize,
    /// Invocations waiting for an instance, at most.
    pub max_queue: usize,
    /// Children per `Spawn` call, at most.
    pub spawn_batch: u32,
    /// `off`, `window` or `recorded`.
    pub prefetch: String,
    /// How long a function's command may take to warm up.
    pub register_timeout: Duration,
    /// How long a registration waits for the nodes to prepare the new
    /// seed; the rest go on in the background.
    pub prepare_wait: Duration,
    /// A request body larger than this is refused (413).
    pub max_body_bytes: usize,
    /// Who may call the API: the admin token (all functions) and tenants
    /// (their own functions, run as their uid). None: anyone who can
    /// reach it, so only on loopback.
    pub auth: Option<Arc<crate::daemon::auth::Auth>>,
    /// HTTPS with this certificate, if given.
    pub tls: Option<Tls>,
}

/// The gateway's TLS (its certificate and key, made ready).
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for kube::KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeApi")
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            nodes: Vec::new(),
            discover: None,
            dns_server: None,
            kube: None,
            discover_interval: Duration::from_secs(5),
            node_poll: Duration::from_secs(2),
            token: None,
            worker_listen: "127.0.0.1:0".into(),
            worker_advertise: None,
            keep_alive: Duration::from_secs(60),
            invoke_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(20),
            queue_timeout: Duration::from_secs(30),
            max_instances_per_node: 2000,
            max_queue: 10_000,
            spawn_batch: 16,
            prefetch: "recorded".into(),
            register_timeout: Duration::from_secs(120),
            prepare_wait: Duration::from_secs(30),
            max_body_bytes: 2 << 20,
            auth: None,
            tls: None,
        }
    }
}

/// The gateway's shared state.
pub(crate) struct Gateway {
    pub cfg: Config,
    /// The nodes now: given, and discovered.
    pub nodes: RwLock<Vec<Arc<nodes::Node>>>,
    pub functions: Mutex<HashMap<String, Arc<Function>>>,
    /// Names whose registration is under way.
    pub registering: Mutex<std::collections::HashSet<String>>,
    /// The address instances connect back to.
    pub worker_addr: String,
}

impl Gateway {
    /// The registered functions, now.
    pub(crate) fn function_list(&self) -> Vec<Arc<Function>> {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// What an invocation can end in, besides a result.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No such function.
    #[error("unknown function {0:?}")]
    Unknown(String),
    /// The request body is not JSON.
    #[error("the request body is not JSON: {0}")]
    BadRequest(String),
    /// No instance could be had.
    #[error("{0}")]
    Unavailable(String),
    /// The instance died.
    #[error("the instance crashed: {0}")]
    Crashed(String),
    /// The handler took too long; the instance was killed.
    #[error("the handler did not answer within {0} ms; its instance was killed")]
    Timeout(u128),
    /// The handler raised.
    #[error("the handler raised: {0}")]
    Handler(String),
}

impl InvokeError {
    fn status(&self) -> StatusCode {
        match self {
            InvokeError::Unknown(_) => StatusCode::NOT_FOUND,
            InvokeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            InvokeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::Crashed(_) => StatusCode::BAD_GATEWAY,
            InvokeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::Handler(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for InvokeError {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, axum::Json(json!({ "error": self.to_string() }))).into_response()
    }
}

fn err(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": msg.to_string() }))).into_response()
}

type Shared = State<Arc<Gateway>>;

use crate::daemon::auth::Principal;

/// Who is calling (set by [`authenticate`]).
type Caller = Option<axum::Extension<Principal>>;

/// The tenant's namespace: its functions are `tenant/name` inside.
fn key_of(who: &Caller, name: &str) -> String {
    match who.as_ref().map(|e| &e.0) {
        Some(Principal::Tenant(t)) => format!("{}/{name}", t.name),
        _ => name.to_string(),
    }
}

/// May `who` see the function kept under `key`?
fn owns(who: &Caller, key: &str) -> bool {
    match who.as_ref().map(|e| &e.0) {
        Some(Principal::Tenant(t)) => key
            .strip_prefix(t.name.as_str())
            .is_some_and(|r| r.starts_with('/')),
        _ => true,
    }
}

/// Every path but /healthz and /openapi.json needs a credential when the
/// gateway has any configured; /metrics (every tenant's figures) needs the
/// admin token.
async fn authenticate(
    State(g): Shared,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(auth) = &g.cfg.auth else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/healthz" || path == "/openapi.json" {
        return next.run(req).await;
    }
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let p = match auth.identify(authz.as_deref(), true, None) {
        Ok(p) => p,
        Err(e) => {
            return err(
                StatusCode::UNAUTHORIZED,
                e.message().replace("on TCP", "by this gateway"),
            )
        }
    };
    if path == "/metrics" && matches!(p, Principal::Tenant(_)) {
        return err(
            StatusCode::FORBIDDEN,
            "/metrics is the operator's (the admin token)",
        );
    }
    req.extensions_mut().insert(p);
    next.run(req).await
}

async fn invoke(State(g): Shared, who: Caller, Path(name): Path<String>, body: Bytes) -> Response {
    if body.iter().all(u8::is_ascii_whitespace) {
        return InvokeError::BadRequest("the body is empty; send the event, {} for none".into())
            .into_response();
    }
    let f = g
        .functions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key_of(&who, &name))
        .cloned();
    let Some(f) = f else {
        return InvokeError::Unknown(name).into_response();
    };
    let event: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return InvokeError::BadRequest(e.to_string()).into_response(),
    };
    match pool::invoke(&g, &f, event).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Longest function name.
const MAX_NAME: usize = 128;

async fn register(State(g): Shared, who: Caller, body: Bytes) -> Response {
    if body.iter().all(u8::is_ascii_whitespace) {
        return err(
            StatusCode::BAD_REQUEST,
            "the body is empty; send the function as JSON: {\"name\", \"command\": [...]}",
        );
    }
    let mut spec: register::FunctionSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("bad function spec: {e}")),
    };
    if spec.name.is_empty()
        || spec.name.len() > MAX_NAME
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return err(
            StatusCode::BAD_REQUEST,
            format!(
                "function name {:?} must be 1-{MAX_NAME} letters, digits, '-', '_' or '.'",
                spec.name
            ),
        );
    }
    // A tenant's function lives in its namespace, is made as its seed and
    // runs as its uid.
    spec.name = key_of(&who, &spec.name);
    let tenant = match who.as_ref().map(|e| &e.0) {
        Some(Principal::Tenant(t)) => Some(t.clone()),
        _ => None,
    };
    // The name is taken from here on, so two concurrent registrations of
    // one name cannot both make a seed.
    let name = spec.name.clone();
    {
        let fs = g.functions.lock().unwrap_or_else(|e| e.into_inner());
        let mut reg = g.registering.lock().unwrap_or_else(|e| e.into_inner());
        if fs.contains_key(&name) || !reg.insert(name.clone()) {
            return err(
                StatusCode::CONFLICT,
                format!("function {name:?} is already registered"),
            );
        }
    }
    let r = register::register(&g, spec, tenant).await;
    let resp = match r {
        Ok(f) => {
            let v = f.describe();
            g.functions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(f.name.clone(), f.clone());
            tokio::spawn(pool::spawner(g.clone(), f));
            (StatusCode::CREATED, axum::Json(v)).into_response()
        }
        Err(e) => err(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    g.registering
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    resp
}

async fn list(State(g): Shared, who: Caller) -> Response {
    let fs: Vec<Value> = g
        .functions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|f| owns(&who, &f.name))
        .map(|f| f.describe())
        .collect();
    // Which seeds a node caches names other tenants' seeds: the admin's.
    let tenant = matches!(who.as_ref().map(|e| &e.0), Some(Principal::Tenant(_)));
    let nodes: Vec<Value> = g
        .node_list()
        .iter()
        .map(|n| {
            let r = n.reported();
            let cached: Vec<&String> = if tenant {
                Vec::new()
            } else {
                r.cached_seeds.iter().collect()
            };
            json!({"addr": n.spec.addr, "live": n.live.load(Ordering::Relaxed),
                   "spawned": n.spawned.load(Ordering::Relaxed),
                   "state": n.state(), "why": n.why(), "discovered": n.discovered,
                   "hostname": r.hostname, "cpus": r.cpus,
                   "memory_available_bytes": r.memory_available_bytes,
                   "cached_seeds": cached})
        })
        .collect();
    axum::Json(json!({ "functions": fs, "nodes": nodes })).into_response()
}

async fn remove(State(g): Shared, who: Caller, Path(name): Path<String>) -> Response {
    let f = g
        .functions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key_of(&who, &name));
    let Some(f) = f else {
        return InvokeError::Unknown(name).into_response();
    };
    f.retire_all().await;
    let (seed, origin) = f.seed();
    let mut c = origin.client.clone();
    if let Err(e) = c.drop_seed(seed.clone()).await {
        warn!(function = %name, "dropping seed {}: {}", seed.id, e.message());
    }
    info!(function = %name, "function removed");
    axum::Json(json!({ "removed": name })).into_response()
}

async fn metrics(State(g): Shared) -> Response {
    let mut s = String::new();
    let fs = g.function_list();
    s.push_str("# TYPE gateway_invocations_total counter\n");
    for f in &fs {
        f.metrics(&mut s);
    }
    s.push_str("# TYPE gateway_node_instances gauge\n");
    let nodes = g.node_list();
    for n in &nodes {
        s.push_str(&format!(
            "gateway_node_instances{{node=\"{}\"}} {}\ngateway_node_spawned_total{{node=\"{}\"}} {}\ngateway_node_placeable{{node=\"{}\"}} {}\n",
            n.spec.addr,
            n.live.load(Ordering::Relaxed),
            n.spec.addr,
            n.spawned.load(Ordering::Relaxed),
            n.spec.addr,
            u8::from(n.placeable()),
        ));
    }
    s.push_str(&format!(
        "# TYPE gateway_nodes gauge\ngateway_nodes{{state=\"serving\"}} {}\ngateway_nodes{{state=\"draining\"}} {}\n",
        nodes.iter().filter(|n| n.placeable()).count(),
        nodes.iter().filter(|n| !n.placeable()).count(),
    ));
    s.into_response()
}

/// The OpenAPI description, with this build's version.
async fn openapi() -> Response {
    let mut v: Value = match serde_json::from_str(include_str!("openapi.json")) {
        Ok(v) => v,
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("openapi.json: {e}"),
            )
        }
    };
    v["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    axum::Json(v).into_response()
}

async fn no_route(uri: axum::http::Uri) -> Response {
    err(
        StatusCode::NOT_FOUND,
        format!("no such path {}; GET /openapi.json lists them", uri.path()),
    )
}

/// Error answers that are not JSON yet (axum's own: a wrong method, a
/// body too large, an extractor's refusal) become `{"error": ...}`,
/// keeping their status and headers (`Allow` of a 405).
async fn json_errors(
    State(g): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let msg = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than the gateway's limit of {} bytes (--max-body-bytes)",
            g.cfg.max_body_bytes
        ),
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "method not allowed here; allowed: {}",
            parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
        ),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_lowercase(),
        _ => text,
    };
    let mut r = err(status, msg);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k, v.clone());
        }
    }
    r
}

/// HTTPS: every connection's TLS handshake (10 s at most), then HTTP/1.1
/// or 2 on it, until `shutdown`.
async fn serve_tls<A>(
    http: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: A,
    shutdown: impl std::future::Future<Output = ()>,
) where
    A: tower::Service<
            axum::extract::Request,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    A::Future: Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = http.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return info!(%peer, "no TLS handshake within 10 s"),
                };
            let svc = hyper_util::service::TowerToHyperService::new(tower::util::MapRequest::new(
                app,
                |r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new),
            ));
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        });
    }
}

/// Is `HOST:PORT` a loopback address (or localhost)?
fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Run the gateway until SIGINT/SIGTERM; `ready` is told the HTTP address
/// once it listens.
pub async fn serve(
    cfg: Config,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), GatewayError> {
    if cfg.nodes.is_empty() && cfg.discover.is_none() {
        return Err(GatewayError::Config(
            "no nodes: give --node, or --discover to find them".into(),
        ));
    }
    if cfg.auth.is_none() && !is_loopback(&cfg.listen) {
        return Err(GatewayError::Config(format!(
            "refusing to listen on {} beyond loopback with no credentials: give --api-token-file (and --tenants-file for tenants)",
            cfg.listen
        )));
    }
    cfg.prefetch
        .parse::<remotefork::pager::Prefetch>()
        .map_err(|e| GatewayError::Config(e.to_string()))?;
    if (cfg.nodes.len() > 1 || cfg.discover.is_some())
        && cfg.nodes.first().is_some_and(|n| n.peer.is_none())
    {
        return Err(GatewayError::Config(format!(
            "node {} makes the seeds and other nodes must reach it: give it peer=HOST:PORT",
            cfg.nodes[0].addr
        )));
    }
    let mut given = Vec::new();
    for spec in &cfg.nodes {
        let n = nodes::connect(spec, cfg.token.as_deref(), false)
            .await
            .map_err(|error| GatewayError::Node {
                addr: spec.addr.clone(),
                error,
            })?;
        given.push(n);
    }
    let discoverer = match &cfg.discover {
        Some(src) => Some(
            discovery::Discoverer::new(src.clone(), cfg.dns_server, cfg.kube.clone())
                .map_err(|e| GatewayError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let workers = TcpListener::bind(&cfg.worker_listen)
        .await
        .map_err(|error| GatewayError::Io {
            what: format!("binding the worker port {}", cfg.worker_listen),
            error,
        })?;
    let bound = workers.local_addr().map_err(|error| GatewayError::Io {
        what: "worker address".into(),
        error,
    })?;
    let worker_addr = match &cfg.worker_advertise {
        Some(a) if a.ends_with(":0") => format!("{}:{}", a.trim_end_matches(":0"), bound.port()),
        Some(a) => a.clone(),
        None => bound.to_string(),
    };
    let http = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|error| GatewayError::Io {
            what: format!("binding {}", cfg.listen),
            error,
        })?;
    let local = http.local_addr().map_err(|error| GatewayError::Io {
        what: "http address".into(),
        error,
    })?;
    let g = Arc::new(Gateway {
        cfg,
        nodes: RwLock::new(Vec::new()),
        functions: Mutex::new(HashMap::new()),
        registering: Mutex::new(Default::default()),
        worker_addr,
    });
    for n in given {
        nodes::add(&g, n);
    }
    if let Some(d) = discoverer {
        info!(source = %d.source(), every_ms = g.cfg.discover_interval.as_millis() as u64, "discovering nodes");
        tokio::spawn(nodes::discover(g.clone(), d));
    }
    tokio::spawn(pool::accept_workers(g.clone(), workers));
    tokio::spawn(pool::reaper(g.clone()));
    let app = Router::new()
        .route("/functions", post(register).get(list))
        .route("/functions/{name}", delete(remove))
        .route("/invoke/{name}", post(invoke))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(g.cfg.max_body_bytes))
        .with_state(g.clone());
    // Around the whole router (not each route), so that a 405's Allow
    // header, set by the router, is there to read.
    let app = tower::Layer::layer(
        &axum::middleware::from_fn_with_state(g.clone(), authenticate),
        app,
    );
    let app = tower::Layer::layer(
        &axum::middleware::from_fn_with_state(g.clone(), json_errors),
        app,
    );
    // The line scripts and tests wait for.
    info!(http = %local, workers = %g.worker_addr, nodes = g.node_list().len(), "gateway listening");
    ready(local);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    match g.cfg.tls.clone() {
        None => axum::serve(http, axum::ServiceExt::into_make_service(app))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|error| GatewayError::Io {
                what: "serving HTTP".into(),
                error,
            })?,
        Some(Tls(acceptor)) => serve_tls(http, acceptor, app, shutdown).await,
    }
    let fs: Vec<Arc<Function>> = g
        .functions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, f)| f)
        .collect();
    for f in fs {
        f.retire_all().await;
    }
    info!("gateway stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_spec_parses_options() {
        let n: NodeSpec = "unix:/run/a.sock,peer=10.0.0.1:7070".parse().unwrap();
        assert_eq!(n.peer.as_deref(), Some("10.0.0.1:7070"));
        assert_eq!(n.coop_socket(), Some(PathBuf::from("/run/a.sock.coop")));
        let n: NodeSpec = "10.0.0.2:7070".parse().unwrap();
        assert_eq!(n.peer.as_deref(), Some("10.0.0.2:7070"));
        assert_eq!(n.coop_socket(), None);
        let n: NodeSpec = "10.0.0.2:7070,coop=/x.coop".parse().unwrap();
        assert_eq!(n.coop_socket(), Some(PathBuf::from("/x.coop")));
        assert!("unix:/a,bogus=1".parse::<NodeSpec>().is_err());
        assert!("".parse::<NodeSpec>().is_err());
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(InvokeError::Unknown("f".into()).status(), 404);
        assert_eq!(InvokeError::BadRequest("x".into()).status(), 400);
        assert_eq!(InvokeError::Unavailable("x".into()).status(), 503);
        assert_eq!(InvokeError::Crashed("x".into()).status(), 502);
        assert_eq!(InvokeError::Timeout(5).status(), 504);
        assert_eq!(InvokeError::Handler("x".into()).status(), 500);
    }
}
