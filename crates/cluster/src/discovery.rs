//! The discovery protocol: nodes announce themselves on the management network (UDP
//! multicast or static peers). Every announcement is authenticated with a key derived from
//! the join secret; replayed and stale ones are dropped.
//!
//! Wire format (version 1): `"TSRD"`, version byte, 32-byte blake3 keyed hash of
//! (version byte + body), then the JSON body. A node with another secret cannot produce a
//! valid hash, so it is never heard; receivers answer it with an unauthenticated
//! `"TSRX"` rejection so that its operator sees why in its log too.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::formation::Formed;
use crate::identity::NodeId;

const MAGIC: &[u8; 4] = b"TSRD";
const REJECT_MAGIC: &[u8; 4] = b"TSRX";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Largest datagram we accept.
pub const MAX_DATAGRAM: usize = 8 * 1024;
/// How far a sender's clock may be off before its messages count as stale.
pub const FRESHNESS_MS: u64 = 30_000;

/// An announcement: who I am, where, and what I know about formation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// Cluster name from the seed.
    pub cluster: String,
    /// Sender.
    pub node_id: NodeId,
    /// Where the sender's cluster endpoint listens.
    pub addr: SocketAddr,
    /// Changes every time the sender starts (its start time in ms).
    pub incarnation: u64,
    /// Increases with every message of one incarnation.
    pub seq: u64,
    /// Sender's clock when sent, in ms since the epoch.
    pub sent_ms: u64,
    /// The first `expected` unformed nodes the sender sees (its formation proposal).
    pub proposal: Vec<NodeId>,
    /// The cluster the sender belongs to, once formed.
    pub formed: Option<Formed>,
}

/// The key announcements are authenticated with.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// Derives the discovery key from the join secret.
    pub fn from_secret(secret: &str) -> Key {
        Key(blake3::derive_key(
            "tessera discovery v1",
            secret.as_bytes(),
        ))
    }
}

/// Why a datagram was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    /// Too short, too long, or not ours.
    #[error("not a Tessera discovery message")]
    NotOurs,
    /// From a newer protocol.
    #[error("discovery protocol version {0} is not supported")]
    Version(u8),
    /// The keyed hash does not match: another join secret, or tampering.
    #[error("authentication failed (different join secret?)")]
    BadMac,
    /// Authentic but malformed.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// A rejection from a peer: it could not authenticate us.
    #[error("a peer rejected our announcement: {0}")]
    RejectedByPeer(String),
    /// Another cluster's announcement.
    #[error("announcement for cluster {0:?}")]
    OtherCluster(String),
    /// Older than one already seen from that node (a replay).
    #[error("replayed announcement from {0}")]
    Replay(NodeId),
    /// Sent too long ago (or with a clock far off).
    #[error("stale announcement from {0} ({1} ms off)")]
    Stale(NodeId, u64),
}

fn mac(key: &Key, version: u8, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&[version]);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Encodes and authenticates an announcement.
pub fn encode(a: &Announce, key: &Key) -> Vec<u8> {
    let body = serde_json::to_vec(a).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + 1 + 32 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&mac(key, VERSION, &body));
    out.extend_from_slice(&body);
    out
}

/// A rejection telling a sender we could not authenticate it.
pub fn encode_reject(reason: &str) -> Vec<u8> {
    let mut out = REJECT_MAGIC.to_vec();
    out.extend_from_slice(&reason.as_bytes()[..reason.len().min(200)]);
    out
}

/// Decodes and authenticates a datagram (no replay or freshness checks: see [`Receiver`]).
pub fn decode(d: &[u8], key: &Key) -> Result<Announce, DiscoveryError> {
    if d.len() > MAX_DATAGRAM {
        return Err(DiscoveryError::NotOurs);
    }
    if let Some(reason) = d.strip_prefix(REJECT_MAGIC) {
        return Err(DiscoveryError::RejectedByPeer(
            String::from_utf8_lossy(reason).into_owned(),
        ));
    }
    if d.len() < 37 || &d[..4] != MAGIC {
        return Err(DiscoveryError::NotOurs);
    }
    if d[4] != VERSION {
        return Err(DiscoveryError::Version(d[4]));
    }
    let (tag, body) = d[5..].split_at(32);
    // Compare in constant time: blake3's Hash equality is.
    if blake3::Hash::from(mac(key, d[4], body))
        != blake3::Hash::from(<[u8; 32]>::try_from(tag).unwrap_or([0; 32]))
    {
        return Err(DiscoveryError::BadMac);
    }
    serde_json::from_slice(body).map_err(|e| DiscoveryError::Malformed(e.to_string()))
}

/// Per-node replay and freshness state of a receiver.
#[derive(Default)]
pub struct Receiver {
    last: HashMap<NodeId, (u64, u64)>,
}

impl Receiver {
    /// Accepts an authentic announcement once: from our cluster, fresh, and newer than
    /// anything seen from that node.
    pub fn accept(
        &mut self,
        cluster: &str,
        a: &Announce,
        now_ms: u64,
    ) -> Result<(), DiscoveryError> {
        if a.cluster != cluster {
            return Err(DiscoveryError::OtherCluster(a.cluster.clone()));
        }
        let skew = now_ms.abs_diff(a.sent_ms);
        if skew > FRESHNESS_MS {
            return Err(DiscoveryError::Stale(a.node_id.clone(), skew));
        }
        if let Some(prev) = self.last.get(&a.node_id) {
            if (a.incarnation, a.seq) <= *prev {
                return Err(DiscoveryError::Replay(a.node_id.clone()));
            }
        }
        self.last.insert(a.node_id.clone(), (a.incarnation, a.seq));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(seq: u64) -> Announce {
        Announce {
            cluster: "lab".into(),
            node_id: NodeId("aa".into()),
            addr: "10.77.0.1:7946".parse().unwrap(),
            incarnation: 7,
            seq,
            sent_ms: 1_000_000,
            proposal: vec![],
            formed: None,
        }
    }

    #[test]
    fn round_trip_and_forgery() {
        let key = Key::from_secret("correct horse battery staple");
        let wire = encode(&announce(1), &key);
        assert_eq!(decode(&wire, &key).unwrap(), announce(1));
        let other = Key::from_secret("another secret entirely");
        assert_eq!(decode(&wire, &other), Err(DiscoveryError::BadMac));
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 1;
            assert!(
                decode(&bad, &key).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        assert_eq!(decode(b"hello", &key), Err(DiscoveryError::NotOurs));
        assert!(
            matches!(decode(&encode_reject("nope"), &key), Err(DiscoveryError::RejectedByPeer(r)) if r == "nope")
        );
    }

    #[test]
    fn replays_stale_and_foreign_messages_are_dropped() {
        let mut r = Receiver::default();
        r.accept("lab", &announce(1), 1_000_500).unwrap();
        assert!(matches!(
            r.accept("lab", &announce(1), 1_000_500),
            Err(DiscoveryError::Replay(_))
        ));
        r.accept("lab", &announce(2), 1_000_500).unwrap();
        assert!(matches!(
            r.accept("lab", &announce(3), 1_000_000 + FRESHNESS_MS + 1),
            Err(DiscoveryError::Stale(..))
        ));
        assert!(matches!(
            r.accept("other", &announce(4), 1_000_500),
            Err(DiscoveryError::OtherCluster(_))
        ));
        // A restart (new incarnation) starts its sequence again.
        let mut restarted = announce(1);
        restarted.incarnation = 8;
        r.accept("lab", &restarted, 1_000_500).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(d in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let key = Key::from_secret("correct horse battery staple");
            let _ = decode(&d, &key);
        }
    }
}
