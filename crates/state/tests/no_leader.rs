//! A write or a read barrier asked while no leader is known (an election under way) waits
//! for one and is answered; without a quorum it fails once the wait is over, saying that
//! nothing was applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_state::{BarrierError, Node, StateError, LEADER_WAIT};

use crate::common::*;

/// Waits until `n` knows no leader (its election timeout passed with no quorum).
async fn wait_no_leader(n: &Node) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.raft.metrics().borrow().current_leader.is_some() {
        assert!(
            Instant::now() < deadline,
            "node {} still names a leader",
            n.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_barriers_wait_out_an_election_and_fail_only_without_a_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = start_plain(dir.path(), &addrs).await;
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    nodes[0].write(put("warm", json!(1))).await.unwrap();

    // The leader and one follower stop: the member left has no quorum.
    let keep = nodes.iter().position(|n| n.id != leader).unwrap();
    let survivor = nodes.remove(keep);
    let stopped: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    for n in nodes {
        n.shutdown().await;
    }
    wait_no_leader(&survivor).await;

    // No leader comes: both fail, after waiting for one, and the write says nothing left
    // this node (the API's outcome `not_applied`).
    let t = Instant::now();
    let e = survivor.write(put("alone", json!(1))).await.unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(e, StateError::NoLeader(_)), "{e:?}");
    assert!(
        waited >= LEADER_WAIT - Duration::from_millis(300) && waited < LEADER_WAIT * 2,
        "a write without a leader failed after {waited:?}, not after waiting {LEADER_WAIT:?}"
    );
    let t = Instant::now();
    let e = survivor.sync().await.unwrap_err();
    let waited = t.elapsed();
    assert!(
        matches!(e, StateError::Barrier(BarrierError::Leader(_))),
        "{e:?}"
    );
    assert!(
        waited >= LEADER_WAIT - Duration::from_millis(300) && waited < LEADER_WAIT * 2,
        "a barrier without a leader failed after {waited:?}, not after waiting {LEADER_WAIT:?}"
    );
    assert_eq!(
        survivor
            .state
            .read(|t| t.get("nodes").and_then(|t| t.get("alone")).cloned()),
        None
    );

    // Asked while no leader is known, and a member back a moment later: a leader is
    // elected within the wait, and both are answered (they were refused at once before).
    wait_no_leader(&survivor).await;
    let back = stopped[0];
    let t = Instant::now();
    let (written, synced, restarted) = tokio::join!(
        survivor.write(put("waited", json!("for a leader"))),
        survivor.sync(),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Node::start(
                back,
                addrs[&back],
                &dir.path().join(format!("n{back}")),
                None,
                None,
            )
            .await
            .unwrap()
        }
    );
    eprintln!("answered {:?} after they were asked", t.elapsed());
    let applied = written.expect("the write waited for the new leader");
    assert_eq!(applied.conflict, None);
    synced.expect("the barrier waited for the new leader");
    wait_value(&survivor, "waited", json!("for a leader")).await;
    wait_value(&restarted, "waited", json!("for a leader")).await;
    survivor.shutdown().await;
    restarted.shutdown().await;
}
