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
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tessera_blockstore::{BlockRepair, Export, StoreError, BLOCK, BLOCK_SIZE};
use tessera_replication::wire::{Message, RepairOutcome, VolumeName, MAX_DATA};
use tessera_store_admin::{BlockRepaired, ReplicaState, REPAIRS_KEPT};

use super::reconcile::Asker;
use super::{Peer, PrimaryHandle};

/// How often a read looks for bad blocks again after repairing (a block rewritten by a
/// write during the repair may be found bad again only by a real fault).
const ROUNDS: usize = 2;

/// What this primary repaired, for `replication_status`; clones share it (the catch-ups
/// note what they repair on a replica's copy here too).
#[derive(Clone, Default)]
pub struct Repairs {
    inner: Arc<Mutex<(u64, VecDeque<BlockRepaired>)>>,
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

    pub(crate) fn note(
        &self,
        offset: u64,
        blocks: u64,
        from: &str,
        on: Option<&str>,
        snapshot: Option<&str>,
    ) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut g = self.inner.lock();
        g.0 += blocks;
        let log = &mut g.1;
        // One run repaired from one replica in one read is one record.
        if let Some(l) = log.back_mut() {
            if l.from == from
                && l.offset + l.len == offset
                && l.time_ms == time_ms
                && l.on.as_deref() == on
                && l.snapshot.as_deref() == snapshot
            {
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
            on: on.map(str::to_string),
            snapshot: snapshot.map(str::to_string),
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
        let (volume, snapshot) = match export.name().split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (export.name(), None),
        };
        let wire_name = |n: &str| {
            VolumeName::new(n).map_err(|e| StoreError::Invalid {
                field: "volume",
                reason: e.to_string(),
            })
        };
        let name = wire_name(volume)?;
        let snap = snapshot.map(wire_name).transpose()?;
        let target = Target {
            volume: &name,
            snapshot: snap.as_ref(),
        };
        let mut reasons = Vec::new();
        // Replicas whose copy could not give blocks: given the good bytes afterwards.
        let mut to_tell: Vec<(Peer, Vec<u64>)> = Vec::new();
        for peer in self.in_sync() {
            if bad.is_empty() {
                break;
            }
            let runs = runs(&bad);
            let fetched = rt.block_on(async {
                tokio::time::timeout(self.timeout, fetch(self, &peer, target, &runs))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
            });
            let got = match fetched {
                Ok(got) => got,
                Err(why) => {
                    tracing::warn!(volume, node = %peer.node, reason = %why,
                        "a replica could not give a block that failed its checksum here");
                    reasons.push(format!("{}: {why}", peer.node));
                    to_tell.push((peer.clone(), bad.clone()));
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
                            self.noted(export.name(), &peer.node, r0, n, snapshot);
                            repaired = None;
                        }
                    }
                }
                if let Some((r0, n)) = repaired {
                    self.noted(export.name(), &peer.node, r0, n, snapshot);
                }
            }
            if !left.is_empty() {
                to_tell.push((peer.clone(), left.clone()));
            }
            bad = left;
        }
        for (peer, blocks) in to_tell {
            // Only blocks now good here; a block still bad here has nothing to give.
            let good: Vec<u64> = blocks
                .into_iter()
                .filter(|b| bad.binary_search(b).is_err())
                .collect();
            if !good.is_empty() {
                self.tell(rt, export, target, &peer, &good);
            }
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

    fn noted(&self, export: &str, from: &str, first: u64, blocks: u64, snapshot: Option<&str>) {
        tracing::warn!(
            volume = export,
            offset = first * BLOCK,
            len = blocks * BLOCK,
            from,
            "blocks of this copy failed their checksum on read: repaired from a replica's copy"
        );
        self.repairs
            .note(first * BLOCK, blocks, from, None, snapshot);
    }

    /// Gives `peer` this copy's bytes of `blocks` (ascending, each reading well here),
    /// which its copy could not give: `Repair`, in this primary's generation, one block
    /// each; the replica writes them only where they match its own checksum.
    fn tell(
        &self,
        rt: &tokio::runtime::Handle,
        export: &Export,
        target: Target<'_>,
        peer: &Peer,
        blocks: &[u64],
    ) {
        let mut good = Vec::with_capacity(blocks.len());
        for &b in blocks {
            let mut data = vec![0u8; BLOCK_SIZE];
            match export.read_at(b * BLOCK, &mut data) {
                Ok(()) => good.push((b, data)),
                Err(e) => {
                    tracing::warn!(volume = export.name(), offset = b * BLOCK, error = %e,
                        "a block to give a replica no longer reads here: not sent");
                }
            }
        }
        let told = rt.block_on(async {
            tokio::time::timeout(self.timeout, give(self, peer, target, &good))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
        });
        let outcomes = match told {
            Ok(o) => o,
            Err(why) => {
                tracing::warn!(volume = export.name(), node = %peer.node, reason = %why,
                    "a replica's copy that could not give a block was not repaired");
                return;
            }
        };
        for ((b, _), outcome) in good.iter().zip(outcomes) {
            match outcome {
                RepairOutcome::Rewritten => {
                    tracing::warn!(volume = export.name(), offset = b * BLOCK, len = BLOCK,
                        node = %peer.node,
                        "a block of a replica's copy failed its checksum: repaired with this copy's bytes");
                    self.repairs.note(
                        b * BLOCK,
                        1,
                        "primary",
                        Some(&peer.node),
                        target.snapshot.map(VolumeName::as_str),
                    );
                }
                RepairOutcome::NotNeeded => {}
                RepairOutcome::Mismatch => {
                    tracing::warn!(volume = export.name(), offset = b * BLOCK, node = %peer.node,
                        "a replica's copy refused this copy's bytes for a block (they do not match its checksum)");
                }
            }
        }
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
pub(in crate::repl) fn bad_blocks(
    export: &Export,
    first: u64,
    end: u64,
) -> Result<Vec<u64>, StoreError> {
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

/// What is repaired: the volume, or its snapshot.
#[derive(Clone, Copy)]
struct Target<'a> {
    volume: &'a VolumeName,
    snapshot: Option<&'a VolumeName>,
}

/// Asks `peer` for each run's bytes, on a side stream, in this primary's generation.
async fn fetch(
    p: &PrimaryHandle,
    peer: &Peer,
    target: Target<'_>,
    runs: &[(u64, u64)],
) -> Result<Vec<Vec<u8>>, String> {
    let mut a = Asker::open(&p.ep, peer).await?;
    let mut out = Vec::with_capacity(runs.len());
    for (request, &(first, blocks)) in (1u64..).zip(runs) {
        let len = blocks * BLOCK;
        let (volume, generation, offset) = (target.volume.clone(), p.generation(), first * BLOCK);
        let ask = match target.snapshot {
            None => Message::Read {
                volume,
                generation,
                request,
                offset,
                len: len as u32,
            },
            Some(s) => Message::SnapshotRead {
                volume,
                generation,
                request,
                snapshot: s.clone(),
                offset,
                len: len as u32,
            },
        };
        let reply = a.ask(&ask).await?;
        out.push(check_reply(reply, request, len)?);
    }
    Ok(out)
}

/// Sends `peer` a `Repair` for each block, on a side stream, in this primary's
/// generation: what each did.
async fn give(
    p: &PrimaryHandle,
    peer: &Peer,
    target: Target<'_>,
    blocks: &[(u64, Vec<u8>)],
) -> Result<Vec<RepairOutcome>, String> {
    let mut a = Asker::open(&p.ep, peer).await?;
    let mut out = Vec::with_capacity(blocks.len());
    for (request, (b, data)) in (1u64..).zip(blocks) {
        let reply = a
            .ask(&Message::Repair {
                volume: target.volume.clone(),
                generation: p.generation(),
                request,
                snapshot: target.snapshot.cloned(),
                offset: b * BLOCK,
                data: data.clone(),
            })
            .await?;
        out.push(check_repair_reply(reply, request)?);
    }
    Ok(out)
}

/// The outcome in a `RepairReply` to request `request`, or why it is refused.
fn check_repair_reply(reply: Message, request: u64) -> Result<RepairOutcome, String> {
    match reply {
        Message::RepairReply {
            request: r,
            result: Ok(o),
        } if r == request => Ok(o),
        Message::RepairReply {
            request: r,
            result: Err(e),
        } if r == request => Err(format!("it refused: {e}")),
        Message::RepairReply { request: r, .. } => Err(format!(
            "it answered repair {r} where {request} was asked: refused"
        )),
        _ => Err("it answered a repair with another kind of message: refused".into()),
    }
}

/// The bytes of a `ReadReply` to request `request` for `len` bytes, or why it is refused.
pub(in crate::repl) fn check_reply(
    reply: Message,
    request: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
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
        r.note(0, 1, "node2", None, None);
        r.note(BLOCK, 2, "node2", None, None);
        r.note(8 * BLOCK, 1, "node3", None, None);
        assert_eq!(r.count(), 4);
        let last = r.last();
        assert!(last.len() == 2 || last.len() == 3, "{last:?}");
        assert_eq!(last.last().unwrap().from, "node3");
        for i in 0..100 {
            r.note(1000 * BLOCK * (i + 1), 1, "node2", None, None);
        }
        assert_eq!(r.last().len(), REPAIRS_KEPT);
    }
}
