//! The TCP page source: a seed's pages from another node's page server
//! (`pager::wire`), batched (many ranges per request), with a deadline and
//! reconnection. One connection per seed and node, shared by every child
//! of that seed on this node.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::source::{PageSource, SourceError};
use super::wire;

/// A seed's page store on another node.
pub struct TcpSource {
    addr: String,
    seed_id: String,
    key: [u8; 16],
    size: u64,
    deadline: Duration,
    conn: Mutex<Option<(TcpStream, u32)>>,
    requests: std::sync::atomic::AtomicU64,
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
    /// A source for seed `seed_id` (key `key_hex`) at page server `addr`,
    /// failing a read that cannot complete within `deadline`. Connects and
    /// checks the key at once.
    pub fn connect(
        addr: &str,
        seed_id: &str,
        key_hex: &str,
        deadline: Duration,
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
        };
        let (stream, size) = s.open(Instant::now() + deadline)?;
        s.size = size;
        *s.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some((stream, 0));
        Ok((s, size))
    }

    fn open(&self, until: Instant) -> Result<(TcpStream, u64), SourceError> {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let sa = self
            .addr
            .to_socket_addrs()
            .map_err(|e| err(self, 0, 0, format!("resolving {}: {e}", self.addr)))?
            .next()
            .ok_or_else(|| err(self, 0, 0, format!("{} resolves to nothing", self.addr)))?;
        let mut s = TcpStream::connect_timeout(&sa, left)
            .map_err(|e| err(self, 0, 0, format!("connecting: {e}")))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, e.to_string()))?;
        s.set_write_timeout(Some(left))
            .map_err(|e| err(self, 0, 0, e.to_string()))?;
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
        let _ = s.set_read_timeout(Some(left));
        let _ = s.set_write_timeout(Some(left));
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
