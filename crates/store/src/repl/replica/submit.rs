//! Handing a stream's requests to their volume: writes that overlap nothing in flight
//! start at once (`inflight.rs`), anything else runs alone.

use std::sync::Arc;

use parking_lot::Mutex;
use tessera_replication::primary::op_region;
use tessera_replication::replica::ReplicaAction;
use tessera_replication::wire::Message;

use super::inflight::{write_region, Outbox, Settled};
use super::{
    apply, code, quick_request, reply_error, target_volume, Handled, ReplicaService, Start,
    VolumeReplica,
};

impl ReplicaService {
    /// Handles one message of a stream whose answers go to `out`: a write that overlaps
    /// nothing in flight starts at once, alongside the others (see `inflight.rs`);
    /// anything else waits until its volume has nothing in flight and runs alone.
    pub(super) async fn submit(
        self: &Arc<Self>,
        mut msg: Message,
        out: &Outbox,
    ) -> Result<(), (u32, String)> {
        loop {
            let vr = target_volume(&msg).and_then(|v| self.enabled(v.as_str()));
            let waiting = vr.as_ref().map(|v| v.lock().inflight.settled());
            let notified = waiting.as_ref().map(|n| n.notified());
            tokio::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                // Registered before looking, so a settle in between is not missed.
                n.enable();
            }
            if let Some(vr) = vr {
                match self.try_start(&vr, msg, out) {
                    Start::Started => return Ok(()),
                    Start::Wait(m) => {
                        if let Some(n) = notified.as_pin_mut() {
                            n.await;
                        }
                        msg = m;
                        continue;
                    }
                    Start::Alone(m) => msg = m,
                }
            }
            // Alone, or not a replica here, or a reply: answered (or refused) by `handle`.
            let handled = if quick_request(&msg) {
                // A small write only reaches the page cache: a trip to the blocking pool
                // and back would cost more than the write (4K QD1 latency).
                Ok(self.handle(msg))
            } else {
                let svc = self.clone();
                tokio::task::spawn_blocking(move || svc.handle(msg)).await
            };
            match handled {
                Ok(Ok(Handled::Answered(replies))) => {
                    for m in replies {
                        // The receiver is this stream's own loop, alive while it calls.
                        let _ = out.send(m);
                    }
                    return Ok(());
                }
                // Another stream of the volume started a write meanwhile: wait again.
                Ok(Ok(Handled::Busy(m))) => msg = m,
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err((code::STORE_FAILED, format!("replication task failed: {e}")))
                }
            }
        }
    }

    /// Under the volume's lock: starts `msg` if it is a write of the current generation
    /// that overlaps nothing in flight (applied inline when quick, else on the blocking
    /// pool); says whether anything else must wait or may run alone.
    fn try_start(
        self: &Arc<Self>,
        vr: &Arc<Mutex<VolumeReplica>>,
        msg: Message,
        out: &Outbox,
    ) -> Start {
        let mut v = vr.lock();
        let Some((generation, region)) = write_region(&msg) else {
            return if v.inflight.is_empty() {
                Start::Alone(msg)
            } else {
                Start::Wait(msg)
            };
        };
        if generation != v.machine.generation() {
            // A newer generation is persisted first, an older one refused: alone.
            return if v.inflight.is_empty() {
                Start::Alone(msg)
            } else {
                Start::Wait(msg)
            };
        }
        let quick = quick_request(&msg);
        if !v.inflight.may_start(region, !quick) {
            return Start::Wait(msg);
        }
        let volume = v.machine.volume().as_str().to_string();
        for action in v.machine.handle(msg) {
            match action {
                ReplicaAction::Apply { seq, op } => {
                    self.recent.note(&volume, &op);
                    let region = op_region(&op);
                    if quick {
                        let result = apply(&v.export, op).map_err(|e| reply_error(&e));
                        v.inflight.push_applied(seq, region, result, out);
                    } else {
                        let id = v.inflight.push_applying(seq, region, out);
                        let (svc, vr, export) = (self.clone(), vr.clone(), v.export.clone());
                        tokio::task::spawn_blocking(move || {
                            let result = apply(&export, op).map_err(|e| reply_error(&e));
                            let mut v = vr.lock();
                            v.inflight.finish(id, result);
                            svc.settle(&mut v);
                        });
                    }
                }
                ReplicaAction::Send(m) => {
                    self.log_refusal(v.machine.volume(), &m);
                    v.inflight.push_reply(m, out);
                }
                // A write of the current generation persists nothing and reads nothing.
                other => {
                    tracing::error!(volume, action = ?other, "unexpected replica action for a write")
                }
            }
        }
        self.settle(&mut v);
        Start::Started
    }

    /// Reports the settled front of `v`'s requests to its machine, in seq order, and
    /// sends their answers.
    fn settle(&self, v: &mut VolumeReplica) {
        let done = v.inflight.take_settled();
        if done.is_empty() {
            return;
        }
        for s in done {
            match s {
                Settled::Applied { seq, result, out } => {
                    if let Err(e) = &result {
                        let volume = v.machine.volume();
                        self.limiter.warn("apply", || {
                            format!("replicated write {seq} to {volume} failed: {e}")
                        });
                    }
                    for a in v.machine.applied(seq, result) {
                        if let ReplicaAction::Send(m) = a {
                            // A stream that ended no longer listens.
                            let _ = out.send(m);
                        }
                    }
                }
                Settled::Reply(m, out) => {
                    let _ = out.send(m);
                }
            }
        }
        v.inflight.wake();
    }
}
