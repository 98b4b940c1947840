//! weft-cni driven by the reference runtime library: a small cnitool
//! (tests/cnitool) built from Debian's libcni sources runs ADD, CHECK and DEL
//! of the network configuration that `weft setup-cni` writes, against routers
//! in lab namespaces. Debian's libcni is 1.1.x, which has no GC or STATUS;
//! those are covered by tests/spec.rs. Needs root, Go and Debian's libcni
//! sources (golang-go, golang-github-appc-cni-dev); skips with a message otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{allocations, lab, plugin_bin, wait_for};
use serde_json::Value;
use weft_lab::Lab;

const LIBCNI: &str = "/usr/share/gocode/src/github.com/containernetworking/cni/libcni";

/// Builds tests/cnitool into `dir`; `None` (with a message) when Go or libcni is missing.
fn build_cnitool(dir: &Path) -> Option<PathBuf> {
    let go = Command::new("go").arg("version").output();
    if go.map(|o| !o.status.success()).unwrap_or(true) || !Path::new(LIBCNI).is_dir() {
        eprintln!("skipping: Go or Debian's libcni sources missing (apt-get install golang-go golang-github-appc-cni-dev)");
        return None;
    }
    let out = dir.join("cnitool");
    let o = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cnitool"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("gocache"))
        .output()
        .expect("running go build");
    assert!(o.status.success(), "building cnitool failed: {}", String::from_utf8_lossy(&o.stderr));
    Some(out)
}

/// A host's CNI setup: what `weft setup-cni` installed, and libcni's cache.
struct Host {
    ns: String,
    bin: PathBuf,
    conf: PathBuf,
    cache: PathBuf,
}

fn setup_host(lab: &Lab, i: usize) -> Host {
    let d = lab.dir().join(format!("libcni-h{i}"));
    let (bin, conf) = (d.join("bin"), d.join("net.d"));
    let weft = weft_lab::find_weft_bin().expect("weft binary");
    let o = Command::new(weft)
        .arg("setup-cni")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--socket")
        .arg(&lab.host(i).api_socket)
        .arg("--plugin")
        .arg(plugin_bin())
        .output()
        .expect("weft setup-cni");
    assert!(o.status.success(), "weft setup-cni: {}", String::from_utf8_lossy(&o.stderr));
    Host { ns: lab.host(i).ns.clone(), bin, conf, cache: d.join("cache") }
}

/// `cnitool CMD weft NETNS` on `host`, as a runtime on that host would run it.
fn cnitool(tool: &Path, host: &Host, cmd: &str, netns: &str, args: &str) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host.ns))
        .arg(tool)
        .args([cmd, "weft", netns])
        .env("CNI_PATH", &host.bin)
        .env("NETCONFPATH", &host.conf)
        .env("CNI_CACHEDIR", &host.cache)
        .env("CNI_ARGS", args)
        .env("CAP_ARGS", r#"{"aliases":{"weft":["alias-x"]}}"#)
        .output()
        .expect("running cnitool")
}

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn libcni_add_check_del_across_two_hosts() {
    let Some(mut lab) = lab("libcni_add_check_del_across_two_hosts", 2, &[]) else { return };
    let Some(tool) = build_cnitool(lab.dir()) else { return };
    let (h0, h1) = (setup_host(&lab, 0), setup_host(&lab, 1));
    let ns_a = lab.add_namespace("la").expect("ns");
    let ns_b = lab.add_namespace("lb").expect("ns");
    let (pa, pb) = (format!("/run/netns/{ns_a}"), format!("/run/netns/{ns_b}"));

    let ra: Value = serde_json::from_str(&ok(&cnitool(&tool, &h0, "add", &pa, "K8S_POD_NAME=lib-a"), "ADD a")).expect("result");
    let rb: Value = serde_json::from_str(&ok(&cnitool(&tool, &h1, "add", &pb, "K8S_POD_NAME=lib-b"), "ADD b")).expect("result");
    assert_eq!(ra["cniVersion"], "1.0.0", "{ra}");
    let ip = |r: &Value| r["ips"][0]["address"].as_str().and_then(|a| a.split('/').next()).expect("address").to_string();
    let (ipa, ipb) = (ip(&ra), ip(&rb));
    let ping = lab.exec(&ns_a, &["ping", "-c", "3", "-i", "0.2", "-W", "2", &ipb]).expect("ping");
    assert!(ping.status.success(), "{ipa} could not reach {ipb}: {}", String::from_utf8_lossy(&ping.stdout));

    // The name from CNI_ARGS and the alias from the runtime's capability arguments.
    let server = ra["dns"]["nameservers"][0].as_str().expect("nameserver").to_string();
    for name in ["lib-b.weft.local", "alias-x.weft.local"] {
        let resolved = wait_for(Duration::from_secs(10), || {
            let o = lab.exec(&ns_a, &["dig", "+short", &format!("@{server}"), name]).expect("dig");
            String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == ipb)
        });
        assert!(resolved, "{name} did not resolve to {ipb}");
    }

    // CHECK through libcni (it hands the plugin the cached result), then DEL twice.
    ok(&cnitool(&tool, &h0, "check", &pa, ""), "CHECK a");
    ok(&cnitool(&tool, &h0, "del", &pa, ""), "DEL a");
    ok(&cnitool(&tool, &h0, "del", &pa, ""), "second DEL a");
    assert!(!allocations(&lab, 0).iter().any(|(id, _)| id.starts_with("cni:weft:")), "{:?}", allocations(&lab, 0));
    let check = cnitool(&tool, &h0, "check", &pa, "");
    assert!(!check.status.success(), "CHECK after DEL passed");
    // ADD again after DEL works.
    ok(&cnitool(&tool, &h0, "add", &pa, "K8S_POD_NAME=lib-a"), "ADD a again");

    // The router stopped: libcni reports the plugin's "try again later".
    lab.kill_router(1, libc::SIGTERM).expect("stop router 1");
    let ns_c = lab.add_namespace("lc").expect("ns");
    let o = cnitool(&tool, &h1, "add", &format!("/run/netns/{ns_c}"), "");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("code=11"), "{err}");
    let o = lab.exec(&ns_c, &["ip", "-o", "link"]).expect("links");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("eth0"), "an interface was left behind");
    ok(&cnitool(&tool, &h0, "del", &pa, ""), "DEL a");
}
