//! remotefork: capture a warm process into a *seed* and start children from it.
//!
//! The modules follow the data flow of the design:
//! [`procfs`] reads what the kernel shows of a process, [`capture`] freezes a
//! copy-on-write clone of it and writes a [`image`] (descriptor + page store).

pub mod capture;
pub mod classify;
pub mod coop;
pub mod fileid;
pub mod image;
pub mod pager;
pub mod private_fs;
pub mod procfs;
pub mod restore;
pub mod vdso;

pub use coop::{checkpoint, on_restore, Checkpoint};
pub use kernel_helpers::PAGE_SIZE;
