//! The Docker plugin: libnetwork's remote network driver and remote IPAM protocols, served on
//! `weft.sock` in Docker's plugin directory (root-only, like the API socket).
//!
//! Every call is `POST /<Interface>.<Method>` with a JSON body (empty for calls without
//! arguments, and without a Content-Type, so bodies are parsed here rather than by an
//! extractor). Answers are JSON; a refusal is HTTP 400 with the message under both `Err` (the
//! driver protocol's field) and `Error` (the IPAM protocol's), which dockerd shows as
//! `<Method>: <message>`; a method weft does not know is 404, as the protocol asks. Every call
//! is bounded in time: dockerd waits without a limit, holding the container's lock.
//!
//! The driver's scope is `local`: each host has its own Docker network object, made with the
//! same `docker network create` on every host (same name, same `--subnet`). The name makes the
//! weft network (its segment is a hash of the name), so the hosts agree without a shared store.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_ipam::{Cidr, Want};
use weft_proto::Mac;

use super::book::{check_docker_id, check_pool, port_names, suggest, Address, Endpoint, Network, Pool};
use super::{short, Docker};
use crate::control::networks;

/// Longest a call may take before dockerd gets a refusal.
const CALL_LIMIT: Duration = Duration::from_secs(20);
/// How long an address request may wait for the mesh's IPAM.
const IPAM_WAIT: Duration = Duration::from_secs(10);
/// The generic options map in CreateNetwork (`docker network create -o K=V`).
const GENERIC: &str = "com.docker.network.generic";
/// The option marking the gateway request in RequestAddress.
const REQUEST_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// Why a call fails.
enum Refusal {
    /// The method is not one weft serves.
    Unknown(String),
    /// Said to the user through dockerd.
    Refused(String),
}

type CallResult = Result<Value, Refusal>;

fn refuse(m: impl Into<String>) -> Refusal {
    Refusal::Refused(m.into())
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Refusal::Refused(format!("{e:#}"))
    }
}

/// Binds the plugin socket in `dir` and serves it until `stop` turns true. A stale socket of a
/// router that died is replaced; one another router serves is left alone (an error).
pub async fn serve(docker: Arc<Docker>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let path = docker.plugin_socket();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating Docker's plugin directory {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            anyhow::bail!("another process serves the Docker plugin socket {}: stop it first", path.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(&path).with_context(|| format!("binding the Docker plugin socket {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} root-only", path.display()))?;
    }
    let app = axum::Router::new().route("/{method}", post(call)).fallback(unknown).with_state(docker);
    info!(socket = %path.display(), "serving the Docker network and IPAM plugin");
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(crate::api::server::RootOnly(listener), app).with_graceful_shutdown(shutdown).await {
            warn!(error = %e, "the Docker plugin server stopped");
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn unknown() -> Response {
    reply(StatusCode::NOT_FOUND, json!({ "Err": "weft does not serve this method" }))
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [("content-type", "application/vnd.docker.plugins.v1+json")], body.to_string()).into_response()
}

async fn call(State(d): State<Arc<Docker>>, Path(method): Path<String>, body: Bytes) -> Response {
    d.stats.requests.fetch_add(1, Ordering::Relaxed);
    let r = match tokio::time::timeout(CALL_LIMIT, dispatch(&d, &method, &body)).await {
        Ok(r) => r,
        Err(_) => Err(refuse(format!("weft did not finish {method} within {CALL_LIMIT:?}; see the router's log"))),
    };
    match r {
        Ok(v) => reply(StatusCode::OK, v),
        Err(Refusal::Unknown(m)) => reply(StatusCode::NOT_FOUND, json!({ "Err": format!("weft does not serve {m}") })),
        Err(Refusal::Refused(m)) => {
            d.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(method, error = %m, "Docker plugin call refused");
            reply(StatusCode::BAD_REQUEST, json!({ "Err": m, "Error": m }))
        }
    }
}

/// The body as `T`; an empty body is `T::default()`.
fn parse<T: DeserializeOwned + Default>(method: &str, body: &[u8]) -> Result<T, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| refuse(format!("{method}: the request does not parse: {e}")))
}

