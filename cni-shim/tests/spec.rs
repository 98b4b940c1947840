//! weft-cni driven the way the CNI spec says a runtime drives a plugin (see
//! `common`), against real routers in lab namespaces: ADD, CHECK, DEL, GC,
//! STATUS and VERSION in spec versions 0.3.1 to 1.1.0, and bad input.
//! Needs root; skips with a message otherwise.

mod common;

use std::time::Duration;

use common::{allocations, lab, links, plugin_dir, wait_for, weft_conflist, Attachment, Outcome, Runtime};
use serde_json::{json, Value};
use weft_lab::Lab;

fn runtime(lab: &Lab, host: usize, version: &str, extra: Value) -> Runtime {
    let dir = plugin_dir(&lab.dir().join(format!("h{host}")));
    Runtime::new(weft_conflist(version, &lab.host(host).api_socket, extra), vec![dir], &lab.host(host).ns)
}

fn container(lab: &mut Lab, name: &str) -> String {
    let ns = lab.add_namespace(name).expect("namespace");
    format!("/run/netns/{ns}")
}

fn ns_name(path: &str) -> &str {
    path.trim_start_matches("/run/netns/")
}

fn ip_of(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().expect("an address");
    a.split('/').next().expect("ip").to_string()
}

fn ping(lab: &Lab, netns: &str, ip: &str) -> bool {
    wait_for(Duration::from_secs(10), || {
        lab.exec(ns_name(netns), &["ping", "-c", "1", "-W", "1", ip]).map(|o| o.status.success()).unwrap_or(false)
    })
}

