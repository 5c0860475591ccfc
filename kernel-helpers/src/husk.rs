//! The husk: a static, libc-free binary linked at a fixed address, started
//! under `PTRACE_TRACEME` and stopped at its exec. Restore rebuilds a seed's
//! process inside it.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::ptrace::{self, Stop, Tracee};

/// The husk's bytes.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rf-husk"));

/// Address the husk's text is linked at.
pub const BASE: &str = env!("RF_HUSK_BASE");

/// Errors starting a husk.
#[derive(Debug, thiserror::Error)]
pub enum HuskError {
    /// Writing the husk binary out failed.
    #[error("cannot install the husk binary at {path}: {source}")]
    Install {
        /// Where.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Starting it failed.
    #[error("cannot start the husk: {0}")]
    Spawn(io::Error),
    /// It did not stop at its exec as expected.
    #[error("the husk (pid {pid}) did not stop at exec: {what}")]
    NoExecStop {
        /// Its pid.
        pid: i32,
        /// What happened instead.
        what: String,
    },
    /// A ptrace call failed.
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
}

/// Write the husk to a temporary directory once (named by a hash of its
/// bytes) and return its path.
pub fn install() -> Result<PathBuf, HuskError> {
    let h = BINARY.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    let dir = std::env::temp_dir().join(format!("remotefork-husk-{h:016x}"));
    let path = dir.join("rf-husk");
    if fs::read(&path).map(|b| b == BINARY).unwrap_or(false) {
        return Ok(path);
    }
    let err = |source| HuskError::Install {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(&dir).map_err(err)?;
    let tmp = dir.join(format!("rf-husk.{}", std::process::id()));
    fs::write(&tmp, BINARY).map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// Start a husk with the given stdio, traced by the calling thread and
/// stopped at its exec. It dies if the tracer does (`PTRACE_O_EXITKILL`).
pub fn spawn(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> Result<Tracee, HuskError> {
    let path = install()?;
    let mut cmd = Command::new(&path);
    cmd.stdin(stdin).stdout(stdout).stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe syscalls (personality, ptrace).
    unsafe {
        cmd.pre_exec(|| {
            // A fixed layout: every husk's stack and vDSO land in the same place.
            if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(HuskError::Spawn)?;
    let pid = child.id() as i32;
    // We reap it ourselves with waitpid; the Child handle is not needed.
    drop(child);
    let mut t = Tracee::adopt(pid);
    t.kill_on_drop();
    match ptrace::wait(pid).map_err(HuskError::Spawn)? {
        Stop::Signal(libc::SIGTRAP) => {}
        other => {
            return Err(HuskError::NoExecStop {
                pid,
                what: format!("{other:?}"),
            })
        }
    }
    t.set_exit_kill()?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn husk_is_a_small_static_elf() {
        assert_eq!(&BINARY[..4], b"\x7fELF");
        assert!(BINARY.len() < 16 * 1024);
        assert!(BASE.starts_with("0x"));
    }
}
