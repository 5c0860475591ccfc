//! The Kubernetes manifests, without a cluster: `kubectl kustomize` renders
//! them (the DNS base and the API-discovery overlay), every object
//! validates against the Kubernetes schemas (kubernetes-validate, strict,
//! the oldest and newest versions supported), the objects agree with each
//! other (the headless Service selects forkd's pods, the gateway discovers
//! that Service's name and port, the grace period covers forkd's drain),
//! and the real forkd and gateway accept the rendered flags and config and
//! serve (health SERVING, /healthz), forkd draining on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Kubernetes versions the manifests are checked against: the oldest they
/// support (securityContext.appArmorProfile is 1.30's) and the newest
/// kubernetes-validate knows.
const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The objects `kubectl kustomize DIR` renders, or None (SKIPPED printed)
/// without kubectl or kubernetes-validate; every one validated.
fn render(dir: &str, scratch: &Path) -> Option<Vec<Value>> {
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join(dir))
        .output()
    else {
        println!("SKIPPED: kubernetes manifests: kubectl is not installed (apt-get install kubernetes-client)");
        return None;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = scratch.join(format!("{}.yaml", dir.replace('/', "_")));
    std::fs::write(&file, &out.stdout).unwrap();
    if Command::new(python())
        .args(["-c", "import kubernetes_validate"])
        .status()
        .map_or(true, |s| !s.success())
    {
        println!("SKIPPED: kubernetes manifests: kubernetes-validate is not installed (pip install kubernetes-validate)");
        return None;
    }
    for v in VERSIONS {
        let o = Command::new(python())
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", v])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{dir} does not validate against Kubernetes {v}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = Command::new(python())
        .args([
            "-c",
            "import sys, yaml, json; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `$(VAR)` in `s` replaced from `vars`.
fn expand(s: &str, vars: &[(String, String)]) -> String {
    let mut s = s.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("$({k})"), v);
    }
    s
}

#[test]
fn manifests_render_validate_and_agree() {
    let dir = scratch("k8s-render");
    let Some(base) = render("deploy/kubernetes", &dir) else {
        return;
    };
    let Some(api) = render("deploy/kubernetes/overlays/api-discovery", &dir) else {
        return;
    };
    for o in base.iter().chain(&api) {
        if o["kind"] != "Namespace" {
            assert_eq!(o["metadata"]["namespace"], "remotefork", "{o}");
        }
    }
    let ds = find(&base, "DaemonSet", "forkd");
    let pod = &ds["spec"]["template"];
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    let selects = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["readinessProbe"]["grpc"]["service"], "forkd.v1.Forkd");
    assert_eq!(c["readinessProbe"]["grpc"]["port"], 7070);
    assert_eq!(pod["spec"]["hostPID"], false);
    assert_eq!(
        strs(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"],
        "capabilities are added one by one, none inherited"
    );
    // The grace period covers forkd's drain.
    let cm = find(&base, "ConfigMap", "remotefork-config");
    let toml_text = cm["data"]["forkd.toml"].as_str().unwrap();
    let cfg: toml::Value = toml::from_str(toml_text).unwrap();
    let drain = cfg["drain_s"].as_integer().unwrap();
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(
        drain < grace,
        "drain_s {drain} within the grace period {grace}"
    );
    // The headless Service publishes forkd's pods, its grpc port.
    let svc = find(&base, "Service", "forkd");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert!(selects(&svc["spec"]["selector"]));
    let grpc = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(grpc["port"], 7070);
    // The gateway discovers that Service: by DNS in the base, by its
    // EndpointSlices (port grpc) in the overlay, allowed by its Role.
    assert_eq!(
        cm["data"]["GATEWAY_DISCOVER"],
        "dns:forkd.remotefork.svc.cluster.local:7070"
    );
    let cm_api = find(&api, "ConfigMap", "remotefork-config");
    assert_eq!(
        cm_api["data"]["GATEWAY_DISCOVER"],
        "k8s:remotefork/forkd:grpc"
    );
    let src: forkd::gateway::discovery::Source = cm_api["data"]["GATEWAY_DISCOVER"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(src.to_string(), "k8s:remotefork/forkd:grpc");
    let role = find(&api, "Role", "gateway-discovery");
    let rule = &role["rules"][0];
    assert_eq!(strs(&rule["resources"]), ["endpointslices"]);
    assert!(strs(&rule["verbs"]).contains(&"list".to_string()));
    let rb = find(&api, "RoleBinding", "gateway-discovery");
    assert_eq!(rb["subjects"][0]["name"], "gateway");
    let gw_api = find(&api, "Deployment", "gateway");
    assert_eq!(
        gw_api["spec"]["template"]["spec"]["serviceAccountName"],
        "gateway"
    );
    // No RBAC where the API is not used.
    assert!(!base.iter().any(|o| o["kind"] == "Role"));
    // The budgets select pods that exist.
    let gw = find(&base, "Deployment", "gateway");
    let gw_labels = gw["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap()
        .clone();
    for name in ["forkd", "gateway"] {
        let pdb = find(&base, "PodDisruptionBudget", name);
        let sel = pdb["spec"]["selector"]["matchLabels"].as_object().unwrap();
        assert!(
            sel.iter()
                .all(|(k, v)| labels.get(k) == Some(v) || gw_labels.get(k) == Some(v)),
            "{pdb}"
        );
    }
    println!(
        "kubernetes: {} objects (DNS base) and {} (API-discovery overlay) valid against Kubernetes {}",
        base.len(),
        api.len(),
        VERSIONS.join(" and ")
    );
}

#[test]
fn the_rendered_forkd_and_gateway_start_and_forkd_drains_on_sigterm() {
    if !require_root("the_rendered_forkd_and_gateway_start") {
        return;
    }
    let dir = scratch("k8s-run");
    let Some(base) = render("deploy/kubernetes", &dir) else {
        return;
    };
    let cm = find(&base, "ConfigMap", "remotefork-config");
    let mut vars: Vec<(String, String)> = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("GATEWAY_"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    vars.push(("POD_IP".into(), "127.0.0.1".into()));
    // The pod's files, here.
    std::fs::write(
        dir.join("forkd.toml"),
        cm["data"]["forkd.toml"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("token"), "k8s-test-token\n").unwrap();
    std::fs::write(dir.join("api-token"), "k8s-test-api-token\n").unwrap();
    let (grpc, pages, metrics) = (free_port(), free_port(), free_port());
    let paths = |a: &str| {
        a.replace(
            "/etc/remotefork/forkd.toml",
            &dir.join("forkd.toml").to_string_lossy(),
        )
        .replace(
            "/etc/remotefork/token/token",
            &dir.join("token").to_string_lossy(),
        )
        .replace(
            "/etc/remotefork/api/token",
            &dir.join("api-token").to_string_lossy(),
        )
        .replace("/run/forkd/", &format!("{}/", dir.display()))
        .replace("/var/lib/remotefork", &dir.join("state").to_string_lossy())
        .replace("0.0.0.0:7070", &format!("127.0.0.1:{grpc}"))
        .replace("$(POD_IP):7071", &format!("127.0.0.1:{pages}"))
        .replace("0.0.0.0:7071", &format!("127.0.0.1:{pages}"))
        .replace("0.0.0.0:7072", &format!("127.0.0.1:{metrics}"))
    };
    let ds = find(&base, "DaemonSet", "forkd");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strs(&c["command"]), ["forkd"]);
    let args: Vec<String> = strs(&c["args"])
        .iter()
        .map(|a| paths(&expand(a, &vars)))
        .collect();
    let mut forkd = Command::new(env!("CARGO_BIN_EXE_forkd"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = dir.join("forkd.sock");
    let t = Instant::now();
    while !sock.exists() {
        if let Ok(Some(st)) = forkd.try_wait() {
            let mut e = String::new();
            std::io::Read::read_to_string(&mut forkd.stderr.take().unwrap(), &mut e).unwrap();
            panic!("forkd with the rendered flags exited ({st}): {e}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "forkd never bound {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let gw_dep = find(&base, "Deployment", "gateway");
    let gc = &gw_dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(strs(&gc["command"]), ["gateway"]);
    let gw_args: Vec<String> = strs(&gc["args"])
        .iter()
        .filter(|a| !a.starts_with("--listen="))
        .map(|a| paths(&expand(a, &vars)))
        .collect();
    assert!(!gw_args.iter().any(|a| a.contains("$(")), "{gw_args:?}");
    let gw = Gateway::start(&gw_args);
    rt().block_on(async {
        // forkd: SERVING on the probe's service, over TCP with no token
        // (as the kubelet asks).
        let addr = format!("http://127.0.0.1:{grpc}");
        let ch = tonic::transport::Endpoint::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        let t = Instant::now();
        loop {
            let r = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "forkd.v1.Forkd".into(),
                })
                .await
                .unwrap()
                .into_inner();
            if r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "forkd never SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The gateway: its probe path answers; its discovery (a name no
        // DNS here knows) keeps it running with no nodes.
        let (st, _) = http(&gw.addr, "GET", "/healthz", "").await;
        assert_eq!(st, 200);
        let (st, v) = http(&gw.addr, "GET", "/functions", "").await;
        assert_eq!(st, 401, "the API token is required: {v}");
    });
    // SIGTERM, as the kubelet sends: forkd drains and exits 0 within the
    // pod's grace period.
    let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    // SAFETY: kill(2) of our child.
    let r = unsafe { libc::kill(forkd.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    let t = Instant::now();
    let st = loop {
        if let Some(st) = forkd.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(grace),
            "forkd did not stop within the {grace} s grace period"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "forkd exited {st} on SIGTERM");
    println!(
        "kubernetes: the rendered forkd served and stopped {:.2} s after SIGTERM; the rendered gateway served /healthz",
        t.elapsed().as_secs_f64()
    );
}

/// A stand-in for the Kubernetes API (a test double: no cluster runs
/// here): HTTPS, the bearer token checked, the EndpointSlices of
/// remotefork/forkd answered from `slices`; anything else 403/404 as the
/// API answers. Every request's path is kept in `seen`.
async fn fake_api(
    l: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    token: String,
    slices: std::sync::Arc<std::sync::Mutex<Value>>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let (acceptor, token, slices, seen) = (
            acceptor.clone(),
            token.clone(),
            slices.clone(),
            seen.clone(),
        );
        tokio::spawn(async move {
            let Ok(mut s) = acceptor.accept(s).await else {
                return;
            };
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            let authed = req
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {token}")));
            let want = "/apis/discovery.k8s.io/v1/namespaces/remotefork/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dforkd";
            let (status, body) = if !authed {
                (
                    "401 Unauthorized",
                    serde_json::json!({"kind": "Status", "message": "Unauthorized"}),
                )
            } else if path != want {
                (
                    "404 Not Found",
                    serde_json::json!({"kind": "Status", "message": format!("no {path}")}),
                )
            } else {
                ("200 OK", slices.lock().unwrap().clone())
            };
            let body = body.to_string();
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// An EndpointSliceList: one slice per (port, ready) endpoint on 127.0.0.1.
fn slice_list(eps: &[(u16, bool)]) -> Value {
    serde_json::json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
        "items": eps.iter().map(|(port, ready)| serde_json::json!({
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 1}, {"name": "grpc", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]
        })).collect::<Vec<_>>()})
}

#[test]
fn gateway_discovers_forkd_from_endpointslices_and_drains_unready_ones() {
    if !require_root("gateway_discovers_forkd_from_endpointslices") {
        return;
    }
    let dir = scratch("k8s-api");
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let pages = |p: u16| format!("127.0.0.1:{p}");
    let (pages_a, pages_b) = (pages(free_port()), pages(free_port()));
    let a = Daemon::start_with(&da, true, &["--remote-commands", "--page-listen", &pages_a]);
    let b_metrics = format!("127.0.0.1:{}", free_port());
    let b = Daemon::start_with(
        &db,
        true,
        &[
            "--remote-commands",
            "--page-listen",
            &pages_b,
            "--metrics",
            &b_metrics,
        ],
    );
    let port = |d: &Daemon| -> u16 {
        d.tcp
            .as_ref()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap()
    };
    let (pa, pb) = (port(&a), port(&b));
    let (ca, cert, key) = tls_pems();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.join("kube-token"), "kube-test-token\n").unwrap();
    let slices = std::sync::Arc::new(std::sync::Mutex::new(slice_list(&[(pa, true), (pb, true)])));
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let rt = rt();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let api = format!("https://{}", l.local_addr().unwrap());
    let acceptor =
        forkd::daemon::pageserver::tls_acceptor(cert.as_bytes(), key.as_bytes()).unwrap();
    rt.spawn(fake_api(
        l,
        acceptor,
        "kube-test-token".into(),
        slices.clone(),
        seen.clone(),
    ));
    let gw = Gateway::start(&[
        "--discover".into(),
        "k8s:remotefork/forkd:grpc".into(),
        "--kube-api".into(),
        api,
        "--kube-token-file".into(),
        dir.join("kube-token").to_string_lossy().into(),
        "--kube-ca".into(),
        dir.join("ca.pem").to_string_lossy().into(),
        "--discover-interval-ms".into(),
        "200".into(),
        "--token-file".into(),
        da.join("token").to_string_lossy().into(),
    ]);
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let g = gw.addr.clone();
    rt.block_on(async {
        wait_nodes(&g, "both nodes discovered", |ns| serving(ns).len() == 2).await;
        let (st, v) = http(&g, "POST", "/functions", &s3_one_shot("s3").to_string()).await;
        assert_eq!(st, 201, "{v}");
        let call = |i: u64| {
            let g = g.clone();
            async move {
                let (st, v) = http(&g, "POST", "/invoke/s3", &format!("{{\"n\": {i}}}")).await;
                assert_eq!((st, v["square"].as_u64()), (200, Some(i * i)), "{v}");
            }
        };
        let burst = |k: u64| async move {
            let calls: Vec<_> = (0..k).map(|i| tokio::spawn(call(i))).collect();
            for c in calls {
                c.await.unwrap();
            }
        };
        burst(40).await;
        assert!(
            gw_nodes(&g).await.values().all(|n| n.1 > 0),
            "both nodes used: {:?}",
            gw_nodes(&g).await
        );
        // B's pod turns unready (it is terminating): drained, forgotten.
        *slices.lock().unwrap() = slice_list(&[(pa, true), (pb, false)]);
        wait_nodes(&g, "the unready node forgotten", |ns| {
            !ns.contains_key(&addr_b)
        })
        .await;
        let b_spawns = forkd::client::scrape_metric(&b_metrics, "forkd_spawns_total");
        burst(40).await;
        assert_eq!(
            forkd::client::scrape_metric(&b_metrics, "forkd_spawns_total"),
            b_spawns
        );
        // The API refuses (a token revoked): the nodes known stay.
        *slices.lock().unwrap() = Value::Null;
        std::fs::write(dir.join("kube-token"), "revoked\n").unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let ns = gw_nodes(&g).await;
        assert_eq!(serving(&ns), vec![addr_a], "{ns:?}");
        assert_eq!(ns.len(), 1, "{ns:?}");
        burst(10).await;
    });
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 3, "{seen:?}");
    println!("kubernetes API discovery: {} EndpointSlice lists read; the unready node drained; 90 invocations answered", seen.len());
}
