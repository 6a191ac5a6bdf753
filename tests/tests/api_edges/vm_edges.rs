//! VM edits at their edges: `stop_timeout_s` bounds, and a template of a VM whose disk is
//! replicated taking the snapshot path.

use serde_json::json;

use super::call;
use super::idempotency::{post_keyed, wait_ready};

/// `PATCH /vms/{name}` changes `stop_timeout_s` within 1-3600 and refuses the rest,
/// changing nothing.
pub fn patch_stop_timeout(ca: &str, token: &str) {
    let a = call(
        ca,
        2,
        "PATCH",
        "vms/idem-vm",
        Some(token),
        Some(&json!({"stop_timeout_s": 120})),
        &[],
    );
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["stop_timeout_s"], 120, "{}", a.body);
    for bad in [json!(0), json!(3601), json!("5"), json!(1.5)] {
        let a = call(
            ca,
            1,
            "PATCH",
            "vms/idem-vm",
            Some(token),
            Some(&json!({"stop_timeout_s": bad})),
            &[],
        );
        assert_eq!(a.code, 400, "{bad}: {}", a.body);
        if bad.is_u64() {
            assert!(
                a.body.contains("stop_timeout_s must be 1 to 3600"),
                "{bad}: {}",
                a.body
            );
        }
    }
    let vm = call(ca, 3, "GET", "vms/idem-vm", Some(token), None, &[]).json();
    assert_eq!(vm["stop_timeout_s"], 120, "{vm}");
}

/// A VM whose disk is a replicated volume becomes a template exactly when
/// `POST /volumes/{name}/snapshots` would snapshot that volume (one code path): refused
/// alike today (409 "not supported yet for replicated volumes", nothing changed), and
/// made on every copy once replicated snapshots land, never on one copy only.
pub fn a_template_of_a_replicated_disk_follows_the_snapshot_path(ca: &str, token: &str) {
    for v in ["tmpl-r", "tmpl-probe"] {
        let vol = json!({"name": v, "size_bytes": 1048576, "replicas": 2});
        let a = post_keyed(ca, 1, token, "volumes", &vol, None);
        assert_eq!(a.code, 202, "{}", a.body);
    }
    for v in ["tmpl-r", "tmpl-probe"] {
        wait_ready(ca, 1, token, &format!("volumes/{v}"), |v| {
            v["state"] == "ready"
        });
    }
    let vm = json!({"name": "tmpl-vm", "vcpus": 1, "memory_mib": 64, "disks": ["tmpl-r"]});
    let a = post_keyed(ca, 1, token, "vms", &vm, None);
    assert_eq!(a.code, 201, "{}", a.body);
    let probe = post_keyed(
        ca,
        1,
        token,
        "volumes/tmpl-probe/snapshots",
        &json!({"name": "template"}),
        None,
    );
    let a = post_keyed(ca, 2, token, "vms/tmpl-vm/template", &json!({}), None);
    let vm = call(ca, 1, "GET", "vms/tmpl-vm", Some(token), None, &[]).json();
    let v = call(ca, 1, "GET", "volumes/tmpl-r", Some(token), None, &[]).json();
    if probe.code == 409 {
        assert_eq!(
            a.code, 409,
            "snapshot refused ({}) but template: {}",
            probe.body, a.body
        );
        let msg = a.json()["error"].as_str().unwrap().to_string();
        let why = probe.json()["error"]
            .as_str()
            .unwrap()
            .replace("tmpl-probe", "tmpl-r");
        assert_eq!(msg, format!("disks: {why}"));
        assert_eq!(vm["template"], false, "{vm}");
        assert_eq!(v["snapshots"], json!([]), "{v}");
    } else {
        assert_eq!(probe.code, 202, "{}", probe.body);
        assert_eq!(
            a.code, 200,
            "snapshot taken ({}) but template: {}",
            probe.body, a.body
        );
        assert_eq!(vm["template"], true, "{vm}");
        let snaps = v["snapshots"].as_array().unwrap();
        assert!(snaps.iter().any(|s| s["name"] == "template"), "{v}");
    }
}
