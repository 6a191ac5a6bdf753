//! The formation decision: when the expected number of nodes see each other, exactly one
//! of them bootstraps the cluster with exactly those members; everyone else adopts it,
//! and nodes that come later join it. Pure: time and messages come in as arguments.
//!
//! Rules, in order:
//! 1. A node that is formed (decided, adopted, or persisted from an earlier run) stays
//!    formed and never bootstraps again.
//! 2. A node that hears a formed peer adopts that cluster if it is listed as a member,
//!    and otherwise asks to join it.
//! 3. A node that started less than a grace period ago only listens: a cluster formed
//!    before it arrived must get the chance to be heard before it could found another.
//! 4. Otherwise each node proposes the `expected` smallest node ids among itself and the
//!    live, unformed nodes it hears. Once every node of its own proposal proposes the very
//!    same set, the smallest node of the set bootstraps. Nodes whose views disagree wait
//!    for them to converge; nobody bootstraps on a view others do not share.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::discovery::Announce;
use crate::identity::NodeId;
use crate::kdf::Salt;

/// A formed cluster, as decided once and persisted by every member.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Formed {
    /// Cluster id (a hash of the name and the founding members).
    pub cluster_id: String,
    /// The founding members, sorted.
    pub members: Vec<NodeId>,
    /// The cluster's salt for the keys derived from the join secret (`crate::kdf`), in
    /// hex: the founding node's own. Absent in clusters formed before it existed; they
    /// use [`Salt::LEGACY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
}

impl Formed {
    /// The cluster's salt ([`Salt::LEGACY`] when it has none or it does not parse).
    pub fn salt(&self) -> Salt {
        self.salt
            .as_deref()
            .and_then(Salt::from_hex)
            .unwrap_or(Salt::LEGACY)
    }
}

/// What the node should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep announcing and listening.
    Wait,
    /// Persist this, then create the cluster (initialize Raft) with these members.
    Bootstrap(Formed),
    /// Persist this: we are a founding member; the bootstrapper will add us.
    Adopt(Formed),
    /// Ask a member of this cluster to add us.
    Join {
        /// The cluster.
        cluster_id: String,
        /// Addresses of members we heard.
        via: Vec<SocketAddr>,
        /// The cluster as its members announce it (to persist once joined).
        formed: Formed,
    },
}

#[derive(Clone, Debug)]
struct Peer {
    addr: SocketAddr,
    heard_ms: u64,
    proposal: Vec<NodeId>,
    formed: Option<Formed>,
}

/// One node's formation state.
pub struct Formation {
    cluster: String,
    me: NodeId,
    expected: usize,
    liveness_ms: u64,
    listen_until_ms: u64,
    peers: BTreeMap<NodeId, Peer>,
    formed: Option<Formed>,
    salt: Salt,
}

impl Formation {
    /// A node's formation state from `now_ms` on; `persisted` is what an earlier run
    /// decided, if anything. Peers count as live for `liveness_ms` after their last
    /// announcement; the node only listens for the first `1.5 × liveness_ms`.
    pub fn new(
        cluster: &str,
        me: NodeId,
        expected: usize,
        liveness_ms: u64,
        now_ms: u64,
        persisted: Option<Formed>,
    ) -> Formation {
        Formation {
            cluster: cluster.to_string(),
            me,
            expected: expected.max(1),
            liveness_ms,
            listen_until_ms: now_ms + liveness_ms * 3 / 2,
            peers: BTreeMap::new(),
            formed: persisted,
            salt: Salt::random(),
        }
    }

    /// The salt this node announces with: its cluster's once formed, else its own random
    /// one (which becomes the cluster's if this node founds it).
    pub fn salt(&self) -> Salt {
        self.formed.as_ref().map_or(self.salt, Formed::salt)
    }

    /// The cluster this node belongs to, once formed.
    pub fn formed(&self) -> Option<&Formed> {
        self.formed.as_ref()
    }

    /// Records that this node was added to an existing cluster.
    pub fn joined(&mut self, f: Formed) {
        self.formed = Some(f);
    }

    /// The address a peer announced, if heard.
    pub fn peer_addr(&self, id: &NodeId) -> Option<SocketAddr> {
        self.peers.get(id).map(|p| p.addr)
    }

    /// Records an authenticated, fresh announcement.
    pub fn heard(&mut self, a: &Announce, now_ms: u64) {
        if a.node_id == self.me {
            return;
        }
        self.peers.insert(
            a.node_id.clone(),
            Peer {
                addr: a.addr,
                heard_ms: now_ms,
                proposal: a.proposal.clone(),
                formed: a.formed.clone(),
            },
        );
    }

    fn live(&self, now_ms: u64) -> impl Iterator<Item = (&NodeId, &Peer)> {
        self.peers
            .iter()
            .filter(move |(_, p)| now_ms.saturating_sub(p.heard_ms) <= self.liveness_ms)
    }

    /// This node's current proposal: the `expected` smallest ids among itself and the live
    /// unformed nodes it hears (empty once formed).
    pub fn proposal(&self, now_ms: u64) -> Vec<NodeId> {
        if self.formed.is_some() {
            return Vec::new();
        }
        let mut ids: Vec<NodeId> = std::iter::once(self.me.clone())
            .chain(
                self.live(now_ms)
                    .filter(|(_, p)| p.formed.is_none())
                    .map(|(id, _)| id.clone()),
            )
            .collect();
        ids.sort();
        ids.truncate(self.expected);
        ids
    }

    /// Decides what to do now.
    pub fn decide(&mut self, now_ms: u64) -> Action {
        if self.formed.is_some() {
            return Action::Wait;
        }
        // A formed peer settles it: adopt if we are a founder, else join.
        let formed_peer = self.live(now_ms).find_map(|(_, p)| p.formed.clone());
        if let Some(f) = formed_peer {
            if f.members.contains(&self.me) {
                self.formed = Some(f.clone());
                return Action::Adopt(f);
            }
            let via = self
                .live(now_ms)
                .filter(|(_, p)| {
                    p.formed
                        .as_ref()
                        .is_some_and(|pf| pf.cluster_id == f.cluster_id)
                })
                .map(|(_, p)| p.addr)
                .collect();
            return Action::Join {
                cluster_id: f.cluster_id.clone(),
                via,
                formed: f,
            };
        }
        if now_ms < self.listen_until_ms {
            return Action::Wait;
        }
        let proposal = self.proposal(now_ms);
        if proposal.len() < self.expected || proposal.first() != Some(&self.me) {
            return Action::Wait;
        }
        let agreed = proposal.iter().filter(|id| **id != self.me).all(|id| {
            self.peers.get(id).is_some_and(|p| {
                now_ms.saturating_sub(p.heard_ms) <= self.liveness_ms && p.proposal == proposal
            })
        });
        if !agreed {
            return Action::Wait;
        }
        let f = Formed {
            cluster_id: cluster_id(&self.cluster, &proposal),
            members: proposal,
            salt: Some(self.salt.to_hex()),
        };
        self.formed = Some(f.clone());
        Action::Bootstrap(f)
    }
}

/// The id of a cluster founded by `members` under `name`.
pub fn cluster_id(name: &str, members: &[NodeId]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(name.as_bytes());
    for m in members {
        h.update(b"\0");
        h.update(m.0.as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}