async fn dispatch(d: &Arc<Docker>, method: &str, body: &[u8]) -> CallResult {
    match method {
        "Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
        "NetworkDriver.GetCapabilities" => Ok(json!({ "Scope": "local", "ConnectivityScope": "global" })),
        "NetworkDriver.CreateNetwork" => create_network(d, parse(method, body)?).await,
        "NetworkDriver.DeleteNetwork" => delete_network(d, parse(method, body)?).await,
        "NetworkDriver.CreateEndpoint" => create_endpoint(d, parse(method, body)?).await,
        "NetworkDriver.EndpointOperInfo" => oper_info(d, parse(method, body)?).await,
        "NetworkDriver.DeleteEndpoint" => delete_endpoint(d, parse(method, body)?).await,
        "NetworkDriver.Join" => join(d, parse(method, body)?).await,
        "NetworkDriver.Leave"
        | "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete"
        | "NetworkDriver.ProgramExternalConnectivity"
        | "NetworkDriver.RevokeExternalConnectivity"
        | "NetworkDriver.AllocateNetwork"
        | "NetworkDriver.FreeNetwork" => Ok(json!({})),
        "IpamDriver.GetCapabilities" => Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })),
        "IpamDriver.GetDefaultAddressSpaces" => {
            Ok(json!({ "LocalDefaultAddressSpace": "weft", "GlobalDefaultAddressSpace": "weft" }))
        }
        "IpamDriver.RequestPool" => request_pool(d, parse(method, body)?).await,
        "IpamDriver.ReleasePool" => release_pool(d, parse(method, body)?).await,
        "IpamDriver.RequestAddress" => request_address(d, parse(method, body)?).await,
        "IpamDriver.ReleaseAddress" => release_address(d, parse(method, body)?).await,
        other => Err(Refusal::Unknown(other.chars().take(64).collect())),
    }
}

// ---- the network driver -------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct IpamData {
    #[serde(rename = "Pool", default)]
    pool: String,
}

#[derive(Deserialize, Default)]
struct CreateNetworkReq {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
    #[serde(rename = "Options", default)]
    options: Option<Map<String, Value>>,
    #[serde(rename = "IPv4Data", default)]
    ipv4: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data", default)]
    ipv6: Option<Vec<IpamData>>,
}

async fn create_network(d: &Docker, r: CreateNetworkReq) -> CallResult {
    check_docker_id("network ID", &r.network_id).map_err(refuse)?;
    let opts = r.options.unwrap_or_default();
    if let Some(Value::Object(generic)) = opts.get(GENERIC) {
        if let Some(k) = generic.keys().next() {
            return Err(refuse(format!("unknown option -o {k}: weft's network driver takes no options")));
        }
    }
    if r.ipv6.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(refuse("weft's Docker networks are IPv4 only: drop --ipv6"));
    }
    let v4 = r.ipv4.unwrap_or_default();
    let [data] = v4.as_slice() else {
        return Err(refuse(format!("a weft network has exactly one IPv4 subnet (got {})", v4.len())));
    };
    let mut book = d.book.lock().await;
    if !book.pools.contains_key(&data.pool) {
        return Err(refuse(format!(
            "the subnet {} does not come from weft's IPAM: add --ipam-driver weft (weft hands out the addresses, so that they are unique on every host)",
            data.pool
        )));
    }
    if book.networks.values().any(|n| n.subnet == data.pool) {
        return Err(refuse(format!("the subnet {} is another weft network's on this host: pick another --subnet", data.pool)));
    }
    if book.full() {
        return Err(refuse("the Docker plugin's book is full: remove unused networks first"));
    }
    book.networks.insert(r.network_id.clone(), Network { subnet: data.pool.clone(), name: None });
    d.commit(book).await;
    info!(network = %short(&r.network_id), subnet = %data.pool, "Docker network on weft made");
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
struct NetworkReq {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
}

async fn delete_network(d: &Docker, r: NetworkReq) -> CallResult {
    let mut book = d.book.lock().await;
    if let Some(n) = book.networks.remove(&r.network_id) {
        d.commit(book).await;
        if let Some(name) = n.name.as_deref().and_then(|n| weft_name(n).ok()) {
            d.sh.networks.release_if_empty(networks::segment_of(&name)).await;
        }
        info!(network = %short(&r.network_id), name = n.name.as_deref().unwrap_or(""), "Docker network on weft removed");
    }
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
struct EndpointInterface {
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "AddressIPv6", default)]
    address_v6: String,
    #[serde(rename = "MacAddress", default)]
    mac: String,
}

