//! The REST API on a formed three-node cluster, driven with curl from inside the nodes'
//! network namespaces: credentials are required everywhere, the first administrator must
//! change the initial password, roles are enforced, tokens can be revoked, bad bodies get
//! 400 naming the field, and every node answers the same.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use serde_json::json;
use tessera_tests::cluster::{api as call, wait_for, ClusterNode};
use tessera_tests::Lan;

#[test]
fn the_api_requires_credentials_enforces_roles_and_answers_on_every_node() {
    let Some(lan) = Lan::new(
        "the_api_requires_credentials_enforces_roles_and_answers_on_every_node",
        3,
    ) else {
        return;
    };
    tessera_tests::require("curl");
    let d = tempfile::tempdir().unwrap();
    let nodes: Vec<ClusterNode> = (0..3)
        .map(|i| ClusterNode::start(&lan, i, d.path(), 3, false))
        .collect();
    let password = wait_for("the initial admin password file", 40, || {
        nodes
            .iter()
            .find_map(|n| std::fs::read_to_string(n.dir.join("data/initial-admin-password")).ok())
            .map(|p| p.trim().to_string())
    });
    let pw_file = nodes
        .iter()
        .map(|n| n.dir.join("data/initial-admin-password"))
        .find(|p| p.exists())
        .unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&pw_file).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the password file must be readable by root only"
    );

    // No credentials, bad credentials.
    assert_eq!(call(&lan, 0, "GET", "cluster", None, None).0, 401);
    assert_eq!(call(&lan, 0, "GET", "nodes", Some("deadbeef"), None).0, 401);
    assert_eq!(
        call(
            &lan,
            0,
            "POST",
            "tokens",
            None,
            Some(r#"{"role":"auditor","expires_in_s":3600}"#)
        )
        .0,
        401
    );
    assert_eq!(call(&lan, 0, "DELETE", "tokens/abc", None, None).0, 401);
    assert_eq!(
        call(
            &lan,
            0,
            "POST",
            "password",
            None,
            Some(r#"{"old_password":"a","new_password":"b"}"#)
        )
        .0,
        401
    );

    // Bad login bodies name the field; a wrong password is 401.
    let (code, v) = call(
        &lan,
        1,
        "POST",
        "login",
        None,
        Some(r#"{"username":"admin","pasword":"x"}"#),
    );
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("pasword"), "{v}");
    let (code, v) = call(
        &lan,
        1,
        "POST",
        "login",
        None,
        Some(r#"{"username":"admin"}"#),
    );
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("password"), "{v}");
    assert_eq!(
        call(
            &lan,
            1,
            "POST",
            "login",
            None,
            Some(r#"{"username":"admin","password":"wrong"}"#)
        )
        .0,
        401
    );

    // The first login must change the password before anything else.
    let login = json!({ "username": "admin", "password": password }).to_string();
    let (code, v) = wait_for("a successful login", 30, || {
        let r = call(&lan, 1, "POST", "login", None, Some(&login));
        (r.0 == 200).then_some(r)
    });
    assert_eq!(code, 200);
    assert_eq!(v["must_change_password"], true);
    let admin = v["token"].as_str().unwrap().to_string();
    let (code, v) = call(&lan, 1, "GET", "cluster", Some(&admin), None);
    assert_eq!(code, 403, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("password change required"));
    let short = json!({ "old_password": password, "new_password": "short" }).to_string();
    assert_eq!(
        call(&lan, 1, "POST", "password", Some(&admin), Some(&short)).0,
        400
    );
    let wrong_old =
        json!({ "old_password": "nope", "new_password": "a much better password" }).to_string();
    assert_eq!(
        call(&lan, 1, "POST", "password", Some(&admin), Some(&wrong_old)).0,
        403
    );
    let change =
        json!({ "old_password": password, "new_password": "a much better password" }).to_string();
    assert_eq!(
        call(&lan, 1, "POST", "password", Some(&admin), Some(&change)).0,
        200
    );

    // Every node answers the same, with the session made on node 1.
    for i in 0..3 {
        let (code, v) = call(&lan, i, "GET", "cluster", Some(&admin), None);
        assert_eq!(code, 200, "node {i}: {v}");
        assert_eq!(v["voters"].as_array().unwrap().len(), 3);
        assert!(v["leader"].as_u64().is_some());
        // Registrations are replicated asynchronously; each node must show all three.
        let v = wait_for("three registered nodes", 30, || {
            let (code, v) = call(&lan, i, "GET", "nodes", Some(&admin), None);
            (code == 200
                && v.as_array()
                    .is_some_and(|l| l.len() == 3 && l.iter().all(|n| n["state"] == "up")))
            .then_some(v)
        });
        assert_eq!(v.as_array().unwrap().len(), 3);
        // Each node by the name its seed gives it, with its Raft id; the leader is one of them.
        let mut names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["node0", "node1", "node2"], "{v}");
        let (_, c) = call(&lan, i, "GET", "cluster", Some(&admin), None);
        let leader = v
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["raft_id"] == c["leader"])
            .unwrap_or_else(|| panic!("no node has the leader's Raft id: {c} {v}"));
        assert_eq!(c["leader_node"], leader["id"], "{c}");
        assert_eq!(c["leader_name"], leader["name"], "{c}");
    }

    // An auditor token reads but cannot administer; revoked, it stops working.
    let (code, v) = call(
        &lan,
        2,
        "POST",
        "tokens",
        Some(&admin),
        Some(r#"{"role":"auditor","expires_in_s":3600}"#),
    );
    assert_eq!(code, 201, "{v}");
    let (auditor, id) = (
        v["token"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    );
    assert_eq!(call(&lan, 0, "GET", "nodes", Some(&auditor), None).0, 200);
    assert_eq!(
        call(
            &lan,
            0,
            "POST",
            "tokens",
            Some(&auditor),
            Some(r#"{"role":"auditor","expires_in_s":3600}"#)
        )
        .0,
        403
    );
    assert_eq!(
        call(
            &lan,
            0,
            "DELETE",
            &format!("tokens/{id}"),
            Some(&auditor),
            None
        )
        .0,
        403
    );
    let (code, v) = call(
        &lan,
        2,
        "POST",
        "tokens",
        Some(&admin),
        Some(r#"{"role":"auditor","expires_in_s":1}"#),
    );
    assert_eq!(code, 400);
    assert!(v["error"].as_str().unwrap().contains("expires_in_s"));
    assert_eq!(
        call(
            &lan,
            2,
            "POST",
            "tokens",
            Some(&admin),
            Some(r#"{"role":"root","expires_in_s":3600}"#)
        )
        .0,
        400
    );
    assert_eq!(
        call(
            &lan,
            0,
            "DELETE",
            &format!("tokens/{id}"),
            Some(&admin),
            None
        )
        .0,
        200
    );
    assert_eq!(call(&lan, 1, "GET", "nodes", Some(&auditor), None).0, 401);
    assert_eq!(
        call(&lan, 0, "DELETE", "tokens/nosuch", Some(&admin), None).0,
        404
    );
    assert_eq!(
        call(&lan, 0, "GET", "no/such/thing", Some(&admin), None).0,
        404
    );
    drop(nodes);
}
