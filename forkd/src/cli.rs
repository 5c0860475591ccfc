//! What `forkd` and `forkctl` share as command lines: one JSON vocabulary
//! for children and seeds (`docs/cli-schema.json`), aligned tables in
//! natural order, quiet exits when the output pipe closes, and logging
//! that writes colour only to a terminal.

use std::cmp::Ordering;
use std::io::{IsTerminal, Write};

use serde::Serialize;

/// How one child went, in `forkd restore --json` and `forkctl spawn
/// --json` alike. Every field is there in both; what one of them cannot
/// know is null.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChildReport {
    /// Its place in the spawn, from 0.
    pub index: u32,
    /// Its pid; null if it never started.
    pub pid: Option<u32>,
    /// forkd's instance id (`forkctl`); null for `forkd restore`.
    pub instance: Option<String>,
    /// Its exit status; null if a signal ended it or it never started.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Why forkd killed it, or why it could not be started.
    pub reason: Option<String>,
    /// From the request to the child running, ms.
    pub time_to_running_ms: Option<f64>,
    /// From the request to its first output, ms (`forkctl`; null for
    /// `forkd restore`, which does not watch its output as it comes).
    pub first_output_ms: Option<f64>,
    /// Page faults the pager served (0 for an eager child).
    pub faults: u64,
    /// Pages the pager put into it (0 for an eager child).
    pub pages_installed: u64,
    /// What it could not keep from its parent exactly, and other things the
    /// caller should know (an fd that became /dev/null, a library served
    /// from the seed's copy, how shared memory is shared).
    pub notes: Vec<String>,
    /// Its stdout (absent with `--output-dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// What only a restore on this machine knows (`forkd restore`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<serde_json::Value>,
}

impl ChildReport {
    /// Did it exit with status 0?
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A spawn's report: the children and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct SpawnReport {
    /// Children asked for.
    pub count: u32,
    /// Children that started.
    pub started: u32,
    /// Children that did not exit 0 (including those never started).
    pub failed: u32,
    /// Median time to running, ms (0 if none ran).
    pub p50_ms: f64,
    /// 99th percentile time to running, ms.
    pub p99_ms: f64,
    /// From the command's start to the last child's end, ms.
    pub total_ms: f64,
    /// By index.
    pub children: Vec<ChildReport>,
}

impl SpawnReport {
    /// Summarize `children` (sorted by index here).
    pub fn new(count: u32, mut children: Vec<ChildReport>, total_ms: f64) -> SpawnReport {
        children.sort_by_key(|c| c.index);
        let mut ttr: Vec<f64> = children
            .iter()
            .filter_map(|c| c.time_to_running_ms)
            .collect();
        ttr.sort_by(f64::total_cmp);
        SpawnReport {
            count,
            started: children.iter().filter(|c| c.pid.is_some()).count() as u32,
            failed: (count as usize
                - children
                    .iter()
                    .filter(|c| c.ok())
                    .count()
                    .min(count as usize)) as u32,
            p50_ms: percentile(&ttr, 0.5),
            p99_ms: percentile(&ttr, 0.99),
            total_ms,
            children,
        }
    }

    /// `N started, N failed; time to running p50 X ms, p99 Y ms`.
    pub fn summary(&self) -> String {
        format!(
            "{} started, {} failed; time to running p50 {:.2} ms, p99 {:.2} ms",
            self.started, self.failed, self.p50_ms, self.p99_ms
        )
    }
}

/// The `q` quantile of sorted `v` (nearest rank); 0 for none.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Write each child's output to `DIR/child-I.out` (what `--output-dir`
/// does in both CLIs); the reports then carry no stdout.
pub fn write_outputs(dir: &std::path::Path, outputs: &[(u32, &[u8])]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, out) in outputs {
        std::fs::write(dir.join(format!("child-{i}.out")), out)?;
    }
    Ok(())
}

/// Was `e` caused by writing to a closed pipe (`forkctl ps | head`)?
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The exit status for an error: 141 (as a shell reports SIGPIPE) without
/// a word when the output pipe closed, else 1 after printing it.
pub fn report_error(program: &str, e: &anyhow::Error) -> std::process::ExitCode {
    if is_broken_pipe(e) {
        return std::process::ExitCode::from(141);
    }
    let _ = writeln!(std::io::stderr(), "{program}: {e:#}");
    std::process::ExitCode::FAILURE
}

/// Should output to this stream be coloured? Only a terminal's, and not
/// with `NO_COLOR` set (no-color.org).
pub fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Log to stderr: the filter in `FORKD_LOG` (else `default`), in `format`.
pub fn init_logging(default: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG").unwrap_or_else(|_| default.into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.with_ansi(colour(&std::io::stderr())).init(),
        LogFormat::Json => b
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Compare as people sort: runs of digits by their value (`seed-2`
/// before `seed-10`), the rest as text.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let o = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|c| **c == b'0').count();
    &d[z.min(d.len().saturating_sub(1))..]
}

/// A text table: columns as wide as their widest cell, numbers right-aligned.
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `header`; those starting with `>` are right-aligned
    /// (the `>` is not shown).
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Write it; the last column is not padded.
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let n = self.header.len();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                let pad = width[i].saturating_sub(c.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    if i + 1 < n {
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["a-10", "a-2", "a-1", "b-0", "a-02x", "a-2x", "a10", "a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["a", "a-1", "a-2", "a-02x", "a-2x", "a-10", "a10", "b-0"]
        );
        assert_eq!(natural_cmp("x-007", "x-7"), Ordering::Equal);
    }

    #[test]
    fn tables_align_and_right_align_numbers() {
        let mut t = Table::new(&["ID", "NAME", ">MiB", "STATE"]);
        t.row(vec![
            "a".into(),
            "long-name".into(),
            "1.5".into(),
            "running".into(),
        ]);
        t.row(vec![
            "bbbb".into(),
            "x".into(),
            "123.0".into(),
            "exited 0".into(),
        ]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID    NAME         MiB  STATE\n\
             a     long-name    1.5  running\n\
             bbbb  x          123.0  exited 0\n"
        );
    }

    #[test]
    fn reports_count_failures_and_percentiles() {
        let ok = |i, ms| ChildReport {
            index: i,
            pid: Some(100 + i),
            exit_code: Some(0),
            time_to_running_ms: Some(ms),
            ..Default::default()
        };
        let killed = ChildReport {
            index: 1,
            pid: Some(7),
            signal: Some(9),
            time_to_running_ms: Some(9.0),
            ..Default::default()
        };
        let never = ChildReport {
            index: 3,
            reason: Some("out of pids".into()),
            ..Default::default()
        };
        let r = SpawnReport::new(4, vec![ok(2, 3.0), never, killed, ok(0, 1.0)], 12.0);
        assert_eq!((r.started, r.failed), (3, 2));
        assert_eq!(
            r.children.iter().map(|c| c.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!((r.p50_ms, r.p99_ms), (3.0, 9.0));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["children"][3]["pid"], serde_json::Value::Null);
        assert!(v["children"][0].get("stdout").is_none());
    }

    #[test]
    fn broken_pipes_are_recognized_through_context() {
        let e = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the table");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("no")));
    }
}
