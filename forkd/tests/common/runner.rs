//! Real programs in every restore mode, 20 children each: the cells of
//! `threads.rs` and `runtimes.rs`.
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
//! while the program waits for its input. Every child gets the same input,
//! and its whole output must equal what the program printed run on its own.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// Children per cell.
pub const CHILDREN: u32 = 20;
/// A restore or spawn of 20 children that takes longer than this is hung.
pub const LIMIT: Duration = Duration::from_secs(300);

/// A file of `tests/programs/`.
pub fn program_file(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(file)
}

/// `name` on PATH, as an absolute path.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// Program `name` (`argv`) run on its own with `input`: its output after
/// its ready line (which must start with "ready").
pub fn alone(name: &str, argv: &[String], input: &str) -> String {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let (code, out, err) = run_bounded(cmd, input, &format!("{name} on its own"), &[]);
    assert_eq!(code, Some(0), "{name} on its own failed: {out}{err}");
    match out.split_once('\n') {
        Some((first, rest)) if first.starts_with("ready") => rest.to_string(),
        _ => panic!("{name} on its own did not start with ready: {out}"),
    }
}

/// The test of one cell of `suite`: program `name` in `mode`, its command
/// line `argv` (or why it cannot run here: the test says SKIPPED), every
/// child given `input` and printing what `expected(argv)` says.
pub fn run(
    suite: &str,
    name: &str,
    mode: &str,
    argv: Result<Vec<String>, String>,
    input: &str,
    expected: impl FnOnce(&[String]) -> String,
) {
    let test = format!("{suite}::{name}::{mode}");
    if !require_root(&test) {
        return;
    }
    let a = match argv {
        Ok(a) => a,
        Err(why) => {
            println!("SKIPPED: {test}: {why} (forkd/scripts/deps.sh installs it)");
            return;
        }
    };
    let want = expected(&a);
    cell(name, mode, &a, input, &want);
}

/// One cell: program `name` (`argv`) in `mode`, 20 children given `input`,
/// each of whose whole output must be `want`.
pub fn cell(name: &str, mode: &str, argv: &[String], input: &str, want: &str) {
    let local = || local_seed(name, mode, argv);
    let report = match mode {
        "eager" => restore_children(name, mode, &local(), &["--eager", "--no-template"], input),
        "lazy" => restore_children(name, mode, &local(), &["--no-template"], input),
        "template" => restore_children(name, mode, &local(), &[], input),
        "remote_tcp" => remote_children(name, argv, input),
        other => panic!("unknown mode {other}"),
    };
    assert_children(name, mode, &report, want);
}

