//! Starting a VM's VMM on this node: its boot files, its disk (this node's store, or
//! another node's over TLS NBD), its NICs' taps, unless its restart backoff or a crash
//! for this start says to wait.

use std::time::Instant;

use tessera_api::{Vm, VmState, VmStatus, Volume};

use super::{blocking, nics, supervisor, Reconciler, Running, VM_STATUS};
use crate::records::table::{NODES, VOLUMES};
use crate::replication::moves::{self, PrimaryHere};
use crate::tables::get;

impl Reconciler {
    /// A VM meant to run here has no VMM: start one, unless its restart policy or its
    /// backoff says to wait, or it already crashed for this start.
    pub(super) async fn launch_or_hold(&mut self, vm: &Vm) {
        let name = vm.name.clone();
        let status: Option<VmStatus> = get(&self.node, VM_STATUS, &name);
        if let Some(s) = status.as_ref().filter(|s| {
            s.node == self.local.me && s.start_seq == vm.start_seq && s.reboot_seq == vm.reboot_seq
        }) {
            match s.state {
                VmState::Crashed => return,
                // It ran for this start, and no VMM is left: it ended while no
                // tesserad watched.
                VmState::Running | VmState::Paused | VmState::Stopping
                    if self
                        .crashes
                        .get(&name)
                        .is_none_or(|c| c.not_before.is_none()) =>
                {
                    let tail = supervisor::log_tail(&self.dir(&name));
                    return self.ended(vm, supervisor::ending(None, &tail), None).await;
                }
                _ => {}
            }
        }
        if self
            .crashes
            .get(&name)
            .and_then(|c| c.not_before)
            .is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        // The image's verified local copy (fetched from a peer when missing) or the
        // kernel path: `crate::images`.
        let boot = match crate::images::boot(&self.node, &self.local.data_dir, vm).await {
            Ok(b) => b,
            Err(why) => return self.report(&name, VmState::Crashed, Some(why), None).await,
        };
        // A replicated disk's primary moves here first when this node holds an in-sync
        // copy (issue #8), so the VM's disk is this node's own store. One step per round:
        // the VM stays `starting` meanwhile, and this node's other VMs are not held up.
        if let Some(d) = vm.disks.first() {
            match moves::primary_step(&self.node, &self.local.me, d).await {
                PrimaryHere::Moving(why) => {
                    let since = *self
                        .moving_primary
                        .entry(name.clone())
                        .or_insert_with(Instant::now);
                    if since.elapsed() < moves::TAKE_OVER_WAIT {
                        self.hurry = true;
                        return self.report(&name, VmState::Starting, Some(why), None).await;
                    }
                    tracing::warn!(
                        vm = %name,
                        volume = %d,
                        "{why}: still not after {} s; starting the VM with the primary as recorded",
                        moves::TAKE_OVER_WAIT.as_secs()
                    );
                }
                PrimaryHere::Here | PrimaryHere::Elsewhere => {}
            }
            self.moving_primary.remove(&name);
        }
        let mut spec = match self.launch_spec(vm, boot) {
            Ok(s) => s,
            Err(why) => return self.report(&name, VmState::Crashed, Some(why), None).await,
        };
        // The NICs' taps, on their networks' bridges; a network not (yet) set up on this
        // node holds the start, which the next tick tries again.
        match nics::taps(vm, &self.local.networks).await {
            Ok(t) => spec.nics = t,
            Err(why) => return self.report(&name, VmState::Starting, Some(why), None).await,
        }
        // Its writer key, recorded in the cluster before the VMM can write (issue #8):
        // from now on only this VMM writes the disk, and a VMM of an earlier start no
        // longer does.
        if !vm.disks.is_empty() {
            match super::writer_key::issue(&self.node, &self.local.me, vm).await {
                Ok(key) => spec.disk_key = Some(key),
                Err(why) => return self.report(&name, VmState::Starting, Some(why), None).await,
            }
        }
        let dir = self.dir(&name);
        let exits = self.exits.clone();
        let seqs = (vm.start_seq, vm.reboot_seq);
        let n = name.clone();
        let res = blocking(move || supervisor::launch(&dir, &n, &spec, seqs, &exits)).await;
        match res {
            Some(Ok(info)) => {
                tracing::info!(vm = %name, pid = info.pid, "VMM started");
                let pid = info.pid;
                self.running.insert(
                    name.clone(),
                    Running {
                        info,
                        launched: Some(Instant::now()),
                        state: VmState::Starting,
                        stop: None,
                    },
                );
                let reason = self.reasons.get(&name).cloned();
                self.report(&name, VmState::Starting, reason, Some(pid))
                    .await;
            }
            Some(Err(e)) => {
                self.report(&name, VmState::Crashed, Some(e.to_string()), None)
                    .await
            }
            None => {}
        }
    }

    fn launch_spec(
        &self,
        vm: &Vm,
        boot: crate::images::Boot,
    ) -> Result<supervisor::Launch, String> {
        let (disk, disk_tls) = match vm.disks.first() {
            None => (None, None),
            Some(d) => {
                let v: Volume = get(&self.node, VOLUMES, d)
                    .ok_or_else(|| format!("its disk, volume {d}, does not exist"))?;
                if v.node == self.local.me {
                    let uri = format!("nbd+unix:///{d}?socket={}", self.local.nbd_socket.display());
                    (Some(uri), None)
                } else {
                    // Another node's store: TCP NBD there is TLS-only, and this node's own
                    // certificate is a client certificate of the cluster CA.
                    let addr = self.remote_nbd(&v.node).ok_or_else(|| {
                        format!(
                            "its disk, volume {d}, is on node {}, whose store has published no NBD address",
                            v.node
                        )
                    })?;
                    let t = &self.local.tls_dir;
                    let tls = supervisor::DiskTls {
                        ca: t.join("ca.crt"),
                        cert: t.join("node.crt"),
                        key: t.join("node.key"),
                    };
                    (Some(format!("nbds://{addr}/{d}")), Some(tls))
                }
            }
        };
        Ok(supervisor::Launch {
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: boot.cmdline,
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            disk,
            disk_tls,
            disk_key: None,
            nics: Vec::new(),
        })
    }

    /// The TCP NBD address of node `id`'s store as it published it; a wildcard address
    /// (the store listens everywhere) is reached at the node's management address, which
    /// its certificate names.
    fn remote_nbd(&self, id: &str) -> Option<std::net::SocketAddr> {
        let rec: serde_json::Value = get(&self.node, NODES, id)?;
        let nbd: std::net::SocketAddr = rec["nbd"].as_str()?.parse().ok()?;
        if !nbd.ip().is_unspecified() {
            return Some(nbd);
        }
        let mgmt: std::net::SocketAddr = rec["address"].as_str()?.parse().ok()?;
        Some(std::net::SocketAddr::new(mgmt.ip(), nbd.port()))
    }
}
