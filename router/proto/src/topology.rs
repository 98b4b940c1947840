//! Topology: who is connected to whom, as a CRDT that merges by gossip, and
//! the routes computed from it.
//!
//! Each peer is the only writer of its own [`PeerInfo`], and signs it with its identity key;
//! an entry is merged only if its signature verifies against the key bound to its name (see
//! [`crate::identity`]). An entry with a higher `(version, uid)` replaces an older one, so
//! merging is a last-writer-wins map, which is commutative, associative and idempotent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::identity::{signed_bytes, Keys, Refused, Signature, SigningKey, DOMAIN_TOPOLOGY};
use crate::PeerName;

/// Upper bound on peers kept from gossip; more is treated as a misbehaving peer.
pub const MAX_PEERS: usize = 4096;
/// Upper bound on connections one peer may announce.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4096;
/// Upper bound on a nickname's length in bytes.
pub const MAX_NICKNAME: usize = 64;
/// Upper bound on the addresses one peer announces for itself.
pub const MAX_ADDRS: usize = 16;
/// The cost a connection without a measured round-trip time counts as, in microseconds.
pub const UNKNOWN_RTT_US: u32 = 50_000;
/// What each hop adds to a route's cost, in microseconds (relaying costs the relay).
pub const HOP_COST_US: u64 = 200;
/// Round trips below this count as this much: on a fast LAN the differences are noise, and
/// the route with fewer hops should win.
pub const RTT_FLOOR_US: u32 = 1_000;

/// One peer's own view of itself, as gossiped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Stable name.
    pub name: PeerName,
    /// Human-friendly name (hostname by default).
    pub nickname: String,
    /// Changes on every start of the router, so peers notice restarts.
    pub uid: u64,
    /// Bumped on every change of this entry by its owner.
    pub version: u64,
    /// Connections this peer has, keyed by the remote peer.
    pub connections: BTreeMap<PeerName, ConnectionInfo>,
    /// Where this peer says it can be dialled: the only addresses discovery dials for it.
    pub addrs: Vec<SocketAddr>,
    /// Where its peers see its sleeve datagrams come from, when that is not one of `addrs`
    /// (the outside of a NAT): dialled over UDP only (QUIC), for a hole punched by both ends.
    pub udp: Vec<SocketAddr>,
    /// The peer's signature of all the fields above.
    pub sig: Signature,
}

/// One connection as announced by the peer that holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Where the remote peer listens, as far as this end knows; used for discovery.
    pub addr: Option<SocketAddr>,
    /// Whether this end dialed the connection.
    pub outbound: bool,
    /// Whether the data path (sleeve heartbeats) works both ways.
    pub established: bool,
    /// The connection's round-trip time as this end measures it, in microseconds (`None`:
    /// not measured yet). Unicast routes prefer the lowest total.
    pub rtt_us: Option<u32>,
}

impl PeerInfo {
    fn key(&self) -> (u64, u64) {
        (self.version, self.uid)
    }

    fn signed_part(&self) -> Vec<u8> {
        signed_bytes(&(self.name, &self.nickname, self.uid, self.version, &self.connections, &self.addrs, &self.udp))
    }

    /// Signs the entry with its owner's key.
    pub fn sign(&mut self, key: &SigningKey) {
        self.sig = key.sign(DOMAIN_TOPOLOGY, &self.signed_part());
    }

    /// Checks the signature against the key bound to the entry's name.
    pub fn verify(&self, keys: &Keys) -> Result<(), Refused> {
        keys.verify(self.name, DOMAIN_TOPOLOGY, &self.signed_part(), &self.sig, "topology entry")
    }

