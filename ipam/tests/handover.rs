//! `leave` and its acknowledgement, with every `Ipam` registered as the `ipam`
//! channel of a real `weft_proto::Router`, the routers wired to each other in
//! memory (every message delivered in order, one at a time, unless the test
//! drops it).
//!
//! Each host has a "disk": after every input the shell saves `state()` when
//! `take_dirty()` says so, *before* the outputs of that round go to the
//! router, as the daemon must. What the hand-over promises is checked: the
//! harness fails any round that sends an acknowledgement without a dirty
//! state (so without saving first), and the first test checks that when the
//! acknowledgement reaches the leaver the receiver's disk already gives the
//! receiver the leaver's space.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_ipam::{Cidr, Config, Init, Ipam, Output, State, Want};
use weft_proto::identity::Claim;
use weft_proto::router::Session;
use weft_proto::{ConnId, ControlMsg, Event, GossipChannel, Hello, Keys, PeerName, Router, RouterConfig, SigningKey, Trust};

/// The first byte of an IPAM message is its variant's position in the wire
/// enum (postcard): see `handover_messages_keep_their_wire_numbers` in
/// `alloc.rs`.
const HANDOVER: u8 = 5;
const HANDOVER_ACK: u8 = 6;

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn name(i: usize) -> PeerName {
    PeerName::from_u64(i as u64 + 1)
}

fn key(i: usize) -> SigningKey {
    SigningKey::from_seed(&[i as u8 + 1; 32]).unwrap_or_else(|e| panic!("{e}"))
}

/// Every host's key bound to its name, as each router binds them.
fn keys(n: usize) -> Keys {
    let mut keys = Keys::new(Trust::FirstUse);
    for i in 0..n {
        keys.admit(&Claim::self_signed(&key(i), name(i))).unwrap_or_else(|e| panic!("{e}"));
    }
    keys
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 6783))
}

/// Which IPAM unicast this is, if it is one.
fn ipam_unicast(msg: &ControlMsg) -> Option<(PeerName, PeerName, &[u8])> {
    match msg {
        ControlMsg::Unicast { src, dst, channel, payload, .. } if channel == weft_ipam::CHANNEL => {
            Some((*src, *dst, payload.as_slice()))
        }
        _ => None,
    }
}

struct Host {
    router: Router,
    /// What the shell last saved.
    disk: Option<State>,
    handed_over: Vec<(PeerName, u64)>,
    done: Vec<(u64, Result<String, String>)>,
    /// What this router refused from peers.
    errors: Vec<String>,
}

impl Host {
    fn ipam(&mut self) -> &mut Ipam {
        self.router.channel_mut::<Ipam>(weft_ipam::CHANNEL).unwrap_or_else(|| panic!("no ipam channel"))
    }
}

/// A message on the wire: from host `from`'s connection `conn`.
struct Wire {
    from: usize,
    conn: ConnId,
    msg: ControlMsg,
}

struct Net {
    now: Instant,
    hosts: Vec<Host>,
    /// (host, its connection) → (other host, its end of the connection).
    links: Vec<((usize, ConnId), (usize, ConnId))>,
    queue: VecDeque<Wire>,
    /// Messages the test network drops.
    drop: fn(&ControlMsg) -> bool,
    /// IPAM unicast payloads dropped, for replaying.
    dropped: Vec<Vec<u8>>,
}

impl Net {
    fn new(inits: Vec<Init>) -> Net {
        let now = Instant::now();
        let range = cidr("10.32.0.0/24");
        let n = inits.len();
        let hosts = inits
            .into_iter()
            .enumerate()
            .map(|(i, init)| {
                let me = name(i);
                let cfg = Config::new(me, range, None, init, i as u64, key(i)).unwrap_or_else(|e| panic!("{e}"));
                let mut router = Router::new(RouterConfig::new(me, format!("h{i}"), 100 + i as u64, i as u64, key(i)), now);
                *router.keys_mut() = keys(n);
                router.register_channel(weft_ipam::CHANNEL, Box::new(Ipam::new(cfg, now)));
                Host { router, disk: None, handed_over: Vec::new(), done: Vec::new(), errors: Vec::new() }
            })
            .collect();
        Net { now, hosts, links: Vec::new(), queue: VecDeque::new(), drop: |_| false, dropped: Vec::new() }
    }

