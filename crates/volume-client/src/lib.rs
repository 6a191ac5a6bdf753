//! The client of Tessera's QUIC volume export (`tessera-store --export-quic`), and the
//! export's wire codec (`proto`), defined once here for both ends: the store's server
//! imports it.
//!
//! A connection opens one volume; each request then travels on a QUIC stream of its own,
//! so requests run concurrently up to the server's bound without any matching of
//! handles. This crate knows nothing about the cluster or the block store: it speaks the
//! protocol of `docs/volume-export.md` to an address it is given.

#![forbid(unsafe_code)]

pub mod client;
pub mod proto;

pub use client::{ClientError, Credentials, Volume};
pub use proto::{ErrorCode, Extent};
