//! `forkctl`: talk to a forkd. Human output by default, `--json` everywhere.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forkd::pb;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "forkctl",
    version,
    about = "Control a forkd: seeds, spawns, instances"
)]
struct Cli {
    /// forkd address: unix:PATH or HOST:PORT [env FORKD_ADDR; default unix:/run/forkd/forkd.sock].
    #[arg(long, global = true)]
    addr: Option<String>,
    /// File with the bearer token (TCP) [env FORKD_TOKEN_FILE].
    #[arg(long, global = true)]
    token_file: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Seeds: create, list, show, drop, reference.
    Seed {
        #[command(subcommand)]
        cmd: SeedCmd,
    },
    /// Start children from a seed (an id, or a reference from `seed ref`).
    Spawn {
        /// Seed id or reference (`ADDR/ID#KEY`).
        seed: String,
        /// How many children.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// File given whole to every child as stdin.
        #[arg(long)]
        stdin: Option<String>,
        /// off, window or recorded.
        #[arg(long, default_value = "window")]
        prefetch: String,
        /// Write all memory before the children run.
        #[arg(long)]
        eager: bool,
        /// Restore every child from scratch instead of forking it from the
        /// node's template of the seed.
        #[arg(long)]
        no_template: bool,
        /// Labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// For cooperative seeds: what checkpoint() returns as args in each child.
        #[arg(long, default_value = "")]
        args: String,
    },
    /// List instances.
    Ps {
        /// Only this seed's.
        #[arg(long)]
        seed: Option<String>,
    },
    /// Kill an instance.
    Kill {
        /// Instance id.
        id: String,
    },
    /// Show this node.
    Node,
}

