//! End-to-end tests of address allocation with real routers in lab
//! namespaces: concurrent allocation across hosts, crash safety, rmpeer,
//! reset, separately started rings, clean-up of dead containers, bad input.
//! They need root and skip with a message otherwise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{lab, start_star, wait_for, Tmpfs};
use serde_json::{json, Value};
use weft_lab::Lab;

const UP: Duration = Duration::from_secs(30);

/// One HTTP request to a router's API socket; returns (status, JSON body).
fn try_api(sock: &Path, method: &str, path: &str, body: &Value) -> std::io::Result<(u16, Value)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let payload = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    Ok((code, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn api(sock: &Path, method: &str, path: &str, body: &Value) -> (u16, Value) {
    try_api(sock, method, path, body).unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()))
}

fn sock(lab: &Lab, i: usize) -> PathBuf {
    lab.host(i).api_socket.clone()
}

fn alloc(lab: &Lab, i: usize, id: &str) -> (u16, Value) {
    api(&sock(lab, i), "POST", "/v1/ipam/allocate", &json!({ "id": id, "timeout_seconds": 30 }))
}

fn ipam_status(lab: &Lab, i: usize) -> Value {
    lab.weft_json(i, &["status", "ipam"]).expect("weft status ipam")
}

/// Addresses held on host `i`, by container ID.
fn held(lab: &Lab, i: usize) -> BTreeMap<String, String> {
    let v = lab.weft_json(i, &["ps"]).expect("weft ps");
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| (a["id"].as_str().unwrap_or("").to_string(), a["address"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn owned_by(st: &Value, name: &str) -> u64 {
    st["peers"].as_array().map(Vec::as_slice).unwrap_or_default().iter().find(|p| p["peer"] == name).and_then(|p| p["owned"].as_u64()).unwrap_or(0)
}

fn name_of(lab: &Lab, i: usize) -> String {
    lab.weft_json(i, &["status"]).expect("status")["name"].as_str().unwrap_or("").to_string()
}

fn mesh(lab: &mut Lab) {
    start_star(lab);
    let n = lab.hosts().len();
    for i in 0..n {
        lab.wait_established(i, n - 1, UP).expect("mesh");
    }
}

#[test]
fn three_hosts_allocate_concurrently_without_duplicates() {
    let Some(mut lab) = lab("three_hosts_allocate_concurrently", 3, Some("pw"), &[]) else { return };
    let t0 = Instant::now();
    start_star(&mut lab);
    // Fresh hosts: each asks for its first address as soon as its API answers; the
    // first request starts consensus.
    let firsts: Vec<_> = (0..3)
        .map(|i| {
            let s = sock(&lab, i);
            std::thread::spawn(move || {
                assert!(wait_for(UP, || s.exists()), "no API socket on host {i}");
                let r = api(&s, "POST", "/v1/ipam/allocate", &json!({ "id": format!("first-{i}"), "timeout_seconds": 60 }));
                (r, Instant::now())
            })
        })
        .collect();
    let mut last = t0;
    for (i, f) in firsts.into_iter().enumerate() {
        let ((code, v), at) = f.join().expect("first allocation thread");
        assert_eq!(code, 200, "first allocation on host {i}: {v}");
        last = last.max(at);
    }
    eprintln!("three fresh hosts served their first allocation {:.2}s after their routers were started", (last - t0).as_secs_f64());

    // 1,000 allocations per host, 4 clients per host, all hosts at once.
    let t1 = Instant::now();
    let workers: Vec<_> = (0..3)
        .flat_map(|h| (0..4).map(move |w| (h, w)))
        .map(|(h, w)| {
            let s = sock(&lab, h);
            std::thread::spawn(move || {
                (0..250)
                    .map(|k| {
                        let id = format!("c-{h}-{w}-{k}");
                        let (code, v) = api(&s, "POST", "/v1/ipam/allocate", &json!({ "id": id }));
                        assert_eq!(code, 200, "allocation {id} on host {h}: {v}");
                        (id, v["address"].as_str().unwrap_or("").to_string())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: BTreeMap<String, String> = BTreeMap::new();
    for w in workers {
        for (id, a) in w.join().expect("worker") {
            all.insert(id, a);
        }
    }
    let secs = t1.elapsed().as_secs_f64();
    eprintln!("3000 concurrent allocations on 3 hosts in {secs:.2}s ({:.0}/s over the mesh)", 3000.0 / secs);
    let unique: BTreeSet<&String> = all.values().collect();
    assert_eq!(all.len(), 3000);
    assert_eq!(unique.len(), 3000, "duplicate addresses handed out");
    // Each host's own records agree, and no address appears on two hosts.
    let mut everywhere: BTreeMap<String, usize> = BTreeMap::new();
    for h in 0..3 {
        let m = held(&lab, h);
        assert_eq!(m.len(), 1001, "host {h} holds {} addresses", m.len());
        for a in m.values() {
            *everywhere.entry(a.clone()).or_default() += 1;
        }
    }
    assert!(everywhere.values().all(|n| *n == 1), "an address is held on two hosts");
    // The same container ID gets the same address back.
    let (id, addr) = all.iter().next().expect("one");
    let h: usize = id[2..3].parse().expect("host digit");
    let (code, v) = alloc(&lab, h, id);
    assert_eq!((code, v["address"].as_str()), (200, Some(addr.as_str())));
    // The status says who owns what, and nothing is unreachable.
    let st = ipam_status(&lab, 0);
    assert_eq!(st["ready"], true, "{st}");
    assert_eq!(st["unreachable_addresses"], 0, "{st}");
    let total: u64 = st["peers"].as_array().expect("peers").iter().filter_map(|p| p["owned"].as_u64()).sum();
    assert_eq!(total, 1 << 20, "the ring does not cover 10.32.0.0/12: {st}");
    let text = lab.weft(0, &["status", "ipam"]).expect("status text");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Range 10.32.0.0/12") && text.contains("(this peer)"), "{text}");
}

#[test]
fn single_host_allocation_throughput() {
    let Some(mut lab) = lab("single_host_allocation_throughput", 1, Some("pw"), &["--ipalloc-init=consensus=1"]) else { return };
    lab.start_router(0, &[]).expect("router");
    let s = sock(&lab, 0);
    assert!(wait_for(UP, || s.exists()));
    let (code, v) = alloc(&lab, 0, "warm-up");
    assert_eq!(code, 200, "{v}");
    for clients in [1usize, 8] {
        let per = 2000 / clients;
        let t = Instant::now();
        let ws: Vec<_> = (0..clients)
            .map(|w| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for k in 0..per {
                        let (code, v) = api(&s, "POST", "/v1/ipam/allocate", &json!({ "id": format!("t{clients}-{w}-{k}") }));
                        assert_eq!(code, 200, "{v}");
                    }
                })
            })
            .collect();
        for w in ws {
            w.join().expect("client");
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("allocation throughput, 1 host, {clients} client(s): {} allocations in {secs:.2}s = {:.0}/s", per * clients, (per * clients) as f64 / secs);
    }
    assert_eq!(held(&lab, 0).len(), 4001);
}

#[test]
fn killed_mid_allocation_keeps_its_addresses() {
    let Some(mut lab) = lab("killed_mid_allocation", 2, Some("pw"), &[]) else { return };
    mesh(&mut lab);
    let (code, v) = alloc(&lab, 1, "before");
    assert_eq!(code, 200, "{v}");
    // A stream of allocations on host 1; kill -9 its router in the middle.
    let s = sock(&lab, 1);
    let stream = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for k in 0..100_000 {
            let id = format!("m-{k}");
            match try_api(&s, "POST", "/v1/ipam/allocate", &json!({ "id": id })) {
                Ok((200, v)) => acked.push((id, v["address"].as_str().unwrap_or("").to_string())),
                _ => break,
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(700));
    lab.kill_router(1, libc::SIGKILL).expect("kill -9");
    let acked = stream.join().expect("stream");
    assert!(acked.len() > 10, "only {} allocations before the kill", acked.len());
    eprintln!("{} allocations acknowledged before kill -9", acked.len());
    lab.start_router(1, &[0]).expect("restart");
    lab.wait_established(1, 1, UP).expect("reconnect");
    // Every acknowledged allocation survived, with the same address.
    let now = held(&lab, 1);
    for (id, a) in &acked {
        assert_eq!(now.get(id), Some(a), "{id} lost its address {a} in the crash");
    }
    // New allocations never collide with what survived.
    let survived: BTreeSet<&String> = now.values().collect();
    for k in 0..50 {
        let (code, v) = alloc(&lab, 1, &format!("after-{k}"));
        assert_eq!(code, 200, "{v}");
        let a = v["address"].as_str().unwrap_or("").to_string();
        assert!(!survived.contains(&a), "{a} handed out twice after the restart");
    }
    let st = ipam_status(&lab, 1);
    assert_eq!(st["ready"], true, "{st}");
    assert!(st["last_error"].is_null(), "{st}");
}

#[test]
fn rmpeer_takes_over_a_dead_hosts_space_and_reset_hands_space_over() {
    let Some(mut lab) = lab("rmpeer_and_reset", 3, Some("pw"), &[]) else { return };
    mesh(&mut lab);
    for i in 0..3 {
        let (code, v) = alloc(&lab, i, &format!("x{i}"));
        assert_eq!(code, 200, "{v}");
    }
    let names: Vec<String> = (0..3).map(|i| name_of(&lab, i)).collect();
    assert!(wait_for(UP, || { let st = ipam_status(&lab, 0); (0..3).all(|i| owned_by(&st, &names[i]) > 0) }));
    // A live peer is not removed without --force.
    let o = lab.weft(0, &["rmpeer", &names[1]]).expect("rmpeer live");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("reachable right now"), "{}", String::from_utf8_lossy(&o.stderr));

    lab.kill_router(2, libc::SIGKILL).expect("kill host 2");
    assert!(wait_for(UP, || ipam_status(&lab, 0)["unreachable_addresses"].as_u64().unwrap_or(0) > 0));
    let text = String::from_utf8_lossy(&lab.weft(0, &["status", "ipam"]).expect("status").stdout).to_string();
    assert!(text.contains("UNREACHABLE") && text.contains("rmpeer"), "{text}");
    let before = owned_by(&ipam_status(&lab, 0), &names[0]);
    let dead = owned_by(&ipam_status(&lab, 0), &names[2]);
    let v = lab.weft_json(0, &["rmpeer", &names[2]]).expect("rmpeer");
    assert_eq!(v["taken"].as_u64(), Some(dead), "{v}");
    let st = ipam_status(&lab, 0);
    assert_eq!(owned_by(&st, &names[0]), before + dead, "{st}");
    assert_eq!(st["unreachable_addresses"], 0, "{st}");
    // Host 1 learns of it by gossip.
    assert!(wait_for(UP, || owned_by(&ipam_status(&lab, 1), &names[2]) == 0), "host 1 still sees the dead host's space");

    // Host 1 leaves with reset: its container must be detached first (or --force).
    let o = lab.weft(1, &["reset"]).expect("reset");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("still held"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lab.weft(1, &["ipam", "release", "x1"]).expect("release");
    assert!(o.status.success());
    let mine = owned_by(&ipam_status(&lab, 1), &names[1]);
    let v = lab.weft_json(1, &["reset"]).expect("reset");
    assert_eq!(v["handed_to"].as_str(), Some(names[0].as_str()), "{v}");
    assert_eq!(v["addresses"].as_u64(), Some(mine));
    assert!(wait_for(UP, || owned_by(&ipam_status(&lab, 0), &names[0]) == 1 << 20), "host 0 did not get all the space");
    assert!(!lab.host(1).state_dir.join("ipam.json").exists(), "reset left the IPAM state behind");
}

#[test]
fn separately_started_rings_refuse_to_merge_and_keep_working() {
    let Some(mut lab) = lab("separate_rings", 2, Some("pw"), &["--ipalloc-init=consensus=1"]) else { return };
    lab.start_router(0, &[]).expect("router 0");
    lab.start_router(1, &[]).expect("router 1");
    for i in 0..2 {
        assert!(wait_for(UP, || sock(&lab, i).exists()));
        let (code, v) = alloc(&lab, i, "before");
        assert_eq!(code, 200, "{v}");
    }
    let before: Vec<_> = (0..2).map(|i| held(&lab, i)).collect();
    let ip1 = lab.host(1).underlay_ip.to_string();
    let o = lab.weft(0, &["connect", &ip1]).expect("connect");
    assert!(o.status.success());
    lab.wait_established(0, 1, UP).expect("connected");
    assert!(
        wait_for(UP, || (0..2).all(|i| ipam_status(&lab, i)["last_error"].as_str().is_some_and(|e| e.contains("separate meshes")))),
        "both sides should say why the rings do not merge: {} / {}",
        ipam_status(&lab, 0),
        ipam_status(&lab, 1)
    );
    for (i, before) in before.iter().enumerate() {
        assert_eq!(held(&lab, i), *before, "host {i}'s allocations changed");
        let (code, v) = alloc(&lab, i, "after");
        assert_eq!(code, 200, "host {i} stopped serving: {v}");
        assert_eq!(ipam_status(&lab, i)["ready"], true);
    }
    // The mesh itself keeps working.
    assert_eq!(common::established(&lab, 0), 1);
}

#[test]
fn bad_requests_and_an_exhausted_range_get_clear_errors() {
    let Some(mut lab) = lab("ipam_bad_input", 1, Some("pw"), &["--ipalloc-init=consensus=1", "--ipalloc-range=10.60.0.0/29"]) else { return };
    lab.start_router(0, &[]).expect("router");
    assert!(wait_for(UP, || sock(&lab, 0).exists()));
    // A /29 has 6 usable addresses.
    let mut got = BTreeSet::new();
    for k in 0..6 {
        let (code, v) = alloc(&lab, 0, &format!("e{k}"));
        assert_eq!(code, 200, "{v}");
        got.insert(v["address"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(got.len(), 6);
    let (code, v) = alloc(&lab, 0, "one-too-many");
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["kind"], "exhausted", "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("no free address in 10.60.0.0/29"), "{v}");
    assert_eq!(held(&lab, 0).len(), 6, "a failed allocation disturbed the others");
    // The CLI says it too.
    let o = lab.weft(0, &["ipam", "alloc", "cli-too-many"]).expect("cli");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no free address"));
    // Metrics count it (refreshed once a second).
    let ns = lab.host(0).ns.clone();
    let mut last = String::new();
    let ok = wait_for(Duration::from_secs(10), || {
        let body = common::in_netns(&ns, || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:6782").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
            let mut b = String::new();
            s.read_to_string(&mut b).expect("read");
            b
        });
        ["weft_ipam_allocations{} 6", "weft_ipam_failed_requests_total{} 2", "weft_ipam_addresses{owner=\"this_peer\"} 8"]
            .iter()
            .all(|n| body.contains(n))
            || {
                last = body;
                false
            }
    });
    assert!(ok, "IPAM metrics missing or wrong:\n{last}");
    // Release one and the next request gets it.
    let o = lab.weft(0, &["ipam", "release", "e3"]).expect("release");
    assert!(o.status.success());
    let (code, v) = alloc(&lab, 0, "again");
    assert_eq!(code, 200, "{v}");
    // A subnet outside the range.
    let (code, v) = api(&sock(&lab, 0), "POST", "/v1/ipam/allocate", &json!({ "id": "x", "subnet": "10.99.0.0/24" }));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("not inside the allocation range"), "{v}");
    // An address already taken.
    let taken = held(&lab, 0)["e0"].clone();
    let (code, v) = api(&sock(&lab, 0), "POST", "/v1/ipam/allocate", &json!({ "id": "thief", "address": taken }));
    assert_eq!(code, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("already taken by container e0"), "{v}");
    // Malformed requests.
    for body in [json!({ "id": "" }), json!({ "id": "y", "subnet": "10.60.0.1/29" }), json!({ "id": "y", "address": "nonsense" })] {
        let (code, v) = api(&sock(&lab, 0), "POST", "/v1/ipam/allocate", &body);
        assert_eq!(code, 400, "{body}: {v}");
    }

    // A corrupt state file stops the start, naming the file.
    lab.kill_router(0, libc::SIGTERM).expect("stop");
    assert!(wait_for(UP, || !sock(&lab, 0).exists()));
    let file = lab.host(0).state_dir.join("ipam.json");
    let good = std::fs::read(&file).expect("state file");
    std::fs::write(&file, &good[..good.len() / 2]).expect("truncate");
    let err = lab.start_router(0, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(err.contains("ipam.json") && err.contains("corrupt"), "{err}");
    // So does a state file with an address given twice.
    let mut st: Value = serde_json::from_slice(&good).expect("json");
    let first = st["allocations"][0].clone();
    st["allocations"].as_array_mut().expect("allocs").push(json!({ "id": "twin", "addr": first["addr"], "subnet": first["subnet"], "netns": null }));
    std::fs::write(&file, serde_json::to_vec(&st).expect("json")).expect("write");
    let err = lab.start_router(0, &[]).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(err.contains("ipam.json") && err.contains("allocated twice"), "{err}");
    // The good file starts again with every address.
    std::fs::write(&file, &good).expect("restore");
    lab.start_router(0, &[]).expect("restart");
    assert!(wait_for(UP, || sock(&lab, 0).exists() && lab.weft(0, &["ps"]).map(|o| o.status.success()).unwrap_or(false)));
    assert_eq!(held(&lab, 0).len(), 6);
}

#[test]
fn attach_without_address_and_gone_containers_are_released() {
    let Some(mut lab) = lab("attach_auto_and_gc", 2, Some("pw"), &["--ipalloc-gc-grace=2"]) else { return };
    mesh(&mut lab);
    let a = lab.add_container_auto(0, "a").expect("container a");
    let b = lab.add_container_auto(1, "b").expect("container b");
    assert_ne!(a.ip, b.ip);
    assert!(common::ping_until(&lab, &a, &b.ip.to_string(), &[], UP), "auto-addressed containers cannot reach each other");
    // A second attach that fails (the interface exists) leaves the address the container holds.
    let o = lab.weft(0, &["attach", &a.ns]).expect("attach again");
    assert!(!o.status.success(), "a second ethwe was accepted");
    assert!(held(&lab, 0).values().any(|x| x.starts_with(&format!("{}/", a.ip))), "a failed attach released the container's address");
    // Detach releases the address.
    let o = lab.weft(1, &["detach", &b.ns]).expect("detach");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("released"), "{}", String::from_utf8_lossy(&o.stdout));
    // Only the host's own address (given for DNS with the first container) remains.
    assert!(held(&lab, 1).keys().all(|id| id == "weft:expose"), "{:?}", held(&lab, 1));
    // Expose without an address gives the host its address from IPAM (the one it
    // already got for DNS, here); hide gives it back.
    let v = lab.weft_json(0, &["expose"]).expect("expose");
    let exposed = v["exposed"].as_str().unwrap_or("").to_string();
    assert!(held(&lab, 0).values().any(|x| *x == exposed), "{exposed} not held");
    assert!(common::ping_until(&lab, &a, exposed.split('/').next().unwrap_or(""), &[], UP), "the exposed host address is unreachable");
    let o = lab.weft(0, &["hide"]).expect("hide");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!held(&lab, 0).values().any(|x| *x == exposed));

    // A container known by PID whose namespace disappears: its address is released after the grace period.
    let mut child = std::process::Command::new("unshare").args(["--net", "sleep", "120"]).spawn().expect("unshare");
    let pid = child.id().to_string();
    assert!(wait_for(Duration::from_secs(5), || {
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).ok().is_some_and(|i| Some(i) != own)
    }));
    let v = lab.weft_json(1, &["attach", &pid]).expect("attach by pid");
    let addr = v["addresses"][0].as_str().unwrap_or("").to_string();
    assert!(held(&lab, 1).values().any(|x| *x == addr));
    let _ = child.kill();
    let _ = child.wait();
    let t = Instant::now();
    assert!(wait_for(Duration::from_secs(30), || !held(&lab, 1).values().any(|x| *x == addr)), "{addr} was never released");
    eprintln!("address of a vanished namespace released {:.1}s after it went", t.elapsed().as_secs_f64());
    let log = std::fs::read_to_string(&lab.host(1).log).unwrap_or_default();
    assert!(log.contains("network namespace is gone"), "no log line for the release");
}

/// How host `viewer` sees host `of`'s free addresses (from the ring as gossiped).
fn free_seen(lab: &Lab, viewer: usize, of: &str) -> Option<u64> {
    ipam_status(lab, viewer)["peers"].as_array()?.iter().find(|p| p["peer"] == of)?["free"].as_u64()
}

#[test]
fn a_full_disk_holds_back_every_answer_and_message_until_it_is_saved() {
    let Some(mut lab) = lab("full_disk", 2, Some("pw"), &[]) else { return };
    let disk = Tmpfs::mount(&lab.host(0).state_dir, "1m");
    mesh(&mut lab);
    let (code, v) = alloc(&lab, 0, "before");
    assert_eq!(code, 200, "{v}");
    let a = name_of(&lab, 0);
    // Host 1 has host 0's free count as it is now (refreshed every 5 s, then gossiped).
    assert!(wait_for(UP, || free_seen(&lab, 1, &a) == free_seen(&lab, 0, &a)), "host 1 never saw host 0's free count");
    let seen_before = free_seen(&lab, 1, &a);

    disk.fill();
    let (code, v) = alloc(&lab, 0, "during");
    assert_eq!(code, 503, "an allocation that cannot be saved must not be answered: {v}");
    assert_eq!(v["kind"], "save_failed", "{v}");
    let err = v["error"].as_str().unwrap_or("");
    assert!(err.contains("could not save") && err.contains("ipam.json") && err.contains("No space left"), "{err}");
    let o = lab.weft(0, &["dns-add", "10.32.99.7", "during"]).expect("dns-add");
    assert!(!o.status.success(), "a name that cannot be saved must not be added");
    assert!(String::from_utf8_lossy(&o.stderr).contains("could not save"), "{}", String::from_utf8_lossy(&o.stderr));
    let st = ipam_status(&lab, 0);
    assert!(st["save_error"].as_str().is_some_and(|e| e.contains("No space left")), "{st}");
    assert!(st["save_errors"].as_u64().unwrap_or(0) >= 1, "{st}");
    let text = String::from_utf8_lossy(&lab.weft(0, &["status", "ipam"]).expect("status").stdout).to_string();
    assert!(text.contains("FAILS") && text.contains("ipam.json"), "{text}");
    let metrics = lab.weft(0, &["status", "dns"]).expect("status dns");
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("FAILS"), "{}", String::from_utf8_lossy(&metrics.stdout));
    // Two free-count refreshes and an anti-entropy round later, host 1 still has the old figure:
    // no ring left host 0 while its state was not on disk. Nor the name.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(free_seen(&lab, 1, &a), seen_before, "gossip left host 0 while its state was not saved");
    let o = lab.weft(1, &["dns-lookup", "during"]).expect("dns-lookup");
    assert!(!o.status.success(), "host 1 learned a name host 0 could not save");

    disk.free();
    assert!(wait_for(UP, || ipam_status(&lab, 0)["save_error"].is_null()), "the save did not come back");
    // The same container asking again gets the address it was refused; nothing is handed out twice.
    let (code, during) = alloc(&lab, 0, "during");
    assert_eq!(code, 200, "{during}");
    let (code, after) = alloc(&lab, 0, "after");
    assert_eq!(code, 200, "{after}");
    let (code, other) = alloc(&lab, 1, "other");
    assert_eq!(code, 200, "{other}");
    let mut all: Vec<String> = held(&lab, 0).into_values().chain(held(&lab, 1).into_values()).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "an address was handed out twice: {all:?}");
    assert_eq!(n, 4, "{all:?}");
    let on_disk = std::fs::read_to_string(lab.host(0).state_dir.join("ipam.json")).expect("ipam.json");
    assert!(on_disk.contains("\"during\"") && on_disk.contains("\"after\""), "{on_disk}");
    assert!(wait_for(UP, || free_seen(&lab, 1, &a) == free_seen(&lab, 0, &a)), "host 0's ring never reached host 1 again");
    let o = lab.weft(0, &["dns-add", "10.32.99.7", "during"]).expect("dns-add");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(wait_for(UP, || lab.weft(1, &["dns-lookup", "during"]).is_ok_and(|o| o.status.success())));
    drop(disk);
}

/// The owner of every entry of the ring saved in `file`.
fn owners_on_disk(file: &Path) -> BTreeSet<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(file).expect("state file")).expect("state JSON");
    v["ring"]["entries"].as_array().map(Vec::as_slice).unwrap_or_default().iter().map(|e| e["peer"].to_string()).collect()
}

#[test]
fn reset_waits_until_the_receiver_has_the_space_on_disk() {
    let Some(mut lab) = lab("reset_ack", 2, Some("pw"), &[]) else { return };
    mesh(&mut lab);
    for i in 0..2 {
        let (code, v) = alloc(&lab, i, &format!("x{i}"));
        assert_eq!(code, 200, "{v}");
        let o = lab.weft(i, &["ipam", "release", &format!("x{i}")]).expect("release");
        assert!(o.status.success());
    }
    let file = lab.host(1).state_dir.join("ipam.json");
    assert!(wait_for(UP, || owners_on_disk(&file).len() == 2), "host 1's saved ring lacks host 0: {:?}", owners_on_disk(&file));
    let v = lab.weft_json(0, &["reset"]).expect("reset");
    assert_eq!(v["acknowledged"], true, "{v}");
    assert_eq!(v["handed_to"].as_str(), Some(name_of(&lab, 1).as_str()), "{v}");
    // When the answer came, host 1's disk already held all of host 0's former space.
    assert_eq!(owners_on_disk(&file).len(), 1, "acknowledged before the receiver saved it: {:?}", owners_on_disk(&file));
    let pid = lab.host(0).router_pid().expect("router 0");
    assert!(wait_for(Duration::from_secs(10), || !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    }), "the router did not stop after reset");
}

#[test]
fn reset_says_plainly_when_the_receiver_never_confirms() {
    let Some(mut lab) = lab("reset_unconfirmed", 2, Some("pw"), &[]) else { return };
    let disk = Tmpfs::mount(&lab.host(1).state_dir, "1m");
    mesh(&mut lab);
    let (code, v) = alloc(&lab, 0, "x");
    assert_eq!(code, 200, "{v}");
    let o = lab.weft(0, &["ipam", "release", "x"]).expect("release");
    assert!(o.status.success());
    // Host 1 cannot save what it is given, so it must not confirm it.
    disk.fill();
    let t0 = Instant::now();
    let o = lab.weft(0, &["reset"]).expect("reset");
    let waited = t0.elapsed();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("WARNING") && out.contains("did not confirm") && out.contains("rmpeer"), "{out}");
    assert!(waited >= Duration::from_secs(9), "gave up after {waited:?}, before the 10 s wait");
    assert!(!lab.host(0).state_dir.join("ipam.json").exists(), "reset left the IPAM state behind");
    drop(disk);
}
