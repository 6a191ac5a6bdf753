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
T=target/$PROFILE
W=$(mktemp -d /var/tmp/tessera-vm-bench.XXXX)
# Private copies of the binaries and the guest: a shared checkout's next build must not
# swap them under a running benchmark (tesserad starts the tessera-vmm next to itself).
mkdir "$W/bin"
cp $T/tessera-devcluster $T/tesserad $T/tessera-store $T/tessera-vmm "$W/bin/"
cp "$(ls -t $T/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)" "$W/guest.elf"
GUEST=$W/guest.elf
grep -q "tessera.tick_ms=" "$GUEST" || { echo "the test guest has no idle mode: build tessera-tests again"; exit 1; }
T=$W/bin
cleanup() {
    # The nodes first: a tesserad still running restarts a killed VMM (restart policy
    # on-crash), as an earlier version of this cleanup found out (28 VMMs left spinning).
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    # VMMs outlive tesserad by design (they are re-adopted): kill the ones started for
    # this run (their command lines name $W), by pid.
    for c in /proc/[0-9]*/cmdline; do
        if { tr '\0' ' ' <"$c"; } 2>/dev/null | grep -q "tessera-vmm .*$W/"; then
            p=${c#/proc/}; kill -9 "${p%/cmdline}" 2>/dev/null || true
        fi
    done
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
$T/tessera-devcluster --dir "$W/cluster" >"$W/dc.out" 2>&1 &
DC=$!
for _ in $(seq 300); do grep -q "is up" "$W/dc.out" && break; sleep 0.2; done
grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
PW=$(cat "$W"/cluster/node*/data/initial-admin-password)
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "profile: $PROFILE; rustc processes running at the start: $(pgrep -c rustc || true)"
python3 bench/vm.py "$W" "$PW" "$GUEST" $T/tessera-vmm
