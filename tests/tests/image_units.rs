//! The node image's pieces that can be checked without booting it (the boot itself is
//! `tests/image/boot-three`, docs/image.md): the units in `systemd/` pass
//! `systemd-analyze verify` and keep their hardening score, a seed becomes the node's
//! configuration through `tessera-firstboot` (a bad one is refused, naming the field, and
//! the console says so), the data partition's format record is kept and a newer one
//! refused, and both daemons speak the sd_notify protocol to a service manager: READY=1,
//! WATCHDOG=1 and STATUS= on the socket systemd would give them.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{bin, output, require, run};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The units as shipped, with `/usr/bin/` pointing at the binaries this build made (the
/// verifier checks that each command exists).
fn units_here(dir: &Path) -> Vec<PathBuf> {
    let built = bin("tesserad").parent().unwrap().to_path_buf();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".timer") || name.ends_with(".path") {
            let text = std::fs::read_to_string(&p).unwrap();
            let text = text.replace("/usr/bin/", &format!("{}/", built.display()));
            let dest = dir.join(&name);
            std::fs::write(&dest, text).unwrap();
            out.push(dest);
        }
    }
    out.sort();
    out
}

#[test]
fn the_units_verify_and_keep_their_hardening() {
    require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let units = units_here(dir.path());
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "tesserad.service",
        "tessera-store.service",
        "tessera-firstboot.service",
        "tessera-network.service",
        "tessera-status.service",
        "tessera-status.timer",
        "tessera-upgrade.path",
        "tessera-upgrade.service",
        "tessera-boot-check.service",
        "tessera-data-format.service",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing in systemd/"
        );
    }
    let out = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units)
            .current_dir(dir.path()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about our units only: the host's own units are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The exposure scores (0 best, 10 worst) the hardening reached, kept from sliding
    // back: docs/image.md lists them.
    for (unit, most) in [("tessera-store.service", 2.0), ("tesserad.service", 5.0)] {
        let report = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(dir.path().join(unit)));
        let score: f64 = report
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
        assert!(score <= most, "{unit}: exposure {score} > {most}\n{report}");
        let text = std::fs::read_to_string(dir.path().join(unit)).unwrap();
        for line in [
            "Type=notify",
            "WatchdogSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
        ] {
            assert!(text.contains(line), "{unit} lacks {line}");
        }
    }
}

const SEED: &str = r#"
cluster_name = "lab"
join_secret = "img-test-secret-0123456789"
expected_nodes = 1
hostname = "node-a"
[network]
mode = "static"
interface = "lo"
address = "127.77.14.1/8"
"#;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_seed_becomes_the_node_configuration_with_private_modes() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, SEED).unwrap();
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fb = bin("tessera-firstboot");

    let shown = run(Command::new(&fb).arg("check").arg(&seed));
    for line in [
        "node-a",
        "Name=lo\n",
        "KeepConfiguration=static\n",
        "address 127.77.14.1/8 on lo\n",
        "address = \"127.77.14.1:7946\"",
        "api = \"127.77.14.1:8006\"",
        "nbd = \"127.77.14.1:10809\"",
        "data_dir = \"/var/lib/tessera\"",
    ] {
        assert!(shown.contains(line), "{line:?} missing in:\n{shown}");
    }

    run(&mut firstboot(&etc, "apply", "--from", &seed));
    assert_eq!(
        std::fs::read_to_string(etc.join("hostname")).unwrap(),
        "node-a\n"
    );
    let net =
        std::fs::read_to_string(etc.join("systemd/network/10-tessera-management.network")).unwrap();
    // The static address is tessera-network.service's (below), not networkd's, which
    // keeps it and the routes it did not make.
    assert!(!net.contains("Address="), "{net}");
    assert!(net.contains("KeepConfiguration=static"), "{net}");
    let conf =
        std::fs::read_to_string(etc.join("systemd/networkd.conf.d/10-tessera.conf")).unwrap();
    assert!(conf.contains("ManageForeignRoutes=no"), "{conf}");
    // docs/security.md: the join secret is root's only, whatever the FAT partition said.
    assert_eq!(mode(&etc.join("tessera")), 0o700);
    assert_eq!(mode(&etc.join("tessera/node-seed.toml")), 0o600);
    assert_eq!(
        std::fs::read_to_string(etc.join("tessera/node-seed.toml")).unwrap(),
        SEED
    );
    // Applied once: a later boot leaves the node as it is.
    std::fs::write(&seed, SEED.replace("node-a", "node-b")).unwrap();
    let again = run(&mut firstboot(&etc, "apply", "--from", &seed));
    assert!(again.contains("already applied"), "{again}");
    assert_eq!(
        std::fs::read_to_string(etc.join("hostname")).unwrap(),
        "node-a\n"
    );

    let data = dir.path().join("data");
    run(&mut firstboot(&etc, "tesserad-seed", "--data-dir", &data));
    let written = etc.join("tessera/seed.toml");
    assert_eq!(mode(&written), 0o600);
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(
        text.contains("join_secret = \"img-test-secret-0123456789\""),
        "{text}"
    );
    assert!(text.contains("node_name = \"node-a\""), "{text}");

    // Every boot, tessera-network.service sets the static address through netlink: here
    // in a network namespace of its own (the seed's interface is its loopback), twice,
    // the second run changing nothing; `ip -j addr` (iproute2's, not ours) shows it.
    if !nix::unistd::geteuid().is_root() {
        tessera_tests::skip(
            "a_seed_becomes_the_node_configuration_with_private_modes",
            "needs root for a network namespace: the netlink part did not run",
        );
        return;
    }
    let net = format!("{} --etc {} network", fb.display(), etc.display());
    let out = run(Command::new("unshare").args([
        "--net",
        "sh",
        "-ec",
        &format!("{net}; echo ---; {net}; echo ---; ip -j addr show dev lo"),
    ]));
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert!(parts[0].contains("lo: add address 127.77.14.1/8"), "{out}");
    assert!(parts[0].contains("up"), "lo was down: {out}");
    assert_eq!(parts[1].trim(), "lo: already as the seed says", "{out}");
    let addrs: serde_json::Value = serde_json::from_str(parts[2]).unwrap();
    let set: Vec<(String, u64)> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(set.contains(&("127.77.14.1".to_string(), 8)), "{set:?}");
}

