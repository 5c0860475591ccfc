//! What the benchmark binaries share.

use std::process::Command;
use std::time::Duration;

use anyhow::bail;

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
