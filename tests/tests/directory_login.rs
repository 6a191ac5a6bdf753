//! Directory users: a real OpenLDAP `slapd`, started by the test inside a one-node
//! cluster's network namespace with a seeded directory (users, groups, a nested group)
//! and no system service, backs an LDAP realm. A directory user logs in as `user@realm`
//! and gets the role its (nested) groups map to; a wrong or empty password, a user
//! without a mapped group and LDAP filter injections are refused (and the injections
//! logged); a user removed from the admin group loses its session at the next sync; the
//! first server down, the second answers; `ldaps` works with the uploaded CA and a wrong
//! CA is refused; the bind password is never shown; the audit events name the user and
//! the source address and filter by user.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

#[path = "directory_login/policy.rs"]
mod policy;

use std::path::Path;
use std::process::{Child, Stdio};

use serde_json::{json, Value};
use tessera_tests::cluster::{admin_session, api, curl, wait_for, ClusterNode};
use tessera_tests::{require, run, Lan};

const BASE: &str = "dc=example,dc=org";
const SERVICE_DN: &str = "cn=tessera,ou=services,dc=example,dc=org";
const SERVICE_PW: &str = "service-secret-7f3a";

/// The directory: alice is an administrator through a nested group (team-leads is a
/// member of tessera-admins), bob an operator, carol in no mapped group, dave an
/// administrator directly (and removed from the group later).
fn seed_ldif() -> String {
    let person = |uid: &str| {
        format!(
            "dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\n\
             cn: {uid}\nsn: {uid}\nuserPassword: {uid}-password\n\n"
        )
    };
    let group = |cn: &str, members: &[&str]| {
        let mut s = format!("dn: cn={cn},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {cn}\n");
        for m in members {
            s.push_str(&format!("member: {m}\n"));
        }
        s + "\n"
    };
    let user = |uid: &str| format!("uid={uid},ou=people,{BASE}");
    let mut s = format!(
        "dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n"
    );
    for ou in ["people", "groups", "services"] {
        s.push_str(&format!(
            "dn: ou={ou},{BASE}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
        ));
    }
    s.push_str(&format!(
        "dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n\
         cn: tessera\nuserPassword: {SERVICE_PW}\n\n"
    ));
    for u in ["alice", "bob", "carol", "dave"] {
        s.push_str(&person(u));
    }
    s.push_str(&group("team-leads", &[&user("alice")]));
    s.push_str(&group(
        "tessera-admins",
        &[&format!("cn=team-leads,ou=groups,{BASE}"), &user("dave")],
    ));
    s.push_str(&group("ops", &[&user("bob")]));
    s.push_str(&group("unmapped", &[&user("carol")]));
    s
}

/// `slapd` in node 0's namespace, killed on drop.
struct Slapd(Child);

