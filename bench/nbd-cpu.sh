#!/usr/bin/env bash
# Server CPU time and context switches per request next to IOPS (reads by default):
# figures a busy machine disturbs less than throughput alone (another process's CPU use
# slows a server down but does not add to its CPU time per request).
#
# Each server in turn: a 1 GiB target on the disk (a Tessera volume filled with 1M writes
# at QD8, then the store restarted so its tables hold the data; nbdkit `file` on a 1 GiB
# file of random data), then per workload fio's nbd engine over TCP for SECS seconds
# (`--time_based`, wrapping over the 1 GiB), `perf stat -e context-switches -p` on the
# server meanwhile, and the server's utime+stime (/proc/PID/stat, exited threads
# included) before and after, and fio's own CPU per request (its usr_cpu + sys_cpu).
#
# Usage (as root, from the repository root):
#   bench/nbd-cpu.sh SERVER...   SERVER: a tessera-store binary, or `nbdkit`
# e.g. bench/nbd-cpu.sh /tmp/new/tessera-store /tmp/head/tessera-store nbdkit
# Rotate the order between runs. SECS (default 5); NO_SETUP=1 skips tests/setup.
# WORKLOADS: which to run, of 4k-randread-qd1 1m-seqread-qd8 1m-seqread-qd1 (the default)
# 1m-seqwrite-qd8 1m-seqwrite-qd1 4k-randwrite-qd1 4k-randwrite-qd16. Writes overwrite the
# target: the first write workload meets durable table data (as after bench/nbd.sh's
# STEADY=1 settling), later ones also blocks an earlier workload left pending.
# Results and what they meant: BENCHMARKS.md, "Issue #9, session 16: reads".
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 SERVER... (tessera-store binaries or nbdkit)" >&2; exit 2; }
SECS=${SECS:-5}
[ -n "${NO_SETUP:-}" ] || tests/setup
command -v perf >/dev/null || { apt-get install -y -qq --no-install-recommends linux-perf >/dev/null 2>&1 || true; }
for t in fio perf nbdkit python3; do command -v $t >/dev/null || { echo "needs $t" >&2; exit 1; }; done
# shellcheck source=bench/lib/store.sh
. bench/lib/store.sh
st_workdir nbd-cpu
TCK=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

measure() { # label uri rw bs qd
    local c0 c1 pp
    c0=$(cpu_ticks "$SP")
    perf stat -x, -e context-switches -p "$SP" -o "$W/perf.txt" -- sleep $((SECS + 1)) &
    pp=$!
    fio --name=x --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth="$5" --size=1G \
        --runtime="$SECS" --time_based --output-format=json >"$W/fio.json" 2>"$W/fio.err" ||
        { echo "fio failed for $1:" >&2; cat "$W/fio.err" >&2; exit 1; }
    c1=$(cpu_ticks "$SP")
    wait "$pp"
    python3 - "$1" "$W/fio.json" "$c0" "$c1" "$TCK" "$W/perf.txt" <<'PY'
import json, sys
label, path, c0, c1, tck, perf = sys.argv[1:]
t = open(path).read()
job = json.loads(t[t.index("{"):])["jobs"][0]
j = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
n = j["total_ios"]
cpu = (int(c1) - int(c0)) / int(tck)
# fio's own CPU (usr_cpu and sys_cpu are per cent of the job's run time).
fio_cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] / 1000
cs = next(int(l.split(",")[0]) for l in open(perf) if "context-switches" in l)
print(f"| {label} | {j['iops']:.0f} | {cpu * 1e6 / n:.1f} | {cpu / (j['runtime'] / 1000):.2f} | {cs / n:.2f} | {fio_cpu * 1e6 / n:.1f} |")
PY
}

echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| server, workload | IOPS | server CPU µs per request | cores | context switches per request | fio's CPU µs per request |"
echo "|---|---:|---:|---:|---:|---:|"
port=20700
for server in "$@"; do
    port=$((port + 1))
    dir=$W/$port
    mkdir -p "$dir"
    if [ "$server" = nbdkit ]; then
        dd if=/dev/urandom of="$dir/nbdkit.img" bs=1M count=1024 status=none
        nbdkit -f -p $port -i 127.0.0.1 file "$dir/nbdkit.img" &
        SP=$!
        for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
        uri=nbd://127.0.0.1:$port/
        label=nbdkit
    else
        [ -x "$server" ] || { echo "no store binary $server" >&2; exit 1; }
        st_filled "$server" "$dir" $port --nbd-unix "$dir/nbd.sock"
        uri=nbd://127.0.0.1:$port/bench
        label=$server
    fi
    sync
    for w in ${WORKLOADS:-4k-randread-qd1 1m-seqread-qd8 1m-seqread-qd1}; do
        case $w in
        4k-randread-qd1) measure "$label, $w" "$uri" randread 4k 1 ;;
        1m-seqread-qd8) measure "$label, $w" "$uri" read 1M 8 ;;
        1m-seqread-qd1) measure "$label, $w" "$uri" read 1M 1 ;;
        1m-seqwrite-qd8) measure "$label, $w" "$uri" write 1M 8 ;;
        1m-seqwrite-qd1) measure "$label, $w" "$uri" write 1M 1 ;;
        4k-randwrite-qd1) measure "$label, $w" "$uri" randwrite 4k 1 ;;
        4k-randwrite-qd16) measure "$label, $w" "$uri" randwrite 4k 16 ;;
        *) echo "unknown workload $w" >&2; exit 2 ;;
        esac
    done
    kill "$SP"
    wait "$SP" 2>/dev/null || true
    SP=
    rm -rf "$dir"
done
echo
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
