//! Who is calling, and what they may do (docs/SECURITY.md).
//!
//! Three kinds of principal:
//! - the **operator**: root on the Unix socket (or, with no tenants
//!   configured, anyone the socket's permissions let in);
//! - a **node** (another forkd, the gateway): the node token on TCP. It
//!   reaches seeds only with their keys, as today;
//! - a **tenant**: its own token (TCP or the Unix socket), or its uid on
//!   the Unix socket. It sees, spawns, watches and kills only its own seeds
//!   and instances; its children run as its uid.
//!
//! Tokens are kept as SHA-256 digests and compared in constant time, every
//! configured one each time (no early exit that would time which matched).

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// Errors loading the tenants file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("reading tenants file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what it should be.
    #[error("tenants file {path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// One tenant, as the operator configured it.
#[derive(Debug)]
pub struct Tenant {
    /// Its name: owner of its seeds and instances.
    pub name: String,
    token_sha256: [u8; 32],
    /// The uid its children (and the commands it captures) run as.
    pub uid: u32,
    /// Their gid.
    pub gid: u32,
    /// May it create seeds from a command (run as its uid)?
    pub create_from_command: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    /// Hex SHA-256 of the tenant's token (`forkd hash-token`).
    token_sha256: String,
    uid: u32,
    gid: u32,
    #[serde(default)]
    create_from_command: bool,
}

/// Who a request comes from.
#[derive(Debug, Clone)]
pub enum Principal {
    /// The node's operator: everything.
    Operator,
    /// Another node or the gateway (the node token): seeds by key.
    Node,
    /// A tenant: its own things only.
    Tenant(Arc<Tenant>),
}

impl Principal {
    /// The owner recorded on what it creates ("" for the operator's).
    pub fn owner(&self) -> &str {
        match self {
            Principal::Tenant(t) => &t.name,
            _ => "",
        }
    }

    /// May it see (and act on) something owned by `owner`?
    pub fn may_see(&self, owner: &str) -> bool {
        match self {
            Principal::Operator | Principal::Node => true,
            Principal::Tenant(t) => t.name == owner,
        }
    }

    /// The tenant, if it is one.
    pub fn tenant(&self) -> Option<&Tenant> {
        match self {
            Principal::Tenant(t) => Some(t),
            _ => None,
        }
    }

    /// Whom its children run as (the parent's user for the operator).
    pub fn run_as(&self) -> Option<remotefork::RunAs> {
        self.tenant().map(|t| remotefork::RunAs {
            uid: t.uid,
            gid: t.gid,
        })
    }

    /// Reached forkd over TCP with the node token (seeds need their keys).
    pub fn is_node(&self) -> bool {
        matches!(self, Principal::Node)
    }
}

/// The uid and gid of the process at the other end of the Unix socket.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// May a caller of `uid`/`gid` capture `pid`, as ptrace would let it? Root
/// may; anyone else only a process whose every uid and gid are the
/// caller's, that is dumpable (its `/proc` entry is the caller's) and that
/// holds no capability.
pub fn may_ptrace(uid: u32, gid: u32, pid: u32) -> Result<(), Status> {
    if uid == 0 {
        return Ok(());
    }
    let deny = |why: String| {
        Err(Status::permission_denied(format!(
            "uid {uid} may not capture pid {pid}: {why}"
        )))
    };
    let Ok(st) = remotefork::procfs::status(pid as i32) else {
        return deny("no such process".into());
    };
    if st.uid.iter().any(|u| *u != uid) || st.gid.iter().any(|g| *g != gid) {
        return deny(format!(
            "it runs as uid {:?} gid {:?}, and only root may capture another user's process",
            st.uid, st.gid
        ));
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(format!("/proc/{pid}")) {
        Ok(m) if m.uid() == uid => {}
        _ => {
            return deny("it is not dumpable (PR_SET_DUMPABLE 0, or it changed credentials)".into())
        }
    }
    if st.caps[1] != 0 {
        return deny(format!("it holds capabilities ({:#x})", st.caps[1]));
    }
    Ok(())
}

/// The principal of a request (set by [`Auth::interceptor`]); the operator
/// when none is set (in-process calls).
pub fn principal<T>(req: &Request<T>) -> Principal {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal::Operator)
}

