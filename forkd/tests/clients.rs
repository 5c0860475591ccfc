//! forkd as stock gRPC clients meet it: Python's grpcio and Node's
//! @grpc/grpc-js call every RPC with default channel options over the
//! Unix socket and over TCP (forkd/tests/conformance/); a stock health
//! client sees SERVING, then NOT_SERVING while forkd drains; reflection
//! lists the API; the Python and Node client packages' examples run. Run
//! as root; skipped where grpcio (PyPI) or grpc-js (npm, clients/node)
//! is not installed (forkd/scripts/deps.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// grpcio, its tools, health and reflection clients, and the generated
/// stubs (made once per test run); false after printing SKIPPED.
fn python_grpc(test: &str) -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let r = READY.get_or_init(|| {
        let o = Command::new(python())
            .args(["-c", "import grpc, grpc_tools, grpc_health.v1, grpc_reflection"])
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "grpcio, grpcio-tools, grpcio-health-checking or grpcio-reflection missing for {} (forkd/scripts/deps.sh installs them)",
                python()
            ));
        }
        // The stubs are generated, never stale: forkd.proto may have changed.
        let o = Command::new(python())
            .args(["-m", "remotefork.generate"])
            .current_dir(repo().join("python"))
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(format!(
                "python3 -m remotefork.generate failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Ok(())
    });
    match r {
        Ok(()) => true,
        Err(why) => {
            println!("SKIPPED: {test}: {why}");
            false
        }
    }
}

/// Node and clients/node's npm packages; false after printing SKIPPED.
fn node_grpc(test: &str) -> bool {
    let node = Command::new("node").arg("--version").output();
    let modules = repo().join("clients/node/node_modules/@grpc/grpc-js");
    if node.is_err() || !modules.exists() {
        println!(
            "SKIPPED: {test}: node or clients/node/node_modules missing (forkd/scripts/deps.sh runs npm ci there)"
        );
        return false;
    }
    true
}

/// Run `cmd` to its end (killed after 10 minutes, a hang): (code, stdout, stderr).
fn run(mut cmd: Command) -> (i32, String, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(600) {
            std::thread::sleep(Duration::from_millis(200));
            if state(pid).is_none_or(|s| s == 'Z') {
                return;
            }
        }
        // SAFETY: plain kill(2) of our child, still unreaped (a zombie at worst).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let o = child.wait_with_output().unwrap();
    let _ = watchdog.join();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    println!("--- {cmd:?}\n{out}{err}");
    (o.status.code().unwrap_or(-1), out, err)
}

/// A forkd with TCP (token), a page server, and commands allowed over TCP
/// (the clients create seeds from commands with the node token).
fn daemon(name: &str, extra: &[&str]) -> (Daemon, String) {
    let dir = scratch(name);
    let page = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--page-listen", page.as_str(), "--remote-commands"];
    args.extend_from_slice(extra);
    let d = Daemon::start_with(&dir, true, &args);
    let token = std::fs::read_to_string(dir.join("token"))
        .unwrap()
        .trim()
        .to_string();
    (d, token)
}

/// `check(addr, token)` over `d`'s Unix socket (no token), then over TCP.
fn over_unix_and_tcp(d: &Daemon, check: impl Fn(&str, Option<&str>)) {
    let token = std::fs::read_to_string(d.dir.join("token")).unwrap();
    check(&d.addr(), None);
    check(d.tcp.as_deref().unwrap(), Some(token.trim()));
}

const CHECKS: &[&str] = &[
    "NodeInfo",
    "CreateSeed(command)",
    "CreateSeed(pid)",
    "GetSeed",
    "ListSeeds",
    "Spawn(stream)",
    "Watch(stream)",
    "ListInstances",
    "KillInstance",
    "FetchDescriptor",
    "OpenPageChannel",
    "DropSeed",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
];

fn assert_conformant(code: i32, out: &str, tcp: bool) {
    assert_eq!(code, 0, "conformance failed:\n{out}");
    let mut want: Vec<&str> = CHECKS.to_vec();
    if tcp {
        want.push("UNAUTHENTICATED");
    }
    for c in want {
        assert!(
            out.lines().any(|l| l == format!("ok {c}")),
            "no `ok {c}` in:\n{out}"
        );
    }
    assert!(!out.lines().any(|l| l.starts_with("FAIL")), "{out}");
}

#[test]
fn python_grpcio_calls_every_rpc_with_default_options_over_unix_and_tcp() {
    let name = "python_grpcio_calls_every_rpc";
    if !require_root(name) || !python_grpc(name) {
        return;
    }
    let (d, _) = daemon("clients-py", &[]);
    over_unix_and_tcp(&d, |addr, token| {
        let mut cmd = Command::new(python());
        cmd.arg(conformance_dir().join("conformance.py"))
            .args(["--addr", addr, "--python", python()])
            .env("PYTHONPATH", repo().join("python"));
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let (code, out, _) = run(cmd);
        assert_conformant(code, &out, token.is_some());
    });
}

#[test]
fn node_grpc_js_calls_every_rpc_with_default_options_over_unix_and_tcp() {
    let name = "node_grpc_js_calls_every_rpc";
    if !require_root(name) || !node_grpc(name) {
        return;
    }
    let (d, _) = daemon("clients-node", &[]);
    over_unix_and_tcp(&d, |addr, token| {
        let mut cmd = Command::new("node");
        cmd.arg(conformance_dir().join("conformance.js"))
            .args(["--addr", addr, "--python", python()])
            .env("NODE_PATH", repo().join("clients/node/node_modules"));
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let (code, out, _) = run(cmd);
        assert_conformant(code, &out, token.is_some());
    });
}

