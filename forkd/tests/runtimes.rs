//! Runtimes whose event loops hold kernel objects, captured warm from
//! outside and restored: their epoll sets, eventfds, pipes (libuv's lock
//! pipe holds one byte), socket pairs and listening sockets must come back
//! for the children to answer.
//!
//! Programs (in `tests/programs/`, and one restore case):
//!
//! - `event_loop`: the restore case `tests/cases/event_loop.c`: an epoll
//!   set over an eventfd at 5, a pipe holding bytes, a periodic timerfd and
//!   a signalfd; it checks them all itself and prints "ok";
//! - `asyncio_server`: CPython asyncio: its loop's epoll and self-pipe
//!   socket pair, a TCP server on 127.0.0.1 (`SO_REUSEPORT`), stdin read
//!   through `connect_read_pipe`; answers "N" with fib(N), an
//!   `asyncio.sleep`, and what its own server answered over a new
//!   connection;
//! - `node_server`: Node.js (libuv's three loops, its thread pool, V8's
//!   JIT), readline on stdin; answers "N" with fib(N) (BigInt), a sha256
//!   (crypto), its own size read with `fs.promises.readFile` (the thread
//!   pool) and a timer;
//! - `java_fn`: a JVM (`JavaFn.java` compiled here with javac), JIT-warm
//!   after 20,000 calls; answers "N" with fib(N), a SHA-256 and a sorted
//!   list's sum.
//!
//! Every program runs in every mode of `common/runner.rs` (eager, lazy,
//! template, remote_tcp), each cell its own test
//! (`runtimes::PROGRAM::MODE`), 20 children each; every child's whole output
//! must equal the program's own, which is checked first against answers
//! computed here.
//!
//! Root-only. A program whose runtime is missing (`node`, `java`/`javac`;
//! `forkd/scripts/deps.sh` installs them) is SKIPPED.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::runner::{self, program_file, which};
use common::*;
use sha2::{Digest, Sha256};

/// Node with libuv's io_uring off (its rings cannot be recreated) and small
/// pools.
fn node_argv() -> Option<Vec<String>> {
    let node = which("node").or_else(|| which("nodejs"))?;
    Some(vec![
        "/usr/bin/env".into(),
        "UV_USE_IO_URING=0".into(),
        "UV_THREADPOOL_SIZE=2".into(),
        node.to_string_lossy().into_owned(),
        "--v8-pool-size=2".into(),
        program_file("node_server.js")
            .to_string_lossy()
            .into_owned(),
    ])
}

/// `JavaFn.java` compiled once per test binary run, under the target dir.
fn java_classes() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let javac = which("javac")?;
        which("java")?;
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("java-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new(javac)
            .arg("-d")
            .arg(&dir)
            .arg(program_file("JavaFn.java"))
            .output()
            .expect("running javac");
        assert!(
            o.status.success(),
            "javac JavaFn.java failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Some(dir)
    })
    .clone()
}

/// The JVM without its perf-data file (a shared mapping named after the
/// parent's pid), with the serial collector and two compiler threads.
fn java_argv() -> Option<Vec<String>> {
    let classes = java_classes()?;
    Some(vec![
        which("java")?.to_string_lossy().into_owned(),
        "-XX:-UsePerfData".into(),
        "-XX:+UseSerialGC".into(),
        "-XX:CICompilerCount=2".into(),
        "-XX:-UseDynamicNumberOfCompilerThreads".into(),
        "-cp".into(),
        classes.to_string_lossy().into_owned(),
        "JavaFn".into(),
    ])
}

/// The command line of program `name`, or Err(why it cannot run here).
fn argv(name: &str) -> Result<Vec<String>, String> {
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    match name {
        "event_loop" => Ok(vec![s(&c_case("event_loop"))]),
        "asyncio_server" => Ok(vec![python().into(), s(&program_file("asyncio_server.py"))]),
        "node_server" => node_argv().ok_or_else(|| "node is not installed".to_string()),
        "java_fn" => java_argv().ok_or_else(|| "java or javac is not installed".to_string()),
        other => panic!("unknown program {other}"),
    }
}

/// What every child of program `name` is given on stdin.
fn input(name: &str) -> &'static str {
    match name {
        "event_loop" => "check\n",
        _ => "0\n10\n93\n",
    }
}

