//! The VMM processes of this node: starting `tessera-vmm` detached from `tesserad` (its
//! own process group, or a systemd scope when systemd is PID 1, so a restart of
//! `tesserad` does not take the VMs with it), finding them again after such a restart
//! through their runtime directory, talking to their control socket, and telling how
//! one ended.
//!
//! Each VM has a runtime directory `<data_dir>/vms/<name>/`: `api.sock` (the VMM's
//! control socket), `console.log` (its serial output), `vmm.log` (its own log) and
//! `run.json` (pid and the start it belongs to).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Why a VMM could not be started or talked to.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A file of the runtime directory.
    #[error("{what} {path}: {source}")]
    File {
        /// What was done.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process did not start.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The VMM binary.
        binary: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket did not answer.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered with an error or something that is not a reply.
    #[error("the VMM refused {op}: {message}")]
    Refused {
        /// The operation.
        op: String,
        /// Its error text.
        message: String,
    },
}

/// A VM's runtime directory.
#[derive(Clone, Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// The runtime directory of VM `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &str) -> RunDir {
        RunDir(data_dir.join("vms").join(name))
    }
    /// The VMM's control socket.
    pub fn api_socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    /// The serial console's output.
    pub fn console(&self) -> PathBuf {
        self.0.join("console.log")
    }
    /// The VMM's own log (its standard error).
    pub fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    fn run_file(&self) -> PathBuf {
        self.0.join("run.json")
    }
}

/// Every VM name with a runtime directory under `data_dir`.
pub fn run_dirs(data_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(data_dir.join("vms")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| tessera_api::limits::is_name(n, &[]))
        .collect()
}

/// What a running VMM belongs to, kept in `run.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Its process id.
    pub pid: u32,
    /// The VM's `start_seq` it was started for.
    pub start_seq: u64,
    /// The VM's `reboot_seq` it was started for.
    pub reboot_seq: u64,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Kernel path.
    pub kernel: String,
    /// Initramfs path, if any.
    pub initrd: Option<String>,
    /// Kernel command line (the VMM's default if none).
    pub cmdline: Option<String>,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The disk as an NBD URI, if any.
    pub disk: Option<String>,
    /// Client credentials for an `nbds://` disk on another node's store.
    pub disk_tls: Option<DiskTls>,
    /// The VMM's writer key for its disk (`super::writer_key`), given in its environment.
    pub disk_key: Option<String>,
    /// The NICs' open taps, in NIC order; the VMM inherits them.
    pub nics: Vec<NicFd>,
}

/// A NIC's tap as the VMM gets it: the open fd (the tap lives as long as it is open
/// somewhere) and the NIC's MAC.
#[derive(Clone, Debug)]
pub struct NicFd {
    /// The tap's name (for logs).
    pub tap: String,
    /// The tap's fd, `TUNSETIFF`ed with a vnet header.
    pub fd: Arc<std::os::fd::OwnedFd>,
    /// `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// The files `tessera-vmm` presents to another node's store over TLS NBD: this node's
/// own certificate (the stores accept any certificate of the cluster CA) and the CA
/// the store's certificate must chain to.
#[derive(Clone, Debug)]
pub struct DiskTls {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// Exit statuses of the VMMs this `tesserad` started (its children), by pid: a reaper
/// thread per child waits for it, so none stays a zombie and its status is known.
#[derive(Clone, Default)]
pub struct Exits(Arc<Mutex<HashMap<u32, ExitStatus>>>);

impl Exits {
    /// The exit status of child `pid`, once it has ended.
    pub fn take(&self, pid: u32) -> Option<ExitStatus> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid)
    }
    /// The exit status of child `pid`, which has ended or is ending: its reaper thread
    /// records the status right after its `wait` returns, and that `wait` is what takes
    /// the process out of `/proc`, so a VMM seen gone a moment before its status is
    /// recorded is waited for (at most `within`) instead of being told apart as if
    /// adopted, with no status.
    pub async fn take_ended(&self, pid: u32, within: std::time::Duration) -> Option<ExitStatus> {
        let until = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.take(pid) {
                return Some(status);
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether child `pid` has ended (been reaped).
    pub fn ended(&self, pid: u32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&pid)
    }
}

/// The `tessera-vmm` to run: `$TESSERA_VMM`, else the one next to this executable, else
/// the one on `PATH`.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_VMM") {
        return PathBuf::from(p);
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("tessera-vmm");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("tessera-vmm")
}

