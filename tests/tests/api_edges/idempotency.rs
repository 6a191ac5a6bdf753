//! Creates with an `Idempotency-Key`: a retry (on any node) gets the first answer, the
//! same key for another request is 409; tokens are never replayed. No answer shows
//! Raft's internals.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{call, Answer};

/// No answer shows Raft's internals.
fn assert_no_internals(a: &Answer) {
    let lower = a.body.to_lowercase();
    assert!(
        !lower.contains("basicnode") && !lower.contains("raft"),
        "an answer shows Raft's internals: {} {}",
        a.code,
        a.body
    );
}

pub fn create_volume(ca: &str, node: u8, token: &str, body: &Value, key: Option<&str>) -> Answer {
    let h;
    let extra: Vec<&str> = match key {
        Some(k) => {
            h = format!("Idempotency-Key: {k}");
            vec!["-H", &h]
        }
        None => vec![],
    };
    let a = call(ca, node, "POST", "volumes", Some(token), Some(body), &extra);
    assert_no_internals(&a);
    a
}

/// A retry with the same key and body gets the first answer (the same task); the same
/// key with another body, or a plain retry, is a conflict.
pub fn an_idempotent_create_retried_gets_its_first_answer(ca: &str, node: u8, token: &str) {
    let body = json!({"name": "idem-a", "size_bytes": 1048576, "replicas": 1});
    let first = create_volume(ca, node, token, &body, Some("key-1"));
    assert_eq!(first.code, 202, "{}", first.body);
    let again = create_volume(ca, node, token, &body, Some("key-1"));
    assert_eq!(again.code, 202, "{}", again.body);
    assert_eq!(first.json()["id"], again.json()["id"], "{}", again.body);
    let other = json!({"name": "idem-a", "size_bytes": 2097152, "replicas": 1});
    assert_eq!(
        create_volume(ca, node, token, &other, Some("key-1")).code,
        409
    );
    assert_eq!(create_volume(ca, node, token, &body, None).code, 409);
    assert_eq!(
        create_volume(ca, node, token, &body, Some("bad key!")).code,
        400
    );
    // Snapshots and clones take a key too (the same mechanism): once the volume is ready.
    wait_ready(ca, node, token, "volumes/idem-a", |v| v["state"] == "ready");
    let post =
        |path: &str, body: &Value, key: Option<&str>| post_keyed(ca, node, token, path, body, key);
    let snap = json!({"name": "s1"});
    let first = post("volumes/idem-a/snapshots", &snap, Some("snap-1"));
    assert_eq!(first.code, 202, "{}", first.body);
    let again = post("volumes/idem-a/snapshots", &snap, Some("snap-1"));
    assert_eq!(again.code, 202, "{}", again.body);
    assert_eq!(first.json()["id"], again.json()["id"], "{}", again.body);
    assert_eq!(post("volumes/idem-a/snapshots", &snap, None).code, 409);
    wait_ready(ca, node, token, "volumes/idem-a", |v| {
        v["snapshots"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "s1" && s["state"] == "ready"))
    });
    let clone = json!({"snapshot": "s1", "name": "idem-c"});
    let first = post("volumes/idem-a/clone", &clone, Some("clone-1"));
    assert_eq!(first.code, 202, "{}", first.body);
    let again = post("volumes/idem-a/clone", &clone, Some("clone-1"));
    assert_eq!(again.code, 202, "{}", again.body);
    assert_eq!(first.json()["id"], again.json()["id"], "{}", again.body);
    assert_eq!(post("volumes/idem-a/clone", &clone, None).code, 409);
    // The same key for another request is refused.
    let other = json!({"snapshot": "s1", "name": "idem-d"});
    assert_eq!(
        post("volumes/idem-a/clone", &other, Some("clone-1")).code,
        409
    );
}