fn fib(n: u32) -> u128 {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

fn sha16(s: &str) -> String {
    Sha256::digest(s.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The answer of program `name` to line `n`, computed here.
fn answer(name: &str, n: u32) -> String {
    match name {
        "asyncio_server" => format!("fib={} sleep=ok tcp=HELLO", fib(n)),
        "node_server" => {
            let size = std::fs::metadata(program_file("node_server.js"))
                .unwrap()
                .len();
            format!(
                "fib={} sha={} file={size} timer=ok",
                fib(n),
                sha16(&n.to_string())
            )
        }
        "java_fn" => format!(
            "fib={} sha={} list={}",
            fib(n),
            sha16(&n.to_string()),
            (0..=n as u64).sum::<u64>()
        ),
        other => panic!("no answers for {other}"),
    }
}

/// Program `name` run on its own: its output, checked against the answers
/// computed here. Every child must print exactly this.
fn expected(name: &str, a: &[String]) -> String {
    let out = runner::alone(name, a, input(name));
    let want: String = match name {
        "event_loop" => "ok\n".into(),
        _ => input(name)
            .lines()
            .map(|l| answer(name, l.parse().unwrap()) + "\n")
            .collect(),
    };
    assert_eq!(out, want, "{name} on its own");
    out
}

fn run(name: &str, mode: &str) {
    runner::run("runtimes", name, mode, argv(name), input(name), |a| {
        expected(name, a)
    });
}

common::runner::cells!(event_loop, asyncio_server, node_server, java_fn);

// ---- through the gateway ----

/// The gateway's answer to `{"n": n}`, computed here, for the function of
/// `runtime` ("node" or "java"), without what differs by instance.
fn gateway_answer(runtime: &str, n: u32) -> serde_json::Value {
    let mut v = serde_json::json!({
        "n": n, "fib": fib(n).to_string(), "sha": sha16(&n.to_string()),
    });
    if runtime == "node" {
        v["file"] = std::fs::metadata(program_file("node_handler.js"))
            .unwrap()
            .len()
            .into();
    } else {
        v["list"] = (0..=n as u64).sum::<u64>().into();
    }
    v
}

/// A forkd and a gateway in front of it (at most `max` instances), and
/// `f(gateway address)` run to its end on a runtime of two threads.
fn with_gateway<F: std::future::Future<Output = ()>>(
    name: &str,
    max: u32,
    f: impl FnOnce(String) -> F,
) {
    let d = Daemon::start(&scratch(name), false);
    let gw = Gateway::start(&[
        "--node".into(),
        d.addr(),
        "--max-instances-per-node".into(),
        max.to_string(),
        "--timeout-ms".into(),
        "120000".into(),
        "--ready-timeout-ms".into(),
        "120000".into(),
        "--queue-timeout-ms".into(),
        "600000".into(),
    ]);
    rt().block_on(f(gw.addr.clone()));
}

/// `register` as a gateway function on one forkd, then 200 concurrent
/// invocations, every answer checked. Returns the answers' `rnd` values
/// (Node) and the instances' pids.
fn gateway_200(test: &str, runtime: &str, register: serde_json::Value) {
    const CALLS: u32 = 200;
    // At most 50 instances: 200 calls queue for them.
    with_gateway(&format!("runtimes-gw-{runtime}"), 50, |a| async move {
        let (st, v) = http(&a, "POST", "/functions", &register.to_string()).await;
        assert_eq!(st, 201, "{test}: registering: {v}");
        let t = std::time::Instant::now();
        let calls: Vec<_> = (1..=CALLS)
            .map(|n| {
                let a = a.clone();
                let name = runtime.to_string();
                tokio::spawn(async move {
                    let body = format!("{{\"n\": {}}}", n % 90);
                    (
                        n % 90,
                        http(&a, "POST", &format!("/invoke/{name}"), &body).await,
                    )
                })
            })
            .collect();
        let mut bad = Vec::new();
        let mut pids = std::collections::HashSet::new();
        let mut rnds = std::collections::HashSet::new();
        for c in calls {
            let (n, (st, mut v)) = c.await.unwrap();
            let o = v.as_object_mut();
            let pid = o
                .as_ref()
                .and_then(|o| o.get("pid"))
                .and_then(|p| p.as_u64());
            let rnd = o
                .and_then(|o| {
                    o.remove("pid");
                    o.remove("rnd")
                })
                .and_then(|r| r.as_f64());
            if st != 200 || v != gateway_answer(runtime, n) {
                bad.push(format!("invocation {n}: {st} {v}"));
                continue;
            }
            pids.extend(pid);
            if let Some(r) = rnd {
                if !rnds.insert(r.to_bits()) {
                    bad.push(format!("invocation {n}: Math.random() gave {r} again"));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{test}: {} of {CALLS} invocations answered wrong:\n{}",
            bad.len(),
            bad.join("\n")
        );
        println!(
            "gateway {runtime}: {CALLS} invocations answered in {:.2} s{}",
            t.elapsed().as_secs_f64(),
            if pids.is_empty() {
                String::new()
            } else {
                format!(" by {} instances", pids.len())
            }
        );
    });
}

#[test]
fn gateway_node_function_answers_200_concurrent_invocations() {
    let test = "runtimes::gateway_node_function_answers_200_concurrent_invocations";
    if !require_root(test) {
        return;
    }
    let Some(node) = which("node").or_else(|| which("nodejs")) else {
        println!("SKIPPED: {test}: node is not installed (forkd/scripts/deps.sh installs it)");
        return;
    };
    let runtime = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/node/runtime.js");
    // Checkpoint mode: the runtime checkpoints itself (the JavaScript
    // cooperative client, every thread), instances serve many calls each.
    gateway_200(
        test,
        "node",
        serde_json::json!({
            "name": "node",
            "command": [node, runtime, program_file("node_handler.js")],
            "env": {"UV_USE_IO_URING": "0"},
        }),
    );
}

#[test]
fn gateway_java_function_answers_200_concurrent_invocations() {
    let test = "runtimes::gateway_java_function_answers_200_concurrent_invocations";
    if !require_root(test) {
        return;
    }
    let (Some(java), Some(classes)) = (which("java"), java_gateway_classes()) else {
        println!(
            "SKIPPED: {test}: java or javac is not installed (forkd/scripts/deps.sh installs them)"
        );
        return;
    };
    // One-shot mode: captured from outside once warm, one call per child.
    gateway_200(
        test,
        "java",
        serde_json::json!({
            "name": "java",
            "command": [java, "-XX:-UsePerfData", "-XX:+UseSerialGC", "-XX:CICompilerCount=2",
                        "-XX:-UseDynamicNumberOfCompilerThreads", "-cp", classes,
                        "remotefork.Runtime", "JavaHandler", "--ready-line", "ready"],
            "ready_line": "ready",
        }),
    );
}

/// The Java runtime (clients/java) and the test's handler, compiled once.
fn java_gateway_classes() -> Option<PathBuf> {
    let javac = which("javac")?;
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("java-gw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = Command::new(javac)
        .arg("-d")
        .arg(&dir)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/java/remotefork/Runtime.java"))
        .arg(program_file("JavaHandler.java"))
        .output()
        .expect("running javac");
    assert!(
        o.status.success(),
        "javac failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(dir)
}

#[test]
fn gateway_python_async_handler_answers_on_its_restored_loop() {
    let test = "runtimes::gateway_python_async_handler_answers_on_its_restored_loop";
    if !require_root(test) {
        return;
    }
    const CALLS: u32 = 60;
    with_gateway("runtimes-gw-async", 20, |a| async move {
        let register = serde_json::json!({
            "name": "asyncpy",
            "command": [python(), "-m", "remotefork.runtime", program_file("async_handler.py")],
            "env": {"PYTHONPATH": Path::new(env!("CARGO_MANIFEST_DIR")).join("../python")},
        });
        let (st, v) = http(&a, "POST", "/functions", &register.to_string()).await;
        assert_eq!(st, 201, "{v}");
        let calls: Vec<_> = (0..CALLS)
            .map(|n| {
                let a = a.clone();
                tokio::spawn(async move {
                    (
                        n,
                        http(&a, "POST", "/invoke/asyncpy", &format!("{{\"n\": {n}}}")).await,
                    )
                })
            })
            .collect();
        let mut bad = Vec::new();
        for c in calls {
            let (n, (st, mut v)) = c.await.unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("pid");
            }
            let want = serde_json::json!({"n": n, "fib": fib(n).to_string(), "slept": true, "woken": 2 * n});
            if st != 200 || v != want {
                bad.push(format!("invocation {n}: {st} {v}"));
            }
        }
        assert!(bad.is_empty(), "{test}:\n{}", bad.join("\n"));
    });
}
