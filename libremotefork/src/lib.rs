//! remotefork: capture a warm process into a *seed* and start children
//! from it, here or on other nodes, each a `fork()` child of the parent in
//! all it can observe.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::io::{Read, Write};
//! use remotefork::{capture, CaptureOptions, Seed, SpawnOptions, Stdio};
//!
//! // A warm parent: here a shell waiting for a line on its stdin.
//! let mut parent = std::process::Command::new("/bin/sh")
//!     .args(["-c", "read x; echo hello $x"])
//!     .stdin(std::process::Stdio::piped())
//!     .spawn()?;
//! # std::thread::sleep(std::time::Duration::from_millis(300));
//! let dir = std::env::temp_dir().join(format!("seed-{}", parent.id()));
//! capture(parent.id() as i32, &dir, &CaptureOptions::default())?;
//!
//! // Children resume where the parent was: in `read`, on their own stdin.
//! let seed = Seed::open(&dir)?;
//! let mut child = seed.spawn(Stdio::Piped, Stdio::Piped, Stdio::Null, &SpawnOptions::default())?;
//! child.take_stdin().unwrap().write_all(b"world\n")?;
//! let mut out = String::new();
//! child.take_stdout().unwrap().read_to_string(&mut out)?;
//! assert_eq!(out, "hello world\n");
//! assert!(child.wait()?.success());
//! # parent.kill()?; parent.wait()?;
//! # Ok(()) }
//! ```
//!
//! (The example needs the privileges of restore: root, or
//! `CAP_CHECKPOINT_RESTORE` and `CAP_SYS_PTRACE`; it runs in the crate's
//! tests as `crate_example_works`.)
//!
//! # The API
//!
//! - [`capture()`] freezes a process, every thread of it, for as long as a
//!   `fork()` takes and writes a seed directory (a descriptor and a page
//!   store) from a copy-on-write clone of it. A process can also capture
//!   itself through a running `forkd`: [`checkpoint`] keeps the calling
//!   thread only, as `fork()` does; [`checkpoint_all_threads`] keeps them
//!   all.
//! - [`Seed::open`] opens a seed on this node; [`Seed::open_remote`]
//!   opens one held by another node's page server by its reference
//!   `ADDR/ID#KEY` ([`SeedRef`]), checking the key and the size.
//! - [`Seed::spawn`] starts a child with [`SpawnOptions`] (eager or lazy,
//!   the prefetch, from a template) and returns a [`Child`]: a pidfd,
//!   [`Child::wait`], [`Child::kill`], its pipes and [`Child::events`].
//!
//! # Threads, signals and reaping
//!
//! - The thread that calls [`Seed::spawn`] is the child's ptrace parent
//!   while it is restored, and its parent *thread* after: a lazy child
//!   dies with it (`PR_SET_PDEATHSIG`). Spawn from threads that live as
//!   long as the children should.
//! - Children are children of the calling process (also those forked from
//!   a template, which forks with `CLONE_PARENT`). The caller reaps them:
//!   [`Child::wait`], or its own `waitpid`. Nothing in the library installs
//!   a `SIGCHLD` handler or reaps for the caller.
//! - A [`Seed`] runs, while it exists, two pager threads (serving lazy
//!   children's faults) and, once a child is spawned from a template, one
//!   template service thread. Dropping the last handle on a `Seed` kills
//!   its templates and joins those threads. A lazy child whose pages can
//!   no longer be served (its seed dropped, its source gone) is killed,
//!   and [`Child::wait`] says why ([`ExitReason::KilledByPager`]).
//! - Node-wide settings a daemon changes (journals for a successor,
//!   children outliving their spawner, template idle time) are in
//!   [`node`].
//!
//! # Modules
//!
//! The modules follow the data flow: [`procfs`] reads what the kernel
//! shows of a process, [`capture`](mod@capture) writes an [`image`], the
//! restore builds children from it, the [`pager`] serves their memory from
//! a page source, one of the [`transport`]s (local, TCP, RDMA).

#![deny(missing_docs)]

pub mod capture;
mod child;
pub(crate) mod classify;
pub mod container;
pub mod coop;
pub mod ffi;
pub(crate) mod fileid;
pub mod image;
pub mod kobj;
pub mod node;
mod onecpu;
pub mod pager;
pub mod private_fs;
pub mod procfs;
pub(crate) mod restore;
mod seedref;
mod tracer;
pub mod transport;
pub(crate) mod vdso;

pub use capture::{capture, CaptureError, CaptureOptions};
pub use child::{Child, ChildError, ChildEvent, Events, ExitReason};
pub use coop::{checkpoint, checkpoint_all_threads, on_restore, Checkpoint};
pub use kernel_helpers::PAGE_SIZE;
pub use pager::{ChildStats, Prefetch};
pub use restore::{set_rootfs_store, RestoreError, RunAs, Seed, SpawnOptions, Stdio};
pub use seedref::{RemoteOptions, SeedRef, SeedRefError, Transport};
