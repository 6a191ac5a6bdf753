//! On-disk encodings: block checksum entries and write-ahead-log records.
//!
//! Pure encode/decode, no I/O, so the formats are tested byte for byte and a replica can
//! later receive exactly these records over the network.

use crate::error::FormatError;

/// Granularity of allocation, checksumming and copy-on-write.
///
/// 4 KiB matches the page size and the block size guests and filesystems issue, so a 4 KiB
/// random write never turns into a read-modify-write, and the checksum table costs 32 B per
/// 4 KiB (0.8 %). See `docs/storage.md` for the trade-off against larger extents.
pub const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] as a `u64`, for offset arithmetic.
pub const BLOCK: u64 = BLOCK_SIZE as u64;
/// Length of one entry of a layer's checksum table.
pub const SUM_LEN: usize = 32;

/// What a layer says about one block, as stored in its checksum table.
///
/// An all-zero entry means the layer does not hold the block (reads fall through to the
/// backing layer); that is what a hole in the sparse table reads as, so an untouched layer
/// costs no space. An all-ones entry means the block reads as zeroes in this layer,
/// hiding whatever a backing layer holds, without data being stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEntry {
    /// Not in this layer: look in the backing layer.
    Absent,
    /// Reads as zeroes; no data stored.
    Zero,
    /// Data is stored and its blake3 hash is this.
    Data([u8; SUM_LEN]),
}

const ZERO_MARK: [u8; SUM_LEN] = [0xff; SUM_LEN];
const ABSENT_MARK: [u8; SUM_LEN] = [0; SUM_LEN];

impl BlockEntry {
    /// The 32 bytes stored in the checksum table.
    pub fn encode(&self) -> [u8; SUM_LEN] {
        match self {
            BlockEntry::Absent => ABSENT_MARK,
            BlockEntry::Zero => ZERO_MARK,
            BlockEntry::Data(h) => *h,
        }
    }

    /// Reads one table entry. A data hash equal to either marker has probability 2^-256.
    pub fn decode(raw: &[u8; SUM_LEN]) -> BlockEntry {
        if *raw == ABSENT_MARK {
            BlockEntry::Absent
        } else if *raw == ZERO_MARK {
            BlockEntry::Zero
        } else {
            BlockEntry::Data(*raw)
        }
    }
}

/// The checksum of one block's content.
pub fn block_hash(data: &[u8]) -> [u8; SUM_LEN] {
    *blake3::hash(data).as_bytes()
}

/// Which marker a fill record writes over a range of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillKind {
    /// Remove the blocks from the layer (a trim on a layer without backing).
    Absent,
    /// Make the blocks read as zeroes (a trim or write-zeroes over a backing layer).
    Zero,
}

impl FillKind {
    /// The entry this fill leaves in the checksum table.
    pub fn entry(self) -> BlockEntry {
        match self {
            FillKind::Absent => BlockEntry::Absent,
            FillKind::Zero => BlockEntry::Zero,
        }
    }
}

/// Magic number at the start of every WAL record ("TWAL").
pub const WAL_MAGIC: u32 = 0x5457_414c;
/// Version of the WAL record format written by this code.
pub const WAL_VERSION: u8 = 1;
/// Length of a WAL record header.
pub const WAL_HEADER_LEN: usize = 64;
/// Largest number of blocks one record may carry (32 MiB of data).
pub const WAL_MAX_BLOCKS: u32 = 8192;

const KIND_DATA: u8 = 1;
const KIND_FILL: u8 = 2;
const KIND_SEAL: u8 = 3;
const KIND_PLACED: u8 = 4;
const KIND_FLUSHED: u8 = 5;

/// What a WAL record does, without its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `nblocks` blocks of data follow, each with its hash.
    Data,
    /// The range is set to this marker; no payload.
    Fill(FillKind),
    /// The segment numbered `first_block` was synced whole before this record was
    /// written (the WAL's proof for recovery); no payload, `nblocks` is 0.
    Seal,
    /// `nblocks` hashes follow, no data: the blocks were written straight to their place
    /// in the layer's data file (a large write). Recovery keeps a block's new version only
    /// if the data in place matches; see `docs/storage.md`, "Large writes".
    Placed,
    /// A flush completed: every record before offset `first_block` of segment `layer`
    /// (and every earlier segment) was durable. Appended after the sync, unsynced; it
    /// becomes durable with the next one. Recovery uses it to tell damage (a bad record a
    /// flush covered) from a crash's torn tail. No payload, `nblocks` is 0.
    Flushed,
}

