//! The API's resources on a three-node cluster in network namespaces, each node with its
//! own `tessera-store`: every endpoint of the OpenAPI document refuses missing (401) and
//! under-privileged (403) credentials; the CLI only uses operations the document has;
//! volumes, snapshots and clones are made by tasks on the owning node and checked with
//! nbdinfo and qemu-io; VM definitions, conflicts and bad input leave nothing
//! half-written; a write on one node is read back at once on another; events arrive on
//! the SSE stream; session cookies need the CSRF header for changes; the state and a
//! node's metrics history survive a restart of every node.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tessera_tests::cluster::{admin_session, api, curl, wait_for, ClusterNode};
use tessera_tests::{bin, output, Lan};

#[path = "cluster_resources/access.rs"]
mod access;
#[path = "cluster_resources/definitions.rs"]
mod definitions;
#[path = "cluster_resources/events.rs"]
mod events;
#[path = "cluster_resources/metrics_history.rs"]
mod metrics_history;
#[path = "cluster_resources/sessions.rs"]
mod sessions;
#[path = "cluster_resources/volumes.rs"]
mod volumes;

const PASSWORD: &str = "a much better password";

#[test]
fn every_endpoint_refuses_missing_and_underprivileged_credentials() {
    let test = "every_endpoint_refuses_missing_and_underprivileged_credentials";
    let Some(lan) = Lan::new(test, 3) else {
        return;
    };
    tessera_tests::require("curl");
    let d = tempfile::tempdir().unwrap();
    let nodes: Vec<ClusterNode> = (0..3)
        .map(|i| ClusterNode::start(&lan, i, d.path(), 3, false))
        .collect();
    let admin = admin_session(&lan, &nodes, 0, PASSWORD);

    // The document is public and lists exactly the operations of the table above.
    let (code, text) = curl(&lan, 1, "openapi.json", &[]);
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented = access::operations(&doc);
    let table: BTreeSet<(String, String)> = access::ROLES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, table,
        "every documented operation needs an entry here (and the reverse)"
    );

    // The CLI uses only documented operations.
    let cli = output(std::process::Command::new(bin("tessera")).arg("api-endpoints"));
    assert!(cli.status.success());
    let used: Vec<(String, String)> = String::from_utf8_lossy(&cli.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert!(used.len() >= 20, "{used:?}");
    for op in &used {
        assert!(
            documented.contains(op),
            "the CLI uses {op:?}, not in the API"
        );
    }

    // Principals: an administrator that must still change its password, an auditor and
    // an operator token.
    let (code, v) = api(
        &lan,
        0,
        "POST",
        "users",
        Some(&admin),
        Some(&json!({ "username": "fresh", "password": "initial password 1", "role": "administrator" }).to_string()),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api(
        &lan,
        2,
        "POST",
        "login",
        None,
        Some(r#"{"username":"fresh","password":"initial password 1"}"#),
    );
    assert_eq!(code, 200, "{v}");
    let must_change = v["token"].as_str().unwrap().to_string();
    let auditor = access::token(&lan, &admin, "auditor");
    let operator = access::token(&lan, &admin, "operator");

    for (method, path, least) in access::ROLES {
        let url = path
            .trim_start_matches("/api/v1/")
            .replace("{id}", "x")
            .replace("{name}", "x")
            .replace("{snapshot}", "x")
            .replace("{username}", "x");
        let body = (*method != "GET" && *method != "DELETE").then_some("{}");
        if *least == "public" {
            continue;
        }
        let (code, v) = api(&lan, 1, method, &url, None, body);
        assert_eq!(code, 401, "{method} {path} without credentials: {v}");
        let (code, v) = api(&lan, 1, method, &url, Some("0123456789abcdef"), body);
        assert_eq!(code, 401, "{method} {path} with a made-up token: {v}");
        let under = match *least {
            "any" => continue,
            "auditor" => &must_change,
            "operator" => &auditor,
            _ => &operator,
        };
        let (code, v) = api(&lan, 1, method, &url, Some(under), body);
        assert_eq!(
            code, 403,
            "{method} {path} as an under-privileged principal: {v}"
        );
        assert!(v["error"].as_str().is_some(), "{method} {path}: {v}");
    }

    // Removing a node: refused while it is up; once it is down, it leaves the Raft
    // membership and the node list, and the cluster goes on writing.
    let mut nodes = nodes;
    let ids = ids_by_index(&lan, &admin);
    let a = Some(admin.as_str());
    let (code, v) = api(&lan, 0, "DELETE", &format!("nodes/{}", ids[2]), a, None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("only a down node"),
        "{v}"
    );
    nodes[2].kill_tesserad();
    wait_for("node 3 reported down", 10, || {
        let (_, v) = api(&lan, 0, "GET", "nodes", a, None);
        v.as_array()?
            .iter()
            .any(|n| n["id"] == ids[2].as_str() && n["state"] == "down")
            .then_some(())
    });
    let (code, v) = api(&lan, 1, "DELETE", &format!("nodes/{}", ids[2]), a, None);
    assert_eq!(code, 200, "{v}");
    let (_, v) = api(&lan, 0, "GET", "cluster", a, None);
    assert_eq!(v["voters"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["members"].as_array().unwrap().len(), 2, "{v}");
    let (_, v) = api(&lan, 0, "GET", "nodes", a, None);
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    let (code, v) = api(
        &lan,
        1,
        "POST",
        "vms",
        a,
        Some(r#"{"name":"after-removal","vcpus":1,"memory_mib":64}"#),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        api(&lan, 0, "DELETE", &format!("nodes/{}", ids[2]), a, None).0,
        404
    );
    drop(nodes);
}

fn ids_by_index(lan: &Lan, admin: &str) -> Vec<String> {
    let v = wait_for("three registered nodes", 30, || {
        let (code, v) = api(lan, 0, "GET", "nodes", Some(admin), None);
        (code == 200 && v.as_array().is_some_and(|l| l.len() == 3)).then_some(v)
    });
    (0..3)
        .map(|i| {
            let addr = format!("{}:7946", Lan::addr(i));
            v.as_array()
                .unwrap()
                .iter()
                .find(|n| n["address"] == addr.as_str())
                .map(|n| n["id"].as_str().unwrap().to_string())
                .unwrap()
        })
        .collect()
}

fn accepted_task(r: (u16, Value)) -> String {
    assert_eq!(r.0, 202, "{}", r.1);
    assert_eq!(r.1["state"], "queued", "{}", r.1);
    r.1["id"].as_str().unwrap().to_string()
}

#[test]
fn volumes_vms_tasks_and_events_through_the_api() {
    let test = "volumes_vms_tasks_and_events_through_the_api";
    let Some(lan) = Lan::new(test, 3) else {
        return;
    };
    for t in ["curl", "nbdinfo", "qemu-io"] {
        tessera_tests::require(t);
    }
    let d = tempfile::tempdir().unwrap();
    let mut nodes: Vec<ClusterNode> = (0..3)
        .map(|i| ClusterNode::start(&lan, i, d.path(), 3, true))
        .collect();
    let admin = admin_session(&lan, &nodes, 0, PASSWORD);
    let ids = ids_by_index(&lan, &admin);
    let a = Some(admin.as_str());

    let creds = d.path().join("nbd-creds");
    volumes::volumes_snapshots_and_clones(&lan, &nodes, &admin, &ids, &creds);
    definitions::networks_and_vms(&lan, &admin, &creds);
    events::events_recorded_and_streamed(&lan, &admin);

    sessions::check_session_cookies(&lan, d.path());
    sessions::check_users_and_their_sessions(&lan, &admin);

    // Restart every node: the state is all there, and node 1's metrics history.
    let (_, before_vms) = api(&lan, 0, "GET", "vms", a, None);
    let (_, before_vols) = api(&lan, 0, "GET", "volumes", a, None);
    let node1_data = nodes[1].dir.join("data");
    let history = metrics_history::before_restart(&lan, &admin, &ids[1], &node1_data);
    for n in nodes.iter_mut() {
        n.kill_tesserad();
    }
    for n in nodes.iter_mut() {
        n.start_tesserad(&lan);
    }
    let after_vms = wait_for("the API after a full restart", 60, || {
        let (code, v) = api(&lan, 1, "GET", "vms", a, None);
        (code == 200).then_some(v)
    });
    assert_eq!(after_vms, before_vms);
    // Each node answers once it has a leader again; node 2 may still be waiting for one
    // after node 1 answered (CI: its body was not the list but a refusal).
    let after_vols = wait_for("node 2's volumes after a full restart", 60, || {
        let (code, v) = api(&lan, 2, "GET", "volumes", a, None);
        (code == 200).then_some(v)
    });
    assert_eq!(after_vols, before_vols);
    let names: Vec<&str> = after_vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cookied", "olgas", "streamed"]);
    metrics_history::kept_across_the_restart(&lan, &admin, &ids[1], 1, &node1_data, &history);
    drop(nodes);
}
