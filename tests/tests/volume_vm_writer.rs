//! While a VM runs, only its own VMM writes its volume, also on the VM's own node (issue
//! #8): on the README's local three-node cluster, a test guest on node 1 counts and
//! writes every fifth count to its disk (a one-copy volume on node 1). qemu-io, a client
//! we did not write, connects to node 1's store socket — the socket the VMM uses: its
//! write is refused (EPERM; the store's log names the VM), what it tried to write is not
//! on the volume, a read through the same connection is served, and the guest keeps
//! counting and its own writes keep landing.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;

use tessera_tests::cluster::wait_for;
use tessera_tests::devcluster::{api, node_dir, DevCluster, VmmKiller};
use tessera_tests::replicas::{
    create_volume, read_hash, start_idle_vm, store_logs, unix_uri, QemuIo,
};
use tessera_tests::vms::{counting, last_count};
use tessera_tests::{kvm_or_skip, require};

/// The test guest (built by tests/build.rs).
const GUEST: &str = env!("TESSERA_TEST_GUEST");
const SIZE: u64 = 16 * 1024 * 1024;

/// The count the guest last wrote to its disk (`COUNT=<k>` in sector 1), read through
/// node 1's store.
fn count_on_disk(dir: &Path, tmp: &Path) -> Option<u64> {
    read_hash(dir, 1, "vmdisk", tmp);
    let data = std::fs::read(tmp.join("read-vmdisk-1")).unwrap();
    let sector = &data[512..1024];
    let text = sector.strip_prefix(b"COUNT=")?;
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    String::from_utf8(digits).ok()?.parse().ok()
}

#[test]
fn a_second_writer_on_the_vms_own_node_is_refused_and_the_guest_keeps_writing() {
    if !kvm_or_skip("a_second_writer_on_the_vms_own_node_is_refused_and_the_guest_keeps_writing") {
        return;
    }
    for tool in ["nbdcopy", "qemu-io", "stdbuf"] {
        require(tool);
    }
    let cluster = DevCluster::admin_with_nodes("volume vm writer admin password");
    // The volume is read to the scratch directory: beside the cluster's nodes, gone with them.
    let (dir, tmp) = (cluster.dir(), cluster.scratch());
    let (ca, t) = (cluster.ca(), cluster.token());
    let _reaper = VmmKiller::of(dir);
    let node1 = cluster.id(1);
    create_volume(ca, t, "vmdisk", SIZE, 1, &node1);
    start_idle_vm(ca, t, "user", "vmdisk", &node1, GUEST);
    // The VMM writes through the store's Unix socket: its writes are admitted.
    let written = wait_for("the guest's first count on its disk", 60, || {
        count_on_disk(dir, tmp)
    });

    let mut q = QemuIo::start(&unix_uri(dir, 1, "vmdisk"));
    let refused = q.run("write -P 0x5a 1M 64k");
    assert!(
        refused.contains("failed") && refused.contains("Operation not permitted"),
        "qemu-io's write through node1 (the VM's node): {refused}\n{}",
        store_logs(dir, 30)
    );
    let log = std::fs::read_to_string(dir.join("node1/store.log")).unwrap();
    assert!(
        log.contains("volume vmdisk is in use by VM user")
            && log.contains("only its VMM writes it"),
        "{}",
        store_logs(dir, 30)
    );
    // A write-zeroes is a write too.
    let zeroes = q.run("write -z 0 4k");
    assert!(zeroes.contains("failed"), "write -z: {zeroes}");
    // The same connection reads, and nothing of the refused writes is there: sector 0
    // still holds the guest's marker, the range qemu-io wrote still reads as zeros.
    let read = q.run("read -P 0 1M 64k");
    assert!(read.contains("read 65536/65536 bytes"), "{read}");
    read_hash(dir, 1, "vmdisk", tmp);
    let data = std::fs::read(tmp.join("read-vmdisk-1")).unwrap();
    assert!(
        data.starts_with(b"TESSERA-MARK-BEFORE-SNAPSHOT"),
        "sector 0: {:?}",
        String::from_utf8_lossy(&data[..40])
    );
    drop(q);

    // The guest runs on, and its own writes still land.
    let node1_dir = node_dir(dir, 1);
    counting(&node1_dir, "user");
    let later = wait_for("the guest's writes to pass its count", 60, || {
        count_on_disk(dir, tmp).filter(|k| *k > written)
    });
    eprintln!(
        "guest wrote COUNT={written} before the refused client, COUNT={later} after; console at {:?}",
        last_count(&node1_dir, "user")
    );
    let (_, vm) = api(ca, 1, "GET", "vms/user", Some(t), None);
    assert_eq!(vm["actual_state"], "running", "{vm}");
}
