//! The DNS shell around `weft_dns`: the record store rides the router's
//! `dns` gossip channel; this module saves our own names (so they are
//! re-asserted after a restart), keeps the server listening on the bridge
//! address (or `--dns-listen`), writes resolv.conf for named namespaces, and
//! serves the `/v1/dns...` API.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};
use weft_dns::{DnsConfig, Records, Registration, ServerHandle, ZoneView};
use weft_proto::PeerName;

use crate::daemon::{Actor, Shared};

/// The file our own names are saved in.
pub const STATE_FILE: &str = "dns.json";
/// Container ID for names added with `weft dns-add` without one.
pub const EXTERN_ID: &str = "weft:extern";
/// First line of the resolv.conf files weft writes (and may remove).
const RESOLV_MARK: &str = "# written by weft";
/// How often tombstones are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// DNS settings from the command line.
#[derive(Clone, Debug)]
pub struct DnsOptions {
    /// Run the server at all.
    pub enabled: bool,
    /// Where to listen; `None`: port 53 on the bridge's IPv4 addresses, once it has one.
    pub listen: Option<Vec<SocketAddr>>,
    /// The zone.
    pub domain: String,
    /// TTL of answers, seconds.
    pub ttl: u32,
    /// Upstream resolvers; `None`: the host's /etc/resolv.conf.
    pub upstreams: Option<Vec<SocketAddr>>,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            enabled: true,
            listen: None,
            domain: weft_dns::server::DEFAULT_DOMAIN.into(),
            ttl: weft_dns::server::DEFAULT_TTL,
            upstreams: None,
        }
    }
}

