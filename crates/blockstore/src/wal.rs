//! The write-ahead log: numbered segment files of checksummed records.
//!
//! Every write is appended here before it is acknowledged; a FLUSH is one `fdatasync` of
//! the active segment, after any segment sealed before it is synced. A rotation seals the
//! active segment and starts the next; writers go on into the next one while the sealed
//! one is synced, and a seal record in the next segment says the sync completed. The
//! checkpoint copies sealed segments into the layer files and deletes them.

use std::fs::{self, File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::catalog::sync_dir;
use crate::error::{Result, StoreError};
use crate::format::{RecordHeader, WAL_HEADER_LEN};
use crate::hooks::{Hooks, Point};

/// The segment being appended to.
struct Active {
    seg: u64,
    file: Arc<File>,
    /// Where the next record goes.
    pos: u64,
    /// Bytes of records other than seals and flush markers: a segment holding only
    /// those needs no checkpoint.
    logged: u64,
    /// Whether the last record is a flush marker (a flush then has nothing new to sync).
    tail_marker: bool,
}

/// A segment a rotation took out of service whose sync has not completed.
struct Unsealed {
    seg: u64,
    file: Arc<File>,
    /// Where its records end.
    len: u64,
}

/// How far the log is known durable.
struct Durable {
    /// Every record before `pos` in segment `seg`, and in earlier segments, is durable.
    seg: u64,
    pos: u64,
    /// Set by a rotation for the segment it took out of service; cleared once that
    /// segment is synced and its seal record written. While set, no flush succeeds.
    unsealed: Option<Unsealed>,
    /// The first sync that failed. A later sync succeeding proves nothing (the kernel
    /// may have dropped the dirty pages along with the error), so every flush and
    /// rotation fails from then on; the next start replays what the files hold.
    failed: Option<String>,
}

impl Durable {
    /// Fails if a sync failed before.
    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(StoreError::Io {
                context: format!(
                    "an earlier WAL sync failed ({why}); nothing is durable until restart"
                ),
                cause: std::io::Error::from_raw_os_error(nix::libc::EIO),
            }),
            None => Ok(()),
        }
    }

    /// Remembers a failed sync for good.
    fn fail<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        r
    }
}

/// The flushes of the moment (group commit): at most one of them, the *leader*, syncs
/// the log; the others wait on [`Wal::synced`] and find their records covered when it is
/// done, or one of them leads the next sync. Queued on `durable` instead, they would wake
/// one after another, each only once the one before it let go of the lock: on these
/// virtual CPUs every such hand-over costs a wake-up, and a placed overwrite at queue
/// depth 8 waited for seven of them.
struct Syncing {
    /// A flush is syncing the log (it holds or is about to take `durable`).
    leader: bool,
    /// How far the log is durable, as the last flush to finish found it.
    seg: u64,
    pos: u64,
    /// Flushes waiting for the leader (for tests).
    waiting: usize,
}

/// A flush leading the log's sync; when it is done (or failed), the waiting flushes are
/// woken to find themselves covered or to lead the next sync.
struct Lead<'a>(&'a Wal);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        self.0.syncing.lock().leader = false;
        self.0.synced.notify_all();
    }
}

/// The write-ahead log of one store.
///
/// Writers take only `active`, and only to write their record: no sync ever happens under
/// it. Flushes and the end of a rotation hold `durable` across their syncs (lock order:
/// `durable`, then `active`), so a flush waits for a sealed segment's sync, a writer never.
pub struct Wal {
    dir: PathBuf,
    active: Mutex<Active>,
    durable: Mutex<Durable>,
    /// The flushes of the moment: who syncs, and how far that left the log durable.
    syncing: Mutex<Syncing>,
    /// Notified when a leader's sync is done.
    synced: Condvar,
    /// Whether any sync of the log failed (set with `Durable::failed`), so that a flush
    /// whose records an earlier sync covered still fails, as it does holding `durable`.
    failed: AtomicBool,
    /// One rotation at a time.
    rotating: Mutex<()>,
    /// Sealed segments not yet removed, with their lengths.
    sealed: Mutex<Vec<(u64, u64)>>,
    /// Files of checkpointed segments kept for reuse as the next segments.
    spares: Mutex<Vec<PathBuf>>,
    hooks: Hooks,
}

