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
# The setup, measuring and clean-up helpers are in bench/lib.sh (shared with data-path.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=sleeve-throughput
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
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

bench_init wsb$$               # prefix of every namespace this run creates

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

# ---------------------------------------------------------------- cases
case_weft() {  # <case-name> <password or empty> [weft binary]
  local name=$1 pw=$2 i
  local WEFT_BIN=${3:-$WEFT_BIN} extra=()
  # Without a password a weft with the fastpath would use it: this benchmark measures the sleeve.
  if [ -z "$pw" ] && "$WEFT_BIN" router --help 2>/dev/null | grep -q -- --no-fastpath; then extra=(--no-fastpath); fi
  # shellcheck disable=SC2086
  weft_up "$name" "$([ -n "$pw" ] && echo e || echo p)" "$WEFT_BIN" "$pw" "${extra[@]}" ${WEFT_ROUTER_ARGS:-}
  if [ -n "$UP_ERR" ]; then failed "$name" "$UP_ERR"; teardown; return 0; fi
  local hs=("$H1" "$H2") s1=$S1
  WATCH=("weft-h1:$R1" "weft-h2:$R2")
  run_iperf "$C2" "$C1" 10.99.0.2 "$name"
  record "$name"
  local st; st=$(nsx "$H1" "$WEFT_BIN" --api-socket "$s1" status --json)
  echo "$(printf '%-22s' '')   sleeve: $(echo "$st" | jq -c '.sleeve') container mtu=$(ip -n "$C1" -j link show ethwe | jq ".[0].mtu")"
  echo "$(printf '%-22s' '')   UDP h1(sender): $(udp_counters "$H1")| h2(receiver): $(udp_counters "$H2")"
  EXTRA[$name.rcvbuf]=$(rcvbuf_errors "$H2")
  local m; for i in 1 2; do
    local h=${hs[$((i - 1))]}
    m=$(metrics "$h")
    echo "$(printf '%-22s' '')   metrics h$i: $(echo "$m" | awk '/^weft_(frames|datagrams)_total|^weft_drops_total|^weft_sleeve_rekeys_total/ && $NF != 0 {sub(/_total/,""); printf "%s=%s ", $1, $2}')"
  done
  if [ "$REVERSE" = 1 ]; then
    local before; before=$(rcvbuf_errors "$H1")
    run_iperf "$C2" "$C1" 10.99.0.2 "$name-R" -R
    record "$name (-R)"
    echo "$(printf '%-22s' '')   UDP h1(receiver now) UdpRcvbufErrors +$(( $(rcvbuf_errors "$H1") - before ))"
  fi
  WATCH=()
  teardown
}

case_vxlan() {
  vxlan_up 1450   # 1500 - 50 bytes of VXLAN
  if [ -n "$UP_ERR" ]; then failed vxlan "$UP_ERR"; teardown; return 0; fi
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
machine_busy
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
    GBPS[$c]=$(echo "$vals" | median)
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
  --argjson rows "$rows" --argjson busy "$IDLE_BUSY" \
  '{weft_encrypted_gbps:$enc, ratio_vs_best_peer:$rp, ratio_vs_vxlan:$rv, weft_plaintext_gbps:$plain,
    vxlan_gbps:$vx, best_peer:$peer_name, best_peer_gbps:$peer, seconds:$t,
    weft_encrypted_udp_rcvbuf_errors:$rcv, weft_plaintext_udp_rcvbuf_errors:$rcvp, machine_busy_before_pct:$busy, cases:$rows}'
