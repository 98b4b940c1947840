//! Docker without Kubernetes, against Debian's dockerd 20.10 on lab hosts (one dockerd per host,
//! see `weft_lab::docker`): the network and IPAM plugin (`docker network create -d weft`),
//! names across hosts, restarts of containers, the router and dockerd, isolation between
//! networks, Compose, `weft attach CONTAINER`, and the errors a person can act on.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use weft_lab::docker::{host_dir, require_compose, require_docker, router_args, Dockerd, BUSYBOX_IMAGE as IMG};
use weft_lab::Lab;

/// Dockerds before the lab: fields drop in this order.
struct DockerLab {
    d: Vec<Dockerd>,
    lab: Lab,
}

/// A lab of `hosts` hosts, each with a router serving the plugin to its own dockerd, dockerd's
/// resolvers pointed at weft DNS with `weft setup-docker`.
fn docker_lab(test: &str, hosts: usize, password: Option<&str>) -> Option<DockerLab> {
    if !require_docker(test) {
        return None;
    }
    let mut lab = lab(test, hosts, password, &[])?;
    for i in 0..hosts {
        let args = router_args(&lab, i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.configure_host(i, password, &args).expect("configure host");
    }
    start_star(&mut lab);
    for i in 0..hosts {
        lab.wait_established(i, hosts - 1, Duration::from_secs(30)).expect("mesh up");
    }
    for i in 0..hosts {
        let config = host_dir(&lab, i).join("daemon.json");
        let out = lab.weft(i, &["setup-docker", "--config", config.to_str().unwrap_or("")]).expect("weft setup-docker");
        assert!(out.status.success(), "setup-docker: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("restart dockerd"), "{text}");
    }
    let d = Dockerd::start_all(&lab, &(0..hosts).collect::<Vec<_>>()).expect("dockerd on every host");
    Some(DockerLab { d, lab })
}

fn ok(d: &Dockerd, args: &[&str]) -> String {
    d.docker_ok(args).unwrap_or_else(|e| panic!("docker {args:?}: {e:#}"))
}

/// The error of a docker command that must fail.
fn fails(d: &Dockerd, args: &[&str]) -> String {
    let out = d.docker(args).expect("docker runs");
    assert!(!out.status.success(), "docker {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ip_on(d: &Dockerd, container: &str, network: &str) -> String {
    ok(d, &["inspect", "-f", &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"), container])
}

/// Runs `sh -c CMD` in a new container on `network` until it succeeds; its output.
fn run_until(d: &Dockerd, network: &str, cmd: &str, timeout: Duration) -> Option<String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(out) = d.docker(&["run", "--rm", "--network", network, IMG, "sh", "-c", cmd]) {
            if out.status.success() {
                return Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

fn exec_until(d: &Dockerd, container: &str, cmd: &str, timeout: Duration) -> bool {
    wait_for(timeout, || d.docker(&["exec", container, "sh", "-c", cmd]).is_ok_and(|o| o.status.success()))
}

fn create_network(d: &Dockerd, name: &str, subnet: &str) {
    ok(d, &["network", "create", "-d", "weft", "--ipam-driver", "weft", "--subnet", subnet, name]);
}

const WEB: &str = "mkdir -p /www && echo hello-from-weft > /www/index.html && exec httpd -f -p 80 -h /www";

#[test]
fn docker_networks_across_hosts_names_restarts_and_isolation() {
    let Some(t) = docker_lab("docker_networks_across_hosts_names_restarts_and_isolation", 2, Some("docker-test-pw")) else { return };
    let (a, b) = (&t.d[0], &t.d[1]);
    for d in &t.d {
        create_network(d, "app", "10.40.7.0/24");
    }
    ok(a, &["run", "-d", "--name", "web", "--network", "app", IMG, "sh", "-c", WEB]);
    let web_ip = ip_on(a, "web", "app");
    assert!(web_ip.starts_with("10.40.7."), "web's address {web_ip}");
    // From the other host, by name: Docker's resolver asks weft DNS for `web`.
    let page = run_until(b, "app", "timeout 5 wget -qO- http://web/", Duration::from_secs(40));
    if page.is_none() {
        diagnose(&t, "web");
    }
    assert_eq!(page.as_deref(), Some("hello-from-weft"), "host B fetches the page from web on host A by name");
    // Pings by name both ways; a gateway of its own network, no docker_gwbridge.
    ok(b, &["run", "-d", "--name", "client", "--network", "app", "--network-alias", "cl", IMG, "sleep", "600"]);
    assert!(exec_until(b, "client", "ping -c 1 -W 2 web", Duration::from_secs(20)), "client pings web by name");
    assert!(exec_until(a, "web", "ping -c 1 -W 2 client && ping -c 1 -W 2 cl", Duration::from_secs(20)), "web pings client by name and alias");
    let routes = ok(b, &["exec", "client", "ip", "route"]);
    assert!(routes.contains("default via 10.40.7."), "{routes}");
    let nets = ok(b, &["network", "ls", "--format", "{{.Name}}"]);
    assert!(!nets.contains("docker_gwbridge"), "{nets}");
    // The port is guarded and its MAC announced: status on host A shows it.
    let s = status(&t.lab, 0);
    assert!(s["docker"]["endpoints"].as_u64().unwrap_or(0) >= 1, "{}", s["docker"]);
    assert!(s["networks"].as_array().is_some_and(|n| n.iter().any(|n| n["name"] == "app")), "{}", s["networks"]);

    // `docker restart` keeps the address, and the name follows.
    ok(a, &["restart", "-t", "1", "web"]);
    assert_eq!(ip_on(a, "web", "app"), web_ip, "docker restart keeps the address");
    assert_eq!(status(&t.lab, 0)["docker"]["addresses_kept"], 1, "kept for web, not picked again by chance");
    let page = run_until(b, "app", "timeout 5 wget -qO- http://web/", Duration::from_secs(30));
    assert_eq!(page.as_deref(), Some("hello-from-weft"), "web serves again after its restart");

    // `docker rm -f` gives the address and the name back, on every host.
    ok(a, &["rm", "-f", "web"]);
    let gone = wait_for(Duration::from_secs(20), || {
        t.lab.weft(1, &["dns-lookup", "web"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().is_empty())
    });
    assert!(gone, "web's name is gone on host B");
    let allocs = t.lab.weft_json(0, &["status", "ipam"]).expect("status");
    assert!(!allocs.to_string().contains(&format!("\"{web_ip}/24\"")), "web's address is released: {allocs}");
    let s = status(&t.lab, 0);
    assert_eq!(s["docker"]["kept_for_stopped"], 0, "{}", s["docker"]);

    // Two networks: nothing crosses, even through the hosts' gateways.
    for d in &t.d {
        create_network(d, "red", "10.40.8.0/24");
        create_network(d, "blue", "10.40.9.0/24");
    }
    ok(a, &["run", "-d", "--name", "r1", "--network", "red", IMG, "sleep", "600"]);
    ok(b, &["run", "-d", "--name", "r2", "--network", "red", IMG, "sleep", "600"]);
    ok(b, &["run", "-d", "--name", "b1", "--network", "blue", IMG, "sleep", "600"]);
    let r1 = ip_on(a, "r1", "red");
    assert!(exec_until(b, "r2", &format!("ping -c 1 -W 2 {r1}"), Duration::from_secs(20)), "red reaches red across hosts");
    let crossed = b.docker(&["exec", "b1", "ping", "-c", "3", "-W", "1", &r1]).expect("exec");
    assert!(!crossed.status.success(), "blue must not reach red: {}", String::from_utf8_lossy(&crossed.stdout));
    let client_ip = ip_on(b, "client", "app");
    let crossed = b.docker(&["exec", "b1", "ping", "-c", "2", "-W", "1", &client_ip]).expect("exec");
    assert!(!crossed.status.success(), "blue must not reach app on the same host through the gateway");
    let crossed = t.lab.exec(&t.lab.host(1).ns, &["nft", "list", "counter", "inet", "weft_isolate", "crossed"]).expect("nft");
    assert!(!String::from_utf8_lossy(&crossed.stdout).contains("packets 0 "), "the host dropped what blue sent towards the other networks: {}", String::from_utf8_lossy(&crossed.stdout));

    // Errors a person can act on.
    let e = fails(a, &["network", "create", "-d", "weft", "--ipam-driver", "weft", "--subnet", "192.168.50.0/24", "bad1"]);
    assert!(e.contains("outside weft's address range"), "{e}");
    let e = fails(a, &["network", "create", "-d", "weft", "--ipam-driver", "weft", "--subnet", "10.40.7.128/25", "bad2"]);
    assert!(e.contains("overlaps 10.40.7.0/24") && e.contains("app"), "{e}");
    let e = fails(a, &["network", "create", "-d", "weft", "--ipam-driver", "weft", "--subnet", "10.40.20.0/24", "-o", "mtu=9000", "bad3"]);
    assert!(e.contains("unknown option -o mtu"), "{e}");
    let e = fails(a, &["network", "create", "-d", "weft", "--ipam-driver", "weft", "bad4"]);
    assert!(e.contains("weft needs --subnet"), "{e}");
    let e = fails(a, &["network", "create", "-d", "weft", "--subnet", "10.40.21.0/24", "bad5"]);
    assert!(e.contains("--ipam-driver weft"), "{e}");
    let nets = ok(a, &["network", "ls", "--format", "{{.Name}}"]);
    assert!(!nets.contains("bad"), "refused networks are not left behind: {nets}");
    // Nothing was kept for them either: a good network on a refused subnet works afterwards.
    create_network(a, "good", "10.40.20.0/24");
}

#[test]
fn weft_attach_of_a_docker_container_follows_its_restarts() {
    let Some(mut t) = docker_lab("weft_attach_of_a_docker_container_follows_its_restarts", 2, None) else { return };
    let a = &t.d[0];
    ok(a, &["run", "-d", "--name", "web2", IMG, "sleep", "600"]);
    // By name, on Docker's default bridge: an address on weft and the name in weft DNS.
    let v: Value = t.lab.weft_json(0, &["attach", "web2"]).expect("weft attach web2");
    let addr = v["addresses"][0].as_str().unwrap_or_default().split('/').next().unwrap_or_default().to_owned();
    assert!(!addr.is_empty(), "{v}");
    assert_eq!(v["container"], "web2", "{v}");
    assert_eq!(v["name"], "web2.weft.local", "{v}");
    let c1 = t.lab.add_container_auto(1, "c1").expect("container on host 1");
    assert!(ping_until(&t.lab, &c1, &addr, &[], Duration::from_secs(20)), "host 1 reaches web2 on weft");
    assert!(wait_for(Duration::from_secs(10), || {
        t.lab.weft(1, &["dns-lookup", "web2"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == addr)
    }));
    // Stopped and started again: attached again by itself, same address.
    let a = &t.d[0];
    ok(a, &["stop", "-t", "1", "web2"]);
    assert_eq!(status(&t.lab, 0)["docker"]["attached"][0]["running"], false);
    ok(a, &["start", "web2"]);
    let again = wait_for(Duration::from_secs(20), || {
        a.docker(&["exec", "web2", "ip", "-4", "-o", "addr", "show", "ethwe"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("inet {addr}/")))
    });
    assert!(again, "web2 is attached again with {addr} after docker start");
    assert!(ping_until(&t.lab, &c1, &addr, &[], Duration::from_secs(20)), "host 1 reaches web2 again");
    assert_eq!(status(&t.lab, 0)["docker"]["reattached"], 1);
    // A name that is neither a namespace nor a container.
    let out = t.lab.weft(0, &["attach", "nosuchthing"]).expect("weft");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no network namespace and no Docker container is called \"nosuchthing\""), "{}", String::from_utf8_lossy(&out.stderr));
    // Removed: its address and name go.
    ok(a, &["rm", "-f", "web2"]);
    assert!(wait_for(Duration::from_secs(20), || {
        t.lab.weft(1, &["dns-lookup", "web2"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().is_empty())
    }), "web2's name is gone");
    let ipam = t.lab.weft_json(0, &["status", "ipam"]).expect("status");
    assert!(!ipam.to_string().contains(&format!("\"{addr}/")), "web2's address is released: {ipam}");
    assert!(status(&t.lab, 0)["docker"]["attached"].as_array().is_some_and(Vec::is_empty));
    let _ = &mut t;
}

#[test]
fn router_and_dockerd_restarts() {
    let Some(mut t) = docker_lab("router_and_dockerd_restarts", 2, Some("docker-test-pw")) else { return };
    for d in &t.d {
        create_network(d, "app", "10.40.7.0/24");
    }
    ok(&t.d[0], &["run", "-d", "--name", "web", "--restart", "always", "--network", "app", IMG, "sh", "-c", WEB]);
    let web_ip = ip_on(&t.d[0], "web", "app");
    assert_eq!(run_until(&t.d[1], "app", "timeout 5 wget -qO- http://web/", Duration::from_secs(40)).as_deref(), Some("hello-from-weft"));
    ok(&t.d[1], &["run", "-d", "--name", "client", "--network", "app", IMG, "sleep", "600"]);
    let ports = |lab: &Lab| lab.exec(&lab.host(0).ns, &["ip", "-o", "link"]).map(|o| String::from_utf8_lossy(&o.stdout).matches(": vw").count()).unwrap_or(0);
    let before = ports(&t.lab);

    // The router dies: dockerd's calls fail with a clear message, and leave nothing behind.
    t.lab.kill_router(0, libc::SIGKILL).expect("kill -9");
    let t0 = Instant::now();
    let out = t.d[0].docker_timeout(&["run", "--rm", "--network", "app", IMG, "true"], Duration::from_secs(90)).expect("docker run");
    assert!(!out.status.success(), "docker run with the router down must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("weft.sock") && err.contains("connection refused"), "{err}");
    eprintln!("docker run failed after {:?} with the router down: {}", t0.elapsed(), err.trim());
    assert_eq!(ports(&t.lab), before, "the failed run left no port");
    // Running containers keep their addresses; with the router back, traffic flows again.
    t.lab.start_router(0, &[]).expect("router back");
    t.lab.wait_established(0, 1, Duration::from_secs(30)).expect("mesh again");
    assert!(exec_until(&t.d[1], "client", "timeout 5 wget -qO- http://web/", Duration::from_secs(40)), "client reaches web again after the router's restart");
    ok(&t.d[0], &["run", "--rm", "--network", "app", IMG, "true"]);
    assert_eq!(ports(&t.lab), before, "a container that ran and went left no port");

    // dockerd restarts: the network and the container come back, with the address.
    t.d[0].restart().expect("dockerd restart");
    let nets = ok(&t.d[0], &["network", "ls", "--format", "{{.Name}}"]);
    assert!(nets.lines().any(|l| l == "app"), "{nets}");
    assert!(wait_for(Duration::from_secs(30), || t.d[0].docker_ok(&["inspect", "-f", "{{.State.Running}}", "web"]).is_ok_and(|s| s == "true")));
    let now = ip_on(&t.d[0], "web", "app");
    if now != web_ip {
        let log = std::fs::read_to_string(t.lab.dir().join("h0/router.log")).unwrap_or_default();
        eprintln!("router log of host 0 (Docker lines):\n{}", log.lines().filter(|l| l.contains("docker")).collect::<Vec<_>>().join("\n"));
    }
    assert_eq!(now, web_ip, "web keeps its address across a dockerd restart");
    assert!(exec_until(&t.d[1], "client", "timeout 5 wget -qO- http://web/", Duration::from_secs(40)), "client reaches web after dockerd's restart");
}

#[test]
fn a_compose_project_on_two_hosts() {
    if !require_compose("a_compose_project_on_two_hosts") {
        return;
    }
    let Some(t) = docker_lab("a_compose_project_on_two_hosts", 2, Some("docker-test-pw")) else { return };
    let compose = |service: &str, command: &str| {
        format!(
            "version: \"2.4\"\nservices:\n  {service}:\n    image: {IMG}\n    command: [\"sh\", \"-c\", \"{command}\"]\nnetworks:\n  default:\n    driver: weft\n    ipam:\n      driver: weft\n      config:\n        - subnet: 10.40.30.0/24\n"
        )
    };
    for (i, (svc, cmd)) in [("web", WEB), ("client", "exec sleep 600")].iter().enumerate() {
        let dir = host_dir(&t.lab, i).join("project");
        std::fs::create_dir_all(&dir).expect("project dir");
        std::fs::write(dir.join("docker-compose.yml"), compose(svc, cmd)).expect("compose file");
        t.d[i].compose_ok(&dir, &["-p", "demo", "up", "-d"]).expect("docker-compose up");
    }
    let dir = host_dir(&t.lab, 1).join("project");
    let fetched = wait_for(Duration::from_secs(40), || {
        t.d[1].compose(&dir, &["-p", "demo", "exec", "-T", "client", "sh", "-c", "timeout 5 wget -qO- http://web/"]).is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("hello-from-weft"))
    });
    assert!(fetched, "the client service on host B reaches the web service on host A by its name");
    for i in 0..2 {
        let dir = host_dir(&t.lab, i).join("project");
        t.d[i].compose_ok(&dir, &["-p", "demo", "down"]).expect("docker-compose down");
    }
    let s = status(&t.lab, 0);
    assert!(s["docker"]["networks"].as_array().is_some_and(Vec::is_empty), "down removed the network: {}", s["docker"]);
}

/// What a failed name or reach check needs: each router's Docker and DNS state, and a try by
/// address and by name from a container on host B.
fn diagnose(t: &DockerLab, name: &str) {
    for i in 0..t.d.len() {
        let s = status(&t.lab, i);
        eprintln!("host {i} docker: {}\nhost {i} guard: {}\nhost {i} macs: {}\nhost {i} networks: {}", s["docker"], s["guard"], s["macs"], s["networks"]);
        for c in s["connections"].as_array().cloned().unwrap_or_default() {
            eprintln!("host {i} connection: {c}");
        }
        eprintln!("host {i} bridge: {:?}", t.lab.exec(&t.lab.host(i).ns, &["sh", "-c", "ip -d link show type bridge; bridge link; ip addr show type bridge; nft list ruleset | head -50"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()));
        let l = t.lab.weft(i, &["dns-lookup", name]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        eprintln!("host {i} dns-lookup {name}: {l:?}");
        eprintln!("host {i} daemon.json: {:?}", std::fs::read_to_string(host_dir(&t.lab, i).join("daemon.json")));
    }
    let out = t.d[1].docker(&["run", "--rm", "--network", "app", IMG, "sh", "-c", &format!("cat /etc/resolv.conf; ip addr; ip route; nslookup {name}; ping -c 2 -W 1 {name}; ping -c 1 -W 1 10.40.7.1; arp -n; ping -c 1 -W 1 10.40.7.129")]);
    eprintln!("from host B: {:?}", out.map(|o| (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())));
}

/// One raw HTTP/1.1 POST on the plugin socket; the status and body.
fn plugin_call(sock: &std::path::Path, method: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("plugin socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let head = format!("POST /{method} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).expect("write");
    // A server that refuses a body early may close before it is all written.
    let _ = s.write_all(body);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn the_plugin_answers_the_protocol_and_refuses_bad_calls() {
    // No dockerd needed: the calls are made here, as dockerd (or anyone root) would.
    let Some(mut lab) = lab("the_plugin_answers_the_protocol_and_refuses_bad_calls", 1, None, &[]) else { return };
    let args = router_args(&lab, 0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.configure_host(0, None, &args).expect("configure");
    start_star(&mut lab);
    let sock = host_dir(&lab, 0).join("plugins/weft.sock");
    assert!(wait_for(Duration::from_secs(10), || sock.exists()), "plugin socket");
    let mode = std::fs::metadata(&sock).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap_or(0);
    assert_eq!(mode, 0o600, "the plugin socket is root-only");

    let (code, body) = plugin_call(&sock, "Plugin.Activate", b"");
    assert_eq!((code, body.contains("NetworkDriver") && body.contains("IpamDriver")), (200, true), "{body}");
    let (code, body) = plugin_call(&sock, "NetworkDriver.GetCapabilities", b"");
    assert_eq!(code, 200);
    assert!(body.contains("\"Scope\":\"local\""), "{body}");
    let (code, body) = plugin_call(&sock, "IpamDriver.GetCapabilities", b"");
    assert!(code == 200 && body.contains("\"RequiresMACAddress\":false"), "{body}");
    // Unknown methods: 404, as the protocol asks (dockerd then knows it is not implemented).
    let (code, _) = plugin_call(&sock, "NetworkDriver.NoSuchThing", b"{}");
    assert_eq!(code, 404);
    // Bad bodies, bad IDs, requests for things that do not exist: refused, named, and counted.
    let bad: &[(&str, &[u8], &str)] = &[
        ("NetworkDriver.CreateNetwork", b"{not json", "does not parse"),
        ("NetworkDriver.CreateNetwork", b"{\"NetworkID\": 5}", "does not parse"),
        ("NetworkDriver.CreateNetwork", b"{\"NetworkID\": \"../../etc\"}", "is not a Docker ID"),
        ("NetworkDriver.CreateEndpoint", br#"{"NetworkID":"0123456789abcdef","EndpointID":"0123456789abcdef","Interface":{"Address":"10.40.7.9/24"}}"#, "weft does not know Docker network"),
        ("NetworkDriver.Join", br#"{"NetworkID":"0123456789abcdef","EndpointID":"fedcba9876543210"}"#, "weft has no endpoint"),
        ("IpamDriver.RequestPool", br#"{"AddressSpace":"weft","Pool":"10.40.7.0/24","V6":true}"#, "IPv4 only"),
        ("IpamDriver.RequestPool", br#"{"AddressSpace":"weft","Pool":"10.40.7.0/24","SubPool":"10.40.7.0/25"}"#, "--ip-range"),
        ("IpamDriver.RequestPool", br#"{"AddressSpace":"weft","Pool":"10.40.7.0/24","Options":{"x":"y"}}"#, "--ipam-opt x"),
        ("IpamDriver.RequestAddress", br#"{"PoolID":"10.99.0.0/24","Address":""}"#, "no pool"),
    ];
    for (method, body, want) in bad {
        let (code, answer) = plugin_call(&sock, method, body);
        assert_eq!(code, 400, "{method} {}: {answer}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert!(v["Err"].as_str().is_some_and(|e| e.contains(want)) && v["Err"] == v["Error"], "{method}: {answer}");
    }
    // A pool, an address in it, an address claimed twice, and release of what is unknown.
    let (code, body) = plugin_call(&sock, "IpamDriver.RequestPool", br#"{"AddressSpace":"weft","Pool":"10.40.7.0/24"}"#);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(v["PoolID"], "10.40.7.0/24");
    let gw = v["Data"]["com.docker.network.gateway"].as_str().unwrap_or_default().to_owned();
    assert!(gw.starts_with("10.40.7.") && gw.ends_with("/24"), "{body}");
    let (_, body) = plugin_call(&sock, "IpamDriver.RequestAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.77"}"#);
    assert!(body.contains("10.40.7.77/24"), "{body}");
    let (code, body) = plugin_call(&sock, "IpamDriver.RequestAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.77"}"#);
    assert_eq!(code, 400, "an address is never given twice: {body}");
    let (code, _) = plugin_call(&sock, "IpamDriver.ReleaseAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.200"}"#);
    assert_eq!(code, 200, "releasing what was never given is not an error (dockerd cleans up so)");
    let (code, _) = plugin_call(&sock, "NetworkDriver.DeleteEndpoint", br#"{"NetworkID":"0123456789abcdef","EndpointID":"0123456789abcdef"}"#);
    assert_eq!(code, 200);
    // A body far larger than any request: refused by the HTTP layer, the router carries on.
    let huge = vec![b'x'; 3 << 20];
    let (code, _) = plugin_call(&sock, "IpamDriver.RequestPool", &huge);
    assert!(code == 413 || code == 400 || code == 0, "huge body: {code}");
    let (code, _) = plugin_call(&sock, "Plugin.Activate", b"");
    assert_eq!(code, 200, "the router still serves");
    let s = status(&lab, 0);
    assert!(s["docker"]["refused"].as_u64().unwrap_or(0) > bad.len() as u64, "{}", s["docker"]);
    // The address given here survives a router restart: the plugin's book is on disk.
    lab.kill_router(0, libc::SIGKILL).expect("kill");
    lab.start_router(0, &[]).expect("start again");
    assert!(wait_for(Duration::from_secs(10), || plugin_call(&sock, "Plugin.Activate", b"").0 == 200));
    let (code, body) = plugin_call(&sock, "IpamDriver.RequestAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.77"}"#);
    assert_eq!(code, 400, "still held after the restart: {body}");
    let (code, _) = plugin_call(&sock, "IpamDriver.ReleaseAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.77"}"#);
    assert_eq!(code, 200);
    let (code, body) = plugin_call(&sock, "IpamDriver.RequestAddress", br#"{"PoolID":"10.40.7.0/24","Address":"10.40.7.77"}"#);
    assert_eq!(code, 200, "free again once released: {body}");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The benchmark of docs/benchmarks.md ("Docker"): `docker run --rm` on a weft network against
/// Docker's own bridge, on one dockerd, interleaved. Run it alone:
/// `cargo test --release -p weft --test docker -- --ignored --nocapture bench_docker_run`
#[test]
#[ignore = "a benchmark: run it by hand, alone on the machine"]
#[allow(clippy::print_stdout)] // the benchmark prints its table
fn bench_docker_run() {
    let Some(t) = docker_lab("bench_docker_run", 1, Some("docker-bench-pw")) else { return };
    let d = &t.d[0];
    create_network(d, "app", "10.40.7.0/24");
    let runs: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(50);
    let time = |net: &str| {
        let t0 = Instant::now();
        ok(d, &["run", "--rm", "--network", net, IMG, "true"]);
        t0.elapsed().as_secs_f64() * 1000.0
    };
    for _ in 0..3 {
        time("app");
        time("bridge");
    }
    let (mut weft, mut bridge) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Interleaved, and which goes first alternates.
        if i % 2 == 0 {
            weft.push(time("app"));
            bridge.push(time("bridge"));
        } else {
            bridge.push(time("bridge"));
            weft.push(time("app"));
        }
    }
    weft.sort_by(f64::total_cmp);
    bridge.sort_by(f64::total_cmp);
    let (w50, w99, b50, b99) = (percentile(&weft, 0.5), percentile(&weft, 0.99), percentile(&bridge, 0.5), percentile(&bridge, 0.99));
    println!("docker run --rm ... true, {runs} runs each, interleaved (ms):");
    println!("| network | p50 | p99 |\n| --- | --- | --- |");
    println!("| weft (plugin) | {w50:.0} | {w99:.0} |\n| bridge (Docker's) | {b50:.0} | {b99:.0} |");
    println!("ratio weft/bridge: p50 {:.2}x, p99 {:.2}x", w50 / b50, w99 / b99);
    let s = status(&t.lab, 0);
    println!("plugin requests {}, refused {}, addresses now held {}", s["docker"]["requests"], s["docker"]["refused"], s["docker"]["addresses"]);
}
