#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end tests of the real
# binaries against the filesystem store and a real S3 server (Garage on loopback), the
# container images (built with docker, run on a private network), the Kanister
# blueprints and example manifests (validated against the Kubernetes schemas and
# Kanister's Blueprint CRD) and the PostgreSQL and MySQL blueprints against real servers.
# Installs Garage (cargo install), PostgreSQL, MariaDB and rclone (apt-get) and the AWS CLI
# (pip, in a virtualenv) on first use and reuses them;
# starts a Docker engine when none runs (installing docker.io when missing) and a real
# single-node Kubernetes (scripts/cluster-up.sh, built from Go modules once and cached), and
# stops both at the end.
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
# rclone (Debian) and the AWS CLI (PyPI, in a virtualenv) for the S3 gateway tests.
if S3_CLIENTS_BIN_DIR="$(scripts/ensure-s3-clients.sh)"; then
    export S3_CLIENTS_BIN_DIR
else
    echo "test.sh: rclone or the AWS CLI is not available: the S3 gateway's tool tests will skip (and fail under CI)" >&2
fi

# The Docker engine (image tests, and images for the cluster): started here when none
# answers, and stopped at the end if this script started it. The test cluster
# (scripts/cluster-up.sh) is started once the binaries are built and removed at the end.
cluster_started=""
cleanup() {
    local rc=$?
    if [[ -n "$cluster_started" ]]; then scripts/cluster-down.sh || true; fi
    scripts/docker-engine.sh down || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if ! scripts/docker-engine.sh up >/dev/null; then
    echo "test.sh: no Docker engine: the image and cluster tests will skip (and fail under CI)" >&2
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
# The cluster's Go wrapper modules: formatted, and the one with code of its own vetted.
if unformatted="$(gofmt -l tests/cluster/go)" && [[ -n "$unformatted" ]]; then
    echo "test.sh: not gofmt-formatted: $unformatted" >&2
    exit 1
fi
(cd tests/cluster/go/etcd && CGO_ENABLED=0 go vet .)

# A real single-node Kubernetes for tests/tests/cluster.rs (binaries built once, cached).
cluster_started=1
if env_file="$(scripts/cluster-up.sh)"; then
    export DATAMOVER_TEST_CLUSTER="$env_file"
else
    echo "test.sh: the test cluster did not start: the cluster tests will fail under CI" >&2
fi
cargo test --workspace --locked -- --test-threads=2
