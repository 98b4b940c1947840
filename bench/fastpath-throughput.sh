#!/usr/bin/env bash
# Fastpath throughput benchmark: iperf3 TCP between two "container" network namespaces, each behind
# its own "host" namespace, the two hosts joined by a veth underlay (MTU 1500); the topology and
# helpers of sleeve-throughput.sh (bench/lib.sh).
#
# Cases, each on fresh namespaces (per round) that are torn down afterwards:
#   weft-fast    weft routers without a password: the kernel VXLAN fastpath (UDP 6784), which a
#                connection takes once both ends hear each other's fastpath heartbeats. The case
#                waits (up to 20 s) until `weft status --json` on both hosts shows every connection
#                with "path": "fastpath", and fails loudly otherwise.
#   weft-sleeve  the same routers started with --no-fastpath: the plaintext sleeve
#   weft-enc     routers with a password: the encrypted sleeve (no fastpath: no --trusted-subnets)
#   vxlan        kernel VXLAN + bridge set up by hand, as sleeve-throughput.sh does it (the ceiling)
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
# Measures, one after the other on the same setup: tcp1 (iperf3, 1 stream) and tcp4 (-P 4 streams),
# T seconds each. ROUNDS rounds; every round runs each case once, starting one case further on than
# the round before, so the cases interleave and none always runs first. Figures are medians over
# the rounds, with ratios to vxlan.
#
# Fair MTU: weft gives containers MTU 1376 (its default --mtu, what the sleeve's headers leave of a
# 1500-byte underlay). The hand-made vxlan case uses the same container MTU here (CMTU, not the 1450
# of sleeve-throughput.sh), and the weft routers are started with --mtu CMTU, so every case carries
# frames of the same size (TCP MSS CMTU - 40); each weft case checks its containers' MTU.
#
# Usage: sudo bench/fastpath-throughput.sh [--quick] [--only CASE[,CASE...]]
#   --quick     T=3 and ROUNDS=1
#   --only      run only these cases (weft-fast, weft-sleeve, weft-enc, the -noguard ones, vxlan);
#               by default all but the -noguard ones
# Environment:
#   T             seconds per iperf3 run (default 10)
#   ROUNDS        rounds (default 3)
#   CMTU          container MTU in every case (default 1376)
#   WEFT_BIN      weft binary (default <repo>/target/release/weft, built with cargo if missing)
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
BENCH=fastpath-throughput
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
ALL_CASES=(weft-fast weft-sleeve weft-enc vxlan weft-fast-noguard weft-sleeve-noguard weft-enc-noguard)
MEASURES=(tcp1 tcp4)
declare -A STREAMS=([tcp1]="" [tcp4]="-P 4")   # iperf3 client options per measure
FAST_WAIT=20                   # seconds the fastpath gets to come up

