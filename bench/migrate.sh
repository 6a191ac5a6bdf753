#!/usr/bin/env bash
# Live migration (issue #12) on the local three-node cluster (tessera-devcluster on
# 127.0.0.1-3): a 256 MiB test guest on a three-copy volume, idle (tessera.mode=idle, a
# count every 10 ms) and busy (tessera.mode=count tessera.tick_ms=1: a busy loop, a count
# every 1 ms), moved node1 <-> node2 through the API
# REPEAT times each (default 5): the downtime as the guest sees it (the longest gap
# between consecutive counts, less its usual interval; goal <= 50 ms), the VMM's own pause
# figure, and the total time; against the loopback link's TCP rate measured in the same
# run (bench/sockbw.py).
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
# The VMMs outlive tesserad by design: every process left naming $W is reaped.
DC_REAP=.
dc_workdir migrate
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store tessera-vmm
dc_guest "target/$PROFILE" "busy mode, a count every" "ticking busy mode"
dc_start
dc_machine
python3 bench/migrate.py "$W" "$PW" "$W/guest.elf"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
