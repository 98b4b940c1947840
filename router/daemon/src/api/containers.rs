//! Containers and the host on the overlay: `/v1/attach`, `/v1/detach`, `/v1/expose`, `/v1/hide`.
//!
//! An attach takes addresses from IPAM (through the control path), joins the namespace to the
//! bridge (host), gives the host an address on the bridge for DNS when it has none, registers
//! the name, and writes resolv.conf for a named namespace. What fails half-way gives back what
//! this attach took.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};
use weft_ipam::{Allocation, Cidr, Want};

use super::error::{bad, internal, ApiError, ApiResult};
pub use super::request::{AttachReq, DetachReq};
use super::request::{blocking, wait_time};
use super::state::Shared;
use crate::host::netns::{is_netns_name, netns_path, netns_ref};
use crate::control::networks;
use super::state::Engine;
use crate::host::AttachOpts;
use crate::host::resolv::{remove_resolv_conf, write_resolv_conf};
use crate::services::ipam::{want, EXPOSE_ID};
use weft_proto::switch::Mac;

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/v1/attach", post(attach))
        .route("/v1/detach", post(detach))
        .route("/v1/expose", post(expose))
        .route("/v1/hide", post(hide))
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), ApiError> {
    let (ip, prefix) = s.split_once('/').ok_or_else(|| bad(format!("{s:?} is not IP/PREFIX (e.g. 10.32.0.5/12)")))?;
    let ip: IpAddr = ip.parse().map_err(|_| bad(format!("{ip:?} is not an IP address")))?;
    let prefix: u8 = prefix.parse().map_err(|_| bad(format!("{prefix:?} is not a prefix length")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad(format!("prefix /{prefix} is too long for {ip}")));
    }
    Ok((ip, prefix))
}


/// What the user asked for, one address each.
enum AddrSpec {
    /// Used as given (outside the IPAM range).
    Fixed(IpAddr, u8),
    /// Asked of IPAM.
    Ipam(Want),
}

fn addr_specs(sh: &Shared, cidrs: &[String], segment: u32) -> Result<Vec<AddrSpec>, ApiError> {
    if cidrs.is_empty() {
        let subnet = if segment == 0 { sh.ipam_default_subnet } else { networks::subnet(sh.ipam_range, segment) };
        return Ok(vec![AddrSpec::Ipam(Want::Any(subnet))]);
    }
    let want = |subnet: Option<&str>, addr: Option<&str>| {
        want(sh.ipam_range, sh.ipam_default_subnet, subnet, addr).map(AddrSpec::Ipam).map_err(bad)
    };
    cidrs
        .iter()
        .map(|c| {
            if let Some(net) = c.strip_prefix("net:") {
                return want(if net == "default" { None } else { Some(net) }, None);
            }
            let (ip, prefix) = parse_cidr(c)?;
            match ip {
                IpAddr::V4(v4) if sh.ipam_range.contains(u32::from(v4)) => want(None, Some(c)),
                _ => Ok(AddrSpec::Fixed(ip, prefix)),
            }
        })
        .collect()
}

async fn attach(State(sh): State<Shared>, Json(req): Json<AttachReq>) -> ApiResult {
    if let Some(engine) = engine_target(&sh, &req.netns) {
        return engine.attach(&sh, req).await.map(Json);
    }
    attach_netns(&sh, req).await.map(Json)
}

/// The container engine, when `target` names no namespace and one is plugged in.
fn engine_target(sh: &Shared, target: &str) -> Option<Arc<dyn Engine>> {
    if !is_netns_name(target) || netns_path(target).exists() {
        return None;
    }
    // Without one, the namespace's own error says what is missing.
    sh.engine.get().cloned()
}

