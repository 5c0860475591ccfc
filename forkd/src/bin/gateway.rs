//! `gateway`: HTTP front door for functions. Registered functions become
//! seeds on the first node; invocations start children on the least-loaded
//! node. See `forkd::gateway` for the API.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use forkd::gateway::{Config, NodeSpec};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Serve functions from seeds: POST /functions to register, POST /invoke/{name} to call"
)]
struct Cli {
    /// HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// A forkd node: `ADDR[,peer=HOST:PORT][,coop=PATH]`; repeat for more.
    /// The first makes the seeds (its cooperative socket, default the Unix
    /// socket path + `.coop`, must be reachable from here).
    #[arg(long = "node", required_unless_present = "discover")]
    nodes: Vec<NodeSpec>,
    /// Find (more) nodes where the cluster publishes them, asked again
    /// every --discover-interval-ms: `dns:NAME:PORT` (A/AAAA records of a
    /// headless Service), `srv:NAME` (its SRV records) or
    /// `k8s:NAMESPACE/SERVICE[:PORT_NAME]` (its EndpointSlices, from the
    /// Kubernetes API). Nodes no longer published are drained.
    #[arg(long)]
    discover: Option<forkd::gateway::discovery::Source>,
    /// The DNS server discovery asks (`IP:PORT`) [default: /etc/resolv.conf's].
    #[arg(long)]
    dns_server: Option<std::net::SocketAddr>,
    /// How often discovery asks again.
    #[arg(long, default_value_t = 5000)]
    discover_interval_ms: u64,
    /// How often each node is asked for its load, memory and cached seeds.
    #[arg(long, default_value_t = 2000)]
    node_poll_ms: u64,
    /// The Kubernetes API for k8s: discovery outside a pod (`https://HOST:PORT`)
    /// [default: the pod's service account]; with --kube-token-file and --kube-ca.
    #[arg(long, requires_all = ["kube_token_file", "kube_ca"])]
    kube_api: Option<String>,
    /// The bearer token for --kube-api.
    #[arg(long)]
    kube_token_file: Option<std::path::PathBuf>,
    /// The CA (PEM) --kube-api's certificate is checked against.
    #[arg(long)]
    kube_ca: Option<std::path::PathBuf>,
    /// Bearer token file for the nodes' TCP gRPC.
    #[arg(long)]
    token_file: Option<String>,
    /// The CA (PEM) https:// nodes' certificates are checked against
    /// [env FORKD_TLS_CA].
    #[arg(long)]
    tls_ca: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
    /// The admin token clients must send (Authorization: Bearer ...) for
    /// every path but /healthz and /openapi.json. Without it (and
    /// without --tenants-file) the gateway listens on loopback only.
    #[arg(long)]
    api_token_file: Option<String>,
    /// Tenants (as forkd's --tenants-file): each registers, lists,
    /// invokes and removes only its own functions, which run as its uid.
    #[arg(long)]
    tenants_file: Option<String>,
    /// Where instances connect back.
    #[arg(long, default_value = "127.0.0.1:0")]
    worker_listen: String,
    /// The address instances are told (reachable from every node) [default: the bound worker address].
    #[arg(long)]
    worker_advertise: Option<String>,
    /// Idle instances are kept this long (0: one invocation per instance).
    #[arg(long, default_value_t = 60_000)]
    keep_alive_ms: u64,
    /// One invocation's limit; then its instance is killed.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// How long a started instance has to connect back.
    #[arg(long, default_value_t = 20_000)]
    ready_timeout_ms: u64,
    /// How long an invocation waits for an instance when nodes are full.
    #[arg(long, default_value_t = 30_000)]
    queue_timeout_ms: u64,
    /// Instances per node, busy or idle.
    #[arg(long, default_value_t = 2000)]
    max_instances_per_node: usize,
    /// Invocations waiting for an instance, at most (then 503).
    #[arg(long, default_value_t = 10_000)]
    max_queue: usize,
    /// Children per Spawn call.
    #[arg(long, default_value_t = 16)]
    spawn_batch: u32,
    /// How long a registration waits for every node to prepare the new
    /// seed (fetch it and its rootfs, build its template); nodes still
    /// preparing then go on in the background.
    #[arg(long, default_value_t = 30_000)]
    prepare_wait_ms: u64,
    /// off, window or recorded.
    #[arg(long, default_value = "recorded")]
    prefetch: String,
    /// Largest request body accepted (then 413).
    #[arg(long, default_value_t = 2 << 20)]
    max_body_bytes: usize,
    /// Log format on stderr: text (coloured on a terminal only) or json.
    #[arg(long, value_enum, default_value_t)]
    log_format: forkd::cli::LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    forkd::cli::init_logging("info", cli.log_format);
    let token = match &cli.token_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!("gateway: reading token file {p}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if let Some(p) = &cli.tls_ca {
        match std::fs::read(p) {
            Ok(pem) => forkd::client::set_tls_ca(pem),
            Err(e) => {
                eprintln!("gateway: reading --tls-ca {p}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let api_token = match &cli.api_token_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                eprintln!("gateway: {p} is empty");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("gateway: reading token file {p}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let auth = if api_token.is_some() || cli.tenants_file.is_some() {
        match forkd::daemon::auth::Auth::new(
            api_token.as_deref(),
            cli.tenants_file.as_deref().map(std::path::Path::new),
        ) {
            Ok(a) => Some(std::sync::Arc::new(a)),
            Err(e) => {
                eprintln!("gateway: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => {
            let read = |p: &str| std::fs::read(p).map_err(|e| format!("reading {p}: {e}"));
            match read(c).and_then(|c| Ok((c, read(k)?))).and_then(|(c, k)| {
                forkd::daemon::pageserver::tls_acceptor(&c, &k).map_err(|e| e.to_string())
            }) {
                Ok(a) => Some(forkd::gateway::Tls(a)),
                Err(e) => {
                    eprintln!("gateway: TLS: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let kube = match (&cli.kube_api, &cli.kube_token_file, &cli.kube_ca) {
        (Some(url), Some(t), Some(ca)) => match forkd::gateway::kube::KubeApi::new(url, t, ca) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("gateway: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let cfg = Config {
        auth,
        tls,
        listen: cli.listen,
        nodes: cli.nodes,
        discover: cli.discover,
        dns_server: cli.dns_server,
        kube,
        discover_interval: Duration::from_millis(cli.discover_interval_ms.max(50)),
        node_poll: Duration::from_millis(cli.node_poll_ms.max(50)),
        token,
        worker_listen: cli.worker_listen,
        worker_advertise: cli.worker_advertise,
        keep_alive: Duration::from_millis(cli.keep_alive_ms),
        invoke_timeout: Duration::from_millis(cli.timeout_ms),
        ready_timeout: Duration::from_millis(cli.ready_timeout_ms),
        queue_timeout: Duration::from_millis(cli.queue_timeout_ms),
        max_instances_per_node: cli.max_instances_per_node,
        max_queue: cli.max_queue,
        spawn_batch: cli.spawn_batch,
        prepare_wait: Duration::from_millis(cli.prepare_wait_ms),
        prefetch: cli.prefetch,
        max_body_bytes: cli.max_body_bytes,
        ..Config::default()
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(forkd::gateway::serve(cfg, |a| {
        // The line scripts and tests wait for.
        println!("gateway listening on {a}");
    })) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
