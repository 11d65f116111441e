#!/usr/bin/env bash
# Stops the test cluster of scripts/cluster-up.sh and removes every trace of it: its
# processes and the pods' containers, mounts, network namespaces, bridges, iptables rules
# and its state directory. Safe to run when nothing is up.
set -uo pipefail
cd "$(dirname "$0")/.."
dir="${DATAMOVER_CLUSTER_DIR:-/var/lib/datamover-cluster}"
log() { echo "cluster-down: $*" >&2; }

# stop NAME: TERM, then KILL after 10 s.
stop() {
    local pidfile="$dir/pids/$1.pid" pid i
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

if [[ -d "$dir" ]]; then
    log "stopping the cluster in $dir"
    for p in coredns kube-proxy kubelet kube-scheduler kube-controller-manager; do stop "$p"; done
    # The pods' processes: everything in the kubelet's cgroups (cgroupfs driver).
    for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
        [[ -d "$c" ]] || continue
        find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
    done
    # The containerd shims of this cluster's containerd.
    pkill -KILL -f "containerd-shim.*-address $dir/containerd" 2>/dev/null
    stop containerd
    stop kube-apiserver
    stop etcd
    # Mounts under the state directory, deepest first.
    awk -v d="$dir" '$2 ~ "^"d {print $2}' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
fi
# The pods' network namespaces (made by containerd's CRI plugin) and the devices.
for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do ip netns delete "$ns" 2>/dev/null; done
ip link delete dm-cni0 2>/dev/null
ip link delete dm-node0 2>/dev/null
# iptables: ours, kube-proxy's chains, CNI's.
while iptables -w -D FORWARD -i dm-cni0 -j ACCEPT -m comment --comment datamover-cluster 2>/dev/null; do :; done
while iptables -w -D FORWARD -o dm-cni0 -j ACCEPT -m comment --comment datamover-cluster 2>/dev/null; do :; done
bin="${DATAMOVER_CACHE:-$HOME/.cache/datamover}/cluster"
proxy="$(ls -d "$bin"/kubernetes-*/kube-proxy 2>/dev/null | head -n 1)"
if [[ -n "$proxy" ]]; then
    "$proxy" --cleanup >/dev/null 2>&1
fi
for table in nat filter; do
    iptables -w -t "$table" -S 2>/dev/null | awk '/^-A .*CNI-/{print}' | sed 's/^-A/-D/' | while read -r rule; do
        eval iptables -w -t "$table" "$rule" 2>/dev/null
    done
    iptables -w -t "$table" -S 2>/dev/null | awk '/^-N CNI-/{print $2}' | while read -r chain; do
        iptables -w -t "$table" -F "$chain" 2>/dev/null
        iptables -w -t "$table" -X "$chain" 2>/dev/null
    done
done
# Empty cgroups the kubelet made.
for c in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d "$c" ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
done
rm -rf "$dir"
exit 0