    /// Connects `a` (dialing) and `b`, with a working data path both ways.
    fn connect(&mut self, a: usize, b: usize) {
        let (ca, cb) = (ConnId((a * 100 + b) as u64), ConnId((b * 100 + a) as u64));
        let binding = [(a * 100 + b) as u8; 32];
        let hello = |i: usize| Hello::prove(&key(i), Claim::self_signed(&key(i), name(i)), format!("h{i}"), 100 + i as u64, 6783, &binding);
        let now = self.now;
        self.hosts[a].router.add_target(now, addr(b));
        let s = |i: usize| Session { local: addr(i), binding };
        self.hosts[a].router.handle_connection_up(now, ca, addr(b), Some(addr(b)), hello(b), s(a)).unwrap_or_else(|e| panic!("{e}"));
        self.hosts[b].router.handle_connection_up(now, cb, addr(a), None, hello(a), s(b)).unwrap_or_else(|e| panic!("{e}"));
        self.hosts[a].router.handle_sleeve_state(now, ca, true);
        self.hosts[b].router.handle_sleeve_state(now, cb, true);
        self.links.push(((a, ca), (b, cb)));
        self.links.push(((b, cb), (a, ca)));
    }

    /// The shell's round for host `i`: save if dirty, then act on the outputs.
    fn flush(&mut self, i: usize) {
        let mut routes_changed = false;
        while let Some(e) = self.hosts[i].router.poll_event() {
            routes_changed |= e == Event::RoutesChanged;
        }
        let now = self.now;
        let h = &mut self.hosts[i];
        if routes_changed {
            let reachable: BTreeSet<PeerName> = h.router.routes().unicast.keys().copied().collect();
            h.ipam().set_reachable(now, reachable);
        }
        let ipam = h.ipam();
        let dirty = ipam.is_dirty();
        if ipam.take_dirty() {
            let st = ipam.state();
            h.disk = Some(st);
        }
        assert!(!h.ipam().is_dirty(), "take_dirty clears the flag");
        let mut outs = Vec::new();
        while let Some(o) = h.ipam().poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Output::Broadcast(p) => h.router.broadcast(weft_ipam::CHANNEL, p),
                Output::Unicast(to, p) => {
                    if p.first() == Some(&HANDOVER_ACK) {
                        assert!(dirty, "host {i} acknowledges a hand-over in a round that saves nothing");
                    }
                    h.router.send_unicast(to, weft_ipam::CHANNEL, p);
                }
                Output::Done { req, result } => h.done.push((req, result.map(|a| a.cidr()).map_err(|f| f.message))),
                Output::HandedOver { to, addresses } => h.handed_over.push((to, addresses)),
            }
        }
        while let Some(t) = h.router.poll_transmit() {
            self.queue.push_back(Wire { from: i, conn: t.conn, msg: t.msg });
        }
    }

    /// The next message on the wire.
    fn peek(&self) -> Option<&ControlMsg> {
        self.queue.front().map(|w| &w.msg)
    }

    /// Delivers (or drops) the next message. False when there is none.
    fn step(&mut self) -> bool {
        let Some(w) = self.queue.pop_front() else { return false };
        if (self.drop)(&w.msg) {
            if let Some((_, _, p)) = ipam_unicast(&w.msg) {
                self.dropped.push(p.to_vec());
            }
            return true;
        }
        let &(_, (to, conn)) =
            self.links.iter().find(|(a, _)| *a == (w.from, w.conn)).unwrap_or_else(|| panic!("no link"));
        if let Err(e) = self.hosts[to].router.handle_message(self.now, conn, w.msg) {
            self.hosts[to].errors.push(e);
        }
        self.flush(to);
        true
    }

    /// Delivers messages until nothing moves.
    fn run(&mut self) {
        for i in 0..self.hosts.len() {
            self.flush(i);
        }
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("messages never stopped");
    }

    /// Every allocator's timers, then delivery.
    fn tick(&mut self, d: Duration) {
        self.now += d;
        for i in 0..self.hosts.len() {
            let now = self.now;
            self.hosts[i].ipam().tick(now);
            self.flush(i);
        }
        self.run();
    }

    /// Host `i` takes the payload directly, as from `from`.
    fn inject(&mut self, i: usize, from: PeerName, payload: &[u8]) -> Result<(), String> {
        let keys = keys(self.hosts.len());
        let r = self.hosts[i].ipam().handle_unicast(from, payload, &keys);
        self.flush(i);
        self.run();
        r
    }

    fn owned_on_disk(&self, i: usize, peer: PeerName) -> Vec<(u64, u64)> {
        self.hosts[i].disk.as_ref().map(|d| d.ring.owned(peer)).unwrap_or_default()
    }
}

