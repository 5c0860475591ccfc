//! Multi-threaded programs, captured while they run and restored: real
//! interpreters and runtimes whose threads must all come back, each in its
//! state, for the children to answer.
//!
//! Programs (in `tests/programs/`, and one restore case):
//!
//! - `numpy_server`: Python with numpy, OpenBLAS's worker threads started
//!   by a first matrix product; answers "N" with the trace and sum of
//!   `(N*A) @ B` (exact: small-integer matrices) and its thread count;
//! - `thread_queue_server`: Python, a `threading.Thread` worker fed through
//!   `queue.Queue`s; answers each line with its sha256, from the worker;
//! - `goserver`: Go, a pool of goroutines fed over channels (the runtime's
//!   threads); answers "N" with a sum of squares and a sha256;
//! - `ruby_threads`: Ruby, two worker Threads with their own Queues;
//! - `threads_state`: the restore case `tests/cases/threads_state.c`,
//!   five threads each in a different state (condvar, sigwait with its own
//!   mask, a user-mode spinner with live xmm/ymm values, a raw futex wait),
//!   checking them all itself and printing "ok".
//!
//! Every program runs in every mode, each cell its own test
//! (`threads::PROGRAM::MODE`), 20 children each:
//!
//! - `eager`: `forkd restore --eager --no-template --count 20`;
//! - `lazy`: `forkd restore --no-template --count 20` (the pager);
//! - `template`: `forkd restore --count 20` (lazy, every child forked from
//!   the node's template of the seed);
//! - `remote_tcp`: a seed made by one forkd (`forkctl seed create
//!   --ready-line ready`), 20 children on another (`forkctl spawn REF
//!   --count 20`), paged over TCP.
//!
//! In the local modes the seed is captured from outside (`forkd snapshot`)
//! while the program waits for its input. Every child gets the same input;
//! its whole output must equal what the program printed run on its own for
//! that input, and that output is checked first against answers computed
//! here. And `gateway_numpy_function_answers_200_concurrent_invocations`:
//! numpy_server as a gateway function (`remotefork.runtime`), 200
//! concurrent invocations, every answer checked.
//!
//! Root-only. A program whose interpreter or toolchain is missing (`go`,
//! `ruby`, numpy; `forkd/scripts/deps.sh` installs them) is SKIPPED.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use common::runner::{self, program_file, which};
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---- tools ----

/// Does `python()` import numpy?
fn have_numpy() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        Command::new(python())
            .args(["-c", "import numpy"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Ruby, if it is installed (with its json library).
fn ruby() -> Option<PathBuf> {
    static RUBY: OnceLock<Option<PathBuf>> = OnceLock::new();
    RUBY.get_or_init(|| {
        let r = which("ruby")?;
        Command::new(&r)
            .args(["-e", "require 'json'"])
            .status()
            .ok()
            .filter(|s| s.success())
            .map(|_| r)
    })
    .clone()
}

/// `tests/programs/goserver.go` built once per test binary run (under the
/// target dir, with the Go cache and GOPATH there too: HOME may be unset);
/// None when `go` is not installed.
fn go_binary() -> Option<PathBuf> {
    static GO: OnceLock<Option<PathBuf>> = OnceLock::new();
    GO.get_or_init(|| {
        let go = which("go")?;
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("go");
        std::fs::create_dir_all(&base).unwrap();
        let out = base.join(format!("goserver-{}", std::process::id()));
        let tmp = base.join(format!("goserver-{}.tmp", std::process::id()));
        let o = Command::new(go)
            .arg("build")
            .arg("-o")
            .arg(&tmp)
            .arg(program_file("goserver.go"))
            .current_dir(&base)
            .env("GOCACHE", base.join("cache"))
            .env("GOPATH", base.join("path"))
            .env("HOME", &base)
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .output()
            .expect("running go build");
        assert!(
            o.status.success(),
            "go build of goserver.go failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
        Some(out)
    })
    .clone()
}

// ---- the programs ----

/// The command line of program `name`, or Err(why it cannot run here).
fn argv(name: &str) -> Result<Vec<String>, String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    match name {
        "numpy_server" => {
            if !have_numpy() {
                return Err(format!("numpy is not installed for {}", python()));
            }
            Ok(vec![python().into(), s(&program_file("numpy_server.py"))])
        }
        "thread_queue_server" => Ok(vec![
            python().into(),
            s(&program_file("thread_queue_server.py")),
        ]),
        "goserver" => go_binary()
            .map(|g| vec![s(&g)])
            .ok_or_else(|| "go is not installed".to_string()),
        "ruby_threads" => ruby()
            .map(|r| vec![s(&r), s(&program_file("ruby_threads.rb"))])
            .ok_or_else(|| "ruby is not installed".to_string()),
        "threads_state" => Ok(vec![s(&c_case("threads_state"))]),
        other => panic!("unknown program {other}"),
    }
}

/// What every child of program `name` is given on stdin.
fn input(name: &str) -> &'static str {
    match name {
        "numpy_server" => "1\n7\n123\n",
        "thread_queue_server" => "hello\nremote fork\n\nw\u{f6}rld\n",
        "goserver" => "0\n10\n1000000\n",
        "ruby_threads" => "0\n3\n1000\n20000\n",
        "threads_state" => "check\n",
        other => panic!("unknown program {other}"),
    }
}

fn numeric_lines(input: &str) -> impl Iterator<Item = u64> + '_ {
    input.lines().map(|l| l.trim().parse::<u64>().unwrap())
}