    fn validate(&self) -> Result<(), TopologyError> {
        if self.nickname.len() > MAX_NICKNAME {
            return Err(TopologyError::Invalid(format!(
                "peer {} has a nickname of {} bytes (max {MAX_NICKNAME})",
                self.name,
                self.nickname.len()
            )));
        }
        if self.connections.len() > MAX_CONNECTIONS_PER_PEER {
            return Err(TopologyError::Invalid(format!(
                "peer {} announces {} connections (max {MAX_CONNECTIONS_PER_PEER})",
                self.name,
                self.connections.len()
            )));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(TopologyError::Invalid(format!(
                "peer {} announces {} addresses (max {MAX_ADDRS})",
                self.name,
                self.addrs.len()
            )));
        }
        if self.udp.len() > MAX_ADDRS {
            return Err(TopologyError::Invalid(format!(
                "peer {} announces {} outside UDP addresses (max {MAX_ADDRS})",
                self.name,
                self.udp.len()
            )));
        }
        if self.connections.contains_key(&self.name) {
            return Err(TopologyError::Invalid(format!(
                "peer {} announces a connection to itself",
                self.name
            )));
        }
        Ok(())
    }
}

/// Why a topology update was refused. Nothing of a refused update is applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TopologyError {
    /// The payload did not decode.
    #[error("malformed topology gossip: {0}")]
    Malformed(String),
    /// The payload decoded but breaks a limit or a rule.
    #[error("invalid topology gossip: {0}")]
    Invalid(String),
}

/// What a merge did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// The entries that were new: the delta to pass on.
    pub delta: Vec<PeerInfo>,
    /// Entries dropped because their signature did not verify against the key bound to their
    /// name (forged, or made with another key): never merged, never passed on.
    pub forged: Vec<Refused>,
    /// Entries dropped because no key is bound to their name yet; anti-entropy brings them
    /// again once the name's claim has arrived.
    pub unverified: usize,
}

/// The set of known peers, including this one.
#[derive(Clone, Debug)]
pub struct Topology {
    me: PeerName,
    peers: BTreeMap<PeerName, PeerInfo>,
    signer: SigningKey,
}

impl Topology {
    /// A topology that knows only `me`, whose entry `signer` signs (now and on every change).
    pub fn new(mut me: PeerInfo, signer: SigningKey) -> Self {
        let name = me.name;
        me.sign(&signer);
        let mut peers = BTreeMap::new();
        peers.insert(name, me);
        Topology { me: name, peers, signer }
    }

    /// Replaces the key our entry is signed with (a deliberate re-key) and re-signs it.
    pub fn set_signer(&mut self, signer: SigningKey) {
        self.signer = signer;
        self.bump_mine();
    }

    fn bump_mine(&mut self) {
        let signer = self.signer.clone();
        let me = self.peers.entry(self.me).or_insert_with(|| unreachable_entry(self.me));
        me.version += 1;
        me.sign(&signer);
    }

    /// This peer's name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// This peer's own entry.
    pub fn my_info(&self) -> &PeerInfo {
        // Invariant: our own entry is inserted in `new` and never removed.
        &self.peers[&self.me]
    }

