//! Nodes found the way a cluster publishes them, without a cluster: a real
//! DNS server (Debian's dnsmasq) publishes one name for namespaced forkd
//! nodes, the way a headless Service does (A records, and SRV), and the
//! gateway (`--discover`) serves bursts of invocations while nodes join
//! and leave that name, and while one is evicted (SIGTERM). Run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The name the nodes are published under, and its SRV name.
const NAME: &str = "forkd.remotefork.svc.test";
const SRV: &str = "_grpc._tcp.forkd.remotefork.svc.test";
const DNS_PORT: u16 = 15353;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A dnsmasq answering for NAME from a hosts file it reads again on SIGHUP,
/// on the nodes' bridge address: what a cluster's DNS does for a headless
/// Service.
struct Dns {
    child: Child,
    hosts: PathBuf,
    addr: String,
}

impl Dns {
    /// None (after printing SKIPPED) without dnsmasq.
    fn start(n: &Nodes, test: &str, srv: &[(&str, u16)]) -> Option<Dns> {
        let Some(bin) = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            println!("SKIPPED: {test}: dnsmasq is not installed (apt-get install dnsmasq-base)");
            return None;
        };
        let host_ip = n.host_ip();
        let dir = n.dir.join("dns");
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("forkd.hosts");
        std::fs::write(&hosts, "").unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-negcache",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={host_ip}"))
        .arg(format!("--port={DNS_PORT}"))
        .arg(format!("--addn-hosts={}", hosts.display()));
        for (target, port) in srv {
            cmd.arg(format!("--srv-host={SRV},{target},{port}"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let dns = Dns {
            child,
            hosts,
            addr: format!("{host_ip}:{DNS_PORT}"),
        };
        // Up when it answers on its port.
        let t = Instant::now();
        while std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| {
                s.connect(&dns.addr)?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                // A query for NAME, type A.
                let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
                for l in NAME.split('.') {
                    q.push(l.len() as u8);
                    q.extend_from_slice(l.as_bytes());
                }
                q.extend_from_slice(&[0, 0, 1, 0, 1]);
                s.send(&q)?;
                s.recv(&mut [0u8; 512])
            })
            .is_err()
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "dnsmasq does not answer on {}",
                dns.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(dns)
    }

    /// Publish exactly these addresses under NAME (and `nI.NAME` for
    /// each, as a headless Service names its pods).
    fn publish(&self, ips: &[String]) {
        let mut s = String::new();
        for ip in ips {
            s.push_str(&format!("{ip} {NAME}\n"));
        }
        self.write(&s);
    }

    /// Replace the hosts file and have dnsmasq read it again.
    fn write(&self, hosts: &str) {
        let tmp = self.hosts.with_extension("tmp");
        std::fs::write(&tmp, hosts).unwrap();
        std::fs::rename(&tmp, &self.hosts).unwrap();
        // SAFETY: kill(2) of our dnsmasq: SIGHUP rereads --addn-hosts.
        let r = unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        assert_eq!(r, 0);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway finding `n`'s nodes through `discover` on `dns`, with `more`
/// flags.
fn gateway(n: &Nodes, discover: &str, dns: &Dns, more: &[String]) -> Gateway {
    let mut args: Vec<String> = [
        "--discover",
        discover,
        "--dns-server",
        &dns.addr,
        "--discover-interval-ms",
        "250",
        "--node-poll-ms",
        "500",
        "--token-file",
        &n.get("TOKEN_FILE"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(n.gateway_worker_args(120_000));
    args.extend_from_slice(more);
    Gateway::start(&args)
}

/// Register the one-shot boto3 function (captured at its ready line by the
/// node's `CreateSeed`); its seed's node.
async fn register(a: &str) -> String {
    let (st, v) = http(a, "POST", "/functions", &s3_one_shot("s3").to_string()).await;
    assert_eq!(st, 201, "{v}");
    v["seed_node"].as_str().unwrap().to_string()
}

/// `burst` with the forkd of `pid` sent SIGTERM (as an eviction does) once
/// `at` invocations are done, while a watcher times how long that forkd
/// takes to stop. The burst's seconds, and the forkd's stop after the
/// signal.
async fn burst_evicting(a: &str, total: u64, at: u64, pid: i32) -> (f64, Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel::<Instant>();
    let watcher = tokio::spawn(async move {
        let sent = rx.await.unwrap();
        while state(pid).is_some_and(|s| s != 'Z') {
            assert!(
                sent.elapsed() < Duration::from_secs(60),
                "the evicted forkd did not stop"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent.elapsed()
    });
    let mut tx = Some(tx);
    let secs = burst(a, total, 32, |done| {
        if done >= at {
            if let Some(tx) = tx.take() {
                // SAFETY: kill(2) of a node's forkd.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
                let _ = tx.send(Instant::now());
            }
        }
    })
    .await;
    (secs, watcher.await.unwrap())
}

/// `total` invocations, `concurrency` at a time; `at(done)` runs as they
/// complete (between invocations, from the driving task). Every answer is
/// checked: 200, the square of its input, from the warm boto3 client.
async fn burst(a: &str, total: u64, concurrency: u64, mut at: impl FnMut(u64)) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let t = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (a, next, done, errors) =
                (a.to_string(), next.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        return;
                    }
                    let (st, v) = http(&a, "POST", "/invoke/s3", &format!("{{\"n\": {i}}}")).await;
                    if st != 200
                        || v["square"].as_u64() != Some(i * i)
                        || v["region"] != "us-east-1"
                    {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("invocation {i}: {st} {v}"));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let mut seen = 0;
    while seen < total {
        let d = done.load(Ordering::SeqCst);
        if d != seen {
            seen = d;
            at(seen);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {total} invocations failed; first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    secs
}

fn spawns(n: &Nodes, i: u32) -> u64 {
    forkd::client::scrape_metric(&n.get(&format!("NODE{i}_METRICS")), "forkd_spawns_total")
}

fn addr_of(n: &Nodes, i: u32) -> String {
    n.get(&format!("NODE{i}_ADDR"))
}

fn ip_of(n: &Nodes, i: u32) -> String {
    n.get(&format!("NODE{i}_IP"))
}

fn node_index(n: &Nodes, addr: &str) -> u32 {
    (1..=4)
        .find(|&i| n.env.get(&format!("NODE{i}_ADDR")).map(String::as_str) == Some(addr))
        .unwrap_or_else(|| panic!("{addr} is no node"))
}

#[test]
fn nodes_joining_and_leaving_the_dns_name_mid_burst() {
    let test = "nodes_joining_and_leaving_the_dns_name_mid_burst";
    if !require_root(test) {
        return;
    }
    let Some(n) = Nodes::up_with("disc-join", 4, &["--remote-commands"]) else {
        return;
    };
    let Some(dns) = Dns::start(&n, test, &[]) else {
        return;
    };
    dns.publish(&[ip_of(&n, 1), ip_of(&n, 2), ip_of(&n, 3)]);
    let gw = gateway(&n, &format!("dns:{NAME}:7070"), &dns, &[]);
    let a = gw.addr.clone();
    let total = burst_size();
    rt().block_on(async {
        wait_nodes(&a, "nodes 1-3 serving", |ns| serving(ns).len() == 3).await;
        let seed_node = register(&a).await;
        let seed_i = node_index(&n, &seed_node);
        // The node to take out of the name: not the seed's (its leaving is
        // the eviction test's).
        let leaving = (1..=3).find(|&i| i != seed_i).unwrap();
        let joined_at = total * 3 / 10;
        let left_at = total * 6 / 10;
        let (mut joined, mut left) = (false, false);
        let secs = burst(&a, total, 32, |done| {
            if done >= joined_at && !joined {
                joined = true;
                let ips: Vec<String> = (1..=4).map(|i| ip_of(&n, i)).collect();
                dns.publish(&ips);
            }
            if done >= left_at && !left {
                left = true;
                let ips: Vec<String> = (1..=4)
                    .filter(|&i| i != leaving)
                    .map(|i| ip_of(&n, i))
                    .collect();
                dns.publish(&ips);
            }
        })
        .await;
        println!("discovery burst: {total} invocations in {secs:.2} s; node {leaving} left the name, node 4 joined");
        // The leaving node is drained and then forgotten; its forkd runs on.
        let leaving_addr = addr_of(&n, leaving);
        wait_nodes(&a, "the left node forgotten", |ns| {
            !ns.contains_key(&leaving_addr)
        })
        .await;
        let frozen = spawns(&n, leaving);
        let ns = gw_nodes(&a).await;
        assert_eq!(
            serving(&ns),
            {
                let mut v: Vec<String> = (1..=4)
                    .filter(|&i| i != leaving)
                    .map(|i| addr_of(&n, i))
                    .collect();
                v.sort();
                v
            },
            "{ns:?}"
        );
        assert!(
            ns[&addr_of(&n, 4)].1 > 0,
            "the joined node 4 took instances: {ns:?}"
        );
        // Another round: nothing goes to the node that left.
        let more = total / 5;
        burst(&a, more, 16, |_| {}).await;
        assert_eq!(
            spawns(&n, leaving),
            frozen,
            "node {leaving} left the name and still got children"
        );
        assert!(state(n.forkd_pid(leaving)).is_some(), "node {leaving}'s forkd runs on");
        let placed: u64 = gw_nodes(&a).await.values().map(|x| x.1).sum();
        println!("after the node left: {more} more invocations, none on node {leaving} ({frozen} children there in all); {placed} on the others");
        let (_, v) = http(&a, "GET", "/functions", "").await;
        assert_eq!(
            v["functions"][0]["ok"].as_u64(),
            Some(total + more),
            "{v}"
        );
    });
}

#[test]
fn an_evicted_node_mid_burst_loses_no_invocation() {
    let test = "an_evicted_node_mid_burst_loses_no_invocation";
    if !require_root(test) {
        return;
    }
    let Some(n) = Nodes::up_with("disc-evict", 3, &["--remote-commands"]) else {
        return;
    };
    let srv: Vec<(String, u16)> = (1..=3).map(|i| (format!("n{i}.{NAME}"), 7070)).collect();
    let srv: Vec<(&str, u16)> = srv.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    let Some(dns) = Dns::start(&n, test, &srv) else {
        return;
    };
    // The SRV targets' A records, and the name's.
    let mut hosts = String::new();
    for i in 1..=3 {
        hosts.push_str(&format!("{} {NAME} n{i}.{NAME}\n", ip_of(&n, i)));
    }
    dns.write(&hosts);
    // Found by SRV this time: target and port from the records.
    let gw = gateway(&n, &format!("srv:{SRV}"), &dns, &[]);
    let a = gw.addr.clone();
    let total = burst_size();
    rt().block_on(async {
        wait_nodes(&a, "3 nodes serving (from SRV)", |ns| serving(ns).len() == 3).await;
        let seed_i = node_index(&n, &register(&a).await);
        let evicted = (1..=3).find(|&i| i != seed_i).unwrap();
        let evict_at = total * 4 / 10;
        // The evicted forkd drains and stops (it is still published: the
        // gateway sees it stop serving, not leave the name).
        let (secs, stopped) = burst_evicting(&a, total, evict_at, n.forkd_pid(evicted)).await;
        let evicted_addr = addr_of(&n, evicted);
        wait_nodes(&a, "the evicted node forgotten", |ns| {
            !ns.contains_key(&evicted_addr) && serving(ns).len() == 2
        })
        .await;
        let (_, v) = http(&a, "GET", "/functions", "").await;
        let f = &v["functions"][0];
        assert_eq!(f["ok"].as_u64(), Some(total), "{v}");
        println!(
            "eviction: {total} invocations in {secs:.2} s, none failed; node {evicted} (SIGTERM at {evict_at}) stopped {:.2} s after; {} invocations retried elsewhere",
            stopped.as_secs_f64(),
            f["retried"]
        );
        // Now the seed's node is evicted mid-burst: its seed is made again
        // on the node left, and no invocation fails.
        let more = total / 2;
        let (secs, _) = burst_evicting(&a, more, more * 3 / 10, n.forkd_pid(seed_i)).await;
        let left = (1..=3).find(|&i| i != seed_i && i != evicted).unwrap();
        let t = Instant::now();
        let seed_node = loop {
            let (_, v) = http(&a, "GET", "/functions", "").await;
            let s = v["functions"][0]["seed_node"].as_str().unwrap().to_string();
            if s == addr_of(&n, left) {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the seed was not made again on node {left}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        burst(&a, total / 10, 8, |_| {}).await;
        println!(
            "seed node {seed_i} evicted: {more} invocations in {secs:.2} s, none failed; the seed is now on {seed_node}"
        );
    });
}

#[test]
fn connected_instances_on_an_evicted_node_finish_and_are_retired() {
    let test = "connected_instances_on_an_evicted_node_finish_and_are_retired";
    if !require_root(test) {
        return;
    }
    let Some(n) = Nodes::up_n("disc-ckpt", 3) else {
        return;
    };
    let Some(dns) = Dns::start(&n, test, &[]) else {
        return;
    };
    // Node 1 is given (the function checkpoints through its cooperative
    // socket, next to the gateway); nodes 2 and 3 are discovered.
    dns.publish(&[ip_of(&n, 2), ip_of(&n, 3)]);
    let gw = gateway(
        &n,
        &format!("dns:{NAME}:7070"),
        &dns,
        &[
            "--node".into(),
            format!("{},peer={}", n.sock(1), addr_of(&n, 1)),
        ],
    );
    let a = gw.addr.clone();
    let total = burst_size();
    rt().block_on(async {
        wait_nodes(&a, "3 nodes serving", |ns| serving(ns).len() == 3).await;
        let handler = repo().join("python/examples/s3_handler.py");
        let f = json!({"name": "s3",
            "command": [python(), "-m", "remotefork.runtime", handler],
            "env": {"PYTHONPATH": repo().join("python")}});
        let (st, v) = http(&a, "POST", "/functions", &f.to_string()).await;
        assert_eq!(st, 201, "{v}");
        // Its kept-alive instances are retired (idle ones at once, busy
        // ones after their invocation), so its forkd has nothing left to
        // wait for.
        let (secs, stopped) = burst_evicting(&a, total, total * 4 / 10, n.forkd_pid(2)).await;
        let log = std::fs::read_to_string(n.dir.join("n2.log")).unwrap();
        assert!(
            !log.contains("grace period over"),
            "forkd waited out its drain for instances the gateway kept: {log}"
        );
        let gone = addr_of(&n, 2);
        wait_nodes(&a, "node 2 forgotten", |ns| !ns.contains_key(&gone)).await;
        let (_, v) = http(&a, "GET", "/functions", "").await;
        let f = &v["functions"][0];
        assert_eq!(f["ok"].as_u64(), Some(total), "{v}");
        println!(
            "connected instances: {total} invocations in {secs:.2} s, none failed, {} served by kept-alive instances; node 2 evicted at 40% and stopped {:.2} s later ({} invocations retried)",
            f["reused"],
            stopped.as_secs_f64(),
            f["retried"]
        );
    });
}