impl Drop for Slapd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 it signed: (CA PEM, cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "directory test CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn start_slapd(lan: &Lan, dir: &Path) -> (Slapd, String) {
    let (ca, cert, key) = certificates();
    std::fs::write(dir.join("server.crt"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    std::fs::create_dir_all(dir.join("db")).unwrap();
    let conf = format!(
        "include /etc/ldap/schema/core.schema\n\
         include /etc/ldap/schema/cosine.schema\n\
         include /etc/ldap/schema/inetorgperson.schema\n\
         modulepath /usr/lib/ldap\nmoduleload back_mdb\n\
         pidfile {d}/slapd.pid\n\
         TLSCertificateFile {d}/server.crt\nTLSCertificateKeyFile {d}/server.key\n\
         database mdb\nmaxsize 10485760\nsuffix \"{BASE}\"\n\
         rootdn \"cn=admin,{BASE}\"\nrootpw root-secret\ndirectory {d}/db\n\
         access to attrs=userPassword by anonymous auth by * none\n\
         access to * by users read by * none\n",
        d = dir.display()
    );
    std::fs::write(dir.join("slapd.conf"), conf).unwrap();
    std::fs::write(dir.join("seed.ldif"), seed_ldif()).unwrap();
    run(std::process::Command::new("slapadd")
        .arg("-f")
        .arg(dir.join("slapd.conf"))
        .arg("-l")
        .arg(dir.join("seed.ldif")));
    let child = lan
        .command(0, Path::new("slapd"))
        .arg("-f")
        .arg(dir.join("slapd.conf"))
        .args([
            "-h",
            "ldap://127.0.0.1:389/ ldaps://127.0.0.1:636/",
            "-d",
            "0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("slapd.log")).unwrap())
        .spawn()
        .unwrap();
    let slapd = Slapd(child);
    wait_for("slapd to answer", 20, || {
        let mut c = lan.command(0, Path::new("ldapwhoami"));
        c.args([
            "-x",
            "-H",
            "ldap://127.0.0.1:389",
            "-D",
            SERVICE_DN,
            "-w",
            SERVICE_PW,
        ]);
        tessera_tests::output(&mut c).status.success().then_some(())
    });
    (slapd, ca)
}

/// Removes `member` from group `cn` through the directory's own tools.
fn remove_member(lan: &Lan, dir: &Path, cn: &str, member: &str) {
    let ldif = format!(
        "dn: cn={cn},ou=groups,{BASE}\nchangetype: modify\ndelete: member\nmember: {member}\n"
    );
    let f = dir.join("modify.ldif");
    std::fs::write(&f, ldif).unwrap();
    let mut c = lan.command(0, Path::new("ldapmodify"));
    c.args([
        "-x",
        "-H",
        "ldap://127.0.0.1:389",
        "-D",
        &format!("cn=admin,{BASE}"),
    ])
    .args(["-w", "root-secret", "-f"])
    .arg(&f);
    run(&mut c);
}

/// Logins come from addresses of their own (10.77.0.100 and up, added to node 0's
/// interface), so the refusals this test provokes stay under the per-address back-off.
fn login(lan: &Lan, user: &str, password: &str) -> (u16, Value) {
    login_2fa(lan, user, password, None)
}

/// [`login`] with a second factor.
fn login_2fa(lan: &Lan, user: &str, password: &str, totp: Option<&str>) -> (u16, Value) {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(100);
    let from = format!(
        "10.77.0.{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let mut c = lan.command(0, Path::new("ip"));
    run(c.args(["addr", "add", &format!("{from}/24"), "dev", "eth0"]));
    let mut body = json!({ "username": user, "password": password });
    if let Some(t) = totp {
        body["totp"] = json!(t);
    }
    let body = body.to_string();
    let (code, text) = curl(
        lan,
        0,
        "login",
        &[
            "--interface",
            &from,
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ],
    );
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn directory_users_log_in_with_mapped_roles_and_lose_them_at_the_next_sync() {
    let test = "directory_users_log_in_with_mapped_roles_and_lose_them_at_the_next_sync";
    let Some(lan) = Lan::new(test, 1) else {
        return;
    };
    for tool in ["curl", "slapd", "slapadd", "ldapwhoami", "ldapmodify"] {
        require(tool);
    }
    let d = tempfile::tempdir().unwrap();
    let ldap_dir = d.path().join("ldap");
    std::fs::create_dir_all(&ldap_dir).unwrap();
    let (_slapd, ca_pem) = start_slapd(&lan, &ldap_dir);
    let nodes = vec![ClusterNode::start(&lan, 0, d.path(), 1, false)];
    let admin = admin_session(&lan, &nodes, 0, "directory-test-admin-pw");
    let tok = Some(admin.as_str());
    let logs = || nodes[0].logs();

    // Plain LDAP without StartTLS needs `insecure` (otherwise `ldap://` is upgraded
    // with StartTLS: the unit tests of `directory` check that choice).
    let groups = json!({
        format!("cn=tessera-admins,ou=groups,{BASE}"): "administrator",
        format!("CN=Ops, OU=groups, {BASE}"): "operator",
    });
    let realm = json!({
        "name": "corp",
        // Nothing listens on 3899: the first server is down, the second answers.
        "uris": ["ldap://127.0.0.1:3899", "ldap://127.0.0.1:389"],
        "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW,
        "user_base": format!("ou=people,{BASE}"), "group_base": format!("ou=groups,{BASE}"),
        "group_roles": groups,
        "insecure": true,
    });
    let (code, v) = api(&lan, 0, "POST", "realms", tok, Some(&realm.to_string()));
    assert_eq!(code, 201, "{v}");
    let (code, v) = api(&lan, 0, "GET", "realms/corp", tok, None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["has_bind_password"], true, "{v}");
    assert!(v.get("bind_password").is_none(), "{v}");
    assert!(!v.to_string().contains(SERVICE_PW), "{v}");

    // `test` binds and shows what alice would get, through the nested group.
    let (code, v) = api(
        &lan,
        0,
        "POST",
        "realms/corp/test",
        tok,
        Some(r#"{"username":"alice","password":"alice-password"}"#),
    );
    assert_eq!(code, 200, "{v}\n{}", logs());
    assert_eq!(v["server"], "ldap://127.0.0.1:389", "{v}");
    assert_eq!(v["role"], "administrator", "{v}");
    assert_eq!(v["password_ok"], true, "{v}");
    let groups = v["groups"].to_string().to_lowercase();
    assert!(
        groups.contains("cn=team-leads") && groups.contains("cn=tessera-admins"),
        "{v}"
    );

    // Mapped roles.
    let (code, v) = login(&lan, "alice@corp", "alice-password");
    assert_eq!(code, 200, "{v}\n{}", logs());
    let alice = v["token"].as_str().unwrap().to_string();
    assert_eq!(api(&lan, 0, "GET", "users", Some(&alice), None).0, 200);
    let (code, v) = login(&lan, "bob@corp", "bob-password");
    assert_eq!(code, 200, "{v}");
    let bob = v["token"].as_str().unwrap().to_string();
    assert_eq!(api(&lan, 0, "GET", "volumes", Some(&bob), None).0, 200);
    assert_eq!(api(&lan, 0, "GET", "users", Some(&bob), None).0, 403);

    // Refusals: wrong password, empty password (an unauthenticated bind would succeed),
    // a user without a mapped group, an unknown realm.
    assert_eq!(login(&lan, "alice@corp", "wrong-password").0, 401);
    assert_eq!(login(&lan, "alice@corp", "").0, 401);
    let (code, v) = login(&lan, "carol@corp", "carol-password");
    assert_eq!(code, 403, "{v}");
    assert_eq!(login(&lan, "alice@nowhere", "alice-password").0, 401);

    // Injections find no one, and are logged.
    for name in ["*", "alice)(uid=*", "*)(|(uid=*", "alice\u{0}"] {
        let (code, v) = login(&lan, &format!("{name}@corp"), "alice-password");
        assert_eq!(code, 401, "{name:?}: {v}");
    }
    let text = wait_for("the injection attempts in the log", 10, || {
        let l = logs();
        (l.matches("injection attempt").count() >= 4).then_some(l)
    });
    assert!(text.contains("alice)(uid=*"), "{text}");

    // dave is an administrator until removed from the group; the sync ends his session.
    let (code, v) = login(&lan, "dave@corp", "dave-password");
    assert_eq!(code, 200, "{v}");
    let dave = v["token"].as_str().unwrap().to_string();
    assert_eq!(api(&lan, 0, "GET", "users", Some(&dave), None).0, 200);
    remove_member(
        &lan,
        &ldap_dir,
        "tessera-admins",
        &format!("uid=dave,ou=people,{BASE}"),
    );
    let (code, v) = api(&lan, 0, "POST", "realms/corp/sync", tok, None);
    assert_eq!(code, 200, "{v}\n{}", logs());
    assert_eq!(v["changed"], json!(["dave@corp"]), "{v}");
    assert_eq!(v["checked"], 3, "alice, bob, dave: {v}");
    assert_eq!(api(&lan, 0, "GET", "volumes", Some(&dave), None).0, 401);
    assert_eq!(api(&lan, 0, "GET", "users", Some(&alice), None).0, 200);
    let (code, v) = login(&lan, "dave@corp", "dave-password");
    assert_eq!(code, 403, "no mapped group any more: {v}");

    // ldaps with the uploaded CA; a wrong CA is refused.
    let mut tls = json!({
        "name": "corp-tls", "uris": ["ldaps://127.0.0.1:636"], "ca_pem": ca_pem,
        "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW,
        "user_base": format!("ou=people,{BASE}"), "group_base": format!("ou=groups,{BASE}"),
        "group_roles": { format!("cn=ops,ou=groups,{BASE}"): "operator" },
    });
    let (code, v) = api(&lan, 0, "POST", "realms", tok, Some(&tls.to_string()));
    assert_eq!(code, 201, "{v}");
    let (code, v) = login(&lan, "bob@corp-tls", "bob-password");
    assert_eq!(code, 200, "{v}\n{}", logs());
    let bob_tls = v["token"].as_str().unwrap().to_string();
    tls["name"] = json!("wrong-ca");
    tls["ca_pem"] = json!(certificates().0);
    let (code, v) = api(&lan, 0, "POST", "realms", tok, Some(&tls.to_string()));
    assert_eq!(code, 201, "{v}");
    let (code, v) = login(&lan, "bob@wrong-ca", "bob-password");
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no server"), "{v}");

    // Two-factor login (TOTP) for bob@corp-tls, checked by the test's own authenticator.
    let recovery = two_factor(&lan, &bob_tls);

    // The login policy (default realm, a second factor required by realm or role), an
    // administrator removing an authenticator, per-user roles, refused changes as events,
    // `tessera login` asking for the code and `tessera event ls --user`.
    policy::check(
        &lan,
        &d.path().join("home"),
        &admin,
        &bob,
        &recovery,
        &realm,
    );

    // The audit trail: logins and refusals with the source address, by user.
    let (code, v) = api(
        &lan,
        0,
        "GET",
        "events?user=alice@corp&limit=100",
        tok,
        None,
    );
    assert_eq!(code, 200, "{v}");
    let ev = v.as_array().unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"login") && kinds.contains(&"login.failed"),
        "{v}"
    );
    assert!(
        ev.iter()
            .all(|e| e["user"] == "alice@corp" || e["target"] == "alice@corp"),
        "{v}"
    );
    assert!(
        ev.iter()
            .all(|e| e["message"].as_str().unwrap().contains("from 10.77.0.1")),
        "{v}"
    );
    // The source address is a field of its own too: the address each login came from.
    assert!(
        ev.iter().all(|e| {
            let m = e["message"].as_str().unwrap();
            let s = e["source"].as_str().unwrap_or("(none)");
            s.starts_with("10.77.0.1") && m.contains(&format!("from {s}"))
        }),
        "{v}"
    );

    // Deleting a realm ends its users' sessions.
    assert_eq!(api(&lan, 0, "DELETE", "realms/corp", tok, None).0, 200);
    assert_eq!(api(&lan, 0, "GET", "volumes", Some(&alice), None).0, 401);
    assert_eq!(api(&lan, 0, "GET", "volumes", Some(&admin), None).0, 200);
}

/// RFC 6238's code (HMAC-SHA1, 30 s, 6 digits) of `secret` at step `step`.
fn totp_code(secret: &[u8], step: u64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let h = ring::hmac::sign(&key, &step.to_be_bytes());
    let h = h.as_ref();
    let o = usize::from(h[19] & 0x0f);
    let v = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]);
    format!("{:06}", v % 1_000_000)
}

/// Enrolls bob@corp-tls and checks logins with codes; returns the recovery codes left
/// unused (the first two are used here).
fn two_factor(lan: &Lan, token: &str) -> Vec<String> {
    let (code, v) = api(lan, 0, "POST", "totp", Some(token), None);
    assert_eq!(code, 201, "{v}");
    let uri = v["otpauth_uri"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/Tessera:bob@corp-tls?secret="),
        "{v}"
    );
    let secret = data_encoding::BASE32_NOPAD
        .decode(v["secret"].as_str().unwrap().as_bytes())
        .unwrap();
    // The codes below span three steps around now; start early in a step so the server
    // (same clock) sees the same steps. Waits at most 10 s, once.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    if now() % 30 > 20 {
        std::thread::sleep(std::time::Duration::from_secs(31 - now() % 30));
    }
    let step = now() / 30;
    // Confirmed with the previous step's code (clock skew allowed): recovery codes, once.
    let body = json!({ "code": totp_code(&secret, step - 1) }).to_string();
    let (code, v) = api(lan, 0, "POST", "totp/confirm", Some(token), Some(&body));
    assert_eq!(code, 200, "{v}");
    let recovery: Vec<String> = serde_json::from_value(v["recovery_codes"].clone()).unwrap();
    assert_eq!(recovery.len(), 8, "{v}");
    let login = |t: Option<&str>| login_2fa(lan, "bob@corp-tls", "bob-password", t);
    // The password alone, a wrong code: refused.
    let (code, v) = login(None);
    assert_eq!(code, 401, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("second factor"),
        "{v}"
    );
    assert_eq!(login(Some("000000")).0, 401);
    // The current step's code, once; the next step's code; the previous one is used up.
    assert_eq!(login(Some(&totp_code(&secret, step))).0, 200);
    assert_eq!(
        login(Some(&totp_code(&secret, step))).0,
        401,
        "a reused code"
    );
    assert_eq!(
        login(Some(&totp_code(&secret, step + 1))).0,
        200,
        "the next step's code"
    );
    assert_eq!(
        login(Some(&totp_code(&secret, step - 1))).0,
        401,
        "older than the last used"
    );
    // A recovery code works once; a wrong password with a right code is still refused.
    assert_eq!(login(Some(&recovery[0])).0, 200);
    assert_eq!(
        login(Some(&recovery[0])).0,
        401,
        "a recovery code works once"
    );
    assert_eq!(
        login_2fa(lan, "bob@corp-tls", "wrong", Some(&recovery[1])).0,
        401
    );
    // API tokens are unaffected: the session's token still works.
    assert_eq!(api(lan, 0, "GET", "volumes", Some(token), None).0, 200);
    recovery
}
