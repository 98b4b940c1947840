//! A CNI runtime for tests, following the spec's calling convention (CNI
//! 1.1.0, "Execution of Network Configurations"): for a network configuration
//! list it runs each plugin with the `CNI_*` environment and, on stdin, the
//! plugin's configuration with the list's `name` and `cniVersion` inserted,
//! `prevResult` chained from the plugin before (ADD) or the cached ADD result
//! (CHECK, DEL, which also goes in reverse order), and
//! `cni.dev/valid-attachments` for GC. Plugins run inside a lab host's network
//! namespace (`nsenter --net=`), as a runtime on that host would run them.
//!
//! Also: labs with `weft` routers for these tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use weft_lab::{Lab, LabConfig};

/// How a plugin call ended: its stdout as JSON on success, or the spec's error.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok(Value),
    Err { code: u64, msg: String, details: String, exit: i32 },
}

impl Outcome {
    pub fn code(&self) -> u64 {
        match self {
            Outcome::Ok(_) => 0,
            Outcome::Err { code, .. } => *code,
        }
    }

    pub fn ok(self) -> Value {
        match self {
            Outcome::Ok(v) => v,
            Outcome::Err { code, msg, details, exit } => panic!("plugin failed (exit {exit}): code {code}: {msg}: {details}"),
        }
    }

    pub fn details(&self) -> String {
        match self {
            Outcome::Ok(v) => v.to_string(),
            Outcome::Err { msg, details, .. } => format!("{msg}: {details}"),
        }
    }
}

/// One attachment's runtime parameters.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Attachment {
    pub fn new(container_id: &str, netns: &str) -> Attachment {
        Attachment { container_id: container_id.into(), netns: netns.into(), ifname: "eth0".into(), args: String::new() }
    }
}

/// A runtime driving one network configuration list on one host.
pub struct Runtime {
    pub conflist: Value,
    pub plugin_dirs: Vec<PathBuf>,
    /// Network namespace (under /run/netns) the plugins run in.
    pub host_ns: String,
    /// ADD results by (container ID, interface), as libcni caches them.
    cache: HashMap<(String, String), Value>,
}

impl Runtime {
    pub fn new(conflist: Value, plugin_dirs: Vec<PathBuf>, host_ns: &str) -> Runtime {
        Runtime { conflist, plugin_dirs, host_ns: host_ns.into(), cache: HashMap::new() }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// The configuration a plugin gets: its own, with the list's name and version.
    fn conf_for(&self, plugin: &Value) -> Value {
        let mut c = plugin.clone();
        c["name"] = self.conflist["name"].clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        c
    }

    fn find(&self, ty: &str) -> PathBuf {
        self.plugin_dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {ty:?} not found in {:?}", self.plugin_dirs))
    }

    /// Runs plugin `ty` with `cmd`, the attachment's environment and `stdin`.
    pub fn exec(&self, ty: &str, cmd: &str, a: Option<&Attachment>, stdin: &[u8]) -> Outcome {
        self.exec_env(ty, cmd, a, stdin, &[])
    }

    /// [`Runtime::exec`] with environment variables set or, when the value is `None`, removed.
    pub fn exec_env(&self, ty: &str, cmd: &str, a: Option<&Attachment>, stdin: &[u8], env: &[(&str, Option<&str>)]) -> Outcome {
        let path = self.find(ty);
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.host_ns)).arg(&path);
        let dirs: Vec<String> = self.plugin_dirs.iter().map(|d| d.display().to_string()).collect();
        c.env("CNI_COMMAND", cmd).env("CNI_PATH", dirs.join(":"));
        if let Some(a) = a {
            c.env("CNI_CONTAINERID", &a.container_id).env("CNI_NETNS", &a.netns).env("CNI_IFNAME", &a.ifname);
            c.env("CNI_ARGS", &a.args);
        }
        for (k, v) in env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
        child.stdin.take().expect("stdin").write_all(stdin).expect("writing stdin");
        let out = child.wait_with_output().expect("plugin output");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            let v = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|e| panic!("{ty} {cmd}: stdout is not JSON ({e}): {text}")) };
            return Outcome::Ok(v);
        }
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{ty} {cmd} failed ({}) without the spec's error JSON ({e}): stdout {text:?} stderr {}", out.status, String::from_utf8_lossy(&out.stderr))
        });
        Outcome::Err {
            code: v["code"].as_u64().unwrap_or_else(|| panic!("error without a code: {v}")),
            msg: v["msg"].as_str().unwrap_or_default().into(),
            details: v["details"].as_str().unwrap_or_default().into(),
            exit: out.status.code().unwrap_or(-1),
        }
    }

    /// ADD through the whole list; the last result is cached and returned.
    pub fn add(&mut self, a: &Attachment) -> Outcome {
        let mut prev: Option<Value> = None;
        for p in self.plugins() {
            let mut conf = self.conf_for(&p);
            if let Some(r) = &prev {
                conf["prevResult"] = r.clone();
            }
            match self.exec(p["type"].as_str().expect("type"), "ADD", Some(a), conf.to_string().as_bytes()) {
                Outcome::Ok(r) => prev = Some(r),
                e => return e,
            }
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache.insert((a.container_id.clone(), a.ifname.clone()), result.clone());
        Outcome::Ok(result)
    }

    /// CHECK through the list, each plugin with the cached ADD result.
    pub fn check(&self, a: &Attachment) -> Outcome {
        let prev = self.cache.get(&(a.container_id.clone(), a.ifname.clone())).cloned().expect("CHECK needs an earlier ADD");
        for p in self.plugins() {
            let mut conf = self.conf_for(&p);
            conf["prevResult"] = prev.clone();
            if let e @ Outcome::Err { .. } = self.exec(p["type"].as_str().expect("type"), "CHECK", Some(a), conf.to_string().as_bytes()) {
                return e;
            }
        }
        Outcome::Ok(Value::Null)
    }

    /// DEL through the list in reverse, with the cached result when there is one.
    pub fn del(&mut self, a: &Attachment) -> Outcome {
        let key = (a.container_id.clone(), a.ifname.clone());
        let prev = self.cache.get(&key).cloned();
        for p in self.plugins().iter().rev() {
            let mut conf = self.conf_for(p);
            if let Some(r) = &prev {
                conf["prevResult"] = r.clone();
            }
            if let e @ Outcome::Err { .. } = self.exec(p["type"].as_str().expect("type"), "DEL", Some(a), conf.to_string().as_bytes()) {
                return e;
            }
        }
        self.cache.remove(&key);
        Outcome::Ok(Value::Null)
    }

    /// GC: every plugin learns which attachments are still valid.
    pub fn gc(&self, valid: &[&Attachment]) -> Outcome {
        let list: Vec<Value> = valid.iter().map(|a| json!({ "containerID": a.container_id, "ifname": a.ifname })).collect();
        for p in self.plugins() {
            let mut conf = self.conf_for(&p);
            conf["cni.dev/valid-attachments"] = json!(list);
            if let e @ Outcome::Err { .. } = self.exec(p["type"].as_str().expect("type"), "GC", None, conf.to_string().as_bytes()) {
                return e;
            }
        }
        Outcome::Ok(Value::Null)
    }

    /// STATUS of every plugin.
    pub fn status(&self) -> Outcome {
        for p in self.plugins() {
            let conf = self.conf_for(&p);
            if let e @ Outcome::Err { .. } = self.exec(p["type"].as_str().expect("type"), "STATUS", None, conf.to_string().as_bytes()) {
                return e;
            }
        }
        Outcome::Ok(Value::Null)
    }
}

