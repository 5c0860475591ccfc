//! `forkd` and `forkctl` as a new user meets them: one JSON vocabulary
//! (checked against docs/cli-schema.json), `--count 0` refused, quiet
//! when the output pipe closes, no colour off a terminal, JSON logs, a
//! missing daemon explained, `--env`, why a command never became a seed,
//! every child's output, aligned tables in natural order. Run as root.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SERVER: &str = r#"
import sys, os, json
print('ready', flush=True)
for line in sys.stdin:
    print(json.dumps({'got': line.strip(), 'pid': os.getpid()}), flush=True)
"#;

fn schema() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli-schema.json")
}

/// Every (definition, document) matches docs/cli-schema.json; SKIPPED
/// (false) without Python's jsonschema.
fn validate(test: &str, docs: &[(&str, Value)]) -> bool {
    let ok = Command::new(python())
        .args(["-c", "import jsonschema"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!(
            "SKIPPED: {test}: Python's jsonschema is missing (forkd/scripts/deps.sh installs it)"
        );
        return false;
    }
    let mut p = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/validate.py"))
        .arg(schema())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = String::new();
    for (def, doc) in docs {
        input.push_str(&json!({ "def": def, "doc": doc }).to_string());
        input.push('\n');
    }
    p.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "not as docs/cli-schema.json says:\n{out}"
    );
    assert_eq!(out.lines().count(), docs.len(), "{out}");
    true
}

fn json_out(r: (i32, String, String)) -> Value {
    assert_eq!(r.0, 0, "{}", r.2);
    serde_json::from_str(&r.1).unwrap_or_else(|e| panic!("{e}: {}", r.1))
}

fn input(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_string_lossy().into_owned()
}

/// The keys of a JSON object.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn the_json_of_forkd_and_forkctl_is_one_documented_vocabulary() {
    let name = "the_json_of_forkd_and_forkctl_is_one_vocabulary";
    if !require_root(name) {
        return;
    }
    let dir = scratch("cli-json");
    let d = Daemon::start(&dir, false);
    let mut docs: Vec<(&str, Value)> = Vec::new();

    let id = python_seed(|a| d.ctl(a), SERVER);
    docs.push(("seed", json_out(d.ctl(&["--json", "seed", "get", &id]))));
    docs.push(("seed_list", json_out(d.ctl(&["--json", "seed", "ls"]))));
    docs.push(("prepare", json_out(d.ctl(&["--json", "prepare", &id]))));
    let inp = input(&dir, "in", "x\n");
    let lazy = json_out(d.ctl(&["--json", "spawn", &id, "--count", "2", "--stdin", &inp]));
    let eager = json_out(d.ctl(&[
        "--json", "spawn", &id, "--count", "2", "--eager", "--stdin", &inp,
    ]));
    assert_eq!(
        eager["children"][0]["faults"], 0,
        "eager children have faults: {eager}"
    );
    docs.push(("spawn_report", lazy.clone()));
    docs.push(("spawn_report", eager));
    docs.push(("instance_list", json_out(d.ctl(&["--json", "ps"]))));
    docs.push(("node", json_out(d.ctl(&["--json", "node"]))));

    // forkd's own commands, on an image of the same program.
    let mut cmd = Command::new(python());
    cmd.args(["-c", SERVER]);
    let (target, _) = Target::start(cmd);
    wait_blocked_in_read(target.pid());
    let img = dir.join("img");
    let snap = json_out(run_forkd(&[
        "snapshot",
        "--pid",
        &target.pid().to_string(),
        "--out",
        img.to_str().unwrap(),
        "--json",
    ]));
    drop(target);
    docs.push(("snapshot", snap.clone()));
    let restore = |args: &[&str]| {
        let mut c = forkd();
        c.arg("restore").arg(&img).args(args);
        let mut p = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin.take().unwrap().write_all(b"x\n").unwrap();
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };
    let (out, _) = restore(&["--json", "--count", "2"]);
    let restored: Value = serde_json::from_str(&out).unwrap();
    let (out, _) = restore(&["--json", "--count", "2", "--eager"]);
    let restored_eager: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(restored_eager["children"][1]["faults"], 0);
    // One child: its output is its own; the report goes to stderr.
    let (out, err) = restore(&["--json"]);
    assert!(out.starts_with("{\"got\": \"x\""), "{out}");
    let single: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    docs.push(("spawn_report", restored.clone()));
    docs.push(("spawn_report", restored_eager));
    docs.push(("spawn_report", single));
    if !validate(name, &docs) {
        return;
    }
    // The same names in both, beyond what the schema allows.
    let (a, b) = (&lazy["children"][0], &restored["children"][0]);
    let mut kb = keys(b);
    kb.retain(|k| k != "local");
    assert_eq!(keys(a), kb);
    assert_eq!(keys(&lazy), keys(&restored));
    for k in ["vmas", "image_bytes", "pause_ms", "capture_ms"] {
        assert!(docs[0].1[k].is_number() && snap[k].is_number(), "{k}");
    }
}

