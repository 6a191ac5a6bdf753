//! The README's local cluster (`tessera-devcluster`) started from a test: the launcher, the
//! lines of its report, and the Ctrl-C that stops it; its nodes' API called with curl at
//! their fixed addresses, and its processes found by their command lines.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, output};

/// The last line of the launcher's report.
const REPORT_END: &str = "Ctrl-C stops everything";

/// A running `tessera-devcluster`. Dropped without [`DevCluster::stop`] (a test failed
/// half-way), it is interrupted quietly, so no node outlives the test.
pub struct DevCluster {
    child: Option<Child>,
    /// The launcher's report, up to its "Ctrl-C stops everything" line.
    pub lines: Vec<String>,
}

impl DevCluster {
    /// Starts `tessera-devcluster --dir dir` and waits (at most 120 s) for its report to
    /// say the cluster is up.
    pub fn start(dir: &Path) -> DevCluster {
        DevCluster::start_nodes(dir, 3)
    }

    /// [`DevCluster::start`] with `nodes` nodes (`--nodes`) instead of three.
    pub fn start_nodes(dir: &Path, nodes: u8) -> DevCluster {
        let mut child = Command::new(bin("tessera-devcluster"))
            .arg("--dir")
            .arg(dir)
            .arg("--nodes")
            .arg(nodes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut cluster = DevCluster {
            child: Some(child),
            lines: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            let done = line.starts_with(REPORT_END);
            cluster.lines.push(line);
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "devcluster did not come up: {:?}",
                cluster.lines
            );
        }
        assert!(
            cluster
                .lines
                .iter()
                .any(|l| l.contains("Tessera local cluster is up")),
            "{:?}",
            cluster.lines
        );
        cluster
    }

    /// The first administrator's password, as the report prints it.
    pub fn admin_password(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split("initial password ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no admin password printed: {:?}", self.lines))
            .to_string()
    }

    /// The cluster CA's file, as the report prints it (clients check the API with it).
    pub fn ca_file(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split("issued by it): ").nth(1))
            .unwrap_or_else(|| panic!("no CA file printed: {:?}", self.lines))
            .trim()
            .to_string()
    }

    /// Logs in as the first administrator through node `node` with the printed password,
    /// changes it to `new_password` (as a first login must before anything else) and
    /// returns a session token.
    pub fn admin_session(&self, node: u8, new_password: &str) -> String {
        let (ca, password) = (self.ca_file(), self.admin_password());
        let login = |pw: &str| {
            let body = serde_json::json!({"username": "admin", "password": pw});
            let (code, a) = api(&ca, node, "POST", "login", None, Some(&body));
            assert_eq!(code, 200, "{a}");
            a["token"].as_str().unwrap().to_string()
        };
        let first = login(&password);
        let body = serde_json::json!({"old_password": password, "new_password": new_password});
        let (code, a) = api(&ca, node, "POST", "password", Some(&first), Some(&body));
        assert_eq!(code, 200, "{a}");
        login(new_password)
    }

    /// Stops it with Ctrl-C; it must exit successfully within 90 s.
    pub fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "devcluster did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "devcluster exited with {status}");
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        // Only after a failure: stop the nodes without panicking again.
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(90);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A three-node dev cluster in a fresh temporary directory, its first administrator
/// logged in through node 1 and its three stores healthy: how the volume tests begin
/// ([`DevCluster::admin_with_nodes`]).
pub struct AdminCluster {
    /// The cluster. Declared first, so it is stopped before its directory is removed.
    pub cluster: DevCluster,
    /// The cluster CA's file.
    ca: String,
    /// The administrator's session token.
    token: String,
    /// `GET /nodes` once the three stores were healthy.
    pub nodes: Value,
    /// `scratch/` in the cluster's directory.
    scratch: std::path::PathBuf,
    /// The cluster's directory (`node<i>/` below it), removed when this is dropped.
    dir: tempfile::TempDir,
}

