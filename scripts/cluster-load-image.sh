#!/usr/bin/env bash
# Loads images from the Docker engine into the test cluster's containerd (the cluster
# has no registry: pods name these images with imagePullPolicy Never or IfNotPresent).
#
#   scripts/cluster-load-image.sh IMAGE...
set -euo pipefail
dir="${DATAMOVER_CLUSTER_DIR:-/var/lib/datamover-cluster}"
sock="$dir/containerd/containerd.sock"
[[ -S "$sock" ]] || { echo "cluster-load-image: no test cluster's containerd at $sock: run scripts/cluster-up.sh first" >&2; exit 1; }
[[ $# -gt 0 ]] || { echo "usage: scripts/cluster-load-image.sh IMAGE..." >&2; exit 2; }
for image in "$@"; do
    docker image inspect "$image" >/dev/null 2>&1 \
        || { echo "cluster-load-image: the Docker engine has no image $image: build it first" >&2; exit 1; }
    docker save "$image" | ctr --address "$sock" -n k8s.io images import - >/dev/null
done