[ "$(id -u)" = 0 ] || die "must run as root"
for tool in ip nsenter iperf3 jq awk ping ss; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
want() { if [ -z "$ONLY" ]; then [[ $1 != *-noguard ]]; else [[ ",$ONLY," == *",$1,"* ]]; fi; }
for c in ${ONLY//,/ }; do
  [[ " ${ALL_CASES[*]} " == *" $c "* ]] || die "unknown case $c (cases: ${ALL_CASES[*]})"
done
CASES=(); for c in "${ALL_CASES[@]}"; do want "$c" && CASES+=("$c"); done
[ ${#CASES[@]} -gt 0 ] || die "no case to run"
any_weft() { local c; for c in "${CASES[@]}"; do [[ $c == weft-* ]] && return 0; done; return 1; }

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
declare -A VALS RETRS BUSY COUNT FAILS   # per "case measure": values of the rounds (space-separated)
ERRORS=()
IND=$(printf '%-22s' '')
record() {  # <case> <measure> <round> ; from G_*
  local k="$1 $2"
  if [ "$G_GBPS" = 0 ]; then FAILS[$k]=$(( ${FAILS[$k]:-0} + 1 )); ERRORS+=("$1 $2 round $3: iperf3 failed"); fi
  [ "$G_GBPS" = 0 ] || VALS[$k]="${VALS[$k]:-} $G_GBPS"
  [ "$G_RETR" = n/a ] || RETRS[$k]="${RETRS[$k]:-} $G_RETR"
  BUSY[$k]="${BUSY[$k]:-} $G_CPU"
  printf '%-22s %6s Gbit/s  retrans=%-6s VM CPU busy=%3s%% (of %s vCPUs)\n' "$1 $2 #$3" "$G_GBPS" "$G_RETR" "$G_CPU" "$(nproc)"
  printf '%s   per process (%% of one core): %s\n' "$IND" "$G_PROCS"
}
failed() {  # <case> <round> <why>: the whole case failed this round
  local m; for m in "${MEASURES[@]}"; do FAILS["$1 $m"]=$(( ${FAILS["$1 $m"]:-0} + 1 )); done
  ERRORS+=("$1 round $2: $3")
  printf '%-22s FAILED: %s\n' "$1 #$2" "$3"
  echo "$BENCH: $1 round $2 FAILED: $3" >&2
}
add_count() { [ "$3" = - ] || COUNT["$1 $2"]=$(( ${COUNT["$1 $2"]:-0} + $3 )); }  # <case> <counter> <delta>

# ---------------------------------------------------------------- cases
run_case() {  # <case> <round>
  local name=$1 r=$2 m opts
  case $name in
    vxlan)
      vxlan_up "$CMTU"
      if [ -n "$UP_ERR" ]; then failed "$name" "$r" "$UP_ERR"; teardown; return 0; fi
      [ "$r" = 1 ] && echo "${IND}   container mtu $(ip -n "$C1" -j link show eth0 | jq '.[0].mtu');" \
        "vx0: mtu $(ip -n "$H1" -j link show dev vx0 | jq '.[0].mtu') $(ip -n "$H1" -d -j link show dev vx0 | jq -c '.[0].linkinfo.info_data')"
      WATCH=()
      for m in "${MEASURES[@]}"; do
        read -r -a opts <<<"${STREAMS[$m]}"
        run_iperf "$C2" "$C1" 10.20.0.2 "$name#$r.$m" "${opts[@]}"
        record "$name" "$m" "$r"
      done
      teardown; return 0 ;;
  esac
  local pw="" path=sleeve args=(--mtu "$CMTU")
  case ${name%-noguard} in
    weft-fast) path=fastpath ;;
    weft-sleeve) args+=(--no-fastpath) ;;
    weft-enc) pw=$PASSWORD ;;
  esac
  # shellcheck disable=SC2206
  args+=(${WEFT_ROUTER_ARGS:-})
  weft_up "$name#$r" "${name#weft-}" "$WEFT_BIN" "$pw" "${args[@]}"
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
    read -r -a opts <<<"${STREAMS[$m]}"
    run_iperf "$C2" "$C1" 10.99.0.2 "$name#$r.$m" "${opts[@]}"
    read -r -a v2 < <(vx_counters "$H1"); read -r -a w2 < <(vx_counters "$H2")
    read -r -a q2 < <(sleeve_counters 1); read -r -a z2 < <(sleeve_counters 2)
    record "$name" "$m" "$r"
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
echo "fastpath throughput: iperf3 TCP, 1 and 4 streams, ${T}s per run, $ROUNDS round(s), container MTU $CMTU; $(nproc) CPUs; kernel $(uname -r)"
any_weft && echo "weft: $WEFT_BIN ($("$WEFT_BIN" --version 2>/dev/null || echo '?'))${WEFT_ROUTER_ARGS:+ router args: $WEFT_ROUTER_ARGS}"
machine_busy
PASSWORD=bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
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
med() { medof "${VALS["$1 $2"]:-}"; }
echo
echo "summary: medians over $ROUNDS round(s), Gbit/s received; x vxlan = ratio to the hand-made kernel VXLAN"
printf '%-20s %8s %8s %8s %8s   %-13s %-13s %s\n' case tcp1 "x vxlan" tcp4 "x vxlan" "retrans 1/4" "VM busy% 1/4" failed
declare -A MED
for c in "${CASES[@]}"; do
  for m in "${MEASURES[@]}"; do MED["$c $m"]=$(med "$c" "$m"); done
