//! Placement, pure: which up node has room for a VM (memory and vCPUs, counting the VMs
//! already placed there), honouring a pinned node and the node its disk lives on, and
//! why not when none has. No I/O: the API handler gathers the inputs.

use std::fmt::Write as _;

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom {
    /// Node id.
    pub id: String,
    /// The name it goes by (for messages).
    pub name: String,
    /// Up (heard within the health bound).
    pub up: bool,
    /// Physical memory in MiB (0 when it has not published metrics yet).
    pub memory_mib: u64,
    /// Physical CPUs.
    pub cpus: u64,
    /// Memory of the VMs placed on it (running, paused or starting), in MiB.
    pub allocated_mib: u64,
    /// vCPUs of the VMs placed on it.
    pub allocated_vcpus: u64,
}

impl NodeRoom {
    fn free_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.allocated_mib)
    }
    fn free_vcpus(&self) -> u64 {
        self.cpus.saturating_sub(self.allocated_vcpus)
    }
}

/// What is to be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// The node the VM is pinned to, if any.
    pub pinned: Option<String>,
    /// The node holding its disk, if it has one: preferred (the disk is local there,
    /// over the store's Unix socket), and it must be up wherever the VM runs (elsewhere
    /// the VMM reaches the volume over TLS NBD on that node).
    pub disk_node: Option<String>,
}

/// Why a VM cannot be placed; the text names each candidate's free room.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node holding the VM's disk is down: the VM could not read it anywhere.
    #[error(
        "the VM's disk is on node {0}, which is not up; it cannot start until that node is back"
    )]
    DiskNodeDown(String),
    /// A node named does not exist.
    #[error("no node {0} in the cluster")]
    NoSuchNode(String),
    /// No candidate has room.
    #[error("{0}")]
    NoRoom(String),
}

fn mib(v: u64) -> String {
    if v >= 1024 && v % 1024 == 0 {
        format!("{} GiB", v / 1024)
    } else {
        format!("{v} MiB")
    }
}

