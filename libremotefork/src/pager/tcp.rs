//! The TCP page source: a seed's pages from another node's page server
//! (`pager::wire`), batched (many ranges per request), with a deadline and
//! reconnection. One connection per seed and node, shared by every child
//! of that seed on this node. A page server at `tls://HOST:PORT` is spoken
//! to over TLS (rustls), its certificate checked against the CA given.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A connection to a page server: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Tls(t) => t.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(t) => t.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// The TLS client configuration for `tls://` page servers: their
/// certificates are checked against the CA certificates in `ca_pem`.
pub fn tls_client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("the CA file: {e}"))?;
        roots.add(c).map_err(|e| format!("the CA file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA file holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

use super::source::{PageSource, SourceError};
use super::wire;

/// A seed's page store on another node.
pub struct TcpSource {
    addr: String,
    seed_id: String,
    key: [u8; 16],
    size: u64,
    deadline: Duration,
    conn: Mutex<Option<(Stream, u32)>>,
    requests: std::sync::atomic::AtomicU64,
    /// For a `tls://` page server.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TcpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSource")
            .field("addr", &self.addr)
            .field("seed", &self.seed_id)
            .finish()
    }
}

fn err(s: &TcpSource, offset: u64, len: usize, what: String) -> SourceError {
    SourceError::Read {
        source_name: s.name(),
        offset,
        len,
        error: std::io::Error::other(what),
    }
}

impl TcpSource {
    /// A source for seed `seed_id` (key `key_hex`) at page server `addr`
    /// (`HOST:PORT`, or `tls://HOST:PORT` with `tls` given), failing a
    /// read that cannot complete within `deadline`. Connects and checks the
    /// key at once.
    pub fn connect(
        addr: &str,
        seed_id: &str,
        key_hex: &str,
        deadline: Duration,
    ) -> Result<(TcpSource, u64), SourceError> {
        Self::connect_tls(addr, seed_id, key_hex, deadline, None)
    }

    /// [`TcpSource::connect`] with the TLS configuration for `tls://`
    /// page servers.
    pub fn connect_tls(
        addr: &str,
        seed_id: &str,
        key_hex: &str,
        deadline: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<(TcpSource, u64), SourceError> {
        let key = wire::key_bytes(key_hex).ok_or_else(|| SourceError::Read {
            source_name: format!("tcp:{addr}"),
            offset: 0,
            len: 0,
            error: std::io::Error::other("the seed key is not 32 hex digits"),
        })?;
        let mut s = TcpSource {
            addr: addr.to_string(),
            seed_id: seed_id.to_string(),
            key,
            size: 0,
            deadline,
            conn: Mutex::new(None),
            requests: Default::default(),
            tls,
        };
        let (stream, size) = s.open(Instant::now() + deadline)?;
        s.size = size;
        *s.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some((stream, 0));
        Ok((s, size))
    }

    fn open(&self, until: Instant) -> Result<(Stream, u64), SourceError> {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let (host_port, tls) = match self.addr.strip_prefix("tls://") {
            Some(hp) => {
                let cfg = self.tls.clone().ok_or_else(|| {
                    err(
                        self,
                        0,
                        0,
                        format!(
                            "{} is a TLS page server: this node needs --tls-ca",
                            self.addr
                        ),
                    )
                })?;
                (hp, Some(cfg))
            }
            None => (self.addr.as_str(), None),
        };
        let sa = host_port
            .to_socket_addrs()
            .map_err(|e| err(self, 0, 0, format!("resolving {}: {e}", self.addr)))?
            .next()
            .ok_or_else(|| err(self, 0, 0, format!("{} resolves to nothing", self.addr)))?;
        let tcp = TcpStream::connect_timeout(&sa, left)
            .map_err(|e| err(self, 0, 0, format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, e.to_string()))?;
        tcp.set_write_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, e.to_string()))?;
        let mut s = match tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let host = host_port
                    .rsplit_once(':')
                    .map_or(host_port, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| err(self, 0, 0, format!("TLS name {host:?}: {e}")))?;
                let c = rustls::ClientConnection::new(cfg, name)
                    .map_err(|e| err(self, 0, 0, format!("TLS: {e}")))?;
                let mut t = rustls::StreamOwned::new(c, tcp);
                // The handshake now, so a certificate problem is named as one.
                while t.conn.is_handshaking() {
                    t.conn
                        .complete_io(&mut t.sock)
                        .map_err(|e| err(self, 0, 0, format!("TLS handshake: {e}")))?;
                }
                Stream::Tls(Box::new(t))
            }
        };
        let hello = wire::hello(&self.seed_id, &self.key)
            .ok_or_else(|| err(self, 0, 0, "seed id is not 16 hex digits".into()))?;
        s.write_all(&hello)
            .map_err(|e| err(self, 0, 0, format!("handshake: {e}")))?;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)
            .map_err(|e| err(self, 0, 0, format!("handshake answer: {e}")))?;
        let size = u64::from_le_bytes(h[4..12].try_into().unwrap_or([0; 8]));
        let msg_len = u32::from_le_bytes(h[12..16].try_into().unwrap_or([0; 4])).min(4096) as usize;
        let mut msg = vec![0u8; msg_len];
        s.read_exact(&mut msg)
            .map_err(|e| err(self, 0, 0, format!("handshake answer: {e}")))?;
        if h[0] != wire::hello_status::OK {
            return Err(err(
                self,
                0,
                0,
                format!(
                    "page server refused seed {}: {}",
                    self.seed_id,
                    String::from_utf8_lossy(&msg)
                ),
            ));
        }
        Ok((s, size))
    }

    /// One request for all `reqs`, on the shared connection.
    fn exchange(
        &self,
        reqs: &mut [(u64, &mut [u8])],
        until: Instant,
    ) -> Result<(), (bool, SourceError)> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let (s, _) = self.open(until).map_err(|e| (true, e))?;
            *g = Some((s, 0));
        }
        let Some((s, next_id)) = g.as_mut() else {
            return Err((true, err(self, 0, 0, "no connection".into())));
        };
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = s.tcp().set_read_timeout(Some(left));
        let _ = s.tcp().set_write_timeout(Some(left));
        *next_id = next_id.wrapping_add(1);
        let id = *next_id;
        let ranges: Vec<(u64, u32)> = reqs.iter().map(|(o, b)| (*o, b.len() as u32)).collect();
        let first = reqs.first().map(|r| r.0).unwrap_or(0);
        let total: usize = reqs.iter().map(|r| r.1.len()).sum();
        let io = |e: std::io::Error| (true, err(self, first, total, format!("page request: {e}")));
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.write_all(&wire::request(id, &ranges)).map_err(io)?;
        let mut h = [0u8; 12];
        s.read_exact(&mut h).map_err(io)?;
        let rid = u32::from_le_bytes(h[..4].try_into().unwrap_or([0; 4]));
        let status = h[4];
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4])) as usize;
        if rid != id {
            return Err((
                true,
                err(
                    self,
                    first,
                    total,
                    format!("answer {rid} to request {id}: the stream is out of step"),
                ),
            ));
        }
        if status != wire::read_status::OK {
            let mut msg = vec![0u8; len.min(4096)];
            s.read_exact(&mut msg).map_err(io)?;
            // A refusal is final: retrying cannot make it right.
            return Err((
                false,
                err(
                    self,
                    first,
                    total,
                    format!("page server: {}", String::from_utf8_lossy(&msg)),
                ),
            ));
        }
        if len != total {
            return Err((
                true,
                err(
                    self,
                    first,
                    total,
                    format!("answer of {len} bytes to a request of {total}"),
                ),
            ));
        }
        for (_, b) in reqs.iter_mut() {
            s.read_exact(b).map_err(io)?;
        }
        Ok(())
    }
}

