//! What the benchmark binaries share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A warm Python whose every request (a line on stdin) sums a
/// 200,000-entry dict and answers `{"sum", "ms", "pid", "uid"}`.
#[allow(dead_code)] // not every benchmark needs it
pub const HEAP_WALK: &str = r#"
import sys, time, json, os
d = {i: i * 7 for i in range(200000)}
print('ready', flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    s = sum(d.values())
    ms = (time.perf_counter() - t) * 1e3
    print(json.dumps({'sum': s, 'ms': ms, 'pid': os.getpid(), 'uid': os.getuid()}), flush=True)
"#;

/// The median of `v` (the upper one of an even count).
#[allow(dead_code)] // not every benchmark needs it
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The directory of this benchmark binary (and of `forkd`, built beside it).
#[allow(dead_code)] // not every benchmark needs it
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("no bin dir")?.to_path_buf())
}

/// A forkd on its own socket and state directory, from this build.
#[allow(dead_code)] // not every benchmark needs it
pub struct Forkd {
    child: Child,
    dir: PathBuf,
}

#[allow(dead_code)] // not every benchmark needs it
impl Forkd {
    /// Start one in `dir` (emptied first) with `extra` flags.
    pub fn start(dir: &Path, extra: &[&str]) -> anyhow::Result<Forkd> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let child = Command::new(bin_dir()?.join("forkd"))
            .arg("serve")
            .arg("--socket")
            .arg(dir.join("sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--handover-grace-s", "5"])
            .args(extra)
            .env("FORKD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let f = Forkd {
            child,
            dir: dir.to_path_buf(),
        };
        let t = Instant::now();
        while !dir.join("sock").exists() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("forkd did not come up");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(f)
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its Unix socket address.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.dir.join("sock").display())
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real Python interpreter behind the `python3` shim.
pub fn python() -> anyhow::Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Wait until `pid` is blocked in read(2), so it is idle and stable.
#[allow(dead_code)] // not every benchmark needs it
pub fn wait_blocked_in_read(pid: i32) -> anyhow::Result<()> {
    for _ in 0..5000 {
        if std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .unwrap_or_default()
            .starts_with("0 ")
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("process {pid} never blocked in read")
}

/// The function both restore benchmarks run: a warm Python (boto3 imported,
/// an S3 client built) answering one JSON line per request line; `fork REQ`
/// makes it fork a child that answers REQ, and then print `done`; `quit` ends it.
#[allow(dead_code)] // not every benchmark runs it
pub const SERVER: &str = r#"
import os, sys, json
import boto3
client = boto3.client('s3', region_name='us-east-1')
def answer(req):
    return json.dumps({'req': req, 'pid': os.getpid(), 'region': client.meta.region_name})
print('ready', flush=True)
for line in sys.stdin:
    line = line.strip()
    if line.startswith('fork '):
        pid = os.fork()
        if pid == 0:
            sys.stdout.write(answer(line[5:]) + '\n')
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        print('done', flush=True)
    elif line == 'quit':
        break
    else:
        print(answer(line), flush=True)
"#;
