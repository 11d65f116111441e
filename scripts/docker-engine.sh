#!/usr/bin/env bash
# Makes sure a Docker engine answers, for the image and cluster tests.
#
#   scripts/docker-engine.sh up     # install docker.io when dockerd is missing, start it
#                                   # in the background when none answers
#   scripts/docker-engine.sh down   # stop the engine `up` started (and nothing else)
#
# `up` prints `started` when it started an engine and `running` when one already answered;
# only an engine this script started is stopped by `down` (its pid is kept in
# $DATAMOVER_STATE_DIR, default /run/datamover-test). Debian's docker.io brings dockerd,
# containerd and runc; dockerd starts its own containerd and stops it on exit.
set -euo pipefail

state="${DATAMOVER_STATE_DIR:-/run/datamover-test}"
pidfile="$state/dockerd.pid"
log="$state/dockerd.log"

answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

install_engine() {
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "docker-engine: dockerd is not installed and this is not root: install Debian's docker.io" >&2
        exit 1
    fi
    echo "docker-engine: installing docker.io (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends docker.io >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends docker.io >&2
    fi
}

up() {
    if answers; then
        echo running
        return
    fi
    command -v dockerd >/dev/null 2>&1 || install_engine
    command -v docker >/dev/null 2>&1 || {
        echo "docker-engine: no docker client on PATH after installing docker.io" >&2; exit 1; }
    mkdir -p "$state"
    echo "docker-engine: starting dockerd (log: $log)" >&2
    # setsid: the engine outlives this script and is not hit by the test runner's signals.
    setsid dockerd >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    local i
    for i in $(seq 1 120); do
        if answers; then
            echo started
            return
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "docker-engine: dockerd exited at start; its log ($log) ends with:" >&2
            tail -n 20 "$log" >&2
            rm -f "$pidfile"
            exit 1
        fi
        sleep 0.5
    done
    echo "docker-engine: dockerd did not answer within 60 s; see $log" >&2
    exit 1
}

down() {
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(cat "$pidfile")"
    rm -f "$pidfile"
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || { echo "docker-engine: stopped dockerd" >&2; return 0; }
        sleep 0.5
    done
    echo "docker-engine: dockerd did not stop within 30 s: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: scripts/docker-engine.sh up|down" >&2; exit 2 ;;
esac