fn systemd_is_init() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// Starts the VMM for `name` detached from `tesserad` and records it in `run.json`.
pub fn launch(
    dir: &RunDir,
    name: &str,
    spec: &Launch,
    seqs: (u64, u64),
    exits: &Exits,
) -> Result<RunInfo, SupervisorError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--kernel".into(),
        spec.kernel.clone().into(),
        "--memory-mib".into(),
        spec.memory_mib.to_string().into(),
        "--vcpus".into(),
        spec.vcpus.to_string().into(),
    ];
    if let Some(i) = &spec.initrd {
        args.extend(["--initrd".into(), i.into()]);
    }
    if let Some(c) = &spec.cmdline {
        args.extend(["--cmdline".into(), c.into()]);
    }
    disk_args(&mut args, spec);
    spawn(dir, name, args, spec, seqs, exits)
}

/// Starts a VMM for `name` that waits for the VM to arrive by live migration
/// (`tessera-vmm --incoming`), listening on `listen` with this node's TLS files (`tls`:
/// the same files a remote disk uses). `spec` gives the memory, vCPUs, NICs and disk the
/// VM has on this node; its kernel and command line are not used (they come with the VM).
pub fn launch_incoming(
    dir: &RunDir,
    name: &str,
    spec: &Launch,
    listen: std::net::SocketAddr,
    tls: &DiskTls,
    seqs: (u64, u64),
    exits: &Exits,
) -> Result<RunInfo, SupervisorError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--incoming".into(),
        listen.to_string().into(),
        "--migration-tls-ca".into(),
        tls.ca.clone().into(),
        "--migration-tls-cert".into(),
        tls.cert.clone().into(),
        "--migration-tls-key".into(),
        tls.key.clone().into(),
        "--memory-mib".into(),
        spec.memory_mib.to_string().into(),
        "--vcpus".into(),
        spec.vcpus.to_string().into(),
    ];
    disk_args(&mut args, spec);
    spawn(dir, name, args, spec, seqs, exits)
}

/// The environment variable `tessera-vmm` takes its disk's writer key from.
pub const WRITER_KEY_ENV: &str = "TESSERA_DISK_WRITER_KEY";

fn disk_args(args: &mut Vec<std::ffi::OsString>, spec: &Launch) {
    if let Some(d) = &spec.disk {
        args.extend(["--disk".into(), d.into()]);
    }
    if let Some(t) = &spec.disk_tls {
        args.extend([
            "--disk-tls-ca".into(),
            t.ca.clone().into(),
            "--disk-tls-cert".into(),
            t.cert.clone().into(),
            "--disk-tls-key".into(),
            t.key.clone().into(),
        ]);
    }
}

