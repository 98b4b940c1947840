//! Hosts behind NAT routers (lab namespaces with nftables masquerade; `weft_lab::nat`). The
//! sleeve sends to the address a peer's authenticated datagrams come from, so a host behind any
//! NAT carries traffic with a public peer, and hosts behind NATs reach each other through it.

mod common;

use std::time::Duration;

use common::*;
use weft_lab::{Lab, LabConfig, Nat};

fn nat_lab(test: &str, nats: &[(usize, Nat)], hosts: usize) -> Option<Lab> {
    if !weft_lab::require_root(test) {
        return None;
    }
    let _ = weft_lab::cleanup_stale();
    let mut cfg = LabConfig::new(hosts, env!("CARGO_BIN_EXE_weft"));
    cfg.password = Some("nat-test-password".into());
    for &(i, kind) in nats {
        cfg = cfg.behind_nat(i, kind);
    }
    Some(Lab::new(cfg).expect("building the lab"))
}

#[test]
fn hosts_behind_nats_carry_traffic_through_a_public_host() {
    // Host 0 public; host 1 behind a masquerading NAT that filters by address and port (Linux's
    // plain masquerade), host 2 behind one that picks a new port per destination.
    let Some(mut lab) = nat_lab("hosts_behind_nats_carry_traffic_through_a_public_host", &[(1, Nat::Filtering), (2, Nat::Symmetric)], 3) else {
        return;
    };
    start_star(&mut lab);
    lab.wait_established(0, 2, Duration::from_secs(30)).expect("the public host has both");
    for i in [1, 2] {
        lab.wait_established(i, 1, Duration::from_secs(30)).expect("each NATed host has the public one");
    }
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    let c2 = lab.add_container_auto(2, "c2").expect("c2");
    let ip = |c: &weft_lab::Container| c.ip.to_string();
    assert!(ping_until(&lab, &c1, &ip(&c0), &[], Duration::from_secs(20)), "behind a filtering NAT: reaches the public host");
    assert!(ping_until(&lab, &c2, &ip(&c0), &[], Duration::from_secs(20)), "behind a symmetric NAT: reaches the public host");
    assert!(ping_until(&lab, &c0, &ip(&c1), &[], Duration::from_secs(10)), "and is reached from it");
    assert!(ping_until(&lab, &c1, &ip(&c2), &[], Duration::from_secs(20)), "two NATed hosts reach each other through the public one");
    // The public host sends to where the NATs map them: their outside addresses.
    let s = status(&lab, 0);
    for i in [1, 2] {
        let outside = lab.nat_outside(i).expect("outside").to_string();
        let conn = s["connections"].as_array().and_then(|cs| cs.iter().find(|c| c["peer_nickname"] == format!("h{i}")).cloned()).unwrap_or_default();
        let ep = conn["udp_endpoint"].as_str().unwrap_or_default();
        assert!(ep.starts_with(&format!("{outside}:")), "h{i}: sleeve endpoint {ep}, NAT outside {outside}: {conn}");
        assert_eq!(conn["state"], "established", "{conn}");
    }
    // The symmetric NAT gave the sleeve a port of its own: the public host followed it.
    let h2 = s["connections"].as_array().and_then(|cs| cs.iter().find(|c| c["peer_nickname"] == "h2").cloned()).unwrap_or_default();
    assert!(h2["udp_endpoint_moves"].as_u64().unwrap_or(0) >= 1 || !h2["udp_endpoint"].as_str().unwrap_or_default().ends_with(":6783"), "{h2}");

    // h1 and h2 have no direct connection (neither can dial the other): each says the other is
    // relayed, and through whom.
    let s1 = status(&lab, 1);
    let h2_seen = s1["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["nickname"] == "h2").cloned()).unwrap_or_default();
    assert_eq!(h2_seen["via"]["nickname"], "h0", "{h2_seen}");
    let text = lab.weft(1, &["status", "peers"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(text.contains("relayed via h0"), "{text}");

    // The NATs forget every mapping (conntrack flushed, as after a NAT reboot): traffic comes
    // back within 10 s, with no one doing anything.
    for i in [1, 2] {
        lab.nat_flush_conntrack(i).expect("conntrack -F");
    }
    assert!(ping_until(&lab, &c1, &ip(&c0), &[], Duration::from_secs(10)), "h1 recovers after its NAT forgot the mapping");
    assert!(ping_until(&lab, &c2, &ip(&c0), &[], Duration::from_secs(10)), "h2 recovers after its NAT forgot the mapping");
    assert!(ping_until(&lab, &c1, &ip(&c2), &[], Duration::from_secs(10)), "and through the public host again");
}

#[test]
fn idle_connections_through_nats_stay_open() {
    // NATs that forget a UDP mapping after 5 s of quiet (the 30 s, shortened): the
    // sleeve's heartbeats (one a second each way) keep the mappings, so an idle mesh carries
    // traffic again at once after 20 s without any.
    let Some(mut lab) = nat_lab("idle_connections_through_nats_stay_open", &[(1, Nat::Filtering), (2, Nat::Symmetric)], 3) else {
        return;
    };
    for i in [1, 2] {
        lab.nat_set_udp_timeout(i, 5).expect("conntrack timeouts");
    }
    start_star(&mut lab);
    lab.wait_established(0, 2, Duration::from_secs(30)).expect("mesh up");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    let c2 = lab.add_container_auto(2, "c2").expect("c2");
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(20)), "through the public host");
    let moves = |lab: &Lab| -> u64 {
        status(lab, 0)["connections"].as_array().map_or(0, |cs| cs.iter().filter_map(|c| c["udp_endpoint_moves"].as_u64()).sum())
    };
    let before = moves(&lab);
    std::thread::sleep(Duration::from_secs(20));
    // One try, no retries: the path must be there already.
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(2)), "after 20 s idle");
    assert_eq!(moves(&lab), before, "no mapping was lost meanwhile (the public host never had to follow a new one)");
    for i in 0..3 {
        assert_eq!(established(&lab, i), if i == 0 { 2 } else { 1 }, "h{i} kept its connections");
    }
}

