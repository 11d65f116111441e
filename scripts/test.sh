#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests of the real
# binaries against the filesystem store and a real S3 server (Garage on loopback).
# Installs Garage (cargo install) on first use and reuses it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

GARAGE_BIN="$(scripts/ensure-garage.sh)"
export GARAGE_BIN

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/validate-manifests.sh --crd crd/manifests/crd.yaml crd/
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