    /// All known peers, ordered by name.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values()
    }

    /// One peer's entry.
    pub fn get(&self, name: PeerName) -> Option<&PeerInfo> {
        self.peers.get(&name)
    }

    /// Number of known peers, including this one.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Always false: a topology knows at least itself.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Replaces this peer's connection list, bumping the version when it changed.
    /// Returns whether anything changed.
    pub fn set_my_connections(&mut self, conns: BTreeMap<PeerName, ConnectionInfo>) -> bool {
        let me = self.peers.entry(self.me).or_insert_with(|| unreachable_entry(self.me));
        if me.connections == conns {
            return false;
        }
        me.connections = conns;
        self.bump_mine();
        true
    }

    /// Replaces the addresses we announce for ourselves, bumping the version when they
    /// changed (at most [`MAX_ADDRS`] are kept). Returns whether anything changed.
    pub fn set_my_addrs(&mut self, addrs: Vec<SocketAddr>) -> bool {
        self.set_my_list(|p| &mut p.addrs, addrs)
    }

    /// Replaces the outside UDP addresses we announce (see [`PeerInfo::udp`]; at most
    /// [`MAX_ADDRS`]). Returns whether anything changed.
    pub fn set_my_udp(&mut self, udp: Vec<SocketAddr>) -> bool {
        self.set_my_list(|p| &mut p.udp, udp)
    }

    /// Sets one address list of our entry (sorted, without repeats, at most [`MAX_ADDRS`]),
    /// bumping the version when it changed.
    fn set_my_list(&mut self, list: fn(&mut PeerInfo) -> &mut Vec<SocketAddr>, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort();
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        let me = self.peers.entry(self.me).or_insert_with(|| unreachable_entry(self.me));
        if *list(me) == addrs {
            return false;
        }
        *list(me) = addrs;
        self.bump_mine();
        true
    }

    /// Encodes entries for the wire.
    pub fn encode(entries: &[PeerInfo]) -> Vec<u8> {
        postcard::to_stdvec(entries).unwrap_or_default()
    }

    /// Decodes and merges a gossip payload; returns the entries that were new
    /// (the delta to pass on) and those dropped. A payload that fails to decode or validate is
    /// refused whole and changes nothing; an entry whose signature does not verify against
    /// `keys` is dropped alone.
    pub fn merge_payload(&mut self, payload: &[u8], keys: &Keys) -> Result<Merged, TopologyError> {
        let entries: Vec<PeerInfo> =
            postcard::from_bytes(payload).map_err(|e| TopologyError::Malformed(e.to_string()))?;
        self.merge(entries, keys)
    }

    /// Merges entries. See [`Topology::merge_payload`]. Only entries that would change our
    /// state are verified, so gossip of what we hold costs no signature check.
    pub fn merge(&mut self, entries: Vec<PeerInfo>, keys: &Keys) -> Result<Merged, TopologyError> {
        if entries.len() > MAX_PEERS {
            return Err(TopologyError::Invalid(format!(
                "{} entries in one update (max {MAX_PEERS})",
                entries.len()
            )));
        }
        for e in &entries {
            e.validate()?;
        }
        let mut out = Merged::default();
        for e in entries {
            if e.name == self.me {
                // An entry for us that outranks ours comes from a previous life of this
                // peer, signed with our key. Our current entry must win, so jump past it
                // and announce ourselves again. One signed with another key is a forgery.
                let mine = &self.peers[&self.me];
                if e.key() >= mine.key() && e.uid != mine.uid {
                    if let Err(r) = e.verify(keys) {
                        out.forged.push(r);
                        continue;
                    }
                    let signer = self.signer.clone();
                    let me = self.peers.entry(self.me).or_insert_with(|| unreachable_entry(self.me));
                    me.version = e.version + 1;
                    me.sign(&signer);
                    out.delta.push(me.clone());
                }
                continue;
            }
            match self.peers.get(&e.name) {
                Some(old) if old.key() >= e.key() => {}
                _ => {
                    match e.verify(keys) {
                        Ok(()) => {}
                        Err(Refused::UnknownKey { .. }) => {
                            out.unverified += 1;
                            continue;
                        }
                        Err(r) => {
                            out.forged.push(r);
                            continue;
                        }
                    }
                    if !self.peers.contains_key(&e.name) && self.peers.len() >= MAX_PEERS {
                        return Err(TopologyError::Invalid(format!(
                            "topology would exceed {MAX_PEERS} peers"
                        )));
                    }
                    self.peers.insert(e.name, e.clone());
                    out.delta.push(e);
                }
            }
        }
        Ok(out)
    }

    /// `(name, version, uid)` of every entry, in name order: what periodic
    /// anti-entropy exchanges instead of whole entries.
    pub fn digest(&self) -> Vec<(PeerName, u64, u64)> {
        self.peers.values().map(|p| (p.name, p.version, p.uid)).collect()
    }

    /// Our entries that outrank the digest's, or that it lacks.
    pub fn newer_than(&self, digest: &[(PeerName, u64, u64)]) -> Vec<PeerInfo> {
        let theirs: BTreeMap<PeerName, (u64, u64)> = digest.iter().map(|(n, v, u)| (*n, (*v, *u))).collect();
        self.peers.values().filter(|p| theirs.get(&p.name).is_none_or(|k| *k < p.key())).cloned().collect()
    }

    /// Whether the digest names an entry that outranks ours or that we lack.
    pub fn lacks(&self, digest: &[(PeerName, u64, u64)]) -> bool {
        digest.iter().any(|(n, v, u)| self.peers.get(n).is_none_or(|p| p.key() < (*v, *u)))
    }

    /// Drops a peer's entry at once (its key was revoked). Returns whether it was known.
    pub fn forget(&mut self, name: PeerName) -> bool {
        name != self.me && self.peers.remove(&name).is_some()
    }

    /// Removes peers that can no longer be reached from this one, following the
    /// connections each peer announces. Returns the removed names.
    pub fn gc(&mut self) -> Vec<PeerName> {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([self.me]);
        seen.insert(self.me);
        while let Some(p) = queue.pop_front() {
            if let Some(info) = self.peers.get(&p) {
                for n in info.connections.keys() {
                    if seen.insert(*n) {
                        queue.push_back(*n);
                    }
                }
            }
        }
        let gone: Vec<PeerName> = self.peers.keys().filter(|p| !seen.contains(p)).copied().collect();
        for p in &gone {
            self.peers.remove(p);
        }
        gone
    }

    /// Whether `a` and `b` both announce an established connection to each other.
    pub fn confirmed(&self, a: PeerName, b: PeerName) -> bool {
        let half = |x: PeerName, y: PeerName| {
            self.peers
                .get(&x)
                .and_then(|i| i.connections.get(&y))
                .is_some_and(|c| c.established)
        };
        half(a, b) && half(b, a)
    }

    /// Peers in name order, and for each the indices of its neighbours over
    /// confirmed connections, in name order. Built once per route computation
    /// so each search is over plain indices.
    fn confirmed_graph(&self) -> (Vec<PeerName>, Vec<Vec<usize>>) {
        let names: Vec<PeerName> = self.peers.keys().copied().collect();
        let index: BTreeMap<PeerName, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let adj = names
            .iter()
            .map(|p| {
                self.peers[p]
                    .connections
                    .keys()
                    .filter(|n| self.confirmed(*p, **n))
                    .filter_map(|n| index.get(n).copied())
                    .collect()
            })
            .collect();
        (names, adj)
    }

    /// The cost of the confirmed connection `a`–`b` for unicast routes, in microseconds: the
    /// larger of the two ends' round-trip times (both ends announce theirs, so every peer
    /// computes the same figure, and neither end can make a link look faster than the other
    /// measures it), or [`UNKNOWN_RTT_US`] while neither is known, at least [`RTT_FLOOR_US`],
    /// plus [`HOP_COST_US`] so that of paths about as fast the one with fewer hops wins.
    pub fn link_cost(&self, a: PeerName, b: PeerName) -> u64 {
        let rtt = |x: PeerName, y: PeerName| self.peers.get(&x).and_then(|i| i.connections.get(&y)).and_then(|c| c.rtt_us);
        let known = rtt(a, b).into_iter().chain(rtt(b, a)).max();
        u64::from(known.unwrap_or(UNKNOWN_RTT_US).max(RTT_FLOOR_US)) + HOP_COST_US
    }

    /// Least-cost tree from `root` ([`Topology::link_cost`], Dijkstra): the parent of each
    /// reached peer (`usize::MAX` for unreached; the root is its own parent). Ties go to the
    /// lower index, so every peer holding the same topology computes the same tree; each hop
    /// along a route is strictly closer to the destination, so routes have no loops.
    fn cheapest_tree(&self, names: &[PeerName], adj: &[Vec<usize>], root: usize) -> Vec<usize> {
        let mut parent = vec![usize::MAX; adj.len()];
        let mut dist = vec![u64::MAX; adj.len()];
        let mut heap = std::collections::BinaryHeap::new();
        dist[root] = 0;
        parent[root] = root;
        heap.push(std::cmp::Reverse((0u64, root)));
        while let Some(std::cmp::Reverse((d, p))) = heap.pop() {
            if d > dist[p] {
                continue;
            }
            for &n in &adj[p] {
                let nd = d.saturating_add(self.link_cost(names[p], names[n]));
                if nd < dist[n] || (nd == dist[n] && p < parent[n]) {
                    dist[n] = nd;
                    parent[n] = p;
                    heap.push(std::cmp::Reverse((nd, n)));
                }
            }
        }
        parent
    }

    /// Breadth-first tree from `root` over the graph: the parent of each reached
    /// peer (`usize::MAX` for unreached; the root is its own parent). Neighbours
    /// are visited in name order so every peer holding the same topology
    /// computes the same tree.
    fn bfs_tree(adj: &[Vec<usize>], root: usize) -> Vec<usize> {
        let mut parent = vec![usize::MAX; adj.len()];
        let mut queue = VecDeque::from([root]);
        parent[root] = root;
        while let Some(p) = queue.pop_front() {
            for &n in &adj[p] {
                if parent[n] == usize::MAX {
                    parent[n] = p;
                    queue.push_back(n);
                }
            }
        }
        parent
    }

    /// Computes unicast and broadcast routes for this peer.
    pub fn routes(&self) -> Routes {
        self.routes_within(None)
    }

    /// Routes for one segment (a named network) whose hosts are `members`: unicast as
    /// [`Topology::routes`], and each broadcast tree pruned to the branches that lead to a
    /// member, so a broadcast reaches the members and no host beyond them (hosts in between
    /// still pass it on).
    pub fn routes_for(&self, members: &BTreeSet<PeerName>) -> Routes {
        self.routes_within(Some(members))
    }

    fn routes_within(&self, members: Option<&BTreeSet<PeerName>>) -> Routes {
        let (names, adj) = self.confirmed_graph();
        let Some(me) = names.iter().position(|n| *n == self.me) else { return Routes { me: self.me, ..Routes::default() } };
        // Unicast: the cheapest path by round-trip time; broadcast: hop-count trees per source.
        let cheapest = self.cheapest_tree(&names, &adj, me);
        let tree = Self::bfs_tree(&adj, me);
        let mut unicast = BTreeMap::new();
        for dest in 0..names.len() {
            if dest == me || cheapest[dest] == usize::MAX {
                continue;
            }
            // Walk up to the child of the root on the path to `dest`.
            let mut hop = dest;
            while cheapest[hop] != me {
                hop = cheapest[hop];
            }
            unicast.insert(names[dest], names[hop]);
        }
        let mut broadcast = BTreeMap::new();
        for src in (0..names.len()).filter(|s| tree[*s] != usize::MAX) {
            let t = Self::bfs_tree(&adj, src);
            // Which peers have a member at or below them in the source's tree.
            let leads: Option<Vec<bool>> = members.map(|m| {
                let mut leads = vec![false; names.len()];
                for (i, _) in names.iter().enumerate().filter(|(i, n)| m.contains(n) && t[*i] != usize::MAX) {
                    let mut at = i;
                    while !leads[at] {
                        leads[at] = true;
                        if t[at] == at {
                            break;
                        }
                        at = t[at];
                    }
                }
                leads
            });
            // Our children in the source's tree, in name order.
            let children: Vec<PeerName> = adj[me]
                .iter()
                .filter(|c| **c != src && t[**c] == me && leads.as_ref().is_none_or(|l| l[**c]))
                .map(|c| names[*c])
                .collect();
            broadcast.insert(names[src], children);
        }
        Routes { me: self.me, unicast, broadcast }
    }
}

