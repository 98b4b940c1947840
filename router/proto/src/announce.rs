//! The `macs` gossip channel: the MACs each peer vouches for as its own containers', so that
//! the others accept frames from a peer only with those source MACs. Without it, a peer (a
//! host that holds the password, or one whose containers are not guarded) could send frames
//! from another container's MAC and take its traffic on every host.
//!
//! - **Entries.** One list per peer: its name, a version, and its MACs, each with the network
//!   (segment) it is on (sorted, each unicast and not zero, at most [`MAX_PER_PEER`]), signed
//!   by the peer's identity key under
//!   [`DOMAIN_MACS`]. A peer replaces its whole list; a higher version wins. Lists are checked
//!   against the name's bound key before they are merged or passed on.
//! - **Ownership.** [`Announcements::owners`] maps each (segment, MAC) to the one peer that
//!   announced it. A MAC that two peers announce belongs to neither (a forger can deny a MAC,
//!   never take it), and our own MACs never belong to a peer. Conflicts are listed for status.
//! - **Membership.** A peer is a member of a named network while it announces a MAC on it
//!   ([`Announcements::members`]): the network's broadcasts go to its members only.
//! - **Bounds.** At most [`MAX_PEERS`] lists; payloads that do not decode are refused whole.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::identity::{signed_bytes, Keys, Refused, Signature, SigningKey};
use crate::router::GossipChannel;
use crate::switch::Mac;
use crate::PeerName;

/// The channel's name.
pub const CHANNEL: &str = "macs";
/// Domain label of a list's signature.
pub const DOMAIN_MACS: &[u8] = b"weft macs v1";
/// MACs one peer may announce (a host with more containers than this is far beyond what
/// runtimes schedule on one machine).
pub const MAX_PER_PEER: usize = 4096;
/// Lists kept (the topology's bound on peers).
pub const MAX_PEERS: usize = crate::topology::MAX_PEERS;
/// MACs kept over all lists (the switch's total).
pub const MAX_TOTAL: usize = 262_144;

/// One peer's list, as signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacList {
    pub origin: PeerName,
    pub version: u64,
    /// (segment, MAC), sorted, without repeats.
    pub macs: Vec<(u32, [u8; 6])>,
}

/// A list with its origin's signature, as gossiped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignedList {
    pub list: MacList,
    pub sig: Signature,
}

/// Why a list was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("{0}")]
    Refused(Refused),
    #[error("more than {MAX_PER_PEER} MACs")]
    TooMany,
    #[error("MACs not sorted, repeated, multicast or zero")]
    Malformed,
    #[error("more than {MAX_PEERS} peers' lists or {MAX_TOTAL} MACs in all")]
    Full,
}

impl ListError {
    /// Every label, for metrics.
    pub const LABELS: [&'static str; 5] = ["bad_signature", "unknown_key", "too_many", "malformed", "full"];

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ListError::Refused(Refused::UnknownKey { .. }) => "unknown_key",
            ListError::Refused(_) => "bad_signature",
            ListError::TooMany => "too_many",
            ListError::Malformed => "malformed",
            ListError::Full => "full",
        }
    }
}

impl MacList {
    fn check(&self) -> Result<(), ListError> {
        if self.macs.len() > MAX_PER_PEER {
            return Err(ListError::TooMany);
        }
        let valid = self.macs.iter().all(|(_, m)| Mac(*m).is_valid_source());
        let sorted = self.macs.windows(2).all(|w| w[0] < w[1]);
        if valid && sorted {
            Ok(())
        } else {
            Err(ListError::Malformed)
        }
    }
}

/// The channel's state: every peer's list, ours included.
pub struct Announcements {
    me: PeerName,
    signing: SigningKey,
    lists: BTreeMap<PeerName, SignedList>,
    /// The highest version of our own list seen from others (a previous life's), which ours
    /// must pass.
    own_seen: u64,
    /// Lists refused, by [`ListError::LABELS`].
    refused: [u64; ListError::LABELS.len()],
    changed: bool,
}

impl std::fmt::Debug for Announcements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcements").field("me", &self.me).field("lists", &self.lists.len()).finish()
    }
}

fn encode(lists: &[SignedList]) -> Vec<u8> {
    postcard::to_stdvec(lists).unwrap_or_default()
}

impl Announcements {
    /// The channel for peer `me`, whose lists `signing` signs.
    pub fn new(me: PeerName, signing: SigningKey) -> Self {
        Announcements { me, signing, lists: BTreeMap::new(), own_seen: 0, refused: [0; ListError::LABELS.len()], changed: false }
    }

