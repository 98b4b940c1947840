//! The control-plane state machine: connections, targets to dial, gossip
//! (topology plus pluggable channels) and routes.
//!
//! Sans-IO: the caller owns sockets and clocks. Feed it with `handle_*(now, ..)`;
//! after every call drain [`Router::poll_transmit`] (messages to send on a
//! control connection) and [`Router::poll_event`] (things the shell must do:
//! dial, close, reprogram the data path), then arm one timer at
//! [`Router::poll_timeout`] and call [`Router::handle_timeout`] when it fires.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::identity::{
    signed_bytes, Admitted, Certificate, Claim, Keys, Refused, Rekey, Revocation, Signature, SigningKey, Trust,
    DOMAIN_BINDING, DOMAIN_UNICAST,
};
use crate::topology::{ConnectionInfo, Merged, PeerInfo, Routes, Topology, TopologyError};
use crate::PeerName;

/// The name of the built-in topology channel.
pub const TOPOLOGY_CHANNEL: &str = "topology";
/// The name of the built-in channel of name claims, re-keys and revocations.
pub const IDENTITY_CHANNEL: &str = "identity";
/// Most re-keys kept (one per name).
const MAX_REKEYS: usize = 4096;
/// Most neighbours forgeries are counted for.
const MAX_FORGERS: usize = 1024;
/// Hops a unicast gossip message may take.
const UNICAST_TTL: u8 = 32;
/// The unicast channel of hole punching: "I am dialling you over UDP now; dial me back".
pub const PUNCH_CHANNEL: &str = "punch";

/// A connection handle, allocated by the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnId(pub u64);

/// Messages carried on a control connection after the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// Keeps the connection alive; carries nothing.
    Heartbeat,
    /// Gossip for a channel: full state or a delta; merged and passed on.
    Gossip {
        /// Channel name ("topology", "ipam", ...).
        channel: String,
        /// Channel-specific encoding.
        payload: Vec<u8>,
    },
    /// A message for one peer, relayed along unicast routes.
    Unicast {
        /// Originating peer.
        src: PeerName,
        /// Destination peer.
        dst: PeerName,
        /// Channel name.
        channel: String,
        /// Channel-specific encoding.
        payload: Vec<u8>,
        /// Hops left.
        ttl: u8,
        /// `src`'s signature of `(src, dst, channel, payload)`.
        sig: Signature,
    },
    /// Whether the sender hears our sleeve heartbeats (the UDP path towards it works).
    SleeveState {
        /// True when heartbeats arrive.
        receiving: bool,
    },
    /// Periodic anti-entropy: a digest of a channel's state. The receiver
    /// answers with what the sender lacks and, unless this is itself a reply,
    /// with its own digest when it lacks something.
    Digest {
        /// Channel name (only "topology" so far).
        channel: String,
        /// Postcard `Vec<(name, version, uid)>`.
        payload: Vec<u8>,
        /// Whether this answers a digest (never answered in turn).
        reply: bool,
    },
    /// Whether the sender hears our fastpath heartbeats (the VXLAN path towards it works).
    FastpathState {
        /// True when heartbeats arrive, enough of them in a row.
        receiving: bool,
    },
    /// Where the sender sees our sleeve datagrams come from (what a STUN server would say):
    /// behind a NAT, its outside address and port for us.
    Observed {
        /// The source address of our authenticated datagrams, as the sender receives them.
        udp: SocketAddr,
    },
}

/// How an address may be dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Transport {
    /// An address a peer listens on, or one the operator gave: TCP, or QUIC over UDP where TCP
    /// does not get through (the shell's `--transport` decides).
    Any,
    /// A peer's outside UDP address as its neighbours see it (a NAT's): QUIC only, dialled by
    /// both ends at once (see [`PUNCH_CHANNEL`]).
    Udp,
}

/// A piece of replicated state that rides on gossip (IPAM, DNS, ...).
pub trait GossipChannel: Any + Send {
    /// The whole state, for anti-entropy and new neighbours. An empty payload
    /// means nothing to send now: the router sends nothing for this channel
    /// (a channel with no state yet, or holding its state back until it is
    /// saved).
    fn encode_full(&self) -> Vec<u8>;
    /// Merges a payload from a neighbour. Returns the encoded delta of what was
    /// new (to pass on), `None` when nothing was, or a description of why the
    /// payload was refused (nothing of it applied).
    ///
    /// `keys` holds the key bound to each known name: a channel verifies its entries' origin
    /// signatures against it and never merges or passes on an entry it cannot verify.
    fn merge(&mut self, from: PeerName, payload: &[u8], keys: &Keys) -> Result<Option<Vec<u8>>, String>;
    /// A message addressed to this peer alone. `from` is authenticated: the router checked
    /// the sender's signature of the whole message.
    fn handle_unicast(&mut self, _from: PeerName, _payload: &[u8], _keys: &Keys) -> Result<(), String> {
        Ok(())
    }
    /// For downcasting to the concrete type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Static settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Our name.
    pub name: PeerName,
    /// Our identity key: signs our topology entry, our unicast messages and our claim.
    pub key: SigningKey,
    /// How names are bound to keys in this mesh.
    pub trust: Trust,
    /// Our certificate, when the mesh has a CA.
    pub certificate: Option<Certificate>,
    /// The TCP port we listen on: announced with the addresses we are reached at.
    pub listen_port: u16,
    /// Our nickname.
    pub nickname: String,
    /// Fresh on every start.
    pub uid: u64,
    /// First version of our topology entry. The shell passes the start time in
    /// microseconds so a restarted peer's entries outrank its previous life's.
    pub initial_version: u64,
    /// Seed for every random choice (fan-out, jitter).
    pub seed: u64,
    /// Dial peers learned from other peers.
    pub discovery: bool,
    /// Period of anti-entropy gossip.
    pub gossip_interval: Duration,
    /// Neighbours each gossip goes to.
    pub fanout: usize,
    /// First reconnection delay; doubles per failure.
    pub retry_initial: Duration,
    /// Reconnection delay cap.
    pub retry_max: Duration,
}

impl RouterConfig {
    /// Defaults for a peer with this name and identity key.
    pub fn new(name: PeerName, nickname: String, uid: u64, seed: u64, key: SigningKey) -> Self {
        RouterConfig {
            name,
            key,
            trust: Trust::FirstUse,
            certificate: None,
            listen_port: 6783,
            nickname,
            uid,
            initial_version: 1,
            seed,
            discovery: true,
            gossip_interval: Duration::from_secs(10),
            fanout: 4,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// What the remote end said about itself once the handshake completed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Its name.
    pub name: PeerName,
    /// Its nickname.
    pub nickname: String,
    /// Its current UID.
    pub uid: u64,
    /// The TCP port it listens on (for discovery by others).
    pub listen_port: u16,
    /// The proof that its identity key may use its name.
    pub claim: Claim,
    /// Its identity key's signature of this connection's binding value (see
    /// [`Hello::prove`]): the key is in use at the other end of this very connection.
    pub proof: Signature,
}

impl Hello {
    /// Our hello on the connection whose handshake produced `binding` (a value both ends
    /// derive from the handshake and that no other connection has).
    pub fn prove(key: &SigningKey, claim: Claim, nickname: String, uid: u64, listen_port: u16, binding: &[u8; 32]) -> Hello {
        let name = claim.name;
        let proof = key.sign(DOMAIN_BINDING, &signed_bytes(&(name, binding)));
        Hello { name, nickname, uid, listen_port, claim, proof }
    }

    fn check(&self, binding: &[u8; 32]) -> Result<(), Refused> {
        let name = self.name;
        if self.claim.name != name {
            return Err(Refused::BadSignature { name, what: "claim for another name" });
        }
        if !self.claim.key.verify(DOMAIN_BINDING, &signed_bytes(&(name, binding)), &self.proof) {
            return Err(Refused::BadSignature { name, what: "connection binding" });
        }
        Ok(())
    }
}

/// What the shell knows of a connection beyond the peer's hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Our end's address: the address this peer was reached at (outbound: the one it used).
    pub local: SocketAddr,
    /// The handshake's binding value (see [`Hello::prove`]).
    pub binding: [u8; 32],
}

/// Why a new connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// We dialed ourselves.
    #[error("connected to ourselves")]
    OurSelf,
    /// Another connection to the same peer wins the tie-break.
    #[error("duplicate connection to {0}: keeping the other one")]
    Duplicate(PeerName),
    /// The peer did not prove that its key may use its name.
    #[error("{0}")]
    Identity(Refused),
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Dial this address.
    Connect {
        /// Where to dial.
        addr: SocketAddr,
        /// How.
        transport: Transport,
    },
    /// Close this connection.
    Disconnect {
        /// Which connection.
        conn: ConnId,
        /// Why (for the log).
        reason: String,
    },
    /// Routes changed: reprogram the data path from [`Router::routes`].
    RoutesChanged,
    /// Name bindings changed (a new claim, a re-key, a revocation): persist
    /// [`Router::identity_state`].
    IdentitiesChanged,
    /// A neighbour passed on entries that did not verify; they were dropped. For the log.
    Forged {
        /// The neighbour that sent them.
        from: PeerName,
        /// What was wrong, for each.
        reasons: Vec<Refused>,
    },
    /// A channel the router does not know got a unicast message for us.
    Unicast {
        /// Sender.
        from: PeerName,
        /// Channel.
        channel: String,
        /// Body.
        payload: Vec<u8>,
    },
}

