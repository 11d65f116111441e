#!/usr/bin/env bash
# Ensures the PostgreSQL server programs (initdb, pg_ctl, postgres, pg_dump, psql) are
# available and prints their directory on stdout. If they are missing, installs Debian's
# `postgresql` package with apt-get (needs root; output goes to stderr). The tests start
# their own throw-away cluster on 127.0.0.1 from this directory; nothing else is used.
set -euo pipefail

find_bin_dir() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" && -x "$d/pg_dump" && -x "$d/psql" ]]; then
            best="$d"
        fi
    done
    if [[ -z "$best" ]] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        best="$(dirname "$(command -v initdb)")"
    fi
    [[ -n "$best" ]] && echo "$best"
}

if dir="$(find_bin_dir)"; then
    echo "$dir"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "ensure-postgresql: PostgreSQL is not installed and this is not root: install Debian's postgresql package" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgresql: PostgreSQL is not installed and apt-get is not available" >&2
    exit 1
fi
echo "ensure-postgresql: installing PostgreSQL (apt-get install postgresql)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends postgresql 1>&2; then
    apt-get update 1>&2
    apt-get install -y --no-install-recommends postgresql 1>&2
fi
if dir="$(find_bin_dir)"; then
    echo "$dir"
    exit 0
fi
echo "ensure-postgresql: installation finished but initdb/pg_ctl were not found" >&2
exit 1
