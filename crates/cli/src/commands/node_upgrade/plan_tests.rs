use serde_json::json;

use super::*;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccccccccccc";

/// Node `id` named `name` with Raft id `raft`, in `state`, its store `store` (null: not
/// reported yet).
fn node(id: &str, name: &str, raft: u64, state: &str, store: serde_json::Value) -> NodeInfo {
    serde_json::from_value(json!({
        "id": id, "name": name, "raft_id": raft, "address": format!("10.0.0.{raft}:7400"),
        "state": state, "metrics": null, "storage": store,
    }))
    .unwrap()
}

fn ok_store() -> serde_json::Value {
    json!({"state": "ok", "checked_ms": 1})
}

fn three(states: [&str; 3]) -> Vec<NodeInfo> {
    [(A, "node1"), (B, "node2"), (C, "node3")]
        .iter()
        .zip(states)
        .enumerate()
        .map(|(i, ((id, name), st))| node(id, name, i as u64 + 1, st, ok_store()))
        .collect()
}

fn cluster(voters: &[u64], leader: Option<u64>) -> ClusterStatus {
    serde_json::from_value(json!({
        "cluster_id": "c", "leader": leader, "term": 3, "voters": voters,
        "members": [], "answered_by": A,
    }))
    .unwrap()
}

/// A 3-copy volume whose copies on node1..3 are in `states` (`joining` marks one).
fn volume(name: &str, states: [(&str, &str, bool); 3]) -> VolumeView {
    let copies: Vec<_> = states
        .iter()
        .map(|(node, st, joining)| json!({"node": node, "state": st, "joining": joining}))
        .collect();
    serde_json::from_value(json!({
        "name": name, "node": A, "size_bytes": 4096, "state": "ready", "origin": null,
        "nbd": null, "created_ms": 1, "replicas": 3, "generation": 2, "copies": copies,
        "snapshots": [], "attached_to": null,
        "replication": {"replicas": 3, "primary": A, "generation": 2, "copies": copies},
    }))
    .unwrap()
}

/// `readiness` of `target` on this view of the cluster.
fn judge(target: &str, nodes: &[NodeInfo], c: &ClusterStatus, volumes: &[VolumeView]) -> Readiness {
    readiness(
        target,
        &View {
            nodes,
            cluster: c,
            volumes,
        },
    )
}

fn ready(r: &Readiness) -> bool {
    matches!(r, Readiness::Ready { note: None })
}

fn waits_for(r: &Readiness, words: &str) -> bool {
    matches!(r, Readiness::Wait(why) if why.contains(words))
}

#[test]
fn a_node_named_twice_is_refused_before_anything_is_sent() {
    let ids = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(g, i)| (g.to_string(), i.to_string()))
            .collect()
    };
    assert_eq!(
        check_order(&ids(&[("node1", A), ("node2", B), ("node3", C)])),
        Ok(())
    );
    assert_eq!(
        check_order(&ids(&[("node1", A), ("node2", B), ("node1", A)])).unwrap_err(),
        "node1 is named twice: each node is upgraded once; nothing sent"
    );
    let by_id = check_order(&ids(&[("node2", B), (B, B)])).unwrap_err();
    assert!(
        by_id.starts_with(&format!("node2 and {B} are the same node")),
        "{by_id}"
    );
}

#[test]
fn a_whole_cluster_lets_the_next_node_go() {
    let nodes = three(["up", "up", "up"]);
    let c = cluster(&[1, 2, 3], Some(1));
    let vols = [volume(
        "v",
        [
            (A, "in_sync", false),
            (B, "in_sync", false),
            (C, "in_sync", false),
        ],
    )];
    for t in [A, B, C] {
        assert!(
            ready(&judge(t, &nodes, &c, &vols)),
            "{t}: {:?}",
            judge(t, &nodes, &c, &vols)
        );
    }
}

