//! The REST API's edges on the README's local three-node cluster (one start for every
//! check): failed logins back off per address (429 with Retry-After) while the right
//! password from another address still gets in.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::Command;

use serde_json::{json, Value};
use tessera_tests::devcluster::DevCluster;
use tessera_tests::{output, require};

/// One HTTP answer: status, headers (lower-case names), body.
struct Answer {
    code: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.code, self.body))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// A request to node `node` (1-3) with curl, optionally from source address `from`.
fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    extra: &[&str],
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let hdr = dir.path().join("h");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "30", "--cacert", ca, "-X", method, "-D"])
        .arg(&hdr)
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.{node}:8006/api/v1/{path}"))
        .args(extra);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data"])
            .arg(b.to_string());
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = output(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        code: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
        body: body.to_string(),
    }
}

fn login_from(ca: &str, from: &str, password: &str) -> Answer {
    call(
        ca,
        1,
        "POST",
        "login",
        None,
        Some(&json!({"username": "admin", "password": password})),
        &["--interface", from],
    )
}

/// 50 quick wrong guesses from one address are mostly refused with 429 before any
/// password check; the right password from that address waits too, from another address
/// it gets in.
fn failed_logins_back_off_per_address(ca: &str, password: &str) {
    let start = std::time::Instant::now();
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..50 {
        let a = login_from(ca, "127.0.0.3", &format!("wrong guess number {i}"));
        match a.code {
            401 => unauthorized += 1,
            429 => {
                throttled += 1;
                let wait: u64 = a
                    .header("retry-after")
                    .unwrap_or_else(|| panic!("429 without Retry-After: {}", a.headers))
                    .parse()
                    .unwrap();
                assert!((1..=900).contains(&wait), "Retry-After: {wait}");
                assert!(a.json()["error"].as_str().unwrap().contains("too many"));
            }
            c => panic!("guess {i}: {c} {}", a.body),
        }
    }
    assert!(
        throttled >= 40 && unauthorized <= 10,
        "50 wrong guesses: {unauthorized} x 401, {throttled} x 429 in {:?}",
        start.elapsed()
    );
    // The guessing address waits even with the right password...
    assert_eq!(login_from(ca, "127.0.0.3", password).code, 429);
    // ... another address does not.
    let a = login_from(ca, "127.0.0.2", password);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(a.json()["token"].is_string());
}

#[test]
fn the_api_holds_its_edges() {
    require("curl");
    let d = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(d.path());
    let (password, ca) = (cluster.admin_password(), cluster.ca_file());

    failed_logins_back_off_per_address(&ca, &password);

    cluster.stop();
}
