//! The formation rules under simulated networks: random start orders, simultaneous
//! starts, lost messages, restarts mid-way, late nodes. Always exactly one bootstrap, one
//! cluster, and every node in it or joining it.

use proptest::prelude::*;
use tessera_cluster::discovery::Announce;
use tessera_cluster::formation::{Action, Formation, Formed};
use tessera_cluster::identity::NodeId;

struct Node {
    id: NodeId,
    start_ms: u64,
    restart_ms: Option<u64>,
    persisted: Option<Formed>,
    f: Option<Formation>,
    seq: u64,
}

#[derive(Debug, Clone)]
struct Scenario {
    nodes: usize,
    expected: usize,
    starts: Vec<u64>,
    restarts: Vec<Option<u64>>,
    loss_percent: u32,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (3usize..=6).prop_flat_map(|n| {
        (
            Just(n),
            2usize..=n,
            proptest::collection::vec(prop_oneof![Just(0u64), 0u64..5_000], n),
            proptest::collection::vec(proptest::option::weighted(0.2, 0u64..8_000), n),
            0u32..40,
            any::<u64>(),
        )
            .prop_map(
                |(nodes, expected, starts, restarts, loss_percent, seed)| Scenario {
                    nodes,
                    expected,
                    starts,
                    restarts,
                    loss_percent,
                    seed,
                },
            )
    })
}

/// Runs 30 simulated seconds in 100 ms rounds; returns bootstraps and final states.
fn simulate(s: &Scenario) -> (Vec<Formed>, Vec<Option<Formed>>, Vec<Action>) {
    let mut rng = s.seed;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut nodes: Vec<Node> = (0..s.nodes)
        .map(|i| Node {
            id: NodeId(format!(
                "{:032x}",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ s.seed
            )),
            start_ms: s.starts[i],
            restart_ms: s.restarts[i],
            persisted: None,
            f: None,
            seq: 0,
        })
        .collect();
    let mut bootstraps = Vec::new();
    let mut last_actions = vec![Action::Wait; s.nodes];
    for round in 0..300u64 {
        let now = round * 100;
        for n in nodes.iter_mut() {
            if n.f.is_none() && now >= n.start_ms {
                n.f = Some(Formation::new(
                    "lab",
                    n.id.clone(),
                    s.expected,
                    1_000,
                    now,
                    n.persisted.clone(),
                ));
            }
            if n.restart_ms.is_some_and(|r| now >= r + n.start_ms) {
                // Crash and restart: only what was persisted survives.
                n.restart_ms = None;
                n.f = Some(Formation::new(
                    "lab",
                    n.id.clone(),
                    s.expected,
                    1_000,
                    now,
                    n.persisted.clone(),
                ));
            }
        }
        let announces: Vec<(usize, Announce)> = nodes
            .iter_mut()
            .enumerate()
            .filter_map(|(i, n)| {
                let f = n.f.as_ref()?;
                n.seq += 1;
                Some((
                    i,
                    Announce {
                        cluster: "lab".into(),
                        node_id: n.id.clone(),
                        addr: std::net::SocketAddr::from(([10, 77, 0, (i + 1) as u8], 7946)),
                        incarnation: 1,
                        seq: n.seq,
                        sent_ms: now,
                        proposal: f.proposal(now),
                        formed: f.formed().cloned(),
                    },
                ))
            })
            .collect();
        for (from, a) in &announces {
            for (to, n) in nodes.iter_mut().enumerate() {
                if to == *from || (rand() % 100) < u64::from(s.loss_percent) {
                    continue;
                }
                if let Some(f) = n.f.as_mut() {
                    f.heard(a, now);
                }
            }
        }
        for (i, n) in nodes.iter_mut().enumerate() {
            let Some(f) = n.f.as_mut() else { continue };
            let act = f.decide(now);
            match &act {
                Action::Bootstrap(formed) => {
                    n.persisted = Some(formed.clone());
                    bootstraps.push(formed.clone());
                }
                Action::Adopt(formed) => n.persisted = Some(formed.clone()),
                _ => {}
            }
            if act != Action::Wait {
                last_actions[i] = act;
            }
        }
    }
    let finals = nodes.iter().map(|n| n.persisted.clone()).collect();
    (bootstraps, finals, last_actions)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]
    #[test]
    fn exactly_one_bootstrap_and_everyone_ends_in_that_cluster(s in scenario()) {
        let (bootstraps, finals, actions) = simulate(&s);
        prop_assert_eq!(bootstraps.len(), 1, "bootstraps: {:?}", bootstraps);
        let cluster = &bootstraps[0];
        prop_assert_eq!(cluster.members.len(), s.expected);
        let mut founders = 0;
        for (i, f) in finals.iter().enumerate() {
            match f {
                Some(f) => {
                    prop_assert_eq!(f, cluster);
                    founders += 1;
                }
                None => {
                    let joining = matches!(&actions[i], Action::Join { cluster_id, .. } if *cluster_id == cluster.cluster_id);
                    prop_assert!(joining, "node {} neither formed nor joining: {:?}", i, actions[i]);
                }
            }
        }
        prop_assert_eq!(founders, s.expected);
    }
}

#[test]
fn three_nodes_started_together_form_one_cluster_led_by_the_smallest_id() {
    let s = Scenario {
        nodes: 3,
        expected: 3,
        starts: vec![0, 0, 0],
        restarts: vec![None; 3],
        loss_percent: 0,
        seed: 42,
    };
    let (bootstraps, finals, _) = simulate(&s);
    assert_eq!(bootstraps.len(), 1);
    assert!(finals.iter().all(|f| f.as_ref() == Some(&bootstraps[0])));
    let mut ids = bootstraps[0].members.clone();
    ids.sort();
    assert_eq!(ids, bootstraps[0].members);
}

#[test]
fn a_restarted_founder_never_bootstraps_twice() {
    let me = NodeId("00".into());
    let formed = Formed {
        cluster_id: "c".into(),
        members: vec![me.clone(), NodeId("01".into())],
        salt: None,
    };
    let mut f = Formation::new("lab", me, 2, 1_000, 0, Some(formed));
    assert_eq!(f.decide(10_000), Action::Wait);
    assert!(f.proposal(10_000).is_empty());
}
