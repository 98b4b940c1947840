//! Hosts behind NAT routers (lab namespaces with nftables masquerade; `weft_lab::nat`). The
//! sleeve sends to the address a peer's authenticated datagrams come from, so a host behind any
//! NAT carries traffic with a public peer, and hosts behind NATs reach each other through it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use weft_lab::{Lab, LabConfig, Nat, Stack};

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
    // (On failure, the three hosts' views, to tell a lost control connection from a lost path.)
    assert!(
        ping_until(&lab, &c1, &ip(&c2), &[], Duration::from_secs(10)),
        "and through the public host again\nh1 {}\nh2 {}\nh0 {}",
        status(&lab, 1)["connections"],
        status(&lab, 2)["peers"],
        status(&lab, 0)["connections"]
    );
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
    // Bulk TCP both ways with default settings: it flows, and the sleeve drops nothing.
    let before: Vec<Value> = (0..2).map(|i| status(&lab, i)["stats"]["drops"].clone()).collect();
    for (from, to) in [(&c1, &c0), (&c0, &c1)] {
        let bytes = iperf3(&lab, from, to, 3)["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 5 << 20, "{} -> {}: only {bytes} bytes", from.ns, to.ip);
    }
    for (i, before) in before.iter().enumerate() {
        let after = status(&lab, i)["stats"]["drops"].clone();
        for reason in ["udp_send", "path_mtu", "tap_write", "partial_expired"] {
            assert_eq!(after[reason], before[reason], "h{i} dropped ({reason}) during the transfers: {after}");
        }
    }
}

