//! Keeping the sleeve's receive queue short: CoDel (RFC 8289) over how long datagrams waited in
//! the kernel's socket queue before the router took them, and ECN marking of the frames it picks.
//!
//! When the router's receive side is the slowest stage of a path (its CPU is busy), a bulk TCP
//! flow fills the socket's receive buffer (megabytes: milliseconds) and every other frame of
//! every peer waits behind it. TCP only shrinks its window on a loss or a congestion mark, so
//! the router gives it one as a router queue would: once datagrams have waited longer than
//! [`TARGET`] for a whole [`INTERVAL`], the next bulk frame is marked Congestion Experienced
//! (when its IP header says the flow understands ECN) or dropped, and more often the longer the
//! queue stays (CoDel's control law). Frames shorter than [`BULK_FRAME`] (pings, TCP ACKs, DNS,
//! interactive traffic) are never picked: they did not build the queue.
//!
//! No I/O and no clock of its own: the caller gives the time and each datagram's wait.

use std::time::{Duration, Instant};

use crate::vnet::{be16, ETH_IPV4, ETH_IPV6, ETH_VLAN};

/// The queueing delay CoDel lets stand: above it for a whole interval, it starts acting.
pub const TARGET: Duration = Duration::from_micros(500);
/// How long the delay must stay above [`TARGET`] before the first mark, and the base of the
/// spacing of the next ones (a LAN's round trip is well under it, a WAN's within an order).
pub const INTERVAL: Duration = Duration::from_millis(10);
/// Frames shorter than this are never marked or dropped.
pub const BULK_FRAME: usize = 1024;

/// CoDel's state for one queue (RFC 8289 §5, without the queue-length test: the router cannot
/// see how much more is queued).
#[derive(Debug, Clone)]
pub struct Codel {
    target: Duration,
    interval: Duration,
    /// When the delay has been above target for an interval (set when it first went above).
    first_above: Option<Instant>,
    dropping: bool,
    drop_next: Option<Instant>,
    count: u32,
    last_count: u32,
}

impl Default for Codel {
    fn default() -> Self {
        Codel::new(TARGET, INTERVAL)
    }
}

impl Codel {
    /// With the given target delay and interval.
    pub fn new(target: Duration, interval: Duration) -> Self {
        Codel { target, interval, first_above: None, dropping: false, drop_next: None, count: 0, last_count: 0 }
    }

    /// A bulk frame that waited `sojourn` is taken from the queue at `now`: whether to signal
    /// congestion on it (mark or drop).
    pub fn signal(&mut self, now: Instant, sojourn: Duration) -> bool {
        let ok_to_drop = self.above_for_an_interval(now, sojourn);
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            match self.drop_next {
                Some(t) if now >= t => {
                    self.count = self.count.saturating_add(1);
                    self.drop_next = Some(self.control_law(t));
                    true
                }
                _ => false,
            }
        } else if ok_to_drop {
            self.dropping = true;
            // Back soon after the last dropping state: start near where it ended.
            let delta = self.count.saturating_sub(self.last_count);
            let recent = self.drop_next.is_some_and(|t| now.saturating_duration_since(t) < self.interval * 16);
            self.count = if delta > 1 && recent { delta } else { 1 };
            self.last_count = self.count;
            self.drop_next = Some(self.control_law(now));
            true
        } else {
            false
        }
    }

    /// A frame that is never signalled (shorter than [`BULK_FRAME`]) waited `sojourn`: it still
    /// tells whether the queue stands, so a queue that drained while only small frames came
    /// does not count as standing when bulk frames come back.
    pub fn observe(&mut self, now: Instant, sojourn: Duration) {
        if !self.above_for_an_interval(now, sojourn) {
            self.dropping = false;
        }
    }

    /// Whether it is signalling now (in CoDel's dropping state).
    pub fn dropping(&self) -> bool {
        self.dropping
    }

    fn above_for_an_interval(&mut self, now: Instant, sojourn: Duration) -> bool {
        if sojourn < self.target {
            self.first_above = None;
            return false;
        }
        match self.first_above {
            None => {
                self.first_above = Some(now + self.interval);
                false
            }
            Some(t) => now >= t,
        }
    }

    /// The next signal: `interval / sqrt(count)` after `t`.
    fn control_law(&self, t: Instant) -> Instant {
        let n = f64::from(self.count.max(1)).sqrt();
        t + self.interval.div_f64(n)
    }
}

