#!/usr/bin/env bash
# DNS queries per second: dnsperf against weft's DNS server and against dnsmasq serving the same
# names, in one run, on loopback. The two servers take turns (ROUNDS rounds of T seconds each) so
# drifts in machine load hit both alike; the figure per server is the median of its rounds.
#
# Names (zone weft.local): NAMES single-address names n0..n{NAMES-1} (10.32.x.y), one name `web` with
# three addresses, one name `v6` with an IPv6 address. Queries, cycled by dnsperf: A for four names,
# A for `web` (three answers), AAAA for `v6`, PTR for one address, and one name that does not exist
# (NXDOMAIN): 8 queries, 1 in 8 negative.
#
# Usage: bench/dns-qps.sh [--quick]
#   --quick   T=2, ROUNDS=1
# Environment:
#   T          seconds per dnsperf run (default 5)
#   ROUNDS     rounds (default 3)
#   NAMES      single-address names (default 1000)
#   CLIENTS, THREADS, OUTSTANDING   dnsperf -c, -T, -q (default 4, 2, 200, as in the lab reference)
#   WEFT_THREADS   worker threads of weft's server (default 2 = the cores of this machine)
#   SERVE_BIN  weft's standalone server (default <repo>/target/release/examples/serve, built if missing)
#   PORT_WEFT, PORT_DNSMASQ   loopback ports (default 5391, 5392)
#
# Output: per round and server the rate and response codes, then a summary and a JSON line.
# Needs dnsperf and dnsmasq (Debian: dnsperf dnsmasq-base). No root needed. Traffic stays on
# 127.0.0.1; both servers are started here, stopped by PID on exit (also on failure or ^C),
# and forward nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${T:-5}
ROUNDS=${ROUNDS:-3}
while [ $# -gt 0 ]; do
  case $1 in
    --quick) T=2; ROUNDS=1 ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
NAMES=${NAMES:-1000}
CLIENTS=${CLIENTS:-4}
THREADS=${THREADS:-2}
OUTSTANDING=${OUTSTANDING:-200}
WEFT_THREADS=${WEFT_THREADS:-2}
PORT_WEFT=${PORT_WEFT:-5391}
PORT_DNSMASQ=${PORT_DNSMASQ:-5392}

die() { echo "dns-qps: $*" >&2; exit 1; }
command -v dnsperf >/dev/null || die "dnsperf is required (apt-get install --no-install-recommends dnsperf)"
DNSMASQ=$(command -v dnsmasq || true)
[ -n "$DNSMASQ" ] || DNSMASQ=/usr/sbin/dnsmasq
[ -x "$DNSMASQ" ] || die "dnsmasq is required (apt-get install --no-install-recommends dnsmasq-base)"
[ "$NAMES" -ge 4 ] && [ "$NAMES" -le 60000 ] || die "NAMES must be between 4 and 60000"

if [ -z "${SERVE_BIN:-}" ]; then
  SERVE_BIN=$ROOT/target/release/examples/serve
  if [ ! -x "$SERVE_BIN" ]; then
    echo "building weft-dns's serve example (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p weft-dns --example serve) || die "build failed"
  fi
fi
[ -x "$SERVE_BIN" ] || die "$SERVE_BIN is missing"

W=$(mktemp -d /tmp/dns-qps.XXXXXX)
chmod 755 "$W"  # dnsmasq drops root and must read its hosts file
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT INT TERM

# The same names for both: a names file for weft, a hosts file for dnsmasq.
addr() { echo "10.32.$(( $1 / 250 )).$(( $1 % 250 + 1 ))"; }
{
  for i in $(seq 0 $((NAMES - 1))); do echo "n$i $(addr "$i")"; done
  echo "web 10.33.0.1"; echo "web 10.33.0.2"; echo "web 10.33.0.3"
  echo "v6 fd00::6"
} > "$W/names"
awk '{print $2, $1 ".weft.local"}' "$W/names" > "$W/hosts"
{
  echo "n0.weft.local A"
  echo "n$((NAMES / 3)).weft.local A"
  echo "n$((NAMES / 2)).weft.local A"
  echo "n$((NAMES - 1)).weft.local A"
  echo "web.weft.local A"
  echo "v6.weft.local AAAA"
  echo "$(addr 1 | awk -F. '{print $4"."$3"."$2"."$1}').in-addr.arpa PTR"
  echo "nosuchname.weft.local A"
} > "$W/queries"