/// sum of i*i for i in [0, n), mod 2^64.
fn sum_of_squares(n: u64) -> u64 {
    (0..n).fold(0u64, |s, i| s.wrapping_add(i.wrapping_mul(i)))
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// numpy_server's answer to `n` with `threads` tasks.
fn numpy_answer(n: u64, threads: u64) -> Value {
    let (trace, sum) = numpy_expected(n);
    json!({"n": n, "trace": trace, "sum": sum, "threads": threads})
}

fn json_lines(name: &str, out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {l:?} is not JSON: {e}"))
        })
        .collect()
}

/// Check `out`, program `name`'s whole output for its `input`, against
/// answers computed here.
fn check_answers(name: &str, out: &str) {
    let inp = input(name);
    match name {
        "numpy_server" => {
            let got = json_lines(name, out);
            assert_eq!(got.len(), inp.lines().count(), "{name}: {out}");
            // OpenBLAS starts a thread per CPU (up to its limit); the count
            // is whatever the warm process had, the same in every answer.
            let threads = got[0]["threads"].as_u64().unwrap();
            if cpus() > 1 {
                assert!(threads > 1, "{name}: OpenBLAS started no threads: {out}");
            }
            for (g, n) in got.iter().zip(numeric_lines(inp)) {
                assert_eq!(*g, numpy_answer(n, threads), "{name}: answer to {n}");
            }
        }
        "thread_queue_server" => {
            let got = json_lines(name, out);
            assert_eq!(got.len(), inp.lines().count(), "{name}: {out}");
            for (i, (g, line)) in got.iter().zip(inp.lines()).enumerate() {
                let want = json!({
                    "got": line, "sha256": sha256_hex(line), "seq": i + 1,
                    "worker": "rf-worker", "tls": "worker-local", "threads": 2, "tasks": 2,
                });
                assert_eq!(*g, want, "{name}: answer to {line:?}");
            }
        }
        "goserver" => {
            let want: String = inp
                .lines()
                .map(|l| {
                    let n: u64 = l.trim().parse().unwrap();
                    format!(
                        "n={n} sumsq={} sha256={}\n",
                        sum_of_squares(n),
                        sha256_hex(l)
                    )
                })
                .collect();
            assert_eq!(out, want, "{name}");
        }
        "ruby_threads" => {
            let got = json_lines(name, out);
            assert_eq!(got.len(), inp.lines().count(), "{name}: {out}");
            for (k, (g, n)) in got.iter().zip(numeric_lines(inp)).enumerate() {
                let w = k % 2;
                let want = json!({
                    "n": n, "sumsq": sum_of_squares(n), "worker": format!("rf-worker-{w}"),
                    "seq": k / 2 + 1, "local": format!("local-{w}"),
                    "comm": format!("rf-worker-{w}"), "threads": 3,
                });
                assert_eq!(*g, want, "{name}: answer to {n}");
            }
        }
        "threads_state" => assert_eq!(out, "ok\n", "{name}"),
        other => panic!("unknown program {other}"),
    }
}

/// Program `name` run on its own with its input: its output, checked
/// against the answers computed here. Every child must print exactly this.
fn expected(name: &str) -> String {
    static CACHE: OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(s) = cache.lock().unwrap().get(name) {
        return s.clone();
    }
    let out = runner::alone(name, &argv(name).unwrap(), input(name));
    check_answers(name, &out);
    cache.lock().unwrap().insert(name.to_string(), out.clone());
    out
}

fn run(name: &str, mode: &str) {
    runner::run("threads", name, mode, argv(name), input(name), |_| {
        expected(name)
    });
}

common::runner::cells!(
    numpy_server,
    thread_queue_server,
    goserver,
    ruby_threads,
    threads_state,
);

// ---- numpy through the gateway ----

