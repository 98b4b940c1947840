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

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proto::PeerName;

/// Most voters a claims map may hold.
pub const MAX_VOTERS: usize = 4096;

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

/// Every voter's claims, as gossiped.
pub type ClaimsMap = BTreeMap<PeerName, Claims>;

/// One voter's view. See the module docs.
#[derive(Clone, Debug)]
pub struct Paxos {
    me: PeerName,
    quorum: usize,
    voter: bool,
    knows: ClaimsMap,
}

impl Paxos {
    /// A voter (it takes part from its first step on).
    pub fn new(me: PeerName, quorum: usize) -> Paxos {
        Paxos { me, quorum: quorum.max(1), voter: true, knows: BTreeMap::new() }
    }

    /// An observer: it relays and watches the claims but never votes.
    pub fn observer(me: PeerName) -> Paxos {
        Paxos { me, quorum: usize::MAX, voter: false, knows: BTreeMap::new() }
    }

    /// Whether we vote.
    pub fn is_voter(&self) -> bool {
        self.voter
    }

    /// Restores our own claims after a restart (a promise must outlive a crash).
    pub fn restore(&mut self, own: Claims) {
        self.knows.insert(self.me, own);
    }

    /// Our claims, to persist.
    pub fn own(&self) -> Option<&Claims> {
        self.knows.get(&self.me)
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
        self.knows.values().any(|c| c.promise != ProposalId::default())
    }

    /// Checks a received map: bounded, accepted values sorted and bounded.
    pub fn validate(map: &ClaimsMap) -> Result<(), String> {
        if map.len() > MAX_VOTERS {
            return Err(format!("{} voters (at most {MAX_VOTERS})", map.len()));
        }
        for (n, c) in map {
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

    /// Merges a received map (which must be valid), then steps. Returns
    /// whether our map changed.
    pub fn merge(&mut self, other: &ClaimsMap) -> bool {
        let mut changed = false;
        for (n, c) in other {
            match self.knows.get(n) {
                Some(mine) if mine >= c => {}
                _ => {
                    self.knows.insert(*n, c.clone());
                    changed = true;
                }
            }
        }
        self.step() || changed
    }

    /// Starts a proposal above every one seen.
    pub fn propose(&mut self) {
        if !self.voter {
            return;
        }
        let round = self.knows.values().map(|c| c.promise.round).max().unwrap_or(0) + 1;
        let own = self.knows.entry(self.me).or_default();
        own.promise = ProposalId { round, proposer: self.me };
        self.step();
    }

    /// Runs phases 2–4 for ourselves. Returns whether our claims changed.
    pub fn step(&mut self) -> bool {
        if !self.voter {
            return false;
        }
        let before = self.knows.get(&self.me).cloned();
        let max = self.knows.values().map(|c| c.promise).max().unwrap_or_default();
        let own = self.knows.entry(self.me).or_default();
        if max > own.promise {
            own.promise = max;
        }
        let p = own.promise;
        let accepted_p = own.accepted.as_ref().is_some_and(|(a, _)| *a == p);
        if p != ProposalId::default() && !accepted_p {
            if p.proposer == self.me {
                let promisers: Vec<(&PeerName, &Claims)> = self.knows.iter().filter(|(_, c)| c.promise == p).collect();
                if promisers.len() >= self.quorum {
                    let value = promisers
                        .iter()
                        .filter_map(|(_, c)| c.accepted.as_ref())
                        .max_by_key(|(pid, _)| *pid)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_else(|| promisers.iter().map(|(n, _)| **n).collect());
                    if let Some(own) = self.knows.get_mut(&self.me) {
                        own.accepted = Some((p, value));
                    }
                }
            } else if let Some((pid, v)) = self.knows.get(&p.proposer).and_then(|c| c.accepted.clone()) {
                if pid == p {
                    if let Some(own) = self.knows.get_mut(&self.me) {
                        own.accepted = Some((p, v));
                    }
                }
            }
        }
        self.knows.get(&self.me) != before.as_ref()
    }

    /// The chosen value, once a quorum accepted one proposal.
    pub fn consensus(&self) -> Option<Vec<PeerName>> {
        let mut votes: BTreeMap<&(ProposalId, Vec<PeerName>), usize> = BTreeMap::new();
        for c in self.knows.values() {
            if let Some(a) = &c.accepted {
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

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }

    /// Gossips every map to every other until nothing changes.
    fn settle(ps: &mut [Paxos]) {
        loop {
            let mut changed = false;
            for i in 0..ps.len() {
                for j in 0..ps.len() {
                    if i != j {
                        let m = ps[j].claims().clone();
                        changed |= ps[i].merge(&m);
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
        let mut ps: Vec<Paxos> = (1..=3).map(|i| Paxos::new(n(i), 2)).collect();
        ps[0].propose();
        settle(&mut ps);
        let v = ps[0].consensus().unwrap_or_else(|| panic!("no consensus"));
        // The value is the promisers the proposer saw when it had a quorum.
        assert!(v.len() >= 2 && v.contains(&n(1)), "{v:?}");
        for p in &ps {
            assert_eq!(p.consensus(), Some(v.clone()));
        }
    }

    #[test]
    fn no_quorum_no_consensus() {
        let mut ps: Vec<Paxos> = (1..=3).map(|i| Paxos::new(n(i), 3)).collect();
        ps[0].propose();
        // Only voters 1 and 2 talk.
        let (a, b) = ps.split_at_mut(1);
        for _ in 0..5 {
            let m = b[0].claims().clone();
            a[0].merge(&m);
            let m = a[0].claims().clone();
            b[0].merge(&m);
        }
        assert_eq!(ps[0].consensus(), None);
        assert_eq!(ps[1].consensus(), None);
    }

    #[test]
    fn competing_proposers_choose_one_value() {
        let mut ps: Vec<Paxos> = (1..=5).map(|i| Paxos::new(n(i), 3)).collect();
        // 1 gets a quorum of {1,2,3} and accepts; 5 then proposes higher among {3,4,5}.
        for i in [0, 4] {
            ps[i].propose();
        }
        let share = |ps: &mut Vec<Paxos>, from: usize, to: usize| {
            let m = ps[from].claims().clone();
            ps[to].merge(&m);
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
        settle(&mut ps);
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
        let mut m = ClaimsMap::new();
        m.insert(n(1), Claims { promise: ProposalId::default(), accepted: Some((ProposalId { round: 2, proposer: n(1) }, vec![n(1)])) });
        assert!(Paxos::validate(&m).is_err());
        let mut m = ClaimsMap::new();
        let p = ProposalId { round: 1, proposer: n(1) };
        m.insert(n(1), Claims { promise: p, accepted: Some((p, vec![n(2), n(1)])) });
        assert!(Paxos::validate(&m).is_err());
    }
}
