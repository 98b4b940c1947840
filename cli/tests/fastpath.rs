//! End-to-end tests of the kernel VXLAN fastpath on real kernel parts: lab hosts in network
//! namespaces, real `weft` routers and real VXLAN devices. They need root and skip with a
//! message otherwise; CI runs them as root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use weft_lab::{Container, Lab};

const UP: Duration = Duration::from_secs(30);

/// The connection of host `i` to the peer at underlay address `addr_prefix` (e.g. "192.168.77.2:").
fn conn_to(lab: &Lab, i: usize, peer_host: usize) -> Value {
    let ip = lab.host(peer_host).underlay_ip.to_string();
    status(lab, i)["connections"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["address"].as_str().is_some_and(|s| s.starts_with(&format!("{ip}:")))).cloned())
        .unwrap_or(Value::Null)
}

fn path(lab: &Lab, i: usize, peer_host: usize) -> String {
    conn_to(lab, i, peer_host)["path"].as_str().unwrap_or("").to_string()
}

fn wait_path(lab: &Lab, i: usize, peer_host: usize, want: &str, timeout: Duration) -> bool {
    wait_for(timeout, || path(lab, i, peer_host) == want)
}

/// The VXLAN device's transmit packet counter on host `i`.
fn vxlan_tx(lab: &Lab, i: usize) -> u64 {
    status(lab, i)["fastpath"]["device_counters"]["tx_packets"].as_u64().unwrap_or(0)
}

fn sleeve_frames_out(lab: &Lab, i: usize) -> u64 {
    status(lab, i)["stats"]["frames_out"].as_u64().unwrap_or(0)
}

/// Starts host 0 alone and every other host with host 0, waits for full connectivity.
fn start(lab: &mut Lab, hosts: usize) {
    start_star(lab);
    for i in 0..hosts {
        lab.wait_established(i, hosts - 1, UP).expect("connected");
    }
}

/// Container a (10.50.0.1) on host 0 and b (10.50.0.2) on host 1, once a reaches b.
fn two_containers(lab: &mut Lab) -> (Container, Container) {
    let a = lab.add_container(0, "a", "10.50.0.1/24").expect("container a");
    let b = lab.add_container(1, "b", "10.50.0.2/24").expect("container b");
    assert!(ping_until(lab, &a, "10.50.0.2", &[], UP), "a cannot reach b");
    (a, b)
}

/// Waits until both ends of the connection between hosts 0 and 1 are on the fastpath.
fn on_the_fastpath(lab: &Lab) {
    assert!(wait_path(lab, 0, 1, "fastpath", UP), "host 0 not on the fastpath: {}", conn_to(lab, 0, 1));
    assert!(wait_path(lab, 1, 0, "fastpath", UP), "host 1 not on the fastpath: {}", conn_to(lab, 1, 0));
}

/// (sent, received, duplicates) from ping's summary line.
fn ping_stats(out: &str) -> (u32, u32, u32) {
    let line = out.lines().find(|l| l.contains("transmitted")).unwrap_or("");
    let num = |after: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(after))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.trim_start_matches('+').parse().ok())
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"), num("duplicates"))
}

/// `count` pings from `c` to `ip`, one every `interval_ms`; returns (sent, received, dups).
fn ping_run(lab: &Lab, c: &Container, ip: &str, count: u32, interval_ms: u32) -> (u32, u32, u32) {
    let interval = format!("{}", f64::from(interval_ms) / 1000.0);
    let o = lab
        .exec(&c.ns, &["ping", "-n", "-q", "-c", &count.to_string(), "-i", &interval, "-W", "1", ip])
        .expect("ping");
    ping_stats(&String::from_utf8_lossy(&o.stdout))
}

