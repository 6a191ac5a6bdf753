//! Live migration between two `tessera-vmm` processes (no cluster): the counting test
//! guest moves from one VMM to another over TLS with certificates of a CA minted here,
//! and keeps counting where it was, with no reboot; its disk keeps working. Then the
//! edges: a client without a certificate of the CA, one with another CA's, a wrong
//! token, a target killed in the middle, a cancel — each leaves the guest running on its
//! source, and the target still listening where it should.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::{bin, counts, require, wait_console, VmApi};

const GUEST: &str = env!("TESSERA_TEST_GUEST");

/// A node's TLS files.
struct Creds {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Mints a CA in `dir` and a certificate for each node id.
fn mint(dir: &Path, cluster: &str, nodes: &[&str]) -> Vec<Creds> {
    let ca = tessera_pki::ClusterCa::mint(cluster).unwrap();
    let ca_path = dir.join(format!("{cluster}-ca.crt"));
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    nodes
        .iter()
        .map(|n| {
            let (key, csr) = tessera_pki::node_key_and_request(n).unwrap();
            let cert = ca.issue(&csr, n).unwrap();
            let c = Creds {
                ca: ca_path.clone(),
                cert: dir.join(format!("{cluster}-{n}.crt")),
                key: dir.join(format!("{cluster}-{n}.key")),
            };
            std::fs::write(&c.cert, cert).unwrap();
            std::fs::write(&c.key, key).unwrap();
            c
        })
        .collect()
}

/// A VMM process that is killed when dropped.
struct Vmm {
    child: Child,
    sock: PathBuf,
    console: PathBuf,
    log: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn spawn(dir: &Path, name: &str, args: &[&std::ffi::OsStr]) -> Vmm {
        let (sock, console, log) = (
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}.console")),
            dir.join(format!("{name}.log")),
        );
        let child = Command::new(bin("tessera-vmm"))
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial-out")
            .arg(&console)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Vmm {
            child,
            sock,
            console,
            log,
        }
    }

    /// Boots the counting guest on `disk`.
    fn boot(dir: &Path, name: &str, disk: &Path) -> Vmm {
        Vmm::spawn(
            dir,
            name,
            &[
                "--kernel".as_ref(),
                GUEST.as_ref(),
                "--memory-mib".as_ref(),
                "64".as_ref(),
                "--cmdline".as_ref(),
                "console=ttyS0 tessera.mode=count".as_ref(),
                "--disk".as_ref(),
                disk.as_os_str(),
            ],
        )
    }

    /// A target waiting on loopback with node `c`'s credentials, its disk `disk`.
    fn incoming(dir: &Path, name: &str, disk: &Path, c: &Creds) -> Vmm {
        Vmm::spawn(
            dir,
            name,
            &[
                "--incoming".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--memory-mib".as_ref(),
                "64".as_ref(),
                "--disk".as_ref(),
                disk.as_os_str(),
                "--migration-tls-ca".as_ref(),
                c.ca.as_os_str(),
                "--migration-tls-cert".as_ref(),
                c.cert.as_os_str(),
                "--migration-tls-key".as_ref(),
                c.key.as_os_str(),
            ],
        )
    }

    fn call(&self, op: Value) -> Value {
        VmApi::connect(&self.sock).call(op)
    }

    fn raw(&self, op: Value) -> Value {
        VmApi::connect(&self.sock).raw(&json!({ "v": 1, "op": op }).to_string())
    }

    fn status(&self) -> Value {
        self.call(json!({"type": "migration_status"}))
    }