fn dig(lab: &Lab, netns: &str, server: &str, name: &str) -> String {
    let o = lab.exec(ns_name(netns), &["dig", "+short", "+time=2", "+tries=1", &format!("@{server}"), name]).expect("dig");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn add_check_del_gc_status_across_two_hosts() {
    let Some(mut lab) = lab("add_check_del_gc_status_across_two_hosts", 2, &[]) else { return };
    let mut rt0 = runtime(&lab, 0, "1.1.0", json!({}));
    let mut rt1 = runtime(&lab, 1, "1.1.0", json!({}));
    // The first STATUS starts consensus; the hosts agree in a moment.
    assert!(wait_for(Duration::from_secs(10), || rt0.status().code() == 0), "STATUS: {:?}", rt0.status());

    let a = Attachment { args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-a".into(), ..Attachment::new("ctr-a", &container(&mut lab, "a")) };
    let b = Attachment { args: "IgnoreUnknown=1;K8S_POD_NAME=Web_B".into(), ..Attachment::new("ctr-b", &container(&mut lab, "b")) };
    let ra = rt0.add(&a).ok();
    let rb = rt1.add(&b).ok();

    // The result: host and container interfaces with MACs, the address on the container's,
    // a default route through the host's gateway address, weft DNS.
    assert_eq!(ra["cniVersion"], "1.1.0");
    let ifs = ra["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifs.len(), 2, "{ra}");
    assert!(ifs[0].get("sandbox").is_none() && ifs[0]["name"].as_str().is_some_and(|n| n.starts_with("vw")), "{ra}");
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], a.netns.as_str());
    assert_eq!(ifs[1]["mtu"], 1376, "{ra}");
    for i in ifs {
        assert_eq!(i["mac"].as_str().map(str::len), Some(17), "{ra}");
    }
    assert_eq!(ra["ips"][0]["interface"], 1);
    let gw = ra["ips"][0]["gateway"].as_str().expect("gateway").to_string();
    assert_eq!(ra["routes"], json!([{ "dst": "0.0.0.0/0", "gw": gw }]));
    assert_eq!(ra["dns"]["nameservers"], json!([gw]));
    assert_eq!(ra["dns"]["search"], json!(["weft.local"]));
    let (ipa, ipb) = (ip_of(&ra), ip_of(&rb));
    assert_ne!(ipa, ipb);

    // What ADD set up in the namespace.
    let o = lab.exec(ns_name(&a.netns), &["ip", "-o", "addr", "show", "eth0"]).expect("ip addr");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&ipa));
    let o = lab.exec(ns_name(&a.netns), &["ip", "route", "show", "default"]).expect("ip route");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("via {gw} dev eth0")), "{}", String::from_utf8_lossy(&o.stdout));
    let host_if = ifs[0]["name"].as_str().expect("host if").to_string();
    let o = lab.exec(&lab.host(0).ns, &["ip", "-d", "link", "show", &host_if]).expect("ip link");
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(shown.contains("master weft") && shown.contains("hairpin on"), "{shown}");

    // Across hosts: ping, and names in weft DNS (K8S_POD_NAME, made a DNS label).
    assert!(ping(&lab, &a.netns, &ipb), "{ipa} could not reach {ipb} on the other host");
    assert!(wait_for(Duration::from_secs(10), || dig(&lab, &a.netns, &gw, "web-b.weft.local") == ipb), "web-b did not resolve from host 0");
    assert!(wait_for(Duration::from_secs(10), || dig(&lab, &b.netns, rb["dns"]["nameservers"][0].as_str().expect("ns"), "web-a.weft.local") == ipa));

    // weft status shows the attachment.
    let st = lab.weft_json(0, &["status"]).expect("status");
    let cni = st["cni"].as_array().expect("cni attachments");
    assert_eq!(cni.len(), 1, "{cni:?}");
    assert_eq!(cni[0]["container_id"], "ctr-a");
    assert_eq!(cni[0]["names"], json!(["web-a"]));
    let text = lab.weft(0, &["status", "cni"]).expect("status cni");
    assert!(String::from_utf8_lossy(&text.stdout).contains("ctr-a"), "{}", String::from_utf8_lossy(&text.stdout));

    // CHECK passes, then fails once something ADD set up is gone.
    assert_eq!(rt0.check(&a).code(), 0, "{:?}", rt0.check(&a));
    lab.exec(ns_name(&a.netns), &["ip", "route", "del", "default"]).expect("route del");
    let c = rt0.check(&a);
    assert_eq!(c.code(), 103, "{c:?}");
    assert!(c.details().contains("route"), "{}", c.details());
    lab.exec(ns_name(&a.netns), &["ip", "link", "set", "eth0", "down"]).expect("down");
    assert!(rt0.check(&a).details().contains("down"));

    // DEL: interface, address and name go; a second DEL succeeds too.
    assert_eq!(rt0.del(&a).code(), 0);
    assert!(!links(&lab, ns_name(&a.netns)).contains(&"eth0".to_string()));
    assert!(!links(&lab, &lab.host(0).ns).contains(&host_if));
    assert!(!allocations(&lab, 0).iter().any(|(id, _)| id.contains("ctr-a")), "{:?}", allocations(&lab, 0));
    let ns_b = rb["dns"]["nameservers"][0].as_str().expect("nameserver").to_string();
    assert!(wait_for(Duration::from_secs(10), || dig(&lab, &b.netns, &ns_b, "web-a.weft.local").is_empty()), "web-a still resolves");
    assert_eq!(rt0.del(&a).code(), 0, "DEL is idempotent");
    // DEL of a container whose namespace is gone: only the release.
    assert_eq!(rt0.del(&Attachment::new("never-added", "")).code(), 0);

    // GC: of three containers the runtime still knows one; the others' addresses go.
    let c1 = Attachment::new("gc-1", &container(&mut lab, "g1"));
    let c2 = Attachment::new("gc-2", &container(&mut lab, "g2"));
    let c3 = Attachment::new("gc-3", &container(&mut lab, "g3"));
    for c in [&c1, &c2, &c3] {
        rt1.add(c).ok();
    }
    assert_eq!(allocations(&lab, 1).iter().filter(|(id, _)| id.starts_with("cni:weft:")).count(), 4);
    assert_eq!(rt1.gc(&[&b, &c2]).code(), 0);
    let left: Vec<String> = allocations(&lab, 1).into_iter().map(|(id, _)| id).filter(|id| id.starts_with("cni:")).collect();
    assert_eq!(left, ["cni:weft:ctr-b:eth0", "cni:weft:gc-2:eth0"], "GC kept the wrong ones");
    // GC of another network name leaves weft's alone.
    let mut other = runtime(&lab, 1, "1.1.0", json!({}));
    other.conflist["name"] = json!("other");
    assert_eq!(other.gc(&[]).code(), 0);
    assert_eq!(allocations(&lab, 1).iter().filter(|(id, _)| id.starts_with("cni:weft:")).count(), 2);
    for c in [&b, &c2] {
        assert_eq!(rt1.del(c).code(), 0);
    }
}

