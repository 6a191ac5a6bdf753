//! The API's resources on a three-node cluster in network namespaces, each node with its
//! own `tessera-store`: every endpoint of the OpenAPI document refuses missing (401) and
//! under-privileged (403) credentials; the CLI only uses operations the document has;
//! volumes, snapshots and clones are made by tasks on the owning node and checked with
//! nbdinfo and qemu-io; VM definitions, conflicts and bad input leave nothing
//! half-written; a write on one node is read back at once on another; events arrive on
//! the SSE stream; session cookies need the CSRF header for changes; the state survives a
//! restart of every node.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{admin_session, api, curl, wait_for, wait_task, ClusterNode};
use tessera_tests::{bin, output, Lan};

#[path = "cluster_resources/sessions.rs"]
mod sessions;

const PASSWORD: &str = "a much better password";

/// The least role of each operation; `any` = any authenticated principal, even one that
/// must still change its password; `public` = no credentials needed.
const ROLES: &[(&str, &str, &str)] = &[
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

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
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

fn token(lan: &Lan, admin: &str, role: &str) -> String {
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
    let documented = operations(&doc);
    let table: BTreeSet<(String, String)> = ROLES
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
    let auditor = token(&lan, &admin, "auditor");
    let operator = token(&lan, &admin, "operator");

    for (method, path, least) in ROLES {
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

/// NBD client credentials from `POST /nbd/credentials`, in the directory layout qemu and
/// libnbd read (TCP NBD serves only TLS clients with a certificate of the cluster CA).
fn nbd_creds(lan: &Lan, token: &str, dir: &Path) {
    let (code, v) = api(lan, 0, "POST", "nbd/credentials", Some(token), None);
    assert_eq!(code, 200, "{v}");
    std::fs::create_dir_all(dir).unwrap();
    for (file, field) in [
        ("ca-cert.pem", "ca_cert_pem"),
        ("client-cert.pem", "client_cert_pem"),
        ("client-key.pem", "client_key_pem"),
    ] {
        std::fs::write(dir.join(file), v[field].as_str().unwrap()).unwrap();
    }
}

/// qemu-io on `export` of `server`'s store, over TLS with the credentials in `creds`.
fn qemu_io(
    lan: &Lan,
    i: usize,
    cmd: &str,
    creds: &Path,
    server: usize,
    export: &str,
) -> std::process::Output {
    output(
        lan.command(i, Path::new("qemu-io"))
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host={},port=10809,export={export},tls-creds=tls0",
                Lan::addr(server)
            ))
            .args(["-c", cmd]),
    )
}

fn exports(lan: &Lan, i: usize, server: usize, creds: &Path) -> String {
    let out = output(
        lan.command(i, Path::new("nbdinfo"))
            .arg("--list")
            .arg(format!(
                "nbds://{}:10809?tls-certificates={}",
                Lan::addr(server),
                creds.display()
            )),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let post =
        |i: usize, path: &str, body: Value| api(&lan, i, "POST", path, a, Some(&body.to_string()));

    // A volume on node 3's store, asked for on node 1, read back on node 2.
    let id = accepted_task(post(
        0,
        "volumes",
        json!({ "name": "data", "size_bytes": 64 << 20, "node": ids[2], "replicas": 1 }),
    ));
    let t = wait_task(&lan, 1, &admin, &id);
    assert_eq!(t["state"], "succeeded", "{t}\n{}", nodes[2].logs());
    assert_eq!(t["progress"], 100);
    assert_eq!(t["node"], ids[2].as_str());
    assert!(t["log"].as_array().unwrap().len() >= 3, "{t}");
    let (code, v) = api(&lan, 1, "GET", "volumes/data", a, None);
    assert_eq!(code, 200);
    assert_eq!(v["state"], "ready");
    assert_eq!(
        v["nbd"],
        format!("nbds://{}:10809/data", Lan::addr(2)).as_str()
    );
    let creds = d.path().join("nbd-creds");
    nbd_creds(&lan, &admin, &creds);
    let uri = format!(
        "nbds://{}:10809/data?tls-certificates={}",
        Lan::addr(2),
        creds.display()
    );
    let info = wait_for("node 3's store to serve NBD over TLS", 20, || {
        let info = output(lan.command(0, Path::new("nbdinfo")).args(["--size", &uri]));
        info.status.success().then_some(info)
    });
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "67108864");

    // Snapshot, then overwrite, then clone the snapshot: the clone has the old data.
    assert!(qemu_io(&lan, 0, "write -P 0xa5 0 1M", &creds, 2, "data")
        .status
        .success());
    let id = accepted_task(post(1, "volumes/data/snapshots", json!({ "name": "s1" })));
    assert_eq!(wait_task(&lan, 0, &admin, &id)["state"], "succeeded");
    assert!(qemu_io(&lan, 0, "write -P 0x5a 0 1M", &creds, 2, "data")
        .status
        .success());
    let id = accepted_task(post(
        2,
        "volumes/data/clone",
        json!({ "snapshot": "s1", "name": "copy" }),
    ));
    assert_eq!(wait_task(&lan, 2, &admin, &id)["state"], "succeeded");
    let r = qemu_io(&lan, 1, "read -P 0xa5 0 1M", &creds, 2, "copy");
    assert!(
        r.status.success()
            && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    let list = exports(&lan, 0, 2, &creds);
    assert!(
        list.contains("export=\"data@s1\"") && list.contains("export=\"copy\""),
        "{list}"
    );
    let (_, v) = api(&lan, 0, "GET", "volumes/copy", a, None);
    assert_eq!(v["origin"], "data@s1");
    let (_, v) = api(&lan, 0, "GET", "volumes/data", a, None);
    assert_eq!(v["snapshots"][0]["name"], "s1");

    // Bad input: 400 naming the field; duplicates 409; nothing is created.
    for (body, field) in [
        (json!({ "name": "odd", "size_bytes": 1000 }), "size_bytes"),
        (
            json!({ "name": "odd", "size_bytes": 1u64 << 47 }),
            "size_bytes",
        ),
        (json!({ "name": "odd", "size_bytes": "big" }), "size_bytes"),
        (json!({ "name": "Bad/Name", "size_bytes": 4096 }), "name"),
        (
            json!({ "name": "odd", "size_bytes": 4096, "colour": 1 }),
            "colour",
        ),
    ] {
        let (code, v) = post(0, "volumes", body.clone());
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    // A well-formed request naming a node the cluster lacks: 404 naming the field.
    let (code, v) = post(
        0,
        "volumes",
        json!({ "name": "odd", "size_bytes": 4096, "node": "nope" }),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("node"), "{v}");
    let (code, v) = post(1, "volumes", json!({ "name": "data", "size_bytes": 4096 }));
    assert_eq!(code, 409, "{v}");
    assert_eq!(api(&lan, 0, "GET", "volumes/odd", a, None).0, 404);

    // A task that fails says why, and its reservation is undone: the store already has
    // a volume of that name that the cluster does not know.
    let made = output(
        std::process::Command::new(bin("tessera-store"))
            .arg("--admin-socket")
            .arg(nodes[0].dir.join("store/admin.sock"))
            .args(["volume", "create", "rogue", "--size", "1M"]),
    );
    assert!(made.status.success());
    let id = accepted_task(post(
        1,
        "volumes",
        json!({ "name": "rogue", "size_bytes": 1 << 20, "node": ids[0], "replicas": 1 }),
    ));
    let t = wait_task(&lan, 1, &admin, &id);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("exists"), "{t}");
    assert!(t["log"].to_string().contains("failed"), "{t}");
    assert_eq!(api(&lan, 2, "GET", "volumes/rogue", a, None).0, 404);

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
    let (code, v) = api(&lan, 2, "GET", "vms/vm1", a, None);
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
    assert_eq!(api(&lan, 0, "GET", "vms/vm2", a, None).0, 404);
    let (_, v) = api(&lan, 0, "GET", "volumes/data", a, None);
    assert_eq!(v["attached_to"], Value::Null);
    // Optimistic locking, then an update read back on another node.
    let (code, v) = api(
        &lan,
        1,
        "PATCH",
        "vms/vm1",
        a,
        Some(r#"{"vcpus":4,"generation":7}"#),
    );
    assert_eq!(code, 409, "{v}");
    // A listing made before the change (and kept by the node) must not hide it.
    let (_, before) = api(&lan, 1, "GET", "vms", a, None);
    assert_eq!(before[0]["vcpus"], 2, "{before}");
    let (code, v) = api(
        &lan,
        1,
        "PATCH",
        "vms/vm1",
        a,
        Some(r#"{"vcpus":4,"generation":1}"#),
    );
    let (_, listed) = api(&lan, 1, "GET", "vms", a, None);
    assert_eq!(listed[0]["vcpus"], 4, "{listed}");
    assert_eq!(code, 200, "{v}");
    let (_, v) = api(&lan, 0, "GET", "vms/vm1", a, None);
    assert_eq!(
        (v["vcpus"].as_u64(), v["generation"].as_u64()),
        (Some(4), Some(2))
    );
    // A network in use cannot go (and stays usable after the refusal).
    let (code, v) = api(&lan, 2, "DELETE", "networks/lan", a, None);
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("vm1"), "{v}");
    let (_, v) = api(&lan, 0, "GET", "networks/lan", a, None);
    assert_eq!(v["deleting"], false, "{v}");
    let (code, v) = post(
        1,
        "vms",
        json!({ "name": "vm9", "vcpus": 1, "memory_mib": 64, "networks": ["nope"] }),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("networks"), "{v}");
    // An attached volume cannot go; after the VM is deleted it can.
    let (code, v) = api(&lan, 2, "DELETE", "volumes/copy", a, None);
    assert_eq!(code, 409, "{v}");
    assert_eq!(api(&lan, 2, "DELETE", "vms/vm1", a, None).0, 200);
    let id = accepted_task(api(&lan, 2, "DELETE", "volumes/copy", a, None));
    assert_eq!(wait_task(&lan, 0, &admin, &id)["state"], "succeeded");
    assert!(!exports(&lan, 1, 2, &creds).contains("export=\"copy\""));
    assert_eq!(api(&lan, 2, "DELETE", "networks/lan", a, None).0, 200);
    assert_eq!(api(&lan, 0, "GET", "networks/lan", a, None).0, 404);
    assert_eq!(api(&lan, 0, "GET", "vms", a, None).1, json!([]));

    // Events: recorded with the change, and streamed (SSE) from a given point.
    let (_, ev) = api(&lan, 1, "GET", "events?limit=10000", a, None);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "volume.create",
        "snapshot.create",
        "volume.clone",
        "vm.create",
        "vm.update",
        "vm.delete",
        "task.failed",
        "task.succeeded",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    let last = ev.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let auth = format!("Authorization: Bearer {admin}");
    let stream = lan
        .command(2, Path::new("curl"))
        .args(["-s", "-N", "-m", "6", "-H", &auth, "--cacert"])
        .arg(lan.ca_file().unwrap())
        .arg(format!(
            "https://{}:8006/api/v1/events/stream?since={last}",
            Lan::addr(2)
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, v) = post(
        0,
        "vms",
        json!({ "name": "streamed", "vcpus": 1, "memory_mib": 64 }),
    );
    assert_eq!(code, 201, "{v}");
    let out = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let streamed: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    assert!(
        streamed
            .iter()
            .any(|e| e["kind"] == "vm.create" && e["target"] == "streamed"),
        "{text}"
    );
    assert!(streamed
        .iter()
        .all(|e| e["id"].as_str().unwrap() > last.as_str()));

    sessions::check_session_cookies(&lan, d.path());
    sessions::check_users_and_their_sessions(&lan, &admin);

    // Restart every node: the state is all there.
    let (_, before_vms) = api(&lan, 0, "GET", "vms", a, None);
    let (_, before_vols) = api(&lan, 0, "GET", "volumes", a, None);
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
    assert_eq!(api(&lan, 2, "GET", "volumes", a, None).1, before_vols);
    let names: Vec<&str> = after_vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cookied", "olgas", "streamed"]);
    drop(nodes);
}
