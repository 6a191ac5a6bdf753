//! What the parts of the replication story share: the API and the CLI, the stores'
//! NBD sockets, the nodes' processes, and waiting for a volume or a task.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_tests::{bin, file_hash, output};

/// What every part of the story works with.
pub(crate) struct Cx {
    /// The cluster CA's file.
    pub ca: String,
    /// The administrator's token.
    pub t: String,
    /// The dev cluster's directory.
    pub dir: PathBuf,
    /// Scratch files.
    pub tmp: PathBuf,
    /// The CLI's HOME (logged in as the administrator).
    pub home: PathBuf,
    /// node1..node3's ids.
    pub ids: Vec<String>,
}

impl Cx {
    /// Node `i`'s id (1-3).
    pub fn id(&self, i: u8) -> String {
        self.ids[usize::from(i) - 1].clone()
    }
}

pub(crate) const MIB: u64 = 1024 * 1024;
pub(crate) const SIZE: u64 = 32 * MIB;

/// A request to node `node` (1-3) with curl: (status, body as JSON).
pub(crate) fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "30",
        "--cacert",
        ca,
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ])
    .arg(format!("https://127.0.0.{node}:8006/api/v1/{path}"));
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
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The `tessera` CLI with its own HOME: (success, stdout, stderr).
pub(crate) fn cli(home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
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

/// Node `i`'s store's local NBD socket URI for `export`.
pub(crate) fn unix_uri(dir: &Path, i: u8, export: &str) -> String {
    format!(
        "nbd+unix:///{export}?socket={}",
        dir.join(format!("node{i}/store/nbd.sock")).display()
    )
}

/// Writes `src` at the start of `export` through node `i`'s store (nbdcopy flushes at
/// the end); true if nbdcopy succeeded.
pub(crate) fn write(dir: &Path, i: u8, export: &str, src: &Path) -> bool {
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
pub(crate) fn read_hash(dir: &Path, i: u8, export: &str, tmp: &Path) -> blake3::Hash {
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

/// The size of `export` as node `i`'s store serves it (nbdinfo).
pub(crate) fn nbd_size(dir: &Path, i: u8, export: &str) -> u64 {
    let out = output(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(unix_uri(dir, i, export)),
    );
    assert!(
        out.status.success(),
        "nbdinfo {export} on node{i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// What `export` holds on node `i` now (at its current size), with random bytes from
/// `from` to its end: the file (to write back whole, past an old end at `from`) and its
/// hash.
pub(crate) fn random_past(
    dir: &Path,
    i: u8,
    export: &str,
    tmp: &Path,
    from: u64,
) -> (PathBuf, blake3::Hash) {
    let f = tmp.join(format!("grown-{export}"));
    let _ = std::fs::remove_file(&f);
    let out = output(
        Command::new("nbdcopy")
            .arg(unix_uri(dir, i, export))
            .arg(&f),
    );
    assert!(out.status.success(), "reading {export} from node{i}");
    let mut data = std::fs::read(&f).unwrap();
    assert!(
        data.len() as u64 > from,
        "{export} is not larger than {from}"
    );
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data[from as usize..]);
    std::fs::write(&f, &data).unwrap();
    (f, blake3::hash(&data))
}

/// A file of `len` random bytes followed by zeros up to SIZE, and its hash; the random
/// part alone is `path`.
pub(crate) fn payload(tmp: &Path, name: &str, len: u64) -> (PathBuf, blake3::Hash) {
    let mut data = vec![0u8; len as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    let p = tmp.join(name);
    std::fs::write(&p, &data).unwrap();
    data.resize(SIZE as usize, 0);
    (p, blake3::hash(&data))
}

// One copy of these for every dev-cluster test (tests/src/replicas.rs).
pub(crate) use tessera_tests::replicas::kill;

/// Kills node `i`'s tesserad and store with SIGKILL: their command lines.
pub(crate) fn kill_node(dir: &Path, i: u8) -> Vec<Vec<String>> {
    kill(dir, i, &["tesserad", "tessera-store"])
}

/// Processes this test started again (the launcher only stops the ones it started):
/// stopped with SIGTERM, then SIGKILL, when dropped.
#[derive(Default)]
pub(crate) struct Restarted(Vec<std::process::Child>);

impl Restarted {
    /// Starts `argv` again as node `i`'s program was, its log appended to the node's.
    pub(crate) fn start(&mut self, dir: &Path, i: u8, argv: &[String]) {
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

/// Waits until node `i`'s store answers NBD on its local socket (it has restarted).
pub(crate) fn wait_store(dir: &Path, i: u8, export: &str) {
    let began = Instant::now();
    let deadline = began + Duration::from_secs(20);
    loop {
        let out = output(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(unix_uri(dir, i, export)),
        );
        if out.status.success() {
            eprintln!(
                "node{i}'s store answered {:?} after its start",
                began.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node{i}'s store did not come back: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether every copy of `v` is in sync and none still joining.
pub(crate) fn all_in_sync(v: &Value) -> bool {
    v["replication"]["copies"].as_array().is_some_and(|c| {
        c.iter()
            .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
    })
}

/// Waits (at most `secs`) until `volumes/<name>` on node `via` satisfies `ok`.
pub(crate) fn wait_volume(
    ca: &str,
    via: u8,
    token: &str,
    name: &str,
    secs: u64,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, v) = call(
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

pub(crate) fn wait_task(ca: &str, via: u8, token: &str, task: &Value) -> Value {
    let id = task["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, t) = call(ca, via, "GET", &format!("tasks/{id}"), Some(token), None);
        if code == 200 && (t["state"] == "succeeded" || t["state"] == "failed") {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} did not end: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn copy_state(v: &Value, node: &str) -> String {
    v["replication"]["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["node"] == node)
        .map(|c| c["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no copy on {node}: {v}"))
}

/// Prints the end of every node's store and tesserad log when the test fails (the
/// cluster's directory goes with the test), so a failure in CI can be diagnosed.
pub(crate) struct LogsOnPanic(pub PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for i in 1..=3 {
            for log in ["store.log", "tesserad.log"] {
                let f = self.0.join(format!("node{i}/{log}"));
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(80)..];
                eprintln!("--- last {} lines of {}:", tail.len(), f.display());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Node `i`'s id, from `GET /nodes`.
pub(crate) fn id_of(ca: &str, t: &str, i: u8) -> String {
    let (_, nodes) = call(ca, 2, "GET", "nodes", Some(t), None);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == format!("node{i}"))
        .unwrap_or_else(|| panic!("no node{i}: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}
