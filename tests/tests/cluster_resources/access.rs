//! Who may call what: the least role of every operation of the OpenAPI document.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use tessera_tests::cluster::api;
use tessera_tests::Lan;

/// The least role of each operation; `any` = any authenticated principal, even one that
/// must still change its password; `public` = no credentials needed.
pub const ROLES: &[(&str, &str, &str)] = &[
    ("POST", "/api/v1/login", "public"),
    ("POST", "/api/v1/logout", "any"),
    ("POST", "/api/v1/password", "any"),
    ("GET", "/api/v1/session", "any"),
    ("GET", "/api/v1/tokens", "administrator"),
    ("POST", "/api/v1/tokens", "administrator"),
    ("DELETE", "/api/v1/tokens/{id}", "administrator"),
    ("GET", "/api/v1/users", "administrator"),
    ("POST", "/api/v1/users", "administrator"),
    ("PATCH", "/api/v1/users/{username}", "administrator"),
    ("DELETE", "/api/v1/users/{username}", "administrator"),
    ("GET", "/api/v1/realms", "administrator"),
    ("POST", "/api/v1/realms", "administrator"),
    ("GET", "/api/v1/realms/{name}", "administrator"),
    ("PUT", "/api/v1/realms/{name}", "administrator"),
    ("DELETE", "/api/v1/realms/{name}", "administrator"),
    ("POST", "/api/v1/realms/{name}/test", "administrator"),
    ("POST", "/api/v1/realms/{name}/sync", "administrator"),
    ("POST", "/api/v1/totp", "auditor"),
    ("DELETE", "/api/v1/totp", "auditor"),
    ("POST", "/api/v1/totp/confirm", "auditor"),
    ("DELETE", "/api/v1/users/{username}/totp", "administrator"),
    ("GET", "/api/v1/login-policy", "administrator"),
    ("PUT", "/api/v1/login-policy", "administrator"),
    ("GET", "/api/v1/cluster", "auditor"),
    ("GET", "/api/v1/nodes", "auditor"),
    ("DELETE", "/api/v1/nodes/{id}", "administrator"),
    ("POST", "/api/v1/nodes/{id}/maintenance", "administrator"),
    ("GET", "/api/v1/nodes/{id}/upgrade", "auditor"),
    ("PUT", "/api/v1/nodes/{id}/upgrade", "administrator"),
    ("GET", "/api/v1/nodes/{id}/metrics", "auditor"),
    ("GET", "/api/v1/settings", "auditor"),
    ("PATCH", "/api/v1/settings", "administrator"),
    ("GET", "/api/v1/volumes", "auditor"),
    ("POST", "/api/v1/volumes", "operator"),
    ("GET", "/api/v1/volumes/{name}", "auditor"),
    ("DELETE", "/api/v1/volumes/{name}", "operator"),
    ("POST", "/api/v1/volumes/{name}/snapshots", "operator"),
    (
        "DELETE",
        "/api/v1/volumes/{name}/snapshots/{snapshot}",
        "operator",
    ),
    ("POST", "/api/v1/volumes/{name}/clone", "operator"),
    ("POST", "/api/v1/volumes/{name}/resize", "operator"),
    ("POST", "/api/v1/volumes/{name}/override", "administrator"),
    ("GET", "/api/v1/vms", "auditor"),
    ("POST", "/api/v1/vms", "operator"),
    ("GET", "/api/v1/vms/{name}", "auditor"),
    ("PATCH", "/api/v1/vms/{name}", "operator"),
    ("DELETE", "/api/v1/vms/{name}", "operator"),
    ("POST", "/api/v1/nbd/credentials", "operator"),
    ("POST", "/api/v1/vms/{name}/start", "operator"),
    ("POST", "/api/v1/vms/{name}/stop", "operator"),
    ("POST", "/api/v1/vms/{name}/kill", "operator"),
    ("POST", "/api/v1/vms/{name}/reboot", "operator"),
    ("POST", "/api/v1/vms/{name}/pause", "operator"),
    ("POST", "/api/v1/vms/{name}/resume", "operator"),
    ("POST", "/api/v1/vms/{name}/migrate", "operator"),
    ("DELETE", "/api/v1/vms/{name}/migrate", "operator"),
    ("GET", "/api/v1/vms/{name}/console", "operator"),
    ("GET", "/api/v1/images", "auditor"),
    ("POST", "/api/v1/images", "operator"),
    ("GET", "/api/v1/images/{name}", "auditor"),
    ("DELETE", "/api/v1/images/{name}", "operator"),
    ("POST", "/api/v1/vms/{name}/template", "operator"),
    ("GET", "/api/v1/networks", "auditor"),
    ("POST", "/api/v1/networks", "administrator"),
    ("GET", "/api/v1/networks/{name}", "auditor"),
    ("DELETE", "/api/v1/networks/{name}", "administrator"),
    ("GET", "/api/v1/tasks", "auditor"),
    ("GET", "/api/v1/tasks/{id}", "auditor"),
    ("GET", "/api/v1/events", "auditor"),
    ("GET", "/api/v1/events/stream", "auditor"),
    ("GET", "/api/v1/certificate", "auditor"),
    ("POST", "/api/v1/certificate", "administrator"),
    ("DELETE", "/api/v1/certificate", "administrator"),
];

pub fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths in the document") {
        for m in ["get", "post", "put", "patch", "delete"] {
            if item.get(m).is_some() {
                ops.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

pub fn token(lan: &Lan, admin: &str, role: &str) -> String {
    let (code, v) = api(
        lan,
        0,
        "POST",
        "tokens",
        Some(admin),
        Some(&json!({ "role": role, "expires_in_s": 3600 }).to_string()),
    );
    assert_eq!(code, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}
