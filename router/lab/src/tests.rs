//! The lab's own tests. They need root; the router ones use a fake `weft` shell script, so they
//! check the lab's plumbing (arguments, logs, PIDs, JSON, cleanup), not weft itself.
#![allow(clippy::unwrap_used)]

use super::*;

fn ns_exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

fn ping(lab: &Lab, from: &str, to: Ipv4Addr) -> bool {
    lab.exec(from, &["ping", "-c1", "-W1", &to.to_string()])
        .unwrap()
        .status
        .success()
}

/// A fake `weft`: `router` logs its arguments and sleeps; `status --json` reports an established
/// connection to every other host of the lab; `attach` plugs the container straight into the
/// lab's underlay switch (so containers on all hosts share one L2 segment, as with a real mesh).
const FAKE_WEFT: &str = r#"#!/bin/sh
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

/// Writes the fake weft into a fresh file; removed when the guard drops.
struct Fake(PathBuf);
impl Fake {
    fn new() -> Fake {
        use std::os::unix::fs::PermissionsExt;
        // named like a lab's temp dir, so cleanup_stale removes it if this test process dies
        let p = PathBuf::from(format!("/tmp/weft-lab-{}-fake-weft", fresh_id()));
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

#[test]
fn underlay_ping_and_drop_cleans_up() {
    if !require_root("underlay_ping_and_drop_cleans_up") {
        return;
    }
    let lab = Lab::new(LabConfig::new(2, "/nonexistent/weft")).unwrap();
    let names: Vec<String> = lab.namespaces.clone();
    assert_eq!(names.len(), 3);
    assert!(names.iter().all(|n| ns_exists(n)));
    assert!(lab.dir().is_dir());
    assert_eq!(lab.host(1).underlay_ip, Ipv4Addr::new(192, 168, 77, 2));
    assert!(ping(&lab, &lab.host(0).ns, lab.host(1).underlay_ip));
    // lo is up in every namespace
    for n in &names {
        assert!(ping(&lab, n, Ipv4Addr::LOCALHOST), "lo down in {n}");
    }
    assert!(lab.exec("not-a-lab-ns", &["true"]).is_err());
    let dir = lab.dir().to_path_buf();
    drop(lab);
    assert!(
        names.iter().all(|n| !ns_exists(n)),
        "namespaces left behind"
    );
    assert!(!dir.exists());
}

#[test]
fn block_and_unblock() {
    if !require_root("block_and_unblock") {
        return;
    }
    let mut lab = Lab::new(LabConfig::new(3, "/nonexistent/weft")).unwrap();
    let h0 = lab.host(0).ns.clone();
    let (ip1, ip2) = (lab.host(1).underlay_ip, lab.host(2).underlay_ip);
    assert!(ping(&lab, &h0, ip1));
    lab.block(1, 0).unwrap();
    lab.block(0, 1).unwrap(); // no-op
    assert!(!ping(&lab, &h0, ip1), "ping went through while blocked");
    let h1 = lab.host(1).ns.clone();
    assert!(
        !ping(&lab, &h1, lab.host(0).underlay_ip),
        "reverse direction not blocked"
    );
    assert!(ping(&lab, &h0, ip2), "unrelated pair was blocked");
    lab.unblock(0, 1).unwrap();
    lab.unblock(0, 1).unwrap(); // no-op
    assert!(ping(&lab, &h0, ip1), "still blocked after unblock");
    assert!(lab.block(2, 2).is_err());
    assert!(lab.block(0, 9).is_err());
}

#[test]
fn cleanup_stale_removes_dead_labs_only() {
    if !require_root("cleanup_stale_removes_dead_labs_only") {
        return;
    }
    // A PID that certainly belonged to a process that is gone now.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let id = format!("wl{dead}x0");
    let ns = format!("{id}-h0");
    let dir = PathBuf::from(format!("/tmp/weft-lab-{id}"));
    ip(&["netns", "add", &ns]).unwrap();
    fs::create_dir_all(dir.join("h0")).unwrap();
    // a leftover "router" in the stale namespace
    let mut straggler = nsenter(&ns).args(["sleep", "60"]).spawn().unwrap();
    let live = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    thread::sleep(Duration::from_millis(100));
    // (a concurrent test process may remove our stale namespace first, so the count can be 0)
    cleanup_stale().unwrap();
    assert!(!ns_exists(&ns));
    assert!(!dir.exists());
    assert!(
        wait_timeout(&mut straggler, Duration::from_secs(5))
            .unwrap()
            .is_some(),
        "process in stale ns not killed"
    );
    assert!(
        ns_exists(live.switch_ns()) && ns_exists(&live.host(0).ns),
        "live lab touched"
    );
    assert!(live.dir().exists());
}

#[test]
fn routers_and_containers_with_fake_weft() {
    if !require_root("routers_and_containers_with_fake_weft") {
        return;
    }
    let fake = Fake::new();
    let mut cfg = LabConfig::new(2, &fake.0);
    cfg.password = Some("s3cret".into());
    cfg.router_args = vec!["--no-discovery".into()];
    let mut lab = Lab::new(cfg).unwrap();
    lab.start_router(0, &[]).unwrap();
    lab.start_router(1, &[0]).unwrap();
    assert!(lab.start_router(1, &[0]).is_err(), "double start accepted");
    lab.wait_established(1, 1, Duration::from_secs(5)).unwrap();
    let v = lab.weft_json(1, &["status"]).unwrap();
    assert_eq!(v["connections"].as_array().unwrap().len(), 1);

    let err = format!(
        "{:#}",
        lab.wait_established(0, 2, Duration::from_millis(300))
            .unwrap_err()
    );
    assert!(
        err.contains("1 of 2")
            && err.contains("192.168.77.1:6783 - established")
            && err.contains("fake router:"),
        "{err}"
    );

    let log = fs::read_to_string(&lab.host(1).log).unwrap();
    for want in [
        "--nickname h1",
        "--password s3cret",
        "--no-discovery --ipalloc-init=consensus=2 192.168.77.1",
        "RUST_LOG=info",
        "--password ***",
    ] {
        assert!(log.contains(want), "router log lacks {want:?}:\n{log}");
    }
    let pid = lab.host(1).router_pid().unwrap();
    lab.kill_router(1, libc::SIGTERM).unwrap();
    assert!(lab.host(1).router_pid().is_none() && !pid_exists(pid));
    assert!(lab.kill_router(1, libc::SIGTERM).is_err());
    lab.start_router(1, &[0]).unwrap(); // restart appends to the log
    assert_eq!(
        fs::read_to_string(&lab.host(1).log)
            .unwrap()
            .matches("=== weft-lab: starting")
            .count(),
        2
    );

    let c = lab.add_container(0, "c0", "10.50.0.1/24").unwrap();
    assert_eq!(c.ip, Ipv4Addr::new(10, 50, 0, 1));
    assert!(ns_exists(&c.ns));
    assert!(lab
        .exec(&c.ns, &["ip", "link", "show", "lo"])
        .unwrap()
        .status
        .success());
    assert!(
        lab.add_container(0, "c0", "10.50.0.1/24").is_err(),
        "duplicate container accepted"
    );
    assert!(lab.add_container(0, "bad/name", "10.50.0.2/24").is_err());
    assert!(lab.add_container(0, "c2", "10.50.0.2").is_err());

    let pids: Vec<u32> = lab.hosts().iter().filter_map(Host::router_pid).collect();
    let names = lab.namespaces.clone();
    drop(lab);
    assert!(names.iter().all(|n| !ns_exists(n)));
    assert!(pids.iter().all(|p| !pid_exists(*p)), "router survived drop");
}

#[test]
fn keep_leaves_lab_in_place() {
    if !require_root("keep_leaves_lab_in_place") {
        return;
    }
    let mut cfg = LabConfig::new(1, "/nonexistent/weft");
    cfg.keep = true;
    let lab = Lab::new(cfg).unwrap();
    let (names, dir) = (lab.namespaces.clone(), lab.dir().to_path_buf());
    drop(lab);
    assert!(names.iter().all(|n| ns_exists(n)));
    for n in &names {
        remove_netns(n).unwrap();
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn start_router_needs_the_binary() {
    if !require_root("start_router_needs_the_binary") {
        return;
    }
    let mut lab = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    let err = format!("{:#}", lab.start_router(0, &[]).unwrap_err());
    assert!(err.contains("cargo build -p weft"), "{err}");
}

#[test]
fn demo_with_fake_weft() {
    if !require_root("demo_with_fake_weft") {
        return;
    }
    let fake = Fake::new();
    let mut out = Vec::new();
    demo(LabConfig::new(3, &fake.0), &mut out)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");
    assert!(
        text.contains("2 of 2 pings ok") && text.contains("cleaned up"),
        "{text}"
    );
}
