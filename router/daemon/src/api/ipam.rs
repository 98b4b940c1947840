//! Address allocation by hand: `/v1/ipam`, `/v1/ipam/{allocate,lookup,release,rmpeer,reset}`.

use std::net::Ipv4Addr;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::request::{blocking, wait_time};
use super::error::{ApiError, ApiResult};
use super::state::Shared;
use crate::host::netns::{netns_path, netns_ref};
use crate::services::ipam::{self, allocation_json, want};

fn invalid(msg: impl Into<String>) -> ApiError {
    ipam::invalid(msg).into()
}

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/v1/ipam", get(status))
        .route("/v1/ipam/allocate", post(allocate))
        .route("/v1/ipam/lookup", get(lookup))
        .route("/v1/ipam/release", post(release))
        .route("/v1/ipam/rmpeer", post(rmpeer))
        .route("/v1/ipam/reset", post(reset))
}

async fn status(State(sh): State<Shared>) -> ApiResult {
    Ok(Json(sh.control.ipam_status(true).await?))
}

#[derive(Deserialize)]
struct AllocReq {
    id: String,
    subnet: Option<String>,
    address: Option<String>,
    netns: Option<String>,
    timeout_seconds: Option<f64>,
}

async fn allocate(State(sh): State<Shared>, Json(req): Json<AllocReq>) -> ApiResult {
    let want = want(sh.ipam_range, sh.ipam_default_subnet, req.subnet.as_deref(), req.address.as_deref()).map_err(invalid)?;
    let netns = match &req.netns {
        Some(n) => {
            let p = netns_path(n);
            Some(blocking(move || netns_ref(&p)).await?.map_err(invalid)?)
        }
        None => None,
    };
    let timeout = wait_time(req.timeout_seconds)?;
    let a = sh.control.allocate(req.id, want, netns, timeout).await?;
    info!(container = %a.id, address = %a.cidr(), "allocated");
    Ok(Json(allocation_json(&a)))
}

#[derive(Deserialize)]
struct IdQuery {
    id: String,
}

async fn lookup(State(sh): State<Shared>, Query(q): Query<IdQuery>) -> ApiResult {
    let held = sh.control.lookup(q.id.clone()).await?;
    if held.is_empty() {
        return Err(invalid(format!("container {} holds no address here", q.id)));
    }
    Ok(Json(json!({ "id": q.id, "addresses": held.iter().map(allocation_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct ReleaseReq {
    id: String,
    address: Option<String>,
}

async fn release(State(sh): State<Shared>, Json(req): Json<ReleaseReq>) -> ApiResult {
    let addr = match &req.address {
        Some(a) => {
            let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
            Some(u32::from(ip.parse::<Ipv4Addr>().map_err(|_| invalid(format!("{a:?} is not an IPv4 address")))?))
        }
        None => None,
    };
    let gone = sh.control.release(req.id.clone(), addr).await?;
    for a in &gone {
        info!(container = %a.id, address = %a.cidr(), "released");
    }
    Ok(Json(json!({ "id": req.id, "released": gone.iter().map(allocation_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct RmpeerReq {
    peer: String,
    #[serde(default)]
    force: bool,
}

async fn rmpeer(State(sh): State<Shared>, Json(req): Json<RmpeerReq>) -> ApiResult {
    Ok(Json(sh.control.rmpeer(req.peer, req.force).await?))
}

#[derive(Deserialize)]
struct ResetReq {
    #[serde(default)]
    force: bool,
}

/// Hands this peer's space over, waits for the receiving peer to confirm it has it on disk (or a
/// time-out, said plainly), then stops the router.
async fn reset(State(sh): State<Shared>, Json(req): Json<ResetReq>) -> ApiResult {
    let r = sh.control.reset(req.force).await?;
    let warning = match (&r.handed_to, r.acknowledged) {
        (Some(p), false) => Some(format!(
            "{p} did not confirm taking over {} addresses within 10 s; the space was sent to it and to the other peers, \
             and reaches it by gossip once it is up. If it never does, run `weft rmpeer` for this peer on another host",
            r.addresses
        )),
        _ => None,
    };
    let v = json!({
        "handed_to": r.handed_to.map(|p| p.to_string()), "addresses": r.addresses,
        "acknowledged": r.acknowledged, "warning": warning,
    });
    info!(result = %v, "left the mesh's address range; stopping");
    sh.control.stop("left the mesh's address range (weft reset)").await;
    Ok(Json(v))
}