WEFT_ARGS=(--listen "127.0.0.1:$PORT_WEFT" --names-file "$W/names" --reverse 10.32.0.0/12 --threads "$WEFT_THREADS")
DNSMASQ_ARGS=(--keep-in-foreground --port="$PORT_DNSMASQ" --listen-address=127.0.0.1 --bind-interfaces
  --no-resolv --no-hosts --addn-hosts="$W/hosts" --pid-file="$W/dnsmasq.pid" --log-facility="$W/dnsmasq.log"
  --cache-size=1000 --local=/weft.local/ --local=/32.10.in-addr.arpa/ --local=/33.10.in-addr.arpa/)

wait_port() { # PORT PID NAME: until the server answers (5 s at most)
  for _ in $(seq 50); do
    kill -0 "$2" 2>/dev/null || die "$3 exited at start (see above)"
    # (Captured first: with pipefail, grep -q closing the pipe early would fail the test.)
    local o; o=$(dnsperf -s 127.0.0.1 -p "$1" -d <(echo "n0.weft.local A") -n 1 -t 1 2>/dev/null || true)
    if [[ $o == *"NOERROR 1 "* ]]; then return; fi
    sleep 0.1
  done
  die "$3 did not answer on 127.0.0.1:$1"
}

# Starts one server, runs dnsperf, stops it. Prints "QPS|codes".
run_one() {
  local which=$1 port pid out
  if [ "$which" = weft ]; then
    port=$PORT_WEFT
    "$SERVE_BIN" "${WEFT_ARGS[@]}" 2> "$W/weft.log" & pid=$!
  else
    port=$PORT_DNSMASQ
    "$DNSMASQ" "${DNSMASQ_ARGS[@]}" & pid=$!
  fi
  PIDS+=("$pid")
  wait_port "$port" "$pid" "$which"
  out=$(dnsperf -s 127.0.0.1 -p "$port" -d "$W/queries" -l "$T" -c "$CLIENTS" -T "$THREADS" -q "$OUTSTANDING" 2>&1) || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local qps codes lost
  qps=$(awk '/Queries per second/ {printf "%d", $4}' <<<"$out")
  codes=$(awk -F': *' '/Response codes/ {print $2}' <<<"$out")
  lost=$(awk '/Queries lost/ {print $3, $4}' <<<"$out")
  [ -n "$qps" ] || { echo "$out" >&2; die "dnsperf against $which gave no figure"; }
  echo "$qps|$codes|lost $lost"
}

# Check both answer the same before measuring.
check() { # PORT: one line per query, answers sorted
  while read -r q t; do
    dnsperf -s 127.0.0.1 -p "$1" -d <(echo "$q $t") -n 1 -t 1 2>/dev/null | awk -F': *' '/Response codes/ {print $2}'
  done < "$W/queries"
}
"$SERVE_BIN" "${WEFT_ARGS[@]}" 2> "$W/weft.log" & p1=$!; PIDS+=("$p1")
"$DNSMASQ" "${DNSMASQ_ARGS[@]}" & p2=$!; PIDS+=("$p2")
wait_port "$PORT_WEFT" "$p1" weft; wait_port "$PORT_DNSMASQ" "$p2" dnsmasq
if [ "$(check "$PORT_WEFT")" != "$(check "$PORT_DNSMASQ")" ]; then
  paste <(check "$PORT_WEFT") <(check "$PORT_DNSMASQ") >&2
  die "weft and dnsmasq do not give the same response codes"
fi
kill "$p1" "$p2"; wait "$p1" "$p2" 2>/dev/null || true

echo "dnsperf -c $CLIENTS -T $THREADS -q $OUTSTANDING -l $T, $((NAMES + 2)) names, $(wc -l < "$W/queries") queries cycled, $ROUNDS rounds, $(nproc) cores"
declare -a QW QD
for r in $(seq "$ROUNDS"); do
  for which in weft dnsmasq; do
    res=$(run_one "$which")
    printf '  round %d  %-8s %8s q/s   %s\n' "$r" "$which" "${res%%|*}" "$(cut -d'|' -f2- <<<"$res" | tr '|' ' ')"
    if [ "$which" = weft ]; then QW+=("${res%%|*}"); else QD+=("${res%%|*}"); fi
  done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
MW=$(median "${QW[@]}"); MD=$(median "${QD[@]}")
RATIO=$(awk -v a="$MW" -v b="$MD" 'BEGIN {printf "%.2f", a / b}')
echo "weft DNS ($WEFT_THREADS threads)  median $MW queries/s"
echo "dnsmasq $("$DNSMASQ" --version | head -1 | awk '{print $3}')          median $MD queries/s"
echo "ratio weft/dnsmasq $RATIO"
printf '{"bench":"dns-qps","t":%s,"rounds":%s,"names":%s,"weft_threads":%s,"weft_qps":%s,"dnsmasq_qps":%s,"ratio":%s}\n' \
  "$T" "$ROUNDS" "$((NAMES + 2))" "$WEFT_THREADS" "$MW" "$MD" "$RATIO"