/// Hex SHA-256 of a token, as the tenants file wants it.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equal, in time that depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let d = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(d) == 0
}

/// What the daemon knows of credentials.
#[derive(Debug, Default)]
pub struct Auth {
    node_token: Option<[u8; 32]>,
    tenants: Vec<Arc<Tenant>>,
    /// Where this forkd listens (`HOST:PORT`): signed credentials must be
    /// addressed to it.
    audience: Option<String>,
    /// Nonces of signed credentials seen, with when they expire here.
    nonces: std::sync::Mutex<std::collections::HashMap<[u8; 16], u64>>,
}

/// How far a signed credential's time may be from this node's, seconds.
pub const SIGNED_SKEW_S: u64 = 120;

/// Nonces remembered at most (beyond, the oldest are forgotten early and
/// credentials older than that are refused as expired).
const MAX_NONCES: usize = 1 << 20;

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(key);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .into()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A single-use credential for one request to the forkd at `audience`
/// (`HOST:PORT` as dialled), made from `token`: `RF1
/// ts=SECONDS,nonce=HEX,aud=ADDR,mac=HEX`, the MAC an HMAC-SHA256 keyed
/// with the token's SHA-256 (what the server keeps). Seen once, it is
/// refused again ("replayed"); it expires after [`SIGNED_SKEW_S`].
pub fn sign(token: &str, audience: &str) -> String {
    let key: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
    let mut nonce = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut nonce);
    }
    sign_at(&key, audience, now_s(), &nonce)
}

fn sign_at(key: &[u8; 32], audience: &str, ts: u64, nonce: &[u8; 16]) -> String {
    let n = hex(nonce);
    let mac = hmac(key, format!("rf1\n{ts}\n{n}\n{audience}").as_bytes());
    format!("RF1 ts={ts},nonce={n},aud={audience},mac={}", hex(&mac))
}

/// Does a credential addressed to `aud` reach a forkd listening on
/// `listen`? The same port, and the same host unless it listens on all.
fn audience_matches(aud: &str, listen: &str) -> bool {
    let split = |a: &str| {
        a.rsplit_once(':').map(|(h, p)| {
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.to_string(),
            )
        })
    };
    match (split(aud), split(listen)) {
        (Some((ah, ap)), Some((lh, lp))) => {
            ap == lp && (ah == lh || lh == "0.0.0.0" || lh == "::" || lh.is_empty())
        }
        _ => false,
    }
}

impl Auth {
    /// From the node token (if any) and the tenants file (if any).
    pub fn new(node_token: Option<&str>, tenants_file: Option<&Path>) -> Result<Auth, AuthError> {
        let tenants = match tenants_file {
            Some(p) => load(p)?,
            None => Vec::new(),
        };
        Ok(Auth {
            node_token: node_token.map(|t| Sha256::digest(t.trim().as_bytes()).into()),
            tenants,
            audience: None,
            nonces: Default::default(),
        })
    }

    /// Accept signed credentials addressed to `listen` (`HOST:PORT`).
    pub fn with_audience(mut self, listen: Option<&str>) -> Auth {
        self.audience = listen.map(str::to_string);
        self
    }