#[test]
fn count_zero_is_refused_by_both() {
    for mut c in [forkd(), forkctl()] {
        let o = if c.get_program().to_string_lossy().ends_with("forkd") {
            c.args(["restore", "/nonexistent", "--count", "0"]).output()
        } else {
            c.args(["--addr", "unix:/nonexistent", "spawn", "s", "--count", "0"])
                .output()
        }
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("invalid value '0' for '--count"), "{err}");
    }
}

/// Run `cmd` with its stdout a pipe nobody reads: (exit code, stderr).
fn into_closed_pipe(mut cmd: Command) -> (Option<i32>, String) {
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let o = cmd.stdout(w).stderr(Stdio::piped()).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    if !require_root("a_closed_output_pipe_ends_the_command_quietly") {
        return;
    }
    let dir = scratch("cli-pipe");
    let d = Daemon::start(&dir, false);
    let (target, _) = Target::start(Command::new(c_program("capture_target")));
    let id = seed_from_target(|a| d.ctl(a), target);
    let inp = input(&dir, "in", "1\n");
    assert_eq!(d.ctl(&["spawn", &id, "--count", "3", "--stdin", &inp]).0, 0);
    let img = d.dir.join("state/seeds").join(&id);
    let mut cases = Vec::new();
    let mut c = forkd();
    c.args(["inspect", "--json"]).arg(&img);
    cases.push(c);
    let mut c = forkd();
    c.arg("inspect").arg(&img);
    cases.push(c);
    for args in [&["ps"][..], &["seed", "ls"], &["--json", "ps"], &["node"]] {
        let mut c = forkctl();
        c.args(["--addr", &d.addr()]).args(args);
        cases.push(c);
    }
    let mut c = forkctl();
    c.args([
        "--addr",
        &d.addr(),
        "spawn",
        &id,
        "--count",
        "2",
        "--stdin",
        &inp,
    ]);
    cases.push(c);
    for c in cases {
        let what = format!("{c:?}");
        let (code, err) = into_closed_pipe(c);
        // As a shell reports a command SIGPIPE ended; not a word said.
        assert_eq!(code, Some(141), "{what}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{what}: {err}"
        );
        // Notes about the children (what they could not keep) are said
        // before any output; nothing about the pipe is.
        let said: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("forkctl: note: "))
            .collect();
        assert!(
            said.iter()
                .all(|l| l.trim().is_empty() || l.contains("started, ")),
            "{what}: {err}"
        );
    }
}

