//! A deterministic network simulator for weft's control plane.
//!
//! It drives many [`weft_proto::Router`]s in one thread against a virtual
//! clock: one `Instant` is read when a [`Sim`] is made and everything after
//! that is that instant plus a virtual offset, which jumps from one scheduled
//! event to the next. All randomness (link latencies, uids, router seeds)
//! comes from one seed, so a failing run replays exactly from the seed printed
//! in every assertion message.
//!
//! What it models:
//! - hosts with a virtual listen address (`10.0.x.y:6783`, only ever a map key);
//! - dials that succeed after one link latency when the target is alive and
//!   on the same side of any partition, are refused when nothing listens, and
//!   time out when a partition is in the way;
//! - control connections that deliver in order with a fixed per-link latency
//!   (1–20 ms, drawn from the seed), and a sleeve (data path) that works one
//!   latency after the connection comes up;
//! - partitions (cut connections across them, make dials across them fail),
//!   heals, kills and restarts (fresh uid, larger `initial_version`).
//!
//! What it leaves out: the handshake and its crypto (the sim hands each side
//! the other's [`Hello`] directly), the sleeve's own heartbeats and frames,
//! message loss and reordering inside a connection, MTU, bandwidth, and
//! one-sided failure detection (both ends of a connection learn of its end at
//! the same virtual instant). Messages still in flight on a connection when it
//! closes are dropped.
//!
//! Invariants are checked after every batch of events that share a virtual
//! instant: no router reports a peer's message as misbehaviour (every peer
//! here is honest), every connection a router holds is open in the sim, and
//! once the topology has converged ([`Sim::converged`]) routes are loop-free
//! ([`Sim::assert_loop_free`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_proto::router::Session;
use weft_proto::{ConnId, ControlMsg, Event, Hello, PeerName, Router, RouterConfig, SigningKey};

/// Port every simulated node listens on.
pub const LISTEN_PORT: u16 = 6783;
/// How long a dial across a partition takes to fail (a TCP connect timeout,
/// shortened so backoff, not the timeout, dominates reconnection times).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Gossip interval the sim configures on every router.
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(2);
/// Granularity at which [`Sim::run_until_cond`] evaluates its condition.
const COND_SLICE: Duration = Duration::from_millis(100);
/// Events one virtual second may take per node before a drive loop is deemed
/// runaway. Steady state is a few per second per node; convergence of a full
/// mesh peaks at a few hundred.
const STEPS_PER_NODE_SECOND: u64 = 20_000;
/// Rounds of draining one batch may take before it is deemed runaway.
const MAX_FLUSH_ROUNDS: usize = 1_000_000;

/// Something scheduled to happen at a virtual time.
#[derive(Debug)]
enum SimEvent {
    /// A node's router timer fires (ignored unless `gen` is still current).
    Timer { node: usize, inc: u64, gen: u64 },
    /// A dial from `from` reaches `addr`.
    DialArrive { from: usize, inc: u64, addr: SocketAddr },
    /// A dial from `from` to `addr` failed.
    DialFailed { from: usize, inc: u64, addr: SocketAddr, error: String },
    /// A message arrives on connection end `conn` (owned by the receiver).
    Deliver { conn: ConnId, msg: ControlMsg },
    /// The sleeve behind connection end `conn` starts working.
    SleeveUp { conn: ConnId },
}

/// One end of an open connection.
#[derive(Debug, Clone, Copy)]
struct ConnEnd {
    /// The node holding this end.
    node: usize,
    /// The other end's id.
    peer_conn: ConnId,
    /// The node at the other end.
    peer_node: usize,
    /// One-way latency of the link.
    latency: Duration,
}

/// A simulated host.
struct Node {
    /// The router, `None` while the node is dead.
    router: Option<Router>,
    /// Incarnation: bumped on kill and restart so stale events are ignored.
    inc: u64,
    /// Virtual listen address.
    addr: SocketAddr,
    /// Timer currently armed: (virtual time, generation).
    timer: Option<(Duration, u64)>,
    /// Partition side; nodes talk only to nodes on the same side.
    side: u32,
    /// Control messages sent, over all incarnations.
    sent: u64,
}

