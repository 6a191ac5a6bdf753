#!/usr/bin/env bash
# Soak run of the replication fault schedule (issue #8): crates/store/tests/replication_faults.rs
# with CYCLES cycles (default 500, about 11 minutes here) and a seed from the clock, or SEED
# to repeat one. Three tessera-store processes on loopback ports of their own (no dev
# cluster, no lock needed). Prints the seed, every cycle and the totals; fails like the
# test. PROFILE (default release) picks the cargo profile.
# Usage (from the repository root): bench/replication-soak.sh   or   SEED=123 CYCLES=60 bench/replication-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export TESSERA_FAULT_CYCLES=${CYCLES:-500}
[ -z "${SEED:-}" ] || export TESSERA_FAULT_SEED=$SEED
exec cargo test --profile "${PROFILE:-release}" -p tessera-store --test replication_faults \
    a_seeded_random_fault_schedule -- --nocapture