    /// Replaces our own list with `macs` (invalid ones are left out, and past
    /// [`MAX_PER_PEER`] the rest). `version` should grow with time (the caller's wall clock in
    /// milliseconds) so a restarted router's list outranks its previous life's. Returns the
    /// delta to broadcast, or `None` when the list did not change.
    pub fn set_own(&mut self, macs: impl IntoIterator<Item = (u32, Mac)>, version: u64) -> Option<Vec<u8>> {
        let mut macs: Vec<(u32, [u8; 6])> = macs.into_iter().filter(|(_, m)| m.is_valid_source()).map(|(s, m)| (s, m.0)).collect();
        macs.sort_unstable();
        macs.dedup();
        macs.truncate(MAX_PER_PEER);
        let current = self.lists.get(&self.me).map(|s| (&s.list.macs, s.list.version));
        if current.is_some_and(|(m, _)| *m == macs) {
            return None;
        }
        let floor = current.map_or(0, |(_, v)| v).max(self.own_seen);
        let list = MacList { origin: self.me, version: version.max(floor + 1), macs };
        let sig = self.signing.sign(DOMAIN_MACS, &signed_bytes(&list));
        let signed = SignedList { list, sig };
        let delta = encode(std::slice::from_ref(&signed));
        self.lists.insert(self.me, signed);
        self.changed = true;
        Some(delta)
    }

    /// Whether the lists changed since the last call (then they are due to be published).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Each (segment, MAC) whose MAC exactly one peer announced, with that peer; ours and
    /// contested MACs (on any segment) are left out.
    pub fn owners(&self) -> HashMap<(u32, Mac), PeerName> {
        let mut by_mac: HashMap<Mac, Option<PeerName>> = HashMap::new();
        for (peer, s) in &self.lists {
            for (_, m) in &s.list.macs {
                let e = by_mac.entry(Mac(*m)).or_insert(Some(*peer));
                if *e != Some(*peer) {
                    *e = None;
                }
            }
        }
        let mut owners = HashMap::new();
        for (peer, s) in self.lists.iter().filter(|(p, _)| **p != self.me) {
            for (seg, m) in &s.list.macs {
                if by_mac.get(&Mac(*m)) == Some(&Some(*peer)) {
                    owners.insert((*seg, Mac(*m)), *peer);
                }
            }
        }
        owners
    }

    /// The peers on each segment: those announcing a MAC on it (ourselves included).
    pub fn members(&self) -> BTreeMap<u32, BTreeSet<PeerName>> {
        let mut members: BTreeMap<u32, BTreeSet<PeerName>> = BTreeMap::new();
        for (peer, s) in &self.lists {
            for (seg, _) in &s.list.macs {
                members.entry(*seg).or_default().insert(*peer);
            }
        }
        members
    }

    /// MACs that more than one peer announces (ourselves included), with the peers.
    pub fn conflicts(&self) -> BTreeMap<Mac, Vec<PeerName>> {
        let mut by_mac: BTreeMap<Mac, Vec<PeerName>> = BTreeMap::new();
        for (peer, s) in &self.lists {
            for (_, m) in &s.list.macs {
                let peers = by_mac.entry(Mac(*m)).or_default();
                if !peers.contains(peer) {
                    peers.push(*peer);
                }
            }
        }
        by_mac.retain(|_, peers| peers.len() > 1);
        by_mac
    }

    /// How many MACs `peer` announces.
    pub fn count(&self, peer: PeerName) -> usize {
        self.lists.get(&peer).map_or(0, |s| s.list.macs.len())
    }

    /// Lists refused so far, labelled.
    pub fn refused(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ListError::LABELS.iter().copied().zip(self.refused.iter().copied())
    }

    /// The peers with a list, ourselves included.
    pub fn origins(&self) -> impl Iterator<Item = PeerName> + '_ {
        self.lists.keys().copied()
    }

    /// Drops the lists of peers `keep` says are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(PeerName) -> bool) {
        let me = self.me;
        let before = self.lists.len();
        self.lists.retain(|p, _| *p == me || keep(*p));
        self.changed |= self.lists.len() != before;
    }

    /// Takes one list if it verifies and is newer; `Ok(true)` when it was.
    fn take(&mut self, s: SignedList, keys: &Keys) -> Result<bool, ListError> {
        let origin = s.list.origin;
        if origin == self.me {
            self.own_seen = self.own_seen.max(s.list.version);
            return Ok(false);
        }
        if self.lists.get(&origin).is_some_and(|have| have.list.version >= s.list.version) {
            return Ok(false);
        }
        s.list.check()?;
        keys.verify(origin, DOMAIN_MACS, &signed_bytes(&s.list), &s.sig, "MAC list").map_err(ListError::Refused)?;
        let replaced = self.lists.get(&origin).map_or(0, |l| l.list.macs.len());
        let total: usize = self.lists.values().map(|l| l.list.macs.len()).sum::<usize>() - replaced + s.list.macs.len();
        if (replaced == 0 && !self.lists.contains_key(&origin) && self.lists.len() >= MAX_PEERS) || total > MAX_TOTAL {
            return Err(ListError::Full);
        }
        self.lists.insert(origin, s);
        self.changed = true;
        Ok(true)
    }
}

