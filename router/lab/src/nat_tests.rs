//! Tests of hosts behind NAT routers ([`super`]), without weft routers: the lab's ICMP probe and
//! plain UDP sockets made in the lab's namespaces. The ones that build labs need root, `ip`,
//! `nsenter` and `nft` (the flush one also `conntrack`) and skip otherwise.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::{cleanup_stale, ip, nsenter, require_lab, require_root, wait_timeout, NETNS_DIR};
use std::process::Command;
use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const NO_WEFT: &str = "/nonexistent/weft";
/// How long a datagram that should arrive may take (the first one waits for ARP).
const PASS: Duration = Duration::from_secs(2);
/// How long to wait for a datagram that should not arrive.
const NOT: Duration = Duration::from_millis(500);
const H0: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

static TOKEN: AtomicU32 = AtomicU32::new(0);

fn ping(lab: &Lab, from: &str, to: Ipv4Addr) -> bool {
    probe::icmp_echo(&lab.netns_path(from).unwrap(), to, Duration::from_secs(1)).is_ok()
}

/// A UDP socket bound to `addr`, made in lab namespace `ns` (it stays in that namespace).
fn udp_in(lab: &Lab, ns: &str, addr: SocketAddrV4) -> UdpSocket {
    probe::in_netns(&lab.netns_path(ns).unwrap(), || Ok(UdpSocket::bind(addr)?)).unwrap()
}

/// Sends a fresh token from `tx` to `to` and waits up to `wait` for it on `rx`; returns the
/// source address `rx` saw it from, `None` if it did not arrive.
fn deliver(tx: &UdpSocket, to: SocketAddrV4, rx: &UdpSocket, wait: Duration) -> Option<SocketAddrV4> {
    let token = format!("weft-nat-{}", TOKEN.fetch_add(1, Ordering::Relaxed));
    tx.send_to(token.as_bytes(), to).unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        rx.set_read_timeout(Some(left)).unwrap();
        match rx.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) if &buf[..n] == token.as_bytes() => return Some(from),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
            _ => {} // an older token, or an error report: keep waiting
        }
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Host 0 public; 1, 2 and 3 behind a PortPreserving, a Symmetric and a Filtering NAT.
fn four_host_lab() -> Lab {
    let cfg = LabConfig::new(4, NO_WEFT)
        .behind_nat(1, Nat::PortPreserving)
        .behind_nat(2, Nat::Symmetric)
        .behind_nat(3, Nat::Filtering);
    Lab::new(cfg).unwrap()
}

#[test]
fn nat_rulesets_per_kind() {
    let host = Ipv4Addr::new(10, 200, 1, 2);
    for kind in [Nat::PortPreserving, Nat::Filtering, Nat::Symmetric] {
        let r = kind.ruleset(Ipv4Addr::new(192, 168, 77, 2), host, 30);
        eprintln!("{kind:?}:\n{r}");
        assert!(r.starts_with("table ip weft_nat {\n") && r.ends_with("}\n"), "{r}");
        // nftables 1.0.6: several lines, one rule a line
        assert!(r.lines().all(|l| l.matches('{').count() <= 1), "{r}");
        let has = |s: &str| r.lines().any(|l| l.trim() == s);
        assert!(has("type nat hook postrouting priority 100; policy accept;"));
        assert!(has("ct state established,related accept"));
        assert!(has("iifname \"in0\" oifname \"ul0\" accept"));
        assert!(has("counter drop"));
        assert!(has("iifname \"ul0\" counter drop"));
        assert_eq!(has("oifname \"ul0\" masquerade random,fully-random"), kind == Nat::Symmetric);
        assert_eq!(has("oifname \"ul0\" masquerade"), kind != Nat::Symmetric);
        let cone = kind == Nat::PortPreserving;
        assert_eq!(has("iifname \"ul0\" ip daddr 192.168.77.2 udp dport @cone dnat to 10.200.1.2"), cone);
        assert_eq!(has("oifname \"ul0\" update @cone { udp sport timeout 30s }"), cone);
        assert_eq!(has("iifname \"ul0\" oifname \"in0\" ct status dnat accept"), cone);
    }
    assert_eq!(private_addrs(7), (Ipv4Addr::new(10, 200, 7, 2), Ipv4Addr::new(10, 200, 7, 1)));
    assert_eq!(count_packets("a counter packets 3 bytes 9\n b counter packets 4 bytes 1"), 7);
}

