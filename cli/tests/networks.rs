//! End-to-end tests of named networks: `weft attach --network NAME` puts a container on its own
//! L2 segment across hosts. Real routers in lab namespaces; root only (they skip otherwise).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use weft_lab::{Container, Lab};

const UP: Duration = Duration::from_secs(30);

fn attach(lab: &mut Lab, host: usize, name: &str, cidr: &str, network: Option<&str>) -> Container {
    let ns = lab.add_namespace(name).expect("namespace");
    let mut args = vec!["attach", ns.as_str(), cidr];
    if let Some(n) = network {
        args.extend(["--network", n]);
    }
    let out = lab.weft(host, &args).expect("attach");
    assert!(out.status.success(), "attach {name}: {}", String::from_utf8_lossy(&out.stderr));
    Container { ns, host, ip: cidr.split('/').next().unwrap_or("").parse().expect("ip") }
}

fn network<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["networks"].as_array()?.iter().find(|n| n["name"] == name)
}

/// Frames in `frames` that carry IPv4 or ARP for 10.60.0.0/24 at all.
fn overlay_frames(frames: &[Vec<u8>]) -> usize {
    frames
        .iter()
        .filter(|f| {
            f.len() >= 42
                && ((f[12..14] == [8, 6] && (f[28..31] == [10, 60, 0] || f[38..41] == [10, 60, 0]))
                    || (f[12..14] == [8, 0] && (f[26..29] == [10, 60, 0] || f[30..33] == [10, 60, 0])))
        })
        .count()
}

fn datagrams_in(lab: &Lab, h: usize) -> u64 {
    status(lab, h)["stats"]["datagrams_in"].as_u64().unwrap_or(0)
}

/// red on hosts 0 and 1, blue on hosts 0 and 2, with the same addresses on purpose, and a
/// container of the default network on host 1 in the same subnet.
fn red_and_blue_never_meet(test: &str, password: Option<&str>) {
    if !weft_lab::require_lab(test, &["nft", "ping"]) {
        return;
    }
    let Some(mut lab) = lab(test, 3, password, &[]) else { return };
    start_star(&mut lab);
    for i in 0..3 {
        lab.wait_established(i, 2, UP).expect("connected");
    }
    let red1 = attach(&mut lab, 0, "red1", "10.60.0.1/24", Some("red"));
    let red2 = attach(&mut lab, 1, "red2", "10.60.0.2/24", Some("red"));
    let blue1 = attach(&mut lab, 0, "blue1", "10.60.0.1/24", Some("blue"));
    let blue2 = attach(&mut lab, 2, "blue2", "10.60.0.2/24", Some("blue"));
    let dflt = attach(&mut lab, 1, "dflt", "10.60.0.3/24", None);

    // Each network reaches its own, across hosts.
    assert!(ping_until(&lab, &red1, "10.60.0.2", &[], UP), "red1 cannot reach red2");
    assert!(ping_until(&lab, &blue1, "10.60.0.2", &[], UP), "blue1 cannot reach blue2");
    assert!(ping_until(&lab, &blue2, "10.60.0.1", &[], UP), "blue2 cannot reach blue1");

    // Red's pings, ARP and broadcasts reach red2 and nobody else.
    let caps: Vec<(&str, Capture)> = [("blue1", &blue1), ("blue2", &blue2), ("dflt", &dflt)]
        .into_iter()
        .map(|(n, c)| (n, Capture::start(&c.ns, "ethwe")))
        .collect();
    let red2_cap = Capture::start(&red2.ns, "ethwe");
    let h2_before = datagrams_in(&lab, 2);
    lab.exec(&red1.ns, &["ip", "neigh", "flush", "all"]).expect("flush");
    let out = lab.exec(&red1.ns, &["ping", "-c", "5", "-i", "0.2", "-W", "1", "10.60.0.2"]).expect("ping");
    assert!(out.status.success(), "red1 lost red2");
    let _ = lab.exec(&red1.ns, &["ping", "-b", "-c", "20", "-i", "0.05", "-W", "1", "10.60.0.255"]);
    let out = lab.exec(&red1.ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.60.0.3"]).expect("ping");
    assert!(!out.status.success(), "red1 reached the default network's container");
    let h2_after = datagrams_in(&lab, 2);
    for (n, cap) in caps {
        let frames = cap.finish();
        assert_eq!(overlay_frames(&frames), 0, "{n} saw red's traffic: {} frames", frames.len());
    }
    assert!(overlay_frames(&red2_cap.finish()) >= 10, "red2 did not see red's traffic");
    // Host 2 has no red container: red's broadcasts never reached it (only heartbeats did).
    assert!(h2_after - h2_before < 15, "host 2 received {} datagrams during red's broadcasts", h2_after - h2_before);

    // Status lists the networks and who is on them.
    let st = status(&lab, 0);
    let red = network(&st, "red").expect("red in status").clone();
    assert_eq!(red["members"].as_array().map(Vec::len), Some(2), "{red}");
    assert_eq!(red["containers"], 1);
    let human = String::from_utf8_lossy(&lab.weft(0, &["status", "networks"]).expect("status").stdout).to_string();
    assert!(human.contains("red") && human.contains("blue") && human.contains("weft"), "{human}");

    // Without a password, red's unicast between hosts 0 and 1 takes red's own VXLAN device.
    let vx = format!("{}-vx", red["bridge"].as_str().unwrap_or(""));
    let tx = |lab: &Lab| -> Option<u64> {
        let o = lab.exec(&lab.host(0).ns, &["ip", "-s", "-j", "link", "show", "dev", &vx]).ok()?;
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v[0]["stats64"]["tx"]["packets"].as_u64()
    };
    if password.is_none() {
        let before = tx(&lab).unwrap_or_else(|| panic!("no device {vx} on host 0"));
        let out = lab.exec(&red1.ns, &["ping", "-c", "20", "-i", "0.05", "-W", "1", "10.60.0.2"]).expect("ping");
        assert!(out.status.success(), "red1 lost red2");
        let sent = tx(&lab).unwrap_or(0) - before;
        assert!(sent >= 15, "red's pings did not take its VXLAN device ({vx} sent {sent})");
    } else {
        assert!(tx(&lab).is_none(), "an encrypted mesh without trusted subnets made {vx}");
    }

    // red2 leaves: host 1 leaves red, and host 0 stops counting it as a member.
    let out = lab.weft(1, &["detach", &red2.ns]).expect("detach");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(network(&status(&lab, 1), "red").is_none(), "host 1 still has red");
    assert!(
        wait_for(UP, || network(&status(&lab, 0), "red").and_then(|r| r["members"].as_array().map(Vec::len)) == Some(1)),
        "host 0 still sees host 1 in red: {:?}",
        network(&status(&lab, 0), "red")
    );
    // Blue is untouched.
    assert!(ping_until(&lab, &blue1, "10.60.0.2", &[], UP), "blue1 lost blue2");
    // A router that stops takes every VXLAN device it made with it (its source filter goes too).
    lab.kill_router(0, libc::SIGTERM).expect("stop");
    let o = lab.exec(&lab.host(0).ns, &["ip", "-o", "link", "show", "type", "vxlan"]).expect("ip link");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "", "VXLAN devices left after the router stopped");
}

#[test]
fn red_and_blue_never_meet_beside_the_fastpath() {
    red_and_blue_never_meet("red_and_blue_never_meet_beside_the_fastpath", None);
}

#[test]
fn red_and_blue_never_meet_on_the_sleeve() {
    red_and_blue_never_meet("red_and_blue_never_meet_on_the_sleeve", Some("correct horse battery"));
}