#[test]
fn gateway_numpy_function_answers_200_concurrent_invocations() {
    let test = "threads::gateway_numpy_function_answers_200_concurrent_invocations";
    if !require_root(test) {
        return;
    }
    if !have_numpy() {
        println!(
            "SKIPPED: {test}: numpy is not installed for {} (forkd/scripts/deps.sh installs it)",
            python()
        );
        return;
    }
    const CALLS: u64 = 200;
    // The warm process's thread count, as numpy_server has it on its own.
    let threads = json_lines("numpy_server", &expected("numpy_server"))[0]["threads"]
        .as_u64()
        .unwrap();
    let dir = scratch("threads-gw-numpy");
    let d = Daemon::start(&dir, false);
    let gw = Gateway::start(&[
        "--node".into(),
        d.addr(),
        // At most 50 instances: 200 calls queue for them and reuse them.
        "--max-instances-per-node".into(),
        "50".into(),
        "--timeout-ms".into(),
        "60000".into(),
        "--ready-timeout-ms".into(),
        "60000".into(),
        "--queue-timeout-ms".into(),
        "240000".into(),
    ]);
    let a = gw.addr.clone();
    rt().block_on(async {
        let register = json!({
            "name": "numpy",
            "command": [python(), "-m", "remotefork.runtime", program_file("numpy_server.py")],
            "env": {"PYTHONPATH": manifest().join("../python")},
        });
        let (st, v) = http(&a, "POST", "/functions", &register.to_string()).await;
        assert_eq!(st, 201, "{v}");
        let t = Instant::now();
        let calls: Vec<_> = (1..=CALLS)
            .map(|n| {
                let a = a.clone();
                tokio::spawn(async move {
                    (n, http(&a, "POST", "/invoke/numpy", &format!("{{\"n\": {n}}}")).await)
                })
            })
            .collect();
        let mut pids = std::collections::HashSet::new();
        let mut bad = Vec::new();
        for c in calls {
            let (n, (st, mut v)) = c.await.unwrap();
            let pid = v.as_object_mut().and_then(|o| o.remove("pid"));
            if st != 200 || v != numpy_answer(n, threads) {
                bad.push(format!("invocation {n}: {st} {v}"));
                continue;
            }
            pids.insert(pid.and_then(|p| p.as_u64()).unwrap_or(0));
        }
        assert!(
            bad.is_empty(),
            "{} of {CALLS} invocations answered wrong (want {{n, trace, sum, threads: {threads}}}):\n{}",
            bad.len(),
            bad.join("\n")
        );
        println!(
            "gateway numpy: {CALLS} invocations answered in {:.2} s by {} instances",
            t.elapsed().as_secs_f64(),
            pids.len()
        );
    });
}

// ---- a multi-threaded seed's spare, dropped with its template ----

/// The thread tracing `pid` (`TracerPid`), if any.
fn tracer_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|&t| t != 0)
}

/// Of our own processes, those traced by one of our threads that run the
/// executable `program`, other than `except`.
fn traced_by_us(program: &Path, except: &[i32]) -> Vec<i32> {
    let ours: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    children(std::process::id() as i32)
        .into_iter()
        .filter(|p| !except.contains(p))
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == program))
        .filter(|&p| tracer_of(p).is_some_and(|t| ours.contains(&t)))
        .collect()
}

/// A child of a multi-threaded seed forked from the node's template gets
/// its threads before its spawn: the spare forked ahead holds them, made
/// and stopped. The child answers as the program does; and dropping the
/// seed kills and reaps the spare, every thread of it (its main thread
/// cannot be reaped while its other, traced threads are not, which once
/// hung the drop).
#[test]
fn a_multithreaded_seeds_spare_has_its_threads_and_goes_with_its_seed() {
    if !require_root("a_multithreaded_seeds_spare_has_its_threads_and_goes_with_its_seed") {
        return;
    }
    use remotefork::{Seed, SpawnOptions, Stdio};
    use std::io::{Read, Write};
    let name = "thread_queue_server";
    let a = argv(name).unwrap();
    let mut cmd = Command::new(&a[0]);
    cmd.args(&a[1..]);
    let (dir, _) = seed_of(cmd, "threads-spare");
    let seed = Seed::open(&dir).unwrap();
    let want = expected(name);
    let program = std::fs::canonicalize(&a[0]).unwrap();
    let mut answered = Vec::new();
    // The first child builds the template (and the spare after it); the
    // second is that spare.
    for _ in 0..2 {
        let mut child = seed
            .spawn(
                Stdio::Piped,
                Stdio::Piped,
                Stdio::Inherit,
                &SpawnOptions::default(),
            )
            .unwrap();
        let mut stdin = child.take_stdin().unwrap();
        stdin.write_all(input(name).as_bytes()).unwrap();
        drop(stdin);
        let mut out = String::new();
        child
            .take_stdout()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, want, "child {}", child.pid());
        child.wait().unwrap();
        answered.push(child.pid());
    }
    // The next spare, forked once the second spawn returned.
    let mut except = seed.template_pids();
    except.extend(&answered);
    let t = Instant::now();
    let spare = loop {
        if let Some(&p) = traced_by_us(&program, &except).first() {
            if remotefork::procfs::status(p).is_ok_and(|st| st.threads == 2) {
                break p;
            }
        }
        assert!(
            t.elapsed().as_secs() < 120,
            "no spare with 2 threads appeared: {:?}; our children (pid, tracer): {:?}",
            traced_by_us(&program, &except),
            children(std::process::id() as i32)
                .into_iter()
                .map(|p| (p, tracer_of(p)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(seed);
        let _ = tx.send(());
    });
    // A hang, not a slow drop: it took forever before.
    rx.recv_timeout(std::time::Duration::from_secs(300))
        .expect("dropping the seed never returned");
    assert!(
        !Path::new(&format!("/proc/{spare}")).exists(),
        "the spare {spare} is still there (state {:?})",
        state(spare)
    );
}
