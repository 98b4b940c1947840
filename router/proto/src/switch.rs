//! The Ethernet switch of the frame path: which MAC lives behind which peer,
//! and where each frame goes.
//!
//! The router moves frames on two threads, and each owns one core here:
//!
//! - [`Switch`], on the TAP thread, takes frames from this host's Linux
//!   bridge, learns their source MACs as local and decides which peer (or
//!   which broadcast tree) each one goes to.
//! - [`Inbound`], on the UDP thread, takes frames that peers sent us (already
//!   opened by the sleeve), validates them, decides whether to write them to
//!   our TAP and whether to relay them, and tells the [`Switch`] which MACs it
//!   learned behind which peer ([`Ingress::announce`], carried by the shell
//!   over a bounded channel).
//!
//! Both rest on [`MacTable`], a MAC table bounded per owner and in total, so
//! neither a container nor a peer can grow it without bound, and with no
//! whole-table scan on the per-frame path.
//!
//! Everything is sans-IO: time comes in as `Instant` arguments, there are no
//! sockets, threads or locks, and nothing allocates per frame (only a new MAC
//! may grow the table). The shell sends,
//! writes, counts drops by [`Reason::label`] and re-arms one timer at
//! `poll_timeout`.
//!
//! Left out for now: per-network segments (every frame is in one L2 domain),
//! anti-spoofing (a container may use any unicast source MAC, and a peer may
//! claim any MAC, even one of our containers', which then moves to it), VLAN
//! awareness (tags pass through untouched) and fast-path (VXLAN) forwarding.

use std::collections::btree_map::{self, BTreeMap};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sleeve::FrameMeta;
use crate::{PeerName, Routes};

/// Bytes of an Ethernet header: destination MAC, source MAC, ethertype.
/// Shorter frames are runts.
pub const ETHERNET_HEADER_LEN: usize = 14;

/// The shortest interval between two expiry sweeps, whatever the ttl: a tiny
/// (or zero) ttl must not make the shell wake up in a loop.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A table whose allocation is this many times its length (and above
/// [`SHRINK_FLOOR`] entries) is shrunk after a sweep: hash maps never give
/// memory back on their own, so one flood would otherwise pin its peak.
const SHRINK_FACTOR: usize = 4;
/// Below this many entries the table is not worth shrinking.
const SHRINK_FLOOR: usize = 1024;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

/// Hashed as one `u64`: the derived impl feeds SipHash a length prefix and
/// then a six-byte slice, which made the per-frame path about a third slower.
impl std::hash::Hash for Mac {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, 0, 0]));
    }
}

impl Mac {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// `00:00:00:00:00:00`, never a valid address.
    pub const ZERO: Mac = Mac([0; 6]);

    /// The address in `b`, which must be exactly six bytes long.
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }

    /// Whether this is a group address (the I/G bit, bit 0 of byte 0):
    /// multicast, including broadcast.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Whether this is `ff:ff:ff:ff:ff:ff`.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// Whether this is `00:00:00:00:00:00`.
    pub fn is_zero(self) -> bool {
        self == Self::ZERO
    }

    /// Whether a frame may carry this as its source: a group or all-zero
    /// source is invalid per IEEE 802.3, and the Linux bridge drops such
    /// frames too.
    pub fn is_valid_source(self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Six hex bytes separated by colons, as [`fmt::Display`] writes them.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes with colons, like 02:42:0a:20:00:02)");
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().filter(|p| (1..=2).contains(&p.len())).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(Mac(m)),
            Some(_) => Err(bad()),
        }
    }
}

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Self {
        Mac(b)
    }
}

/// The destination MAC of an Ethernet frame; `None` for a runt.
pub fn dst(frame: &[u8]) -> Option<Mac> {
    addresses(frame).map(|(d, _)| d)
}

/// The source MAC of an Ethernet frame; `None` for a runt.
pub fn src(frame: &[u8]) -> Option<Mac> {
    addresses(frame).map(|(_, s)| s)
}

/// `(destination, source)` of an Ethernet frame; `None` for a runt. One
/// length check for both, as every frame needs both.
fn addresses(frame: &[u8]) -> Option<(Mac, Mac)> {
    let h = frame.first_chunk::<ETHERNET_HEADER_LEN>()?;
    let (d, rest) = h.split_first_chunk::<6>()?;
    let (s, _) = rest.split_first_chunk::<6>()?;
    Some((Mac(*d), Mac(*s)))
}

/// Who a MAC lives behind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Owner {
    /// This host's bridge (a local container, or the host itself).
    Local,
    /// A peer's bridge.
    Peer(PeerName),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Local => f.write_str("local"),
            Owner::Peer(p) => fmt::Display::fmt(p, f),
        }
    }
}

/// Bounds of a [`MacTable`].
///
/// MACs are chosen by whoever sends the frames: a container can invent a new
/// source MAC per frame, and a peer can relay as many as it likes. Without
/// bounds either could grow the table until the router runs out of memory,
/// so each owner gets a quota and the table a ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MACs one owner (this host, or one peer) may hold. The default, 8192,
    /// is far above the containers a real host runs (each has one or a few
    /// MACs), so only a flood reaches it.
    pub per_owner: usize,
    /// MACs the table may hold in all. The default, 262 144 (32 owners at
    /// their quota), keeps each table to a few tens of MB: a slot takes
    /// 41 bytes in the [`Switch`]'s table and 65 in the [`Inbound`]'s, and a
    /// full table has 2^19 slots, so about 21 MB and 34 MB.
    pub total: usize,
    /// A MAC not seen for this long is forgotten (frames to it are flooded
    /// again). The default, 600 s, is well above ARP's and NDP's refresh
    /// intervals, so a quiet but live container stays known.
    pub ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_owner: 8192, total: 262_144, ttl: Duration::from_secs(600) }
    }
}

impl Limits {
    /// How often expired entries are swept: a tenth of the ttl (so an entry
    /// is held at most 1.1 ttl), but no more often than once a second.
    pub fn sweep_interval(&self) -> Duration {
        (self.ttl / 10).max(MIN_SWEEP_INTERVAL)
    }
}

/// Why a frame was dropped, or a MAC refused. The shell keeps one counter each,
/// indexed by [`Reason::index`] and labelled by [`Reason::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// Shorter than an Ethernet header.
    #[error("frame shorter than an Ethernet header")]
    Runt,
    /// A multicast or all-zero source MAC: invalid per 802.3 (the Linux bridge
    /// drops these too).
    #[error("invalid source MAC")]
    BadSource,
    /// The source MAC is new (or moves) and its owner already holds
    /// [`Limits::per_owner`] MACs.
    #[error("the owner holds as many MACs as allowed")]
    MacLimit,
    /// The source MAC is new and the table holds [`Limits::total`] MACs.
    #[error("the MAC table is full")]
    TableFull,
    /// No next hop to the destination peer, or the next hop is where the frame
    /// came from.
    #[error("no route to the destination peer")]
    NoRoute,
    /// The frame's hop count ran out (a transient loop).
    #[error("ttl expired")]
    TtlExpired,
    /// A peer's frame names a source peer that is neither the link's peer nor
    /// reachable.
    #[error("frame from an unknown source peer")]
    UnknownSource,
    /// Our own frame came back to us (during a topology change).
    #[error("our own frame came back")]
    Looped,
    /// A frame from the bridge for a MAC on this host: the bridge delivered it
    /// already, there is nothing to send.
    #[error("frame for a local MAC")]
    LocalDestination,
    /// A peer's frame from a MAC that its source peer has not announced as its own (see
    /// [`crate::announce`]).
    #[error("source MAC not announced by the source peer")]
    Unannounced,
}

impl Reason {
    /// Every reason, in [`Reason::index`] order.
    pub const ALL: [Reason; 10] = [
        Reason::Runt,
        Reason::BadSource,
        Reason::MacLimit,
        Reason::TableFull,
        Reason::NoRoute,
        Reason::TtlExpired,
        Reason::UnknownSource,
        Reason::Looped,
        Reason::LocalDestination,
        Reason::Unannounced,
    ];

    /// A short snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Runt => "runt",
            Reason::BadSource => "bad_source",
            Reason::MacLimit => "mac_limit",
            Reason::TableFull => "table_full",
            Reason::NoRoute => "no_route",
            Reason::TtlExpired => "ttl_expired",
            Reason::UnknownSource => "unknown_source",
            Reason::Looped => "looped",
            Reason::LocalDestination => "local_destination",
            Reason::Unannounced => "unannounced",
        }
    }

    /// The position of this reason in [`Reason::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        // Fieldless and declared in ALL's order (a test checks it).
        self as usize
    }
}

