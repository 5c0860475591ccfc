//! Keeping a stopped process and its tracer on one CPU.
//!
//! A freeze is a ping-pong: each ptrace stop, injected syscall or event
//! wakes the tracee, which runs a few microseconds and wakes the tracer
//! again. With the two on different CPUs, each wake is a cross-CPU one:
//! on a 2-vCPU guest about 40 µs each, 80-90 µs per injected syscall,
//! against 6-10 µs with both on one CPU (docs/DECISIONS.md, "The freeze
//! runs on one CPU"). So while a process is stopped for a capture, the
//! tracing thread and every thread of the process are pinned to one CPU
//! both may run on (a sleeping thread just before it is stopped, a running
//! one just after), and each thread's own affinity is put back before it
//! runs again. The same goes for a multi-threaded child being built: a
//! template's spare (with the template) until its threads are made, and
//! a child restored from scratch until just before it runs.

use kernel_helpers::sched::{self, CpuSet};
use libc::pid_t;
use tracing::debug;

/// The calling thread pinned to one CPU, with the threads pinned beside it.
/// Dropped, it puts every affinity back.
pub(crate) struct OneCpu {
    cpu: usize,
    /// The calling thread's own affinity.
    own: CpuSet,
    /// Each pinned thread and its own affinity.
    pinned: Vec<(pid_t, CpuSet)>,
    /// Processes whose every thread gets this affinity back (threads made
    /// while the process was pinned inherit the pin).
    whole: Vec<(pid_t, CpuSet)>,
}

impl OneCpu {
    /// For a capture: pin the calling thread to a CPU that process `pid`'s
    /// main thread may run on, and pin beside it each of the process's
    /// threads that sleeps now (it wakes there when it is stopped); a
    /// running one is pinned only once stopped ([`OneCpu::pin`]), as one
    /// spinning in user mode beside this thread would take its CPU away.
    /// The CPU: the main thread's last one, unless a running thread of the
    /// process is there, then another both may run on. `None` (nothing
    /// changed) if they share no CPU, or it cannot be read or set.
    pub(crate) fn for_process(pid: pid_t) -> Option<OneCpu> {
        let own = sched::affinity(0).ok()?;
        let theirs = sched::affinity(pid).ok()?;
        let threads = threads_of(pid)?;
        let busy = |c: usize| threads.iter().any(|&(_, st, cpu)| st == 'R' && cpu == c);
        let allowed = |c: usize| own.has(c) && theirs.has(c);
        let last = threads.iter().find(|t| t.0 == pid).map(|t| t.2);
        let cpu = last
            .filter(|&c| allowed(c) && !busy(c))
            .or_else(|| own.cpus().find(|&c| allowed(c) && !busy(c)))
            .or(last.filter(|&c| allowed(c)))
            .or_else(|| own.cpus().find(|&c| allowed(c)))?;
        OneCpu::pinned_to(cpu, own, &threads)
    }

    /// For a child being built (all its threads stopped, as is the template
    /// it may be forked from): pin the calling thread to the CPU it runs on
    /// now, and process `pid`'s threads there. `None` if the process may
    /// not run there.
    pub(crate) fn here(pid: pid_t) -> Option<OneCpu> {
        let own = sched::affinity(0).ok()?;
        let theirs = sched::affinity(pid).ok()?;
        // SAFETY: sched_getcpu has no preconditions.
        let here = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
        if !theirs.has(here) {
            return None;
        }
        OneCpu::pinned_to(here, own, &threads_of(pid)?)
    }

    /// The calling thread (whose affinity is `own`) pinned to `cpu`, and
    /// those of `threads` that do not run now.
    fn pinned_to(cpu: usize, own: CpuSet, threads: &[(pid_t, char, usize)]) -> Option<OneCpu> {
        let one = CpuSet::single(cpu)?;
        if let Err(e) = sched::set_affinity(0, &one) {
            debug!(cpu, error = %e, "cannot pin the tracing thread; it runs unpinned");
            return None;
        }
        let mut this = OneCpu {
            cpu,
            own,
            pinned: Vec::new(),
            whole: Vec::new(),
        };
        for &(tid, state, _) in threads {
            if state != 'R' {
                this.pin(tid);
            }
        }
        Some(this)
    }

    /// Pin thread `tid` to this CPU, remembering its own affinity. A thread
    /// that cannot be pinned (gone, or its cpuset forbids) is left as it is:
    /// the freeze is only slower.
    pub(crate) fn pin(&mut self, tid: pid_t) {
        if self.pinned.iter().any(|(t, _)| *t == tid) {
            return;
        }
        let Ok(theirs) = sched::affinity(tid) else {
            return;
        };
        if !theirs.has(self.cpu) {
            return;
        }
        let Some(one) = CpuSet::single(self.cpu) else {
            return;
        };
        match sched::set_affinity(tid, &one) {
            Ok(()) => self.pinned.push((tid, theirs)),
            Err(e) => debug!(tid, cpu = self.cpu, error = %e, "thread not pinned"),
        }
    }

