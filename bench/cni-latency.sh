#!/usr/bin/env bash
# CNI ADD+DEL latency: weft-cni against Debian's reference bridge + host-local plugins, in one run.
# Both are driven by the same runtime harness (cni-shim/tests/common: the CNI spec's calling
# convention, each plugin run with `nsenter --net=` in a lab host namespace), in the same lab host,
# interleaved pair by pair: PAIRS sequential ADD/DEL pairs each, after one warm-up pair. weft-cni talks
# to a real weft router there (its allocation is saved with fsync before the answer). Prints p50/p99
# of each and the ratios (target: weft's p50 at most 1.5x the reference's).
#
# Usage: sudo bench/cni-latency.sh
# Environment: PAIRS (default 100).
# Needs root and Debian's containernetworking-plugins (/usr/lib/cni). Traffic: none beyond netlink;
# the lab namespaces and router are removed at the end (by the test's own clean-up).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
cargo build --release -q -p weft -p weft-cni
WEFT_CNI_BENCH_PAIRS=${PAIRS:-100} cargo test --release -q -p weft-cni --test bench -- --nocapture 2>&1 \
  | grep -E 'latency|weft-cni|bridge|ratio|skipping|panicked'
