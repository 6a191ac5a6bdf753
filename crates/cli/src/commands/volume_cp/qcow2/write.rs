//! Writing a qcow2 image (version 3, 64 KiB clusters, 16-bit refcounts) that is a valid
//! image at every moment, as qemu keeps its own: a copy killed at any point leaves a
//! file `qemu-img check` accepts (at worst with leaked clusters, "no harm to data"), and
//! `--resume` continues it ([`Writer::resume`], `resume.rs`).
//!
//! A fresh image: the header's cluster, the L1 table, the refcount table (sized for the
//! largest file the image can come to, with room for resumes), the first refcount
//! block; the header is written last of these, after a sync. Then refcount blocks, L2
//! tables and data clusters are added at the end of the file in the order writes need
//! them (pieces of a copy arrive out of order, 8 at a time). Guest ranges never written
//! stay unallocated and read as zeros.
//!
//! Why every step leaves a valid image: a new cluster's refcount is written before its
//! content, and its content before the entry that points to it (a new L2 table whole
//! before its L1 entry, a new refcount block whole before its refcount table entry);
//! freeing clears the entry before the refcount. A kill between two steps leaks a
//! cluster at worst; [`Writer::finish`] rewrites every refcount block from the map, so
//! a finished image has no leak. The order holds for a killed process (the page cache
//! keeps every write it made); after a power cut, a resume recomputes the refcounts
//! from the map and checks every piece's digest, so what did not reach the disk is
//! copied again (an image whose tables disagree with its refcounts is refused).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::FallocateFlags;

use super::meta::{Meta, CLUSTER_BITS, CS, L2_SPAN, PENDING, PER_BLOCK, REFCOUNT_ORDER};
use super::{Qcow2Error, MAGIC, V3_HEADER_LEN};

/// An image being written.
pub struct Writer {
    file: File,
    size: u64,
    meta: Mutex<Meta>,
}

impl Writer {
    /// Starts an image of `size` guest bytes in `file` (created empty by the caller).
    pub fn create(file: File, size: u64) -> Result<Writer, Qcow2Error> {
        let l1_entries = size.div_ceil(L2_SPAN);
        let l1_clusters = (l1_entries * 8).div_ceil(CS).max(1);
        // Clusters a full image holds (header, L1, data, L2 tables), four times over:
        // resumes add clusters at the end and never reuse freed ones. One cluster of
        // refcount table covers 16 TiB of file, so this costs nothing below 4 TiB.
        let full = 1 + l1_clusters + size.div_ceil(CS) + l1_entries;
        let blocks = (4 * full).div_ceil(PER_BLOCK) + 1;
        let rt_clusters = (blocks * 8).div_ceil(CS);
        let rt_offset = (1 + l1_clusters) * CS;
        let next = rt_offset + rt_clusters * CS;
        let mut meta = Meta {
            next,
            l1_offset: CS,
            l1: vec![0; l1_entries as usize],
            l2: Default::default(),
            rt_offset,
            rt: vec![0; (rt_clusters * CS / 8) as usize],
            refs: vec![1; (next / CS) as usize],
        };
        // The L1 table and the refcount table's free entries are the file's holes.
        meta.cover_next(&file)?;
        file.sync_data()
            .map_err(Qcow2Error::io("syncing the image"))?;
        let w = Writer {
            file,
            size,
            meta: Mutex::new(meta),
        };
        w.put(
            &w.header(l1_entries as u32, rt_offset, rt_clusters as u32),
            0,
            "the header",
        )?;
        Ok(w)
    }

    /// An image opened by `resume.rs`.
    pub(super) fn from_parts(file: File, size: u64, meta: Meta) -> Writer {
        Writer {
            file,
            size,
            meta: Mutex::new(meta),
        }
    }

