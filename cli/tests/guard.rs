//! End-to-end tests of the port guard: a container with CAP_NET_RAW (a test thread inside its
//! namespace) lies about its MAC and addresses, sends router advertisements and floods MACs;
//! containers on other hosts keep reaching the real owners, over the fastpath and over the
//! sleeve. Real routers in lab namespaces; root only (they skip with a message otherwise).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use weft_lab::{Container, Lab};

const UP: Duration = Duration::from_secs(30);

/// The guard's entry for container `c` in host `h`'s status.
fn port_of(lab: &Lab, h: usize, c: &Container) -> Value {
    status(lab, h)["guard"]["ports"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["label"].as_str().is_some_and(|l| l.contains(&c.ns))).cloned())
        .unwrap_or(Value::Null)
}

fn dropped(lab: &Lab, h: usize, c: &Container, reason: &str) -> u64 {
    port_of(lab, h, c)["dropped"][reason].as_u64().unwrap_or(0)
}

/// The MAC that container `c`'s neighbour table gives `ip`, if any.
fn neighbour(lab: &Lab, c: &Container, ip: &str) -> Option<String> {
    let o = lab.exec(&c.ns, &["ip", "neigh", "show", ip]).expect("ip neigh");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    out.split("lladdr ").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string)
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn link_local(m: [u8; 6]) -> [u8; 16] {
    [0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]
}

