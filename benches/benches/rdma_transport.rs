//! `rdma-transport`: reading a seed's pages from another node, by RDMA
//! READ and, for comparison, over the TCP page protocol on loopback.
//!
//! Reads of 4 KiB and 64 KiB ranges, 1, 8 or 32 ranges per batch (one
//! `read_many`: one doorbell of READ work requests, or one TCP request).
//! RDMA needs two devices: `RF_RDMA_NODE1_DEV` (exporter) and
//! `RF_RDMA_NODE2_DEV` (importer), as `soft-rdma-tests/run --bench` sets
//! them; both may name the same device. Without them the RDMA group is
//! skipped with the reason. Under the Soft-RoCE VM (TCG) the figures show
//! relative costs only, not performance. The TCP side talks to a minimal
//! in-process server of the same wire protocol (`transport::wire`), so the
//! figure is the client's and the protocol's cost, not forkd's scheduling.
//!
//! Run: `cargo bench -p remotefork-benches --bench rdma-transport`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use remotefork::transport::rdma::{self, Connection, Exporter, RdmaNode, RdmaSource};
use remotefork::transport::tcp::TcpSource;
use remotefork::transport::wire;
use remotefork::transport::PageSource;

const IMAGE: usize = 64 << 20;
const SIZES: [usize; 2] = [4 << 10, 64 << 10];
const BATCHES: [usize; 3] = [1, 8, 32];
const SEED_ID: &str = "0123456789abcdef";
const KEY: &str = "00112233445566778899aabbccddeeff";

fn image() -> PathBuf {
    let p = std::env::temp_dir().join(format!("rf-bench-image-{}", std::process::id()));
    let data: Vec<u8> = (0..IMAGE)
        .map(|i| (i / 4096) as u8 ^ (i % 253) as u8)
        .collect();
    std::fs::write(&p, data).expect("writing the bench image");
    p
}

/// Spread-out offsets for one batch of `n` ranges of `len` bytes.
fn offsets(round: u64, n: usize, len: usize) -> Vec<u64> {
    let slots = (IMAGE / len) as u64;
    (0..n as u64)
        .map(|i| ((round * 7919 + i * 104729) % slots) * len as u64)
        .collect()
}

/// The destination: a shared mapping standing in for the seed cache.
struct Dest(*mut u8, usize);
// SAFETY: plain memory, used by one thread at a time.
unsafe impl Send for Dest {}

impl Dest {
    fn new(len: usize) -> Dest {
        // SAFETY: a fresh shared anonymous mapping, no MAP_FIXED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Dest(p.cast(), len)
    }

    /// `n` disjoint slices of `len` bytes.
    fn slices(&mut self, n: usize, len: usize) -> Vec<&mut [u8]> {
        assert!(n * len <= self.1);
        // SAFETY: the mapping is ours for self's lifetime and `&mut self`
        // makes these the only references into it.
        let all = unsafe { std::slice::from_raw_parts_mut(self.0, self.1) };
        all.chunks_mut(len).take(n).collect()
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; no slice outlives self.
        unsafe { libc::munmap(self.0.cast(), self.1) };
    }
}

fn run_batches(c: &mut Criterion, group: &str, src: &dyn PageSource, dest: &mut Dest) {
    let mut g = c.benchmark_group(group);
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for len in SIZES {
        for n in BATCHES {
            g.throughput(Throughput::Bytes((len * n) as u64));
            let mut round = 0u64;
            g.bench_with_input(
                BenchmarkId::new(format!("{}KiB", len >> 10), format!("batch{n}")),
                &(len, n),
                |b, &(len, n)| {
                    b.iter(|| {
                        round += 1;
                        let offs = offsets(round, n, len);
                        let mut reqs: Vec<(u64, &mut [u8])> =
                            offs.into_iter().zip(dest.slices(n, len)).collect();
                        src.read_many(&mut reqs).expect("read_many");
                    })
                },
            );
        }
    }
    g.finish();
}

