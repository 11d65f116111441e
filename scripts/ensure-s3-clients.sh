#!/usr/bin/env bash
# Ensures the S3 command-line clients the S3 gateway tests drive, rclone and the AWS CLI,
# are available, and prints a directory holding `rclone` and `aws` on stdout. rclone is
# Debian's package (installed with apt-get when missing; needs root); the AWS CLI is
# installed from PyPI into a virtualenv under ~/.cache/datamover/s3-clients once and reused.
# Progress goes to stderr.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/datamover/s3-clients"
BIN="$CACHE/bin"
mkdir -p "$BIN"

if ! command -v rclone >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-s3-clients: rclone is missing: install Debian's rclone package (as root: apt-get install -y rclone)" >&2
        exit 1
    fi
    echo "ensure-s3-clients: installing rclone with apt-get..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y rclone 1>&2 ||
        { apt-get update 1>&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y rclone 1>&2; }
fi
ln -sf "$(command -v rclone)" "$BIN/rclone"

if [[ ! -x "$CACHE/venv/bin/aws" ]]; then
    echo "ensure-s3-clients: installing the AWS CLI into $CACHE/venv..." >&2
    python3 -m venv "$CACHE/venv" 1>&2
    "$CACHE/venv/bin/pip" install --quiet awscli 1>&2
fi
ln -sf "$CACHE/venv/bin/aws" "$BIN/aws"

"$BIN/rclone" version >/dev/null
"$BIN/aws" --version >/dev/null 2>&1
echo "$BIN"
