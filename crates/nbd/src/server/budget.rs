//! A connection's budget for requests in flight: how many requests it may have between
//! reading their header and handing their reply to the socket, and how many bytes of
//! request payload and reply data those requests may hold in memory.
//!
//! The transmission loop admits each request before it reads the request's payload. At
//! the budget it waits, so it stops reading the socket and TCP pushes back on a client
//! that sends requests faster than it reads replies; nothing queues without bound.

use std::sync::Arc;

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
