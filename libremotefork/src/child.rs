//! A started child: a handle on its process, its pipes and its events.
//!
//! A [`Child`] holds a pidfd, opened while the child was still unreaped, so
//! [`Child::kill`] and [`Child::wait`] can never reach another process
//! that reused its pid. The child is a child of the process that called
//! [`crate::Seed::spawn`] (templates fork with `CLONE_PARENT`), so that
//! process reaps it: through [`Child::wait`], [`Child::try_wait`] or the
//! end of [`Child::events`]. Dropping a `Child` that has not been reaped
//! leaves the process running; it is reaped by whoever waits for the
//! caller's children next (the same as dropping a `std::process::Child`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernel_helpers::proc::{self, Ended};

use crate::pager::ChildStats;
use crate::restore::Handover;

/// How often [`Events`] looks at a lazy child's fault count while nothing
/// else happens.
const FAULT_POLL: Duration = Duration::from_millis(100);

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// The library killed it: a page it needed could not be served (its
    /// seed's pages became unreachable or did not match their digests).
    /// The text names the page and the failure.
    KilledByPager(String),
    /// The kernel's OOM killer killed it: its container went past its
    /// memory limit (bytes).
    OutOfMemory {
        /// The limit.
        limit: u64,
    },
}

impl ExitReason {
    /// True for an exit with status 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitReason::Exited(0))
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Exited(c) => write!(f, "exited with status {c}"),
            ExitReason::Signaled(s) => write!(f, "killed by signal {s}"),
            ExitReason::KilledByPager(why) => write!(f, "killed by the pager: {why}"),
            ExitReason::OutOfMemory { limit } => write!(
                f,
                "killed by the OOM killer: its container went past its memory limit of {} MiB",
                limit >> 20
            ),
        }
    }
}

/// Something that happened to a child, in order (see [`Child::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChildEvent {
    /// It runs; restoring it took this long.
    Running {
        /// From starting its husk (or fork from a template) to running.
        restore: Duration,
    },
    /// Its piped stdout became readable for the first time.
    FirstOutput {
        /// Since it started running.
        after: Duration,
    },
    /// The pager has served page faults for it (lazy children; reported
    /// when the count changes, at most every 100 ms).
    Faults {
        /// Faults served so far.
        served: u64,
        /// Pages installed so far (faulted, prefetched, in windows).
        pages: u64,
    },
    /// It ended and was reaped. The last event.
    Exited(ExitReason),
}

/// Errors of a [`Child`]'s operations.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// A system call on the child's pidfd failed.
    #[error("child {pid}: {what}: {source}")]
    Io {
        /// The child.
        pid: i32,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// It was already reaped (its status went to an earlier wait).
    #[error("child {0} was already reaped")]
    Reaped(i32),
}

/// A child started from a seed.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    /// A container child's cgroup (removed when the child is dropped).
    cgroup: Option<crate::container::ChildCgroup>,
    pidfd: OwnedFd,
    notes: Vec<String>,
    restore_ns: u64,
    pages_written: u64,
    stats: Option<Arc<ChildStats>>,
    handover: Option<Handover>,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// Kept to notice the first output even once `stdout` is taken.
    stdout_watch: Option<OwnedFd>,
    running_at: Instant,
    ended: Option<ExitReason>,
}

/// What a restore leaves for the [`Child`] handle.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: i32,
    pub(crate) notes: Vec<String>,
    pub(crate) restore_ns: u64,
    pub(crate) pages_written: u64,
    pub(crate) stats: Option<Arc<ChildStats>>,
    pub(crate) handover: Option<Handover>,
    /// A container child's cgroup.
    pub(crate) cgroup: Option<crate::container::ChildCgroup>,
}

/// The caller's ends of a child's piped streams.
#[derive(Debug, Default)]
pub(crate) struct Pipes {
    pub(crate) stdin: Option<File>,
    pub(crate) stdout: Option<File>,
    pub(crate) stderr: Option<File>,
}

