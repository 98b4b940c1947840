//! The mesh: `/v1/status`, `/v1/connect`, `/v1/forget`, `/v1/stop`, and the health document the
//! TCP endpoint serves as `/status`.

use std::net::SocketAddr;

use axum::extract::State;
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::cni::attachments as cni_attachments;
use super::error::{bad, ApiError, ApiResult};
use super::state::Shared;
use crate::control::conn::resolve;

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/v1/status", get(status))
        .route("/v1/connect", post(connect))
        .route("/v1/forget", post(forget))
        .route("/v1/stop", post(stop))
        .route("/v1/identity/forget", post(forget_identity))
        .route("/v1/identity/revoke", post(revoke))
}

#[derive(Deserialize)]
struct Name {
    name: String,
}

async fn forget_identity(State(sh): State<Shared>, Json(req): Json<Name>) -> ApiResult {
    let name: weft_proto::PeerName = req.name.parse().map_err(|e| bad(format!("{e}")))?;
    let was = sh.control.forget_identity(name).await?;
    if !was {
        return Err(bad(format!("no key is bound to {name} here (or it is this router's own name)")));
    }
    Ok(Json(json!({ "forgotten": name.to_string() })))
}

#[derive(Deserialize)]
struct Revoke {
    revocation: String,
}

async fn revoke(State(sh): State<Shared>, Json(req): Json<Revoke>) -> ApiResult {
    use weft_proto::identity::{from_text, Revocation, REVOCATION_PREFIX};
    let r: Revocation = from_text(REVOCATION_PREFIX, &req.revocation).map_err(bad)?;
    let (name, key) = (r.name, r.key);
    match sh.control.revoke(r).await? {
        Ok(cut) => Ok(Json(json!({ "revoked": name.to_string(), "key": key.to_string(), "was_bound": cut.is_some() }))),
        Err(e) => Err(bad(format!("revocation refused: {e}"))),
    }
}

/// Everything `weft status` shows: the mesh, IPAM and DNS (from the actor), the interfaces on
/// the bridge, and the CNI attachments.
pub async fn status(State(sh): State<Shared>) -> ApiResult {
    let mut v = sh.control.status().await?;
    v["attachments"] = json!(bridge_ports(&sh).await);
    let mut nets = Vec::new();
    for n in sh.networks.list().await {
        let key = format!("{:06x}", n.segment);
        let ports = sh.netdev.bridge_ports(&n.bridge).await.map_or(0, |p| p.iter().filter(|p| crate::host::guard::is_port_name(p)).count());
        nets.push(json!({ "name": n.name, "segment": key, "bridge": n.bridge, "containers": ports,
            "members": if n.segment == 0 { json!("every host") } else { v["macs"]["members"][&key].clone() } }));
    }
    v["networks"] = json!(nets);
    v["guard"] = match crate::host::guard::list().await {
        Ok(l) => json!({ "ports": l.ports, "unruled": l.unruled, "dropped": l.totals() }),
        Err(e) => json!({ "error": format!("{e:#}") }),
    };
    v["cni"] = json!(cni_attachments(&sh).await?);
    if let Some(e) = sh.engine.get() {
        let (key, block) = e.status().await;
        v[key] = block;
    }
    Ok(Json(v))
}

/// `/status` on the TCP endpoint (127.0.0.1:6782, any local user, and more with
/// `--metrics-addr`): health only, from the actor's answer (so a stuck actor fails the probe).
/// Names, UIDs, addresses and the rest stay on the root-only socket.
pub async fn health(State(sh): State<Shared>) -> ApiResult {
    let v = sh.control.status().await?;
    Ok(Json(health_of(&v)))
}

/// The health document from the full status: that the router answers, its version, how many
/// peers it knows and how many connections are established.
fn health_of(full: &Value) -> Value {
    let count = |k: &str| full[k].as_array().map_or(0, Vec::len);
    let established =
        full["connections"].as_array().map_or(0, |cs| cs.iter().filter(|c| c["state"] == "established").count());
    json!({
        "ok": true,
        "version": full["version"],
        "encryption": full["encryption"],
        "peers": count("peers"),
        "connections_established": established,
    })
}

/// Interfaces on the bridge other than the TAP: what is attached.
async fn bridge_ports(sh: &Shared) -> Vec<Value> {
    match sh.netdev.bridge_ports(&sh.bridge).await {
        Ok(ports) => ports.into_iter().filter(|p| *p != sh.tap).map(|p| json!({ "host_ifname": p })).collect(),
        Err(_) => Vec::new(),
    }
}

#[derive(Deserialize)]
struct Peers {
    peers: Vec<String>,
}

/// Resolves every peer the user named; the first that fails is the error.
async fn resolve_all(peers: &[String]) -> Result<Vec<SocketAddr>, ApiError> {
    let mut addrs = Vec::with_capacity(peers.len());
    for p in peers {
        addrs.push(resolve(p).await.map_err(|e| bad(format!("{e:#}")))?);
    }
    Ok(addrs)
}

async fn connect(State(sh): State<Shared>, Json(req): Json<Peers>) -> ApiResult {
    let addrs = resolve_all(&req.peers).await?;
    let added: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    sh.control.connect(addrs).await?;
    info!(peers = ?added, "connect requested");
    Ok(Json(json!({ "added": added })))
}

async fn forget(State(sh): State<Shared>, Json(req): Json<Peers>) -> ApiResult {
    let addrs = resolve_all(&req.peers).await?;
    let forgotten = sh.control.forget(addrs).await?;
    let unknown: Vec<String> = forgotten.iter().filter(|(_, k)| !k).map(|(a, _)| a.to_string()).collect();
    if !unknown.is_empty() {
        return Err(bad(format!("not a target: {unknown:?} (see `weft status targets`)")));
    }
    Ok(Json(json!({ "forgotten": forgotten.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>() })))
}

async fn stop(State(sh): State<Shared>) -> ApiResult {
    sh.control.stop("stop requested").await;
    Ok(Json(json!({ "stopping": true })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_document_counts_and_tells_nothing_else() {
        let full = json!({
            "version": "0.1.0", "name": "aa:bb:cc:dd:ee:ff", "nickname": "host-a", "uid": 12345, "encryption": "enabled",
            "peers": [{"name": "aa:bb:cc:dd:ee:ff", "uid": 12345}, {"name": "11:22:33:44:55:66", "uid": 678}],
            "connections": [{"state": "established", "address": "192.0.2.2:6783"}, {"state": "pending", "address": "192.0.2.3:6783"}],
            "targets": [{"address": "192.0.2.3:6783"}],
        });
        let h = health_of(&full);
        assert_eq!(h, json!({"ok": true, "version": "0.1.0", "encryption": "enabled", "peers": 2, "connections_established": 1}));
        let text = h.to_string();
        for secret in ["aa:bb", "12345", "678", "192.0.2", "host-a"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}
