//! Nodes as people know them: by name, not by their 32-hex id or their Raft id.
//!
//! A node's name is the `name` the API gives it when it gives one, else the host name it
//! publishes with its metrics; nodes that share a host name (a local cluster on one
//! machine) are told apart by their address. Ids remain accepted wherever a node is given.

use serde_json::Value;

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
        Ok(NodeNames::from_listing(&client.call(NODES, &[], None)?))
    }

    /// Names the nodes of a `GET /nodes` answer, each name unique.
    pub fn from_listing(listing: &Value) -> NodeNames {
        let list = listing.as_array().map(Vec::as_slice).unwrap_or_default();
        let base: Vec<(String, String, String)> = list
            .iter()
            .filter_map(|n| {
                let id = n["id"].as_str()?.to_string();
                let host = address_host(&n["address"]);
                let name = [&n["name"], &n["metrics"]["host"]]
                    .into_iter()
                    .find_map(|v| v.as_str().filter(|s| !s.is_empty()))
                    .map(String::from)
                    .or_else(|| host.clone())
                    .unwrap_or_else(|| id.clone());
                Some((id, name, host.unwrap_or_default()))
            })
            .collect();
        let count = |name: &str, of: &[Named]| of.iter().filter(|n| n.name == name).count();
        // Shared host names first get the address, then (same address, too) the id.
        let first: Vec<Named> = base
            .iter()
            .map(|(id, name, host)| {
                let shared = base.iter().filter(|(_, n, _)| n == name).count() > 1;
                Named {
                    id: id.clone(),
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
                name: if count(&n.name, &first) > 1 {
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

    /// The name of a node id held in a JSON field (`-` when there is none).
    pub fn name_of(&self, id: &Value) -> String {
        id.as_str().map_or_else(|| "-".into(), |id| self.name(id))
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
fn address_host(address: &Value) -> Option<String> {
    let a = address.as_str()?;
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";
    const C: &str = "00000000000000010000000000000001";

    #[test]
    fn nodes_are_named_by_their_host() {
        let names = NodeNames::from_listing(&json!([
            {"id": A, "address": "10.0.0.1:7946", "metrics": {"host": "alpha"}},
            {"id": B, "address": "10.0.0.2:7946", "metrics": {"host": "beta"}},
            {"id": C, "address": "10.0.0.3:7946", "metrics": null},
        ]));
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
    fn a_name_from_the_api_wins() {
        let names = NodeNames::from_listing(&json!([
            {"id": A, "name": "rack1-a", "address": "10.0.0.1:7946", "metrics": {"host": "h"}},
        ]));
        assert_eq!(names.name(A), "rack1-a");
    }

    #[test]
    fn nodes_on_one_host_are_told_apart_by_address() {
        let names = NodeNames::from_listing(&json!([
            {"id": A, "address": "127.0.0.1:7946", "metrics": {"host": "laptop"}},
            {"id": B, "address": "127.0.0.2:7946", "metrics": {"host": "laptop"}},
            {"id": C, "address": "[::1]:7946", "metrics": {"host": "laptop"}},
        ]));
        assert_eq!(names.name(A), "laptop/127.0.0.1");
        assert_eq!(names.name(B), "laptop/127.0.0.2");
        assert_eq!(names.name(C), "laptop/::1");
        assert_eq!(names.resolve("laptop/127.0.0.2"), B);
    }

    #[test]
    fn names_stay_unique_when_addresses_repeat() {
        let names = NodeNames::from_listing(&json!([
            {"id": A, "address": "10.0.0.1:7946", "metrics": {"host": "h"}},
            {"id": B, "address": "10.0.0.1:7946", "metrics": {"host": "h"}},
        ]));
        assert_ne!(names.name(A), names.name(B));
    }

    #[test]
    fn the_raft_id_finds_its_node() {
        let names = NodeNames::from_listing(&json!([
            {"id": A, "metrics": {"host": "alpha"}},
            {"id": C, "metrics": {"host": "gamma"}},
        ]));
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
