//! The local API (HTTP/JSON on a root-only unix socket) used by the CLI and,
//! later, the CNI plugin; and the status/metrics endpoint on 127.0.0.1:6782.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::daemon::Shared;
use crate::metrics;

/// An API error: HTTP status plus a message a person can act on.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Accepts only connections from root (checked with SO_PEERCRED), on top of
/// the socket file's 0600 mode.
struct RootOnly(UnixListener);

impl axum::serve::Listener for RootOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((s, a)) => match s.peer_cred() {
                    Ok(c) if c.uid() == 0 => return (s, a),
                    Ok(c) => warn!(uid = c.uid(), pid = ?c.pid(), "refused API connection from a non-root user"),
                    Err(e) => warn!(error = %e, "could not read API peer credentials; refusing"),
                },
                Err(e) => {
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Binds the API socket and serves it in the background.
pub(crate) async fn serve_api(shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    let path = shared.opts.api_socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!("another router is serving {}: stop it first (weft stop)", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("binding API socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only", path.display()))?;
    let app = axum::Router::new()
        .route("/v1/status", get(status))
        .route("/v1/connect", post(connect))
        .route("/v1/forget", post(forget))
        .route("/v1/attach", post(attach))
        .route("/v1/detach", post(detach))
        .route("/v1/expose", post(expose))
        .route("/v1/hide", post(hide))
        .route("/v1/stop", post(stop))
        .with_state(shared);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(RootOnly(listener), app).await {
            warn!(error = %e, "API server stopped");
        }
    }))
}

/// Serves `/metrics` and `/status` on a TCP address (127.0.0.1:6782 by default).
pub(crate) async fn serve_metrics(shared: Arc<Shared>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
    let registry = Arc::new(metrics::registry(shared.dp.clone(), shared.ctl.clone()));
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let r = registry.clone();
                async move {
                    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics::render(&r))
                }
            }),
        )
        .route("/status", get(status))
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn status(State(sh): State<Arc<Shared>>) -> ApiResult {
    let mut v = sh.call(|a| a.status()).await.map_err(internal)?;
    v["attachments"] = json!(attachments(&sh).await);
    Ok(Json(v))
}

#[derive(Deserialize)]
struct Peers {
    peers: Vec<String>,
}

/// Resolves every peer the user named; the first that fails is the error.
async fn resolve_all(peers: &[String]) -> Result<Vec<SocketAddr>, ApiError> {
    let mut addrs = Vec::with_capacity(peers.len());
    for p in peers {
        addrs.push(crate::daemon::resolve(p).await.map_err(|e| bad(format!("{e:#}")))?);
    }
    Ok(addrs)
}

async fn connect(State(sh): State<Arc<Shared>>, Json(req): Json<Peers>) -> ApiResult {
    let addrs = resolve_all(&req.peers).await?;
    let added: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    sh.call(move |a| {
        let now = std::time::Instant::now();
        for addr in addrs {
            a.core.add_target(now, addr);
        }
        a.drain();
    })
    .await
    .map_err(internal)?;
    info!(peers = ?added, "connect requested");
    Ok(Json(json!({ "added": added })))
}

async fn forget(State(sh): State<Arc<Shared>>, Json(req): Json<Peers>) -> ApiResult {
    let addrs = resolve_all(&req.peers).await?;
    let forgotten = sh
        .call(move |a| {
            let r: Vec<(String, bool)> = addrs.iter().map(|x| (x.to_string(), a.core.forget_target(*x))).collect();
            a.drain();
            r
        })
        .await
        .map_err(internal)?;
    let unknown: Vec<&String> = forgotten.iter().filter(|(_, k)| !k).map(|(a, _)| a).collect();
    if !unknown.is_empty() {
        return Err(bad(format!("not a target: {unknown:?} (see `weft status targets`)")));
    }
    Ok(Json(json!({ "forgotten": forgotten.iter().map(|(a, _)| a).collect::<Vec<_>>() })))
}

