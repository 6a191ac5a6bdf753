//! Part of `cluster_resources`: sessions and users on the running cluster — session
//! cookies and the CSRF header, user management, and what deleting, re-creating and
//! resetting a user does to its sessions and tokens.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, curl};
use tessera_tests::Lan;

use super::PASSWORD;

/// Session cookies: secure flags; reads work; changes need the CSRF header. Creates VM
/// `cookied`.
pub fn check_session_cookies(lan: &Lan, scratch: &Path) {
    let d = scratch;
    let jar = d.join("cookies");
    let jar = jar.to_str().unwrap();
    let (code, text) = curl(
        lan,
        1,
        "login",
        &[
            "-D",
            "-",
            "-c",
            jar,
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &json!({ "username": "admin", "password": PASSWORD }).to_string(),
        ],
    );
    assert_eq!(code, 200, "{text}");
    let set_cookie = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default()
        .to_string();
    for flag in ["tessera_session=", "HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    // The cookie is sent by hand (the jar would work too, over HTTPS) to show exactly
    // what authenticates each request.
    let secret = set_cookie
        .split("tessera_session=")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap()
        .to_string();
    let cookie = format!("Cookie: tessera_session={secret}");
    assert_eq!(curl(lan, 1, "vms", &["-H", &cookie]).0, 200);
    let new_vm = json!({ "name": "cookied", "vcpus": 1, "memory_mib": 64 }).to_string();
    let (code, text) = curl(
        lan,
        1,
        "vms",
        &[
            "-X",
            "POST",
            "-H",
            &cookie,
            "-H",
            "content-type: application/json",
            "--data",
            &new_vm,
        ],
    );
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("X-Tessera-CSRF"), "{text}");
    let (code, text) = curl(
        lan,
        1,
        "vms",
        &[
            "-X",
            "POST",
            "-H",
            &cookie,
            "-H",
            "X-Tessera-CSRF: 1",
            "-H",
            "content-type: application/json",
            "--data",
            &new_vm,
        ],
    );
    assert_eq!(code, 201, "{text}");
}

/// Users: an operator manages VMs but not users; deleted, its token stops working; the
/// last administrator cannot be demoted. Creates VM `olgas`.
pub fn check_users_and_their_sessions(lan: &Lan, admin: &str) {
    let a = Some(admin);
    let post =
        |i: usize, path: &str, body: Value| api(lan, i, "POST", path, a, Some(&body.to_string()));
    let (code, v) = post(
        0,
        "users",
        json!({ "username": "olga", "password": "initial password 2", "role": "operator" }),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = post(
        0,
        "users",
        json!({ "username": "olga", "password": "initial password 2", "role": "operator" }),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = post(
        0,
        "users",
        json!({ "username": "x", "password": "short", "role": "operator" }),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("password"), "{v}");
    let (_, v) = api(
        lan,
        2,
        "POST",
        "login",
        None,
        Some(r#"{"username":"olga","password":"initial password 2"}"#),
    );
    let olga = v["token"].as_str().unwrap().to_string();
    let (code, _) = api(
        lan,
        2,
        "POST",
        "password",
        Some(&olga),
        Some(r#"{"old_password":"initial password 2","new_password":"olga's own password"}"#),
    );
    assert_eq!(code, 200);
    let (code, v) = api(
        lan,
        2,
        "POST",
        "vms",
        Some(&olga),
        Some(r#"{"name":"olgas","vcpus":1,"memory_mib":64}"#),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(api(lan, 2, "GET", "users", Some(&olga), None).0, 403);
    let (code, v) = api(
        lan,
        0,
        "PATCH",
        "users/admin",
        a,
        Some(r#"{"role":"auditor"}"#),
    );
    assert_eq!(code, 409, "{v}");
    assert_eq!(api(lan, 0, "DELETE", "users/admin", a, None).0, 409);
    assert_eq!(api(lan, 0, "DELETE", "users/olga", a, None).0, 200);
    assert_eq!(api(lan, 1, "GET", "vms", Some(&olga), None).0, 401);
    // Re-created under the same name, the user does not get the old session back.
    let (code, v) = post(
        0,
        "users",
        json!({ "username": "olga", "password": "initial password 3", "role": "operator" }),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = api(lan, 1, "GET", "vms", Some(&olga), None);
    assert_eq!(
        code, 401,
        "a deleted user's session works again once re-created: {v}"
    );
    // An administrator's password reset revokes the user's sessions and tokens.
    let (_, v) = api(
        lan,
        2,
        "POST",
        "login",
        None,
        Some(r#"{"username":"olga","password":"initial password 3"}"#),
    );
    let olga3 = v["token"].as_str().unwrap().to_string();
    // Before the reset it authenticates (403 only because the password must change).
    assert_eq!(api(lan, 1, "GET", "vms", Some(&olga3), None).0, 403);
    let (code, v) = api(
        lan,
        0,
        "PATCH",
        "users/olga",
        a,
        Some(r#"{"password":"reset password 4"}"#),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = api(lan, 1, "GET", "vms", Some(&olga3), None);
    assert_eq!(
        code, 401,
        "a session survived its user's password reset: {v}"
    );
}
