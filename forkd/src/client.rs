//! Connecting to a forkd: `unix:PATH` or `HOST:PORT` (TCP, with a token).

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::pb::forkd_client::ForkdClient;

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A connected client.
pub type Client = ForkdClient<InterceptedService<Channel, Token>>;

/// Connect to `addr` (`unix:/path` or `host:port`), sending `token` if given.
pub async fn connect(addr: &str, token: Option<&str>) -> anyhow::Result<Client> {
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
        Endpoint::try_from(url)?
            .connect()
            .await
            .map_err(|e| unreachable(addr, &e))?
    };
    let t =
        match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                anyhow::anyhow!("the token has characters not allowed in a header")
            })?),
            None => None,
        };
    Ok(ForkdClient::with_interceptor(channel, Token(t)))
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
