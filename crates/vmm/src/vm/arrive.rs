//! A VM that arrives by live migration: listen, make the KVM VM and its vCPUs, receive
//! its memory and state (`migration::incoming`), load the state into that VM with its
//! disk deferred, say `Loaded`, and run it
//! only when the control API says `migration_go` — the caller has then moved the VM and
//! its disk's primary to this node. Until then the guest never runs here, so a source
//! that carries on (a cancelled or failed migration) never has a twin.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{build, check_vcpus, run_built, RunOutcome, StopReason, VmError};
use crate::api;
use crate::control::Control;
use crate::memory;
use crate::migration::deferred_disk::DeferredDisk;
use crate::migration::incoming::{self, Args, Received};
use crate::migration::wire::{self, Message};
use crate::migration::{Phase, Shared};

/// How long a loaded VM waits for `migration_go` before giving up.
const GO_LIMIT: Duration = Duration::from_secs(120);

fn failed(shared: &Shared, why: &str) {
    shared.update(|s| {
        s.phase = Phase::Failed;
        s.error = Some(why.to_string());
    });
}

fn stopped(control: &Control) -> RunOutcome {
    control.stopped("PowerOff");
    RunOutcome {
        reason: StopReason::PowerOff,
        first_instruction: None,
    }
}

/// Runs the incoming side until the guest, once running here, stops.
pub(super) fn run(
    args: Args,
    control: Arc<Control>,
    serial_out: Box<dyn Write + Send>,
    shared: Arc<Shared>,
    api_socket: Option<&Path>,
    start: Instant,
) -> Result<RunOutcome, VmError> {
    let cfg = args.cfg.clone();
    check_vcpus(&cfg, &control)?;
    control.set_incoming();
    let mem = memory::guest_memory(cfg.memory_mib)?;
    let ctx = api::Ctx::new(control.clone(), cfg.clone(), shared.clone());
    // Listening first, so the API's first answer already says where and the token.
    let listening = incoming::listen(&args, &shared).map_err(VmError::Incoming)?;
    if let Some(path) = api_socket {
        api::serve(path, ctx.clone()).map_err(|error| VmError::ApiSocket {
            path: path.to_path_buf(),
            error,
        })?;
    }
    // The KVM VM, its memory slots and vCPUs now, while the source still copies memory:
    // once it paused the guest, only the state is left to load.
    let made = Instant::now();
    let shell = match build::Shell::for_restore(&cfg, &mem) {
        Ok(s) => s,
        Err(e) => {
            failed(&shared, &e.to_string());
            return Err(e);
        }
    };
    tracing::info!(
        took_us = made.elapsed().as_micros() as u64,
        "the VM's KVM objects are made; waiting for its memory and state"
    );
    let received = match incoming::receive(listening, &args, &mem, &control, &shared) {
        Ok(r) => r,
        Err(_) if control.stop_requested().is_some() => return Ok(stopped(&control)),
        Err(e) => {
            failed(&shared, &e.to_string());
            return Err(VmError::Incoming(e));
        }
    };
    shared.mark("received");
    let Received {
        snap,
        scrollback,
        disk,
        mut stream,
    } = received;
    // The source's spec, with what this node gave: the disk, its connection, the taps.
    let mut spec = snap.spec.clone();
    spec.disk = cfg.disk.clone();
    spec.nbd = cfg.nbd.clone();
    spec.nics = cfg.nics.clone();
    spec.track_dirty_pages = cfg.track_dirty_pages;
    *ctx.spec.lock().unwrap_or_else(|p| p.into_inner()) = spec.clone();
    if let Some((at, data)) = scrollback {
        control.restore_serial(at, &data);
    }
    let deferred = disk.clone().map(DeferredDisk::new);
    let built = build::build(
        shell,
        &spec,
        Some(&snap),
        mem,
        deferred.as_ref().map(|d| d.handle()),
        serial_out,
        start,
    );
    let built = match built {
        Ok(b) => {
            shared.mark("built");
            b
        }
        Err(e) => {
            let _ = wire::write(&mut stream, &Message::Refuse(e.to_string()));
            let _ = std::io::Write::flush(&mut stream);
            failed(&shared, &e.to_string());
            return Err(e);
        }
    };
    // A source that does not hear this is left undecided; whether the guest runs here is
    // still the caller's to say (`migration_go`), so go on either way.
    if let Err(e) = incoming::loaded(&mut stream) {
        tracing::warn!(error = %e, "could not tell the source the VM is loaded");
    }
    shared.update(|s| s.phase = Phase::Loaded);
    shared.mark("loaded");
    control.event("migration_loaded", None);
    tracing::info!("incoming VM loaded; waiting to be told to run it");
    if !shared.wait_go(&control, GO_LIMIT) {
        if control.stop_requested().is_some() {
            return Ok(stopped(&control));
        }
        let why = format!("loaded, but not told to run within {GO_LIMIT:?}");
        failed(&shared, &why);
        return Err(VmError::NotToldToRun(GO_LIMIT));
    }
    shared.mark("go");
    if let (Some(d), Some(uri)) = (&deferred, &cfg.disk) {
        let attached = tessera_disk::open_with(uri, &cfg.nbd)
            .map_err(VmError::Disk)
            .and_then(|disk| d.attach(disk).map_err(VmError::Attach));
        if let Err(e) = attached {
            let _ = wire::write(&mut stream, &Message::Refuse(e.to_string()));
            let _ = std::io::Write::flush(&mut stream);
            failed(&shared, &e.to_string());
            return Err(e);
        }
        shared.mark("disk_attached");
        d.watch_first_request(shared.clone());
    }
    built.kick_devices()?;
    control.arrived();
    shared.update(|s| {
        s.phase = Phase::Running;
        s.timeline.push(crate::migration::Mark {
            what: "running".into(),
            mono_us: crate::migration::mono_us(),
        });
    });
    // The source may be slow or gone: telling it must not hold the guest up.
    let _ = std::thread::Builder::new()
        .name("migrate-resumed".into())
        .spawn(move || incoming::resumed(stream));
    run_built(&spec, built, &ctx, disk, None, "migrated_in")
}
