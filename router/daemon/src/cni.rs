//! The router's side of the CNI plugin (`weft-cni`): addresses, the gateway,
//! DNS names and clean-up for attachments a container runtime asks for.
//!
//! The plugin does the namespace work (veth, addresses, routes) itself, in the
//! runtime's mount namespace where the container's netns path is valid, and
//! asks the router here for what only the router knows. An attachment is kept
//! in IPAM under the ID `cni:NETWORK:CONTAINERID:IFNAME`, so that one network's
//! garbage collection never touches another's, and without a namespace
//! reference: the runtime owns the attachment's life (DEL and GC), and the
//! router, possibly in another mount namespace, must not judge it by a path.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::api::{bad, internal, ApiError, ApiResult};
use crate::daemon::Shared;
use crate::ipam::IpamError;

/// The IPAM ID prefix of every CNI attachment.
pub const ID_PREFIX: &str = "cni:";

/// The `/v1/cni...` routes.
pub(crate) fn routes() -> axum::Router<Arc<Shared>> {
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

/// `cni:NETWORK:CONTAINERID:IFNAME`.
pub fn attachment_id(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{ID_PREFIX}{network}:{container_id}:{ifname}")
}

/// (network, container ID, interface) of an attachment ID.
pub fn parse_attachment_id(id: &str) -> Option<(&str, &str, &str)> {
    let rest = id.strip_prefix(ID_PREFIX)?;
    let (network, rest) = rest.split_once(':')?;
    let (container, ifname) = rest.rsplit_once(':')?;
    Some((network, container, ifname))
}

/// The CNI spec's rule for network names and container IDs: letters, digits,
/// `_`, `.` and `-`, starting with a letter or digit.
pub fn is_valid_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
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
async fn add(State(sh): State<Arc<Shared>>, Json(req): Json<AddReq>) -> Result<Json<Value>, Response> {
    let id = req.at.id().map_err(IntoResponse::into_response)?;
    for n in &req.names {
        weft_dns::relative_name(n, &sh.opts.dns.domain).map_err(|e| bad(e.to_string()).into_response())?;
    }
    let want = crate::ipam::want(&sh, req.subnet.as_deref(), None).map_err(|e| bad(e).into_response())?;
    let timeout = crate::ipam::wait_time(req.timeout_seconds).map_err(IntoResponse::into_response)?;
    let id2 = id.clone();
    let held = sh.call(move |a| a.ipam().lookup(&id2)).await.map_err(|e| internal(e).into_response())?;
    let a = crate::ipam::allocate(&sh, id.clone(), want, None, timeout)
        .await
        .map_err(|f| IpamError(f).into_response())?;
    let new = !held.iter().any(|h| h.addr == a.addr);
    let ip = Ipv4Addr::from(a.addr);
    let mut gateway = None;
    if req.gateway || sh.opts.dns.enabled {
        match crate::api::host_address_in(&sh, a.subnet).await {
            Ok(g) => gateway = Some(g),
            Err(e) => {
                let msg = format!("could not give the host a gateway address in {}: {e:#}", a.subnet);
                if new {
                    crate::api::undo_allocations(&sh, &[a]).await;
                }
                return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, msg).into_response());
            }
        }
    }
    let mut fqdns = Vec::new();
    for name in &req.names {
        let (id2, n2) = (id.clone(), name.clone());
        match sh.call(move |a| a.dns_add(&id2, &n2, &[IpAddr::V4(ip)])).await {
            Ok(Ok(f)) => fqdns.push(f),
            Ok(Err(e)) => warn!(name = %name, error = %e, "could not register the DNS name"),
            Err(e) => warn!(error = %e, "could not register the DNS name"),
        }
    }
    // The server listens on the bridge's addresses; on a fresh gateway address it may not be
    // up yet, but will be in a moment, so the gateway is the answer then.
    let nameserver = match (sh.opts.dns.enabled, &sh.opts.dns.listen) {
        (false, _) => None,
        (true, Some(_)) => crate::dns::nameserver(&sh),
        (true, None) => crate::dns::nameserver(&sh).or(gateway.map(IpAddr::V4)),
    };
    info!(container = %req.at.container_id, network = %req.at.network, ifname = %req.at.ifname,
        netns = req.netns.as_deref().unwrap_or(""), address = %a.cidr(), new, names = ?fqdns,
        "CNI attachment");
    Ok(Json(json!({
        "id": id, "new": new, "address": a.cidr(), "subnet": a.subnet.to_string(),
        "gateway": if req.gateway { gateway.map(|g| g.to_string()) } else { None },
        "mtu": sh.opts.mtu, "bridge": sh.opts.bridge, "names": fqdns,
        "dns": dns_json(&sh, nameserver),
    })))
}

fn dns_json(sh: &Shared, nameserver: Option<IpAddr>) -> Value {
    match nameserver {
        Some(ns) => {
            let domain = sh.opts.dns.domain.trim_end_matches('.').to_string();
            json!({ "nameservers": [ns.to_string()], "domain": domain, "search": [domain] })
        }
        None => Value::Null,
    }
}

