//! The little of the Kubernetes API node discovery needs: list a Service's
//! EndpointSlices (`discovery.k8s.io/v1`) and keep their ready endpoints.
//! In a pod the credentials are the service account's (its token and the
//! cluster CA under `/var/run/secrets/kubernetes.io/serviceaccount`, the
//! API at `KUBERNETES_SERVICE_HOST:PORT`); outside, `--kube-api URL` with a
//! token and CA file. `docs/DECISIONS.md` says why this is not the `kube`
//! crate.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The service account's files in a pod.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// A list answer larger than this is refused.
const MAX_BODY: usize = 16 << 20;
/// One request's limit.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The Kubernetes API could not be asked, or answered wrong.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Not in a pod and no `--kube-api` given.
    #[error(
        "no Kubernetes API: KUBERNETES_SERVICE_HOST is not set (not in a pod); give --kube-api URL"
    )]
    NotInCluster,
    /// A credential file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The API URL is not `https://HOST[:PORT]`.
    #[error("--kube-api {0:?}: want https://HOST[:PORT]")]
    BadUrl(String),
    /// The CA file holds no usable certificate.
    #[error("the Kubernetes CA: {0}")]
    Ca(String),
    /// Connecting or talking to the API failed.
    #[error("the Kubernetes API at {addr}: {error}")]
    Http {
        /// The API's address.
        addr: String,
        /// What failed.
        error: String,
    },
    /// The API answered with an error status.
    #[error("the Kubernetes API answered {status} to {path}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request path.
        path: String,
        /// The API's message (a 403 names the missing permission).
        message: String,
    },
    /// The answer is not an EndpointSliceList.
    #[error("the Kubernetes API's answer to {path} is not an EndpointSliceList: {why}")]
    Malformed {
        /// The request path.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// How to reach the Kubernetes API.
#[derive(Clone)]
pub struct KubeApi {
    host: String,
    port: u16,
    /// Read at every request: the kubelet rotates a pod's token file.
    token_file: std::path::PathBuf,
    tls: tokio_rustls::TlsConnector,
}

impl KubeApi {
    /// The API of the cluster this pod runs in, with its service account.
    pub fn in_cluster() -> Result<KubeApi, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        KubeApi::new(
            &format!("https://{host}:{port}"),
            &Path::new(SA_DIR).join("token"),
            &Path::new(SA_DIR).join("ca.crt"),
        )
    }

    /// The API at `url` (`https://HOST[:PORT]`), presenting the bearer
    /// token in `token_file`, its certificate checked against `ca_file`.
    pub fn new(url: &str, token_file: &Path, ca_file: &Path) -> Result<KubeApi, KubeError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|error| KubeError::Read {
                path: p.display().to_string(),
                error,
            })
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| KubeError::BadUrl(url.into()))?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(p) => (h.to_string(), p),
                Err(_) if rest.starts_with('[') && rest.ends_with(']') => (rest.to_string(), 443),
                Err(_) => return Err(KubeError::BadUrl(url.into())),
            },
            _ => (rest.to_string(), 443),
        };
        if host.is_empty() || host.contains('/') {
            return Err(KubeError::BadUrl(url.into()));
        }
        // Readable now (an error at start, not at the first round).
        read(token_file)?;
        let cfg = remotefork::transport::tcp::tls_client_config(&read(ca_file)?)
            .map_err(|e| KubeError::Ca(e.to_string()))?;
        Ok(KubeApi {
            host,
            port,
            token_file: token_file.to_path_buf(),
            tls: tokio_rustls::TlsConnector::from(cfg),
        })
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// GET `path`, the answer's JSON.
    async fn get(&self, path: &str) -> Result<Value, KubeError> {
        let http = |error: String| KubeError::Http {
            addr: self.addr(),
            error,
        };
        let token = std::fs::read_to_string(&self.token_file).map_err(|error| KubeError::Read {
            path: self.token_file.display().to_string(),
            error,
        })?;
        let token = token.trim();
        let run = async {
            let bare = self.host.trim_start_matches('[').trim_end_matches(']');
            let tcp = tokio::net::TcpStream::connect((bare, self.port))
                .await
                .map_err(|e| http(e.to_string()))?;
            let name = match bare.parse::<IpAddr>() {
                Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
                Err(_) => rustls::pki_types::ServerName::try_from(bare.to_string())
                    .map_err(|e| http(e.to_string()))?,
            };
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| http(format!("TLS: {e}")))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| http(e.to_string()))?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path)
                .header(hyper::header::HOST, self.addr())
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(hyper::header::ACCEPT, "application/json")
                .body(Empty::<hyper::body::Bytes>::new())
                .map_err(|e| http(e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| http(format!("reading the answer: {e}")))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&body).map_err(|e| KubeError::Malformed {
                path: path.into(),
                why: e.to_string(),
            })?;
            if status != 200 {
                return Err(KubeError::Status {
                    status,
                    path: path.into(),
                    message: v
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("(no message)")
                        .into(),
                });
            }
            Ok(v)
        };
        tokio::time::timeout(TIMEOUT, run)
            .await
            .map_err(|_| http(format!("no answer within {} s", TIMEOUT.as_secs())))?
    }

    /// The ready endpoints of `service` in `namespace`, as `HOST:PORT`
    /// at the port named `port_name` [default: each slice's first].
    pub async fn ready_endpoints(
        &self,
        namespace: &str,
        service: &str,
        port_name: Option<&str>,
    ) -> Result<BTreeSet<String>, KubeError> {
        let path = format!(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{service}"
        );
        let v = self.get(&path).await?;
        ready_endpoints(&v, port_name).map_err(|why| KubeError::Malformed { path, why })
    }
}