/// Picks a node for `req` among `nodes`: the pinned node if given (it must be up and
/// have room), else the disk's node if it has room, else the up node with the most free
/// memory. The disk's node must be up in every case.
pub fn place(nodes: &[NodeRoom], req: &Request) -> Result<String, Refusal> {
    if let Some(d) = &req.disk_node {
        let holder = nodes
            .iter()
            .find(|n| &n.id == d)
            .ok_or_else(|| Refusal::NoSuchNode(d.clone()))?;
        if !holder.up {
            return Err(Refusal::DiskNodeDown(holder.name.clone()));
        }
    }
    let required = req.pinned.as_ref();
    let candidates: Vec<&NodeRoom> = match required {
        Some(id) => {
            let n = nodes
                .iter()
                .find(|n| &n.id == id)
                .ok_or_else(|| Refusal::NoSuchNode(id.clone()))?;
            vec![n]
        }
        None => nodes.iter().collect(),
    };
    let fits =
        |n: &&NodeRoom| n.up && n.free_mib() >= req.memory_mib && n.free_vcpus() >= req.vcpus;
    let fitting: Vec<&NodeRoom> = candidates.iter().copied().filter(fits).collect();
    if let Some(local) = fitting
        .iter()
        .find(|n| req.disk_node.as_ref() == Some(&n.id))
    {
        return Ok(local.id.clone());
    }
    if let Some(best) = fitting
        .into_iter()
        .max_by(|a, b| (a.free_mib(), &b.id).cmp(&(b.free_mib(), &a.id)))
    {
        return Ok(best.id.clone());
    }
    let mut why = match required {
        Some(id) => format!("node {id} (pinned) cannot take"),
        None => "no node can take".to_string(),
    };
    let _ = write!(
        why,
        " {} and {} vCPU{}:",
        mib(req.memory_mib),
        req.vcpus,
        if req.vcpus == 1 { "" } else { "s" }
    );
    for (i, n) in candidates.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        if !n.up {
            let _ = write!(why, "{sep}{} is not up", n.name);
        } else {
            let _ = write!(
                why,
                "{sep}{} has {} free and {} of {} vCPUs free",
                n.name,
                mib(n.free_mib()),
                n.free_vcpus(),
                n.cpus
            );
        }
    }
    Err(Refusal::NoRoom(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, up: bool, memory_mib: u64, allocated_mib: u64) -> NodeRoom {
        NodeRoom {
            id: id.into(),
            name: format!("name-{id}"),
            up,
            memory_mib,
            cpus: 4,
            allocated_mib,
            allocated_vcpus: 0,
        }
    }

    fn req(memory_mib: u64) -> Request {
        Request {
            memory_mib,
            vcpus: 1,
            pinned: None,
            disk_node: None,
        }
    }

    #[test]
    fn the_up_node_with_most_free_memory_wins() {
        let nodes = [
            node("a", true, 8192, 4096),
            node("b", true, 8192, 1024),
            node("c", false, 65536, 0),
        ];
        assert_eq!(place(&nodes, &req(1024)).unwrap(), "b");
    }

    #[test]
    fn allocated_memory_and_vcpus_count() {
        let mut a = node("a", true, 4096, 3584);
        assert!(place(&[a.clone()], &req(1024)).is_err());
        a.allocated_mib = 0;
        a.allocated_vcpus = 4;
        assert!(place(&[a], &req(1024)).is_err());
    }

    #[test]
    fn a_refusal_names_each_nodes_free_memory() {
        let nodes = [
            node("a", true, 4096, 1024),
            node("b", true, 8192, 0),
            node("c", false, 8192, 0),
        ];
        let e = place(&nodes, &req(16384)).unwrap_err().to_string();
        assert!(e.contains("no node can take 16 GiB"), "{e}");
        assert!(e.contains("name-a has 3 GiB free"), "{e}");
        assert!(e.contains("name-b has 8 GiB free"), "{e}");
        assert!(e.contains("name-c is not up"), "{e}");
    }

    #[test]
    fn a_pinned_node_is_the_only_candidate() {
        let nodes = [node("a", true, 8192, 0), node("b", true, 2048, 0)];
        let mut r = req(1024);
        r.pinned = Some("b".into());
        assert_eq!(place(&nodes, &r).unwrap(), "b");
        r.memory_mib = 4096;
        let e = place(&nodes, &r).unwrap_err().to_string();
        assert!(
            e.contains("node b (pinned)") && e.contains("name-b has 2 GiB free"),
            "{e}"
        );
        r.pinned = Some("zz".into());
        assert_eq!(place(&nodes, &r), Err(Refusal::NoSuchNode("zz".into())));
    }

    #[test]
    fn the_disks_node_is_preferred_and_a_pin_elsewhere_is_honoured() {
        let nodes = [node("a", true, 8192, 0), node("b", true, 2048, 0)];
        let mut r = req(1024);
        r.disk_node = Some("b".into());
        assert_eq!(
            place(&nodes, &r).unwrap(),
            "b",
            "the disk's node, though a has more"
        );
        r.pinned = Some("a".into());
        assert_eq!(place(&nodes, &r).unwrap(), "a", "a pin away from the disk");
        r.pinned = None;
        r.memory_mib = 4096;
        assert_eq!(
            place(&nodes, &r).unwrap(),
            "a",
            "the disk's node has no room"
        );
    }

    #[test]
    fn a_down_disk_node_is_refused() {
        let nodes = [node("a", true, 8192, 0), node("b", false, 8192, 0)];
        let mut r = req(1024);
        r.disk_node = Some("b".into());
        let e = place(&nodes, &r).unwrap_err().to_string();
        assert!(e.contains("name-b, which is not up"), "{e}");
        r.pinned = Some("a".into());
        assert_eq!(
            place(&nodes, &r),
            Err(Refusal::DiskNodeDown("name-b".into()))
        );
    }
}