/// Three peers agree on the ring (consensus=3) and each holds one address.
fn three_with_addresses() -> Net {
    let mut net = Net::new(vec![Init::Consensus(3), Init::Consensus(3), Init::Consensus(3)]);
    net.connect(0, 1);
    net.connect(0, 2);
    net.connect(1, 2);
    net.run();
    let subnet = cidr("10.32.0.0/24");
    let now = net.now;
    for i in 0..3 {
        net.hosts[i].ipam().allocate(now, i as u64, &format!("c{i}"), Want::Any(subnet), None);
        net.flush(i);
        net.run();
    }
    net.tick(Duration::from_secs(10));
    for (i, h) in net.hosts.iter_mut().enumerate() {
        assert!(h.ipam().ready(), "host {i}: {}", h.ipam().status().state);
        assert!(matches!(h.done.as_slice(), [(r, Ok(_))] if *r == i as u64), "host {i}: {:?}", h.done);
        assert!(h.errors.is_empty(), "host {i}: {:?}", h.errors);
    }
    net
}

#[test]
fn leaving_peer_is_handed_over_only_once_the_receiver_saved_its_space() {
    let mut net = three_with_addresses();
    let leaver = 2;
    let mine = net.hosts[leaver].ipam().ring().owned(name(leaver));
    let total: u64 = mine.iter().map(|(s, e)| e - s).sum();
    assert!(total > 0);
    let now = net.now;
    let (to, n) = net.hosts[leaver].ipam().leave(now).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("nothing to hand over"));
    assert_eq!(n, total);
    let p = net.hosts[leaver].ipam().pending_handover().unwrap_or_else(|| panic!("no pending hand-over"));
    assert_eq!((p.to, p.addresses, p.since), (to, total, now));
    let state = net.hosts[leaver].ipam().status().state;
    assert!(state.contains("waiting for its acknowledgement"), "{state}");
    let receiver = (0..3).find(|i| name(*i) == to).unwrap_or_else(|| panic!("{to} is not a host"));

    // Check, as the acknowledgement reaches the leaver, that the receiver's
    // disk already gives it every piece the leaver had.
    net.flush(leaver);
    let mut acks = 0;
    loop {
        if let Some((src, dst, payload)) = net.peek().and_then(ipam_unicast) {
            if payload.first() == Some(&HANDOVER_ACK) {
                assert_eq!((src, dst), (to, name(leaver)));
                let on_disk = net.owned_on_disk(receiver, to);
                assert!(
                    mine.iter().all(|&(s, e)| on_disk.iter().any(|&(ds, de)| ds <= s && e <= de)),
                    "the acknowledgement left before the receiver saved the space: disk {on_disk:?}, handed {mine:?}"
                );
                assert!(net.hosts[leaver].handed_over.is_empty(), "handed over before the acknowledgement arrived");
                acks += 1;
            }
        }
        if !net.step() {
            break;
        }
    }
    assert_eq!(acks, 1);
    assert_eq!(net.hosts[leaver].handed_over, vec![(to, total)]);
    assert_eq!(net.hosts[leaver].ipam().pending_handover(), None);
    assert_eq!(net.hosts[leaver].ipam().status().state, "left the mesh's range");
    assert_eq!(net.hosts[receiver].ipam().stats().handovers_taken, 1);

    // Everyone agrees: the leaver owns nothing, the receiver its space.
    net.tick(Duration::from_secs(10));
    for i in 0..3 {
        let ring = net.hosts[i].ipam().ring().clone();
        assert!(ring.owned(name(leaver)).is_empty(), "host {i} still gives the leaver {:?}", ring.owned(name(leaver)));
        for (s, _) in &mine {
            assert_eq!(ring.owner(*s as u32), Some(to), "host {i}");
        }
        assert!(net.hosts[i].errors.is_empty(), "host {i}: {:?}", net.hosts[i].errors);
    }
    assert_eq!(net.hosts[leaver].ipam().allocations().count(), 0);
    // The receiver serves from its new space.
    let want = Want::Addr(mine[0].0 as u32 + 1, cidr("10.32.0.0/24"));
    let now = net.now;
    net.hosts[receiver].ipam().allocate(now, 9, "taken-over", want, None);
    net.flush(receiver);
    assert!(net.hosts[receiver].done.iter().any(|(r, x)| *r == 9 && x.is_ok()), "{:?}", net.hosts[receiver].done);

    // Leaving is final: no requests, no taking space over, and a second
    // `leave` has nothing left to hand over.
    net.hosts[leaver].ipam().allocate(now, 10, "late", Want::Any(cidr("10.32.0.0/24")), None);
    net.flush(leaver);
    assert!(
        net.hosts[leaver].done.iter().any(|(r, x)| *r == 10 && x.as_ref().is_err_and(|m| m.contains("leaving"))),
        "{:?}",
        net.hosts[leaver].done
    );
    assert!(net.hosts[leaver].ipam().rmpeer(now, name(0)).is_err());
    assert_eq!(net.hosts[leaver].ipam().leave(now), Ok(None));
}

