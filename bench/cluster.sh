#!/usr/bin/env bash
# Cluster formation time: three tesserad nodes in network namespaces on a bridge; time
# from the third node's start until all three report the same Raft leader and three
# voters, median over 10 runs. Reference measured in the same run: the ICMP round trip
# across the same bridge. Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup
cargo build --release -q -p tesserad
BIN=$PWD/target/release/tesserad
RUNS=${1:-10}
ID=tb$$
SW=$ID-sw
cleanup() {
    pkill -f "$ID-work" 2>/dev/null || true
    for i in 0 1 2; do ip netns del $ID-n$i 2>/dev/null || true; done
    ip netns del $SW 2>/dev/null || true
    rm -rf /var/tmp/$ID-work
}
trap cleanup EXIT
ip netns add $SW
ip -n $SW link add br0 type bridge mcast_snooping 0
ip -n $SW link set br0 up
for i in 0 1 2; do
    ip netns add $ID-n$i
    ip -n $ID-n$i link set lo up
    ip link add eth0 netns $ID-n$i type veth peer name p$i netns $SW
    ip -n $ID-n$i addr add 10.77.0.$((i + 1))/24 dev eth0
    ip -n $ID-n$i link set eth0 up
    ip -n $SW link set p$i master br0
    ip -n $SW link set p$i up
done
rtt=$(ip netns exec $ID-n0 ping -c 5 -i 0.2 -q 10.77.0.2 | awk -F/ '/rtt/ {print $5}')
# Prints "<leader>:<voters>" for a node, or "none".
status() { python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(1)
try:
    s.connect(sys.argv[1]); s.sendall(b"{\"op\":\"status\"}\n")
    st = json.loads(s.makefile().readline())["ok"]
    print("%s:%d" % (st.get("leader"), len(st.get("voters") or [])))
except Exception:
    print("none")
' "$1"; }
times=()
for run in $(seq "$RUNS"); do
    W=/var/tmp/$ID-work/$run
    for i in 0 1 2; do
        mkdir -p $W/n$i
        printf 'cluster_name = "bench"\njoin_secret = "benchmark join secret"\nexpected_nodes = 3\ndata_dir = "%s"\n\n[management]\naddress = "10.77.0.%d:7946"\n' "$W/n$i/data" $((i + 1)) > $W/n$i/seed.toml
    done
    ip netns exec $ID-n0 $BIN --seed $W/n0/seed.toml 2>/dev/null &
    ip netns exec $ID-n1 $BIN --seed $W/n1/seed.toml 2>/dev/null &
    sleep 0.3
    t0=$(date +%s%N)
    ip netns exec $ID-n2 $BIN --seed $W/n2/seed.toml 2>/dev/null &
    while true; do
        l0=$(status $W/n0/data/tesserad.sock); l1=$(status $W/n1/data/tesserad.sock); l2=$(status $W/n2/data/tesserad.sock)
        if [ "${l0#*:}" = 3 ] && [ "${l0%%:*}" != None ] && [ "$l0" = "$l1" ] && [ "$l1" = "$l2" ]; then break; fi
        sleep 0.02
    done
    t1=$(date +%s%N)
    times+=("$(( (t1 - t0) / 1000000 ))")
    if [ "$run" = "$RUNS" ]; then
        # Idle footprint once formed: let it settle, then read each tesserad's RSS.
        sleep 5
        rss=()
        for i in 0 1 2; do
            pid=$(pgrep -f -- "--seed $W/n$i/seed.toml" | head -1)
            rss+=("$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status)")
        done
        sleep 5 & ref=$!
        sleep 0.2
        ref_rss=$(awk '/^VmRSS:/ {print $2}' /proc/$ref/status)
        kill $ref 2>/dev/null || true
    fi
    pkill -f "$ID-work/$run" || true
    wait 2>/dev/null || true
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
min=$(printf '%s\n' "${times[@]}" | sort -n | head -1)
max=$(printf '%s\n' "${times[@]}" | sort -n | tail -1)
echo "| cluster formation, 3 nodes in netns ($RUNS runs) | min | median | max |"
echo "|---|---:|---:|---:|"
printf '| third node start to one leader agreed by all, ms | %d | %d | %d |\n' "$min" "$median" "$max"
printf '| reference: ICMP round trip on the same bridge, ms | | %s | |\n' "$rtt"
echo
echo "| idle tesserad (formed, 3 nodes) | RSS KiB |"
echo "|---|---:|"
for i in 0 1 2; do echo "| node $i | ${rss[$i]} |"; done
echo "| reference: \`sleep\` | $ref_rss |"
