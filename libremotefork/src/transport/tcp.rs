//! The TCP page source: a seed's pages from another node's page server
//! (`transport::wire`), batched (many ranges per request), with a deadline and
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

/// Errors of the TCP page source: setting up TLS, connecting to a page
/// server, and its page requests. A source's errors reach its caller as
/// the `error` of a [`SourceError::Read`].
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The CA file is not PEM.
    #[error("the CA file: {0}")]
    CaPem(rustls::pki_types::pem::Error),
    /// A certificate in the CA file is refused.
    #[error("the CA file: {0}")]
    CaCertificate(rustls::Error),
    /// The CA file has no certificate in it.
    #[error("the CA file holds no certificate")]
    NoCaCertificate,
    /// rustls refused the TLS configuration.
    #[error("{0}")]
    TlsConfig(rustls::Error),
    /// The seed's key is malformed.
    #[error("the seed key is not 32 hex digits")]
    BadKey,
    /// The seed id is malformed.
    #[error("seed id is not 16 hex digits")]
    BadSeedId,
    /// A `tls://` page server, but no CA to check it against.
    #[error("{addr} is a TLS page server: this node needs --tls-ca")]
    NeedsCa {
        /// The page server.
        addr: String,
    },
    /// The page server's address does not resolve.
    #[error("resolving {addr}: {error}")]
    Resolve {
        /// The page server.
        addr: String,
        /// Why.
        error: std::io::Error,
    },
    /// The page server's address resolves to no address.
    #[error("{addr} resolves to nothing")]
    ResolvesToNothing {
        /// The page server.
        addr: String,
    },
    /// The TCP connection failed.
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    /// Setting the socket's timeouts failed.
    #[error("{0}")]
    Timeouts(std::io::Error),
    /// The host is not a name TLS can check a certificate for.
    #[error("TLS name {host:?}: {error}")]
    TlsName {
        /// The host.
        host: String,
        /// Why.
        error: rustls::pki_types::InvalidDnsNameError,
    },
    /// The TLS connection could not be made.
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// The TLS handshake failed (a certificate problem is named here).
    #[error("TLS handshake: {0}")]
    TlsHandshake(std::io::Error),
    /// Sending the page protocol handshake failed.
    #[error("handshake: {0}")]
    Handshake(std::io::Error),
    /// Reading the handshake answer failed.
    #[error("handshake answer: {0}")]
    HandshakeAnswer(std::io::Error),
    /// The page server refused the seed (unknown, wrong key...).
    #[error("page server refused seed {seed_id}: {reason}")]
    Refused {
        /// The seed.
        seed_id: String,
        /// The page server's message.
        reason: String,
    },
    /// No connection to send a request on.
    #[error("no connection")]
    NoConnection,
    /// Sending a request or reading its answer failed.
    #[error("page request: {0}")]
    Request(std::io::Error),
    /// An answer to another request than the one sent.
    #[error("answer {answer} to request {request}: the stream is out of step")]
    OutOfStep {
        /// The answer's request id.
        answer: u32,
        /// The request's id.
        request: u32,
    },
    /// The page server refused a request (a refusal is final).
    #[error("page server: {0}")]
    ReadRefused(String),
    /// The page server does not answer descriptor requests.
    #[error("the page server does not hand out descriptors (an older forkd?): {0}")]
    NoDescriptors(String),
    /// A descriptor answer larger than any descriptor can be.
    #[error("a descriptor of {0} bytes is too large")]
    DescriptorTooLarge(usize),
    /// A descriptor answer that does not parse.
    #[error("malformed descriptor answer")]
    BadDescriptorAnswer,
    /// An answer of the wrong length.
    #[error("answer of {len} bytes to a request of {total}")]
    WrongLength {
        /// Bytes the answer announces.
        len: usize,
        /// Bytes requested.
        total: usize,
    },
}

