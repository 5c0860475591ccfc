//! The RDMA page source: a seed's pages read from another node with
//! one-sided RDMA READ over RC queue pairs (`docs/RDMA.md`).
//!
//! - **Exporter** (the seed's node): one [`ExportedSeed`] per seed, its page
//!   store mapped read-only (on kernels before 6.2, which refuse that, a
//!   copy in a memfd) and registered as one memory region with
//!   `REMOTE_READ` only; dropping it deregisters the region, after which a
//!   READ of it fails at the reader with a remote access error. One RC
//!   queue pair per importing connection ([`Exporter::accept`]), replaced
//!   when the same connection reconnects.
//! - **Importer** (the child's node): one [`Connection`] per peer node,
//!   shared (`Arc`) by the [`RdmaSource`] of every seed of that peer; a
//!   source carries its seed's remote address, rkey and size. A batch of
//!   ranges becomes a list of READ work requests posted with one doorbell,
//!   only the last one signaled, and the completion queue is polled until a
//!   deadline. READs land straight in the node-local seed cache, registered
//!   `LOCAL_WRITE` chunk by chunk as it is first used; any other
//!   destination goes through a registered bounce buffer.
//!
//! The queue pair and its completion queue sit behind one mutex: a batch
//! owns the QP from post to completion, so pager threads of all seeds of
//! a peer take turns on it. Simple and enough for a software RoCE; a real
//! NIC would want one QP per pager thread.
//!
//! Verbs come from `sideway`, which opens `libibverbs.so.1` at run time:
//! without the library or a device, [`probe`] says why and nothing else
//! changes. Without the `rdma` cargo feature the types are still here but
//! every constructor reports that the build has no RDMA.

use super::{PageSource, SourceError};

/// Largest single READ work request. Bigger ranges are split.
pub const MAX_READ: usize = 1 << 20;
/// Send queue depth: at most this many READs are posted per doorbell.
pub const SQ_DEPTH: u32 = 64;
/// The destination (seed cache) is registered in chunks of this size, as
/// they are first read into, so a sparse cache is not pinned whole.
pub const DEST_CHUNK: usize = 4 << 20;
/// Size of each connection's bounce buffer, for destinations outside the
/// registered cache.
pub const BOUNCE_BYTES: usize = 4 << 20;

/// Errors of the RDMA transport.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No usable RDMA device (or no RDMA support in this build).
    #[error("RDMA unavailable: {0}")]
    Unavailable(ProbeError),
    /// A verbs call failed.
    #[error("{what}: {error}")]
    Verbs {
        /// What was being done.
        what: String,
        /// The error, with its causes.
        error: String,
    },
    /// Setting up or restoring a connection failed: the exchange with the
    /// peer over the control plane.
    #[error("connecting to {peer}: {reason}")]
    Connect {
        /// The peer.
        peer: String,
        /// Why.
        reason: ExchangeError,
    },
    /// A first connect found the connection already made by another thread.
    #[error("connecting to {peer}: connected by another thread")]
    ConnectedElsewhere {
        /// The peer.
        peer: String,
    },
    /// A peer's queue pair number is not 24 bits (or 0).
    #[error("queue pair number {0:#x} is not a 24-bit QPN")]
    BadQpn(u32),
    /// A peer's first packet sequence number is more than 24 bits.
    #[error("PSN {0:#x} is more than 24 bits")]
    BadPsn(u32),
    /// A peer's MTU is not one RDMA knows.
    #[error("MTU {0} is not an RDMA MTU")]
    BadMtu(u32),
    /// A peer gave neither a GID nor a LID to address it by.
    #[error("no GID and no LID")]
    NoAddress,
    /// The page store to export is empty.
    #[error("{} is an empty page store: nothing to export", .0.display())]
    EmptyPageStore(std::path::PathBuf),
    /// The page store to export does not fit in this address space.
    #[error("{0} bytes do not fit in memory")]
    TooLarge(u64),
    /// The exporter has as many connections as it accepts.
    #[error("already {0} RDMA connections on this node")]
    TooManyConnections(usize),
    /// A batch of READs failed.
    #[error("{0}")]
    Read(ReadFailure),
    /// A batch failed, and after reconnecting the peer offers the seed at
    /// another size.
    #[error("{failure}; after reconnecting the peer offers {offered} bytes, not {expected}")]
    Resized {
        /// Why the batch failed.
        failure: ReadFailure,
        /// The size offered now.
        offered: u64,
        /// The size before.
        expected: u64,
    },
    /// A batch failed, and so did reconnecting.
    #[error("{failure}; reconnecting failed: {error}")]
    ReconnectFailed {
        /// Why the batch failed.
        failure: ReadFailure,
        /// Why reconnecting failed.
        error: Box<RdmaError>,
    },
}

/// Why no RDMA device port is usable ([`probe`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// This build has no RDMA.
    #[error("this build has no RDMA support (cargo feature `rdma` is off)")]
    NotBuilt,
    /// The verbs library cannot be loaded.
    #[error("libibverbs.so.1 cannot be loaded (install rdma-core and ibverbs-providers)")]
    NoLibrary,
    /// The kernel has no verbs support.
    #[error("the kernel has no RDMA verbs support (no /sys/class/infiniband_verbs)")]
    NoKernelSupport,
    /// Listing the devices failed otherwise.
    #[error("listing RDMA devices: {0}")]
    List(String),
    /// sideway met values it does not know (it panics on them).
    #[error("the verbs library returned values sideway does not know")]
    UnknownValues,
    /// There is no RDMA device.
    #[error("no RDMA device (/sys/class/infiniband is empty)")]
    NoDevice,
    /// The device asked for does not exist.
    #[error("no RDMA device named {want:?} (have {})", have.join(", "))]
    NoSuchDevice {
        /// The name asked for.
        want: String,
        /// The devices there are.
        have: Vec<String>,
    },
    /// No device has an active port with a usable GID.
    #[error("no active RDMA port: {}", why.join("; "))]
    NoActivePort {
        /// Per device or port: why it is not usable.
        why: Vec<String>,
    },
}

/// Why a batch of READs failed. A connection whose batch failed keeps
/// it as the reason its queue pair is unusable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadFailure {
    /// The connection was never connected.
    #[error("not connected yet")]
    NotConnected,
    /// An earlier failure left the queue pair unusable.
    #[error("the queue pair is unusable ({0})")]
    Unusable(Box<ReadFailure>),
    /// The connection has no bounce buffer.
    #[error("no bounce buffer")]
    NoBounceBuffer,
    /// The connection has no queue pair.
    #[error("no queue pair")]
    NoQueuePair,
    /// Posting the work requests failed.
    #[error("posting {count} READs: {cause}")]
    Post {
        /// Work requests posted.
        count: usize,
        /// The verbs error, with its causes.
        cause: String,
    },
    /// A work request completed with an error.
    #[error("READ failed: {} (status {status}, vendor error {vendor_err:#x})", wc_status_name(*status))]
    Completion {
        /// The work completion status.
        status: u32,
        /// The vendor's error code.
        vendor_err: u32,
    },
    /// Polling the completion queue failed.
    #[error("polling the completion queue: {0}")]
    Poll(String),
    /// The batch did not complete before its deadline.
    #[error("no completion for {0} READs before the deadline")]
    Deadline(usize),
}

