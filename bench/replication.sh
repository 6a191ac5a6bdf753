#!/usr/bin/env bash
# Replicated volumes (issue #8) on the local three-node cluster (tessera-devcluster on
# 127.0.0.1-3, loopback): a 3-copy volume vs a 1-copy volume, both with their primary on
# node1 and written through node1's store's NBD socket, vs `nbdkit file` on a file of the
# same disk, same run, driven by fio's nbd engine: 4K random write QD1 and QD16 (IOPS,
# p50/p99), 1M sequential write QD8, 4K random read QD16. Then catch-up throughput: node3's
# store is killed, CATCHUP_MIB are written to the 3-copy volume, the store comes back and
# the cluster catches its copy up; the primary's replication report gives the bytes sent
# and the time from the first catching_up report to caught_up.
# Why the dev cluster and not three namespaces: it is the cluster users run (tesserad
# decides the roles, as in production), and bench/vm.sh uses it too. The three stores
# share this machine's CPUs and disk, so the 3-copy figures carry three stores' work on
# one machine; loopback's latency is lower than a real network's.
# Run as root from the repository root, under flock /tmp/devcluster.lock on a shared
# machine (fixed addresses). PROFILE (default release) picks the cargo profile, NO_BUILD=1
# reuses target/$PROFILE, NO_SETUP=1 skips tests/setup. RUNTIME (s per fio run, default 8),
# SIZE (MiB per volume, default 256), CATCHUP_MIB (default 128). Each write run's CPU use per
# process is printed; PERF=1 also profiles the three stores (perf record) during the 3-copy
# 1M run (PERF=<workload>, e.g. 4k-randwrite-qd1: during that one), its report kept with KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$PROFILE" -q --bins
. bench/lib/devcluster.sh
PIDS=()
dc_before_stop() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
dc_after_stop() {
    # A store the benchmark restarted itself is not the launcher's: stop it by pid.
    if [ -f "$W/restarted.pid" ]; then kill "$(cat "$W/restarted.pid")" 2>/dev/null || true; fi
}
dc_workdir repl
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store
dc_start
SIZE_MIB=${SIZE:-256}
truncate -s "${SIZE_MIB}M" "$W/nbdkit.img"
nbdkit -f -U "$W/nbdkit.sock" file "$W/nbdkit.img" &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$W/nbdkit.sock" ] && break; sleep 0.05; done
echo "machine: $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(uname -r); disk: $(df --output=source "$W" | tail -1)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); rustc processes running: $(pgrep -c rustc || true); profile: $PROFILE"
python3 bench/replication.py "$W" "$PW" "$SIZE_MIB" "${RUNTIME:-8}" "${CATCHUP_MIB:-128}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg); rustc processes running: $(pgrep -c rustc || true)"
