//! `forkctl`: talk to a forkd. Human output by default, `--json`
//! everywhere, in the vocabulary `forkd` uses too (docs/cli-schema.json).

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forkd::cli::{natural_cmp, ChildReport, SpawnReport, Table};
use forkd::pb;
use serde_json::{json, Value};

/// Inputs up to this size go inside the spawn request; larger ones are
/// staged with `PutInput` first (a gRPC message is at most 4 MiB).
const INLINE_INPUT: usize = 1 << 20;

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
    /// The CA (PEM) an https://HOST:PORT forkd's certificate is checked
    /// against [env FORKD_TLS_CA].
    #[arg(long, global = true)]
    tls_ca: Option<String>,
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
        /// How many children (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Write each child's stdout to DIR/child-I.out instead of printing it.
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
        /// File given whole to every child as stdin.
        #[arg(long)]
        stdin: Option<String>,
        #[command(flatten)]
        mode: ChildMode,
        /// Labels, KEY=VALUE.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// For cooperative seeds: what checkpoint() returns as args in each child.
        #[arg(long, default_value = "")]
        args: String,
        /// A container seed's children: memory limit of each (bytes, or
        /// with K, M, G) [default: the parent container's].
        #[arg(long, value_parser = remotefork::container::parse_size)]
        memory_limit: Option<u64>,
        /// A container seed's children: most processes and threads each may
        /// have [default: the parent container's].
        #[arg(long)]
        pids_limit: Option<u64>,
        /// A container seed's children: CPUs each may use, e.g. 0.5
        /// [default: the parent container's].
        #[arg(long, value_parser = remotefork::container::parse_cpus)]
        cpu_limit: Option<u64>,
    },
    /// Make the node ready to start children of a seed at once, without
    /// starting one: another node's seed (a reference) and its container
    /// rootfs fetched, the node's template for this mode built and its
    /// spare forked.
    Prepare {
        /// Seed id or reference (`ADDR/ID#KEY`).
        seed: String,
        /// The mode of the children to come.
        #[command(flatten)]
        mode: ChildMode,
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
    /// One instance: its state, how it ended, and the output forkd kept
    /// (also for a child an earlier forkd started and handed over).
    Instance {
        /// Instance id.
        id: String,
    },
    /// Show this node.
    Node,
}

/// How children are started (which of the node's templates serves them).
#[derive(clap::Args)]
struct ChildMode {
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
    /// A container seed's children: "loopback" (their own network
    /// namespace, lo up) or "none".
    #[arg(long, default_value = "loopback")]
    net: String,
}