/// A message for one control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The connection.
    pub conn: ConnId,
    /// The message.
    pub msg: ControlMsg,
}

/// A live control connection.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The remote peer.
    pub peer: PeerName,
    /// Its nickname.
    pub nickname: String,
    /// Its UID.
    pub uid: u64,
    /// Its socket address on this connection.
    pub remote: SocketAddr,
    /// Our end of this connection.
    pub local: SocketAddr,
    /// Where it listens (remote IP, announced port).
    pub listen_addr: SocketAddr,
    /// Whether we dialed.
    pub outbound: bool,
    /// The target this connection serves, if we dialed one.
    pub target: Option<SocketAddr>,
    /// Whether the data path works both ways.
    pub established: bool,
    /// When it came up.
    pub since: Instant,
    /// Its round-trip time as last announced (see [`Router::handle_rtt`]).
    pub rtt: Option<Duration>,
}

/// State of an address we want a connection to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting until the given time to dial.
    Waiting(Instant),
    /// Dialing now.
    Connecting,
    /// Connected by this connection.
    Connected(ConnId),
    /// Not dialed: the peer behind it is already connected another way, or it is us.
    Idle,
}

/// An address to keep a connection to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address.
    pub addr: SocketAddr,
    /// Given by the operator (vs. learned from gossip).
    pub configured: bool,
    /// How it is dialled.
    pub transport: Transport,
    /// The peer behind it, once known.
    pub peer: Option<PeerName>,
    /// What is happening with it.
    pub state: TargetState,
    /// Failed attempts since the last success.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Counters the shell exports as metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Gossip messages merged.
    pub gossip_received: u64,
    /// Gossip messages sent.
    pub gossip_sent: u64,
    /// Gossip payloads refused as malformed or invalid.
    pub gossip_refused: u64,
    /// Claims, connections and entries refused for their identity, by reason
    /// ([`Refused::label`]).
    pub identity_refused: BTreeMap<&'static str, u64>,
    /// Entries that did not verify, by the neighbour that passed them on.
    pub forged_by: BTreeMap<PeerName, u64>,
    /// Entries held back because no key was bound to their origin yet.
    pub unverified: u64,
    /// Hole punches: peers asked to dial us back over UDP, and asks from peers that made us dial.
    pub punches_sent: u64,
    /// See `punches_sent`.
    pub punches_answered: u64,
    /// `Observed` messages refused (an address no datagram can come from).
    pub observed_refused: u64,
}

impl Stats {
    fn refused(&mut self, e: &Refused) {
        *self.identity_refused.entry(e.label()).or_default() += 1;
    }
}

/// The identity channel's payload: claims, re-keys and revocations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityState {
    /// Name claims.
    pub claims: Vec<Claim>,
    /// Deliberate re-keys, each with the new key's claim.
    pub rekeys: Vec<(Rekey, Claim)>,
    /// CA revocations.
    pub revocations: Vec<Revocation>,
}

/// The control-plane core. See the module docs for the calling convention.
pub struct Router {
    cfg: RouterConfig,
    topology: Topology,
    routes: Routes,
    rng: StdRng,
    conns: BTreeMap<ConnId, Connection>,
    targets: BTreeMap<SocketAddr, Target>,
    channels: BTreeMap<String, Box<dyn GossipChannel>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_gossip: Instant,
    stats: Stats,
    keys: Keys,
    rekeys: BTreeMap<PeerName, (Rekey, Claim)>,
    claim: Claim,
    /// Where each neighbour sees our sleeve datagrams come from (its last `Observed`).
    observed: BTreeMap<ConnId, SocketAddr>,
}

impl Router {
    /// A router that knows only itself.
    pub fn new(cfg: RouterConfig, now: Instant) -> Self {
        let me = PeerInfo {
            name: cfg.name,
            nickname: cfg.nickname.clone(),
            uid: cfg.uid,
            version: cfg.initial_version,
            connections: BTreeMap::new(),
            addrs: Vec::new(),
            udp: Vec::new(),
            sig: Signature([0; 64]),
        };
        let topology = Topology::new(me, cfg.key.clone());
        let mut keys = Keys::new(cfg.trust);
        // Our own claim is bound first. Under a CA without a valid certificate it is refused;
        // the shell checks this before it starts (see `Router::own_claim`), and every peer
        // would refuse us anyway.
        let claim = match &cfg.certificate {
            Some(c) => Claim::certified(c.clone()),
            None => Claim::self_signed(&cfg.key, cfg.name),
        };
        let _ = keys.admit(&claim);
        let routes = topology.routes();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let first = jitter(&mut rng, cfg.gossip_interval);
        Router {
            cfg,
            topology,
            routes,
            rng,
            conns: BTreeMap::new(),
            targets: BTreeMap::new(),
            channels: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_gossip: now + first,
            stats: Stats::default(),
            keys,
            rekeys: BTreeMap::new(),
            claim,
            observed: BTreeMap::new(),
        }
    }

    /// Our name.
    pub fn name(&self) -> PeerName {
        self.cfg.name
    }

    /// Our configuration.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The topology as we know it.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Current routes.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Live connections.
    pub fn connections(&self) -> &BTreeMap<ConnId, Connection> {
        &self.conns
    }

    /// Addresses we keep connections to.
    pub fn targets(&self) -> &BTreeMap<SocketAddr, Target> {
        &self.targets
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The names bound to keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Our claim: our certificate if we have one, else self-signed.
    pub fn own_claim(&self) -> Claim {
        self.claim.clone()
    }

    /// What the identity channel holds, for the shell to persist and load at the next start.
    pub fn identity_state(&self) -> IdentityState {
        IdentityState {
            claims: self.keys.claims().cloned().collect(),
            rekeys: self.rekeys.values().cloned().collect(),
            revocations: self.keys.revocations().cloned().collect(),
        }
    }

    /// Loads bindings saved by an earlier run (each is checked again, as if gossiped).
    /// Returns those refused.
    pub fn load_identity_state(&mut self, now: Instant, state: IdentityState) -> Vec<Refused> {
        let (_, refused) = self.merge_identity(now, state);
        refused
    }

    /// Sets the wall clock (seconds since the Unix epoch) that certificates are checked
    /// against; peers whose certificate expired are disconnected.
    pub fn set_wall_clock(&mut self, now: Instant, unix_secs: u64) {
        for name in self.keys.set_now(unix_secs) {
            self.cut_off(now, name, "its certificate expired");
        }
    }

    /// Unbinds a name on this host (an operator's decision, e.g. after a host was
    /// re-installed and lost its key). Its connection, if any, is closed. Returns whether
    /// the name was bound.
    pub fn forget_identity(&mut self, now: Instant, name: PeerName) -> bool {
        if name == self.cfg.name || self.keys.forget(name).is_none() {
            return false;
        }
        self.rekeys.remove(&name);
        self.cut_off(now, name, "its name binding was forgotten by the operator");
        self.events.push_back(Event::IdentitiesChanged);
        true
    }

    /// Applies a revocation signed by the mesh CA and passes it on. Returns the name it
    /// cut off, if it was bound.
    pub fn revoke(&mut self, now: Instant, r: Revocation) -> Result<Option<PeerName>, Refused> {
        let cut = self.keys.revoke(&r)?.flatten();
        if let Some(name) = cut {
            self.cut_off(now, name, "its key was revoked by the mesh CA");
        }
        self.events.push_back(Event::IdentitiesChanged);
        let delta = IdentityState { revocations: vec![r], ..IdentityState::default() };
        self.spread(IDENTITY_CHANNEL, postcard::to_stdvec(&delta).unwrap_or_default(), None);
        Ok(cut)
    }

    /// Records a deliberate re-key of this router (made with the old key, by the shell) so it
    /// is passed on to peers that still bind our name to the old key.
    pub fn announce_rekey(&mut self, rekey: Rekey, claim: Claim) -> Result<(), Refused> {
        self.keys.rekey(&rekey, &claim)?;
        self.rekeys.insert(rekey.name, (rekey, claim));
        self.events.push_back(Event::IdentitiesChanged);
        Ok(())
    }

    /// Closes the connections to `name` and drops its topology entry.
    fn cut_off(&mut self, now: Instant, name: PeerName, why: &str) {
        let ids: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.peer == name).map(|(id, _)| *id).collect();
        for id in ids {
            self.drop_conn(now, id, false);
            self.events.push_back(Event::Disconnect { conn: id, reason: format!("{name}: {why}") });
        }
        if self.topology.forget(name) {
            self.after_topology_change(now);
        }
    }

    /// Merges identity gossip; returns the delta to pass on and what was refused.
    fn merge_identity(&mut self, now: Instant, st: IdentityState) -> (IdentityState, Vec<Refused>) {
        let mut delta = IdentityState::default();
        let mut refused = Vec::new();
        for r in st.revocations {
            match self.keys.revoke(&r) {
                Ok(None) => {}
                Ok(Some(cut)) => {
                    if let Some(name) = cut {
                        self.cut_off(now, name, "its key was revoked by the mesh CA");
                    }
                    delta.revocations.push(r);
                }
                Err(e) => refused.push(e),
            }
        }
        for (rk, claim) in st.rekeys {
            if self.rekeys.get(&rk.name).is_some_and(|(have, _)| *have == rk) {
                continue;
            }
            match self.keys.rekey(&rk, &claim) {
                Ok(changed) => {
                    if changed {
                        // Connections made with the old key end; the peer comes back with
                        // the new one.
                        self.cut_off(now, rk.name, "it was re-keyed");
                    }
                    if self.rekeys.len() < MAX_REKEYS || self.rekeys.contains_key(&rk.name) {
                        self.rekeys.insert(rk.name, (rk.clone(), claim.clone()));
                        delta.rekeys.push((rk, claim));
                    }
                }
                Err(e) => refused.push(e),
            }
        }
        for c in st.claims {
            match self.keys.admit(&c) {
                Ok(Admitted::New) => delta.claims.push(c),
                Ok(Admitted::Known) => {}
                Err(e) => refused.push(e),
            }
        }
        for e in &refused {
            self.stats.refused(e);
        }
        if !delta.claims.is_empty() || !delta.rekeys.is_empty() || !delta.revocations.is_empty() {
            self.events.push_back(Event::IdentitiesChanged);
        }
        (delta, refused)
    }

