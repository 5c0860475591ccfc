//! `forkd serve`: the per-node daemon.
//!
//! gRPC on a Unix socket (local clients; file permissions are the access
//! control) and optionally on TCP (other nodes, the gateway; a bearer token
//! is required, and spawning needs the seed's key). Seeds live in the state
//! directory and survive restarts; children are started by long-lived
//! spawner threads and served by each seed's pager.

pub mod auth;
pub mod authority;
pub mod handover;
pub mod health;
pub mod pageserver;
pub mod readyline;
pub mod registry;
pub mod spawner;
pub mod transport;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use remotefork::capture::{capture, CaptureError, CaptureOptions};
use remotefork::pager::Prefetch;
use remotefork::SpawnOptions;
use serde::Deserialize;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument};

use crate::pb::{self, forkd_server::Forkd, forkd_server::ForkdServer};
use registry::{Registry, SeedMeta};
use spawner::{Job, Spawner};

/// Daemon configuration: a TOML file, every field also a flag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket path.
    pub socket: PathBuf,
    /// TCP address to listen on too (`HOST:PORT`), if any.
    pub listen: Option<String>,
    /// State directory (seed images).
    pub state_dir: PathBuf,
    /// File holding the bearer token required on TCP.
    pub token_file: Option<PathBuf>,
    /// How pages come from other nodes: `auto` (RDMA where both nodes
    /// have it, else TCP), `rdma` (required) or `tcp`.
    pub transport: String,
    /// The RDMA device to use [default: the first with an active port].
    pub rdma_device: Option<String>,
    /// Spawner threads.
    pub spawner_threads: usize,
    /// The cooperative API's socket (JSON lines) [default: the socket path + ".coop"].
    pub coop_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this `HOST:PORT`.
    pub metrics: Option<String>,
    /// Serve seeds' pages to other nodes on this `HOST:PORT` (the address
    /// other nodes are told, so not 0.0.0.0).
    pub page_listen: Option<String>,
    /// The page server's address as other nodes reach it, when that is
    /// not `page_listen` (a proxy, a NAT, a Service) [default: page_listen].
    pub page_advertise: Option<String>,
    /// Token for calling other nodes [default: token_file's].
    pub peer_token_file: Option<PathBuf>,
    /// How long a remote page fetch may take, retries included, before the
    /// child that needs it is killed.
    pub page_deadline_ms: u64,
    /// A seed's node template unused this long is dropped (it holds a copy
    /// of the seed's memory); the next spawn builds it again.
    pub template_idle_s: u64,
    /// How long the keeper keeps children alive (waiting for a restarted
    /// forkd to take them back) after forkd is gone; then it kills them.
    pub handover_grace_s: u64,
    /// Fetch other nodes' seeds whole into the node cache in the
    /// background, so children stop depending on the seed's node.
    pub drain: bool,
    /// On SIGTERM, how long spawns under way may run on before forkd stops.
    pub drain_s: u64,
    /// Tenants: their token digests and the uids their children run as
    /// (docs/SECURITY.md). With tenants, the Unix socket serves root and
    /// their uids only.
    pub tenants_file: Option<PathBuf>,
    /// Let TCP callers holding the node token create seeds from a command
    /// (run as root). Off: only the Unix socket's root may (and tenants
    /// allowed to, as their own uid).
    pub remote_commands: bool,
    /// The other nodes (gRPC `HOST:PORT`) this forkd may send its peer
    /// token to as a Spawn's `origin`. Empty: any origin the operator
    /// names; never one a tenant names.
    pub peers: Vec<String>,
    /// TLS on the TCP listener: the certificate chain (PEM)...
    pub tls_cert: Option<PathBuf>,
    /// ...and its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The CA that other nodes' certificates are checked against, for
    /// `https://` origins (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Children queued (asked for, not started yet) over every spawn, at
    /// most; beyond, spawns are refused with RESOURCE_EXHAUSTED.
    pub max_queued: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from("/run/forkd/forkd.sock"),
            listen: None,
            state_dir: PathBuf::from("/var/lib/forkd"),
            token_file: None,
            transport: "auto".into(),
            rdma_device: None,
            spawner_threads: 2,
            coop_socket: None,
            metrics: None,
            page_listen: None,
            page_advertise: None,
            peer_token_file: None,
            page_deadline_ms: 5000,
            template_idle_s: 600,
            handover_grace_s: 60,
            drain: true,
            drain_s: 20,
            tenants_file: None,
            remote_commands: false,
            peers: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            max_queued: 200_000,
        }
    }
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Configuration problem.
    #[error("configuration: {0}")]
    Config(String),
    /// I/O problem.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The state directory could not be opened.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// One started child.
struct InstanceRec {
    seed_id: String,
    pid: u32,
    state: String,
    labels: HashMap<String, String>,
    started_unix_ms: u64,
    /// How it ended, once it has.
    end: Option<pb::Exited>,
    /// Started by an earlier forkd, handed over.
    adopted: bool,
    notes: Vec<String>,
    /// The start of its output ([`OUTPUT_KEPT`] at most) and how much it wrote.
    stdout: Vec<u8>,
    stdout_bytes: u64,
    /// The tenant that owns it ("" for the operator's).
    owner: String,
    /// The uid it runs as.
    uid: u32,
}

/// A staged input, its owner and when it was last used.
type Staged = (Arc<Vec<u8>>, String, Instant);

/// Largest staged input.
const MAX_INPUT: usize = 256 << 20;
/// Staged inputs held in all.
const MAX_INPUTS: usize = 1 << 30;
/// How long a staged input is kept after its last use.
const INPUT_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

impl State {
    /// A staged input, by id.
    fn input(&self, id: &str, who: &auth::Principal) -> Result<Arc<Vec<u8>>, Status> {
        let mut g = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let (d, _, used) = g
            .get_mut(id)
            .filter(|(_, o, _)| who.may_see(o))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no staged input {id:?} (unknown, or expired {} s after its last use)",
                    INPUT_KEPT.as_secs()
                ))
            })?;
        *used = Instant::now();
        Ok(d.clone())
    }
}

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

/// Output kept per instance for `GetInstance`.
const OUTPUT_KEPT: usize = 1 << 20;

/// Largest output carried whole in the `Exited` event.
const EXITED_STDOUT_MAX: usize = 1 << 20;

/// A child to follow to its end.
struct Follow {
    base: pb::InstanceEvent,
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
    out: Option<std::os::fd::OwnedFd>,
    stats: Option<Arc<remotefork::pager::ChildStats>>,
    /// The spawn's client (none for a handed-over child: Watch only).
    tx: Option<mpsc::Sender<Result<pb::InstanceEvent, Status>>>,
    started: Instant,
    /// It ended already, while no forkd watched (a handed-over child).
    ended: Option<kernel_helpers::proc::Ended>,
}

impl InstanceRec {
    fn to_pb(&self, id: &str, with_output: bool) -> pb::Instance {
        let e = self.end.clone().unwrap_or_default();
        pb::Instance {
            id: id.to_string(),
            seed_id: self.seed_id.clone(),
            pid: self.pid,
            state: self.state.clone(),
            labels: self.labels.clone(),
            started_unix_ms: self.started_unix_ms,
            ended: self.end.is_some(),
            exit_code: e.exit_code,
            signal: e.signal,
            reason: e.reason,
            adopted: self.adopted,
            notes: self.notes.clone(),
            stdout: if with_output {
                self.stdout.clone()
            } else {
                Vec::new()
            },
            stdout_bytes: self.stdout_bytes,
            owner: self.owner.clone(),
            uid: self.uid,
        }
    }
}

