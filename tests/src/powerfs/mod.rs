//! powerfs: a FUSE filesystem in memory that can lose power. It remembers, for every file
//! and directory, what is durable and what no sync covered yet, and on a power cut keeps
//! only the durable state (or a random torn part of the rest). See `docs/power-loss.md`.
//!
//! A cut unmounts, drops what was not durable, and mounts again: the kernel's page cache
//! and dentry cache die with the mount, so nothing read afterwards comes from before the
//! cut. Whoever cuts must first have stopped every process using the mount (the store is
//! killed with SIGKILL: a real power loss gives it no say either).

pub mod model;

mod fuse;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fuser::{BackgroundSession, Config, MountOption};
use rand::SeedableRng;

pub use model::{CutMode, CutReport, SyncCounts};

use fuse::PowerFuse;
use model::Model;

/// Whether powerfs can run here; when not, prints `test`'s SKIP line (with the reason)
/// and returns false.
pub fn available_or_skip(test: &str) -> bool {
    match unavailable() {
        Some(reason) => {
            crate::skip(test, &reason);
            false
        }
        None => true,
    }
}

/// Why powerfs cannot run here, if it cannot: it needs root (to mount without
/// `fusermount`) and `/dev/fuse`.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root to mount a FUSE filesystem".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        return Some("needs /dev/fuse".into());
    }
    None
}

/// A mounted powerfs.
pub struct PowerFs {
    mountpoint: PathBuf,
    model: Arc<Mutex<Model>>,
    session: Option<BackgroundSession>,
    /// The mount's FUSE connection (its name under `/sys/fs/fuse/connections`), if
    /// `/proc/self/mountinfo` showed it: to abort it when an unmount leaves it alive.
    connection: Option<u64>,
    epoch: SystemTime,
}

/// How long the request loops may take to end by themselves once the mount is gone.
const LOOPS_END: Duration = Duration::from_secs(2);
/// How long they may take once their connection was aborted.
const ABORTED_LOOPS_END: Duration = Duration::from_secs(10);
/// Where the kernel lists FUSE connections (the `fusectl` filesystem).
const FUSE_CONNECTIONS: &str = "/sys/fs/fuse/connections";

