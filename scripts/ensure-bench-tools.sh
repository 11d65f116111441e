#!/usr/bin/env bash
# Builds, once, the newest releases of the bench's anchors from the Go module proxy and
# prints the directory that holds them (put it first on PATH):
#
#   restic   github.com/restic/restic/cmd/restic (about 1 minute cold)
#   rclone   github.com/rclone/rclone            (about 2 minutes cold)
#
# Each is cached outside the checkout, under
# ${DATAMOVER_CACHE:-~/.cache/datamover}/bench/<tool>-<version>/, and reused; a build goes
# to a temporary directory first, so an interrupted one leaves nothing half-built. The
# versions can be overridden with RESTIC_VERSION and RCLONE_VERSION. Build output goes to
# stderr. kopia is not on the Go module proxy: the bench runs it when KOPIA_BIN names a
# kopia binary.
set -euo pipefail

RESTIC_VERSION="${RESTIC_VERSION:-v0.18.1}"
RCLONE_VERSION="${RCLONE_VERSION:-v1.76.0}"

cache="${DATAMOVER_CACHE:-$HOME/.cache/datamover}/bench"
bin="$cache/bin"
mkdir -p "$cache" "$bin"

command -v go >/dev/null 2>&1 || {
    echo "ensure-bench-tools: Go is not installed: restic and rclone are built from Go modules" >&2
    exit 1; }

# install NAME VERSION PACKAGE: go install PACKAGE@VERSION into $cache/NAME-VERSION.
install() {
    local name="$1" version="$2" package="$3"
    local dir="$cache/$name-$version"
    if [[ ! -x "$dir/$name" ]]; then
        echo "ensure-bench-tools: building $name $version from the Go module proxy..." >&2
        local tmp
        tmp="$(mktemp -d "$cache/.$name-XXXXXX")"
        if ! GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath "$package@$version" 1>&2; then
            rm -rf "$tmp"
            echo "ensure-bench-tools: go install $package@$version failed (see above)" >&2
            exit 1
        fi
        rm -rf "$dir"
        mv "$tmp" "$dir"
    fi
    ln -sfn "$dir/$name" "$bin/$name"
}

install restic "$RESTIC_VERSION" github.com/restic/restic/cmd/restic
install rclone "$RCLONE_VERSION" github.com/rclone/rclone
echo "$bin"
