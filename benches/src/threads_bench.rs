//! Threads benchmark: capture and restore of two multi-threaded programs in
//! one run, the numpy function (`forkd/tests/programs/numpy_server.py`,
//! OpenBLAS's worker threads started) and a Go program
//! (`forkd/tests/programs/goserver.go`, the runtime's threads and a pool of
//! goroutines). For each:
//!
//! - the parent's pause at capture (`stats.pause_ns`, as `capture-bench`
//!   reports it), beside the pause a local `fork()` causes in the parent:
//!   measured in a *fork twin* of the program (the same program, warmed the
//!   same way, which forks itself on request and reports how long the
//!   `fork()` took in the parent; its own capture pause is measured too, so
//!   the two are of the same process), and each capture's pause again with
//!   the freeze not kept on one CPU (`CaptureOptions::freeze_unpinned`,
//!   the baseline of that change). The numpy twin imports
//!   `numpy_server.py` and times `os.fork()` (at-fork handlers included)
//!   and the bare fork syscall; Go has no `fork()`, so the Go twin is
//!   `goserver.go` built with one more file that, on `SIGUSR1`, times the
//!   bare fork syscall on a locked thread (the child exits at once, as Go's
//!   own `forkExec` child does before `exec`);
//! - a child's time to first answer: eager and lazy (the recorded working
//!   set) restored from scratch, and forked from the node template, beside
//!   cold start (exec until it answers), the warm program answering itself
//!   and, for numpy, a local `os.fork()` child of the warm twin answering
//!   (as `restore-bench` measures it). Per child also: its time to running,
//!   its faults, its threads (`/proc/PID/task` once it answered) and its
//!   answer to a second request (one-time costs of a new child apart from
//!   a slower steady state).
//!
//! Run: `cargo run --release -p remotefork-benches --bin threads-bench -- [--iterations N] [--cold N] [--json FILE]`
//! (as root; `go` and numpy as `forkd/scripts/deps.sh` installs them).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{bin_dir, command, parse_args, python, rss_kb, wait_blocked_in_read, Args, Lines};
use remotefork::capture::{capture, CaptureOptions};
use remotefork::image::{Descriptor, SeedImage};
use remotefork::pager::Prefetch;
use remotefork::SpawnOptions;
use serde_json::{json, Value};

/// A child (or a cold start) that has not answered in this long is hung.
const LIMIT: Duration = Duration::from_secs(60);

/// The numpy fork twin: `numpy_server.py` imported (its directory is
/// `argv[1]`) and warmed as it warms itself, answering "N" as it does. Also
/// `fork` and `rawfork`: fork (`os.fork()`, its at-fork handlers included,
/// or the bare fork syscall, x86-64 number 57), the child exits at once;
/// prints the ns the fork took in the parent and the ns until the child
/// was reaped. And `fork N`: a forked child answers "N", then the twin
/// prints `done`.
const NUMPY_TWIN: &str = r#"
import ctypes, json, os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy_server as f
f.warmup()
# PyDLL keeps the GIL across the call: the bare fork's child finds it held
# by its only thread.
syscall = ctypes.PyDLL(None).syscall
print('ready', flush=True)
for line in sys.stdin:
    line = line.strip()
    if line in ('fork', 'rawfork'):
        t = time.perf_counter_ns()
        pid = os.fork() if line == 'fork' else syscall(57)
        if pid == 0:
            os._exit(0)
        ns = time.perf_counter_ns() - t
        if pid < 0:
            raise SystemExit('fork syscall failed')
        os.waitpid(pid, 0)
        print(ns, time.perf_counter_ns() - t, flush=True)
    elif line.startswith('fork '):
        pid = os.fork()
        if pid == 0:
            sys.stdout.write(json.dumps(f.answer(int(line[5:]))) + '\n')
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        print('done', flush=True)
    elif line:
        print(json.dumps(f.answer(int(line))), flush=True)
"#;

/// Built with `goserver.go` into the Go fork twin: on each `SIGUSR1` a
/// goroutine on its own locked thread times the bare fork syscall; the
/// child only calls exit_group (raw syscalls, no runtime: what a forked Go
/// child can do), the parent reaps it and prints `forkhook: fork_ns N
/// total_ns M` on stderr (M: until the child was reaped).
const GO_FORK_HOOK: &str = r#"package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"
)

func init() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	go forkOnSignal(ch)
}

