#!/usr/bin/env bash
# The web console in headless Chromium on the local three-node cluster (tessera-devcluster,
# 127.0.0.1-3) with 1,000 VMs defined (not running), issue #13:
#   - time to interactive of the dashboard and of the VM list (from the navigation's start
#     to the page's content on screen: the cluster card, or the list's first page of 50
#     rows with the count of all 1,000), median of REPEAT full loads, from Chromium's
#     performance timing (performance.now());
#   - page weight (the document and every resource, bytes on the wire and decoded);
#   - API calls per page view (fetches of /api/v1/ until the page is interactive).
# References measured in the same run and browser: the same API calls alone, made from a
# blank page of the same origin (what the console adds over its data), and the page's
# static files alone (index.html and every script and style sheet, no API).
# Run as root from the repository root on an otherwise idle machine:
#   bench/console.sh            (REPEAT=10 VMS=1000 by default)
#   REPEAT=2 VMS=20 PROFILE=fast bench/console.sh   (a small run that checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
cargo build --profile "$PROFILE" -q --bins -p tesserad -p tessera-store -p tessera-vmm -p tessera-devcluster
T=target/$PROFILE
W=$(mktemp -d /var/tmp/tessera-console-bench.XXXX)
cleanup() {
    [ -n "${DC:-}" ] && kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    [ -n "${CD:-}" ] && kill "$CD" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
$T/tessera-devcluster --dir "$W/cluster" >"$W/dc.out" 2>&1 &
DC=$!
# The launcher's report ends with its Ctrl-C line; the password and the CA are in it.
for _ in $(seq 600); do grep -q "Ctrl-C stops everything" "$W/dc.out" && break; sleep 0.2; done
grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
PW=$(sed -n 's/.*initial password \([^ ]*\).*/\1/p' "$W/dc.out" | head -1)
CA=$(sed -n 's/.*issued by it): //p' "$W/dc.out" | head -1)
[ -n "$PW" ] && [ -n "$CA" ] || { cat "$W/dc.out"; exit 1; }
PORT=$((20000 + RANDOM % 20000))
chromedriver --port="$PORT" >"$W/chromedriver.log" 2>&1 &
CD=$!
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "chromium: $(chromium --version 2>/dev/null || echo '?'); profile: $PROFILE; rustc processes running: $(pgrep -c rustc || true) (a shared machine when > 0)"
REPEAT=${REPEAT:-10} VMS=${VMS:-1000} python3 bench/console.py "$PORT" "$PW" "$CA"
