//! Byte regions of a volume: a set of disjoint ranges that merges what it is given.
//!
//! The primary's missed-region record for a replica that left the in-sync set, and the
//! input of catch-up planning.

use std::collections::BTreeMap;

/// A byte range of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
}

impl Region {
    /// The first byte after the region (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Disjoint, non-adjacent ranges, merged on insert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionSet {
    /// start -> end (exclusive)
    ranges: BTreeMap<u64, u64>,
}

impl RegionSet {
    /// An empty set.
    pub fn new() -> RegionSet {
        RegionSet::default()
    }

    /// Adds a region, merging it with those it overlaps or touches.
    pub fn insert(&mut self, region: Region) {
        if region.len == 0 {
            return;
        }
        let mut start = region.offset;
        let mut end = region.end();
        // The range starting at or before `start` may reach into the new one.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// The regions, in order.
    pub fn iter(&self) -> impl Iterator<Item = Region> + '_ {
        self.ranges.iter().map(|(&s, &e)| Region {
            offset: s,
            len: e - s,
        })
    }

    /// Bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// True when nothing is covered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True when `offset` lies in a region.
    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| offset < e)
    }

    /// The same set widened to whole `block`-sized blocks.
    pub fn widened_to(&self, block: u64) -> RegionSet {
        let mut out = RegionSet::new();
        for r in self.iter() {
            let start = r.offset - r.offset % block;
            let end = r.end().div_ceil(block).saturating_mul(block);
            out.insert(Region {
                offset: start,
                len: end - start,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> Region {
        Region { offset, len }
    }

    #[test]
    fn overlapping_and_touching_regions_merge() {
        let mut s = RegionSet::new();
        s.insert(r(100, 10));
        s.insert(r(0, 10));
        s.insert(r(50, 10));
        assert_eq!(s.iter().count(), 3);
        s.insert(r(10, 40)); // touches 0..10 and 50..60
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![r(0, 60), r(100, 10)]);
        s.insert(r(55, 100)); // reaches over 100..110
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![r(0, 155)]);
        s.insert(r(5, 5)); // inside
        assert_eq!(s.total_bytes(), 155);
        assert!(s.contains(0) && s.contains(154) && !s.contains(155));
        s.insert(r(1000, 0));
        assert_eq!(s.iter().count(), 1);
    }

    #[test]
    fn widening_covers_whole_blocks() {
        let mut s = RegionSet::new();
        s.insert(r(512, 512));
        s.insert(r(8192 + 4000, 200));
        let w = s.widened_to(4096);
        assert_eq!(
            w.iter().collect::<Vec<_>>(),
            vec![r(0, 4096), r(8192, 8192)]
        );
    }
}
