//! CPU affinity of threads (`sched_getaffinity`, `sched_setaffinity`) and
//! the CPU a thread last ran on.

use std::io;

use libc::pid_t;

use crate::last_os_error;

/// A set of CPUs (`cpu_set_t`: up to 1024).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// The set holding `cpu` alone (`None` past the set's size).
    pub fn single(cpu: usize) -> Option<CpuSet> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return None;
        }
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        Some(CpuSet(set))
    }

    /// Does the set hold `cpu`?
    pub fn has(&self, cpu: usize) -> bool {
        // SAFETY: `cpu` is below CPU_SETSIZE, checked first.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    /// The CPUs in the set, lowest first.
    pub fn cpus(&self) -> impl Iterator<Item = usize> + '_ {
        (0..libc::CPU_SETSIZE as usize).filter(|&c| self.has(c))
    }
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.cpus()).finish()
    }
}

impl PartialEq for CpuSet {
    fn eq(&self, other: &Self) -> bool {
        // SAFETY: both are whole cpu_set_t values.
        unsafe { libc::CPU_EQUAL(&self.0, &other.0) }
    }
}

/// The affinity of thread `tid` (0: the calling thread).
pub fn affinity(tid: pid_t) -> io::Result<CpuSet> {
    // SAFETY: as in `CpuSet::single`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size_of::<cpu_set_t>()` bytes to `set`.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(last_os_error());
    }
    Ok(CpuSet(set))
}

/// Set the affinity of thread `tid` (0: the calling thread).
pub fn set_affinity(tid: pid_t, set: &CpuSet) -> io::Result<()> {
    // SAFETY: the kernel reads `size_of::<cpu_set_t>()` bytes from `set`.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set.0) };
    if r != 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// The CPU thread `tid` last ran on (`/proc/TID/stat`, field 39).
pub fn last_cpu(tid: pid_t) -> io::Result<usize> {
    Ok(state_and_cpu(tid)?.1)
}

/// The state of thread `tid` (`R`, `S`, `D`...: `/proc/TID/stat`, field 3)
/// and the CPU it last ran on (field 39).
pub fn state_and_cpu(tid: pid_t) -> io::Result<(char, usize)> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/stat"))?;
    // Fields after the command (which may hold spaces and parentheses):
    // the state is field 3, so field 39 is the 37th after it.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    let bad = |what| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|f| f.chars().next())
        .ok_or_else(|| bad("no state field in stat"))?;
    let cpu = fields
        .nth(35)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad("no processor field in stat"))?;
    Ok((state, cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_to_one_cpu_runs_there_and_gets_its_set_back() {
        let before = affinity(0).unwrap();
        let cpu = before.cpus().last().unwrap();
        set_affinity(0, &CpuSet::single(cpu).unwrap()).unwrap();
        assert_eq!(affinity(0).unwrap().cpus().collect::<Vec<_>>(), vec![cpu]);
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        std::thread::yield_now();
        assert_eq!(last_cpu(me).unwrap(), cpu);
        assert_eq!(state_and_cpu(me).unwrap(), ('R', cpu));
        set_affinity(0, &before).unwrap();
        assert_eq!(affinity(0).unwrap(), before);
    }

    #[test]
    fn a_set_holds_only_what_was_put_in_it() {
        let s = CpuSet::single(3).unwrap();
        assert!(s.has(3) && !s.has(2) && !s.has(4));
        assert!(CpuSet::single(libc::CPU_SETSIZE as usize).is_none());
    }
}