    /// At release, give every thread of process `pid` the affinity thread
    /// `like` had before it was pinned: for a process made or given
    /// threads while pinned (a child forked from a pinned template, a
    /// child whose threads are made from its pinned main thread), whose
    /// threads would otherwise keep the pin they inherited. Nothing if
    /// `like` is not pinned.
    pub(crate) fn whole_process(&mut self, pid: pid_t, like: pid_t) {
        if let Some(&(_, set)) = self.pinned.iter().find(|(t, _)| *t == like) {
            self.whole.push((pid, set));
        }
    }

    /// Put back the affinity of every pinned thread (not the caller's).
    pub(crate) fn release_threads(&mut self) {
        for (tid, set) in self.pinned.drain(..) {
            if let Err(e) = sched::set_affinity(tid, &set) {
                // Gone since (an exited thread): nothing to put back.
                debug!(tid, error = %e, "affinity not put back");
            }
        }
        for (pid, set) in self.whole.drain(..) {
            for tid in tids(pid).unwrap_or_default() {
                if let Err(e) = sched::set_affinity(tid, &set) {
                    debug!(pid, tid, error = %e, "affinity not put back");
                }
            }
        }
    }
}

/// The thread ids of process `pid` (`None` if it is gone).
fn tids(pid: pid_t) -> Option<Vec<pid_t>> {
    Some(
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

/// The threads of process `pid`: (tid, state, the CPU it last ran on).
fn threads_of(pid: pid_t) -> Option<Vec<(pid_t, char, usize)>> {
    Some(
        tids(pid)?
            .into_iter()
            .filter_map(|tid| {
                let (state, cpu) = sched::state_and_cpu(tid).ok()?;
                Some((tid, state, cpu))
            })
            .collect(),
    )
}

/// For a short-lived thread that may be spawned by a pinned one (which it
/// would otherwise stay pinned like): run where the process's main thread
/// may.
pub(crate) fn unpin_this_thread() {
    // SAFETY: getpid has no preconditions.
    let main = unsafe { libc::getpid() };
    if let Ok(set) = sched::affinity(main) {
        let _ = sched::set_affinity(0, &set);
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        self.release_threads();
        if let Err(e) = sched::set_affinity(0, &self.own) {
            debug!(error = %e, "the tracing thread's affinity not put back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_pinned_for_a_freeze_get_their_own_affinity_back() {
        let mine = sched::affinity(0).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as pid_t;
        let theirs = sched::affinity(pid).unwrap();
        {
            let Some(mut one) = OneCpu::for_process(pid) else {
                println!("SKIPPED: no CPU shared with a child (cpusets)");
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            };
            one.pin(pid);
            let cpu = one.cpu;
            assert_eq!(
                sched::affinity(0).unwrap().cpus().collect::<Vec<_>>(),
                vec![cpu]
            );
            assert_eq!(
                sched::affinity(pid).unwrap().cpus().collect::<Vec<_>>(),
                vec![cpu]
            );
        }
        assert_eq!(sched::affinity(0).unwrap(), mine);
        assert_eq!(sched::affinity(pid).unwrap(), theirs);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_process_made_while_pinned_gets_the_affinity_of_its_maker() {
        // A shell pinned now, which then starts a process: that one
        // inherits the pin, and gets the shell's own set at release.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "read x; sleep 30 & echo $!; wait"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = sh.id() as pid_t;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let theirs = sched::affinity(pid).unwrap();
        let Some(mut one) = OneCpu::for_process(pid) else {
            println!("SKIPPED: no CPU shared with a child (cpusets)");
            sh.kill().unwrap();
            sh.wait().unwrap();
            return;
        };
        use std::io::{BufRead, Write};
        writeln!(sh.stdin.as_mut().unwrap()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let made: pid_t = line.trim().parse().unwrap();
        assert_eq!(
            sched::affinity(made).unwrap().cpus().collect::<Vec<_>>(),
            vec![one.cpu],
            "made while pinned, it inherits the pin"
        );
        one.whole_process(made, pid);
        drop(one);
        assert_eq!(sched::affinity(made).unwrap(), theirs);
        assert_eq!(sched::affinity(pid).unwrap(), theirs);
        // SAFETY: plain kill(2) of a process of ours.
        unsafe { libc::kill(made, libc::SIGKILL) };
        sh.kill().unwrap();
        sh.wait().unwrap();
    }
}