fn rdma(c: &mut Criterion, path: &Path) {
    let (Ok(d1), Ok(d2)) = (
        std::env::var("RF_RDMA_NODE1_DEV"),
        std::env::var("RF_RDMA_NODE2_DEV"),
    ) else {
        let why = rdma::probe(None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| {
                "a device, but RF_RDMA_NODE1_DEV/RF_RDMA_NODE2_DEV are not set".into()
            });
        println!("SKIPPED: rdma-transport/rdma: no RDMA device ({why})");
        return;
    };
    let (exp, imp) = match (RdmaNode::open(Some(&d1)), RdmaNode::open(Some(&d2))) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            println!("SKIPPED: rdma-transport/rdma: no RDMA device ({e})");
            return;
        }
    };
    let exporter = Arc::new(Exporter::new(exp.clone(), 4));
    let seed = exp.export_file(path, IMAGE as u64).expect("export");
    let region = seed.region();
    let conn = Connection::new(imp, "bench-node1");
    conn.connect_with(|local| {
        exporter
            .accept(conn.id(), local, &seed)
            .map(|q| (q, ()))
            .map_err(|e| e.into())
    })
    .expect("connect");
    // Declared before the source, so dropped after it, also on a panic.
    let mut dest = Dest::new(2 << 20);
    let src = RdmaSource::new(conn, region, Duration::from_secs(30), None);
    println!("rdma-transport: {d2} -> {d1} (TCG timings are not performance figures)");
    // SAFETY: `dest` stays mapped and writable until after `src` is
    // dropped (declaration order, and the explicit drops below).
    unsafe { src.attach_destination(dest.0, dest.1) };
    run_batches(c, "rdma", &src, &mut dest);
    // The source (and its registrations of `dest`) must go before `dest`.
    drop(src);
    drop(dest);
    drop(seed);
}

/// A minimal page server of the TCP protocol for one seed.
fn serve(listener: TcpListener, path: PathBuf) {
    for s in listener.incoming() {
        let Ok(mut s) = s else { continue };
        let file = std::fs::File::open(&path).expect("image");
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut hello = [0u8; wire::HELLO_LEN];
            if s.read_exact(&mut hello).is_err() || wire::parse_hello(&hello).is_err() {
                return;
            }
            if s.write_all(&wire::hello_answer(
                wire::hello_status::OK,
                IMAGE as u64,
                "",
            ))
            .is_err()
            {
                return;
            }
            let mut head = [0u8; 8];
            while s.read_exact(&mut head).is_ok() {
                let id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
                let mut body = vec![0u8; n * 12];
                if s.read_exact(&mut body).is_err() {
                    return;
                }
                let ranges: Vec<(u64, u32)> = body
                    .chunks_exact(12)
                    .map(|c| {
                        (
                            u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
                            u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4])),
                        )
                    })
                    .collect();
                let total: usize = ranges.iter().map(|r| r.1 as usize).sum();
                let mut data = vec![0u8; total];
                let mut at = 0;
                for (o, l) in &ranges {
                    let _ = file.read_exact_at(&mut data[at..at + *l as usize], *o);
                    at += *l as usize;
                }
                if s.write_all(&wire::response_header(
                    id,
                    wire::read_status::OK,
                    total as u32,
                ))
                .and_then(|()| s.write_all(&data))
                .is_err()
                {
                    return;
                }
            }
        });
    }
}

fn tcp(c: &mut Criterion, path: &Path) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let p = path.to_path_buf();
    std::thread::spawn(move || serve(l, p));
    let (src, _) =
        TcpSource::connect(&addr, SEED_ID, KEY, Duration::from_secs(30)).expect("connect");
    let mut dest = Dest::new(2 << 20);
    run_batches(c, "tcp-loopback", &src, &mut dest);
    let _ = TcpStream::connect(&addr);
}

fn benches(c: &mut Criterion) {
    let path = image();
    rdma(c, &path);
    tcp(c, &path);
    let _ = std::fs::remove_file(&path);
}

criterion_group!(rdma_transport, benches);
criterion_main!(rdma_transport);
