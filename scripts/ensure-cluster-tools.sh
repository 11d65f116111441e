#!/usr/bin/env bash
# Builds, once, the programs of the test cluster (scripts/cluster-up.sh) from the Go
# module proxy, and prints the directory that holds them:
#
#   kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl
#                      Kubernetes, tests/cluster/go/kubernetes (about 5 minutes cold)
#   etcd               tests/cluster/go/etcd
#   coredns            tests/cluster/go/coredns (the cluster's DNS)
#   helm               tests/cluster/go/helm (installs charts/datamover)
#   pause              the pod sandbox's program, from pause.c in the Kubernetes module
#
# Each tool is cached outside the checkout, under
# ${DATAMOVER_CACHE:-~/.cache/datamover}/cluster/<tool>-<version>/, and reused; a build
# goes to a temporary directory first, so an interrupted one leaves nothing half-built.
# Build output goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.5
COREDNS_VERSION=v1.15.0
HELM_VERSION=v4.3.2
PAUSE_VERSION=3.10

cache="${DATAMOVER_CACHE:-$HOME/.cache/datamover}/cluster"
bin="$cache/bin-$K8S_VERSION"
mkdir -p "$cache"

command -v go >/dev/null 2>&1 || {
    echo "ensure-cluster-tools: Go is not installed: the test cluster is built from Go modules (go 1.24 or newer)" >&2
    exit 1; }
command -v gcc >/dev/null 2>&1 || {
    echo "ensure-cluster-tools: gcc is not installed: it builds the pod sandbox's pause program" >&2
    exit 1; }

# build_into NAME VERSION CMD...: runs CMD with $out set to a fresh directory, then
# moves that directory to $cache/NAME-VERSION.
build_into() {
    local name="$1" version="$2"
    shift 2
    local dest="$cache/$name-$version"
    if [[ -f "$dest/.complete" ]]; then
        return
    fi
    echo "ensure-cluster-tools: building $name $version..." >&2
    local start=$SECONDS
    out="$(mktemp -d "$cache/.build-$name.XXXXXX")"
    "$@" >&2
    touch "$out/.complete"
    rm -rf "$dest"
    mv "$out" "$dest"
    echo "ensure-cluster-tools: $name $version built in $((SECONDS - start)) s" >&2
}

build_kubernetes() {
    local v="${K8S_VERSION#v}" ldflags
    ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=${v%%.*}"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$v" | cut -d. -f2)"
    ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    (cd "$repo/tests/cluster/go/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
    (cd "$repo/tests/cluster/go/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/etcd" .)
}

build_coredns() {
    (cd "$repo/tests/cluster/go/coredns" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
        -o "$out/coredns" github.com/coredns/coredns)
}

build_helm() {
    (cd "$repo/tests/cluster/go/helm" && CGO_ENABLED=0 go build -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
        -o "$out/helm" helm.sh/helm/v4/cmd/helm)
}

build_pause() {
    local moddir
    moddir="$(cd "$repo/tests/cluster/go/kubernetes" && go mod download -json k8s.io/kubernetes \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -f "$moddir/build/pause/linux/pause.c" ]] || {
        echo "ensure-cluster-tools: pause.c not found in the Kubernetes module ($moddir)" >&2; exit 1; }
    gcc -Os -static -DVERSION="v$PAUSE_VERSION" -o "$out/pause" "$moddir/build/pause/linux/pause.c"
}

build_into kubernetes "$K8S_VERSION" build_kubernetes
build_into etcd "$ETCD_VERSION" build_etcd
build_into coredns "$COREDNS_VERSION" build_coredns
build_into helm "$HELM_VERSION" build_helm
build_into pause "$PAUSE_VERSION" build_pause

# One directory of links, named after the Kubernetes version the set was made for.
mkdir -p "$bin"
for tool in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    ln -sfn "$cache/kubernetes-$K8S_VERSION/$tool" "$bin/$tool"
done
ln -sfn "$cache/etcd-$ETCD_VERSION/etcd" "$bin/etcd"
ln -sfn "$cache/coredns-$COREDNS_VERSION/coredns" "$bin/coredns"
ln -sfn "$cache/helm-$HELM_VERSION/helm" "$bin/helm"
ln -sfn "$cache/pause-$PAUSE_VERSION/pause" "$bin/pause"
echo "$bin"
