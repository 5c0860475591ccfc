//! The userfaultfd seam of the pager: the [`FaultFd`] operations serving a
//! child's faults uses. Implemented by [`Uffd`]; the pager's unit tests
//! implement it with a recorder fed scripted events, so how each fault is
//! served is tested without root.

use std::io;

use kernel_helpers::uffd::{FillError, Msg, Uffd, UffdError};

/// The userfaultfd operations of serving one child.
pub(crate) trait FaultFd {
    /// Read pending events (non-blocking) into `out`; returns how many.
    fn read_msgs(&self, out: &mut Vec<Msg>) -> io::Result<usize>;
    /// `UFFDIO_COPY` `src` to `dst` (whole pages).
    fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<(), FillError>;
    /// `UFFDIO_ZEROPAGE` over `[dst, dst+len)`.
    fn zero(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError>;
    /// `UFFDIO_CONTINUE` over `[dst, dst+len)`.
    fn continue_range(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError>;
    /// `UFFDIO_WAKE` the threads waiting on `[start, start+len)`.
    fn wake(&self, start: u64, len: u64) -> Result<(), UffdError>;
    /// `UFFDIO_POISON`: accesses to `[dst, dst+len)` raise `SIGBUS`.
    fn poison(&self, dst: u64, len: u64) -> Result<(), FillError>;
    /// Is the address space served still there?
    fn mm_alive(&self, addr: u64) -> bool;
}

impl FaultFd for Uffd {
    fn read_msgs(&self, out: &mut Vec<Msg>) -> io::Result<usize> {
        Uffd::read_msgs(self, out)
    }
    fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<(), FillError> {
        Uffd::copy(self, dst, src, wake)
    }
    fn zero(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
        Uffd::zero(self, dst, len, wake)
    }
    fn continue_range(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
        Uffd::continue_range(self, dst, len, wake)
    }
    fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        Uffd::wake(self, start, len)
    }
    fn poison(&self, dst: u64, len: u64) -> Result<(), FillError> {
        Uffd::poison(self, dst, len)
    }
    fn mm_alive(&self, addr: u64) -> bool {
        Uffd::mm_alive(self, addr)
    }
}

#[cfg(test)]
pub(crate) mod recorder {
    use super::*;
    use std::cell::RefCell;
    use std::collections::{HashSet, VecDeque};

    /// One operation a [`Recorder`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Op {
        /// `UFFDIO_COPY` of these bytes to this address (wake or not).
        Copy {
            dst: u64,
            bytes: Vec<u8>,
            wake: bool,
        },
        /// `UFFDIO_ZEROPAGE`.
        Zero { dst: u64, len: u64, wake: bool },
        /// `UFFDIO_CONTINUE`.
        Continue { dst: u64, len: u64, wake: bool },
        /// `UFFDIO_WAKE`.
        Wake { start: u64, len: u64 },
        /// `UFFDIO_POISON`.
        Poison { dst: u64, len: u64 },
    }

    /// A [`FaultFd`] that hands out scripted batches of events, one batch
    /// per read (then nothing), logs every operation, and answers `ENOENT`
    /// to a fill across `cut` or starting in `gone`, `EEXIST` to one
    /// starting at an address in `present`, else success.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub events: RefCell<VecDeque<Vec<Msg>>>,
        pub ops: RefCell<Vec<Op>>,
        /// Pages already in the child, as far as fills are concerned.
        pub present: RefCell<HashSet<u64>>,
        /// An edge between two of the child's mappings (a fill must lie in one).
        pub cut: std::cell::Cell<Option<u64>>,
        /// Pages in no mapping of the child.
        pub gone: RefCell<HashSet<u64>>,
    }

    impl Recorder {
        /// A recorder that delivers these faults (addresses) in one read.
        pub fn faulting(addrs: &[u64]) -> Recorder {
            let r = Recorder::default();
            r.events.borrow_mut().push_back(
                addrs
                    .iter()
                    .map(|&address| Msg::PageFault { address, flags: 0 })
                    .collect(),
            );
            r
        }

        fn answer(&self, dst: u64, len: u64) -> Result<(), FillError> {
            let across = self.cut.get().is_some_and(|c| dst < c && dst + len > c);
            if across || self.gone.borrow().contains(&dst) {
                Err(FillError::Gone)
            } else if self.present.borrow().contains(&dst) {
                Err(FillError::Exists)
            } else {
                Ok(())
            }
        }

        fn log(&self, op: Op) {
            self.ops.borrow_mut().push(op);
        }
    }

    impl FaultFd for Recorder {
        fn read_msgs(&self, out: &mut Vec<Msg>) -> io::Result<usize> {
            let batch = self.events.borrow_mut().pop_front().unwrap_or_default();
            let n = batch.len();
            out.extend(batch);
            Ok(n)
        }
        fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<(), FillError> {
            self.log(Op::Copy {
                dst,
                bytes: src.to_vec(),
                wake,
            });
            self.answer(dst, src.len() as u64)
        }
        fn zero(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
            self.log(Op::Zero { dst, len, wake });
            self.answer(dst, len)
        }
        fn continue_range(&self, dst: u64, len: u64, wake: bool) -> Result<(), FillError> {
            self.log(Op::Continue { dst, len, wake });
            self.answer(dst, len)
        }
        fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
            self.log(Op::Wake { start, len });
            Ok(())
        }
        fn poison(&self, dst: u64, len: u64) -> Result<(), FillError> {
            self.log(Op::Poison { dst, len });
            Ok(())
        }
        fn mm_alive(&self, _addr: u64) -> bool {
            true
        }
    }
}
