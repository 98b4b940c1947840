//! One peer's allocator.
//!
//! A peer hands out addresses only from the pieces of the ring it owns, so two
//! peers never hand out the same address. Within its pieces it keeps a map of
//! address → container ID. When a request cannot be served locally it asks a
//! reachable peer with free space in the wanted subnet for some (*donation*);
//! the donor gives half of its largest free run there (or exactly the address
//! asked for, for a claim), changes its ring and sends it back.
//!
//! Requests wait while the ring is not started: a voter then starts consensus
//! ([`crate::paxos`]); an observer waits for the ring to arrive by gossip.
//!
//! Calling convention (like `weft_proto::Router`): inputs are method calls
//! with the current time; outputs are drained with [`Ipam::poll_output`]. The
//! shell must persist [`Ipam::state`] whenever [`Ipam::take_dirty`] says so
//! *before* acting on the outputs drained in the same round, so that nothing
//! another peer or a caller has seen is lost in a crash. When that save fails,
//! none of the round's outputs may leave: in particular a hand-over
//! acknowledgement (see "Leaving" below) promises the sender that our ring is
//! on disk.
//!
//! # Leaving
//!
//! [`Ipam::leave`] hands every piece we own to one reachable peer P and sends
//! P a `Handover { seq, ring }` unicast (and the ring as gossip to everyone).
//! P merges that ring like any other (a ring it refuses gets no answer),
//! which marks its state dirty, and queues `HandoverAck { seq }` to us in the
//! same round; by the rule above P's shell saves the new ring before that ack
//! leaves P. The ack, from P and with the pending `seq`, becomes
//! [`Output::HandedOver`] here: only then may the shell stop the router. A
//! lost hand-over or ack gives no [`Output::HandedOver`]; the shell bounds the
//! wait (see [`Ipam::pending_handover`]) and may call [`Ipam::leave`] again,
//! which re-sends the same hand-over.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use weft_proto::identity::Refused;
use weft_proto::{GossipChannel, Keys, PeerName, SigningKey};

use crate::addr::{ip, Cidr};
use crate::paxos::{Claims, ClaimsMap, Paxos};
use crate::ring::{Names, Ring, RingError};

/// Longest container ID accepted.
pub const MAX_ID_LEN: usize = 256;
/// Most single addresses given to one peer by claims and not used yet (by its
/// own count) before a donor refuses it more.
pub const MAX_UNUSED_CLAIMS: usize = 4;
/// Format of [`State`].
pub const STATE_FORMAT: u32 = 2;

/// How the ring is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    /// The first `n` peers agree (a quorum of `n/2+1` suffices) on who splits
    /// the range, when the first allocation request arrives.
    Consensus(usize),
    /// These peers split the range; every peer computes the same ring.
    Seeds(Vec<PeerName>),
    /// Never votes; gets space by donation once the ring arrives.
    Observer,
}

/// Static settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our name.
    pub me: PeerName,
    /// The range every peer shares.
    pub range: Cidr,
    /// Subnet for requests that name none.
    pub default_subnet: Cidr,
    /// How the ring starts.
    pub init: Init,
    /// Seed for random choices (proposal back-off).
    pub seed: u64,
    /// How long to wait for a donor's answer.
    pub donation_timeout: Duration,
    /// Base delay before a proposal that made no progress is retried.
    pub proposal_timeout: Duration,
    /// How often our free counts in the ring are refreshed.
    pub free_interval: Duration,
    /// The router's identity key (bound to `me`): it signs our consensus
    /// claims and the ring entries we write.
    pub signing: SigningKey,
}

impl Config {
    /// Defaults for `range`, checked.
    pub fn new(
        me: PeerName,
        range: Cidr,
        default_subnet: Option<Cidr>,
        init: Init,
        seed: u64,
        signing: SigningKey,
    ) -> Result<Config, String> {
        if range.prefix < 1 || range.prefix > 30 {
            return Err(format!("--ipalloc-range {range}: the prefix length must be between 1 and 30"));
        }
        let default_subnet = default_subnet.unwrap_or(range);
        if !range.covers(&default_subnet) {
            return Err(format!("--ipalloc-default-subnet {default_subnet} is not inside --ipalloc-range {range}"));
        }
        match &init {
            Init::Consensus(0) => return Err("--ipalloc-init consensus=N needs N of at least 1".into()),
            Init::Seeds(s) if s.is_empty() => return Err("--ipalloc-init seed= needs at least one peer name".into()),
            _ => {}
        }
        Ok(Config {
            me,
            range,
            default_subnet,
            init,
            seed,
            donation_timeout: Duration::from_secs(3),
            proposal_timeout: Duration::from_secs(3),
            free_interval: Duration::from_secs(5),
            signing,
        })
    }
}

/// Which namespace an allocation serves, for the shell's clean-up of
/// containers that are gone. The core does not interpret it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    /// Path to the namespace (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub path: String,
    /// Its inode when the address was given, so a reused path is noticed.
    pub inode: u64,
}

/// One address held by one container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Container ID.
    pub id: String,
    /// The address.
    pub addr: u32,
    /// The subnet it was given in (its prefix is the container's).
    pub subnet: Cidr,
    /// The container's namespace, when known.
    pub netns: Option<NetnsRef>,
}

impl Allocation {
    /// `a.b.c.d/prefix`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", ip(self.addr), self.subnet.prefix)
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Any free address in this subnet.
    Any(Cidr),
    /// This address (a claim), with the subnet that gives its prefix.
    Addr(u32, Cidr),
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request itself is wrong (subnet outside the range, bad ID).
    Invalid,
    /// The address is held by another container.
    InUse,
    /// No free address anywhere reachable.
    Exhausted,
    /// The space needed is held by unreachable peers.
    Unreachable,
    /// It waited too long (consensus, a donor) or was cancelled.
    Timeout,
}

/// A failed request: what kind, and a message a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Kind.
    pub kind: FailureKind,
    /// Message.
    pub message: String,
}

impl Failure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }
}

/// Something the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Gossip this to neighbours (`Router::broadcast`).
    Broadcast(Vec<u8>),
    /// Send this to one peer (`Router::send_unicast`).
    Unicast(PeerName, Vec<u8>),
    /// A request finished.
    Done {
        /// The caller's request number.
        req: u64,
        /// The address, or why not.
        result: Result<Allocation, Failure>,
    },
    /// The peer we handed our space to ([`Ipam::leave`]) acknowledged it: its
    /// ring with our space is on its disk, so the router may stop now.
    HandedOver {
        /// The peer that took our space.
        to: PeerName,
        /// How many addresses it took.
        addresses: u64,
    },
}

/// A hand-over sent by [`Ipam::leave`] and not acknowledged yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingHandover {
    /// The peer our space was handed to.
    pub to: PeerName,
    /// How many addresses.
    pub addresses: u64,
    /// When [`Ipam::leave`] first handed it over.
    pub since: Instant,
    /// Matches the acknowledgement to the hand-over.
    seq: u64,
}

/// What is persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// The range.
    pub range: Cidr,
    /// The ring.
    pub ring: Ring,
    /// Our consensus claims (a promise must outlive a restart).
    pub claims: Option<Claims>,
    /// Our containers' addresses.
    pub allocations: Vec<Allocation>,
}

/// A peer's share, for `weft status ipam`.
#[derive(Clone, Debug, Serialize)]
pub struct Share {
    /// Peer.
    pub peer: String,
    /// Addresses owned.
    pub owned: u64,
    /// Free, as its owner last said (exact for ourselves).
    pub free: u64,
    /// Whether it is reachable now.
    pub reachable: bool,
    /// Whether it is us.
    pub me: bool,
}

