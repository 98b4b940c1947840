//! Links to directly connected peers, and how the frame path's threads see the links and routes
//! the control path installs.
//!
//! The control path publishes a new [`Snapshot`] when a connection comes or goes or routes change
//! (rarely); each thread keeps its own `Arc` of the current one and looks for a newer one once
//! per batch with one atomic load. No lock is held while frames are handled or sent.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_proto::sleeve::{Opener, Sealer};
use weft_proto::{Mac, PeerName, Routes};

/// The data path to one directly connected peer.
pub struct Link {
    /// The peer.
    pub peer: PeerName,
    /// Where its sleeve listens, as it said (its control connection's address and its UDP
    /// port).
    pub addr: SocketAddr,
    /// Where its authenticated datagrams come from, when that is not `addr` (a NAT in between
    /// mapped it elsewhere): we send there. An IPv4 address is kept packed in `seen_v4`
    /// (`1 << 48 | ip << 16 | port`, 0 for none), read without a lock on every send and
    /// receive; an IPv6 one in `seen_v6`, with `roamed_v6` set.
    seen_v4: AtomicU64,
    seen_v6: Mutex<Option<SocketAddr>>,
    roamed_v6: AtomicBool,
    /// How often the address its datagrams come from changed.
    pub moves: AtomicU64,
    /// The largest datagram the path to the peer takes, when smaller than the socket's
    /// (0: the socket's); see `Shared::follow_path_mtu`.
    max_datagram: AtomicU64,
    /// Milliseconds after `epoch` when a smaller path MTU is looked at again.
    path_recheck_at: AtomicU64,
    /// Whether sends to this peer use GSO (turned off for this link alone when it fails).
    pub gso: AtomicBool,
    /// Path MTU probing towards this peer (the TAP thread sends probes with the heartbeats;
    /// the UDP thread takes the acknowledgements).
    pub prober: Mutex<weft_proto::pmtu::Prober>,
    /// Our receive index for this link.
    pub index: u32,
    /// Holds `index` for this link while it lives.
    _lease: IndexLease,
    /// Whether messages are encrypted.
    pub encrypted: bool,
    /// Seals what we send. Taken by the TAP thread, and by the UDP thread when it relays; held
    /// only while sealing, never while sending.
    pub sealer: Mutex<Sealer>,
    /// Opens what we receive (the UDP thread only).
    pub opener: Mutex<Opener>,
    /// Milliseconds after `epoch` of the last heartbeat received, 0 = never.
    last_heartbeat: AtomicU64,
    /// The sleeve's smoothed round trip in microseconds (from heartbeat echoes), 0 = none yet.
    srtt_us: AtomicU64,
    /// The peer's last echo request not answered yet: its stamp and when it came (our
    /// microseconds), answered by our next heartbeat.
    echo: Mutex<Option<(u64, u64)>>,
    epoch: Instant,
    /// Frames from this link dropped because their source MAC was not announced by their
    /// source peer.
    pub unannounced: AtomicU64,
}

impl Link {
    /// A new link; `epoch` is the frame path's start.
    pub fn new(peer: PeerName, addr: SocketAddr, lease: IndexLease, sealer: Sealer, opener: Opener, epoch: Instant, max_datagram: usize) -> Self {
        Link {
            peer,
            addr,
            seen_v4: AtomicU64::new(0),
            seen_v6: Mutex::new(None),
            roamed_v6: AtomicBool::new(false),
            moves: AtomicU64::new(0),
            max_datagram: AtomicU64::new(0),
            path_recheck_at: AtomicU64::new(0),
            gso: AtomicBool::new(true),
            prober: Mutex::new(weft_proto::pmtu::Prober::new(max_datagram)),
            index: lease.index(),
            _lease: lease,
            encrypted: sealer.encrypted(),
            sealer: Mutex::new(sealer),
            opener: Mutex::new(opener),
            last_heartbeat: AtomicU64::new(0),
            srtt_us: AtomicU64::new(0),
            echo: Mutex::new(None),
            epoch,
            unannounced: AtomicU64::new(0),
        }
    }

