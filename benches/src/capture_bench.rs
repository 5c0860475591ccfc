//! Capture benchmark: parent pause and full capture time for a warm Python
//! process (boto3 imported, an S3 client built), beside a local `os.fork()`
//! of the same process, in the same run.
//!
//! Run: `cargo run --release -p remotefork-benches --bin capture-bench -- [--iterations N] [--json FILE]`
//! (as root).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use common::{python, wait_blocked_in_read};
use remotefork::capture::{capture, CaptureOptions};
use serde_json::json;

const WARM_PYTHON: &str = r#"
import os, sys, time
import boto3
client = boto3.client('s3', region_name='us-east-1')
rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]
print('ready', rss, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == 'fork':
        t = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print(time.perf_counter_ns() - t, flush=True)
    elif cmd == 'quit':
        break
"#;

struct Args {
    iterations: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        iterations: 10,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--iterations" => {
                a.iterations = it.next().context("--iterations needs a value")?.parse()?
            }
            "--json" => a.json = Some(it.next().context("--json needs a file")?.into()),
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other:?} (use --iterations N, --json FILE)"),
        }
    }
    Ok(a)
}

/// (median, p90, min, max) in milliseconds.
fn summary(mut ns: Vec<u64>) -> (f64, f64, f64, f64) {
    ns.sort_unstable();
    let ms = |v: u64| v as f64 / 1e6;
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize];
    (ms(at(0.5)), ms(at(0.9)), ms(ns[0]), ms(ns[ns.len() - 1]))
}

fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: capture-bench needs root (ptrace)");
        return Ok(());
    }
    let py = python()?;
    let mut child = Command::new(&py)
        .args(["-c", WARM_PYTHON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the warm Python")?;
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if !line.starts_with("ready") {
        bail!("warm Python did not start (is boto3 installed?): {line:?}");
    }
    let rss_kb: u64 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);

    let dir = std::env::temp_dir().join(format!("rf-capture-bench-{}", std::process::id()));
    // As forkd captures: mapped files are copied once into a store the
    // node's seeds share (the first capture pays for the copies; it is
    // printed apart).
    let store = dir.with_extension("files");
    let _ = std::fs::remove_dir_all(&store);
    let opts = CaptureOptions {
        file_store: Some(store.clone()),
        ..Default::default()
    };
    let first = {
        wait_blocked_in_read(pid)?;
        let _ = std::fs::remove_dir_all(&dir);
        capture(pid, &dir, &opts)?.stats.capture_ns
    };
    let (mut pause, mut reap, mut total, mut stored) = (vec![], vec![], vec![], 0u64);
    for _ in 0..args.iterations {
        wait_blocked_in_read(pid)?;
        let _ = std::fs::remove_dir_all(&dir);
        let d = capture(pid, &dir, &opts)?;
        pause.push(d.stats.pause_ns);
        reap.push(d.stats.reap_pause_ns);
        total.push(d.stats.capture_ns);
        stored = d.image_bytes;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&store);
    println!(
        "first capture (copies the mapped files into the store): {:.2} ms",
        first as f64 / 1e6
    );
    let mut fork = vec![];
    for _ in 0..args.iterations {
        writeln!(stdin, "fork")?;
        line.clear();
        stdout.read_line(&mut line)?;
        fork.push(
            line.trim()
                .parse::<u64>()
                .with_context(|| format!("fork timing {line:?}"))?,
        );
    }
    writeln!(stdin, "quit")?;
    child.wait()?;

    let cmd = "cargo run --release -p remotefork-benches --bin capture-bench";
    println!("# {cmd} -- --iterations {}", args.iterations);
    println!(
        "# warm Python (boto3 S3 client), RSS {:.1} MiB, image {:.1} MiB",
        rss_kb as f64 / 1024.0,
        stored as f64 / (1 << 20) as f64
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "metric (ms)", "median", "p90", "min", "max"
    );
    let rows = [
        ("parent pause (clone)", summary(pause.clone())),
        ("parent pause (reap clone)", summary(reap.clone())),
        ("full capture (to image on disk)", summary(total.clone())),
        ("baseline: local os.fork()+exit+wait", summary(fork.clone())),
    ];
    for (name, (m, p90, lo, hi)) in rows {
        println!("{name:<34} {m:>9.2} {p90:>9.2} {lo:>9.2} {hi:>9.2}");
    }
    let (pm, ..) = summary(pause.clone());
    let (cm, ..) = summary(total.clone());
    let (fm, ..) = summary(fork.clone());
    println!("goals: pause < 10 ms: {} ({pm:.2}); capture < 50 ms: {} ({cm:.2}); pause / local fork = {:.2}", pm < 10.0, cm < 50.0, pm / fm);
    if let Some(path) = args.json {
        let v = json!({
            "command": cmd,
            "iterations": args.iterations,
            "rss_bytes": rss_kb * 1024,
            "image_bytes": stored,
            "pause_ns": pause,
            "reap_pause_ns": reap,
            "capture_ns": total,
            "local_fork_ns": fork,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
