# shellcheck shell=bash disable=SC2034  # (it sets variables for the scripts that source it)
# Shared by the iperf3 benchmarks (sleeve-throughput.sh, data-path.sh); sourced, not run.
#
# The topology: two "host" network namespaces joined by a veth underlay (u1/u2, 192.168.50.1/.2,
# MTU 1500), each with one "container" namespace (wired by the case). Every namespace is named
# <prefix><tag>-{h1,h2,c1,c2}; every process is started through PIDS. `teardown` stops the current
# case's processes by PID and deletes its namespaces by name; the EXIT trap set by `bench_init`
# does the same (and removes the work directory) on success, failure or ^C.
#
# The sourcing script sets `set -euo pipefail`, BENCH (its name, for messages) and T (seconds per
# iperf3 run), then calls `bench_init <namespace prefix>`.

die() { echo "$BENCH: $*" >&2; exit 1; }

# ---------------------------------------------------------------- resources and cleanup
# bench_init <prefix>: sets P (namespace prefix), WORK (temp directory), PIDS, NSS; installs the traps.
bench_init() {
  P=$1
  WORK=$(mktemp -d /tmp/weft-bench.XXXXXX)
  PIDS=()                        # processes started by the current case
  NSS=()                         # namespaces created by the current case
  CLK_TCK=$(getconf CLK_TCK)
  WATCH=()
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

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

# ---------------------------------------------------------------- the two kinds of setup
# Both set UP_ERR to why the setup failed ("" when it worked) and return 0 either way, so that
# `set -e` stays in force inside them (a function called as an `if` condition would lose it).

# vxlan_up <container MTU>: kernel VXLAN (VNI 42, UDP 4789) + bridge br0 on each host, containers
# 10.20.0.1 and 10.20.0.2 on it, with the given MTU. Sets H1 H2 C1 C2.
vxlan_up() {
  local cmtu=$1 i
  UP_ERR=""
  mk_topology x
  local hs=("$H1" "$H2") cs=("$C1" "$C2")
  for i in 1 2; do
    local h=${hs[$((i - 1))]}
    ip -n "$h" link add vx0 type vxlan id 42 local 192.168.50.$i remote 192.168.50.$((3 - i)) dstport 4789 dev u$i
    ip -n "$h" link add br0 type bridge
    ip -n "$h" link set vx0 master br0
    ip -n "$h" link set vx0 up; ip -n "$h" link set br0 up
    wire_container "$h" br0 "${cs[$((i - 1))]}" "$cmtu" 10.20.0.$i/24
  done
  wait_ping "$C1" 10.20.0.2 || UP_ERR="containers cannot ping each other"
}

# weft_up <name> <tag> <weft binary> <password or ""> [router options...]: a weft router on each
# host (`weft router`, logs in $WORK/<name>-h<i>/router.log; h2 is given h1's address), waits until
# h1 has an established connection (20 s), attaches the containers with `weft attach` (10.99.0.1 and
# 10.99.0.2) and waits until they ping each other. Sets H1 H2 C1 C2, R1 R2 (router PIDs) and
# S1 S2 (API sockets).
weft_up() {
  local name=$1 tag=$2 bin=$3 pw=$4 i; shift 4
  UP_ERR=""
  mk_topology "$tag"
  local hs=("$H1" "$H2")
  for i in 1 2; do
    local h=${hs[$((i - 1))]} d=$WORK/$name-h$i
    mkdir -p "$d"
    local args=(--api-socket "$d/api.sock" router --state-dir "$d/state" --nickname "h$i")
    [ -n "$pw" ] && args+=(--password "$pw")
    args+=("$@")
    [ "$i" = 2 ] && args+=(192.168.50.1)
    RUST_LOG=${RUST_LOG:-info} nsenter --net="/run/netns/$h" "$bin" "${args[@]}" \
      </dev/null >"$d/router.log" 2>&1 &
    PIDS+=($!); eval "R$i=$!"
  done
  S1=$WORK/$name-h1/api.sock; S2=$WORK/$name-h2/api.sock
  local k n=0
  for k in $(seq 100); do
    n=$(nsx "$H1" "$bin" --api-socket "$S1" status --json 2>/dev/null \
        | jq '[.connections[]? | select(.state=="established")] | length' 2>/dev/null || echo 0)
    [ "${n:-0}" -ge 1 ] && break
    sleep 0.2
  done
  if [ "${n:-0}" -lt 1 ]; then
    UP_ERR="no established connection after 20 s; router log tail: $(tail -3 "$WORK/$name-h1/router.log" | tr '\n' ' ')"
    return 0
  fi
  nsx "$H1" "$bin" --api-socket "$S1" attach "$C1" 10.99.0.1/24 >/dev/null
  nsx "$H2" "$bin" --api-socket "$S2" attach "$C2" 10.99.0.2/24 >/dev/null
  wait_ping "$C1" 10.99.0.2 || UP_ERR="containers cannot ping each other"
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
# With PING_DURING set (to an address), the client namespace pings it every 20 ms over the same
# middle of the transfer.
# Sets G_GBPS G_RETR G_CPU G_PROCS, G_WATCH_CORES (the WATCH processes' CPU, in cores), G_VM_CORES
# (the whole VM's busy cores), G_PING (average round trip in ms, with PING_DURING, else "-"), and for
# UDP (-u) G_PPS (datagrams delivered per second) and G_LOSS (iperf3's lost %), else "-".
run_iperf() {
  local sns=$1 cns=$2 ip=$3 name=$4; shift 4
  nsenter --net="/run/netns/$sns" iperf3 -s -1 -p 5201 >"$WORK/$name.iperf-s.log" 2>&1 &
  local spid=$!; PIDS+=("$spid")
  local k; for k in $(seq 40); do
    nsx "$sns" ss -Hltn 'sport = :5201' 2>/dev/null | grep -q . && break; sleep 0.1
  done
  local b0 t0 b1 t1 s0 s1 mid ppid=""
  mid=$(awk -v t="$T" 'BEGIN{print (t>2 ? t-1 : t/2)}')
  nsenter --net="/run/netns/$cns" iperf3 -c "$ip" -p 5201 -t "$T" -J "$@" >"$WORK/$name.json" 2>&1 &
  local cpid=$!; PIDS+=("$cpid")
  sleep 0.3
  if [ -n "${PING_DURING:-}" ]; then
    nsenter --net="/run/netns/$cns" ping -q -n -i 0.02 -w "$(awk -v m="$mid" 'BEGIN{printf "%d", (m<1?1:m)}')" "$PING_DURING" \
      >"$WORK/$name.ping" 2>&1 &
    ppid=$!; PIDS+=("$ppid")
  fi
  read -r b0 t0 < <(cpu_snap); s0=$(date +%s.%N)
  task_snap "iperf-s:$spid" "iperf-c:$cpid" "${WATCH[@]}" >"$WORK/$name.ts0"
  sleep "$mid"
  task_snap "iperf-s:$spid" "iperf-c:$cpid" "${WATCH[@]}" >"$WORK/$name.ts1"
  read -r b1 t1 < <(cpu_snap); s1=$(date +%s.%N)
  for k in $(seq $((10 * (T + 20)))); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$cpid" 2>/dev/null || true          # only if it hung
  wait "$cpid" 2>/dev/null || true
  for k in $(seq 50); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  G_PING=-
  if [ -n "$ppid" ]; then
    wait "$ppid" 2>/dev/null || true
    G_PING=$(ping_avg "$WORK/$name.ping")
  fi
  local secs; secs=$(awk -v a="$s0" -v b="$s1" 'BEGIN{print b-a}')
  G_CPU=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN{printf "%.0f", (t>0?100*b/t:0)}')
  G_VM_CORES=$(awk -v c="$G_CPU" -v n="$(nproc)" 'BEGIN{printf "%.3f", c*n/100}')
  G_PROCS=$(task_report "$WORK/$name.ts0" "$WORK/$name.ts1" "$secs")
  G_WATCH_CORES=$(awk -v secs="$secs" -v hz="$CLK_TCK" '
    NR==FNR { b[$1" "$2]=$4; next }
    $1 !~ /^iperf-/ { d+=$4-b[$1" "$2] }
    END { printf "%.3f", d/hz/secs }' "$WORK/$name.ts0" "$WORK/$name.ts1")
  G_PPS=-; G_LOSS=-
  if jq -e '.start.test_start.protocol == "UDP" and .end.sum_received.packets != null' "$WORK/$name.json" >/dev/null 2>&1; then
    # UDP: what the server got (datagrams sent less those it counted lost)
    G_PPS=$(jq -r '.end.sum_received | ((.packets - .lost_packets) / .seconds) | round' "$WORK/$name.json")
    G_LOSS=$(jq -r '.end.sum_received.lost_percent*100|round/100' "$WORK/$name.json")
    G_GBPS=$(jq -r '.end.sum_received.bits_per_second/1e9*1000|round/1000' "$WORK/$name.json")
    G_RETR=n/a
  elif jq -e '.end.sum_received.bits_per_second' "$WORK/$name.json" >/dev/null 2>&1; then
    G_GBPS=$(jq -r '.end.sum_received.bits_per_second/1e9*100|round/100' "$WORK/$name.json")
    G_RETR=$(jq -r '.end.sum_sent.retransmits // "n/a"' "$WORK/$name.json")
  else
    G_GBPS=0; G_RETR=n/a
    echo "   iperf3 failed: $(jq -r '.error // empty' "$WORK/$name.json" 2>/dev/null || head -c 300 "$WORK/$name.json")" >&2
  fi
}

# ping_avg <ping -q output file> -> the average round trip in ms, or "-" when none came back
ping_avg() { awk -F/ '/^rtt|^round-trip/ { split($0, a, "= "); split(a[2], v, "/"); print v[2]; f=1 } END { if (!f) print "-" }' "$1"; }
# ping_idle <ns> <ip> -> the average round trip in ms of 50 pings 20 ms apart, or "-"
ping_idle() {
  nsx "$1" ping -q -n -i 0.02 -c 50 -w 5 "$2" >"$WORK/ping-idle.out" 2>&1 || true
  ping_avg "$WORK/ping-idle.out"
}

# machine_busy: prints how busy the machine is over one second (warning above 15 %); sets IDLE_BUSY.
machine_busy() {
  local b0 t0 b1 t1
  read -r b0 t0 < <(cpu_snap); sleep 1; read -r b1 t1 < <(cpu_snap)
  IDLE_BUSY=$(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) 'BEGIN{printf "%.0f", (t>0?100*b/t:0)}')
  echo "machine busy before the run: ${IDLE_BUSY}% of all CPUs (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
  [ "$IDLE_BUSY" -gt 15 ] && echo "WARNING: other work is using the CPUs; figures will be low and noisy" >&2
  return 0
}

udp_counters() {  # <ns> -> underlay counters "UdpInDatagrams=N ... TcpInSegs=N" (namespace is fresh: since its creation)
  nsx "$1" nstat -saz UdpInDatagrams UdpRcvbufErrors UdpSndbufErrors UdpInErrors TcpInSegs 2>/dev/null | awk 'NR>1{printf "%s=%s ", $1, $2}'
}
rcvbuf_errors() {  # <ns> -> its UdpRcvbufErrors (datagrams dropped for a full receive buffer) since its creation
  nsx "$1" nstat -saz UdpRcvbufErrors 2>/dev/null | awk 'NR>1{print $2}'
}
metrics() {  # <ns> -> Prometheus text from the router's metrics endpoint on that namespace's loopback
  nsx "$1" python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:6782/metrics", timeout=3).read().decode())' 2>/dev/null || true
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }   # of the numbers on stdin
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "null" }'; }
