//! An uploaded API certificate: checked, served by every node for its name, removed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::output;

use super::call;

/// A test CA of the test's own.
fn test_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "api-edges test CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let k = rcgen::KeyPair::generate().unwrap();
    (p.self_signed(&k).unwrap(), k)
}

/// A certificate `ca` issues for `names` (valid now, or expired in 2021): (PEM, key PEM).
fn test_leaf(
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    names: &[&str],
    expired: bool,
) -> (String, String) {
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let k = rcgen::KeyPair::generate().unwrap();
    let c = p.signed_by(&k, &ca.0, &ca.1).unwrap();
    (c.pem(), k.serialize_pem())
}

/// `GET /certificate` on node `node` by the name `name` (SNI), trusting only `cacert`:
/// curl's exit code and the HTTP status.
fn by_name(cacert: &std::path::Path, name: &str, node: u8, token: &str) -> (i32, u16) {
    let out = output(
        Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(cacert)
            .args(["--resolve", &format!("{name}:8006:127.0.0.{node}")])
            .args(["-H", &format!("authorization: Bearer {token}")])
            .arg(format!("https://{name}:8006/api/v1/certificate")),
    );
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.code().unwrap_or(-1), code)
}

/// Polls (up to 30 s) until `ok` holds of `by_name` on `node`.
fn until_served(
    cacert: &std::path::Path,
    name: &str,
    node: u8,
    token: &str,
    ok: impl Fn((i32, u16)) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = by_name(cacert, name, node, token);
        if ok(r) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} by {name}: curl {r:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// An uploaded certificate is checked (garbage, another certificate's key, an expired
/// one: 400 naming the problem, nothing installed), then served by every node for its
/// name without a restart (verified with the test CA through node 2 and 3 after an upload
/// through node 1) while connections by address keep the cluster-CA certificate; removed,
/// the nodes serve their cluster-CA certificate for that name again.
pub fn an_installed_certificate_is_served_by_every_node(ca: &str, token: &str) {
    let name = "api.edges.test";
    let test_ca = test_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, test_ca.0.pem()).unwrap();
    let (cert, key) = test_leaf(&test_ca, &[name], false);
    let (_, other_key) = test_leaf(&test_ca, &["other.edges.test"], false);
    let (old, old_key) = test_leaf(&test_ca, &[name], true);
    let chain = format!("{cert}{}", test_ca.0.pem());
    let upload = |cert: &str, key: &str| {
        call(
            ca,
            1,
            "POST",
            "certificate",
            Some(token),
            Some(&json!({"cert_pem": cert, "key_pem": key})),
            &[],
        )
    };
    for (c, k, why) in [
        ("garbage", key.as_str(), "no certificate"),
        (chain.as_str(), other_key.as_str(), "does not belong"),
        (old.as_str(), old_key.as_str(), "expired"),
    ] {
        let a = upload(c, k);
        assert_eq!(a.code, 400, "{why}: {}", a.body);
        assert!(a.body.contains(why), "{why}: {}", a.body);
    }
    let none = call(ca, 2, "GET", "certificate", Some(token), None, &[]);
    assert_eq!(none.code, 200, "{}", none.body);
    assert_eq!(none.json()["installed"], Value::Null, "{}", none.body);

    let a = upload(&chain, &key);
    assert_eq!(a.code, 200, "{}", a.body);
    let installed = a.json()["installed"].clone();
    assert_eq!(installed["names"], json!([name]), "{installed}");
    assert_eq!(installed["chain_len"], 2, "{installed}");
    assert!(!a.body.contains("PRIVATE KEY"), "the key shown: {}", a.body);
    for node in [2, 3, 1] {
        until_served(&ca_file, name, node, token, |r| r == (0, 200));
    }
    let shown = call(ca, 3, "GET", "certificate", Some(token), None, &[]);
    assert_eq!(
        shown.json()["installed"]["sha256"],
        installed["sha256"],
        "{}",
        shown.body
    );
    assert!(!shown.body.contains("PRIVATE KEY"), "{}", shown.body);
    // By address (no SNI): still the cluster CA's certificate (`call` trusts only it).
    assert_eq!(
        call(ca, 2, "GET", "cluster", Some(token), None, &[]).code,
        200
    );
    // A bad upload changes nothing: still served.
    assert_eq!(upload(&old, &old_key).code, 400);
    assert_eq!(by_name(&ca_file, name, 2, token), (0, 200));

    let a = call(ca, 1, "DELETE", "certificate", Some(token), None, &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["installed"], Value::Null, "{}", a.body);
    // 60: curl's "peer certificate cannot be authenticated with the given CA".
    for node in [2, 3] {
        until_served(&ca_file, name, node, token, |(exit, _)| exit == 60);
        let s = output(
            Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.{node}:8006"),
                    "-servername",
                    name,
                    "-CAfile",
                    ca,
                ])
                .stdin(Stdio::null()),
        );
        let text = String::from_utf8_lossy(&s.stdout);
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "node {node} after remove: {text}"
        );
    }
}
