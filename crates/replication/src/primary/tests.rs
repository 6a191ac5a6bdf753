//! The primary's rules, one story each.

use super::*;

const MS: Duration = Duration::from_millis(1);
const A: ReplicaId = ReplicaId(1);
const B: ReplicaId = ReplicaId(2);

fn config(g: u64, in_sync: &[ReplicaId], out: &[ReplicaId]) -> Config {
    Config {
        generation: Generation(g),
        replica_count: 3,
        in_sync: in_sync.iter().copied().collect(),
        out_of_sync: out.iter().copied().collect(),
        operator_override: false,
    }
}

fn timing() -> Timing {
    Timing {
        retransmit_after: 100 * MS,
        replica_timeout: 1000 * MS,
    }
}

fn primary() -> Primary {
    let mut p = Primary::new(
        VolumeName::new("v").unwrap(),
        1 << 20,
        config(1, &[A, B], &[]),
        timing(),
    )
    .unwrap();
    p.handle(MS, PrimaryInput::Connected(A));
    p.handle(MS, PrimaryInput::Connected(B));
    for r in [A, B] {
        p.handle(MS, reply(r, 0, Ok(())));
    }
    p
}

fn write(offset: u64) -> Op {
    Op::Write {
        offset,
        fua: false,
        data: vec![1; 4096],
    }
}

fn reply(from: ReplicaId, seq: u64, result: Result<(), ReplyError>) -> PrimaryInput {
    PrimaryInput::Received {
        from,
        msg: Message::Reply { seq, result },
    }
}

fn completions(actions: &[PrimaryAction]) -> Vec<(RequestId, Result<(), RequestError>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::Complete { id, result } => Some((*id, result.clone())),
            _ => None,
        })
        .collect()
}

fn req(p: &mut Primary, id: u64, op: Op) -> Vec<PrimaryAction> {
    p.handle(
        2 * MS,
        PrimaryInput::Request {
            id: RequestId(id),
            op,
        },
    )
}

fn local_done(p: &mut Primary, id: u64) -> Vec<PrimaryAction> {
    p.handle(
        2 * MS,
        PrimaryInput::LocalDone {
            id: RequestId(id),
            result: Ok(()),
        },
    )
}

