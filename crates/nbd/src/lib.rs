//! The NBD protocol for Tessera: wire codec, async server and a small blocking client.
//!
//! This crate speaks NBD and nothing else: it serves whatever implements [`Exports`] and
//! knows nothing about volumes, replication or the cluster. Why we wrote the protocol
//! ourselves instead of using the `nbd` crate is in `docs/nbd.md`.

#![forbid(unsafe_code)]

pub mod client;
mod client_negotiation;
pub mod client_pipelined;
pub mod device;
pub mod export_name;
pub mod proto;
pub mod server;

pub use client::{Client, ClientError};
pub use client_pipelined::PipelinedClient;
pub use device::{Device, DeviceError, ExportEntry, Exports, Extent, Peer};
pub use server::{bind_unix, serve_connection, serve_tcp, serve_unix, ServerConfig, TlsRequired};