#[test]
fn a_missing_daemon_names_the_socket_and_how_to_start_forkd() {
    let dir = scratch("cli-nodaemon");
    let sock = dir.join("none.sock");
    let (code, _, err) = run_forkctl(&format!("unix:{}", sock.display()), None, &["ps"]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{} does not exist", sock.display()))
            && err.contains(&format!("forkd serve --socket {}", sock.display()))
            && err.contains("FORKD_ADDR"),
        "{err}"
    );
    assert!(!err.contains("transport error"), "{err}");
    // The default address, when none is given.
    let o = forkctl()
        .arg("node")
        .env("FORKD_ADDR", format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    // A stale socket file nobody listens on.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (_, _, err) = run_forkctl(&format!("unix:{}", stale.display()), None, &["ps"]);
    assert!(err.contains("nothing listens on"), "{err}");
    let (_, _, err) = run_forkctl("127.0.0.1:1", None, &["ps"]);
    assert!(
        err.contains("connection refused") && err.contains("--listen"),
        "{err}"
    );
}

/// `forkd serve FLAGS` with its stderr in a file, until it answers; then stopped.
fn serve_logging(dir: &Path, flags: &[&str]) -> String {
    let log = dir.join("log");
    let mut child = forkd()
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(flags)
        .env("FORKD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = format!("unix:{}", dir.join("sock").display());
    let t = Instant::now();
    while run_forkctl(&addr, None, &["node"]).0 != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "forkd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(log).unwrap()
}

#[test]
fn logs_are_plain_off_a_terminal_and_json_for_collectors() {
    if !require_root("logs_are_plain_off_a_terminal_and_json_for_collectors") {
        return;
    }
    let dir = scratch("cli-logs");
    let text = serve_logging(&dir, &[]);
    assert!(
        text.contains("forkd serving") && text.contains("draining"),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file: {text:?}"
    );
    let dir = scratch("cli-logs-json");
    let log = serve_logging(&dir, &["--log-format", "json"]);
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "forkd serving"
            && l["level"] == "INFO"
            && l["socket"].is_string()),
        "{log}"
    );
    assert!(lines
        .iter()
        .all(|l| l["timestamp"].is_string() && l["target"].is_string()));
}

