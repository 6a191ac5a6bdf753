//! Writing a fresh qcow2 image (version 3, 64 KiB clusters, 16-bit refcounts).
//!
//! Layout: the header's cluster, the L1 table, then data clusters in the order writes
//! first touch them (pieces of a copy arrive out of order, 8 at a time), and at
//! [`Writer::finish`] the L2 tables, the refcount table and its blocks. Guest ranges
//! never written stay unallocated and read as zeros. The header is written last, so an
//! interrupted copy leaves a file no tool takes for a valid image.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::{Qcow2Error, COPIED, MAGIC, V3_HEADER_LEN};

/// 64 KiB clusters, qemu-img's default.
const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// Guest bytes one L2 table maps.
const L2_SPAN: u64 = CS / 8 * CS;
/// Refcounts are 2^4 = 16 bits wide, qemu's default.
const REFCOUNT_ORDER: u32 = 4;

/// Clusters allocated so far.
struct Layout {
    /// The next free file offset (cluster-aligned).
    next: u64,
    /// Per L1 index: each guest cluster's file offset (0: not allocated).
    l2: BTreeMap<u64, Vec<u64>>,
}

/// An image being written.
pub struct Writer {
    file: File,
    size: u64,
    l1_entries: u64,
    layout: Mutex<Layout>,
}

impl Writer {
    /// Starts an image of `size` guest bytes in `file` (created empty by the caller).
    pub fn create(file: File, size: u64) -> Writer {
        let l1_entries = size.div_ceil(L2_SPAN);
        let l1_clusters = (l1_entries * 8).div_ceil(CS).max(1);
        Writer {
            file,
            size,
            l1_entries,
            layout: Mutex::new(Layout {
                next: (1 + l1_clusters) * CS,
                l2: BTreeMap::new(),
            }),
        }
    }

    /// The guest size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file offset of guest offset `at`'s cluster, allocated on first use.
    fn cluster(&self, at: u64) -> Result<u64, Qcow2Error> {
        let mut l = self
            .layout
            .lock()
            .map_err(|_| Qcow2Error::Corrupt("a writer thread panicked".into()))?;
        let Layout { next, l2 } = &mut *l;
        let table = l2
            .entry(at / L2_SPAN)
            .or_insert_with(|| vec![0; (CS / 8) as usize]);
        let slot = &mut table[((at % L2_SPAN) / CS) as usize];
        if *slot == 0 {
            *slot = *next;
            *next += CS;
        }
        Ok(*slot)
    }

    /// Writes guest bytes `data` at `offset` (inside the size).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Qcow2Error::Corrupt(format!(
                "a write of {} bytes at {offset} past the image's size",
                data.len()
            )));
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let n = ((CS - at % CS) as usize).min(data.len() - done);
            let host = self.cluster(at)?;
            self.file
                .write_all_at(&data[done..done + n], host + at % CS)
                .map_err(Qcow2Error::io("writing the image"))?;
            done += n;
        }
        Ok(())
    }

    /// Writes the L2 tables, L1 table, refcounts and, last, the header, then makes the
    /// file durable.
    pub fn finish(&self) -> Result<(), Qcow2Error> {
        let mut l = self
            .layout
            .lock()
            .map_err(|_| Qcow2Error::Corrupt("a writer thread panicked".into()))?;
        let mut l1 = vec![0u8; (self.l1_entries * 8) as usize];
        let tables: Vec<(u64, Vec<u64>)> = std::mem::take(&mut l.l2).into_iter().collect();
        for (i, map) in tables {
            let at = l.next;
            l.next += CS;
            let mut b = Vec::with_capacity(CS as usize);
            for host in map {
                let e = if host == 0 { 0 } else { host | COPIED };
                b.extend_from_slice(&e.to_be_bytes());
            }
            self.put(&b, at, "an L2 table")?;
            let i = i as usize * 8;
            l1[i..i + 8].copy_from_slice(&(at | COPIED).to_be_bytes());
        }
        self.put(&l1, CS, "the L1 table")?;
        // The refcount table and blocks must count themselves too: grow them until
        // they cover every cluster of the file.
        let used = l.next / CS;
        let per_block = (CS * 8) >> REFCOUNT_ORDER;
        let (mut blocks, mut table) = (1u64, 1u64);
        loop {
            let total = used + table + blocks;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(CS);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        let total = used + table + blocks;
        let table_at = l.next;
        let blocks_at = table_at + table * CS;
        let mut rt = vec![0u8; (table * CS) as usize];
        for k in 0..blocks {
            let at = blocks_at + k * CS;
            rt[k as usize * 8..k as usize * 8 + 8].copy_from_slice(&at.to_be_bytes());
            let mut rb = vec![0u8; CS as usize];
            let first = k * per_block;
            for c in first..total.min(first + per_block) {
                let i = ((c - first) * 2) as usize;
                rb[i..i + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            self.put(&rb, at, "a refcount block")?;
        }
        self.put(&rt, table_at, "the refcount table")?;
        l.next = total * CS;
        self.file
            .sync_data()
            .map_err(Qcow2Error::io("syncing the image"))?;
        self.put(&self.header(table_at, table as u32), 0, "the header")?;
        self.file
            .sync_all()
            .map_err(Qcow2Error::io("syncing the image"))
    }

    fn put(&self, b: &[u8], at: u64, what: &str) -> Result<(), Qcow2Error> {
        self.file
            .write_all_at(b, at)
            .map_err(Qcow2Error::io(format!("writing {what}")))
    }

    fn header(&self, refcount_table: u64, refcount_clusters: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(V3_HEADER_LEN as usize + 8);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
        h.extend_from_slice(&0u32.to_be_bytes()); // backing file name length
        h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        h.extend_from_slice(&(self.l1_entries as u32).to_be_bytes());
        h.extend_from_slice(&CS.to_be_bytes()); // L1 table offset
        h.extend_from_slice(&refcount_table.to_be_bytes());
        h.extend_from_slice(&refcount_clusters.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
        h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
        h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
        h.extend_from_slice(&[0u8; 8]); // the end of header extensions
        h
    }
}
