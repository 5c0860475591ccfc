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
            .env(
                "FORKD_LOG",
                std::env::var("FORKD_LOG").unwrap_or_else(|_| "warn".into()),
            )
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
#[allow(dead_code)] // not every benchmark needs it
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

/// Lines read from a pipe, each waited for at most a bound (a hung child
/// fails its row instead of the run).
#[allow(dead_code)] // not every benchmark needs it
pub struct Lines<R> {
    r: R,
    buf: Vec<u8>,
}

#[allow(dead_code)] // not every benchmark needs it
impl<R: std::io::Read + std::os::fd::AsRawFd> Lines<R> {
    pub fn new(r: R) -> Self {
        Lines { r, buf: Vec::new() }
    }

    /// The next line, without its newline.
    pub fn next(&mut self, limit: Duration) -> anyhow::Result<String> {
        let t = Instant::now();
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let left = limit.saturating_sub(t.elapsed());
            if left.is_zero() {
                bail!(
                    "no line within {limit:?} (so far: {:?})",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            let mut pfd = libc::pollfd {
                fd: self.r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one pollfd, valid for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n == 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            let got = self.r.read(&mut chunk)?;
            if got == 0 {
                bail!(
                    "output ended before a whole line (so far: {:?})",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }
}

/// `argv` as a Command.
#[allow(dead_code)] // not every benchmark needs it
pub fn command(argv: &[String]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// The resident set of `pid`, KiB.
#[allow(dead_code)] // not every benchmark needs it
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Wait until `pid`'s main thread sleeps waiting for input or an event
/// (`read`, `poll`, `epoll_wait`, a futex: an event loop's or a JVM
/// launcher's).
#[allow(dead_code)] // not every benchmark needs it
pub fn wait_idle(pid: i32) -> anyhow::Result<()> {
    const WAITS: [&str; 7] = ["0 ", "7 ", "202 ", "232 ", "271 ", "281 ", "441 "];
    for _ in 0..5000 {
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if WAITS.iter().any(|w| sc.starts_with(w)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("process {pid} never went idle")
}

/// The arguments of the benchmarks that time cold starts and children:
/// `--iterations N`, `--cold N`, `--children N` (where `children` has a
/// default), `--json FILE`; `--bench` (from `cargo bench`) is ignored.
#[allow(dead_code)] // not every benchmark needs it
pub struct Args {
    pub iterations: usize,
    pub cold: usize,
    pub children: usize,
    pub json: Option<PathBuf>,
}

/// Parse [`Args`]; `children` is its default, `None` where the benchmark
/// takes no `--children`.
#[allow(dead_code)] // not every benchmark needs it
pub fn parse_args(children: Option<usize>) -> anyhow::Result<Args> {
    let mut a = Args {
        iterations: 10,
        cold: 5,
        children: children.unwrap_or(0),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--iterations" => a.iterations = val()?.parse()?,
            "--cold" => a.cold = val()?.parse()?,
            "--children" if children.is_some() => a.children = val()?.parse()?,
            "--json" => a.json = Some(val()?.into()),
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?} (use --iterations N, --cold N{}, --json FILE)",
                if children.is_some() {
                    ", --children N"
                } else {
                    ""
                }
            ),
        }
    }
    if a.iterations == 0 || a.cold == 0 {
        bail!("--iterations and --cold must be at least 1");
    }
    Ok(a)
}
