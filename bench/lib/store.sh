# shellcheck shell=bash
# One tessera-store on this machine for a single-node benchmark: its work directory, the
# store started and waited for, a volume filled the way every such benchmark fills it,
# and one cleanup on exit. Sourced (not run) by nbd-cpu.sh, nbd-flush.sh and
# nbd-profile.sh, from the repository root, after `set -euo pipefail`.
#
#   st_workdir NAME             W=/var/tmp/tessera-NAME.XXXXXX, and the EXIT trap (stops
#                               the server in SP, if any, and removes $W)
#   st_start BIN DIR PORT [ARG…]
#                               `BIN serve` on DIR/store, NBD over plain TCP on
#                               127.0.0.1:PORT, admin socket DIR/admin.sock, its log in
#                               DIR/store.log, ARGs added; SP: its pid; waits until it
#                               answers on its admin socket (at most 10 s)
#   st_filled BIN DIR PORT [ARG…]
#                               st_start, a 1 GiB volume `bench` filled with 1M writes
#                               at QD8 (fio), the store stopped with SIGTERM (its final
#                               checkpoint puts the fill into the tables: a store that has
#                               been running a while) and started again
#   st_stop                     stops the server in SP (SIGTERM) and waits for it

st_workdir() {
    W=$(mktemp -d "/var/tmp/tessera-$1.XXXXXX")
    SP=
    trap st_cleanup EXIT
}

st_cleanup() {
    [ -n "${SP:-}" ] && kill "$SP" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$W"
}

st_start() {
    local bin=$1 dir=$2 port=$3
    shift 3
    rm -f "$dir/admin.sock"
    "$bin" serve --data-dir "$dir/store" --nbd-tcp-plain "127.0.0.1:$port" \
        --admin-socket "$dir/admin.sock" "$@" 2>>"$dir/store.log" &
    SP=$!
    for _ in $(seq 200); do [ -S "$dir/admin.sock" ] && return 0; sleep 0.05; done
    echo "store did not start:" >&2
    cat "$dir/store.log" >&2
    exit 1
}

st_stop() {
    kill -TERM "$SP"
    wait "$SP" 2>/dev/null || true
    SP=
}

st_filled() {
    local bin=$1 dir=$2 port=$3
    st_start "$@"
    "$bin" --admin-socket "$dir/admin.sock" volume create bench --size 1G >/dev/null
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --rw=write --bs=1M \
        --iodepth=8 --size=1G --output-format=terse >/dev/null 2>&1
    st_stop
    st_start "$@"
}
