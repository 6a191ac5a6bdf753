#!/usr/bin/env bash
# HA restart (issue #12) on the local three-node cluster (tessera-devcluster on
# 127.0.0.1-3): an HA VM (the test guest, idle mode) on a three-copy volume; the node it
# runs on is killed (SIGKILL of its tesserad, store and VMMs) REPEAT times (default 10):
# time from the kill to the guest's first console line on another node, median and max
# (goal <= 15 s), with the time until the node is declared down (bound 3.5 s) and, as the
# reference in the same run, a bare tessera-vmm to its first console line. The killed node
# is started again between kills (same command lines) and the copies resynced.
# The dev cluster uses fixed addresses: on a shared machine run it under
# flock /tmp/devcluster.lock. Run as root from the repository root.
# PROFILE (default release) picks the cargo profile; NO_BUILD=1 uses target/$PROFILE as
# it is; NO_SETUP=1 skips tests/setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --profile "$PROFILE" -q --bins
    cargo build --profile "$PROFILE" -q -p tessera-tests
fi
. bench/lib/devcluster.sh
# What the launcher did not start (a killed node started again by ha.py) and the VMMs
# (they outlive tesserad by design): every process left naming $W is reaped.
DC_REAP=.
dc_workdir ha
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store tessera-vmm
dc_guest "target/$PROFILE" "tessera.tick_ms=" "idle mode"
dc_start
dc_machine
python3 bench/ha.py "$W" "$PW" "$W/guest.elf" $T/tessera-vmm
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
