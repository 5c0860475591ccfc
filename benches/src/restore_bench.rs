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
use remotefork::SpawnOptions;

use serde_json::json;

/// One way of starting children, measured.
struct Row {
    name: &'static str,
    template: bool,
    /// The first child's time to answer (it builds the template).
    first_ns: Option<u64>,
    /// Per child: time to first answer, time to running, faults.
    answer: Vec<u64>,
    running: Vec<u64>,
    faults: Vec<u64>,
}

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
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
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
    let restorer = remotefork::Seed::new(SeedImage::open(&dir)?)?;
    let setup_ns = t.elapsed().as_nanos() as u64;
    let run =
        |opts: &SpawnOptions, req: &str, line: &mut String| -> anyhow::Result<(u64, u64, u64)> {
            let (in_r, mut in_w) = std::io::pipe()?;
            let (out_r, out_w) = std::io::pipe()?;
            writeln!(in_w, "{req}")?;
            drop(in_w);
            let t = Instant::now();
            let mut child = restorer.spawn(
                remotefork::Stdio::Fd(in_r.into()),
                remotefork::Stdio::Fd(out_w.into()),
                remotefork::Stdio::Inherit,
                opts,
            )?;
            let mut out = BufReader::new(out_r);
            line.clear();
            out.read_line(line)?;
            let ns = t.elapsed().as_nanos() as u64;
            check_answer(line, req)?;
            let v: serde_json::Value = serde_json::from_str(line.trim())?;
            if v["pid"] != child.pid() {
                bail!(
                    "restored child reports pid {} but is {}",
                    v["pid"],
                    child.pid()
                );
            }
            child.wait()?;
            let faults = match child.stats() {
                Some(s) => {
                    s.wait_finished(Duration::from_secs(60));
                    if let Some(r) = s.killed_reason() {
                        bail!("child killed: {r}");
                    }
                    s.faults.load(std::sync::atomic::Ordering::Relaxed)
                }
                None => 0,
            };
            Ok((ns, child.restore_time().as_nanos() as u64, faults))
        };
    // Every way of starting a child, in this order: from scratch first (a
    // lazy one records the working set before the `recorded` rows), then
    // forked from the node template (its first child builds the template,
    // timed apart).
    let modes: [(&str, bool, Prefetch, bool); 8] = [
        ("eager", false, Prefetch::Off, false),
        ("lazy off", true, Prefetch::Off, false),
        ("lazy window", true, Prefetch::Window, false),
        ("lazy recorded", true, Prefetch::Recorded, false),
        ("eager", false, Prefetch::Off, true),
        ("lazy off", true, Prefetch::Off, true),
        ("lazy window", true, Prefetch::Window, true),
        ("lazy recorded", true, Prefetch::Recorded, true),
    ];
    let mut rows: Vec<Row> = Vec::new();
    for (name, lazy, prefetch, template) in modes {
        let opts = SpawnOptions::default()
            .lazy(lazy)
            .prefetch(prefetch)
            .share(true)
            .template(template);
        let mut first_ns = None;
        if template {
            first_ns = Some(run(&opts, "first", &mut line)?.0);
        } else if prefetch == Prefetch::Recorded {
            // One child records the working set for the rest.
            run(&opts, "record", &mut line)?;
        }
        let mut row = Row {
            name,
            template,
            first_ns,
            answer: vec![],
            running: vec![],
            faults: vec![],
        };
        for i in 0..args.iterations {
            let (ns, r, faults) = run(&opts, &format!("{name}-{template}-{i}"), &mut line)?;
            row.answer.push(ns);
            row.running.push(r);
            row.faults.push(faults);
        }
        rows.push(row);
    }

    // Node memory for many concurrent children: each answers one request
    // and stays alive (its stdin open) while PSS is summed (templates'
    // included: their pages are what the children share).
    let mut memory = Vec::new();
    for template in [false, true] {
        let mut alive = Vec::new();
        for i in 0..args.children {
            let (in_r, mut in_w) = std::io::pipe()?;
            let (out_r, out_w) = std::io::pipe()?;
            writeln!(in_w, "mem-{i}")?;
            let child = restorer.spawn(
                remotefork::Stdio::Fd(in_r.into()),
                remotefork::Stdio::Fd(out_w.into()),
                remotefork::Stdio::Inherit,
                &SpawnOptions::default()
                    .lazy(true)
                    .prefetch(Prefetch::Recorded)
                    .share(true)
                    .template(template),
            )?;
            let mut out = BufReader::new(out_r);
            line.clear();
            out.read_line(&mut line)?;
            check_answer(&line, &format!("mem-{i}"))?;
            alive.push((child.pid(), in_w, out, child));
        }
        let mut pids: Vec<i32> = alive.iter().map(|a| a.0).collect();
        if template {
            pids.extend(restorer.template_pids());
        }
        let mut pss_kb = 0u64;
        for pid in pids {
            pss_kb += std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        for (_, in_w, _, mut child) in alive {
            drop(in_w);
            child.wait()?;
        }
        memory.push((template, pss_kb));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (c, f) = (median_ms(cold.clone()), median_ms(fork.clone()));
    let cmd = "cargo run --release -p remotefork-benches --bin restore-bench";
    println!(
        "# {cmd} -- --iterations {} --cold {} --children {}",
        args.iterations, args.cold, args.children
    );
    println!(
        "# warm Python (boto3 S3 client); seed: {} mappings, {:.1} MiB stored; one-time setup per image (checks, mmap) {:.2} ms",
        desc.vmas.len(),
        desc.image_bytes as f64 / (1 << 20) as f64,
        setup_ns as f64 / 1e6
    );
    println!(
        "{:<58} {:>8} {:>8} {:>9} {:>7}",
        "time to first answer (ms)", "median", "p90", "running", "faults"
    );
    println!(
        "{:<58} {:>8.2} {:>8.2}",
        format!("cold start (exec), n={}", args.cold),
        c,
        p90_ms(cold.clone())
    );
    println!(
        "{:<58} {:>8.2} {:>8.2}",
        format!("local os.fork() of the warm process, n={}", args.iterations),
        f,
        p90_ms(fork.clone())
    );
    for r in &rows {
        let how = if r.template {
            "forked from the node template"
        } else {
            "restored from scratch"
        };
        let mut fs = r.faults.clone();
        fs.sort_unstable();
        println!(
            "{:<58} {:>8.2} {:>8.2} {:>9.2} {:>7}",
            format!("{} restore, {how}, n={}", r.name, args.iterations),
            median_ms(r.answer.clone()),
            p90_ms(r.answer.clone()),
            median_ms(r.running.clone()),
            fs[fs.len() / 2]
        );
        if let Some(ns) = r.first_ns {
            println!(
                "{:<58} {:>8.2}",
                "  its first child (builds the template, once per node)",
                ns as f64 / 1e6
            );
        }
    }
    for (template, pss_kb) in &memory {
        println!(
            "memory: {} concurrent lazy recorded children{} use {:.1} MiB PSS in all; {} x parent RSS = {:.1} MiB ({:.1}%, goal < 25%)",
            args.children,
            if *template { " forked from the template (template included)" } else { " restored from scratch" },
            *pss_kb as f64 / 1024.0,
            args.children,
            (rss_kb * args.children as u64) as f64 / 1024.0,
            100.0 * *pss_kb as f64 / (rss_kb * args.children as u64).max(1) as f64
        );
    }
    let med = |name: &str, template: bool| {
        rows.iter()
            .find(|r| r.name == name && r.template == template)
            .map(|r| median_ms(r.answer.clone()))
            .unwrap_or(f64::NAN)
    };
    let faults = |name: &str, template: bool| {
        rows.iter()
            .find(|r| r.name == name && r.template == template)
            .map(|r| {
                let mut f = r.faults.clone();
                f.sort_unstable();
                f[f.len() / 2]
            })
            .unwrap_or(0)
    };
    for (template, how) in [(false, "from scratch"), (true, "from the template")] {
        let (e, lr) = (med("eager", template), med("lazy recorded", template));
        let (fr, fo) = (
            faults("lazy recorded", template),
            faults("lazy off", template),
        );
        println!(
            "{how}: cold start / eager = {:.1}x faster (goal >= 20x); eager / local fork = {:.2}; \
             lazy recorded / local fork = {:.2} (goal <= 2); cold start / lazy recorded = {:.1}x; \
             faults recorded vs off: {fr} vs {fo} ({:.1}% fewer, goal >= 90%)",
            c / e,
            e / f,
            lr / f,
            c / lr,
            100.0 * (1.0 - fr as f64 / fo.max(1) as f64)
        );
    }
    if let Some(path) = args.json {
        let v = json!({
            "command": cmd,
            "cold_start_ns": cold, "local_fork_ns": fork, "setup_ns": setup_ns,
            "image_bytes": desc.image_bytes, "vmas": desc.vmas.len(),
            "rows": rows.iter().map(|r| json!({
                "mode": r.name, "template": r.template, "first_child_ns": r.first_ns,
                "first_answer_ns": r.answer, "running_ns": r.running, "faults": r.faults,
            })).collect::<Vec<_>>(),
            "children": args.children, "parent_rss_kb": rss_kb,
            "memory": memory.iter().map(|(t, kb)| json!({"template": t, "children_pss_kb": kb})).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
