#!/usr/bin/env bash
# Data path benchmark: throughput, small packets, latency under load and CPU cost, container to
# container, for weft's three data paths and plain kernel VXLAN in one run. Two "host" network
# namespaces joined by a veth underlay (MTU 1500), one "container" namespace behind each host's
# bridge (the topology and helpers of bench/lib.sh). Was bench/fastpath-throughput.sh (tcp1, tcp4).
#
# Cases, each on fresh namespaces (per round) that are torn down afterwards:
#   weft-enc     routers with a password: the encrypted sleeve (no fastpath: no --trusted-subnets)
#   weft-sleeve  routers without a password, started with --no-fastpath: the plaintext sleeve
#   weft-fast    routers without a password: the kernel VXLAN fastpath (UDP 6784), which a
#                connection takes once both ends hear each other's fastpath heartbeats. The case
#                waits (up to 20 s) until `weft status --json` on both hosts shows every connection
#                with "path": "fastpath", and fails loudly otherwise.
#   vxlan        kernel VXLAN + bridge set up by hand, as sleeve-throughput.sh does it (the ceiling)
#   base-enc, base-sleeve
#                weft-enc and weft-sleeve run with WEFT_BASELINE_BIN (e.g. a build of an older
#                commit): a before/after comparison in the same run. Only with WEFT_BASELINE_BIN.
#   weft-fast-noguard, weft-sleeve-noguard, weft-enc-noguard
#                the same as weft-fast, weft-sleeve, weft-enc with weft's anti-spoofing taken out of
#                the kernel by hand once the containers are attached: the port guard's dispatch
#                (`nft flush chain bridge weft_guard pre`, on both hosts, checked) and, on the
#                fastpath, the source filter's check of inner source MACs (an accept rule for the
#                peers' addresses inserted before it). What stays is the sleeve's per-frame lookup
#                of the source MAC's announcer (one hash lookup per frame in userspace; GSO makes a
#                frame up to 64 KiB), which is compiled in. Compare each with its case to get the
#                cost of the guard.
# The weft-sleeve and weft-enc cases check that their connections are on "path": "sleeve".
#
# Measures, one after the other on the same setup, T seconds each:
#   ping    round trip, idle (ping every 20 ms, 1 s)
#   tcp1    iperf3 TCP, 1 stream; with ping every 20 ms beside it: the round trip under a bulk
#           transfer ("ping@load")
#   tcp4    iperf3 TCP, 4 streams
#   udp64   iperf3 UDP, 64-byte datagrams as fast as the sender can: datagrams delivered per
#           second, and what weft itself lost (the sending host's TAP drops, the receiving
#           host's UDP receive-buffer drops and the routers' own drop counters) over what it was
#           given (the TAP's packets)
# CPU per Gbit/s: for tcp1 and tcp4, the routers' threads' CPU time over the middle of the run
# (cores, from /proc/<pid>/task) per Gbit/s received ("router"), and the whole VM's busy cores per
# Gbit/s ("vm", which also counts the kernel's work: the only figure for kernel VXLAN).
# ROUNDS rounds; every round runs each case once, starting one case further on than the round
# before, so the cases interleave and none always runs first. Figures are medians over the rounds,
# with ratios to vxlan.
#
# Fair MTU: weft gives containers MTU 1376 (its default --mtu, what the sleeve's headers leave of a
# 1500-byte underlay). The hand-made vxlan case uses the same container MTU here (CMTU, not the 1450
# of sleeve-throughput.sh), and the weft routers are started with --mtu CMTU, so every case carries
# frames of the same size (TCP MSS CMTU - 40); each weft case checks its containers' MTU.
#
# Usage: sudo bench/data-path.sh [--quick] [--only CASE[,CASE...]]
#   --quick     T=3 and ROUNDS=1
#   --only      run only these cases (weft-enc, weft-sleeve, weft-fast, vxlan, the -noguard ones);
#               by default weft-enc, weft-sleeve, weft-fast, vxlan (and base-* with a baseline)
# Environment:
#   T             seconds per iperf3 run (default 10)
#   ROUNDS        rounds (default 3)
#   CMTU          container MTU in every case (default 1376)
#   WEFT_BIN      weft binary (default <repo>/target/release/weft, built with cargo if missing)
#   WEFT_BASELINE_BIN  another weft binary for the base-* cases
#   WEFT_ROUTER_ARGS  extra `weft router` options for every weft case, for experiments
#   NOGUARD       what the -noguard cases take out: both (default), ports (the port guard only) or
#                 filter (the fastpath filter's MAC check only)
#   KEEP_LOGS=1   keep the work directory (router logs, iperf3 JSON) instead of deleting it
#
# Output: one line per run (Gbit/s received, TCP retransmits, whole-VM CPU busy %, per-process CPU);
# for each weft run also where the frames went: the packets and bytes of the router's VXLAN device
# (<bridge>-vx, i.e. weft-vx, in the host namespace; `ip -s -j link`: tx on the sending host h1, rx
# on the receiving host h2) and the sleeve's frames and bytes (`weft status --json` .stats:
# frames_out on h1, frames_in on h2), as differences over the run. With the fastpath nearly all the
# bytes go through weft-vx and the sleeve only sees a few frames (a warning says when not). Then a
# table of medians and ratios, the counters summed per case, and a final JSON line for scripts. The
# exit status is 1 when a run failed (e.g. the fastpath did not come up), after the summary.
#
# Traffic only flows between namespaces this script creates (and their loopbacks). Every process it
# starts is stopped by PID and every namespace it creates is deleted on exit, also on failure or ^C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=data-path
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
T=${T:-10}
ROUNDS=${ROUNDS:-3}
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --quick) T=3; ROUNDS=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
CMTU=${CMTU:-1376}
NOGUARD=${NOGUARD:-both}
case $NOGUARD in both|ports|filter) ;; *) die "NOGUARD must be both, ports or filter" ;; esac
BASE_BIN=${WEFT_BASELINE_BIN:-}
ALL_CASES=(weft-enc weft-sleeve weft-fast vxlan base-enc base-sleeve weft-fast-noguard weft-sleeve-noguard weft-enc-noguard)
MEASURES=(tcp1 tcp4 udp64)
declare -A STREAMS=([tcp1]="" [tcp4]="-P 4" [udp64]="-u -l 64 -b 0")   # iperf3 client options per measure
FAST_WAIT=20                   # seconds the fastpath gets to come up

