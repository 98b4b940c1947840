//! Path MTU probing for the sleeve, in the spirit of RFC 8899 (DPLPMTUD): the sender finds the
//! largest datagram that really crosses the path by sending probes of a chosen size (one sealed
//! fragment, padded, sent with DF) that the peer acknowledges. It needs no ICMP, so it finds
//! paths that drop big packets without a word (ICMP filtered: a "black hole"), which the
//! kernel's path MTU never learns.
//!
//! One [`Prober`] per link, driven by the shell with the time: [`Prober::poll_probe`] says
//! what to send and when, [`Prober::on_ack`] takes the peer's acknowledgements, and
//! [`Prober::limit`] is the largest datagram to use. The kernel's figure (its route's MTU, or
//! one an ICMP taught it) is the ceiling ([`Prober::set_ceiling`]): probing never goes above
//! it, and it is trusted (used at once) until a probe of it is lost [`MAX_PROBES`] times while
//! smaller ones get through. Then the prober searches between the base size and the ceiling,
//! using only what was confirmed meanwhile, and looks at the ceiling again every
//! [`RAISE_AFTER`] and whenever the kernel's figure changes.

use std::time::{Duration, Instant};

/// The size probed first (and never gone below by probing): a datagram of 1200 bytes crosses
/// every path that carries IPv6 (1280) and nearly every IPv4 one (QUIC's base, RFC 9000 §14).
pub const BASE: usize = 1200;
/// A probe not acknowledged within this long is lost (RFC 8899 waits 15 s; a path's round
/// trip is far shorter, and a lost probe is tried [`MAX_PROBES`] times).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(750);
/// Probes of one size lost in a row before the size is taken as too big (RFC 8899's
/// MAX_PROBES).
pub const MAX_PROBES: u8 = 3;
/// After a search ends (or when the peer never answered), the ceiling is tried again after this
/// long (RFC 8899's PMTU_RAISE_TIMER).
pub const RAISE_AFTER: Duration = Duration::from_secs(600);
/// A search stops when it knows the path MTU to within this many bytes.
const CLOSE_ENOUGH: usize = 8;

/// Where the prober is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Confirming that the peer answers probes at all, at the base size.
    Base,
    /// Confirming the ceiling (the kernel's figure), which is used meanwhile.
    Validate,
    /// The ceiling did not get through: searching between what got through (`lo`, in use)
    /// and what did not (`hi`).
    Search {
        /// Largest size acknowledged.
        lo: usize,
        /// Smallest size lost.
        hi: usize,
    },
    /// The path's size is known (`limit`); looked at again at `until`.
    Done {
        /// When to probe the ceiling again.
        until: Instant,
    },
    /// The peer did not answer even base-size probes (an older router, or a dead path): the
    /// kernel's figure is used as it is; tried again at `until`.
    Unanswered {
        /// When to try again.
        until: Instant,
    },
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Prober {
    ceiling: usize,
    phase: Phase,
    /// Largest size acknowledged since the last ceiling change.
    confirmed: Option<usize>,
    /// The size currently in use.
    limit: usize,
    /// The probe in flight: id, size, when it went out.
    outstanding: Option<(u32, usize, Instant)>,
    /// Probes of the current size lost in a row.
    lost: u8,
    next_id: u32,
    /// The ceiling was found too big by probing (a black hole), since the last ceiling change.
    black_hole: bool,
}

impl Prober {
    /// A prober for a path whose kernel figure is `ceiling` (the largest datagram to send).
    pub fn new(ceiling: usize) -> Self {
        Prober { ceiling, phase: Phase::Base, confirmed: None, limit: ceiling, outstanding: None, lost: 0, next_id: 1, black_hole: false }
    }

    /// The largest datagram to send now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Where it is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether probing found the kernel's figure too big (packets of that size vanish).
    pub fn black_hole(&self) -> bool {
        self.black_hole
    }

