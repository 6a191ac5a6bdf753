//! A disk that fails under the store: the first failed sync leaves it degraded until a
//! restart. `tessera-store status` says so and why, every later flush fails with EIO,
//! and after a restart on the repaired filesystem it is healthy again. Its node says so
//! too: `GET /nodes` gives the node's storage as degraded with the reason, an event
//! records it once, and `tessera node ls` shows it.
//!
//! The fault is real: the data directory is on a small ext4 filesystem in a loop file,
//! shut down (`xfs_io -x -c shutdown`, FS_IOC_SHUTDOWN) so that the next fsync fails
//! with EIO. The sockets live outside it, so the store stays reachable.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_nbd::{Client, ClientError};
use tessera_tests::cluster::{admin_session, api, wait_for, ClusterNode};
use tessera_tests::{bin, output, require, run, Lan};

const EIO: u32 = 5;

/// An ext4 filesystem in a loop file, mounted at `mnt`; unmounted on drop.
struct LoopFs {
    image: PathBuf,
    mnt: PathBuf,
}

impl LoopFs {
    fn create(dir: &Path) -> LoopFs {
        let image = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let fs = LoopFs { image, mnt };
        fs.mount();
        fs
    }

    fn mount(&self) {
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.image)
            .arg(&self.mnt));
    }

    fn umount(&self) {
        run(Command::new("umount").arg(&self.mnt));
    }

    /// The filesystem as its disk holds it now, copied to a new image and mounted at
    /// `<dir>/<name>`. Mounting the old image again could find its shut-down superblock
    /// still alive: the mount namespace of any process started meanwhile with
    /// `ip netns exec` (the cluster tests) holds a copy of this mount.
    fn copy(&self, dir: &Path, name: &str) -> LoopFs {
        let image = dir.join(format!("{name}.img"));
        let mnt = dir.join(name);
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.image)
            .arg(&image));
        let fs = LoopFs { image, mnt };
        fs.mount();
        fs
    }

    /// Shuts the filesystem down without flushing its log: from now on every write and
    /// sync of a file on it fails with EIO, as on a failed disk.
    fn shut_down(&self) {
        run(Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&self.mnt));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Already unmounted when the test went through: nothing to say then.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// `tessera-store serve` with its data on `data` and its sockets and log in `sockets`.
struct Store {
    child: Child,
    admin: PathBuf,
    nbd: PathBuf,
    log: PathBuf,
}