/// Ended instances kept (for `ListInstances` and `KillInstance`'s "not
/// running" answer); older ones are forgotten, so a long-running node's
/// table does not grow without end.
const ENDED_KEPT: usize = 10_000;

/// Started children: every running one, and the last [`ENDED_KEPT`] that ended.
#[derive(Default)]
struct Instances {
    map: HashMap<String, InstanceRec>,
    /// Ended ones, oldest first.
    ended: std::collections::VecDeque<String>,
}

impl Instances {
    /// Mark `id` ended, forgetting the oldest ended beyond the cap.
    fn end(&mut self, id: &str, end: &pb::Exited, stdout: Vec<u8>, stdout_bytes: u64) {
        let Some(i) = self.map.get_mut(id) else {
            return;
        };
        i.state = if end.signal != 0 {
            format!("killed by signal {}", end.signal)
        } else {
            format!("exited {}", end.exit_code)
        };
        i.end = Some(pb::Exited {
            stdout: Vec::new(),
            ..end.clone()
        });
        i.stdout = stdout;
        i.stdout_bytes = stdout_bytes;
        self.ended.push_back(id.to_string());
        while self.ended.len() > ENDED_KEPT {
            if let Some(old) = self.ended.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn running(&self) -> usize {
        self.map.values().filter(|i| i.state == "running").count()
    }
}

/// Shared daemon state.
pub struct State {
    /// Drain other nodes' seeds into the node cache (`Config::drain`).
    drain: bool,
    /// Inputs staged with `PutInput`, by id: the input and its last use.
    inputs: Mutex<HashMap<String, Staged>>,
    registry: Arc<Registry>,
    /// The keeper: children outlive this forkd (see [`handover`]).
    handover: handover::Handover,
    spawner: Spawner,
    instances: Mutex<Instances>,
    events: broadcast::Sender<pb::InstanceEvent>,
    next_instance: AtomicU64,
    /// Random per daemon start, in every instance id: ids from different
    /// nodes (or restarts) never collide.
    instance_tag: String,
    spawns: AtomicU64,
    spawn_failures: AtomicU64,
    /// Children that started with notes (what they could not keep exactly).
    children_with_notes: AtomicU64,
    /// Children asked for and not started yet (or failed), over every spawn.
    queued: AtomicU64,
    /// See [`Config::max_queued`].
    max_queued: u64,
    /// Notes already logged, per seed (each is logged once, not per child).
    notes_logged: Mutex<std::collections::HashSet<(String, String)>>,
    /// Other nodes' seeds, fetched once each: concurrent first spawns of
    /// one seed wait for the same fetch (not over each other's files),
    /// while different seeds fetch in parallel.
    remote: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<RemoteSeed>>>>>,
    remote_dir: PathBuf,
    page_server: Option<String>,
    peer_token: Option<String>,
    page_deadline: std::time::Duration,
    hostname: String,
    transport: String,
    transports: transport::Transports,
    life: Arc<health::Lifecycle>,
    /// Who may do what.
    auth: Arc<auth::Auth>,
    /// See [`Config::remote_commands`].
    remote_commands: bool,
    /// See [`Config::peers`].
    peers: Vec<String>,
    /// For `tls://` page servers of other nodes (from `--tls-ca`).
    page_tls: Option<Arc<rustls::ClientConfig>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first line of a token file, trimmed.
fn read_token(p: &std::path::Path) -> Result<String, ServeError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|source| ServeError::Io {
            what: format!("reading token file {}", p.display()),
            source,
        })
}

/// Marks requests that came over TCP (they must present seed keys).
#[derive(Clone, Copy)]
struct Remote;

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    state: Arc<State>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::InstanceEvent, Status>> + Send>>;

fn capture_status(e: &CaptureError) -> Status {
    match e {
        CaptureError::NoSuchProcess(_) => Status::not_found(e.to_string()),
        CaptureError::NotPermitted { .. } => Status::permission_denied(e.to_string()),
        CaptureError::Zombie(_)
        | CaptureError::MultiThreaded { .. }
        | CaptureError::Exited { .. }
        | CaptureError::NoVdso(_)
        | CaptureError::Unsupported { .. } => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// What a spawn starts children from: a seed of this node or of another.
struct Target {
    id: String,
    cooperative: bool,
    /// The tenant that owns the seed ("" for the operator's).
    owner: String,
    restorer: Arc<remotefork::Seed>,
    local: Option<Arc<registry::Seed>>,
    /// Where the seed lives, for a later forkd.
    place: handover::SeedPlace,
}

/// A seed held by another node, as this node reaches it.
pub struct RemoteSeed {
    /// The key it was fetched with: every later use must present it.
    key: String,
    /// Its owner on its node.
    owner: String,
    cooperative: bool,
    restorer: Arc<remotefork::Seed>,
    /// When a spawn last used it (ms since the epoch): unused for the
    /// template idle time, and with no child running, it is evicted.
    last_used: AtomicU64,
}

impl Service {
    /// The seed `r` names: this node's, or (with `origin`) another node's,
    /// whose descriptor is fetched and whose pages come over TCP.
    async fn target_for(
        &self,
        r: Option<&pb::SeedRef>,
        origin: &str,
        remote: bool,
        who: &auth::Principal,
    ) -> Result<Target, Status> {
        self.target_adopting(r, origin, remote, None, who).await
    }

    /// [`Service::target_for`]; a seed this forkd has no restorer for yet
    /// gets one over `cache`, the node cache an earlier forkd kept (handed
    /// back by the keeper).
    async fn target_adopting(
        &self,
        r: Option<&pb::SeedRef>,
        origin: &str,
        remote: bool,
        cache: Option<remotefork::pager::source::CacheFds>,
        who: &auth::Principal,
    ) -> Result<Target, Status> {
        let sr = r.ok_or_else(|| Status::invalid_argument("no seed given"))?;
        let target = if origin.is_empty() || self.state.registry.get(&sr.id).is_some() {
            let seed = self.seed_for(r, remote, who)?;
            let s2 = seed.clone();
            let restorer = tokio::task::spawn_blocking(move || s2.restorer_adopting(cache))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| {
                    Status::failed_precondition(format!(
                        "seed {} cannot be restored here: {e}",
                        seed.meta.id
                    ))
                })?;
            Target {
                id: seed.meta.id.clone(),
                cooperative: seed.meta.cooperative,
                owner: seed.meta.owner.clone(),
                restorer,
                place: handover::SeedPlace {
                    id: seed.meta.id.clone(),
                    origin: String::new(),
                    key: String::new(),
                },
                local: Some(seed),
            }
        } else {
            if sr.id.len() != 16 || !sr.id.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(Status::invalid_argument(format!(
                    "{:?} is not a seed id",
                    sr.id
                )));
            }
            self.may_call(origin, who)?;
            // Keyed by origin and id; the key is checked on every use (a
            // seed fetched once with the right key is no one else's).
            let cell = self
                .state
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(format!("{origin}\n{}", sr.id))
                .or_default()
                .clone();
            let rs = cell
                .get_or_try_init(|| async {
                    Ok::<_, Status>(Arc::new(self.fetch_remote(origin, sr, cache).await?))
                })
                .await?
                .clone();
            if !auth::ct_eq(rs.key.as_bytes(), sr.key.as_bytes()) {
                return Err(Status::permission_denied(format!(
                    "wrong key for seed {} of {origin}",
                    sr.id
                )));
            }
            rs.last_used.store(now_ms(), Ordering::Relaxed);
            Target {
                id: sr.id.clone(),
                cooperative: rs.cooperative,
                owner: rs.owner.clone(),
                restorer: rs.restorer.clone(),
                local: None,
                place: handover::SeedPlace {
                    id: sr.id.clone(),
                    origin: origin.to_string(),
                    key: sr.key.clone(),
                },
            }
        };
        self.state
            .handover
            .seed_in_use(&target.place, &target.restorer);
        // Children here stop depending on another node once its pages are
        // all in this node's cache.
        if self.state.drain {
            target.restorer.drain_in_background();
        }
        Ok(target)
    }

    async fn fetch_remote(
        &self,
        origin: &str,
        sr: &pb::SeedRef,
        cache: Option<remotefork::pager::source::CacheFds>,
    ) -> Result<RemoteSeed, Status> {
        let mut c = crate::client::connect(origin, self.state.peer_token.as_deref())
            .await
            .map_err(|e| Status::unavailable(format!("seed {} lives on {origin}: {e}", sr.id)))?;
        let b = c
            .fetch_descriptor(sr.clone())
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!("{origin} refused seed {}: {}", sr.id, e.message()),
                )
            })?
            .into_inner();
        // Per origin and id: another node's seed of the same id is another seed.
        let dir =
            self.state
                .remote_dir
                .join(format!("{}-{}", sr.id, &auth::hash_token(origin)[..8]));
        remotefork::private_fs::dir(&dir)
            .map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
        remotefork::private_fs::write(&dir.join(remotefork::image::DESCRIPTOR_FILE), &b.descriptor)
            .map_err(|e| Status::internal(e.to_string()))?;
        if !b.working_set.is_empty() {
            // Recorded on the seed's node: this node's first child is fast too.
            remotefork::private_fs::write(
                &dir.join(remotefork::node::WORKING_SET_FILE),
                &b.working_set,
            )
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        let (source, via) = self.page_source(origin, sr, &b.page_server).await?;
        let restorer = tokio::task::spawn_blocking(move || -> Result<remotefork::Seed, String> {
            let image =
                remotefork::image::SeedImage::open_descriptor(&dir).map_err(|e| e.to_string())?;
            let size = source.size();
            if size != image.descriptor().image_bytes {
                return Err(format!(
                    "{} offers {size} bytes, the descriptor says {}",
                    source.name(),
                    image.descriptor().image_bytes
                ));
            }
            remotefork::Seed::remote_adopting(image, source, cache).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            Status::failed_precondition(format!(
                "seed {} from {origin} cannot be restored here: {e}",
                sr.id
            ))
        })?;
        info!(seed = %sr.id, %origin, transport = via, "remote seed ready");
        Ok(RemoteSeed {
            key: sr.key.clone(),
            owner: b.owner,
            cooperative: b.cooperative,
            restorer: Arc::new(restorer),
            last_used: AtomicU64::new(now_ms()),
        })
    }

    /// Where a remote seed's pages come from, per `--transport`: RDMA
    /// where this node and the seed's node can, else the TCP page server
    /// `page_server` (auto) or an error (rdma). Counted per transport.
    async fn page_source(
        &self,
        origin: &str,
        sr: &pb::SeedRef,
        page_server: &str,
    ) -> Result<(Box<dyn remotefork::pager::source::PageSource>, &'static str), Status> {
        let t = &self.state.transports;
        let deadline = self.state.page_deadline;
        let rdma = match t.configured() {
            "tcp" => Err("--transport tcp".to_string()),
            _ => match t.rdma_usable() {
                Ok(()) => t
                    .rdma_source(origin, self.state.peer_token.clone(), sr, deadline)
                    .await
                    .map_err(|e| format!("RDMA to {origin}: {e}")),
                Err(why) => Err(format!("no RDMA on this node: {why}")),
            },
        };
        match rdma {
            Ok(src) => {
                return Ok((
                    Box::new(transport::Counted::new(Box::new(src), t.rdma_bytes.clone())),
                    "rdma",
                ))
            }
            Err(why) if t.configured() == "rdma" => {
                return Err(Status::failed_precondition(format!(
                    "seed {} from {origin}: --transport rdma and {why}",
                    sr.id
                )))
            }
            Err(why) => {
                if t.configured() == "auto" {
                    transport::fell_back(origin, &sr.id, &why);
                }
            }
        }
        let (id, key, ps) = (sr.id.clone(), sr.key.clone(), page_server.to_string());
        let tls = self.state.page_tls.clone();
        let src = tokio::task::spawn_blocking(move || {
            remotefork::pager::tcp::TcpSource::connect_tls(&ps, &id, &key, deadline, tls)
                .map(|(s, _)| s)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            Status::failed_precondition(format!(
                "seed {} from {origin} cannot be paged here: {e}",
                sr.id
            ))
        })?;
        Ok((
            Box::new(transport::Counted::new(Box::new(src), t.tcp_bytes.clone())),
            "tcp",
        ))
    }

    /// May `who` have this forkd call `origin` with its peer token?
    fn may_call(&self, origin: &str, who: &auth::Principal) -> Result<(), Status> {
        let listed = self.state.peers.iter().any(|p| p == origin);
        let ok =
            listed || (self.state.peers.is_empty() && !matches!(who, auth::Principal::Tenant(_)));
        if ok {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "origin {origin:?} is not one of this node's peers (--peer); forkd sends its peer token to configured peers only"
            )))
        }
    }

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

    fn seed_for(
        &self,
        r: Option<&pb::SeedRef>,
        remote: bool,
        who: &auth::Principal,
    ) -> Result<Arc<registry::Seed>, Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("no seed given"))?;
        if r.id.is_empty() {
            return Err(Status::invalid_argument("empty seed id"));
        }
        // Another tenant's seed is as unknown as one that does not exist.
        let s = self
            .state
            .registry
            .get(&r.id)
            .filter(|s| who.may_see(&s.meta.owner))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown seed {:?} (dropped, or never created on this node)",
                    r.id
                ))
            })?;
        if remote && !auth::ct_eq(r.key.as_bytes(), s.meta.key.as_bytes()) {
            return Err(Status::permission_denied(format!(
                "wrong key for seed {}",
                r.id
            )));
        }
        Ok(s)
    }

    async fn create_from_pid(
        &self,
        pid: u32,
        name: String,
        cooperative: bool,
        owner: String,
    ) -> Result<pb::Seed, Status> {
        let id = crate::random_hex(8).map_err(|e| Status::internal(e.to_string()))?;
        let key = crate::random_hex(16).map_err(|e| Status::internal(e.to_string()))?;
        let dir = self.state.registry.tmp_dir(&id);
        let file_store = Some(self.state.registry.file_store());
        let span = info_span!("create_seed", seed = %id, pid);
        // Should forkd die mid-capture, the keeper reaps the clone's zombie
        // in the captured process.
        let st = self.state.clone();
        let zkey = format!("z/{id}");
        let (st2, zkey2) = (st.clone(), zkey.clone());
        let d = tokio::task::spawn_blocking(move || {
            capture(
                pid as i32,
                &dir,
                &CaptureOptions {
                    durable: true,
                    on_clone: Some(Box::new(move |clone| {
                        st2.handover.note(
                            &zkey2,
                            &serde_json::json!({ "parent": pid, "clone": clone }),
                        );
                    })),
                    file_store,
                    ..Default::default()
                },
            )
        })
        .instrument(span)
        .await
        .map_err(|e| Status::internal(e.to_string()));
        st.handover.release(&zkey);
        let d = d?.map_err(|e| capture_status(&e))?;
        let meta = SeedMeta {
            id: id.clone(),
            key,
            name: if name.is_empty() {
                format!("pid-{pid}")
            } else {
                name
            },
            created_unix_ms: now_ms(),
            source_pid: pid,
            pause_us: d.stats.pause_ns / 1000,
            capture_us: d.stats.capture_ns / 1000,
            cooperative,
            owner,
        };
        let seed = self
            .state
            .registry
            .commit(meta)
            .map_err(|e| Status::internal(e.to_string()))?;
        info!(seed = %id, pid, "seed created");
        Ok(seed.to_pb(&self.state.hostname, true))
    }

    async fn create_from_command(
        &self,
        c: pb::StartCommand,
        name: String,
        who: &auth::Principal,
        peer: Option<auth::Peer>,
        owner: String,
    ) -> Result<pb::Seed, Status> {
        // Who the command runs as: the seed's tenant, a local caller's own
        // uid; root only for root on the Unix socket and (if enabled) nodes.
        let for_tenant = self.state.auth.tenant_named(&owner).map(|t| (t.uid, t.gid));
        let run_as = match (who, peer) {
            (auth::Principal::Tenant(t), _) if !t.create_from_command => {
                return Err(Status::permission_denied(format!(
                    "tenant {} may not create seeds from a command (create_from_command in the tenants file)",
                    t.name
                )))
            }
            // Not root: the seed's tenant.
            _ if for_tenant.is_some() => for_tenant,
            (auth::Principal::Tenant(t), _) => Some((t.uid, t.gid)),
            (auth::Principal::Node, _) if !self.state.remote_commands => {
                return Err(Status::permission_denied(
                    "creating a seed from a command over the network is off on this node (forkd serve --remote-commands turns it on); capture a running process on the node instead, or make the seed a tenant's (owner)",
                ))
            }
            (_, Some(p)) if p.uid != 0 => Some((p.uid, p.gid)),
            _ => None,
        };
        if c.argv.is_empty() {
            return Err(Status::invalid_argument("empty command"));
        }
        if c.ready_line.is_empty() {
            return Err(Status::invalid_argument(
                "a command needs a ready_line to know when to capture it",
            ));
        }
        let mut cmd = tokio::process::Command::new(&c.argv[0]);
        cmd.args(&c.argv[1..])
            .envs(&c.env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if !c.cwd.is_empty() {
            cmd.current_dir(&c.cwd);
        }
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        // Its own session: nothing it signals reaches forkd.
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| Status::invalid_argument(format!("cannot start {:?}: {e}", c.argv[0])))?;
        let pid = child
            .id()
            .ok_or_else(|| Status::internal("the command exited at once"))?;
        let timeout = std::time::Duration::from_millis(if c.ready_timeout_ms == 0 {
            30_000
        } else {
            c.ready_timeout_ms as u64
        });
        let result = match readyline::wait(&mut child, &c.argv, &c.ready_line, timeout).await {
            Ok(()) => {
                let default = std::path::Path::new(&c.argv[0])
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                self.create_from_pid(
                    pid,
                    if name.is_empty() { default } else { name },
                    false,
                    owner,
                )
                .await
            }
            Err(e) => Err(e),
        };
        // The seed holds the process now; the original is not needed.
        let _ = child.kill().await;
        result
    }
}

