//! The RDMA page transport (`remotefork::transport::rdma`, `docs/RDMA.md`).
//!
//! Everything but the last test needs two RDMA devices: they run inside
//! the Soft-RoCE VM of `soft-rdma-tests/run`, which sets `RF_RDMA_GUEST=1`,
//! `RF_RDMA_NODE{1,2}_IP` and `RF_RDMA_NODE{1,2}_DEV` (two rxe devices with
//! distinct GIDs: two "nodes"). Elsewhere they print `SKIPPED: no RDMA
//! device (...)` and return. The first four put the exporter (node 1's
//! device) and the importer (node 2's) in this one process; the fifth runs
//! two forkd daemons. The last one, the fallback to TCP, runs anywhere.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use remotefork::pager::cache::SeedCache;
use remotefork::pager::PageRef;
use remotefork::transport::rdma::{
    self, Connection, ExportedSeed, Exporter, QpInfo, RdmaNode, RdmaSource, RemoteRegion,
};
use remotefork::transport::{PageSource, SourceError};
use serde_json::Value;

/// The two nodes' devices and addresses, if this is an RDMA environment.
struct Env {
    dev1: String,
    dev2: String,
    ip1: String,
    ip2: String,
}

fn rdma_env(test: &str) -> Option<Env> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(dev1), Some(dev2)) = (var("RF_RDMA_NODE1_DEV"), var("RF_RDMA_NODE2_DEV")) else {
        let why = match rdma::probe(None) {
            Ok(d) => format!(
                "a device ({}) but RF_RDMA_NODE1_DEV/RF_RDMA_NODE2_DEV are not set",
                d.device
            ),
            Err(e) => e.to_string(),
        };
        println!("SKIPPED: {test}: no RDMA device ({why})");
        return None;
    };
    for d in [&dev1, &dev2] {
        if let Err(why) = rdma::probe(Some(d)) {
            println!("SKIPPED: {test}: no RDMA device ({why})");
            return None;
        }
    }
    Some(Env {
        dev1,
        dev2,
        ip1: var("RF_RDMA_NODE1_IP").unwrap_or_else(|| "127.0.0.1".into()),
        ip2: var("RF_RDMA_NODE2_IP").unwrap_or_else(|| "127.0.0.1".into()),
    })
}

/// Deterministic, page-distinct content.
fn image_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let p = (i / 4096) as u32;
            (p.wrapping_mul(2654435761) >> 7) as u8 ^ (i % 251) as u8
        })
        .collect()
}

fn write_image(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let b = image_bytes(len);
    std::fs::write(&p, &b).unwrap();
    (p, b)
}

/// Exporter (node 1's device) and importer (node 2's) in this process.
struct Pair {
    exp: Arc<RdmaNode>,
    imp: Arc<RdmaNode>,
    exporter: Arc<Exporter>,
    /// One connection per seed, as forkd makes them.
    conns: Mutex<HashMap<String, Arc<Connection>>>,
    seeds: Arc<Mutex<HashMap<String, Arc<ExportedSeed>>>>,
}

impl Pair {
    fn new(env: &Env) -> Pair {
        let exp = RdmaNode::open(Some(&env.dev1)).unwrap();
        let imp = RdmaNode::open(Some(&env.dev2)).unwrap();
        let exporter = Arc::new(Exporter::new(exp.clone(), 16));
        Pair {
            exp,
            imp,
            exporter,
            conns: Default::default(),
            seeds: Default::default(),
        }
    }

    /// The importer's connection for seed `name`.
    fn conn(&self, name: &str) -> Arc<Connection> {
        self.conns
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Connection::new(self.imp.clone(), "node1"))
            .clone()
    }

    fn export(&self, name: &str, path: &Path, size: u64) -> RemoteRegion {
        let e = self.exp.export_file(path, size).unwrap();
        let r = e.region();
        self.seeds
            .lock()
            .unwrap()
            .insert(name.to_string(), Arc::new(e));
        r
    }

    fn unexport(&self, name: &str) {
        self.seeds.lock().unwrap().remove(name);
    }

    /// What a peer's OpenPageChannel does, in process.
    fn exchange(
        &self,
        name: &str,
    ) -> impl Fn(&QpInfo) -> Result<(QpInfo, RemoteRegion), rdma::ExchangeError> {
        let (exporter, seeds, id, name) = (
            self.exporter.clone(),
            self.seeds.clone(),
            self.conn(name).id(),
            name.to_string(),
        );
        move |local: &QpInfo| {
            let e = seeds
                .lock()
                .unwrap()
                .get(&name)
                .cloned()
                .ok_or_else(|| format!("no seed {name} (dropped)"))?;
            let q = exporter.accept(id, local, &e).map_err(|e| e.to_string())?;
            Ok((q, e.region()))
        }
    }

    /// A source for seed `name`, connecting its connection first if
    /// needed; `reconnect` gives it the in-process exchange.
    fn source(&self, name: &str, region: RemoteRegion, reconnect: bool) -> RdmaSource {
        let conn = self.conn(name);
        if !conn.is_connected() {
            let x = self.exchange(name);
            conn.connect_with(|l| x(l)).unwrap();
        }
        let cb: Option<rdma::Reconnect> = if reconnect {
            Some(Box::new(self.exchange(name)))
        } else {
            None
        };
        RdmaSource::new(conn, region, Duration::from_secs(5), cb)
    }
}