/// Starts `tessera-vmm` with `args` (plus its runtime directory's socket and console,
/// `spec`'s NICs' taps and disk writer key) detached from `tesserad`, and records it in
/// `run.json`.
fn spawn(
    dir: &RunDir,
    name: &str,
    args: Vec<std::ffi::OsString>,
    spec: &Launch,
    seqs: (u64, u64),
    exits: &Exits,
) -> Result<RunInfo, SupervisorError> {
    let nics = &spec.nics;
    let file = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| SupervisorError::File { what, path, source }
    };
    std::fs::create_dir_all(&dir.0).map_err(file("creating", &dir.0))?;
    let _ = std::fs::remove_file(dir.api_socket());
    let _ = std::fs::remove_file(dir.run_file());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log())
        .map_err(file("opening", &dir.log()))?;
    let _ = writeln!(&log, "--- tesserad starts the VMM (start {}) ---", seqs.0);
    let vmm = vmm_binary();
    // On the appliance systemd supervises: a transient scope per VM keeps the VMM out of
    // tesserad's unit, so stopping or restarting tesserad does not stop the VM. The scope
    // runs the VMM in this process (exec), so it still is our child.
    let mut cmd = if systemd_is_init() {
        let mut c = Command::new("systemd-run");
        c.args(["--scope", "--quiet", "--collect"])
            .arg(format!(
                "--unit=tessera-vm-{name}-{}",
                crate::tables::random_id()
            ))
            .arg("--")
            .arg(&vmm);
        c
    } else {
        Command::new(&vmm)
    };
    cmd.args(args)
        .arg("--api-socket")
        .arg(dir.api_socket())
        .arg("--serial-out")
        .arg(dir.console());
    // The taps' fds keep their numbers in the VMM: close-on-exec is cleared in the child
    // only, so no other child of tesserad ever holds a VM's tap.
    let mut inherit = Vec::with_capacity(nics.len());
    for nic in nics {
        use std::os::fd::AsRawFd;
        let fd = nic.fd.as_raw_fd();
        inherit.push(fd);
        cmd.arg("--net").arg(format!("fd={fd},mac={}", nic.mac));
        tracing::debug!(vm = name, tap = %nic.tap, fd, "the VMM inherits the tap");
    }
    if !inherit.is_empty() {
        tessera_hostnet::tap::inherit_in_child(&mut cmd, inherit);
    }
    // The environment, not the command line: /proc/PID/environ is the owner's only.
    if let Some(key) = &spec.disk_key {
        cmd.env(WRITER_KEY_ENV, key);
    }
    // Its own process group: a Ctrl-C or a signal to tesserad's group does not reach it.
    cmd.process_group(0)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
        binary: vmm.display().to_string(),
        source,
    })?;
    let pid = child.id();
    let reaped = exits.clone();
    let _ = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            if let Ok(status) = child.wait() {
                reaped
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pid, status);
            }
        });
    let info = RunInfo {
        pid,
        start_seq: seqs.0,
        reboot_seq: seqs.1,
    };
    let text = serde_json::to_vec(&info).unwrap_or_default();
    std::fs::write(dir.run_file(), text).map_err(file("writing", &dir.run_file()))?;
    Ok(info)
}

/// The `run.json` of a VM whose VMM process still lives (and is a `tessera-vmm`, not a
/// process that reused its pid).
pub fn find_running(dir: &RunDir, exits: &Exits) -> Option<RunInfo> {
    let text = std::fs::read(dir.run_file()).ok()?;
    let info: RunInfo = serde_json::from_slice(&text).ok()?;
    alive(info.pid, exits).then_some(info)
}

/// Whether VMM process `pid` lives.
pub fn alive(pid: u32, exits: &Exits) -> bool {
    if exits.ended(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A zombie has an empty command line; another program may have taken the pid.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie
        && cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.ends_with(b"tessera-vmm"))
}

/// Forgets a VM's run (its VMM has ended): `run.json` and the control socket go.
pub fn forget(dir: &RunDir) {
    let _ = std::fs::remove_file(dir.run_file());
    let _ = std::fs::remove_file(dir.api_socket());
}

/// Kills VMM `pid` (SIGKILL).
pub fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// One control-socket call: the `ok` value of the reply.
pub fn call(socket: &Path, op: Value) -> Result<Value, SupervisorError> {
    let sock_err = |source| SupervisorError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let name = op["type"].as_str().unwrap_or("?").to_string();
    let mut s = UnixStream::connect(socket).map_err(sock_err)?;
    // Pause and power-off wait up to 5 s for the vCPUs inside the VMM.
    s.set_read_timeout(Some(Duration::from_secs(7)))
        .map_err(sock_err)?;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(sock_err)?;
    let mut line = serde_json::to_vec(&json!({ "v": 1, "op": op })).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line).map_err(sock_err)?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).map_err(sock_err)?;
    let v: Value = serde_json::from_str(&reply).map_err(|e| SupervisorError::Refused {
        op: name.clone(),
        message: format!("not a reply ({e})"),
    })?;
    match (v.get("ok"), v.get("error")) {
        (Some(ok), _) => Ok(ok.clone()),
        (_, Some(e)) => Err(SupervisorError::Refused {
            op: name,
            message: e.as_str().unwrap_or("?").to_string(),
        }),
        _ => Err(SupervisorError::Refused {
            op: name,
            message: "a reply with neither ok nor error".into(),
        }),
    }
}

/// How a VMM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered itself off (the i8042 reset line, a shutdown).
    GuestOff(String),
    /// Powered off through the control API (by us).
    Requested,
    /// Anything else: an error, a signal, a triple fault; the words say which.
    Crash(String),
}

