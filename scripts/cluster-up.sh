#!/usr/bin/env bash
# Starts a real single-node Kubernetes cluster on this machine, for the cluster tests
# (tests/tests/cluster_*.rs) and for trying the project's Kubernetes path by hand:
#
#   scripts/cluster-up.sh      # prints the path of an env file; source it for KUBECONFIG
#   scripts/cluster-down.sh    # stops everything and removes every trace
#
# What runs, in the order kind and k3s bring a node up, each waited on before the next:
#   1. the network: a bridge `dm-node0` carrying the node's address (10.250.0.1/32: the
#      kubelet refuses a loopback node IP), forwarding accepted on the pods' CNI bridge
#      `dm-cni0` (10.251.0.0/24; dockerd's FORWARD policy drops it otherwise);
#   2. etcd on 127.0.0.1, a kube-apiserver on 10.250.0.1:6443 with its own CA and
#      service-account keys (certificates made here with openssl), then the
#      controller-manager and the scheduler;
#   3. containerd (its own instance, socket and state, with the CRI plugin; pod sandboxes
#      use a pause image built from Kubernetes' pause.c, imported, no registry), the
#      kubelet, kube-proxy (iptables mode: Services work from pods), CoreDNS on
#      10.250.0.1:53 serving cluster.local from the apiserver (Service names resolve);
#   4. the node Ready and the default ServiceAccount present.
# Binaries come from scripts/ensure-cluster-tools.sh (built once, cached by version).
# Every address involved is on this machine: loopback, the bridge address above, the
# Service range (10.252.0.0/24, virtual) and pod addresses in network namespaces made here.
#
# Environment: DATAMOVER_CLUSTER_DIR (state, default /var/lib/datamover-cluster).
# Images are loaded with scripts/cluster-load-image.sh IMAGE... (from the Docker engine).
# The env file names KUBECONFIG, DATAMOVER_CLUSTER_NODE, DATAMOVER_CLUSTER_BIN (kubectl,
# helm), DATAMOVER_CLUSTER_CONTAINERD (the CRI socket) and DATAMOVER_CLUSTER_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

dir="${DATAMOVER_CLUSTER_DIR:-/var/lib/datamover-cluster}"
NODE_IP=10.250.0.1
NODE_NAME=dm-node
NODE_BRIDGE=dm-node0
POD_BRIDGE=dm-cni0
POD_CIDR=10.251.0.0/24
POD_GATEWAY=10.251.0.1
SERVICE_CIDR=10.252.0.0/24
SERVICE_KUBERNETES=10.252.0.1
ETCD_PORT=12379
PAUSE_IMAGE=registry.k8s.io/pause:3.10

