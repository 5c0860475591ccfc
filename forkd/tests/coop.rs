//! The cooperative checkpoint API in Python, Rust and C, against a real
//! `forkd serve`: the parent continues, ten children each know who they are
//! and compute with the parent's warm state. Run as root.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Run a program that checkpoints itself; return its seed id after checking
/// the parent carried on.
fn run_parent(d: &Daemon, mut cmd: Command) -> String {
    let o = cmd
        .env("FORKD_COOP_SOCKET", d.dir.join("sock.coop"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "parent failed: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("parent continues"), "{out}");
    out.lines()
        .find_map(|l| l.strip_prefix("parent seed="))
        .unwrap()
        .to_string()
}

/// The real Python running `tests/programs/FILE`, with the pure-Python
/// client on its path.
fn python_program(file: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/programs")
            .join(file),
    );
    cmd.env(
        "PYTHONPATH",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
    );
    cmd
}

/// Spawn ten children with `args` and check each knows its index.
fn ten_children(d: &Daemon, seed: &str, args: &str, sum: u64, stdin_line: Option<&str>) {
    let input = d.dir.join(format!("in-{seed}"));
    std::fs::write(&input, format!("{}\n", stdin_line.unwrap_or(""))).unwrap();
    let (code, out, err) = d.ctl(&[
        "--json",
        "spawn",
        seed,
        "--count",
        "10",
        "--args",
        args,
        "--stdin",
        input.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut seen = Vec::new();
    let mut randoms = std::collections::HashSet::new();
    for c in v["children"].as_array().unwrap() {
        assert_eq!(c["exit_code"], 0, "{c}");
        let a: Value = serde_json::from_str(c["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(a["child"], c["index"], "I am child k, for the k forkd gave");
        assert_eq!(a["instance"], c["instance"]);
        assert_eq!(a["args"], args);
        assert_eq!(a["sum"], sum, "computed from the parent's warm state");
        if let Some(l) = stdin_line {
            assert_eq!(a["line"], l, "the rest of stdin is the child's");
        }
        assert_eq!(
            a["hook_pid"], c["pid"],
            "the restore hook ran in the child itself"
        );
        if let Some(r) = a.get("random") {
            randoms.insert(r.to_string());
        }
        seen.push(a["child"].as_u64().unwrap());
    }
    if !randoms.is_empty() {
        assert_eq!(
            randoms.len(),
            10,
            "every child draws its own random numbers: {randoms:?}"
        );
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<u64>>());
}

#[test]
fn python_checkpoint_returns_twice() {
    if !require_root("python_checkpoint_returns_twice") {
        return;
    }
    let dir = scratch("coop-py");
    let d = Daemon::start(&dir, false);
    let cmd = python_program("coop_python.py");
    let seed = run_parent(&d, cmd);
    let sum: u64 = (0..50_000u64).map(|i| i * i).sum();
    ten_children(&d, &seed, "py-args", sum, Some("the rest of stdin"));
}

#[test]
fn rust_checkpoint_returns_twice() {
    if !require_root("rust_checkpoint_returns_twice") {
        return;
    }
    let dir = scratch("coop-rs");
    let d = Daemon::start(&dir, false);
    let exe = std::env::current_exe().unwrap();
    let prog = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/coop_rust");
    let seed = run_parent(&d, Command::new(prog));
    let sum: u64 = (0..100_000u64).map(|i| i * 7 + 3).sum();
    ten_children(&d, &seed, "rs-args", sum, None);
}

/// Compile `tests/programs/NAME.c` against libremotefork into `dir`.
fn compile_c(dir: &Path, name: &str) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = std::env::current_exe().unwrap();
    let libdir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        libdir.join("libremotefork.so").exists(),
        "libremotefork.so not built in {}",
        libdir.display()
    );
    let prog = dir.join(name);
    let st = Command::new("cc")
        .arg("-O1")
        .arg("-pthread")
        .arg("-o")
        .arg(&prog)
        .arg(root.join(format!("forkd/tests/programs/{name}.c")))
        .arg(format!(
            "-I{}",
            root.join("libremotefork/include").display()
        ))
        .arg(format!("-L{}", libdir.display()))
        .arg("-lremotefork")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .status()
        .unwrap();
    assert!(st.success());
    prog
}

#[test]
fn c_checkpoint_returns_twice() {
    if !require_root("c_checkpoint_returns_twice") {
        return;
    }
    let dir = scratch("coop-c");
    let d = Daemon::start(&dir, false);
    let prog = compile_c(&dir, "coop_c");
    let seed = run_parent(&d, Command::new(&prog));
    let sum: u64 = (0..100_000u64).map(|i| i * 7 + 3).sum();
    ten_children(&d, &seed, "c-args", sum, None);
}

/// `checkpoint(all_threads=True)`: the worker thread and its queue are in
/// the seed; every child hands it a job and gets the answer from it, with
/// its own random numbers, hook and stdin. The parent's worker runs on.
#[test]
fn python_checkpoint_all_threads_keeps_the_worker_thread() {
    if !require_root("python_checkpoint_all_threads_keeps_the_worker_thread") {
        return;
    }
    let dir = scratch("coop-py-threads");
    let d = Daemon::start(&dir, false);
    let cmd = python_program("coop_python_threads.py");
    let seed = run_parent(&d, cmd);
    let sum: u64 = (0..50_000u64).map(|i| i * i).sum();
    ten_children(&d, &seed, "py-args", sum, Some("the rest of stdin"));
    // The answers came from the worker thread itself, alive in each child.
    let (code, out, err) = d.ctl(&["--json", "spawn", &seed, "--count", "3"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for c in v["children"].as_array().unwrap() {
        let a: Value = serde_json::from_str(c["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(
            (a["worker"].as_str(), a["threads"].as_u64()),
            (Some("rf-worker"), Some(2)),
            "{a}"
        );
    }
}

/// `rf_checkpoint_all_threads()`: a worker parked on a condition variable
/// is in the seed and computes each child's answer.
#[test]
fn c_checkpoint_all_threads_keeps_the_worker_thread() {
    if !require_root("c_checkpoint_all_threads_keeps_the_worker_thread") {
        return;
    }
    let dir = scratch("coop-c-threads");
    let d = Daemon::start(&dir, false);
    let prog = compile_c(&dir, "coop_c_threads");
    let seed = run_parent(&d, Command::new(&prog));
    let sum: u64 = (0..100_000u64).map(|i| i * 7 + 3).sum();
    ten_children(&d, &seed, "c-args", sum, None);
}

/// The fork-like `checkpoint()` of a process with threads says that only
/// the calling thread is kept.
#[test]
fn checkpoint_of_a_threaded_caller_says_only_its_thread_is_kept() {
    let o = Command::new(python())
        .args([
            "-c",
            "import threading, time, remotefork\n\
             threading.Thread(target=time.sleep, args=(2,), daemon=True).start()\n\
             try:\n    remotefork.checkpoint('x', socket_path='/nonexistent/forkd.coop')\n\
             except remotefork.CheckpointError as e:\n    print('refused', e)\n",
        ])
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../python"),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("keeps only the calling thread") && err.contains("1 other thread"),
        "{err}"
    );
}

#[test]
fn checkpoint_without_forkd_fails_clearly_in_the_parent() {
    let mut cmd = python_program("coop_python.py");
    cmd.env("FORKD_COOP_SOCKET", "/nonexistent/forkd.sock.coop");
    let o = cmd.output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FileNotFoundError") || err.contains("No such file"),
        "{err}"
    );
}