    fn count_forged(&mut self, from: PeerName, reasons: Vec<Refused>) {
        if reasons.is_empty() {
            return;
        }
        for r in &reasons {
            self.stats.refused(r);
        }
        if self.stats.forged_by.len() < MAX_FORGERS || self.stats.forged_by.contains_key(&from) {
            *self.stats.forged_by.entry(from).or_default() += reasons.len() as u64;
        }
        self.events.push_back(Event::Forged { from, reasons });
    }

    /// Adds a gossip channel (IPAM, DNS, ...). Its state is pushed to new
    /// neighbours and in anti-entropy rounds from now on.
    pub fn register_channel(&mut self, name: &str, channel: Box<dyn GossipChannel>) {
        self.channels.insert(name.to_owned(), channel);
    }

    /// A registered channel, downcast to its type.
    pub fn channel_mut<T: GossipChannel>(&mut self, name: &str) -> Option<&mut T> {
        self.channels.get_mut(name)?.as_any_mut().downcast_mut::<T>()
    }

    /// The keys bound to names, writable: for test rigs that drive channels without
    /// connections. It bypasses every check of [`Router::handle_connection_up`] and the identity
    /// channel; the daemon never calls it (it binds names from hellos, gossip and
    /// [`Router::load_identity_state`]).
    #[doc(hidden)]
    pub fn keys_mut(&mut self) -> &mut Keys {
        &mut self.keys
    }

    /// Announces a local change of a channel: `delta` goes to a bounded set of neighbours.
    pub fn broadcast(&mut self, channel: &str, delta: Vec<u8>) {
        self.spread(channel, delta, None);
    }

    /// Sends a message to one peer, relayed along unicast routes. Returns false
    /// when the peer is unreachable.
    pub fn send_unicast(&mut self, dst: PeerName, channel: &str, payload: Vec<u8>) -> bool {
        let src = self.cfg.name;
        let sig = self.cfg.key.sign(DOMAIN_UNICAST, &signed_bytes(&(src, dst, channel, &payload)));
        let msg = ControlMsg::Unicast { src, dst, channel: channel.to_owned(), payload, ttl: UNICAST_TTL, sig };
        self.forward_unicast(dst, msg)
    }