/// A record read back from a segment.
pub struct ReadRecord {
    /// The record's header.
    pub header: RecordHeader,
    /// For data and placed records: `nblocks` hashes.
    pub hashes: Vec<u8>,
    /// For data records: the block contents.
    pub data: Vec<u8>,
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.wal"))
}

/// How many checkpointed segment files are kept for reuse.
///
/// Appending to a new file changes its size and allocates blocks, so every `fdatasync` of
/// it commits the filesystem's journal, which on ext4 (data=ordered) also waits for
/// other files' newly allocated data, such as a checkpoint's copy or a large placed
/// write. Overwriting an old segment's blocks changes no metadata, so the sync writes
/// just the log's pages. PostgreSQL recycles its WAL segments for the same reason.
const SPARES: usize = 2;

fn spare_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("spare-{seg:016x}.wal"))
}

/// The spare segment files an earlier run kept (at most [`SPARES`], the newest; others
/// are removed), with the highest segment number any of them held. A spare is named for
/// the last segment it was, and its records carry that number or lower ones, so a reused
/// spare needs a segment number above it: replay then stops at its first old record.
fn load_spares(dir: &Path) -> Result<(Vec<PathBuf>, u64)> {
    let rd =
        fs::read_dir(dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for ent in rd.flatten() {
        let name = ent.file_name();
        let Some(stem) = name
            .to_str()
            .and_then(|n| n.strip_prefix("spare-"))
            .and_then(|n| n.strip_suffix(".wal"))
        else {
            continue;
        };
        match u64::from_str_radix(stem, 16) {
            Ok(seg) => found.push((seg, ent.path())),
            Err(_) => fs::remove_file(ent.path())
                .map_err(|e| StoreError::io(format!("removing {}", ent.path().display()), e))?,
        }
    }
    found.sort_unstable();
    let highest = found.last().map_or(0, |(seg, _)| *seg);
    let keep = found.split_off(found.len().saturating_sub(SPARES));
    for (_, p) in found {
        fs::remove_file(&p).map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
    }
    Ok((keep.into_iter().map(|(_, p)| p).collect(), highest))
}

/// The most a segment file is filled with zeros ahead of its records (see
/// [`Wal::new_segment`]).
const ZERO_FILL_MAX: u64 = 256 << 20;

/// Extends `f` with zeros to `len` bytes (if shorter) and syncs it. On failure (a full
/// disk) it is cut back to its length before, giving the space back.
fn zero_fill(f: &File, len: u64) -> std::io::Result<()> {
    let was = f.metadata()?.len();
    if was >= len {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min((len - was) as usize)];
    let mut at = was;
    let filled = (|| {
        while at < len {
            let n = zeros.len().min((len - at) as usize);
            f.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        f.sync_data()
    })();
    if filled.is_err() {
        let _ = f.set_len(was);
    }
    filled
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut segs = Vec::new();
    let rd =
        fs::read_dir(dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        let name = ent.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".wal")) else {
            continue;
        };
        if let Ok(n) = u64::from_str_radix(stem, 16) {
            segs.push(n);
        }
    }
    segs.sort_unstable();
    Ok(segs)
}

