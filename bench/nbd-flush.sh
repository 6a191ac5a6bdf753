#!/usr/bin/env bash
# Clients that flush after every write (a database's commits in its VMs): 4K random
# writes, each followed by an NBD FLUSH, from 1, 4 and 8 clients at once (fio's nbd
# engine, one connection per job, QD1, `--fsync=1`), against `nbdkit file` on the same
# disk in the same run. Tessera: a 1 GiB volume filled with 1M writes, the store
# restarted (so its tables hold the data); nbdkit: a 1 GiB file of random data.
#
# Usage (as root, from the repository root):
#   bench/nbd-flush.sh [tessera-store binary ...]   (default target/fast/tessera-store)
# SECS per point (default 6), JOBS (default "1 4 8"), NO_SETUP=1 skips tests/setup.
# Results and what they meant: BENCHMARKS.md, "Issue #9, session 23: flushes".
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-6}
JOBS=${JOBS:-1 4 8}
[ -n "${NO_SETUP:-}" ] || tests/setup
for t in fio nbdkit python3; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
[ $# -ge 1 ] || set -- "$PWD/target/fast/tessera-store"
# shellcheck source=bench/lib/store.sh
. bench/lib/store.sh
st_workdir nbd-flush
PORT=20790

run() { # label uri jobs
    fio --name=run --ioengine=nbd --uri="$2" --rw=randwrite --bs=4k --iodepth=1 --fsync=1 \
        --numjobs="$3" --group_reporting --size=1G --runtime="$SECS" --time_based \
        --output-format=json >"$W/fio.json" 2>"$W/fio.err" ||
        { echo "fio failed for $1:" >&2; cat "$W/fio.err" >&2; exit 1; }
    python3 - "$1" "$3" "$W/fio.json" <<'PY'
import json, sys
label, jobs, path = sys.argv[1:]
t = open(path).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
w, s = j["write"], j["sync"]["lat_ns"]["percentile"]
print(f"| {label} | {jobs} | {w['iops']:.0f} | {s['50.000000'] / 1000:.0f} | {s['99.000000'] / 1000:.0f} |")
PY
}

echo "### Flushing clients, $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); ${SECS} s per point."
echo
echo "| server | clients | write+flush per s | flush p50 µs | flush p99 µs |"
echo "|---|---:|---:|---:|---:|"
dd if=/dev/urandom of="$W/nbdkit.img" bs=1M count=1024 status=none
sync
nbdkit -f -p $PORT -i 127.0.0.1 file "$W/nbdkit.img" &
SP=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.05; done
for j in $JOBS; do run nbdkit "nbd://127.0.0.1:$PORT/" "$j"; done
kill "$SP"; wait "$SP" 2>/dev/null || true; SP=
rm -f "$W/nbdkit.img"
for bin in "$@"; do
    [ -x "$bin" ] || { echo "no store binary $bin" >&2; exit 1; }
    dir=$W/store-$((++PORT))
    mkdir -p "$dir"
    st_filled "$bin" "$dir" $PORT
    sync
    for j in $JOBS; do run "$bin" "nbd://127.0.0.1:$PORT/bench" "$j"; done
    st_stop
    rm -rf "$dir"
done