#[test]
fn rdma_reads_return_exactly_the_image_bytes() {
    let Some(env) = rdma_env("rdma_reads_return_exactly_the_image_bytes") else {
        return;
    };
    let dir = scratch("rdma-bytes");
    let len = 8 << 20;
    let (path, want) = write_image(&dir, "pages.img", len);
    let pair = Pair::new(&env);
    let region = pair.export("s", &path, len as u64);
    let src = pair.source("s", region, true);

    // One page.
    let mut b = vec![0u8; 4096];
    src.read(7 * 4096, &mut b).unwrap();
    assert_eq!(b, want[7 * 4096..8 * 4096]);
    // 32 scattered pages in one batch (into ordinary buffers: the bounce path).
    let offs: Vec<usize> = (0..32).map(|i| ((i * 997 + 13) % 2048) * 4096).collect();
    let mut bufs: Vec<Vec<u8>> = offs.iter().map(|_| vec![0u8; 4096]).collect();
    {
        let mut reqs: Vec<(u64, &mut [u8])> = offs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(o, b)| (*o as u64, b.as_mut_slice()))
            .collect();
        src.read_many(&mut reqs).unwrap();
    }
    for (o, b) in offs.iter().zip(&bufs) {
        assert_eq!(b[..], want[*o..*o + 4096], "page at {o:#x}");
    }
    // A 1 MiB run, unaligned start, and a 3 MiB run (split into READs).
    let mut run = vec![0u8; 1 << 20];
    src.read(12345, &mut run).unwrap();
    assert_eq!(run[..], want[12345..12345 + (1 << 20)]);
    let mut big = vec![0u8; 3 << 20];
    src.read(4096, &mut big).unwrap();
    assert_eq!(big[..], want[4096..4096 + (3 << 20)]);
    // Never outside the region.
    let e = src
        .read(len as u64 - 4096, &mut vec![0u8; 8192])
        .unwrap_err();
    assert!(matches!(e, SourceError::OutOfRange { .. }), "{e}");
    assert!(src.read(u64::MAX - 10, &mut b).is_err());

    // Through the seed cache: READs go straight into the registered cache.
    let cache = SeedCache::new(Box::new(pair.source("s", region, true)), 16 << 20, 0).unwrap();
    let mut refs: Vec<PageRef> = offs
        .iter()
        .enumerate()
        .map(|(i, o)| PageRef {
            image: *o as u64,
            cache: (i as u64 * 3 + 1000) * 4096,
        })
        .collect();
    refs.extend((0..256u64).map(|i| PageRef {
        image: (1024 + i) * 4096,
        cache: (2000 + i) * 4096,
    }));
    assert_eq!(cache.ensure(&refs).unwrap(), refs.len() as u64);
    for r in &refs {
        let o = r.image as usize;
        assert_eq!(
            cache.page(r.cache),
            &want[o..o + 4096],
            "cache page {:#x}",
            r.cache
        );
    }
    assert_eq!(pair.imp.qps_created(), 1, "one QP for both sources");
    println!(
        "rdma: {} batches on {} -> {}",
        pair.conn("s").batches(),
        env.dev2,
        env.dev1
    );
}

