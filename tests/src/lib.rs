//! Harness for end-to-end tests: starts real `tessera-store` processes, finds the external
//! clients (qemu-img, nbdinfo, nbdcopy, fio, qemu-io) and runs them.
//!
//! The binaries come from the same cargo target directory as the test executable; the
//! suite's entry point (`tests/run`) builds them first.

#![forbid(unsafe_code)]
// This is test code: anything unexpected (a process that will not start, a reply that is
// not JSON) should fail the test loudly where it happens, so unwrap is the right tool.
// The integration tests' own functions are `#[test]`s, where clippy.toml already allows it.
#![allow(clippy::unwrap_used)]

pub mod bitrot;
pub mod cluster;
pub mod devcluster;
pub mod power_loss;
pub mod powerfs;
pub mod replicas;
pub mod skip_policy;
pub mod sse;
pub mod vms;

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of one of our binaries, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (tests/run does: cargo build --workspace)",
        p.display()
    );
    p
}

/// Fails the test with a clear message when an external tool is missing.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run tests/setup (it installs every client the tests use)"
    );
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output whatever the status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Runs `cmd` with `stdin` written to its standard input; returns (success, stdout, stderr).
pub fn run_with_stdin(mut cmd: Command, stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A free TCP port on loopback (bound then released; the daemon binds it right after).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A running `tessera-store serve`.
pub struct StoreProcess {
    /// The process.
    pub child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// NBD TCP port on 127.0.0.1.
    pub port: u16,
    /// NBD Unix socket.
    pub nbd_sock: PathBuf,
    /// Admin socket.
    pub admin_sock: PathBuf,
    log: PathBuf,
}

impl StoreProcess {
    /// Starts a store on `data_dir` and waits until its sockets accept connections.
    pub fn start(data_dir: &Path) -> StoreProcess {
        Self::start_with_port(data_dir, free_port())
    }

    /// Starts a store on a given TCP port.
    pub fn start_with_port(data_dir: &Path, port: u16) -> StoreProcess {
        Self::start_with(data_dir, port, &[])
    }

    /// Starts a store on a given TCP port with extra `serve` arguments.
    pub fn start_with(data_dir: &Path, port: u16, extra: &[&str]) -> StoreProcess {
        std::fs::create_dir_all(data_dir).expect("create data dir");
        let log = data_dir.with_extension("log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log");
        let child = Command::new(bin("tessera-store"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            // A test's own loopback port: the trusted-address exception to TLS.
            .arg("--nbd-tcp-plain")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env("TESSERA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tessera-store");
        let mut p = StoreProcess {
            child,
            data_dir: data_dir.to_path_buf(),
            port,
            nbd_sock: data_dir.join("nbd.sock"),
            admin_sock: data_dir.join("admin.sock"),
            log,
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "tessera-store exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            let tcp_ok = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if tcp_ok
                && UnixStream::connect(&self.admin_sock).is_ok()
                && UnixStream::connect(&self.nbd_sock).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tessera-store not ready after 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nbd://127.0.0.1:port/export`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    /// `nbd+unix:///export?socket=...`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock.display())
    }

    /// `host:port` for raw TCP clients.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs the admin CLI against this store and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        output(
            Command::new(bin("tessera-store"))
                .arg("--admin-socket")
                .arg(&self.admin_sock)
                .args(args),
        )
    }

    /// Runs the admin CLI, asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tessera-store {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a volume through the CLI.
    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "tessera-store exited with {status}; log:\n{}",
                        self.log_text()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => panic!("tessera-store did not stop within 60 s"),
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident memory of the process in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Checks the server still serves a fresh client: `nbdinfo` must list exports.
    pub fn assert_healthy(&mut self) {
        assert!(
            self.alive(),
            "tessera-store died; log:\n{}",
            self.log_text()
        );
        let out = run(Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", self.port)));
        assert!(
            out.contains("export="),
            "nbdinfo --list printed no export:\n{out}"
        );
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// blake3 of a file's content.
pub fn file_hash(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).expect("open file to hash");
    std::io::copy(&mut f, &mut h).expect("hash file");
    h.finalize()
}

/// Reports a skipped test on the real standard error (the test harness captures `print!`
/// and `eprint!`, which would hide the line in CI logs). In CI (`CI=true`) it panics unless
/// `tests/skip-allowlist` expects this test to skip for this reason: a green CI run means
/// the features ran.
pub fn skip(test: &str, reason: &str) {
    skip_policy::report(test, reason);
}

/// Whether `/dev/kvm` can be opened; prints the SKIP line when it cannot.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        skip(test, "needs /dev/kvm");
    }
    ok
}

/// A private LAN for multi-node tests: one network namespace per node, each with `eth0`
/// at 10.77.0.(i+1)/24, all on a bridge inside a separate "switch" namespace. Traffic
/// stays inside namespaces the test created. Removed on drop.
pub struct Lan {
    switch: String,
    nodes: Vec<String>,
    cas: std::sync::Mutex<Vec<PathBuf>>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

impl Lan {
    /// Builds a LAN of `n` nodes, or `None` (after printing a SKIP line for `test`) when
    /// not root.
    pub fn new(test: &str, n: usize) -> Option<Lan> {
        if !nix::unistd::Uid::effective().is_root() {
            skip(test, "needs root to create network namespaces");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let switch = format!("tsw-{id}");
        ip(&["netns", "add", &switch]);
        let lan = Lan {
            switch: switch.clone(),
            nodes: Vec::new(),
            cas: std::sync::Mutex::new(Vec::new()),
        };
        ip(&[
            "-n",
            &switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        let mut lan = lan;
        for i in 0..n {
            let ns = format!("tsn-{id}-{i}");
            ip(&["netns", "add", &ns]);
            lan.nodes.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &switch,
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Self::addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &port, "up"]);
        }
        Some(lan)
    }

    /// Node `i`'s address.
    pub fn addr(i: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 77, 0, i as u8 + 1)
    }

    /// A command that runs `program` inside node `i`'s namespace.
    pub fn command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nodes[i]]).arg(program);
        c
    }

    /// Remembers where a node keeps the cluster CA certificate (`<data_dir>/tls/ca.crt`),
    /// for clients checking the nodes' HTTPS certificates.
    pub fn trust_ca_in(&self, data_dir: &Path) {
        self.cas.lock().unwrap().push(data_dir.join("tls/ca.crt"));
    }

    /// The cluster CA certificate to check the nodes' HTTPS with (the first that exists
    /// of those remembered; before formation, none does).
    pub fn ca_file(&self) -> Option<PathBuf> {
        let cas = self.cas.lock().unwrap();
        cas.iter().find(|p| p.exists()).or(cas.first()).cloned()
    }

    /// Node `i`'s network namespace (for `ip -n` / `ip netns exec`).
    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// A second cable between nodes `a` and `b`, apart from the LAN: a veth pair whose
    /// ends are both called `name`, one in each node's namespace, down and without
    /// addresses (what an operator would name as a network's uplink).
    pub fn wire(&self, a: usize, b: usize, name: &str) {
        ip(&[
            "link",
            "add",
            name,
            "netns",
            &self.nodes[a],
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            &self.nodes[b],
        ]);
    }

    /// Cuts node `i` off the LAN (link down) or reconnects it.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.nodes[i],
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.switch)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A client of a `tessera-vmm` control socket (JSON lines).
pub struct VmApi {
    r: std::io::BufReader<UnixStream>,
    w: UnixStream,
}

impl VmApi {
    /// Connects, waiting up to 20 s for the socket to appear.
    pub fn connect(path: &Path) -> VmApi {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                let w = s.try_clone().expect("clone control socket");
                return VmApi {
                    r: std::io::BufReader::new(s),
                    w,
                };
            }
            assert!(
                Instant::now() < deadline,
                "control socket {} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a raw line, returns the parsed reply.
    pub fn raw(&mut self, line: &str) -> serde_json::Value {
        use std::io::{BufRead, Write};
        self.w.write_all(line.as_bytes()).expect("send request");
        self.w.write_all(b"\n").expect("send request");
        let mut reply = String::new();
        self.r.read_line(&mut reply).expect("read reply");
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{line}: no reply ({e})"))
    }

    /// Runs an operation that must succeed; returns its `ok` value.
    pub fn call(&mut self, op: serde_json::Value) -> serde_json::Value {
        let v = self.raw(&serde_json::json!({ "v": 1, "op": op }).to_string());
        assert!(v.get("error").is_none(), "{op}: {v}");
        v["ok"].clone()
    }
}

/// The numbers of the test guest's `count N` console lines.
pub fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Waits (up to 90 s) until the console file satisfies `ok`; returns its text.
pub fn wait_console(path: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
