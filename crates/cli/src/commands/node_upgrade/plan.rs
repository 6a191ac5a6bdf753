//! The rules of a rolling upgrade, free of I/O so they can be tested alone: each node is
//! named once (never two upgraded at once, never one twice), and a node is taken down
//! only when the cluster is whole — every node up with a healthy store, a leader elected,
//! every volume's copies in sync — so its reboot never costs the cluster its quorum nor
//! a volume its last in-sync copies while another node is away.

use tessera_api::{ClusterStatus, CopyState, NodeInfo, StorageState, VolumeView};

use crate::node_names::NodeNames;

/// Refuses a list that names a node twice (by name and by id alike: `ids` holds each
/// given name with the id it resolved to). Upgrading a node twice in one run would take
/// it down again right after it came back, before anyone looked at it.
pub fn check_order(ids: &[(String, String)]) -> Result<(), String> {
    for (i, (given, id)) in ids.iter().enumerate() {
        if let Some((first, _)) = ids[..i].iter().find(|(_, other)| other == id) {
            return Err(if first == given {
                format!("{given} is named twice: each node is upgraded once; nothing sent")
            } else {
                format!("{first} and {given} are the same node ({id}): each node is upgraded once; nothing sent")
            });
        }
    }
    Ok(())
}

/// Whether node `target` may be taken down now.
#[derive(Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The cluster is whole; `note` says what its reboot costs anyway (a cluster too
    /// small to keep its quorum without it).
    Ready { note: Option<String> },
    /// Not yet: why (the previous node not back, a copy catching up...). Waited on until
    /// the settle time runs out, then the run stops with this.
    Wait(String),
    /// Never: why (the node is not a member).
    Stop(String),
}

/// What the cluster looks like from one node's API, for deciding whether `target` may go
/// down now.
pub struct View<'a> {
    pub nodes: &'a [NodeInfo],
    pub cluster: &'a ClusterStatus,
    pub volumes: &'a [VolumeView],
}

pub fn readiness(target: &str, view: &View) -> Readiness {
    let names = NodeNames::new(view.nodes);
    let name = |id: &str| names.name(id);
    let Some(node) = view.nodes.iter().find(|n| n.id == target) else {
        return Readiness::Stop(format!("{target} is not a node of this cluster"));
    };
    let t = name(target);
    // Voters that stay up while the target reboots, against the majority Raft needs.
    let voters = &view.cluster.voters;
    let majority = voters.len() / 2 + 1;
    let up_without = voters
        .iter()
        .filter(|v| {
            view.nodes
                .iter()
                .any(|n| n.raft_id == Some(**v) && n.id != target && n.state == "up")
        })
        .count();
    let away: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| n.id != target && n.state != "up")
        .map(|n| format!("{} is {}", name(&n.id), n.state))
        .collect();
    if !away.is_empty() {
        let cost = if up_without < majority {
            format!(
                "taking {t} down now would leave the cluster without quorum ({up_without} of {} voters up, {majority} needed)",
                voters.len()
            )
        } else {
            format!("{t} waits until the cluster is whole")
        };
        return Readiness::Wait(format!("{}: {cost}", away.join(", ")));
    }
    if node.state != "up" {
        return Readiness::Wait(format!("{t} is {}", node.state));
    }
    if view.cluster.leader.is_none() {
        return Readiness::Wait("no Raft leader is elected".into());
    }
    for n in view.nodes {
        match n.storage.as_ref() {
            Some(s) if s.state != StorageState::Ok => {
                let state = match s.state {
                    StorageState::Degraded => "degraded",
                    _ => "unreachable",
                };
                let why = s.reason.as_deref().unwrap_or("no reason given");
                return Readiness::Wait(format!("{}'s store is {state}: {why}", name(&n.id)));
            }
            _ => {}
        }
    }
    for v in view.volumes {
        for c in &v.replication.copies {
            let state = match c.state {
                CopyState::InSync if c.joining => "joining the in-sync set",
                CopyState::InSync if c.rebuild => "being rebuilt",
                CopyState::InSync => continue,
                CopyState::OutOfSync => "out of sync",
                CopyState::CatchingUp => "catching up",
            };
            return Readiness::Wait(format!(
                "volume {}: its copy on {} is {state}",
                v.volume.name,
                name(&c.node)
            ));
        }
    }
    let note = (up_without < majority).then(|| {
        format!(
            "the cluster has no quorum while {t} reboots ({} voter(s): no API, no change until it is back)",
            voters.len()
        )
    });
    Readiness::Ready { note }
}

/// Whether a call to the cluster that failed this way is asked again (of every node's
/// API, until the settle time runs out) rather than stopping the run: no answer at all
/// (`None`: a node rebooting, a connection reset) or 502/503/504 (a node catching up
/// with the leader after its reboot, an election: "no leader reachable"). A refusal
/// (4xx) or an internal error stops the run at once, saying so.
pub fn ask_again(status: Option<u16>) -> bool {
    matches!(status, None | Some(502..=504))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