/// What [`congestion_mark`] did to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The frame's IP header said ECN-capable (ECT(0) or ECT(1)): it now says Congestion
    /// Experienced (and an IPv4 header's checksum was updated).
    Marked,
    /// Already marked Congestion Experienced by someone before.
    AlreadyMarked,
    /// Not an ECN-capable IP packet: it must be dropped to signal congestion.
    NotEcnCapable,
}

const ETH_HEADER: usize = 14;
const ECN_MASK: u8 = 0b11;
const ECN_CE: u8 = 0b11;

/// Sets Congestion Experienced on an Ethernet frame's IPv4 or IPv6 header (behind at most one
/// VLAN tag) if it is ECN-capable (RFC 3168 §5). One header is all there is to change in a
/// TSO/GSO super-frame too: the kernel copies it into every segment it cuts.
pub fn congestion_mark(frame: &mut [u8]) -> Mark {
    let Some(mut ethertype) = be16(frame, 12) else { return Mark::NotEcnCapable };
    let mut at = ETH_HEADER;
    if ethertype == ETH_VLAN {
        let Some(inner) = be16(frame, 16) else { return Mark::NotEcnCapable };
        ethertype = inner;
        at += 4;
    }
    match ethertype {
        ETH_IPV4 => {
            let Some(ip) = frame.get_mut(at..at + 20) else { return Mark::NotEcnCapable };
            if ip[0] >> 4 != 4 {
                return Mark::NotEcnCapable;
            }
            match ip[1] & ECN_MASK {
                0 => Mark::NotEcnCapable,
                ECN_CE => Mark::AlreadyMarked,
                _ => {
                    let old = u16::from_be_bytes([ip[0], ip[1]]);
                    ip[1] |= ECN_CE;
                    let new = u16::from_be_bytes([ip[0], ip[1]]);
                    let sum = u16::from_be_bytes([ip[10], ip[11]]);
                    ip[10..12].copy_from_slice(&checksum_update(sum, old, new).to_be_bytes());
                    Mark::Marked
                }
            }
        }
        ETH_IPV6 => {
            // Traffic class: the low 4 bits of byte 0 and the high 4 of byte 1; ECN is its low 2.
            let Some(ip) = frame.get_mut(at..at + 40) else { return Mark::NotEcnCapable };
            if ip[0] >> 4 != 6 {
                return Mark::NotEcnCapable;
            }
            match (ip[1] >> 4) & ECN_MASK {
                0 => Mark::NotEcnCapable,
                ECN_CE => Mark::AlreadyMarked,
                _ => {
                    ip[1] |= ECN_CE << 4;
                    Mark::Marked
                }
            }
        }
        _ => Mark::NotEcnCapable,
    }
}