/// Resolves what the user typed for a namespace: a PID, a path, or a name under /run/netns.
pub fn netns_path(spec: &str) -> PathBuf {
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new("/run/netns").join(spec)
    }
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

#[derive(Deserialize)]
struct AttachReq {
    netns: String,
    cidrs: Vec<String>,
    #[serde(default = "default_ifname")]
    ifname: String,
    mtu: Option<u32>,
}

fn default_ifname() -> String {
    "ethwe".into()
}

async fn attach(State(sh): State<Arc<Shared>>, Json(req): Json<AttachReq>) -> ApiResult {
    if req.cidrs.is_empty() {
        return Err(bad("no address given: pass IP/PREFIX (automatic addresses come with IPAM)"));
    }
    let addrs = req.cidrs.iter().map(|c| parse_cidr(c)).collect::<Result<Vec<_>, _>>()?;
    let path = netns_path(&req.netns);
    let mtu = req.mtu.unwrap_or(sh.opts.mtu);
    let info = sh
        .netdev
        .attach_netns(&sh.opts.bridge, &path, &req.ifname, &addrs, mtu)
        .await
        .map_err(|e| bad(format!("{e:#}")))?;
    info!(netns = %path.display(), ifname = %req.ifname, host_if = %info.host_ifname, addrs = ?req.cidrs, "attached");
    Ok(Json(json!({
        "netns": path.display().to_string(), "ifname": info.container_ifname, "host_ifname": info.host_ifname,
        "mac": crate::dataplane::fmt_mac(&info.container_mac), "addresses": req.cidrs, "mtu": mtu,
    })))
}

#[derive(Deserialize)]
struct DetachReq {
    netns: String,
    #[serde(default = "default_ifname")]
    ifname: String,
}

async fn detach(State(sh): State<Arc<Shared>>, Json(req): Json<DetachReq>) -> ApiResult {
    let path = netns_path(&req.netns);
    let removed = sh.netdev.detach_netns(&path, &req.ifname).await.map_err(|e| bad(format!("{e:#}")))?;
    if !removed {
        return Err(bad(format!("{} has no weft interface {} to detach", path.display(), req.ifname)));
    }
    info!(netns = %path.display(), ifname = %req.ifname, "detached");
    Ok(Json(json!({ "detached": path.display().to_string() })))
}

#[derive(Deserialize)]
struct CidrReq {
    cidr: String,
}

async fn expose(State(sh): State<Arc<Shared>>, Json(req): Json<CidrReq>) -> ApiResult {
    let (ip, prefix) = parse_cidr(&req.cidr)?;
    sh.netdev.add_address(&sh.opts.bridge, ip, prefix).await.map_err(internal)?;
    info!(cidr = %req.cidr, bridge = %sh.opts.bridge, "exposed");
    Ok(Json(json!({ "exposed": req.cidr, "bridge": sh.opts.bridge })))
}

async fn hide(State(sh): State<Arc<Shared>>, Json(req): Json<CidrReq>) -> ApiResult {
    let (ip, prefix) = parse_cidr(&req.cidr)?;
    let had = sh.netdev.del_address(&sh.opts.bridge, ip, prefix).await.map_err(internal)?;
    if !had {
        return Err(bad(format!("{} is not exposed on {}", req.cidr, sh.opts.bridge)));
    }
    Ok(Json(json!({ "hidden": req.cidr })))
}

async fn stop(State(sh): State<Arc<Shared>>) -> ApiResult {
    sh.shutdown.notify_one();
    Ok(Json(json!({ "stopping": true })))
}

/// Interfaces on the bridge other than the TAP: what is attached.
async fn attachments(sh: &Shared) -> Vec<Value> {
    match sh.netdev.bridge_ports(&sh.opts.bridge).await {
        Ok(ports) => ports
            .into_iter()
            .filter(|p| *p != crate::daemon::tap_name(&sh.opts.bridge))
            .map(|p| json!({ "host_ifname": p }))
            .collect(),
        Err(_) => Vec::new(),
    }
}
