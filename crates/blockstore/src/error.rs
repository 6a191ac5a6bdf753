//! Error types of the block store.

use std::io;

/// A record or table entry that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The bytes do not start with the record magic.
    #[error("bad WAL record magic {0:#x}")]
    BadMagic(u32),
    /// A record written by a newer format.
    #[error("unsupported WAL record version {0}")]
    UnsupportedVersion(u8),
    /// Unknown record kind.
    #[error("unknown WAL record kind {0}/{1}")]
    BadKind(u8, u8),
    /// A block count of zero or too large.
    #[error("bad WAL record length {0} blocks")]
    BadLength(u32),
    /// Header or hashes do not match their checksum (a torn or corrupted record).
    #[error("WAL record checksum mismatch")]
    BadChecksum,
}

/// Everything a block store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error from the filesystem, with what we were doing.
    ///
    /// The cause is part of the message and not also offered as `source()`: error
    /// reporters that print the chain (anyhow's `{:#}`) would print it twice.
    #[error("{context}: {cause}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        cause: io::Error,
    },
    /// The filesystem holding the store is full.
    #[error("no space left on the store's filesystem ({context})")]
    NoSpace {
        /// What the store was doing.
        context: String,
    },
    /// A block's data does not match its checksum: the data is not returned.
    #[error("checksum mismatch in layer {layer} block {block}")]
    Corrupt {
        /// Layer holding the bad block.
        layer: u64,
        /// Block number inside the layer.
        block: u64,
    },
    /// No volume, snapshot or export of that name.
    #[error("{0} not found")]
    NotFound(String),
    /// A volume or snapshot of that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A name or size that is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field that is wrong.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Offset and length reach past the end of the volume.
    #[error("range {offset}+{length} is outside the volume (size {size})")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u64,
        /// Volume size.
        size: u64,
    },
    /// A write to a snapshot or another read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// The volume is in use and the operation would pull it from under its users.
    #[error("{0} is busy: {1}")]
    Busy(String, String),
    /// The volume was deleted while this handle was open.
    #[error("volume {0} was deleted")]
    Gone(String),
    /// A write from a writer whose generation a newer one replaced (the replication fence).
    #[error("volume {volume}: generation {held} is stale, the volume is at generation {current}")]
    StaleGeneration {
        /// The volume.
        volume: String,
        /// The generation the writer held.
        held: u64,
        /// The volume's generation.
        current: u64,
    },
    /// The data directory is held by another process.
    #[error("data directory {0} is locked by another tessera-store")]
    Locked(String),
    /// The write-ahead log holds a bad record that a completed flush covered.
    #[error("{0}")]
    DamagedLog(String),
    /// A sync failed earlier: nothing can be made durable until the store restarts.
    #[error("the store is degraded: a sync failed ({0}); every flush fails until restart")]
    Degraded(String),
    /// The on-disk catalog could not be understood.
    #[error("catalog {path}: {reason}")]
    BadCatalog {
        /// Path of the catalog file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// Wraps an I/O error, turning ENOSPC/EDQUOT into [`StoreError::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc_enospc)
                if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
            {
                StoreError::NoSpace { context }
            }
            _ => StoreError::Io {
                context,
                cause: source,
            },
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
