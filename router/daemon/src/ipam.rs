//! The IPAM shell around `weft_ipam`: loads and saves the allocator's state,
//! carries its messages over the router's `ipam` gossip channel, answers API
//! callers, and releases the addresses of containers whose namespace is gone.
//!
//! Ordering rule (see `weft_ipam::alloc`): after every round of inputs the
//! state is saved, crash-safely, *before* the round's outputs (gossip, donor
//! replies, API answers) leave this process.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{error, info, warn};
use weft_ipam::{Allocation, Cidr, Config, Failure, FailureKind, Init, Ipam, NetnsRef, Output, State as IpamState, Want};
use weft_proto::PeerName;

use crate::daemon::{Actor, Shared};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "ipam.json";
/// Container ID the host's own address (`weft expose`) is allocated under.
pub const EXPOSE_ID: &str = "weft:expose";
/// How often namespaces of allocations are checked.
const GC_EVERY: Duration = Duration::from_secs(5);

/// IPAM settings from the command line.
#[derive(Clone, Debug)]
pub struct IpamOptions {
    /// The range shared by the mesh.
    pub range: Cidr,
    /// Subnet for requests that name none (the range when `None`).
    pub default_subnet: Option<Cidr>,
    /// `consensus[=N]`, `seed=NAME,...` or `observer`.
    pub init: String,
    /// How long a namespace must be gone before its addresses are released.
    pub gc_grace: Duration,
}

impl Default for IpamOptions {
    fn default() -> Self {
        IpamOptions {
            range: Cidr { addr: u32::from(Ipv4Addr::new(10, 32, 0, 0)), prefix: 12 },
            default_subnet: None,
            init: "consensus".into(),
            gc_grace: Duration::from_secs(60),
        }
    }
}

/// Parses `--ipalloc-init`. Plain `consensus` counts this peer and the peers
/// given on the command line, as Weave did.
pub fn parse_init(s: &str, peers_given: usize) -> Result<Init> {
    if s == "consensus" {
        return Ok(Init::Consensus(peers_given + 1));
    }
    if s == "observer" {
        return Ok(Init::Observer);
    }
    if let Some(n) = s.strip_prefix("consensus=") {
        let n: usize = n.parse().map_err(|_| anyhow!("--ipalloc-init {s}: {n:?} is not a number of peers"))?;
        if n == 0 {
            bail!("--ipalloc-init {s}: the number of peers must be at least 1");
        }
        return Ok(Init::Consensus(n));
    }
    if let Some(list) = s.strip_prefix("seed=") {
        let names = list
            .split(',')
            .map(|n| n.trim().parse::<PeerName>().map_err(|e| anyhow!("--ipalloc-init {s}: {n:?} is not a peer name: {e}")))
            .collect::<Result<Vec<_>>>()?;
        if names.is_empty() {
            bail!("--ipalloc-init seed= needs at least one peer name");
        }
        return Ok(Init::Seeds(names));
    }
    bail!("--ipalloc-init {s:?}: expected consensus, consensus=N, seed=NAME,... or observer")
}

