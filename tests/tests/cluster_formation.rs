//! tesserad nodes on a private LAN (network namespaces on a bridge) find each other by
//! authenticated UDP multicast and form one cluster with no human step; a node with the
//! wrong join secret is never admitted, and both sides log why. Once formed, the nodes are
//! observed and driven through the REST API (curl inside their namespaces): members,
//! leader, health, writes across a leader's death and a full restart, a late fourth node,
//! and mutual TLS between nodes (openssl).

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;
use tessera_tests::cluster::{admin_session_in, api};
use tessera_tests::{bin, Lan};

struct Node {
    i: usize,
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_seed(dir: &Path, i: usize, expected: usize, secret: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let seed = dir.join("seed.toml");
    std::fs::write(
        &seed,
        format!(
            "cluster_name = \"lab\"\njoin_secret = \"{secret}\"\nexpected_nodes = {expected}\n\
             data_dir = \"{}\"\n\n[management]\naddress = \"{}:7946\"\n",
            dir.join("data").display(),
            Lan::addr(i)
        ),
    )
    .unwrap();
    seed
}

fn start(lan: &Lan, i: usize, dir: &Path) -> Node {
    lan.trust_ca_in(&dir.join("data"));
    let log = dir.join("tesserad.log");
    let child = lan
        .command(i, &bin("tesserad"))
        .arg("--seed")
        .arg(dir.join("seed.toml"))
        .env("TESSERA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Node {
        i,
        child,
        dir: dir.to_path_buf(),
        log,
    }
}

/// Starts nodes `range` (all with the right secret, expecting `expected` nodes).
fn start_nodes(
    lan: &Lan,
    root: &Path,
    range: std::ops::Range<usize>,
    expected: usize,
) -> Vec<Node> {
    range
        .map(|i| {
            let dir = root.join(format!("node{i}"));
            write_seed(&dir, i, expected, "correct horse battery staple");
            start(lan, i, &dir)
        })
        .collect()
}

fn formed(n: &Node) -> Option<serde_json::Value> {
    let text = std::fs::read(n.dir.join("data/formed.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn node_id(n: &Node) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(n.dir.join("data/identity.json")).unwrap()).unwrap();
    v["node_id"].as_str().unwrap().to_string()
}

/// Every node's log, separated, for failure messages.
fn all_logs(nodes: &[&Node]) -> String {
    let logs: Vec<String> = nodes
        .iter()
        .map(|n| std::fs::read_to_string(&n.log).unwrap_or_default())
        .collect();
    logs.join("\n----\n")
}

fn wait_all_formed(nodes: &[&Node]) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let f: Vec<_> = nodes.iter().map(|n| formed(n)).collect();
        if f.iter().all(Option::is_some) {
            return f.into_iter().flatten().collect();
        }
        if Instant::now() > deadline {
            panic!("cluster did not form in 30 s; logs:\n{}", all_logs(nodes));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_nodes_started_in_random_order_form_one_cluster_without_a_human() {
    let Some(lan) = Lan::new(
        "three_nodes_started_in_random_order_form_one_cluster_without_a_human",
        3,
    ) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut order: Vec<usize> = (0..3).collect();
    order.shuffle(&mut rand::thread_rng());
    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| None).collect();
    for i in order {
        let dir = d.path().join(format!("node{i}"));
        write_seed(&dir, i, 3, "correct horse battery staple");
        nodes[i] = Some(start(&lan, i, &dir));
        std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(0..700)));
    }
    let nodes: Vec<Node> = nodes.into_iter().flatten().collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let f = wait_all_formed(&refs);
    assert!(f.iter().all(|x| x == &f[0]), "nodes disagree: {f:?}");
    let mut ids: Vec<String> = nodes.iter().map(node_id).collect();
    ids.sort();
    let members: Vec<String> = f[0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, ids);
    let bootstraps = nodes
        .iter()
        .filter(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap()
                .contains("this node bootstraps it")
        })
        .count();
    assert_eq!(bootstraps, 1, "exactly one node bootstraps");
    // All three report the same members through the API; a write made now must survive.
    let t = session(&lan, &refs);
    wait_agreement(&lan, &t, &refs, 3, 3);
    // The three share one host name (no seed names them): one node keeps it, the others
    // go by it with their id's first digits, and an event says so.
    let names = wait_unique_names(&lan, &t, &ids);
    let (code, v) = api(
        &lan,
        2,
        "POST",
        "vms",
        Some(&t),
        Some(r#"{"name":"before-restart","vcpus":1,"memory_mib":64}"#),
    );
    assert_eq!(code, 201, "{v}");

    // Restart everyone: the cluster is remembered, nobody bootstraps again.
    let before = f[0].clone();
    let dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir.clone()).collect();
    drop(nodes);
    let nodes: Vec<Node> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            std::fs::remove_file(dir.join("tesserad.log")).unwrap();
            start(&lan, i, dir)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes.iter().all(|n| {
        std::fs::read_to_string(&n.log)
            .unwrap_or_default()
            .contains("already a member")
    }) {
        assert!(
            Instant::now() < deadline,
            "restarted nodes did not report their cluster"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The replicated state is all there: one leader, three voters, three registrations,
    // the session and the VM made before the restart.
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
    for i in 0..3 {
        let (code, v) = api(&lan, i, "GET", "vms/before-restart", Some(&t), None);
        assert_eq!(code, 200, "node {i}: {v}");
    }
    // Names are stable across restarts: nobody takes another's or changes its own.
    assert_eq!(wait_unique_names(&lan, &t, &ids), names);
    for n in &nodes {
        assert_eq!(formed(n).unwrap(), before);
        assert!(
            !std::fs::read_to_string(&n.log)
                .unwrap()
                .contains("bootstraps"),
            "a restart bootstrapped again"
        );
    }
}

#[test]
fn a_node_with_the_wrong_secret_is_never_admitted_and_both_sides_say_why() {
    let Some(lan) = Lan::new(
        "a_node_with_the_wrong_secret_is_never_admitted_and_both_sides_say_why",
        3,
    ) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let dir = d.path().join(format!("node{i}"));
        let secret = if i == 2 {
            "an entirely different secret"
        } else {
            "correct horse battery staple"
        };
        write_seed(&dir, i, 2, secret);
        nodes.push(start(&lan, i, &dir));
    }
    let f = wait_all_formed(&[&nodes[0], &nodes[1]]);
    assert_eq!(f[0], f[1]);
    let intruder = node_id(&nodes[2]);
    assert!(
        !f[0]["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == intruder.as_str()),
        "the wrong-secret node was admitted"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        formed(&nodes[2]).is_none(),
        "the wrong-secret node formed something"
    );
    let good_log = std::fs::read_to_string(&nodes[0].log).unwrap();
    assert!(
        good_log.contains("authentication failed"),
        "no log line on the refusing side:\n{good_log}"
    );
    let bad_log = std::fs::read_to_string(&nodes[2].log).unwrap();
    assert!(
        bad_log.contains("rejected our announcement"),
        "no log line on the refused side:\n{bad_log}"
    );
}

/// Logs in as the first administrator (after formation) through node 0's API.
/// Waits until `GET /nodes` names the nodes `ids` (sorted) with distinct names (nodes that
/// registered at the same moment converge on their next registration, every 10 s), then
/// checks what they are: the machine's host name for one node, `<host>-<6 hex digits of
/// its id>` for each other, with a `node.renamed` event for each of those. The names,
/// in the order of `ids`.
fn wait_unique_names(lan: &Lan, token: &str, ids: &[String]) -> Vec<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(40);
    let names = loop {
        let (code, v) = api(lan, 0, "GET", "nodes", Some(token), None);
        let names: Vec<String> = ids
            .iter()
            .filter_map(|id| {
                v.as_array()?
                    .iter()
                    .find(|n| n["id"].as_str() == Some(id))?["name"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        let distinct: std::collections::BTreeSet<&String> = names.iter().collect();
        if code == 200 && names.len() == ids.len() && distinct.len() == ids.len() {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "node names not unique after 40 s: {code} {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (code, events) = api(lan, 0, "GET", "events?limit=1000", Some(token), None);
    assert_eq!(code, 200, "{events}");
    let renamed: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "node.renamed")
        .filter_map(|e| e["target"].as_str())
        .collect();
    for (id, name) in ids.iter().zip(&names) {
        if *name != host {
            assert_eq!(*name, format!("{host}-{}", &id[..6]), "names {names:?}");
            assert!(
                renamed.contains(&name.as_str()),
                "no node.renamed event for {name}: {events}"
            );
        }
    }
    assert_eq!(
        names.iter().filter(|n| **n == host).count(),
        1,
        "one node keeps the host name {host}: {names:?}"
    );
    names
}

fn session(lan: &Lan, nodes: &[&Node]) -> String {
    let dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir.clone()).collect();
    admin_session_in(lan, &dirs, nodes[0].i, "a much better password")
}

/// What node `n` says through the REST API: its `GET /cluster`, with `GET /nodes` as
/// `nodes`.
fn status(lan: &Lan, n: &Node, token: &str) -> Option<serde_json::Value> {
    let (code, mut c) = api(lan, n.i, "GET", "cluster", Some(token), None);
    let (code2, nodes) = api(lan, n.i, "GET", "nodes", Some(token), None);
    if code != 200 || code2 != 200 {
        return None;
    }
    c["nodes"] = nodes;
    Some(c)
}

/// The LAN index of the node whose Raft id is `raft_id`, from a cluster status.
fn index_of(st: &serde_json::Value, raft_id: u64) -> Option<usize> {
    let m = st["members"]
        .as_array()?
        .iter()
        .find(|m| m["raft_id"].as_u64() == Some(raft_id))?;
    let ip: std::net::Ipv4Addr = m["address"].as_str()?.split(':').next()?.parse().ok()?;
    Some(ip.octets()[3] as usize - 1)
}

/// Waits until every listed node reports, through the API, the same leader (one of them),
/// `voters` voters and `registered` nodes; returns the leader's Raft id.
fn wait_agreement(
    lan: &Lan,
    token: &str,
    nodes: &[&Node],
    voters: usize,
    registered: usize,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let st: Vec<Option<serde_json::Value>> =
            nodes.iter().map(|n| status(lan, n, token)).collect();
        let leaders: Vec<Option<u64>> = st
            .iter()
            .map(|s| s.as_ref().and_then(|s| s["leader"].as_u64()))
            .collect();
        let ok = leaders[0].is_some()
            && leaders.iter().all(|l| *l == leaders[0])
            && st.iter().flatten().all(|s| {
                index_of(s, leaders[0].unwrap_or(0)).is_some_and(|i| nodes.iter().any(|n| n.i == i))
            })
            && st.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["voters"].as_array().map(|v| v.len()) == Some(voters)
                        && s["nodes"].as_array().map(|o| o.len()) == Some(registered)
                })
            });
        if ok {
            return leaders[0].unwrap_or(0);
        }
        if Instant::now() > deadline {
            panic!(
                "no agreement; statuses: {st:#?}\nlogs:\n{}",
                all_logs(nodes)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_formed_cluster_runs_raft_survives_losing_its_leader_and_takes_it_back() {
    let Some(lan) = Lan::new(
        "the_formed_cluster_runs_raft_survives_losing_its_leader_and_takes_it_back",
        3,
    ) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&lan, d.path(), 0..3, 3);
    let t = session(&lan, &nodes.iter().collect::<Vec<_>>());
    let leader = wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
    // Every node publishes its resource metrics; any node shows them.
    let st = status(&lan, &nodes[1], &t).unwrap();
    let mine = node_id(&nodes[0]);
    let m = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == mine.as_str())
        .unwrap()["metrics"]
        .clone();
    assert!(
        m["memory_total"].as_u64().unwrap_or(0) > 0,
        "no metrics: {m}"
    );
    assert!(
        m["cpus"].as_u64().unwrap_or(0) > 0 && m["load"].as_array().is_some(),
        "{m}"
    );

    // Kill the leader's process: the other two elect a new leader.
    let leader_i = index_of(&st, leader).unwrap();
    let pos = nodes.iter().position(|n| n.i == leader_i).unwrap();
    let dead = nodes.remove(pos);
    let dead_dir = dead.dir.clone();
    drop(dead);
    let survivors: Vec<&Node> = nodes.iter().collect();
    let new_leader = wait_agreement(&lan, &t, &survivors, 3, 3);
    assert_ne!(
        new_leader, leader,
        "the dead leader is still reported as leader"
    );

    // Writes continue under the new leader (through any node).
    let (code, v) = api(
        &lan,
        nodes[0].i,
        "POST",
        "vms",
        Some(&t),
        Some(r#"{"name":"after-failover","vcpus":1,"memory_mib":64}"#),
    );
    assert_eq!(code, 201, "{v}");

    // It comes back from its own state, rejoins, and everyone agrees again; it has the
    // write made while it was down.
    let back = start(&lan, leader_i, &dead_dir);
    nodes.push(back);
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
    let (code, v) = api(&lan, leader_i, "GET", "vms/after-failover", Some(&t), None);
    assert_eq!(code, 200, "{v}");
}

fn health_of(lan: &Lan, token: &str, observer: &Node, id: &str) -> Option<String> {
    let (_, v) = api(lan, observer.i, "GET", "nodes", Some(token), None);
    v.as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

#[test]
fn a_cut_off_node_is_reported_down_within_the_bound_and_up_after_heal() {
    let Some(lan) = Lan::new(
        "a_cut_off_node_is_reported_down_within_the_bound_and_up_after_heal",
        3,
    ) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let nodes = start_nodes(&lan, d.path(), 0..3, 3);
    let t = session(&lan, &nodes.iter().collect::<Vec<_>>());
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
    let victim = node_id(&nodes[2]);
    assert_eq!(
        health_of(&lan, &t, &nodes[0], &victim).as_deref(),
        Some("up")
    );

    lan.set_link(2, false);
    let cut = Instant::now();
    while !(health_of(&lan, &t, &nodes[0], &victim).as_deref() == Some("down")
        && health_of(&lan, &t, &nodes[1], &victim).as_deref() == Some("down"))
    {
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "never reported down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let detected = cut.elapsed();
    assert!(
        detected <= Duration::from_millis(3_500),
        "reported down after {detected:?}, bound is 3 s"
    );
    // The two others still form a majority and keep a leader.
    wait_agreement(&lan, &t, &nodes[..2].iter().collect::<Vec<_>>(), 3, 3);

    lan.set_link(2, true);
    let healed = Instant::now();
    while health_of(&lan, &t, &nodes[0], &victim).as_deref() != Some("up") {
        assert!(
            healed.elapsed() < Duration::from_secs(5),
            "not back up after heal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
}

#[test]
fn a_fourth_node_with_the_right_secret_joins_by_itself() {
    let Some(lan) = Lan::new("a_fourth_node_with_the_right_secret_joins_by_itself", 4) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&lan, d.path(), 0..3, 3);
    let t = session(&lan, &nodes.iter().collect::<Vec<_>>());
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 3, 3);
    nodes.extend(start_nodes(&lan, d.path(), 3..4, 3));
    wait_agreement(&lan, &t, &nodes.iter().collect::<Vec<_>>(), 4, 4);
    let log = std::fs::read_to_string(&nodes[3].log).unwrap();
    assert!(log.contains("joined the cluster"), "{log}");
    assert!(
        log.contains("received this node's cluster certificate"),
        "{log}"
    );
    assert!(
        !log.contains("bootstraps"),
        "the late node founded its own cluster"
    );
    check_mutual_tls(&lan, &nodes);
}

/// One JSON RPC line to node `to`'s Raft port with openssl, from node `from`'s namespace,
/// presenting `from`'s certificate when `with_cert`; returns what came back.
fn openssl_rpc(lan: &Lan, nodes: &[Node], from: usize, to: usize, with_cert: bool) -> String {
    use std::io::Write;
    let tls = nodes[from].dir.join("data/tls");
    let mut c = lan.command(from, Path::new("openssl"));
    c.args(["s_client", "-quiet", "-verify_return_error"])
        .arg("-connect")
        .arg(format!("{}:7947", Lan::addr(to)))
        .arg("-CAfile")
        .arg(tls.join("ca.crt"));
    if with_cert {
        c.arg("-cert")
            .arg(tls.join("node.crt"))
            .arg("-key")
            .arg(tls.join("node.key"));
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep standard input open (the server keeps a member's connection for more
    // requests): read the one answer line, or end of file when the server hangs up.
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"rpc\":\"read_index\",\"body\":null}\n")
        .unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    line
}

/// Node-to-node traffic is mutual TLS with the cluster CA: every node holds a certificate
/// from the same CA (key readable by root only); a client with one is answered, a client
/// without one is not, and plain TCP gets nothing.
fn check_mutual_tls(lan: &Lan, nodes: &[Node]) {
    let ca = std::fs::read(nodes[0].dir.join("data/tls/ca.crt")).unwrap();
    for n in nodes {
        let tls = n.dir.join("data/tls");
        assert_eq!(
            std::fs::read(tls.join("ca.crt")).unwrap(),
            ca,
            "one CA for all"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(tls.join("node.key"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let v = tessera_tests::output(
            std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(tls.join("ca.crt"))
                .arg(tls.join("node.crt")),
        );
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    }
    // A read-index RPC is answered by any member (Ok from the leader, Err naming the
    // leader from a follower): either way, an answer.
    let answered = openssl_rpc(lan, nodes, 3, 0, true);
    assert!(
        answered.starts_with("{\"Ok\"") || answered.starts_with("{\"Err\""),
        "a member's RPC was not answered: {answered:?}"
    );
    let anonymous = openssl_rpc(lan, nodes, 3, 0, false);
    assert!(
        anonymous.is_empty(),
        "answered without a client certificate: {anonymous:?}"
    );
    let plain = tessera_tests::output(
        lan.command(3, Path::new("curl"))
            .args(["-s", "-m", "5", "--data", "{}"])
            .arg(format!("http://{}:7947/", Lan::addr(0))),
    );
    assert!(plain.stdout.is_empty(), "plain TCP got an answer");
}
