#!/usr/bin/env bash
# Ensures a Garage (S3-compatible object store) v2.x binary is available and
# prints its absolute path on stdout. If none is found, installs Garage 2.5.0
# from crates.io with `cargo install` (build output goes to stderr).
set -euo pipefail

GARAGE_VERSION="2.5.0"
CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"

# Returns 0 if "$1" is an executable garage binary of major version 2.
is_garage_v2() {
    local bin="$1" out
    [[ -x "$bin" ]] || return 1
    out="$("$bin" --version 2>/dev/null || true)"
    # e.g. "garage cargo:2.5.0" / "garage v2.5.0"
    [[ "$out" =~ (^|[^0-9.])v?2\.[0-9]+ ]]
}

candidates=()
if p="$(command -v garage 2>/dev/null)"; then
    candidates+=("$p")
fi
candidates+=("$CARGO_BIN_DIR/garage")

for c in "${candidates[@]}"; do
    if is_garage_v2 "$c"; then
        echo "$c"
        exit 0
    fi
done

echo "ensure-garage: garage v2 not found; installing garage $GARAGE_VERSION with cargo (this takes a while)..." >&2
cargo install garage --version "$GARAGE_VERSION" --locked \
    --no-default-features --features bundled-libs,sqlite 1>&2

bin="$CARGO_BIN_DIR/garage"
if [[ -n "${CARGO_INSTALL_ROOT:-}" ]]; then
    bin="$CARGO_INSTALL_ROOT/bin/garage"
fi
if ! is_garage_v2 "$bin"; then
    echo "ensure-garage: installation finished but $bin is missing or not v2" >&2
    exit 1
fi
echo "$bin"
