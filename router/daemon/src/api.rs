//! The local API (HTTP/JSON on a root-only unix socket) used by the CLI and
//! the CNI plugin; and the status/metrics endpoint on 127.0.0.1:6782.

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
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

pub(crate) fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

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
        .merge(crate::ipam::routes())
        .merge(crate::dns::routes())
        .merge(crate::cni::routes())
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
    let mut v = sh
        .call(|a| {
            let mut v = a.status();
            v["ipam"] = a.ipam_status();
            v["dns"] = a.dns_status();
            v
        })
        .await
        .map_err(internal)?;
    v["attachments"] = json!(attachments(&sh).await);
    v["cni"] = json!(crate::cni::attachments(&sh).await.map_err(internal)?);
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
    /// `IP/PREFIX` (claimed from IPAM when inside its range), `net:CIDR`
    /// (any free address in that subnet) or `net:default`. None: one address
    /// from the default subnet.
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default = "default_ifname")]
    ifname: String,
    mtu: Option<u32>,
    /// Container ID for IPAM; the namespace's inode when absent.
    id: Option<String>,
    timeout_seconds: Option<f64>,
    /// A DNS name for the container (`web` or `web.weft.local`).
    name: Option<String>,
}

fn default_ifname() -> String {
    "ethwe".into()
}

/// What the user asked for, one address each.
enum AddrSpec {
    /// Used as given (outside the IPAM range).
    Fixed(IpAddr, u8),
    /// Asked of IPAM.
    Ipam(weft_ipam::Want),
}

fn addr_specs(sh: &Shared, cidrs: &[String]) -> Result<Vec<AddrSpec>, ApiError> {
    if cidrs.is_empty() {
        return Ok(vec![AddrSpec::Ipam(weft_ipam::Want::Any(sh.ipam_default_subnet))]);
    }
    cidrs
        .iter()
        .map(|c| {
            if let Some(net) = c.strip_prefix("net:") {
                let subnet = if net == "default" { None } else { Some(net) };
                return crate::ipam::want(sh, subnet, None).map(AddrSpec::Ipam).map_err(bad);
            }
            let (ip, prefix) = parse_cidr(c)?;
            match ip {
                IpAddr::V4(v4) if sh.ipam_range.contains(u32::from(v4)) => {
                    crate::ipam::want(sh, None, Some(c)).map(AddrSpec::Ipam).map_err(bad)
                }
                _ => Ok(AddrSpec::Fixed(ip, prefix)),
            }
        })
        .collect()
}

async fn attach(State(sh): State<Arc<Shared>>, Json(req): Json<AttachReq>) -> Result<Json<Value>, Response> {
    let specs = addr_specs(&sh, &req.cidrs).map_err(IntoResponse::into_response)?;
    if let Some(n) = &req.name {
        weft_dns::relative_name(n, &sh.opts.dns.domain).map_err(|e| bad(e.to_string()).into_response())?;
    }
    let path = netns_path(&req.netns);
    let ns = crate::ipam::netns_ref(&path).map_err(|e| bad(e).into_response())?;
    let id = req.id.clone().unwrap_or_else(|| format!("netns:{}", ns.inode));
    let timeout = crate::ipam::wait_time(req.timeout_seconds).map_err(IntoResponse::into_response)?;
    // What the container held before: a failed attach gives back only what it added.
    let id2 = id.clone();
    let held: Vec<u32> = sh.call(move |a| a.ipam().lookup(&id2)).await.unwrap_or_default().iter().map(|a| a.addr).collect();
    let mut addrs = Vec::new();
    let mut allocated = Vec::new();
    let mut any_ipam = false;
    for spec in specs {
        match spec {
            AddrSpec::Fixed(ip, p) => addrs.push((ip, p)),
            AddrSpec::Ipam(want) => match crate::ipam::allocate(&sh, id.clone(), want, Some(ns.clone()), timeout).await {
                Ok(a) => {
                    any_ipam = true;
                    addrs.push((IpAddr::V4(a.addr.into()), a.subnet.prefix));
                    if !held.contains(&a.addr) {
                        allocated.push(a);
                    }
                }
                Err(f) => {
                    undo_allocations(&sh, &allocated).await;
                    return Err(crate::ipam::IpamError(f).into_response());
                }
            },
        }
    }
    let mtu = req.mtu.unwrap_or(sh.opts.mtu);
    let info = match sh.netdev.attach_netns(&sh.opts.bridge, &path, &req.ifname, &addrs, mtu).await {
        Ok(i) => i,
        Err(e) => {
            undo_allocations(&sh, &allocated).await;
            return Err(bad(format!("{e:#}")).into_response());
        }
    };
    let shown: Vec<String> = addrs.iter().map(|(ip, p)| format!("{ip}/{p}")).collect();
    info!(netns = %path.display(), ifname = %req.ifname, host_if = %info.host_ifname, addrs = ?shown, container = %id, "attached");
    // DNS: the host needs an address on the bridge for containers to reach
    // the server; the first container addressed by IPAM gives it one.
    if sh.opts.dns.enabled && sh.opts.dns.listen.is_none() && any_ipam {
        if let Err(e) = ensure_host_address(&sh).await {
            warn!(error = %format!("{e:#}"), "could not give the host an address for DNS");
        }
    }
    let mut fqdn = Value::Null;
    if let Some(name) = &req.name {
        let ips: Vec<IpAddr> = addrs.iter().map(|(ip, _)| *ip).collect();
        let (id2, n2) = (id.clone(), name.clone());
        match sh.call(move |a| a.dns_add(&id2, &n2, &ips)).await {
            Ok(Ok(f)) => fqdn = json!(f),
            Ok(Err(e)) => warn!(name = %name, error = %e, "could not register the DNS name"),
            Err(e) => warn!(error = %e, "could not register the DNS name"),
        }
    }
    let mut resolver = Value::Null;
    if is_netns_name(&req.netns) && sh.opts.dns.enabled {
        if let Some(server) = wait_nameserver(&sh).await {
            match crate::dns::write_resolv_conf(&req.netns, server, &sh.opts.dns.domain) {
                Ok(true) => resolver = json!(server.to_string()),
                Ok(false) => {}
                Err(e) => warn!(netns = %req.netns, error = %format!("{e:#}"), "could not write resolv.conf"),
            }
        }
    }
    Ok(Json(json!({
        "netns": path.display().to_string(), "ifname": info.container_ifname, "host_ifname": info.host_ifname,
        "mac": crate::dataplane::fmt_mac(&info.container_mac), "addresses": shown, "mtu": mtu, "id": id,
        "name": fqdn, "nameserver": resolver,
    })))
}

