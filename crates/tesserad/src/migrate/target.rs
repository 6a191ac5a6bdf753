//! The target node's side: start a VMM waiting for the VM (`--incoming`), say where it
//! listens, wait until it holds the whole VM, commit the switch-over (the VM and its
//! disk's primary move here in one transaction), make the local store the volume's
//! primary, and let the VMM run the guest. On any failure before the
//! switch-over the VMM is killed and the migration fails; the source keeps the guest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_api::{DesiredState, MigrationPhase, TaskLog, Vm, Volume};
use tessera_state::{Command, Node, Require};

use super::progress::{mark, timeline_line, vmm_marks, Marks};
use super::{fail, record, update_task, vmm_call, Held, Local, Migration};
use crate::records::table::{MIGRATIONS, NODES, VMS, VOLUMES};
use crate::tables::{event, get, put};
use crate::vmrun::supervisor::{self, DiskTls, RunDir};

/// How long the incoming VMM may take to listen.
const LISTEN_LIMIT: Duration = Duration::from_secs(10);
/// How long the target waits, listening or receiving, for the VM to be loaded.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// How long the switch-over waits for the local store to serve the volume as primary.
const PRIMARY_LIMIT: Duration = Duration::from_secs(20);

pub(super) async fn run(node: &Arc<Node>, local: &Local, m: Migration) {
    if m.phase != MigrationPhase::Preparing {
        // This tesserad did not start the VMM waiting for it (it restarted meanwhile).
        if matches!(
            m.phase,
            MigrationPhase::Listening | MigrationPhase::Transferring
        ) {
            fail(
                node,
                &m,
                "the target node's tesserad restarted during the migration",
            )
            .await;
        }
        return;
    }
    let reg = &local.vmrun.migrations;
    let dir = RunDir::new(&local.vmrun.data_dir, &m.vm);
    reg.set(&m.vm, Held::Arriving);
    let mut pid = None;
    let mut marks = Marks::new();
    match arrive(node, local, &m, &dir, &mut pid, &mut marks).await {
        Ok(()) => {
            reg.set(&m.vm, Held::Arrived);
            tracing::info!(vm = %m.vm, "the VM arrived by live migration and runs here");
            report_timeline(node, &m, &dir, marks).await;
        }
        Err(Failure::Before(why)) => {
            if let Some(p) = pid {
                supervisor::kill(p);
            }
            supervisor::forget(&dir);
            reg.clear(&m.vm);
            // The key made for the target VMM: never current, as the VM stays put.
            crate::vmrun::writer_key::retire_unplaced(node, &local.me, &m.vm).await;
            fail(node, &m, &why).await;
        }
        Err(Failure::After(why)) => {
            // Switched over: the VM is placed here. Without its migrated VMM the
            // reconciler starts it afresh here.
            if let Some(p) = pid {
                supervisor::kill(p);
            }
            supervisor::forget(&dir);
            reg.clear(&m.vm);
            tracing::error!(vm = %m.vm, %why, "switched over, but the target VMM could not run the guest");
            let _ = node
                .write(Command::Txn {
                    require: vec![Require::exists(VMS, &m.vm)],
                    ops: vec![event(
                        "vm.migrate_failed",
                        &m.vm,
                        &m.user,
                        &format!(
                            "VM {} was switched over to {}, but its VMM there could not run the guest ({why}); it starts afresh there",
                            m.vm, m.to
                        ),
                    )],
                })
                .await;
        }
    }
}

enum Failure {
    /// Before the switch-over: the guest stays on the source.
    Before(String),
    /// After it: the VM is placed here.
    After(String),
}

