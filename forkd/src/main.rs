//! `forkd`: the remotefork node daemon and its command line: `snapshot`
//! captures a running process into a seed image, `inspect` shows one,
//! `restore` starts children from one, `serve` runs the daemon.

mod progress;
mod restore_cmd;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use remotefork::capture::{capture, CaptureOptions};
use remotefork::image::{self, SeedImage};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "forkd",
    version,
    about = "remotefork node daemon: capture processes into seeds and start children from them"
)]
struct Cli {
    /// Log format on stderr: text (coloured on a terminal only) or json
    /// (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: forkd::cli::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Capture a running process, every thread, into a seed image.
    Snapshot {
        /// The process to capture.
        #[arg(long)]
        pid: i32,
        /// Directory to write the image to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// fsync the image before it becomes visible.
        #[arg(long)]
        fsync: bool,
        /// Close, in children, descriptors that cannot be recreated (an
        /// inotify instance, a pipe shared with another process...) instead
        /// of failing; each spawn's notes name them.
        #[arg(long)]
        drop_fds: bool,
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Start children from a seed image on this node.
    ///
    /// With one child, it gets this command's stdin/stdout/stderr and the
    /// command exits with the child's status. With --count N, stdin is read
    /// once and given to every child, and their outputs are printed child by
    /// child, in order.
    Restore {
        /// The image directory.
        dir: PathBuf,
        /// Write every stored page before the child runs.
        #[arg(long, conflicts_with = "lazy")]
        eager: bool,
        /// Serve anonymous memory on demand through userfaultfd (the default).
        #[arg(long)]
        lazy: bool,
        /// Lazy mode, children restored from scratch: give each child
        /// copies of its pages instead of mapping the node's seed cache
        /// shared (copy-on-write) between children. (Children forked from a
        /// template share the template's pages.)
        #[arg(long)]
        no_share: bool,
        /// With --count N > 1: restore every child from scratch instead of
        /// restoring the seed once into a template that each child is
        /// forked from.
        #[arg(long)]
        no_template: bool,
        /// Lazy mode: what a fault pulls in besides its page.
        #[arg(long, default_value = "window", value_parser = ["off", "window", "recorded"])]
        prefetch: String,
        /// How many children to start (at least 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Print the children's pids and return without waiting (implies
        /// --eager: nothing would be left to serve a lazy child's faults).
        #[arg(long)]
        detach: bool,
        /// With --count, write each child's stdout to DIR/child-I.out instead.
        #[arg(long)]
        output_dir: Option<PathBuf>,
        /// Print a JSON report (on stderr for a single child whose stdout is the terminal's).
        #[arg(long)]
        json: bool,
        /// A container seed's children: memory limit of each (bytes, or
        /// with K, M, G) [default: the parent container's].
        #[arg(long, value_parser = remotefork::container::parse_size)]
        memory_limit: Option<u64>,
        /// A container seed's children: most processes and threads each
        /// may have [default: the parent container's].
        #[arg(long)]
        pids_limit: Option<u64>,
        /// A container seed's children: CPUs each may use, e.g. 0.5
        /// [default: the parent container's].
        #[arg(long, value_parser = remotefork::container::parse_cpus)]
        cpu_limit: Option<u64>,
        /// A container seed's children: their network, "loopback" (a
        /// namespace of their own with lo up) or "none" (nothing up).
        #[arg(long, default_value = "loopback")]
        net: remotefork::container::Network,
    },
    /// Run the node daemon: gRPC on a Unix socket (and TCP with a token).
    Serve {
        /// TOML file with any of the options below (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Unix socket [default: /run/forkd/forkd.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also listen on TCP, HOST:PORT (needs --token-file).
        #[arg(long)]
        listen: Option<String>,
        /// State directory for seed images [default: /var/lib/forkd].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// File holding the bearer token TCP clients must send.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// How pages come from other nodes: auto (RDMA where both nodes
        /// have an active device, else TCP), rdma (required) or tcp [default: auto].
        #[arg(long)]
        transport: Option<String>,
        /// The RDMA device to use, e.g. rxe0 [default: the first with an active port].
        #[arg(long)]
        rdma_device: Option<String>,
        /// Threads that start children [default: 2].
        #[arg(long)]
        spawner_threads: Option<usize>,
        /// Serve Prometheus metrics on HOST:PORT (GET /metrics).
        #[arg(long)]
        metrics: Option<String>,
        /// The cooperative API's socket [default: the socket path + ".coop"].
        #[arg(long)]
        coop_socket: Option<PathBuf>,
        /// Serve seeds' pages to other nodes on HOST:PORT.
        #[arg(long)]
        page_listen: Option<String>,
        /// The page server's address as other nodes reach it (a proxy, a
        /// NAT, a Service) [default: --page-listen].
        #[arg(long)]
        page_advertise: Option<String>,
        /// Token for calling other nodes [default: --token-file's].
        #[arg(long)]
        peer_token_file: Option<PathBuf>,
        /// Longest a remote page fetch may take before its child is killed, ms [default: 5000].
        #[arg(long)]
        page_deadline_ms: Option<u64>,
        /// Drop a seed's node template after this many seconds without a
        /// spawn (it holds a copy of the seed's memory) [default: 600].
        #[arg(long)]
        template_idle_s: Option<u64>,
        /// On SIGTERM: stop taking spawns (UNAVAILABLE, health NOT_SERVING)
        /// and let those under way run on this many seconds before
        /// stopping [default: 20].
        #[arg(long)]
        drain_s: Option<u64>,
        /// How long forkd's keeper keeps running children alive after
        /// forkd is gone (killed, restarted, upgraded), for the next forkd
        /// to take them back; then it kills them and says why [default: 60].
        #[arg(long)]
        handover_grace_s: Option<u64>,
        /// Do not fetch other nodes' seeds whole into the node cache in the
        /// background (children then depend on the seed's node for every
        /// page they have not faulted in).
        #[arg(long)]
        no_drain: bool,
        /// Tenants (TOML: [[tenant]] name, token_sha256, uid, gid,
        /// create_from_command): each sees only its own seeds and
        /// instances, and its children run as its uid (docs/SECURITY.md).
        #[arg(long)]
        tenants_file: Option<PathBuf>,
        /// Let TCP callers with the node token create seeds from a command
        /// (the command runs as root).
        #[arg(long)]
        remote_commands: bool,
        /// A node (gRPC HOST:PORT) this forkd may call as a Spawn's origin
        /// with its peer token; repeat for each. None: any origin the
        /// operator names, none a tenant names.
        #[arg(long = "peer")]
        peers: Vec<String>,
        /// TLS on --listen: the certificate chain (PEM); with --tls-key.
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// The CA (PEM) other nodes' certificates are checked against, for
        /// https:// origins.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Children queued over every spawn, at most (then spawns get
        /// RESOURCE_EXHAUSTED) [default: 200000].
        #[arg(long)]
        max_queued: Option<u64>,
        /// For tests: wait this long between letting a child run and
        /// recording it (a forkd stopped in between must not lose it).
        #[arg(long, hide = true)]
        test_hold_before_record_ms: Option<u64>,
    },
    /// Print the SHA-256 of a token (read from stdin) as the tenants file
    /// wants it.
    HashToken,
    /// The keeper of a state directory's children (started by `forkd serve`).
    #[command(hide = true)]
    Keeper {
        /// Its run directory (`STATE/run`).
        #[arg(long)]
        dir: PathBuf,
        /// Seconds to wait for a forkd before killing what it holds.
        #[arg(long, default_value_t = 60)]
        grace_s: u64,
    },
    /// Show a seed image's descriptor.
    Inspect {
        /// The image directory.
        dir: PathBuf,
        /// Print the stable JSON form.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    forkd::cloexec_inherited_fds();
    // The daemon tells what it does; the one-shot commands only warn.
    let default = if matches!(cli.command, Command::Serve { .. } | Command::Keeper { .. }) {
        "info"
    } else {
        "warn"
    };
    forkd::cli::init_logging(default, cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => forkd::cli::report_error("forkd", &e),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            socket,
            listen,
            state_dir,
            token_file,
            transport,
            rdma_device,
            spawner_threads,
            metrics,
            coop_socket,
            page_listen,
            page_advertise,
            peer_token_file,
            page_deadline_ms,
            template_idle_s,
            drain_s,
            handover_grace_s,
            no_drain,
            tenants_file,
            remote_commands,
            peers,
            tls_cert,
            tls_key,
            tls_ca,
            max_queued,
            test_hold_before_record_ms,
        } => {
            if let Some(ms) = test_hold_before_record_ms {
                forkd::daemon::handover::hold_before_record(std::time::Duration::from_millis(ms));
            }
            let mut cfg: forkd::daemon::Config = match &config {
                Some(p) => toml::from_str(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("parsing {}", p.display()))?,
                None => Default::default(),
            };
            if let Some(v) = socket {
                cfg.socket = v;
            }
            if listen.is_some() {
                cfg.listen = listen;
            }
            if let Some(v) = state_dir {
                cfg.state_dir = v;
            }
            if token_file.is_some() {
                cfg.token_file = token_file;
            }
            if let Some(v) = transport {
                cfg.transport = v;
            }
            if rdma_device.is_some() {
                cfg.rdma_device = rdma_device;
            }
            if let Some(v) = spawner_threads {
                cfg.spawner_threads = v;
            }
            if metrics.is_some() {
                cfg.metrics = metrics;
            }
            if coop_socket.is_some() {
                cfg.coop_socket = coop_socket;
            }
            if page_listen.is_some() {
                cfg.page_listen = page_listen;
            }
            if page_advertise.is_some() {
                cfg.page_advertise = page_advertise;
            }
            if tenants_file.is_some() {
                cfg.tenants_file = tenants_file;
            }
            if remote_commands {
                cfg.remote_commands = true;
            }
            if !peers.is_empty() {
                cfg.peers = peers;
            }
            if tls_cert.is_some() {
                cfg.tls_cert = tls_cert;
            }
            if tls_key.is_some() {
                cfg.tls_key = tls_key;
            }
            if tls_ca.is_some() {
                cfg.tls_ca = tls_ca;
            }
            if let Some(v) = max_queued {
                cfg.max_queued = v;
            }
            if peer_token_file.is_some() {
                cfg.peer_token_file = peer_token_file;
            }
            if let Some(v) = page_deadline_ms {
                cfg.page_deadline_ms = v;
            }
            if let Some(v) = template_idle_s {
                cfg.template_idle_s = v;
            }
            if let Some(v) = drain_s {
                cfg.drain_s = v;
            }
            if let Some(v) = handover_grace_s {
                cfg.handover_grace_s = v;
            }
            if no_drain {
                cfg.drain = false;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(forkd::daemon::serve(cfg))?;
        }
        Command::Keeper { dir, grace_s } => {
            forkd::keeper::run(&dir, std::time::Duration::from_secs(grace_s.max(1)))?;
        }
        Command::Restore {
            dir,
            eager,
            lazy: _,
            no_share,
            no_template,
            prefetch,
            count,
            detach,
            output_dir,
            json,
            memory_limit,
            pids_limit,
            cpu_limit,
            net,
        } => {
            let opts = remotefork::SpawnOptions::default()
                .lazy(!eager)
                .prefetch(prefetch.parse().map_err(anyhow::Error::msg)?)
                .share(!no_share)
                // One child: restoring it directly is cheaper than a template.
                .template(count > 1 && !no_template)
                .container(remotefork::container::ChildSpec {
                    limits: remotefork::container::Limits {
                        memory_bytes: memory_limit,
                        pids: pids_limit,
                        cpu_micros: cpu_limit,
                    },
                    network: net,
                    upper_bytes: 0,
                    host: false,
                });
            return restore_cmd::run(&dir, opts, count, detach, output_dir.as_deref(), json);
        }
        Command::Snapshot {
            pid,
            out,
            fsync,
            drop_fds,
            json,
        } => {
            let opts = CaptureOptions {
                durable: fsync,
                drop_unsupported_fds: drop_fds,
                ..Default::default()
            };
            let progress = progress::Capture::start(pid, &out);
            let d = capture(pid, &out, &opts);
            progress.finish();
            let d = d.with_context(|| format!("snapshot of process {pid} failed"))?;
            let mut stdout = std::io::stdout().lock();
            if json {
                // Durations in ms, as in every --json of forkd and forkctl
                // (docs/cli-schema.json).
                let v = json!({
                    "pid": pid,
                    "out": out,
                    "vmas": d.vmas.len(),
                    "pages_stored": d.pages_stored,
                    "image_bytes": d.image_bytes,
                    "pause_ms": d.stats.pause_ns as f64 / 1e6,
                    "reap_pause_ms": d.stats.reap_pause_ns as f64 / 1e6,
                    "capture_ms": d.stats.capture_ns as f64 / 1e6,
                    "pages_present": d.stats.pages_present,
                    "pages_zero": d.stats.pages_zero,
                    "pages_from_file": d.stats.pages_from_file,
                });
                writeln!(stdout, "{v}")?;
            } else {
                writeln!(
                    stdout,
                    "captured pid {pid} into {}: {} mappings, {} pages stored ({:.1} MiB), parent paused {} us (+{} us to reap the clone), capture {:.1} ms",
                    out.display(),
                    d.vmas.len(),
                    d.pages_stored,
                    d.image_bytes as f64 / (1 << 20) as f64,
                    d.stats.pause_ns / 1000,
                    d.stats.reap_pause_ns / 1000,
                    d.stats.capture_ns as f64 / 1e6
                )?;
            }
        }
        Command::HashToken => {
            let mut t = String::new();
            std::io::stdin()
                .read_line(&mut t)
                .context("reading the token from stdin")?;
            if t.trim().is_empty() {
                anyhow::bail!("no token on stdin");
            }
            println!("{}", forkd::daemon::auth::hash_token(&t));
        }
        Command::Inspect { dir, json } => {
            let img = SeedImage::open(&dir)
                .with_context(|| format!("cannot read seed image {}", dir.display()))?;
            let mut stdout = std::io::stdout().lock();
            if json {
                writeln!(
                    stdout,
                    "{}",
                    image::inspect::to_json(img.descriptor(), dir.to_str())
                )?;
            } else {
                write!(stdout, "{}", image::inspect::to_text(img.descriptor()))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