#[derive(Subcommand)]
enum SeedCmd {
    /// Capture a running process (--pid) or start a command and capture it
    /// once it prints --ready-line.
    Create {
        /// The process to capture.
        #[arg(long, conflicts_with = "ready_line")]
        pid: Option<u32>,
        /// The line the command prints when it is warm.
        #[arg(long)]
        ready_line: Option<String>,
        /// How long to wait for it, ms.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u32,
        /// A name for the seed.
        #[arg(long, default_value = "")]
        name: String,
        /// The command and its arguments (after --).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List seeds.
    Ls,
    /// Show a seed.
    Get {
        /// Seed id.
        id: String,
    },
    /// Drop a seed (its image is deleted).
    Drop {
        /// Seed id.
        id: String,
    },
    /// Print a portable reference (address, id, key) another node's Spawn
    /// accepts. Ask over the Unix socket (the key is not given out over TCP)
    /// and name the node's TCP address with --origin.
    Ref {
        /// Seed id.
        id: String,
        /// The node's gRPC address as other nodes reach it [default: --addr].
        #[arg(long)]
        origin: Option<String>,
    },
}

fn seed_json(s: &pb::Seed) -> Value {
    json!({
        "id": s.id, "key": s.key, "name": s.name, "created_unix_ms": s.created_unix_ms,
        "source_pid": s.source_pid, "image_bytes": s.image_bytes, "vmas": s.vmas,
        "pause_us": s.pause_us, "capture_us": s.capture_us, "node": s.node,
        "children_spawned": s.children_spawned, "damaged": s.damaged,
    })
}

/// `ADDR/ID#KEY` or a bare id.
fn parse_ref(r: &str) -> (Option<String>, pb::SeedRef) {
    match r.rsplit_once('/') {
        Some((addr, rest)) => {
            let (id, key) = rest.split_once('#').unwrap_or((rest, ""));
            (
                Some(addr.to_string()),
                pb::SeedRef {
                    id: id.into(),
                    key: key.into(),
                },
            )
        }
        None => {
            let (id, key) = r.split_once('#').unwrap_or((r, ""));
            (
                None,
                pb::SeedRef {
                    id: id.into(),
                    key: key.into(),
                },
            )
        }
    }
}

fn status_err(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let addr = cli
        .addr
        .clone()
        .or_else(|| std::env::var("FORKD_ADDR").ok())
        .unwrap_or_else(|| "unix:/run/forkd/forkd.sock".into());
    let token = match cli
        .token_file
        .clone()
        .or_else(|| std::env::var("FORKD_TOKEN_FILE").ok())
    {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading token file {p}"))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut c = forkd::client::connect(&addr, token.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Seed { cmd } => match cmd {
            SeedCmd::Create {
                pid,
                ready_line,
                timeout_ms,
                name,
                command,
            } => {
                let source = match (pid, ready_line) {
                    (Some(pid), _) => pb::create_seed_request::Source::Pid(pid),
                    (None, Some(line)) => {
                        anyhow::ensure!(!command.is_empty(), "give the command after --");
                        pb::create_seed_request::Source::Command(pb::StartCommand {
                            argv: command,
                            ready_line: line,
                            ready_timeout_ms: timeout_ms,
                            cwd: String::new(),
                            env: Default::default(),
                        })
                    }
                    (None, None) => {
                        anyhow::bail!("give --pid PID, or --ready-line TEXT -- CMD ARGS...")
                    }
                };
                let s = c
                    .create_seed(pb::CreateSeedRequest {
                        source: Some(source),
                        name,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if cli.json {
                    writeln!(out, "{}", seed_json(&s))?;
                } else {
                    writeln!(out, "{}", s.id)?;
                    eprintln!(
                        "seed {} from pid {}: {} mappings, {:.1} MiB, parent paused {} us",
                        s.id,
                        s.source_pid,
                        s.vmas,
                        s.image_bytes as f64 / 1048576.0,
                        s.pause_us
                    );
                }
            }
            SeedCmd::Ls => {
                let l = c
                    .list_seeds(pb::ListSeedsRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if cli.json {
                    writeln!(
                        out,
                        "{}",
                        Value::Array(l.seeds.iter().map(seed_json).collect())
                    )?;
                } else {
                    writeln!(
                        out,
                        "{:<18} {:<24} {:>10} {:>8} {:>9}",
                        "ID", "NAME", "MiB", "VMAS", "CHILDREN"
                    )?;
                    for s in l.seeds {
                        writeln!(
                            out,
                            "{:<18} {:<24} {:>10.1} {:>8} {:>9}",
                            s.id,
                            s.name,
                            s.image_bytes as f64 / 1048576.0,
                            s.vmas,
                            s.children_spawned
                        )?;
                        if !s.damaged.is_empty() {
                            writeln!(out, "  damaged: {}", s.damaged)?;
                        }
                    }
                }
            }
            SeedCmd::Get { id } => {
                let (_, r) = parse_ref(&id);
                let s = c.get_seed(r).await.map_err(status_err)?.into_inner();
                writeln!(
                    out,
                    "{}",
                    if cli.json {
                        seed_json(&s).to_string()
                    } else {
                        serde_json::to_string_pretty(&seed_json(&s))?
                    }
                )?;
            }
            SeedCmd::Drop { id } => {
                let (_, r) = parse_ref(&id);
                c.drop_seed(r).await.map_err(status_err)?;
                if cli.json {
                    writeln!(out, "{}", json!({ "dropped": id }))?;
                }
            }
            SeedCmd::Ref { id, origin } => {
                let s = c
                    .get_seed(pb::SeedRef {
                        id,
                        key: String::new(),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                anyhow::ensure!(
                    !s.key.is_empty(),
                    "forkd gave no key: ask over its Unix socket"
                );
                let r = format!("{}/{}#{}", origin.unwrap_or(addr.clone()), s.id, s.key);
                writeln!(
                    out,
                    "{}",
                    if cli.json {
                        json!({ "ref": r }).to_string()
                    } else {
                        r
                    }
                )?;
            }
        },
        Cmd::Spawn {
            seed,
            count,
            stdin,
            prefetch,
            eager,
            no_template,
            labels,
            args,
        } => {
            let (origin, r) = parse_ref(&seed);
            let input = match stdin {
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {p}"))?,
                None => Vec::new(),
            };
            let labels = labels
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("label {l:?} is not KEY=VALUE"))
                })
                .collect::<Result<_, _>>()?;
            let req = pb::SpawnRequest {
                seed: Some(r),
                count,
                stdin: input,
                stdout: pb::StdoutMode::Capture as i32,
                labels,
                prefetch,
                eager,
                args,
                origin: origin.unwrap_or_default(),
                no_template,
            };
            let mut stream = c.spawn(req).await.map_err(status_err)?.into_inner();
            let mut children: std::collections::BTreeMap<u32, Value> = Default::default();
            let (mut started, mut failed, mut exited) = (0u32, 0u32, 0u32);
            let mut ttr = Vec::new();
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut noted: std::collections::HashSet<String> = Default::default();
            while let Some(ev) = stream.message().await.map_err(status_err)? {
                let e = children
                    .entry(ev.index)
                    .or_insert_with(|| json!({ "index": ev.index }));
                e["instance"] = json!(ev.instance_id);
                if ev.pid != 0 {
                    e["pid"] = json!(ev.pid);
                }
                match ev.kind {
                    Some(pb::instance_event::Kind::Started(_)) => started += 1,
                    Some(pb::instance_event::Kind::Running(r)) => {
                        ttr.push(r.time_to_running_ms);
                        e["time_to_running_ms"] = json!(r.time_to_running_ms);
                        if !cli.json {
                            for n in r.notes.iter().filter(|n| !noted.contains(*n)) {
                                eprintln!("forkctl: note: {n}");
                            }
                        }
                        noted.extend(r.notes.iter().cloned());
                        e["notes"] = json!(r.notes);
                    }
                    Some(pb::instance_event::Kind::Exited(x)) => {
                        exited += 1;
                        e["exit_code"] = json!(x.exit_code);
                        e["signal"] = json!(x.signal);
                        e["reason"] = json!(x.reason);
                        e["faults"] = json!(x.faults);
                        e["stdout"] = json!(String::from_utf8_lossy(&x.stdout));
                        if x.signal != 0 || x.exit_code != 0 {
                            failed += 1;
                        }
                    }
                    Some(pb::instance_event::Kind::Output(o)) => {
                        e["first_output_ms"] = json!(o.since_spawn_ms);
                    }
                    Some(pb::instance_event::Kind::Failed(f)) => {
                        failed += 1;
                        exited += 1;
                        e["failed"] = json!(f.reason);
                    }
                    None => {}
                }
                if tty && count > 1 && !cli.json {
                    eprint!("\r{started}/{count} started, {exited} done, {failed} failed");
                }
                if exited == count {
                    break;
                }
            }
            if tty && count > 1 && !cli.json {
                eprintln!();
            }
            ttr.sort_by(|a, b| a.total_cmp(b));
            let pct = |q: f64| {
                if ttr.is_empty() {
                    0.0
                } else {
                    ttr[((ttr.len() - 1) as f64 * q).round() as usize]
                }
            };
            if cli.json {
                let v = json!({
                    "started": started, "failed": failed, "count": count,
                    "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                    "children": children.values().collect::<Vec<_>>(),
                });
                writeln!(out, "{v}")?;
            } else {
                if count == 1 {
                    if let Some(s) = children.values().next().and_then(|c| c["stdout"].as_str()) {
                        write!(out, "{s}")?;
                    }
                }
                eprintln!("{started} started, {failed} failed; time to running p50 {:.2} ms, p99 {:.2} ms", pct(0.5), pct(0.99));
            }
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Ps { seed } => {
            let l = c
                .list_instances(pb::ListInstancesRequest {
                    seed_id: seed.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.json {
                let v: Vec<Value> = l.instances.iter().map(|i| json!({ "id": i.id, "seed_id": i.seed_id, "pid": i.pid, "state": i.state, "labels": i.labels })).collect();
                writeln!(out, "{}", Value::Array(v))?;
            } else {
                writeln!(out, "{:<28} {:<18} {:>8} STATE", "INSTANCE", "SEED", "PID")?;
                for i in l.instances {
                    writeln!(
                        out,
                        "{:<28} {:<18} {:>8} {}",
                        i.id, i.seed_id, i.pid, i.state
                    )?;
                }
            }
        }
        Cmd::Kill { id } => {
            c.kill_instance(pb::KillInstanceRequest {
                instance_id: id.clone(),
            })
            .await
            .map_err(status_err)?;
            if cli.json {
                writeln!(out, "{}", json!({ "killed": id }))?;
            }
        }
        Cmd::Node => {
            let n = c
                .node_info(pb::NodeInfoRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let t: Vec<Value> = n
                .transports
                .iter()
                .map(|t| json!({ "name": t.name, "available": t.available, "reason": t.reason }))
                .collect();
            let v = json!({
                "version": n.version, "hostname": n.hostname, "kernel": n.kernel, "vdso_hash": n.vdso_hash,
                "transports": t, "cpus": n.cpus, "memory_bytes": n.memory_bytes, "seeds": n.seeds,
                "instances_running": n.instances_running, "pss_bytes": n.pss_bytes,
                "transport": {"configured": n.transport, "selected": n.transport_selected,
                              "reason": n.transport_reason},
            });
            writeln!(
                out,
                "{}",
                if cli.json {
                    v.to_string()
                } else {
                    serde_json::to_string_pretty(&v)?
                }
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