impl GossipChannel for Announcements {
    fn encode_full(&self) -> Vec<u8> {
        if self.lists.is_empty() {
            return Vec::new();
        }
        encode(&self.lists.values().cloned().collect::<Vec<_>>())
    }

    fn merge(&mut self, _from: PeerName, payload: &[u8], keys: &Keys) -> Result<Option<Vec<u8>>, String> {
        let lists: Vec<SignedList> =
            postcard::from_bytes(payload).map_err(|e| format!("MAC lists that do not decode: {e}"))?;
        let mut new = Vec::new();
        for s in lists {
            match self.take(s.clone(), keys) {
                Ok(true) => new.push(s),
                Ok(false) => {}
                Err(e) => {
                    if let Some(i) = ListError::LABELS.iter().position(|l| *l == e.label()) {
                        self.refused[i] += 1;
                    }
                }
            }
        }
        Ok((!new.is_empty()).then(|| encode(&new)))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::Claim;

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }

    fn key(i: u8) -> SigningKey {
        SigningKey::from_seed(&[i; 32]).unwrap()
    }

    /// Keys with peers 1..=3 bound to key(1..=3).
    fn keys() -> Keys {
        let mut k = Keys::new(crate::identity::Trust::FirstUse);
        for i in 1..=3u8 {
            k.admit(&Claim::self_signed(&key(i), n(u64::from(i)))).unwrap();
        }
        k
    }

