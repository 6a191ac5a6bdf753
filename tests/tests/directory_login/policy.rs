//! The login policy and the audit of refused changes, on the directory test's cluster:
//! a default realm for names without `@realm`; a second factor required by realm (a
//! user without one refused with a clear message, as Proxmox VE does) and by role (an
//! administrator cannot lock itself out that way); an administrator removing another
//! user's authenticator (an event); per-user roles of directory users; refused changes
//! recorded with who, from where and what; `tessera login` asking for the second factor
//! and `tessera event ls --user` showing the refusals.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for};
use tessera_tests::{bin, Lan};

use super::{login, login_2fa};

fn set_policy(lan: &Lan, admin: &str, policy: Value) -> (u16, Value) {
    api(
        lan,
        0,
        "PUT",
        "login-policy",
        Some(admin),
        Some(&policy.to_string()),
    )
}

/// `tessera` as the test's user (its own HOME), against node 0.
fn cli(lan: &Lan, home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    std::fs::create_dir_all(home).unwrap();
    let mut c = lan.command(0, &bin("tessera"));
    c.env("HOME", home)
        .arg("--api")
        .arg(format!("https://{}:8006", Lan::addr(0)))
        .arg("--ca-file")
        .arg(lan.ca_file().unwrap())
        .args(args);
    tessera_tests::run_with_stdin(c, stdin)
}

/// Events as `user` sees them through `events?user=`.
fn events_of(lan: &Lan, admin: &str, user: &str) -> Vec<Value> {
    let (code, v) = api(
        lan,
        0,
        "GET",
        &format!("events?user={user}&limit=1000"),
        Some(admin),
        None,
    );
    assert_eq!(code, 200, "{v}");
    v.as_array().unwrap().clone()
}

