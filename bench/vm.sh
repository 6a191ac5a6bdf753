#!/usr/bin/env bash
# VMs on the cluster (issue #10), on the local three-node cluster (tessera-devcluster on
# 127.0.0.1-3), the test guest of tests/guest as the kernel:
#   - start latency: from POST /api/v1/vms/{name}/start to the guest's first instruction
#     (the VMM's boot-timer log line), to its first console line (median of 20), and to
#     the start task's end; the reference, in the same run, is a bare tessera-vmm started
#     by hand to its first console line (what bench/vmm.sh does);
#   - 100 VMs started at once across the three nodes (8 clients, 503s retried with
#     backoff and counted): time until every start is answered and until every VM runs,
#     the CPU they use once running, the load, and the largest tesserad RSS before and
#     after; the reference, in the same run, is 100 bare tessera-vmm processes started
#     directly. The script raises the cluster's vcpu_overcommit so that 100 one-vCPU VMs
#     fit on the CPUs of this one machine. Every guest runs the test guest's idle mode
#     (tessera.mode=idle: a count per second, halted in between), so the guests do not
#     overload the machine by themselves as the busy-looping count mode did.
# The dev cluster uses fixed addresses (127.0.0.1-3): on a shared machine run it under
# flock /tmp/devcluster.lock, as the tests using it are.
# Run as root from the repository root, on an otherwise idle machine. REPEAT (default 20)
# and VMS (default 100) make a small run that checks the script: REPEAT=3 VMS=5 bench/vm.sh
# PROFILE (default release) picks the cargo profile, e.g. PROFILE=fast reuses a fast build;
# NO_SETUP=1 skips tests/setup (packages already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
# NO_BUILD=1 uses the binaries already in target/$PROFILE (a shared checkout's build).
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --profile "$PROFILE" -q --bins
    cargo build --profile "$PROFILE" -q -p tessera-tests
fi
. bench/lib/devcluster.sh
# VMMs outlive tesserad by design (they are re-adopted): the ones started for this run
# are killed by pid once the nodes are stopped (a tesserad still running restarts a
# killed VMM: 28 VMMs were once left spinning that way).
DC_REAP="tessera-vmm "
dc_workdir vm
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store tessera-vmm
dc_guest "target/$PROFILE" "tessera.tick_ms=" "idle mode"
GUEST=$W/guest.elf
dc_start
dc_machine
python3 bench/vm.py "$W" "$PW" "$GUEST" $T/tessera-vmm
