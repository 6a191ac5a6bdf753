#!/usr/bin/env bash
# tessera-vmm benchmarks (run as root from the repository root): memory overhead,
# time to first guest instruction, snapshot/restore of a 256 MiB guest, virtio-blk
# requests per second with the cost of one exit measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup
cargo build --release -q -p tessera-vmm -p tessera-tests
GUEST=$(ls -t target/release/build/tessera-tests-*/out/tessera-test-guest.elf | head -1)
exec python3 bench/vmm.py target/release/tessera-vmm "$GUEST"