/// `recovery`: bob@corp-tls's recovery codes ([0] is used up); `corp`: the corp realm's
/// settings as created; `bob`: a session of bob@corp (an operator).
pub fn check(lan: &Lan, home: &Path, admin: &str, bob: &str, recovery: &[String], corp: &Value) {
    let tok = Some(admin);

    // The policy starts as the defaults.
    let (code, v) = api(lan, 0, "GET", "login-policy", tok, None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v,
        json!({"default_realm": "local", "two_factor_realms": [], "two_factor_roles": []})
    );
    assert_eq!(api(lan, 0, "GET", "login-policy", Some(bob), None).0, 403);
    let (code, v) = set_policy(lan, admin, json!({ "default_realm": "nowhere" }));
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no realm nowhere"),
        "{v}"
    );

    // `tessera login` asks for the second factor when the server wants one: without a
    // code on standard input it stops there; with a recovery code it logs in.
    let (ok, out, err) = cli(
        lan,
        home,
        &["login", "--user", "bob@corp-tls"],
        "bob-password\n",
    );
    assert!(!ok, "{out}{err}");
    assert!(err.contains("no second factor"), "{out}{err}");
    let (ok, out, err) = cli(
        lan,
        home,
        &["login", "--user", "bob@corp-tls"],
        &format!("bob-password\n{}\n", recovery[2]),
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("logged in"), "{out}{err}");

    // A second factor required for realms corp and corp-tls: bob@corp has none and is
    // refused with words saying why; bob@corp-tls logs in with its code.
    let (code, v) = set_policy(
        lan,
        admin,
        json!({ "two_factor_realms": ["corp", "corp-tls"] }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["two_factor_realms"], json!(["corp", "corp-tls"]), "{v}");
    let (code, v) = login(lan, "bob@corp", "bob-password");
    assert_eq!(code, 403, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("two-factor login is required for realm corp") && e.contains("bob@corp"),
        "{v}"
    );
    assert_eq!(
        login(lan, "bob@corp-tls", "bob-password").1["second_factor"],
        "totp"
    );
    let (code, v) = login_2fa(lan, "bob@corp-tls", "bob-password", Some(&recovery[3]));
    assert_eq!(code, 200, "{v}");
    // The realm cannot be deleted while the policy names it.
    let (code, v) = api(lan, 0, "DELETE", "realms/corp-tls", tok, None);
    assert_eq!(code, 409, "{v}");
    // Required for administrators: this administrator has no second factor and would be
    // locked out, so the policy is refused.
    let (code, v) = set_policy(lan, admin, json!({ "two_factor_roles": ["administrator"] }));
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("enroll"), "{v}");
    let (_, v) = api(lan, 0, "GET", "login-policy", tok, None);
    assert_eq!(
        v["two_factor_realms"],
        json!(["corp", "corp-tls"]),
        "unchanged: {v}"
    );

    // An administrator removes bob@corp-tls's authenticator: an event names both; a
    // second removal finds none; bob@corp-tls, still required, is now refused.
    let (code, v) = api(lan, 0, "DELETE", "users/bob@corp-tls/totp", tok, None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["deleted"], "bob@corp-tls", "{v}");
    assert_eq!(
        api(lan, 0, "DELETE", "users/bob@corp-tls/totp", tok, None).0,
        404
    );
    let (code, v) = login(lan, "bob@corp-tls", "bob-password");
    assert_eq!(code, 403, "{v}");
    let removal = events_of(lan, admin, "bob@corp-tls")
        .into_iter()
        .find(|e| e["kind"] == "totp.delete")
        .unwrap_or_else(|| panic!("no totp.delete event"));
    assert_eq!(removal["user"], "admin", "{removal}");
    assert_eq!(removal["target"], "bob@corp-tls", "{removal}");
    assert!(removal["source"].is_string(), "{removal}");
    // No longer required: the password alone logs in again.
    let (code, v) = set_policy(lan, admin, json!({}));
    assert_eq!(code, 200, "{v}");
    assert_eq!(login(lan, "bob@corp-tls", "bob-password").0, 200);

    // A default realm: a name without @realm is corp's; `name@local` is the cluster's
    // own user.
    let (code, v) = set_policy(lan, admin, json!({ "default_realm": "corp" }));
    assert_eq!(code, 200, "{v}");
    let (code, v) = login(lan, "alice", "alice-password");
    assert_eq!(code, 200, "{v}");
    let t = v["token"].as_str().unwrap().to_string();
    let (code, v) = api(lan, 0, "GET", "session", Some(&t), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (&v["user"], &v["role"]),
        (&json!("alice@corp"), &json!("administrator"))
    );
    assert_eq!(login(lan, "admin", "directory-test-admin-pw").0, 401);
    assert_eq!(login(lan, "admin@local", "directory-test-admin-pw").0, 200);
    let (code, v) = api(lan, 0, "DELETE", "realms/corp", tok, None);
    assert_eq!(code, 409, "the default realm: {v}");
    assert_eq!(set_policy(lan, admin, json!({})).0, 200);

    // A role of carol's own (she is in no mapped group): an auditor.
    let mut with_user_role = corp.clone();
    with_user_role["user_roles"] = json!({ "Carol": "auditor" });
    let (code, v) = api(
        lan,
        0,
        "PUT",
        "realms/corp",
        tok,
        Some(&with_user_role.to_string()),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["user_roles"], json!({ "Carol": "auditor" }), "{v}");
    let (code, v) = login(lan, "carol@corp", "carol-password");
    assert_eq!(code, 200, "{v}");
    let carol = v["token"].as_str().unwrap().to_string();
    assert_eq!(api(lan, 0, "GET", "volumes", Some(&carol), None).0, 200);
    let (code, _) = api(
        lan,
        0,
        "POST",
        "volumes",
        Some(&carol),
        Some(r#"{"name":"nope","size_bytes":1048576}"#),
    );
    assert_eq!(code, 403);

    // Refused changes are events: who (bob, an operator, creating a user), from where,
    // what and the answer; an unauthenticated change too; a conflict (409).
    let (code, _) = api(
        lan,
        0,
        "POST",
        "users",
        Some(bob),
        Some(r#"{"username":"mallory","password":"mallory password 1","role":"administrator"}"#),
    );
    assert_eq!(code, 403);
    assert_eq!(api(lan, 0, "DELETE", "realms/corp", None, None).0, 401);
    let (code, _) = api(lan, 0, "POST", "realms", tok, Some(&corp.to_string()));
    assert_eq!(code, 409);
    let refused = wait_for("bob's refused change as an event", 10, || {
        events_of(lan, admin, "bob@corp")
            .into_iter()
            .find(|e| e["kind"] == "request.refused" && e["target"] == "/api/v1/users")
    });
    let m = refused["message"].as_str().unwrap();
    assert!(
        m.starts_with("POST /api/v1/users refused: 403"),
        "{refused}"
    );
    assert!(m.contains("Administrator"), "{refused}");
    assert_eq!(refused["user"], "bob@corp", "{refused}");
    assert_eq!(refused["source"], Lan::addr(0).to_string(), "{refused}");
    let carol_refused = wait_for("carol's refused volume as an event", 10, || {
        events_of(lan, admin, "carol@corp")
            .into_iter()
            .find(|e| e["kind"] == "request.refused")
    });
    assert_eq!(
        carol_refused["target"], "/api/v1/volumes",
        "{carol_refused}"
    );
    wait_for(
        "the unauthenticated and conflicting refusals as events",
        10,
        || {
            let anon = events_of(lan, admin, "unauthenticated");
            let mine = events_of(lan, admin, "admin");
            let a = anon.iter().any(|e| {
                e["kind"] == "request.refused"
                    && e["message"]
                        .as_str()
                        .unwrap()
                        .starts_with("DELETE /api/v1/realms/corp refused: 401")
            });
            let c = mine.iter().any(|e| {
                e["kind"] == "request.refused"
                    && e["message"]
                        .as_str()
                        .unwrap()
                        .starts_with("POST /api/v1/realms refused: 409")
            });
            (a && c).then_some(())
        },
    );
    // Reads are not refused changes: a 403 GET is no event.
    assert!(events_of(lan, admin, "bob@corp")
        .iter()
        .all(|e| !e["message"].as_str().unwrap().starts_with("GET ")));

    // `tessera event ls --user` shows them, with the source address.
    let (ok, out, err) = cli(lan, home, &["event", "ls", "--user", "bob@corp"], "");
    assert!(ok, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains("request.refused") && l.contains("/api/v1/users"))
        .unwrap_or_else(|| panic!("no refusal in:\n{out}{err}"));
    assert!(line.contains(&Lan::addr(0).to_string()), "{line}");
}
