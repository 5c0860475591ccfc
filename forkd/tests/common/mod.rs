//! Helpers shared by forkd's integration tests: privilege checks, building
//! the C test programs, starting targets and talking to them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

/// The forkd binary under test.
pub fn forkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn require_root(test: &str) -> bool {
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

/// A scratch directory under the target dir, fresh for each call.
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let d = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compile `tests/programs/NAME.c` once per test binary run.
pub fn c_program(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(format!("{name}.c"));
    let out =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    if !out.exists() {
        let st = Command::new("cc")
            .args(["-O1", "-g", "-mavx2", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("cc must be installed");
        assert!(st.success(), "compiling {} failed", src.display());
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
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
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

/// Children of `pid` (from /proc/PID/task/PID/children).
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
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
    for _ in 0..10_000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        match state(pid) {
            Some('S') if sc.starts_with("0 ") => return true,
            None | Some('Z') => return false,
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}
