//! The cluster: its leader (by node name), term and members.

use tessera_api::{ClusterStatus, Member};

use crate::client::Client;
use crate::endpoints::CLUSTER;
use crate::node_names::NodeNames;
use crate::output::{col, table, wide_col, Output};

pub fn status(client: &Client, out: Output) -> anyhow::Result<()> {
    let v = client.call(CLUSTER, &[], None)?;
    if out.is_json() {
        out.print(&v, |_| {});
        return Ok(());
    }
    let names = NodeNames::fetch(client)?;
    // Members are given by Raft id; `GET /nodes` says which node has which.
    let raft_name = |raft: u64| {
        names
            .by_raft_id(raft)
            .map_or_else(|| format!("raft id {raft}"), |n| n.name.clone())
    };
    out.show(CLUSTER, &v, |c: ClusterStatus| {
        println!("cluster:  {}", c.cluster_id.as_deref().unwrap_or("-"));
        println!("leader:   {}", leader(&c));
        println!("term:     {}", c.term);
        println!("voters:   {}", c.voters.len());
        println!("answered: {}", names.name(&c.answered_by));
        if out.wide() {
            println!();
            table(
                &c.members,
                &[
                    col("NAME", |m: &Member| raft_name(m.raft_id)),
                    col("RAFT ADDRESS", |m: &Member| m.address.clone()),
                    col("VOTER", |m: &Member| m.voter.to_string()),
                    wide_col("RAFT ID", |m: &Member| m.raft_id.to_string()),
                    wide_col("ID", |m: &Member| {
                        names
                            .by_raft_id(m.raft_id)
                            .map_or_else(|| "-".to_string(), |n| n.id.clone())
                    }),
                ],
                true,
            );
        }
    })
}

/// The leader by its node name; by its id when it registered without a name, by its Raft
/// id while it has not registered yet.
fn leader(c: &ClusterStatus) -> String {
    match (&c.leader_name, &c.leader_node, c.leader) {
        (Some(name), _, _) => name.clone(),
        (None, Some(id), _) => id.clone(),
        (None, None, Some(raft)) => format!("raft id {raft}"),
        (None, None, None) => "none elected".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(leader: Option<u64>, node: Option<&str>, name: Option<&str>) -> ClusterStatus {
        ClusterStatus {
            cluster_id: None,
            leader,
            leader_node: node.map(String::from),
            leader_name: name.map(String::from),
            term: 1,
            voters: vec![],
            members: vec![],
            answered_by: String::new(),
            vms: Default::default(),
        }
    }

    #[test]
    fn the_leader_goes_by_its_name_else_its_id() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(leader(&status(Some(1), Some(id), Some("node1"))), "node1");
        assert_eq!(leader(&status(Some(1), Some(id), None)), id);
        assert_eq!(leader(&status(Some(1), None, None)), "raft id 1");
        assert_eq!(leader(&status(None, None, None)), "none elected");
    }
}
