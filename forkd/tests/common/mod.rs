//! Helpers shared by forkd's integration tests: privilege checks, building
//! the C test programs, starting targets and talking to them.
#![allow(dead_code)]

pub mod runner;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The forkd binary under test.
pub fn forkd() -> Command {
    no_inherited_fds();
    Command::new(env!("CARGO_BIN_EXE_forkd"))
}

/// The programs tests start must not get what the test binary inherited
/// (a pipe of the shell that ran cargo): capture refuses a descriptor
/// shared with another process. Marked close-on-exec once.
pub fn no_inherited_fds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(forkd::cloexec_inherited_fds);
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
    no_inherited_fds();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: {test}: needs root (ptrace of other processes, /proc/PID/mem)");
        return false;
    }
    true
}

/// Does this CPU have AVX2 (the C target keeps a value in ymm15)?
pub fn has_avx2() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.contains(" avx2"))
        .unwrap_or(false)
}

/// A scratch directory under the target dir, fresh for each call. The
/// first call of a test binary removes what earlier, finished test
/// binaries left there ([`sweep_finished`]).
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| sweep_finished(&base));
    let d = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Remove every `NAME-PID` entry under `base` whose PID is no longer a
/// running process: the scratch of test binaries that have finished.
/// Seeds of real runtimes are hundreds of MB (a JVM's keeps a copy of its
/// 130 MB `modules` file); kept for a whole run they filled a CI disk.
/// Binaries run one after another, so what stays is one binary's scratch
/// (and the last one's, to look at after a failure). Nothing is removed
/// when `RF_KEEP_SCRATCH` is set.
fn sweep_finished(base: &Path) {
    if std::env::var_os("RF_KEEP_SCRATCH").is_some() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_tree(&e.path());
        }
    }
}

/// Remove `path` and what is under it, never crossing into another
/// filesystem: a test may have left something mounted inside, and what
/// is mounted is not the test's to delete. Errors are ignored (a busy
/// mount point stays).
fn remove_tree(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    fn on_dev(path: &Path, dev: u64) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.dev() != dev {
            return;
        }
        if !meta.is_dir() {
            let _ = std::fs::remove_file(path);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                on_dev(&e.path(), dev);
            }
        }
        let _ = std::fs::remove_dir(path);
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        on_dev(path, meta.dev());
    }
}

/// Compile `tests/programs/NAME.c` once per test binary run.
pub fn c_program(name: &str) -> PathBuf {
    compile_once(&format!("tests/programs/{name}.c"), name)
}

/// Compile the restore case `tests/cases/NAME.c` (with its `case.h`) once
/// per test binary run.
pub fn c_case(name: &str) -> PathBuf {
    compile_once(&format!("tests/cases/{name}.c"), &format!("case-{name}"))
}

