//! Node names are unique in a cluster: nodes flashed from one image often boot with one
//! host name, and users address nodes by name. Pure: the registration and the API gather
//! the `nodes` table's names.

/// How many hex digits of its id a node adds to a name another node holds.
const SUFFIX_LEN: usize = 6;

/// The name node `me` registers under, wanting `base` (its seed's or host's name), with
/// `recorded` the name its own record holds (if any) and `others` the (id, name) of every
/// other node. The wanted name if no other node holds it; else `base-<first 6 hex digits
/// of its id>` (stable: the same on every restart), or `base-<id>` if even that is held.
/// A node keeps the name it has (so a name users know does not change under them), except
/// when two nodes took the same one at the same moment (formation: every node registers at
/// once): the one with the lowest id keeps it.
pub fn unique_name(
    base: &str,
    me: &str,
    recorded: Option<&str>,
    others: &[(String, String)],
) -> String {
    let suffixed = format!("{base}-{}", me.get(..SUFFIX_LEN).unwrap_or(me));
    let full = format!("{base}-{me}");
    let free = |name: &str, keeping: bool| {
        !others
            .iter()
            .any(|(id, n)| n == name && (!keeping || id.as_str() < me))
    };
    // What it holds already, if it is one of its own names and no lower id shares it.
    if let Some(r) = recorded {
        if (r == base || r == suffixed || r == full) && free(r, true) {
            return r.to_string();
        }
    }
    [base.to_string(), suffixed]
        .into_iter()
        .find(|n| free(n, false))
        .unwrap_or(full)
}

/// Why `key` names no single node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lookup {
    /// No node has that id or name.
    #[error("no node {0} in the cluster")]
    NotFound(String),
    /// Several nodes go by that name (ids listed): it is never resolved to one of them.
    #[error("node name {0} is ambiguous: nodes {ids} go by it; name the node by its id", ids = .1.join(", "))]
    Ambiguous(String, Vec<String>),
}

/// The id of the node `key` names among `nodes` (id, name): an id first, else the one
/// node with that name.
pub fn resolve<'a>(
    key: &str,
    nodes: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<String, Lookup> {
    let mut named = Vec::new();
    for (id, name) in nodes {
        if id == key {
            return Ok(id.to_string());
        }
        if name == key {
            named.push(id.to_string());
        }
    }
    match named.len() {
        0 => Err(Lookup::NotFound(key.to_string())),
        1 => Ok(named.remove(0)),
        _ => {
            named.sort();
            Err(Lookup::Ambiguous(key.to_string(), named))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
    const B: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
    const C: &str = "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c";

    fn others(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(i, n)| (i.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn a_free_name_is_taken_as_is() {
        assert_eq!(
            unique_name("node", B, None, &others(&[(A, "other")])),
            "node"
        );
    }

    #[test]
    fn a_joining_node_whose_name_is_held_gets_a_suffix_of_its_id() {
        // B joins later with A's name, though its id is higher or lower: A keeps it.
        let held = others(&[(A, "node")]);
        assert_eq!(unique_name("node", B, None, &held), "node-0b0b0b");
        let held = others(&[(B, "node")]);
        assert_eq!(unique_name("node", A, None, &held), "node-0a0a0a");
        // Stable: on its next registration (and after a restart) it keeps it, also once
        // the plain name is free again.
        assert_eq!(
            unique_name("node", A, Some("node-0a0a0a"), &held),
            "node-0a0a0a"
        );
        assert_eq!(
            unique_name("node", A, Some("node-0a0a0a"), &[]),
            "node-0a0a0a"
        );
        // A third with the same name and prefix-clash falls back to its whole id.
        let held = others(&[(A, "node"), (C, "node-0b0b0b")]);
        assert_eq!(unique_name("node", B, None, &held), format!("node-{B}"));
    }

    #[test]
    fn two_nodes_that_took_one_name_at_once_converge_the_lowest_id_keeping_it() {
        let both = |me: &str, other: &str| {
            unique_name("node", me, Some("node"), &others(&[(other, "node")]))
        };
        assert_eq!(both(A, B), "node");
        assert_eq!(both(B, A), "node-0b0b0b");
    }

    #[test]
    fn a_renamed_node_takes_its_new_name() {
        // Its seed now names it node2: the record's old name is not kept.
        assert_eq!(unique_name("node2", A, Some("node"), &[]), "node2");
    }

    #[test]
    fn an_id_or_a_unique_name_resolves_and_a_shared_name_never_picks_one() {
        let nodes = [(A, "node"), (B, "node"), (C, "c")];
        assert_eq!(resolve(B, nodes).unwrap(), B);
        assert_eq!(resolve("c", nodes).unwrap(), C);
        assert_eq!(resolve("zz", nodes), Err(Lookup::NotFound("zz".into())));
        let e = resolve("node", nodes).unwrap_err();
        assert_eq!(
            e,
            Lookup::Ambiguous("node".into(), vec![A.into(), B.into()])
        );
        assert!(
            e.to_string()
                .contains("node name node is ambiguous: nodes 0a0a")
                && e.to_string().contains("name the node by its id"),
            "{e}"
        );
    }
}
