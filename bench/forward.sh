#!/usr/bin/env bash
# Forwarding through a node that holds no copy (issue #8) on the local three-node
# cluster (tessera-devcluster on 127.0.0.1-3): nbdcopy writes and reads of a one-copy
# volume on node1, through node1's store (the reference, same run) and through node2's
# (forwarded over the QUIC export), REPEAT rounds (default 3) of SIZE_MIB (default 256).
# The dev cluster uses fixed addresses: on a shared machine run it under
# flock /tmp/devcluster.lock. Run as root from the repository root.
# PROFILE (default release) picks the cargo profile; NO_BUILD=1 uses target/$PROFILE as
# it is; NO_SETUP=1 skips tests/setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$PROFILE" -q --bins
. bench/lib/devcluster.sh
dc_workdir forward
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store
dc_start
dc_machine
python3 bench/forward.py "$W" "$PW"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