fn unreachable_entry(name: PeerName) -> PeerInfo {
    PeerInfo {
        name,
        nickname: String::new(),
        uid: 0,
        version: 0,
        connections: BTreeMap::new(),
        addrs: Vec::new(),
        udp: Vec::new(),
        sig: Signature([0; 64]),
    }
}

/// Where to send frames, as computed from one topology.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// The peer these routes are for.
    pub me: PeerName,
    /// Destination peer → the directly connected peer to hand frames to.
    pub unicast: BTreeMap<PeerName, PeerName>,
    /// Source peer → the directly connected peers to pass its broadcasts to
    /// (this peer's children in the source's tree).
    pub broadcast: BTreeMap<PeerName, Vec<PeerName>>,
}

impl Routes {
    /// Next hop towards `dest`, if reachable.
    pub fn next_hop(&self, dest: PeerName) -> Option<PeerName> {
        self.unicast.get(&dest).copied()
    }

    /// Peers to pass a broadcast from `src` on to.
    pub fn broadcast_hops(&self, src: PeerName) -> &[PeerName] {
        self.broadcast.get(&src).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Claim, Trust};

    fn n(i: u64) -> PeerName {
        PeerName::from_u64(i)
    }

    fn key(i: u64) -> SigningKey {
        SigningKey::from_seed(&[i as u8; 32]).expect("key")
    }