impl Wal {
    /// Starts a new, empty segment numbered `seg` in `dir`, or higher: above every spare
    /// file an earlier run kept, the first of which it reuses.
    pub fn create(dir: &Path, seg: u64) -> Result<Wal> {
        let (spares, highest) = load_spares(dir)?;
        let seg = seg.max(highest + 1);
        let spares = Mutex::new(spares);
        let file = Self::new_segment(dir, seg, &spares, 0)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            active: Mutex::new(Active {
                seg,
                file: Arc::new(file),
                pos: 0,
                logged: 0,
                tail_marker: false,
            }),
            durable: Mutex::new(Durable {
                seg,
                pos: 0,
                unsealed: None,
                failed: None,
            }),
            syncing: Mutex::new(Syncing {
                leader: false,
                seg,
                pos: 0,
                waiting: 0,
            }),
            synced: Condvar::new(),
            failed: AtomicBool::new(false),
            rotating: Mutex::new(()),
            sealed: Mutex::new(Vec::new()),
            spares,
            hooks: Hooks::default(),
        })
    }

    /// Makes the file of segment `seg`: a spare renamed, or a new file, filled with
    /// zeros up to `zero_to` bytes (at most [`ZERO_FILL_MAX`]) and synced.
    ///
    /// A spare still holds its earlier records past where the new ones end; they carry
    /// lower segment numbers, so replay stops at the first of them (`SegmentEnd::Stale`),
    /// as it does at the zeros. Appending inside a file's length changes no metadata: an
    /// `fdatasync` after an append that grew the file also writes its inode (and on a
    /// journaling filesystem commits the journal), one that only overwrote does not
    /// (130 µs against 85 µs on this project's disk; BENCHMARKS.md, issue #9, session 23).
    fn new_segment(
        dir: &Path,
        seg: u64,
        spares: &Mutex<Vec<PathBuf>>,
        zero_to: u64,
    ) -> Result<File> {
        let p = seg_path(dir, seg);
        let spare = spares.lock().pop();
        let reused = spare.and_then(|sp| match fs::rename(&sp, &p) {
            Ok(()) => Some(()),
            Err(e) => {
                tracing::debug!(error = %e, spare = %sp.display(), "could not reuse a WAL segment file");
                None
            }
        });
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(reused.is_none())
            .open(&p)
            .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
        // Only a speed-up: on a full disk the file stays as it was (appends grow it).
        if let Err(e) = zero_fill(&f, zero_to.min(ZERO_FILL_MAX)) {
            tracing::debug!(error = %e, segment = seg, "could not fill a WAL segment file with zeros ahead");
        }
        if let Err(e) = sync_dir(dir) {
            // Not in use yet: remove it so a retry can create it again.
            let _ = fs::remove_file(&p);
            return Err(e);
        }
        Ok(f)
    }

    /// Appends one record and, still in order with other appends, runs `then(segment)`.
    ///
    /// `then` runs under the log's lock so that the order in which writers publish their
    /// blocks equals the order of their records: replay after a crash and the live state
    /// then agree on which of two writes to a block came last. On error nothing is
    /// published and the next record overwrites the partial one.
    pub fn append<T>(
        &self,
        header: &RecordHeader,
        hashes: &[u8],
        data: &[u8],
        then: impl FnOnce(u64) -> T,
    ) -> Result<(T, u64)> {
        let mut a = self.active.lock();
        let len = Self::write_record(&mut a, header, hashes, data)?;
        a.logged += len;
        a.tail_marker = false;
        let out = then(a.seg);
        Ok((out, a.pos))
    }

    /// Writes one record at the end of the active segment. Returns its length.
    fn write_record(
        a: &mut Active,
        header: &RecordHeader,
        hashes: &[u8],
        data: &[u8],
    ) -> Result<u64> {
        let mut hdr = *header;
        hdr.segment = a.seg;
        let head = hdr.encode(hashes);
        let parts = [
            IoSlice::new(&head),
            IoSlice::new(hashes),
            IoSlice::new(data),
        ];
        let len = (head.len() + hashes.len() + data.len()) as u64;
        if let Err(e) = write_all_vectored_at(&a.file, &parts, a.pos) {
            // Cut the partial record off so a replay does not stop early before later,
            // complete records. Failing that, the next append overwrites it anyway.
            let _ = a.file.set_len(a.pos);
            return Err(StoreError::io(
                format!("appending to WAL segment {}", a.seg),
                e,
            ));
        }
        a.pos += len;
        Ok(len)
    }

    /// The test points of the log.
    #[cfg(test)]
    pub(crate) fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The active segment's file and where its records end.
    #[cfg(test)]
    pub(crate) fn active_end(&self) -> (PathBuf, u64) {
        let a = self.active.lock();
        (seg_path(&self.dir, a.seg), a.pos)
    }

    /// Bytes of records (other than seals) in the active segment.
    pub fn active_len(&self) -> u64 {
        self.active.lock().logged
    }

    /// Bytes in all segments not yet checkpointed and removed.
    pub fn unapplied(&self) -> u64 {
        let active = self.active.lock().pos;
        active + self.sealed.lock().iter().map(|(_, len)| len).sum::<u64>()
    }

    /// Makes every record appended so far durable. Concurrent callers share one sync:
    /// while one syncs, the others wait for it, and one of those it did not cover syncs
    /// next for all of them (see [`Syncing`]).
    pub fn sync(&self) -> Result<()> {
        let mine = {
            let a = self.active.lock();
            (a.seg, a.pos)
        };
        {
            let mut s = self.syncing.lock();
            loop {
                if (s.seg, s.pos) >= mine && !self.failed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if !s.leader {
                    s.leader = true;
                    break;
                }
                s.waiting += 1;
                self.synced.wait(&mut s);
                s.waiting -= 1;
            }
        }
        // Whatever happens to this sync, the next flush may lead.
        let _lead = Lead(self);
        let upto = self.sync_as_leader()?;
        let mut s = self.syncing.lock();
        if upto > (s.seg, s.pos) {
            (s.seg, s.pos) = upto;
        }
        Ok(())
    }

    /// The sync of a flush that leads: every record appended before it took `durable`,
    /// its own and those of the flushes waiting for it. Returns how far the log is
    /// durable.
    fn sync_as_leader(&self) -> Result<(u64, u64)> {
        let mut d = self.durable.lock();
        d.check()?;
        // Records in the active segment count only once every earlier one is durable.
        self.seal(&mut d)?;
        // Read under `durable`: every record appended until now is written whole, so the
        // sync below covers the flushes that queued behind this one.
        let (seg, pos, file, tail_marker) = {
            let a = self.active.lock();
            (a.seg, a.pos, a.file.clone(), a.tail_marker)
        };
        let only_marker = tail_marker && d.seg == seg && d.pos + WAL_HEADER_LEN as u64 == pos;
        if (d.seg, d.pos) >= (seg, pos) || only_marker {
            return Ok((d.seg, d.pos));
        }
        let synced = self
            .hooks
            .at(Point::LogSync)
            .map_err(|e| StoreError::io("test point", e))
            .and_then(|()| {
                file.sync_data()
                    .map_err(|e| StoreError::io(format!("syncing WAL segment {seg}"), e))
            });
        self.fail(&mut d, synced)?;
        d.seg = seg;
        d.pos = pos;
        // Say so in the log: recovery then knows a bad record before this point is
        // damage, not a crash's torn tail. Unsynced: the next sync makes it durable. The
        // flush has succeeded either way, so a failure to append is only logged.
        let mut a = self.active.lock();
        match Self::write_record(&mut a, &RecordHeader::flushed(seg, pos), &[], &[]) {
            Ok(_) => a.tail_marker = true,
            Err(e) => tracing::debug!(error = %e, "could not log a flush marker"),
        }
        Ok((seg, pos))
    }

    /// Remembers a failed sync for good, in `durable` and for the flushes that do not
    /// take it.
    fn fail<T>(&self, d: &mut Durable, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        d.fail(r)
    }

    /// Seals the active segment (making it durable) and starts the next one. Returns the
    /// number of the newest sealed segment, or `None` when none was ever sealed.
    ///
    /// Writers go on into the next segment while the sealed one is synced: no sync
    /// happens under the lock they take. Flushes wait until the sealed segment is durable.
    pub fn rotate(&self) -> Result<Option<u64>> {
        let _one = self.rotating.lock();
        // A seal an earlier rotation could not finish comes first.
        self.seal(&mut self.durable.lock())?;
        let (seg, len) = {
            let a = self.active.lock();
            if a.logged == 0 {
                return Ok(a.seg.checked_sub(1));
            }
            (a.seg, a.pos)
        };
        // Creating the next segment (zeros as far as this one reached, the best guess of
        // how far the next will) syncs it and the directory: done before taking any lock.
        let file = Arc::new(Self::new_segment(&self.dir, seg + 1, &self.spares, len)?);
        let mut d = self.durable.lock();
        {
            let mut a = self.active.lock();
            let next = Active {
                seg: seg + 1,
                file,
                pos: 0,
                logged: 0,
                tail_marker: false,
            };
            let old = std::mem::replace(&mut *a, next);
            self.sealed.lock().push((old.seg, old.pos));
            d.unsealed = Some(Unsealed {
                seg: old.seg,
                file: old.file,
                len: old.pos,
            });
        }
        self.seal(&mut d)?;
        Ok(Some(seg))
    }

    /// Finishes a rotation: syncs the segment it took out of service, then writes that
    /// segment's seal record into the active one and syncs that too.
    ///
    /// The seal record tells recovery the segment was synced whole, so a bad record in it
    /// is damage, not a crash. It is durable before the rotation returns (so before the
    /// checkpoint copies anything of the sealed segment) and before any flush that
    /// waited for it: a segment without its seal was never copied into layer files, and
    /// nothing logged after it was flushed.
    fn seal(&self, d: &mut Durable) -> Result<()> {
        d.check()?;
        let Some(u) = &d.unsealed else {
            return Ok(());
        };
        let synced = self
            .hooks
            .at(Point::SealSync(u.seg))
            .map_err(|e| StoreError::io("test point", e))
            .and_then(|()| {
                u.file
                    .sync_data()
                    .map_err(|e| StoreError::io(format!("syncing WAL segment {}", u.seg), e))
            });
        let (sealed_seg, sealed_len) = (u.seg, u.len);
        self.fail(d, synced)?;
        let (seg, pos, file) = {
            let mut a = self.active.lock();
            debug_assert_eq!(a.seg, sealed_seg + 1, "a seal goes into the next segment");
            Self::write_record(
                &mut a,
                &RecordHeader::seal(sealed_seg, sealed_len),
                &[],
                &[],
            )?;
            (a.seg, a.pos, a.file.clone())
        };
        let synced = file
            .sync_data()
            .map_err(|e| StoreError::io(format!("syncing WAL segment {seg}"), e));
        self.fail(d, synced)?;
        if (d.seg, d.pos) < (seg, pos) {
            d.seg = seg;
            d.pos = pos;
        }
        d.unsealed = None;
        Ok(())
    }

    /// Deletes sealed segments up to and including `upto`.
    pub fn remove_upto(&self, upto: u64) -> Result<()> {
        let active = self.active.lock().seg;
        for seg in list_segments(&self.dir)? {
            if seg <= upto && seg < active {
                let p = seg_path(&self.dir, seg);
                let mut spares = self.spares.lock();
                if spares.len() < SPARES {
                    let sp = spare_path(&self.dir, seg);
                    fs::rename(&p, &sp).map_err(|e| {
                        StoreError::io(format!("keeping {} for reuse", p.display()), e)
                    })?;
                    spares.push(sp);
                } else {
                    fs::remove_file(&p)
                        .map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
                }
            }
        }
        self.sealed.lock().retain(|(seg, _)| *seg > upto);
        sync_dir(&self.dir)
    }
}

/// Writes all of `parts` at `off`, continuing after short writes.
pub(crate) fn write_all_vectored_at(
    f: &File,
    parts: &[IoSlice<'_>],
    mut off: u64,
) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Rebuild the slice list past what is written; short writes are rare on files.
        let mut skip = done;
        let mut rest: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            rest.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        let off_i =
            i64::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EFBIG))?;
        match nix::sys::uio::pwritev(f.as_fd(), &rest, off_i) {
            Ok(0) => return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)),
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

mod replay;
#[cfg(test)]
mod tests;

pub use replay::{flushed_beyond, layer_at, remove_segments, replay_segment, seal_of, SegmentEnd};
