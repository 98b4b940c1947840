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
}

/// See [`Shared::learn_hook`].
pub type LearnHook = Box<dyn Fn(u32, Mac, PeerName) + Send + Sync>;

impl Shared {
    /// Seals and sends one message on `link`, using `wire` as scratch space.
    pub fn seal_and_send(&self, link: &Arc<Link>, msg: &mut Vec<u8>, wire: &mut Vec<u8>) {
        let seg = super::links::lock(&link.sealer).seal(msg, self.udp.max_datagram(), wire);
        self.udp.send_all(link.dest(), wire, seg, &self.stats);
    }
}
