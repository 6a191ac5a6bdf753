//! A running leader can be removed from the membership: it keeps leading until the change
//! is committed, steps down, and the remaining members elect a leader among themselves and
//! take writes. Before, the leader refused ("cannot remove itself") and, as nothing made it
//! give up the leadership, a live leader could never be removed (`DELETE /nodes/{id}` of
//! the leading node answered 409 for as long as it ran).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_state::Node;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_removed_through_a_follower_steps_down_and_the_rest_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let nodes = start_plain(dir.path(), &addrs).await;
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let (gone, rest): (Vec<&Node>, Vec<&Node>) = nodes.iter().partition(|n| n.id == leader);
    assert!(rest.iter().all(|n| n.is_member(leader)));

    rest[0].remove_member(leader).await.unwrap();

    // The two others agree on a new leader among themselves, and no longer count the old
    // one as a member.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_leader = loop {
        let l = wait_leader(&rest).await;
        if l != leader && rest.iter().all(|n| !n.is_member(leader)) {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "{leader} still leads or is a member"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(rest.iter().any(|n| n.id == new_leader));
    let voters: Vec<u64> = rest[0]
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters.len(), 2, "{voters:?}");
    assert!(!voters.contains(&leader), "{voters:?}");

    // The two left commit writes (a majority of two is both of them).
    rest[1].write(put("after", json!(1))).await.unwrap();
    for n in &rest {
        wait_value(n, "after", json!(1)).await;
    }
    // The removed leader is no longer leading.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gone[0].raft.metrics().borrow().state.is_leader() {
        assert!(
            Instant::now() < deadline,
            "the removed node still thinks it leads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Asking again names why not, through whichever node is asked.
    assert!(rest[0].remove_member(leader).await.is_err());
    for n in nodes {
        n.shutdown().await;
    }
}
