#!/usr/bin/env bash
# A single-node Kubernetes cluster on this machine, for trying the manifests in k8s/ for real.
#
# Usage: bash scripts/local_cluster.sh COMMAND
#   up [--no-jobset]   build what is missing, then start etcd, the control plane, containerd, the
#                      kubelet, kube-proxy, CoreDNS and (unless --no-jobset) the JobSet controller;
#                      returns once the node is Ready (and JobSet's webhooks answer). Cleans up a
#                      crashed or killed earlier cluster first.
#   down               stop everything and remove every process, mount, namespace, interface,
#                      iptables rule, cgroup and file the cluster made (images stay cached).
#   status             what is running; exit 0 when the node is Ready.
#   exec [CMD ...]     run CMD inside the cluster's network namespace with KUBECONFIG set and the
#                      cluster's kubectl first on PATH (no CMD: an interactive shell).
#   load IMAGE ...     copy images from buildah's local storage into the node's containerd.
#   jobset             install the JobSet controller (after `up --no-jobset`).
#   build              only build the pinned binaries (also done by `up`).
#   env                print the cluster's addresses as shell assignments.
#
# What runs: Kubernetes v1.37 (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, kubectl), etcd, CoreDNS and the JobSet controller, each built from its Go module at
# the version pinned in scripts/local_cluster/*/go.mod (binaries cached under
# ~/.cache/mnist-distill/cluster, keyed by those files, so a second `up` builds nothing); Debian's
# containerd, runc and CNI plugins (scripts/install_system_deps.sh). Nothing is ever pulled: the
# pod sandbox image and the JobSet controller's image are built here from their binaries.
#
# Contained: every process runs in one network namespace and one mount namespace of its own. The
# network namespace has loopback and the pods' bridge only: no link to the machine's network, no
# default route, no NAT, so pods reach nothing outside the cluster. Mounts made by the kubelet and
# containerd stay in the mount namespace and vanish with it. The kubelet insists on certain kernel
# settings (vm.overcommit_memory, kernel.panic, ...); instead of letting it change the machine's,
# it is shown files with the values it wants. Needs root (cgroups, namespaces, mounts).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
here=$repo/scripts/local_cluster
cache=${MNIST_DISTILL_CACHE:-$HOME/.cache/mnist-distill}/cluster
state=${MNIST_DISTILL_CLUSTER_STATE:-/run/mnist-distill-cluster}

# Addresses inside the cluster's network namespace (nothing outside it can see them).
node_name=mnist-distill-node
node_ip=10.245.0.1        # the node's InternalIP, on the namespace's loopback device
pod_cidr=10.244.0.0/24    # the pods' bridge (cni0); its gateway is .1
service_cidr=10.96.0.0/24
api_service_ip=10.96.0.1  # the `kubernetes` Service
dns_service_ip=10.96.0.10 # the `kube-dns` Service, answered by CoreDNS on the node address
cgroup_name=mnist-distill-cluster
holder_name=mnist-distill-cluster-holder
# The host paths that the kubelet, containerd and the CNI library write to whatever their
# settings say; inside the mount namespace each is a bind mount of a folder under $state.
host_paths=(/var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/netns /run/containerd)
# The kernel settings the kubelet checks, with the values it wants (it would write them).
kubelet_sysctls=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1
                 kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000)

