//! The router's side of the CNI plugin (`weft-cni`): `/v1/cni`, `/v1/cni/{add,del,check,gc,status}`.
//!
//! The plugin does the namespace work (veth, addresses, routes) itself, in the runtime's mount
//! namespace where the container's netns path is valid, and asks the router here for what only
//! the router knows: addresses, the gateway, DNS names, clean-up (see `crate::services::cni`).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};
use weft_ipam::Allocation;
use weft_proto::Mac;
use weft_ipam::Want;

use crate::control::networks;

use super::containers::{host_address_in, undo_allocations};
use super::error::{bad, ApiError, ApiResult};
use super::request::wait_time;
use super::state::Shared;
use crate::services::cni::{attachment_id, is_valid_name, parse_attachment_id, ID_PREFIX};
use crate::services::ipam::want;

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/v1/cni", get(list))
        .route("/v1/cni/add", post(add))
        .route("/v1/cni/del", post(del))
        .route("/v1/cni/check", post(check))
        .route("/v1/cni/gc", post(gc))
        .route("/v1/cni/status", get(status))
}

/// One attachment, as the runtime names it.
#[derive(Deserialize, Clone)]
struct Attachment {
    network: String,
    container_id: String,
    ifname: String,
}

impl Attachment {
    fn id(&self) -> Result<String, ApiError> {
        check_part("network name", &self.network)?;
        check_part("container ID", &self.container_id)?;
        if self.ifname.is_empty() || self.ifname.contains(':') || self.ifname.contains('/') {
            return Err(bad(format!("interface name {:?} is not valid", self.ifname)));
        }
        Ok(attachment_id(&self.network, &self.container_id, &self.ifname))
    }
}

fn check_part(what: &str, s: &str) -> Result<(), ApiError> {
    if is_valid_name(s) && s.len() <= 512 {
        Ok(())
    } else {
        Err(bad(format!("{what} {s:?} is not valid: use letters, digits, '_', '.' and '-'")))
    }
}

#[derive(Deserialize)]
struct AddReq {
    #[serde(flatten)]
    at: Attachment,
    /// The container's namespace path, for logs only.
    netns: Option<String>,
    /// Subnet to take the address from (default: the router's default subnet).
    subnet: Option<String>,
    /// DNS names for the container.
    #[serde(default)]
    names: Vec<String>,
    timeout_seconds: Option<f64>,
    /// Whether the container needs a gateway (the host's address on the bridge).
    #[serde(default = "yes")]
    gateway: bool,
}

fn yes() -> bool {
    true
}

/// Allocates (or finds again) the attachment's address, makes sure the host
/// has a gateway address in its subnet, registers the name, and answers with
/// what the plugin needs to configure the container.
async fn add(State(sh): State<Shared>, Json(req): Json<AddReq>) -> ApiResult {
    let id = req.at.id()?;
    for n in &req.names {
        weft_dns::relative_name(n, &sh.dns.domain).map_err(bad)?;
    }
    // The CNI network is a weft network: `weft` the default one, others named, isolated.
    let network = networks::of_cni(&req.at.network).map_err(|e| bad(format!("{e:#}")))?;
    let (segment, bridge) = sh.networks.ensure(&network).await.map_err(|e| bad(format!("{e:#}")))?;
    let want = match (&req.subnet, segment) {
        (None, s) if s != 0 => Want::Any(networks::subnet(sh.ipam_range, s)),
        _ => want(sh.ipam_range, sh.ipam_default_subnet, req.subnet.as_deref(), None).map_err(bad)?,
    };
    let timeout = wait_time(req.timeout_seconds)?;
    let held = sh.control.lookup(id.clone()).await?;
    let a = sh.control.allocate(id.clone(), want, None, timeout).await?;
    let new = !held.iter().any(|h| h.addr == a.addr);
    let ip = Ipv4Addr::from(a.addr);
    let mut gateway = None;
    // The host stays off named networks: no gateway there, and no DNS server.
    if segment == 0 && (req.gateway || sh.dns.enabled) {
        match host_address_in(&sh, a.subnet).await {
            Ok(g) => gateway = Some(g),
            Err(e) => {
                let msg = format!("could not give the host a gateway address in {}: {e:#}", a.subnet);
                if new {
                    undo_allocations(&sh, &[a]).await;
                }
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg));
            }
        }
    }
    let mut fqdns = Vec::new();
    for name in &req.names {
        match sh.control.dns_add(id.clone(), name.clone(), vec![IpAddr::V4(ip)]).await {
            Ok(f) => fqdns.push(f),
            Err(e) => warn!(name = %name, error = %e, "could not register the DNS name"),
        }
    }
    // The server listens on the bridge's addresses; on a fresh gateway address it may not be
    // up yet, but will be in a moment, so the gateway is the answer then.
    let nameserver = match (sh.dns.enabled && segment == 0, &sh.dns.listen) {
        (false, _) => None,
        (true, Some(_)) => sh.dns_server.nameserver(),
        (true, None) => sh.dns_server.nameserver().or(gateway.map(IpAddr::V4)),
    };
    info!(container = %req.at.container_id, network = %req.at.network, ifname = %req.at.ifname,
        netns = req.netns.as_deref().unwrap_or(""), address = %a.cidr(), new, names = ?fqdns,
        "CNI attachment");
    Ok(Json(json!({
        "id": id, "new": new, "address": a.cidr(), "subnet": a.subnet.to_string(),
        "gateway": if req.gateway { gateway.map(|g| g.to_string()) } else { None },
        "mtu": sh.mtu, "bridge": bridge, "names": fqdns,
        "dns": dns_json(&sh, nameserver),
        // The container end's MAC, already announced to the peers, on this network.
        "mac": Mac(sh.guard.promise(segment)).to_string(), "segment": segment, "network": network,
    })))
}