/// An ICMPv6 message `icmp` (its checksum field zero) from `mac`, with its link-local as
/// source, to all nodes, hop limit 255, the checksum filled in: what a host on the link would
/// act on.
fn icmpv6_to_all_nodes(mac: [u8; 6], mut icmp: Vec<u8>) -> Vec<u8> {
    let src = link_local(mac);
    let dst: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut sum: u32 = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    for pair in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// A router advertisement from `mac`, announcing itself as default router and the prefix
/// fd66::/64 for autoconfiguration.
fn router_advertisement(mac: [u8; 6]) -> Vec<u8> {
    let mut icmp = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    // Prefix information: /64, on-link and autonomous, valid 86400 s, preferred 14400 s.
    icmp.extend_from_slice(&[3, 4, 64, 0xc0, 0, 1, 0x51, 0x80, 0, 0, 0x38, 0x40, 0, 0, 0, 0]);
    icmp.extend_from_slice(&[0xfd, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // Source link-layer address.
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&mac);
    icmpv6_to_all_nodes(mac, icmp)
}

/// Three hosts: the attacker x on host 0, the observer o on host 1, the victim v on host 2.
fn containers_cannot_lie(test: &str, password: Option<&str>, path: &str) {
    if !weft_lab::require_lab(test, &["nft", "ping", "bridge"]) {
        return;
    }
    let Some(mut lab) = lab(test, 3, password, &[]) else { return };
    start_star(&mut lab);
    for i in 0..3 {
        lab.wait_established(i, 2, UP).expect("connected");
    }
    let x = lab.add_container(0, "x", "10.50.0.9/24").expect("x");
    let o = lab.add_container(1, "o", "10.50.0.1/24").expect("o");
    let v = lab.add_container(2, "v", "10.50.0.2/24").expect("v");
    assert!(ping_until(&lab, &o, "10.50.0.2", &[], UP), "o cannot reach v");
    assert!(ping_until(&lab, &x, "10.50.0.1", &[], UP), "x cannot reach o");
    let conn = status(&lab, 1)["connections"].as_array().cloned().unwrap_or_default();
    assert!(conn.iter().all(|c| c["path"] == path), "not all on the {path}: {conn:?}");
    let (xm, vm) = (mac_of(&lab, &x), mac_of(&lab, &v));
    assert_eq!(neighbour(&lab, &o, "10.50.0.2"), Some(mac_text(vm)));
    let port = port_of(&lab, 0, &x);
    assert_eq!(port["mac"], mac_text(xm), "the guard pins x's MAC: {}", status(&lab, 0)["guard"]);

    // 1. x takes another MAC: nothing it sends passes.
    let before = dropped(&lab, 0, &x, "mac");
    lab.exec(&x.ns, &["ip", "link", "set", "ethwe", "address", "02:66:66:66:66:66"]).expect("set mac");
    let out = lab.exec(&x.ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.50.0.1"]).expect("ping");
    assert!(!out.status.success(), "x reached o with a MAC that is not its own");
    assert!(dropped(&lab, 0, &x, "mac") > before, "the MAC drops are not counted");
    lab.exec(&x.ns, &["ip", "link", "set", "ethwe", "address", &mac_text(xm)]).expect("restore mac");

    // 2. x adds v's address, claims it in gratuitous ARP (reply and request forms) and sends
    //    from it.
    let capture = Capture::start(&x.ns, "ethwe");
    lab.exec(&x.ns, &["ip", "addr", "add", "10.50.0.2/24", "dev", "ethwe"]).expect("addr add");
    let v_ip = [10, 50, 0, 2];
    send_frames(&x, vec![
        arp_frame(2, xm, v_ip, [0xff; 6], v_ip),
        arp_frame(1, xm, v_ip, [0; 6], v_ip),
        arp_frame(2, xm, v_ip, mac_of(&lab, &o), [10, 50, 0, 1]),
    ]);
    let _ = lab.exec(&x.ns, &["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "10.50.0.2", "10.50.0.1"]);
    let out = lab.exec(&o.ns, &["ping", "-c", "5", "-i", "0.2", "-W", "1", "10.50.0.2"]).expect("ping");
    assert!(out.status.success(), "o lost v after x claimed its address");
    assert_eq!(neighbour(&lab, &o, "10.50.0.2"), Some(mac_text(vm)), "o's ARP entry for v was poisoned");
    let frames = capture.finish();
    let to_v = frames.iter().filter(|f| f.len() > 34 && f[12..14] == [8, 0] && f[23] == 1 && f[30..34] == v_ip && f[26..30] == [10, 50, 0, 1]).count();
    assert_eq!(to_v, 0, "x received o's pings to v");
    assert!(dropped(&lab, 0, &x, "arp") >= 3, "ARP drops not counted: {}", port_of(&lab, 0, &x));
    lab.exec(&x.ns, &["ip", "addr", "del", "10.50.0.2/24", "dev", "ethwe"]).expect("addr del");

    // 3. x advertises itself as an IPv6 router.
    send_frames(&x, vec![router_advertisement(xm); 3]);
    std::thread::sleep(Duration::from_secs(2));
    let routes = lab.exec(&o.ns, &["ip", "-6", "route", "show"]).expect("routes");
    let routes = String::from_utf8_lossy(&routes.stdout).to_string();
    assert!(!routes.contains("default") && !routes.contains("fd66"), "o took x's router advertisement: {routes}");
    assert!(dropped(&lab, 0, &x, "ra") >= 3, "RA drops not counted: {}", port_of(&lab, 0, &x));

    // 4. A flood of 100,000 frames from random MACs while o keeps pinging v.
    let before = dropped(&lab, 0, &x, "mac");
    let flood: Vec<Vec<u8>> = (0..100_000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[0x02, 0x77, b[0], b[1], b[2], b[3]]);
            f.extend_from_slice(&[0x08, 0x00]);
            f.resize(60, 0);
            f
        })
        .collect();
    let flooder = {
        let x = x.clone();
        std::thread::spawn(move || send_frames(&x, flood))
    };
    let out = lab.exec(&o.ns, &["ping", "-q", "-c", "40", "-i", "0.05", "-W", "1", "10.50.0.2"]).expect("ping");
    flooder.join().expect("flood");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let received: u32 = text.split(", ").find(|p| p.ends_with("received")).and_then(|p| p.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    assert!(received >= 38, "o's pings to v suffered under the flood: {text}");
    let fdb = lab.exec(&lab.host(0).ns, &["bridge", "fdb", "show", "br", "weft"]).expect("fdb");
    let learned = String::from_utf8_lossy(&fdb.stdout).lines().filter(|l| l.contains("02:77:")).count();
    assert_eq!(learned, 0, "the bridge learned flooded MACs");
    assert!(dropped(&lab, 0, &x, "mac") >= before + 100_000, "flood drops not counted: {}", port_of(&lab, 0, &x));

    // After all that, x still works as itself, and status shows what it was refused.
    assert!(ping_until(&lab, &x, "10.50.0.2", &[], UP), "x cannot reach v as itself");
    let human = lab.weft(0, &["status", "ports"]).expect("status ports");
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(human.contains(&mac_text(xm)) && human.contains("ra 3"), "{human}");
}

#[test]
fn containers_cannot_lie_on_the_fastpath() {
    containers_cannot_lie("containers_cannot_lie_on_the_fastpath", None, "fastpath");
}

#[test]
fn containers_cannot_lie_on_the_sleeve() {
    containers_cannot_lie("containers_cannot_lie_on_the_sleeve", Some("correct horse battery"), "sleeve");
}

/// Host 0 gets a port on its bridge that weft did not make (a host whose operator bypasses the
/// guard, or a dishonest peer): host 1 takes none of its frames, on the sleeve or through the
/// fastpath, and counts them against host 0.
fn a_peer_sends_only_from_macs_it_announced(test: &str, password: Option<&str>, path: &str) {
    if !weft_lab::require_lab(test, &["nft", "ping"]) {
        return;
    }
    let Some(mut lab) = lab(test, 2, password, &[]) else { return };
    start_star(&mut lab);
    lab.wait_established(1, 1, UP).expect("connected");
    let a = lab.add_container(0, "a", "10.50.0.1/24").expect("a");
    let b = lab.add_container(1, "b", "10.50.0.2/24").expect("b");
    assert!(ping_until(&lab, &a, "10.50.0.2", &[], UP), "a cannot reach b");
    let conn = status(&lab, 1)["connections"][0].clone();
    assert_eq!(conn["path"], path, "{conn}");
    assert_eq!(conn["unannounced_frames"], 0);

    // The rogue port: a plain veth on host 0's bridge, no guard.
    let evil_ns = lab.add_namespace("evil").expect("namespace");
    let host0 = lab.host(0).ns.clone();
    for cmd in [
        vec!["ip", "link", "add", "wevil0", "type", "veth", "peer", "name", "ethwe", "netns", evil_ns.as_str()],
        vec!["ip", "link", "set", "wevil0", "master", "weft", "up"],
    ] {
        let o = lab.exec(&host0, &cmd).expect("ip");
        assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for cmd in [vec!["ip", "addr", "add", "10.50.0.66/24", "dev", "ethwe"], vec!["ip", "link", "set", "ethwe", "up"]] {
        lab.exec(&evil_ns, &cmd).expect("ip");
    }
    let evil = Container { ns: evil_ns, host: 0, ip: "10.50.0.66".parse().expect("ip") };
    let evil_mac = mac_of(&lab, &evil);

    // Its broadcasts (ARP) go through the sleeve whatever the path: refused there.
    let out = lab.exec(&evil.ns, &["ping", "-c", "3", "-i", "0.3", "-W", "1", "10.50.0.2"]).expect("ping");
    assert!(!out.status.success(), "the rogue port reached b");
    assert!(status(&lab, 1)["connections"][0]["unannounced_frames"].as_u64().unwrap_or(0) >= 3);

    // Unicast straight to b's MAC, which host 0's bridge sends into the fastpath when there is
    // one: b receives none of it.
    let capture = Capture::start(&b.ns, "ethwe");
    let frames: Vec<Vec<u8>> = (0..20u8)
        .map(|i| {
            let mut f = mac_of(&lab, &b).to_vec();
            f.extend_from_slice(&evil_mac);
            f.extend_from_slice(&[0x88, 0xb6, 0xee, i]);
            f.resize(60, 0);
            f
        })
        .collect();
    send_frames(&evil, frames);
    std::thread::sleep(Duration::from_millis(500));
    let seen = capture.finish().iter().filter(|f| f.len() >= 14 && f[6..12] == evil_mac).count();
    assert_eq!(seen, 0, "b received frames from a MAC host 0 never announced");
    if path == "fastpath" {
        // The filter's counters are read once a second.
        let ip = lab.host(0).underlay_ip.to_string();
        let n = || status(&lab, 1)["fastpath"]["source_filter"]["unannounced_by_peer"][&ip].as_u64().unwrap_or(0);
        assert!(wait_for(Duration::from_secs(5), || n() >= 20), "the fastpath filter did not count them against {ip}: {}", status(&lab, 1)["fastpath"]["source_filter"]);
    }
    let st = status(&lab, 1);
    if path != "fastpath" {
        assert!(st["connections"][0]["unannounced_frames"].as_u64().unwrap_or(0) >= 23, "{}", st["connections"][0]);
    }
    // Host 0's own containers are unaffected, and host 1 knows what host 0 announces.
    assert!(ping_until(&lab, &a, "10.50.0.2", &[], UP), "a lost b");
    assert_eq!(st["macs"]["by_peer"][lab.weft_json(0, &["status"]).expect("status")["name"].as_str().unwrap_or("")], 1, "{}", st["macs"]);
}

#[test]
fn a_peer_sends_only_from_macs_it_announced_on_the_fastpath() {
    a_peer_sends_only_from_macs_it_announced("a_peer_sends_only_from_macs_it_announced_on_the_fastpath", None, "fastpath");
}

#[test]
fn a_peer_sends_only_from_macs_it_announced_on_the_sleeve() {
    a_peer_sends_only_from_macs_it_announced("a_peer_sends_only_from_macs_it_announced_on_the_sleeve", Some("correct horse battery"), "sleeve");
}

/// The guard lets honest IPv6 through: duplicate address detection, neighbour discovery,
/// global and link-local pings between containers on two hosts, and a spoofed neighbour
/// advertisement for the other container's address is still refused.
#[test]
fn ipv6_passes_the_guard_and_nd_spoofing_does_not() {
    let test = "ipv6_passes_the_guard_and_nd_spoofing_does_not";
    if !weft_lab::require_lab(test, &["nft", "ping"]) {
        return;
    }
    let Some(mut lab) = lab(test, 2, None, &[]) else { return };
    start_star(&mut lab);
    lab.wait_established(1, 1, UP).expect("connected");
    let mut containers = Vec::new();
    for (h, name, v4, v6) in [(0, "p", "10.50.0.11/24", "fd50::11/64"), (1, "q", "10.50.0.12/24", "fd50::12/64")] {
        let ns = lab.add_namespace(name).expect("namespace");
        let out = lab.weft(h, &["attach", &ns, v4, v6]).expect("attach");
        assert!(out.status.success(), "attach: {}", String::from_utf8_lossy(&out.stderr));
        containers.push(Container { ns, host: h, ip: v4.split('/').next().unwrap_or("").parse().expect("ip") });
    }
    let (p, q) = (&containers[0], &containers[1]);
    assert!(ping_until(&lab, p, "fd50::12", &["-6"], UP), "p cannot reach q over IPv6");
    let q_mac = mac_of(&lab, q);
    let ll = |m: [u8; 6]| format!("fe80::{:x}:{:x}:{:x}:{:x}", u16::from_be_bytes([m[0] ^ 2, m[1]]), u16::from_be_bytes([m[2], 0xff]), u16::from_be_bytes([0xfe, m[3]]), u16::from_be_bytes([m[4], m[5]]));
    assert!(ping_until(&lab, p, &format!("{}%ethwe", ll(q_mac)), &["-6"], UP), "p cannot reach q's link-local address");
    let port = port_of(&lab, 0, p);
    assert_eq!(port["dropped"]["ip6"], 0, "honest IPv6 was dropped: {port}");
    assert_eq!(port["dropped"]["nd"], 0, "honest neighbour discovery was dropped: {port}");

    // p claims fd50::12 in an unsolicited neighbour advertisement (override flag set).
    let p_mac = mac_of(&lab, p);
    let target: std::net::Ipv6Addr = "fd50::12".parse().expect("ip");
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&p_mac);
    send_frames(p, vec![icmpv6_to_all_nodes(p_mac, icmp); 3]);
    assert!(wait_for(Duration::from_secs(5), || dropped(&lab, 0, p, "nd") >= 3), "{}", port_of(&lab, 0, p));
}
