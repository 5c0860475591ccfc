//! The page server: other nodes read this node's seeds' page stores over
//! TCP ([`super::wire`], `docs/PAGE_PROTOCOL.md`). forkd runs it over its
//! registry of seeds ([`Seeds`]); built with the `server` feature.
//!
//! A connection names one seed and proves its key in the handshake; then
//! it carries pipelined requests of many ranges each. Every request is
//! bounds-checked, and checked against the registry: nothing is served from
//! a dropped seed. A half frame followed by silence times out; a bad frame
//! closes the connection; neither disturbs other connections.
//!
//! What one peer can hold is bounded ([`Limits`]): connections open at once
//! per peer address and in all (more are closed as soon as accepted), time
//! to send the hello, and time a response may wait on a client that does
//! not read it, after which the connection, its task and its buffers go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::wire::{self, hello_status, read_status};

/// What the page server needs of a seed it serves.
#[derive(Debug, Clone)]
pub struct ServedSeed {
    /// Its key, 32 hex digits: a client's hello must prove it.
    pub key: String,
    /// Its directory (the page store, descriptor and working set).
    pub dir: PathBuf,
    /// The page store's size.
    pub image_bytes: u64,
}

/// The seeds a page server serves, looked up at every handshake and every
/// request (a dropped seed is served no more).
pub trait Seeds: Send + Sync + 'static {
    /// The seed `id`, if it is served.
    fn served(&self, id: &str) -> Option<ServedSeed>;
}

/// Connections one peer address may have open at once, by default.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;
/// Connections open at once in all, by default.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to send its hello, and to finish any frame it
/// started, by default.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may sit idle between requests, by default.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Time a write may make no progress (the client stopped reading) before
/// the connection is dropped, by default.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A refused peer is named in the log at most once in this time.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Peers whose refusal was logged in the last [`REFUSAL_LOG_EVERY`] that
/// are remembered; beyond, refusals of further peers are only counted.
const REFUSAL_LOG_PEERS: usize = 4096;

/// Why a page channel was closed (logged; the client got its answer).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Reading from the client failed.
    #[error("reading: {0}")]
    Read(std::io::Error),
    /// A frame did not arrive whole in time.
    #[error("no complete frame within {0:?}")]
    FrameTimeout(Duration),
    /// The client closed the connection while the server wrote.
    #[error("the connection closed while writing")]
    ClosedWhileWriting,
    /// Writing to the client failed.
    #[error("writing: {0}")]
    Write(std::io::Error),
    /// The client stopped reading.
    #[error("the client read nothing for {stall:?} with {left} bytes still to send")]
    Stalled {
        /// How long no write made progress.
        stall: Duration,
        /// Bytes not sent.
        left: usize,
    },
    /// The hello was not one.
    #[error("{0}")]
    BadHello(wire::HelloError),
    /// No such seed.
    #[error("unknown seed {0}")]
    UnknownSeed(String),
    /// The key did not match.
    #[error("wrong key for seed {0}")]
    WrongKey(String),
    /// The seed's page store could not be opened.
    #[error("opening seed {id}: {error}")]
    Open {
        /// The seed.
        id: String,
        /// Why.
        error: std::io::Error,
    },
    /// No request for too long.
    #[error("idle")]
    Idle,
    /// A malformed request (its range count).
    #[error("{0} ranges in one request (1 to {max} allowed)", max = wire::MAX_RANGES)]
    RangeCount(u32),
    /// The seed was dropped while the channel was open.
    #[error("seed {0} dropped")]
    Dropped(String),
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// No TLS handshake in time.
    #[error("no TLS handshake within {0:?}")]
    TlsTimeout(Duration),
}

/// Why the page server's TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate file is not PEM.
    #[error("the certificate: {0}")]
    Certificate(rustls::pki_types::pem::Error),
    /// It holds no certificate.
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    /// The key file is not a PEM private key.
    #[error("the key: {0}")]
    Key(rustls::pki_types::pem::Error),
    /// rustls refused the configuration.
    #[error("{0}")]
    Config(rustls::Error),
}

/// What the page server allows its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections one peer address may have open at once.
    pub per_peer: usize,
    /// Connections open at once in all.
    pub total: usize,
    /// Time to send the hello after connecting, and to finish a frame.
    pub frame_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Time a write may make no progress before the connection is dropped.
    pub write_stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_peer: MAX_CONNECTIONS_PER_PEER,
            total: MAX_CONNECTIONS,
            frame_timeout: FRAME_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            write_stall: WRITE_STALL_TIMEOUT,
        }
    }
}

