//! The IPAM service: the allocator (`weft_ipam::Ipam`, a gossip channel of the router core
//! behind a [`Gated`]) and what the shell keeps beside it: API callers waiting for addresses,
//! the clean-up of addresses whose container namespace is gone, and leaving (`weft reset`).
//!
//! The actor drives it: [`IpamService::handle`] for requests, [`IpamService::flush`] after every
//! round of inputs, [`IpamService::saved`] when a save finished, [`IpamService::tick`] once a
//! second and [`IpamService::handle_timeout`] at [`IpamService::poll_timeout`].

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{info, warn};
use weft_ipam::{Allocation, Cidr, Config, Failure, FailureKind, Init, Ipam, NetnsRef, Output, State as IpamState, Want};
use weft_proto::{PeerName, Router};

use super::persist::{Deferred, Durable, Gated, Pending, Released, SaveDone, SaveError, Writer};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "ipam.json";
/// Container ID the host's own address (`weft expose`) is allocated under.
pub const EXPOSE_ID: &str = "weft:expose";
/// How often namespaces of allocations are checked.
const GC_EVERY: Duration = Duration::from_secs(5);
/// How long `weft reset` waits for the receiving peer to confirm the hand-over.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

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

impl Durable for Ipam {
    type Output = Output;
    fn take_dirty(&mut self) -> bool {
        Ipam::take_dirty(self)
    }
    fn is_dirty(&self) -> bool {
        Ipam::is_dirty(self)
    }
    fn save_bytes(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.state()).map_err(|e| format!("encoding the IPAM state: {e}"))
    }
    fn poll_output(&mut self) -> Option<Output> {
        Ipam::poll_output(self)
    }
}

/// Turns an API request's fields into what to ask the allocator for.
/// `address` may carry a prefix (`10.32.0.5/12`) or not (the prefix is then
/// the default subnet's when it holds the address, else the range's).
pub fn want(range: Cidr, default: Cidr, subnet: Option<&str>, address: Option<&str>) -> Result<Want, String> {
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

/// Why an IPAM request failed.
#[derive(Debug, Clone)]
pub enum IpamError {
    /// The allocator refused or could not serve it (the kind says why).
    Refused(Failure),
    /// Its result could not be saved.
    Save(SaveError),
}

impl From<SaveError> for IpamError {
    fn from(e: SaveError) -> Self {
        IpamError::Save(e)
    }
}

impl std::fmt::Display for IpamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IpamError::Refused(x) => f.write_str(&x.message),
            IpamError::Save(e) => e.fmt(f),
        }
    }
}

/// A request the allocator refuses as wrong.
pub fn invalid(message: impl Into<String>) -> IpamError {
    IpamError::Refused(Failure { kind: FailureKind::Invalid, message: message.into() })
}

/// A reply to an API caller.
pub type Reply<T> = oneshot::Sender<Result<T, IpamError>>;

/// What `weft reset` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetOutcome {
    /// Who got our space (`None`: we owned none).
    pub handed_to: Option<PeerName>,
    /// How many addresses.
    pub addresses: u64,
    /// Whether the receiving peer confirmed that our space is on its disk.
    pub acknowledged: bool,
}

/// Requests from the API.
pub enum IpamRequest {
    /// An address for container `id`, answered when served, refused, or after `timeout`.
    Allocate { id: String, want: Want, netns: Option<NetnsRef>, timeout: Duration, reply: Reply<Allocation> },
    /// The addresses container `id` holds.
    Lookup { id: String, reply: oneshot::Sender<Vec<Allocation>> },
    /// Every allocation of this host.
    Allocations { reply: oneshot::Sender<Vec<Allocation>> },
    /// Releases container `id`'s addresses (or one of them).
    Release { id: String, addr: Option<u32>, reply: Reply<Vec<Allocation>> },
    /// Releases the addresses given to a namespace (by inode).
    ReleaseNetns { inode: u64, reply: Reply<Vec<Allocation>> },
    /// The status document (with the allocations when asked).
    Status { allocations: bool, reply: oneshot::Sender<Value> },
    /// Takes over a gone peer's space.
    Rmpeer { peer: String, force: bool, reply: Reply<Value> },
    /// Hands our space to another peer and forgets the state.
    Reset { force: bool, reply: Reply<ResetOutcome> },
    /// Starts consensus if nothing has yet; answers (ready, state in words).
    Prime { reply: oneshot::Sender<(bool, String)> },
}

