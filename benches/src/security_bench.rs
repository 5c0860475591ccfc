//! What tenancy costs a child (issue 14), beside its baseline in the same
//! run: the heap-walk Python of `forklike-bench` (a warm dict of 200,000
//! entries, summed per request), one child at a time, time from the Spawn
//! request to its first answer.
//!
//! - **without**: a forkd with no tenants; root on the Unix socket spawns
//!   the operator's seed (the child runs as the parent's user, root).
//! - **with**: a forkd with a tenants file; the tenant spawns over the same
//!   kind of socket with its token (checked against the SHA-256 digests,
//!   ownership checks), and its child runs as the tenant's uid with
//!   no_new_privs, no capabilities, its own session.
//!
//! Both daemons run at once; the measurements alternate between them, and
//! the median of the paired ratios is printed beside the two medians.
//!
//! Run: `sudo sh -c 'cargo build --release -p forkd && cargo run --release -p remotefork-benches --bin security-bench'`

mod common;

use std::io::{BufRead, BufReader};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forkd::pb;

const TOKEN: &str = "bench-tenant-token";

/// Children per side, alternating.
const ROUNDS: usize = 61;

use common::{median, Forkd, HEAP_WALK};

/// A warm parent (root), captured by pid for `owner`.
async fn seed(addr: &str, py: &str, owner: &str) -> anyhow::Result<String> {
    let mut p = Command::new(py)
        .args(["-c", HEAP_WALK])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut l = String::new();
    BufReader::new(p.stdout.as_mut().context("stdout")?).read_line(&mut l)?;
    common::wait_blocked_in_read(p.id() as i32)?;
    let mut c = forkd::client::connect(addr, None).await?;
    let s = c
        .create_seed(pb::CreateSeedRequest {
            source: Some(pb::create_seed_request::Source::Pid(p.id())),
            name: String::new(),
            owner: owner.into(),
            drop_unsupported_fds: false,
        })
        .await?
        .into_inner();
    let _ = p.kill();
    let _ = p.wait();
    Ok(s.id)
}

/// One child: ms from the request to its first answer (and to running,
/// as forkd measured it), and the answer.
async fn first_answer(
    addr: &str,
    token: Option<&str>,
    seed: &str,
) -> anyhow::Result<(f64, f64, serde_json::Value)> {
    let mut c = forkd::client::connect(addr, token).await?;
    let t0 = Instant::now();
    let mut s = c
        .spawn(pb::SpawnRequest {
            seed: Some(pb::SeedRef {
                id: seed.into(),
                key: String::new(),
            }),
            count: 1,
            stdin: b"go\n".to_vec(),
            prefetch: "recorded".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut first = None;
    let mut running = 0.0;
    let mut out = Vec::new();
    while let Some(ev) = s.message().await? {
        match ev.kind {
            Some(pb::instance_event::Kind::Running(r)) => running = r.time_to_running_ms,
            Some(pb::instance_event::Kind::Output(o)) => {
                first.get_or_insert(t0.elapsed());
                out.extend_from_slice(&o.data);
            }
            Some(pb::instance_event::Kind::Exited(_)) => break,
            Some(pb::instance_event::Kind::Failed(x)) => bail!("a child failed: {}", x.reason),
            _ => {}
        }
    }
    let ms = first.context("no output")?.as_secs_f64() * 1e3;
    Ok((ms, running, serde_json::from_slice(out.trim_ascii())?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // What started this run (a shell's pipe) is not the programs' to hold.
    forkd::cloexec_inherited_fds();
    let py = common::python()?;
    let work = std::env::temp_dir().join(format!("security-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let hash = forkd::daemon::auth::hash_token(TOKEN);
    let tenants = work.join("tenants.toml");
    std::fs::write(
        &tenants,
        format!("[[tenant]]\nname = \"t\"\ntoken_sha256 = \"{hash}\"\nuid = 3001\ngid = 3001\n"),
    )?;
    let plain = Forkd::start(&work.join("plain"), &[])?;
    let tenanted = Forkd::start(
        &work.join("tenanted"),
        &["--tenants-file", tenants.to_str().context("path")?],
    )?;
    let s_plain = seed(&plain.addr(), &py, "").await?;
    let s_tenant = seed(&tenanted.addr(), &py, "t").await?;
    // The first child of each builds the template and records the working set.
    for _ in 0..2 {
        first_answer(&plain.addr(), None, &s_plain).await?;
        first_answer(&tenanted.addr(), Some(TOKEN), &s_tenant).await?;
    }
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut run_without, mut run_with) = (Vec::new(), Vec::new());
    let (mut walk_without, mut walk_with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (ms, run, v) = first_answer(&plain.addr(), None, &s_plain).await?;
        anyhow::ensure!(v["uid"] == 0, "the operator's child is not root: {v}");
        without.push(ms);
        run_without.push(run);
        walk_without.push(v["ms"].as_f64().unwrap_or(0.0));
        // Let each daemon's spare child be forked (after a spawn returns)
        // before the other is measured, on a 2-core box.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (ms, run, v) = first_answer(&tenanted.addr(), Some(TOKEN), &s_tenant).await?;
        anyhow::ensure!(v["uid"] == 3001, "the tenant's child is not uid 3001: {v}");
        with.push(ms);
        run_with.push(run);
        walk_with.push(v["ms"].as_f64().unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pair_ratio = median(without.iter().zip(&with).map(|(a, b)| b / a).collect());
    let (a, b) = (median(without), median(with));
    println!("time from Spawn to a child's first answer (heap walk, template, recorded; median of {ROUNDS}, alternating):");
    println!("   without tenancy (root on the Unix socket, child as root):       {a:.2} ms");
    println!(
        "   with tenancy (token, ownership, child as uid 3001, no_new_privs): {b:.2} ms ({:+.1}%; goal under +10%)",
        (b / a - 1.0) * 100.0
    );
    println!(
        "   median of the {ROUNDS} paired ratios (with / without, same round): {pair_ratio:.3}"
    );
    println!(
        "   of which: time to running {:.2} / {:.2} ms, the walk inside the child {:.2} / {:.2} ms (without / with)",
        median(run_without),
        median(run_with),
        median(walk_without),
        median(walk_with)
    );
    drop((plain, tenanted));
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