impl AdminCluster {
    /// The directory the cluster runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A directory for the test's own files (what it writes and reads back), beside the
    /// nodes' and gone with them.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The cluster CA's file (clients check the API with it).
    pub fn ca(&self) -> &str {
        &self.ca
    }

    /// The administrator's session token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The id of node `node<i>`.
    pub fn id(&self, i: u8) -> String {
        node_id(&self.nodes, i)
    }
}

impl DevCluster {
    /// Starts a three-node cluster in a fresh temporary directory, logs in as its first
    /// administrator through node 1 (changing the printed password to `new_password`) and
    /// waits (at most 60 s) until node 1 lists three nodes whose stores are healthy
    /// (placement takes only those).
    pub fn admin_with_nodes(new_password: &str) -> AdminCluster {
        let dir = tempfile::tempdir().unwrap();
        let cluster = DevCluster::start(dir.path());
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let ca = cluster.ca_file();
        let token = cluster.admin_session(1, new_password);
        let nodes = crate::replicas::three_healthy_nodes(&ca, &token);
        AdminCluster {
            cluster,
            ca,
            token,
            nodes,
            scratch,
            dir,
        }
    }
}

/// One answer of a node's API: status (0: no answer within curl's time), headers, body,
/// and how long it took.
pub struct Answer {
    /// The HTTP status, 0 when there was none.
    pub code: u16,
    /// The header lines as received.
    pub headers: String,
    /// The body as text.
    pub body: String,
    /// From the request to the whole answer.
    pub took: Duration,
}

impl Answer {
    /// The body as JSON; panics naming the answer when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.code, self.body))
    }

    /// The body as JSON, or `Value::Null` when it is not JSON (an empty answer).
    pub fn json_or_null(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The value of header `name` (any case), if sent.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// A request to node `node`'s API at `https://127.0.0.<node>:8006<path>` with curl,
/// checked against the cluster CA file `ca`, taking at most `max`.
pub fn call(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    max: Duration,
) -> Answer {
    call_with(ca, node, method, path, token, body, max, &[])
}

/// [`call`] with more arguments for curl (`--interface`, a header).
#[allow(clippy::too_many_arguments)]
pub fn call_with(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    max: Duration,
    extra: &[&str],
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", &max.as_secs_f64().to_string()])
        .args(["--cacert", ca, "-X", method, "-D"])
        .arg(&headers)
        .args(["-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.{node}:8006{path}"))
        .args(extra);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data"])
            .arg(b.to_string());
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let t = Instant::now();
    let out = output(&mut cmd);
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        code: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: body.to_string(),
        took,
    }
}

/// A request to node `node` (1-3), `path` under `/api/v1/`, within 30 s: (status, body
/// as JSON or `Value::Null`).
pub fn api(
    ca: &str,
    node: u8,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let path = format!("/api/v1/{path}");
    let a = call(
        ca,
        node,
        method,
        &path,
        token,
        body,
        Duration::from_secs(30),
    );
    (a.code, a.json_or_null())
}

/// Waits (at most `secs`) until `GET /nodes` through node `node` lists the three nodes,
/// each one accepted by `ready`; returns the list.
pub fn wait_nodes(
    ca: &str,
    node: u8,
    token: &str,
    secs: u64,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    crate::cluster::wait_for("the three nodes ready in GET /nodes", secs, || {
        let (_, nodes) = api(ca, node, "GET", "nodes", Some(token), None);
        nodes
            .as_array()
            .is_some_and(|n| n.len() == 3 && n.iter().all(&ready))
            .then_some(nodes)
    })
}

/// Whether a node of `GET /nodes` has published its memory (placement needs it).
pub fn memory_published(node: &Value) -> bool {
    node["metrics"]["memory_total"]
        .as_u64()
        .is_some_and(|m| m > 0)
}

