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
    // The API names the leader and members by Raft id; people know nodes by name.
    let raft_name = |raft: u64| {
        names
            .by_raft_id(raft)
            .map_or_else(|| format!("raft id {raft}"), |n| n.name.clone())
    };
    out.show(CLUSTER, &v, |c: ClusterStatus| {
        println!("cluster:  {}", c.cluster_id.as_deref().unwrap_or("-"));
        println!(
            "leader:   {}",
            c.leader.map_or_else(|| "none elected".into(), raft_name)
        );
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