impl Child {
    /// Take the pidfd of a just-started child (still unreaped, so its pid
    /// is still its own).
    pub(crate) fn new(s: Started, pipes: Pipes) -> Result<Child, ChildError> {
        let pidfd = kernel_helpers::uffd::pidfd_open(s.pid).map_err(|source| ChildError::Io {
            pid: s.pid,
            what: "pidfd_open",
            source,
        })?;
        let stdout_watch = match &pipes.stdout {
            Some(f) => Some(
                f.as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| ChildError::Io {
                        pid: s.pid,
                        what: "duplicating its stdout",
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(Child {
            pid: s.pid,
            pidfd,
            notes: s.notes,
            restore_ns: s.restore_ns,
            pages_written: s.pages_written,
            stats: s.stats,
            handover: s.handover,
            cgroup: s.cgroup,
            stdin: pipes.stdin,
            stdout: pipes.stdout,
            stderr: pipes.stderr,
            stdout_watch,
            running_at: Instant::now(),
            ended: None,
        })
    }

    /// Its pid (in the caller's pid namespace).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A container child's cgroup: its limits and usage.
    pub fn cgroup(&self) -> Option<&crate::container::ChildCgroup> {
        self.cgroup.as_ref()
    }

    /// Take a container child's cgroup, to keep it for as long as the
    /// child runs while this handle goes (it is removed when dropped).
    /// [`Child::wait`] then no longer tells an OOM kill from a SIGKILL.
    pub fn take_cgroup(&mut self) -> Option<crate::container::ChildCgroup> {
        self.cgroup.take()
    }

    /// Its pidfd: poll it for readability to learn that it ended.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Give up the handle, keeping the pidfd (for a caller that waits on
    /// it in its own event loop).
    pub fn into_pidfd(self) -> OwnedFd {
        self.pidfd
    }

    /// What the restore could not keep exactly, and what it changed on
    /// purpose (for example `no_new_privs` added for another user). Empty
    /// when the child is exactly what a `fork()` of the parent would be.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// From starting the restore to the child running.
    pub fn restore_time(&self) -> Duration {
        Duration::from_nanos(self.restore_ns)
    }

    /// Pages written into it before it ran (all of them for an eager child).
    pub fn pages_written(&self) -> u64 {
        self.pages_written
    }

    /// The pager's figures for it (lazy children only).
    pub fn stats(&self) -> Option<&Arc<ChildStats>> {
        self.stats.as_ref()
    }

    /// What another process needs to go on serving it (lazy children,
    /// with journals kept; see [`crate::node`]).
    pub fn handover(&self) -> Option<&Handover> {
        self.handover.as_ref()
    }

    /// [`Child::handover`], taken out of the handle.
    pub fn take_handover(&mut self) -> Option<Handover> {
        self.handover.take()
    }

    /// The write end of its stdin, if it was [`crate::Stdio::Piped`].
    pub fn take_stdin(&mut self) -> Option<File> {
        self.stdin.take()
    }

    /// The read end of its stdout, if it was [`crate::Stdio::Piped`].
    pub fn take_stdout(&mut self) -> Option<File> {
        self.stdout.take()
    }

    /// The read end of its stderr, if it was [`crate::Stdio::Piped`].
    pub fn take_stderr(&mut self) -> Option<File> {
        self.stderr.take()
    }

    /// Send it signal `sig` (through its pidfd: never another process).
    pub fn signal(&self, sig: i32) -> Result<(), ChildError> {
        if self.ended.is_some() {
            return Err(ChildError::Reaped(self.pid));
        }
        proc::pidfd_signal(self.pidfd.as_raw_fd(), sig).map_err(|source| ChildError::Io {
            pid: self.pid,
            what: "pidfd_send_signal",
            source,
        })
    }

    /// `SIGKILL` it.
    pub fn kill(&self) -> Result<(), ChildError> {
        self.signal(libc::SIGKILL)
    }

    /// Reap it if it has ended; `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitReason>, ChildError> {
        if let Some(e) = &self.ended {
            return Ok(Some(e.clone()));
        }
        let ended = proc::try_reap(self.pidfd.as_raw_fd()).map_err(|source| ChildError::Io {
            pid: self.pid,
            what: "waitid",
            source,
        })?;
        Ok(ended.map(|e| {
            let r = self.reason(e);
            self.ended = Some(r.clone());
            r
        }))
    }

    /// Wait for it to end and reap it.
    pub fn wait(&mut self) -> Result<ExitReason, ChildError> {
        loop {
            if let Some(r) = self.try_wait()? {
                return Ok(r);
            }
            self.poll(&[], None)?;
        }
    }

    /// Its events, from [`ChildEvent::Running`] to [`ChildEvent::Exited`]
    /// (which reaps it). The iterator blocks in `poll(2)` on the pidfd and
    /// the stdout pipe; it starts no thread.
    pub fn events(&mut self) -> Events<'_> {
        Events {
            child: self,
            sent_running: false,
            sent_output: false,
            faults: 0,
            done: false,
        }
    }

    fn reason(&self, e: Ended) -> ExitReason {
        if let Some(why) = self.stats.as_ref().and_then(|s| s.killed_reason()) {
            return ExitReason::KilledByPager(why);
        }
        if let Some(cg) = &self.cgroup {
            cg.mark_reaped();
        }
        if let (Ended::Killed(libc::SIGKILL), Some(cg)) = (&e, &self.cgroup) {
            if cg.oom_killed() {
                return ExitReason::OutOfMemory {
                    limit: cg.limits.memory_bytes.unwrap_or(0),
                };
            }
        }
        match e {
            Ended::Exited(c) => ExitReason::Exited(c),
            Ended::Killed(s) => ExitReason::Signaled(s),
        }
    }

    /// Poll the pidfd and `extra` (for input) for up to `timeout`; the
    /// revents of `extra`.
    fn poll(
        &self,
        extra: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
    ) -> Result<Vec<i16>, ChildError> {
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.pidfd.as_fd())
            .chain(extra.iter().copied())
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `fds` is a valid array of pollfd of the given length for
        // the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(ChildError::Io {
                    pid: self.pid,
                    what: "poll",
                    source: e,
                });
            }
        }
        Ok(fds[1..].iter().map(|p| p.revents).collect())
    }
}

