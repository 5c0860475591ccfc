//! Remote fork benchmark: a seed of the warm boto3 Python on node A, children
//! on node B paging over TCP (prefetch off / window / recorded), beside a
//! lazy child on A itself, a local `os.fork()` and a cold start, in one run.
//! Each method is timed from the request until the child's answer arrives
//! (the daemon streams a child's first output as it comes).
//!
//! Two forkd daemons on loopback, started from the release build:
//! `cargo build --release -p forkd && cargo run --release -p remotefork-benches --bin remote-bench -- [--iterations N]`
//! (as root).

mod common;

use std::io::{BufRead, BufReader, Write};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{python, SERVER};
use forkd::pb;

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median_ms(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64 / 1e6
}

fn metric(port: u16, name: &str) -> u64 {
    forkd::client::scrape_metric(&format!("127.0.0.1:{port}"), name)
}

async fn spawn_one(
    c: &mut forkd::client::Client,
    seed: pb::SeedRef,
    origin: &str,
    prefetch: &str,
    no_template: bool,
    req: &str,
) -> anyhow::Result<u64> {
    let t = Instant::now();
    let r = pb::SpawnRequest {
        seed: Some(seed),
        count: 1,
        stdin: format!("{req}\n").into_bytes(),
        prefetch: prefetch.into(),
        origin: origin.into(),
        no_template,
        ..Default::default()
    };
    let mut s = c
        .spawn(r)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    let mut first = None;
    while let Some(ev) = s
        .message()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
    {
        match ev.kind {
            Some(pb::instance_event::Kind::Output(o)) => {
                first = Some((t.elapsed().as_nanos() as u64, o.since_spawn_ms));
            }
            Some(pb::instance_event::Kind::Exited(x)) => {
                let out = String::from_utf8_lossy(&x.stdout);
                if x.exit_code != 0 || !out.contains(&format!("\"req\": \"{req}\"")) {
                    bail!("child failed: {x:?}");
                }
                // Time to first response: from the request to its answer.
                return first.map(|f| f.0).context("no output event");
            }
            Some(pb::instance_event::Kind::Failed(f)) => bail!("spawn failed: {}", f.reason),
            _ => {}
        }
    }
    bail!("no exit event")
}

fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let mut iterations = 10usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iterations" => iterations = it.next().context("--iterations N")?.parse()?,
            "--bench" => {}
            o => bail!("unknown argument {o:?}"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: remote-bench needs root");
        return Ok(());
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("forkd");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p forkd` first",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("rf-remote-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("token"), "bench-token\n")?;
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (grpc_a, page_a, metrics_b) = (free()?, free()?, free()?);
    let start = |name: &str, extra: Vec<String>| -> anyhow::Result<Daemon> {
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--socket")
            .arg(dir.join(format!("{name}.sock")))
            .arg("--state-dir")
            .arg(dir.join(name));
        cmd.arg("--token-file")
            .arg(dir.join("token"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Daemon(cmd.spawn()?))
    };
    let _a = start(
        "a",
        vec![
            "--listen".into(),
            format!("127.0.0.1:{grpc_a}"),
            "--page-listen".into(),
            format!("127.0.0.1:{page_a}"),
        ],
    )?;
    let _b = start(
        "b",
        vec!["--metrics".into(), format!("127.0.0.1:{metrics_b}")],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let py = python()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sock = |n: &str| format!("unix:{}", dir.join(format!("{n}.sock")).display());
    let origin = format!("127.0.0.1:{grpc_a}");

    // Cold start.
    let mut cold = Vec::new();
    for i in 0..iterations.min(5) {
        let t = Instant::now();
        let mut c = Command::new(&py)
            .args(["-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        writeln!(c.stdin.take().context("stdin")?, "cold-{i}")?;
        let mut r = BufReader::new(c.stdout.take().context("stdout")?);
        let mut out = String::new();
        r.read_line(&mut out)?; // ready
        out.clear();
        r.read_line(&mut out)?;
        cold.push(t.elapsed().as_nanos() as u64);
        let _ = c.wait();
        if !out.contains(&format!("cold-{i}")) {
            bail!("cold start answered {out:?}");
        }
    }
    // Local fork of the warm process (the child answers and exits).
    let mut warm = Command::new(&py)
        .args(["-c", SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut win = warm.stdin.take().context("stdin")?;
    let mut wout = BufReader::new(warm.stdout.take().context("stdout")?);
    let mut line = String::new();
    wout.read_line(&mut line)?;
    let mut fork = Vec::new();
    for i in 0..iterations {
        let t = Instant::now();
        writeln!(win, "fork f{i}")?;
        line.clear();
        wout.read_line(&mut line)?; // the answer
        fork.push(t.elapsed().as_nanos() as u64);
        line.clear();
        wout.read_line(&mut line)?; // "done": the child has exited
    }
    drop(win);
    let _ = warm.wait();

    let report = rt.block_on(async {
        let mut a = forkd::client::connect(&sock("a"), None).await?;
        let mut b = forkd::client::connect(&sock("b"), None).await?;
        let seed = a
            .create_seed(pb::CreateSeedRequest {
                source: Some(pb::create_seed_request::Source::Command(pb::StartCommand { argv: vec![py.clone(), "-c".into(), SERVER.into()], ready_line: "ready".into(), ready_timeout_ms: 60_000, cwd: String::new(), env: Default::default() })),
                name: "bench".into(),
                owner: String::new(),
                drop_unsupported_fds: false,
            })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?
            .into_inner();
        let r = pb::SeedRef { id: seed.id.clone(), key: seed.key.clone() };
        let mut rows: Vec<(String, Vec<u64>, String)> = Vec::new();
        for (no_template, how) in [(true, "from scratch"), (false, "from template")] {
            // The first child builds the template (or records the working set).
            spawn_one(&mut a, r.clone(), "", "window", no_template, "local-first").await?;
            let mut local = Vec::new();
            for i in 0..iterations {
                local.push(spawn_one(&mut a, r.clone(), "", "window", no_template, &format!("local-{i}")).await?);
            }
            rows.push((format!("local lazy child on A, window, {how}"), local, String::new()));
        }
        for (no_template, how, prefetch) in [
            (true, "from scratch", "off"),
            (true, "from scratch", "window"),
            (true, "from scratch", "recorded"),
            (false, "from template", "off"),
            (false, "from template", "window"),
            (false, "from template", "recorded"),
        ] {
            let (b0, rt0) = (metric(metrics_b, "forkd_seed_bytes_fetched_total"), metric(metrics_b, "forkd_seed_fetch_round_trips_total"));
            let first = spawn_one(&mut b, r.clone(), &origin, prefetch, no_template, &format!("{prefetch}-first")).await?;
            let (b1, rt1) = (metric(metrics_b, "forkd_seed_bytes_fetched_total"), metric(metrics_b, "forkd_seed_fetch_round_trips_total"));
            let mut v = Vec::new();
            for i in 0..iterations {
                v.push(spawn_one(&mut b, r.clone(), &origin, prefetch, no_template, &format!("{prefetch}-{i}")).await?);
            }
            let (b2, rt2) = (metric(metrics_b, "forkd_seed_bytes_fetched_total"), metric(metrics_b, "forkd_seed_fetch_round_trips_total"));
            let note = format!(
                "first child {:.1} ms: {:.1} MiB in {} round trips; later children {:.1} KiB in {:.1} round trips each",
                first as f64 / 1e6,
                (b1 - b0) as f64 / 1048576.0,
                rt1 - rt0,
                (b2 - b1) as f64 / 1024.0 / iterations as f64,
                (rt2 - rt1) as f64 / iterations as f64
            );
            rows.push((format!("remote child on B over TCP, {prefetch}, {how}"), v, note));
        }
        anyhow::Ok(rows)
    })?;
    let _ = std::fs::remove_dir_all(&dir);

    let (c, f) = (median_ms(cold.clone()), median_ms(fork.clone()));
    println!("# cargo build --release -p forkd && cargo run --release -p remotefork-benches --bin remote-bench -- --iterations {iterations}");
    println!("# warm Python (boto3 S3 client); two forkd on loopback; time from the request to the child's answer");
    println!("{:<58} {:>9}", "method", "median ms");
    println!(
        "{:<58} {:>9.2}",
        format!("cold start (exec), n={}", cold.len()),
        c
    );
    println!(
        "{:<58} {:>9.2}",
        format!("local os.fork() of the warm process, n={iterations}"),
        f
    );
    for (name, v, note) in &report {
        let m = median_ms(v.clone());
        println!("{name:<58} {m:>9.2}   {note}");
    }
    for how in ["from scratch", "from template"] {
        let recorded = report
            .iter()
            .find(|(n, _, _)| n.starts_with("remote") && n.ends_with(&format!("recorded, {how}")))
            .map(|(_, v, _)| median_ms(v.clone()))
            .unwrap_or(f64::NAN);
        println!(
            "{how}: remote recorded / local fork = {:.2} (goal <= 3); cold start / remote recorded = {:.1}x (goal >= 50x)",
            recorded / f,
            c / recorded
        );
    }
    Ok(())
}
