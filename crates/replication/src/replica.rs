//! The replica's side of one volume: the fence, seq order, and what the shell must do.
//!
//! A [`Replica`] holds the highest generation the store has persisted for the volume and
//! the last seq it accepted in that generation. It never touches the disk: it returns
//! [`ReplicaAction`]s that the shell performs **in order**, reporting the outcome of each
//! [`ReplicaAction::Apply`] through [`Replica::applied`] in seq order. The shell may start
//! the next message's applies before earlier ones finished only when they touch other
//! bytes (writes, zeroes and trims of one generation); anything else waits until every
//! earlier apply was reported. That order is what makes the fence hold: a generation is
//! persisted before any reply that depends on it is sent.
//!
//! Rules:
//! - A message of an older generation is refused with [`ReplyError::StaleGeneration`].
//! - A newer generation (a `Fence`, or any request carrying one) is persisted first
//!   ([`ReplicaAction::PersistGeneration`]); the seq count starts again at 1.
//! - In the current generation, seq `n + 1` after the last accepted `n` is applied; a seq
//!   already accepted is acknowledged again without re-applying (a resend after a lost
//!   reply); a seq beyond `n + 1` is a gap, refused with [`ReplyError::SeqGap`].
//! - A replica built after a restart ([`Replica::restarted`]) does not know which writes it
//!   lost (those not flushed), so it refuses every write and flush with
//!   [`ReplyError::NotInSync`], in its generation and in every newer one (it still learns
//!   and persists newer generations, so the fence holds), until the shell declares its copy
//!   caught up ([`Replica::mark_caught_up`]). A failed apply does the same: the copy no
//!   longer matches the write stream. A newer generation alone must not clear this: the
//!   cluster may bump the generation for another replica's sake while the primary still
//!   counts this one in sync, and it would then take acknowledgements from a copy that
//!   silently lost acknowledged writes (the simulation found exactly that).

use crate::wire::{Generation, Message, ReplyError, VolumeName};

/// A snapshot's name on the wire and in [`Op::Snapshot`] (the volume naming rule).
pub type SnapshotName = VolumeName;

/// What the replica asks the shell to change on its copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `data` at `offset`; with `fua`, durable before it is reported done.
    Write {
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    /// Make `len` bytes at `offset` read as zeroes.
    WriteZeroes { offset: u64, len: u64 },
    /// Discard `len` bytes at `offset`.
    Trim { offset: u64, len: u64 },
    /// Make every earlier write durable.
    Flush,
    /// Take snapshot `name` of the copy here: it holds exactly the ops sequenced before
    /// it. The same point of the stream on every copy, since every copy applies in seq
    /// order. With `size`, at that size, smaller than the copy: the copy's bytes past it
    /// are discarded first (a catch-up carrying a snapshot taken before the volume grew
    /// to a copy larger already; its passes rewrite the head after).
    Snapshot {
        name: SnapshotName,
        size: Option<u64>,
    },
    /// Grow the copy here to `size` bytes (nothing when it is already at least that
    /// large): writes sequenced after it may reach past the old end.
    Resize { size: u64 },
}