log() { echo "cluster-up: $*" >&2; }
die() { log "$*"; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "the test cluster needs root (network devices, iptables, containers)"

# A cluster left by an interrupted run is removed first.
if [[ -e "$dir" ]]; then
    log "a previous cluster's state is in $dir: removing it first"
    scripts/cluster-down.sh
fi

for pkg in containerd:containerd runc:runc ctr:containerd iptables:iptables conntrack:conntrack openssl:openssl; do
    cmd="${pkg%%:*}"
    if ! command -v "$cmd" >/dev/null 2>&1; then
        log "installing ${pkg#*:} (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkg#*:}" >&2 \
            || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkg#*:}" >&2; }
    fi
done
if [[ ! -x /usr/lib/cni/bridge && ! -x /opt/cni/bin/bridge ]]; then
    log "installing containernetworking-plugins (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends containernetworking-plugins >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends containernetworking-plugins >&2; }
fi
cni_bin=/usr/lib/cni
[[ -x "$cni_bin/bridge" ]] || cni_bin=/opt/cni/bin
command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
    || die "no Docker engine answers: the pause image is built with it (start one with scripts/docker-engine.sh up)"

bin="$(scripts/ensure-cluster-tools.sh)"
export PATH="$bin:$PATH"

mkdir -p "$dir"/{pki,logs,pids,etcd,kubelet,containerd/root,containerd/state,cni/net.d,cni/ipam,pause}
pki="$dir/pki"

# ---- processes ------------------------------------------------------------------------
# start NAME CMD...: runs CMD in its own session, logs in $dir/logs/NAME.log.
start() {
    local name="$1"
    shift
    setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/pids/$name.pid"
}
# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds; names the log on failure.
wait_for() {
    local what="$1" secs="$2" name="$3"
    shift 3
    local i
    for ((i = 0; i < secs * 4; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -f "$dir/pids/$name.pid" ]] && ! kill -0 "$(cat "$dir/pids/$name.pid")" 2>/dev/null; then
            log "$name exited before $what; the end of $dir/logs/$name.log:"
            tail -n 30 "$dir/logs/$name.log" >&2
            exit 1
        fi
        sleep 0.25
    done
    log "$what did not happen within $secs s; the end of $dir/logs/$name.log:"
    tail -n 30 "$dir/logs/$name.log" >&2
    exit 1
}
trap 'rc=$?; if [[ $rc -ne 0 ]]; then log "failed: stopping what was started"; scripts/cluster-down.sh || true; fi' EXIT

# ---- 1. network -----------------------------------------------------------------------
log "network: $NODE_BRIDGE ($NODE_IP), pods on $POD_BRIDGE ($POD_CIDR), Services $SERVICE_CIDR"
ip link add "$NODE_BRIDGE" type bridge
ip addr add "$NODE_IP/32" dev "$NODE_BRIDGE"
ip link set "$NODE_BRIDGE" up
iptables -w -I FORWARD -i "$POD_BRIDGE" -j ACCEPT -m comment --comment datamover-cluster
iptables -w -I FORWARD -o "$POD_BRIDGE" -j ACCEPT -m comment --comment datamover-cluster
# Services answered by a pod on the same bridge (hairpin) need the bridge's traffic to
# pass iptables.
modprobe br_netfilter 2>/dev/null || true
if [[ -w /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
fi
echo 1 >/proc/sys/net/ipv4/ip_forward

cat >"$dir/cni/net.d/10-datamover.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "datamover-cluster",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

# ---- 2. certificates ------------------------------------------------------------------
log "certificates (openssl)"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=datamover-test-cluster-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt"
# cert NAME SUBJECT [SAN]: a key and a certificate signed by the cluster CA.
cert() {
    local name="$1" subject="$2" san="${3:-}"
    openssl_quiet req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr"
    local ext="$pki/$name.ext"
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [[ -n "$san" ]] && echo "subjectAltName=$san"
    } >"$ext"
    openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 30 -extfile "$ext" -out "$pki/$name.crt"
    rm -f "$pki/$name.csr" "$ext"
}
cert apiserver "/CN=kube-apiserver" \
    "IP:$NODE_IP,IP:$SERVICE_KUBERNETES,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
cert admin "/O=system:masters/CN=datamover-test-admin"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
cert kube-proxy "/CN=system:kube-proxy"
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
cert coredns "/O=system:masters/CN=coredns"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

# kubeconfig NAME: a kubeconfig with the NAME certificate.
kubeconfig() {
    local name="$1"
    cat >"$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: datamover-test
  cluster:
    certificate-authority: $pki/ca.crt
    server: https://$NODE_IP:6443
users:
- name: $name
  user:
    client-certificate: $pki/$name.crt
    client-key: $pki/$name.key
contexts:
- name: datamover-test
  context: {cluster: datamover-test, user: $name}
current-context: datamover-test
EOF
}
for k in admin controller-manager scheduler kube-proxy kubelet coredns; do kubeconfig "$k"; done
cp "$dir/admin.kubeconfig" "$dir/kubeconfig"
export KUBECONFIG="$dir/kubeconfig"

# ---- 3. control plane -----------------------------------------------------------------
log "etcd on 127.0.0.1:$ETCD_PORT"
start etcd etcd --name dm-etcd --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "dm-etcd=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --listen-metrics-urls "http://127.0.0.1:$((ETCD_PORT + 2))" --unsafe-no-fsync --log-level warn
wait_for "etcd answering" 30 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

log "kube-apiserver on $NODE_IP:6443"
start kube-apiserver kube-apiserver \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port 6443 \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$pki/ca.crt" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --enable-admission-plugins NodeRestriction \
    --profiling=false
wait_for "the apiserver ready" 90 kube-apiserver kubectl get --raw /readyz

log "kube-controller-manager and kube-scheduler"
start kube-controller-manager kube-controller-manager \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --use-service-account-credentials=true --service-cluster-ip-range "$SERVICE_CIDR" \
    --profiling=false
start kube-scheduler kube-scheduler --kubeconfig "$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false

# ---- 4. node --------------------------------------------------------------------------
sock="$dir/containerd/containerd.sock"
cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # These machines lack CAP_SYS_RESOURCE: without this every sandbox fails with
  # "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$dir/cni/net.d"
EOF
log "containerd ($sock)"
start containerd containerd --config "$dir/containerd/config.toml"
wait_for "containerd answering" 30 containerd ctr --address "$sock" version

log "the pause image ($PAUSE_IMAGE, from pause.c)"
cp "$bin/pause" "$dir/pause/pause"
printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$dir/pause/Containerfile"
docker build -q -t "$PAUSE_IMAGE" -f "$dir/pause/Containerfile" "$dir/pause" >/dev/null
DATAMOVER_CLUSTER_DIR="$dir" scripts/cluster-load-image.sh "$PAUSE_IMAGE"

cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$sock
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $dir/resolv.conf
# Secrets and ConfigMaps reach mounted volumes within about a second of a change.
syncFrequency: 2s
failSwapOn: false
registerNode: true
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podPidsLimit: 4096
maxPods: 60
EOF
# Pods with dnsPolicy Default get no upstream: nothing outside this machine is asked.
printf 'nameserver %s\n' "$NODE_IP" >"$dir/resolv.conf"
log "kubelet (node $NODE_NAME at $NODE_IP)"
start kubelet kubelet --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubelet.kubeconfig" \
    --root-dir "$dir/kubelet" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" \
    --cert-dir "$pki/kubelet-certs" --v=1

cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection: {kubeconfig: $dir/kube-proxy.kubeconfig}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
log "kube-proxy (iptables)"
start kube-proxy kube-proxy --config "$dir/kube-proxy.yaml"

cat >"$dir/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $dir/coredns.kubeconfig datamover-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
}
EOF
log "CoreDNS on $NODE_IP:53"
start coredns coredns -conf "$dir/Corefile"

node_ready() {
    [[ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}
wait_for "node $NODE_NAME Ready" 120 kubelet node_ready
wait_for "the default ServiceAccount" 60 kube-controller-manager kubectl get serviceaccount default -n default
wait_for "kube-proxy's rules for the kubernetes Service" 60 kube-proxy \
    sh -c "iptables -w -t nat -S KUBE-SERVICES | grep -q $SERVICE_KUBERNETES"

cat >"$dir/env" <<EOF
export KUBECONFIG=$dir/kubeconfig
export DATAMOVER_CLUSTER_DIR=$dir
export DATAMOVER_CLUSTER_NODE=$NODE_NAME
export DATAMOVER_CLUSTER_BIN=$bin
export DATAMOVER_CLUSTER_CONTAINERD=$sock
EOF
trap - EXIT
log "ready: source $dir/env (KUBECONFIG=$dir/kubeconfig)"
echo "$dir/env"
