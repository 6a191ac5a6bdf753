//! The console's status screen: `/etc/issue`, which getty shows on tty1 and the serial
//! console above the login prompt. Made from `tesserad`'s status document (its local
//! status socket), so it needs no login and no network.

use std::net::IpAddr;

use serde_json::Value;

/// What the screen is made of.
pub struct Screen<'a> {
    /// This node's host name.
    pub hostname: &'a str,
    /// The management interface and its address, when it has one.
    pub address: Option<(&'a str, IpAddr)>,
    /// `tesserad`'s status document, or why there is none.
    pub status: Result<&'a Value, &'a str>,
    /// How many nodes the seed expects.
    pub expected_nodes: Option<usize>,
    /// Resident memory of each Tessera service running (name, KiB).
    pub memory: Vec<(String, u64)>,
}

/// The cluster line: formed or not, how many nodes are up, who leads.
pub fn cluster_line(status: &Value, expected: Option<usize>) -> String {
    let Some(cluster) = status["cluster_id"].as_str() else {
        return match expected {
            Some(n) => format!("not formed yet: waiting until {n} nodes see each other"),
            None => "not formed yet".to_string(),
        };
    };
    let short: String = cluster.chars().take(8).collect();
    let Some(nodes) = status["nodes"].as_object() else {
        return format!("{short}: starting the replicated state");
    };
    let me = status["node_id"].as_str().unwrap_or_default();
    let health = &status["health"];
    let mut down: Vec<String> = Vec::new();
    for (id, record) in nodes {
        if id != me && health[id]["state"].as_str() != Some("up") {
            down.push(record["name"].as_str().unwrap_or(id).to_string());
        }
    }
    let up = nodes.len() - down.len();
    // A leader whose record is not in the table yet (it registers after winning) goes by
    // its Raft id rather than as none.
    let leader = match status["leader"].as_u64() {
        None => "none".to_string(),
        Some(l) => nodes
            .values()
            .find(|r| r["raft_id"].as_u64() == Some(l))
            .and_then(|r| r["name"].as_str())
            .map_or_else(|| format!("raft id {l}"), str::to_string),
    };
    let mut line = format!(
        "formed ({short}), {up} of {} nodes up, leader {leader}",
        nodes.len()
    );
    if !down.is_empty() {
        down.sort();
        line.push_str(&format!(", down: {}", down.join(" ")));
    }
    line
}

/// getty expands backslash sequences in `/etc/issue`; nothing of ours is one.
fn literal(text: &str) -> String {
    text.replace('\\', "\\\\")
}

/// The whole `/etc/issue` text.
pub fn render(s: &Screen) -> String {
    let cluster = match s.status {
        Ok(doc) => cluster_line(doc, s.expected_nodes),
        Err(why) => format!("tesserad is not answering ({why})"),
    };
    let (address, open) = match s.address {
        Some((ifname, ip)) => {
            let host = match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            };
            (
                format!("{ip} ({ifname})"),
                format!("https://{host}:{}/", crate::render::API_PORT),
            )
        }
        None => (
            "none yet (no address on the management interface)".to_string(),
            "(once the node has an address)".to_string(),
        ),
    };
    let mut text = format!(
        "\nTessera node {}\n\n  Address:  {address}\n  Cluster:  {cluster}\n  Open:     {open}\n",
        s.hostname
    );
    if !s.memory.is_empty() {
        let each: Vec<String> = s
            .memory
            .iter()
            .map(|(name, kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        let total: u64 = s.memory.iter().map(|(_, k)| k).sum();
        text.push_str(&format!(
            "  Memory:   {:.1} MiB resident ({})\n",
            total as f64 / 1024.0,
            each.join(", ")
        ));
    }
    text.push('\n');
    literal(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn formed() -> Value {
        json!({
            "node_id": "a",
            "cluster_id": "c0ffee00deadbeef",
            "leader": 2,
            "voters": [1, 2, 3],
            "nodes": {
                "a": {"name": "node1", "raft_id": 1},
                "b": {"name": "node2", "raft_id": 2},
                "c": {"name": "node3", "raft_id": 3},
            },
            "health": {"b": {"state": "up"}, "c": {"state": "down"}},
        })
    }

    #[test]
    fn a_formed_cluster_names_its_leader_and_the_nodes_down() {
        assert_eq!(
            cluster_line(&formed(), Some(3)),
            "formed (c0ffee00), 2 of 3 nodes up, leader node2, down: node3"
        );
        let mut all_up = formed();
        all_up["health"]["c"]["state"] = json!("up");
        assert_eq!(
            cluster_line(&all_up, Some(3)),
            "formed (c0ffee00), 3 of 3 nodes up, leader node2"
        );
    }

    #[test]
    fn a_leader_not_registered_yet_goes_by_its_raft_id() {
        let mut doc = formed();
        doc["leader"] = json!(7);
        assert!(
            cluster_line(&doc, Some(3)).contains("leader raft id 7"),
            "{}",
            cluster_line(&doc, Some(3))
        );
        doc["leader"] = json!(null);
        assert!(cluster_line(&doc, Some(3)).contains("leader none"));
    }

    #[test]
    fn an_unformed_node_says_what_it_waits_for() {
        let doc = json!({"node_id": "a", "cluster_id": null});
        assert_eq!(
            cluster_line(&doc, Some(3)),
            "not formed yet: waiting until 3 nodes see each other"
        );
    }

    #[test]
    fn the_screen_gives_the_url_and_escapes_backslashes() {
        let doc = formed();
        let text = render(&Screen {
            hostname: "node\\1",
            address: Some(("enp0s3", "10.0.0.11".parse().unwrap())),
            status: Ok(&doc),
            expected_nodes: Some(3),
            memory: vec![
                ("tesserad".into(), 30 * 1024),
                ("tessera-store".into(), 10 * 1024),
            ],
        });
        assert!(text.contains("Open:     https://10.0.0.11:8006/"), "{text}");
        assert!(text.contains("Tessera node node\\\\1"), "{text}");
        assert!(
            text.contains(
                "Memory:   40.0 MiB resident (tesserad 30.0 MiB, tessera-store 10.0 MiB)"
            ),
            "{text}"
        );
        let text = render(&Screen {
            hostname: "n",
            address: None,
            status: Err("connection refused"),
            expected_nodes: None,
            memory: Vec::new(),
        });
        assert!(
            text.contains("tesserad is not answering (connection refused)"),
            "{text}"
        );
    }
}
