//! `tessera volume cp`'s arguments (docs/volume-export.md).

use std::path::PathBuf;

use clap::Args;

/// Copy between a volume (or snapshot) and a local raw file, or between volumes, over
/// the stores' QUIC export.
#[derive(Args, Debug)]
pub struct CpArgs {
    /// Source: `vol:NAME` or `vol:NAME@SNAPSHOT` (found through the API, read from its
    /// primary's node), `quic://HOST:PORT/EXPORT` (a store's QUIC export, no API), or a
    /// local raw file.
    pub src: String,
    /// Destination, as the source; a local file is created or replaced (sparse: ranges
    /// the source holds as zeros are not written). A volume must be at least as large as
    /// the source; its bytes past the source's end are left as they are.
    pub dst: String,
    /// Client credentials for `quic://` ends: a directory written by `tessera volume
    /// export-creds` (or a node's TLS directory). `vol:` ends get a certificate through
    /// the API when this is not given.
    #[arg(long)]
    pub creds: Option<PathBuf>,
}

impl CpArgs {
    /// True when an end names a volume through the API (`vol:`).
    pub fn needs_api(&self) -> bool {
        self.src.starts_with("vol:") || self.dst.starts_with("vol:")
    }
}