    /// Keys bound for peers 1 to 9.
    fn keys() -> Keys {
        let mut k = Keys::new(Trust::FirstUse);
        for i in 1..10 {
            k.admit(&Claim::self_signed(&key(i), n(i))).expect("admit");
        }
        k
    }

    fn topo(me: u64) -> Topology {
        Topology::new(info(me, 1, &[]), key(me))
    }

    /// Peer `i`'s entry, signed by it.
    fn info(i: u64, version: u64, conns: &[u64]) -> PeerInfo {
        let mut p = unsigned(i, version, conns);
        p.sign(&key(i));
        p
    }

    fn unsigned(i: u64, version: u64, conns: &[u64]) -> PeerInfo {
        PeerInfo {
            name: n(i),
            nickname: format!("p{i}"),
            uid: i * 1000,
            version,
            connections: conns
                .iter()
                .map(|c| (n(*c), ConnectionInfo { addr: None, outbound: true, established: true, rtt_us: None }))
                .collect(),
            addrs: Vec::new(),
            udp: Vec::new(),
            sig: Signature([0; 64]),
        }
    }

    /// A line 1-2-3-4 as seen by peer `me`.
    fn line(me: u64) -> Topology {
        let mut t = topo(me);
        let all = [info(1, 1, &[2]), info(2, 1, &[1, 3]), info(3, 1, &[2, 4]), info(4, 1, &[3])];
        t.merge(all.iter().filter(|p| p.name != n(me)).cloned().collect(), &keys()).expect("merge");
        let mine = all.iter().find(|p| p.name == n(me)).expect("me").connections.clone();
        t.set_my_connections(mine);
        t
    }