#[test]
fn a_smaller_link_on_the_path_is_found_and_full_size_frames_get_through() {
    // Host 1 sits behind a router whose inside link takes 1280-byte packets (a VPN link, a
    // tunnel): the public host learns it from the router's ICMP "fragmentation needed", host 1
    // from its own link, and both fit their sleeve datagrams to it, with no setting.
    let Some(mut lab) = nat_lab("a_smaller_link_on_the_path_is_found_and_full_size_frames_get_through", &[(1, Nat::Filtering)], 2) else {
        return;
    };
    let (nat, host) = (lab.nat_ns(1).expect("nat ns").to_owned(), lab.host(1).ns.clone());
    lab.set_mtu(&nat, weft_lab::nat::NAT_INSIDE_IF, 1280).expect("mtu");
    lab.set_mtu(&host, "ul0", 1280).expect("mtu");
    start_star(&mut lab);
    lab.wait_established(0, 1, Duration::from_secs(30)).expect("mesh up");
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    assert!(ping_until(&lab, &c1, &c0.ip.to_string(), &[], Duration::from_secs(20)), "small pings");
    // Full-size packets for the containers' MTU (1376): 1348 bytes of ICMP data, DF set.
    for (from, to) in [(&c1, &c0), (&c0, &c1)] {
        assert!(
            ping_until(&lab, from, &to.ip.to_string(), &["-s", "1348", "-M", "do"], Duration::from_secs(15)),
            "a full-size ping {} -> {} gets through the 1280-byte link",
            from.ns,
            to.ip
        );
    }
    for i in [0, 1] {
        let s = status(&lab, i);
        let conn = s["connections"][0].clone();
        assert_eq!(conn["path_mtu"], 1280, "h{i}: {conn}");
    }
    // And many of them in a row: nothing lost once the path is known.
    let out = lab.exec(&c0.ns, &["ping", "-c", "20", "-i", "0.05", "-s", "1348", "-M", "do", "-W", "1", &c1.ip.to_string()]).expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");
}
