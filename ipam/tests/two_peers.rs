//! Two peers wired as the router wires them: a merge's delta goes to every
//! neighbour except the one it came from (with two peers: nowhere), a
//! broadcast to every neighbour, a unicast to its peer. No anti-entropy runs,
//! so consensus and donation must complete on the messages alone.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use weft_ipam::{Cidr, Config, Init, Ipam, Output, Want};
use weft_proto::identity::Claim;
use weft_proto::{GossipChannel, Keys, PeerName, SigningKey, Trust};

fn key(i: u64) -> SigningKey {
    SigningKey::from_seed(&[i as u8; 32]).unwrap_or_else(|e| panic!("{e}"))
}

/// Both peers' keys bound to their names, as the routers bind them.
fn keys() -> Keys {
    let mut keys = Keys::new(Trust::FirstUse);
    for i in 1..=2 {
        keys.admit(&Claim::self_signed(&key(i), PeerName::from_u64(i))).unwrap_or_else(|e| panic!("{e}"));
    }
    keys
}

fn peer(i: u64, now: Instant) -> Ipam {
    let range: Cidr = "10.32.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
    let cfg = Config::new(PeerName::from_u64(i), range, None, Init::Consensus(2), i, key(i)).unwrap_or_else(|e| panic!("{e}"));
    Ipam::new(cfg, now)
}

/// Delivers outputs until nothing moves; returns the answers per peer.
fn run(ps: &mut [Ipam; 2]) -> [Vec<(u64, Result<String, String>)>; 2] {
    let mut done: [Vec<_>; 2] = [Vec::new(), Vec::new()];
    let mut q: VecDeque<(usize, usize, bool, Vec<u8>)> = VecDeque::new();
    let keys = keys();
    for _ in 0..10_000 {
        for i in 0..2 {
            while let Some(o) = ps[i].poll_output() {
                match o {
                    Output::Broadcast(p) => q.push_back((i, 1 - i, false, p)),
                    Output::Unicast(_, p) => q.push_back((i, 1 - i, true, p)),
                    Output::Done { req, result } => done[i].push((req, result.map(|a| a.cidr()).map_err(|f| f.message))),
                    Output::HandedOver { to, .. } => panic!("peer {i} handed over to {to} without leaving"),
                }
            }
        }
        let Some((from, to, unicast, p)) = q.pop_front() else { return done };
        let name = PeerName::from_u64(from as u64 + 1);
        if unicast {
            ps[to].handle_unicast(name, &p, &keys).unwrap_or_else(|e| panic!("{e}"));
        } else {
            // The delta would go to the other neighbours: there are none.
            let _delta = ps[to].merge(name, &p, &keys).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    panic!("messages never stopped");
}

#[test]
fn two_peers_agree_and_serve_without_anti_entropy() {
    let now = Instant::now();
    let mut ps = [peer(1, now), peer(2, now)];
    for (i, p) in ps.iter_mut().enumerate() {
        let other = PeerName::from_u64(2 - i as u64);
        p.set_reachable(now, BTreeSet::from([other]));
    }
    let subnet: Cidr = "10.32.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
    ps[1].allocate(now, 1, "c1", Want::Any(subnet), None);
    let done = run(&mut ps);
    assert!(ps[0].ready() && ps[1].ready(), "no consensus: {:?} / {:?}", ps[0].status().state, ps[1].status().state);
    assert_eq!(done[1].len(), 1, "{done:?}");
    assert!(done[1][0].1.is_ok(), "{done:?}");
    // The other peer serves at once from its share, and after a tick its view agrees.
    ps[0].allocate(now, 2, "c0", Want::Any(subnet), None);
    let later = now + Duration::from_secs(10);
    ps[0].tick(later);
    ps[1].tick(later);
    let done = run(&mut ps);
    assert!(done[0].iter().any(|(r, x)| *r == 2 && x.is_ok()), "{done:?}");
    assert_eq!(ps[0].ring(), ps[1].ring());
}

/// `prime` starts consensus with no request waiting (a CNI runtime's STATUS
/// comes before any ADD), and it completes on the messages alone.
#[test]
fn prime_reaches_consensus_without_a_request() {
    let now = Instant::now();
    let mut ps = [peer(1, now), peer(2, now)];
    for (i, p) in ps.iter_mut().enumerate() {
        let other = PeerName::from_u64(2 - i as u64);
        p.set_reachable(now, BTreeSet::from([other]));
    }
    assert!(ps[0].status().state.contains("not started"), "{}", ps[0].status().state);
    ps[0].prime(now);
    let done = run(&mut ps);
    assert!(done.iter().all(Vec::is_empty), "no request was made: {done:?}");
    assert!(ps[0].ready() && ps[1].ready(), "no consensus: {:?} / {:?}", ps[0].status().state, ps[1].status().state);
    assert_eq!(ps[0].ring(), ps[1].ring());
}

/// `is_dirty` peeks at what `take_dirty` takes.
#[test]
fn is_dirty_peeks_without_clearing() {
    let now = Instant::now();
    let mut ps = [peer(1, now), peer(2, now)];
    for (i, p) in ps.iter_mut().enumerate() {
        let other = PeerName::from_u64(2 - i as u64);
        p.set_reachable(now, BTreeSet::from([other]));
    }
    assert!(!ps[0].is_dirty(), "a fresh consensus peer has nothing to save");
    ps[0].prime(now);
    assert!(ps[0].is_dirty(), "a proposal is a promise to save");
    assert!(ps[0].is_dirty());
    assert!(ps[0].take_dirty());
    assert!(!ps[0].is_dirty());
    assert!(!ps[0].take_dirty());
}