#[test]
fn a_read_after_the_seed_is_dropped_fails_cleanly() {
    let Some(env) = rdma_env("a_read_after_the_seed_is_dropped_fails_cleanly") else {
        return;
    };
    let dir = scratch("rdma-dropped");
    let (path, want) = write_image(&dir, "a.img", 1 << 20);
    let (path_b, want_b) = write_image(&dir, "b.img", 1 << 20);
    let pair = Pair::new(&env);
    let ra = pair.export("a", &path, 1 << 20);
    let rb = pair.export("b", &path_b, 1 << 20);
    let a = pair.source("a", ra, true);
    let b = pair.source("b", rb, true);
    let mut buf = vec![0u8; 8192];
    a.read(4096, &mut buf).unwrap();
    assert_eq!(buf, want[4096..4096 + 8192]);

    // Drop seed a: its memory region is deregistered.
    pair.unexport("a");
    let t = Instant::now();
    let mut buf = vec![0xeeu8; 8192];
    let e = a.read(4096, &mut buf).unwrap_err().to_string();
    println!("read after drop: {e} ({:?})", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        e.contains("remote access") || e.contains("dropped"),
        "not a clean refusal: {e}"
    );
    assert!(e.contains("rdma:node1"), "names the source: {e}");
    // Ordinary buffers are filled through the bounce buffer, only on success.
    assert!(
        buf.iter().all(|x| *x == 0xee),
        "bytes of a dropped seed were delivered"
    );
    // The other seed of the same node still reads (the connection recovers).
    let mut buf = vec![0u8; 4096];
    b.read(0, &mut buf).unwrap();
    assert_eq!(buf, want_b[..4096]);
}

#[test]
fn a_wrong_rkey_is_refused_and_the_connection_recovers() {
    let Some(env) = rdma_env("a_wrong_rkey_is_refused_and_the_connection_recovers") else {
        return;
    };
    let dir = scratch("rdma-rkey");
    let (path, want) = write_image(&dir, "pages.img", 1 << 20);
    let pair = Pair::new(&env);
    let good = pair.export("s", &path, 1 << 20);
    let bad_region = RemoteRegion {
        rkey: good.rkey.wrapping_add(0x3c00_0000),
        ..good
    };
    let bad = pair.source("s", bad_region, false);
    let gen0 = pair.conn("s").generation();
    let t = Instant::now();
    let e = bad.read(0, &mut vec![0u8; 4096]).unwrap_err().to_string();
    println!("wrong rkey: {e} ({:?})", t.elapsed());
    assert!(e.contains("remote access"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15));
    // The error put the QP in the error state; the next seed's source
    // reconnects through its callback and reads.
    let ok = pair.source("s", good, true);
    let mut b = vec![0u8; 3 * 4096];
    ok.read(4096, &mut b).unwrap();
    assert_eq!(b, want[4096..4 * 4096]);
    assert!(pair.conn("s").generation() > gen0, "it reconnected");
    assert_eq!(pair.exporter.connections(), 1, "the old QP was replaced");
}