/// The id of node `node<i>` in a `GET /nodes` list.
pub fn node_id(nodes: &Value, i: u8) -> String {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == format!("node{i}"))
        .unwrap_or_else(|| panic!("no node{i} in {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The directory of node `node<i>` of a dev cluster started in `dir` (what the
/// [`crate::vms`] helpers call a node's directory).
pub fn node_dir(dir: &Path, i: u8) -> std::path::PathBuf {
    dir.join(format!("node{i}"))
}

/// The last `lines` lines of `name` (`store.log`, `tesserad.log`) of each of the three
/// nodes of the dev cluster in `dir` that `pick` keeps, without the terminal colours the
/// daemons write: for a failure's message.
pub fn log_tails(dir: &Path, name: &str, lines: usize, pick: impl Fn(&str) -> bool) -> String {
    let mut s = String::new();
    for i in 1..=3 {
        let text = std::fs::read_to_string(node_dir(dir, i).join(name)).unwrap_or_default();
        let kept: Vec<&str> = text.lines().filter(|l| pick(l)).collect();
        s += &format!("--- node{i}/{name}:\n");
        for l in &kept[kept.len().saturating_sub(lines)..] {
            let mut rest = *l;
            while let Some(at) = rest.find('\u{1b}') {
                s += &rest[..at];
                rest = rest[at..].find('m').map_or("", |m| &rest[at + m + 1..]);
            }
            s += rest;
            s.push('\n');
        }
    }
    s
}

/// Every log of the dev cluster in `dir`: each node's `store.log` and `tesserad.log`, and
/// each of its VMMs' `vmm.log` and `console.log` (`data/vms/<vm>/`).
pub fn node_logs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut logs = Vec::new();
    for i in 1..=3 {
        let node = node_dir(dir, i);
        for name in ["store.log", "tesserad.log"] {
            let p = node.join(name);
            if p.exists() {
                logs.push(p);
            }
        }
        let Ok(vms) = std::fs::read_dir(node.join("data/vms")) else {
            continue;
        };
        for vm in vms {
            let vm = vm.unwrap().path();
            for name in ["vmm.log", "console.log"] {
                if vm.join(name).exists() {
                    logs.push(vm.join(name));
                }
            }
        }
    }
    logs
}

/// Kills, when dropped, every VMM whose command line names `.0` (the test's directory
/// with a trailing `/`), so none outlives a failed test: VMMs outlive `tesserad` by design.
pub struct VmmKiller(pub String);

impl VmmKiller {
    /// The killer of the VMMs of a dev cluster started in `dir`.
    pub fn of(dir: &Path) -> VmmKiller {
        VmmKiller(format!("{}/", dir.display()))
    }
}

impl Drop for VmmKiller {
    fn drop(&mut self) {
        kill_matching(&self.0, &["tessera-vmm"]);
    }
}

/// SIGKILLs every process whose command line contains `mark` and one of `programs`;
/// returns how many.
pub fn kill_matching(mark: &str, programs: &[&str]) -> usize {
    let pids = pids_where(|cmd| programs.iter().any(|p| cmd.contains(p)) && cmd.contains(mark));
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids.len()
}

/// The pids of the processes whose command line (its arguments joined by spaces) `pick`
/// accepts, in `/proc`'s order: a dev cluster's nodes differ only by the paths they name.
pub fn pids_where(pick: impl Fn(&str) -> bool) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            pick(&cmd).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_keeps_the_last_picked_lines_without_colours() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(node_dir(dir.path(), 1)).unwrap();
        std::fs::write(
            node_dir(dir.path(), 1).join("tesserad.log"),
            "a \u{1b}[32m INFO\u{1b}[0m one\nb \u{1b}[33m WARN\u{1b}[0m two\nc \u{1b}[31mERROR\u{1b}[0m three\n",
        )
        .unwrap();
        let t = log_tails(dir.path(), "tesserad.log", 1, |l| {
            l.contains("WARN") || l.contains("ERROR")
        });
        assert_eq!(
            t,
            "--- node1/tesserad.log:\nc ERROR three\n--- node2/tesserad.log:\n--- node3/tesserad.log:\n"
        );
    }
}
