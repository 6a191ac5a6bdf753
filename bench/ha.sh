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
T=target/$PROFILE
W=$(mktemp -d /var/tmp/tessera-ha-bench.XXXX)
# Private copies: a shared checkout's next build must not swap them mid-run.
mkdir "$W/bin"
cp $T/tessera-devcluster $T/tesserad $T/tessera-store $T/tessera-vmm "$W/bin/"
cp "$(ls -t $T/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)" "$W/guest.elf"
grep -q "tessera.tick_ms=" "$W/guest.elf" || { echo "the test guest has no idle mode: build tessera-tests again"; exit 1; }
T=$W/bin
cleanup() {
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    # What the launcher did not start (a killed node started again by ha.py) and the
    # VMMs (they outlive tesserad by design): every process whose command line names $W.
    for c in /proc/[0-9]*/cmdline; do
        if { tr '\0' ' ' <"$c"; } 2>/dev/null | grep -q "$W/"; then
            p=${c#/proc/}; kill -9 "${p%/cmdline}" 2>/dev/null || true
        fi
    done
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
$T/tessera-devcluster --dir "$W/cluster" >"$W/dc.out" 2>&1 &
DC=$!
for _ in $(seq 600); do grep -q "is up" "$W/dc.out" && break; sleep 0.2; done
grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
PW=$(cat "$W"/cluster/node*/data/initial-admin-password)
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "profile: $PROFILE; rustc processes running at the start: $(pgrep -c rustc || true)"
python3 bench/ha.py "$W" "$PW" "$W/guest.elf" $T/tessera-vmm
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