/// What [`MacTable::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// The MAC was known behind the same owner; its age was reset.
    Refreshed,
    /// The MAC was unknown (or had expired).
    New,
    /// The MAC was known behind another owner and now lives behind this one.
    Moved {
        /// The previous owner.
        from: Owner,
    },
}

/// One entry: who a MAC lives behind, when it was last seen, and what the
/// table's user keeps with it.
#[derive(Debug, Clone, Copy)]
struct Slot<T> {
    owner: Owner,
    seen: Instant,
    extra: T,
}

/// A MAC → [`Owner`] table, bounded by [`Limits`].
///
/// `learn` and `lookup` cost one hash lookup (a new MAC, a move or an expiry
/// also touches the per-owner count map, which has one key per owner); only
/// [`MacTable::expire`] and [`MacTable::retain_owners`] visit every entry,
/// and they are meant for a timer and a route change, not for each frame.
///
/// An entry not seen for [`Limits::ttl`] is absent for `learn` and `lookup`,
/// but keeps its slot (and counts against its owner's quota and the total)
/// until a sweep removes it: freeing it earlier would need a scan or a
/// per-entry timer. Sweeps run every [`Limits::sweep_interval`] through
/// [`MacTable::poll_timeout`]/[`MacTable::handle_timeout`].
///
/// `T` is per-entry data for the user (the [`Inbound`] keeps its announcement
/// state there, so it needs no second map); it is reset to `T::default()`
/// whenever the entry is new or changes owner.
#[derive(Debug, Clone)]
pub struct MacTable<T = ()> {
    limits: Limits,
    /// The keys are chosen by whoever sends frames, so the hasher must resist
    /// collision floods: std's SipHash-1-3 with per-process random keys does.
    /// This is the crate's one use of OS randomness; it cannot reach any
    /// output, since nothing is ever emitted in this map's iteration order.
    entries: HashMap<Mac, Slot<T>>,
    /// Entries per owner, counting expired ones not yet swept; owners with none
    /// are absent. A BTreeMap so [`MacTable::counts`] comes out in order.
    counts: BTreeMap<Owner, usize>,
    /// When the next sweep is due; `None` while the table is empty (or the
    /// ttl is too long for an `Instant` to express).
    next_sweep: Option<Instant>,
}

impl<T> MacTable<T> {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        MacTable { limits, entries: HashMap::new(), counts: BTreeMap::new(), next_sweep: None }
    }

    /// The table's bounds.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Entries held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries `owner` holds, including expired ones not yet swept.
    pub fn count(&self, owner: Owner) -> usize {
        self.counts.get(&owner).copied().unwrap_or(0)
    }

    /// `(owner, entries)` for every owner holding any, in owner order
    /// ([`Owner::Local`] first), for status and metrics.
    pub fn counts(&self) -> impl Iterator<Item = (Owner, usize)> + '_ {
        self.counts.iter().map(|(o, n)| (*o, *n))
    }

    /// Who `mac` lives behind; `None` if unknown or expired.
    pub fn lookup(&self, now: Instant, mac: Mac) -> Option<Owner> {
        let ttl = self.limits.ttl;
        self.entries.get(&mac).filter(|s| live(s.seen, now, ttl)).map(|s| s.owner)
    }

    /// Removes entries not seen for [`Limits::ttl`]; returns how many. Visits
    /// every entry: call it from a timer (see [`MacTable::handle_timeout`]).
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.limits.ttl;
        let counts = &mut self.counts;
        let before = self.entries.len();
        self.entries.retain(|_, s| {
            let keep = live(s.seen, now, ttl);
            if !keep {
                uncount(counts, s.owner);
            }
            keep
        });
        self.shrink();
        before - self.entries.len()
    }

    /// Removes the entries of every owner for which `keep` is false (a peer
    /// that left); returns how many. `keep` is called once per owner holding
    /// entries, and the entries are only visited when some owner goes, so a
    /// route change that drops no peer with MACs costs no scan.
    pub fn retain_owners(&mut self, mut keep: impl FnMut(Owner) -> bool) -> usize {
        // In owner order, so the lookup below can binary-search.
        let gone: Vec<Owner> = self.counts.keys().copied().filter(|o| !keep(*o)).collect();
        if gone.is_empty() {
            return 0;
        }
        for o in &gone {
            self.counts.remove(o);
        }
        let before = self.entries.len();
        self.entries.retain(|_, s| gone.binary_search(&s.owner).is_err());
        self.shrink();
        before - self.entries.len()
    }

    /// When [`MacTable::handle_timeout`] wants to run next: every
    /// [`Limits::sweep_interval`] while the table holds entries, `None` while
    /// it is empty (there is nothing to expire, and the table was created
    /// without a clock reading to count from).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Sweeps expired entries if the sweep is due (an early call does
    /// nothing); returns how many were removed.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        if self.next_sweep.is_none_or(|t| now < t) {
            return 0;
        }
        let n = self.expire(now);
        self.next_sweep = if self.entries.is_empty() { None } else { self.sweep_after(now) };
        n
    }

    /// When the sweep after one at `now` is due; `None` for a ttl so long
    /// that it is never (an absurd `Limits` must not make `Instant` overflow).
    fn sweep_after(&self, now: Instant) -> Option<Instant> {
        now.checked_add(self.limits.sweep_interval())
    }

    /// Gives memory back after a flood has been swept; see [`SHRINK_FACTOR`].
    fn shrink(&mut self) {
        let len = self.entries.len();
        if self.entries.capacity() > SHRINK_FACTOR * len.max(SHRINK_FLOOR) {
            self.entries.shrink_to(2 * len);
        }
    }

    /// Test helper: recounts everything and checks the bounds.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut recount = BTreeMap::new();
        for s in self.entries.values() {
            *recount.entry(s.owner).or_insert(0) += 1;
        }
        assert_eq!(recount, self.counts, "per-owner counts match the entries");
        assert_eq!(self.counts.values().sum::<usize>(), self.len());
        assert!(self.len() <= self.limits.total, "{} entries over the total", self.len());
        for (o, n) in &self.counts {
            assert!(*n <= self.limits.per_owner, "{o} holds {n} entries");
        }
        if !self.is_empty() && self.sweep_after(Instant::now()).is_some() {
            assert!(self.next_sweep.is_some(), "a non-empty table has a sweep armed");
        }
    }
}

impl<T: Default> MacTable<T> {
    /// Records that `mac` lives behind `owner`, seen at `now`.
    ///
    /// A refresh (same owner) is never refused. A new MAC is refused with
    /// [`Reason::MacLimit`] if `owner` holds [`Limits::per_owner`] entries,
    /// else with [`Reason::TableFull`] if the table holds [`Limits::total`].
    /// A move to an owner at its quota is refused with `MacLimit` and the
    /// old entry kept. An expired entry learned again is [`Learned::New`].
    pub fn learn(&mut self, now: Instant, mac: Mac, owner: Owner) -> Result<Learned, Reason> {
        self.learn_with(now, mac, owner, |learned, _| learned)
    }

    /// [`MacTable::learn`], then `f` on the outcome and the entry's data.
    /// A closure rather than a returned `&mut T`, so the common case (a
    /// refresh) takes a single hash lookup.
    fn learn_with<R>(
        &mut self,
        now: Instant,
        mac: Mac,
        owner: Owner,
        f: impl FnOnce(Learned, &mut T) -> R,
    ) -> Result<R, Reason> {
        let limits = self.limits;
        if let Some(s) = self.entries.get_mut(&mac) {
            let was_live = live(s.seen, now, limits.ttl);
            if s.owner == owner {
                // `max`: a caller's clock reading may lag one taken on the other thread.
                s.seen = s.seen.max(now);
                if was_live {
                    return Ok(f(Learned::Refreshed, &mut s.extra));
                }
                // The entry kept its slot while expired, so no bound is checked.
                s.extra = T::default();
                return Ok(f(Learned::New, &mut s.extra));
            }
            if count_of(&self.counts, owner) >= limits.per_owner {
                return Err(Reason::MacLimit);
            }
            let from = s.owner;
            uncount(&mut self.counts, from);
            *self.counts.entry(owner).or_insert(0) += 1;
            *s = Slot { owner, seen: now, extra: T::default() };
            let learned = if was_live { Learned::Moved { from } } else { Learned::New };
            return Ok(f(learned, &mut s.extra));
        }
        if count_of(&self.counts, owner) >= limits.per_owner {
            return Err(Reason::MacLimit);
        }
        if self.entries.len() >= limits.total {
            return Err(Reason::TableFull);
        }
        *self.counts.entry(owner).or_insert(0) += 1;
        if self.next_sweep.is_none() {
            self.next_sweep = self.sweep_after(now);
        }
        // Only reached for a MAC that is absent, and after the bounds passed:
        // the entry API reserves room even when it finds nothing, so it must
        // not be used for lookups that may be refused.
        let s = self.entries.entry(mac).or_insert(Slot { owner, seen: now, extra: T::default() });
        Ok(f(Learned::New, &mut s.extra))
    }
}

