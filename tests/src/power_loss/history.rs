//! What a block device may hold after a crash, judged from the history of requests sent
//! to it: for every 4 KiB block, the content the last completed FLUSH (or FUA write)
//! covered, or any content requested after it (acknowledged or still in flight) — never
//! older, never anything else. Pure bookkeeping, no I/O.
//!
//! Requests in flight together never touch the same block (the workload reserves blocks),
//! so each block's versions form one sequence and every version is a whole 4 KiB image:
//! a partial write or trim is the previous image with some bytes replaced, exactly what
//! the store's read-merge-write logs.

use std::fmt;

/// The block size the history tracks.
pub const BLOCK: usize = 4096;

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// A write, with or without FUA.
    Write {
        /// Durable once acknowledged.
        fua: bool,
    },
    /// NBD_CMD_TRIM: the range reads as zeroes afterwards (the store guarantees it).
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
}

#[derive(Clone, Copy, Debug)]
enum Origin {
    /// What the block held when the history started (verified durable).
    Start,
    /// Request number `seq` of this kind.
    Request(u64, Request),
}

#[derive(Clone, Debug)]
struct Version {
    hash: blake3::Hash,
    origin: Origin,
    /// Logical time of the acknowledgement, if one arrived.
    acked: Option<u64>,
}

#[derive(Clone, Debug)]
struct Block {
    versions: Vec<Version>,
    /// Index of the newest version known durable.
    durable: usize,
    /// The newest version's bytes: the base of the next partial request.
    image: Vec<u8>,
    busy: bool,
}

/// A request in flight: which version of which block it created.
#[derive(Debug)]
pub struct Ticket {
    first: u64,
    versions: Vec<usize>,
    fua: bool,
}

/// How a block's content breaks the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// An older version than the one a completed flush (or FUA) covered.
    LostFlushedWrite,
    /// Zeroes, though no trim or zero write was requested since the durable version.
    Zeroes,
    /// Content that was written to another block.
    Misplaced,
    /// Content no request produced.
    Garbage,
}

/// One block that holds what it may not.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Block number.
    pub block: u64,
    /// What is wrong.
    pub problem: Problem,
    /// The details: what was found and what was allowed.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block {} ({:?}): {}",
            self.block, self.problem, self.detail
        )
    }
}

/// Counts for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Requests started.
    pub requests: u64,
    /// Requests acknowledged.
    pub acked: u64,
    /// Flushes completed.
    pub flushes: u64,
}

/// The history of one device between two verified states.
#[derive(Debug)]
pub struct History {
    blocks: Vec<Block>,
    /// Logical clock of acknowledgements.
    clock: u64,
    counts: Counts,
}

fn describe(v: &Version, idx: usize, durable: usize) -> String {
    // Request numbers print as <high half>.<low half>: the workload puts the cycle in
    // the high half.
    let n = |seq: u64| format!("#{}.{}", seq >> 32, seq & 0xffff_ffff);
    let what = match v.origin {
        Origin::Start => "content at the start of the cycle".to_string(),
        Origin::Request(seq, Request::Write { fua: false }) => format!("write {}", n(seq)),
        Origin::Request(seq, Request::Write { fua: true }) => format!("FUA write {}", n(seq)),
        Origin::Request(seq, Request::Trim) => format!("trim {}", n(seq)),
        Origin::Request(seq, Request::WriteZeroes) => format!("write-zeroes {}", n(seq)),
    };
    let state = match (v.acked, idx.cmp(&durable)) {
        (_, std::cmp::Ordering::Equal) => "durable",
        (_, std::cmp::Ordering::Less) => "superseded by a durable version",
        (Some(_), _) => "acked",
        (None, _) => "in flight at the cut",
    };
    format!("v{idx} = {what} ({state})")
}

