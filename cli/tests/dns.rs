//! End-to-end tests of weft DNS with real routers in lab namespaces and the
//! real `dig` (bind9-dnsutils) run inside container namespaces with
//! `ip netns exec`, so it reads the resolv.conf weft wrote for them.
//! They need root and skip with a message otherwise.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{lab, start_star, wait_for};
use weft_lab::{Container, Lab};

const UP: Duration = Duration::from_secs(30);

/// `dig +short ARGS` inside container `c` (its resolv.conf: weft DNS).
fn dig(c: &Container, args: &[&str]) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", &c.ns, "dig", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils)");
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn short(c: &Container, name: &str) -> Vec<String> {
    dig(c, &["+short", name]).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

fn status_of(c: &Container, name: &str) -> String {
    let out = dig(c, &[name]);
    out.lines().find_map(|l| l.split("status: ").nth(1)).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_string()
}

fn mesh(lab: &mut Lab) {
    start_star(lab);
    let n = lab.hosts().len();
    for i in 0..n {
        lab.wait_established(i, n - 1, UP).expect("mesh");
    }
}

fn named(lab: &mut Lab, host: usize, cname: &str, dns: &str) -> Container {
    lab.add_container_auto_with(host, cname, &["--name", dns]).expect("attach --name")
}

#[test]
fn names_resolve_on_every_host_in_rotating_order_with_ptr_and_go_on_detach() {
    let Some(mut lab) = lab("dns_names", 3, Some("pw"), &[]) else { return };
    mesh(&mut lab);
    let client = lab.add_container_auto(0, "client").expect("client");
    let t = Instant::now();
    let webs: Vec<Container> = (0..3).map(|h| named(&mut lab, h, &format!("web{h}"), "web")).collect();
    let want: BTreeSet<String> = webs.iter().map(|c| c.ip.to_string()).collect();
    assert!(
        wait_for(UP, || short(&client, "web.weft.local").into_iter().collect::<BTreeSet<_>>() == want),
        "web.weft.local did not resolve to {want:?} from host 0: {:?}",
        short(&client, "web.weft.local")
    );
    eprintln!("three containers named web on three hosts resolve from host 0 {:.2}s after the first attach", t.elapsed().as_secs_f64());
    // Rotating order: the first answer changes across queries.
    let firsts: BTreeSet<String> = (0..30).filter_map(|_| short(&client, "web.weft.local").into_iter().next()).collect();
    assert!(firsts.len() >= 2, "answers never rotate: {firsts:?}");
    // Case does not matter; the search domain works; unknown names are NXDOMAIN.
    assert_eq!(short(&client, "WEB.Weft.Local").into_iter().collect::<BTreeSet<_>>(), want);
    assert_eq!(dig(&client, &["+short", "+search", "web"]).lines().count(), 3);
    assert_eq!(status_of(&client, "nope.weft.local"), "NXDOMAIN");
    // Reverse lookup of a container on another host.
    let ptr = dig(&client, &["+short", "-x", &webs[2].ip.to_string()]);
    assert_eq!(ptr.trim(), "web.weft.local.", "PTR of {}", webs[2].ip);
    // Detach on host 2: the name goes everywhere.
    let t = Instant::now();
    let o = lab.weft(2, &["detach", &webs[2].ns]).expect("detach");
    assert!(o.status.success());
    let gone = webs[2].ip.to_string();
    assert!(wait_for(UP, || !short(&client, "web.weft.local").contains(&gone)), "the detached container's name stayed");
    eprintln!("a detached container's name was gone from host 0 after {:.2}s", t.elapsed().as_secs_f64());
    // Status and metrics say what the server did.
    let v = lab.weft_json(0, &["status", "dns"]).expect("status dns");
    assert!(v["queries"]["local"].as_u64().unwrap_or(0) > 30, "{v}");
    assert_eq!(v["counts"]["names"], 1, "{v}");
}

#[test]
fn names_come_back_after_the_origin_restarts() {
    let Some(mut lab) = lab("dns_restart", 2, Some("pw"), &[]) else { return };
    mesh(&mut lab);
    let client = lab.add_container_auto(0, "client").expect("client");
    let db = named(&mut lab, 1, "db", "db");
    let ip = db.ip.to_string();
    assert!(wait_for(UP, || short(&client, "db.weft.local") == [ip.clone()]));
    lab.kill_router(1, libc::SIGKILL).expect("kill -9");
    // Gone with its origin once the peer leaves the topology, then back once it returns.
    lab.start_router(1, &[0]).expect("restart");
    lab.wait_established(1, 1, UP).expect("reconnect");
    assert!(wait_for(UP, || short(&client, "db.weft.local") == [ip.clone()]), "db.weft.local did not come back");
    let v = lab.weft_json(1, &["status", "dns"]).expect("status dns");
    assert_eq!(v["counts"]["own"], 1, "the restarted origin does not hold its name: {v}");
}

/// dnsmasq as the upstream resolver, inside lab host 1's namespace.
struct Upstream(Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn other_names_go_upstream_and_a_dead_upstream_gives_servfail() {
    if Command::new("dnsmasq").arg("--version").stdout(Stdio::null()).status().is_err() {
        panic!("dnsmasq is not installed (apt-get install dnsmasq-base)");
    }
    let Some(mut lab) = lab("dns_upstream", 2, Some("pw"), &[]) else { return };
    let up_ip = lab.host(1).underlay_ip.to_string();
    lab.configure_host(0, Some("pw"), &["--dns-upstream", &up_ip]).expect("configure");
    mesh(&mut lab);
    let ns1 = lab.host(1).ns.clone();
    let upstream = Upstream(
        Command::new("ip")
            .args(["netns", "exec", &ns1, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces"])
            .arg(format!("--listen-address={up_ip}"))
            .args(["--address=/example.test/192.0.2.7", "--pid-file=", "--user=root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );
    let client = lab.add_container_auto(0, "client").expect("client");
    assert!(wait_for(UP, || short(&client, "www.example.test") == ["192.0.2.7"]), "not forwarded: {}", dig(&client, &["www.example.test"]));
    drop(upstream);
    assert!(wait_for(UP, || status_of(&client, "other.example.test") == "SERVFAIL"), "no SERVFAIL with the upstream down");
    let v = lab.weft_json(0, &["status", "dns"]).expect("status dns");
    assert!(v["queries"]["forwarded"].as_u64().unwrap_or(0) >= 2, "{v}");
    assert!(v["queries"]["upstream_failures"].as_u64().unwrap_or(0) >= 1, "{v}");
    // Names in the zone still answer without the upstream.
    let o = lab.weft(0, &["dns-add", "10.32.99.1", "static"]).expect("dns-add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_for(UP, || short(&client, "static.weft.local") == ["10.32.99.1"]));
}

#[test]
fn bad_names_and_malformed_packets_are_refused_cleanly() {
    let Some(mut lab) = lab("dns_bad_input", 1, Some("pw"), &["--ipalloc-init=consensus=1"]) else { return };
    lab.start_router(0, &[]).expect("router");
    let client = lab.add_container_auto(0, "client").expect("client");
    for bad in ["bad_name!", "-web", "a..b", &"x".repeat(64)] {
        let o = lab.weft(0, &["dns-add", "--", "10.32.0.9", bad]).expect("dns-add");
        assert!(!o.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("label") || err.contains("name"), "{bad:?}: {err}");
    }
    let o = lab.weft(0, &["attach", &client.ns, "--ifname", "eth1", "--name", "no way"]).expect("attach");
    assert!(!o.status.success());
    let o = lab.weft(0, &["dns-add", "10.32.0.9", "fine"]).expect("dns-add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_for(UP, || short(&client, "fine.weft.local") == ["10.32.0.9"]));
    let o = lab.weft(0, &["dns-lookup", "fine"]).expect("dns-lookup");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "10.32.0.9");
    // Garbage at the server: a short header, wrong counts, a compression loop.
    let server = lab.weft_json(0, &["status", "dns"]).expect("status")["listening"][0].as_str().unwrap_or("").to_string();
    let packets: Vec<Vec<u8>> = vec![
        vec![0x12],
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01],
        vec![0xff; 600],
    ];
    common::in_netns(&client.ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        for _ in 0..50 {
            for p in &packets {
                let _ = s.send_to(p, &server);
            }
        }
    });
    assert_eq!(short(&client, "fine.weft.local"), ["10.32.0.9"], "the server stopped answering after garbage");
    let o = lab.weft(0, &["dns-remove", "fine"]).expect("dns-remove");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_for(UP, || status_of(&client, "fine.weft.local") == "NXDOMAIN"));
}