#[test]
fn older_spec_versions_and_settings() {
    let Some(mut lab) = lab("older_spec_versions_and_settings", 1, &[]) else { return };
    // 0.3.1 and 0.4.0: the legacy result layout (ips[].version), no interface MTU.
    for (i, v) in ["0.3.1", "0.4.0", "1.0.0"].iter().enumerate() {
        let mut rt = runtime(&lab, 0, v, json!({ "mtu": 1300, "hairpinMode": false, "defaultRoute": false, "subnet": "10.32.9.0/24" }));
        let a = Attachment::new(&format!("v{i}"), &container(&mut lab, &format!("v{i}")));
        let r = rt.add(&a).ok();
        assert_eq!(r["cniVersion"], *v);
        let legacy = *v != "1.0.0";
        assert_eq!(r["ips"][0].get("version").is_some(), legacy, "{r}");
        assert!(r["interfaces"][1].get("mtu").is_none(), "{r}");
        assert!(r["ips"][0]["address"].as_str().is_some_and(|s| s.starts_with("10.32.9.")), "subnet setting: {r}");
        assert!(r.get("routes").is_none_or(|x| x.as_array().is_none_or(Vec::is_empty)), "defaultRoute false: {r}");
        let o = lab.exec(ns_name(&a.netns), &["ip", "-o", "link", "show", "eth0"]).expect("link");
        assert!(String::from_utf8_lossy(&o.stdout).contains("mtu 1300"));
        if *v != "0.3.1" {
            assert_eq!(rt.check(&a).code(), 0, "{:?}", rt.check(&a));
        }
        assert_eq!(rt.del(&a).code(), 0);
    }
    // VERSION answers with no environment but the command (podman: CNI_PATH=dummy).
    let rt = runtime(&lab, 0, "1.0.0", json!({}));
    let v = rt.exec_env("weft-cni", "VERSION", None, br#"{"cniVersion":"1.0.0"}"#, &[("CNI_PATH", Some("dummy"))]).ok();
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    let v = rt.exec_env("weft-cni", "VERSION", None, b"", &[("CNI_PATH", None)]).ok();
    assert_eq!(v["cniVersion"], "1.1.0");
}

/// Every bad input returns the right code and leaves no veth and no allocation behind.
#[test]
fn bad_input_leaves_nothing_behind() {
    let Some(mut lab) = lab("bad_input_leaves_nothing_behind", 1, &[]) else { return };
    let mut rt = runtime(&lab, 0, "1.0.0", json!({}));
    // One good attachment first, so that the bridge, gateway and DNS exist.
    let good = Attachment::new("good", &container(&mut lab, "good"));
    rt.add(&good).ok();
    let host_ns = lab.host(0).ns.clone();
    let before = (links(&lab, &host_ns), allocations(&lab, 0));
    let socket = lab.host(0).api_socket.clone();
    let conf = |v: &str| json!({ "cniVersion": v, "name": "weft", "type": "weft-cni", "socket": socket }).to_string();
    let fresh = Attachment::new("fresh", &container(&mut lab, "fresh"));

    let cases: Vec<(&str, Outcome, u64)> = vec![
        ("malformed JSON", rt.exec("weft-cni", "ADD", Some(&fresh), b"{\"cniVersion\": \"1.0.0\", "), 6),
        ("unknown cniVersion", rt.exec("weft-cni", "ADD", Some(&fresh), conf("7.0.0").as_bytes()), 1),
        ("invalid setting", rt.exec("weft-cni", "ADD", Some(&fresh), conf("1.0.0").replace("\"socket\"", "\"mtu\":1,\"socket\"").as_bytes()), 7),
        ("missing CNI_NETNS", rt.exec("weft-cni", "ADD", Some(&Attachment { netns: String::new(), ..fresh.clone() }), conf("1.0.0").as_bytes()), 4),
        ("namespace does not exist", rt.exec("weft-cni", "ADD", Some(&Attachment::new("x", "/run/netns/weft-no-such-ns")), conf("1.0.0").as_bytes()), 8),
        ("interface name taken", rt.exec("weft-cni", "ADD", Some(&Attachment { ifname: "lo".into(), ..fresh.clone() }), conf("1.0.0").as_bytes()), 4),
        ("bad container ID", rt.exec("weft-cni", "ADD", Some(&Attachment::new("no/slash", &fresh.netns)), conf("1.0.0").as_bytes()), 4),
    ];
    // The interface taken by the good attachment, on a second ADD of it.
    let again = rt.exec("weft-cni", "ADD", Some(&good), conf("1.0.0").as_bytes());
    for (what, got, want) in cases.iter().chain([("second ADD of an attachment", again, 4)].iter()) {
        assert_eq!(got.code(), *want, "{what}: {got:?}");
        assert!(!got.details().is_empty(), "{what}: no message");
    }
    assert_eq!(links(&lab, &host_ns), before.0, "a veth was left behind");
    assert_eq!(allocations(&lab, 0), before.1, "an allocation was left behind or lost");
    assert_eq!(rt.check(&good).code(), 0, "the good attachment was disturbed");

    // The router down: 11 (try again later) for ADD, and nothing left behind.
    lab.kill_router(0, libc::SIGTERM).expect("stop router");
    let down = rt.exec("weft-cni", "ADD", Some(&fresh), conf("1.1.0").as_bytes());
    assert_eq!(down.code(), 11, "{down:?}");
    assert!(down.details().contains("weft launch"), "{}", down.details());
    let rt11 = runtime(&lab, 0, "1.1.0", json!({}));
    assert_eq!(rt11.status().code(), 50, "STATUS with the router down");
    assert_eq!(rt.status().code(), 1, "STATUS needs a 1.1.0 configuration");
    assert!(!links(&lab, ns_name(&fresh.netns)).contains(&"eth0".to_string()));
    let veths = |l: Vec<String>| l.into_iter().filter(|n| n.starts_with("vw")).collect::<Vec<_>>();
    assert_eq!(veths(links(&lab, &host_ns)), veths(before.0), "a veth was left behind");
}

/// Before the hosts agree on the address ring, ADD says "try again later" and STATUS "not available".
#[test]
fn waiting_for_consensus_is_try_again_later() {
    let Some(mut lab) = lab("waiting_for_consensus_is_try_again_later", 1, &["--ipalloc-init=consensus=2"]) else { return };
    let mut rt = runtime(&lab, 0, "1.1.0", json!({ "timeoutSeconds": 1 }));
    let st = rt.status();
    assert_eq!(st.code(), 50, "{st:?}");
    assert!(st.details().contains("consensus"), "{}", st.details());
    let a = Attachment::new("early", &container(&mut lab, "early"));
    let r = rt.add(&a);
    assert_eq!(r.code(), 11, "{r:?}");
    assert!(!links(&lab, ns_name(&a.netns)).contains(&"eth0".to_string()));
    assert!(allocations(&lab, 0).is_empty());
}

/// Each CNI network name is its own weft network: attachments of one name reach each other
/// across hosts, never those of another, even in one subnet; DEL of the last one takes the
/// network off the host.
#[test]
fn cni_networks_of_different_names_are_isolated() {
    let Some(mut lab) = lab("cni_networks_of_different_names_are_isolated", 2, &[]) else { return };
    let rt = |lab: &Lab, host: usize, name: &str| {
        let mut r = runtime(lab, host, "1.1.0", json!({ "subnet": "10.32.77.0/24", "defaultRoute": false }));
        r.conflist["name"] = json!(name);
        r
    };
    let (mut red0, mut red1, mut blue1) = (rt(&lab, 0, "red"), rt(&lab, 1, "red"), rt(&lab, 1, "blue"));
    assert!(wait_for(Duration::from_secs(10), || red0.status().code() == 0), "STATUS: {:?}", red0.status());
    let a = Attachment::new("ctr-red-a", &container(&mut lab, "ra"));
    let b = Attachment::new("ctr-red-b", &container(&mut lab, "rb"));
    let c = Attachment::new("ctr-blue-c", &container(&mut lab, "bc"));
    let ra = red0.add(&a).ok();
    let rb = red1.add(&b).ok();
    let rc = blue1.add(&c).ok();
    assert!(ping(&lab, &a.netns, &ip_of(&rb)), "red a cannot reach red b on the other host");
    assert!(!ping_once(&lab, &a.netns, &ip_of(&rc)), "red a reached blue c");
    assert!(!ping_once(&lab, &c.netns, &ip_of(&ra)), "blue c reached red a");
    let nets = |h: usize| lab.weft_json(h, &["status"]).expect("status")["networks"].as_array().cloned().unwrap_or_default();
    let names = |h: usize| nets(h).iter().filter_map(|n| n["name"].as_str().map(str::to_string)).collect::<Vec<_>>();
    assert!(names(1).contains(&"red".to_string()) && names(1).contains(&"blue".to_string()), "{:?}", names(1));
    // DEL of host 1's only blue attachment takes blue off host 1; red stays.
    blue1.del(&c).ok();
    assert!(!names(1).contains(&"blue".to_string()), "{:?}", names(1));
    assert!(names(1).contains(&"red".to_string()));
    red1.del(&b).ok();
    red0.del(&a).ok();
}

fn ping_once(lab: &Lab, netns: &str, ip: &str) -> bool {
    lab.exec(ns_name(netns), &["ping", "-c", "3", "-i", "0.3", "-W", "1", ip]).map(|o| o.status.success()).unwrap_or(false)
}