#[test]
fn nat_config_is_checked_before_anything_is_made() {
    let cfg = LabConfig::new(2, NO_WEFT).behind_nat(1, Nat::Filtering);
    assert_eq!(cfg.nat_of(1), Some(Nat::Filtering));
    assert_eq!(cfg.nat_of(0), None);
    let err = format!("{:#}", Lab::new(LabConfig::new(2, NO_WEFT).behind_nat(2, Nat::Symmetric)).unwrap_err());
    assert!(err.contains("host 2") && err.contains("hosts 0 to 1"), "{err}");
    let cfg = LabConfig::new(2, NO_WEFT).behind_nat(1, Nat::Symmetric).behind_nat(1, Nat::Filtering);
    let err = format!("{:#}", Lab::new(cfg).unwrap_err());
    assert!(err.contains("host 1 twice"), "{err}");
}

#[test]
fn nat_layout_reachability_and_cleanup() {
    if !require_root("nat_layout_reachability_and_cleanup") {
        return;
    }
    let mut lab = four_host_lab();
    let id = lab.id().to_string();
    let names = lab.namespaces.clone();
    assert_eq!(names.len(), 8, "{names:?}"); // switch, h0, and n<i> + h<i> for three NATed hosts
    assert!(names.iter().all(|n| n.starts_with(&format!("{id}-")) && Path::new(NETNS_DIR).join(n).exists()));

    let h0 = lab.host(0);
    assert_eq!((h0.underlay_ip, h0.public_ip, h0.nat, h0.nat_ns.as_deref()), (H0, H0, None, None));
    assert!(lab.nat_outside(0).is_err() && lab.nat_ns(0).is_err() && lab.nat_set_udp_timeout(0, 5).is_err());
    for (k, kind) in [(1, Nat::PortPreserving), (2, Nat::Symmetric), (3, Nat::Filtering)] {
        let h = lab.host(k);
        let outside = Ipv4Addr::new(192, 168, 77, k as u8 + 1);
        assert_eq!(h.underlay_ip, Ipv4Addr::new(10, 200, k as u8, 2));
        assert_eq!((h.public_ip, h.nat), (outside, Some(kind)));
        assert_eq!(lab.nat_outside(k).unwrap(), outside);
        assert_eq!(lab.nat_ns(k).unwrap(), format!("{id}-n{k}"));
        assert_eq!(h.nat_ns.as_deref(), Some(lab.nat_ns(k).unwrap()));
        assert!(lab.dir().join(format!("n{k}.nft")).is_file());
        // out through the NAT to the public host and to the other NATs' outside addresses
        assert!(ping(&lab, &h.ns, H0), "host {k} cannot reach host 0");
        assert!(ping(&lab, &h.ns, lab.nat_outside(k % 3 + 1).unwrap()));
        // nothing reaches a private address from outside, not even another NATed host
        assert!(ping(&lab, &lab.host(0).ns, outside), "host 0 cannot ping NAT {k}");
        assert!(!ping(&lab, &lab.host(0).ns, h.underlay_ip), "host 0 reached {}", h.underlay_ip);
        assert!(!ping(&lab, &h.ns, lab.host(k % 3 + 1).underlay_ip));
    }
    // Routed access: host 0 routes 10.200.<k>.0/24 via NAT k; the forward chain still drops it.
    let ns0 = lab.host(0).ns.clone();
    for k in 1..=3 {
        let before = lab.nat_dropped(k).unwrap();
        let via = lab.nat_outside(k).unwrap().to_string();
        let net = format!("10.200.{k}.0/24");
        assert!(lab.exec(&ns0, &["ip", "route", "add", &net, "via", &via]).unwrap().status.success());
        assert!(!ping(&lab, &ns0, lab.host(k).underlay_ip), "routed ping to host {k} went through");
        let after = lab.nat_dropped(k).unwrap();
        assert!(after > before, "NAT {k} did not count the drop ({before} -> {after})");
    }
    // MTU
    let n1 = lab.nat_ns(1).unwrap().to_string();
    lab.set_mtu(&n1, "in0", 1400).unwrap();
    let shown = String::from_utf8(lab.exec(&n1, &["ip", "link", "show", "in0"]).unwrap().stdout).unwrap();
    assert!(shown.contains("mtu 1400"), "{shown}");
    assert!(lab.set_mtu("not-a-lab-ns", "lo", 1400).is_err());
    // block works by host index: it cuts the NAT router's switch port
    let h1 = lab.host(1).ns.clone();
    lab.block(0, 1).unwrap();
    assert!(!ping(&lab, &h1, H0), "blocked host 1 reached host 0");
    lab.unblock(0, 1).unwrap();
    assert!(ping(&lab, &h1, H0));

    let dir = lab.dir().to_path_buf();
    drop(lab);
    assert!(names.iter().all(|n| !Path::new(NETNS_DIR).join(n).exists()), "namespaces left behind");
    assert!(!dir.exists());
}

