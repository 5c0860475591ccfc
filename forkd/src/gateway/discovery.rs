//! Finding forkd nodes the way a cluster publishes them: the DNS records of
//! a headless Service (A/AAAA with a port given, or SRV), or the Service's
//! EndpointSlices through the Kubernetes API. The gateway asks again every
//! interval; what a round answers is the set of nodes to place on
//! (`nodes.rs` adds the new ones and drains the ones no longer listed).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use super::kube::{KubeApi, KubeError};

/// Where the nodes are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `dns:NAME:PORT`: every A/AAAA record of NAME is a node, its gRPC at
    /// PORT (a headless Service's name: one record per ready pod).
    Dns {
        /// The name (a Service's `SVC.NS.svc.cluster.local`).
        name: String,
        /// forkd's gRPC port.
        port: u16,
    },
    /// `srv:NAME`: every SRV record of NAME (a headless Service's
    /// `_grpc._tcp.SVC.NS.svc.cluster.local`) is a node, at its target and
    /// port.
    Srv {
        /// The SRV name.
        name: String,
    },
    /// `k8s:NAMESPACE/SERVICE[:PORT_NAME]`: the ready endpoints of the
    /// Service's EndpointSlices, read from the Kubernetes API (in-cluster
    /// credentials, or `--kube-api`), at the named port [default: the
    /// slice's first].
    Kubernetes {
        /// The Service's namespace.
        namespace: String,
        /// The Service.
        service: String,
        /// The port's name in the slice.
        port_name: Option<String>,
    },
}

/// A source that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--discover {given:?}: {why} (want dns:NAME:PORT, srv:NAME or k8s:NAMESPACE/SERVICE[:PORT_NAME])")]
pub struct BadSource {
    given: String,
    why: &'static str,
}

impl FromStr for Source {
    type Err = BadSource;
    fn from_str(s: &str) -> Result<Self, BadSource> {
        let bad = |why| BadSource {
            given: s.to_string(),
            why,
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        };
        if let Some(rest) = s.strip_prefix("dns:") {
            let (name, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
            if port == 0 {
                return Err(bad("port 0"));
            }
            if !name_ok(name) {
                return Err(bad("not a DNS name"));
            }
            Ok(Source::Dns {
                name: name.into(),
                port,
            })
        } else if let Some(name) = s.strip_prefix("srv:") {
            if !name_ok(name) {
                return Err(bad("not a DNS name"));
            }
            Ok(Source::Srv { name: name.into() })
        } else if let Some(rest) = s.strip_prefix("k8s:") {
            let (ns, svc) = rest.split_once('/').ok_or_else(|| bad("no NAMESPACE/"))?;
            let (svc, port_name) = match svc.split_once(':') {
                Some((s, p)) => (s, Some(p.to_string())),
                None => (svc, None),
            };
            let label = |n: &str| {
                !n.is_empty()
                    && n.len() <= 63
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            };
            if !label(ns) || !label(svc) || port_name.as_deref().is_some_and(|p| !label(p)) {
                return Err(bad("namespace, service and port names are DNS labels"));
            }
            Ok(Source::Kubernetes {
                namespace: ns.into(),
                service: svc.into(),
                port_name,
            })
        } else {
            Err(bad("unknown kind"))
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dns { name, port } => write!(f, "dns:{name}:{port}"),
            Source::Srv { name } => write!(f, "srv:{name}"),
            Source::Kubernetes {
                namespace,
                service,
                port_name,
            } => match port_name {
                Some(p) => write!(f, "k8s:{namespace}/{service}:{p}"),
                None => write!(f, "k8s:{namespace}/{service}"),
            },
        }
    }
}

/// A round of discovery that failed (the nodes known stay as they are).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver could not be set up (`/etc/resolv.conf`).
    #[error("DNS resolver: {0}")]
    Resolver(String),
    /// The lookup failed (not "no such name": that is an empty answer).
    #[error("looking up {name}: {error}")]
    Lookup {
        /// The name.
        name: String,
        /// What the resolver said.
        error: String,
    },
    /// The Kubernetes API failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// Asks a [`Source`] for the nodes, one round at a time.
pub struct Discoverer {
    source: Source,
    resolver: Option<TokioResolver>,
    kube: Option<KubeApi>,
}

impl Discoverer {
    /// A discoverer of `source`; DNS goes to `dns_server` if given, else to
    /// the system's resolvers (`/etc/resolv.conf`, its search domains and
    /// `ndots` included, as in a pod).
    pub fn new(
        source: Source,
        dns_server: Option<SocketAddr>,
        kube: Option<KubeApi>,
    ) -> Result<Discoverer, DiscoveryError> {
        let resolver = match &source {
            Source::Kubernetes { .. } => None,
            _ => {
                let mut b = match dns_server {
                    Some(a) => TokioResolver::builder_with_config(
                        ResolverConfig::from_parts(
                            None,
                            Vec::new(),
                            NameServerConfigGroup::from_ips_clear(&[a.ip()], a.port(), true),
                        ),
                        TokioConnectionProvider::default(),
                    ),
                    None => TokioResolver::builder_tokio()
                        .map_err(|e| DiscoveryError::Resolver(e.to_string()))?,
                };
                let o: &mut ResolverOpts = b.options_mut();
                // Every round asks the server: membership changes must be
                // seen within a round, whatever TTL the records carry.
                o.cache_size = 0;
                o.timeout = Duration::from_secs(2);
                o.attempts = 2;
                Some(b.build())
            }
        };
        let kube = match &source {
            Source::Kubernetes { .. } => Some(match kube {
                Some(k) => k,
                None => KubeApi::in_cluster()?,
            }),
            _ => None,
        };
        Ok(Discoverer {
            source,
            resolver,
            kube,
        })
    }

