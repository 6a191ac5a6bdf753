//! Finding a merge's work: the layer's blocks in order, as batches of zero runs and of
//! data blocks, from its in-memory table and zero ranges.

use std::collections::VecDeque;

use super::{Pair, MERGE_BATCH};
use crate::error::Result;
use crate::format::BlockEntry;

/// Zero ranges one batch carries at most: a record each in the child's zero-range log.
pub(super) const ZERO_BATCH: usize = 1024;
/// Table entries the scan reads at a time (no lock held).
const SCAN_STEP: u64 = 8192;
/// Blocks whose zero ranges the scan asks for at a time: bounds the list of ranges held
/// in memory when they are many and small.
const SCAN_WINDOW: u64 = 1 << 20;

/// One batch of a merge.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Work {
    /// Runs of blocks that read as zero in the layer, as (first, end), ascending.
    Zeros(Vec<(u64, u64)>),
    /// Blocks the layer holds data for, ascending.
    Data(Vec<u64>),
}

/// The layer's blocks in order, as batches of [`Work`]. Reads only the layer's in-memory
/// table and ranges, without locks: the layer is frozen, and a data batch reads its
/// entries again under its locks.
pub(super) struct Scan<'a> {
    pair: &'a Pair,
    /// One past the last block to look at.
    end: u64,
    /// Where the next window of the scan starts.
    window: u64,
    /// What is left of the current window, in order: (first, end, whether it is a zero
    /// range; if not, its entries are to be read).
    parts: VecDeque<(u64, u64, bool)>,
    /// Zero runs found, not yet handed out; the last may still grow.
    zeros: Vec<(u64, u64)>,
    /// Data blocks found, not yet handed out.
    data: Vec<u64>,
}