#[test]
fn sixteen_concurrent_readers_share_a_queue_pair_per_seed() {
    let Some(env) = rdma_env("sixteen_concurrent_readers_share_a_queue_pair_per_seed") else {
        return;
    };
    let dir = scratch("rdma-16");
    let len = 4 << 20;
    let (p1, w1) = write_image(&dir, "one.img", len);
    let (p2, w2) = write_image(&dir, "two.img", len);
    let w2: Vec<u8> = w2.iter().map(|b| b ^ 0x5a).collect();
    std::fs::write(&p2, &w2).unwrap();
    let pair = Pair::new(&env);
    let r1 = pair.export("one", &p1, len as u64);
    let r2 = pair.export("two", &p2, len as u64);
    let wants = Arc::new([w1, w2]);
    let mut threads = Vec::new();
    for t in 0..16usize {
        let src = if t % 2 == 0 {
            pair.source("one", r1, true)
        } else {
            pair.source("two", r2, true)
        };
        let wants = wants.clone();
        threads.push(std::thread::spawn(move || {
            let want = &wants[t % 2];
            let mut x = t as u64 * 7919 + 1;
            for _ in 0..40 {
                let n = 1 + (x % 8) as usize;
                let mut offs = Vec::new();
                for _ in 0..n {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    offs.push(((x >> 33) as usize % (len / 4096 - 2)) * 4096);
                }
                let mut bufs: Vec<Vec<u8>> = offs.iter().map(|_| vec![0u8; 8192]).collect();
                let mut reqs: Vec<(u64, &mut [u8])> = offs
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(o, b)| (*o as u64, b.as_mut_slice()))
                    .collect();
                src.read_many(&mut reqs).unwrap();
                for (o, b) in offs.iter().zip(&bufs) {
                    assert_eq!(b[..], want[*o..*o + 8192]);
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // One QP per seed on each side (each seed is its own protection domain).
    assert_eq!(pair.imp.qps_created(), 2, "one QP per seed on the importer");
    assert_eq!(pair.exp.qps_created(), 2, "one QP per seed on the exporter");
    assert_eq!(pair.exporter.connections(), 2);
    println!(
        "16 readers: {} + {} batches on two QPs",
        pair.conn("one").batches(),
        pair.conn("two").batches()
    );
}

#[test]
fn a_peer_connected_for_one_seed_cannot_read_another_seeds_region() {
    let Some(env) = rdma_env("a_peer_connected_for_one_seed_cannot_read_another_seeds_region")
    else {
        return;
    };
    let dir = scratch("rdma-cross");
    let (pa, wa) = write_image(&dir, "a.img", 1 << 20);
    let (pb, wb) = write_image(&dir, "b.img", 1 << 20);
    let wb: Vec<u8> = wb.iter().map(|b| b ^ 0xa5).collect();
    std::fs::write(&pb, &wb).unwrap();
    let pair = Pair::new(&env);
    let ra = pair.export("a", &pa, 1 << 20);
    let rb = pair.export("b", &pb, 1 << 20);
    // A peer holding seed a's key has a's connection and region. It
    // guesses b's rkey and address exactly (the worst case) and reads
    // through a's connection.
    let legit = pair.source("a", ra, true);
    let mut buf = vec![0u8; 4096];
    legit.read(0, &mut buf).unwrap();
    assert_eq!(buf, wa[..4096]);
    let thief = RdmaSource::new(pair.conn("a"), rb, Duration::from_secs(5), None);
    let mut stolen = vec![0x11u8; 8192];
    let e = thief.read(4096, &mut stolen).unwrap_err().to_string();
    println!("a's connection reading b's region: {e}");
    assert!(e.contains("remote access"), "{e}");
    assert!(
        stolen.iter().all(|x| *x == 0x11),
        "bytes of seed b were delivered"
    );
    // b's own holder reads b; a's holder reads a again (reconnected).
    let b = pair.source("b", rb, true);
    b.read(4096, &mut buf).unwrap();
    assert_eq!(buf, wb[4096..8192]);
    let a = pair.source("a", ra, true);
    a.read(8192, &mut buf).unwrap();
    assert_eq!(buf, wa[8192..12288]);
}

/// A `forkd serve` with arbitrary arguments, stopped on drop.
struct Forkd {
    child: std::process::Child,
    dir: PathBuf,
}

impl Forkd {
    fn start(dir: &Path, args: &[&str]) -> Forkd {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("forkd.log")).unwrap();
        let child = forkd()
            .arg("serve")
            .arg("--socket")
            .arg(dir.join("sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .env(
                "FORKD_LOG",
                std::env::var("FORKD_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let f = Forkd {
            child,
            dir: dir.to_path_buf(),
        };
        let t = Instant::now();
        while f.ctl(&["node"]).0 != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "forkd did not come up: {}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        f
    }

    fn sock(&self) -> String {
        format!("unix:{}", self.dir.join("sock").display())
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        run_forkctl(&self.sock(), None, args)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("forkd.log")).unwrap_or_default()
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics:\n{text}"))
}

#[test]
fn twenty_children_on_node_two_page_over_rdma() {
    if !require_root("twenty_children_on_node_two_page_over_rdma") {
        return;
    }
    let Some(env) = rdma_env("twenty_children_on_node_two_page_over_rdma") else {
        return;
    };
    let dir = scratch("rdma-e2e");
    std::fs::write(dir.join("token"), "rdma-test-token\n").unwrap();
    let token = dir.join("token");
    let node = |i: u32, ip: &str, dev: &str| {
        let (grpc, pages, m) = (
            format!("{ip}:{}", free_port(ip)),
            format!("{ip}:{}", free_port(ip)),
            format!("{ip}:{}", free_port(ip)),
        );
        let f = Forkd::start(
            &dir.join(format!("n{i}")),
            &[
                "--listen",
                &grpc,
                "--page-listen",
                &pages,
                "--metrics",
                &m,
                "--token-file",
                token.to_str().unwrap(),
                "--transport",
                "rdma",
                "--rdma-device",
                dev,
                "--page-deadline-ms",
                "20000",
            ],
        );
        (f, grpc, m)
    };
    let (a, a_addr, _) = node(1, &env.ip1, &env.dev1);
    let (b, _, b_metrics) = node(2, &env.ip2, &env.dev2);
    let (_, info, _) = b.ctl(&["--json", "node"]);
    println!("node 2: {info}");
    assert!(info.contains(&env.dev2), "{info}");

    let seed_ref = |id: &str| {
        let (code, out, err) = a.ctl(&["seed", "ref", id, "--origin", &a_addr]);
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    };
    let spawn = |r: &str, count: u32, input: &str| -> Value {
        let p = dir.join(format!("in-{}", input.len()));
        std::fs::write(&p, input).unwrap();
        let (code, out, err) = b.ctl(&[
            "--json",
            "spawn",
            r,
            "--count",
            &count.to_string(),
            "--stdin",
            p.to_str().unwrap(),
        ]);
        assert_eq!(
            code,
            0,
            "spawn on node 2 failed: {err} {out}\nnode 1 log:\n{}\nnode 2 log:\n{}",
            a.log(),
            b.log()
        );
        serde_json::from_str(&out).unwrap()
    };

    // The Python (boto3) function, seeded on node 1.
    let id = python_seed(|x| a.ctl(x), BOTO_SERVER);
    let v = spawn(&seed_ref(&id), 20, "a\nb\n");
    assert_boto_children(&v, 20);

    // The C checksum program, seeded on node 1 from its pid: a second seed
    // of the same node, over a connection of its own (each seed is its own
    // protection domain there).
    let seeds = if has_avx2() { 2 } else { 1 };
    if has_avx2() {
        let (cid, checksum) = checksum_seed(|x| a.ctl(x));
        let v = spawn(&seed_ref(&cid), 20, "go\n");
        assert_checksum_children(&v, &checksum);
    } else {
        println!("note: the C part is left out: this CPU has no AVX2");
    }

    // The pages came over RDMA, none over TCP, on one connection per seed.
    let m = metrics(&b_metrics);
    let rdma_bytes = metric(&m, "forkd_page_bytes_total{transport=\"rdma\"}");
    let tcp_bytes = metric(&m, "forkd_page_bytes_total{transport=\"tcp\"}");
    println!("node 2: {rdma_bytes} bytes over RDMA, {tcp_bytes} over TCP");
    assert!(rdma_bytes > 0, "{m}");
    assert_eq!(tcp_bytes, 0, "{m}");
    assert_eq!(metric(&m, "forkd_rdma_peer_connections"), seeds, "{m}");
}

#[test]
fn auto_falls_back_to_tcp_with_a_reason_without_a_device() {
    let dir = scratch("rdma-auto");
    // Inside the RDMA VM the node has devices: name one that does not
    // exist, so this node has none to use.
    let mut args = vec!["--transport", "auto", "--page-listen", "127.0.0.1:0"];
    let in_vm = std::env::var("RF_RDMA_NODE1_DEV").is_ok();
    if in_vm {
        args.extend(["--rdma-device", "rf-no-such-device"]);
    }
    let f = Forkd::start(&dir, &args);
    let (code, out, err) = f.ctl(&["--json", "node"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let t = |name: &str| {
        v["transports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no {name} transport: {v}"))
            .clone()
    };
    let rdma = t("rdma");
    let tcp = t("tcp");
    println!("rdma: {rdma}\ntcp: {tcp}");
    assert_eq!(rdma["available"], false, "{rdma}");
    let why = rdma["reason"].as_str().unwrap();
    assert!(why.contains("unavailable"), "{why}");
    assert!(why.len() > "RDMA unavailable: ".len(), "no reason: {why}");
    if in_vm {
        assert!(why.contains("rf-no-such-device"), "{why}");
    }
    assert_eq!(tcp["available"], true, "{tcp}");
    assert!(
        tcp["reason"]
            .as_str()
            .unwrap()
            .contains("selected by --transport auto"),
        "{tcp}"
    );
    // And over gRPC: the selection itself.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = rt.block_on(async {
        let mut c = forkd::client::connect(&f.sock(), None).await.unwrap();
        c.node_info(forkd::pb::NodeInfoRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(n.transport, "auto");
    assert_eq!(n.transport_selected, "tcp");
    assert!(
        n.transport_reason.contains("unavailable"),
        "{}",
        n.transport_reason
    );

    // --transport rdma refuses to start without a device, saying why.
    let o = forkd()
        .args(["serve", "--socket"])
        .arg(dir.join("sock2"))
        .arg("--state-dir")
        .arg(dir.join("state2"))
        .args(["--transport", "rdma", "--rdma-device", "rf-no-such-device"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--transport rdma") && e.contains("RDMA unavailable"),
        "{e}"
    );
}
