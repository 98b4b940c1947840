//! Consensus on who starts the ring: single-decree Paxos over gossip.
//!
//! Every voter keeps a map of every voter's *claims* (the highest proposal it
//! promised, and the proposal and value it accepted) and gossips the whole
//! map. Each voter writes only its own claims and they only grow (promise and
//! accepted proposal never go down), so merging two maps keeps, per voter,
//! the larger claims: a CRDT. The phases of Paxos are then local steps run
//! after every merge:
//!
//! 1. A proposer picks a proposal number higher than any it has seen and
//!    promises it itself.
//! 2. A voter that sees a proposal higher than its promise promises that one
//!    (and so will not accept anything lower).
//! 3. A proposer whose proposal has a quorum of promises accepts it with the
//!    value of the highest-numbered acceptance among the promisers, or, if
//!    none accepted anything, the sorted list of the promisers themselves.
//! 4. A voter that promised a proposal and sees its proposer accept it
//!    accepts the same value.
//! 5. A value accepted under one proposal by a quorum is chosen. Every peer
//!    that sees this builds the same ring from the chosen peers
//!    ([`crate::ring::Ring::from_seeds`]).

//!
//! # Signatures
//!
//! Every voter's claims travel signed by that voter ([`SignedClaims`]: its
//! Ed25519 signature, domain [`DOMAIN_PAXOS`], over `(range, voter, claims)`).
//! A received claim is checked against the key bound to the voter's name
//! before it is merged, and only when it would change our map (a claim no
//! larger than what we hold is ignored unchecked: it changes nothing and is
//! never passed on). A claim of a voter with no bound key (a voter that does
//! not exist) or with a bad signature is dropped and reported to the caller,
//! which counts it against the neighbour that sent it; the rest of the map
//! still merges, and what we gossip on is only ever our own map, which holds
//! verified claims only. So a password holder can vote only as itself, and a
//! voter's promise or acceptance cannot be rolled back or invented by others.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proto::identity::{signed_bytes, Refused, Signature};
use weft_proto::{Keys, PeerName, SigningKey};

use crate::addr::Cidr;

/// Most voters a claims map may hold.
pub const MAX_VOTERS: usize = 4096;
/// Domain label of a voter's signature of its claims.
pub const DOMAIN_PAXOS: &[u8] = b"weft ipam paxos v1";

/// A proposal number: round, then proposer to break ties.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    /// Round.
    pub round: u64,
    /// Who proposed.
    pub proposer: PeerName,
}

/// What one voter has said. Ordered so that a voter's claims only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Claims {
    /// Highest proposal promised.
    pub promise: ProposalId,
    /// Proposal accepted, and its value (the peers to seed the ring).
    pub accepted: Option<(ProposalId, Vec<PeerName>)>,
}

/// One voter's claims with the voter's signature of `(range, voter, claims)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedClaims {
    /// The claims.
    pub claims: Claims,
    /// The voter's signature.
    pub sig: Signature,
}

impl SignedClaims {
    /// `voter`'s claims over `range`, signed with its key.
    pub fn sign(key: &SigningKey, range: Cidr, voter: PeerName, claims: Claims) -> SignedClaims {
        let sig = key.sign(DOMAIN_PAXOS, &signed_bytes(&(range, voter, &claims)));
        SignedClaims { claims, sig }
    }

    /// Checks that the key bound to `voter` signed these claims over `range`.
    pub fn verify(&self, keys: &Keys, range: Cidr, voter: PeerName) -> Result<(), Refused> {
        keys.verify(voter, DOMAIN_PAXOS, &signed_bytes(&(range, voter, &self.claims)), &self.sig, "consensus claim")
    }
}

/// Every voter's claims, as gossiped.
pub type ClaimsMap = BTreeMap<PeerName, SignedClaims>;

/// What [`Paxos::merge`] did.
#[derive(Debug, Default)]
pub struct Merged {
    /// Whether our map changed.
    pub changed: bool,
    /// Claims dropped because they did not verify: whose, and why.
    pub refused: Vec<(PeerName, Refused)>,
}

/// One voter's view. See the module docs.
#[derive(Clone, Debug)]
pub struct Paxos {
    me: PeerName,
    range: Cidr,
    quorum: usize,
    /// Our signing key; `None` for an observer, which never writes claims.
    key: Option<SigningKey>,
    knows: ClaimsMap,
}

impl Paxos {
    /// A voter (it takes part from its first step on); its claims are signed
    /// with `key`, the key bound to `me`.
    pub fn new(me: PeerName, quorum: usize, range: Cidr, key: SigningKey) -> Paxos {
        Paxos { me, range, quorum: quorum.max(1), key: Some(key), knows: BTreeMap::new() }
    }