/// The plugin under test.
pub fn plugin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weft-cni"))
}

/// A directory holding only the weft-cni plugin (a copy), under `dir`.
pub fn plugin_dir(dir: &Path) -> PathBuf {
    let d = dir.join("cni-bin");
    std::fs::create_dir_all(&d).expect("plugin dir");
    std::fs::copy(plugin_bin(), d.join("weft-cni")).expect("copying weft-cni");
    d
}

/// weft's network configuration list for a host's router.
pub fn weft_conflist(version: &str, socket: &Path, extra: Value) -> Value {
    let mut p = json!({ "type": "weft-cni", "socket": socket.display().to_string(), "timeoutSeconds": 5 });
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    json!({ "cniVersion": version, "name": "weft", "plugins": [p] })
}

/// A lab with `hosts` hosts and routers in a star (all peers of host 0), or `None` when not root.
pub fn lab(test: &str, hosts: usize, router_args: &[&str]) -> Option<Lab> {
    if !weft_lab::require_root(test) {
        return None;
    }
    let _ = weft_lab::cleanup_stale();
    let bin = weft_lab::find_weft_bin().expect("the weft binary (cargo build -p weft)");
    let mut cfg = LabConfig::new(hosts, bin);
    cfg.password = Some("cni-test".into());
    cfg.router_args = router_args.iter().map(|s| s.to_string()).collect();
    let mut lab = Lab::new(cfg).expect("building the lab");
    for i in 0..hosts {
        let peers: Vec<usize> = if i == 0 { vec![] } else { vec![0] };
        lab.start_router(i, &peers).expect("starting router");
    }
    for i in 0..hosts {
        lab.wait_established(i, hosts - 1, Duration::from_secs(30)).expect("mesh");
    }
    Some(lab)
}

#[allow(unused_imports)] // not every test file polls
pub use weft_lab::wait_for;

/// The IPAM allocations of host `i` (id → address).
pub fn allocations(lab: &Lab, i: usize) -> Vec<(String, String)> {
    let v = lab.weft_json(i, &["ps"]).expect("weft ps");
    let list = if v.is_array() { v.clone() } else { v["allocations"].clone() };
    list.as_array()
        .map(|a| a.iter().map(|x| (x["id"].as_str().unwrap_or("").to_string(), x["address"].as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

/// Names of the links in namespace `ns`.
pub fn links(lab: &Lab, ns: &str) -> Vec<String> {
    let o = lab.exec(ns, &["ip", "-o", "link", "show"]).expect("ip link");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}
