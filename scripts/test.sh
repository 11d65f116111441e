#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests of the real
# binaries against the filesystem store and a real S3 server (Garage on loopback), the
# container images (built with docker, run on a private network), the Kanister
# blueprints and example manifests (validated against the Kubernetes schemas and
# Kanister's Blueprint CRD) and the PostgreSQL and MySQL blueprints against real servers.
# Installs Garage (cargo install), PostgreSQL and MariaDB (apt-get) on first use and reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

GARAGE_BIN="$(scripts/ensure-garage.sh)"
export GARAGE_BIN
if POSTGRES_BIN_DIR="$(scripts/ensure-postgresql.sh)"; then
    export POSTGRES_BIN_DIR
else
    echo "test.sh: PostgreSQL is not available: the PostgreSQL blueprint test will skip (and fail under CI)" >&2
fi
if MARIADB_BIN_DIR="$(scripts/ensure-mariadb.sh)"; then
    export MARIADB_BIN_DIR
else
    echo "test.sh: MariaDB is not available: the MySQL blueprint test will skip (and fail under CI)" >&2
fi

# Blueprints and example manifests. The DatamoverServer example needs the CRD of crd/.
crds=(--crd blueprints/schema/blueprint-crd.yaml)
skip=""
if [[ -f crd/manifests/crd.yaml ]]; then
    crds+=(--crd crd/manifests/crd.yaml)
else
    skip=blueprints/examples/datamover-server.yaml
    echo "test.sh: crd/manifests/crd.yaml not found: $skip not validated" >&2
fi
manifests=()
while IFS= read -r f; do
    [[ "$f" == "$skip" ]] || manifests+=("$f")
done < <(find blueprints -name '*.yaml' | sort)
scripts/validate-manifests.sh "${crds[@]}" "${manifests[@]}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
scripts/validate-manifests.sh --crd crd/manifests/crd.yaml crd/
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