struct Waiter {
    reply: Reply<Allocation>,
    /// When to give up (`None` once cancelled).
    deadline: Option<Instant>,
    timeout: Duration,
}

enum Reset {
    /// Waiting for a save in flight to finish before removing the file.
    Waiting { reply: Reply<ResetOutcome> },
    /// The file is being removed.
    Removing { reply: Reply<ResetOutcome> },
    /// The space went to `to`; waiting for its acknowledgement.
    HandingOver { reply: Reply<ResetOutcome>, to: PeerName, addresses: u64, deadline: Instant },
    /// Done: this peer holds no IPAM state any more.
    Left,
}

/// Address allocation figures for metrics, as atomics the metrics endpoint reads at scrape
/// time; [`IpamService::publish`] refreshes them.
#[derive(Debug, Default)]
pub struct IpamGauges {
    /// Addresses held by containers here.
    pub allocations: AtomicU64,
    /// Addresses of the range this peer owns.
    pub owned: AtomicU64,
    /// Of those, free.
    pub free: AtomicU64,
    /// Addresses owned by unreachable peers.
    pub unreachable: AtomicU64,
    /// Requests waiting (consensus, donation).
    pub pending: AtomicU64,
    /// Addresses given out.
    pub allocated_total: AtomicU64,
    /// Addresses released.
    pub released_total: AtomicU64,
    /// Requests that failed.
    pub failed_total: AtomicU64,
    /// Donations made to other peers.
    pub donated_total: AtomicU64,
    /// Donations received.
    pub received_total: AtomicU64,
    /// Rings from peers refused.
    pub refused_rings_total: AtomicU64,
    /// State saves that failed.
    pub save_errors_total: AtomicU64,
    /// Messages for peers dropped because their save failed.
    pub dropped_total: AtomicU64,
    /// Gossip entries dropped because they did not verify against their origin's key, by
    /// reason (in the order of [`weft_ipam::FORGED_REASONS`]).
    pub forged_total: [AtomicU64; weft_ipam::FORGED_REASONS.len()],
}

/// See the module docs.
pub struct IpamService {
    waiters: HashMap<u64, Waiter>,
    next_req: u64,
    gone_since: HashMap<u32, Instant>,
    grace: Duration,
    next_gc: Instant,
    reset: Option<Reset>,
    /// Messages for peers dropped because the save they depended on failed.
    dropped: u64,
}

/// The allocator inside the router core.
fn gated(core: &mut Router) -> &mut Gated<Ipam> {
    // Registered at start and never removed; see `register`.
    match core.channel_mut::<Gated<Ipam>>(weft_ipam::CHANNEL) {
        Some(g) => g,
        None => unreachable!("the ipam channel is registered at start"),
    }
}

impl IpamService {
    /// Registers the allocator (loaded from `gate`'s file) with the router core.
    pub fn register(core: &mut Router, ipam: Ipam, gate: super::persist::SaveGate, grace: Duration, now: Instant) -> Self {
        core.register_channel(weft_ipam::CHANNEL, Box::new(Gated::new(ipam, gate)));
        IpamService {
            waiters: HashMap::new(),
            next_req: 1,
            gone_since: HashMap::new(),
            grace,
            next_gc: now + GC_EVERY,
            reset: None,
            dropped: 0,
        }
    }

    /// Whether this peer has left the range (after `weft reset`).
    fn leaving(&self) -> bool {
        self.reset.is_some()
    }