    /// The kernel's figure changed (or was read again): the ceiling. A new one is validated
    /// afresh (used meanwhile); the same one changes nothing.
    pub fn set_ceiling(&mut self, ceiling: usize) {
        if ceiling == self.ceiling {
            return;
        }
        self.ceiling = ceiling;
        self.black_hole = false;
        self.confirmed = self.confirmed.filter(|c| *c <= ceiling);
        self.limit = ceiling;
        self.outstanding = None;
        self.lost = 0;
        self.phase = match self.phase {
            Phase::Base | Phase::Unanswered { .. } => Phase::Base,
            _ => Phase::Validate,
        };
    }

    /// The probe to send now, if any: `(id, size)`. Call it about once a
    /// [`PROBE_TIMEOUT`]; a probe not acknowledged by the next call after its time-out counts
    /// as lost.
    pub fn poll_probe(&mut self, now: Instant) -> Option<(u32, usize)> {
        if let Some((_, size, sent)) = self.outstanding {
            if now.duration_since(sent) < PROBE_TIMEOUT {
                return None;
            }
            self.outstanding = None;
            self.lost(size, now);
        }
        let size = match self.phase {
            Phase::Base => BASE.min(self.ceiling),
            Phase::Validate => self.ceiling,
            Phase::Search { lo, hi } => (lo + (hi - lo) / 2) & !3,
            Phase::Done { until } | Phase::Unanswered { until } => {
                if now < until {
                    return None;
                }
                self.lost = 0;
                self.phase = if matches!(self.phase, Phase::Unanswered { .. }) { Phase::Base } else { Phase::Validate };
                return self.poll_probe(now);
            }
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.outstanding = Some((id, size, now));
        Some((id, size))
    }

    /// The peer acknowledged probe `id` of `size` bytes. Acknowledgements of other probes
    /// (late, duplicated, made up) change nothing.
    pub fn on_ack(&mut self, id: u32, size: usize, now: Instant) {
        match self.outstanding {
            Some((want, s, _)) if want == id && s == size => {}
            _ => return,
        }
        self.outstanding = None;
        self.lost = 0;
        self.confirmed = Some(self.confirmed.map_or(size, |c| c.max(size)));
        self.phase = match self.phase {
            Phase::Base if size >= self.ceiling => self.done(size, now),
            Phase::Base => Phase::Validate,
            Phase::Validate => self.done(size, now),
            Phase::Search { hi, .. } => {
                self.limit = size;
                if hi - size <= CLOSE_ENOUGH {
                    self.done(size, now)
                } else {
                    Phase::Search { lo: size, hi }
                }
            }
            p => p,
        };
    }

    fn done(&mut self, size: usize, now: Instant) -> Phase {
        self.limit = size;
        Phase::Done { until: now + RAISE_AFTER }
    }

    fn lost(&mut self, size: usize, now: Instant) {
        self.lost += 1;
        if self.lost < MAX_PROBES {
            return;
        }
        self.lost = 0;
        self.phase = match self.phase {
            // Not even the base size: an older peer, or no path at all. Leave the kernel's
            // figure alone.
            Phase::Base => Phase::Unanswered { until: now + RAISE_AFTER },
            Phase::Validate => {
                // The ceiling does not get through: use what did, and search.
                self.black_hole = true;
                let lo = self.confirmed.unwrap_or(BASE.min(self.ceiling));
                self.limit = lo;
                if size - lo <= CLOSE_ENOUGH {
                    Phase::Done { until: now + RAISE_AFTER }
                } else {
                    Phase::Search { lo, hi: size }
                }
            }
            Phase::Search { lo, .. } => {
                if size - lo <= CLOSE_ENOUGH {
                    Phase::Done { until: now + RAISE_AFTER }
                } else {
                    Phase::Search { lo, hi: size }
                }
            }
            p => p,
        };
    }

    /// For status: what it is doing, in words.
    pub fn describe(&self) -> String {
        match self.phase {
            Phase::Base => format!("probing: checking the peer answers at {} bytes", BASE.min(self.ceiling)),
            Phase::Validate => format!("probing: confirming {} bytes", self.ceiling),
            Phase::Search { lo, hi } => format!("probing: {hi} bytes vanish without an ICMP (black hole), {lo} get through; searching between"),
            Phase::Done { .. } if self.black_hole => {
                format!("confirmed {} bytes by probing ({} vanish without an ICMP: a black hole)", self.limit, self.ceiling)
            }
            Phase::Done { .. } => format!("confirmed {} bytes by probing", self.limit),
            Phase::Unanswered { .. } => "the peer does not answer probes: using the kernel's path MTU".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives `p` against a path that carries datagrams of up to `path` bytes, the peer
    /// answering each probe that gets through at once; returns the time it took to settle.
    fn settle(p: &mut Prober, path: usize, t0: Instant) -> Duration {
        let mut now = t0;
        for _ in 0..200 {
            if let Some((id, size)) = p.poll_probe(now) {
                if size <= path {
                    p.on_ack(id, size, now + Duration::from_millis(20));
                }
            }
            if matches!(p.phase(), Phase::Done { .. } | Phase::Unanswered { .. }) {
                return now - t0;
            }
            now += PROBE_TIMEOUT;
        }
        panic!("did not settle: {p:?}");
    }

    #[test]
    fn a_path_that_takes_the_kernel_figure_is_confirmed_and_used_from_the_start() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        assert_eq!(p.limit(), 1472, "used before it is confirmed");
        let took = settle(&mut p, 1472, t0);
        assert_eq!(p.limit(), 1472);
        assert!(!p.black_hole());
        assert!(took <= Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_black_hole_is_found_and_searched_to_within_a_few_bytes() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        let took = settle(&mut p, 1372, t0);
        assert!(p.black_hole());
        assert!(p.limit() <= 1372 && p.limit() + CLOSE_ENOUGH + 4 >= 1372, "{}", p.limit());
        assert!(took < Duration::from_secs(30), "{took:?}");
        assert!(p.describe().contains("black hole"), "{}", p.describe());
        // Ten minutes later the ceiling is tried again, and found to get through now.
        let later = t0 + took + RAISE_AFTER;
        settle(&mut p, 1472, later);
        assert_eq!(p.limit(), 1472);
    }

    #[test]
    fn while_searching_only_confirmed_sizes_are_used() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..40 {
            if let Some((id, size)) = p.poll_probe(now) {
                if size <= 1300 {
                    p.on_ack(id, size, now);
                }
            }
            if p.black_hole() {
                seen.push(p.limit());
            }
            now += PROBE_TIMEOUT;
        }
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|l| *l <= 1300), "{seen:?}");
    }

