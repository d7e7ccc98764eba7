#!/usr/bin/env bash
# Issues podfence's mutual-TLS material with openssl: one CA, the control service's server
# certificate, and one client certificate per node whose subject CN is exactly the node's name
# (the control service lets a connection subscribe only as the node its certificate names).
#
#   deploy/issue-node-cert.sh [-d DIR] ca                      # CA (kept if it already exists)
#   deploy/issue-node-cert.sh [-d DIR] server [EXTRA_DNS...]   # control service certificate
#   deploy/issue-node-cert.sh [-d DIR] node NODE_NAME...        # one client certificate per node
#
# DIR defaults to ./podfence-pki. Keys never leave DIR; node material lands in DIR/nodes/NODE/
# (node.crt, node.key, ca.crt), to be installed on that node only, at /etc/podfence/pki/.
# The server certificate names the in-cluster Service (see deploy/control.yaml); pass extra
# names when agents reach the control service another way. See deploy/README.md.
set -euo pipefail

dir=./podfence-pki
if [ "${1:-}" = "-d" ]; then
    dir=$2
    shift 2
fi
command=${1:-}
shift || true

NAMESPACE=${PODFENCE_NAMESPACE:-podfence-system}
SERVICE=${PODFENCE_SERVICE:-podfence-control}
CA_DAYS=${PODFENCE_CA_DAYS:-3650}
CERT_DAYS=${PODFENCE_CERT_DAYS:-365}

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

new_key() {  # EC P-256: small, fast, supported by gRPC's TLS stack
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null)
}

sign() {  # sign(csr, out, extensions)
    local extensions
    extensions=$(mktemp)
    printf '%s\n' "$3" >"$extensions"
    openssl x509 -req -in "$1" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days "$CERT_DAYS" -sha256 -extfile "$extensions" -out "$2" 2>/dev/null
    rm -f "$extensions"
}

require_ca() {
    if [ ! -f "$dir/ca.crt" ] || [ ! -f "$dir/ca.key" ]; then
        echo "issue-node-cert: no CA in $dir; run '$0 -d $dir ca' first" >&2
        exit 1
    fi
}

# A node name is a DNS-1123 subdomain; refusing anything else keeps it safe in -subj and paths.
valid_node_name() {
    [[ ${#1} -le 253 && $1 =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$ ]]
}

case "$command" in
ca)
    mkdir -p "$dir"
    if [ -f "$dir/ca.crt" ]; then
        echo "issue-node-cert: keeping the existing CA $dir/ca.crt" >&2
        exit 0
    fi
    new_key "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$CA_DAYS" -subj "/CN=podfence-ca" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.crt"
    echo "$dir/ca.crt"
    ;;
server)
    require_ca
    names="DNS:$SERVICE,DNS:$SERVICE.$NAMESPACE,DNS:$SERVICE.$NAMESPACE.svc,DNS:$SERVICE.$NAMESPACE.svc.cluster.local"
    for extra in "$@"; do
        if [[ $extra =~ ^[0-9.]+$ || $extra == *:* ]]; then
            names="$names,IP:$extra"
        else
            names="$names,DNS:$extra"
        fi
    done
    new_key "$dir/server.key"
    openssl req -new -key "$dir/server.key" -subj "/CN=$SERVICE.$NAMESPACE.svc" -out "$dir/server.csr"
    sign "$dir/server.csr" "$dir/server.crt" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$names"
    rm -f "$dir/server.csr"
    echo "$dir/server.crt"
    echo "Store it for the control service with:" >&2
    echo "  kubectl -n $NAMESPACE create secret generic podfence-control-tls \\" >&2
    echo "    --from-file=tls.crt=$dir/server.crt --from-file=tls.key=$dir/server.key --from-file=ca.crt=$dir/ca.crt" >&2
    ;;
node)
    require_ca
    [ "$#" -ge 1 ] || usage
    for node in "$@"; do
        if ! valid_node_name "$node"; then
            echo "issue-node-cert: '$node' is not a valid Kubernetes node name" >&2
            exit 2
        fi
        out="$dir/nodes/$node"
        mkdir -p "$out"
        new_key "$out/node.key"
        openssl req -new -key "$out/node.key" -subj "/CN=$node" -out "$out/node.csr"
        sign "$out/node.csr" "$out/node.crt" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=DNS:$node"
        rm -f "$out/node.csr"
        cp "$dir/ca.crt" "$out/ca.crt"
        echo "$out/node.crt"
    done
    echo "Install each DIR/nodes/NODE/* on that node as /etc/podfence/pki/ (mode 0600 for node.key)." >&2
    ;;
*)
    usage
    ;;
esac