[ "$(id -u)" = 0 ] || die "must run as root"
for tool in ip nsenter iperf3 jq awk ping ss; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
want() {
  if [[ $1 == base-* ]] && [ -z "$BASE_BIN" ]; then return 1; fi
  if [ -z "$ONLY" ]; then [[ $1 != *-noguard ]]; else [[ ",$ONLY," == *",$1,"* || ( $1 == base-* && ",$ONLY," == *",weft-${1#base-},"* ) ]]; fi
}
for c in ${ONLY//,/ }; do
  [[ " ${ALL_CASES[*]} " == *" $c "* ]] || die "unknown case $c (cases: ${ALL_CASES[*]})"
done
CASES=(); for c in "${ALL_CASES[@]}"; do want "$c" && CASES+=("$c"); done
[ ${#CASES[@]} -gt 0 ] || die "no case to run"
any_weft() { local c; for c in "${CASES[@]}"; do [[ $c == weft-* || $c == base-* ]] && return 0; done; return 1; }

if [ -z "${WEFT_BIN:-}" ]; then
  WEFT_BIN=$ROOT/target/release/weft
  if [ ! -x "$WEFT_BIN" ] && any_weft; then
    echo "building weft (cargo build --release -p weft)..." >&2
    (cd "$ROOT" && cargo build --release -p weft) >&2
  fi
fi
if any_weft; then
  [ -x "$WEFT_BIN" ] || die "weft binary $WEFT_BIN not found"
fi
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "baseline weft binary $BASE_BIN not found"

bench_init wfb$$               # prefix of every namespace this run creates

# ---------------------------------------------------------------- weft helpers
wstatus() {  # <host 1|2> -> `weft status --json` of that host's router ("{}" if it does not answer)
  local h=H$1 s=S$1
  nsx "${!h}" "$WEFT_BIN" --api-socket "${!s}" status --json 2>/dev/null || echo '{}'
}
# paths_ok <host> <path>: at least one established connection, and every one on that path
paths_ok() {
  wstatus "$1" | jq -e --arg want "$2" '[.connections[]? | select(.state == "established")] as $e
    | ($e | length) >= 1 and all($e[]; .path == $want)' >/dev/null 2>&1
}
paths_of() {  # <host> -> its connections with state, active path and each path's health
  wstatus "$1" | jq -r '[.connections[]? | "\(.peer_nickname // .peer_name) \(.state) path=\(.path)"
    + (if (.paths // []) | length > 0
       then " [" + (.paths | map(.kind + (if .up then " up" else " down: \(.reason // "?")" end)) | join(", ")) + "]"
       else "" end)] | if length > 0 then join("; ") else "no connections" end' 2>/dev/null || echo "no status"
}
# wait_paths <path> <seconds>: until paths_ok on both hosts; else sets UP_ERR with what they say.
wait_paths() {
  local want=$1 secs=$2 k
  UP_ERR=""
  for k in $(seq $((secs * 5))); do
    if paths_ok 1 "$want" && paths_ok 2 "$want"; then return 0; fi
    sleep 0.2
  done
  UP_ERR="not every connection on path \"$want\" after $secs s: h1: $(paths_of 1) | h2: $(paths_of 2)"
}
VX=weft-vx                     # the router's VXLAN device, <bridge>-vx; set from the status per case
vx_counters() {  # <host ns> -> "tx_packets tx_bytes rx_packets rx_bytes" of $VX, or "- - - -" without one
  ip -n "$1" -s -j link show dev "$VX" 2>/dev/null \
    | jq -er '.[0].stats64 | "\(.tx.packets) \(.tx.bytes) \(.rx.packets) \(.rx.bytes)"' 2>/dev/null || echo "- - - -"
}
sleeve_counters() {  # <host> -> "frames_out bytes_out frames_in bytes_in" of the sleeve
  wstatus "$1" | jq -er '.stats | "\(.frames_out) \(.bytes_out) \(.frames_in) \(.bytes_in)"' 2>/dev/null || echo "- - - -"
}
delta() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else echo $(($2 - $1)); fi; }
mb() { if [ "$1" = - ]; then echo -; else awk -v b="$1" 'BEGIN{printf "%.0f", b/1e6}'; fi; }

# ---------------------------------------------------------------- results
# Per "case measure": the values of the rounds (space-separated). Measures: tcp1 tcp4 (Gbit/s),
# udp64 (datagrams delivered per second), ping and ping@load (ms); "<measure> rcpu" and
# "<measure> vcpu" (router / whole-VM cores per Gbit/s), "udp64 loss" (weft's own loss, %).
declare -A VALS RETRS BUSY COUNT FAILS
ERRORS=()
IND=$(printf '%-22s' '')
per_gbit() { awk -v c="$1" -v g="$2" 'BEGIN{ if (g>0) printf "%.3f", c/g; else print "-" }'; }
record() {  # <case> <measure> <round> ; from G_*
  local k="$1 $2"
  if [ "$G_GBPS" = 0 ]; then FAILS[$k]=$(( ${FAILS[$k]:-0} + 1 )); ERRORS+=("$1 $2 round $3: iperf3 failed"); fi
  BUSY[$k]="${BUSY[$k]:-} $G_CPU"
  if [ "$2" = udp64 ]; then
    [ "$G_GBPS" = 0 ] || VALS[$k]="${VALS[$k]:-} $G_PPS"
    printf '%-22s %8s datagrams/s delivered (iperf3 lost %s%%)  VM CPU busy=%3s%% (of %s vCPUs)\n' "$1 $2 #$3" "$G_PPS" "$G_LOSS" "$G_CPU" "$(nproc)"
  else
    [ "$G_GBPS" = 0 ] || VALS[$k]="${VALS[$k]:-} $G_GBPS"
    [ "$G_RETR" = n/a ] || RETRS[$k]="${RETRS[$k]:-} $G_RETR"
    local rc vc; rc=$(per_gbit "$G_WATCH_CORES" "$G_GBPS"); vc=$(per_gbit "$G_VM_CORES" "$G_GBPS")
    [[ $1 == vxlan ]] || [ "$rc" = - ] || VALS["$1 $2 rcpu"]="${VALS["$1 $2 rcpu"]:-} $rc"
    [ "$vc" = - ] || VALS["$1 $2 vcpu"]="${VALS["$1 $2 vcpu"]:-} $vc"
    [ "$G_PING" = - ] || VALS["$1 ping@load"]="${VALS["$1 ping@load"]:-} $G_PING"
    printf '%-22s %6s Gbit/s  retrans=%-6s VM CPU busy=%3s%% (of %s vCPUs); cores per Gbit/s: routers %s, VM %s%s\n' \
      "$1 $2 #$3" "$G_GBPS" "$G_RETR" "$G_CPU" "$(nproc)" "$rc" "$vc" "$([ "$G_PING" = - ] || echo "; ping under it $G_PING ms")"
  fi
  printf '%s   per process (%% of one core): %s\n' "$IND" "$G_PROCS"
}
failed() {  # <case> <round> <why>: the whole case failed this round
  local m; for m in "${MEASURES[@]}"; do FAILS["$1 $m"]=$(( ${FAILS["$1 $m"]:-0} + 1 )); done
  ERRORS+=("$1 round $2: $3")
  printf '%-22s FAILED: %s\n' "$1 #$2" "$3"
  echo "$BENCH: $1 round $2 FAILED: $3" >&2
}
add_count() { [ "$3" = - ] || COUNT["$1 $2"]=$(( ${COUNT["$1 $2"]:-0} + $3 )); }  # <case> <counter> <delta>
tap_counters() {  # <host ns> -> "tx_packets tx_dropped" of the router's TAP (what the kernel gave weft / could not)
  ip -n "$1" -s -j link show dev "${VX%-vx}-tap" 2>/dev/null | jq -er '.[0].stats64.tx | "\(.packets) \(.dropped)"' 2>/dev/null || echo "- -"
}
drops_total() { wstatus "$1" | jq -r '[.stats.drops // {} | .. | numbers] | add // 0' 2>/dev/null || echo 0; }   # <host>

# measure <case> <round> <server ip> <measure> [weft]: one measure on the current setup
measure() {
  local name=$1 r=$2 ip=$3 m=$4 weft=${5:-} opts
  read -r -a opts <<<"${STREAMS[$m]}"
  if [ "$m" = tcp1 ]; then
    local idle; idle=$(ping_idle "$C1" "$ip")
    [ "$idle" = - ] || VALS["$name ping"]="${VALS["$name ping"]:-} $idle"
    echo "${IND}   ping idle: $idle ms"
    PING_DURING=$ip
  fi
  local t1 t2 rb1 rb2 d1 d2
  if [ "$m" = udp64 ] && [ -n "$weft" ]; then
    read -r -a t1 < <(tap_counters "$H1"); rb1=$(rcvbuf_errors "$H2"); d1=$(( $(drops_total 1) + $(drops_total 2) ))
  fi
  run_iperf "$C2" "$C1" "$ip" "$name#$r.$m" "${opts[@]}"
  PING_DURING=""
  record "$name" "$m" "$r"
  if [ "$m" = udp64 ] && [ -n "$weft" ]; then
    read -r -a t2 < <(tap_counters "$H1"); rb2=$(rcvbuf_errors "$H2"); d2=$(( $(drops_total 1) + $(drops_total 2) ))
    local given tapd sock own lost
    given=$(delta "${t1[0]}" "${t2[0]}"); tapd=$(delta "${t1[1]}" "${t2[1]}")
    sock=$(( ${rb2:-0} - ${rb1:-0} )); own=$(( d2 - d1 ))
    if [ "$given" = - ] || [ "$tapd" = - ]; then lost=-; else
      lost=$(awk -v g="$given" -v t="$tapd" -v s="$sock" -v o="$own" 'BEGIN{ if (g+t>0) printf "%.2f", 100*(t+s+o)/(g+t); else print "-" }')
    fi
    [ "$lost" = - ] || VALS["$name udp64 loss"]="${VALS["$name udp64 loss"]:-} $lost"
    echo "${IND}   lost inside weft: $lost % (TAP drops $tapd, receiver UdpRcvbufErrors $sock, router drops $own; the TAP gave weft $given)"
  fi
}

# ---------------------------------------------------------------- cases
run_case() {  # <case> <round>
  local name=$1 r=$2 m
  case $name in
    vxlan)
      vxlan_up "$CMTU"
      if [ -n "$UP_ERR" ]; then failed "$name" "$r" "$UP_ERR"; teardown; return 0; fi
      [ "$r" = 1 ] && echo "${IND}   container mtu $(ip -n "$C1" -j link show eth0 | jq '.[0].mtu');" \
        "vx0: mtu $(ip -n "$H1" -j link show dev vx0 | jq '.[0].mtu') $(ip -n "$H1" -d -j link show dev vx0 | jq -c '.[0].linkinfo.info_data')"
      WATCH=()
      for m in "${MEASURES[@]}"; do measure "$name" "$r" 10.20.0.2 "$m"; done
      teardown; return 0 ;;
  esac
  local pw="" path=sleeve args=(--mtu "$CMTU") WEFT_BIN=$WEFT_BIN
  [[ $name == base-* ]] && WEFT_BIN=$BASE_BIN
  local kind=${name%-noguard}; kind=${kind#*-}
  case $kind in
    fast) path=fastpath ;;
    sleeve) args+=(--no-fastpath) ;;
    enc) pw=$PASSWORD ;;
  esac
  # shellcheck disable=SC2206
  args+=(${WEFT_ROUTER_ARGS:-})
  weft_up "$name#$r" "${name//-/}" "$WEFT_BIN" "$pw" "${args[@]}"
  if [ -n "$UP_ERR" ]; then failed "$name" "$r" "$UP_ERR"; teardown; return 0; fi
  local mtu; mtu=$(ip -n "$C1" -j link show ethwe 2>/dev/null | jq '.[0].mtu' || echo "unknown (no ethwe)")
  if [ "$mtu" != "$CMTU" ]; then
    failed "$name" "$r" "container MTU is $mtu, not $CMTU: the comparison would not be fair"; teardown; return 0
  fi
  if [ "$path" = fastpath ]; then wait_paths fastpath "$FAST_WAIT"; else wait_paths sleeve 5; fi
  if [ -n "$UP_ERR" ]; then
    local said; said=$(grep -i fastpath "$WORK/$name#$r-h1/router.log" | tail -2 | tr '\n' ' ' || true)
    failed "$name" "$r" "$UP_ERR${said:+; router log h1: $said}"
    teardown; return 0
  fi
  if ! wait_ping "$C1" 10.99.0.2; then failed "$name" "$r" "containers cannot ping each other on path $path"; teardown; return 0; fi
  local br; br=$(wstatus 1 | jq -r '.bridge // "weft"'); VX="${br:0:11}-vx"
  if [[ $name == *-noguard ]]; then
    local h
    for h in "$H1" "$H2"; do
      if [ "$NOGUARD" != filter ]; then
        ip netns exec "$h" nft flush chain bridge weft_guard pre
        ip netns exec "$h" nft list chain bridge weft_guard pre | grep -q vmap && { failed "$name" "$r" "the guard is still on in $h"; teardown; return 0; }
      fi
      if [ "$path" = fastpath ] && [ "$NOGUARD" != ports ]; then
        ip netns exec "$h" nft insert rule ip "weft_fastpath_$br" input ip saddr @peers accept
      fi
    done
    [ "$r" = 1 ] && echo "${IND}   guard off on both hosts (NOGUARD=$NOGUARD): ports: weft_guard dispatch flushed; filter: the fastpath source filter checks addresses only"
    if ! wait_ping "$C1" 10.99.0.2; then failed "$name" "$r" "containers cannot ping each other without the guard"; teardown; return 0; fi
  fi
  if [ "$name" = weft-fast ] && [ "$r" = 1 ]; then
    echo "${IND}   $VX: mtu $(ip -n "$H1" -j link show dev "$VX" 2>/dev/null | jq '.[0].mtu') $(ip -n "$H1" -d -j link show dev "$VX" 2>/dev/null | jq -c '.[0].linkinfo.info_data')"
  fi
  WATCH=("weft-h1:$R1" "weft-h2:$R2")
  local v1 v2 q1 q2 w1 w2 z1 z2 tx txb rx so sob si kern
  for m in "${MEASURES[@]}"; do
    read -r -a v1 < <(vx_counters "$H1"); read -r -a w1 < <(vx_counters "$H2")
    read -r -a q1 < <(sleeve_counters 1); read -r -a z1 < <(sleeve_counters 2)
    measure "$name" "$r" 10.99.0.2 "$m" weft
    read -r -a v2 < <(vx_counters "$H1"); read -r -a w2 < <(vx_counters "$H2")
    read -r -a q2 < <(sleeve_counters 1); read -r -a z2 < <(sleeve_counters 2)
    tx=$(delta "${v1[0]}" "${v2[0]}"); txb=$(delta "${v1[1]}" "${v2[1]}"); rx=$(delta "${w1[2]}" "${w2[2]}")
    so=$(delta "${q1[0]}" "${q2[0]}"); sob=$(delta "${q1[1]}" "${q2[1]}"); si=$(delta "${z1[2]}" "${z2[2]}")
    kern="kernel $VX: h1 tx +$tx pkts +$(mb "$txb") MB, h2 rx +$rx pkts"
    [ "$tx" = - ] && kern="kernel: no $VX device"
    echo "${IND}   path h1=$(wstatus 1 | jq -r '[.connections[]?.path] | join(",")') h2=$(wstatus 2 | jq -r '[.connections[]?.path] | join(",")');" \
      "$kern; sleeve: h1 frames_out +$so +$(mb "$sob") MB, h2 frames_in +$si"
    add_count "$name" vx_tx_packets "$tx"; add_count "$name" vx_tx_bytes "$txb"
    add_count "$name" sleeve_frames_out "$so"; add_count "$name" sleeve_bytes_out "$sob"
    if [ "$path" = fastpath ] && { [ "$txb" = - ] || [ "$sob" = - ] || [ "$txb" -le "$sob" ]; }; then
      echo "${IND}   WARNING: the sleeve carried as much as the kernel VXLAN device (or $VX is missing): not a fastpath figure" | tee /dev/stderr
    elif [ "$path" = sleeve ] && [ "$txb" != - ] && [ "$sob" != - ] && [ "$txb" -gt "$sob" ]; then
      echo "${IND}   WARNING: the kernel VXLAN device carried more than the sleeve: not a sleeve figure" | tee /dev/stderr
    fi
  done
  WATCH=()
  teardown
}

