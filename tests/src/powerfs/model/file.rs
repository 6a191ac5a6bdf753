//! A regular file of the model: its content now, its durable content, and the writes,
//! hole punches and size changes no sync covered yet; and what a cut keeps of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::Rng;

use super::{CutMode, Page, PAGE};

/// File content: a size and sparse pages (an absent page reads as zeroes).
#[derive(Clone, Debug, Default)]
pub struct Content {
    size: u64,
    pages: BTreeMap<u64, Page>,
}

/// A change to a file's content, as issued.
#[derive(Clone, Debug)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    Punch { off: u64, len: u64 },
    SetLen(u64),
}

impl FileOp {
    /// The size after this operation, from `size` before it.
    fn size_after(&self, size: u64) -> u64 {
        match self {
            FileOp::Write { off, data } => size.max(off + data.len() as u64),
            FileOp::Punch { .. } => size,
            FileOp::SetLen(n) => *n,
        }
    }

    /// The byte range whose content the operation sets, given the size before it.
    fn range(&self, size: u64) -> (u64, u64) {
        match self {
            FileOp::Write { off, data } => (*off, off + data.len() as u64),
            FileOp::Punch { off, len } => (*off, off + len),
            // Shrinking zeroes what was past the new end; growing changes no byte.
            FileOp::SetLen(n) => (*n, size.max(*n)),
        }
    }
}

impl Content {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages holding data (for `st_blocks`).
    pub fn allocated_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Reads up to `len` bytes at `off` (less at the end of the file).
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = self.size.min(off.saturating_add(len));
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (&p, page) in self.pages.range(off / PAGE..=(end - 1) / PAGE) {
            let (lo, hi) = ((p * PAGE).max(off), ((p + 1) * PAGE).min(end));
            out[(lo - off) as usize..(hi - off) as usize]
                .copy_from_slice(&page[(lo - p * PAGE) as usize..(hi - p * PAGE) as usize]);
        }
        out
    }

    /// Applies the part of `op` that falls into page `p` (bytes only, not the size).
    fn apply_page(&mut self, op: &FileOp, size_before: u64, p: u64) {
        let (lo, hi) = op.range(size_before);
        let (lo, hi) = (lo.max(p * PAGE), hi.min((p + 1) * PAGE));
        if lo >= hi {
            return;
        }
        let (a, b) = ((lo - p * PAGE) as usize, (hi - p * PAGE) as usize);
        match op {
            FileOp::Write { off, data } => {
                let page = Arc::make_mut(
                    self.pages
                        .entry(p)
                        .or_insert_with(|| Arc::new([0; PAGE as usize])),
                );
                page[a..b].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            }
            FileOp::Punch { .. } | FileOp::SetLen(_) => {
                if a == 0 && b == PAGE as usize {
                    self.pages.remove(&p);
                } else if let Some(page) = self.pages.get_mut(&p) {
                    Arc::make_mut(page)[a..b].fill(0);
                }
            }
        }
    }

    /// Applies `op` whole.
    fn apply(&mut self, op: &FileOp) {
        let size = self.size;
        let (lo, hi) = op.range(size);
        if lo < hi {
            for p in lo / PAGE..=(hi - 1) / PAGE {
                self.apply_page(op, size, p);
            }
        }
        self.size = op.size_after(size);
    }

    /// Sets the size and drops whatever lies past it.
    fn clip(&mut self, size: u64) {
        self.size = size;
        self.pages.retain(|&p, _| p * PAGE < size);
        if !size.is_multiple_of(PAGE) {
            if let Some(page) = self.pages.get_mut(&(size / PAGE)) {
                Arc::make_mut(page)[(size % PAGE) as usize..].fill(0);
            }
        }
    }
}

/// A regular file: current content, durable content, operations since the last sync.
#[derive(Clone, Debug, Default)]
pub struct File {
    cur: Content,
    durable: Content,
    unsynced: Vec<FileOp>,
}

impl File {
    /// What reads see.
    pub fn content(&self) -> &Content {
        &self.cur
    }

    /// Writes `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.push(FileOp::Write {
            off,
            data: data.to_vec(),
        });
    }

    /// Zeroes `len` bytes at `off`, keeping the size (`FALLOC_FL_PUNCH_HOLE`).
    pub fn punch(&mut self, off: u64, len: u64) {
        let len = len.min(self.cur.size.saturating_sub(off));
        if len > 0 {
            self.push(FileOp::Punch { off, len });
        }
    }

    /// Truncates or extends (`ftruncate`).
    pub fn set_len(&mut self, size: u64) {
        self.push(FileOp::SetLen(size));
    }

    fn push(&mut self, op: FileOp) {
        self.cur.apply(&op);
        self.unsynced.push(op);
    }

    /// `fsync`/`fdatasync`: everything so far becomes durable.
    pub fn sync(&mut self) {
        self.durable = self.cur.clone();
        self.unsynced.clear();
    }

    /// Bytes written and not yet synced.
    pub fn unsynced_ops(&self) -> usize {
        self.unsynced.len()
    }

    /// Loses power: keeps what `mode` says of the unsynced operations. Returns how many
    /// page updates were kept and how many dropped.
    pub(super) fn cut(&mut self, mode: CutMode, rng: &mut impl Rng) -> (usize, usize) {
        let ops = std::mem::take(&mut self.unsynced);
        let mut next = self.durable.clone();
        let mut touched = 0usize;
        if mode == CutMode::Tear && !ops.is_empty() {
            // Which pages each operation touches, in order, with the size it saw.
            let mut size = self.durable.size;
            let mut per_page: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
            for (i, op) in ops.iter().enumerate() {
                let (lo, hi) = op.range(size);
                if lo < hi {
                    for p in lo / PAGE..=(hi - 1) / PAGE {
                        per_page.entry(p).or_default().push((i, size));
                    }
                }
                size = op.size_after(size);
            }
            // Each page was written back after a random number of its updates (maybe
            // none, maybe all); the inode's size after a random number of operations.
            let mut kept = 0;
            for (p, updates) in &per_page {
                touched += updates.len();
                let n = rng.gen_range(0..=updates.len());
                for &(i, size_before) in &updates[..n] {
                    next.apply_page(&ops[i], size_before, *p);
                }
                kept += n;
            }
            let cut_at = rng.gen_range(0..=ops.len());
            let size = ops[..cut_at]
                .iter()
                .fold(self.durable.size, |s, op| op.size_after(s));
            next.clip(size);
            self.durable = next;
            self.cur = self.durable.clone();
            return (kept, touched - kept);
        }
        for op in &ops {
            let (lo, hi) = op.range(0);
            touched += (hi.saturating_sub(lo)).div_ceil(PAGE) as usize;
        }
        self.cur = self.durable.clone();
        (0, touched)
    }
}