/// Removes ANSI escape sequences (a log written with colours).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Tells how a VMM ended from its exit status (when it was our child) and the last lines
/// of its log (`vmm.log`), which say why it stopped or failed.
pub fn ending(status: Option<ExitStatus>, log_tail: &str) -> Ending {
    let log = plain(log_tail);
    let last_run = log
        .rsplit_once("--- tesserad starts the VMM")
        .map_or(log.as_str(), |(_, r)| r);
    let stopped = last_run
        .lines()
        .rev()
        .find(|l| l.contains("VM stopped"))
        .and_then(|l| l.split("reason=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string());
    let error = last_run
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .map(|l| {
            l.split_once("ERROR")
                .map_or(l, |(_, r)| r)
                .trim()
                .to_string()
        });
    if let Some(sig) = status.and_then(|s| s.signal()) {
        return Ending::Crash(format!("the VMM was killed by signal {sig}"));
    }
    match stopped.as_deref() {
        Some("PowerOff") => Ending::Requested,
        Some(r @ ("Reset" | "Shutdown")) => {
            Ending::GuestOff(format!("the guest powered off ({r})"))
        }
        Some(r) => Ending::Crash(format!("the VM stopped: {r}")),
        None => match (error, status.and_then(|s| s.code())) {
            (Some(e), _) => Ending::Crash(format!("the VMM failed: {e}")),
            (None, Some(c)) => Ending::Crash(format!("the VMM exited with status {c}")),
            // Not our child (adopted after a restart of tesserad): no exit status.
            (None, None) => Ending::Crash(
                "the VMM process ended without logging why (killed? it was adopted, so its \
                 exit status is unknown)"
                    .into(),
            ),
        },
    }
}

/// The last 8 KiB of a VM's `vmm.log`.
pub fn log_tail(dir: &RunDir) -> String {
    let Ok(data) = std::fs::read(dir.log()) else {
        return String::new();
    };
    let from = data.len().saturating_sub(8192);
    String::from_utf8_lossy(&data[from..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_seen_gone_before_its_reaper_recorded_it_still_gets_its_status() {
        use std::os::unix::process::ExitStatusExt;
        let exits = Exits::default();
        let late = exits.clone();
        // The reaper's insert comes a moment after the process left /proc.
        let reaper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            late.0.lock().unwrap().insert(42, ExitStatus::from_raw(9));
        });
        assert_eq!(exits.take(42), None, "the window this is about");
        let status = exits
            .take_ended(42, std::time::Duration::from_secs(2))
            .await;
        assert_eq!(status.and_then(|s| s.signal()), Some(9));
        reaper.join().unwrap();
        // Nothing comes for a pid that is not a child: None after the bound.
        let t = std::time::Instant::now();
        assert_eq!(
            exits
                .take_ended(43, std::time::Duration::from_millis(30))
                .await,
            None
        );
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
    }

    #[test]
    fn endings_are_told_apart() {
        let off = "--- tesserad starts the VMM (start 1) ---\n\u{1b}[32m INFO\u{1b}[0m tessera_vmm: VM stopped \u{1b}[3mreason\u{1b}[0m\u{1b}[2m=\u{1b}[0mReset first_instruction_us=5\n";
        assert!(matches!(ending(None, off), Ending::GuestOff(_)));
        let req = "INFO tessera_vmm: VM stopped reason=PowerOff\n";
        assert_eq!(ending(None, req), Ending::Requested);
        let tf = "INFO tessera_vmm: VM stopped reason=TripleFault\n";
        assert!(matches!(ending(None, tf), Ending::Crash(r) if r.contains("TripleFault")));
        let err = "ERROR tessera_vmm: opening disk: connection refused\n";
        assert!(matches!(ending(None, err), Ending::Crash(r) if r.contains("connection refused")));
        let killed = ExitStatus::from_raw(9);
        assert!(matches!(ending(Some(killed), req), Ending::Crash(r) if r.contains("signal 9")));
        // Only the last run counts.
        let two = format!("{req}--- tesserad starts the VMM (start 2) ---\n");
        assert!(matches!(ending(None, &two), Ending::Crash(_)));
    }
}
