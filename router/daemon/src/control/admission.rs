//! Who may start a handshake on the control port: a bound on handshakes in progress in all and
//! per source, and a token bucket per source for handshakes that fail. Pure (time comes in as
//! arguments, no I/O, no lock): the accept loop holds it behind a mutex and asks it before it
//! spends anything on a connection (no X25519, no buffer). See `docs/protocol.md`, "Limits".
//!
//! When all the slots are taken, a newcomer that is within its source's bounds takes the slot of
//! the oldest handshake in progress, which is closed. A real handshake takes milliseconds, so the
//! oldest is almost always a connection that stalls on purpose; refusing the newcomer instead
//! would let a few sources that hold their slots lock every real peer out for the whole
//! handshake time-out.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64). TCP's own
//! handshake has already proved the source address, so it cannot be spoofed here.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Instant;

/// The bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Handshakes in progress, from all sources.
    pub in_progress: usize,
    /// Handshakes in progress from one source.
    pub per_source: u32,
    /// Attempts a source may make at once before the rate applies; each attempt takes a token
    /// and a successful handshake gives it back, so only failures use the budget up.
    pub burst: f64,
    /// Tokens a source gets back per second.
    pub per_second: f64,
    /// Sources remembered; the one unused longest is forgotten first.
    pub sources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { in_progress: 64, per_source: 8, burst: 8.0, per_second: 1.0, sources: 4096 }
    }
}

/// Why a connection was closed before its handshake was over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// All the slots were taken and this was the oldest handshake in progress: a newcomer took
    /// its slot.
    Evicted,
    /// Too many handshakes in progress from this source.
    SourceBusy,
    /// This source failed too many handshakes lately.
    RateLimited,
}

impl Refusal {
    /// Label for metrics, one of `stats::REFUSAL_LABELS`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Evicted => "evicted",
            Refusal::SourceBusy => "source_busy",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

/// A handshake in progress, as the gate knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What the gate answers for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead; call [`Gate::finish`] with the ticket when the handshake is over. When
    /// `evicted` is set, that handshake lost its slot to this one: close it (it is already no
    /// longer counted).
    Admit {
        /// This handshake.
        ticket: Ticket,
        /// The oldest handshake in progress, when the slots were all taken.
        evicted: Option<Ticket>,
    },
    /// Close it at once. `first` is true for the first refusal of a run of them from this
    /// source (log that one, count all).
    Refuse {
        /// Why.
        why: Refusal,
        /// The first of a run.
        first: bool,
    },
}

/// The key a source is counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An IPv4 address (also when it comes IPv4-mapped).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug)]
struct Entry {
    tokens: f64,
    refilled: Instant,
    in_progress: u32,
    /// The last answer was a refusal (the next one is not the first of its run).
    refusing: bool,
    /// Position in the use order.
    stamp: u64,
}

/// The admission state.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    /// Handshakes in progress, oldest first (tickets count up).
    in_progress: BTreeMap<Ticket, Source>,
    next_ticket: u64,
    sources: HashMap<Source, Entry>,
    /// Use order: stamp -> source; the smallest stamp was used longest ago.
    order: BTreeMap<u64, Source>,
    next_stamp: u64,
}

impl Gate {
    /// An empty gate.
    pub fn new(limits: Limits) -> Self {
        Gate { limits, in_progress: BTreeMap::new(), next_ticket: 0, sources: HashMap::new(), order: BTreeMap::new(), next_stamp: 0 }
    }

