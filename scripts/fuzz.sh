#!/usr/bin/env bash
# Runs every fuzz harness for <seconds> each (default 60): the decoders of untrusted
# bytes (catalogs, sealed objects, packs, index objects, snapshot, config and lock JSON,
# edge-sync state, PROTOCOLS / SERVER_URL / SERVER_DATA, credential files) and the gRPC
# requests the server accepts. The harnesses are tests of their crates (a plain
# `cargo test` runs each for a few thousand inputs); here each runs for the time given.
# A failing input is saved under target/fuzz-failures/; once fixed, copy it to
# fuzz/corpus/<harness>/ so every run tries it again.
#
# When the nightly toolchain and cargo-fuzz are installed, the coverage-guided targets
# of fuzz/cargo-fuzz/ (the same harness bodies, under libFuzzer) then run for the same
# time each, starting from fuzz/corpus/<harness>/; what libFuzzer adds to the corpus
# goes to target/cargo-fuzz-corpus/<harness>/ (never committed). CI (scripts/test.sh)
# needs none of this: it runs the stable harnesses through `cargo test`.
#   scripts/fuzz.sh 600                 # ten minutes per harness
#   DATAMOVER_FUZZ_SEED=7 scripts/fuzz.sh 60   # another sequence of inputs
#   FUZZ_STABLE=0 scripts/fuzz.sh 60    # only the cargo-fuzz targets
#   FUZZ_TARGETS="grpc_messages" scripts/fuzz.sh 60   # only these cargo-fuzz targets
#   FUZZ_SANITIZER=address scripts/fuzz.sh 60         # cargo-fuzz under ASan (default none)
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
if [[ "${FUZZ_STABLE:-1}" != 0 ]]; then
    run -p datamover-core --test fuzz
    run -p datamover-repo --lib
    run -p datamover-client --test fuzz
    run -p datamover-server --test fuzz
fi

# Coverage-guided targets, when nightly and cargo-fuzz are here.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: no nightly toolchain: coverage-guided targets skipped (rustup toolchain install nightly)" >&2
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz not installed: coverage-guided targets skipped (cargo install cargo-fuzz --locked)" >&2
    exit 0
fi
root="$PWD"
export CARGO_TARGET_DIR="$root/target/cargo-fuzz"
mkdir -p target/fuzz-failures
for t in ${FUZZ_TARGETS:-credential_files sync_state grpc_messages}; do
    scratch="target/cargo-fuzz-corpus/$t"
    mkdir -p "$scratch" "fuzz/corpus/$t"
    echo "fuzz.sh: cargo-fuzz $t (${seconds}s)" >&2
    # The first corpus directory is where libFuzzer writes; the committed one is read.
    # An allocation over 64 MiB is a length read and trusted (the stable harnesses
    # allow 8 MiB plus 64 times the input on the harness's thread).
    cargo +nightly fuzz run --fuzz-dir fuzz/cargo-fuzz --sanitizer "${FUZZ_SANITIZER:-none}" "$t" \
        "$root/$scratch" "$root/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -malloc_limit_mb=64 -timeout=30 \
        -artifact_prefix="$root/target/fuzz-failures/$t-" -print_final_stats=1
done
