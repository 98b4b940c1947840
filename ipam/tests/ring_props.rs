//! Property tests of the ring CRDT on rings built by random *valid histories*.
//!
//! A history starts from `Ring::from_seeds` over a range shared by a few
//! peers (some peers may start with an empty ring, as a peer waiting for the
//! ring would) and keeps one replica per peer. It then applies operations only
//! as the real system would:
//!
//! - a live peer gives part of a piece it owns (in its own replica) to another
//!   live peer (a donation);
//! - a live peer updates the free count of one of its own entries, within the
//!   entry's piece;
//! - one replica merges another's ring as its peer (`merge(other, me)`); a
//!   refused merge must leave the replica unchanged. A dead peer's replica is
//!   only probed on a scratch copy (it is dead: nothing it merges counts);
//! - a live peer takes over (rmpeer) another peer's entries, after having
//!   merged that peer's last ring (what the real remover has once it has heard
//!   everything the dead peer said); the removed peer is dead from then on.
//!
//! Checked after every step: every replica validates, its pieces cover the
//! range exactly (contiguous from the range's start to its end, no gaps, no
//! overlap), and the space each live peer believes it owns (in its own
//! replica) is disjoint from every other live peer's belief — the property the
//! allocator's no-duplicates promise rests on. Checked on every merge: a merge
//! never takes space away from `me`, and an accepted merge is the join.
//! Checked at the end: the join laws (commutative, associative, idempotent)
//! over the replicas and snapshots taken along the way, and that joining all
//! replicas gives a valid ring covering the whole range which every live peer
//! then accepts, after which all live replicas are equal.

use std::collections::BTreeSet;

use proptest::prelude::*;
use weft_ipam::{Cidr, Ring};
use weft_proto::identity::Claim;
use weft_proto::{Keys, PeerName, SigningKey, Trust};

/// One step of a history. Indices and amounts are raw numbers, interpreted
/// modulo whatever is there when the step runs (so every step is valid).
#[derive(Clone, Debug)]
enum Op {
    /// `peer` gives a part of one of its runs to `to`.
    Give { peer: u8, to: u8, run: u16, at: u32, len: u32 },
    /// `peer` sets the free count of one of its entries.
    SetFree { peer: u8, entry: u16, free: u32 },
    /// `into` merges `from`'s ring.
    Merge { into: u8, from: u8 },
    /// `by` takes over `from`'s entries (rmpeer).
    Transfer { by: u8, from: u8 },
    /// Keep a copy of every replica for the join laws.
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (any::<u8>(), any::<u8>(), any::<u16>(), any::<u32>(), any::<u32>())
            .prop_map(|(peer, to, run, at, len)| Op::Give { peer, to, run, at, len }),
        6 => (any::<u8>(), any::<u16>(), any::<u32>()).prop_map(|(peer, entry, free)| Op::SetFree { peer, entry, free }),
        20 => (any::<u8>(), any::<u8>()).prop_map(|(into, from)| Op::Merge { into, from }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(by, from)| Op::Transfer { by, from }),
        2 => Just(Op::Snapshot),
    ]
}

/// How a history starts.
#[derive(Clone, Debug)]
struct Start {
    /// Prefix length of the range (10.32.0.0/prefix).
    prefix: u8,
    /// Number of peers.
    peers: usize,
    /// Which peers are seeds (bit i: peer i); at least one is.
    seeds: u8,
    /// Whether non-seeds start with an empty ring (else the seeded one).
    empty_joiners: bool,
}

fn start() -> impl Strategy<Value = Start> {
    (prop_oneof![3 => Just(20u8), 1 => 24u8..=30], 2usize..=6, any::<u8>(), any::<bool>())
        .prop_map(|(prefix, peers, seeds, empty_joiners)| Start { prefix, peers, seeds, empty_joiners })
}

struct World {
    range: Cidr,
    names: Vec<PeerName>,
    replicas: Vec<Ring>,
    dead: Vec<bool>,
    snapshots: Vec<Ring>,
    /// Each peer's signing key, and every name bound to its key (the rings
    /// are signed as the allocator signs them, and every merge checks them).
    signing: Vec<SigningKey>,
    keys: Keys,
    merges: usize,
    refused: usize,
}

