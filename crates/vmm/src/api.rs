//! The control API: JSON lines over a Unix socket, one request per line, one reply per
//! line. Versioned (`v`); unknown fields and operations are refused. See `docs/vmm.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::control::{Control, ControlError, Event, Request, RunState};
use crate::memory::{DirtyPages, MemoryError};
use crate::migration::outgoing::{self, MigrateError, Source};
use crate::migration::tls::TlsFiles;
use crate::migration::{Direction, Phase, Shared};
use crate::snapshot::SnapshotError;

/// Writes a snapshot of the paused VM into a directory.
pub type SnapshotFn = Arc<dyn Fn(&Path) -> Result<(), SnapshotError> + Send + Sync>;
/// Reports (and clears) the guest pages written since the last call.
pub type DirtyFn = Arc<dyn Fn() -> Result<DirtyPages, MemoryError> + Send + Sync>;

/// Why a request failed. The text is the `error` of the reply line, so each variant
/// says what went wrong in words a client can show as they are.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The line is not a request (bad JSON, unknown operation or field).
    #[error("bad request: {0}")]
    BadRequest(serde_json::Error),
    /// A protocol version this VMM does not speak.
    #[error("API version {0} is not supported (this VMM speaks {API_VERSION})")]
    Version(u32),
    /// The VM's state does not allow the operation.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The VM stopped while the API waited for it to pause.
    #[error("the VM stopped")]
    StoppedWhilePausing,
    /// The vCPUs did not park in time.
    #[error("the vCPU did not pause within 5 s")]
    PauseTimeout,
    /// The vCPUs did not stop in time.
    #[error("the vCPU did not stop within 5 s")]
    PowerOffTimeout,
    /// The snapshot could not be taken.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The dirty-page record could not be read.
    #[error(transparent)]
    DirtyPages(#[from] MemoryError),
    /// The power button's interrupt could not be raised.
    #[error("pressing the power button: {0}")]
    PowerButton(std::io::Error),
    /// The result could not be encoded.
    #[error("encoding the reply: {0}")]
    Encode(serde_json::Error),
    /// A live migration could not start or be cancelled.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The dirty-page record belongs to the migration under way.
    #[error("a live migration is under way: it reads the dirty-page record")]
    MigrationReadsDirtyPages,
    /// `migration_go` of a VMM that holds no loaded incoming VM.
    #[error("no incoming migration is loaded here (phase {0:?})")]
    NotLoaded(Phase),
    /// A status wait longer than the API allows.
    #[error("wait_ms is at most 5000")]
    WaitTooLong,
}

/// What the API can do to the VM besides reading its control block.
pub struct VmOps {
    /// Forces the vCPU out of the guest.
    pub kick: Arc<dyn Fn() + Send + Sync>,
    /// Takes a snapshot.
    pub snapshot: SnapshotFn,
    /// Dirty-page report.
    pub dirty: DirtyFn,
    /// The guest-visible power button.
    pub power_button: Arc<crate::power_button::PowerButton>,
    /// What a live migration of this VM reads and drives.
    pub source: Arc<Source>,
}

/// Version of the control API.
pub const API_VERSION: u32 = 1;
const MAX_LINE: u64 = 64 * 1024;

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// Protocol version.
    pub v: u32,
    /// The operation.
    pub op: ApiOp,
}

/// Operations.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiOp {
    /// State and configuration.
    Describe,
    /// Stop the vCPUs, keeping all state.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Stop the VM for good.
    PowerOff,
    /// Ask the guest to shut down: press the ACPI power button. The guest decides; the
    /// VM stops when it powers itself off (or a later `power_off` stops it).
    Shutdown,
    /// Console output from byte offset `since`.
    SerialRead {
        /// Absolute offset.
        #[serde(default)]
        since: u64,
    },
    /// Type into the console.
    SerialWrite {
        /// Text to send.
        data: String,
    },
    /// Write a snapshot of the paused VM into directory `dir` (restore it with
    /// `tessera-vmm --restore DIR`).
    Snapshot {
        /// Target directory.
        dir: String,
    },
    /// Guest pages written (by the guest or the VMM) since the last call, as
    /// guest-physical ranges; clears the record. Needs `track_dirty_pages`.
    DirtyPages,
    /// Events from sequence number `since`.
    Events {
        /// First sequence number wanted.
        #[serde(default)]
        since: u64,
    },
    /// Live-migrate the running VM to the target VMM at `to` (started with
    /// `--incoming`), over TLS with this node's credentials; progress in
    /// `migration_status`.
    Migrate {
        /// The target's `ip:port`.
        to: String,
        /// The name the target's certificate must hold (`<node id>.node.tessera`).
        server_name: String,
        /// The target's one-time token (its `migration_status`).
        token: String,
        /// The cluster CA certificate (PEM).
        tls_ca: std::path::PathBuf,
        /// This node's certificate (PEM).
        tls_cert: std::path::PathBuf,
        /// This node's key (PEM).
        tls_key: std::path::PathBuf,
        /// The downtime target in ms (default 50).
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// A cap on memory sent per second, in KiB.
        #[serde(default)]
        max_bandwidth_kib_s: Option<u64>,
    },
    /// The migration's progress; with `wait_ms` (at most 5000), once its phase is no
    /// longer `phase` or after that long.
    MigrationStatus {
        /// How long to wait for a change.
        #[serde(default)]
        wait_ms: Option<u64>,
        /// The phase the caller last saw.
        #[serde(default)]
        phase: Option<Phase>,
    },
    /// Source: stop the migration and resume the guest here (also after everything was
    /// sent: the caller must know the target will not run it).
    MigrationCancel,
    /// Target: run the loaded VM (its disk is opened now).
    MigrationGo,
}