#[test]
fn two_hosts_without_a_password_use_the_fastpath() {
    let Some(mut lab) = lab("two_hosts_without_a_password_use_the_fastpath", 2, None, &[]) else { return };
    start(&mut lab, 2);
    let (a, _b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    let c = conn_to(&lab, 0, 1);
    assert_eq!(c["info"], "fastpath", "{c}");
    // Unicast once the entries are in: through the kernel, not the router.
    let _ = ping_run(&lab, &a, "10.50.0.2", 3, 200);
    let (tx0, frames0) = (vxlan_tx(&lab, 0), sleeve_frames_out(&lab, 0));
    let (sent, got, dups) = ping_run(&lab, &a, "10.50.0.2", 50, 20);
    assert_eq!((sent, got, dups), (50, 50, 0), "pings over the fastpath");
    std::thread::sleep(Duration::from_millis(1500));
    let (tx1, frames1) = (vxlan_tx(&lab, 0), sleeve_frames_out(&lab, 0));
    assert!(tx1 >= tx0 + 50, "the VXLAN device sent {} packets for 50 pings", tx1 - tx0);
    assert!(frames1 <= frames0 + 5, "the sleeve carried {} frames during the pings", frames1 - frames0);
    let st = status(&lab, 0);
    assert_eq!(st["fastpath"]["enabled"], true, "{}", st["fastpath"]);
    assert!(st["fastpath"]["entries"].as_u64().unwrap_or(0) >= 1, "{}", st["fastpath"]);
    let human = String::from_utf8_lossy(&lab.weft(0, &["status"]).expect("status").stdout).to_string();
    assert!(human.contains("Fastpath: VXLAN weft-vx on UDP 6784"), "{human}");
}

/// Drops UDP `port` arriving at host `i` (its input hook), until the guard is dropped.
struct Drop6784 {
    ns: String,
}

impl Drop6784 {
    fn on(lab: &Lab, i: usize) -> Drop6784 {
        let ns = lab.host(i).ns.clone();
        for script in [
            "add table inet weft_fp_test",
            "add chain inet weft_fp_test input { type filter hook input priority -5; }",
            "add rule inet weft_fp_test input udp dport 6784 drop",
        ] {
            let o = lab.exec(&ns, &["nft", script]).expect("nft");
            assert!(o.status.success(), "nft {script}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Drop6784 { ns }
    }

    fn off(self, lab: &Lab) {
        let o = lab.exec(&self.ns, &["nft", "delete table inet weft_fp_test"]).expect("nft");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn a_blocked_fastpath_falls_back_to_the_sleeve_and_comes_back() {
    let Some(mut lab) = lab("a_blocked_fastpath_falls_back_to_the_sleeve_and_comes_back", 2, None, &[]) else { return };
    if !weft_lab::require_lab("a_blocked_fastpath_falls_back_to_the_sleeve_and_comes_back", &["nft", "ping"]) {
        return;
    }
    start(&mut lab, 2);
    let (a, _b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    let _ = ping_run(&lab, &a, "10.50.0.2", 3, 200);

    // Host 1 drops UDP 6784 (one way: host 0 still hears host 1's heartbeats) while pings flow,
    // 10 a second for 14 s.
    let ns = a.ns.clone();
    let weft = std::thread::spawn(move || {
        let o = std::process::Command::new("nsenter")
            .args(["--net=/run/netns/".to_string() + &ns, "ping".into(), "-n".into(), "-q".into(), "-c".into(), "140".into(), "-i".into(), "0.1".into(), "-W".into(), "1".into(), "10.50.0.2".into()])
            .output()
            .expect("ping");
        String::from_utf8_lossy(&o.stdout).to_string()
    });
    std::thread::sleep(Duration::from_secs(2));
    let block = Drop6784::on(&lab, 1);
    let t0 = Instant::now();
    assert!(wait_path(&lab, 0, 1, "sleeve", Duration::from_secs(10)), "host 0 did not fall back: {}", conn_to(&lab, 0, 1));
    let fell_back = t0.elapsed();
    assert!(wait_path(&lab, 1, 0, "sleeve", Duration::from_secs(10)), "host 1 did not fall back: {}", conn_to(&lab, 1, 0));
    let c1 = conn_to(&lab, 1, 0);
    assert!(c1["info"].as_str().is_some_and(|i| i.starts_with("sleeve: no fastpath heartbeat for") && i.contains("is UDP 6784 blocked?")), "{c1}");
    let c0 = conn_to(&lab, 0, 1);
    assert!(c0["info"].as_str().is_some_and(|i| i.starts_with("sleeve: ") && i.contains("6784")), "{c0}");
    let out = weft.join().expect("ping thread");
    let (sent, got, _) = ping_stats(&out);
    eprintln!("fell back after {fell_back:?}; pings: {sent} sent, {got} received");
    assert!(sent >= 130, "{out}");
    // At 10 pings a second, a fallback within 5 s loses at most 50.
    assert!(sent - got <= 50, "{} pings lost around the fallback: {out}", sent - got);
    assert!(ping_until(&lab, &a, "10.50.0.2", &[], Duration::from_secs(5)), "no traffic on the sleeve");
    let st = status(&lab, 0);
    assert!(st["fastpath"]["fallbacks"].as_u64().unwrap_or(0) >= 1, "{}", st["fastpath"]);

    // The block goes: back on the fastpath within 15 s, both ends.
    block.off(&lab);
    let t1 = Instant::now();
    assert!(wait_path(&lab, 0, 1, "fastpath", Duration::from_secs(15)), "host 0 did not return: {}", conn_to(&lab, 0, 1));
    assert!(wait_path(&lab, 1, 0, "fastpath", Duration::from_secs(15) - t1.elapsed().min(Duration::from_secs(14))), "host 1 did not return: {}", conn_to(&lab, 1, 0));
    eprintln!("back on the fastpath after {:?}", t1.elapsed());
    let _ = ping_run(&lab, &a, "10.50.0.2", 3, 200);
    let tx0 = vxlan_tx(&lab, 0);
    let (sent, got, dups) = ping_run(&lab, &a, "10.50.0.2", 20, 20);
    assert_eq!((sent, got, dups), (20, 20, 0));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(vxlan_tx(&lab, 0) >= tx0 + 20, "pings did not go through the VXLAN device again");

    // The same with UDP 6784 dropped on the underlay between them, both ways.
    lab.block_udp(0, 1, 6784).expect("block 6784");
    assert!(wait_path(&lab, 0, 1, "sleeve", Duration::from_secs(8)) && wait_path(&lab, 1, 0, "sleeve", Duration::from_secs(8)), "{}", conn_to(&lab, 0, 1));
    // Each end notices its own silence (the peer's report may have come first).
    for (i, p) in [(0, 1), (1, 0)] {
        let silent = wait_for(Duration::from_secs(5), || {
            conn_to(&lab, i, p)["info"].as_str().is_some_and(|s| s.starts_with("sleeve: no fastpath heartbeat for"))
        });
        assert!(silent, "{}", conn_to(&lab, i, p));
    }
    let (sent, got, _) = ping_run(&lab, &a, "10.50.0.2", 10, 50);
    assert_eq!((sent, got), (10, 10), "the sleeve does not carry the traffic");
    lab.unblock_udp(0, 1, 6784).expect("unblock 6784");
    assert!(wait_path(&lab, 0, 1, "fastpath", Duration::from_secs(15)) && wait_path(&lab, 1, 0, "fastpath", Duration::from_secs(15)), "{}", conn_to(&lab, 0, 1));
}

#[test]
fn big_frames_on_the_fastpath_get_through_or_get_an_error() {
    let test = "big_frames_on_the_fastpath_get_through_or_get_an_error";
    let Some(mut lab) = lab(test, 2, None, &[]) else { return };
    start(&mut lab, 2);
    let (a, _b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    let _ = ping_run(&lab, &a, "10.50.0.2", 3, 200);
    // Full-size frames of the container MTU fit the fastpath as they are.
    let o = lab.exec(&a.ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "1348", "10.50.0.2"]).expect("ping");
    assert!(o.status.success(), "1376-byte DF ping: {}", String::from_utf8_lossy(&o.stdout));
    // Larger than the container MTU: fragmented by the container, or refused at the source.
    oversized_pings_fragment_or_get_the_mtu(&lab, &a, "10.50.0.2");
    // Jumbo containers (MTU 9000 both): their frames do not fit the 1500-byte underlay in one
    // VXLAN datagram. Without DF they get through (the VXLAN datagram is fragmented); with DF the
    // kernel answers "fragmentation needed" with the tunnel's MTU, so the sender learns it: an
    // error or a reply, never silence.
    let (j1, _j2) = jumbo_pair(&mut lab);
    assert!(ping_until(&lab, &j1, "10.50.1.2", &[], UP), "j1 cannot reach j2");
    let _ = ping_run(&lab, &j1, "10.50.1.2", 3, 200);
    let o = lab.exec(&j1.ns, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "dont", "-s", "8000", "10.50.1.2"]).expect("ping");
    assert!(o.status.success(), "8000-byte ping between MTU-9000 containers without DF: {}", String::from_utf8_lossy(&o.stdout));
    let o = lab.exec(&j1.ns, &["ping", "-c", "3", "-i", "0.3", "-W", "2", "-M", "do", "-s", "8000", "10.50.1.2"]).expect("ping");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("8000-byte DF ping between jumbo containers on the fastpath: {text}");
    // Seen here: "From 10.50.1.2 icmp_seq=1 Frag needed and DF set (mtu = 1450)", then the
    // sender's own "message too long, mtu=1450": the tunnel's 1500 - 50.
    assert!(!o.status.success() && text.contains("Frag needed") && text.contains("1450"), "silently lost: {text}");
}

/// A UDP datagram carrying `marker` from `c` to `ip`, with a capture of host `h`'s underlay around it.
fn capture_marker(lab: &Lab, h: usize, c: &Container, ip: &str, marker: &[u8]) -> bool {
    let cap = Capture::start(&lab.host(h).ns, "ul0");
    send_udp(c, ip, 9999, marker, 10);
    std::thread::sleep(Duration::from_millis(300));
    contains(&cap.finish(), marker)
}

#[test]
fn with_a_password_the_fastpath_is_used_only_towards_trusted_subnets() {
    let test = "with_a_password_the_fastpath_is_used_only_towards_trusted_subnets";
    // No trusted subnets: never the fastpath, never plaintext on the underlay.
    {
        let Some(mut lab) = lab(test, 2, Some("correct horse"), &[]) else { return };
        start(&mut lab, 2);
        let (a, _b) = two_containers(&mut lab);
        std::thread::sleep(Duration::from_secs(3));
        for (i, p) in [(0, 1), (1, 0)] {
            let c = conn_to(&lab, i, p);
            assert_eq!(c["path"], "sleeve", "{c}");
            let want = format!("sleeve: encrypted mesh and {} is not in --trusted-subnets", lab.host(p).underlay_ip);
            assert!(c["info"].as_str().is_some_and(|s| s.starts_with(&want)), "{c}");
        }
        assert!(!capture_marker(&lab, 0, &a, "10.50.0.2", b"MARKER-fastpath-secret"), "the marker crossed the underlay in plaintext");
        let st = status(&lab, 0);
        assert_eq!(st["fastpath"]["unencrypted_peers"], serde_json::json!([]), "{}", st["fastpath"]);
        assert_eq!(st["fastpath"]["heartbeats"]["sent"], 0, "heartbeats towards an untrusted peer: {}", st["fastpath"]);
    }
    // The underlay trusted: the fastpath, and the status says the traffic is unencrypted.
    let Some(mut lab) = lab(test, 2, Some("correct horse"), &["--trusted-subnets", "192.168.77.0/24"]) else { return };
    start(&mut lab, 2);
    let (a, _b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    let _ = ping_run(&lab, &a, "10.50.0.2", 3, 200);
    assert!(capture_marker(&lab, 0, &a, "10.50.0.2", b"MARKER-fastpath-trusted"), "the trusted fastpath did not carry the datagrams");
    let st = status(&lab, 0);
    let name1 = status(&lab, 1)["name"].clone();
    assert_eq!(st["fastpath"]["unencrypted_peers"], serde_json::json!([name1]), "{}", st["fastpath"]);
    let human = String::from_utf8_lossy(&lab.weft(0, &["status"]).expect("status").stdout).to_string();
    assert!(human.contains("UNENCRYPTED on the underlay to"), "{human}");
    assert!(human.contains("PLAINTEXT"), "{human}");
}

/// Sends one ARP request for `target` from interface ethwe of container `c`, with source MAC
/// `src_mac` and address `src_ip`.
fn send_arp(c: &Container, src_mac: [u8; 6], src_ip: [u8; 4], target: [u8; 4]) {
    send_frames(c, vec![arp_frame(1, src_mac, src_ip, [0xff; 6], target)]);
}

/// ARP requests for `target` among captured frames.
fn arp_requests_for(frames: &[Vec<u8>], target: [u8; 4]) -> usize {
    frames.iter().filter(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == target).count()
}

#[test]
fn three_hosts_mixed_paths_and_a_relay_deliver_everything_once() {
    let test = "three_hosts_mixed_paths_and_a_relay_deliver_everything_once";
    if !weft_lab::require_lab(test, &["nft", "ping"]) {
        return;
    }
    // A (0) and B (1) trust each other's addresses; C (2) trusts nobody, so B-C is the sleeve;
    // A-C is blocked on the underlay, so their traffic goes through B.
    let Some(mut lab) = lab(test, 3, Some("correct horse"), &[]) else { return };
    lab.configure_host(0, Some("correct horse"), &["--trusted-subnets", "192.168.77.2/32"]).expect("configure");
    lab.configure_host(1, Some("correct horse"), &["--trusted-subnets", "192.168.77.1/32"]).expect("configure");
    lab.block(0, 2).expect("block A-C");
    lab.start_router(1, &[]).expect("B");
    lab.start_router(0, &[1]).expect("A");
    lab.start_router(2, &[1]).expect("C");
    lab.wait_established(1, 2, UP).expect("B connected to A and C");
    let a = lab.add_container(0, "a", "10.50.0.1/24").expect("a");
    let b = lab.add_container(1, "b", "10.50.0.2/24").expect("b");
    let c = lab.add_container(2, "c", "10.50.0.3/24").expect("c");
    for (from, to) in [(&a, "10.50.0.2"), (&a, "10.50.0.3"), (&b, "10.50.0.3"), (&c, "10.50.0.1")] {
        assert!(ping_until(&lab, from, to, &[], UP), "{} cannot reach {to}", from.ns);
    }
    on_the_fastpath(&lab);
    assert_eq!(path(&lab, 1, 2), "sleeve", "B-C: {}", conn_to(&lab, 1, 2));
    assert_eq!(path(&lab, 2, 1), "sleeve", "C-B: {}", conn_to(&lab, 2, 1));
    assert_eq!(conn_to(&lab, 0, 2), Value::Null, "A and C must not be connected directly");
    // Everyone reaches everyone, each reply exactly once.
    for (from, to) in [(&a, "10.50.0.2"), (&a, "10.50.0.3"), (&b, "10.50.0.1"), (&b, "10.50.0.3"), (&c, "10.50.0.1"), (&c, "10.50.0.2")] {
        let (sent, got, dups) = ping_run(&lab, from, to, 20, 50);
        assert_eq!((sent, got, dups), (20, 20, 0), "{} -> {to}", from.ns);
    }
    // One ARP broadcast from A reaches B and C exactly once each (and comes back to nobody).
    let (cap_a, cap_b, cap_c) = (Capture::start(&a.ns, "ethwe"), Capture::start(&b.ns, "ethwe"), Capture::start(&c.ns, "ethwe"));
    let target = [10, 50, 0, 99];
    send_arp(&a, mac_of(&lab, &a), [10, 50, 0, 1], target);
    std::thread::sleep(Duration::from_secs(1));
    let (fa, fb, fc) = (cap_a.finish(), cap_b.finish(), cap_c.finish());
    let arps = |f: &[Vec<u8>]| f.iter().filter(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06]).map(|f| format!("{:02x?}", &f[..42])).collect::<Vec<_>>();
    eprintln!("A: {:?}\nB: {:?}\nC: {:?}", arps(&fa), arps(&fb), arps(&fc));
    assert_eq!(arp_requests_for(&fb, target), 1, "B saw the broadcast a wrong number of times");
    assert_eq!(arp_requests_for(&fc, target), 1, "C saw the broadcast a wrong number of times");
    assert_eq!(arp_requests_for(&fa, target), 1, "A's broadcast came back to it");
}

#[test]
fn a_killed_router_comes_back_onto_the_fastpath_and_stop_removes_the_device() {
    let test = "a_killed_router_comes_back_onto_the_fastpath_and_stop_removes_the_device";
    let Some(mut lab) = lab(test, 2, None, &[]) else { return };
    start(&mut lab, 2);
    let (a, _b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    lab.kill_router(1, libc::SIGKILL).expect("kill -9");
    lab.start_router(1, &[0]).expect("restart");
    lab.wait_established(0, 1, UP).expect("reconnected");
    on_the_fastpath(&lab);
    assert!(ping_until(&lab, &a, "10.50.0.2", &[], UP), "traffic did not resume");
    let (sent, got, dups) = ping_run(&lab, &a, "10.50.0.2", 20, 20);
    assert_eq!((sent, got, dups), (20, 20, 0));
    // A clean stop removes the device weft made.
    let ns = lab.host(1).ns.clone();
    assert!(lab.exec(&ns, &["ip", "link", "show", "weft-vx"]).expect("ip").status.success());
    let has_filter = lab.exec(&ns, &["nft", "list", "table", "ip", "weft_fastpath_weft"]).map(|o| o.status.success()).unwrap_or(false);
    lab.kill_router(1, libc::SIGTERM).expect("stop");
    assert!(!lab.exec(&ns, &["ip", "link", "show", "weft-vx"]).expect("ip").status.success(), "weft-vx left behind");
    if has_filter {
        let o = lab.exec(&ns, &["nft", "list", "table", "ip", "weft_fastpath_weft"]).expect("nft");
        assert!(!o.status.success(), "the source filter table was left behind");
    }
}

#[test]
fn without_a_vxlan_device_the_router_runs_on_the_sleeve_and_says_why() {
    let test = "without_a_vxlan_device_the_router_runs_on_the_sleeve_and_says_why";
    let Some(mut lab) = lab(test, 2, None, &[]) else { return };
    // Something else holds UDP 6784 on host 1.
    let held = in_netns(&lab.host(1).ns.clone(), || std::net::UdpSocket::bind("0.0.0.0:6784").expect("bind 6784"));
    start(&mut lab, 2);
    let _ = two_containers(&mut lab);
    let fp = status(&lab, 1)["fastpath"].clone();
    assert_eq!(fp["enabled"], false, "{fp}");
    assert!(fp["why_not"].as_str().is_some_and(|w| w.contains("this kernel cannot make a VXLAN device") && w.contains("6784")), "{fp}");
    std::thread::sleep(Duration::from_secs(3));
    let c0 = conn_to(&lab, 0, 1);
    assert_eq!(c0["path"], "sleeve", "{c0}");
    assert!(c0["info"].as_str().is_some_and(|i| i.starts_with("sleeve: the peer does not use the fastpath towards us: this kernel cannot make a VXLAN device")), "{c0}");
    drop(held);
    // --no-fastpath says so.
    lab.kill_router(1, libc::SIGTERM).expect("stop");
    lab.configure_host(1, None, &["--no-fastpath"]).expect("configure");
    lab.start_router(1, &[0]).expect("restart");
    lab.wait_established(1, 1, UP).expect("reconnected");
    let c1 = conn_to(&lab, 1, 0);
    assert_eq!(c1["info"], "sleeve: turned off here (--no-fastpath)", "{c1}");
}

/// A VXLAN datagram (VNI 0x776674) carrying an IPv4/UDP frame from `src_mac` to `dst_mac` with
/// `marker` inside.
fn vxlan_datagram(src_mac: [u8; 6], dst_mac: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0, 0x77, 0x66, 0x74, 0];
    d.extend_from_slice(&dst_mac);
    d.extend_from_slice(&src_mac);
    d.extend_from_slice(&[0x08, 0x00]);
    let udp_len = 8 + marker.len();
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 17, 0, 0, 10, 50, 0, 66, 10, 50, 0, 1];
    let sum = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum::<u32>();
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    d.extend_from_slice(&ip);
    d.extend_from_slice(&[0x30, 0x39, 0x27, 0x0f, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
    d.extend_from_slice(marker);
    d
}

#[test]
fn vxlan_from_anyone_but_a_fastpath_peer_is_dropped_and_counted() {
    let test = "vxlan_from_anyone_but_a_fastpath_peer_is_dropped_and_counted";
    if !weft_lab::require_lab(test, &["nft"]) {
        return;
    }
    // Hosts 0 and 1 run routers; host 2 is an outsider on the same underlay.
    let Some(mut lab) = lab(test, 3, None, &[]) else { return };
    lab.start_router(0, &[]).expect("router 0");
    lab.start_router(1, &[0]).expect("router 1");
    lab.wait_established(0, 1, UP).expect("connected");
    let (a, b) = two_containers(&mut lab);
    on_the_fastpath(&lab);
    let (mac, b_mac) = (mac_of(&lab, &a), mac_of(&lab, &b));
    let unannounced = [0x02, 0xde, 0xad, 0xbe, 0xef, 0x01];
    let inject = |from: usize, src: [u8; 6], marker: &'static [u8]| -> bool {
        let cap = Capture::start(&a.ns, "ethwe");
        let d = vxlan_datagram(src, mac, marker);
        in_netns(&lab.host(from).ns.clone(), move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            for _ in 0..20 {
                let _ = s.send_to(&d, "192.168.77.1:6784");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        contains(&cap.finish(), marker)
    };
    // The outsider's frames never reach the container, and are counted.
    assert!(!inject(2, b_mac, b"MARKER-from-an-outsider"), "an outsider put frames on the bridge through UDP 6784");
    assert!(wait_for(Duration::from_secs(5), || status(&lab, 0)["fastpath"]["source_filter"]["dropped"].as_u64().unwrap_or(0) >= 20),
        "{}", status(&lab, 0)["fastpath"]);
    // From the peer's address, but from a MAC the peer never announced: dropped, counted against it.
    assert!(!inject(1, unannounced, b"MARKER-unannounced"), "the peer put frames from a MAC it never announced on the bridge");
    let by_peer = || status(&lab, 0)["fastpath"]["source_filter"]["unannounced_by_peer"]["192.168.77.2"].as_u64().unwrap_or(0);
    assert!(wait_for(Duration::from_secs(5), || by_peer() >= 20), "{}", status(&lab, 0)["fastpath"]);
    // From the peer's address and its container's MAC, they get through: the filter is what
    // stopped the others.
    assert!(inject(1, b_mac, b"MARKER-from-the-peer"), "the control case failed: VXLAN from the peer did not arrive");
}