/// Loads the allocator from `path`, or starts empty when there is no file.
/// A file that is present but unreadable, corrupt or at odds with the
/// configuration stops the start: starting empty would hand out addresses
/// this host's containers still hold.
pub fn load(cfg: Config, path: &Path, now: Instant) -> Result<Ipam> {
    let advice = "the router will not start without it, so that no address is handed out twice; fix the file, \
        or move it away only if no container on this host still uses a weft address";
    match std::fs::read(path) {
        Ok(bytes) => {
            let st: IpamState = serde_json::from_slice(&bytes)
                .with_context(|| format!("IPAM state file {} is corrupt; {advice}", path.display()))?;
            Ipam::restore(cfg, st, now).map_err(|e| anyhow!("IPAM state file {}: {e}; {advice}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ipam::new(cfg, now)),
        Err(e) => Err(e).with_context(|| format!("reading IPAM state file {}", path.display())),
    }
}

type Waiter = oneshot::Sender<Result<Allocation, Failure>>;

/// What the actor keeps for IPAM besides the allocator (which lives in the
/// router core as the `ipam` channel).
pub(crate) struct IpamShell {
    path: PathBuf,
    waiters: HashMap<u64, Waiter>,
    next_req: u64,
    gone_since: HashMap<u32, Instant>,
    grace: Duration,
    next_gc: Instant,
    /// Failed saves (also logged).
    pub(crate) save_errors: u64,
    /// Set once this peer has left (`weft reset`): nothing is saved any more.
    left: bool,
}

impl IpamShell {
    pub(crate) fn new(path: PathBuf, grace: Duration, now: Instant) -> Self {
        IpamShell { path, waiters: HashMap::new(), next_req: 1, gone_since: HashMap::new(), grace, next_gc: now + GC_EVERY, save_errors: 0, left: false }
    }

    /// The state file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Actor {
    pub(crate) fn ipam(&mut self) -> &mut Ipam {
        // Registered at start and never removed.
        self.core.channel_mut::<Ipam>(weft_ipam::CHANNEL).expect("the ipam channel is registered at start")
    }

    /// Saves the allocator if it changed, then carries out its outputs
    /// (`drain` sends what they hand to the core).
    pub(crate) fn flush_ipam(&mut self) {
        let mut outs = Vec::new();
        let ipam = self.ipam();
        let save = ipam.take_dirty().then(|| ipam.state());
        while let Some(o) = ipam.poll_output() {
            outs.push(o);
        }
        if let Some(st) = save.filter(|_| !self.ipam_shell.left) {
            let r = serde_json::to_vec(&st)
                .map_err(anyhow::Error::from)
                .and_then(|b| crate::identity::write_atomic(&self.ipam_shell.path, &b));
            if let Err(e) = r {
                self.ipam_shell.save_errors += 1;
                error!(file = %self.ipam_shell.path.display(), error = %format!("{e:#}"), "could not save IPAM state");
            }
        }
        for o in outs {
            match o {
                Output::Broadcast(p) => self.core.broadcast(weft_ipam::CHANNEL, p),
                Output::Unicast(to, p) => {
                    // Unreachable: the allocator's own time-outs handle it.
                    self.core.send_unicast(to, weft_ipam::CHANNEL, p);
                }
                Output::Done { req, result } => {
                    if let Some(w) = self.ipam_shell.waiters.remove(&req) {
                        let _ = w.send(result);
                    }
                }
            }
        }
    }

    /// The peers reachable now, for donation.
    pub(crate) fn ipam_routes_changed(&mut self) {
        let reachable: BTreeSet<PeerName> = self.core.routes().unicast.keys().copied().collect();
        self.ipam().set_reachable(Instant::now(), reachable);
    }

    /// Once a second: the allocator's timers and the clean-up of addresses
    /// whose container namespace is gone.
    pub(crate) fn ipam_tick(&mut self) {
        let now = Instant::now();
        self.ipam().tick(now);
        let save_errors = self.ipam_shell.save_errors;
        let ipam = self.ipam();
        let st = ipam.status();
        let me = st.peers.iter().find(|p| p.me);
        let figures = crate::metrics::IpamMetrics {
            allocations: st.allocated as u64,
            owned: me.map_or(0, |p| p.owned),
            free: me.map_or(0, |p| p.free),
            unreachable: st.unreachable_addresses,
            pending: st.pending as u64,
            allocated_total: ipam.stats().allocated,
            released_total: ipam.stats().released,
            failed_total: ipam.stats().failed,
            donated_total: ipam.stats().donated,
            received_total: ipam.stats().received,
            refused_rings_total: ipam.stats().refused_rings,
            save_errors_total: save_errors,
        };
        if let Ok(mut m) = self.shared.ctl.ipam.lock() {
            *m = figures;
        }
        if now < self.ipam_shell.next_gc {
            return;
        }
        self.ipam_shell.next_gc = now + GC_EVERY;
        let held: Vec<(u32, String, NetnsRef)> =
            self.ipam().allocations().filter_map(|a| a.netns.clone().map(|n| (a.addr, a.id.clone(), n))).collect();
        let mut still_gone = HashMap::new();
        for (addr, id, ns) in held {
            let alive = std::fs::metadata(&ns.path).map(|m| m.ino() == ns.inode).unwrap_or(false);
            if alive {
                continue;
            }
            let since = self.ipam_shell.gone_since.get(&addr).copied().unwrap_or(now);
            if now.duration_since(since) >= self.ipam_shell.grace {
                let gone = self.ipam().release(&id, Some(addr));
                if self.ipam().lookup(&id).is_empty() {
                    self.dns_remove(&id, None, None);
                }
                for a in gone {
                    info!(container = %a.id, address = %a.cidr(), netns = %ns.path, grace = ?self.ipam_shell.grace,
                        "released the address of a container whose network namespace is gone");
                }
            } else {
                still_gone.insert(addr, since);
            }
        }
        self.ipam_shell.gone_since = still_gone;
    }

    /// Starts a request; the answer arrives on `tx`.
    fn ipam_request(&mut self, id: String, want: Want, netns: Option<NetnsRef>, tx: Waiter) -> u64 {
        let req = self.ipam_shell.next_req;
        self.ipam_shell.next_req += 1;
        self.ipam_shell.waiters.insert(req, tx);
        self.ipam().allocate(Instant::now(), req, &id, want, netns);
        self.drain();
        req
    }

    /// IPAM part of the status document.
    pub(crate) fn ipam_status(&mut self) -> Value {
        let nicks: HashMap<String, String> =
            self.core.topology().peers().map(|p| (p.name.to_string(), p.nickname.clone())).collect();
        let save_errors = self.ipam_shell.save_errors;
        let file = self.ipam_shell.path.display().to_string();
        let ipam = self.ipam();
        let mut v = serde_json::to_value(ipam.status()).unwrap_or_default();
        if let Some(peers) = v["peers"].as_array_mut() {
            for p in peers {
                let nick = p["peer"].as_str().and_then(|n| nicks.get(n)).cloned();
                p["nickname"] = json!(nick);
            }
        }
        v["stats"] = serde_json::to_value(ipam.stats()).unwrap_or_default();
        v["state_file"] = json!(file);
        v["save_errors"] = json!(save_errors);
        v
    }
}

/// Turns the API's request fields into what to ask the allocator for.
/// `address` may carry a prefix (`10.32.0.5/12`) or not (the prefix is then
/// the default subnet's when it holds the address, else the range's).
pub(crate) fn want(sh: &Shared, subnet: Option<&str>, address: Option<&str>) -> Result<Want, String> {
    let range = sh.ipam_range;
    let default = sh.ipam_default_subnet;
    match (subnet, address) {
        (Some(_), Some(_)) => Err("give a subnet or an address, not both".into()),
        (Some(s), None) => Ok(Want::Any(s.parse::<Cidr>()?)),
        (None, None) => Ok(Want::Any(default)),
        (None, Some(a)) => {
            let (ip, prefix) = match a.split_once('/') {
                Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| format!("{p:?} is not a prefix length"))?)),
                None => (a, None),
            };
            let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
            let ip = u32::from(ip);
            let subnet = match prefix {
                Some(p) => Cidr::new(ip, p)?,
                None if default.contains(ip) => default,
                None => range,
            };
            Ok(Want::Addr(ip, subnet))
        }
    }
}

