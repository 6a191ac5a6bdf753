//! Three Raft members on loopback: they elect a leader, replicate writes to every state
//! machine, survive losing the leader, and a restarted member catches up from its own
//! durable log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_state::network::{self, AuthError, EnrollRequest, Tls};
use tessera_state::{Command, MembershipError, Node, StateError, TransportError};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_survive_the_leader_and_catch_up_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    let mut nodes = start_plain(dir.path(), &addrs).await;
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
    let back = Node::start(leader, addrs[&leader], &old_dir, None, None)
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
    let nodes = start_plain(dir.path(), &addrs).await;
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
    let nodes = start_plain(dir.path(), &addrs).await;
    wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    for n in &nodes {
        wait_value(n, "k19", json!(19)).await;
        wait_value(n, "k0", json!(0)).await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}

async fn enrolled_tls(addr: SocketAddr, key: &[u8; 32], id: u64) -> Tls {
    let (creds, ca_pem) = network::enroll(&addr.to_string(), key, id, &[])
        .await
        .unwrap();
    Tls::new(&creds, &ca_pem).unwrap()
}

/// What a caller over TLS without a client certificate gets for one request line.
#[derive(Debug, PartialEq)]
enum Anonymous {
    /// The handshake failed.
    NoHandshake,
    /// The server hung up without answering.
    Closed,
    /// This answer line.
    Answer(String),
}

/// Sends one raw line over TLS without a client certificate. Connecting must work (the
/// node is up); a server that neither answers nor hangs up within 5 s fails the test.
async fn anonymous(addr: SocketAddr, line: &str) -> Anonymous {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let cfg = std::sync::Arc::new(tessera_pki::enrollment_client_config().unwrap());
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("x.tessera").unwrap();
    let Ok(mut s) = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, sock)
        .await
    else {
        return Anonymous::NoHandshake;
    };
    s.write_all(line.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let mut out = String::new();
    let mut r = tokio::io::BufReader::new(s);
    match tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut out)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Anonymous::Closed,
        Ok(Ok(_)) => Anonymous::Answer(out),
        Err(_) => panic!("{addr} neither answered nor hung up"),
    }
}

