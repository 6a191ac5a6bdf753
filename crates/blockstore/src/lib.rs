//! Tessera's block store engine: thin, checksummed, copy-on-write volumes on one node.
//!
//! It owns the on-disk format of a node's replicas (layer files, checksum tables, the
//! write-ahead log and the catalog) and the single-node read/write path. It does not
//! speak any network protocol (that is `tessera-nbd`) and does not know about the cluster:
//! the generation it stamps on every write is handed to it.
//!
//! See `docs/storage.md` for the format and the reasoning behind it.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod format;
mod hash;
mod hooks;
pub mod layer;
pub mod store;
pub mod wal;

pub use error::{Result, StoreError};
pub use format::{BLOCK, BLOCK_SIZE};
pub use hash::hash_blocks;
pub use store::{
    Allocation, BadBlock, BlockRepair, Export, Extent, ScrubReport, SnapshotInfo, Store,
    StoreOptions, VolumeInfo,
};