    /// A request from the API.
    pub fn handle(&mut self, core: &mut Router, now: Instant, req: IpamRequest) {
        match req {
            IpamRequest::Allocate { id, want, netns, timeout, reply } => {
                if self.leaving() {
                    let _ = reply.send(Err(invalid("this peer is leaving the mesh's address range (weft reset)")));
                    return;
                }
                let req = self.next_req;
                self.next_req += 1;
                self.waiters.insert(req, Waiter { reply, deadline: Some(now + timeout), timeout });
                gated(core).inner_mut().allocate(now, req, &id, want, netns);
            }
            IpamRequest::Lookup { id, reply } => {
                let _ = reply.send(gated(core).inner().lookup(&id));
            }
            IpamRequest::Allocations { reply } => {
                let _ = reply.send(gated(core).inner().allocations().cloned().collect());
            }
            IpamRequest::Release { id, addr, reply } => {
                let g = gated(core);
                let gone = g.inner_mut().release(&id, addr);
                g.hold(Box::new(Deferred { tx: reply, value: gone }));
            }
            IpamRequest::ReleaseNetns { inode, reply } => {
                let g = gated(core);
                let held: Vec<(String, u32)> = g
                    .inner()
                    .allocations()
                    .filter(|x| x.netns.as_ref().is_some_and(|n| n.inode == inode))
                    .map(|x| (x.id.clone(), x.addr))
                    .collect();
                let mut gone = Vec::new();
                for (id, addr) in held {
                    gone.extend(g.inner_mut().release(&id, Some(addr)));
                }
                g.hold(Box::new(Deferred { tx: reply, value: gone }));
            }
            IpamRequest::Status { allocations, reply } => {
                let mut v = self.status(core);
                if allocations {
                    v["allocations"] = gated(core).inner().allocations().map(allocation_json).collect();
                }
                let _ = reply.send(v);
            }
            IpamRequest::Rmpeer { peer, force, reply } => match self.rmpeer(core, now, &peer, force) {
                Ok(v) => gated(core).hold(Box::new(Deferred { tx: reply, value: v })),
                Err(e) => {
                    let _ = reply.send(Err(invalid(e)));
                }
            },
            IpamRequest::Reset { force, reply } => {
                if self.leaving() {
                    let _ = reply.send(Err(invalid("a reset is already under way")));
                    return;
                }
                let g = gated(core);
                let held = g.inner().allocations().count();
                if held > 0 && !force {
                    let _ = reply.send(Err(invalid(format!(
                        "{held} address(es) are still held by containers on this host (see `weft ps`): detach them first, \
                         or pass --force to hand their addresses over too"
                    ))));
                    return;
                }
                let owns = g.inner().status().peers.iter().any(|p| p.me && p.owned > 0);
                let reachable = core.routes().unicast.keys().any(|p| *p != core.name());
                if owns && !reachable {
                    let _ = reply.send(Err(invalid(
                        "no reachable peer to hand this peer's addresses to; connect to one first",
                    )));
                    return;
                }
                self.reset = Some(Reset::Waiting { reply });
            }
            IpamRequest::Prime { reply } => {
                let ipam = gated(core).inner_mut();
                ipam.prime(now);
                let st = ipam.status();
                let _ = reply.send((st.ready, st.state));
            }
        }
    }

