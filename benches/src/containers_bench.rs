//! Containers benchmark (issue 17), one run, one seed: the Python (boto3)
//! function of the container tests (`forkd/tests/programs/container/fn.py`
//! in the bundle `forkd/scripts/oci-bundle.sh` builds) run by runc,
//! captured from outside, and:
//!
//! - cold start: `runc run` of the bundle until its first answer;
//! - a child's time to first answer, lazy, forked from the node's template
//!   (and restored from scratch), in a container of its own (pid, mount,
//!   uts, ipc and network namespaces, an overlay root, a cgroup) and,
//!   beside it, outside any container (`ChildSpec::host`: the same seed,
//!   mapped from the same rootfs copy);
//! - `--children N` containerized children started one after another from
//!   2 threads, each answering one request, all done: the wall time.
//!
//! Goals (issue 17): containers add under 2 ms to a child's time to first
//! answer; at least 50x faster than the runc cold start; 1,000
//! containerized instances over 2 nodes answered in under 5 s (the gateway
//! test `the_gateway_serves_1000_invocations_over_2_nodes_each_in_its_own_container`
//! prints its time; run it with `--release`).
//!
//! Run: `cargo run --release -p remotefork-benches --bin containers-bench -- [--iterations N] [--cold N] [--children N] [--json FILE]`
//! (as root, with runc).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{parse_args, python, wait_blocked_in_read, Lines};
use remotefork::capture::{capture, CaptureOptions};
use remotefork::container::ChildSpec;
use remotefork::{Seed, SpawnOptions};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(120);

fn median_ms(ns: &[u64]) -> f64 {
    let mut v = ns.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).map_or(f64::NAN, |&x| x as f64 / 1e6)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Build (or reuse) the bundle.
fn bundle() -> anyhow::Result<PathBuf> {
    let out = repo().join("target/oci-bundle");
    let st = Command::new("bash")
        .arg(repo().join("forkd/scripts/oci-bundle.sh"))
        .arg(&out)
        .env("PYTHON", python()?)
        .status()
        .context("running oci-bundle.sh")?;
    if !st.success() {
        bail!("oci-bundle.sh failed");
    }
    Ok(out)
}

/// `runc run` of the bundle as container `id`: its stdin, its stdout.
fn runc_run(bundle: &Path, id: &str) -> anyhow::Result<std::process::Child> {
    let _ = Command::new("runc").args(["delete", "-f", id]).output();
    Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("runc run")
}

fn runc_gone(id: &str, mut c: std::process::Child) {
    let _ = Command::new("runc").args(["kill", id, "KILL"]).output();
    let _ = c.kill();
    let _ = c.wait();
    let _ = Command::new("runc").args(["delete", "-f", id]).output();
}

/// Is `line` the function's answer to `{"n": n}` from the container's rootfs?
fn check(line: &str, n: u64) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(line).with_context(|| format!("answer {line:?}"))?;
    if v["square"].as_u64() != Some(n * n) {
        bail!("answer to {n}: {line}");
    }
    Ok(())
}

/// One cold start: `runc run` until the answer to a request.
fn cold(bundle: &Path, k: usize) -> anyhow::Result<u64> {
    let id = format!("rf-bench-cold-{}-{k}", std::process::id());
    let t = Instant::now();
    let mut c = runc_run(bundle, &id)?;
    let mut stdin = c.stdin.take().context("stdin")?;
    let mut out = Lines::new(c.stdout.take().context("stdout")?);
    writeln!(stdin, "{{\"n\": 7}}")?;
    let r = (|| -> anyhow::Result<u64> {
        let first = out.next(LIMIT)?;
        if first.trim() != "ready" {
            bail!("cold start printed {first:?}");
        }
        check(&out.next(LIMIT)?, 7)?;
        Ok(t.elapsed().as_nanos() as u64)
    })();
    drop(stdin);
    runc_gone(&id, c);
    r
}

/// A child of `seed` with `spec` (forked from the node's template, or
/// restored from scratch): spawn to first answer, ns.
fn child(seed: &Seed, spec: ChildSpec, n: u64, template: bool) -> anyhow::Result<u64> {
    let opts = SpawnOptions::default()
        .lazy(true)
        .template(template)
        .container(spec);
    let t = Instant::now();
    let mut c = seed.spawn(
        remotefork::Stdio::Piped,
        remotefork::Stdio::Piped,
        remotefork::Stdio::Null,
        &opts,
    )?;
    let mut stdin = c.take_stdin().context("stdin")?;
    let mut out = Lines::new(c.take_stdout().context("stdout")?);
    writeln!(stdin, "{{\"n\": {n}}}")?;
    check(&out.next(LIMIT)?, n)?;
    let ns = t.elapsed().as_nanos() as u64;
    drop(stdin);
    c.wait()?;
    Ok(ns)
}

