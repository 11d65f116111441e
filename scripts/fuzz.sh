#!/usr/bin/env bash
# Runs every fuzz harness for <seconds> each (default 60): the decoders of untrusted
# bytes (catalogs, sealed objects, packs, index objects, snapshot, config and lock JSON,
# edge-sync state, PROTOCOLS / SERVER_URL / SERVER_DATA, credential files). The harnesses
# are tests of their crates (a plain `cargo test` runs each for a few thousand inputs);
# here each runs for the time given. A failing input is saved under target/fuzz-failures/;
# once fixed, copy it to fuzz/corpus/<harness>/ so every run tries it again.
#   scripts/fuzz.sh 600                 # ten minutes per harness
#   DATAMOVER_FUZZ_SEED=7 scripts/fuzz.sh 60   # another sequence of inputs
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "usage: scripts/fuzz.sh [seconds per harness]" >&2
    exit 2
fi
export DATAMOVER_FUZZ_SECONDS="$seconds"
# One harness at a time, each for the full time.
run() {
    echo "fuzz.sh: $* (${seconds}s per harness)" >&2
    cargo test --locked "$@" -- --test-threads=1 fuzz_
}
run -p datamover-core --test fuzz
run -p datamover-repo --lib
run -p datamover-client --test fuzz
run -p datamover-server --test fuzz
