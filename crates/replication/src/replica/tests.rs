//! The replica machine's rules, one story each: the fence, seq order, loss and catch-up.

use super::*;

fn vol() -> VolumeName {
    VolumeName::new("v").unwrap()
}

fn write(g: u64, seq: u64) -> Message {
    Message::Write {
        volume: vol(),
        generation: Generation(g),
        seq,
        offset: 0,
        fua: false,
        data: vec![seq as u8; 512],
    }
}

fn ok(seq: u64) -> ReplicaAction {
    reply(seq, Ok(()))
}

fn apply_and_ack(r: &mut Replica, msg: Message) -> Vec<ReplicaAction> {
    let mut out = Vec::new();
    for a in r.handle(msg) {
        if let ReplicaAction::Apply { seq, .. } = a {
            out.extend(r.applied(seq, Ok(())));
        } else {
            out.push(a);
        }
    }
    out
}

#[test]
fn a_fence_persists_a_newer_generation_before_replying() {
    let mut r = Replica::new(vol());
    let actions = r.handle(Message::Fence {
        volume: vol(),
        generation: Generation(3),
    });
    assert_eq!(
        actions,
        vec![ReplicaAction::PersistGeneration(Generation(3)), ok(0)]
    );
    // The same generation again: nothing to persist.
    let again = r.handle(Message::Fence {
        volume: vol(),
        generation: Generation(3),
    });
    assert_eq!(again, vec![ok(0)]);
}

#[test]
fn older_generations_are_refused_with_the_current_one() {
    let mut r = Replica::restarted(vol(), Generation(5));
    let stale = Err(ReplyError::StaleGeneration {
        current: Generation(5),
    });
    assert_eq!(
        r.handle(Message::Fence {
            volume: vol(),
            generation: Generation(4)
        }),
        vec![reply(0, stale.clone())]
    );
    assert_eq!(r.handle(write(4, 1)), vec![reply(1, stale.clone())]);
    assert_eq!(
        r.handle(Message::Flush {
            volume: vol(),
            generation: Generation(1),
            seq: 2
        }),
        vec![reply(2, stale)]
    );
    assert_eq!(r.generation(), Generation(5));
}

#[test]
fn writes_apply_in_seq_order_duplicates_are_acked_gaps_refused() {
    let mut r = Replica::new(vol());
    let first = r.handle(write(1, 1));
    assert_eq!(first[0], ReplicaAction::PersistGeneration(Generation(1)));
    assert!(matches!(first[1], ReplicaAction::Apply { seq: 1, .. }));
    assert_eq!(r.applied(1, Ok(())), vec![ok(1)]);
    // A duplicate: acknowledged, not applied again.
    assert_eq!(r.handle(write(1, 1)), vec![ok(1)]);
    // A gap: refused, nothing applied.
    assert_eq!(
        r.handle(write(1, 3)),
        vec![reply(3, Err(ReplyError::SeqGap { expected: 2 }))]
    );
    assert_eq!(apply_and_ack(&mut r, write(1, 2)), vec![ok(2)]);
    assert_eq!(apply_and_ack(&mut r, write(1, 3)), vec![ok(3)]);
}