    fn rmpeer(&mut self, core: &mut Router, now: Instant, peer: &str, force: bool) -> Result<Value, String> {
        if self.leaving() {
            return Err("this peer is leaving the mesh's address range (weft reset)".into());
        }
        // By name, or by nickname when it is unique.
        let name = match peer.parse::<PeerName>() {
            Ok(n) => n,
            Err(_) => {
                let m: Vec<PeerName> = core.topology().peers().filter(|p| p.nickname == peer).map(|p| p.name).collect();
                match m.as_slice() {
                    [n] => *n,
                    [] => return Err(format!("no peer named or nicknamed {peer:?} (see `weft status ipam`)")),
                    _ => return Err(format!("nickname {peer:?} is not unique; give the peer name")),
                }
            }
        };
        let reachable = core.routes().next_hop(name).is_some();
        if reachable && !force {
            return Err(format!(
                "peer {name} is reachable right now, so it is alive: taking its space would let two peers hand out \
                 the same addresses. Stop it (or `weft reset` it) first; --force overrides"
            ));
        }
        let known = core.topology().get(name).is_some();
        let taken = gated(core).inner_mut().rmpeer(now, name)?;
        let warning = if reachable {
            Some(format!("{name} was reachable and may still be handing out addresses"))
        } else if known {
            Some(format!(
                "{name} is still in the topology (it was seen recently): if it comes back with its state, its space will be claimed twice"
            ))
        } else {
            None
        };
        warn!(peer = %name, addresses = taken, "took over a removed peer's space");
        Ok(json!({ "peer": name.to_string(), "taken": taken, "warning": warning }))
    }

    /// After a round of inputs: starts a save when the state changed, and carries out what may
    /// go now (see [`super::persist`]).
    pub fn flush(&mut self, core: &mut Router, now: Instant, writer: &Writer) {
        let released = gated(core).flush(now, writer);
        self.carry_out(core, released);
        if let Some(Reset::Waiting { .. }) = &self.reset {
            if !gated(core).gate().in_flight() {
                let Some(Reset::Waiting { reply }) = self.reset.take() else { return };
                match gated(core).freeze_and_remove(writer) {
                    Ok(_) => self.reset = Some(Reset::Removing { reply }),
                    Err(e) => {
                        let _ = reply.send(Err(invalid(e)));
                    }
                }
            }
        }
    }

    /// A save of `ipam.json` finished.
    pub fn saved(&mut self, core: &mut Router, now: Instant, done: &SaveDone) {
        if let Some(Reset::Removing { .. }) = &self.reset {
            let Some(Reset::Removing { reply }) = self.reset.take() else { return };
            self.removed(core, now, done, reply);
            return;
        }
        let released = gated(core).saved(done, now);
        self.carry_out(core, released);
    }