/// Why the control-plane exchange of queue pairs with a peer failed: the
/// caller's own error (a [`Reconnect`] or `connect_with` callback).
pub type ExchangeError = Box<dyn std::error::Error + Send + Sync>;

/// The device and port this node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name (`rxe0`, `mlx5_0`).
    pub device: String,
    /// Port number (from 1).
    pub port: u8,
    /// Index of the source GID used.
    pub gid_index: u8,
    /// That GID.
    pub gid: [u8; 16],
    /// `RoCEv2`, `RoCEv1` or `IB`.
    pub gid_type: String,
    /// `Ethernet` or `InfiniBand`.
    pub link_layer: String,
    /// The port's LID (InfiniBand only; 0 on RoCE).
    pub lid: u16,
    /// Active MTU in bytes.
    pub mtu: u32,
}

impl DeviceInfo {
    /// One line for logs and `NodeInfo`.
    pub fn summary(&self) -> String {
        format!(
            "{} port {} ({}, {} GID {} index {}, MTU {})",
            self.device,
            self.port,
            self.link_layer,
            self.gid_type,
            gid_text(&self.gid),
            self.gid_index,
            self.mtu
        )
    }
}

/// A GID as text: dotted IPv4 for IPv4-mapped GIDs, IPv6 otherwise.
pub fn gid_text(gid: &[u8; 16]) -> String {
    let ip = std::net::Ipv6Addr::from(*gid);
    match ip.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => ip.to_string(),
    }
}

/// One end of an RC connection, as exchanged over the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// The GID to address it by.
    pub gid: [u8; 16],
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number it sends (24 bits).
    pub psn: u32,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Its port's active MTU in bytes; the path uses the smaller of both.
    pub mtu: u32,
}

impl QpInfo {
    /// Check what a peer sent.
    pub fn validate(&self) -> Result<(), RdmaError> {
        if self.qpn == 0 || self.qpn > 0xff_ffff {
            return Err(RdmaError::BadQpn(self.qpn));
        }
        if self.psn > 0xff_ffff {
            return Err(RdmaError::BadPsn(self.psn));
        }
        if ![256, 512, 1024, 2048, 4096].contains(&self.mtu) {
            return Err(RdmaError::BadMtu(self.mtu));
        }
        if self.gid == [0; 16] && self.lid == 0 {
            return Err(RdmaError::NoAddress);
        }
        Ok(())
    }
}

/// Where a seed's page store lies in its node's memory, for RDMA READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Virtual address of byte 0 of the page store.
    pub addr: u64,
    /// The memory region's remote key.
    pub rkey: u32,
    /// Size of the page store in bytes.
    pub size: u64,
}

/// How an importer restores a broken connection: given the new local QP,
/// it asks the peer (over the control plane) to connect a fresh QP to it
/// and returns the peer's QP and the seed's region (which a restarted peer
/// may have moved).
pub type Reconnect =
    Box<dyn Fn(&QpInfo) -> Result<(QpInfo, RemoteRegion), ExchangeError> + Send + Sync>;

/// A random 24-bit PSN or a random connection id, from the kernel.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Not security relevant (PSNs, ids): fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(b)
}

/// The name of a work completion status (the common ones).
pub fn wc_status_name(status: u32) -> &'static str {
    match status {
        0 => "success",
        1 => "local length error",
        2 => "local QP operation error",
        4 => "local protection error",
        5 => "work request flushed (the queue pair was in error)",
        8 => "local access error",
        9 => "remote invalid request",
        10 => "remote access error (the seed's memory region is gone or the rkey is wrong)",
        11 => "remote operation error",
        12 => "transport retry counter exceeded (the peer does not answer)",
        13 => "RNR retry counter exceeded",
        _ => "error",
    }
}

pub use imp::*;

#[cfg(feature = "rdma")]
mod imp {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use kernel_helpers::mapping::Mapping;
    use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
    use sideway::ibverbs::completion::{
        BasicCompletionQueue, GenericCompletionQueue, PollCompletionQueueError,
    };
    use sideway::ibverbs::device::{DeviceInfo as _, DeviceList, GetDeviceListErrorKind};
    use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
    use sideway::ibverbs::memory_region::MemoryRegion;
    use sideway::ibverbs::protection_domain::ProtectionDomain;
    use sideway::ibverbs::queue_pair::{
        BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
        SetScatterGatherEntry, WorkRequestFlags,
    };
    use sideway::ibverbs::AccessFlags;

    /// A plan for one batch: what to READ and where it goes.
    #[derive(Debug, Clone, Copy)]
    struct Piece {
        /// Offset in the page store.
        remote: u64,
        len: u32,
        local: Local,
    }

    #[derive(Debug, Clone, Copy)]
    enum Local {
        /// Straight into registered memory.
        Direct { addr: u64, lkey: u32 },
        /// Through the bounce buffer, then copied to request `req` at `at`.
        Bounce { req: usize, at: usize },
    }

    /// Why a batch failed.
    #[derive(Debug)]
    struct BatchError {
        failure: ReadFailure,
        /// Worth a reconnect and one more try.
        retry: bool,
        /// The connection generation it failed on.
        generation: u64,
    }