/// Compile the C file `src` (relative to forkd/) to the binary `out_name`
/// under the target dir, once per test binary run.
fn compile_once(src: &str, out_name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{out_name}-{}", std::process::id()));
    // Tests of one binary run in parallel: build under a name of this
    // thread's, then rename, so no test ever executes a half-written file.
    if !out.exists() {
        // (The target's tmp dir may have been emptied since cargo built us.)
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let tmp = out.with_extension(
            format!("tmp-{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        let st = Command::new("cc")
            .args(["-O1", "-g", "-mavx2", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("cc must be installed");
        assert!(st.success(), "compiling {} failed", src.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// The real Python interpreter behind the `python3` shim, resolved once.
pub fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A running target program with its stdin and stdout piped to the test.
pub struct Target {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: BufReader<ChildStdout>,
}

impl Target {
    /// Start `cmd` and wait for its first line, which must start with `ready`.
    pub fn start(mut cmd: Command) -> (Target, String) {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // ETXTBSY: a program just built can still be open for writing in a
        // process another test thread forked at that moment; EAGAIN: a
        // loaded machine. Retry for up to 5 s.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ETXTBSY) | Some(libc::EAGAIN))
                        && tries < 250 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("starting {cmd:?}: {e}"),
            }
        };
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "target said {line:?}");
        (
            Target {
                child,
                stdin,
                stdout,
            },
            line,
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send `input`, close stdin, and collect the rest of stdout and the exit status.
    pub fn finish(mut self, input: &str) -> (String, std::process::ExitStatus) {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        let mut rest = String::new();
        for l in (&mut self.stdout).lines() {
            rest.push_str(&l.unwrap());
            rest.push('\n');
        }
        let st = self.child.wait().unwrap();
        (rest, st)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Children of `pid`, of any of its threads (from /proc/PID/task/*/children):
/// children forked from a template are the template service thread's.
pub fn children(pid: i32) -> Vec<i32> {
    remotefork::procfs::children(pid)
}

/// State letter of a process, or None if it is gone.
pub fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// Run forkd with args; return (exit code, stdout, stderr).
pub fn run_forkd(args: &[&str]) -> (i32, String, String) {
    let out = forkd().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Wait until `pid` is asleep inside read(2) (syscall 0), so its registers
/// and memory are stable.
pub fn wait_blocked_in_read(pid: i32) {
    assert!(
        blocked_in_read(pid),
        "process {pid} never blocked in read(2)"
    );
}

/// Wait up to 10 s for `pid` to be asleep inside read(2); false if it
/// exits or never does.
pub fn blocked_in_read(pid: i32) -> bool {
    blocked_in(pid, &["0 "])
}

/// Wait up to 10 s for `pid`'s main thread to be asleep waiting for input
/// or an event: in `read`, `poll`, `select`, an `epoll_wait` (an event
/// loop's) or a futex (a JVM's launcher thread); false if it exits or
/// never does.
pub fn blocked_waiting(pid: i32) -> bool {
    blocked_in(
        pid,
        &[
            "0 ", "7 ", "23 ", "202 ", "232 ", "270 ", "271 ", "281 ", "441 ",
        ],
    )
}

/// Wait up to 10 s for `pid` to be asleep in one of the syscalls whose
/// `/proc/PID/syscall` starts with one of `waits` ("NR "); false if it
/// exits or never does.
fn blocked_in(pid: i32, waits: &[&str]) -> bool {
    for _ in 0..10_000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        match state(pid) {
            Some('S') if waits.iter().any(|w| sc.starts_with(w)) => return true,
            None | Some('Z') => return false,
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

/// Capture `cmd` once it is blocked waiting for input, then kill it.
/// Returns the image dir and the target's ready line.
pub fn seed_of(cmd: Command, name: &str) -> (PathBuf, String) {
    let (target, ready) = Target::start(cmd);
    let pid = target.pid();
    assert!(
        blocked_waiting(pid),
        "process {pid} never blocked waiting for input"
    );
    let out = scratch(name).join("seed");
    let (code, _, stderr) = run_forkd(&[
        "snapshot",
        "--pid",
        &pid.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "snapshot failed: {stderr}");
    drop(target); // kills the original
    (out, ready)
}

/// What one `forkd restore` run produced.
pub struct Restored {
    pub stdout: String,
    pub stderr: String,
    pub code: Option<i32>,
    pub child: i32,
}

/// `forkd restore DIR ARGS`, with `before_input(child_pid)` run once the
/// restored child is blocked reading its stdin, then `input` given to it.
pub fn restore_and_talk(
    dir: &Path,
    args: &[&str],
    input: &str,
    before_input: impl FnOnce(i32),
) -> Restored {
    let mut p = forkd()
        .arg("restore")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A child that never finishes (a fault nobody answers) fails the test
    // instead of hanging it: after runner::LIMIT, forkd and its children
    // are killed, and the caller sees their unfinished output.
    let pid = p.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let done = done.clone();
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            let t = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if t.elapsed() > runner::LIMIT {
                    eprintln!(
                        "forkd restore {} still running after {:?}: killed",
                        dir.display(),
                        runner::LIMIT
                    );
                    runner::kill_descendants(pid);
                    // SAFETY: plain kill(2) of forkd, not yet reaped (done
                    // is set only after its wait).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let child = first_child(pid);
    if child != 0 && blocked_in_read(child) {
        before_input(child);
    }
    let mut stdin = p.stdin.take().unwrap();
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    let mut stdout = String::new();
    p.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let mut stderr = String::new();
    p.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = p.wait().unwrap().code();
    done.store(true, std::sync::atomic::Ordering::Release);
    let _ = watch.join();
    Restored {
        stdout,
        stderr,
        code,
        child,
    }
}

/// Husks whose parent is gone: a leak if any appear.
pub fn orphan_husks() -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(|s| s.trim().to_string());
        // A husk is exec'd from a memfd named rf-husk: its comm is
        // "memfd:rf-husk" (Linux 6.14+) or the descriptor's number before.
        let comm = comm.trim();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let husk = comm == "rf-husk"
            || comm == "memfd:rf-husk"
            || (comm.bytes().all(|b| b.is_ascii_digit())
                && exe.to_string_lossy().starts_with("/memfd:rf-husk"));
        if husk && (ppid.as_deref() == Some("1") || ppid.as_deref() == Some("0")) {
            out.push(pid);
        }
    }
    out
}

/// A Python that prints `ready`, then waits for one line of stdin.
pub fn idle_python() -> Target {
    let mut cmd = Command::new(python());
    cmd.args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.readline()",
    ]);
    Target::start(cmd).0
}

/// The first child of `parent`, waiting up to 5 s; 0 if none appeared or
/// the parent ended first.
pub fn first_child(parent: i32) -> i32 {
    for _ in 0..5000 {
        if let Some(c) = children(parent).first() {
            return *c;
        }
        if matches!(state(parent), None | Some('Z')) {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    0
}

/// `forkctl --addr ADDR [--token-file F] ARGS`: (exit code, stdout, stderr).
pub fn run_forkctl(addr: &str, token_file: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = forkctl();
    cmd.arg("--addr").arg(addr);
    if let Some(t) = token_file {
        cmd.arg("--token-file").arg(t);
    }
    let o = cmd.args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The forkctl binary under test.
pub fn forkctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forkctl"))
}

/// A running `forkd serve` with its own socket and state directory.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub tcp: Option<String>,
}

impl Daemon {
    pub fn start(dir: &Path, tcp: bool) -> Daemon {
        Daemon::start_with(dir, tcp, &[])
    }

    /// [`Daemon::start`] with more `forkd serve` flags.
    pub fn start_with(dir: &Path, tcp: bool, extra: &[&str]) -> Daemon {
        let mut cmd = forkd();
        cmd.arg("serve")
            .arg("--socket")
            .arg(dir.join("sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra);
        let mut addr = None;
        if tcp {
            std::fs::write(dir.join("token"), "s3cret-token\n").unwrap();
            // A free port: bind, note it, release.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let a = format!("127.0.0.1:{port}");
            cmd.arg("--listen")
                .arg(&a)
                .arg("--token-file")
                .arg(dir.join("token"));
            addr = Some(a);
        }
        if std::env::var_os("FORKD_LOG").is_none() {
            cmd.env("FORKD_LOG", "warn");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
            tcp: addr,
        };
        let t = Instant::now();
        while d.ctl(&["node"]).0 != 0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "forkd did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn addr(&self) -> String {
        format!("unix:{}", self.dir.join("sock").display())
    }

    /// forkctl over the Unix socket: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.ctl_at(&self.addr(), None, args)
    }

    pub fn ctl_at(
        &self,
        addr: &str,
        token_file: Option<&Path>,
        args: &[&str],
    ) -> (i32, String, String) {
        run_forkctl(addr, token_file, args)
    }

    pub fn stop(mut self) {
        // SAFETY: plain kill(2) of our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `forkctl --json seed create --ready-line ready EXTRA... -- ARGV...`
/// through `ctl`: (exit code, stdout, stderr).
pub fn create_seed_cmd(
    ctl: impl Fn(&[&str]) -> (i32, String, String),
    extra: &[&str],
    argv: &[&str],
) -> (i32, String, String) {
    let mut a = vec!["--json", "seed", "create", "--ready-line", "ready"];
    a.extend_from_slice(extra);
    a.push("--");
    a.extend_from_slice(argv);
    ctl(&a)
}

/// [`create_seed_cmd`] that must succeed: the new seed's id.
pub fn command_seed(
    ctl: impl Fn(&[&str]) -> (i32, String, String),
    extra: &[&str],
    argv: &[&str],
) -> String {
    let (code, out, err) = create_seed_cmd(ctl, extra, argv);
    assert_eq!(code, 0, "seed create failed: {err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `forkctl --json seed create --ready-line ready -- python -c SCRIPT`
/// through `ctl`; returns the new seed's id.
pub fn python_seed(ctl: impl Fn(&[&str]) -> (i32, String, String), script: &str) -> String {
    let py = python().to_string();
    let (code, out, err) = ctl(&[
        "--json",
        "seed",
        "create",
        "--ready-line",
        "ready",
        "--",
        &py,
        "-c",
        script,
    ]);
    assert_eq!(code, 0, "seed create failed: {err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Namespaced forkd nodes (`scripts/nodes.sh`); torn down on drop, even
/// when a test fails.
pub struct Nodes {
    pub dir: PathBuf,
    pub env: std::collections::HashMap<String, String>,
}

impl Nodes {
    /// Three nodes.
    pub fn up(name: &str) -> Option<Nodes> {
        Nodes::up_n(name, 3)
    }

    /// `n` nodes, or None (after printing SKIPPED) when `ip` is missing.
    pub fn up_n(name: &str, n: u32) -> Option<Nodes> {
        Nodes::up_with(name, n, &[])
    }

    /// `n` nodes whose forkd get `forkd_args` too.
    pub fn up_with(name: &str, n: u32, forkd_args: &[&str]) -> Option<Nodes> {
        if Command::new("ip").arg("-V").output().is_err() {
            println!("SKIPPED: {name}: iproute2 (ip) is not installed");
            return None;
        }
        let dir = scratch(name);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nodes.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg("up")
            .arg(&dir)
            .arg(n.to_string())
            .arg(env!("CARGO_BIN_EXE_forkd"))
            .env("PAGE_DEADLINE_MS", "3000")
            .env("FORKD_ARGS", forkd_args.join(" "))
            .status()
            .unwrap();
        assert!(st.success(), "nodes.sh up failed");
        let env = std::fs::read_to_string(dir.join("nodes.env"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Some(Nodes { dir, env })
    }

    pub fn get(&self, k: &str) -> String {
        self.env[k].clone()
    }

    pub fn sock(&self, i: u32) -> String {
        format!("unix:{}", self.get(&format!("NODE{i}_SOCK")))
    }

    pub fn ctl(&self, i: u32, args: &[&str]) -> (i32, String, String) {
        run_forkctl(&self.sock(i), None, args)
    }

    /// The portable reference of node i's seed.
    pub fn seed_ref(&self, i: u32, id: &str) -> String {
        let (code, out, err) = self.ctl(
            i,
            &[
                "seed",
                "ref",
                id,
                "--origin",
                &self.get(&format!("NODE{i}_ADDR")),
            ],
        );
        assert_eq!(code, 0, "{err}");
        out.trim().to_string()
    }

    pub fn input(&self, name: &str, content: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }

    pub fn forkd_pid(&self, i: u32) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("n{i}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nodes.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("down")
            .arg(&self.dir)
            .status();
    }
}

/// A warm Python function: boto3 client built (when boto3 is there) and a
/// table of squares, answering each stdin line with JSON from that state.
pub const BOTO_SERVER: &str = r#"
import sys, os, json
try:
    import boto3
    region = boto3.client('s3', region_name='us-east-1').meta.region_name
except ImportError:
    region = 'no-boto3'
state = {'n': 0, 'squares': [i * i for i in range(20000)]}
print('ready', flush=True)
for line in sys.stdin:
    state['n'] += 1
    print(json.dumps({'got': line.strip(), 'pid': os.getpid(), 'n': state['n'], 'sum': sum(state['squares']), 'region': region}), flush=True)
"#;

/// `forkctl --json spawn` output of `count` BOTO_SERVER children fed two
/// lines: each answered both from the warm state, as itself.
pub fn assert_boto_children(v: &serde_json::Value, count: usize) {
    let sum: u64 = (0..20000u64).map(|i| i * i).sum();
    let kids = v["children"].as_array().unwrap();
    assert_eq!(kids.len(), count);
    for k in kids {
        let lines = stdout_lines(k);
        assert_eq!(lines.len(), 2, "{k}");
        assert_eq!(lines[1]["n"], 2);
        assert_eq!(lines[1]["sum"], sum);
        assert_eq!(lines[0]["pid"], k["pid"]);
    }
}

/// A child's captured stdout (in a `--json` report), one JSON value per line.
pub fn stdout_lines(child: &serde_json::Value) -> Vec<serde_json::Value> {
    child["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Seed the C checksum program (`capture_target`, blocked in read) from
/// its pid through `ctl`; returns the seed id and the checksum it will print.
pub fn checksum_seed(ctl: impl Fn(&[&str]) -> (i32, String, String)) -> (String, String) {
    let (target, ready) = Target::start(Command::new(c_program("capture_target")));
    let checksum = ready.split_whitespace().nth(1).unwrap().to_string();
    (seed_from_target(ctl, target), checksum)
}

/// Make a seed of `target` through `ctl` once it is blocked in read, then
/// end it; returns the seed id.
pub fn seed_from_target(ctl: impl Fn(&[&str]) -> (i32, String, String), target: Target) -> String {
    wait_blocked_in_read(target.pid());
    let (code, out, err) = ctl(&[
        "--json",
        "seed",
        "create",
        "--pid",
        &target.pid().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    drop(target);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every child in `forkctl --json spawn` output printed the original's
/// checksum with its AVX state intact.
pub fn assert_checksum_children(v: &serde_json::Value, checksum: &str) {
    for k in v["children"].as_array().unwrap() {
        let s = k["stdout"].as_str().unwrap();
        assert!(
            s.contains(&format!("checksum {checksum} signal 0")) && s.contains("ymm15 intact"),
            "{s}"
        );
    }
}

/// A running gateway; killed on drop.
pub struct Gateway {
    pub child: std::process::Child,
    pub addr: String,
}

impl Gateway {
    pub fn start(args: &[String]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env(
                "FORKD_LOG",
                std::env::var("FORKD_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("gateway listening on ")
            .unwrap_or_else(|| panic!("gateway did not start: {line:?}"))
            .to_string();
        Gateway { child, addr }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our child; SIGTERM lets it retire instances.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request: (status, JSON body).
pub async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1);
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A tokio runtime of two threads, for the tests that talk HTTP or gRPC.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

impl Nodes {
    /// The host's address on the nodes' bridge (where they reach the host).
    pub fn host_ip(&self) -> String {
        let ip1 = self.get("NODE1_IP");
        format!("{}.254", ip1.rsplit_once('.').unwrap().0)
    }

    /// Gateway flags for instances on these nodes: the worker port they
    /// connect back to, on the bridge, and limits of `timeout_ms` for an
    /// invocation, an instance's hello and a wait in the queue (a loaded
    /// machine is slow, never wrong).
    /// A gateway's `--node` arguments for the first `count` nodes (node 1,
    /// which makes the seeds, with its peer address) and the nodes' token.
    pub fn gateway_node_args(&self, count: u32) -> Vec<String> {
        let mut a = Vec::new();
        for i in 1..=count {
            a.push("--node".to_string());
            a.push(if i == 1 {
                format!("{},peer={}", self.sock(1), self.get("NODE1_ADDR"))
            } else {
                self.sock(i)
            });
        }
        a.extend(["--token-file".to_string(), self.get("TOKEN_FILE")]);
        a
    }

    pub fn gateway_worker_args(&self, timeout_ms: u64) -> Vec<String> {
        let t = timeout_ms.to_string();
        [
            "--worker-listen",
            "0.0.0.0:0",
            "--worker-advertise",
            &format!("{}:0", self.host_ip()),
            "--timeout-ms",
            &t,
            "--ready-timeout-ms",
            &t,
            "--queue-timeout-ms",
            &t,
        ]
        .map(String::from)
        .to_vec()
    }
}

/// Invocations in a gateway burst test: `RF_GATEWAY_BURST`, default 1,000.
pub fn burst_size() -> u64 {
    std::env::var("RF_GATEWAY_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// A free TCP port on 127.0.0.1 (bound, noted, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA, and a certificate for 127.0.0.1 and localhost it signed, as PEM:
/// (ca, cert, key).
pub fn tls_pems() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// The boto3 example function as a one-shot gateway function named
/// `name`: captured at its ready line, one invocation per instance.
pub fn s3_one_shot(name: &str) -> serde_json::Value {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    serde_json::json!({"name": name, "ready_line": "READY",
        "command": [python(), "-m", "remotefork.runtime",
                    repo.join("python/examples/s3_handler.py"), "--ready-line", "READY"],
        "env": {"PYTHONPATH": repo.join("python")}})
}

/// The gateway's nodes, by address: (state, spawned).
pub async fn gw_nodes(a: &str) -> std::collections::HashMap<String, (String, u64)> {
    let (st, v) = http(a, "GET", "/functions", "").await;
    assert_eq!(st, 200, "{v}");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["addr"].as_str().unwrap().to_string(),
                (
                    x["state"].as_str().unwrap().to_string(),
                    x["spawned"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// Wait (bounded generously: a loaded machine is slow, never wrong) until
/// the gateway's nodes satisfy `ok`.
pub async fn wait_nodes(
    a: &str,
    what: &str,
    ok: impl Fn(&std::collections::HashMap<String, (String, u64)>) -> bool,
) {
    let t = Instant::now();
    loop {
        let ns = gw_nodes(a).await;
        if ok(&ns) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "gateway nodes never became {what}: {ns:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn serving(ns: &std::collections::HashMap<String, (String, u64)>) -> Vec<String> {
    let mut v: Vec<String> = ns
        .iter()
        .filter(|(_, (s, _))| s == "serving")
        .map(|(a, _)| a.clone())
        .collect();
    v.sort();
    v
}
