//! A layer's zero ranges on disk: `<id>.zeros`, a header and an append-only log of
//! checksummed range records, rewritten whole when it has grown well past what it
//! describes; and the directory marker that says every layer has such a file.
//!
//! Format (little endian, 32-byte units): a header (magic `TZRS`, version u32, layer u64,
//! 8 reserved bytes, 8 bytes of blake3 over the first 24), then records (first block u64,
//! block count u64, op u8, 7 reserved bytes, 8 bytes of blake3 over the layer id and the
//! first 24 bytes). Op 1 makes the blocks zero ranges, op 2 removes them. A record whose
//! checksum fails ends the log: it and everything after it is a tail a crash tore (the
//! WAL still holds the fills it was about) and is cut off at open, so later appends never
//! follow bytes that once failed.
//!
//! Why a log and not the whole set rewritten on every change: a trim must not wait for a
//! file rename and directory sync. Why a separate file and not a header in `.sums`: the
//! table is indexed by block number, with no room for one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ranges::RangeSet;
use crate::catalog::LayerId;

/// Length of the header and of every record.
pub(super) const RECORD_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"TZRS";
const VERSION: u32 = 1;
const OP_ZERO: u8 = 1;
const OP_CLEAR: u8 = 2;
/// The log is rewritten once it holds more records than this and than
/// [`REWRITE_FACTOR`] times the ranges it describes.
const REWRITE_MIN_RECORDS: u64 = 1024;
const REWRITE_FACTOR: u64 = 4;

/// What a record does to its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// The blocks become zero ranges.
    Zero,
    /// The blocks stop being zero ranges.
    Clear,
}

/// The path of layer `id`'s zero-range file under `dir`.
pub(super) fn path(dir: &Path, id: LayerId) -> PathBuf {
    dir.join(format!("{id:016x}.zeros"))
}

fn tmp_path(dir: &Path, id: LayerId) -> PathBuf {
    dir.join(format!("{id:016x}.zeros.tmp"))
}

fn checksum(id: LayerId, bytes: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn header(id: LayerId) -> [u8; RECORD_LEN] {
    let mut h = [0u8; RECORD_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&id.to_le_bytes());
    let sum = checksum(id, &h[..24]);
    h[24..].copy_from_slice(&sum);
    h
}

/// The bytes of one record.
pub(super) fn encode(id: LayerId, first: u64, count: u64, op: Op) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..8].copy_from_slice(&first.to_le_bytes());
    r[8..16].copy_from_slice(&count.to_le_bytes());
    r[16] = match op {
        Op::Zero => OP_ZERO,
        Op::Clear => OP_CLEAR,
    };
    let sum = checksum(id, &r[..24]);
    r[24..].copy_from_slice(&sum);
    r
}