    /// Check a signed credential (`RF1 ...`, see [`sign`]): its MAC
    /// against every configured token's digest (constant time), its time,
    /// its audience, and that its nonce was not seen before.
    fn by_signed(&self, v: &str) -> Result<Principal, Status> {
        let bad = |why: &str| Status::unauthenticated(format!("signed credential: {why}"));
        let mut ts = None;
        let mut nonce = None;
        let mut aud = None;
        let mut mac = None;
        for part in v.split(',') {
            match part.trim().split_once('=') {
                Some(("ts", x)) => ts = x.parse::<u64>().ok(),
                Some(("nonce", x)) => nonce = Some(x.to_string()),
                Some(("aud", x)) => aud = Some(x.to_string()),
                Some(("mac", x)) => mac = Some(x.to_string()),
                _ => return Err(bad("not ts=,nonce=,aud=,mac=")),
            }
        }
        let (Some(ts), Some(nonce), Some(aud), Some(mac)) = (ts, nonce, aud, mac) else {
            return Err(bad("ts, nonce, aud and mac are all needed"));
        };
        let unhex = |x: &str, n: usize| -> Option<Vec<u8>> {
            (x.len() == 2 * n && x.bytes().all(|c| c.is_ascii_hexdigit())).then(|| {
                (0..n)
                    .map(|i| u8::from_str_radix(&x[2 * i..2 * i + 2], 16).unwrap_or(0))
                    .collect()
            })
        };
        let nonce_b: [u8; 16] = unhex(&nonce, 16)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("the nonce is not 32 hex digits"))?;
        let mac_b = unhex(&mac, 32).ok_or_else(|| bad("the mac is not 64 hex digits"))?;
        // Who made it: every configured digest is tried.
        let msg = format!("rf1\n{ts}\n{nonce}\n{aud}");
        let mut found = None;
        if let Some(n) = &self.node_token {
            if ct_eq(&hmac(n, msg.as_bytes()), &mac_b) {
                found = Some(Principal::Node);
            }
        }
        for t in &self.tenants {
            if ct_eq(&hmac(&t.token_sha256, msg.as_bytes()), &mac_b) && found.is_none() {
                found = Some(Principal::Tenant(t.clone()));
            }
        }
        let p = found.ok_or_else(|| Status::unauthenticated("wrong token (signed credential)"))?;
        let now = now_s();
        if ts + SIGNED_SKEW_S < now || ts > now + SIGNED_SKEW_S {
            return Err(bad(&format!(
                "expired or from the future ({ts}, this node's time {now}; {SIGNED_SKEW_S} s allowed)"
            )));
        }
        match &self.audience {
            Some(l) if audience_matches(&aud, l) => {}
            Some(l) => return Err(bad(&format!("addressed to {aud}, not to this forkd ({l})"))),
            None => return Err(bad("this forkd takes no signed credentials here")),
        }
        let mut seen = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_NONCES {
            seen.retain(|_, exp| *exp > now);
        }
        if seen.contains_key(&nonce_b) {
            return Err(Status::unauthenticated(
                "signed credential replayed: its nonce was used before",
            ));
        }
        if seen.len() >= MAX_NONCES {
            return Err(Status::resource_exhausted(
                "too many signed credentials in the last minutes; try again",
            ));
        }
        seen.insert(nonce_b, ts + 2 * SIGNED_SKEW_S);
        Ok(p)
    }

    /// Are tenants configured (then the Unix socket is not open to all)?
    pub fn has_tenants(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant whose children run as `uid`.
    pub fn tenant_of_uid(&self, uid: u32) -> Option<Arc<Tenant>> {
        self.tenants.iter().find(|t| t.uid == uid).cloned()
    }

    /// The tenant of this name.
    pub fn tenant_named(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants.iter().find(|t| t.name == name).cloned()
    }

    /// Whose token this is: every configured digest is compared.
    fn by_token(&self, token: &str) -> Option<Principal> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        if let Some(n) = &self.node_token {
            if ct_eq(n, &h) {
                found = Some(Principal::Node);
            }
        }
        for t in &self.tenants {
            if ct_eq(&t.token_sha256, &h) && found.is_none() {
                found = Some(Principal::Tenant(t.clone()));
            }
        }
        found
    }

    /// The principal of a request that came over TCP (`tcp`) or the Unix
    /// socket (with its peer's uid).
    pub fn identify(
        &self,
        authorization: Option<&str>,
        tcp: bool,
        peer_uid: Option<u32>,
    ) -> Result<Principal, Status> {
        if let Some(v) = authorization {
            if let Some(signed) = v.strip_prefix("RF1 ") {
                return self.by_signed(signed);
            }
            let token = v.strip_prefix("Bearer ").ok_or_else(|| {
                Status::unauthenticated(
                    "the authorization header must be \"Bearer <token>\" or a signed \"RF1 ...\"",
                )
            })?;
            return self
                .by_token(token.trim())
                .ok_or_else(|| Status::unauthenticated("wrong token"));
        }
        if tcp {
            return Err(Status::unauthenticated(
                "a bearer token is required on TCP (authorization: Bearer ...)",
            ));
        }
        match peer_uid {
            Some(0) => Ok(Principal::Operator),
            _ if !self.has_tenants() => Ok(Principal::Operator),
            Some(uid) => self
                .tenant_of_uid(uid)
                .map(Principal::Tenant)
                .ok_or_else(|| {
                    Status::permission_denied(format!(
                    "uid {uid} is neither root nor a configured tenant's uid, and sent no token"
                ))
                }),
            None => Err(Status::permission_denied(
                "the caller's credentials cannot be read on this socket",
            )),
        }
    }

    /// A tonic interceptor that marks each request with its [`Principal`]
    /// (and nodes as remote callers).
    pub fn interceptor(
        self: &Arc<Self>,
        tcp: bool,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let auth = self.clone();
        move |mut req: Request<()>| {
            let peer_uid = req
                .extensions()
                .get::<tonic::transport::server::UdsConnectInfo>()
                .and_then(|c| c.peer_cred)
                .map(|c| c.uid());
            let authz = req
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
            let p = auth.identify(authz.as_deref(), tcp, peer_uid)?;
            if let Some(c) = req
                .extensions()
                .get::<tonic::transport::server::UdsConnectInfo>()
                .and_then(|c| c.peer_cred)
            {
                let peer = Peer {
                    uid: c.uid(),
                    gid: c.gid(),
                };
                req.extensions_mut().insert(peer);
            }
            if p.is_node() {
                req.extensions_mut().insert(super::Remote);
            }
            req.extensions_mut().insert(p);
            Ok(req)
        }
    }
}