#[test]
fn never_the_last_quorum_member_while_another_node_is_down() {
    // node3 is down: node1 and node2 are the quorum; neither may go.
    let nodes = three(["up", "up", "down"]);
    let c = cluster(&[1, 2, 3], Some(1));
    let r = judge(A, &nodes, &c, &[]);
    assert_eq!(
        r,
        Readiness::Wait(
            "node3 is down: taking node1 down now would leave the cluster without quorum \
             (1 of 3 voters up, 2 needed)"
                .into()
        )
    );
    // A five-node cluster keeps its quorum without one more, but still waits to be whole.
    let mut five = three(["up", "up", "suspect"]);
    five.push(node("d", "node4", 4, "up", ok_store()));
    five.push(node("e", "node5", 5, "up", ok_store()));
    let c5 = cluster(&[1, 2, 3, 4, 5], Some(1));
    assert_eq!(
        judge(A, &five, &c5, &[]),
        Readiness::Wait("node3 is suspect: node1 waits until the cluster is whole".into())
    );
}

#[test]
fn the_previous_node_must_be_back_and_caught_up_first() {
    // node1 just came back: no leader yet, then its store not reported healthy, then
    // its copy of a volume still catching up, then joining: node2 waits through all.
    let nodes = three(["up", "up", "up"]);
    let none = cluster(&[1, 2, 3], None);
    assert!(waits_for(&judge(B, &nodes, &none, &[]), "no Raft leader"));
    let c = cluster(&[1, 2, 3], Some(2));
    let mut sick = three(["up", "up", "up"]);
    sick[0].storage = serde_json::from_value(
        json!({"state": "unreachable", "reason": "admin socket: refused", "checked_ms": 2}),
    )
    .unwrap();
    assert_eq!(
        judge(B, &sick, &c, &[]),
        Readiness::Wait("node1's store is unreachable: admin socket: refused".into())
    );
    for (state, joining, words) in [
        (
            "out_of_sync",
            false,
            "volume v: its copy on node1 is out of sync",
        ),
        (
            "catching_up",
            false,
            "volume v: its copy on node1 is catching up",
        ),
        (
            "in_sync",
            true,
            "volume v: its copy on node1 is joining the in-sync set",
        ),
    ] {
        let vols = [volume(
            "v",
            [
                (A, state, joining),
                (B, "in_sync", false),
                (C, "in_sync", false),
            ],
        )];
        assert_eq!(judge(B, &nodes, &c, &vols), Readiness::Wait(words.into()));
    }
    // The node itself not up (it has not re-registered yet) waits too.
    let nodes = three(["up", "suspect", "up"]);
    assert!(waits_for(&judge(B, &nodes, &c, &[]), "node2 is suspect"));
}

#[test]
fn an_unknown_node_stops_and_a_small_cluster_is_warned() {
    let nodes = three(["up", "up", "up"]);
    let c = cluster(&[1, 2, 3], Some(1));
    assert!(matches!(judge("nope", &nodes, &c, &[]), Readiness::Stop(_)));
    // One node, or two: whole, but without quorum while it reboots; allowed, with a note.
    let one = vec![node(A, "node1", 1, "up", serde_json::Value::Null)];
    let c1 = cluster(&[1], Some(1));
    assert!(matches!(
        judge(A, &one, &c1, &[]),
        Readiness::Ready { note: Some(n) } if n.contains("no quorum while node1 reboots")
    ));
}

#[test]
fn a_node_not_ready_or_not_answering_is_asked_again_and_a_refusal_stops() {
    // No answer (rebooting, connection reset) and "not ready" (503 no leader reachable,
    // a proxy's 502/504) are waited out.
    for status in [None, Some(502), Some(503), Some(504)] {
        assert!(ask_again(status), "{status:?}");
    }
    // Refusals and internal errors stop the run: asking again would not change them.
    for status in [400, 401, 403, 404, 409, 500, 501] {
        assert!(!ask_again(Some(status)), "{status}");
    }
}
