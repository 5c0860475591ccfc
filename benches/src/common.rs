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