fn load(path: &Path) -> Result<Vec<Arc<Tenant>>, AuthError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: p.clone(),
        source,
    })?;
    let bad = |why: String| AuthError::Invalid {
        path: p.clone(),
        why,
    };
    let f: TenantsFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out: Vec<Arc<Tenant>> = Vec::new();
    for e in f.tenant {
        if e.name.is_empty()
            || !e
                .name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(bad(format!(
                "tenant name {:?}: letters, digits, - and _ only",
                e.name
            )));
        }
        if e.uid == 0 || e.gid == 0 {
            return Err(bad(format!(
                "tenant {}: uid and gid must not be 0 (root's children are the operator's)",
                e.name
            )));
        }
        let raw = e.token_sha256.trim();
        if raw.len() != 64 || !raw.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "tenant {}: token_sha256 must be 64 hex digits (forkd hash-token prints it)",
                e.name
            )));
        }
        let mut token_sha256 = [0u8; 32];
        for (i, b) in token_sha256.iter_mut().enumerate() {
            *b = u8::from_str_radix(&raw[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        if out.iter().any(|t| t.name == e.name) {
            return Err(bad(format!("tenant {} twice", e.name)));
        }
        if out.iter().any(|t| t.uid == e.uid) {
            return Err(bad(format!(
                "tenants {} and {} share uid {}: each tenant needs its own",
                out.iter().find(|t| t.uid == e.uid).map_or("", |t| &t.name),
                e.name,
                e.uid
            )));
        }
        out.push(Arc::new(Tenant {
            name: e.name,
            token_sha256,
            uid: e.uid,
            gid: e.gid,
            create_from_command: e.create_from_command,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("auth-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tenants.toml");
        std::fs::write(
            &f,
            format!(
                "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nuid = 2001\ngid = 2001\n\n[[tenant]]\nname = \"b\"\ntoken_sha256 = \"{}\"\nuid = 2002\ngid = 2002\n",
                hash_token("token-a"),
                hash_token("token-b")
            ),
        )
        .unwrap();
        let a = Auth::new(Some("node-token"), Some(&f)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        a
    }

    #[test]
    fn tokens_name_their_principal_and_nothing_else_passes() {
        let a = auth();
        let t = |h: &str, tcp| a.identify(Some(h), tcp, None);
        assert!(matches!(t("Bearer node-token", true), Ok(Principal::Node)));
        assert_eq!(t("Bearer token-a", true).unwrap().owner(), "a");
        assert_eq!(t("Bearer token-b", false).unwrap().owner(), "b");
        assert_eq!(
            t("Bearer token-c", true).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            t("token-a", true).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let none = a.identify(None, true, None).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn the_unix_socket_knows_root_and_tenant_uids_only() {
        let a = auth();
        assert!(matches!(
            a.identify(None, false, Some(0)),
            Ok(Principal::Operator)
        ));
        assert_eq!(a.identify(None, false, Some(2002)).unwrap().owner(), "b");
        let e = a.identify(None, false, Some(1234)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("uid 1234"), "{}", e.message());
        // With no tenants, the socket's permissions decide (as before).
        let open = Auth::new(None, None).unwrap();
        assert!(matches!(
            open.identify(None, false, Some(1234)),
            Ok(Principal::Operator)
        ));
    }

    #[test]
    fn tenants_see_only_their_own() {
        let a = auth();
        let pa = a.identify(Some("Bearer token-a"), true, None).unwrap();
        assert!(pa.may_see("a") && !pa.may_see("b") && !pa.may_see(""));
        assert!(Principal::Operator.may_see("a"));
        assert_eq!(pa.run_as().unwrap().uid, 2001);
        assert!(Principal::Operator.run_as().is_none());
    }

    #[test]
    fn a_signed_credential_is_good_once_for_its_audience_and_its_time() {
        let a = auth().with_audience(Some("127.0.0.1:7070"));
        let c = sign("token-a", "127.0.0.1:7070");
        assert_eq!(a.identify(Some(&c), true, None).unwrap().owner(), "a");
        let e = a.identify(Some(&c), true, None).unwrap_err();
        assert!(e.message().contains("replayed"), "{}", e.message());
        // Another node's, a wrong token's, an old one.
        let e = a
            .identify(Some(&sign("token-a", "127.0.0.1:7071")), true, None)
            .unwrap_err();
        assert!(e.message().contains("addressed to"), "{}", e.message());
        let e = a
            .identify(Some(&sign("nope", "127.0.0.1:7070")), true, None)
            .unwrap_err();
        assert!(e.message().contains("wrong token"), "{}", e.message());
        let key: [u8; 32] = Sha256::digest(b"token-a").into();
        let old = sign_at(&key, "127.0.0.1:7070", now_s() - 3600, &[7; 16]);
        let e = a.identify(Some(&old), true, None).unwrap_err();
        assert!(e.message().contains("expired"), "{}", e.message());
        // A tampered MAC names no one.
        let mut t = sign("node-token", "127.0.0.1:7070");
        let last = t.pop().unwrap();
        t.push(if last == '0' { '1' } else { '0' });
        assert!(a.identify(Some(&t), true, None).is_err());
        // A forkd listening on all addresses takes its port's.
        assert!(audience_matches("10.0.0.1:7070", "0.0.0.0:7070"));
        assert!(!audience_matches("10.0.0.1:7071", "0.0.0.0:7070"));
    }

    #[test]
    fn hmac_is_rfc_4231_case_2() {
        // Key "Jefe" padded with zeros is HMAC's own padding.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex(&hmac(&key, b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn a_bad_tenants_file_is_refused_with_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("auth-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.toml");
        for (text, want) in [
            (
                "[[tenant]]\nname = \"x\"\ntoken_sha256 = \"00\"\nuid = 5\ngid = 5\n",
                "64 hex",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"x\"\ntoken_sha256 = \"{}\"\nuid = 0\ngid = 5\n",
                    hash_token("t")
                ) as &str,
                "must not be 0",
            ),
            (
                "[[tenant]]\nname = \"x y\"\ntoken_sha256 = \"\"\nuid = 5\ngid = 5\n",
                "letters",
            ),
            ("[[tenant]]\nnom = 1\n", "unknown field"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Auth::new(None, Some(&f)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
