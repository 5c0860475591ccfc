//! `forkd restore`: start children from a seed image on this node.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use forkd::cli::{ChildReport, SpawnReport};
use remotefork::image::SeedImage;
use remotefork::restore::{Child, Io, Restorer, SpawnOptions};
use serde_json::json;

/// How a child ended.
enum Ended {
    Code(i32),
    Signal(i32),
}

impl Ended {
    fn exit_code(&self) -> u8 {
        match self {
            Ended::Code(c) => *c as u8,
            Ended::Signal(s) => 128u8.wrapping_add(*s as u8),
        }
    }
    fn ok(&self) -> bool {
        matches!(self, Ended::Code(0))
    }
    fn describe(&self) -> String {
        match self {
            Ended::Code(c) => format!("exit status {c}"),
            Ended::Signal(s) => format!("signal {s}"),
        }
    }
}

fn wait_child(pid: i32) -> anyhow::Result<Ended> {
    loop {
        match kernel_helpers::ptrace::wait(pid)
            .with_context(|| format!("waiting for child {pid}"))?
        {
            kernel_helpers::ptrace::Stop::Exited(c) => return Ok(Ended::Code(c)),
            kernel_helpers::ptrace::Stop::Killed(s) => return Ok(Ended::Signal(s)),
            _ => continue,
        }
    }
}

/// A child's report (docs/cli-schema.json), with the pager's figures
/// once it has let go of it.
fn child_report(index: u32, c: &Child, ended: &Ended) -> ChildReport {
    let mut r = ChildReport {
        index,
        pid: Some(c.pid as u32),
        time_to_running_ms: Some(c.restore_ns as f64 / 1e6),
        notes: c.notes.clone(),
        ..Default::default()
    };
    match ended {
        Ended::Code(code) => r.exit_code = Some(*code),
        Ended::Signal(sig) => r.signal = Some(*sig),
    }
    let mut local = json!({ "pages_written": c.pages_written });
    if let Some(s) = &c.stats {
        s.wait_finished(std::time::Duration::from_millis(200));
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.faults = g(&s.faults);
        r.pages_installed = g(&s.pages_installed);
        r.reason = s.killed_reason();
        local["pages_fetched"] = json!(g(&s.pages_fetched));
        local["pages_from_cache"] = json!(g(&s.pages_from_cache));
        local["zero_pages"] = json!(g(&s.zero_pages));
        local["prefetched"] = json!(g(&s.prefetched));
        local["events"] = json!(g(&s.events));
    }
    r.local = Some(local);
    r
}

fn report_kill(c: &Child) {
    if let Some(r) = c.stats.as_ref().and_then(|s| {
        s.wait_finished(std::time::Duration::from_millis(200));
        s.killed_reason()
    }) {
        eprintln!("forkd: child {} was killed: {r}", c.pid);
    }
}

fn warn_notes(child: &Child) {
    for n in &child.notes {
        eprintln!("forkd: warning: child {}: {n}", child.pid);
    }
}

pub fn run(
    dir: &Path,
    opts: SpawnOptions,
    count: u32,
    detach: bool,
    output_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(count >= 1, "--count must be at least 1");
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    let image = SeedImage::open(dir)
        .with_context(|| format!("cannot read seed image {}", dir.display()))?;
    let restorer =
        Restorer::new(image).with_context(|| format!("cannot restore {}", dir.display()))?;

    if detach {
        // A detached child outlives this command, and with it the pager a
        // lazy child would need: detached children are restored eagerly.
        let opts = SpawnOptions {
            lazy: false,
            ..opts
        };
        let mut pids = Vec::new();
        for _ in 0..count {
            let c = restorer
                .spawn(Io::Inherit, Io::Inherit, Io::Inherit, &opts)
                .context("restore failed")?;
            warn_notes(&c);
            pids.push(c.pid);
        }
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", json!({ "pids": pids }))?;
        } else {
            for p in pids {
                writeln!(out, "{p}")?;
            }
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }

    if count == 1 {
        let c = restorer
            .spawn(Io::Inherit, Io::Inherit, Io::Inherit, &opts)
            .context("restore failed")?;
        warn_notes(&c);
        let ended = wait_child(c.pid)?;
        if !ended.ok() {
            report_kill(&c);
        }
        if json {
            // The child has stdout: the report goes to stderr.
            let r = SpawnReport::new(1, vec![child_report(0, &c, &ended)], ms(t0));
            eprintln!("{}", serde_json::to_string(&r)?);
        }
        return Ok(ExitCode::from(ended.exit_code()));
    }

    // Many children: one input for all, outputs collected in order.
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let mut running = Vec::with_capacity(count as usize);
    for i in 0..count {
        let (in_r, mut in_w) = std::io::pipe().context("creating a pipe")?;
        let (out_r, out_w) = std::io::pipe().context("creating a pipe")?;
        let c = restorer
            .spawn(Io::fd(in_r), Io::fd(out_w), Io::Inherit, &opts)
            .with_context(|| format!("restoring child {i} failed"))?;
        warn_notes(&c);
        let data = input.clone();
        let feeder = std::thread::spawn(move || {
            // A child that exits without reading gets EPIPE here: not an error.
            let _ = in_w.write_all(&data);
        });
        let collector = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut r = out_r;
            let _ = r.read_to_end(&mut out);
            out
        });
        running.push((c, feeder, collector));
    }
    let mut report = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for (i, (c, feeder, collector)) in (0u32..).zip(running) {
        let ended = wait_child(c.pid)?;
        let _ = feeder.join();
        let out = collector.join().unwrap_or_default();
        if !ended.ok() {
            eprintln!(
                "forkd: child {i} (pid {}) failed: {}",
                c.pid,
                ended.describe()
            );
            report_kill(&c);
        }
        if let Some(d) = output_dir {
            forkd::cli::write_outputs(d, &[(i, &out)])?;
        } else if !json {
            stdout.write_all(&out)?;
        }
        let mut r = child_report(i, &c, &ended);
        if output_dir.is_none() {
            r.stdout = Some(String::from_utf8_lossy(&out).into_owned());
        }
        report.push(r);
    }
    let report = SpawnReport::new(count, report, ms(t0));
    if json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    }
    stdout.flush()?;
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
