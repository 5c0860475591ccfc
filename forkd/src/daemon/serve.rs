//! `serve()`: start the daemon from its configuration (TLS, the keeper,
//! the listeners) and run it until SIGINT/SIGTERM.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::config::read_token;
use super::coop::serve_coop;
use super::metrics::serve_metrics;
use super::registry::Registry;
use super::spawner::Spawner;
use super::{
    auth, authority, handover, health, pageserver, transport, Config, Instances, ServeError,
    Service, State, LOG,
};
use crate::pb::forkd_server::ForkdServer;

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
            remotefork::transport::tcp::tls_client_config(&pem)
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
        warn!(target: LOG, %addr, "TCP without TLS: tokens and seeds' descriptors cross the network in the clear (give --tls-cert and --tls-key)");
    }
    if cfg.listen.is_some() && token.as_deref().is_none_or(|t| t.is_empty()) {
        return Err(ServeError::Config(
            "--listen needs --token-file with a non-empty token".into(),
        ));
    }
    let registry = Arc::new(Registry::open(&cfg.state_dir)?);
    remotefork::set_rootfs_store(Some(registry.rootfs_store()));
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
        info!(target: LOG, addr = %p, "page server listening");
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
        info!(target: LOG, addr = %m, "metrics on /metrics");
        tokio::spawn(serve_metrics(l, state.clone()));
    }
    info!(target: LOG, socket = %cfg.socket.display(), coop = %coop_path.display(), seeds = state.registry.len(), "forkd serving");
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
                info!(target: LOG, %addr, tls = tls.is_some(), "forkd serving on TCP (token required)");
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
        _ = stopped => tracing::warn!(target: LOG, "connections still open after the stop; closing them"),
    }
    info!(target: LOG, "forkd stopping");
    Ok(())
}
