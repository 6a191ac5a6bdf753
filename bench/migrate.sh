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
T=target/$PROFILE
W=$(mktemp -d /var/tmp/tessera-migrate-bench.XXXX)
# Private copies: a shared checkout's next build must not swap them mid-run.
mkdir "$W/bin"
cp $T/tessera-devcluster $T/tesserad $T/tessera-store $T/tessera-vmm "$W/bin/"
cp "$(ls -t $T/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)" "$W/guest.elf"
grep -q "busy mode, a count every" "$W/guest.elf" || { echo "the test guest has no ticking busy mode: build tessera-tests again"; exit 1; }
T=$W/bin
cleanup() {
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    # The VMMs outlive tesserad by design: every process whose command line names $W.
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
python3 bench/migrate.py "$W" "$PW" "$W/guest.elf"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
