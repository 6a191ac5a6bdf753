//! A VM's NICs on this node: one tap per NIC (`tessera_hostnet::create_tap`), on the
//! bridge this node made for the NIC's network, with the NIC's MAC. The taps are not
//! persistent: `tesserad` hands their fds to the VMM (`--net fd=N,mac=MAC`) and drops its
//! own, so each tap lives exactly as long as the VMM and goes away with it. A VMM
//! re-adopted after a `tesserad` restart keeps its taps: nothing here needs them again.

use std::sync::Arc;

use tessera_api::Vm;
use tessera_hostnet::TapSpec;

use super::supervisor::NicFd;
use crate::netrun::Networks;

/// The taps of `vm`'s NICs, in NIC order, or why not (a network not set up here, a tap
/// that cannot be made). On an error the taps made so far are dropped, and with them gone.
pub async fn taps(vm: &Vm, nets: &Networks) -> Result<Vec<NicFd>, String> {
    // A record saved before NICs had MACs, meant to run since: never started without the
    // NICs it asks for. A start through the API gives them MACs (`api::nics::migrate`).
    if vm.nics.len() != vm.networks.len() {
        return Err(format!(
            "networks {}: the VM's record predates NIC MACs; stop and start it (the start \
             gives its NICs MACs)",
            vm.networks.join(", ")
        ));
    }
    let mut out = Vec::with_capacity(vm.nics.len());
    for (i, nic) in vm.nics.iter().enumerate() {
        let bridge = nets
            .bridge(&nic.network)
            .map_err(|e| format!("nic {i}: {e}"))?;
        let mac = crate::api::nics::parse(&nic.mac)
            .ok_or_else(|| format!("nic {i}: MAC {} is not one", nic.mac))?;
        let spec = TapSpec {
            vm: vm.name.clone(),
            nic: i as u16,
            mac,
            bridge,
        };
        let tap = tessera_hostnet::create_tap(&spec)
            .await
            .map_err(|e| format!("nic {i}: {e}"))?;
        out.push(NicFd {
            tap: tap.name().to_string(),
            fd: Arc::new(tap.into_fd()),
            mac: nic.mac.clone(),
        });
    }
    Ok(out)
}
