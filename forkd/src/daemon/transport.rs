//! How pages travel between nodes: the choice between RDMA and TCP
//! (`--transport auto|rdma|tcp`), this node's RDMA exporter and per-peer
//! RDMA connections, `OpenPageChannel`, and bytes counted per transport.
//!
//! - `tcp`: verbs are never touched.
//! - `auto`: the device is opened at start if there is an active one; a
//!   remote seed is then read over RDMA when its node offers it too, and
//!   over TCP otherwise (the reason is logged).
//! - `rdma`: the daemon refuses to start without an active device, and a
//!   remote seed whose node cannot do RDMA cannot be spawned from (the
//!   spawn fails with the reason).
//!
//! One RDMA connection (RC queue pair) per peer node, shared by all its
//! seeds and their children; the exporter keeps one QP per importing
//! connection and one memory region per seed, deregistered when the seed
//! is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remotefork::transport::rdma::{
    self, Connection, DeviceInfo, ExportedSeed, Exporter, QpInfo, RdmaNode, RdmaSource,
    RemoteRegion,
};
use remotefork::transport::{PageSource, SourceError};
use tonic::Status;
use tracing::{info, warn};

use super::registry;
use crate::pb;

/// Most RDMA connections the exporter accepts (one per importing node,
/// so this bounds what key holders can make it allocate).
const MAX_CONNECTIONS: usize = 1024;

/// This node's transports.
pub struct Transports {
    configured: String,
    node: Option<Arc<RdmaNode>>,
    /// Why RDMA is not used here (None when it is).
    rdma_reason: Option<String>,
    exporter: Option<Exporter>,
    exported: Mutex<HashMap<String, Arc<ExportedSeed>>>,
    peers: Mutex<HashMap<String, Arc<Connection>>>,
    /// Bytes of remote seeds' pages fetched over TCP.
    pub tcp_bytes: Arc<AtomicU64>,
    /// Bytes of remote seeds' pages fetched over RDMA.
    pub rdma_bytes: Arc<AtomicU64>,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("configured", &self.configured)
            .field("rdma", &self.rdma_reason.is_none())
            .finish()
    }
}

