//! Reading a qcow2 image: its L1 and L2 tables are read and checked whole when the
//! image is opened (so a refusal comes before anything is written), then kept as a map
//! of guest clusters to file offsets; reads go to the file, unallocated and zero
//! clusters are reported as zeros and never read.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{be_u64, Header, Qcow2Error, COMPRESSED, OFFSET_MASK, V3_HEADER_LEN, ZERO_FLAG};

/// An opened qcow2 image.
pub struct Reader {
    file: File,
    header: Header,
    /// Per allocated L2 table (by L1 index): each cluster's offset in the file, 0 for
    /// one that reads as zeros.
    l2: HashMap<u64, Vec<u64>>,
}

impl Reader {
    /// Opens and checks an image (see the module's list of what is refused).
    pub fn open(file: File) -> Result<Reader, Qcow2Error> {
        let file_len = file
            .metadata()
            .map_err(Qcow2Error::io("reading the image's size"))?
            .len();
        let mut head = vec![0u8; (V3_HEADER_LEN as usize).min(file_len as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(Qcow2Error::io("reading the qcow2 header"))?;
        let header = Header::parse(&head, file_len)?;
        let cs = header.cluster_size();
        let tables = header.size.div_ceil(header.l2_span());
        let mut l1 = vec![0u8; tables as usize * 8];
        file.read_exact_at(&mut l1, header.l1_offset)
            .map_err(Qcow2Error::io("reading the L1 table"))?;
        let mut l2 = HashMap::new();
        for i in 0..tables {
            let at = be_u64(&l1, i as usize * 8) & OFFSET_MASK;
            if at == 0 {
                continue;
            }
            if at % cs != 0 || at + cs > file_len {
                return Err(Qcow2Error::Corrupt(format!(
                    "L2 table {i} at {at} lies outside the file ({file_len} bytes) or is not \
                     cluster-aligned"
                )));
            }
            let mut table = vec![0u8; cs as usize];
            file.read_exact_at(&mut table, at)
                .map_err(Qcow2Error::io(format!("reading L2 table {i}")))?;
            let mut map = Vec::with_capacity(table.len() / 8);
            for (j, raw) in table.chunks_exact(8).enumerate() {
                let e = be_u64(raw, 0);
                let guest = i * header.l2_span() + j as u64 * cs;
                if e & COMPRESSED != 0 {
                    return Err(Qcow2Error::Unsupported(format!(
                        "a compressed cluster (at guest offset {guest}; qemu-img convert \
                         -O qcow2 without -c writes an uncompressed image)"
                    )));
                }
                let host = e & OFFSET_MASK;
                let zero = header.version >= 3 && e & ZERO_FLAG != 0;
                if zero || host == 0 {
                    map.push(0);
                    continue;
                }
                if host % cs != 0 || host >= file_len {
                    return Err(Qcow2Error::Corrupt(format!(
                        "the cluster at guest offset {guest} points to {host}, outside the \
                         file ({file_len} bytes) or not cluster-aligned"
                    )));
                }
                map.push(host);
            }
            l2.insert(i, map);
        }
        Ok(Reader { file, header, l2 })
    }

    /// The guest size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// The file offset of the cluster holding guest offset `at`, `None` when it reads
    /// as zeros.
    fn host(&self, at: u64) -> Option<u64> {
        let span = self.header.l2_span();
        let cluster = (at % span) >> self.header.cluster_bits;
        self.l2
            .get(&(at / span))
            .and_then(|m| m.get(cluster as usize).copied())
            .filter(|h| *h != 0)
    }

    /// `[offset, offset + len)` as runs `(length, reads as zeros)`, neighbours of the
    /// same kind merged; they cover the range whole.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let cs = self.header.cluster_size();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (cs - at % cs).min(end - at);
            let zero = self.host(at).is_none();
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += n,
                _ => out.push((n, zero)),
            }
            at += n;
        }
        out
    }

    /// Reads `len` guest bytes at `offset`; clusters next to each other in the file are
    /// read at once. Bytes past the file's end read as zeros, as qemu reads them.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Qcow2Error> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.header.size)
        {
            return Err(Qcow2Error::Corrupt(format!(
                "a read of {len} bytes at {offset} past the image's size"
            )));
        }
        let mut buf = vec![0u8; len];
        let cs = self.header.cluster_size();
        let mut done = 0usize;
        // A run of guest bytes contiguous in the file: (buffer start, file offset, len).
        let mut run: Option<(usize, u64, usize)> = None;
        while done < len {
            let at = offset + done as u64;
            let n = ((cs - at % cs) as usize).min(len - done);
            let host = self.host(at).map(|h| h + at % cs);
            run = match (run, host) {
                (Some((s, h, l)), Some(x)) if h + l as u64 == x => Some((s, h, l + n)),
                (prev, next) => {
                    if let Some((s, h, l)) = prev {
                        self.read_run(&mut buf[s..s + l], h)?;
                    }
                    next.map(|x| (done, x, n))
                }
            };
            done += n;
        }
        if let Some((s, h, l)) = run {
            self.read_run(&mut buf[s..s + l], h)?;
        }
        Ok(buf)
    }

    fn read_run(&self, buf: &mut [u8], at: u64) -> Result<(), Qcow2Error> {
        let mut got = 0;
        while got < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[got..], at + got as u64)
                .map_err(Qcow2Error::io("reading the image"))?;
            if n == 0 {
                break; // the rest stays zeros
            }
            got += n;
        }
        Ok(())
    }
}