/// A reply line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiResponse {
    /// Protocol version.
    pub v: u32,
    /// The result, on success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    /// The error, on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `describe` returns.
#[derive(Debug, Serialize, Deserialize)]
pub struct Description {
    /// Run state.
    #[serde(flatten)]
    pub state: RunState,
    /// The VM spec.
    pub spec: VmConfig,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
}

/// Serves the API on `path` in a background thread.
pub fn serve(path: &Path, ctx: Arc<Ctx>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || {
                        if let Err(e) = connection(conn, &ctx) {
                            tracing::debug!(error = %e, "control API connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

/// What a connection needs to act on the VM. An incoming migration's VMM serves the API
/// before its VM exists: `ops` is set once it does.
pub struct Ctx {
    /// The run state.
    pub control: Arc<Control>,
    /// The VM spec (`describe`).
    pub spec: Mutex<VmConfig>,
    /// What acts on the built VM.
    pub ops: OnceLock<VmOps>,
    /// The live migration's status.
    pub migration: Arc<Shared>,
}

impl Ctx {
    /// The context of a VM about to be served.
    pub fn new(control: Arc<Control>, spec: VmConfig, migration: Arc<Shared>) -> Arc<Ctx> {
        Arc::new(Ctx {
            control,
            spec: Mutex::new(spec),
            ops: OnceLock::new(),
            migration,
        })
    }

    fn kick(&self) {
        if let Some(ops) = self.ops.get() {
            (ops.kick)();
        }
    }

    fn ops(&self) -> Result<&VmOps, ApiError> {
        self.ops
            .get()
            .ok_or(ApiError::Control(ControlError::Incoming))
    }
}

/// The longest `migration_status` wait.
const MAX_STATUS_WAIT_MS: u64 = 5000;

fn connection(conn: UnixStream, ctx: &Ctx) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let mut powering_off = false;
        let mut asked_status = false;
        let reply = match serde_json::from_str::<ApiRequest>(line.trim_end()) {
            Err(e) => Err(ApiError::BadRequest(e)),
            Ok(req) if req.v != API_VERSION => Err(ApiError::Version(req.v)),
            Ok(req) => {
                powering_off = matches!(req.op, ApiOp::PowerOff);
                asked_status = matches!(req.op, ApiOp::MigrationStatus { .. });
                handle(req.op, ctx)
            }
        };
        // A completed source ends once its caller has the final figures: only after the
        // reply is written (marking it when the status was read lost the reply to the
        // process's exit).
        let told_completed = asked_status
            && reply
                .as_ref()
                .is_ok_and(|v| v.get("phase").and_then(|p| p.as_str()) == Some("completed"));
        let resp = match reply {
            Ok(v) => ApiResponse {
                v: API_VERSION,
                ok: Some(v),
                error: None,
            },
            Err(e) => ApiResponse {
                v: API_VERSION,
                ok: None,
                error: Some(e.to_string()),
            },
        };
        let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out)?;
        if powering_off {
            ctx.control.power_off_answered();
        }
        if told_completed {
            ctx.migration.completion_seen();
        }
        if n as u64 >= MAX_LINE && !line.ends_with('\n') {
            return Ok(()); // cannot find the next request boundary
        }
    }
}

fn handle(op: ApiOp, ctx: &Ctx) -> Result<serde_json::Value, ApiError> {
    let control = &*ctx.control;
    let kick = || ctx.kick();
    let json = |v: serde_json::Result<serde_json::Value>| v.map_err(ApiError::Encode);
    match op {
        ApiOp::Describe => json(serde_json::to_value(Description {
            state: control.state(),
            spec: ctx.spec.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            uptime_ms: control.uptime_ms(),
        })),
        ApiOp::Pause => {
            control.request(Request::Pause)?;
            // The vCPU may be deep in the guest: kick until it has parked.
            for _ in 0..500 {
                kick();
                if control.wait_state(&RunState::Paused, Duration::from_millis(10)) {
                    return Ok(serde_json::json!({}));
                }
                if matches!(control.state(), RunState::Stopped(_)) {
                    return Err(ApiError::StoppedWhilePausing);
                }
            }
            Err(ApiError::PauseTimeout)
        }
        ApiOp::Resume => Ok(control.resume().map(|()| serde_json::json!({}))?),
        ApiOp::PowerOff => {
            let incoming = control.state() == RunState::Incoming;
            control.request(Request::PowerOff)?;
            if incoming {
                // No vCPU to kick: cut the stream the target waits on.
                ctx.migration.cancel();
            }
            for _ in 0..500 {
                kick();
                if matches!(control.state(), RunState::Stopped(_)) {
                    return Ok(serde_json::json!({}));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(ApiError::PowerOffTimeout)
        }
        ApiOp::Shutdown => {
            control.guest_can_act()?;
            ctx.ops()?
                .power_button
                .press()
                .map_err(ApiError::PowerButton)?;
            control.event("power_button", None);
            Ok(serde_json::json!({ "pressed": true }))
        }
        ApiOp::SerialRead { since } => {
            let (data, next) = control.serial_output(since);
            Ok(serde_json::json!({ "data": String::from_utf8_lossy(&data), "next": next }))
        }
        ApiOp::SerialWrite { data } => {
            control.serial_input(data.as_bytes());
            kick();
            Ok(serde_json::json!({ "queued": data.len() }))
        }
        ApiOp::Snapshot { dir } => {
            (ctx.ops()?.snapshot)(Path::new(&dir))?;
            Ok(serde_json::json!({ "dir": dir }))
        }
        ApiOp::DirtyPages => {
            if ctx.migration.status().phase.busy() {
                return Err(ApiError::MigrationReadsDirtyPages);
            }
            json(serde_json::to_value((ctx.ops()?.dirty)()?))
        }
        ApiOp::Events { since } => json(serde_json::to_value(control.events(since))),
        ApiOp::Migrate {
            to,
            server_name,
            token,
            tls_ca,
            tls_cert,
            tls_key,
            downtime_ms,
            max_bandwidth_kib_s,
        } => {
            let params = outgoing::Params {
                to,
                server_name,
                token,
                tls: TlsFiles {
                    ca: tls_ca,
                    cert: tls_cert,
                    key: tls_key,
                },
                downtime_ms: downtime_ms.unwrap_or(outgoing::DEFAULT_DOWNTIME_MS),
                max_bandwidth_kib_s,
            };
            outgoing::start(ctx.ops()?.source.clone(), params)?;
            json(serde_json::to_value(ctx.migration.status()))
        }
        ApiOp::MigrationStatus { wait_ms, phase } => {
            let wait = wait_ms.unwrap_or(0);
            if wait > MAX_STATUS_WAIT_MS {
                return Err(ApiError::WaitTooLong);
            }
            let mut st = ctx
                .migration
                .status_after(phase, Duration::from_millis(wait));
            if let Some(at) = ctx.control.first_output_after_arrival() {
                st.timeline.push(crate::migration::Mark {
                    what: "first_console".into(),
                    mono_us: at,
                });
                st.timeline.sort_by_key(|m| m.mono_us);
            }
            json(serde_json::to_value(st))
        }
        ApiOp::MigrationCancel => {
            outgoing::cancel(&ctx.ops()?.source)?;
            json(serde_json::to_value(ctx.migration.status()))
        }
        ApiOp::MigrationGo => {
            let st = ctx.migration.status();
            if st.direction != Some(Direction::In) || st.phase != Phase::Loaded {
                return Err(ApiError::NotLoaded(st.phase));
            }
            ctx.migration.go();
            // The disk opens and the vCPUs start now: answer once they run (or it failed).
            json(serde_json::to_value(
                ctx.migration
                    .status_after(Some(Phase::Loaded), Duration::from_secs(5)),
            ))
        }
    }
}

/// Keeps `Event` in this module's public surface for clients.
pub type ApiEvent = Event;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<ApiRequest, String> {
        serde_json::from_str::<ApiRequest>(line).map_err(|e| ApiError::BadRequest(e).to_string())
    }

    #[test]
    fn requests_with_unknown_operations_or_fields_are_refused() {
        assert!(matches!(
            parse(r#"{"v":1,"op":{"type":"serial_read","since":3}}"#),
            Ok(ApiRequest {
                v: 1,
                op: ApiOp::SerialRead { since: 3 }
            })
        ));
        for (line, want) in [
            ("not json", "bad request: "),
            (
                r#"{"v":1,"op":{"type":"explode"}}"#,
                "unknown variant `explode`",
            ),
            (
                r#"{"v":1,"op":{"type":"pause"},"x":1}"#,
                "unknown field `x`",
            ),
            (
                r#"{"v":1,"op":{"type":"serial_read","x":1}}"#,
                "unknown field `x`",
            ),
            (r#"{"op":{"type":"describe"}}"#, "missing field `v`"),
        ] {
            let err = parse(line).err().unwrap_or_default();
            assert!(err.starts_with("bad request: "), "{line}: {err}");
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn error_replies_say_why_in_words() {
        assert_eq!(
            ApiError::Version(7).to_string(),
            "API version 7 is not supported (this VMM speaks 1)"
        );
        assert_eq!(
            ApiError::from(ControlError::AlreadyPaused).to_string(),
            "the VM is already paused"
        );
        assert_eq!(
            ApiError::from(SnapshotError::NotPaused).to_string(),
            "pause the VM before taking a snapshot"
        );
        assert_eq!(
            ApiError::from(MemoryError::TrackingOff).to_string(),
            "dirty-page tracking is off (start with --track-dirty-pages)"
        );
    }
}
