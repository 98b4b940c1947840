//! `weft-cni`: the CNI plugin that joins containers to the weft network.
//!
//! A container runtime (podman, containerd, CRI-O, the kubelet through them)
//! runs the plugin once per operation, with the operation and the container
//! in `CNI_*` environment variables and the network configuration on stdin
//! (CNI spec 1.1.0, 1.0.0 and 0.3.0–0.4.0). The plugin:
//!
//! - ADD: asks the router (over its local API) for an address keyed by
//!   network, container ID and interface, a gateway on the weft bridge and a DNS
//!   name; creates a veth pair, moves one end into the container's namespace as
//!   `CNI_IFNAME` with the address, MTU and default route, puts the other end on
//!   the bridge with hairpin on; prints the result.
//! - DEL: removes the veth pair if the namespace is still there and releases
//!   the attachment's addresses and names; succeeds when they are already gone.
//! - CHECK: verifies that what ADD set up is still in place.
//! - GC: releases every attachment of the network that the runtime no longer lists.
//! - STATUS: whether the router can serve an ADD now.
//! - VERSION: the spec versions spoken, with no need of any environment.
//!
//! The namespace work happens here, in the runtime's mount namespace where the
//! `CNI_NETNS` path is valid; the router, which may run in a container of its
//! own, only allocates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rscni_types::error::Error;
use rscni_types::ipnet::IpNet;
use rscni_types::types::{CNIResult, CNIResultWithVersion, Cmd, ContainerId, Dns, Interface, IpConfig, NetConf, Route};
use rscni_types::version::{PluginInfo, SpecVersion};
use serde_json::{json, Value};
use weft_router::api::client::{self, CallError};
use weft_proto::switch::Mac;
use weft_router::host::{guard, host_ifname_for, AttachOpts, NetDev, RouteSpec};

/// Where the router's API socket is unless the configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/weft/weft.sock";

/// Plugin-defined error codes (the spec reserves 0–99).
pub mod codes {
    /// No address could be had (the range or subnet is full, or the address is taken).
    pub const NO_ADDRESS: u32 = 100;
    /// Creating or configuring the container's interface failed.
    pub const INTERFACE: u32 = 101;
    /// The router refused or failed a request for another reason.
    pub const ROUTER: u32 = 102;
    /// CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 103;
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Env {
    /// Reads the invocation's environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }
}

/// weft's own settings in the network configuration, besides the spec's fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The router's API socket (`"socket"`).
    pub socket: PathBuf,
    /// MTU of the container's interface (`"mtu"`; default: the router's).
    pub mtu: Option<u32>,
    /// Subnet of the weft range to take addresses from (`"subnet"`; default: the router's default subnet).
    pub subnet: Option<String>,
    /// Hairpin mode on the bridge port (`"hairpinMode"`, default true).
    pub hairpin: bool,
    /// A default route through the host's address on the bridge (`"defaultRoute"`, default true).
    pub default_route: bool,
    /// Register the container's name in weft DNS (`"dnsNames"`, default true).
    pub dns_names: bool,
    /// How long ADD waits for an address (`"timeoutSeconds"`, default 10).
    pub timeout_seconds: f64,
}

/// The parsed stdin: the spec's configuration, weft's settings, and the version to answer in.
#[derive(Debug, Clone)]
pub struct Config {
    pub net: NetConf,
    pub settings: Settings,
    pub version: SpecVersion,
}

/// Parses the network configuration and agrees on the spec version for `cmd`.
pub fn parse_config(stdin: &[u8], cmd: Cmd) -> Result<Config, Error> {
    let net: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| Error::FailedToDecode(format!("the network configuration on stdin is not valid JSON for CNI: {e}")))?;
    let version = PluginInfo::default().negotiate(&net, cmd)?;
    net.validate_name()?;
    let settings = settings(&net.custom)?;
    Ok(Config { net, settings, version })
}

