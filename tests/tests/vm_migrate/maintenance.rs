//! Maintenance mode on the migration test's cluster: node0, running the counting guest,
//! goes into maintenance with the CLI (`--wait`): the guest moves away by live migration
//! and counts on with no boot banner, the node shows drained, a start pinned to it and a
//! migration to it are refused naming the maintenance. An Operator may not turn it on, and
//! bad requests change nothing. Out of maintenance, a start pinned to node0 works again and
//! the guest stays where the drain put it.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task};
use tessera_tests::vms::{cli, console, last_count, vm, VmCluster};

/// node0 as `GET /nodes` shows it.
fn node0(c: &VmCluster, t: &str, id: &str) -> Value {
    let (code, v) = api(&c.lan, 2, "GET", "nodes", Some(t), None);
    assert_eq!(code, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no node {id}: {v}"))
}

/// `POST /nodes/{id}/maintenance` through node 1.
fn set(c: &VmCluster, t: &str, id: &str, body: &str) -> (u16, Value) {
    api(
        &c.lan,
        1,
        "POST",
        &format!("nodes/{id}/maintenance"),
        Some(t),
        Some(body),
    )
}

/// Returns the index of the node the guest went to. `runs` are the consoles of the guest's runs before the one on node0, where it runs now
/// (read before: a VMM arriving on a node starts its console anew).
pub fn node0_drained_by_live_migration(
    c: &VmCluster,
    t: &str,
    home: &Path,
    ids: &[String],
    runs: &[String],
    assert_one_run: fn(&[&str]),
) -> usize {
    let (lan, nodes) = (&c.lan, &c.nodes);
    // An Operator may not; bad requests are refused; none changes anything.
    let body = json!({"role": "operator", "expires_in_s": 3600}).to_string();
    let (code, v) = api(lan, 0, "POST", "tokens", Some(t), Some(&body));
    assert_eq!(code, 201, "{v}");
    let operator = v["token"].as_str().unwrap().to_string();
    let on = json!({"enabled": true}).to_string();
    let (code, v) = set(c, &operator, &ids[0], &on);
    assert_eq!(code, 403, "an Operator put a node in maintenance: {v}");
    for (id, body, want, words) in [
        (ids[0].as_str(), r#"{"enabled": "yes"}"#, 400, "enabled"),
        (
            ids[0].as_str(),
            r#"{"enabled": true, "x": 1}"#,
            400,
            "unknown field",
        ),
        (ids[0].as_str(), "{}", 400, "enabled"),
        ("nowhere", on.as_str(), 404, "no node nowhere"),
    ] {
        let (code, v) = set(c, t, id, body);
        assert_eq!(code, want, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{body}: {v}");
    }
    assert_eq!(node0(c, t, &ids[0])["maintenance"], Value::Null);
    assert_eq!(vm(lan, 0, t, "mover")["running_on"], ids[0].as_str());

    // --- node0 in maintenance: the guest leaves it by live migration.
    let before = last_count(&nodes[0].dir, "mover").unwrap();
    let (ok, out, err) = cli(
        lan,
        0,
        home,
        &["node", "maintenance", "node0", "on", "--wait"],
        "",
    );
    assert!(ok, "{out}{err}\n{}", nodes[0].logs());
    assert!(out.contains("node node0 drained"), "{out}");
    let v = vm(lan, 0, t, "mover");
    let to = ids
        .iter()
        .position(|id| v["placed_on"] == id.as_str())
        .unwrap_or_else(|| panic!("placed nowhere: {v}"));
    assert_ne!(to, 0, "still on node0: {v}");
    wait_for("the guest to count on its new node", 30, || {
        (last_count(&nodes[to].dir, "mover") > Some(before + 10)).then_some(())
    });
    let node0_run = console(&nodes[0].dir, "mover");
    let new_run = console(&nodes[to].dir, "mover");
    let mut all: Vec<&str> = runs.iter().map(String::as_str).collect();
    all.extend([node0_run.as_str(), new_run.as_str()]);
    assert_one_run(&all);
    let n = node0(c, t, &ids[0]);
    let m = &n["maintenance"];
    assert_eq!(m["drained"], true, "{n}");
    assert_eq!(m["vms_left"], json!([]), "{n}");
    assert_eq!(m["by"], "admin", "{n}");
    let (ok, out, err) = cli(lan, 1, home, &["node", "ls"], "");
    assert!(ok && out.contains("(maintenance, drained)"), "{out}{err}");
    let (code, events) = api(lan, 0, "GET", "events", Some(t), None);
    assert_eq!(code, 200);
    let events = events.to_string();
    assert!(events.contains("node.maintenance"), "{events}");
    assert!(
        events.contains(&format!("{} drained", ids[0])),
        "no drained event: {events}"
    );

    // --- Nothing new goes there: a start pinned to it, a migration to it.
    let (code, v) = api(lan, 0, "POST", "vms/hog/start", Some(t), None);
    assert_eq!(code, 409, "{v}");
    let why = v["error"].as_str().unwrap();
    assert!(why.contains("node0 is in maintenance"), "{v}");
    assert_eq!(vm(lan, 0, t, "hog")["desired_state"], "stopped");
    let (code, v) = api(
        lan,
        2,
        "POST",
        "vms/mover/migrate",
        Some(t),
        Some(&json!({"to": "node0"}).to_string()),
    );
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("in maintenance"),
        "{v}"
    );
    // Asking again for what is already so changes nothing.
    let (code, v) = set(c, t, &ids[0], &on);
    assert_eq!((code, &v), (200, &json!({"enabled": true})));

    // --- Out of maintenance: node0 takes VMs again; the guest is not moved back.
    let (ok, out, err) = cli(lan, 0, home, &["node", "maintenance", "node0", "off"], "");
    assert!(ok && out.contains("out of maintenance"), "{out}{err}");
    assert_eq!(node0(c, t, &ids[0])["maintenance"], Value::Null);
    let (code, v) = api(lan, 0, "POST", "vms/hog/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    assert_eq!(vm(lan, 0, t, "hog")["running_on"], ids[0].as_str());
    let v = vm(lan, 0, t, "mover");
    assert_eq!(v["placed_on"], ids[to].as_str(), "moved back: {v}");
    to
}