    /// Where to send: the address the peer's datagrams come from, once one came from
    /// elsewhere than it said, else the address it said.
    pub fn dest(&self) -> SocketAddr {
        let v4 = self.seen_v4.load(Acquire);
        if v4 != 0 {
            let ip = std::net::Ipv4Addr::from((v4 >> 16) as u32);
            return SocketAddr::new(ip.into(), v4 as u16);
        }
        if self.roamed_v6.load(Acquire) {
            return lock(&self.seen_v6).unwrap_or(self.addr);
        }
        self.addr
    }

    /// An authenticated datagram of this link came from `from`: replies go there from now on
    /// (a NAT mapped the peer's port, or mapped it anew). Only the UDP thread calls it, after
    /// the datagram was opened (and passed the replay window), so nobody without the link's
    /// keys can move it. Returns whether it moved.
    pub fn came_from(&self, from: SocketAddr) -> bool {
        if from == self.dest() {
            return false;
        }
        match from {
            SocketAddr::V4(a) => self.seen_v4.store(1 << 48 | u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port()), Release),
            SocketAddr::V6(_) => {
                self.seen_v4.store(0, Release);
                *lock(&self.seen_v6) = Some(from);
                self.roamed_v6.store(true, Release);
            }
        }
        self.moves.fetch_add(1, Relaxed);
        true
    }

    /// The largest datagram to send on this link: the path's, or `socket_max`.
    pub fn max_datagram(&self, socket_max: usize) -> usize {
        match self.max_datagram.load(Relaxed) {
            0 => socket_max,
            m => (m as usize).min(socket_max),
        }
    }

    /// Sets the largest datagram the path takes; returns the one before if it changed.
    pub fn set_max_datagram(&self, fits: usize, socket_max: usize) -> Option<usize> {
        let was = self.max_datagram(socket_max);
        let new = if fits >= socket_max { 0 } else { fits as u64 };
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.path_recheck_at.store(ms + PATH_RECHECK.as_millis() as u64, Relaxed);
        self.max_datagram.store(new, Relaxed);
        (self.max_datagram(socket_max) != was).then_some(was)
    }

    /// Whether the path's MTU is due to be looked at (at the first send, then once a second:
    /// the kernel learns a smaller one from ICMP, or forgets it, at any time).
    pub fn path_recheck_due(&self) -> bool {
        self.epoch.elapsed().as_millis() as u64 >= self.path_recheck_at.load(Relaxed)
    }

    /// One round-trip sample from a heartbeat echo; smoothed as TCP does (RFC 6298: 7/8 of
    /// the old, 1/8 of the new). Only the UDP thread writes it.
    pub fn rtt_sample(&self, rtt: Duration) {
        let sample = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.srtt_us.load(Relaxed);
        let new = if old == 0 { sample } else { (old * 7 + sample) / 8 };
        self.srtt_us.store(new, Relaxed);
    }

    /// The peer asked for an echo of `stamp`, which arrived at `now` (our microseconds).
    pub fn echo_requested(&self, stamp: u64, now: u64) {
        *lock(&self.echo) = Some((stamp, now));
    }

    /// The echo to answer in the heartbeat going out at `now`: the stamp and how long it was
    /// held (microseconds).
    pub fn take_echo(&self, now: u64) -> Option<(u64, u32)> {
        let (stamp, at) = lock(&self.echo).take()?;
        Some((stamp, u32::try_from(now.saturating_sub(at)).unwrap_or(u32::MAX)))
    }

    /// The sleeve's smoothed round trip to the peer, once measured.
    pub fn rtt(&self) -> Option<Duration> {
        match self.srtt_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// A heartbeat arrived now.
    pub fn heard(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_heartbeat.store(ms.max(1), Relaxed);
    }

    /// Time since the last heartbeat, if any arrived.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        let at = self.last_heartbeat.load(Relaxed);
        (at != 0).then(|| self.epoch.elapsed().saturating_sub(Duration::from_millis(at)))
    }
}

/// The smallest datagram a link is fitted to (an IPv4 path of 576 bytes).
pub const MIN_DATAGRAM: usize = 548;
/// How often a link looks at its path's MTU.
const PATH_RECHECK: Duration = Duration::from_secs(1);

