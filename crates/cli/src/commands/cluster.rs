//! The cluster: its leader (by node name), term and members.

use serde_json::Value;

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
    // The API names the leader by its Raft id; people know it by the node's name.
    let raft_name = |raft: &Value| match raft.as_u64() {
        None => "none elected".to_string(),
        Some(r) => names
            .by_raft_id(r)
            .map_or_else(|| format!("raft id {r}"), |n| n.name.clone()),
    };
    let voters = v["voters"].as_array().map_or(0, Vec::len);
    println!("cluster:  {}", v["cluster_id"].as_str().unwrap_or("-"));
    println!("leader:   {}", raft_name(&v["leader"]));
    println!("term:     {}", v["term"]);
    println!("voters:   {voters}");
    println!("answered: {}", names.name_of(&v["answered_by"]));
    if out.wide() {
        let members = v["members"].as_array().cloned().unwrap_or_default();
        println!();
        table(
            &members,
            &[
                col("NAME", |m: &Value| raft_name(&m["raft_id"])),
                col("RAFT ADDRESS", |m: &Value| {
                    m["address"].as_str().unwrap_or("-").to_string()
                }),
                col("VOTER", |m: &Value| m["voter"].to_string()),
                wide_col("RAFT ID", |m: &Value| m["raft_id"].to_string()),
                wide_col("ID", |m: &Value| {
                    m["raft_id"]
                        .as_u64()
                        .and_then(|r| names.by_raft_id(r))
                        .map_or_else(|| "-".to_string(), |n| n.id.clone())
                }),
            ],
            true,
        );
    }
    Ok(())
}