/// The events of a [`Child`]: see [`Child::events`].
#[derive(Debug)]
pub struct Events<'a> {
    child: &'a mut Child,
    sent_running: bool,
    sent_output: bool,
    faults: u64,
    done: bool,
}

impl Iterator for Events<'_> {
    type Item = Result<ChildEvent, ChildError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if !self.sent_running {
            self.sent_running = true;
            return Some(Ok(ChildEvent::Running {
                restore: self.child.restore_time(),
            }));
        }
        loop {
            if let Some(r) = &self.child.ended {
                self.done = true;
                return Some(Ok(ChildEvent::Exited(r.clone())));
            }
            if let Some(s) = &self.child.stats {
                let served = s.faults.load(std::sync::atomic::Ordering::Relaxed);
                if served != self.faults {
                    self.faults = served;
                    let pages = s.pages_installed.load(std::sync::atomic::Ordering::Relaxed);
                    return Some(Ok(ChildEvent::Faults { served, pages }));
                }
            }
            let watch = if self.sent_output {
                None
            } else {
                self.child.stdout_watch.as_ref().map(|f| f.as_fd())
            };
            let timeout = self.child.stats.as_ref().map(|_| FAULT_POLL);
            let revents = match self.child.poll(watch.as_slice(), timeout) {
                Ok(r) => r,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            if revents.first().is_some_and(|r| r & libc::POLLIN != 0) {
                self.sent_output = true;
                return Some(Ok(ChildEvent::FirstOutput {
                    after: self.child.running_at.elapsed(),
                }));
            }
            if revents
                .first()
                .is_some_and(|r| r & (libc::POLLHUP | libc::POLLERR) != 0)
            {
                // Closed with nothing written: no first output to report.
                self.sent_output = true;
            }
            match self.child.try_wait() {
                Ok(Some(_)) => {
                    if let Some(s) = &self.child.stats {
                        // The pager lets go after the exit: its figures
                        // are final then. The loop reports a last change,
                        // then the exit.
                        s.wait_finished(Duration::from_secs(1));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
