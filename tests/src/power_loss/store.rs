//! A `tessera-store` whose data directory is on powerfs and whose sockets and log are
//! not (a socket inode on a filesystem that loses power would only add noise). Failures
//! to start are returned, not panicked: after a power cut, "the store refuses to start"
//! is a finding to report with the cut that caused it.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_nbd::Client;

use crate::powerfs::PowerFs;

/// A fresh powerfs holding an empty data directory (durably: it exists before the store
/// is installed into it), and a directory off powerfs for sockets and the log.
pub struct Rig {
    /// The filesystem.
    pub pfs: PowerFs,
    /// Where a store on it lives.
    pub setup: StoreSetup,
    /// The temporary directory holding both (removed on drop, after the unmount).
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Mounts powerfs in a new temporary directory.
    pub fn mount() -> Rig {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mnt = dir.path().join("mnt");
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&mnt).expect("mount point");
        std::fs::create_dir(&run_dir).expect("run directory");
        let pfs = PowerFs::mount(&mnt).expect("mount powerfs");
        let data_dir = mnt.join("store");
        std::fs::create_dir(&data_dir).expect("data directory");
        std::fs::File::open(&mnt)
            .and_then(|d| d.sync_all())
            .expect("sync the mount's root");
        Rig {
            pfs,
            setup: StoreSetup { data_dir, run_dir },
            dir,
        }
    }
}

/// The `tessera-store` binary: `POWER_LOSS_STORE_BIN` if set (to run the harness against
/// another build, e.g. while bisecting), else the one built next to the test.
pub fn store_bin() -> PathBuf {
    std::env::var_os("POWER_LOSS_STORE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::bin("tessera-store"))
}

/// Where one store lives and how it is tuned.
#[derive(Clone, Debug)]
pub struct StoreSetup {
    /// The data directory (on powerfs).
    pub data_dir: PathBuf,
    /// Directory for the sockets and the log (not on powerfs).
    pub run_dir: PathBuf,
}

impl StoreSetup {
    /// The NBD Unix socket.
    pub fn nbd_sock(&self) -> PathBuf {
        self.run_dir.join("nbd.sock")
    }

    /// The admin socket.
    pub fn admin_sock(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    /// The log of the latest start.
    pub fn log(&self) -> PathBuf {
        self.run_dir.join("store.log")
    }

    /// The tail of the latest start's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Runs an admin command (`tessera-store --admin-socket ... <args>`).
    pub fn admin(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(store_bin())
            .arg("--admin-socket")
            .arg(self.admin_sock())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "tessera-store {args:?} failed with {}:\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts `tessera-store serve` with extra arguments and waits until both sockets
    /// accept connections. On failure, says why with the log.
    pub fn start(&self, extra: &[String]) -> Result<RunningStore, String> {
        let _ = std::fs::remove_file(self.log());
        let log = std::fs::File::create(self.log()).map_err(|e| e.to_string())?;
        let child = Command::new(store_bin())
            .arg("--admin-socket")
            .arg(self.admin_sock())
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--no-tcp")
            .arg("--nbd-unix")
            .arg(self.nbd_sock())
            .args(extra)
            .env("TESSERA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawning tessera-store: {e}"))?;
        let mut store = RunningStore {
            child,
            setup: self.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = store.child.try_wait() {
                return Err(format!(
                    "tessera-store exited with {status} while starting; log:\n{}",
                    self.log_tail(30)
                ));
            }
            if UnixStream::connect(self.admin_sock()).is_ok()
                && UnixStream::connect(self.nbd_sock()).is_ok()
            {
                return Ok(store);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "tessera-store not ready after 30 s; log:\n{}",
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A started store; killed with SIGKILL when dropped.
pub struct RunningStore {
    child: Child,
    setup: StoreSetup,
}

impl RunningStore {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then waits for the process to be gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and a clean exit within 60 s.
    pub fn stop(mut self) -> Result<(), String> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => {
                    return Err(format!(
                        "tessera-store exited with {s} on SIGTERM; log:\n{}",
                        self.setup.log_tail(30)
                    ))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return Err("tessera-store did not stop within 60 s".into()),
            }
        }
    }

    /// Runs an admin command (`tessera-store --admin-socket ... <args>`).
    pub fn admin(&self, args: &[&str]) -> Result<String, String> {
        self.setup.admin(args)
    }

    /// A new NBD connection to `export`.
    pub fn connect(&self, export: &str) -> Result<Client, String> {
        Client::connect_unix(&self.setup.nbd_sock(), export).map_err(|e| e.to_string())
    }

    /// Reads all of `export` (its whole size) over one connection.
    pub fn read_all(&self, export: &str) -> Result<Vec<u8>, String> {
        let mut c = self.connect(export)?;
        let size = c.size() as usize;
        let mut out = vec![0u8; size];
        for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
            c.read((i << 20) as u64, chunk)
                .map_err(|e| format!("reading {export} at MiB {i}: {e}"))?;
        }
        let _ = c.disconnect();
        Ok(out)
    }
}

impl Drop for RunningStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