impl<'a> Scan<'a> {
    pub(super) fn new(pair: &'a Pair, end: u64) -> Scan<'a> {
        Scan {
            pair,
            end,
            window: 0,
            parts: VecDeque::new(),
            zeros: Vec::new(),
            data: Vec::new(),
        }
    }

    /// How far the scan got, for the log.
    pub(super) fn scanned(&self) -> u64 {
        self.parts.front().map_or(self.window, |p| p.0)
    }

    /// The next batch, or `None` once the layer is done.
    pub(super) fn next_batch(&mut self) -> Result<Option<Work>> {
        loop {
            if self.data.len() >= MERGE_BATCH {
                return Ok(Some(Work::Data(self.data.drain(..MERGE_BATCH).collect())));
            }
            // More than a batch: the first go, the last stays (it may still grow).
            if self.zeros.len() > ZERO_BATCH {
                return Ok(Some(Work::Zeros(self.zeros.drain(..ZERO_BATCH).collect())));
            }
            if let Some(part) = self.parts.front_mut() {
                let (first, end, zero) = *part;
                if zero {
                    self.parts.pop_front();
                    if self.pair.zeroes {
                        self.push_zero(first, end);
                    }
                    continue;
                }
                let n = (end - first).min(SCAN_STEP);
                part.0 += n;
                if part.0 == end {
                    self.parts.pop_front();
                }
                let entries = self.pair.from.read_entries(first, n as usize)?;
                for (i, e) in entries.iter().enumerate() {
                    let b = first + i as u64;
                    match e {
                        BlockEntry::Data(_) => self.data.push(b),
                        BlockEntry::Zero if self.pair.zeroes => self.push_zero(b, b + 1),
                        _ => {}
                    }
                }
                continue;
            }
            if self.window < self.end {
                self.next_window();
                continue;
            }
            if !self.zeros.is_empty() {
                return Ok(Some(Work::Zeros(std::mem::take(&mut self.zeros))));
            }
            if !self.data.is_empty() {
                return Ok(Some(Work::Data(std::mem::take(&mut self.data))));
            }
            return Ok(None);
        }
    }

    /// Splits the next window into the layer's zero ranges and the parts between them.
    fn next_window(&mut self) {
        let first = self.window;
        let end = first.saturating_add(SCAN_WINDOW).min(self.end);
        let mut at = first;
        for (lo, hi) in self.pair.from.zero_ranges(first, end - first) {
            if at < lo {
                self.parts.push_back((at, lo, false));
            }
            self.parts.push_back((lo, hi, true));
            at = hi;
        }
        if at < end {
            self.parts.push_back((at, end, false));
        }
        self.window = end;
    }

    /// Adds blocks `first..end` (after every block added so far) to the zero runs.
    fn push_zero(&mut self, first: u64, end: u64) {
        match self.zeros.last_mut() {
            Some(last) if last.1 == first => last.1 = end,
            _ => self.zeros.push((first, end)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Pair, MERGE_BATCH};
    use super::{Scan, Work, SCAN_WINDOW, ZERO_BATCH};
    use crate::format::{block_hash, BlockEntry, FillKind, BLOCK};
    use crate::layer::LayerFiles;

    const TIB_BLOCKS: u64 = (1u64 << 40) / BLOCK;

    fn data(b: u64) -> Vec<u8> {
        BlockEntry::Data(block_hash(&b.to_le_bytes()))
            .encode()
            .to_vec()
    }

    /// Every batch a scan of `from` hands out.
    fn batches(from: &Arc<LayerFiles>, into: &Arc<LayerFiles>, zeroes: bool) -> Vec<Work> {
        let pair = Pair {
            from: from.clone(),
            into: into.clone(),
            zeroes,
        };
        let mut scan = Scan::new(&pair, from.table_blocks().unwrap());
        let mut out = Vec::new();
        while let Some(w) = scan.next_batch().unwrap() {
            out.push(w);
        }
        out
    }

    #[test]
    fn a_trimmed_tib_scans_as_a_few_zero_runs_and_its_data_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let from = Arc::new(LayerFiles::open(dir.path(), 1, true).unwrap());
        let into = Arc::new(LayerFiles::open(dir.path(), 2, true).unwrap());
        from.fill_entries(0, TIB_BLOCKS, FillKind::Zero).unwrap();
        // Data written after the trim, one zero marker in the table (inside the range, as
        // a fill over a stored entry leaves it), data past the first window.
        from.write_entries(5, &data(5)).unwrap();
        from.write_entries(7, &BlockEntry::Zero.encode()).unwrap();
        let three: Vec<u8> = (300..303).flat_map(data).collect();
        from.write_entries(300, &three).unwrap();
        let far = 3 * SCAN_WINDOW + 17;
        from.write_entries(far, &data(far)).unwrap();

        let started = std::time::Instant::now();
        let got = batches(&from, &into, true);
        let took = started.elapsed();
        assert_eq!(
            got,
            [
                Work::Zeros(vec![(0, 5), (6, 300), (303, far), (far + 1, TIB_BLOCKS)]),
                Work::Data(vec![5, 300, 301, 302, far]),
            ]
        );
        assert!(
            took < std::time::Duration::from_secs(2),
            "the scan took {took:?}"
        );
        // Without a layer below, zeroes are not carried; the data still is.
        assert_eq!(
            batches(&from, &into, false),
            [Work::Data(vec![5, 300, 301, 302, far])]
        );
    }

    #[test]
    fn many_small_pieces_come_in_bounded_batches_in_block_order() {
        let dir = tempfile::tempdir().unwrap();
        let from = Arc::new(LayerFiles::open(dir.path(), 1, true).unwrap());
        let into = Arc::new(LayerFiles::open(dir.path(), 2, true).unwrap());
        // Zero markers (as a layer from before zero ranges has them) across a window
        // boundary; then alternating data and single zero ranges, more than a batch of each.
        let markers = SCAN_WINDOW - 10..SCAN_WINDOW + 10;
        let raw: Vec<u8> = markers
            .clone()
            .flat_map(|_| BlockEntry::Zero.encode())
            .collect();
        from.write_entries(markers.start, &raw).unwrap();
        let base = 2 * SCAN_WINDOW;
        let pieces = (ZERO_BATCH + MERGE_BATCH) as u64;
        for i in 0..pieces {
            from.write_entries(base + 2 * i, &data(base + 2 * i))
                .unwrap();
            from.fill_entries(base + 2 * i + 1, 1, FillKind::Zero)
                .unwrap();
        }
        let got = batches(&from, &into, true);

        let mut zeros = Vec::new();
        let mut blocks = Vec::new();
        for w in &got {
            match w {
                Work::Zeros(z) => {
                    assert!(!z.is_empty() && z.len() <= ZERO_BATCH, "{} runs", z.len());
                    zeros.extend_from_slice(z);
                }
                Work::Data(d) => {
                    assert!(
                        !d.is_empty() && d.len() <= MERGE_BATCH,
                        "{} blocks",
                        d.len()
                    );
                    blocks.extend_from_slice(d);
                }
            }
        }
        let mut want_zeros = vec![(markers.start, markers.end)];
        want_zeros.extend((0..pieces).map(|i| (base + 2 * i + 1, base + 2 * i + 2)));
        assert_eq!(zeros, want_zeros);
        let want_blocks: Vec<u64> = (0..pieces).map(|i| base + 2 * i).collect();
        assert_eq!(blocks, want_blocks);
    }
}
