//! Which seed a spawn starts children from: one of this node's, or
//! another node's (`origin`), whose descriptor is fetched once and whose
//! pages then come over RDMA or TCP; and the eviction of other nodes'
//! seeds no longer used here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tonic::Status;
use tracing::info;

use super::{auth, handover, now_ms, registry, transport, Service, State, LOG};
use crate::pb;

/// Why another node's seed cannot be restored on this node.
#[derive(Debug, thiserror::Error)]
pub(super) enum RemoteSeedError {
    /// Its descriptor, as fetched, does not open.
    #[error(transparent)]
    Descriptor(#[from] remotefork::image::ImageError),
    /// Its page source holds another size than the descriptor says.
    #[error("{offered_by} offers {offered} bytes, the descriptor says {described}")]
    SizeMismatch {
        /// The page source.
        offered_by: String,
        /// The bytes it offers.
        offered: u64,
        /// The bytes the descriptor says the image has.
        described: u64,
    },
    /// No restorer could be made over it.
    #[error(transparent)]
    Restore(#[from] remotefork::RestoreError),
}

/// What a spawn starts children from: a seed of this node or of another.
pub(super) struct Target {
    pub(super) id: String,
    pub(super) cooperative: bool,
    /// The tenant that owns the seed ("" for the operator's).
    pub(super) owner: String,
    pub(super) restorer: Arc<remotefork::Seed>,
    pub(super) local: Option<Arc<registry::Seed>>,
    /// Where the seed lives, for a later forkd.
    pub(super) place: handover::SeedPlace,
}

/// A seed held by another node, as this node reaches it.
pub(super) struct RemoteSeed {
    /// The key it was fetched with: every later use must present it.
    pub(super) key: String,
    /// Its owner on its node.
    pub(super) owner: String,
    pub(super) cooperative: bool,
    pub(super) restorer: Arc<remotefork::Seed>,
    /// When a spawn last used it (ms since the epoch): unused for the
    /// template idle time, and with no child running, it is evicted.
    pub(super) last_used: AtomicU64,
}

impl Service {
    /// The seed `r` names: this node's, or (with `origin`) another node's,
    /// whose descriptor is fetched and whose pages come over TCP.
    pub(super) async fn target_for(
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
    pub(super) async fn target_adopting(
        &self,
        r: Option<&pb::SeedRef>,
        origin: &str,
        remote: bool,
        cache: Option<remotefork::pager::cache::CacheFds>,
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
        cache: Option<remotefork::pager::cache::CacheFds>,
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
        remotefork::private_fs::replace(
            &dir.join(remotefork::image::DESCRIPTOR_FILE),
            &b.descriptor,
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        if !b.working_set.is_empty() {
            // Recorded on the seed's node: this node's first child is fast too.
            remotefork::private_fs::replace(
                &dir.join(remotefork::node::WORKING_SET_FILE),
                &b.working_set,
            )
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        self.fetch_rootfs_if_needed(&mut c, origin, sr, &dir)
            .await?;
        let (source, via) = self.page_source(origin, sr, &b.page_server).await?;
        let restorer =
            tokio::task::spawn_blocking(move || -> Result<remotefork::Seed, RemoteSeedError> {
                let image = remotefork::image::SeedImage::open_descriptor(&dir)?;
                let size = source.size();
                if size != image.descriptor().image_bytes {
                    return Err(RemoteSeedError::SizeMismatch {
                        offered_by: source.name(),
                        offered: size,
                        described: image.descriptor().image_bytes,
                    });
                }
                Ok(remotefork::Seed::remote_adopting(image, source, cache)?)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "seed {} from {origin} cannot be restored here: {e}",
                    sr.id
                ))
            })?;
        info!(target: LOG, seed = %sr.id, %origin, transport = via, "remote seed ready");
        Ok(RemoteSeed {
            key: sr.key.clone(),
            owner: b.owner,
            cooperative: b.cooperative,
            restorer: Arc::new(restorer),
            last_used: AtomicU64::new(now_ms()),
        })
    }

    /// A container seed whose rootfs this node lacks (by digest): get it
    /// from its node once, checked, into this node's store.
    async fn fetch_rootfs_if_needed(
        &self,
        c: &mut crate::client::Client,
        origin: &str,
        sr: &pb::SeedRef,
        dir: &std::path::Path,
    ) -> Result<(), Status> {
        let img = remotefork::image::SeedImage::open_descriptor(dir).map_err(|e| {
            Status::failed_precondition(format!("seed {} from {origin}: {e}", sr.id))
        })?;
        let Some(digest) = img
            .descriptor()
            .container
            .as_ref()
            .map(|c| c.rootfs_digest.clone())
        else {
            return Ok(());
        };
        let store = self.state.registry.rootfs_store();
        if remotefork::container::rootfs::find(&digest, std::slice::from_ref(&store)).is_some() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let mut stream = c
            .fetch_rootfs(sr.clone())
            .await
            .map_err(|e| {
                Status::new(
                    e.code(),
                    format!(
                        "{origin} did not send seed {}'s rootfs: {}",
                        sr.id,
                        e.message()
                    ),
                )
            })?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let d2 = digest.clone();
        let unpack = tokio::task::spawn_blocking(move || {
            remotefork::container::rootfs::unpack(&mut ChannelReader::new(rx), &store, &d2)
        });
        let mut sent = 0u64;
        let mut failed = None;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    sent += chunk.data.len() as u64;
                    if tx.send(chunk.data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let kept = unpack.await.map_err(|e| Status::internal(e.to_string()))?;
        if let Some(e) = failed {
            return Err(Status::unavailable(format!(
                "seed {}'s rootfs from {origin} broke off after {sent} bytes: {}",
                sr.id,
                e.message()
            )));
        }
        let kept = kept.map_err(|e| {
            Status::failed_precondition(format!(
                "seed {}'s rootfs from {origin} was refused: {e}",
                sr.id
            ))
        })?;
        info!(target: LOG, seed = %sr.id, %origin, digest = %kept.digest, files = kept.files, bytes = sent, ms = t.elapsed().as_millis() as u64, "container rootfs received");
        Ok(())
    }

    /// Where a remote seed's pages come from, per `--transport`: RDMA
    /// where this node and the seed's node can, else the TCP page server
    /// `page_server` (auto) or an error (rdma). Counted per transport.
    async fn page_source(
        &self,
        origin: &str,
        sr: &pb::SeedRef,
        page_server: &str,
    ) -> Result<(Box<dyn remotefork::transport::PageSource>, &'static str), Status> {
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
            remotefork::transport::tcp::TcpSource::connect_tls(&ps, &id, &key, deadline, tls)
                .map(|(s, _)| s)
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
    pub(super) fn may_call(&self, origin: &str, who: &auth::Principal) -> Result<(), Status> {
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
}

impl State {
    /// Forget other nodes' seeds unused for `idle` whose children here
    /// have all ended (their node cache goes with the last reference; a
    /// later spawn fetches the seed again, with its key).
    pub(super) fn evict_remote(&self, idle: std::time::Duration) -> usize {
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
                        info!(target: LOG, seed = %id, "another node's seed evicted from this node's cache: unused, no child left");
                    }
                    keep
                }
            }
        });
        before - g.len()
    }
}

/// A blocking reader over the chunks an async task receives.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl ChannelReader {
    fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> ChannelReader {
        ChannelReader {
            rx,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
