#!/usr/bin/env bash
# Tessera's NBD server vs nbdkit (file plugin) and qemu-nbd, same machine, same run, same
# backing (tmpfs and a file on the real disk), driven by fio's nbd engine over TCP and a
# Unix socket. Prints a Markdown table with IOPS, bandwidth, p50/p99 latency and ratios.
#
# Usage (as root, from the repository root): bench/nbd.sh [seconds-per-run]
# A subset for a quick look: BACKINGS="disk" SERVERS="tessera nbdkit" TRANSPORTS="tcp"
# WORKLOADS="1m-seqwrite-qd8 1m-seqread-qd8" bench/nbd.sh 5 (default: everything).
# Before/after in one run: BASE_BIN=/path/to/an/older/tessera-store and the server
# "tessera-base" in SERVERS (its column and ratio are printed beside Tessera's).
# Writes into fresh space instead of overwrites: FILL=0 (no fill first) with a SIZE larger
# than a run writes (e.g. SIZE=16G on the disk backing).
# Steady state: STEADY=1 measures overwrites of *durable* data. Before each workload every
# server's files are synced (`sync`, so no server pays for another's or its own fill's
# writeback), and a Tessera store is restarted: its shutdown checkpoint puts every pending
# block (the fill's placed writes among them) into the layer tables, so the table names
# the fill as durable data, as on a store that has been running a while. Sequential
# workloads then make one pass over the target (no wrapping onto blocks the same run
# just wrote, which are pending again) capped at the run time; use a SIZE that takes
# longer than a second or two to write (SIZE=2G).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-8}
SIZE=${SIZE:-1G}
FILL=${FILL:-1}
STEADY=${STEADY:-0}
tests/setup
command -v python3 >/dev/null
# PROFILE=fast reuses an engineer's incremental build (release code generation, more
# codegen units); results in BENCHMARKS.md say which profile they used.
PROFILE=${PROFILE:-release}
# TESSERA_BIN=path serves with an already built tessera-store instead (no build).
if [ -z "${TESSERA_BIN:-}" ]; then
    cargo build --profile "$PROFILE" -q -p tessera-store
fi
BIN=${TESSERA_BIN:-$PWD/target/$PROFILE/tessera-store}
OUT=bench/results
mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/tessera-bench.XXXXXX)
TMPFS=$WORK/tmpfs
mkdir -p "$TMPFS" "$WORK/disk"
mount -t tmpfs -o size=6g tessera-bench "$TMPFS"
PIDS=()
STORE_PID=
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    umount -l "$TMPFS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

RESULTS=$WORK/results.jsonl
: > "$RESULTS"

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "no port $1" >&2; return 1; }

start_store() { # bin dir port sock
    rm -f "$4" "$2/tessera-admin.sock"
    "$1" serve --data-dir "$2/tessera" --nbd-tcp-plain 127.0.0.1:$3 --nbd-unix "$4" \
        --admin-socket "$2/tessera-admin.sock" 2>>"$2/tessera.log" &
    STORE_PID=$!
    PIDS+=($!)
    wait_sock "$2/tessera-admin.sock"
}

# STEADY=1, before a workload: the store's pending blocks into its tables (a restart: the
# shutdown checkpoint), and every server's dirty pages on disk.
settle() { # server dir port
    local server=$1 dir=$2 port=$3
    if [ "$STEADY" = 1 ] && [[ $server == tessera* ]]; then
        local bin=$BIN
        [ "$server" = tessera-base ] && bin=$BASE_BIN
        kill -TERM "$STORE_PID"
        # SIGTERM: the store stops listening and runs its final checkpoint before it exits.
        wait "$STORE_PID" || { echo "store exited with an error on SIGTERM" >&2; tail "$dir/tessera.log" >&2; exit 1; }
        grep -q "final checkpoint failed" "$dir/tessera.log" && { echo "final checkpoint failed" >&2; exit 1; }
        start_store "$bin" "$dir" "$port" "$dir/$server.sock"
        wait_port "$port"
    fi
    [ "$STEADY" = 1 ] && sync
    return 0
}

# server backing transport -> sets URI, starts the server in the background
start_server() {
    local server=$1 dir=$2 port=$3 sock=$dir/$server.sock
    case $server in
    tessera | tessera-base)
        local bin=$BIN
        [ "$server" = tessera-base ] && bin=${BASE_BIN:?tessera-base needs BASE_BIN}
        start_store "$bin" "$dir" "$port" "$sock"
        "$bin" --admin-socket "$dir/tessera-admin.sock" volume create bench --size $SIZE >/dev/null
        ;;
    nbdkit)
        truncate -s $SIZE "$dir/nbdkit.img"
        nbdkit -f -p $port -i 127.0.0.1 file "$dir/nbdkit.img" &
        PIDS+=($!)
        nbdkit -f -U "$sock" file "$dir/nbdkit.img" &
        PIDS+=($!)
        ;;
    qemu-nbd)
        truncate -s $SIZE "$dir/qemu.img"
        qemu-nbd -f raw -t -e 8 -x bench -b 127.0.0.1 -p $port --cache=writeback --aio=threads "$dir/qemu.img" &
        PIDS+=($!)
        qemu-nbd -f raw -t -e 8 -x bench -k "$sock" --cache=writeback --aio=threads "$dir/qemu.img" &
        PIDS+=($!)
        ;;
    esac
    wait_port $port
    wait_sock "$sock"
}