impl PowerFs {
    /// Mounts an empty powerfs on `mountpoint` (an existing directory).
    pub fn mount(mountpoint: &Path) -> io::Result<PowerFs> {
        let mut fs = PowerFs {
            mountpoint: mountpoint.to_path_buf(),
            model: Arc::new(Mutex::new(Model::default())),
            session: None,
            connection: None,
            epoch: SystemTime::now(),
        };
        fs.mount_session()?;
        Ok(fs)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mount_session(&mut self) -> io::Result<()> {
        let fs = PowerFuse {
            model: self.model.clone(),
            epoch: self.epoch,
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("powerfs".into()),
            MountOption::Subtype("powerfs".into()),
            MountOption::NoAtime,
        ];
        // Several request loops: the store's writers, flushes and checkpoint overlap, and
        // a sync with latency must not hold up the others.
        cfg.n_threads = Some(4);
        // Resolved before mounting, so that no request reaches the filesystem for it.
        let resolved = self.mountpoint.canonicalize()?;
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &cfg)?);
        self.connection = connection_of(&resolved);
        Ok(())
    }

    /// Unmounts (the model stays) and waits, boundedly, for the request loops to end.
    /// Fails if something still uses the mount, or if the loops outlive even an abort of
    /// their connection (then they are left running, detached: never a hang).
    pub fn unmount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // The last close of a killed process's files may still be settling.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = umount(&self.mountpoint) {
            if Instant::now() >= deadline {
                self.session = Some(session);
                return Err(io::Error::other(format!(
                    "unmounting {}: {e} (is a process still using it?)",
                    self.mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The kernel ends the connection when the mount's last copy goes, and the request
        // loops then read ENODEV and return. A copy can outlive ours: a mount namespace
        // made (unshare, ip netns exec, a container or image build) while this was mounted
        // holds one, and with private propagation our unmount does not reach it; the
        // loops would wait for requests as long as it lives. So they get a moment to end
        // by themselves, then the connection is aborted (what `fusectl` is for): its reads
        // fail with ENODEV, and the copy's users get ENOTCONN.
        if !ended_within(&session, LOOPS_END) {
            let aborted = self.connection.map(abort_connection);
            if !ended_within(&session, ABORTED_LOOPS_END) {
                return Err(io::Error::other(format!(
                    "powerfs on {}: its FUSE request loops still run {:?} after the unmount \
                     (abort of connection {:?}: {aborted:?}); left running",
                    self.mountpoint.display(),
                    LOOPS_END + ABORTED_LOOPS_END,
                    self.connection,
                )));
            }
            eprintln!(
                "powerfs on {}: the FUSE connection outlived the unmount (another mount \
                 namespace holds a copy?); aborted connection {:?}: {aborted:?}",
                self.mountpoint.display(),
                self.connection
            );
        }
        session.join()
    }

    /// Syncs stop (`true`) or start again (`false`) making anything durable, while still
    /// answering success: "sync made a no-op".
    pub fn set_lying_sync(&self, lying: bool) {
        self.model().lying_sync = lying;
    }

    /// Makes every sync take `latency` before it makes anything durable.
    pub fn set_sync_latency(&self, latency: Duration) {
        self.model().sync_latency = latency;
    }

    /// How many syncs were honoured and ignored so far.
    pub fn sync_counts(&self) -> SyncCounts {
        self.model().syncs
    }

    /// Loses power: unmounts, keeps only what `mode` lets survive (random choices drawn
    /// from `seed`), and mounts the result again. Every process using the mount must be
    /// gone.
    pub fn power_cut(&mut self, mode: CutMode, seed: u64) -> io::Result<CutReport> {
        self.unmount()?;
        let report = {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            self.model().cut(mode, &mut rng)
        };
        self.mount_session()?;
        Ok(report)
    }
}

/// `umount(2)` through the `umount` program: the harness's `nix` has no mount feature,
/// and an unmount per cycle costs little next to a store restart.
fn umount(path: &Path) -> io::Result<()> {
    let out = Command::new("umount").arg(path).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether the session thread has returned, polled until `within` has passed.
fn ended_within(session: &BackgroundSession, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while !session.guard.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The FUSE connection of the filesystem mounted on `mountpoint` (a resolved path): the
/// device number of the topmost mount there, as `/sys/fs/fuse/connections` names it (the
/// kernel's `MKDEV(major, minor)`), from `/proc/self/mountinfo`.
fn connection_of(mountpoint: &Path) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (Path::new(f.get(4)?) == mountpoint).then_some(*f.get(2)?)
        })
        .next_back()
        .and_then(|dev| {
            let (major, minor) = dev.split_once(':')?;
            Some((major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?)
        })
}

/// Aborts FUSE connection `id` (`fusectl`, mounted first if it is not).
fn abort_connection(id: u64) -> io::Result<()> {
    let dir = Path::new(FUSE_CONNECTIONS);
    if std::fs::read_dir(dir)?.next().is_none() {
        // Empty: fusectl is not mounted here (a container's /sys). Mounting it changes
        // nothing for anyone else; systemd mounts it at boot on most machines.
        let out = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(dir)
            .output()?;
        // Another powerfs may have mounted it just now: only still empty is a failure.
        if !out.status.success() && std::fs::read_dir(dir)?.next().is_none() {
            return Err(io::Error::other(format!(
                "mounting fusectl on {FUSE_CONNECTIONS}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    match std::fs::write(dir.join(id.to_string()).join("abort"), "1") {
        // Gone meanwhile: the connection ended by itself.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            // Leave no mount behind a failed test; the session thread ends with it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}
