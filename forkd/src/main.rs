//! `forkd`: the remotefork node daemon and its command line.
//!
//! Today: `forkd snapshot` captures a running process into a seed image and
//! `forkd inspect` shows one. Restore and the daemon follow.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture a running single-threaded process into a seed image.
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
        /// Print a JSON summary instead of text.
        #[arg(long)]
        json: bool,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Snapshot {
            pid,
            out,
            fsync,
            json,
        } => {
            let opts = CaptureOptions {
                durable: fsync,
                hook: None,
            };
            let d = capture(pid, &out, &opts)
                .with_context(|| format!("snapshot of process {pid} failed"))?;
            if json {
                let v = json!({
                    "pid": pid,
                    "out": out,
                    "vmas": d.vmas.len(),
                    "pages_stored": d.pages_stored,
                    "image_bytes": d.image_bytes,
                    "pause_us": d.stats.pause_ns / 1000,
                    "reap_pause_us": d.stats.reap_pause_ns / 1000,
                    "capture_ms": d.stats.capture_ns as f64 / 1e6,
                    "pages_present": d.stats.pages_present,
                    "pages_zero": d.stats.pages_zero,
                    "pages_from_file": d.stats.pages_from_file,
                });
                println!("{v}");
            } else {
                println!(
                    "captured pid {pid} into {}: {} mappings, {} pages stored ({:.1} MiB), parent paused {} us (+{} us to reap the clone), capture {:.1} ms",
                    out.display(),
                    d.vmas.len(),
                    d.pages_stored,
                    d.image_bytes as f64 / (1 << 20) as f64,
                    d.stats.pause_ns / 1000,
                    d.stats.reap_pause_ns / 1000,
                    d.stats.capture_ns as f64 / 1e6
                );
            }
        }
        Command::Inspect { dir, json } => {
            let img = SeedImage::open(&dir)
                .with_context(|| format!("cannot read seed image {}", dir.display()))?;
            if json {
                println!(
                    "{}",
                    image::inspect::to_json(img.descriptor(), dir.to_str())
                );
            } else {
                print!("{}", image::inspect::to_text(img.descriptor()));
            }
        }
    }
    Ok(())
}