/// The page server: its limits and the connections it has open.
pub struct PageServer {
    limits: Limits,
    open: Mutex<Census>,
    /// TLS for every connection, when forkd has a certificate.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Connections open, by peer, and recent refusals logged.
#[derive(Debug, Default)]
struct Census {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
    logged: HashMap<IpAddr, Instant>,
    /// Refusals not logged since the last line that was.
    unlogged: u64,
}

/// A connection counted in the census until dropped.
struct Admitted {
    server: Arc<PageServer>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.server.census();
        c.total -= 1;
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

/// A TLS acceptor for the page server from a certificate chain and its
/// key (PEM).
pub fn tls_acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsSetupError::Certificate)?;
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(TlsSetupError::Key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsSetupError::Config)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serve page requests on `listener` until the process ends, with the
/// default [`Limits`].
pub async fn serve(listener: TcpListener, registry: Arc<dyn Seeds>) {
    PageServer::new(Limits::default())
        .serve(listener, registry)
        .await
}

impl PageServer {
    /// A page server with these limits.
    pub fn new(limits: Limits) -> Arc<PageServer> {
        Self::with_tls(limits, None)
    }

    /// A page server with these limits speaking TLS (`tls`) on every
    /// connection.
    pub fn with_tls(limits: Limits, tls: Option<tokio_rustls::TlsAcceptor>) -> Arc<PageServer> {
        Arc::new(PageServer {
            limits,
            open: Mutex::new(Census::default()),
            tls,
        })
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.census().total
    }

    fn census(&self) -> std::sync::MutexGuard<'_, Census> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count a new connection from `peer`, or say why it is refused (and
    /// whether to log it).
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, (String, bool)> {
        let mut c = self.census();
        let from_peer = c.by_peer.get(&peer).copied().unwrap_or(0);
        let why = if from_peer >= self.limits.per_peer {
            format!(
                "{from_peer} page connections from this peer already (limit {})",
                self.limits.per_peer
            )
        } else if c.total >= self.limits.total {
            format!(
                "{} page connections open already (limit {})",
                c.total, self.limits.total
            )
        } else {
            c.total += 1;
            *c.by_peer.entry(peer).or_default() += 1;
            return Ok(Admitted {
                server: self.clone(),
                peer,
            });
        };
        let now = Instant::now();
        if c.logged.len() >= REFUSAL_LOG_PEERS {
            c.logged
                .retain(|_, t| now.duration_since(*t) < REFUSAL_LOG_EVERY);
        }
        let log = match c.logged.get(&peer) {
            Some(t) if now.duration_since(*t) < REFUSAL_LOG_EVERY => false,
            _ => c.logged.len() < REFUSAL_LOG_PEERS,
        };
        if log {
            c.logged.insert(peer, now);
        } else {
            c.unlogged += 1;
        }
        Err((why, log))
    }

    /// Serve page requests on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, registry: Arc<dyn Seeds>) {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "page server accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admitted = match self.admit(peer.ip().to_canonical()) {
                Ok(a) => a,
                Err((why, log)) => {
                    if log {
                        let unlogged = std::mem::take(&mut self.census().unlogged);
                        warn!(
                            %peer,
                            why,
                            other_refusals_not_logged = unlogged,
                            "page connection refused and closed (this peer is named at most once a minute)"
                        );
                    }
                    drop(sock);
                    continue;
                }
            };
            let registry = registry.clone();
            let limits = self.limits.clone();
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let r = match tls {
                    None => connection(sock, &*registry, &limits).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.frame_timeout, acceptor.accept(sock))
                            .await
                        {
                            Ok(Ok(t)) => connection(t, &*registry, &limits).await,
                            Ok(Err(e)) => Err(ChannelError::Tls(e)),
                            Err(_) => Err(ChannelError::TlsTimeout(limits.frame_timeout)),
                        }
                    }
                };
                if let Err(reason) = r {
                    info!(%peer, %reason, "page channel closed");
                }
                drop(admitted);
            });
        }
    }
}

async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), ChannelError> {
    match tokio::time::timeout(timeout, s.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ChannelError::Read(e)),
        Err(_) => Err(ChannelError::FrameTimeout(timeout)),
    }
}

