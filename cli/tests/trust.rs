//! Trust between hosts, attacked from inside the mesh: a rogue peer that holds the password
//! drives weft's own handshake, record layer and gossip types from a lab namespace, under any
//! name and with any message. Needs root; skips otherwise.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use weft_proto::identity::{signed_bytes, Claim, DOMAIN_UNICAST};
use weft_proto::router::IDENTITY_CHANNEL;
use weft_proto::topology::{ConnectionInfo, PeerInfo};
use weft_proto::{ControlMsg, Hello, PeerName, Signature, SigningKey, Topology};
use weft_router::control::handshake::{generate_keypair, handshake, SessionHello};
use weft_router::control::records::{ReadError, RecordReader, RecordWriter};

const UP: Duration = Duration::from_secs(30);
const PASSWORD: &str = "a long enough lab password";

/// What the rogue saw of its connection.
#[derive(Debug)]
struct Outcome {
    /// The router kept the connection open for the whole linger time.
    kept: bool,
    /// Messages the router sent after the hellos.
    received: usize,
}

/// Connects from lab namespace `ns` to `to` as `name` with identity key `key`, sends `msgs` once
/// the hellos are exchanged, and watches the connection for `linger`.
fn rogue(ns: &str, to: SocketAddr, name: PeerName, key: SigningKey, msgs: Vec<ControlMsg>, linger: Duration) -> Outcome {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let (psk, _) = weft_router::password::derive_psk(PASSWORD, weft_router::password::DEFAULT_MESH).expect("psk");
            let noise = generate_keypair().expect("noise key").0;
            let mut s = tokio::net::TcpStream::connect(to).await.expect("connect");
            let sec = handshake(&mut s, true, Some(&psk), &noise).await.expect("handshake");
            let (rd, wr) = s.into_split();
            let mut w = RecordWriter::new(wr, sec.transport.clone());
            let mut r = RecordReader::new(rd, sec.transport);
            let claim = Claim::self_signed(&key, name);
            let hello = Hello::prove(&key, claim, "rogue".into(), 1, 6783, &sec.binding);
            w.send(&SessionHello { hello, udp_port: 6783, sleeve_index: 1, fastpath: weft_proto::fastpath::Offer::No("a rogue".into()) }).await.expect("hello");
            let theirs = r.recv::<SessionHello>().await;
            assert!(theirs.is_ok(), "the router's hello: {:?}", theirs.err());
            for m in &msgs {
                if w.send(m).await.is_err() {
                    break;
                }
            }
            let mut received = 0;
            let deadline = tokio::time::Instant::now() + linger;
            let kept = loop {
                match tokio::time::timeout_at(deadline, r.recv::<ControlMsg>()).await {
                    Err(_) => break true,
                    Ok(Ok(_)) => received += 1,
                    Ok(Err(ReadError::Closed | ReadError::Io(_))) => break false,
                    Ok(Err(e)) => panic!("reading from the router: {e}"),
                }
            };
            Outcome { kept, received }
        })
    })
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32]).expect("key")
}

fn peer_name(lab: &weft_lab::Lab, i: usize) -> PeerName {
    status(lab, i)["name"].as_str().expect("name").parse().expect("peer name")
}

fn refused(st: &Value, reason: &str) -> u64 {
    st["identity"]["refused"][reason].as_u64().unwrap_or(0)
}

fn router_addr(lab: &weft_lab::Lab, i: usize) -> SocketAddr {
    SocketAddr::from((lab.host(i).underlay_ip, 6783))
}

/// Hosts 0 and 1 run routers and containers (addresses from IPAM, names in DNS) that ping each
/// other; host 2 is the rogue's.
fn honest_pair(test: &str) -> Option<(weft_lab::Lab, weft_lab::Container, String)> {
    let mut lab = lab(test, 3, Some(PASSWORD), &[])?;
    lab.start_router(0, &[]).expect("router 0");
    lab.start_router(1, &[0]).expect("router 1");
    lab.wait_established(0, 1, UP).expect("0 and 1 connected");
    let a = lab.add_container_auto_with(0, "a", &["--name", "a"]).expect("container a");
    let b = lab.add_container_auto_with(1, "b", &["--name", "b"]).expect("container b");
    let b_ip = b.ip.to_string();
    assert!(ping_until(&lab, &a, &b_ip, &[], UP), "a cannot reach b");
    Some((lab, a, b_ip))
}