/// Whether an entry seen at `seen` is still valid at `now`: entries live for
/// `[seen, seen + ttl)`.
fn live(seen: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(seen) < ttl
}

fn count_of(counts: &BTreeMap<Owner, usize>, owner: Owner) -> usize {
    counts.get(&owner).copied().unwrap_or(0)
}

fn uncount(counts: &mut BTreeMap<Owner, usize>, owner: Owner) {
    if let btree_map::Entry::Occupied(mut e) = counts.entry(owner) {
        if *e.get() <= 1 {
            e.remove();
        } else {
            *e.get_mut() -= 1;
        }
    }
}

/// Removes the entries of peers `routes` has no route to; returns how many.
fn forget_unreachable<T>(table: &mut MacTable<T>, routes: &Routes) -> usize {
    table.retain_owners(|o| match o {
        Owner::Local => true,
        Owner::Peer(p) => routes.unicast.contains_key(&p),
    })
}

/// What to do with a frame from this host's bridge; see [`Switch::handle_local_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress<'a> {
    /// Send it to `hop` (a directly connected peer), addressed to `dst`
    /// (the peer the destination MAC lives behind; `hop` relays it on if
    /// they differ).
    Unicast {
        /// The directly connected peer to send to.
        hop: PeerName,
        /// The peer the frame is for.
        dst: PeerName,
    },
    /// Send it as a broadcast to each of these peers (our children in our own
    /// broadcast tree); may be empty when we have no peers.
    Flood(&'a [PeerName]),
    /// Not for the network and not a fault: the source is the TAP's own MAC
    /// (the kernel's IPv6 and IGMP chatter on the TAP interface).
    Ignore,
    /// Dropped; count it under the reason.
    Drop(Reason),
}

/// The TAP side of the switch: decides where frames from this host's bridge go.
///
/// Feed it frames with [`Switch::handle_local_frame`], what the receive side
/// learned with [`Switch::handle_learned`] and routes with
/// [`Switch::set_routes`]; after each call that returns an [`Egress`], act on
/// it. Call [`Switch::handle_timeout`] when [`Switch::poll_timeout`] is due
/// (and poll again after any `handle_*`: the first learned MAC arms it).
///
/// Its table is the one frames are switched by: it learns local MACs from
/// frames and remote ones from the [`Inbound`]'s announcements.
#[derive(Debug, Clone)]
pub struct Switch {
    me: PeerName,
    tap_mac: Mac,
    routes: Routes,
    table: MacTable,
    moves_to_local: u64,
}

impl Switch {
    /// A switch for peer `me`, whose TAP interface has MAC `tap_mac`, with no
    /// routes (everything floods to nobody) until [`Switch::set_routes`].
    pub fn new(me: PeerName, tap_mac: Mac, limits: Limits) -> Self {
        Switch {
            me,
            tap_mac,
            routes: Routes { me, ..Routes::default() },
            table: MacTable::new(limits),
            moves_to_local: 0,
        }
    }

    /// This peer.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The routes in use.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The MAC table, for status and metrics.
    pub fn table(&self) -> &MacTable {
        &self.table
    }

    /// Installs new routes and forgets the MACs of peers they no longer reach
    /// (their frames could not be delivered, and forgetting them means a
    /// container that reappears elsewhere is flooded to at once); returns how
    /// many MACs were forgotten.
    pub fn set_routes(&mut self, routes: Routes) -> usize {
        self.routes = routes;
        forget_unreachable(&mut self.table, &self.routes)
    }

    /// Decides where a frame read from the TAP goes (`frame` starts with the
    /// Ethernet header; the shell strips the virtio-net header first), and
    /// learns its source MAC as local.
    ///
    /// Broadcast, multicast and unknown unicast frames flood along our
    /// broadcast tree; a frame for a MAC known behind a peer goes to that
    /// peer's next hop.
    pub fn handle_local_frame(&mut self, now: Instant, frame: &[u8]) -> Egress<'_> {
        let Some((dst, src)) = addresses(frame) else { return Egress::Drop(Reason::Runt) };
        if src == self.tap_mac {
            return Egress::Ignore;
        }
        if !src.is_valid_source() {
            return Egress::Drop(Reason::BadSource);
        }
        match self.table.learn(now, src, Owner::Local) {
            Ok(Learned::Moved { from: Owner::Peer(_) }) => self.moves_to_local += 1,
            Ok(_) => {}
            Err(r) => return Egress::Drop(r),
        }
        // A group address is never learned, so it is never looked up.
        let known = if dst.is_multicast() { None } else { self.table.lookup(now, dst) };
        match known {
            Some(Owner::Local) => Egress::Drop(Reason::LocalDestination),
            Some(Owner::Peer(p)) => match self.routes.next_hop(p) {
                Some(hop) => Egress::Unicast { hop, dst: p },
                None => Egress::Drop(Reason::NoRoute),
            },
            None => Egress::Flood(self.routes.broadcast_hops(self.me)),
        }
    }

    /// Takes an announcement from the receive side ([`Ingress::announce`]):
    /// `mac` lives behind `peer`. This also moves a local MAC to the peer (a
    /// container that moved hosts). Refused like [`MacTable::learn`], and with
    /// [`Reason::BadSource`] for a MAC no frame may carry as source and
    /// [`Reason::Looped`] for `peer` == us.
    pub fn handle_learned(&mut self, now: Instant, mac: Mac, peer: PeerName) -> Result<Learned, Reason> {
        if !mac.is_valid_source() {
            return Err(Reason::BadSource);
        }
        if peer == self.me {
            return Err(Reason::Looped);
        }
        self.table.learn(now, mac, Owner::Peer(peer))
    }

    /// How many times a MAC known behind a peer has turned up on our bridge.
    /// The shell publishes it to the receive side, which calls
    /// [`Inbound::remote_moved_to_local`] when it changes, so a MAC that goes
    /// back to its peer is announced again rather than left local here.
    pub fn moves_to_local(&self) -> u64 {
        self.moves_to_local
    }

    /// When [`Switch::handle_timeout`] wants to run next (`None`: no timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.poll_timeout()
    }

    /// Sweeps expired MACs if due; returns how many were removed.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        self.table.handle_timeout(now)
    }
}

/// Where to relay a frame from a peer; see [`Inbound::handle_peer_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay<'a> {
    /// Not relayed.
    None,
    /// To this directly connected peer.
    One(PeerName),
    /// To every peer of `hops` but `except` (the link the frame came on).
    /// Only produced when at least one hop remains.
    Tree {
        /// Our children in the source's broadcast tree.
        hops: &'a [PeerName],
        /// The peer not to send it back to.
        except: PeerName,
    },
}

/// What to do with a frame from a peer; see [`Inbound::handle_peer_frame`].
/// The parts are independent: a broadcast can be delivered, announce its
/// source and still be `dropped` for relaying (its ttl ran out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingress<'a> {
    /// Write it to our TAP.
    pub deliver: bool,
    /// Pass it on to other peers.
    pub relay: Relay<'a>,
    /// The ttl to put on relayed copies; 0 when there are none.
    pub ttl: u8,
    /// Send `(mac, peer)` to the [`Switch`] ([`Switch::handle_learned`]); if
    /// the channel is full, call [`Inbound::announce_failed`].
    pub announce: Option<(Mac, PeerName)>,
    /// Why (part of) the frame's handling was dropped; count it.
    pub dropped: Option<Reason>,
}

impl Ingress<'_> {
    /// Nothing to do but count `why`.
    fn refused(why: Reason) -> Self {
        Ingress { deliver: false, relay: Relay::None, ttl: 0, announce: None, dropped: Some(why) }
    }
}

/// Per-entry announcement state kept in the [`Inbound`]'s table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Announced {
    /// When the entry was last announced; `None`: never, or the announcement
    /// was lost.
    at: Option<Instant>,
    /// [`Inbound`]'s move generation at that announcement.
    generation: u64,
}

