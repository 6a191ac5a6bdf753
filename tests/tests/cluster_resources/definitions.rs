//! Networks and VM definitions: validated, conflicts refused with nothing half-made,
//! read-your-writes across nodes, optimistic locking, and what is in use cannot go.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_task};
use tessera_tests::Lan;

use super::accepted_task;
use super::volumes::exports;

/// Networks and VMs through the three nodes, on the volumes `data` and `copy` that
/// [`super::volumes::volumes_snapshots_and_clones`] left; ends with both networks, the VM
/// and `copy` deleted.
pub fn networks_and_vms(lan: &Lan, admin: &str, creds: &Path) {
    let a = Some(admin);
    let post =
        |i: usize, path: &str, body: Value| api(lan, i, "POST", path, a, Some(&body.to_string()));

    // Networks: validated; a bridge is one network.
    for (body, field) in [
        (
            json!({ "name": "lan", "bridge": "a-bridge-name-too-long" }),
            "bridge",
        ),
        (
            json!({ "name": "lan", "bridge": "br1", "vlan": 5000, "uplink": "eth0" }),
            "vlan",
        ),
        (
            json!({ "name": "lan", "bridge": "br1", "uplink": "eth 0" }),
            "uplink",
        ),
    ] {
        let (code, v) = post(0, "networks", body.clone());
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    // Well-formed, but a VLAN without an uplink has nothing to tag: 409.
    let (code, v) = post(
        0,
        "networks",
        json!({ "name": "lan", "bridge": "br1", "vlan": 10 }),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("vlan"), "{v}");
    let (code, v) = post(
        0,
        "networks",
        json!({ "name": "lan", "bridge": "br-lan", "vlan": 10, "uplink": "eth0" }),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = post(1, "networks", json!({ "name": "lan2", "bridge": "br-lan" }));
    assert_eq!(code, 409, "{v}");

    // VMs: defined on node 1, read at once on node 3 (read-your-writes across nodes).
    let (code, v) = post(
        0,
        "vms",
        json!({ "name": "vm1", "vcpus": 2, "memory_mib": 512, "disks": ["copy"], "networks": ["lan"] }),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api(lan, 2, "GET", "vms/vm1", a, None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["disks"], json!(["copy"]));
    assert_eq!(v["actual_state"], "stopped");
    for (body, field) in [
        (
            json!({ "name": "vm2", "vcpus": 0, "memory_mib": 512 }),
            "vcpus",
        ),
        (
            json!({ "name": "vm2", "vcpus": 1, "memory_mib": 1 }),
            "memory_mib",
        ),
        (
            json!({ "name": "vm2", "vcpus": 1, "memory_mib": 64, "desired_state": "flying" }),
            "desired_state",
        ),
        (json!({ "name": "vm2", "vcpus": 1 }), "memory_mib"),
    ] {
        let (code, v) = post(1, "vms", body.clone());
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    // Well-formed, naming a volume the cluster lacks: 404 naming the field.
    let (code, v) = post(
        1,
        "vms",
        json!({ "name": "vm2", "vcpus": 1, "memory_mib": 64, "disks": ["nope"] }),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("disks"), "{v}");
    // The disk is taken: refused, and vm2 does not exist half-made.
    let (code, v) = post(
        1,
        "vms",
        json!({ "name": "vm2", "vcpus": 1, "memory_mib": 64, "disks": ["data", "copy"] }),
    );
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("vm1"), "{v}");
    assert_eq!(api(lan, 0, "GET", "vms/vm2", a, None).0, 404);
    let (_, v) = api(lan, 0, "GET", "volumes/data", a, None);
    assert_eq!(v["attached_to"], Value::Null);
    // Optimistic locking, then an update read back on another node.
    let (code, v) = api(
        lan,
        1,
        "PATCH",
        "vms/vm1",
        a,
        Some(r#"{"vcpus":4,"generation":7}"#),
    );
    assert_eq!(code, 409, "{v}");
    // A listing made before the change (and kept by the node) must not hide it.
    let (_, before) = api(lan, 1, "GET", "vms", a, None);
    assert_eq!(before[0]["vcpus"], 2, "{before}");
    let (code, v) = api(
        lan,
        1,
        "PATCH",
        "vms/vm1",
        a,
        Some(r#"{"vcpus":4,"generation":1}"#),
    );
    let (_, listed) = api(lan, 1, "GET", "vms", a, None);
    assert_eq!(listed[0]["vcpus"], 4, "{listed}");
    assert_eq!(code, 200, "{v}");
    let (_, v) = api(lan, 0, "GET", "vms/vm1", a, None);
    assert_eq!(
        (v["vcpus"].as_u64(), v["generation"].as_u64()),
        (Some(4), Some(2))
    );
    // A network in use cannot go (and stays usable after the refusal).
    let (code, v) = api(lan, 2, "DELETE", "networks/lan", a, None);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("vm1"), "{v}");
    let (_, v) = api(lan, 0, "GET", "networks/lan", a, None);
    assert_eq!(v["deleting"], false, "{v}");
    let (code, v) = post(
        1,
        "vms",
        json!({ "name": "vm9", "vcpus": 1, "memory_mib": 64, "networks": ["nope"] }),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("networks"), "{v}");
    // An attached volume cannot go; after the VM is deleted it can.
    let (code, v) = api(lan, 2, "DELETE", "volumes/copy", a, None);
    assert_eq!(code, 409, "{v}");
    assert_eq!(api(lan, 2, "DELETE", "vms/vm1", a, None).0, 200);
    let id = accepted_task(api(lan, 2, "DELETE", "volumes/copy", a, None));
    assert_eq!(wait_task(lan, 0, admin, &id)["state"], "succeeded");
    assert!(!exports(lan, 1, 2, creds).contains("export=\"copy\""));
    assert_eq!(api(lan, 2, "DELETE", "networks/lan", a, None).0, 200);
    assert_eq!(api(lan, 0, "GET", "networks/lan", a, None).0, 404);
    assert_eq!(api(lan, 0, "GET", "vms", a, None).1, json!([]));
}
