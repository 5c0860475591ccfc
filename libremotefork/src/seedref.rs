//! Seeds on other nodes: their references and how to reach them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A seed held by another node's page server: `ADDR/ID#KEY`.
///
/// `ADDR` is the page server (`HOST:PORT`, or `tls://HOST:PORT`), `ID`
/// the seed's 16 hex digits, `KEY` its 32 hex digits of key (`forkctl
/// seed ref --pages ID` prints it).
///
/// ```
/// let r: remotefork::SeedRef = "10.0.0.2:7071/00112233aabbccdd#000102030405060708090a0b0c0d0e0f"
///     .parse()
///     .unwrap();
/// assert_eq!(r.addr, "10.0.0.2:7071");
/// assert_eq!(r.id, "00112233aabbccdd");
/// assert!("10.0.0.2:7071/00112233aabbccdd".parse::<remotefork::SeedRef>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SeedRef {
    /// The page server.
    pub addr: String,
    /// The seed's id.
    pub id: String,
    /// The seed's key, hex.
    pub key: String,
}

impl std::fmt::Debug for SeedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never in logs.
        write!(f, "SeedRef({}/{}#…)", self.addr, self.id)
    }
}

/// Why a text is not a [`SeedRef`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeedRefError {
    /// No `/` between the address and the id.
    #[error("seed reference {0:?} has no ADDR/ before its id (ADDR/ID#KEY)")]
    NoAddress(String),
    /// No `#KEY`.
    #[error("seed reference for {0:?} has no #KEY (ADDR/ID#KEY)")]
    NoKey(String),
    /// The id is not 16 hex digits.
    #[error("seed id {0:?} is not 16 hex digits")]
    BadId(String),
    /// The key is not 32 hex digits.
    #[error("the key of seed {0} is not 32 hex digits")]
    BadKey(String),
}

impl std::str::FromStr for SeedRef {
    type Err = SeedRefError;

    fn from_str(s: &str) -> Result<SeedRef, SeedRefError> {
        let (addr, rest) = s
            .rsplit_once('/')
            .filter(|(a, _)| !a.is_empty() && !a.ends_with('/'))
            .ok_or_else(|| SeedRefError::NoAddress(s.split('#').next().unwrap_or("").into()))?;
        let (id, key) = rest
            .split_once('#')
            .ok_or_else(|| SeedRefError::NoKey(rest.into()))?;
        if id.len() != 16 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SeedRefError::BadId(id.into()));
        }
        if crate::transport::wire::key_bytes(key).is_none() {
            return Err(SeedRefError::BadKey(id.into()));
        }
        Ok(SeedRef {
            addr: addr.into(),
            id: id.into(),
            key: key.into(),
        })
    }
}

impl std::fmt::Display for SeedRef {
    /// The reference with its key (a secret: mind where it goes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.addr, self.id, self.key)
    }
}

/// How a remote seed's pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Transport {
    /// The best this node and the reference allow: today TCP (or TLS, for
    /// a `tls://` address). RDMA needs a connection set up by forkd's page
    /// channel.
    #[default]
    Auto,
    /// The TCP page server (TLS for a `tls://` address).
    Tcp,
    /// RDMA READ; refused by [`crate::Seed::open_remote`] with the reason:
    /// its queue pairs are exchanged over forkd's gRPC page channel.
    Rdma,
}

/// How to open a remote seed (see [`crate::Seed::open_remote`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// The transport.
    pub transport: Transport,
    /// Where the seed's descriptor is kept on this node (a private
    /// directory is made there); default: `$TMPDIR/remotefork-<uid>`.
    pub dir: Option<PathBuf>,
    /// A page read that cannot complete within this fails (and a child
    /// needing that page is killed with the reason). Default 30 s.
    pub deadline: Duration,
    /// Trust for `tls://` page servers: a PEM CA bundle.
    pub tls_ca: Option<Arc<Vec<u8>>>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            transport: Transport::Auto,
            dir: None,
            deadline: Duration::from_secs(30),
            tls_ca: None,
        }
    }
}

impl RemoteOptions {
    /// Set the transport.
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }

    /// Set where descriptors are kept.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Set the page read deadline.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// Trust this PEM CA bundle for `tls://` page servers.
    pub fn tls_ca(mut self, pem: Vec<u8>) -> Self {
        self.tls_ca = Some(Arc::new(pem));
        self
    }
}