#[test]
fn a_path_mtu_that_shrinks_during_a_transfer_is_followed() {
    // The link between host 1 and its router drops from 1500 to 1400 bytes while a bulk
    // transfer runs (a VPN renegotiated, a tunnel added): the router's ICMP teaches the public
    // host, host 1 learns from its own link, both sleeves fit their datagrams within seconds,
    // and the transfer carries on.
    let Some(mut lab) = nat_lab("a_path_mtu_that_shrinks_during_a_transfer_is_followed", &[(1, Nat::Filtering)], 2) else {
        return;
    };
    start_star(&mut lab);
    lab.wait_established(0, 1, Duration::from_secs(30)).expect("mesh up");
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    assert!(ping_until(&lab, &c1, &c0.ip.to_string(), &[], Duration::from_secs(20)), "c1 -> c0");
    let mtu = |lab: &Lab, i: usize| status(lab, i)["connections"][0]["path_mtu"].as_u64().unwrap_or(0);
    assert_eq!((mtu(&lab, 0), mtu(&lab, 1)), (1500, 1500));
    let _server = spawn_in(&c0.ns, &["iperf3", "-s", "-1", "-p", "5201"]);
    std::thread::sleep(Duration::from_millis(500));
    let client = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c1.ns))
        .args(["iperf3", "-c", &c0.ip.to_string(), "-p", "5201", "-t", "14", "-i", "1", "-J", "--bidir"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 client");
    std::thread::sleep(Duration::from_secs(3));
    let (nat, host) = (lab.nat_ns(1).expect("nat ns").to_owned(), lab.host(1).ns.clone());
    lab.set_mtu(&nat, weft_lab::nat::NAT_INSIDE_IF, 1400).expect("mtu");
    lab.set_mtu(&host, "ul0", 1400).expect("mtu");
    let t0 = std::time::Instant::now();
    assert!(wait_for(Duration::from_secs(30), || mtu(&lab, 0) == 1400 && mtu(&lab, 1) == 1400), "path MTU seen: h0 {}, h1 {}", mtu(&lab, 0), mtu(&lab, 1));
    eprintln!("the smaller path MTU was in use on both ends {:.1} s after the change", t0.elapsed().as_secs_f64());
    let out = client.wait_with_output().expect("iperf3 client");
    let j: Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    // Both directions kept moving after the change: each of the last five seconds carried data.
    let intervals = j["intervals"].as_array().cloned().unwrap_or_default();
    assert!(intervals.len() >= 12, "{} intervals", intervals.len());
    for iv in &intervals[intervals.len() - 5..] {
        for key in ["sum", "sum_bidir_reverse"] {
            let bytes = iv[key]["bytes"].as_u64().unwrap_or(0);
            assert!(bytes > 100_000, "a late second carried {bytes} bytes ({key}): {iv}");
        }
    }
}

/// Host `i`'s connection to the host nicknamed `peer`, if any.
fn conn_to(lab: &Lab, i: usize, peer: &str) -> Option<serde_json::Value> {
    status(lab, i)["connections"].as_array().and_then(|cs| cs.iter().find(|c| c["peer_nickname"] == peer).cloned())
}

/// Runs each `nft` command (words split on spaces) in namespace `ns`; panics with nft's message
/// if one fails.
fn nft(lab: &Lab, ns: &str, cmds: &[&str]) {
    for cmd in cmds {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        let out = lab.exec(ns, &args).expect("nft");
        assert!(out.status.success(), "nft {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Bytes received on the public host's underlay link.
fn public_rx_bytes(lab: &Lab) -> u64 {
    // /proc/net/dev is the reader's namespace's (sysfs would be the mount's).
    let out = lab.exec(&lab.host(0).ns, &["cat", "/proc/net/dev"]).expect("/proc/net/dev");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.trim_start().starts_with("ul0:")).unwrap_or_else(|| panic!("no ul0 in {text}"));
    line.split_once(':').and_then(|(_, v)| v.split_whitespace().next()?.parse().ok()).expect("rx bytes")
}

#[test]
fn hosts_behind_cone_nats_punch_a_direct_path_and_a_symmetric_nat_is_relayed() {
    // h0 public; h1 behind a full-cone NAT, h2 behind a port-restricted one (Linux's plain
    // masquerade), h3 behind a symmetric one. Each is given h0 only.
    let nats = [(1, Nat::PortPreserving), (2, Nat::Filtering), (3, Nat::Symmetric)];
    let Some(mut lab) = nat_lab("hosts_behind_cone_nats_punch_a_direct_path_and_a_symmetric_nat_is_relayed", &nats, 4) else {
        return;
    };
    // NATs that forget a quiet UDP mapping after 5 s (the 30 s, shortened).
    for (i, _) in nats {
        lab.nat_set_udp_timeout(i, 5).expect("conntrack timeouts");
    }
    start_star(&mut lab);
    lab.wait_established(0, 3, Duration::from_secs(30)).expect("the public host has all three");
    // h1 and h2 learn each other's outside address from h0, dial it over QUIC, and each asks
    // the other (through h0) to dial back at once: the port-restricted NAT lets h1 in once h2
    // has sent to h1.
    let direct = |lab: &Lab, i: usize, peer: usize| -> Option<serde_json::Value> {
        conn_to(lab, i, &format!("h{peer}")).filter(|c| c["state"] == "established")
    };
    let up = wait_for(Duration::from_secs(45), || direct(&lab, 1, 2).is_some() && direct(&lab, 2, 1).is_some());
    assert!(up, "h1-h2 direct: {:?} / {:?}\n{}", conn_to(&lab, 1, "h2"), conn_to(&lab, 2, "h1"), status(&lab, 1)["targets"]);
    for (i, peer) in [(1, 2), (2, 1)] {
        let c = direct(&lab, i, peer).expect("direct");
        assert_eq!(c["transport"], "quic", "h{i}: {c}");
        let outside = lab.nat_outside(peer).expect("outside").to_string();
        assert!(c["udp_endpoint"].as_str().unwrap_or_default().starts_with(&format!("{outside}:")), "h{i} sends to h{peer}'s NAT: {c}");
        let s = status(&lab, i);
        assert!(s["outside"].as_array().is_some_and(|o| !o.is_empty()), "h{i} knows its outside address: {}", s["outside"]);
    }
    // The full cone takes anyone's datagrams, so h3 gets a direct path to h1 as well.
    assert!(wait_for(Duration::from_secs(45), || direct(&lab, 3, 1).is_some()), "h3-h1 direct: {:?}", conn_to(&lab, 3, "h1"));

    // Container traffic between h1 and h2 goes straight between their NATs, not through h0.
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    let c2 = lab.add_container_auto(2, "c2").expect("c2");
    let c3 = lab.add_container_auto(3, "c3").expect("c3");
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(20)), "c1 -> c2");
    let relayed = |lab: &Lab| status(lab, 0)["stats"]["frames_relayed"].as_u64().unwrap_or(0);
    let (rx0, relayed0) = (public_rx_bytes(&lab), relayed(&lab));
    let out = lab.exec(&c1.ns, &["ping", "-c", "400", "-i", "0.005", "-s", "1300", "-W", "1", &c2.ip.to_string()]).expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");
    let (rx1, relayed1) = (public_rx_bytes(&lab), relayed(&lab));
    // 400 × 1328-byte packets each way is over 1 MB; h0 hears only heartbeats and gossip.
    assert!(rx1 - rx0 < 200_000, "h0 received {} bytes during a 1 MB exchange between h1 and h2", rx1 - rx0);
    // (Broadcasts, such as the new containers' IPv6 chatter, still go along h0's trees.)
    assert!(relayed1 - relayed0 < 80, "h0 relayed {} frames during 800 pings between h1 and h2", relayed1 - relayed0);

    // h2 and h3: h3's NAT gives each destination a new port, and h2's lets in only what h2
    // sent to: no hole can be punched. They stay relayed (through h0 or h1, both connected to
    // each), and say why; h3's two neighbours saw it on two ports, which h2 reads as symmetric.
    std::thread::sleep(Duration::from_secs(3));
    let s2 = status(&lab, 2);
    let h3 = s2["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["nickname"] == "h3").cloned()).unwrap_or_default();
    let via = h3["via"]["nickname"].as_str().unwrap_or_default().to_owned();
    assert!(via == "h0" || via == "h1", "{h3}");
    assert!(conn_to(&lab, 2, "h3").is_none(), "no direct connection h2-h3");
    assert_eq!(h3["outside"].as_array().map_or(0, Vec::len), 2, "{h3}");
    let reason = h3["via"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no direct path") && reason.contains("symmetric NAT"), "{reason}");
    let text = lab.weft(2, &["status", "peers"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(text.contains(&format!("relayed via {via}: no direct path")), "{text}");
    assert!(ping_until(&lab, &c3, &c2.ip.to_string(), &[], Duration::from_secs(20)), "c3 -> c2, relayed");
    assert!(status(&lab, 2)["stats"]["punches_sent"].as_u64().unwrap_or(0) >= 1);

    // A NAT that forgets its mappings (conntrack flushed): the direct connection comes back
    // by itself within 10 s (the sleeve follows; QUIC carries on from the new mapping).
    lab.nat_flush_conntrack(2).expect("conntrack -F");
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(10)), "c1 -> c2 after h2's NAT forgot everything");

    // Quiet for four times the NATs' timeout: the sleeve's heartbeats keep the punched
    // mappings open, so the same direct connection carries traffic at once.
    let before = direct(&lab, 1, 2).and_then(|c| c["up_seconds"].as_u64()).expect("direct");
    std::thread::sleep(Duration::from_secs(20));
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(2)), "after 20 s idle");
    let after = direct(&lab, 1, 2).and_then(|c| c["up_seconds"].as_u64()).expect("still direct");
    assert!(after >= before + 20, "the same connection: up {before} s, then {after} s");
}

#[test]
fn a_host_whose_firewall_drops_tcp_joins_over_udp() {
    // h1's firewall drops TCP on 6783 both ways (a site that lets only UDP 6783 through): its
    // control connection to h0 goes over QUIC on the UDP port, and containers reach each other.
    let Some(mut lab) = nat_lab("a_host_whose_firewall_drops_tcp_joins_over_udp", &[], 2) else {
        return;
    };
    let ns = lab.host(1).ns.clone();
    nft(
        &lab,
        &ns,
        &[
            "add table inet weft_test_fw",
            "add chain inet weft_test_fw input { type filter hook input priority 0; policy accept; }",
            "add chain inet weft_test_fw output { type filter hook output priority 0; policy accept; }",
            "add rule inet weft_test_fw input tcp dport 6783 counter drop",
            "add rule inet weft_test_fw output tcp dport 6783 counter drop",
        ],
    );
    start_star(&mut lab);
    lab.wait_established(1, 1, Duration::from_secs(30)).expect("h1 joins");
    let c = conn_to(&lab, 1, "h0").expect("h1's connection");
    assert_eq!(c["transport"], "quic", "{c}");
    // The sleeve's round trip (heartbeat echoes) reaches the routes' costs.
    assert!(wait_for(Duration::from_secs(15), || conn_to(&lab, 1, "h0").is_some_and(|c| c["rtt_ms"].as_f64().is_some_and(|r| r > 0.0))), "{:?}", conn_to(&lab, 1, "h0"));
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    assert!(ping_until(&lab, &c1, &c0.ip.to_string(), &[], Duration::from_secs(20)), "c1 -> c0");
    assert!(ping_until(&lab, &c0, &c1.ip.to_string(), &[], Duration::from_secs(20)), "c0 -> c1");
    let rules = lab.exec(&ns, &["nft", "list", "table", "inet", "weft_test_fw"]).expect("nft list");
    let rules = String::from_utf8_lossy(&rules.stdout);
    let dropped: u64 = rules.split("packets ").skip(1).filter_map(|r| r.split(' ').next()?.parse::<u64>().ok()).sum();
    assert!(dropped > 0, "the firewall did drop TCP: {rules}");
}

#[test]
fn a_path_that_drops_big_packets_without_an_icmp_is_found_by_probing() {
    // Host 1's NAT router has a 1400-byte link to the outside, and its "fragmentation needed"
    // messages are filtered (a black hole: big packets vanish without a word). The kernels on
    // both ends keep believing 1500; the sleeves' probes find what gets through, and full-size
    // packets between containers cross again.
    let Some(mut lab) = nat_lab("a_path_that_drops_big_packets_without_an_icmp_is_found_by_probing", &[(1, Nat::Filtering)], 2) else {
        return;
    };
    let nat = lab.nat_ns(1).expect("nat ns").to_owned();
    nft(
        &lab,
        &nat,
        &[
            "add table inet weft_test_bh",
            "add chain inet weft_test_bh out { type filter hook output priority 0; policy accept; }",
            "add rule inet weft_test_bh out icmp type 3 icmp code 4 counter drop",
        ],
    );
    lab.set_mtu(&nat, weft_lab::nat::NAT_OUTSIDE_IF, 1400).expect("mtu");
    start_star(&mut lab);
    lab.wait_established(0, 1, Duration::from_secs(30)).expect("mesh up");
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    assert!(ping_until(&lab, &c1, &c0.ip.to_string(), &[], Duration::from_secs(20)), "small pings");
    let conn = |lab: &Lab, i: usize| status(lab, i)["connections"][0].clone();
    let t0 = std::time::Instant::now();
    let found = wait_for(Duration::from_secs(40), || {
        (0..2).all(|i| {
            let c = conn(&lab, i);
            c["path_mtu_probing"].as_str().unwrap_or_default().starts_with("confirmed")
        })
    });
    eprintln!("probing settled {:.1} s after the first ping", t0.elapsed().as_secs_f64());
    assert!(found, "h0: {}\nh1: {}", conn(&lab, 0), conn(&lab, 1));
    for i in 0..2 {
        let c = conn(&lab, i);
        // Within a few bytes of 1400 (a veth takes a few bytes over its MTU on receive, so
        // towards host 1 up to 1404 get through).
        assert!(c["path_mtu"].as_u64().is_some_and(|m| (1388..=1404).contains(&m)), "found to within a few bytes: {c}");
        assert!(c["path_mtu_probing"].as_str().unwrap_or_default().contains("black hole"), "{c}");
    }
    for (from, to) in [(&c1, &c0), (&c0, &c1)] {
        assert!(
            ping_until(&lab, from, &to.ip.to_string(), &["-s", "1348", "-M", "do"], Duration::from_secs(10)),
            "a full-size ping {} -> {} crosses the black hole\nh0: {}\nh1: {}",
            from.ns,
            to.ip,
            conn(&lab, 0),
            conn(&lab, 1)
        );
    }
}

#[test]
fn an_ipv6_underlay_and_a_dual_stack_host_relaying_between_families() {
    // h0 has IPv4 and IPv6, h1 IPv4 only, h2 IPv6 only. h2 joins h0 over IPv6; h1 and h2
    // share no address family, so h0 relays between them.
    if !weft_lab::require_root("an_ipv6_underlay_and_a_dual_stack_host_relaying_between_families") {
        return;
    }
    let _ = weft_lab::cleanup_stale();
    let mut cfg = LabConfig::new(3, env!("CARGO_BIN_EXE_weft")).with_stack(0, Stack::Dual).with_stack(2, Stack::V6);
    cfg.password = Some("nat-test-password".into());
    let mut lab = Lab::new(cfg).expect("building the lab");
    start_star(&mut lab);
    lab.wait_established(0, 2, Duration::from_secs(30)).expect("h0 has both");
    let to_h0 = conn_to(&lab, 2, "h0").expect("h2's connection");
    assert!(to_h0["address"].as_str().unwrap_or_default().starts_with("[fd77::1]:"), "over IPv6: {to_h0}");
    assert!(to_h0["udp_endpoint"].as_str().unwrap_or_default().starts_with("[fd77::1]:"), "{to_h0}");
    let to_h1 = conn_to(&lab, 0, "h1").expect("h0's connection to h1");
    assert!(to_h1["address"].as_str().unwrap_or_default().starts_with("192.168.77.2:"), "IPv4 peers of a dual-stack host are plain IPv4: {to_h1}");
    let c0 = lab.add_container_auto(0, "c0").expect("c0");
    let c1 = lab.add_container_auto(1, "c1").expect("c1");
    let c2 = lab.add_container_auto(2, "c2").expect("c2");
    assert!(ping_until(&lab, &c2, &c0.ip.to_string(), &[], Duration::from_secs(20)), "c2 -> c0 over IPv6");
    // Full-size frames over IPv6, whose headers are 20 bytes longer.
    assert!(ping_until(&lab, &c2, &c0.ip.to_string(), &["-s", "1348", "-M", "do"], Duration::from_secs(10)), "full size over IPv6");
    assert_eq!(conn_to(&lab, 2, "h0").expect("conn")["path_mtu"], 1500);
    assert!(ping_until(&lab, &c1, &c2.ip.to_string(), &[], Duration::from_secs(20)), "c1 -> c2 through h0");
    let s1 = status(&lab, 1);
    let h2 = s1["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["nickname"] == "h2").cloned()).unwrap_or_default();
    assert_eq!(h2["via"]["nickname"], "h0", "{h2}");
    assert!(conn_to(&lab, 1, "h2").is_none(), "no direct connection across families");
}