#[test]
fn a_bad_seed_is_refused_naming_the_field_and_the_console_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let fb = bin("tessera-firstboot");
    let cases = [
        (
            SEED.replace("img-test-secret-0123456789", "short"),
            "join_secret",
        ),
        (
            SEED.replace("127.77.14.1/8", "127.77.14.1"),
            "network.address",
        ),
        (
            SEED.replace("expected_nodes = 1", "expected_nodes = \"one\""),
            "expected_nodes",
        ),
        (
            SEED.replace("mode = \"static\"", "mode = \"dhcp\""),
            "network.address",
        ),
        (SEED.replace("\"lab\"", "\"my lab\""), "cluster_name"),
        (format!("example = true\n{SEED}"), "example seed"),
        (SEED.replace("[network]", "[netwrok]"), "netwrok"),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let seed = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&seed, text).unwrap();
        let out = output(Command::new(&fb).arg("check").arg(&seed));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(
            err.contains(field),
            "{field} not named in {err:?} for\n{text}"
        );
        assert!(
            err.contains(&seed.display().to_string()),
            "the file is not named: {err}"
        );
    }
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let bad = dir.path().join("bad0.toml");
    let out = output(&mut firstboot(&etc, "apply", "--from", &bad));
    assert!(!out.status.success());
    assert!(
        !etc.join("tessera/node-seed.toml").exists(),
        "a bad seed was kept"
    );
    let issue = std::fs::read_to_string(etc.join("issue")).unwrap();
    assert!(
        issue.contains("the seed cannot be used") && issue.contains("join_secret"),
        "{issue}"
    );
}

/// `tessera-firstboot --etc ETC CMD FLAG PATH`: `etc` is the system's `/etc`.
fn firstboot(etc: &Path, cmd: &str, flag: &str, path: &Path) -> Command {
    let mut c = Command::new(bin("tessera-firstboot"));
    c.arg("--etc").arg(etc).args([cmd, flag]).arg(path);
    c
}

/// Runs `tessera-firstboot data-format` on `data` with `etc` as the system's `/etc`.
fn data_format(etc: &Path, data: &Path) -> std::process::Output {
    output(&mut firstboot(etc, "data-format", "--data-dir", data))
}

#[test]
fn the_data_partition_keeps_its_format_and_a_release_refuses_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let (etc, data) = (dir.path().join("etc"), dir.path().join("data"));
    std::fs::create_dir_all(data.join("lost+found")).unwrap();
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("tessera-release"), "2026.12.03-old\n").unwrap();
    let record = data.join("data-format.json");

    // A new partition (mkfs's lost+found only) gets this release's format, root's only.
    let out = data_format(&etc, &data);
    assert!(out.status.success(), "{out:?}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(written["format"], 1, "{written}");
    assert_eq!(written["release"], "2026.12.03-old", "{written}");
    assert_eq!(mode(&record), 0o600);
    // Every later boot reads it and changes nothing.
    let before = std::fs::read(&record).unwrap();
    assert!(data_format(&etc, &data).status.success());
    assert_eq!(std::fs::read(&record).unwrap(), before);

    // A newer release wrote format 2 before the node fell back: this release refuses,
    // naming both, leaves the record alone and says so on the console.
    let newer = "{\"format\":2,\"release\":\"2027.01.10-new\"}\n";
    std::fs::write(&record, newer).unwrap();
    let out = data_format(&etc, &data);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a newer format was taken: {err}");
    for part in [
        "format 2",
        "2027.01.10-new",
        "2026.12.03-old",
        "do not start",
    ] {
        assert!(err.contains(part), "{part:?} not in {err}");
    }
    assert_eq!(std::fs::read_to_string(&record).unwrap(), newer);
    let issue = std::fs::read_to_string(etc.join("issue")).unwrap();
    assert!(
        issue.contains("not starting") && issue.contains("format 2"),
        "{issue}"
    );
    // The status timer's screen keeps saying it (it would say "not answering" otherwise).
    let seed = dir.path().join("seed.toml");
    std::fs::write(&seed, SEED).unwrap();
    run(&mut firstboot(&etc, "apply", "--from", &seed));
    let screen = dir.path().join("screen");
    run(firstboot(&etc, "issue", "--data-dir", &data)
        .arg("--out")
        .arg(&screen));
    let text = std::fs::read_to_string(&screen).unwrap();
    assert!(
        text.contains("not starting") && text.contains("2027.01.10-new"),
        "{text}"
    );

    // A damaged record is refused and kept as it is, not overwritten.
    for bad in [
        "",
        "{\"format\":\"one\"}",
        "{\"format\":0,\"release\":\"r\"}",
    ] {
        std::fs::write(&record, bad).unwrap();
        let out = data_format(&etc, &data);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} taken");
        assert!(err.contains("data-format.json"), "{err}");
        assert_eq!(std::fs::read_to_string(&record).unwrap(), bad);
    }

    // Data from a release before format records (a store, no record): format 1, recorded.
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir_all(data.join("store")).unwrap();
    assert!(data_format(&etc, &data).status.success());
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(written["format"], 1, "{written}");
}

