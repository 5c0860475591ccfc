//! Restore benchmark: time until a child answers its first request, for the
//! warm boto3 Python, three ways in one run: cold start (exec until it
//! answers), local `os.fork()` of the warm process (the child answers), and
//! eager restore from a seed of it.
//!
//! Run: `cargo run --release -p remotefork-benches --bin restore-bench -- [--iterations N] [--cold N] [--json FILE]`
//! (as root).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{python, wait_blocked_in_read, SERVER};
use remotefork::capture::{capture, CaptureOptions};
use remotefork::image::SeedImage;
use remotefork::pager::Prefetch;
use remotefork::restore::{Io, Restorer, SpawnOptions};
use serde_json::json;

/// (prefetch mode, time to first answer, time to running, faults) per child.
type LazyRow = (&'static str, Vec<u64>, Vec<u64>, Vec<u64>);

struct Args {
    children: usize,
    iterations: usize,
    cold: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        children: 100,
        iterations: 20,
        cold: 5,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--iterations" => {
                a.iterations = it.next().context("--iterations needs a value")?.parse()?
            }
            "--children" => a.children = it.next().context("--children needs a value")?.parse()?,
            "--cold" => a.cold = it.next().context("--cold needs a value")?.parse()?,
            "--json" => a.json = Some(it.next().context("--json needs a file")?.into()),
            "--bench" => {}
            other => {
                bail!("unknown argument {other:?} (use --iterations N, --cold N, --json FILE)")
            }
        }
    }
    Ok(a)
}

fn median_ms(mut ns: Vec<u64>) -> f64 {
    ns.sort_unstable();
    ns[ns.len() / 2] as f64 / 1e6
}

fn p90_ms(mut ns: Vec<u64>) -> f64 {
    ns.sort_unstable();
    ns[((ns.len() - 1) as f64 * 0.9).round() as usize] as f64 / 1e6
}