/// Write all of `buf`, dropping the client if a write makes no progress
/// for `stall` (it stopped reading).
async fn write_within<S: AsyncWrite + Unpin>(
    s: &mut S,
    mut buf: &[u8],
    stall: Duration,
) -> Result<(), ChannelError> {
    while !buf.is_empty() {
        match tokio::time::timeout(stall, s.write(buf)).await {
            Ok(Ok(0)) => return Err(ChannelError::ClosedWhileWriting),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(ChannelError::Write(e)),
            Err(_) => {
                return Err(ChannelError::Stalled {
                    stall,
                    left: buf.len(),
                })
            }
        }
    }
    Ok(())
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    registry: &dyn Seeds,
    limits: &Limits,
) -> Result<(), ChannelError> {
    let stall = limits.write_stall;
    let mut hello = [0u8; wire::HELLO_LEN];
    read_frame(&mut s, &mut hello, limits.frame_timeout).await?;
    let (id, key) = match wire::parse_hello(&hello) {
        Ok(x) => x,
        Err(why) => {
            let answer = wire::hello_answer(hello_status::BAD_HELLO, 0, &why.to_string());
            let _ = write_within(&mut s, &answer, stall).await;
            return Err(ChannelError::BadHello(why));
        }
    };
    let Some(seed) = registry.served(&id) else {
        let answer = wire::hello_answer(
            hello_status::UNKNOWN_SEED,
            0,
            &format!("no seed {id} on this node"),
        );
        let _ = write_within(&mut s, &answer, stall).await;
        return Err(ChannelError::UnknownSeed(id));
    };
    let want = wire::key_bytes(&seed.key).unwrap_or([0; 16]);
    // Compare every byte, whatever the first difference.
    if want
        .iter()
        .zip(key.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        let answer = wire::hello_answer(
            hello_status::WRONG_KEY,
            0,
            &format!("wrong key for seed {id}"),
        );
        let _ = write_within(&mut s, &answer, stall).await;
        return Err(ChannelError::WrongKey(id));
    }
    let file = std::sync::Arc::new(
        std::fs::File::open(seed.dir.join(crate::image::PAGES_FILE)).map_err(|error| {
            ChannelError::Open {
                id: id.clone(),
                error,
            }
        })?,
    );
    let size = seed.image_bytes;
    let seed_dir = seed.dir.clone();
    drop(seed);
    write_within(
        &mut s,
        &wire::hello_answer(hello_status::OK, size, ""),
        stall,
    )
    .await?;
    debug!(seed = %id, "page channel open");

    let mut head = [0u8; 8];
    loop {
        match tokio::time::timeout(limits.idle_timeout, s.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(ChannelError::Read(e)),
            Err(_) => return Err(ChannelError::Idle),
        }
        let req_id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if n == wire::DESCRIPTOR_REQUEST {
            let (dir, id2) = (seed_dir.clone(), id.clone());
            let bundle = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let d = std::fs::read(dir.join(crate::image::DESCRIPTOR_FILE))?;
                let ws = std::fs::read(dir.join(crate::node::WORKING_SET_FILE)).unwrap_or_default();
                Ok(wire::descriptor_bundle(&d, &ws))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("reader task: {e}"))));
            match bundle {
                Ok(b) => {
                    let header = wire::response_header(req_id, read_status::OK, b.len() as u32);
                    write_within(&mut s, &header, stall).await?;
                    write_within(&mut s, &b, stall).await?;
                }
                Err(e) => {
                    let msg = format!("reading seed {id2}'s descriptor: {e}");
                    reply_error(&mut s, req_id, read_status::READ_ERROR, &msg, stall).await;
                }
            }
            continue;
        }
        if n == 0 || n > wire::MAX_RANGES {
            let e = ChannelError::RangeCount(n);
            reply_error(
                &mut s,
                req_id,
                read_status::TOO_LARGE,
                &e.to_string(),
                stall,
            )
            .await;
            return Err(e);
        }
        let mut body = vec![0u8; n as usize * 12];
        read_frame(&mut s, &mut body, limits.frame_timeout).await?;
        let ranges: Vec<(u64, u32)> = body
            .chunks_exact(12)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
                    u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4])),
                )
            })
            .collect();
        if registry.served(&id).is_none() {
            reply_error(
                &mut s,
                req_id,
                read_status::SEED_GONE,
                &format!("seed {id} was dropped"),
                stall,
            )
            .await;
            return Err(ChannelError::Dropped(id));
        }
        let st = wire::check_ranges(&ranges, size);
        if st != read_status::OK {
            let msg =
                format!("request {req_id}: ranges outside the {size}-byte page store or too large");
            reply_error(&mut s, req_id, st, &msg, stall).await;
            // The request was well formed: the channel stays usable.
            continue;
        }
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        // File reads may wait for the disk: not on a runtime worker.
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut data = vec![0u8; total as usize];
            let mut at = 0usize;
            for (o, l) in &ranges {
                f.read_exact_at(&mut data[at..at + *l as usize], *o)?;
                at += *l as usize;
            }
            Ok(data)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("reader task: {e}"))));
        let data = match read {
            Ok(d) => d,
            Err(e) => {
                reply_error(
                    &mut s,
                    req_id,
                    read_status::READ_ERROR,
                    &format!("reading seed {id}: {e}"),
                    stall,
                )
                .await;
                continue;
            }
        };
        let header = wire::response_header(req_id, read_status::OK, total as u32);
        write_within(&mut s, &header, stall).await?;
        write_within(&mut s, &data, stall).await?;
    }
}

