//! Runtimes benchmark: Node.js (`forkd/tests/programs/node_server.js`) and
//! the JVM (`forkd/tests/programs/JavaFn.java`, compiled here), warm
//! (JIT-compiled after 20,000 calls), captured from outside, and their
//! children, in one run. For each:
//!
//! - cold start: exec until the first answer, without the program's
//!   warm-up (`RF_NO_WARMUP=1`: load, answer), the baseline of the goals;
//!   and with it, as the warm process was made;
//! - the warm process answering a request (the floor of any child's time);
//! - the capture pause;
//! - a child's time to first answer: eager and lazy (the recorded working
//!   set) restored from scratch, and forked from the node template (lazy,
//!   recorded), and its answer to a second request;
//! - memory: 100 children forked from the template, alive at once (each
//!   answered a request and waits for more): the sum of their PSS and the
//!   template's, beside 100 times the warm parent's RSS.
//!
//! Goals (issue 16): a child answers at least 10x (Node) and 30x (Java)
//! sooner than a cold start; 100 children use under 15% of 100 parents.
//!
//! Run: `cargo run --release -p remotefork-benches --bin runtimes-bench -- [--iterations N] [--cold N] [--children N] [--json FILE]`
//! (as root; `node`, `java` and `javac` as `forkd/scripts/deps.sh` installs
//! them).
//!
//! Diagnostics, by environment: `RF_BENCH_ONLY=node|java` runs one
//! runtime; `RF_BENCH_ALL=1` prints every child's time, not only medians;
//! `RF_BENCH_QUIET=1` writes each child's request 100 ms after its spawn
//! (the next spare forked by then) and times from the request, the child's
//! answer on a quiet node; `FORKD_LOG=remotefork::restore=debug` the
//! library's steps.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{bin_dir, command, parse_args, rss_kb, wait_idle, Args, Lines};
use remotefork::capture::{capture, CaptureOptions};
use remotefork::image::SeedImage;
use remotefork::pager::Prefetch;
use remotefork::SpawnOptions;
use serde_json::{json, Value};

/// A child (or a cold start) that has not answered in this long is hung.
const LIMIT: Duration = Duration::from_secs(120);

fn median_ms(ns: &[u64]) -> f64 {
    let mut v = ns.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).map_or(f64::NAN, |&x| x as f64 / 1e6)
}

/// One runtime's program.
struct Program {
    name: &'static str,
    title: String,
    cmd: Vec<String>,
}

/// The request of the `k`-th child (fib of it fits in a u128).
fn request(k: u64) -> u64 {
    10 + k % 150
}

/// fib(n) as text, computed here.
fn fib(n: u64) -> String {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a.to_string()
}