/// Wall-clock milliseconds, for tombstones.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Loads our saved names and re-adds them to a fresh store: their new
/// versions outrank what the mesh holds from our previous life.
pub fn load(me: PeerName, initial_version: u64, path: &Path) -> Result<Records> {
    let mut r = Records::new(me, initial_version);
    match std::fs::read(path) {
        Ok(b) => {
            let regs: Vec<Registration> = serde_json::from_slice(&b).with_context(|| {
                format!("DNS state file {} is corrupt: fix it, or remove it (this host's names are then re-added as containers attach)", path.display())
            })?;
            for g in regs {
                r.add(&g.id, &g.name, g.addr).map_err(|e| anyhow!("DNS state file {}: {e}", path.display()))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading DNS state file {}", path.display())),
    }
    Ok(r)
}

/// What the actor keeps for DNS besides the store.
pub(crate) struct DnsShell {
    path: PathBuf,
    next_expire: Instant,
}

impl DnsShell {
    pub(crate) fn new(path: PathBuf, now: Instant) -> Self {
        DnsShell { path, next_expire: now + EXPIRE_EVERY }
    }
}

impl Actor {
    pub(crate) fn dns(&mut self) -> &mut Records {
        self.core.channel_mut::<Records>(weft_dns::CHANNEL).expect("the dns channel is registered at start")
    }

    /// Saves our names if they changed, then sends the store's messages.
    pub(crate) fn flush_dns(&mut self) {
        let r = self.dns();
        let save = r.take_dirty().then(|| r.own());
        let mut outs = Vec::new();
        while let Some(o) = r.poll_output() {
            outs.push(o);
        }
        if let Some(own) = save {
            let res = serde_json::to_vec(&own)
                .map_err(anyhow::Error::from)
                .and_then(|b| crate::identity::write_atomic(&self.dns_shell.path, &b));
            if let Err(e) = res {
                warn!(file = %self.dns_shell.path.display(), error = %format!("{e:#}"), "could not save DNS names");
            }
        }
        for o in outs {
            match o {
                weft_dns::Output::Broadcast(p) => self.core.broadcast(weft_dns::CHANNEL, p),
                weft_dns::Output::Unicast(to, p) => {
                    self.core.send_unicast(to, weft_dns::CHANNEL, p);
                }
            }
        }
    }

    /// Entries of peers gone from the topology go; returning ones come back.
    pub(crate) fn dns_sync_origins(&mut self) {
        let live: BTreeSet<PeerName> = self.core.topology().peers().map(|p| p.name).collect();
        self.dns().sync_origins(now_ms(), |p| live.contains(&p));
    }

    pub(crate) fn dns_tick(&mut self) {
        self.dns_sync_origins();
        let now = Instant::now();
        if now >= self.dns_shell.next_expire {
            self.dns_shell.next_expire = now + EXPIRE_EVERY;
            self.dns().expire_tombstones(now_ms(), weft_dns::records::DEFAULT_TOMBSTONE_TTL);
        }
        let c = self.dns().counts();
        if let Ok(mut m) = self.shared.ctl.dns_entries.lock() {
            *m = c;
        }
    }

    /// Registers `name` for container `id` at each address.
    pub(crate) fn dns_add(&mut self, id: &str, name: &str, addrs: &[IpAddr]) -> Result<String, String> {
        let domain = self.shared.opts.dns.domain.clone();
        let rel = weft_dns::relative_name(name, &domain).map_err(|e| e.to_string())?;
        for a in addrs {
            if let Some(delta) = self.dns().add(id, &rel, *a).map_err(|e| e.to_string())? {
                self.core.broadcast(weft_dns::CHANNEL, delta);
            }
        }
        self.drain();
        Ok(format!("{rel}.{}", domain.trim_end_matches('.')))
    }

    /// Removes names of container `id` (all, or by name and/or address).
    pub(crate) fn dns_remove(&mut self, id: &str, name: Option<&str>, addr: Option<IpAddr>) -> bool {
        let domain = self.shared.opts.dns.domain.clone();
        let rel = name.map(|n| weft_dns::relative_name(n, &domain).unwrap_or_else(|_| n.to_ascii_lowercase()));
        let delta = self.dns().remove(now_ms(), id, rel.as_deref(), addr);
        let removed = delta.is_some();
        if let Some(d) = delta {
            self.core.broadcast(weft_dns::CHANNEL, d);
        }
        self.drain();
        removed
    }

    /// DNS part of the status document.
    pub(crate) fn dns_status(&mut self) -> Value {
        let o = &self.shared.opts.dns;
        let (enabled, domain, ttl, upstreams) = (o.enabled, o.domain.clone(), o.ttl, o.upstreams.clone());
        let listening: Vec<String> = self
            .shared
            .dns_server
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|h| h.udp_addrs().iter().map(|a| a.to_string()).collect()))
            .unwrap_or_default();
        let stats = self.shared.ctl.dns.snapshot();
        let r = self.dns();
        let entries: Vec<Value> = r
            .entries()
            .into_iter()
            .filter(|e| e.is_live())
            .map(|e| json!({"name": format!("{}.{}", e.name, domain.trim_end_matches('.')), "address": e.addr.to_string(),
                "id": e.id, "origin": e.origin.to_string()}))
            .collect();
        json!({
            "enabled": enabled, "domain": domain, "ttl": ttl, "listening": listening,
            "upstreams": upstreams.map(|u| u.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            "counts": r.counts(), "queries": stats, "entries": entries,
        })
    }
}

/// Keeps the server listening where it should: `--dns-listen`, or port 53 on
/// the bridge's IPv4 addresses (re-checked every second, and at once when the
/// router adds one: an address added by `weft expose` or by hand is picked up,
/// one removed is dropped).
pub(crate) async fn keep_serving(sh: Arc<Shared>, view: ZoneView) {
    let o = sh.opts.dns.clone();
    let mut last_error = String::new();
    let mut current: Vec<SocketAddr> = Vec::new();
    loop {
        let want = match &o.listen {
            Some(l) => l.clone(),
            None => match sh.netdev.addresses(&sh.opts.bridge).await {
                Ok(a) => a.into_iter().filter(|(ip, _)| ip.is_ipv4()).map(|(ip, _)| SocketAddr::new(ip, 53)).collect(),
                Err(_) => Vec::new(),
            },
        };
        if want != current {
            if let Ok(mut g) = sh.dns_server.lock() {
                *g = None;
            }
            current = Vec::new();
            if !want.is_empty() {
                let mut cfg = DnsConfig::new(want.clone());
                cfg.domain = o.domain.clone();
                cfg.ttl = o.ttl;
                cfg.upstreams = o.upstreams.clone();
                cfg.reverse_ranges = vec![(IpAddr::V4(sh.ipam_range.addr.into()), sh.ipam_range.prefix)];
                match weft_dns::serve(cfg, view.clone(), sh.ctl.dns.clone()).await {
                    Ok(h) => {
                        info!(listen = ?h.udp_addrs(), domain = %o.domain, "DNS server listening");
                        set_server(&sh, h);
                        current = want;
                        last_error.clear();
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_error {
                            warn!(error = %msg, "DNS server not started; retrying every second");
                            last_error = msg;
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), sh.dns_recheck.notified()).await;
    }
}

fn set_server(sh: &Shared, h: ServerHandle) {
    if let Ok(mut g) = sh.dns_server.lock() {
        *g = Some(h);
    }
}

/// The name server containers should use: the first listen address.
pub(crate) fn nameserver(sh: &Shared) -> Option<IpAddr> {
    sh.dns_server.lock().ok().and_then(|g| g.as_ref().and_then(|h| h.udp_addrs().first().map(SocketAddr::ip)))
}

/// Writes `/etc/netns/NAME/resolv.conf` (what `ip netns exec NAME` shows as
/// /etc/resolv.conf) pointing at weft DNS, unless someone else wrote one.
pub(crate) fn write_resolv_conf(netns_name: &str, server: IpAddr, domain: &str) -> Result<bool> {
    let dir = Path::new("/etc/netns").join(netns_name);
    let file = dir.join("resolv.conf");
    if let Ok(old) = std::fs::read_to_string(&file) {
        if !old.starts_with(RESOLV_MARK) {
            return Ok(false);
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let body = format!(
        "{RESOLV_MARK}: names under {d} come from weft DNS, the rest is forwarded to the host's resolvers\nnameserver {server}\nsearch {d}\n",
        d = domain.trim_end_matches('.')
    );
    crate::identity::write_atomic(&file, body.as_bytes())?;
    Ok(true)
}

/// Removes a resolv.conf weft wrote for a named namespace.
pub(crate) fn remove_resolv_conf(netns_name: &str) {
    let dir = Path::new("/etc/netns").join(netns_name);
    let file = dir.join("resolv.conf");
    if std::fs::read_to_string(&file).is_ok_and(|s| s.starts_with(RESOLV_MARK)) {
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(&dir);
    }
}

use crate::api::{bad, ApiError as DnsError};

fn gone() -> DnsError {
    DnsError(StatusCode::SERVICE_UNAVAILABLE, "the router is stopping".into())
}

type DnsResult = Result<Json<Value>, DnsError>;

/// The `/v1/dns...` routes.
pub(crate) fn routes() -> axum::Router<Arc<Shared>> {
    axum::Router::new()
        .route("/v1/dns", get(status))
        .route("/v1/dns/add", post(add))
        .route("/v1/dns/remove", post(remove))
        .route("/v1/dns/lookup", get(lookup))
}

async fn status(State(sh): State<Arc<Shared>>) -> DnsResult {
    sh.call(|a| a.dns_status()).await.map(Json).map_err(|_| gone())
}

fn parse_ips(list: &[String]) -> Result<Vec<IpAddr>, DnsError> {
    list.iter().map(|s| s.parse::<IpAddr>().map_err(|_| bad(format!("{s:?} is not an IP address")))).collect()
}

#[derive(Deserialize)]
struct AddReq {
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
    id: Option<String>,
}

async fn add(State(sh): State<Arc<Shared>>, Json(req): Json<AddReq>) -> DnsResult {
    let addrs = parse_ips(&req.addresses)?;
    if addrs.is_empty() {
        return Err(bad("give at least one address for the name"));
    }
    let id = req.id.unwrap_or_else(|| EXTERN_ID.into());
    let (id2, name, a2) = (id.clone(), req.name.clone(), addrs.clone());
    let fqdn = sh.call(move |a| a.dns_add(&id2, &name, &a2)).await.map_err(|_| gone())?.map_err(bad)?;
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

async fn remove(State(sh): State<Arc<Shared>>, Json(req): Json<RemoveReq>) -> DnsResult {
    let addrs = parse_ips(&req.addresses)?;
    if req.name.is_none() && req.id.is_none() && addrs.is_empty() {
        return Err(bad("say what to remove: a name, addresses, or a container ID"));
    }
    let id = req.id.clone().unwrap_or_else(|| EXTERN_ID.into());
    let name = req.name.clone();
    let removed = sh
        .call(move |a| {
            if addrs.is_empty() {
                a.dns_remove(&id, name.as_deref(), None)
            } else {
                // Every address, not only up to the first that matched.
                let mut any = false;
                for ip in &addrs {
                    any |= a.dns_remove(&id, name.as_deref(), Some(*ip));
                }
                any
            }
        })
        .await
        .map_err(|_| gone())?;
    if !removed {
        return Err(DnsError(StatusCode::NOT_FOUND, "no such name here (only names added on this host can be removed here)".into()));
    }
    Ok(Json(json!({ "removed": true })))
}

#[derive(Deserialize)]
struct NameQuery {
    name: String,
}

async fn lookup(State(sh): State<Arc<Shared>>, Query(q): Query<NameQuery>) -> DnsResult {
    let domain = sh.opts.dns.domain.clone();
    let rel = weft_dns::relative_name(&q.name, &domain).map_err(|e| bad(e.to_string()))?;
    let r2 = rel.clone();
    let addrs = sh.call(move |a| a.dns().lookup(&r2)).await.map_err(|_| gone())?;
    if addrs.is_empty() {
        return Err(DnsError(StatusCode::NOT_FOUND, format!("{rel}.{} is not known", domain.trim_end_matches('.'))));
    }
    Ok(Json(json!({ "name": format!("{rel}.{}", domain.trim_end_matches('.')), "addresses": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>() })))
}