func forkOnSignal(ch <-chan os.Signal) {
	runtime.LockOSThread()
	for range ch {
		t := time.Now()
		pid, _, errno := syscall.RawSyscall(syscall.SYS_FORK, 0, 0, 0)
		if errno == 0 && pid == 0 {
			syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 0, 0, 0)
		}
		ns := time.Since(t).Nanoseconds()
		if errno != 0 {
			fmt.Fprintf(os.Stderr, "forkhook: error %v\n", errno)
			continue
		}
		var ws syscall.WaitStatus
		syscall.Wait4(int(pid), &ws, 0, nil)
		total := time.Since(t).Nanoseconds()
		fmt.Fprintf(os.Stderr, "forkhook: fork_ns %d total_ns %d\n", ns, total)
	}
}
"#;

/// (median, p90, min, max) in milliseconds.
fn summary(ns: &[u64]) -> (f64, f64, f64, f64) {
    if ns.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    let mut ns = ns.to_vec();
    ns.sort_unstable();
    let ms = |v: u64| v as f64 / 1e6;
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize];
    (ms(at(0.5)), ms(at(0.9)), ms(ns[0]), ms(ns[ns.len() - 1]))
}

fn median_ms(ns: &[u64]) -> f64 {
    summary(ns).0
}

/// The median of counts (the upper one of an even number).
fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Numpy,
    Go,
}

/// One program and its fork twin.
struct Program {
    kind: Kind,
    /// Short name (JSON, file names).
    name: &'static str,
    /// What it is, for the output.
    title: String,
    /// Its command line.
    cmd: Vec<String>,
    /// Its fork twin's command line.
    twin: Vec<String>,
}

/// numpy_server's matrices (as the program builds them).
fn numpy_a(i: u64, k: u64) -> u64 {
    (7 * i + 3 * k) % 10
}
fn numpy_b(k: u64, j: u64) -> u64 {
    (5 * k + 11 * j) % 9
}

/// trace and sum of (n*A) @ B, computed here.
fn numpy_expected(n: u64) -> (u64, u64) {
    const SIZE: u64 = 200;
    let trace: u64 = (0..SIZE)
        .flat_map(|i| (0..SIZE).map(move |k| numpy_a(i, k) * numpy_b(k, i)))
        .sum();
    let sum: u64 = (0..SIZE)
        .map(|k| {
            let col_a: u64 = (0..SIZE).map(|i| numpy_a(i, k)).sum();
            let row_b: u64 = (0..SIZE).map(|j| numpy_b(k, j)).sum();
            col_a * row_b
        })
        .sum();
    (n * trace, n * sum)
}

/// Check `line`, the answer to request `n`; for numpy, returns the thread
/// count the answer reports.
fn check_answer(kind: Kind, line: &str, n: u64) -> anyhow::Result<Option<u64>> {
    match kind {
        Kind::Numpy => {
            let v: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("bad answer {line:?}"))?;
            let (trace, sum) = numpy_expected(n);
            if v["n"] != n || v["trace"] != trace || v["sum"] != sum {
                bail!("wrong answer {line:?} to {n} (want trace {trace}, sum {sum})");
            }
            Ok(v["threads"].as_u64())
        }
        Kind::Go => {
            let sumsq = (0..n).fold(0u64, |s, i| s.wrapping_add(i.wrapping_mul(i)));
            let want = format!("n={n} sumsq={sumsq} sha256=");
            let hash = line.strip_prefix(&want);
            if !hash.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
                bail!("wrong answer {line:?} to {n} (want {want}<64 hex digits>)");
            }
            Ok(None)
        }
    }
}

/// The request of iteration `i` (a different one each time).
fn request(kind: Kind, i: usize) -> u64 {
    match kind {
        Kind::Numpy => 1 + i as u64 % 1000,
        Kind::Go => 100_000 + i as u64,
    }
}

fn tasks(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count() as u64)
}