    /// Next outgoing control message.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next thing for the shell to do.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Router::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.next_gossip;
        for target in self.targets.values() {
            if let TargetState::Waiting(at) = target.state {
                t = t.min(at);
            }
        }
        t
    }

    /// Adds an address to keep a connection to (`weft launch PEER`, `weft connect`).
    pub fn add_target(&mut self, now: Instant, addr: SocketAddr) {
        let t = self.targets.entry(addr).or_insert_with(|| Target {
            addr,
            configured: true,
            transport: Transport::Any,
            peer: None,
            state: TargetState::Waiting(now),
            attempts: 0,
            last_error: None,
        });
        t.configured = true;
        t.transport = Transport::Any;
        if t.state == TargetState::Idle && t.peer != Some(self.cfg.name) {
            t.state = TargetState::Waiting(now);
        }
    }

    /// Stops keeping a connection to `addr` and closes the connection we dialed
    /// to it, if any. Returns whether it was a target.
    pub fn forget_target(&mut self, addr: SocketAddr) -> bool {
        let Some(t) = self.targets.remove(&addr) else { return false };
        if let TargetState::Connected(c) = t.state {
            self.events.push_back(Event::Disconnect { conn: c, reason: format!("forgot {addr}") });
        }
        true
    }

    /// A dial to `addr` failed before the handshake completed.
    pub fn handle_connect_failed(&mut self, now: Instant, addr: SocketAddr, error: String) {
        let (initial, max) = (self.cfg.retry_initial, self.cfg.retry_max);
        if let Some(t) = self.targets.get_mut(&addr) {
            t.attempts = t.attempts.saturating_add(1);
            t.last_error = Some(error);
            let d = backoff(&mut self.rng, initial, max, t.attempts);
            t.state = TargetState::Waiting(now + d);
        }
    }

    /// A control connection finished its handshake. `target` is the address we
    /// dialed (outbound only). On `Err` the shell closes the connection.
    ///
    /// The peer must prove its name: its hello's claim must hold (a name already bound to
    /// another key is refused, whatever its UID), and the claimed key must have signed this
    /// connection's binding value.
    pub fn handle_connection_up(
        &mut self,
        now: Instant,
        conn: ConnId,
        remote: SocketAddr,
        target: Option<SocketAddr>,
        hello: Hello,
        session: Session,
    ) -> Result<(), Refusal> {
        let outbound = target.is_some();
        if let Err(e) = hello.check(&session.binding) {
            self.stats.refused(&e);
            return Err(Refusal::Identity(e));
        }
        if hello.name == self.cfg.name && hello.claim.key != self.cfg.key.public() {
            let e = Refused::Impostor { name: hello.name, pinned: self.cfg.key.public(), offered: hello.claim.key };
            self.stats.refused(&e);
            return Err(Refusal::Identity(e));
        }
        if hello.name == self.cfg.name {
            if let Some(t) = target.and_then(|a| self.targets.get_mut(&a)) {
                t.peer = Some(hello.name);
                t.state = TargetState::Idle;
                t.last_error = Some("this address is our own".into());
            }
            return Err(Refusal::OurSelf);
        }
        match self.keys.admit(&hello.claim) {
            Ok(Admitted::New) => {
                let delta = IdentityState { claims: vec![hello.claim.clone()], ..IdentityState::default() };
                self.spread(IDENTITY_CHANNEL, postcard::to_stdvec(&delta).unwrap_or_default(), None);
                self.events.push_back(Event::IdentitiesChanged);
            }
            Ok(Admitted::Known) => {}
            Err(e) => {
                self.stats.refused(&e);
                if let Some(t) = target.and_then(|a| self.targets.get_mut(&a)) {
                    t.last_error = Some(e.to_string());
                }
                return Err(Refusal::Identity(e));
            }
        }
        let existing = self.conns.iter().find(|(_, c)| c.peer == hello.name).map(|(id, c)| (*id, c.clone()));
        if let Some((old_id, old)) = existing {
            let keep_new = if old.uid != hello.uid {
                true
            } else {
                // Deterministic on both ends: keep the connection dialed by the
                // smaller name; with two from the same side, keep the older.
                let winner = self.cfg.name.min(hello.name);
                let initiator = |ob: bool| if ob { self.cfg.name } else { hello.name };
                initiator(outbound) == winner && initiator(old.outbound) != winner
            };
            if !keep_new {
                if let Some(t) = target.and_then(|a| self.targets.get_mut(&a)) {
                    t.peer = Some(hello.name);
                    t.state = TargetState::Idle;
                    t.attempts = 0;
                }
                return Err(Refusal::Duplicate(hello.name));
            }
            let reason = if old.uid != hello.uid {
                format!("peer {} restarted", hello.name)
            } else {
                format!("duplicate connection to {}", hello.name)
            };
            self.drop_conn(now, old_id, false);
            if let Some(t) = old.target.and_then(|a| self.targets.get_mut(&a)) {
                t.state = TargetState::Idle;
            }
            self.events.push_back(Event::Disconnect { conn: old_id, reason });
        }
        let listen_addr = SocketAddr::new(remote.ip(), hello.listen_port);
        if let Some(t) = target.and_then(|a| self.targets.get_mut(&a)) {
            t.peer = Some(hello.name);
            t.state = TargetState::Connected(conn);
            t.attempts = 0;
            t.last_error = None;
        }
        self.conns.insert(
            conn,
            Connection {
                peer: hello.name,
                nickname: hello.nickname,
                uid: hello.uid,
                remote,
                local: session.local,
                listen_addr,
                outbound,
                target,
                established: false,
                since: now,
                rtt: None,
            },
        );
        // A new neighbour starts with our digest and gets back what we lack;
        // it answers its own digest's gaps the same way. Two peers of one mesh
        // exchange a few bytes per peer instead of every entry. Channels send
        // their full state. Name claims go first, so that the entries after them verify.
        self.send_identities(conn);
        self.send_digest(conn, false);
        self.send_channels(conn);
        self.own_entry_changed(now);
        Ok(())
    }

    /// The data path of a connection started or stopped working both ways.
    pub fn handle_sleeve_state(&mut self, now: Instant, conn: ConnId, established: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.established != established {
                c.established = established;
                self.own_entry_changed(now);
            }
        }
    }

    /// The shell measured connection `conn`'s round-trip time. It is announced (and routes
    /// follow it) when it is the first figure or differs from the announced one by more than a
    /// quarter and a millisecond, so a jittery path does not keep the mesh gossiping.
    pub fn handle_rtt(&mut self, now: Instant, conn: ConnId, rtt: Duration) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let moved = match c.rtt {
            None => true,
            Some(was) => {
                let diff = rtt.abs_diff(was);
                diff > was / 4 && diff > Duration::from_millis(1)
            }
        };
        if moved {
            c.rtt = Some(rtt);
            self.own_entry_changed(now);
        }
    }

    /// A control connection closed (or failed after the handshake).
    pub fn handle_connection_down(&mut self, now: Instant, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.get(&conn) {
            if let Some(t) = c.target.and_then(|a| self.targets.get_mut(&a)) {
                t.last_error = Some(reason.to_owned());
            }
        }
        self.drop_conn(now, conn, true);
    }

    fn drop_conn(&mut self, now: Instant, conn: ConnId, retry: bool) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.observed.remove(&conn);
        let (initial, max) = (self.cfg.retry_initial, self.cfg.retry_max);
        for t in self.targets.values_mut() {
            let ours = t.state == TargetState::Connected(conn);
            let waiting_on_peer = t.state == TargetState::Idle && t.peer == Some(c.peer);
            if retry && (ours || waiting_on_peer) {
                let d = if ours { backoff(&mut self.rng, initial, max, 1) } else { Duration::ZERO };
                t.state = TargetState::Waiting(now + d);
            }
        }
        self.own_entry_changed(now);
    }

    /// A message arrived on a control connection. `Err` describes a peer's
    /// misbehaviour (malformed or invalid gossip): the shell logs it and counts
    /// it; nothing of the message was applied.
    pub fn handle_message(&mut self, now: Instant, conn: ConnId, msg: ControlMsg) -> Result<(), String> {
        let Some(from) = self.conns.get(&conn).map(|c| c.peer) else { return Ok(()) };
        match msg {
            ControlMsg::Heartbeat | ControlMsg::SleeveState { .. } | ControlMsg::FastpathState { .. } => Ok(()),
            ControlMsg::Observed { udp } => {
                let ip = udp.ip();
                if udp.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                    self.stats.observed_refused += 1;
                    return Err(format!("observed address {udp} cannot be a datagram's source"));
                }
                if self.observed.insert(conn, udp) != Some(udp) {
                    self.own_entry_changed(now);
                }
                Ok(())
            }
            ControlMsg::Digest { channel, payload, reply } => {
                if channel == IDENTITY_CHANNEL {
                    // A hash of the sender's claims, re-keys and revocations: when ours
                    // differs, each side sends its whole set and merging converges.
                    if payload != self.identity_digest() {
                        self.send_identities(conn);
                        if !reply {
                            self.send_identity_digest(conn, true);
                        }
                    }
                    return Ok(());
                }
                if channel != TOPOLOGY_CHANNEL {
                    return Ok(());
                }
                let digest: Vec<(PeerName, u64, u64)> = match postcard::from_bytes(&payload) {
                    Ok(d) => d,
                    Err(e) => {
                        self.stats.gossip_refused += 1;
                        return Err(format!("malformed topology digest: {e}"));
                    }
                };
                if digest.len() > crate::topology::MAX_PEERS {
                    self.stats.gossip_refused += 1;
                    return Err(format!("topology digest of {} entries", digest.len()));
                }
                let newer = self.topology.newer_than(&digest);
                if !newer.is_empty() {
                    self.stats.gossip_sent += 1;
                    let payload = Topology::encode(&newer);
                    self.transmits.push_back(Transmit { conn, msg: ControlMsg::Gossip { channel, payload } });
                }
                if !reply && self.topology.lacks(&digest) {
                    self.send_digest(conn, true);
                }
                Ok(())
            }
            ControlMsg::Gossip { channel, payload } => {
                self.stats.gossip_received += 1;
                if channel == IDENTITY_CHANNEL {
                    let st: IdentityState = match postcard::from_bytes(&payload) {
                        Ok(st) => st,
                        Err(e) => {
                            self.stats.gossip_refused += 1;
                            return Err(format!("malformed identity gossip: {e}"));
                        }
                    };
                    let n = st.claims.len() + st.rekeys.len() + st.revocations.len();
                    if n > crate::identity::MAX_KEYS + MAX_REKEYS + crate::identity::MAX_REVOCATIONS {
                        self.stats.gossip_refused += 1;
                        return Err(format!("identity gossip of {n} entries"));
                    }
                    let (delta, refused) = self.merge_identity(now, st);
                    // Refused claims here are conflicts, not attacks by the neighbour as such
                    // (it may have pinned another key first): counted, logged, not relayed.
                    if !refused.is_empty() {
                        self.events.push_back(Event::Forged { from, reasons: refused });
                    }
                    if delta != IdentityState::default() {
                        self.spread(IDENTITY_CHANNEL, postcard::to_stdvec(&delta).unwrap_or_default(), Some(conn));
                    }
                    Ok(())
                } else if channel == TOPOLOGY_CHANNEL {
                    match self.topology.merge_payload(&payload, &self.keys) {
                        Ok(Merged { delta, forged, unverified }) => {
                            self.stats.unverified += unverified as u64;
                            self.count_forged(from, forged);
                            // Keep and pass on only what is reachable. The entry of a dead
                            // peer keeps circulating for a while; merged, it is garbage at
                            // once, and passing it on would make every receiver merge,
                            // collect and pass it on again, forever.
                            self.topology.gc();
                            let delta: Vec<PeerInfo> =
                                delta.into_iter().filter(|p| self.topology.get(p.name).is_some()).collect();
                            if !delta.is_empty() {
                                self.spread(TOPOLOGY_CHANNEL, Topology::encode(&delta), Some(conn));
                                self.after_topology_change(now);
                            }
                            Ok(())
                        }
                        Err(e @ (TopologyError::Malformed(_) | TopologyError::Invalid(_))) => {
                            self.stats.gossip_refused += 1;
                            Err(e.to_string())
                        }
                    }
                } else if let Some(ch) = self.channels.get_mut(&channel) {
                    match ch.merge(from, &payload, &self.keys) {
                        Ok(Some(delta)) => {
                            self.spread(&channel, delta, Some(conn));
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => {
                            self.stats.gossip_refused += 1;
                            Err(format!("channel {channel}: {e}"))
                        }
                    }
                } else {
                    // A newer peer may run channels we do not have yet.
                    Ok(())
                }
            }
            ControlMsg::Unicast { src, dst, channel, payload, ttl, sig } => {
                // Checked on every hop, so a forgery goes no further than the first router.
                let signed = signed_bytes(&(src, dst, &channel, &payload));
                if let Err(e) = self.keys.verify(src, DOMAIN_UNICAST, &signed, &sig, "unicast message") {
                    if matches!(e, Refused::UnknownKey { .. }) {
                        self.stats.unverified += 1;
                    } else {
                        self.count_forged(from, vec![e]);
                    }
                    return Ok(());
                }
                if dst != self.cfg.name {
                    if ttl > 1 {
                        let msg = ControlMsg::Unicast { src, dst, channel, payload, ttl: ttl - 1, sig };
                        self.forward_unicast(dst, msg);
                    }
                    return Ok(());
                }
                if channel == PUNCH_CHANNEL {
                    self.punched(now, src);
                    Ok(())
                } else if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.handle_unicast(src, &payload, &self.keys).map_err(|e| format!("channel {channel}: {e}"))
                } else {
                    self.events.push_back(Event::Unicast { from: src, channel, payload });
                    Ok(())
                }
            }
        }
    }

    /// Timers: anti-entropy gossip and reconnection attempts.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_gossip {
            self.next_gossip = now + jitter(&mut self.rng, self.cfg.gossip_interval);
            // Anti-entropy: topology by digest (its full state grows with
            // peers × connections), other channels by full state.
            let picked = self.pick_neighbours(None);
            // Bindings spread when they are made and on every new connection; anti-entropy
            // only repairs, so one neighbour per round gets the identity digest.
            if let Some(first) = picked.first() {
                self.send_identity_digest(*first, false);
            }
            for conn in picked {
                self.send_digest(conn, false);
                self.send_channels(conn);
            }
        }
        self.handle_targets(now);
    }

    fn handle_targets(&mut self, now: Instant) {
        let mut punch = Vec::new();
        for t in self.targets.values_mut() {
            if let TargetState::Waiting(at) = t.state {
                if at <= now {
                    t.state = TargetState::Connecting;
                    self.events.push_back(Event::Connect { addr: t.addr, transport: t.transport });
                    if let (Transport::Udp, Some(p)) = (t.transport, t.peer) {
                        punch.push(p);
                    }
                }
            }
        }
        // A NAT lets a peer's datagrams in only after we sent to it (most do): the peer is
        // asked, through the mesh, to dial us now too, so both ends' first packets cross.
        punch.dedup();
        for p in punch {
            if self.send_unicast(p, PUNCH_CHANNEL, Vec::new()) {
                self.stats.punches_sent += 1;
            }
        }
    }

    /// `from` is dialling us over UDP: dial it back now on its outside addresses (only those
    /// waiting for their next try; one under way or connected is left alone, so a peer cannot
    /// make us dial faster than one attempt at a time).
    fn punched(&mut self, now: Instant, from: PeerName) {
        if self.conns.values().any(|c| c.peer == from) {
            return;
        }
        let mut answered = false;
        for t in self.targets.values_mut() {
            if t.peer == Some(from) && t.transport == Transport::Udp && matches!(t.state, TargetState::Waiting(_)) {
                t.state = TargetState::Waiting(now);
                answered = true;
            }
        }
        if answered {
            self.stats.punches_answered += 1;
            // Dial in this same step: the peer's packets are on their way.
            self.handle_targets(now);
        }
    }

    fn forward_unicast(&mut self, dst: PeerName, msg: ControlMsg) -> bool {
        // Prefer routes over confirmed connections; fall back to a direct control connection.
        let hop = self.routes.next_hop(dst).or_else(|| self.conns.values().find(|c| c.peer == dst).map(|c| c.peer));
        let Some(hop) = hop else { return false };
        let Some(conn) = self.conns.iter().find(|(_, c)| c.peer == hop).map(|(id, _)| *id) else { return false };
        self.transmits.push_back(Transmit { conn, msg });
        true
    }

    fn send_identities(&mut self, conn: ConnId) {
        self.stats.gossip_sent += 1;
        let payload = postcard::to_stdvec(&self.identity_state()).unwrap_or_default();
        self.transmits.push_back(Transmit { conn, msg: ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload } });
    }

    fn identity_digest(&self) -> Vec<u8> {
        let bytes = postcard::to_stdvec(&self.identity_state()).unwrap_or_default();
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref().to_vec()
    }

    fn send_identity_digest(&mut self, conn: ConnId, reply: bool) {
        self.stats.gossip_sent += 1;
        let payload = self.identity_digest();
        self.transmits.push_back(Transmit { conn, msg: ControlMsg::Digest { channel: IDENTITY_CHANNEL.into(), payload, reply } });
    }

    fn send_digest(&mut self, conn: ConnId, reply: bool) {
        self.stats.gossip_sent += 1;
        let payload = postcard::to_stdvec(&self.topology.digest()).unwrap_or_default();
        self.transmits.push_back(Transmit { conn, msg: ControlMsg::Digest { channel: TOPOLOGY_CHANNEL.into(), payload, reply } });
    }

    fn send_channels(&mut self, conn: ConnId) {
        for (name, ch) in &self.channels {
            let payload = ch.encode_full();
            if payload.is_empty() {
                continue;
            }
            self.stats.gossip_sent += 1;
            self.transmits.push_back(Transmit { conn, msg: ControlMsg::Gossip { channel: name.clone(), payload } });
        }
    }

    /// Sends `payload` to up to `fanout` random neighbours, never back to `except`.
    fn spread(&mut self, channel: &str, payload: Vec<u8>, except: Option<ConnId>) {
        for conn in self.pick_neighbours(except) {
            self.stats.gossip_sent += 1;
            self.transmits.push_back(Transmit {
                conn,
                msg: ControlMsg::Gossip { channel: channel.to_owned(), payload: payload.clone() },
            });
        }
    }

    fn pick_neighbours(&mut self, except: Option<ConnId>) -> Vec<ConnId> {
        let ids: Vec<ConnId> = self.conns.keys().copied().filter(|c| Some(*c) != except).collect();
        if ids.len() <= self.cfg.fanout {
            return ids;
        }
        rand::seq::index::sample(&mut self.rng, ids.len(), self.cfg.fanout).into_iter().map(|i| ids[i]).collect()
    }

    /// Our own entry changed: rewrite it from the connections, gossip the delta.
    fn own_entry_changed(&mut self, now: Instant) {
        let conns: BTreeMap<PeerName, ConnectionInfo> = self
            .conns
            .values()
            .map(|c| {
                let rtt_us = c.rtt.map(|r| u32::try_from(r.as_micros()).unwrap_or(u32::MAX));
                (c.peer, ConnectionInfo { addr: Some(c.listen_addr), outbound: c.outbound, established: c.established, rtt_us })
            })
            .collect();
        let port = self.cfg.listen_port;
        let addrs: Vec<SocketAddr> = self.conns.values().map(|c| SocketAddr::new(c.local.ip(), port)).collect();
        let mut addrs_changed = self.topology.set_my_addrs(addrs);
        // What our neighbours see, where it is not our own address (a NAT in between).
        let udp: Vec<SocketAddr> =
            self.observed.values().filter(|o| !self.conns.values().any(|c| c.local.ip() == o.ip())).copied().collect();
        addrs_changed |= self.topology.set_my_udp(udp);
        let old = self.topology.my_info().connections.clone();
        let changed: Vec<PeerName> = conns
            .iter()
            .filter(|(p, ci)| old.get(p) != Some(ci))
            .map(|(p, _)| *p)
            .chain(old.keys().filter(|p| !conns.contains_key(p)).copied())
            .collect();
        if self.topology.set_my_connections(conns) || addrs_changed {
            let me = self.topology.my_info().clone();
            // Like any delta, our new entry goes to a bounded set of neighbours and
            // spreads from there; the peers whose connection to us changed get it
            // directly, since their routes wait for both ends to confirm.
            let mut to = self.pick_neighbours(None);
            for (id, c) in &self.conns {
                if changed.contains(&c.peer) && !to.contains(id) {
                    to.push(*id);
                }
            }
            let payload = Topology::encode(std::slice::from_ref(&me));
            for conn in to {
                self.stats.gossip_sent += 1;
                self.transmits.push_back(Transmit {
                    conn,
                    msg: ControlMsg::Gossip { channel: TOPOLOGY_CHANNEL.into(), payload: payload.clone() },
                });
            }
        }
        self.after_topology_change(now);
    }

    fn after_topology_change(&mut self, now: Instant) {
        self.topology.gc();
        let routes = self.topology.routes();
        if routes != self.routes {
            self.routes = routes;
            self.events.push_back(Event::RoutesChanged);
        }
        if self.cfg.discovery {
            self.discover(now);
        }
    }

    /// Adds targets for peers we know of but are not connected to, and drops
    /// learned targets whose peer is gone.
    fn discover(&mut self, now: Instant) {
        let connected: Vec<PeerName> = self.conns.values().map(|c| c.peer).collect();
        let mut wanted: BTreeMap<SocketAddr, (PeerName, Transport)> = BTreeMap::new();
        // Only addresses a peer announced for itself, in its own signed entry: a peer cannot
        // make us dial an address on another's behalf.
        for p in self.topology.peers() {
            if p.name == self.cfg.name || connected.contains(&p.name) {
                continue;
            }
            for addr in &p.udp {
                wanted.insert(*addr, (p.name, Transport::Udp));
            }
            for addr in &p.addrs {
                wanted.insert(*addr, (p.name, Transport::Any));
            }
        }
        let me = self.cfg.name;
        // Learned targets live only while their peer is known and unconnected
        // (in `wanted`) or while a dial or connection through them is under way;
        // configured ones stay until forgotten.
        self.targets.retain(|addr, t| {
            t.configured || wanted.contains_key(addr) || matches!(t.state, TargetState::Connected(_) | TargetState::Connecting)
        });
        for (addr, (peer, transport)) in wanted {
            if self.topology.get(peer).is_none() || peer == me {
                continue;
            }
            let t = self.targets.entry(addr).or_insert_with(|| Target {
                addr,
                configured: false,
                transport,
                peer: Some(peer),
                state: TargetState::Idle,
                attempts: 0,
                last_error: None,
            });
            if transport == Transport::Any {
                // Announced by the peer as where it listens: TCP may reach it too.
                t.transport = Transport::Any;
            }
            if t.state == TargetState::Idle && t.peer != Some(me) {
                // Immediate first try; later ones back off in handle_connect_failed.
                t.state = TargetState::Waiting(now);
            }
        }
        // Configured targets whose peer is now connected by another connection rest.
        for t in self.targets.values_mut() {
            if let (TargetState::Waiting(_), Some(p)) = (&t.state, t.peer) {
                if connected.contains(&p) {
                    t.state = TargetState::Idle;
                }
            }
        }
    }
}

