//! Progress of `forkd snapshot` on a terminal: the image's page store
//! growing against the process's resident memory, for captures that take
//! long enough to wonder about (large processes); nothing otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shown only after this long: most captures end before.
const QUIET: Duration = Duration::from_millis(500);

/// A running progress line (a thread), or nothing when stderr is no terminal.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

/// Resident memory of `pid`, bytes (0 if unknown).
fn rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// `capturing pid P: X of ~Y MiB (Z%), T s`.
pub fn line(pid: i32, written: u64, rss: u64, elapsed: Duration) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let pct = if rss > 0 {
        format!(
            " ({:.0}%)",
            (written as f64 / rss as f64 * 100.0).min(100.0)
        )
    } else {
        String::new()
    };
    format!(
        "capturing pid {pid}: {:.1} of ~{:.1} MiB{pct}, {:.1} s",
        mib(written),
        mib(rss),
        elapsed.as_secs_f64()
    )
}

impl Capture {
    /// Start showing the capture of `pid` into `out` (if stderr is a terminal).
    pub fn start(pid: i32, out: &Path) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        if !forkd::cli::colour(&std::io::stderr()) {
            return Capture { stop, thread: None };
        }
        let (s, pages): (_, PathBuf) = (stop.clone(), out.join(remotefork::image::PAGES_FILE));
        let total = rss(pid);
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut shown = false;
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if t0.elapsed() < QUIET {
                    continue;
                }
                let written = std::fs::metadata(&pages).map(|m| m.len()).unwrap_or(0);
                let _ = write!(
                    std::io::stderr(),
                    "\r\x1b[K{}",
                    line(pid, written, total, t0.elapsed())
                );
                shown = true;
            }
            shown
        });
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop, and clear the line if one was shown.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread {
            if t.join().unwrap_or(false) {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_line_says_how_far() {
        let l = super::line(
            42,
            512 << 20,
            1 << 30,
            std::time::Duration::from_millis(2500),
        );
        assert_eq!(l, "capturing pid 42: 512.0 of ~1024.0 MiB (50%), 2.5 s");
        assert!(!super::line(1, 0, 0, Default::default()).contains('%'));
    }
}
