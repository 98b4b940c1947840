#!/bin/sh
# Entrypoint of the weft DaemonSet's router container.
#
# Lists the cluster's nodes from the Kubernetes API with the pod's service account, keeps one IPv4
# InternalIP per node, drops this node (by name and by IP), and execs
#   weft router PEER... "$@" --ipalloc-init consensus=<number of nodes> --nickname NODE_NAME
#       [--password-file F]
# Arguments given to this script (the container's `args`) are passed on to `weft router`; an
# --ipalloc-init or --nickname among them replaces the script's own.
#
# Environment:
#   HOST_IP              this node's IP (downward API status.hostIP); required
#   NODE_NAME            this node's name (downward API spec.nodeName); also used as --nickname
#   WEFT_PASSWORD_FILE   password file (default /etc/weft-secret/password); set it to "" to run
#                        without encryption
#   KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT   the API server (set by the kubelet)
#   WEFT_API_RETRIES     attempts to list the nodes, 2 s apart (default 30), before giving up
#   WEFT_NODES_JSON_FILE read the node list from this file instead of the API (testing)
#   WEFT_DRY_RUN=1       print the weft command, one argument a line, instead of running it
set -eu

SA_DIR=${WEFT_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
PASSWORD_FILE=${WEFT_PASSWORD_FILE-/etc/weft-secret/password}
RETRIES=${WEFT_API_RETRIES:-30}
NODE_NAME=${NODE_NAME:-}

log() { echo "weft-entrypoint: $*" >&2; }
die() { log "$*"; exit 1; }

[ -n "${HOST_IP:-}" ] || die "HOST_IP is not set (give it from the downward API: status.hostIP)"

# Prints the API's node list (JSON) on stdout.
fetch_nodes() {
    if [ -n "${WEFT_NODES_JSON_FILE:-}" ]; then
        cat "$WEFT_NODES_JSON_FILE"
        return
    fi
    host=${KUBERNETES_SERVICE_HOST:?KUBERNETES_SERVICE_HOST is not set}
    port=${KUBERNETES_SERVICE_PORT:-443}
    case $host in *:*) host="[$host]" ;; esac # IPv6 literal
    token=$(cat "$SA_DIR/token")
    curl -sS --fail --max-time 10 --cacert "$SA_DIR/ca.crt" \
        -H "Authorization: Bearer $token" \
        "https://$host:$port/api/v1/nodes"
}

# From the node list on stdin, prints "NAME IP" for each node with an IPv4 InternalIP (its first).
NODE_FILTER='
  .items[]
  | [.metadata.name,
     ([.status.addresses[]? | select(.type == "InternalIP") | .address
       | select(test("^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$"))] | first)]
  | select(.[1] != null)
  | "\(.[0]) \(.[1])"'

nodes_json=
i=0
while :; do
    i=$((i + 1))
    if nodes_json=$(fetch_nodes) && printf '%s' "$nodes_json" | jq -e '.items | type == "array"' >/dev/null 2>&1; then
        break
    fi
    [ "$i" -lt "$RETRIES" ] || die "could not list the nodes from the Kubernetes API after $i attempts"
    log "could not list the nodes (attempt $i of $RETRIES); retrying in 2 s"
    sleep 2
done

node_lines=$(printf '%s' "$nodes_json" | jq -r "$NODE_FILTER")
count=0
peers=
for_each_node() {
    # $1 name, $2 IP
    count=$((count + 1))
    if [ "$1" = "$NODE_NAME" ] || [ "$2" = "$HOST_IP" ]; then
        return
    fi
    peers="$peers $2"
}
# Here-document, not a pipe: the loop must run in this shell to keep count and peers.
while read -r name ip; do
    [ -n "$name" ] && for_each_node "$name" "$ip"
done <<EOF
$node_lines
EOF
[ "$count" -ge 1 ] || count=1 # the API listed no usable node: this node alone

log "node ${NODE_NAME:-?} ($HOST_IP): $count node(s), peers:${peers:- none}"

# Arguments the user gave win over ours (clap refuses an option given twice).
user_init=false user_nick=false
for a in "$@"; do
    case $a in
        --ipalloc-init | --ipalloc-init=*) user_init=true ;;
        --nickname | --nickname=*) user_nick=true ;;
    esac
done

# Build the command: the peers first (word splitting of $peers is wanted: IPs only).
# shellcheck disable=SC2086
set -- router $peers "$@"
if ! $user_init; then
    set -- "$@" --ipalloc-init "consensus=$count"
fi
if [ -n "$NODE_NAME" ] && ! $user_nick; then
    set -- "$@" --nickname "$NODE_NAME"
fi
if [ -n "$PASSWORD_FILE" ]; then
    [ -r "$PASSWORD_FILE" ] || die "password file $PASSWORD_FILE is not readable (create the weft-password Secret: kubectl -n kube-system create secret generic weft-password --from-literal=password=\"\$(weft secret)\"; or set WEFT_PASSWORD_FILE= to run unencrypted)"
    set -- "$@" --password-file "$PASSWORD_FILE"
else
    log "WEFT_PASSWORD_FILE is empty: running WITHOUT encryption"
fi

if [ "${WEFT_DRY_RUN:-}" = 1 ]; then
    printf '%s\n' weft "$@"
    exit 0
fi
exec weft "$@"