fn name(i: usize) -> PeerName {
    // Names not in index order, so seed order (by name) differs from index order.
    PeerName::from_u64(0x0200_0000_0000 | ((i as u64 * 7 + 3) % 11))
}

fn owned_total(r: &Ring, p: PeerName) -> u64 {
    r.owned(p).iter().map(|(s, e)| e - s).sum()
}

/// Whether every address of `inner` (runs) lies in `outer` (runs). Both sorted, joined.
fn runs_cover(outer: &[(u64, u64)], inner: &[(u64, u64)]) -> bool {
    inner.iter().all(|&(s, e)| outer.iter().any(|&(os, oe)| os <= s && e <= oe))
}

impl World {
    fn new(st: &Start) -> World {
        let range = Cidr::new(0x0a20_0000, st.prefix).expect("range");
        let names: Vec<PeerName> = (0..st.peers).map(name).collect();
        let mut seed_names: Vec<PeerName> =
            names.iter().enumerate().filter(|(i, _)| st.seeds & (1 << i) != 0).map(|(_, n)| *n).collect();
        if seed_names.is_empty() {
            seed_names.push(names[0]);
        }
        let seeded = Ring::from_seeds(range, &seed_names);
        let replicas = names
            .iter()
            .map(|n| if st.empty_joiners && !seed_names.contains(n) { Ring::empty(range) } else { seeded.clone() })
            .collect();
        let signing: Vec<SigningKey> = (0..st.peers)
            .map(|i| SigningKey::from_seed(&[i as u8 + 1; 32]).expect("key"))
            .collect();
        let mut keys = Keys::new(Trust::FirstUse);
        for (n, k) in names.iter().zip(&signing) {
            keys.admit(&Claim::self_signed(k, *n)).expect("admit");
        }
        World { range, names, replicas, dead: vec![false; st.peers], snapshots: Vec::new(), signing, keys, merges: 0, refused: 0 }
    }

    fn n(&self) -> usize {
        self.names.len()
    }

