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

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// 50 quick wrong guesses from one address are mostly refused with 429 before any
/// password check; the right password from that address waits too, from another address
/// it gets in.
fn failed_logins_back_off_per_address(ca: &str, node: u8, password: &str) {
    let start = std::time::Instant::now();
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..50 {
        let a = login_from(ca, node, "127.0.0.3", &format!("wrong guess number {i}"));
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
    // The guessing address waits even with the right password. The window is the
    // server's: a few seconds after the last counted failure, which a loaded machine can
    // outlast while it runs the 50 guesses. So first make sure a window is open for at
    // least another second: a wrong guess is either counted (401: a new, longer window
    // opens at once) or refused with the time left; with under 2 s left, wait it out
    // (the server said how long) and guess again.
    for _ in 0..3 {
        let a = login_from(ca, node, "127.0.0.3", "one wrong guess more");
        match a.code {
            401 => break,
            429 => {
                let left: u64 = a.header("retry-after").unwrap().parse().unwrap();
                if left >= 2 {
                    break;
                }
                std::thread::sleep(Duration::from_secs(left + 1));
            }
            c => panic!("one more guess: {c} {}", a.body),
        }
    }
    assert_eq!(login_from(ca, node, "127.0.0.3", password).code, 429);
    // ... another address does not.
    let a = login_from(ca, node, "127.0.0.2", password);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(a.json()["token"].is_string());
}

/// 300 TCP connections that never start TLS, then a real request: served at once (a new
/// handshake evicts the oldest silent one).
fn idle_connections_do_not_keep_a_request_out(ca: &str, token: &str) {
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect("127.0.0.1:8006").unwrap())
        .collect();
    let start = Instant::now();
    let a = call(ca, 1, "GET", "cluster", Some(token), None, &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a request behind 300 idle connections took {:?}",
        start.elapsed()
    );
    drop(idle);
}

/// A client that sends its header a line a second is cut off at the 10 s header deadline
/// and never answered 200.
fn a_slow_loris_is_cut_off(ca: &str) {
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            "127.0.0.1:8006",
            "-CAfile",
            ca,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let start = Instant::now();
    let _ = stdin.write_all(b"GET /api/v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let ended = loop {
        if let Some(status) = c.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(30) {
            break None;
        }
        // One more header line a second: never the blank line that ends the header.
        let _ = stdin.write_all(b"X-Slow: 1\r\n");
        let _ = stdin.flush();
        std::thread::sleep(Duration::from_secs(1));
    };
    let took = start.elapsed();
    if ended.is_none() {
        let _ = c.kill();
    }
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        ended.is_some(),
        "a slow-loris connection was still open after {took:?}"
    );
    assert!(
        took >= Duration::from_secs(8),
        "cut off after {took:?}, before the header deadline: {text}"
    );
    assert!(!text.contains(" 200 "), "{text}");
}

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