/// `goserver.go` built under the target directory (the Go cache, GOPATH
/// and HOME there too, as forkd/tests/threads.rs builds it), and its fork
/// twin (the same file and [`GO_FORK_HOOK`]).
fn build_go(programs: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let target = bin_dir()?
        .parent()
        .context("no target directory")?
        .to_path_buf();
    let base = target.join("threads-bench-go");
    let twin_src = base.join("twin-src");
    std::fs::create_dir_all(&twin_src)?;
    std::fs::copy(programs.join("goserver.go"), twin_src.join("goserver.go"))?;
    std::fs::write(twin_src.join("zz_forkhook.go"), GO_FORK_HOOK)?;
    let build = |out: &Path, dir: &Path, files: &[PathBuf]| -> anyhow::Result<()> {
        let o = Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(out)
            .args(files)
            .current_dir(dir)
            .env("GOCACHE", base.join("cache"))
            .env("GOPATH", base.join("path"))
            .env("HOME", &base)
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .output()
            .context("running go build")?;
        if !o.status.success() {
            bail!(
                "go build -o {} failed: {}",
                out.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    };
    let (plain, twin) = (base.join("goserver"), base.join("goserver-forktwin"));
    build(&plain, &base, &[programs.join("goserver.go")])?;
    build(
        &twin,
        &twin_src,
        &["goserver.go".into(), "zz_forkhook.go".into()],
    )?;
    Ok((plain, twin))
}

/// One way of starting children, measured.
struct Row {
    name: &'static str,
    /// The first child's time to answer (it builds the template).
    first_ns: Option<u64>,
    /// Per child: time to first answer, time to running, faults, tasks in
    /// /proc once it answered.
    answer: Vec<u64>,
    running: Vec<u64>,
    faults: Vec<u64>,
    tasks: Vec<u64>,
    /// Per child: its answer to a second request.
    second: Vec<u64>,
    /// Why the row stopped early, if it did.
    error: Option<String>,
}

/// One child's figures.
struct Sample {
    answer_ns: u64,
    second_ns: u64,
    running_ns: u64,
    faults: u64,
    tasks: u64,
}

/// Everything measured for one program.
#[derive(Default)]
struct Report {
    rss_kb: u64,
    twin_rss_kb: u64,
    first_capture_ns: u64,
    pause: Vec<u64>,
    reap: Vec<u64>,
    total: Vec<u64>,
    twin_pause: Vec<u64>,
    /// The same captures, the freeze not kept on one CPU (the baseline of
    /// that change).
    pause_unpinned: Vec<u64>,
    twin_pause_unpinned: Vec<u64>,
    /// `os.fork()` in the twin (numpy only), and the bare fork syscall:
    /// the parent's side, and until the child was reaped.
    fork: Vec<u64>,
    raw_fork: Vec<u64>,
    fork_wait: Vec<u64>,
    raw_fork_wait: Vec<u64>,
    cold: Vec<u64>,
    fork_child: Vec<u64>,
    /// The warm program answering a request itself.
    warm: Vec<u64>,
    setup_ns: u64,
    vmas: usize,
    image_bytes: u64,
    /// The program's and the twin's threads at each counted capture.
    threads: Vec<u32>,
    twin_threads: Vec<u32>,
    rows: Vec<Row>,
}

/// Capture `pid` into `dir` (emptied first), once it waits for input.
fn capture_idle(pid: i32, dir: &Path, opts: &CaptureOptions) -> anyhow::Result<Descriptor> {
    wait_blocked_in_read(pid)?;
    let _ = std::fs::remove_dir_all(dir);
    capture(pid, dir, opts).with_context(|| format!("capturing {pid}"))
}

/// Start `argv` with piped stdin and stdout; wait for its "ready".
fn start_warm(
    argv: &[String],
    stderr: Stdio,
) -> anyhow::Result<(
    std::process::Child,
    std::process::ChildStdin,
    Lines<std::process::ChildStdout>,
)> {
    let mut c = command(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {argv:?}"))?;
    let stdin = c.stdin.take().context("stdin")?;
    let mut out = Lines::new(c.stdout.take().context("stdout")?);
    let line = out.next(LIMIT)?;
    if line != "ready" {
        let _ = c.kill();
        let _ = c.wait();
        bail!("{argv:?} did not start: {line:?}");
    }
    Ok((c, stdin, out))
}

/// Start one child from `seed` with request `n` on its stdin and time it
/// until its answer is read.
fn child_answer(
    seed: &remotefork::Seed,
    opts: &SpawnOptions,
    kind: Kind,
    n: u64,
) -> anyhow::Result<Sample> {
    let (in_r, mut in_w) = std::io::pipe()?;
    let (out_r, out_w) = std::io::pipe()?;
    // RF_BENCH_QUIET=1: the request is written 100 ms after the spawn (the
    // next spare forked by then), timed from the request: a child's answer
    // on a quiet node (a diagnostic; not the benchmark's figure).
    let quiet = std::env::var_os("RF_BENCH_QUIET").is_some();
    if !quiet {
        writeln!(in_w, "{n}")?;
    }
    let mut t = Instant::now();
    let mut child = seed.spawn(
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
    let answered = out.next(LIMIT);
    let answer_ns = t.elapsed().as_nanos() as u64;
    // Counted while its stdin is still open (it waits for more input).
    let tasks = tasks(child.pid());
    // A second request, answered by the child once it runs.
    let answered = answered.and_then(|first| {
        let t = Instant::now();
        writeln!(in_w, "{}", n + 1)?;
        let second = out.next(LIMIT)?;
        Ok((first, second, t.elapsed().as_nanos() as u64))
    });
    drop(in_w);
    let (line, line2, second_ns) = match answered {
        Ok(v) => v,
        Err(e) => {
            let _ = child.kill();
            let end = child.wait();
            return Err(e.context(format!("child {} ({end:?})", child.pid())));
        }
    };
    let checked = check_answer(kind, &line, n).and_then(|threads| {
        check_answer(kind, &line2, n + 1)?;
        Ok(threads)
    });
    let t = Instant::now();
    let end = loop {
        if let Some(end) = child.try_wait()? {
            break end;
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            let end = child.wait()?;
            bail!(
                "child {} answered but did not exit at the end of its input within {LIMIT:?}; killed ({end})",
                child.pid()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let faults = match child.stats() {
        Some(s) => {
            s.wait_finished(LIMIT);
            if let Some(r) = s.killed_reason() {
                bail!("child {} killed: {r}", child.pid());
            }
            s.faults.load(Ordering::Relaxed)
        }
        None => 0,
    };
    if let Some(threads) = checked? {
        if tasks > 0 && threads != tasks {
            bail!("child answered threads={threads} but has {tasks} tasks");
        }
    }
    if !end.success() {
        bail!("child {} {end}", child.pid());
    }
    Ok(Sample {
        answer_ns,
        second_ns,
        running_ns: child.restore_time().as_nanos() as u64,
        faults,
        tasks,
    })
}

fn bench(p: &Program, args: &Args, scratch: &Path) -> anyhow::Result<Report> {
    let mut r = Report::default();
    let n_iter = args.iterations;

    // Cold start: exec until the first answer.
    eprintln!("{}: {} cold starts", p.name, args.cold);
    for i in 0..args.cold {
        let n = request(p.kind, i);
        let t = Instant::now();
        let mut c = command(&p.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        writeln!(c.stdin.as_mut().context("stdin")?, "{n}")?;
        let mut out = Lines::new(c.stdout.take().context("stdout")?);
        let ready = out.next(LIMIT)?;
        let line = out.next(LIMIT)?;
        r.cold.push(t.elapsed().as_nanos() as u64);
        if ready != "ready" {
            bail!("cold start: {ready:?} before the answer");
        }
        check_answer(p.kind, &line, n)?;
        drop(c.stdin.take());
        c.wait()?;
    }

    // The warm program: captured (the first capture, which copies the
    // mapped files into the store as forkd's first seed does, apart); the
    // last capture is the seed the children start from.
    let dir = scratch.join(format!("{}-seed", p.name));
    let twin_dir = scratch.join(format!("{}-twin-seed", p.name));
    let opts = CaptureOptions {
        file_store: Some(scratch.join("files")),
        ..Default::default()
    };
    eprintln!("{}: {} captures of the warm program", p.name, n_iter + 1);
    let (mut parent, mut pin, mut pout) = start_warm(&p.cmd, Stdio::inherit())?;
    let ppid = parent.id() as i32;
    r.rss_kb = rss_kb(parent.id());
    r.first_capture_ns = capture_idle(ppid, &dir, &opts)?.stats.capture_ns;
    let unpinned = CaptureOptions {
        file_store: Some(scratch.join("files")),
        freeze_unpinned: true,
        ..Default::default()
    };
    let mut desc = None;
    for _ in 0..n_iter {
        r.pause_unpinned
            .push(capture_idle(ppid, &dir, &unpinned)?.stats.pause_ns);
        let d = capture_idle(ppid, &dir, &opts)?;
        r.pause.push(d.stats.pause_ns);
        r.reap.push(d.stats.reap_pause_ns);
        r.total.push(d.stats.capture_ns);
        r.threads.push(d.threads);
        desc = Some(d);
    }
    let desc = desc.context("no capture")?;
    (r.vmas, r.image_bytes) = (desc.vmas.len(), desc.image_bytes);
    // The warm program itself answering, after its captures: the floor of
    // any child's time to answer.
    for i in 0..n_iter {
        let n = request(p.kind, i);
        let t = Instant::now();
        writeln!(pin, "{n}")?;
        let line = pout.next(LIMIT)?;
        r.warm.push(t.elapsed().as_nanos() as u64);
        check_answer(p.kind, &line, n)?;
    }
    drop(pin);
    parent.wait()?;

    // The fork twin: its capture pause and its fork()'s, alternating. It
    // answers a request before each, as a warm function does between
    // invocations: in the numpy twin, `os.fork()`'s at-fork handler stops
    // OpenBLAS's threads and the next product starts them again, so every
    // capture and fork is of the process with its threads running.
    eprintln!(
        "{}: fork twin, {} captures and forks, {} local fork children",
        p.name,
        n_iter + 1,
        if p.kind == Kind::Numpy { n_iter } else { 0 }
    );
    let twin_stderr = match p.kind {
        Kind::Numpy => Stdio::inherit(),
        Kind::Go => Stdio::piped(),
    };
    let (mut twin, mut tin, mut tout) = start_warm(&p.twin, twin_stderr)?;
    let tpid = twin.id() as i32;
    let mut terr = twin.stderr.take().map(Lines::new);
    r.twin_rss_kb = rss_kb(twin.id());
    let mut k = 0;
    let mut twin_answers = |tin: &mut std::process::ChildStdin,
                            tout: &mut Lines<std::process::ChildStdout>|
     -> anyhow::Result<()> {
        k += 1;
        let n = request(p.kind, k);
        writeln!(tin, "{n}")?;
        check_answer(p.kind, &tout.next(LIMIT)?, n)?;
        Ok(())
    };
    twin_answers(&mut tin, &mut tout)?;
    capture_idle(tpid, &twin_dir, &opts)?; // not counted
    for _ in 0..n_iter {
        twin_answers(&mut tin, &mut tout)?;
        let d = capture_idle(tpid, &twin_dir, &opts)?;
        r.twin_pause.push(d.stats.pause_ns);
        twin_answers(&mut tin, &mut tout)?;
        r.twin_pause_unpinned
            .push(capture_idle(tpid, &twin_dir, &unpinned)?.stats.pause_ns);
        r.twin_threads.push(d.threads);
        match (p.kind, terr.as_mut()) {
            (Kind::Numpy, _) => {
                for (cmd, fork, wait) in [
                    ("fork", &mut r.fork, &mut r.fork_wait),
                    ("rawfork", &mut r.raw_fork, &mut r.raw_fork_wait),
                ] {
                    twin_answers(&mut tin, &mut tout)?;
                    wait_blocked_in_read(tpid)?;
                    writeln!(tin, "{cmd}")?;
                    let line = tout.next(LIMIT)?;
                    let mut v = line.split_whitespace().map(str::parse::<u64>);
                    match (v.next(), v.next()) {
                        (Some(Ok(f)), Some(Ok(w))) => {
                            fork.push(f);
                            wait.push(w);
                        }
                        _ => bail!("{cmd} timing {line:?}"),
                    }
                }
            }
            (Kind::Go, Some(err)) => {
                twin_answers(&mut tin, &mut tout)?;
                wait_blocked_in_read(tpid)?;
                // SAFETY: plain kill(2) of our own child.
                if unsafe { libc::kill(tpid, libc::SIGUSR1) } != 0 {
                    bail!("kill: {}", std::io::Error::last_os_error());
                }
                let line = err.next(LIMIT)?;
                let v: Vec<&str> = line.split_whitespace().collect();
                match v[..] {
                    ["forkhook:", "fork_ns", f, "total_ns", w] => {
                        r.raw_fork.push(f.parse()?);
                        r.raw_fork_wait.push(w.parse()?);
                    }
                    _ => bail!("Go fork twin: {line:?}"),
                }
            }
            (Kind::Go, None) => bail!("Go twin: no stderr"),
        }
    }
    // Local fork: a forked child of the warm twin answers.
    if p.kind == Kind::Numpy {
        for i in 0..n_iter {
            twin_answers(&mut tin, &mut tout)?;
            let n = request(p.kind, i);
            let t = Instant::now();
            writeln!(tin, "fork {n}")?;
            let line = tout.next(LIMIT)?;
            r.fork_child.push(t.elapsed().as_nanos() as u64);
            check_answer(p.kind, &line, n)?;
            let done = tout.next(LIMIT)?; // the forked child has exited
            if done != "done" {
                bail!("fork twin: {done:?} instead of done");
            }
        }
    }
    drop(tin);
    twin.wait()?;
    let _ = std::fs::remove_dir_all(&twin_dir);

    // Children from the seed of the warm program.
    let t = Instant::now();
    let seed = remotefork::Seed::new(SeedImage::open(&dir)?)?;
    r.setup_ns = t.elapsed().as_nanos() as u64;
    let modes: [(&str, bool, Prefetch, bool); 3] = [
        (
            "eager restore, restored from scratch",
            false,
            Prefetch::Off,
            false,
        ),
        (
            "lazy restore (recorded), restored from scratch",
            true,
            Prefetch::Recorded,
            false,
        ),
        (
            "lazy restore (recorded), forked from the node template",
            true,
            Prefetch::Recorded,
            true,
        ),
    ];
    let mut k = 0;
    for (name, lazy, prefetch, template) in modes {
        eprintln!("{}: {name}, {n_iter} children", p.name);
        let opts = SpawnOptions::default()
            .lazy(lazy)
            .prefetch(prefetch)
            .share(true)
            .template(template);
        let mut row = Row {
            name,
            first_ns: None,
            answer: vec![],
            running: vec![],
            faults: vec![],
            tasks: vec![],
            second: vec![],
            error: None,
        };
        let mut go = || -> anyhow::Result<()> {
            if template {
                // Its first child builds the template, timed apart.
                k += 1;
                row.first_ns =
                    Some(child_answer(&seed, &opts, p.kind, request(p.kind, k))?.answer_ns);
            } else if prefetch == Prefetch::Recorded {
                // One child records the working set for the rest.
                k += 1;
                child_answer(&seed, &opts, p.kind, request(p.kind, k))?;
            }
            for _ in 0..n_iter {
                k += 1;
                let s = child_answer(&seed, &opts, p.kind, request(p.kind, k))?;
                row.answer.push(s.answer_ns);
                row.running.push(s.running_ns);
                row.faults.push(s.faults);
                row.tasks.push(s.tasks);
                row.second.push(s.second_ns);
            }
            Ok(())
        };
        if let Err(e) = go() {
            eprintln!("{}: {name}: FAILED: {e:#}", p.name);
            row.error = Some(format!("{e:#}"));
        }
        r.rows.push(row);
    }
    drop(seed);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(r)
}

/// "min" or "min-max" of thread counts.
fn range(v: &[u32]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(lo), Some(hi)) if lo != hi => format!("{lo}-{hi}"),
        (Some(lo), _) => lo.to_string(),
        _ => "?".into(),
    }
}

fn print_report(p: &Program, args: &Args, r: &Report) {
    let mib = |kb: u64| kb as f64 / 1024.0;
    println!();
    println!("## {}", p.title);
    println!(
        "# warm program: RSS {:.1} MiB, {} threads at capture; the seed (its last capture): {} mappings, {:.1} MiB stored; \
         one-time setup per image (checks, mmap) {:.2} ms; first capture (copies the mapped files into the store) {:.2} ms",
        mib(r.rss_kb),
        range(&r.threads),
        r.vmas,
        r.image_bytes as f64 / (1 << 20) as f64,
        r.setup_ns as f64 / 1e6,
        r.first_capture_ns as f64 / 1e6
    );
    println!(
        "# fork twin: RSS {:.1} MiB, {} threads at capture",
        mib(r.twin_rss_kb),
        range(&r.twin_threads)
    );
    let n = args.iterations;
    println!(
        "{:<62} {:>8} {:>8} {:>8} {:>8}",
        "parent pause (ms)", "median", "p90", "min", "max"
    );
    let mut pauses = vec![
        (
            format!("capture: pause (clone), the program, n={n}"),
            &r.pause,
        ),
        (
            format!("  the same, freeze not kept on one CPU, n={n}"),
            &r.pause_unpinned,
        ),
        (
            format!("capture: pause (reap clone), the program, n={n}"),
            &r.reap,
        ),
        (
            format!("capture: whole capture (to image on disk), n={n}"),
            &r.total,
        ),
        (
            format!("capture: pause (clone), its fork twin, n={n}"),
            &r.twin_pause,
        ),
        (
            format!("  the same, freeze not kept on one CPU, n={n}"),
            &r.twin_pause_unpinned,
        ),
    ];
    if p.kind == Kind::Numpy {
        pauses.push((
            format!("local os.fork() in the twin (parent side), n={n}"),
            &r.fork,
        ));
        pauses.push((
            format!("  os.fork()+exit+wait (as capture-bench), n={n}"),
            &r.fork_wait,
        ));
    }
    pauses.push((
        format!("local fork syscall in the twin (bare, parent side), n={n}"),
        &r.raw_fork,
    ));
    pauses.push((format!("  bare fork+exit+wait, n={n}"), &r.raw_fork_wait));
    for (name, ns) in pauses {
        let (m, p90, lo, hi) = summary(ns);
        println!("{name:<62} {m:>8.2} {p90:>8.2} {lo:>8.2} {hi:>8.2}");
    }
    println!(
        "{:<62} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "time to first answer (ms)", "median", "p90", "running", "faults", "threads", "2nd ans"
    );
    let (c, cp90, ..) = summary(&r.cold);
    println!(
        "{:<62} {:>8.2} {:>8.2}",
        format!("cold start (exec), n={}", args.cold),
        c,
        cp90
    );
    let (w, wp90, ..) = summary(&r.warm);
    println!(
        "{:<62} {:>8.2} {:>8.2}",
        format!("the warm program itself answers (after its captures), n={n}"),
        w,
        wp90
    );
    if p.kind == Kind::Numpy {
        let (f, fp90, ..) = summary(&r.fork_child);
        println!(
            "{:<62} {:>8.2} {:>8.2}",
            format!("local os.fork() child of the warm twin, n={n}"),
            f,
            fp90
        );
    } else {
        println!(
            "{:<62} {:>8}",
            "local fork() child (a forked Go child cannot run Go)", "n/a"
        );
    }
    for row in &r.rows {
        let (m, p90, ..) = summary(&row.answer);
        println!(
            "{:<62} {:>8.2} {:>8.2} {:>8.2} {:>8} {:>8} {:>8.2}",
            format!("{}, n={}", row.name, row.answer.len()),
            m,
            p90,
            median_ms(&row.running),
            median_u64(&row.faults),
            median_u64(&row.tasks),
            median_ms(&row.second)
        );
        if let Some(ns) = row.first_ns {
            println!(
                "{:<62} {:>8.2}",
                "  its first child (builds the template, once per node)",
                ns as f64 / 1e6
            );
        }
        if let Some(e) = &row.error {
            println!("  FAILED after {} children: {e}", row.answer.len());
        }
    }
    let pm = median_ms(&r.pause);
    let tm = median_ms(&r.twin_pause);
    let raw = median_ms(&r.raw_fork);
    let tu = median_ms(&r.twin_pause_unpinned);
    let fork_vs = if p.kind == Kind::Numpy {
        let f = median_ms(&r.fork);
        format!(
            "twin pause / local os.fork() = {:.2} (goal <= 1; not kept on one CPU {:.2}), \
             / bare fork syscall = {:.2}, / os.fork()+exit+wait = {:.2}",
            tm / f,
            tu / f,
            tm / raw,
            tm / median_ms(&r.fork_wait)
        )
    } else {
        format!(
            "twin pause / bare fork syscall = {:.2} (goal <= 1; Go has no fork(): the bare syscall, \
             child exiting at once, is its fork baseline; not kept on one CPU {:.2}), \
             / bare fork+exit+wait = {:.2}",
            tm / raw,
            tu / raw,
            tm / median_ms(&r.raw_fork_wait)
        )
    };
    println!(
        "goals: pause < 10 ms: {} ({pm:.2} ms, twin {tm:.2} ms); {fork_vs}",
        pm < 10.0 && tm < 10.0
    );
    let med = |i: usize| {
        r.rows
            .get(i)
            .filter(|row| !row.answer.is_empty())
            .map_or(f64::NAN, |row| median_ms(&row.answer))
    };
    let (e, l, t) = (med(0), med(1), med(2));
    let mut line = format!(
        "cold start / eager = {:.1}x, cold start / lazy recorded = {:.1}x, cold start / template = {:.1}x faster{}",
        c / e,
        c / l,
        c / t,
        if p.kind == Kind::Numpy {
            " (goal >= 20x)"
        } else {
            ""
        }
    );
    if p.kind == Kind::Numpy {
        let f = median_ms(&r.fork_child);
        line.push_str(&format!(
            "; eager / local fork child = {:.2}, lazy recorded / local fork child = {:.2}, template / local fork child = {:.2}",
            e / f,
            l / f,
            t / f
        ));
    }
    println!("{line}");
}

fn report_json(p: &Program, r: &Report) -> Value {
    json!({
        "program": p.name, "title": p.title, "command": p.cmd, "twin_command": p.twin,
        "rss_kb": r.rss_kb, "twin_rss_kb": r.twin_rss_kb,
        "threads": r.threads, "twin_threads": r.twin_threads,
        "vmas": r.vmas, "image_bytes": r.image_bytes, "setup_ns": r.setup_ns,
        "first_capture_ns": r.first_capture_ns,
        "pause_ns": r.pause, "reap_pause_ns": r.reap, "capture_ns": r.total,
        "twin_pause_ns": r.twin_pause,
        "local_fork_ns": r.fork, "bare_fork_syscall_ns": r.raw_fork,
        "local_fork_exit_wait_ns": r.fork_wait, "bare_fork_exit_wait_ns": r.raw_fork_wait,
        "cold_start_ns": r.cold, "warm_answer_ns": r.warm, "local_fork_child_ns": r.fork_child,
        "rows": r.rows.iter().map(|row| json!({
            "mode": row.name, "first_child_ns": row.first_ns,
            "first_answer_ns": row.answer, "running_ns": row.running,
            "faults": row.faults, "threads": row.tasks, "second_answer_ns": row.second,
            "error": row.error,
        })).collect::<Vec<_>>(),
    })
}

fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let args = parse_args(None)?;
    let cmd = "cargo run --release -p remotefork-benches --bin threads-bench";
    let given: Vec<String> = std::env::args().skip(1).collect();
    let command_line = format!("{cmd} -- {}", given.join(" "));
    println!("# {}", command_line.trim_end());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: threads-bench needs root (ptrace)");
        return Ok(());
    }
    let programs_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd/tests/programs");
    let programs_dir = programs_dir.canonicalize().unwrap_or(programs_dir);
    let py = python()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut programs = Vec::new();
    let mut skipped = Vec::new();
    let numpy = Command::new(&py)
        .args([
            "-c",
            "import sys, numpy; print(sys.version.split()[0], numpy.__version__)",
        ])
        .stderr(Stdio::null())
        .output()?;
    if numpy.status.success() {
        let v = String::from_utf8_lossy(&numpy.stdout);
        let mut v = v.split_whitespace();
        let server = programs_dir.join("numpy_server.py");
        programs.push(Program {
            kind: Kind::Numpy,
            name: "numpy",
            title: format!(
                "numpy function ({}: Python {}, numpy {})",
                "forkd/tests/programs/numpy_server.py",
                v.next().unwrap_or("?"),
                v.next().unwrap_or("?")
            ),
            cmd: vec![py.clone(), server.to_string_lossy().into_owned()],
            twin: vec![
                py.clone(),
                "-c".into(),
                NUMPY_TWIN.into(),
                programs_dir.to_string_lossy().into_owned(),
            ],
        });
    } else {
        skipped.push(format!("numpy function: numpy is not installed for {py}"));
    }
    match build_go(&programs_dir) {
        Ok((plain, twin)) => {
            let version = Command::new("go")
                .arg("version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            programs.push(Program {
                kind: Kind::Go,
                name: "go",
                title: format!("Go program (forkd/tests/programs/goserver.go: {version})"),
                cmd: vec![plain.to_string_lossy().into_owned()],
                twin: vec![twin.to_string_lossy().into_owned()],
            });
        }
        Err(e) => skipped.push(format!("Go program: {e:#}")),
    }
    println!(
        "# {cpus} CPUs; each figure from this run; time to first answer = from the start of a \
         spawn (request already in the child's stdin) to its answer line read; running = time to \
         running; threads = the child's tasks once it answered; 2nd ans = its answer to a second request"
    );
    for s in &skipped {
        println!("SKIPPED: {s}");
    }

    let scratch = std::env::temp_dir().join(format!("rf-threads-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let mut results = Vec::new();
    for p in &programs {
        match bench(p, &args, &scratch) {
            Ok(r) => {
                print_report(p, &args, &r);
                results.push(report_json(p, &r));
            }
            Err(e) => {
                println!();
                println!("## {}", p.title);
                println!("FAILED: {e:#}");
                results.push(json!({"program": p.name, "error": format!("{e:#}")}));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(path) = args.json {
        let v = json!({
            "command": command_line.trim_end(),
            "iterations": args.iterations, "cold": args.cold, "cpus": cpus,
            "skipped": skipped,
            "programs": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