/// What a service manager hears on its notification socket.
struct Manager {
    sock: UnixDatagram,
    path: PathBuf,
    heard: String,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager {
            sock,
            path,
            heard: String::new(),
        }
    }

    /// Waits until every line of `want` has been heard.
    fn wait_for(&mut self, child: &mut Child, want: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while !want
            .iter()
            .all(|w| self.heard.lines().any(|l| l.starts_with(w)))
        {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the daemon exited; heard so far:\n{}",
                self.heard
            );
            assert!(
                Instant::now() < deadline,
                "not heard {want:?}; heard:\n{}",
                self.heard
            );
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.heard.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn both_daemons_tell_the_service_manager_they_serve_and_the_console_shows_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut manager = Manager::new(dir.path());
    let store_dir = dir.path().join("store");
    let mut store = Killed(
        Command::new(bin("tessera-store"))
            .args(["serve", "--data-dir"])
            .arg(&store_dir)
            .env("NOTIFY_SOCKET", &manager.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    manager.wait_for(
        &mut store.0,
        &["READY=1", "WATCHDOG=1", "STATUS=serving 0 volumes"],
        Duration::from_secs(15),
    );

    // tesserad on the seed tessera-firstboot makes, alone (expected_nodes = 1) on a
    // loopback address: READY=1 once its status socket answers, STATUS= its view.
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let seed = dir.path().join("seed.toml");
    let port_free = std::net::UdpSocket::bind("127.77.14.1:7946").is_ok()
        && std::net::TcpListener::bind("127.77.14.1:7947").is_ok();
    assert!(
        port_free,
        "127.77.14.1:7946/7947 are taken: another run of this test?"
    );
    std::fs::write(&seed, SEED).unwrap();
    run(&mut firstboot(&etc, "apply", "--from", &seed));
    let data = dir.path().join("data");
    let mut seed_text = {
        run(&mut firstboot(&etc, "tesserad-seed", "--data-dir", &data));
        std::fs::read_to_string(etc.join("tessera/seed.toml")).unwrap()
    };
    // On loopback there is no multicast: the node announces to nobody and forms alone.
    seed_text = seed_text.replace("[management]", "[management]\nuse_multicast = false");
    seed_text = seed_text.replace(
        "[storage]",
        &format!(
            "[storage]\nadmin_socket = \"{}\"",
            store_dir.join("admin.sock").display()
        ),
    );
    std::fs::write(etc.join("tessera/seed.toml"), &seed_text).unwrap();
    let mut manager = Manager::new(&dir.path().join("etc"));
    let log = std::fs::File::create(dir.path().join("tesserad.log")).unwrap();
    let mut daemon = Killed(
        Command::new(bin("tesserad"))
            .arg("--seed")
            .arg(etc.join("tessera/seed.toml"))
            .env("NOTIFY_SOCKET", &manager.path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    manager.wait_for(
        &mut daemon.0,
        &["READY=1", "WATCHDOG=1", "STATUS="],
        Duration::from_secs(20),
    );

    // The console's status screen, from the status socket, until the node has formed.
    let issue = dir.path().join("issue");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        run(firstboot(&etc, "issue", "--data-dir", &data)
            .arg("--out")
            .arg(&issue));
        let text = std::fs::read_to_string(&issue).unwrap();
        assert!(text.contains("Tessera node node-a"), "{text}");
        assert!(text.contains("Address:  127.77.14.1 (lo)"), "{text}");
        assert!(
            text.contains("Open:     https://127.77.14.1:8006/"),
            "{text}"
        );
        if text.contains("1 of 1 nodes up, leader node-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not formed in time; screen:\n{text}\nlog:\n{}",
            std::fs::read_to_string(dir.path().join("tesserad.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