impl crate::Seed {
    /// Open a seed held by another node's page server, by its reference:
    /// fetch its descriptor (kept in a private directory under
    /// [`RemoteOptions::dir`]), check the key and that the page server
    /// offers as many bytes as the descriptor says, and serve its
    /// children's pages from there (cached on this node, each page
    /// checked against its digest).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use remotefork::{RemoteOptions, Seed, SeedRef, SpawnOptions, Stdio};
    /// let r: SeedRef = "10.0.0.2:7071/00112233aabbccdd#000102030405060708090a0b0c0d0e0f".parse()?;
    /// let seed = Seed::open_remote(&r, &RemoteOptions::default())?;
    /// let mut child = seed.spawn(Stdio::Null, Stdio::Inherit, Stdio::Inherit, &SpawnOptions::default())?;
    /// child.wait()?;
    /// # Ok(()) }
    /// ```
    pub fn open_remote(
        r: &SeedRef,
        opts: &RemoteOptions,
    ) -> Result<crate::Seed, crate::RestoreError> {
        use crate::restore::RestoreError;
        let remote = |why: String| RestoreError::Remote {
            seed: r.id.clone(),
            addr: r.addr.clone(),
            why,
        };
        if opts.transport == Transport::Rdma {
            return Err(remote(
                "RDMA was asked for: the library reaches page servers over TCP only; RDMA queue pairs are set up by forkd's page channel (spawn through forkd)".into(),
            ));
        }
        let tls = match (r.addr.starts_with("tls://"), &opts.tls_ca) {
            (true, Some(pem)) => Some(
                crate::transport::tcp::tls_client_config(pem).map_err(|e| remote(e.to_string()))?,
            ),
            (true, None) => {
                return Err(remote(
                    "a tls:// page server needs a CA to trust (RemoteOptions::tls_ca)".into(),
                ))
            }
            (false, _) => None,
        };
        let (source, size) = crate::transport::tcp::TcpSource::connect_tls(
            &r.addr,
            &r.id,
            &r.key,
            opts.deadline,
            tls,
        )
        .map_err(|e| remote(e.to_string()))?;
        let (descriptor, working_set) = source
            .fetch_descriptor()
            .map_err(|e| remote(e.to_string()))?;
        // SAFETY: getuid has no arguments and cannot fail.
        let uid = unsafe { libc::getuid() };
        let base = opts
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("remotefork-{uid}")));
        // Per address and id: another node's seed of the same id is another seed.
        let tag = xxhash_rust::xxh3::xxh3_64(r.addr.as_bytes());
        let dir = base.join(format!("{}-{:08x}", r.id, tag as u32));
        let io = |what: String| move |source| RestoreError::Io { what, source };
        crate::private_fs::dir(&base).map_err(io(format!("creating {}", base.display())))?;
        crate::private_fs::dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let dpath = dir.join(crate::image::DESCRIPTOR_FILE);
        crate::private_fs::replace(&dpath, &descriptor)
            .map_err(io(format!("writing {}", dpath.display())))?;
        let wpath = dir.join(crate::restore::WORKING_SET_FILE);
        if working_set.is_empty() {
            let _ = std::fs::remove_file(&wpath);
        } else {
            crate::private_fs::replace(&wpath, &working_set)
                .map_err(io(format!("writing {}", wpath.display())))?;
        }
        let image = crate::image::SeedImage::open_descriptor(&dir)?;
        let want = image.descriptor().image_bytes;
        if size != want {
            return Err(remote(format!(
                "the page server offers {size} bytes, the descriptor says {want}"
            )));
        }
        tracing::info!(seed = %r.id, addr = %r.addr, "remote seed opened");
        crate::Seed::remote(image, Box::new(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f";

    #[test]
    fn references_parse_and_bad_ones_are_named() {
        let r: SeedRef = format!("tls://h:1/0011223344556677#{KEY}").parse().unwrap();
        assert_eq!(r.addr, "tls://h:1");
        assert_eq!(r.to_string(), format!("tls://h:1/0011223344556677#{KEY}"));
        assert!(!format!("{r:?}").contains(KEY));
        assert_eq!(
            format!("0011223344556677#{KEY}").parse::<SeedRef>(),
            Err(SeedRefError::NoAddress("0011223344556677".into()))
        );
        assert_eq!(
            "h:1/0011223344556677".parse::<SeedRef>(),
            Err(SeedRefError::NoKey("0011223344556677".into()))
        );
        assert_eq!(
            format!("h:1/xyz#{KEY}").parse::<SeedRef>(),
            Err(SeedRefError::BadId("xyz".into()))
        );
        assert_eq!(
            "h:1/0011223344556677#abc".parse::<SeedRef>(),
            Err(SeedRefError::BadKey("0011223344556677".into()))
        );
    }
}
