//! Connecting to a forkd: `unix:PATH`, `HOST:PORT` (TCP, with a token) or
//! `https://HOST:PORT` (TLS, checked against the CA of [`set_tls_ca`] or
//! the file `FORKD_TLS_CA` names).

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::pb::forkd_client::ForkdClient;

/// Adds the credential to every request: the bearer token on the Unix
/// socket; over TCP a fresh signed, single-use credential per request
/// (`daemon::auth::sign`: a copy of one seen on the way cannot be replayed).
#[derive(Clone)]
pub struct Token(Option<Credential>);

#[derive(Clone)]
enum Credential {
    Bearer(MetadataValue<tonic::metadata::Ascii>),
    Signed { token: String, audience: String },
}

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &self.0 {
            Some(Credential::Bearer(t)) => {
                req.metadata_mut().insert("authorization", t.clone());
            }
            Some(Credential::Signed { token, audience }) => {
                let v = crate::daemon::auth::sign(token, audience)
                    .parse()
                    .map_err(|_| {
                        tonic::Status::internal("a signed credential is not a header value")
                    })?;
                req.metadata_mut().insert("authorization", v);
            }
            None => {}
        }
        Ok(req)
    }
}

/// A connection to a forkd that adds the credential: what every client of
/// it (forkd's own, the standard health service's) is made over.
pub type Service = InterceptedService<Channel, Token>;

/// A connected client.
pub type Client = ForkdClient<Service>;

/// The CA (PEM) that `https://` addresses are checked against.
static TLS_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Check the servers of `https://` addresses against this CA (PEM), for
/// the whole process (the first call wins).
pub fn set_tls_ca(pem: Vec<u8>) {
    let _ = TLS_CA.set(pem);
}

/// The CA for `https://` addresses: [`set_tls_ca`]'s, else the file
/// `FORKD_TLS_CA` names.
fn tls_ca() -> anyhow::Result<Vec<u8>> {
    if let Some(c) = TLS_CA.get() {
        return Ok(c.clone());
    }
    match std::env::var_os("FORKD_TLS_CA") {
        Some(p) => std::fs::read(&p).map_err(|e| {
            anyhow::anyhow!("reading FORKD_TLS_CA {}: {e}", p.to_string_lossy())
        }),
        None => Err(anyhow::anyhow!(
            "an https:// address needs the CA that signed its certificate: --tls-ca FILE or FORKD_TLS_CA"
        )),
    }
}

/// Connect to `addr` (`unix:/path` or `host:port`), sending `token` if given.
pub async fn connect(addr: &str, token: Option<&str>) -> anyhow::Result<Client> {
    Ok(ForkdClient::new(connect_service(addr, token).await?))
}

/// [`connect`], as the connection any gRPC client can be made over (the
/// health service's, for one).
pub async fn connect_service(addr: &str, token: Option<&str>) -> anyhow::Result<Service> {
    let channel = if let Some(path) = addr.strip_prefix("unix:") {
        let path = path.to_string();
        Endpoint::try_from("http://forkd.local")?
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| unreachable(addr, &e))?
    } else {
        let url = if addr.starts_with("http") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let mut e = Endpoint::try_from(url)?;
        if addr.starts_with("https://") {
            let ca = tonic::transport::Certificate::from_pem(tls_ca()?);
            e = e
                .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))
                .map_err(|e| anyhow::anyhow!("TLS for {addr}: {e}"))?;
        }
        e.connect().await.map_err(|e| unreachable(addr, &e))?
    };
    let t = match token {
        Some(t) if addr.starts_with("unix:") => {
            Some(Credential::Bearer(format!("Bearer {t}").parse().map_err(
                |_| anyhow::anyhow!("the token has characters not allowed in a header"),
            )?))
        }
        Some(t) => Some(Credential::Signed {
            token: t.to_string(),
            audience: addr
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
        }),
        None => None,
    };
    Ok(InterceptedService::new(channel, Token(t)))
}

/// An error and its sources, in one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// What to tell someone whose forkd at `addr` could not be reached: which
/// address was tried, why it failed, and how to start forkd there.
fn unreachable(addr: &str, e: &tonic::transport::Error) -> anyhow::Error {
    let mut io = None;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(x) = s.downcast_ref::<std::io::Error>() {
            io = Some(x);
        }
        src = s.source();
    }
    let text = chain(e);
    if addr.starts_with("https://") && text.contains("certificate") {
        return anyhow::anyhow!(
            "cannot connect to forkd at {addr}: {text}; its certificate is not signed by the CA given (--tls-ca, FORKD_TLS_CA), or not for this address"
        );
    }
    let start = match addr.strip_prefix("unix:") {
        Some(path) => format!(
            "start one with `forkd serve --socket {path}` (as root), or `systemctl start forkd`"
        ),
        None => format!("start forkd there with `forkd serve --listen {addr} --token-file FILE`"),
    };
    let elsewhere = "or name a running one with --addr or FORKD_ADDR";
    use std::io::ErrorKind as K;
    let why = match (addr.strip_prefix("unix:"), io.map(|e| e.kind())) {
        (Some(path), Some(K::NotFound)) => format!("{path} does not exist: no forkd is running there"),
        (Some(path), Some(K::ConnectionRefused)) => {
            format!("nothing listens on {path} (left by a forkd that stopped)")
        }
        (Some(path), Some(K::PermissionDenied)) => {
            return anyhow::anyhow!(
                "cannot connect to forkd at {addr}: permission denied on {path} (mode 0660: run as root or as a member of its group)"
            )
        }
        (None, Some(K::ConnectionRefused)) => "connection refused: nothing listens there".into(),
        (_, Some(_)) => io.map(|e| e.to_string()).unwrap_or_default(),
        (_, None) => e.to_string(),
    };
    anyhow::anyhow!("cannot connect to forkd at {addr}: {why}; {start}, {elsewhere}")
}

/// The sum of a metric's samples (every label set) in the Prometheus text
/// a forkd or gateway serves at `addr` (`HOST:PORT`) under `/metrics`;
/// 0 when it cannot be read or has no such metric.
pub fn scrape_metric(addr: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = write!(s, "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
