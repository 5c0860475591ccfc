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
/// The TCP page server (in the library, beside the other transports).
pub use remotefork::transport::tcp_server as pageserver;
pub mod readyline;
pub mod registry;
pub mod spawner;
pub mod transport;

// Along the data flow: configuration; seeds made (create) and found
// (remote: this node's or another's); children spawned, followed and
// recorded (spawn, follow, instances, inputs); an earlier forkd's children
// taken back (adopt); the gRPC API over it all (service), the cooperative
// socket (coop), the figures (metrics), and the start (serve).
mod adopt;
mod config;
mod coop;
mod create;
mod follow;
mod inputs;
mod instances;
mod metrics;
mod remote;
mod serve;
mod service;
mod spawn;

pub use config::{Config, ServeError};
pub use serve::serve;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::Status;

use crate::pb;
use follow::Follow;
use inputs::Staged;
use instances::{InstanceRec, Instances, OUTPUT_KEPT};
use registry::Registry;
use remote::{RemoteSeed, Target};
use spawner::Spawner;

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

/// The target of the daemon's log events and spans: `forkd::daemon` for
/// every file of this module, as when they were one (filters and log
/// collectors key on it).
const LOG: &str = "forkd::daemon";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
