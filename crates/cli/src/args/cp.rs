//! `tessera volume cp`'s arguments (docs/volume-export.md).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Copy between a volume (or snapshot) and a local raw or qcow2 file, or between volumes,
/// over the stores' QUIC export.
#[derive(Args, Debug)]
pub struct CpArgs {
    /// Source: `vol:NAME` or `vol:NAME@SNAPSHOT` (found through the API, read from its
    /// primary's node), `quic://HOST:PORT/EXPORT` (a store's QUIC export, no API), or a
    /// local raw or qcow2 file.
    pub src: String,
    /// Destination, as the source; a local file is created or replaced (sparse: ranges
    /// the source holds as zeros are not written; kept and sized with `--resume`). A volume must be at least as large as
    /// the source; its bytes past the source's end are left as they are.
    pub dst: String,
    /// Client credentials for `quic://` ends: a directory written by `tessera volume
    /// export-creds` (or a node's TLS directory). `vol:` ends get a certificate through
    /// the API when this is not given.
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// The local file's format. Default: a source is read as qcow2 when it starts with
    /// qcow2's magic, a destination is written as qcow2 when its name ends in `.qcow2`,
    /// else raw.
    #[arg(long, value_enum)]
    pub format: Option<FileFormat>,
    /// Continue an interrupted copy: pieces whose blake3 digests are equal on both ends
    /// are not copied again (a volume's digests are computed by its store, so only what
    /// differs travels). A raw file destination is kept, not replaced; a qcow2
    /// destination cannot be resumed yet.
    #[arg(long)]
    pub resume: bool,
}

/// A local file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// A raw image: the disk's bytes as they are (sparse where zero).
    Raw,
    /// A qcow2 image (read: versions 2 and 3; written: version 3, 64 KiB clusters).
    Qcow2,
}

impl CpArgs {
    /// True when an end names a volume through the API (`vol:`).
    pub fn needs_api(&self) -> bool {
        self.src.starts_with("vol:") || self.dst.starts_with("vol:")
    }
}