/// The UDP side of the switch: validates frames from peers, decides delivery
/// and relaying, and tells the [`Switch`] what it learned.
///
/// Feed it opened frames with [`Inbound::handle_peer_frame`] and routes with
/// [`Inbound::set_routes`]; act on each [`Ingress`]. Call
/// [`Inbound::remote_moved_to_local`] when [`Switch::moves_to_local`] changed,
/// [`Inbound::announce_failed`] when an announcement could not be queued, and
/// [`Inbound::handle_timeout`] when [`Inbound::poll_timeout`] is due.
///
/// It keeps its own table (the threads share no state): source MACs by peer,
/// plus when each was last announced, so the [`Switch`] hears of a MAC when
/// it is new or moved, and again every ttl/8 while its frames keep coming
/// (which keeps the [`Switch`]'s entry from expiring, and repairs a lost
/// announcement), not once per frame.
#[derive(Debug, Clone)]
pub struct Inbound {
    me: PeerName,
    routes: Routes,
    table: MacTable<Announced>,
    /// Bumped by [`Inbound::remote_moved_to_local`]; an entry announced under
    /// an older generation is announced again. O(1) however many entries.
    generation: u64,
    announce_every: Duration,
    /// Which peer each source MAC may come from, per segment; `None` until
    /// [`Inbound::set_owners`].
    owners: Option<Arc<HashMap<(u32, Mac), PeerName>>>,
}

impl Inbound {
    /// The receive side for peer `me`, with no routes until [`Inbound::set_routes`].
    pub fn new(me: PeerName, limits: Limits) -> Self {
        Inbound {
            me,
            routes: Routes { me, ..Routes::default() },
            table: MacTable::new(limits),
            generation: 0,
            announce_every: limits.ttl / 8,
            owners: None,
        }
    }

    /// From now on, a frame is taken only when its source MAC belongs to its source peer in
    /// `owners` (the announced MACs, and each peer's bridge MAC); others are dropped as
    /// [`Reason::Unannounced`]. Until this is called, every source MAC is taken.
    pub fn set_owners(&mut self, owners: Arc<HashMap<(u32, Mac), PeerName>>) {
        self.owners = Some(owners);
    }

    /// This peer.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The routes in use.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The MAC table, for status and metrics.
    pub fn table(&self) -> &MacTable<Announced> {
        &self.table
    }

    /// Installs new routes and forgets the MACs of peers they no longer reach;
    /// returns how many MACs were forgotten.
    pub fn set_routes(&mut self, routes: Routes) -> usize {
        self.routes = routes;
        forget_unreachable(&mut self.table, &self.routes)
    }