fn settings(custom: &HashMap<String, Value>) -> Result<Settings, Error> {
    let invalid = |key: &str, want: &str| {
        Error::InvalidNetworkConfig(format!("\"{key}\" in the weft network configuration must be {want}"))
    };
    let string = |key: &str| -> Result<Option<String>, Error> {
        match custom.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(invalid(key, "a non-empty string")),
        }
    };
    let flag = |key: &str, default: bool| -> Result<bool, Error> {
        match custom.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(key, "true or false")),
        }
    };
    let mtu = match custom.get("mtu") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            _ => return Err(invalid("mtu", "a number from 68 to 65535")),
        },
    };
    let timeout_seconds = match custom.get("timeoutSeconds") {
        None | Some(Value::Null) => 10.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=600.0).contains(&t) => t,
            _ => return Err(invalid("timeoutSeconds", "a number of seconds from 0 to 600")),
        },
    };
    let subnet = string("subnet")?;
    if let Some(s) = &subnet {
        if s.parse::<IpNet>().is_err() {
            return Err(invalid("subnet", "a CIDR such as 10.32.0.0/16"));
        }
    }
    Ok(Settings {
        socket: string("socket")?.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from),
        mtu,
        subnet,
        hairpin: flag("hairpinMode", true)?,
        default_route: flag("defaultRoute", true)?,
        dns_names: flag("dnsNames", true)?,
        timeout_seconds,
    })
}

/// `K=V;K2=V2` of `CNI_ARGS`, in order. Pairs without `=` are skipped.
pub fn parse_args(args: &str) -> Vec<(String, String)> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// The DNS name to register: the pod's name (`K8S_POD_NAME`, set by the kubelet
/// and by podman, which passes the container's name there), made into one DNS
/// label. `None` when there is none or nothing of it is usable.
pub fn container_name(args: &[(String, String)]) -> Option<String> {
    let raw = args.iter().find(|(k, _)| k == "K8S_POD_NAME").map(|(_, v)| v.as_str())?;
    dns_label(raw)
}

/// Every name to register: the container's (see [`container_name`]) and the
/// aliases the runtime gives for this network (the `aliases` capability:
/// podman's `--network-alias`), each as a DNS label, without repeats.
pub fn dns_names(net: &NetConf, args: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = container_name(args).into_iter().collect();
    let aliases = net.runtime_config.as_ref().and_then(|rc| rc.custom.get("aliases")).and_then(|a| a.get(&net.name));
    for a in aliases.and_then(Value::as_array).into_iter().flatten() {
        if let Some(label) = a.as_str().and_then(dns_label) {
            if !out.contains(&label) {
                out.push(label);
            }
        }
    }
    out
}

/// `raw` as a DNS label: lower case, characters other than letters, digits and
/// `-` turned into `-`, runs of `-` folded, no `-` at either end, at most 63 long.
pub fn dns_label(raw: &str) -> Option<String> {
    let mut out = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(63);
    let out = out.trim_end_matches('-').to_string();
    (!out.is_empty()).then_some(out)
}

/// Runs one invocation. `Ok(Some(json))` is printed on stdout; `Err` becomes
/// the spec's error document, in the version the configuration asked for.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<String>, (SpecVersion, Error)> {
    let current = SpecVersion::CURRENT;
    if env.command.is_empty() {
        return Err((current, Error::InvalidEnvValue("CNI_COMMAND is not set: this is a CNI plugin, run by a container runtime".into())));
    }
    let cmd: Cmd = env.command.parse().map_err(|e| (current, e))?;
    if cmd == Cmd::Version {
        // No environment and no configuration needed: podman calls this with CNI_PATH=dummy.
        return Ok(Some(json!(PluginInfo::default()).to_string()));
    }
    // The version to report errors in: what the configuration asked for, when it can be read.
    let asked = serde_json::from_slice::<NetConf>(stdin)
        .ok()
        .and_then(|n| n.version().ok())
        .filter(|v| PluginInfo::default().validate(*v).is_ok())
        .unwrap_or(current);
    let cfg = parse_config(stdin, cmd).map_err(|e| (asked, e))?;
    let v = cfg.version;
    match cmd {
        Cmd::Add => add(env, &cfg).map(Some),
        Cmd::Del => del(env, &cfg).map(|()| None),
        Cmd::Check => check(env, &cfg).map(|()| None),
        Cmd::Gc => gc(&cfg).map(|()| None),
        Cmd::Status => status(&cfg).map(|()| None),
        Cmd::Version => unreachable!("answered above"),
    }
    .map_err(|e| (v, e))
}