/// The ready endpoints of an EndpointSliceList, as `HOST:PORT`.
pub(crate) fn ready_endpoints(
    list: &Value,
    port_name: Option<&str>,
) -> Result<BTreeSet<String>, String> {
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .ok_or("no items")?;
    let mut out = BTreeSet::new();
    for s in items {
        let ports = s.get("ports").and_then(Value::as_array);
        let port = ports.and_then(|ps| {
            ps.iter()
                .find(|p| match port_name {
                    Some(n) => p.get("name").and_then(Value::as_str) == Some(n),
                    None => true,
                })
                .and_then(|p| p.get("port"))
                .and_then(Value::as_u64)
        });
        // A slice without the port (yet) has no usable endpoint.
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for e in s
            .get("endpoints")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            // `ready` unset means ready (the API's rule); a terminating
            // endpoint is not ready.
            let c = e.get("conditions");
            let ready = c
                .and_then(|c| c.get("ready"))
                .and_then(Value::as_bool)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for a in e
                .get("addresses")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let ip: IpAddr = a
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| format!("endpoint address {a} is not an IP address"))?;
                out.insert(std::net::SocketAddr::new(ip, port).to_string());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_endpoints_of_a_slice_list() {
        let list = json!({"kind": "EndpointSliceList", "items": [
            {"addressType": "IPv4",
             "ports": [{"name": "metrics", "port": 7072}, {"name": "grpc", "port": 7070}],
             "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.1.0.7"]}
             ]},
            {"addressType": "IPv4", "ports": null, "endpoints": [{"addresses": ["10.1.0.9"]}]},
            {"addressType": "IPv6", "ports": [{"name": "grpc", "port": 7070}],
             "endpoints": [{"addresses": ["fd00::5"], "conditions": {"ready": true}}]}
        ]});
        let got = ready_endpoints(&list, Some("grpc")).unwrap();
        let want: BTreeSet<String> = ["10.1.0.5:7070", "10.1.0.7:7070", "[fd00::5]:7070"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(got, want);
        // Without a port name: each slice's first port.
        assert!(ready_endpoints(&list, None)
            .unwrap()
            .contains("10.1.0.5:7072"));
        assert!(ready_endpoints(&json!({"kind": "Status"}), None).is_err());
        let bad = json!({"items": [{"ports": [{"port": 1}], "endpoints": [{"addresses": ["x"]}]}]});
        assert!(ready_endpoints(&bad, None)
            .unwrap_err()
            .contains("not an IP"));
    }

    #[test]
    fn api_urls_parse() {
        let dir = std::env::temp_dir();
        let tok = dir.join(format!("rf-kube-token-{}", std::process::id()));
        std::fs::write(&tok, "t\n").unwrap();
        let no_ca = dir.join("rf-kube-no-such-ca");
        for bad in ["http://x", "https://", "https://a/b", "https://a:port"] {
            assert!(
                matches!(KubeApi::new(bad, &tok, &no_ca), Err(KubeError::BadUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            KubeApi::new("https://10.0.0.1:6443", &tok, &no_ca),
            Err(KubeError::Read { .. })
        ));
        let _ = std::fs::remove_file(tok);
    }
}