#[test]
fn a_snapshot_applies_in_seq_order_once_and_not_while_lost() {
    let snap = |seq| Message::Snapshot {
        volume: vol(),
        generation: Generation(1),
        seq,
        name: VolumeName::new("s1").unwrap(),
        size: None,
    };
    let mut r = Replica::new(vol());
    // Before write 1 arrived: a gap, not taken early.
    assert!(r
        .handle(snap(2))
        .contains(&reply(2, Err(ReplyError::SeqGap { expected: 1 }))));
    assert_eq!(apply_and_ack(&mut r, write(1, 1)), vec![ok(1)]);
    let taken = r.handle(snap(2));
    assert_eq!(
        taken,
        vec![ReplicaAction::Apply {
            seq: 2,
            op: Op::Snapshot {
                name: VolumeName::new("s1").unwrap(),
                size: None,
            }
        }]
    );
    assert_eq!(r.applied(2, Ok(())), vec![ok(2)]);
    // A resend is acknowledged without taking it twice.
    assert_eq!(r.handle(snap(2)), vec![ok(2)]);
    // A copy that restarted may lack acknowledged writes: its snapshot would too.
    let mut lost = Replica::restarted(vol(), Generation(1));
    assert_eq!(
        lost.handle(snap(1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
}

#[test]
fn a_resize_applies_in_seq_order_once_and_not_while_lost() {
    let grow = |seq| Message::Resize {
        volume: vol(),
        generation: Generation(1),
        seq,
        size: 1 << 30,
    };
    let mut r = Replica::new(vol());
    // Not before the writes sequenced ahead of it.
    assert!(r
        .handle(grow(2))
        .contains(&reply(2, Err(ReplyError::SeqGap { expected: 1 }))));
    assert_eq!(apply_and_ack(&mut r, write(1, 1)), vec![ok(1)]);
    assert_eq!(
        r.handle(grow(2)),
        vec![ReplicaAction::Apply {
            seq: 2,
            op: Op::Resize { size: 1 << 30 }
        }]
    );
    assert_eq!(r.applied(2, Ok(())), vec![ok(2)]);
    // A write past the old end comes after it.
    assert_eq!(apply_and_ack(&mut r, write(1, 3)), vec![ok(3)]);
    assert_eq!(
        r.handle(grow(2)),
        vec![ok(2)],
        "a resend is not applied again"
    );
    let mut lost = Replica::restarted(vol(), Generation(1));
    assert_eq!(
        lost.handle(grow(1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
}

#[test]
fn a_newer_generation_starts_the_seq_count_again() {
    let mut r = Replica::new(vol());
    apply_and_ack(&mut r, write(1, 1));
    apply_and_ack(&mut r, write(1, 2));
    let actions = apply_and_ack(&mut r, write(2, 1));
    assert_eq!(
        actions,
        vec![ReplicaAction::PersistGeneration(Generation(2)), ok(1)]
    );
    assert_eq!(
        r.handle(write(3, 2)),
        vec![
            ReplicaAction::PersistGeneration(Generation(3)),
            reply(2, Err(ReplyError::SeqGap { expected: 1 }))
        ]
    );
}

#[test]
fn a_restarted_replica_refuses_writes_in_every_generation_until_caught_up() {
    let mut r = Replica::restarted(vol(), Generation(4));
    assert!(r.is_lost());
    assert_eq!(
        r.handle(Message::Fence {
            volume: vol(),
            generation: Generation(4)
        }),
        vec![reply(0, Err(ReplyError::NotInSync))]
    );
    assert_eq!(
        r.handle(write(4, 9)),
        vec![reply(9, Err(ReplyError::NotInSync))]
    );
    // A newer generation is still learned and persisted (the fence holds) ...
    let fenced = r.handle(Message::Fence {
        volume: vol(),
        generation: Generation(5),
    });
    assert_eq!(
        fenced,
        vec![
            ReplicaAction::PersistGeneration(Generation(5)),
            reply(0, Err(ReplyError::NotInSync))
        ]
    );
    // ... but does not make the copy whole: writes are still refused.
    assert_eq!(
        r.handle(write(5, 1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
    assert!(r.is_lost());
    // Once caught up, writes of the next generation are taken from seq 1.
    r.mark_caught_up();
    assert_eq!(
        r.handle(write(5, 1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
    assert_eq!(
        apply_and_ack(&mut r, write(6, 1)),
        vec![ReplicaAction::PersistGeneration(Generation(6)), ok(1)]
    );
    assert!(!r.is_lost());
}

#[test]
fn a_failed_apply_loses_the_place_in_the_generation() {
    let mut r = Replica::new(vol());
    r.handle(write(1, 1));
    assert_eq!(
        r.applied(1, Err(ReplyError::NoSpace)),
        vec![reply(1, Err(ReplyError::NoSpace))]
    );
    assert_eq!(
        r.handle(write(1, 1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
    assert_eq!(
        r.handle(write(1, 2)),
        vec![reply(2, Err(ReplyError::NotInSync))]
    );
}

#[test]
fn a_write_applied_alongside_a_failed_one_is_not_acknowledged() {
    // A shell applying seqs 1 and 2 at once reports them in order: once 1 failed, the
    // copy differs from the stream, so 2 (applied meanwhile) is refused, not acked.
    let mut r = Replica::new(vol());
    assert!(matches!(
        r.handle(write(1, 1))[..],
        [.., ReplicaAction::Apply { seq: 1, .. }]
    ));
    assert!(matches!(
        r.handle(write(1, 2))[..],
        [ReplicaAction::Apply { seq: 2, .. }]
    ));
    assert_eq!(
        r.applied(1, Err(ReplyError::Io("disk".into()))),
        vec![reply(1, Err(ReplyError::Io("disk".into())))]
    );
    assert_eq!(
        r.applied(2, Ok(())),
        vec![reply(2, Err(ReplyError::NotInSync))]
    );
    assert!(r.is_lost());
}

#[test]
fn other_volumes_and_replies_are_refused() {
    let mut r = Replica::new(vol());
    let other = VolumeName::new("w").unwrap();
    assert_eq!(
        r.handle(Message::Flush {
            volume: other.clone(),
            generation: Generation(1),
            seq: 1
        }),
        vec![reply(1, Err(ReplyError::UnknownVolume))]
    );
    assert_eq!(
        r.handle(Message::Digests {
            volume: other,
            generation: Generation(1),
            request: 7,
            offset: 0,
            blocks: 1
        }),
        vec![ReplicaAction::Send(Message::DigestsReply {
            request: 7,
            result: Err(ReplyError::UnknownVolume)
        })]
    );
    assert!(matches!(
        r.handle(Message::Reply {
            seq: 1,
            result: Ok(())
        })[..],
        [ReplicaAction::Disconnect { .. }]
    ));
    assert_eq!(r.generation(), Generation(0));
}

#[test]
fn reads_and_digests_are_served_even_while_lost() {
    let mut r = Replica::restarted(vol(), Generation(2));
    assert_eq!(
        r.handle(Message::Read {
            volume: vol(),
            generation: Generation(2),
            request: 1,
            offset: 0,
            len: 512
        }),
        vec![ReplicaAction::Read {
            request: 1,
            offset: 0,
            len: 512
        }]
    );
    assert_eq!(
        r.handle(Message::Digests {
            volume: vol(),
            generation: Generation(1),
            request: 2,
            offset: 0,
            blocks: 1
        }),
        vec![ReplicaAction::Send(Message::DigestsReply {
            request: 2,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(2)
            })
        })]
    );
}

#[test]
fn a_lost_replica_takes_a_catch_up_and_is_in_sync_only_when_the_cluster_says() {
    let mut r = Replica::restarted(vol(), Generation(4));
    assert_eq!(
        r.handle(write(4, 1)),
        vec![reply(1, Err(ReplyError::NotInSync))]
    );
    // Older than what it holds: refused.
    assert!(r.begin_catch_up(Generation(3)).is_err());
    assert_eq!(
        r.begin_catch_up(Generation(5)),
        Ok(vec![ReplicaAction::PersistGeneration(Generation(5))])
    );
    assert!(r.must_catch_up() && !r.is_lost());
    assert_eq!(apply_and_ack(&mut r, write(5, 1)), vec![ok(1)]);
    // The same instruction again (a reconciler repeating itself) keeps the position.
    assert_eq!(r.begin_catch_up(Generation(5)), Ok(vec![]));
    assert_eq!(r.last_applied(), Some(1));
    // Ending it needs a newer generation than the one the catch-up began in.
    assert!(!r.end_catch_up(Generation(5)));
    // The primary's rejoin fence: still catching up, seq from 1 of generation 6.
    assert_eq!(
        apply_and_ack(&mut r, write(6, 1)),
        vec![ReplicaAction::PersistGeneration(Generation(6)), ok(1)]
    );
    assert!(r.must_catch_up());
    assert!(r.end_catch_up(Generation(6)));
    assert!(!r.must_catch_up());
    assert_eq!(apply_and_ack(&mut r, write(6, 2)), vec![ok(2)]);
    // A failed apply while catching up: lost again.
    r.begin_catch_up(Generation(7)).unwrap();
    for a in r.handle(write(7, 1)) {
        if let ReplicaAction::Apply { seq, .. } = a {
            r.applied(seq, Err(ReplyError::Io("disk".into())));
        }
    }
    assert!(r.is_lost());
    assert!(!r.end_catch_up(Generation(8)));
}

#[test]
fn a_new_primary_asking_for_the_last_changes_fences_first_and_stale_ones_are_refused() {
    let mut r = Replica::new(vol());
    apply_and_ack(&mut r, write(2, 1));
    // The new primary's question carries its generation: persisted before the answer,
    // so nothing of the old primary is applied after it.
    assert_eq!(
        r.handle(Message::Unsettled {
            volume: vol(),
            generation: Generation(3),
            request: 1,
        }),
        vec![
            ReplicaAction::PersistGeneration(Generation(3)),
            ReplicaAction::ReportUnsettled { request: 1 }
        ]
    );
    assert_eq!(
        r.handle(write(2, 2)),
        vec![reply(
            2,
            Err(ReplyError::StaleGeneration {
                current: Generation(3)
            })
        )]
    );
    // An older primary asking is refused with the current generation.
    assert_eq!(
        r.handle(Message::Unsettled {
            volume: vol(),
            generation: Generation(2),
            request: 2,
        }),
        vec![ReplicaAction::Send(Message::UnsettledReply {
            request: 2,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(3)
            })
        })]
    );
    // A replica never receives an answer.
    assert!(matches!(
        r.handle(Message::UnsettledReply {
            request: 1,
            result: Ok(Vec::new())
        })[..],
        [ReplicaAction::Disconnect { .. }]
    ));
}

#[test]
fn a_repair_or_snapshot_read_of_an_older_generation_is_refused_and_nothing_done() {
    let mut r = Replica::new(vol());
    apply_and_ack(&mut r, write(2, 1));
    let repair = |g| Message::Repair {
        volume: vol(),
        generation: Generation(g),
        request: 5,
        snapshot: None,
        offset: 4096,
        data: vec![1; 4096],
    };
    assert_eq!(
        r.handle(repair(1)),
        vec![ReplicaAction::Send(Message::RepairReply {
            request: 5,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(2)
            })
        })]
    );
    assert_eq!(
        r.handle(repair(2)),
        vec![ReplicaAction::Repair {
            request: 5,
            snapshot: None,
            offset: 4096,
            data: vec![1; 4096]
        }]
    );
    let snapshot = VolumeName::new("s").unwrap();
    let read = |g| Message::SnapshotRead {
        volume: vol(),
        generation: Generation(g),
        request: 6,
        snapshot: snapshot.clone(),
        offset: 0,
        len: 4096,
    };
    assert_eq!(
        r.handle(read(1)),
        vec![ReplicaAction::Send(Message::ReadReply {
            request: 6,
            result: Err(ReplyError::StaleGeneration {
                current: Generation(2)
            })
        })]
    );
    assert_eq!(
        r.handle(read(2)),
        vec![ReplicaAction::ReadSnapshot {
            request: 6,
            snapshot: snapshot.clone(),
            offset: 0,
            len: 4096
        }]
    );
    // A repair for another volume is refused as unknown.
    let other = Message::Repair {
        volume: VolumeName::new("w").unwrap(),
        generation: Generation(2),
        request: 7,
        snapshot: None,
        offset: 0,
        data: vec![1; 4096],
    };
    assert_eq!(
        r.handle(other),
        vec![ReplicaAction::Send(Message::RepairReply {
            request: 7,
            result: Err(ReplyError::UnknownVolume)
        })]
    );
    // The seq position is untouched by them: the next write is seq 2.
    assert_eq!(apply_and_ack(&mut r, write(2, 2)), vec![ok(2)]);
}
