//! The daemon's configuration (`forkd serve`'s TOML file and flags) and
//! the errors starting it.

use std::path::PathBuf;

use serde::Deserialize;

use super::registry;

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

/// The first line of a token file, trimmed.
pub(super) fn read_token(p: &std::path::Path) -> Result<String, ServeError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|source| ServeError::Io {
            what: format!("reading token file {}", p.display()),
            source,
        })
}