#[test]
fn a_write_completes_only_when_local_and_every_in_sync_replica_have_it() {
    let mut p = primary();
    let sent = req(&mut p, 7, write(0));
    // Sent first, applied locally last: the replicas work while the local copy does.
    assert!(matches!(
        sent.last(),
        Some(PrimaryAction::ApplyLocal { .. })
    ));
    assert!(matches!(sent[0], PrimaryAction::Send { .. }));
    let sends = sent
        .iter()
        .filter(|a| {
            matches!(
                a,
                PrimaryAction::Send {
                    msg: Message::Write { seq: 1, .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(sends, 2);
    assert!(completions(&local_done(&mut p, 7)).is_empty());
    assert!(completions(&p.handle(3 * MS, reply(A, 1, Ok(())))).is_empty());
    assert_eq!(
        completions(&p.handle(3 * MS, reply(B, 1, Ok(())))),
        vec![(RequestId(7), Ok(()))]
    );
}

#[test]
fn requests_complete_in_seq_order() {
    let mut p = primary();
    req(&mut p, 1, write(0));
    req(&mut p, 2, Op::Flush);
    local_done(&mut p, 2);
    for r in [A, B] {
        p.handle(3 * MS, reply(r, 2, Ok(())));
    }
    // The flush is acknowledged everywhere, but the write before it is not: wait.
    assert!(completions(&local_done(&mut p, 1)).is_empty());
    p.handle(3 * MS, reply(A, 1, Ok(())));
    let done = completions(&p.handle(3 * MS, reply(B, 1, Ok(()))));
    assert_eq!(done, vec![(RequestId(1), Ok(())), (RequestId(2), Ok(()))]);
}

#[test]
fn a_silent_replica_stops_completions_until_a_configuration_without_it() {
    let mut p = primary();
    req(&mut p, 1, write(8192));
    local_done(&mut p, 1);
    p.handle(3 * MS, reply(A, 1, Ok(())));
    // Before the timeout: resends to the silent replica, no removal.
    let resent = p.handle(200 * MS, PrimaryInput::Tick);
    assert!(resent
        .iter()
        .any(|a| matches!(a, PrimaryAction::Send { to: B, .. })));
    let late = p.handle(1100 * MS, PrimaryInput::Tick);
    assert!(late.contains(&PrimaryAction::RequestRemoval {
        replica: B,
        generation: Generation(1)
    }));
    assert!(p.is_stalled());
    // A second request is accepted and waits too.
    req(&mut p, 2, write(0));
    local_done(&mut p, 2);
    // The cluster moves B out of sync in generation 2.
    let actions = p.reconfigure(1200 * MS, config(2, &[A], &[B])).unwrap();
    // What B may lack is recorded before anything else happens.
    assert_eq!(
        actions[..2],
        [
            PrimaryAction::RecordMissed {
                replica: B,
                region: Region {
                    offset: 0,
                    len: 4096
                }
            },
            PrimaryAction::RecordMissed {
                replica: B,
                region: Region {
                    offset: 8192,
                    len: 4096
                }
            },
        ]
    );
    // Both requests go again to A under generation 2, after the fence.
    let to_a: Vec<&Message> = actions
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::Send { to: A, msg } => Some(msg),
            _ => None,
        })
        .collect();
    assert!(matches!(
        to_a[0],
        Message::Fence {
            generation: Generation(2),
            ..
        }
    ));
    assert!(matches!(
        to_a[1],
        Message::Write {
            generation: Generation(2),
            seq: 1,
            offset: 8192,
            ..
        }
    ));
    assert!(matches!(
        to_a[2],
        Message::Write {
            generation: Generation(2),
            seq: 2,
            offset: 0,
            ..
        }
    ));
    assert!(completions(&actions).is_empty());
    // A stale ack of generation 1's seq 2 (before the new fence's reply) does not count.
    p.handle(1201 * MS, reply(A, 2, Ok(())));
    p.handle(1201 * MS, reply(A, 0, Ok(())));
    assert!(completions(&p.handle(1202 * MS, reply(A, 1, Ok(())))).len() == 1);
    assert_eq!(
        completions(&p.handle(1202 * MS, reply(A, 2, Ok(())))),
        vec![(RequestId(2), Ok(()))]
    );
    // Later writes are recorded for B before they are applied.
    let later = req(&mut p, 3, write(65536));
    assert_eq!(
        later[0],
        PrimaryAction::RecordMissed {
            replica: B,
            region: Region {
                offset: 65536,
                len: 4096
            }
        }
    );
}

#[test]
fn a_flush_acknowledged_by_a_replica_clears_what_it_may_miss() {
    let mut p = primary();
    req(&mut p, 1, write(0));
    req(&mut p, 2, Op::Flush);
    req(&mut p, 3, write(4096));
    for id in 1..=3 {
        local_done(&mut p, id);
    }
    for seq in 1..=3 {
        p.handle(3 * MS, reply(A, seq, Ok(())));
    }
    p.handle(3 * MS, reply(B, 1, Ok(())));
    p.handle(3 * MS, reply(B, 2, Ok(())));
    p.handle(3 * MS, reply(B, 3, Err(ReplyError::Io("disk".into()))));
    let actions = p.reconfigure(4 * MS, config(2, &[A], &[B])).unwrap();
    let missed: Vec<Region> = actions
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::RecordMissed { region, .. } => Some(*region),
            _ => None,
        })
        .collect();
    assert_eq!(
        missed,
        vec![Region {
            offset: 4096,
            len: 4096
        }]
    );
}

#[test]
fn a_stale_reply_naming_the_primarys_own_generation_does_not_fence_it() {
    // The primary is in generation 1 (`primary()`): a replica at generation 1 calling a
    // request stale answers one this primary sent before its latest configuration (a
    // restarted replica that learned the generation from its catch-up stream).
    let mut p = primary();
    req(&mut p, 1, write(0));
    let own = Err(ReplyError::StaleGeneration {
        current: Generation(1),
    });
    assert!(completions(&p.handle(3 * MS, reply(A, 1, own))).is_empty());
    assert!(!p.is_fenced());
    assert_eq!(p.fenced_by(), None);
}

#[test]
fn a_stale_generation_fences_the_primary_for_good() {
    let mut p = primary();
    req(&mut p, 1, write(0));
    req(&mut p, 2, Op::Flush);
    let stale = Err(ReplyError::StaleGeneration {
        current: Generation(5),
    });
    let failed = completions(&p.handle(3 * MS, reply(A, 1, stale)));
    let fenced = Err(RequestError::Fenced {
        current: Generation(5),
    });
    assert_eq!(
        failed,
        vec![
            (RequestId(1), fenced.clone()),
            (RequestId(2), fenced.clone())
        ]
    );
    assert!(p.is_fenced());
    assert_eq!(
        completions(&req(&mut p, 3, write(0))),
        vec![(RequestId(3), fenced)]
    );
    // Acks arriving after the fence complete nothing.
    assert!(completions(&local_done(&mut p, 1)).is_empty());
    assert!(completions(&p.handle(3 * MS, reply(B, 1, Ok(())))).is_empty());
    assert_eq!(
        p.reconfigure(4 * MS, config(6, &[A, B], &[])),
        Err(ConfigError::Stopped)
    );
}

#[test]
fn the_in_sync_set_does_not_shrink_below_two_copies_without_the_override() {
    let mut p = primary();
    p.reconfigure(MS, config(2, &[A], &[B])).unwrap();
    assert_eq!(
        p.reconfigure(MS, config(3, &[], &[A, B])),
        Err(ConfigError::BelowMinimum {
            copies: 1,
            minimum: 2
        })
    );
    assert_eq!(p.generation(), Generation(2));
    let mut with_override = config(3, &[], &[A, B]);
    with_override.operator_override = true;
    p.reconfigure(MS, with_override).unwrap();
    assert_eq!(
        p.reconfigure(MS, config(3, &[A], &[B])),
        Err(ConfigError::NotNewer {
            current: Generation(3),
            offered: Generation(3)
        })
    );
    // A one-copy volume needs only the primary.
    let mut single = config(1, &[], &[]);
    single.replica_count = 1;
    assert!(Primary::new(VolumeName::new("v").unwrap(), 4096, single, timing()).is_ok());
}

#[test]
fn a_sequence_gap_makes_the_primary_resend_from_where_the_replica_stands() {
    let mut p = primary();
    for id in 1..=3 {
        req(&mut p, id, write(0));
    }
    let actions = p.handle(3 * MS, reply(A, 3, Err(ReplyError::SeqGap { expected: 2 })));
    let seqs: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::Send {
                to: A,
                msg: Message::Write { seq, .. },
            } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![2, 3]);
    assert!(!p.is_stalled());
}