/// What the shell must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Make `generation` the volume's durable fence before performing the next action.
    /// If this fails, the shell must drop this `Replica` and close the stream; a new one
    /// is built with [`Replica::restarted`] from what is persisted.
    PersistGeneration(Generation),
    /// Perform `op` on the local copy, then call [`Replica::applied`] with `seq`.
    Apply { seq: u64, op: Op },
    /// Read the digests and answer with [`Message::DigestsReply`] for `request`.
    ReadDigests {
        request: u64,
        offset: u64,
        blocks: u32,
    },
    /// Read the bytes and answer with [`Message::ReadReply`] for `request`.
    Read { request: u64, offset: u64, len: u32 },
    /// Read the bytes of snapshot `snapshot` and answer with [`Message::ReadReply`].
    ReadSnapshot {
        request: u64,
        snapshot: VolumeName,
        offset: u64,
        len: u32,
    },
    /// Rewrite the block at `offset` (of snapshot `snapshot`, if named) with `data` where
    /// it fails its checksum and `data` matches it; answer with [`Message::RepairReply`].
    Repair {
        request: u64,
        snapshot: Option<VolumeName>,
        offset: u64,
        data: Vec<u8>,
    },
    /// Answer with [`Message::UnsettledReply`] for `request`: the regions of the last
    /// changes the shell applied (it keeps that window; the machine does not).
    ReportUnsettled { request: u64 },
    /// Answer with [`Message::SnapshotListReply`] for `request`: the names of the
    /// snapshots the shell's copy holds.
    ListSnapshots { request: u64 },
    /// Send this message to the primary.
    Send(Message),
    /// The peer broke the protocol (sent a message only a replica sends): close the stream.
    Disconnect { reason: &'static str },
}

/// Where the replica stands in the write stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// Every seq up to and including this one was accepted (0: none yet).
    Accepted(u64),
    /// It may have lost acknowledged writes: refuse writes until caught up.
    Lost,
    /// Caught up: refuse writes of this generation, accept a newer one's from seq 1.
    CaughtUp,
    /// The cluster has it out of sync, being caught up by the primary of `since` (or a
    /// newer one): it takes writes like [`Position::Accepted`] but still must not be
    /// counted in sync, until [`Replica::end_catch_up`] in a newer generation.
    CatchingUp { since: Generation, last: u64 },
}

/// One volume's replica state machine. See the module documentation for the rules.
#[derive(Debug)]
pub struct Replica {
    volume: VolumeName,
    generation: Generation,
    position: Position,
}

impl Replica {
    /// The replica of a volume the store has just created, which has seen no generation.
    pub fn new(volume: VolumeName) -> Replica {
        Replica {
            volume,
            generation: Generation(0),
            position: Position::Accepted(0),
        }
    }

    /// The replica after the store (re)started with `persisted` as the volume's fence.
    /// It refuses writes (it cannot know what it lost) until [`Replica::mark_caught_up`];
    /// generation 0 means none was ever persisted, so nothing was ever acknowledged.
    pub fn restarted(volume: VolumeName, persisted: Generation) -> Replica {
        Replica {
            volume,
            generation: persisted,
            position: if persisted == Generation(0) {
                Position::Accepted(0)
            } else {
                Position::Lost
            },
        }
    }

    /// The highest generation seen (persisted once the shell performed the action).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The volume.
    pub fn volume(&self) -> &VolumeName {
        &self.volume
    }

    /// True when the replica may have lost acknowledged writes and refuses new ones.
    pub fn is_lost(&self) -> bool {
        self.position == Position::Lost
    }

    /// True until the copy is known whole again: lost, or being caught up.
    pub fn must_catch_up(&self) -> bool {
        matches!(
            self.position,
            Position::Lost | Position::CatchingUp { .. } | Position::CaughtUp
        )
    }

    /// The last seq applied in the current generation, if it takes writes.
    pub fn last_applied(&self) -> Option<u64> {
        match self.position {
            Position::Accepted(last) | Position::CatchingUp { last, .. } => Some(last),
            Position::Lost | Position::CaughtUp => None,
        }
    }

    /// The cluster put this replica out of sync in `generation`, to be caught up by that
    /// generation's primary: from now on it takes that primary's writes (a lost replica
    /// included: the primary knows it is not in sync and compares what it missed), but
    /// stays [`Replica::must_catch_up`]. The same generation again changes nothing.
    /// Refused for a generation older than the current one.
    pub fn begin_catch_up(
        &mut self,
        generation: Generation,
    ) -> Result<Vec<ReplicaAction>, ReplyError> {
        if generation < self.generation {
            return Err(ReplyError::StaleGeneration {
                current: self.generation,
            });
        }
        let mut actions = Vec::new();
        let same = generation == self.generation;
        if !same {
            actions.push(ReplicaAction::PersistGeneration(generation));
            self.generation = generation;
        }
        self.position = match self.position {
            Position::CatchingUp { since, last } if same => Position::CatchingUp { since, last },
            Position::Accepted(last) if same => Position::CatchingUp {
                since: generation,
                last,
            },
            _ => Position::CatchingUp {
                since: generation,
                last: 0,
            },
        };
        Ok(actions)
    }