fn create_volume(ca: &str, node: u8, token: &str, body: &Value, key: Option<&str>) -> Answer {
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
fn an_idempotent_create_retried_gets_its_first_answer(ca: &str, node: u8, token: &str) {
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
    let post = |path: &str, body: &Value, key: Option<&str>| {
        let h = key.map(|k| format!("Idempotency-Key: {k}"));
        let extra: Vec<&str> = h.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        let a = call(ca, node, "POST", path, Some(token), Some(body), &extra);
        assert_no_internals(&a);
        a
    };
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
fn idempotent_creates_of_users_and_networks(ca: &str, token: &str) {
    let post = |node: u8, path: &str, body: &Value, key: Option<&str>| {
        let h = key.map(|k| format!("Idempotency-Key: {k}"));
        let extra: Vec<&str> = h.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        let a = call(ca, node, "POST", path, Some(token), Some(body), &extra);
        assert_no_internals(&a);
        a
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
fn post_keyed(
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
fn idempotent_vms_and_tokens(ca: &str, token: &str) {
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

/// `PATCH /vms/{name}` changes `stop_timeout_s` within 1-3600 and refuses the rest,
/// changing nothing.
fn patch_stop_timeout(ca: &str, token: &str) {
    let a = call(
        ca,
        2,
        "PATCH",
        "vms/idem-vm",
        Some(token),
        Some(&json!({"stop_timeout_s": 120})),
        &[],
    );
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["stop_timeout_s"], 120, "{}", a.body);
    for bad in [json!(0), json!(3601), json!("5"), json!(1.5)] {
        let a = call(
            ca,
            1,
            "PATCH",
            "vms/idem-vm",
            Some(token),
            Some(&json!({"stop_timeout_s": bad})),
            &[],
        );
        assert_eq!(a.code, 400, "{bad}: {}", a.body);
        if bad.is_u64() {
            assert!(
                a.body.contains("stop_timeout_s must be 1 to 3600"),
                "{bad}: {}",
                a.body
            );
        }
    }
    let vm = call(ca, 3, "GET", "vms/idem-vm", Some(token), None, &[]).json();
    assert_eq!(vm["stop_timeout_s"], 120, "{vm}");
}

/// A VM whose disk is a replicated volume becomes a template exactly when
/// `POST /volumes/{name}/snapshots` would snapshot that volume (one code path): refused
/// alike today (409 "not supported yet for replicated volumes", nothing changed), and
/// made on every copy once replicated snapshots land, never on one copy only.
fn a_template_of_a_replicated_disk_follows_the_snapshot_path(ca: &str, token: &str) {
    for v in ["tmpl-r", "tmpl-probe"] {
        let vol = json!({"name": v, "size_bytes": 1048576, "replicas": 2});
        let a = post_keyed(ca, 1, token, "volumes", &vol, None);
        assert_eq!(a.code, 202, "{}", a.body);
    }
    for v in ["tmpl-r", "tmpl-probe"] {
        wait_ready(ca, 1, token, &format!("volumes/{v}"), |v| {
            v["state"] == "ready"
        });
    }
    let vm = json!({"name": "tmpl-vm", "vcpus": 1, "memory_mib": 64, "disks": ["tmpl-r"]});
    let a = post_keyed(ca, 1, token, "vms", &vm, None);
    assert_eq!(a.code, 201, "{}", a.body);
    let probe = post_keyed(
        ca,
        1,
        token,
        "volumes/tmpl-probe/snapshots",
        &json!({"name": "template"}),
        None,
    );
    let a = post_keyed(ca, 2, token, "vms/tmpl-vm/template", &json!({}), None);
    let vm = call(ca, 1, "GET", "vms/tmpl-vm", Some(token), None, &[]).json();
    let v = call(ca, 1, "GET", "volumes/tmpl-r", Some(token), None, &[]).json();
    if probe.code == 409 {
        assert_eq!(
            a.code, 409,
            "snapshot refused ({}) but template: {}",
            probe.body, a.body
        );
        let msg = a.json()["error"].as_str().unwrap().to_string();
        let why = probe.json()["error"]
            .as_str()
            .unwrap()
            .replace("tmpl-probe", "tmpl-r");
        assert_eq!(msg, format!("disks: {why}"));
        assert_eq!(vm["template"], false, "{vm}");
        assert_eq!(v["snapshots"], json!([]), "{v}");
    } else {
        assert_eq!(probe.code, 202, "{}", probe.body);
        assert_eq!(
            a.code, 200,
            "snapshot taken ({}) but template: {}",
            probe.body, a.body
        );
        assert_eq!(vm["template"], true, "{vm}");
        let snaps = v["snapshots"].as_array().unwrap();
        assert!(snaps.iter().any(|s| s["name"] == "template"), "{v}");
    }
}

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
fn an_installed_certificate_is_served_by_every_node(ca: &str, token: &str) {
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

/// Waits (up to 30 s) until `GET path` answers 200 with a body that `ready` accepts.
fn wait_ready(ca: &str, node: u8, token: &str, path: &str, ready: impl Fn(&Value) -> bool) {
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

/// The devcluster node (1-3) that leads, by its name `nodeN`.
fn leader(ca: &str, node: u8, token: &str) -> u8 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = call(ca, node, "GET", "cluster", Some(token), None, &[]);
        if let Some(n) = a.json()["leader_name"]
            .as_str()
            .and_then(|n| n.strip_prefix("node"))
        {
            return n.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no leader: {}", a.body);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pid of node `i`'s tesserad under `dir` (its command line names its seed).
fn tesserad_pid(dir: &std::path::Path, i: u8) -> i32 {
    let seed = dir.join(format!("node{i}/seed.toml"));
    let seed = seed.to_string_lossy();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("tesserad") && cmd.contains(seed.as_ref()) {
            return pid;
        }
    }
    panic!("no tesserad for node {i}");
}

/// Creates in flight on follower `f` while the leader `l` is killed: each is 202 or 503
/// with an outcome; a retry with the same key is then 202, never 409; every volume exists.
fn creates_survive_the_leader_dying(dir: &std::path::Path, ca: &str, f: u8, l: u8, token: &str) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answers = std::thread::scope(|s| {
        let worker = {
            let done = done.clone();
            s.spawn(move || {
                (0..30)
                    .map(|i| {
                        let body = json!({"name": format!("kill-{i}"), "size_bytes": 1048576, "replicas": 1});
                        let a = create_volume(ca, f, token, &body, Some(&format!("kill-{i}")));
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        (i, a)
                    })
                    .collect::<Vec<_>>()
            })
        };
        while done.load(std::sync::atomic::Ordering::SeqCst) < 5 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = nix::unistd::Pid::from_raw(tesserad_pid(dir, l));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        worker.join().unwrap()
    });
    let mut retried = 0;
    for (i, a) in answers {
        if a.code == 202 {
            continue;
        }
        assert_eq!(a.code, 503, "kill-{i}: {}", a.body);
        let outcome = a.json()["outcome"].as_str().unwrap_or_default().to_string();
        assert!(
            ["unknown", "not_applied", "committed"].contains(&outcome.as_str()),
            "kill-{i}: {}",
            a.body
        );
        retried += 1;
        let body = json!({"name": format!("kill-{i}"), "size_bytes": 1048576, "replicas": 1});
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = create_volume(ca, f, token, &body, Some(&format!("kill-{i}")));
            if r.code == 202 {
                break;
            }
            assert_eq!(r.code, 503, "retry of kill-{i} ({outcome}): {}", r.body);
            assert!(Instant::now() < deadline, "kill-{i}: {}", r.body);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    eprintln!("creates while the leader died: {retried} of 30 answered 503 and retried");
    for i in 0..30 {
        let a = call(
            ca,
            f,
            "GET",
            &format!("volumes/kill-{i}"),
            Some(token),
            None,
            &[],
        );
        assert_eq!(a.code, 200, "kill-{i}: {}", a.body);
    }
}

/// A volume asked of the down node `l`: its task fails within a bounded time naming the
/// node, and the name is free again.
fn a_task_for_a_down_node_fails_naming_it(ca: &str, f: u8, l: u8, token: &str) {
    let nodes = call(ca, f, "GET", "nodes", Some(token), None, &[]).json();
    let id = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == format!("node{l}"))
        .unwrap_or_else(|| panic!("no node{l}: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = json!({"name": "on-a-down-node", "size_bytes": 1048576, "node": id, "replicas": 1});
    let a = create_volume(ca, f, token, &body, None);
    assert_eq!(a.code, 202, "{}", a.body);
    let task = a.json()["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    let t = loop {
        let t = call(
            ca,
            f,
            "GET",
            &format!("tasks/{task}"),
            Some(token),
            None,
            &[],
        )
        .json();
        if t["state"] != "queued" && t["state"] != "running" {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "a task for down node{l} still waits after {:?}: {t}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(t["state"], "failed", "{t}");
    let err = t["error"].as_str().unwrap_or_default();
    assert!(err.contains(&format!("node{l} is down")), "{t}");
    let v = call(
        ca,
        f,
        "GET",
        "volumes/on-a-down-node",
        Some(token),
        None,
        &[],
    );
    assert_eq!(v.code, 404, "the failed create left {}", v.body);
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

    idle_connections_do_not_keep_a_request_out(&ca, &token);
    a_slow_loris_is_cut_off(&ca);
    an_idempotent_create_retried_gets_its_first_answer(&ca, 1, &token);
    idempotent_creates_of_users_and_networks(&ca, &token);
    idempotent_vms_and_tokens(&ca, &token);
    patch_stop_timeout(&ca, &token);
    a_template_of_a_replicated_disk_follows_the_snapshot_path(&ca, &token);
    an_installed_certificate_is_served_by_every_node(&ca, &token);

    let l = leader(&ca, 1, &token);
    let f = if l == 1 { 2 } else { 1 };
    creates_survive_the_leader_dying(d.path(), &ca, f, l, &token);
    a_task_for_a_down_node_fails_naming_it(&ca, f, l, &token);

    failed_logins_back_off_per_address(&ca, f, &password);

    cluster.stop();
}