fn health(args: &[&str]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(conformance_dir().join("health.py"))
        .args(args)
        .env("PYTHONPATH", repo().join("python"));
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    out
}

/// A seed whose children wait for `release` to exist, then answer.
const WAITER: &str = r#"
import os, sys, time
print("ready", flush=True)
path = sys.stdin.readline().strip()
while not os.path.exists(path):
    time.sleep(0.05)
print("released", os.getpid(), flush=True)
"#;

#[test]
fn health_serving_then_not_serving_while_draining_and_reflection_lists_the_api() {
    let name = "health_and_reflection";
    if !require_root(name) || !python_grpc(name) {
        return;
    }
    // A long grace: the drain ends when the spawn under way does.
    let (d, token) = daemon("clients-health", &["--drain-s", "600"]);
    let tcp = d.tcp.clone().unwrap();
    let unix = d.addr();
    let serving = "(server) SERVING\nforkd.v1.Forkd SERVING\n";
    assert_eq!(health(&["check", &unix]), serving);
    // Over TCP without a token: probes and load balancers send none.
    assert_eq!(health(&["check", &tcp]), serving);

    let out = health(&["reflect", &unix]);
    assert!(
        out.lines().next().unwrap().contains(" forkd.v1.Forkd")
            && out.contains("grpc.health.v1.Health"),
        "{out}"
    );
    assert!(
        out.contains("methods CreateSeed GetSeed ListSeeds DropSeed Spawn"),
        "{out}"
    );
    assert!(health(&["reflect", &tcp, &token]).contains(" forkd.v1.Forkd"));
    assert_eq!(health(&["reflect", &tcp]), "status UNAUTHENTICATED\n");

    // A spawn under way when SIGTERM comes.
    let seed = python_seed(|a| d.ctl(a), WAITER);
    let release = d.dir.join("release");
    let input = d.dir.join("in");
    std::fs::write(&input, format!("{}\n", release.display())).unwrap();
    let spawn = forkctl()
        .args(["--addr", &unix, "--json", "spawn", &seed, "--stdin"])
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !d.ctl(&["ps"]).1.contains("running") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the child never ran"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        let out = health(&["check", &unix]);
        if out == "(server) NOT_SERVING\nforkd.v1.Forkd NOT_SERVING\n" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Draining: new spawns are refused, with a reason; the old one runs on.
    let out = health(&["spawn", &unix, &seed]);
    assert!(
        out.starts_with("status UNAVAILABLE forkd is shutting down"),
        "{out}"
    );
    let (code, _, err) = d.ctl(&["spawn", &seed]);
    assert!(code != 0 && err.contains("shutting down"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let mut d = d;
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "forkd waits for the spawn"
    );

    std::fs::write(&release, "").unwrap();
    let out = spawn.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["children"][0]["stdout"]
            .as_str()
            .is_some_and(|s| s.starts_with("released")),
        "{v}"
    );
    // Then forkd stops by itself, cleanly.
    let t = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "forkd did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn python_client_example_spawns_children_that_answer() {
    let name = "python_client_example";
    if !require_root(name) || !python_grpc(name) {
        return;
    }
    let (d, _) = daemon("clients-pyex", &[]);
    over_unix_and_tcp(&d, |addr, token| {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("python/examples/forkd_client.py"))
            .arg(addr)
            .env("PYTHONPATH", repo().join("python"));
        if token.is_some() {
            cmd.env("FORKD_TOKEN_FILE", d.dir.join("token"));
        }
        assert_example(run(cmd), "'square': 144}");
    });
}

/// An example ran to its end: three children answered, one was killed.
fn assert_example((code, out, err): (i32, String, String), answer: &str) {
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches(answer).count(), 3, "{out}");
    assert!(out.contains("ended by signal 9") && out.ends_with("example ok\n"));
}

#[test]
fn node_client_example_spawns_children_that_answer() {
    let name = "node_client_example";
    if !require_root(name) || !node_grpc(name) {
        return;
    }
    let (d, _) = daemon("clients-nodeex", &[]);
    over_unix_and_tcp(&d, |addr, token| {
        let mut cmd = Command::new("node");
        cmd.arg(repo().join("clients/node/examples/spawn.js"))
            .args([addr, python()]);
        if token.is_some() {
            cmd.env("FORKD_TOKEN_FILE", d.dir.join("token"));
        }
        assert_example(run(cmd), "\"square\":144}");
    });
}

/// Reads all its stdin, answers with its length and checksum.
const SUMMER: &str = r#"
import sys, hashlib
print("ready", flush=True)
data = sys.stdin.buffer.read()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"#;

#[test]
fn large_requests_and_answers_cross_the_unix_socket_intact() {
    if !require_root("large_requests_cross_the_unix_socket_intact") {
        return;
    }
    // Every Unix-socket connection goes through daemon/authority.rs: a
    // 3.5 MiB stdin (some 200 DATA frames; gRPC messages are at most 4 MiB)
    // and many small calls.
    let (d, _) = daemon("clients-large", &[]);
    let id = python_seed(|a| d.ctl(a), SUMMER);
    let data: Vec<u8> = (0..(7u32 << 19))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let input = d.dir.join("big");
    std::fs::write(&input, &data).unwrap();
    let (code, out, err) = d.ctl(&[
        "spawn",
        &id,
        "--count",
        "2",
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let sum = Command::new("sha256sum").arg(&input).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(out, format!("{} {sum}\n", data.len()).repeat(2));
    for _ in 0..50 {
        assert_eq!(d.ctl(&["ps"]).0, 0);
    }
}
