//! Where a new volume's copies go (pure): on distinct nodes that can hold a copy, the ones
//! with the most free space first, the requested node (if any) as the primary.

/// A node that could hold a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub id: String,
    /// Free bytes on its disks (the largest free space of any of its disks).
    pub available: u64,
    /// Why it cannot hold a copy now (down, store unreachable or degraded, no replication
    /// address), or `None` if it can.
    pub unusable: Option<String>,
}

/// Why no placement was made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// More copies than the cluster has nodes.
    #[error("replicas: {asked} copies need {asked} distinct nodes; the cluster has {nodes}")]
    TooFewNodes {
        /// Copies asked for.
        asked: usize,
        /// Nodes in the cluster.
        nodes: usize,
    },
    /// The requested primary is not a node of the cluster.
    #[error("node: no node {0} in the cluster")]
    UnknownNode(String),
    /// The requested primary cannot hold a copy now.
    #[error("node: {node} cannot hold a copy now: {why}")]
    PinnedUnusable {
        /// The node.
        node: String,
        /// Why.
        why: String,
    },
    /// Enough nodes, but too few of them can hold a copy now.
    #[error("replicas: {asked} copies need {asked} nodes able to hold one; only {usable} can now ({why})")]
    NoRoom {
        /// Copies asked for.
        asked: usize,
        /// Nodes that could.
        usable: usize,
        /// Why the others cannot, by node.
        why: String,
    },
}

/// Picks `count` distinct nodes, the primary first: `pinned` if given, else the node with
/// the most free space; then the others by free space (ties by id, so the choice is
/// stable).
pub fn place(
    candidates: &[Candidate],
    count: usize,
    pinned: Option<&str>,
) -> Result<Vec<String>, PlacementError> {
    if count > candidates.len() {
        return Err(PlacementError::TooFewNodes {
            asked: count,
            nodes: candidates.len(),
        });
    }
    let mut chosen = Vec::new();
    if let Some(p) = pinned {
        let c = candidates
            .iter()
            .find(|c| c.id == p)
            .ok_or_else(|| PlacementError::UnknownNode(p.to_string()))?;
        if let Some(why) = &c.unusable {
            return Err(PlacementError::PinnedUnusable {
                node: p.to_string(),
                why: why.clone(),
            });
        }
        chosen.push(c.id.clone());
    }
    let mut usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.unusable.is_none() && !chosen.contains(&c.id))
        .collect();
    usable.sort_by(|a, b| b.available.cmp(&a.available).then(a.id.cmp(&b.id)));
    chosen.extend(
        usable
            .iter()
            .take(count - chosen.len())
            .map(|c| c.id.clone()),
    );
    if chosen.len() < count {
        let why: Vec<String> = candidates
            .iter()
            .filter_map(|c| c.unusable.as_ref().map(|w| format!("{}: {w}", c.id)))
            .collect();
        return Err(PlacementError::NoRoom {
            asked: count,
            usable: candidates.iter().filter(|c| c.unusable.is_none()).count(),
            why: why.join("; "),
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, available: u64, unusable: Option<&str>) -> Candidate {
        Candidate {
            id: id.into(),
            available,
            unusable: unusable.map(String::from),
        }
    }

    #[test]
    fn the_freest_nodes_are_chosen_and_a_pinned_node_is_the_primary() {
        let nodes = [
            c("a", 10, None),
            c("b", 30, None),
            c("c", 20, None),
            c("d", 5, None),
        ];
        assert_eq!(place(&nodes, 3, None).unwrap(), ["b", "c", "a"]);
        assert_eq!(place(&nodes, 3, Some("d")).unwrap(), ["d", "b", "c"]);
        assert_eq!(place(&nodes, 1, None).unwrap(), ["b"]);
        // Equal space: by id, so two calls agree.
        let tie = [c("y", 1, None), c("x", 1, None)];
        assert_eq!(place(&tie, 2, None).unwrap(), ["x", "y"]);
    }

    #[test]
    fn nodes_that_cannot_hold_a_copy_are_skipped_or_refused() {
        let nodes = [c("a", 10, None), c("b", 30, Some("down")), c("c", 20, None)];
        assert_eq!(place(&nodes, 2, None).unwrap(), ["c", "a"]);
        assert!(matches!(
            place(&nodes, 3, None),
            Err(PlacementError::NoRoom { asked: 3, usable: 2, ref why }) if why.contains("b: down")
        ));
        assert!(matches!(
            place(&nodes, 2, Some("b")),
            Err(PlacementError::PinnedUnusable { .. })
        ));
    }

    #[test]
    fn more_copies_than_nodes_or_an_unknown_node_are_refused() {
        let nodes = [c("a", 10, None), c("b", 30, None)];
        assert_eq!(
            place(&nodes, 3, None),
            Err(PlacementError::TooFewNodes { asked: 3, nodes: 2 })
        );
        assert_eq!(
            place(&nodes, 2, Some("zz")),
            Err(PlacementError::UnknownNode("zz".into()))
        );
    }
}
