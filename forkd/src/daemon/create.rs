//! Making seeds: capture a running process (a pid, or a cooperative
//! process asking on the coop socket), or start a command, wait for its
//! ready line and capture it.

use remotefork::capture::{capture, CaptureError, CaptureOptions};
use tonic::Status;
use tracing::{info, info_span, Instrument};

use super::registry::SeedMeta;
use super::{auth, now_ms, readyline, Service, LOG};
use crate::pb;

/// The gRPC status a failed capture answers with.
fn capture_status(e: &CaptureError) -> Status {
    match e {
        CaptureError::NoSuchProcess(_) => Status::not_found(e.to_string()),
        CaptureError::NotPermitted { .. } => Status::permission_denied(e.to_string()),
        CaptureError::Zombie(_)
        | CaptureError::MainThreadExited { .. }
        | CaptureError::CoopReply { .. }
        | CaptureError::Thread { .. }
        | CaptureError::Exited { .. }
        | CaptureError::NoVdso(_)
        | CaptureError::Unsupported { .. }
        | CaptureError::Container(remotefork::container::ContainerError::Unsupported { .. })
        | CaptureError::Fd(remotefork::kobj::FdError::Refused { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

impl Service {
    pub(super) async fn create_from_pid(
        &self,
        pid: u32,
        name: String,
        cooperative: bool,
        owner: String,
        coop_reply_fd: Option<i32>,
        drop_fds: bool,
    ) -> Result<pb::Seed, Status> {
        let id = crate::random_hex(8).map_err(|e| Status::internal(e.to_string()))?;
        let key = crate::random_hex(16).map_err(|e| Status::internal(e.to_string()))?;
        let dir = self.state.registry.tmp_dir(&id);
        let file_store = Some(self.state.registry.file_store());
        let rootfs_store = Some(self.state.registry.rootfs_store());
        let span = info_span!(target: LOG, "create_seed", seed = %id, pid);
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
                    coop_reply_fd,
                    drop_unsupported_fds: drop_fds,
                    rootfs_store,
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
        info!(target: LOG, seed = %id, pid, "seed created");
        Ok(seed.to_pb(&self.state.hostname, true))
    }

    pub(super) async fn create_from_command(
        &self,
        c: pb::StartCommand,
        name: String,
        who: &auth::Principal,
        peer: Option<auth::Peer>,
        owner: String,
        drop_fds: bool,
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
        let timeout = ready_timeout(c.ready_timeout_ms);
        let result = match readyline::wait(&mut child, &c.argv, &c.ready_line, timeout).await {
            Ok(()) => {
                let default = std::path::Path::new(&c.argv[0])
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                self.create_from_pid(pid, name_or(name, default), false, owner, None, drop_fds)
                    .await
            }
            Err(e) => Err(e),
        };
        // The seed holds the process now; the original is not needed.
        let _ = child.kill().await;
        result
    }
}

/// Refused (PERMISSION_DENIED) unless `who` is the operator: root on the
/// Unix socket, or the node token.
fn operator_only(who: &auth::Principal, what: &str) -> Result<(), Status> {
    match who {
        auth::Principal::Operator | auth::Principal::Node => Ok(()),
        _ => Err(Status::permission_denied(format!(
            "only the operator (root on the Unix socket, or the node token) may {what}"
        ))),
    }
}

/// How long to wait for a ready line: `ms`, or 30 s when 0.
fn ready_timeout(ms: u32) -> std::time::Duration {
    std::time::Duration::from_millis(if ms == 0 { 30_000 } else { ms as u64 })
}

/// The seed's name: the one given, else `default`.
fn name_or(name: String, default: String) -> String {
    if name.is_empty() {
        default
    } else {
        name
    }
}

/// An OCI runtime forkd may run: runc or crun, found on PATH.
fn oci_runtime(name: &str) -> Result<String, Status> {
    let name = if name.is_empty() { "runc" } else { name };
    if !matches!(name, "runc" | "crun") {
        return Err(Status::invalid_argument(format!(
            "OCI runtime {name:?}: runc or crun"
        )));
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "the OCI runtime {name} is not installed on this node (apt-get install {name})"
            ))
        })
}

/// `RUNTIME state ID`: the container's init pid, if it is running.
async fn container_pid(runtime: &str, id: &str) -> Result<u32, Status> {
    let out = tokio::process::Command::new(runtime)
        .args(["state", id])
        .output()
        .await
        .map_err(|e| Status::internal(format!("running {runtime} state: {e}")))?;
    if !out.status.success() {
        return Err(Status::not_found(format!(
            "{runtime} has no container {id:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Status::internal(format!("{runtime} state {id}: {e}")))?;
    if v["status"] != "running" {
        return Err(Status::failed_precondition(format!(
            "container {id} is {}, not running",
            v["status"]
        )));
    }
    v["pid"]
        .as_u64()
        .filter(|p| *p > 0)
        .map(|p| p as u32)
        .ok_or_else(|| Status::internal(format!("{runtime} state {id}: no pid")))
}

/// The bundle's config.json with the process to run (`argv`, if given),
/// no terminal, and the rootfs path made absolute, written to `to`.
fn staged_bundle(
    bundle: &std::path::Path,
    argv: &[String],
    to: &std::path::Path,
) -> Result<(), Status> {
    let cfg_path = bundle.join("config.json");
    let text = std::fs::read(&cfg_path)
        .map_err(|e| Status::invalid_argument(format!("OCI bundle {}: {e}", cfg_path.display())))?;
    let mut cfg: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Status::invalid_argument(format!("OCI bundle {}: {e}", cfg_path.display())))?;
    let root = cfg["root"]["path"].as_str().ok_or_else(|| {
        Status::invalid_argument(format!("{} has no root.path", cfg_path.display()))
    })?;
    let root = bundle.join(root);
    if !root.is_dir() {
        return Err(Status::invalid_argument(format!(
            "OCI bundle {}: its rootfs {} is not a directory",
            bundle.display(),
            root.display()
        )));
    }
    cfg["root"]["path"] = serde_json::json!(root);
    if !argv.is_empty() {
        cfg["process"]["args"] = serde_json::json!(argv);
    }
    // forkd reads the ready line from its stdout: no terminal.
    cfg["process"]["terminal"] = serde_json::json!(false);
    std::fs::create_dir_all(to)
        .and_then(|()| std::fs::write(to.join("config.json"), cfg.to_string()))
        .map_err(|e| Status::internal(format!("staging the bundle in {}: {e}", to.display())))
}

impl Service {
    /// Run an OCI bundle with runc or crun, wait for its ready line, and
    /// capture its process: a container seed. The container goes once the
    /// seed holds it.
    pub(super) async fn create_from_oci(
        &self,
        b: pb::OciBundle,
        name: String,
        who: &auth::Principal,
        owner: String,
        drop_fds: bool,
    ) -> Result<pb::Seed, Status> {
        operator_only(who, "run an OCI bundle: the runtime runs it as root")?;
        if b.ready_line.is_empty() {
            return Err(Status::invalid_argument(
                "an OCI bundle needs a ready_line to know when to capture it",
            ));
        }
        let runtime = oci_runtime(&b.runtime)?;
        let bundle = std::path::PathBuf::from(&b.bundle);
        let tag = crate::random_hex(6).map_err(|e| Status::internal(e.to_string()))?;
        let cid = format!("remotefork-{tag}");
        let staged = self.state.registry.tmp_dir(&format!("bundle-{tag}"));
        staged_bundle(&bundle, &b.argv, &staged)?;
        let mut cmd = tokio::process::Command::new(&runtime);
        cmd.args(["run", "--bundle"])
            .arg(&staged)
            .arg(&cid)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&staged);
            Status::internal(format!("cannot start {runtime}: {e}"))
        })?;
        let argv = vec![runtime.clone(), "run".into(), b.bundle.clone()];
        let timeout = ready_timeout(b.ready_timeout_ms);
        let result = match readyline::wait(&mut child, &argv, &b.ready_line, timeout).await {
            Ok(()) => match container_pid(&runtime, &cid).await {
                Ok(pid) => {
                    let default = bundle
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_else(|| cid.clone());
                    self.create_from_pid(pid, name_or(name, default), false, owner, None, drop_fds)
                        .await
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        // The seed holds the container now: it goes, with its runtime state.
        let _ = tokio::process::Command::new(&runtime)
            .args(["kill", &cid, "KILL"])
            .output()
            .await;
        let _ = child.kill().await;
        let _ = tokio::process::Command::new(&runtime)
            .args(["delete", "--force", &cid])
            .output()
            .await;
        let _ = std::fs::remove_dir_all(&staged);
        result
    }

    /// Capture the process of a container an OCI runtime runs (it keeps
    /// running).
    pub(super) async fn create_from_container(
        &self,
        c: pb::RuntimeContainer,
        name: String,
        who: &auth::Principal,
        owner: String,
        drop_fds: bool,
    ) -> Result<pb::Seed, Status> {
        operator_only(who, "capture a container by id")?;
        let runtime = oci_runtime(&c.runtime)?;
        let pid = container_pid(&runtime, &c.id).await?;
        self.create_from_pid(
            pid,
            name_or(name, c.id.clone()),
            false,
            owner,
            None,
            drop_fds,
        )
        .await
    }
}