/// The namespace behind a path, for later clean-up.
pub(crate) fn netns_ref(path: &Path) -> Result<NetnsRef, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("network namespace {}: {e}", path.display()))?;
    Ok(NetnsRef { path: path.display().to_string(), inode: m.ino() })
}

/// Asks for an address and waits up to `timeout` for it.
pub(crate) async fn allocate(
    sh: &Arc<Shared>,
    id: String,
    want: Want,
    netns: Option<NetnsRef>,
    timeout: Duration,
) -> Result<Allocation, Failure> {
    let (tx, mut rx) = oneshot::channel();
    let stopping = || Failure { kind: FailureKind::Timeout, message: "the router is stopping".into() };
    let req = sh.call(move |a| a.ipam_request(id, want, netns, tx)).await.map_err(|_| stopping())?;
    match tokio::time::timeout(timeout, &mut rx).await {
        Ok(r) => r.unwrap_or_else(|_| Err(stopping())),
        Err(_) => {
            let why = format!("no address after {}s", timeout.as_secs_f64());
            let _ = sh
                .call(move |a| {
                    a.ipam().cancel(req, &why);
                    a.drain();
                })
                .await;
            rx.await.unwrap_or_else(|_| Err(stopping()))
        }
    }
}

/// Releases a container's addresses (or one of them).
pub(crate) async fn release(sh: &Arc<Shared>, id: String, addr: Option<u32>) -> Result<Vec<Allocation>> {
    sh.call(move |a| {
        let r = a.ipam().release(&id, addr);
        a.drain();
        r
    })
    .await
}