done
rat() {  # <case> <measure>
  local x=${MED["$1 $2"]} y=${MED["vxlan $2"]:--}
  if [ "$x" = - ] || [ "$y" = - ]; then echo -; else ratio "$x" "$y"; fi
}
f2() { if [ "$1" = - ]; then echo -; else awk -v v="$1" 'BEGIN{printf "%.2f", v}'; fi; }
for c in "${CASES[@]}"; do
  printf '%-20s %8s %8s %8s %8s   %-13s %-13s %s\n' "$c" "$(f2 "${MED["$c tcp1"]}")" "$(rat "$c" tcp1)" \
    "$(f2 "${MED["$c tcp4"]}")" "$(rat "$c" tcp4)" \
    "$(medof "${RETRS["$c tcp1"]:-}")/$(medof "${RETRS["$c tcp4"]:-}")" \
    "$(medof "${BUSY["$c tcp1"]:-}")/$(medof "${BUSY["$c tcp4"]:-}")" \
    "$(( ${FAILS["$c tcp1"]:-0} + ${FAILS["$c tcp4"]:-0} ))"
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
  jq -nc --arg c "$c" --argjson t1 "$(num "${MED["$c tcp1"]}")" --argjson t4 "$(num "${MED["$c tcp4"]}")" \
    --argjson r1 "$(num "$(rat "$c" tcp1)")" --argjson r4 "$(num "$(rat "$c" tcp4)")" \
    --arg v1 "${VALS["$c tcp1"]:-}" --arg v4 "${VALS["$c tcp4"]:-}" \
    --argjson f "$(( ${FAILS["$c tcp1"]:-0} + ${FAILS["$c tcp4"]:-0} ))" \
    --argjson vx "$(num "${COUNT["$c vx_tx_packets"]:-}")" --argjson vxb "$(num "${COUNT["$c vx_tx_bytes"]:-}")" \
    --argjson so "$(num "${COUNT["$c sleeve_frames_out"]:-}")" --argjson sob "$(num "${COUNT["$c sleeve_bytes_out"]:-}")" \
    '{($c): {tcp1_gbps:$t1, tcp1_ratio_vs_vxlan:$r1, tcp4_gbps:$t4, tcp4_ratio_vs_vxlan:$r4,
      tcp1_rounds:($v1|split(" ")|map(select(.!="")|tonumber)), tcp4_rounds:($v4|split(" ")|map(select(.!="")|tonumber)),
      failed_runs:$f, vx_tx_packets:$vx, vx_tx_bytes:$vxb, sleeve_frames_out:$so, sleeve_bytes_out:$sob}}'
done | jq -sc 'add')
jq -nc --argjson t "$T" --argjson rounds "$ROUNDS" --argjson mtu "$CMTU" --argjson busy "$IDLE_BUSY" \
  --argjson cases "$rows" --argjson errors "$(printf '%s\n' "${ERRORS[@]}" | jq -Rsc 'split("\n")|map(select(.!=""))')" \
  '{seconds:$t, rounds:$rounds, container_mtu:$mtu, machine_busy_before_pct:$busy, cases:$cases, errors:$errors}'
if [ ${#ERRORS[@]} -gt 0 ]; then
  echo "$BENCH: ${#ERRORS[@]} failure(s):" >&2
  printf '  %s\n' "${ERRORS[@]}" >&2
  exit 1
fi
