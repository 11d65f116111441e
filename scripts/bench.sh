#!/usr/bin/env bash
# Benchmarks datamover against restic and rclone on the same Garage, in one run, and
# writes bench/RESULTS-latest.md. Installs restic and rclone (Debian packages), rustic
# (cargo install rustic-rs, where it installs) and Garage when missing. Options are
# passed to the bench binary:
#   --reps N (3)  --scale F (1.0: ~1 GiB mixed data)  --stream-mib N (1024)  --no-toolchain
#   --datasets mixed,toolchain,stream,many,sync  --tools datamover,restic,rustic,rclone
#   --many-files N (1000000)  --many-reps N (1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! command -v restic >/dev/null || ! command -v rclone >/dev/null; then
  apt-get update -qq && apt-get install -y -qq restic rclone >/dev/null
fi
if ! command -v rustic >/dev/null; then
  # rustic is compared where it installs; without it the bench runs the other tools.
  cargo install rustic-rs --locked >&2 || echo "bench.sh: rustic did not install: it is left out" >&2
fi
GARAGE_BIN="$(scripts/ensure-garage.sh)"
export GARAGE_BIN

cargo build --release --workspace --bins --locked
export DATAMOVER_BIN_DIR="$PWD/target/release"
exec target/release/datamover-bench --output bench/RESULTS-latest.md "$@"