    /// Decides what to do with a frame that arrived (opened) on the link to
    /// `link_peer`, with its sleeve metadata. `frame` starts with the Ethernet
    /// header.
    ///
    /// The source peer must be `link_peer` or one we have a route to; the
    /// inner source MAC is learned behind it (a refusal drops the frame
    /// whole). Broadcasts are delivered and relayed down the source's tree;
    /// unicast is delivered if it is for us, else relayed to the next hop
    /// unless that would send it back where it came from.
    pub fn handle_peer_frame(
        &mut self,
        now: Instant,
        link_peer: PeerName,
        meta: &FrameMeta,
        frame: &[u8],
    ) -> Ingress<'_> {
        let Some((_, src)) = addresses(frame) else { return Ingress::refused(Reason::Runt) };
        if meta.src == self.me {
            return Ingress::refused(Reason::Looped);
        }
        if !src.is_valid_source() {
            return Ingress::refused(Reason::BadSource);
        }
        if meta.src != link_peer && self.routes.next_hop(meta.src).is_none() {
            return Ingress::refused(Reason::UnknownSource);
        }
        if self.owners.as_ref().is_some_and(|o| o.get(&(meta.segment, src)) != Some(&meta.src)) {
            return Ingress::refused(Reason::Unannounced);
        }
        let (generation, every) = (self.generation, self.announce_every);
        // New and moved entries come with `Announced::default()`, so they are due.
        let due = self.table.learn_with(now, src, Owner::Peer(meta.src), |_, a| {
            let due = a.generation != generation || a.at.is_none_or(|t| now.saturating_duration_since(t) >= every);
            if due {
                *a = Announced { at: Some(now), generation };
            }
            due
        });
        let announce = match due {
            Ok(true) => Some((src, meta.src)),
            Ok(false) => None,
            Err(why) => return Ingress::refused(why),
        };
        let broadcast = meta.is_broadcast();
        let for_me = meta.dst == self.me;
        let mut out = Ingress { deliver: broadcast || for_me, relay: Relay::None, ttl: 0, announce, dropped: None };
        if !broadcast && for_me {
            return out;
        }
        if meta.ttl <= 1 {
            out.dropped = Some(Reason::TtlExpired);
            return out;
        }
        if broadcast {
            let hops = self.routes.broadcast_hops(meta.src);
            if hops.iter().any(|h| *h != link_peer) {
                out.relay = Relay::Tree { hops, except: link_peer };
                out.ttl = meta.ttl - 1;
            }
        } else {
            match self.routes.next_hop(meta.dst) {
                Some(hop) if hop != link_peer => {
                    out.relay = Relay::One(hop);
                    out.ttl = meta.ttl - 1;
                }
                _ => out.dropped = Some(Reason::NoRoute),
            }
        }
        out
    }

    /// The [`Switch`] saw a MAC move from a peer to our bridge (its
    /// [`Switch::moves_to_local`] changed). We do not know which, so every
    /// entry is announced again on its next frame: if the MAC goes back to its
    /// peer, the [`Switch`] learns so at once rather than after ttl/8.
    pub fn remote_moved_to_local(&mut self) {
        self.generation += 1;
    }

    /// The announcement of `mac` could not be passed on (the channel was
    /// full): announce it again on its next frame.
    pub fn announce_failed(&mut self, mac: Mac) {
        if let Some(s) = self.table.entries.get_mut(&mac) {
            s.extra.at = None;
        }
    }

    /// When [`Inbound::handle_timeout`] wants to run next (`None`: no timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.poll_timeout()
    }

    /// Sweeps expired MACs if due; returns how many were removed.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        self.table.handle_timeout(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sleeve::{FLAG_BROADCAST, INITIAL_TTL, VNET_LEN};
    use proptest::prelude::*;

    // Peers: we are A, directly connected to B and C; D sits behind B; E is
    // not in the routes.
    const A: PeerName = PeerName::from_u64(0xa);
    const B: PeerName = PeerName::from_u64(0xb);
    const C: PeerName = PeerName::from_u64(0xc);
    const D: PeerName = PeerName::from_u64(0xd);
    const E: PeerName = PeerName::from_u64(0xe);

    /// Our TAP interface.
    const TAP: [u8; 6] = [0x7a, 0x1e, 0x00, 0x00, 0x00, 0x01];
    /// Containers: C1 and C4 on this host, C2 behind B, C3 behind D.
    const C1: [u8; 6] = [0x02, 0x42, 0x0a, 0x20, 0x00, 0x02];
    const C2: [u8; 6] = [0x02, 0x42, 0x0a, 0x20, 0x00, 0x03];
    const C3: [u8; 6] = [0x02, 0x42, 0x0a, 0x20, 0x00, 0x04];
    const C4: [u8; 6] = [0x02, 0x42, 0x0a, 0x20, 0x00, 0x05];

    /// C1 (10.32.0.2) asks who has 10.32.0.3.
    const ARP_REQUEST: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x02, // source: C1
        0x08, 0x06, // ethertype: ARP
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet, IPv4, 6-byte MACs, 4-byte addresses
        0x00, 0x01, // request
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x02, 10, 32, 0, 2, // sender: C1, 10.32.0.2
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 10, 32, 0, 3, // target: ?, 10.32.0.3
    ];

    /// C2 answers: 10.32.0.3 is at C2.
    const ARP_REPLY: [u8; 42] = [
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x02, // destination: C1
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x03, // source: C2
        0x08, 0x06, // ethertype: ARP
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet, IPv4, 6-byte MACs, 4-byte addresses
        0x00, 0x02, // reply
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x03, 10, 32, 0, 3, // sender: C2, 10.32.0.3
        0x02, 0x42, 0x0a, 0x20, 0x00, 0x02, 10, 32, 0, 2, // target: C1, 10.32.0.2
    ];

    /// An MLDv2 report the kernel sends from the TAP interface itself.
    const TAP_MLD: [u8; 14] = [
        0x33, 0x33, 0x00, 0x00, 0x00, 0x16, // destination: IPv6 multicast (all MLDv2 routers)
        0x7a, 0x1e, 0x00, 0x00, 0x00, 0x01, // source: our TAP
        0x86, 0xdd, // ethertype: IPv6 (the rest does not matter here)
    ];

    /// A minimum-size IPv4 frame from `src` to `dst` (payload zeroed).
    fn eth(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    /// A MAC numbered `i`, for tests that need many.
    fn mac(i: u8) -> Mac {
        Mac([0x02, 0x00, 0x00, 0x00, 0x00, i])
    }

    /// A unicast frame from B for us.
    const META: FrameMeta = FrameMeta { src: B, dst: A, flags: 0, ttl: INITIAL_TTL, vnet: [0; VNET_LEN], segment: 0 };
    /// A broadcast from B.
    const BCAST: FrameMeta = FrameMeta { flags: FLAG_BROADCAST, dst: PeerName::from_u64(0), ..META };

    /// A's routes: D is reached through B; each peer's broadcasts go on to
    /// the peers A is the parent of in that peer's tree.
    fn routes() -> Routes {
        Routes {
            me: A,
            unicast: BTreeMap::from([(B, B), (C, C), (D, B)]),
            broadcast: BTreeMap::from([(A, vec![B, C]), (B, vec![C]), (C, vec![B]), (D, vec![C])]),
        }
    }

    /// The routes once D has left.
    fn routes_without_d() -> Routes {
        let mut r = routes();
        r.unicast.remove(&D);
        r.broadcast.remove(&D);
        r
    }

    const TTL: Duration = Duration::from_secs(600);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn switch(limits: Limits) -> Switch {
        let mut s = Switch::new(A, Mac(TAP), limits);
        assert_eq!(s.set_routes(routes()), 0);
        s
    }

    fn inbound(limits: Limits) -> Inbound {
        let mut i = Inbound::new(A, limits);
        assert_eq!(i.set_routes(routes()), 0);
        i
    }

    fn ingress(deliver: bool, relay: Relay<'_>, ttl: u8, announce: Option<([u8; 6], PeerName)>) -> Ingress<'_> {
        Ingress { deliver, relay, ttl, announce: announce.map(|(m, p)| (Mac(m), p)), dropped: None }
    }

    fn dropped(why: Reason) -> Ingress<'static> {
        Ingress { deliver: false, relay: Relay::None, ttl: 0, announce: None, dropped: Some(why) }
    }

    #[test]
    fn mac_addresses_read_from_literal_frames() {
        assert_eq!(Mac(C1).to_string(), "02:42:0a:20:00:02");
        assert_eq!(format!("{:?}", Mac::BROADCAST), "ff:ff:ff:ff:ff:ff");
        assert_eq!(Mac::from_slice(&C1), Some(Mac(C1)));
        assert_eq!(Mac::from_slice(&C1[..5]), None);
        assert_eq!(Mac::from_slice(&ARP_REQUEST[..7]), None);
        assert!(Mac::BROADCAST.is_multicast() && Mac::BROADCAST.is_broadcast());
        assert!(Mac([0x33, 0x33, 0x00, 0x00, 0x00, 0x16]).is_multicast(), "IPv6 multicast");
        assert!(Mac([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]).is_multicast(), "IPv4 multicast");
        assert!(!Mac(C1).is_multicast() && !Mac(C1).is_broadcast() && Mac(C1).is_valid_source());
        assert!(Mac::ZERO.is_zero() && !Mac::ZERO.is_valid_source());
        assert!(!Mac::BROADCAST.is_valid_source());
        assert_eq!(Owner::Local.to_string(), "local");
        assert_eq!(Owner::Peer(B).to_string(), "00:00:00:00:00:0b");

        assert_eq!(dst(&ARP_REQUEST), Some(Mac::BROADCAST));
        assert_eq!(src(&ARP_REQUEST), Some(Mac(C1)));
        assert_eq!((dst(&ARP_REPLY), src(&ARP_REPLY)), (Some(Mac(C1)), Some(Mac(C2))));
        assert_eq!(src(&ARP_REQUEST[..ETHERNET_HEADER_LEN]), Some(Mac(C1)), "a bare header is enough");
        assert_eq!(dst(&ARP_REQUEST[..13]), None, "runt");
        assert_eq!(src(&[]), None, "runt");
    }

    #[test]
    fn reasons_index_their_labels() {
        let mut seen = std::collections::BTreeSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
            let l = r.label();
            assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{l}");
            assert!(seen.insert(l), "{l} twice");
        }
    }

    #[test]
    fn arp_broadcast_floods_along_our_tree() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[B, C]));
        assert_eq!(s.table().lookup(t0, Mac(C1)), Some(Owner::Local), "the source is learned");

        // Alone (no routes yet): flooded to nobody, but still learned.
        let mut alone = Switch::new(A, Mac(TAP), Limits::default());
        assert_eq!(alone.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[]));
        assert_eq!(alone.table().count(Owner::Local), 1);
    }

    #[test]
    fn unknown_unicast_is_flooded() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &eth(C2, C1)), Egress::Flood(&[B, C]));
        assert_eq!(s.handle_local_frame(t0, &eth([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb], C1)), Egress::Flood(&[B, C]));
    }

    #[test]
    fn the_reply_teaches_the_way_back() {
        let t0 = Instant::now();
        let (mut s, mut i) = (switch(Limits::default()), inbound(Limits::default()));
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[B, C]));

        // C2's reply comes from B, addressed to us (B learned C1 from our flood).
        let t1 = t0 + secs(1);
        let got = i.handle_peer_frame(t1, B, &META, &ARP_REPLY);
        assert_eq!(got, ingress(true, Relay::None, 0, Some((C2, B))));
        assert_eq!(s.handle_learned(t1, Mac(C2), B), Ok(Learned::New));
        assert_eq!(s.handle_local_frame(t1, &eth(C2, C1)), Egress::Unicast { hop: B, dst: B });

        // C3 lives behind D, which B relays for: frames to it go to B, addressed to D.
        let from_d = FrameMeta { src: D, ..META };
        let got = i.handle_peer_frame(t1, B, &from_d, &eth(C1, C3));
        assert_eq!(got, ingress(true, Relay::None, 0, Some((C3, D))));
        let (mac, peer) = got.announce.expect("announced");
        assert_eq!(s.handle_learned(t1, mac, peer), Ok(Learned::New));
        assert_eq!(s.handle_local_frame(t1, &eth(C3, C1)), Egress::Unicast { hop: B, dst: D });
    }

    #[test]
    fn tap_chatter_is_ignored_not_learned() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &TAP_MLD), Egress::Ignore);
        assert_eq!(s.handle_local_frame(t0, &eth(C1, TAP)), Egress::Ignore);
        assert!(s.table().is_empty());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn runts_and_bad_sources_are_dropped_unlearned() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST[..13]), Egress::Drop(Reason::Runt));
        assert_eq!(s.handle_local_frame(t0, &[]), Egress::Drop(Reason::Runt));
        let multicast = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
        assert_eq!(s.handle_local_frame(t0, &eth(C2, multicast)), Egress::Drop(Reason::BadSource));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, [0xff; 6])), Egress::Drop(Reason::BadSource));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, [0; 6])), Egress::Drop(Reason::BadSource));
        assert!(s.table().is_empty());
        assert_eq!(s.handle_learned(t0, Mac(multicast), B), Err(Reason::BadSource));
        assert_eq!(s.handle_learned(t0, Mac(C2), A), Err(Reason::Looped), "we are not a peer of ours");
        assert!(s.table().is_empty());
    }

    #[test]
    fn frames_between_local_containers_are_not_sent() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &eth(C4, C1)), Egress::Flood(&[B, C]));
        assert_eq!(s.handle_local_frame(t0, &eth(C1, C4)), Egress::Drop(Reason::LocalDestination));
    }

    #[test]
    fn a_mac_behind_an_unreachable_peer_has_no_route() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_learned(t0, Mac(C2), E), Ok(Learned::New));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, C1)), Egress::Drop(Reason::NoRoute));
    }

    #[test]
    fn a_mac_moves_to_a_peer_and_back() {
        let t0 = Instant::now();
        let (mut s, mut i) = (switch(Limits::default()), inbound(Limits::default()));
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[B, C]));

        // C1 moves to host B: its ARP now arrives from B.
        let t1 = t0 + secs(1);
        let got = i.handle_peer_frame(t1, B, &BCAST, &ARP_REQUEST);
        assert_eq!(got, ingress(true, Relay::Tree { hops: &[C], except: B }, INITIAL_TTL - 1, Some((C1, B))));
        assert_eq!(s.handle_learned(t1, Mac(C1), B), Ok(Learned::Moved { from: Owner::Local }));
        assert_eq!(s.moves_to_local(), 0, "only moves to us count");
        assert_eq!(s.handle_local_frame(t1, &eth(C1, C4)), Egress::Unicast { hop: B, dst: B });
        assert_eq!(s.table().count(Owner::Local), 1, "C4 only");

        // It comes back here.
        let t2 = t0 + secs(2);
        assert_eq!(s.handle_local_frame(t2, &ARP_REQUEST), Egress::Flood(&[B, C]));
        assert_eq!(s.moves_to_local(), 1);
        assert_eq!(s.table().lookup(t2, Mac(C1)), Some(Owner::Local));
        assert_eq!(s.handle_local_frame(t2, &eth(C1, C4)), Egress::Drop(Reason::LocalDestination));

        // The receive side still has C1 behind B, announced a second ago: a
        // frame from it now would not be announced...
        let t3 = t0 + secs(3);
        assert_eq!(i.handle_peer_frame(t3, B, &META, &eth(C4, C1)).announce, None);
        // ...until the shell passes on that the switch counted a move to local.
        i.remote_moved_to_local();
        let got = i.handle_peer_frame(t3, B, &META, &eth(C4, C1));
        assert_eq!(got.announce, Some((Mac(C1), B)));
        assert_eq!(s.handle_learned(t3, Mac(C1), B), Ok(Learned::Moved { from: Owner::Local }));
        assert_eq!(s.handle_local_frame(t3, &eth(C1, C4)), Egress::Unicast { hop: B, dst: B });
        // Once per generation.
        assert_eq!(i.handle_peer_frame(t3, B, &META, &eth(C4, C1)).announce, None);
    }

    #[test]
    fn each_owner_is_held_to_its_quota() {
        let t0 = Instant::now();
        let limits = Limits { per_owner: 2, total: 6, ttl: TTL };
        let mut s = switch(limits);
        let (l1, l2, l3) = (mac(1), mac(2), mac(3));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, l1.0)), Egress::Flood(&[B, C]));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, l2.0)), Egress::Flood(&[B, C]));
        assert_eq!(s.handle_local_frame(t0, &eth(C2, l3.0)), Egress::Drop(Reason::MacLimit));
        let t1 = t0 + secs(1);
        assert_eq!(s.handle_local_frame(t1, &eth(C2, l1.0)), Egress::Flood(&[B, C]), "a refresh is never refused");

        // Other owners are unaffected.
        assert_eq!(s.handle_learned(t1, mac(11), B), Ok(Learned::New));
        assert_eq!(s.handle_learned(t1, mac(12), B), Ok(Learned::New));
        assert_eq!(s.handle_learned(t1, mac(13), B), Err(Reason::MacLimit));
        assert_eq!(s.handle_learned(t1, mac(13), C), Ok(Learned::New));
        assert_eq!(s.handle_learned(t1, mac(12), B), Ok(Learned::Refreshed));

        // A move to an owner at its quota is refused; the MAC stays where it was.
        assert_eq!(s.handle_learned(t1, l1, B), Err(Reason::MacLimit));
        assert_eq!(s.table().lookup(t1, l1), Some(Owner::Local));
        assert_eq!(s.handle_local_frame(t1, &eth(l1.0, l2.0)), Egress::Drop(Reason::LocalDestination));
        // And out of a full owner into one with room is fine.
        assert_eq!(s.handle_learned(t1, l2, C), Ok(Learned::Moved { from: Owner::Local }));
        assert_eq!(s.handle_local_frame(t1, &eth(C2, l3.0)), Egress::Flood(&[B, C]), "room again");

        let counts: Vec<_> = s.table().counts().collect();
        assert_eq!(counts, [(Owner::Local, 2), (Owner::Peer(B), 2), (Owner::Peer(C), 2)]);
        s.table.check_invariants();
    }

    #[test]
    fn the_table_is_held_to_its_total() {
        let t0 = Instant::now();
        let mut t = MacTable::<()>::new(Limits { per_owner: 2, total: 3, ttl: TTL });
        assert_eq!(t.learn(t0, mac(1), Owner::Local), Ok(Learned::New));
        assert_eq!(t.learn(t0, mac(2), Owner::Local), Ok(Learned::New));
        assert_eq!(t.learn(t0, mac(3), Owner::Peer(B)), Ok(Learned::New));
        assert_eq!(t.learn(t0, mac(4), Owner::Peer(C)), Err(Reason::TableFull));
        assert_eq!(t.learn(t0, mac(4), Owner::Local), Err(Reason::MacLimit), "the owner's quota is named first");
        assert_eq!(t.lookup(t0, mac(4)), None);
        // Refreshes and moves need no free slot.
        assert_eq!(t.learn(t0 + secs(1), mac(1), Owner::Local), Ok(Learned::Refreshed));
        assert_eq!(t.learn(t0 + secs(1), mac(3), Owner::Peer(B)), Ok(Learned::Refreshed));
        assert_eq!(t.learn(t0 + secs(1), mac(2), Owner::Peer(C)), Ok(Learned::Moved { from: Owner::Local }));
        assert_eq!(t.len(), 3);
        t.check_invariants();
    }

    #[test]
    fn expired_macs_are_unknown_and_their_slots_come_back() {
        let t0 = Instant::now();
        let mut t = MacTable::<()>::new(Limits { per_owner: 1, total: 10, ttl: TTL });
        assert_eq!(t.learn(t0, mac(1), Owner::Local), Ok(Learned::New));
        assert_eq!(t.lookup(t0 + TTL - Duration::from_nanos(1), mac(1)), Some(Owner::Local));
        let t1 = t0 + TTL;
        assert_eq!(t.lookup(t1, mac(1)), None, "entries live for [seen, seen + ttl)");
        assert_eq!(t.learn(t1, mac(1), Owner::Local), Ok(Learned::New), "learned again");
        assert_eq!(t.learn(t1, mac(2), Owner::Local), Err(Reason::MacLimit), "one slot, held by mac 1");

        // An expired entry learned behind another owner is new, not a move, and the counts follow.
        let t2 = t1 + TTL;
        assert_eq!(t.learn(t2, mac(1), Owner::Peer(B)), Ok(Learned::New));
        assert_eq!((t.count(Owner::Local), t.count(Owner::Peer(B))), (0, 1));
        t.check_invariants();

        // Until a sweep, an expired entry keeps its slot.
        let t3 = t2 + TTL;
        assert_eq!(t.learn(t3, mac(2), Owner::Peer(B)), Err(Reason::MacLimit));
        assert_eq!(t.expire(t3), 1);
        assert!(t.is_empty());
        assert_eq!(t.learn(t3, mac(2), Owner::Peer(B)), Ok(Learned::New));
        t.check_invariants();
    }

    #[test]
    fn extreme_limits_neither_panic_nor_spin() {
        let t0 = Instant::now();
        let mut forever = MacTable::<()>::new(Limits { per_owner: 1, total: 1, ttl: Duration::MAX });
        assert_eq!(forever.learn(t0, mac(1), Owner::Local), Ok(Learned::New));
        assert_eq!(forever.lookup(t0 + secs(1 << 40), mac(1)), Some(Owner::Local));
        assert_eq!(forever.handle_timeout(t0 + secs(1 << 40)), 0);
        forever.check_invariants();

        let mut never = MacTable::<()>::new(Limits { per_owner: 1, total: 1, ttl: Duration::ZERO });
        assert_eq!(never.learn(t0, mac(1), Owner::Local), Ok(Learned::New));
        assert_eq!(never.lookup(t0, mac(1)), None);
        assert_eq!(never.learn(t0, mac(1), Owner::Local), Ok(Learned::New));
        assert_eq!(never.poll_timeout(), Some(t0 + MIN_SWEEP_INTERVAL), "not a busy loop");
        assert_eq!(never.handle_timeout(t0 + MIN_SWEEP_INTERVAL), 1);

        let mut none = MacTable::<()>::new(Limits { per_owner: 0, total: 10, ttl: TTL });
        assert_eq!(none.learn(t0, mac(1), Owner::Local), Err(Reason::MacLimit));
        assert!(none.is_empty());
    }

    #[test]
    fn the_sweep_timer_frees_expired_macs() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.poll_timeout(), None, "nothing to sweep");
        assert_eq!(s.handle_timeout(t0), 0);
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[B, C]));
        assert_eq!(s.poll_timeout(), Some(t0 + secs(60)), "every ttl/10");
        assert_eq!(s.handle_timeout(t0 + secs(59)), 0, "early: nothing");
        assert_eq!(s.poll_timeout(), Some(t0 + secs(60)));
        assert_eq!(s.handle_timeout(t0 + secs(60)), 0);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(120)));

        assert_eq!(s.handle_learned(t0 + secs(100), Mac(C2), B), Ok(Learned::New));
        assert_eq!(s.handle_timeout(t0 + secs(660)), 1, "C1 expired at 600 s");
        assert_eq!(s.table().lookup(t0 + secs(660), Mac(C2)), Some(Owner::Peer(B)));
        assert_eq!(s.handle_local_frame(t0 + secs(660), &eth(C1, C4)), Egress::Flood(&[B, C]), "C1 is unknown");
        assert_eq!(s.poll_timeout(), Some(t0 + secs(720)));
        assert_eq!(s.handle_timeout(t0 + secs(720)), 1, "C2 expired at 700 s");
        assert_eq!(s.handle_timeout(t0 + secs(1320)), 1, "C4, learned at 660 s");
        assert!(s.table().is_empty());
        assert_eq!(s.poll_timeout(), None);

        let mut i = inbound(Limits::default());
        assert!(i.handle_peer_frame(t0, B, &META, &ARP_REPLY).deliver);
        assert_eq!(i.poll_timeout(), Some(t0 + secs(60)));
        assert_eq!(i.handle_timeout(t0 + TTL), 1);
        assert_eq!(i.poll_timeout(), None);
    }

    #[test]
    fn a_departed_peer_takes_its_macs_along() {
        let t0 = Instant::now();
        let mut s = switch(Limits::default());
        assert_eq!(s.handle_local_frame(t0, &ARP_REQUEST), Egress::Flood(&[B, C]));
        assert_eq!(s.handle_learned(t0, Mac(C2), B), Ok(Learned::New));
        assert_eq!(s.handle_learned(t0, Mac(C3), D), Ok(Learned::New));
        assert_eq!(s.set_routes(routes()), 0, "same routes, nothing forgotten");
        assert_eq!(s.set_routes(routes_without_d()), 1);
        assert_eq!(s.table().lookup(t0, Mac(C3)), None);
        assert_eq!(s.table().lookup(t0, Mac(C2)), Some(Owner::Peer(B)));
        assert_eq!(s.table().lookup(t0, Mac(C1)), Some(Owner::Local));
        assert_eq!(s.handle_local_frame(t0, &eth(C3, C1)), Egress::Flood(&[B, C]));
        s.table.check_invariants();

        let mut i = inbound(Limits::default());
        assert!(i.handle_peer_frame(t0, B, &META, &ARP_REPLY).announce.is_some());
        assert!(i.handle_peer_frame(t0, B, &FrameMeta { src: D, ..META }, &eth(C1, C3)).announce.is_some());
        assert_eq!(i.table().count(Owner::Peer(D)), 1);
        assert_eq!(i.set_routes(routes_without_d()), 1);
        assert_eq!(i.table().count(Owner::Peer(D)), 0);
        assert_eq!(i.table().lookup(t0, Mac(C2)), Some(Owner::Peer(B)));
        // D's frames are now refused, unless D is the link's peer.
        let got = i.handle_peer_frame(t0, B, &FrameMeta { src: D, ..META }, &eth(C1, C3));
        assert_eq!(got, dropped(Reason::UnknownSource));
        i.table.check_invariants();
    }

    #[test]
    fn inbound_delivers_what_is_for_us() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        assert_eq!(i.handle_peer_frame(t0, B, &META, &ARP_REPLY), ingress(true, Relay::None, 0, Some((C2, B))));
        // The ttl only matters for relaying.
        let last_hop = FrameMeta { ttl: 1, ..META };
        assert_eq!(i.handle_peer_frame(t0, B, &last_hop, &ARP_REPLY), ingress(true, Relay::None, 0, None));
    }

    #[test]
    fn macs_read_back_what_they_print() {
        let m = Mac([2, 0x0a, 0xff, 0, 0x10, 0x9c]);
        assert_eq!(m.to_string().parse::<Mac>(), Ok(m));
        assert_eq!("2:a:ff:0:10:9c".parse::<Mac>(), Ok(m));
        for bad in ["", "02:0a:ff:00:10", "02:0a:ff:00:10:9c:00", "zz:0a:ff:00:10:9c", "020:a:ff:00:10:9c", "02::ff:00:10:9c"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn with_owners_a_peer_sends_only_from_macs_it_announced() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        // C2 is B's, C3 is D's (behind B).
        i.set_owners(Arc::new(HashMap::from([((0, Mac(C2)), B), ((0, Mac(C3)), D), ((7, Mac(C1)), B)])));
        assert_eq!(i.handle_peer_frame(t0, B, &META, &ARP_REPLY), ingress(true, Relay::None, 0, Some((C2, B))));
        // B sends from C1, which nobody announced, or from D's C3 in its own name.
        assert_eq!(i.handle_peer_frame(t0, B, &META, &eth(C4, C1)), dropped(Reason::Unannounced));
        assert_eq!(i.handle_peer_frame(t0, B, &META, &eth(C4, C3)), dropped(Reason::Unannounced));
        // D's frames through B may carry D's MAC, not B's; relayed broadcasts too.
        let from_d = FrameMeta { src: D, ..META };
        assert!(i.handle_peer_frame(t0, B, &from_d, &eth(C4, C3)).dropped.is_none());
        assert_eq!(i.handle_peer_frame(t0, B, &from_d, &ARP_REPLY), dropped(Reason::Unannounced));
        assert_eq!(i.handle_peer_frame(t0, B, &FrameMeta { src: D, ..BCAST }, &ARP_REQUEST), dropped(Reason::Unannounced));
        // Nothing refused was learned.
        assert_eq!(i.table().lookup(t0, Mac(C1)), None);
        // B announced C1 on segment 7, not on the default network: taken only there.
        assert!(i.handle_peer_frame(t0, B, &FrameMeta { segment: 7, ..META }, &eth(C4, C1)).dropped.is_none());
        assert_eq!(i.handle_peer_frame(t0, B, &FrameMeta { segment: 7, ..META }, &ARP_REPLY), dropped(Reason::Unannounced));
    }

    #[test]
    fn inbound_relays_unicast_for_others() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        // From D (through B) to C: on to C.
        let d_to_c = FrameMeta { src: D, dst: C, ..META };
        let got = i.handle_peer_frame(t0, B, &d_to_c, &eth(C4, C3));
        assert_eq!(got, ingress(false, Relay::One(C), INITIAL_TTL - 1, Some((C3, D))));
        // From C to D: on to B.
        let c_to_d = FrameMeta { src: C, dst: D, ttl: 5, ..META };
        let got = i.handle_peer_frame(t0, C, &c_to_d, &eth(C3, C4));
        assert_eq!(got, ingress(false, Relay::One(B), 4, Some((C4, C))));
    }

    #[test]
    fn inbound_relays_broadcasts_down_the_source_tree() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        let got = i.handle_peer_frame(t0, B, &BCAST, &ARP_REPLY);
        assert_eq!(got, ingress(true, Relay::Tree { hops: &[C], except: B }, INITIAL_TTL - 1, Some((C2, B))));
        let from_d = FrameMeta { src: D, ttl: 3, ..BCAST };
        let got = i.handle_peer_frame(t0, B, &from_d, &eth([0xff; 6], C3));
        assert_eq!(got, ingress(true, Relay::Tree { hops: &[C], except: B }, 2, Some((C3, D))));
        // A's children in C's tree: B.
        let from_c = FrameMeta { src: C, ..BCAST };
        let got = i.handle_peer_frame(t0, C, &from_c, &eth([0xff; 6], C4));
        assert_eq!(got, ingress(true, Relay::Tree { hops: &[B], except: C }, INITIAL_TTL - 1, Some((C4, C))));
        // B's broadcast arriving from C (trees in flux): never back to C, so not relayed.
        let got = i.handle_peer_frame(t0, C, &BCAST, &ARP_REPLY);
        assert_eq!(got, ingress(true, Relay::None, 0, None));
    }

    #[test]
    fn inbound_ttl_runs_out() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        for ttl in [0, 1] {
            let d_to_c = FrameMeta { src: D, dst: C, ttl, ..META };
            let got = i.handle_peer_frame(t0, B, &d_to_c, &eth(C4, C3));
            assert_eq!(got.dropped, Some(Reason::TtlExpired));
            assert_eq!((got.deliver, got.relay), (false, Relay::None));
            // A broadcast is still delivered.
            let got = i.handle_peer_frame(t0, B, &FrameMeta { ttl, ..BCAST }, &ARP_REPLY);
            assert_eq!(got.dropped, Some(Reason::TtlExpired));
            assert_eq!((got.deliver, got.relay), (true, Relay::None));
        }
    }

    #[test]
    fn inbound_refuses_our_own_frames_and_strangers() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        let ours = FrameMeta { src: A, ..BCAST };
        assert_eq!(i.handle_peer_frame(t0, B, &ours, &ARP_REQUEST), dropped(Reason::Looped));
        let stranger = FrameMeta { src: E, ..META };
        assert_eq!(i.handle_peer_frame(t0, B, &stranger, &ARP_REPLY), dropped(Reason::UnknownSource));
        assert!(i.table().is_empty(), "nothing learned");
        // A new link's peer is believed before the routes know it.
        assert_eq!(i.handle_peer_frame(t0, E, &stranger, &ARP_REPLY), ingress(true, Relay::None, 0, Some((C2, E))));
        // Runts and invalid sources.
        assert_eq!(i.handle_peer_frame(t0, B, &META, &ARP_REPLY[..13]), dropped(Reason::Runt));
        assert_eq!(i.handle_peer_frame(t0, B, &META, &eth(C1, [0; 6])), dropped(Reason::BadSource));
        assert_eq!(i.handle_peer_frame(t0, B, &META, &eth(C1, [0x33, 0x33, 0, 0, 0, 1])), dropped(Reason::BadSource));
    }

    #[test]
    fn inbound_never_sends_a_frame_back_where_it_came_from() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        // B sends us a frame for D, but our way to D is through B.
        let b_to_d = FrameMeta { dst: D, ..META };
        let got = i.handle_peer_frame(t0, B, &b_to_d, &eth(C3, C2));
        assert_eq!(got, Ingress { dropped: Some(Reason::NoRoute), ..ingress(false, Relay::None, 0, Some((C2, B))) });
        // And for a peer we have no route to at all.
        let b_to_e = FrameMeta { dst: E, ..META };
        let got = i.handle_peer_frame(t0, B, &b_to_e, &eth(C3, C2));
        assert_eq!(got, Ingress { dropped: Some(Reason::NoRoute), ..ingress(false, Relay::None, 0, None) });
    }

    #[test]
    fn inbound_drops_frames_whose_source_it_may_not_learn() {
        let t0 = Instant::now();
        let mut i = inbound(Limits { per_owner: 1, total: 2, ttl: TTL });
        assert!(i.handle_peer_frame(t0, B, &BCAST, &eth([0xff; 6], C2)).deliver);
        assert_eq!(i.handle_peer_frame(t0, B, &BCAST, &eth([0xff; 6], C3)), dropped(Reason::MacLimit));
        let from_c = FrameMeta { src: C, ..BCAST };
        assert!(i.handle_peer_frame(t0, C, &from_c, &eth([0xff; 6], C3)).deliver);
        let from_d = FrameMeta { src: D, ..BCAST };
        assert_eq!(i.handle_peer_frame(t0, B, &from_d, &eth([0xff; 6], C4)), dropped(Reason::TableFull));
        assert_eq!(i.handle_peer_frame(t0, B, &BCAST, &eth([0xff; 6], C2)).dropped, None, "refresh");
    }

    #[test]
    fn announcements_are_deduplicated() {
        let t0 = Instant::now();
        let mut i = inbound(Limits::default());
        let at = |i: &mut Inbound, t: Duration, link: PeerName, meta: &FrameMeta| {
            i.handle_peer_frame(t0 + t, link, meta, &ARP_REPLY).announce
        };
        assert_eq!(at(&mut i, secs(0), B, &META), Some((Mac(C2), B)), "new");
        assert_eq!(at(&mut i, secs(1), B, &META), None);
        assert_eq!(at(&mut i, secs(74), B, &META), None);
        assert_eq!(at(&mut i, secs(75), B, &META), Some((Mac(C2), B)), "ttl/8 later");
        assert_eq!(at(&mut i, secs(76), B, &META), None);
        i.announce_failed(Mac(C2));
        i.announce_failed(Mac(C3)); // unknown: nothing to do
        assert_eq!(at(&mut i, secs(77), B, &META), Some((Mac(C2), B)), "again after a failed announcement");
        assert_eq!(at(&mut i, secs(78), B, &META), None);
        // C2 shows up behind C: a move is announced at once.
        let from_c = FrameMeta { src: C, ..META };
        assert_eq!(at(&mut i, secs(79), C, &from_c), Some((Mac(C2), C)), "moved");
        assert_eq!(at(&mut i, secs(80), C, &from_c), None);
        // After expiry it is new again.
        assert_eq!(at(&mut i, secs(79) + TTL, C, &from_c), Some((Mac(C2), C)), "expired");
    }

    #[test]
    fn slots_are_small() {
        // The memory figures in `Limits::total`'s doc.
        assert_eq!(std::mem::size_of::<(Mac, Slot<()>)>(), 40);
        assert_eq!(std::mem::size_of::<(Mac, Slot<Announced>)>(), 64);
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Op {
        /// Advance the clock by `dt` seconds and learn `mac(mac)` behind `owner(owner)`.
        Learn { dt: u64, mac: u8, owner: u8 },
        Expire { dt: u64 },
        Timeout { dt: u64 },
        /// Keep the owners whose bit is set.
        Retain { mask: u8 },
    }

    fn owner(i: u8) -> Owner {
        if i == 0 {
            Owner::Local
        } else {
            Owner::Peer(PeerName::from_u64(u64::from(i)))
        }
    }

    fn owner_bit(o: Owner) -> u8 {
        match o {
            Owner::Local => 0,
            Owner::Peer(p) => p.as_u64() as u8,
        }
    }

    /// The same rules on a plain map, recounting by scanning.
    struct Model {
        limits: Limits,
        entries: BTreeMap<Mac, (Owner, Instant)>,
    }

    impl Model {
        fn count(&self, o: Owner) -> usize {
            self.entries.values().filter(|(x, _)| *x == o).count()
        }

        fn learn(&mut self, now: Instant, mac: Mac, o: Owner) -> Result<Learned, Reason> {
            let per_owner = self.limits.per_owner;
            let ttl = self.limits.ttl;
            let count = self.count(o);
            let len = self.entries.len();
            match self.entries.get_mut(&mac) {
                Some((x, seen)) => {
                    let was_live = now.saturating_duration_since(*seen) < ttl;
                    if *x == o {
                        *seen = (*seen).max(now);
                        return Ok(if was_live { Learned::Refreshed } else { Learned::New });
                    }
                    if count >= per_owner {
                        return Err(Reason::MacLimit);
                    }
                    let from = *x;
                    (*x, *seen) = (o, now);
                    Ok(if was_live { Learned::Moved { from } } else { Learned::New })
                }
                None if count >= per_owner => Err(Reason::MacLimit),
                None if len >= self.limits.total => Err(Reason::TableFull),
                None => {
                    self.entries.insert(mac, (o, now));
                    Ok(Learned::New)
                }
            }
        }

        fn expire(&mut self, now: Instant) -> usize {
            let before = self.entries.len();
            self.entries.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < self.limits.ttl);
            before - self.entries.len()
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..60, 0u8..24, 0u8..5).prop_map(|(dt, mac, owner)| Op::Learn { dt, mac, owner }),
            1 => (0u64..300).prop_map(|dt| Op::Expire { dt }),
            1 => (0u64..300).prop_map(|dt| Op::Timeout { dt }),
            1 => any::<u8>().prop_map(|mask| Op::Retain { mask }),
        ]
    }

    proptest! {
        #[test]
        fn the_table_keeps_its_bounds_and_counts(
            per_owner in 0usize..8,
            total in 0usize..20,
            ttl in 1u64..400,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let limits = Limits { per_owner, total, ttl: secs(ttl) };
            let mut t = MacTable::<()>::new(limits);
            let mut model = Model { limits, entries: BTreeMap::new() };
            let mut now = Instant::now();
            for op in ops {
                match op {
                    Op::Learn { dt, mac: m, owner: o } => {
                        now += secs(dt);
                        prop_assert_eq!(t.learn(now, mac(m), owner(o)), model.learn(now, mac(m), owner(o)));
                    }
                    Op::Expire { dt } => {
                        now += secs(dt);
                        prop_assert_eq!(t.expire(now), model.expire(now));
                    }
                    Op::Timeout { dt } => {
                        now += secs(dt);
                        let due = t.poll_timeout().is_some_and(|d| now >= d);
                        let n = t.handle_timeout(now);
                        prop_assert_eq!(n, if due { model.expire(now) } else { 0 });
                    }
                    Op::Retain { mask } => {
                        let keep = |o: Owner| mask & (1 << owner_bit(o)) != 0;
                        let before = model.entries.len();
                        model.entries.retain(|_, (o, _)| keep(*o));
                        prop_assert_eq!(t.retain_owners(keep), before - model.entries.len());
                    }
                }
                t.check_invariants();
                prop_assert_eq!(t.len(), model.entries.len());
                for o in 0..5 {
                    prop_assert_eq!(t.count(owner(o)), model.count(owner(o)));
                }
                for m in 0..24 {
                    let want = model.entries.get(&mac(m))
                        .filter(|(_, seen)| now.saturating_duration_since(*seen) < limits.ttl)
                        .map(|(o, _)| *o);
                    prop_assert_eq!(t.lookup(now, mac(m)), want);
                }
            }
        }
    }
}