/// The attachment's identity for the router.
fn attachment(env: &Env, cfg: &Config) -> Result<Value, Error> {
    let mut missing = Vec::new();
    if env.container_id.is_empty() {
        missing.push("CNI_CONTAINERID");
    }
    if env.ifname.is_empty() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(Error::missing_env(&missing));
    }
    let id: ContainerId = env.container_id.parse()?;
    if env.ifname.len() > 15 || env.ifname.contains(['/', ':', ' ']) || env.ifname == "." || env.ifname == ".." {
        return Err(Error::InvalidEnvValue(format!(
            "CNI_IFNAME={:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)",
            env.ifname
        )));
    }
    Ok(json!({ "network": cfg.net.name, "container_id": id.to_string(), "ifname": env.ifname }))
}

/// `CNI_NETNS` for commands that need it: set, and a namespace that exists.
fn netns_path(env: &Env) -> Result<PathBuf, Error> {
    if env.netns.is_empty() {
        return Err(Error::missing_env(&["CNI_NETNS"]));
    }
    let p = PathBuf::from(&env.netns);
    match std::fs::metadata(&p) {
        Ok(_) => Ok(p),
        Err(e) => Err(Error::InvalidNetNS(format!(
            "CNI_NETNS={}: no such network namespace ({e}); the container may already be gone",
            env.netns
        ))),
    }
}

/// A request to the router, with its failures turned into CNI errors.
fn call(cfg: &Config, method: &str, path: &str, body: &Value) -> Result<Value, Error> {
    client::call(&cfg.settings.socket, method, path, Some(body)).map_err(|e| match e {
        CallError::NotRunning(m) => Error::TryAgainLater(format!("{m}; the runtime will retry")),
        CallError::Answer { status: 503, message, .. } => Error::TryAgainLater(message),
        CallError::Answer { status: 409, message, .. } => Error::Custom(codes::NO_ADDRESS, "No address available".into(), message),
        CallError::Answer { status: 400, message, .. } => Error::InvalidNetworkConfig(message),
        CallError::Answer { message, .. } => Error::Custom(codes::ROUTER, "The weft router failed the request".into(), message),
        CallError::Io(e) => Error::TryAgainLater(format!("talking to the weft router at {} failed: {e:#}", cfg.settings.socket.display())),
    })
}

/// Runs namespace work on a single-threaded runtime.
fn netlink<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn interface_error(what: &str, e: &anyhow::Error) -> Error {
    Error::Custom(codes::INTERFACE, what.into(), format!("{e:#}"))
}

fn add(env: &Env, cfg: &Config) -> Result<String, Error> {
    let mut req = attachment(env, cfg)?;
    let netns = netns_path(env)?;
    // Refuse a taken interface name before anything is allocated or created.
    let taken = netlink(async { NetDev::new().await?.netns_link_state(&netns, &env.ifname).await })
        .map_err(|e| Error::InvalidNetNS(format!("CNI_NETNS={}: {e:#}", env.netns)))?;
    if taken.is_some() {
        return Err(Error::InvalidEnvValue(format!(
            "CNI_IFNAME={}: the container's namespace {} already has an interface of that name",
            env.ifname, env.netns
        )));
    }
    let s = &cfg.settings;
    req["netns"] = json!(env.netns);
    req["subnet"] = json!(s.subnet);
    req["timeout_seconds"] = json!(s.timeout_seconds);
    req["gateway"] = json!(s.default_route);
    if s.dns_names {
        req["names"] = json!(dns_names(&cfg.net, &parse_args(&env.args)));
    }
    let got = call(cfg, "POST", "/v1/cni/add", &req)?;
    match configure(env, cfg, &netns, &got) {
        Ok(out) => Ok(out),
        Err(e) => {
            // Give back what this ADD took, not what an earlier one holds.
            if got["new"].as_bool() == Some(true) {
                let _ = call(cfg, "POST", "/v1/cni/del", &attachment(env, cfg)?);
            }
            Err(e)
        }
    }
}