    /// An error and its causes, on one line.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            let t = c.to_string();
            if !s.contains(&t) {
                s.push_str(": ");
                s.push_str(&t);
            }
            cur = c.source();
        }
        s
    }

    fn verbs(what: impl Into<String>, e: &dyn std::error::Error) -> RdmaError {
        RdmaError::Verbs {
            what: what.into(),
            error: chain(e),
        }
    }

    fn mtu_bytes(m: Mtu) -> u32 {
        match m {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    fn mtu_of(bytes: u32) -> Mtu {
        match bytes {
            0..=256 => Mtu::Mtu256,
            257..=512 => Mtu::Mtu512,
            513..=1024 => Mtu::Mtu1024,
            1025..=2048 => Mtu::Mtu2048,
            _ => Mtu::Mtu4096,
        }
    }

    /// Is this GID an IPv4-mapped address (`::ffff:a.b.c.d`)?
    fn ipv4_mapped(g: &[u8; 16]) -> bool {
        g[..10].iter().all(|b| *b == 0) && g[10] == 0xff && g[11] == 0xff
    }

    /// Open a device (the named one, or the first with an active port) and
    /// pick its port and source GID.
    fn find(device: Option<&str>) -> Result<(Arc<DeviceContext>, DeviceInfo, u8, u8), ProbeError> {
        // sideway panics on enum values it does not know; a probe must
        // never take the daemon down.
        match std::panic::catch_unwind(|| find_inner(device)) {
            Ok(r) => r,
            Err(_) => Err(ProbeError::UnknownValues),
        }
    }

    fn find_inner(
        device: Option<&str>,
    ) -> Result<(Arc<DeviceContext>, DeviceInfo, u8, u8), ProbeError> {
        let list = DeviceList::new().map_err(|e| match &e.0 {
            GetDeviceListErrorKind::Ibverbs(io) if io.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                ProbeError::NoLibrary
            }
            GetDeviceListErrorKind::Ibverbs(io) if io.raw_os_error() == Some(libc::ENOSYS) => {
                ProbeError::NoKernelSupport
            }
            _ => ProbeError::List(chain(&e)),
        })?;
        if list.is_empty() {
            return Err(ProbeError::NoDevice);
        }
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let mut why = Vec::new();
        for dev in list.iter() {
            let name = dev.name();
            if device.is_some_and(|want| want != name) {
                continue;
            }
            let ctx = match dev.open() {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!("{name}: cannot open: {}", chain(&e)));
                    continue;
                }
            };
            let attr = match ctx.query_device() {
                Ok(a) => a,
                Err(e) => {
                    why.push(format!("{name}: {}", chain(&e)));
                    continue;
                }
            };
            let gids = ctx.query_gid_table().unwrap_or_default();
            for port in 1..=attr.phys_port_cnt() {
                let pa = match ctx.query_port(port) {
                    Ok(p) => p,
                    Err(e) => {
                        why.push(format!("{name} port {port}: {}", chain(&e)));
                        continue;
                    }
                };
                if pa.port_state() != PortState::Active {
                    why.push(format!("{name} port {port} is {:?}", pa.port_state()));
                    continue;
                }
                let ll = pa.link_layer();
                // Prefer RoCE v2 on an IPv4 address (routable, what rxe
                // gets on an IPv4 netdev), then any RoCE v2, then the rest.
                let mut best: Option<(u32, u8, [u8; 16], GidType)> = None;
                for g in gids.iter().filter(|g| g.port_num() == port as u32) {
                    let raw = g.gid().raw;
                    if raw == [0; 16] || g.gid_index() > u8::MAX as u32 {
                        continue;
                    }
                    let t = g.gid_type();
                    let rank = match t {
                        GidType::RoceV2 if ipv4_mapped(&raw) => 0,
                        GidType::RoceV2 => 1,
                        GidType::InfiniBand => 2,
                        GidType::RoceV1 => 3,
                    };
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, g.gid_index() as u8, raw, t));
                    }
                }
                if best.is_none() && ll == LinkLayer::InfiniBand {
                    // Providers without the GID table API: index 0.
                    if let Ok(g) = ctx.query_gid(port, 0) {
                        best = Some((2, 0, g.raw, GidType::InfiniBand));
                    }
                }
                let Some((_, gid_index, gid, t)) = best else {
                    why.push(format!(
                        "{name} port {port}: no usable GID (give the netdev an IP address)"
                    ));
                    continue;
                };
                let info = DeviceInfo {
                    device: name.clone(),
                    port,
                    gid_index,
                    gid,
                    gid_type: match t {
                        GidType::RoceV2 => "RoCEv2",
                        GidType::RoceV1 => "RoCEv1",
                        GidType::InfiniBand => "IB",
                    }
                    .into(),
                    link_layer: match ll {
                        LinkLayer::InfiniBand => "InfiniBand",
                        LinkLayer::Ethernet => "Ethernet",
                        LinkLayer::Unspecified => "unspecified",
                    }
                    .into(),
                    lid: if ll == LinkLayer::InfiniBand {
                        pa.lid()
                    } else {
                        0
                    },
                    mtu: mtu_bytes(pa.active_mtu()),
                };
                let rd = attr.max_qp_rd_atom().clamp(1, 16) as u8;
                let init_rd = attr.max_qp_init_rd_atom().clamp(1, 16) as u8;
                return Ok((ctx, info, rd, init_rd));
            }
        }
        match device {
            Some(want) if !names.iter().any(|n| n == want) => Err(ProbeError::NoSuchDevice {
                want: want.to_string(),
                have: names,
            }),
            _ => Err(ProbeError::NoActivePort { why }),
        }
    }

    /// An active device port usable for RDMA, or why there is none.
    pub fn probe(device: Option<&str>) -> Result<DeviceInfo, ProbeError> {
        find(device).map(|(_, info, _, _)| info)
    }

    /// This node's RDMA device: context, protection domain, port and GID.
    pub struct RdmaNode {
        ctx: Arc<DeviceContext>,
        pd: Arc<ProtectionDomain>,
        info: DeviceInfo,
        max_dest_rd_atomic: u8,
        max_rd_atomic: u8,
        qps_created: AtomicU64,
        qps_live: Arc<AtomicU64>,
    }

    impl std::fmt::Debug for RdmaNode {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RdmaNode")
                .field("device", &self.info.summary())
                .finish()
        }
    }

    /// A queue pair with its completion queue, destroyed (QP first) on drop.
    struct Qp {
        qp: BasicQueuePair,
        cq: Arc<BasicCompletionQueue>,
        local: QpInfo,
        live: Arc<AtomicU64>,
    }

    impl Drop for Qp {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    impl RdmaNode {
        /// Open `device` (or the first with an active port).
        pub fn open(device: Option<&str>) -> Result<Arc<RdmaNode>, RdmaError> {
            let (ctx, info, rd, init_rd) = find(device).map_err(RdmaError::Unavailable)?;
            let pd = ctx.alloc_pd().map_err(|e| {
                verbs(
                    format!("allocating a protection domain on {}", info.device),
                    &e,
                )
            })?;
            tracing::info!(device = %info.summary(), "RDMA device open");
            Ok(Arc::new(RdmaNode {
                ctx,
                pd,
                info,
                max_dest_rd_atomic: rd,
                max_rd_atomic: init_rd,
                qps_created: AtomicU64::new(0),
                qps_live: Arc::new(AtomicU64::new(0)),
            }))
        }

        /// The device and port in use.
        pub fn info(&self) -> &DeviceInfo {
            &self.info
        }

        /// Queue pairs created on this node so far (both roles).
        pub fn qps_created(&self) -> u64 {
            self.qps_created.load(Ordering::Relaxed)
        }

        /// Queue pairs that exist now.
        pub fn qps_live(&self) -> u64 {
            self.qps_live.load(Ordering::Relaxed)
        }

        /// A new RC queue pair in INIT, with its own completion queue, in
        /// this node's protection domain.
        fn new_qp(&self, access: AccessFlags) -> Result<Qp, RdmaError> {
            self.new_qp_in(&self.pd, access)
        }

        /// [`RdmaNode::new_qp`] in protection domain `pd`.
        fn new_qp_in(
            &self,
            pd: &Arc<ProtectionDomain>,
            access: AccessFlags,
        ) -> Result<Qp, RdmaError> {
            let cq = self
                .ctx
                .create_cq_builder()
                .setup_cqe(SQ_DEPTH * 2)
                .build()
                .map_err(|e| verbs("creating a completion queue", &e))?;
            let mut qp = pd
                .create_qp_builder()
                .setup_send_cq(GenericCompletionQueue::Basic(cq.clone()))
                .setup_recv_cq(GenericCompletionQueue::Basic(cq.clone()))
                .setup_max_send_wr(SQ_DEPTH)
                .setup_max_recv_wr(1)
                .setup_max_send_sge(1)
                .setup_max_recv_sge(1)
                .build()
                .map_err(|e| verbs("creating a queue pair", &e))?;
            let mut attr = QueuePairAttribute::new();
            attr.setup_state(QueuePairState::Init)
                .setup_pkey_index(0)
                .setup_port(self.info.port)
                .setup_access_flags(access);
            qp.modify(&attr)
                .map_err(|e| verbs("moving a queue pair to INIT", &e))?;
            self.qps_created.fetch_add(1, Ordering::Relaxed);
            self.qps_live.fetch_add(1, Ordering::Relaxed);
            let local = QpInfo {
                gid: self.info.gid,
                qpn: qp.qp_number(),
                psn: (random_u64() & 0xff_ffff) as u32,
                lid: self.info.lid,
                mtu: self.info.mtu,
            };
            Ok(Qp {
                qp,
                cq,
                local,
                live: self.qps_live.clone(),
            })
        }

        /// Move `q` to RTR then RTS, connected to `peer`.
        fn connect(&self, q: &mut Qp, peer: &QpInfo) -> Result<(), RdmaError> {
            peer.validate()?;
            let mut ah = AddressHandleAttribute::new();
            ah.setup_dest_lid(peer.lid)
                .setup_port(self.info.port)
                .setup_service_level(0);
            if peer.gid != [0; 16] {
                // RoCE needs the GRH (is_global): GID-based addressing from
                // our chosen source GID index.
                ah.setup_grh_src_gid_index(self.info.gid_index)
                    .setup_grh_dest_gid(&Gid { raw: peer.gid })
                    .setup_grh_hop_limit(64);
            }
            let mut attr = QueuePairAttribute::new();
            attr.setup_state(QueuePairState::ReadyToReceive)
                .setup_path_mtu(mtu_of(peer.mtu.min(self.info.mtu)))
                .setup_dest_qp_num(peer.qpn)
                .setup_rq_psn(peer.psn)
                .setup_max_dest_read_atomic(self.max_dest_rd_atomic)
                .setup_min_rnr_timer(12)
                .setup_address_vector(&ah);
            q.qp.modify(&attr)
                .map_err(|e| verbs("moving a queue pair to RTR", &e))?;
            let mut attr = QueuePairAttribute::new();
            // timeout 16: 4.096 us << 16 = 268 ms per try, 7 tries: a dead
            // peer is noticed in about 2 s (the page deadline bounds it too).
            attr.setup_state(QueuePairState::ReadyToSend)
                .setup_sq_psn(q.local.psn)
                .setup_timeout(16)
                .setup_retry_cnt(7)
                .setup_rnr_retry(7)
                .setup_max_read_atomic(self.max_rd_atomic);
            q.qp.modify(&attr)
                .map_err(|e| verbs("moving a queue pair to RTS", &e))?;
            Ok(())
        }

        /// Register `len` bytes at `addr` with `access`.
        ///
        /// # Safety
        ///
        /// `addr..addr+len` must be mapped (writable if `access` lets the
        /// device write) for as long as the returned region lives.
        unsafe fn register(
            &self,
            addr: usize,
            len: usize,
            access: AccessFlags,
        ) -> Result<Arc<MemoryRegion>, RdmaError> {
            // SAFETY: the caller's promise, passed on.
            unsafe { self.register_in(&self.pd, addr, len, access) }
        }

        /// [`RdmaNode::register`] in protection domain `pd`.
        ///
        /// # Safety
        ///
        /// As [`RdmaNode::register`].
        unsafe fn register_in(
            &self,
            pd: &Arc<ProtectionDomain>,
            addr: usize,
            len: usize,
            access: AccessFlags,
        ) -> Result<Arc<MemoryRegion>, RdmaError> {
            // SAFETY: the caller keeps the memory mapped while the region lives.
            unsafe { pd.reg_mr(addr, len, access) }.map_err(|e| {
                verbs(
                    format!(
                        "registering {len} bytes (needs CAP_IPC_LOCK or a large enough `ulimit -l`)"
                    ),
                    &e,
                )
            })
        }

        /// Export the page store at `path` (`size` bytes): map it read-only
        /// and register it for remote READ, in a protection domain of its
        /// own. Queue pairs that read it are made in that domain too
        /// ([`Exporter::accept`]), so a peer connected for one seed cannot
        /// read another's region, whatever rkey and address it tries: the
        /// device refuses a key of another domain.
        pub fn export_file(&self, path: &Path, size: u64) -> Result<ExportedSeed, RdmaError> {
            let pd = self.ctx.alloc_pd().map_err(|e| {
                verbs(
                    format!("allocating a protection domain for {}", path.display()),
                    &e,
                )
            })?;
            if size == 0 {
                return Err(RdmaError::EmptyPageStore(path.to_path_buf()));
            }
            let file = std::fs::File::open(path).map_err(|e| RdmaError::Verbs {
                what: format!("opening {}", path.display()),
                error: e.to_string(),
            })?;
            let len = usize::try_from(size).map_err(|_| RdmaError::TooLarge(size))?;
            let map = Mapping::file_readonly(&file, len).map_err(|e| RdmaError::Verbs {
                what: format!("mapping {}", path.display()),
                error: e.to_string(),
            })?;
            let addr = map.as_slice().as_ptr() as usize;
            // SAFETY: `map` is kept in the ExportedSeed next to the region
            // and dropped after it (field order). REMOTE_READ only: the
            // device never writes, so a read-only mapping is enough.
            match unsafe { self.register_in(&pd, addr, len, AccessFlags::RemoteRead) } {
                Ok(mr) => {
                    return Ok(ExportedSeed {
                        mr,
                        pd,
                        _map: Exported::InPlace(map),
                        size,
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registering the page store in place failed; copying it to memory")
                }
            }
            // Kernels before 6.2 pin even a read-only region for writing
            // (FOLL_WRITE | FOLL_FORCE), which a read-only shared file
            // mapping refuses with EFAULT: serve a copy in a memfd instead.
            let fd = kernel_helpers::mapping::memfd("remotefork-rdma-seed", size).map_err(|e| {
                RdmaError::Verbs {
                    what: "creating a memfd for the page store".into(),
                    error: e.to_string(),
                }
            })?;
            let map = Mapping::fd_shared(&fd, len).map_err(|e| RdmaError::Verbs {
                what: "mapping the page store's memfd".into(),
                error: e.to_string(),
            })?;
            {
                use std::os::unix::fs::FileExt;
                // SAFETY: the mapping was just made and is not registered
                // yet: nothing else can reach its bytes.
                file.read_exact_at(unsafe { map.slice_mut(0, len) }, 0)
                    .map_err(|e| RdmaError::Verbs {
                        what: format!("reading {}", path.display()),
                        error: e.to_string(),
                    })?;
            }
            let addr = map.as_ptr() as usize;
            // SAFETY: as above; this mapping is writable too.
            let mr = unsafe { self.register_in(&pd, addr, len, AccessFlags::RemoteRead) }?;
            Ok(ExportedSeed {
                mr,
                pd,
                _map: Exported::Copy(map),
                size,
            })
        }
    }

    /// A seed's page store registered for remote READ. Dropping it
    /// deregisters the region: READs of it then fail at the reader.
    pub struct ExportedSeed {
        // Declared before the mapping: deregistered before it is unmapped.
        mr: Arc<MemoryRegion>,
        /// Its own protection domain: its region's and its readers' QPs'.
        pd: Arc<ProtectionDomain>,
        _map: Exported,
        size: u64,
    }

    /// The memory behind an [`ExportedSeed`]'s region, kept (never read:
    /// the device reads it) while it is registered.
    #[derive(Debug)]
    #[allow(dead_code)]
    enum Exported {
        /// The page store file, mapped read-only.
        InPlace(kernel_helpers::mapping::ReadOnlyMapping),
        /// A copy of it in a memfd (kernels before 6.2).
        Copy(kernel_helpers::mapping::SharedMapping),
    }

    impl std::fmt::Debug for ExportedSeed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ExportedSeed")
                .field("region", &self.region())
                .finish()
        }
    }

    impl ExportedSeed {
        /// Which protection domain is its (an identity for the QPs made in it).
        fn domain_id(&self) -> u64 {
            Arc::as_ptr(&self.pd) as usize as u64
        }

        /// What an importer needs to READ it.
        pub fn region(&self) -> RemoteRegion {
            RemoteRegion {
                addr: self.mr.get_ptr() as u64,
                rkey: self.mr.rkey(),
                size: self.size,
            }
        }
    }

    /// The exporter's queue pairs, one per importing connection; each
    /// connection reads one seed (its QP is in that seed's protection
    /// domain).
    pub struct Exporter {
        node: Arc<RdmaNode>,
        qps: Mutex<HashMap<u64, (u64, Qp)>>,
        max: usize,
    }

    impl std::fmt::Debug for Exporter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Exporter")
                .field("connections", &self.connections())
                .finish()
        }
    }

    impl Exporter {
        /// An exporter on `node` accepting at most `max` connections.
        pub fn new(node: Arc<RdmaNode>, max: usize) -> Exporter {
            Exporter {
                node,
                qps: Mutex::new(HashMap::new()),
                max,
            }
        }

        /// The device.
        pub fn node(&self) -> &Arc<RdmaNode> {
            &self.node
        }

        /// Connect a fresh queue pair, in `seed`'s protection domain, to the
        /// importer's `peer` for its connection `id` (replacing that
        /// connection's old QP) and return ours.
        pub fn accept(
            &self,
            id: u64,
            peer: &QpInfo,
            seed: &ExportedSeed,
        ) -> Result<QpInfo, RdmaError> {
            peer.validate()?;
            let mut g = self.qps.lock().unwrap_or_else(|e| e.into_inner());
            if !g.contains_key(&id) && g.len() >= self.max {
                return Err(RdmaError::TooManyConnections(g.len()));
            }
            // The old QP of this connection goes first: it is broken or
            // about to be abandoned by the importer.
            g.remove(&id);
            let mut q = self.node.new_qp_in(&seed.pd, AccessFlags::RemoteRead)?;
            self.node.connect(&mut q, peer)?;
            let local = q.local;
            g.insert(id, (seed.domain_id(), q));
            tracing::debug!(connection = id, peer = %gid_text(&peer.gid), qpn = peer.qpn, "RDMA connection accepted");
            Ok(local)
        }

        /// Is connection `id` connected here, for `seed`?
        pub fn has_connection(&self, id: u64, seed: &ExportedSeed) -> bool {
            self.qps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .is_some_and(|(d, _)| *d == seed.domain_id())
        }

        /// Connections connected here.
        pub fn connections(&self) -> usize {
            self.qps.lock().unwrap_or_else(|e| e.into_inner()).len()
        }

        /// Forget connection `id` (its QP is destroyed).
        pub fn disconnect(&self, id: u64) {
            self.qps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// The state behind a connection's mutex.
    struct Live {
        qp: Option<Qp>,
        /// Why the QP cannot be used (None when it can).
        broken: Option<ReadFailure>,
        generation: u64,
        next_wr: u64,
        bounce: Option<(Arc<MemoryRegion>, kernel_helpers::mapping::SharedMapping)>,
    }

    /// The importer's RC connection to one peer node, shared by every
    /// seed of that peer (see the module doc).
    pub struct Connection {
        node: Arc<RdmaNode>,
        peer: String,
        id: u64,
        live: Mutex<Live>,
        batches: AtomicU64,
    }

    impl std::fmt::Debug for Connection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Connection")
                .field("peer", &self.peer)
                .field("id", &self.id)
                .finish()
        }
    }

    impl Connection {
        /// A connection to `peer` (a name for messages), not connected yet.
        pub fn new(node: Arc<RdmaNode>, peer: &str) -> Arc<Connection> {
            Arc::new(Connection {
                node,
                peer: peer.to_string(),
                id: random_u64(),
                live: Mutex::new(Live {
                    qp: None,
                    broken: Some(ReadFailure::NotConnected),
                    generation: 0,
                    next_wr: 1,
                    bounce: None,
                }),
                batches: AtomicU64::new(0),
            })
        }

        /// The id the peer knows this connection by.
        pub fn id(&self) -> u64 {
            self.id
        }

        /// The peer's name.
        pub fn peer(&self) -> &str {
            &self.peer
        }

        /// The device.
        pub fn node(&self) -> &Arc<RdmaNode> {
            &self.node
        }

        /// Is the queue pair usable?
        pub fn is_connected(&self) -> bool {
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .broken
                .is_none()
        }

        /// How many times a queue pair was (re)connected.
        pub fn generation(&self) -> u64 {
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .generation
        }

        /// Batches posted so far.
        pub fn batches(&self) -> u64 {
            self.batches.load(Ordering::Relaxed)
        }

        /// Connect (or reconnect) a fresh queue pair: `exchange` gives the
        /// peer our QP and returns its own (and whatever it wants to carry
        /// out, e.g. a seed's region). Does nothing but return `None` when
        /// another thread already reconnected after `seen_generation`.
        fn reconnect_inner<T>(
            &self,
            seen_generation: Option<u64>,
            exchange: impl FnOnce(&QpInfo) -> Result<(QpInfo, T), ExchangeError>,
        ) -> Result<Option<T>, RdmaError> {
            let mut g = self.live.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(seen) = seen_generation {
                if g.generation != seen && g.broken.is_none() {
                    return Ok(None);
                }
            }
            // Destroy the old QP first: nothing it posted can land later.
            g.qp = None;
            let mut q = self.node.new_qp(AccessFlags::LocalWrite)?;
            let (peer, out) = exchange(&q.local).map_err(|reason| RdmaError::Connect {
                peer: self.peer.clone(),
                reason,
            })?;
            self.node.connect(&mut q, &peer)?;
            if g.bounce.is_none() {
                let fd =
                    kernel_helpers::mapping::memfd("remotefork-rdma-bounce", BOUNCE_BYTES as u64)
                        .map_err(|e| RdmaError::Verbs {
                        what: "creating the bounce buffer".into(),
                        error: e.to_string(),
                    })?;
                let map = Mapping::fd_shared(&fd, BOUNCE_BYTES).map_err(|e| RdmaError::Verbs {
                    what: "mapping the bounce buffer".into(),
                    error: e.to_string(),
                })?;
                // SAFETY: the mapping is stored with the region in `bounce`
                // and the pair is only dropped together (region first).
                let mr = unsafe {
                    self.node
                        .register(map.as_ptr() as usize, BOUNCE_BYTES, AccessFlags::LocalWrite)
                }?;
                g.bounce = Some((mr, map));
            }
            g.qp = Some(q);
            g.broken = None;
            g.generation += 1;
            tracing::info!(peer = %self.peer, connection = self.id, generation = g.generation, device = %self.node.info.device, "RDMA connection up");
            Ok(Some(out))
        }

        /// Connect the first time (or again, unconditionally).
        pub fn connect_with<T>(
            &self,
            exchange: impl FnOnce(&QpInfo) -> Result<(QpInfo, T), ExchangeError>,
        ) -> Result<T, RdmaError> {
            self.reconnect_inner(None, exchange)?
                .ok_or_else(|| RdmaError::ConnectedElsewhere {
                    peer: self.peer.clone(),
                })
        }

        /// Run one batch: post `pieces` (direct ones, then bounce rounds)
        /// and wait for them until `until`.
        fn run(
            &self,
            pieces: &[Piece],
            reqs: &mut [(u64, &mut [u8])],
            region: &RemoteRegion,
            until: Instant,
        ) -> Result<(), BatchError> {
            let mut g = self.live.lock().unwrap_or_else(|e| e.into_inner());
            let generation = g.generation;
            if let Some(why) = &g.broken {
                return Err(BatchError {
                    failure: ReadFailure::Unusable(Box::new(why.clone())),
                    retry: true,
                    generation,
                });
            }
            self.batches.fetch_add(1, Ordering::Relaxed);
            let r = run_locked(&mut g, pieces, reqs, region, until);
            if let Err(failure) = r {
                // An error completion leaves the QP in the error state; a
                // timeout leaves READs in flight. Either way it is destroyed
                // now, before the caller's buffers are given back, so no
                // late READ can land in them.
                g.qp = None;
                g.broken = Some(failure.clone());
                return Err(BatchError {
                    failure,
                    retry: true,
                    generation,
                });
            }
            Ok(())
        }
    }

    /// Post and complete `pieces` on the locked connection.
    fn run_locked(
        g: &mut Live,
        pieces: &[Piece],
        reqs: &mut [(u64, &mut [u8])],
        region: &RemoteRegion,
        until: Instant,
    ) -> Result<(), ReadFailure> {
        let direct: Vec<(u64, u32, u64, u32)> = pieces
            .iter()
            .filter_map(|p| match p.local {
                Local::Direct { addr, lkey } => Some((addr, lkey, p.remote, p.len)),
                Local::Bounce { .. } => None,
            })
            .collect();
        for chunk in direct.chunks(SQ_DEPTH as usize) {
            post_wait(g, chunk, region, until)?;
        }
        let bounced: Vec<&Piece> = pieces
            .iter()
            .filter(|p| matches!(p.local, Local::Bounce { .. }))
            .collect();
        let mut i = 0;
        while i < bounced.len() {
            let Some((mr, map)) = &g.bounce else {
                return Err(ReadFailure::NoBounceBuffer);
            };
            let (base, lkey) = (map.as_ptr() as u64, mr.lkey());
            // Fill the bounce buffer with as many pieces as fit.
            let mut round: Vec<(u64, u32, u64, u32)> = Vec::new();
            let mut used = 0usize;
            let start = i;
            while i < bounced.len()
                && used + bounced[i].len as usize <= BOUNCE_BYTES
                && round.len() < SQ_DEPTH as usize
            {
                round.push((base + used as u64, lkey, bounced[i].remote, bounced[i].len));
                used += bounced[i].len as usize;
                i += 1;
            }
            post_wait(g, &round, region, until)?;
            let Some((_, map)) = &g.bounce else {
                return Err(ReadFailure::NoBounceBuffer);
            };
            // The device's writes completed (post_wait polled them) and no
            // READ into the buffer is outstanding: copy out, no slice made.
            let mut at = 0usize;
            for p in &bounced[start..i] {
                if let Local::Bounce { req, at: off } = p.local {
                    let n = p.len as usize;
                    if !map.read_at(at, &mut reqs[req].1[off..off + n]) {
                        return Err(ReadFailure::NoBounceBuffer);
                    }
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// Post READs `(local addr, lkey, remote offset, len)` with one
    /// doorbell, the last one signaled, and wait for its completion.
    fn post_wait(
        g: &mut Live,
        wrs: &[(u64, u32, u64, u32)],
        region: &RemoteRegion,
        until: Instant,
    ) -> Result<(), ReadFailure> {
        if wrs.is_empty() {
            return Ok(());
        }
        let id = g.next_wr;
        g.next_wr += 1;
        let Some(q) = g.qp.as_mut() else {
            return Err(ReadFailure::NoQueuePair);
        };
        let mut guard = q.qp.start_post_send();
        for (i, &(laddr, lkey, remote, len)) in wrs.iter().enumerate() {
            let last = i + 1 == wrs.len();
            let flags = if last {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            let h = guard
                .construct_wr(if last { id } else { 0 }, flags)
                .setup_read(region.rkey, region.addr + remote);
            // SAFETY: laddr..laddr+len lies in memory registered under
            // lkey (the cache chunk or the bounce buffer) that the caller
            // holds exclusively until this batch completes or the QP is
            // destroyed (Connection::run); remote ranges were checked
            // against the region's size by the source.
            unsafe { h.setup_sge(lkey, laddr, len) };
        }
        guard.post().map_err(|e| ReadFailure::Post {
            count: wrs.len(),
            cause: chain(&e),
        })?;
        let mut spins = 0u32;
        loop {
            match q.cq.start_poll() {
                Ok(poller) => {
                    for wc in poller {
                        if wc.status() != 0 {
                            return Err(ReadFailure::Completion {
                                status: wc.status(),
                                vendor_err: wc.vendor_err(),
                            });
                        }
                        if wc.wr_id() == id {
                            return Ok(());
                        }
                    }
                }
                Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
                Err(e) => return Err(ReadFailure::Poll(chain(&e))),
            }
            if Instant::now() >= until {
                return Err(ReadFailure::Deadline(wrs.len()));
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// The registered destination: the seed cache, registered chunk by chunk.
    struct Dest {
        base: usize,
        len: usize,
        chunks: HashMap<usize, Arc<MemoryRegion>>,
    }

    /// A seed's pages on another node, over a shared [`Connection`].
    pub struct RdmaSource {
        conn: Arc<Connection>,
        region: Mutex<RemoteRegion>,
        name: String,
        deadline: Duration,
        reconnect: Option<Reconnect>,
        dest: Mutex<Option<Dest>>,
        requests: AtomicU64,
        bytes: AtomicU64,
    }

    impl std::fmt::Debug for RdmaSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RdmaSource")
                .field("name", &self.name)
                .finish()
        }
    }

    impl RdmaSource {
        /// Read `region` over `conn` (connected), failing a batch that
        /// cannot complete within `deadline`; `reconnect` restores a broken
        /// connection once per batch.
        pub fn new(
            conn: Arc<Connection>,
            region: RemoteRegion,
            deadline: Duration,
            reconnect: Option<Reconnect>,
        ) -> RdmaSource {
            RdmaSource {
                name: format!("rdma:{}", conn.peer),
                conn,
                region: Mutex::new(region),
                deadline,
                reconnect,
                dest: Mutex::new(None),
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }
        }

        /// The connection.
        pub fn connection(&self) -> &Arc<Connection> {
            &self.conn
        }

        /// The seed's region as last known.
        pub fn region(&self) -> RemoteRegion {
            *self.region.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Bytes read so far.
        pub fn bytes(&self) -> u64 {
            self.bytes.load(Ordering::Relaxed)
        }

        /// Split the requests into pieces: at most MAX_READ each, within
        /// one registered chunk when they land in the cache.
        fn plan(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<Vec<Piece>, RdmaError> {
            let mut dest = self.dest.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = Vec::new();
            for (ri, (off, buf)) in reqs.iter_mut().enumerate() {
                let start = buf.as_mut_ptr() as usize;
                let total = buf.len();
                let mut done = 0usize;
                while done < total {
                    let addr = start + done;
                    let mut n = (total - done).min(MAX_READ);
                    let local = match dest.as_mut() {
                        Some(d) if addr >= d.base && addr < d.base + d.len => {
                            let rel = addr - d.base;
                            let ci = rel / DEST_CHUNK;
                            let chunk_start = ci * DEST_CHUNK;
                            let chunk_len = DEST_CHUNK.min(d.len - chunk_start);
                            n = n.min(chunk_start + chunk_len - rel);
                            let mr = match d.chunks.get(&ci) {
                                Some(mr) => mr.clone(),
                                None => {
                                    // SAFETY: the chunk lies inside the
                                    // destination attached with
                                    // `attach_destination`, whose caller
                                    // keeps it mapped and writable while
                                    // this source (and so the region) lives.
                                    let mr = unsafe {
                                        self.conn.node.register(
                                            d.base + chunk_start,
                                            chunk_len,
                                            AccessFlags::LocalWrite,
                                        )
                                    }?;
                                    d.chunks.insert(ci, mr.clone());
                                    mr
                                }
                            };
                            Local::Direct {
                                addr: addr as u64,
                                lkey: mr.lkey(),
                            }
                        }
                        _ => Local::Bounce { req: ri, at: done },
                    };
                    out.push(Piece {
                        remote: *off + done as u64,
                        len: n as u32,
                        local,
                    });
                    done += n;
                }
            }
            Ok(out)
        }

        /// A failed read of `len` bytes at `offset`.
        fn error(&self, offset: u64, len: usize, error: RdmaError) -> SourceError {
            SourceError::Read {
                source_name: self.name(),
                offset,
                len,
                error: std::io::Error::other(error),
            }
        }
    }

    impl PageSource for RdmaSource {
        fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            self.read_many(&mut [(offset, dst)])
        }

        fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
            let mut region = self.region();
            let first = reqs.first().map(|r| r.0).unwrap_or(0);
            let total: usize = reqs.iter().map(|r| r.1.len()).sum();
            // Never READ outside the seed's region.
            for (o, b) in reqs.iter() {
                if o.checked_add(b.len() as u64)
                    .is_none_or(|e| e > region.size)
                {
                    return Err(SourceError::OutOfRange {
                        offset: *o,
                        len: b.len(),
                        size: region.size,
                    });
                }
            }
            if total == 0 {
                return Ok(());
            }
            let pieces = self.plan(reqs).map_err(|e| self.error(first, total, e))?;
            let until = Instant::now() + self.deadline;
            let span = tracing::debug_span!("rdma_batch", source = %self.name, ranges = reqs.len(), bytes = total);
            let _e = span.enter();
            let mut reconnected = false;
            loop {
                self.requests.fetch_add(1, Ordering::Relaxed);
                match self.conn.run(&pieces, reqs, &region, until) {
                    Ok(()) => {
                        self.bytes.fetch_add(total as u64, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(e) => {
                        let Some(cb) = self.reconnect.as_ref() else {
                            return Err(self.error(first, total, RdmaError::Read(e.failure)));
                        };
                        if reconnected || !e.retry || Instant::now() >= until {
                            return Err(self.error(first, total, RdmaError::Read(e.failure)));
                        }
                        reconnected = true;
                        tracing::info!(source = %self.name, reason = %e.failure, "RDMA batch failed; reconnecting once");
                        match self.conn.reconnect_inner(Some(e.generation), |q| cb(q)) {
                            Ok(Some(r)) => {
                                if r.size != region.size {
                                    let resized = RdmaError::Resized {
                                        failure: e.failure,
                                        offered: r.size,
                                        expected: region.size,
                                    };
                                    return Err(self.error(first, total, resized));
                                }
                                region = r;
                                *self.region.lock().unwrap_or_else(|p| p.into_inner()) = r;
                            }
                            Ok(None) => {}
                            Err(re) => {
                                let failed = RdmaError::ReconnectFailed {
                                    failure: e.failure,
                                    error: Box::new(re),
                                };
                                return Err(self.error(first, total, failed));
                            }
                        }
                    }
                }
            }
        }

        unsafe fn attach_destination(&self, base: *mut u8, len: usize) {
            *self.dest.lock().unwrap_or_else(|e| e.into_inner()) = Some(Dest {
                base: base as usize,
                len,
                chunks: HashMap::new(),
            });
        }

        fn round_trips(&self) -> u64 {
            self.requests.load(Ordering::Relaxed)
        }

        fn reads_in_place(&self) -> bool {
            true
        }

        fn size(&self) -> u64 {
            self.region().size
        }

        fn name(&self) -> String {
            self.name.clone()
        }
    }
}

#[cfg(not(feature = "rdma"))]
mod imp {
    //! Without the `rdma` feature: the same names, every constructor
    //! reporting that this build has no RDMA.
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// An active device port usable for RDMA, or why there is none.
    pub fn probe(_device: Option<&str>) -> Result<DeviceInfo, ProbeError> {
        Err(ProbeError::NotBuilt)
    }

    /// This node's RDMA device (never opened in this build).
    #[derive(Debug)]
    pub struct RdmaNode {
        info: DeviceInfo,
    }

    impl RdmaNode {
        /// Always fails in this build.
        pub fn open(_device: Option<&str>) -> Result<Arc<RdmaNode>, RdmaError> {
            Err(RdmaError::Unavailable(ProbeError::NotBuilt))
        }
        /// The device.
        pub fn info(&self) -> &DeviceInfo {
            &self.info
        }
        /// Queue pairs created.
        pub fn qps_created(&self) -> u64 {
            0
        }
        /// Queue pairs that exist now.
        pub fn qps_live(&self) -> u64 {
            0
        }
        /// Always fails in this build.
        pub fn export_file(
            &self,
            _path: &std::path::Path,
            _size: u64,
        ) -> Result<ExportedSeed, RdmaError> {
            Err(RdmaError::Unavailable(ProbeError::NotBuilt))
        }
    }

    /// A registered page store (never made in this build).
    #[derive(Debug)]
    pub struct ExportedSeed {
        region: RemoteRegion,
    }

    impl ExportedSeed {
        /// Its region.
        pub fn region(&self) -> RemoteRegion {
            self.region
        }
    }

    /// The exporter (never made in this build: it needs an RdmaNode).
    #[derive(Debug)]
    pub struct Exporter {
        node: Arc<RdmaNode>,
    }

    impl Exporter {
        /// An exporter on `node`.
        pub fn new(node: Arc<RdmaNode>, _max: usize) -> Exporter {
            Exporter { node }
        }
        /// The device.
        pub fn node(&self) -> &Arc<RdmaNode> {
            &self.node
        }
        /// Always fails in this build.
        pub fn accept(
            &self,
            _id: u64,
            _peer: &QpInfo,
            _seed: &ExportedSeed,
        ) -> Result<QpInfo, RdmaError> {
            Err(RdmaError::Unavailable(ProbeError::NotBuilt))
        }
        /// Never.
        pub fn has_connection(&self, _id: u64, _seed: &ExportedSeed) -> bool {
            false
        }
        /// None.
        pub fn connections(&self) -> usize {
            0
        }
        /// Nothing to do.
        pub fn disconnect(&self, _id: u64) {}
    }

    /// A connection (never connected in this build).
    #[derive(Debug)]
    pub struct Connection {
        node: Arc<RdmaNode>,
        peer: String,
        id: u64,
    }

    impl Connection {
        /// A connection to `peer`.
        pub fn new(node: Arc<RdmaNode>, peer: &str) -> Arc<Connection> {
            Arc::new(Connection {
                node,
                peer: peer.into(),
                id: random_u64(),
            })
        }
        /// Its id.
        pub fn id(&self) -> u64 {
            self.id
        }
        /// The peer.
        pub fn peer(&self) -> &str {
            &self.peer
        }
        /// The device.
        pub fn node(&self) -> &Arc<RdmaNode> {
            &self.node
        }
        /// Never.
        pub fn is_connected(&self) -> bool {
            false
        }
        /// Zero.
        pub fn generation(&self) -> u64 {
            0
        }
        /// Zero.
        pub fn batches(&self) -> u64 {
            0
        }
        /// Always fails in this build.
        pub fn connect_with<T>(
            &self,
            _exchange: impl FnOnce(&QpInfo) -> Result<(QpInfo, T), ExchangeError>,
        ) -> Result<T, RdmaError> {
            Err(RdmaError::Unavailable(ProbeError::NotBuilt))
        }
    }

    /// A seed's pages over RDMA (every read fails in this build).
    #[derive(Debug)]
    pub struct RdmaSource {
        conn: Arc<Connection>,
        region: RemoteRegion,
    }

    impl RdmaSource {
        /// A source that cannot read.
        pub fn new(
            conn: Arc<Connection>,
            region: RemoteRegion,
            _deadline: Duration,
            _reconnect: Option<Reconnect>,
        ) -> RdmaSource {
            RdmaSource { conn, region }
        }
        /// The connection.
        pub fn connection(&self) -> &Arc<Connection> {
            &self.conn
        }
        /// The region.
        pub fn region(&self) -> RemoteRegion {
            self.region
        }
        /// Zero.
        pub fn bytes(&self) -> u64 {
            0
        }
    }

    impl PageSource for RdmaSource {
        fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
            Err(SourceError::Read {
                source_name: self.name(),
                offset,
                len: dst.len(),
                error: std::io::Error::other(ProbeError::NotBuilt),
            })
        }
        fn size(&self) -> u64 {
            self.region.size
        }
        fn name(&self) -> String {
            format!("rdma:{}", self.conn.peer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_info_is_validated() {
        let good = QpInfo {
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 15],
            qpn: 17,
            psn: 0x123456,
            lid: 0,
            mtu: 1024,
        };
        good.validate().unwrap();
        assert!(QpInfo { qpn: 0, ..good }.validate().is_err());
        assert!(QpInfo {
            qpn: 1 << 24,
            ..good
        }
        .validate()
        .is_err());
        assert!(QpInfo {
            psn: 1 << 24,
            ..good
        }
        .validate()
        .is_err());
        assert!(QpInfo { mtu: 1500, ..good }.validate().is_err());
        assert!(QpInfo {
            gid: [0; 16],
            ..good
        }
        .validate()
        .is_err());
        assert_eq!(gid_text(&good.gid), "10.0.2.15");
    }

    #[test]
    fn probe_gives_a_reason_without_a_device() {
        // On a machine with a device this finds it; without one it must
        // say why instead of failing in any other way.
        match probe(None) {
            Ok(info) => assert!(!info.device.is_empty()),
            Err(why) => assert!(!why.to_string().is_empty()),
        }
        let e = probe(Some("no-such-device-xyz")).unwrap_err();
        assert!(!e.to_string().is_empty());
    }

    #[test]
    fn status_names() {
        assert!(wc_status_name(10).contains("remote access"));
        assert!(wc_status_name(12).contains("retry"));
        assert_eq!(wc_status_name(0), "success");
    }
}