/// The allocator's state, for `weft status ipam`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The range.
    pub range: String,
    /// The default subnet.
    pub default_subnet: String,
    /// How the ring starts.
    pub init: String,
    /// Whether requests can be served (the ring is started).
    pub ready: bool,
    /// What is going on, in words.
    pub state: String,
    /// Who started the ring.
    pub seeds: Vec<String>,
    /// Every peer's share.
    pub peers: Vec<Share>,
    /// Addresses held by unreachable peers.
    pub unreachable_addresses: u64,
    /// Our containers' addresses.
    pub allocated: usize,
    /// Requests waiting.
    pub pending: usize,
    /// The last ring we refused, and why.
    pub last_error: Option<String>,
}

/// Counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Addresses given out.
    pub allocated: u64,
    /// Addresses released.
    pub released: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Donations we made.
    pub donated: u64,
    /// Donations we received.
    pub received: u64,
    /// Donation requests refused, by us or to us.
    pub refusals: u64,
    /// Rings refused.
    pub refused_rings: u64,
    /// Hand-overs we acknowledged (we took a leaving peer's space).
    pub handovers_taken: u64,
    /// Hand-over acknowledgements ignored: no hand-over of ours pending with
    /// that number, or from another peer than the one we handed over to.
    pub stray_handover_acks: u64,
    /// Donation answers ignored: not from the peer we asked, or for no
    /// request of ours under way.
    pub stray_answers: u64,
    /// Gossip entries dropped because they did not verify against their
    /// origin's bound key, by reason ([`Refused::label`] and the ring's own
    /// reasons, [`FORGED_REASONS`]).
    pub forged: BTreeMap<&'static str, u64>,
    /// The same, by the neighbour that sent them (its name).
    pub forged_from: BTreeMap<String, u64>,
}

/// Every reason a gossip entry is refused as forged, for metrics.
pub const FORGED_REASONS: [&str; 8] =
    ["unknown_key", "bad_signature", "bad_grant", "takeover_of_reachable", "forked", "impostor", "revoked", "other"];

fn forged_label(e: &Refused) -> &'static str {
    match e.label() {
        l @ ("unknown_key" | "bad_signature" | "impostor" | "revoked") => l,
        _ => "other",
    }
}

#[derive(Serialize, Deserialize)]
enum Msg {
    Ring(Ring),
    Paxos { range: Cidr, claims: ClaimsMap },
    Request { seq: u64, range: Cidr },
    Donated { seq: u64, ring: Ring },
    Refused { seq: u64, reason: String },
    // Appended: postcard numbers variants by position, so older peers keep
    // decoding the ones above.
    Handover { seq: u64, ring: Ring },
    HandoverAck { seq: u64 },
}

fn encode(m: &Msg) -> Vec<u8> {
    postcard::to_stdvec(m).unwrap_or_default()
}

struct Pending {
    req: u64,
    id: String,
    want: Want,
    netns: Option<NetnsRef>,
}

impl Pending {
    /// What donation would serve it.
    fn key(&self) -> Cidr {
        match self.want {
            Want::Any(s) => s,
            Want::Addr(a, _) => Cidr { addr: a, prefix: 32 },
        }
    }
}

#[derive(Default)]
struct Donation {
    asking: Option<(PeerName, u64, Instant)>,
    tried: BTreeSet<PeerName>,
    last_refusal: Option<String>,
    /// Why requests wait when the only peers with space are unreachable.
    blocked: Option<String>,
}

/// One peer's allocator. See the module docs.
pub struct Ipam {
    cfg: Config,
    ring: Ring,
    paxos: Option<Paxos>,
    allocs: BTreeMap<u32, Allocation>,
    by_id: BTreeMap<String, BTreeSet<u32>>,
    pending: VecDeque<Pending>,
    donations: BTreeMap<Cidr, Donation>,
    reachable: BTreeSet<PeerName>,
    out: VecDeque<Output>,
    dirty: bool,
    rng: StdRng,
    now: Instant,
    next_seq: u64,
    propose_at: Option<Instant>,
    /// Consensus was asked for without a request ([`Ipam::prime`]): keep proposing.
    primed: bool,
    next_free: Instant,
    last_error: Option<String>,
    /// Our space was handed over by `leave` and not acknowledged yet.
    handover: Option<PendingHandover>,
    /// `leave` succeeded: new requests fail, so no space comes back to us by
    /// donation while the shell waits for the acknowledgement.
    leaving: bool,
    stats: Stats,
}

impl Ipam {
    /// A fresh allocator (no saved state).
    pub fn new(cfg: Config, now: Instant) -> Ipam {
        let ring = match &cfg.init {
            Init::Seeds(s) => Ring::from_seeds(cfg.range, s),
            _ => Ring::empty(cfg.range),
        };
        let paxos = match &cfg.init {
            Init::Consensus(n) => Some(Paxos::new(cfg.me, n / 2 + 1, cfg.range, cfg.signing.clone())),
            Init::Observer => Some(Paxos::observer(cfg.me, cfg.range)),
            Init::Seeds(_) => None,
        };
        let rng = StdRng::seed_from_u64(cfg.seed);
        let dirty = !ring.is_empty();
        Ipam {
            cfg,
            ring,
            paxos,
            allocs: BTreeMap::new(),
            by_id: BTreeMap::new(),
            pending: VecDeque::new(),
            donations: BTreeMap::new(),
            reachable: BTreeSet::new(),
            out: VecDeque::new(),
            dirty,
            rng,
            now,
            next_seq: 1,
            propose_at: None,
            primed: false,
            next_free: now,
            last_error: None,
            handover: None,
            leaving: false,
            stats: Stats::default(),
        }
    }

    /// An allocator from saved state. Refuses state that does not fit the
    /// configuration or breaks the rules (two containers on one address, an
    /// address outside our space), saying what is wrong.
    pub fn restore(cfg: Config, state: State, now: Instant) -> Result<Ipam, String> {
        if state.format == 1 {
            return Err("state format 1 was written by a weft whose ring entries are not signed, which peers now refuse: \
                every peer of the mesh must start afresh (`weft reset --force`, or remove ipam.json once no container uses a weft address)"
                .into());
        }
        if state.format != STATE_FORMAT {
            return Err(format!("state format {} is not the supported {STATE_FORMAT}", state.format));
        }
        if state.range != cfg.range || state.ring.range() != cfg.range {
            return Err(format!(
                "the saved range is {} but --ipalloc-range is {}: start with --ipalloc-range {} or run `weft reset` to leave the mesh's range",
                state.range, cfg.range, state.range
            ));
        }
        state.ring.validate().map_err(|e| format!("the saved ring is invalid: {e}"))?;
        if let Init::Seeds(s) = &cfg.init {
            let want = Ring::from_seeds(cfg.range, s);
            if !state.ring.is_empty() && state.ring.seeds() != want.seeds() {
                return Err(format!(
                    "the saved ring was started by {} but --ipalloc-init names seeds {}",
                    Names(state.ring.seeds().to_vec()),
                    Names(want.seeds().to_vec())
                ));
            }
        }
        let mut ipam = Ipam::new(cfg, now);
        if !state.ring.is_empty() {
            ipam.ring = state.ring;
        }
        if let (Some(p), Some(c)) = (ipam.paxos.as_mut(), state.claims) {
            if p.is_voter() {
                p.restore(c);
            }
        }
        for a in state.allocations {
            if a.id.is_empty() || a.id.len() > MAX_ID_LEN {
                return Err(format!("allocation of {} has a bad container ID", ip(a.addr)));
            }
            if ipam.ring.owner(a.addr) != Some(ipam.cfg.me) {
                return Err(format!("allocation of {} to {} lies outside this peer's space", ip(a.addr), a.id));
            }
            if !a.subnet.contains(a.addr) || !ipam.cfg.range.covers(&a.subnet) {
                return Err(format!("allocation of {} has a bad subnet {}", ip(a.addr), a.subnet));
            }
            if ipam.allocs.contains_key(&a.addr) {
                return Err(format!("{} is allocated twice", ip(a.addr)));
            }
            ipam.by_id.entry(a.id.clone()).or_default().insert(a.addr);
            ipam.allocs.insert(a.addr, a);
        }
        ipam.dirty = false;
        Ok(ipam)
    }