/// The disk the VM uses on this node: the local store when the volume's primary is or
/// will be here, else the primary's store over TLS NBD.
fn disk_here(
    node: &Node,
    local: &Local,
    vm: &Vm,
) -> Result<(Option<String>, Option<DiskTls>), String> {
    let Some(d) = vm.disks.first() else {
        return Ok((None, None));
    };
    let me = &local.me;
    let v: Volume =
        get(node, VOLUMES, d).ok_or_else(|| format!("its disk, volume {d}, does not exist"))?;
    if v.node == *me || crate::replication::moves::plan(&v, me).is_some() {
        let uri = format!(
            "nbd+unix:///{d}?socket={}",
            local.vmrun.nbd_socket.display()
        );
        return Ok((Some(uri), None));
    }
    let rec: serde_json::Value = get(node, NODES, &v.node)
        .ok_or_else(|| format!("its disk's node {} is not registered", v.node))?;
    let addr = rec["nbd"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .map(|a| {
            if a.ip().is_unspecified() {
                rec["address"]
                    .as_str()
                    .and_then(|m| m.parse::<SocketAddr>().ok())
                    .map_or(a, |m| SocketAddr::new(m.ip(), a.port()))
            } else {
                a
            }
        })
        .ok_or_else(|| format!("node {}'s store has published no NBD address", v.node))?;
    Ok((Some(format!("nbds://{addr}/{d}")), Some(tls(local))))
}

fn tls(local: &Local) -> DiskTls {
    let t = &local.vmrun.tls_dir;
    DiskTls {
        ca: t.join("ca.crt"),
        cert: t.join("node.crt"),
        key: t.join("node.key"),
    }
}

async fn arrive(
    node: &Node,
    local: &Local,
    m: &Migration,
    dir: &RunDir,
    pid: &mut Option<u32>,
    marks: &mut Marks,
) -> Result<(), Failure> {
    let before = Failure::Before;
    let vm: Vm = get(node, VMS, &m.vm).ok_or_else(|| before("the VM was deleted".into()))?;
    let (disk, disk_tls) = disk_here(node, local, &vm).map_err(before)?;
    let nics = crate::vmrun::nics::taps(&vm, &local.vmrun.networks)
        .await
        .map_err(before)?;
    // Its own writer key (issue #8): it writes the disk only once the switch-over places
    // the VM here, and from then on the source VMM's key is refused.
    let disk_key = match &disk {
        Some(_) => Some(
            crate::vmrun::writer_key::issue(node, &local.me, &vm)
                .await
                .map_err(before)?,
        ),
        None => None,
    };
    let spec = supervisor::Launch {
        kernel: String::new(),
        initrd: None,
        cmdline: None,
        memory_mib: vm.memory_mib,
        vcpus: vm.vcpus,
        disk,
        disk_tls,
        disk_key,
        nics,
    };
    let listen = SocketAddr::new(local.vmrun.management.ip(), 0);
    let (d, name, tls, exits) = (
        dir.clone(),
        m.vm.clone(),
        tls(local),
        local.vmrun.migrations.exits.clone(),
    );
    let seqs = (vm.start_seq, vm.reboot_seq);
    let info = tokio::task::spawn_blocking(move || {
        supervisor::launch_incoming(&d, &name, &spec, listen, &tls, seqs, &exits)
    })
    .await
    .map_err(|e| before(e.to_string()))?
    .map_err(|e| before(format!("starting the target VMM: {e}")))?;
    *pid = Some(info.pid);
    tracing::info!(vm = %m.vm, pid = info.pid, "target VMM started for a live migration");
    let sock = dir.api_socket();

    // Where it listens, and its token.
    let deadline = Instant::now() + LISTEN_LIMIT;
    let (addr, token) = loop {
        // Not `supervisor::alive`: right after the spawn the child may not have exec'ed
        // `tessera-vmm` yet.
        if local.vmrun.migrations.exits.ended(info.pid) {
            return Err(before(ended(dir)));
        }
        if let Ok(st) = vmm_call(sock.clone(), json!({"type": "migration_status"})).await {
            if let (Some(a), Some(t)) = (st["listen"].as_str(), st["token"].as_str()) {
                break (a.to_string(), t.to_string());
            }
        }
        if Instant::now() > deadline {
            return Err(before("the target VMM did not listen within 10 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut listening = m.clone();
    listening.phase = MigrationPhase::Listening;
    listening.listen = Some(addr);
    listening.token = Some(token);
    if !super::swap(node, m, &listening, Vec::new()).await {
        return Err(before(cancelled(node, m)));
    }

    // Until the VMM holds the whole VM.
    let deadline = Instant::now() + LOAD_LIMIT;
    let mut last = "listening".to_string();
    loop {
        let rec = record(node, &m.vm, &m.task);
        if rec
            .as_ref()
            .is_none_or(|r| r.phase == MigrationPhase::Failed)
        {
            return Err(before(cancelled(node, m)));
        }
        let asked = json!({"type": "migration_status", "wait_ms": 500, "phase": last});
        let st = vmm_call(sock.clone(), asked)
            .await
            .map_err(|_| before(ended(dir)))?;
        let phase = st["phase"].as_str().unwrap_or("").to_string();
        match phase.as_str() {
            "loaded" => {
                mark(marks, "loaded_seen");
                break;
            }
            "failed" => {
                return Err(before(format!(
                    "the target VMM failed: {}",
                    st["error"].as_str().unwrap_or("?")
                )))
            }
            _ => {}
        }
        last = phase;
        if Instant::now() > deadline {
            return Err(before(format!(
                "the VM was not loaded on the target within {} s",
                LOAD_LIMIT.as_secs()
            )));
        }
    }

    let moved = switch_over(node, local, m).await.map_err(before)?;
    mark(marks, "switched_over");
    if let Some(generation) = moved {
        // Told directly: the reconciler's round, woken by the same commit, would get there
        // too, after its look at every other volume.
        let given = match vm.disks.first() {
            Some(d) => {
                crate::replication::roles::give_now(node, &local.me, &local.admin_socket, d).await
            }
            None => false,
        };
        if !given {
            wait_primary(local, &vm, generation).await;
        }
        mark(marks, "primary_ready");
    }
    let went = vmm_call(sock.clone(), json!({"type": "migration_go"}))
        .await
        .map_err(|e| Failure::After(format!("migration_go: {e}")))?;
    mark(marks, "go_answered");
    if went["phase"] != "running" {
        return Err(Failure::After(format!(
            "the target VMM did not run the guest: {}",
            went["error"].as_str().unwrap_or("?")
        )));
    }
    Ok(())
}

/// How long the target looks for the guest's first disk request after the resume.
const TIMELINE_LIMIT: Duration = Duration::from_secs(3);

/// Writes the switch-over's moments as this node saw them, with the target VMM's (up to
/// the guest's first disk request done, or [`TIMELINE_LIMIT`]), into the task's log.
async fn report_timeline(node: &Node, m: &Migration, dir: &RunDir, mut marks: Marks) {
    let deadline = Instant::now() + TIMELINE_LIMIT;
    let mut vmm = Marks::new();
    while Instant::now() < deadline {
        let Ok(st) = vmm_call(dir.api_socket(), json!({"type": "migration_status"})).await else {
            break;
        };
        vmm = vmm_marks(&st, "vmm_");
        let has = |w: &str| vmm.iter().any(|(what, _)| what == w);
        // A VM without a disk has no disk marks to wait for.
        let disk_done = has("vmm_first_disk_done") || !has("vmm_disk_attached");
        if disk_done && has("vmm_first_console") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    marks.extend(vmm);
    let Some(line) = timeline_line("target", &marks) else {
        return;
    };
    tracing::info!(vm = %m.vm, task = %m.task, "{line}");
    update_task(
        node,
        &m.task,
        |t| {
            t.log.push(TaskLog {
                time_ms: crate::now_ms(),
                message: line.clone(),
            })
        },
        Vec::new(),
    )
    .await;
}

/// Why the migration stopped while this side waited: the record's error.
fn cancelled(node: &Node, m: &Migration) -> String {
    record(node, &m.vm, &m.task)
        .and_then(|r| r.error)
        .unwrap_or_else(|| "the migration was cancelled".into())
}

fn ended(dir: &RunDir) -> String {
    let tail = supervisor::log_tail(dir);
    let last = tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    format!("the target VMM ended: {last}")
}

/// Commits the switch-over: the VM placed here, its volume's primary moved here with a
/// raised generation (when this node holds an in-sync copy), the record
/// `switched_over`, all in one transaction that requires each unchanged. Returns the
/// volume's new generation when the primary moved.
async fn switch_over(node: &Node, local: &Local, m: &Migration) -> Result<Option<u64>, String> {
    let me = &local.me;
    for _ in 0..20 {
        let rec = record(node, &m.vm, &m.task).ok_or("the migration's record is gone")?;
        if rec.phase != MigrationPhase::Transferring {
            return Err(rec
                .error
                .unwrap_or_else(|| "the migration was cancelled".into()));
        }
        let vm: Vm = get(node, VMS, &m.vm).ok_or("the VM was deleted")?;
        if vm.placed_on.as_deref() != Some(m.from.as_str())
            || vm.desired_state != DesiredState::Running
            || vm.start_seq != m.start_seq
        {
            return Err("the VM was stopped, restarted or moved meanwhile".into());
        }
        let mut placed = vm.clone();
        placed.placed_on = Some(me.clone());
        placed.generation += 1;
        placed.updated_ms = crate::now_ms();
        let mut done = rec.clone();
        done.phase = MigrationPhase::SwitchedOver;
        let mut require = vec![
            Require::equals(MIGRATIONS, &m.vm, json!(rec)),
            Require::equals(VMS, &m.vm, json!(vm)),
        ];
        let mut ops = vec![
            put(VMS, &m.vm, &placed),
            put(MIGRATIONS, &m.vm, &done),
            event(
                "vm.migrate",
                &m.vm,
                &m.user,
                &format!("VM {} switched over from {} to {}", m.vm, m.from, me),
            ),
        ];
        // The source's writer record goes with the move (`crate::vmrun::writer_key`).
        ops.extend(crate::vmrun::writer_key::retire_moved(&vm, &placed));
        let mut moved = None;
        if let Some(d) = vm.disks.first() {
            if let Some(v) = get::<Volume>(node, VOLUMES, d) {
                if let Some(mut new) = crate::replication::moves::plan(&v, me) {
                    new.nbd = crate::replication::nbd_uri(
                        &crate::replication::node_records(node),
                        me,
                        &v.name,
                    );
                    require.push(Require::equals(VOLUMES, d, json!(v)));
                    ops.push(put(VOLUMES, d, &new));
                    ops.push(event(
                        "volume.primary_moved",
                        d,
                        "tesserad",
                        &format!(
                            "primary moved from {} to {me} with VM {} (live migration); generation {}",
                            v.node, m.vm, new.generation
                        ),
                    ));
                    moved = Some(new.generation);
                }
            }
        }
        match node.write(Command::Txn { require, ops }).await {
            Ok(a) if a.conflict.is_none() => {
                tracing::info!(vm = %m.vm, from = %m.from, primary_moved = moved.is_some(), "live migration switched over");
                return Ok(moved);
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                tracing::debug!(error = %e, "switch-over not committed yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Err("the switch-over could not be committed (the VM or its volume kept changing)".into())
}

/// Waits (bounded) until the local store serves the VM's volume as the configured
/// primary in `generation` (when it was not told directly: the reconciler tells it);
/// the guest's disk requests wait (and retry) meanwhile anyway.
async fn wait_primary(local: &Local, vm: &Vm, generation: u64) {
    let Some(volume) = vm.disks.first() else {
        return;
    };
    let primary = |h: &tessera_store_admin::VolumeReplication| {
        h.role == "primary" && h.configured && h.generation >= generation && h.fenced_by.is_none()
    };
    if !super::release::wait_store(local, volume, PRIMARY_LIMIT, primary).await {
        tracing::warn!(volume = %volume, "the local store did not serve as primary in time; the VM runs anyway");
    }
}
