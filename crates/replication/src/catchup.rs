//! Catch-up planning: from a replica's missed regions and both sides' block digests to the
//! blocks that must travel, with a progress figure.
//!
//! The shell drives it: for each [`DigestBatch`] it reads the primary's digests locally and
//! asks the replica for its own ([`crate::wire::Message::Digests`]), hands both to
//! [`CatchUpPlan::compare`], sends the returned regions (reading them from the primary's
//! copy) and reports each with [`CatchUpPlan::sent`]. Only the missed regions are looked
//! at, and of those only blocks whose digests differ are sent, so a catch-up costs about
//! what was written while the replica was away, not the volume's size.

use std::collections::BTreeMap;

use crate::regions::{Region, RegionSet};
use crate::wire::{Digest, BLOCK_SIZE, MAX_DATA, MAX_DIGEST_BLOCKS};

/// The blake3 digest of one block, as both sides compute it (the block store's checksum).
pub fn block_digest(block: &[u8]) -> Digest {
    *blake3::hash(block).as_bytes()
}

/// One `Digests` request's worth of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DigestBatch {
    pub offset: u64,
    pub blocks: u32,
}

impl DigestBatch {
    /// Bytes the batch covers.
    pub fn bytes(&self) -> u64 {
        u64::from(self.blocks) * BLOCK_SIZE
    }
}

/// How far a catch-up got, in bytes of missed blocks examined or repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Missed bytes found equal or already sent.
    pub done_bytes: u64,
    /// Missed bytes in all (the missed regions widened to whole blocks).
    pub total_bytes: u64,
    /// Bytes found to differ so far (what travels).
    pub differing_bytes: u64,
}

impl Progress {
    /// Whole percent done (100 when there was nothing to do).
    pub fn percent(&self) -> u8 {
        if self.total_bytes == 0 {
            return 100;
        }
        // done <= total, so this is at most 100.
        (self.done_bytes.saturating_mul(100) / self.total_bytes).min(100) as u8
    }
}

/// Why a comparison was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("batch at offset {0} is not part of this plan or was compared already")]
    UnknownBatch(u64),
    #[error("batch of {expected} blocks got {primary} primary and {replica} replica digests")]
    DigestCount {
        expected: u32,
        primary: usize,
        replica: usize,
    },
}

/// The plan for one replica's catch-up.
#[derive(Clone, Debug)]
pub struct CatchUpPlan {
    /// Batches not compared yet, by offset.
    batches: BTreeMap<u64, DigestBatch>,
    total_bytes: u64,
    done_bytes: u64,
    differing_bytes: u64,
}