# ---------------------------------------------------------------- run
echo "data path: iperf3 TCP 1 and 4 streams, UDP 64-byte datagrams, ping idle and under load; ${T}s per run, $ROUNDS round(s), container MTU $CMTU; $(nproc) CPUs; kernel $(uname -r)"
any_weft && echo "weft: $WEFT_BIN ($("$WEFT_BIN" --version 2>/dev/null || echo '?'))${BASE_BIN:+; baseline: $BASE_BIN}${WEFT_ROUTER_ARGS:+ router args: $WEFT_ROUTER_ARGS}"
machine_busy
PASSWORD=bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
PING_DURING=""
n=${#CASES[@]}
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do
    run_case "${CASES[$(( (i + r - 1) % n ))]}" "$r"
  done
done

# ---------------------------------------------------------------- summary
medof() {  # <space-separated numbers> -> their median, or - for none
  local a; read -r -a a <<<"$1"
  if [ ${#a[@]} -gt 0 ]; then printf '%s\n' "${a[@]}" | median; else echo -; fi
}
COLS=(tcp1 tcp4 udp64 "ping" "ping@load" "tcp1 rcpu" "tcp1 vcpu" "tcp4 rcpu" "tcp4 vcpu" "udp64 loss")
declare -A MED
for c in "${CASES[@]}"; do
  for m in "${COLS[@]}"; do MED["$c $m"]=$(medof "${VALS["$c $m"]:-}"); done
done
rat() {  # <case> <measure> -> ratio to vxlan
  local x=${MED["$1 $2"]} y=${MED["vxlan $2"]:--}
  if [ "$x" = - ] || [ "$y" = - ]; then echo -; else ratio "$x" "$y"; fi
}
f2() { if [ "$1" = - ]; then echo -; else awk -v v="$1" 'BEGIN{printf "%.2f", v}'; fi; }
f3() { if [ "$1" = - ]; then echo -; else awk -v v="$1" 'BEGIN{printf "%.3f", v}'; fi; }
echo
echo "summary: medians over $ROUNDS round(s); (x) = ratio to the hand-made kernel VXLAN"
echo "  tcp1/tcp4: Gbit/s received; udp64: 64-byte datagrams delivered per second (loss inside weft);"
echo "  ping: ms idle and under tcp1; cores/Gbit: router threads (VM-wide), tcp1 and tcp4"
printf '%-20s %-14s %-14s %-22s %-8s %-15s %-22s %-22s %s\n' case tcp1 tcp4 udp64 ping ping@load "cores/Gbit tcp1" "cores/Gbit tcp4" failed
for c in "${CASES[@]}"; do
  loss=${MED["$c udp64 loss"]}
  printf '%-20s %-14s %-14s %-22s %-8s %-15s %-22s %-22s %s\n' "$c" \
    "$(f2 "${MED["$c tcp1"]}") ($(rat "$c" tcp1))" "$(f2 "${MED["$c tcp4"]}") ($(rat "$c" tcp4))" \
    "${MED["$c udp64"]} ($(rat "$c" udp64))$([ "$loss" = - ] || echo " $loss%")" \
    "$(f3 "${MED["$c ping"]}")" "$(f3 "${MED["$c ping@load"]}") ($(rat "$c" ping@load))" \
    "$(f3 "${MED["$c tcp1 rcpu"]}") ($(f3 "${MED["$c tcp1 vcpu"]}"))" "$(f3 "${MED["$c tcp4 rcpu"]}") ($(f3 "${MED["$c tcp4 vcpu"]}"))" \
    "$(( ${FAILS["$c tcp1"]:-0} + ${FAILS["$c tcp4"]:-0} + ${FAILS["$c udp64"]:-0} ))"
done
any_weft && echo "where the frames went (sums over all runs of the case; sending host h1):"
for c in "${CASES[@]}"; do
  [ "$c" = vxlan ] && continue
  if [ -z "${COUNT["$c sleeve_frames_out"]:-}" ]; then printf '%-20s no run\n' "$c"; continue; fi
  kern="no $VX device"
  [ -n "${COUNT["$c vx_tx_packets"]:-}" ] && kern="$(printf 'kernel %s tx %s pkts, %s MB' "$VX" \
    "${COUNT["$c vx_tx_packets"]}" "$(mb "${COUNT["$c vx_tx_bytes"]:--}")")"
  printf '%-20s %s; sleeve frames_out %s, %s MB\n' "$c" "$kern" \
    "${COUNT["$c sleeve_frames_out"]:--}" "$(mb "${COUNT["$c sleeve_bytes_out"]:--}")"
done
num() { [ -n "$1" ] && [ "$1" != - ] && [ "$1" != null ] && echo "$1" || echo null; }
rows=$(for c in "${CASES[@]}"; do
  args=(--arg c "$c")
  for m in "${COLS[@]}"; do
    k=${m// /_}; k=${k//@/_at_}
    args+=(--argjson "$k" "$(num "${MED["$c $m"]}")" --argjson "${k}_ratio" "$(num "$(rat "$c" "$m")")")
  done
  jq -nc "${args[@]}" --argjson f "$(( ${FAILS["$c tcp1"]:-0} + ${FAILS["$c tcp4"]:-0} + ${FAILS["$c udp64"]:-0} ))" \
    --argjson so "$(num "${COUNT["$c sleeve_frames_out"]:-}")" --argjson vx "$(num "${COUNT["$c vx_tx_packets"]:-}")" \
    '{($c): {tcp1_gbps:$tcp1, tcp1_ratio_vs_vxlan:$tcp1_ratio, tcp4_gbps:$tcp4, tcp4_ratio_vs_vxlan:$tcp4_ratio,
      udp64_delivered_per_s:$udp64, udp64_ratio_vs_vxlan:$udp64_ratio, udp64_loss_inside_weft_pct:$udp64_loss,
      ping_idle_ms:$ping, ping_under_load_ms:$ping_at_load, ping_under_load_ratio_vs_vxlan:$ping_at_load_ratio,
      tcp1_router_cores_per_gbps:$tcp1_rcpu, tcp1_vm_cores_per_gbps:$tcp1_vcpu,
      tcp4_router_cores_per_gbps:$tcp4_rcpu, tcp4_vm_cores_per_gbps:$tcp4_vcpu,
      failed_runs:$f, sleeve_frames_out:$so, vx_tx_packets:$vx}}'
done | jq -sc 'add')
jq -nc --argjson t "$T" --argjson rounds "$ROUNDS" --argjson mtu "$CMTU" --argjson busy "$IDLE_BUSY" \
  --argjson cases "$rows" --argjson errors "$(printf '%s\n' "${ERRORS[@]}" | jq -Rsc 'split("\n")|map(select(.!=""))')" \
  '{seconds:$t, rounds:$rounds, container_mtu:$mtu, machine_busy_before_pct:$busy, cases:$cases, errors:$errors}'
if [ ${#ERRORS[@]} -gt 0 ]; then
  echo "$BENCH: ${#ERRORS[@]} failure(s):" >&2
  printf '  %s\n' "${ERRORS[@]}" >&2
  exit 1
fi
