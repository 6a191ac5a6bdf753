//! The metrics history on disk (`<data_dir>/metrics-history.journal`, mode 0600 like the
//! other state files), so a restarted node still serves the hour before (format in
//! `format`). Each new point is appended and synced; once the file holds [`POINTS`]
//! appended records beyond its last rewrite, or after any failed write, it is rewritten
//! whole from the history in memory (a temporary file, synced, renamed over it), so it
//! never holds more than twice an hour and a record torn by a full disk is gone at the
//! next rewrite. All of it runs on its own thread behind a short queue: a disk that is
//! slow or full costs the file's copy, never the daemon's time or the history served.

pub mod format;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use tessera_api::MetricsPoint;

use super::history::{History, POINTS};

/// The file's name in the data directory.
pub const FILE: &str = "metrics-history.journal";
/// What is read of a file at most: twice an hour of points with their interfaces is
/// about 1 MiB; anything far beyond is not ours to load.
const READ_LIMIT: u64 = 16 << 20;
/// Points waiting for the writer thread before new ones are dropped (the next write then
/// rewrites the file from memory, so a dropped point is only late on disk).
const QUEUE: usize = 16;

/// The points kept in the file at `path`, oldest first. A file that is missing holds
/// none; a damaged one gives its good records with a warning; one that cannot be read or
/// is no history gives none with a warning (and is moved aside, not lost, for the next
/// rewrite not to replace it).
pub fn load(path: &Path) -> Vec<MetricsPoint> {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|f| f.take(READ_LIMIT).read_to_end(&mut bytes));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "metrics history not read: starting a new hour");
            return Vec::new();
        }
    }
    match format::decode(&bytes) {
        Ok(d) => {
            if let Some(problem) = &d.first_problem {
                tracing::warn!(
                    path = %path.display(),
                    points = d.points.len(),
                    skipped_records = d.bad_records,
                    skipped_bytes = d.bad_bytes,
                    first_problem = %problem,
                    "metrics history damaged: its good records are kept, the rest skipped"
                );
            }
            d.points
        }
        Err(e) => {
            let aside = path.with_extension("unreadable");
            let moved = std::fs::rename(path, &aside);
            tracing::warn!(
                path = %path.display(),
                error = %e,
                moved_to = %aside.display(),
                moved = moved.is_ok(),
                "metrics history file not read: starting a new hour"
            );
            Vec::new()
        }
    }
}

/// The file and what was written to it since its last rewrite.
struct Journal {
    path: PathBuf,
    /// Open for appending after a good rewrite; `None` makes the next write a rewrite.
    file: Option<File>,
    appended: usize,
    /// The newest point on disk: a point already in a rewrite is not appended again.
    newest_ms: Option<u64>,
}

impl Journal {
    fn new(path: PathBuf) -> Journal {
        Journal {
            path,
            file: None,
            appended: 0,
            newest_ms: None,
        }
    }

    /// Writes `p`, new in the history: appended, or the file rewritten with `all()` (the
    /// history in memory, `p` included) when it is due or the last write failed.
    fn record(
        &mut self,
        p: &MetricsPoint,
        all: impl FnOnce() -> Vec<MetricsPoint>,
    ) -> std::io::Result<()> {
        if self.newest_ms.is_some_and(|n| n >= p.t_ms) {
            return Ok(());
        }
        match &mut self.file {
            Some(f) if self.appended < POINTS => {
                let done = f.write_all(&format::encode(p)).and_then(|_| f.sync_data());
                if done.is_err() {
                    // A torn record may be at the end now: the next write replaces the file.
                    self.file = None;
                }
                done?;
                self.appended += 1;
                self.newest_ms = Some(p.t_ms);
                Ok(())
            }
            _ => self.rewrite(&all()),
        }
    }