impl History {
    /// Starts from `content`, the device's whole content, known durable.
    pub fn new(content: &[u8]) -> History {
        assert_eq!(content.len() % BLOCK, 0, "content is whole blocks");
        let blocks = content
            .chunks_exact(BLOCK)
            .map(|b| Block {
                versions: vec![Version {
                    hash: blake3::hash(b),
                    origin: Origin::Start,
                    acked: Some(0),
                }],
                durable: 0,
                image: b.to_vec(),
                busy: false,
            })
            .collect();
        History {
            blocks,
            clock: 1,
            counts: Counts::default(),
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether no request in flight touches bytes `off..off+len`.
    pub fn is_free(&self, off: u64, len: u64) -> bool {
        let (first, end) = span(off, len);
        self.blocks[first as usize..end as usize]
            .iter()
            .all(|b| !b.busy)
    }

    /// Records request `seq` over bytes `off..off+len` as sent: `data` for a write
    /// (`len` bytes), nothing for trims and zero writes. The range must be free.
    pub fn begin(
        &mut self,
        seq: u64,
        off: u64,
        len: u64,
        req: Request,
        data: Option<&[u8]>,
    ) -> Ticket {
        assert!(self.is_free(off, len), "overlapping requests in flight");
        let (first, end) = span(off, len);
        let mut versions = Vec::new();
        for b in first..end {
            let blk = &mut self.blocks[b as usize];
            let (lo, hi) = (
                off.max(b * BLOCK as u64),
                (off + len).min((b + 1) * BLOCK as u64),
            );
            let dst = (lo - b * BLOCK as u64) as usize..(hi - b * BLOCK as u64) as usize;
            match data {
                Some(d) => {
                    blk.image[dst].copy_from_slice(&d[(lo - off) as usize..(hi - off) as usize])
                }
                None => blk.image[dst].fill(0),
            }
            blk.versions.push(Version {
                hash: blake3::hash(&blk.image),
                origin: Origin::Request(seq, req),
                acked: None,
            });
            blk.busy = true;
            versions.push(blk.versions.len() - 1);
        }
        self.counts.requests += 1;
        Ticket {
            first,
            versions,
            fua: req == Request::Write { fua: true },
        }
    }

    /// The request was acknowledged (a FUA write is durable from now on).
    pub fn acked(&mut self, t: Ticket) {
        let now = self.clock;
        self.clock += 1;
        for (i, &v) in t.versions.iter().enumerate() {
            let blk = &mut self.blocks[t.first as usize + i];
            blk.versions[v].acked = Some(now);
            blk.busy = false;
            if t.fua && v > blk.durable {
                blk.durable = v;
            }
        }
        self.counts.acked += 1;
    }

    /// The request got no answer (the store died): it may or may not have happened.
    pub fn unanswered(&mut self, t: Ticket) {
        for i in 0..t.versions.len() {
            self.blocks[t.first as usize + i].busy = false;
        }
    }

    /// Call just before sending a FLUSH; pass the result to [`History::flushed`] when it
    /// completes. A flush covers what was acknowledged before it was sent.
    pub fn flush_sent(&self) -> u64 {
        self.clock
    }

    /// A FLUSH sent at `sent` completed.
    pub fn flushed(&mut self, sent: u64) {
        for blk in &mut self.blocks {
            if let Some(v) = blk.versions[blk.durable + 1..]
                .iter()
                .rposition(|v| v.acked.is_some_and(|t| t < sent))
            {
                blk.durable += v + 1;
            }
        }
        self.counts.flushes += 1;
    }

    /// Checks the device's whole content read back after a crash. At most `limit`
    /// violations are described.
    pub fn check(&self, content: &[u8], limit: usize) -> Vec<Violation> {
        assert_eq!(content.len(), self.blocks.len() * BLOCK);
        let mut out = Vec::new();
        for (b, found) in content.chunks_exact(BLOCK).enumerate() {
            let blk = &self.blocks[b];
            let hash = blake3::hash(found);
            if blk.versions[blk.durable..].iter().any(|v| v.hash == hash) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            out.push(self.explain(b, found, hash));
        }
        out
    }

    fn explain(&self, b: usize, found: &[u8], hash: blake3::Hash) -> Violation {
        let blk = &self.blocks[b];
        let allowed: Vec<String> = (blk.durable..blk.versions.len())
            .map(|i| describe(&blk.versions[i], i, blk.durable))
            .collect();
        let allowed = format!("allowed: {}", allowed.join("; "));
        let (problem, what) = if let Some(i) = blk.versions[..blk.durable]
            .iter()
            .rposition(|v| v.hash == hash)
        {
            let got = describe(&blk.versions[i], i, blk.durable);
            (Problem::LostFlushedWrite, format!("holds {got}"))
        } else if found.iter().all(|x| *x == 0) {
            (Problem::Zeroes, "holds zeroes".to_string())
        } else if let Some((ob, oi)) = self.find_elsewhere(hash) {
            let other = &self.blocks[ob].versions[oi];
            let got = describe(other, oi, self.blocks[ob].durable);
            (Problem::Misplaced, format!("holds block {ob}'s {got}"))
        } else {
            let head: String = found[..24].iter().map(|x| format!("{x:02x}")).collect();
            (
                Problem::Garbage,
                format!("holds bytes no request wrote ({head}...)"),
            )
        };
        Violation {
            block: b as u64,
            problem,
            detail: format!("{what}; {allowed}"),
        }
    }

    fn find_elsewhere(&self, hash: blake3::Hash) -> Option<(usize, usize)> {
        self.blocks.iter().enumerate().find_map(|(b, blk)| {
            blk.versions
                .iter()
                .position(|v| v.hash == hash)
                .map(|i| (b, i))
        })
    }

    /// Counts blocks whose durable version is newer than the start (for the report).
    pub fn durable_blocks(&self) -> u64 {
        self.blocks.iter().filter(|b| b.durable > 0).count() as u64
    }
}

/// The blocks `first..end` that bytes `off..off+len` touch.
fn span(off: u64, len: u64) -> (u64, u64) {
    (off / BLOCK as u64, (off + len).div_ceil(BLOCK as u64))
}

#[cfg(test)]
mod tests;