impl ChildMode {
    /// A request for children of `seed` (an id or a reference) in this
    /// mode; the caller adds the rest.
    fn request(self, seed: &str) -> pb::SpawnRequest {
        let (origin, r) = parse_ref(seed);
        pb::SpawnRequest {
            seed: Some(r),
            prefetch: self.prefetch,
            eager: self.eager,
            origin: origin.unwrap_or_default(),
            no_template: self.no_template,
            container: Some(pb::ContainerLimits {
                network: self.net,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum SeedCmd {
    /// Capture a running process (--pid), a running container
    /// (--container), or start a command or an OCI bundle (--oci-bundle)
    /// and capture it once it prints --ready-line.
    Create {
        /// The process to capture.
        #[arg(long, conflicts_with_all = ["ready_line", "oci_bundle", "container"])]
        pid: Option<u32>,
        /// Run this OCI bundle (config.json and rootfs) with runc or crun
        /// and capture its process once it prints --ready-line: a
        /// container seed. A command after -- replaces its process.args.
        #[arg(long, conflicts_with = "container")]
        oci_bundle: Option<String>,
        /// Capture the process of this running container (its id in the
        /// OCI runtime).
        #[arg(long, conflicts_with = "ready_line")]
        container: Option<String>,
        /// The OCI runtime for --oci-bundle and --container: runc or crun.
        #[arg(long, default_value = "runc")]
        runtime: String,
        /// The line the command prints when it is warm.
        #[arg(long)]
        ready_line: Option<String>,
        /// How long to wait for it, ms.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u32,
        /// A name for the seed.
        #[arg(long, default_value = "")]
        name: String,
        /// Environment for the command, KEY=VALUE (added to forkd's); repeatable.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The command's working directory [default: forkd's].
        #[arg(long)]
        cwd: Option<String>,
        /// Operator only: the tenant the seed is made for (it sees and
        /// spawns it; its children run as the tenant's uid).
        #[arg(long, default_value = "")]
        owner: String,
        /// Close, in children, descriptors that cannot be recreated (an
        /// inotify instance, a pipe shared with another process...) instead
        /// of failing the capture; each spawn's notes name them.
        #[arg(long)]
        drop_fds: bool,
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
        /// Print the page-server reference instead (`ADDR/ID#KEY` with the
        /// node's page server), for `remotefork::Seed::open_remote` and
        /// `rf_seed_open_remote` in programs that link the library.
        #[arg(long, conflicts_with = "origin")]
        pages: bool,
    },
}

/// A seed in the shared vocabulary: durations in ms.
fn seed_json(s: &pb::Seed) -> Value {
    json!({
        "id": s.id, "key": s.key, "name": s.name, "created_unix_ms": s.created_unix_ms,
        "source_pid": s.source_pid, "image_bytes": s.image_bytes, "vmas": s.vmas,
        "pause_ms": s.pause_us as f64 / 1e3, "capture_ms": s.capture_us as f64 / 1e3,
        "node": s.node, "children_spawned": s.children_spawned,
        "damaged": Some(&s.damaged).filter(|d| !d.is_empty()),
        "owner": Some(&s.owner).filter(|o| !o.is_empty()),
    })
}

/// `KEY=VALUE` pairs of `--label` or `--env`.
fn pairs(
    what: &str,
    items: &[String],
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(anyhow::anyhow!("{what} {l:?} is not KEY=VALUE")),
        })
        .collect()
}

/// `key: value` lines, keys aligned.
fn key_values(out: &mut impl Write, kv: &[(&str, String)]) -> std::io::Result<()> {
    let w = kv.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in kv {
        writeln!(out, "{:<w$}  {v}", format!("{k}:"), w = w + 1)?;
    }
    Ok(())
}

/// A Unix time in ms as UTC `YYYY-MM-DD HH:MM:SS`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        Err(e) => forkd::cli::report_error("forkctl", &e),
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
    if let Some(p) = &cli.tls_ca {
        forkd::client::set_tls_ca(
            std::fs::read(p).with_context(|| format!("reading --tls-ca {p}"))?,
        );
    }
    let mut c = forkd::client::connect(&addr, token.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Seed { cmd } => match cmd {
            SeedCmd::Create {
                pid,
                oci_bundle,
                container,
                runtime,
                ready_line,
                timeout_ms,
                name,
                env,
                cwd,
                owner,
                drop_fds,
                command,
            } => {
                let env = pairs("--env", &env)?;
                let source = match (pid, ready_line) {
                    _ if container.is_some() => {
                        anyhow::ensure!(
                            env.is_empty() && cwd.is_none() && command.is_empty(),
                            "--env, --cwd and a command go with --ready-line, not --container"
                        );
                        pb::create_seed_request::Source::Container(pb::RuntimeContainer {
                            id: container.unwrap_or_default(),
                            runtime,
                        })
                    }
                    (None, ready) if oci_bundle.is_some() => {
                        anyhow::ensure!(
                            env.is_empty() && cwd.is_none(),
                            "--env and --cwd are the bundle's (its config.json)"
                        );
                        let bundle = std::path::absolute(oci_bundle.unwrap_or_default())
                            .context("--oci-bundle")?;
                        pb::create_seed_request::Source::OciBundle(pb::OciBundle {
                            bundle: bundle.to_string_lossy().into_owned(),
                            argv: command,
                            ready_line: ready.context("--oci-bundle needs --ready-line TEXT")?,
                            ready_timeout_ms: timeout_ms,
                            runtime,
                        })
                    }
                    (Some(pid), _) => {
                        anyhow::ensure!(
                            env.is_empty() && cwd.is_none() && command.is_empty(),
                            "--env, --cwd and a command go with --ready-line, not --pid"
                        );
                        pb::create_seed_request::Source::Pid(pid)
                    }
                    (None, Some(line)) => {
                        anyhow::ensure!(!command.is_empty(), "give the command after --");
                        pb::create_seed_request::Source::Command(pb::StartCommand {
                            argv: command,
                            ready_line: line,
                            ready_timeout_ms: timeout_ms,
                            cwd: cwd.unwrap_or_default(),
                            env,
                        })
                    }
                    (None, None) => {
                        anyhow::bail!("give --pid PID, --container ID, --oci-bundle DIR --ready-line TEXT, or --ready-line TEXT -- CMD ARGS...")
                    }
                };
                let create = c.create_seed(pb::CreateSeedRequest {
                    source: Some(source),
                    name,
                    owner,
                    drop_unsupported_fds: drop_fds,
                });
                let s = with_progress(!cli.json, "capturing", create)
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if cli.json {
                    writeln!(out, "{}", seed_json(&s))?;
                } else {
                    writeln!(out, "{}", s.id)?;
                    eprintln!(
                        "seed {} from pid {}: {} mappings, {} MiB, parent paused {:.1} ms, capture {:.1} ms",
                        s.id,
                        s.source_pid,
                        s.vmas,
                        forkd::cli::mib(s.image_bytes),
                        s.pause_us as f64 / 1e3,
                        s.capture_us as f64 / 1e3,
                    );
                }
            }
            SeedCmd::Ls => {
                let mut seeds = c
                    .list_seeds(pb::ListSeedsRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .seeds;
                seeds.sort_by(|a, b| {
                    natural_cmp(&a.name, &b.name)
                        .then(a.created_unix_ms.cmp(&b.created_unix_ms))
                        .then_with(|| a.id.cmp(&b.id))
                });
                if cli.json {
                    let v: Vec<Value> = seeds.iter().map(seed_json).collect();
                    writeln!(out, "{}", Value::Array(v))?;
                } else {
                    let mut t = Table::new(&[
                        "ID",
                        "NAME",
                        ">MiB",
                        ">VMAS",
                        ">CHILDREN",
                        "CREATED (UTC)",
                        "STATE",
                    ]);
                    for s in &seeds {
                        t.row(vec![
                            s.id.clone(),
                            s.name.clone(),
                            forkd::cli::mib(s.image_bytes),
                            s.vmas.to_string(),
                            s.children_spawned.to_string(),
                            utc(s.created_unix_ms),
                            if s.damaged.is_empty() {
                                "ok".into()
                            } else {
                                format!("damaged: {}", s.damaged)
                            },
                        ]);
                    }
                    t.write(&mut out)?;
                }
            }
            SeedCmd::Get { id } => {
                let (_, r) = parse_ref(&id);
                let s = c.get_seed(r).await.map_err(status_err)?.into_inner();
                if cli.json {
                    writeln!(out, "{}", seed_json(&s))?;
                } else {
                    key_values(
                        &mut out,
                        &[
                            ("id", s.id.clone()),
                            ("name", s.name.clone()),
                            (
                                "key",
                                if s.key.is_empty() {
                                    "(not given over TCP)".into()
                                } else {
                                    s.key.clone()
                                },
                            ),
                            ("node", s.node.clone()),
                            ("created", format!("{} UTC", utc(s.created_unix_ms))),
                            ("source pid", s.source_pid.to_string()),
                            (
                                "image",
                                format!(
                                    "{} MiB, {} mappings",
                                    forkd::cli::mib(s.image_bytes),
                                    s.vmas
                                ),
                            ),
                            (
                                "parent paused",
                                format!("{:.1} ms", s.pause_us as f64 / 1e3),
                            ),
                            ("capture", format!("{:.1} ms", s.capture_us as f64 / 1e3)),
                            ("children", s.children_spawned.to_string()),
                            (
                                "state",
                                if s.damaged.is_empty() {
                                    "ok".into()
                                } else {
                                    format!("damaged: {}", s.damaged)
                                },
                            ),
                        ],
                    )?;
                }
            }
            SeedCmd::Drop { id } => {
                let (_, r) = parse_ref(&id);
                c.drop_seed(r).await.map_err(status_err)?;
                if cli.json {
                    writeln!(out, "{}", json!({ "dropped": id }))?;
                }
            }
            SeedCmd::Ref { id, origin, pages } => {
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
                let at = if pages {
                    let b = c
                        .fetch_descriptor(pb::SeedRef {
                            id: s.id.clone(),
                            key: s.key.clone(),
                        })
                        .await
                        .map_err(status_err)?
                        .into_inner();
                    anyhow::ensure!(
                        !b.page_server.is_empty(),
                        "forkd runs no page server (start it with --page-listen)"
                    );
                    b.page_server
                } else {
                    origin.unwrap_or(addr.clone())
                };
                let r = format!("{at}/{}#{}", s.id, s.key);
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
            output_dir,
            stdin,
            mode,
            labels,
            args,
            memory_limit,
            pids_limit,
            cpu_limit,
        } => {
            let t0 = std::time::Instant::now();
            let input = match stdin {
                Some(p) => std::fs::read(&p).with_context(|| format!("reading {p}"))?,
                None => Vec::new(),
            };
            // An input larger than a message is staged first, in chunks.
            let (input, stdin_ref) = if input.len() > INLINE_INPUT {
                let chunks: Vec<pb::InputChunk> = input
                    .chunks(1 << 20)
                    .map(|c| pb::InputChunk { data: c.to_vec() })
                    .collect();
                let r = c
                    .put_input(tokio_stream::iter(chunks))
                    .await
                    .map_err(status_err)?
                    .into_inner();
                (Vec::new(), r.id)
            } else {
                (input, String::new())
            };
            let mut req = mode.request(&seed);
            req.count = count;
            req.stdin = input;
            req.stdin_ref = stdin_ref;
            req.stdout = pb::StdoutMode::Capture as i32;
            req.labels = pairs("label", &labels)?;
            req.args = args;
            if let Some(l) = req.container.as_mut() {
                l.memory_bytes = memory_limit.unwrap_or(0);
                l.pids = pids_limit.unwrap_or(0);
                l.cpus = cpu_limit.map_or(0.0, |c| c as f64 / 1e6);
            }
            let mut stream = c.spawn(req).await.map_err(status_err)?.into_inner();
            let mut children: Vec<ChildReport> = (0..count)
                .map(|index| ChildReport {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut outputs: Vec<Option<Vec<u8>>> = vec![None; count as usize];
            let mut streamed: Vec<Vec<u8>> = vec![Vec::new(); count as usize];
            let (mut started, mut failed, mut ended) = (0u32, 0u32, 0u32);
            // Outputs are printed in index order, each as soon as it and
            // all before it have ended.
            let mut printed = 0usize;
            let progress = !cli.json && count > 1 && forkd::cli::colour(&std::io::stderr());
            let mut noted: std::collections::HashSet<String> = Default::default();
            while let Some(ev) = stream.message().await.map_err(status_err)? {
                let Some(k) = children.get_mut(ev.index as usize) else {
                    continue;
                };
                k.instance = Some(ev.instance_id.clone());
                if ev.pid != 0 {
                    k.pid = Some(ev.pid);
                }
                match ev.kind {
                    Some(pb::instance_event::Kind::Started(_)) => started += 1,
                    Some(pb::instance_event::Kind::Running(r)) => {
                        k.time_to_running_ms = Some(r.time_to_running_ms);
                        if !cli.json {
                            for n in r.notes.iter().filter(|n| noted.insert((*n).clone())) {
                                eprintln!("forkctl: note: {n}");
                            }
                        }
                        k.notes = r.notes;
                    }
                    Some(pb::instance_event::Kind::Exited(x)) => {
                        ended += 1;
                        if x.signal != 0 {
                            k.signal = Some(x.signal);
                        } else {
                            k.exit_code = Some(x.exit_code);
                        }
                        k.reason = Some(x.reason).filter(|r| !r.is_empty());
                        k.faults = x.faults;
                        k.pages_installed = x.pages_installed;
                        if !k.ok() {
                            failed += 1;
                        }
                        let b = std::mem::take(&mut streamed[ev.index as usize]);
                        outputs[ev.index as usize] =
                            Some(if b.len() as u64 >= x.stdout.len() as u64 {
                                b
                            } else {
                                x.stdout
                            });
                    }
                    Some(pb::instance_event::Kind::Output(o)) => {
                        if k.first_output_ms.is_none() {
                            k.first_output_ms = Some(o.since_spawn_ms);
                        }
                        // Every chunk, in order (a repeat is skipped).
                        let b = &mut streamed[ev.index as usize];
                        if o.offset == b.len() as u64 {
                            b.extend_from_slice(&o.data);
                        }
                    }
                    Some(pb::instance_event::Kind::Failed(f)) => {
                        failed += 1;
                        ended += 1;
                        k.reason = Some(f.reason);
                        outputs[ev.index as usize] = Some(Vec::new());
                    }
                    None => {}
                }
                if progress {
                    eprint!("\r{started}/{count} started, {ended} done, {failed} failed");
                }
                if !cli.json && output_dir.is_none() {
                    while let Some(Some(o)) = outputs.get(printed) {
                        if progress {
                            eprint!("\r\x1b[K");
                        }
                        out.write_all(o)?;
                        out.flush()?;
                        printed += 1;
                    }
                }
                if ended == count {
                    break;
                }
            }
            if progress {
                eprint!("\r\x1b[K");
            }
            if let Some(dir) = &output_dir {
                let outs: Vec<(u32, &[u8])> = (0u32..)
                    .zip(&outputs)
                    .map(|(i, o)| (i, o.as_deref().unwrap_or_default()))
                    .collect();
                forkd::cli::write_outputs(dir, &outs)
                    .with_context(|| format!("writing outputs to {}", dir.display()))?;
            } else {
                for (k, o) in children.iter_mut().zip(&outputs) {
                    k.stdout = Some(
                        String::from_utf8_lossy(o.as_deref().unwrap_or_default()).into_owned(),
                    );
                }
            }
            for k in &children {
                if let (false, Some(why)) = (k.ok(), &k.reason) {
                    eprintln!("forkctl: child {}: {why}", k.index);
                }
            }
            let report = SpawnReport::new(count, children, t0.elapsed().as_secs_f64() * 1e3);
            if cli.json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                eprintln!("{}", report.summary());
            }
            if report.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Prepare { seed, mode } => {
            let p = c
                .prepare_seed(mode.request(&seed))
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.json {
                writeln!(
                    out,
                    "{}",
                    json!({ "seed": p.seed_id, "template_built": p.template_built, "ms": p.ms })
                )?;
            } else {
                writeln!(
                    out,
                    "seed {} ready here in {:.1} ms{}",
                    p.seed_id,
                    p.ms,
                    if p.template_built {
                        " (template built)"
                    } else {
                        ""
                    }
                )?;
            }
        }
        Cmd::Ps { seed } => {
            let mut l = c
                .list_instances(pb::ListInstancesRequest {
                    seed_id: seed.unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .instances;
            l.sort_by(|a, b| natural_cmp(&a.id, &b.id));
            if cli.json {
                let v: Vec<Value> = l
                    .iter()
                    .map(|i| {
                        let mut v = json!({ "id": i.id, "seed_id": i.seed_id, "pid": i.pid, "state": i.state,
                                "labels": i.labels, "started_unix_ms": i.started_unix_ms,
                                "notes": i.notes, "owner": Some(&i.owner).filter(|o| !o.is_empty()),
                                "uid": i.uid });
                        if let Some(c) = &i.container {
                            v["container"] = container_json(c);
                        }
                        v
                    })
                    .collect();
                writeln!(out, "{}", Value::Array(v))?;
            } else {
                let containers = l.iter().any(|i| i.container.is_some());
                let mut header = vec![
                    "INSTANCE",
                    "SEED",
                    ">PID",
                    "STATE",
                    "STARTED (UTC)",
                    "LABELS",
                ];
                if containers {
                    header.push("CONTAINER (MEMORY, PIDS, CPU)");
                }
                header.push("NOTES");
                let mut t = Table::new(&header);
                for i in l {
                    let mut labels: Vec<String> =
                        i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort_by(|a, b| natural_cmp(a, b));
                    let mut row = vec![
                        i.id,
                        i.seed_id,
                        i.pid.to_string(),
                        i.state,
                        utc(i.started_unix_ms),
                        labels.join(","),
                    ];
                    if containers {
                        row.push(i.container.as_ref().map(container_cell).unwrap_or_default());
                    }
                    row.push(i.notes.join("; "));
                    t.row(row);
                }
                t.write(&mut out)?;
            }
        }
        Cmd::Instance { id } => {
            let i = c
                .get_instance(pb::GetInstanceRequest {
                    instance_id: id.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.json {
                let v = json!({
                    "id": i.id, "seed": i.seed_id, "pid": i.pid, "state": i.state,
                    "ended": i.ended,
                    "exit_code": (i.ended && i.signal == 0).then_some(i.exit_code),
                    "signal": (i.signal != 0).then_some(i.signal),
                    "reason": Some(i.reason.clone()).filter(|r| !r.is_empty()),
                    "adopted": i.adopted, "notes": i.notes, "labels": i.labels,
                    "owner": Some(&i.owner).filter(|o| !o.is_empty()), "uid": i.uid,
                    "started_unix_ms": i.started_unix_ms,
                    "stdout": String::from_utf8_lossy(&i.stdout),
                    "stdout_bytes": i.stdout_bytes,
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{} {} pid {} ({})", i.id, i.state, i.pid, i.seed_id)?;
                if !i.reason.is_empty() {
                    writeln!(out, "reason: {}", i.reason)?;
                }
                out.write_all(&i.stdout)?;
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
                .node_info(pb::NodeInfoRequest::default())
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.json {
                let t: Vec<Value> = n
                    .transports
                    .iter()
                    .map(
                        |t| json!({ "name": t.name, "available": t.available, "reason": t.reason }),
                    )
                    .collect();
                let v = json!({
                    "version": n.version, "hostname": n.hostname, "kernel": n.kernel, "vdso_hash": n.vdso_hash,
                    "transports": t, "cpus": n.cpus, "memory_bytes": n.memory_bytes, "seeds": n.seeds,
                    "instances_running": n.instances_running, "pss_bytes": n.pss_bytes,
                    "transport": {"configured": n.transport, "selected": n.transport_selected,
                                  "reason": n.transport_reason},
                });
                writeln!(out, "{v}")?;
            } else {
                let mut kv = vec![
                    ("node", n.hostname.clone()),
                    ("forkd", n.version.clone()),
                    ("kernel", n.kernel.clone()),
                    ("vdso", n.vdso_hash.chars().take(16).collect()),
                    ("cpus", n.cpus.to_string()),
                    ("memory", format!("{} MiB", forkd::cli::mib(n.memory_bytes))),
                    ("seeds", n.seeds.to_string()),
                    ("running", n.instances_running.to_string()),
                    (
                        "forkd memory (PSS)",
                        format!("{} MiB", forkd::cli::mib(n.pss_bytes)),
                    ),
                    (
                        "pages from other nodes",
                        format!(
                            "{} (--transport {}): {}",
                            n.transport_selected, n.transport, n.transport_reason
                        ),
                    ),
                ];
                for t in &n.transports {
                    kv.push((
                        "transport",
                        format!(
                            "{} {}{}",
                            t.name,
                            if t.available {
                                "available"
                            } else {
                                "unavailable"
                            },
                            if t.reason.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", t.reason)
                            }
                        ),
                    ));
                }
                key_values(&mut out, &kv)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Await `f`, showing `what... N s` on a terminal's stderr (when `show`)
/// once it takes longer than a second: a capture of a large process.
async fn with_progress<F: std::future::Future>(show: bool, what: &str, f: F) -> F::Output {
    if !show || !forkd::cli::colour(&std::io::stderr()) {
        return f.await;
    }
    let t0 = std::time::Instant::now();
    tokio::pin!(f);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut shown = false;
    loop {
        tokio::select! {
            r = &mut f => {
                if shown {
                    eprint!("\r\x1b[K");
                }
                return r;
            }
            _ = tick.tick() => {
                if t0.elapsed().as_secs_f64() >= 1.0 {
                    eprint!("\r\x1b[K{what}... {:.1} s", t0.elapsed().as_secs_f64());
                    shown = true;
                }
            }
        }
    }
}

/// A container child's container, for `ps --json` and `instance --json`.
fn container_json(c: &pb::ContainerStatus) -> Value {
    let opt = |v: u64| (v > 0).then_some(v);
    json!({
        "cgroups": c.cgroups,
        "namespaces": c.namespaces,
        "network": c.network,
        "rootfs_digest": c.rootfs_digest,
        "memory_limit_bytes": opt(c.memory_limit_bytes),
        "pids_limit": opt(c.pids_limit),
        "cpu_limit": (c.cpu_limit > 0.0).then_some(c.cpu_limit),
        "memory_bytes": c.memory_bytes,
        "pids": c.pids,
        "cpu_ms": c.cpu_us as f64 / 1e3,
    })
}

/// A container child's usage and limits, in a table cell.
fn container_cell(c: &pb::ContainerStatus) -> String {
    let lim = |v: u64, f: &dyn Fn(u64) -> String| {
        if v > 0 {
            format!("/{}", f(v))
        } else {
            String::new()
        }
    };
    let cpu = if c.cpu_limit > 0.0 {
        format!(" cpu {:.0} ms/{} CPU", c.cpu_us as f64 / 1e3, c.cpu_limit)
    } else {
        format!(" cpu {:.0} ms", c.cpu_us as f64 / 1e3)
    };
    format!(
        "{}{} MiB, pids {}{},{cpu}",
        forkd::cli::mib(c.memory_bytes),
        lim(c.memory_limit_bytes, &|v| forkd::cli::mib(v)),
        c.pids,
        lim(c.pids_limit, &|v| v.to_string()),
    )
}