    #[test]
    fn a_peer_that_never_answers_leaves_the_kernel_figure_alone() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        settle(&mut p, 0, t0);
        assert!(matches!(p.phase(), Phase::Unanswered { .. }));
        assert_eq!(p.limit(), 1472);
        assert!(!p.black_hole());
    }

    #[test]
    fn acks_that_do_not_match_the_probe_in_flight_change_nothing() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        let (id, size) = p.poll_probe(t0).expect("a probe");
        p.on_ack(id + 1, size, t0);
        p.on_ack(id, size + 4, t0);
        assert_eq!(p.phase(), Phase::Base);
        p.on_ack(id, size, t0);
        assert_eq!(p.phase(), Phase::Validate);
        // A replayed ack of the base probe does not confirm the ceiling.
        p.on_ack(id, size, t0);
        assert_eq!(p.phase(), Phase::Validate);
    }

    #[test]
    fn a_new_kernel_figure_is_validated_afresh() {
        let t0 = Instant::now();
        let mut p = Prober::new(1472);
        settle(&mut p, 1472, t0);
        p.set_ceiling(1372);
        assert_eq!(p.limit(), 1372);
        assert_eq!(p.phase(), Phase::Validate);
        settle(&mut p, 1472, t0);
        assert_eq!(p.limit(), 1372);
    }
}