impl Service {
    /// Take back what an earlier forkd handed its keeper: serve its
    /// running children on (same node cache, page tables rebuilt from their
    /// journals), report those that ended meanwhile, and those the keeper
    /// had to kill.
    async fn adopt(&self, handed: Vec<crate::keeper::Handed>, orphans: Vec<serde_json::Value>) {
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
        let mut targets: HashMap<String, Result<Arc<remotefork::Seed>, String>> = HashMap::new();
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
                    match r.adopt(remotefork::node::Adopted {
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

#[tonic::async_trait]
impl Forkd for Service {
    async fn create_seed(
        &self,
        req: Request<pb::CreateSeedRequest>,
    ) -> Result<Response<pb::Seed>, Status> {
        let _work = self.state.life.admit("seed captures")?;
        let who = auth::principal(&req);
        let peer = req.extensions().get::<auth::Peer>().copied();
        let r = req.into_inner();
        // The operator may make a seed for a tenant; no one else chooses.
        let owner = match (r.owner.as_str(), &who) {
            ("", _) => who.owner().to_string(),
            (o, auth::Principal::Operator | auth::Principal::Node) => {
                if self.state.auth.tenant_named(o).is_none() {
                    return Err(Status::invalid_argument(format!(
                        "owner {o:?} is not a tenant of this node"
                    )));
                }
                o.to_string()
            }
            (_, _) => {
                return Err(Status::permission_denied(
                    "only the operator (root on the Unix socket, or the node token) may name a seed's owner",
                ))
            }
        };
        match r.source {
            Some(pb::create_seed_request::Source::Pid(pid)) => {
                // As the tenant's uid (whatever process sent its token),
                // else as the local caller's.
                match (&who, peer) {
                    (auth::Principal::Tenant(t), _) => auth::may_ptrace(t.uid, t.gid, pid)?,
                    (_, Some(p)) => auth::may_ptrace(p.uid, p.gid, pid)?,
                    _ => {}
                }
                self.create_from_pid(pid, r.name, false, owner)
                    .await
                    .map(Response::new)
            }
            Some(pb::create_seed_request::Source::Command(c)) => self
                .create_from_command(c, r.name, &who, peer, owner)
                .await
                .map(Response::new),
            None => Err(Status::invalid_argument("give a pid or a command")),
        }
    }

    async fn get_seed(&self, req: Request<pb::SeedRef>) -> Result<Response<pb::Seed>, Status> {
        let remote = req.extensions().get::<Remote>().is_some();
        let who = auth::principal(&req);
        let s = self.seed_for(Some(req.get_ref()), remote, &who)?;
        Ok(Response::new(s.to_pb(&self.state.hostname, !remote)))
    }

    async fn list_seeds(
        &self,
        req: Request<pb::ListSeedsRequest>,
    ) -> Result<Response<pb::ListSeedsResponse>, Status> {
        let remote = req.extensions().get::<Remote>().is_some();
        let who = auth::principal(&req);
        let seeds = self
            .state
            .registry
            .list()
            .iter()
            .filter(|s| who.may_see(&s.meta.owner))
            .map(|s| s.to_pb(&self.state.hostname, !remote))
            .collect();
        Ok(Response::new(pb::ListSeedsResponse { seeds }))
    }

    async fn drop_seed(
        &self,
        req: Request<pb::SeedRef>,
    ) -> Result<Response<pb::DropSeedResponse>, Status> {
        let remote = req.extensions().get::<Remote>().is_some();
        let who = auth::principal(&req);
        let s = self.seed_for(Some(req.get_ref()), remote, &who)?;
        self.state
            .registry
            .drop_seed(&s.meta.id)
            .map_err(|e| Status::internal(e.to_string()))?;
        self.state.transports.unexport(&s.meta.id);
        info!(seed = %s.meta.id, "seed dropped");
        Ok(Response::new(pb::DropSeedResponse {}))
    }

    type SpawnStream = EventStream;

    async fn spawn(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> Result<Response<Self::SpawnStream>, Status> {
        let work = self.state.life.admit("spawns")?;
        let remote = req.extensions().get::<Remote>().is_some();
        let who = auth::principal(&req);
        let r = req.into_inner();
        let target = self
            .target_for(r.seed.as_ref(), &r.origin, remote, &who)
            .await?;
        let run_as = self.run_as(&target, &who)?;
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
        let prefetch = match r.prefetch.as_str() {
            "" => Prefetch::Window,
            p => p.parse::<Prefetch>().map_err(Status::invalid_argument)?,
        };
        let opts = SpawnOptions::default()
            .lazy(!r.eager)
            .prefetch(prefetch)
            .share(true)
            .template(!r.no_template)
            .run_as(run_as);
        let st = self.state.clone();
        let restorer = target.restorer.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::InstanceEvent, Status>>(1024);
        let stdin = match (r.stdin_ref.as_str(), r.stdin.is_empty()) {
            ("", _) => Arc::new(r.stdin),
            (_, false) => {
                return Err(Status::invalid_argument(
                    "give the input either inline (stdin) or staged (stdin_ref), not both",
                ))
            }
            (id, true) => self.state.input(id, &who)?,
        };
        let capture_stdout = r.stdout == pb::StdoutMode::Capture as i32;
        let labels = r.labels;
        let args = r.args;
        tokio::spawn(async move {
            let _work = work;
            let mut unqueue = unqueue;
            let mut waiters = Vec::new();
            // Queue every child at once (the spawner threads take them in
            // order, as fast as they can), then follow each in turn.
            let mut queued = Vec::with_capacity(count as usize);
            for index in 0..count {
                let n = st.next_instance.fetch_add(1, Ordering::Relaxed);
                let iid = format!("{}-{}-{n}", target.id, st.instance_tag);
                let base = pb::InstanceEvent {
                    instance_id: iid.clone(),
                    seed_id: target.id.clone(),
                    index,
                    ..Default::default()
                };
                let (reply, wait) = oneshot::channel();
                let t = Instant::now();
                let stdin = if target.cooperative {
                    // checkpoint() in the child reads this first line.
                    let mut v =
                        serde_json::json!({ "instance_id": iid, "index": index, "args": args })
                            .to_string()
                            .into_bytes();
                    v.push(b'\n');
                    v.extend_from_slice(&stdin);
                    Arc::new(v)
                } else {
                    stdin.clone()
                };
                let job = Job {
                    restorer: restorer.clone(),
                    stdin: stdin.clone(),
                    capture_stdout,
                    opts,
                    reply,
                };
                let submitted = st.spawner.submit(job).map(|()| wait);
                queued.push((iid, base, t, submitted, stdin));
            }
            for (iid, base, t, submitted, stdin_of_child) in queued {
                let started = match submitted {
                    Ok(wait) => wait
                        .await
                        .unwrap_or_else(|_| Err("the spawner dropped the job".into())),
                    Err(e) => Err(e),
                };
                unqueue.one();
                let (child, out, stdin_w) = match started {
                    Ok(x) => (x.child, x.stdout, x.stdin),
                    Err(reason) => {
                        st.spawn_failures.fetch_add(1, Ordering::Relaxed);
                        let ev = pb::InstanceEvent {
                            kind: Some(pb::instance_event::Kind::Failed(pb::Failed { reason })),
                            ..base
                        };
                        st.publish(&tx, ev).await;
                        continue;
                    }
                };
                if let Some(s) = &target.local {
                    s.spawned.fetch_add(1, Ordering::Relaxed);
                }
                st.spawns.fetch_add(1, Ordering::Relaxed);
                let pid = child.pid() as u32;
                info!(seed = %target.id, instance = %iid, pid, running_us = child.restore_time().as_micros() as u64, "child started");
                let started_unix_ms = now_ms();
                let pidfd = match child.pidfd().try_clone_to_owned() {
                    Ok(p) => p,
                    Err(e) => {
                        // Gone already (it can exit that fast): reported as lost.
                        warn!(instance = %iid, error = %e, "no pidfd for a new child");
                        st.spawn_failures.fetch_add(1, Ordering::Relaxed);
                        let ev = pb::InstanceEvent {
                            pid,
                            kind: Some(pb::instance_event::Kind::Failed(pb::Failed {
                                reason: format!("lost track of the child at its start: {e}"),
                            })),
                            ..base
                        };
                        st.publish(&tx, ev).await;
                        continue;
                    }
                };
                if !child.notes().is_empty() {
                    st.children_with_notes.fetch_add(1, Ordering::Relaxed);
                    let mut logged = st.notes_logged.lock().unwrap_or_else(|e| e.into_inner());
                    for n in child.notes() {
                        if logged.len() < 10_000 && logged.insert((target.id.clone(), n.clone())) {
                            warn!(seed = %target.id, instance = %iid, note = %n, "a child differs from its parent (said on its Running event and in ListInstances)");
                        }
                    }
                }
                st.handover.child_started(
                    &iid,
                    base.index,
                    &target.place,
                    &child,
                    &pidfd,
                    out.as_ref(),
                    &labels,
                    prefetch,
                    started_unix_ms,
                    (&owner, run_as.map_or(child_uid, |r| r.uid)),
                );
                if let Some(w) = stdin_w {
                    st.clone()
                        .write_stdin(iid.clone(), w, stdin_of_child.clone());
                }
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
                            labels: labels.clone(),
                            started_unix_ms,
                            end: None,
                            adopted: false,
                            notes: child.notes().to_vec(),
                            stdout: Vec::new(),
                            stdout_bytes: 0,
                            owner: owner.clone(),
                            uid: run_as.map_or(child_uid, |r| r.uid),
                        },
                    );
                let ev = pb::InstanceEvent {
                    pid,
                    kind: Some(pb::instance_event::Kind::Started(pb::Started {})),
                    ..base.clone()
                };
                st.publish(&tx, ev).await;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let ev = pb::InstanceEvent {
                    pid,
                    kind: Some(pb::instance_event::Kind::Running(pb::Running {
                        time_to_running_ms: ms,
                        notes: child.notes().to_vec(),
                    })),
                    ..base.clone()
                };
                st.publish(&tx, ev).await;
                let (st2, tx2) = (st.clone(), tx.clone());
                let follow = Follow {
                    base,
                    pid,
                    pidfd,
                    out,
                    stats: child.stats().cloned(),
                    tx: Some(tx2),
                    started: t,
                    ended: None,
                };
                waiters.push(tokio::spawn(async move { st2.follow(follow).await }));
            }
            for w in waiters {
                let _ = w.await;
            }
        });
        let events = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(
            self.state.life.until_stopped(events),
        )))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let who = auth::principal(&req);
        let want = req.into_inner().seed_id;
        let g = self
            .state
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut instances: Vec<pb::Instance> = g
            .map
            .iter()
            .filter(|(_, i)| who.may_see(&i.owner))
            .filter(|(_, i)| want.is_empty() || i.seed_id == want)
            .map(|(id, i)| i.to_pb(id, false))
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::ListInstancesResponse { instances }))
    }

    async fn kill_instance(
        &self,
        req: Request<pb::KillInstanceRequest>,
    ) -> Result<Response<pb::KillInstanceResponse>, Status> {
        let who = auth::principal(&req);
        let id = req.into_inner().instance_id;
        let pid = {
            let g = self
                .state
                .instances
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let i = g
                .map
                .get(&id)
                .filter(|i| who.may_see(&i.owner))
                .ok_or_else(|| Status::not_found(format!("unknown instance {id:?}")))?;
            if i.state != "running" {
                return Err(Status::failed_precondition(format!(
                    "instance {id} is not running ({})",
                    i.state
                )));
            }
            i.pid
        };
        kernel_helpers::proc::signal(pid as i32, libc::SIGKILL)
            .map_err(|e| Status::internal(format!("killing {id} (pid {pid}): {e}")))?;
        Ok(Response::new(pb::KillInstanceResponse {}))
    }

    async fn put_input(
        &self,
        req: Request<tonic::Streaming<pb::InputChunk>>,
    ) -> Result<Response<pb::InputRef>, Status> {
        let owner = auth::principal(&req).owner().to_string();
        let mut stream = req.into_inner();
        let mut data = Vec::new();
        while let Some(c) = stream.message().await? {
            if data.len() + c.data.len() > MAX_INPUT {
                return Err(Status::resource_exhausted(format!(
                    "an input may be at most {} MiB",
                    MAX_INPUT >> 20
                )));
            }
            data.extend_from_slice(&c.data);
        }
        let id = crate::random_hex(8).map_err(|e| Status::internal(e.to_string()))?;
        let bytes = data.len() as u64;
        let mut g = self.state.inputs.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|_, (_, _, used)| used.elapsed() < INPUT_KEPT);
        let held: usize = g.values().map(|(d, _, _)| d.len()).sum();
        if held + data.len() > MAX_INPUTS {
            return Err(Status::resource_exhausted(format!(
                "staged inputs would exceed {} MiB in all; try again once earlier ones expire ({} s after their last use)",
                MAX_INPUTS >> 20,
                INPUT_KEPT.as_secs()
            )));
        }
        g.insert(id.clone(), (Arc::new(data), owner, Instant::now()));
        Ok(Response::new(pb::InputRef { id, bytes }))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let who = auth::principal(&req);
        let id = req.into_inner().instance_id;
        let g = self
            .state
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let i = g
            .map
            .get(&id)
            .filter(|i| who.may_see(&i.owner))
            .ok_or_else(|| Status::not_found(format!("unknown instance {id:?}")))?;
        Ok(Response::new(i.to_pb(&id, true)))
    }

    async fn node_info(
        &self,
        _req: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let running = self
            .state
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        Ok(Response::new(pb::NodeInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            hostname: self.state.hostname.clone(),
            kernel: remotefork::procfs::sysctl("kernel/osrelease"),
            vdso_hash: remotefork::node::vdso_hash().unwrap_or_default(),
            transports: self
                .state
                .transports
                .node_info(self.state.page_server.as_deref()),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: mem,
            seeds: self.state.registry.len() as u32,
            instances_running: running as u32,
            transport: self.state.transport.clone(),
            transport_selected: self.state.transports.selection().0.into(),
            transport_reason: self.state.transports.selection().1,
            pss_bytes: tokio::task::spawn_blocking(node_pss_bytes)
                .await
                .unwrap_or(0),
        }))
    }

    async fn fetch_descriptor(
        &self,
        req: Request<pb::SeedRef>,
    ) -> Result<Response<pb::DescriptorBundle>, Status> {
        // Always keyed: this is what another node pages from.
        let who = auth::principal(&req);
        let s = self.seed_for(Some(req.get_ref()), true, &who)?;
        let descriptor = std::fs::read(s.dir.join(remotefork::image::DESCRIPTOR_FILE))
            .map_err(|e| Status::internal(format!("reading seed {}: {e}", s.meta.id)))?;
        let working_set =
            std::fs::read(s.dir.join(remotefork::node::WORKING_SET_FILE)).unwrap_or_default();
        let page_server = self.state.page_server.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this node runs no page server (start forkd with --page-listen HOST:PORT)",
            )
        })?;
        Ok(Response::new(pb::DescriptorBundle {
            descriptor,
            working_set,
            page_server,
            image_bytes: s.image_bytes,
            cooperative: s.meta.cooperative,
            owner: s.meta.owner.clone(),
        }))
    }

    async fn open_page_channel(
        &self,
        req: Request<pb::OpenPageChannelRequest>,
    ) -> Result<Response<pb::OpenPageChannelResponse>, Status> {
        let who = auth::principal(&req);
        let r = req.into_inner();
        // Always keyed, as FetchDescriptor: this is what other nodes read.
        let seed = self.seed_for(r.seed.as_ref(), true, &who)?;
        let st = self.state.clone();
        // Registering a seed pins its page store: not on an async thread.
        tokio::task::spawn_blocking(move || {
            st.transports
                .open_page_channel(&seed, st.page_server.as_deref(), &r)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map(Response::new)
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = auth::principal(&req);
        let rx = self.state.events.subscribe();
        let st = self.state.clone();
        // A tenant watches its own instances' events only.
        let s = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter(move |r| match r {
                Ok(ev) => st.event_visible(ev, &who),
                Err(_) => true,
            })
            .map(|r| r.map_err(|e| Status::data_loss(format!("watcher fell behind: {e}"))));
        Ok(Response::new(Box::pin(self.state.life.until_stopped(s))))
    }
}

impl State {
    /// Forget other nodes' seeds unused for `idle` whose children here
    /// have all ended (their node cache goes with the last reference; a
    /// later spawn fetches the seed again, with its key).
    fn evict_remote(&self, idle: std::time::Duration) -> usize {
        let running: std::collections::HashSet<String> = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .values()
            .filter(|i| i.state == "running")
            .map(|i| i.seed_id.clone())
            .collect();
        let now = now_ms();
        let mut g = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let before = g.len();
        g.retain(|k, cell| {
            let id = k.rsplit_once('\n').map_or(k.as_str(), |x| x.1);
            match cell.get() {
                // Still being fetched: kept.
                None => true,
                Some(rs) => {
                    let unused = now.saturating_sub(rs.last_used.load(Ordering::Relaxed))
                        > idle.as_millis() as u64;
                    let keep = !unused || running.contains(id);
                    if !keep {
                        info!(seed = %id, "another node's seed evicted from this node's cache: unused, no child left");
                    }
                    keep
                }
            }
        });
        before - g.len()
    }

    /// May `who` see this event? Its instance's owner decides, or (for a
    /// spawn that failed before there was an instance) its seed's.
    fn event_visible(&self, ev: &pb::InstanceEvent, who: &auth::Principal) -> bool {
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

    async fn publish(
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
    async fn follow(self: Arc<Self>, f: Follow) {
        let Follow {
            base,
            pid,
            pidfd,
            out,
            stats,
            tx,
            started,
            ended,
        } = f;
        let iid = base.instance_id.clone();
        let out_path = self.handover.out_path(&iid);
        // Read without a thread per child (a blocking reader each would
        // exhaust tokio's blocking pool at 512 children). Every chunk is
        // an Output event, in order; the first is the time to first answer.
        let reader = out.map(|fd| {
            let (st, tx, base) = (self.clone(), tx.clone(), base.clone());
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
        let (stdout, stdout_bytes) = match reader {
            Some(h) => h.await.unwrap_or_default(),
            None => (Vec::new(), 0),
        };
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
            for _ in 0..200 {
                if s.finished.load(Ordering::Acquire) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            ex.faults = s.faults.load(Ordering::Relaxed);
            ex.pages_installed = s.pages_installed.load(Ordering::Relaxed);
            if let Some(r) = s.killed_reason() {
                ex.reason = r;
            }
        }
        self.instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end(&iid, &ex, stdout, stdout_bytes);
        self.handover.child_ended(&iid);
        info!(seed = %base.seed_id, instance = %iid, pid, exit_code = ex.exit_code, signal = ex.signal, reason = %ex.reason, "child ended");
        let ev = pb::InstanceEvent {
            pid,
            kind: Some(pb::instance_event::Kind::Exited(ex)),
            ..base
        };
        self.publish_opt(tx.as_ref(), ev).await;
    }

    /// Write a child's input (larger than a pipe takes at once) as it reads
    /// it. Until it is all written the keeper holds the pipe's write end too
    /// (`s/INSTANCE`): if forkd stops meanwhile the child does not see a
    /// premature end of file, and the next forkd kills it with the reason.
    fn write_stdin(self: Arc<Self>, iid: String, w: std::os::fd::OwnedFd, data: Arc<Vec<u8>>) {
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

/// PSS of this process and of every process it started (any thread's
/// children: instances, templates), in bytes.
fn node_pss_bytes() -> u64 {
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
    pub fn metrics_text(&self) -> String {
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
        let per_seed: [(&str, &str, Get); 5] = [
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
async fn serve_metrics(listener: tokio::net::TcpListener, state: Arc<State>) {
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

/// The cooperative socket: one JSON request per line, one answer per line
/// (see `remotefork::coop`).
async fn serve_coop(listener: tokio::net::UnixListener, svc: Service) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Who is asking: a process may have itself (or what it could
        // ptrace) captured, nothing else.
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) if v["op"] == "create_seed" => match v["pid"].as_u64() {
                        Some(pid) => match async {
                            auth::may_ptrace(cred.uid(), cred.gid(), pid as u32)?;
                            let owner = match cred.uid() {
                                0 => String::new(),
                                uid => svc
                                    .state
                                    .auth
                                    .tenant_of_uid(uid)
                                    .map(|t| t.name.clone())
                                    .unwrap_or_default(),
                            };
                            svc.create_from_pid(
                                pid as u32,
                                v["name"].as_str().unwrap_or("").to_string(),
                                true,
                                owner,
                            )
                            .await
                        }
                        .await
                        {
                            Ok(s) => serde_json::json!({ "ok": true, "id": s.id, "key": s.key }),
                            Err(e) => serde_json::json!({ "ok": false, "error": e.message() }),
                        },
                        None => {
                            serde_json::json!({ "ok": false, "error": "create_seed needs a pid" })
                        }
                    },
                    Ok(v) => {
                        serde_json::json!({ "ok": false, "error": format!("unknown op {}", v["op"]) })
                    }
                    Err(e) => serde_json::json!({ "ok": false, "error": format!("not JSON: {e}") }),
                };
                let mut out = answer.to_string().into_bytes();
                out.push(b'\n');
                if tokio::io::AsyncWriteExt::write_all(&mut w, &out)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
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

/// Run the daemon until SIGINT/SIGTERM.
pub async fn serve(cfg: Config) -> Result<(), ServeError> {
    if !["auto", "tcp", "rdma"].contains(&cfg.transport.as_str()) {
        return Err(ServeError::Config(format!(
            "transport {:?} is not one of auto, rdma, tcp",
            cfg.transport
        )));
    }
    let transports = transport::Transports::init(&cfg.transport, cfg.rdma_device.as_deref())
        .map_err(|why| ServeError::Config(format!("--transport rdma: {why}")))?;
    let token = cfg.token_file.as_deref().map(read_token).transpose()?;
    let auth = Arc::new(
        auth::Auth::new(token.as_deref(), cfg.tenants_file.as_deref())
            .map_err(|e| ServeError::Config(e.to_string()))?
            .with_audience(cfg.listen.as_deref()),
    );
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).map_err(|source| ServeError::Io {
            what: format!("reading the TLS {what} {}", p.display()),
            source,
        })
    };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(c, "certificate")?, read(k, "key")?),
        )),
        (None, None) => None,
        _ => {
            return Err(ServeError::Config(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    let mut page_tls = None;
    if let Some(ca) = &cfg.tls_ca {
        let pem = read(ca, "CA")?;
        page_tls = Some(
            remotefork::pager::tcp::tls_client_config(&pem)
                .map_err(|e| ServeError::Config(format!("--tls-ca {}: {e}", ca.display())))?,
        );
        crate::client::set_tls_ca(pem);
    }
    // The page server speaks TLS too when forkd has a certificate.
    let page_acceptor = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some(
            pageserver::tls_acceptor(&read(c, "certificate")?, &read(k, "key")?)
                .map_err(|e| ServeError::Config(format!("TLS certificate or key: {e}")))?,
        ),
        _ => None,
    };
    if let (Some(addr), None) = (&cfg.listen, &tls) {
        warn!(%addr, "TCP without TLS: tokens and seeds' descriptors cross the network in the clear (give --tls-cert and --tls-key)");
    }
    if cfg.listen.is_some() && token.as_deref().is_none_or(|t| t.is_empty()) {
        return Err(ServeError::Config(
            "--listen needs --token-file with a non-empty token".into(),
        ));
    }
    let registry = Arc::new(Registry::open(&cfg.state_dir)?);
    remotefork::node::set_template_idle_timeout(std::time::Duration::from_secs(
        cfg.template_idle_s.max(1),
    ));
    let spawner = Spawner::new(cfg.spawner_threads).map_err(|source| ServeError::Io {
        what: "starting spawner threads".into(),
        source,
    })?;
    // The keeper: children outlive this forkd, and what an earlier forkd
    // handed over comes back.
    let instance_tag = crate::random_hex(3).map_err(|source| ServeError::Io {
        what: "reading /dev/urandom".into(),
        source,
    })?;
    let (handover, handed, orphans) = handover::Handover::start(
        &cfg.state_dir.join("run"),
        std::time::Duration::from_secs(cfg.handover_grace_s.max(1)),
        &instance_tag,
    )
    .map_err(|e| ServeError::Io {
        what: "starting the keeper".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (events, _) = broadcast::channel(65536);
    let (life, health) = health::Lifecycle::new(std::time::Duration::from_secs(cfg.drain_s)).await;
    let state = Arc::new(State {
        drain: cfg.drain,
        inputs: Mutex::new(HashMap::new()),
        registry,
        handover,
        spawner,
        instances: Mutex::new(Instances::default()),
        events,
        next_instance: AtomicU64::new(0),
        instance_tag,
        spawns: AtomicU64::new(0),
        spawn_failures: AtomicU64::new(0),
        children_with_notes: AtomicU64::new(0),
        queued: AtomicU64::new(0),
        max_queued: cfg.max_queued.max(1),
        notes_logged: Mutex::new(Default::default()),
        remote: Mutex::new(HashMap::new()),
        remote_dir: cfg.state_dir.join("remote"),
        page_server: cfg
            .page_advertise
            .clone()
            .or_else(|| cfg.page_listen.clone())
            .map(|a| match page_acceptor {
                Some(_) if !a.starts_with("tls://") => format!("tls://{a}"),
                _ => a,
            }),
        peer_token: match cfg.peer_token_file.as_deref() {
            Some(p) => Some(read_token(p)?),
            None => token.clone(),
        },
        page_deadline: std::time::Duration::from_millis(cfg.page_deadline_ms),
        hostname: remotefork::procfs::sysctl("kernel/hostname"),
        transport: cfg.transport.clone(),
        transports,
        life: life.clone(),
        auth: auth.clone(),
        remote_commands: cfg.remote_commands,
        peers: cfg.peers.clone(),
        page_tls,
    });
    let svc = Service {
        state: state.clone(),
    };
    svc.adopt(handed, orphans).await;
    {
        let st = state.clone();
        let idle = std::time::Duration::from_secs(cfg.template_idle_s.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle.min(std::time::Duration::from_secs(30)));
            loop {
                tick.tick().await;
                st.evict_remote(idle);
            }
        });
    }

    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let uds = tokio::net::UnixListener::bind(&cfg.socket).map_err(|source| ServeError::Io {
        what: format!("binding {}", cfg.socket.display()),
        source,
    })?;
    // With tenants, anyone may connect: who they are (SO_PEERCRED, a
    // token) decides what they may do. Without, the socket's group does.
    let sock_mode = if auth.has_tenants() { 0o666 } else { 0o660 };
    std::fs::set_permissions(
        &cfg.socket,
        std::os::unix::fs::PermissionsExt::from_mode(sock_mode),
    )
    .map_err(|source| ServeError::Io {
        what: format!("chmod {}", cfg.socket.display()),
        source,
    })?;
    let coop_path = cfg.coop_socket.clone().unwrap_or_else(|| {
        let mut p = cfg.socket.clone().into_os_string();
        p.push(".coop");
        PathBuf::from(p)
    });
    let _ = std::fs::remove_file(&coop_path);
    let coop = tokio::net::UnixListener::bind(&coop_path).map_err(|source| ServeError::Io {
        what: format!("binding {}", coop_path.display()),
        source,
    })?;
    std::fs::set_permissions(
        &coop_path,
        std::os::unix::fs::PermissionsExt::from_mode(sock_mode),
    )
    .map_err(|source| ServeError::Io {
        what: format!("chmod {}", coop_path.display()),
        source,
    })?;
    tokio::spawn(serve_coop(coop, svc.clone()));
    if let Some(p) = &cfg.page_listen {
        let l = tokio::net::TcpListener::bind(p)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("binding the page server on {p}"),
                source,
            })?;
        info!(addr = %p, "page server listening");
        tokio::spawn(
            pageserver::PageServer::with_tls(pageserver::Limits::default(), page_acceptor)
                .serve(l, state.registry.clone()),
        );
    }
    if let Some(m) = &cfg.metrics {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .map_err(|source| ServeError::Io {
                what: format!("binding metrics on {m}"),
                source,
            })?;
        info!(addr = %m, "metrics on /metrics");
        tokio::spawn(serve_metrics(l, state.clone()));
    }
    info!(socket = %cfg.socket.display(), coop = %coop_path.display(), seeds = state.registry.len(), "forkd serving");
    let (reflect_v1, reflect_v1alpha) =
        health::reflection().map_err(|e| ServeError::Config(format!("reflection: {e}")))?;
    // Unix socket clients whose :authority h2 refuses (grpcio) get theirs mended.
    let uds = UnixListenerStream::new(uds).map(|r| r.map(authority::AuthorityFix::new));
    let local = tonic::transport::Server::builder()
        .add_service(health.clone())
        .add_service(reflect_v1.clone())
        .add_service(reflect_v1alpha.clone())
        .add_service(ForkdServer::with_interceptor(
            svc.clone(),
            auth.interceptor(false),
        ))
        .serve_with_incoming_shutdown(uds, life.stopped());
    let servers = async {
        match (cfg.listen, token) {
            (Some(addr), Some(_)) => {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|source| ServeError::Io {
                        what: format!("binding {addr}"),
                        source,
                    })?;
                info!(%addr, tls = tls.is_some(), "forkd serving on TCP (token required)");
                let check = auth.interceptor(true);
                let mut builder = tonic::transport::Server::builder();
                if let Some(t) = tls.clone() {
                    builder = builder
                        .tls_config(t)
                        .map_err(|e| ServeError::Config(format!("TLS certificate or key: {e}")))?;
                }
                let remote = builder
                    // Health is open, as probes and load balancers send no token.
                    .add_service(health)
                    .add_service(tonic::service::interceptor::InterceptedService::new(
                        reflect_v1,
                        check.clone(),
                    ))
                    .add_service(tonic::service::interceptor::InterceptedService::new(
                        reflect_v1alpha,
                        check.clone(),
                    ))
                    .add_service(ForkdServer::with_interceptor(svc, check))
                    // Nagle would hold a child's small stream events back for
                    // the peer's delayed ACK (40 ms).
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener).map(|r| {
                            r.inspect(|s| {
                                let _ = s.set_nodelay(true);
                            })
                        }),
                        life.stopped(),
                    );
                life.serving().await;
                tokio::try_join!(local, remote)?;
            }
            _ => {
                life.serving().await;
                local.await?
            }
        }
        Ok::<(), ServeError>(())
    };
    tokio::spawn(life.clone().run());
    // Connections still open a moment after the stop (a client that does
    // not close its end) do not keep forkd from exiting.
    let stopped = async {
        life.stopped().await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! {
        r = servers => r?,
        _ = stopped => tracing::warn!("connections still open after the stop; closing them"),
    }
    info!("forkd stopping");
    Ok(())
}

#[cfg(test)]
mod instances_tests {
    use super::*;

    fn rec() -> InstanceRec {
        InstanceRec {
            seed_id: "s".into(),
            pid: 1,
            state: "running".into(),
            labels: HashMap::new(),
            started_unix_ms: 0,
            end: None,
            adopted: false,
            notes: Vec::new(),
            stdout: Vec::new(),
            stdout_bytes: 0,
            owner: String::new(),
            uid: 0,
        }
    }

    #[test]
    fn ended_instances_beyond_the_cap_are_forgotten_running_ones_never() {
        let mut t = Instances::default();
        t.map.insert("live".into(), rec());
        for i in 0..ENDED_KEPT + 5 {
            let id = format!("i{i}");
            t.map.insert(id.clone(), rec());
            t.end(&id, &pb::Exited::default(), Vec::new(), 0);
        }
        assert_eq!(t.map.len(), ENDED_KEPT + 1);
        assert!(t.map.contains_key("live"));
        assert_eq!(t.running(), 1);
        // The oldest ended went first; the newest are kept with their state.
        assert!(!t.map.contains_key("i0") && !t.map.contains_key("i4"));
        assert_eq!(t.map[&format!("i{}", ENDED_KEPT + 4)].state, "exited 0");
        // Ending an unknown id changes nothing.
        t.end(
            "nope",
            &pb::Exited {
                exit_code: 1,
                ..Default::default()
            },
            Vec::new(),
            0,
        );
        assert_eq!(t.map.len(), ENDED_KEPT + 1);
    }
}
