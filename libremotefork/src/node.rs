//! Node-wide settings and hand-over, for a daemon that keeps children
//! across its own restarts (forkd does).
//!
//! A scheduler that links the library and starts its children itself
//! needs none of this.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::pager::cache::CacheFds;
pub use crate::restore::{rootfs_stores, Adopted, Handover, WORKING_SET_FILE};

/// Let lazy children outlive the thread that spawned them (`true`): they
/// keep running when it exits, waiting for a successor to take over their
/// userfaultfds (see [`Adopted`]). Off (the default): a lazy child dies
/// with its spawning thread (`PR_SET_PDEATHSIG`). Applies to children
/// spawned after the call.
pub fn set_children_outlive_spawner(on: bool) {
    crate::restore::set_children_outlive_spawner(on);
}

/// Write lazily served children's address-space events to journals in
/// `dir` (None: no journals, the default), so that a successor can take
/// them over ([`crate::Seed::adopt`]).
pub fn set_journal_dir(dir: Option<PathBuf>) {
    crate::restore::set_journal_dir(dir);
}

/// Drop a seed's templates unused for `idle` (default 10 minutes): each
/// holds a copy of its seed's memory. The next spawn builds it again.
pub fn set_template_idle_timeout(idle: Duration) {
    crate::restore::set_template_idle_timeout(idle);
}

/// This node's vDSO hash: a seed's children start only on nodes whose
/// hash equals the seed's.
pub fn vdso_hash() -> Result<String, crate::RestoreError> {
    crate::restore::node_vdso_hash()
}
