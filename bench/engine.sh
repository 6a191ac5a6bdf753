#!/usr/bin/env bash
# Cost of checksums, the WAL and copy-on-write layers in the engine itself (no network),
# against plain pread/pwrite on a file in the same directory. Usage: bench/engine.sh [dir]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -q -p tessera-blockstore --bench engine -- "${1:-/var/tmp}"
