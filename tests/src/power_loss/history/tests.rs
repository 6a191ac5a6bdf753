//! The checker's rule, case by case: it must accept every legal outcome and name every
//! illegal one.

use super::*;

const B: u64 = BLOCK as u64;

fn dev(blocks: usize, fill: u8) -> Vec<u8> {
    vec![fill; blocks * BLOCK]
}

fn write(h: &mut History, seq: u64, off: u64, data: &[u8], fua: bool) -> Ticket {
    h.begin(
        seq,
        off,
        data.len() as u64,
        Request::Write { fua },
        Some(data),
    )
}

fn problems(h: &History, content: &[u8]) -> Vec<Problem> {
    h.check(content, 100).iter().map(|v| v.problem).collect()
}

#[test]
fn a_flushed_write_must_survive_and_a_later_one_may() {
    let start = dev(2, 1);
    let mut h = History::new(&start);
    let t = write(&mut h, 1, 0, &[2; BLOCK], false);
    h.acked(t);
    let sent = h.flush_sent();
    let t = write(&mut h, 2, 0, &[3; BLOCK], false);
    h.flushed(sent);
    h.acked(t);

    let mut after = start.clone();
    after[..BLOCK].fill(2);
    assert!(h.check(&after, 10).is_empty(), "the flushed version");
    after[..BLOCK].fill(3);
    assert!(h.check(&after, 10).is_empty(), "a later acked version");
    let v = h.check(&start, 10);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].problem, Problem::LostFlushedWrite);
    assert!(
        v[0].detail.contains("v0 = content at the start"),
        "{}",
        v[0]
    );
    assert!(
        v[0].detail.contains("v1 = write #0.1 (durable)"),
        "{}",
        v[0]
    );
}

#[test]
fn without_a_completed_flush_the_start_is_allowed() {
    let start = dev(1, 1);
    let mut h = History::new(&start);
    let t = write(&mut h, 1, 0, &[2; BLOCK], false);
    h.acked(t);
    let _never_completed = h.flush_sent();
    let t = write(&mut h, 2, 0, &[3; BLOCK], false);
    h.unanswered(t);
    for fill in [1, 2, 3] {
        assert!(h.check(&dev(1, fill), 10).is_empty(), "fill {fill}");
    }
}

#[test]
fn a_flush_covers_only_writes_acknowledged_before_it_was_sent() {
    let start = dev(2, 1);
    let mut h = History::new(&start);
    let sent = h.flush_sent();
    let t = write(&mut h, 1, 0, &[2; BLOCK], false);
    h.acked(t);
    h.flushed(sent);
    assert!(h.check(&start, 10).is_empty());
}

#[test]
fn a_fua_write_is_durable_once_acknowledged() {
    let start = dev(1, 1);
    let mut h = History::new(&start);
    let t = write(&mut h, 1, 0, &[2; BLOCK], true);
    h.acked(t);
    assert_eq!(problems(&h, &start), [Problem::LostFlushedWrite]);
    assert!(h.check(&dev(1, 2), 10).is_empty());
}

#[test]
fn partial_writes_and_trims_merge_into_whole_block_images() {
    let start = dev(3, 1);
    let mut h = History::new(&start);
    // Bytes 100..B+200: the end of block 0 and the start of block 1.
    let data = vec![7u8; (B + 100) as usize];
    let t = write(&mut h, 1, 100, &data, false);
    h.acked(t);
    let t = h.begin(2, 2 * B + 10, 20, Request::Trim, None);
    h.acked(t);
    let sent = h.flush_sent();
    h.flushed(sent);

    let mut want = start.clone();
    want[100..(B + 200) as usize].fill(7);
    want[(2 * B + 10) as usize..(2 * B + 30) as usize].fill(0);
    assert!(h.check(&want, 10).is_empty());
    // A torn block: the write's bytes without the merge (zeroes around them).
    let mut torn = want.clone();
    torn[..100].fill(0);
    assert_eq!(problems(&h, &torn), [Problem::Garbage]);
}

#[test]
fn zeroes_misplaced_data_and_garbage_are_named() {
    let start = dev(2, 1);
    let mut h = History::new(&start);
    let t = write(&mut h, 1, B, &[5; BLOCK], false);
    h.acked(t);

    let mut zero = start.clone();
    zero[..BLOCK].fill(0);
    assert_eq!(problems(&h, &zero), [Problem::Zeroes]);
    let mut misplaced = start.clone();
    misplaced[..BLOCK].fill(5);
    assert_eq!(problems(&h, &misplaced), [Problem::Misplaced]);
    let mut junk = start.clone();
    junk[0] = 9;
    assert_eq!(problems(&h, &junk), [Problem::Garbage]);
}

#[test]
fn trims_may_read_as_zeroes_only_after_they_were_requested() {
    let start = dev(1, 1);
    let mut h = History::new(&start);
    let t = h.begin(1, 0, B, Request::Trim, None);
    h.unanswered(t);
    assert!(h.check(&dev(1, 0), 10).is_empty());
    assert!(h.check(&start, 10).is_empty());
}

#[test]
#[should_panic(expected = "overlapping requests in flight")]
fn overlapping_requests_are_refused() {
    let mut h = History::new(&dev(2, 0));
    let _t = write(&mut h, 1, 0, &[1; 10], false);
    let _u = write(&mut h, 2, 5, &[1; 10], false);
}