/// Releases the addresses given to a namespace (matched by its inode).
pub(crate) async fn release_netns(sh: &Arc<Shared>, inode: u64) -> Result<Vec<Allocation>> {
    sh.call(move |a| {
        let held: Vec<(String, u32)> = a
            .ipam()
            .allocations()
            .filter(|x| x.netns.as_ref().is_some_and(|n| n.inode == inode))
            .map(|x| (x.id.clone(), x.addr))
            .collect();
        let mut out = Vec::new();
        for (id, addr) in held {
            out.extend(a.ipam().release(&id, Some(addr)));
        }
        a.drain();
        out
    })
    .await
}

/// An IPAM failure as an HTTP answer: 400 for a bad request, 409 when the
/// address is taken or the range is full, 503 when waiting longer or
/// reconnecting a peer may help.
pub(crate) struct IpamError(pub(crate) Failure);

impl IntoResponse for IpamError {
    fn into_response(self) -> Response {
        let code = match self.0.kind {
            FailureKind::Invalid => StatusCode::BAD_REQUEST,
            FailureKind::InUse | FailureKind::Exhausted => StatusCode::CONFLICT,
            FailureKind::Unreachable | FailureKind::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        };
        (code, Json(json!({ "error": self.0.message, "kind": self.0.kind }))).into_response()
    }
}

fn invalid(msg: impl Into<String>) -> IpamError {
    IpamError(Failure { kind: FailureKind::Invalid, message: msg.into() })
}

fn gone() -> IpamError {
    IpamError(Failure { kind: FailureKind::Timeout, message: "the router is stopping".into() })
}

/// JSON for one allocation.
pub(crate) fn allocation_json(a: &Allocation) -> Value {
    json!({
        "id": a.id, "address": a.cidr(), "ip": Ipv4Addr::from(a.addr).to_string(), "prefix": a.subnet.prefix,
        "subnet": a.subnet.to_string(), "netns": a.netns.as_ref().map(|n| n.path.clone()),
    })
}

/// The `/v1/ipam...` routes.
pub(crate) fn routes() -> axum::Router<Arc<Shared>> {
    axum::Router::new()
        .route("/v1/ipam", get(status))
        .route("/v1/ipam/allocate", post(alloc_handler))
        .route("/v1/ipam/lookup", get(lookup))
        .route("/v1/ipam/release", post(release_handler))
        .route("/v1/ipam/rmpeer", post(rmpeer))
        .route("/v1/ipam/reset", post(reset))
}

type IpamResult = Result<Json<Value>, IpamError>;

async fn status(State(sh): State<Arc<Shared>>) -> IpamResult {
    let v = sh
        .call(|a| {
            let mut v = a.ipam_status();
            v["allocations"] = a.ipam().allocations().map(allocation_json).collect();
            v
        })
        .await
        .map_err(|_| gone())?;
    Ok(Json(v))
}

#[derive(Deserialize)]
struct AllocReq {
    id: String,
    subnet: Option<String>,
    address: Option<String>,
    netns: Option<String>,
    timeout_seconds: Option<f64>,
}

/// Longest an API caller may ask to wait.
const MAX_WAIT: f64 = 600.0;

pub(crate) fn wait_time(secs: Option<f64>) -> Result<Duration, IpamError> {
    let s = secs.unwrap_or(30.0);
    if !(0.0..=MAX_WAIT).contains(&s) {
        return Err(invalid(format!("timeout_seconds must be between 0 and {MAX_WAIT}")));
    }
    Ok(Duration::from_secs_f64(s))
}

async fn alloc_handler(State(sh): State<Arc<Shared>>, Json(req): Json<AllocReq>) -> IpamResult {
    let want = want(&sh, req.subnet.as_deref(), req.address.as_deref()).map_err(invalid)?;
    let netns = match &req.netns {
        Some(n) => Some(netns_ref(&crate::api::netns_path(n)).map_err(invalid)?),
        None => None,
    };
    let timeout = wait_time(req.timeout_seconds)?;
    let a = allocate(&sh, req.id, want, netns, timeout).await.map_err(IpamError)?;
    info!(container = %a.id, address = %a.cidr(), "allocated");
    Ok(Json(allocation_json(&a)))
}

#[derive(Deserialize)]
struct IdQuery {
    id: String,
}

