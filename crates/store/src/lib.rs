//! tessera-store: the node's block-storage service.
//!
//! It owns one block store (`tessera-blockstore`), serves its volumes and snapshots over
//! NBD (`tessera-nbd`) on TCP (TLS with client certificates of the cluster CA, or plain on
//! an address the operator trusts) and a Unix socket, and takes volume administration on a
//! local admin socket (the protocol is `tessera-store-admin`), and replicates volumes to
//! other nodes' stores over QUIC (`repl`, on `tessera-replication`'s codec and state
//! machines), and serves volumes to remote clients over QUIC too (`export`, the NBD
//! export's semantics on the same `Exports`). It does not decide anything about the
//! cluster: `tesserad` tells it what to create and which generation and replicas a
//! volume has.

#![forbid(unsafe_code)]

pub mod admin_client;
pub mod admission;
pub mod claim;
pub mod daemon;
pub mod export;
pub mod exports;
pub mod forward;
pub mod repl;
pub mod tls;