/// Attaches a namespace (see the module docs).
pub async fn attach_netns(sh: &Shared, req: AttachReq) -> Result<Value, ApiError> {
    let sh = sh.clone();
    let network = req.network.clone().unwrap_or_else(|| networks::DEFAULT.to_owned());
    networks::check_name(&network).map_err(|e| bad(format!("{e:#}")))?;
    let specs = addr_specs(&sh, &req.cidrs, networks::segment_of(&network))?;
    if let Some(n) = &req.name {
        weft_dns::relative_name(n, &sh.dns.domain).map_err(bad)?;
    }
    let path = netns_path(&req.netns);
    let p = path.clone();
    let ns = blocking(move || netns_ref(&p)).await?.map_err(bad)?;
    let id = req.id.clone().unwrap_or_else(|| format!("netns:{}", ns.inode));
    let timeout = wait_time(req.timeout_seconds)?;
    // What the container held before: a failed attach gives back only what it added.
    let held: Vec<u32> = sh.control.lookup(id.clone()).await?.iter().map(|a| a.addr).collect();
    let mut addrs = Vec::new();
    let mut allocated = Vec::new();
    let mut any_ipam = false;
    for spec in specs {
        match spec {
            AddrSpec::Fixed(ip, p) => addrs.push((ip, p)),
            AddrSpec::Ipam(want) => match sh.control.allocate(id.clone(), want, (!req.outlives_netns).then(|| ns.clone()), timeout).await {
                Ok(a) => {
                    any_ipam = true;
                    addrs.push((IpAddr::V4(a.addr.into()), a.subnet.prefix));
                    if !held.contains(&a.addr) {
                        allocated.push(a);
                    }
                }
                Err(e) => {
                    undo_allocations(&sh, &allocated).await;
                    return Err(e.into());
                }
            },
        }
    }
    let mtu = req.mtu.unwrap_or(sh.mtu);
    let (segment, bridge) = match sh.networks.ensure(&network).await {
        Ok(n) => n,
        Err(e) => {
            undo_allocations(&sh, &allocated).await;
            return Err(bad(format!("{e:#}")));
        }
    };
    let opts = AttachOpts { addrs: &addrs, mtu, routes: &[], hairpin: false, mac: Some(match req.mac {
        Some(m) => sh.guard.promise_mac(segment, m),
        None => sh.guard.promise(segment),
    }), segment };
    let info = match sh.netdev.attach_netns_with(&bridge, &path, &req.ifname, &opts).await {
        Ok(i) => i,
        Err(e) => {
            undo_allocations(&sh, &allocated).await;
            sh.networks.release_if_empty(segment).await;
            return Err(bad(format!("{e:#}")));
        }
    };
    let shown: Vec<String> = addrs.iter().map(|(ip, p)| format!("{ip}/{p}")).collect();
    info!(netns = %path.display(), ifname = %req.ifname, host_if = %info.host_ifname, addrs = ?shown, container = %id, %network, "attached");
    // DNS: the host needs an address on the bridge for containers to reach
    // the server; the first container addressed by IPAM gives it one. (Not on a named
    // network: the host stays off those.)
    if sh.dns.enabled && sh.dns.listen.is_none() && any_ipam && segment == 0 {
        if let Err(e) = host_address_in(&sh, sh.ipam_default_subnet).await {
            warn!(error = %format!("{e:#}"), "could not give the host an address for DNS");
        }
    }
    let mut fqdn = Value::Null;
    if let Some(name) = &req.name {
        let ips: Vec<IpAddr> = addrs.iter().map(|(ip, _)| *ip).collect();
        match sh.control.dns_add(id.clone(), name.clone(), ips).await {
            Ok(f) => fqdn = json!(f),
            Err(e) => warn!(name = %name, error = %e, "could not register the DNS name"),
        }
    }
    let mut resolver = Value::Null;
    if is_netns_name(&req.netns) && sh.dns.enabled {
        if let Some(server) = sh.dns_server.wait_nameserver().await {
            let (netns, domain) = (req.netns.clone(), sh.dns.domain.clone());
            match blocking(move || write_resolv_conf(&netns, server, &domain)).await? {
                Ok(true) => resolver = json!(server.to_string()),
                Ok(false) => {}
                Err(e) => warn!(netns = %req.netns, error = %format!("{e:#}"), "could not write resolv.conf"),
            }
        }
    }
    Ok(json!({
        "netns": path.display().to_string(), "ifname": info.container_ifname, "host_ifname": info.host_ifname,
        "mac": Mac(info.container_mac).to_string(), "addresses": shown, "mtu": mtu, "id": id,
        "name": fqdn, "nameserver": resolver, "network": network,
    }))
}

