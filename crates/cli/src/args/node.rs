//! `tessera node`'s subcommands and options.

use clap::Subcommand;

use super::parse_on_off;

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List the nodes and their health.
    Ls,
    /// Remove a dead node from the cluster (wipe it before starting it again).
    Rm {
        /// Node name or id.
        id: String,
        /// Even if it looks up or still holds volumes.
        #[arg(long)]
        force: bool,
    },
    /// Put a node in maintenance (its running VMs move away by live migration, one at a
    /// time; it takes no new VMs) or take it out (none moves back by itself).
    Maintenance {
        /// Node name or id.
        id: String,
        /// on or off.
        #[arg(value_parser = parse_on_off, action = clap::ArgAction::Set, required = true)]
        state: bool,
        /// With on: wait until no VM is left on the node (at most 10 minutes), showing
        /// the drain; fails naming the VMs left.
        #[arg(long)]
        wait: bool,
    },
    /// Upgrade nodes booted from the node image, one at a time: wait until the cluster
    /// is whole (every node up with a healthy store, a leader, every volume's copies in
    /// sync), drain, send the new root file system, follow the reboot until the node
    /// runs it healthy, next node. Stops at the first node that does not come back on
    /// its new slot, and before a node whose reboot would cost the cluster its quorum
    /// or a volume its last in-sync copies (docs/image.md).
    Upgrade {
        /// Node names or ids, in the order to upgrade them (each once).
        #[arg(required = true)]
        nodes: Vec<String>,
        /// The new image's root file system (tessera-root.img from image/build), its blake3 in IMAGE.b3.
        #[arg(long)]
        image: std::path::PathBuf,
        /// Boots the new slot may take to come back healthy, 1-10 (default 3).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10))]
        tries: Option<u32>,
        /// Seconds one node may take from the image sent to healthy on the new slot.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Do not drain first (the node's VMs stop with its reboot).
        #[arg(long)]
        no_drain: bool,
        /// Seconds to wait, before each node, for the cluster to be whole (the previous
        /// node back, copies caught up); then it stops saying what is missing.
        #[arg(long, default_value_t = 900)]
        settle: u64,
    },
}
