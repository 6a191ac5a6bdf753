//! The discovery protocol: nodes announce themselves on the management network (UDP
//! multicast or static peers). Every announcement is authenticated with a key derived from
//! the join secret; replayed and stale ones are dropped.
//!
//! Wire format (version 2): `"TSRD"`, version byte, cluster name length (one byte) and the
//! cluster name, the sender's 16-byte salt, a 32-byte blake3 keyed hash of (version byte,
//! name, salt, body), then the JSON body. The key is the discovery key the join secret
//! gives for that cluster name and salt (`crate::kdf`, argon2id): the name and salt travel
//! in the clear so a receiver can pick (or derive, once) the key before checking the hash,
//! and can ignore another cluster's datagrams without deriving anything. A node with
//! another secret cannot produce a valid hash, so it is never heard; receivers answer it
//! with an unauthenticated `"TSRX"` rejection so that its operator sees why in its log too.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::formation::Formed;
use crate::identity::NodeId;
use crate::kdf::{ClusterKeys, Salt, SALT_LEN};

const MAGIC: &[u8; 4] = b"TSRD";
const REJECT_MAGIC: &[u8; 4] = b"TSRX";
/// Protocol version.
pub const VERSION: u8 = 2;
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

/// The key announcements are authenticated with (one cluster name and salt's).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// The discovery key of `keys` (derived from the join secret by `crate::kdf`).
    pub fn new(keys: &ClusterKeys) -> Key {
        Key(keys.discovery)
    }
}

/// The clear part of a datagram: which cluster and salt its key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's cluster name.
    pub cluster: String,
    /// The salt the sender's key was derived with.
    pub salt: Salt,
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

fn mac(key: &Key, version: u8, header: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(&[version]);
    h.update(header);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Encodes and authenticates an announcement; `salt` is the one `key` was derived with.
pub fn encode(a: &Announce, salt: &Salt, key: &Key) -> Vec<u8> {
    let body = serde_json::to_vec(a).unwrap_or_default();
    let name = &a.cluster.as_bytes()[..a.cluster.len().min(255)];
    let mut header = Vec::with_capacity(1 + name.len() + SALT_LEN);
    header.push(name.len() as u8);
    header.extend_from_slice(name);
    header.extend_from_slice(&salt.0);
    let mut out = Vec::with_capacity(5 + header.len() + 32 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&header);
    out.extend_from_slice(&mac(key, VERSION, &header, &body));
    out.extend_from_slice(&body);
    out
}

/// A datagram's parts: the clear header as bytes and parsed, the hash, the body.
type Parts<'a> = (&'a [u8], Header, &'a [u8], &'a [u8]);

/// Splits a datagram into its parts.
fn split(d: &[u8]) -> Result<Parts<'_>, DiscoveryError> {
    if d.len() > MAX_DATAGRAM {
        return Err(DiscoveryError::NotOurs);
    }
    if let Some(reason) = d.strip_prefix(REJECT_MAGIC) {
        return Err(DiscoveryError::RejectedByPeer(
            String::from_utf8_lossy(reason).into_owned(),
        ));
    }
    if d.len() < 6 || &d[..4] != MAGIC {
        return Err(DiscoveryError::NotOurs);
    }
    if d[4] != VERSION {
        return Err(DiscoveryError::Version(d[4]));
    }
    let name_len = usize::from(d[5]);
    let header_len = 1 + name_len + SALT_LEN;
    let rest = &d[5..];
    if rest.len() < header_len + 32 {
        return Err(DiscoveryError::NotOurs);
    }
    let (header, rest) = rest.split_at(header_len);
    let (tag, body) = rest.split_at(32);
    let cluster = std::str::from_utf8(&header[1..1 + name_len])
        .map_err(|_| DiscoveryError::NotOurs)?
        .to_string();
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&header[1 + name_len..]);
    Ok((
        header,
        Header {
            cluster,
            salt: Salt(salt),
        },
        tag,
        body,
    ))
}

/// The clear header of a datagram: which cluster and salt it claims (unauthenticated:
/// only to pick the key for [`decode`] or to ignore another cluster's datagrams).
pub fn peek(d: &[u8]) -> Result<Header, DiscoveryError> {
    split(d).map(|(_, h, _, _)| h)
}

/// A rejection telling a sender we could not authenticate it.
pub fn encode_reject(reason: &str) -> Vec<u8> {
    let mut out = REJECT_MAGIC.to_vec();
    out.extend_from_slice(&reason.as_bytes()[..reason.len().min(200)]);
    out
}

/// Decodes and authenticates a datagram with the key of its header's cluster name and
/// salt (no replay or freshness checks: see [`Receiver`]).
pub fn decode(d: &[u8], key: &Key) -> Result<Announce, DiscoveryError> {
    let (header, h, tag, body) = split(d)?;
    // Compare in constant time: blake3's Hash equality is.
    if blake3::Hash::from(mac(key, VERSION, header, body))
        != blake3::Hash::from(<[u8; 32]>::try_from(tag).unwrap_or([0; 32]))
    {
        return Err(DiscoveryError::BadMac);
    }
    let a: Announce =
        serde_json::from_slice(body).map_err(|e| DiscoveryError::Malformed(e.to_string()))?;
    if a.cluster != h.cluster {
        return Err(DiscoveryError::Malformed(
            "the cluster name in the header and the body differ".into(),
        ));
    }
    Ok(a)
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

    fn key(secret: &str, salt: &Salt) -> Key {
        Key::new(&crate::kdf::derive(secret, "lab", salt).unwrap())
    }

    #[test]
    fn round_trip_and_forgery() {
        let salt = Salt([3; SALT_LEN]);
        let key = key("correct horse battery staple", &salt);
        let wire = encode(&announce(1), &salt, &key);
        assert_eq!(
            peek(&wire).unwrap(),
            Header {
                cluster: "lab".into(),
                salt
            }
        );
        assert_eq!(decode(&wire, &key).unwrap(), announce(1));
        let other = super::tests::key("another secret entirely", &salt);
        assert_eq!(decode(&wire, &other), Err(DiscoveryError::BadMac));
        // The right secret under another salt is another key.
        let other_salt = super::tests::key("correct horse battery staple", &Salt([4; SALT_LEN]));
        assert_eq!(decode(&wire, &other_salt), Err(DiscoveryError::BadMac));
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
            let key = Key([9; 32]);
            let _ = peek(&d);
            let _ = decode(&d, &key);
        }
    }
}