#[test]
fn bad_requests_fail_without_being_sent() {
    let mut p = primary();
    let cases = [
        (
            Op::Trim {
                offset: 100,
                len: 512,
            },
            RequestError::Misaligned,
        ),
        (
            Op::WriteZeroes { offset: 0, len: 0 },
            RequestError::Misaligned,
        ),
        (write(1 << 20), RequestError::OutOfRange),
        (
            Op::Trim {
                offset: u64::MAX - 511,
                len: 1024,
            },
            RequestError::OutOfRange,
        ),
        (
            Op::Write {
                offset: 0,
                fua: false,
                data: vec![0; MAX_DATA + 512],
            },
            RequestError::TooLarge,
        ),
    ];
    for (i, (op, err)) in cases.into_iter().enumerate() {
        let actions = req(&mut p, i as u64, op);
        assert_eq!(actions, vec![complete(RequestId(i as u64), Err(err))]);
    }
    assert_eq!(p.pending(), 0);
}

fn snapshot(name: &str) -> Op {
    Op::Snapshot {
        name: VolumeName::new(name).unwrap(),
        size: None,
    }
}

#[test]
fn a_snapshot_is_sequenced_between_writes_and_completes_like_a_flush() {
    let mut p = primary();
    req(&mut p, 1, write(0));
    let sent = req(&mut p, 2, snapshot("s1"));
    req(&mut p, 3, write(4096));
    // Every in-sync replica gets it as seq 2: after write 1, before write 3.
    let marks: Vec<_> = sent
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::Send {
                to,
                msg: Message::Snapshot { seq, name, .. },
            } => Some((*to, *seq, name.as_str().to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(marks, vec![(A, 2, "s1".into()), (B, 2, "s1".into())]);
    assert!(matches!(
        sent.last(),
        Some(PrimaryAction::ApplyLocal {
            op: Op::Snapshot { .. },
            ..
        })
    ));
    for id in 1..=3 {
        local_done(&mut p, id);
    }
    for seq in 1..=3 {
        p.handle(3 * MS, reply(A, seq, Ok(())));
    }
    // B has not taken the snapshot yet: nothing from it on completes.
    let done = completions(&p.handle(3 * MS, reply(B, 1, Ok(()))));
    assert_eq!(done, vec![(RequestId(1), Ok(()))]);
    let done = completions(&p.handle(3 * MS, reply(B, 2, Ok(()))));
    assert_eq!(done, vec![(RequestId(2), Ok(()))]);
}

#[test]
fn a_resize_is_sequenced_before_the_writes_past_the_old_end() {
    let mut p = primary();
    // Past the end: refused until a resize is sequenced.
    let done = completions(&req(&mut p, 1, write(1 << 20)));
    assert_eq!(done, vec![(RequestId(1), Err(RequestError::OutOfRange))]);
    let sent = req(&mut p, 2, Op::Resize { size: 2 << 20 });
    assert_eq!(p.volume_size(), 2 << 20);
    let grows: Vec<_> = sent
        .iter()
        .filter_map(|a| match a {
            PrimaryAction::Send {
                to,
                msg: Message::Resize { seq, size, .. },
            } => Some((*to, *seq, *size)),
            _ => None,
        })
        .collect();
    assert_eq!(grows, vec![(A, 1, 2 << 20), (B, 1, 2 << 20)]);
    // The write past the old end is taken now, as seq 2: after the resize everywhere.
    let sent = req(&mut p, 3, write(1 << 20));
    assert!(sent.iter().any(|a| matches!(
        a,
        PrimaryAction::Send {
            to: A,
            msg: Message::Write { seq: 2, .. }
        }
    )));
    for id in [2, 3] {
        local_done(&mut p, id);
    }
    for seq in 1..=2 {
        p.handle(3 * MS, reply(A, seq, Ok(())));
    }
    let done = completions(&p.handle(3 * MS, reply(B, 1, Ok(()))));
    assert_eq!(done, vec![(RequestId(2), Ok(()))], "completes like a write");
    // Only growth; a size not a multiple of 4 KiB is refused.
    let done = completions(&req(&mut p, 4, Op::Resize { size: 1 << 20 }));
    assert_eq!(
        done,
        vec![(
            RequestId(4),
            Err(RequestError::Shrink {
                size: 1 << 20,
                current: 2 << 20
            })
        )]
    );
    let done = completions(&req(
        &mut p,
        5,
        Op::Resize {
            size: (4 << 20) + 512,
        },
    ));
    assert_eq!(done, vec![(RequestId(5), Err(RequestError::Misaligned))]);
}

#[test]
fn a_copy_out_of_sync_has_what_a_resize_adds_recorded_missed() {
    let mut p = primary();
    p.reconfigure(4 * MS, config(2, &[A], &[B])).unwrap();
    let actions = req(&mut p, 1, Op::Resize { size: 3 << 20 });
    assert_eq!(
        actions[0],
        PrimaryAction::RecordMissed {
            replica: B,
            region: Region {
                offset: 1 << 20,
                len: 2 << 20
            }
        },
        "recorded before it is applied anywhere: {actions:?}"
    );
    // The same size again adds nothing.
    let actions = req(&mut p, 2, Op::Resize { size: 3 << 20 });
    assert!(!actions
        .iter()
        .any(|a| matches!(a, PrimaryAction::RecordMissed { .. })));
}

#[test]
fn a_snapshot_is_refused_while_a_replica_is_out_of_sync_or_failing() {
    let mut p = primary();
    // A replica refusing a write is failing: the snapshot is refused at once.
    req(&mut p, 1, write(0));
    p.handle(3 * MS, reply(B, 1, Err(ReplyError::Io("disk".into()))));
    let done = completions(&req(&mut p, 2, snapshot("s1")));
    assert_eq!(
        done,
        vec![(RequestId(2), Err(RequestError::NotAllInSync(vec![B])))]
    );
    // In the configuration without it, B is out of sync: still refused.
    p.reconfigure(4 * MS, config(2, &[A], &[B])).unwrap();
    let done = completions(&req(&mut p, 3, snapshot("s1")));
    assert_eq!(
        done,
        vec![(RequestId(3), Err(RequestError::NotAllInSync(vec![B])))]
    );
}

#[test]
fn a_replica_failing_its_snapshot_is_a_failed_replica() {
    let mut p = primary();
    req(&mut p, 1, snapshot("s1"));
    local_done(&mut p, 1);
    p.handle(3 * MS, reply(A, 1, Ok(())));
    let asked = p.handle(
        3 * MS,
        reply(B, 1, Err(ReplyError::Io("snapshot s1 exists".into()))),
    );
    assert!(asked
        .iter()
        .any(|a| matches!(a, PrimaryAction::RequestRemoval { replica: B, .. })));
    assert!(completions(&asked).is_empty());
    // Without B, the snapshot completes on the copies that took it (reported partial
    // by the store: B lacks it).
    // Without B, it is sent again to A in generation 2 (after a fence; the store's
    // replica takes a snapshot it already took from this stream as done) and completes
    // on the copies that took it; B lacks it.
    let again = p.reconfigure(4 * MS, config(2, &[A], &[B])).unwrap();
    assert!(again.iter().any(|a| matches!(
        a,
        PrimaryAction::Send {
            to: A,
            msg: Message::Snapshot { seq: 1, .. }
        }
    )));
    p.handle(5 * MS, reply(A, 0, Ok(())));
    let done = completions(&p.handle(5 * MS, reply(A, 1, Ok(()))));
    assert_eq!(done, vec![(RequestId(1), Ok(()))]);
}