/// An IPv4 address of the host on the bridge inside `subnet`: one it has, or a new one from
/// IPAM (kept under the `weft:expose` ID, as `weft expose` does). The DNS server is told at once.
pub async fn host_address_in(sh: &Shared, subnet: Cidr) -> anyhow::Result<Ipv4Addr> {
    let _one_at_a_time = sh.host_addr_lock.lock().await;
    let have = sh.netdev.addresses(&sh.bridge).await?;
    if let Some(ip) = have.iter().find_map(|(ip, _)| match ip {
        IpAddr::V4(v4) if subnet.contains(u32::from(*v4)) => Some(*v4),
        _ => None,
    }) {
        return Ok(ip);
    }
    let want = Want::Any(subnet);
    let a = sh
        .control
        .allocate(EXPOSE_ID.into(), want, None, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    sh.netdev.add_address(&sh.bridge, IpAddr::V4(a.addr.into()), a.subnet.prefix).await?;
    sh.dns_server.recheck();
    info!(address = %a.cidr(), bridge = %sh.bridge, "gave the host an address on the bridge");
    Ok(a.addr.into())
}

/// Releases what an attach that failed half-way had newly allocated.
pub async fn undo_allocations(sh: &Shared, allocated: &[Allocation]) {
    for a in allocated {
        if let Err(e) = sh.control.release(a.id.clone(), Some(a.addr)).await {
            warn!(container = %a.id, address = %a.cidr(), error = %e, "could not give back an address after a failed attach");
        }
    }
}


async fn detach(State(sh): State<Shared>, Json(req): Json<DetachReq>) -> ApiResult {
    if let Some(engine) = engine_target(&sh, &req.netns) {
        return engine.detach(&sh, req).await.map(Json);
    }
    detach_netns(&sh, req).await.map(Json)
}

/// Detaches a namespace.
pub async fn detach_netns(sh: &Shared, req: DetachReq) -> Result<Value, ApiError> {
    let path: PathBuf = netns_path(&req.netns);
    let p = path.clone();
    let inode = blocking(move || netns_ref(&p).ok().map(|n| n.inode)).await?;
    // The port's network, read before the port goes.
    let port = crate::host::host_ifname_for(&path, &req.ifname);
    let mut segment = None;
    for n in sh.networks.list().await {
        if sh.netdev.bridge_ports(&n.bridge).await.is_ok_and(|p| p.contains(&port)) {
            segment = Some(n.segment);
        }
    }
    let removed = sh.netdev.detach_netns(&path, &req.ifname).await.map_err(|e| bad(format!("{e:#}")))?;
    sh.guard.changed();
    if let Some(s) = segment {
        sh.networks.release_if_empty(s).await;
    }
    if !removed {
        return Err(bad(format!("{} has no weft interface {} to detach", path.display(), req.ifname)));
    }
    let released = match inode {
        Some(i) => sh.control.release_netns(i).await?,
        None => Vec::new(),
    };
    // Names go with the container: under the IDs its addresses had, and the default ID.
    let mut ids: Vec<String> = released.iter().map(|a| a.id.clone()).collect();
    ids.extend(req.id.clone());
    ids.extend(inode.map(|i| format!("netns:{i}")));
    ids.sort();
    ids.dedup();
    for id in ids {
        sh.control.dns_remove(id, None, Vec::new()).await?;
    }
    if is_netns_name(&req.netns) {
        let netns = req.netns.clone();
        blocking(move || remove_resolv_conf(&netns)).await?;
    }
    let released: Vec<String> = released.iter().map(Allocation::cidr).collect();
    info!(netns = %path.display(), ifname = %req.ifname, released = ?released, "detached");
    Ok(json!({ "detached": path.display().to_string(), "released": released }))
}

#[derive(Deserialize)]
struct CidrReq {
    /// `IP/PREFIX`, `net:CIDR`, `net:default`, or none for an address from
    /// the default subnet.
    cidr: Option<String>,
    timeout_seconds: Option<f64>,
}

async fn expose(State(sh): State<Shared>, Json(req): Json<CidrReq>) -> ApiResult {
    let specs = addr_specs(&sh, req.cidr.as_slice(), 0)?;
    let timeout = wait_time(req.timeout_seconds)?;
    let mut new = None;
    let (ip, prefix) = match specs.into_iter().next() {
        Some(AddrSpec::Fixed(ip, p)) => (ip, p),
        Some(AddrSpec::Ipam(want)) => {
            let a = sh.control.allocate(EXPOSE_ID.into(), want, None, timeout).await?;
            new = Some(a.clone());
            (IpAddr::V4(a.addr.into()), a.subnet.prefix)
        }
        None => return Err(bad("nothing to expose")),
    };
    if let Err(e) = sh.netdev.add_address(&sh.bridge, ip, prefix).await {
        if let Some(a) = new {
            undo_allocations(&sh, &[a]).await;
        }
        return Err(internal(e));
    }
    sh.dns_server.recheck();
    let cidr = format!("{ip}/{prefix}");
    info!(%cidr, bridge = %sh.bridge, "exposed");
    Ok(Json(json!({ "exposed": cidr, "bridge": sh.bridge })))
}

async fn hide(State(sh): State<Shared>, Json(req): Json<CidrReq>) -> ApiResult {
    // Without an address: every address IPAM gave the host.
    let targets: Vec<(IpAddr, u8)> = match &req.cidr {
        Some(c) => vec![parse_cidr(c)?],
        None => sh.control.lookup(EXPOSE_ID.into()).await?.iter().map(|a| (IpAddr::V4(a.addr.into()), a.subnet.prefix)).collect(),
    };
    if targets.is_empty() {
        return Err(bad(format!("no address is exposed on {}", sh.bridge)));
    }
    let mut hidden = Vec::new();
    for (ip, prefix) in targets {
        let had = sh.netdev.del_address(&sh.bridge, ip, prefix).await.map_err(internal)?;
        if let IpAddr::V4(v4) = ip {
            sh.control.release(EXPOSE_ID.into(), Some(u32::from(v4))).await?;
        }
        if !had && req.cidr.is_some() {
            return Err(bad(format!("{ip}/{prefix} is not exposed on {}", sh.bridge)));
        }
        hidden.push(format!("{ip}/{prefix}"));
    }
    Ok(Json(json!({ "hidden": hidden })))
}
