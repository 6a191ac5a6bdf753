//! Repair of a bad block on the primary's copy (issue #8): a read that hits a block
//! failing its checksum fetches that block from an in-sync replica (`Read`, in the
//! primary's generation like every message, on a side stream), rewrites the local copy
//! with it and answers the read from the repaired copy.
//!
//! What comes back is trusted only as far as it can be checked: the replica's store
//! verified its own checksum when it read the bytes (a bad block there is refused, and the
//! next replica asked), and here the bytes must hash to the checksum the primary's own
//! table holds for the block (`Export::repair_block`), so a stale, short or lying answer
//! writes nothing. The answer to the client is read again from the local copy, checked as
//! every read is. With no in-sync replica holding a good copy the read fails with EIO as
//! before, and nothing is written.
//!
//! Writes need no coordination: the block store compares and rewrites under the lock that
//! keeps layer files still, so a block written meanwhile (whose checksum changed) is left
//! to that write, and a replica's copy older than an in-flight write does not match.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tessera_blockstore::{BlockRepair, Export, StoreError, BLOCK, BLOCK_SIZE};
use tessera_replication::wire::{Message, VolumeName, MAX_DATA};
use tessera_store_admin::{BlockRepaired, ReplicaState, REPAIRS_KEPT};

use super::reconcile::Asker;
use super::{Peer, PrimaryHandle};

/// How often a read looks for bad blocks again after repairing (a block rewritten by a
/// write during the repair may be found bad again only by a real fault).
const ROUNDS: usize = 2;

/// What this primary repaired, for `replication_status`.
#[derive(Default)]
pub struct Repairs {
    inner: Mutex<(u64, VecDeque<BlockRepaired>)>,
}

impl Repairs {
    /// Blocks repaired since the primary started.
    pub fn count(&self) -> u64 {
        self.inner.lock().0
    }

    /// The last repairs, oldest first.
    pub fn last(&self) -> Vec<BlockRepaired> {
        self.inner.lock().1.iter().cloned().collect()
    }

    fn note(&self, offset: u64, blocks: u64, from: &str) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut g = self.inner.lock();
        g.0 += blocks;
        let log = &mut g.1;
        // One run repaired from one replica in one read is one record.
        if let Some(l) = log.back_mut() {
            if l.from == from && l.offset + l.len == offset && l.time_ms == time_ms {
                l.len += blocks * BLOCK;
                return;
            }
        }
        if log.len() == REPAIRS_KEPT {
            log.pop_front();
        }
        log.push_back(BlockRepaired {
            offset,
            len: blocks * BLOCK,
            from: from.to_string(),
            time_ms,
        });
    }
}

/// Why a read could not be repaired (the client gets EIO with it).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The local copy failed otherwise than by a checksum.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// No in-sync replica gave bytes matching this copy's checksums.
    #[error("no in-sync replica had a good copy of the block at {offset}: {reasons}")]
    NoGoodCopy {
        /// The first block left bad.
        offset: u64,
        /// What each replica answered.
        reasons: String,
    },
    /// Not called where a replica can be asked.
    #[error("not inside the store's multi-threaded runtime")]
    NoRuntime,
}

impl PrimaryHandle {
    /// Reads `buf.len()` bytes at `offset` of `export` (this primary's volume), repairing
    /// from in-sync replicas every block of the range that fails its checksum (see the
    /// module's comment). Blocking: called by the NBD server's read on an async worker,
    /// which lends its thread to the runtime meanwhile.
    pub fn read_repaired(
        &self,
        export: &Export,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RepairError> {
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => h,
            _ => return Err(RepairError::NoRuntime),
        };
        tokio::task::block_in_place(|| {
            let first = offset / BLOCK;
            let end = (offset + buf.len() as u64).div_ceil(BLOCK);
            for _ in 0..ROUNDS {
                let bad = bad_blocks(export, first, end)?;
                if bad.is_empty() {
                    break;
                }
                self.repair(&handle, export, bad)?;
            }
            Ok(export.read_at(offset, buf)?)
        })
    }