    /// An observer: it relays and watches the claims but never votes.
    pub fn observer(me: PeerName, range: Cidr) -> Paxos {
        Paxos { me, range, quorum: usize::MAX, key: None, knows: BTreeMap::new() }
    }

    /// Whether we vote.
    pub fn is_voter(&self) -> bool {
        self.key.is_some()
    }

    /// Restores our own claims after a restart (a promise must outlive a
    /// crash). They come from our own disk, so they are signed afresh.
    pub fn restore(&mut self, own: Claims) {
        self.set_own(own);
    }

    /// Our claims, to persist.
    pub fn own(&self) -> Option<&Claims> {
        self.knows.get(&self.me).map(|s| &s.claims)
    }

    /// The whole map, to gossip.
    pub fn claims(&self) -> &ClaimsMap {
        &self.knows
    }

    /// Votes needed.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// Voters heard from (ourselves included once we take part).
    pub fn known(&self) -> usize {
        self.knows.len()
    }

    /// Whether anyone has proposed yet.
    pub fn started(&self) -> bool {
        self.knows.values().any(|c| c.claims.promise != ProposalId::default())
    }

    /// Checks a received map: bounded, accepted values sorted and bounded.
    /// (Signatures are checked entry by entry in [`Paxos::merge`].)
    pub fn validate(map: &ClaimsMap) -> Result<(), String> {
        if map.len() > MAX_VOTERS {
            return Err(format!("{} voters (at most {MAX_VOTERS})", map.len()));
        }
        for (n, s) in map {
            let c = &s.claims;
            if let Some((pid, v)) = &c.accepted {
                if *pid > c.promise {
                    return Err(format!("{n} accepted {pid:?} above its promise"));
                }
                if v.is_empty() || v.len() > MAX_VOTERS || v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("{n} accepted a malformed value"));
                }
            }
        }
        Ok(())
    }

    /// Merges a received map (which must be valid), then steps. Each claim
    /// that would change our map is first checked against its voter's bound
    /// key; one that fails is dropped and listed in [`Merged::refused`].
    pub fn merge(&mut self, other: &ClaimsMap, keys: &Keys) -> Merged {
        let mut m = Merged::default();
        for (n, c) in other {
            match self.knows.get(n) {
                Some(mine) if mine.claims >= c.claims => {}
                _ => {
                    if let Err(e) = c.verify(keys, self.range, *n) {
                        m.refused.push((*n, e));
                        continue;
                    }
                    self.knows.insert(*n, c.clone());
                    m.changed = true;
                }
            }
        }
        m.changed |= self.step();
        m
    }

    /// Starts a proposal above every one seen.
    pub fn propose(&mut self) {
        if !self.is_voter() {
            return;
        }
        let round = self.knows.values().map(|c| c.claims.promise.round).max().unwrap_or(0) + 1;
        let mut own = self.own().cloned().unwrap_or_default();
        own.promise = ProposalId { round, proposer: self.me };
        self.set_own(own);
        self.step();
    }

    /// Replaces our claims, signed.
    fn set_own(&mut self, own: Claims) {
        if let Some(key) = &self.key {
            let s = SignedClaims::sign(key, self.range, self.me, own);
            self.knows.insert(self.me, s);
        }
    }

    /// Runs phases 2–4 for ourselves. Returns whether our claims changed.
    pub fn step(&mut self) -> bool {
        if !self.is_voter() {
            return false;
        }
        let before = self.own().cloned();
        let max = self.knows.values().map(|c| c.claims.promise).max().unwrap_or_default();
        let mut own = before.clone().unwrap_or_default();
        if max > own.promise {
            own.promise = max;
        }
        let p = own.promise;
        let accepted_p = own.accepted.as_ref().is_some_and(|(a, _)| *a == p);
        if p != ProposalId::default() && !accepted_p {
            if p.proposer == self.me {
                // Promisers of p: the others' claims as known, and our own as just updated.
                let mut promisers: Vec<(PeerName, &Claims)> = self
                    .knows
                    .iter()
                    .filter(|(n, c)| **n != self.me && c.claims.promise == p)
                    .map(|(n, c)| (*n, &c.claims))
                    .collect();
                promisers.push((self.me, &own));
                promisers.sort_by_key(|(n, _)| *n);
                if promisers.len() >= self.quorum {
                    let value = promisers
                        .iter()
                        .filter_map(|(_, c)| c.accepted.as_ref())
                        .max_by_key(|(pid, _)| *pid)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| promisers.iter().map(|(n, _)| *n).collect());
                    own.accepted = Some((p, value));
                }
            } else if let Some((pid, v)) = self.knows.get(&p.proposer).and_then(|c| c.claims.accepted.clone()) {
                if pid == p {
                    own.accepted = Some((p, v));
                }
            }
        }
        if Some(&own) == before.as_ref() {
            return false;
        }
        self.set_own(own);
        true
    }

    /// The chosen value, once a quorum accepted one proposal.
    pub fn consensus(&self) -> Option<Vec<PeerName>> {
        let mut votes: BTreeMap<&(ProposalId, Vec<PeerName>), usize> = BTreeMap::new();
        for c in self.knows.values() {
            if let Some(a) = &c.claims.accepted {
                let n = votes.entry(a).or_default();
                *n += 1;
                if *n >= self.quorum {
                    return Some(a.1.clone());
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::identity::Claim;
    use weft_proto::Trust;

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }

    fn key(i: u64) -> SigningKey {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&i.to_le_bytes());
        SigningKey::from_seed(&seed).expect("seed")
    }

    fn range() -> Cidr {
        "10.32.0.0/24".parse().expect("cidr")
    }

    /// Keys of voters 1..=k bound.
    fn keys(k: u64) -> Keys {
        let mut keys = Keys::new(Trust::FirstUse);
        for i in 1..=k {
            keys.admit(&Claim::self_signed(&key(i), n(i))).expect("admit");
        }
        keys
    }

    fn voters(k: u64, quorum: usize) -> Vec<Paxos> {
        (1..=k).map(|i| Paxos::new(n(i), quorum, range(), key(i))).collect()
    }

    /// Gossips every map to every other until nothing changes.
    fn settle(ps: &mut [Paxos], keys: &Keys) {
        loop {
            let mut changed = false;
            for i in 0..ps.len() {
                for j in 0..ps.len() {
                    if i != j {
                        let m = ps[j].claims().clone();
                        let r = ps[i].merge(&m, keys);
                        assert!(r.refused.is_empty(), "honest claims refused: {:?}", r.refused);
                        changed |= r.changed;
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    #[test]
    fn three_voters_agree() {
        let keys = keys(3);
        let mut ps = voters(3, 2);
        ps[0].propose();
        settle(&mut ps, &keys);
        let v = ps[0].consensus().unwrap_or_else(|| panic!("no consensus"));
        // The value is the promisers the proposer saw when it had a quorum.
        assert!(v.len() >= 2 && v.contains(&n(1)), "{v:?}");
        for p in &ps {
            assert_eq!(p.consensus(), Some(v.clone()));
        }
    }

    #[test]
    fn no_quorum_no_consensus() {
        let keys = keys(3);
        let mut ps = voters(3, 3);
        ps[0].propose();
        // Only voters 1 and 2 talk.
        let (a, b) = ps.split_at_mut(1);
        for _ in 0..5 {
            let m = b[0].claims().clone();
            a[0].merge(&m, &keys);
            let m = a[0].claims().clone();
            b[0].merge(&m, &keys);
        }
        assert_eq!(ps[0].consensus(), None);
        assert_eq!(ps[1].consensus(), None);
    }

    #[test]
    fn competing_proposers_choose_one_value() {
        let keys = keys(5);
        let mut ps = voters(5, 3);
        // 1 gets a quorum of {1,2,3} and accepts; 5 then proposes higher among {3,4,5}.
        for i in [0, 4] {
            ps[i].propose();
        }
        let share = |ps: &mut Vec<Paxos>, from: usize, to: usize| {
            let m = ps[from].claims().clone();
            ps[to].merge(&m, &keys);
        };
        share(&mut ps, 0, 1);
        share(&mut ps, 0, 2);
        share(&mut ps, 1, 0);
        share(&mut ps, 2, 0);
        share(&mut ps, 0, 1);
        share(&mut ps, 0, 2);
        let first = ps[1].consensus();
        share(&mut ps, 2, 4);
        share(&mut ps, 4, 3);
        ps[4].propose();
        settle(&mut ps, &keys);
        let v = ps[4].consensus().unwrap_or_else(|| panic!("no consensus"));
        if let Some(f) = first {
            assert_eq!(v, f, "a chosen value changed");
        }
        for p in &ps {
            assert_eq!(p.consensus(), Some(v.clone()));
        }
    }

    #[test]
    fn validate_refuses_bad_maps() {
        let k = key(1);
        let mut m = ClaimsMap::new();
        let c = Claims { promise: ProposalId::default(), accepted: Some((ProposalId { round: 2, proposer: n(1) }, vec![n(1)])) };
        m.insert(n(1), SignedClaims::sign(&k, range(), n(1), c));
        assert!(Paxos::validate(&m).is_err());
        let mut m = ClaimsMap::new();
        let p = ProposalId { round: 1, proposer: n(1) };
        m.insert(n(1), SignedClaims::sign(&k, range(), n(1), Claims { promise: p, accepted: Some((p, vec![n(2), n(1)])) }));
        assert!(Paxos::validate(&m).is_err());
    }

    /// A rogue voter 9 (key bound: it holds the password and connected under its
    /// own name) forges a quorum for its own value: votes of voters 7 and 8 that
    /// do not exist (no key bound), and acceptances in the names of honest voters
    /// 2 and 3 signed with its own key. None of them merges, each is reported,
    /// nothing of them is passed on, and the honest voters still agree among
    /// themselves.
    #[test]
    fn forged_votes_change_nothing_and_honest_consensus_completes() {
        let mut keys = keys(3);
        let rogue = key(9);
        keys.admit(&Claim::self_signed(&rogue, n(9))).expect("admit");
        let mut ps = voters(3, 2);
        let evil = ProposalId { round: 1_000, proposer: n(9) };
        let value = vec![n(9)];
        let forged = Claims { promise: evil, accepted: Some((evil, value.clone())) };
        let mut m = ClaimsMap::new();
        for voter in [n(2), n(3), n(7), n(8)] {
            m.insert(voter, SignedClaims::sign(&rogue, range(), voter, forged.clone()));
        }
        // A genuine signature of voter 2's, but over another range (a replay from
        // another mesh), and one with its bytes flipped.
        let mut flipped = SignedClaims::sign(&key(2), range(), n(2), forged.clone());
        flipped.sig.0[0] ^= 1;
        let other: Cidr = "10.99.0.0/24".parse().expect("cidr");
        let replayed = SignedClaims::sign(&key(3), other, n(3), forged.clone());
        for p in ps.iter_mut() {
            p.step(); // each voter's own (empty) claims are in its map
        }
        let before: Vec<ClaimsMap> = ps.iter().map(|p| p.claims().clone()).collect();
        for (i, p) in ps.iter_mut().enumerate() {
            let r = p.merge(&m, &keys);
            assert!(!r.changed, "voter {i} took forged claims");
            let mut who: Vec<(PeerName, &'static str)> = r.refused.iter().map(|(n, e)| (*n, e.label())).collect();
            who.sort();
            assert_eq!(
                who,
                vec![(n(2), "bad_signature"), (n(3), "bad_signature"), (n(7), "unknown_key"), (n(8), "unknown_key")]
            );
            for bad in [(n(2), &flipped), (n(3), &replayed)] {
                let r = p.merge(&ClaimsMap::from([(bad.0, bad.1.clone())]), &keys);
                assert!(!r.changed && r.refused.len() == 1, "voter {i}: {r:?}");
            }
        }
        for (p, b) in ps.iter().zip(&before) {
            assert_eq!(p.claims(), b, "forged claims changed a map");
            assert_eq!(p.consensus(), None);
        }
        // The rogue's own vote, signed by itself, is a real vote: it merges (it is
        // one voter of the quorum, no more), and honest voters still agree.
        let own = ClaimsMap::from([(n(9), SignedClaims::sign(&rogue, range(), n(9), Claims::default()))]);
        assert!(ps[0].merge(&own, &keys).refused.is_empty());
        ps[0].propose();
        settle(&mut ps, &keys);
        let v = ps[0].consensus().unwrap_or_else(|| panic!("no consensus among honest voters"));
        assert!(!v.contains(&n(7)) && !v.contains(&n(8)), "{v:?}");
        for p in &ps {
            assert_eq!(p.consensus(), Some(v.clone()));
            assert!(p.claims().keys().all(|k| [n(1), n(2), n(3), n(9)].contains(k)));
        }
    }

    /// Claims no larger than ours are not even checked (they change nothing),
    /// and our own claims survive a restart re-signed.
    #[test]
    fn restored_claims_are_signed_and_verify() {
        let keys = keys(2);
        let mut a = Paxos::new(n(1), 2, range(), key(1));
        a.propose();
        let own = a.own().cloned().expect("claims");
        let mut b = Paxos::new(n(1), 2, range(), key(1));
        b.restore(own.clone());
        assert_eq!(b.claims(), a.claims());
        let s = &b.claims()[&n(1)];
        assert!(s.verify(&keys, range(), n(1)).is_ok());
        let mut c = Paxos::new(n(2), 2, range(), key(2));
        let r = c.merge(b.claims(), &keys);
        assert!(r.changed && r.refused.is_empty());
    }
}
