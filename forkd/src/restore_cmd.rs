//! `forkd restore`: start children from a seed image on this node.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use forkd::cli::{ChildReport, SpawnReport};
use remotefork::image::SeedImage;
use remotefork::{Child, ExitReason, SpawnOptions, Stdio};
use serde_json::json;

/// What `forkd restore` exits with for a child that ended so.
fn exit_code(e: &ExitReason) -> u8 {
    match e {
        ExitReason::Exited(c) => *c as u8,
        ExitReason::Signaled(s) => 128u8.wrapping_add(*s as u8),
        ExitReason::KilledByPager(_) | ExitReason::OutOfMemory { .. } => {
            128u8.wrapping_add(libc::SIGKILL as u8)
        }
        _ => 1,
    }
}

/// A child's report (docs/cli-schema.json), with the pager's figures
/// once it has let go of it.
fn child_report(index: u32, c: &Child, ended: &ExitReason) -> ChildReport {
    let mut r = ChildReport {
        index,
        pid: Some(c.pid() as u32),
        time_to_running_ms: Some(c.restore_time().as_secs_f64() * 1e3),
        notes: c.notes().to_vec(),
        ..Default::default()
    };
    match ended {
        ExitReason::Exited(code) => r.exit_code = Some(*code),
        ExitReason::Signaled(sig) => r.signal = Some(*sig),
        ExitReason::KilledByPager(why) => {
            r.signal = Some(libc::SIGKILL);
            r.reason = Some(why.clone());
        }
        e @ ExitReason::OutOfMemory { .. } => {
            r.signal = Some(libc::SIGKILL);
            r.reason = Some(e.to_string());
        }
        _ => {}
    }
    let mut local = json!({ "pages_written": c.pages_written() });
    if let Some(s) = c.stats() {
        s.wait_finished(std::time::Duration::from_millis(200));
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.faults = g(&s.faults);
        r.pages_installed = g(&s.pages_installed);
        r.reason = r.reason.take().or_else(|| s.killed_reason());
        local["pages_fetched"] = json!(g(&s.pages_fetched));
        local["pages_from_cache"] = json!(g(&s.pages_from_cache));
        local["zero_pages"] = json!(g(&s.zero_pages));
        local["prefetched"] = json!(g(&s.prefetched));
        local["events"] = json!(g(&s.events));
    }
    r.local = Some(local);
    r
}

fn report_kill(c: &Child, ended: &ExitReason) {
    match ended {
        ExitReason::KilledByPager(r) => eprintln!("forkd: child {} was killed: {r}", c.pid()),
        e @ ExitReason::OutOfMemory { .. } => eprintln!("forkd: child {} was {e}", c.pid()),
        _ => {}
    }
}

fn warn_notes(child: &Child) {
    for n in child.notes() {
        eprintln!("forkd: warning: child {}: {n}", child.pid());
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
    let restorer = remotefork::Seed::new(image)
        .with_context(|| format!("cannot restore {}", dir.display()))?;

    if detach {
        // A detached child outlives this command, and with it the pager a
        // lazy child would need: detached children are restored eagerly.
        let opts = opts.lazy(false);
        let mut pids = Vec::new();
        for _ in 0..count {
            let c = restorer
                .spawn(Stdio::Inherit, Stdio::Inherit, Stdio::Inherit, &opts)
                .context("restore failed")?;
            warn_notes(&c);
            pids.push(c.pid());
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
        let mut c = restorer
            .spawn(Stdio::Inherit, Stdio::Inherit, Stdio::Inherit, &opts)
            .context("restore failed")?;
        warn_notes(&c);
        let ended = c.wait()?;
        if !ended.success() {
            report_kill(&c, &ended);
        }
        if json {
            // The child has stdout: the report goes to stderr.
            let r = SpawnReport::new(1, vec![child_report(0, &c, &ended)], ms(t0));
            eprintln!("{}", serde_json::to_string(&r)?);
        }
        return Ok(ExitCode::from(exit_code(&ended)));
    }

    // Many children: one input for all, outputs collected in order.
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let mut running = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut c = restorer
            .spawn(Stdio::Piped, Stdio::Piped, Stdio::Inherit, &opts)
            .with_context(|| format!("restoring child {i} failed"))?;
        warn_notes(&c);
        let (mut in_w, out_r) = c
            .take_stdin()
            .zip(c.take_stdout())
            .context("the child's pipes are missing")?;
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
    for (i, (mut c, feeder, collector)) in (0u32..).zip(running) {
        let ended = c.wait()?;
        let _ = feeder.join();
        let out = collector.join().unwrap_or_default();
        if !ended.success() {
            eprintln!("forkd: child {i} (pid {}) failed: {ended}", c.pid());
            report_kill(&c, &ended);
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
