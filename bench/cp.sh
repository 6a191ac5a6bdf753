#!/usr/bin/env bash
# Importing a raw file into a volume (issue #8) on the local three-node cluster
# (tessera-devcluster on 127.0.0.1-3): `tessera volume cp FILE quic://…` (the QUIC
# export, TLS 1.3) vs `nbdcopy` (NBD on the primary store's Unix socket, and over TCP
# with TLS) and `qemu-img convert -n` (Unix socket) of the same SIZE_MIB (default 1024)
# MiB file of random bytes (nothing to skip as zeros) into a 3-copy volume, REPEAT
# rounds (default 3), alternating, in one run: median MiB/s and the ratios to nbdcopy
# on the Unix socket. Then the same copy with --resume once the volume holds it
# (digests compared, nothing sent).
# The dev cluster uses fixed addresses: on a shared machine run it under
# flock /tmp/bench.lock flock /tmp/devcluster.lock. Run as root from the repository root.
# PROFILE (default release) picks the cargo profile; NO_BUILD=1 uses target/$PROFILE as
# it is; NO_SETUP=1 skips tests/setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
[ -n "${NO_BUILD:-}" ] || cargo build --profile "$PROFILE" -q --bins -p tesserad -p tessera-store -p tessera-devcluster -p tessera-cli
. bench/lib/devcluster.sh
dc_workdir cp
dc_binaries "target/$PROFILE" tessera-devcluster tesserad tessera-store tessera
dc_start
dc_machine
python3 bench/cp.py "$W" "$PW" "$T/tessera"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