#[test]
fn a_lost_handover_or_ack_gives_no_handed_over_and_leave_resends_it() {
    let mut net = three_with_addresses();
    let leaver = 2;
    net.drop = |m| ipam_unicast(m).is_some_and(|(_, _, p)| p.first() == Some(&HANDOVER));
    let now = net.now;
    let (to, n) = net.hosts[leaver].ipam().leave(now).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("nothing"));
    net.flush(leaver);
    net.run();
    net.tick(Duration::from_secs(10));
    assert_eq!(net.dropped.len(), 1, "one hand-over sent and lost");
    let receiver = (0..3).find(|i| name(*i) == to).unwrap_or_else(|| panic!("{to}"));
    // The gossiped ring still got there: the receiver owns the space, but was
    // never asked to acknowledge, so the leaver is not told it may stop.
    assert!(net.owned_on_disk(receiver, name(leaver)).is_empty());
    assert_eq!(net.hosts[receiver].ipam().stats().handovers_taken, 0);
    assert!(net.hosts[leaver].handed_over.is_empty());
    assert_eq!(net.hosts[leaver].ipam().pending_handover().map(|p| (p.to, p.addresses, p.since)), Some((to, n, now)));

    // Again, and this time the acknowledgement is lost.
    net.drop = |m| ipam_unicast(m).is_some_and(|(_, _, p)| p.first() == Some(&HANDOVER_ACK));
    net.dropped.clear();
    let later = net.now;
    assert_eq!(net.hosts[leaver].ipam().leave(later), Ok(Some((to, n))), "a second leave re-sends the same hand-over");
    net.flush(leaver);
    net.run();
    assert_eq!(net.hosts[receiver].ipam().stats().handovers_taken, 1);
    assert!(net.hosts[leaver].handed_over.is_empty());
    assert_eq!(net.hosts[leaver].ipam().pending_handover().map(|p| p.since), Some(now), "the first leave's time");
    let ack = net.dropped.pop().unwrap_or_else(|| panic!("no acknowledgement sent"));
    net.drop = |_| false;

    // That acknowledgement from another peer is ignored and counted.
    let other = (0..3).find(|i| *i != leaver && *i != receiver).unwrap_or_else(|| panic!("third"));
    assert_eq!(net.inject(leaver, name(other), &ack), Ok(()));
    assert!(net.hosts[leaver].handed_over.is_empty());
    assert_eq!(net.hosts[leaver].ipam().stats().stray_handover_acks, 1);
    // From the receiver it completes the hand-over, once.
    assert_eq!(net.inject(leaver, to, &ack), Ok(()));
    assert_eq!(net.hosts[leaver].handed_over, vec![(to, n)]);
    assert_eq!(net.inject(leaver, to, &ack), Ok(()));
    assert_eq!(net.hosts[leaver].handed_over, vec![(to, n)]);
    assert_eq!(net.hosts[leaver].ipam().stats().stray_handover_acks, 2);
    for (i, h) in net.hosts.iter().enumerate() {
        assert!(h.errors.is_empty(), "host {i}: {:?}", h.errors);
    }
}

#[test]
fn a_refused_ring_gets_no_acknowledgement() {
    // Two meshes started separately, then connected: their rings refuse each other.
    let mut net = Net::new(vec![Init::Seeds(vec![name(0)]), Init::Seeds(vec![name(1)])]);
    net.connect(0, 1);
    net.run();
    let before = net.hosts[0].disk.clone().unwrap_or_else(|| panic!("host 0 saved its ring"));
    net.hosts[0].errors.clear();
    let now = net.now;
    let (to, _) = net.hosts[1].ipam().leave(now).unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("nothing"));
    assert_eq!(to, name(0));
    net.flush(1);
    net.run();
    net.tick(Duration::from_secs(10));
    assert!(
        net.hosts[0].errors.iter().any(|e| e.contains("refused") && e.contains("separate meshes")),
        "{:?}",
        net.hosts[0].errors
    );
    assert_eq!(net.hosts[0].ipam().stats().handovers_taken, 0);
    assert_eq!(net.hosts[0].disk.as_ref().map(|d| &d.ring), Some(&before.ring), "the refused ring changed nothing");
    assert!(net.hosts[1].handed_over.is_empty());
    assert!(net.hosts[1].ipam().pending_handover().is_some());
}