#[test]
fn impersonating_a_live_or_a_dead_host_is_refused() {
    let Some((mut lab, a, b_ip)) = honest_pair("impersonating_a_live_or_a_dead_host_is_refused") else { return };
    let victim = peer_name(&lab, 1);
    let rogue_ns = lab.host(2).ns.clone();
    // The rogue holds the password and says it is host 1 (a new UID, as after a restart).
    let o = rogue(&rogue_ns, router_addr(&lab, 0), victim, key(66), vec![], Duration::from_secs(3));
    assert!(!o.kept, "the router kept an impostor's connection: {o:?}");
    let st = status(&lab, 0);
    assert!(refused(&st, "impostor") >= 1, "not counted: {}", st["identity"]);
    assert_eq!(established(&lab, 0), 1, "the real host 1 lost its connection");
    assert!(ping_until(&lab, &a, &b_ip, &[], Duration::from_secs(5)), "traffic to the real host 1 stopped");
    let log = std::fs::read_to_string(&lab.host(0).log).unwrap_or_default();
    assert!(log.contains("did not prove its name") && log.contains(&key(66).public().to_string()), "the log names the keys");

    // Host 1 goes away; its name stays bound to its key.
    lab.kill_router(1, libc::SIGTERM).expect("stop router 1");
    assert!(wait_for(UP, || established(&lab, 0) == 0), "host 0 still shows host 1");
    let o = rogue(&rogue_ns, router_addr(&lab, 0), victim, key(66), vec![], Duration::from_secs(3));
    assert!(!o.kept, "the router took an impostor of a dead host: {o:?}");
    assert!(refused(&status(&lab, 0), "impostor") >= 2);
    // The real host 1, with its own key, comes back.
    lab.start_router(1, &[0]).expect("router 1 again");
    lab.wait_established(0, 1, UP).expect("the real host 1 rejoins");
}

#[test]
fn forged_gossip_is_dropped_counted_and_changes_nothing() {
    let Some((lab, a, b_ip)) = honest_pair("forged_gossip_is_dropped_counted_and_changes_nothing") else { return };
    let (me, victim) = (peer_name(&lab, 0), peer_name(&lab, 1));
    let rogue_name: PeerName = "02:66:66:66:66:66".parse().expect("name");
    let rk = key(66);
    let before = status(&lab, 0);
    let victim_entry = |st: &Value| -> Value {
        st["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == victim.to_string()).cloned()).unwrap_or(Value::Null)
    };
    let victim_before = victim_entry(&before);

    // 1. Host 1's topology entry, rewritten by the rogue to the highest version and host 1's UID.
    let mut forged = PeerInfo {
        name: victim,
        nickname: "owned".into(),
        uid: victim_before["uid"].as_u64().expect("uid"),
        version: u64::MAX,
        connections: [(rogue_name, ConnectionInfo { addr: None, outbound: true, established: true, rtt_us: None })].into(),
        addrs: vec!["192.168.77.99:6783".parse().expect("addr")],
        udp: Vec::new(),
        sig: Signature([0; 64]),
    };
    forged.sign(&rk);
    // 2. A claim of host 1's name with the rogue's key.
    let claim = weft_proto::router::IdentityState { claims: vec![Claim::self_signed(&rk, victim)], ..Default::default() };
    // 3. Unicasts in host 1's name: donation requests and anything else for the IPAM channel.
    let mut msgs = vec![
        ControlMsg::Gossip { channel: "topology".into(), payload: Topology::encode(&[forged]) },
        ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload: signed_bytes(&claim) },
    ];
    for i in 0..200u32 {
        let payload = i.to_be_bytes().to_vec();
        let sig = rk.sign(DOMAIN_UNICAST, &signed_bytes(&(victim, me, "ipam", &payload)));
        msgs.push(ControlMsg::Unicast { src: victim, dst: me, channel: "ipam".into(), payload, ttl: 4, sig });
    }
    let o = rogue(&lab.host(2).ns, router_addr(&lab, 0), rogue_name, rk.clone(), msgs, Duration::from_secs(3));
    assert!(o.kept && o.received > 0, "the rogue's own name is fine on first use: {o:?}");

    let st = status(&lab, 0);
    let forged_by = st["identity"]["forged_by"][rogue_name.to_string()].as_u64().unwrap_or(0);
    assert!(forged_by >= 201, "forgeries not counted against the rogue: {}", st["identity"]);
    assert!(refused(&st, "impostor") >= 1, "the claim of host 1's name: {}", st["identity"]);
    let after = victim_entry(&st);
    assert_eq!(after["version"], victim_before["version"], "host 1's entry changed: {after}");
    assert_eq!(after["nickname"], victim_before["nickname"]);
    let bound = st["identity"]["bindings"].as_array().expect("bindings").iter().find(|b| b["name"] == victim.to_string()).cloned();
    assert_ne!(bound.as_ref().map(|b| b["key"].clone()), Some(Value::String(rk.public().to_string())), "host 1's key was replaced");
    assert_eq!(st["routes"], before["routes"], "routes changed");
    // Who owns how much (free counts follow allocations and may still be on their way).
    let owned = |v: &Value| -> Vec<(String, u64)> {
        v["ipam"]["peers"].as_array().expect("ipam peers").iter().map(|p| (p["peer"].to_string(), p["owned"].as_u64().unwrap_or(0))).collect()
    };
    assert_eq!(owned(&st), owned(&before), "address space moved");
    // Discovery never dials the address the forged entry named.
    assert!(st["targets"].as_array().expect("targets").iter().all(|t| t["address"] != "192.168.77.99:6783"), "{}", st["targets"]);
    assert!(ping_until(&lab, &a, &b_ip, &[], Duration::from_secs(5)), "the honest mesh stopped passing traffic");
}