    /// The source asked.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The nodes published now, as `HOST:PORT` of their gRPC.
    pub async fn nodes(&self) -> Result<BTreeSet<String>, DiscoveryError> {
        let lookup_err = |name: &str, e: hickory_resolver::ResolveError| {
            // No such name, or no records of the kind: no nodes (a
            // Service with no ready pod publishes nothing).
            if is_no_records(&e) {
                return None;
            }
            Some(DiscoveryError::Lookup {
                name: name.to_string(),
                error: e.to_string(),
            })
        };
        match &self.source {
            Source::Dns { name, port } => {
                let r = self.resolver.as_ref().expect("DNS source has a resolver");
                match r.lookup_ip(name.as_str()).await {
                    Ok(ips) => Ok(ips
                        .iter()
                        .map(|ip| SocketAddr::new(ip, *port).to_string())
                        .collect()),
                    Err(e) => match lookup_err(name, e) {
                        Some(e) => Err(e),
                        None => Ok(BTreeSet::new()),
                    },
                }
            }
            Source::Srv { name } => {
                let r = self.resolver.as_ref().expect("DNS source has a resolver");
                let srv = match r.srv_lookup(name.as_str()).await {
                    Ok(s) => s,
                    Err(e) => {
                        return match lookup_err(name, e) {
                            Some(e) => Err(e),
                            None => Ok(BTreeSet::new()),
                        }
                    }
                };
                // Each target's addresses (a pod's hostname under the
                // Service: its A record).
                let mut out = BTreeSet::new();
                for rec in srv.iter() {
                    let target = rec.target().to_utf8();
                    let ips: Vec<std::net::IpAddr> = match r.lookup_ip(target.as_str()).await {
                        Ok(l) => l.iter().collect(),
                        Err(e) => match lookup_err(&target, e) {
                            Some(e) => return Err(e),
                            None => Vec::new(),
                        },
                    };
                    for ip in ips {
                        out.insert(SocketAddr::new(ip, rec.port()).to_string());
                    }
                }
                Ok(out)
            }
            Source::Kubernetes {
                namespace,
                service,
                port_name,
            } => {
                let k = self.kube.as_ref().expect("k8s source has an API client");
                Ok(k.ready_endpoints(namespace, service, port_name.as_deref())
                    .await?)
            }
        }
    }
}

fn is_no_records(e: &hickory_resolver::ResolveError) -> bool {
    e.is_no_records_found() || e.is_nx_domain()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_print_back() {
        for s in [
            "dns:forkd.remotefork.svc.cluster.local:7070",
            "srv:_grpc._tcp.forkd.remotefork.svc.cluster.local",
            "k8s:remotefork/forkd:grpc",
            "k8s:remotefork/forkd",
        ] {
            let p: Source = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(
            "dns:a.b:7070".parse::<Source>().unwrap(),
            Source::Dns {
                name: "a.b".into(),
                port: 7070
            }
        );
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        for (s, why) in [
            ("dns:forkd", "no port"),
            ("dns:forkd:x", "not a number"),
            ("dns:forkd:0", "port 0"),
            ("dns:for kd:7070", "not a DNS name"),
            ("srv:", "not a DNS name"),
            ("k8s:forkd", "NAMESPACE/"),
            ("k8s:ns/Svc_1", "DNS labels"),
            ("consul:forkd", "unknown kind"),
        ] {
            let e = s.parse::<Source>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
            assert!(e.contains(s), "{s}: {e}");
        }
    }
}
