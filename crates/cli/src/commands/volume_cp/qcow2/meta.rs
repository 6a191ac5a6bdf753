//! The map of an image being written, kept in memory and mirrored into the file in an
//! order that keeps the file a valid image after every step (see `write.rs`): a new
//! cluster's refcount goes in before anything points to it, an entry is cleared before
//! its cluster's refcount drops.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{Qcow2Error, COPIED};

/// 64 KiB clusters, qemu-img's default (the only size the writer writes).
pub(super) const CLUSTER_BITS: u32 = 16;
pub(super) const CS: u64 = 1 << CLUSTER_BITS;
/// Guest bytes one L2 table maps.
pub(super) const L2_SPAN: u64 = CS / 8 * CS;
/// Refcounts are 2^4 = 16 bits wide, qemu's default.
pub(super) const REFCOUNT_ORDER: u32 = 4;
/// Clusters one refcount block counts.
pub(super) const PER_BLOCK: u64 = CS / 2;
/// Bit 0 of an in-memory L2 entry (file offsets are cluster-aligned): the cluster is
/// allocated and counted, its data being written, and the L2 table in the file does not
/// point to it yet.
pub(super) const PENDING: u64 = 1;

/// The image's tables as the file holds them (plus the pending clusters).
pub(super) struct Meta {
    /// Where the next cluster goes: past every cluster of the file. Clusters are only
    /// added here; one freed is never reused (its space is punched out).
    pub next: u64,
    pub l1_offset: u64,
    /// Each L2 table's file offset (0: none).
    pub l1: Vec<u64>,
    /// Per L1 index: each guest cluster's file offset, 0 when unallocated, with
    /// [`PENDING`] set until the L2 table in the file points to it.
    pub l2: HashMap<u64, Vec<u64>>,
    pub rt_offset: u64,
    /// Each refcount block's file offset (0: none). The table does not grow.
    pub rt: Vec<u64>,
    /// Each cluster's refcount: 0 or 1 (nothing is shared), indexed by cluster number.
    pub refs: Vec<u8>,
}

/// A table's worth of unallocated entries.
pub(super) fn empty_table() -> Vec<u64> {
    vec![0; (CS / 8) as usize]
}

/// An L2 entry as the file holds it: a pending cluster is not there yet.
fn on_disk(e: u64) -> u64 {
    if e == 0 || e & PENDING != 0 {
        0
    } else {
        e | COPIED
    }
}

pub(super) fn put(f: &File, b: &[u8], at: u64, what: &str) -> Result<(), Qcow2Error> {
    f.write_all_at(b, at)
        .map_err(Qcow2Error::io(format!("writing {what}")))
}

impl Meta {
    /// The in-memory entry of the guest cluster holding `guest` (0: unallocated).
    pub fn get(&self, guest: u64) -> u64 {
        self.l2
            .get(&(guest / L2_SPAN))
            .map_or(0, |t| t[((guest % L2_SPAN) / CS) as usize])
    }

    fn slot(&mut self, guest: u64) -> &mut u64 {
        let t = self.l2.entry(guest / L2_SPAN).or_insert_with(empty_table);
        &mut t[((guest % L2_SPAN) / CS) as usize]
    }

    fn set_ref(&mut self, cluster: u64, n: u8) {
        let i = cluster as usize;
        if self.refs.len() <= i {
            self.refs.resize(i + 1, 0);
        }
        self.refs[i] = n;
    }

    /// Sets a cluster's refcount, in memory and in its refcount block in the file.
    fn count(&mut self, f: &File, cluster: u64, n: u8) -> Result<(), Qcow2Error> {
        self.set_ref(cluster, n);
        let block = self
            .rt
            .get((cluster / PER_BLOCK) as usize)
            .copied()
            .unwrap_or(0);
        if block == 0 {
            return Err(Qcow2Error::Corrupt(format!(
                "the cluster at {} has no refcount block",
                cluster * CS
            )));
        }
        let at = block + (cluster % PER_BLOCK) * 2;
        put(f, &u16::from(n).to_be_bytes(), at, "a refcount")
    }