    /// The cluster made this replica in sync again in `generation`, after its primary
    /// reported it caught up: a catch-up begun in an older generation ends (the position
    /// in the write stream is kept). Anything else is left as it is, so a lost replica
    /// stays lost. Returns whether a catch-up ended.
    pub fn end_catch_up(&mut self, generation: Generation) -> bool {
        match self.position {
            Position::CatchingUp { since, last } if generation > since => {
                self.position = Position::Accepted(last);
                true
            }
            _ => false,
        }
    }

    /// The copy holds everything again (a catch-up finished, as the cluster recorded):
    /// accept writes from the next generation's seq 1. Catch-up itself is a later slice;
    /// until it exists nothing calls this outside tests.
    pub fn mark_caught_up(&mut self) {
        if self.position == Position::Lost {
            self.position = Position::CaughtUp;
        }
    }

    /// Handles one message from the primary.
    pub fn handle(&mut self, msg: Message) -> Vec<ReplicaAction> {
        let mut actions = Vec::new();
        match msg {
            Message::Fence { volume, generation } => {
                if let Some(refusal) = self.admit(&volume, generation, &mut actions) {
                    actions.push(reply(0, Err(refusal)));
                } else if matches!(self.position, Position::Lost | Position::CaughtUp) {
                    actions.push(reply(0, Err(ReplyError::NotInSync)));
                } else {
                    actions.push(reply(0, Ok(())));
                }
            }
            Message::Write {
                volume,
                generation,
                seq,
                offset,
                fua,
                data,
            } => self.sequenced(
                &volume,
                generation,
                seq,
                Op::Write { offset, fua, data },
                &mut actions,
            ),
            Message::WriteZeroes {
                volume,
                generation,
                seq,
                offset,
                len,
            } => self.sequenced(
                &volume,
                generation,
                seq,
                Op::WriteZeroes { offset, len },
                &mut actions,
            ),
            Message::Trim {
                volume,
                generation,
                seq,
                offset,
                len,
            } => self.sequenced(
                &volume,
                generation,
                seq,
                Op::Trim { offset, len },
                &mut actions,
            ),
            Message::Flush {
                volume,
                generation,
                seq,
            } => self.sequenced(&volume, generation, seq, Op::Flush, &mut actions),
            Message::Snapshot {
                volume,
                generation,
                seq,
                name,
                size,
            } => self.sequenced(
                &volume,
                generation,
                seq,
                Op::Snapshot { name, size },
                &mut actions,
            ),
            Message::Resize {
                volume,
                generation,
                seq,
                size,
            } => self.sequenced(&volume, generation, seq, Op::Resize { size }, &mut actions),
            Message::Digests {
                volume,
                generation,
                request,
                offset,
                blocks,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::DigestsReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::ReadDigests {
                    request,
                    offset,
                    blocks,
                }),
            },
            Message::Read {
                volume,
                generation,
                request,
                offset,
                len,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::ReadReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::Read {
                    request,
                    offset,
                    len,
                }),
            },
            Message::Unsettled {
                volume,
                generation,
                request,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::UnsettledReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::ReportUnsettled { request }),
            },
            Message::SnapshotList {
                volume,
                generation,
                request,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::SnapshotListReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::ListSnapshots { request }),
            },
            Message::SnapshotRead {
                volume,
                generation,
                request,
                snapshot,
                offset,
                len,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::ReadReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::ReadSnapshot {
                    request,
                    snapshot,
                    offset,
                    len,
                }),
            },
            Message::Repair {
                volume,
                generation,
                request,
                snapshot,
                offset,
                data,
            } => match self.admit(&volume, generation, &mut actions) {
                Some(e) => actions.push(ReplicaAction::Send(Message::RepairReply {
                    request,
                    result: Err(e),
                })),
                None => actions.push(ReplicaAction::Repair {
                    request,
                    snapshot,
                    offset,
                    data,
                }),
            },
            Message::DigestsReply { .. }
            | Message::ReadReply { .. }
            | Message::RepairReply { .. }
            | Message::UnsettledReply { .. }
            | Message::SnapshotListReply { .. }
            | Message::Reply { .. } => {
                actions.push(ReplicaAction::Disconnect {
                    reason: "a replica received a reply; only the primary receives replies",
                });
            }
        }
        actions
    }

    /// The shell performed [`ReplicaAction::Apply`] for `seq` with this outcome. A shell
    /// may apply several non-overlapping requests at once, but reports them in seq order.
    pub fn applied(&mut self, seq: u64, result: Result<(), ReplyError>) -> Vec<ReplicaAction> {
        if result.is_err() {
            // The copy now differs from the write stream of this generation.
            self.position = Position::Lost;
        } else if self.position == Position::Lost {
            // A later request applied at the same time as one that failed: the copy
            // already differs from the stream, so it acknowledges nothing more.
            return vec![reply(seq, Err(ReplyError::NotInSync))];
        }
        vec![reply(seq, result)]
    }

    /// Checks volume and generation; persists a newer generation. `Some` is a refusal.
    fn admit(
        &mut self,
        volume: &VolumeName,
        generation: Generation,
        actions: &mut Vec<ReplicaAction>,
    ) -> Option<ReplyError> {
        if *volume != self.volume {
            return Some(ReplyError::UnknownVolume);
        }
        if generation < self.generation {
            return Some(ReplyError::StaleGeneration {
                current: self.generation,
            });
        }
        if generation > self.generation {
            actions.push(ReplicaAction::PersistGeneration(generation));
            self.generation = generation;
            self.position = match self.position {
                Position::Lost => Position::Lost,
                // Still not known whole: only the cluster ends a catch-up.
                Position::CatchingUp { since, .. } => Position::CatchingUp { since, last: 0 },
                Position::Accepted(_) | Position::CaughtUp => Position::Accepted(0),
            };
        }
        None
    }

    fn sequenced(
        &mut self,
        volume: &VolumeName,
        generation: Generation,
        seq: u64,
        op: Op,
        actions: &mut Vec<ReplicaAction>,
    ) {
        if let Some(refusal) = self.admit(volume, generation, actions) {
            actions.push(reply(seq, Err(refusal)));
            return;
        }
        let last = match self.position {
            Position::Lost | Position::CaughtUp => {
                actions.push(reply(seq, Err(ReplyError::NotInSync)));
                return;
            }
            Position::Accepted(last) | Position::CatchingUp { last, .. } => last,
        };
        if seq == 0 {
            // Seq 0 is the fence's; a write never carries it.
            actions.push(reply(seq, Err(ReplyError::SeqGap { expected: last + 1 })));
        } else if seq <= last {
            actions.push(reply(seq, Ok(())));
        } else if seq == last + 1 {
            self.position = match self.position {
                Position::CatchingUp { since, .. } => Position::CatchingUp { since, last: seq },
                _ => Position::Accepted(seq),
            };
            actions.push(ReplicaAction::Apply { seq, op });
        } else {
            actions.push(reply(seq, Err(ReplyError::SeqGap { expected: last + 1 })));
        }
    }
}

fn reply(seq: u64, result: Result<(), ReplyError>) -> ReplicaAction {
    ReplicaAction::Send(Message::Reply { seq, result })
}

#[cfg(test)]
mod tests;