    /// The bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Asks whether a connection from `ip` may start a handshake at `now`; on `Admit` it is
    /// counted in progress until [`Gate::finish`] (or until it is evicted).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let key = Source::from(ip);
        if !self.sources.contains_key(&key) {
            self.make_room();
            let stamp = self.stamp();
            self.sources.insert(key, Entry { tokens: self.limits.burst, refilled: now, in_progress: 0, refusing: false, stamp });
            self.order.insert(stamp, key);
        }
        let stamp = self.stamp();
        let limits = self.limits;
        let Some(e) = self.sources.get_mut(&key) else {
            // Just inserted; only a zero-sized map could have lost it.
            return Verdict::Refuse { why: Refusal::SourceBusy, first: false };
        };
        self.order.remove(&e.stamp);
        e.stamp = stamp;
        self.order.insert(stamp, key);
        let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
        e.tokens = (e.tokens + elapsed * limits.per_second).min(limits.burst);
        e.refilled = now;
        let why = if e.tokens < 1.0 {
            Some(Refusal::RateLimited)
        } else if e.in_progress >= limits.per_source {
            Some(Refusal::SourceBusy)
        } else {
            None
        };
        if let Some(why) = why {
            let first = !e.refusing;
            e.refusing = true;
            return Verdict::Refuse { why, first };
        }
        e.refusing = false;
        e.tokens -= 1.0;
        e.in_progress += 1;
        let evicted = if self.in_progress.len() >= limits.in_progress.max(1) {
            self.in_progress.pop_first().map(|(old, src)| {
                if let Some(o) = self.sources.get_mut(&src) {
                    o.in_progress = o.in_progress.saturating_sub(1);
                }
                old
            })
        } else {
            None
        };
        self.next_ticket += 1;
        let ticket = Ticket(self.next_ticket);
        self.in_progress.insert(ticket, key);
        Verdict::Admit { ticket, evicted }
    }

    /// A handshake admitted with `ticket` is over; `ok` gives its source's token back. A
    /// ticket that was evicted, or finished already, changes nothing.
    pub fn finish(&mut self, ticket: Ticket, ok: bool) {
        let Some(key) = self.in_progress.remove(&ticket) else { return };
        // The entry of a source in progress is never forgotten (see make_room).
        if let Some(e) = self.sources.get_mut(&key) {
            e.in_progress = e.in_progress.saturating_sub(1);
            if ok {
                e.tokens = (e.tokens + 1.0).min(self.limits.burst);
            }
        }
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Forgets the source unused longest (not one with a handshake in progress) when the map
    /// is full. At most `in_progress` entries are skipped, so this stays cheap.
    fn make_room(&mut self) {
        if self.sources.len() < self.limits.sources.max(1) {
            return;
        }
        let victim = self.order.iter().find(|(_, k)| self.sources.get(k).is_some_and(|e| e.in_progress == 0)).map(|(s, k)| (*s, *k));
        if let Some((stamp, key)) = victim {
            self.order.remove(&stamp);
            self.sources.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn admitted(v: Verdict) -> Ticket {
        match v {
            Verdict::Admit { ticket, .. } => ticket,
            Verdict::Refuse { why, .. } => panic!("refused: {why:?}"),
        }
    }

    fn refused(v: Verdict) -> Option<Refusal> {
        match v {
            Verdict::Admit { .. } => None,
            Verdict::Refuse { why, .. } => Some(why),
        }
    }

    #[test]
    fn failures_use_the_budget_up_then_one_per_second() {
        let limits = Limits { burst: 3.0, per_second: 1.0, ..Limits::default() };
        let mut g = Gate::new(limits);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            let t = admitted(g.admit(a, t0));
            g.finish(t, false);
        }
        assert_eq!(g.admit(a, t0), Verdict::Refuse { why: Refusal::RateLimited, first: true });
        assert_eq!(g.admit(a, t0), Verdict::Refuse { why: Refusal::RateLimited, first: false });
        // Half a second gives half a token: still refused.
        assert_eq!(refused(g.admit(a, t0 + Duration::from_millis(500))), Some(Refusal::RateLimited));
        // A second gives one attempt, and only one.
        let t1 = t0 + Duration::from_millis(1000);
        let t = admitted(g.admit(a, t1));
        g.finish(t, false);
        assert_eq!(refused(g.admit(a, t1)), Some(Refusal::RateLimited));
        // Over a minute of hammering every 10 ms, the attempts admitted stay at the rate.
        let mut n = 0;
        for ms in (1000..61_000).step_by(10) {
            if let Verdict::Admit { ticket, .. } = g.admit(a, t0 + Duration::from_millis(ms)) {
                n += 1;
                g.finish(ticket, false);
            }
        }
        assert!((59..=61).contains(&n), "{n} admitted in 60 s at 1/s");
        // Another source is not affected.
        admitted(g.admit(ip("192.0.2.2"), t1));
    }

    #[test]
    fn successes_give_their_token_back() {
        let mut g = Gate::new(Limits { burst: 2.0, ..Limits::default() });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..100 {
            let t = admitted(g.admit(a, t0));
            g.finish(t, true);
        }
        assert_eq!(g.in_progress(), 0);
    }

    #[test]
    fn handshakes_in_progress_are_bounded_per_source() {
        let mut g = Gate::new(Limits { per_source: 2, burst: 100.0, ..Limits::default() });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let t1 = admitted(g.admit(a, t0));
        admitted(g.admit(a, t0));
        assert_eq!(g.admit(a, t0), Verdict::Refuse { why: Refusal::SourceBusy, first: true });
        g.finish(t1, false);
        admitted(g.admit(a, t0));
        assert_eq!(g.in_progress(), 2);
    }

    #[test]
    fn when_the_slots_are_full_the_oldest_handshake_makes_room() {
        let mut g = Gate::new(Limits { in_progress: 3, per_source: 2, burst: 100.0, ..Limits::default() });
        let t0 = Instant::now();
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let a1 = admitted(g.admit(a, t0));
        let a2 = admitted(g.admit(a, t0));
        let b1 = admitted(g.admit(b, t0));
        assert_eq!(g.admit(c, t0), Verdict::Admit { ticket: Ticket(4), evicted: Some(a1) });
        assert_eq!(g.in_progress(), 3);
        // a lost a slot, so it may start one more.
        let a3 = match g.admit(a, t0) {
            Verdict::Admit { ticket, evicted } => {
                assert_eq!(evicted, Some(a2));
                ticket
            }
            v => panic!("{v:?}"),
        };
        // Finishing an evicted ticket changes nothing.
        g.finish(a1, true);
        g.finish(a2, false);
        assert_eq!(g.in_progress(), 3);
        for t in [b1, a3, Ticket(4)] {
            g.finish(t, true);
        }
        assert_eq!(g.in_progress(), 0);
        g.finish(b1, true);
        assert_eq!(g.in_progress(), 0);
    }

    #[test]
    fn the_map_of_sources_is_bounded_and_keeps_those_in_progress() {
        let mut g = Gate::new(Limits { sources: 4, burst: 1.0, per_second: 0.001, ..Limits::default() });
        let t0 = Instant::now();
        let busy = admitted(g.admit(ip("192.0.2.1"), t0));
        let spent = ip("192.0.2.2");
        let t = admitted(g.admit(spent, t0));
        g.finish(t, false);
        assert_eq!(refused(g.admit(spent, t0)), Some(Refusal::RateLimited));
        for i in 0..100u8 {
            let t = admitted(g.admit(IpAddr::from([198, 51, 100, i]), t0));
            g.finish(t, true);
            assert!(g.sources() <= 4, "{} sources remembered", g.sources());
        }
        // The one in progress was kept: finishing it is counted.
        assert_eq!(g.in_progress(), 1);
        g.finish(busy, true);
        assert_eq!(g.in_progress(), 0);
        // The spent source, unused longest, was forgotten (the bound costs that; the docs say so).
        admitted(g.admit(spent, t0));
    }

    #[test]
    fn every_refusal_has_a_counter() {
        for r in [Refusal::Evicted, Refusal::SourceBusy, Refusal::RateLimited] {
            assert!(super::super::stats::REFUSAL_LABELS.contains(&r.label()), "{r:?}");
        }
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        assert_eq!(Source::from(ip("2001:db8::1")), Source::from(ip("2001:db8::ffff:1")));
        assert_ne!(Source::from(ip("2001:db8::1")), Source::from(ip("2001:db8:0:1::1")));
        assert_eq!(Source::from(ip("::ffff:192.0.2.1")), Source::from(ip("192.0.2.1")));
        assert_ne!(Source::from(ip("192.0.2.1")), Source::from(ip("192.0.2.2")));
        assert_ne!(Source::from(ip("::1")), Source::from(ip("0.0.0.1")));
        let mut g = Gate::new(Limits { per_source: 1, ..Limits::default() });
        let t0 = Instant::now();
        admitted(g.admit(ip("2001:db8::1"), t0));
        assert_eq!(refused(g.admit(ip("2001:db8::2"), t0)), Some(Refusal::SourceBusy));
    }
}
