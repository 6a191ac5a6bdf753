//! Three Raft members on loopback: they elect a leader, replicate writes to every state
//! machine, survive losing the leader, and a restarted member catches up from its own
//! durable log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_state::{Command, Node};

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn wait_leader(nodes: &[&Node]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<Option<u64>> = nodes
            .iter()
            .map(|n| n.raft.metrics().borrow().current_leader)
            .collect();
        if let Some(Some(l)) = leaders.first() {
            if leaders.iter().all(|x| *x == Some(*l)) && nodes.iter().any(|n| n.id == *l) {
                return *l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_value(n: &Node, key: &str, want: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = n
            .state
            .read(|t| t.get("nodes").and_then(|t| t.get(key)).cloned());
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never got {key}={want} (has {got:?})",
            n.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn put(key: &str, v: serde_json::Value) -> Command {
    Command::Put {
        table: "nodes".into(),
        key: key.into(),
        value: v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_survive_the_leader_and_catch_up_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = Vec::new();
    for (id, addr) in &addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.path().join(format!("n{id}")), None)
                .await
                .unwrap(),
        );
    }
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;

    let l = nodes.iter().find(|n| n.id == leader).unwrap();
    let applied = l
        .raft
        .client_write(put("a", json!({"state": "up"})))
        .await
        .unwrap();
    assert!(!applied.data.existed);
    for n in &nodes {
        wait_value(n, "a", json!({"state": "up"})).await;
    }

    // Lose the leader: the other two elect a new one and keep taking writes.
    let pos = nodes.iter().position(|n| n.id == leader).unwrap();
    let old = nodes.remove(pos);
    let old_dir = dir.path().join(format!("n{}", old.id));
    old.shutdown().await;
    let new_leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    assert_ne!(new_leader, leader);
    // A follower's write is forwarded to the new leader.
    let follower = nodes.iter().find(|n| n.id != new_leader).unwrap();
    follower.write(put("b", json!(2))).await.unwrap();
    for n in &nodes {
        wait_value(n, "b", json!(2)).await;
    }

    // The old leader restarts from its own files and catches up.
    let back = Node::start(leader, addrs[&leader], &old_dir, None)
        .await
        .unwrap();
    wait_value(&back, "a", json!({"state": "up"})).await;
    wait_value(&back, "b", json!(2)).await;
    nodes.push(back);
    let l = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let ln = nodes.iter().find(|n| n.id == l).unwrap();
    let r = ln
        .raft
        .client_write(Command::Delete {
            table: "nodes".into(),
            key: "a".into(),
        })
        .await
        .unwrap();
    assert!(r.data.existed);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_every_committed_write() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = Vec::new();
    for (id, addr) in &addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.path().join(format!("n{id}")), None)
                .await
                .unwrap(),
        );
    }
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().find(|n| n.id == leader).unwrap();
    for i in 0..20 {
        l.raft
            .client_write(put(&format!("k{i}"), json!(i)))
            .await
            .unwrap();
    }
    for n in nodes {
        n.shutdown().await;
    }
    let mut nodes = Vec::new();
    for (id, addr) in &addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.path().join(format!("n{id}")), None)
                .await
                .unwrap(),
        );
    }
    wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    for n in &nodes {
        wait_value(n, "k19", json!(19)).await;
        wait_value(n, "k0", json!(0)).await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_join_request_adds_a_voter_and_a_forged_one_is_refused() {
    let key = [7u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = Vec::new();
    for (id, addr) in &addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.path().join(format!("n{id}")), Some(key))
                .await
                .unwrap(),
        );
    }
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    nodes
        .iter()
        .find(|n| n.id == leader)
        .unwrap()
        .raft
        .client_write(put("x", json!(1)))
        .await
        .unwrap();

    let addr4 = free_addr();
    let n4 = Node::start(4, addr4, &dir.path().join("n4"), Some(key))
        .await
        .unwrap();
    let follower = addrs
        .iter()
        .find(|(id, _)| **id != leader)
        .map(|(_, a)| a.to_string())
        .unwrap();
    let forged =
        tessera_state::network::request_join(&follower, &[9u8; 32], 4, &addr4.to_string()).await;
    assert!(
        forged.unwrap_err().contains("authentication"),
        "a join with the wrong key was accepted"
    );
    tessera_state::network::request_join(&follower, &key, 4, &addr4.to_string())
        .await
        .unwrap();
    wait_value(&n4, "x", json!(1)).await;
    let voters: Vec<u64> = nodes[0]
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    n4.write(put("from-4", json!(4))).await.unwrap();
    for n in &nodes {
        wait_value(n, "from-4", json!(4)).await;
    }
    for n in nodes {
        n.shutdown().await;
    }
    n4.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_apply_all_or_nothing_and_followers_read_their_writes() {
    use tessera_state::Require;
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = Vec::new();
    for (id, addr) in &addrs {
        nodes.push(
            Node::start(*id, *addr, &dir.path().join(format!("n{id}")), None)
                .await
                .unwrap(),
        );
    }
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let other = nodes
        .iter()
        .find(|n| n.id != leader && n.id != follower.id)
        .unwrap();
    let txn = |require: Vec<Require>, ops: Vec<Command>| Command::Txn { require, ops };

    // Create-if-absent, through a follower: applied, and visible on that follower as
    // soon as the write returns.
    let a = follower
        .write(txn(
            vec![Require::absent("nodes", "a")],
            vec![put("a", json!(1)), put("b", json!(2))],
        ))
        .await
        .unwrap();
    assert_eq!(a.conflict, None);
    let local = |n: &Node, k: &str| {
        n.state
            .read(|t| t.get("nodes").and_then(|t| t.get(k)).cloned())
    };
    assert_eq!(local(follower, "a"), Some(json!(1)));
    assert_eq!(local(follower, "b"), Some(json!(2)));

    // A failed requirement changes nothing and names itself.
    let a = other
        .write(txn(
            vec![Require::absent("nodes", "a")],
            vec![put("a", json!(9)), put("c", json!(3))],
        ))
        .await
        .unwrap();
    assert_eq!(a.conflict, Some(Require::absent("nodes", "a")));
    other.sync().await.unwrap();
    assert_eq!(local(other, "a"), Some(json!(1)));
    assert_eq!(local(other, "c"), None);

    // Compare-and-swap: only the writer that saw the current value wins.
    let cas = |seen: serde_json::Value, new: serde_json::Value| {
        txn(
            vec![Require::equals("nodes", "a", seen)],
            vec![put("a", new)],
        )
    };
    assert_eq!(
        follower
            .write(cas(json!(1), json!(10)))
            .await
            .unwrap()
            .conflict,
        None
    );
    assert!(other
        .write(cas(json!(1), json!(11)))
        .await
        .unwrap()
        .conflict
        .is_some());
    // The barrier makes a read on a third member see the winner at once.
    other.sync().await.unwrap();
    assert_eq!(local(other, "a"), Some(json!(10)));
    assert_eq!(
        other.read_linearizable("nodes", "a").await.unwrap(),
        Some(json!(10))
    );
    for n in nodes {
        n.shutdown().await;
    }
}
