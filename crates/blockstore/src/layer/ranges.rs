//! A set of block ranges (a layer's zero ranges), kept merged so its memory follows the
//! number of separate ranges, not the number of blocks they cover.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent ranges of blocks, as start → end (exclusive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds blocks `first..end`, merging with the ranges it touches.
    pub(super) fn insert(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let (mut lo, mut hi) = (first, end);
        if let Some((&s, &e)) = self.map.range(..=first).next_back() {
            if e >= first {
                lo = s;
                hi = hi.max(e);
                self.map.remove(&s);
            }
        }
        // Ranges are disjoint and never touch, so only the last one starting in the new
        // range can reach past it.
        let inside: Vec<(u64, u64)> = self.map.range(lo..=hi).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            hi = hi.max(e);
            self.map.remove(&s);
        }
        self.map.insert(lo, hi);
    }

    /// Removes blocks `first..end`, splitting the ranges it cuts.
    pub(super) fn remove(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..first).next_back() {
            if e > first {
                self.map.insert(s, first);
                if e > end {
                    self.map.insert(end, e);
                }
            }
        }
        let inside: Vec<(u64, u64)> = self.map.range(first..end).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in inside {
            self.map.remove(&s);
            if e > end {
                self.map.insert(end, e);
            }
        }
    }

    /// The parts of `first..end` the set holds, in order, as (first, end).
    pub(super) fn overlaps(&self, first: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let before = self
            .map
            .range(..first)
            .next_back()
            .filter(|(_, e)| **e > first);
        let within = self.map.range(first..end.max(first));
        before
            .into_iter()
            .chain(within)
            .map(move |(s, e)| ((*s).max(first), (*e).min(end)))
            .filter(|(s, e)| s < e)
    }

    /// Whether the set holds any block of `first..end`.
    pub(super) fn intersects(&self, first: u64, end: u64) -> bool {
        self.overlaps(first, end).next().is_some()
    }

    /// Whether the set holds every block of `first..end`.
    pub(super) fn covers(&self, first: u64, end: u64) -> bool {
        first >= end
            || self
                .map
                .range(..=first)
                .next_back()
                .is_some_and(|(_, e)| *e >= end)
    }

    /// Whether the set holds block `b`.
    pub(super) fn contains(&self, b: u64) -> bool {
        self.covers(b, b.saturating_add(1))
    }

    /// The ranges, in order, as (first, end).
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }

    /// Number of separate ranges.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// One past the last block held (0 when empty).
    pub(super) fn end(&self) -> u64 {
        self.map.values().next_back().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::RangeSet;

    proptest! {
        /// Inserts and removes agree with a set of blocks, and the ranges stay merged.
        #[test]
        fn ranges_agree_with_a_set_of_blocks(
            ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..60), 1..60),
            probe in (0u64..260, 0u64..80),
        ) {
            let mut set = RangeSet::default();
            let mut model = [false; 260];
            for (add, first, n) in ops {
                let end = first + n;
                if add {
                    set.insert(first, end);
                } else {
                    set.remove(first, end);
                }
                model[first as usize..end as usize].fill(add);
                let ranges: Vec<(u64, u64)> = set.iter().collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].1 < w[1].0, "ranges touch or overlap: {:?}", ranges);
                }
                for (s, e) in &ranges {
                    prop_assert!(s < e);
                }
                for (b, held) in model.iter().enumerate() {
                    prop_assert_eq!(set.contains(b as u64), *held, "block {}", b);
                }
            }
            let (first, n) = probe;
            let end = (first + n).min(260);
            let mut want = Vec::new();
            let mut b = first;
            while b < end {
                if model[b as usize] {
                    let s = b;
                    while b < end && model[b as usize] {
                        b += 1;
                    }
                    want.push((s, b));
                } else {
                    b += 1;
                }
            }
            prop_assert_eq!(set.overlaps(first, end).collect::<Vec<_>>(), want.clone());
            prop_assert_eq!(set.intersects(first, end), !want.is_empty());
            prop_assert_eq!(
                set.covers(first, end),
                (first..end).all(|b| model[b as usize])
            );
            let last = model.iter().rposition(|h| *h).map_or(0, |p| p as u64 + 1);
            prop_assert_eq!(set.end(), last);
        }
    }
}