async fn reply_error<S: AsyncWrite + Unpin>(
    s: &mut S,
    req_id: u32,
    status: u8,
    msg: &str,
    stall: Duration,
) {
    let header = wire::response_header(req_id, status, msg.len() as u32);
    if write_within(s, &header, stall).await.is_ok() {
        let _ = write_within(s, msg.as_bytes(), stall).await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use tokio::net::TcpStream;

    use crate::image::{
        CaptureStats, Credentials, Descriptor, PageRun, PageState, Registers, SigAltStack,
        SourceInfo, Vma, VmaKind, FORMAT_VERSION,
    };
    use crate::procfs::MmFields;

    use super::*;

    /// Seeds by id, as a daemon's registry would hold them.
    struct Table(Mutex<HashMap<String, ServedSeed>>);

    impl Seeds for Table {
        fn served(&self, id: &str) -> Option<ServedSeed> {
            self.0.lock().unwrap().get(id).cloned()
        }
    }

    const SEED: &str = "00112233aabbccdd";
    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn state_dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("rf-pageserver-{name}-{}", std::process::id()))
    }

    /// A table holding one seed of two pages, in a fresh directory.
    fn registry(name: &str) -> (Arc<dyn Seeds>, Vec<u8>) {
        let state = state_dir(name);
        let _ = std::fs::remove_dir_all(&state);
        let pages: Vec<u8> = (0..2 * 4096).map(|i| (i % 251) as u8).collect();
        let mut d = Descriptor {
            format_version: FORMAT_VERSION,
            source: SourceInfo {
                pid: 1,
                hostname: "test".into(),
                kernel: "test".into(),
                created_unix_ms: 0,
            },
            threads: 1,
            registers: Registers::default(),
            xstate: Vec::new(),
            sigmask: 0,
            sigactions: Vec::new(),
            sigaltstack: SigAltStack::default(),
            rseq: None,
            robust_list: (0, 0),
            clear_child_tid: 0,
            mm: MmFields::default(),
            auxv: Vec::new(),
            exe: "/bin/true".into(),
            personality: 0,
            comm: "true".into(),
            rlimits: Vec::new(),
            umask: 0o22,
            cwd: "/".into(),
            creds: Credentials::default(),
            fds: Vec::new(),
            files: Vec::new(),
            vmas: vec![Vma {
                start: 0x10000,
                end: 0x12000,
                prot: 3,
                shared: false,
                kind: VmaKind::Anon,
                path: String::new(),
                file: None,
                file_offset: 0,
                runs: vec![PageRun {
                    first: 0,
                    count: 2,
                    state: PageState::Stored { offset: 0 },
                }],
            }],
            vdso_hash: String::new(),
            pages_stored: 2,
            image_bytes: pages.len() as u64,
            stats: CaptureStats::default(),
            digests: None,
            privileges: None,
            thread_set: Default::default(),
            fd_objects: Default::default(),
            container: None,
        };
        let dir = state.join(SEED);
        crate::image::write(&dir, &mut d, &pages, false).unwrap();
        let seed = ServedSeed {
            key: KEY.into(),
            dir,
            image_bytes: pages.len() as u64,
        };
        let reg = Table(Mutex::new(HashMap::from([(SEED.to_string(), seed)])));
        (Arc::new(reg), pages)
    }

    async fn start(name: &str, limits: Limits) -> (Arc<PageServer>, SocketAddr, Vec<u8>) {
        let (reg, pages) = registry(name);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = PageServer::new(limits);
        tokio::spawn(server.clone().serve(listener, reg));
        (server, addr, pages)
    }

    /// Connect from `from` (a loopback address) and say hello; the answer's
    /// status, or `None` if the server closed the connection instead.
    async fn hello(addr: SocketAddr, from: &str) -> (TcpStream, Option<u8>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let key = wire::key_bytes(KEY).unwrap();
        // The server may have closed it already: a failed write is an answer too.
        if s.write_all(&wire::hello(SEED, &key).unwrap())
            .await
            .is_err()
        {
            return (s, None);
        }
        let mut h = [0u8; 16];
        let status = match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
            .await
            .expect("the server neither answered nor closed the connection")
        {
            Ok(_) => Some(h[0]),
            Err(_) => None,
        };
        (s, status)
    }

    /// Read pages `[offset, offset + len)` on an open channel.
    async fn read_pages(s: &mut TcpStream, req_id: u32, offset: u64, len: u32) -> Vec<u8> {
        s.write_all(&wire::request(req_id, &[(offset, len)]))
            .await
            .unwrap();
        let mut h = [0u8; 12];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h[..4], req_id.to_le_bytes());
        assert_eq!(h[4], read_status::OK);
        let mut data = vec![0u8; u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize];
        s.read_exact(&mut data).await.unwrap();
        data
    }

    /// Wait (up to 10 s) for `f` to hold.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 10 s: {what}");
    }

    #[tokio::test]
    async fn connections_beyond_the_caps_are_closed_and_others_still_served() {
        let limits = Limits {
            per_peer: 2,
            total: 3,
            ..Limits::default()
        };
        let (server, addr, pages) = start("caps", limits).await;
        let (mut a, st) = hello(addr, "127.0.0.1").await;
        assert_eq!(st, Some(hello_status::OK));
        let (b, st) = hello(addr, "127.0.0.1").await;
        assert_eq!(st, Some(hello_status::OK));
        // A third from the same peer: closed, twice.
        for _ in 0..2 {
            let (_, st) = hello(addr, "127.0.0.1").await;
            assert_eq!(st, None);
        }
        // Another peer has its own count, but not past the total.
        let (_c, st) = hello(addr, "127.0.0.2").await;
        assert_eq!(st, Some(hello_status::OK));
        let (_, st) = hello(addr, "127.0.0.2").await;
        assert_eq!(st, None);
        assert_eq!(server.open_connections(), 3);
        // The first connection is served all along.
        assert_eq!(read_pages(&mut a, 1, 4096, 4096).await, pages[4096..]);
        assert_eq!(read_pages(&mut a, 2, 0, 8192).await, pages);
        // A connection that ends gives its place back.
        drop(b);
        eventually("the closed connection is counted out", || {
            server.open_connections() == 2
        })
        .await;
        let (mut d, st) = hello(addr, "127.0.0.1").await;
        assert_eq!(st, Some(hello_status::OK));
        assert_eq!(read_pages(&mut d, 1, 0, 4096).await, pages[..4096]);
        std::fs::remove_dir_all(state_dir("caps")).unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped() {
        let limits = Limits {
            write_stall: Duration::from_millis(200),
            ..Limits::default()
        };
        let (server, addr, _) = start("stall", limits).await;
        let (mut s, st) = hello(addr, "127.0.0.1").await;
        assert_eq!(st, Some(hello_status::OK));
        // 4 x 8 MiB asked for, far more than the sockets' buffers hold,
        // and nothing read.
        let ranges = vec![(0u64, 8192u32); wire::MAX_RANGES as usize];
        for id in 0..4 {
            s.write_all(&wire::request(id, &ranges)).await.unwrap();
        }
        eventually("the stalled connection is dropped", || {
            server.open_connections() == 0
        })
        .await;
        // What was already in flight arrives, then the end: not all of it.
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        assert!(got < 4 * (8 << 20), "{got} bytes");
        std::fs::remove_dir_all(state_dir("stall")).unwrap();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_hello_is_dropped() {
        let limits = Limits {
            frame_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let (server, addr, _) = start("silent", limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("the silent connection was not closed");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        eventually("the silent connection is counted out", || {
            server.open_connections() == 0
        })
        .await;
        std::fs::remove_dir_all(state_dir("silent")).unwrap();
    }
}