    #[test]
    fn newer_version_wins_and_delta_is_what_changed() {
        let mut t = topo(1);
        let d = t.merge_keys(vec![info(2, 5, &[1])]).expect("merge").delta;
        assert_eq!(d.len(), 1);
        assert!(t.merge_keys(vec![info(2, 4, &[])]).expect("merge").delta.is_empty());
        assert!(t.merge_keys(vec![info(2, 5, &[1])]).expect("merge").delta.is_empty());
        assert_eq!(t.get(n(2)).expect("p2").version, 5);
    }

    #[test]
    fn stale_self_entry_from_previous_life_is_outranked() {
        let mut t = topo(1);
        let mut old = unsigned(1, 9, &[2]);
        old.uid = 42;
        old.sign(&key(1));
        let d = t.merge_keys(vec![old]).expect("merge").delta;
        assert_eq!(d.len(), 1);
        assert_eq!(t.my_info().version, 10);
        assert!(t.my_info().connections.is_empty());
    }

    impl Topology {
        fn merge_keys(&mut self, entries: Vec<PeerInfo>) -> Result<Merged, TopologyError> {
            self.merge(entries, &keys())
        }
    }

    #[test]
    fn forged_entries_are_dropped_and_ours_cannot_be_taken() {
        let mut t = topo(1);
        t.merge_keys(vec![info(2, 5, &[1])]).expect("merge");
        // Peer 3 writes peer 2's entry with a higher version (and 2's UID): refused.
        let mut forged = unsigned(2, u64::MAX, &[3]);
        forged.sign(&key(3));
        let m = t.merge_keys(vec![forged.clone(), info(3, 1, &[1])]).expect("merge");
        assert_eq!(m.forged.len(), 1);
        assert_eq!(m.delta, vec![info(3, 1, &[1])], "the honest entry alongside still merges");
        assert_eq!(t.get(n(2)).expect("p2").version, 5);
        // A tampered field breaks 2's own signature.
        let mut tampered = info(2, 6, &[1]);
        tampered.connections.clear();
        assert_eq!(t.merge_keys(vec![tampered]).expect("merge").forged.len(), 1);
        // An entry in our name with another key, however high its version, changes nothing.
        let mut mine = unsigned(1, u64::MAX - 1, &[3]);
        mine.uid = 7;
        mine.sign(&key(3));
        let m = t.merge_keys(vec![mine]).expect("merge");
        assert_eq!(m.forged.len(), 1);
        assert!(m.delta.is_empty());
        assert_eq!(t.my_info().version, 1);
        // A name with no bound key yet waits.
        let mut stranger = unsigned(42, 1, &[]);
        stranger.sign(&key(42));
        let m = t.merge_keys(vec![stranger]).expect("merge");
        assert_eq!((m.unverified, m.delta.len()), (1, 0));
        // Our own entry stays verifiable by others after every change.
        t.set_my_connections(info(1, 2, &[2]).connections);
        t.set_my_addrs(vec!["10.0.0.1:6783".parse().expect("addr")]);
        assert_eq!(t.my_info().verify(&keys()), Ok(()));
    }

