#!/usr/bin/env bash
# REST API throughput and latency on the local three-node cluster (tessera-devcluster, on
# 127.0.0.1-3) with 1,000 VMs defined, measured with wrk:
#   - GET /api/v1/vms (the whole list, ~330 KB of JSON) on the leader and on a follower;
#   - POST /api/v1/vms (a create: a Raft commit on a quorum) on the leader and a follower.
# References measured in the same run:
#   - nginx serving the very same JSON bytes as a static file over HTTPS (the HTTP + TLS
#     floor);
#   - the disk's fdatasync latency for 4 KiB writes in the cluster's data directory
#     (fio), since every create waits for the log to be synced.
# Also reports tesserad's RSS before and after. Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup
for pair in wrk:wrk nginx:nginx-light; do
    command -v "${pair%%:*}" >/dev/null || { apt-get install -y -qq "${pair##*:}" >/dev/null; }
done
cargo build --release -q --bins
DUR=${DUR:-10}
CONC=${CONC:-16}
W=$(mktemp -d /var/tmp/tessera-api-bench.XXXX)
chmod 755 "$W" # nginx's workers read the reference file as www-data
cleanup() {
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    [ -n "${NGX:-}" ] && kill "$NGX" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$W"; echo "$W"
}
trap cleanup EXIT

