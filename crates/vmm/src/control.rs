//! The VM's run state, shared by the vCPU thread and the control API: pause and resume,
//! power-off requests, the serial console's recent output and input, and events.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Where the VM is in its life.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped, state kept.
    Paused,
    /// The VM has stopped for good.
    Stopped(String),
    /// Not running yet: waiting for (or receiving) an incoming live migration.
    Incoming,
}

/// Something that happened to the VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, from 0.
    pub seq: u64,
    /// Milliseconds since the VMM started.
    pub at_ms: u64,
    /// `started`, `paused`, `resumed`, `power_button` or `stopped`.
    pub kind: String,
    /// Why, for `stopped`.
    pub reason: Option<String>,
}

/// A request the VM's current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM has stopped for good.
    #[error("the VM has stopped")]
    Stopped,
    /// A pause of a paused VM.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// A resume of a VM that is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// A power-button press for a paused VM, whose guest could not act on it.
    #[error(
        "the VM is paused: its guest cannot see the power button (resume it, or power it off)"
    )]
    PausedGuest,
    /// A live migration holds the VM paused (its stop-and-copy); only the migration
    /// resumes it (when it fails or is cancelled).
    #[error("a live migration holds the VM paused; cancel the migration to resume it here")]
    MigrationHolds,
    /// The VM is an incoming migration's, not running yet.
    #[error("the VM is not running yet: it is waiting for an incoming live migration")]
    Incoming,
}

/// What the API asked the vCPU to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Keep running.
    None,
    /// Stop at the next exit and wait.
    Pause,
    /// Stop for good.
    PowerOff,
    /// Stop for good: the VM runs on elsewhere (a live migration completed).
    Leave,
}

struct Inner {
    vcpus: usize,
    parked: usize,
    epoch: u64,
    power_off_answered: bool,
    /// A live migration paused the VM and holds it so.
    migration_hold: bool,
    state: RunState,
    request: Request,
    events: Vec<Event>,
    serial: VecDeque<u8>,
    serial_start: u64,
    serial_input: VecDeque<u8>,
    /// An arrived VM's first console output: `Some(None)` while awaited, then when it
    /// came (host monotonic µs), for the migration's timeline.
    first_output: Option<Option<u64>>,
}

/// Shared control block of one VM.
pub struct Control {
    inner: Mutex<Inner>,
    changed: Condvar,
    started: Instant,
}

/// Bytes of console output kept for the API.
const SERIAL_KEEP: usize = 256 * 1024;

