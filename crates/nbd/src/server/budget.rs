//! A connection's budget for requests in flight: how many requests it may have between
//! reading their header and handing their reply to the socket, and how many bytes of
//! request payload and reply data those requests may hold in memory.
//!
//! The transmission loop admits each request before it reads the request's payload. At
//! the budget it waits, so it stops reading the socket and TCP pushes back on a client
//! that sends requests faster than it reads replies; nothing queues without bound.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::proto::Command;

/// The budget of one connection.
pub(super) struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

/// What one admitted request holds; dropping it gives the budget back.
#[must_use = "the request is in flight only while this is held"]
pub(super) struct Admitted {
    // `None` only if a semaphore were closed, which ours never are.
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// A budget of `max_requests` requests and `max_bytes` bytes (each at least 1).
    pub(super) fn new(max_requests: u32, max_bytes: u32) -> Budget {
        let max_requests = max_requests.max(1);
        let max_bytes = max_bytes.max(1);
        Budget {
            requests: Arc::new(Semaphore::new(max_requests as usize)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
        }
    }

    /// Waits until a request holding `bytes` fits. A request larger than the whole
    /// budget waits for the budget to empty and then runs alone, so it cannot wait
    /// forever.
    pub(super) async fn admit(&self, bytes: u32) -> Admitted {
        let request = self.requests.clone().acquire_owned().await.ok();
        let bytes = match bytes.min(self.max_bytes) {
            0 => None,
            n => self.bytes.clone().acquire_many_owned(n).await.ok(),
        };
        Admitted {
            _request: request,
            _bytes: bytes,
        }
    }
}

/// Reply bytes a connection keeps for reuse at most, within its budget: enough for eight
/// pipelined 1 MiB reads (what fio and QEMU send), little for a connection left idle.
const KEEP_MAX: usize = 9 << 20;

/// Read reply buffers a connection has used, kept for its next replies: a fresh one
/// costs an allocation (for a large one, an `mmap`: the kernel zeroes its pages on first
/// touch) and zeroing. They hold a previous reply of the same connection until the
/// device fills them again (`Device::read` fills the whole buffer or fails, and then the
/// buffer is not sent).
pub(super) struct Buffers {
    free: Mutex<Free>,
    keep: usize,
}

#[derive(Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl Buffers {
    /// Buffers for a connection whose budget is `max_bytes` bytes in flight.
    pub(super) fn new(max_bytes: u32) -> Buffers {
        Buffers {
            free: Mutex::new(Free::default()),
            keep: (max_bytes as usize).min(KEEP_MAX),
        }
    }

    /// A buffer of at least `len` initialised bytes.
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let b = free.buffers.pop();
            free.bytes -= b.as_ref().map_or(0, Vec::len);
            b
        };
        let mut b = found.unwrap_or_default();
        if b.len() < len {
            // Zeroes only the growth, once per buffer.
            b.resize(len, 0);
        }
        b
    }

    /// Gives a buffer back; kept while the connection keeps fewer than its share.
    pub(super) fn give(&self, b: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.bytes + b.len() <= self.keep {
            free.bytes += b.len();
            free.buffers.push(b);
        }
    }
}

/// The bytes a request holds while in flight: a READ its reply data, a WRITE its
/// payload. Everything else holds a fixed-size reply (block status replies are bounded
/// by the device's extents and counted as a request only).
pub(super) fn held_bytes(cmd: &Command) -> u32 {
    match *cmd {
        Command::Read { len, .. } | Command::Write { len, .. } => len,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admitted_now(b: &Budget, bytes: u32) -> Option<Admitted> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), b.admit(bytes))
                .await
                .ok()
        })
    }

    #[test]
    fn requests_are_admitted_until_the_count_is_reached() {
        let b = Budget::new(2, 1 << 20);
        let first = admitted_now(&b, 0).expect("first fits");
        let _second = admitted_now(&b, 0).expect("second fits");
        assert!(admitted_now(&b, 0).is_none(), "a third must wait");
        drop(first);
        assert!(
            admitted_now(&b, 0).is_some(),
            "a finished request makes room"
        );
    }

    #[test]
    fn bytes_are_admitted_until_the_budget_is_reached() {
        let b = Budget::new(100, 1000);
        let big = admitted_now(&b, 600).expect("fits");
        assert!(
            admitted_now(&b, 600).is_none(),
            "over the byte budget waits"
        );
        let _small = admitted_now(&b, 400).expect("the rest fits");
        drop(big);
        assert!(admitted_now(&b, 600).is_some());
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_alone() {
        let b = Budget::new(100, 1000);
        let small = admitted_now(&b, 1).expect("fits");
        assert!(
            admitted_now(&b, 5000).is_none(),
            "waits for the budget to empty"
        );
        drop(small);
        let huge = admitted_now(&b, 5000).expect("runs once alone");
        assert!(admitted_now(&b, 1).is_none(), "and holds the whole budget");
        drop(huge);
    }

    #[test]
    fn buffers_are_reused_up_to_the_share_kept() {
        let b = Buffers::new(3000);
        let first = b.take(1000);
        assert_eq!(first.len(), 1000);
        let at = first.as_ptr();
        b.give(first);
        let again = b.take(500);
        assert_eq!(again.as_ptr(), at, "the same buffer comes back");
        assert!(again.len() >= 500);
        let bigger = b.take(2000);
        assert_eq!(bigger.len(), 2000, "a new one when none is free");
        b.give(again);
        b.give(bigger);
        // 1000 + 2000 bytes kept: a third buffer would pass the 3000-byte share.
        b.give(vec![7; 10]);
        assert_eq!(b.free.lock().unwrap().bytes, 3000);
        assert_eq!(b.take(1).len(), 2000, "the last one given back first");
        assert_eq!(b.take(1).len(), 1000);
        assert_eq!(b.take(1).len(), 1, "the one over the share was not kept");
        assert_eq!(b.free.lock().unwrap().bytes, 0);
    }

    #[test]
    fn reads_and_writes_hold_their_length_others_nothing() {
        assert_eq!(held_bytes(&Command::Read { offset: 0, len: 7 }), 7);
        let w = Command::Write {
            offset: 0,
            len: 9,
            fua: true,
        };
        assert_eq!(held_bytes(&w), 9);
        assert_eq!(held_bytes(&Command::Flush), 0);
        let z = Command::WriteZeroes {
            offset: 0,
            len: 1 << 30,
            no_hole: false,
            fua: false,
        };
        assert_eq!(held_bytes(&z), 0);
    }
}
