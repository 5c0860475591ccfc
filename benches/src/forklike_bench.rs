//! Fork-semantics benchmark (issue 13), every figure beside its baseline in
//! the same run:
//!
//! 1. **Heap walk.** A warm Python whose every request sums a
//!    200,000-entry dict: time to answer the first request and time to exit
//!    of a child forked from the node's template (through a real forkd),
//!    against the warm parent's own; then `--count 100` through the daemon,
//!    request to last exit.
//! 2. **Memory.** 8 children of a seed with a 256 MiB heap, each having
//!    read all of it, alive together: PSS of children and templates, with
//!    and without templates, against 8 x and 1 x the parent's RSS.
//! 3. **Digests.** Time for a lazy child (from scratch, cold node cache) to
//!    read its 256 MiB heap with page digests checked, against the same
//!    seed without digests (format 1).
//! 4. **Lazy against eager.** Time for a child to read its whole 1 GiB
//!    heap: lazy (cold node cache, warm node cache, template with the
//!    recorded working set) against eager; and, with a cold node cache,
//!    from the spawn to the answer (an eager child's pages are all
//!    written before it runs, outside its own read time), medians of 7
//!    (the first lazy child, which records the working set, shown apart),
//!    each on a new node cache.
//!
//! Run: `sudo sh -c 'cargo build --release -p forkd && cargo run --release -p remotefork-benches --bin forklike-bench'`
//! (`-- --only N` runs part N alone; `--json FILE` writes the figures).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child as Proc, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forkd::pb;
use remotefork::capture::{capture, CaptureOptions};
use remotefork::image::SeedImage;
use remotefork::pager::Prefetch;
use remotefork::SpawnOptions;
use serde_json::{json, Value};

use common::{median, Forkd, HEAP_WALK};

async fn seed_of(addr: &str, argv: Vec<String>) -> anyhow::Result<String> {
    let mut c = forkd::client::connect(addr, None).await?;
    let s = c
        .create_seed(pb::CreateSeedRequest {
            source: Some(pb::create_seed_request::Source::Command(pb::StartCommand {
                argv,
                ready_line: "ready".into(),
                ready_timeout_ms: 120_000,
                ..Default::default()
            })),
            name: String::new(),
            owner: String::new(),
            drop_unsupported_fds: false,
        })
        .await?
        .into_inner();
    Ok(s.id)
}

/// Per child: stdout, time of its last output and of its exit (from the
/// request), and the Exited event.
struct Spawned {
    stdout: Vec<u8>,
    last_output: Duration,
    exited: Duration,
    exit: pb::Exited,
}