log() { echo "local_cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Binaries: one folder per module, named by a hash of its pinning files.

# The key covers what decides the binaries: the module's pins and code, and how it is built.
module_key() {
  { cat "$here/$1"/go.mod "$here/$1"/go.sum "$here/$1"/*.go 2>/dev/null; ldflags "$1"; } \
    | sha256sum | cut -c1-12
}
bin_dir() { echo "$cache/bin/$1-$(module_key "$1")"; }

# build_module NAME PACKAGE... : go build the packages into $(bin_dir NAME), once.
build_module() {
  local name=$1; shift
  local out; out=$(bin_dir "$name")
  [ -f "$out/.complete" ] && return 0
  command -v go >/dev/null || die "go is missing (Go 1.26 or newer builds the cluster)"
  log "building $name ($*) into $out"
  local start=$SECONDS
  rm -rf "$out.tmp" && mkdir -p "$out.tmp"
  # Static binaries (CGO_ENABLED=0): two of them go into images of their own.
  (cd "$here/$name" && CGO_ENABLED=0 GOFLAGS=-mod=readonly \
     go build -trimpath -ldflags "$(ldflags "$name")" \
     -o "$out.tmp/" "$@")
  touch "$out.tmp/.complete"
  rm -rf "$out" && mv "$out.tmp" "$out"
  log "built $name in $((SECONDS - start)) s"
}

# module_version DIR MODULE: the version go.mod requires.
module_version() {
  awk -v m="$2" '{for (i = 1; i < NF; i++) if ($i == m) {print $(i + 1); exit}}' "$here/$1/go.mod"
}

ldflags() {
  local flags="-s -w"
  if [ "$1" = kubernetes ]; then
    local kv; kv=$(module_version kubernetes k8s.io/kubernetes)
    local minor=${kv#v1.}; minor=${minor%%.*}
    # What `kubectl version` and the node report (the release build sets the same variables).
    local p
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      flags+=" -X $p.gitVersion=$kv -X $p.gitMajor=1 -X $p.gitMinor=$minor"
      flags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
  elif [ "$1" = jobset ]; then
    flags+=" -X sigs.k8s.io/jobset/pkg/version.GitVersion=$(module_version jobset sigs.k8s.io/jobset)"
  fi
  echo "$flags"
}

build_all() {
  build_module kubernetes k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
  build_module etcd .
  build_module coredns github.com/coredns/coredns
  build_module jobset sigs.k8s.io/jobset
  build_module pause .
}

kbin() { echo "$(bin_dir kubernetes)/$1"; }

# ---------------------------------------------------------------------------------------------
# The namespaces: a holder process owns them; everything else joins it with nsenter.

holder_pid() { pgrep -f "^$holder_name( |$)" | head -n1 || true; }

in_ns() {
  local pid; pid=$(holder_pid)
  [ -n "$pid" ] || die "the cluster is not up (bash scripts/local_cluster.sh up)"
  nsenter -t "$pid" -m -n -- "$@"
}

# Runs as the holder, already inside the new namespaces: set them up, then wait forever.
hold() {
  ip link set lo up
  ip addr add "$node_ip/32" dev lo
  # etcd's data on a tmpfs of the namespace: fast, and gone with it.
  mount -t tmpfs -o size=512m tmpfs "$state/etcd"
  local p
  for p in "${host_paths[@]}"; do
    mkdir -p "$state/host$p"
    mount --bind "$state/host$p" "$p"
  done
  # The kubelet bind-mounts its root folder onto itself and makes it shared (mount propagation
  # for volumes); a shared mount inside a slave namespace propagates only within it.
  mount --make-rshared /var/lib/kubelet
  local kv key value
  for kv in "${kubelet_sysctls[@]}"; do
    key=${kv%%=*}; value=${kv#*=}
    if [ "$(cat "/proc/sys/$key")" != "$value" ]; then
      mkdir -p "$state/sysctl/$(dirname "$key")"
      echo "$value" > "$state/sysctl/$key"
      mount --bind -o ro "$state/sysctl/$key" "/proc/sys/$key"
    fi
  done
  touch "$state/holder.ready"
  exec -a "$holder_name" sleep infinity
}

# start NAME CMD... : run CMD in the namespaces, in the background, logging to $state/logs/NAME.log.
start() {
  local name=$1; shift
  local pid; pid=$(holder_pid)
  setsid nsenter -t "$pid" -m -n -- "$@" </dev/null >>"$state/logs/$name.log" 2>&1 &
}

# wait_for WHAT SECONDS CMD... : retry CMD until it succeeds.
wait_for() {
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what did not come up within ${limit}s; last lines of its log:"
      tail -n 30 "$state/logs/${what%% *}.log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs (one CA; certificates valid for a year).

cert() {  # cert NAME SUBJECT [SANS]
  local name=$1 subject=$2 sans=${3:-}
  local d=$state/pki
  openssl req -new -newkey rsa:2048 -nodes -keyout "$d/$name.key" -subj "$subject" \
    -out "$d/$name.csr" 2>/dev/null
  local ext=$d/$name.ext
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } > "$ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$d/$name.crt" 2>/dev/null
}

kubeconfig() {  # kubeconfig NAME CERT
  cat > "$state/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster:
      certificate-authority: $state/pki/ca.crt
      server: https://$node_ip:6443
users:
  - name: $1
    user:
      client-certificate: $state/pki/$2.crt
      client-key: $state/pki/$2.key
contexts:
  - name: local
    context: {cluster: local, user: $1}
current-context: local
EOF
}

make_pki() {
  local d=$state/pki
  mkdir -p "$d"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$d/ca.key" -days 365 \
    -subj "/CN=mnist-distill-local-cluster-ca" -out "$d/ca.crt" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" "IP:$node_ip,IP:$api_service_ip,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=admin"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kubelet "/O=system:nodes/CN=system:node:$node_name" "IP:$node_ip,DNS:$node_name"
  cert kube-proxy "/CN=system:kube-proxy"
  cert coredns "/CN=coredns"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kubelet kubelet
  kubeconfig kube-proxy kube-proxy
  kubeconfig coredns coredns
}

# ---------------------------------------------------------------------------------------------
# Configuration files.

write_configs() {
  mkdir -p "$state/cni/net.d" "$state/containerd" "$state/coredns"
  # The pods' network: one bridge, addresses from pod_cidr. The pods' default route leads to the
  # bridge (Service addresses are translated there) and ends there: no masquerade, no way out.
  cat > "$state/cni/net.d/10-mnist-distill.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "mnist-distill-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$state/cni/ipam",
            "ranges": [[{"subnet": "$pod_cidr", "gateway": "${pod_cidr%.0/24}.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
  # containerd: images persist in the cache (an image loaded once stays for the next `up`);
  # everything else lives under $state.
  cat > "$state/containerd/config.toml" <<EOF
version = 2
root = "$cache/containerd"
state = "$state/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$state/containerd/containerd.sock"
[ttrpc]
  address = "$state/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$state/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$(pause_image)"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower a container's oom_score_adj below its own.
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
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
EOF
  # The kubelet: cgroupfs driver on this machine's cgroup v1 hierarchies, under a cgroup root of
  # its own; authenticates the API server by client certificate.
  cat > "$state/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: AlwaysAllow}
tlsCertFile: $state/pki/kubelet.crt
tlsPrivateKeyFile: $state/pki/kubelet.key
containerRuntimeEndpoint: unix://$state/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_name
failCgroupV1: false
failSwapOn: false
clusterDNS: [$dns_service_ip]
clusterDomain: cluster.local
resolvConf: $state/resolv.conf
podLogsDir: /var/log/pods
serializeImagePulls: false
# A test machine's disk is often fuller than a node's: evict only when it is nearly full.
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
nodeStatusReportFrequency: 10s
EOF
  # Pods inherit no resolver from the machine: only the cluster's DNS.
  : > "$state/resolv.conf"
  cat > "$state/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
hostnameOverride: $node_name
mode: iptables
clusterCIDR: $pod_cidr
bindAddress: $node_ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0: leave the kernel's conntrack settings (machine-wide) alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  # CoreDNS answers the cluster's names and the ones in coredns/hosts (which tests may extend);
  # it forwards nothing, so no name outside the cluster resolves.
  : > "$state/coredns/hosts"
  cat > "$state/coredns/Corefile" <<EOF
.:53 {
  bind $node_ip
  errors
  hosts $state/coredns/hosts {
    reload 1s
    fallthrough
  }
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $state/coredns.kubeconfig local
    pods insecure
    ttl 5
  }
}
EOF
}

pause_image() { echo "localhost/mnist-distill-pause:$(module_key pause)"; }
jobset_image() { echo "localhost/mnist-distill-jobset:$(module_version jobset sigs.k8s.io/jobset)-$(module_key jobset)"; }

# image_from_binary REF BINARY PATH_IN_IMAGE : a one-file image in buildah's storage.
image_from_binary() {
  local ref=$1 binary=$2 path=$3
  buildah inspect --type image "$ref" >/dev/null 2>&1 && return 0
  local c; c=$(buildah from --quiet scratch)
  buildah copy --quiet "$c" "$binary" "$path" >/dev/null
  buildah config --entrypoint "[\"$path\"]" --user 65532:65532 "$c"
  buildah commit --quiet --timestamp 0 "$c" "$ref" >/dev/null
  buildah rm "$c" >/dev/null
}

ctr_() { in_ns ctr --address "$state/containerd/containerd.sock" -n k8s.io "$@"; }

# load REF... : copy images from buildah's storage into containerd. containerd's image store is
# cached across clusters: an image (by buildah's ID) loaded before under any name is only tagged.
load_images() {
  local ref id record loaded
  for ref in "$@"; do
    id=$(buildah inspect --type image --format '{{.FromImageID}}' "$ref" 2>/dev/null) \
      || die "no image $ref in buildah's storage"
    record=$cache/containerd-loaded/$id
    loaded=$(cat "$record" 2>/dev/null || true)
    if [ -n "$loaded" ] && ctr_ images ls -q | grep -qxF "$loaded"; then
      [ "$loaded" = "$ref" ] || ctr_ images tag --force "$loaded" "$ref" >/dev/null
      continue
    fi
    local start=$SECONDS tar=$state/load.tar
    rm -f "$tar"
    buildah push --quiet "$ref" "docker-archive:$tar:$ref" >/dev/null
    ctr_ images import "$tar" >/dev/null
    rm -f "$tar"
    mkdir -p "$(dirname "$record")" && echo "$ref" > "$record"
    log "loaded $ref in $((SECONDS - start)) s"
  done
}

# ---------------------------------------------------------------------------------------------
# up / down

# kubectl's discovery cache is the cluster's own: one kept from an earlier cluster would still
# know kinds (JobSet) that this one may lack.
kubectl_env=(KUBECONFIG="$state/admin.kubeconfig" KUBECACHEDIR="$state/kube-cache")
kubectl_() { in_ns env "${kubectl_env[@]}" "$(kbin kubectl)" "$@"; }

up() {
  local jobset=true
  [ "${1:-}" = --no-jobset ] && jobset=false
  [ "$(id -u)" -eq 0 ] || die "needs root (namespaces, cgroups, mounts)"
  for tool in containerd runc nsenter unshare openssl buildah ctr iptables conntrack; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install_system_deps.sh"
  done
  [ -x /usr/lib/cni/bridge ] || die "CNI plugins are missing: run scripts/install_system_deps.sh"
  local t0=$SECONDS
  down quiet
  build_all
  mkdir -p "$state/logs" "$state/etcd"
  # The host paths' mount points (made here only when missing, and removed by `down`).
  local p
  for p in "${host_paths[@]}"; do
    if [ ! -e "$p" ]; then mkdir -p "$p" && echo "$p" >> "$state/created-paths"; fi
  done
  make_pki
  write_configs
  # The holder creates both namespaces; mounts in it do not propagate back to the machine.
  setsid unshare --mount --net --propagation slave -- bash "${BASH_SOURCE[0]}" __hold \
    </dev/null >>"$state/logs/holder.log" 2>&1 &
  wait_for holder 10 test -f "$state/holder.ready" || exit 1
  wait_for holder 10 test -n "$(holder_pid)" || exit 1

  # The kubelet's cgroup root, in every hierarchy (cgroup v1 here; cpuset needs its CPUs and
  # memory nodes copied in before anything can join it).
  local h
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "$h$cgroup_name"
    if [ -f "${h}cpuset.cpus" ]; then
      cat "${h}cpuset.cpus" > "$h$cgroup_name/cpuset.cpus"
      cat "${h}cpuset.mems" > "$h$cgroup_name/cpuset.mems"
    fi
  done

  start etcd "$(bin_dir etcd)/etcd" --name local --data-dir "$state/etcd/data" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster local=http://127.0.0.1:2380 --listen-metrics-urls "" \
    --unsafe-no-fsync --log-level warn
  wait_for etcd 30 in_ns curl -sf http://127.0.0.1:2379/health || exit 1

  start kube-apiserver "$(kbin kube-apiserver)" --etcd-servers=http://127.0.0.1:2379 \
    --advertise-address="$node_ip" --bind-address=0.0.0.0 --secure-port=6443 \
    --service-cluster-ip-range="$service_cidr" \
    --tls-cert-file="$state/pki/apiserver.crt" --tls-private-key-file="$state/pki/apiserver.key" \
    --client-ca-file="$state/pki/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$state/pki/sa.pub" \
    --service-account-signing-key-file="$state/pki/sa.key" \
    --kubelet-client-certificate="$state/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$state/pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NodeRestriction \
    --enable-aggregator-routing=true --profiling=false
  wait_for kube-apiserver 120 kubectl_ get --raw /readyz || exit 1

  start kube-controller-manager "$(kbin kube-controller-manager)" \
    --kubeconfig="$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$state/pki/sa.key" --root-ca-file="$state/pki/ca.crt" \
    --cluster-signing-cert-file="$state/pki/ca.crt" --cluster-signing-key-file="$state/pki/ca.key" \
    --profiling=false
  start kube-scheduler "$(kbin kube-scheduler)" --kubeconfig="$state/scheduler.kubeconfig" \
    --authentication-kubeconfig="$state/scheduler.kubeconfig" \
    --authorization-kubeconfig="$state/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false

  start containerd containerd --config "$state/containerd/config.toml"
  wait_for containerd 30 ctr_ version || exit 1
  # Containers left by a killed cluster would come back as stale sandboxes: remove them.
  local ids; ids=$(ctr_ containers ls -q 2>/dev/null || true)
  [ -z "$ids" ] || ctr_ containers rm $ids >/dev/null 2>&1 || true
  image_from_binary "$(pause_image)" "$(bin_dir pause)/pause" /pause
  load_images "$(pause_image)"

  start kubelet "$(kbin kubelet)" --config="$state/kubelet.yaml" \
    --kubeconfig="$state/kubelet.kubeconfig" --hostname-override="$node_name" \
    --node-ip="$node_ip"
  start kube-proxy "$(kbin kube-proxy)" --config="$state/kube-proxy.yaml"
  start coredns "$(bin_dir coredns)/coredns" -conf "$state/coredns/Corefile"

  # kube-dns: a Service without a selector whose endpoint is CoreDNS on the node address.
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_service_ip
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: local-cluster}
addressType: IPv4
endpoints:
  - addresses: [$node_ip]
ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
  # CoreDNS reads Services, EndpointSlices, Pods and Namespaces.
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: local-cluster-coredns}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: local-cluster-coredns-discovery}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: local-cluster-coredns}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: coredns}
EOF
  wait_for kubelet 120 kubectl_ wait --for=condition=Ready "node/$node_name" --timeout=2s || exit 1
  log "node Ready after $((SECONDS - t0)) s"
  if $jobset; then install_jobset; fi
  log "up in $((SECONDS - t0)) s; run commands with: bash scripts/local_cluster.sh exec kubectl ..."
}

install_jobset() {
  local t0=$SECONDS
  local image; image=$(jobset_image)
  image_from_binary "$image" "$(bin_dir jobset)/jobset" /manager
  load_images "$image"
  # The controller's own manifests, rendered from the pinned module's config/default by the
  # cluster's kubectl, with the image built here and a smaller CPU request (a 2-core node).
  local mod; mod=$(cd "$here/jobset" && go list -m -f '{{.Dir}}' sigs.k8s.io/jobset)
  local k=$state/jobset-install
  rm -rf "$k" && mkdir -p "$k"
  cat > "$k/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$k" "$mod/config/default")
images:
  - name: us-central1-docker.pkg.dev/k8s-staging-images/jobset/jobset
    newName: ${image%:*}
    newTag: ${image##*:}
patches:
  - target: {kind: Deployment, name: jobset-controller-manager}
    patch: |-
      - op: replace
        path: /spec/template/spec/containers/0/resources/requests/cpu
        value: 50m
      - op: add
        path: /spec/template/spec/containers/0/imagePullPolicy
        value: Never
EOF
  in_ns "$(kbin kubectl)" kustomize "$k" > "$k/rendered.yaml" 2>"$k/kustomize.log" \
    || { cat "$k/kustomize.log" >&2; die "rendering JobSet's manifests failed"; }
  kubectl_ apply --server-side -f "$k/rendered.yaml" >/dev/null
  kubectl_ -n jobset-system rollout status deployment/jobset-controller-manager --timeout=180s \
    >/dev/null || die "the JobSet controller did not become available"
  # Ready once its webhooks answer: a server-side dry run of a JobSet goes through both.
  cat > "$k/probe.yaml" <<EOF
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata: {name: webhook-probe, namespace: default}
spec:
  replicatedJobs:
    - name: probe
      template:
        spec:
          template:
            spec:
              restartPolicy: Never
              containers: [{name: probe, image: $(pause_image)}]
EOF
  wait_for "kube-apiserver (JobSet webhooks)" 120 kubectl_ create --dry-run=server -f "$k/probe.yaml" \
    || die "JobSet's webhooks did not answer"
  log "JobSet controller ready in $((SECONDS - t0)) s"
}

# Every process of the cluster: the namespaces' members and whatever is in its cgroups.
cluster_pids() {
  local holder; holder=$(holder_pid)
  if [ -n "$holder" ]; then
    local netns; netns=$(readlink "/proc/$holder/ns/net" 2>/dev/null || true)
    local p
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$netns" ] && echo "${p#/proc/}"
    done
  fi
  find /sys/fs/cgroup/*/"$cgroup_name" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

down() {
  local quiet=${1:-}
  local pids tries=0
  while pids=$(cluster_pids | sort -u | grep -vx "$$" || true); [ -n "$pids" ]; do
    # SIGKILL: nothing of this cluster needs a graceful stop (its state is thrown away below).
    kill -9 $pids 2>/dev/null || true
    tries=$((tries + 1))
    [ $tries -le 100 ] || die "processes would not stop: $pids"
    sleep 0.1
  done
  # Every cgroup the kubelet and runc made, deepest first, in every hierarchy.
  local h
  for h in /sys/fs/cgroup/*/"$cgroup_name"; do
    [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$h" ] || die "could not remove cgroup $h"
  done
  if [ -d "$state" ]; then
    if [ -f "$state/created-paths" ]; then
      local p
      while read -r p; do rmdir "$p" 2>/dev/null || true; done < "$state/created-paths"
    fi
    # Nothing is mounted here outside the (now gone) mount namespace.
    if grep -q " $state" /proc/mounts; then die "$state still has mounts: $(grep " $state" /proc/mounts)"; fi
    rm -rf "$state"
  fi
  [ -n "$quiet" ] || log "down: nothing of the cluster is left"
}

status() {
  local holder; holder=$(holder_pid)
  if [ -z "$holder" ]; then echo "down"; return 3; fi
  echo "namespaces held by pid $holder; state in $state"
  kubectl_ get nodes -o wide || return 1
  kubectl_ get pods -A -o wide || true
  kubectl_ wait --for=condition=Ready "node/$node_name" --timeout=1s >/dev/null
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  exec)
    shift
    [ $# -gt 0 ] || set -- "${SHELL:-/bin/bash}"
    in_ns env "${kubectl_env[@]}" PATH="$(bin_dir kubernetes):$PATH" "$@" ;;
  load) shift; load_images "$@" ;;
  jobset) install_jobset ;;
  build) build_all ;;
  env)
    echo "node_ip=$node_ip pod_cidr=$pod_cidr service_cidr=$service_cidr dns_service_ip=$dns_service_ip"
    echo "node_name=$node_name state=$state kubeconfig=$state/admin.kubeconfig"
    echo "kubectl=$(kbin kubectl)" ;;
  __hold) hold ;;
  -h|--help|"") sed -n '2,30p' "$0" ;;
  *) die "unknown command $1 (see --help)" ;;
esac