impl Store {
    fn start(data: &Path, sockets: &Path) -> Store {
        let (admin, nbd, log) = (
            sockets.join("admin.sock"),
            sockets.join("nbd.sock"),
            sockets.join("store.log"),
        );
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin("tessera-store"))
            .arg("--admin-socket")
            .arg(&admin)
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--no-tcp")
            .arg("--nbd-unix")
            .arg(&nbd)
            // No background checkpoint: the flush under test is what syncs the writes.
            .args(["--checkpoint-interval-ms", "3600000"])
            .env("TESSERA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let mut s = Store {
            child,
            admin,
            nbd,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&s.admin).is_err() || UnixStream::connect(&s.nbd).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("tessera-store exited with {status}:\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "store not ready:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn cli(&self, args: &[&str]) -> Output {
        output(
            Command::new(bin("tessera-store"))
                .arg("--admin-socket")
                .arg(&self.admin)
                .args(args),
        )
    }

    /// `tessera-store --output json status`: (exit success, the reply, stderr).
    fn status(&self) -> (bool, serde_json::Value, String) {
        let out = self.cli(&["--output", "json", "status"]);
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status printed no JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tessera-store did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An interactive `qemu-io` on an export, writeback cache (a write is not flushed until
/// asked), driven one command at a time.
struct QemuIo {
    child: Child,
    out: String,
}

impl QemuIo {
    fn open(uri: &str) -> QemuIo {
        let child = Command::new("qemu-io")
            .args(["-f", "raw", "-t", "writeback", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        QemuIo {
            child,
            out: String::new(),
        }
    }

    /// Sends `command` and reads until its output contains `expect`.
    fn expect(&mut self, command: &str, expect: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut buf = [0u8; 4096];
        while !self.out.contains(expect) {
            let n = stdout.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io ended before {expect:?}:\n{}", self.out);
            self.out.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        self.out.clear();
    }

    /// Sends the last commands, closes its input and returns whether it exited with
    /// success (qemu-io fails when any command failed).
    fn finish(mut self, commands: &[&str]) -> bool {
        let mut stdin = self.child.stdin.take().unwrap();
        for c in commands {
            writeln!(stdin, "{c}").unwrap();
        }
        drop(stdin);
        self.child.wait().unwrap().success()
    }
}

/// Writes through qemu-io without flushing, fails the filesystem, then flushes: the
/// flush fails and the store is degraded from then on.
fn fail_a_flush(fs: &LoopFs, store: &Store) {
    let mut q = QemuIo::open(&store.uri("vol"));
    q.expect("write -P 0xab 64k 4k", "wrote 4096/4096");
    q.expect("write -P 0xcd 1M 1M", "wrote 1048576/1048576");
    fs.shut_down();
    // The flush is the first sync since the failure: it fails, and qemu-io with it.
    assert!(
        !q.finish(&["flush"]),
        "a flush on a shut-down filesystem succeeded:\n{}",
        store.log_text()
    );
}

#[test]
fn a_failed_sync_leaves_the_store_degraded_and_every_flush_failing_until_restart() {
    let test = "a_failed_sync_leaves_the_store_degraded_and_every_flush_failing_until_restart";
    if !nix::unistd::Uid::effective().is_root() {
        tessera_tests::skip(test, "needs root to mount a loop filesystem");
        return;
    }
    for tool in ["qemu-io", "xfs_io", "mkfs.ext4"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::create(dir.path());
    let data = fs.mnt.join("store");
    let mut store = Store::start(&data, dir.path());
    let out = store.cli(&["volume", "create", "vol", "--size", "16M"]);
    assert!(out.status.success(), "{out:?}");

    // Healthy: status says so, and a write flushed now survives everything below.
    let (ok, st, _) = store.status();
    assert!(ok, "{st}");
    assert_eq!(st["degraded"], serde_json::Value::Null, "{st}");
    assert_eq!(
        (st["volumes"].as_u64(), st["snapshots"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(st["data_dir"], data.display().to_string());
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "flush"])
        .arg(store.uri("vol")));

    // Writes acknowledged but not flushed (a small one, logged; a large one, placed),
    // then the disk fails under the flush.
    fail_a_flush(&fs, &store);

    let (ok, st, err) = store.status();
    assert!(!ok, "status must fail when degraded: {st}");
    let why = st["degraded"]
        .as_str()
        .unwrap_or_else(|| panic!("not degraded: {st}"));
    assert!(why.contains("Input/output error"), "{why}");
    assert!(err.contains("degraded") && err.contains(why), "{err}");
    let human = store.cli(&["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.starts_with("state:      DEGRADED: "), "{text}");

    // Sticky: a new connection's flush fails too, though it has nothing of its own to
    // sync, and so does a FUA write.
    let mut c = Client::connect_unix(&store.nbd, "vol").unwrap();
    for attempt in 0..2 {
        match c.flush() {
            Err(ClientError::Errno(EIO)) => {}
            other => panic!("flush {attempt} after the failure: {other:?}"),
        }
    }
    assert!(matches!(
        c.write(0, &[0x22; 4096], true),
        Err(ClientError::Errno(EIO))
    ));
    drop(c);
    // The store itself is still up and answering.
    assert!(store.child.try_wait().unwrap().is_none());
    assert_eq!(store.status().1["degraded"].as_str(), Some(why));
    assert!(
        store.log_text().contains("a sync failed"),
        "{}",
        store.log_text()
    );

    // Only a restart clears it: on the filesystem as the failed disk holds it (its
    // journal replayed), the store is healthy, what was flushed before the failure is
    // there, and flushes work.
    store.stop();
    fs.umount();
    let repaired = fs.copy(dir.path(), "repaired");
    let store = Store::start(&repaired.mnt.join("store"), dir.path());
    let (ok, st, _) = store.status();
    assert!(ok && st["degraded"].is_null(), "{st}");
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x11 0 64k"])
        .args(["-c", "write -P 0x33 64k 4k", "-c", "flush"])
        .arg(store.uri("vol")));
}

#[test]
fn a_degraded_store_shows_on_its_node_in_the_api_the_events_and_the_cli() {
    let test = "a_degraded_store_shows_on_its_node_in_the_api_the_events_and_the_cli";
    let Some(lan) = Lan::new(test, 1) else {
        return;
    };
    for tool in ["qemu-io", "xfs_io", "mkfs.ext4", "curl"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::create(dir.path());
    // The node's seed names `<node dir>/store/admin.sock` as its store's admin socket:
    // the store's sockets go there, its data on the loop filesystem.
    let sockets = dir.path().join("node0/store");
    std::fs::create_dir_all(&sockets).unwrap();
    let store = Store::start(&fs.mnt.join("store"), &sockets);
    let out = store.cli(&["volume", "create", "vol", "--size", "16M"]);
    assert!(out.status.success(), "{out:?}");
    let node = ClusterNode::start(&lan, 0, dir.path(), 1, false);
    let token = admin_session(&lan, std::slice::from_ref(&node), 0, "a-longer-password-1");
    let nodes = || {
        let (code, v) = api(&lan, 0, "GET", "nodes", Some(&token), None);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
        v[0].clone()
    };
    let storage_events = || {
        let (code, v) = api(&lan, 0, "GET", "events?limit=1000", Some(&token), None);
        assert_eq!(code, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"].as_str().unwrap().starts_with("storage."))
            .cloned()
            .collect::<Vec<_>>()
    };

    let healthy = wait_for("the node to report its storage ok", 40, || {
        let n = nodes();
        (n["storage"]["state"] == "ok").then_some(n)
    });
    assert!(healthy["storage"]["reason"].is_null(), "{healthy}");
    let id = healthy["id"].as_str().unwrap().to_string();
    // A healthy store at start is not news.
    assert_eq!(storage_events(), Vec::<serde_json::Value>::new());

    fail_a_flush(&fs, &store);
    let why = store.status().1["degraded"].as_str().unwrap().to_string();
    let degraded = wait_for("the node to report its storage degraded", 30, || {
        let n = nodes();
        (n["storage"]["state"] == "degraded").then_some(n)
    });
    assert_eq!(degraded["storage"]["reason"], why.as_str(), "{degraded}");
    assert_eq!(
        degraded["state"], "up",
        "the node itself is fine: {degraded}"
    );
    // Polled again, still degraded: one event for the change, not one per poll.
    let checked = degraded["storage"]["checked_ms"].as_u64().unwrap();
    wait_for("another poll of the store", 30, || {
        let n = nodes();
        (n["storage"]["checked_ms"].as_u64().unwrap() > checked).then_some(())
    });
    let events = wait_for("the storage.degraded event", 30, || {
        let e = storage_events();
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["kind"], "storage.degraded");
    assert_eq!(events[0]["target"], id.as_str());
    assert_eq!(events[0]["user"], "tesserad");
    assert!(
        events[0]["message"].as_str().unwrap().contains(&why),
        "{events:?}"
    );

    // The CLI, as an administrator sees it: the node's STORAGE column and why.
    let config = dir.path().join("config");
    std::fs::create_dir_all(config.join("tessera")).unwrap();
    let ca = std::fs::read_to_string(lan.ca_file().unwrap()).unwrap();
    std::fs::write(
        config.join("tessera/credentials.json"),
        serde_json::json!({
            "api": format!("https://{}:8006", Lan::addr(0)),
            "token": token,
            "ca_pem": ca,
        })
        .to_string(),
    )
    .unwrap();
    let out = output(
        lan.command(0, &bin("tessera"))
            .args(["node", "ls"])
            .env("XDG_CONFIG_HOME", &config),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let head = lines.next().unwrap();
    assert!(head.contains("STORAGE"), "{text}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("node0 ") && row.contains(" DEGRADED ") && row.ends_with(" up"),
        "{text}"
    );
    assert!(
        text.contains(&format!("node0: storage DEGRADED: {why}")),
        "{text}"
    );
}