#[test]
fn seed_create_takes_env_and_says_why_a_command_never_became_a_seed() {
    if !require_root("seed_create_takes_env_and_says_why") {
        return;
    }
    let dir = scratch("cli-env");
    let d = Daemon::start(&dir, false);
    let py = python().to_string();
    let script = "import os, sys\nprint('ready', flush=True)\nsys.stdin.readline()\nprint(os.environ['GREETING'], os.environ['OTHER'], os.getcwd())";
    let (code, id, err) = d.ctl(&[
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--env",
        "GREETING=hello there",
        "--env",
        "OTHER=a=b",
        "--cwd",
        "/tmp",
        "--",
        &py,
        "-c",
        script,
    ]);
    assert_eq!(code, 0, "{err}");
    let inp = input(&dir, "in", "\n");
    let (code, out, err) = d.ctl(&["spawn", id.trim(), "--stdin", &inp]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "hello there a=b /tmp\n");
    let (code, _, err) = d.ctl(&[
        "seed",
        "create",
        "--ready-line",
        "r",
        "--env",
        "NOEQUALS",
        "--",
        "true",
    ]);
    assert!(
        code == 1 && err.contains("--env \"NOEQUALS\" is not KEY=VALUE"),
        "{err}"
    );

    // Exits before its ready line: its status and the end of its stderr.
    let (code, _, err) = d.ctl(&[
        "seed", "create", "--ready-line", "ready", "--", &py, "-c",
        "import sys\nfor i in range(40): print('warming', i, file=sys.stderr)\nraise SystemExit('cannot ' + 'import numpy')",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("exited with status 1 before printing \"ready\" on stdout")
            && err.contains("its stderr ends:")
            && err.contains("warming 39")
            && err.contains("cannot import numpy")
            && err.contains("FailedPrecondition"),
        "{err}"
    );
    // The ready line went to stderr.
    let (code, _, err) = d.ctl(&[
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--",
        &py,
        "-c",
        "import sys\nprint('ready', file=sys.stderr, flush=True)",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("it printed \"ready\" on stderr, but forkd reads the ready line from stdout"),
        "{err}"
    );
}

#[test]
fn spawn_shows_every_childs_output_and_tables_read_well() {
    if !require_root("spawn_shows_every_childs_output_and_tables_read_well") {
        return;
    }
    let dir = scratch("cli-out");
    let d = Daemon::start(&dir, false);
    let id = python_seed(|a| d.ctl(a), SERVER);
    let inp = input(&dir, "in", "q\n");
    // Text mode: each child's output, in index order.
    let (code, out, err) = d.ctl(&["spawn", &id, "--count", "12", "--stdin", &inp]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12, "{out}");
    assert!(err.contains("12 started, 0 failed"), "{err}");
    // --output-dir: files instead, as forkd restore names them.
    let od = dir.join("outs");
    let (code, out, err) = d.ctl(&[
        "spawn",
        &id,
        "--count",
        "3",
        "--stdin",
        &inp,
        "--output-dir",
        od.to_str().unwrap(),
    ]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    for i in 0..3 {
        let s = std::fs::read_to_string(od.join(format!("child-{i}.out"))).unwrap();
        assert!(s.starts_with("{\"got\": \"q\""), "{s}");
    }

    // ps: aligned columns, instances in natural order (…-2 before …-10).
    let (_, ps, _) = d.ctl(&["ps"]);
    let rows: Vec<&str> = ps.lines().collect();
    assert_eq!(rows.len(), 16, "{ps}");
    let head = rows[0];
    let pid_end = head.find("PID").unwrap() + 3;
    let state_at = head.find("STATE").unwrap();
    let mut nums = Vec::new();
    for r in &rows[1..] {
        assert!(r.as_bytes()[pid_end - 1].is_ascii_digit(), "{ps}");
        assert_eq!(&r[pid_end..state_at], "  ", "{ps}");
        nums.push(
            r.split_whitespace()
                .next()
                .unwrap()
                .rsplit('-')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    let mut sorted = nums.clone();
    sorted.sort_unstable();
    assert_eq!(nums, sorted, "{ps}");
    let (_, ls, _) = d.ctl(&["seed", "ls"]);
    assert!(
        ls.starts_with("ID  ") && ls.lines().nth(1).unwrap().starts_with(&id),
        "{ls}"
    );

    // node: text unless --json.
    let (code, node, _) = d.ctl(&["node"]);
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<Value>(&node).is_err(), "{node}");
    assert!(
        node.contains("kernel:") && node.contains("transport:"),
        "{node}"
    );
    let (_, get, _) = d.ctl(&["seed", "get", &id]);
    assert!(get.contains("parent paused:") && get.contains(&id), "{get}");
}

#[test]
fn a_large_capture_shows_progress_on_a_terminal_only() {
    if !require_root("a_large_capture_shows_progress_on_a_terminal_only") {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        println!("SKIPPED: a_large_capture_shows_progress: `script` (util-linux) is missing");
        return;
    }
    let dir = scratch("cli-progress");
    // 800 MiB of touched memory: a capture of seconds.
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import sys\nb = bytearray(800 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\nsys.stdin.readline()",
    ]);
    let (target, _) = Target::start(cmd);
    let pid = target.pid().to_string();
    // Under a terminal (script(1) gives it one): the line, then cleared.
    let img = dir.join("a");
    let typescript = dir.join("typescript");
    let line = format!(
        "{} snapshot --pid {pid} --out {}",
        env!("CARGO_BIN_EXE_forkd"),
        img.display()
    );
    let st = Command::new("script")
        .args(["-qec", &line])
        .arg(&typescript)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let shown = std::fs::read_to_string(&typescript).unwrap();
    assert!(
        shown.contains(&format!("capturing pid {pid}: ")) && shown.contains(" MiB ("),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("captured pid {pid} into")),
        "{shown}"
    );
    // 800 MiB twice is more than a small CI disk should hold at once.
    std::fs::remove_dir_all(&img).unwrap();
    // Off a terminal: not a word of it.
    let b = dir.join("b");
    let (code, _, err) = run_forkd(&["snapshot", "--pid", &pid, "--out", b.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("capturing") && !err.contains('\x1b'), "{err}");
    drop(target);
}
