#!/usr/bin/env bash
# Upstream NetworkPolicy e2e ("Netpol" focus) against podfence on a kind cluster.
#
# The cluster uses kind's default CNI, kindnet, which enforces no NetworkPolicy at all: every
# policy verdict the suite sees comes from podfence. Steps: create the cluster, build and load the
# podfence image, apply deploy/, wait for the DaemonSet and control service, download the e2e test
# binaries of the cluster's Kubernetes version, run ginkgo with the Netpol focus, delete the cluster.
#
# Exit codes: 0 suite passed, 1 failure, 3 a prerequisite is missing here (message says which).
# Settings (env): KIND_CLUSTER (podfence-e2e), K8S_VERSION (the node image's), IMAGE
# (podfence:e2e), GINKGO_FOCUS, GINKGO_SKIP, GINKGO_NODES (4), KEEP_CLUSTER=1 to keep it.
set -euo pipefail

SKIP=3
cd "$(dirname "$0")/.."

command -v kind >/dev/null 2>&1 || { echo "SKIP: kind not installed" >&2; exit "$SKIP"; }
command -v docker >/dev/null 2>&1 || { echo "SKIP: no Docker engine (docker CLI not installed)" >&2; exit "$SKIP"; }
docker info >/dev/null 2>&1 || { echo "SKIP: no Docker engine (docker info cannot reach a daemon)" >&2; exit "$SKIP"; }
command -v kubectl >/dev/null 2>&1 || { echo "SKIP: kubectl not installed" >&2; exit "$SKIP"; }
[ -d deploy ] || { echo "SKIP: deploy/ manifests missing" >&2; exit "$SKIP"; }

CLUSTER="${KIND_CLUSTER:-podfence-e2e}"
IMAGE="${IMAGE:-podfence:e2e}"
FOCUS="${GINKGO_FOCUS:-\[sig-network\] Netpol}"
SKIP_RE="${GINKGO_SKIP:-NetworkPolicyLegacy|SCTPConnectivity}"
NODES="${GINKGO_NODES:-4}"
WORK="$(mktemp -d)"
KUBECONFIG_FILE="$WORK/kubeconfig"

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != "1" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cat >"$WORK/kind.yaml" <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: false   # kindnet: connectivity only, no NetworkPolicy enforcement
nodes:
- role: control-plane
  extraMounts: &kernel   # BCC compiles against the host kernel's headers, which kind nodes share
  - {hostPath: /lib/modules, containerPath: /lib/modules, readOnly: true}
  - {hostPath: /usr/src, containerPath: /usr/src, readOnly: true}
- role: worker
  extraMounts: *kernel
- role: worker
  extraMounts: *kernel
KIND
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --kubeconfig "$KUBECONFIG_FILE" --wait 120s
export KUBECONFIG="$KUBECONFIG_FILE"

docker build -t "$IMAGE" -f deploy/Dockerfile .
kind load docker-image "$IMAGE" --name "$CLUSTER"

# As deploy/README.md says: the manifests name their image (point them at the one just loaded), the
# control service's certificate is a Secret, each node gets its own client certificate on the host.
PKI="$WORK/pki"
deploy/issue-node-cert.sh -d "$PKI" ca
deploy/issue-node-cert.sh -d "$PKI" server
sed "s#image: .*podfence.*#image: $IMAGE#" deploy/control.yaml | kubectl apply -f -
kubectl -n podfence-system create secret generic podfence-control-tls \
  --from-file=tls.crt="$PKI/server.crt" --from-file=tls.key="$PKI/server.key" --from-file=ca.crt="$PKI/ca.crt"
for node in $(kubectl get nodes -o name | cut -d/ -f2); do
  deploy/issue-node-cert.sh -d "$PKI" node "$node"
  docker exec "$node" mkdir -p /etc/podfence/pki
  for file in node.crt node.key ca.crt; do docker cp "$PKI/nodes/$node/$file" "$node:/etc/podfence/pki/$file"; done
  docker exec "$node" chmod 0600 /etc/podfence/pki/node.key
done
sed "s#image: .*podfence.*#image: $IMAGE#" deploy/daemonset.yaml | kubectl apply -f -
kubectl -n podfence-system rollout status deployment --timeout=180s
kubectl -n podfence-system rollout status daemonset/podfence-agent --timeout=300s

K8S_VERSION="${K8S_VERSION:-$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')}"
curl -fsSL "https://dl.k8s.io/${K8S_VERSION}/kubernetes-test-linux-amd64.tar.gz" | tar -xz -C "$WORK"
"$WORK/kubernetes/test/bin/ginkgo" --nodes="$NODES" --focus="$FOCUS" --skip="$SKIP_RE" \
  "$WORK/kubernetes/test/bin/e2e.test" -- --provider=local --kubeconfig="$KUBECONFIG_FILE"