/// The container's side of ADD, from the router's answer; returns the result document.
fn configure(env: &Env, cfg: &Config, netns: &Path, got: &Value) -> Result<String, Error> {
    let bad_answer = |what: &str| Error::Custom(codes::ROUTER, "Unexpected answer from the weft router".into(), format!("no {what} in {got}"));
    let address: IpNet = got["address"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| bad_answer("address"))?;
    let gateway: Option<IpAddr> = got["gateway"].as_str().and_then(|g| g.parse().ok());
    let bridge = got["bridge"].as_str().ok_or_else(|| bad_answer("bridge"))?.to_string();
    let mtu = cfg.settings.mtu.or_else(|| got["mtu"].as_u64().map(|m| m as u32)).ok_or_else(|| bad_answer("mtu"))?;
    let routes: Vec<RouteSpec> = match gateway {
        Some(gw) if cfg.settings.default_route => {
            let any = if gw.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
            vec![RouteSpec { dst: any, prefix: 0, gw: Some(gw) }]
        }
        _ => Vec::new(),
    };
    let addrs = [(address.addr(), address.prefix_len())];
    // The MAC the router chose and announced; a router that names none leaves it to chance.
    let mac = got["mac"].as_str().and_then(|m| m.parse::<Mac>().ok()).map(|m| m.0);
    let segment = got["segment"].as_u64().and_then(|s| u32::try_from(s).ok()).unwrap_or(0);
    let opts = AttachOpts { addrs: &addrs, mtu, routes: &routes, hairpin: cfg.settings.hairpin, mac, segment };
    let info = netlink(async { NetDev::new().await?.attach_netns_with(&bridge, netns, &env.ifname, &opts).await })
        .map_err(|e| interface_error("Setting up the container's interface failed", &e))?;

    let with_mtu = cfg.version >= SpecVersion::new(1, 1, 0);
    let result = CNIResult {
        interfaces: vec![
            Interface { name: info.host_ifname.clone(), mac: Mac(info.host_mac).to_string(), mtu: with_mtu.then_some(mtu), sandbox: None, socket_path: None, pci_id: None },
            Interface { name: info.container_ifname.clone(), mac: Mac(info.container_mac).to_string(), mtu: with_mtu.then_some(mtu), sandbox: Some(env.netns.clone()), socket_path: None, pci_id: None },
        ],
        ips: vec![IpConfig { interface: Some(1), address, gateway }],
        routes: routes
            .iter()
            .filter_map(|r| IpNet::new(r.dst, r.prefix).ok().map(|dst| Route { dst, gw: r.gw, mtu: None, advmss: None, priority: None, table: None, scope: None }))
            .collect(),
        dns: dns_of(&got["dns"]),
    };
    let text = if cfg.version.is_legacy() {
        serde_json::to_string(&rscni_types::legacy::CNIResult::new(cfg.version, result))
    } else {
        serde_json::to_string(&CNIResultWithVersion::new(cfg.version, result))
    };
    text.map_err(|e| Error::IOFailure(format!("encoding the result failed: {e}")))
}

fn dns_of(v: &Value) -> Option<Dns> {
    let nameservers: Vec<String> = v["nameservers"].as_array()?.iter().filter_map(|s| s.as_str().map(str::to_string)).collect();
    Some(Dns {
        nameservers,
        domain: v["domain"].as_str().map(str::to_string),
        search: v["search"].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()),
        options: None,
    })
}

fn del(env: &Env, cfg: &Config) -> Result<(), Error> {
    let req = attachment(env, cfg)?;
    // The veth pair goes with the namespace; while the namespace is there, remove it.
    if !env.netns.is_empty() && Path::new(&env.netns).exists() {
        let path = PathBuf::from(&env.netns);
        netlink(async { NetDev::new().await?.detach_netns(&path, &env.ifname).await })
            .map_err(|e| interface_error("Removing the container's interface failed", &e))?;
    } else if !env.netns.is_empty() {
        // The namespace went first and took the veth pair with it; the port's guard stays
        // until it is removed here.
        let port = host_ifname_for(Path::new(&env.netns), &env.ifname);
        netlink(async { guard::remove(&port).await })
            .map_err(|e| interface_error("Removing the container port's guard failed", &e))?;
    }
    call(cfg, "POST", "/v1/cni/del", &req)?;
    Ok(())
}