/// The simulated network. See the crate docs.
pub struct Sim {
    seed: u64,
    base: Instant,
    now: Duration,
    rng: StdRng,
    nodes: Vec<Node>,
    by_addr: BTreeMap<SocketAddr, usize>,
    queue: BTreeMap<(Duration, u64), SimEvent>,
    seq: u64,
    next_conn: u64,
    conns: BTreeMap<ConnId, ConnEnd>,
    latencies: BTreeMap<(usize, usize), Duration>,
    dirty: BTreeSet<usize>,
    routes_dirty: bool,
    was_converged: bool,
    steps: u64,
}

impl Sim {
    /// An empty network whose every random choice derives from `seed`.
    pub fn new(seed: u64) -> Self {
        Sim {
            seed,
            base: Instant::now(),
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::new(),
            by_addr: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            next_conn: 1,
            conns: BTreeMap::new(),
            latencies: BTreeMap::new(),
            dirty: BTreeSet::new(),
            routes_dirty: false,
            was_converged: false,
            steps: 0,
        }
    }

    /// The seed this sim was made with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time elapsed since the sim was made.
    pub fn elapsed(&self) -> Duration {
        self.now
    }

    /// Events processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The current virtual `Instant`.
    pub fn now(&self) -> Instant {
        self.base + self.now
    }

    /// Number of nodes ever added (dead ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was ever added.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s listen address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    /// The peer name node `i` runs under (stable across restarts).
    pub fn name(i: usize) -> PeerName {
        PeerName::from_u64(i as u64 + 1)
    }

    /// Node `i`'s router, `None` while it is dead.
    pub fn router(&self, i: usize) -> Option<&Router> {
        self.nodes[i].router.as_ref()
    }

