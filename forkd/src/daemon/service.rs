//! The gRPC API (`proto/forkd.proto`): each `Forkd` call checks who asks
//! and what they may see, and hands the work to the modules that do it.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tracing::info;

use super::inputs::MAX_INPUT;
use super::metrics::node_pss_bytes;
use super::{auth, registry, EventStream, Remote, Service, LOG};
use crate::pb::{self, forkd_server::Forkd};

impl Service {
    /// This node's seed `r` names, if `who` may see it (and, for a
    /// `remote` caller, with its key).
    pub(super) fn seed_for(
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
                self.create_from_pid(pid, r.name, false, owner, None, r.drop_unsupported_fds)
                    .await
                    .map(Response::new)
            }
            Some(pb::create_seed_request::Source::Command(c)) => self
                .create_from_command(c, r.name, &who, peer, owner, r.drop_unsupported_fds)
                .await
                .map(Response::new),
            Some(pb::create_seed_request::Source::OciBundle(b)) => self
                .create_from_oci(b, r.name, &who, owner, r.drop_unsupported_fds)
                .await
                .map(Response::new),
            Some(pb::create_seed_request::Source::Container(c)) => self
                .create_from_container(c, r.name, &who, owner, r.drop_unsupported_fds)
                .await
                .map(Response::new),
            None => Err(Status::invalid_argument(
                "give a pid, a command, an OCI bundle or a container id",
            )),
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
        info!(target: LOG, seed = %s.meta.id, "seed dropped");
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
        let events = self
            .start_spawn(req.into_inner(), remote, &who, work)
            .await?;
        Ok(Response::new(Box::pin(
            self.state.life.until_stopped(events),
        )))
    }

    async fn prepare_seed(
        &self,
        req: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::PrepareSeedResponse>, Status> {
        let _work = self.state.life.admit("prepares")?;
        let remote = req.extensions().get::<Remote>().is_some();
        let who = auth::principal(&req);
        let r = self
            .prepare_children(req.into_inner(), remote, &who)
            .await?;
        Ok(Response::new(r))
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
        self.state.stage_input(data, owner).map(Response::new)
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
        req: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let skip_pss = req.get_ref().skip_pss;
        let running = self
            .state
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = |field: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let mut cached_seeds: Vec<String> = self
            .state
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            // Keyed by origin and id; fetched ones only.
            .filter(|(_, c)| c.get().is_some())
            .filter_map(|(k, _)| Some(k.rsplit_once('\n')?.1.to_string()))
            .collect();
        cached_seeds.sort();
        cached_seeds.dedup();
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
            memory_bytes: kib("MemTotal:"),
            memory_available_bytes: kib("MemAvailable:"),
            cached_seeds,
            draining: self.state.life.draining(),
            seeds: self.state.registry.len() as u32,
            instances_running: running as u32,
            transport: self.state.transport.clone(),
            transport_selected: self.state.transports.selection().0.into(),
            transport_reason: self.state.transports.selection().1,
            pss_bytes: if skip_pss {
                0
            } else {
                tokio::task::spawn_blocking(node_pss_bytes)
                    .await
                    .unwrap_or(0)
            },
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

    type FetchRootfsStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::RootfsChunk, Status>>;

    async fn fetch_rootfs(
        &self,
        req: Request<pb::SeedRef>,
    ) -> Result<Response<Self::FetchRootfsStream>, Status> {
        // Always keyed, as FetchDescriptor.
        let who = auth::principal(&req);
        let s = self.seed_for(Some(req.get_ref()), true, &who)?;
        let img = remotefork::image::SeedImage::open_descriptor(&s.dir)
            .map_err(|e| Status::internal(format!("reading seed {}: {e}", s.meta.id)))?;
        let digest = img
            .descriptor()
            .container
            .as_ref()
            .map(|c| c.rootfs_digest.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!("seed {} is not a container seed", s.meta.id))
            })?;
        let stores = remotefork::node::rootfs_stores(&s.dir);
        let dir = remotefork::container::rootfs::find(&digest, &stores).ok_or_else(|| {
            Status::failed_precondition(format!(
                "seed {}'s rootfs {digest} is not on this node",
                s.meta.id
            ))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let id = s.meta.id.clone();
        tokio::task::spawn_blocking(move || {
            let r = remotefork::container::rootfs::pack(&dir, 1 << 20, |data| {
                tx.blocking_send(Ok(pb::RootfsChunk { data })).is_ok()
            });
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "sending seed {id}'s rootfs: {e}"
                ))));
            }
        });
        info!(target: LOG, seed = %s.meta.id, %digest, "sending a container rootfs to a node");
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
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
