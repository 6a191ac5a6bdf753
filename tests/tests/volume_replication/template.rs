//! A VM created from a template whose disk has three copies: its disk is a clone with
//! three copies too, replicated from birth, each equal to the template's snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::helpers::{all_in_sync, call, payload, read_hash, wait_task, wait_volume, write, MIB};

/// Volume `a` (three copies, primary node1) becomes the disk of a VM made a template;
/// a VM created from it gets `from-t-disk0`: three copies on the same nodes with the same
/// primary, generation 1, in sync, each store's copy blake3-equal to `a@template`; a
/// write through its primary reaches all three. Everything made here is deleted after.
pub(crate) fn vm_from_template_gets_a_replicated_disk(ca: &str, t: &str, dir: &Path, tmp: &Path) {
    let a = wait_volume(ca, 2, t, "a", 1, |_| true);
    let vm = json!({"name": "tpl", "vcpus": 1, "memory_mib": 64, "disks": ["a"]});
    let (c, v) = call(ca, 2, "POST", "vms", Some(t), Some(&vm));
    assert_eq!(c, 201, "{v}");
    let (c, v) = call(ca, 2, "POST", "vms/tpl/template", Some(t), None);
    assert_eq!(c, 200, "{v}");
    // The template's snapshot is taken by every copy through the stream.
    wait_volume(ca, 2, t, "a", 30, |v| {
        v["snapshots"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "template" && s["state"] == "ready")
        })
    });
    let snap = read_hash(dir, 1, "a@template", tmp);
    for i in 2..=3 {
        assert_eq!(
            read_hash(dir, i, "a@template", tmp),
            snap,
            "a@template on node{i}"
        );
    }

    let (c, v) = call(
        ca,
        2,
        "POST",
        "vms",
        Some(t),
        Some(&json!({"name": "from-t", "vcpus": 1, "memory_mib": 64, "from": "tpl"})),
    );
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["disks"], json!(["from-t-disk0"]), "{v}");
    let d = wait_volume(ca, 2, t, "from-t-disk0", 60, |v| {
        v["state"] == "ready" && all_in_sync(v)
    });
    let r = &d["replication"];
    assert_eq!(r["replicas"], 3, "{d}");
    assert_eq!(r["generation"], 1, "{d}");
    assert_eq!(r["primary"], a["replication"]["primary"], "{d}");
    assert_eq!(d["origin"], "a@template", "{d}");
    let nodes = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["replication"]["copies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["node"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(nodes(&d), nodes(&a), "the clone's copies are where a's are");
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "from-t-disk0", tmp),
            snap,
            "from-t-disk0 on node{i}"
        );
    }
    // Replicated from birth: a write through its primary (node1) reaches every copy.
    let (f, h) = payload(tmp, "from-t", 8 * MIB);
    assert!(write(dir, 1, "from-t-disk0", &f));
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "from-t-disk0", tmp),
            h,
            "from-t-disk0 written, node{i}"
        );
    }

    // Cleanup: the VMs (their claims go), the clone, the template's snapshot.
    for vm in ["from-t", "tpl"] {
        let (c, v) = call(ca, 2, "DELETE", &format!("vms/{vm}"), Some(t), None);
        assert_eq!(c, 200, "{v}");
    }
    let (c, task) = call(ca, 2, "DELETE", "volumes/from-t-disk0", Some(t), None);
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 2, t, &task)["state"], "succeeded");
    let (c, task) = call(
        ca,
        2,
        "DELETE",
        "volumes/a/snapshots/template",
        Some(t),
        None,
    );
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 2, t, &task)["state"], "succeeded");
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(ca, 2, "GET", "volumes/from-t-disk0", Some(t), None).0 != 404 {
        assert!(Instant::now() < deadline, "from-t-disk0 not deleted");
        std::thread::sleep(Duration::from_millis(200));
    }
}
