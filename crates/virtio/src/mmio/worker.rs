//! The I/O thread's side of the transport: serving a queue notification without holding
//! the transport's lock across the backend's work, and quiescing for snapshots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Batch, MmioTransport, Poisoned, QuiesceError};
use crate::RequestHandler;

fn lock<T: ?Sized>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, Poisoned> {
    m.lock().map_err(|_| Poisoned)
}

/// Serves a notification of queue `index` of a transport that vCPUs share: the lock is
/// taken to take requests off the queue and to complete them, and released while the
/// device's backend works on them, so register accesses never wait for a disk. The
/// requests of a batch run at once (up to [`super::MAX_PARALLEL_REQUESTS`]), each completed and
/// signalled as soon as it is done. Returns once the queue is empty.
pub fn serve(t: &Mutex<MmioTransport>, index: u32) -> Result<(), Poisoned> {
    let (requests, mem) = {
        let t = lock(t)?;
        (t.requests.clone(), t.mem.clone())
    };
    let mut handlers = lock(&requests)?;
    if handlers.is_empty() {
        return Ok(());
    }
    loop {
        let Some(batch) = lock(t)?.take_requests(index, &mem) else {
            return Ok(());
        };
        let Batch { at, acked, chains } = batch;
        let workers = chains.len().min(handlers.len());
        let queue = Mutex::new(chains.into_iter());
        let stop = AtomicBool::new(false);
        let poisoned = AtomicBool::new(false);
        // One request: run it here. Several: one scoped thread per handler, each taking the
        // next request until none is left, so a slow request does not hold up the others.
        let work = |handler: &mut Box<dyn RequestHandler>| loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let next = match queue.lock() {
                Ok(mut q) => q.next(),
                Err(_) => None,
            };
            let Some(chain) = next else {
                return;
            };
            let done = handler.run(chain, &mem, acked);
            let more = match t.lock() {
                Ok(mut g) => {
                    g.complete(&at, done, &mem) && (workers == 1 || g.signal_used(&at, &mem))
                }
                Err(_) => {
                    poisoned.store(true, Ordering::Release);
                    false
                }
            };
            if !more {
                stop.store(true, Ordering::Release);
                return;
            }
        };
        if workers <= 1 {
            work(&mut handlers[0]);
        } else {
            std::thread::scope(|s| {
                for handler in handlers.iter_mut().take(workers) {
                    let work = &work;
                    let spawned = std::thread::Builder::new()
                        .name("virtio-req".into())
                        .spawn_scoped(s, move || work(handler));
                    if let Err(e) = spawned {
                        // The threads already running (or this one, below) take its share.
                        tracing::warn!(error = %e, "virtio: could not start a request thread");
                        break;
                    }
                }
            });
            // Whatever no thread took (none could be started) runs here.
            work(&mut handlers[0]);
        }
        if poisoned.load(Ordering::Acquire) {
            return Err(Poisoned);
        }
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if !lock(t)?.signal_used(&at, &mem) {
            return Ok(());
        }
    }
}

/// Runs `f` while the device has no request in flight and takes no new one (a snapshot
/// needs guest memory and the queues to agree). Waits for a batch in flight to complete.
pub fn quiesced<R>(t: &Mutex<MmioTransport>, f: impl FnOnce() -> R) -> Result<R, Poisoned> {
    let requests = lock(t)?.requests.clone();
    let _held = lock(&requests)?;
    Ok(f())
}

/// Like [`quiesced`], but waits at most `limit` for the requests in flight: a backend
/// that hangs makes this fail instead of hanging its caller (the request itself fails
/// when the backend's own timeout passes).
pub fn quiesced_within<R>(
    t: &Mutex<MmioTransport>,
    limit: Duration,
    f: impl FnOnce() -> R,
) -> Result<R, QuiesceError> {
    let requests = lock(t)?.requests.clone();
    let deadline = Instant::now() + limit;
    loop {
        match requests.try_lock() {
            Ok(_held) => return Ok(f()),
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(Poisoned.into()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() >= deadline => {
                return Err(QuiesceError::TimedOut(limit))
            }
            // The I/O thread holds the lock for a batch; polling keeps it free of a condvar
            // it would have to signal on every batch.
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(Duration::from_millis(1))
            }
        }
    }
}