/// The fixed part of a WAL record.
///
/// Layout (little endian): magic u32, version u8, kind u8, fill u8, pad u8, nblocks u32,
/// pad u32, segment u64, layer u64, first_block u64, generation u64, then 16 bytes of
/// blake3 over bytes 0..48 and the block hashes. Block data is covered by the per-block
/// hashes, so a torn record is detected without hashing the payload twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record does.
    pub kind: RecordKind,
    /// Number of blocks covered.
    pub nblocks: u32,
    /// The WAL segment the record was written to; guards against replaying stale bytes.
    pub segment: u64,
    /// The layer the record changes.
    pub layer: u64,
    /// First block of the range.
    pub first_block: u64,
    /// The volume generation the writer held (the fence for replication).
    pub generation: u64,
}

impl RecordHeader {
    /// Length of the payload following the header.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            RecordKind::Data => self.nblocks as usize * (SUM_LEN + BLOCK_SIZE),
            RecordKind::Placed => self.nblocks as usize * SUM_LEN,
            RecordKind::Fill(_) | RecordKind::Seal | RecordKind::Flushed => 0,
        }
    }

    /// The marker of a flush that made everything before `offset` of segment `seg`
    /// durable.
    pub fn flushed(seg: u64, offset: u64) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Flushed,
            nblocks: 0,
            segment: 0,
            layer: seg,
            first_block: offset,
            generation: 0,
        }
    }

    /// The seal record of segment `sealed` (its `segment` is set when it is appended).
    ///
    /// `len` is the sealed segment's length: its file may be longer (segment files are
    /// reused, and hold an earlier life's records past it). 0 means "the whole file" (seal
    /// records written before segments were reused).
    pub fn seal(sealed: u64, len: u64) -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Seal,
            nblocks: 0,
            segment: 0,
            layer: len,
            first_block: sealed,
            generation: 0,
        }
    }

    /// Number of block hashes following the header.
    pub fn hash_count(&self) -> usize {
        match self.kind {
            RecordKind::Data | RecordKind::Placed => self.nblocks as usize,
            RecordKind::Fill(_) | RecordKind::Seal | RecordKind::Flushed => 0,
        }
    }

    /// Encodes the header; `hashes` are the block hashes that follow it (empty for fills).
    pub fn encode(&self, hashes: &[u8]) -> [u8; WAL_HEADER_LEN] {
        let mut h = [0u8; WAL_HEADER_LEN];
        h[0..4].copy_from_slice(&WAL_MAGIC.to_le_bytes());
        h[4] = WAL_VERSION;
        let (kind, fill) = match self.kind {
            RecordKind::Data => (KIND_DATA, 0),
            RecordKind::Fill(FillKind::Absent) => (KIND_FILL, 0),
            RecordKind::Fill(FillKind::Zero) => (KIND_FILL, 1),
            RecordKind::Seal => (KIND_SEAL, 0),
            RecordKind::Placed => (KIND_PLACED, 0),
            RecordKind::Flushed => (KIND_FLUSHED, 0),
        };
        h[5] = kind;
        h[6] = fill;
        h[8..12].copy_from_slice(&self.nblocks.to_le_bytes());
        h[16..24].copy_from_slice(&self.segment.to_le_bytes());
        h[24..32].copy_from_slice(&self.layer.to_le_bytes());
        h[32..40].copy_from_slice(&self.first_block.to_le_bytes());
        h[40..48].copy_from_slice(&self.generation.to_le_bytes());
        let sum = header_sum(&h[0..48], hashes);
        h[48..64].copy_from_slice(&sum);
        h
    }

    /// Decodes and checks a header. `hashes` must be the bytes after the header
    /// (`nblocks * 32` of them for data records): the caller reads the header, learns the
    /// length, reads the hashes, then calls this to verify both together.
    pub fn decode_unchecked(h: &[u8; WAL_HEADER_LEN]) -> Result<RecordHeader, FormatError> {
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if magic != WAL_MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        if h[4] != WAL_VERSION {
            return Err(FormatError::UnsupportedVersion(h[4]));
        }
        let kind = match (h[5], h[6]) {
            (KIND_DATA, 0) => RecordKind::Data,
            (KIND_FILL, 0) => RecordKind::Fill(FillKind::Absent),
            (KIND_FILL, 1) => RecordKind::Fill(FillKind::Zero),
            (KIND_SEAL, 0) => RecordKind::Seal,
            (KIND_PLACED, 0) => RecordKind::Placed,
            (KIND_FLUSHED, 0) => RecordKind::Flushed,
            (k, f) => return Err(FormatError::BadKind(k, f)),
        };
        let nblocks = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let length_ok = match kind {
            RecordKind::Data | RecordKind::Placed => (1..=WAL_MAX_BLOCKS).contains(&nblocks),
            RecordKind::Fill(_) => nblocks != 0,
            RecordKind::Seal | RecordKind::Flushed => nblocks == 0,
        };
        if !length_ok {
            return Err(FormatError::BadLength(nblocks));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        Ok(RecordHeader {
            kind,
            nblocks,
            segment: u64_at(16),
            layer: u64_at(24),
            first_block: u64_at(32),
            generation: u64_at(40),
        })
    }

    /// Verifies the header checksum over the header and the block hashes.
    pub fn verify(h: &[u8; WAL_HEADER_LEN], hashes: &[u8]) -> Result<(), FormatError> {
        if header_sum(&h[0..48], hashes) != h[48..64] {
            return Err(FormatError::BadChecksum);
        }
        Ok(())
    }
}

