//! Docker: `/v1/docker/setup`, what `weft setup-docker` writes into dockerd's configuration.

use axum::extract::State;
use axum::routing::post;
use axum::Json;
use serde_json::json;

use super::containers::host_address_in;
use super::error::{bad, ApiError, ApiResult};
use super::state::Shared;

/// The routes.
pub fn routes() -> axum::Router<Shared> {
    axum::Router::new().route("/v1/docker/setup", post(setup))
}

/// The name server dockerd should hand containers' resolvers (Docker's embedded resolver asks
/// it for every name it does not know): weft's DNS server, on an address the host gets on the
/// default bridge now if it has none.
async fn setup(State(sh): State<Shared>) -> ApiResult {
    if !sh.dns.enabled {
        return Err(bad("the router runs without DNS (--no-dns): there is no name server to give dockerd"));
    }
    let nameserver = match sh.dns.listen.as_ref().and_then(|l| l.first()) {
        Some(l) => l.ip(),
        None => {
            host_address_in(&sh, sh.ipam_default_subnet)
                .await
                .map_err(|e| ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("could not give the host an address for DNS: {e:#}")))?;
            sh.dns_server
                .wait_nameserver()
                .await
                .ok_or_else(|| ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "the DNS server did not come up; see the router's log"))?
        }
    };
    let engine = sh.engine.get().is_some();
    Ok(Json(json!({
        "nameserver": nameserver.to_string(),
        "domain": sh.dns.domain.trim_end_matches('.'),
        "docker_integration": engine,
    })))
}