#[derive(Deserialize, Default)]
struct CreateEndpointReq {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
    #[serde(rename = "EndpointID", default)]
    endpoint_id: String,
    #[serde(rename = "Interface", default)]
    interface: Option<EndpointInterface>,
}

/// The weft network of a Docker network name (weft's names are lower case).
fn weft_name(docker_name: &str) -> Result<String, Refusal> {
    let n = networks::of_runtime("Docker", docker_name).map_err(|e| refuse(format!("{e:#}; give it another name")))?;
    if n == networks::DEFAULT {
        return Err(refuse(format!("Docker network {docker_name:?}: that is the name of weft's default network; give it another name")));
    }
    Ok(n)
}

async fn create_endpoint(d: &Docker, r: CreateEndpointReq) -> CallResult {
    check_docker_id("network ID", &r.network_id).map_err(refuse)?;
    check_docker_id("endpoint ID", &r.endpoint_id).map_err(refuse)?;
    let iface = r.interface.unwrap_or_default();
    if !iface.address_v6.is_empty() {
        return Err(refuse("weft's Docker networks are IPv4 only"));
    }
    let (subnet, gateway) = {
        let book = d.book.lock().await;
        if book.endpoints.contains_key(&r.endpoint_id) {
            return Err(refuse(format!("endpoint {} exists already", short(&r.endpoint_id))));
        }
        if book.full() {
            return Err(refuse("the Docker plugin's book is full"));
        }
        let net = book.networks.get(&r.network_id).ok_or_else(|| {
            refuse(format!("weft does not know Docker network {}: remove it and make it again (docker network rm, docker network create -d weft ...)", short(&r.network_id)))
        })?;
        let pool = book.pools.get(&net.subnet).ok_or_else(|| refuse(format!("the pool {} of this network is gone; make the network again", net.subnet)))?;
        (net.subnet.clone(), pool.gateway)
    };
    let subnet: Cidr = subnet.parse().map_err(refuse)?;
    let (ip, prefix) = iface
        .address
        .split_once('/')
        .and_then(|(ip, p)| Some((ip.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| refuse(format!("the endpoint has no IPv4 address ({:?}): use --ipam-driver weft", iface.address)))?;
    if !subnet.contains(u32::from(ip)) || prefix != subnet.prefix {
        return Err(refuse(format!("address {}/{prefix} is not in the network's subnet {subnet}", ip)));
    }
    let docker_name = d.network_name(&r.network_id).await.map_err(|e| refuse(format!("could not learn the Docker network's name: {e:#}")))?;
    let name = weft_name(&docker_name)?;
    let sh = &d.sh;
    let (segment, bridge) = sh.networks.ensure(&name).await?;
    // This host's address on the network, the containers' gateway.
    let have = sh.netdev.addresses(&bridge).await.unwrap_or_default();
    if !have.iter().any(|(a, _)| *a == IpAddr::V4(gateway)) {
        if let Err(e) = sh.netdev.add_address(&bridge, IpAddr::V4(gateway), subnet.prefix).await {
            sh.networks.release_if_empty(segment).await;
            return Err(refuse(format!("could not give this host its gateway address {gateway}/{} on {bridge}: {e:#}", subnet.prefix)));
        }
    }
    let chosen = iface.mac.is_empty();
    let mac = if chosen {
        sh.guard.promise(segment)
    } else {
        iface.mac.parse::<Mac>().map_err(|e| refuse(format!("--mac-address {}: {e}", iface.mac)))?.0
    };
    let (port, peer) = port_names(&r.endpoint_id);
    let label = format!("docker {docker_name} {}", short(&r.endpoint_id));
    if let Err(e) = sh.netdev.create_docker_port(&bridge, &port, &peer, mac, &[(IpAddr::V4(ip), prefix)], sh.mtu, segment, &label).await {
        sh.networks.release_if_empty(segment).await;
        return Err(e.into());
    }
    sh.guard.changed();
    let ep = Endpoint {
        network: r.network_id.clone(),
        weft_network: name.clone(),
        segment,
        port: port.clone(),
        peer,
        mac: Mac(mac).to_string(),
        address: format!("{ip}/{prefix}"),
        container: None,
    };
    let mut book = d.book.lock().await;
    book.endpoints.insert(r.endpoint_id.clone(), ep);
    d.commit(book).await;
    info!(endpoint = %short(&r.endpoint_id), network = %name, %port, address = %format!("{ip}/{prefix}"), mac = %Mac(mac), "Docker endpoint made");
    // The MAC is weft's only when Docker had none; Docker refuses to be told one it set.
    Ok(if chosen { json!({ "Interface": { "MacAddress": Mac(mac).to_string() } }) } else { json!({}) })
}

#[derive(Deserialize, Default)]
struct EndpointReq {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
    #[serde(rename = "EndpointID", default)]
    endpoint_id: String,
}

async fn oper_info(d: &Docker, r: EndpointReq) -> CallResult {
    let book = d.book.lock().await;
    Ok(match book.endpoints.get(&r.endpoint_id) {
        Some(ep) => json!({ "Value": { "weft.network": ep.weft_network, "weft.port": ep.port } }),
        None => json!({ "Value": {} }),
    })
}

async fn delete_endpoint(d: &Docker, r: EndpointReq) -> CallResult {
    let mut book = d.book.lock().await;
    // Unknown: already gone (dockerd cleans up after a crash with calls like this).
    let Some(ep) = book.endpoints.remove(&r.endpoint_id) else { return Ok(json!({})) };
    // The weft network stays on this host while the Docker network is here (no bridge, TAP
    // and VXLAN device made again for every short-lived container).
    let pinned = book.networks.contains_key(&ep.network);
    d.commit(book).await;
    if let Err(e) = d.sh.netdev.remove_docker_port(&ep.port).await {
        warn!(port = %ep.port, error = %format!("{e:#}"), "could not remove a Docker endpoint's port");
    }
    d.sh.guard.changed();
    if !pinned {
        d.sh.networks.release_if_empty(ep.segment).await;
    }
    info!(endpoint = %short(&r.endpoint_id), network = %ep.weft_network, port = %ep.port, "Docker endpoint removed");
    let _ = r.network_id;
    Ok(json!({}))
}

async fn join(d: &Docker, r: EndpointReq) -> CallResult {
    let book = d.book.lock().await;
    let ep = book.endpoints.get(&r.endpoint_id).ok_or_else(|| refuse(format!("weft has no endpoint {}", short(&r.endpoint_id))))?;
    let gateway = book
        .networks
        .get(&ep.network)
        .and_then(|n| book.pools.get(&n.subnet))
        .map(|p| p.gateway.to_string())
        .ok_or_else(|| refuse("the endpoint's network is gone"))?;
    // A gateway of its own network, so that Docker adds no docker_gwbridge.
    Ok(json!({
        "InterfaceName": { "SrcName": ep.peer, "DstPrefix": "eth" },
        "Gateway": gateway,
        "DisableGatewayService": true,
    }))
}

// ---- IPAM ----------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct RequestPoolReq {
    #[serde(rename = "Pool", default)]
    pool: String,
    #[serde(rename = "SubPool", default)]
    sub_pool: String,
    #[serde(rename = "Options", default)]
    options: Option<BTreeMap<String, String>>,
    #[serde(rename = "V6", default)]
    v6: bool,
}

fn gateway_id(subnet: &str) -> String {
    format!("docker:gateway:{subnet}")
}

async fn request_pool(d: &Docker, r: RequestPoolReq) -> CallResult {
    if r.v6 {
        return Err(refuse("weft's Docker networks are IPv4 only: drop --ipv6"));
    }
    if let Some(k) = r.options.unwrap_or_default().keys().next() {
        return Err(refuse(format!("unknown option --ipam-opt {k}: weft's IPAM takes none")));
    }
    if !r.sub_pool.is_empty() {
        return Err(refuse("--ip-range is not supported: weft hands out addresses from the whole --subnet, on every host"));
    }
    let range = d.sh.ipam_range;
    let subnet = {
        let book = d.book.lock().await;
        if r.pool.is_empty() {
            let eg = suggest(range, &book).map_or_else(|| range.to_string(), |c| c.to_string());
            return Err(refuse(format!(
                "weft needs --subnet for a Docker network: Docker does not tell its IPAM plugin the network's name, so weft cannot pick a subnet that every host agrees on. \
                 Give the same --subnet on every host, inside weft's range {range} (e.g. --subnet {eg})"
            )));
        }
        if book.full() {
            return Err(refuse("the Docker plugin's book is full: remove unused networks first"));
        }
        check_pool(range, &r.pool, &book).map_err(refuse)?
    };
    let key = subnet.to_string();
    let a = d.sh.control.allocate(gateway_id(&key), Want::Any(subnet), None, IPAM_WAIT).await.map_err(|e| {
        refuse(format!("could not get this host's gateway address in {key} from weft's IPAM: {e}"))
    })?;
    let gateway = Ipv4Addr::from(a.addr);
    let mut book = d.book.lock().await;
    book.pools.insert(key.clone(), Pool { gateway });
    d.commit(book).await;
    info!(subnet = %key, %gateway, "Docker pool given");
    Ok(json!({ "PoolID": key, "Pool": key, "Data": { GATEWAY_TYPE: format!("{gateway}/{}", subnet.prefix) } }))
}

#[derive(Deserialize, Default)]
struct ReleasePoolReq {
    #[serde(rename = "PoolID", default)]
    pool_id: String,
}

async fn release_pool(d: &Docker, r: ReleasePoolReq) -> CallResult {
    let mut book = d.book.lock().await;
    let Some(_pool) = book.pools.remove(&r.pool_id) else { return Ok(json!({})) };
    // Addresses still kept in it (for stopped containers) go with it.
    let left: Vec<(Ipv4Addr, Address)> = book.addresses.iter().filter(|(_, a)| a.subnet == r.pool_id).map(|(ip, a)| (*ip, a.clone())).collect();
    for (ip, _) in &left {
        book.addresses.remove(ip);
    }
    d.commit(book).await;
    for (ip, a) in left {
        let _ = d.sh.control.release(a.id, Some(u32::from(ip))).await;
    }
    if let Err(e) = d.sh.control.release(gateway_id(&r.pool_id), None).await {
        warn!(subnet = %r.pool_id, error = %e, "could not release this host's gateway address of a Docker pool");
    }
    info!(subnet = %r.pool_id, "Docker pool released");
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
struct RequestAddressReq {
    #[serde(rename = "PoolID", default)]
    pool_id: String,
    #[serde(rename = "Address", default)]
    address: String,
    #[serde(rename = "Options", default)]
    options: Option<BTreeMap<String, String>>,
}

async fn request_address(d: &Docker, r: RequestAddressReq) -> CallResult {
    let (subnet, gateway, parked) = {
        let book = d.book.lock().await;
        let pool = book.pools.get(&r.pool_id).ok_or_else(|| refuse(format!("weft has no pool {:?}", r.pool_id)))?;
        let parked: Vec<(Ipv4Addr, String)> = book
            .addresses
            .iter()
            .filter(|(_, a)| a.parked && a.subnet == r.pool_id)
            .filter_map(|(ip, a)| Some((*ip, a.container.clone()?)))
            .collect();
        (r.pool_id.parse::<Cidr>().map_err(refuse)?, pool.gateway, parked)
    };
    let with_prefix = |ip: Ipv4Addr| json!({ "Address": format!("{ip}/{}", subnet.prefix), "Data": {} });
    let opts = r.options.unwrap_or_default();
    if opts.get(REQUEST_TYPE).map(String::as_str) == Some(GATEWAY_TYPE) {
        if r.address.is_empty() || r.address == gateway.to_string() {
            return Ok(with_prefix(gateway));
        }
        return Err(refuse(format!("weft gives each host its own gateway ({gateway} here): drop --gateway")));
    }
    let asked: Option<Ipv4Addr> = if r.address.is_empty() {
        None
    } else {
        let ip: Ipv4Addr = r.address.parse().map_err(|_| refuse(format!("--ip {:?} is not an IPv4 address", r.address)))?;
        if !subnet.contains(u32::from(ip)) {
            return Err(refuse(format!("--ip {ip} is not in the network's subnet {subnet}")));
        }
        if ip == gateway {
            return Err(refuse(format!("--ip {ip} is this host's gateway on the network: pick another")));
        }
        Some(ip)
    };
    // A stopped container starting again gets back the address kept for it.
    let again = match asked {
        Some(ip) => parked.iter().find(|(p, _)| *p == ip).map(|(p, _)| *p),
        None if !parked.is_empty() => {
            let ids: Vec<String> = parked.iter().map(|(_, c)| c.clone()).collect();
            let (starting, gone) = d.starting_among(&ids).await;
            info!(kept = parked.len(), starting = ?starting.as_deref().map(short), gone = gone.len(), "addresses kept for stopped containers: is one of them starting?");
            for cid in gone {
                d.destroyed(&cid).await;
            }
            starting.and_then(|cid| parked.iter().find(|(_, c)| *c == cid).map(|(ip, _)| *ip))
        }
        None => None,
    };
    if let Some(ip) = again {
        let mut book = d.book.lock().await;
        if let Some(a) = book.addresses.get_mut(&ip).filter(|a| a.parked) {
            a.parked = false;
            d.commit(book).await;
            d.stats.kept.fetch_add(1, Ordering::Relaxed);
            info!(address = %ip, "a stopped container started again: its address is given back");
            return Ok(with_prefix(ip));
        }
    }
    let id = format!("docker:addr:{:016x}", rand::random::<u64>());
    let want = match asked {
        Some(ip) => Want::Addr(u32::from(ip), subnet),
        None => Want::Any(subnet),
    };
    let a = d.sh.control.allocate(id.clone(), want, None, IPAM_WAIT).await.map_err(|e| refuse(format!("weft's IPAM: {e}")))?;
    let ip = Ipv4Addr::from(a.addr);
    let mut book = d.book.lock().await;
    book.addresses.insert(ip, Address { id, subnet: r.pool_id.clone(), container: None, parked: false });
    d.commit(book).await;
    Ok(with_prefix(ip))
}

#[derive(Deserialize, Default)]
struct ReleaseAddressReq {
    #[serde(rename = "PoolID", default)]
    pool_id: String,
    #[serde(rename = "Address", default)]
    address: String,
}

async fn release_address(d: &Docker, r: ReleaseAddressReq) -> CallResult {
    let Ok(ip) = r.address.parse::<Ipv4Addr>() else { return Ok(json!({})) };
    let mut book = d.book.lock().await;
    let Some(a) = book.addresses.get_mut(&ip) else { return Ok(json!({})) };
    if a.container.is_some() {
        // Its container may start again: kept for it until it is removed.
        a.parked = true;
        info!(address = %ip, container = %a.container.as_deref().map(short).unwrap_or(""), "address kept for a stopped container");
        d.commit(book).await;
        return Ok(json!({}));
    }
    let a = book.addresses.remove(&ip);
    d.commit(book).await;
    if let Some(a) = a {
        if let Err(e) = d.sh.control.release(a.id, Some(u32::from(ip))).await {
            warn!(address = %ip, pool = %r.pool_id, error = %e, "could not release an address Docker gave back");
        }
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_as_dockerd_sends_them() {
        // Empty (calls without arguments), nulls for absent maps, unknown fields.
        let r: CreateNetworkReq = parse("x", b"").unwrap_or_default();
        assert!(r.network_id.is_empty());
        let body = br#"{"NetworkID":"abc","Options":{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{}},"IPv4Data":[{"AddressSpace":"weft","Pool":"10.40.7.0/24","Gateway":"10.40.7.1/24","AuxAddresses":null}],"IPv6Data":[],"NewField":1}"#;
        let r: CreateNetworkReq = parse("x", body).unwrap_or_default();
        assert_eq!(r.network_id, "abc");
        assert_eq!(r.ipv4.unwrap_or_default()[0].pool, "10.40.7.0/24");
        let r: RequestAddressReq = parse("x", br#"{"PoolID":"10.40.7.0/24","Address":"","Options":null}"#).unwrap_or_default();
        assert!(r.options.is_none() && r.address.is_empty());
        let r: CreateEndpointReq =
            parse("x", br#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.40.7.2/24","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":[]}}"#)
                .unwrap_or_default();
        assert_eq!(r.interface.unwrap_or_default().address, "10.40.7.2/24");
        assert!(matches!(parse::<CreateNetworkReq>("NetworkDriver.CreateNetwork", b"{\"NetworkID\": 5}"), Err(Refusal::Refused(m)) if m.contains("does not parse")));
    }

    #[test]
    fn docker_names_map_to_weft_names() {
        assert_eq!(weft_name("App").ok(), Some("app".to_owned()));
        assert!(weft_name("weft").is_err());
        assert!(weft_name(&"x".repeat(40)).is_err());
        assert!(weft_name("a b").is_err());
    }
}