impl CatchUpPlan {
    /// Plans the catch-up of `missed` on a volume of `volume_size` bytes.
    pub fn new(missed: &RegionSet, volume_size: u64) -> CatchUpPlan {
        let mut batches = BTreeMap::new();
        let mut total_bytes = 0;
        for region in missed.widened_to(BLOCK_SIZE).iter() {
            let end = region
                .end()
                .min(volume_size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
            let mut offset = region.offset;
            while offset < end {
                let blocks = ((end - offset) / BLOCK_SIZE).min(u64::from(MAX_DIGEST_BLOCKS));
                // blocks <= MAX_DIGEST_BLOCKS, a u32.
                let batch = DigestBatch {
                    offset,
                    blocks: blocks as u32,
                };
                total_bytes += batch.bytes();
                batches.insert(offset, batch);
                offset += batch.bytes();
            }
        }
        CatchUpPlan {
            batches,
            total_bytes,
            done_bytes: 0,
            differing_bytes: 0,
        }
    }

    /// The batches still to compare, in offset order.
    pub fn batches(&self) -> Vec<DigestBatch> {
        self.batches.values().copied().collect()
    }

    /// Compares a batch's digests (primary's and replica's, one per block) and returns the
    /// runs of differing blocks to send, each at most [`MAX_DATA`] bytes (one `Write`).
    pub fn compare(
        &mut self,
        batch: DigestBatch,
        primary: &[Digest],
        replica: &[Digest],
    ) -> Result<Vec<Region>, PlanError> {
        if self.batches.get(&batch.offset) != Some(&batch) {
            return Err(PlanError::UnknownBatch(batch.offset));
        }
        let expected = batch.blocks as usize;
        if primary.len() != expected || replica.len() != expected {
            return Err(PlanError::DigestCount {
                expected: batch.blocks,
                primary: primary.len(),
                replica: replica.len(),
            });
        }
        self.batches.remove(&batch.offset);
        let max_run = MAX_DATA as u64;
        let mut runs: Vec<Region> = Vec::new();
        for (i, (p, r)) in primary.iter().zip(replica).enumerate() {
            let offset = batch.offset + i as u64 * BLOCK_SIZE;
            if p == r {
                self.done_bytes += BLOCK_SIZE;
                continue;
            }
            self.differing_bytes += BLOCK_SIZE;
            match runs.last_mut() {
                Some(run) if run.end() == offset && run.len + BLOCK_SIZE <= max_run => {
                    run.len += BLOCK_SIZE;
                }
                _ => runs.push(Region {
                    offset,
                    len: BLOCK_SIZE,
                }),
            }
        }
        Ok(runs)
    }

    /// The shell sent `region` (one returned by [`CatchUpPlan::compare`]) and the replica acknowledged it.
    pub fn sent(&mut self, region: Region) {
        self.done_bytes = (self.done_bytes + region.len).min(self.total_bytes);
    }

    /// The progress figure.
    pub fn progress(&self) -> Progress {
        Progress {
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            differing_bytes: self.differing_bytes,
        }
    }

    /// Every batch compared and every differing block sent.
    pub fn is_done(&self) -> bool {
        self.batches.is_empty() && self.done_bytes >= self.total_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missed(regions: &[(u64, u64)]) -> RegionSet {
        let mut s = RegionSet::new();
        for (offset, len) in regions {
            s.insert(Region {
                offset: *offset,
                len: *len,
            });
        }
        s
    }

    fn digests(n: usize, fill: u8) -> Vec<Digest> {
        vec![[fill; 32]; n]
    }

    #[test]
    fn only_missed_blocks_are_examined_not_the_volume() {
        const GIB: u64 = 1 << 30;
        let plan = CatchUpPlan::new(&missed(&[(512, 512), (10 * 4096, 3 * 4096)]), 64 * GIB);
        assert_eq!(
            plan.batches(),
            vec![
                DigestBatch {
                    offset: 0,
                    blocks: 1
                },
                DigestBatch {
                    offset: 40960,
                    blocks: 3
                }
            ]
        );
        assert_eq!(plan.progress().total_bytes, 4 * 4096);
    }

    #[test]
    fn only_differing_blocks_travel_in_runs_of_at_most_one_write() {
        let big = MAX_DATA as u64 * 2;
        let mut plan = CatchUpPlan::new(&missed(&[(0, big)]), big);
        let batches = plan.batches();
        assert_eq!(batches.len(), 1);
        let batch = batches[0];
        let n = batch.blocks as usize;
        let primary = digests(n, 1);
        let mut replica = digests(n, 1);
        // Blocks 3 and 4 differ, and everything from block 100 on.
        replica[3] = [2; 32];
        replica[4] = [2; 32];
        for d in &mut replica[100..] {
            *d = [2; 32];
        }
        let runs = plan.compare(batch, &primary, &replica).unwrap();
        assert_eq!(
            runs[0],
            Region {
                offset: 3 * 4096,
                len: 2 * 4096
            }
        );
        assert!(runs[1..].iter().all(|r| r.len <= MAX_DATA as u64));
        let tail: u64 = runs[1..].iter().map(|r| r.len).sum();
        assert_eq!(tail, (n as u64 - 100) * 4096);
        assert_eq!(runs[1].offset, 100 * 4096);
        let p = plan.progress();
        assert_eq!(p.differing_bytes, (n as u64 - 98) * 4096);
        assert_eq!(p.done_bytes, 98 * 4096);
        assert!(!plan.is_done());
        for r in runs {
            plan.sent(r);
        }
        assert!(plan.is_done());
        assert_eq!(plan.progress().percent(), 100);
    }

    #[test]
    fn large_missed_regions_are_split_into_digest_requests() {
        let bytes = u64::from(MAX_DIGEST_BLOCKS) * 4096 + 8192;
        let plan = CatchUpPlan::new(&missed(&[(0, bytes)]), bytes);
        let batches = plan.batches();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].blocks, MAX_DIGEST_BLOCKS);
        assert_eq!(batches[1].blocks, 2);
        assert_eq!(plan.progress().percent(), 0);
    }

    #[test]
    fn a_region_past_the_end_is_clipped_and_an_empty_plan_is_done() {
        let plan = CatchUpPlan::new(&missed(&[(8192, 1 << 20)]), 16384);
        assert_eq!(plan.progress().total_bytes, 8192);
        let empty = CatchUpPlan::new(&RegionSet::new(), 1 << 30);
        assert!(empty.is_done());
        assert_eq!(empty.progress().percent(), 100);
    }

    #[test]
    fn wrong_digest_counts_and_unknown_batches_are_refused() {
        let mut plan = CatchUpPlan::new(&missed(&[(0, 8192)]), 8192);
        let batch = plan.batches()[0];
        assert_eq!(
            plan.compare(batch, &digests(2, 0), &digests(1, 0)),
            Err(PlanError::DigestCount {
                expected: 2,
                primary: 2,
                replica: 1
            })
        );
        let other = DigestBatch {
            offset: 4096,
            blocks: 1,
        };
        assert_eq!(
            plan.compare(other, &digests(1, 0), &digests(1, 0)),
            Err(PlanError::UnknownBatch(4096))
        );
        assert_eq!(
            plan.compare(batch, &digests(2, 0), &digests(2, 0)),
            Ok(vec![])
        );
        assert!(plan.is_done());
        // Compared once only.
        assert!(plan.compare(batch, &digests(2, 0), &digests(2, 0)).is_err());
    }

    #[test]
    fn block_digests_are_blake3_of_the_block() {
        let block = vec![7u8; 4096];
        assert_eq!(block_digest(&block), *blake3::hash(&block).as_bytes());
        assert_ne!(block_digest(&block), block_digest(&[0u8; 4096]));
    }
}
