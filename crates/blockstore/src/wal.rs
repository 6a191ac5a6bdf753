//! The write-ahead log: numbered segment files of checksummed records.
//!
//! Every write is appended here before it is acknowledged; a FLUSH is one `fdatasync` of
//! the active segment (older segments were synced when they were sealed). The checkpoint
//! copies sealed segments into the layer files and deletes them.

use std::fs::{self, File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::sync_dir;
use crate::error::{FormatError, Result, StoreError};
use crate::format::{RecordHeader, RecordKind, BLOCK_SIZE, SUM_LEN, WAL_HEADER_LEN};
use crate::hooks::{Hooks, Point};

/// The segment being appended to.
struct Active {
    seg: u64,
    file: Arc<File>,
    pos: u64,
}

/// How far the log is known durable.
#[derive(Default)]
struct Synced {
    seg: u64,
    pos: u64,
}

/// The write-ahead log of one store.
pub struct Wal {
    dir: PathBuf,
    active: Mutex<Active>,
    synced: Mutex<Synced>,
    /// Sealed segments not yet removed, with their lengths.
    sealed: Mutex<Vec<(u64, u64)>>,
    hooks: Hooks,
}

/// A record read back from a segment.
pub struct ReadRecord {
    /// The record's header.
    pub header: RecordHeader,
    /// For data records: `nblocks` hashes then `nblocks` blocks.
    pub hashes: Vec<u8>,
    /// For data records: the block contents.
    pub data: Vec<u8>,
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.wal"))
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
    /// Starts a new, empty segment numbered `seg` in `dir`.
    pub fn create(dir: &Path, seg: u64) -> Result<Wal> {
        let file = Self::new_segment(dir, seg)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            active: Mutex::new(Active {
                seg,
                file: Arc::new(file),
                pos: 0,
            }),
            synced: Mutex::new(Synced { seg, pos: 0 }),
            sealed: Mutex::new(Vec::new()),
            hooks: Hooks::default(),
        })
    }

    fn new_segment(dir: &Path, seg: u64) -> Result<File> {
        let p = seg_path(dir, seg);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
        sync_dir(dir)?;
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
        let out = then(a.seg);
        Ok((out, a.pos))
    }

    /// Bytes in the active segment.
    pub fn active_len(&self) -> u64 {
        self.active.lock().pos
    }

    /// Bytes in all segments not yet checkpointed and removed.
    pub fn unapplied(&self) -> u64 {
        let active = self.active.lock().pos;
        active + self.sealed.lock().iter().map(|(_, len)| len).sum::<u64>()
    }

    /// Makes every record appended so far durable. Concurrent callers share one sync.
    pub fn sync(&self) -> Result<()> {
        let (seg, pos, file) = {
            let a = self.active.lock();
            (a.seg, a.pos, a.file.clone())
        };
        let mut s = self.synced.lock();
        if (s.seg, s.pos) >= (seg, pos) {
            return Ok(());
        }
        file.sync_data()
            .map_err(|e| StoreError::io(format!("syncing WAL segment {seg}"), e))?;
        *s = Synced { seg, pos };
        Ok(())
    }

    /// Seals the active segment (making it durable) and starts the next one. Returns the
    /// number of the newest sealed segment, or `None` when the active one is empty.
    pub fn rotate(&self) -> Result<Option<u64>> {
        let mut a = self.active.lock();
        if a.pos == 0 {
            return Ok(a.seg.checked_sub(1));
        }
        self.hooks
            .at(Point::SealSync(a.seg))
            .map_err(|e| StoreError::io("test point", e))?;
        a.file
            .sync_data()
            .map_err(|e| StoreError::io(format!("syncing WAL segment {}", a.seg), e))?;
        let next = a.seg + 1;
        let file = Self::new_segment(&self.dir, next)?;
        let sealed = a.seg;
        self.sealed.lock().push((sealed, a.pos));
        *a = Active {
            seg: next,
            file: Arc::new(file),
            pos: 0,
        };
        Ok(Some(sealed))
    }

    /// Deletes sealed segments up to and including `upto`.
    pub fn remove_upto(&self, upto: u64) -> Result<()> {
        let active = self.active.lock().seg;
        for seg in list_segments(&self.dir)? {
            if seg <= upto && seg < active {
                let p = seg_path(&self.dir, seg);
                fs::remove_file(&p)
                    .map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
            }
        }
        self.sealed.lock().retain(|(seg, _)| *seg > upto);
        sync_dir(&self.dir)
    }
}

/// Why reading a segment stopped.
#[derive(Debug)]
pub enum SegmentEnd {
    /// Every byte was a complete, valid record.
    Clean,
    /// A record at this offset is incomplete or fails its checksum.
    Torn {
        /// Offset of the first bad record.
        offset: u64,
        /// What was wrong with it.
        reason: String,
    },
}

/// Reads the records of segment `seg` in order, calling `apply` for each valid one.
pub fn replay_segment(
    dir: &Path,
    seg: u64,
    mut apply: impl FnMut(ReadRecord) -> Result<()>,
) -> Result<SegmentEnd> {
    let p = seg_path(dir, seg);
    let f = File::open(&p).map_err(|e| StoreError::io(format!("opening {}", p.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| StoreError::io(format!("inspecting {}", p.display()), e))?
        .len();
    let mut off = 0u64;
    let torn = |offset: u64, reason: String| Ok(SegmentEnd::Torn { offset, reason });
    while off < len {
        let mut head = [0u8; WAL_HEADER_LEN];
        if off + WAL_HEADER_LEN as u64 > len {
            return torn(off, "truncated header".into());
        }
        f.read_exact_at(&mut head, off)
            .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
        let header = match RecordHeader::decode_unchecked(&head) {
            Ok(h) => h,
            Err(e) => return torn(off, e.to_string()),
        };
        if header.segment != seg {
            return torn(off, format!("record names segment {}", header.segment));
        }
        let payload = header.payload_len() as u64;
        if off + WAL_HEADER_LEN as u64 + payload > len {
            return torn(off, "truncated payload".into());
        }
        let n = header.nblocks as usize;
        let (mut hashes, mut data) = (Vec::new(), Vec::new());
        if header.kind == RecordKind::Data {
            hashes = vec![0u8; n * SUM_LEN];
            data = vec![0u8; n * BLOCK_SIZE];
            let base = off + WAL_HEADER_LEN as u64;
            f.read_exact_at(&mut hashes, base)
                .and_then(|()| f.read_exact_at(&mut data, base + hashes.len() as u64))
                .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))?;
        }
        if let Err(e) = RecordHeader::verify(&head, &hashes) {
            return torn(off, e.to_string());
        }
        for (i, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            if crate::format::block_hash(block)[..] != hashes[i * SUM_LEN..(i + 1) * SUM_LEN] {
                return torn(off, FormatError::BadChecksum.to_string());
            }
        }
        apply(ReadRecord {
            header,
            hashes,
            data,
        })?;
        off += WAL_HEADER_LEN as u64 + payload;
    }
    Ok(SegmentEnd::Clean)
}

/// Deletes segment files, used after recovery applied them.
pub fn remove_segments(dir: &Path, segs: &[u64]) -> Result<()> {
    for seg in segs {
        let p = seg_path(dir, *seg);
        fs::remove_file(&p).map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
    }
    sync_dir(dir)
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

