#!/usr/bin/env bash
# Ensures MariaDB's server and clients (mariadbd, mariadb-install-db, mysqldump, mysql)
# are installed, for the MySQL blueprint test; installs Debian's mariadb-server-core and
# mariadb-client with apt-get when missing (needs root; output goes to stderr). Prints the
# directory of mariadbd. The test starts its own throw-away server on 127.0.0.1.
set -euo pipefail

have() {
    command -v mariadb-install-db >/dev/null 2>&1 && command -v mysqldump >/dev/null 2>&1 \
        && command -v mysql >/dev/null 2>&1 && [[ -x /usr/sbin/mariadbd ]]
}
if ! have; then
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-mariadb: MariaDB is not installed (Debian: mariadb-server-core mariadb-client)" >&2
        exit 1
    fi
    echo "ensure-mariadb: installing MariaDB (apt-get install mariadb-server-core mariadb-client)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends mariadb-server-core mariadb-client 1>&2; then
        apt-get update 1>&2
        apt-get install -y --no-install-recommends mariadb-server-core mariadb-client 1>&2
    fi
    have || { echo "ensure-mariadb: installation finished but MariaDB was not found" >&2; exit 1; }
fi
echo /usr/sbin