    fn mac(i: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, i])
    }

    /// MAC `i` on the default network.
    fn d(i: u8) -> (u32, Mac) {
        (0, mac(i))
    }

    fn chan(i: u8) -> Announcements {
        Announcements::new(n(u64::from(i)), key(i))
    }

    #[test]
    fn a_list_travels_verified_and_gives_its_macs_to_its_peer() {
        let (mut a, mut b) = (chan(1), chan(2));
        let delta = a.set_own([d(2), d(1), d(1), (0, Mac([1, 0, 0, 0, 0, 1])), (0, Mac([0; 6]))], 100).unwrap();
        assert!(a.set_own([d(1), d(2)], 200).is_none(), "an unchanged list is not sent again");
        let passed = b.merge(n(1), &delta, &keys()).unwrap();
        assert!(passed.is_some(), "a new list is passed on");
        assert_eq!(b.merge(n(1), &delta, &keys()).unwrap(), None, "and only once");
        let owners = b.owners();
        assert_eq!(owners.len(), 2, "multicast and zero MACs are left out: {owners:?}");
        assert_eq!(owners[&d(1)], n(1));
        assert!(a.owners().is_empty(), "our own MACs belong to no peer");
        assert!(b.take_changed() && !b.take_changed());
    }

    #[test]
    fn a_forged_or_altered_list_is_refused() {
        let mut b = chan(2);
        // Peer 3 signs a list in peer 1's name.
        let list = MacList { origin: n(1), version: 5, macs: vec![(0, mac(9).0)] };
        let sig = key(3).sign(DOMAIN_MACS, &signed_bytes(&list));
        assert_eq!(b.merge(n(3), &encode(&[SignedList { list, sig }]), &keys()).unwrap(), None);
        // Peer 1's own list, altered on the way.
        let mut a = chan(1);
        let delta = a.set_own([d(1)], 10).unwrap();
        let mut lists: Vec<SignedList> = postcard::from_bytes(&delta).unwrap();
        lists[0].list.macs = vec![(0, mac(9).0)];
        assert_eq!(b.merge(n(3), &encode(&lists), &keys()).unwrap(), None);
        // A name without a bound key.
        let list = MacList { origin: n(7), version: 5, macs: vec![(0, mac(9).0)] };
        let sig = key(7).sign(DOMAIN_MACS, &signed_bytes(&list));
        assert_eq!(b.merge(n(3), &encode(&[SignedList { list, sig }]), &keys()).unwrap(), None);
        assert!(b.owners().is_empty());
        let refused: BTreeMap<_, _> = b.refused().collect();
        assert_eq!((refused["bad_signature"], refused["unknown_key"]), (2, 1));
        assert!(b.merge(n(3), b"\xff\xff\xff", &keys()).is_err(), "a payload that does not decode is refused whole");
    }

    #[test]
    fn unsorted_and_oversized_lists_are_refused_even_when_signed() {
        let mut b = chan(2);
        let signed = |macs: Vec<(u32, [u8; 6])>| {
            let list = MacList { origin: n(1), version: 5, macs };
            let sig = key(1).sign(DOMAIN_MACS, &signed_bytes(&list));
            encode(&[SignedList { list, sig }])
        };
        assert_eq!(b.merge(n(1), &signed(vec![(0, mac(2).0), (0, mac(1).0)]), &keys()).unwrap(), None);
        assert_eq!(b.merge(n(1), &signed(vec![(0, mac(1).0), (0, mac(1).0)]), &keys()).unwrap(), None);
        let many: Vec<(u32, [u8; 6])> = (0..=MAX_PER_PEER as u32).map(|i| { let b = i.to_be_bytes(); (0, [2, 0, b[0], b[1], b[2], b[3]]) }).collect();
        assert_eq!(b.merge(n(1), &signed(many), &keys()).unwrap(), None);
        let refused: BTreeMap<_, _> = b.refused().collect();
        assert_eq!((refused["malformed"], refused["too_many"]), (2, 1));
    }

    #[test]
    fn a_contested_mac_belongs_to_nobody_and_a_newer_list_replaces_the_old() {
        let (mut a, mut c, mut b) = (chan(1), chan(3), chan(2));
        b.merge(n(1), &a.set_own([d(1), d(2)], 10).unwrap(), &keys()).unwrap();
        // Peer 3 claims peer 1's MAC 2 too: it goes to neither.
        b.merge(n(3), &c.set_own([(7, mac(2)), d(3)], 10).unwrap(), &keys()).unwrap();
        let owners = b.owners();
        assert_eq!((owners.get(&d(1)), owners.get(&d(2)), owners.get(&(7, mac(2))), owners.get(&d(3))), (Some(&n(1)), None, None, Some(&n(3))));
        assert_eq!(b.conflicts()[&mac(2)], vec![n(1), n(3)]);
        // A MAC of ours that a peer announces is not given to it either.
        b.set_own([d(3)], 10);
        assert_eq!(b.owners().get(&d(3)), None);
        // Peer 1 drops MAC 1; an old copy of its list arriving later changes nothing.
        let old = a.encode_full();
        b.merge(n(1), &a.set_own([d(2)], 11).unwrap(), &keys()).unwrap();
        b.merge(n(1), &old, &keys()).unwrap();
        assert_eq!(b.owners().get(&d(1)), None);
        assert_eq!(b.count(n(1)), 1);
        b.retain(|p| p != n(1));
        assert_eq!(b.count(n(1)), 0);
    }

    #[test]
    fn a_peer_is_a_member_of_the_networks_it_announces_macs_on() {
        let (mut a, mut c, mut b) = (chan(1), chan(3), chan(2));
        b.merge(n(1), &a.set_own([d(1), (5, mac(2))], 10).unwrap(), &keys()).unwrap();
        b.merge(n(3), &c.set_own([(5, mac(3)), (6, mac(4))], 10).unwrap(), &keys()).unwrap();
        b.set_own([(6, mac(5))], 10);
        let m = b.members();
        let set = |p: &[u64]| p.iter().map(|i| n(*i)).collect::<BTreeSet<_>>();
        assert_eq!((m[&0].clone(), m[&5].clone(), m[&6].clone()), (set(&[1]), set(&[1, 3]), set(&[2, 3])));
        // Peer 1's last MAC on 5 goes: it leaves 5.
        b.merge(n(1), &a.set_own([d(1)], 11).unwrap(), &keys()).unwrap();
        assert_eq!(b.members()[&5], set(&[3]));
        // The owner of a MAC is known per network: peer 3's MAC 3 is on 5, not on 6.
        assert_eq!(b.owners().get(&(5, mac(3))), Some(&n(3)));
        assert_eq!(b.owners().get(&(6, mac(3))), None);
    }

    #[test]
    fn a_restarted_peer_outranks_its_previous_life_even_with_a_clock_behind() {
        let mut old = chan(1);
        let before = old.set_own([d(1)], 1_000).unwrap();
        let mut new = chan(1);
        // The new life hears of its old list first (from a neighbour).
        new.merge(n(2), &before, &keys()).unwrap();
        let delta = new.set_own([d(5)], 500).unwrap();
        let mut b = chan(2);
        b.merge(n(1), &before, &keys()).unwrap();
        b.merge(n(1), &delta, &keys()).unwrap();
        assert_eq!(b.owners().get(&d(5)), Some(&n(1)));
        assert_eq!(b.owners().get(&d(1)), None);
    }
}
