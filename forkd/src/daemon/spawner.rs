//! Spawner threads: long-lived threads that run restores.
//!
//! A restore is a run of ptrace calls that must all come from one thread,
//! and a lazily restored child is set to die with the thread that started
//! it (`PR_SET_PDEATHSIG` is tied to the parent *thread*). So children are
//! started by a few threads that live as long as forkd, never by tokio's
//! blocking pool, whose threads come and go.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use remotefork::{Child, RestoreError, SpawnOptions, Stdio};
use tokio::sync::oneshot;

/// One child to start.
pub struct Job {
    /// The seed's restorer.
    pub restorer: Arc<remotefork::Seed>,
    /// Given whole to the child as its stdin.
    pub stdin: Arc<Vec<u8>>,
    /// Capture its stdout (else /dev/null).
    pub capture_stdout: bool,
    /// How.
    pub opts: SpawnOptions,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<Started, SpawnError>>,
}

/// Why a child was not started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A pipe for its stdin or stdout could not be made.
    #[error("creating a pipe: {0}")]
    Pipe(#[source] std::io::Error),
    /// The restore failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The spawner threads are gone: the job was not queued.
    #[error("the spawner threads are gone")]
    ThreadsGone,
    /// The job was dropped without an answer.
    #[error("the spawner dropped the job")]
    JobDropped,
}

/// The spawner threads.
pub struct Spawner {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Spawner {
    /// Start `threads` spawner threads.
    pub fn new(threads: usize) -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("spawner-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let r = run(&job);
                    let _ = job.reply.send(r);
                })?;
        }
        Ok(Spawner { tx: Mutex::new(tx) })
    }

    /// Queue a job.
    pub fn submit(&self, job: Job) -> Result<(), SpawnError> {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| SpawnError::ThreadsGone)
    }
}

/// A child started: its stdout (when captured) and, when its input is
/// larger than a pipe takes at once, the write end of its stdin (the
/// daemon writes the rest as the child reads).
pub struct Started {
    /// The child.
    pub child: Child,
    /// Its stdout's read end.
    pub stdout: Option<OwnedFd>,
    /// Its stdin's write end, with the input still to write.
    pub stdin: Option<OwnedFd>,
}

fn run(job: &Job) -> Result<Started, SpawnError> {
    let stdout = if job.capture_stdout {
        Stdio::Piped
    } else {
        Stdio::Null
    };
    let mut child = job
        .restorer
        .spawn(Stdio::Piped, stdout, Stdio::Null, &job.opts)?;
    let out_r = child.take_stdout().map(OwnedFd::from);
    let mut in_w = child
        .take_stdin()
        .ok_or(SpawnError::Pipe(std::io::Error::other(
            "the child's stdin pipe is missing",
        )))?;
    // A fresh pipe holds a page without blocking: small inputs are written
    // here; larger ones by the daemon, as the child reads. A child that
    // exits without reading its input gets EPIPE, ignored.
    let stdin = if job.stdin.len() <= 4096 {
        let _ = in_w.write_all(&job.stdin);
        None
    } else {
        Some(OwnedFd::from(in_w))
    };
    Ok(Started {
        child,
        stdout: out_r,
        stdin,
    })
}
