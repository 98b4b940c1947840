//! The ring: one address range cut into pieces, each owned by a peer.
//!
//! The ring is a sorted list of *tokens*. Each entry owns the addresses from
//! its token up to the next token (the last one up to the end of the range),
//! and carries its owner, a version and the owner's count of free addresses
//! in it. The first token is always the range's first address.
//!
//! Only the owner of a piece changes it: to split it (a new token inside its
//! own space), to give part of it away, or to update its free count; each
//! change bumps the entry's version. `weft rmpeer` is the one exception: it
//! takes over a dead peer's entries, again with a bumped version.
//!
//! Merging two rings is a join: the union of their tokens, and for a token in
//! both, the entry with the higher version. Tokens are never removed. So
//! [`Ring::join`] is commutative, associative and idempotent (the property
//! tests check this on rings built by random histories). Two rings that were
//! started from different seeds, or over different ranges, never merge;
//! neither do two entries with the same token and version but different
//! contents (only possible when two peers both believe they own a piece, as
//! after an `rmpeer` of a peer that was still alive). [`Ring::merge`] adds the
//! local rule: a peer never accepts a merge that takes space away from it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use weft_proto::PeerName;

use crate::addr::{ip, Cidr};

/// Most entries a ring may have (a bound on what a peer accepts).
pub const MAX_ENTRIES: usize = 1 << 16;

/// One piece of the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// First address of the piece.
    pub token: u32,
    /// Its owner.
    pub peer: PeerName,
    /// Bumped on every change.
    pub version: u32,
    /// Free addresses in the piece, as its owner last said.
    pub free: u32,
}

/// The ring. See the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    range: Cidr,
    seeds: Vec<PeerName>,
    entries: Vec<Entry>,
}

/// Why two rings do not merge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peers were configured with different ranges.
    #[error("the peer's ring covers {theirs} but ours covers {ours}: every peer must use the same --ipalloc-range")]
    DifferentRange {
        /// Ours.
        ours: Cidr,
        /// Theirs.
        theirs: Cidr,
    },
    /// The rings were started separately.
    #[error("the peer's ring was started by seeds {theirs} but ours by {ours}: these are two separate meshes, which cannot share one range (reset one of them with `weft reset`)")]
    DifferentSeeds {
        /// Ours.
        ours: Names,
        /// Theirs.
        theirs: Names,
    },
    /// The payload breaks the ring's rules.
    #[error("invalid ring: {0}")]
    Invalid(String),
    /// Two different entries claim the same version of one token.
    #[error("inconsistent entries for {token}: ours is owned by {ours} and theirs by {theirs}, both at version {version} (was a live peer removed with rmpeer?)")]
    Inconsistent {
        /// The token's address.
        token: std::net::Ipv4Addr,
        /// Our entry's owner.
        ours: PeerName,
        /// Theirs.
        theirs: PeerName,
        /// The version both have.
        version: u32,
    },
    /// The merge would give away space we own.
    #[error("the peer's ring gives {start}..{end}, which this peer owns, to {to}: refused (was this peer removed with rmpeer while it was alive?)")]
    LostSpace {
        /// First address of the lost piece.
        start: std::net::Ipv4Addr,
        /// Last address of the lost piece.
        end: std::net::Ipv4Addr,
        /// Who the peer's ring says owns it.
        to: PeerName,
    },
}

/// A list of peer names, written comma-separated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names(pub Vec<PeerName>);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

/// A piece of the ring: `[start, end)` and its entry.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// The entry that owns it.
    pub entry: &'a Entry,
}

impl Ring {
    /// A ring that nobody has started yet.
    pub fn empty(range: Cidr) -> Ring {
        Ring { range, seeds: Vec::new(), entries: Vec::new() }
    }

    /// The ring every peer computes from the same seed list: the range cut
    /// into equal consecutive pieces, one per seed in name order.
    pub fn from_seeds(range: Cidr, seeds: &[PeerName]) -> Ring {
        let mut seeds = seeds.to_vec();
        seeds.sort();
        seeds.dedup();
        let n = seeds.len() as u64;
        let mut entries = Vec::with_capacity(seeds.len());
        if let Some(each) = range.size().checked_div(n) {
            let extra = range.size() % n;
            let mut start = u64::from(range.addr);
            for (i, s) in seeds.iter().enumerate() {
                let len = each + u64::from((i as u64) < extra);
                if len == 0 {
                    break;
                }
                entries.push(Entry { token: start as u32, peer: *s, version: 0, free: len.min(u64::from(u32::MAX)) as u32 });
                start += len;
            }
        }
        Ring { range, seeds, entries }
    }