/// One record, or `None` when it is torn, damaged or not of this layer.
pub(super) fn decode(id: LayerId, r: &[u8]) -> Option<(u64, u64, Op)> {
    if r.len() != RECORD_LEN || r[24..] != checksum(id, &r[..24]) || r[17..24] != [0; 7] {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&r[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (first, count) = (word(0), word(8));
    first.checked_add(count)?;
    let op = match r[16] {
        OP_ZERO => Op::Zero,
        OP_CLEAR => Op::Clear,
        _ => return None,
    };
    Some((first, count, op))
}

fn damaged(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Writes a new zero-range file for layer `id` holding `ranges`, durably: through a
/// temporary file, synced, then renamed over `path` (the directory is not synced here).
fn write_whole(dir: &Path, id: LayerId, ranges: &RangeSet) -> io::Result<File> {
    let tmp = tmp_path(dir, id);
    let mut buf = Vec::with_capacity((ranges.len() + 1) * RECORD_LEN);
    buf.extend_from_slice(&header(id));
    for (s, e) in ranges.iter() {
        buf.extend_from_slice(&encode(id, s, e - s, Op::Zero));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all_at(&buf, 0)?;
    f.sync_all()?;
    fs::rename(&tmp, path(dir, id))?;
    Ok(f)
}

/// Creates the (empty) zero-range file of a new layer, durably except for its directory
/// entry, which the caller syncs with those of the layer's other files.
pub(super) fn create(dir: &Path, id: LayerId) -> io::Result<()> {
    write_whole(dir, id, &RangeSet::default()).map(drop)
}

/// Removes the zero-range file of layer `id` and any temporary one. Missing is fine.
pub(super) fn remove(dir: &Path, id: LayerId) -> io::Result<()> {
    for p in [tmp_path(dir, id), path(dir, id)] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The open zero-range file of one layer. Its methods are called under the layer's
/// table writer lock, so appends are in the order memory receives them.
#[derive(Debug)]
pub(super) struct ZeroLog {
    id: LayerId,
    dir: PathBuf,
    /// Shared so a sync can run without the writer lock.
    file: Arc<File>,
    /// Where the next record goes: the end of the valid log.
    end: u64,
    /// Records appended since open, counted so a sync can tell whether any came in
    /// while it ran.
    appended: u64,
    /// Set when a sync of this file failed: the kernel may have dropped what it was
    /// about, so no later sync can be trusted (see docs/storage.md, sticky failures).
    failed: Option<String>,
    /// Syncs made by [`ZeroLog::sync_now`]: tests tell by it whether a change synced the
    /// log before changing the table.
    #[cfg(test)]
    pub(super) synced_now: u64,
}

impl ZeroLog {
    /// Opens the zero-range file of layer `id` and reads its ranges. A torn tail is cut
    /// off (durably, so later appends never follow it) with a warning.
    pub(super) fn open(dir: &Path, id: LayerId) -> io::Result<(ZeroLog, RangeSet)> {
        let p = path(dir, id);
        // A rewrite cut short leaves this; the file it was to replace is still whole.
        remove_if_present(&tmp_path(dir, id))?;
        let file = OpenOptions::new().read(true).write(true).open(&p)?;
        let mut raw = Vec::new();
        (&file).read_to_end(&mut raw)?;
        if raw.len() < RECORD_LEN || raw[..RECORD_LEN] != header(id) {
            return Err(damaged(format!(
                "{} does not start with the zero-range header of layer {id}",
                p.display()
            )));
        }
        let mut ranges = RangeSet::default();
        let mut end = RECORD_LEN;
        for r in raw[RECORD_LEN..].chunks(RECORD_LEN) {
            let Some((first, count, op)) = decode(id, r) else {
                break;
            };
            apply(&mut ranges, first, count, op);
            end += RECORD_LEN;
        }
        if end < raw.len() {
            tracing::warn!(
                layer = id,
                path = %p.display(),
                kept = end,
                dropped = raw.len() - end,
                "zero-range log ends in a torn record (a crash during a trim); dropping the \
                 tail, the write-ahead log replays what it held"
            );
            file.set_len(end as u64)?;
            file.sync_data()?;
        }
        let log = ZeroLog {
            id,
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            end: end as u64,
            appended: 0,
            failed: None,
            #[cfg(test)]
            synced_now: 0,
        };
        Ok((log, ranges))
    }

    /// Appends one record (not synced). A failed append leaves at most a torn record at
    /// the end, which the next append overwrites.
    pub(super) fn append(&mut self, first: u64, count: u64, op: Op) -> io::Result<()> {
        self.file
            .write_all_at(&encode(self.id, first, count, op), self.end)?;
        self.end += RECORD_LEN as u64;
        self.appended += 1;
        Ok(())
    }

    /// Records appended since open.
    pub(super) fn appended(&self) -> u64 {
        self.appended
    }

    /// The file, for a sync outside the writer lock.
    pub(super) fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Makes the log durable now (the writer lock is held: used only where a table
    /// change must not reach the disk before the ranges it relies on).
    pub(super) fn sync_now(&mut self) -> io::Result<()> {
        if let Some(why) = &self.failed {
            return Err(io::Error::other(why.clone()));
        }
        #[cfg(test)]
        {
            self.synced_now += 1;
        }
        self.file.sync_data().map_err(|e| self.fail(e))
    }

    /// Records a failed sync of this file: every later sync fails too.
    pub(super) fn fail(&mut self, e: io::Error) -> io::Error {
        let why = format!("an earlier sync of the zero-range file failed: {e}");
        self.failed.get_or_insert(why);
        e
    }

    /// Why syncs of this file cannot be trusted, if one failed.
    pub(super) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether the log has grown enough past `ranges` to be rewritten.
    pub(super) fn wants_rewrite(&self, ranges: &RangeSet) -> bool {
        let records = self.end / RECORD_LEN as u64 - 1;
        records > REWRITE_MIN_RECORDS && records > REWRITE_FACTOR * ranges.len() as u64
    }

    /// Replaces the file by one holding just `ranges` (which must be what the log says),
    /// durably: temporary file synced, renamed, directory synced. Until the rename the
    /// log is untouched, so a failure there only leaves it long (logged, not an error).
    pub(super) fn rewrite(&mut self, ranges: &RangeSet) -> io::Result<()> {
        if let Some(why) = &self.failed {
            return Err(io::Error::other(why.clone()));
        }
        let f = match write_whole(&self.dir, self.id, ranges) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    layer = self.id,
                    error = %e,
                    "could not rewrite the zero-range log; it stays as it is"
                );
                // Best effort: a leftover is also removed at the next open.
                let _ = fs::remove_file(tmp_path(&self.dir, self.id));
                return Ok(());
            }
        };
        // From the rename on, the new file is the log, whether or not the directory sync
        // below succeeds: appends go there.
        self.end = ((ranges.len() + 1) * RECORD_LEN) as u64;
        self.file = Arc::new(f);
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.fail(e))
    }
}

/// Applies one record to `ranges`.
pub(super) fn apply(ranges: &mut RangeSet, first: u64, count: u64, op: Op) {
    let end = first.saturating_add(count);
    match op {
        Op::Zero => ranges.insert(first, end),
        Op::Clear => ranges.remove(first, end),
    }
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The directory marker: present and complete once every layer in the directory has a
/// zero-range file, so that from then on a missing one is a loss, not an older layer.
const MARKER: &str = "zero-ranges";
const MARKER_COMPLETE: &str = "every layer in this directory has a <id>.zeros file\n";
const MARKER_ADDING: &str = "adding <id>.zeros files to layers created before them\n";

/// What the directory marker says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DirState {
    /// Every layer has a zero-range file: a missing one was lost.
    Complete,
    /// Layers older than zero-range files may lack one (no marker and no `.zeros` file,
    /// or an upgrade that was cut short).
    Upgrade,
}

/// The path of the directory marker.
pub(super) fn marker_path(dir: &Path) -> PathBuf {
    dir.join(MARKER)
}

/// Reads the directory marker. A missing marker in a directory that holds zero-range
/// files is an error: the marker was lost, and guessing could serve trimmed blocks as
/// the data under them.
pub(super) fn dir_state(dir: &Path) -> io::Result<DirState> {
    let p = marker_path(dir);
    match fs::read_to_string(&p) {
        Ok(s) if s == MARKER_COMPLETE => Ok(DirState::Complete),
        Ok(s) if s == MARKER_ADDING => Ok(DirState::Upgrade),
        Ok(_) => Err(damaged(format!(
            "{} is not a layer directory marker this version writes",
            p.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(found) = layer_files(dir, ".zeros")?.into_iter().next() {
                return Err(damaged(format!(
                    "{} is missing, but {} exists: the marker was lost; restore it \
                     (content: {MARKER_COMPLETE:?}) once every layer's .zeros file is there",
                    p.display(),
                    path(dir, found).display()
                )));
            }
            Ok(DirState::Upgrade)
        }
        Err(e) => Err(e),
    }
}

/// Gives every layer in `dir` (every id with a `.data` or `.sums` file) that has no
/// zero-range file an empty one, then marks the directory complete. Layers created
/// before zero-range files had no zero ranges (their trims wrote markers), so an empty
/// file says exactly what they hold. Safe to repeat after a crash. `new` is a layer being
/// created right now (its caller makes its file): not an old one, so not counted here.
pub(super) fn upgrade_dir(dir: &Path, new: Option<u64>) -> io::Result<()> {
    write_marker(dir, MARKER_ADDING)?;
    let mut ids = layer_files(dir, ".data")?;
    ids.extend(layer_files(dir, ".sums")?);
    ids.sort_unstable();
    ids.dedup();
    let mut added = 0;
    for id in ids {
        if Some(id) != new && !path(dir, id).exists() {
            create(dir, id)?;
            added += 1;
        }
    }
    File::open(dir)?.sync_all()?;
    write_marker(dir, MARKER_COMPLETE)?;
    if added > 0 {
        tracing::info!(
            dir = %dir.display(),
            layers = added,
            "gave layers created before zero-range files an empty one"
        );
    }
    Ok(())
}

fn write_marker(dir: &Path, content: &str) -> io::Result<()> {
    let p = marker_path(dir);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let f = File::create(&tmp)?;
    f.write_all_at(content.as_bytes(), 0)?;
    f.sync_all()?;
    fs::rename(&tmp, &p)?;
    File::open(dir)?.sync_all()
}

/// Ids of the files `<16 hex digits><suffix>` in `dir`.
fn layer_files(dir: &Path, suffix: &str) -> io::Result<Vec<LayerId>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir)? {
        let name = ent?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(suffix)) else {
            continue;
        };
        if stem.len() == 16 {
            if let Ok(id) = u64::from_str_radix(stem, 16) {
                out.push(id);
            }
        }
    }
    Ok(out)
}