/// Every descendant of `root` (by parent pid, from /proc).
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent = std::collections::HashMap::<i32, Vec<i32>>::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parent.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in parent.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// SIGKILL every descendant of `root`.
pub fn kill_descendants(root: i32) {
    for p in descendants(root) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// Run `cmd` with `input` on its stdin: (exit code, stdout, stderr). A run
/// longer than LIMIT is a hang: it, its descendants and those of `also`
/// (a daemon whose children it started) are killed and the test fails.
pub fn run_bounded(
    mut cmd: Command,
    input: &str,
    what: &str,
    also: &[i32],
) -> (Option<i32>, String, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            let _ = tx.send(String::from_utf8_lossy(&s).into_owned());
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let t = Instant::now();
    let hung = |child: &mut std::process::Child| -> ! {
        kill_descendants(child.id() as i32);
        for &a in also {
            kill_descendants(a);
        }
        let _ = child.kill();
        let _ = child.wait();
        let so_far = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        panic!("{what}: still running after {LIMIT:?}, killed; its stderr: {so_far}");
    };
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t.elapsed() > LIMIT {
            hung(&mut child);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let left = LIMIT.saturating_sub(t.elapsed()) + Duration::from_secs(10);
    let out = out
        .recv_timeout(left)
        .unwrap_or_else(|_| panic!("{what}: ended but its stdout stayed open"));
    let err = err
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    (code, out, err)
}

// ---- the modes ----

/// Every child in a `--json` spawn report answered exactly `want`.
pub fn assert_children(name: &str, mode: &str, report: &Value, want: &str) {
    let kids = report["children"]
        .as_array()
        .unwrap_or_else(|| panic!("{name} {mode}: no children in {report}"));
    assert_eq!(kids.len(), CHILDREN as usize, "{name} {mode}: {report}");
    let mut pids = std::collections::HashSet::new();
    let mut bad = Vec::new();
    for k in kids {
        let ok = k["exit_code"] == 0 && k["stdout"].as_str() == Some(want);
        if !ok {
            bad.push(format!(
                "child {} (pid {}): exit {} signal {} reason {} notes {}; stdout {:?}",
                k["index"],
                k["pid"],
                k["exit_code"],
                k["signal"],
                k["reason"],
                k["notes"],
                k["stdout"]
            ));
        }
        if let Some(p) = k["pid"].as_i64() {
            assert!(pids.insert(p), "{name} {mode}: two children with pid {p}");
        }
    }
    assert!(
        bad.is_empty(),
        "{name} {mode}: {} of {CHILDREN} children answered wrong (want {want:?}):\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(report["failed"], 0, "{name} {mode}: {report}");
}

/// A seed of program `name` captured from outside (`forkd snapshot`) while
/// it waits for input.
pub fn local_seed(name: &str, mode: &str, a: &[String]) -> PathBuf {
    let mut cmd = Command::new(&a[0]);
    cmd.args(&a[1..]);
    seed_of(cmd, &format!("cells-{name}-{mode}")).0
}

/// `forkd restore SEED ARGS --count 20 --json` with the program's input.
pub fn restore_children(name: &str, mode: &str, seed: &Path, args: &[&str], input: &str) -> Value {
    let mut cmd = forkd();
    cmd.arg("restore")
        .arg(seed)
        .args(args)
        .args(["--count", &CHILDREN.to_string(), "--json"]);
    let what = format!("{name} {mode}: forkd restore {args:?}");
    let (code, out, err) = run_bounded(cmd, input, &what, &[]);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|_| panic!("{what}: exit {code:?}, no report: {out}{err}"))
}

/// A seed of program `name` on one forkd, 20 children on another paged
/// over TCP.
pub fn remote_children(name: &str, a_argv: &[String], input: &str) -> Value {
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let base = scratch(&format!("cells-{name}-remote"));
    let (da, db) = (base.join("a"), base.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = Daemon::start_with(&da, true, &["--page-listen", &free()]);
    let b = Daemon::start_with(&db, true, &["--transport", "tcp"]);
    let argv: Vec<&str> = a_argv.iter().map(String::as_str).collect();
    let id = command_seed(|x| a.ctl(x), &[], &argv);
    let (code, r, err) = a.ctl(&["seed", "ref", &id, "--origin", &a.tcp.clone().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let stdin = base.join("input");
    std::fs::write(&stdin, input).unwrap();
    let mut cmd = forkctl();
    cmd.arg("--addr").arg(b.addr()).args([
        "--json",
        "spawn",
        r.trim(),
        "--count",
        &CHILDREN.to_string(),
        "--stdin",
        stdin.to_str().unwrap(),
    ]);
    let what = format!("{name} remote_tcp: forkctl spawn on node b");
    let (code, out, err) = run_bounded(cmd, "", &what, &[b.child.id() as i32]);
    assert_eq!(code, Some(0), "{what}: {out}{err}");
    let v = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{what}: {out}{err}"));
    a.stop();
    b.stop();
    v
}

/// One module per program, one test per mode, each calling the suite's
/// `run(program, mode)`.
#[allow(unused_macros)] // not every test binary has cells
macro_rules! cells {
    ($($prog:ident),* $(,)?) => {
        $(
            #[allow(non_snake_case)]
            mod $prog {
                #[test] fn eager() { super::run(stringify!($prog), "eager") }
                #[test] fn lazy() { super::run(stringify!($prog), "lazy") }
                #[test] fn template() { super::run(stringify!($prog), "template") }
                #[test] fn remote_tcp() { super::run(stringify!($prog), "remote_tcp") }
            }
        )*
    };
}
#[allow(unused_imports)] // not every test binary has cells
pub(crate) use cells;