fn jitter(rng: &mut StdRng, d: Duration) -> Duration {
    d.mul_f64(rng.random_range(0.8..1.2))
}

fn backoff(rng: &mut StdRng, initial: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempts.saturating_sub(1).min(16));
    jitter(rng, exp.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }

    fn key(i: u64) -> SigningKey {
        SigningKey::from_seed(&[i as u8; 32]).expect("key")
    }

    fn router(i: u64, now: Instant) -> Router {
        Router::new(RouterConfig::new(n(i), format!("p{i}"), i * 100, i, key(i)), now)
    }

    const BINDING: [u8; 32] = [9; 32];

    fn session() -> Session {
        Session { local: addr(100), binding: BINDING }
    }

    fn hello(i: u64, uid: u64) -> Hello {
        Hello::prove(&key(i), Claim::self_signed(&key(i), n(i)), format!("p{i}"), uid, 6783, &BINDING)
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 6783))
    }

    fn drain(r: &mut Router) -> (Vec<Transmit>, Vec<Event>) {
        let mut t = Vec::new();
        while let Some(x) = r.poll_transmit() {
            t.push(x);
        }
        let mut e = Vec::new();
        while let Some(x) = r.poll_event() {
            e.push(x);
        }
        (t, e)
    }

    #[test]
    fn duplicate_connections_resolve_the_same_way_on_both_ends() {
        let now = Instant::now();
        // Peer 1 (smaller name) and peer 2 dial each other at once. Both keep the
        // connection dialed by peer 1, whatever order they see them in.
        let mut a = router(1, now);
        a.add_target(now, addr(2));
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("inbound first");
        assert!(a.handle_connection_up(now, ConnId(2), addr(2), Some(addr(2)), hello(2, 200), session()).is_ok(), "ours wins");
        let (_, ev) = drain(&mut a);
        assert!(ev.contains(&Event::Disconnect { conn: ConnId(1), reason: format!("duplicate connection to {}", n(2)) }));
        assert_eq!(a.connections().keys().copied().collect::<Vec<_>>(), vec![ConnId(2)]);

        let mut b = router(2, now);
        b.add_target(now, addr(1));
        b.handle_connection_up(now, ConnId(7), addr(1), Some(addr(1)), hello(1, 100), session()).expect("outbound first");
        assert_eq!(
            b.handle_connection_up(now, ConnId(8), addr(1), None, hello(1, 100), session()),
            Ok(()),
            "the inbound one (dialed by peer 1) wins on peer 2 too"
        );
        let (_, ev) = drain(&mut b);
        assert!(ev.iter().any(|e| matches!(e, Event::Disconnect { conn: ConnId(7), .. })));
        // The target whose connection lost rests instead of redialing.
        assert_eq!(b.targets()[&addr(1)].state, TargetState::Idle);
    }

    #[test]
    fn a_restarted_peer_replaces_its_old_connection() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("first life");
        a.handle_connection_up(now, ConnId(2), addr(2), None, hello(2, 201), session()).expect("second life");
        let (_, ev) = drain(&mut a);
        assert!(ev.iter().any(|e| matches!(e, Event::Disconnect { conn: ConnId(1), reason } if reason.contains("restarted"))));
    }

    #[test]
    fn dialing_ourselves_is_refused_and_not_retried() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.add_target(now, addr(1));
        assert_eq!(a.handle_connection_up(now, ConnId(1), addr(1), Some(addr(1)), hello(1, 100), session()), Err(Refusal::OurSelf));
        assert_eq!(a.targets()[&addr(1)].state, TargetState::Idle);
    }

    #[test]
    fn failed_dials_back_off() {
        let t0 = Instant::now();
        let mut a = router(1, t0);
        a.add_target(t0, addr(2));
        a.handle_timeout(t0);
        assert_eq!(drain(&mut a).1, vec![Event::Connect { addr: addr(2), transport: Transport::Any }]);
        let mut delays = Vec::new();
        let mut now = t0;
        for _ in 0..8 {
            a.handle_connect_failed(now, addr(2), "refused".into());
            let TargetState::Waiting(at) = a.targets()[&addr(2)].state else { panic!("not waiting") };
            delays.push(at - now);
            now = at;
            a.handle_timeout(now);
            drain(&mut a);
        }
        assert!(delays[1] > delays[0] && delays[3] > delays[2], "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(36)), "capped: {delays:?}");
        assert_eq!(a.targets()[&addr(2)].last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn forget_closes_the_dialed_connection_and_stops_retrying() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.add_target(now, addr(2));
        a.handle_connection_up(now, ConnId(1), addr(2), Some(addr(2)), hello(2, 200), session()).expect("up");
        drain(&mut a);
        assert!(a.forget_target(addr(2)));
        assert!(!a.forget_target(addr(2)));
        let (_, ev) = drain(&mut a);
        assert!(ev.iter().any(|e| matches!(e, Event::Disconnect { conn: ConnId(1), .. })));
        a.handle_connection_down(now, ConnId(1), "closed");
        assert!(a.targets().is_empty());
    }

    #[test]
    fn a_name_bound_to_a_key_cannot_be_taken_by_another() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("the real peer 2");
        drain(&mut a);
        // A password holder with its own key says it is peer 2 (a newer UID, as after a restart).
        let rogue = Hello::prove(&key(66), Claim::self_signed(&key(66), n(2)), "p2".into(), 201, 6783, &BINDING);
        let refused = a.handle_connection_up(now, ConnId(2), addr(66), None, rogue, session());
        assert!(matches!(refused, Err(Refusal::Identity(Refused::Impostor { .. }))), "{refused:?}");
        // The real connection is untouched, and the refusal is counted.
        assert_eq!(a.connections().keys().copied().collect::<Vec<_>>(), vec![ConnId(1)]);
        assert!(drain(&mut a).1.iter().all(|e| !matches!(e, Event::Disconnect { .. })));
        assert_eq!(a.stats().identity_refused.get("impostor"), Some(&1));
        // Once peer 2 is gone, its name stays bound: a dead host cannot be impersonated either.
        a.handle_connection_down(now, ConnId(1), "closed");
        let rogue = Hello::prove(&key(66), Claim::self_signed(&key(66), n(2)), "p2".into(), 202, 6783, &BINDING);
        assert!(a.handle_connection_up(now, ConnId(3), addr(66), None, rogue, session()).is_err());
        // Nor us.
        let me = Hello::prove(&key(66), Claim::self_signed(&key(66), n(1)), "p1".into(), 9, 6783, &BINDING);
        assert!(matches!(a.handle_connection_up(now, ConnId(4), addr(66), None, me, session()), Err(Refusal::Identity(_))));
    }

    #[test]
    fn a_hello_replayed_from_another_connection_is_refused() {
        let now = Instant::now();
        let mut a = router(1, now);
        // Peer 2's hello was made for another connection's binding value.
        let other = Session { local: addr(100), binding: [1; 32] };
        let r = a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), other);
        assert!(matches!(r, Err(Refusal::Identity(Refused::BadSignature { .. }))), "{r:?}");
        assert!(a.connections().is_empty());
        // Nothing was bound for it.
        assert_eq!(a.keys().get(n(2)), None);
    }

    #[test]
    fn forged_unicasts_are_dropped_and_counted_against_the_neighbour() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.register_channel("set", Box::new(Set::default()));
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
        a.handle_connection_up(now, ConnId(3), addr(3), None, hello(3, 300), session()).expect("up");
        drain(&mut a);
        // Peer 2 sends a unicast in peer 3's name.
        let payload = postcard::to_stdvec(&std::collections::BTreeSet::from([1u32])).expect("enc");
        let sig = key(2).sign(DOMAIN_UNICAST, &signed_bytes(&(n(3), n(1), "set", &payload)));
        let msg = ControlMsg::Unicast { src: n(3), dst: n(1), channel: "set".into(), payload: payload.clone(), ttl: 3, sig };
        a.handle_message(now, ConnId(1), msg).expect("dropped quietly");
        assert_eq!(a.stats().forged_by.get(&n(2)), Some(&1));
        assert!(drain(&mut a).1.iter().any(|e| matches!(e, Event::Forged { from, .. } if *from == n(2))));
        // Signed by 3 itself, it is taken; so is one relayed for a third peer (checked, then passed on).
        let sig = key(3).sign(DOMAIN_UNICAST, &signed_bytes(&(n(3), n(1), "set", &payload)));
        let msg = ControlMsg::Unicast { src: n(3), dst: n(1), channel: "set".into(), payload, ttl: 3, sig };
        a.handle_message(now, ConnId(1), msg).expect("taken");
        assert_eq!(a.stats().forged_by.get(&n(2)), Some(&1));
    }

    #[test]
    fn forged_topology_gossip_changes_nothing_and_discovery_dials_only_self_announced_addresses() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
        drain(&mut a);
        // Peer 2 writes an entry for peer 3 (whose key a knows from a claim), pointing discovery
        // at a victim address, and bumps its version to the top.
        let claim3 = IdentityState { claims: vec![Claim::self_signed(&key(3), n(3))], ..IdentityState::default() };
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload: postcard::to_stdvec(&claim3).expect("enc") }).expect("claims");
        let mut forged = PeerInfo {
            name: n(3),
            nickname: "p3".into(),
            uid: 300,
            version: u64::MAX,
            connections: BTreeMap::from([(n(2), ConnectionInfo { addr: Some(addr(77)), outbound: true, established: true, rtt_us: None })]),
            addrs: vec![addr(77)],
            udp: Vec::new(),
            sig: Signature([0; 64]),
        };
        forged.sign(&key(2));
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: TOPOLOGY_CHANNEL.into(), payload: Topology::encode(&[forged]) }).expect("handled");
        assert!(a.topology().get(n(3)).is_none());
        assert_eq!(a.stats().forged_by.get(&n(2)), Some(&1));
        a.handle_timeout(now + Duration::from_secs(60));
        assert!(!drain(&mut a).1.contains(&Event::Connect { addr: addr(77), transport: Transport::Any }));
        // Peer 2's own entry may name any address for its connection to 3, but discovery
        // dials 3 only where 3 says it listens.
        let mut honest3 = PeerInfo {
            name: n(3),
            nickname: "p3".into(),
            uid: 300,
            version: 1,
            connections: BTreeMap::from([(n(2), ConnectionInfo { addr: None, outbound: false, established: true, rtt_us: None })]),
            addrs: vec![addr(3)],
            udp: Vec::new(),
            sig: Signature([0; 64]),
        };
        honest3.sign(&key(3));
        let mut p2 = PeerInfo {
            name: n(2),
            nickname: "p2".into(),
            uid: 200,
            version: 5,
            connections: BTreeMap::from([
                (n(1), ConnectionInfo { addr: None, outbound: false, established: true, rtt_us: None }),
                (n(3), ConnectionInfo { addr: Some(addr(77)), outbound: true, established: true, rtt_us: None }),
            ]),
            addrs: vec![addr(2)],
            udp: Vec::new(),
            sig: Signature([0; 64]),
        };
        p2.sign(&key(2));
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: TOPOLOGY_CHANNEL.into(), payload: Topology::encode(&[p2, honest3]) }).expect("merge");
        let (_, ev) = drain(&mut a);
        a.handle_timeout(now + Duration::from_secs(60));
        let (_, ev2) = drain(&mut a);
        let connects: Vec<&Event> = ev.iter().chain(&ev2).filter(|e| matches!(e, Event::Connect { .. })).collect();
        assert_eq!(connects, vec![&Event::Connect { addr: addr(3), transport: Transport::Any }]);
    }

    /// Peers 1 and 3 sit behind NATs, each connected to peer 2 only. Peer 2 tells each where
    /// its datagrams come from; each announces that; each then dials the other there over UDP and
    /// asks it, through 2, to dial back at once.
    #[test]
    fn outside_addresses_are_learned_announced_and_punched_from_both_ends() {
        let now = Instant::now();
        let outside = |i: u8| SocketAddr::from(([203, 0, 113, i], 40000 + u16::from(i)));
        let mut a = router(1, now);
        let mut c = router(3, now);
        a.handle_connection_up(now, ConnId(1), addr(2), Some(addr(2)), hello(2, 200), session()).expect("1-2");
        c.handle_connection_up(now, ConnId(1), addr(2), Some(addr(2)), hello(2, 200), session()).expect("3-2");
        a.handle_sleeve_state(now, ConnId(1), true);
        c.handle_sleeve_state(now, ConnId(1), true);
        drain(&mut a);
        drain(&mut c);
        // What 2 sees: not our own address, so it is announced.
        a.handle_message(now, ConnId(1), ControlMsg::Observed { udp: outside(1) }).expect("observed");
        c.handle_message(now, ConnId(1), ControlMsg::Observed { udp: outside(3) }).expect("observed");
        assert_eq!(a.topology().my_info().udp, vec![outside(1)]);
        // An address no datagram comes from is refused and counted.
        let bad = SocketAddr::from(([0, 0, 0, 0], 6783));
        assert!(a.handle_message(now, ConnId(1), ControlMsg::Observed { udp: bad }).is_err());
        assert_eq!(a.stats().observed_refused, 1);
        assert_eq!(a.topology().my_info().udp, vec![outside(1)]);
        // Each gets the other's claim and entry (as 2 passes them on).
        let claims = |i: u64| IdentityState { claims: vec![Claim::self_signed(&key(i), n(i))], ..IdentityState::default() };
        let gossip = |channel: &str, payload: Vec<u8>| ControlMsg::Gossip { channel: channel.into(), payload };
        let entry_a = a.topology().my_info().clone();
        let entry_c = c.topology().my_info().clone();
        let entry_2 = |conns: &[u64]| {
            let mut p = PeerInfo {
                name: n(2),
                nickname: "p2".into(),
                uid: 200,
                version: 3,
                connections: conns.iter().map(|i| (n(*i), ConnectionInfo { addr: None, outbound: false, established: true, rtt_us: None })).collect(),
                addrs: vec![addr(2)],
                udp: Vec::new(),
                sig: Signature([0; 64]),
            };
            p.sign(&key(2));
            p
        };
        for (r, other, entry) in [(&mut a, 3, &entry_c), (&mut c, 1, &entry_a)] {
            r.handle_message(now, ConnId(1), gossip(IDENTITY_CHANNEL, postcard::to_stdvec(&claims(2)).expect("enc"))).expect("claims");
            r.handle_message(now, ConnId(1), gossip(IDENTITY_CHANNEL, postcard::to_stdvec(&claims(other)).expect("enc"))).expect("claims");
            r.handle_message(now, ConnId(1), gossip(TOPOLOGY_CHANNEL, Topology::encode(&[entry_2(&[1, 3]), entry.clone()]))).expect("merge");
        }
        // Peer 1's timer fires first: it dials 3's outside address over UDP and asks 3 to dial back.
        a.handle_timeout(now);
        let (sent, ev) = drain(&mut a);
        assert!(ev.contains(&Event::Connect { addr: outside(3), transport: Transport::Udp }), "{ev:?}");
        assert_eq!(a.targets()[&outside(3)].state, TargetState::Connecting);
        let punch = sent
            .into_iter()
            .find(|t| matches!(&t.msg, ControlMsg::Unicast { channel, dst, .. } if channel == PUNCH_CHANNEL && *dst == n(3)))
            .expect("a punch request for peer 3, sent through peer 2");
        assert_eq!(a.stats().punches_sent, 1);
        // Peer 3 had backed off after a failed try; the request makes it dial at once.
        c.handle_timeout(now);
        drain(&mut c);
        c.handle_connect_failed(now, outside(1), "timed out".into());
        assert!(matches!(c.targets()[&outside(1)].state, TargetState::Waiting(at) if at > now));
        c.handle_message(now, ConnId(1), punch.msg.clone()).expect("punch");
        let (_, ev) = drain(&mut c);
        assert!(ev.contains(&Event::Connect { addr: outside(1), transport: Transport::Udp }), "{ev:?}");
        assert_eq!(c.stats().punches_answered, 1);
        // While that dial is under way, more requests change nothing.
        c.handle_message(now, ConnId(1), punch.msg.clone()).expect("punch");
        let (_, ev) = drain(&mut c);
        assert!(!ev.iter().any(|e| matches!(e, Event::Connect { .. })), "{ev:?}");
        // A punch request forged in peer 1's name by peer 2 is dropped on arrival.
        if let ControlMsg::Unicast { src, dst, channel, payload, ttl, .. } = punch.msg {
            let sig = key(2).sign(DOMAIN_UNICAST, &signed_bytes(&(src, dst, &channel, &payload)));
            c.handle_connect_failed(now, outside(1), "timed out".into());
            c.handle_message(now, ConnId(1), ControlMsg::Unicast { src, dst, channel, payload, ttl, sig }).expect("handled");
            let (_, ev) = drain(&mut c);
            assert!(!ev.iter().any(|e| matches!(e, Event::Connect { .. })), "{ev:?}");
            assert_eq!(c.stats().punches_answered, 1);
        }
        // When 2's connection to 1 goes, so does what 2 saw.
        a.handle_connection_down(now, ConnId(1), "gone");
        assert!(a.topology().my_info().udp.is_empty());
    }

    #[test]
    fn round_trip_times_are_announced_when_they_move_enough() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
        let announced = |a: &Router| a.topology().my_info().connections[&n(2)].rtt_us;
        assert_eq!(announced(&a), None);
        let v0 = a.topology().my_info().version;
        a.handle_rtt(now, ConnId(1), Duration::from_micros(4000));
        assert_eq!(announced(&a), Some(4000));
        // Jitter of a fifth, or of under a millisecond, is not news.
        a.handle_rtt(now, ConnId(1), Duration::from_micros(4800));
        a.handle_rtt(now, ConnId(1), Duration::from_micros(3300));
        assert_eq!(announced(&a), Some(4000));
        let v1 = a.topology().my_info().version;
        assert!(v1 > v0);
        a.handle_rtt(now, ConnId(1), Duration::from_micros(9000));
        assert_eq!(announced(&a), Some(9000));
        assert!(a.topology().my_info().version > v1);
        // Unknown connections are ignored.
        a.handle_rtt(now, ConnId(9), Duration::from_micros(1));
        assert_eq!(announced(&a), Some(9000));
    }

    #[test]
    fn revocations_spread_even_where_the_key_is_not_bound_and_cut_off_where_it_is() {
        let now = Instant::now();
        let ca = key(100);
        let cfg = |i: u64| {
            let mut c = RouterConfig::new(n(i), format!("p{i}"), i * 100, i, key(i));
            c.trust = Trust::Ca(ca.public());
            c.certificate = Some(Certificate::issue(&ca, n(i), key(i).public(), u64::MAX));
            c
        };
        let mut a = Router::new(cfg(1), now);
        let certified = |i: u64| {
            let claim = Claim::certified(Certificate::issue(&ca, n(i), key(i).public(), u64::MAX));
            Hello::prove(&key(i), claim, format!("p{i}"), i * 100, 6783, &BINDING)
        };
        a.handle_connection_up(now, ConnId(2), addr(2), None, certified(2), session()).expect("2 is certified");
        a.handle_connection_up(now, ConnId(3), addr(3), None, certified(3), session()).expect("3 is certified");
        // A self-signed hello is refused under a CA.
        assert!(a.handle_connection_up(now, ConnId(4), addr(4), None, hello(4, 400), session()).is_err());
        drain(&mut a);
        // Peer 2 passes on the CA's revocation of 3's key: 3 is cut off, and it goes on.
        let rev = IdentityState { revocations: vec![Revocation::issue(&ca, n(3), key(3).public())], ..Default::default() };
        let payload = postcard::to_stdvec(&rev).expect("enc");
        a.handle_message(now, ConnId(2), ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload: payload.clone() }).expect("revocation");
        let (_, ev) = drain(&mut a);
        assert!(ev.iter().any(|e| matches!(e, Event::Disconnect { conn: ConnId(3), .. })), "{ev:?}");
        assert!(a.handle_connection_up(now, ConnId(5), addr(3), None, certified(3), session()).is_err(), "3 comes back");
        // A revocation of a key bound nowhere here is kept and passed on all the same; a forged
        // one is refused.
        let mut b = Router::new(cfg(1), now);
        b.handle_connection_up(now, ConnId(2), addr(2), None, certified(2), session()).expect("up");
        b.handle_connection_up(now, ConnId(6), addr(6), None, certified(6), session()).expect("up");
        drain(&mut b);
        b.handle_message(now, ConnId(2), ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload }).expect("revocation");
        let (tx, _) = drain(&mut b);
        assert!(tx.iter().any(|t| t.conn == ConnId(6) && matches!(&t.msg, ControlMsg::Gossip { channel, .. } if channel == IDENTITY_CHANNEL)), "{tx:?}");
        let forged = IdentityState { revocations: vec![Revocation::issue(&key(2), n(6), key(6).public())], ..Default::default() };
        b.handle_message(now, ConnId(2), ControlMsg::Gossip { channel: IDENTITY_CHANNEL.into(), payload: postcard::to_stdvec(&forged).expect("enc") }).expect("handled");
        assert_eq!(b.keys().get(n(6)), Some(key(6).public()), "a forged revocation cut a peer off");
    }

    /// A grow-only set of numbers, as a stand-in for IPAM or DNS.
    #[derive(Default)]
    struct Set(std::collections::BTreeSet<u32>);

    impl GossipChannel for Set {
        fn encode_full(&self) -> Vec<u8> {
            postcard::to_stdvec(&self.0).unwrap_or_default()
        }
        fn merge(&mut self, _from: PeerName, payload: &[u8], _keys: &Keys) -> Result<Option<Vec<u8>>, String> {
            let other: std::collections::BTreeSet<u32> = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
            let new: std::collections::BTreeSet<u32> = other.difference(&self.0).copied().collect();
            self.0.extend(new.iter().copied());
            Ok((!new.is_empty()).then(|| postcard::to_stdvec(&new).unwrap_or_default()))
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    #[test]
    fn channels_get_full_state_on_connect_and_pass_deltas_on() {
        let now = Instant::now();
        let mut a = router(1, now);
        a.register_channel("set", Box::new(Set::default()));
        a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
        a.handle_connection_up(now, ConnId(2), addr(3), None, hello(3, 300), session()).expect("up");
        let (tx, _) = drain(&mut a);
        assert!(tx.iter().any(|t| t.conn == ConnId(2) && matches!(&t.msg, ControlMsg::Gossip { channel, .. } if channel == "set")));
        let payload = postcard::to_stdvec(&std::collections::BTreeSet::from([5u32, 6])).expect("enc");
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: "set".into(), payload: payload.clone() }).expect("merge");
        assert_eq!(a.channel_mut::<Set>("set").expect("set").0.len(), 2);
        let (tx, _) = drain(&mut a);
        // The delta goes on to peer 3, never back to peer 2.
        assert!(tx.iter().any(|t| t.conn == ConnId(2)));
        assert!(!tx.iter().any(|t| t.conn == ConnId(1)));
        // Nothing new: nothing passed on.
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: "set".into(), payload }).expect("merge");
        assert!(drain(&mut a).0.is_empty());
        // Unknown channels are ignored; bad payloads are refused and counted.
        a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: "future".into(), payload: vec![1] }).expect("ignored");
        assert!(a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: "set".into(), payload: vec![0xff; 3] }).is_err());
        assert_eq!(a.stats().gossip_refused, 1);
    }

    /// A channel that has nothing to say (or holds its state back) until told.
    #[derive(Default)]
    struct Held {
        state: Vec<u8>,
    }

    impl GossipChannel for Held {
        fn encode_full(&self) -> Vec<u8> {
            self.state.clone()
        }
        fn merge(&mut self, _from: PeerName, _payload: &[u8], _keys: &Keys) -> Result<Option<Vec<u8>>, String> {
            Ok(None)
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    #[test]
    fn channels_with_an_empty_full_state_send_nothing() {
        let t0 = Instant::now();
        let mut a = router(1, t0);
        a.register_channel("held", Box::new(Held::default()));
        a.register_channel("set", Box::new(Set::default()));
        let gossip_of = |tx: &[Transmit], ch: &str| {
            tx.iter().filter(|t| matches!(&t.msg, ControlMsg::Gossip { channel, .. } if channel == ch)).count()
        };
        // On connect: the set (an empty set still encodes to one byte) goes, the held channel does not.
        a.handle_connection_up(t0, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
        let (tx, _) = drain(&mut a);
        assert_eq!((gossip_of(&tx, "set"), gossip_of(&tx, "held")), (1, 0), "{tx:?}");
        // Nor in anti-entropy.
        let t1 = t0 + Duration::from_secs(60);
        a.handle_timeout(t1);
        let (tx, _) = drain(&mut a);
        assert_eq!((gossip_of(&tx, "set"), gossip_of(&tx, "held")), (1, 0), "{tx:?}");
        let sent = a.stats().gossip_sent;
        // Once it has something to say, it goes like any channel's state.
        a.channel_mut::<Held>("held").expect("held").state = vec![7];
        let t2 = t1 + Duration::from_secs(60);
        a.handle_timeout(t2);
        let (tx, _) = drain(&mut a);
        assert!(
            tx.iter().any(|t| t.msg == ControlMsg::Gossip { channel: "held".into(), payload: vec![7] }),
            "{tx:?}"
        );
        assert_eq!(a.stats().gossip_sent - sent, tx.len() as u64, "only what was sent is counted");
    }

    #[test]
    fn anti_entropy_exchanges_digests_and_only_what_is_missing() {
        let t0 = Instant::now();
        let (mut a, mut b) = (router(1, t0), router(2, t0));
        a.handle_connection_up(t0, ConnId(1), addr(2), None, hello(2, 200), session()).expect("a up");
        b.handle_connection_up(t0, ConnId(2), addr(1), None, hello(1, 100), session()).expect("b up");
        // Exchange until quiet, like a network would.
        let pump = |a: &mut Router, b: &mut Router| {
            for _ in 0..10 {
                let (ta, _) = drain(a);
                let (tb, _) = drain(b);
                if ta.is_empty() && tb.is_empty() {
                    break;
                }
                for t in ta {
                    b.handle_message(t0, ConnId(2), t.msg).expect("b takes a's gossip");
                }
                for t in tb {
                    a.handle_message(t0, ConnId(1), t.msg).expect("a takes b's gossip");
                }
            }
        };
        pump(&mut a, &mut b);
        assert_eq!(a.topology().digest(), b.topology().digest());
        // In sync: a periodic round sends a digest, which draws no answer.
        let later = t0 + Duration::from_secs(60);
        a.handle_timeout(later);
        let (ta, _) = drain(&mut a);
        assert_eq!(ta.len(), 2, "an identity digest and a topology digest: {ta:?}");
        for t in &ta {
            let ControlMsg::Digest { payload, reply: false, .. } = &t.msg else { panic!("{:?}", t.msg) };
            assert!(payload.len() < 64, "a digest of two peers is small: {} bytes", payload.len());
            b.handle_message(later, ConnId(2), t.msg.clone()).expect("digest");
        }
        assert!(drain(&mut b).0.is_empty(), "nothing to send when in sync");
        // b falls behind on a's entry: a's digest makes b ask back, and a answers with just that entry.
        a.handle_sleeve_state(later, ConnId(1), true);
        drain(&mut a);
        a.handle_timeout(later + Duration::from_secs(60));
        let (ta, _) = drain(&mut a);
        b.handle_message(later, ConnId(2), ta[0].msg.clone()).expect("identity digest");
        assert!(drain(&mut b).0.is_empty(), "identities in sync");
        b.handle_message(later, ConnId(2), ta[1].msg.clone()).expect("digest");
        let (tb, _) = drain(&mut b);
        assert!(matches!(&tb[..], [Transmit { msg: ControlMsg::Digest { reply: true, .. }, .. }]), "{tb:?}");
        a.handle_message(later, ConnId(1), tb[0].msg.clone()).expect("reply digest");
        let (ta, _) = drain(&mut a);
        let [Transmit { msg: ControlMsg::Gossip { payload, .. }, .. }] = &ta[..] else { panic!("{ta:?}") };
        let entries: Vec<PeerInfo> = postcard::from_bytes(payload).expect("entries");
        assert_eq!(entries.iter().map(|p| p.name).collect::<Vec<_>>(), vec![n(1)]);
        b.handle_message(later, ConnId(2), ta[0].msg.clone()).expect("entry");
        assert_eq!(a.topology().digest(), b.topology().digest());
        assert!(a.handle_message(later, ConnId(1), ControlMsg::Digest { channel: TOPOLOGY_CHANNEL.into(), payload: vec![0xff; 9], reply: false }).is_err());
    }

    proptest! {
        /// Truncated topology gossip is refused and changes nothing; random bytes never panic.
        #[test]
        fn malformed_topology_gossip_changes_nothing(cut in 0usize..200, junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let now = Instant::now();
            let mut a = router(1, now);
            a.handle_connection_up(now, ConnId(1), addr(2), None, hello(2, 200), session()).expect("up");
            drain(&mut a);
            let before: Vec<PeerInfo> = a.topology().peers().cloned().collect();
            let mut b = router(2, now);
            b.handle_connection_up(now, ConnId(9), addr(1), None, hello(1, 100), session()).expect("up");
            let full = Topology::encode(&b.topology().peers().cloned().collect::<Vec<_>>());
            let truncated = full[..cut.min(full.len().saturating_sub(1))].to_vec();
            let msg = ControlMsg::Gossip { channel: TOPOLOGY_CHANNEL.into(), payload: truncated };
            let refused = a.handle_message(now, ConnId(1), msg).is_err();
            prop_assert!(refused, "a truncated payload was accepted");
            let after: Vec<PeerInfo> = a.topology().peers().cloned().collect();
            prop_assert_eq!(after, before);
            // Random bytes may even decode; they must never panic the router.
            let _ = a.handle_message(now, ConnId(1), ControlMsg::Gossip { channel: TOPOLOGY_CHANNEL.into(), payload: junk });
        }
    }
}
