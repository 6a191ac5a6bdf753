//! A write whose leader stops under it: the follower that sent it sends it again to the
//! new leader, and it is applied once (`tessera_state::once`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde_json::json;
use tessera_state::{Command, Node, Require};

use crate::common::*;

fn ids(n: &Node) -> usize {
    n.state.read(tessera_state::once::count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_write_sent_as_its_leader_stops_is_applied_once_by_the_next_leader() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = start_plain(dir.path(), &addrs).await;
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;

    // A write through a follower carries its id: one id recorded per write.
    let f = nodes.iter().find(|n| n.id != leader).unwrap();
    f.write(put("warm", json!(1))).await.unwrap();
    assert_eq!(ids(f), 1);

    // The leader stops; right after, before the follower notices (its election timeout
    // is 0.5-1 s), it forwards a create there: refused connection, no answer. Before
    // writes carried ids this was the caller's "outcome unknown"; now it is sent again
    // until the new leader takes it.
    let pos = nodes.iter().position(|n| n.id == leader).unwrap();
    let old = nodes.remove(pos);
    let stopping = Instant::now();
    old.shutdown().await;
    eprintln!("the leader stopped in {:?}", stopping.elapsed());
    let f = &nodes[0];
    let named = f.raft.metrics().borrow().current_leader;
    assert_eq!(
        named,
        Some(leader),
        "the follower noticed the leader's stop before the write: the case is not exercised"
    );
    let t = Instant::now();
    let create = Command::Txn {
        require: vec![Require::absent("nodes", "c")],
        ops: vec![put("c", json!("once"))],
    };
    let applied = f
        .write(create)
        .await
        .expect("sent again until a new leader took it");
    assert_eq!(applied.conflict, None, "the create's own requirement held");
    let new_leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    assert_ne!(new_leader, leader);
    for n in &nodes {
        wait_value(n, "c", json!("once")).await;
    }
    eprintln!("the write took {:?} across the election", t.elapsed());
    assert_eq!(ids(f), 2, "one id per write, however often sent");

    // The same create, as a new write, is the second one: refused by its requirement.
    let again = Command::Txn {
        require: vec![Require::absent("nodes", "c")],
        ops: vec![put("c", json!("twice"))],
    };
    let refused = f.write(again).await.unwrap();
    assert_eq!(
        refused.conflict.map(|r| r.key),
        Some("c".to_string()),
        "a new write is not taken for the old one"
    );
    for n in nodes {
        n.shutdown().await;
    }
}