uri() {
    local server=$1 dir=$2 port=$3 transport=$4 name=bench
    [ "$server" = nbdkit ] && name=""
    if [ "$transport" = tcp ]; then echo "nbd://127.0.0.1:$port/$name"; else echo "nbd+unix:///$name?socket=$dir/$server.sock"; fi
}

run_fio() { # label uri rw bs qd
    local label=$1 uri=$2 rw=$3 bs=$4 qd=$5 timing="--ramp_time=1 --time_based"
    # Steady state: one pass over the durable target, at most RUNTIME seconds.
    [ "$STEADY" = 1 ] && [[ $rw != rand* ]] && timing=""
    echo "bench: $label" >&2
    # shellcheck disable=SC2086 # $timing: zero or two options
    if ! fio --name="${label//|/-}" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size=$SIZE --runtime="$RUNTIME" $timing --output-format=json \
        --percentile_list=50:99 >"$WORK/fio.json" 2>"$WORK/fio.err"; then
        echo "fio failed for $label ($uri):" >&2
        cat "$WORK/fio.err" >&2
        exit 1
    fi
    python3 -c '
import json, sys
label = sys.argv[1]
text = open(sys.argv[2]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
pct = side["clat_ns"].get("percentile", {})
print(json.dumps({"label": label, "iops": side["iops"], "bw_mib": side["bw"] / 1024,
      "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}))
' "$label" "$WORK/fio.json" >> "$RESULTS"
}

port=20000
want() { [ -z "${WORKLOADS:-}" ] || [[ " $WORKLOADS " == *" $1 "* ]]; }
for backing in ${BACKINGS:-tmpfs disk}; do
    for server in ${SERVERS:-tessera nbdkit qemu-nbd}; do
        dir=$WORK/$backing/$server
        [ "$backing" = tmpfs ] && dir=$TMPFS/$server
        mkdir -p "$dir"
        port=$((port + 1))
        start_server "$server" "$dir" "$port"
        # Fill the target once so reads hit stored data, not holes.
        [ "$FILL" = 1 ] && fio --name=fill --ioengine=nbd --uri="$(uri $server "$dir" $port tcp)" --rw=write --bs=1M \
            --iodepth=8 --size=$SIZE --output-format=terse >/dev/null 2>&1
        for transport in ${TRANSPORTS:-tcp unix}; do
            u=$(uri $server "$dir" $port $transport)
            for w in "4k-randread-qd1 randread 4k 1" "4k-randread-qd16 randread 4k 16" \
                "4k-randwrite-qd1 randwrite 4k 1" "4k-randwrite-qd16 randwrite 4k 16" \
                "1m-seqread-qd8 read 1M 8" "1m-seqwrite-qd8 write 1M 8" "1m-seqread-qd1 read 1M 1" \
                "1m-seqwrite-qd1 write 1M 1"; do
                set -- $w
                want "$1" || continue
                settle "$server" "$dir" "$port"
                run_fio "$backing|$transport|$1|$server" "$u" "$2" "$3" "$4"
            done
        done
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        PIDS=()
        rm -rf "$dir"
    done
done

python3 bench/sockbw.py 3 > "$WORK/sock.json"
stamp=$(date -u +%Y-%m-%dT%H:%MZ)
python3 - "$RESULTS" "$WORK/sock.json" "$stamp" <<'PY' | tee "$OUT/nbd-$stamp.md"
import json, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1])]
sock = json.load(open(sys.argv[2]))
by = {}
for r in rows:
    backing, transport, workload, server = r["label"].split("|")
    by.setdefault((backing, transport, workload), {})[server] = r
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"### NBD server benchmark, {sys.argv[3]}")
print()
print(f"Machine: {os.cpu_count()} cores ({cpu}), {platform.release()}; fio nbd engine, 1 job, "
      f"{os.environ.get('SIZE', '1G')} target, {'filled first' if os.environ.get('FILL', '1') == '1' else 'not filled (fresh space)'}"
      f"{'; steady state (synced, store restarted so its tables hold the data, sequential runs one pass)' if os.environ.get('STEADY') == '1' else ''}.")
print(f"Loopback socket alone (1 MiB writes): TCP {sock['tcp']:.0f} MiB/s, Unix {sock['unix']:.0f} MiB/s.")
print()
print("| backing | transport | workload | Tessera IOPS | MiB/s | p50 µs | p99 µs | base IOPS | nbdkit IOPS | qemu-nbd IOPS | vs base | base vs nbdkit | vs nbdkit | vs qemu-nbd | vs socket |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (backing, transport, workload), s in by.items():
    t, k, q, b = s.get("tessera"), s.get("nbdkit"), s.get("qemu-nbd"), s.get("tessera-base")
    if not t:
        continue
    rk = f"{t['iops'] / k['iops']:.2f}×" if k and k["iops"] else "-"
    rq = f"{t['iops'] / q['iops']:.2f}×" if q and q["iops"] else "-"
    rb = f"{t['iops'] / b['iops']:.2f}×" if b and b["iops"] else "-"
    bk = f"{b['iops'] / k['iops']:.2f}×" if b and k and k["iops"] else "-"
    vs = f"{t['bw_mib'] / sock[transport]:.0%}" if workload.startswith("1m") else ""
    print(f"| {backing} | {transport} | {workload} | {t['iops']:.0f} | {t['bw_mib']:.0f} | {t['p50_us']:.0f} | {t['p99_us']:.0f} | "
          f"{b['iops'] if b else 0:.0f} | {k['iops'] if k else 0:.0f} | {q['iops'] if q else 0:.0f} | {rb} | {bk} | {rk} | {rq} | {vs} |")
PY