    #[test]
    fn invalid_update_changes_nothing() {
        let mut t = topo(1);
        let mut bad = info(3, 1, &[]);
        bad.nickname = "x".repeat(MAX_NICKNAME + 1);
        assert!(t.merge_keys(vec![info(2, 1, &[1]), bad]).is_err());
        assert_eq!(t.len(), 1);
        assert!(matches!(t.merge_payload(&[0xff, 0xff, 0xff], &keys()), Err(TopologyError::Malformed(_))));
        assert!(t.merge_keys(vec![info(2, 1, &[2])]).is_err(), "self-connection refused");
    }

    #[test]
    fn routes_on_a_line() {
        let t = line(1);
        let r = t.routes();
        assert_eq!(r.next_hop(n(4)), Some(n(2)));
        assert_eq!(r.next_hop(n(2)), Some(n(2)));
        assert_eq!(r.broadcast_hops(n(1)), &[n(2)]);
        // Peer 2 passes 1's broadcasts on to 3 only.
        assert_eq!(line(2).routes().broadcast_hops(n(1)), &[n(3)]);
        assert!(line(4).routes().broadcast_hops(n(1)).is_empty());
    }

    #[test]
    fn a_segments_broadcasts_reach_its_members_and_stop_there() {
        let members = |m: &[u64]| m.iter().map(|i| n(*i)).collect::<BTreeSet<_>>();
        // On the line 1-2-3-4, a segment of 1 and 2: 2 keeps 1's broadcasts (3 and 4 are not
        // members); with 4 a member, 2 passes them on through 3, which is not one.
        let r = line(2).routes_for(&members(&[1, 2]));
        assert!(r.broadcast_hops(n(1)).is_empty());
        assert_eq!(r.broadcast_hops(n(4)), &[n(1)]);
        assert_eq!(line(2).routes_for(&members(&[1, 4])).broadcast_hops(n(1)), &[n(3)]);
        assert_eq!(line(3).routes_for(&members(&[1, 4])).broadcast_hops(n(1)), &[n(4)]);
        assert_eq!(line(1).routes_for(&members(&[1])).broadcast_hops(n(1)), &[] as &[PeerName]);
        // Unicast is the mesh's.
        assert_eq!(line(1).routes_for(&members(&[1])).unicast, line(1).routes().unicast);
        // Every member is a member of the full routes.
        assert_eq!(line(2).routes_for(&members(&[1, 2, 3, 4])), line(2).routes());
    }

    #[test]
    fn unconfirmed_connections_carry_no_traffic() {
        let mut t = topo(1);
        t.merge_keys(vec![info(2, 1, &[])]).expect("merge");
        t.set_my_connections(info(1, 2, &[2]).connections);
        assert_eq!(t.routes().next_hop(n(2)), None);
    }

    #[test]
    fn gc_drops_unreachable_peers() {
        let mut t = line(1);
        // 2 drops its link to 3: 3 and 4 become unreachable from 1.
        t.merge_keys(vec![info(2, 2, &[1])]).expect("merge");
        let mut gone = t.gc();
        gone.sort();
        assert_eq!(gone, vec![n(3), n(4)]);
    }
}