    fn live(&self) -> usize {
        self.dead.iter().filter(|d| !**d).count()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.n();
        match *op {
            Op::Give { peer, to, run, at, len } => {
                let (p, q) = (usize::from(peer) % n, usize::from(to) % n);
                if p == q || self.dead[p] || self.dead[q] {
                    return Ok(());
                }
                let (me, them) = (self.names[p], self.names[q]);
                let runs = self.replicas[p].owned(me);
                if runs.is_empty() {
                    return Ok(());
                }
                let (s, e) = runs[usize::from(run) % runs.len()];
                let start = s + u64::from(at) % (e - s);
                let end = start + 1 + u64::from(len) % (e - start);
                let before = self.replicas[p].clone();
                let owned_before = owned_total(&before, me);
                match self.replicas[p].give(&self.signing[p], me, them, start, end) {
                    Ok(()) => {}
                    // Rule 7: a piece that changed hands MAX_LINKS times is not given again.
                    Err(e) if e.contains("changed owner") => {
                        prop_assert_eq!(&self.replicas[p], &before, "a refused give changed the ring");
                        return Ok(());
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("give of our own {start}..{end} refused: {e}"))),
                }
                let r = &self.replicas[p];
                prop_assert_eq!(owned_total(r, me), owned_before - (end - start), "give moved the wrong amount");
                prop_assert_eq!(r.owner(start as u32), Some(them));
                prop_assert_eq!(r.owner((end - 1) as u32), Some(them));
                // Nothing outside [start, end) changed owner.
                for p in before.pieces() {
                    for a in [p.start, p.end - 1] {
                        if a < start || a >= end {
                            prop_assert_eq!(r.owner(a as u32), Some(p.entry.peer), "give changed the owner of {}", a);
                        }
                    }
                }
            }
            Op::SetFree { peer, entry, free } => {
                let p = usize::from(peer) % n;
                if self.dead[p] {
                    return Ok(());
                }
                let me = self.names[p];
                let mine: Vec<(u32, u64)> = self.replicas[p]
                    .pieces()
                    .filter(|x| x.entry.peer == me)
                    .map(|x| (x.entry.token, x.end - x.start))
                    .collect();
                if mine.is_empty() {
                    return Ok(());
                }
                let (token, size) = mine[usize::from(entry) % mine.len()];
                let f = (u64::from(free) % (size + 1)).min(u64::from(u32::MAX)) as u32;
                let before = self.replicas[p].clone();
                let changed = self.replicas[p].set_free(&self.signing[p], me, token, f);
                prop_assert_eq!(changed, self.replicas[p] != before);
                prop_assert_eq!(owned_total(&self.replicas[p], me), owned_total(&before, me));
            }
            Op::Merge { into, from } => {
                let (a, b) = (usize::from(into) % n, usize::from(from) % n);
                if a == b {
                    return Ok(());
                }
                let other = self.replicas[b].clone();
                let me = self.names[a];
                let mut target = self.replicas[a].clone();
                let before = target.clone();
                self.merges += 1;
                match target.merge(&other, me, &self.keys, &BTreeSet::new()) {
                    Err(e) => {
                        self.refused += 1;
                        prop_assert_eq!(&target, &before, "a refused merge ({}) changed the ring", e);
                        // The only refusals valid histories make: a removed
                        // peer's space, seen by that peer.
                        prop_assert!(self.dead[a], "live peer refused a merge of a valid history: {}", e);
                    }
                    Ok(changed) => {
                        prop_assert_eq!(changed, target != before);
                        let joined = Ring::join(&before, &other)
                            .map_err(|e| TestCaseError::fail(format!("merge accepted what join refuses: {e}")))?;
                        prop_assert_eq!(&target, &joined, "an accepted merge is not the join");
                        // (c) merge never takes space from `me`.
                        let (ob, oa) = (before.owned(me), target.owned(me));
                        prop_assert!(runs_cover(&oa, &ob), "merge took space from {}: {:?} -> {:?}", me, ob, oa);
                        prop_assert!(owned_total(&target, me) >= owned_total(&before, me));
                    }
                }
                if !self.dead[a] {
                    self.replicas[a] = target;
                }
            }
            Op::Transfer { by, from } => {
                let (a, b) = (usize::from(by) % n, usize::from(from) % n);
                if a == b || self.dead[a] || self.dead[b] || self.live() <= 2 {
                    return Ok(());
                }
                let (me, gone) = (self.names[a], self.names[b]);
                // The remover has heard everything the removed peer said.
                let last = self.replicas[b].clone();
                self.replicas[a]
                    .merge(&last, me, &self.keys, &BTreeSet::new())
                    .map_err(|e| TestCaseError::fail(format!("merge of a live peer's ring refused: {e}")))?;
                if self.replicas[a].is_empty() {
                    return Ok(());
                }
                let had = owned_total(&self.replicas[a], gone);
                let mine = owned_total(&self.replicas[a], me);
                let moved = self.replicas[a]
                    .take_over(&self.signing[a], me, gone)
                    .map_err(|e| TestCaseError::fail(format!("takeover refused: {e}")))?;
                prop_assert_eq!(moved, had);
                prop_assert_eq!(owned_total(&self.replicas[a], gone), 0);
                prop_assert_eq!(owned_total(&self.replicas[a], me), mine + moved);
                self.dead[b] = true;
                // Had the removed peer been alive, it would refuse the
                // takeover (when it believed it owned anything) and stay unchanged.
                if owned_total(&last, gone) > 0 {
                    let mut probe = last.clone();
                    let r = probe.merge(&self.replicas[a], gone, &self.keys, &BTreeSet::new());
                    prop_assert!(r.is_err(), "a removed peer accepted losing its space");
                    prop_assert_eq!(&probe, &last);
                }
            }
            Op::Snapshot => {
                if self.snapshots.len() < 12 {
                    self.snapshots.extend(self.replicas.iter().cloned());
                }
            }
        }
        Ok(())
    }

    /// (b): every replica valid and covering the range exactly; live peers'
    /// own views of their space disjoint.
    fn check(&self) -> Result<(), TestCaseError> {
        for (i, r) in self.replicas.iter().enumerate() {
            check_cover(r, self.range).map_err(|e| TestCaseError::fail(format!("replica {i}: {e}")))?;
        }
        let mut mine: Vec<(u64, u64, usize)> = Vec::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if !self.dead[i] {
                mine.extend(r.owned(self.names[i]).into_iter().map(|(s, e)| (s, e, i)));
            }
        }
        mine.sort();
        for w in mine.windows(2) {
            prop_assert!(
                w[0].1 <= w[1].0,
                "peers {} and {} both believe they own {}..{}",
                w[0].2,
                w[1].2,
                w[1].0,
                w[0].1.min(w[1].1)
            );
        }
        Ok(())
    }
}