/// The TLS client configuration for `tls://` page servers: their
/// certificates are checked against the CA certificates in `ca_pem`.
pub fn tls_client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TcpError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(TcpError::CaPem)?;
        roots.add(c).map_err(TcpError::CaCertificate)?;
    }
    if roots.is_empty() {
        return Err(TcpError::NoCaCertificate);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TcpError::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

use super::wire;
use super::{PageSource, SourceError};

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

/// A failed read of `len` bytes at `offset` of `s`.
fn err(s: &TcpSource, offset: u64, len: usize, what: TcpError) -> SourceError {
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
            error: std::io::Error::other(TcpError::BadKey),
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
                    let addr = self.addr.clone();
                    err(self, 0, 0, TcpError::NeedsCa { addr })
                })?;
                (hp, Some(cfg))
            }
            None => (self.addr.as_str(), None),
        };
        let sa = host_port
            .to_socket_addrs()
            .map_err(|error| {
                let addr = self.addr.clone();
                err(self, 0, 0, TcpError::Resolve { addr, error })
            })?
            .next()
            .ok_or_else(|| {
                let addr = self.addr.clone();
                err(self, 0, 0, TcpError::ResolvesToNothing { addr })
            })?;
        let tcp = TcpStream::connect_timeout(&sa, left)
            .map_err(|e| err(self, 0, 0, TcpError::Connect(e)))?;
        let _ = tcp.set_nodelay(true);
        tcp.set_read_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, TcpError::Timeouts(e)))?;
        tcp.set_write_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, TcpError::Timeouts(e)))?;
        let mut s = match tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let host = host_port
                    .rsplit_once(':')
                    .map_or(host_port, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name =
                    rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|error| {
                        let host = host.to_string();
                        err(self, 0, 0, TcpError::TlsName { host, error })
                    })?;
                let c = rustls::ClientConnection::new(cfg, name)
                    .map_err(|e| err(self, 0, 0, TcpError::Tls(e)))?;
                let mut t = rustls::StreamOwned::new(c, tcp);
                // The handshake now, so a certificate problem is named as one.
                while t.conn.is_handshaking() {
                    t.conn
                        .complete_io(&mut t.sock)
                        .map_err(|e| err(self, 0, 0, TcpError::TlsHandshake(e)))?;
                }
                Stream::Tls(Box::new(t))
            }
        };
        let hello = wire::hello(&self.seed_id, &self.key)
            .ok_or_else(|| err(self, 0, 0, TcpError::BadSeedId))?;
        s.write_all(&hello)
            .map_err(|e| err(self, 0, 0, TcpError::Handshake(e)))?;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)
            .map_err(|e| err(self, 0, 0, TcpError::HandshakeAnswer(e)))?;
        let size = u64::from_le_bytes(h[4..12].try_into().unwrap_or([0; 8]));
        let msg_len = u32::from_le_bytes(h[12..16].try_into().unwrap_or([0; 4])).min(4096) as usize;
        let mut msg = vec![0u8; msg_len];
        s.read_exact(&mut msg)
            .map_err(|e| err(self, 0, 0, TcpError::HandshakeAnswer(e)))?;
        if h[0] != wire::hello_status::OK {
            let refused = TcpError::Refused {
                seed_id: self.seed_id.clone(),
                reason: String::from_utf8_lossy(&msg).into_owned(),
            };
            return Err(err(self, 0, 0, refused));
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
            return Err((true, err(self, 0, 0, TcpError::NoConnection)));
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
        let io = |e: std::io::Error| (true, err(self, first, total, TcpError::Request(e)));
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.write_all(&wire::request(id, &ranges)).map_err(io)?;
        let mut h = [0u8; 12];
        s.read_exact(&mut h).map_err(io)?;
        let rid = u32::from_le_bytes(h[..4].try_into().unwrap_or([0; 4]));
        let status = h[4];
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4])) as usize;
        if rid != id {
            let out_of_step = TcpError::OutOfStep {
                answer: rid,
                request: id,
            };
            return Err((true, err(self, first, total, out_of_step)));
        }
        if status != wire::read_status::OK {
            let mut msg = vec![0u8; len.min(4096)];
            s.read_exact(&mut msg).map_err(io)?;
            // A refusal is final: retrying cannot make it right.
            let refused = TcpError::ReadRefused(String::from_utf8_lossy(&msg).into_owned());
            return Err((false, err(self, first, total, refused)));
        }
        if len != total {
            let wrong = TcpError::WrongLength { len, total };
            return Err((true, err(self, first, total, wrong)));
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
            return Err(err(self, 0, 0, TcpError::NoConnection));
        };
        *next_id = next_id.wrapping_add(1);
        let id = *next_id;
        let io = |e: std::io::Error| err(self, 0, 0, TcpError::Request(e));
        s.write_all(&wire::descriptor_request(id)).map_err(io)?;
        let mut h = [0u8; 12];
        s.read_exact(&mut h).map_err(io)?;
        let status = h[4];
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4])) as usize;
        let answer = u32::from_le_bytes(h[..4].try_into().unwrap_or([0; 4]));
        if answer != id {
            *g = None;
            return Err(err(
                self,
                0,
                0,
                TcpError::OutOfStep {
                    answer,
                    request: id,
                },
            ));
        }
        if status != wire::read_status::OK {
            let mut msg = vec![0u8; len.min(4096)];
            s.read_exact(&mut msg).map_err(io)?;
            let why = String::from_utf8_lossy(&msg).into_owned();
            return Err(err(
                self,
                0,
                0,
                if status == wire::read_status::TOO_LARGE {
                    TcpError::NoDescriptors(why)
                } else {
                    TcpError::ReadRefused(why)
                },
            ));
        }
        if len as u64 > crate::image::MAX_BODY_LEN + (64 << 20) {
            *g = None;
            return Err(err(self, 0, 0, TcpError::DescriptorTooLarge(len)));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(io)?;
        let (d, ws) = wire::parse_descriptor_bundle(&body)
            .ok_or_else(|| err(self, 0, 0, TcpError::BadDescriptorAnswer))?;
        Ok((d.to_vec(), ws.to_vec()))
    }
}
