//! Docker: a network and IPAM plugin (libnetwork's remote driver protocol, served on
//! `weft.sock` in Docker's plugin directory, see [`plugin`]) and the Engine API's events, so that
//! containers on Docker networks of the weft driver, and containers joined with `weft attach
//! CONTAINER`, get their addresses, names and ports from weft and keep them across restarts.
//!
//! Docker's protocol never says which container an endpoint or an address is for, nor the
//! network's name; both are learned from the Engine API (`bollard`) after the fact, in a task
//! of its own: a plugin handler never waits on the Engine API while dockerd waits on it, but
//! for one bounded exception (a container that is starting holds its lock; see
//! [`Docker::starting_among`]).

pub mod book;
pub mod engine;
pub mod plugin;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, InspectNetworkOptions};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::api::state::Shared;
use book::Book;

/// The driver's name (`docker network create -d weft`), and the plugin socket's file name.
pub const DRIVER: &str = "weft";
/// Where dockerd looks for plugin sockets.
pub const DEFAULT_PLUGIN_DIR: &str = "/run/docker/plugins";
/// The Engine API's socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// How long an Engine API call from a plugin handler may take.
const HANDLER_CALL: Duration = Duration::from_secs(3);
/// How long an Engine API call from the events task may take.
const TASK_CALL: Duration = Duration::from_secs(10);
/// How long a probe of a stopped container's lock waits (see [`Docker::starting_among`]).
const LOCK_PROBE: Duration = Duration::from_millis(400);

/// Counters for the status and metrics.
#[derive(Default)]
pub struct DockerStats {
    /// Plugin requests served.
    pub requests: AtomicU64,
    /// Plugin requests refused (bad input, or a request weft cannot serve), by any reason.
    pub refused: AtomicU64,
    /// Engine API events handled.
    pub events: AtomicU64,
    /// Containers attached again after a start.
    pub reattached: AtomicU64,
    /// Addresses given back to a container that started again.
    pub kept: AtomicU64,
}

/// See the module docs.
pub struct Docker {
    sh: Shared,
    book: Mutex<Book>,
    file: PathBuf,
    socket: PathBuf,
    plugin_dir: PathBuf,
    client: std::sync::Mutex<Option<bollard::Docker>>,
    connected: std::sync::atomic::AtomicBool,
    /// Counters.
    pub stats: DockerStats,
}

/// A container as the Engine API showed it.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// 0 or absent when it is not running.
    pub pid: Option<i64>,
    /// Its endpoints on networks, by network ID: (endpoint ID, IPv4 address, aliases).
    pub endpoints: HashMap<String, (String, Option<Ipv4Addr>, Vec<String>)>,
}

impl Docker {
    /// The integration; its book is read from `state_dir`.
    pub fn new(sh: Shared, state_dir: &Path, socket: PathBuf, plugin_dir: PathBuf) -> Arc<Docker> {
        let file = state_dir.join("docker.json");
        let book = Book::load(&file).unwrap_or_else(|e| {
            warn!(error = %e, "the Docker plugin's book");
            Book::default()
        });
        Arc::new(Docker {
            sh,
            book: Mutex::new(book),
            file,
            socket,
            plugin_dir,
            client: std::sync::Mutex::new(None),
            connected: std::sync::atomic::AtomicBool::new(false),
            stats: DockerStats::default(),
        })
    }

    /// The plugin socket's path.
    pub fn plugin_socket(&self) -> PathBuf {
        self.plugin_dir.join(format!("{DRIVER}.sock"))
    }

    /// Writes the book while its lock is still held (so two changes reach the disk in the
    /// order they were made), then lets the lock go.
    async fn commit(&self, book: tokio::sync::MutexGuard<'_, Book>) {
        if let Err(e) = book.save(&self.file) {
            warn!(file = %self.file.display(), error = %e, "could not save the Docker plugin's book; a restart may forget Docker endpoints");
        }
    }

