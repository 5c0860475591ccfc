//! Thin wrappers over the kernel interfaces remotefork uses.
//!
//! This crate is the only place in the project that issues raw syscalls.
//! Everything here is mechanism, not policy: callers in `remotefork` decide
//! what to capture and in which order; these functions only make the calls
//! and turn their results into typed values and errors.

pub mod executor;
pub mod husk;
pub mod mapping;
pub mod mem;
pub mod pagemap;
pub mod proc;
pub mod ptrace;
pub mod sched;
pub mod uffd;

/// The page size of x86_64 Linux, which is all this project targets.
pub const PAGE_SIZE: u64 = 4096;

/// `errno` of the last failed libc call, as an [`std::io::Error`].
pub(crate) fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}