async fn lookup(State(sh): State<Arc<Shared>>, Query(q): Query<IdQuery>) -> IpamResult {
    let id = q.id.clone();
    let held = sh.call(move |a| a.ipam().lookup(&id)).await.map_err(|_| gone())?;
    if held.is_empty() {
        return Err(IpamError(Failure { kind: FailureKind::Invalid, message: format!("container {} holds no address here", q.id) }));
    }
    Ok(Json(json!({ "id": q.id, "addresses": held.iter().map(allocation_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct ReleaseReq {
    id: String,
    address: Option<String>,
}

async fn release_handler(State(sh): State<Arc<Shared>>, Json(req): Json<ReleaseReq>) -> IpamResult {
    let addr = match &req.address {
        Some(a) => {
            let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
            Some(u32::from(ip.parse::<Ipv4Addr>().map_err(|_| invalid(format!("{a:?} is not an IPv4 address")))?))
        }
        None => None,
    };
    let gone_list = release(&sh, req.id.clone(), addr).await.map_err(|_| gone())?;
    for a in &gone_list {
        info!(container = %a.id, address = %a.cidr(), "released");
    }
    Ok(Json(json!({ "id": req.id, "released": gone_list.iter().map(allocation_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
struct RmpeerReq {
    peer: String,
    #[serde(default)]
    force: bool,
}

async fn rmpeer(State(sh): State<Arc<Shared>>, Json(req): Json<RmpeerReq>) -> IpamResult {
    let r = sh
        .call(move |a| -> Result<Value, String> {
            // By name, or by nickname when it is unique.
            let name = match req.peer.parse::<PeerName>() {
                Ok(n) => n,
                Err(_) => {
                    let m: Vec<PeerName> =
                        a.core.topology().peers().filter(|p| p.nickname == req.peer).map(|p| p.name).collect();
                    match m.as_slice() {
                        [n] => *n,
                        [] => return Err(format!("no peer named or nicknamed {:?} (see `weft status ipam`)", req.peer)),
                        _ => return Err(format!("nickname {:?} is not unique; give the peer name", req.peer)),
                    }
                }
            };
            let reachable = a.core.routes().next_hop(name).is_some();
            if reachable && !req.force {
                return Err(format!(
                    "peer {name} is reachable right now, so it is alive: taking its space would let two peers hand out \
                     the same addresses. Stop it (or `weft reset` it) first; --force overrides"
                ));
            }
            let known = a.core.topology().get(name).is_some();
            let taken = a.ipam().rmpeer(Instant::now(), name)?;
            a.drain();
            let warning = if reachable {
                Some(format!("{name} was reachable and may still be handing out addresses"))
            } else if known {
                Some(format!("{name} is still in the topology (it was seen recently): if it comes back with its state, its space will be claimed twice"))
            } else {
                None
            };
            warn!(peer = %name, addresses = taken, "took over a removed peer's space");
            Ok(json!({ "peer": name.to_string(), "taken": taken, "warning": warning }))
        })
        .await
        .map_err(|_| gone())?;
    r.map(Json).map_err(invalid)
}

#[derive(Deserialize)]
struct ResetReq {
    #[serde(default)]
    force: bool,
}

async fn reset(State(sh): State<Arc<Shared>>, Json(req): Json<ResetReq>) -> IpamResult {
    let r = sh
        .call(move |a| -> Result<Value, String> {
            let held = a.ipam().allocations().count();
            if held > 0 && !req.force {
                return Err(format!(
                    "{held} address(es) are still held by containers on this host (see `weft ps`): detach them first, \
                     or pass --force to hand their addresses over too"
                ));
            }
            let to = a.ipam().leave(Instant::now())?;
            a.drain();
            // The ring that hands our space over is on its way; from now on
            // nothing is saved, and the next start begins with no IPAM state.
            a.ipam_shell.left = true;
            let path = a.ipam_shell.path().to_path_buf();
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(file = %path.display(), error = %e, "could not remove the IPAM state file");
            }
            Ok(match to {
                Some((p, n)) => json!({ "handed_to": p.to_string(), "addresses": n }),
                None => json!({ "handed_to": null, "addresses": 0 }),
            })
        })
        .await
        .map_err(|_| gone())?;
    let v = r.map_err(invalid)?;
    info!(result = %v, "left the mesh's address range; stopping");
    // Give the control connections a moment to carry the ring out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sh.shutdown.notify_one();
    Ok(Json(v))
}
