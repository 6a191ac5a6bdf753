//! Placement, pure: which up node has room for a VM (memory never overcommitted, vCPUs
//! up to the cluster's overcommit ratio, counting the VMs already placed there), honouring
//! a pinned node and preferring the nodes holding the VM's disk, and why not when none
//! has. A node that failed to set up one of the VM's networks is never chosen: the VM's
//! start would wait there for a bridge that does not come. No I/O: the API handler
//! gathers the inputs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The vCPU overcommit ratio used when the cluster's settings name none: 4 vCPUs per
/// physical CPU (general-purpose guests are idle most of the time; a busy guest on a
/// node that is full of busy guests slows down rather than fails, unlike memory).
pub const DEFAULT_VCPU_OVERCOMMIT: f64 = 4.0;

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
    /// In maintenance mode: it takes no new VMs.
    pub maintenance: bool,
    /// The networks it reported it could not set up, with why (`network_status/<id>`).
    /// A network it has not reported yet is not here: it is being set up.
    pub network_errors: BTreeMap<String, String>,
}

/// How many vCPUs `cpus` physical CPUs may carry at overcommit `ratio` (at least 1:1).
pub fn vcpu_limit(cpus: u64, ratio: f64) -> u64 {
    let ratio = if ratio.is_finite() {
        ratio.max(1.0)
    } else {
        1.0
    };
    // Rounded down: a ratio of 1.5 on 3 CPUs gives 4 vCPUs, not 5.
    (cpus as f64 * ratio).floor() as u64
}

impl NodeRoom {
    fn free_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.allocated_mib)
    }
    fn free_vcpus(&self, ratio: f64) -> u64 {
        vcpu_limit(self.cpus, ratio).saturating_sub(self.allocated_vcpus)
    }
    /// The first of `networks` this node failed to set up, with why.
    fn failed_network<'a>(&'a self, networks: &'a [String]) -> Option<(&'a str, &'a str)> {
        networks.iter().find_map(|net| {
            self.network_errors
                .get(net)
                .map(|e| (net.as_str(), e.as_str()))
        })
    }
}

/// The VM's disk as placement cares about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disk {
    /// The node of the volume's primary copy: the VMM reaches the volume there (over the
    /// store's Unix socket on that node, over TLS NBD from any other), so it must be up.
    pub primary: String,
    /// The other nodes holding an in-sync copy: the next best place (the volume's primary
    /// can move there without copying anything).
    pub in_sync: Vec<String>,
}