fn header_sum(head: &[u8], hashes: &[u8]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(head);
    hasher.update(hashes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let h = block_hash(&[7u8; BLOCK_SIZE]);
        for e in [BlockEntry::Absent, BlockEntry::Zero, BlockEntry::Data(h)] {
            assert_eq!(BlockEntry::decode(&e.encode()), e);
        }
    }

    #[test]
    fn header_round_trip_and_tamper_detection() {
        let hdr = RecordHeader {
            kind: RecordKind::Data,
            nblocks: 2,
            segment: 9,
            layer: 3,
            first_block: 1 << 40,
            generation: 5,
        };
        let hashes = [1u8; 64];
        let raw = hdr.encode(&hashes);
        assert_eq!(RecordHeader::decode_unchecked(&raw).unwrap(), hdr);
        RecordHeader::verify(&raw, &hashes).unwrap();
        let mut other = hashes;
        other[10] ^= 1;
        assert!(RecordHeader::verify(&raw, &other).is_err());
        for i in 0..WAL_HEADER_LEN {
            let mut bad = raw;
            bad[i] ^= 0x40;
            let ok = RecordHeader::decode_unchecked(&bad)
                .and_then(|_| RecordHeader::verify(&bad, &hashes))
                .is_ok();
            assert!(!ok, "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn fill_header_has_no_payload() {
        let hdr = RecordHeader {
            kind: RecordKind::Fill(FillKind::Zero),
            nblocks: u32::MAX,
            segment: 1,
            layer: 1,
            first_block: 0,
            generation: 1,
        };
        let raw = hdr.encode(&[]);
        let back = RecordHeader::decode_unchecked(&raw).unwrap();
        assert_eq!(back.payload_len(), 0);
        assert_eq!(back, hdr);
    }

    #[test]
    fn seal_header_round_trips_and_carries_no_blocks() {
        let mut hdr = RecordHeader::seal(41, 4096);
        hdr.segment = 42;
        let raw = hdr.encode(&[]);
        let back = RecordHeader::decode_unchecked(&raw).unwrap();
        assert_eq!(back, hdr);
        assert_eq!(back.payload_len(), 0);
        RecordHeader::verify(&raw, &[]).unwrap();
        let mut with_blocks = hdr;
        with_blocks.nblocks = 1;
        assert!(matches!(
            RecordHeader::decode_unchecked(&with_blocks.encode(&[])),
            Err(FormatError::BadLength(1))
        ));
    }

    #[test]
    fn placed_header_carries_hashes_but_no_data() {
        let hdr = RecordHeader {
            kind: RecordKind::Placed,
            nblocks: 3,
            segment: 2,
            layer: 7,
            first_block: 100,
            generation: 1,
        };
        let hashes = [9u8; 3 * SUM_LEN];
        let raw = hdr.encode(&hashes);
        let back = RecordHeader::decode_unchecked(&raw).unwrap();
        assert_eq!(back, hdr);
        assert_eq!(back.payload_len(), 3 * SUM_LEN);
        assert_eq!(back.hash_count(), 3);
        RecordHeader::verify(&raw, &hashes).unwrap();
        let mut empty = hdr;
        empty.nblocks = 0;
        assert!(RecordHeader::decode_unchecked(&empty.encode(&[])).is_err());
    }

    #[test]
    fn oversized_data_record_is_rejected() {
        let hdr = RecordHeader {
            kind: RecordKind::Data,
            nblocks: WAL_MAX_BLOCKS + 1,
            segment: 1,
            layer: 1,
            first_block: 0,
            generation: 1,
        };
        let raw = hdr.encode(&[]);
        assert!(matches!(
            RecordHeader::decode_unchecked(&raw),
            Err(FormatError::BadLength(_))
        ));
    }
}