impl Control {
    /// A control block for a VM about to start.
    pub fn new(started: Instant) -> Arc<Control> {
        Arc::new(Control {
            inner: Mutex::new(Inner {
                vcpus: 1,
                parked: 0,
                epoch: 0,
                power_off_answered: false,
                migration_hold: false,
                state: RunState::Running,
                request: Request::None,
                events: Vec::new(),
                serial: VecDeque::new(),
                serial_start: 0,
                serial_input: VecDeque::new(),
                first_output: None,
            }),
            changed: Condvar::new(),
            started,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the control plane down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event.
    pub fn event(&self, kind: &str, reason: Option<String>) {
        let mut g = self.lock();
        let seq = g.events.len() as u64;
        g.events.push(Event {
            seq,
            at_ms: self.started.elapsed().as_millis() as u64,
            kind: kind.to_string(),
            reason,
        });
        self.changed.notify_all();
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        self.lock().state.clone()
    }

    /// Asks the vCPU to pause or power off; the caller then kicks it out of the guest.
    pub fn request(&self, r: Request) -> Result<(), ControlError> {
        let mut g = self.lock();
        match (&g.state, r) {
            (RunState::Stopped(_), _) => Err(ControlError::Stopped),
            (RunState::Paused, Request::Pause) => Err(ControlError::AlreadyPaused),
            (RunState::Incoming, Request::Pause) => Err(ControlError::Incoming),
            (_, r) => {
                g.request = r;
                if matches!(r, Request::PowerOff | Request::Leave) {
                    self.changed.notify_all();
                }
                Ok(())
            }
        }
    }

    /// Whether a guest-visible request (the power button) can reach the guest now.
    pub fn guest_can_act(&self) -> Result<(), ControlError> {
        let g = self.lock();
        match (&g.state, g.request) {
            (RunState::Stopped(_), _) | (_, Request::PowerOff | Request::Leave) => {
                Err(ControlError::Stopped)
            }
            (RunState::Incoming, _) => Err(ControlError::Incoming),
            (RunState::Paused, _) | (_, Request::Pause) => Err(ControlError::PausedGuest),
            (RunState::Running, Request::None) => Ok(()),
        }
    }

    /// Sets how many vCPU threads take part in pausing.
    pub fn set_vcpus(&self, n: usize) {
        self.lock().vcpus = n.max(1);
    }

    /// Resumes a paused VM (not one a live migration holds paused).
    pub fn resume(&self) -> Result<(), ControlError> {
        self.resume_as(false)
    }

    /// Resumes a paused VM; `migration` releases a live migration's hold on it.
    fn resume_as(&self, migration: bool) -> Result<(), ControlError> {
        let mut g = self.lock();
        if g.state != RunState::Paused {
            return Err(ControlError::NotPaused);
        }
        if g.migration_hold && !migration {
            return Err(ControlError::MigrationHolds);
        }
        g.migration_hold = false;
        g.request = Request::None;
        g.state = RunState::Running;
        g.parked = 0;
        g.epoch += 1;
        self.changed.notify_all();
        drop(g);
        self.event("resumed", None);
        Ok(())
    }

    /// Marks the paused VM as held by a live migration: only [`Control::release`]
    /// resumes it.
    pub fn hold_for_migration(&self) -> Result<(), ControlError> {
        let mut g = self.lock();
        if g.state != RunState::Paused {
            return Err(ControlError::NotPaused);
        }
        g.migration_hold = true;
        Ok(())
    }

    /// A live migration that failed or was cancelled resumes the VM it paused.
    pub fn release(&self) -> Result<(), ControlError> {
        self.resume_as(true)
    }

    /// Whether a live migration holds the VM paused.
    pub fn held_for_migration(&self) -> bool {
        self.lock().migration_hold
    }

    /// Marks a VM that waits for an incoming migration (before it has vCPUs).
    pub fn set_incoming(&self) {
        self.lock().state = RunState::Incoming;
        self.changed.notify_all();
    }

    /// The incoming VM's vCPUs are about to run.
    pub fn arrived(&self) {
        let mut g = self.lock();
        if g.state == RunState::Incoming {
            g.state = RunState::Running;
            g.first_output = Some(None);
        }
        self.changed.notify_all();
    }

    /// Whether the VM was told to stop for good (powered off, or migrated away).
    pub fn stop_requested(&self) -> Option<Request> {
        let g = self.lock();
        matches!(g.request, Request::PowerOff | Request::Leave).then_some(g.request)
    }

    /// Waits (bounded) until a power-off or leave is requested; returns whether one was.
    pub fn wait_stop_requested(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !matches!(g.request, Request::PowerOff | Request::Leave) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Called by each vCPU thread between runs: while a pause is requested the thread
    /// parks here (the VM counts as paused once every vCPU has); returns whether to
    /// stop for good (power off, or leave after a migration: see [`Control::stop_requested`]).
    pub fn checkpoint(&self) -> bool {
        let mut g = self.lock();
        if g.request == Request::Pause {
            let epoch = g.epoch;
            g.parked += 1;
            if g.parked >= g.vcpus {
                g.state = RunState::Paused;
                g.request = Request::None;
                drop(g);
                self.event("paused", None);
                g = self.lock();
            }
            while g.epoch == epoch && !matches!(g.request, Request::PowerOff | Request::Leave) {
                g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        matches!(g.request, Request::PowerOff | Request::Leave)
    }

    /// Whether a pause is waiting for the vCPU.
    pub fn pause_requested(&self) -> bool {
        self.lock().request == Request::Pause
    }

    /// Whether a pause or power-off is waiting for the vCPU.
    pub fn pending(&self) -> bool {
        self.lock().request != Request::None
    }

    /// Waits until the state is not `Running`-with-a-pending-pause, up to `timeout`.
    pub fn wait_state(&self, want: &RunState, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while &g.state != want {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Marks the VM stopped.
    pub fn stopped(&self, reason: &str) {
        self.lock().state = RunState::Stopped(reason.to_string());
        self.event("stopped", Some(reason.to_string()));
    }

    /// Events from `since` on.
    pub fn events(&self, since: u64) -> Vec<Event> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.seq >= since)
            .cloned()
            .collect()
    }

    /// Console output from absolute offset `since`; returns (data, next offset).
    pub fn serial_output(&self, since: u64) -> (Vec<u8>, u64) {
        let g = self.lock();
        let end = g.serial_start + g.serial.len() as u64;
        let from = since.clamp(g.serial_start, end);
        let skip = (from - g.serial_start) as usize;
        (g.serial.iter().skip(skip).copied().collect(), end)
    }

    /// Takes over the console's recent output from the VM's previous VMM (a migration's
    /// source), so offsets and the scrollback carry on; only before any output here.
    pub fn restore_serial(&self, start: u64, data: &[u8]) {
        let mut g = self.lock();
        if !g.serial.is_empty() || g.serial_start != 0 {
            return;
        }
        let keep = data.len().min(SERIAL_KEEP);
        g.serial.extend(&data[data.len() - keep..]);
        g.serial_start = start + (data.len() - keep) as u64;
    }

    /// Queues console input for the guest.
    pub fn serial_input(&self, data: &[u8]) {
        self.lock().serial_input.extend(data);
    }

    /// Takes queued console input (the vCPU thread feeds it to the UART).
    pub fn take_serial_input(&self) -> Vec<u8> {
        self.lock().serial_input.drain(..).collect()
    }

    /// When an arrived VM first wrote to its console (host monotonic µs), if it did.
    pub fn first_output_after_arrival(&self) -> Option<u64> {
        self.lock().first_output.flatten()
    }

    fn record_serial(&self, data: &[u8]) {
        let mut g = self.lock();
        if g.first_output == Some(None) && !data.is_empty() {
            g.first_output = Some(Some(crate::migration::mono_us()));
        }
        g.serial.extend(data);
        while g.serial.len() > SERIAL_KEEP {
            g.serial.pop_front();
            g.serial_start += 1;
        }
    }

    /// The API has sent its reply to a power-off request.
    pub fn power_off_answered(&self) {
        self.lock().power_off_answered = true;
        self.changed.notify_all();
    }

    /// Waits (bounded) until the API answered the power-off, so the process does not
    /// exit under the client's feet.
    pub fn wait_power_off_answered(&self, timeout: std::time::Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.power_off_answered {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Console output goes to its destination and into the control block's buffer.
pub struct SerialTee {
    /// Where the console goes (stdout or a file).
    pub out: Box<dyn Write + Send>,
    /// The control block.
    pub control: Arc<Control>,
}

impl Write for SerialTee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.control.record_serial(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