    /// The state file is gone (or could not be removed): hand the space over, or resume.
    fn removed(&mut self, core: &mut Router, now: Instant, done: &SaveDone, reply: Reply<ResetOutcome>) {
        let released = match gated(core).removed(done, "this peer left the mesh's address range") {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(IpamError::Save(e)));
                return;
            }
        };
        self.carry_out(core, released);
        let left = gated(core).inner_mut().leave(now);
        match left {
            Ok(Some((to, addresses))) => {
                info!(to = %to, addresses, "handed this peer's address space over; waiting for the peer to confirm");
                self.reset = Some(Reset::HandingOver { reply, to, addresses, deadline: now + HANDOVER_WAIT });
            }
            Ok(None) => {
                self.reset = Some(Reset::Left);
                let _ = reply.send(Ok(ResetOutcome { handed_to: None, addresses: 0, acknowledged: true }));
            }
            Err(e) => {
                // The reachable peer went away in the meantime; the file is gone but the state
                // is still ours: write it again and stay.
                gated(core).resume_saving();
                self.reset = None;
                let _ = reply.send(Err(invalid(format!("{e}; nothing was handed over"))));
            }
        }
    }

    /// Carries out released outputs and answers failed ones.
    fn carry_out(&mut self, core: &mut Router, r: Released<Output>) {
        for p in r.ready {
            match p {
                Pending::Core(Output::Broadcast(b)) | Pending::Delta(b) => core.broadcast(weft_ipam::CHANNEL, b),
                // An unreachable peer: the allocator's own time-outs handle it.
                Pending::Core(Output::Unicast(to, b)) => {
                    core.send_unicast(to, weft_ipam::CHANNEL, b);
                }
                Pending::Core(Output::Done { req, result }) => {
                    if let Some(w) = self.waiters.remove(&req) {
                        let _ = w.reply.send(result.map_err(IpamError::Refused));
                    }
                }
                Pending::Core(Output::HandedOver { to, addresses }) => self.handed_over(to, addresses, true),
                Pending::Answer(a) => a.send(Ok(())),
            }
        }
        let Some(err) = r.error else { return };
        for p in r.failed {
            match p {
                Pending::Core(Output::Done { req, .. }) => {
                    if let Some(w) = self.waiters.remove(&req) {
                        let _ = w.reply.send(Err(IpamError::Save(err.clone())));
                    }
                }
                Pending::Core(Output::HandedOver { to, addresses }) => self.handed_over(to, addresses, true),
                Pending::Core(Output::Broadcast(_) | Output::Unicast(..)) | Pending::Delta(_) => self.dropped += 1,
                Pending::Answer(a) => a.send(Err(err.clone())),
            }
        }
    }

    fn handed_over(&mut self, to: PeerName, addresses: u64, acknowledged: bool) {
        if let Some(Reset::HandingOver { to: want, .. }) = &self.reset {
            if *want != to {
                return;
            }
            if let Some(Reset::HandingOver { reply, .. }) = self.reset.replace(Reset::Left) {
                if acknowledged {
                    info!(%to, addresses, "the peer confirmed it took over this peer's address space");
                }
                let _ = reply.send(Ok(ResetOutcome { handed_to: Some(to), addresses, acknowledged }));
            }
        }
    }

    /// When [`IpamService::handle_timeout`] must next run: the earliest request deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let waits = self.waiters.values().filter_map(|w| w.deadline);
        let handover = match &self.reset {
            Some(Reset::HandingOver { deadline, .. }) => Some(*deadline),
            _ => None,
        };
        waits.chain(handover).min()
    }

    /// Gives up on requests past their deadline and on a hand-over nobody confirmed.
    pub fn handle_timeout(&mut self, core: &mut Router, now: Instant) {
        let expired: Vec<u64> =
            self.waiters.iter().filter(|(_, w)| w.deadline.is_some_and(|d| d <= now)).map(|(r, _)| *r).collect();
        for req in expired {
            if let Some(w) = self.waiters.get_mut(&req) {
                w.deadline = None;
                let why = format!("no address after {}s", w.timeout.as_secs_f64());
                gated(core).inner_mut().cancel(req, &why);
            }
        }
        if let Some(Reset::HandingOver { to, addresses, deadline, .. }) = &self.reset {
            if *deadline <= now {
                let (to, addresses) = (*to, *addresses);
                warn!(%to, addresses, wait = ?HANDOVER_WAIT, "the peer did not confirm the hand-over in time");
                self.handed_over(to, addresses, false);
            }
        }
    }

    /// The peers reachable now, for donation.
    pub fn routes_changed(&mut self, core: &mut Router) {
        let reachable: BTreeSet<PeerName> = core.routes().unicast.keys().copied().collect();
        gated(core).inner_mut().set_reachable(Instant::now(), reachable);
    }

    /// Once a second: the allocator's timers. Every few seconds it returns the namespaces of
    /// allocations, for the caller to check (off the control path: it reads the file system)
    /// and hand back to [`IpamService::netns_checked`].
    pub fn tick(&mut self, core: &mut Router, now: Instant) -> Option<Vec<NetnsRef>> {
        gated(core).inner_mut().tick(now);
        if now < self.next_gc || self.leaving() {
            return None;
        }
        self.next_gc = now + GC_EVERY;
        let mut refs: Vec<NetnsRef> = gated(core).inner().allocations().filter_map(|a| a.netns.clone()).collect();
        refs.sort_by(|a, b| (&a.path, a.inode).cmp(&(&b.path, b.inode)));
        refs.dedup();
        Some(refs)
    }

    /// Which of the namespaces from [`IpamService::tick`] are gone. Releases the addresses of
    /// those gone for longer than the grace time; returns the container IDs left with no
    /// address (their DNS names go too).
    pub fn netns_checked(&mut self, core: &mut Router, now: Instant, gone: &[NetnsRef]) -> Vec<String> {
        let ipam = gated(core).inner_mut();
        let held: Vec<(u32, String, NetnsRef)> =
            ipam.allocations().filter_map(|a| a.netns.clone().map(|n| (a.addr, a.id.clone(), n))).collect();
        let mut still_gone = HashMap::new();
        let mut emptied = Vec::new();
        for (addr, id, ns) in held {
            if !gone.contains(&ns) {
                continue;
            }
            let since = self.gone_since.get(&addr).copied().unwrap_or(now);
            if now.duration_since(since) < self.grace {
                still_gone.insert(addr, since);
                continue;
            }
            for a in ipam.release(&id, Some(addr)) {
                info!(container = %a.id, address = %a.cidr(), netns = %ns.path, grace = ?self.grace,
                    "released the address of a container whose network namespace is gone");
            }
            if ipam.lookup(&id).is_empty() {
                emptied.push(id);
            }
        }
        self.gone_since = still_gone;
        emptied
    }

    /// The IPAM part of the status document.
    pub fn status(&self, core: &mut Router) -> Value {
        let nicks: HashMap<String, String> = core.topology().peers().map(|p| (p.name.to_string(), p.nickname.clone())).collect();
        let g = gated(core);
        let ipam = g.inner();
        let mut v = serde_json::to_value(ipam.status()).unwrap_or_default();
        if let Some(peers) = v["peers"].as_array_mut() {
            for p in peers {
                let nick = p["peer"].as_str().and_then(|n| nicks.get(n)).cloned();
                p["nickname"] = json!(nick);
            }
        }
        v["stats"] = serde_json::to_value(ipam.stats()).unwrap_or_default();
        v["state_file"] = json!(g.gate().path().display().to_string());
        v["save_errors"] = json!(g.gate().errors());
        v["save_error"] = json!(g.gate().failure());
        v["held"] = json!(g.held());
        v["dropped_messages"] = json!(self.dropped + g.dropped_deltas());
        v["leaving"] = json!(self.leaving());
        v
    }

    /// Refreshes the metrics' figures.
    pub fn publish(&self, core: &mut Router, to: &IpamGauges) {
        let g = gated(core);
        let ipam = g.inner();
        let st = ipam.status();
        let me = st.peers.iter().find(|p| p.me);
        let s = ipam.stats();
        for (gauge, v) in [
            (&to.allocations, st.allocated as u64),
            (&to.owned, me.map_or(0, |p| p.owned)),
            (&to.free, me.map_or(0, |p| p.free)),
            (&to.unreachable, st.unreachable_addresses),
            (&to.pending, st.pending as u64),
            (&to.allocated_total, s.allocated),
            (&to.released_total, s.released),
            (&to.failed_total, s.failed),
            (&to.donated_total, s.donated),
            (&to.received_total, s.received),
            (&to.refused_rings_total, s.refused_rings),
            (&to.save_errors_total, g.gate().errors()),
            (&to.dropped_total, self.dropped + g.dropped_deltas()),
        ] {
            gauge.store(v, Relaxed);
        }
        for (gauge, reason) in to.forged_total.iter().zip(weft_ipam::FORGED_REASONS) {
            gauge.store(s.forged.get(reason).copied().unwrap_or(0), Relaxed);
        }
    }
}

/// JSON for one allocation.
pub fn allocation_json(a: &Allocation) -> Value {
    json!({
        "id": a.id, "address": a.cidr(), "ip": Ipv4Addr::from(a.addr).to_string(), "prefix": a.subnet.prefix,
        "subnet": a.subnet.to_string(), "netns": a.netns.as_ref().map(|n| n.path.clone()),
    })
}