fn dns_json(sh: &Shared, nameserver: Option<IpAddr>) -> Value {
    match nameserver {
        Some(ns) => {
            let domain = sh.dns.domain.trim_end_matches('.').to_string();
            json!({ "nameservers": [ns.to_string()], "domain": domain, "search": [domain] })
        }
        None => Value::Null,
    }
}

/// Releases the attachment's addresses and names. Succeeds when there is nothing to release.
async fn del(State(sh): State<Shared>, Json(at): Json<Attachment>) -> ApiResult {
    let id = at.id()?;
    let released = forget(&sh, vec![id]).await?;
    // The plugin removed the port before this call: a named network may now be empty here.
    if let Ok(network) = networks::of_cni(&at.network) {
        sh.networks.release_if_empty(networks::segment_of(&network)).await;
    }
    if !released.is_empty() {
        info!(container = %at.container_id, network = %at.network, ifname = %at.ifname, released = ?released, "CNI detachment");
    }
    Ok(Json(json!({ "released": released })))
}

/// Releases the addresses and names of these attachment IDs; returns the addresses.
async fn forget(sh: &Shared, ids: Vec<String>) -> Result<Vec<String>, ApiError> {
    let mut released = Vec::new();
    for id in ids {
        released.extend(sh.control.release(id.clone(), None).await?.iter().map(Allocation::cidr));
        sh.control.dns_remove(id, None, Vec::new()).await?;
    }
    Ok(released)
}

/// What the router holds for an attachment, for the plugin's CHECK.
async fn check(State(sh): State<Shared>, Json(at): Json<Attachment>) -> ApiResult {
    let id = at.id()?;
    let held = sh.control.lookup(id.clone()).await?;
    let names: Vec<String> = sh.control.dns_own().await?.into_iter().filter(|r| r.id == id).map(|r| r.name).collect();
    let addresses: Vec<String> = held.iter().map(Allocation::cidr).collect();
    let network = networks::of_cni(&at.network).unwrap_or_default();
    let bridge = sh.networks.list().await.into_iter().find(|n| n.name == network).map_or(sh.bridge.clone(), |n| n.bridge);
    Ok(Json(json!({ "id": id, "addresses": addresses, "names": names, "mtu": sh.mtu, "bridge": bridge })))
}

#[derive(Deserialize)]
struct GcReq {
    network: String,
    /// The attachments the runtime still has; everything else of the network goes.
    #[serde(default)]
    valid: Vec<ValidAttachment>,
}

#[derive(Deserialize)]
struct ValidAttachment {
    container_id: String,
    ifname: String,
}

/// Releases every attachment of the network that the runtime no longer lists.
async fn gc(State(sh): State<Shared>, Json(req): Json<GcReq>) -> ApiResult {
    check_part("network name", &req.network)?;
    let keep: HashSet<String> = req.valid.iter().map(|v| attachment_id(&req.network, &v.container_id, &v.ifname)).collect();
    let prefix = format!("{ID_PREFIX}{}:", req.network);
    let mut stale: Vec<String> = sh.control.allocations().await?.into_iter().map(|x| x.id).collect();
    stale.extend(sh.control.dns_own().await?.into_iter().map(|r| r.id));
    stale.retain(|id| id.starts_with(&prefix) && !keep.contains(id));
    stale.sort();
    stale.dedup();
    let released = forget(&sh, stale.clone()).await?;
    if !stale.is_empty() {
        info!(network = %req.network, attachments = ?stale, released = ?released, "CNI garbage collection");
    }
    Ok(Json(json!({ "removed": stale, "released": released })))
}

/// Whether the router can serve an ADD now. Starts the peers agreeing on the
/// address ring if nothing has yet: a runtime asks this before its first ADD.
async fn status(State(sh): State<Shared>) -> ApiResult {
    let (ready, state) = sh.control.prime().await?;
    Ok(Json(json!({ "ready": ready, "state": state })))
}

/// The CNI attachments of this host: ID parts, addresses and names.
async fn list(State(sh): State<Shared>) -> ApiResult {
    Ok(Json(json!({ "attachments": attachments(&sh).await? })))
}

/// The CNI attachments of this host, for `weft status`.
pub async fn attachments(sh: &Shared) -> Result<Vec<Value>, ApiError> {
    let allocs = sh.control.allocations().await?;
    let regs = sh.control.dns_own().await?;
    let mut ids: Vec<&str> = allocs.iter().map(|x| x.id.as_str()).filter(|id| id.starts_with(ID_PREFIX)).collect();
    ids.sort();
    ids.dedup();
    let mut out = Vec::new();
    for id in ids {
        let Some((network, container, ifname)) = parse_attachment_id(id) else { continue };
        let addresses: Vec<String> = allocs.iter().filter(|a| a.id == id).map(Allocation::cidr).collect();
        let mut names: Vec<&str> = regs.iter().filter(|r| r.id == id).map(|r| r.name.as_str()).collect();
        names.dedup();
        out.push(json!({ "network": network, "container_id": container, "ifname": ifname,
            "addresses": addresses, "names": names }));
    }
    Ok(out)
}