fn check(env: &Env, cfg: &Config) -> Result<(), Error> {
    let req = attachment(env, cfg)?;
    let netns = netns_path(env)?;
    let prev = cfg.net.prev_result.as_ref().ok_or_else(|| {
        Error::InvalidNetworkConfig("CHECK needs prevResult (the result of ADD) in the configuration".into())
    })?;
    let held = call(cfg, "POST", "/v1/cni/check", &req)?;
    let failed = |what: String| Error::Custom(codes::CHECK_FAILED, "The weft attachment is not as ADD left it".into(), what);
    let router_has: Vec<&str> = held["addresses"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mine: Vec<&IpConfig> = prev.ips.iter().filter(|ip| ip.interface.is_none_or(|i| prev.interfaces.get(i as usize).is_some_and(|f| f.name == env.ifname))).collect();
    for ip in &mine {
        if !router_has.contains(&ip.address.to_string().as_str()) {
            return Err(failed(format!("the weft router no longer holds {} for this container (it holds {router_has:?})", ip.address)));
        }
    }
    let state = netlink(async { NetDev::new().await?.netns_link_state(&netns, &env.ifname).await })
        .map_err(|e| Error::InvalidNetNS(format!("CNI_NETNS={}: {e:#}", env.netns)))?
        .ok_or_else(|| failed(format!("{} has no interface {}", env.netns, env.ifname)))?;
    if !state.up {
        return Err(failed(format!("{} in {} is down", env.ifname, env.netns)));
    }
    for ip in &mine {
        if !state.addrs.contains(&(ip.address.addr(), ip.address.prefix_len())) {
            return Err(failed(format!("{} in {} lacks its address {}", env.ifname, env.netns, ip.address)));
        }
    }
    let mtu = cfg.settings.mtu.or_else(|| held["mtu"].as_u64().map(|m| m as u32));
    if mtu.is_some() && state.mtu != mtu {
        return Err(failed(format!("{} in {} has MTU {:?}, not {:?}", env.ifname, env.netns, state.mtu, mtu)));
    }
    for r in &prev.routes {
        let want = RouteSpec { dst: r.dst.network(), prefix: r.dst.prefix_len(), gw: r.gw };
        if !state.routes.contains(&want) {
            return Err(failed(format!("the route to {}{} is missing in {}", r.dst, r.gw.map(|g| format!(" via {g}")).unwrap_or_default(), env.netns)));
        }
    }
    let bridge = held["bridge"].as_str().unwrap_or("weft").to_string();
    let host = host_ifname_for(&netns, &env.ifname);
    let ports = netlink(async { NetDev::new().await?.bridge_ports(&bridge).await })
        .map_err(|e| failed(format!("listing the ports of bridge {bridge}: {e:#}")))?;
    if !ports.contains(&host) {
        return Err(failed(format!("the host end {host} of {} is not on bridge {bridge}", env.ifname)));
    }
    let guarded = netlink(async { guard::list().await }).map_err(|e| failed(format!("{e:#}")))?;
    if !guarded.ports.iter().any(|p| p.port == host) {
        return Err(failed(format!("the port {host} of {} has no guard (anti-spoofing rules): detach and attach it again", env.ifname)));
    }
    Ok(())
}

fn gc(cfg: &Config) -> Result<(), Error> {
    let valid: Vec<Value> = cfg
        .net
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| json!({ "container_id": a.container_id, "ifname": a.ifname }))
        .collect();
    call(cfg, "POST", "/v1/cni/gc", &json!({ "network": cfg.net.name, "valid": valid }))?;
    Ok(())
}

