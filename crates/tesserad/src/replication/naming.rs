//! Volume events name nodes by their names, and keep their ids in the event's `nodes`.
//!
//! The decisions (`failover::decide`, `resync::decide`) are pure and work with node ids,
//! and the stores report their peers by certificate name (16 hex digits, from the Raft
//! id); neither reads the node records. So the words are fixed where an event is written:
//! each id of a registered node in the message (its full id, or its certificate name) is
//! replaced by the node's name, and the ids found go into `nodes`, in the order the
//! message names them. Ids are 16 or more random hex digits, so one never matches inside
//! other words. A node without a name (registered before nodes had names) keeps its id.

use std::collections::HashMap;

use tessera_state::Command;

use crate::tables::event_about_nodes;

/// How each registered node is written in an event's message.
pub struct NodeNames {
    /// (id, certificate name, name), longest id text first so a full id is replaced
    /// before the certificate name that is its prefix.
    nodes: Vec<(String, String, String)>,
}

impl NodeNames {
    /// From the node records (`super::node_records`).
    pub fn of(records: &HashMap<String, serde_json::Value>) -> NodeNames {
        let nodes = records
            .iter()
            .map(|(id, r)| {
                let name = r["name"].as_str().unwrap_or(id).to_string();
                (id.clone(), super::roles::cert_name(records, id), name)
            })
            .collect();
        NodeNames { nodes }
    }

    /// `message` with every node id in it written as the node's name, and the ids of the
    /// nodes it names, in the order it names them.
    pub fn render(&self, message: &str) -> (String, Vec<String>) {
        let mut found: Vec<(usize, &str)> = Vec::new();
        for (id, _, _) in &self.nodes {
            if let Some(at) = message.find(id.as_str()) {
                found.push((at, id));
            }
        }
        for (id, cert, _) in &self.nodes {
            if cert != id && !found.iter().any(|(_, f)| f == id) {
                if let Some(at) = find_word(message, cert) {
                    found.push((at, id));
                }
            }
        }
        found.sort();
        let mut text = message.to_string();
        for (id, cert, name) in &self.nodes {
            text = text.replace(id.as_str(), name);
            if cert != id && cert != name {
                text = replace_words(&text, cert, name);
            }
        }
        (
            text,
            found.into_iter().map(|(_, id)| id.to_string()).collect(),
        )
    }

    /// The command recording a `kind` event about volume `target` by the system, its
    /// message's node ids written as names.
    pub fn event(&self, kind: &str, target: &str, message: &str) -> Command {
        let (text, nodes) = self.render(message);
        event_about_nodes(kind, target, "tesserad", &text, nodes)
    }
}

/// Whether `c` can be part of an id (so a match next to one is inside a longer word).
fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Where `word` first stands alone in `text` (not inside a longer id).
fn find_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(at, _)| at).find(|&at| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(id_char) && !after.is_some_and(id_char)
    })
}

/// `text` with each standalone `word` replaced by `with`.
fn replace_words(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_word(rest, word) {
        out.push_str(&rest[..at]);
        out.push_str(with);
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "0123456789abcdef0011223344556677";
    const B: &str = "fedcba98765432108899aabbccddeeff";
    const C: &str = "00000000000000010000000000000001";

    fn names() -> NodeNames {
        let records = HashMap::from([
            (
                A.to_string(),
                json!({"name": "alpha", "raft_id": u64::from_str_radix(&A[..16], 16).unwrap()}),
            ),
            (
                B.to_string(),
                json!({"name": "beta", "raft_id": u64::from_str_radix(&B[..16], 16).unwrap()}),
            ),
            // A node that registered before nodes had names.
            (C.to_string(), json!({"raft_id": 1})),
        ]);
        NodeNames::of(&records)
    }

    #[test]
    fn ids_in_a_message_become_names_and_are_kept_in_order() {
        let n = names();
        let (text, ids) = n.render(&format!(
            "the copies on {B}, {A} left the in-sync set; generation 4"
        ));
        assert_eq!(
            text,
            "the copies on beta, alpha left the in-sync set; generation 4"
        );
        assert_eq!(ids, vec![B.to_string(), A.to_string()]);
    }

    #[test]
    fn a_stores_certificate_name_becomes_the_nodes_name() {
        let n = names();
        let cert = crate::replication::roles::cert_name(
            &HashMap::from([(
                A.to_string(),
                json!({"raft_id": u64::from_str_radix(&A[..16], 16).unwrap()}),
            )]),
            A,
        );
        assert_eq!(cert, &A[..16]);
        let (text, ids) = n.render(&format!("repaired from the copy on node {cert}; ok"));
        assert_eq!(text, "repaired from the copy on node alpha; ok");
        assert_eq!(ids, vec![A.to_string()]);
    }

    #[test]
    fn a_node_without_a_name_keeps_its_id_and_unknown_text_is_left_alone() {
        let n = names();
        let (text, ids) = n.render(&format!("primary moved from {C} to {A}"));
        assert_eq!(text, format!("primary moved from {C} to alpha"));
        assert_eq!(ids, vec![C.to_string(), A.to_string()]);
        // Not an id of a registered node (a removed one), nor a piece of a longer word.
        let (text, ids) = n.render("copies on 99999999999999999999 and x0123456789abcdefx");
        assert_eq!(
            text,
            "copies on 99999999999999999999 and x0123456789abcdefx"
        );
        assert!(ids.is_empty());
    }
}