/// A name under /run/netns (not a path or a PID).
fn is_netns_name(spec: &str) -> bool {
    !spec.is_empty() && !spec.contains('/') && !spec.bytes().all(|b| b.is_ascii_digit())
}

/// The DNS server's address, waiting briefly for it to come up on a fresh host address.
async fn wait_nameserver(sh: &Shared) -> Option<IpAddr> {
    for _ in 0..30 {
        if let Some(a) = crate::dns::nameserver(sh) {
            return Some(a);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

/// Gives the bridge an address from IPAM if it has no IPv4 address yet.
async fn ensure_host_address(sh: &Arc<Shared>) -> anyhow::Result<()> {
    host_address_in(sh, sh.ipam_default_subnet).await.map(|_| ())
}

/// An IPv4 address of the host on the bridge inside `subnet`: one it has, or
/// a new one from IPAM (kept under the `weft:expose` ID, as `weft expose` does).
pub(crate) async fn host_address_in(sh: &Arc<Shared>, subnet: weft_ipam::Cidr) -> anyhow::Result<std::net::Ipv4Addr> {
    let _one_at_a_time = sh.host_addr_lock.lock().await;
    let have = sh.netdev.addresses(&sh.opts.bridge).await?;
    if let Some(ip) = have.iter().find_map(|(ip, _)| match ip {
        IpAddr::V4(v4) if subnet.contains(u32::from(*v4)) => Some(*v4),
        _ => None,
    }) {
        return Ok(ip);
    }
    let want = weft_ipam::Want::Any(subnet);
    let a = crate::ipam::allocate(sh, crate::ipam::EXPOSE_ID.into(), want, None, std::time::Duration::from_secs(10))
        .await
        .map_err(|f| anyhow::anyhow!(f.message))?;
    sh.netdev.add_address(&sh.opts.bridge, IpAddr::V4(a.addr.into()), a.subnet.prefix).await?;
    sh.dns_recheck.notify_one();
    info!(address = %a.cidr(), bridge = %sh.opts.bridge, "gave the host an address on the bridge");
    Ok(a.addr.into())
}

/// Releases what an attach that failed half-way had newly allocated.
pub(crate) async fn undo_allocations(sh: &Arc<Shared>, allocated: &[weft_ipam::Allocation]) {
    for a in allocated {
        let _ = crate::ipam::release(sh, a.id.clone(), Some(a.addr)).await;
    }
}

#[derive(Deserialize)]
struct DetachReq {
    netns: String,
    /// The container ID given at attach, if one was.
    id: Option<String>,
    #[serde(default = "default_ifname")]
    ifname: String,
}

async fn detach(State(sh): State<Arc<Shared>>, Json(req): Json<DetachReq>) -> ApiResult {
    let path = netns_path(&req.netns);
    let inode = crate::ipam::netns_ref(&path).ok().map(|n| n.inode);
    let removed = sh.netdev.detach_netns(&path, &req.ifname).await.map_err(|e| bad(format!("{e:#}")))?;
    if !removed {
        return Err(bad(format!("{} has no weft interface {} to detach", path.display(), req.ifname)));
    }
    let released = match inode {
        Some(i) => crate::ipam::release_netns(&sh, i).await.map_err(internal)?,
        None => Vec::new(),
    };
    // Names go with the container: under the IDs its addresses had, and the default ID.
    let mut ids: Vec<String> = released.iter().map(|a| a.id.clone()).collect();
    ids.extend(req.id.clone());
    ids.extend(inode.map(|i| format!("netns:{i}")));
    ids.sort();
    ids.dedup();
    sh.call(move |a| {
        for id in &ids {
            a.dns_remove(id, None, None);
        }
    })
    .await
    .map_err(internal)?;
    if is_netns_name(&req.netns) {
        crate::dns::remove_resolv_conf(&req.netns);
    }
    let released: Vec<String> = released.iter().map(|a| a.cidr()).collect();
    info!(netns = %path.display(), ifname = %req.ifname, released = ?released, "detached");
    Ok(Json(json!({ "detached": path.display().to_string(), "released": released })))
}

#[derive(Deserialize)]
struct CidrReq {
    /// `IP/PREFIX`, `net:CIDR`, `net:default`, or none for an address from
    /// the default subnet.
    cidr: Option<String>,
    timeout_seconds: Option<f64>,
}

async fn expose(State(sh): State<Arc<Shared>>, Json(req): Json<CidrReq>) -> Result<Json<Value>, Response> {
    let specs = addr_specs(&sh, req.cidr.as_slice()).map_err(IntoResponse::into_response)?;
    let timeout = crate::ipam::wait_time(req.timeout_seconds).map_err(IntoResponse::into_response)?;
    let mut new = None;
    let (ip, prefix) = match specs.into_iter().next() {
        Some(AddrSpec::Fixed(ip, p)) => (ip, p),
        Some(AddrSpec::Ipam(want)) => {
            let a = crate::ipam::allocate(&sh, crate::ipam::EXPOSE_ID.into(), want, None, timeout)
                .await
                .map_err(|f| crate::ipam::IpamError(f).into_response())?;
            new = Some(a.clone());
            (IpAddr::V4(a.addr.into()), a.subnet.prefix)
        }
        None => return Err(bad("nothing to expose").into_response()),
    };
    if let Err(e) = sh.netdev.add_address(&sh.opts.bridge, ip, prefix).await {
        if let Some(a) = new {
            undo_allocations(&sh, &[a]).await;
        }
        return Err(internal(e).into_response());
    }
    let cidr = format!("{ip}/{prefix}");
    info!(%cidr, bridge = %sh.opts.bridge, "exposed");
    Ok(Json(json!({ "exposed": cidr, "bridge": sh.opts.bridge })))
}

async fn hide(State(sh): State<Arc<Shared>>, Json(req): Json<CidrReq>) -> ApiResult {
    // Without an address: every address IPAM gave the host.
    let targets: Vec<(IpAddr, u8)> = match &req.cidr {
        Some(c) => vec![parse_cidr(c)?],
        None => sh
            .call(|a| a.ipam().lookup(crate::ipam::EXPOSE_ID))
            .await
            .map_err(internal)?
            .iter()
            .map(|a| (IpAddr::V4(a.addr.into()), a.subnet.prefix))
            .collect(),
    };
    if targets.is_empty() {
        return Err(bad(format!("no address is exposed on {}", sh.opts.bridge)));
    }
    let mut hidden = Vec::new();
    for (ip, prefix) in targets {
        let had = sh.netdev.del_address(&sh.opts.bridge, ip, prefix).await.map_err(internal)?;
        if let IpAddr::V4(v4) = ip {
            crate::ipam::release(&sh, crate::ipam::EXPOSE_ID.into(), Some(u32::from(v4))).await.map_err(internal)?;
        }
        if !had && req.cidr.is_some() {
            return Err(bad(format!("{ip}/{prefix} is not exposed on {}", sh.opts.bridge)));
        }
        hidden.push(format!("{ip}/{prefix}"));
    }
    Ok(Json(json!({ "hidden": hidden })))
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