    /// The whole range.
    pub fn range(&self) -> Cidr {
        self.range
    }

    /// The peers that started the ring.
    pub fn seeds(&self) -> &[PeerName] {
        &self.seeds
    }

    /// Whether nobody has started the ring yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in token order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The pieces, in address order.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_>> + '_ {
        let end = self.range.end();
        self.entries.iter().enumerate().map(move |(i, e)| Piece {
            start: u64::from(e.token),
            end: self.entries.get(i + 1).map_or(end, |n| u64::from(n.token)),
            entry: e,
        })
    }

    /// The pieces a peer owns, adjacent ones joined, in address order.
    pub fn owned(&self, peer: PeerName) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in self.pieces().filter(|p| p.entry.peer == peer) {
            match out.last_mut() {
                Some(last) if last.1 == p.start => last.1 = p.end,
                _ => out.push((p.start, p.end)),
            }
        }
        out
    }

    /// Who owns `addr`; `None` outside the range or before the ring starts.
    pub fn owner(&self, addr: u32) -> Option<PeerName> {
        if !self.range.contains(addr) {
            return None;
        }
        let i = self.entries.partition_point(|e| e.token <= addr);
        i.checked_sub(1).map(|i| self.entries[i].peer)
    }

    /// Per peer: addresses owned, and free as their owners last said.
    pub fn shares(&self) -> BTreeMap<PeerName, (u64, u64)> {
        let mut m: BTreeMap<PeerName, (u64, u64)> = BTreeMap::new();
        for p in self.pieces() {
            let s = m.entry(p.entry.peer).or_default();
            s.0 += p.end - p.start;
            s.1 += u64::from(p.entry.free);
        }
        m
    }

    /// Checks the ring's rules: tokens strictly increasing and inside the
    /// range, the first at its start, free counts no larger than their
    /// pieces, seeds sorted and present whenever entries are.
    pub fn validate(&self) -> Result<(), String> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(format!("{} entries (at most {MAX_ENTRIES})", self.entries.len()));
        }
        if self.seeds.len() > MAX_ENTRIES {
            return Err(format!("{} seeds", self.seeds.len()));
        }
        if self.seeds.windows(2).any(|w| w[0] >= w[1]) {
            return Err("seeds not sorted".into());
        }
        let Some(first) = self.entries.first() else {
            return Ok(());
        };
        if self.seeds.is_empty() {
            return Err("entries without seeds".into());
        }
        if first.token != self.range.addr {
            return Err(format!("first token {} is not the start of {}", ip(first.token), self.range));
        }
        if self.entries.windows(2).any(|w| w[0].token >= w[1].token) {
            return Err("tokens not strictly increasing".into());
        }
        for p in self.pieces() {
            if !self.range.contains(p.entry.token) {
                return Err(format!("token {} outside {}", ip(p.entry.token), self.range));
            }
            if u64::from(p.entry.free) > p.end - p.start {
                return Err(format!("{} free in a piece of {} at {}", p.entry.free, p.end - p.start, ip(p.entry.token)));
            }
        }
        Ok(())
    }

    /// The join of two rings (see the module docs). Both must be valid.
    pub fn join(a: &Ring, b: &Ring) -> Result<Ring, RingError> {
        if a.range != b.range {
            return Err(RingError::DifferentRange { ours: a.range, theirs: b.range });
        }
        if a.entries.is_empty() {
            return Ok(b.clone());
        }
        if b.entries.is_empty() {
            return Ok(a.clone());
        }
        if a.seeds != b.seeds {
            return Err(RingError::DifferentSeeds { ours: Names(a.seeds.clone()), theirs: Names(b.seeds.clone()) });
        }
        let mut out = Vec::with_capacity(a.entries.len().max(b.entries.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.entries.len() || j < b.entries.len() {
            match (a.entries.get(i), b.entries.get(j)) {
                (Some(x), Some(y)) if x.token == y.token => {
                    if x.version == y.version && x != y {
                        return Err(RingError::Inconsistent {
                            token: ip(x.token),
                            ours: x.peer,
                            theirs: y.peer,
                            version: x.version,
                        });
                    }
                    out.push(if y.version > x.version { y.clone() } else { x.clone() });
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.token < y.token => {
                    out.push(x.clone());
                    i += 1;
                }
                (Some(x), None) => {
                    out.push(x.clone());
                    i += 1;
                }
                (_, Some(y)) => {
                    out.push(y.clone());
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let r = Ring { range: a.range, seeds: a.seeds.clone(), entries: out };
        r.validate().map_err(RingError::Invalid)?;
        Ok(r)
    }

    /// Merges a ring received from a peer into ours, as peer `me`. Refuses
    /// (changing nothing) what [`Ring::join`] refuses and anything that would
    /// take away space `me` owns. Returns whether our ring changed.
    pub fn merge(&mut self, other: &Ring, me: PeerName) -> Result<bool, RingError> {
        other.validate().map_err(RingError::Invalid)?;
        let joined = Ring::join(self, other)?;
        for (start, end) in self.owned(me) {
            for p in joined.pieces() {
                if p.end > start && p.start < end && p.entry.peer != me {
                    return Err(RingError::LostSpace {
                        start: ip(p.start.max(start) as u32),
                        end: ip((p.end.min(end) - 1) as u32),
                        to: p.entry.peer,
                    });
                }
            }
        }
        if joined == *self {
            return Ok(false);
        }
        *self = joined;
        Ok(true)
    }

    /// Puts a token at `at` if there is none, inside a piece `me` owns (the
    /// new entry is ours). Returns false when `at` is inside another's piece.
    fn split(&mut self, at: u64, me: PeerName) -> bool {
        if at <= u64::from(self.range.addr) || at >= self.range.end() {
            return true;
        }
        let at32 = at as u32;
        let i = self.entries.partition_point(|e| e.token <= at32);
        let Some(owner) = i.checked_sub(1).map(|k| &self.entries[k]) else { return false };
        if owner.token == at32 {
            return true;
        }
        if owner.peer != me {
            return false;
        }
        // The old entry's piece shrinks: keep its free count within it (a
        // change of content, so a new version).
        let k = i - 1;
        let size = (at - u64::from(self.entries[k].token)).min(u64::from(u32::MAX)) as u32;
        if self.entries[k].free > size {
            self.entries[k].free = size;
            self.entries[k].version += 1;
        }
        self.entries.insert(i, Entry { token: at32, peer: me, version: 0, free: 0 });
        true
    }

    /// Gives `[start, end)`, which `me` must own entirely, to `to`. The piece
    /// is marked all free (only free space is given). Returns an error and
    /// changes nothing when part of it is not ours.
    pub fn give(&mut self, me: PeerName, to: PeerName, start: u64, end: u64) -> Result<(), String> {
        if start >= end || start < u64::from(self.range.addr) || end > self.range.end() {
            return Err(format!("bad range to give: {start}..{end}"));
        }
        if self.pieces().any(|p| p.end > start && p.start < end && p.entry.peer != me) {
            return Err(format!("{}..{} is not all ours to give", ip(start as u32), ip((end - 1) as u32)));
        }
        let before = self.clone();
        if !self.split(start, me) || !self.split(end, me) {
            *self = before;
            return Err("cannot split the ring there".into());
        }
        let range_end = self.range.end();
        let n = self.entries.len();
        for i in 0..n {
            let s = u64::from(self.entries[i].token);
            let e = self.entries.get(i + 1).map_or(range_end, |x| u64::from(x.token));
            if s >= start && e <= end {
                let en = &mut self.entries[i];
                en.peer = to;
                en.version += 1;
                en.free = (e - s).min(u64::from(u32::MAX)) as u32;
            }
        }
        Ok(())
    }

    /// Gives every piece of `from` to `to` (rmpeer, reset). Returns the
    /// number of addresses moved.
    pub fn transfer(&mut self, from: PeerName, to: PeerName) -> u64 {
        let range_end = self.range.end();
        let mut moved = 0;
        for i in 0..self.entries.len() {
            if self.entries[i].peer == from {
                let e = self.entries.get(i + 1).map_or(range_end, |x| u64::from(x.token));
                moved += e - u64::from(self.entries[i].token);
                let en = &mut self.entries[i];
                en.peer = to;
                en.version += 1;
            }
        }
        moved
    }

    /// Sets the free count of our entry at `token`. Returns whether it changed.
    pub fn set_free(&mut self, me: PeerName, token: u32, free: u32) -> bool {
        match self.entries.iter_mut().find(|e| e.token == token && e.peer == me) {
            Some(e) if e.free != free => {
                e.free = free;
                e.version += 1;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }
    fn range() -> Cidr {
        Cidr { addr: 0x0a20_0000, prefix: 24 }
    }

    #[test]
    fn seeds_split_evenly_and_owner_lookup() {
        let r = Ring::from_seeds(range(), &[n(3), n(1), n(2)]);
        r.validate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.entries().len(), 3);
        let sh = r.shares();
        assert_eq!(sh[&n(1)].0 + sh[&n(2)].0 + sh[&n(3)].0, 256);
        assert_eq!(r.owner(0x0a20_0000), Some(n(1)));
        assert_eq!(r.owner(0x0a20_00ff), Some(n(3)));
        assert_eq!(r.owner(0x0a21_0000), None);
        assert_eq!(Ring::empty(range()).owner(0x0a20_0000), None);
    }

    #[test]
    fn give_moves_space_and_merge_accepts_it() {
        let mut a = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut b = a.clone();
        let (s, e) = a.owned(n(1))[0];
        a.give(n(1), n(2), s + 10, s + 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.owner((s + 10) as u32), Some(n(2)));
        assert_eq!(a.owner((s + 20) as u32), Some(n(1)));
        assert_eq!(a.owner((s + 9) as u32), Some(n(1)));
        assert!(e > s + 20);
        assert_eq!(b.merge(&a, n(2)), Ok(true));
        assert_eq!(b, a);
        assert_eq!(b.merge(&a, n(2)), Ok(false));
        // Giving what is not ours fails and changes nothing.
        let before = a.clone();
        assert!(a.give(n(1), n(3), s + 5, s + 15).is_err());
        assert_eq!(a, before);
    }

    #[test]
    fn merge_refuses_taking_our_space() {
        let mut a = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut other = a.clone();
        other.transfer(n(1), n(2));
        let before = a.clone();
        assert!(matches!(a.merge(&other, n(1)), Err(RingError::LostSpace { .. })));
        assert_eq!(a, before);
        // Peer 3 has no space at stake and takes the change.
        let mut c = before.clone();
        assert_eq!(c.merge(&other, n(3)), Ok(true));
    }

    #[test]
    fn different_seeds_and_ranges_refuse() {
        let mut a = Ring::from_seeds(range(), &[n(1)]);
        let b = Ring::from_seeds(range(), &[n(2)]);
        let e = a.merge(&b, n(1)).err().unwrap_or_else(|| panic!("merged"));
        assert!(matches!(e, RingError::DifferentSeeds { .. }), "{e}");
        assert!(e.to_string().contains("two separate meshes"));
        let c = Ring::from_seeds(Cidr { addr: 0x0a30_0000, prefix: 24 }, &[n(1)]);
        assert!(matches!(a.merge(&c, n(1)), Err(RingError::DifferentRange { .. })));
        // An empty ring takes any valid ring over the same range.
        let mut e = Ring::empty(range());
        assert_eq!(e.merge(&b, n(1)), Ok(true));
    }

    #[test]
    fn invalid_rings_refused() {
        let mut good = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut bad = good.clone();
        bad.entries.swap(0, 1);
        assert!(matches!(good.merge(&bad, n(1)), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.entries[0].token += 1;
        assert!(matches!(good.merge(&bad, n(3)), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.entries[0].free = 100_000;
        assert!(matches!(good.merge(&bad, n(3)), Err(RingError::Invalid(_))));
        let mut bad = good.clone();
        bad.seeds.clear();
        assert!(matches!(good.merge(&bad, n(3)), Err(RingError::Invalid(_))));
    }

    #[test]
    fn same_version_different_owner_is_inconsistent() {
        let base = Ring::from_seeds(range(), &[n(1), n(2)]);
        let mut a = base.clone();
        let mut b = base.clone();
        a.transfer(n(1), n(3));
        b.transfer(n(1), n(4));
        assert!(matches!(Ring::join(&a, &b), Err(RingError::Inconsistent { .. })));
    }
}