    /// Replaces the file with one holding `points`: a temporary file written and synced,
    /// renamed over the old one, the directory synced. On failure the old file stays as
    /// it was.
    fn rewrite(&mut self, points: &[MetricsPoint]) -> std::io::Result<()> {
        self.file = None;
        let tmp = self.path.with_extension("tmp");
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&format::file(points))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            std::fs::OpenOptions::new().append(true).open(&self.path)
        })();
        match written {
            Ok(f) => {
                self.file = Some(f);
                self.appended = 0;
                self.newest_ms = points.last().map(|p| p.t_ms);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Hands new points to the writer thread.
pub struct Writer {
    queue: Option<SyncSender<MetricsPoint>>,
    /// A point was dropped (the queue was full): the next write rewrites.
    dropped: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the thread that keeps the file at `path` for `history`: it rewrites the
    /// file at once (dropping what a damaged file held beyond its good records, and points
    /// older than the hour), then writes each point [`Writer::record`] gives it.
    pub fn start(path: PathBuf, history: History) -> Writer {
        let (tx, rx) = sync_channel::<MetricsPoint>(QUEUE);
        let dropped = Arc::new(AtomicBool::new(false));
        let missed = dropped.clone();
        let all = move || history.lock().unwrap_or_else(|p| p.into_inner()).all();
        let spawned = std::thread::Builder::new()
            .name("metrics-journal".into())
            .spawn(move || {
                let mut j = Journal::new(path);
                let mut failing = j.rewrite(&all()).err().map(|e| e.to_string());
                if let Some(e) = &failing {
                    tracing::warn!(path = %j.path.display(), error = %e, "metrics history not written to disk: it is kept in memory and written when the disk allows");
                }
                while let Ok(p) = rx.recv() {
                    if missed.swap(false, Ordering::Relaxed) {
                        j.file = None;
                    }
                    match (j.record(&p, &all), &failing) {
                        (Ok(()), Some(_)) => {
                            tracing::info!(path = %j.path.display(), "metrics history written to disk again");
                            failing = None;
                        }
                        (Err(e), None) => {
                            tracing::warn!(path = %j.path.display(), error = %e, "metrics history not written to disk: it is kept in memory and written when the disk allows");
                            failing = Some(e.to_string());
                        }
                        _ => {}
                    }
                }
            });
        let queue = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for the metrics history file: it is kept in memory only");
                None
            }
        };
        Writer { queue, dropped }
    }

    /// Queues `p` for the file without waiting.
    pub fn record(&self, p: MetricsPoint) {
        if let Some(q) = &self.queue {
            if let Err(TrySendError::Full(_)) = q.try_send(p) {
                self.dropped.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;
    use crate::metrics::history::Ring;

    fn sample(i: u64) -> serde_json::Value {
        json!({"cpu_percent": 1.0, "net_rx_bytes": i * 100,
               "interfaces": [{"name": "eth0", "rx_bytes": i, "tx_bytes": i}]})
    }

    fn ring_of(n: u64) -> Ring {
        let mut r = Ring::default();
        for i in 1..=n {
            r.push(i * 10_000, &sample(i));
        }
        r
    }

    #[test]
    fn points_are_appended_then_the_file_rewritten_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE);
        assert!(load(&path).is_empty(), "no file, no points");
        let mut ring = Ring::default();
        let mut j = Journal::new(path.clone());
        let mut rewrites = 0;
        for i in 1..=3 * POINTS as u64 {
            ring.push(i * 10_000, &sample(i));
            let p = ring.latest().unwrap().clone();
            j.record(&p, || {
                rewrites += 1;
                ring.all()
            })
            .unwrap();
            // A point already in the file (written by a rewrite) is not written again.
            j.record(&p, || unreachable!()).unwrap();
        }
        assert_eq!(rewrites, 3, "the first write and every POINTS appends");
        let all = ring.all();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load(&path);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(format::HEADER.as_bytes()));
        // Rewritten every POINTS appends: never more than twice an hour on disk.
        let records = bytes.iter().filter(|b| **b == b'\n').count() - 1;
        assert!(records <= 2 * POINTS, "{records} records");
        assert!(records >= POINTS, "{records} records");
        assert_eq!(
            back[back.len() - POINTS..],
            all[..],
            "the last hour is all there"
        );
        assert_eq!(back.last().unwrap().t_ms, 3 * POINTS as u64 * 10_000);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_full_disk_loses_no_point_once_it_has_room_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE);
        let all = ring_of(5).all();
        let mut j = Journal::new(path.clone());
        j.record(&all[0], || all[..1].to_vec()).unwrap();
        j.record(&all[1], || all[..2].to_vec()).unwrap();
        // The disk fills up: /dev/full refuses every write with ENOSPC.
        j.file = Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        let e = j.record(&all[2], || unreachable!()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert_eq!(load(&path), all[..2], "what was written stays readable");
        // With room again the next point rewrites the file with the history in memory.
        j.record(&all[3], || all[..4].to_vec()).unwrap();
        j.record(&all[4], || unreachable!()).unwrap();
        assert_eq!(load(&path), all);
        // A rewrite that cannot be made (the directory is gone) fails and leaves no
        // temporary file behind.
        let mut gone = Journal::new(d.path().join("no-such-dir").join(FILE));
        assert!(gone.record(&all[0], || all[..1].to_vec()).is_err());
        assert!(!d.path().join("no-such-dir").exists());
    }

    #[test]
    fn a_damaged_file_gives_its_good_points_and_a_foreign_one_is_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE);
        let all = ring_of(4).all();
        let mut bytes = format::file(&all);
        bytes.truncate(bytes.len() - 7);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(load(&path), all[..3]);
        std::fs::write(&path, b"{\"not\": \"a history\"}\n").unwrap();
        assert!(load(&path).is_empty());
        assert!(!path.exists());
        assert_eq!(
            std::fs::read(path.with_extension("unreadable")).unwrap(),
            b"{\"not\": \"a history\"}\n"
        );
        // A directory where the file should be: read fails, nothing panics.
        std::fs::create_dir(&path).unwrap();
        assert!(load(&path).is_empty());
    }
}