/// A valid ring whose pieces run contiguously over the whole range and whose
/// shares add up to the range size (or an empty ring).
fn check_cover(r: &Ring, range: Cidr) -> Result<(), String> {
    r.validate()?;
    if r.range() != range {
        return Err(format!("range {} is not {range}", r.range()));
    }
    if r.is_empty() {
        return Ok(());
    }
    let mut at = u64::from(range.addr);
    for p in r.pieces() {
        if p.start != at {
            return Err(format!("piece starts at {} but the previous ended at {at}", p.start));
        }
        if p.end <= p.start {
            return Err(format!("empty or reversed piece {}..{}", p.start, p.end));
        }
        at = p.end;
    }
    if at != range.end() {
        return Err(format!("pieces end at {at}, not at the range end {}", range.end()));
    }
    let total: u64 = r.shares().values().map(|s| s.0).sum();
    if total != range.size() {
        return Err(format!("shares add up to {total}, not {}", range.size()));
    }
    Ok(())
}

fn join(a: &Ring, b: &Ring) -> Result<Ring, TestCaseError> {
    Ring::join(a, b).map_err(|e| TestCaseError::fail(format!("join of valid-history rings refused: {e}")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_histories_keep_the_ring_laws(st in start(), ops in prop::collection::vec(op(), 1..200)) {
        let mut w = World::new(&st);
        w.check()?;
        for op in &ops {
            w.apply(op)?;
            w.check()?;
        }

        // (a) join laws over the replicas and the snapshots.
        let mut rings: Vec<Ring> = w.replicas.clone();
        rings.extend(w.snapshots.iter().take(6).cloned());
        for a in &rings {
            prop_assert_eq!(&join(a, a)?, a, "join is not idempotent");
            for b in &rings {
                let ab = join(a, b)?;
                prop_assert_eq!(&ab, &join(b, a)?, "join is not commutative");
                check_cover(&ab, w.range).map_err(TestCaseError::fail)?;
                for c in rings.iter().take(8) {
                    prop_assert_eq!(join(&ab, c)?, join(a, &join(b, c)?)?, "join is not associative");
                }
            }
        }

        // Everything merged: one valid ring over the whole range, in which
        // every live peer still owns at least what it believes it owns.
        let mut all = Ring::empty(w.range);
        for r in &w.replicas {
            all = join(&all, r)?;
        }
        check_cover(&all, w.range).map_err(TestCaseError::fail)?;
        if !all.is_empty() {
            let total: u64 = all.shares().values().map(|s| s.0).sum();
            prop_assert_eq!(total, w.range.size());
        }
        for i in 0..w.n() {
            if w.dead[i] {
                continue;
            }
            let me = w.names[i];
            prop_assert!(runs_cover(&all.owned(me), &w.replicas[i].owned(me)), "the merged ring lost peer {}'s space", i);
            let mut r = w.replicas[i].clone();
            r.merge(&all, me, &w.keys, &BTreeSet::new()).map_err(|e| TestCaseError::fail(format!("live peer {i} refused the merged ring: {e}")))?;
            prop_assert_eq!(&r, &all, "peer {}'s replica did not converge", i);
        }
    }
}
