//! Membership changes: who leads, adding an authenticated node (as a learner, then a
//! voter) and removing a member, each done on the leader or asked of it over the network.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};

use crate::network::{now_ms, AuthError, JoinRequest, Transport, TransportError};
use crate::types::TypeConfig;

type NodeId = u64;

/// Why this node cannot name the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderError {
    /// No leader is known (an election, or no quorum).
    #[error("no leader elected (no quorum?)")]
    NoLeader,
    /// The leader this node knows is not in the membership it knows.
    #[error("the leader is not a member?")]
    LeaderNotMember,
}

/// Why a membership change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// No leader to make the change.
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// This node was started without a join key.
    #[error("this node does not accept join requests")]
    NoJoinKey,
    /// The join request is not authentic or not fresh.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The node to remove is not a member.
    #[error("{0} is not a member")]
    NotMember(NodeId),
    /// Removing it would leave no voter.
    #[error("cannot remove the last voter")]
    LastVoter,
    /// Raft did not make the change.
    #[error(transparent)]
    Raft(Box<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    /// Asking the leader failed, or the leader refused (its reason is the message).
    #[error(transparent)]
    AskingLeader(#[from] TransportError),
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> for MembershipError {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Self {
        MembershipError::Raft(Box::new(e))
    }
}

/// Who leads, as this node knows.
pub(crate) enum Leader {
    /// This node.
    Me,
    /// Another node: its id and address.
    Other(NodeId, String),
}

/// The current leader, or an error when none is known.
pub(crate) fn leader(raft: &Raft<TypeConfig>) -> Result<Leader, LeaderError> {
    let m = raft.metrics().borrow().clone();
    let id = m.current_leader.ok_or(LeaderError::NoLeader)?;
    if id == m.id {
        return Ok(Leader::Me);
    }
    let node = m
        .membership_config
        .membership()
        .get_node(&id)
        .cloned()
        .ok_or(LeaderError::LeaderNotMember)?;
    Ok(Leader::Other(id, node.addr))
}

/// Adds a node whose request is signed with `key` as a learner, then as a voter; a
/// follower forwards the request to the leader.
pub(crate) async fn join(
    raft: &Raft<TypeConfig>,
    transport: &Transport,
    key: Option<[u8; 32]>,
    req: JoinRequest,
) -> Result<(), MembershipError> {
    let key = key.ok_or(MembershipError::NoJoinKey)?;
    req.verify(&key, now_ms())?;
    if let Leader::Other(leader_id, addr) = leader(raft)? {
        return Ok(transport
            .forward_join(leader_id, &addr, req, Duration::from_secs(20))
            .await?);
    }
    let m = raft.metrics().borrow().clone();
    raft.add_learner(
        req.id,
        BasicNode {
            addr: req.addr.clone(),
        },
        true,
    )
    .await?;
    let mut voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
    voters.insert(req.id);
    raft.change_membership(voters, false).await?;
    tracing::info!(id = req.id, addr = %req.addr, "added a voter");
    Ok(())
}

/// Removes a member from the voters and the cluster: on the leader, or asked of it.
pub(crate) async fn remove(
    raft: &Raft<TypeConfig>,
    transport: &Transport,
    id: NodeId,
) -> Result<(), MembershipError> {
    match leader(raft)? {
        Leader::Me => remove_on_leader(raft, id).await,
        Leader::Other(leader_id, addr) => {
            Ok(transport.request_remove(leader_id, &addr, id).await?)
        }
    }
}

/// The leader's part of [`remove`].
async fn remove_on_leader(raft: &Raft<TypeConfig>, id: NodeId) -> Result<(), MembershipError> {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    if membership.get_node(&id).is_none() {
        return Err(MembershipError::NotMember(id));
    }
    // The leader may remove itself: openraft keeps it leading until the membership without
    // it is committed (so the followers learn of the commit), then it steps down and the
    // remaining voters elect a leader among themselves. Refusing instead would leave a
    // running leader unremovable, since nothing else makes it give up the leadership.
    let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != id).collect();
    if voters.is_empty() {
        return Err(MembershipError::LastVoter);
    }
    raft.change_membership(voters, false).await?;
    tracing::info!(id, leader_itself = id == m.id, "removed a member");
    Ok(())
}