    /// Whether node `i` is running.
    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].router.is_some()
    }

    /// Indices of running nodes.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.is_alive(*i)).collect()
    }

    /// Control messages node `i` has sent so far (all incarnations).
    pub fn sent(&self, i: usize) -> u64 {
        self.nodes[i].sent
    }

    /// Adds `n` hosts that are not running yet (nothing listens on their
    /// addresses); start them with [`Sim::launch`]. Returns their indices.
    pub fn add_hosts(&mut self, n: usize) -> std::ops::Range<usize> {
        let first = self.nodes.len();
        for i in first..first + n {
            let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1);
            let addr = SocketAddr::new(IpAddr::V4(ip), LISTEN_PORT);
            self.nodes.push(Node { router: None, inc: 0, addr, timer: None, side: 0, sent: 0 });
            self.by_addr.insert(addr, i);
        }
        first..first + n
    }

    /// Starts host `i` for the first time now (`initial_version` 1), dialing
    /// the given nodes' addresses.
    pub fn launch(&mut self, i: usize, targets: &[usize]) {
        assert!(!self.is_alive(i), "seed={}: launch of live node {i}", self.seed);
        let addrs: Vec<SocketAddr> = targets.iter().map(|t| self.addr(*t)).collect();
        self.start(i, 1, &addrs);
    }

    /// Adds a host and launches it now, dialing the given nodes' addresses.
    /// Returns its index.
    pub fn add_node(&mut self, targets: &[usize]) -> usize {
        let i = self.add_hosts(1).start;
        self.launch(i, targets);
        i
    }

    fn start(&mut self, i: usize, initial_version: u64, targets: &[SocketAddr]) {
        let uid = self.rng.random::<u64>();
        let seed = self.rng.random::<u64>();
        let mut cfg = RouterConfig::new(Self::name(i), format!("n{i}"), uid, seed, Self::key(i));
        cfg.gossip_interval = GOSSIP_INTERVAL;
        cfg.discovery = true;
        cfg.initial_version = initial_version;
        let now = self.now();
        let mut r = Router::new(cfg, now);
        for a in targets {
            r.add_target(now, *a);
        }
        let node = &mut self.nodes[i];
        node.inc += 1;
        node.timer = None;
        node.router = Some(r);
        self.dirty.insert(i);
        self.flush();
    }

    /// Kills node `i`: its router is dropped and every connection it had goes
    /// down on the other side at once.
    pub fn kill(&mut self, i: usize) {
        assert!(self.is_alive(i), "seed={}: kill of dead node {i}", self.seed);
        let mine: Vec<ConnId> = self.conns.iter().filter(|(_, e)| e.node == i).map(|(c, _)| *c).collect();
        self.nodes[i].router = None;
        self.nodes[i].inc += 1;
        self.nodes[i].timer = None;
        for c in mine {
            self.close(c, "peer died");
        }
        self.flush();
    }

    /// Restarts dead node `i` with a fresh uid and an `initial_version` above
    /// anything its previous life can have announced (the virtual time in
    /// microseconds, as the daemon does with the wall clock), dialing `targets`.
    pub fn restart(&mut self, i: usize, targets: &[usize]) {
        let v = u64::try_from(self.now.as_micros()).unwrap_or(u64::MAX).max(1);
        self.restart_with_version(i, targets, v);
    }

    /// Like [`Sim::restart`] with an explicit `initial_version` (possibly lower
    /// than its previous life's, to exercise the core's self-entry recovery).
    pub fn restart_with_version(&mut self, i: usize, targets: &[usize], initial_version: u64) {
        assert!(!self.is_alive(i), "seed={}: restart of live node {i}", self.seed);
        let addrs: Vec<SocketAddr> = targets.iter().map(|t| self.addr(*t)).collect();
        self.start(i, initial_version, &addrs);
    }

    /// Puts each node on side `sides[i]` (missing entries: side 0) and cuts
    /// every connection between different sides.
    pub fn partition(&mut self, sides: &[u32]) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.side = sides.get(i).copied().unwrap_or(0);
        }
        let cut: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, e)| e.node < e.peer_node && !self.can_talk(e.node, e.peer_node))
            .map(|(c, _)| *c)
            .collect();
        for c in cut {
            self.close(c, "partitioned");
        }
        self.flush();
    }

    /// Removes every partition. Existing connections are unaffected; new dials
    /// succeed again once the routers retry.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.side = 0;
        }
    }

    fn can_talk(&self, a: usize, b: usize) -> bool {
        self.nodes[a].side == self.nodes[b].side
    }

    /// Sets the one-way latency between hosts `a` and `b` (else random, 1-20 ms), for
    /// connections made after this.
    pub fn set_latency(&mut self, a: usize, b: usize, latency: Duration) {
        self.latencies.insert((a.min(b), a.max(b)), latency);
    }

    /// Total round trip of the route from `src` to `dst` as the routers' next hops take it,
    /// or `None` when there is none (or it loops).
    pub fn route_rtt(&mut self, src: usize, dst: usize) -> Option<Duration> {
        let (mut at, mut total, mut hops) = (src, Duration::ZERO, 0);
        while at != dst {
            let hop = self.router(at)?.routes().next_hop(Self::name(dst))?;
            let next = usize::try_from(hop.as_u64()).ok()?.checked_sub(1)?;
            total += self.latency(at, next) * 2;
            at = next;
            hops += 1;
            if hops > self.nodes.len() {
                return None;
            }
        }
        Some(total)
    }

    /// Round trip of the direct connection between `a` and `b`.
    pub fn route_rtt_direct(&mut self, a: usize, b: usize) -> Duration {
        self.latency(a, b) * 2
    }

    fn latency(&mut self, a: usize, b: usize) -> Duration {
        let key = (a.min(b), a.max(b));
        if let Some(l) = self.latencies.get(&key) {
            return *l;
        }
        let l = Duration::from_micros(self.rng.random_range(1_000..=20_000));
        self.latencies.insert(key, l);
        l
    }

    fn schedule(&mut self, at: Duration, ev: SimEvent) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    /// Closes both ends of a connection, telling each live router holding one.
    fn close(&mut self, conn: ConnId, reason: &str) {
        let Some(end) = self.conns.remove(&conn) else { return };
        self.conns.remove(&end.peer_conn);
        let now = self.now();
        for (node, c) in [(end.node, conn), (end.peer_node, end.peer_conn)] {
            if let Some(r) = self.nodes[node].router.as_mut() {
                r.handle_connection_down(now, c, reason);
                self.dirty.insert(node);
            }
        }
    }

    /// Drains outputs of every node touched since the last flush, acting on
    /// them (which may touch more nodes), and re-arms their timers.
    fn flush(&mut self) {
        let mut rounds = 0;
        while let Some(i) = self.dirty.pop_first() {
            rounds += 1;
            assert!(rounds < MAX_FLUSH_ROUNDS, "seed={}: flush does not terminate (node {i})", self.seed);
            self.drain(i);
        }
    }

    fn drain(&mut self, i: usize) {
        let inc = self.nodes[i].inc;
        loop {
            let Some(r) = self.nodes[i].router.as_mut() else { return };
            if let Some(t) = r.poll_transmit() {
                self.nodes[i].sent += 1;
                // A transmit on a connection the sim already closed goes nowhere.
                let Some(end) = self.conns.get(&t.conn).copied() else { continue };
                assert_eq!(end.node, i, "seed={}: node {i} sent on another node's connection", self.seed);
                self.schedule(self.now + end.latency, SimEvent::Deliver { conn: end.peer_conn, msg: t.msg });
                continue;
            }
            let Some(ev) = r.poll_event() else { break };
            match ev {
                Event::Connect { addr, .. } => {
                    let l = match self.by_addr.get(&addr) {
                        Some(&j) => self.latency(i, j),
                        None => Duration::from_millis(1),
                    };
                    self.schedule(self.now + l, SimEvent::DialArrive { from: i, inc, addr });
                }
                Event::Disconnect { conn, reason } => {
                    if self.conns.get(&conn).is_some_and(|e| e.node == i) {
                        self.close(conn, &reason);
                    }
                }
                Event::RoutesChanged => self.routes_dirty = true,
                Event::Unicast { .. } | Event::IdentitiesChanged | Event::Forged { .. } => {}
            }
        }
        let Some(r) = self.nodes[i].router.as_ref() else { return };
        let at = r.poll_timeout().saturating_duration_since(self.base).max(self.now);
        if self.nodes[i].timer.map(|(t, _)| t) != Some(at) {
            self.seq += 1;
            let gen = self.seq;
            self.nodes[i].timer = Some((at, gen));
            self.schedule(at, SimEvent::Timer { node: i, inc, gen });
        }
    }

    /// Host `i`'s identity key: the same in every life of the host, as a real one keeps its
    /// key in its state directory.
    fn key(i: usize) -> SigningKey {
        let mut seed = [0x5a; 32];
        seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
        match SigningKey::from_seed(&seed) {
            Ok(k) => k,
            Err(e) => unreachable!("every 32-byte seed makes an Ed25519 key: {e}"),
        }
    }

    fn hello(&self, i: usize, binding: &[u8; 32]) -> Option<Hello> {
        let r = self.nodes[i].router.as_ref()?;
        let cfg = r.config();
        Some(Hello::prove(&cfg.key, r.own_claim(), cfg.nickname.clone(), cfg.uid, LISTEN_PORT, binding))
    }

    fn dial_arrive(&mut self, from: usize, inc: u64, addr: SocketAddr) {
        if self.nodes[from].inc != inc {
            return;
        }
        let Some(&to) = self.by_addr.get(&addr) else {
            self.schedule(self.now, SimEvent::DialFailed { from, inc, addr, error: "no route to host".into() });
            return;
        };
        if !self.can_talk(from, to) {
            let at = self.now + DIAL_TIMEOUT;
            self.schedule(at, SimEvent::DialFailed { from, inc, addr, error: "connect timed out".into() });
            return;
        }
        let l = self.latency(from, to);
        // Each connection's handshake gives both ends one binding value no other has.
        let mut binding = [0u8; 32];
        binding[..8].copy_from_slice(&self.next_conn.to_be_bytes());
        let (Some(h_out), Some(h_in)) = (self.hello(from, &binding), self.hello(to, &binding)) else {
            self.schedule(self.now + l, SimEvent::DialFailed { from, inc, addr, error: "connection refused".into() });
            return;
        };
        let (c_out, c_in) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
        self.next_conn += 2;
        self.conns.insert(c_out, ConnEnd { node: from, peer_conn: c_in, peer_node: to, latency: l });
        self.conns.insert(c_in, ConnEnd { node: to, peer_conn: c_out, peer_node: from, latency: l });
        let now = self.now();
        // The inbound side sees the dialer's IP with an ephemeral port.
        let eph = SocketAddr::new(self.nodes[from].addr.ip(), 40_000 + (c_out.0 % 20_000) as u16);
        let s_out = Session { local: eph, binding };
        let s_in = Session { local: addr, binding };
        let ok_out = self.nodes[from].router.as_mut().map(|r| r.handle_connection_up(now, c_out, addr, Some(addr), h_in, s_out));
        let ok_in = self.nodes[to].router.as_mut().map(|r| r.handle_connection_up(now, c_in, eph, None, h_out, s_in));
        self.dirty.insert(from);
        self.dirty.insert(to);
        if matches!(ok_out, Some(Err(_))) || matches!(ok_in, Some(Err(_))) {
            let reason = format!("refused: {ok_out:?} / {ok_in:?}");
            self.close(c_out, &reason);
            return;
        }
        self.schedule(self.now + l, SimEvent::SleeveUp { conn: c_out });
        self.schedule(self.now + l, SimEvent::SleeveUp { conn: c_in });
    }

    /// Processes one event (and everything else scheduled for the same
    /// instant), then checks the invariants. Returns false when nothing is
    /// scheduled at or before `limit`.
    fn step_batch(&mut self, limit: Duration) -> bool {
        let Some((&(at, _), _)) = self.queue.first_key_value() else { return false };
        if at > limit {
            return false;
        }
        self.now = at;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 != at {
                break;
            }
            let ev = entry.remove();
            self.steps += 1;
            self.deliver(ev);
            self.flush();
        }
        self.check_invariants();
        true
    }

    fn deliver(&mut self, ev: SimEvent) {
        let now = self.now();
        match ev {
            SimEvent::Timer { node, inc, gen } => {
                let n = &mut self.nodes[node];
                if n.inc != inc || n.timer.map(|(_, g)| g) != Some(gen) {
                    return;
                }
                n.timer = None;
                if let Some(r) = n.router.as_mut() {
                    r.handle_timeout(now);
                    self.dirty.insert(node);
                }
            }
            SimEvent::DialArrive { from, inc, addr } => self.dial_arrive(from, inc, addr),
            SimEvent::DialFailed { from, inc, addr, error } => {
                if self.nodes[from].inc != inc {
                    return;
                }
                if let Some(r) = self.nodes[from].router.as_mut() {
                    r.handle_connect_failed(now, addr, error);
                    self.dirty.insert(from);
                }
            }
            SimEvent::Deliver { conn, msg } => {
                let Some(end) = self.conns.get(&conn).copied() else { return };
                let seed = self.seed;
                if let Some(r) = self.nodes[end.node].router.as_mut() {
                    if let Err(e) = r.handle_message(now, conn, msg) {
                        panic!("seed={seed}: node {} refused a message from honest node {}: {e}", end.node, end.peer_node);
                    }
                    self.dirty.insert(end.node);
                }
            }
            SimEvent::SleeveUp { conn } => {
                let Some(end) = self.conns.get(&conn).copied() else { return };
                if !self.can_talk(end.node, end.peer_node) {
                    return;
                }
                if let Some(r) = self.nodes[end.node].router.as_mut() {
                    r.handle_sleeve_state(now, conn, true);
                    // What the shell measures on a live connection: the link's round trip.
                    r.handle_rtt(now, conn, end.latency * 2);
                    self.dirty.insert(end.node);
                }
            }
        }
    }

    /// Runs every event scheduled up to virtual time `t` (since the sim was
    /// made) and leaves the clock at `t`. Panics if it takes more steps than
    /// a generous budget for the span.
    pub fn run_until(&mut self, t: Duration) {
        let span = t.saturating_sub(self.now);
        let budget = 10_000 + STEPS_PER_NODE_SECOND * (self.nodes.len() as u64).max(1) * (span.as_secs() + 1);
        let start = self.steps;
        while self.step_batch(t) {
            assert!(
                self.steps - start <= budget,
                "seed={}: more than {budget} steps to run {span:?} at {:?}: runaway event loop",
                self.seed,
                self.now
            );
        }
        self.now = self.now.max(t);
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Runs until `cond` holds (checked every 100 ms of virtual time) or `max`
    /// has passed. Returns how long it took, `None` if it never held.
    pub fn run_until_cond(&mut self, max: Duration, mut cond: impl FnMut(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        loop {
            if cond(self) {
                return Some(self.now - start);
            }
            if self.now - start >= max {
                return None;
            }
            self.run_for(COND_SLICE);
        }
    }

    /// Whether every live node's topology holds the same peers with the same
    /// entry versions and uids.
    pub fn converged(&self) -> bool {
        self.converged_group(&self.live())
    }

    /// Like [`Sim::converged`], over the live nodes of `group` only.
    pub fn converged_group(&self, group: &[usize]) -> bool {
        let mut live = group.iter().filter_map(|i| self.nodes[*i].router.as_ref());
        let Some(first) = live.next() else { return true };
        let t0 = first.topology();
        live.all(|r| {
            let t = r.topology();
            t.len() == t0.len()
                && t.peers().zip(t0.peers()).all(|(a, b)| a.name == b.name && a.version == b.version && a.uid == b.uid)
        })
    }

    /// Whether [`Sim::converged`] holds and the topology has exactly the live
    /// nodes, each with its current uid.
    pub fn converged_on_live(&self) -> bool {
        if !self.converged() {
            return false;
        }
        let live = self.live();
        let Some(r0) = live.first().and_then(|i| self.router(*i)) else { return true };
        r0.topology().len() == live.len()
            && live.iter().all(|&i| {
                let uid = self.router(i).map(|r| r.config().uid);
                r0.topology().get(Self::name(i)).map(|p| p.uid) == uid
            })
    }

    /// Whether every pair of live nodes in `group` has an established
    /// connection (both ends' sleeves up).
    pub fn full_mesh(&self, group: &[usize]) -> bool {
        group.iter().all(|&i| {
            let Some(r) = self.router(i) else { return false };
            group.iter().filter(|&&j| j != i).all(|&j| {
                // (The route may go through another peer when that is faster: see
                // `all_routes` and `route_rtt`.)
                r.connections().values().any(|c| c.peer == Self::name(j) && c.established)
            })
        })
    }

    /// Whether every live node in `group` has a route to every other.
    pub fn all_routes(&self, group: &[usize]) -> bool {
        group.iter().all(|&i| {
            let Some(r) = self.router(i) else { return false };
            group.iter().all(|&j| j == i || r.routes().next_hop(Self::name(j)).is_some())
        })
    }

    /// Panics (with the seed) if following next hops, each node using its own
    /// routes, from any live node towards any peer some live node knows,
    /// revisits a node or takes more hops than there are nodes. A walk may stop
    /// at a node without a route or at a dead node.
    pub fn assert_loop_free(&self) {
        let dests: BTreeSet<PeerName> =
            self.nodes.iter().filter_map(|n| n.router.as_ref()).flat_map(|r| r.topology().peers().map(|p| p.name)).collect();
        for src in self.live() {
            for &dst in &dests {
                let mut at = src;
                let mut path = vec![Self::name(src)];
                loop {
                    if Self::name(at) == dst {
                        break;
                    }
                    let Some(hop) = self.router(at).and_then(|r| r.routes().next_hop(dst)) else { break };
                    assert!(
                        !path.contains(&hop) && path.len() <= self.nodes.len(),
                        "seed={}: routing loop at {:?} from node {src} towards {dst}: {}",
                        self.seed,
                        self.now,
                        path.iter().chain([&hop]).map(|p| p.to_string()).collect::<Vec<_>>().join(" -> ")
                    );
                    path.push(hop);
                    at = match usize::try_from(hop.as_u64()).ok().and_then(|h| h.checked_sub(1)) {
                        Some(h) if h < self.nodes.len() => h,
                        _ => break,
                    };
                }
            }
        }
    }

    /// Checks run after every batch of events: connections a router holds are
    /// open in the sim, and routes are loop-free once the topology converged.
    fn check_invariants(&mut self) {
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(r) = n.router.as_ref() else { continue };
            for c in r.connections().keys() {
                assert!(
                    self.conns.get(c).is_some_and(|e| e.node == i),
                    "seed={}: node {i} holds connection {c:?} the network closed",
                    self.seed
                );
            }
        }
        let converged = self.converged();
        if converged && (self.routes_dirty || !self.was_converged) {
            self.assert_loop_free();
            self.routes_dirty = false;
        }
        self.was_converged = converged;
    }
}