impl PageSource for TcpSource {
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError> {
        self.read_many(&mut [(offset, dst)])
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        let until = Instant::now() + self.deadline;
        loop {
            match self.exchange(reqs, until) {
                Ok(()) => return Ok(()),
                Err((retry, e)) => {
                    // Drop the connection: the next attempt starts clean.
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    if !retry || Instant::now() >= until {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "page request failed; reconnecting");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn round_trips(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn name(&self) -> String {
        format!("tcp:{}", self.addr)
    }
}

impl TcpSource {
    /// The seed's descriptor and recorded working set, from its page
    /// server (the [`wire::DESCRIPTOR_REQUEST`]).
    pub fn fetch_descriptor(&self) -> Result<(Vec<u8>, Vec<u8>), SourceError> {
        let until = Instant::now() + self.deadline;
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let (s, _) = self.open(until)?;
            *g = Some((s, 0));
        }
        let Some((s, next_id)) = g.as_mut() else {
            return Err(err(self, 0, 0, "no connection".into()));
        };
        *next_id = next_id.wrapping_add(1);
        let id = *next_id;
        let io = |e: std::io::Error| err(self, 0, 0, format!("descriptor request: {e}"));
        s.write_all(&wire::descriptor_request(id)).map_err(io)?;
        let mut h = [0u8; 12];
        s.read_exact(&mut h).map_err(io)?;
        let status = h[4];
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4])) as usize;
        if u32::from_le_bytes(h[..4].try_into().unwrap_or([0; 4])) != id {
            *g = None;
            return Err(err(self, 0, 0, "descriptor answer out of step".into()));
        }
        if status != wire::read_status::OK {
            let mut msg = vec![0u8; len.min(4096)];
            s.read_exact(&mut msg).map_err(io)?;
            let why = String::from_utf8_lossy(&msg);
            return Err(err(
                self,
                0,
                0,
                if status == wire::read_status::TOO_LARGE {
                    format!(
                        "the page server does not hand out descriptors (an older forkd?): {why}"
                    )
                } else {
                    format!("page server: {why}")
                },
            ));
        }
        if len as u64 > crate::image::MAX_BODY_LEN + (64 << 20) {
            *g = None;
            return Err(err(
                self,
                0,
                0,
                format!("a descriptor of {len} bytes is too large"),
            ));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(io)?;
        let (d, ws) = wire::parse_descriptor_bundle(&body)
            .ok_or_else(|| err(self, 0, 0, "malformed descriptor answer".into()))?;
        Ok((d.to_vec(), ws.to_vec()))
    }
}
