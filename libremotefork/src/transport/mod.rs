//! The page transports, side by side: where a seed's pages come from.
//!
//! - [`PageSource`]: what the pager's cache reads ranges of a page store
//!   through; [`local::LocalSource`] reads the seed's own file on this node.
//! - [`wire`]: the TCP page protocol (docs/PAGE_PROTOCOL.md), shared by
//!   [`tcp`] (the client, a `PageSource`) and [`tcp_server`] (the page
//!   server forkd runs, with the `server` feature).
//! - [`rdma`]: RDMA READ, both sides: the exporter registering a node's page
//!   stores and the importer's `PageSource` (without the `rdma` feature,
//!   the same API refusing with the reason).

use std::io;

pub mod local;
pub mod rdma;
pub mod tcp;
#[cfg(feature = "server")]
pub mod tcp_server;
pub mod wire;

/// Errors fetching pages.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A read failed.
    #[error("reading {len} bytes at offset {offset:#x} of {source_name} failed: {error}")]
    Read {
        /// The source.
        source_name: String,
        /// Offset in the page store.
        offset: u64,
        /// Length.
        len: usize,
        /// What went wrong.
        error: io::Error,
    },
    /// Bytes read do not match the seed's digest of them.
    #[error("chunk {chunk} of the page store (bytes {start:#x}..{end:#x}) read from {source_name} does not match its digest: the seed is damaged or the transfer corrupted it")]
    Corrupt {
        /// The source.
        source_name: String,
        /// Chunk index.
        chunk: usize,
        /// Its first byte in the page store.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// The seed was found damaged before; nothing more is read from it.
    #[error("the seed is damaged ({0}); drop it and capture it again")]
    Damaged(String),
    /// A request outside the page store.
    #[error("pages at offset {offset:#x} (+{len}) lie outside the {size}-byte page store")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Store size.
        size: u64,
    },
}

/// Reads ranges of a seed's page store into local memory. Implemented by
/// the local image here; network transports plug in the same way.
pub trait PageSource: Send + Sync {
    /// Fill `dst` with the page store's bytes at `offset`.
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), SourceError>;
    /// Fill each buffer with the bytes at its offset: one round trip where
    /// the source can batch (the default reads one by one).
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), SourceError> {
        for (o, b) in reqs.iter_mut() {
            self.read(*o, b)?;
        }
        Ok(())
    }
    /// Requests sent to the seed's node so far (0 for local sources).
    fn round_trips(&self) -> u64 {
        0
    }
    /// Told once by [`crate::pager::cache::SeedCache::new`] where most reads will land (the
    /// cache mapping), so a source that needs to prepare memory for
    /// reading into it can do so once: the RDMA source registers it with
    /// the device. Reads may still target other buffers. The default does
    /// nothing.
    ///
    /// # Safety
    ///
    /// `base..base+len` must stay mapped and writable for as long as
    /// `self` lives (the source may let a device write there).
    unsafe fn attach_destination(&self, _base: *mut u8, _len: usize) {}
    /// Whether reads are best made straight into the cache mapping (the
    /// RDMA source: the device writes there, no copy). Otherwise the cache
    /// reads into a buffer and writes the checked bytes into its memfd:
    /// one copy as well, and no page of the cache is zero-filled or mapped
    /// in this process first (a third of the cost of a cold fetch).
    fn reads_in_place(&self) -> bool {
        false
    }
    /// Size of the page store.
    fn size(&self) -> u64;
    /// A short name for messages and metrics (`local:/path`, `tcp:host`...).
    fn name(&self) -> String;
}
