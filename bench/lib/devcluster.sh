# shellcheck shell=bash
# The local three-node cluster (tessera-devcluster on 127.0.0.1-3) for a benchmark: its
# work directory in /var/tmp, private copies of the binaries, the launcher started and
# waited for, and one cleanup on exit. Sourced (not run) by cp.sh, forward.sh, ha.sh,
# migrate.sh, replication.sh and vm.sh, from the repository root, after
# `set -euo pipefail`. The cluster uses fixed addresses: on a shared machine run those
# scripts under `flock /tmp/devcluster.lock`.
#
#   dc_workdir NAME        W=/var/tmp/tessera-NAME-bench.XXXX, and the EXIT trap: set
#                          before anything else is made, so a failed step leaves nothing
#   dc_binaries DIR PROG…  copies DIR/PROG… into $W/bin and sets T=$W/bin: a shared
#                          checkout's next build must not swap a binary under the run
#                          (tesserad starts the tessera-vmm beside itself)
#   dc_guest DIR MARK WHAT copies the newest test guest built under DIR to $W/guest.elf;
#                          refuses, saying it has no WHAT, when it lacks MARK (a guest
#                          built before that mode)
#   dc_start               starts the launcher from $T in $W/cluster (DC: its pid), waits
#                          (at most 120 s) for its report to say it is up; PW: the first
#                          administrator's initial password
#   dc_machine             the machine and profile lines each result starts with
#
# The cleanup, in this order: the script's own `dc_before_stop` if it defines one; the
# launcher stopped with Ctrl-C and waited for (its nodes first: a running tesserad would
# restart a VMM killed before it); with DC_REAP set (a grep pattern), every process whose
# command line matches it and names $W/, killed by pid (VMMs outlive tesserad by design;
# a node the benchmark started again itself is not the launcher's); the script's own
# `dc_after_stop`; $W removed unless KEEP=1.

dc_cleanup() {
    if declare -F dc_before_stop >/dev/null; then dc_before_stop || true; fi
    if [ -n "${DC:-}" ]; then
        kill -INT "$DC" 2>/dev/null && wait "$DC" 2>/dev/null || true
    fi
    if [ -n "${DC_REAP:-}" ]; then
        local c p line
        for c in /proc/[0-9]*/cmdline; do
            line=$({ tr '\0' ' ' <"$c"; } 2>/dev/null) || continue
            if [[ $line == *"$W/"* ]] && grep -q -- "$DC_REAP" <<<"$line"; then
                p=${c#/proc/}
                kill -9 "${p%/cmdline}" 2>/dev/null || true
            fi
        done
    fi
    if declare -F dc_after_stop >/dev/null; then dc_after_stop || true; fi
    if [ -z "${KEEP:-}" ]; then rm -rf "$W"; fi
}

dc_workdir() {
    W=$(mktemp -d "/var/tmp/tessera-$1-bench.XXXX")
    trap dc_cleanup EXIT
}

dc_binaries() {
    local from=$1 prog
    shift
    mkdir "$W/bin"
    for prog in "$@"; do cp "$from/$prog" "$W/bin/"; done
    T=$W/bin
}

dc_guest() {
    local built
    built=$(ls -t "$1"/build/tessera-tests-*/out/tessera-test-guest.elf 2>/dev/null | head -1) || true
    [ -n "$built" ] || { echo "no test guest under $1: build tessera-tests"; exit 1; }
    cp "$built" "$W/guest.elf"
    grep -q -- "$2" "$W/guest.elf" || { echo "the test guest has no $3: build tessera-tests again"; exit 1; }
}

dc_start() {
    "$T/tessera-devcluster" --dir "$W/cluster" >"$W/dc.out" 2>&1 &
    DC=$!
    for _ in $(seq 600); do grep -q "is up" "$W/dc.out" && break; sleep 0.2; done
    grep -q "is up" "$W/dc.out" || { cat "$W/dc.out"; exit 1; }
    PW=$(cat "$W"/cluster/node*/data/initial-admin-password)
}

dc_machine() {
    echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "profile: ${PROFILE:-release}; rustc processes running at the start: $(pgrep -c rustc || true)"
}
