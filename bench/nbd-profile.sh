#!/usr/bin/env bash
# Where the store's time goes during a 1M sequential NBD workload: a 1 GiB volume on the
# disk is filled, the store restarted (its shutdown checkpoint makes the fill durable table
# data), fio runs 14 s (TCP, sequential 1M at QD8 by default) and `perf record` samples
# the store for 10 s of it.
# Prints the top symbols and the split by thread; perf.data is kept for `perf report`.
#
# Usage (as root, from the repository root):
#   bench/nbd-profile.sh [read|write|randread|randwrite] [store-binary]
# (default: read, target/fast/tessera-store); BS=4k QD=1 for another request size and queue
# depth (default 1M, 8). Results and what they meant: BENCHMARKS.md,
# "Issue #9, session 15".
set -euo pipefail
cd "$(dirname "$0")/.."
RW=${1:-read}
BIN=${2:-$PWD/target/fast/tessera-store}
BS=${BS:-1M}
QD=${QD:-8}
case $RW in read | write | randread | randwrite) ;; *) echo "usage: $0 [read|write|randread|randwrite] [store-binary]" >&2; exit 2 ;; esac
[ -n "${NO_SETUP:-}" ] || tests/setup
# perf is only for profiling, so tests/setup does not install it.
command -v perf >/dev/null || { apt-get install -y -qq --no-install-recommends linux-perf >/dev/null 2>&1 || true; }
for t in fio perf; do command -v $t >/dev/null || { echo "needs $t (apt-get install linux-perf fio)" >&2; exit 1; }; done
[ -x "$BIN" ] || { echo "no store binary $BIN (cargo build --profile fast -p tessera-store)" >&2; exit 1; }
OUT=bench/results
mkdir -p "$OUT"
# shellcheck source=bench/lib/store.sh
. bench/lib/store.sh
st_workdir profile
PORT=20991
URI=nbd://127.0.0.1:$PORT/bench
st_filled "$BIN" "$W" $PORT --nbd-unix "$W/nbd.sock"
sync
fio --name=run --ioengine=nbd --uri=$URI --rw="$RW" --bs="$BS" --iodepth="$QD" --size=1G --runtime=14 \
    --time_based --output-format=json >"$W/fio.json" 2>/dev/null &
FP=$!
sleep 2
DATA=$OUT/nbd-profile-$RW-$(date -u +%Y-%m-%dT%H:%M:%SZ).data
perf record -q -F 999 -g -p "$SP" -o "$DATA" -- sleep 10 >/dev/null 2>&1
wait "$FP"
python3 -c '
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
s = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
bw, iops = s["bw"] / 1024, s["iops"]
print(f"fio {sys.argv[2]}: {bw:.0f} MiB/s, {iops:.0f} IOPS")
' "$W/fio.json" "$BS $RW QD$QD"
echo "load: $(cut -d" " -f1-3 /proc/loadavg); perf data: $DATA"
perf report -i "$DATA" --no-children --sort comm --stdio -g none 2>/dev/null | grep '%' | head -5
perf report -i "$DATA" --no-children --sort sym --stdio -g none 2>/dev/null | grep '%' | head -20