    /// Repairs blocks `bad` (ascending) from the in-sync replicas, in id order.
    fn repair(
        &self,
        rt: &tokio::runtime::Handle,
        export: &Export,
        mut bad: Vec<u64>,
    ) -> Result<(), RepairError> {
        let volume = export.name();
        let name = VolumeName::new(volume).map_err(|e| StoreError::Invalid {
            field: "volume",
            reason: e.to_string(),
        })?;
        let mut reasons = Vec::new();
        for peer in self.in_sync() {
            if bad.is_empty() {
                break;
            }
            let runs = runs(&bad);
            let fetched = rt.block_on(async {
                tokio::time::timeout(self.timeout, fetch(self, &peer, &name, &runs))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
            });
            let got = match fetched {
                Ok(got) => got,
                Err(why) => {
                    tracing::warn!(volume, node = %peer.node, reason = %why,
                        "a replica could not give a block that failed its checksum here");
                    reasons.push(format!("{}: {why}", peer.node));
                    continue;
                }
            };
            let mut left = Vec::new();
            for ((start, _), data) in runs.iter().zip(got) {
                let mut repaired: Option<(u64, u64)> = None;
                for (i, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
                    let b = start + i as u64;
                    if bad.binary_search(&b).is_err() {
                        continue;
                    }
                    match export.repair_block(b * BLOCK, block)? {
                        BlockRepair::Rewritten => match &mut repaired {
                            Some((_, n)) => *n += 1,
                            None => repaired = Some((b, 1)),
                        },
                        BlockRepair::NotNeeded => {}
                        BlockRepair::Mismatch => {
                            reasons.push(format!(
                                "{}: its bytes at {} do not match this copy's checksum",
                                peer.node,
                                b * BLOCK
                            ));
                            left.push(b);
                        }
                    }
                    // Runs are contiguous: a gap only where a block needed nothing.
                    if let Some((r0, n)) = repaired {
                        if r0 + n != b + 1 {
                            self.noted(volume, &peer.node, r0, n);
                            repaired = None;
                        }
                    }
                }
                if let Some((r0, n)) = repaired {
                    self.noted(volume, &peer.node, r0, n);
                }
            }
            bad = left;
        }
        match bad.first() {
            None => Ok(()),
            Some(b) => {
                let reasons = if reasons.is_empty() {
                    "no replica is in sync".to_string()
                } else {
                    reasons.join("; ")
                };
                tracing::error!(volume, offset = b * BLOCK, blocks = bad.len(), reasons = %reasons,
                    "a block of this copy failed its checksum and no in-sync replica had a good copy: the read fails");
                Err(RepairError::NoGoodCopy {
                    offset: b * BLOCK,
                    reasons,
                })
            }
        }
    }

    fn noted(&self, volume: &str, from: &str, first: u64, blocks: u64) {
        tracing::warn!(
            volume,
            offset = first * BLOCK,
            len = blocks * BLOCK,
            from,
            "blocks of this copy failed their checksum on read: repaired from a replica's copy"
        );
        self.repairs.note(first * BLOCK, blocks, from);
    }

