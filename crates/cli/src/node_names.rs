//! Nodes as people know them: by the name the API gives each (its seed's `node_name` or
//! its host name), not by their 32-hex id or their Raft id. Ids remain accepted wherever a
//! node is given.

use tessera_api::NodeInfo;

use crate::client::Client;
use crate::endpoints::NODES;

/// One node: its id, Raft id and the name shown for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub id: String,
    pub raft_id: Option<u64>,
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

    /// The nodes of a `GET /nodes` answer; a node registered without a name goes by its id.
    pub fn new(list: &[NodeInfo]) -> NodeNames {
        let nodes = list
            .iter()
            .map(|n| Named {
                id: n.id.clone(),
                raft_id: n.raft_id,
                name: n
                    .name
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| n.id.clone()),
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

    /// The node whose Raft id (as `GET /nodes` gives it) is `raft_id`.
    pub fn by_raft_id(&self, raft_id: u64) -> Option<&Named> {
        self.nodes.iter().find(|n| n.raft_id == Some(raft_id))
    }

    /// The id of the node `given` names (by id, or by a name no other node has); anything
    /// else is passed on as it is, for the API to refuse with its own message.
    pub fn resolve(&self, given: &str) -> String {
        if self.nodes.iter().any(|n| n.id == given) {
            return given.to_string();
        }
        let mut named = self.nodes.iter().filter(|n| n.name == given);
        match (named.next(), named.next()) {
            (Some(n), None) => n.id.clone(),
            _ => given.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";
    const C: &str = "00000000000000010000000000000001";

    fn node(id: &str, name: Option<&str>, raft_id: Option<u64>) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            name: name.map(String::from),
            raft_id,
            address: Value::Null,
            state: "up".into(),
            metrics: Value::Null,
            storage: None,
            allocation: Default::default(),
            maintenance: None,
        }
    }

    #[test]
    fn nodes_go_by_the_name_the_api_gives() {
        let names = NodeNames::new(&[
            node(A, Some("alpha"), Some(1)),
            node(B, Some("beta"), Some(2)),
        ]);
        assert_eq!(names.name(A), "alpha");
        assert_eq!(names.name(B), "beta");
        assert_eq!(names.name("gone"), "gone");
        assert_eq!(names.resolve("beta"), B);
        assert_eq!(names.resolve(A), A);
        assert_eq!(names.resolve("nobody"), "nobody");
    }

    #[test]
    fn a_node_without_a_name_goes_by_its_id() {
        let names = NodeNames::new(&[node(A, None, None), node(B, Some(""), None)]);
        assert_eq!(names.name(A), A);
        assert_eq!(names.name(B), B);
        assert_eq!(names.resolve(A), A);
    }

    #[test]
    fn a_name_two_nodes_share_is_not_resolved() {
        let names = NodeNames::new(&[node(A, Some("h"), None), node(B, Some("h"), None)]);
        assert_eq!(names.resolve("h"), "h");
        assert_eq!(names.resolve(B), B);
    }

    #[test]
    fn the_raft_id_finds_its_node_as_the_api_gives_it() {
        let names = NodeNames::new(&[
            node(A, Some("alpha"), Some(7)),
            node(C, Some("gamma"), None),
        ]);
        assert_eq!(names.by_raft_id(7).map(|n| n.id.as_str()), Some(A));
        // No guessing from the id: a node the API gives no Raft id is not found by one.
        assert!(names.by_raft_id(1).is_none());
    }
}