    /// Waits (30 s) until the migration status satisfies `ok`; returns it.
    fn wait_status(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.call(json!({"type": "migration_status", "wait_ms": 200}));
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: status {s}\nlog:\n{}",
                self.log_text()
            );
        }
    }

    fn state(&self) -> String {
        self.call(json!({"type": "describe"}))["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn last_count(&self) -> u64 {
        *counts(&self.console_text()).last().unwrap_or(&0)
    }

    /// Waits until the guest counted past what it showed when called.
    fn counting(&self) -> u64 {
        let from = self.last_count();
        wait_console(&self.console, "the count to advance", |t| {
            counts(t).last().is_some_and(|n| *n > from)
        });
        self.last_count()
    }

    /// The target's address and token, once it listens.
    fn listening(&self) -> (String, String) {
        let s = self.wait_status("the target to listen", |s| s["phase"] == "listening");
        (
            s["listen"].as_str().unwrap().to_string(),
            s["token"].as_str().unwrap().to_string(),
        )
    }

    /// Asks this (source) VMM to migrate to `target`.
    fn migrate(&self, to: &str, token: &str, c: &Creds, extra: Value) -> Value {
        let mut op = json!({
            "type": "migrate", "to": to, "server_name": "nodeb.node.tessera", "token": token,
            "tls_ca": c.ca, "tls_cert": c.cert, "tls_key": c.key,
        });
        for (k, v) in extra.as_object().unwrap() {
            op[k] = v.clone();
        }
        self.raw(op)
    }

    /// Waits (10 s) for the process to end; returns whether it exited successfully.
    fn exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The count the guest last wrote to its disk (sector 1), if any.
fn disk_count(disk: &Path) -> Option<u64> {
    let data = std::fs::read(disk).unwrap();
    let s = String::from_utf8_lossy(&data[512..1024]);
    s.trim_end_matches('\0')
        .strip_prefix("COUNT=")?
        .parse()
        .ok()
}

/// The counts of consoles read in order: each exactly one more than the one before.
fn assert_consecutive(consoles: &[String]) {
    // One stream: a line cut by the switch-over ends in the next console.
    let all = counts(&consoles.concat());
    for w in all.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the count jumped from {} to {}: {all:?}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn a_running_guest_moves_to_another_vmm_and_carries_on_counting() {
    if !tessera_tests::kvm_or_skip("a_running_guest_moves_to_another_vmm_and_carries_on_counting") {
        return;
    }
    require("openssl");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let creds = mint(dir, "lab", &["nodea", "nodeb"]);
    let (a, b) = (&creds[0], &creds[1]);
    let foreign = mint(dir, "other", &["nodea"]);
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    let source = Vmm::boot(dir, "source", &disk);
    wait_console(&source.console, "the guest to count to 3", |t| {
        counts(t).last().is_some_and(|n| *n >= 3)
    });
    let target = Vmm::incoming(dir, "target", &disk, b);
    let (addr, token) = target.listening();
    assert_eq!(target.state(), "incoming");
    assert!(
        target.raw(json!({"type": "pause"}))["error"]
            .as_str()
            .unwrap()
            .contains("incoming live migration"),
        "an incoming VM cannot be paused"
    );

    // --- Clients the target must refuse; it keeps listening after each.
    let s_client = |cert: Option<&Creds>| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &addr, "-tls1_3", "-CAfile"])
            .arg(&a.ca)
            .args(["-verify_return_error", "-servername", "nodeb.node.tessera"]);
        if let Some(k) = cert {
            c.arg("-cert").arg(&k.cert).arg("-key").arg(&k.key);
        }
        let o = tessera_tests::run_with_stdin(c, "GET / HTTP/1.1\r\n\r\n");
        format!("{}{}", o.1, o.2)
    };
    let before = target
        .log_text()
        .matches("refused a migration connection")
        .count();
    s_client(None);
    s_client(Some(&foreign[0]));
    // A client of the right CA gets through TLS; what it says is not a migration.
    let ok = s_client(Some(a));
    assert!(ok.contains("Verify return code: 0"), "{ok}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while target
        .log_text()
        .matches("refused a migration connection")
        .count()
        < before + 3
    {
        assert!(Instant::now() < deadline, "{}", target.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = target.log_text();
    assert!(log.contains("not a Tessera migration stream"), "{log}");
    assert_eq!(target.status()["phase"], "listening", "{log}");

    // A wrong token: the source is refused and runs on.
    let r = source.migrate(&addr, "0000", a, json!({}));
    assert!(r.get("error").is_none(), "{r}");
    let s = source.wait_status("the refusal", |s| s["phase"] == "failed");
    assert!(s["error"].as_str().unwrap().contains("wrong token"), "{s}");
    // A source with another CA's certificate: the handshake fails.
    let r = source.migrate(&addr, &token, &foreign[0], json!({}));
    assert!(r.get("error").is_none(), "{r}");
    let s = source.wait_status("the TLS failure", |s| s["phase"] == "failed");
    assert!(s["error"].as_str().unwrap().contains("TLS"), "{s}");
    // A bad downtime request is refused by the API; nothing starts.
    let r = source.raw(
        json!({"type": "migrate", "to": "nowhere", "server_name": "x",
        "token": "t", "tls_ca": a.ca, "tls_cert": a.cert, "tls_key": a.key}),
    );
    assert!(
        r["error"].as_str().unwrap().contains("bad target address"),
        "{r}"
    );
    assert_eq!(source.state(), "running");
    source.counting();
    assert_eq!(target.status()["phase"], "listening");

    // --- The migration.
    let r = source.migrate(&addr, &token, a, json!({"downtime_ms": 50}));
    assert!(r.get("error").is_none(), "{r}");
    let loaded = target.wait_status("the target to load", |s| s["phase"] == "loaded");
    assert!(loaded["bytes"].as_u64().unwrap() > 0, "{loaded}");
    // The source is paused and held: nothing but the migration resumes it.
    assert_eq!(source.state(), "paused");
    let r = source.raw(json!({"type": "resume"}));
    assert!(
        r["error"].as_str().unwrap().contains("migration holds"),
        "{r}"
    );
    let shown_on_source = source.last_count();
    let went = target.call(json!({"type": "migration_go"}));
    assert_eq!(went["phase"], "running", "{went}\n{}", target.log_text());
    let done = source.wait_status("the source to complete", |s| s["phase"] == "completed");
    for k in [
        "bytes",
        "pages",
        "iterations",
        "bandwidth_bytes_per_s",
        "downtime_ms",
        "total_ms",
    ] {
        assert!(done[k].as_u64().is_some(), "{k} missing: {done}");
    }
    eprintln!("migration figures (source): {done}");
    assert!(done["iterations"].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(done["converged"], true, "{done}");
    let mut source = source;
    assert!(source.exited(), "{}", source.log_text());
    assert!(
        source.log_text().contains("reason=Migrated"),
        "{}",
        source.log_text()
    );

    // The guest counts on in the target, from where it was, without booting again.
    let now = target.counting();
    assert!(now > shown_on_source, "{now} <= {shown_on_source}");
    let (src_out, dst_out) = (source.console_text(), target.console_text());
    assert!(
        !dst_out.contains("tessera test guest"),
        "the target booted the guest again: {dst_out}"
    );
    assert_consecutive(&[src_out.clone(), dst_out.clone()]);
    // Its console's scrollback came along: the API shows the whole story.
    let scroll = target.call(json!({"type": "serial_read", "since": 0}));
    assert!(
        scroll["data"]
            .as_str()
            .unwrap()
            .contains("tessera test guest"),
        "{scroll}"
    );
    // The disk is written by the guest in the target.
    wait_console(&target.console, "a count written on the target", |t| {
        counts(t).last().is_some_and(|n| *n >= now + 10)
    });
    let on_disk = disk_count(&disk).unwrap();
    assert!(on_disk > shown_on_source, "{on_disk} <= {shown_on_source}");

    // --- From the target on: a target killed in the middle, and a cancel, leave the
    // guest running where it is.
    let source2 = target;
    let disk2 = dir.join("disk2.raw");
    std::fs::copy(&disk, &disk2).unwrap();
    let mut doomed = Vmm::incoming(dir, "doomed", &disk2, b);
    let (addr2, token2) = doomed.listening();
    let r = source2.migrate(&addr2, &token2, a, json!({"max_bandwidth_kib_s": 16}));
    assert!(r.get("error").is_none(), "{r}");
    source2.wait_status("memory to move", |s| {
        s["phase"] == "precopy" && s["bytes"].as_u64() > Some(0)
    });
    doomed.child.kill().unwrap();
    let _ = doomed.child.wait();
    let s = source2.wait_status("the failure", |s| s["phase"] == "failed");
    assert!(s["error"].as_str().is_some(), "{s}");
    assert_eq!(source2.state(), "running");
    source2.counting();

    let mut cancelled = Vmm::incoming(dir, "cancelled", &disk2, b);
    let (addr3, token3) = cancelled.listening();
    let r = source2.migrate(&addr3, &token3, a, json!({"max_bandwidth_kib_s": 16}));
    assert!(r.get("error").is_none(), "{r}");
    source2.wait_status("memory to move", |s| s["bytes"].as_u64() > Some(0));
    source2.call(json!({"type": "migration_cancel"}));
    let s = source2.wait_status("the cancel", |s| s["phase"] == "cancelled");
    assert_eq!(s["error"], "cancelled", "{s}");
    assert_eq!(source2.state(), "running");
    // The target saw its source go and gave up; it never ran the guest.
    assert!(!cancelled.exited(), "a target whose source left must fail");
    assert!(cancelled.console_text().is_empty());
    let last = source2.counting();
    assert!(last > now);
    assert_consecutive(&[src_out, source2.console_text()]);
}
