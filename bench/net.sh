#!/usr/bin/env bash
# virtio-net guest-to-bridge packet rate and throughput (issue #11): the test guest in
# tessera.mode=flood sends broadcast frames through tessera-vmm's virtio-net into a tap
# on a Linux bridge; the reference, measured alternately in the same run, is a host
# process sending the same frames into a veth pair whose other end is on a bridge. Both
# are timed on the receiving port's rx counter (first frame to last) for 60-byte and
# 1514-byte frames; the bridge's counter checks every frame crossed it. This machine's
# KVM is paravirtual (no VT-x): the guest's instructions and exits are slow, so only the
# ratio means something. See net.py.
# Run as root from the repository root. FRAMES (default 200000), REPEAT (default 3) and
# LENS (default 60,1514) size the run. PROFILE (default release) picks the cargo profile;
# NO_BUILD=1 reuses target/$PROFILE; NO_SETUP=1 skips tests/setup.
# Everything runs in a network namespace of its own (unshare): no frame leaves it.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
[ -n "${NO_SETUP:-}" ] || tests/setup
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --profile "$PROFILE" -q -p tessera-vmm -p tessera-tests
fi
T=target/$PROFILE
W=$(mktemp -d /var/tmp/tessera-net-bench.XXXX)
trap 'rm -rf "$W"' EXIT
# Private copies: a shared checkout's next build must not swap them mid-run.
cp $T/tessera-vmm "$W/"
cp "$(ls -t $T/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)" "$W/guest.elf"
grep -q "tessera.frame_len=" "$W/guest.elf" || { echo "the test guest has no flood mode: build tessera-tests again"; exit 1; }
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) GiB, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "profile: $PROFILE; rustc processes running at the start: $(pgrep -c rustc || true)"
# A private sysfs too, so /sys/class/net shows the namespace's own interfaces.
WORK=$W unshare --net --mount bash -c \
    'mount --make-rprivate / && mount -t sysfs sysfs /sys && exec python3 "$@"' - \
    bench/net.py "$W/tessera-vmm" "$W/guest.elf"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