target/release/tessera-devcluster --dir "$W/cluster" >"$W/dc.out" 2>&1 &
DC=$!
for _ in $(seq 300); do grep -q "is up" "$W/dc.out" && break; sleep 0.2; done
grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
PW=$(cat "$W"/cluster/node*/data/initial-admin-password)
CA=$W/cluster/node1/data/tls/ca.crt
curl() { command curl --cacert "$CA" "$@"; }
login() {
    curl -s -X POST "https://$1:8006/api/v1/login" -H 'content-type: application/json' \
        -d "{\"username\":\"admin\",\"password\":\"$2\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
T=$(login 127.0.0.1 "$PW")
curl -sf -X POST https://127.0.0.1:8006/api/v1/password -H "authorization: Bearer $T" \
    -H 'content-type: application/json' -d "{\"old_password\":\"$PW\",\"new_password\":\"benchmark password\"}" >/dev/null
T=$(curl -sf -X POST https://127.0.0.1:8006/api/v1/tokens -H "authorization: Bearer $T" \
    -H 'content-type: application/json' -d '{"role":"administrator","expires_in_s":3600}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
LEADER_ID=$(curl -sf https://127.0.0.1:8006/api/v1/cluster -H "authorization: Bearer $T" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
# Management address of the leader and of one follower.
read -r LEADER FOLLOWER < <(curl -sf https://127.0.0.1:8006/api/v1/cluster -H "authorization: Bearer $T" | python3 -c '
import json, sys
c = json.load(sys.stdin)
lead = [m["address"].split(":")[0] for m in c["members"] if m["raft_id"] == c["leader"]][0]
other = [m["address"].split(":")[0] for m in c["members"] if m["raft_id"] != c["leader"]][0]
print(lead, other)')
rss() { for p in $(pgrep -f "tesserad --seed $W"); do awk '/VmRSS/ {print $2}' /proc/$p/status; done | sort -n | tail -1; }
RSS0=$(rss)

# 1,000 VMs, created one after another through the API (also a create rate at QD1).
t0=$(date +%s%N)
python3 - "$LEADER" "$T" "$CA" <<'EOF'
import http.client, json, ssl, sys
host, token, ca = sys.argv[1], sys.argv[2], sys.argv[3]
c = http.client.HTTPSConnection(host, 8006, context=ssl.create_default_context(cafile=ca))
for i in range(1000):
    body = json.dumps({"name": f"vm-{i:04}", "vcpus": 2, "memory_mib": 2048})
    c.request("POST", "/api/v1/vms", body, {"authorization": f"Bearer {token}", "content-type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
EOF
t1=$(date +%s%N)
QD1_MS=$(python3 -c "print(round(($t1-$t0)/1e6/1000, 2))")

curl -sf "https://$LEADER:8006/api/v1/vms" -H "authorization: Bearer $T" -o "$W/vms.json"
BYTES=$(stat -c %s "$W/vms.json")
mkdir -p "$W/www/api/v1"
cp "$W/vms.json" "$W/www/api/v1/vms"
# The reference speaks HTTPS too (TLS 1.3, an ECDSA P-256 certificate, as tesserad).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench \
    -keyout "$W/ngx.key" -out "$W/ngx.crt" 2>/dev/null
cat >"$W/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; default_type application/json;
  server { listen 127.0.0.9:8443 ssl; ssl_certificate $W/ngx.crt; ssl_certificate_key $W/ngx.key;
    ssl_protocols TLSv1.3; root $W/www; } }
EOF
nginx -c "$W/nginx.conf" &
NGX=$!
sleep 0.5

# wrk: "rps p50 p99" (latencies in ms).
measure() {
    wrk -t2 -c"$CONC" -d"${DUR}s" --latency "$@" 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v, u): return float(v) * {"us": 0.001, "ms": 1, "s": 1000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p = dict((k, ms(v, u)) for k, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)", t))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print("%.0f %.2f %.2f %s" % (rps, p["50"], p["99"], bad.group(1) if bad else 0))'
}
AUTH="authorization: Bearer $T"
read -r N_RPS N_P50 N_P99 N_BAD < <(measure https://127.0.0.9:8443/api/v1/vms)
read -r L_RPS L_P50 L_P99 L_BAD < <(measure -H "$AUTH" "https://$LEADER:8006/api/v1/vms")
read -r F_RPS F_P50 F_P99 F_BAD < <(measure -H "$AUTH" "https://$FOLLOWER:8006/api/v1/vms")

RSS1=$(rss)
cat >"$W/create.lua" <<'EOF'
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) prefix = args[1] .. "-" .. tid .. "-" end
request = function()
    n = n + 1
    local body = '{"name":"' .. prefix .. n .. '","vcpus":1,"memory_mib":512}'
    return wrk.format("POST", "/api/v1/vms", { ["content-type"] = "application/json", ["authorization"] = auth }, body)
end
EOF
sed -i "1i auth = \"Bearer $T\"" "$W/create.lua"
read -r CL_RPS CL_P50 CL_P99 CL_BAD < <(measure -s "$W/create.lua" "https://$LEADER:8006" -- leader)
read -r CF_RPS CF_P50 CF_P99 CF_BAD < <(measure -s "$W/create.lua" "https://$FOLLOWER:8006" -- follower)
VMS=$(curl -sf "https://$LEADER:8006/api/v1/vms" -H "$AUTH" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
RSS2=$(rss)

FSYNC=$(fio --name=fsync --directory="$W" --rw=write --bs=4k --size=8m --fdatasync=1 \
    --output-format=json 2>/dev/null | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]["sync"]["lat_ns"]
print("%.2f %.2f" % (j["percentile"]["50.000000"] / 1e6, j["percentile"]["99.000000"] / 1e6))')
read -r FS_P50 FS_P99 <<<"$FSYNC"

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
echo "API benchmark $(date -u +%F) on $(hostname), $(nproc) CPUs; wrk -t2 -c$CONC -d${DUR}s"
echo "GET /api/v1/vms with 1000 VMs ($BYTES bytes of JSON):"
echo "  nginx static file over HTTPS (reference): $N_RPS req/s  p50 $N_P50 ms  p99 $N_P99 ms  (non-2xx $N_BAD)"
echo "  tesserad leader:   $L_RPS req/s  p50 $L_P50 ms  p99 $L_P99 ms  ($(ratio "$L_RPS" "$N_RPS")x nginx; non-2xx $L_BAD)"
echo "  tesserad follower: $F_RPS req/s  p50 $F_P50 ms  p99 $F_P99 ms  ($(ratio "$F_RPS" "$N_RPS")x nginx; non-2xx $F_BAD)"
echo "POST /api/v1/vms (create, Raft commit):"
echo "  disk fdatasync 4 KiB (reference): p50 $FS_P50 ms  p99 $FS_P99 ms"
echo "  one client, one at a time: $QD1_MS ms per create"
echo "  tesserad leader:   $CL_RPS creates/s  p50 $CL_P50 ms  p99 $CL_P99 ms  (non-2xx $CL_BAD)"
echo "  tesserad follower: $CF_RPS creates/s  p50 $CF_P50 ms  p99 $CF_P99 ms  (non-2xx $CF_BAD)"
echo "VMs defined at the end: $VMS"
echo "tesserad RSS (largest of 3): ${RSS0} KiB idle at start, ${RSS1} KiB with 1000 VMs after the GET runs, ${RSS2} KiB with $VMS VMs at the end"