impl Transports {
    /// Set up per `--transport` and `--rdma-device`; `Err` (a reason) only
    /// when `rdma` is required and unavailable.
    pub fn init(configured: &str, device: Option<&str>) -> Result<Transports, String> {
        let (node, reason) = match configured {
            "tcp" => (None, Some("RDMA is not used (--transport tcp)".to_string())),
            _ => match RdmaNode::open(device) {
                Ok(n) => (Some(n), None),
                Err(e) if configured == "rdma" => return Err(e.to_string()),
                Err(e) => {
                    info!(reason = %e, "no RDMA here; pages from other nodes travel over TCP");
                    (None, Some(e.to_string()))
                }
            },
        };
        Ok(Transports {
            configured: configured.to_string(),
            exporter: node
                .as_ref()
                .map(|n| Exporter::new(n.clone(), MAX_CONNECTIONS)),
            node,
            rdma_reason: reason,
            exported: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            tcp_bytes: Arc::new(AtomicU64::new(0)),
            rdma_bytes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The configured mode.
    pub fn configured(&self) -> &str {
        &self.configured
    }

    /// The RDMA device in use, if any.
    pub fn device(&self) -> Option<&DeviceInfo> {
        self.node.as_ref().map(|n| n.info())
    }

    /// What this node picks for pages from other nodes, and why.
    pub fn selection(&self) -> (&'static str, String) {
        match (&self.node, &self.rdma_reason) {
            (Some(n), _) => (
                "rdma",
                format!(
                    "RDMA on {} where the seed's node offers it, else TCP{}",
                    n.info().summary(),
                    if self.configured == "rdma" {
                        " (refused: --transport rdma)"
                    } else {
                        ""
                    }
                ),
            ),
            (None, Some(why)) => ("tcp", why.clone()),
            (None, None) => ("tcp", "RDMA unavailable".into()),
        }
    }

    /// `NodeInfo`'s transport list.
    pub fn node_info(&self, page_server: Option<&str>) -> Vec<pb::Transport> {
        let (selected, why) = self.selection();
        vec![
            pb::Transport {
                name: "local".into(),
                available: true,
                reason: "seed images on this node".into(),
            },
            pb::Transport {
                name: "tcp".into(),
                available: page_server.is_some(),
                reason: format!(
                    "{}{}",
                    match page_server {
                        Some(a) => format!("page server on {a}"),
                        None => "no page server (start forkd with --page-listen HOST:PORT)".into(),
                    },
                    if selected == "tcp" {
                        format!("; selected by --transport {}: {why}", self.configured)
                    } else {
                        String::new()
                    }
                ),
            },
            pb::Transport {
                name: "rdma".into(),
                available: self.node.is_some(),
                reason: match &self.node {
                    Some(n) => format!(
                        "{}; selected by --transport {}: {why}",
                        n.info().summary(),
                        self.configured
                    ),
                    None => why,
                },
            },
        ]
    }

    /// Prometheus lines for the transports.
    pub fn metrics(&self, o: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            o,
            "# HELP forkd_page_bytes_total Bytes of other nodes' seed pages fetched, per transport.\n# TYPE forkd_page_bytes_total counter\nforkd_page_bytes_total{{transport=\"tcp\"}} {}\nforkd_page_bytes_total{{transport=\"rdma\"}} {}",
            self.tcp_bytes.load(Ordering::Relaxed),
            self.rdma_bytes.load(Ordering::Relaxed)
        );
        let qps = self.node.as_ref().map(|n| n.qps_live()).unwrap_or(0);
        let _ = writeln!(
            o,
            "# HELP forkd_rdma_queue_pairs RDMA queue pairs on this node (both roles).\n# TYPE forkd_rdma_queue_pairs gauge\nforkd_rdma_queue_pairs {qps}"
        );
        let exported = self
            .exported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let _ = writeln!(
            o,
            "# HELP forkd_rdma_exported_seeds Seeds registered for RDMA READ.\n# TYPE forkd_rdma_exported_seeds gauge\nforkd_rdma_exported_seeds {exported}"
        );
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).len();
        let _ = writeln!(
            o,
            "# HELP forkd_rdma_peer_connections RDMA connections to other nodes (one per node and seed).\n# TYPE forkd_rdma_peer_connections gauge\nforkd_rdma_peer_connections {peers}"
        );
    }

    /// The seed's export, registering its page store on first use.
    fn export(&self, seed: &registry::Seed) -> Result<Arc<ExportedSeed>, String> {
        let Some(node) = &self.node else {
            return Err(self.rdma_reason.clone().unwrap_or_default());
        };
        let mut g = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.get(&seed.meta.id) {
            return Ok(e.clone());
        }
        let path = seed.dir.join(remotefork::image::PAGES_FILE);
        let e = node
            .export_file(&path, seed.image_bytes)
            .map_err(|e| format!("registering seed {}: {e}", seed.meta.id))?;
        let r = e.region();
        info!(seed = %seed.meta.id, bytes = r.size, "seed exported for RDMA READ (its own protection domain)");
        let e = Arc::new(e);
        g.insert(seed.meta.id.clone(), e.clone());
        Ok(e)
    }

    /// A dropped seed: deregister its memory region, so nothing more can
    /// be read from it.
    pub fn unexport(&self, id: &str) {
        if self
            .exported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some()
        {
            info!(seed = %id, "seed's RDMA memory region deregistered");
        }
    }

    /// Answer `OpenPageChannel` for `seed` (key already checked).
    pub fn open_page_channel(
        &self,
        seed: &registry::Seed,
        page_server: Option<&str>,
        r: &pb::OpenPageChannelRequest,
    ) -> Result<pb::OpenPageChannelResponse, Status> {
        let tcp = |reason: String| -> Result<pb::OpenPageChannelResponse, Status> {
            let a = page_server.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "{reason}; and this node runs no page server (start forkd with --page-listen HOST:PORT)"
                ))
            })?;
            Ok(pb::OpenPageChannelResponse {
                transport: "tcp".into(),
                page_server: a.to_string(),
                size: seed.image_bytes,
                reason,
                ..Default::default()
            })
        };
        match r.transport.as_str() {
            "tcp" => return tcp("TCP asked for".into()),
            "rdma" | "auto" | "" => {}
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown transport {other:?} (rdma, tcp, auto)"
                )))
            }
        }
        let Some(exporter) = &self.exporter else {
            let why = format!(
                "this node cannot serve RDMA READ: {}",
                self.rdma_reason.clone().unwrap_or_default()
            );
            return if r.transport == "rdma" {
                Err(Status::failed_precondition(why))
            } else {
                tcp(why)
            };
        };
        let export = match self.export(seed) {
            Ok(r) => r,
            Err(why) if r.transport == "rdma" => return Err(Status::failed_precondition(why)),
            Err(why) => return tcp(why),
        };
        let qp = match &r.qp {
            Some(q) => {
                let peer = qp_from_pb(q).map_err(Status::invalid_argument)?;
                let local = exporter
                    .accept(r.connection_id, &peer, &export)
                    .map_err(|e| Status::failed_precondition(format!("RDMA connection: {e}")))?;
                Some(qp_to_pb(&local))
            }
            // A connection reads the one seed it was made for.
            None if exporter.has_connection(r.connection_id, &export) => None,
            None => {
                return Err(Status::failed_precondition(format!(
                    "unknown RDMA connection {:#x} for seed {}: send a queue pair to connect",
                    r.connection_id, seed.meta.id
                )))
            }
        };
        let region = export.region();
        Ok(pb::OpenPageChannelResponse {
            transport: "rdma".into(),
            qp,
            remote_addr: region.addr,
            rkey: region.rkey,
            size: region.size,
            page_server: page_server.unwrap_or_default().to_string(),
            reason: format!("RDMA READ on {}", exporter.node().info().summary()),
        })
    }

    /// Can this node read other nodes' pages over RDMA?
    pub fn rdma_usable(&self) -> Result<(), String> {
        match &self.node {
            Some(_) => Ok(()),
            None => Err(self.rdma_reason.clone().unwrap_or_default()),
        }
    }

    /// An RDMA source for seed `sr` of the node at `origin` (gRPC), over
    /// this node's connection for that seed (made or reused here): one per
    /// node and seed, as the exporter keeps each seed in a protection
    /// domain of its own.
    pub async fn rdma_source(
        &self,
        origin: &str,
        token: Option<String>,
        sr: &pb::SeedRef,
        deadline: Duration,
    ) -> Result<RdmaSource, String> {
        let node = self.node.clone().ok_or_else(|| {
            format!(
                "no RDMA here: {}",
                self.rdma_reason.clone().unwrap_or_default()
            )
        })?;
        let conn = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{origin}/{}", sr.id))
            .or_insert_with(|| Connection::new(node, origin))
            .clone();
        let mut region = None;
        if conn.is_connected() {
            match open_channel(origin, token.as_deref(), sr, conn.id(), None).await {
                Ok((_, r)) => region = Some(r),
                // The peer forgot us (it restarted): connect anew below.
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition
                        && s.message().contains("unknown RDMA connection") => {}
                Err(s) => return Err(s.message().to_string()),
            }
        }
        let region = match region {
            Some(r) => r,
            None => {
                let handle = tokio::runtime::Handle::current();
                let (o, t, s, c) = (origin.to_string(), token.clone(), sr.clone(), conn.clone());
                tokio::task::spawn_blocking(move || {
                    c.connect_with(|local| {
                        let (qp, r) = handle
                            .block_on(open_channel(&o, t.as_deref(), &s, c.id(), Some(local)))
                            .map_err(|e| e.message().to_string())?;
                        let qp = qp.ok_or("the peer sent no queue pair")?;
                        Ok((qp, r))
                    })
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
            }
        };
        // Restoring a broken connection goes through the control plane
        // again, with this seed's key.
        let handle = tokio::runtime::Handle::current();
        let (o, s, id) = (origin.to_string(), sr.clone(), conn.id());
        let reconnect: rdma::Reconnect = Box::new(move |local: &QpInfo| {
            let (qp, r) = handle
                .block_on(open_channel(&o, token.as_deref(), &s, id, Some(local)))
                .map_err(|e| e.message().to_string())?;
            Ok((qp.ok_or("the peer sent no queue pair")?, r))
        });
        Ok(RdmaSource::new(conn, region, deadline, Some(reconnect)))
    }
}

/// `OpenPageChannel` at `origin` asking for RDMA: the exporter's QP (when
/// `qp` was sent) and the seed's region.
async fn open_channel(
    origin: &str,
    token: Option<&str>,
    sr: &pb::SeedRef,
    connection_id: u64,
    qp: Option<&QpInfo>,
) -> Result<(Option<QpInfo>, RemoteRegion), Status> {
    let mut c = crate::client::connect(origin, token)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let r = c
        .open_page_channel(pb::OpenPageChannelRequest {
            seed: Some(sr.clone()),
            transport: "rdma".into(),
            connection_id,
            qp: qp.map(qp_to_pb),
        })
        .await
        .map_err(|e| Status::new(e.code(), format!("{origin}: {}", e.message())))?
        .into_inner();
    if r.transport != "rdma" {
        return Err(Status::failed_precondition(format!(
            "{origin} offers {} only: {}",
            r.transport, r.reason
        )));
    }
    let peer =
        r.qp.as_ref()
            .map(qp_from_pb)
            .transpose()
            .map_err(Status::invalid_argument)?;
    Ok((
        peer,
        RemoteRegion {
            addr: r.remote_addr,
            rkey: r.rkey,
            size: r.size,
        },
    ))
}

/// A QP description from the wire, checked.
pub fn qp_from_pb(q: &pb::QpInfo) -> Result<QpInfo, String> {
    let gid: [u8; 16] = q
        .gid
        .as_slice()
        .try_into()
        .map_err(|_| format!("a GID is 16 bytes, not {}", q.gid.len()))?;
    let info = QpInfo {
        gid,
        qpn: q.qpn,
        psn: q.psn,
        lid: u16::try_from(q.lid).map_err(|_| format!("LID {} is more than 16 bits", q.lid))?,
        mtu: q.mtu,
    };
    info.validate().map_err(|e| e.to_string())?;
    Ok(info)
}

/// A QP description for the wire.
pub fn qp_to_pb(q: &QpInfo) -> pb::QpInfo {
    pb::QpInfo {
        gid: q.gid.to_vec(),
        qpn: q.qpn,
        psn: q.psn,
        lid: q.lid as u32,
        mtu: q.mtu,
    }
}

/// A page source that counts the bytes it delivers (for
/// `forkd_page_bytes_total{transport=...}`).
pub struct Counted {
    inner: Box<dyn PageSource>,
    bytes: Arc<AtomicU64>,
}

impl Counted {
    /// Count `inner`'s bytes into `bytes`.
    pub fn new(inner: Box<dyn PageSource>, bytes: Arc<AtomicU64>) -> Counted {
        Counted { inner, bytes }
    }
}

impl PageSource for Counted {
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.inner.read(offset, dst)?;
        self.bytes.fetch_add(dst.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        self.inner.read_many(reqs)?;
        let n: usize = reqs.iter().map(|r| r.1.len()).sum();
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
    unsafe fn attach_destination(&self, base: *mut u8, len: usize) {
        // SAFETY: our caller's promise (mapped and writable while we live)
        // covers `inner`, which lives exactly as long as we do.
        unsafe { self.inner.attach_destination(base, len) }
    }
    fn round_trips(&self) -> u64 {
        self.inner.round_trips()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// Log a fallback to TCP.
pub fn fell_back(origin: &str, seed: &str, reason: &str) {
    warn!(%origin, %seed, reason, "RDMA not possible for this seed; paging over TCP");
}
