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
            .map_err(|e| anyhow::anyhow!("cannot connect to forkd at {addr}: {e}"))?
    } else {
        let url = if addr.starts_with("http") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        Endpoint::try_from(url)?
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to forkd at {addr}: {e}"))?
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
