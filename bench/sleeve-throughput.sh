#!/usr/bin/env bash
# Sleeve throughput benchmark: iperf3 TCP (1 stream) between two "container" network namespaces,
# each behind its own "host" namespace, the two hosts joined by a veth underlay (MTU 1500).
#
# Cases, each on fresh namespaces that are torn down afterwards:
#   weft-enc    weft sleeve with a password (encrypted); containers joined with `weft attach`
#   weft-plain  weft sleeve without a password (plaintext), for reference
#   vxlan       kernel VXLAN + bridge (the ceiling)
#   tinc-*      tinc 1.0 in switch mode (TAP on a bridge), one row per cipher in TINC_CIPHERS
#
# Usage: sudo bench/sleeve-throughput.sh [--quick] [--reverse] [--only CASE[,CASE...]]
#   --quick     T=3 instead of 5
#   --reverse   also run each weft case with iperf3 -R (reverse direction on the same setup)
#   --only      run only these cases (weft-enc, weft-plain, vxlan, tinc)
# Environment:
#   T             seconds per iperf3 run (default 5)
#   WEFT_BIN      weft binary (default <repo>/target/release/weft, built with cargo if missing)
#   TINC_CIPHERS  space-separated CIPHER:DIGEST rows for tinc ("default" = tinc's blowfish/sha1);
#                 default "default aes-256-cbc:sha256"
#   TINC_CMTU     container MTU behind tinc (default 1400, so frames fit tinc's UDP path; at 1500 tinc 1.0
#                 carries most oversized frames over its TCP meta connection instead).
#                 Note: tinc 1.0 accepts Cipher=aes-256-gcm and pings work, but its UDP data path stays
#                 unused (1 UDP datagram seen per side): everything goes over the TCP meta connection,
#                 so such a row is not a GCM data-path figure (see the UdpInDatagrams/TcpInSegs line).
#   WEFT_ROUTER_ARGS  extra `weft router` options for both weft cases (e.g. "--no-offload"), for experiments
#   WEFT_BASELINE_BIN another weft binary (e.g. one built from an older commit): each weft case also runs
#                 with it, as base-enc / base-plain, right after the same case with WEFT_BIN, and the summary
#                 gives weft/base ratios: a before/after comparison in one run
#   ROUNDS        repeat the weft (and baseline) cases this many times, alternating; figures are medians
#   KEEP_LOGS=1   keep the work directory (router logs) instead of deleting it
#
# Output: one line per case (Gbit/s received, TCP retransmits, whole-VM CPU busy %, per-daemon CPU),
# a summary with ratios, and a final JSON line for scripts.
#
# Traffic only flows between namespaces this script creates (and their loopbacks). Every process it
# starts is stopped by PID and every namespace it creates is deleted on exit, also on failure or ^C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${T:-5}
REVERSE=0
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) T=3 ;;
    --reverse) REVERSE=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
TINC_CIPHERS=${TINC_CIPHERS:-"default aes-256-cbc:sha256"}
BASE_BIN=${WEFT_BASELINE_BIN:-}
ROUNDS=${ROUNDS:-1}
TINC_CMTU=${TINC_CMTU:-1400}

