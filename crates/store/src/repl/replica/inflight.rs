//! A replica's requests in flight: writes, zeroes and trims of one volume that touch
//! different bytes are applied at once (a 1 MiB overwrite waits for the block store's
//! record sync, so one at a time each copy spent several ms per write in turn), and every
//! request is still answered in seq order, its outcome reported to the state machine in
//! that order.
//!
//! The rules that keep every copy equal to the write stream:
//! - a write (zeroes, trim) starts only when no earlier request in flight overlaps it, so
//!   overlapping writes land in seq order;
//! - anything else (a flush, a snapshot, a resize, a fence, a newer generation, reads and
//!   digests, a resend's acknowledgement) starts only once nothing is in flight: a flush
//!   then covers every write before it, and a reply never runs ahead of an apply it
//!   depends on;
//! - answers leave in seq order: a write's reply waits for every earlier one.

use std::collections::VecDeque;
use std::sync::Arc;

use tessera_replication::regions::Region;
use tessera_replication::wire::{Message, ReplyError};
use tokio::sync::{mpsc, Notify};

/// Where a stream's answers go, in the order they must be written.
pub(super) type Outbox = mpsc::UnboundedSender<Message>;

/// Most writes of one volume applied on the blocking pool at once.
pub(super) const MAX_APPLYING: usize = 16;

/// The requests of one volume applied or answered and not yet settled, in seq order.
#[derive(Default)]
pub(super) struct InFlight {
    slots: VecDeque<Slot>,
    next_id: u64,
    applying: usize,
    /// Woken whenever slots settle (streams waiting for room or for order).
    settled: Arc<Notify>,
}

struct Slot {
    id: u64,
    /// The bytes it changes (`None`: an answer only, which overlaps nothing).
    region: Option<Region>,
    state: State,
    out: Outbox,
}

enum State {
    /// Being applied on the blocking pool.
    Applying { seq: u64 },
    /// Applied; to report to the machine.
    Applied {
        seq: u64,
        result: Result<(), ReplyError>,
    },
    /// An answer that must not overtake the ones before it.
    Reply(Message),
}

/// What settling produced: a seq's outcome for the state machine, or an answer.
pub(super) enum Settled {
    Applied {
        seq: u64,
        result: Result<(), ReplyError>,
        out: Outbox,
    },
    Reply(Message, Outbox),
}

impl InFlight {
    /// Woken when slots settle: take `notified()` and `enable()` it before looking.
    pub(super) fn settled(&self) -> Arc<Notify> {
        self.settled.clone()
    }

    /// True when nothing is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True when `op` may start now: its bytes overlap nothing in flight and the pool
    /// has room (a quick one runs inline, so it needs no room).
    pub(super) fn may_start(&self, region: Region, pooled: bool) -> bool {
        if pooled && self.applying >= MAX_APPLYING {
            return false;
        }
        let end = region.offset + region.len;
        !self.slots.iter().any(|s| {
            s.region
                .is_some_and(|r| r.offset < end && region.offset < r.offset + r.len)
        })
    }

    /// A request of `region` applied inline with `result`.
    pub(super) fn push_applied(
        &mut self,
        seq: u64,
        region: Option<Region>,
        result: Result<(), ReplyError>,
        out: &Outbox,
    ) {
        let id = self.id();
        self.slots.push_back(Slot {
            id,
            region,
            state: State::Applied { seq, result },
            out: out.clone(),
        });
    }

    /// A request of `region` handed to the blocking pool; returns the id to
    /// [`InFlight::finish`] it with.
    pub(super) fn push_applying(&mut self, seq: u64, region: Option<Region>, out: &Outbox) -> u64 {
        let id = self.id();
        self.applying += 1;
        self.slots.push_back(Slot {
            id,
            region,
            state: State::Applying { seq },
            out: out.clone(),
        });
        id
    }

    /// An answer to send after the ones before it.
    pub(super) fn push_reply(&mut self, msg: Message, out: &Outbox) {
        let id = self.id();
        self.slots.push_back(Slot {
            id,
            region: None,
            state: State::Reply(msg),
            out: out.clone(),
        });
    }

    /// The pool finished slot `id` with `result`.
    pub(super) fn finish(&mut self, id: u64, result: Result<(), ReplyError>) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            if let State::Applying { seq } = slot.state {
                slot.state = State::Applied { seq, result };
                self.applying -= 1;
            }
        }
    }

    /// Takes the slots at the front that are done, in order. The caller reports each to
    /// the machine, sends the answers, then calls [`InFlight::wake`].
    pub(super) fn take_settled(&mut self) -> Vec<Settled> {
        let mut done = Vec::new();
        while let Some(front) = self.slots.front() {
            if matches!(front.state, State::Applying { .. }) {
                break;
            }
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            done.push(match slot.state {
                State::Applied { seq, result } => Settled::Applied {
                    seq,
                    result,
                    out: slot.out,
                },
                State::Reply(m) => Settled::Reply(m, slot.out),
                State::Applying { .. } => continue,
            });
        }
        done
    }

    /// Wakes the streams waiting for slots to settle.
    pub(super) fn wake(&self) {
        self.settled.notify_waiters();
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The bytes a write, zeroes or trim changes: those may run alongside others.
pub(super) fn write_region(
    msg: &Message,
) -> Option<(tessera_replication::wire::Generation, Region)> {
    let op = match msg {
        Message::Write {
            generation,
            offset,
            data,
            ..
        } => (
            *generation,
            Region {
                offset: *offset,
                len: data.len() as u64,
            },
        ),
        Message::WriteZeroes {
            generation,
            offset,
            len,
            ..
        }
        | Message::Trim {
            generation,
            offset,
            len,
            ..
        } => (
            *generation,
            Region {
                offset: *offset,
                len: *len,
            },
        ),
        _ => return None,
    };
    // An empty or wrapping range is the machine's to refuse, in order with the rest.
    (op.1.len > 0 && op.1.offset.checked_add(op.1.len).is_some()).then_some(op)
}