fn status(cfg: &Config) -> Result<(), Error> {
    let st = client::call(&cfg.settings.socket, "GET", "/v1/cni/status", None).map_err(|e| {
        Error::PluginNotAvailable(format!("{e}"))
    })?;
    if st["ready"].as_bool() == Some(true) {
        Ok(())
    } else {
        let state = st["state"].as_str().unwrap_or("not ready");
        Err(Error::PluginNotAvailable(format!("weft IPAM cannot allocate yet: {state}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> Env {
        Env { command: cmd.into(), container_id: "c1".into(), netns: "/run/netns/nope-weft-test".into(), ifname: "eth0".into(), args: String::new() }
    }

    fn code(r: Result<Option<String>, (SpecVersion, Error)>) -> u32 {
        u32::from(&r.expect_err("expected an error").1)
    }

    #[test]
    fn version_needs_nothing() {
        let out = run(&Env { command: "VERSION".into(), ..Env::default() }, b"").expect("version").expect("output");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["cniVersion"], "1.1.0");
        let versions: Vec<&str> = v["supportedVersions"].as_array().expect("list").iter().filter_map(Value::as_str).collect();
        assert_eq!(versions, ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    }

    #[test]
    fn bad_input_codes() {
        // Malformed JSON: 6. Unknown version: 1. Bad setting: 7. Missing command: 4.
        assert_eq!(code(run(&env("ADD"), b"{not json")), 6);
        assert_eq!(code(run(&env("ADD"), br#"{"cniVersion":"9.9.9","name":"weft","type":"weft-cni"}"#)), 1);
        assert_eq!(code(run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","mtu":"big"}"#)), 7);
        assert_eq!(code(run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"we ft","type":"weft-cni"}"#)), 7);
        assert_eq!(code(run(&env(""), b"{}")), 4);
        assert_eq!(code(run(&env("FROB"), b"{}")), 4);
        // GC and STATUS came with 1.1.0; CHECK with 0.4.0.
        assert_eq!(code(run(&env("GC"), br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"}"#)), 1);
        assert_eq!(code(run(&env("CHECK"), br#"{"cniVersion":"0.3.1","name":"weft","type":"weft-cni"}"#)), 1);
        // Missing CNI_NETNS on ADD: 4, naming the variable; a namespace that does not exist: 8.
        let conf = br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","socket":"/nonexistent/weft.sock"}"#;
        let e = run(&Env { netns: String::new(), ..env("ADD") }, conf).expect_err("no netns");
        assert_eq!(u32::from(&e.1), 4);
        assert!(e.1.details().contains("CNI_NETNS"), "{}", e.1.details());
        assert_eq!(code(run(&env("ADD"), conf)), 8);
        let e = run(&Env { container_id: String::new(), ..env("DEL") }, conf).expect_err("no id");
        assert!(e.1.details().contains("CNI_CONTAINERID"));
        // Errors are reported in the version the configuration asked for.
        assert_eq!(run(&env("ADD"), conf).expect_err("x").0, SpecVersion::new(1, 0, 0));
    }

    #[test]
    fn router_down_is_try_again_later() {
        let conf = br#"{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","socket":"/nonexistent/weft.sock"}"#;
        // DEL without a namespace goes straight to the router.
        let e = run(&Env { netns: String::new(), ..env("DEL") }, conf).expect_err("router down");
        assert_eq!(u32::from(&e.1), 11, "{:?}", e.1);
        assert!(e.1.details().contains("weft launch"), "{}", e.1.details());
        assert_eq!(code(run(&env("GC"), conf)), 11);
        assert_eq!(code(run(&env("STATUS"), conf)), 50);
    }

    #[test]
    fn settings_defaults_and_overrides() {
        let c = parse_config(br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"}"#, Cmd::Add).expect("ok");
        assert_eq!(c.settings.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(c.settings.hairpin && c.settings.default_route && c.settings.dns_names);
        let c = parse_config(
            br#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni","socket":"/x.sock","mtu":1400,"subnet":"10.32.1.0/24","hairpinMode":false,"timeoutSeconds":2}"#,
            Cmd::Add,
        )
        .expect("ok");
        assert_eq!(c.settings.mtu, Some(1400));
        assert_eq!(c.settings.subnet.as_deref(), Some("10.32.1.0/24"));
        assert!(!c.settings.hairpin);
        assert_eq!(c.version, SpecVersion::new(0, 4, 0));
        for bad in [r#""mtu":10"#, r#""subnet":"nope""#, r#""hairpinMode":"yes""#, r#""timeoutSeconds":-1"#, r#""socket":5"#] {
            let text = format!(r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft-cni",{bad}}}"#);
            let e = parse_config(text.as_bytes(), Cmd::Add).expect_err(bad);
            assert_eq!(u32::from(&e), 7, "{bad}");
        }
    }

    #[test]
    fn names_from_args() {
        let args = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=Web_Server.1;K8S_POD_INFRA_CONTAINER_ID=abc");
        assert_eq!(args.len(), 4);
        assert_eq!(container_name(&args).as_deref(), Some("web-server-1"));
        assert_eq!(container_name(&parse_args("IgnoreUnknown=1")), None);
        assert_eq!(dns_label("--__--"), None);
        assert_eq!(dns_label(&"a".repeat(80)).map(|s| s.len()), Some(63));
        assert_eq!(dns_label("x-").as_deref(), Some("x"));
        let conf = parse_config(
            br#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni",
                "runtimeConfig":{"aliases":{"weft":["web","WWW","web"],"other":["no"]}}}"#,
            Cmd::Add,
        )
        .expect("ok");
        assert_eq!(dns_names(&conf.net, &parse_args("K8S_POD_NAME=c1")), ["c1", "web", "www"]);
    }
}
