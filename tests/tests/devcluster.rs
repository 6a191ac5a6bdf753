//! The README's first command: a local three-node cluster on loopback that forms by
//! itself, prints its API addresses and admin credentials, answers the API, stops cleanly
//! on Ctrl-C and comes back as the same cluster when started again.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::devcluster::DevCluster;
use tessera_tests::{bin, output, require};

/// Runs the `tessera` CLI with its own HOME, `stdin` as input; returns (success, stdout, stderr).
#[path = "devcluster/nbd_tls.rs"]
mod nbd_tls;
use nbd_tls::{check_nbd_tls, check_nbd_tls_refusals};
#[path = "devcluster/volume_cp.rs"]
mod volume_cp;

fn cli(home: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin("tessera"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TESSERA_API")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI against the local cluster: login, forced password change, status, nodes, tokens.
fn check_cli(password: &str, ca: &str) {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let (ok, _, err) = cli(
        h,
        &[
            "--api",
            "https://127.0.0.1:8006",
            "--ca-file",
            ca,
            "cluster",
            "status",
        ],
        "",
    );
    assert!(
        !ok && err.contains("401") && err.contains("tessera login"),
        "{err}"
    );
    let (ok, out, err) = cli(
        h,
        &[
            "--api",
            "https://127.0.0.3:8006",
            "--ca-file",
            ca,
            "login",
            "--user",
            "admin",
        ],
        &format!("{password}\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("must be changed"), "{out}");
    let cred = h.join(".config/tessera/credentials.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cred).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let (ok, _, err) = cli(h, &["cluster", "status"], "");
    assert!(!ok && err.contains("password change required"), "{err}");
    check_password_from_stdin(h, password, ca);
    check_password_on_a_terminal(h);
    let (ok, out, err) = cli(h, &["--output", "json", "cluster", "status"], "");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["voters"].as_array().unwrap().len(), 3);
    check_node_names(h);
    let (ok, out, err) = cli(
        h,
        &[
            "--output",
            "json",
            "token",
            "create",
            "--role",
            "auditor",
            "--expires",
            "1h",
        ],
        "",
    );
    assert!(ok, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, out, _) = cli(h, &["token", "rm", &id], "");
    assert!(ok && out.contains(&id), "{out}");
    let (ok, _, err) = cli(h, &["token", "create", "--expires", "soon"], "");
    assert!(!ok && err.contains("not a duration"), "{err}");
    check_cli_resources(h);
    check_nbd_tls_refusals(h, ca);
}

/// Scripts change a password with two lines on standard input (old, new); one line is
/// refused before anything is sent, and the new password is the one that logs in.
fn check_password_from_stdin(h: &std::path::Path, password: &str, ca: &str) {
    let (ok, _, err) = cli(h, &["password"], &format!("{password}\n"));
    assert!(
        !ok && err.contains("no new password on standard input"),
        "{err}"
    );
    let (ok, out, err) = cli(
        h,
        &["password"],
        &format!("{password}\nthe new admin password\n"),
    );
    assert!(ok && out.contains("password changed"), "{err}");
    let other = tempfile::tempdir().unwrap();
    let login = |pw: &str| {
        cli(
            other.path(),
            &["--api", "https://127.0.0.1:8006", "--ca-file", ca, "login"],
            &format!("{pw}\n"),
        )
    };
    let (ok, _, err) = login(password);
    assert!(
        !ok && err.contains("401"),
        "the old password still works: {err}"
    );
    let (ok, out, err) = login("the new admin password");
    assert!(ok && !out.contains("must be changed"), "{out}{err}");
}

/// Runs `tessera args` on a terminal (a pseudo-terminal from script(1)), typing each
/// answer once its prompt shows; returns (success, everything the terminal showed).
fn on_terminal(home: &std::path::Path, args: &[&str], answers: &[(&str, &str)]) -> (bool, String) {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let quoted: Vec<String> = std::iter::once(bin("tessera").display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| format!("'{a}'"))
        .collect();
    let mut child = Command::new("script")
        .args(["-qefc", &quoted.join(" "), "/dev/null"])
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TESSERA_API")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let shown = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let shown = shown.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    let mut seen = 0;
    for (prompt, answer) in answers {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = shown.lock().unwrap().clone();
            if let Some(at) = text[seen..].find(prompt) {
                seen += at + prompt.len();
                break;
            }
            assert!(Instant::now() < deadline, "no prompt {prompt:?}: {text:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Give the client a moment to turn echo off after printing its prompt.
        std::thread::sleep(Duration::from_millis(200));
        stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
    }
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    let text = shown.lock().unwrap().clone();
    (status.success(), text)
}

/// A person at a terminal is prompted, types nothing that shows, and types the new
/// password twice; two different new passwords change nothing.
fn check_password_on_a_terminal(h: &std::path::Path) {
    require("script");
    let old = "the new admin password";
    let new = "typed at a terminal";
    let (ok, shown) = on_terminal(
        h,
        &["password"],
        &[
            ("old password: ", old),
            ("new password: ", new),
            ("new password again: ", "something else"),
        ],
    );
    assert!(!ok && shown.contains("differ"), "{shown}");
    let (ok, shown) = on_terminal(
        h,
        &["password"],
        &[
            ("old password: ", old),
            ("new password: ", new),
            ("new password again: ", new),
        ],
    );
    assert!(ok && shown.contains("password changed"), "{shown}");
    assert!(
        !shown.contains(old) && !shown.contains(new),
        "a password was echoed: {shown}"
    );
    // Back to the password the rest of the test knows, through standard input.
    let (ok, _, err) = cli(h, &["password"], &format!("{new}\n{old}\n"));
    assert!(ok, "{err}");
}

/// The name node `i` of the local cluster goes by: the `node_name` its seed gives it (the
/// nodes share this machine's host name).
fn node_name(i: u32) -> String {
    format!("node{i}")
}

/// A 32-hex node id anywhere in `text`.
fn has_node_id(text: &str) -> bool {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .any(|w| w.len() == 32)
}

/// People see nodes by name, the leader included; ids only in JSON and the wide view.
fn check_node_names(h: &std::path::Path) {
    let (ok, out, err) = cli(h, &["node", "ls"], "");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" up")).count(),
        3,
        "{out}"
    );
    assert!(out.starts_with("NAME "), "{out}");
    for i in 1..=3 {
        let name = node_name(i);
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing: {out}"
        );
    }
    assert!(!has_node_id(&out), "ids in the table: {out}");
    let (ok, json, _) = cli(h, &["--output", "json", "node", "ls"], "");
    assert!(ok);
    let ids: Vec<String> = json_of(&json)
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let (ok, wide, _) = cli(h, &["--output", "wide", "node", "ls"], "");
    assert!(
        ok && ids.iter().all(|id| wide.contains(id.as_str())),
        "{wide}"
    );

    let (ok, out, err) = cli(h, &["cluster", "status"], "");
    assert!(ok, "{err}");
    let leader = out
        .lines()
        .find_map(|l| l.strip_prefix("leader:"))
        .unwrap_or_else(|| panic!("no leader line: {out}"))
        .trim()
        .to_string();
    assert!(
        (1..=3).any(|i| leader == node_name(i)),
        "the leader is not named as a node: {out}"
    );
    assert!(
        ids.iter().all(|id| !out.contains(id.as_str())),
        "node ids in the status: {out}"
    );
}

fn json_of(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Volumes, VMs and tasks through the CLI, against the stores of the local cluster
/// (logged in on node 3, so volumes land on node 3's store by default).
fn check_cli_resources(h: &std::path::Path) {
    let ok = |args: &[&str]| {
        let (ok, out, err) = cli(h, args, "");
        assert!(ok, "tessera {args:?}: {err}");
        out
    };
    let out = ok(&[
        "volume",
        "create",
        "vol1",
        "--size",
        "64M",
        "--replicas",
        "1",
    ]);
    assert!(out.contains("succeeded"), "{out}");
    ok(&["volume", "snapshot", "vol1", "s1"]);
    ok(&["volume", "clone", "vol1", "s1", "vol2"]);
    let vols = json_of(&ok(&["--output", "json", "volume", "ls"]));
    let vol2 = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol2")
        .cloned()
        .unwrap();
    assert_eq!(vol2["origin"], "vol1@s1");
    assert_eq!(vol2["nbd"], "nbds://127.0.0.3:10809/vol2");
    check_nbd_tls(h);
    volume_cp::check_volume_cp(h);
    let shown = ok(&["volume", "show", "vol1"]);
    assert!(shown.contains("snapshot     s1 (ready)"), "{shown}");
    assert!(shown.contains("64.0 MiB"), "{shown}");
    // Tables: human sizes and the node's name; JSON keeps bytes.
    let listed = ok(&["volume", "ls"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with("vol1 "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        line.contains(" 64.0 MiB ") && line.contains(&node_name(3)),
        "{listed}"
    );
    assert!(!has_node_id(&listed), "{listed}");
    let vol1 = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vol1")
        .unwrap();
    assert_eq!(vol1["size_bytes"], 64 << 20);

    let (fail, _, err) = cli(h, &["volume", "create", "odd", "--size", "1000"], "");
    assert!(
        !fail && err.contains("400") && err.contains("size_bytes"),
        "{err}"
    );
    let (fail, _, err) = cli(h, &["volume", "create", "odd", "--size", "lots"], "");
    assert!(!fail && err.contains("not a size"), "{err}");

    ok(&[
        "network", "create", "lan", "--bridge", "br-lan", "--vlan", "7", "--uplink", "eth0",
    ]);
    assert!(ok(&["network", "ls"])
        .lines()
        .any(|l| l.starts_with("lan ") && l.contains(" 7 ")));
    ok(&[
        "vm",
        "create",
        "web",
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--disk",
        "vol2",
        "--network",
        "lan",
    ]);
    let vm = json_of(&ok(&[
        "--output", "json", "vm", "set", "web", "--vcpus", "3",
    ]));
    assert_eq!(
        (vm["vcpus"].as_u64(), vm["generation"].as_u64()),
        (Some(3), Some(2))
    );
    let vm = json_of(&ok(&["--output", "json", "vm", "show", "web"]));
    assert_eq!(vm["memory_mib"], 256);
    assert_eq!(vm["disks"], serde_json::json!(["vol2"]));
    assert_eq!(vm["networks"], serde_json::json!(["lan"]));
    let vms = ok(&["vm", "ls"]);
    assert!(
        vms.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 256.0 MiB ")),
        "{vms}"
    );
    let (fail, _, err) = cli(h, &["volume", "rm", "vol2"], "");
    assert!(
        !fail && err.contains("409") && err.contains("attached"),
        "{err}"
    );
    let (fail, _, err) = cli(h, &["network", "rm", "lan"], "");
    assert!(!fail && err.contains("used by VMs web"), "{err}");
    ok(&["vm", "rm", "web"]);
    ok(&["network", "rm", "lan"]);
    ok(&["volume", "rm", "vol2"]);

    // A task followed separately; the task list has them all.
    let t = json_of(&ok(&[
        "--output",
        "json",
        "volume",
        "create",
        "vol3",
        "--size",
        "1M",
        "--no-wait",
    ]));
    let id = t["id"].as_str().unwrap().to_string();
    let watched = json_of(&ok(&["--output", "json", "task", "watch", &id]));
    assert_eq!(watched["state"], "succeeded");
    assert_eq!(watched["progress"], 100);
    let tasks = json_of(&ok(&["--output", "json", "task", "ls"]));
    assert!(tasks.as_array().unwrap().len() >= 5, "{tasks}");
    let events = ok(&["event", "ls", "--limit", "200"]);
    assert!(
        events.contains("vm.delete") && events.contains("volume.clone"),
        "{events}"
    );
}

#[test]
fn the_local_cluster_forms_answers_stops_and_comes_back() {
    require("curl");
    require("nbdinfo");
    let d = tempfile::tempdir().unwrap();
    let cluster = DevCluster::start(d.path());
    let lines = &cluster.lines;
    for i in 1..=3 {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("https://127.0.0.{i}:8006/api/v1"))),
            "{lines:?}"
        );
    }
    let password = cluster.admin_password();
    // The CA file is printed; curl checks the API's certificate with it.
    let ca = cluster.ca_file();
    let body = format!("{{\"username\":\"admin\",\"password\":\"{password}\"}}");
    let out = output(Command::new("curl").args([
        "-s",
        "-m",
        "20",
        "-X",
        "POST",
        "--cacert",
        &ca,
        "https://127.0.0.2:8006/api/v1/login",
        "-H",
        "content-type: application/json",
        "--data",
        &body,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        v["token"].as_str().is_some(),
        "login with the printed password failed: {v}"
    );
    check_cli(&password, &ca);
    cluster.stop();
    // No node process is left behind.
    let left = output(Command::new("pgrep").args(["-f", &d.path().display().to_string()]));
    assert!(
        left.stdout.is_empty(),
        "processes left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    // Again: the same cluster comes back, nobody bootstraps a new one.
    DevCluster::start(d.path()).stop();
    for i in 1..=3 {
        let log = std::fs::read_to_string(d.path().join(format!("node{i}/tesserad.log"))).unwrap();
        assert_eq!(
            log.matches("this node bootstraps it").count(),
            if log.contains("bootstraps it") { 1 } else { 0 }
        );
        assert!(
            log.contains("already a member of a formed cluster"),
            "node {i} did not come back as a member"
        );
    }
}

#[test]
fn a_local_cluster_from_before_tls_is_refused_with_a_clear_message() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("node1/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("formed.json"), "{}").unwrap();
    let out = output(
        Command::new(bin("tessera-devcluster"))
            .arg("--dir")
            .arg(d.path()),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("older Tessera") && err.contains("remove that directory"),
        "{err}"
    );
}

/// A second local cluster would collide with the first on its fixed addresses: the
/// launcher refuses before starting anything, naming the address and who holds it.
/// (Node 4's REST API address: the cluster the other test of this file starts has three.)
#[test]
fn a_local_cluster_whose_addresses_are_taken_is_refused_naming_the_holder() {
    let held = std::net::TcpListener::bind("127.0.0.4:8006").unwrap();
    let d = tempfile::tempdir().unwrap();
    let began = Instant::now();
    let out = output(
        Command::new(bin("tessera-devcluster"))
            .arg("--dir")
            .arg(d.path())
            .args(["--nodes", "4"]),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("127.0.0.4:8006 (TCP, node 4's REST API)")
            && err.contains(&format!("by pid {}", std::process::id()))
            && err.contains("nothing was started"),
        "{err}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    assert!(
        !d.path().join("node1/store.log").exists(),
        "a node was started"
    );
    drop(held);
}
