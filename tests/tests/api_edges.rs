//! The REST API's edges on the README's local three-node cluster (one start for every
//! check): failed logins back off per address (429 with Retry-After) while the right
//! password from another address still gets in; hundreds of idle connections do not keep
//! a real request out; a slow-loris client is cut off at the header deadline; a create
//! with an `Idempotency-Key` retried gets its first answer (volumes, snapshots, clones,
//! users, networks, VMs; a token create retried is 409 naming the token, never its
//! secret); `PATCH /vms` changes `stop_timeout_s` within 1-3600; a VM with a replicated
//! disk cannot become a template (the snapshot path refuses it); an uploaded API
//! certificate is checked, then served by every node for its name, and removed again;
//! creates in flight while the leader is killed are answered 202 or 503
//! with an outcome (never Raft's internals), and their retries with the same key never
//! 409; a task for the killed (down) node fails within a bounded time naming the node,
//! releasing the volume it reserved.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

#[path = "api_edges/certificate.rs"]
mod certificate;
#[path = "api_edges/front_door.rs"]
mod front_door;
#[path = "api_edges/idempotency.rs"]
mod idempotency;
#[path = "api_edges/leader_loss.rs"]
mod leader_loss;
#[path = "api_edges/vm_edges.rs"]
mod vm_edges;

use std::time::Duration;

use serde_json::{json, Value};
use tessera_tests::devcluster::{self, Answer, DevCluster};
use tessera_tests::require;

/// A request to node `node` (1-3), `path` under `/api/v1/`, with more arguments for curl.
fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    extra: &[&str],
) -> Answer {
    let path = format!("/api/v1/{path}");
    devcluster::call_with(
        ca,
        node,
        method,
        &path,
        token,
        body,
        Duration::from_secs(30),
        extra,
    )
}

fn login_from(ca: &str, node: u8, from: &str, password: &str) -> Answer {
    call(
        ca,
        node,
        "POST",
        "login",
        None,
        Some(&json!({"username": "admin", "password": password})),
        &["--interface", from],
    )
}

#[test]
fn the_api_holds_its_edges() {
    require("curl");
    let d = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(d.path());
    let (password, ca) = (cluster.admin_password(), cluster.ca_file());

    require("openssl");
    let a = login_from(&ca, 1, "127.0.0.1", &password);
    assert_eq!(a.code, 200, "{}", a.body);
    let first = a.json()["token"].as_str().unwrap().to_string();
    let token = {
        let new = "api edges admin password";
        let a = call(
            &ca,
            1,
            "POST",
            "password",
            Some(&first),
            Some(&json!({"old_password": password, "new_password": new})),
            &[],
        );
        assert_eq!(a.code, 200, "{}", a.body);
        let a = login_from(&ca, 1, "127.0.0.1", new);
        assert_eq!(a.code, 200, "{}", a.body);
        a.json()["token"].as_str().unwrap().to_string()
    };
    let password = "api edges admin password".to_string();

    front_door::idle_connections_do_not_keep_a_request_out(&ca, &token);
    front_door::a_slow_loris_is_cut_off(&ca);
    idempotency::an_idempotent_create_retried_gets_its_first_answer(&ca, 1, &token);
    idempotency::idempotent_creates_of_users_and_networks(&ca, &token);
    idempotency::idempotent_vms_and_tokens(&ca, &token);
    vm_edges::patch_stop_timeout(&ca, &token);
    vm_edges::a_template_of_a_replicated_disk_follows_the_snapshot_path(&ca, &token);
    certificate::an_installed_certificate_is_served_by_every_node(&ca, &token);

    let l = leader_loss::leader(&ca, 1, &token);
    let f = if l == 1 { 2 } else { 1 };
    leader_loss::creates_survive_the_leader_dying(d.path(), &ca, f, l, &token);
    leader_loss::a_task_for_a_down_node_fails_naming_it(&ca, f, l, &token);

    front_door::failed_logins_back_off_per_address(&ca, f, &password);

    cluster.stop();
}