die() { echo "sleeve-throughput: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
for tool in ip nsenter iperf3 jq nstat tincd awk; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

if [ -z "${WEFT_BIN:-}" ]; then
  WEFT_BIN=$ROOT/target/release/weft
  if [ ! -x "$WEFT_BIN" ] && { want weft-enc || want weft-plain; }; then
    echo "building weft (cargo build --release -p weft)..." >&2
    (cd "$ROOT" && cargo build --release -p weft) >&2
  fi
fi
if want weft-enc || want weft-plain; then
  [ -x "$WEFT_BIN" ] || die "weft binary $WEFT_BIN not found"
fi
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "baseline weft binary $BASE_BIN not found"

# ---------------------------------------------------------------- resources and cleanup
P=wsb$$                        # prefix of every namespace this run creates
WORK=$(mktemp -d /tmp/weft-bench.XXXXXX)
PIDS=()                        # processes started by the current case
NSS=()                         # namespaces created by the current case
CLK_TCK=$(getconf CLK_TCK)

stop_pids() {
  local p alive k
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for k in $(seq 30); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
teardown() {
  stop_pids
  local n
  for n in "${NSS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  NSS=()
}
cleanup() {
  local rc=$?
  trap '' INT TERM
  teardown
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nsx() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }
mkns() { ip netns add "$1"; NSS+=("$1"); ip -n "$1" link set lo up; }
bg() { "$@" & PIDS+=($!); }    # start in the background and remember the PID

# Two hosts joined by a veth underlay (MTU 1500) plus two container namespaces (not wired yet).
# Sets H1 H2 C1 C2.
mk_topology() {
  local tag=$1
  H1=$P$tag-h1; H2=$P$tag-h2; C1=$P$tag-c1; C2=$P$tag-c2
  local n; for n in "$H1" "$H2" "$C1" "$C2"; do mkns "$n"; done
  ip link add u1 netns "$H1" mtu 1500 type veth peer name u2 netns "$H2" mtu 1500
  ip -n "$H1" addr add 192.168.50.1/24 dev u1; ip -n "$H2" addr add 192.168.50.2/24 dev u2
  ip -n "$H1" link set u1 up; ip -n "$H2" link set u2 up
}
# veth from host $1 (bridge $2) to container $3 named eth0 with MTU $4 and address $5
wire_container() {
  local h=$1 br=$2 c=$3 mtu=$4 addr=$5 v=ve${3: -1}
  ip link add "$v" netns "$h" type veth peer name eth0 netns "$c"
  ip -n "$h" link set "$v" master "$br"; ip -n "$h" link set "$v" up
  ip -n "$c" link set eth0 mtu "$mtu" up; ip -n "$c" addr add "$addr" dev eth0
}
wait_ping() {  # <ns> <ip> [tries]
  local k
  for k in $(seq "${3:-40}"); do
    nsx "$1" ping -c1 -W1 "$2" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  return 1
}

# ---------------------------------------------------------------- measuring
cpu_snap() { awk '/^cpu /{b=$2+$3+$4+$7+$8+$9; print b, b+$5+$6}' /proc/stat; }
# task_snap LABEL:PID... -> lines "label tid comm ticks" for every thread of each process
task_snap() {
  local e label pid f line
  for e in "$@"; do
    label=${e%%:*}; pid=${e#*:}
    for f in /proc/"$pid"/task/*/stat; do
      { read -r line <"$f"; } 2>/dev/null || continue
      # comm may hold spaces: split around the last ')'
      local head=${line%%)*} rest=${line##*) }
      # shellcheck disable=SC2086
      set -- $rest
      local comm=${head#*(}
      echo "$label ${head%% *} ${comm// /_} $(( ${12} + ${13} ))"
    done
  done
}
# per-label CPU % of one core between two task snapshots over $3 seconds, with busy threads listed
task_report() {
  awk -v secs="$3" -v hz="$CLK_TCK" '
    NR==FNR { b[$1" "$2]=$4; next }
    { d=$4-b[$1" "$2]; tot[$1]+=d; if (!($1 in order)) { order[$1]=++n; lab[n]=$1 }
      if (d > 0) th[$1]=th[$1] sprintf("%s%s %.0f%%", (th[$1]==""?"":", "), $3, 100*d/hz/secs) }
    END { for (i=1;i<=n;i++) { l=lab[i]; printf "%s%s %.0f%% [%s]", (i>1?"; ":""), l, 100*tot[l]/hz/secs, th[l] } }
  ' "$1" "$2"
}

# run_iperf <server-ns> <client-ns> <server-ip> <case> [extra client args]
# CPU is sampled over the middle of the transfer (0.3 s after the start until ~0.7 s before the end):
# whole-VM busy %, and per thread of every "label:pid" in WATCH plus the two iperf3 processes.
# Sets G_GBPS G_RETR G_CPU G_PROCS.
WATCH=()
run_iperf() {
  local sns=$1 cns=$2 ip=$3 name=$4; shift 4
  nsenter --net="/run/netns/$sns" iperf3 -s -1 -p 5201 >"$WORK/$name.iperf-s.log" 2>&1 &
  local spid=$!; PIDS+=($spid)
  local k; for k in $(seq 40); do
    nsx "$sns" ss -Hltn 'sport = :5201' 2>/dev/null | grep -q . && break; sleep 0.1
  done
  local b0 t0 b1 t1 s0 s1
  nsenter --net="/run/netns/$cns" iperf3 -c "$ip" -p 5201 -t "$T" -J "$@" >"$WORK/$name.json" 2>&1 &
  local cpid=$!; PIDS+=($cpid)
  sleep 0.3
  read -r b0 t0 < <(cpu_snap); s0=$(date +%s.%N)
  task_snap "iperf-s:$spid" "iperf-c:$cpid" "${WATCH[@]}" >"$WORK/$name.ts0"
  sleep "$(awk -v t="$T" 'BEGIN{print (t>2 ? t-1 : t/2)}')"
  task_snap "iperf-s:$spid" "iperf-c:$cpid" "${WATCH[@]}" >"$WORK/$name.ts1"
  read -r b1 t1 < <(cpu_snap); s1=$(date +%s.%N)
  for k in $(seq $((10 * (T + 20)))); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$cpid" 2>/dev/null || true          # only if it hung
  wait "$cpid" 2>/dev/null || true
  for k in $(seq 50); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  G_CPU=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN{printf "%.0f", (t>0?100*b/t:0)}')
  G_PROCS=$(task_report "$WORK/$name.ts0" "$WORK/$name.ts1" "$(awk -v a="$s0" -v b="$s1" 'BEGIN{print b-a}')")
  if jq -e '.end.sum_received.bits_per_second' "$WORK/$name.json" >/dev/null 2>&1; then
    G_GBPS=$(jq -r '.end.sum_received.bits_per_second/1e9*100|round/100' "$WORK/$name.json")
    G_RETR=$(jq -r '.end.sum_sent.retransmits // "n/a"' "$WORK/$name.json")
  else
    G_GBPS=0; G_RETR=n/a
    echo "   iperf3 failed: $(jq -r '.error // empty' "$WORK/$name.json" 2>/dev/null || head -c 300 "$WORK/$name.json")" >&2
  fi
}

declare -A GBPS RETR CPU EXTRA
ORDER=()
record() {  # <case> ; from G_*
  GBPS[$1]=$G_GBPS; RETR[$1]=$G_RETR; CPU[$1]=$G_CPU; ORDER+=("$1")
  printf '%-22s %6s Gbit/s  retrans=%-6s VM CPU busy=%3s%% (of 2 vCPUs)\n' "$1" "$G_GBPS" "$G_RETR" "$G_CPU"
  printf '%-22s   per process (%% of one core): %s\n' "" "$G_PROCS"
}
failed() {  # <case> <why>
  GBPS[$1]=0; RETR[$1]=n/a; CPU[$1]=0; ORDER+=("$1")
  printf '%-22s FAILED: %s\n' "$1" "$2"
}
udp_counters() {  # <ns> -> underlay counters "UdpInDatagrams=N ... TcpInSegs=N" (namespace is fresh: since its creation)
  nsx "$1" nstat -saz UdpInDatagrams UdpRcvbufErrors UdpSndbufErrors UdpInErrors TcpInSegs 2>/dev/null | awk 'NR>1{printf "%s=%s ", $1, $2}'
}
metrics() {  # <ns> -> Prometheus text from the router's metrics endpoint on that namespace's loopback
  nsx "$1" python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:6782/metrics", timeout=3).read().decode())' 2>/dev/null || true
}

# ---------------------------------------------------------------- cases
case_weft() {  # <case-name> <password or empty> [weft binary]
  local name=$1 pw=$2 i
  local WEFT_BIN=${3:-$WEFT_BIN}
  mk_topology "$([ -n "$pw" ] && echo e || echo p)"
  local hs=("$H1" "$H2")
  for i in 1 2; do
    local h=${hs[$((i - 1))]} d=$WORK/$name-h$i
    mkdir -p "$d"
    local args=(--api-socket "$d/api.sock" router --state-dir "$d/state" --nickname "h$i")
    [ -n "$pw" ] && args+=(--password "$pw")
    # shellcheck disable=SC2206
    args+=(${WEFT_ROUTER_ARGS:-})
    [ "$i" = 2 ] && args+=(192.168.50.1)
    RUST_LOG=${RUST_LOG:-info} nsenter --net="/run/netns/$h" "$WEFT_BIN" "${args[@]}" \
      </dev/null >"$d/router.log" 2>&1 &
    PIDS+=($!); eval "R$i=$!"
  done
  local s1=$WORK/$name-h1/api.sock s2=$WORK/$name-h2/api.sock k n=0
  for k in $(seq 100); do
    n=$(nsx "$H1" "$WEFT_BIN" --api-socket "$s1" status --json 2>/dev/null \
        | jq '[.connections[]? | select(.state=="established")] | length' 2>/dev/null || echo 0)
    [ "${n:-0}" -ge 1 ] && break
    sleep 0.2
  done
  if [ "${n:-0}" -lt 1 ]; then
    failed "$name" "no established connection after 20 s; router log tail: $(tail -3 "$WORK/$name-h1/router.log" | tr '\n' ' ')"
    teardown; return 0
  fi
  nsx "$H1" "$WEFT_BIN" --api-socket "$s1" attach "$C1" 10.99.0.1/24 >/dev/null
  nsx "$H2" "$WEFT_BIN" --api-socket "$s2" attach "$C2" 10.99.0.2/24 >/dev/null
  if ! wait_ping "$C1" 10.99.0.2; then
    failed "$name" "containers cannot ping each other"; teardown; return 0
  fi
  WATCH=("weft-h1:$R1" "weft-h2:$R2")
  run_iperf "$C2" "$C1" 10.99.0.2 "$name"
  record "$name"
  local st; st=$(nsx "$H1" "$WEFT_BIN" --api-socket "$s1" status --json)
  echo "$(printf '%-22s' '')   sleeve: $(echo "$st" | jq -c '.sleeve') container mtu=$(ip -n "$C1" -j link show ethwe | jq ".[0].mtu")"
  echo "$(printf '%-22s' '')   UDP h1(sender): $(udp_counters "$H1")| h2(receiver): $(udp_counters "$H2")"
  EXTRA[$name.rcvbuf]=$(nsx "$H2" nstat -saz UdpRcvbufErrors 2>/dev/null | awk 'NR>1{print $2}')
  local m; for i in 1 2; do
    local h=${hs[$((i - 1))]}
    m=$(metrics "$h")
    echo "$(printf '%-22s' '')   metrics h$i: $(echo "$m" | awk '/^weft_(frames|datagrams)_total|^weft_drops_total|^weft_sleeve_rekeys_total/ && $NF != 0 {sub(/_total/,""); printf "%s=%s ", $1, $2}')"
  done
  if [ "$REVERSE" = 1 ]; then
    local before; before=$(nsx "$H1" nstat -saz UdpRcvbufErrors 2>/dev/null | awk 'NR>1{print $2}')
    run_iperf "$C2" "$C1" 10.99.0.2 "$name-R" -R
    record "$name (-R)"
    echo "$(printf '%-22s' '')   UDP h1(receiver now) UdpRcvbufErrors +$(( $(nsx "$H1" nstat -saz UdpRcvbufErrors | awk 'NR>1{print $2}') - before ))"
  fi
  WATCH=()
  teardown
}

case_vxlan() {
  local i
  mk_topology x
  local hs=("$H1" "$H2") cs=("$C1" "$C2")
  for i in 1 2; do
    local h=${hs[$((i - 1))]}
    ip -n "$h" link add vx0 type vxlan id 42 local 192.168.50.$i remote 192.168.50.$((3 - i)) dstport 4789 dev u$i
    ip -n "$h" link add br0 type bridge
    ip -n "$h" link set vx0 master br0
    ip -n "$h" link set vx0 up; ip -n "$h" link set br0 up
    wire_container "$h" br0 "${cs[$((i - 1))]}" 1450 10.20.0.$i/24   # 1500 - 50 bytes of VXLAN
  done
  if ! wait_ping "$C1" 10.20.0.2; then failed vxlan "containers cannot ping each other"; teardown; return 0; fi
  WATCH=()
  run_iperf "$C2" "$C1" 10.20.0.2 vxlan
  record vxlan
  teardown
}

case_tinc() {  # <case-name> <cipher|default> <digest|default>
  local name=$1 cipher=$2 digest=$3 i
  mk_topology t
  local hs=("$H1" "$H2") cs=("$C1" "$C2") d
  for i in 1 2; do
    d=$WORK/$name-n$i; mkdir -p "$d/hosts"
    {
      echo "Name = n$i"; echo "Mode = switch"; echo "AddressFamily = ipv4"
      echo "Interface = tap$i"; echo "DeviceType = tap"; echo "Device = /dev/net/tun"
      [ "$i" = 1 ] && echo "ConnectTo = n2"
      true
    } >"$d/tinc.conf"
    {
      echo "Address = 192.168.50.$i"; echo "Port = 655"
      [ "$cipher" != default ] && echo "Cipher = $cipher"
      [ "$digest" != default ] && echo "Digest = $digest"
      true
    } >"$d/hosts/n$i"
    printf '#!/bin/sh\nip link set "$INTERFACE" master br0\nip link set "$INTERFACE" up\n' >"$d/tinc-up"
    chmod +x "$d/tinc-up"
    tincd -c "$d" -K2048 </dev/null >/dev/null 2>&1     # appends the public key to hosts/n$i
    local h=${hs[$((i - 1))]}
    ip -n "$h" link add br0 type bridge; ip -n "$h" link set br0 up
    wire_container "$h" br0 "${cs[$((i - 1))]}" "$TINC_CMTU" 10.20.0.$i/24
  done
  cp "$WORK/$name-n1/hosts/n1" "$WORK/$name-n2/hosts/"; cp "$WORK/$name-n2/hosts/n2" "$WORK/$name-n1/hosts/"
  for i in 2 1; do
    d=$WORK/$name-n$i
    nsenter --net="/run/netns/${hs[$((i - 1))]}" tincd -c "$d" -D --pidfile="$d/pid" --logfile="$d/log" -d1 \
      </dev/null >/dev/null 2>&1 &
    PIDS+=($!); eval "R$i=$!"
    sleep 0.3
  done
  if ! wait_ping "$C1" 10.20.0.2 60; then
    failed "$name" "containers cannot ping each other (cipher $cipher unusable in tinc 1.0?)"; teardown; return 0
  fi
  WATCH=("tinc-h1:$R1" "tinc-h2:$R2")
  run_iperf "$C2" "$C1" 10.20.0.2 "$name"
  record "$name"
  echo "$(printf '%-22s' '')   UDP h1: $(udp_counters "$H1")| h2: $(udp_counters "$H2")"
  WATCH=()
  teardown
}

# ---------------------------------------------------------------- run
echo "sleeve throughput: iperf3 TCP, 1 stream, ${T}s per case; $(nproc) CPUs; kernel $(uname -r)"
[ -x "${WEFT_BIN:-}" ] && echo "weft: $WEFT_BIN ($("$WEFT_BIN" --version 2>/dev/null || echo '?'))${WEFT_ROUTER_ARGS:+ router args: $WEFT_ROUTER_ARGS}"
read -r lb0 lt0 < <(cpu_snap); sleep 1; read -r lb1 lt1 < <(cpu_snap)
idle_busy=$(awk -v b=$((lb1 - lb0)) -v t=$((lt1 - lt0)) 'BEGIN{printf "%.0f", (t>0?100*b/t:0)}')
echo "machine busy before the run: ${idle_busy}% of all CPUs (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
[ "$idle_busy" -gt 15 ] && echo "WARNING: other work is using the CPUs; figures will be low and noisy" >&2
PASSWORD=bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
# One round: each weft case, and its baseline right beside it; the two swap places every other
# round, so neither always runs on a machine that has just warmed up.
weft_round() {  # <suffix> <baseline first: 0|1>
  local m pw
  for m in enc plain; do
    want "weft-$m" || continue
    pw=""; [ "$m" = enc ] && pw=$PASSWORD
    if [ -n "$BASE_BIN" ] && [ "$2" = 1 ]; then case_weft "base-$m$1" "$pw" "$BASE_BIN"; fi
    case_weft "weft-$m$1" "$pw"
    if [ -n "$BASE_BIN" ] && [ "$2" = 0 ]; then case_weft "base-$m$1" "$pw" "$BASE_BIN"; fi
  done
}
for r in $(seq "$ROUNDS"); do
  sfx=""; [ "$ROUNDS" -gt 1 ] && sfx="#$r"
  weft_round "$sfx" $(( (r + 1) % 2 ))
done
# With several rounds, each case's figure is the median of its rounds.
if [ "$ROUNDS" -gt 1 ]; then
  for c in weft-enc base-enc weft-plain base-plain; do
    vals=$(for k in "${ORDER[@]}"; do if [[ $k == "$c#"* ]]; then echo "${GBPS[$k]}"; fi; done)
    [ -n "$vals" ] || continue
    GBPS[$c]=$(echo "$vals" | sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')
    echo "$(printf '%-22s' "$c") median of $ROUNDS: ${GBPS[$c]} Gbit/s ($(echo $vals | tr '\n' ' '))"
  done
fi
want vxlan && case_vxlan
if want tinc; then
  for row in $TINC_CIPHERS; do
    c=${row%%:*}; dg=default; [[ $row == *:* ]] && dg=${row#*:}
    if [ "$row" = default ]; then n=tinc-blowfish-sha1; else n=tinc-$c-$dg; fi
    case_tinc "$n" "$c" "$dg"
  done
fi

# ---------------------------------------------------------------- summary
best_peer=0; best_name=none
for k in "${ORDER[@]}"; do
  if [[ $k == tinc-* ]] && awk -v a="${GBPS[$k]}" -v b="$best_peer" 'BEGIN{exit !(a>b)}'; then
    best_peer=${GBPS[$k]}; best_name=$k
  fi
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "null" }'; }
enc=${GBPS[weft-enc]:-0}; plain=${GBPS[weft-plain]:-0}; vx=${GBPS[vxlan]:-0}
r_peer=$(ratio "$enc" "$best_peer"); r_vx=$(ratio "$enc" "$vx"); r_pvx=$(ratio "$plain" "$vx")
[ -n "${GBPS[weft-enc]:-}" ] || { r_peer=null; r_vx=null; }
# Name only the comparisons whose cases ran (--only may leave some out).
parts=()
if [ -n "${GBPS[weft-enc]:-}" ]; then
  p="weft encrypted ${enc} Gbit/s"
  [ "$best_name" != none ] && p+=" = ${r_peer}x best peer ($best_name ${best_peer})"
  [ -n "${GBPS[vxlan]:-}" ] && p+=", ${r_vx}x kernel VXLAN (${vx})"
  parts+=("$p; weft-enc receiver UdpRcvbufErrors=${EXTRA[weft-enc.rcvbuf]:-n/a}")
fi
if [ -n "${GBPS[weft-plain]:-}" ]; then
  p="weft plaintext ${plain} Gbit/s"
  [ -n "${GBPS[vxlan]:-}" ] && p+=" = ${r_pvx}x kernel VXLAN"
  parts+=("$p")
fi
for m in enc plain; do
  if [ -n "${GBPS[base-$m]:-}" ] && [ -n "${GBPS[weft-$m]:-}" ]; then
    parts+=("weft-$m ${GBPS[weft-$m]} vs baseline ${GBPS[base-$m]} Gbit/s = $(ratio "${GBPS[weft-$m]}" "${GBPS[base-$m]}")x")
  fi
done
[ ${#parts[@]} -gt 0 ] || parts=("no weft case ran")
echo "summary: $(IFS='|'; echo "${parts[*]}" | sed 's/|/; /g')"
rows=$(for k in "${ORDER[@]}"; do
  jq -nc --arg k "$k" --arg g "${GBPS[$k]}" --arg r "${RETR[$k]}" --arg c "${CPU[$k]}" \
    '{case:$k, gbps:($g|tonumber), retransmits:($r|tonumber? // null), cpu_busy_pct:($c|tonumber)}'
done | jq -sc .)
num() { [ -n "$1" ] && [ "$1" != null ] && echo "$1" || echo null; }
jq -nc --argjson enc "$(num "${GBPS[weft-enc]:-}")" --argjson plain "$(num "${GBPS[weft-plain]:-}")" \
  --argjson vx "$(num "${GBPS[vxlan]:-}")" --argjson peer "$best_peer" --arg peer_name "$best_name" \
  --argjson rp "$(num "$r_peer")" --argjson rv "$(num "$r_vx")" --argjson t "$T" \
  --argjson rcv "$(num "${EXTRA[weft-enc.rcvbuf]:-}")" --argjson rcvp "$(num "${EXTRA[weft-plain.rcvbuf]:-}")" \
  --argjson rows "$rows" --argjson busy "$idle_busy" \
  '{weft_encrypted_gbps:$enc, ratio_vs_best_peer:$rp, ratio_vs_vxlan:$rv, weft_plaintext_gbps:$plain,
    vxlan_gbps:$vx, best_peer:$peer_name, best_peer_gbps:$peer, seconds:$t,
    weft_encrypted_udp_rcvbuf_errors:$rcv, weft_plaintext_udp_rcvbuf_errors:$rcvp, machine_busy_before_pct:$busy, cases:$rows}'