/// Is `line` the program's answer to `n`?
fn check(line: &str, n: u64) -> anyhow::Result<()> {
    if !line.starts_with(&format!("fib={} ", fib(n))) {
        bail!("answer to {n}: {line:?}");
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn programs(scratch: &Path) -> anyhow::Result<Vec<Program>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd/tests/programs");
    let mut out = Vec::new();
    match which("node") {
        Some(node) => out.push(Program {
            name: "node",
            title: format!(
                "Node.js {} (node_server.js: V8 JIT-warm, libuv's loops, crypto, fs)",
                String::from_utf8_lossy(
                    &command(&[node.display().to_string(), "--version".into()])
                        .output()?
                        .stdout
                )
                .trim()
            ),
            cmd: vec![
                "/usr/bin/env".into(),
                "UV_USE_IO_URING=0".into(),
                "UV_THREADPOOL_SIZE=2".into(),
                node.display().to_string(),
                "--v8-pool-size=2".into(),
                dir.join("node_server.js").display().to_string(),
            ],
        }),
        None => eprintln!("SKIPPED: node: not installed"),
    }
    match (which("java"), which("javac")) {
        (Some(java), Some(javac)) => {
            let classes = scratch.join("java-classes");
            std::fs::create_dir_all(&classes)?;
            let o = command(&[javac.display().to_string()])
                .arg("-d")
                .arg(&classes)
                .arg(dir.join("JavaFn.java"))
                .output()?;
            if !o.status.success() {
                bail!("javac: {}", String::from_utf8_lossy(&o.stderr));
            }
            out.push(Program {
                name: "java",
                title: "OpenJDK 17 (JavaFn: JIT-warm after 20,000 calls; serial GC, no perf data)"
                    .into(),
                cmd: vec![
                    java.display().to_string(),
                    "-XX:-UsePerfData".into(),
                    "-XX:+UseSerialGC".into(),
                    "-XX:CICompilerCount=2".into(),
                    "-XX:-UseDynamicNumberOfCompilerThreads".into(),
                    "-cp".into(),
                    classes.display().to_string(),
                    "JavaFn".into(),
                ],
            });
        }
        _ => eprintln!("SKIPPED: java: java or javac not installed"),
    }
    Ok(out)
}

/// Exec `p` with request `n` on stdin until its answer: ns.
fn cold_start(p: &Program, n: u64, warmup: bool) -> anyhow::Result<u64> {
    let t = Instant::now();
    let mut c = command(&p.cmd);
    if !warmup {
        c.env("RF_NO_WARMUP", "1");
    }
    let mut c = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    writeln!(c.stdin.as_mut().context("stdin")?, "{n}")?;
    let mut out = Lines::new(c.stdout.take().context("stdout")?);
    let ready = out.next(LIMIT)?;
    let line = out.next(LIMIT)?;
    let ns = t.elapsed().as_nanos() as u64;
    if ready != "ready" {
        bail!("cold start: {ready:?} before the answer");
    }
    check(&line, n)?;
    drop(c.stdin.take());
    c.wait()?;
    Ok(ns)
}

/// A child from `seed` with request `n` on stdin: (first answer ns, second
/// answer ns), the child still running with its stdin (write end) and
/// stdout if `keep`.
struct Child {
    child: remotefork::Child,
    stdin: std::io::PipeWriter,
    _out: Lines<std::io::PipeReader>,
}

fn child_answer(
    seed: &remotefork::Seed,
    opts: &SpawnOptions,
    n: u64,
) -> anyhow::Result<(u64, u64, Child)> {
    child_answer_running(seed, opts, n).map(|(a, b, _, c)| (a, b, c))
}

/// [`child_answer`], with the child's time to running (ns).
fn child_answer_running(
    seed: &remotefork::Seed,
    opts: &SpawnOptions,
    n: u64,
) -> anyhow::Result<(u64, u64, u64, Child)> {
    let (in_r, mut in_w) = std::io::pipe()?;
    let (out_r, out_w) = std::io::pipe()?;
    let quiet = std::env::var_os("RF_BENCH_QUIET").is_some();
    if !quiet {
        writeln!(in_w, "{n}")?;
    }
    let mut t = Instant::now();
    let child = seed.spawn(
        remotefork::Stdio::Fd(in_r.into()),
        remotefork::Stdio::Fd(out_w.into()),
        remotefork::Stdio::Inherit,
        opts,
    )?;
    if quiet {
        std::thread::sleep(Duration::from_millis(100));
        t = Instant::now();
        writeln!(in_w, "{n}")?;
    }
    let mut out = Lines::new(out_r);
    let first = out.next(LIMIT);
    let first_ns = t.elapsed().as_nanos() as u64;
    let second = first.and_then(|line| {
        check(&line, n)?;
        let t = Instant::now();
        writeln!(in_w, "{}", n + 1)?;
        let line = out.next(LIMIT)?;
        check(&line, n + 1)?;
        Ok(t.elapsed().as_nanos() as u64)
    });
    let c = Child {
        child,
        stdin: in_w,
        _out: out,
    };
    let running = c.child.restore_time().as_nanos() as u64;
    match second {
        Ok(s) => Ok((first_ns, s, running, c)),
        Err(e) => {
            let _ = c.child.kill();
            Err(e.context(format!("child {}", c.child.pid())))
        }
    }
}

fn end(mut c: Child) -> anyhow::Result<()> {
    drop(c.stdin);
    let t = Instant::now();
    loop {
        if let Some(st) = c.child.try_wait()? {
            if !st.success() {
                bail!("child {} {st}", c.child.pid());
            }
            return Ok(());
        }
        if t.elapsed() > LIMIT {
            let _ = c.child.kill();
            bail!(
                "child {} did not exit at the end of its input",
                c.child.pid()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// PSS of `pid` in KiB (smaps_rollup).
fn pss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

type Row = (&'static str, Vec<u64>, Vec<u64>, Vec<u64>, Option<String>);

#[derive(Default)]
struct Report {
    cold: Vec<u64>,
    cold_warmup: Vec<u64>,
    warm: Vec<u64>,
    pause: Vec<u64>,
    rss_kb: u64,
    /// Per mode: first answers, second answers, times to running (ns).
    rows: Vec<Row>,
    memory: Option<(usize, u64, u64)>,
    memory_error: Option<String>,
}

fn bench(p: &Program, args: &Args, scratch: &Path) -> anyhow::Result<Report> {
    let mut r = Report::default();
    eprintln!(
        "{}: {} cold starts without and with warm-up",
        p.name, args.cold
    );
    for i in 0..args.cold {
        r.cold.push(cold_start(p, 10 + i as u64, false)?);
        r.cold_warmup.push(cold_start(p, 10 + i as u64, true)?);
    }
    let dir = scratch.join(format!("{}-seed", p.name));
    let opts = CaptureOptions {
        file_store: Some(scratch.join("files")),
        ..Default::default()
    };
    eprintln!("{}: warm process, {} captures", p.name, args.iterations + 1);
    let mut parent = command(&p.cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut pin = parent.stdin.take().context("stdin")?;
    let mut pout = Lines::new(parent.stdout.take().context("stdout")?);
    let ready = pout.next(LIMIT)?;
    if ready != "ready" {
        bail!("{}: {ready:?}", p.name);
    }
    let ppid = parent.id() as i32;
    for i in 0..=args.iterations {
        wait_idle(ppid)?;
        let _ = std::fs::remove_dir_all(&dir);
        let d = capture(ppid, &dir, &opts).with_context(|| format!("capturing {ppid}"))?;
        if i > 0 {
            r.pause.push(d.stats.pause_ns);
        }
    }
    r.rss_kb = rss_kb(parent.id());
    for i in 0..args.iterations {
        let n = 20 + i as u64;
        let t = Instant::now();
        writeln!(pin, "{n}")?;
        let line = pout.next(LIMIT)?;
        r.warm.push(t.elapsed().as_nanos() as u64);
        check(&line, n)?;
    }
    drop(pin);
    parent.wait()?;

    let seed = remotefork::Seed::new(SeedImage::open(&dir)?)?;
    let modes: [(&str, bool, Prefetch, bool); 3] = [
        ("eager, restored from scratch", false, Prefetch::Off, false),
        (
            "lazy (recorded), restored from scratch",
            true,
            Prefetch::Recorded,
            false,
        ),
        (
            "lazy (recorded), forked from the node template",
            true,
            Prefetch::Recorded,
            true,
        ),
    ];
    let mut k = 100;
    for (name, lazy, prefetch, template) in modes {
        eprintln!("{}: {name}, {} children", p.name, args.iterations);
        let o = SpawnOptions::default()
            .lazy(lazy)
            .prefetch(prefetch)
            .share(true)
            .template(template);
        let (mut first, mut second, mut running) = (Vec::new(), Vec::new(), Vec::new());
        let mut go = || -> anyhow::Result<()> {
            // One child first: it records the working set, or builds the
            // template; not counted.
            k += 1;
            end(child_answer(&seed, &o, request(k))?.2)?;
            for _ in 0..args.iterations {
                k += 1;
                let (a, b, run, c) = child_answer_running(&seed, &o, request(k))?;
                end(c)?;
                first.push(a);
                second.push(b);
                running.push(run);
            }
            Ok(())
        };
        let err = go().err().map(|e| format!("{e:#}"));
        if let Some(e) = &err {
            eprintln!("{}: {name}: FAILED: {e}", p.name);
        }
        if std::env::var_os("RF_BENCH_ALL").is_some() {
            let ms = |v: &[u64]| {
                v.iter()
                    .map(|n| format!("{:.2}", *n as f64 / 1e6))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            eprintln!("{}: {name}: first answers (ms): {}", p.name, ms(&first));
            eprintln!("{}: {name}: running at (ms): {}", p.name, ms(&running));
        }
        r.rows.push((name, first, second, running, err));
    }

    // Memory: N template children alive at once.
    eprintln!(
        "{}: {} template children alive at once",
        p.name, args.children
    );
    let o = SpawnOptions::default()
        .lazy(true)
        .prefetch(Prefetch::Recorded)
        .share(true)
        .template(true);
    let mut alive = Vec::new();
    let mut mem = || -> anyhow::Result<(usize, u64, u64)> {
        for _ in 0..args.children {
            k += 1;
            alive.push(child_answer(&seed, &o, request(k))?.2);
        }
        let children_pss: u64 = alive.iter().map(|c| pss_kb(c.child.pid())).sum();
        let template_pss: u64 = seed.template_pids().iter().map(|&t| pss_kb(t)).sum();
        Ok((alive.len(), children_pss, template_pss))
    };
    match mem() {
        Ok(m) => r.memory = Some(m),
        Err(e) => r.memory_error = Some(format!("{e:#}")),
    }
    for c in alive {
        end(c)?;
    }
    drop(seed);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

fn print_report(p: &Program, args: &Args, r: &Report) -> Value {
    let cold = median_ms(&r.cold);
    println!("\n== {}", p.title);
    println!(
        "cold start, exec to first answer (median of {}): {cold:.1} ms without warm-up, {:.1} ms with the warm-up the seed had",
        args.cold,
        median_ms(&r.cold_warmup)
    );
    println!(
        "warm process answering: {:.2} ms; capture pause {:.2} ms (median of {}); parent RSS {:.1} MiB",
        median_ms(&r.warm),
        median_ms(&r.pause),
        args.iterations,
        r.rss_kb as f64 / 1024.0
    );
    let mut rows = Vec::new();
    for (name, first, second, running, err) in &r.rows {
        match err {
            Some(e) => println!("  {name:<48} FAILED: {e}"),
            None => {
                let f = median_ms(first);
                println!(
                    "  {name:<48} running {:>6.2} ms  first answer {f:>7.2} ms ({:>5.1}x faster than cold)  second answer {:>6.2} ms",
                    median_ms(running),
                    cold / f,
                    median_ms(second)
                );
            }
        }
        rows.push(json!({"mode": name, "running_ms": median_ms(running), "first_answer_ms": median_ms(first),
                         "second_answer_ms": median_ms(second), "speedup_vs_cold": cold / median_ms(first), "error": err}));
    }
    let goal = if p.name == "node" { 10.0 } else { 30.0 };
    let best = r
        .rows
        .iter()
        .filter(|x| x.4.is_none())
        .map(|x| cold / median_ms(&x.1))
        .fold(0.0, f64::max);
    println!(
        "goal: a child answers {goal}x sooner than a cold start: best {best:.1}x -> {}",
        if best >= goal { "met" } else { "NOT met" }
    );
    let mut mem = json!(null);
    match (&r.memory, &r.memory_error) {
        (Some((n, children, template)), _) => {
            let total = children + template;
            let parents = *n as u64 * r.rss_kb;
            let pct = 100.0 * total as f64 / parents as f64;
            println!(
                "memory: {n} template children alive: PSS {:.1} MiB (children {:.1} + template {:.1}) = {pct:.1}% of {n} x the parent's RSS ({:.1} MiB); goal under 15% -> {}",
                total as f64 / 1024.0,
                *children as f64 / 1024.0,
                *template as f64 / 1024.0,
                parents as f64 / 1024.0,
                if pct < 15.0 { "met" } else { "NOT met" }
            );
            mem = json!({"children": n, "children_pss_kb": children, "template_pss_kb": template,
                         "parent_rss_kb": r.rss_kb, "percent_of_parents": pct});
        }
        (None, Some(e)) => println!("memory: FAILED: {e}"),
        _ => {}
    }
    json!({"runtime": p.name, "title": p.title, "cold_ms": cold, "cold_with_warmup_ms": median_ms(&r.cold_warmup),
           "warm_ms": median_ms(&r.warm), "pause_ms": median_ms(&r.pause), "rss_kb": r.rss_kb,
           "children": rows, "memory": mem})
}

fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let args = parse_args(Some(100))?;
    // The library's log, when asked for (FORKD_LOG=debug shows each
    // template child's steps).
    if std::env::var_os("FORKD_LOG").is_some() {
        forkd::cli::init_logging("warn", forkd::cli::LogFormat::Text);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (ptrace, userfaultfd)");
    }
    let scratch = bin_dir()?.join("runtimes-bench.scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    println!(
        "runtimes-bench: cargo run --release -p remotefork-benches --bin runtimes-bench -- --iterations {} --cold {} --children {}",
        args.iterations, args.cold, args.children
    );
    let mut out = Vec::new();
    // RF_BENCH_ONLY=java (or node): one runtime.
    let only = std::env::var("RF_BENCH_ONLY").ok();
    for p in programs(&scratch)? {
        if only.as_deref().is_some_and(|o| o != p.name) {
            continue;
        }
        let r = bench(&p, &args, &scratch)?;
        out.push(print_report(&p, &args, &r));
    }
    if let Some(f) = &args.json {
        std::fs::write(f, serde_json::to_string_pretty(&json!({"runtimes": out}))?)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
