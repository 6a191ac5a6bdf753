//! A dev cluster's replicated volumes seen from outside: each node's store read and
//! written over its local NBD socket with nbdcopy, a node's processes killed and started
//! again, and the API waited on for a volume or a task (used by `volume_rebuild`; the
//! replication story's own copies in `volume_replication/helpers.rs` can move here).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::devcluster::api;
use crate::{file_hash, output};

/// Node `i`'s store's local NBD socket URI for `export`.
pub fn unix_uri(dir: &Path, i: u8, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join(format!("node{i}/store/nbd.sock")).display()
    )
}

/// Node `i`'s store's admin socket.
pub fn admin_socket(dir: &Path, i: u8) -> PathBuf {
    dir.join(format!("node{i}/store/admin.sock"))
}

/// Writes `src` at the start of `export` through node `i`'s store (nbdcopy flushes at
/// the end, within 60 s); true if nbdcopy succeeded (its errors are printed).
pub fn write(dir: &Path, i: u8, export: &str, src: &Path) -> bool {
    let out = output(
        Command::new("timeout")
            .arg("60")
            .arg("nbdcopy")
            .arg("--flush")
            .arg(src)
            .arg(unix_uri(dir, i, export)),
    );
    if !out.status.success() {
        eprintln!(
            "nbdcopy to node{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// The blake3 of the whole of `export` as node `i`'s store has it.
pub fn read_hash(dir: &Path, i: u8, export: &str, tmp: &Path) -> blake3::Hash {
    let f = tmp.join(format!("read-{export}-{i}"));
    let out = output(
        Command::new("nbdcopy")
            .arg(unix_uri(dir, i, export))
            .arg(&f),
    );
    assert!(
        out.status.success(),
        "reading {export} from node{i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file_hash(&f)
}

/// Whether node `i`'s store serves `export` (nbdinfo gets its size).
pub fn serves(dir: &Path, i: u8, export: &str) -> bool {
    output(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(unix_uri(dir, i, export)),
    )
    .status
    .success()
}

/// A file of `len` random bytes, and the blake3 of a volume of `size` bytes holding it
/// at its start and zeros after.
pub fn payload(tmp: &Path, name: &str, len: u64, size: u64) -> (PathBuf, blake3::Hash) {
    let mut data = vec![0u8; len as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let p = tmp.join(name);
    std::fs::write(&p, &data).unwrap();
    data.resize(size as usize, 0);
    (p, blake3::hash(&data))
}

/// Node `i`'s processes whose program is one of `programs`: (pid, argv).
pub fn node_procs(dir: &Path, i: u8, programs: &[&str]) -> Vec<(i32, Vec<String>)> {
    let mark = format!("{}/", dir.join(format!("node{i}")).display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv: Vec<String> = String::from_utf8_lossy(&cmd)
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        let program = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a));
        if program.is_some_and(|p| programs.contains(&p)) && argv.join(" ").contains(&mark) {
            found.push((pid, argv));
        }
    }
    found
}

/// Kills node `i`'s processes among `programs` with SIGKILL and waits until they are
/// gone; returns their command lines, to start them again.
pub fn kill(dir: &Path, i: u8, programs: &[&str]) -> Vec<Vec<String>> {
    let procs = node_procs(dir, i, programs);
    assert_eq!(procs.len(), programs.len(), "node{i}: {procs:?}");
    for (pid, _) in &procs {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Gone before anything is started in their place (same sockets, same data). Not
    // judged by the command line: a dying process's reads empty once its memory is
    // released, before its files (the store's data-directory lock among them) are
    // closed, and a store started in that window exited "locked by another
    // tessera-store" (the test then failed at "did not come back"). Nor by the main
    // thread alone: it shows as a zombie while the other threads are still exiting and
    // holding the files. A thread that is a zombie has closed its files.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (pid, argv) in &procs {
        while !exited(*pid) {
            assert!(
                Instant::now() < deadline,
                "node{i}: {} (pid {pid}) still running",
                argv[0]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    procs.into_iter().map(|(_, argv)| argv).collect()
}

/// True once every thread of process `pid` has exited: no /proc entry, or only zombies
/// (state `Z` or `X`), which have closed their files.
fn exited(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        match std::fs::read_to_string(t.path().join("stat")) {
            // The state follows the command name, which is in parentheses and may hold
            // any byte: take it after the last ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    })
}

/// Processes a test started again (the launcher stops only its own): SIGTERM, then
/// SIGKILL, when dropped.
#[derive(Default)]
pub struct Restarted(Vec<std::process::Child>);

impl Restarted {
    /// Starts `argv` again as node `i`'s program was, its log appended to the node's.
    pub fn start(&mut self, dir: &Path, i: u8, argv: &[String]) {
        let log = if argv[0].ends_with("tessera-store") {
            "store.log"
        } else {
            "tesserad.log"
        };
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join(format!("node{i}/{log}")))
            .unwrap();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        self.0.push(child);
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (at most `secs`) until `volumes/<name>` through node `via` satisfies `ok`.
pub fn wait_volume(
    ca: &str,
    via: u8,
    token: &str,
    name: &str,
    secs: u64,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, v) = api(
            ca,
            via,
            "GET",
            &format!("volumes/{name}"),
            Some(token),
            None,
        );
        if code == 200 && ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "volume {name} never got there: {code} {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates volume `name` of `size` bytes and `replicas` copies, its primary's on node id
/// `on`, through node 1, and waits until the task succeeded and the volume is ready (at
/// most 30 s), with every copy in sync when it has more than one; its view.
pub fn create_volume(
    ca: &str,
    token: &str,
    name: &str,
    size: u64,
    replicas: u8,
    on: &str,
) -> Value {
    let body =
        serde_json::json!({"name": name, "size_bytes": size, "replicas": replicas, "node": on});
    let (code, task) = api(ca, 1, "POST", "volumes", Some(token), Some(&body));
    assert_eq!(code, 202, "{task}");
    assert_eq!(wait_task(ca, 1, token, &task)["state"], "succeeded");
    wait_volume(ca, 1, token, name, 30, |v| {
        v["state"] == "ready" && (replicas < 2 || all_in_sync(v))
    })
}

/// Waits until `volumes/<name>` through node `via` satisfies `ok`, for as long as its
/// replication keeps moving: it fails only when nothing of `replication` (generation,
/// copies, their states, catch-up progress, `joining`) changed for `quiet_secs`, or after
/// `4 * quiet_secs` in all. A loaded CI machine makes a rebuild slow, not stuck; a fixed
/// deadline took one for the other.
pub fn wait_volume_moving(
    ca: &str,
    via: u8,
    token: &str,
    name: &str,
    quiet_secs: u64,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let quiet = Duration::from_secs(quiet_secs);
    let began = Instant::now();
    let mut last = (Value::Null, Instant::now());
    loop {
        let (code, v) = api(
            ca,
            via,
            "GET",
            &format!("volumes/{name}"),
            Some(token),
            None,
        );
        if code == 200 && ok(&v) {
            return v;
        }
        if code == 200 && v["replication"] != last.0 {
            last = (v["replication"].clone(), Instant::now());
        }
        assert!(
            last.1.elapsed() < quiet && began.elapsed() < 4 * quiet,
            "volume {name} never got there (its replication unchanged for {:?}, {:?} in all): {code} {v}",
            last.1.elapsed(),
            began.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (at most 60 s) until `task` (as the API returned it) ended; the task.
pub fn wait_task(ca: &str, via: u8, token: &str, task: &Value) -> Value {
    let id = task["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, t) = api(ca, via, "GET", &format!("tasks/{id}"), Some(token), None);
        if code == 200 && (t["state"] == "succeeded" || t["state"] == "failed") {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} did not end: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes snapshot `name` of `volume` through node 1's API and waits for its task to
/// succeed (at most 60 s).
pub fn take_snapshot(ca: &str, token: &str, volume: &str, name: &str) {
    let body = serde_json::json!({ "name": name });
    let path = format!("volumes/{volume}/snapshots");
    let (code, task) = api(ca, 1, "POST", &path, Some(token), Some(&body));
    assert_eq!(code, 202, "{task}");
    let done = wait_task(ca, 1, token, &task);
    assert_eq!(done["state"], "succeeded", "{volume}@{name}: {done}");
}

/// The nodes holding a copy of `v` (as `GET /volumes/<name>` shows it), primary first.
pub fn copy_nodes(v: &Value) -> Vec<String> {
    v["replication"]["copies"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every copy of `v` is in sync and none still joining.
pub fn all_in_sync(v: &Value) -> bool {
    v["replication"]["copies"].as_array().is_some_and(|c| {
        c.iter()
            .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
    })
}

/// Whether `GET /events` through node `via` lists an event of `kind` about `target`.
pub fn has_event(ca: &str, via: u8, token: &str, kind: &str, target: &str) -> bool {
    let (_, ev) = api(ca, via, "GET", "events", Some(token), None);
    ev.as_array()
        .is_some_and(|e| e.iter().any(|e| e["kind"] == kind && e["target"] == target))
}

/// The last `lines` lines of each of the three nodes' store logs, for a failure's message.
pub fn store_logs(dir: &Path, lines: usize) -> String {
    crate::devcluster::log_tails(dir, "store.log", lines, |_| true)
}

/// Waits (at most 60 s) until node 1's API lists three nodes whose stores are healthy;
/// that list.
pub fn three_healthy_nodes(ca: &str, token: &str) -> Value {
    crate::cluster::wait_for("three nodes with healthy stores", 60, || {
        let (_, n) = api(ca, 1, "GET", "nodes", Some(token), None);
        n.as_array()
            .is_some_and(|l| l.len() == 3 && l.iter().all(|n| n["storage"]["state"] == "ok"))
            .then_some(n)
    })
}

/// Starts VM `name` (the test guest `kernel`, idle, 64 MiB) with disk `disk` on node id
/// `node`, and waits (at most 90 s) until it runs.
pub fn start_idle_vm(ca: &str, token: &str, name: &str, disk: &str, node: &str, kernel: &str) {
    let body = serde_json::json!({
        "name": name, "vcpus": 1, "memory_mib": 64, "disks": [disk], "node": node,
        "kernel": kernel, "cmdline": "console=ttyS0 tessera.mode=idle",
        "desired_state": "running",
    });
    let (c, v) = api(ca, 1, "POST", "vms", Some(token), Some(&body));
    assert_eq!(c, 201, "{v}");
    crate::cluster::wait_for(&format!("VM {name} running"), 90, || {
        let (_, v) = api(ca, 1, "GET", &format!("vms/{name}"), Some(token), None);
        (v["actual_state"] == "running").then_some(())
    });
}

/// Node `i`'s own TLS credentials (the certificate its VMMs present to other nodes'
/// stores), copied into `tmp/node<i>-creds` in the layout qemu's `tls-creds-x509` reads;
/// that directory.
pub fn node_credentials(dir: &Path, i: u8, tmp: &Path) -> PathBuf {
    let tls = dir.join(format!("node{i}/data/tls"));
    let creds = tmp.join(format!("node{i}-creds"));
    std::fs::create_dir_all(&creds).unwrap();
    for (from, to) in [
        ("ca.crt", "ca-cert.pem"),
        ("node.crt", "client-cert.pem"),
        ("node.key", "client-key.pem"),
    ] {
        std::fs::copy(tls.join(from), creds.join(to)).unwrap();
    }
    creds
}

/// A client that stays connected: qemu-io reading its commands from a pipe, its output
/// line by line.
pub struct QemuIo {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl QemuIo {
    /// Starts qemu-io on `uri` (a raw image).
    pub fn start(uri: &str) -> QemuIo {
        QemuIo::start_args(&["-f".into(), "raw".into(), uri.into()])
    }

    /// Starts qemu-io with `args` (what names the image: a URI, or `--object` and
    /// `--image-opts` for NBD over TLS).
    pub fn start_args(args: &[String]) -> QemuIo {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "qemu-io"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        QemuIo { child, stdin, out }
    }

    /// Starts qemu-io on node `i`'s store over NBD on TCP with TLS (`creds`, from
    /// [`node_credentials`]), export name `export` (a writer key may follow a `#`).
    pub fn tls(creds: &Path, i: u8, export: &str) -> QemuIo {
        QemuIo::start_args(&[
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ),
            "--image-opts".into(),
            format!("driver=nbd,host=127.0.0.{i},port=10809,export={export},tls-creds=tls0"),
        ])
    }

    /// Runs one qemu-io command and returns the line it answered with.
    pub fn run(&mut self, command: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "qemu-io ended before answering {command}"
            );
            // Each command's answer: a count of bytes, or a failure.
            if line.contains("bytes") || line.contains("failed") || line.contains("error") {
                return line.trim().to_string();
            }
            if command == "flush" {
                return line.trim().to_string();
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