/// Links and routes as the frame path's threads see them.
#[derive(Default, Clone)]
pub struct Snapshot {
    /// Unicast next hops and broadcast trees.
    pub routes: Routes,
    /// Links by peer.
    pub links: HashMap<PeerName, Arc<Link>>,
    /// Links by our receive index (the sleeve header's receiver field).
    pub by_index: HashMap<u32, Arc<Link>>,
    /// The peer each (segment, source MAC) may come from (announced MACs and bridge MACs);
    /// empty until the control path publishes it, so no peer's frame is taken before.
    pub owners: Arc<HashMap<(u32, Mac), PeerName>>,
    /// Named networks (segments other than 0): this host's TAP on each it is a member of.
    pub taps: Arc<HashMap<u32, NetworkTap>>,
    /// Routes of each named network that has members anywhere (broadcast trees pruned to its
    /// members); a host relays a network's frames even when it is not a member.
    pub segment_routes: Arc<HashMap<u32, Routes>>,
}

/// A named network's TAP, with the MAC of its kernel side (whose chatter is ignored).
#[derive(Clone)]
pub struct NetworkTap {
    pub tap: Arc<super::tap::Tap>,
    pub mac: Mac,
}

/// A value one writer replaces now and then and readers on other threads pick up without
/// taking a lock on their hot path.
pub struct Published<T> {
    current: Mutex<Arc<T>>,
    generation: AtomicU64,
}

impl<T> Published<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Published { current: Mutex::new(Arc::new(value)), generation: AtomicU64::new(1) }
    }

    /// Replaces the value with `f` of the current one.
    pub fn update(&self, f: impl FnOnce(&T) -> T) {
        let mut cur = lock(&self.current);
        *cur = Arc::new(f(&cur));
        self.generation.fetch_add(1, Release);
    }

    /// The current value (takes the lock briefly: for the control path, not per frame).
    pub fn load(&self) -> Arc<T> {
        lock(&self.current).clone()
    }

    /// A reader for one thread.
    pub fn reader(&self) -> Reader<T> {
        let generation = self.generation.load(Acquire);
        Reader { value: self.load(), generation }
    }
}

/// One thread's view of a [`Published`] value.
pub struct Reader<T> {
    value: Arc<T>,
    generation: u64,
}

impl<T> Reader<T> {
    /// Picks up a newer value if there is one; returns whether it did. One atomic load when
    /// nothing changed.
    pub fn refresh(&mut self, p: &Published<T>) -> bool {
        let g = p.generation.load(Acquire);
        if g == self.generation {
            return false;
        }
        self.value = p.load();
        self.generation = g;
        true
    }

    /// The value as of the last refresh.
    pub fn get(&self) -> &Arc<T> {
        &self.value
    }
}

/// Sleeve receive indices: random `u32`s, never 0, each unique among the links alive. The index
/// travels in clear in every datagram to us; random ones tell an observer nothing about how many
/// links came before and cannot be guessed from another link's.
#[derive(Clone, Default)]
pub struct Indices(Arc<Mutex<HashSet<u32>>>);

impl Indices {
    /// None taken yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh index, held until the lease is dropped (with the link that owns it).
    pub fn lease(&self) -> IndexLease {
        self.lease_with(rand::random::<u32>)
    }

    /// [`Indices::lease`] drawing candidates from `draw`.
    fn lease_with(&self, mut draw: impl FnMut() -> u32) -> IndexLease {
        let mut live = lock(&self.0);
        // Ends: the set holds one index per live connection, far fewer than 2^32.
        let index = loop {
            let i = draw();
            if i != 0 && live.insert(i) {
                break i;
            }
        };
        IndexLease { index, live: self.0.clone() }
    }

    /// Indices held now.
    pub fn live(&self) -> usize {
        lock(&self.0).len()
    }
}

/// One receive index, held from the connection's start until its link is gone.
pub struct IndexLease {
    index: u32,
    live: Arc<Mutex<HashSet<u32>>>,
}

impl IndexLease {
    /// The index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for IndexLease {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.index);
    }
}

