//! Nodes as people know them: by name, not by their 32-hex id or their Raft id.
//!
//! The API gives nodes no name yet, so a node is named by the host name it publishes
//! with its metrics; nodes that share a host name (a local cluster on one machine) are
//! told apart by their address. Ids remain accepted wherever a node is given.

use tessera_api::NodeInfo;

use crate::client::Client;
use crate::endpoints::NODES;

/// One node: its id and the name shown for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub id: String,
    pub name: String,
}

/// The cluster's nodes by id and by name, from `GET /nodes`.
pub struct NodeNames {
    nodes: Vec<Named>,
}

impl NodeNames {
    pub fn fetch(client: &Client) -> anyhow::Result<NodeNames> {
        Ok(NodeNames::new(&client.get::<Vec<NodeInfo>>(NODES, &[])?))
    }

    /// Names the nodes of a `GET /nodes` answer, each name unique.
    pub fn new(list: &[NodeInfo]) -> NodeNames {
        let base: Vec<(&str, String, String)> = list
            .iter()
            .map(|n| {
                let host = address_host(&n.address);
                let name = n.metrics["host"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .or_else(|| host.clone())
                    .unwrap_or_else(|| n.id.clone());
                (n.id.as_str(), name, host.unwrap_or_default())
            })
            .collect();
        // A shared host name gets the address; should that repeat too, the id.
        let first: Vec<Named> = base
            .iter()
            .map(|(id, name, host)| {
                let shared = base.iter().filter(|(_, n, _)| n == name).count() > 1;
                Named {
                    id: id.to_string(),
                    name: if shared && !host.is_empty() && host != name {
                        format!("{name}/{host}")
                    } else {
                        name.clone()
                    },
                }
            })
            .collect();
        let nodes = first
            .iter()
            .map(|n| Named {
                id: n.id.clone(),
                name: if first.iter().filter(|o| o.name == n.name).count() > 1 {
                    format!("{}/{}", n.name, n.id)
                } else {
                    n.name.clone()
                },
            })
            .collect();
        NodeNames { nodes }
    }

    /// The name shown for node `id`; the id itself for a node the cluster no longer lists.
    pub fn name(&self, id: &str) -> String {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(|| id.to_string(), |n| n.name.clone())
    }

    /// The node whose Raft id is `raft_id` (a node's Raft id is the first 64 bits of its id).
    pub fn by_raft_id(&self, raft_id: u64) -> Option<&Named> {
        let prefix = format!("{raft_id:016x}");
        self.nodes.iter().find(|n| {
            n.id.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case(&prefix))
        })
    }

    /// The id of the node `given` names (by id or by name); anything else is passed on
    /// as it is, for the API to refuse with its own message.
    pub fn resolve(&self, given: &str) -> String {
        if self.nodes.iter().any(|n| n.id == given) {
            return given.to_string();
        }
        match self.nodes.iter().find(|n| n.name == given) {
            Some(n) => n.id.clone(),
            None => given.to_string(),
        }
    }
}

/// The host part of a node's `ip:port` address.
fn address_host(address: &serde_json::Value) -> Option<String> {
    let a = address.as_str()?;
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";
    const C: &str = "00000000000000010000000000000001";

    fn node(id: &str, address: Value, host: Option<&str>) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            address,
            state: "up".into(),
            metrics: host.map_or(Value::Null, |h| json!({ "host": h, "cpus": 4 })),
        }
    }

    #[test]
    fn nodes_are_named_by_their_host() {
        let names = NodeNames::new(&[
            node(A, json!("10.0.0.1:7946"), Some("alpha")),
            node(B, json!("10.0.0.2:7946"), Some("beta")),
            node(C, json!("10.0.0.3:7946"), None),
        ]);
        assert_eq!(names.name(A), "alpha");
        assert_eq!(names.name(B), "beta");
        // No metrics published yet: the address names it.
        assert_eq!(names.name(C), "10.0.0.3");
        assert_eq!(names.name("gone"), "gone");
        assert_eq!(names.resolve("beta"), B);
        assert_eq!(names.resolve(A), A);
        assert_eq!(names.resolve("nobody"), "nobody");
    }

    #[test]
    fn nodes_on_one_host_are_told_apart_by_address() {
        let names = NodeNames::new(&[
            node(A, json!("127.0.0.1:7946"), Some("laptop")),
            node(B, json!("127.0.0.2:7946"), Some("laptop")),
            node(C, json!("[::1]:7946"), Some("laptop")),
        ]);
        assert_eq!(names.name(A), "laptop/127.0.0.1");
        assert_eq!(names.name(B), "laptop/127.0.0.2");
        assert_eq!(names.name(C), "laptop/::1");
        assert_eq!(names.resolve("laptop/127.0.0.2"), B);
    }

    #[test]
    fn names_stay_unique_when_addresses_repeat() {
        let names = NodeNames::new(&[
            node(A, json!("10.0.0.1:7946"), Some("h")),
            node(B, json!("10.0.0.1:7946"), Some("h")),
            node(C, Value::Null, None),
        ]);
        assert_ne!(names.name(A), names.name(B));
        assert_eq!(names.name(C), C);
    }

    #[test]
    fn the_raft_id_finds_its_node() {
        let names = NodeNames::new(&[
            node(A, Value::Null, Some("alpha")),
            node(C, Value::Null, Some("gamma")),
        ]);
        assert_eq!(
            names
                .by_raft_id(0x0123_4567_89ab_cdef)
                .map(|n| n.name.as_str()),
            Some("alpha")
        );
        assert_eq!(names.by_raft_id(1).map(|n| n.id.as_str()), Some(C));
        assert!(names.by_raft_id(2).is_none());
    }
}