#[test]
fn nat_udp_mapping_and_filtering_per_kind() {
    if !require_root("nat_udp_mapping_and_filtering_per_kind") {
        return;
    }
    let lab = four_host_lab();
    let ns0 = lab.host(0).ns.clone();
    // host 0: the sleeve port, two more destination ports, and another source port
    let r = [6783, 6784, 6785].map(|p| udp_in(&lab, &ns0, sa(H0, p)));
    let other = udp_in(&lab, &ns0, sa(H0, 7000));
    for (k, kind) in [(1, Nat::PortPreserving), (2, Nat::Symmetric), (3, Nat::Filtering)] {
        let h = lab.host(k);
        let outside = lab.nat_outside(k).unwrap();
        let s = udp_in(&lab, &h.ns, sa(h.underlay_ip, 6783));
        let unused = udp_in(&lab, &h.ns, sa(h.underlay_ip, 6799));
        // Unsolicited: nothing gets in before the host has sent anything.
        assert_eq!(deliver(&r[0], sa(outside, 6783), &s, NOT), None, "{kind:?}: unsolicited datagram got in");
        // Out: the public host sees the NAT's outside address.
        let m: Vec<SocketAddrV4> = (0..3)
            .map(|j| deliver(&s, sa(H0, 6783 + j as u16), &r[j], PASS).unwrap_or_else(|| panic!("{kind:?}: host {k} -> host 0 port {} lost", 6783 + j)))
            .collect();
        let ports: BTreeSet<u16> = m.iter().map(SocketAddrV4::port).collect();
        eprintln!("{kind:?}: host {k} 10.200.{k}.2:6783 seen by 192.168.77.1:6783/6784/6785 as {m:?}");
        assert!(m.iter().all(|a| *a.ip() == outside), "{kind:?}: {m:?}");
        match kind {
            Nat::PortPreserving | Nat::Filtering => assert_eq!(ports, BTreeSet::from([6783]), "{kind:?}: port not kept"),
            Nat::Symmetric => assert!(ports.len() >= 2, "symmetric NAT kept one port for three destinations: {m:?}"),
        }
        // Replies to the observed address and port get in, from the very address and port.
        for j in 0..3 {
            assert_eq!(deliver(&r[j], m[j], &s, PASS), Some(sa(H0, 6783 + j as u16)), "{kind:?}: reply {j} lost");
        }
        // From another port of host 0 to the first mapping: only the full cone lets it in.
        let got = deliver(&other, m[0], &s, if kind == Nat::PortPreserving { PASS } else { NOT });
        match kind {
            Nat::PortPreserving => assert_eq!(got, Some(sa(H0, 7000)), "full cone NAT filtered"),
            _ => assert_eq!(got, None, "{kind:?}: another source port got in"),
        }
        if kind == Nat::Symmetric && m[1].port() != m[0].port() {
            // the mapping made for port 6784 takes nothing from port 6783
            assert_eq!(deliver(&r[0], m[1], &s, NOT), None, "symmetric NAT: cross-destination datagram got in");
        }
        // A port the host never sent from stays shut, for every kind.
        assert_eq!(deliver(&r[0], sa(outside, 6799), &unused, NOT), None, "{kind:?}: unused port open");
        assert!(lab.nat_dropped(k).unwrap() > 0, "{kind:?}: no drops counted");
    }
}

