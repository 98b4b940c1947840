//! The lab's own tests. They need root, `ip` and `nsenter` (and `nft` for blocking) and skip
//! otherwise; they reach other namespaces with the lab's own [`probe`]s (and plain UDP sockets made
//! in them), not `ping` or `dig`. The router ones use a fake `weft` shell script, so they check the
//! lab's plumbing (arguments, logs, PIDs, JSON, cleanup), not weft itself.
#![allow(clippy::unwrap_used)]

use super::*;

fn ns_exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// One ICMP echo from lab namespace `from` to `to`, answered within 1 s.
fn ping(lab: &Lab, from: &str, to: Ipv4Addr) -> bool {
    probe::icmp_echo(&lab.netns_path(from).unwrap(), to, Duration::from_secs(1)).is_ok()
}

#[path = "../tests/common/fake_weft.rs"]
mod fake_weft;
use fake_weft::Fake;

#[test]
fn underlay_ping_and_drop_cleans_up() {
    if !require_lab("underlay_ping_and_drop_cleans_up", &[]) {
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
    assert!(lab.netns_path("not-a-lab-ns").is_err());
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
    if !require_lab("block_and_unblock", &["nft"]) {
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

/// Whether a UDP datagram from host `from` reaches host `to` on `port` (three sent, one wanted
/// within `wait`). The receiving socket is made in `to`'s namespace and stays bound to it.
fn udp_gets_through(lab: &Lab, from: usize, to: usize, port: u16, wait: Duration) -> bool {
    let dst = lab.host(to).underlay_ip;
    let rx = probe::in_netns(&lab.netns_path(&lab.host(to).ns).unwrap(), || {
        Ok(std::net::UdpSocket::bind((dst, port))?)
    })
    .unwrap();
    rx.set_read_timeout(Some(wait)).unwrap();
    probe::in_netns(&lab.netns_path(&lab.host(from).ns).unwrap(), || {
        let tx = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        for _ in 0..3 {
            tx.send_to(b"weft-lab", (dst, port))?;
        }
        Ok(())
    })
    .unwrap();
    let mut buf = [0u8; 16];
    matches!(rx.recv_from(&mut buf), Ok((8, _)))
}

#[test]
fn block_and_unblock_udp() {
    if !require_lab("block_and_unblock_udp", &["nft"]) {
        return;
    }
    let mut lab = Lab::new(LabConfig::new(3, "/nonexistent/weft")).unwrap();
    let (h0, h1) = (lab.host(0).ns.clone(), lab.host(1).ns.clone());
    let (ip0, ip1) = (lab.host(0).underlay_ip, lab.host(1).underlay_ip);
    let (pass, drop_) = (Duration::from_secs(2), Duration::from_millis(500));
    assert!(ping(&lab, &h0, ip1) && ping(&lab, &h0, lab.host(2).underlay_ip));
    assert!(udp_gets_through(&lab, 0, 1, 6784, pass));
    lab.block_udp(1, 0, 6784).unwrap();
    lab.block_udp(0, 1, 6784).unwrap(); // no-op
    assert!(
        !udp_gets_through(&lab, 0, 1, 6784, drop_),
        "datagram went through while blocked"
    );
    assert!(
        !udp_gets_through(&lab, 1, 0, 6784, drop_),
        "reverse direction not blocked"
    );
    assert!(
        udp_gets_through(&lab, 0, 1, 6783, pass),
        "another port was blocked"
    );
    assert!(
        udp_gets_through(&lab, 0, 2, 6784, pass),
        "unrelated pair was blocked"
    );
    assert!(
        ping(&lab, &h0, ip1) && ping(&lab, &h1, ip0),
        "ICMP was blocked"
    );
    // independent of the full block: undoing one leaves the other
    lab.unblock(0, 1).unwrap(); // no-op: the pair was never fully blocked
    assert!(
        !udp_gets_through(&lab, 0, 1, 6784, drop_),
        "unblock lifted the UDP block"
    );
    lab.block(0, 1).unwrap();
    lab.unblock_udp(0, 1, 6784).unwrap();
    lab.unblock_udp(0, 1, 6784).unwrap(); // no-op
    assert!(
        !udp_gets_through(&lab, 0, 1, 6784, drop_),
        "unblock_udp lifted the full block"
    );
    lab.unblock(0, 1).unwrap();
    assert!(
        udp_gets_through(&lab, 0, 1, 6784, pass),
        "still blocked after unblock_udp"
    );
    assert!(
        udp_gets_through(&lab, 1, 0, 6784, pass),
        "reverse still blocked after unblock_udp"
    );
    assert!(lab.block_udp(2, 2, 6784).is_err());
    assert!(lab.block_udp(0, 9, 6784).is_err());
}

#[test]
fn cleanup_stale_removes_dead_labs_only() {
    if !require_lab("cleanup_stale_removes_dead_labs_only", &[]) {
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
    if !require_lab("routers_and_containers_with_fake_weft", &[]) {
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
        "--no-discovery --ipalloc-init=consensus=2 --no-docker 192.168.77.1",
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
    if !require_lab("keep_leaves_lab_in_place", &[]) {
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
    if !require_lab("start_router_needs_the_binary", &[]) {
        return;
    }
    let mut lab = Lab::new(LabConfig::new(1, "/nonexistent/weft")).unwrap();
    let err = format!("{:#}", lab.start_router(0, &[]).unwrap_err());
    assert!(err.contains("cargo build -p weft"), "{err}");
}

#[test]
fn demo_with_fake_weft() {
    if !require_lab("demo_with_fake_weft", &[]) {
        return;
    }
    let fake = Fake::new();
    let mut out = Vec::new();
    demo(LabConfig::new(3, &fake.0), &mut out)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let text = String::from_utf8(out).unwrap();
    eprintln!("{text}");
    fake_weft::assert_demo_output(&text);
}

/// The namespace the calling thread is in (the target of /proc/thread-self/ns/net).
fn own_netns() -> PathBuf {
    fs::read_link("/proc/thread-self/ns/net").unwrap()
}

#[test]
fn icmp_echo_between_lab_namespaces() {
    if !require_lab("icmp_echo_between_lab_namespaces", &[]) {
        return;
    }
    let lab = Lab::new(LabConfig::new(2, "/nonexistent/weft")).unwrap();
    let h0 = lab.netns_path(&lab.host(0).ns).unwrap();
    let ip1 = lab.host(1).underlay_ip;
    let before = own_netns();
    // the first echo may wait for ARP
    let rtt = probe::icmp_echo(&h0, ip1, Duration::from_secs(2)).unwrap();
    assert!(rtt < Duration::from_secs(2), "{rtt:?}");
    assert_eq!(own_netns(), before, "the probe moved the calling thread");
    for _ in 0..20 {
        probe::icmp_echo(&h0, ip1, Duration::from_secs(1)).unwrap();
    }
    // On loopback the raw socket sees our own request too; only the reply may count.
    probe::icmp_echo(&h0, Ipv4Addr::LOCALHOST, Duration::from_secs(1)).unwrap();
    // .2 is h1's, not h0's: from h1's namespace the same address is local
    let h1 = lab.netns_path(&lab.host(1).ns).unwrap();
    probe::icmp_echo(&h1, ip1, Duration::from_secs(1)).unwrap();

    // Nobody has 192.168.77.200 on the lab's switch: no reply, a clear error, in time.
    let t0 = Instant::now();
    let nobody = Ipv4Addr::new(192, 168, 77, 200);
    let err = format!("{:#}", probe::icmp_echo(&h0, nobody, Duration::from_secs(1)).unwrap_err());
    let took = t0.elapsed();
    assert!(err.contains("no echo reply from 192.168.77.200 within 1s"), "{err}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(own_netns(), before);
}

/// A DNS response to `query` (which has one question): QR, RD, RA and `rcode`, the question
/// copied, and an A record for each of `addrs` owned by a pointer to the question's name.
fn dns_reply(query: &[u8], rcode: u8, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let mut m = query[..2].to_vec();
    m.extend([0x81, 0x80 | rcode, 0, 1, 0, addrs.len() as u8, 0, 0, 0, 0]);
    m.extend(&query[12..]);
    for a in addrs {
        m.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        m.extend(a.octets());
    }
    m
}

#[test]
fn dns_query_a_against_a_tiny_responder() {
    if !require_lab("dns_query_a_against_a_tiny_responder", &[]) {
        return;
    }
    let lab = Lab::new(LabConfig::new(2, "/nonexistent/weft")).unwrap();
    let h0 = lab.netns_path(&lab.host(0).ns).unwrap();
    let h1 = lab.netns_path(&lab.host(1).ns).unwrap();
    let server = lab.host(1).underlay_ip;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The responder: UDP 53 on h1's underlay address, one scripted answer per query.
    let responder = thread::spawn(move || {
        probe::in_netns(&h1, || {
            let s = std::net::UdpSocket::bind((server, 53))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let _ = ready_tx.send(());
            let mut queries = Vec::new();
            let mut buf = [0u8; 512];
            let mut next = |s: &std::net::UdpSocket| -> Result<(Vec<u8>, std::net::SocketAddr)> {
                let (n, from) = s.recv_from(&mut buf)?;
                Ok((buf[..n].to_vec(), from))
            };
            // 1. web: first a stale answer with another id (to be ignored), then two A records
            let (q, from) = next(&s)?;
            let mut stale = dns_reply(&q, 0, &[Ipv4Addr::new(10, 6, 6, 6)]);
            stale[0] ^= 0xff;
            s.send_to(&stale, from)?;
            s.send_to(&dns_reply(&q, 0, &[Ipv4Addr::new(10, 32, 0, 5), Ipv4Addr::new(10, 32, 0, 6)]), from)?;
            queries.push(q);
            // 2. nope: NXDOMAIN
            let (q, from) = next(&s)?;
            s.send_to(&dns_reply(&q, 3, &[]), from)?;
            queries.push(q);
            // 3. broken: SERVFAIL
            let (q, from) = next(&s)?;
            s.send_to(&dns_reply(&q, 2, &[]), from)?;
            queries.push(q);
            // 4. slow: no answer at all
            let (q, _) = next(&s)?;
            queries.push(q);
            // 5. garbage: an answer cut inside its A record
            let (q, from) = next(&s)?;
            let full = dns_reply(&q, 0, &[Ipv4Addr::new(10, 32, 0, 7)]);
            s.send_to(&full[..full.len() - 2], from)?;
            queries.push(q);
            Ok(queries)
        })
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("responder up");
    let t = Duration::from_secs(2);
    assert_eq!(
        probe::dns_query_a(&h0, server, "web.weft.local", t).unwrap(),
        [Ipv4Addr::new(10, 32, 0, 5), Ipv4Addr::new(10, 32, 0, 6)]
    );
    assert!(probe::dns_query_a(&h0, server, "nope.weft.local", t).unwrap().is_empty());
    let err = format!("{:#}", probe::dns_query_a(&h0, server, "broken.weft.local", t).unwrap_err());
    assert!(err.contains("SERVFAIL") && err.contains("broken.weft.local"), "{err}");
    let t0 = Instant::now();
    let err = format!(
        "{:#}",
        probe::dns_query_a(&h0, server, "slow.weft.local", Duration::from_millis(500)).unwrap_err()
    );
    assert!(err.contains("no DNS answer from 192.168.77.2:53 for slow.weft.local within 500ms"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let err = format!("{:#}", probe::dns_query_a(&h0, server, "garbage.weft.local", t).unwrap_err());
    assert!(err.contains("cut off"), "{err}");
    let queries = responder.join().unwrap().unwrap();
    let names = ["web", "nope", "broken", "slow", "garbage"];
    for (q, name) in queries.iter().zip(names) {
        let want = probe::encode_query(u16::from_be_bytes([q[0], q[1]]), &format!("{name}.weft.local")).unwrap();
        assert_eq!(q, &want, "query for {name}");
    }
    assert_eq!(queries.len(), names.len());
    // The responder is gone: h1 answers "port unreachable", which is an error at once. The
    // kernel sends ICMP errors best-effort (rate-limited), so a query that got no answer at all
    // is asked again, twice at most (the full suite once saw one lost under load).
    let mut errs = Vec::new();
    for _ in 0..3 {
        let err = format!("{:#}", probe::dns_query_a(&h0, server, "web.weft.local", t).unwrap_err());
        let refused = err.contains("no DNS server listens on UDP 53");
        let silent = err.contains("no DNS answer");
        errs.push(err);
        if refused || !silent {
            break;
        }
    }
    assert!(errs.last().is_some_and(|e| e.contains("no DNS server listens on UDP 53")), "{errs:?}");
}
