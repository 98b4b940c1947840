//! What the frame path's threads share: the devices, the published links and routes, counters,
//! and the stop flag. The control path reaches it through [`super::plane::FramePath`].

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use weft_proto::switch::{Limits, Mac};
use weft_proto::PeerName;

use super::links::{Link, Published, Snapshot};
use super::stats::Stats;
use super::tap::Tap;
use super::udp::SleeveSocket;

/// See the module docs.
pub struct Shared {
    /// Our name.
    pub me: PeerName,
    /// The TAP on the bridge.
    pub tap: Tap,
    /// The kernel side's MAC of the TAP (its own chatter is ignored).
    pub tap_mac: Mac,
    /// The sleeve socket.
    pub udp: SleeveSocket,
    /// Links and routes, published by the control path.
    pub snapshot: Published<Snapshot>,
    /// Bounds of the MAC tables.
    pub limits: Limits,
    /// How often the TAP thread's switch moved a MAC from a peer to this host: the UDP thread
    /// re-announces what it knows when this changes.
    pub moves_to_local: AtomicU64,
    /// Counters.
    pub stats: Stats,
    /// Set to stop the threads (they notice within half a second).
    pub stop: AtomicBool,
    /// The frame path's start, the epoch of links' heartbeat times.
    pub epoch: Instant,
    /// Told `(segment, mac, owner)` for every MAC the UDP thread learns from a peer and every
    /// MAC the TAP thread sees move here (owner: us); the fastpath programs its entries from it.
    pub learn_hook: OnceLock<LearnHook>,
    /// Given every datagram that is a QUIC packet rather than a sleeve fragment (the control
    /// channel over UDP shares the sleeve's port); returns false when it could not take it.
    pub quic_hook: OnceLock<QuicHook>,
}

/// See [`Shared::quic_hook`].
pub type QuicHook = Box<dyn Fn(&[u8], std::net::SocketAddr) -> bool + Send + Sync>;

/// Whether a datagram on the sleeve port is a QUIC packet: QUIC sets the "fixed bit" (0x40) of
/// its first byte in every packet (RFC 9000 §17; weft never agrees to grease it), and a sleeve
/// fragment starts with its version, 1.
pub fn is_quic(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0x40 != 0)
}

/// See [`Shared::learn_hook`].
pub type LearnHook = Box<dyn Fn(u32, Mac, PeerName) + Send + Sync>;

impl Shared {
    /// Seals and sends one message on `link`, using `wire` as scratch space.
    pub fn seal_and_send(&self, link: &Arc<Link>, msg: &mut Vec<u8>, wire: &mut Vec<u8>) {
        let max = link.max_datagram(self.udp.max_datagram());
        self.seal_and_send_at(link, msg, wire, max, link.path_recheck_due());
    }

    /// Seals `msg` into datagrams of at most `max` bytes and sends them; looks at the path MTU
    /// again when a send was refused as too big, or when `recheck`.
    fn seal_and_send_at(&self, link: &Link, msg: &mut Vec<u8>, wire: &mut Vec<u8>, max: usize, recheck: bool) {
        let seg = super::links::lock(&link.sealer).seal(msg, max, wire);
        let to = link.dest();
        let news = self.udp.send_all(to, wire, seg, &link.gso, &self.stats);
        if news.too_big || recheck {
            self.follow_path_mtu(link, to);
        }
    }

    /// Microseconds since the frame path started: the stamp of round-trip echoes.
    pub fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Sends the path MTU probe the link's prober wants now, if any.
    pub fn probe_if_due(&self, link: &Arc<Link>, msg: &mut Vec<u8>, wire: &mut Vec<u8>) {
        let probe = super::links::lock(&link.prober).poll_probe(Instant::now());
        if let Some((id, size)) = probe {
            self.send_probe(link, id, size, msg, wire);
        }
    }

    /// Sends path MTU probe `id`: one datagram of exactly `size` bytes, with DF like every
    /// sleeve datagram.
    fn send_probe(&self, link: &Arc<Link>, id: u32, size: usize, msg: &mut Vec<u8>, wire: &mut Vec<u8>) {
        let size16 = u16::try_from(size).unwrap_or(u16::MAX);
        weft_proto::sleeve::MessageBuilder::probe(msg, link.encrypted, id, size16);
        // Refused as too big: the kernel learned a smaller path since the ceiling was set.
        self.seal_and_send_at(link, msg, wire, size, false);
    }

    /// The peer acknowledged probe `id` of `size` bytes: the link's datagrams follow what
    /// probing found, and the next probe of a search goes at once.
    pub fn probe_acked(&self, link: &Arc<Link>, id: u32, size: usize) {
        let limit = {
            let mut p = super::links::lock(&link.prober);
            p.on_ack(id, size, Instant::now());
            p.limit()
        };
        self.use_datagram(link, limit, "a path MTU probe got through");
        self.probe_if_due(link, &mut Vec::new(), &mut Vec::new());
    }

    fn use_datagram(&self, link: &Link, fits: usize, why: &'static str) {
        if let Some(was) = link.set_max_datagram(fits, self.udp.max_datagram()) {
            tracing::info!(peer = %link.peer, datagram = fits, was, why, "fitting the sleeve's datagrams to the path");
        }
    }

    /// Fits the link's datagrams to the path MTU the kernel knows towards `to` (its route's,
    /// or one an ICMP "fragmentation needed" / "packet too big" taught it), looked at once a
    /// second: smaller when the path shrinks, larger again (up to `--max-datagram`) once the
    /// kernel forgets a smaller MTU (its ICMP-learned entries expire after 10 minutes).
    /// A send refused as too big for the path (the kernel learned a smaller MTU since the last
    /// look) makes it look at once.
    ///
    /// The kernel's figure is the ceiling of the link's prober ([`weft_proto::pmtu`]), which
    /// may find that less gets through (a path that drops big packets without an ICMP).
    fn follow_path_mtu(&self, link: &Link, to: std::net::SocketAddr) {
        let Ok(mtu) = super::udp::path_mtu(to) else {
            link.set_max_datagram(link.max_datagram(self.udp.max_datagram()), self.udp.max_datagram());
            return;
        };
        let fits = super::udp::datagram_for_mtu(mtu, to).clamp(super::links::MIN_DATAGRAM, self.udp.max_datagram());
        let limit = {
            let mut p = super::links::lock(&link.prober);
            p.set_ceiling(fits);
            p.limit()
        };
        self.use_datagram(link, limit, "the kernel's path MTU changed");
    }
}