/// The one's-complement checksum `sum` after a 16-bit word of the data went from `old` to
/// `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
fn checksum_update(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_short_burst_is_left_alone_and_a_standing_queue_is_signalled() {
        let t0 = Instant::now();
        let mut c = Codel::default();
        // A burst: 5 ms above target, then drained.
        for i in 0..5 {
            assert!(!c.signal(t0 + ms(i), ms(2)));
        }
        assert!(!c.signal(t0 + ms(6), Duration::from_micros(100)));
        // A standing queue: nothing for the first interval, then a signal.
        let start = t0 + ms(20);
        let mut first = None;
        for i in 0..40 {
            let now = start + ms(i);
            if c.signal(now, ms(2)) {
                first = Some(i);
                break;
            }
        }
        assert_eq!(first, Some(10), "the first signal comes one interval after the delay stood above target");
        assert!(c.dropping());
    }

    #[test]
    fn signals_come_faster_while_the_queue_stays_and_stop_when_it_drains() {
        let t0 = Instant::now();
        let mut c = Codel::default();
        let mut at = Vec::new();
        // 1 frame per 100 µs with 2 ms of delay for 200 ms.
        for i in 0..2000u64 {
            let now = t0 + Duration::from_micros(100 * i);
            if c.signal(now, ms(2)) {
                at.push(now.duration_since(t0));
            }
        }
        assert!(at.len() >= 10, "{at:?}");
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // interval/sqrt(n): each gap no longer than the one before (within one frame's spacing).
        for w in gaps.windows(2) {
            assert!(w[1] <= w[0] + Duration::from_micros(100), "{gaps:?}");
        }
        assert!(gaps[gaps.len() - 1] < gaps[0] / 2, "{gaps:?}");
        // Drained: no more signals, and out of the dropping state.
        let later = t0 + ms(201);
        assert!(!c.signal(later, Duration::from_micros(50)));
        assert!(!c.dropping());
        for i in 0..5 {
            assert!(!c.signal(later + ms(i), Duration::from_micros(50)));
        }
    }

    #[test]
    fn small_frames_in_a_drained_queue_reset_the_clock() {
        let t0 = Instant::now();
        let mut c = Codel::default();
        // Bulk frames above target for most of an interval, then only small frames, the queue
        // drained; bulk again above target: a new interval starts, no signal at once.
        for i in 0..8 {
            assert!(!c.signal(t0 + ms(i), ms(2)));
        }
        c.observe(t0 + ms(9), Duration::from_micros(20));
        assert!(!c.signal(t0 + ms(30), ms(2)), "the old interval was not forgotten");
        assert!(!c.signal(t0 + ms(35), ms(2)));
        assert!(c.signal(t0 + ms(41), ms(2)), "a new interval above target signals");
        // Small frames seeing a standing queue keep the state; seeing it drained end it.
        c.observe(t0 + ms(42), ms(2));
        assert!(c.dropping());
        c.observe(t0 + ms(43), Duration::from_micros(20));
        assert!(!c.dropping());
    }

    fn ipv4_frame(tos: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[1] = tos;
        ip[2..4].copy_from_slice(&28u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let sum = ipv4_checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f
    }

    fn ipv4_checksum(h: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                s += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn ecn_capable_ipv4_is_marked_with_a_correct_checksum() {
        for (tos, want) in [(0x02u8, Mark::Marked), (0xb9, Mark::Marked), (0x03, Mark::AlreadyMarked), (0x00, Mark::NotEcnCapable), (0xb8, Mark::NotEcnCapable)] {
            let mut f = ipv4_frame(tos);
            assert_eq!(congestion_mark(&mut f), want, "tos {tos:#x}");
            let ip = &f[14..34];
            if want == Mark::Marked {
                assert_eq!(ip[1], tos | 3, "DSCP kept, ECN set to CE");
            } else {
                assert_eq!(ip[1], tos, "not changed");
            }
            assert_eq!(u16::from_be_bytes([ip[10], ip[11]]), ipv4_checksum(ip), "tos {tos:#x}: checksum");
        }
    }

    #[test]
    fn ecn_capable_ipv6_and_vlan_tagged_frames_are_marked() {
        let mut f = vec![0u8; 14 + 40];
        f[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
        f[14] = 0x6a; // version 6, traffic class high nibble 0xa
        f[15] = 0x10; // traffic class low nibble 0x1: ECN 01 (ECT(1))
        assert_eq!(congestion_mark(&mut f), Mark::Marked);
        assert_eq!((f[14], f[15]), (0x6a, 0x30), "traffic class 0xa3: DSCP kept, ECN CE");
        let mut v = ipv4_frame(0x02);
        v.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        assert_eq!(congestion_mark(&mut v), Mark::Marked);
        assert_eq!(v[19], 0x03);
    }

    #[test]
    fn anything_else_is_left_untouched() {
        for mut f in [vec![], vec![0u8; 13], {
            let mut a = vec![0u8; 60];
            a[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            a
        }, {
            // Says IPv4 but too short for the header.
            let mut a = vec![0u8; 20];
            a[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
            a[14] = 0x45;
            a[15] = 0x02;
            a
        }, {
            // Says IPv4, carries version 6.
            let mut a = ipv4_frame(0x02);
            a[14] = 0x65;
            a
        }] {
            let before = f.clone();
            assert_eq!(congestion_mark(&mut f), Mark::NotEcnCapable);
            assert_eq!(f, before);
        }
    }
}
