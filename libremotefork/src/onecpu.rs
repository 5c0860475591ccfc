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
//! runs again.

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
}

impl OneCpu {
    /// Pin the calling thread to a CPU that process `pid`'s main thread may
    /// run on, and pin beside it each of the process's threads that sleeps
    /// now (it wakes there when it is stopped); a running one is pinned
    /// only once stopped ([`OneCpu::pin`]), as one spinning in user mode
    /// beside this thread would take its CPU away. The CPU: the main
    /// thread's last one, unless a running thread of the process is there,
    /// then another both may run on. `None` (nothing changed) if they share
    /// no CPU, or it cannot be read or set.
    pub(crate) fn for_process(pid: pid_t) -> Option<OneCpu> {
        let own = sched::affinity(0).ok()?;
        let theirs = sched::affinity(pid).ok()?;
        let threads: Vec<(pid_t, char, usize)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter_map(|tid| {
                let (state, cpu) = sched::state_and_cpu(tid).ok()?;
                Some((tid, state, cpu))
            })
            .collect();
        let busy = |c: usize| threads.iter().any(|&(_, st, cpu)| st == 'R' && cpu == c);
        let allowed = |c: usize| own.has(c) && theirs.has(c);
        let last = threads.iter().find(|t| t.0 == pid).map(|t| t.2);
        let cpu = last
            .filter(|&c| allowed(c) && !busy(c))
            .or_else(|| own.cpus().find(|&c| allowed(c) && !busy(c)))
            .or(last.filter(|&c| allowed(c)))
            .or_else(|| own.cpus().find(|&c| allowed(c)))?;
        let one = CpuSet::single(cpu)?;
        if let Err(e) = sched::set_affinity(0, &one) {
            debug!(cpu, error = %e, "cannot pin the tracing thread; the freeze runs unpinned");
            return None;
        }
        let mut this = OneCpu {
            cpu,
            own,
            pinned: Vec::new(),
        };
        for &(tid, state, _) in &threads {
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

    /// Put back the affinity of every pinned thread (not the caller's).
    pub(crate) fn release_threads(&mut self) {
        for (tid, set) in self.pinned.drain(..) {
            if let Err(e) = sched::set_affinity(tid, &set) {
                // Gone since (an exited thread): nothing to put back.
                debug!(tid, error = %e, "affinity not put back");
            }
        }
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
}