/// Releases the attachment's addresses and names. Succeeds when there is nothing to release.
async fn del(State(sh): State<Arc<Shared>>, Json(at): Json<Attachment>) -> ApiResult {
    let id = at.id()?;
    let released = forget(&sh, vec![id]).await?;
    if !released.is_empty() {
        info!(container = %at.container_id, network = %at.network, ifname = %at.ifname, released = ?released, "CNI detachment");
    }
    Ok(Json(json!({ "released": released })))
}

/// Releases the addresses and names of these attachment IDs; returns the addresses.
async fn forget(sh: &Arc<Shared>, ids: Vec<String>) -> Result<Vec<String>, ApiError> {
    sh.call(move |a| {
        let mut released = Vec::new();
        for id in &ids {
            released.extend(a.ipam().release(id, None).iter().map(weft_ipam::Allocation::cidr));
            a.dns_remove(id, None, None);
        }
        a.drain();
        released
    })
    .await
    .map_err(internal)
}

/// What the router holds for an attachment, for the plugin's CHECK.
async fn check(State(sh): State<Arc<Shared>>, Json(at): Json<Attachment>) -> ApiResult {
    let id = at.id()?;
    let id2 = id.clone();
    let (held, names) = sh
        .call(move |a| {
            let held = a.ipam().lookup(&id2);
            let names: Vec<String> = a.dns().own().into_iter().filter(|r| r.id == id2).map(|r| r.name).collect();
            (held, names)
        })
        .await
        .map_err(internal)?;
    let addresses: Vec<String> = held.iter().map(weft_ipam::Allocation::cidr).collect();
    Ok(Json(json!({ "id": id, "addresses": addresses, "names": names, "mtu": sh.opts.mtu, "bridge": sh.opts.bridge })))
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
async fn gc(State(sh): State<Arc<Shared>>, Json(req): Json<GcReq>) -> ApiResult {
    check_part("network name", &req.network)?;
    let keep: HashSet<String> =
        req.valid.iter().map(|v| attachment_id(&req.network, &v.container_id, &v.ifname)).collect();
    let prefix = format!("{ID_PREFIX}{}:", req.network);
    let stale: Vec<String> = sh
        .call(move |a| {
            let mut ids: Vec<String> = a.ipam().allocations().map(|x| x.id.clone()).collect();
            ids.extend(a.dns().own().into_iter().map(|r| r.id));
            ids.retain(|id| id.starts_with(&prefix) && !keep.contains(id));
            ids.sort();
            ids.dedup();
            ids
        })
        .await
        .map_err(internal)?;
    let released = forget(&sh, stale.clone()).await?;
    if !stale.is_empty() {
        info!(network = %req.network, attachments = ?stale, released = ?released, "CNI garbage collection");
    }
    Ok(Json(json!({ "removed": stale, "released": released })))
}

/// Whether the router can serve an ADD now. Starts the peers agreeing on the
/// address ring if nothing has yet: a runtime asks this before its first ADD.
async fn status(State(sh): State<Arc<Shared>>) -> ApiResult {
    let st = sh
        .call(|a| {
            a.ipam().prime(std::time::Instant::now());
            a.drain();
            a.ipam().status()
        })
        .await
        .map_err(internal)?;
    Ok(Json(json!({ "ready": st.ready, "state": st.state })))
}

/// The CNI attachments of this host: ID parts, addresses and names.
async fn list(State(sh): State<Arc<Shared>>) -> ApiResult {
    Ok(Json(json!({ "attachments": attachments(&sh).await.map_err(internal)? })))
}

/// The CNI attachments of this host, for `weft status`.
pub(crate) async fn attachments(sh: &Shared) -> anyhow::Result<Vec<Value>> {
    sh.call(|a| {
        let regs = a.dns().own();
        let mut out: Vec<Value> = Vec::new();
        let mut ids: Vec<String> = a.ipam().allocations().map(|x| x.id.clone()).filter(|id| id.starts_with(ID_PREFIX)).collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            let Some((network, container, ifname)) = parse_attachment_id(&id) else { continue };
            let addresses: Vec<String> = a.ipam().lookup(&id).iter().map(weft_ipam::Allocation::cidr).collect();
            let mut names: Vec<&str> = regs.iter().filter(|r| r.id == id).map(|r| r.name.as_str()).collect();
            names.dedup();
            out.push(json!({ "network": network, "container_id": container, "ifname": ifname,
                "addresses": addresses, "names": names }));
        }
        out
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let id = attachment_id("weft", "abc123", "eth0");
        assert_eq!(id, "cni:weft:abc123:eth0");
        assert_eq!(parse_attachment_id(&id), Some(("weft", "abc123", "eth0")));
        assert_eq!(parse_attachment_id("netns:123"), None);
        assert_eq!(parse_attachment_id("cni:weft"), None);
    }

    #[test]
    fn spec_names_only() {
        assert!(check_part("x", "a-b_c.d9").is_ok());
        for bad in ["", "-a", "a b", "a:b", "a/b", "ä"] {
            assert!(check_part("x", bad).is_err(), "{bad:?}");
        }
    }
}