fn check_answer(line: &str, req: &str) -> anyhow::Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("bad answer {line:?}"))?;
    if v["req"] != req || v["region"] != "us-east-1" {
        bail!("wrong answer {line:?} to {req:?}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: restore-bench needs root (ptrace)");
        return Ok(());
    }
    let py = python()?;

    // Cold start: exec until the first answer.
    let mut cold = Vec::new();
    for i in 0..args.cold {
        let t = Instant::now();
        let mut c = Command::new(&py)
            .args(["-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let req = format!("cold-{i}");
        writeln!(c.stdin.as_mut().context("stdin")?, "{req}")?;
        let mut out = BufReader::new(c.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?; // ready
        line.clear();
        out.read_line(&mut line)?;
        cold.push(t.elapsed().as_nanos() as u64);
        check_answer(&line, &req)?;
        drop(c.stdin.take());
        c.wait()?;
    }

    // The warm parent.
    let mut parent = Command::new(&py)
        .args(["-c", SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let ppid = parent.id() as i32;
    let mut pin = parent.stdin.take().context("stdin")?;
    let mut pout = BufReader::new(parent.stdout.take().context("stdout")?);
    let mut line = String::new();
    pout.read_line(&mut line)?;
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{ppid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);

    // Local fork: the forked child answers.
    let mut fork = Vec::new();
    for i in 0..args.iterations {
        let req = format!("fork-{i}");
        let t = Instant::now();
        writeln!(pin, "fork {req}")?;
        line.clear();
        pout.read_line(&mut line)?;
        fork.push(t.elapsed().as_nanos() as u64);
        check_answer(&line, &req)?;
        line.clear();
        pout.read_line(&mut line)?; // "done": the forked child has exited
    }

    // Eager restore from a seed of the warm parent.
    wait_blocked_in_read(ppid)?;
    let dir = std::env::temp_dir().join(format!("rf-restore-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let desc = capture(ppid, &dir, &CaptureOptions::default())?;
    writeln!(pin, "quit")?;
    parent.wait()?;
    let t = Instant::now();
    let restorer = Restorer::new(SeedImage::open(&dir)?)?;
    let setup_ns = t.elapsed().as_nanos() as u64;
    let run =
        |opts: &SpawnOptions, req: &str, line: &mut String| -> anyhow::Result<(u64, u64, u64)> {
            let (in_r, mut in_w) = std::io::pipe()?;
            let (out_r, out_w) = std::io::pipe()?;
            writeln!(in_w, "{req}")?;
            drop(in_w);
            let t = Instant::now();
            let child = restorer.spawn(Io::fd(in_r), Io::fd(out_w), Io::Inherit, opts)?;
            let mut out = BufReader::new(out_r);
            line.clear();
            out.read_line(line)?;
            let ns = t.elapsed().as_nanos() as u64;
            check_answer(line, req)?;
            let v: serde_json::Value = serde_json::from_str(line.trim())?;
            if v["pid"] != child.pid {
                bail!(
                    "restored child reports pid {} but is {}",
                    v["pid"],
                    child.pid
                );
            }
            kernel_helpers_wait(child.pid)?;
            let faults = match &child.stats {
                Some(s) => {
                    s.wait_finished(Duration::from_secs(60));
                    if let Some(r) = s.killed_reason() {
                        bail!("child killed: {r}");
                    }
                    s.faults.load(std::sync::atomic::Ordering::Relaxed)
                }
                None => 0,
            };
            Ok((ns, child.restore_ns, faults))
        };
    let mut eager = Vec::new();
    let mut restore_only = Vec::new();
    let mut lazy: Vec<LazyRow> = Vec::new();
    for i in 0..args.iterations {
        let (ns, r, _) = run(
            &SpawnOptions {
                lazy: false,
                prefetch: Prefetch::Off,
                share: true,
            },
            &format!("eager-{i}"),
            &mut line,
        )?;
        eager.push(ns);
        restore_only.push(r);
    }
    for (name, prefetch) in [
        ("off", Prefetch::Off),
        ("window", Prefetch::Window),
        ("recorded", Prefetch::Recorded),
    ] {
        if prefetch == Prefetch::Recorded {
            // One child records the working set for the rest.
            run(
                &SpawnOptions {
                    lazy: true,
                    prefetch,
                    share: true,
                },
                "record",
                &mut line,
            )?;
        }
        let (mut t, mut r, mut f) = (vec![], vec![], vec![]);
        for i in 0..args.iterations {
            let (ns, rr, faults) = run(
                &SpawnOptions {
                    lazy: true,
                    prefetch,
                    share: true,
                },
                &format!("lazy-{name}-{i}"),
                &mut line,
            )?;
            t.push(ns);
            r.push(rr);
            f.push(faults);
        }
        lazy.push((name, t, r, f));
    }

    // Node memory for many concurrent children: each answers one request
    // and stays alive (its stdin open) while PSS is summed.
    let mut alive = Vec::new();
    for i in 0..args.children {
        let (in_r, mut in_w) = std::io::pipe()?;
        let (out_r, out_w) = std::io::pipe()?;
        writeln!(in_w, "mem-{i}")?;
        let child = restorer.spawn(
            Io::fd(in_r),
            Io::fd(out_w),
            Io::Inherit,
            &SpawnOptions {
                lazy: true,
                prefetch: Prefetch::Recorded,
                share: true,
            },
        )?;
        let mut out = BufReader::new(out_r);
        line.clear();
        out.read_line(&mut line)?;
        check_answer(&line, &format!("mem-{i}"))?;
        alive.push((child.pid, in_w, out));
    }
    let mut pss_kb = 0u64;
    for (pid, _, _) in &alive {
        pss_kb += std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    for (pid, in_w, _) in alive {
        drop(in_w);
        kernel_helpers_wait(pid)?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (c, f, e) = (
        median_ms(cold.clone()),
        median_ms(fork.clone()),
        median_ms(eager.clone()),
    );
    let cmd = "cargo run --release -p remotefork-benches --bin restore-bench";
    println!(
        "# {cmd} -- --iterations {} --cold {} --children {}",
        args.iterations, args.cold, args.children
    );
    println!(
        "# warm Python (boto3 S3 client); seed: {} mappings, {:.1} MiB stored",
        desc.vmas.len(),
        desc.image_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "{:<46} {:>9} {:>9}",
        "time to first answer (ms)", "median", "p90"
    );
    println!(
        "{:<46} {:>9.2} {:>9.2}",
        format!("cold start (exec), n={}", args.cold),
        c,
        p90_ms(cold.clone())
    );
    println!(
        "{:<46} {:>9.2} {:>9.2}",
        format!("local os.fork() of the warm process, n={}", args.iterations),
        f,
        p90_ms(fork.clone())
    );
    println!(
        "{:<46} {:>9.2} {:>9.2}",
        format!("eager restore from the seed, n={}", args.iterations),
        e,
        p90_ms(eager.clone())
    );
    println!(
        "{:<46} {:>9.2} {:>9.2}",
        "  of which restore until running",
        median_ms(restore_only.clone()),
        p90_ms(restore_only.clone())
    );
    println!(
        "{:<46} {:>9.2}",
        "  one-time setup per image (checks, mmap)",
        setup_ns as f64 / 1e6
    );
    for (name, t, r, f) in &lazy {
        let mut fs = f.clone();
        fs.sort_unstable();
        println!(
            "{:<46} {:>9.2} {:>9.2}   (running after {:.2} ms; faults/child median {})",
            format!("lazy restore, prefetch {name}, n={}", args.iterations),
            median_ms(t.clone()),
            p90_ms(t.clone()),
            median_ms(r.clone()),
            fs[fs.len() / 2]
        );
    }
    let lazy_med = |n: &str| {
        lazy.iter()
            .find(|x| x.0 == n)
            .map(|x| median_ms(x.1.clone()))
            .unwrap_or(0.0)
    };
    let faults_med = |n: &str| {
        lazy.iter()
            .find(|x| x.0 == n)
            .map(|x| {
                let mut f = x.3.clone();
                f.sort_unstable();
                f[f.len() / 2]
            })
            .unwrap_or(0)
    };
    println!(
        "memory: {} concurrent lazy children use {:.1} MiB PSS in all; {} x parent RSS = {:.1} MiB ({:.0}%, goal < 25%)",
        args.children,
        pss_kb as f64 / 1024.0,
        args.children,
        (rss_kb * args.children as u64) as f64 / 1024.0,
        100.0 * pss_kb as f64 / (rss_kb * args.children as u64).max(1) as f64
    );
    println!(
        "lazy recorded / local fork = {:.2} (goal <= 2); faults recorded vs off: {} vs {} ({:.1}% fewer, goal >= 90%)",
        lazy_med("recorded") / f,
        faults_med("recorded"),
        faults_med("off"),
        100.0 * (1.0 - faults_med("recorded") as f64 / faults_med("off").max(1) as f64)
    );
    println!(
        "cold start / lazy recorded = {:.1}x faster; cold start / eager = {:.1}x faster",
        c / lazy_med("recorded"),
        c / e
    );
    println!("ratios: cold start / eager restore = {:.1}x faster (goal >= 20x); eager restore / local fork = {:.2}", c / e, e / f);
    if let Some(path) = args.json {
        let v = json!({
            "command": cmd,
            "cold_start_ns": cold, "local_fork_ns": fork, "eager_restore_ns": eager,
            "restore_until_running_ns": restore_only, "setup_ns": setup_ns,
            "image_bytes": desc.image_bytes, "vmas": desc.vmas.len(),
            "lazy": lazy.iter().map(|(n, t, r, f)| json!({"prefetch": n, "first_answer_ns": t, "running_ns": r, "faults": f})).collect::<Vec<_>>(),
            "children": args.children, "children_pss_kb": pss_kb, "parent_rss_kb": rss_kb,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Reap a restored child (it is our child: the husk was forked here).
fn kernel_helpers_wait(pid: i32) -> anyhow::Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid
            || (r == -1 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return Ok(());
        }
    }
}