    /// What to persist.
    pub fn state(&self) -> State {
        State {
            format: STATE_FORMAT,
            range: self.cfg.range,
            ring: self.ring.clone(),
            claims: self.paxos.as_ref().and_then(|p| p.own().cloned()),
            allocations: self.allocs.values().cloned().collect(),
        }
    }

    /// Whether the state changed since the last call, or must be saved before
    /// a hand-over acknowledgement leaves (then persist it).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether the state changed and [`Ipam::take_dirty`] has not been called
    /// since: what [`Ipam::state`] returns is not on disk yet. Does not clear it.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Next thing for the shell to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The ring.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Whether the ring is started.
    pub fn ready(&self) -> bool {
        !self.ring.is_empty()
    }

    /// Our containers' addresses, by address.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> + '_ {
        self.allocs.values()
    }

    /// A container's addresses.
    pub fn lookup(&self, id: &str) -> Vec<Allocation> {
        self.by_id.get(id).map(|s| s.iter().filter_map(|a| self.allocs.get(a).cloned()).collect()).unwrap_or_default()
    }

    /// Asks for an address. The answer comes as [`Output::Done`] with `req`,
    /// at once or after consensus or a donation. A container ID that already
    /// holds an address in the subnet gets it back.
    pub fn allocate(&mut self, now: Instant, req: u64, id: &str, want: Want, netns: Option<NetnsRef>) {
        self.now = now;
        if let Err(f) = self.check(id, &want) {
            self.finish(req, Err(f));
            return;
        }
        if self.leaving {
            // As for the requests `leave` cancelled.
            self.finish(req, Err(Failure::new(FailureKind::Timeout, "cancelled: this peer is leaving")));
            return;
        }
        self.pending.push_back(Pending { req, id: id.to_owned(), want, netns });
        self.process();
    }

    fn check(&self, id: &str, want: &Want) -> Result<(), Failure> {
        if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control()) {
            return Err(Failure::new(FailureKind::Invalid, format!("container ID must be 1 to {MAX_ID_LEN} printable characters")));
        }
        let subnet = match want {
            Want::Any(s) | Want::Addr(_, s) => *s,
        };
        if !self.cfg.range.covers(&subnet) {
            return Err(Failure::new(
                FailureKind::Invalid,
                format!("subnet {subnet} is not inside the allocation range {}", self.cfg.range),
            ));
        }
        if let Want::Addr(a, s) = want {
            let (lo, hi) = s.usable();
            if !s.contains(*a) {
                return Err(Failure::new(FailureKind::Invalid, format!("{} is not inside {s}", ip(*a))));
            }
            if u64::from(*a) < lo || u64::from(*a) >= hi {
                return Err(Failure::new(
                    FailureKind::Invalid,
                    format!("{} is the network or broadcast address of {s}", ip(*a)),
                ));
            }
        }
        Ok(())
    }

    /// Gives up on a waiting request.
    pub fn cancel(&mut self, req: u64, why: &str) {
        if let Some(i) = self.pending.iter().position(|p| p.req == req) {
            let p = self.pending.remove(i);
            let blocked = p.and_then(|p| self.donations.get(&p.key()).and_then(|d| d.blocked.clone()));
            let msg = format!("{why}: {}", blocked.unwrap_or_else(|| self.waiting_for()));
            self.finish(req, Err(Failure::new(FailureKind::Timeout, msg)));
        }
    }

    /// Releases a container's addresses (all of them, or one). Waiting
    /// requests of that container are cancelled. Returns what was released.
    pub fn release(&mut self, id: &str, addr: Option<u32>) -> Vec<Allocation> {
        if addr.is_none() {
            let reqs: Vec<u64> = self.pending.iter().filter(|p| p.id == id).map(|p| p.req).collect();
            for r in reqs {
                self.cancel(r, "released while waiting");
            }
        }
        let Some(set) = self.by_id.get_mut(id) else { return Vec::new() };
        let addrs: Vec<u32> = match addr {
            Some(a) if set.remove(&a) => vec![a],
            Some(_) => Vec::new(),
            None => std::mem::take(set).into_iter().collect(),
        };
        if set.is_empty() {
            self.by_id.remove(id);
        }
        let out: Vec<Allocation> = addrs.iter().filter_map(|a| self.allocs.remove(a)).collect();
        if !out.is_empty() {
            self.stats.released += out.len() as u64;
            self.dirty = true;
            self.process();
        }
        out
    }

    /// The peers reachable now (from routes).
    pub fn set_reachable(&mut self, now: Instant, peers: BTreeSet<PeerName>) {
        self.now = now;
        self.reachable = peers;
        for d in self.donations.values_mut() {
            if let Some((donor, _, _)) = d.asking {
                if !self.reachable.contains(&donor) {
                    d.tried.insert(donor);
                    d.last_refusal = Some(format!("{donor} became unreachable"));
                    d.asking = None;
                }
            }
        }
        self.process();
    }

    /// Starts agreeing on the ring now instead of with the first request, for
    /// a caller that asks whether allocation is possible before it asks for
    /// an address (a CNI runtime's STATUS). Proposals repeat until consensus.
    pub fn prime(&mut self, now: Instant) {
        self.now = now;
        if self.ring.is_empty() && !self.primed {
            self.primed = true;
            self.process();
        }
    }

    /// Timers: donor time-outs, proposal retries, free-count updates.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
        for d in self.donations.values_mut() {
            if let Some((donor, _, deadline)) = d.asking {
                if deadline <= now {
                    d.tried.insert(donor);
                    d.last_refusal = Some(format!("{donor} did not answer in time"));
                    d.asking = None;
                }
            }
        }
        if now >= self.next_free {
            self.next_free = now + self.cfg.free_interval;
            if self.refresh_free() {
                self.broadcast_ring();
            }
        }
        self.process();
    }

    /// Takes over every piece of a peer that is gone. Returns the number of
    /// addresses taken. Removing a peer that is still alive breaks the
    /// no-duplicates promise; the shell warns when the peer is reachable.
    pub fn rmpeer(&mut self, now: Instant, peer: PeerName) -> Result<u64, String> {
        self.now = now;
        if self.leaving {
            return Err("this peer is leaving the mesh; space it took over now would be lost when it stops".into());
        }
        if self.ring.is_empty() {
            return Err("the ring is not started yet; there is no space to take over".into());
        }
        if peer == self.cfg.me {
            return Err("cannot remove ourselves; use `weft reset` to leave and hand our space to another peer".into());
        }
        let moved = self.ring.take_over(&self.cfg.signing, self.cfg.me, peer)?;
        if moved == 0 {
            return Err(format!("peer {peer} owns no addresses"));
        }
        self.refresh_free();
        self.dirty = true;
        self.broadcast_ring();
        self.process();
        Ok(moved)
    }

    /// Leaves: hands every piece we own to a reachable peer (the one owning
    /// most already, so the ring stays simple), forgets our allocations and
    /// cancels waiting requests; requests made after it fail. Returns who got
    /// our space and how much, or `None` when we own none and no hand-over is
    /// pending.
    ///
    /// The peer gets a hand-over message and answers it, once our space is on
    /// its disk, with an acknowledgement that becomes [`Output::HandedOver`]
    /// (see "Leaving" in the module docs). Calling `leave` again while that is
    /// pending re-sends the same hand-over (same peer, same sequence number,
    /// our current ring) and returns the same answer: our space is already
    /// that peer's in our ring, so it cannot go to anyone else.
    pub fn leave(&mut self, now: Instant) -> Result<Option<(PeerName, u64)>, String> {
        self.now = now;
        if let Some(h) = self.handover {
            self.send_handover(h);
            return Ok(Some((h.to, h.addresses)));
        }
        let owned: u64 = self.ring.owned(self.cfg.me).iter().map(|(s, e)| e - s).sum();
        if owned == 0 {
            self.leaving = true;
            return Ok(None);
        }
        let shares = self.ring.shares();
        let to = self
            .reachable
            .iter()
            .filter(|p| **p != self.cfg.me)
            .max_by_key(|p| (shares.get(p).map_or(0, |s| s.0), std::cmp::Reverse(**p)))
            .copied()
            .ok_or_else(|| format!("no reachable peer to hand our {owned} addresses to; connect to one first"))?;
        let moved = self.ring.hand_over(&self.cfg.signing, self.cfg.me, to)?;
        let reqs: Vec<u64> = self.pending.iter().map(|p| p.req).collect();
        for r in reqs {
            self.cancel(r, "this peer is leaving");
        }
        self.allocs.clear();
        self.by_id.clear();
        self.dirty = true;
        self.leaving = true;
        let seq = self.next_seq;
        self.next_seq += 1;
        let h = PendingHandover { to, addresses: moved, since: now, seq };
        self.handover = Some(h);
        self.send_handover(h);
        Ok(Some((to, moved)))
    }

    /// The hand-over [`Ipam::leave`] sent and the peer has not acknowledged
    /// yet, for a shell that bounds the wait and says whom it waited for.
    pub fn pending_handover(&self) -> Option<PendingHandover> {
        self.handover
    }

    fn send_handover(&mut self, h: PendingHandover) {
        let m = Msg::Handover { seq: h.seq, ring: self.ring.clone() };
        self.out.push_back(Output::Unicast(h.to, encode(&m)));
        // Everyone else learns of it by gossip as usual; the receiver may well
        // merge this first, and still acknowledges the unicast.
        self.broadcast_ring();
    }

    /// A leaving peer hands its space to us: merge its ring like any other,
    /// then acknowledge. A refused ring gets no acknowledgement.
    fn take_handover(&mut self, from: PeerName, seq: u64, ring: &Ring, keys: &Keys) -> Result<(), String> {
        self.merge_ring(from, ring, keys)?;
        // The acknowledgement tells `from` our ring is on disk; it leaves in
        // this round's outputs, which the shell sends only after saving a
        // dirty state. When the merge changed nothing (the gossiped copy came
        // first, or this is a re-sent hand-over) that ring was saved in an
        // earlier round; asking for a save anyway keeps the promise even if
        // that earlier save failed.
        self.dirty = true;
        self.stats.handovers_taken += 1;
        self.out.push_back(Output::Unicast(from, encode(&Msg::HandoverAck { seq })));
        Ok(())
    }

    /// The peer we handed our space to acknowledged it.
    fn handover_acked(&mut self, from: PeerName, seq: u64) {
        match self.handover {
            Some(h) if h.to == from && h.seq == seq => {
                self.handover = None;
                self.out.push_back(Output::HandedOver { to: h.to, addresses: h.addresses });
            }
            // A late duplicate, or a peer confused about who left: nothing to
            // do, and nothing worth tearing down a connection for.
            _ => self.stats.stray_handover_acks += 1,
        }
    }

    /// For `weft status ipam`.
    pub fn status(&self) -> Status {
        let me = self.cfg.me;
        let mut peers: Vec<Share> = self
            .ring
            .shares()
            .into_iter()
            .map(|(p, (owned, free))| Share {
                peer: p.to_string(),
                owned,
                free: if p == me { self.own_free() } else { free },
                reachable: p == me || self.reachable.contains(&p),
                me: p == me,
            })
            .collect();
        peers.sort_by(|a, b| b.me.cmp(&a.me).then(a.peer.cmp(&b.peer)));
        let unreachable_addresses = peers.iter().filter(|s| !s.reachable).map(|s| s.owned).sum();
        Status {
            range: self.cfg.range.to_string(),
            default_subnet: self.cfg.default_subnet.to_string(),
            init: match &self.cfg.init {
                Init::Consensus(n) => format!("consensus={n}"),
                Init::Seeds(s) => format!("seed={}", Names(s.clone())),
                Init::Observer => "observer".into(),
            },
            ready: !self.ring.is_empty(),
            state: match self.handover {
                Some(h) => format!("leaving: handed {} addresses to {}, waiting for its acknowledgement", h.addresses, h.to),
                None if self.leaving => "left the mesh's range".into(),
                None if self.ring.is_empty() => self.waiting_for(),
                None => "ready".into(),
            },
            seeds: self.ring.seeds().iter().map(|s| s.to_string()).collect(),
            peers,
            unreachable_addresses,
            allocated: self.allocs.len(),
            pending: self.pending.len(),
            last_error: self.last_error.clone(),
        }
    }

    /// Why requests wait, in words.
    fn waiting_for(&self) -> String {
        if !self.ring.is_empty() {
            return "waiting for a donation of space from another peer".into();
        }
        match (&self.cfg.init, &self.paxos) {
            (Init::Observer, _) => "waiting for the ring from other peers (this peer is an observer: it never votes)".into(),
            (Init::Consensus(n), Some(p)) if p.started() => {
                format!("waiting for consensus: {} of {n} peers seen, {} needed", p.known(), p.quorum())
            }
            (Init::Consensus(n), _) => {
                format!("not started: consensus of {n} peers begins with the first allocation request")
            }
            (Init::Seeds(_), _) => "waiting for the ring".into(),
        }
    }

    fn finish(&mut self, req: u64, result: Result<Allocation, Failure>) {
        if result.is_err() {
            self.stats.failed += 1;
        }
        self.out.push_back(Output::Done { req, result });
    }

    fn broadcast_ring(&mut self) {
        if !self.ring.is_empty() {
            self.out.push_back(Output::Broadcast(encode(&Msg::Ring(self.ring.clone()))));
        }
    }

    fn broadcast_claims(&mut self) {
        if let Some(p) = &self.paxos {
            let m = Msg::Paxos { range: self.cfg.range, claims: p.claims().clone() };
            self.out.push_back(Output::Broadcast(encode(&m)));
        }
    }

    /// Free addresses in our pieces.
    fn own_free(&self) -> u64 {
        self.ring
            .owned(self.cfg.me)
            .iter()
            .map(|&(s, e)| (e - s) - self.allocated_in(s, e) as u64)
            .sum()
    }

    fn allocated_in(&self, s: u64, e: u64) -> usize {
        self.allocs.range(s as u32..).take_while(|(a, _)| u64::from(**a) < e).count()
    }

    /// Brings our entries' free counts up to date. Returns whether any changed.
    fn refresh_free(&mut self) -> bool {
        let me = self.cfg.me;
        let counts: Vec<(u32, u32)> = self
            .ring
            .pieces()
            .filter(|p| p.entry.peer == me)
            .map(|p| (p.entry.token, ((p.end - p.start) - self.allocated_in(p.start, p.end) as u64) as u32))
            .collect();
        let mut changed = false;
        for (t, f) in counts {
            changed |= self.ring.set_free(&self.cfg.signing, me, t, f);
        }
        if changed {
            self.dirty = true;
        }
        changed
    }

    /// Our space inside `[lo, hi)`, as runs.
    fn own_runs(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.ring
            .owned(self.cfg.me)
            .into_iter()
            .filter_map(|(s, e)| {
                let (s, e) = (s.max(lo), e.min(hi));
                (s < e).then_some((s, e))
            })
            .collect()
    }

    /// The free runs (no allocation) of our space in `[lo, hi)`, in address
    /// order, found lazily (the first one costs only the allocations before it).
    fn free_runs(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.own_runs(lo, hi).into_iter().flat_map(move |(s, e)| {
            let mut cur = s;
            let mut taken = self.allocs.range(s as u32..).map(|(a, _)| u64::from(*a)).take_while(move |a| *a < e);
            std::iter::from_fn(move || {
                for a in taken.by_ref() {
                    let gap = (a > cur).then_some((cur, a));
                    cur = a + 1;
                    if gap.is_some() {
                        return gap;
                    }
                }
                let rest = (cur < e).then_some((cur, e));
                cur = e;
                rest
            })
        })
    }

    fn first_free(&self, lo: u64, hi: u64) -> Option<u32> {
        self.free_runs(lo, hi).next().map(|(s, _)| s as u32)
    }

    fn record(&mut self, id: &str, addr: u32, subnet: Cidr, netns: Option<NetnsRef>) -> Allocation {
        let a = Allocation { id: id.to_owned(), addr, subnet, netns };
        self.allocs.insert(addr, a.clone());
        self.by_id.entry(id.to_owned()).or_default().insert(addr);
        self.stats.allocated += 1;
        self.dirty = true;
        a
    }

    /// Serves what can be served now. `None`: it must wait.
    fn try_serve(&mut self, p: &Pending) -> Option<Result<Allocation, Failure>> {
        let subnet = match p.want {
            Want::Any(s) | Want::Addr(_, s) => s,
        };
        // The same container asking again gets what it has.
        let held: Option<u32> = self.by_id.get(&p.id).and_then(|s| {
            s.iter().copied().find(|a| match p.want {
                Want::Any(sub) => sub.contains(*a) && self.allocs.get(a).is_some_and(|x| x.subnet == sub),
                Want::Addr(want, _) => *a == want,
            })
        });
        if let Some(a) = held {
            let netns = p.netns.clone();
            let entry = self.allocs.get_mut(&a)?;
            if netns.is_some() && entry.netns != netns {
                entry.netns = netns;
                self.dirty = true;
            }
            return Some(Ok(entry.clone()));
        }
        if let Want::Addr(a, _) = p.want {
            if let Some(x) = self.allocs.get(&a) {
                return Some(Err(Failure::new(
                    FailureKind::InUse,
                    format!("{} is already taken by container {}", ip(a), x.id),
                )));
            }
        }
        if self.ring.is_empty() {
            return None;
        }
        let addr = match p.want {
            Want::Any(s) => {
                let (lo, hi) = s.usable();
                self.first_free(lo, hi)?
            }
            Want::Addr(a, _) => {
                if self.ring.owner(a) != Some(self.cfg.me) {
                    return None;
                }
                a
            }
        };
        Some(Ok(self.record(&p.id, addr, subnet, p.netns.clone())))
    }

    /// Serves, starts donations or consensus for, or fails every waiting request.
    fn process(&mut self) {
        let mut waiting = VecDeque::new();
        let mut failed: BTreeMap<Cidr, Failure> = BTreeMap::new();
        while let Some(p) = self.pending.pop_front() {
            if let Some(r) = self.try_serve(&p) {
                if r.is_ok() {
                    self.donations.remove(&p.key());
                }
                self.finish(p.req, r);
                continue;
            }
            if self.ring.is_empty() {
                waiting.push_back(p);
                continue;
            }
            let key = p.key();
            if let Some(f) = failed.get(&key) {
                let f = f.clone();
                self.finish(p.req, Err(f));
                continue;
            }
            match self.ask_for_space(key) {
                Ok(()) => waiting.push_back(p),
                Err(f) => {
                    failed.insert(key, f.clone());
                    self.finish(p.req, Err(f));
                }
            }
        }
        self.pending = waiting;
        if self.ring.is_empty() && (!self.pending.is_empty() || self.primed) {
            self.maybe_propose();
        }
    }

    fn maybe_propose(&mut self) {
        let now = self.now;
        let Some(p) = self.paxos.as_mut() else { return };
        if !p.is_voter() {
            return;
        }
        if self.propose_at.is_some_and(|t| t > now) {
            return;
        }
        p.propose();
        let base = self.cfg.proposal_timeout;
        let backoff = base + base.mul_f64(self.rng.random::<f64>());
        self.propose_at = Some(now + backoff);
        self.dirty = true;
        self.after_paxos();
        self.broadcast_claims();
    }

    /// Builds the ring once consensus is reached.
    fn after_paxos(&mut self) {
        if !self.ring.is_empty() {
            return;
        }
        if let Some(v) = self.paxos.as_ref().and_then(|p| p.consensus()) {
            self.ring = Ring::from_seeds(self.cfg.range, &v);
            self.dirty = true;
            self.broadcast_ring();
            self.process();
        }
    }

    /// Makes sure a donation toward `key` is under way. Errs when nobody is
    /// left to ask.
    fn ask_for_space(&mut self, key: Cidr) -> Result<(), Failure> {
        if self.donations.get(&key).is_some_and(|d| d.asking.is_some()) {
            return Ok(());
        }
        let me = self.cfg.me;
        let (lo, hi) = key.usable();
        let tried = self.donations.get(&key).map(|d| d.tried.clone()).unwrap_or_default();
        // Each owner of space in the key, scored by its free addresses there
        // (estimated from its entries' free counts).
        let mut score: BTreeMap<PeerName, f64> = BTreeMap::new();
        for p in self.ring.pieces() {
            let (s, e) = (p.start.max(lo), p.end.min(hi));
            if s >= e || p.entry.peer == me {
                continue;
            }
            let part = (e - s) as f64 / (p.end - p.start) as f64;
            *score.entry(p.entry.peer).or_default() += f64::from(p.entry.free) * part;
        }
        let best = score
            .iter()
            .filter(|(p, _)| self.reachable.contains(p) && !tried.contains(p))
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(p, _)| *p);
        let Some(donor) = best else {
            let f = self.no_space(key, &score);
            if f.kind == FailureKind::Unreachable {
                // Peers with space there are unreachable: they may be connecting
                // still, or come back. Wait for them; the caller's time-out (see
                // `cancel`) bounds the wait and reports this reason.
                self.donations.entry(key).or_default().blocked = Some(f.message);
                return Ok(());
            }
            self.donations.remove(&key);
            return Err(f);
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = self.now + self.cfg.donation_timeout;
        let d = self.donations.entry(key).or_default();
        d.asking = Some((donor, seq, deadline));
        d.blocked = None;
        // Fresh free counts: the donor gives only to a peer whose own count
        // says it has no free address there.
        self.refresh_free();
        // Our ring first: the donor may not have it (or all of it) yet.
        self.out.push_back(Output::Unicast(donor, encode(&Msg::Ring(self.ring.clone()))));
        self.out.push_back(Output::Unicast(donor, encode(&Msg::Request { seq, range: key })));
        Ok(())
    }

    /// The failure for a request nobody can serve.
    fn no_space(&self, key: Cidr, owners: &BTreeMap<PeerName, f64>) -> Failure {
        let d = self.donations.get(&key);
        let refusal = d.and_then(|d| d.last_refusal.clone());
        if key.prefix == 32 {
            let a = ip(key.addr);
            return match self.ring.owner(key.addr) {
                Some(o) if !self.reachable.contains(&o) => Failure::new(
                    FailureKind::Unreachable,
                    format!("{a} belongs to peer {o}, which is unreachable; if it is gone for good, `weft rmpeer {o}` takes its space over"),
                ),
                Some(o) => Failure::new(
                    FailureKind::InUse,
                    format!("peer {o} owns {a} and did not give it: {}", refusal.unwrap_or_else(|| "no answer".into())),
                ),
                None => Failure::new(FailureKind::Invalid, format!("{a} is outside the range")),
            };
        }
        let unreachable: Vec<PeerName> = owners.keys().filter(|p| !self.reachable.contains(p)).copied().collect();
        let held: u64 = self
            .ring
            .pieces()
            .filter(|p| unreachable.contains(&p.entry.peer))
            .map(|p| {
                let (lo, hi) = key.usable();
                p.end.min(hi).saturating_sub(p.start.max(lo))
            })
            .sum();
        let (lo, hi) = key.usable();
        let mut msg = format!("no free address in {key} ({} usable): this peer's share is full", hi - lo);
        let asked = d.map_or(0, |d| d.tried.len());
        if asked > 0 {
            let _ = write!(msg, " and the {asked} peer(s) asked had none to give");
            if let Some(r) = refusal {
                let _ = write!(msg, " (last: {r})");
            }
        } else if owners.is_empty() {
            msg.push_str(" and no other peer owns space there");
        }
        if unreachable.is_empty() {
            Failure::new(FailureKind::Exhausted, msg)
        } else {
            let _ = write!(
                msg,
                "; {held} of its addresses belong to unreachable peers {}: if they are gone for good, `weft rmpeer` them",
                Names(unreachable)
            );
            Failure::new(FailureKind::Unreachable, msg)
        }
    }

    /// A peer asks us for space in `range`.
    fn donate(&mut self, from: PeerName, seq: u64, range: Cidr) {
        let refuse = |ipam: &mut Ipam, reason: String| {
            ipam.stats.refusals += 1;
            // Our ring first: the asker's may not know yet whom we gave the
            // space to (it then asks them next instead of failing).
            if !ipam.ring.is_empty() {
                ipam.out.push_back(Output::Unicast(from, encode(&Msg::Ring(ipam.ring.clone()))));
            }
            ipam.out.push_back(Output::Unicast(from, encode(&Msg::Refused { seq, reason })));
        };
        if self.ring.is_empty() {
            return refuse(self, "no ring yet".into());
        }
        if !self.cfg.range.covers(&range) {
            return refuse(self, format!("{range} is outside the range {}", self.cfg.range));
        }
        let (lo, hi) = range.usable();
        // A peer asks only when it has no free address where it asks (it sends
        // its ring, with fresh free counts it signed, ahead of the request). So
        // a flood of requests from one peer takes one donation, and the next
        // only once its own count says it used what it got.
        if range.prefix == 32 {
            let unused = self.ring.pieces().filter(|p| p.entry.peer == from && p.end - p.start == 1 && p.entry.free > 0).count();
            if unused >= MAX_UNUSED_CLAIMS {
                return refuse(self, format!("{from} holds {unused} claimed addresses it has not used yet, by its own count"));
            }
        } else {
            let unused: u64 = self
                .ring
                .pieces()
                .filter(|p| p.entry.peer == from && p.start >= lo && p.end <= hi)
                .map(|p| u64::from(p.entry.free))
                .sum();
            if unused > 0 {
                return refuse(self, format!("{from} still has {unused} free addresses in {range}, by its own count"));
            }
        }
        let Some((s, e)) = self.free_runs(lo, hi).max_by_key(|(s, e)| (e - s, std::cmp::Reverse(*s))) else {
            let why = if range.prefix == 32 {
                match (self.ring.owner(range.addr), self.allocs.get(&range.addr)) {
                    (_, Some(a)) => format!("{} is in use by container {}", ip(range.addr), a.id),
                    (Some(o), None) => format!("{} is owned by {o}, not by {}", ip(range.addr), self.cfg.me),
                    (None, None) => format!("{} is outside the range", ip(range.addr)),
                }
            } else {
                format!("{} has no free address in {range}", self.cfg.me)
            };
            return refuse(self, why);
        };
        // Half of the largest free run (its upper half), at least one address.
        let give = ((e - s) / 2).max(1);
        let start = e - give;
        if let Err(why) = self.ring.give(&self.cfg.signing, self.cfg.me, from, start, e) {
            return refuse(self, why);
        }
        self.stats.donated += 1;
        self.refresh_free();
        self.dirty = true;
        self.out.push_back(Output::Unicast(from, encode(&Msg::Donated { seq, ring: self.ring.clone() })));
        self.broadcast_ring();
    }

    /// Merges a ring from a peer. Returns whether ours changed.
    fn merge_ring(&mut self, from: PeerName, ring: &Ring, keys: &Keys) -> Result<bool, String> {
        let was_empty = self.ring.is_empty();
        match self.ring.merge(ring, self.cfg.me, keys, &self.reachable) {
            Ok(changed) => {
                if changed {
                    self.dirty = true;
                    if was_empty {
                        self.propose_at = None;
                    }
                    self.process();
                }
                Ok(changed)
            }
            Err(e) => {
                self.stats.refused_rings += 1;
                let msg = format!("ring from {from} refused: {e}");
                match e {
                    RingError::Forged { reason, .. } => self.count_forged(from, reason, msg.clone()),
                    RingError::Forked { .. } => self.count_forged(from, "forked", msg.clone()),
                    _ => self.last_error = Some(msg.clone()),
                }
                Err(msg)
            }
        }
    }

    /// Counts a gossip entry from `from` dropped as forged.
    fn count_forged(&mut self, from: PeerName, reason: &'static str, msg: String) {
        let reason = FORGED_REASONS.iter().copied().find(|r| *r == reason).unwrap_or("other");
        *self.stats.forged.entry(reason).or_default() += 1;
        *self.stats.forged_from.entry(from.to_string()).or_default() += 1;
        self.last_error = Some(msg);
    }

    fn decode(payload: &[u8]) -> Result<Msg, String> {
        postcard::from_bytes(payload).map_err(|e| format!("malformed IPAM message: {e}"))
    }
}

