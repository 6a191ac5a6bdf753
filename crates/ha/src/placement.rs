//! Where a VM goes, pure: among nodes that are up and not in maintenance, its preferred
//! node when that has room, else the one with the most free memory (ties by name), and
//! why not when none has room.

use crate::model::{NodeId, Resources};

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Declared up.
    pub up: bool,
    /// In maintenance: takes no new VMs.
    pub maintenance: bool,
    /// Capacity minus what the VMs placed there need.
    pub free: Resources,
}

/// Picks a node for a VM needing `need`, never `exclude` (the node being drained).
/// The error says, node by node, why none fits.
pub fn choose(
    candidates: &[Candidate],
    need: Resources,
    preferred: Option<&NodeId>,
    exclude: Option<&NodeId>,
) -> Result<NodeId, String> {
    let usable =
        |c: &&Candidate| c.up && !c.maintenance && Some(&c.id) != exclude && c.free.holds(need);
    if let Some(p) = preferred {
        if let Some(c) = candidates.iter().filter(usable).find(|c| &c.id == p) {
            return Ok(c.id.clone());
        }
    }
    let best = candidates.iter().filter(usable).max_by(|a, b| {
        a.free
            .memory_mib
            .cmp(&b.free.memory_mib)
            // max_by keeps the last of equals: reverse the name order so the
            // smallest name wins a tie.
            .then_with(|| b.id.cmp(&a.id))
    });
    if let Some(c) = best {
        return Ok(c.id.clone());
    }
    let why: Vec<String> = candidates
        .iter()
        .filter(|c| Some(&c.id) != exclude)
        .map(|c| {
            if !c.up {
                format!("{} down", c.id)
            } else if c.maintenance {
                format!("{} in maintenance", c.id)
            } else {
                format!("{} has {} free", c.id, c.free)
            }
        })
        .collect();
    Err(format!(
        "needs {need}; {}",
        if why.is_empty() {
            "no other node".to_owned()
        } else {
            why.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, up: bool, maintenance: bool, vcpus: u64, memory_mib: u64) -> Candidate {
        Candidate {
            id: id.into(),
            up,
            maintenance,
            free: Resources { vcpus, memory_mib },
        }
    }

    const NEED: Resources = Resources {
        vcpus: 1,
        memory_mib: 1024,
    };

    #[test]
    fn the_preferred_node_wins_when_it_has_room() {
        let nodes = [
            node("a", true, false, 4, 8192),
            node("b", true, false, 4, 2048),
        ];
        assert_eq!(
            choose(&nodes, NEED, Some(&"b".into()), None),
            Ok("b".into())
        );
        assert_eq!(choose(&nodes, NEED, None, None), Ok("a".into()));
    }

    #[test]
    fn down_full_maintenance_and_excluded_nodes_are_never_chosen() {
        let nodes = [
            node("a", false, false, 4, 8192),
            node("b", true, true, 4, 8192),
            node("c", true, false, 0, 8192),
            node("d", true, false, 4, 8192),
            node("e", true, false, 4, 4096),
        ];
        assert_eq!(
            choose(&nodes, NEED, Some(&"a".into()), Some(&"d".into())),
            Ok("e".into())
        );
        let err = choose(&nodes[..4], NEED, None, Some(&"d".into())).unwrap_err();
        assert_eq!(
            err,
            "needs 1 vCPUs/1024 MiB; a down, b in maintenance, c has 0 vCPUs/8192 MiB free"
        );
    }

    #[test]
    fn a_tie_goes_to_the_smallest_name() {
        let nodes = [
            node("b", true, false, 4, 4096),
            node("a", true, false, 4, 4096),
        ];
        assert_eq!(choose(&nodes, NEED, None, None), Ok("a".into()));
    }
}
