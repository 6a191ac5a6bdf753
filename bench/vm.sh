#!/usr/bin/env bash
# VMs on the cluster (issue #10), on the local three-node cluster (tessera-devcluster on
# 127.0.0.1-3), the test guest of tests/guest as the kernel:
#   - start latency: from POST /api/v1/vms/{name}/start to the guest's first console line
#     (median of 20), and to the start task's end; the reference, in the same run, is a
#     bare tessera-vmm started by hand to its first console line (what bench/vmm.sh does);
#   - 100 VMs started at once across the three nodes: total time until every one runs,
#     and the largest tesserad RSS before and after.
# Placement does not overcommit vCPUs: on a machine with few CPUs only (CPUs x 3) VMs of
# one vCPU fit; the script reports how many were placed and how many were refused.
# Run as root from the repository root, on an otherwise idle machine. REPEAT (default 20)
# and VMS (default 100) make a small run that checks the script: REPEAT=3 VMS=5 bench/vm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup
cargo build --release -q --bins
cargo build --release -q -p tessera-tests
GUEST=$(ls -t target/release/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)
W=$(mktemp -d /var/tmp/tessera-vm-bench.XXXX)
cleanup() {
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
target/release/tessera-devcluster --dir "$W/cluster" >"$W/dc.out" 2>&1 &
DC=$!
for _ in $(seq 300); do grep -q "is up" "$W/dc.out" && break; sleep 0.2; done
grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
PW=$(cat "$W"/cluster/node*/data/initial-admin-password)
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
exec python3 bench/vm.py "$W" "$PW" "$GUEST" target/release/tessera-vmm