async fn spawn(
    addr: &str,
    seed: &str,
    count: u32,
    stdin: &[u8],
    prefetch: &str,
    no_template: bool,
) -> anyhow::Result<(Vec<Spawned>, Duration)> {
    let mut c = forkd::client::connect(addr, None).await?;
    let t0 = Instant::now();
    let mut s = c
        .spawn(pb::SpawnRequest {
            seed: Some(pb::SeedRef {
                id: seed.into(),
                key: String::new(),
            }),
            count,
            stdin: stdin.to_vec(),
            prefetch: prefetch.into(),
            no_template,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut kids: Vec<Option<Spawned>> = (0..count).map(|_| None).collect();
    let mut outs: Vec<(Vec<u8>, Duration)> = vec![(Vec::new(), Duration::ZERO); count as usize];
    let mut ended = 0;
    while let Some(ev) = s.message().await? {
        let i = ev.index as usize;
        match ev.kind {
            Some(pb::instance_event::Kind::Output(o)) => {
                outs[i].0.extend_from_slice(&o.data);
                outs[i].1 = t0.elapsed();
            }
            Some(pb::instance_event::Kind::Exited(x)) => {
                kids[i] = Some(Spawned {
                    stdout: std::mem::take(&mut outs[i].0),
                    last_output: outs[i].1,
                    exited: t0.elapsed(),
                    exit: x,
                });
                ended += 1;
            }
            Some(pb::instance_event::Kind::Failed(x)) => bail!("a child failed: {}", x.reason),
            _ => {}
        }
        if ended == count {
            break;
        }
    }
    let total = t0.elapsed();
    Ok((kids.into_iter().flatten().collect(), total))
}

/// The warm parent itself: (answer ms inside it, exit ms from its answer).
fn parent_walk(py: &str) -> anyhow::Result<(f64, f64)> {
    let mut p = Command::new(py)
        .args(["-c", HEAP_WALK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(p.stdout.take().context("stdout")?);
    let mut l = String::new();
    out.read_line(&mut l)?;
    let mut stdin = p.stdin.take().context("stdin")?;
    stdin.write_all(b"go\n")?;
    l.clear();
    out.read_line(&mut l)?;
    let v: Value = serde_json::from_str(l.trim())?;
    let t = Instant::now();
    drop(stdin);
    p.wait()?;
    Ok((
        v["ms"].as_f64().unwrap_or(0.0),
        t.elapsed().as_secs_f64() * 1e3,
    ))
}

async fn heap_walk(py: &str, work: &Path) -> anyhow::Result<Value> {
    let f = Forkd::start(&work.join("walk"), &[])?;
    let addr = f.addr();
    let seed = seed_of(&addr, vec![py.into(), "-c".into(), HEAP_WALK.into()]).await?;
    // The first child records the working set; later ones get it.
    spawn(&addr, &seed, 1, b"go\n", "recorded", false).await?;
    let mut parent = Vec::new();
    let mut answer = Vec::new();
    let mut exit = Vec::new();
    let mut faults = Vec::new();
    // A warm parent and a child in turn: both see the machine as it is
    // then (this VM's speed drifts by a third within a minute).
    for _ in 0..9 {
        parent.push(parent_walk(py)?);
        let (k, _) = spawn(&addr, &seed, 1, b"go\n", "recorded", false).await?;
        let k = &k[0];
        let v: Value = serde_json::from_slice(k.stdout.trim_ascii())?;
        answer.push(v["ms"].as_f64().unwrap_or(0.0));
        exit.push((k.exited - k.last_output).as_secs_f64() * 1e3);
        faults.push(k.exit.faults as f64);
    }
    let p_answer = median(parent.iter().map(|p| p.0).collect());
    let p_exit = median(parent.iter().map(|p| p.1).collect());
    let c_answer = median(answer);
    let c_exit = median(exit);
    let (kids, total) = spawn(&addr, &seed, 100, b"go\n", "recorded", false).await?;
    let ok = kids
        .iter()
        .filter(|k| k.exit.exit_code == 0 && k.exit.signal == 0)
        .count();
    println!("1. heap walk (200,000-entry dict, summed per request)");
    println!("   warm parent: answers in {p_answer:.2} ms, exits {p_exit:.1} ms after its answer (median of 9, each run beside a child's)");
    println!(
        "   template child (recorded): answers in {c_answer:.2} ms ({:.2}x the parent; goal <= 2x), {} faults; exits in {c_exit:.1} ms ({:.2}x; goal <= 1.5x)",
        c_answer / p_answer,
        median(faults),
        c_exit / p_exit
    );
    println!(
        "   forkctl spawn --count 100 through the daemon: {ok}/100 correct, request to last exit {:.2} s",
        total.as_secs_f64()
    );
    Ok(json!({
        "parent_answer_ms": p_answer, "parent_exit_ms": p_exit,
        "child_answer_ms": c_answer, "child_exit_ms": c_exit,
        "answer_ratio": c_answer / p_answer, "exit_ratio": c_exit / p_exit,
        "count100_last_exit_s": total.as_secs_f64(), "count100_ok": ok,
    }))
}

fn children_of(pid: i32) -> Vec<i32> {
    remotefork::procfs::children(pid)
}

fn heap_prog(work: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd/tests/programs/heap.c");
    let out = work.join("heap");
    let st = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()?;
    if !st.success() {
        bail!("compiling {} failed", src.display());
    }
    Ok(out)
}

/// Start `heap MB` and wait until it is warm (blocked reading stdin).
fn warm_heap(prog: &Path, mb: u32) -> anyhow::Result<Proc> {
    let mut p = Command::new(prog)
        .arg(mb.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(p.stdout.take().context("stdout")?);
    let mut l = String::new();
    while !l.starts_with("ready") {
        l.clear();
        if out.read_line(&mut l)? == 0 {
            bail!("{} exited before it was ready", prog.display());
        }
    }
    common::wait_blocked_in_read(p.id() as i32)?;
    Ok(p)
}

/// The RSS of a fresh `heap MB` once warm.
fn heap_rss(prog: &Path, mb: u32) -> anyhow::Result<u64> {
    let mut p = warm_heap(prog, mb)?;
    let rss = std::fs::read_to_string(format!("/proc/{}/status", p.id()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let _ = p.kill();
    let _ = p.wait();
    Ok(rss)
}

async fn memory(prog: &Path, work: &Path) -> anyhow::Result<Value> {
    let rss = heap_rss(prog, 256)?;
    let mut rows = Vec::new();
    for (name, prefetch, no_template) in [
        ("template, recorded working set", "recorded", false),
        ("template, window", "window", false),
        ("no template", "window", true),
    ] {
        let f = Forkd::start(&work.join(format!("mem-{prefetch}-{no_template}")), &[])?;
        let addr = f.addr();
        let seed = seed_of(&addr, vec![prog.display().to_string(), "256".into()]).await?;
        spawn(&addr, &seed, 1, b"sum\n", prefetch, no_template).await?;
        let release = work.join(format!("release-{prefetch}-{no_template}"));
        let input = format!("sum\nawait {}\n", release.display());
        let fpid = f.pid();
        let handle = {
            let (seed, prefetch) = (seed.clone(), prefetch.to_string());
            tokio::spawn(async move {
                spawn(&addr, &seed, 8, input.as_bytes(), &prefetch, no_template).await
            })
        };
        let marks = |r: &Path| {
            let name = r
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
                + ".";
            std::fs::read_dir(work)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
                        .count()
                })
                .unwrap_or(0)
        };
        let t = Instant::now();
        while marks(&release) < 8 {
            if t.elapsed() > Duration::from_secs(300) {
                bail!("8 children did not all read their heap");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all: u64 = children_of(fpid)
            .iter()
            .map(|c| remotefork::procfs::pss(*c))
            .sum();
        std::fs::write(&release, "")?;
        handle.await??;
        println!(
            "   {name}: {} MiB ({:.2}x one parent's RSS; {:.1}% of 8 x RSS)",
            all >> 20,
            all as f64 / rss as f64,
            all as f64 * 100.0 / (8 * rss) as f64
        );
        rows.push(
            json!({ "mode": name, "pss_bytes": all, "x_parent_rss": all as f64 / rss as f64 }),
        );
    }
    Ok(json!({ "parent_rss_bytes": rss, "rows": rows }))
}

/// Capture `heap MB` with the library; returns the image directory.
fn heap_seed(prog: &Path, mb: u32, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut p = warm_heap(prog, mb)?;
    let _ = std::fs::remove_dir_all(dir);
    capture(p.id() as i32, dir, &CaptureOptions::default())?;
    let _ = p.kill();
    let _ = p.wait();
    Ok(dir.to_path_buf())
}

/// Start one child of `r` reading `tsum`; its time to read the heap (µs)
/// and faults.
fn tsum(r: &remotefork::Seed, opts: &SpawnOptions) -> anyhow::Result<(f64, u64)> {
    tsum_wall(r, opts).map(|(us, f, _)| (us, f))
}

/// [`tsum`], and the time from the start of the spawn to the child's
/// answer (ms): the restore, memory written before it runs included.
fn tsum_wall(r: &remotefork::Seed, opts: &SpawnOptions) -> anyhow::Result<(f64, u64, f64)> {
    let t0 = std::time::Instant::now();
    let (in_r, mut in_w) = std::io::pipe()?;
    let (out_r, out_w) = std::io::pipe()?;
    let mut c = r.spawn(
        remotefork::Stdio::Fd(in_r.into()),
        remotefork::Stdio::Fd(out_w.into()),
        remotefork::Stdio::Null,
        opts,
    )?;
    in_w.write_all(b"tsum\n")?;
    drop(in_w);
    let mut l = String::new();
    BufReader::new(out_r).read_line(&mut l)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let us: f64 = l
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("child said {l:?}"))?
        .parse()?;
    c.wait()?;
    let faults = c
        .stats()
        .map(|s| {
            s.wait_finished(Duration::from_secs(5));
            s.faults.load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap_or(0);
    Ok((us, faults, wall_ms))
}

fn scratch_opts(lazy: bool, prefetch: Prefetch, template: bool) -> SpawnOptions {
    SpawnOptions::default()
        .lazy(lazy)
        .prefetch(prefetch)
        .share(true)
        .template(template)
}

fn digests(prog: &Path, work: &Path) -> anyhow::Result<Value> {
    let with = heap_seed(prog, 256, &work.join("dig"))?;
    // The same seed without digests: its descriptor rewritten as format 1.
    let without = work.join("nodig");
    let _ = std::fs::remove_dir_all(&without);
    std::fs::create_dir_all(&without)?;
    std::fs::copy(with.join("pages.img"), without.join("pages.img"))?;
    let mut d = SeedImage::open(&with)?.descriptor().clone();
    d.format_version = remotefork::image::FORMAT_V1;
    d.digests = None;
    std::fs::write(
        without.join("descriptor.bin"),
        remotefork::image::encode(&d)?,
    )?;
    let opts = scratch_opts(true, Prefetch::Window, false);
    let mut rows = Vec::new();
    let mut meds = Vec::new();
    for (name, dir) in [("with digests", &with), ("without digests", &without)] {
        let mut t = Vec::new();
        let mut faults = 0;
        for _ in 0..5 {
            // A new restorer each time: a cold node cache, every page fetched.
            let r = remotefork::Seed::new(SeedImage::open(dir)?)?;
            let (us, f) = tsum(&r, &opts)?;
            t.push(us / 1e3);
            faults = f;
        }
        let m = median(t);
        meds.push(m);
        rows.push(json!({ "mode": name, "read_ms": m, "faults": faults }));
        println!("   lazy child, cold cache, {name}: reads 256 MiB in {m:.1} ms ({faults} faults)");
    }
    println!(
        "   digest cost on the fault path: {:+.1}% ({:.1} ms)",
        (meds[0] / meds[1] - 1.0) * 100.0,
        meds[0] - meds[1]
    );
    Ok(json!({ "rows": rows, "cost_pct": (meds[0] / meds[1] - 1.0) * 100.0 }))
}

/// Cold-cache runs of each kind in [`lazy_vs_eager`].
const COLD_RUNS: usize = 7;

/// "min-max" of `v`, in ms.
fn range(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}-{max:.0}")
}

fn lazy_vs_eager(prog: &Path, work: &Path) -> anyhow::Result<Value> {
    let dir = heap_seed(prog, 1024, &work.join("gib"))?;
    let eager = {
        let r = remotefork::Seed::new(SeedImage::open(&dir)?)?;
        let mut t = Vec::new();
        for _ in 0..3 {
            t.push(tsum(&r, &scratch_opts(false, Prefetch::Off, false))?.0 / 1e3);
        }
        median(t)
    };
    // An eager child forked from the node's eager template (the default
    // path for eager spawns): pages shared copy-on-write, as a lazy
    // template's children's are.
    let eager_tpl = {
        let r = remotefork::Seed::new(SeedImage::open(&dir)?)?;
        let _ = tsum(&r, &scratch_opts(false, Prefetch::Off, true))?;
        let mut t = Vec::new();
        for _ in 0..3 {
            t.push(tsum(&r, &scratch_opts(false, Prefetch::Off, true))?.0 / 1e3);
        }
        median(t)
    };
    // From the spawn to the answer, each on a new restorer (a cold node
    // cache): an eager child has every page written before it runs, a lazy
    // one fetches them as it reads. COLD_RUNS of each, alternating; the first
    // lazy child also records the seed's working set (the later ones find
    // it recorded), so it is shown apart.
    let mut eager_walls = Vec::new();
    let mut lazy_walls = Vec::new();
    let mut lazy_reads = Vec::new();
    let mut first_lazy = None;
    let mut r = None;
    for _ in 0..COLD_RUNS {
        let (e, fresh, c) = cold_pair(&dir)?;
        eager_walls.push(e);
        if first_lazy.is_none() {
            first_lazy = Some(c);
        }
        lazy_walls.push(c.2);
        lazy_reads.push((c.0, c.1));
        r = Some(fresh);
    }
    let r = r.context("no cold run")?;
    let (eager_wall, eager_range) = (median(eager_walls.clone()), range(&eager_walls));
    // The first recorded the working set: the typical cold child is a later one.
    let later = &lazy_walls[1..];
    let (cold_wall, cold_range) = (median(later.to_vec()), range(later));
    let cold = {
        let mut v = lazy_reads[1..].to_vec();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let first_lazy = first_lazy.context("no cold run")?;
    // The same, with this thread, its pager threads and its children on one
    // CPU: on this VM, a lazy child and its pager on two vCPUs at once have
    // runs where the pager's copying takes 2-4x the CPU time, which never
    // happened in 28 runs on one vCPU (docs/DECISIONS.md).
    let one_cpu = on_one_cpu(|| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let (mut e, mut l) = (Vec::new(), Vec::new());
        for _ in 0..COLD_RUNS {
            let (eager, _, lazy) = cold_pair(&dir)?;
            e.push(eager);
            l.push(lazy.2);
        }
        Ok((e, l))
    })?;
    let warm = tsum(&r, &scratch_opts(true, Prefetch::Window, false))?;
    // The first child recorded the working set: a template gets it.
    let _ = tsum(&r, &scratch_opts(true, Prefetch::Recorded, true))?;
    let tpl = tsum(&r, &scratch_opts(true, Prefetch::Recorded, true))?;
    println!("   eager child restored from scratch: reads 1 GiB in {eager:.0} ms (median of 3)");
    println!("   eager child forked from the eager template: reads 1 GiB in {eager_tpl:.0} ms (median of 3)");
    for (name, (us, f), base, base_name) in [
        (
            "lazy from scratch, cold node cache",
            cold,
            eager,
            "eager from scratch",
        ),
        (
            "lazy from scratch, warm node cache",
            warm,
            eager,
            "eager from scratch",
        ),
        (
            "lazy, forked from the template with the recorded working set",
            tpl,
            eager_tpl,
            "eager forked from its template",
        ),
    ] {
        println!(
            "   {name}: {:.0} ms ({:.2}x {base_name}; goal <= 1.5x), {f} faults",
            us / 1e3,
            us / 1e3 / base
        );
    }
    println!(
        "   from the spawn to the answer, cold node cache (each on a new node cache): eager {eager_wall:.0} ms (median of {COLD_RUNS}, {eager_range}), lazy {cold_wall:.0} ms (median of {}, {cold_range}): {:.2}x (goal <= 1.5x)",
        later.len(),
        cold_wall / eager_wall
    );
    let (one_eager, one_lazy) = match &one_cpu {
        Some((e, l)) => {
            let (me, ml) = (median(e.clone()), median(l.clone()));
            println!(
                "   the same, all on one CPU: eager {me:.0} ms ({}), lazy {ml:.0} ms ({}): {:.2}x (goal <= 1.5x)",
                range(e),
                range(l),
                ml / me
            );
            (Some(me), Some(ml))
        }
        None => {
            println!("   the same, all on one CPU: SKIPPED: the CPU affinity could not be set");
            (None, None)
        }
    };
    println!(
        "   the first lazy child (it also records the seed's working set, once per seed): reads 1 GiB in {:.0} ms, {:.0} ms from the spawn ({:.2}x the eager median)",
        first_lazy.0 / 1e3,
        first_lazy.2,
        first_lazy.2 / eager_wall
    );
    Ok(json!({
        "eager_cold_spawn_to_answer_ms": eager_wall, "lazy_cold_spawn_to_answer_ms": cold_wall,
        "eager_cold_spawn_to_answer_all_ms": eager_walls, "lazy_cold_spawn_to_answer_all_ms": lazy_walls,
        "first_lazy_cold_ms": first_lazy.0 / 1e3, "first_lazy_cold_spawn_to_answer_ms": first_lazy.2,
        "eager_ms": eager, "eager_template_ms": eager_tpl, "lazy_cold_ms": cold.0 / 1e3,
        "lazy_warm_ms": warm.0 / 1e3, "lazy_template_ms": tpl.0 / 1e3,
        "one_cpu_eager_cold_spawn_to_answer_ms": one_eager,
        "one_cpu_lazy_cold_spawn_to_answer_ms": one_lazy,
    }))
}

/// One cold-cache pair, each on a new node cache: an eager child's time
/// from the spawn to the answer, then a lazy child's restorer and
/// [`tsum_wall`] figures.
fn cold_pair(dir: &Path) -> anyhow::Result<(f64, remotefork::Seed, (f64, u64, f64))> {
    let eager = tsum_wall(
        &remotefork::Seed::new(SeedImage::open(dir)?)?,
        &scratch_opts(false, Prefetch::Off, false),
    )?
    .2;
    let fresh = remotefork::Seed::new(SeedImage::open(dir)?)?;
    let lazy = tsum_wall(&fresh, &scratch_opts(true, Prefetch::Window, false))?;
    Ok((eager, fresh, lazy))
}

/// Run `f` with this thread (and the threads and processes it starts) on
/// the CPU it is on now, then put its affinity back. `None` if the
/// affinity cannot be set.
fn on_one_cpu<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `old` is a cpu_set_t of `size` bytes, written by the call.
    if unsafe { libc::sched_getaffinity(0, size, &mut old) } != 0 {
        return Ok(None);
    }
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return Ok(None);
    }
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` (a CPU number the kernel gave, below
    // CPU_SETSIZE) of a valid set.
    unsafe { libc::CPU_SET(cpu as usize, &mut one) };
    // SAFETY: `one` is a valid cpu_set_t of `size` bytes.
    if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
        return Ok(None);
    }
    let r = f();
    // SAFETY: `old` is the set read above.
    unsafe { libc::sched_setaffinity(0, size, &old) };
    r.map(Some)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    // The library's own logs (parts 3 and 4 restore in this process), if
    // asked for.
    if std::env::var_os("FORKD_LOG").is_some() {
        forkd::cli::init_logging("warn", forkd::cli::LogFormat::Text);
    }
    let json_out = std::env::args()
        .skip_while(|a| a != "--json")
        .nth(1)
        .map(PathBuf::from);
    // --only N: just part N (1-4; 1 is the heap walk).
    let only: Option<u32> = match std::env::args().skip_while(|a| a != "--only").nth(1) {
        Some(n) => Some(n.parse().context("--only takes a part number, 1-4")?),
        None => None,
    };
    let part = |n: u32| only.is_none_or(|o| o == n);
    let py = common::python()?;
    let work = std::env::temp_dir().join(format!("forklike-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let prog = heap_prog(&work)?;
    let walk = if part(1) {
        heap_walk(&py, &work).await?
    } else {
        Value::Null
    };
    let mem = if part(2) {
        println!("2. memory: 8 children of a 256 MiB heap, each read all of it, alive together (PSS of children and templates)");
        memory(&prog, &work).await?
    } else {
        Value::Null
    };
    let dig = if part(3) {
        println!("3. page digests");
        tokio::task::spawn_blocking({
            let (p, w) = (prog.clone(), work.clone());
            move || digests(&p, &w)
        })
        .await??
    } else {
        Value::Null
    };
    let gib = if part(4) {
        println!("4. reading a whole 1 GiB heap: lazy against eager");
        tokio::task::spawn_blocking({
            let (p, w) = (prog.clone(), work.clone());
            move || lazy_vs_eager(&p, &w)
        })
        .await??
    } else {
        Value::Null
    };
    let all = json!({ "heap_walk": walk, "memory": mem, "digests": dig, "lazy_vs_eager": gib });
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&all)?)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
