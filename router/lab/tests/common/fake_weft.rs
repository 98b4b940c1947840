//! A fake `weft` for the lab's own tests (shared by `src/tests.rs` and the integration tests
//! through `#[path]`), so they check the lab's plumbing (arguments, logs, PIDs, JSON, cleanup)
//! without a real router.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fake `weft`: `router` logs its arguments and sleeps; `status --json` reports an established
/// connection to every other host of the lab (and, with `status dns`, the same: no `listening`,
/// so no DNS server); `attach` plugs the container straight into the
/// lab's underlay switch (so containers on all hosts share one L2 segment, as with a real mesh).
pub const FAKE_WEFT: &str = r#"#!/bin/sh
sock=
if [ "$1" = --api-socket ]; then sock=$2; shift 2; fi
cmd=$1; shift
case "$cmd" in
router)
  echo "fake router: $* RUST_LOG=$RUST_LOG"
  exec sleep 1000;;
status)
  n=$(( $(ls -d "${sock%/h*}"/h* | wc -l) - 1 ))
  printf '{"name":"fake","connections":['
  i=0
  while [ $i -lt $n ]; do
    if [ $i -gt 0 ]; then printf ','; fi
    printf '{"address":"192.168.77.1:6783","state":"established"}'
    i=$((i+1))
  done
  printf ']}\n';;
attach)
  ns=$1; shift
  if [ "$1" = --name ]; then shift 2; fi
  [ -e "/run/netns/$ns" ] || { echo "no such netns $ns" >&2; exit 1; }
  # Without an address (IPAM), container cN gets 10.50.0.(N+1)/24 and the answer is JSON.
  json=
  case "$1" in ""|--json) c=${ns##*-c}; addr="10.50.0.$((c+1))/24"; json=1;; *) addr=$1;; esac
  sw="${ns%-*}-sw"
  ip link add "v$$" netns "$ns" type veth peer name "p$$" netns "$sw" || exit 1
  ip -n "$sw" link set "p$$" master br0 up && ip -n "$ns" addr add "$addr" dev "v$$" && ip -n "$ns" link set "v$$" up || exit 1
  if [ -n "$json" ]; then printf '{"addresses":["%s"]}\n' "$addr"; fi;;
*) echo "fake weft: unknown command $cmd" >&2; exit 2;;
esac
"#;

/// The programs FAKE_WEFT runs through PATH (`printf` and `[` are `sh` built-ins; `sh` itself is
/// `/bin/sh` from the `#!` line).
pub const FAKE_WEFT_TOOLS: [&str; 4] = ["ip", "ls", "wc", "sleep"];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The fake weft written to a fresh file; removed when the guard drops.
pub struct Fake(pub PathBuf);

impl Fake {
    pub fn new() -> Fake {
        use std::os::unix::fs::PermissionsExt;
        // named like a lab's temp dir (`/tmp/weft-lab-wl<pid>x<n>...`), so cleanup_stale removes
        // it if this test process dies
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/tmp/weft-lab-wl{}x{n}-fake-weft",
            std::process::id()
        ));
        fs::write(&p, FAKE_WEFT).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        Fake(p)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// What `demo` prints with the fake weft on three hosts: both pings answered (real ICMP across the
/// underlay switch), DNS skipped because the fake lists no DNS server, everything cleaned up.
pub fn assert_demo_output(text: &str) {
    assert!(text.contains("2 of 2 pings ok") && text.contains("cleaned up"), "{text}");
    assert!(text.contains("dns: skipped (no DNS server listening on h0)"), "{text}");
    assert!(text.contains("on h1: ok, rtt avg ") && text.contains(" ms\n"), "{text}");
}