impl GossipChannel for Ipam {
    fn encode_full(&self) -> Vec<u8> {
        if !self.ring.is_empty() {
            encode(&Msg::Ring(self.ring.clone()))
        } else {
            match &self.paxos {
                Some(p) if p.known() > 0 => encode(&Msg::Paxos { range: self.cfg.range, claims: p.claims().clone() }),
                _ => Vec::new(),
            }
        }
    }

    fn merge(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<Option<Vec<u8>>, String> {
        if payload.is_empty() {
            return Ok(None);
        }
        match Ipam::decode(payload)? {
            Msg::Ring(r) => {
                if self.merge_ring(from, &r, keys)? {
                    Ok(Some(encode(&Msg::Ring(self.ring.clone()))))
                } else {
                    Ok(None)
                }
            }
            Msg::Paxos { range, claims } => {
                if range != self.cfg.range {
                    let msg = format!(
                        "consensus from {from} is over {range} but ours is over {}: every peer must use the same --ipalloc-range",
                        self.cfg.range
                    );
                    self.last_error = Some(msg.clone());
                    return Err(msg);
                }
                Paxos::validate(&claims).map_err(|e| format!("invalid consensus claims: {e}"))?;
                if !self.ring.is_empty() {
                    // The sender has not got the ring yet: send it.
                    self.out.push_back(Output::Unicast(from, encode(&Msg::Ring(self.ring.clone()))));
                    return Ok(None);
                }
                let Some(p) = self.paxos.as_mut() else { return Ok(None) };
                let own_before = p.own().cloned();
                let merged = p.merge(&claims, keys);
                for (voter, e) in &merged.refused {
                    self.count_forged(from, forged_label(e), format!("consensus claim of {voter} from {from} dropped: {e}"));
                }
                if !merged.changed {
                    return Ok(None);
                }
                let Some(p) = self.paxos.as_ref() else { return Ok(None) };
                let delta = encode(&Msg::Paxos { range, claims: p.claims().clone() });
                let own_changed = p.own() != own_before.as_ref();
                self.after_paxos();
                if own_changed {
                    // We promised or accepted: progress, so hold back our own retry,
                    // and tell the sender too (a delta is never passed back to the
                    // neighbour it came from, and the proposer may be that neighbour).
                    self.dirty = true;
                    self.propose_at = Some(self.now + self.cfg.proposal_timeout);
                    self.out.push_back(Output::Broadcast(delta));
                    return Ok(None);
                }
                Ok(Some(delta))
            }
            _ => Err("a unicast IPAM message (donation, hand-over) arrived as gossip".into()),
        }
    }

    fn handle_unicast(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<(), String> {
        match Ipam::decode(payload)? {
            Msg::Request { seq, range } => {
                self.donate(from, seq, range);
                Ok(())
            }
            Msg::Donated { seq, ring } => {
                let r = self.merge_ring(from, &ring, keys);
                // `from` is authenticated: only the donor we asked ends the wait.
                match self.donations.values_mut().find(|d| d.asking.is_some_and(|(p, s, _)| p == from && s == seq)) {
                    Some(d) => {
                        d.asking = None;
                        d.tried.clear();
                        self.stats.received += 1;
                    }
                    None => self.stats.stray_answers += 1,
                }
                self.process();
                r.map(|_| ())
            }
            Msg::Refused { seq, reason } => {
                match self.donations.values_mut().find(|d| d.asking.is_some_and(|(p, s, _)| p == from && s == seq)) {
                    Some(d) => {
                        self.stats.refusals += 1;
                        if let Some((donor, _, _)) = d.asking.take() {
                            d.tried.insert(donor);
                        }
                        d.last_refusal = Some(reason);
                    }
                    None => self.stats.stray_answers += 1,
                }
                self.process();
                Ok(())
            }
            Msg::Ring(r) => self.merge_ring(from, &r, keys).map(|_| ()),
            Msg::Handover { seq, ring } => self.take_handover(from, seq, &ring, keys),
            Msg::HandoverAck { seq } => {
                self.handover_acked(from, seq);
                Ok(())
            }
            Msg::Paxos { .. } => Err("consensus claims arrived as a unicast".into()),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Postcard numbers enum variants by position: the hand-over messages come
    /// after the older ones, which keep their numbers (a peer of an older
    /// version still decodes everything it knows).
    #[test]
    fn handover_messages_keep_their_wire_numbers() {
        let range: Cidr = "10.32.0.0/30".parse().expect("cidr");
        let ring = Ring::empty(range);
        assert_eq!(encode(&Msg::Ring(ring.clone()))[0], 0);
        assert_eq!(encode(&Msg::Refused { seq: 1, reason: String::new() }), [4, 1, 0]);
        assert_eq!(encode(&Msg::Handover { seq: 7, ring: ring.clone() })[..2], [5, 7]);
        assert_eq!(&encode(&Msg::Handover { seq: 7, ring: ring.clone() })[2..], &postcard::to_stdvec(&ring).expect("ring")[..]);
        assert_eq!(encode(&Msg::HandoverAck { seq: 7 }), [6, 7]);
        assert_eq!(encode(&Msg::HandoverAck { seq: 300 }), [6, 0xac, 0x02]);
    }

    /// A peer with neither a ring nor claims has nothing to gossip: its full
    /// state is empty, which the router does not send, and an empty payload
    /// (from a router that still sends one) changes nothing.
    #[test]
    fn nothing_to_say_is_an_empty_payload_and_merges_as_nothing() {
        let now = Instant::now();
        let range: Cidr = "10.32.0.0/24".parse().expect("cidr");
        let key = SigningKey::from_seed(&[1; 32]).expect("key");
        let cfg = Config::new(PeerName::from_u64(1), range, None, Init::Consensus(2), 1, key).expect("config");
        let mut ipam = Ipam::new(cfg, now);
        assert!(ipam.encode_full().is_empty());
        assert_eq!(ipam.merge(PeerName::from_u64(2), &[], &weft_proto::Keys::new(weft_proto::Trust::FirstUse)), Ok(None));
        assert!(!ipam.is_dirty());
        assert_eq!(ipam.poll_output(), None);
        ipam.prime(now);
        assert!(!ipam.encode_full().is_empty(), "claims to gossip once consensus starts");
    }

    /// Claims forged for voters that do not exist, or in another voter's name,
    /// arriving as gossip: nothing merges, no delta is passed on, nothing is
    /// queued, and each is counted by reason and against the neighbour that
    /// sent it.
    #[test]
    fn forged_consensus_gossip_is_dropped_counted_and_not_relayed() {
        use crate::paxos::{ProposalId, SignedClaims};
        use weft_proto::identity::Claim;
        let now = Instant::now();
        let range: Cidr = "10.32.0.0/24".parse().expect("cidr");
        let key = |i: u8| SigningKey::from_seed(&[i; 32]).expect("key");
        let (me, honest, rogue) = (PeerName::from_u64(1), PeerName::from_u64(2), PeerName::from_u64(3));
        let mut keys = Keys::new(weft_proto::Trust::FirstUse);
        for (n, k) in [(me, 1), (honest, 2), (rogue, 3)] {
            keys.admit(&Claim::self_signed(&key(k), n)).expect("admit");
        }
        let cfg = Config::new(me, range, None, Init::Consensus(3), 1, key(1)).expect("config");
        let mut ipam = Ipam::new(cfg, now);
        let evil = ProposalId { round: 9, proposer: rogue };
        let c = Claims { promise: evil, accepted: Some((evil, vec![rogue])) };
        let mut claims = ClaimsMap::new();
        claims.insert(honest, SignedClaims::sign(&key(3), range, honest, c.clone()));
        claims.insert(PeerName::from_u64(99), SignedClaims::sign(&key(3), range, PeerName::from_u64(99), c));
        let payload = encode(&Msg::Paxos { range, claims });
        // A fresh voter that hears claims adds its own (empty) ones and gossips
        // them; nothing of the forged claims goes with them.
        let delta = ipam.merge(rogue, &payload, &keys).expect("merge");
        let mut sent: Vec<Vec<u8>> = delta.into_iter().collect();
        while let Some(o) = ipam.poll_output() {
            match o {
                Output::Broadcast(p) | Output::Unicast(_, p) => sent.push(p),
                o => panic!("unexpected {o:?}"),
            }
        }
        for p in &sent {
            match Ipam::decode(p).expect("decode") {
                Msg::Paxos { claims, .. } => assert_eq!(claims.keys().copied().collect::<Vec<_>>(), vec![me]),
                _ => panic!("not claims"),
            }
        }
        assert_eq!(ipam.paxos.as_ref().map(|p| p.known()), Some(1));
        assert!(!ipam.ready());
        assert_eq!(ipam.stats().forged.get("bad_signature"), Some(&1));
        assert_eq!(ipam.stats().forged.get("unknown_key"), Some(&1));
        assert_eq!(ipam.stats().forged_from.get(&rogue.to_string()), Some(&2));
        assert!(ipam.status().last_error.is_some_and(|e| e.contains("from")));
    }

    /// A flood of donation requests from one (authenticated) peer takes one
    /// donation: the next ones are refused while the ring it signed says it
    /// has free addresses there. Answers go to the requester only.
    #[test]
    fn a_flood_of_requests_takes_one_donation() {
        use weft_proto::identity::Claim;
        let now = Instant::now();
        let range: Cidr = "10.32.0.0/24".parse().expect("cidr");
        let key = |i: u8| SigningKey::from_seed(&[i; 32]).expect("key");
        let (donor, greedy) = (PeerName::from_u64(1), PeerName::from_u64(2));
        let mut keys = Keys::new(weft_proto::Trust::FirstUse);
        for (n, k) in [(donor, 1), (greedy, 2)] {
            keys.admit(&Claim::self_signed(&key(k), n)).expect("admit");
        }
        let init = Init::Seeds(vec![donor, greedy]);
        let mut d = Ipam::new(Config::new(donor, range, None, init, 1, key(1)).expect("config"), now);
        let owned = |ipam: &Ipam, p: PeerName| -> u64 { ipam.ring().owned(p).iter().map(|(s, e)| e - s).sum() };
        // The greedy peer's own share is full by its own (signed) count.
        let mut g_ring = d.ring().clone();
        for p in g_ring.clone().pieces().filter(|p| p.entry.peer == greedy) {
            g_ring.set_free(&key(2), greedy, p.entry.token, 0);
        }
        d.handle_unicast(greedy, &encode(&Msg::Ring(g_ring)), &keys).expect("ring");
        while d.poll_output().is_some() {}
        let before = owned(&d, donor);
        for seq in 1..=50 {
            d.handle_unicast(greedy, &encode(&Msg::Request { seq, range }), &keys).expect("request");
        }
        let (mut donated, mut refused) = (0, 0);
        while let Some(o) = d.poll_output() {
            match o {
                Output::Unicast(to, p) => {
                    assert_eq!(to, greedy, "an answer went to another peer than the requester");
                    match Ipam::decode(&p).expect("decode") {
                        Msg::Donated { .. } => donated += 1,
                        Msg::Refused { reason, .. } => {
                            assert!(reason.contains("free addresses"), "{reason}");
                            refused += 1;
                        }
                        _ => {}
                    }
                }
                Output::Broadcast(_) => {}
                o => panic!("unexpected {o:?}"),
            }
        }
        assert_eq!((donated, refused), (1, 49));
        let given = before - owned(&d, donor);
        assert!(given > 0 && given <= before / 2 + 1, "gave {given} of {before}");
    }

    /// A ring in which a peer gave itself another peer's piece, gossiped:
    /// refused whole (no delta to pass on, our ring unchanged), counted by
    /// reason and against the neighbour that sent it.
    #[test]
    fn a_forged_ring_is_refused_counted_and_not_relayed() {
        use weft_proto::identity::Claim;
        let now = Instant::now();
        let range: Cidr = "10.32.0.0/24".parse().expect("cidr");
        let key = |i: u8| SigningKey::from_seed(&[i; 32]).expect("key");
        let (me, victim, rogue) = (PeerName::from_u64(1), PeerName::from_u64(2), PeerName::from_u64(3));
        let mut keys = Keys::new(weft_proto::Trust::FirstUse);
        for (n, k) in [(me, 1), (victim, 2), (rogue, 3)] {
            keys.admit(&Claim::self_signed(&key(k), n)).expect("admit");
        }
        let init = Init::Seeds(vec![me, victim, rogue]);
        let mut ipam = Ipam::new(Config::new(me, range, None, init, 1, key(1)).expect("config"), now);
        while ipam.poll_output().is_some() {}
        // The rogue signs, as the victim's donor, a grant of the victim's piece to itself.
        let mut forged = ipam.ring().clone();
        let (s, e) = forged.owned(victim)[0];
        forged.give(&key(3), victim, rogue, s, e).expect("the ring API signs what it is told");
        let before = ipam.ring().clone();
        let r = ipam.merge(rogue, &encode(&Msg::Ring(forged)), &keys);
        assert!(r.as_ref().is_err_and(|e| e.contains("does not verify")), "{r:?}");
        assert_eq!(ipam.ring(), &before);
        assert_eq!(ipam.poll_output(), None, "nothing passed on");
        assert_eq!(ipam.stats().forged.get("bad_signature"), Some(&1));
        assert_eq!(ipam.stats().forged_from.get(&rogue.to_string()), Some(&1));
    }

    /// Only the donor asked ends the wait: a refusal (or a donation) for our
    /// request's number from another peer changes nothing of it.
    #[test]
    fn answers_count_only_from_the_donor_asked() {
        let now = Instant::now();
        let range: Cidr = "10.32.0.0/24".parse().expect("cidr");
        let key = |i: u8| SigningKey::from_seed(&[i; 32]).expect("key");
        let (me, donor, other) = (PeerName::from_u64(1), PeerName::from_u64(2), PeerName::from_u64(3));
        let init = Init::Seeds(vec![me, donor, other]);
        let mut ipam = Ipam::new(Config::new(me, range, None, init, 1, key(1)).expect("config"), now);
        ipam.set_reachable(now, BTreeSet::from([donor, other]));
        let (s, _) = ipam.ring().owned(donor)[0];
        ipam.allocate(now, 7, "c", Want::Addr(s as u32 + 5, range), None);
        let mut seq = None;
        while let Some(o) = ipam.poll_output() {
            if let Output::Unicast(to, p) = o {
                if let Ok(Msg::Request { seq: q, .. }) = Ipam::decode(&p) {
                    assert_eq!(to, donor);
                    seq = Some(q);
                }
            }
        }
        let seq = seq.expect("a request to the donor");
        let keys = Keys::new(weft_proto::Trust::FirstUse);
        let refusal = encode(&Msg::Refused { seq, reason: "forged".into() });
        ipam.handle_unicast(other, &refusal, &keys).expect("ignored");
        assert_eq!(ipam.stats().stray_answers, 1);
        assert_eq!(ipam.status().pending, 1, "still waiting for the donor");
        assert!(!std::iter::from_fn(|| ipam.poll_output()).any(|o| matches!(o, Output::Done { .. })));
        ipam.handle_unicast(donor, &refusal, &keys).expect("refusal");
        assert!(std::iter::from_fn(|| ipam.poll_output()).any(|o| matches!(o, Output::Done { req: 7, result: Err(_) })));
    }
}