/// A sysctl as seen from the namespace at `netns` (`None` for the calling thread's own).
fn sysctl(netns: Option<&Path>, name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    let read = || Ok(fs::read_to_string(&path)?.trim().to_string());
    match netns {
        Some(ns) => probe::in_netns(ns, read).ok(),
        None => read().ok(),
    }
}

#[test]
fn nat_udp_timeout_and_conntrack_flush() {
    if !require_lab("nat_udp_timeout_and_conntrack_flush", &["nft", "conntrack"]) {
        return;
    }
    let lab = four_host_lab();
    let ns0 = lab.host(0).ns.clone();
    let r = udp_in(&lab, &ns0, sa(H0, 6783));
    let names = [SYSCTL_UDP_TIMEOUT, SYSCTL_UDP_TIMEOUT_STREAM];
    let root_before = names.map(|n| sysctl(None, n));
    let mut socks = Vec::new();
    for k in 1..=3 {
        let nat = lab.netns_path(lab.nat_ns(k).unwrap()).unwrap();
        assert_eq!(names.map(|n| sysctl(Some(&nat), n)), [Some("30".into()), Some("120".into())]);
        lab.nat_set_udp_timeout(k, 1).unwrap();
        assert_eq!(names.map(|n| sysctl(Some(&nat), n)), [Some("1".into()), Some("1".into())]);
        let h = lab.host(k);
        let s = udp_in(&lab, &h.ns, sa(h.underlay_ip, 6783));
        let m = deliver(&s, sa(H0, 6783), &r, PASS).unwrap();
        assert_eq!(deliver(&r, m, &s, PASS), Some(sa(H0, 6783)));
        socks.push((k, h.nat.unwrap(), s, m));
    }
    // per namespace: the machine's own values are untouched
    assert_eq!(names.map(|n| sysctl(None, n)), root_before);
    // Quiet for longer than the timeout: the mappings are gone.
    thread::sleep(Duration::from_millis(2500));
    for (k, kind, s, m) in &socks {
        assert_eq!(deliver(&r, *m, s, NOT), None, "{kind:?}: mapping {m} outlived its 1 s timeout");
        // The host's next datagram maps again; the cone NATs pick the same port.
        let again = deliver(s, sa(H0, 6783), &r, PASS).unwrap();
        eprintln!("{kind:?}: mapping {m} expired; the next datagram is seen from {again}");
        if *kind != Nat::Symmetric {
            assert_eq!(again, *m, "{kind:?}: port not kept after expiry");
        }
        assert_eq!(deliver(&r, again, s, PASS), Some(sa(H0, 6783)));
        // Flushing drops it at once.
        lab.nat_flush_conntrack(*k).unwrap();
        assert_eq!(deliver(&r, again, s, NOT), None, "{kind:?}: mapping {again} survived conntrack -F");
        let after = deliver(s, sa(H0, 6783), &r, PASS).unwrap();
        eprintln!("{kind:?}: after conntrack -F the next datagram is seen from {after}");
        assert_eq!(deliver(&r, after, s, PASS), Some(sa(H0, 6783)));
    }
    assert!(lab.nat_flush_conntrack(0).is_err());
}

#[test]
fn nat_namespaces_of_dead_labs_are_cleaned_up() {
    if !require_lab("nat_namespaces_of_dead_labs_are_cleaned_up", &[]) {
        return;
    }
    // A PID that certainly belonged to a process that is gone now.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let ns = format!("wl{dead}x7-n1");
    ip(&["netns", "add", &ns]).unwrap();
    let mut straggler = nsenter(&ns).args(["sleep", "60"]).spawn().unwrap();
    // Another test process may be cleaning up the same stale labs at the same time: an error
    // about some other namespace is its business; ours must be gone either way.
    if let Err(e) = cleanup_stale() {
        let e = format!("{e:#}");
        assert!(!e.contains(&ns), "{e}");
    }
    assert!(!Path::new(NETNS_DIR).join(&ns).exists(), "stale NAT namespace left");
    assert!(wait_timeout(&mut straggler, Duration::from_secs(5)).unwrap().is_some(), "process in it not killed");
}
