#!/bin/sh
# Tests weft-entrypoint.sh without a cluster: a sample /api/v1/nodes answer with 3 nodes, served
# from a file and from a local HTTPS server on 127.0.0.1 (self-signed CA, bearer token), with
# WEFT_DRY_RUN=1 so the script prints the weft command instead of running it.
# Needs: sh, jq, curl, python3, openssl. Usage: sh docs/kubernetes/test-entrypoint.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
ep="$here/weft-entrypoint.sh"
tmp=$(mktemp -d)
server_pid=
cleanup() {
    [ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
fails=0
ok() { echo "ok   $1"; }
bad() { echo "FAIL $1"; fails=$((fails + 1)); }
# expect NAME WANT GOT
expect() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1"; printf '  want: %s\n  got:  %s\n' "$2" "$3"; fi; }

# Three nodes. worker-1 is "us"; it lists an IPv6 InternalIP first (dual stack). cp-1 has an
# ExternalIP and a Hostname too. A fourth node has no IPv4 InternalIP and is not counted.
cat >"$tmp/nodes.json" <<'EOF'
{"kind":"NodeList","apiVersion":"v1","items":[
 {"metadata":{"name":"cp-1"},"status":{"addresses":[
   {"type":"ExternalIP","address":"203.0.113.7"},
   {"type":"InternalIP","address":"192.168.56.10"},
   {"type":"Hostname","address":"cp-1"}]}},
 {"metadata":{"name":"worker-1"},"status":{"addresses":[
   {"type":"InternalIP","address":"fd00::11"},
   {"type":"InternalIP","address":"192.168.56.11"},
   {"type":"Hostname","address":"worker-1"}]}},
 {"metadata":{"name":"worker-2"},"status":{"addresses":[
   {"type":"InternalIP","address":"192.168.56.12"},
   {"type":"Hostname","address":"worker-2"}]}},
 {"metadata":{"name":"v6-only"},"status":{"addresses":[
   {"type":"InternalIP","address":"fd00::99"}]}}
]}
EOF
echo secret >"$tmp/password"

run() { # prints the command the entrypoint would run, one argument a line, joined by spaces
    env WEFT_DRY_RUN=1 WEFT_PASSWORD_FILE="$tmp/password" "$@" sh "$ep" 2>"$tmp/stderr" | tr '\n' ' ' | sed 's/ $//'
}

want="weft router 192.168.56.10 192.168.56.12 --ipalloc-init consensus=3 --nickname worker-1 --password-file $tmp/password"
expect "3 nodes from a file: drops itself, consensus=3" "$want" \
    "$(run WEFT_NODES_JSON_FILE="$tmp/nodes.json" HOST_IP=192.168.56.11 NODE_NAME=worker-1)"
expect "itself dropped by IP alone (NODE_NAME unset)" \
    "weft router 192.168.56.10 192.168.56.12 --ipalloc-init consensus=3 --password-file $tmp/password" \
    "$(run WEFT_NODES_JSON_FILE="$tmp/nodes.json" HOST_IP=192.168.56.11)"
expect "itself dropped by name alone (hostIP differs)" "$want" \
    "$(run WEFT_NODES_JSON_FILE="$tmp/nodes.json" HOST_IP=10.9.9.9 NODE_NAME=worker-1)"

got=$(env WEFT_DRY_RUN=1 WEFT_PASSWORD_FILE="$tmp/password" WEFT_NODES_JSON_FILE="$tmp/nodes.json" \
    HOST_IP=192.168.56.11 NODE_NAME=worker-1 sh "$ep" --ipalloc-init=observer --mtu 1376 2>/dev/null | tr '\n' ' ' | sed 's/ $//')
expect "user args passed on; their --ipalloc-init wins" \
    "weft router 192.168.56.10 192.168.56.12 --ipalloc-init=observer --mtu 1376 --nickname worker-1 --password-file $tmp/password" "$got"

got=$(env WEFT_DRY_RUN=1 WEFT_PASSWORD_FILE= WEFT_NODES_JSON_FILE="$tmp/nodes.json" HOST_IP=192.168.56.11 \
    NODE_NAME=worker-1 sh "$ep" 2>"$tmp/stderr" | tr '\n' ' ' | sed 's/ $//')
expect "WEFT_PASSWORD_FILE= runs without a password" \
    "weft router 192.168.56.10 192.168.56.12 --ipalloc-init consensus=3 --nickname worker-1" "$got"
if grep -q 'WITHOUT encryption' "$tmp/stderr"; then ok "... and says so"; else bad "... and says so"; fi

echo '{"kind":"NodeList","items":[]}' >"$tmp/empty.json"
expect "empty node list: consensus=1, no peers" \
    "weft router --ipalloc-init consensus=1 --nickname solo --password-file $tmp/password" \
    "$(run WEFT_NODES_JSON_FILE="$tmp/empty.json" HOST_IP=192.168.56.11 NODE_NAME=solo)"

if env WEFT_DRY_RUN=1 WEFT_PASSWORD_FILE="$tmp/missing" WEFT_NODES_JSON_FILE="$tmp/nodes.json" \
    HOST_IP=192.168.56.11 sh "$ep" >/dev/null 2>&1; then bad "missing password file fails"; else ok "missing password file fails"; fi
if env WEFT_DRY_RUN=1 WEFT_NODES_JSON_FILE="$tmp/nodes.json" HOST_IP= sh "$ep" >/dev/null 2>&1; then
    bad "missing HOST_IP fails"; else ok "missing HOST_IP fails"; fi

# The real API path: curl with --cacert and a bearer token against an HTTPS server on 127.0.0.1.
sa="$tmp/sa"
mkdir "$sa"
echo test-token >"$sa/token"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=weft-test \
    -addext "subjectAltName=IP:127.0.0.1" -keyout "$tmp/key.pem" -out "$sa/ca.crt" 2>/dev/null
cat >"$tmp/server.py" <<'EOF'
import http.server, ssl, sys
nodes, cert, key, portfile = sys.argv[1:5]
body = open(nodes, "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/api/v1/nodes" or self.headers.get("Authorization") != "Bearer test-token":
            self.send_response(403); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
open(portfile, "w").write(str(s.server_port))
s.serve_forever()
EOF
python3 "$tmp/server.py" "$tmp/nodes.json" "$sa/ca.crt" "$tmp/key.pem" "$tmp/port" &
server_pid=$!
i=0
while [ ! -s "$tmp/port" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
port=$(cat "$tmp/port")
expect "3 nodes from the API over HTTPS with the token" "$want" \
    "$(run WEFT_SA_DIR="$sa" KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT="$port" \
        HOST_IP=192.168.56.11 NODE_NAME=worker-1)"
echo wrong-token >"$sa/token"
if env WEFT_DRY_RUN=1 WEFT_API_RETRIES=2 WEFT_SA_DIR="$sa" KUBERNETES_SERVICE_HOST=127.0.0.1 \
    KUBERNETES_SERVICE_PORT="$port" HOST_IP=192.168.56.11 WEFT_PASSWORD_FILE="$tmp/password" \
    sh "$ep" >/dev/null 2>"$tmp/stderr"; then
    bad "API refusing the token: fails after the retries"
else
    if grep -q 'after 2 attempts' "$tmp/stderr"; then ok "API refusing the token: fails after the retries"
    else bad "API refusing the token: fails after the retries"; cat "$tmp/stderr"; fi
fi

if [ "$fails" -ne 0 ]; then echo "$fails failed"; exit 1; fi
echo "all passed"