/// Creates that are not tasks (users, networks) take an `Idempotency-Key` too: a retry
/// with the same key and body, on another node, gets the first answer (201, the same
/// record) as if the first answer had been lost; the same key for another request is 409;
/// a retry without a key is the plain 409 of an existing record.
pub fn idempotent_creates_of_users_and_networks(ca: &str, token: &str) {
    let post = |node: u8, path: &str, body: &Value, key: Option<&str>| {
        post_keyed(ca, node, token, path, body, key)
    };
    let net = json!({"name": "idem-net", "bridge": "br-idem"});
    let first = post(1, "networks", &net, Some("net-1"));
    assert_eq!(first.code, 201, "{}", first.body);
    let again = post(2, "networks", &net, Some("net-1"));
    assert_eq!(again.code, 201, "{}", again.body);
    assert_eq!(first.json(), again.json());
    let other = json!({"name": "idem-net", "bridge": "br-other"});
    let a = post(1, "networks", &other, Some("net-1"));
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(a.body.contains("Idempotency-Key"), "{}", a.body);
    let a = post(1, "networks", &net, None);
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(a.body.contains("idem-net"), "{}", a.body);

    let user =
        json!({"username": "idem-user", "password": "idem user password", "role": "auditor"});
    let first = post(1, "users", &user, Some("user-1"));
    assert_eq!(first.code, 201, "{}", first.body);
    let again = post(3, "users", &user, Some("user-1"));
    assert_eq!(again.code, 201, "{}", again.body);
    assert_eq!(first.json(), again.json());
    let other =
        json!({"username": "idem-other", "password": "idem user password", "role": "auditor"});
    let a = post(1, "users", &other, Some("user-1"));
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(a.body.contains("Idempotency-Key"), "{}", a.body);
    let a = post(1, "users", &user, None);
    assert_eq!(a.code, 409, "{}", a.body);
    // One user and one network were made.
    let users = call(ca, 1, "GET", "users", Some(token), None, &[]).json();
    let n = users
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u.to_string().contains("idem-"))
        .count();
    assert_eq!(n, 1, "{users}");
}

/// POST with an optional `Idempotency-Key` to node `node`, checking no Raft internals show.
pub fn post_keyed(
    ca: &str,
    node: u8,
    token: &str,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> Answer {
    let h = key.map(|k| format!("Idempotency-Key: {k}"));
    let extra: Vec<&str> = h.iter().flat_map(|h| ["-H", h.as_str()]).collect();
    let a = call(ca, node, "POST", path, Some(token), Some(body), &extra);
    assert_no_internals(&a);
    a
}

/// `POST /vms` with a key retried on another node gets the first answer and makes one VM;
/// another body under the key is 409. `POST /tokens` retried is 409 naming the token it
/// made (the secret is never replayed), and one token was made.
pub fn idempotent_vms_and_tokens(ca: &str, token: &str) {
    let vm = json!({"name": "idem-vm", "vcpus": 1, "memory_mib": 64});
    let first = post_keyed(ca, 1, token, "vms", &vm, Some("vm-1"));
    assert_eq!(first.code, 201, "{}", first.body);
    let again = post_keyed(ca, 2, token, "vms", &vm, Some("vm-1"));
    assert_eq!(again.code, 201, "{}", again.body);
    assert_eq!(first.json(), again.json());
    let other = json!({"name": "idem-vm", "vcpus": 2, "memory_mib": 64});
    let a = post_keyed(ca, 1, token, "vms", &other, Some("vm-1"));
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(a.body.contains("Idempotency-Key"), "{}", a.body);
    let a = post_keyed(ca, 1, token, "vms", &vm, None);
    assert_eq!(a.code, 409, "{}", a.body);
    let vms = call(ca, 3, "GET", "vms", Some(token), None, &[]).json();
    let n = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "idem-vm")
        .count();
    assert_eq!(n, 1, "{vms}");

    let count = || {
        call(ca, 1, "GET", "tokens", Some(token), None, &[])
            .json()
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    let req = json!({"role": "auditor", "expires_in_s": 3600});
    let first = post_keyed(ca, 1, token, "tokens", &req, Some("tok-1"));
    assert_eq!(first.code, 201, "{}", first.body);
    let made = first.json();
    assert!(made["token"].is_string(), "{made}");
    let id = made["id"].as_str().unwrap();
    let again = post_keyed(ca, 2, token, "tokens", &req, Some("tok-1"));
    assert_eq!(again.code, 409, "{}", again.body);
    assert!(
        again.body.contains(id),
        "the retry does not name token {id}: {}",
        again.body
    );
    assert!(
        !again.body.contains(made["token"].as_str().unwrap()),
        "the secret replayed"
    );
    let other = json!({"role": "auditor", "expires_in_s": 7200});
    let a = post_keyed(ca, 1, token, "tokens", &other, Some("tok-1"));
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(a.body.contains("different request"), "{}", a.body);
    assert_eq!(count(), before + 1, "one token made");
}

/// Waits (up to 30 s) until `GET path` answers 200 with a body that `ready` accepts.
pub fn wait_ready(ca: &str, node: u8, token: &str, path: &str, ready: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = call(ca, node, "GET", path, Some(token), None, &[]);
        if a.code == 200 && ready(&a.json()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never got ready: {}",
            a.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