    /// The replicas in sync now, in id order.
    fn in_sync(&self) -> Vec<Peer> {
        let states = self.shared.states.lock();
        self.peers
            .read()
            .iter()
            .filter(|(r, _)| matches!(states.get(r), Some(ReplicaState::InSync {})))
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// The blocks of `first..end` whose read fails its checksum here.
fn bad_blocks(export: &Export, first: u64, end: u64) -> Result<Vec<u64>, StoreError> {
    let mut bad = Vec::new();
    let mut one = vec![0u8; BLOCK_SIZE];
    for b in first..end {
        match export.read_at(b * BLOCK, &mut one) {
            Ok(()) => {}
            Err(StoreError::Corrupt { .. }) => bad.push(b),
            Err(e) => return Err(e),
        }
    }
    Ok(bad)
}

/// `blocks` (ascending) as runs `(first, count)` of at most one `Read`'s worth.
fn runs(blocks: &[u64]) -> Vec<(u64, u64)> {
    let most = (MAX_DATA / BLOCK_SIZE) as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b && *n < most => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Asks `peer` for each run's bytes, on a side stream, in this primary's generation.
async fn fetch(
    p: &PrimaryHandle,
    peer: &Peer,
    name: &VolumeName,
    runs: &[(u64, u64)],
) -> Result<Vec<Vec<u8>>, String> {
    let mut a = Asker::open(&p.ep, peer).await?;
    let mut out = Vec::with_capacity(runs.len());
    for (request, &(first, blocks)) in (1u64..).zip(runs) {
        let len = blocks * BLOCK;
        let reply = a
            .ask(&Message::Read {
                volume: name.clone(),
                generation: p.generation(),
                request,
                offset: first * BLOCK,
                len: len as u32,
            })
            .await?;
        out.push(check_reply(reply, request, len)?);
    }
    Ok(out)
}

/// The bytes of a `ReadReply` to request `request` for `len` bytes, or why it is refused.
fn check_reply(reply: Message, request: u64, len: u64) -> Result<Vec<u8>, String> {
    match reply {
        Message::ReadReply {
            request: r,
            result: Ok(data),
        } if r == request => {
            if data.len() as u64 == len {
                Ok(data)
            } else {
                Err(format!(
                    "it answered {} bytes to a read of {len}: refused",
                    data.len()
                ))
            }
        }
        Message::ReadReply {
            request: r,
            result: Err(e),
        } if r == request => Err(format!("it refused: {e}")),
        Message::ReadReply { request: r, .. } => Err(format!(
            "it answered read {r} where {request} was asked: refused"
        )),
        // Never printed: it may carry megabytes of data.
        _ => Err("it answered a read with another kind of message: refused".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_replication::wire::{Generation, ReplyError};

    #[test]
    fn runs_are_contiguous_and_at_most_one_read() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        let many: Vec<u64> = (0..1500).collect();
        assert_eq!(runs(&many), vec![(0, 1024), (1024, 476)]);
    }

    #[test]
    fn only_a_reply_to_the_request_with_its_length_is_taken() {
        let ok = |request, len| Message::ReadReply {
            request,
            result: Ok(vec![7u8; len]),
        };
        assert_eq!(check_reply(ok(3, 4096), 3, 4096).unwrap(), vec![7u8; 4096]);
        assert!(check_reply(ok(3, 512), 3, 4096)
            .unwrap_err()
            .contains("512 bytes"));
        assert!(check_reply(ok(3, 8192), 3, 4096).is_err());
        assert!(check_reply(ok(2, 4096), 3, 4096)
            .unwrap_err()
            .contains("read 2"));
        let stale = Message::ReadReply {
            request: 3,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(9),
            }),
        };
        assert!(check_reply(stale, 3, 4096).unwrap_err().contains("stale"));
        let other = Message::Reply {
            seq: 3,
            result: Ok(()),
        };
        assert!(check_reply(other, 3, 4096)
            .unwrap_err()
            .contains("another kind"));
    }

    #[test]
    fn repairs_are_counted_and_runs_of_one_read_kept_as_one() {
        let r = Repairs::default();
        r.note(0, 1, "node2");
        r.note(BLOCK, 2, "node2");
        r.note(8 * BLOCK, 1, "node3");
        assert_eq!(r.count(), 4);
        let last = r.last();
        assert!(last.len() == 2 || last.len() == 3, "{last:?}");
        assert_eq!(last.last().unwrap().from, "node3");
        for i in 0..100 {
            r.note(1000 * BLOCK * (i + 1), 1, "node2");
        }
        assert_eq!(r.last().len(), REPAIRS_KEPT);
    }
}
