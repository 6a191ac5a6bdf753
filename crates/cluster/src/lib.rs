//! How Tessera nodes find each other and form a cluster: the seed configuration, a node's
//! persistent identity, the authenticated discovery protocol, and the formation decision.
//!
//! Everything here is pure logic or small file I/O, deterministic and tested without a
//! network; `tesserad` wires it to UDP sockets and Raft. It must not decide anything a
//! Raft majority should (membership changes after formation go through Raft).

#![forbid(unsafe_code)]

pub mod discovery;
pub mod formation;
pub mod identity;
pub mod kdf;
pub mod seed;