    /// The guest size.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn lock(&self) -> Result<MutexGuard<'_, Meta>, Qcow2Error> {
        self.meta
            .lock()
            .map_err(|_| Qcow2Error::Corrupt("a writer thread panicked".into()))
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Qcow2Error::Corrupt(format!(
                "{what} of {len} bytes at {offset} past the image's size"
            )));
        }
        Ok(())
    }

    /// Writes guest bytes `data` at `offset` (inside the size): clusters missing are
    /// allocated and counted, the data written, then the L2 entries pointing to it.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        self.check_range("a write", offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        // (guest cluster, its file offset with PENDING when this write must publish it)
        let mut hosts = Vec::new();
        {
            let mut m = self.lock()?;
            let mut c = offset / CS * CS;
            while c < end {
                hosts.push((c, m.data_cluster(&self.file, c)?));
                c += CS;
            }
        }
        // The data, each run of clusters contiguous in the file at once.
        let mut i = 0;
        while i < hosts.len() {
            let mut j = i + 1;
            while j < hosts.len() && hosts[j].1 & !PENDING == (hosts[j - 1].1 & !PENDING) + CS {
                j += 1;
            }
            let (g0, g1) = (hosts[i].0.max(offset), (hosts[j - 1].0 + CS).min(end));
            let at = (hosts[i].1 & !PENDING) + (g0 - hosts[i].0);
            let part = &data[(g0 - offset) as usize..(g1 - offset) as usize];
            self.put(part, at, "data")?;
            i = j;
        }
        let mut m = self.lock()?;
        for (c, host) in hosts {
            if host & PENDING != 0 {
                m.publish(&self.file, c, host & !PENDING)?;
            }
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: a whole cluster is unmapped (its
    /// refcount set to 0, its space punched out), part of one is overwritten with zeros;
    /// unallocated clusters are left as they are.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        self.check_range("a zero write", offset, len)?;
        let end = offset + len;
        let mut c = offset / CS * CS;
        while c < end {
            let (g0, g1) = (c.max(offset), (c + CS).min(end));
            let whole = g0 == c && (g1 == c + CS || g1 == self.size);
            let mut m = self.lock()?;
            if !m.l2.contains_key(&(c / L2_SPAN)) {
                // Nothing mapped in this table's span: skip to the next one.
                c = (c / L2_SPAN + 1) * L2_SPAN;
                continue;
            }
            let e = m.get(c);
            if e != 0 && whole && e & PENDING == 0 {
                if let Some(host) = m.unmap(&self.file, c)? {
                    drop(m);
                    // Only saves space: the cluster is free whatever it holds.
                    let _ = nix::fcntl::fallocate(
                        self.file.as_raw_fd(),
                        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        host as i64,
                        CS as i64,
                    );
                }
            } else if e != 0 {
                drop(m);
                let zeros = vec![0u8; (g1 - g0) as usize];
                self.put(&zeros, (e & !PENDING) + (g0 - c), "zeros")?;
            }
            c += CS;
        }
        Ok(())
    }

    /// Reads `len` guest bytes at `offset` as the image holds them (what `--resume`
    /// compares with the source); bytes past the file's end read as zeros.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Qcow2Error> {
        self.check_range("a read", offset, len as u64)?;
        let end = offset + len as u64;
        let hosts: Vec<(u64, u64)> = {
            let m = self.lock()?;
            (offset / CS..end.div_ceil(CS))
                .map(|k| (k * CS, m.get(k * CS) & !PENDING))
                .collect()
        };
        let mut buf = vec![0u8; len];
        for (c, host) in hosts.into_iter().filter(|(_, h)| *h != 0) {
            let (g0, g1) = (c.max(offset), (c + CS).min(end));
            let part = &mut buf[(g0 - offset) as usize..(g1 - offset) as usize];
            let mut got = 0;
            while got < part.len() {
                let n = self
                    .file
                    .read_at(&mut part[got..], host + (g0 - c) + got as u64)
                    .map_err(Qcow2Error::io("reading the image"))?;
                if n == 0 {
                    break; // the rest stays zeros
                }
                got += n;
            }
        }
        Ok(buf)
    }

    /// Rewrites every refcount block from the map (a resumed image loses the leaks a
    /// killed copy left), gives the file its last cluster whole, and makes it durable.
    pub fn finish(&self) -> Result<(), Qcow2Error> {
        let m = self.lock()?;
        for (b, at) in m.rt.iter().enumerate().filter(|(_, at)| **at != 0) {
            self.put(&m.block_bytes(b), *at, "a refcount block")?;
        }
        let len = self
            .file
            .metadata()
            .map_err(Qcow2Error::io("reading the image's size"))?
            .len();
        if len < m.next {
            self.file
                .set_len(m.next)
                .map_err(Qcow2Error::io("sizing the image"))?;
        }
        self.file
            .sync_all()
            .map_err(Qcow2Error::io("syncing the image"))
    }

    fn put(&self, b: &[u8], at: u64, what: &str) -> Result<(), Qcow2Error> {
        super::meta::put(&self.file, b, at, what)
    }

    fn header(&self, l1_entries: u32, refcount_table: u64, refcount_clusters: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(V3_HEADER_LEN as usize + 8);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
        h.extend_from_slice(&0u32.to_be_bytes()); // backing file name length
        h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        h.extend_from_slice(&l1_entries.to_be_bytes());
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