    /// A refcount block's bytes, from the refcounts in memory.
    pub fn block_bytes(&self, b: usize) -> Vec<u8> {
        let mut out = vec![0u8; CS as usize];
        let first = b * PER_BLOCK as usize;
        let counts = self.refs.iter().skip(first).take(PER_BLOCK as usize);
        for (i, n) in counts.enumerate() {
            out[i * 2..i * 2 + 2].copy_from_slice(&u16::from(*n).to_be_bytes());
        }
        out
    }

    /// Makes sure the cluster at `next` has a refcount block: a missing one takes that
    /// very cluster (it counts itself) and is written whole before the refcount table
    /// points to it.
    pub fn cover_next(&mut self, f: &File) -> Result<(), Qcow2Error> {
        loop {
            let c = self.next / CS;
            let b = (c / PER_BLOCK) as usize;
            if b >= self.rt.len() {
                return Err(Qcow2Error::Unsupported(format!(
                    "growing the image's file past {} bytes (its refcount table is full; \
                     copy again without --resume)",
                    self.next
                )));
            }
            if self.rt[b] != 0 {
                return Ok(());
            }
            let at = c * CS;
            self.set_ref(c, 1);
            self.next += CS;
            put(f, &self.block_bytes(b), at, "a refcount block")?;
            self.rt[b] = at;
            put(
                f,
                &at.to_be_bytes(),
                self.rt_offset + b as u64 * 8,
                "the refcount table",
            )?;
        }
    }

    /// A new cluster at the end of the file, counted.
    fn alloc(&mut self, f: &File) -> Result<u64, Qcow2Error> {
        self.cover_next(f)?;
        let c = self.next / CS;
        self.next += CS;
        self.count(f, c, 1)?;
        Ok(c * CS)
    }

    /// The file offset of the data cluster for `guest`, allocated and counted (and
    /// marked pending) when the guest cluster has none; the flag tells a pending one.
    pub fn data_cluster(&mut self, f: &File, guest: u64) -> Result<u64, Qcow2Error> {
        let e = self.get(guest);
        if e != 0 {
            return Ok(e);
        }
        let host = self.alloc(f)?;
        *self.slot(guest) = host | PENDING;
        Ok(host | PENDING)
    }

    /// The file offset of L1 index `i`'s L2 table; a missing one is allocated, written
    /// whole, and only then entered in the L1 table.
    fn l2_table(&mut self, f: &File, i: u64) -> Result<u64, Qcow2Error> {
        let at = self.l1[i as usize];
        if at != 0 {
            return Ok(at);
        }
        let at = self.alloc(f)?;
        let table = self.l2.entry(i).or_insert_with(empty_table);
        let mut b = Vec::with_capacity(CS as usize);
        for e in table.iter() {
            b.extend_from_slice(&on_disk(*e).to_be_bytes());
        }
        put(f, &b, at, "an L2 table")?;
        self.l1[i as usize] = at;
        put(
            f,
            &(at | COPIED).to_be_bytes(),
            self.l1_offset + i * 8,
            "the L1 table",
        )?;
        Ok(at)
    }

    /// Points the L2 table in the file to `host`, the pending cluster of `guest`, once
    /// its data is written (a no-op when another write published it already).
    pub fn publish(&mut self, f: &File, guest: u64, host: u64) -> Result<(), Qcow2Error> {
        if self.get(guest) != host | PENDING {
            return Ok(());
        }
        let table = self.l2_table(f, guest / L2_SPAN)?;
        *self.slot(guest) = host;
        let at = table + (guest % L2_SPAN) / CS * 8;
        put(f, &(host | COPIED).to_be_bytes(), at, "an L2 entry")
    }

    /// Unmaps `guest`'s cluster (it reads as zeros again): the L2 entry first, then the
    /// refcount. Returns the freed cluster's file offset.
    pub fn unmap(&mut self, f: &File, guest: u64) -> Result<Option<u64>, Qcow2Error> {
        let e = self.get(guest);
        if e == 0 || e & PENDING != 0 {
            return Ok(None);
        }
        let table = self.l1[(guest / L2_SPAN) as usize];
        *self.slot(guest) = 0;
        let at = table + (guest % L2_SPAN) / CS * 8;
        put(f, &0u64.to_be_bytes(), at, "an L2 entry")?;
        self.count(f, e / CS, 0)?;
        Ok(Some(e))
    }
}