/// The refusal a peer sent, or a test failure naming what came instead.
fn refusal(r: Result<impl std::fmt::Debug, TransportError>) -> String {
    match r {
        Err(TransportError::Refused { message, .. }) => message,
        other => panic!("expected the peer to refuse, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_enrollment_and_signed_joins() {
    let key = [7u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=3).map(|i| (i, free_addr())).collect();
    // Node 1 mints the CA and certifies itself; 2 and 3 enroll with it.
    let ca = tessera_pki::ClusterCa::mint("test").unwrap();
    let n1 = Node::start(
        1,
        addrs[&1],
        &dir.path().join("n1"),
        Some(key),
        Some(own_tls(&ca, 1)),
    )
    .await
    .unwrap();
    n1.set_ca(ca.clone());
    // The wrong key is refused by a live node saying why; the right key, at the same
    // address, is served right after.
    let wrong = network::enroll(&addrs[&1].to_string(), &[9u8; 32], 2, &[]).await;
    assert_eq!(
        refusal(wrong.map(|_| ())),
        AuthError::Forged("enrollment").to_string()
    );
    let mut nodes = vec![n1];
    for id in [2u64, 3] {
        let tls = enrolled_tls(addrs[&1], &key, id).await;
        nodes.push(
            Node::start(
                id,
                addrs[&id],
                &dir.path().join(format!("n{id}")),
                Some(key),
                Some(tls),
            )
            .await
            .unwrap(),
        );
    }
    nodes[0].initialize(addrs.clone()).await.unwrap();
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let l = nodes.iter().find(|n| n.id == leader).unwrap();
    // The CA record first: once a member has "x", it has the CA too.
    l.write(Command::Put {
        table: "pki".into(),
        key: "ca".into(),
        value: json!({ "cert_pem": ca.cert_pem, "key_pem": ca.key_pem }),
    })
    .await
    .unwrap();
    l.write(put("x", json!(1))).await.unwrap();
    for n in &nodes {
        wait_value(n, "x", json!(1)).await;
    }

    // A member that registered (ran with its certificate) cannot get a second one with
    // the join key alone: that needs an operator.
    l.write(Command::Put {
        table: "nodes".into(),
        key: "node-two".into(),
        value: json!({ "raft_id": 2 }),
    })
    .await
    .unwrap();
    for n in &nodes {
        wait_value_in(n, "nodes", "node-two", json!({ "raft_id": 2 })).await;
    }
    let again = network::enroll(&addrs[&1].to_string(), &key, 2, &[]).await;
    let why = refusal(again.map(|_| ()));
    assert!(why.contains("running member"), "{why}");
    let (fid, faddr) = addrs
        .iter()
        .find(|(id, _)| **id != leader)
        .map(|(i, a)| (*i, *a))
        .unwrap();
    // The same anonymous caller is answered when it enrolls (here with a forged request,
    // so it is told why not): the silence above is a refusal, not a dead node.
    assert_eq!(
        anonymous(faddr, "{\"rpc\":\"read_index\",\"body\":null}\n").await,
        Anonymous::Closed
    );
    let forged_enroll = json!({
        "rpc": "enroll",
        "body": EnrollRequest::new(&[9u8; 32], 9, "csr".into(), &[], now_ms()),
    });
    assert_eq!(
        anonymous(faddr, &format!("{forged_enroll}\n")).await,
        Anonymous::Answer(format!(
            "{}\n",
            json!({ "Err": AuthError::Forged("enrollment").to_string() })
        ))
    );
    // Plain TCP is not TLS: the server hangs up (within the time, so it is alive) without
    // a JSON answer.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(faddr).await.unwrap();
        s.write_all(b"{\"rpc\":\"read_index\",\"body\":null}\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("the server neither answered nor hung up")
            .ok();
        assert!(!buf.contains(&b'{'), "{buf:?}");
    }

    // A fourth node enrolls through a follower (which has the CA from the state), and
    // joins with a signed request; a forged one is refused.
    let addr4 = free_addr();
    let tls4 = enrolled_tls(faddr, &key, 4).await;
    let n4 = Node::start(4, addr4, &dir.path().join("n4"), Some(key), Some(tls4))
        .await
        .unwrap();
    let forged = n4
        .transport
        .request_join(fid, &faddr.to_string(), &[9u8; 32], 4, &addr4.to_string())
        .await;
    assert_eq!(refusal(forged), AuthError::Forged("join").to_string());
    // Its certificate speaks for node 4 only: asking to add node 5, even with the right
    // key, is turned away.
    let other_id = n4
        .transport
        .request_join(fid, &faddr.to_string(), &key, 5, &addr4.to_string())
        .await;
    assert!(
        matches!(other_id, Err(TransportError::Hangup { .. })),
        "a join for another node's id was not turned away: {other_id:?}"
    );
    n4.transport
        .request_join(fid, &faddr.to_string(), &key, 4, &addr4.to_string())
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

    // Removed (through a follower), its certificate no longer opens any door.
    let follower = nodes.iter().find(|n| n.id == fid).unwrap();
    follower.remove_member(4).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[0]
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&4)
        .is_some()
    {
        assert!(Instant::now() < deadline, "node 4 is still a member");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader hangs up on the removed node's forwarded write, and takes the same
    // write from a member right after: the refusal is about who asks.
    let leader = wait_leader(&nodes.iter().collect::<Vec<_>>()).await;
    let leader_addr = addrs[&leader].to_string();
    let refused = n4
        .transport
        .forward_write(
            leader,
            &leader_addr,
            put("late", json!(1)),
            Duration::from_secs(5),
        )
        .await;
    // A hang-up after the whole write went out on a connection kept from before the
    // removal is `Unanswered` (the transport cannot know it was not applied, so it does
    // not send it again); on a new connection, `Hangup`.
    assert!(
        matches!(
            refused,
            Err(TransportError::Hangup { .. } | TransportError::Unanswered { .. })
        ),
        "a removed node's write was not turned away: {refused:?}"
    );
    follower
        .transport
        .forward_write(
            leader,
            &leader_addr,
            put("late", json!(2)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    for n in &nodes {
        wait_value(n, "late", json!(2)).await;
    }
    // Recorded as removed (what `DELETE /nodes/{id}` writes), node 4 can neither join
    // again with its old certificate nor enroll for a new one.
    follower
        .write(Command::Put {
            table: network::admission::REMOVED_NODES.into(),
            key: network::cert_name(4),
            value: json!({ "node": "node-four" }),
        })
        .await
        .unwrap();
    for n in &nodes {
        wait_value_in(
            n,
            network::admission::REMOVED_NODES,
            &network::cert_name(4),
            json!({ "node": "node-four" }),
        )
        .await;
    }
    let rejoin = n4
        .transport
        .request_join(fid, &faddr.to_string(), &key, 4, &addr4.to_string())
        .await;
    let why = refusal(rejoin);
    assert!(why.contains("was removed"), "{why}");
    let reenroll = network::enroll(&faddr.to_string(), &key, 4, &[]).await;
    let why = refusal(reenroll.map(|_| ()));
    assert!(why.contains("was removed"), "{why}");
    // Removing it again (the same path that just removed it) names why not.
    match follower.remove_member(4).await {
        Err(StateError::Membership(MembershipError::NotMember(4))) => {}
        Err(StateError::Membership(MembershipError::AskingLeader(TransportError::Refused {
            message,
            ..
        }))) => assert_eq!(message, "4 is not a member"),
        other => panic!("removing a non-member: {other:?}"),
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
    let nodes = start_plain(dir.path(), &addrs).await;
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

/// Sends `line` over TLS without a client certificate (as an enrolling node does) and
/// returns the answer line, or `None` when the server closed the connection instead.
async fn anonymous_exchange(addr: SocketAddr, line: &[u8]) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let cfg = std::sync::Arc::new(tessera_pki::enrollment_client_config().unwrap());
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("node-1.node.tessera").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, sock)
        .await
        .unwrap();
    // The server may hang up while we are still writing: that is an answer too.
    if tls.write_all(line).await.is_err() || tls.flush().await.is_err() {
        return None;
    }
    let mut answer = String::new();
    match tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(tls).read_line(&mut answer),
    )
    .await
    {
        Ok(Ok(n)) if n > 0 => Some(answer),
        Ok(_) => None,
        Err(_) => panic!("the server neither answered nor hung up within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_caller_may_send_only_a_small_frame() {
    let ca = tessera_pki::ClusterCa::mint("test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let n1 = Node::start(1, addr, dir.path(), Some([7u8; 32]), Some(own_tls(&ca, 1)))
        .await
        .unwrap();
    let request = |csr: &str| {
        let mut l = serde_json::to_vec(&json!({ "rpc": "enroll", "body": {
            "id": 2, "csr_pem": csr, "ips": [], "sent_ms": 0, "mac": "00" } }))
        .unwrap();
        l.push(b'\n');
        l
    };
    // A small enrollment (badly signed) is read and answered with the refusal.
    let small = anonymous_exchange(addr, &request("tiny")).await;
    assert!(
        small.as_deref().is_some_and(|a| a.contains("enrollment")),
        "a small anonymous request was not answered: {small:?}"
    );
    // The same request grown to 1 MiB is cut off unread, without an answer.
    let big = anonymous_exchange(addr, &request(&"x".repeat(1 << 20))).await;
    assert!(
        big.is_none(),
        "a 1 MiB anonymous frame was read and answered: {big:?}"
    );
    // And the port still serves.
    let again = anonymous_exchange(addr, &request("tiny")).await;
    assert!(again.is_some(), "the port stopped answering");
    drop(n1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_capped_and_members_still_get_in() {
    use tokio::io::AsyncReadExt;
    let ca = tessera_pki::ClusterCa::mint("test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let n1 = Node::start(1, addr, dir.path(), Some([7u8; 32]), Some(own_tls(&ca, 1)))
        .await
        .unwrap();
    n1.initialize(BTreeMap::from([(1, addr)])).await.unwrap();
    wait_leader(&[&n1]).await;
    // Fill every anonymous slot with connections that finished their handshake and sit.
    let cfg = std::sync::Arc::new(tessera_pki::enrollment_client_config().unwrap());
    let mut held = Vec::new();
    for _ in 0..network::admission::MAX_ANONYMOUS_CONNECTIONS {
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("x.tessera").unwrap();
        held.push(
            tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, sock)
                .await
                .unwrap(),
        );
    }
    // Let the server take its slots for them (each after its handshake).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forged_enroll = format!(
        "{}\n",
        json!({
            "rpc": "enroll",
            "body": EnrollRequest::new(&[9u8; 32], 9, "csr".into(), &[], now_ms()),
        })
    );
    // One more is closed at once, unanswered.
    let t = Instant::now();
    assert_eq!(anonymous(addr, &forged_enroll).await, Anonymous::Closed);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the connection over the cap was not closed at once: {:?}",
        t.elapsed()
    );
    // A member (with its certificate) is not held back by them.
    let member = network::Transport::new(Some(own_tls(&ca, 1)));
    member
        .forward_write(
            1,
            &addr.to_string(),
            put("member", json!(1)),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    // The held connections are still open (the server did not drop them to make room)...
    let mut probe = [0u8; 1];
    let still_open =
        tokio::time::timeout(Duration::from_millis(200), held[0].read(&mut probe)).await;
    assert!(
        still_open.is_err(),
        "a held anonymous connection was closed: {still_open:?}"
    );
    // ... and once one ends, an enrolling caller is answered again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(anonymous(addr, &forged_enroll).await, Anonymous::Answer(a) if a.contains("enrollment")),
        "no anonymous slot came free"
    );
    drop(held);
    n1.shutdown().await;
}
