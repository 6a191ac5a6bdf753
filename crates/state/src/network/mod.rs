//! The node-to-node network: one JSON request and one JSON reply per exchange, over kept
//! connections, inside mutual TLS with the cluster CA once the node holds a certificate.
//!
//! A node without a certificate may connect without one only to *enroll*: it sends a
//! certificate request authenticated with the join key and gets back its certificate and
//! the CA certificate, authenticated with the same key (it cannot check the server's
//! certificate yet, having no CA). Every other RPC on a TLS listener needs a client
//! certificate from the cluster CA. Without TLS configured (tests of this crate), the
//! transport is plain TCP.
//!
//! This module is the bottom layer of the crate: it knows the wire and how to reach a
//! peer, nothing of membership, read barriers or the server (those build on it, see
//! [`crate::membership`], [`crate::barrier`] and the crate's RPC server).

pub mod admission;
mod auth;
mod raft_network;
pub(crate) mod rpc;
mod transport;

pub use auth::{AuthError, EnrollReply, EnrollRequest, JoinRequest};
pub use raft_network::{Network, Peer};
pub use transport::{enroll, Tls, Transport, TransportError};

pub(crate) use auth::now_ms;

/// A Raft node id.
pub(crate) type NodeId = u64;

/// The name a node's certificate is issued for: its Raft id in hex.
pub fn cert_name(id: NodeId) -> String {
    format!("{id:016x}")
}