// Poisoning only follows a panic on another thread while it held the lock; every holder
// finishes its update before releasing, so the value is consistent: keep going rather than take
// the router down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_updates_once() {
        let p = Published::new(1u32);
        let mut r = p.reader();
        assert_eq!(**r.get(), 1);
        assert!(!r.refresh(&p));
        p.update(|v| v + 1);
        assert!(r.refresh(&p));
        assert_eq!(**r.get(), 2);
        assert!(!r.refresh(&p));
        let r2 = p.reader();
        assert_eq!(**r2.get(), 2);
    }

    #[test]
    fn indices_are_never_zero_and_unique_among_live_leases() {
        let ix = Indices::new();
        // Drawn 0, then 5 twice, then 6: the second lease skips the 0 and the taken 5.
        let mut draws = [0u32, 5, 0, 5, 6].into_iter();
        let mut draw = || draws.next().unwrap_or(9);
        let a = ix.lease_with(&mut draw);
        let b = ix.lease_with(&mut draw);
        assert_eq!((a.index(), b.index()), (5, 6));
        drop(a);
        assert_eq!(ix.live(), 1);
        // Once released, 5 may be handed out again.
        let c = ix.lease_with(|| 5);
        assert_eq!(c.index(), 5);
        assert_eq!(ix.live(), 2);
    }

    #[test]
    fn indices_are_random() {
        let ix = Indices::new();
        let leases: Vec<IndexLease> = (0..2000).map(|_| ix.lease()).collect();
        let mut seen: Vec<u32> = leases.iter().map(IndexLease::index).collect();
        assert!(seen.iter().all(|i| *i != 0));
        // Consecutive indices (what the old counter gave) are a chance event now.
        let steps = seen.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
        assert!(steps < 3, "{steps} consecutive pairs");
        // Spread over the whole range, not a counter's corner of it.
        assert!(seen.iter().any(|i| *i > u32::MAX / 2) && seen.iter().any(|i| *i < u32::MAX / 2));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 2000);
        assert_eq!(ix.live(), 2000);
        drop(leases);
        assert_eq!(ix.live(), 0);
    }

    #[test]
    fn heartbeat_age_starts_unknown() {
        let epoch = Instant::now() - Duration::from_secs(5);
        let l = Link::new(
            PeerName::from_u64(1),
            "127.0.0.1:1".parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 1))),
            Indices::new().lease(),
            Sealer::new(weft_proto::sleeve::Cipher::Plain, 1),
            Opener::new(weft_proto::sleeve::Cipher::Plain),
            epoch,
            1472,
        );
        assert_eq!(l.heartbeat_age(), None);
        l.heard();
        assert!(l.heartbeat_age().is_some_and(|a| a < Duration::from_secs(1)));
    }

    #[test]
    fn the_destination_follows_where_datagrams_come_from() {
        let said: SocketAddr = SocketAddr::from(([192, 0, 2, 7], 6783));
        let l = Link::new(
            PeerName::from_u64(1),
            said,
            Indices::new().lease(),
            Sealer::new(weft_proto::sleeve::Cipher::Plain, 1),
            Opener::new(weft_proto::sleeve::Cipher::Plain),
            Instant::now(),
            1472,
        );
        assert_eq!(l.dest(), said);
        assert!(!l.came_from(said), "from where it said: nothing moves");
        let nat = SocketAddr::from(([198, 51, 100, 1], 40_001));
        assert!(l.came_from(nat));
        assert_eq!(l.dest(), nat);
        assert!(!l.came_from(nat));
        // A new mapping (conntrack flushed, NAT rebooted), then an IPv6 path, then back.
        let again = SocketAddr::from(([198, 51, 100, 1], 40_777));
        assert!(l.came_from(again));
        assert_eq!(l.dest(), again);
        let v6: SocketAddr = SocketAddr::new(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9).into(), 6783);
        assert!(l.came_from(v6));
        assert_eq!(l.dest(), v6);
        assert!(l.came_from(nat));
        assert_eq!(l.dest(), nat);
        assert_eq!(l.moves.load(Relaxed), 4);
        assert_eq!(l.addr, said, "what the peer said is kept");
        // The path's datagram size: smaller, the same (no change), back to the socket's.
        assert!(l.path_recheck_due(), "looked at with the first send");
        assert_eq!(l.max_datagram(1472), 1472);
        assert_eq!(l.set_max_datagram(1252, 1472), Some(1472));
        assert!(!l.path_recheck_due(), "then a second later");
        assert_eq!(l.max_datagram(1472), 1252);
        assert_eq!(l.set_max_datagram(1252, 1472), None);
        assert_eq!(l.max_datagram(1400), 1252);
        assert_eq!(l.set_max_datagram(9000, 1472), Some(1252));
        assert_eq!(l.max_datagram(1472), 1472);
    }
}
