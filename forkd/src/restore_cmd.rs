//! `forkd restore`: start children from a seed image on this node.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
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
    fn json(&self) -> serde_json::Value {
        match self {
            Ended::Code(c) => json!({ "exit_code": c }),
            Ended::Signal(s) => json!({ "signal": s }),
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

/// The pager's figures for a child, once it has let go of it.
fn child_report(c: &Child, ended: &Ended) -> serde_json::Value {
    let mut v = json!({
        "pid": c.pid,
        "time_to_running_ms": c.restore_ns as f64 / 1e6,
        "pages_written": c.pages_written,
        "notes": c.notes,
        "status": ended.json(),
    });
    if let Some(s) = &c.stats {
        s.wait_finished(std::time::Duration::from_millis(200));
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        v["faults"] = json!(g(&s.faults));
        v["pages_installed"] = json!(g(&s.pages_installed));
        v["pages_fetched"] = json!(g(&s.pages_fetched));
        v["pages_from_cache"] = json!(g(&s.pages_from_cache));
        v["zero_pages"] = json!(g(&s.zero_pages));
        v["prefetched"] = json!(g(&s.prefetched));
        v["events"] = json!(g(&s.events));
        v["killed_reason"] = json!(s.killed_reason());
    }
    v
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
    count: usize,
    detach: bool,
    output_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(count >= 1, "--count must be at least 1");
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
            eprintln!("{}", child_report(&c, &ended));
        }
        return Ok(ExitCode::from(ended.exit_code()));
    }

    // Many children: one input for all, outputs collected in order.
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let mut running = Vec::with_capacity(count);
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
    let mut failed = 0;
    let mut stdout = std::io::stdout().lock();
    for (i, (c, feeder, collector)) in running.into_iter().enumerate() {
        let ended = wait_child(c.pid)?;
        let _ = feeder.join();
        let out = collector.join().unwrap_or_default();
        if !ended.ok() {
            failed += 1;
            eprintln!("forkd: child {i} (pid {}) failed: {}", c.pid, ended.json());
            report_kill(&c);
        }
        if let Some(d) = output_dir {
            std::fs::create_dir_all(d)?;
            std::fs::write(d.join(format!("child-{i}.out")), &out)?;
        } else if !json {
            stdout.write_all(&out)?;
        }
        let mut v = child_report(&c, &ended);
        v["index"] = json!(i);
        if json && output_dir.is_none() {
            v["stdout"] = json!(String::from_utf8_lossy(&out));
        }
        report.push(v);
    }
    if json {
        writeln!(
            stdout,
            "{}",
            json!({ "children": report, "failed": failed, "total_ms": t0.elapsed().as_secs_f64() * 1e3 })
        )?;
    }
    stdout.flush()?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