    /// An Engine API client, connected and with its API version negotiated down to dockerd's.
    async fn client(&self) -> Result<bollard::Docker> {
        if let Some(c) = self.client.lock().map_err(|_| anyhow!("poisoned"))?.clone() {
            return Ok(c);
        }
        if !self.socket.exists() {
            bail!("Docker is not running here: no Engine API socket at {} (start dockerd, or give the router --docker-socket)", self.socket.display());
        }
        let path = self.socket.display().to_string();
        let c = bollard::Docker::connect_with_socket(&path, 120, bollard::API_DEFAULT_VERSION)
            .with_context(|| format!("connecting to the Engine API at {path}"))?;
        let c = tokio::time::timeout(HANDLER_CALL, c.negotiate_version())
            .await
            .map_err(|_| anyhow!("the Engine API at {path} did not answer within {HANDLER_CALL:?}"))?
            .with_context(|| format!("asking the Engine API at {path} for its version"))?;
        *self.client.lock().map_err(|_| anyhow!("poisoned"))? = Some(c.clone());
        Ok(c)
    }

    fn drop_client(&self) {
        if let Ok(mut c) = self.client.lock() {
            *c = None;
        }
    }

    /// A container by name or ID.
    pub async fn inspect(&self, target: &str, limit: Duration) -> Result<Option<ContainerInfo>> {
        let c = self.client().await?;
        let r = tokio::time::timeout(limit, c.inspect_container(target, None::<InspectContainerOptions>))
            .await
            .map_err(|_| anyhow!("the Engine API did not show container {target} within {limit:?}"))?;
        let r = match r {
            Ok(r) => r,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("inspecting container {target}"))),
        };
        let mut endpoints = HashMap::new();
        for (_, ep) in r.network_settings.and_then(|n| n.networks).unwrap_or_default() {
            let Some(nid) = ep.network_id.clone() else { continue };
            let ip = ep.ip_address.as_deref().and_then(|a| a.parse().ok());
            endpoints.insert(nid, (ep.endpoint_id.unwrap_or_default(), ip, ep.aliases.unwrap_or_default()));
        }
        Ok(Some(ContainerInfo {
            id: r.id.unwrap_or_default(),
            name: r.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            pid: r.state.and_then(|s| s.pid).filter(|p| *p > 0),
            endpoints,
        }))
    }

    /// The name of Docker network `nid`: from the book, else from the Engine API (which has it
    /// once `docker network create` is through), kept in the book.
    pub async fn network_name(&self, nid: &str) -> Result<String> {
        if let Some(n) = self.book.lock().await.networks.get(nid).and_then(|n| n.name.clone()) {
            return Ok(n);
        }
        let c = self.client().await?;
        let n = tokio::time::timeout(HANDLER_CALL, c.inspect_network(nid, None::<InspectNetworkOptions>))
            .await
            .map_err(|_| anyhow!("the Engine API did not show network {nid} within {HANDLER_CALL:?}"))?
            .with_context(|| format!("asking the Engine API for network {nid}"))?;
        let name = n.name.ok_or_else(|| anyhow!("the Engine API shows network {nid} without a name"))?;
        self.name_network(nid, &name).await;
        Ok(name)
    }

    /// Keeps Docker's name of network `nid`, if the book has the network.
    async fn name_network(&self, nid: &str, name: &str) {
        let mut book = self.book.lock().await;
        if let Some(net) = book.networks.get_mut(nid) {
            net.name = Some(name.to_owned());
            self.commit(book).await;
        }
    }

    /// Which of these stopped containers is being started now, if exactly one is: dockerd
    /// holds a container's lock while it starts it (and asks IPAM for its address meanwhile),
    /// so an inspect of that one does not answer, while the others answer at once. A container
    /// that is gone is said so, so that its address can go. When no one can be told apart, none
    /// is named: the container gets a fresh address, never another container's.
    async fn starting_among(&self, candidates: &[String]) -> (Option<String>, Vec<String>) {
        let c = match tokio::time::timeout(LOCK_PROBE * 2, self.client()).await {
            Ok(Ok(c)) => c,
            // dockerd does not serve its API while it starts the containers it had running
            // (restart policies, after its own restart): no request of a person can be under
            // way, so this one is dockerd's, for one of those. With one candidate, that is it.
            _ if candidates.len() == 1 => return (candidates.first().cloned(), Vec::new()),
            _ => return (None, Vec::new()),
        };
        let probes = candidates.iter().map(|id| {
            let c = c.clone();
            async move {
                let r = tokio::time::timeout(LOCK_PROBE, c.inspect_container(id, None::<InspectContainerOptions>)).await;
                (id.clone(), r)
            }
        });
        let mut starting = Vec::new();
        let mut gone = Vec::new();
        let mut unanswered = Vec::new();
        for (id, r) in futures::future::join_all(probes).await {
            match r {
                Err(_) => starting.push(id),
                Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })) => gone.push(id),
                Ok(Err(_)) => unanswered.push(id),
                Ok(Ok(_)) => {}
            }
        }
        if starting.len() == 1 {
            return (starting.pop(), gone);
        }
        // As above, when the API takes the connection but does not answer.
        if starting.is_empty() && unanswered.len() == candidates.len() && candidates.len() == 1 {
            return (unanswered.pop(), gone);
        }
        (None, gone)
    }

    /// Status for `weft status` (`docker` block).
    pub async fn status(&self) -> Value {
        let book = self.book.lock().await;
        let networks: Vec<Value> = book
            .networks
            .iter()
            .map(|(id, n)| {
                let eps = book.endpoints.values().filter(|e| &e.network == id).count();
                json!({ "id": short(id), "name": n.name, "subnet": n.subnet, "gateway": book.pools.get(&n.subnet).map(|p| p.gateway.to_string()), "endpoints": eps })
            })
            .collect();
        let attached: Vec<Value> = book
            .attached
            .iter()
            .map(|(id, a)| json!({ "container": short(id), "name": a.name, "network": a.network, "running": a.pid.is_some() }))
            .collect();
        let parked = book.addresses.values().filter(|a| a.parked).count();
        json!({
            "engine": { "socket": self.socket.display().to_string(), "connected": self.connected.load(Ordering::Relaxed) },
            "plugin": self.plugin_socket().display().to_string(),
            "networks": networks, "endpoints": book.endpoints.len(), "addresses": book.addresses.len(),
            "kept_for_stopped": parked, "attached": attached,
            "requests": self.stats.requests.load(Ordering::Relaxed), "refused": self.stats.refused.load(Ordering::Relaxed),
            "events": self.stats.events.load(Ordering::Relaxed), "reattached": self.stats.reattached.load(Ordering::Relaxed),
            "addresses_kept": self.stats.kept.load(Ordering::Relaxed),
        })
    }

    // ---- `weft attach CONTAINER` ----------------------------------------------------------

    /// Records a container attached with `weft attach CONTAINER`, to attach it again when it
    /// starts again.
    pub async fn remember_attached(&self, id: &str, entry: book::Attached) {
        let mut book = self.book.lock().await;
        if book.full() && !book.attached.contains_key(id) {
            warn!(container = %short(id), "the Docker book is full: this container will not be attached again after a restart");
            return;
        }
        book.attached.insert(id.to_owned(), entry);
        self.commit(book).await;
    }

    /// Forgets an attached container (`weft detach CONTAINER`).
    pub async fn forget_attached(&self, id: &str) -> Option<book::Attached> {
        let mut book = self.book.lock().await;
        let a = book.attached.remove(id);
        self.commit(book).await;
        a
    }

    // ---- the events task -------------------------------------------------------------------

    /// Follows the Engine API's events for as long as the router runs: reconnects when dockerd
    /// goes and comes back, and catches up with what happened meanwhile.
    pub fn spawn_events(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut said = String::new();
            loop {
                match me.follow().await {
                    Ok(()) => info!("the Engine API's event stream ended (dockerd stopped?); waiting for it"),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if msg != said {
                            debug!(error = %msg, "not following Docker's events");
                            said = msg;
                        }
                    }
                }
                me.connected.store(false, Ordering::Relaxed);
                me.drop_client();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    async fn follow(&self) -> Result<()> {
        let c = self.client().await?;
        let filters = HashMap::from([("type".to_owned(), vec!["container".to_owned(), "network".to_owned()])]);
        let mut events = c.events(Some(EventsOptions { since: None, until: None, filters: Some(filters) }));
        self.connected.store(true, Ordering::Relaxed);
        info!(socket = %self.socket.display(), "following Docker's events");
        // Subscribed first, then caught up: nothing falls in between.
        self.catch_up().await;
        while let Some(ev) = events.next().await {
            let ev = ev.context("reading Docker's events")?;
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            let kind = ev.typ.map(|t| t.to_string()).unwrap_or_default();
            let action = ev.action.unwrap_or_default();
            let actor = ev.actor.unwrap_or_default();
            let id = actor.id.unwrap_or_default();
            let attrs = actor.attributes.unwrap_or_default();
            self.handle(&kind, &action, &id, &attrs).await;
        }
        Ok(())
    }

    async fn handle(&self, kind: &str, action: &str, id: &str, attrs: &HashMap<String, String>) {
        debug!(kind, action, id = %short(id), "Docker event");
        match (kind, action) {
            ("network", "connect") if attrs.get("type").map(String::as_str) == Some(DRIVER) => {
                if let Some(cid) = attrs.get("container") {
                    self.learn_endpoint(id, cid).await;
                }
            }
            ("network", "disconnect") if attrs.get("type").map(String::as_str) == Some(DRIVER) => {
                if let Some(cid) = attrs.get("container") {
                    let _ = self.sh.control.dns_remove(dns_id(id, cid), None, Vec::new()).await;
                }
            }
            ("network", "create") if attrs.get("type").map(String::as_str) == Some(DRIVER) => {
                if let Some(name) = attrs.get("name") {
                    self.name_network(id, name).await;
                }
            }
            ("container", "start") => self.started(id).await,
            ("container", "die") => self.died(id).await,
            ("container", "destroy") => self.destroyed(id).await,
            _ => {}
        }
    }

    /// After a reconnect: what the book says against what dockerd has now.
    async fn catch_up(&self) {
        let book = self.book.lock().await.clone();
        // Endpoints whose container is not known yet, and attached containers.
        for (eid, ep) in &book.endpoints {
            if ep.container.is_none() {
                if let Ok(c) = self.client().await {
                    if let Ok(Ok(n)) = tokio::time::timeout(TASK_CALL, c.inspect_network(&ep.network, None::<InspectNetworkOptions>)).await {
                        for (cid, info) in n.containers.unwrap_or_default() {
                            if info.endpoint_id.as_deref() == Some(eid.as_str()) {
                                self.learn_endpoint(&ep.network, &cid).await;
                            }
                        }
                    }
                }
            }
        }
        for (cid, a) in &book.attached {
            match self.inspect(cid, TASK_CALL).await {
                Ok(None) => self.destroyed(cid).await,
                Ok(Some(info)) => {
                    if info.pid.is_some() && info.pid != a.pid {
                        self.started(cid).await;
                    } else if info.pid.is_none() && a.pid.is_some() {
                        self.died(cid).await;
                    }
                }
                Err(e) => debug!(container = %short(cid), error = %format!("{e:#}"), "could not catch up with an attached container"),
            }
        }
        // Addresses kept for stopped containers that are gone now.
        let parked: Vec<String> = book.addresses.values().filter(|a| a.parked).filter_map(|a| a.container.clone()).collect();
        for cid in parked {
            if let Ok(None) = self.inspect(&cid, TASK_CALL).await {
                self.destroyed(&cid).await;
            }
        }
    }

    /// A container joined a weft Docker network: its endpoint, address and names.
    async fn learn_endpoint(&self, nid: &str, cid: &str) {
        let info = match self.inspect(cid, TASK_CALL).await {
            Ok(Some(i)) => i,
            Ok(None) => return,
            Err(e) => {
                warn!(container = %short(cid), error = %format!("{e:#}"), "could not learn which container joined a weft network: its name is not in weft DNS");
                return;
            }
        };
        let Some((eid, ip, aliases)) = info.endpoints.get(nid).cloned() else { return };
        {
            let mut book = self.book.lock().await;
            if let Some(ep) = book.endpoints.get_mut(&eid) {
                ep.container = Some(info.id.clone());
            }
            if let Some(a) = ip.and_then(|ip| book.addresses.get_mut(&ip)) {
                a.container = Some(info.id.clone());
            }
            self.commit(book).await;
        }
        let Some(ip) = ip else { return };
        let mut names = vec![info.name.clone()];
        names.extend(aliases.into_iter().filter(|a| !info.id.starts_with(a.as_str())));
        names.sort();
        names.dedup();
        for name in names {
            if weft_dns::relative_name(&name, &self.sh.dns.domain).is_err() {
                debug!(name, "not a DNS name; not registered");
                continue;
            }
            match self.sh.control.dns_add(dns_id(nid, &info.id), name.clone(), vec![IpAddr::V4(ip)]).await {
                Ok(fqdn) => info!(container = %info.name, name = %fqdn, address = %ip, "Docker container named in weft DNS"),
                Err(e) => warn!(container = %info.name, name, error = %e, "could not register a Docker container's name"),
            }
        }
    }

    /// A container started: one attached with `weft attach` is attached again, with the same
    /// addresses and name.
    async fn started(&self, cid: &str) {
        let Some(a) = self.book.lock().await.attached.get(cid).cloned() else { return };
        let info = match self.inspect(cid, TASK_CALL).await {
            Ok(Some(i)) => i,
            Ok(None) => return self.destroyed(cid).await,
            Err(e) => {
                warn!(container = %a.name, error = %format!("{e:#}"), "a container attached with weft attach started, but could not be inspected: not attached again");
                return;
            }
        };
        let Some(pid) = info.pid else { return };
        let req = crate::api::containers::AttachReq {
            netns: pid.to_string(),
            cidrs: a.cidrs.clone(),
            ifname: a.ifname.clone(),
            mtu: None,
            id: Some(ipam_id(cid)),
            timeout_seconds: Some(30.0),
            name: a.dns_name.clone(),
            network: a.network.clone(),
            outlives_netns: true,
            mac: a.mac.as_deref().and_then(|m| m.parse::<weft_proto::Mac>().ok()).map(|m| m.0),
        };
        match crate::api::containers::attach_netns(&self.sh, req).await {
            Ok(v) => {
                self.stats.reattached.fetch_add(1, Ordering::Relaxed);
                info!(container = %a.name, addresses = %v["addresses"], "container started again: attached again");
                let mut book = self.book.lock().await;
                if let Some(e) = book.attached.get_mut(cid) {
                    e.pid = Some(pid);
                }
                self.commit(book).await;
            }
            Err(e) => warn!(container = %a.name, error = %e.message, "could not attach a container again after it started"),
        }
    }

    /// A container stopped: an attached one keeps its addresses and name; its port went with
    /// its namespace, and the port's rules go now.
    async fn died(&self, cid: &str) {
        let mut book = self.book.lock().await;
        let Some(a) = book.attached.get_mut(cid) else { return };
        let pid = a.pid.take();
        let ifname = a.ifname.clone();
        let name = a.name.clone();
        self.commit(book).await;
        if let Some(pid) = pid {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let _ = self.sh.netdev.detach_netns(&path, &ifname).await;
            self.sh.guard.changed();
        }
        info!(container = %name, "attached container stopped: its addresses and name are kept for its next start");
    }

    /// A container was removed: everything weft kept for it goes.
    async fn destroyed(&self, cid: &str) {
        let mut book = self.book.lock().await;
        let attached = book.attached.remove(cid);
        let parked: Vec<(Ipv4Addr, String)> =
            book.addresses.iter().filter(|(_, a)| a.parked && a.container.as_deref() == Some(cid)).map(|(ip, a)| (*ip, a.id.clone())).collect();
        for (ip, _) in &parked {
            book.addresses.remove(ip);
        }
        let nets: Vec<String> = book.networks.keys().cloned().collect();
        self.commit(book).await;
        for (ip, id) in &parked {
            if let Err(e) = self.sh.control.release(id.clone(), Some(u32::from(*ip))).await {
                warn!(address = %ip, error = %e, "could not release the address of a removed container");
            }
        }
        for nid in nets {
            let _ = self.sh.control.dns_remove(dns_id(&nid, cid), None, Vec::new()).await;
        }
        if let Some(a) = attached {
            if let Some(pid) = a.pid {
                let _ = self.sh.netdev.detach_netns(&PathBuf::from(format!("/proc/{pid}/ns/net")), &a.ifname).await;
                self.sh.guard.changed();
            }
            let released = self.sh.control.release(ipam_id(cid), None).await.map(|r| r.len()).unwrap_or(0);
            let _ = self.sh.control.dns_remove(ipam_id(cid), None, Vec::new()).await;
            if let Some(n) = &a.network {
                self.sh.networks.release_if_empty(crate::control::networks::segment_of(n)).await;
            }
            info!(container = %a.name, released, "attached container removed: its addresses and name are released");
        } else if !parked.is_empty() {
            info!(container = %short(cid), released = parked.len(), "container removed: the addresses kept for it are released");
        }
    }
}

/// The first 12 characters of a Docker ID, as Docker shows them.
pub fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

/// The DNS registration ID of a container on a Docker network.
fn dns_id(nid: &str, cid: &str) -> String {
    format!("docker:{}:{}", short(nid), short(cid))
}

/// The IPAM (and DNS) ID of a container attached with `weft attach CONTAINER`.
pub fn ipam_id(cid: &str) -> String {
    format!("docker:{cid}")
}
