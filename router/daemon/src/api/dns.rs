//! Names by hand: `/v1/dns`, `/v1/dns/{add,remove,lookup}`.

use std::net::IpAddr;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use super::error::{bad, ApiError, ApiResult};
use super::state::Shared;
use crate::services::dns::EXTERN_ID;

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new()
        .route("/v1/dns", get(status))
        .route("/v1/dns/add", post(add))
        .route("/v1/dns/remove", post(remove))
        .route("/v1/dns/lookup", get(lookup))
}

async fn status(State(sh): State<Shared>) -> ApiResult {
    Ok(Json(sh.control.dns_status().await?))
}

fn parse_ips(list: &[String]) -> Result<Vec<IpAddr>, ApiError> {
    list.iter().map(|s| s.parse::<IpAddr>().map_err(|_| bad(format!("{s:?} is not an IP address")))).collect()
}

#[derive(Deserialize)]
struct AddReq {
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
    id: Option<String>,
}

async fn add(State(sh): State<Shared>, Json(req): Json<AddReq>) -> ApiResult {
    let addrs = parse_ips(&req.addresses)?;
    if addrs.is_empty() {
        return Err(bad("give at least one address for the name"));
    }
    let id = req.id.unwrap_or_else(|| EXTERN_ID.into());
    let fqdn = sh.control.dns_add(id.clone(), req.name.clone(), addrs.clone()).await?;
    info!(name = %fqdn, addresses = ?addrs, container = %id, "DNS name added");
    Ok(Json(json!({ "name": fqdn, "addresses": req.addresses, "id": id })))
}

#[derive(Deserialize)]
struct RemoveReq {
    name: Option<String>,
    #[serde(default)]
    addresses: Vec<String>,
    id: Option<String>,
}

async fn remove(State(sh): State<Shared>, Json(req): Json<RemoveReq>) -> ApiResult {
    let addrs = parse_ips(&req.addresses)?;
    if req.name.is_none() && req.id.is_none() && addrs.is_empty() {
        return Err(bad("say what to remove: a name, addresses, or a container ID"));
    }
    let id = req.id.clone().unwrap_or_else(|| EXTERN_ID.into());
    if !sh.control.dns_remove(id, req.name.clone(), addrs).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such name here (only names added on this host can be removed here)",
        ));
    }
    Ok(Json(json!({ "removed": true })))
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn lookup(State(sh): State<Shared>, Query(q): Query<NameQuery>) -> ApiResult {
    let zone = sh.dns.domain.trim_end_matches('.');
    let rel = weft_dns::relative_name(&q.name, &sh.dns.domain).map_err(bad)?;
    let addrs = sh.control.dns_lookup(rel.clone()).await?;
    if addrs.is_empty() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("{rel}.{zone} is not known")));
    }
    Ok(Json(json!({ "name": format!("{rel}.{zone}"), "addresses": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>() })))
}