fn main() -> anyhow::Result<()> {
    // Our children must not get what this process inherited.
    forkd::cloexec_inherited_fds();
    let args = parse_args(Some(200))?;
    if Command::new("runc").arg("--version").output().is_err() {
        bail!("runc is not installed (forkd/scripts/deps.sh installs it)");
    }
    let b = bundle()?;
    println!(
        "containers-bench: the Python (boto3) function in runc, {} iterations, {} cold starts, {} children",
        args.iterations, args.cold, args.children
    );

    let cold_ns = (0..args.cold)
        .map(|k| cold(&b, k))
        .collect::<anyhow::Result<Vec<_>>>()?;

    // The seed: the container's process, warm, captured from outside.
    let id = format!("rf-bench-seed-{}", std::process::id());
    let mut parent = runc_run(&b, &id)?;
    let mut out = Lines::new(parent.stdout.take().context("stdout")?);
    if out.next(LIMIT)?.trim() != "ready" {
        bail!("the container did not start");
    }
    let st = Command::new("runc").args(["state", &id]).output()?;
    let pid = serde_json::from_slice::<Value>(&st.stdout)?["pid"]
        .as_i64()
        .context("runc state: no pid")? as i32;
    wait_blocked_in_read(pid)?;
    let dir = std::env::temp_dir().join(format!("rf-containers-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = capture(pid, &dir, &CaptureOptions::default())?;
    runc_gone(&id, parent);
    let c = d
        .container
        .as_ref()
        .context("not captured as a container")?;
    println!(
        "  seed: pause {:.2} ms, capture {:.0} ms (rootfs {} files, {} MiB, stored once)",
        d.stats.pause_ns as f64 / 1e6,
        d.stats.capture_ns as f64 / 1e6,
        c.rootfs_files,
        c.rootfs_bytes >> 20
    );
    let seed = Seed::open(&dir)?;
    let host = ChildSpec {
        host: true,
        ..Default::default()
    };
    // Warm every path once (page cache, the seed cache, the templates).
    for template in [false, true] {
        child(&seed, ChildSpec::default(), 1, template)?;
        child(&seed, host, 1, template)?;
    }
    let (mut in_ctr, mut on_host, mut ctr_scratch, mut host_scratch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..args.iterations {
        // Alternated, so load changes hit all alike.
        let k = k as u64;
        in_ctr.push(child(&seed, ChildSpec::default(), k, true)?);
        on_host.push(child(&seed, host, k, true)?);
        ctr_scratch.push(child(&seed, ChildSpec::default(), k, false)?);
        host_scratch.push(child(&seed, host, k, false)?);
    }

    // Fan-out: N containerized children, 2 threads, each one request.
    let t = Instant::now();
    let seed = std::sync::Arc::new(seed);
    let per = args.children.div_ceil(2);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let seed = seed.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for k in 0..per {
                    child(&seed, ChildSpec::default(), (w * per + k) as u64, true)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    let fan_s = t.elapsed().as_secs_f64();

    let (cold_ms, ctr_ms, host_ms) = (median_ms(&cold_ns), median_ms(&in_ctr), median_ms(&on_host));
    println!(
        "  runc cold start to first answer:          {cold_ms:8.2} ms (median of {})",
        cold_ns.len()
    );
    println!(
        "  restored from scratch: outside a container {:.2} ms, in one {:.2} ms",
        median_ms(&host_scratch),
        median_ms(&ctr_scratch)
    );
    println!("  forked from the node template:");
    println!("  child outside any container:              {host_ms:8.2} ms");
    println!(
        "  child in its own container:               {ctr_ms:8.2} ms  (+{:.2} ms; goal under 2 ms) {}",
        ctr_ms - host_ms,
        if ctr_ms - host_ms < 2.0 { "met" } else { "NOT met" }
    );
    println!(
        "  container child vs runc cold start:       {:8.1}x  (goal 50x) {}",
        cold_ms / ctr_ms,
        if cold_ms / ctr_ms >= 50.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "  {} containerized children, 2 threads, one node: {fan_s:.2} s ({:.0}/s)",
        args.children,
        per as f64 * 2.0 / fan_s
    );
    if let Some(p) = &args.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&json!({
                "cold_ms": cold_ms,
                "child_in_container_ms": ctr_ms,
                "child_on_host_ms": host_ms,
                "container_overhead_ms": ctr_ms - host_ms,
                "speedup_vs_runc": cold_ms / ctr_ms,
                "scratch_child_in_container_ms": median_ms(&ctr_scratch),
                "scratch_child_on_host_ms": median_ms(&host_scratch),
                "children": per * 2,
                "children_s": fan_s,
            }))?,
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
