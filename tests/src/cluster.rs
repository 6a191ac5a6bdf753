//! Cluster tests' helpers: nodes (`tesserad`, optionally with a `tessera-store`) inside
//! the namespaces of a [`Lan`], and the REST API driven with curl from inside them.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{bin, output, Lan};

/// A node: `tesserad` and, when asked, its `tessera-store`.
pub struct ClusterNode {
    /// Index on the LAN.
    pub i: usize,
    /// The node's directory (seed, data, logs).
    pub dir: PathBuf,
    tesserad: Option<Child>,
    store: Option<Child>,
}

impl ClusterNode {
    /// Writes the seed of node `i` (cluster "lab", `expected` nodes, named `node<i>`) and
    /// starts it.
    pub fn start(lan: &Lan, i: usize, root: &Path, expected: usize, with_store: bool) -> Self {
        let dir = root.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("seed.toml"),
            format!(
                "cluster_name = \"lab\"\nnode_name = \"node{i}\"\n\
                 join_secret = \"correct horse battery staple\"\n\
                 expected_nodes = {expected}\ndata_dir = \"{}\"\n\n[management]\naddress = \"{}:7946\"\n\n\
                 [storage]\nadmin_socket = \"{}\"\nnbd = \"{}:10809\"\n",
                dir.join("data").display(),
                Lan::addr(i),
                dir.join("store/admin.sock").display(),
                Lan::addr(i),
            ),
        )
        .unwrap();
        lan.trust_ca_in(&dir.join("data"));
        let mut n = ClusterNode {
            i,
            dir,
            tesserad: None,
            store: None,
        };
        if with_store {
            n.start_store(lan);
        }
        n.start_tesserad(lan);
        n
    }

    fn start_store(&mut self, lan: &Lan) {
        let child = lan
            .command(self.i, &bin("tessera-store"))
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.join("store"))
            .args(["--nbd-tcp", &format!("{}:10809", Lan::addr(self.i))])
            // Replication between the stores (QUIC): tesserad finds it at the NBD
            // address's host, port 7410, as on the README's cluster.
            .args(["--repl-quic", &format!("{}:7410", Lan::addr(self.i))])
            .arg("--nbd-tls-dir")
            .arg(self.dir.join("data/tls"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("store.log")))
            .spawn()
            .unwrap();
        self.store = Some(child);
        let sock = self.dir.join("store/admin.sock");
        wait_for("the store's admin socket", 20, || {
            sock.exists().then_some(())
        });
    }

    /// Starts (or restarts) `tesserad`.
    pub fn start_tesserad(&mut self, lan: &Lan) {
        let child = lan
            .command(self.i, &bin("tesserad"))
            .arg("--seed")
            .arg(self.dir.join("seed.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("tesserad.log")))
            .spawn()
            .unwrap();
        self.tesserad = Some(child);
    }

    /// Kills `tesserad` (SIGKILL, as a crash).
    pub fn kill_tesserad(&mut self) {
        if let Some(mut c) = self.tesserad.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's logs, for failure messages.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "--- node {} tesserad ---\n{}\n--- store ---\n{}",
            self.i,
            read("tesserad.log"),
            read("store.log")
        )
    }
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        for c in [self.tesserad.as_mut(), self.store.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 200 ms until it returns something, failing after `secs`.
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// curl inside node `i`'s namespace with extra arguments, over HTTPS checked against the
/// cluster CA; `path` is under `/api/v1/`.
/// Returns (HTTP status, body text).
pub fn curl(lan: &Lan, i: usize, path: &str, args: &[&str]) -> (u16, String) {
    let mut c = lan.command(i, Path::new("curl"));
    c.args(["-s", "-m", "20", "-o", "-", "-w", "\n%{http_code}"]);
    if let Some(ca) = lan.ca_file() {
        c.arg("--cacert").arg(ca);
    }
    c.args(args);
    c.arg(format!("https://{}:8006/api/v1/{path}", Lan::addr(i)));
    let out = output(&mut c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// One JSON request to node `i`'s API: (status, JSON body or Null).
pub fn api(
    lan: &Lan,
    i: usize,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-X", method];
    if let Some(a) = &auth {
        args.extend(["-H", a]);
    }
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data", b]);
    }
    let (code, text) = curl(lan, i, path, &args);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits for the first administrator's password, logs in on node `i`, changes the
/// password to `new_password` and returns a session token.
pub fn admin_session(lan: &Lan, nodes: &[ClusterNode], i: usize, new_password: &str) -> String {
    let dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir.clone()).collect();
    admin_session_in(lan, &dirs, i, new_password)
}

/// [`admin_session`] for nodes given by their directories (`<dir>/data/...`).
pub fn admin_session_in(lan: &Lan, dirs: &[PathBuf], i: usize, new_password: &str) -> String {
    let password = wait_for("the initial admin password file", 40, || {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join("data/initial-admin-password")).ok())
            .map(|p| p.trim().to_string())
    });
    let login = json!({ "username": "admin", "password": password }).to_string();
    let v = wait_for("a successful login", 30, || {
        let (code, v) = api(lan, i, "POST", "login", None, Some(&login));
        (code == 200).then_some(v)
    });
    let token = v["token"].as_str().unwrap().to_string();
    let change = json!({ "old_password": password, "new_password": new_password }).to_string();
    let (code, v) = api(lan, i, "POST", "password", Some(&token), Some(&change));
    assert_eq!(code, 200, "{v}");
    token
}

/// Waits for a task to end (polling node `i`) and returns it.
pub fn wait_task(lan: &Lan, i: usize, token: &str, id: &str) -> Value {
    wait_for(&format!("task {id} to end"), 30, || {
        let (code, v) = api(lan, i, "GET", &format!("tasks/{id}"), Some(token), None);
        (code == 200 && (v["state"] == "succeeded" || v["state"] == "failed")).then_some(v)
    })
}
