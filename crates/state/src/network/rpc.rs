//! The RPC messages: one request per line, one answer per line, both JSON. Answers to our
//! own RPCs are `Result<T, String>` on the wire (`{"Ok":…}` / `{"Err":"why"}`); Raft's
//! own RPCs answer with openraft's result types.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use super::auth::{EnrollRequest, JoinRequest};
use super::NodeId;
use crate::types::{Command, TypeConfig};

/// Largest request or answer line accepted (snapshots are sent in chunks well below this).
pub(crate) const MAX_RPC: u64 = 64 << 20;

/// The largest request line a caller without a cluster certificate may send (it may
/// only enroll: a certificate request of a few KiB). Anything longer ends the connection
/// before more is read.
pub(crate) const MAX_ANONYMOUS_RPC: u64 = 16 << 10;

/// The wire form of the answer to one of our RPCs: the refusal travels as its message.
pub(crate) type Reply<T> = Result<T, String>;

/// What a member answers a removed node (its certificate names an id in the removed
/// nodes' table) instead of serving any RPC but enrollment: `{"Removed":"why"}`, so the
/// node learns it was removed.
#[derive(Serialize, Deserialize)]
pub(crate) struct RemovedAnswer {
    #[serde(rename = "Removed")]
    pub removed: String,
}

impl RemovedAnswer {
    /// How such an answer line starts (no other answer starts so).
    pub const PREFIX: &'static str = "{\"Removed\":";
}

/// A request.
#[derive(Serialize, Deserialize)]
#[serde(tag = "rpc", content = "body", rename_all = "snake_case")]
pub(crate) enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client write forwarded by a follower to the leader.
    Write(Command),
    /// A new node asking to become a voter, authenticated with the join key.
    Join(JoinRequest),
    /// A follower's read barrier: the leader confirms its leadership and answers the log
    /// index a read must see.
    ReadIndex,
    /// A node without a certificate asking for one (the only RPC allowed without one).
    Enroll(EnrollRequest),
    /// Remove a member (forwarded by a follower to the leader).
    Remove(NodeId),
}

impl Rpc {
    /// Whether the request may be sent again when a connection broke after it was sent
    /// (the peer may have acted on it): Raft's messages are safe to repeat by the
    /// protocol, a read index asks again, a join or removal already done is answered as
    /// done. A forwarded write is not: applied twice, a compare-and-swap would then fail
    /// against its own first application, and an event or counter be doubled.
    pub(crate) fn resendable(&self) -> bool {
        !matches!(self, Rpc::Write(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding other nodes (and the end-to-end tests) speak: changing it breaks
    /// mixed-version clusters.
    #[test]
    fn requests_and_answers_keep_their_wire_form() {
        assert_eq!(
            serde_json::to_string(&Rpc::ReadIndex).unwrap(),
            r#"{"rpc":"read_index"}"#
        );
        let r: Rpc = serde_json::from_str(r#"{"rpc":"read_index","body":null}"#).unwrap();
        assert!(matches!(r, Rpc::ReadIndex));
        assert_eq!(
            serde_json::to_string(&Rpc::Remove(4)).unwrap(),
            r#"{"rpc":"remove","body":4}"#
        );
        let ok: Reply<u64> = Ok(7);
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"Ok":7}"#);
        let no: Reply<()> = Err("not the leader".into());
        assert_eq!(
            serde_json::to_string(&no).unwrap(),
            r#"{"Err":"not the leader"}"#
        );
        assert!(serde_json::from_str::<Rpc>(r#"{"rpc":"nonsense"}"#).is_err());
        let removed = serde_json::to_string(&RemovedAnswer {
            removed: "gone".into(),
        })
        .unwrap();
        assert_eq!(removed, r#"{"Removed":"gone"}"#);
        assert!(removed.starts_with(RemovedAnswer::PREFIX));
    }
}