/// What is to be placed.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// The node the VM is pinned to, if any.
    pub pinned: Option<String>,
    /// Its (first) disk, if it has one.
    pub disk: Option<Disk>,
    /// vCPUs allowed per physical CPU on each node (the cluster's `vcpu_overcommit`).
    pub vcpu_overcommit: f64,
    /// The networks its NICs join: only a node that has not failed to set them up fits.
    pub networks: Vec<String>,
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

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Picks a node for `req` among `nodes`: the pinned node if given (it must be up and
/// have room); else, among the up nodes with room, the node of the disk's primary copy,
/// then one holding an in-sync copy, then the one with the most free memory. A node has
/// room when its free memory covers the VM's (memory is never overcommitted), the VM has
/// no more vCPUs than the node has CPUs, and its vCPUs fit under the node's CPUs times
/// the overcommit ratio, and it has not failed to set up any of the VM's networks. The
/// disk's primary node must be up in every case.
pub fn place(nodes: &[NodeRoom], req: &Request) -> Result<String, Refusal> {
    if let Some(d) = &req.disk {
        let holder = nodes
            .iter()
            .find(|n| n.id == d.primary)
            .ok_or_else(|| Refusal::NoSuchNode(d.primary.clone()))?;
        if !holder.up {
            return Err(Refusal::DiskNodeDown(holder.name.clone()));
        }
    }
    let ratio = req.vcpu_overcommit;
    let candidates: Vec<&NodeRoom> = match &req.pinned {
        Some(id) => {
            let n = nodes
                .iter()
                .find(|n| &n.id == id)
                .ok_or_else(|| Refusal::NoSuchNode(id.clone()))?;
            vec![n]
        }
        None => nodes.iter().collect(),
    };
    let fits = |n: &&NodeRoom| {
        n.up && !n.maintenance
            && n.free_mib() >= req.memory_mib
            && req.vcpus <= n.cpus
            && n.free_vcpus(ratio) >= req.vcpus
            && n.failed_network(&req.networks).is_none()
    };
    let fitting: Vec<&NodeRoom> = candidates.iter().copied().filter(fits).collect();
    // Most free memory first; the id breaks ties so the choice does not depend on order.
    let roomiest = |ns: Vec<&NodeRoom>| {
        ns.into_iter()
            .max_by(|a, b| (a.free_mib(), &b.id).cmp(&(b.free_mib(), &a.id)))
            .map(|n| n.id.clone())
    };
    if let Some(d) = &req.disk {
        if let Some(primary) = fitting.iter().find(|n| n.id == d.primary) {
            return Ok(primary.id.clone());
        }
        let replicas: Vec<&NodeRoom> = fitting
            .iter()
            .copied()
            .filter(|n| d.in_sync.contains(&n.id))
            .collect();
        if let Some(id) = roomiest(replicas) {
            return Ok(id);
        }
    }
    if let Some(id) = roomiest(fitting) {
        return Ok(id);
    }
    let mut why = match (&req.pinned, candidates.first()) {
        (Some(_), Some(n)) => format!("node {} (pinned) cannot take", n.name),
        _ => "no node can take".to_string(),
    };
    let _ = write!(
        why,
        " {} and {} vCPU{}:",
        mib(req.memory_mib),
        req.vcpus,
        plural(req.vcpus)
    );
    for (i, n) in candidates.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        if !n.up {
            let _ = write!(why, "{sep}{} is not up", n.name);
        } else if n.maintenance {
            let _ = write!(
                why,
                "{sep}{} is in maintenance (it takes no new VMs)",
                n.name
            );
        } else if let Some((net, e)) = n.failed_network(&req.networks) {
            let _ = write!(why, "{sep}{} could not set up network {net} ({e})", n.name);
        } else if req.vcpus > n.cpus {
            let _ = write!(
                why,
                "{sep}{} has {} free but only {} CPU{} (a VM gets at most as many vCPUs as its node has CPUs)",
                n.name,
                mib(n.free_mib()),
                n.cpus,
                plural(n.cpus)
            );
        } else {
            let _ = write!(
                why,
                "{sep}{} has {} free and {} of {} vCPUs free ({} CPU{} x {} overcommit)",
                n.name,
                mib(n.free_mib()),
                n.free_vcpus(ratio),
                vcpu_limit(n.cpus, ratio),
                n.cpus,
                plural(n.cpus),
                ratio
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
            maintenance: false,
            network_errors: BTreeMap::new(),
        }
    }

    fn req(memory_mib: u64) -> Request {
        Request {
            memory_mib,
            vcpus: 1,
            pinned: None,
            disk: None,
            vcpu_overcommit: DEFAULT_VCPU_OVERCOMMIT,
            networks: Vec::new(),
        }
    }

    fn disk(primary: &str, in_sync: &[&str]) -> Option<Disk> {
        Some(Disk {
            primary: primary.into(),
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
        })
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
    fn a_node_in_maintenance_takes_nothing_new() {
        let mut a = node("a", true, 8192, 0);
        a.maintenance = true;
        let nodes = [a.clone(), node("b", true, 4096, 0)];
        assert_eq!(place(&nodes, &req(1024)).unwrap(), "b");
        let mut pinned = req(1024);
        pinned.pinned = Some("a".into());
        let e = place(&nodes, &pinned).unwrap_err().to_string();
        assert!(
            e.contains("node name-a (pinned) cannot take")
                && e.contains("name-a is in maintenance (it takes no new VMs)"),
            "{e}"
        );
    }

    #[test]
    fn allocated_memory_and_vcpus_count() {
        let mut a = node("a", true, 4096, 3584);
        assert!(place(&[a.clone()], &req(1024)).is_err());
        a.allocated_mib = 0;
        // 4 CPUs x 4 = 16 vCPUs.
        a.allocated_vcpus = 15;
        assert_eq!(place(&[a.clone()], &req(1024)).unwrap(), "a");
        a.allocated_vcpus = 16;
        let e = place(&[a], &req(1024)).unwrap_err().to_string();
        assert!(
            e.contains("name-a has 4 GiB free and 0 of 16 vCPUs free (4 CPUs x 4 overcommit)"),
            "{e}"
        );
    }

    #[test]
    fn vcpus_are_overcommitted_up_to_the_ratio_and_memory_never() {
        // Two CPUs: at ratio 4, eight one-vCPU VMs; the ninth is refused.
        let mut a = node("a", true, 1 << 20, 0);
        a.cpus = 2;
        let mut r = req(16);
        for placed in 0..8 {
            a.allocated_vcpus = placed;
            assert_eq!(place(&[a.clone()], &r).unwrap(), "a", "{placed} placed");
        }
        a.allocated_vcpus = 8;
        assert!(place(&[a.clone()], &r).is_err());
        // At 1 (no overcommit) two fit; at 1.5 three (rounded down from 3.0); at 1.75 three.
        r.vcpu_overcommit = 1.0;
        a.allocated_vcpus = 2;
        assert!(place(&[a.clone()], &r).is_err());
        r.vcpu_overcommit = 1.5;
        assert_eq!(place(&[a.clone()], &r).unwrap(), "a");
        a.allocated_vcpus = 3;
        r.vcpu_overcommit = 1.75;
        assert!(place(&[a.clone()], &r).is_err());
        // A ratio below 1 (or not a number) counts as 1.
        assert_eq!(vcpu_limit(2, 0.5), 2);
        assert_eq!(vcpu_limit(2, f64::NAN), 2);
        assert_eq!(vcpu_limit(3, 1.5), 4);
        // Memory: a node whose VMs take all but 15 MiB cannot take 16, whatever the ratio.
        r.vcpu_overcommit = 64.0;
        a.allocated_vcpus = 0;
        a.allocated_mib = a.memory_mib - 15;
        let e = place(&[a], &r).unwrap_err().to_string();
        assert!(e.contains("name-a has 15 MiB free"), "{e}");
    }

    #[test]
    fn a_vm_gets_no_more_vcpus_than_its_node_has_cpus() {
        let mut a = node("a", true, 8192, 0);
        a.cpus = 2;
        let mut r = req(1024);
        r.vcpus = 3;
        let e = place(&[a], &r).unwrap_err().to_string();
        assert!(
            e.contains("no node can take 1 GiB and 3 vCPUs: name-a has 8 GiB free but only 2 CPUs"),
            "{e}"
        );
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
            e.contains("node name-b (pinned) cannot take 4 GiB and 1 vCPU: name-b has 2 GiB free"),
            "{e}"
        );
        r.pinned = Some("zz".into());
        assert_eq!(place(&nodes, &r), Err(Refusal::NoSuchNode("zz".into())));
    }

    #[test]
    fn the_disks_node_is_preferred_and_a_pin_elsewhere_is_honoured() {
        let nodes = [node("a", true, 8192, 0), node("b", true, 2048, 0)];
        let mut r = req(1024);
        r.disk = disk("b", &[]);
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
    fn primary_then_in_sync_replica_then_most_free_memory() {
        let nodes = [
            node("a", true, 2048, 0),
            node("b", true, 4096, 0),
            node("c", true, 8192, 0),
            node("d", true, 65536, 0),
        ];
        let mut r = req(1024);
        // The primary on a, in-sync copies on b and c: a, though it has least room.
        r.disk = disk("a", &["b", "c"]);
        assert_eq!(place(&nodes, &r).unwrap(), "a");
        // The primary's node is full: the in-sync copy with most free memory, c, not
        // d (more memory, no copy).
        r.memory_mib = 3072;
        assert_eq!(place(&nodes, &r).unwrap(), "c");
        // Only the out-of-the-way node has room: d.
        r.memory_mib = 16384;
        assert_eq!(place(&nodes, &r).unwrap(), "d");
        // A pin wins over every copy.
        r.memory_mib = 1024;
        r.pinned = Some("d".into());
        assert_eq!(place(&nodes, &r).unwrap(), "d");
        // A replica's node that is down is skipped; one without room too.
        r.pinned = None;
        r.memory_mib = 3072;
        let mut down = nodes.clone();
        down[2].up = false;
        assert_eq!(place(&down, &r).unwrap(), "b");
        down[1].allocated_mib = 2048;
        assert_eq!(place(&down, &r).unwrap(), "d");
    }

    #[test]
    fn a_down_disk_node_is_refused() {
        let nodes = [node("a", true, 8192, 0), node("b", false, 8192, 0)];
        let mut r = req(1024);
        r.disk = disk("b", &["a"]);
        let e = place(&nodes, &r).unwrap_err().to_string();
        assert!(e.contains("name-b, which is not up"), "{e}");
        r.pinned = Some("a".into());
        assert_eq!(
            place(&nodes, &r),
            Err(Refusal::DiskNodeDown("name-b".into()))
        );
    }

    #[test]
    fn a_node_that_failed_to_set_up_a_network_of_the_vm_is_not_chosen() {
        let mut a = node("a", true, 65536, 0);
        a.network_errors
            .insert("lan".into(), "uplink eth9 does not exist".into());
        let nodes = [a, node("b", true, 4096, 0), node("c", true, 2048, 0)];
        let mut r = req(1024);
        r.networks = vec!["lan".into()];
        // a has most room but no lan; b next.
        assert_eq!(place(&nodes, &r).unwrap(), "b");
        // A network a did set up (or has not reported) does not keep it out.
        r.networks = vec!["dmz".into()];
        assert_eq!(place(&nodes, &r).unwrap(), "a");
        // Even the disk's primary node is passed over for one that has the network.
        r.networks = vec!["dmz".into(), "lan".into()];
        r.disk = disk("a", &["c"]);
        assert_eq!(place(&nodes, &r).unwrap(), "c");
        // Pinned to a: refused, saying why in words.
        r.pinned = Some("a".into());
        let e = place(&nodes, &r).unwrap_err().to_string();
        assert!(
            e.contains("node name-a (pinned) cannot take 1 GiB and 1 vCPU: name-a could not set up network lan (uplink eth9 does not exist)"),
            "{e}"
        );
        // No node has it: each node's reason.
        let mut all = nodes.clone();
        for n in &mut all {
            n.network_errors
                .insert("lan".into(), "VLAN 7: not supported".into());
        }
        r.pinned = None;
        r.disk = None;
        let e = place(&all, &r).unwrap_err().to_string();
        assert!(
            e.contains("no node can take")
                && e.contains("name-b could not set up network lan (VLAN 7: not supported)")
                && e.contains("name-c could not set up network lan"),
            "{e}"
        );
    }
}