/// `weft identity show` on host `i` (before its router starts): its name and key.
fn identity_of(lab: &weft_lab::Lab, i: usize) -> (String, String) {
    let dir = lab.host(i).state_dir.display().to_string();
    let v = lab.weft_json(i, &["identity", "show", "--state-dir", &dir]).expect("identity show");
    (v["name"].as_str().expect("name").to_string(), v["key"].as_str().expect("key").to_string())
}

#[test]
fn a_mesh_ca_admits_only_certified_hosts_and_a_revocation_cuts_one_off() {
    let Some(mut lab) = lab("a_mesh_ca_admits_only_certified_hosts", 4, Some(PASSWORD), &[]) else { return };
    let ca_dir = lab.dir().join("ca");
    let ca_dir_s = ca_dir.display().to_string();
    let v = lab.weft_json(0, &["ca", "init", "--dir", &ca_dir_s]).expect("ca init");
    let ca = v["public_key"].as_str().expect("CA key").to_string();
    // Hosts 0-2 get certificates; host 3 holds the password but no certificate.
    for i in 0..3 {
        let (name, key) = identity_of(&lab, i);
        let cert = lab.host(i).state_dir.join("identity.cert").display().to_string();
        let o = lab.weft(0, &["ca", "sign", "--dir", &ca_dir_s, "--name", &name, "--key", &key, "--out", &cert]).expect("sign");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        lab.configure_host(i, Some(PASSWORD), &["--ca", &ca]).expect("configure");
    }
    // A router told to use the CA refuses to start without a certificate, and says what to do.
    lab.configure_host(3, Some(PASSWORD), &["--ca", &ca]).expect("configure");
    let started = lab.start_router(3, &[0]);
    let log = std::fs::read_to_string(&lab.host(3).log).unwrap_or_default();
    assert!(started.is_err() || log.contains("no certificate"), "host 3 started under --ca without a certificate");
    let _ = lab.kill_router(3, libc::SIGTERM);
    assert!(log.contains("weft ca sign"), "the refusal says how to get a certificate: {log}");
    // Without --ca it starts, self-signed, and the CA mesh refuses it.
    lab.configure_host(3, Some(PASSWORD), &[]).expect("configure");
    lab.start_router(0, &[]).expect("router 0");
    lab.start_router(1, &[0]).expect("router 1");
    lab.start_router(2, &[0]).expect("router 2");
    lab.start_router(3, &[0]).expect("router 3");
    lab.wait_established(0, 2, UP).expect("certified hosts join");
    lab.wait_established(1, 2, UP).expect("full mesh among the certified");
    assert!(
        wait_for(UP, || refused(&status(&lab, 0), "no_certificate") > 0),
        "host 0 never refused the uncertified host: {}",
        status(&lab, 0)["identity"]
    );
    assert_eq!(established(&lab, 3), 0, "the uncertified host got a connection");
    let st = status(&lab, 0);
    assert_eq!(st["identity"]["trust"], format!("ca {ca}"));
    assert!(st["identity"]["certificate_expires"].as_u64().is_some());

    // Traffic between certified hosts, then host 1's key is revoked from host 0.
    let a = lab.add_container_auto(0, "a").expect("container a");
    let b = lab.add_container_auto(1, "b").expect("container b");
    let c = lab.add_container_auto(2, "c").expect("container c");
    assert!(ping_until(&lab, &a, &b.ip.to_string(), &[], UP), "a cannot reach b");
    assert!(ping_until(&lab, &c, &b.ip.to_string(), &[], UP), "c cannot reach b");
    let (name1, key1) = identity_of(&lab, 1);
    let t0 = std::time::Instant::now();
    let o = lab.weft(0, &["ca", "revoke", "--dir", &ca_dir_s, "--name", &name1, "--key", &key1]).expect("revoke");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cut = wait_for(Duration::from_secs(10), || {
        [0, 2].iter().all(|&i| {
            status(&lab, i)["connections"].as_array().is_some_and(|cs| cs.iter().all(|c| c["peer_name"] != name1.as_str()))
        })
    });
    assert!(cut, "host 1 still connected 10 s after its revocation");
    eprintln!("revocation took effect mesh-wide in {:?}", t0.elapsed());
    // Its traffic stops, and it stays out.
    assert!(!ping_until(&lab, &a, &b.ip.to_string(), &[], Duration::from_secs(3)), "a still reaches the revoked host");
    assert!(!ping_until(&lab, &c, &b.ip.to_string(), &[], Duration::from_secs(3)), "c still reaches the revoked host");
    assert!(ping_until(&lab, &a, &c.ip.to_string(), &[], UP), "the rest of the mesh still works");
    assert!(refused(&status(&lab, 2), "revoked") > 0 || refused(&status(&lab, 0), "revoked") > 0, "reconnects not refused as revoked");
    assert_eq!(established(&lab, 1), 0, "the revoked host reconnected");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

#[test]
fn guessing_and_flooding_cost_the_attacker_more_than_the_router() {
    let Some(mut lab) = lab("guessing_and_flooding", 3, Some(PASSWORD), &[]) else { return };
    lab.start_router(0, &[]).expect("router 0");
    let pid = lab.host(0).router_pid().expect("pid");
    let to = router_addr(&lab, 0);
    let ns = lab.host(2).ns.clone();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(pid);

    // 2,000 half-open connections from 40 addresses of host 2, held open while host 1 joins.
    let sources: Vec<std::net::Ipv4Addr> = (0..40).map(|i| std::net::Ipv4Addr::new(192, 168, 77, 100 + i)).collect();
    for ip in &sources {
        let o = lab.exec(&ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "ul0"]).expect("ip addr add");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<usize>();
    let flood = std::thread::spawn({
        let ns = ns.clone();
        move || {
            in_netns(&ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    let mut held = Vec::new();
                    for i in 0..2000 {
                        let Ok(sock) = tokio::net::TcpSocket::new_v4() else { continue };
                        if sock.bind(SocketAddr::from((sources[i % sources.len()], 0))).is_err() {
                            continue;
                        }
                        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), sock.connect(to)).await {
                            held.push(s);
                        }
                    }
                    let _ = opened_tx.send(held.len());
                    let _ = tokio::task::spawn_blocking(move || hold_rx.recv_timeout(Duration::from_secs(60))).await;
                    drop(held);
                })
            })
        }
    });
    let opened = opened_rx.recv_timeout(Duration::from_secs(120)).expect("flood opened");
    let t0 = std::time::Instant::now();
    lab.start_router(1, &[0]).expect("router 1");
    lab.wait_established(1, 1, Duration::from_secs(15)).expect("a real peer joins during the flood");
    let join = t0.elapsed();
    let rss_flood = rss_kib(pid);
    let st = status(&lab, 0);
    let _ = hold_tx.send(());
    flood.join().expect("flood thread");
    eprintln!(
        "half-open flood: {opened} connections opened; real peer joined in {join:?}; router RSS {rss_before} -> {rss_flood} KiB; refused {}",
        st["stats"]["handshakes_refused"]
    );
    assert!(join < Duration::from_secs(10), "the real peer took {join:?} to join under the flood");
    assert!(rss_flood < rss_before + 64 * 1024, "router memory grew from {rss_before} to {rss_flood} KiB");
    assert!(st["stats"]["handshakes_in_progress"].as_u64().unwrap_or(0) <= 64, "{}", st["stats"]);

    // 1,000 wrong-password handshakes from host 2: how many reach the crypto.
    let (answered, total, secs) = in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let noise = generate_keypair().expect("noise key").0;
            let wrong = [0x42u8; 32];
            let t = std::time::Instant::now();
            let mut answered = 0;
            for _ in 0..1000 {
                let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(to)).await else { continue };
                // Closed before any crypto: the handshake fails at the preamble. Let through: our
                // side completes, and the refusal comes as the first record.
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), handshake(&mut s, true, Some(&wrong), &noise)).await {
                    answered += 1;
                }
            }
            (answered, 1000, t.elapsed().as_secs_f64())
        })
    });
    eprintln!("wrong passwords: {answered} of {total} reached the handshake in {secs:.1} s");
    assert!(answered as f64 <= 8.0 + secs * 1.5 + 2.0, "{answered} wrong-password handshakes answered in {secs:.1} s");
    // Meanwhile a correct peer from another address still joins at once.
    lab.kill_router(1, libc::SIGTERM).expect("stop 1");
    lab.start_router(1, &[0]).expect("router 1 again");
    lab.wait_established(1, 1, Duration::from_secs(5)).expect("a real peer joins within 5 s after the guessing");
    assert!(status(&lab, 0)["stats"]["handshakes_refused"]["rate_limited"].as_u64().unwrap_or(0) > 0);
}
